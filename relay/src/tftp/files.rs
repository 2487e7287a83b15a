//! What a file name means: a sanitized path under the boot directory, or a
//! file rendered per host (`pxelinux.cfg/01-<mac>`, `<mac>.ipxe`); and the
//! block reader that streams either one (with netascii conversion if asked).

use std::io;
use std::path::{Path, PathBuf};

use pxemesh_coordinator::model::Mac;
use tokio::io::{AsyncReadExt, BufReader};

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// ERROR 2: the name tries to leave the boot directory (or cannot be read).
    AccessViolation(String),
    /// ERROR 1, with the text sent to the client.
    NotFound(String),
}

pub use crate::files::sanitize;

/// A name served from the rack state instead of the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rendered {
    /// `pxelinux.cfg/01-aa-bb-cc-dd-ee-ff`
    Pxelinux(Mac),
    /// `aa:bb:cc:dd:ee:ff.ipxe` (or with dashes)
    Ipxe(Mac),
}

impl Rendered {
    pub fn mac(&self) -> Mac {
        match self {
            Rendered::Pxelinux(m) | Rendered::Ipxe(m) => *m,
        }
    }
}

/// Recognize a rendered name (`rel` as returned by [`sanitize`]).
pub fn rendered(rel: &str) -> Option<Rendered> {
    if let Some(mac) = crate::boot::mac_from_pxelinux_name(rel) {
        return mac.parse().ok().map(Rendered::Pxelinux);
    }
    let stem = rel.strip_suffix(".ipxe")?;
    if stem.len() != 17 || stem.contains('/') {
        return None;
    }
    stem.parse().ok().map(Rendered::Ipxe)
}

/// Open `rel` (sanitized) inside `root`. Symlinks are followed only while
/// they stay inside the root: the resolved path must start with the resolved
/// root. Returns the open file and its size.
pub async fn open_in_root(root: &Path, rel: &str) -> Result<(tokio::fs::File, u64), Refusal> {
    let root = tokio::fs::canonicalize(root)
        .await
        .map_err(|e| Refusal::NotFound(format!("boot directory unavailable: {e}")))?;
    let real: PathBuf = match tokio::fs::canonicalize(root.join(rel)).await {
        Ok(p) => p,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(Refusal::NotFound("file not found".into()))
        }
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            return Err(Refusal::AccessViolation("permission denied".into()))
        }
        // ENOTDIR (a file used as a directory), ELOOP, ...: nothing to serve.
        Err(_) => return Err(Refusal::NotFound("file not found".into())),
    };
    if !real.starts_with(&root) {
        return Err(Refusal::AccessViolation(
            "resolves outside the boot directory".into(),
        ));
    }
    // `real` has no symlinks left; O_NOFOLLOW refuses one swapped in since.
    let file = tokio::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&real)
        .await
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => Refusal::NotFound("file not found".into()),
            _ => Refusal::AccessViolation(format!("cannot open: {e}")),
        })?;
    let meta = file
        .metadata()
        .await
        .map_err(|e| Refusal::AccessViolation(format!("cannot stat: {e}")))?;
    if !meta.is_file() {
        return Err(Refusal::NotFound("not a regular file".into()));
    }
    Ok((file, meta.len()))
}

/// Convert to netascii (RFC 764): LF → CR LF, CR → CR NUL.
pub fn to_netascii(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 16);
    for &b in data {
        match b {
            b'\n' => out.extend_from_slice(b"\r\n"),
            b'\r' => out.extend_from_slice(b"\r\0"),
            b => out.push(b),
        }
    }
    out
}

enum Inner {
    File(BufReader<tokio::fs::File>),
    Memory { data: Vec<u8>, pos: usize },
}

/// Streams the content of a transfer block by block; a disk file is never
/// loaded whole.
pub struct Source {
    inner: Inner,
    /// Streaming netascii conversion of a disk file.
    netascii: Option<NetasciiState>,
}

struct NetasciiState {
    /// Second byte of an expansion that did not fit the previous block.
    pending: Option<u8>,
    raw: Vec<u8>,
    pos: usize,
    len: usize,
}

/// Read-ahead of a disk file: a few blocks per blocking-pool round trip.
const READ_BUFFER: usize = 32 * 1024;

impl Source {
    pub fn file(file: tokio::fs::File, netascii: bool) -> Source {
        Source {
            inner: Inner::File(BufReader::with_capacity(READ_BUFFER, file)),
            netascii: netascii.then(|| NetasciiState {
                pending: None,
                raw: vec![0; 4096],
                pos: 0,
                len: 0,
            }),
        }
    }

    /// In-memory content (already converted if the transfer is netascii).
    pub fn memory(data: Vec<u8>) -> Source {
        Source {
            inner: Inner::Memory { data, pos: 0 },
            netascii: None,
        }
    }

    async fn read_raw(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        read_raw(&mut self.inner, buf).await
    }

    /// Append the next block (up to `blksize` bytes) to `out`; fewer than
    /// `blksize` bytes means the end of the content.
    pub async fn read_block(&mut self, blksize: usize, out: &mut Vec<u8>) -> io::Result<usize> {
        let start = out.len();
        if self.netascii.is_none() {
            out.resize(start + blksize, 0);
            let mut filled = 0;
            while filled < blksize {
                match self.read_raw(&mut out[start + filled..]).await {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        out.truncate(start);
                        return Err(e);
                    }
                }
            }
            out.truncate(start + filled);
            return Ok(filled);
        }
        let Source { inner, netascii } = self;
        let Some(st) = netascii.as_mut() else {
            return Ok(0);
        };
        while out.len() - start < blksize {
            if let Some(p) = st.pending.take() {
                out.push(p);
                continue;
            }
            if st.pos == st.len {
                st.len = read_raw(inner, &mut st.raw).await?;
                st.pos = 0;
                if st.len == 0 {
                    break;
                }
            }
            let b = st.raw[st.pos];
            st.pos += 1;
            match b {
                b'\n' => {
                    out.push(b'\r');
                    st.pending = Some(b'\n');
                }
                b'\r' => {
                    out.push(b'\r');
                    st.pending = Some(0);
                }
                b => out.push(b),
            }
        }
        Ok(out.len() - start)
    }
}

async fn read_raw(inner: &mut Inner, buf: &mut [u8]) -> io::Result<usize> {
    match inner {
        Inner::File(f) => f.read(buf).await,
        Inner::Memory { data, pos } => {
            let n = buf.len().min(data.len() - *pos);
            buf[..n].copy_from_slice(&data[*pos..*pos + n]);
            *pos += n;
            Ok(n)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_accepts_normal_names() {
        assert_eq!(sanitize("pxelinux.0").unwrap(), "pxelinux.0");
        assert_eq!(sanitize("/pxelinux.0").unwrap(), "pxelinux.0");
        assert_eq!(
            sanitize("pxelinux.cfg//./default").unwrap(),
            "pxelinux.cfg/default"
        );
        assert_eq!(sanitize("centos/7/vmlinuz").unwrap(), "centos/7/vmlinuz");
        assert_eq!(sanitize("a..b/c..").unwrap(), "a..b/c..");
        // "/etc/passwd" is just "etc/passwd" inside the root.
        assert_eq!(sanitize("/etc/passwd").unwrap(), "etc/passwd");
    }

    #[test]
    fn sanitize_refuses_escapes() {
        for bad in [
            "../etc/passwd",
            "/../etc/passwd",
            "a/../../etc/passwd",
            "a/..",
            "..",
            "//etc/passwd",
            "a\\..\\b",
            "a\0b",
            "a\nb",
            "/",
            "",
            "./.",
        ] {
            assert!(sanitize(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn rendered_names() {
        let mac: Mac = "52:54:00:12:34:ab".parse().unwrap();
        assert_eq!(
            rendered("pxelinux.cfg/01-52-54-00-12-34-AB"),
            Some(Rendered::Pxelinux(mac))
        );
        assert_eq!(
            rendered("52:54:00:12:34:ab.ipxe"),
            Some(Rendered::Ipxe(mac))
        );
        assert_eq!(
            rendered("52-54-00-12-34-ab.ipxe"),
            Some(Rendered::Ipxe(mac))
        );
        assert_eq!(rendered("pxelinux.cfg/default"), None);
        assert_eq!(rendered("pxelinux.cfg/01-52-54-00-12-34-zz"), None);
        assert_eq!(rendered("boot.ipxe"), None);
        assert_eq!(rendered("x/52:54:00:12:34:ab.ipxe"), None);
        assert_eq!(rendered("52:54-00:12:34:ab.ipxe"), None);
    }

    /// A file outside any temp dir (/etc/hostname, as in the brief, if present).
    fn etc_file() -> &'static str {
        if Path::new("/etc/hostname").exists() {
            "/etc/hostname"
        } else {
            "/etc/passwd"
        }
    }

    #[tokio::test]
    async fn open_in_root_follows_only_inner_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/file"), b"abc").unwrap();
        std::os::unix::fs::symlink("sub/file", root.join("inner-link")).unwrap();
        std::os::unix::fs::symlink(etc_file(), root.join("escape")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("etcdir")).unwrap();
        std::os::unix::fs::symlink("nowhere", root.join("dangling")).unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"x").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), root.join("escape2")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("outdir")).unwrap();

        let (_, size) = open_in_root(root, "sub/file").await.unwrap();
        assert_eq!(size, 3);
        let (_, size) = open_in_root(root, "inner-link").await.unwrap();
        assert_eq!(size, 3);
        assert!(matches!(
            open_in_root(root, "escape").await,
            Err(Refusal::AccessViolation(_))
        ));
        assert!(matches!(
            open_in_root(root, "etcdir/passwd").await,
            Err(Refusal::AccessViolation(_))
        ));
        assert!(matches!(
            open_in_root(root, "dangling").await,
            Err(Refusal::NotFound(_))
        ));
        assert!(matches!(
            open_in_root(root, "missing").await,
            Err(Refusal::NotFound(_))
        ));
        assert!(matches!(
            open_in_root(root, "sub").await,
            Err(Refusal::NotFound(_))
        ));
        assert!(matches!(
            open_in_root(root, "sub/file/x").await,
            Err(Refusal::NotFound(_))
        ));
        // A root given through a symlink still works (prefix check on resolved paths).
        let alias = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(root, alias.path().join("root")).unwrap();
        assert!(open_in_root(&alias.path().join("root"), "sub/file")
            .await
            .is_ok());
    }

    async fn blocks(mut s: Source, blksize: usize) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for _ in 0..10_000 {
            let mut b = Vec::new();
            let n = s.read_block(blksize, &mut b).await.unwrap();
            assert_eq!(n, b.len());
            out.push(b);
            if n < blksize {
                return out;
            }
        }
        panic!("source never ended");
    }

    #[tokio::test]
    async fn blocks_of_file_and_memory() {
        let dir = tempfile::tempdir().unwrap();
        for len in [0usize, 1, 511, 512, 513, 1024, 5000] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let p = dir.path().join(format!("f{len}"));
            std::fs::write(&p, &data).unwrap();
            let f = tokio::fs::File::open(&p).await.unwrap();
            let from_file = blocks(Source::file(f, false), 512).await;
            let from_mem = blocks(Source::memory(data.clone()), 512).await;
            assert_eq!(from_file, from_mem);
            assert_eq!(from_file.len(), len / 512 + 1, "len {len}");
            assert_eq!(from_file.concat(), data);
        }
    }

    #[tokio::test]
    async fn netascii_streaming_matches_whole_conversion() {
        let dir = tempfile::tempdir().unwrap();
        // CR/LF at block boundaries (blksize 8) exercise the pending byte.
        let data = b"abcdefg\nabcdefg\r1234567\r\n\n\n\r\rend".repeat(50);
        let p = dir.path().join("t");
        std::fs::write(&p, &data).unwrap();
        let f = tokio::fs::File::open(&p).await.unwrap();
        let got = blocks(Source::file(f, true), 8).await;
        assert!(got[..got.len() - 1].iter().all(|b| b.len() == 8));
        assert_eq!(got.concat(), to_netascii(&data));
        assert_eq!(to_netascii(b"a\nb\rc"), b"a\r\nb\r\0c");
    }
}
