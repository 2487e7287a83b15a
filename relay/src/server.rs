//! Wiring: `run(config, listeners, shutdown)` loads the rack state and serves
//! DHCP, TFTP, HTTP and metrics on already-bound sockets until `shutdown`.
//!
//! The rack state comes from a static file (static mode) or, in sync mode,
//! from the persisted copy of the coordinators' state: loaded first, served at
//! once, then kept current by `sync::run` in the background.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use pxemesh_certs::{Role, Tls, TlsPaths};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::boot::LoaderTracker;
use crate::cache::{self, BlobCache, Upstream};
use crate::config::{CoordinatorsConfig, Interface, RelayConfig};
use crate::dhcp::{self, DhcpContext, Leases};
use crate::error::RelayError;
use crate::events::{self, EventLog};
use crate::http::{self, HttpContext};
use crate::metrics::RelayMetrics;
use crate::state::{self, RackState, SharedState};
use crate::store::RackStore;
use crate::sync::{self, ShipContext, SyncContext};
use crate::tftp::{self, TftpContext};

/// Sockets bound by the caller (the binary, or a test on port 0).
#[derive(Default)]
pub struct RelayListeners {
    pub dhcp: Vec<(Interface, std::net::UdpSocket)>,
    pub tftp: Option<std::net::UdpSocket>,
    pub http: Option<std::net::TcpListener>,
    pub metrics: Option<std::net::TcpListener>,
}

const DRAIN: Duration = Duration::from_secs(5);
/// How often the TLS files are checked for a rotation (SIGHUP reloads at once).
const TLS_RELOAD_CHECK: Duration = Duration::from_secs(10);

pub async fn run(
    config: RelayConfig,
    listeners: RelayListeners,
    shutdown: CancellationToken,
) -> Result<(), RelayError> {
    config.validate()?;
    let config = Arc::new(config);
    std::fs::create_dir_all(&config.data_dir)?;
    crate::limits::check_startup_space(&config.data_dir)?;
    let db = sled::Config::new()
        .path(config.data_dir.join("sled"))
        .open()?;
    let metrics = Arc::new(RelayMetrics::new());
    let events = Arc::new(EventLog::open(&db, metrics.clone())?);
    let loaders = Arc::new(LoaderTracker::default());
    let tracker = TaskTracker::new();
    let state = match (&config.static_state, &config.coordinators) {
        (Some(path), None) => start_static(path, &tracker, &shutdown)?,
        (None, Some(coordinators)) => start_sync(
            &config,
            coordinators,
            &db,
            metrics.clone(),
            events.clone(),
            &tracker,
            &shutdown,
        )?,
        // validate() refused these.
        _ => {
            return Err(RelayError::Config(
                "exactly one of static_state and [coordinators] must be set".into(),
            ))
        }
    };

    if let (Some(coordinators), true) = (&config.coordinators, config.ipmi.enabled) {
        start_jobs(&config, coordinators, &db, &metrics, &tracker, &shutdown)?;
    }
    // Sync mode: the image cache, fed from the same coordinators.
    let cache = match &config.coordinators {
        Some(c) => {
            let (tls, _, _) = load_relay_identity(&config, c)?;
            let cache = BlobCache::open(
                &config.data_dir.join("cache"),
                &db,
                Some(Upstream {
                    endpoints: c.endpoints.clone(),
                    tls,
                }),
                config.cache.clone(),
                metrics.clone(),
                tracker.clone(),
                shutdown.clone(),
            )?;
            info!(
                budget_bytes = config.cache.budget_bytes,
                cached_bytes = cache.bytes(),
                "image cache ready"
            );
            tracker.spawn(cache::run(cache.clone(), state.clone(), shutdown.clone()));
            Some(cache)
        }
        None => None,
    };

    // The journal on disk at least every 200 ms (see `events`).
    tracker.spawn(events::flush_loop(events.clone(), shutdown.clone()));
    if config.dhcp.enabled && !listeners.dhcp.is_empty() {
        let ctx = Arc::new(DhcpContext {
            config: config.clone(),
            state: state.clone(),
            leases: Leases::open(&config.data_dir, Some(&db))?,
            events: events.clone(),
            metrics: metrics.clone(),
            loaders: loaders.clone(),
        });
        let mut sockets = Vec::new();
        for (iface, s) in listeners.dhcp {
            s.set_nonblocking(true)?;
            sockets.push((iface, tokio::net::UdpSocket::from_std(s)?));
        }
        let sd = shutdown.clone();
        tracker.spawn(async move {
            if let Err(e) = dhcp::run(ctx, sockets, sd).await {
                error!(error = %e, "DHCP service failed");
            }
        });
    }
    if let (true, Some(sock)) = (config.tftp.enabled, listeners.tftp) {
        sock.set_nonblocking(true)?;
        let sock = tokio::net::UdpSocket::from_std(sock)?;
        info!(addr = %sock.local_addr()?, root = %config.boot.dir.display(), "TFTP listening");
        let ctx = Arc::new(TftpContext {
            config: config.clone(),
            state: state.clone(),
            events: events.clone(),
            metrics: metrics.clone(),
            loaders: loaders.clone(),
            cache: cache.clone(),
        });
        let sd = shutdown.clone();
        tracker.spawn(async move {
            if let Err(e) = tftp::run(ctx, sock, sd).await {
                error!(error = %e, "TFTP service failed");
            }
        });
    }
    if let (true, Some(l)) = (config.http.enabled, listeners.http) {
        l.set_nonblocking(true)?;
        let l = tokio::net::TcpListener::from_std(l)?;
        info!(addr = %l.local_addr()?, "HTTP boot listening");
        let mut http_ctx = HttpContext::new(
            config.clone(),
            state.clone(),
            events.clone(),
            metrics.clone(),
            loaders.clone(),
        );
        http_ctx.cache = cache.clone();
        let ctx = Arc::new(http_ctx);
        let sd = shutdown.clone();
        tracker.spawn(async move {
            if let Err(e) = http::run(ctx, l, sd).await {
                error!(error = %e, "HTTP service failed");
            }
        });
    }
    if let Some(l) = listeners.metrics {
        l.set_nonblocking(true)?;
        let l = tokio::net::TcpListener::from_std(l)?;
        let m = metrics.clone();
        let sd = shutdown.clone();
        tracker.spawn(async move {
            if let Err(e) =
                pxemesh_coordinator::metrics::serve_text(l, move || m.render(), sd).await
            {
                warn!(error = %e, "metrics endpoint failed");
            }
        });
    }
    tracker.close();
    info!(relay = %config.name, "relay serving");
    pxemesh_coordinator::notify::notify_or_log(&format!(
        "READY=1\nSTATUS=relay {} serving",
        config.name
    ));
    shutdown.cancelled().await;
    info!("relay shutting down");
    pxemesh_coordinator::notify::notify_or_log("STOPPING=1");
    if tokio::time::timeout(DRAIN, tracker.wait()).await.is_err() {
        warn!("shutdown drain timed out; stopping anyway");
    }
    // Bounded: a stuck flush must not keep a stopping relay alive forever.
    match tokio::time::timeout(DRAIN, crate::durable::flush_db(&db)).await {
        Ok(r) => r?,
        Err(_) => warn!("final flush did not finish in time; stopping anyway"),
    }
    info!("relay stopped");
    Ok(())
}

/// Static mode: the rack file, re-read on SIGHUP (a bad file keeps the old state).
fn start_static(
    path: &Path,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<SharedState, RelayError> {
    let rack = RackState::from_static_file(path)?;
    info!(rack = %rack.rack, networks = rack.networks().len(), hosts = rack.hosts().len(), file = %path.display(), "loaded rack state");
    let state = state::shared(rack);
    let state2 = state.clone();
    let path = path.to_path_buf();
    let sd = shutdown.clone();
    if let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        tracker.spawn(async move {
            loop {
                tokio::select! {
                    _ = sd.cancelled() => return,
                    s = hup.recv() => if s.is_none() { return },
                }
                match RackState::from_static_file(&path) {
                    Ok(new) => {
                        info!(hosts = new.hosts().len(), "reloaded rack state (SIGHUP)");
                        state2.store(Arc::new(new));
                    }
                    Err(e) => {
                        warn!(error = %e, "rack state reload failed; keeping the previous state")
                    }
                }
            }
        });
    }
    Ok(state)
}

/// Loads the relay's TLS identity for sync mode; the certificate must name a
/// relay, whose name matches the configuration's. Returns the TLS material,
/// the rack and the relay name.
pub fn load_relay_identity(
    config: &RelayConfig,
    coordinators: &CoordinatorsConfig,
) -> Result<(Arc<Tls>, String, String), RelayError> {
    let tls = Tls::load(TlsPaths {
        ca: coordinators.ca.clone(),
        cert: coordinators.cert.clone(),
        key: coordinators.key.clone(),
    })
    .map_err(|e| RelayError::Config(format!("[coordinators] TLS: {e}")))?;
    let me = tls.identity();
    let Role::Relay { rack, name } = me.role.clone() else {
        return Err(RelayError::Config(format!(
            "certificate {} ({}) is a {} identity, not a relay's (spiffe://<domain>/relay/<rack>/<name>); issue one with `pxemesh-certs issue relay`",
            coordinators.cert.display(),
            me.uri(),
            me.role.kind()
        )));
    };
    if name != config.name {
        return Err(RelayError::Config(format!(
            "this relay is named {:?} in the configuration but its certificate {} names relay {name:?}",
            config.name,
            me.uri()
        )));
    }
    Ok((tls, rack, name))
}

/// Sync mode: serve the persisted copy of the rack at once (even when every
/// coordinator is down), then follow the coordinators in the background.
fn start_sync(
    config: &RelayConfig,
    coordinators: &CoordinatorsConfig,
    db: &sled::Db,
    metrics: Arc<RelayMetrics>,
    events: Arc<EventLog>,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<SharedState, RelayError> {
    let (tls, rack, name) = load_relay_identity(config, coordinators)?;
    info!(identity = %tls.identity().uri(), rack = %rack, relay = %name, "sync mode: this relay serves rack {rack}");
    let mut store = RackStore::open(db, &rack)?;
    let (served, revision) = store.load();
    if revision == 0 {
        info!("nothing persisted for rack {rack}: serving an empty rack until the first snapshot from the coordinators");
    } else {
        info!(
            networks = served.networks().len(),
            profiles = store.count(pxemesh_coordinator::model::Kind::Profile),
            images = store.images().count(),
            "serving persisted rack {rack} at revision {revision} ({} hosts)",
            served.hosts().len()
        );
    }
    let state = state::shared(served);
    let reloader = tls.spawn_reloader(shutdown.child_token(), TLS_RELOAD_CHECK);
    tracker.spawn(sync::ship_events(
        ShipContext {
            endpoints: coordinators.endpoints.clone(),
            tls: tls.clone(),
            events,
            metrics: metrics.clone(),
        },
        shutdown.clone(),
    ));
    let ctx = SyncContext {
        endpoints: coordinators.endpoints.clone(),
        tls,
        store,
        state: state.clone(),
        metrics,
        heartbeat_interval: Duration::from_secs(coordinators.heartbeat_seconds),
    };
    let sd = shutdown.clone();
    tracker.spawn(async move {
        sync::run(ctx, sd).await;
        let _ = reloader.await;
    });
    Ok(state)
}

/// Sync mode: lease and run the rack's power jobs (`ipmi::runner`).
fn start_jobs(
    config: &RelayConfig,
    coordinators: &CoordinatorsConfig,
    db: &sled::Db,
    metrics: &Arc<RelayMetrics>,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<(), RelayError> {
    use crate::ipmi::{runner, Ipmitool};
    config.ipmi.validate().map_err(RelayError::Config)?;
    let (tls, rack, name) = load_relay_identity(config, coordinators)?;
    let reloader = tls.spawn_reloader(shutdown.child_token(), TLS_RELOAD_CHECK);
    let mut backend = Ipmitool::new(
        config.ipmi.ipmitool.clone(),
        Duration::from_secs(config.ipmi.command_timeout_seconds),
    );
    backend.session_timeout_seconds = config.ipmi.session_timeout_seconds;
    backend.metrics = Some(metrics.ipmi.clone());
    let db = db.clone();
    let rack2 = rack.clone();
    let oob: runner::OobSource =
        Arc::new(move || crate::store::persisted_rack(&db, &rack2).map(|r| r.oob_networks));
    let ctx = runner::RunnerContext {
        config: config.ipmi.clone(),
        backend: Arc::new(backend),
        endpoints: coordinators.endpoints.clone(),
        tls,
        rack,
        relay: name,
        oob,
        metrics: metrics.ipmi.clone(),
    };
    let sd = shutdown.clone();
    tracker.spawn(async move {
        runner::run(ctx, sd).await;
        let _ = reloader.await;
    });
    Ok(())
}
