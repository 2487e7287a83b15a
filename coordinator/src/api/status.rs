//! The one place where library errors become gRPC statuses.

use tonic::Status;
use tracing::error;

use crate::error::{CoordError, StateError};

pub fn to_status(e: CoordError) -> Status {
    match e {
        CoordError::State(s) => match s {
            StateError::Invalid(m) => Status::invalid_argument(m),
            e @ StateError::NotFound { .. } => Status::not_found(e.to_string()),
            StateError::Conflict(m) => Status::already_exists(m),
            StateError::InUse(m) => Status::failed_precondition(m),
            e @ StateError::Fenced { .. } => Status::aborted(e.to_string()),
        },
        CoordError::Invalid(m) => Status::invalid_argument(m),
        CoordError::Upstream(m) => Status::failed_precondition(m),
        CoordError::Blob(b) => blob_status(b),
        e @ CoordError::DiskFull(_) => Status::resource_exhausted(e.to_string()),
        e @ CoordError::StorageFailed(_) => Status::unavailable(e.to_string()),
        e @ (CoordError::NoLeader
        | CoordError::LeaderChanged
        | CoordError::Timeout(_)
        | CoordError::Stopped
        | CoordError::Removed) => Status::unavailable(e.to_string()),
        e => {
            error!(error = %e, "internal error serving a request");
            Status::internal(e.to_string())
        }
    }
}

fn blob_status(e: crate::blobs::BlobError) -> Status {
    use crate::blobs::BlobError as B;
    match e {
        e @ B::BadDigest(_) => Status::invalid_argument(e.to_string()),
        e @ (B::NotFound(_) | B::Corrupt { .. }) => Status::not_found(e.to_string()),
        e @ (B::Mismatch { .. } | B::TooLong { .. } | B::SizeMismatch { .. }) => {
            Status::data_loss(e.to_string())
        }
        e @ B::Busy(_) => Status::aborted(e.to_string()),
        e @ B::Offset { .. } => Status::failed_precondition(e.to_string()),
        B::Io(io) if crate::limits::io_is_disk_full(&io) => {
            Status::resource_exhausted(format!("disk full: blob store: {io}"))
        }
        e @ B::Io(_) => {
            error!(error = %e, "blob store I/O error serving a request");
            Status::internal(e.to_string())
        }
    }
}

impl From<CoordError> for Status {
    fn from(e: CoordError) -> Status {
        to_status(e)
    }
}

/// CloudStack bridge errors: "not here" is UNAVAILABLE so clients move on to
/// the next endpoint (the leader runs the bridge).
pub fn bridge_status(e: crate::cloudstack::bridge::BridgeError) -> Status {
    use crate::cloudstack::bridge::BridgeError as B;
    match e {
        e @ (B::NotActive { .. } | B::Fenced(_)) => Status::unavailable(e.to_string()),
        e @ B::NotConfigured => Status::failed_precondition(e.to_string()),
        e @ B::Timeout(_) => Status::deadline_exceeded(e.to_string()),
        e @ B::CloudStack(_) => Status::failed_precondition(e.to_string()),
        B::Coord(c) => to_status(c),
        e @ B::Config(_) => Status::internal(e.to_string()),
    }
}

impl From<crate::cloudstack::bridge::BridgeError> for Status {
    fn from(e: crate::cloudstack::bridge::BridgeError) -> Status {
        bridge_status(e)
    }
}
