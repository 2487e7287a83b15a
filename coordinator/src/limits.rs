//! Resource limits of a coordinator: the `[limits]` configuration section,
//! the free-space guard in front of proposals, and the classification of
//! storage errors (disk full vs. anything else).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::CoordError;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Refuse new writes (RESOURCE_EXHAUSTED) while the data directory's
    /// file system has less than this many bytes available, so a filling disk
    /// is reported to clients before the log or sled hit ENOSPC.
    pub min_free_bytes: u64,
    /// Largest request message accepted by AdminService and RelayService.
    pub max_request_bytes: usize,
    /// Largest response message they send (a `List` of a whole large fleet).
    pub max_response_bytes: usize,
    /// HTTP/2 streams a single client connection may have open at once.
    pub max_streams_per_connection: u32,
    /// Requests of one connection handled concurrently; more wait (back-pressure).
    pub max_concurrent_requests_per_connection: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            min_free_bytes: 64 * 1024 * 1024,
            max_request_bytes: 16 * 1024 * 1024,
            max_response_bytes: 256 * 1024 * 1024,
            max_streams_per_connection: 256,
            max_concurrent_requests_per_connection: 128,
        }
    }
}

impl LimitsConfig {
    pub fn validate(&self) -> Result<(), CoordError> {
        let bad = |m: &str| Err(CoordError::Config(format!("limits: {m}")));
        if self.max_request_bytes < 64 * 1024 {
            return bad("max_request_bytes must be at least 65536");
        }
        if self.max_response_bytes < 64 * 1024 {
            return bad("max_response_bytes must be at least 65536");
        }
        if self.max_streams_per_connection == 0 || self.max_concurrent_requests_per_connection == 0
        {
            return bad("per-connection stream and request limits must be positive");
        }
        Ok(())
    }
}

/// Free space needed to open the stores at all. sled writes while it opens
/// (recovery, its own snapshot); opening it on a full disk left a corrupt
/// database that no longer opened once space returned (found by
/// `tests/diskfull.rs`). Below this the node refuses to start instead.
pub const STARTUP_MIN_FREE_BYTES: u64 = 16 * 1024 * 1024;

/// Refuse to open the stores in `dir` on a (nearly) full file system.
pub fn check_startup_space(dir: &Path) -> Result<(), CoordError> {
    match available_bytes(dir) {
        Ok(free) if free < STARTUP_MIN_FREE_BYTES => Err(CoordError::DiskFull(format!(
            "data directory {} has {free} bytes available; at least {STARTUP_MIN_FREE_BYTES} are needed to open the log and state safely (No space left on device); free space and start again",
            dir.display()
        ))),
        _ => Ok(()),
    }
}

/// Bytes available to an unprivileged writer on the file system holding `path`.
pub fn available_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in path"))?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated string and `st` a writable statvfs.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Checked before every proposal this node accepts.
#[derive(Debug, Clone)]
pub struct DiskGuard {
    dir: PathBuf,
    min_free: u64,
}

impl DiskGuard {
    pub fn new(dir: PathBuf, min_free: u64) -> DiskGuard {
        DiskGuard { dir, min_free }
    }

    pub fn check(&self) -> Result<(), CoordError> {
        if self.min_free == 0 {
            return Ok(());
        }
        match available_bytes(&self.dir) {
            Ok(free) if free < self.min_free => Err(CoordError::DiskFull(format!(
                "data directory {} has {free} bytes available, below limits.min_free_bytes = {}; writes are refused until space is freed (No space left on device)",
                self.dir.display(),
                self.min_free
            ))),
            // An unreadable statvfs must not block writes: the real write
            // reports a real error if the disk is the problem.
            _ => Ok(()),
        }
    }
}

const ENOSPC: i32 = 28;
const EDQUOT: i32 = 122;

/// Whether an I/O error means the file system is full (or over quota).
pub fn io_is_disk_full(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(ENOSPC) | Some(EDQUOT))
        || e.kind() == std::io::ErrorKind::StorageFull
        || e.to_string().contains("No space left on device")
}

/// Whether a storage error means the disk is full.
pub fn is_disk_full(e: &CoordError) -> bool {
    match e {
        CoordError::Io(io) => io_is_disk_full(io),
        CoordError::Storage(sled::Error::Io(io)) => io_is_disk_full(io),
        CoordError::DiskFull(_) => true,
        other => other.to_string().contains("No space left on device"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_enospc() {
        let e = CoordError::Io(std::io::Error::from_raw_os_error(ENOSPC));
        assert!(is_disk_full(&e));
        let e = CoordError::Storage(sled::Error::Io(std::io::Error::from_raw_os_error(ENOSPC)));
        assert!(is_disk_full(&e));
        let e = CoordError::Io(std::io::Error::from_raw_os_error(5));
        assert!(!is_disk_full(&e));
    }

    #[test]
    fn guard_reports_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert!(available_bytes(dir.path()).unwrap() > 0);
        DiskGuard::new(dir.path().into(), 1).check().unwrap();
        DiskGuard::new(dir.path().into(), 0).check().unwrap();
        let err = DiskGuard::new(dir.path().into(), u64::MAX)
            .check()
            .unwrap_err();
        assert!(matches!(err, CoordError::DiskFull(_)));
        assert!(err.to_string().contains(&dir.path().display().to_string()));
    }
}
