//! The Raft write-ahead log: entries, hard state and the compaction point in
//! one append-only file, made durable with `fdatasync`.
//!
//! Why not sled for the log: a sled flush hands the work to its I/O threads
//! and syncs with `sync_file_range` (no disk-cache flush, no metadata). An
//! append + `fdatasync` is both cheaper and stronger. The live log (entries
//! after the compaction point) is also kept in memory, so serving appends to
//! followers never touches the disk.
//!
//! File: `<dir>/wal-<generation>.log`, a sequence of records
//! `[len u32 BE][crc32 u32 BE][type u8][payload]` where `len` counts type and
//! payload and the CRC covers them. Replaying the records rebuilds the state;
//! a torn or corrupt tail (a crash mid-append) ends the replay and is cut off.
//! Compaction and snapshot installs rewrite the live state into the next
//! generation (write, fsync, rename, fsync the directory, delete the old one).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use protobuf::Message as _;
use raft::eraftpb::{Entry, HardState};

use crate::error::CoordError;

const REC_ENTRY: u8 = 1;
const REC_HARD_STATE: u8 = 2;
const REC_TRUNCATE: u8 = 3;
const REC_COMPACTED: u8 = 4;
/// Largest record accepted on replay (a snapshot never goes through here).
const MAX_RECORD: u32 = 64 * 1024 * 1024;

pub struct Wal {
    dir: PathBuf,
    generation: u64,
    file: File,
    /// Encoded records not yet written to the file.
    buf: Vec<u8>,
    entries: VecDeque<Entry>,
    hard_state: HardState,
    /// Index and term of the last entry folded into the state machine.
    compacted: (u64, u64),
}

fn corrupt(msg: impl Into<String>) -> CoordError {
    CoordError::Corrupt(format!("raft WAL: {}", msg.into()))
}

fn wal_name(generation: u64) -> String {
    format!("wal-{generation:020}.log")
}

fn encode_record(out: &mut Vec<u8>, kind: u8, payload: &[u8]) {
    let mut h = crc32fast::Hasher::new();
    h.update(&[kind]);
    h.update(payload);
    out.extend_from_slice(&((payload.len() + 1) as u32).to_be_bytes());
    out.extend_from_slice(&h.finalize().to_be_bytes());
    out.push(kind);
    out.extend_from_slice(payload);
}

fn sync_dir(dir: &Path) -> Result<(), CoordError> {
    File::open(dir)?.sync_all()?;
    Ok(())
}

impl Wal {
    /// Open the newest generation in `dir` (creating an empty log if none) and
    /// replay it.
    pub fn open(dir: &Path) -> Result<Wal, CoordError> {
        std::fs::create_dir_all(dir)?;
        let mut generations: Vec<u64> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_prefix("wal-")?
                    .strip_suffix(".log")?
                    .parse()
                    .ok()
            })
            .collect();
        generations.sort_unstable();
        let Some(&generation) = generations.last() else {
            // A new, empty log: an empty file replays to the empty state.
            let path = dir.join(wal_name(1));
            let file = OpenOptions::new().create(true).append(true).open(&path)?;
            file.sync_all()?;
            sync_dir(dir)?;
            return Ok(Wal::empty(dir, 1, file));
        };
        // Older generations are leftovers of an interrupted rewrite; the
        // newest is complete (it is renamed into place only after its fsync).
        for g in &generations[..generations.len() - 1] {
            let _ = std::fs::remove_file(dir.join(wal_name(*g)));
        }
        let path = dir.join(wal_name(generation));
        let mut data = Vec::new();
        File::open(&path)?.read_to_end(&mut data)?;
        let mut wal = Wal::empty(
            dir,
            generation,
            OpenOptions::new().append(true).open(&path)?,
        );
        let valid = wal.replay(&data)?;
        if valid < data.len() {
            tracing::warn!(file = %path.display(), kept = valid, dropped = data.len() - valid, "raft WAL had a torn tail (crash during an append); cut off");
            let f = OpenOptions::new().write(true).open(&path)?;
            f.set_len(valid as u64)?;
            f.sync_all()?;
        }
        Ok(wal)
    }

    fn empty(dir: &Path, generation: u64, file: File) -> Wal {
        Wal {
            dir: dir.to_path_buf(),
            generation,
            file,
            buf: Vec::new(),
            entries: VecDeque::new(),
            hard_state: HardState::default(),
            compacted: (0, 0),
        }
    }

    /// Apply records from `data`; returns how many bytes were valid.
    fn replay(&mut self, data: &[u8]) -> Result<usize, CoordError> {
        let mut at = 0;
        while data.len() - at >= 9 {
            let len =
                u32::from_be_bytes(data[at..at + 4].try_into().map_err(|_| corrupt("header"))?);
            let crc = u32::from_be_bytes(
                data[at + 4..at + 8]
                    .try_into()
                    .map_err(|_| corrupt("header"))?,
            );
            if len == 0 || len > MAX_RECORD || data.len() - at - 8 < len as usize {
                break;
            }
            let body = &data[at + 8..at + 8 + len as usize];
            if crc32fast::hash(body) != crc {
                break;
            }
            let (kind, payload) = (body[0], &body[1..]);
            match kind {
                REC_ENTRY => {
                    let e = Entry::parse_from_bytes(payload)?;
                    self.push_entry(e)?;
                }
                REC_HARD_STATE => self.hard_state = HardState::parse_from_bytes(payload)?,
                REC_TRUNCATE => {
                    let from = u64::from_be_bytes(
                        payload.try_into().map_err(|_| corrupt("truncate record"))?,
                    );
                    self.truncate_from(from);
                }
                REC_COMPACTED => {
                    let index = u64::from_be_bytes(
                        payload[..8]
                            .try_into()
                            .map_err(|_| corrupt("compaction record"))?,
                    );
                    let term = u64::from_be_bytes(
                        payload[8..16]
                            .try_into()
                            .map_err(|_| corrupt("compaction record"))?,
                    );
                    self.drop_through(index, term);
                }
                other => return Err(corrupt(format!("unknown record type {other}"))),
            }
            at += 8 + len as usize;
        }
        Ok(at)
    }

    fn push_entry(&mut self, e: Entry) -> Result<(), CoordError> {
        let expected = self.last_index() + 1;
        if e.index != expected {
            return Err(corrupt(format!(
                "entry {} follows {}",
                e.index,
                expected - 1
            )));
        }
        self.entries.push_back(e);
        Ok(())
    }

    fn truncate_from(&mut self, from: u64) {
        while self.entries.back().is_some_and(|e| e.index >= from) {
            self.entries.pop_back();
        }
    }

    fn drop_through(&mut self, index: u64, term: u64) {
        while self.entries.front().is_some_and(|e| e.index <= index) {
            self.entries.pop_front();
        }
        self.compacted = (index, term);
        if self.entries.front().is_some_and(|e| e.index != index + 1) {
            self.entries.clear();
        }
    }

    pub fn first_index(&self) -> u64 {
        self.compacted.0 + 1
    }

    pub fn last_index(&self) -> u64 {
        self.entries
            .back()
            .map(|e| e.index)
            .unwrap_or(self.compacted.0)
    }

    pub fn compacted(&self) -> (u64, u64) {
        self.compacted
    }

    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    /// Term of entry `idx`, if it is the compaction point or in the live log.
    pub fn term(&self, idx: u64) -> Option<u64> {
        if idx == self.compacted.0 {
            return Some(self.compacted.1);
        }
        self.entry(idx).map(|e| e.term)
    }

    pub fn entry(&self, idx: u64) -> Option<&Entry> {
        let first = self.first_index();
        if idx < first {
            return None;
        }
        self.entries.get((idx - first) as usize)
    }

    /// Entries in `[low, high)`, stopping once `max_bytes` is exceeded (but
    /// always at least one).
    pub fn slice(&self, low: u64, high: u64, max_bytes: Option<u64>) -> Vec<Entry> {
        let mut out = Vec::new();
        let mut size = 0u64;
        for idx in low..high {
            let Some(e) = self.entry(idx) else { break };
            size += u64::from(e.compute_size());
            if max_bytes.is_some_and(|m| !out.is_empty() && size > m) {
                break;
            }
            out.push(e.clone());
        }
        out
    }

    /// Append entries, replacing any conflicting suffix. Buffered until `sync`.
    pub fn append(&mut self, entries: &[Entry]) -> Result<(), CoordError> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        if first.index <= self.compacted.0 {
            return Err(corrupt(format!(
                "append at {} is inside the compacted log (up to {})",
                first.index, self.compacted.0
            )));
        }
        if first.index <= self.last_index() {
            self.truncate_from(first.index);
            encode_record(&mut self.buf, REC_TRUNCATE, &first.index.to_be_bytes());
        }
        for e in entries {
            let bytes = e.write_to_bytes()?;
            self.push_entry(e.clone())?;
            encode_record(&mut self.buf, REC_ENTRY, &bytes);
        }
        Ok(())
    }

    pub fn set_hard_state(&mut self, hs: &HardState) -> Result<(), CoordError> {
        self.hard_state = hs.clone();
        let bytes = hs.write_to_bytes()?;
        encode_record(&mut self.buf, REC_HARD_STATE, &bytes);
        Ok(())
    }

    /// Write buffered records; with `durable`, also `fdatasync`.
    pub fn write(&mut self, durable: bool) -> Result<(), CoordError> {
        if !self.buf.is_empty() {
            self.file.write_all(&self.buf)?;
            self.buf.clear();
        }
        if durable {
            self.file.sync_data()?;
        }
        Ok(())
    }

    /// Forget entries up to and including `index` (already in the durable
    /// state machine) and rewrite the file with what remains.
    pub fn compact(&mut self, index: u64) -> Result<(), CoordError> {
        if index <= self.compacted.0 {
            return Ok(());
        }
        let term = self.term(index).ok_or_else(|| {
            corrupt(format!(
                "compact to {index}, beyond the log end {}",
                self.last_index()
            ))
        })?;
        self.write(false)?;
        self.drop_through(index, term);
        self.rewrite()
    }

    /// Start over at a snapshot: the live log is empty, the compaction point
    /// is the snapshot's index and term.
    pub fn reset_to(&mut self, index: u64, term: u64, hs: &HardState) -> Result<(), CoordError> {
        self.buf.clear();
        self.entries.clear();
        self.compacted = (index, term);
        self.hard_state = hs.clone();
        self.rewrite()
    }

    /// Write the live state as a new generation and switch to it atomically.
    fn rewrite(&mut self) -> Result<(), CoordError> {
        let mut data = Vec::new();
        let mut point = self.compacted.0.to_be_bytes().to_vec();
        point.extend_from_slice(&self.compacted.1.to_be_bytes());
        encode_record(&mut data, REC_COMPACTED, &point);
        encode_record(
            &mut data,
            REC_HARD_STATE,
            &self.hard_state.write_to_bytes()?,
        );
        for e in &self.entries {
            encode_record(&mut data, REC_ENTRY, &e.write_to_bytes()?);
        }
        data.extend_from_slice(&self.buf);
        self.buf.clear();
        let next = self.generation + 1;
        let tmp = self.dir.join(format!("{}.tmp", wal_name(next)));
        {
            let mut f = File::create(&tmp)?;
            f.write_all(&data)?;
            f.sync_all()?;
        }
        let path = self.dir.join(wal_name(next));
        std::fs::rename(&tmp, &path)?;
        sync_dir(&self.dir)?;
        let old = self.dir.join(wal_name(self.generation));
        if old != path {
            let _ = std::fs::remove_file(old);
        }
        self.generation = next;
        self.file = OpenOptions::new().append(true).open(&path)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: format!("payload-{index}").into_bytes().into(),
            ..Default::default()
        }
    }

    fn entries(r: std::ops::RangeInclusive<u64>, term: u64) -> Vec<Entry> {
        r.map(|i| entry(i, term)).collect()
    }

    #[test]
    fn append_sync_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut w = Wal::open(dir.path()).unwrap();
            w.append(&entries(1..=5, 1)).unwrap();
            w.set_hard_state(&HardState {
                term: 1,
                vote: 2,
                commit: 3,
                ..Default::default()
            })
            .unwrap();
            w.write(true).unwrap();
        }
        let w = Wal::open(dir.path()).unwrap();
        assert_eq!((w.first_index(), w.last_index()), (1, 5));
        assert_eq!(w.hard_state().commit, 3);
        assert_eq!(w.entry(4).unwrap().data.as_ref(), b"payload-4");
        assert_eq!(w.slice(2, 5, None).len(), 3);
        assert_eq!(w.slice(1, 6, Some(0)).len(), 1, "at least one entry");
    }

    #[test]
    fn conflicting_suffix_is_replaced_and_survives_replay() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut w = Wal::open(dir.path()).unwrap();
            w.append(&entries(1..=5, 1)).unwrap();
            w.write(true).unwrap();
            w.append(&entries(3..=4, 2)).unwrap();
            w.write(true).unwrap();
            assert_eq!(w.last_index(), 4);
            assert_eq!(w.term(3), Some(2));
        }
        let w = Wal::open(dir.path()).unwrap();
        assert_eq!(w.last_index(), 4);
        assert_eq!((w.term(2), w.term(3), w.term(5)), (Some(1), Some(2), None));
    }

    #[test]
    fn torn_tail_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut w = Wal::open(dir.path()).unwrap();
            w.append(&entries(1..=3, 1)).unwrap();
            w.write(true).unwrap();
        }
        let path = std::fs::read_dir(dir.path())
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let mut data = std::fs::read(&path).unwrap();
        let full = data.len();
        // Half of a fourth record, then garbage in a fifth.
        let mut rec = Vec::new();
        encode_record(&mut rec, REC_ENTRY, &entry(4, 1).write_to_bytes().unwrap());
        data.extend_from_slice(&rec[..rec.len() / 2]);
        std::fs::write(&path, &data).unwrap();
        let mut w = Wal::open(dir.path()).unwrap();
        assert_eq!(w.last_index(), 3);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len() as usize,
            full,
            "tail cut"
        );
        // Appending after recovery continues cleanly.
        w.append(&entries(4..=4, 1)).unwrap();
        w.write(true).unwrap();
        drop(w);
        // A flipped bit in the last record: that record is dropped, not the rest.
        let mut data = std::fs::read(&path).unwrap();
        let n = data.len();
        data[n - 1] ^= 0xff;
        std::fs::write(&path, &data).unwrap();
        assert_eq!(Wal::open(dir.path()).unwrap().last_index(), 3);
    }

    #[test]
    fn compaction_rewrites_and_keeps_the_tail() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut w = Wal::open(dir.path()).unwrap();
            w.append(&entries(1..=100, 3)).unwrap();
            w.write(true).unwrap();
            w.compact(90).unwrap();
            assert_eq!((w.first_index(), w.last_index()), (91, 100));
            assert_eq!(w.term(90), Some(3));
            assert!(w.entry(90).is_none());
            w.append(&entries(101..=101, 3)).unwrap();
            w.write(true).unwrap();
            assert!(
                w.append(&entries(50..=50, 3)).is_err(),
                "appending into the compacted range is refused"
            );
        }
        let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(files.len(), 1, "old generation removed");
        let w = Wal::open(dir.path()).unwrap();
        assert_eq!(
            (w.first_index(), w.last_index(), w.compacted()),
            (91, 101, (90, 3))
        );
    }

    #[test]
    fn reset_to_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Wal::open(dir.path()).unwrap();
        w.append(&entries(1..=10, 1)).unwrap();
        w.write(true).unwrap();
        w.reset_to(
            500,
            7,
            &HardState {
                term: 7,
                commit: 500,
                ..Default::default()
            },
        )
        .unwrap();
        drop(w);
        let w = Wal::open(dir.path()).unwrap();
        assert_eq!((w.first_index(), w.last_index()), (501, 500));
        assert_eq!(w.term(500), Some(7));
        assert_eq!(w.hard_state().commit, 500);
    }

    #[test]
    fn unbuffered_hard_state_without_sync_is_still_replayed_after_write() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut w = Wal::open(dir.path()).unwrap();
            w.set_hard_state(&HardState {
                term: 4,
                ..Default::default()
            })
            .unwrap();
            w.write(false).unwrap();
        }
        assert_eq!(Wal::open(dir.path()).unwrap().hard_state().term, 4);
    }
}
