//! Typed errors of the coordinator library. They are mapped to `tonic::Status`
//! in exactly one place: `api::status`.

use serde::{Deserialize, Serialize};

/// A command rejected by the state machine. Deterministic: every node reaches
/// the same verdict for the same command, so it travels back to the proposer
/// as part of the apply result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum StateError {
    #[error("{0}")]
    Invalid(String),
    #[error("{kind} {name:?} not found")]
    NotFound { kind: String, name: String },
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    InUse(String),
    /// A fenced writer's command carried an epoch below the one stored
    /// (a newer stint of that writer has started; see `Command::Fenced`).
    #[error("{writer} write fenced: its epoch {epoch} is below the current epoch {current}")]
    Fenced {
        writer: String,
        epoch: u64,
        current: u64,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("no leader is known; the cluster may have lost quorum")]
    NoLeader,
    #[error("timed out after {0:?} waiting for the cluster (outcome unknown; retrying is safe)")]
    Timeout(std::time::Duration),
    #[error(
        "leadership changed while the request was in flight (outcome unknown; retrying is safe)"
    )]
    LeaderChanged,
    #[error("the Raft node has stopped")]
    Stopped,
    #[error("this node was removed from the cluster")]
    Removed,
    #[error("storage error: {0}")]
    Storage(#[from] sled::Error),
    #[error("raft error: {0}")]
    Raft(#[from] raft::Error),
    #[error("protobuf codec error: {0}")]
    Codec(#[from] protobuf::ProtobufError),
    #[error("encoding error: {0}")]
    Json(#[from] serde_json::Error),
    #[error("corrupt state: {0}")]
    Corrupt(String),
    #[error("cluster key: {0}")]
    Crypto(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("config: {0}")]
    Config(String),
    /// A server we fetch from (an image URL) failed or refused.
    #[error("upstream: {0}")]
    Upstream(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// The data disk is (nearly) full; writes are refused until space is freed.
    #[error("disk full: {0}")]
    DiskFull(String),
    /// The Raft node stopped after a storage failure it cannot recover from
    /// in-process (the process exits; a restart recovers from the durable log).
    #[error("storage failure, this node is stopping: {0}")]
    StorageFailed(String),
    #[error(transparent)]
    Blob(#[from] crate::blobs::BlobError),
}

impl CoordError {
    pub fn invalid(msg: impl Into<String>) -> CoordError {
        CoordError::State(StateError::Invalid(msg.into()))
    }
}
