//! Relay sync against a real 1-node coordinator running in-process on
//! loopback, with certificates from a throw-away CA:
//!
//! - the relay's watch (first endpoint dead, so it fails over) gets rack r1's
//!   hosts within 1 s, deletes and moves to another rack remove them, a
//!   multi-host write (one revision) arrives whole, rack r2's hosts never
//!   appear, and heartbeats report the applied revision;
//! - autonomy: with the coordinator stopped, a relay restarted on the same
//!   data directory serves the persisted rack at once (`server::run` in sync
//!   mode, checked over HTTP);
//! - a certificate that is not a relay's is refused at start.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pxemesh_certs::{Ca, Identity, LeafRequest, Role, Tls, TlsPaths};
use pxemesh_coordinator::crypto::ClusterKey;
use pxemesh_coordinator::{Config, Listeners};
use pxemesh_proto::v1 as pb;
use pxemesh_proto::v1::admin_service_client::AdminServiceClient;
use pxemesh_relay::config::RelayConfig;
use pxemesh_relay::metrics::RelayMetrics;
use pxemesh_relay::server::{self, RelayListeners};
use pxemesh_relay::state::{self, SharedState};
use pxemesh_relay::store::RackStore;
use pxemesh_relay::sync::{self, SyncContext};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

const TD: &str = "sync.pxemesh";

fn issue(ca: &Ca, dir: &Path, role: Role, stem: &str) {
    let mut req = LeafRequest::new(Identity::new(TD, role), 1);
    req.dns_names = vec!["localhost".into()];
    req.ips = vec!["127.0.0.1".parse().unwrap()];
    ca.issue(&req).unwrap().save(dir, stem).unwrap();
}

fn rack(name: &str) -> pb::Object {
    pb::Object {
        record: Some(pb::object::Record::Rack(pb::Rack {
            name: name.into(),
            ..Default::default()
        })),
    }
}

fn network(name: &str, rack: &str, subnet: &str) -> pb::Object {
    pb::Object {
        record: Some(pb::object::Record::Network(pb::Network {
            name: name.into(),
            rack: rack.into(),
            subnet: subnet.into(),
            ..Default::default()
        })),
    }
}

fn host(name: &str, rack: &str, net: &str, mac_last: u8, ip: &str) -> pb::Object {
    pb::Object {
        record: Some(pb::object::Record::Host(pb::Host {
            name: name.into(),
            mac: format!("52:54:00:00:00:{mac_last:02x}"),
            ip: ip.into(),
            rack: rack.into(),
            network: net.into(),
            profile: if rack == "r1" {
                "local".into()
            } else {
                String::new()
            },
            ..Default::default()
        })),
    }
}

fn profile(name: &str) -> pb::Object {
    pb::Object {
        record: Some(pb::object::Record::Profile(pb::BootProfile {
            name: name.into(),
            kind: "localboot".into(),
            ..Default::default()
        })),
    }
}

async fn put(admin: &mut AdminServiceClient<Channel>, o: pb::Object) -> u64 {
    admin
        .put(pb::PutRequest { object: Some(o) })
        .await
        .expect("put")
        .into_inner()
        .revision
}

fn hosts(state: &SharedState) -> Vec<String> {
    let mut v: Vec<String> = state
        .load()
        .hosts()
        .iter()
        .map(|h| h.name.clone())
        .collect();
    v.sort();
    v
}

/// Polls (bounded) until `f` holds; returns how long it took.
async fn until(what: &str, within: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < within, "timed out after {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    t.elapsed()
}

/// A port nothing listens on (bound, then released).
fn dead_endpoint() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// `GET path` over HTTP/1.1 on loopback; returns the status code.
async fn http_status(port: u16, path: &str) -> u16 {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("HTTP answer")
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    eprintln!("GET {path}: {}", text.lines().last().unwrap_or(""));
    text.split(' ').nth(1).unwrap_or("0").parse().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_follows_its_rack_and_serves_it_without_coordinators() {
    // Logs with RUST_LOG=info (and --nocapture).
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let ca = Ca::generate(TD, 1).unwrap();
    ca.save(d).unwrap();
    issue(&ca, d, Role::Coordinator { id: 1 }, "coordinator-1");
    issue(
        &ca,
        d,
        Role::Admin {
            name: "admin".into(),
        },
        "admin",
    );
    issue(
        &ca,
        d,
        Role::Relay {
            rack: "r1".into(),
            name: "relay-a".into(),
        },
        "relay-r1-relay-a",
    );
    ClusterKey::generate(&d.join("cluster.key")).unwrap();

    // --- A 1-node coordinator.
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = grpc.local_addr().unwrap().to_string();
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
    let admin_tls = Tls::load(TlsPaths::in_dir(d, "admin")).unwrap();
    let mut admin = None;
    for _ in 0..100 {
        if let Ok(ch) = pxemesh_coordinator::client::channel(&addr, admin_tls.clone()).await {
            let mut c = AdminServiceClient::new(ch);
            if c.put(pb::PutRequest {
                object: Some(rack("r1")),
            })
            .await
            .is_ok()
            {
                admin = Some(c);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut admin = admin.expect("coordinator up within 10 s");
    put(&mut admin, rack("r2")).await;
    put(&mut admin, profile("local")).await;
    put(&mut admin, network("n1", "r1", "10.0.0.0/24")).await;
    put(&mut admin, network("n2", "r2", "10.1.0.0/24")).await;
    put(&mut admin, host("h1", "r1", "n1", 1, "10.0.0.11")).await;
    put(&mut admin, host("x1", "r2", "n2", 0x81, "10.1.0.11")).await;

    // --- The relay's sync, in-process; the first endpoint is dead.
    let relay_dir = d.join("relay");
    std::fs::create_dir_all(&relay_dir).unwrap();
    let relay_tls = Tls::load(TlsPaths::in_dir(d, "relay-r1-relay-a")).unwrap();
    let metrics = Arc::new(RelayMetrics::new());
    let sync_stop = CancellationToken::new();
    let (state, sync_task) = {
        let db = sled::open(relay_dir.join("sled")).unwrap();
        let mut store = RackStore::open(&db, "r1").unwrap();
        let (served, rev) = store.load();
        assert_eq!((rev, served.hosts().len()), (0, 0), "fresh relay");
        let state = state::shared(served);
        let ctx = SyncContext {
            endpoints: vec![dead_endpoint(), addr.clone()],
            tls: relay_tls.clone(),
            store,
            state: state.clone(),
            metrics: metrics.clone(),
            heartbeat_interval: Duration::from_millis(200),
        };
        let task = tokio::spawn(sync::run(ctx, sync_stop.clone()));
        (state, task)
    };
    until("first snapshot", Duration::from_secs(10), || {
        hosts(&state) == ["h1"]
    })
    .await;
    assert_eq!(state.load().rack, "r1");
    assert!(state.load().network("n1").is_some());
    assert!(state.load().network("n2").is_none(), "r2's network leaked");
    assert!(state.load().profile("local").is_some());
    assert!(metrics.sync_snapshots.get() >= 1);
    assert!(
        metrics.sync_reconnects.get() >= 1,
        "failed over the dead endpoint"
    );

    // A put in r1 arrives within 1 s.
    put(&mut admin, host("h2", "r1", "n1", 2, "10.0.0.12")).await;
    let took = until("h2 put", Duration::from_secs(1), || {
        hosts(&state) == ["h1", "h2"]
    })
    .await;
    eprintln!("put visible on the relay after {took:?}");

    // A delete: gone within 1 s.
    admin
        .delete(pb::DeleteRequest {
            kind: pb::Kind::Host as i32,
            name: "h1".into(),
        })
        .await
        .unwrap();
    until("h1 delete", Duration::from_secs(1), || {
        hosts(&state) == ["h2"]
    })
    .await;

    // Two hosts in one write (one revision, two events), and r2's writes
    // around them never show up.
    put(&mut admin, host("x2", "r2", "n2", 0x82, "10.1.0.12")).await;
    let rev = admin
        .apply(pb::ApplyRequest {
            objects: vec![
                host("h3", "r1", "n1", 3, "10.0.0.13"),
                host("h4", "r1", "n1", 4, "10.0.0.14"),
            ],
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner()
        .revision;
    until("h3+h4 apply", Duration::from_secs(1), || {
        hosts(&state) == ["h2", "h3", "h4"]
    })
    .await;
    assert!(state.load().revision >= rev);

    // A host moving to rack r2 arrives as a delete.
    put(&mut admin, host("h2", "r2", "n2", 2, "10.1.0.2")).await;
    until("h2 moved away", Duration::from_secs(1), || {
        hosts(&state) == ["h3", "h4"]
    })
    .await;
    let mac = "52:54:00:00:00:03".parse().unwrap();
    assert_eq!(
        state
            .load()
            .host_by_mac(&mac)
            .unwrap()
            .ip
            .unwrap()
            .to_string(),
        "10.0.0.13"
    );

    // Heartbeats: the coordinator's relay record carries the applied revision.
    let t = Instant::now();
    let applied = loop {
        let relays = admin
            .list(pb::ListRequest {
                kind: pb::Kind::Relay as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .objects;
        let got = relays.iter().find_map(|o| match &o.record {
            Some(pb::object::Record::Relay(r)) if r.name == "relay-a" => {
                Some((r.rack.clone(), r.applied_revision))
            }
            _ => None,
        });
        if let Some((rack, applied)) = got {
            if applied >= rev {
                assert_eq!(rack, "r1");
                break applied;
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no heartbeat: {relays:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("heartbeat reported applied revision {applied}");

    // Let the progress after the last change be persisted, then stop
    // everything: first the coordinator, then the relay's sync.
    tokio::time::sleep(Duration::from_millis(300)).await;
    coord_stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), coordinator)
        .await
        .expect("coordinator stops")
        .expect("join")
        .expect("coordinator ran cleanly");
    // Serving goes on from the state held.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(hosts(&state), ["h3", "h4"]);
    sync_stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), sync_task)
        .await
        .expect("sync stops")
        .expect("join");

    // --- Autonomy: restart the relay (server::run, sync mode) on the same
    // data directory while no coordinator runs; it serves r1 at once.
    {
        let db = sled::open(relay_dir.join("sled")).unwrap();
        let mut store = RackStore::open(&db, "r1").unwrap();
        let (served, resume) = store.load();
        assert!(resume >= rev, "resume point {resume} < {rev}");
        assert_eq!(served.hosts().len(), 2);
    }
    let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = http.local_addr().unwrap().port();
    let boot = d.join("boot");
    std::fs::create_dir_all(&boot).unwrap();
    let relay_config = |cert: &str| {
        RelayConfig::from_toml(&format!(
            "name = \"relay-a\"\ndata_dir = \"{data}\"\n\
             [[interfaces]]\nname = \"lo\"\naddress = \"127.0.0.1\"\n\
             [dhcp]\nenabled = false\n[tftp]\nenabled = false\n\
             [http]\nlisten = \"127.0.0.1:{port}\"\n[boot]\ndir = \"{boot}\"\n\
             [coordinators]\nendpoints = [\"{addr}\"]\nca = \"{ca}\"\ncert = \"{d}/{cert}.pem\"\nkey = \"{d}/{cert}-key.pem\"\n",
            data = relay_dir.display(),
            boot = boot.display(),
            ca = d.join("ca.pem").display(),
            d = d.display(),
        ))
        .unwrap()
    };
    let stop = CancellationToken::new();
    let started = Instant::now();
    let relay = tokio::spawn(server::run(
        relay_config("relay-r1-relay-a"),
        RelayListeners {
            http: Some(http),
            ..Default::default()
        },
        stop.clone(),
    ));
    let mut status = 0;
    while started.elapsed() < Duration::from_secs(5) {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            status = http_status(port, "/boot/52:54:00:00:00:03.ipxe").await;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(status, 200, "persisted host h3 served without coordinators");
    eprintln!("restarted relay served h3 after {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(http_status(port, "/boot/52:54:00:00:00:01.ipxe").await, 404);
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), relay)
        .await
        .expect("relay stops")
        .expect("join")
        .expect("relay ran cleanly");

    // A certificate that is not a relay's: refused at start.
    let err = server::run(
        relay_config("admin"),
        RelayListeners::default(),
        CancellationToken::new(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("not a relay"), "{err}");

    // The durable revision survived too.
    let db = sled::open(relay_dir.join("sled")).unwrap();
    let store = RackStore::open(&db, "r1").unwrap();
    assert!(store.durable_revision().load(Ordering::Acquire) >= rev);
}
