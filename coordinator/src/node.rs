//! The Raft node actor: one task owns the raft-rs `RawNode` and is the only
//! writer of the sled tree. Everything else talks to it through `NodeHandle`.
//!
//! The ready loop follows raft-rs's documented order exactly:
//! 1. send `messages` (leader messages may go out before persistence),
//! 2. install a received snapshot,
//! 3. apply committed entries,
//! 4. append new entries and store the hard state, then **flush sled**,
//! 5. only then send `persisted_messages` (votes, append responses),
//! 6. `advance`, then handle the light ready the same way, then `advance_apply`.
//!
//! A write is acknowledged when its entry is applied here, which means it is
//! committed, i.e. durable on a quorum.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType, Entry, EntryType, Message, MessageType, Snapshot};
use raft::{RawNode, StateRole};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::error::{CoordError, StateError};
use crate::failpoint;
use crate::limits::{self, DiskGuard};
use crate::metrics::Metrics;
use crate::state::{ApplyOutcome, Command, Pending, State};
use crate::storage::RaftStore;
use crate::transport::Transport;

#[derive(Debug, Clone)]
pub struct RaftSettings {
    pub tick: Duration,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    /// Compact the log once this many applied entries sit in it.
    pub snapshot_entries: u64,
    /// Entries kept behind the compaction point so slightly lagging followers
    /// catch up from the log rather than a full snapshot.
    pub catchup_entries: u64,
    pub proposal_timeout: Duration,
}

impl Default for RaftSettings {
    fn default() -> Self {
        RaftSettings {
            tick: Duration::from_millis(100),
            election_ticks: 10,
            heartbeat_ticks: 1,
            snapshot_entries: 10_000,
            catchup_entries: 1_000,
            proposal_timeout: Duration::from_secs(10),
        }
    }
}

type WriteReply = oneshot::Sender<Result<Result<ApplyOutcome, StateError>, CoordError>>;
type UnitReply = oneshot::Sender<Result<(), CoordError>>;

pub(crate) enum Request {
    Propose {
        data: Vec<u8>,
        reply: WriteReply,
    },
    ConfChange {
        cc: ConfChange,
        reply: UnitReply,
    },
    ReadIndex {
        reply: oneshot::Sender<Result<u64, CoordError>>,
    },
    TransferLeader {
        to: u64,
    },
    Status {
        reply: oneshot::Sender<NodeStatus>,
    },
    Raft(Box<Message>),
    SnapshotStatus {
        to: u64,
        failed: bool,
    },
    Unreachable {
        to: u64,
    },
}

enum Waiter {
    Write(WriteReply),
    Conf(UnitReply),
    Read(oneshot::Sender<Result<u64, CoordError>>),
}

#[derive(Debug, Clone, Default)]
pub struct MemberStatus {
    pub id: u64,
    pub address: String,
    pub learner: bool,
    pub matched: u64,
}

#[derive(Debug, Clone, Default)]
pub struct NodeStatus {
    pub id: u64,
    pub leader_id: u64,
    pub term: u64,
    pub role: String,
    pub applied: u64,
    pub commit: u64,
    pub first_index: u64,
    pub last_index: u64,
    pub snapshot_index: u64,
    pub revision: u64,
    pub members: Vec<MemberStatus>,
    pub messages_received: u64,
    pub removed: bool,
}

/// The cloneable front of the actor, used by gRPC handlers.
#[derive(Clone)]
pub struct NodeHandle {
    tx: mpsc::Sender<Request>,
    applied: watch::Receiver<u64>,
    state: State,
    timeout: Duration,
    id: u64,
    disk: Option<DiskGuard>,
    fatal: Arc<OnceLock<Fatal>>,
}

/// Why the actor stopped on its own (a storage failure).
#[derive(Debug, Clone)]
pub struct Fatal {
    pub disk_full: bool,
    pub message: String,
}

impl Fatal {
    fn of(e: &CoordError) -> Fatal {
        Fatal {
            disk_full: limits::is_disk_full(e),
            message: e.to_string(),
        }
    }

    fn error(&self) -> CoordError {
        if self.disk_full {
            CoordError::DiskFull(self.message.clone())
        } else {
            CoordError::StorageFailed(self.message.clone())
        }
    }
}

impl NodeHandle {
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// Notified whenever this node applies entries (watch streams wait on it).
    pub fn applied_watch(&self) -> watch::Receiver<u64> {
        self.applied.clone()
    }

    /// The storage failure that stopped the actor, if any.
    pub fn fatal(&self) -> Option<Fatal> {
        self.fatal.get().cloned()
    }

    fn stopped(&self) -> CoordError {
        match self.fatal.get() {
            Some(f) => f.error(),
            None => CoordError::Stopped,
        }
    }

    async fn ask<T>(
        &self,
        req: Request,
        rx: oneshot::Receiver<Result<T, CoordError>>,
    ) -> Result<T, CoordError> {
        self.tx.send(req).await.map_err(|_| self.stopped())?;
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(self.stopped()),
            Err(_) => Err(CoordError::Timeout(self.timeout)),
        }
    }

    /// Replicate a command and return what applying it did. A command sent to a
    /// follower is forwarded to the leader by raft-rs; the reply still comes from
    /// this node's own apply.
    pub async fn propose(&self, cmd: &Command) -> Result<ApplyOutcome, CoordError> {
        if let Some(g) = &self.disk {
            g.check()?;
        }
        let data = serde_json::to_vec(cmd)?;
        let (reply, rx) = oneshot::channel();
        Ok(self.ask(Request::Propose { data, reply }, rx).await??)
    }

    pub async fn conf_change(&self, cc: ConfChange) -> Result<(), CoordError> {
        let (reply, rx) = oneshot::channel();
        self.ask(Request::ConfChange { cc, reply }, rx).await
    }

    /// Linearizable read barrier (ReadIndex): returns once this node has applied
    /// everything committed before the call.
    pub async fn read_barrier(&self) -> Result<(), CoordError> {
        let (reply, rx) = oneshot::channel();
        let index = self.ask(Request::ReadIndex { reply }, rx).await?;
        self.wait_applied(index).await
    }

    pub async fn wait_applied(&self, index: u64) -> Result<(), CoordError> {
        let mut applied = self.applied.clone();
        let wait = async move { applied.wait_for(|a| *a >= index).await.map(|_| ()) };
        match tokio::time::timeout(self.timeout, wait).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(CoordError::Stopped),
            Err(_) => Err(CoordError::Timeout(self.timeout)),
        }
    }

    pub async fn transfer_leader(&self, to: u64) -> Result<(), CoordError> {
        self.tx
            .send(Request::TransferLeader { to })
            .await
            .map_err(|_| CoordError::Stopped)
    }

    pub async fn status(&self) -> Result<NodeStatus, CoordError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::Status { reply })
            .await
            .map_err(|_| CoordError::Stopped)?;
        rx.await.map_err(|_| CoordError::Stopped)
    }

    /// Deliver a message from a peer. Awaits queue space: back-pressure on the
    /// peer's stream instead of unbounded buffering.
    pub(crate) async fn step(&self, msg: Message) -> Result<(), CoordError> {
        self.tx
            .send(Request::Raft(Box::new(msg)))
            .await
            .map_err(|_| CoordError::Stopped)
    }
}

pub struct NodeOptions {
    pub id: u64,
    /// Initial members (id -> address); used only on the very first boot.
    pub initial_peers: BTreeMap<u64, String>,
    /// Join an existing cluster instead of bootstrapping one.
    pub join: bool,
    pub settings: RaftSettings,
    /// Free-space check before each proposal (None: no check).
    pub disk: Option<DiskGuard>,
}

pub(crate) struct Node {
    raw: RawNode<RaftStore>,
    store: RaftStore,
    state: State,
    transport: Transport,
    settings: RaftSettings,
    waiters: HashMap<u64, (Waiter, Instant)>,
    next_seq: u64,
    applied_tx: watch::Sender<u64>,
    metrics: Arc<Metrics>,
    messages_received: Arc<AtomicU64>,
    removed: bool,
    last_leader: u64,
    last_term: u64,
    fatal: Arc<OnceLock<Fatal>>,
}

struct SlogToTracing;

impl slog::Drain for SlogToTracing {
    type Ok = ();
    type Err = slog::Never;
    fn log(&self, record: &slog::Record, _: &slog::OwnedKVList) -> Result<(), slog::Never> {
        let msg = record.msg().to_string();
        match record.level() {
            slog::Level::Critical | slog::Level::Error => error!(target: "raft", "{msg}"),
            slog::Level::Warning => warn!(target: "raft", "{msg}"),
            slog::Level::Info => debug!(target: "raft", "{msg}"),
            _ => {}
        }
        Ok(())
    }
}

/// Open (or bootstrap) the node and start its actor. Returns the handle and the
/// actor's join handle; the actor stops when `shutdown` is cancelled.
pub(crate) fn start(
    opts: NodeOptions,
    store: RaftStore,
    transport: Transport,
    metrics: Arc<Metrics>,
    tx: mpsc::Sender<Request>,
    rx: mpsc::Receiver<Request>,
    shutdown: CancellationToken,
) -> Result<(NodeHandle, tokio::task::JoinHandle<()>), CoordError> {
    let state = State::new(store.tree().clone());
    if !store.is_initialized()? && !opts.join {
        if !opts.initial_peers.contains_key(&opts.id) {
            return Err(CoordError::Config(format!(
                "node {} is not among the initial peers {:?}",
                opts.id,
                opts.initial_peers.keys().collect::<Vec<_>>()
            )));
        }
        info!(node = opts.id, peers = ?opts.initial_peers, "bootstrapping a new cluster");
        state.seed_peers(&opts.initial_peers)?;
        store.bootstrap(&opts.initial_peers.keys().copied().collect::<Vec<_>>())?;
    } else if opts.join && !store.is_initialized()? {
        info!(
            node = opts.id,
            "joining an existing cluster; waiting for the leader to contact us"
        );
        state.seed_peers(&opts.initial_peers)?;
    }
    let (applied, applied_term) = state.applied()?;
    if store.repair_after_crash(applied, applied_term)? {
        warn!(node = opts.id, applied, "state machine was ahead of the raft log (crash during a snapshot install); log restarted at the applied index");
    }
    // After a crash the state machine may be durable further than the last
    // commit-index update (both are written between flushes). Applied entries
    // are committed by definition, so raise the commit index to match; an applied
    // index beyond the durable log, though, means the disk lost flushed data.
    let mut hs = store.hard_state()?;
    if applied > hs.commit {
        if applied > store.last_index_cached() {
            return Err(CoordError::Corrupt(format!(
                "applied index {applied} is beyond the last durable log entry {}",
                store.last_index_cached()
            )));
        }
        warn!(
            node = opts.id,
            commit = hs.commit,
            applied,
            "raising commit index to the applied index after an unclean stop"
        );
        hs.commit = applied;
        store.set_hard_state(&hs)?;
        store.sync()?;
    }
    let cfg = raft::Config {
        id: opts.id,
        election_tick: opts.settings.election_ticks,
        heartbeat_tick: opts.settings.heartbeat_ticks,
        applied,
        check_quorum: true,
        pre_vote: true,
        max_size_per_msg: 1024 * 1024,
        max_inflight_msgs: 256,
        // Merge appends to a follower that are still in flight into one message.
        batch_append: true,
        ..Default::default()
    };
    cfg.validate()?;
    let logger = slog::Logger::root(SlogToTracing, slog::o!());
    let raw = RawNode::new(&cfg, store.clone(), &logger)?;
    let removed = store.is_removed()?;
    let (applied_tx, applied_rx) = watch::channel(applied);
    let fatal = Arc::new(OnceLock::new());
    let handle = NodeHandle {
        tx,
        applied: applied_rx,
        state: state.clone(),
        timeout: opts.settings.proposal_timeout,
        id: opts.id,
        disk: opts.disk.clone(),
        fatal: fatal.clone(),
    };
    let mut node = Node {
        raw,
        store,
        state,
        transport,
        settings: opts.settings,
        waiters: HashMap::new(),
        // Sequence numbers must never repeat across restarts: an old entry in
        // the log carrying a reused one would answer a new waiter. A random
        // start (not the wall clock, which may jump back across a restart)
        // makes a collision with an earlier run's 2^64 space negligible.
        next_seq: rand::random::<u64>(),
        applied_tx,
        metrics,
        messages_received: Arc::new(AtomicU64::new(0)),
        removed,
        last_leader: 0,
        last_term: 0,
        fatal,
    };
    for (id, addr) in node.state.peers()? {
        if id != opts.id {
            node.transport.set_peer(id, addr);
        }
    }
    // The actor gets its own OS thread and single-threaded runtime: its log
    // syncs block, and must not stall the gRPC handlers' worker threads.
    let (done_tx, done_rx) = oneshot::channel::<()>();
    std::thread::Builder::new()
        .name(format!("raft-{}", opts.id))
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(node.run(rx, shutdown)),
                Err(e) => error!(error = %e, "cannot start the raft actor's runtime"),
            }
            let _ = done_tx.send(());
        })?;
    let join = tokio::spawn(async move {
        let _ = done_rx.await;
    });
    Ok((handle, join))
}

fn context_for(id: u64, seq: u64) -> Vec<u8> {
    let mut c = id.to_be_bytes().to_vec();
    c.extend_from_slice(&seq.to_be_bytes());
    c
}

fn parse_context(ctx: &[u8]) -> Option<(u64, u64)> {
    if ctx.len() != 16 {
        return None;
    }
    Some((
        u64::from_be_bytes(ctx[..8].try_into().ok()?),
        u64::from_be_bytes(ctx[8..].try_into().ok()?),
    ))
}

impl Node {
    fn id(&self) -> u64 {
        self.raw.raft.id
    }

    async fn run(&mut self, mut rx: mpsc::Receiver<Request>, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(self.settings.tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ticker.tick() => {
                    self.raw.tick();
                    self.expire_waiters();
                }
                req = rx.recv() => {
                    let Some(req) = req else { break };
                    self.handle(req);
                    // Batch whatever else is queued into the same ready cycle.
                    for _ in 0..1024 {
                        match rx.try_recv() {
                            Ok(req) => self.handle(req),
                            Err(_) => break,
                        }
                    }
                }
            }
            if let Err(e) = self.on_ready() {
                // Storage failures leave the node unable to keep its promises
                // (a partly written WAL record must not be written again after
                // it): stop, and stop the process, rather than continue with
                // an unknown on-disk state. A restart replays the durable log
                // and cuts a torn tail.
                let fatal = Fatal::of(&e);
                error!(error = %e, disk_full = fatal.disk_full, "raft node stopping: storage failure in the ready loop");
                self.metrics.storage_failures.inc();
                let _ = self.fatal.set(fatal);
                shutdown.cancel();
                break;
            }
        }
        let fatal = self.fatal.get().cloned();
        for (_, (w, _)) in self.waiters.drain() {
            match &fatal {
                Some(f) => fail(w, || f.error()),
                None => fail(w, || CoordError::Stopped),
            }
        }
        self.transport.shutdown();
        info!(node = self.id(), "raft node stopped");
    }

    fn handle(&mut self, req: Request) {
        match req {
            Request::Propose { data, reply } => {
                if self.removed {
                    let _ = reply.send(Err(CoordError::Removed));
                    return;
                }
                let seq = self.next_seq();
                self.metrics.proposals.inc();
                match self.raw.propose(context_for(self.id(), seq), data) {
                    Ok(()) => {
                        self.waiters
                            .insert(seq, (Waiter::Write(reply), Instant::now()));
                    }
                    Err(e) => {
                        self.metrics.proposals_failed.inc();
                        let _ = reply.send(Err(map_propose_err(e)));
                    }
                }
            }
            Request::ConfChange { cc, reply } => {
                let seq = self.next_seq();
                match self
                    .raw
                    .propose_conf_change(context_for(self.id(), seq), cc)
                {
                    Ok(()) => {
                        self.waiters
                            .insert(seq, (Waiter::Conf(reply), Instant::now()));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(map_propose_err(e)));
                    }
                }
            }
            Request::ReadIndex { reply } => {
                if self.raw.raft.leader_id == 0 {
                    let _ = reply.send(Err(CoordError::NoLeader));
                    return;
                }
                let seq = self.next_seq();
                self.raw.read_index(context_for(self.id(), seq));
                self.waiters
                    .insert(seq, (Waiter::Read(reply), Instant::now()));
            }
            Request::TransferLeader { to } => self.raw.transfer_leader(to),
            Request::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Request::Raft(msg) => {
                self.messages_received.fetch_add(1, Ordering::Relaxed);
                self.metrics.raft_messages_received.inc();
                if let Err(e) = self.raw.step(*msg) {
                    debug!(error = %e, "raft step rejected a message");
                }
            }
            Request::SnapshotStatus { to, failed } => {
                let status = if failed {
                    raft::SnapshotStatus::Failure
                } else {
                    raft::SnapshotStatus::Finish
                };
                self.raw.report_snapshot(to, status);
            }
            Request::Unreachable { to } => self.raw.report_unreachable(to),
        }
    }

    fn next_seq(&mut self) -> u64 {
        self.next_seq = self.next_seq.wrapping_add(1);
        self.next_seq
    }

    /// Proposals whose entries were lost in a leader change never apply; the
    /// caller has already given up (its own timeout), so just drop them.
    fn expire_waiters(&mut self) {
        let limit = self.settings.proposal_timeout + Duration::from_secs(5);
        self.waiters.retain(|_, (_, at)| at.elapsed() < limit);
    }

    fn status(&self) -> NodeStatus {
        let raft = &self.raw.raft;
        let peers = self.state.peers().unwrap_or_default();
        let cs = self.store.conf_state().unwrap_or_default();
        let progress = (raft.state == StateRole::Leader).then(|| raft.prs());
        let member = |id: u64, learner: bool| MemberStatus {
            id,
            address: peers.get(&id).cloned().unwrap_or_default(),
            learner,
            matched: progress
                .and_then(|p| p.get(id))
                .map(|p| p.matched)
                .unwrap_or(0),
        };
        let mut members: Vec<MemberStatus> =
            cs.voters.iter().map(|id| member(*id, false)).collect();
        members.extend(cs.learners.iter().map(|id| member(*id, true)));
        NodeStatus {
            id: raft.id,
            leader_id: raft.leader_id,
            term: raft.term,
            role: role_name(raft.state).to_string(),
            applied: raft.raft_log.applied,
            commit: raft.raft_log.committed,
            first_index: self.store.first_index_cached(),
            last_index: self.store.last_index_cached(),
            snapshot_index: self.store.compaction_point().map(|p| p.0).unwrap_or(0),
            revision: self.state.revision().unwrap_or(0),
            members,
            messages_received: self.messages_received.load(Ordering::Relaxed),
            removed: self.removed,
        }
    }

    fn send(&mut self, msgs: Vec<Message>) {
        for m in msgs {
            self.transport.send(m);
        }
    }

    fn on_ready(&mut self) -> Result<(), CoordError> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw.ready();
        if !ready.messages().is_empty() {
            let msgs = ready.take_messages();
            self.send(msgs);
        }
        if *ready.snapshot() != Snapshot::default() {
            let snap = ready.snapshot().clone();
            let index = snap.get_metadata().index;
            self.store.install_snapshot(&snap)?;
            self.metrics.snapshots_installed.inc();
            let bytes = snap.get_data().len();
            self.metrics.snapshot_bytes.set(bytes as i64);
            info!(
                node = self.id(),
                index, bytes, "installed snapshot from leader"
            );
            self.refresh_peers()?;
            self.applied_tx.send_replace(index);
        }
        for rs in ready.take_read_states() {
            if let Some((_, seq)) = parse_context(&rs.request_ctx) {
                if let Some((Waiter::Read(reply), _)) = self.waiters.remove(&seq) {
                    let _ = reply.send(Ok(rs.index));
                }
            }
        }
        let committed = ready.take_committed_entries();
        self.apply(committed)?;
        if !ready.entries().is_empty() {
            self.store.append(ready.entries())?;
        }
        if let Some(hs) = ready.hs() {
            self.store.set_hard_state(hs)?;
        }
        // raft-rs says when durability matters: new entries, or a new term or
        // vote. A hard state that only moved the commit index can be lost
        // (the commit index is recovered from the quorum), so it is written
        // but not synced.
        if ready.must_sync() {
            self.store.sync()?;
            self.metrics.log_syncs.inc();
        }
        if !ready.entries().is_empty() {
            // Entries durable here, not yet acknowledged to the leader.
            failpoint::hit("after_log_append");
        }
        if !ready.persisted_messages().is_empty() {
            let msgs = ready.take_persisted_messages();
            self.send(msgs);
        }
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.store.set_commit(commit)?;
        }
        let msgs = light.take_messages();
        self.send(msgs);
        let committed = light.take_committed_entries();
        self.apply(committed)?;
        self.raw.advance_apply();
        // Unsynced records (commit-index moves) still go to the OS promptly.
        self.store.write_buffered()?;
        self.after_apply()?;
        Ok(())
    }

    /// Apply committed entries. Normal entries of one call are written as one
    /// sled batch; callers are answered only after it is written, so a reply
    /// never runs ahead of what this node serves.
    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), CoordError> {
        let Some(last) = entries.last() else {
            return Ok(());
        };
        let last_index = last.index;
        // Committed (durable on a quorum), not yet applied here.
        failpoint::hit("before_apply");
        let mut replies = Vec::new();
        if let Err(e) = self.apply_entries(entries, &mut replies) {
            // Callers whose entries were in this batch learn the real cause
            // (their outcome is unknown: the batch may or may not be on disk).
            let f = Fatal::of(&e);
            for (reply, _) in replies {
                let _ = reply.send(Err(f.error()));
            }
            return Err(e);
        }
        // Applied, callers not yet answered: their outcome is unknown to them.
        failpoint::hit("after_apply");
        for (reply, result) in replies {
            let _ = reply.send(Ok(result));
        }
        self.metrics.applied_index.set(last_index as i64);
        self.applied_tx.send_replace(last_index);
        Ok(())
    }

    fn apply_entries(
        &mut self,
        entries: Vec<Entry>,
        replies: &mut Vec<(WriteReply, Result<ApplyOutcome, StateError>)>,
    ) -> Result<(), CoordError> {
        let mut pending = Pending::default();
        for entry in entries {
            match entry.get_entry_type() {
                EntryType::EntryNormal => {
                    let result = self.apply_normal(&mut pending, &entry)?;
                    self.metrics.applied_entries.inc();
                    if let (Some(result), Some(Waiter::Write(reply))) =
                        (result, self.take_waiter(&entry.context))
                    {
                        replies.push((reply, result));
                    }
                }
                EntryType::EntryConfChange => {
                    // Keep the on-disk order: earlier entries first.
                    self.state.commit(std::mem::take(&mut pending))?;
                    self.apply_conf_change(&entry)?;
                }
                EntryType::EntryConfChangeV2 => {
                    warn!(
                        index = entry.index,
                        "ignoring unsupported ConfChangeV2 entry"
                    );
                    self.state
                        .mark_applied_in(&mut pending, entry.index, entry.term);
                }
            }
        }
        self.state.commit(pending)
    }

    fn take_waiter(&mut self, ctx: &[u8]) -> Option<Waiter> {
        let (node, seq) = parse_context(ctx)?;
        if node != self.id() {
            return None;
        }
        self.waiters.remove(&seq).map(|(w, _)| w)
    }

    fn apply_normal(
        &mut self,
        pending: &mut Pending,
        entry: &Entry,
    ) -> Result<Option<Result<ApplyOutcome, StateError>>, CoordError> {
        if entry.data.is_empty() {
            self.state.mark_applied_in(pending, entry.index, entry.term);
            return Ok(None);
        }
        Ok(Some(match serde_json::from_slice::<Command>(&entry.data) {
            Ok(cmd) => self
                .state
                .execute_in(pending, &cmd, Some((entry.index, entry.term)))?,
            Err(e) => {
                // Only our own servers propose, so this means a version skew bug;
                // skip the entry on every node alike rather than wedge the log.
                error!(index = entry.index, error = %e, "undecodable command in raft log; skipped");
                self.state.mark_applied_in(pending, entry.index, entry.term);
                Err(StateError::Invalid(format!("undecodable command: {e}")))
            }
        }))
    }

    fn apply_conf_change(&mut self, entry: &Entry) -> Result<(), CoordError> {
        let cc = ConfChange::parse_from_bytes(&entry.data)?;
        let waiter = self.take_waiter(&entry.context);
        let cs = match self.raw.apply_conf_change(&cc) {
            Ok(cs) => cs,
            Err(e) => {
                warn!(error = %e, node = cc.node_id, "membership change rejected");
                self.state.mark_applied(entry.index, entry.term)?;
                if let Some(Waiter::Conf(reply)) = waiter {
                    let _ = reply.send(Err(CoordError::Invalid(format!(
                        "membership change rejected: {e}"
                    ))));
                }
                return Ok(());
            }
        };
        // raft-rs has switched configuration; our state has not recorded it.
        failpoint::hit("during_conf_change");
        let (add, remove) = match cc.get_change_type() {
            ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                let addr = String::from_utf8_lossy(&cc.context).into_owned();
                (Some((cc.node_id, addr)), None)
            }
            ConfChangeType::RemoveNode => (None, Some(cc.node_id)),
        };
        self.state
            .apply_membership(entry.index, entry.term, add.clone(), remove, &cs)?;
        info!(node = self.id(), change = ?cc.get_change_type(), target = cc.node_id, voters = ?cs.voters, learners = ?cs.learners, "membership changed");
        if let Some((id, addr)) = add {
            if id != self.id() && !addr.is_empty() {
                self.transport.set_peer(id, addr);
            }
        }
        if let Some(id) = remove {
            if id == self.id() {
                warn!(
                    node = id,
                    "this node was removed from the cluster; it will no longer take part"
                );
                self.removed = true;
                self.store.mark_removed()?;
                self.transport.shutdown();
            } else {
                self.transport.remove_peer(id);
            }
        }
        if let Some(Waiter::Conf(reply)) = waiter {
            let _ = reply.send(Ok(()));
        }
        Ok(())
    }

    fn refresh_peers(&mut self) -> Result<(), CoordError> {
        let me = self.id();
        let peers = self.state.peers()?;
        self.transport.retain(|id| peers.contains_key(&id));
        for (id, addr) in peers {
            if id != me {
                self.transport.set_peer(id, addr);
            }
        }
        Ok(())
    }

    fn after_apply(&mut self) -> Result<(), CoordError> {
        let raft = &self.raw.raft;
        self.metrics.term.set(raft.term as i64);
        self.metrics
            .is_leader
            .set(i64::from(raft.state == StateRole::Leader));
        if raft.term != self.last_term {
            // Entries proposed in an older term may be overwritten by the new
            // leader and would then never apply: answer their callers now,
            // truthfully, instead of letting them run into the timeout.
            if self.last_term != 0 {
                let stale: Vec<u64> = self.waiters.keys().copied().collect();
                for seq in stale {
                    if let Some((w, _)) = self.waiters.remove(&seq) {
                        fail(w, || CoordError::LeaderChanged);
                    }
                }
            }
            self.last_term = raft.term;
        }
        let raft = &self.raw.raft;
        if raft.leader_id != self.last_leader {
            if raft.leader_id != 0 {
                info!(
                    node = raft.id,
                    leader = raft.leader_id,
                    term = raft.term,
                    "leader elected"
                );
                self.metrics.leader_changes.inc();
            }
            self.last_leader = raft.leader_id;
        }
        let applied = raft.raft_log.applied;
        let first = self.store.first_index_cached();
        if applied >= first && applied - first + 1 >= self.settings.snapshot_entries {
            let upto = applied.saturating_sub(self.settings.catchup_entries);
            if upto >= first {
                self.store.compact(upto)?;
                self.metrics.compactions.inc();
                debug!(node = raft.id, upto, "compacted raft log");
            }
        }
        Ok(())
    }
}

fn fail(w: Waiter, err: impl Fn() -> CoordError) {
    match w {
        Waiter::Write(r) => {
            let _ = r.send(Err(err()));
        }
        Waiter::Conf(r) => {
            let _ = r.send(Err(err()));
        }
        Waiter::Read(r) => {
            let _ = r.send(Err(err()));
        }
    }
}

fn map_propose_err(e: raft::Error) -> CoordError {
    match e {
        raft::Error::ProposalDropped => CoordError::NoLeader,
        other => CoordError::Raft(other),
    }
}

fn role_name(role: StateRole) -> &'static str {
    match role {
        StateRole::Leader => "leader",
        StateRole::Follower => "follower",
        StateRole::Candidate => "candidate",
        StateRole::PreCandidate => "pre-candidate",
    }
}

/// Message types that carry a snapshot need a delivery report to raft-rs.
pub(crate) fn is_snapshot(m: &Message) -> bool {
    m.get_msg_type() == MessageType::MsgSnapshot
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_round_trip() {
        assert_eq!(parse_context(&context_for(3, 99)), Some((3, 99)));
        assert_eq!(parse_context(b"short"), None);
    }
}
