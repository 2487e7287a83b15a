//! Per-host boot events (DHCP offer/ack, files served, provision-done): one
//! structured log line each, a counter, and a bounded on-disk journal in sled
//! that sync mode ships to the coordinators (`sync::ship_events`).
//!
//! Layout: tree `boot-events` holds *chunks*, keyed by the sequence number of
//! their first event (big-endian); a chunk is a JSON array of up to 256
//! consecutive events, written together when the in-memory queue drains. A single JSON object is a
//! one-event chunk (how journals written before chunking look; both are
//! read). One sled insert per drain instead of per event: sled 0.34 copies a
//! leaf per insert, which cost ~13 000 instructions per event in a storm.
//!
//! Delivery contract (sync mode): every event reaches the coordinators once.
//!
//! - Sequence numbers increase for the life of the journal, also across
//!   restarts: the next one is recovered from the tree (and never falls
//!   below the acknowledged mark).
//! - The shipper reads the journal from the persisted `shipped` mark (tree
//!   `boot-events-shipped`) and moves the mark to the coordinators'
//!   `acked_sequence` after each report, flushed to disk. The coordinators
//!   drop sequence numbers at or below what they already hold for this
//!   relay, so a report repeated after a crash or a lost answer stores
//!   nothing twice.
//! - Events stay in the journal until they are acknowledged: trimming to
//!   [`MAX_EVENTS`] removes acknowledged events; only when the journal is
//!   full of unacknowledged ones are the oldest of those dropped, with a
//!   warning and `boot_events_dropped`.
//! - Durability: `record` only queues the event in memory (a boot storm
//!   records two per DHCP exchange, and the DHCP hot path must not pay for a
//!   sled insert each); the queue goes to sled in one batch when it reaches
//!   [`DRAIN_AT`] events (written by [`flush_loop`], on its own task, or by
//!   `record` itself at [`DRAIN_HARD`]), before any read of the journal, and
//!   in [`flush_loop`], which makes it durable at least every [`FLUSH_EVERY`]
//!   (200 ms), so a relay
//!   crash (kill -9, power loss) loses at most the events of the last 200 ms.
//!   The shipper flushes before every report, so an event the coordinators
//!   acknowledged is always on the relay's disk and its sequence number is
//!   never issued again.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics::RelayMetrics;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    DhcpOffer,
    DhcpAck,
    TftpFile,
    HttpFile,
    ProvisionDone,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::DhcpOffer => "dhcp-offer",
            EventKind::DhcpAck => "dhcp-ack",
            EventKind::TftpFile => "tftp-file",
            EventKind::HttpFile => "http-file",
            EventKind::ProvisionDone => "provision-done",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootEvent {
    pub sequence: u64,
    pub mac: String,
    pub kind: EventKind,
    pub detail: String,
    pub unix_ms: u64,
}

/// Journal capacity: beyond it the oldest events go, acknowledged ones
/// first (see the module documentation).
pub const MAX_EVENTS: u64 = 100_000;
/// Trimming runs once per this many events.
const TRIM_EVERY: u64 = 1024;
/// Most events in one stored chunk.
const CHUNK_MAX: usize = 256;
/// Queued events that make the flush loop write the queue to sled early.
pub const DRAIN_AT: usize = 4096;
/// Queued events that make `record` write the queue to sled itself (the
/// flush loop is behind): the bound on the queue's memory.
pub const DRAIN_HARD: usize = 4 * DRAIN_AT;
/// Longest time a recorded event waits in memory before it is on disk.
pub const FLUSH_EVERY: Duration = Duration::from_millis(200);
const SHIPPED_TREE: &str = "boot-events-shipped";
const SHIPPED_KEY: &[u8] = b"shipped";

fn seq_of(key: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(key).ok().map(u64::from_be_bytes)
}

/// The events of one stored chunk (an array, or one object); a value that
/// cannot be read yields none (the journal is a best-effort record).
fn chunk_events(value: &[u8]) -> Vec<BootEvent> {
    match value.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => serde_json::from_slice(value).unwrap_or_default(),
        _ => serde_json::from_slice::<BootEvent>(value)
            .map(|e| vec![e])
            .unwrap_or_default(),
    }
}

fn chunk_value(events: &[BootEvent]) -> Option<Vec<u8>> {
    serde_json::to_vec(events).ok()
}

/// Key of the chunk that holds `seq` if any does: the last key at or below it.
fn chunk_start(tree: &sled::Tree, seq: u64) -> Result<u64, sled::Error> {
    Ok(tree
        .range(..=seq.to_be_bytes())
        .keys()
        .next_back()
        .transpose()?
        .and_then(|k| seq_of(&k))
        .unwrap_or(seq))
}

pub struct EventLog {
    tree: sled::Tree,
    /// Holds the `shipped` mark.
    marks: sled::Tree,
    next: AtomicU64,
    /// Highest sequence the coordinators acknowledged (sync mode).
    shipped: AtomicU64,
    /// No sequence below this is left in the journal (trimmed).
    floor: AtomicU64,
    /// A shipper runs: unacknowledged events are precious.
    shipping: AtomicBool,
    /// Recorded since the last flush.
    dirty: AtomicBool,
    /// Recorded, not yet in the tree. Sequence numbers are issued under this
    /// lock, so every issued number is either queued here or in the tree
    /// (a reader that drains first can never skip one still in flight).
    queue: std::sync::Mutex<Vec<BootEvent>>,
    /// Highest sequence written to the tree (for the trimming cadence).
    drained: AtomicU64,
    /// Poked by every `record`, for the shipper.
    recorded: Notify,
    /// Asks [`flush_loop`] to write the queue to sled now.
    drain_wanted: Notify,
    /// [`flush_loop`] runs: a full queue is its work, not `record`'s.
    drainer: AtomicBool,
    /// [`MAX_EVENTS`], smaller in tests.
    capacity: u64,
    metrics: Arc<RelayMetrics>,
}

impl EventLog {
    pub fn open(db: &sled::Db, metrics: Arc<RelayMetrics>) -> Result<EventLog, sled::Error> {
        let tree = db.open_tree("boot-events")?;
        let marks = db.open_tree(SHIPPED_TREE)?;
        let shipped = marks
            .get(SHIPPED_KEY)?
            .and_then(|v| seq_of(&v))
            .unwrap_or(0);
        let last = tree
            .last()?
            .map(|(k, v)| {
                let events = chunk_events(&v);
                let key = seq_of(&k).unwrap_or(0);
                events
                    .iter()
                    .map(|e| e.sequence)
                    .max()
                    .unwrap_or(key)
                    .max(key)
            })
            .unwrap_or(0);
        let first = tree.first()?.and_then(|(k, _)| seq_of(&k)).unwrap_or(1);
        Ok(EventLog {
            tree,
            marks,
            // Never re-issue a number the coordinators acknowledged, even if
            // the journal lost its tail.
            next: AtomicU64::new(last.max(shipped) + 1),
            shipped: AtomicU64::new(shipped),
            floor: AtomicU64::new(first),
            shipping: AtomicBool::new(false),
            dirty: AtomicBool::new(false),
            queue: std::sync::Mutex::new(Vec::new()),
            drained: AtomicU64::new(last),
            recorded: Notify::new(),
            drain_wanted: Notify::new(),
            drainer: AtomicBool::new(false),
            capacity: MAX_EVENTS,
            metrics,
        })
    }

    #[cfg(test)]
    fn with_capacity(mut self, capacity: u64) -> EventLog {
        self.capacity = capacity;
        self
    }

    /// Record an event. Never fails the caller: a boot must not stall because
    /// the journal cannot be written (the log line and counter still happen).
    pub fn record(&self, mac: &str, kind: EventKind, detail: &str) {
        info!(mac, kind = kind.as_str(), detail, "boot event");
        self.metrics.boot_event(kind.as_str());
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let (backlog, trim_due) = {
            let mut q = self.lock_queue();
            let sequence = self.next.fetch_add(1, Ordering::AcqRel);
            q.push(BootEvent {
                sequence,
                mac: mac.to_string(),
                kind,
                detail: detail.to_string(),
                unix_ms,
            });
            // The trimming cadence of the journal is kept as if every
            // event were written at once.
            (
                q.len(),
                sequence > self.capacity && sequence.is_multiple_of(self.trim_every()),
            )
        };
        self.dirty.store(true, Ordering::Release);
        // The caller is a DHCP receive thread: a sled write here would put
        // ~15 000 instructions per event on the hot path. The flush loop
        // does it; only a queue it cannot keep up with is written here.
        let background = self.drainer.load(Ordering::Acquire);
        if backlog >= DRAIN_HARD || (!background && (backlog >= DRAIN_AT || trim_due)) {
            self.write_queued();
        } else if backlog >= DRAIN_AT || trim_due {
            self.drain_wanted.notify_one();
        }
        self.update_pending();
        self.recorded.notify_one();
    }

    /// Trimming runs once per this many events.
    fn trim_every(&self) -> u64 {
        (self.capacity / 8).clamp(1, TRIM_EVERY)
    }

    fn lock_queue(&self) -> std::sync::MutexGuard<'_, Vec<BootEvent>> {
        // Pushes and takes are single operations: a poisoned queue is intact.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes the queued events to the tree in one batch, then trims if the
    /// journal passed another [`TRIM_EVERY`] boundary beyond its capacity.
    pub fn write_queued(&self) {
        let events = std::mem::take(&mut *self.lock_queue());
        // Issued in order under the queue lock: the last is the highest.
        let Some(hi) = events.last().map(|e| e.sequence) else {
            return;
        };
        // Bounded values: sled copies a value on every page rewrite, and a
        // storm drains thousands of events at once.
        let mut batch = sled::Batch::default();
        for chunk in events.chunks(CHUNK_MAX) {
            if let (Some(first), Some(v)) = (chunk.first(), chunk_value(chunk)) {
                batch.insert(&first.sequence.to_be_bytes(), v);
            }
        }
        if let Err(e) = self.tree.apply_batch(batch) {
            warn!(error = %e, events = events.len(), "boot event journal write failed");
        }
        let before = self.drained.fetch_max(hi, Ordering::AcqRel);
        let every = self.trim_every();
        if hi > self.capacity && hi / every > before / every {
            self.trim(hi - self.capacity);
        }
    }

    /// Removes the events below `cutoff`. Acknowledged ones go silently; an
    /// unacknowledged one (the journal is full of them: the coordinators
    /// have been unreachable for a long time) is counted and warned about.
    fn trim(&self, cutoff: u64) {
        let shipping = self.shipping.load(Ordering::Acquire);
        let shipped = self.shipped.load(Ordering::Acquire);
        let mut dropped = 0u64;
        let mut range: Option<(u64, u64)> = None;
        for (k, v) in self.tree.range(..cutoff.to_be_bytes()).flatten() {
            let (gone, kept): (Vec<BootEvent>, Vec<BootEvent>) = chunk_events(&v)
                .into_iter()
                .partition(|e| e.sequence < cutoff);
            // The part of a chunk at or above the cutoff moves to its own key.
            let rest = kept.first().map(|e| e.sequence).zip(chunk_value(&kept));
            let mut batch = sled::Batch::default();
            batch.remove(k);
            if let Some((first, value)) = rest {
                batch.insert(&first.to_be_bytes(), value);
            }
            if self.tree.apply_batch(batch).is_err() {
                continue;
            }
            for seq in gone.iter().map(|e| e.sequence) {
                if shipping && seq > shipped {
                    dropped += 1;
                    range = Some(range.map_or((seq, seq), |(a, _)| (a, seq)));
                }
            }
        }
        self.floor.fetch_max(cutoff, Ordering::AcqRel);
        if let Some((first, last)) = range {
            self.metrics.boot_events_dropped.inc_by(dropped);
            warn!(
                dropped,
                first,
                last,
                capacity = self.capacity,
                "BOOT EVENT JOURNAL FULL of events the coordinators have not acknowledged: dropped the oldest {dropped} (sequences {first}..={last})"
            );
        }
    }

    /// Events with a sequence number above `after`, oldest first.
    pub fn since(&self, after: u64, limit: usize) -> Vec<BootEvent> {
        self.write_queued();
        let Ok(start) = chunk_start(&self.tree, after.saturating_add(1)) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for v in self.tree.range(start.to_be_bytes()..).values().flatten() {
            out.extend(chunk_events(&v).into_iter().filter(|e| e.sequence > after));
            if out.len() >= limit {
                break;
            }
        }
        out.truncate(limit);
        out
    }

    /// Highest sequence number issued so far (0: none).
    pub fn last_sequence(&self) -> u64 {
        self.next.load(Ordering::Acquire) - 1
    }

    /// Highest sequence number the coordinators acknowledged.
    pub fn shipped(&self) -> u64 {
        self.shipped.load(Ordering::Acquire)
    }

    /// Events in the journal not yet acknowledged.
    pub fn pending(&self) -> u64 {
        let done = self
            .shipped()
            .max(self.floor.load(Ordering::Acquire).saturating_sub(1));
        self.last_sequence().saturating_sub(done)
    }

    fn update_pending(&self) {
        if self.shipping.load(Ordering::Acquire) {
            self.metrics
                .boot_events_pending
                .set(i64::try_from(self.pending()).unwrap_or(i64::MAX));
        }
    }

    /// A shipper runs from now on: trimming spares unacknowledged events
    /// and counts those it must drop anyway.
    pub fn start_shipping(&self) {
        self.shipping.store(true, Ordering::Release);
        self.update_pending();
    }

    /// Moves the `shipped` mark to `acked` (never backwards) and makes it
    /// durable.
    pub async fn mark_shipped(&self, acked: u64) -> Result<(), sled::Error> {
        let prev = self.shipped.fetch_max(acked, Ordering::AcqRel);
        if acked > prev {
            self.marks.insert(SHIPPED_KEY, &acked.to_be_bytes())?;
            crate::durable::flush(self.marks.clone()).await?;
        }
        self.update_pending();
        Ok(())
    }

    /// Waits until an event is recorded (at once if one was recorded since
    /// the last wait).
    pub async fn recorded(&self) {
        self.recorded.notified().await
    }

    /// Makes everything recorded so far durable.
    pub async fn flush(&self) -> Result<(), sled::Error> {
        self.dirty.store(false, Ordering::Release);
        self.write_queued();
        if let Err(e) = crate::durable::flush(self.tree.clone()).await {
            self.dirty.store(true, Ordering::Release);
            return Err(e);
        }
        Ok(())
    }

    /// The coordinators acknowledged sequence `above`, which this journal
    /// never issued: it was reset (a new data directory under the same relay
    /// name) and they would drop its events as duplicates. Renumbers the
    /// unacknowledged events at or below `above` past it (in order) and
    /// issues new numbers from there on. Returns how many were renumbered.
    pub fn renumber_above(&self, above: u64) -> Result<usize, sled::Error> {
        self.write_queued();
        self.next.fetch_max(above + 1, Ordering::AcqRel);
        let from = self.shipped() + 1;
        if from > above {
            return Ok(0);
        }
        let mut batch = sled::Batch::default();
        let mut kept = Vec::new();
        let mut renumbered = Vec::new();
        let start = chunk_start(&self.tree, from)?;
        for item in self.tree.range(start.to_be_bytes()..=above.to_be_bytes()) {
            let (k, v) = item?;
            batch.remove(k);
            for ev in chunk_events(&v) {
                if (from..=above).contains(&ev.sequence) {
                    renumbered.push(ev);
                } else {
                    kept.push(ev);
                }
            }
        }
        for ev in &mut renumbered {
            ev.sequence = self.next.fetch_add(1, Ordering::AcqRel);
        }
        // Acknowledged events before `from` and unissued ones after `above`
        // stay under their own numbers (split by the gap).
        let (before, after): (Vec<BootEvent>, Vec<BootEvent>) =
            kept.into_iter().partition(|e| e.sequence < from);
        let moved = renumbered.len();
        for part in [before, after, renumbered] {
            if let (Some(first), Some(v)) = (part.first(), chunk_value(&part)) {
                batch.insert(&first.sequence.to_be_bytes(), v);
            }
        }
        self.tree.apply_batch(batch)?;
        self.dirty.store(true, Ordering::Release);
        self.update_pending();
        Ok(moved)
    }
}

/// Flushes the journal every [`FLUSH_EVERY`] while events arrive, and once
/// more at shutdown: a crash loses at most the last 200 ms of events.
pub async fn flush_loop(log: Arc<EventLog>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A failing disk fails every retry: log once a minute, not every 200 ms.
    let mut last_warn: Option<std::time::Instant> = None;
    let mut failed_since_warn = 0u64;
    log.drainer.store(true, Ordering::Release);
    loop {
        let stop = tokio::select! {
            _ = shutdown.cancelled() => true,
            _ = tick.tick() => false,
            _ = log.drain_wanted.notified() => {
                log.write_queued();
                continue;
            }
        };
        if stop || log.dirty.load(Ordering::Acquire) {
            match log.flush().await {
                Err(e) => {
                    failed_since_warn += 1;
                    if last_warn.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(60)) {
                        warn!(error = %e, failures = failed_since_warn, "cannot flush the boot event journal (logged once a minute while it fails)");
                        last_warn = Some(std::time::Instant::now());
                        failed_since_warn = 0;
                    }
                }
                Ok(()) => {
                    if last_warn.take().is_some() {
                        info!("boot event journal flushes again");
                    }
                    failed_since_warn = 0;
                }
            }
        }
        if stop {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let m = Arc::new(RelayMetrics::new());
        {
            let db = crate::durable::test_db(dir.path());
            let log = EventLog::open(&db, m.clone()).unwrap();
            log.record("52:54:00:00:00:01", EventKind::DhcpAck, "10.0.0.5");
            log.record("52:54:00:00:00:01", EventKind::HttpFile, "/boot/x.ipxe");
            log.write_queued();
            db.flush().unwrap();
        }
        let db = crate::durable::test_db(dir.path());
        let log = EventLog::open(&db, m).unwrap();
        log.record("52:54:00:00:00:01", EventKind::ProvisionDone, "");
        let all = log.since(0, 10);
        assert_eq!(
            all.iter().map(|e| e.sequence).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(all[2].kind, EventKind::ProvisionDone);
        assert_eq!(log.since(2, 10).len(), 1);
    }

    fn seqs(v: &[BootEvent]) -> Vec<u64> {
        v.iter().map(|e| e.sequence).collect()
    }

    #[tokio::test]
    async fn shipped_mark_survives_restart_and_numbers_never_repeat() {
        let dir = tempfile::tempdir().unwrap();
        let m = Arc::new(RelayMetrics::new());
        {
            let db = crate::durable::test_db(dir.path());
            let log = EventLog::open(&db, m.clone()).unwrap();
            log.start_shipping();
            for _ in 0..3 {
                log.record("52:54:00:00:00:01", EventKind::DhcpOffer, "");
            }
            assert_eq!(log.pending(), 3);
            log.mark_shipped(2).await.unwrap();
            // Never backwards.
            log.mark_shipped(1).await.unwrap();
            assert_eq!((log.shipped(), log.pending()), (2, 1));
            assert_eq!(m.boot_events_pending.get(), 1);
            log.flush().await.unwrap();
        }
        {
            let db = crate::durable::test_db(dir.path());
            let log = EventLog::open(&db, m.clone()).unwrap();
            assert_eq!(log.shipped(), 2);
            assert_eq!(seqs(&log.since(log.shipped(), 10)), vec![3]);
            log.record("-", EventKind::TftpFile, "x");
            assert_eq!(log.last_sequence(), 4);
            // Acknowledged beyond the tail of the journal (it lost events
            // that were shipped): numbers continue above the mark.
            log.mark_shipped(40).await.unwrap();
        }
        let db = crate::durable::test_db(dir.path());
        let log = EventLog::open(&db, m).unwrap();
        log.record("-", EventKind::TftpFile, "y");
        assert_eq!(log.last_sequence(), 41);
    }

    #[tokio::test]
    async fn trimming_spares_unshipped_events_until_the_journal_is_full() {
        let dir = tempfile::tempdir().unwrap();
        let m = Arc::new(RelayMetrics::new());
        let db = crate::durable::test_db(dir.path());
        let log = EventLog::open(&db, m.clone()).unwrap().with_capacity(16);
        log.start_shipping();
        for _ in 0..16 {
            log.record("-", EventKind::HttpFile, "");
        }
        log.mark_shipped(10).await.unwrap();
        // 8 more: trimming at 24 removes 1..=7, all acknowledged.
        for _ in 0..8 {
            log.record("-", EventKind::HttpFile, "");
        }
        assert_eq!(log.since(0, 100).first().unwrap().sequence, 8);
        assert_eq!(m.boot_events_dropped.get(), 0);
        assert_eq!(log.pending(), 14);
        // Coordinators gone for good: the journal fills with unacknowledged
        // events and the oldest of them go, counted.
        for _ in 0..8 {
            log.record("-", EventKind::HttpFile, "");
        }
        // At 32: 8..=15 removed; 11..=15 were not acknowledged.
        assert_eq!(m.boot_events_dropped.get(), 5);
        assert_eq!(log.since(log.shipped(), 100).first().unwrap().sequence, 16);
        assert_eq!(log.pending(), 17);
        assert_eq!(m.boot_events_pending.get(), 17);
    }

    #[test]
    fn journals_of_single_event_values_are_read_and_continued_in_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let m = Arc::new(RelayMetrics::new());
        {
            let db = crate::durable::test_db(dir.path());
            // How a journal written before chunking looks: one object per key.
            let tree = db.open_tree("boot-events").unwrap();
            for seq in 1..=3u64 {
                let ev = BootEvent {
                    sequence: seq,
                    mac: "52:54:00:00:00:09".into(),
                    kind: EventKind::DhcpAck,
                    detail: format!("old {seq}"),
                    unix_ms: 1,
                };
                tree.insert(seq.to_be_bytes(), serde_json::to_vec(&ev).unwrap())
                    .unwrap();
            }
            db.flush().unwrap();
        }
        let db = crate::durable::test_db(dir.path());
        let log = EventLog::open(&db, m.clone()).unwrap();
        assert_eq!(log.last_sequence(), 3);
        for _ in 0..4 {
            log.record("-", EventKind::HttpFile, "");
        }
        log.write_queued();
        log.record("-", EventKind::TftpFile, "");
        assert_eq!(seqs(&log.since(0, 100)), (1..=8).collect::<Vec<_>>());
        // A read from the middle of a chunk, and a limit inside one.
        assert_eq!(seqs(&log.since(5, 2)), vec![6, 7]);
        assert_eq!(log.since(2, 1)[0].detail, "old 3");
        drop(log);
        drop(db);
        let db = crate::durable::test_db(dir.path());
        let log = EventLog::open(&db, m).unwrap();
        // The last chunk's highest number, not its key, is the last issued.
        assert_eq!(log.last_sequence(), 8);
    }

    #[test]
    fn a_large_drain_is_stored_in_bounded_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let m = Arc::new(RelayMetrics::new());
        let db = crate::durable::test_db(dir.path());
        let log = EventLog::open(&db, m).unwrap();
        for _ in 0..600 {
            log.record("-", EventKind::DhcpOffer, "");
        }
        log.write_queued();
        assert_eq!(log.tree.len(), 3);
        assert_eq!(seqs(&log.since(0, 1000)), (1..=600).collect::<Vec<_>>());
        assert_eq!(seqs(&log.since(300, 2)), vec![301, 302]);
    }

    #[test]
    fn trimming_splits_a_chunk_at_the_cutoff() {
        let dir = tempfile::tempdir().unwrap();
        let m = Arc::new(RelayMetrics::new());
        let db = crate::durable::test_db(dir.path());
        let log = EventLog::open(&db, m).unwrap();
        for _ in 0..10 {
            log.record("-", EventKind::HttpFile, "");
        }
        log.write_queued();
        log.trim(7);
        assert_eq!(seqs(&log.since(0, 100)), vec![7, 8, 9, 10]);
        assert_eq!(log.tree.len(), 1);
        assert_eq!(
            log.tree.first().unwrap().unwrap().0.as_ref(),
            7u64.to_be_bytes()
        );
    }

    #[tokio::test]
    async fn renumbering_moves_pending_events_past_a_foreign_mark() {
        let dir = tempfile::tempdir().unwrap();
        let m = Arc::new(RelayMetrics::new());
        let db = crate::durable::test_db(dir.path());
        let log = EventLog::open(&db, m).unwrap();
        log.start_shipping();
        for k in [
            EventKind::DhcpOffer,
            EventKind::DhcpAck,
            EventKind::HttpFile,
        ] {
            log.record("52:54:00:00:00:01", k, "");
        }
        log.mark_shipped(1).await.unwrap();
        assert_eq!(log.renumber_above(100).unwrap(), 2);
        let left = log.since(log.shipped(), 10);
        assert_eq!(seqs(&left), vec![101, 102]);
        assert_eq!(
            left.iter().map(|e| e.kind).collect::<Vec<_>>(),
            vec![EventKind::DhcpAck, EventKind::HttpFile]
        );
        log.record("-", EventKind::TftpFile, "");
        assert_eq!(log.last_sequence(), 103);
        assert_eq!(log.renumber_above(100).unwrap(), 0);
    }
}
