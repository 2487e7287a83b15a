//! Per-host boot events (DHCP offer/ack, files served, provision-done): one
//! structured log line each, a counter, and a bounded on-disk journal in sled
//! that the relay-sync work ships to the coordinators.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tracing::info;

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

/// Journal capacity: the oldest events go first once it is full.
const MAX_EVENTS: u64 = 100_000;

pub struct EventLog {
    tree: sled::Tree,
    next: AtomicU64,
    metrics: Arc<RelayMetrics>,
}

impl EventLog {
    pub fn open(db: &sled::Db, metrics: Arc<RelayMetrics>) -> Result<EventLog, sled::Error> {
        let tree = db.open_tree("boot-events")?;
        let next = match tree.last()? {
            Some((k, _)) => k.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0) + 1,
            None => 1,
        };
        Ok(EventLog {
            tree,
            next: AtomicU64::new(next),
            metrics,
        })
    }

    /// Record an event. Never fails the caller: a boot must not stall because
    /// the journal cannot be written (the log line and counter still happen).
    pub fn record(&self, mac: &str, kind: EventKind, detail: &str) {
        let sequence = self.next.fetch_add(1, Ordering::Relaxed);
        info!(mac, kind = kind.as_str(), detail, "boot event");
        self.metrics.boot_event(kind.as_str());
        let ev = BootEvent {
            sequence,
            mac: mac.to_string(),
            kind,
            detail: detail.to_string(),
            unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        };
        if let Ok(v) = serde_json::to_vec(&ev) {
            if let Err(e) = self.tree.insert(sequence.to_be_bytes(), v) {
                tracing::warn!(error = %e, "boot event journal write failed");
            }
        }
        if sequence > MAX_EVENTS && sequence.is_multiple_of(1024) {
            let cutoff = (sequence - MAX_EVENTS).to_be_bytes();
            for k in self.tree.range(..cutoff).keys().flatten() {
                let _ = self.tree.remove(k);
            }
        }
    }

    /// Events with a sequence number above `after`, oldest first.
    pub fn since(&self, after: u64, limit: usize) -> Vec<BootEvent> {
        self.tree
            .range((after + 1).to_be_bytes()..)
            .values()
            .flatten()
            .filter_map(|v| serde_json::from_slice(&v).ok())
            .take(limit)
            .collect()
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
            let db = sled::open(dir.path()).unwrap();
            let log = EventLog::open(&db, m.clone()).unwrap();
            log.record("52:54:00:00:00:01", EventKind::DhcpAck, "10.0.0.5");
            log.record("52:54:00:00:00:01", EventKind::HttpFile, "/boot/x.ipxe");
            db.flush().unwrap();
        }
        let db = sled::open(dir.path()).unwrap();
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
}
