//! pxemesh relay library: DHCP, TFTP and HTTP boot for one rack, served from
//! the rack's local state (a static file, or a persisted copy kept in sync
//! with the coordinators).

pub mod boot;
pub mod cache;
pub mod config;
pub mod dhcp;
pub mod durable;
pub mod error;
pub mod events;
pub mod files;
pub mod http;
pub mod http_fast;
pub mod ipmi;
pub mod limits;
pub mod metrics;
pub mod net;
pub mod server;
pub mod state;
pub mod store;
pub mod sync;
pub mod tftp;
