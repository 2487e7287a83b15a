//! Prometheus metrics of a relay (`/metrics` on the metrics listener).

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DhcpLabels {
    /// DHCP message type received (discover, request, ...).
    pub msg_type: String,
    /// What we did: offer, ack, nak, ignored-unknown-mac, ignored-not-for-us, malformed, ...
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub route: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

pub struct RelayMetrics {
    registry: Registry,
    /// Image cache (see `cache`).
    pub cache: crate::cache::CacheMetrics,
    pub dhcp_messages: Family<DhcpLabels, Counter>,
    pub dhcp_seconds: Histogram,
    pub tftp_transfers: Family<OutcomeLabels, Counter>,
    pub tftp_bytes: Counter,
    pub tftp_retransmits: Counter,
    pub tftp_active: Gauge,
    pub tftp_seconds: Histogram,
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_bytes: Counter,
    pub boot_events: Family<KindLabels, Counter>,
    /// Sync mode: full snapshots applied.
    pub sync_snapshots: Counter,
    /// Sync mode: watch events (puts and deletes) applied.
    pub sync_events: Counter,
    /// Sync mode: watch streams re-opened after a failure or an end.
    pub sync_reconnects: Counter,
    /// Sync mode: heartbeats that failed.
    pub sync_heartbeat_failures: Counter,
    /// Sync mode: the cluster revision the persisted rack copy reflects.
    pub sync_revision: Gauge,
    /// Sync mode: boot events the coordinators acknowledged.
    pub boot_events_shipped: Counter,
    /// Sync mode: boot events in the journal not yet acknowledged.
    pub boot_events_pending: Gauge,
    /// Sync mode: unacknowledged boot events dropped (journal full, or one
    /// event the coordinators refused as invalid).
    pub boot_events_dropped: Counter,
    /// Power jobs (`ipmi::runner`).
    pub ipmi: std::sync::Arc<crate::ipmi::IpmiMetrics>,
    /// Flood control and validation drops (`limits`).
    pub limits: crate::limits::LimitMetrics,
}

fn latency() -> Histogram {
    // 50 µs .. ~52 s
    Histogram::new(exponential_buckets(0.00005, 4.0, 11))
}

impl RelayMetrics {
    pub fn new() -> RelayMetrics {
        let mut r = Registry::with_prefix("pxemesh_relay");
        let m = RelayMetrics {
            registry: Registry::default(),
            cache: Default::default(),
            dhcp_messages: Family::default(),
            dhcp_seconds: latency(),
            tftp_transfers: Family::default(),
            tftp_bytes: Counter::default(),
            tftp_retransmits: Counter::default(),
            tftp_active: Gauge::default(),
            tftp_seconds: latency(),
            http_requests: Family::default(),
            http_bytes: Counter::default(),
            boot_events: Family::default(),
            sync_snapshots: Counter::default(),
            sync_events: Counter::default(),
            sync_reconnects: Counter::default(),
            sync_heartbeat_failures: Counter::default(),
            sync_revision: Gauge::default(),
            boot_events_shipped: Counter::default(),
            boot_events_pending: Gauge::default(),
            boot_events_dropped: Counter::default(),
            ipmi: Default::default(),
            limits: Default::default(),
        };
        m.ipmi.register(&mut r);
        r.register(
            "dhcp_messages",
            "DHCP messages by type and outcome",
            m.dhcp_messages.clone(),
        );
        r.register(
            "dhcp_handling_seconds",
            "Time to handle one DHCP message",
            m.dhcp_seconds.clone(),
        );
        r.register(
            "tftp_transfers",
            "TFTP transfers by outcome",
            m.tftp_transfers.clone(),
        );
        r.register(
            "tftp_sent_bytes",
            "TFTP payload bytes sent",
            m.tftp_bytes.clone(),
        );
        r.register(
            "tftp_retransmits",
            "TFTP windows retransmitted",
            m.tftp_retransmits.clone(),
        );
        r.register(
            "tftp_active_transfers",
            "TFTP transfers in progress",
            m.tftp_active.clone(),
        );
        r.register(
            "tftp_transfer_seconds",
            "Duration of TFTP transfers",
            m.tftp_seconds.clone(),
        );
        r.register(
            "http_requests",
            "HTTP requests by route and status",
            m.http_requests.clone(),
        );
        r.register(
            "http_sent_bytes",
            "HTTP body bytes sent",
            m.http_bytes.clone(),
        );
        r.register("boot_events", "Boot events by kind", m.boot_events.clone());
        r.register(
            "sync_snapshots",
            "Rack snapshots applied from the coordinators",
            m.sync_snapshots.clone(),
        );
        r.register(
            "sync_events",
            "Rack watch events applied",
            m.sync_events.clone(),
        );
        r.register(
            "sync_reconnects",
            "Watch streams re-opened",
            m.sync_reconnects.clone(),
        );
        r.register(
            "sync_heartbeat_failures",
            "Heartbeats to coordinators that failed",
            m.sync_heartbeat_failures.clone(),
        );
        r.register(
            "sync_revision",
            "Cluster revision of the persisted rack state",
            m.sync_revision.clone(),
        );
        r.register(
            "boot_events_shipped",
            "Boot events acknowledged by the coordinators",
            m.boot_events_shipped.clone(),
        );
        r.register(
            "boot_events_pending",
            "Boot events in the journal not yet acknowledged by the coordinators",
            m.boot_events_pending.clone(),
        );
        r.register(
            "boot_events_dropped",
            "Unacknowledged boot events dropped (journal full or refused)",
            m.boot_events_dropped.clone(),
        );
        m.cache.register(&mut r);
        m.limits.register(&mut r);
        RelayMetrics { registry: r, ..m }
    }

    pub fn dhcp(&self, msg_type: &str, outcome: &str) {
        self.dhcp_messages
            .get_or_create(&DhcpLabels {
                msg_type: msg_type.into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    pub fn tftp(&self, outcome: &str) {
        self.tftp_transfers
            .get_or_create(&OutcomeLabels {
                outcome: outcome.into(),
            })
            .inc();
    }

    pub fn http(&self, route: &str, code: u16) {
        self.http_requests
            .get_or_create(&HttpLabels {
                route: route.into(),
                code: code.to_string(),
            })
            .inc();
    }

    pub fn boot_event(&self, kind: &str) {
        self.boot_events
            .get_or_create(&KindLabels { kind: kind.into() })
            .inc();
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

impl Default for RelayMetrics {
    fn default() -> Self {
        RelayMetrics::new()
    }
}
