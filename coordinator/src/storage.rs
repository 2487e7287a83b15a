//! Durable Raft storage on sled: the log, hard state, conf state and the
//! compaction point, in the same sled tree as the state machine (`state`).
//!
//! Everything lives in ONE tree so that each logical change (append, apply,
//! snapshot install, compaction) is one `apply_batch`, which sled makes atomic.
//! Durability comes from `flush()`, which the Raft actor calls before it sends
//! persisted messages or acknowledges a write.
//!
//! Key layout:
//! - `r:log:<index u64 BE>`  raft entry (protobuf)
//! - `r:hs`                  hard state (protobuf)
//! - `r:cs`                  conf state (protobuf)
//! - `r:snap`                compaction point: index, term (2 x u64 BE)
//! - `r:removed`             present once this node was removed from the cluster
//! - `s:...`                 state machine (see `state.rs`); a snapshot is exactly
//!   the `s:` key range.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};

use crate::error::CoordError;

const LOG_PREFIX: &[u8] = b"r:log:";
const LOG_END: &[u8] = b"r:log;"; // ';' sorts right after ':'
const KEY_HS: &[u8] = b"r:hs";
pub(crate) const KEY_CS: &[u8] = b"r:cs";
const KEY_SNAP: &[u8] = b"r:snap";
const KEY_REMOVED: &[u8] = b"r:removed";
pub(crate) const STATE_PREFIX: &[u8] = b"s:";
pub(crate) const STATE_END: &[u8] = b"s;";
pub(crate) const KEY_APPLIED: &[u8] = b"s:meta:applied";

fn log_key(index: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(LOG_PREFIX.len() + 8);
    k.extend_from_slice(LOG_PREFIX);
    k.extend_from_slice(&index.to_be_bytes());
    k
}

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

/// Raft log storage. Cheap to clone; all clones share the tree and the cached
/// first/last indexes (which only the Raft actor changes).
#[derive(Clone)]
pub struct RaftStore {
    db: sled::Db,
    tree: sled::Tree,
    first: Arc<AtomicU64>,
    last: Arc<AtomicU64>,
}

impl RaftStore {
    pub fn open(db: sled::Db) -> Result<RaftStore, CoordError> {
        let tree = db.open_tree("pxemesh")?;
        let store = RaftStore {
            db,
            tree,
            first: Arc::new(AtomicU64::new(1)),
            last: Arc::new(AtomicU64::new(0)),
        };
        store.refresh_bounds()?;
        Ok(store)
    }

    pub fn tree(&self) -> &sled::Tree {
        &self.tree
    }

    fn refresh_bounds(&self) -> Result<(), CoordError> {
        let (snap_index, _) = self.compaction_point()?;
        let last = match self.tree.range(LOG_PREFIX..LOG_END).next_back() {
            Some(kv) => {
                let (k, _) = kv?;
                let raw: [u8; 8] = k[LOG_PREFIX.len()..]
                    .try_into()
                    .map_err(|_| CoordError::Corrupt("raft log key".into()))?;
                u64::from_be_bytes(raw)
            }
            None => snap_index,
        };
        self.first.store(snap_index + 1, Ordering::Release);
        self.last.store(last, Ordering::Release);
        Ok(())
    }

    /// Index and term of the last entry folded into the state (log compacted up to it).
    pub fn compaction_point(&self) -> Result<(u64, u64), CoordError> {
        match self.tree.get(KEY_SNAP)? {
            Some(v) => decode_pair(&v).ok_or_else(|| CoordError::Corrupt("r:snap".into())),
            None => Ok((0, 0)),
        }
    }

    pub fn is_initialized(&self) -> Result<bool, CoordError> {
        Ok(self.tree.get(KEY_CS)?.is_some() || self.tree.get(KEY_HS)?.is_some())
    }

    pub fn hard_state(&self) -> Result<HardState, CoordError> {
        match self.tree.get(KEY_HS)? {
            Some(v) => Ok(HardState::parse_from_bytes(&v)?),
            None => Ok(HardState::default()),
        }
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
        Ok(())
    }

    pub fn set_hard_state(&self, hs: &HardState) -> Result<(), CoordError> {
        self.tree.insert(KEY_HS, hs.write_to_bytes()?)?;
        Ok(())
    }

    pub fn set_commit(&self, commit: u64) -> Result<(), CoordError> {
        let mut hs = self.hard_state()?;
        if hs.commit != commit {
            hs.commit = commit;
            self.set_hard_state(&hs)?;
        }
        Ok(())
    }

    /// Append entries, truncating any conflicting suffix first.
    pub fn append(&self, entries: &[Entry]) -> Result<(), CoordError> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        let mut batch = sled::Batch::default();
        let old_last = self.last.load(Ordering::Acquire);
        for idx in first.index..=old_last {
            batch.remove(log_key(idx));
        }
        for e in entries {
            batch.insert(log_key(e.index), e.write_to_bytes()?);
        }
        self.tree.apply_batch(batch)?;
        if let Some(last) = entries.last() {
            self.last.store(last.index, Ordering::Release);
        }
        Ok(())
    }

    /// Drop log entries up to and including `index` (which must be applied).
    pub fn compact(&self, index: u64) -> Result<(), CoordError> {
        let first = self.first.load(Ordering::Acquire);
        if index < first {
            return Ok(());
        }
        let term = self.entry_term(index)?;
        let mut batch = sled::Batch::default();
        for kv in self.tree.range(LOG_PREFIX.to_vec()..log_key(index + 1)) {
            let (k, _) = kv?;
            batch.remove(k);
        }
        batch.insert(KEY_SNAP, &encode_pair(index, term));
        self.tree.apply_batch(batch)?;
        self.first.store(index + 1, Ordering::Release);
        if self.last.load(Ordering::Acquire) < index {
            self.last.store(index, Ordering::Release);
        }
        Ok(())
    }

    fn entry_term(&self, idx: u64) -> Result<u64, CoordError> {
        let (snap_index, snap_term) = self.compaction_point()?;
        if idx == snap_index {
            return Ok(snap_term);
        }
        match self.tree.get(log_key(idx))? {
            Some(v) => Ok(Entry::parse_from_bytes(&v)?.term),
            None => Err(CoordError::Corrupt(format!("raft log entry {idx} missing"))),
        }
    }

    /// Replace the state machine and the log with a received snapshot.
    pub fn install_snapshot(&self, snap: &Snapshot) -> Result<(), CoordError> {
        let meta = snap.get_metadata();
        let pairs = decode_snapshot_data(snap.get_data())?;
        let mut batch = sled::Batch::default();
        for kv in self.tree.range(STATE_PREFIX..STATE_END) {
            let (k, _) = kv?;
            batch.remove(k);
        }
        for kv in self.tree.range(LOG_PREFIX..LOG_END) {
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
        batch.insert(KEY_SNAP, &encode_pair(meta.index, meta.term));
        batch.insert(KEY_CS, meta.get_conf_state().write_to_bytes()?);
        let mut hs = self.hard_state()?;
        hs.term = hs.term.max(meta.term);
        hs.commit = hs.commit.max(meta.index);
        batch.insert(KEY_HS, hs.write_to_bytes()?);
        self.tree.apply_batch(batch)?;
        self.first.store(meta.index + 1, Ordering::Release);
        self.last.store(meta.index, Ordering::Release);
        Ok(())
    }

    pub fn mark_removed(&self) -> Result<(), CoordError> {
        self.tree.insert(KEY_REMOVED, &[1u8])?;
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

    /// Make everything written so far durable.
    pub fn flush(&self) -> Result<(), CoordError> {
        self.db.flush()?;
        Ok(())
    }

    pub fn first_index_cached(&self) -> u64 {
        self.first.load(Ordering::Acquire)
    }

    pub fn last_index_cached(&self) -> u64 {
        self.last.load(Ordering::Acquire)
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
        if low < self.first.load(Ordering::Acquire) {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last.load(Ordering::Acquire) + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let max = max_size.into();
        let mut out = Vec::with_capacity((high - low) as usize);
        let mut size = 0u64;
        for kv in self.tree.range(log_key(low)..log_key(high)) {
            let (_, v) = kv.map_err(store_err)?;
            let e = Entry::parse_from_bytes(&v)?;
            size += v.len() as u64;
            // Always return at least one entry, as raft-rs expects.
            if let Some(m) = max {
                if !out.is_empty() && size > m {
                    break;
                }
            }
            out.push(e);
        }
        if out.is_empty() && low < high {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let (snap_index, snap_term) = self.compaction_point().map_err(store_err)?;
        if idx == snap_index {
            return Ok(snap_term);
        }
        if idx < snap_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last.load(Ordering::Acquire) {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        match self.tree.get(log_key(idx)).map_err(store_err)? {
            Some(v) => Ok(Entry::parse_from_bytes(&v)?.term),
            None => Err(raft::Error::Store(StorageError::Unavailable)),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first.load(Ordering::Acquire))
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last.load(Ordering::Acquire))
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

    fn open() -> (tempfile::TempDir, RaftStore) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        (dir, RaftStore::open(db).unwrap())
    }

    #[test]
    fn append_truncates_conflicting_suffix() {
        let (_d, s) = open();
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
            let s = RaftStore::open(sled::open(dir.path()).unwrap()).unwrap();
            s.append(&(1..=10).map(|i| entry(i, 1)).collect::<Vec<_>>())
                .unwrap();
            s.compact(6).unwrap();
            assert_eq!(s.first_index().unwrap(), 7);
            assert_eq!(s.term(6).unwrap(), 1);
            assert!(matches!(
                s.entries(5, 8, None, GetEntriesContext::empty(false)),
                Err(raft::Error::Store(StorageError::Compacted))
            ));
            s.flush().unwrap();
        }
        let s = RaftStore::open(sled::open(dir.path()).unwrap()).unwrap();
        assert_eq!(s.first_index().unwrap(), 7);
        assert_eq!(s.last_index().unwrap(), 10);
    }

    #[test]
    fn max_size_returns_at_least_one() {
        let (_d, s) = open();
        s.append(&(1..=5).map(|i| entry(i, 1)).collect::<Vec<_>>())
            .unwrap();
        let ents = s
            .entries(1, 6, Some(0), GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(ents.len(), 1);
    }

    #[test]
    fn snapshot_round_trip() {
        let (_d, a) = open();
        a.tree().insert(b"s:rec:rack:r1", b"{}".as_slice()).unwrap();
        a.tree().insert(KEY_APPLIED, &encode_pair(7, 2)).unwrap();
        a.bootstrap(&[1, 2, 3]).unwrap();
        let snap = a.snapshot(0, 2).unwrap();
        assert_eq!(snap.get_metadata().index, 7);

        let (_d2, b) = open();
        b.append(&[entry(1, 1)]).unwrap();
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
        assert!(decode_snapshot_data(&[0, 0, 0, 9, 1]).is_err());
    }
}
