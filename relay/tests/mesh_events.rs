//! Boot-event shipping (`sync::ship_events`) against a real 1-node
//! coordinator running in-process on loopback, with certificates from a
//! throw-away CA. No root needed (the namespace version is mesh_netns.rs):
//!
//! - events recorded while no coordinator listens (1200: three reports)
//!   are delivered, in order and once, soon after it starts;
//! - with the coordinator up, a new event is stored within a second (the
//!   target is ~200 ms: 50 ms coalescing plus one Raft write);
//! - a relay restarted on the same journal continues its sequence numbers
//!   and stores nothing twice, also when its `shipped` mark did not reach
//!   the disk before the crash (it resends; the coordinators drop repeats);
//! - a relay whose journal was reset (new data directory, same identity)
//!   still gets its events stored: they are renumbered above the mark the
//!   coordinators hold.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pxemesh_certs::{Ca, Identity, LeafRequest, Role, Tls, TlsPaths};
use pxemesh_coordinator::crypto::ClusterKey;
use pxemesh_coordinator::{Config, Listeners};
use pxemesh_proto::v1 as pb;
use pxemesh_proto::v1::admin_service_client::AdminServiceClient;
use pxemesh_relay::events::{EventKind, EventLog};
use pxemesh_relay::metrics::RelayMetrics;
use pxemesh_relay::sync::{self, ShipContext};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

const TD: &str = "ship.pxemesh";
const MAC: &str = "52:54:00:00:00:07";

fn issue(ca: &Ca, dir: &Path, role: Role, stem: &str) {
    let mut req = LeafRequest::new(Identity::new(TD, role), 1);
    req.dns_names = vec!["localhost".into()];
    req.ips = vec!["127.0.0.1".parse().unwrap()];
    ca.issue(&req).unwrap().save(dir, stem).unwrap();
}

/// A relay's journal and its shipper.
struct Relay {
    log: Arc<EventLog>,
    metrics: Arc<RelayMetrics>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    _db: sled::Db,
}

impl Relay {
    fn start(data: &Path, endpoints: Vec<String>, tls: Arc<Tls>) -> Relay {
        let db = sled::open(data).unwrap();
        let metrics = Arc::new(RelayMetrics::new());
        let log = Arc::new(EventLog::open(&db, metrics.clone()).unwrap());
        let stop = CancellationToken::new();
        let task = tokio::spawn(sync::ship_events(
            ShipContext {
                endpoints,
                tls,
                events: log.clone(),
                metrics: metrics.clone(),
            },
            stop.clone(),
        ));
        Relay {
            log,
            metrics,
            stop,
            task,
            _db: db,
        }
    }

    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("shipper stops")
            .unwrap();
        self.log.flush().await.unwrap();
    }
}

/// Every event stored for `MAC`, oldest first (paged); None while the
/// coordinator cannot answer (no leader yet).
async fn stored(admin: &mut AdminServiceClient<Channel>) -> Option<Vec<pb::HostEvent>> {
    let mut out: Vec<pb::HostEvent> = Vec::new();
    for _ in 0..100 {
        let after_id = out.last().map(|e| e.id).unwrap_or(0);
        let page = admin
            .list_events(pb::ListEventsRequest {
                mac: MAC.into(),
                after_id,
                limit: 1000,
                consistency: 0,
            })
            .await
            .ok()?
            .into_inner()
            .events;
        if page.is_empty() {
            break;
        }
        out.extend(page);
    }
    Some(out)
}

/// Polls (bounded) until `admin` holds `n` events for `MAC`; returns them
/// and the time it took.
async fn until_stored(
    admin: &mut AdminServiceClient<Channel>,
    n: usize,
    within: Duration,
) -> (Vec<pb::HostEvent>, Duration) {
    let t = Instant::now();
    loop {
        let got = stored(admin).await.unwrap_or_default();
        if got.len() >= n || t.elapsed() > within {
            assert_eq!(
                got.len(),
                n,
                "after {:?}: stored {} events, expected {n}",
                t.elapsed(),
                got.len()
            );
            return (got, t.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_events_reach_the_coordinators_once_across_outages_and_restarts() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let ca = Ca::generate(TD, 1).unwrap();
    ca.save(d).unwrap();
    issue(&ca, d, Role::Coordinator { id: 1 }, "coordinator-1");
    let admin_role = Role::Admin {
        name: "admin".into(),
    };
    issue(&ca, d, admin_role, "admin");
    let relay_role = Role::Relay {
        rack: "r1".into(),
        name: "relay-a".into(),
    };
    issue(&ca, d, relay_role, "relay-a");
    ClusterKey::generate(&d.join("cluster.key")).unwrap();
    let relay_tls = Tls::load(TlsPaths::in_dir(d, "relay-a")).unwrap();

    // The coordinator's address, reserved now, listened on later.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let endpoints = vec![dead, addr.clone()];

    // --- Coordinators unreachable: 1200 events wait in the journal.
    let relay_dir = d.join("relay");
    let relay = Relay::start(&relay_dir, endpoints.clone(), relay_tls.clone());
    const N: usize = 1200;
    for i in 0..N {
        let kind = if i % 2 == 0 {
            EventKind::DhcpOffer
        } else {
            EventKind::DhcpAck
        };
        relay.log.record(MAC, kind, &format!("e{i}"));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(relay.log.shipped(), 0);
    assert_eq!(relay.metrics.boot_events_pending.get(), N as i64);

    // --- The coordinator starts.
    let grpc = tokio::net::TcpListener::bind(&addr).await.unwrap();
    let config = Config::from_toml(&format!(
        "node_id = 1\nlisten = \"{addr}\"\ndata_dir = \"{data}\"\ncluster_key_file = \"{key}\"\n\n\
         [tls]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{ckey}\"\n\n\
         [[peers]]\nid = 1\naddress = \"{addr}\"\n",
        data = d.join("coord").display(),
        key = d.join("cluster.key").display(),
        ca = d.join("ca.pem").display(),
        cert = d.join("coordinator-1.pem").display(),
        ckey = d.join("coordinator-1-key.pem").display(),
    ))
    .unwrap();
    let coord_stop = CancellationToken::new();
    let coordinator = tokio::spawn(pxemesh_coordinator::run(
        config,
        Listeners {
            grpc,
            metrics: None,
        },
        coord_stop.clone(),
    ));
    let started = Instant::now();
    let admin_tls = Tls::load(TlsPaths::in_dir(d, "admin")).unwrap();
    let mut admin = AdminServiceClient::new(
        pxemesh_coordinator::client::channel_lazy(&addr, admin_tls).unwrap(),
    );
    let (got, _) = until_stored(&mut admin, N, Duration::from_secs(20)).await;
    eprintln!(
        "{N} events recorded during the outage stored {:?} after the coordinator started",
        started.elapsed()
    );
    let details: Vec<String> = got.iter().map(|e| e.detail.clone()).collect();
    let want: Vec<String> = (0..N).map(|i| format!("e{i}")).collect();
    assert_eq!(details, want, "in order, each once");
    assert!(got.iter().all(|e| e.relay == "relay-a" && e.rack == "r1"));
    assert_eq!(got[0].kind, "dhcp-offer");
    assert_eq!(got[1].kind, "dhcp-ack");
    let t = Instant::now();
    // The shipped mark moves first, the counters just after it.
    while relay.log.shipped() < N as u64
        || relay.metrics.boot_events_shipped.get() < N as u64
        || relay.metrics.boot_events_pending.get() != 0
    {
        assert!(t.elapsed() < Duration::from_secs(5), "mark not moved");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(relay.metrics.boot_events_shipped.get(), N as u64);
    assert_eq!(relay.metrics.boot_events_pending.get(), 0);

    // --- Coordinator up: one new event is stored promptly.
    let mut worst = Duration::ZERO;
    for i in 0..5 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        relay
            .log
            .record(MAC, EventKind::HttpFile, &format!("live{i}"));
        let (_, took) = until_stored(&mut admin, N + i + 1, Duration::from_secs(1)).await;
        worst = worst.max(took);
    }
    eprintln!("live events stored within {worst:?} (worst of 5)");

    // --- Relay restart on the same journal: numbers continue, nothing twice.
    let last = relay.log.last_sequence();
    relay.stop().await;
    let relay = Relay::start(&relay_dir, endpoints.clone(), relay_tls.clone());
    assert_eq!(relay.log.shipped(), last);
    relay
        .log
        .record(MAC, EventKind::ProvisionDone, "after-restart");
    assert_eq!(relay.log.last_sequence(), last + 1);
    let (got, _) = until_stored(&mut admin, N + 6, Duration::from_secs(2)).await;
    assert_eq!(got.last().unwrap().detail, "after-restart");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        stored(&mut admin).await.map(|v| v.len()),
        Some(N + 6),
        "nothing twice"
    );
    let last = relay.log.last_sequence();
    relay.stop().await;

    // --- Acknowledged, but the relay died before its mark reached the
    // disk: put the persisted mark back 600 events (the tree and key are
    // the journal's own) and restart. The relay resends them; the
    // coordinators store none of them again.
    {
        let db = sled::open(&relay_dir).unwrap();
        let marks = db.open_tree("boot-events-shipped").unwrap();
        marks
            .insert("shipped", &(last - 600).to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    let relay = Relay::start(&relay_dir, endpoints.clone(), relay_tls.clone());
    assert_eq!(relay.log.shipped(), last - 600);
    let t = Instant::now();
    while relay.log.shipped() < last {
        assert!(t.elapsed() < Duration::from_secs(5), "resend not acked");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        stored(&mut admin).await.map(|v| v.len()),
        Some(N + 6),
        "a resent report stored nothing twice"
    );
    relay.stop().await;

    // --- A reset journal under the same identity: its first numbers are
    // at or below the coordinators' mark; they are renumbered, not lost.
    let fresh = Relay::start(&d.join("relay-reset"), endpoints, relay_tls);
    for i in 0..3 {
        fresh
            .log
            .record(MAC, EventKind::DhcpAck, &format!("reset{i}"));
    }
    let (got, took) = until_stored(&mut admin, N + 9, Duration::from_secs(5)).await;
    let tail: Vec<&str> = got[N + 6..].iter().map(|e| e.detail.as_str()).collect();
    assert_eq!(tail, vec!["reset0", "reset1", "reset2"]);
    assert!(fresh.log.last_sequence() > last + 1);
    eprintln!("reset journal's events stored after {took:?}, renumbered");
    fresh.stop().await;

    coord_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), coordinator).await;
}
