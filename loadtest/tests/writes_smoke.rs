//! Smoke test of the write benchmark: a 1-node coordinator runs in-process on a
//! loopback port-0 listener with certificates from a throw-away CA, and the
//! `writes` library function puts 50 hosts with 4 clients.

use std::path::Path;
use std::time::Duration;

use pxemesh_certs::{Ca, Identity, LeafRequest, Role};
use pxemesh_coordinator::crypto::ClusterKey;
use pxemesh_coordinator::{Config, Listeners};
use pxemesh_loadtest::{ConnectMode, Target, TlsPaths, WritesConfig};
use tokio_util::sync::CancellationToken;

const TRUST_DOMAIN: &str = "smoke.pxemesh";

fn issue(ca: &Ca, dir: &Path, role: Role, stem: &str) {
    let mut req = LeafRequest::new(Identity::new(TRUST_DOMAIN, role), 1);
    req.dns_names = vec!["localhost".into()];
    req.ips = vec!["127.0.0.1".parse().unwrap()];
    ca.issue(&req).unwrap().save(dir, stem).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_50_hosts_with_4_clients() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let ca = Ca::generate(TRUST_DOMAIN, 1).unwrap();
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
    ClusterKey::generate(&d.join("cluster.key")).unwrap();

    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = grpc.local_addr().unwrap().to_string();
    let config = Config::from_toml(&format!(
        "node_id = 1\nlisten = \"{addr}\"\ndata_dir = \"{data}\"\ncluster_key_file = \"{key}\"\n\n\
         [tls]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{ckey}\"\n\n\
         [[peers]]\nid = 1\naddress = \"{addr}\"\n",
        data = d.join("data").display(),
        key = d.join("cluster.key").display(),
        ca = d.join("ca.pem").display(),
        cert = d.join("coordinator-1.pem").display(),
        ckey = d.join("coordinator-1-key.pem").display(),
    ))
    .unwrap();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(pxemesh_coordinator::run(
        config,
        Listeners {
            grpc,
            metrics: None,
        },
        shutdown.clone(),
    ));

    let mut cfg = WritesConfig::new(
        Target::Pxemesh,
        vec![addr.clone()],
        TlsPaths::in_dir(d, "admin"),
    );
    cfg.clients = 4;
    cfg.requests = 50;
    cfg.warmup = 4;
    cfg.connect = ConnectMode::Spread;
    cfg.max_duration = Duration::from_secs(30);
    let report = pxemesh_loadtest::writes(&cfg).await.expect("writes run");
    assert_eq!(report.ok, 50, "{}", report.to_text());
    assert_eq!(report.errors, 0, "{}", report.to_text());
    assert!(!report.failed());
    assert!(report.writes_per_second > 0.0, "{}", report.to_text());
    assert!(report.latency_us.p50 > 0 && report.latency_us.max >= report.latency_us.p99);
    assert_eq!(report.endpoints, vec![addr.clone()]);

    // A second run against the same cluster must not collide with the first.
    cfg.requests = 10;
    cfg.warmup = 0;
    let again = pxemesh_loadtest::writes(&cfg).await.expect("second run");
    assert_eq!(again.ok, 10, "{}", again.to_text());
    assert!(again.first_index >= report.first_index + 54);

    // Propagation: 5 relay watchers (certificates issued from the CA here) see
    // every write; the hosts are cleaned up afterwards.
    let prop = pxemesh_loadtest::propagation::PropagationConfig {
        endpoints: vec![addr.clone()],
        tls_dir: d.to_path_buf(),
        cert_stem: "admin".into(),
        watchers: 5,
        writes: 20,
        rack: "prop".into(),
        timeout: Duration::from_secs(5),
    };
    let p = pxemesh_loadtest::propagation::propagation(&prop)
        .await
        .expect("propagation run");
    assert_eq!(
        (p.timeouts, p.all.len(), p.each.len()),
        (0, 20, 100),
        "{}",
        p.to_text()
    );
    assert!(p.from_send.value_at_quantile(0.99) >= 1);

    // Storm registration (`storm --register`): 30 hosts, with their rack,
    // network and profile, put through the admin API; the hosts are deleted
    // again afterwards.
    {
        use pxemesh_loadtest::storm::fleet::{BootFiles, Fleet};
        use pxemesh_loadtest::storm::register::{register, Registration};
        use pxemesh_proto::v1 as pb;
        let fleet = Fleet {
            prefix: "reg".into(),
            count: 30,
            subnet: "10.77.0.0".parse().unwrap(),
            prefix_len: 16,
        };
        let reg = Registration {
            endpoints: vec![addr.clone()],
            tls: TlsPaths::in_dir(d, "admin"),
            rack: "storm-r".into(),
            network: "storm-n".into(),
        };
        let r = register(&reg, &fleet, &BootFiles::default())
            .await
            .expect("register storm hosts");
        let tls = pxemesh_certs::Tls::load(TlsPaths::in_dir(d, "admin")).unwrap();
        let ch = pxemesh_coordinator::client::channel(&addr, tls)
            .await
            .unwrap();
        let mut admin = pb::admin_service_client::AdminServiceClient::new(ch);
        let get = |name: &str| pb::GetRequest {
            kind: pb::Kind::Host as i32,
            name: name.into(),
            consistency: 0,
        };
        let h = admin.get(get("reg-00029")).await.expect("registered host");
        match h.into_inner().object.and_then(|o| o.record) {
            Some(pb::object::Record::Host(h)) => {
                assert_eq!(h.mac, fleet.host(29).mac_text());
                assert_eq!(h.ip, "10.77.0.39");
                assert_eq!(
                    (h.rack.as_str(), h.network.as_str()),
                    ("storm-r", "storm-n")
                );
            }
            other => panic!("not a host: {other:?}"),
        }
        assert_eq!(r.cleanup().await.unwrap(), 0, "every delete succeeds");
        let gone = admin.get(get("reg-00000")).await.unwrap_err();
        assert_eq!(gone.code(), tonic::Code::NotFound);
        // A second registration finds rack, network and profile in place.
        let again = register(&reg, &fleet, &BootFiles::default()).await.unwrap();
        assert_eq!(again.cleanup().await.unwrap(), 0);
    }

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("coordinator stops")
        .expect("join")
        .expect("coordinator ran cleanly");
}
