//! CloudStackSync / CloudStackStatus: the bridge's status at the gRPC edge.

use std::time::Duration;

use pxemesh_proto::v1 as pb;

use crate::cloudstack::bridge::{BridgeError, BridgeHandle, BridgeStatus};

fn to_proto(s: BridgeStatus) -> pb::CloudStackStatusResponse {
    pb::CloudStackStatusResponse {
        node_id: s.node_id,
        term: s.term,
        state: s.state,
        last_sync_unix_ms: s.last_sync_unix_ms,
        last_sync_duration_ms: s.last_sync_duration_ms,
        objects_seen: s.objects_seen,
        objects_changed: s.objects_changed,
        last_error: s.last_error,
        syncs: s.syncs,
        failures: s.failures,
        notifies_accepted: s.notifies_accepted,
        jobs_submitted: s.jobs_submitted,
        skipped: s.skipped,
        last_success_unix_ms: s.last_success_unix_ms,
        fence_epoch: s.fence_epoch,
    }
}

pub async fn sync(
    bridge: Option<&BridgeHandle>,
    r: pb::CloudStackSyncRequest,
) -> Result<pb::CloudStackStatusResponse, BridgeError> {
    let b = bridge.ok_or(BridgeError::NotConfigured)?;
    let timeout = match r.timeout_seconds {
        0 => Duration::from_secs(60),
        n => Duration::from_secs(u64::from(n.min(3600))),
    };
    Ok(to_proto(b.sync_now(timeout).await?))
}

/// Answered by the node running the bridge; the others are UNAVAILABLE.
pub fn status(bridge: Option<&BridgeHandle>) -> Result<pb::CloudStackStatusResponse, BridgeError> {
    let b = bridge.ok_or(BridgeError::NotConfigured)?;
    let s = b.status();
    if !s.active {
        return Err(BridgeError::NotActive {
            leader: s.leader_id,
        });
    }
    Ok(to_proto(s))
}
