//! Sync mode: follow the rack's state from the coordinators.
//!
//! Two loops run side by side until shutdown:
//!
//! - **watch**: `RelayService/Watch` from the revision held; a snapshot
//!   replaces the rack copy, events change one record each, progress moves the
//!   resume point. Messages that arrive together are applied as one group:
//!   one sled batch ([`RackStore::commit`]), then one new [`RackState`]
//!   swapped in. Events that stream fast are coalesced for up to
//!   [`COALESCE`]; a snapshot is applied at once. Flushes are bounded too
//!   (every [`FLUSH_EVERY`] or [`FLUSH_AFTER`] groups). When the stream fails
//!   or ends the next endpoint is tried, round-robin, with back-off
//!   100 ms → 5 s; the persisted revision is the resume point.
//! - **heartbeat**: `RelayService/Heartbeat` every interval (the coordinator
//!   may ask for another one), reporting the durable revision. Failures are
//!   logged at most once per endpoint per minute and never stop anything.
//!
//! A third loop, [`ship_events`], started beside them, delivers the boot
//! event journal with `RelayService/ReportBootEvents`: oldest first, at most
//! [`SHIP_BATCH`] per report, within [`SHIP_COALESCE`] of a new event,
//! retried across endpoints with back-off (100 ms → [`SHIP_MAX_BACKOFF`])
//! while no coordinator takes them; the persisted `shipped` mark follows the
//! coordinators' `acked_sequence` (see `events` for the exactly-once
//! contract).
//!
//! Serving never waits on any of them: DHCP/TFTP/HTTP read the `SharedState`
//! and append to the journal.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use pxemesh_certs::Tls;
use pxemesh_coordinator::api::convert;
use pxemesh_coordinator::client::{channel, channel_lazy, error_chain};
use pxemesh_coordinator::model::{Kind, Meta, Record};
use pxemesh_proto::v1 as pb;
use pxemesh_proto::v1::relay_service_client::RelayServiceClient;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::Streaming;
use tracing::{debug, error, info, warn};

use crate::events::{BootEvent, EventLog};
use crate::metrics::RelayMetrics;
use crate::state::SharedState;
use crate::store::RackStore;

/// Window in which fast-streaming events are applied together.
pub const COALESCE: Duration = Duration::from_millis(20);
/// Most messages applied in one group.
pub const MAX_GROUP: usize = 4096;
/// Longest time a committed group waits for its flush.
pub const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// Committed groups after which a flush is done at once.
pub const FLUSH_AFTER: usize = 64;
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Time allowed for the Watch call to answer (the stream then lives on;
/// HTTP/2 keepalive detects a dead peer).
const WATCH_OPEN_TIMEOUT: Duration = Duration::from_secs(10);
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(10);
/// A rack snapshot is one message; racks with many hosts exceed tonic's 4 MiB default.
pub const MAX_MESSAGE: usize = 256 * 1024 * 1024;
/// One warning per endpoint per this period (the rest go to debug).
const LOG_EVERY: Duration = Duration::from_secs(60);

pub struct SyncContext {
    /// Coordinator endpoints (`host:port`), tried round-robin.
    pub endpoints: Vec<String>,
    pub tls: Arc<Tls>,
    /// The persisted rack copy (its rack is the one of the certificate).
    pub store: RackStore,
    /// What DHCP/TFTP/HTTP serve; replaced after every applied group.
    pub state: SharedState,
    pub metrics: Arc<RelayMetrics>,
    pub heartbeat_interval: Duration,
}

/// Runs the watch and heartbeat loops until `shutdown`; flushes the rack copy
/// before returning.
pub async fn run(ctx: SyncContext, shutdown: CancellationToken) {
    let SyncContext {
        endpoints,
        tls,
        mut store,
        state,
        metrics,
        heartbeat_interval,
    } = ctx;
    if endpoints.is_empty() {
        error!("sync: no coordinator endpoints configured");
        return;
    }
    let durable = store.durable_revision();
    let hb = heartbeat_loop(
        &endpoints,
        &tls,
        durable,
        &metrics,
        heartbeat_interval,
        &shutdown,
    );
    let watch = watch_loop(&endpoints, &tls, &mut store, &state, &metrics, &shutdown);
    tokio::join!(hb, watch);
    if let Err(e) = store.flush().await {
        error!(error = %e, "cannot flush the rack state at shutdown");
    }
}

/// What one watch message did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Everything replaced at `revision`.
    Snapshot { revision: u64, hosts: usize },
    /// One record put or deleted.
    Event { revision: u64 },
    /// Resume point moved.
    Progress { revision: u64 },
    /// Not newer than what is held (a replay after a reconnect): ignored.
    Stale { revision: u64 },
}

impl Applied {
    fn changed_records(&self) -> bool {
        matches!(self, Applied::Snapshot { .. } | Applied::Event { .. })
    }
}

/// Converts a watched object to the coordinator's record type; `None` for
/// kinds a relay does not hold (jobs, relay records).
pub fn record_from_proto(obj: &pb::Object) -> Result<Option<Record>, String> {
    use pb::object::Record as O;
    let e = |e: pxemesh_coordinator::error::CoordError| e.to_string();
    let (mut rec, create_revision, revision) = match obj.record.as_ref() {
        None => return Err("object without a record".into()),
        Some(O::Rack(x)) => (
            Record::Rack(convert::rack_from_proto(x).map_err(e)?),
            x.create_revision,
            x.revision,
        ),
        Some(O::Network(x)) => (
            Record::Network(convert::network_from_proto(x).map_err(e)?),
            x.create_revision,
            x.revision,
        ),
        // The password never travels on the watch (`password_set` only).
        Some(O::Host(x)) => (
            Record::Host(convert::host_from_proto(x).map_err(e)?.0),
            x.create_revision,
            x.revision,
        ),
        Some(O::Profile(x)) => (
            Record::Profile(convert::profile_from_proto(x).map_err(e)?),
            x.create_revision,
            x.revision,
        ),
        Some(O::Image(x)) => (
            Record::Image(convert::image_from_proto(x).map_err(e)?),
            x.create_revision,
            x.revision,
        ),
        Some(O::Job(_)) | Some(O::Relay(_)) => return Ok(None),
    };
    *rec.meta_mut() = Meta {
        create_revision,
        revision,
    };
    Ok(Some(rec))
}

/// Applies one watch message to the store (in memory; `commit` persists).
/// An error is a message that breaks the contract: the caller re-opens the
/// watch. Single malformed records are logged and skipped instead.
pub fn apply(store: &mut RackStore, msg: pb::WatchResponse) -> Result<Applied, String> {
    use pb::watch_response::Message as M;
    match msg.message {
        None => Err("empty watch message".into()),
        Some(M::Snapshot(snap)) => {
            let mut records = Vec::with_capacity(snap.objects.len());
            for obj in &snap.objects {
                match record_from_proto(obj) {
                    Ok(Some(r)) => records.push(r),
                    Ok(None) => {}
                    Err(e) => error!(revision = snap.revision, error = %e,
                        "snapshot holds a record this relay cannot read; leaving it out"),
                }
            }
            if snap.revision < store.revision() {
                warn!(
                    held = store.revision(),
                    snapshot = snap.revision,
                    "snapshot is older than the state held; replacing it anyway"
                );
            }
            let foreign = store.snapshot(snap.revision, records);
            if foreign > 0 {
                warn!(
                    foreign,
                    "snapshot held records of other racks; left them out"
                );
            }
            Ok(Applied::Snapshot {
                revision: snap.revision,
                hosts: store.count(Kind::Host),
            })
        }
        Some(M::Event(ev)) => {
            let revision = ev.revision;
            if !store.synced() {
                return Err(format!("event at revision {revision} before any snapshot"));
            }
            let applied = match pb::EventType::try_from(ev.r#type) {
                Ok(pb::EventType::Put) => {
                    let Some(obj) = ev.object.as_ref() else {
                        return Err(format!(
                            "PUT event at revision {revision} without an object"
                        ));
                    };
                    match record_from_proto(obj) {
                        Ok(Some(rec)) => store.put(revision, rec),
                        Ok(None) => store.skip(revision),
                        Err(e) => {
                            error!(revision, kind = ev.kind, name = %ev.name, error = %e,
                                "watch event holds a record this relay cannot read; keeping the previous version");
                            store.skip(revision)
                        }
                    }
                }
                Ok(pb::EventType::Delete) => match convert::kind_from_proto(ev.kind) {
                    Ok(kind) => store.delete(revision, kind, &ev.name),
                    Err(e) => return Err(format!("DELETE event at revision {revision}: {e}")),
                },
                _ => {
                    return Err(format!(
                        "event at revision {revision} has unknown type {}",
                        ev.r#type
                    ))
                }
            };
            Ok(if applied {
                Applied::Event { revision }
            } else {
                Applied::Stale { revision }
            })
        }
        Some(M::Progress(p)) => Ok(if store.progress(p.revision) {
            Applied::Progress {
                revision: p.revision,
            }
        } else {
            Applied::Stale {
                revision: p.revision,
            }
        }),
    }
}

/// Publishes the store's records as the served state, unless they do not
/// validate (then the previous state keeps being served).
pub fn publish(store: &RackStore, state: &SharedState) -> bool {
    match store.build() {
        Ok(s) => {
            state.store(Arc::new(s));
            true
        }
        Err(e) => {
            error!(
                rack = %store.rack(),
                revision = store.revision(),
                serving = state.load().revision,
                error = %e,
                "RACK STATE FROM THE COORDINATORS IS INCONSISTENT; still serving the previous state"
            );
            false
        }
    }
}

/// At most one warning per key per [`LOG_EVERY`].
#[derive(Default)]
struct LogLimiter(HashMap<String, Instant>);

impl LogLimiter {
    fn allow(&mut self, key: &str) -> bool {
        let now = Instant::now();
        match self.0.get(key) {
            Some(t) if now.duration_since(*t) < LOG_EVERY => false,
            _ => {
                self.0.insert(key.to_string(), now);
                true
            }
        }
    }
}

/// Why a watch could not be opened.
enum OpenError {
    /// No connection (TCP, TLS or HTTP/2).
    Unreachable(String),
    /// Connected, but the Watch call failed.
    Refused(tonic::Code, String),
}

async fn open_watch(
    endpoint: &str,
    tls: &Arc<Tls>,
    rack: &str,
    from_revision: u64,
) -> Result<Streaming<pb::WatchResponse>, OpenError> {
    let ch = channel(endpoint, tls.clone())
        .await
        .map_err(|e| OpenError::Unreachable(error_chain(&e)))?;
    let mut client = RelayServiceClient::new(ch).max_decoding_message_size(MAX_MESSAGE);
    match tokio::time::timeout(
        WATCH_OPEN_TIMEOUT,
        // The coordinator takes the rack from the certificate; naming it too
        // (it is the certificate's) lets a mismatch be refused loudly.
        client.watch(pb::WatchRequest {
            from_revision,
            rack: rack.to_string(),
        }),
    )
    .await
    {
        Err(_) => Err(OpenError::Unreachable(format!(
            "no answer to Watch within {WATCH_OPEN_TIMEOUT:?}"
        ))),
        Ok(Err(s)) => Err(OpenError::Refused(s.code(), status_text(&s))),
        Ok(Ok(r)) => Ok(r.into_inner()),
    }
}

fn status_text(s: &tonic::Status) -> String {
    let mut out = format!("{:?}: {}", s.code(), s.message());
    if let Some(src) = std::error::Error::source(s) {
        out.push_str(": ");
        out.push_str(&error_chain(src));
    }
    out
}

async fn watch_loop(
    endpoints: &[String],
    tls: &Arc<Tls>,
    store: &mut RackStore,
    state: &SharedState,
    metrics: &RelayMetrics,
    shutdown: &CancellationToken,
) {
    let rack = store.rack().to_string();
    let mut idx = 0usize;
    let mut backoff = MIN_BACKOFF;
    let mut limiter = LogLimiter::default();
    metrics.sync_revision.set(store.revision() as i64);
    loop {
        let endpoint = &endpoints[idx];
        let next = &endpoints[(idx + 1) % endpoints.len()];
        let from = store.revision();
        let opened = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = open_watch(endpoint, tls, &rack, from) => r,
        };
        match opened {
            Ok(mut stream) => {
                info!("watching rack {rack} on {endpoint} from revision {from}");
                let (delivered, reason) =
                    follow(&mut stream, store, state, metrics, shutdown).await;
                if shutdown.is_cancelled() {
                    return;
                }
                if delivered {
                    backoff = MIN_BACKOFF;
                }
                warn!("watch of rack {rack} on {endpoint} ended: {reason}; trying {next}");
            }
            Err(OpenError::Unreachable(e)) => {
                if limiter.allow(endpoint) {
                    warn!("coordinator {endpoint} unreachable: {e}; trying {next}");
                } else {
                    debug!("coordinator {endpoint} unreachable: {e}; trying {next}");
                }
            }
            Err(OpenError::Refused(code, e)) => {
                let allowed = limiter.allow(endpoint);
                if matches!(
                    code,
                    tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
                ) && allowed
                {
                    error!("coordinator {endpoint} refused this relay's watch of rack {rack} (check its certificate): {e}; trying {next}");
                } else if allowed {
                    warn!("coordinator {endpoint} refused the watch: {e}; trying {next}");
                } else {
                    debug!("coordinator {endpoint} refused the watch: {e}; trying {next}");
                }
            }
        }
        metrics.sync_reconnects.inc();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
        idx = (idx + 1) % endpoints.len();
    }
}

/// Bounded flushing: at most every [`FLUSH_EVERY`], at once after
/// [`FLUSH_AFTER`] groups or a snapshot.
struct Flusher {
    last: Instant,
}

impl Flusher {
    /// Flushes now if due, else returns when it will be.
    async fn after_commit(&mut self, store: &mut RackStore, force: bool) -> Option<Instant> {
        if store.unflushed() == 0 {
            return None;
        }
        let due = self.last + FLUSH_EVERY;
        if force || store.unflushed() >= FLUSH_AFTER || Instant::now() >= due {
            self.flush(store).await;
            None
        } else {
            Some(due)
        }
    }

    async fn flush(&mut self, store: &mut RackStore) {
        if let Err(e) = store.flush().await {
            error!(error = %e, "cannot flush the rack state");
        }
        self.last = Instant::now();
    }
}

/// Follows one watch stream until it ends, fails or `shutdown`. Returns
/// whether it delivered anything, and why it ended.
async fn follow(
    stream: &mut Streaming<pb::WatchResponse>,
    store: &mut RackStore,
    state: &SharedState,
    metrics: &RelayMetrics,
    shutdown: &CancellationToken,
) -> (bool, String) {
    let mut delivered = false;
    let mut flusher = Flusher {
        last: Instant::now(),
    };
    let mut flush_at: Option<Instant> = None;
    let mut last_publish = Instant::now() - COALESCE;
    let end = loop {
        let first = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break "shutdown".to_string(),
            _ = sleep_until_opt(flush_at) => {
                flusher.flush(store).await;
                flush_at = None;
                continue;
            }
            m = stream.message() => m,
        };
        let mut group = Group::default();
        let mut ended = None;
        match first {
            Ok(Some(m)) => {
                delivered = true;
                if let Err(e) = group.apply(store, m, metrics) {
                    ended = Some(e);
                }
            }
            Ok(None) => break "stream closed by the coordinator".to_string(),
            Err(s) => break status_text(&s),
        }
        // Coalesce what streams in right behind, unless a snapshot waits to
        // be served.
        if ended.is_none() && !group.snapshot {
            let deadline = (last_publish + COALESCE).max(Instant::now());
            while group.messages < MAX_GROUP {
                let m = tokio::select! {
                    biased;
                    m = stream.message() => m,
                    _ = tokio::time::sleep_until(deadline) => break,
                };
                match m {
                    Ok(Some(m)) => {
                        if let Err(e) = group.apply(store, m, metrics) {
                            ended = Some(e);
                            break;
                        }
                        if group.snapshot {
                            break;
                        }
                    }
                    Ok(None) => {
                        ended = Some("stream closed by the coordinator".into());
                        break;
                    }
                    Err(s) => {
                        ended = Some(status_text(&s));
                        break;
                    }
                }
            }
        }
        if let Err(e) = store.commit() {
            flusher.flush(store).await;
            break format!("cannot persist the rack state: {e}");
        }
        metrics.sync_revision.set(store.revision() as i64);
        if group.changed {
            publish(store, state);
            last_publish = Instant::now();
        }
        if let Some((revision, hosts)) = group.snapshot_at {
            info!(
                "applied snapshot at revision {revision} ({hosts} hosts) for rack {}",
                store.rack()
            );
        }
        flush_at = flusher.after_commit(store, group.snapshot).await;
        if let Some(e) = ended {
            break e;
        }
    };
    flusher.flush(store).await;
    (delivered, end)
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Messages applied together.
#[derive(Default)]
struct Group {
    messages: usize,
    changed: bool,
    snapshot: bool,
    snapshot_at: Option<(u64, usize)>,
}

impl Group {
    fn apply(
        &mut self,
        store: &mut RackStore,
        m: pb::WatchResponse,
        metrics: &RelayMetrics,
    ) -> Result<(), String> {
        self.messages += 1;
        let applied = apply(store, m)?;
        self.changed |= applied.changed_records();
        match applied {
            Applied::Snapshot { revision, hosts } => {
                metrics.sync_snapshots.inc();
                self.snapshot = true;
                self.snapshot_at = Some((revision, hosts));
            }
            Applied::Event { revision } => {
                metrics.sync_events.inc();
                debug!(revision, "applied watch event");
            }
            Applied::Progress { .. } => {}
            Applied::Stale { revision } => {
                debug!(
                    revision,
                    held = store.revision(),
                    "ignored a watch message not newer than the state held"
                );
            }
        }
        Ok(())
    }
}

/// Counters sent with each heartbeat.
fn counters(metrics: &RelayMetrics) -> HashMap<String, u64> {
    [
        ("tftp_sent_bytes", metrics.tftp_bytes.get()),
        ("tftp_retransmits", metrics.tftp_retransmits.get()),
        ("http_sent_bytes", metrics.http_bytes.get()),
        ("sync_snapshots", metrics.sync_snapshots.get()),
        ("sync_events", metrics.sync_events.get()),
        ("sync_reconnects", metrics.sync_reconnects.get()),
        ("boot_events_shipped", metrics.boot_events_shipped.get()),
        (
            "boot_events_pending",
            u64::try_from(metrics.boot_events_pending.get()).unwrap_or(0),
        ),
        ("boot_events_dropped", metrics.boot_events_dropped.get()),
        ("cache_hits", metrics.cache.hits.get()),
        ("cache_misses", metrics.cache.misses.get()),
        ("cache_evictions", metrics.cache.evictions.get()),
        (
            "cache_upstream_fetches",
            metrics.cache.upstream_fetches.get(),
        ),
        ("cache_corrupt", metrics.cache.corrupt.get()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

async fn heartbeat_loop(
    endpoints: &[String],
    tls: &Arc<Tls>,
    durable: Arc<std::sync::atomic::AtomicU64>,
    metrics: &RelayMetrics,
    mut interval: Duration,
    shutdown: &CancellationToken,
) {
    let started = Instant::now();
    let mut idx = 0usize;
    let mut client: Option<RelayServiceClient<Channel>> = None;
    let mut limiter = LogLimiter::default();
    loop {
        let endpoint = &endpoints[idx];
        let next = &endpoints[(idx + 1) % endpoints.len()];
        if client.is_none() {
            match channel_lazy(endpoint, tls.clone()) {
                Ok(ch) => client = Some(RelayServiceClient::new(ch)),
                Err(e) => {
                    if limiter.allow(endpoint) {
                        warn!("heartbeat to {endpoint} impossible: {e}; next heartbeat goes to {next}");
                    }
                }
            }
        }
        if let Some(c) = client.as_mut() {
            let req = pb::HeartbeatRequest {
                version: env!("CARGO_PKG_VERSION").to_string(),
                uptime_seconds: started.elapsed().as_secs(),
                cache_bytes: u64::try_from(metrics.cache.bytes.get()).unwrap_or(0),
                counters: counters(metrics),
                applied_revision: durable.load(Ordering::Acquire),
            };
            let res = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = tokio::time::timeout(HEARTBEAT_TIMEOUT, c.heartbeat(req)) => r,
            };
            match res {
                Ok(Ok(resp)) => {
                    let resp = resp.into_inner();
                    debug!(
                        endpoint,
                        cluster_revision = resp.revision,
                        applied = durable.load(Ordering::Acquire),
                        "heartbeat"
                    );
                    if resp.interval_seconds > 0 {
                        let asked = Duration::from_secs(u64::from(resp.interval_seconds).min(3600));
                        if asked != interval {
                            info!(
                                seconds = asked.as_secs(),
                                "heartbeat interval set by the coordinator"
                            );
                            interval = asked;
                        }
                    }
                }
                Ok(Err(s)) => {
                    metrics.sync_heartbeat_failures.inc();
                    if limiter.allow(endpoint) {
                        warn!(
                            "heartbeat to {endpoint} failed: {}; next heartbeat goes to {next}",
                            status_text(&s)
                        );
                    }
                    client = None;
                    idx = (idx + 1) % endpoints.len();
                }
                Err(_) => {
                    metrics.sync_heartbeat_failures.inc();
                    if limiter.allow(endpoint) {
                        warn!("heartbeat to {endpoint} timed out; next heartbeat goes to {next}");
                    }
                    client = None;
                    idx = (idx + 1) % endpoints.len();
                }
            }
        } else {
            idx = (idx + 1) % endpoints.len();
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// Most boot events in one report (the coordinators take up to 1000).
pub const SHIP_BATCH: usize = 500;
/// After a new event, wait this long for the rest of its burst (one DHCP
/// exchange records an offer and an ack), then report.
pub const SHIP_COALESCE: Duration = Duration::from_millis(50);
/// Longest pause between delivery attempts while no coordinator takes the
/// events (attempts on a dead endpoint are cheap: the connection is refused).
pub const SHIP_MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Look at the journal this often even without a new event (safety net).
const SHIP_IDLE: Duration = Duration::from_secs(5);
const REPORT_TIMEOUT: Duration = Duration::from_secs(10);

pub struct ShipContext {
    /// Coordinator endpoints (`host:port`), tried round-robin.
    pub endpoints: Vec<String>,
    pub tls: Arc<Tls>,
    pub events: Arc<EventLog>,
    pub metrics: Arc<RelayMetrics>,
}

/// A journal event as reported. A MAC the coordinators would not parse
/// (never recorded today) goes as "-", the unknown host.
pub fn event_to_proto(e: &BootEvent) -> pb::BootEvent {
    let host_mac = match e.mac.parse::<pxemesh_coordinator::model::Mac>() {
        Ok(m) => m.to_string(),
        Err(_) => "-".to_string(),
    };
    pb::BootEvent {
        host_mac,
        kind: e.kind.as_str().to_string(),
        detail: e.detail.clone(),
        unix_ms: e.unix_ms,
        sequence: e.sequence,
    }
}

/// What one report did.
enum Report {
    /// The coordinators hold everything up to this sequence.
    Acked(u64),
    /// The report was refused as invalid.
    Invalid(String),
    /// Not delivered (no connection, timeout, unavailable, ...).
    Failed(String),
}

async fn report(
    client: &mut RelayServiceClient<Channel>,
    batch: &[BootEvent],
    shutdown: &CancellationToken,
) -> Option<Report> {
    let req = pb::ReportBootEventsRequest {
        events: batch.iter().map(event_to_proto).collect(),
    };
    let res = tokio::select! {
        _ = shutdown.cancelled() => return None,
        r = tokio::time::timeout(REPORT_TIMEOUT, client.report_boot_events(req)) => r,
    };
    Some(match res {
        Ok(Ok(resp)) => Report::Acked(resp.into_inner().acked_sequence),
        Ok(Err(s)) if s.code() == tonic::Code::InvalidArgument => Report::Invalid(status_text(&s)),
        Ok(Err(s)) => Report::Failed(status_text(&s)),
        Err(_) => Report::Failed(format!("no answer within {REPORT_TIMEOUT:?}")),
    })
}

/// Ships the boot event journal to the coordinators until `shutdown`
/// (sync mode). Events stay in the journal until acknowledged; a report
/// repeated after a crash or a lost answer is harmless (the coordinators
/// drop sequences they hold).
pub async fn ship_events(ctx: ShipContext, shutdown: CancellationToken) {
    let ShipContext {
        endpoints,
        tls,
        events,
        metrics,
    } = ctx;
    if endpoints.is_empty() {
        return;
    }
    events.start_shipping();
    let mut idx = 0usize;
    let mut client: Option<RelayServiceClient<Channel>> = None;
    let mut backoff = MIN_BACKOFF;
    let mut limiter = LogLimiter::default();
    let mut failing_since: Option<Instant> = None;
    // After a refused report: send one event at a time up to this sequence
    // to find the event refused.
    let mut one_by_one = 0u64;
    loop {
        let shipped = events.shipped();
        let limit = if one_by_one > shipped { 1 } else { SHIP_BATCH };
        let batch = events.since(shipped, limit);
        let (Some(first), Some(top)) = (batch.first(), batch.last()) else {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = events.recorded() => {}
                _ = tokio::time::sleep(SHIP_IDLE) => {}
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(SHIP_COALESCE) => {}
            }
            continue;
        };
        let (first, top) = (first.sequence, top.sequence);
        let endpoint = &endpoints[idx];
        let next = &endpoints[(idx + 1) % endpoints.len()];
        // Nothing leaves the relay before it is on its disk: a sequence the
        // coordinators acknowledge is never issued again after a crash.
        let outcome = match events.flush().await {
            Err(e) => Report::Failed(format!("cannot flush the journal first: {e}")),
            Ok(()) => {
                if client.is_none() {
                    match channel_lazy(endpoint, tls.clone()) {
                        Ok(ch) => client = Some(RelayServiceClient::new(ch)),
                        Err(e) => {
                            if limiter.allow(endpoint) {
                                warn!("boot events to {endpoint} impossible: {e}; trying {next}");
                            }
                        }
                    }
                }
                match client.as_mut() {
                    None => Report::Failed("no channel".into()),
                    Some(c) => match report(c, &batch, &shutdown).await {
                        None => return,
                        Some(r) => r,
                    },
                }
            }
        };
        match outcome {
            Report::Acked(acked) if acked > events.last_sequence() => {
                let issued = events.last_sequence();
                // The coordinators hold numbers this journal never issued:
                // it was reset under the same relay name. They would drop
                // its events as duplicates; renumber them past their mark.
                match events.renumber_above(acked) {
                    Ok(moved) => warn!(
                        acked,
                        issued,
                        moved,
                        "the coordinators acknowledged boot events up to sequence {acked} but this relay's journal only reached {issued} (was its data directory replaced?); renumbered {moved} unacknowledged events after {acked}"
                    ),
                    Err(e) => {
                        error!(error = %e, "cannot renumber the boot event journal");
                        pause(&mut backoff, &shutdown).await;
                    }
                }
            }
            Report::Acked(acked) if acked >= first => {
                backoff = MIN_BACKOFF;
                let newly = batch
                    .iter()
                    .filter(|e| e.sequence > shipped && e.sequence <= acked)
                    .count();
                if let Err(e) = events.mark_shipped(acked).await {
                    // The next report repeats these; the coordinators drop them.
                    error!(error = %e, "cannot persist the shipped boot event mark");
                }
                metrics.boot_events_shipped.inc_by(newly as u64);
                if let Some(since) = failing_since.take() {
                    info!(
                        "boot events delivered to {endpoint} again after {:.1} s; {} still waiting",
                        since.elapsed().as_secs_f64(),
                        events.pending()
                    );
                }
                debug!(endpoint, first, top, acked, "boot events acknowledged");
            }
            Report::Acked(acked) => {
                let e =
                    format!("acknowledged sequence {acked}, below the report's {first}..={top}");
                failed(
                    &mut limiter,
                    endpoint,
                    next,
                    &e,
                    events.pending(),
                    &mut failing_since,
                );
                client = None;
                idx = (idx + 1) % endpoints.len();
                pause(&mut backoff, &shutdown).await;
            }
            Report::Invalid(e) if batch.len() > 1 => {
                warn!("coordinator {endpoint} refused boot events {first}..={top}: {e}; resending them one at a time");
                one_by_one = top;
            }
            Report::Invalid(e) => {
                let ev = &batch[0];
                error!(
                    sequence = first,
                    mac = %ev.mac,
                    kind = ev.kind.as_str(),
                    "coordinator {endpoint} refused boot event {first}: {e}; dropping it"
                );
                metrics.boot_events_dropped.inc();
                if let Err(e) = events.mark_shipped(first).await {
                    error!(error = %e, "cannot persist the shipped boot event mark");
                    pause(&mut backoff, &shutdown).await;
                }
            }
            Report::Failed(e) => {
                failed(
                    &mut limiter,
                    endpoint,
                    next,
                    &e,
                    events.pending(),
                    &mut failing_since,
                );
                client = None;
                idx = (idx + 1) % endpoints.len();
                pause(&mut backoff, &shutdown).await;
            }
        }
    }
}

fn failed(
    limiter: &mut LogLimiter,
    endpoint: &str,
    next: &str,
    e: &str,
    waiting: u64,
    failing_since: &mut Option<Instant>,
) {
    failing_since.get_or_insert_with(Instant::now);
    if limiter.allow(endpoint) {
        warn!("cannot deliver boot events to {endpoint}: {e}; {waiting} wait in the journal; trying {next}");
    } else {
        debug!("cannot deliver boot events to {endpoint}: {e}; trying {next}");
    }
}

/// Sleeps for `backoff` (unless shutting down) and doubles it, up to
/// [`SHIP_MAX_BACKOFF`].
async fn pause(backoff: &mut Duration, shutdown: &CancellationToken) {
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(*backoff) => {}
    }
    *backoff = (*backoff * 2).min(SHIP_MAX_BACKOFF);
}

#[cfg(test)]
mod tests {
    use super::*;
    use pxemesh_coordinator::api::convert::record_to_proto;
    use pxemesh_coordinator::model::{Host, Network};

    fn net(name: &str, rack: &str, subnet: &str) -> Record {
        Record::Network(Network {
            name: name.into(),
            rack: rack.into(),
            subnet: subnet.parse().unwrap(),
            gateway: None,
            dns: vec![],
            domain: String::new(),
            mtu: 1500,
            vlan: None,
            pool: None,
            lease_seconds: 3600,
            interface: String::new(),
            meta: Meta::default(),
        })
    }

    fn host(name: &str, rack: &str, mac: &str, ip: &str) -> Record {
        Record::Host(Host {
            name: name.into(),
            mac: mac.parse().unwrap(),
            ip: Some(ip.parse().unwrap()),
            hostname: String::new(),
            rack: rack.into(),
            network: "n1".into(),
            profile: None,
            labels: Default::default(),
            bmc: None,
            meta: Meta {
                create_revision: 3,
                revision: 4,
            },
        })
    }

    fn snapshot(revision: u64, recs: &[Record]) -> pb::WatchResponse {
        pb::WatchResponse {
            message: Some(pb::watch_response::Message::Snapshot(pb::RackSnapshot {
                revision,
                objects: recs.iter().map(record_to_proto).collect(),
            })),
        }
    }

    fn put(revision: u64, rec: &Record) -> pb::WatchResponse {
        pb::WatchResponse {
            message: Some(pb::watch_response::Message::Event(pb::WatchEvent {
                r#type: pb::EventType::Put as i32,
                kind: convert::kind_to_proto(rec.kind()) as i32,
                name: rec.name().to_string(),
                object: Some(record_to_proto(rec)),
                revision,
            })),
        }
    }

    fn del(revision: u64, kind: Kind, name: &str) -> pb::WatchResponse {
        pb::WatchResponse {
            message: Some(pb::watch_response::Message::Event(pb::WatchEvent {
                r#type: pb::EventType::Delete as i32,
                kind: convert::kind_to_proto(kind) as i32,
                name: name.into(),
                object: None,
                revision,
            })),
        }
    }

    fn progress(revision: u64) -> pb::WatchResponse {
        pb::WatchResponse {
            message: Some(pb::watch_response::Message::Progress(pb::WatchProgress {
                revision,
            })),
        }
    }

    fn hosts(state: &SharedState) -> Vec<String> {
        let mut v: Vec<String> = state
            .load()
            .hosts()
            .iter()
            .map(|h| h.name.clone())
            .collect();
        v.sort();
        v
    }

    #[tokio::test]
    async fn apply_messages_and_publish() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::durable::test_db(dir.path());
        let mut store = RackStore::open(&db, "r1").unwrap();
        let (s, _) = store.load();
        let state = crate::state::shared(s);

        // An event before any snapshot breaks the contract.
        let h1 = host("h1", "r1", "52:54:00:00:00:01", "10.0.0.11");
        assert!(apply(&mut store, put(3, &h1)).is_err());

        let snap = snapshot(
            10,
            &[
                net("n1", "r1", "10.0.0.0/24"),
                h1.clone(),
                host("h2", "r1", "52:54:00:00:00:02", "10.0.0.12"),
            ],
        );
        assert_eq!(
            apply(&mut store, snap).unwrap(),
            Applied::Snapshot {
                revision: 10,
                hosts: 2
            }
        );
        store.commit().unwrap();
        assert!(publish(&store, &state));
        assert_eq!(hosts(&state), vec!["h1", "h2"]);
        assert_eq!(state.load().revision, 10);
        // Revisions stamped by the coordinator survive the round trip.
        let mac = "52:54:00:00:00:01".parse().unwrap();
        assert_eq!(state.load().host_by_mac(&mac).unwrap().meta.revision, 4);

        let h3 = host("h3", "r1", "52:54:00:00:00:03", "10.0.0.13");
        let moved = host("h2", "r2", "52:54:00:00:00:02", "10.0.0.12");
        let msgs = [
            put(11, &h3),
            del(12, Kind::Host, "h1"),
            // A record of another rack: never held (and any copy removed).
            put(13, &moved),
            put(14, &host("x9", "r2", "52:54:00:00:00:09", "10.9.0.9")),
            // Replayed after a reconnect: ignored.
            put(11, &h3),
            // One command putting two hosts: two events, one revision.
            put(15, &host("h4", "r1", "52:54:00:00:00:04", "10.0.0.14")),
            put(15, &host("h5", "r1", "52:54:00:00:00:05", "10.0.0.15")),
            progress(20),
            progress(18),
        ];
        let got: Vec<Applied> = msgs
            .into_iter()
            .map(|m| apply(&mut store, m).unwrap())
            .collect();
        assert_eq!(
            got,
            vec![
                Applied::Event { revision: 11 },
                Applied::Event { revision: 12 },
                Applied::Event { revision: 13 },
                Applied::Event { revision: 14 },
                Applied::Stale { revision: 11 },
                Applied::Event { revision: 15 },
                Applied::Event { revision: 15 },
                Applied::Progress { revision: 20 },
                Applied::Stale { revision: 18 },
            ]
        );
        store.commit().unwrap();
        assert!(publish(&store, &state));
        assert_eq!(hosts(&state), vec!["h3", "h4", "h5"]);
        assert_eq!(store.revision(), 20);

        // A change the relay cannot serve (overlapping networks) keeps the
        // previous state served, though it is recorded.
        apply(&mut store, put(21, &net("n2", "r1", "10.0.0.0/16"))).unwrap();
        store.commit().unwrap();
        assert!(!publish(&store, &state));
        assert_eq!(state.load().revision, 20);
        assert_eq!(hosts(&state), vec!["h3", "h4", "h5"]);

        // Contract violations.
        assert!(apply(&mut store, pb::WatchResponse { message: None }).is_err());
        let mut bad = del(30, Kind::Host, "h3");
        if let Some(pb::watch_response::Message::Event(e)) = bad.message.as_mut() {
            e.r#type = 0;
        }
        assert!(apply(&mut store, bad).is_err());

        // A new snapshot replaces everything.
        apply(&mut store, snapshot(40, &[net("n1", "r1", "10.0.0.0/24")])).unwrap();
        store.commit().unwrap();
        store.flush().await.unwrap();
        assert!(publish(&store, &state));
        assert!(hosts(&state).is_empty());
        assert_eq!(store.durable_revision().load(Ordering::Acquire), 40);
    }

    /// The resume point only passes revision R once something after R
    /// arrives, whatever the events at R carry: a stream cut in the middle of
    /// R's events must resume from R - 1 and get all of them again.
    #[tokio::test]
    async fn resume_point_waits_for_a_revision_to_complete() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::durable::test_db(dir.path());
        let mut store = RackStore::open(&db, "r1").unwrap();
        apply(&mut store, snapshot(10, &[net("n1", "r1", "10.0.0.0/24")])).unwrap();
        let relay_put = |revision| pb::WatchResponse {
            message: Some(pb::watch_response::Message::Event(pb::WatchEvent {
                r#type: pb::EventType::Put as i32,
                kind: pb::Kind::Relay as i32,
                name: "x".into(),
                object: Some(pb::Object {
                    record: Some(pb::object::Record::Relay(pb::RelayRecord::default())),
                }),
                revision,
            })),
        };
        assert_eq!(
            apply(&mut store, relay_put(12)).unwrap(),
            Applied::Event { revision: 12 }
        );
        assert_eq!((store.revision(), store.applied()), (11, 12));
        let h1 = host("h1", "r1", "52:54:00:00:00:01", "10.0.0.11");
        assert_eq!(
            apply(&mut store, put(12, &h1)).unwrap(),
            Applied::Event { revision: 12 }
        );
        store.commit().unwrap();
        store.flush().await.unwrap();
        assert_eq!(store.durable_revision().load(Ordering::Acquire), 11);
        drop(store);
        // "Reconnect": R = 12 is replayed from 11 and applies again.
        let mut store = RackStore::open(&db, "r1").unwrap();
        assert_eq!(store.revision(), 11);
        assert_eq!(
            apply(&mut store, put(12, &h1)).unwrap(),
            Applied::Event { revision: 12 }
        );
        apply(&mut store, progress(12)).unwrap();
        assert_eq!(store.revision(), 12);
        assert_eq!(store.build().unwrap().hosts().len(), 1);
    }

    #[test]
    fn job_and_relay_records_are_not_held() {
        let obj = pb::Object {
            record: Some(pb::object::Record::Relay(pb::RelayRecord {
                name: "r".into(),
                rack: "r1".into(),
                ..Default::default()
            })),
        };
        assert_eq!(record_from_proto(&obj).unwrap(), None);
        assert!(record_from_proto(&pb::Object { record: None }).is_err());
    }

    #[test]
    fn log_limiter_is_per_key() {
        let mut l = LogLimiter::default();
        assert!(l.allow("a"));
        assert!(!l.allow("a"));
        assert!(l.allow("b"));
    }
}
