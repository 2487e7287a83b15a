//! The relay's image cache: the blobs of image manifests, fetched from the
//! coordinators (`RelayService/FetchBlob`), verified, kept on local disk
//! within a size budget and served by TFTP and HTTP.
//!
//! - **Names.** A boot profile with an `image` refers to its kernel and
//!   initrds as `images/<image>/<path>` (see `boot.rs`); [`resolve`] maps such
//!   a name through the rack state's manifests to a digest.
//! - **Single flight.** However many clients ask for a missing blob at once,
//!   one download runs ([`BlobCache::open_blob`]): the first asker registers it in
//!   the in-flight map and spawns it (a client hanging up does not cancel it);
//!   the others wait on the same `watch` channel and then read the verified
//!   file.
//! - **Verify before serving.** Downloads land in the store's `tmp/` and are
//!   renamed into place only after their digest matched; every read checks
//!   the file's identity against the last verification and re-hashes it when
//!   it changed (`pxemesh_coordinator::blobs`). A corrupt blob is removed,
//!   counted and fetched again; it is never served. A periodic scrub
//!   re-hashes everything.
//! - **Resume.** A broken download keeps its partial file and the next
//!   attempt (next endpoint, next round) asks for the rest at that offset.
//! - **Budget.** After each download, least-recently-used blobs are deleted
//!   until the cache fits `cache.budget_bytes`, never a pinned blob (one that
//!   a boot profile of the rack references) nor one being downloaded. Last
//!   use times are persisted in sled, so the order survives restarts.
//! - **Prefetch.** [`run`] watches the served rack state: when a profile's
//!   manifest arrives, its kernel and initrds are fetched at once.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use pxemesh_certs::Tls;
use pxemesh_coordinator::blobs::{BlobError, BlobStore, Digest};
use pxemesh_coordinator::images::{fetch_into, FetchError};
use pxemesh_proto::v1::relay_service_client::RelayServiceClient;
use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::state::{RackState, SharedState};

/// `[cache]` in the relay configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Disk budget for cached blobs; pinned blobs are kept even beyond it.
    pub budget_bytes: u64,
    /// Period of the full re-hash of every cached blob (0 = never).
    pub scrub_interval_seconds: u64,
    /// Fetch the blobs the rack's profiles reference as soon as they are known.
    pub prefetch: bool,
    /// Longest time a client waits for a blob being downloaded.
    pub fetch_timeout_seconds: u64,
    /// A cached blob no manifest references any more is deleted after this long.
    pub gc_grace_seconds: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            budget_bytes: 20 * 1024 * 1024 * 1024,
            scrub_interval_seconds: 6 * 3600,
            prefetch: true,
            fetch_timeout_seconds: 300,
            gc_grace_seconds: 3600,
        }
    }
}

#[derive(Default)]
pub struct CacheMetrics {
    pub bytes: Gauge,
    pub blobs: Gauge,
    pub hits: Counter,
    pub misses: Counter,
    pub upstream_fetches: Counter,
    pub upstream_failures: Counter,
    pub upstream_bytes: Counter,
    pub evictions: Counter,
    pub corrupt: Counter,
    pub collected: Counter,
}

impl CacheMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "cache_bytes",
            "Bytes of image blobs in the cache",
            self.bytes.clone(),
        );
        r.register(
            "cache_blobs",
            "Image blobs in the cache",
            self.blobs.clone(),
        );
        r.register(
            "cache_hits",
            "Blob reads served from the cache",
            self.hits.clone(),
        );
        r.register(
            "cache_misses",
            "Blob reads that had to wait for a download",
            self.misses.clone(),
        );
        r.register(
            "cache_upstream_fetches",
            "Downloads of a blob from the coordinators (one per missing blob, however many clients ask)",
            self.upstream_fetches.clone(),
        );
        r.register(
            "cache_upstream_failures",
            "Download attempts that failed (the next endpoint or round resumes)",
            self.upstream_failures.clone(),
        );
        r.register(
            "cache_upstream_bytes",
            "Bytes downloaded from the coordinators",
            self.upstream_bytes.clone(),
        );
        r.register(
            "cache_evictions",
            "Blobs deleted to stay within the budget",
            self.evictions.clone(),
        );
        r.register(
            "cache_corrupt",
            "Cached blobs found corrupt on disk (removed, never served, fetched again)",
            self.corrupt.clone(),
        );
        r.register(
            "cache_collected",
            "Cached blobs deleted after their image was deleted (grace period)",
            self.collected.clone(),
        );
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum CacheError {
    #[error("blob {0} is not cached and no coordinator is configured to fetch it from")]
    NoUpstream(Digest),
    #[error("blob {digest} could not be fetched: {reason}")]
    Fetch { digest: Digest, reason: String },
    #[error("blob {0}: timed out waiting for its download")]
    Timeout(Digest),
    #[error("cache I/O: {0}")]
    Io(String),
}

/// Where missing blobs come from.
pub struct Upstream {
    pub endpoints: Vec<String>,
    pub tls: Arc<Tls>,
}

type Outcome = Option<Result<(), String>>;

pub struct BlobCache {
    store: Arc<BlobStore>,
    lru_tree: sled::Tree,
    lru: Mutex<HashMap<Digest, u64>>,
    inflight: Mutex<HashMap<Digest, watch::Receiver<Outcome>>>,
    pinned: ArcSwap<HashSet<Digest>>,
    upstream: Option<Upstream>,
    config: CacheConfig,
    metrics: Arc<crate::metrics::RelayMetrics>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Attempts over all endpoints before a download is reported failed.
const FETCH_ROUNDS: u32 = 3;

impl BlobCache {
    pub fn open(
        dir: &std::path::Path,
        db: &sled::Db,
        upstream: Option<Upstream>,
        config: CacheConfig,
        metrics: Arc<crate::metrics::RelayMetrics>,
        tracker: TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<Arc<BlobCache>, crate::error::RelayError> {
        let store = BlobStore::open(dir)
            .map_err(|e| crate::error::RelayError::Config(format!("image cache: {e}")))?;
        let lru_tree = db.open_tree("image_cache_lru")?;
        let mut lru = HashMap::new();
        for (k, v) in lru_tree.iter().flatten() {
            let (Ok(hex), Ok(t)) = (std::str::from_utf8(&k), <[u8; 8]>::try_from(v.as_ref()))
            else {
                continue;
            };
            if let Ok(d) = format!("sha256:{hex}").parse::<Digest>() {
                lru.insert(d, u64::from_be_bytes(t));
            }
        }
        // Leftover partial downloads are resumed on demand; very old ones go.
        store.clean_partials(Duration::from_secs(7 * 24 * 3600));
        let c = Arc::new(BlobCache {
            store: Arc::new(store),
            lru_tree,
            lru: Mutex::new(lru),
            inflight: Mutex::default(),
            pinned: ArcSwap::from_pointee(HashSet::new()),
            upstream,
            config,
            metrics,
            tracker,
            shutdown,
        });
        c.update_gauges();
        Ok(c)
    }

    pub fn store(&self) -> &BlobStore {
        &self.store
    }

    fn update_gauges(&self) {
        let list = self.store.list();
        let m = &self.metrics.cache;
        m.blobs.set(list.len() as i64);
        m.bytes
            .set(list.iter().map(|(_, n)| *n).sum::<u64>() as i64);
    }

    /// Bytes cached (for the heartbeat).
    pub fn bytes(&self) -> u64 {
        u64::try_from(self.metrics.cache.bytes.get()).unwrap_or(0)
    }

    fn touch(&self, d: &Digest) {
        let t = now_ms();
        if let Ok(mut l) = self.lru.lock() {
            l.insert(d.clone(), t);
        }
        let _ = self.lru_tree.insert(d.hex(), &t.to_be_bytes());
    }

    /// Open a verified blob, downloading it first if needed (one download
    /// however many callers ask at once). The file is positioned at 0.
    pub async fn open_blob(
        self: &Arc<Self>,
        d: &Digest,
    ) -> Result<(std::fs::File, u64), CacheError> {
        let mut fetched = false;
        for _ in 0..3 {
            let s = self.store.clone();
            let d2 = d.clone();
            let r = tokio::task::spawn_blocking(move || s.open_verified(&d2))
                .await
                .map_err(|e| CacheError::Io(e.to_string()))?;
            match r {
                Ok(x) => {
                    if !fetched {
                        self.metrics.cache.hits.inc();
                    }
                    self.touch(d);
                    return Ok(x);
                }
                Err(e @ BlobError::Corrupt { .. }) => {
                    self.metrics.cache.corrupt.inc();
                    warn!(digest = %d, error = %e, "cached blob corrupt on disk: removed, not served; fetching it again");
                    self.update_gauges();
                }
                Err(BlobError::NotFound(_)) => {}
                Err(e) => return Err(CacheError::Io(e.to_string())),
            }
            if !fetched {
                self.metrics.cache.misses.inc();
            }
            fetched = true;
            self.fetch(d).await?;
        }
        Err(CacheError::Fetch {
            digest: d.clone(),
            reason: "the blob kept disappearing after its download".into(),
        })
    }

    /// Wait for `d` to be downloaded: joins the running download or starts one.
    pub async fn fetch(self: &Arc<Self>, d: &Digest) -> Result<(), CacheError> {
        if self.upstream.is_none() {
            return Err(CacheError::NoUpstream(d.clone()));
        }
        let mut rx = {
            let mut map = self
                .inflight
                .lock()
                .map_err(|_| CacheError::Io("in-flight table poisoned".into()))?;
            match map.get(d) {
                Some(rx) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    map.insert(d.clone(), rx.clone());
                    let me = self.clone();
                    let d2 = d.clone();
                    self.tracker.spawn(async move {
                        let r = me.download(&d2).await;
                        if let Ok(mut map) = me.inflight.lock() {
                            map.remove(&d2);
                        }
                        let _ = tx.send(Some(r.map_err(|e| e.to_string())));
                    });
                    rx
                }
            }
        };
        let limit = Duration::from_secs(self.config.fetch_timeout_seconds.max(1));
        let waited = tokio::time::timeout(limit, rx.wait_for(|o| o.is_some())).await;
        match waited {
            Err(_) => Err(CacheError::Timeout(d.clone())),
            Ok(Err(_)) => Err(CacheError::Fetch {
                digest: d.clone(),
                reason: "the download stopped (relay shutting down)".into(),
            }),
            Ok(Ok(o)) => match o.as_ref() {
                Some(Ok(())) => Ok(()),
                Some(Err(reason)) => Err(CacheError::Fetch {
                    digest: d.clone(),
                    reason: reason.clone(),
                }),
                None => Err(CacheError::Timeout(d.clone())),
            },
        }
    }

    /// The one download of `d`: every endpoint in turn, a few rounds, each
    /// attempt resuming at the partial file's length.
    async fn download(self: &Arc<Self>, d: &Digest) -> Result<(), FetchError> {
        let Some(up) = self.upstream.as_ref() else {
            return Err(FetchError::Protocol("no upstream".into()));
        };
        if self.store.contains(d) {
            return Ok(());
        }
        self.metrics.cache.upstream_fetches.inc();
        let t = std::time::Instant::now();
        let mut last = FetchError::Protocol("no endpoint tried".into());
        for round in 0..FETCH_ROUNDS {
            if round > 0 {
                tokio::select! {
                    _ = self.shutdown.cancelled() => return Err(last),
                    _ = tokio::time::sleep(Duration::from_millis(300 * u64::from(round))) => {}
                }
            }
            for ep in &up.endpoints {
                let guard = self.store.lock_writer(d)?;
                let ch = match pxemesh_coordinator::client::channel_lazy(ep, up.tls.clone()) {
                    Ok(ch) => ch,
                    Err(e) => {
                        last = FetchError::Protocol(format!("{ep}: {e}"));
                        continue;
                    }
                };
                let mut client =
                    RelayServiceClient::new(ch).max_decoding_message_size(4 * 1024 * 1024);
                let m = self.metrics.clone();
                let r = tokio::select! {
                    _ = self.shutdown.cancelled() => return Err(FetchError::Protocol("shutting down".into())),
                    r = fetch_into(self.store.clone(), &mut client, guard, move |n| { m.cache.upstream_bytes.inc_by(n); }) => r,
                };
                match r {
                    Ok(n) => {
                        info!(digest = %d, bytes = n, endpoint = %ep, ms = t.elapsed().as_millis() as u64, "image cache: blob fetched and verified");
                        self.touch(d);
                        self.evict(Some(d));
                        return Ok(());
                    }
                    Err(e) => {
                        self.metrics.cache.upstream_failures.inc();
                        debug!(digest = %d, endpoint = %ep, error = %e, "image cache: fetch attempt failed");
                        last = e;
                    }
                }
            }
        }
        warn!(digest = %d, error = %last, "image cache: blob could not be fetched from any coordinator");
        Err(last)
    }

    /// Replace the set of blobs that must never be evicted.
    pub fn set_pins(&self, pins: HashSet<Digest>) {
        self.pinned.store(Arc::new(pins));
    }

    pub fn is_pinned(&self, d: &Digest) -> bool {
        self.pinned.load().contains(d)
    }

    /// Delete least-recently-used unpinned blobs until the budget holds;
    /// `keep` (the blob just fetched, about to be served) is spared.
    pub fn evict(&self, keep: Option<&Digest>) {
        let list = self.store.list();
        let mut total: u64 = list.iter().map(|(_, n)| *n).sum();
        let budget = self.config.budget_bytes;
        if total > budget {
            let pinned = self.pinned.load();
            let busy: HashSet<Digest> = self
                .inflight
                .lock()
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default();
            let lru = self.lru.lock().map(|l| l.clone()).unwrap_or_default();
            let mut candidates: Vec<(u64, Digest, u64)> = list
                .into_iter()
                .filter(|(d, _)| !pinned.contains(d) && !busy.contains(d) && Some(d) != keep)
                .map(|(d, n)| (lru.get(&d).copied().unwrap_or(0), d, n))
                .collect();
            candidates.sort();
            for (_, d, n) in candidates {
                if total <= budget {
                    break;
                }
                if self.store.remove(&d).is_ok() {
                    total = total.saturating_sub(n);
                    self.metrics.cache.evictions.inc();
                    if let Ok(mut l) = self.lru.lock() {
                        l.remove(&d);
                    }
                    let _ = self.lru_tree.remove(d.hex());
                    info!(digest = %d, bytes = n, "image cache: evicted least-recently-used blob");
                }
            }
            if total > budget {
                warn!(
                    total,
                    budget, "image cache: pinned blobs alone exceed the budget"
                );
            }
        }
        self.update_gauges();
    }
}

/// `images/<image>/<path>` → the manifest's digest and size for that file.
pub fn resolve(state: &RackState, rel: &str) -> Option<(Digest, u64)> {
    let rest = rel.strip_prefix("images/")?;
    let (image, path) = rest.split_once('/')?;
    let img = state.image(image)?;
    let f = img.files.iter().find(|f| f.path == path)?;
    Some((f.digest.parse().ok()?, f.size))
}

/// The blobs the rack's boot profiles reference (kernel and initrds).
pub fn pins(state: &RackState) -> HashSet<Digest> {
    let mut out = HashSet::new();
    for p in state.profiles() {
        if p.image.is_empty() {
            continue;
        }
        for path in std::iter::once(&p.kernel).chain(p.initrds.iter()) {
            if let Some((d, _)) = resolve(state, &format!("images/{}/{path}", p.image)) {
                out.insert(d);
            }
        }
    }
    out
}

/// Every digest the manifests of `state` name.
pub fn referenced(state: &RackState) -> HashSet<Digest> {
    state
        .images()
        .flat_map(|i| i.files.iter())
        .filter_map(|f| f.digest.parse().ok())
        .collect()
}

/// Delete cached blobs no manifest has named for the grace period. Only
/// with a state from the coordinators (revision > 0): an empty state before
/// the first snapshot says nothing about what is referenced.
fn collect(
    cache: &BlobCache,
    state: &RackState,
    unreferenced: &mut HashMap<Digest, std::time::Instant>,
) {
    if state.revision == 0 {
        return;
    }
    let wanted = referenced(state);
    let held: Vec<Digest> = cache.store.list().into_iter().map(|(d, _)| d).collect();
    unreferenced.retain(|d, _| held.contains(d) && !wanted.contains(d));
    let grace = Duration::from_secs(cache.config.gc_grace_seconds);
    let mut removed = false;
    for d in held.into_iter().filter(|d| !wanted.contains(d)) {
        let since = *unreferenced
            .entry(d.clone())
            .or_insert_with(std::time::Instant::now);
        if since.elapsed() >= grace && cache.store.remove(&d).is_ok() {
            info!(digest = %d, "image cache: deleted a blob no image references any more");
            cache.metrics.cache.collected.inc();
            unreferenced.remove(&d);
            if let Ok(mut l) = cache.lru.lock() {
                l.remove(&d);
            }
            let _ = cache.lru_tree.remove(d.hex());
            removed = true;
        }
    }
    if removed {
        cache.update_gauges();
    }
}

/// Follow the served state: pin and prefetch what the profiles reference;
/// delete blobs of deleted images after the grace period; scrub
/// periodically. Runs until `shutdown`.
pub async fn run(cache: Arc<BlobCache>, state: SharedState, shutdown: CancellationToken) {
    let mut seen: Option<Arc<RackState>> = None;
    let mut last_scrub = std::time::Instant::now();
    let mut last_gc = std::time::Instant::now();
    let mut unreferenced = HashMap::new();
    loop {
        let current = state.load_full();
        if last_gc.elapsed() >= Duration::from_secs(1) {
            last_gc = std::time::Instant::now();
            collect(&cache, &current, &mut unreferenced);
        }
        if seen.as_ref().is_none_or(|s| !Arc::ptr_eq(s, &current)) {
            let p = pins(&current);
            cache.set_pins(p.clone());
            if cache.config.prefetch && cache.upstream.is_some() {
                for d in p {
                    if !cache.store.contains(&d) {
                        let c = cache.clone();
                        cache.tracker.spawn(async move {
                            if let Err(e) = c.fetch(&d).await {
                                warn!(digest = %d, error = %e, "image cache: prefetch failed (retried when requested)");
                            }
                        });
                    }
                }
            }
            seen = Some(current);
        }
        let every = cache.config.scrub_interval_seconds;
        if every > 0 && last_scrub.elapsed() >= Duration::from_secs(every) {
            last_scrub = std::time::Instant::now();
            let c = cache.clone();
            if let Ok(bad) = tokio::task::spawn_blocking(move || c.store.scrub()).await {
                for d in &bad {
                    warn!(digest = %d, "image cache scrub: blob corrupt on disk; removed");
                }
                cache.metrics.cache.corrupt.inc_by(bad.len() as u64);
                cache.update_gauges();
                // Pinned ones come back at once (the next pass prefetches).
                if !bad.is_empty() {
                    seen = None;
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pxemesh_coordinator::model::{Image, ImageFile, Meta, Profile, ProfileKind};

    fn file(path: &str, c: char) -> ImageFile {
        ImageFile {
            path: path.into(),
            digest: format!("sha256:{}", c.to_string().repeat(64)),
            size: 7,
            mode: 0o644,
        }
    }

    #[test]
    fn names_resolve_through_manifests_and_profiles_pin_their_files() {
        let img = Image {
            name: "c9".into(),
            files: vec![
                file("vmlinuz", 'a'),
                file("images/initrd.img", 'b'),
                file("README", 'c'),
            ],
            meta: Meta::default(),
        };
        let profile = Profile {
            name: "p".into(),
            description: String::new(),
            kind: ProfileKind::Ipxe,
            image: "c9".into(),
            kernel: "vmlinuz".into(),
            initrds: vec!["images/initrd.img".into(), "missing".into()],
            cmdline: String::new(),
            kickstart_url: String::new(),
            ipxe_script: String::new(),
            meta: Meta::default(),
        };
        let state = RackState::new("r1", 5, Vec::new(), Vec::new(), vec![profile])
            .unwrap()
            .with_images([img]);
        let (d, size) = resolve(&state, "images/c9/images/initrd.img").unwrap();
        assert_eq!((d.hex().chars().next(), size), (Some('b'), 7));
        assert!(resolve(&state, "images/c9/nope").is_none());
        assert!(resolve(&state, "images/other/vmlinuz").is_none());
        assert!(resolve(&state, "c9/vmlinuz").is_none());
        let p = pins(&state);
        assert_eq!(p.len(), 2, "kernel and the existing initrd, not README");
        assert!(p.iter().all(|d| !d.hex().starts_with('c')));
        assert_eq!(referenced(&state).len(), 3);
    }
}
