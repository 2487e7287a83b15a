//! The leader-run CloudStack sync loop.
//!
//! Every coordinator with a `[cloudstack]` section runs this task; only the
//! Raft leader acts. On becoming leader (a new term) it builds a client whose
//! User-Agent names the node and the term, and syncs on the configured
//! interval or on demand (`pxemeshctl cloudstack sync`):
//!
//! 0. a stint starts by committing its fencing epoch (`Command::ClaimEpoch`,
//!    writer `cloudstack`, epoch = the Raft term it leads in); every write
//!    of the stint is a `Command::Fenced` carrying that epoch, which the
//!    state machine refuses at apply time, on every node, once a newer stint
//!    claimed a higher epoch (`StateError::Fenced` → the stint stops);
//! 1. fence (cheap early-out): this node is leader in the term it started
//!    with, confirmed by a ReadIndex barrier (a quorum still follows it);
//! 2. `fetch` the listing, `plan` it against the replicated records;
//! 3. write racks, profiles, hosts (BMC password sealed with the cluster key,
//!    the stored ciphertext kept when the password is the same), deletes,
//!    each write preceded by the fence check;
//! 4. instances that entered `Starting` get `bootdev-pxe` and `power-status`
//!    jobs, then `power-on` (host off) or `power-cycle` (host on) once the
//!    status is known (idempotency keys `cs:<vm id>:start:<n>:...`, `n` a
//!    replicated per-host start counter);
//! 5. provision-done events of bridge hosts become `notifyBaremetalProvisionDone`
//!    calls, retried with back-off; the accepted event id is replicated in a
//!    host label so a new leader does not notify again. Before calling, the
//!    event id is committed as a "notify in flight" intent label: a stint
//!    that finds an intent without the done label (the previous leader died
//!    between CloudStack accepting and the label commit) first asks
//!    CloudStack for the instance's state and notifies only if it is still
//!    `Starting`. CloudStack's `BaremetalManagerImpl.notifyProvisionDone`
//!    is not idempotent: it moves a `Starting` instance to `Running` and
//!    fails (`CloudRuntimeException` "... is not in state of Starting",
//!    API error 530) for an instance in any other state, so a blind second
//!    notify would fail and be retried forever.
//!
//! Bookkeeping lives in host labels under `cloudstack.bridge.` (replicated,
//! carried over by `plan`). A failing sync backs off (1 s doubling, capped by
//! the interval) and logs once per state change, not per attempt.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::client::{Client, ClientMetrics, ClientSettings, CsError};
use super::config::CloudStackConfig;
use super::fetch::{fetch, notify_provision_done, vm_state as cs_vm_state};
use super::reconcile::{plan, Inputs, Mapping, BRIDGE_LABEL_PREFIX, LABEL_VM_ID, LABEL_VM_STATE};
use crate::crypto::ClusterKey;
use crate::error::{CoordError, StateError};
use crate::jobs::JobCommand;
use crate::model::{Host, Kind, Record};
use crate::node::NodeHandle;
use crate::state::{Command, Outcome};

/// How many times the instance entered `Starting` (bridge-owned label).
pub const LABEL_START_COUNT: &str = "cloudstack.bridge.start-count";
/// The start counter whose bootdev and power-status jobs were submitted.
pub const LABEL_START_JOBS: &str = "cloudstack.bridge.start-jobs";
/// `<start counter>:<job id>` of that start's power-status job.
pub const LABEL_STATUS_JOB: &str = "cloudstack.bridge.status-job";
/// The start counter whose power-on / power-cycle job was submitted.
pub const LABEL_START_POWER: &str = "cloudstack.bridge.start-power";
/// The id of the last provision-done event CloudStack accepted.
pub const LABEL_NOTIFIED_EVENT: &str = "cloudstack.bridge.notified-event";
/// The id of the provision-done event being notified (committed before the
/// call; equal to `LABEL_NOTIFIED_EVENT` once it is done).
pub const LABEL_NOTIFY_INTENT: &str = "cloudstack.bridge.notify-intent";
/// Failpoint between CloudStack accepting a notification and the done label
/// being committed (crash tests).
pub const FAILPOINT_AFTER_NOTIFY: &str = "cloudstack_after_notify_accepted";

/// The writer name of the bridge's fencing epoch (`Command::ClaimEpoch`).
pub const FENCE_WRITER: &str = "cloudstack";

const TICK: Duration = Duration::from_millis(250);
const BACKOFF_INITIAL: Duration = Duration::from_secs(1);
const NOTIFY_BACKOFF_MAX: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("this coordinator does not run the CloudStack bridge (leader: node {leader})")]
    NotActive { leader: u64 },
    #[error("the CloudStack bridge is not configured on this coordinator")]
    NotConfigured,
    #[error("the sync did not finish within {0:?}")]
    Timeout(Duration),
    #[error("leadership moved (term {0} ended); the new leader runs the bridge")]
    Fenced(u64),
    #[error(transparent)]
    CloudStack(#[from] CsError),
    #[error(transparent)]
    Coord(#[from] CoordError),
    #[error("CloudStack bridge configuration: {0}")]
    Config(String),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

/// Metrics of the bridge, registered by `Metrics::new`.
#[derive(Default, Clone)]
pub struct BridgeMetrics {
    pub syncs: Family<OutcomeLabels, Counter>,
    pub sync_ms_total: Counter,
    pub last_sync_ms: Gauge,
    pub objects_seen: Gauge,
    pub objects_changed: Counter,
    pub notifies: Family<OutcomeLabels, Counter>,
    pub jobs_submitted: Counter,
    pub up: Gauge,
    pub active: Gauge,
    pub client: ClientMetrics,
}

impl BridgeMetrics {
    pub fn register(&self, registry: &mut Registry) {
        self.client.register(registry);
        let sub = registry.sub_registry_with_prefix("cloudstack_bridge");
        sub.register(
            "syncs",
            "CloudStack syncs by outcome (ok, error)",
            self.syncs.clone(),
        );
        sub.register(
            "sync_milliseconds",
            "Time spent in CloudStack syncs",
            self.sync_ms_total.clone(),
        );
        sub.register(
            "last_sync_milliseconds",
            "Duration of the last CloudStack sync",
            self.last_sync_ms.clone(),
        );
        sub.register(
            "objects_seen",
            "Zones, pods, hosts, instances and templates listed by the last sync",
            self.objects_seen.clone(),
        );
        sub.register(
            "objects_changed",
            "pxemesh records created, updated or deleted by syncs",
            self.objects_changed.clone(),
        );
        sub.register(
            "provision_done_notifies",
            "notifyBaremetalProvisionDone calls by outcome (accepted, error)",
            self.notifies.clone(),
        );
        sub.register(
            "jobs_submitted",
            "IPMI jobs submitted for instances entering Starting",
            self.jobs_submitted.clone(),
        );
        sub.register(
            "up",
            "1 while the last sync succeeded (on the node running the bridge)",
            self.up.clone(),
        );
        sub.register(
            "active",
            "1 on the coordinator currently running the bridge",
            self.active.clone(),
        );
    }
}

/// What `pxemeshctl cloudstack status` shows.
#[derive(Debug, Clone, Default)]
pub struct BridgeStatus {
    pub active: bool,
    pub node_id: u64,
    pub term: u64,
    pub leader_id: u64,
    /// "standby", "starting", "up", "backing-off".
    pub state: String,
    pub last_sync_unix_ms: u64,
    pub last_success_unix_ms: u64,
    pub last_sync_duration_ms: u64,
    pub objects_seen: u64,
    pub objects_changed: u64,
    pub last_error: String,
    pub syncs: u64,
    pub failures: u64,
    pub notifies_accepted: u64,
    pub jobs_submitted: u64,
    pub skipped: Vec<String>,
    /// The replicated fencing epoch once this stint committed it (0 before).
    pub fence_epoch: u64,
}

struct Shared {
    status: Mutex<BridgeStatus>,
    trigger: Notify,
    /// Sequence number of the last sync started.
    started: std::sync::atomic::AtomicU64,
    /// Sequence number of the last sync finished (a waiter wants one that
    /// started after its request, not one already under way).
    completed: watch::Sender<u64>,
}

/// The API's view of the bridge: status and on-demand syncs.
#[derive(Clone)]
pub struct BridgeHandle {
    shared: Arc<Shared>,
}

impl BridgeHandle {
    fn new(node_id: u64) -> BridgeHandle {
        let (completed, _) = watch::channel(0);
        BridgeHandle {
            shared: Arc::new(Shared {
                status: Mutex::new(BridgeStatus {
                    node_id,
                    state: "standby".into(),
                    ..Default::default()
                }),
                trigger: Notify::new(),
                started: std::sync::atomic::AtomicU64::new(0),
                completed,
            }),
        }
    }

    pub fn status(&self) -> BridgeStatus {
        match self.shared.status.lock() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn update(&self, f: impl FnOnce(&mut BridgeStatus)) {
        let mut g = match self.shared.status.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        f(&mut g);
    }

    /// Runs a sync now (on the node running the bridge) and returns the
    /// status after it.
    pub async fn sync_now(&self, timeout: Duration) -> Result<BridgeStatus, BridgeError> {
        let mut rx = self.shared.completed.subscribe();
        let want = self
            .shared
            .started
            .load(std::sync::atomic::Ordering::SeqCst)
            + 1;
        // The loop answers a trigger at once: a sync on the leader (also one
        // that has just been elected and not yet noticed it), a wake-up
        // elsewhere.
        self.shared.trigger.notify_one();
        let waited = tokio::time::timeout(timeout, async {
            rx.changed().await?;
            rx.wait_for(|n| *n >= want || !self.status().active)
                .await
                .map(|_| ())
        })
        .await;
        match waited {
            Ok(Ok(())) => {
                let st = self.status();
                if !st.active {
                    return Err(BridgeError::NotActive {
                        leader: st.leader_id,
                    });
                }
                Ok(st)
            }
            Ok(Err(_)) => Err(BridgeError::Config("the bridge task stopped".into())),
            Err(_) => Err(BridgeError::Timeout(timeout)),
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn read_secret(path: &std::path::Path) -> Result<String, BridgeError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| BridgeError::Config(format!("cannot read {}: {e}", path.display())))?;
    let p = text.trim_end_matches(['\r', '\n']).to_string();
    if p.is_empty() {
        return Err(BridgeError::Config(format!("{} is empty", path.display())));
    }
    Ok(p)
}

/// The bridge task of one coordinator.
pub struct Bridge {
    node: NodeHandle,
    key: ClusterKey,
    cfg: CloudStackConfig,
    settings: ClientSettings,
    mapping: Mapping,
    /// Default BMC password, and per CloudStack host (name or id) overrides.
    bmc_password: String,
    bmc_passwords: BTreeMap<String, String>,
    metrics: BridgeMetrics,
    handle: BridgeHandle,
    blobs: Arc<crate::blobs::BlobStore>,
}

/// Per-leadership state of the loop.
struct Stint {
    term: u64,
    /// The stint's fencing epoch is committed (nothing is written before).
    claimed: bool,
    /// A write was refused for a stale epoch: a newer stint exists; this
    /// one does nothing more (the loop replaces it when the term changes).
    fenced: bool,
    client: Client,
    next_sync: Instant,
    backoff: Duration,
    notify_due: Instant,
    notify_backoff: Duration,
    /// The newest event id when the hosts were last scanned for
    /// provision-done without a failure (0: scan at the next tick).
    scanned_events: u64,
    /// A start waits for its power-status job (checked every tick).
    power_pending: bool,
    failing_since: Option<Instant>,
}

impl Bridge {
    /// Reads the secret key and BMC password files (fails the start of the
    /// coordinator when they are unreadable).
    pub fn new(
        node: NodeHandle,
        key: ClusterKey,
        cfg: CloudStackConfig,
        metrics: BridgeMetrics,
        blobs: Arc<crate::blobs::BlobStore>,
    ) -> Result<(Bridge, BridgeHandle), BridgeError> {
        cfg.validate().map_err(BridgeError::Config)?;
        let settings = ClientSettings::from_config(&cfg)?;
        let bmc_password = read_secret(&cfg.bmc.password_file)?;
        let mut bmc_passwords = BTreeMap::new();
        for (host, o) in &cfg.bmc.hosts {
            if let Some(f) = &o.password_file {
                bmc_passwords.insert(host.clone(), read_secret(f)?);
            }
        }
        let handle = BridgeHandle::new(node.id());
        Ok((
            Bridge {
                mapping: Mapping::from_config(&cfg),
                node,
                key,
                cfg,
                settings,
                bmc_password,
                bmc_passwords,
                metrics,
                handle: handle.clone(),
                blobs,
            },
            handle,
        ))
    }

    pub async fn run(self, shutdown: CancellationToken) {
        let interval = Duration::from_secs(self.cfg.interval_seconds);
        let mut stint: Option<Stint> = None;
        loop {
            let forced = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(TICK) => false,
                _ = self.handle.shared.trigger.notified() => true,
            };
            let status = match self.node.status().await {
                Ok(s) => s,
                Err(_) => break,
            };
            let leading = status.role == "leader";
            match (&stint, leading) {
                (Some(s), true) if s.term == status.term => {}
                (Some(s), _) => {
                    info!(
                        term = s.term,
                        new_term = status.term,
                        "cloudstack bridge stopped: leadership lost"
                    );
                    stint = None;
                    self.metrics.active.set(0);
                    self.metrics.up.set(0);
                    self.handle.update(|s| s.active = false);
                    // Waiters for a sync learn that it will not happen here.
                    self.handle.shared.completed.send_modify(|_| {});
                }
                (None, _) => {}
            }
            if !leading {
                self.handle.update(|s| {
                    s.active = false;
                    s.state = "standby".into();
                    s.leader_id = status.leader_id;
                    s.term = status.term;
                });
                if forced {
                    // Wake the waiter: it learns that this node is not active.
                    self.handle.shared.completed.send_modify(|_| {});
                }
                continue;
            }
            if stint.is_none() {
                let ua = format!(
                    "pxemesh-bridge node={} term={}",
                    self.node.id(),
                    status.term
                );
                match Client::with_metrics(
                    self.settings.clone(),
                    self.metrics.client.clone(),
                    Some(ua),
                ) {
                    Ok(client) => {
                        info!(
                            term = status.term,
                            node = self.node.id(),
                            "cloudstack bridge started on this node (leader)"
                        );
                        let now = Instant::now();
                        stint = Some(Stint {
                            term: status.term,
                            claimed: false,
                            fenced: false,
                            client,
                            next_sync: now,
                            backoff: BACKOFF_INITIAL,
                            notify_due: now,
                            notify_backoff: BACKOFF_INITIAL,
                            scanned_events: 0,
                            power_pending: false,
                            failing_since: None,
                        });
                        self.metrics.active.set(1);
                        self.handle.update(|s| {
                            s.active = true;
                            s.fence_epoch = 0;
                            s.state = "starting".into();
                            s.term = status.term;
                            s.leader_id = status.leader_id;
                        });
                    }
                    Err(e) => {
                        warn!(error = %e, "cloudstack bridge cannot build its client");
                        continue;
                    }
                }
            }
            let Some(st) = stint.as_mut() else { continue };
            if st.fenced {
                if forced {
                    self.handle.shared.completed.send_modify(|_| {});
                }
                continue;
            }
            if !st.claimed {
                match self.claim_epoch(st.term).await {
                    Ok(()) => {
                        st.claimed = true;
                        let epoch = st.term;
                        self.handle.update(|s| s.fence_epoch = epoch);
                        info!(
                            term = st.term,
                            epoch = st.term,
                            "cloudstack bridge fencing epoch committed"
                        );
                    }
                    Err(e) => {
                        if matches!(e, BridgeError::Fenced(_)) && self.epoch_superseded(st.term) {
                            st.fenced = true;
                        }
                        debug!(term = st.term, error = %e, "cloudstack bridge: fencing epoch not committed yet");
                        if forced {
                            self.handle.shared.completed.send_modify(|_| {});
                        }
                        continue;
                    }
                }
            }
            let now = Instant::now();
            if forced || now >= st.next_sync {
                let seq = self
                    .handle
                    .shared
                    .started
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                    + 1;
                self.sync_and_record(st, interval).await;
                self.handle.shared.completed.send_modify(|n| *n = seq);
            }
            if st.power_pending {
                match self.power_stage(st.term).await {
                    Ok((n, pending)) => {
                        st.power_pending = pending;
                        if n > 0 {
                            self.handle.update(|s| s.jobs_submitted += n);
                        }
                    }
                    Err(BridgeError::Fenced(_)) => {}
                    Err(e) => {
                        // Tried again after the next sync, not every tick.
                        st.power_pending = false;
                        warn!(error = %e, "cloudstack start: power job not submitted; retried after the next sync");
                    }
                }
            }
            if Instant::now() >= st.notify_due {
                self.notify_pending(st).await;
            }
        }
        self.metrics.active.set(0);
    }

    async fn sync_and_record(&self, st: &mut Stint, interval: Duration) {
        let started = Instant::now();
        let result = self.sync_once(st).await;
        let ms = started.elapsed().as_millis() as u64;
        self.metrics.sync_ms_total.inc_by(ms);
        self.metrics.last_sync_ms.set(ms as i64);
        match result {
            Ok(r) => {
                self.metrics
                    .syncs
                    .get_or_create(&OutcomeLabels {
                        outcome: "ok".into(),
                    })
                    .inc();
                self.metrics.objects_changed.inc_by(r.changed);
                self.metrics.objects_seen.set(r.seen as i64);
                self.metrics.up.set(1);
                if let Some(since) = st.failing_since.take() {
                    info!(
                        term = st.term,
                        down_for_ms = since.elapsed().as_millis() as u64,
                        "cloudstack sync recovered"
                    );
                }
                if r.changed > 0 {
                    info!(
                        term = st.term,
                        seen = r.seen,
                        changed = r.changed,
                        jobs = r.jobs,
                        skipped = r.skipped.len(),
                        duration_ms = ms,
                        "cloudstack sync applied changes"
                    );
                } else {
                    debug!(
                        term = st.term,
                        seen = r.seen,
                        duration_ms = ms,
                        "cloudstack sync: no changes"
                    );
                }
                st.backoff = BACKOFF_INITIAL;
                st.next_sync = Instant::now() + interval;
                // New records may carry events to notify.
                st.notify_due = Instant::now();
                st.scanned_events = 0;
                st.power_pending = true;
                self.handle.update(|s| {
                    s.state = "up".into();
                    s.last_sync_unix_ms = unix_ms();
                    s.last_success_unix_ms = s.last_sync_unix_ms;
                    s.last_sync_duration_ms = ms;
                    s.objects_seen = r.seen;
                    s.objects_changed = r.changed;
                    s.last_error.clear();
                    s.syncs += 1;
                    s.jobs_submitted += r.jobs;
                    s.skipped = r.skipped;
                });
            }
            Err(BridgeError::Fenced(term)) => {
                if self.epoch_superseded(term) {
                    info!(
                        term,
                        "cloudstack bridge stint fenced: a newer stint claimed a higher epoch"
                    );
                    st.fenced = true;
                } else {
                    debug!(term, "cloudstack sync abandoned: leadership moved");
                }
                st.next_sync = Instant::now();
            }
            Err(e) => {
                self.metrics
                    .syncs
                    .get_or_create(&OutcomeLabels {
                        outcome: "error".into(),
                    })
                    .inc();
                self.metrics.up.set(0);
                let retry = st.backoff;
                if st.failing_since.is_none() {
                    st.failing_since = Some(Instant::now());
                    warn!(
                        term = st.term,
                        error = %e,
                        retry_in_ms = retry.as_millis() as u64,
                        "cloudstack sync failing; backing off"
                    );
                } else {
                    debug!(error = %e, retry_in_ms = retry.as_millis() as u64, "cloudstack sync still failing");
                }
                st.next_sync = Instant::now() + retry;
                st.backoff = (st.backoff * 2).min(interval.min(Duration::from_secs(60)));
                let msg = e.to_string();
                self.handle.update(|s| {
                    s.state = "backing-off".into();
                    s.last_sync_unix_ms = unix_ms();
                    s.last_sync_duration_ms = ms;
                    s.last_error = msg;
                    s.failures += 1;
                });
            }
        }
    }

    /// Leader in the stint's term, confirmed by a quorum (ReadIndex).
    async fn fence(&self, term: u64) -> Result<(), BridgeError> {
        let s = self.node.status().await?;
        if s.role != "leader" || s.term != term {
            return Err(BridgeError::Fenced(term));
        }
        // No quorum confirms this leader: act as fenced (not a CloudStack
        // failure; the loop checks leadership again at the next tick).
        if self.node.read_barrier().await.is_err() {
            return Err(BridgeError::Fenced(term));
        }
        let s = self.node.status().await?;
        if s.role != "leader" || s.term != term {
            return Err(BridgeError::Fenced(term));
        }
        Ok(())
    }

    /// A newer stint's epoch is stored (this node's replica, which may lag:
    /// only ever used to stop a stint early, never to allow a write).
    fn epoch_superseded(&self, term: u64) -> bool {
        self.node
            .state()
            .fence_epoch(FENCE_WRITER)
            .is_ok_and(|e| e > term)
    }

    /// Commits the stint's fencing epoch (the term) before its first write.
    async fn claim_epoch(&self, term: u64) -> Result<(), BridgeError> {
        self.fence(term).await?;
        match self
            .node
            .propose(&Command::ClaimEpoch {
                writer: FENCE_WRITER.into(),
                epoch: term,
            })
            .await
        {
            Ok(_) => Ok(()),
            Err(CoordError::State(StateError::Fenced { .. })) => Err(BridgeError::Fenced(term)),
            Err(e) => Err(e.into()),
        }
    }

    /// Proposes `cmd` as a write of the stint with epoch `term`: refused at
    /// apply time (→ `Fenced`) when a newer stint has claimed a higher one.
    async fn propose_fenced(
        &self,
        term: u64,
        cmd: Command,
    ) -> Result<crate::state::ApplyOutcome, BridgeError> {
        self.fence(term).await?;
        let fenced = Command::Fenced {
            writer: FENCE_WRITER.into(),
            epoch: term,
            command: Box::new(cmd),
        };
        match self.node.propose(&fenced).await {
            Ok(out) => Ok(out),
            Err(CoordError::State(StateError::Fenced { epoch, current, .. })) => {
                warn!(
                    epoch,
                    current, "cloudstack bridge write refused: a newer stint holds the epoch"
                );
                Err(BridgeError::Fenced(term))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Writes through Raft after the fence; returns how many records changed.
    async fn write(&self, term: u64, cmd: Command) -> Result<u64, BridgeError> {
        let out = self.propose_fenced(term, cmd).await?;
        Ok(out
            .results
            .iter()
            .filter(|r| {
                matches!(
                    r.outcome,
                    Outcome::Created | Outcome::Updated | Outcome::Deleted
                )
            })
            .count() as u64)
    }

    fn current<T>(
        &self,
        kind: Kind,
        f: impl Fn(Record) -> Option<T>,
    ) -> Result<Vec<T>, BridgeError> {
        Ok(self
            .node
            .state()
            .list(kind)?
            .into_iter()
            .filter_map(f)
            .collect())
    }

    fn current_hosts(&self) -> Result<Vec<Host>, BridgeError> {
        self.current(Kind::Host, |r| match r {
            Record::Host(h) => Some(h),
            _ => None,
        })
    }

    /// Seals the configured BMC password into `h`, keeping the stored
    /// ciphertext when it opens to the same password.
    fn seal_bmc(&self, h: &mut Host, existing: Option<&Host>) -> Result<(), BridgeError> {
        let Some(bmc) = h.bmc.as_mut() else {
            return Ok(());
        };
        let cs_id = h
            .labels
            .get(super::reconcile::LABEL_HOST_ID)
            .cloned()
            .unwrap_or_default();
        let password = self
            .bmc_passwords
            .get(&h.name)
            .or_else(|| self.bmc_passwords.get(&cs_id))
            .unwrap_or(&self.bmc_password);
        let stored = existing
            .and_then(|e| e.bmc.as_ref())
            .and_then(|b| b.password.clone());
        bmc.password = match stored {
            Some(s) if self.key.open(&s).ok().as_deref() == Some(password.as_str()) => Some(s),
            _ => Some(self.key.seal(password)?),
        };
        Ok(())
    }

    async fn sync_once(&self, st: &mut Stint) -> Result<SyncReport, BridgeError> {
        self.fence(st.term).await?;
        let listing = fetch(&st.client, &self.cfg.zones).await?;
        let seen = (listing.zones.len()
            + listing.pods.len()
            + listing.hosts.len()
            + listing.vms.len()
            + listing.templates.len()) as u64;
        let pxe_hosts = self.current_hosts()?;
        let templates = listing.templates.clone();
        let inputs = Inputs {
            zones: listing.zones,
            pods: listing.pods,
            hosts: listing.hosts,
            vms: listing.vms,
            templates: listing.templates,
            mapping: self.mapping.clone(),
            racks: self.current(Kind::Rack, |r| match r {
                Record::Rack(x) => Some(x),
                _ => None,
            })?,
            networks: self.current(Kind::Network, |r| match r {
                Record::Network(x) => Some(x),
                _ => None,
            })?,
            pxe_hosts: pxe_hosts.clone(),
            profiles: self.current(Kind::Profile, |r| match r {
                Record::Profile(x) => Some(x),
                _ => None,
            })?,
        };
        let p = plan(&inputs);
        let mut report = SyncReport {
            seen,
            skipped: p
                .skipped
                .iter()
                .map(|s| format!("{}: {}", s.object, s.reason))
                .collect(),
            ..Default::default()
        };
        for w in &p.warnings {
            debug!(object = %w.object, reason = %w.reason, "cloudstack sync warning");
        }
        if !p.racks.is_empty() {
            let recs = p.racks.iter().cloned().map(Record::Rack).collect();
            report.changed += self.write(st.term, Command::Put(recs)).await?;
        }
        if !p.profiles.is_empty() {
            let recs = p.profiles.iter().cloned().map(Record::Profile).collect();
            report.changed += self.write(st.term, Command::Put(recs)).await?;
        }
        report.changed += self
            .import_images(st.term, &templates, &mut report.skipped)
            .await?;
        for h in &p.hosts {
            let mut h = h.clone();
            let existing = pxe_hosts.iter().find(|e| e.name == h.name);
            mark_start(&mut h, existing);
            self.seal_bmc(&mut h, existing)?;
            match self
                .write(st.term, Command::Put(vec![Record::Host(h.clone())]))
                .await
            {
                Ok(n) => report.changed += n,
                Err(BridgeError::Coord(CoordError::State(e))) => {
                    // One refused host must not stop the others.
                    report.skipped.push(format!("host {}: {e}", h.name));
                }
                Err(e) => return Err(e),
            }
        }
        for d in &p.deletes {
            report.changed += self
                .write(
                    st.term,
                    Command::Delete {
                        kind: d.kind,
                        name: d.name.clone(),
                    },
                )
                .await?;
            info!(kind = d.kind.as_str(), name = %d.name, reason = %d.reason, "cloudstack sync deleted a record");
        }
        report.jobs = self.start_jobs(st.term, &mut report.changed).await?;
        Ok(report)
    }

    /// Kernel and initrd of every kickstart template with a profile go into
    /// image `cs-<template id>` (the profile's image), once: an existing
    /// image is never downloaded again. A failed download is reported in
    /// `skipped` and retried at the next sync; it does not fail the sync.
    async fn import_images(
        &self,
        term: u64,
        templates: &[super::model::Template],
        skipped: &mut Vec<String>,
    ) -> Result<u64, BridgeError> {
        let mut changed = 0;
        let mut done = std::collections::BTreeSet::new();
        for t in templates {
            let Some(url) = t.url.as_deref() else {
                continue;
            };
            let Ok(k) = super::model::KickstartUrl::parse(url) else {
                continue;
            };
            let name = super::reconcile::profile_name(&t.id);
            if !done.insert(name.clone())
                || self.node.state().get(Kind::Profile, &name)?.is_none()
                || self.node.state().get(Kind::Image, &name)?.is_some()
            {
                continue;
            }
            match self.import_one(&name, &k.kernel, &k.initrd).await {
                Ok(image) => {
                    let n = self
                        .write(term, Command::Put(vec![Record::Image(image)]))
                        .await?;
                    info!(image = %name, template = %t.id, kernel = %k.kernel, initrd = %k.initrd, "cloudstack template kernel and initrd imported");
                    changed += n;
                }
                Err(e) => {
                    warn!(image = %name, template = %t.id, error = %e, "cloudstack template kernel/initrd import failed; retried at the next sync");
                    skipped.push(format!("template {} ({}): image import: {e}", t.name, t.id));
                }
            }
        }
        Ok(changed)
    }

    async fn import_one(
        &self,
        name: &str,
        kernel: &str,
        initrd: &str,
    ) -> Result<crate::model::Image, CoordError> {
        let tls = super::client::tls_config(self.cfg.ca_file.as_deref())
            .map_err(|e| CoordError::Config(format!("TLS for image import: {e}")))?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .connect_timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::limited(5))
            .build()
            .map_err(|e| CoordError::Config(format!("HTTP client for image import: {e}")))?;
        let mut files = Vec::new();
        for (url, path) in [(kernel, "vmlinuz"), (initrd, "initrd.img")] {
            let url = reqwest::Url::parse(url)
                .map_err(|e| CoordError::invalid(format!("{url:?} is not a URL: {e}")))?;
            if !matches!(url.scheme(), "http" | "https") {
                return Err(CoordError::invalid(format!(
                    "{url}: only http:// and https:// can be imported"
                )));
            }
            let (digest, size) = crate::api::images::import_url(&http, &self.blobs, &url).await?;
            files.push(crate::model::ImageFile {
                path: path.into(),
                digest: digest.to_string(),
                size,
                mode: 0o644,
            });
        }
        let image = crate::model::Image {
            name: name.into(),
            files,
            meta: Default::default(),
        };
        crate::api::images::check_manifests(&self.blobs, &[Record::Image(image.clone())]).await?;
        Ok(image)
    }

    /// CloudStack's order for an instance that is `Starting`: boot device
    /// PXE, then power on — or reboot when the host is already on. Stage one
    /// submits `bootdev-pxe` and `power-status` (the relay runs a host's jobs
    /// in order); `power_stage` then submits `power-on` or `power-cycle` from
    /// the status read back.
    async fn start_jobs(&self, term: u64, changed: &mut u64) -> Result<u64, BridgeError> {
        let mut submitted = 0;
        for h in self.current_hosts()? {
            let (Some(vm), Some(state)) = (h.labels.get(LABEL_VM_ID), h.labels.get(LABEL_VM_STATE))
            else {
                continue;
            };
            if state != "Starting" || h.bmc.is_none() {
                continue;
            }
            let Some(count) = h.labels.get(LABEL_START_COUNT) else {
                continue;
            };
            if h.labels.get(LABEL_START_JOBS) == Some(count) {
                continue;
            }
            let mut status_job = String::new();
            for (action, suffix) in [("bootdev-pxe", "bootdev"), ("power-status", "status")] {
                let key = format!("cs:{vm}:start:{count}:{suffix}");
                let id = self.submit(term, &h.name, action, &key).await?;
                submitted += 1;
                info!(host = %h.name, vm = %vm, action, job = %id, idempotency_key = %key, "cloudstack instance starting: job submitted");
                status_job = id;
            }
            let mut h2 = h.clone();
            h2.meta = Default::default();
            h2.labels.insert(LABEL_START_JOBS.into(), count.clone());
            h2.labels
                .insert(LABEL_STATUS_JOB.into(), format!("{count}:{status_job}"));
            *changed += self
                .write(term, Command::Put(vec![Record::Host(h2)]))
                .await?;
        }
        Ok(submitted)
    }

    /// Submits one job (idempotent by `key`); returns its id.
    async fn submit(
        &self,
        term: u64,
        host: &str,
        action: &str,
        key: &str,
    ) -> Result<String, BridgeError> {
        let out = self
            .propose_fenced(
                term,
                Command::Jobs(JobCommand::Submit {
                    action: action.into(),
                    args: BTreeMap::new(),
                    hosts: vec![host.to_string()],
                    idempotency_key: key.to_string(),
                    now_ms: unix_ms(),
                }),
            )
            .await?;
        self.metrics.jobs_submitted.inc();
        Ok(out
            .records
            .iter()
            .find_map(|r| match r {
                Record::Job(j) => Some(j.id.clone()),
                _ => None,
            })
            .unwrap_or_default())
    }

    /// Stage two of a start: once the `power-status` job finished, `power-cycle`
    /// a host that is on, `power-on` one that is off (or whose status could
    /// not be read). Returns the jobs submitted and whether a status job is
    /// still unfinished.
    async fn power_stage(&self, term: u64) -> Result<(u64, bool), BridgeError> {
        let mut submitted = 0;
        let mut pending = false;
        for h in self.current_hosts()? {
            let (Some(vm), Some(state)) = (h.labels.get(LABEL_VM_ID), h.labels.get(LABEL_VM_STATE))
            else {
                continue;
            };
            let (Some(count), Some(status)) = (
                h.labels.get(LABEL_START_JOBS),
                h.labels.get(LABEL_STATUS_JOB),
            ) else {
                continue;
            };
            if state != "Starting" || h.labels.get(LABEL_START_POWER) == Some(count) {
                continue;
            }
            let Some((n, job_id)) = status.split_once(':') else {
                continue;
            };
            if n != count {
                continue;
            }
            let job = match self.node.state().get(Kind::Job, job_id)? {
                Some(Record::Job(j)) => Some(j),
                _ => None,
            };
            let action = match &job {
                Some(j) if !crate::jobs::is_terminal(j.state) => {
                    pending = true;
                    continue;
                }
                Some(j)
                    if j.state == crate::model::JobState::Succeeded
                        && j.result.trim().ends_with("on") =>
                {
                    "power-cycle"
                }
                _ => "power-on",
            };
            let key = format!("cs:{vm}:start:{count}:power");
            let id = self.submit(term, &h.name, action, &key).await?;
            submitted += 1;
            info!(host = %h.name, vm = %vm, action, job = %id, power_was = %job.as_ref().map(|j| j.result.as_str()).unwrap_or("?"), idempotency_key = %key, "cloudstack instance starting: job submitted");
            let mut h2 = h.clone();
            h2.meta = Default::default();
            h2.labels.insert(LABEL_START_POWER.into(), count.clone());
            self.write(term, Command::Put(vec![Record::Host(h2)]))
                .await?;
        }
        Ok((submitted, pending))
    }

    /// Provision-done events of bridge hosts → notifyBaremetalProvisionDone.
    async fn notify_pending(&self, st: &mut Stint) {
        // Scan the hosts only when events arrived since the last full scan.
        let newest = match self.node.state().last_event_id() {
            Ok(n) => n,
            Err(e) => {
                warn!(error = %e, "cloudstack notify: cannot read events");
                return;
            }
        };
        if newest != 0 && newest == st.scanned_events {
            return;
        }
        let hosts = match self.current_hosts() {
            Ok(h) => h,
            Err(e) => {
                warn!(error = %e, "cloudstack notify: cannot read hosts");
                return;
            }
        };
        for h in hosts {
            if !h.labels.contains_key(LABEL_VM_ID) {
                continue;
            }
            let after: u64 = h
                .labels
                .get(LABEL_NOTIFIED_EVENT)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let mac = h.mac.to_string();
            let events = match self.node.state().events(Some(&mac), after, 1000) {
                Ok(e) => e,
                Err(e) => {
                    warn!(error = %e, "cloudstack notify: cannot read events");
                    return;
                }
            };
            let Some(ev) = events.iter().rev().find(|e| e.kind == "provision-done") else {
                continue;
            };
            if self.fence(st.term).await.is_err() {
                return;
            }
            let vm_state = h.labels.get(LABEL_VM_STATE).map(String::as_str);
            if vm_state != Some("Starting") {
                // CloudStack only waits for this while the instance starts;
                // a late or repeated callback is recorded, not sent.
                info!(host = %h.name, %mac, event = ev.id, state = vm_state.unwrap_or("?"), "cloudstack provision-done for an instance that is not Starting; not notified");
                let mut h2 = h.clone();
                h2.meta = Default::default();
                h2.labels
                    .insert(LABEL_NOTIFIED_EVENT.into(), ev.id.to_string());
                if let Err(e) = self
                    .write(st.term, Command::Put(vec![Record::Host(h2)]))
                    .await
                {
                    warn!(host = %h.name, error = %e, "cloudstack notify: cannot record the skipped event");
                    return;
                }
                continue;
            }
            let ev_id = ev.id.to_string();
            let vm_id = h.labels.get(LABEL_VM_ID).cloned().unwrap_or_default();
            // Without the instance id CloudStack cannot be asked: notify
            // again (at least once) rather than risk never notifying.
            let result = if h.labels.get(LABEL_NOTIFY_INTENT) == Some(&ev_id) && !vm_id.is_empty() {
                // A notification of this event may already have been
                // accepted (by a stint that died before recording it):
                // CloudStack's instance state tells.
                match cs_vm_state(&st.client, &vm_id).await {
                    Ok(Some(state)) if state == "Starting" => {
                        info!(host = %h.name, %mac, event = ev.id, vm = %vm_id, "cloudstack notify in flight found; instance still Starting: notifying again");
                        notify_provision_done(&st.client, &mac).await.map(|()| true)
                    }
                    Ok(state) => {
                        info!(host = %h.name, %mac, event = ev.id, vm = %vm_id, state = state.as_deref().unwrap_or("(not listed)"), "cloudstack notify in flight found; instance already left Starting: recorded as notified, not sent again");
                        Ok(false)
                    }
                    Err(e) => Err(e),
                }
            } else {
                // Intent first: committed before CloudStack is called.
                let mut h1 = h.clone();
                h1.meta = Default::default();
                h1.labels.insert(LABEL_NOTIFY_INTENT.into(), ev_id.clone());
                if let Err(e) = self
                    .write(st.term, Command::Put(vec![Record::Host(h1)]))
                    .await
                {
                    warn!(host = %h.name, error = %e, "cloudstack notify: cannot record the intent; not calling");
                    return;
                }
                notify_provision_done(&st.client, &mac).await.map(|()| true)
            };
            match result {
                Ok(sent) => {
                    if sent {
                        crate::failpoint::hit(FAILPOINT_AFTER_NOTIFY);
                        self.metrics
                            .notifies
                            .get_or_create(&OutcomeLabels {
                                outcome: "accepted".into(),
                            })
                            .inc();
                        info!(host = %h.name, %mac, event = ev.id, "cloudstack notified: provision done");
                        self.handle.update(|s| s.notifies_accepted += 1);
                    }
                    // Re-read: the intent write bumped the record.
                    let current = match self.node.state().get(Kind::Host, &h.name) {
                        Ok(Some(Record::Host(c))) => c,
                        _ => h.clone(),
                    };
                    let mut h2 = current;
                    h2.meta = Default::default();
                    h2.labels.insert(LABEL_NOTIFIED_EVENT.into(), ev_id.clone());
                    h2.labels.insert(LABEL_NOTIFY_INTENT.into(), ev_id);
                    if let Err(e) = self
                        .write(st.term, Command::Put(vec![Record::Host(h2)]))
                        .await
                    {
                        warn!(host = %h.name, error = %e, "cloudstack notify: cannot record the accepted notification");
                    }
                    st.notify_backoff = BACKOFF_INITIAL;
                }
                Err(e) => {
                    self.metrics
                        .notifies
                        .get_or_create(&OutcomeLabels {
                            outcome: "error".into(),
                        })
                        .inc();
                    warn!(host = %h.name, %mac, error = %e, retry_in_ms = st.notify_backoff.as_millis() as u64, "cloudstack provision-done notification failed; will retry");
                    st.notify_due = Instant::now() + st.notify_backoff;
                    st.notify_backoff = (st.notify_backoff * 2).min(NOTIFY_BACKOFF_MAX);
                    return;
                }
            }
        }
        // Nothing failed: look again when new events arrive.
        st.notify_due = Instant::now();
        st.scanned_events = newest;
    }
}

/// Counts a new start when the instance enters `Starting`.
fn mark_start(h: &mut Host, existing: Option<&Host>) {
    let state = h.labels.get(LABEL_VM_STATE).map(String::as_str);
    let prev_state = existing
        .and_then(|e| e.labels.get(LABEL_VM_STATE))
        .map(String::as_str);
    if state == Some("Starting") && prev_state != Some("Starting") {
        let prev: u64 = existing
            .and_then(|e| e.labels.get(LABEL_START_COUNT))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        h.labels
            .insert(LABEL_START_COUNT.into(), (prev + 1).to_string());
    }
    debug_assert!(LABEL_START_COUNT.starts_with(BRIDGE_LABEL_PREFIX));
}

#[derive(Debug, Default)]
struct SyncReport {
    seen: u64,
    changed: u64,
    jobs: u64,
    skipped: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(state: &str, labels: &[(&str, &str)]) -> Host {
        let mut h = Host {
            name: "h1".into(),
            mac: "52:54:00:00:00:01".parse().unwrap(),
            ip: Some("10.0.0.5".parse().unwrap()),
            hostname: String::new(),
            rack: "r".into(),
            network: "n".into(),
            profile: None,
            labels: BTreeMap::new(),
            bmc: None,
            meta: Default::default(),
        };
        h.labels.insert(LABEL_VM_STATE.into(), state.into());
        for (k, v) in labels {
            h.labels.insert(k.to_string(), v.to_string());
        }
        h
    }

    #[test]
    fn start_counter_counts_transitions_only() {
        let mut new = host("Starting", &[]);
        mark_start(&mut new, None);
        assert_eq!(
            new.labels.get(LABEL_START_COUNT).map(String::as_str),
            Some("1")
        );

        let prev = host(
            "Stopped",
            &[(LABEL_START_COUNT, "1"), (LABEL_START_JOBS, "1")],
        );
        let mut again = host(
            "Starting",
            &[(LABEL_START_COUNT, "1"), (LABEL_START_JOBS, "1")],
        );
        mark_start(&mut again, Some(&prev));
        assert_eq!(
            again.labels.get(LABEL_START_COUNT).map(String::as_str),
            Some("2")
        );

        let prev = host("Starting", &[(LABEL_START_COUNT, "2")]);
        let mut same = host("Starting", &[(LABEL_START_COUNT, "2")]);
        mark_start(&mut same, Some(&prev));
        assert_eq!(
            same.labels.get(LABEL_START_COUNT).map(String::as_str),
            Some("2")
        );

        let mut running = host("Running", &[(LABEL_START_COUNT, "2")]);
        mark_start(&mut running, Some(&prev));
        assert_eq!(
            running.labels.get(LABEL_START_COUNT).map(String::as_str),
            Some("2")
        );
    }
}
