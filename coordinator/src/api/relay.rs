//! RelayService: what rack relays sync over. The relay's rack comes from its
//! certificate (the auth layer admits only relay identities; `rack_of` reads
//! the rack), never from a request field, so a relay can neither see nor
//! write another rack's records.

use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::Stream;
use pxemesh_certs::Role;
use pxemesh_proto::v1 as pb;
use pxemesh_proto::v1::relay_service_server::RelayService;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{debug, info};

use super::auth::peer;
use super::convert::{kind_to_proto, record_to_proto};
use crate::error::CoordError;
use crate::model::{Kind, Record, Relay};
use crate::node::NodeHandle;
use crate::state::{Change, ChangeOp, Command, State};

pub struct RelayApi {
    node: NodeHandle,
    blobs: std::sync::Arc<crate::blobs::BlobStore>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    /// Opens BMC passwords for LeaseJobs (None: relays get no password).
    key: Option<crate::crypto::ClusterKey>,
}

impl RelayApi {
    pub fn new(
        node: NodeHandle,
        blobs: std::sync::Arc<crate::blobs::BlobStore>,
        metrics: std::sync::Arc<crate::metrics::Metrics>,
    ) -> RelayApi {
        RelayApi {
            node,
            blobs,
            metrics,
            key: None,
        }
    }

    pub fn with_cluster_key(mut self, key: crate::crypto::ClusterKey) -> RelayApi {
        self.key = Some(key);
        self
    }
}

/// The rack a relay may see: only the one named in its certificate.
pub fn rack_of<T>(req: &Request<T>) -> Result<(String, String), Status> {
    match peer(req)?.role {
        Role::Relay { rack, name } => Ok((rack, name)),
        _ => Err(Status::permission_denied(
            "RelayService is for relay certificates",
        )),
    }
}

type Stream2<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Does this record belong in rack `rack`'s view? Profiles and image manifests
/// are global; jobs and relay records are not part of the boot state.
fn in_rack(rec: &Record, rack: &str) -> bool {
    match rec {
        Record::Rack(r) => r.name == rack,
        Record::Network(_) | Record::Host(_) => rec.rack() == Some(rack),
        Record::Profile(_) | Record::Image(_) => true,
        Record::Job(_) | Record::Relay(_) => false,
    }
}

const WATCHED: [Kind; 5] = [
    Kind::Rack,
    Kind::Network,
    Kind::Host,
    Kind::Profile,
    Kind::Image,
];

/// The event a rack's watcher gets for one change, if any.
fn event_for(change: &Change, rack: &str, revision: u64) -> Option<pb::WatchEvent> {
    let delete = || {
        Some(pb::WatchEvent {
            r#type: pb::EventType::Delete as i32,
            kind: kind_to_proto(change.kind) as i32,
            name: change.name.clone(),
            object: None,
            revision,
        })
    };
    if !WATCHED.contains(&change.kind) {
        return None;
    }
    match (&change.op, &change.record) {
        (ChangeOp::Put, Some(rec)) if in_rack(rec, rack) => Some(pb::WatchEvent {
            r#type: pb::EventType::Put as i32,
            kind: kind_to_proto(change.kind) as i32,
            name: change.name.clone(),
            object: Some(record_to_proto(rec)),
            revision,
        }),
        // Moved out of this rack: gone from its point of view.
        (ChangeOp::Put, _) if change.old_rack.as_deref() == Some(rack) => delete(),
        (ChangeOp::Delete, _) => {
            let global = matches!(change.kind, Kind::Profile | Kind::Image);
            if global
                || change.old_rack.as_deref() == Some(rack)
                || (change.kind == Kind::Rack && change.name == rack)
            {
                delete()
            } else {
                None
            }
        }
        _ => None,
    }
}

/// A consistent rack view: the revision is read before and after the scan and
/// the scan repeated until they agree (applies are atomic sled batches).
fn rack_snapshot(state: &State, rack: &str) -> Result<pb::RackSnapshot, CoordError> {
    let mut attempt = 0;
    loop {
        let before = state.revision()?;
        let mut objects = Vec::new();
        // Records name their rack as `"rack":"<name>"` in their compact JSON:
        // scanning for that keeps a rack snapshot cheap among many racks.
        let needle = format!("\"rack\":{}", serde_json::to_string(rack)?);
        for kind in WATCHED {
            let recs = match kind {
                Kind::Network | Kind::Host => state.list_containing(kind, needle.as_bytes())?,
                _ => state.list(kind)?,
            };
            for rec in recs {
                if in_rack(&rec, rack) {
                    objects.push(record_to_proto(&rec));
                }
            }
        }
        let after = state.revision()?;
        attempt += 1;
        // After a few busy attempts, label with the earlier revision: replaying
        // the (idempotent, full-record) events after it converges all the same.
        if before == after || attempt >= 5 {
            return Ok(pb::RackSnapshot {
                revision: before,
                objects,
            });
        }
    }
}

/// Send or report that the relay hung up.
async fn send(
    tx: &mpsc::Sender<Result<pb::WatchResponse, Status>>,
    m: pb::watch_response::Message,
) -> bool {
    tx.send(Ok(pb::WatchResponse { message: Some(m) }))
        .await
        .is_ok()
}

/// The body of one relay's watch stream.
async fn watch_loop(
    node: NodeHandle,
    rack: String,
    relay: String,
    from: u64,
    tx: mpsc::Sender<Result<pb::WatchResponse, Status>>,
) {
    let state = node.state().clone();
    let mut applied = node.applied_watch();
    let fail = |e: CoordError| Status::internal(format!("watch of rack {rack}: {e}"));
    let mut last = from;
    let mut caught_up = from;
    let mut need_snapshot = from == 0;
    loop {
        let floor = match state.changelog_floor() {
            Ok(f) => f,
            Err(e) => {
                let _ = tx.send(Err(fail(e))).await;
                return;
            }
        };
        if last + 1 < floor {
            need_snapshot = true;
        }
        if need_snapshot {
            match rack_snapshot(&state, &rack) {
                Ok(snap) => {
                    info!(relay = %relay, rack = %rack, revision = snap.revision, objects = snap.objects.len(), from, "relay watch: sending snapshot");
                    last = snap.revision;
                    if !send(&tx, pb::watch_response::Message::Snapshot(snap)).await {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(fail(e))).await;
                    return;
                }
            }
            need_snapshot = false;
        }
        let current = match state.revision() {
            Ok(r) => r,
            Err(e) => {
                let _ = tx.send(Err(fail(e))).await;
                return;
            }
        };
        let mut rev = last + 1;
        while rev <= current {
            match state.changes_at(rev) {
                Ok(Some(changes)) => {
                    for c in &changes {
                        if let Some(ev) = event_for(c, &rack, rev) {
                            if !send(&tx, pb::watch_response::Message::Event(ev)).await {
                                return;
                            }
                        }
                    }
                }
                // Compacted away while we were behind: start over with a snapshot.
                Ok(None) => {
                    need_snapshot = true;
                    break;
                }
                Err(e) => {
                    let _ = tx.send(Err(fail(e))).await;
                    return;
                }
            }
            last = rev;
            rev += 1;
        }
        if need_snapshot {
            continue;
        }
        // One revision can carry several events; a progress notice after every
        // catch-up tells the relay that `last` is complete (its resume point).
        if last > caught_up
            && !send(
                &tx,
                pb::watch_response::Message::Progress(pb::WatchProgress { revision: last }),
            )
            .await
        {
            return;
        }
        caught_up = last;
        tokio::select! {
            r = applied.changed() => if r.is_err() { return },
            _ = tx.closed() => {
                debug!(relay = %relay, "relay watch closed by the relay");
                return;
            }
            // Nothing applied for a while: loop anyway (cheap) as a safety net.
            _ = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[tonic::async_trait]
impl RelayService for RelayApi {
    type WatchStream = Stream2<pb::WatchResponse>;
    type FetchBlobStream = Stream2<pb::BlobChunk>;

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let (rack, relay) = rack_of(&req)?;
        let r = req.into_inner();
        if !r.rack.is_empty() && r.rack != rack {
            tracing::warn!(relay = %relay, rack = %rack, asked = %r.rack, "relay asked to watch another rack; refused");
            return Err(Status::permission_denied(format!(
                "relay {relay} belongs to rack {rack} and may not watch rack {}",
                r.rack
            )));
        }
        let from = r.from_revision;
        info!(relay = %relay, rack = %rack, from, "relay watch started");
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(watch_loop(self.node.clone(), rack, relay, from, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let (rack, name) = rack_of(&req)?;
        let hb = req.into_inner();
        let record = Record::Relay(Relay {
            name,
            rack,
            version: hb.version.chars().take(64).collect(),
            last_seen_unix_ms: now_ms(),
            applied_revision: hb.applied_revision,
            uptime_seconds: hb.uptime_seconds,
            cache_bytes: hb.cache_bytes,
            counters: hb.counters.into_iter().take(64).collect(),
            meta: Default::default(),
        });
        let out = self.node.propose(&Command::Put(vec![record])).await?;
        Ok(Response::new(pb::HeartbeatResponse {
            revision: out.revision,
            interval_seconds: 0,
        }))
    }

    async fn lease_jobs(
        &self,
        req: Request<pb::LeaseJobsRequest>,
    ) -> Result<Response<pb::LeaseJobsResponse>, Status> {
        let (rack, relay) = rack_of(&req)?;
        let r = req.into_inner();
        let out = super::jobs::lease(&self.node, self.key.as_ref(), &rack, &relay, r).await?;
        Ok(Response::new(out))
    }
    async fn report_job(
        &self,
        req: Request<pb::ReportJobRequest>,
    ) -> Result<Response<pb::ReportJobResponse>, Status> {
        let (rack, relay) = rack_of(&req)?;
        let out = super::jobs::report(&self.node, &rack, &relay, req.into_inner()).await?;
        Ok(Response::new(out))
    }
    /// Exactly-once from the operator's view: the relay resends until acked;
    /// the state machine drops sequences at or below the relay's high-water mark.
    async fn report_boot_events(
        &self,
        req: Request<pb::ReportBootEventsRequest>,
    ) -> Result<Response<pb::ReportBootEventsResponse>, Status> {
        let (rack, relay) = rack_of(&req)?;
        let r = req.into_inner();
        if r.events.len() > 1000 {
            return Err(Status::invalid_argument("at most 1000 events per report"));
        }
        const KINDS: [&str; 5] = [
            "dhcp-offer",
            "dhcp-ack",
            "tftp-file",
            "http-file",
            "provision-done",
        ];
        let mut events = Vec::with_capacity(r.events.len());
        let mut prev = 0;
        for e in r.events {
            if e.host_mac != "-" && e.host_mac.parse::<crate::model::Mac>().is_err() {
                return Err(Status::invalid_argument(format!(
                    "event {}: malformed MAC {:?}",
                    e.sequence, e.host_mac
                )));
            }
            if !KINDS.contains(&e.kind.as_str()) {
                return Err(Status::invalid_argument(format!(
                    "event {}: unknown kind {:?}",
                    e.sequence, e.kind
                )));
            }
            if e.sequence <= prev {
                return Err(Status::invalid_argument(
                    "event sequence numbers must increase within a report",
                ));
            }
            prev = e.sequence;
            let mac = match e.host_mac.parse::<crate::model::Mac>() {
                Ok(m) => m.to_string(),
                Err(_) => "-".to_string(),
            };
            events.push(crate::state::EventIn {
                mac,
                kind: e.kind,
                detail: e.detail.chars().take(512).collect(),
                unix_ms: e.unix_ms,
                sequence: e.sequence,
            });
        }
        let out = self
            .node
            .propose(&Command::BootEvents {
                rack,
                relay,
                events,
            })
            .await?;
        Ok(Response::new(pb::ReportBootEventsResponse {
            acked_sequence: out.acked_sequence,
        }))
    }
    async fn fetch_blob(
        &self,
        req: Request<pb::FetchBlobRequest>,
    ) -> Result<Response<Self::FetchBlobStream>, Status> {
        // Relays and peer coordinators (the auth layer admits both).
        let who = peer(&req)?.to_string();
        let stream =
            super::images::fetch(&self.blobs, &self.metrics, req.into_inner(), who).await?;
        Ok(Response::new(stream))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Meta, Rack};

    fn rack_rec(name: &str) -> Record {
        Record::Rack(Rack {
            name: name.into(),
            meta: Meta::default(),
            ..Default::default()
        })
    }

    #[test]
    fn events_are_scoped_to_the_rack() {
        let put = |rec: Record, old_rack: Option<&str>| Change {
            kind: rec.kind(),
            name: rec.name().to_string(),
            op: ChangeOp::Put,
            record: Some(rec),
            old_rack: old_rack.map(str::to_string),
        };
        assert!(event_for(&put(rack_rec("r1"), None), "r1", 5).is_some());
        assert!(event_for(&put(rack_rec("r2"), None), "r1", 5).is_none());
        let del = |kind: Kind, name: &str, old_rack: Option<&str>| Change {
            kind,
            name: name.into(),
            op: ChangeOp::Delete,
            record: None,
            old_rack: old_rack.map(str::to_string),
        };
        let ev = event_for(&del(Kind::Host, "h1", Some("r1")), "r1", 7).unwrap();
        assert_eq!((ev.r#type, ev.revision), (pb::EventType::Delete as i32, 7));
        assert!(event_for(&del(Kind::Host, "h1", Some("r2")), "r1", 7).is_none());
        assert!(
            event_for(&del(Kind::Profile, "p", None), "r1", 7).is_some(),
            "profiles are global"
        );
        assert!(
            event_for(&del(Kind::Relay, "x", Some("r1")), "r1", 7).is_none(),
            "relay records are not boot state"
        );
    }
}
