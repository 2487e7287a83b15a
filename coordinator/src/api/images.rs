//! Image-store RPCs: `AdminService/StatBlob`, `AdminService/PushBlob` (the
//! upload, client-streaming) and `RelayService/FetchBlob` (the download
//! relays and peer coordinators use), plus the check that keeps a manifest
//! out of the log until this node holds every blob it names.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use pxemesh_proto::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};
use tracing::{debug, info, warn};

use crate::blobs::{BlobError, BlobStore, Digest};
use crate::error::CoordError;
use crate::images::missing_blobs;
use crate::metrics::Metrics;
use crate::model::Record;

/// Largest `data` in one upload message.
pub const MAX_UPLOAD_CHUNK: usize = 1024 * 1024;
/// Size of the chunks FetchBlob sends.
pub const FETCH_CHUNK: usize = 256 * 1024;

pub type BlobStream = Pin<Box<dyn Stream<Item = Result<pb::BlobChunk, Status>> + Send + 'static>>;

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BlobError> + Send + 'static,
) -> Result<T, CoordError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(CoordError::from),
        Err(e) => Err(CoordError::Io(std::io::Error::other(e))),
    }
}

pub async fn stat(
    store: &Arc<BlobStore>,
    req: pb::StatBlobRequest,
) -> Result<pb::StatBlobResponse, CoordError> {
    let d: Digest = req.digest.parse()?;
    let s = store.clone();
    let d2 = d.clone();
    match blocking(move || s.verify(&d2)).await {
        Ok(size) => Ok(pb::StatBlobResponse {
            present: true,
            size,
            partial_offset: 0,
        }),
        Err(CoordError::Blob(BlobError::NotFound(_) | BlobError::Corrupt { .. })) => {
            Ok(pb::StatBlobResponse {
                present: false,
                size: 0,
                partial_offset: store.partial_len(&d),
            })
        }
        Err(e) => Err(e),
    }
}

/// Receive one blob. The partial file is kept when the stream breaks off, so
/// the client can resume at `StatBlob.partial_offset`.
pub async fn push(
    store: &Arc<BlobStore>,
    metrics: &Arc<Metrics>,
    mut stream: Streaming<pb::BlobUpload>,
) -> Result<pb::PushBlobResponse, CoordError> {
    let Some(first) = stream.message().await.map_err(status_io)? else {
        return Err(CoordError::invalid("empty upload"));
    };
    let d: Digest = first.digest.parse()?;
    let size = first.size;
    if store.contains(&d) {
        let s = store.clone();
        let d2 = d.clone();
        if let Ok(n) = blocking(move || s.verify(&d2)).await {
            return Ok(pb::PushBlobResponse {
                digest: d.to_string(),
                size: n,
                stored: true,
                received_offset: n,
            });
        }
    }
    let guard = store.lock_writer(&d)?;
    let s = store.clone();
    let mut writer = blocking(move || s.begin(guard)).await?;
    let mut msg = Some(first);
    while let Some(m) = msg.take() {
        if (!m.digest.is_empty() && m.digest != d.to_string()) || (m.size != 0 && m.size != size) {
            return Err(CoordError::invalid(
                "digest and size must stay the same within one upload",
            ));
        }
        if m.data.len() > MAX_UPLOAD_CHUNK {
            return Err(CoordError::invalid(format!(
                "upload chunks are at most {MAX_UPLOAD_CHUNK} bytes"
            )));
        }
        let end = m.offset + m.data.len() as u64;
        if end > size {
            return Err(BlobError::TooLong {
                digest: d.clone(),
                got: end,
                size,
            }
            .into());
        }
        let n = m.data.len() as u64;
        writer = blocking(move || {
            writer.write_at(m.offset, &m.data)?;
            Ok(writer)
        })
        .await?;
        metrics.images.pushed_bytes.inc_by(n);
        msg = match stream.message().await {
            Ok(m) => m,
            Err(e) => {
                debug!(digest = %d, held = writer.len(), error = %e, "upload interrupted; partial kept for a resume");
                None
            }
        };
    }
    let held = writer.len();
    if held < size {
        info!(digest = %d, held, size, "upload ended early; partial kept for a resume");
        return Ok(pb::PushBlobResponse {
            digest: d.to_string(),
            size,
            stored: false,
            received_offset: held,
        });
    }
    let s = store.clone();
    let n = blocking(move || writer.finish(&s)).await?;
    metrics.images.pushed.inc();
    info!(digest = %d, bytes = n, "blob uploaded and verified");
    Ok(pb::PushBlobResponse {
        digest: d.to_string(),
        size: n,
        stored: true,
        received_offset: n,
    })
}

fn status_io(s: Status) -> CoordError {
    CoordError::Invalid(format!("upload stream: {}", s.message()))
}

/// Stream a stored, verified blob from `offset` in [`FETCH_CHUNK`] pieces.
pub async fn fetch(
    store: &Arc<BlobStore>,
    metrics: &Arc<Metrics>,
    req: pb::FetchBlobRequest,
    who: String,
) -> Result<BlobStream, CoordError> {
    let d: Digest = req.digest.parse()?;
    let s = store.clone();
    let d2 = d.clone();
    let opened = blocking(move || s.open_verified(&d2)).await;
    let (file, len) = match opened {
        Ok(x) => x,
        Err(CoordError::Blob(e @ BlobError::Corrupt { .. })) => {
            metrics.images.corrupt.inc();
            warn!(digest = %d, error = %e, "blob corrupt on disk; removed (replication fetches it again)");
            return Err(BlobError::NotFound(d).into());
        }
        Err(e) => return Err(e),
    };
    if req.offset > len {
        return Err(CoordError::invalid(format!(
            "offset {} is beyond the blob's {len} bytes",
            req.offset
        )));
    }
    debug!(digest = %d, offset = req.offset, len, peer = %who, "serving blob");
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let metrics = metrics.clone();
    tokio::spawn(async move {
        let mut f = tokio::fs::File::from_std(file);
        let mut offset = req.offset;
        if let Err(e) = f.seek(std::io::SeekFrom::Start(offset)).await {
            let _ = tx.send(Err(Status::internal(e.to_string()))).await;
            return;
        }
        if len == 0 {
            let _ = tx
                .send(Ok(pb::BlobChunk {
                    offset: 0,
                    data: Vec::new(),
                    total_size: 0,
                }))
                .await;
            return;
        }
        while offset < len {
            let want = FETCH_CHUNK.min((len - offset) as usize);
            let mut buf = vec![0u8; want];
            if let Err(e) = f.read_exact(&mut buf).await {
                let _ = tx
                    .send(Err(Status::internal(format!("reading blob {d}: {e}"))))
                    .await;
                return;
            }
            metrics.images.served_bytes.inc_by(want as u64);
            let chunk = pb::BlobChunk {
                offset,
                data: buf,
                total_size: len,
            };
            offset += want as u64;
            if tx.send(Ok(chunk)).await.is_err() {
                return;
            }
        }
    });
    Ok(Box::pin(ReceiverStream::new(rx)))
}

/// Refuse image manifests naming blobs this node does not hold verified (or
/// with another size): a manifest is committed only after its blobs are stored.
pub async fn check_manifests(store: &Arc<BlobStore>, records: &[Record]) -> Result<(), CoordError> {
    for rec in records {
        let Record::Image(img) = rec else { continue };
        let files: Vec<(String, u64)> = img
            .files
            .iter()
            .map(|f| (f.digest.clone(), f.size))
            .collect();
        let s = store.clone();
        let missing =
            blocking(move || missing_blobs(&s, files.iter().map(|(d, n)| (d.as_str(), *n))))
                .await?;
        if !missing.is_empty() {
            return Err(CoordError::State(crate::error::StateError::InUse(format!(
                "image {}: {} blob(s) are not stored on this coordinator (push them first): {}",
                img.name,
                missing.len(),
                missing
                    .iter()
                    .take(5)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ))));
        }
    }
    Ok(())
}

/// Largest file `ImportImage` downloads (kernels, initrds, squashfs images).
pub const MAX_IMPORT_BYTES: u64 = 16 << 30;
/// A download that delivers no byte for this long is abandoned.
const IMPORT_IDLE: std::time::Duration = std::time::Duration::from_secs(60);

/// The files of an `ImportImage` request, checked: URL scheme, and a safe
/// relative path inside the image (defaulting to the URL's last segment).
pub fn import_plan(
    req: &pb::ImportImageRequest,
) -> Result<Vec<(reqwest::Url, String, u32)>, CoordError> {
    if req.files.is_empty() {
        return Err(CoordError::invalid("import needs at least one URL"));
    }
    if req.files.len() > 64 {
        return Err(CoordError::invalid("import takes at most 64 files"));
    }
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(req.files.len());
    for f in &req.files {
        let url = reqwest::Url::parse(f.url.trim())
            .map_err(|e| CoordError::invalid(format!("{:?} is not a URL: {e}", f.url)))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(CoordError::invalid(format!(
                "{url}: only http:// and https:// URLs can be imported"
            )));
        }
        let path = if f.path.is_empty() {
            url.path_segments()
                .and_then(|mut s| s.next_back())
                .unwrap_or("")
                .to_string()
        } else {
            f.path.clone()
        };
        let clean = path.trim_start_matches('/');
        if clean.is_empty()
            || clean
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
            || clean.len() > 255
        {
            return Err(CoordError::invalid(format!(
                "{url}: {path:?} is not a usable file path inside the image (give one with path)"
            )));
        }
        if !seen.insert(clean.to_string()) {
            return Err(CoordError::invalid(format!(
                "two files would both be {clean:?}"
            )));
        }
        let mode = if f.mode == 0 { 0o644 } else { f.mode & 0o7777 };
        out.push((url, clean.to_string(), mode));
    }
    Ok(out)
}

/// Download `url` into the store; returns its digest and size.
pub async fn import_url(
    http: &reqwest::Client,
    store: &Arc<BlobStore>,
    url: &reqwest::Url,
) -> Result<(Digest, u64), CoordError> {
    let mut resp = http
        .get(url.clone())
        .send()
        .await
        .map_err(|e| CoordError::Upstream(format!("GET {url}: {}", without_url(&e))))?;
    if !resp.status().is_success() {
        return Err(CoordError::Upstream(format!(
            "GET {url}: HTTP {}",
            resp.status()
        )));
    }
    if resp.content_length().is_some_and(|n| n > MAX_IMPORT_BYTES) {
        return Err(CoordError::Upstream(format!(
            "GET {url}: {} bytes is more than the import limit of {MAX_IMPORT_BYTES}",
            resp.content_length().unwrap_or(0)
        )));
    }
    // Disk writes happen on a blocking thread fed through a bounded channel:
    // back-pressure instead of buffering a whole image in memory.
    // `None` marks a complete download; a channel closed without it means
    // the download failed, and the writer's file is dropped, not stored.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Option<bytes::Bytes>>(16);
    let s = store.clone();
    let writer =
        tokio::task::spawn_blocking(move || -> Result<Option<(Digest, u64)>, BlobError> {
            let mut w = s.import_writer(MAX_IMPORT_BYTES)?;
            while let Some(msg) = rx.blocking_recv() {
                match msg {
                    Some(chunk) => w.write(&chunk)?,
                    None => return w.finish(&s).map(Some),
                }
            }
            Ok(None)
        });
    let fed = async {
        loop {
            match tokio::time::timeout(IMPORT_IDLE, resp.chunk()).await {
                Err(_) => {
                    return Err(CoordError::Upstream(format!(
                        "GET {url}: no data for {IMPORT_IDLE:?}"
                    )))
                }
                Ok(Err(e)) => {
                    return Err(CoordError::Upstream(format!(
                        "GET {url}: {}",
                        without_url(&e)
                    )))
                }
                Ok(Ok(None)) => {
                    let _ = tx.send(None).await;
                    return Ok(());
                }
                Ok(Ok(Some(chunk))) => {
                    if tx.send(Some(chunk)).await.is_err() {
                        // The writer stopped (limit, disk): its error says why.
                        return Ok(());
                    }
                }
            }
        }
    }
    .await;
    drop(tx);
    let written = writer
        .await
        .map_err(|e| CoordError::Io(std::io::Error::other(e)))?;
    fed?;
    written?.ok_or_else(|| CoordError::Upstream(format!("GET {url}: download incomplete")))
}

/// reqwest's message with its causes (which say why: refused, reset, TLS).
fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        s = format!("{s}: {c}");
        src = c.source();
    }
    s
}
