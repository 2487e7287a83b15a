//! pxemesh-loadtest: load generators and benchmarks for pxemesh.
//!
//! * [`writes`]: the control-plane write path (host puts) against a pxemesh
//!   coordinator cluster or, for comparison, an etcd v3 cluster, over mTLS.
//! * [`storm`]: the boot storm, simulated hosts going through DHCP, TFTP and
//!   HTTP boot against a relay (and, with a baseline, against dnsmasq).

pub mod etcd;
pub mod ipmi;
pub mod propagation;
pub mod scale;
pub mod storm;
pub mod writes;

pub use pxemesh_certs::TlsPaths;
pub use writes::{writes, ConnectMode, Target, WritesConfig, WritesReport};
