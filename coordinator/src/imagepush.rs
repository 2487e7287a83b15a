//! Client side of `pxemeshctl image push`: hash the files of a directory (or
//! one file), upload the blobs the coordinator lacks with
//! `AdminService/PushBlob` (resuming at its `partial_offset` after an
//! interruption), then commit the manifest with `AdminService/Put`. All calls
//! go to one coordinator, which refuses the manifest unless it holds every
//! blob verified.

use std::path::{Path, PathBuf};
use std::time::Duration;

use pxemesh_proto::v1 as pb;
use pxemesh_proto::v1::admin_service_client::AdminServiceClient;
use tokio::io::AsyncReadExt;
use tonic::transport::Channel;

use crate::blobs::{hash_file, Digest};

/// Bytes per upload message (the server accepts up to 1 MiB).
pub const PUSH_CHUNK: usize = 256 * 1024;
/// Attempts per blob (each resumes where the previous one stopped).
pub const PUSH_ATTEMPTS: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("{}", crate::client::error_chain(.0))]
    Status(#[from] tonic::Status),
}

/// One file of the image to push.
#[derive(Debug, Clone)]
pub struct LocalFile {
    pub path: String,
    pub source: PathBuf,
    pub digest: Digest,
    pub size: u64,
    pub mode: u32,
}

/// The regular files under `root` (or `root` itself when it is a file), with
/// their paths relative to it, hashed. Symlinks and special files are refused.
pub fn scan(root: &Path) -> Result<Vec<LocalFile>, PushError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |p: &Path| {
        let p = p.display().to_string();
        move |source| PushError::Io { path: p, source }
    };
    let meta = std::fs::symlink_metadata(root).map_err(io(root))?;
    let mut files = Vec::new();
    if meta.is_file() {
        let name = root
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .ok_or_else(|| PushError::Invalid(format!("{}: no file name", root.display())))?;
        files.push((name, root.to_path_buf(), meta));
    } else if meta.is_dir() {
        let mut stack = vec![(root.to_path_buf(), String::new())];
        while let Some((dir, prefix)) = stack.pop() {
            let mut entries: Vec<_> = std::fs::read_dir(&dir)
                .map_err(io(&dir))?
                .collect::<Result<_, _>>()
                .map_err(io(&dir))?;
            entries.sort_by_key(|e| e.file_name());
            for e in entries {
                let name = e.file_name().into_string().map_err(|n| {
                    PushError::Invalid(format!("{}: file name is not UTF-8: {n:?}", dir.display()))
                })?;
                let rel = if prefix.is_empty() {
                    name
                } else {
                    format!("{prefix}/{name}")
                };
                let m = std::fs::symlink_metadata(e.path()).map_err(io(&e.path()))?;
                if m.is_dir() {
                    stack.push((e.path(), rel));
                } else if m.is_file() {
                    files.push((rel, e.path(), m));
                } else {
                    return Err(PushError::Invalid(format!(
                        "{}: only regular files and directories can be pushed",
                        e.path().display()
                    )));
                }
            }
        }
    } else {
        return Err(PushError::Invalid(format!(
            "{}: not a file or directory",
            root.display()
        )));
    }
    if files.is_empty() {
        return Err(PushError::Invalid(format!(
            "{}: no files to push",
            root.display()
        )));
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    files
        .into_iter()
        .map(|(path, source, m)| {
            let (digest, size) = hash_file(&source).map_err(io(&source))?;
            Ok(LocalFile {
                path,
                source,
                digest,
                size,
                mode: m.permissions().mode() & 0o7777,
            })
        })
        .collect()
}

/// Upload one blob unless the coordinator holds it; resumes interrupted
/// uploads. Returns the bytes sent.
pub async fn push_blob(
    client: &mut AdminServiceClient<Channel>,
    file: &LocalFile,
) -> Result<u64, PushError> {
    let mut sent = 0;
    let mut last_err = None;
    for attempt in 0..PUSH_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
        }
        let st = client
            .stat_blob(pb::StatBlobRequest {
                digest: file.digest.to_string(),
            })
            .await?
            .into_inner();
        if st.present {
            return Ok(sent);
        }
        let offset = st.partial_offset.min(file.size);
        let mut f = tokio::fs::File::open(&file.source)
            .await
            .map_err(|source| PushError::Io {
                path: file.source.display().to_string(),
                source,
            })?;
        use tokio::io::AsyncSeekExt;
        f.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(|source| PushError::Io {
                path: file.source.display().to_string(),
                source,
            })?;
        let digest = file.digest.to_string();
        let size = file.size;
        let src = file.source.display().to_string();
        let (tx, rx) = tokio::sync::mpsc::channel::<pb::BlobUpload>(4);
        let reader = tokio::spawn(async move {
            let mut off = offset;
            let mut first = true;
            loop {
                let mut buf = vec![0u8; PUSH_CHUNK];
                let mut n = 0;
                while n < buf.len() {
                    let r = f.read(&mut buf[n..]).await?;
                    if r == 0 {
                        break;
                    }
                    n += r;
                }
                if n == 0 && !first {
                    return Ok::<u64, std::io::Error>(off - offset);
                }
                buf.truncate(n);
                let msg = pb::BlobUpload {
                    digest: if first { digest.clone() } else { String::new() },
                    size: if first { size } else { 0 },
                    offset: off,
                    data: buf,
                };
                first = false;
                off += n as u64;
                if tx.send(msg).await.is_err() || n == 0 {
                    return Ok(off - offset);
                }
            }
        });
        let res = client
            .push_blob(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await;
        let read = reader
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        sent += *read.as_ref().unwrap_or(&0);
        if let Err(e) = read {
            return Err(PushError::Io {
                path: src,
                source: e,
            });
        }
        match res {
            Ok(r) if r.get_ref().stored => return Ok(sent),
            Ok(r) => {
                last_err = Some(PushError::Invalid(format!(
                    "{}: upload stopped at {} of {} bytes",
                    file.path,
                    r.get_ref().received_offset,
                    size
                )))
            }
            // Another upload of the same blob, or a stale offset: look again.
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::Aborted
                        | tonic::Code::FailedPrecondition
                        | tonic::Code::Unavailable
                        | tonic::Code::Unknown
                        | tonic::Code::Internal
                ) =>
            {
                last_err = Some(s.into())
            }
            Err(s) => return Err(s.into()),
        }
    }
    Err(last_err.unwrap_or_else(|| PushError::Invalid("upload failed".into())))
}

/// Push `root` as image `name`; returns the coordinator's answer to the
/// manifest write and the bytes uploaded.
pub async fn push_image(
    client: &mut AdminServiceClient<Channel>,
    root: &Path,
    name: &str,
) -> Result<(pb::PutResponse, u64), PushError> {
    let r = root.to_path_buf();
    let files = tokio::task::spawn_blocking(move || scan(&r))
        .await
        .map_err(|e| PushError::Invalid(e.to_string()))??;
    let mut uploaded = 0;
    let mut done = std::collections::HashSet::new();
    for f in &files {
        if done.insert(f.digest.clone()) {
            uploaded += push_blob(client, f).await?;
        }
    }
    let manifest = pb::ImageManifest {
        name: name.to_string(),
        files: files
            .iter()
            .map(|f| pb::ImageFile {
                path: f.path.clone(),
                digest: f.digest.to_string(),
                size: f.size,
                mode: f.mode,
            })
            .collect(),
        create_revision: 0,
        revision: 0,
    };
    let resp = client
        .put(pb::PutRequest {
            object: Some(pb::Object {
                record: Some(pb::object::Record::Image(manifest)),
            }),
        })
        .await?
        .into_inner();
    Ok((resp, uploaded))
}
