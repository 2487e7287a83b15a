//! Prometheus metrics of a coordinator, served as text on `/metrics`.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct RpcLabels {
    pub method: String,
    pub admission: String,
}

pub struct Metrics {
    registry: Registry,
    pub proposals: Counter,
    pub proposals_failed: Counter,
    pub applied_entries: Counter,
    pub applied_index: Gauge,
    pub term: Gauge,
    pub is_leader: Gauge,
    pub leader_changes: Counter,
    pub raft_messages_received: Counter,
    pub raft_messages_sent: Counter,
    pub raft_messages_dropped: Counter,
    pub snapshots_installed: Counter,
    pub snapshot_bytes: Gauge,
    pub compactions: Counter,
    pub log_syncs: Counter,
    pub storage_failures: Counter,
    pub wall_clock_step_ms: Gauge,
    pub rpcs: Family<RpcLabels, Counter>,
    pub auth_denied: Counter,
    pub images: crate::images::ImageMetrics,
    pub cloudstack: crate::cloudstack::bridge::BridgeMetrics,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("pxemesh_coordinator");
        let m = Metrics {
            proposals: Counter::default(),
            proposals_failed: Counter::default(),
            applied_entries: Counter::default(),
            applied_index: Gauge::default(),
            term: Gauge::default(),
            is_leader: Gauge::default(),
            leader_changes: Counter::default(),
            raft_messages_received: Counter::default(),
            raft_messages_sent: Counter::default(),
            raft_messages_dropped: Counter::default(),
            snapshots_installed: Counter::default(),
            snapshot_bytes: Gauge::default(),
            compactions: Counter::default(),
            log_syncs: Counter::default(),
            storage_failures: Counter::default(),
            wall_clock_step_ms: Gauge::default(),
            rpcs: Family::default(),
            auth_denied: Counter::default(),
            images: Default::default(),
            cloudstack: Default::default(),
            registry: Registry::default(),
        };
        registry.register(
            "proposals",
            "Commands proposed through this node",
            m.proposals.clone(),
        );
        registry.register(
            "proposals_failed",
            "Proposals refused at once (no leader)",
            m.proposals_failed.clone(),
        );
        registry.register(
            "applied_entries",
            "Normal raft entries applied",
            m.applied_entries.clone(),
        );
        registry.register(
            "applied_index",
            "Last applied raft index",
            m.applied_index.clone(),
        );
        registry.register("raft_term", "Current raft term", m.term.clone());
        registry.register(
            "is_leader",
            "1 when this node is the raft leader",
            m.is_leader.clone(),
        );
        registry.register(
            "leader_changes",
            "Leader changes observed",
            m.leader_changes.clone(),
        );
        registry.register(
            "raft_messages_received",
            "Raft messages received from peers",
            m.raft_messages_received.clone(),
        );
        registry.register(
            "raft_messages_sent",
            "Raft messages sent to peers",
            m.raft_messages_sent.clone(),
        );
        registry.register(
            "raft_messages_dropped",
            "Raft messages dropped on a full peer queue",
            m.raft_messages_dropped.clone(),
        );
        registry.register(
            "snapshots_installed",
            "Snapshots received and installed",
            m.snapshots_installed.clone(),
        );
        registry.register(
            "snapshot_bytes",
            "Size of the last snapshot installed from the leader",
            m.snapshot_bytes.clone(),
        );
        registry.register(
            "log_compactions",
            "Raft log compactions",
            m.compactions.clone(),
        );
        registry.register(
            "grpc_requests",
            "gRPC calls by method and admission (admitted, unauthenticated, permission_denied)",
            m.rpcs.clone(),
        );
        registry.register(
            "log_syncs",
            "Durable syncs of the raft log",
            m.log_syncs.clone(),
        );
        registry.register(
            "wall_clock_step_ms",
            "How far the system clock was stepped since start (job leases keep the start-time clock)",
            m.wall_clock_step_ms.clone(),
        );
        registry.register(
            "storage_failures",
            "Raft actor stops caused by a storage error (disk full, I/O error)",
            m.storage_failures.clone(),
        );
        registry.register(
            "auth_denied",
            "Calls refused by authorization",
            m.auth_denied.clone(),
        );
        m.images.register(&mut registry);
        m.cloudstack.register(&mut registry);
        Metrics { registry, ..m }
    }

    pub fn render(&self) -> String {
        self.wall_clock_step_ms.set(crate::clock::step_ms());
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Serve `/metrics` (Prometheus text from `render`) and `/healthz` on plain
/// HTTP until `shutdown`. Shared by the coordinator and the relay.
pub async fn serve_text<F>(
    listener: tokio::net::TcpListener,
    render: F,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()>
where
    F: Fn() -> String + Clone + Send + Sync + 'static,
{
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || async move { render() }),
        )
        .route("/healthz", axum::routing::get(|| async { "ok\n" }));
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
