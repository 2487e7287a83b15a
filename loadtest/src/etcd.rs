//! A client for the subset of etcd's v3 gRPC API the benchmark uses
//! (`etcdserverpb.KV/Put`, `etcdserverpb.Maintenance/Status`), generated from
//! `loadtest/proto/etcdserverpb/rpc.proto`.

#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("etcdserverpb");
}

pub use pb::kv_client::KvClient;
pub use pb::maintenance_client::MaintenanceClient;
