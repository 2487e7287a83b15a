//! The CloudStack bridge: an API client for the management server
//! (`client`, `sign`), the objects it reads (`model`), the pure mapping from
//! CloudStack state to pxemesh records (`reconcile`), what one sync lists
//! (`fetch`), the bridge's configuration (`config`) and the leader-run sync
//! loop over all of them (`bridge`).

pub mod bridge;
pub mod client;
pub mod config;
pub mod fetch;
pub mod model;
pub mod reconcile;
pub mod sign;

pub use client::{Client, ClientSettings, CsError};
pub use config::CloudStackConfig;
pub use fetch::{fetch, notify_provision_done, Listing};
pub use reconcile::{plan, Inputs, Mapping, Plan};
pub use sign::SecretKey;
