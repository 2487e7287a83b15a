//! Wiring: `run(config, listeners, shutdown)` loads the rack state and serves
//! DHCP, TFTP, HTTP and metrics on already-bound sockets until `shutdown`.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::boot::LoaderTracker;
use crate::config::{Interface, RelayConfig};
use crate::dhcp::{self, DhcpContext, Leases};
use crate::error::RelayError;
use crate::events::EventLog;
use crate::http::{self, HttpContext};
use crate::metrics::RelayMetrics;
use crate::state::{self, RackState};
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

pub async fn run(
    config: RelayConfig,
    listeners: RelayListeners,
    shutdown: CancellationToken,
) -> Result<(), RelayError> {
    config.validate()?;
    let config = Arc::new(config);
    std::fs::create_dir_all(&config.data_dir)?;
    let db = sled::Config::new()
        .path(config.data_dir.join("sled"))
        .open()?;
    let metrics = Arc::new(RelayMetrics::new());
    let events = Arc::new(EventLog::open(&db, metrics.clone())?);
    let static_path = config
        .static_state
        .clone()
        .ok_or_else(|| RelayError::Config("static_state is required".into()))?;
    let rack = RackState::from_static_file(&static_path)?;
    info!(rack = %rack.rack, networks = rack.networks().len(), hosts = rack.hosts().len(), file = %static_path.display(), "loaded rack state");
    let state = state::shared(rack);
    let loaders = Arc::new(LoaderTracker::default());
    let tracker = TaskTracker::new();

    // SIGHUP re-reads the static rack file; a bad file keeps the old state.
    {
        let state = state.clone();
        let path = static_path.clone();
        let sd = shutdown.clone();
        if let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            tracker.spawn(async move {
                loop {
                    tokio::select! {
                        _ = sd.cancelled() => return,
                        s = hup.recv() => if s.is_none() { return },
                    }
                    match RackState::from_static_file(&path) {
                        Ok(new) => {
                            info!(hosts = new.hosts().len(), "reloaded rack state (SIGHUP)");
                            state.store(Arc::new(new));
                        }
                        Err(e) => warn!(error = %e, "rack state reload failed; keeping the previous state"),
                    }
                }
            });
        }
    }

    if config.dhcp.enabled && !listeners.dhcp.is_empty() {
        let ctx = Arc::new(DhcpContext {
            config: config.clone(),
            state: state.clone(),
            leases: Leases::open(&db)?,
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
        let ctx = Arc::new(HttpContext::new(
            config.clone(),
            state.clone(),
            events.clone(),
            metrics.clone(),
            loaders.clone(),
        ));
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
        let app = axum::Router::new()
            .route(
                "/metrics",
                axum::routing::get(move || async move { m.render() }),
            )
            .route("/healthz", axum::routing::get(|| async { "ok\n" }));
        let sd = shutdown.clone();
        tracker.spawn(async move {
            if let Err(e) = axum::serve(l, app)
                .with_graceful_shutdown(async move { sd.cancelled().await })
                .await
            {
                warn!(error = %e, "metrics endpoint failed");
            }
        });
    }
    tracker.close();
    info!(relay = %config.name, "relay serving");
    shutdown.cancelled().await;
    info!("relay shutting down");
    if tokio::time::timeout(DRAIN, tracker.wait()).await.is_err() {
        warn!("shutdown drain timed out; stopping anyway");
    }
    db.flush()?;
    info!("relay stopped");
    Ok(())
}
