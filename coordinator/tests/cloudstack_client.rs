//! The CloudStack client against the simulator (tests/cloudstack_sim): real
//! HTTP on loopback, every request's signature and expiry checked by the
//! simulator's own implementation of CloudStack's verification.

mod cloudstack_sim;

use std::time::{Duration, Instant, SystemTime};

use cloudstack_sim::{Failure, Sim, API_KEY, SECRET};
use pxemesh_coordinator::cloudstack::client::params;
use pxemesh_coordinator::cloudstack::model::{CsHost, Zone};
use pxemesh_coordinator::cloudstack::{
    fetch, notify_provision_done, plan, sign, Client, ClientSettings, CsError, Inputs, Mapping,
    SecretKey,
};
use serde_json::{json, Value};

fn settings(sim: &Sim) -> ClientSettings {
    let mut s = ClientSettings::new(&sim.url(), API_KEY, SecretKey::new(SECRET).unwrap());
    s.request_timeout = Duration::from_secs(5);
    s.rate_per_second = 1000.0;
    s.burst = 1000;
    s.poll_initial = Duration::from_millis(10);
    s.poll_max = Duration::from_millis(50);
    s.async_deadline = Duration::from_secs(10);
    s
}

fn client(sim: &Sim) -> Client {
    Client::new(settings(sim)).unwrap()
}

fn host(i: usize) -> Value {
    json!({
        "id": format!("h-{i:03}"), "name": format!("bm-{i:03}"), "hypervisor": "BareMetal",
        "type": "Routing", "podid": "p1", "podname": "POD0", "zoneid": "z1", "zonename": "Z",
        "ipaddress": format!("172.16.15.{}", 10 + i), "cpunumber": 8, "cpuspeed": 2400,
        "memorytotal": 34359738368u64, "state": "Up", "resourcestate": "Enabled",
        "details": {"hostmac": format!("52:54:00:00:01:{i:02x}")}
    })
}

#[tokio::test]
async fn signed_calls_are_accepted() {
    let sim = Sim::start().await;
    sim.set(
        "zones",
        vec![
            json!({"id": "z1", "name": "Zone one", "networktype": "Advanced", "dns1": "10.1.1.2"}),
        ],
    );
    let c = client(&sim);
    // A value with spaces, slashes and '=' exercises the encoding rules.
    let zones: Vec<Zone> = c
        .list_all(
            "listZones",
            &params(&[("keyword", "Zone one/a=b ~x*")]),
            "zone",
        )
        .await
        .unwrap();
    assert_eq!(zones.len(), 1);
    assert_eq!(zones[0].name, "Zone one");
    let st = sim.state.lock().unwrap();
    assert!(st.rejected.is_empty(), "{:?}", st.rejected);
    assert_eq!(st.accepted.len(), 1);
}

#[tokio::test]
async fn wrong_key_and_expired_requests_are_rejected() {
    let sim = Sim::start().await;
    sim.set("zones", vec![json!({"id": "z1", "name": "Z"})]);
    let mut s = settings(&sim);
    s.secret_key = SecretKey::new("not-the-secret").unwrap();
    let c = Client::new(s).unwrap();
    match c.call("listZones", &[]).await {
        Err(CsError::Api {
            http_status: 401,
            errorcode: 401,
            errortext,
            ..
        }) => assert!(errortext.contains("signature"), "{errortext}"),
        other => panic!("expected a 401 API error, got {other:?}"),
    }

    // Raw requests below use reqwest's default client, which needs a
    // process-wide rustls provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Correctly signed but expired one second ago: refused for its expiry.
    let past = sign::expires_at(SystemTime::now() - Duration::from_secs(1));
    let p = params(&[
        ("command", "listZones"),
        ("apikey", API_KEY),
        ("response", "json"),
        ("signatureversion", "3"),
        ("expires", &past),
    ]);
    let q = sign::signed_query(&p, &SecretKey::new(SECRET).unwrap());
    let resp = reqwest::get(format!("{}?{q}", sim.url())).await.unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    // A tampered parameter breaks the signature.
    let future = sign::expires_at(SystemTime::now() + Duration::from_secs(60));
    let p = params(&[
        ("command", "listZones"),
        ("apikey", API_KEY),
        ("response", "json"),
        ("signatureversion", "3"),
        ("expires", &future),
    ]);
    let q =
        sign::signed_query(&p, &SecretKey::new(SECRET).unwrap()).replace("listZones", "listPods");
    let resp = reqwest::get(format!("{}?{q}", sim.url())).await.unwrap();
    assert_eq!(resp.status().as_u16(), 401);

    let st = sim.state.lock().unwrap();
    assert_eq!(st.rejected.len(), 3, "{:?}", st.rejected);
    assert!(st.rejected[0].ends_with("signature mismatch"));
    assert!(st.rejected[1].ends_with("expired"));
    assert!(st.rejected[2].ends_with("signature mismatch"));
    assert!(st.accepted.is_empty());
}

#[tokio::test]
async fn list_all_pages_until_exhausted() {
    let sim = Sim::start().await;
    sim.set("hosts", (0..23).map(host).collect());
    let mut s = settings(&sim);
    s.page_size = 5;
    let c = Client::new(s).unwrap();
    let hosts: Vec<CsHost> = c
        .list_all("listHosts", &params(&[("hypervisor", "BareMetal")]), "host")
        .await
        .unwrap();
    assert_eq!(hosts.len(), 23);
    let mut ids: Vec<&str> = hosts.iter().map(|h| h.id.as_str()).collect();
    ids.dedup();
    assert_eq!(ids.len(), 23, "no item twice");
    assert_eq!(
        sim.pages_of("listHosts"),
        [1, 2, 3, 4, 5],
        "stops at the short page"
    );

    // An exact multiple: the count ends it without an extra empty page...
    sim.set("hosts", (0..20).map(host).collect());
    sim.state.lock().unwrap().accepted.clear();
    let hosts: Vec<CsHost> = c.list_all("listHosts", &[], "host").await.unwrap();
    assert_eq!(hosts.len(), 20);
    assert_eq!(sim.pages_of("listHosts"), [1, 2, 3, 4]);
    // ...and an empty collection is one empty page.
    sim.set("hosts", vec![]);
    sim.state.lock().unwrap().accepted.clear();
    let hosts: Vec<CsHost> = c.list_all("listHosts", &[], "host").await.unwrap();
    assert!(hosts.is_empty());
    assert_eq!(sim.pages_of("listHosts"), [1]);
    // The filter is passed through (signed) and applied by the server.
    sim.set(
        "hosts",
        vec![
            host(1),
            json!({"id": "s", "name": "sim", "hypervisor": "Simulator"}),
        ],
    );
    let hosts: Vec<CsHost> = c
        .list_all("listHosts", &params(&[("hypervisor", "BareMetal")]), "host")
        .await
        .unwrap();
    assert_eq!(hosts.len(), 1);
}

#[tokio::test]
async fn async_job_is_polled_to_completion() {
    let sim = Sim::start().await;
    sim.state.lock().unwrap().job_pending_polls = 3;
    sim.set(
        "vms",
        vec![
            json!({"id": "v-7", "name": "inst-7", "state": "Starting", "hypervisor": "BareMetal",
                    "nic": [{"id": "n-7", "macaddress": "52:54:00:00:01:07", "isdefault": true}]}),
        ],
    );
    let c = client(&sim);
    notify_provision_done(&c, "52:54:00:00:01:07")
        .await
        .unwrap();
    {
        let st = sim.state.lock().unwrap();
        assert_eq!(st.provision_done, ["52:54:00:00:01:07"]);
        let job = st.jobs.values().next().unwrap();
        assert_eq!(job.polls, 4, "3 pending answers, then the result");
        // As CloudStack: the instance is Running now, and a repeated
        // notification fails (the instance is not Starting any more).
        assert_eq!(st.collections["vms"][0]["state"], "Running");
    }
    assert_eq!(c.metrics().job_polls.get(), 4);
    sim.state.lock().unwrap().job_pending_polls = 0;
    match notify_provision_done(&c, "52:54:00:00:01:07").await {
        Err(CsError::AsyncJobFailed {
            errorcode,
            errortext,
            ..
        }) => {
            assert_eq!(errorcode, 530);
            assert!(
                errortext.contains("not in state of Starting"),
                "{errortext}"
            );
        }
        other => panic!("a repeated notify must fail: {other:?}"),
    }
}

#[tokio::test]
async fn async_job_failure_and_timeout() {
    let sim = Sim::start().await;
    {
        let mut st = sim.state.lock().unwrap();
        st.job_pending_polls = 1;
        st.job_failure = Some((530, "Cannot find host with mac 52:54:00:00:00:99".into()));
    }
    let c = client(&sim);
    match c
        .call_async(
            "notifyBaremetalProvisionDone",
            &params(&[("mac", "52:54:00:00:00:99")]),
        )
        .await
    {
        Err(CsError::AsyncJobFailed {
            errorcode: 530,
            errortext,
            jobid,
            ..
        }) => {
            assert!(errortext.contains("Cannot find host"), "{errortext}");
            assert!(jobid.starts_with("0000-job-"));
        }
        other => panic!("expected AsyncJobFailed, got {other:?}"),
    }

    {
        let mut st = sim.state.lock().unwrap();
        st.job_pending_polls = 1_000_000;
        st.job_failure = None;
    }
    let mut s = settings(&sim);
    s.async_deadline = Duration::from_millis(400);
    let c = Client::new(s).unwrap();
    let t = Instant::now();
    match c
        .call_async(
            "notifyBaremetalProvisionDone",
            &params(&[("mac", "52:54:00:00:00:98")]),
        )
        .await
    {
        Err(CsError::Timeout { waited, .. }) => assert!(waited >= Duration::from_millis(400)),
        other => panic!("expected Timeout, got {other:?}"),
    }
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "bounded by the deadline"
    );
}

#[tokio::test]
async fn errors_are_mapped() {
    let sim = Sim::start().await;
    sim.set("zones", vec![json!({"id": "z1", "name": "Z"})]);
    let c = client(&sim);

    sim.fail_next(Failure {
        count: 1,
        http_status: 530,
        error: Some((530, "Internal error executing command".into())),
        command: None,
    });
    match c.call("listZones", &[]).await {
        Err(CsError::Api {
            http_status: 530,
            errorcode: 530,
            cserrorcode: Some(9999),
            errortext,
            ..
        }) => assert_eq!(errortext, "Internal error executing command"),
        other => panic!("{other:?}"),
    }

    sim.fail_next(Failure {
        count: 1,
        http_status: 500,
        error: None,
        command: None,
    });
    assert!(matches!(
        c.call("listZones", &[]).await,
        Err(CsError::Http {
            http_status: 500,
            ..
        })
    ));

    // Missing parameter (431) and unknown command (432).
    assert!(matches!(
        c.call_async("notifyBaremetalProvisionDone", &[]).await,
        Err(CsError::Api { errorcode: 431, .. })
    ));
    assert!(matches!(
        c.call("listNothing", &[]).await,
        Err(CsError::Api { errorcode: 432, .. })
    ));

    // A failure in the middle of paging fails the whole listing.
    sim.set("hosts", (0..12).map(host).collect());
    let mut s = settings(&sim);
    s.page_size = 5;
    let paged = Client::new(s).unwrap();
    {
        let mut st = sim.state.lock().unwrap();
        st.accepted.clear();
    }
    let all: Vec<CsHost> = paged.list_all("listHosts", &[], "host").await.unwrap();
    assert_eq!(all.len(), 12);
    sim.fail_next(Failure {
        count: 1,
        http_status: 503,
        error: Some((530, "busy".into())),
        command: None,
    });
    assert!(matches!(
        paged.list_all::<CsHost>("listHosts", &[], "host").await,
        Err(CsError::Api {
            http_status: 503,
            ..
        })
    ));

    // After the failures, everything works again.
    let z: Vec<Zone> = c.list_all("listZones", &[], "zone").await.unwrap();
    assert_eq!(z.len(), 1);
    let ok = c
        .metrics()
        .calls
        .get_or_create(&pxemesh_coordinator::cloudstack::client::CallLabels {
            command: "listZones".into(),
            outcome: "api_error".into(),
        })
        .get();
    assert_eq!(ok, 1, "the metric counts the API error");
}

#[tokio::test]
async fn server_gone_is_a_transport_error_without_secrets() {
    let mut sim = Sim::start().await;
    let c = client(&sim);
    sim.set("zones", vec![json!({"id": "z1", "name": "Z"})]);
    assert!(c.call("listZones", &[]).await.is_ok());
    sim.shutdown().await;
    let t = Instant::now();
    let err = c.call("listZones", &[]).await.unwrap_err();
    assert!(matches!(err, CsError::Transport { .. }), "{err:?}");
    assert!(t.elapsed() < Duration::from_secs(5));
    let text = format!("{err} / {err:?}");
    assert!(!text.contains(API_KEY), "api key leaked: {text}");
    assert!(!text.contains(SECRET), "secret leaked: {text}");
    assert!(!text.contains("signature="), "signed URL leaked: {text}");
    let dbg = format!("{:?}", settings(&sim));
    assert!(!dbg.contains(SECRET), "{dbg}");
}

#[tokio::test]
async fn rate_limit_spaces_calls() {
    let sim = Sim::start().await;
    sim.set("zones", vec![json!({"id": "z1", "name": "Z"})]);
    let mut s = settings(&sim);
    s.rate_per_second = 10.0;
    s.burst = 1;
    let c = Client::new(s).unwrap();
    let t = Instant::now();
    for _ in 0..6 {
        c.call("listZones", &[]).await.unwrap();
    }
    let e = t.elapsed();
    assert!(
        e >= Duration::from_millis(450),
        "6 calls at 10/s burst 1 took {e:?}"
    );
    assert!(c.metrics().throttled_ms.get() >= 400);
}

/// Lists everything from the simulator and plans: the response shapes the
/// client decodes are the ones `plan` maps.
#[tokio::test]
async fn listing_feeds_the_planner() {
    let sim = Sim::start().await;
    sim.set(
        "zones",
        vec![json!({"id": "z1", "name": "Z", "dns1": "10.1.1.2"})],
    );
    sim.set(
        "pods",
        vec![json!({"id": "p1", "name": "POD0", "zoneid": "z1", "zonename": "Z"})],
    );
    sim.set("hosts", (0..7).map(host).collect());
    sim.set(
        "vms",
        (0..7)
            .filter(|i| i % 2 == 0)
            .map(|i| {
                json!({
                    "id": format!("v-{i}"), "name": format!("inst-{i}"), "state": "Running",
                    "hypervisor": "BareMetal", "hostid": format!("h-{i:03}"), "zoneid": "z1",
                    "templateid": "t1",
                    "nic": [{"id": format!("n-{i}"), "macaddress": format!("52:54:00:00:01:{i:02x}"),
                             "ipaddress": format!("10.1.1.{}", 100 + i), "netmask": "255.255.255.0",
                             "gateway": "10.1.1.1", "networkid": "net1", "isdefault": true}]
                })
            })
            .collect(),
    );
    sim.set(
        "templates",
        vec![json!({"id": "t1", "name": "c7", "hypervisor": "BareMetal", "zoneid": "z1",
                    "url": "ks=http://10.0.0.5/c7.cfg;kernel=10.0.0.5:/c7/vmlinuz;initrd=10.0.0.5:/c7/initrd.img"})],
    );
    let mut s = settings(&sim);
    s.page_size = 3;
    let c = Client::new(s).unwrap();
    let listing = fetch(&c, &["Z".to_string()]).await.unwrap();
    assert_eq!(listing.zones.len(), 1);
    assert_eq!(listing.hosts.len(), 7, "paged by 3");
    let inputs = Inputs {
        zones: listing.zones,
        pods: listing.pods,
        hosts: listing.hosts,
        vms: listing.vms,
        templates: listing.templates,
        mapping: Mapping {
            pod_racks: [("POD0".to_string(), "rack-a".to_string())].into(),
            bmc_username: "ADMIN".into(),
            bmc_port: 623,
            bmc_cipher_suite: 3,
            ..Default::default()
        },
        networks: vec![serde_json::from_value(json!({
            "name": "rack-a-guest", "rack": "rack-a", "subnet": "10.1.1.0/24",
            "gateway": "10.1.1.1", "dns": ["10.1.1.2"], "mtu": 1500, "lease_seconds": 3600
        }))
        .unwrap()],
        ..Default::default()
    };
    let p = plan(&inputs);
    assert_eq!(p.racks.len(), 1);
    assert_eq!(p.profiles.len(), 1);
    // Every bare metal host has a record: 4 with their instance's
    // reservation, 3 idle ones without.
    assert_eq!(p.hosts.len(), 7, "{:#?}", p.skipped);
    assert_eq!(p.hosts.iter().filter(|h| h.ip.is_some()).count(), 4);
    assert_eq!(p.idle.len(), 3);
    assert!(p.skipped.is_empty(), "{:?}", p.skipped);
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    assert_eq!(p.hosts[0].bmc.as_ref().unwrap().address, "172.16.15.10");
    assert_eq!(p.hosts[0].profile.as_deref(), Some("cs-t1"));
    let st = sim.state.lock().unwrap();
    assert!(st.rejected.is_empty());
    assert!(
        st.accepted.iter().all(|(c, _)| c.starts_with("list")),
        "a sync only reads: {:?}",
        st.accepted
    );
    assert_eq!(
        st.accepted.iter().filter(|(c, _)| c == "listPods").count(),
        1,
        "zone z2 skipped"
    );
}

/// TLS: the management server's certificate is verified against `ca_file`;
/// another CA or the system roots refuse it.
#[tokio::test]
async fn tls_is_verified_against_the_configured_ca() {
    use pxemesh_certs::{Ca, Identity, LeafRequest, Role};
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::generate("cs.test", 1).unwrap();
    let mut req = LeafRequest::new(Identity::new("cs.test", Role::Coordinator { id: 1 }), 1);
    req.ips = vec!["127.0.0.1".parse().unwrap()];
    req.dns_names = vec!["localhost".into()];
    let leaf = ca.issue(&req).unwrap();
    let sim = Sim::start_tls(&leaf.cert_pem, &leaf.key_pem).await;
    sim.set("zones", vec![json!({"id": "z1", "name": "Z"})]);
    assert!(sim.url().starts_with("https://127.0.0.1:"));

    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.cert_pem()).unwrap();
    let mut s = settings(&sim);
    s.ca_file = Some(ca_file);
    let zones: Vec<Zone> = Client::new(s)
        .unwrap()
        .list_all("listZones", &[], "zone")
        .await
        .unwrap();
    assert_eq!(zones.len(), 1);

    // System roots do not know our CA.
    let err = client(&sim).call("listZones", &[]).await.unwrap_err();
    assert!(matches!(err, CsError::Transport { .. }), "{err:?}");
    // Nor does another CA.
    let other = Ca::generate("other.test", 1).unwrap();
    let other_file = dir.path().join("other.pem");
    std::fs::write(&other_file, other.cert_pem()).unwrap();
    let mut s = settings(&sim);
    s.ca_file = Some(other_file);
    let err = Client::new(s)
        .unwrap()
        .call("listZones", &[])
        .await
        .unwrap_err();
    assert!(matches!(err, CsError::Transport { .. }), "{err:?}");
    // A CA file without certificates is a configuration error.
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "nothing here\n").unwrap();
    let mut s = settings(&sim);
    s.ca_file = Some(empty);
    assert!(matches!(Client::new(s), Err(CsError::Config(_))));
    assert_eq!(
        sim.state.lock().unwrap().accepted.len(),
        1,
        "only the trusted call got through"
    );
}
