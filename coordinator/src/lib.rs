//! pxemesh coordinator library: the Raft-replicated desired state of a pxemesh
//! installation (raft-rs + sled) and the mTLS gRPC services in front of it.
//!
//! Entry point: [`server::run`]. See ARCHITECTURE.md for the code map.

pub mod api;
pub mod blobs;
pub mod client;
pub mod clock;
pub mod cloudstack;
pub mod config;
pub mod crypto;
pub mod error;
pub mod failpoint;
pub mod imagepush;
pub mod images;
pub mod import;
pub mod jobs;
pub mod limits;
pub mod metrics;
pub mod model;
pub mod node;
pub mod notify;
pub mod server;
pub mod state;
pub mod storage;
mod transport;
mod wal;

pub use config::Config;
pub use server::{run, Listeners};
