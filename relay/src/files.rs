//! Resolving client-supplied paths inside the boot directory. Shared by every
//! service that serves files, so the traversal rules exist once.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("access violation: {0}")]
    Forbidden(String),
    #[error("file not found: {0}")]
    NotFound(String),
}

/// Check a requested name and normalize it to `a/b/c` relative to the boot
/// directory. One leading `/` is accepted (many PXE configs ask for
/// `/pxelinux.0`); empty and `.` components are dropped. Refused: `..`, NUL,
/// backslashes, control characters, a name that stays absolute after the
/// strip, and a name that is empty after normalization. TFTP and HTTP both
/// use this, so the rules exist once.
pub fn sanitize(name: &str) -> Result<String, String> {
    if name.contains('\0') {
        return Err("NUL in file name".into());
    }
    if name.contains('\\') {
        return Err("backslash in file name".into());
    }
    if name.chars().any(|c| c.is_control()) {
        return Err("control character in file name".into());
    }
    let rest = name.strip_prefix('/').unwrap_or(name);
    if rest.starts_with('/') {
        return Err("absolute path".into());
    }
    let mut parts = Vec::new();
    for c in rest.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err("'..' in file name".into()),
            c => parts.push(c),
        }
    }
    if parts.is_empty() {
        return Err("no file name".into());
    }
    Ok(parts.join("/"))
}

/// Map `requested` to a regular file inside `root` ([`sanitize`]d, and
/// symlinks followed only while they resolve inside the root).
pub fn resolve(root: &Path, requested: &str) -> Result<PathBuf, PathError> {
    let rel = sanitize(requested).map_err(|_| PathError::Forbidden(requested.to_string()))?;
    let root = root
        .canonicalize()
        .map_err(|_| PathError::NotFound(requested.to_string()))?;
    let full = root
        .join(rel)
        .canonicalize()
        .map_err(|_| PathError::NotFound(requested.to_string()))?;
    if !full.starts_with(&root) {
        return Err(PathError::Forbidden(requested.to_string()));
    }
    if !full.is_file() {
        return Err(PathError::NotFound(requested.to_string()));
    }
    Ok(full)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traversal_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/a.bin"), b"x").unwrap();
        std::os::unix::fs::symlink("/etc/hostname", dir.path().join("escape")).unwrap();
        std::os::unix::fs::symlink("sub/a.bin", dir.path().join("inside")).unwrap();
        let r = dir.path();
        assert!(resolve(r, "sub/a.bin").is_ok());
        assert!(resolve(r, "/sub/a.bin").is_ok());
        assert!(resolve(r, "inside").is_ok());
        for bad in [
            "../etc/passwd",
            "sub/../../etc/passwd",
            "//etc/passwd",
            "escape",
            "sub\\a.bin",
            "a\0b",
            "",
        ] {
            assert!(
                matches!(resolve(r, bad), Err(PathError::Forbidden(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(resolve(r, "missing"), Err(PathError::NotFound(_))));
        assert!(matches!(resolve(r, "sub"), Err(PathError::NotFound(_))));
    }
}
