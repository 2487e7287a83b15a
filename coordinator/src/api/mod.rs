//! The gRPC edge: service implementations, authorization, conversions and the
//! error-to-status mapping. Generated protobuf types do not leak past this module.

pub mod admin;
pub mod auth;
pub mod cloudstack;
pub mod convert;
pub mod images;
pub mod jobs;
pub mod raft;
pub mod relay;
pub mod status;
