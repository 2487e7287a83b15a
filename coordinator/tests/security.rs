//! mTLS and authorization negatives, input validation, secrets at rest and
//! idempotent import, against a real coordinator process.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use pxemesh_certs::{Ca, Identity, LeafRequest, Role, Tls, TlsPaths};
use pxemesh_proto::v1 as pb;
use pxemesh_proto::v1::admin_service_client::AdminServiceClient;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tonic::transport::{Channel, Endpoint, Uri};

/// A client whose TLS is built by hand, for cases our `Tls` loader refuses to
/// build (a certificate from a foreign CA, no certificate at all).
fn raw_channel(
    addr: &str,
    ca_pem: &std::path::Path,
    client: Option<(&std::path::Path, &std::path::Path)>,
) -> Channel {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca_pem).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut cfg = match client {
        Some((cert, key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .unwrap()
                .map(|c| c.unwrap())
                .collect();
            let key = PrivateKeyDer::from_pem_file(key).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let addr = addr.to_string();
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(3))
        .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let connector = connector.clone();
            let addr = addr.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(&addr).await?;
                let name = ServerName::try_from("127.0.0.1").unwrap();
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
}

async fn list_racks(
    c: &mut AdminServiceClient<Channel>,
) -> Result<pb::ListResponse, tonic::Status> {
    let mut req = tonic::Request::new(pb::ListRequest {
        kind: pb::Kind::Rack as i32,
        ..Default::default()
    });
    req.set_timeout(Duration::from_secs(5));
    c.list(req).await.map(|r| r.into_inner())
}

fn log_has(cluster: &Cluster, needle: &str, also: &str) -> bool {
    cluster
        .log_text(1)
        .lines()
        .any(|l| l.contains(needle) && l.contains(also))
}

async fn wait_log(cluster: &Cluster, needle: &str, also: &str) {
    for _ in 0..50 {
        if log_has(cluster, needle, also) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "no log line with {needle:?} and {also:?}:\n{}",
        cluster.log_text(1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mtls_rejects_strangers_and_authorizes_by_role() {
    let cluster = Cluster::new(1);
    cluster.wait_leader(&[1], Duration::from_secs(10)).await;
    let addr = cluster.addr(1);
    let dir = cluster.dir().to_path_buf();
    let ca = dir.join("ca.pem");

    // The admin works.
    put(&mut cluster.client(1), rack("r1"))
        .await
        .expect("admin write");

    // No client certificate: UNAUTHENTICATED with a clear message.
    let mut anon = AdminServiceClient::new(raw_channel(&addr, &ca, None));
    let err = list_racks(&mut anon).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    assert!(err.message().contains("client certificate"), "{err}");
    wait_log(&cluster, "no client certificate", "AdminService/List").await;

    // Health checks need no certificate (load balancers, systemd probes).
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(raw_channel(&addr, &ca, None));
    let h = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "pxemesh.v1.AdminService".into(),
        })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(
        h.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // A certificate from another CA (same trust domain): the handshake fails and
    // the server log names the refused identity.
    let other_dir = tempfile::tempdir().unwrap();
    let other = Ca::generate(TRUST_DOMAIN, 30).unwrap();
    let leaf = other
        .issue(&LeafRequest::new(
            Identity::new(
                TRUST_DOMAIN,
                Role::Admin {
                    name: "mallory".into(),
                },
            ),
            30,
        ))
        .unwrap();
    let (cert, key) = leaf.save(other_dir.path(), "mallory").unwrap();
    let mut foreign = AdminServiceClient::new(raw_channel(&addr, &ca, Some((&cert, &key))));
    let err = list_racks(&mut foreign)
        .await
        .expect_err("foreign CA must be refused");
    assert_ne!(err.code(), tonic::Code::Ok);
    wait_log(&cluster, "rejected client certificate", "admin/mallory").await;

    // An expired certificate from the right CA.
    let expired = cluster.pki.issue_with(
        Role::Admin {
            name: "expired".into(),
        },
        "expired",
        |r| {
            r.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(10);
            r.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
        },
    );
    let mut old =
        AdminServiceClient::new(raw_channel(&addr, &ca, Some((&expired.cert, &expired.key))));
    let err = list_racks(&mut old)
        .await
        .expect_err("expired certificate must be refused");
    assert_ne!(err.code(), tonic::Code::Ok);
    wait_log(&cluster, "rejected client certificate", "admin/expired").await;

    // A relay certificate calling AdminService: PERMISSION_DENIED, logged with its identity.
    let relay = cluster.pki.tls(
        Role::Relay {
            rack: "r1".into(),
            name: "relay-a".into(),
        },
        "relay-r1-relay-a",
    );
    let mut as_relay = cluster.client_with(1, relay.clone());
    let err = list_racks(&mut as_relay).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    wait_log(&cluster, "permission denied", "relay/r1/relay-a").await;

    // A viewer reads but cannot write.
    let viewer = cluster.pki.tls(
        Role::Viewer {
            name: "vera".into(),
        },
        "viewer-vera",
    );
    let mut as_viewer = cluster.client_with(1, viewer);
    assert_eq!(
        list_racks(&mut as_viewer)
            .await
            .expect("viewer read")
            .objects
            .len(),
        1
    );
    let err = put(&mut as_viewer, rack("r2")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    let err = as_viewer
        .remove_member(pb::RemoveMemberRequest { id: 1 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    wait_log(&cluster, "permission denied", "admin/viewer/vera").await;

    // Only coordinators speak Raft; an admin certificate may not.
    let mut raft = pxemesh_proto::v1::raft_service_client::RaftServiceClient::new(
        pxemesh_coordinator::client::channel_lazy(&addr, cluster.admin.clone()).unwrap(),
    );
    let err = raft
        .stream(tokio_stream::iter(Vec::<pb::RaftMessage>::new()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    // And a coordinator certificate is not an admin.
    let coord = Tls::load(TlsPaths::in_dir(&dir, "coordinator-1")).unwrap();
    let err = put(&mut cluster.client_with(1, coord), rack("r3"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    // Relays reach RelayService; the rack comes from the certificate.
    put(&mut cluster.client(1), rack("r2")).await.unwrap();
    put(&mut cluster.client(1), network("n2", "r2", "10.2.0.0/24"))
        .await
        .unwrap();
    let mut rs = pxemesh_proto::v1::relay_service_client::RelayServiceClient::new(
        pxemesh_coordinator::client::channel_lazy(&addr, relay).unwrap(),
    );
    rs.heartbeat(pb::HeartbeatRequest {
        version: "test".into(),
        applied_revision: 1,
        ..Default::default()
    })
    .await
    .expect("heartbeat");
    // Asking for another rack is refused; the default view is the relay's own rack only.
    let Err(err) = rs
        .watch(pb::WatchRequest {
            from_revision: 0,
            rack: "r2".into(),
        })
        .await
    else {
        panic!("watching rack r2 with a rack r1 certificate must fail");
    };
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    wait_log(&cluster, "relay asked to watch another rack", "relay-a").await;
    let mut stream = rs
        .watch(pb::WatchRequest {
            from_revision: 0,
            rack: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let Some(pb::watch_response::Message::Snapshot(snap)) = first.message else {
        panic!("{first:?}")
    };
    let names: Vec<String> = snap
        .objects
        .iter()
        .filter_map(|o| match &o.record {
            Some(pb::object::Record::Rack(r)) => Some(format!("rack/{}", r.name)),
            Some(pb::object::Record::Network(n)) => Some(format!("network/{}", n.name)),
            _ => None,
        })
        .collect();
    assert_eq!(
        names,
        vec!["rack/r1".to_string()],
        "a relay sees only its own rack"
    );
    // Relay records are read through the admin API (pxemeshctl relay list).
    let out = cluster.ctl(&["-o", "json", "relay", "list"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["items"][0]["name"], "relay-a", "{v}");
    assert_eq!(v["items"][0]["rack"], "r1");
    assert_eq!(v["items"][0]["state"], "ready");

    // Nothing the refused callers tried was written.
    let racks = list_racks(&mut cluster.client(1)).await.unwrap();
    let names: Vec<String> = racks
        .objects
        .iter()
        .filter_map(|o| match &o.record {
            Some(pb::object::Record::Rack(r)) => Some(r.name.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(names, vec!["r1".to_string(), "r2".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reflection_lists_the_services() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let cluster = Cluster::new(1);
    cluster.wait_leader(&[1], Duration::from_secs(10)).await;
    let ch =
        pxemesh_coordinator::client::channel_lazy(&cluster.addr(1), cluster.admin.clone()).unwrap();
    let mut c = ServerReflectionClient::new(ch);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = c
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("{resp:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "pxemesh.v1.AdminService",
        "pxemesh.v1.RelayService",
        "pxemesh.v1.RaftService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_input_gets_a_clear_error_and_changes_nothing() {
    let cluster = Cluster::new(1);
    cluster.wait_leader(&[1], Duration::from_secs(10)).await;
    let mut c = cluster.client(1);
    seed(&mut c).await;
    put(&mut c, host(1)).await.unwrap();
    let profile = pb::Object {
        record: Some(pb::object::Record::Profile(pb::BootProfile {
            name: "p1".into(),
            kind: "ipxe".into(),
            ..Default::default()
        })),
    };
    put(&mut c, profile).await.unwrap();
    let before = list_racks(&mut c).await.unwrap().revision;

    let h = |edit: &dyn Fn(&mut pb::Host)| {
        let mut o = host(2);
        if let Some(pb::object::Record::Host(h)) = &mut o.record {
            edit(h);
        }
        o
    };
    let n = |edit: &dyn Fn(&mut pb::Network)| {
        let mut o = network("n2", "r1", "10.20.0.0/24");
        if let Some(pb::object::Record::Network(n)) = &mut o.record {
            edit(n);
        }
        o
    };
    let cases: Vec<(pb::Object, tonic::Code, &str)> = vec![
        (
            h(&|h| h.mac = "52:54:00:zz:00:01".into()),
            tonic::Code::InvalidArgument,
            "malformed MAC",
        ),
        (
            h(&|h| h.ip = "10.10.0.999".into()),
            tonic::Code::InvalidArgument,
            "malformed IPv4 address",
        ),
        (
            h(&|h| h.ip = "192.168.77.5".into()),
            tonic::Code::InvalidArgument,
            "outside network n1",
        ),
        (
            h(&|h| h.mac = "52:54:00:00:00:01".into()),
            tonic::Code::AlreadyExists,
            "duplicate MAC",
        ),
        (
            h(&|h| h.ip = "10.10.0.11".into()),
            tonic::Code::AlreadyExists,
            "duplicate IP",
        ),
        (
            h(&|h| h.rack = "nope".into()),
            tonic::Code::InvalidArgument,
            "unknown rack \"nope\"",
        ),
        (
            h(&|h| h.network = "nope".into()),
            tonic::Code::InvalidArgument,
            "unknown network \"nope\"",
        ),
        (
            h(&|h| h.profile = "nope".into()),
            tonic::Code::InvalidArgument,
            "unknown profile \"nope\"",
        ),
        (
            n(&|n| n.vlan = 4095),
            tonic::Code::InvalidArgument,
            "VLAN 4095 is outside 1-4094",
        ),
        (
            n(&|n| n.mtu = 575),
            tonic::Code::InvalidArgument,
            "MTU 575 is outside 576-9216",
        ),
        (
            n(&|n| n.mtu = 9217),
            tonic::Code::InvalidArgument,
            "MTU 9217 is outside 576-9216",
        ),
        (
            n(&|n| n.rack = "nope".into()),
            tonic::Code::InvalidArgument,
            "unknown rack",
        ),
        (
            n(&|n| n.subnet = "10.20.0.0/40".into()),
            tonic::Code::InvalidArgument,
            "malformed IPv4 CIDR",
        ),
    ];
    for (obj, code, msg) in cases {
        let err = put(&mut c, obj).await.expect_err(msg);
        assert_eq!(err.code(), code, "{msg}: {err}");
        assert!(
            err.message().contains(msg),
            "{:?} should contain {msg:?}",
            err.message()
        );
    }
    // Deleting something in use is refused too.
    let err = c
        .delete(pb::DeleteRequest {
            kind: pb::Kind::Network as i32,
            name: "n1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("in use by host h1"), "{err}");

    let after = list_racks(&mut c).await.unwrap().revision;
    assert_eq!(
        before, after,
        "rejected writes must not change the revision"
    );
    let names = host_names(&mut c, pb::Consistency::Linearizable)
        .await
        .unwrap();
    assert_eq!(names.len(), 1);
    // The same checks through pxemeshctl print the reason and exit non-zero.
    let out = cluster.ctl(&[
        "host",
        "put",
        "hx",
        "--mac",
        "52:54:00:00:00:01",
        "--ip",
        "10.10.0.50",
        "--rack",
        "r1",
        "--network",
        "n1",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("duplicate MAC 52:54:00:00:00:01: already used by host h1"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bmc_passwords_are_sealed_and_import_is_idempotent() {
    let cluster = Cluster::new(1);
    cluster.wait_leader(&[1], Duration::from_secs(10)).await;
    seed(&mut cluster.client(1)).await;
    let secret = "Sup3r-Secret-BMC-pw";
    let csv = cluster.dir().join("hosts.csv");
    let mut text = String::from(
        "name,mac,ip,rack,network,bmc_address,bmc_username,bmc_password,bmc_cipher_suite,labels\n",
    );
    for i in 0..20 {
        text.push_str(&format!(
            "node{i},52:54:00:01:00:{i:02x},10.10.1.{},r1,n1,10.99.0.{},ADMIN,{secret},3,role=compute;row=a\n",
            10 + i,
            10 + i
        ));
    }
    std::fs::write(&csv, text).unwrap();
    let csv = csv.to_string_lossy().to_string();
    let first = cluster.ctl(&["host", "import", &csv]);
    let out = String::from_utf8_lossy(&first.stdout);
    assert!(
        first.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(
        out.contains("imported 20 hosts: 20 created, 0 updated, 0 unchanged"),
        "{out}"
    );
    let second = cluster.ctl(&["host", "import", &csv]);
    let out = String::from_utf8_lossy(&second.stdout);
    assert!(
        out.contains("imported 20 hosts: 0 created, 0 updated, 20 unchanged"),
        "{out}"
    );
    let json = cluster.ctl(&["-o", "json", "host", "import", &csv]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["unchanged"].as_u64(), Some(20), "{v}");

    // Reads never return the password; they say one is set.
    let got = cluster.ctl(&["-o", "json", "host", "get", "node3"]);
    let got_text = String::from_utf8_lossy(&got.stdout);
    assert!(
        got.status.success() && !got_text.contains(secret),
        "{got_text}"
    );
    let mut c = cluster.client(1);
    let resp = c
        .get(pb::GetRequest {
            kind: pb::Kind::Host as i32,
            name: "node3".into(),
            consistency: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let Some(pb::object::Record::Host(h)) = resp.object.unwrap().record else {
        panic!()
    };
    let bmc = h.bmc.unwrap();
    assert!(bmc.password.is_empty() && bmc.password_set);
    assert_eq!(bmc.cipher_suite, 3);
    let listed = cluster.ctl(&["-o", "json", "host", "list"]);
    assert!(!String::from_utf8_lossy(&listed.stdout).contains(secret));

    // At rest: neither the raft log nor the state machine holds the plaintext.
    cluster.ctl(&["cluster", "status"]);
    let mut found = false;
    for entry in walk(&cluster.dir().join("node1/data")) {
        let bytes = std::fs::read(&entry).unwrap_or_default();
        if bytes.windows(secret.len()).any(|w| w == secret.as_bytes()) {
            found = true;
            eprintln!("plaintext found in {}", entry.display());
        }
    }
    assert!(!found, "BMC password stored in plaintext");
    // The server log never prints it either.
    assert!(!cluster.log_text(1).contains(secret));
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// The DER of the certificate a server presents on a fresh TLS connection.
async fn presented_cert(addr: &str, tls: &Tls) -> Vec<u8> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(tls.client_config());
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let stream = connector.connect(name, tcp).await.unwrap();
    let (_, conn) = stream.get_ref();
    conn.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_certificate_rotates_without_restart() {
    let cluster = Cluster::new(1);
    cluster.wait_leader(&[1], Duration::from_secs(10)).await;
    let addr = cluster.addr(1);
    let before = presented_cert(&addr, &cluster.admin).await;
    let pid = cluster.pid(1);

    // Rotate: a new certificate and key for the same identity, written in place.
    let paths = cluster
        .pki
        .issue(Role::Coordinator { id: 1 }, "coordinator-1");
    let new_der = CertificateDer::pem_file_iter(&paths.cert)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .to_vec();
    assert_ne!(before, new_der);
    wait_log(&cluster, "reloaded TLS certificates", "coordinator/1").await;
    let mut after = presented_cert(&addr, &cluster.admin).await;
    for _ in 0..20 {
        if after == new_der {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        after = presented_cert(&addr, &cluster.admin).await;
    }
    assert_eq!(
        after, new_der,
        "new connections must see the rotated certificate"
    );
    assert_eq!(cluster.pid(1), pid, "no restart");
    put(&mut cluster.client(1), rack("after-rotation"))
        .await
        .expect("service continues");
}
