//! Content-addressed blob store on local disk, shared by coordinators (the
//! image store) and relays (the image cache).
//!
//! Layout under the store's root:
//! - `sha256/<hex>`: complete blobs, each verified against its name before it
//!   was renamed into place (write to `tmp/`, hash, fsync, rename, fsync dir);
//! - `tmp/<hex>.partial`: an interrupted upload or download, kept so it can
//!   resume at its length; expired by [`BlobStore::clean_partials`].
//!
//! Reads go through [`BlobStore::open_verified`]: the open file's identity
//! (inode, length, mtime, ctime) must match the one recorded when its content
//! was last hashed, otherwise it is hashed again before a byte is served. A
//! blob whose content no longer matches its name is removed and reported as
//! [`BlobError::Corrupt`]; the caller fetches it again from upstream. A full
//! re-hash ignoring the recorded identity ([`BlobStore::scrub`]) catches
//! corruption that kept the file's timestamps.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use sha2::{Digest as _, Sha256};

/// A sha256 content address (`sha256:<64 lower-case hex>`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    /// The 64 hex characters.
    pub fn hex(&self) -> &str {
        &self.0
    }

    fn from_hash(h: Sha256) -> Digest {
        Digest(hex::encode(h.finalize()))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.0)
    }
}

impl FromStr for Digest {
    type Err = BlobError;
    fn from_str(s: &str) -> Result<Digest, BlobError> {
        let ok = s.strip_prefix("sha256:").filter(|h| {
            h.len() == 64
                && h.chars()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        });
        match ok {
            Some(h) => Ok(Digest(h.to_string())),
            None => Err(BlobError::BadDigest(s.chars().take(80).collect())),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("invalid digest {0:?}: expected sha256:<64 lower-case hex>")]
    BadDigest(String),
    #[error("blob {0} is not stored here")]
    NotFound(Digest),
    #[error("blob {digest} was corrupt on disk (its content hashes to {actual}); it was removed")]
    Corrupt { digest: Digest, actual: Digest },
    #[error("blob {digest}: the content received hashes to {actual}; discarded")]
    Mismatch { digest: Digest, actual: Digest },
    #[error("blob {0}: another transfer of it is in progress")]
    Busy(Digest),
    #[error("blob {digest}: data at offset {got}, but {have} bytes are held (resume at {have})")]
    Offset { digest: Digest, got: u64, have: u64 },
    #[error("blob {digest}: {got} bytes exceed the declared size {size}")]
    TooLong { digest: Digest, got: u64, size: u64 },
    #[error("blob {digest}: declared size {expected} but {got} bytes are stored")]
    SizeMismatch {
        digest: Digest,
        expected: u64,
        got: u64,
    },
    #[error("blob store I/O: {0}")]
    Io(#[from] io::Error),
}

/// What identifies the file content that was last hashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(m: &fs::Metadata) -> Stamp {
        Stamp {
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

pub struct BlobStore {
    root: PathBuf,
    verified: Mutex<HashMap<Digest, Stamp>>,
    writers: Arc<Mutex<HashSet<Digest>>>,
}

/// Exclusive right to write one digest's partial file (dropped: released).
pub struct WriterGuard {
    digest: Digest,
    writers: Arc<Mutex<HashSet<Digest>>>,
}

impl Drop for WriterGuard {
    fn drop(&mut self) {
        if let Ok(mut w) = self.writers.lock() {
            w.remove(&self.digest);
        }
    }
}

/// An upload or download in progress: appends to the partial file and hashes
/// as it goes (a resumed partial's prefix is hashed when it is opened).
pub struct PartialWriter {
    digest: Digest,
    file: File,
    hasher: Sha256,
    len: u64,
    path: PathBuf,
    _guard: WriterGuard,
}

impl PartialWriter {
    /// Bytes held (the resume offset).
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// Append `data`, which must start at `offset` == [`len`](Self::len).
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<u64, BlobError> {
        if offset != self.len {
            return Err(BlobError::Offset {
                digest: self.digest.clone(),
                got: offset,
                have: self.len,
            });
        }
        self.file.write_all(data)?;
        self.hasher.update(data);
        self.len += data.len() as u64;
        Ok(self.len)
    }

    /// Verify the content against the digest and move it into the store.
    /// A mismatch removes the partial file (its bytes are useless).
    pub fn finish(self, store: &BlobStore) -> Result<u64, BlobError> {
        let actual = Digest::from_hash(self.hasher);
        if actual != self.digest {
            let _ = fs::remove_file(&self.path);
            return Err(BlobError::Mismatch {
                digest: self.digest,
                actual,
            });
        }
        self.file.sync_all()?;
        let dst = store.blob_path(&self.digest);
        fs::rename(&self.path, &dst)?;
        if let Ok(d) = File::open(store.root.join("sha256")) {
            let _ = d.sync_all();
        }
        let meta = fs::metadata(&dst)?;
        store.remember(&self.digest, Stamp::of(&meta));
        Ok(self.len)
    }
}

/// A download whose digest is known only at the end (an image imported from
/// a URL): bytes go to a private file in `tmp/`, hashed as they arrive, and
/// become the blob named by their own digest. Dropped unfinished, the file is
/// removed.
pub struct ImportWriter {
    file: Option<File>,
    hasher: Sha256,
    len: u64,
    limit: u64,
    path: PathBuf,
}

impl ImportWriter {
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn write(&mut self, data: &[u8]) -> Result<(), BlobError> {
        let next = self.len + data.len() as u64;
        if next > self.limit {
            return Err(BlobError::Io(io::Error::other(format!(
                "more than the import limit of {} bytes",
                self.limit
            ))));
        }
        let f = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("import writer already finished"))?;
        f.write_all(data)?;
        self.hasher.update(data);
        self.len = next;
        Ok(())
    }

    /// Store the content under its digest (already stored: the copy is
    /// dropped). Returns the digest and the size.
    pub fn finish(mut self, store: &BlobStore) -> Result<(Digest, u64), BlobError> {
        let digest = Digest::from_hash(std::mem::take(&mut self.hasher));
        let file = self
            .file
            .take()
            .ok_or_else(|| io::Error::other("import writer already finished"))?;
        if store.contains(&digest) {
            let _ = fs::remove_file(&self.path);
            return Ok((digest, self.len));
        }
        let _guard = store.lock_writer(&digest)?;
        file.sync_all()?;
        let dst = store.blob_path(&digest);
        fs::rename(&self.path, &dst)?;
        if let Ok(d) = File::open(store.root.join("sha256")) {
            let _ = d.sync_all();
        }
        let meta = fs::metadata(&dst)?;
        store.remember(&digest, Stamp::of(&meta));
        Ok((digest, self.len))
    }
}

impl Drop for ImportWriter {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

fn hash_reader(r: &mut impl Read) -> io::Result<Digest> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(Digest::from_hash(h));
        }
        h.update(&buf[..n]);
    }
}

/// sha256 and length of a file.
pub fn hash_file(path: &Path) -> io::Result<(Digest, u64)> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    Ok((hash_reader(&mut f)?, len))
}

impl BlobStore {
    pub fn open(root: &Path) -> Result<BlobStore, BlobError> {
        fs::create_dir_all(root.join("sha256"))?;
        fs::create_dir_all(root.join("tmp"))?;
        Ok(BlobStore {
            root: root.to_path_buf(),
            verified: Mutex::new(HashMap::new()),
            writers: Arc::default(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root.join("sha256").join(d.hex())
    }

    fn partial_path(&self, d: &Digest) -> PathBuf {
        self.root.join("tmp").join(format!("{}.partial", d.hex()))
    }

    fn remember(&self, d: &Digest, s: Stamp) {
        if let Ok(mut v) = self.verified.lock() {
            v.insert(d.clone(), s);
        }
    }

    fn forget(&self, d: &Digest) {
        if let Ok(mut v) = self.verified.lock() {
            v.remove(d);
        }
    }

    fn is_verified(&self, d: &Digest, s: &Stamp) -> bool {
        self.verified
            .lock()
            .map(|v| v.get(d) == Some(s))
            .unwrap_or(false)
    }

    /// Size of a stored blob (not re-verified).
    pub fn size(&self, d: &Digest) -> Option<u64> {
        fs::metadata(self.blob_path(d))
            .ok()
            .filter(|m| m.is_file())
            .map(|m| m.len())
    }

    pub fn contains(&self, d: &Digest) -> bool {
        self.size(d).is_some()
    }

    /// Bytes of an interrupted transfer kept for a resume.
    pub fn partial_len(&self, d: &Digest) -> u64 {
        fs::metadata(self.partial_path(d))
            .map(|m| m.len())
            .unwrap_or(0)
    }

    /// Open a blob for reading, hashing it first unless this very file
    /// content was verified before. Corrupt content is removed.
    pub fn open_verified(&self, d: &Digest) -> Result<(File, u64), BlobError> {
        let path = self.blob_path(d);
        let mut f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(BlobError::NotFound(d.clone()))
            }
            Err(e) => return Err(e.into()),
        };
        let meta = f.metadata()?;
        let stamp = Stamp::of(&meta);
        if !self.is_verified(d, &stamp) {
            let actual = hash_reader(&mut f)?;
            if &actual != d {
                self.quarantine(d, &stamp);
                return Err(BlobError::Corrupt {
                    digest: d.clone(),
                    actual,
                });
            }
            // Record the identity as it was before hashing (a write during
            // the hash changes it, and the next read hashes again).
            self.remember(d, stamp);
            f.seek(SeekFrom::Start(0))?;
        }
        Ok((f, meta.len()))
    }

    /// Verify a blob (see [`open_verified`](Self::open_verified)); its size.
    pub fn verify(&self, d: &Digest) -> Result<u64, BlobError> {
        self.open_verified(d).map(|(_, len)| len)
    }

    /// Remove a corrupt blob, unless it was replaced meanwhile.
    fn quarantine(&self, d: &Digest, seen: &Stamp) {
        self.forget(d);
        let path = self.blob_path(d);
        if fs::metadata(&path).map(|m| m.ino()).ok() == Some(seen.ino) {
            let _ = fs::remove_file(&path);
        }
    }

    /// Re-hash every stored blob, ignoring recorded identities; corrupt ones
    /// are removed. Returns the corrupt digests.
    pub fn scrub(&self) -> Vec<Digest> {
        let mut bad = Vec::new();
        for (d, _) in self.list() {
            if let Ok(mut v) = self.verified.lock() {
                v.remove(&d);
            }
            if let Err(BlobError::Corrupt { .. }) = self.verify(&d) {
                bad.push(d);
            }
        }
        bad
    }

    /// Exclusive writer of `d`'s partial file; `Busy` if another transfer
    /// of the same digest runs.
    pub fn lock_writer(&self, d: &Digest) -> Result<WriterGuard, BlobError> {
        let mut w = self
            .writers
            .lock()
            .map_err(|_| io::Error::other("writer table poisoned"))?;
        if !w.insert(d.clone()) {
            return Err(BlobError::Busy(d.clone()));
        }
        Ok(WriterGuard {
            digest: d.clone(),
            writers: self.writers.clone(),
        })
    }

    /// Open (or resume) the partial file of `d`. The prefix already held is
    /// hashed here, so [`PartialWriter::finish`] verifies the whole content.
    pub fn begin(&self, guard: WriterGuard) -> Result<PartialWriter, BlobError> {
        let d = guard.digest.clone();
        let path = self.partial_path(&d);
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)?;
        let mut hasher = Sha256::new();
        let mut len = 0u64;
        let mut buf = vec![0u8; 256 * 1024];
        file.seek(SeekFrom::Start(0))?;
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            len += n as u64;
        }
        Ok(PartialWriter {
            digest: d,
            file,
            hasher,
            len,
            path,
            _guard: guard,
        })
    }

    /// A writer for content of unknown digest, at most `limit` bytes.
    pub fn import_writer(&self, limit: u64) -> Result<ImportWriter, BlobError> {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = self
            .root
            .join("tmp")
            .join(format!("import-{}-{n}.partial", std::process::id()));
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&path)?;
        Ok(ImportWriter {
            file: Some(file),
            hasher: Sha256::new(),
            len: 0,
            limit,
            path,
        })
    }

    /// Drop an interrupted transfer's bytes.
    pub fn discard_partial(&self, d: &Digest) {
        let _ = fs::remove_file(self.partial_path(d));
    }

    /// Store `data` as a blob (small blobs, tests).
    pub fn put_bytes(&self, data: &[u8]) -> Result<Digest, BlobError> {
        let mut h = Sha256::new();
        h.update(data);
        let d = Digest::from_hash(h);
        if self.contains(&d) {
            return Ok(d);
        }
        let g = self.lock_writer(&d)?;
        self.discard_partial(&d);
        let mut w = self.begin(g)?;
        w.write_at(0, data)?;
        w.finish(self)?;
        Ok(d)
    }

    pub fn remove(&self, d: &Digest) -> io::Result<()> {
        self.forget(d);
        match fs::remove_file(self.blob_path(d)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every stored blob with its size.
    pub fn list(&self) -> Vec<(Digest, u64)> {
        let Ok(rd) = fs::read_dir(self.root.join("sha256")) else {
            return Vec::new();
        };
        rd.filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let d: Digest = format!("sha256:{name}").parse().ok()?;
                let m = e.metadata().ok()?;
                m.is_file().then_some((d, m.len()))
            })
            .collect()
    }

    pub fn total_bytes(&self) -> u64 {
        self.list().iter().map(|(_, n)| n).sum()
    }

    /// Remove partial files untouched for `older_than` (abandoned transfers)
    /// unless a transfer of that digest is running. Returns how many.
    pub fn clean_partials(&self, older_than: Duration) -> usize {
        let Ok(rd) = fs::read_dir(self.root.join("tmp")) else {
            return 0;
        };
        let now = SystemTime::now();
        let busy: HashSet<Digest> = self.writers.lock().map(|w| w.clone()).unwrap_or_default();
        let mut n = 0;
        for e in rd.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().to_string();
            let active = name
                .strip_suffix(".partial")
                .and_then(|h| format!("sha256:{h}").parse::<Digest>().ok())
                .is_some_and(|d| busy.contains(&d));
            if active {
                continue;
            }
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age >= older_than);
            if old && fs::remove_file(e.path()).is_ok() {
                n += 1;
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_syntax() {
        let h = "a".repeat(64);
        let d: Digest = format!("sha256:{h}").parse().unwrap();
        assert_eq!(d.to_string(), format!("sha256:{h}"));
        for bad in [
            "sha256:".to_string(),
            format!("sha256:{}", "A".repeat(64)),
            format!("md5:{h}"),
            format!("sha256:{}", "a".repeat(63)),
            format!("sha256:../{}", "a".repeat(61)),
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad}");
        }
    }

    #[test]
    fn write_resume_verify_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let s = BlobStore::open(dir.path()).unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let d = {
            let mut h = Sha256::new();
            h.update(&data);
            Digest::from_hash(h)
        };
        // An interrupted transfer, then a resume from where it stopped.
        {
            let mut w = s.begin(s.lock_writer(&d).unwrap()).unwrap();
            w.write_at(0, &data[..100_000]).unwrap();
            assert!(matches!(s.lock_writer(&d), Err(BlobError::Busy(_))));
        }
        assert_eq!(s.partial_len(&d), 100_000);
        let mut w = s.begin(s.lock_writer(&d).unwrap()).unwrap();
        assert_eq!(w.len(), 100_000);
        assert!(matches!(
            w.write_at(5, b"x"),
            Err(BlobError::Offset { have: 100_000, .. })
        ));
        w.write_at(100_000, &data[100_000..]).unwrap();
        assert_eq!(w.finish(&s).unwrap(), 300_000);
        assert_eq!(s.partial_len(&d), 0);
        assert_eq!(s.verify(&d).unwrap(), 300_000);
        assert_eq!(s.list(), vec![(d.clone(), 300_000)]);

        // Wrong content under a name: refused and discarded.
        let other: Digest = format!("sha256:{}", "b".repeat(64)).parse().unwrap();
        let mut w = s.begin(s.lock_writer(&other).unwrap()).unwrap();
        w.write_at(0, b"hello").unwrap();
        assert!(matches!(w.finish(&s), Err(BlobError::Mismatch { .. })));
        assert_eq!(s.partial_len(&other), 0);
        assert!(!s.contains(&other));

        // Corrupt on disk: detected on the next read and removed.
        let p = s.blob_path(&d);
        let mut f = OpenOptions::new().write(true).open(&p).unwrap();
        f.seek(SeekFrom::Start(10)).unwrap();
        f.write_all(b"XX").unwrap();
        drop(f);
        assert!(matches!(
            s.open_verified(&d),
            Err(BlobError::Corrupt { .. })
        ));
        assert!(!s.contains(&d));

        // Scrub finds corruption that kept the timestamps too.
        let d2 = s.put_bytes(&data).unwrap();
        assert_eq!(d2, d);
        s.verify(&d).unwrap();
        let before = fs::metadata(s.blob_path(&d)).unwrap().modified().unwrap();
        let mut f = OpenOptions::new()
            .write(true)
            .open(s.blob_path(&d))
            .unwrap();
        f.write_all(b"YY").unwrap();
        f.set_modified(before).unwrap();
        drop(f);
        assert_eq!(s.scrub(), vec![d.clone()]);
        assert!(!s.contains(&d));
    }

    #[test]
    fn abandoned_partials_expire() {
        let dir = tempfile::tempdir().unwrap();
        let s = BlobStore::open(dir.path()).unwrap();
        let d: Digest = format!("sha256:{}", "c".repeat(64)).parse().unwrap();
        let mut w = s.begin(s.lock_writer(&d).unwrap()).unwrap();
        w.write_at(0, b"abc").unwrap();
        assert_eq!(s.clean_partials(Duration::ZERO), 0, "active transfer kept");
        drop(w);
        assert_eq!(s.clean_partials(Duration::from_secs(3600)), 0);
        assert_eq!(s.clean_partials(Duration::ZERO), 1);
        assert_eq!(s.partial_len(&d), 0);
    }
}
