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
        },
        CoordError::Invalid(m) => Status::invalid_argument(m),
        e @ (CoordError::NoLeader
        | CoordError::Timeout(_)
        | CoordError::Stopped
        | CoordError::Removed) => Status::unavailable(e.to_string()),
        e => {
            error!(error = %e, "internal error serving a request");
            Status::internal(e.to_string())
        }
    }
}

impl From<CoordError> for Status {
    fn from(e: CoordError) -> Status {
        to_status(e)
    }
}
