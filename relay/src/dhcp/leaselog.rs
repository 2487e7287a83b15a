//! The append-only file behind the pool leases (`<data_dir>/dhcp-leases.log`).
//!
//! Why not sled: every DORA changes a lease twice (offer, bind), and the bind
//! must be on disk before the ACK leaves. sled's copy-on-write pages and its
//! flush (which once deadlocked under concurrent callers, see `durable`) cost
//! far more than appending ~80 bytes and one `fdatasync` per batch of
//! replies. The table in memory is the truth while running; this file only
//! has to rebuild it after a restart.
//!
//! Format: a sequence of records, each `len: u32 LE | crc32(payload): u32 LE
//! | payload`, where payload = the address's 4 bytes followed by the lease as
//! JSON. Replaying keeps the last record per address. A torn or corrupt tail
//! (a crash in the middle of a write) ends the replay: the file is cut back
//! to the last whole record, with a warning saying how much was dropped.
//! Nothing acknowledged can be in that tail, because an ACK leaves only after
//! the `fdatasync` that covers its record returned.
//!
//! Compaction: once the file holds many more records than there are
//! addresses, the live table is written to a temporary file, synced and
//! renamed over the log (then the directory is synced), so the file stays
//! proportional to the pool, not to the history.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use crate::error::RelayError;

use super::leases::Lease;

/// File name inside the relay's data directory.
pub const FILE_NAME: &str = "dhcp-leases.log";
/// Larger than any lease record can be; a bigger length is corruption.
const MAX_RECORD: usize = 4096;
const HEADER: usize = 8;
/// Compact when the file has this many times more records than live leases…
const COMPACT_RATIO: u64 = 4;
/// …and at least this many records (small files are not worth rewriting).
const COMPACT_MIN_RECORDS: u64 = 16_384;

/// Append one record for `ip` to `buf`: the payload is written in place and
/// the header filled in afterwards (no allocation per record on the DHCP
/// path).
pub fn encode(buf: &mut Vec<u8>, ip: Ipv4Addr, lease: &Lease) -> Result<(), RelayError> {
    let start = buf.len();
    buf.extend_from_slice(&[0; HEADER]);
    buf.extend_from_slice(&ip.octets());
    if let Err(e) = serde_json::to_writer(&mut *buf, lease) {
        buf.truncate(start);
        return Err(e.into());
    }
    let payload = start + HEADER;
    let Ok(len) = u32::try_from(buf.len() - payload) else {
        buf.truncate(start);
        return Err(RelayError::Io(std::io::Error::other(
            "lease record too large",
        )));
    };
    let crc = crc32fast::hash(&buf[payload..]);
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..payload].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// What a replay found.
#[derive(Debug, Default)]
pub struct Replay {
    /// Every whole record, oldest first.
    pub records: Vec<(Ipv4Addr, Lease)>,
    /// Bytes of whole records (the offset the file is cut back to).
    pub good_bytes: u64,
    /// Bytes after the last whole record (torn or corrupt tail).
    pub dropped_bytes: u64,
    /// Whole records whose lease JSON could not be read (skipped).
    pub unreadable: u64,
}

/// Decode a log image. Never fails: the first damaged record ends it.
pub fn decode(bytes: &[u8]) -> Replay {
    let mut out = Replay::default();
    let mut at = 0usize;
    while bytes.len() - at >= HEADER {
        let mut len4 = [0u8; 4];
        len4.copy_from_slice(&bytes[at..at + 4]);
        let mut crc4 = [0u8; 4];
        crc4.copy_from_slice(&bytes[at + 4..at + 8]);
        let len = u32::from_le_bytes(len4) as usize;
        if !(4..=MAX_RECORD).contains(&len) || bytes.len() - at - HEADER < len {
            break;
        }
        let payload = &bytes[at + HEADER..at + HEADER + len];
        if crc32fast::hash(payload) != u32::from_le_bytes(crc4) {
            break;
        }
        let ip = Ipv4Addr::new(payload[0], payload[1], payload[2], payload[3]);
        match serde_json::from_slice::<Lease>(&payload[4..]) {
            Ok(lease) => out.records.push((ip, lease)),
            Err(_) => out.unreadable += 1,
        }
        at += HEADER + len;
    }
    out.good_bytes = at as u64;
    out.dropped_bytes = (bytes.len() - at) as u64;
    out
}

/// The open log file. Owned by `Leases` behind its own mutex, so that
/// appends reach the file in the order the table changed.
pub struct LeaseLog {
    path: PathBuf,
    file: File,
    /// Bytes of whole records in the file (where a failed append is cut
    /// back to, so the next one does not land after a partial record).
    len: u64,
    /// Records in the file (for the compaction decision).
    records: u64,
}

impl LeaseLog {
    /// Open (creating) the log at `path` and replay it.
    pub fn open(path: &Path) -> Result<(LeaseLog, Replay), RelayError> {
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(|e| io_at(path, "open", e))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| io_at(path, "read", e))?;
        let replay = decode(&bytes);
        if replay.dropped_bytes > 0 {
            tracing::warn!(
                path = %path.display(),
                kept_records = replay.records.len(),
                dropped_bytes = replay.dropped_bytes,
                "dhcp-leases: the log ends in a torn or corrupt record (a crash mid-write); cutting it back to the last whole record"
            );
            file.set_len(replay.good_bytes)
                .and_then(|_| file.sync_all())
                .map_err(|e| io_at(path, "truncate", e))?;
        }
        if replay.unreadable > 0 {
            tracing::warn!(path = %path.display(), unreadable = replay.unreadable, "dhcp-leases: skipped records whose lease could not be read");
        }
        let records = replay.records.len() as u64 + replay.unreadable;
        Ok((
            LeaseLog {
                path: path.to_path_buf(),
                file,
                len: replay.good_bytes,
                records,
            },
            replay,
        ))
    }

    /// Append `bytes` (whole records, `count` of them) and make them durable.
    pub fn append_sync(&mut self, bytes: &[u8], count: u64) -> Result<(), RelayError> {
        if bytes.is_empty() {
            return Ok(());
        }
        if let Err(e) = self
            .file
            .write_all(bytes)
            .and_then(|_| self.file.sync_data())
        {
            let _ = self.file.set_len(self.len);
            return Err(io_at(&self.path, "append", e));
        }
        self.len += bytes.len() as u64;
        self.records += count;
        Ok(())
    }

    pub fn wants_compaction(&self, live: u64) -> bool {
        self.records >= COMPACT_MIN_RECORDS && self.records > live.saturating_mul(COMPACT_RATIO)
    }

    /// Replace the file by `image` (whole records, `count` of them):
    /// temporary file, fsync, rename, fsync of the directory.
    pub fn replace(&mut self, image: &[u8], count: u64) -> Result<(), RelayError> {
        let tmp = self.path.with_extension("log.tmp");
        let write = || -> std::io::Result<File> {
            let mut f = File::create(&tmp)?;
            f.write_all(image)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            if let Some(dir) = self.path.parent() {
                File::open(dir)?.sync_all()?;
            }
            OpenOptions::new().read(true).append(true).open(&self.path)
        };
        match write() {
            Ok(f) => {
                self.file = f;
                self.len = image.len() as u64;
                self.records = count;
                Ok(())
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(io_at(&self.path, "compact", e))
            }
        }
    }
}

fn io_at(path: &Path, what: &str, e: std::io::Error) -> RelayError {
    RelayError::Io(std::io::Error::new(
        e.kind(),
        format!("dhcp lease log {} ({what}): {e}", path.display()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dhcp::leases::LeaseState;
    use pxemesh_coordinator::model::Mac;

    fn lease(n: u8, expires: u64) -> Lease {
        Lease {
            mac: Mac([2, 0, 0, 0, 0, n]),
            network: "rack".into(),
            state: LeaseState::Bound,
            expires,
        }
    }

    #[test]
    fn round_trip_and_torn_tail() {
        let mut buf = Vec::new();
        for i in 0..10u8 {
            encode(
                &mut buf,
                Ipv4Addr::new(10, 0, 0, i),
                &lease(i, 100 + u64::from(i)),
            )
            .unwrap();
        }
        let whole = buf.len();
        let r = decode(&buf);
        assert_eq!(r.records.len(), 10);
        assert_eq!(r.good_bytes, whole as u64);
        assert_eq!(r.records[3], (Ipv4Addr::new(10, 0, 0, 3), lease(3, 103)));
        // Every cut inside the last record keeps exactly the first nine.
        let last_start = {
            let mut b = Vec::new();
            for i in 0..9u8 {
                encode(
                    &mut b,
                    Ipv4Addr::new(10, 0, 0, i),
                    &lease(i, 100 + u64::from(i)),
                )
                .unwrap();
            }
            b.len()
        };
        for cut in last_start..whole {
            let r = decode(&buf[..cut]);
            assert_eq!(r.records.len(), 9, "cut at {cut}");
            assert_eq!(r.dropped_bytes, (cut - last_start) as u64);
        }
        // A flipped bit in a payload ends the replay there.
        let mut bad = buf.clone();
        bad[last_start + HEADER + 6] ^= 0x40;
        assert_eq!(decode(&bad).records.len(), 9);
        // An absurd length is corruption, not an allocation.
        let mut huge = buf[..last_start].to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        huge.extend_from_slice(&[0; 12]);
        assert_eq!(decode(&huge).records.len(), 9);
    }

    #[test]
    fn open_cuts_a_torn_tail_and_appends_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let mut buf = Vec::new();
        encode(&mut buf, Ipv4Addr::new(10, 0, 0, 1), &lease(1, 5)).unwrap();
        encode(&mut buf, Ipv4Addr::new(10, 0, 0, 2), &lease(2, 6)).unwrap();
        buf.truncate(buf.len() - 3);
        std::fs::write(&path, &buf).unwrap();
        let (mut log, replay) = LeaseLog::open(&path).unwrap();
        assert_eq!(replay.records.len(), 1);
        assert!(replay.dropped_bytes > 0);
        let mut more = Vec::new();
        encode(&mut more, Ipv4Addr::new(10, 0, 0, 3), &lease(3, 7)).unwrap();
        log.append_sync(&more, 1).unwrap();
        drop(log);
        let (_, replay) = LeaseLog::open(&path).unwrap();
        let ips: Vec<_> = replay.records.iter().map(|(ip, _)| *ip).collect();
        assert_eq!(
            ips,
            vec![Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 3)]
        );
        assert_eq!(replay.dropped_bytes, 0);
    }

    #[test]
    fn compaction_replaces_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let (mut log, _) = LeaseLog::open(&path).unwrap();
        let mut buf = Vec::new();
        for i in 0..100u64 {
            encode(&mut buf, Ipv4Addr::new(10, 0, 0, 1), &lease(1, i)).unwrap();
        }
        log.append_sync(&buf, 100).unwrap();
        let mut image = Vec::new();
        encode(&mut image, Ipv4Addr::new(10, 0, 0, 1), &lease(1, 99)).unwrap();
        log.replace(&image, 1).unwrap();
        let mut tail = Vec::new();
        encode(&mut tail, Ipv4Addr::new(10, 0, 0, 2), &lease(2, 1)).unwrap();
        log.append_sync(&tail, 1).unwrap();
        drop(log);
        let (_, replay) = LeaseLog::open(&path).unwrap();
        assert_eq!(replay.records.len(), 2);
        assert_eq!(replay.records[0].1, lease(1, 99));
        assert!(!path.with_extension("log.tmp").exists());
    }
}
