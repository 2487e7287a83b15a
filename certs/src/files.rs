//! File helpers shared by the CA, leaf and TLS code.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::CertError;

pub(crate) const KEY_MODE: u32 = 0o600;
pub(crate) const CERT_MODE: u32 = 0o644;

fn io_err(action: &'static str, path: &Path, error: std::io::Error) -> CertError {
    CertError::Io {
        action,
        path: path.to_path_buf(),
        error,
    }
}

pub(crate) fn read_to_string(path: &Path) -> Result<String, CertError> {
    fs::read_to_string(path).map_err(|e| io_err("read", path, e))
}

pub(crate) fn create_dir_all(dir: &Path) -> Result<(), CertError> {
    fs::create_dir_all(dir).map_err(|e| io_err("create directory", dir, e))
}

/// Writes `contents` to a file that did not exist before, created with `mode` so a key
/// is never readable by others, not even for the instant a later chmod would take.
pub(crate) fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), CertError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| io_err("create", path, e))?;
    f.write_all(contents)
        .and_then(|()| f.sync_all())
        .map_err(|e| io_err("write", path, e))
}

/// Replaces `path` atomically: a reloader polling the directory sees either the old or
/// the new file, never a half-written one; and the new file gets `mode` even when the
/// old file had looser permissions.
pub(crate) fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), CertError> {
    let name = path
        .file_name()
        .ok_or_else(|| io_err("write", path, std::io::ErrorKind::InvalidInput.into()))?
        .to_string_lossy()
        .into_owned();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let tmp = path.with_file_name(format!(".{name}.tmp-{}-{nanos}", std::process::id()));
    let result = write_new(&tmp, contents, mode).and_then(|()| {
        fs::rename(&tmp, path).map_err(|e| io_err("rename temporary file onto", path, e))
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Refuses private keys that group or others may read: ssh-style, because a CA key
/// copied with loose permissions is a silent compromise.
pub(crate) fn check_key_mode(path: &Path) -> Result<(), CertError> {
    let meta = fs::metadata(path).map_err(|e| io_err("stat", path, e))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(CertError::InsecureKey {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

pub(crate) fn parse_certs_pem(
    pem: &str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Pem {
            path: path.to_path_buf(),
            reason: format!("malformed PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(CertError::Pem {
            path: path.to_path_buf(),
            reason: "no CERTIFICATE block found".into(),
        });
    }
    Ok(certs)
}

pub(crate) fn read_certs_pem(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    parse_certs_pem(&read_to_string(path)?, path)
}

pub(crate) fn read_key_pem(path: &Path) -> Result<PrivateKeyDer<'static>, CertError> {
    let pem = read_to_string(path)?;
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| CertError::Pem {
        path: path.to_path_buf(),
        reason: match e {
            rustls_pki_types::pem::Error::NoItemsFound => "no PRIVATE KEY block found".into(),
            e => format!("malformed private key PEM: {e}"),
        },
    })
}
