//! Raft storage: the log, hard state and compaction point in our own WAL
//! (`wal.rs`, append + fdatasync, live entries in memory); conf state, the
//! applied index and the state machine in sled (`state.rs`).
//!
//! Durability rules:
//! - `sync()` makes the WAL durable; the actor calls it whenever raft-rs says
//!   it must (new entries, term or vote) before sending persisted messages.
//! - sled (the state machine) is flushed lazily: what a crash loses there is
//!   re-applied from the WAL, because the WAL never drops an entry before sled
//!   is flushed (`compact`, `install_snapshot`).
//!
//! sled key layout used here (the rest of `s:` belongs to `state.rs`):
//! - `r:cs`                  conf state (protobuf), written with the applied index
//! - `r:removed`             present once this node was removed from the cluster
//! - `s:meta:applied`        applied index and term
//!
//! A snapshot is exactly the `s:` key range.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};

use crate::error::CoordError;
use crate::wal::Wal;

pub(crate) const KEY_CS: &[u8] = b"r:cs";
const KEY_REMOVED: &[u8] = b"r:removed";
pub(crate) const STATE_PREFIX: &[u8] = b"s:";
pub(crate) const STATE_END: &[u8] = b"s;";
pub(crate) const KEY_APPLIED: &[u8] = b"s:meta:applied";

pub(crate) fn encode_pair(a: u64, b: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&a.to_be_bytes());
    out[8..].copy_from_slice(&b.to_be_bytes());
    out
}

pub(crate) fn decode_pair(v: &[u8]) -> Option<(u64, u64)> {
    if v.len() != 16 {
        return None;
    }
    let a = u64::from_be_bytes(v[..8].try_into().ok()?);
    let b = u64::from_be_bytes(v[8..].try_into().ok()?);
    Some((a, b))
}

fn store_err<E: std::error::Error + Send + Sync + 'static>(e: E) -> raft::Error {
    raft::Error::Store(StorageError::Other(Box::new(e)))
}

/// Raft storage. Cheap to clone; clones share the WAL and the sled tree. Only
/// the Raft actor writes.
#[derive(Clone)]
pub struct RaftStore {
    db: sled::Db,
    tree: sled::Tree,
    wal: Arc<Mutex<Wal>>,
}

impl RaftStore {
    pub fn open(db: sled::Db, wal_dir: &Path) -> Result<RaftStore, CoordError> {
        let tree = db.open_tree("pxemesh")?;
        let wal = Wal::open(wal_dir)?;
        Ok(RaftStore {
            db,
            tree,
            wal: Arc::new(Mutex::new(wal)),
        })
    }

    fn wal(&self) -> MutexGuard<'_, Wal> {
        // A panic while holding the lock would already have stopped the actor;
        // the data behind it is still consistent (every method leaves it so).
        self.wal.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn tree(&self) -> &sled::Tree {
        &self.tree
    }

    /// Index and term of the last entry folded into the state (log compacted up to it).
    pub fn compaction_point(&self) -> Result<(u64, u64), CoordError> {
        Ok(self.wal().compacted())
    }

    pub fn is_initialized(&self) -> Result<bool, CoordError> {
        let wal = self.wal();
        Ok(self.tree.get(KEY_CS)?.is_some()
            || *wal.hard_state() != HardState::default()
            || wal.last_index() > 0)
    }

    pub fn hard_state(&self) -> Result<HardState, CoordError> {
        Ok(self.wal().hard_state().clone())
    }

    pub fn conf_state(&self) -> Result<ConfState, CoordError> {
        match self.tree.get(KEY_CS)? {
            Some(v) => Ok(ConfState::parse_from_bytes(&v)?),
            None => Ok(ConfState::default()),
        }
    }

    /// First boot of an initial member: every initial member writes the same
    /// voter set, like etcd's `initial-cluster`.
    pub fn bootstrap(&self, voters: &[u64]) -> Result<(), CoordError> {
        let cs = ConfState {
            voters: voters.to_vec(),
            ..Default::default()
        };
        self.tree.insert(KEY_CS, cs.write_to_bytes()?)?;
        self.db.flush()?;
        Ok(())
    }

    pub fn set_hard_state(&self, hs: &HardState) -> Result<(), CoordError> {
        self.wal().set_hard_state(hs)
    }

    pub fn set_commit(&self, commit: u64) -> Result<(), CoordError> {
        let mut wal = self.wal();
        if wal.hard_state().commit != commit {
            let mut hs = wal.hard_state().clone();
            hs.commit = commit;
            wal.set_hard_state(&hs)?;
        }
        Ok(())
    }

    /// Append entries, truncating any conflicting suffix first.
    pub fn append(&self, entries: &[Entry]) -> Result<(), CoordError> {
        self.wal().append(entries)
    }

    /// Make everything appended so far durable (fdatasync of the WAL).
    pub fn sync(&self) -> Result<(), CoordError> {
        self.wal().write(true)
    }

    /// Hand buffered WAL records to the OS without waiting for the disk.
    pub fn write_buffered(&self) -> Result<(), CoordError> {
        self.wal().write(false)
    }

    /// Drop log entries up to and including `index`, which must be applied.
    /// sled is flushed first: afterwards the WAL can no longer replay them.
    pub fn compact(&self, index: u64) -> Result<(), CoordError> {
        self.db.flush()?;
        // State flushed, log not yet rewritten to its new generation.
        crate::failpoint::hit("before_compaction_rewrite");
        self.wal().compact(index)
    }

    /// Replace the state machine and the log with a received snapshot: state
    /// first (flushed), then the WAL restarts at the snapshot's index.
    pub fn install_snapshot(&self, snap: &Snapshot) -> Result<(), CoordError> {
        let meta = snap.get_metadata();
        let pairs = decode_snapshot_data(snap.get_data())?;
        let mut batch = sled::Batch::default();
        for kv in self.tree.range(STATE_PREFIX..STATE_END) {
            let (k, _) = kv?;
            batch.remove(k);
        }
        for (k, v) in pairs {
            if !k.starts_with(STATE_PREFIX) {
                return Err(CoordError::Corrupt(
                    "snapshot key outside the state range".into(),
                ));
            }
            batch.insert(k, v);
        }
        batch.insert(KEY_APPLIED, &encode_pair(meta.index, meta.term));
        batch.insert(KEY_CS, meta.get_conf_state().write_to_bytes()?);
        self.tree.apply_batch(batch)?;
        self.db.flush()?;
        // Snapshot state written, log not yet restarted (`repair_after_crash`).
        crate::failpoint::hit("after_snapshot_state");
        let mut wal = self.wal();
        let mut hs = wal.hard_state().clone();
        hs.term = hs.term.max(meta.term);
        hs.commit = hs.commit.max(meta.index);
        wal.reset_to(meta.index, meta.term, &hs)
    }

    /// After a crash between a snapshot's state install and the WAL reset, the
    /// state is ahead of the log: restart the log at the applied index.
    pub fn repair_after_crash(&self, applied: u64, applied_term: u64) -> Result<bool, CoordError> {
        let mut wal = self.wal();
        if applied <= wal.last_index() {
            return Ok(false);
        }
        let mut hs = wal.hard_state().clone();
        hs.term = hs.term.max(applied_term);
        hs.commit = hs.commit.max(applied);
        wal.reset_to(applied, applied_term, &hs)?;
        Ok(true)
    }

    pub fn mark_removed(&self) -> Result<(), CoordError> {
        self.tree.insert(KEY_REMOVED, &[1u8])?;
        self.db.flush()?;
        Ok(())
    }

    pub fn is_removed(&self) -> Result<bool, CoordError> {
        Ok(self.tree.get(KEY_REMOVED)?.is_some())
    }

    pub fn applied(&self) -> Result<(u64, u64), CoordError> {
        match self.tree.get(KEY_APPLIED)? {
            Some(v) => decode_pair(&v).ok_or_else(|| CoordError::Corrupt("applied index".into())),
            None => Ok((0, 0)),
        }
    }

    /// Make everything durable: the WAL and sled (shutdown).
    pub fn flush(&self) -> Result<(), CoordError> {
        self.sync()?;
        self.db.flush()?;
        Ok(())
    }

    pub fn first_index_cached(&self) -> u64 {
        self.wal().first_index()
    }

    pub fn last_index_cached(&self) -> u64 {
        self.wal().last_index()
    }
}

/// Snapshot payload: the whole `s:` range as length-prefixed key/value pairs.
fn encode_snapshot_data(tree: &sled::Tree) -> Result<Vec<u8>, CoordError> {
    let mut out = Vec::new();
    for kv in tree.range(STATE_PREFIX..STATE_END) {
        let (k, v) = kv?;
        out.extend_from_slice(&(k.len() as u32).to_be_bytes());
        out.extend_from_slice(&k);
        out.extend_from_slice(&(v.len() as u32).to_be_bytes());
        out.extend_from_slice(&v);
    }
    Ok(out)
}

type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

fn decode_snapshot_data(mut data: &[u8]) -> Result<Pairs, CoordError> {
    fn take<'a>(data: &mut &'a [u8]) -> Result<&'a [u8], CoordError> {
        let bad = || CoordError::Corrupt("truncated snapshot data".into());
        if data.len() < 4 {
            return Err(bad());
        }
        let len = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
        if data.len() < 4 + len {
            return Err(bad());
        }
        let out = &data[4..4 + len];
        *data = &data[4 + len..];
        Ok(out)
    }
    let mut pairs = Vec::new();
    while !data.is_empty() {
        let k = take(&mut data)?.to_vec();
        let v = take(&mut data)?.to_vec();
        pairs.push((k, v));
    }
    Ok(pairs)
}

impl raft::Storage for RaftStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let hs = self.hard_state().map_err(store_err)?;
        let cs = self.conf_state().map_err(store_err)?;
        Ok(RaftState::new(hs, cs))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let wal = self.wal();
        if low < wal.first_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > wal.last_index() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let out = wal.slice(low, high, max_size.into());
        if out.is_empty() && low < high {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let wal = self.wal();
        if let Some(t) = wal.term(idx) {
            return Ok(t);
        }
        if idx < wal.compacted().0 {
            Err(raft::Error::Store(StorageError::Compacted))
        } else {
            Err(raft::Error::Store(StorageError::Unavailable))
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.wal().first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.wal().last_index())
    }

    /// A snapshot of the state machine as applied right now. Called only from
    /// the Raft actor, which is also the only writer, so the dump is consistent
    /// with the applied index stored inside it.
    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let (applied, applied_term) = self.applied().map_err(store_err)?;
        if applied < request_index {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        let mut snap = Snapshot::default();
        let data = encode_snapshot_data(&self.tree).map_err(store_err)?;
        snap.set_data(data.into());
        let meta = snap.mut_metadata();
        meta.index = applied;
        meta.term = applied_term;
        meta.set_conf_state(self.conf_state().map_err(store_err)?);
        Ok(snap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            ..Default::default()
        }
    }

    fn open_at(dir: &Path) -> RaftStore {
        let db = sled::open(dir.join("sled")).unwrap();
        RaftStore::open(db, &dir.join("wal")).unwrap()
    }

    #[test]
    fn append_truncates_conflicting_suffix() {
        let dir = tempfile::tempdir().unwrap();
        let s = open_at(dir.path());
        s.append(&[entry(1, 1), entry(2, 1), entry(3, 1)]).unwrap();
        s.append(&[entry(2, 2)]).unwrap();
        assert_eq!(s.last_index().unwrap(), 2);
        assert_eq!(s.term(2).unwrap(), 2);
        assert!(s.term(3).is_err());
        let ents = s
            .entries(1, 3, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(ents.len(), 2);
    }

    #[test]
    fn compaction_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = open_at(dir.path());
            s.append(&(1..=10).map(|i| entry(i, 1)).collect::<Vec<_>>())
                .unwrap();
            s.set_hard_state(&HardState {
                term: 1,
                commit: 10,
                ..Default::default()
            })
            .unwrap();
            s.sync().unwrap();
            s.compact(6).unwrap();
            assert_eq!(s.first_index().unwrap(), 7);
            assert_eq!(s.term(6).unwrap(), 1);
            assert!(matches!(
                s.entries(5, 8, None, GetEntriesContext::empty(false)),
                Err(raft::Error::Store(StorageError::Compacted))
            ));
        }
        let s = open_at(dir.path());
        assert_eq!(s.first_index().unwrap(), 7);
        assert_eq!(s.last_index().unwrap(), 10);
        assert_eq!(s.hard_state().unwrap().commit, 10);
    }

    #[test]
    fn max_size_returns_at_least_one() {
        let dir = tempfile::tempdir().unwrap();
        let s = open_at(dir.path());
        s.append(&(1..=5).map(|i| entry(i, 1)).collect::<Vec<_>>())
            .unwrap();
        let ents = s
            .entries(1, 6, Some(0), GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(ents.len(), 1);
    }

    #[test]
    fn snapshot_round_trip() {
        let d1 = tempfile::tempdir().unwrap();
        let a = open_at(d1.path());
        a.tree().insert(b"s:rec:rack:r1", b"{}".as_slice()).unwrap();
        a.tree().insert(KEY_APPLIED, &encode_pair(7, 2)).unwrap();
        a.bootstrap(&[1, 2, 3]).unwrap();
        let snap = a.snapshot(0, 2).unwrap();
        assert_eq!(snap.get_metadata().index, 7);

        let d2 = tempfile::tempdir().unwrap();
        {
            let b = open_at(d2.path());
            b.append(&[entry(1, 1)]).unwrap();
            b.sync().unwrap();
            b.tree()
                .insert(b"s:rec:rack:stale", b"{}".as_slice())
                .unwrap();
            b.install_snapshot(&snap).unwrap();
            assert!(b.tree().get(b"s:rec:rack:stale").unwrap().is_none());
            assert!(b.tree().get(b"s:rec:rack:r1").unwrap().is_some());
            assert_eq!(b.first_index().unwrap(), 8);
            assert_eq!(b.last_index().unwrap(), 7);
            assert_eq!(b.applied().unwrap(), (7, 2));
            assert_eq!(b.conf_state().unwrap().voters, vec![1, 2, 3]);
        }
        // Durable across a reopen.
        let b = open_at(d2.path());
        assert_eq!((b.first_index().unwrap(), b.last_index().unwrap()), (8, 7));
        assert_eq!(b.hard_state().unwrap().commit, 7);
        assert!(decode_snapshot_data(&[0, 0, 0, 9, 1]).is_err());
    }

    #[test]
    fn state_ahead_of_the_log_is_repaired() {
        let dir = tempfile::tempdir().unwrap();
        let s = open_at(dir.path());
        s.append(&(1..=3).map(|i| entry(i, 1)).collect::<Vec<_>>())
            .unwrap();
        assert!(!s.repair_after_crash(2, 1).unwrap());
        assert!(s.repair_after_crash(9, 2).unwrap());
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (10, 9));
        assert_eq!(s.term(9).unwrap(), 2);
        assert!(s.hard_state().unwrap().commit >= 9);
    }
}
