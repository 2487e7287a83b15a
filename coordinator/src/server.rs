//! Wiring: `run(config, listeners, shutdown)` starts the Raft actor, the mTLS
//! gRPC server (Admin, Relay, Raft, health, reflection) and the metrics
//! endpoint on already-bound sockets, and stops them all on `shutdown`.

use std::sync::Arc;
use std::time::Duration;

use pxemesh_certs::{Tls, TlsPaths};
use pxemesh_proto::v1::admin_service_server::AdminServiceServer;
use pxemesh_proto::v1::raft_service_server::RaftServiceServer;
use pxemesh_proto::v1::relay_service_server::RelayServiceServer;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::api::admin::AdminApi;
use crate::api::auth::AuthLayer;
use crate::api::raft::RaftApi;
use crate::api::relay::RelayApi;
use crate::blobs::BlobStore;
use crate::config::Config;
use crate::crypto::ClusterKey;
use crate::error::CoordError;
use crate::metrics::Metrics;
use crate::node::{self, NodeOptions};
use crate::storage::RaftStore;
use crate::transport::{Transport, MAX_RAFT_MESSAGE};

/// Sockets the caller bound (tests bind port 0).
pub struct Listeners {
    pub grpc: TcpListener,
    pub metrics: Option<TcpListener>,
}

/// How long in-flight work may take to finish after shutdown is requested.
const DRAIN: Duration = Duration::from_secs(5);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on concurrent connections still in their TLS handshake.
const MAX_HANDSHAKES: usize = 256;

pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), CoordError> {
    config.validate()?;
    crate::clock::init();
    crate::failpoint::init_from_env()
        .map_err(|e| CoordError::Config(format!("failpoints: {e}")))?;
    // Our own token below the caller's: the Raft actor cancels it when it
    // stops on a storage failure, which stops every service of this node.
    let shutdown = shutdown.child_token();
    let tls = Tls::load(TlsPaths {
        ca: config.tls.ca.clone(),
        cert: config.tls.cert.clone(),
        key: config.tls.key.clone(),
    })
    .map_err(|e| CoordError::Config(format!("TLS: {e}")))?;
    let me = tls.identity();
    match me.role {
        pxemesh_certs::Role::Coordinator { id } if id == config.node_id => {}
        _ => {
            return Err(CoordError::Config(format!(
                "certificate {} does not belong to coordinator {}",
                me, config.node_id
            )))
        }
    }
    let key = ClusterKey::load(&config.cluster_key_file)?;
    std::fs::create_dir_all(&config.data_dir)?;
    crate::limits::check_startup_space(&config.data_dir)?;
    let db = sled::Config::new()
        .path(config.data_dir.join("sled"))
        .mode(sled::Mode::HighThroughput)
        .open()?;
    let store = RaftStore::open(db, &config.data_dir.join("raft-wal"))?;
    let metrics = Arc::new(Metrics::new());
    let tracker = TaskTracker::new();
    let reloader = tls.spawn_reloader(
        shutdown.clone(),
        Duration::from_secs(config.tls.reload_check_seconds.max(1)),
    );

    let (tx, rx) = mpsc::channel(4096);
    let transport = Transport::new(
        tls.clone(),
        tx.clone(),
        shutdown.child_token(),
        tracker.clone(),
        metrics.clone(),
    );
    let (node, node_task) = node::start(
        NodeOptions {
            id: config.node_id,
            initial_peers: config.peer_map(),
            join: config.join,
            settings: config.raft_settings(),
            disk: Some(crate::limits::DiskGuard::new(
                config.data_dir.clone(),
                config.limits.min_free_bytes,
            )),
        },
        store.clone(),
        transport,
        metrics.clone(),
        tx,
        rx,
        shutdown.clone(),
    )?;

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<AdminServiceServer<AdminApi>>().await;
    health.set_serving::<RelayServiceServer<RelayApi>>().await;
    health.set_serving::<RaftServiceServer<RaftApi>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pxemesh_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| CoordError::Config(format!("reflection: {e}")))?;

    let grpc_addr = listeners.grpc.local_addr()?;
    let incoming = tls_incoming(
        listeners.grpc,
        tls.clone(),
        shutdown.clone(),
        tracker.clone(),
    );
    let blobs = Arc::new(BlobStore::open(&config.data_dir.join("blobs"))?);
    let bridge = match config.cloudstack.clone() {
        Some(cs) => {
            let (bridge, handle) = crate::cloudstack::bridge::Bridge::new(
                node.clone(),
                key.clone(),
                cs,
                metrics.cloudstack.clone(),
                blobs.clone(),
            )
            .map_err(|e| CoordError::Config(format!("[cloudstack]: {e}")))?;
            tracker.spawn(bridge.run(shutdown.clone()));
            Some(handle)
        }
        None => None,
    };
    let limits = config.limits.clone();
    let admin = AdminServiceServer::new(
        AdminApi::new(node.clone(), key.clone(), blobs.clone(), metrics.clone())
            .with_cloudstack(bridge),
    )
    .max_decoding_message_size(limits.max_request_bytes)
    .max_encoding_message_size(limits.max_response_bytes);
    let raft = RaftServiceServer::new(RaftApi::new(node.clone()))
        .max_decoding_message_size(MAX_RAFT_MESSAGE)
        .max_encoding_message_size(MAX_RAFT_MESSAGE);
    let grpc_shutdown = shutdown.clone();
    let grpc = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .max_concurrent_streams(Some(limits.max_streams_per_connection))
        .concurrency_limit_per_connection(limits.max_concurrent_requests_per_connection)
        .layer(AuthLayer::new(tls.clone(), metrics.clone()))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(admin)
        .add_service(
            RelayServiceServer::new(
                RelayApi::new(node.clone(), blobs.clone(), metrics.clone()).with_cluster_key(key),
            )
            .max_decoding_message_size(limits.max_request_bytes)
            .max_encoding_message_size(limits.max_response_bytes),
        )
        .add_service(raft)
        .serve_with_incoming_shutdown(incoming, async move { grpc_shutdown.cancelled().await });
    let grpc = tokio::spawn(grpc);

    tracker.spawn(crate::images::run(
        crate::images::Replicator {
            node: node.clone(),
            store: blobs.clone(),
            tls: tls.clone(),
            metrics: metrics.clone(),
            config: config.images.clone(),
        },
        shutdown.clone(),
    ));

    if let Some(ml) = listeners.metrics {
        let addr = ml.local_addr()?;
        let m = metrics.clone();
        let sd = shutdown.clone();
        tracker.spawn(async move {
            if let Err(e) = crate::metrics::serve_text(ml, move || m.render(), sd).await {
                warn!(error = %e, "metrics endpoint failed");
            }
        });
        info!(%addr, "metrics endpoint listening");
    }
    info!(node = config.node_id, %grpc_addr, identity = %me, "coordinator serving");
    crate::notify::notify_or_log(&format!(
        "READY=1\nSTATUS=coordinator {} serving on {grpc_addr}",
        config.node_id
    ));

    shutdown.cancelled().await;
    info!(node = config.node_id, "shutting down");
    crate::notify::notify_or_log("STOPPING=1");
    let drain = async {
        if let Ok(Err(e)) = grpc.await {
            warn!(error = %e, "gRPC server ended with an error");
        }
        let _ = node_task.await;
        tracker.close();
        tracker.wait().await;
        let _ = reloader.await;
    };
    if tokio::time::timeout(DRAIN, drain).await.is_err() {
        warn!("shutdown drain timed out; stopping anyway");
    }
    if let Some(f) = node.fatal() {
        // Do not flush: the state is what the failed write left; a restart
        // recovers from the durable log.
        error!(node = config.node_id, error = %f.message, disk_full = f.disk_full, "coordinator stopped after a storage failure");
        return Err(CoordError::StorageFailed(f.message));
    }
    store.flush()?;
    info!(node = config.node_id, "coordinator stopped");
    Ok(())
}

/// Accept TCP connections and complete TLS handshakes off the accept loop, so
/// a slow or hostile client cannot stall other connections.
fn tls_incoming(
    listener: TcpListener,
    tls: Arc<Tls>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tracker.spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => return,
                a = listener.accept() => a,
            };
            let (tcp, remote) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                warn!(%remote, "too many TLS handshakes in progress; connection dropped");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => debug!(%remote, error = %e, "TLS handshake failed"),
                    Err(_) => debug!(%remote, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
