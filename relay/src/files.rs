//! Resolving client-supplied paths inside the boot directory. Shared by every
//! service that serves files, so the traversal rules exist once.

use std::path::{Component, Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("access violation: {0}")]
    Forbidden(String),
    #[error("file not found: {0}")]
    NotFound(String),
}

/// Map `requested` (relative; one leading '/' tolerated, as PXE configs often
/// ask for "/pxelinux.0") to a regular file inside `root`. Refuses `..`,
/// absolute paths after that, NUL, backslashes, and symlinks that resolve
/// outside the root.
pub fn resolve(root: &Path, requested: &str) -> Result<PathBuf, PathError> {
    let rel = requested.strip_prefix('/').unwrap_or(requested);
    if rel.is_empty() || rel.contains('\0') || rel.contains('\\') {
        return Err(PathError::Forbidden(requested.to_string()));
    }
    let rel_path = Path::new(rel);
    if !rel_path
        .components()
        .all(|c| matches!(c, Component::Normal(_)))
    {
        return Err(PathError::Forbidden(requested.to_string()));
    }
    let root = root
        .canonicalize()
        .map_err(|_| PathError::NotFound(requested.to_string()))?;
    let full = root
        .join(rel_path)
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
