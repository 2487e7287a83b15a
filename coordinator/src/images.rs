//! The image store behind the manifests: every coordinator keeps every blob
//! an image manifest names.
//!
//! [`run`] is one background task per coordinator. Whenever this node applies
//! entries (and every [`ImagesConfig::sync_interval_ms`] as a safety net) it
//! compares the blobs the applied manifests reference with the blobs on disk
//! and fetches the missing ones from a peer with `RelayService/FetchBlob`
//! (coordinator certificates may call it), resuming at the partial file's
//! length and verifying the digest before the blob is stored. Blobs no
//! manifest references are deleted once they have stayed unreferenced for the
//! grace period (so a push whose manifest is not committed yet survives, and a
//! delete followed by a re-push within the grace period re-uses the bytes).
//! Abandoned partial files expire; a periodic scrub re-hashes every blob and
//! removes corrupt ones, which the next round then fetches again.
//!
//! [`fetch_into`] is the one download routine: the relay cache uses it too.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use pxemesh_certs::Tls;
use pxemesh_proto::v1 as pb;
use pxemesh_proto::v1::relay_service_client::RelayServiceClient;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use crate::blobs::{BlobError, BlobStore, Digest, PartialWriter, WriterGuard};
use crate::model::{Kind, Record};
use crate::node::NodeHandle;

/// `[images]` in the coordinator configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImagesConfig {
    /// Safety-net period of the replication round (it also runs on every apply).
    pub sync_interval_ms: u64,
    /// An unreferenced blob is deleted after staying unreferenced this long.
    pub gc_grace_seconds: u64,
    /// Partial uploads/downloads untouched this long are discarded.
    pub partial_expiry_seconds: u64,
    /// Period of the full re-hash of every blob (0 = never).
    pub scrub_interval_seconds: u64,
}

impl Default for ImagesConfig {
    fn default() -> Self {
        ImagesConfig {
            sync_interval_ms: 5_000,
            gc_grace_seconds: 3_600,
            partial_expiry_seconds: 24 * 3_600,
            scrub_interval_seconds: 6 * 3_600,
        }
    }
}

/// Blob-store metrics (registered with the coordinator's registry).
#[derive(Default)]
pub struct ImageMetrics {
    pub blobs: Gauge,
    pub blob_bytes: Gauge,
    pub pushed: Counter,
    pub pushed_bytes: Counter,
    pub replicated: Counter,
    pub replicated_bytes: Counter,
    pub replication_failures: Counter,
    pub corrupt: Counter,
    pub collected: Counter,
    pub served_bytes: Counter,
}

impl ImageMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "blobs",
            "Image blobs stored on this node",
            self.blobs.clone(),
        );
        r.register(
            "blob_bytes",
            "Bytes of image blobs stored on this node",
            self.blob_bytes.clone(),
        );
        r.register(
            "blobs_pushed",
            "Blobs uploaded with AdminService/PushBlob and verified",
            self.pushed.clone(),
        );
        r.register(
            "blob_pushed_bytes",
            "Bytes received by PushBlob",
            self.pushed_bytes.clone(),
        );
        r.register(
            "blobs_replicated",
            "Blobs fetched from a peer coordinator and verified",
            self.replicated.clone(),
        );
        r.register(
            "blob_replicated_bytes",
            "Bytes fetched from peer coordinators",
            self.replicated_bytes.clone(),
        );
        r.register(
            "blob_replication_failures",
            "Failed attempts to fetch a blob from a peer",
            self.replication_failures.clone(),
        );
        r.register(
            "blobs_corrupt",
            "Blobs found corrupt on disk (removed and fetched again)",
            self.corrupt.clone(),
        );
        r.register(
            "blobs_collected",
            "Unreferenced blobs deleted after the grace period",
            self.collected.clone(),
        );
        r.register(
            "blob_served_bytes",
            "Bytes sent by FetchBlob",
            self.served_bytes.clone(),
        );
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error("{}", crate::client::error_chain(.0))]
    Status(#[from] tonic::Status),
    #[error("upstream: {0}")]
    Protocol(String),
    #[error("no chunk from upstream for {0:?}")]
    Stalled(Duration),
}

/// Longest wait for the next chunk of a download.
pub const CHUNK_TIMEOUT: Duration = Duration::from_secs(30);

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BlobError> + Send + 'static,
) -> Result<T, BlobError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(BlobError::Io(std::io::Error::other(e))),
    }
}

/// Download `guard`'s digest from `client` into `store`: resumes at the
/// partial file's length, checks every chunk's offset, verifies the digest
/// and moves the blob into place. An interrupted download keeps its bytes
/// (the next attempt resumes); content that does not match is discarded.
/// `progress` is called with the length of every chunk written.
pub async fn fetch_into(
    store: Arc<BlobStore>,
    client: &mut RelayServiceClient<Channel>,
    guard: WriterGuard,
    progress: impl Fn(u64),
) -> Result<u64, FetchError> {
    let s = store.clone();
    let mut writer: PartialWriter = blocking(move || s.begin(guard)).await?;
    let digest = writer.digest().clone();
    let req = pb::FetchBlobRequest {
        digest: digest.to_string(),
        offset: writer.len(),
    };
    let mut stream = tokio::time::timeout(CHUNK_TIMEOUT, client.fetch_blob(req))
        .await
        .map_err(|_| FetchError::Stalled(CHUNK_TIMEOUT))??
        .into_inner();
    let mut total = None;
    loop {
        let next = tokio::time::timeout(CHUNK_TIMEOUT, stream.message())
            .await
            .map_err(|_| FetchError::Stalled(CHUNK_TIMEOUT))??;
        let Some(chunk) = next else { break };
        match total {
            None => total = Some(chunk.total_size),
            Some(t) if t != chunk.total_size => {
                return Err(FetchError::Protocol(format!(
                    "total size changed from {t} to {}",
                    chunk.total_size
                )))
            }
            _ => {}
        }
        if writer.len() + chunk.data.len() as u64 > chunk.total_size {
            return Err(FetchError::Protocol(format!(
                "{} bytes beyond the total size {}",
                writer.len() + chunk.data.len() as u64,
                chunk.total_size
            )));
        }
        let n = chunk.data.len() as u64;
        writer = blocking(move || {
            writer.write_at(chunk.offset, &chunk.data)?;
            Ok(writer)
        })
        .await?;
        progress(n);
    }
    let total = total.unwrap_or(0);
    if writer.len() != total || (total == 0 && writer.is_empty() && !empty_digest(&digest)) {
        return Err(FetchError::Protocol(format!(
            "stream ended at {} of {total} bytes",
            writer.len()
        )));
    }
    let s = store.clone();
    Ok(blocking(move || writer.finish(&s)).await?)
}

fn empty_digest(d: &Digest) -> bool {
    d.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
}

/// Every digest the applied manifests reference, with its declared size.
pub fn referenced(node: &NodeHandle) -> Result<BTreeMap<Digest, u64>, crate::error::CoordError> {
    let mut out = BTreeMap::new();
    for rec in node.state().list(Kind::Image)? {
        if let Record::Image(img) = rec {
            for f in img.files {
                if let Ok(d) = f.digest.parse::<Digest>() {
                    out.insert(d, f.size);
                }
            }
        }
    }
    Ok(out)
}

pub struct Replicator {
    pub node: NodeHandle,
    pub store: Arc<BlobStore>,
    pub tls: Arc<Tls>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub config: ImagesConfig,
}

/// Replication, garbage collection and scrubbing until `shutdown`.
pub async fn run(r: Replicator, shutdown: CancellationToken) {
    let mut applied = r.node.applied_watch();
    let mut unreferenced: HashMap<Digest, Instant> = HashMap::new();
    let mut clients: HashMap<String, RelayServiceClient<Channel>> = HashMap::new();
    let mut last_scrub = Instant::now();
    let interval = Duration::from_millis(r.config.sync_interval_ms.max(50));
    loop {
        round(&r, &mut unreferenced, &mut clients, &shutdown).await;
        let scrub_every = Duration::from_secs(r.config.scrub_interval_seconds);
        if r.config.scrub_interval_seconds > 0 && last_scrub.elapsed() >= scrub_every {
            last_scrub = Instant::now();
            let s = r.store.clone();
            if let Ok(bad) = tokio::task::spawn_blocking(move || s.scrub()).await {
                for d in &bad {
                    warn!(digest = %d, "scrub: blob corrupt on disk; removed, fetching it again from a peer");
                }
                r.metrics.images.corrupt.inc_by(bad.len() as u64);
                if !bad.is_empty() {
                    continue;
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            c = applied.changed() => if c.is_err() { return },
            _ = tokio::time::sleep(interval) => {}
        }
        // Let a burst of applies settle.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn round(
    r: &Replicator,
    unreferenced: &mut HashMap<Digest, Instant>,
    clients: &mut HashMap<String, RelayServiceClient<Channel>>,
    shutdown: &CancellationToken,
) {
    let wanted = match referenced(&r.node) {
        Ok(w) => w,
        Err(e) => {
            warn!(error = %e, "image store: cannot read the manifests");
            return;
        }
    };
    let held: HashMap<Digest, u64> = r.store.list().into_iter().collect();
    r.metrics.images.blobs.set(held.len() as i64);
    r.metrics
        .images
        .blob_bytes
        .set(held.values().sum::<u64>() as i64);

    // Garbage collection: unreferenced for the whole grace period.
    let grace = Duration::from_secs(r.config.gc_grace_seconds);
    unreferenced.retain(|d, _| held.contains_key(d) && !wanted.contains_key(d));
    for d in held.keys().filter(|d| !wanted.contains_key(*d)) {
        let since = *unreferenced.entry(d.clone()).or_insert_with(Instant::now);
        if since.elapsed() >= grace {
            match r.store.remove(d) {
                Ok(()) => {
                    info!(digest = %d, "image store: deleted a blob no manifest references");
                    r.metrics.images.collected.inc();
                    unreferenced.remove(d);
                }
                Err(e) => warn!(digest = %d, error = %e, "image store: cannot delete a blob"),
            }
        }
    }
    r.store
        .clean_partials(Duration::from_secs(r.config.partial_expiry_seconds));

    let missing: Vec<(&Digest, &u64)> = wanted
        .iter()
        .filter(|(d, _)| !held.contains_key(*d))
        .collect();
    if missing.is_empty() {
        return;
    }
    let peers: Vec<(u64, String)> = match r.node.status().await {
        Ok(s) => s
            .members
            .iter()
            .filter(|m| m.id != s.id && !m.address.is_empty())
            .map(|m| (m.id, m.address.clone()))
            .collect(),
        Err(_) => return,
    };
    for (d, size) in missing {
        if shutdown.is_cancelled() {
            return;
        }
        let mut done = false;
        for (id, addr) in &peers {
            let guard = match r.store.lock_writer(d) {
                Ok(g) => g,
                // A push of the same blob is running here: it will store it.
                Err(_) => {
                    done = true;
                    break;
                }
            };
            let client = match clients.get(addr) {
                Some(c) => c.clone(),
                None => match crate::client::channel_lazy(addr, r.tls.clone()) {
                    Ok(ch) => {
                        let c =
                            RelayServiceClient::new(ch).max_decoding_message_size(4 * 1024 * 1024);
                        clients.insert(addr.clone(), c.clone());
                        c
                    }
                    Err(e) => {
                        debug!(peer = id, error = %e, "image store: no channel to peer");
                        continue;
                    }
                },
            };
            let mut client = client;
            let m = r.metrics.clone();
            let t = Instant::now();
            let res = tokio::select! {
                _ = shutdown.cancelled() => return,
                res = fetch_into(r.store.clone(), &mut client, guard, move |n| { m.images.replicated_bytes.inc_by(n); }) => res,
            };
            match res {
                Ok(n) => {
                    info!(digest = %d, bytes = n, declared = size, peer = id, ms = t.elapsed().as_millis() as u64, "image store: replicated a blob from a peer");
                    r.metrics.images.replicated.inc();
                    done = true;
                    break;
                }
                Err(FetchError::Status(s)) if s.code() == tonic::Code::NotFound => {
                    debug!(digest = %d, peer = id, "image store: peer does not hold the blob (yet)");
                }
                Err(e) => {
                    r.metrics.images.replication_failures.inc();
                    warn!(digest = %d, peer = id, error = %e, "image store: fetching a blob from a peer failed");
                }
            }
        }
        if !done {
            debug!(digest = %d, "image store: no peer could provide the blob this round");
        }
    }
}

/// Blobs `files` need that `store` does not hold verified (deduplicated).
pub fn missing_blobs<'a>(
    store: &BlobStore,
    files: impl Iterator<Item = (&'a str, u64)>,
) -> Result<Vec<String>, BlobError> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (digest, size) in files {
        let d: Digest = digest.parse()?;
        if !seen.insert(d.clone()) {
            continue;
        }
        match store.verify(&d) {
            Ok(n) if n == size => {}
            Ok(n) => {
                return Err(BlobError::SizeMismatch {
                    digest: d,
                    expected: size,
                    got: n,
                })
            }
            Err(BlobError::NotFound(_) | BlobError::Corrupt { .. }) => out.push(d.to_string()),
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}
