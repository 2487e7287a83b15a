//! The CloudStack bridge against real coordinator processes and the
//! CloudStack API simulator (signatures checked, pages, async jobs,
//! injectable failures):
//!
//! - a pod with two bare metal hosts and one kickstart instance yields the
//!   rack, both hosts (one with the instance's reservation, the idle one
//!   without, each with its BMC, password sealed; a power job on the idle one
//!   is leased to the rack's relay with its credentials), and the kickstart
//!   profile; a second sync changes nothing; an expunged instance returns its
//!   host to idle; a host removed from CloudStack loses its record;
//! - an instance entering `Starting` gets `bootdev-pxe` then `power-on`
//!   (once, also across re-syncs); a provision-done event becomes exactly one
//!   accepted `notifyBaremetalProvisionDone`, also when the first attempts
//!   fail;
//! - the management server failing: the bridge backs off, logs once per
//!   state change, then catches up;
//! - killing the leader of a 3-node cluster moves the bridge; the
//!   simulator's record of callers (node and term in the User-Agent) shows
//!   no two bridges ever interleaving.

mod cloudstack_sim;
mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cloudstack_sim::{Failure, Sim, API_KEY, SECRET};
use common::*;
use pxemesh_certs::Role;
use pxemesh_proto::v1 as pb;
use pxemesh_proto::v1::relay_service_client::RelayServiceClient;
use serde_json::{json, Value};

const VM_MAC: &str = "52:54:00:0c:5a:01";
const BMC_PW: &str = "Bmc-Secret-pw-91";

fn zone() -> Value {
    json!({"id": "z1", "name": "Z1", "networktype": "Basic", "dns1": "10.20.0.2"})
}
fn pod() -> Value {
    json!({"id": "p1", "name": "POD0", "zoneid": "z1", "zonename": "Z1"})
}
fn cs_host(i: u32) -> Value {
    json!({
        "id": format!("h-{i}"), "name": format!("bm-{i}"), "hypervisor": "BareMetal",
        "type": "Routing", "podid": "p1", "podname": "POD0", "zoneid": "z1", "zonename": "Z1",
        "ipaddress": format!("127.0.0.{}", 100 + i), "cpunumber": 8, "cpuspeed": 2400,
        "memorytotal": 34359738368u64, "state": "Up",
        "details": {"hostmac": format!("52:54:00:0c:5a:{i:02x}")}
    })
}
/// A kickstart template whose kernel and initrd are served at `files`
/// (default: a closed port on loopback, refused at once).
fn template(files: &str) -> Value {
    json!({
        "id": "t-ks1", "name": "centos-ks", "hypervisor": "BareMetal", "zoneid": "z1",
        "url": format!("ks=http://10.20.0.5/ks.cfg;kernel={files}/vmlinuz;initrd={files}/initrd.img")
    })
}

/// An HTTP server for kernel and initrd; counts the requests.
async fn file_server() -> (String, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let app = axum::Router::new().route(
        "/{file}",
        axum::routing::get(move |axum::extract::Path(f): axum::extract::Path<String>| {
            let h = h.clone();
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                format!("contents of {f}\n")
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    (format!("http://{addr}"), hits)
}
fn vm(state: &str) -> Value {
    json!({
        "id": "vm-1", "name": "web-1", "state": state, "hypervisor": "BareMetal",
        "hostid": "h-1", "hostname": "bm-1", "zoneid": "z1", "templateid": "t-ks1",
        "templatename": "centos-ks",
        "nic": [{"id": "n1", "macaddress": VM_MAC, "ipaddress": "10.20.0.50",
                 "netmask": "255.255.255.0", "gateway": "10.20.0.1", "isdefault": true}]
    })
}

fn populate(sim: &Sim, vm_state: Option<&str>) {
    populate_with(sim, vm_state, "http://127.0.0.1:1");
}

fn populate_with(sim: &Sim, vm_state: Option<&str>, files: &str) {
    sim.set("zones", vec![zone()]);
    sim.set("pods", vec![pod()]);
    sim.set("hosts", vec![cs_host(1), cs_host(2)]);
    sim.set("templates", vec![template(files)]);
    sim.set("vms", vm_state.map(|s| vec![vm(s)]).unwrap_or_default());
}

/// A cluster whose coordinators run the bridge against `sim`.
fn cluster(n: u64, sim: &Sim) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("cs.secret");
    let pw = dir.path().join("bmc.pw");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    std::fs::write(&pw, format!("{BMC_PW}\n")).unwrap();
    let extra = format!(
        "\n[cloudstack]\nurl = \"{}\"\napi_key = \"{API_KEY}\"\nsecret_key_file = \"{}\"\ninterval_seconds = 5\nrate_limit_per_second = 200.0\nrate_limit_burst = 50\nrequest_timeout_seconds = 2\nasync_job_timeout_seconds = 5\n[cloudstack.pod_racks]\nPOD0 = \"rack-a\"\n[cloudstack.bmc]\nusername = \"ADMIN\"\npassword_file = \"{}\"\ncipher_suite = 3\n",
        sim.url(),
        secret.display(),
        pw.display()
    );
    let c = Cluster::with_extra(n, 10_000, 1_000, 5_000, &extra);
    // The secret files must outlive the cluster's start; keep them with it.
    std::mem::forget(dir);
    c
}

/// Rack and network the instance's NIC falls in (the operator's part).
async fn seed_rack(c: &Cluster, leader: u64) {
    let mut cl = c.client(leader);
    put(&mut cl, rack("rack-a")).await.expect("rack");
    put(&mut cl, network("net-a", "rack-a", "10.20.0.0/24"))
        .await
        .expect("network");
}

fn ctl_json(c: &Cluster, args: &[&str]) -> (bool, Value, String) {
    let mut a = vec!["--output", "json"];
    a.extend_from_slice(args);
    let out = c.ctl(&a);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    (
        out.status.success(),
        serde_json::from_str(&text).unwrap_or(Value::Null),
        format!("{text}{err}"),
    )
}

/// `pxemeshctl cloudstack sync`, retried while the bridge is still starting
/// (no leader yet / leadership just moved).
fn sync(c: &Cluster) -> Value {
    let t = Instant::now();
    loop {
        let (ok, v, out) = ctl_json(c, &["cloudstack", "sync", "--wait", "20"]);
        if ok {
            return v;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "sync failed: {out}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

async fn get_host(c: &Cluster, id: u64, name: &str) -> Option<pb::Host> {
    let mut cl = c.client(id);
    let r = cl
        .get(pb::GetRequest {
            kind: pb::Kind::Host as i32,
            name: name.into(),
            consistency: pb::Consistency::Linearizable as i32,
        })
        .await
        .ok()?
        .into_inner();
    match r.object?.record? {
        pb::object::Record::Host(h) => Some(h),
        _ => None,
    }
}

async fn list(c: &Cluster, id: u64, kind: pb::Kind) -> Vec<pb::object::Record> {
    let mut cl = c.client(id);
    cl.list(pb::ListRequest {
        kind: kind as i32,
        rack: String::new(),
        consistency: pb::Consistency::Linearizable as i32,
    })
    .await
    .unwrap()
    .into_inner()
    .objects
    .into_iter()
    .filter_map(|o| o.record)
    .collect()
}

async fn jobs_of(c: &Cluster, id: u64) -> Vec<pb::Job> {
    let mut cl = c.client(id);
    let mut jobs = cl
        .list_jobs(pb::ListJobsRequest {
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    jobs.sort_by(|a, b| a.id.cmp(&b.id));
    jobs
}

fn accepted_notifies(sim: &Sim) -> usize {
    sim.state
        .lock()
        .unwrap()
        .jobs
        .values()
        .filter(|j| {
            j.command
                .eq_ignore_ascii_case("notifyBaremetalProvisionDone")
        })
        .filter(|j| j.outcome.is_ok())
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_hosts_instance_and_template_become_records_idempotently() {
    let sim = Sim::start().await;
    let (files, hits) = file_server().await;
    populate_with(&sim, Some("Running"), &files);
    let c = cluster(1, &sim);
    let leader = c.wait_leader(&[1], Duration::from_secs(15)).await;
    seed_rack(&c, leader).await;

    let s = sync(&c);
    assert_eq!(s["state"], "up", "{s}");
    assert_eq!(s["node_id"], leader);
    // zone + pod + 2 hosts + 1 instance + 1 template.
    assert_eq!(s["objects_seen"], 6, "{s}");
    // (The bridge also synced on its own when it started: the changes are
    // split between the two syncs.)

    let h = get_host(&c, leader, "bm-1").await.expect("host record");
    assert_eq!(
        (
            h.mac.as_str(),
            h.ip.as_str(),
            h.rack.as_str(),
            h.network.as_str()
        ),
        (VM_MAC, "10.20.0.50", "rack-a", "net-a")
    );
    assert_eq!(h.profile, "cs-t-ks1");
    assert_eq!(
        h.labels.get("cloudstack.vm-id").map(String::as_str),
        Some("vm-1")
    );
    assert_eq!(
        h.labels.get("cloudstack.cpu-number").map(String::as_str),
        Some("8")
    );
    let bmc = h.bmc.expect("bmc");
    assert_eq!(bmc.address, "127.0.0.101");
    assert_eq!(bmc.username, "ADMIN");
    assert!(bmc.password_set, "BMC password sealed and stored");
    let profiles = list(&c, leader, pb::Kind::Profile).await;
    let prof = profiles
        .iter()
        .find_map(|r| match r {
            pb::object::Record::Profile(p) if p.name == "cs-t-ks1" => Some(p.clone()),
            _ => None,
        })
        .expect("kickstart profile");
    assert_eq!(prof.kickstart_url, "http://10.20.0.5/ks.cfg");
    let racks = list(&c, leader, pb::Kind::Rack).await;
    assert!(racks.iter().any(|r| matches!(r, pb::object::Record::Rack(r)
        if r.name == "rack-a" && r.labels.get("cloudstack.pod-id").map(String::as_str) == Some("p1"))));
    // The template's kernel and initrd, imported into the profile's image.
    let images = list(&c, leader, pb::Kind::Image).await;
    let img = images
        .iter()
        .find_map(|r| match r {
            pb::object::Record::Image(i) if i.name == "cs-t-ks1" => Some(i.clone()),
            _ => None,
        })
        .expect("image cs-t-ks1");
    let mut paths: Vec<(&str, u64)> = img
        .files
        .iter()
        .map(|f| (f.path.as_str(), f.size))
        .collect();
    paths.sort();
    assert_eq!(
        paths,
        [
            ("initrd.img", "contents of initrd.img\n".len() as u64),
            ("vmlinuz", "contents of vmlinuz\n".len() as u64)
        ]
    );
    assert_eq!(prof.image, "cs-t-ks1");
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    // The idle host (bm-2): a record with its MAC, BMC and labels, but no
    // reservation.
    let idle = get_host(&c, leader, "bm-2")
        .await
        .expect("idle host record");
    assert_eq!(
        (
            idle.mac.as_str(),
            idle.ip.as_str(),
            idle.network.as_str(),
            idle.profile.as_str(),
            idle.rack.as_str()
        ),
        ("52:54:00:0c:5a:02", "", "", "", "rack-a")
    );
    assert_eq!(
        idle.labels.get("cloudstack.host-id").map(String::as_str),
        Some("h-2")
    );
    assert_eq!(
        idle.labels
            .get("cloudstack.memory-bytes")
            .map(String::as_str),
        Some("34359738368")
    );
    assert!(!idle.labels.contains_key("cloudstack.vm-id"));
    let ibmc = idle.bmc.clone().expect("idle host bmc");
    assert_eq!(ibmc.address, "127.0.0.102");
    assert!(ibmc.password_set);
    // pxemeshctl shows it without an address.
    let (ok, got, out) = ctl_json(&c, &["host", "get", "bm-2"]);
    assert!(ok, "{out}");
    assert_eq!(got["ip"], "", "{got}");
    let table = String::from_utf8_lossy(&c.ctl(&["host", "list"]).stdout).to_string();
    let row = table
        .lines()
        .find(|l| l.starts_with("bm-2"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(row.contains(" - "), "{row}");
    // It is power-controllable: a job is accepted and the rack's relay
    // leases it with the host's BMC credentials (password unsealed).
    let mut admin = c.client(leader);
    let sub = admin
        .submit_jobs(pb::SubmitJobsRequest {
            action: "power-status".into(),
            hosts: Some(pb::HostSelector {
                names: vec!["bm-2".into()],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("power job on the idle host")
        .into_inner();
    assert_eq!(sub.jobs.len(), 1);
    let relay_tls = c.pki.tls(
        Role::Relay {
            rack: "rack-a".into(),
            name: "relay-1".into(),
        },
        "relay-1",
    );
    let ch = pxemesh_coordinator::client::channel(&c.addr(leader), relay_tls)
        .await
        .unwrap();
    let mut relay = RelayServiceClient::new(ch);
    let leased = relay
        .lease_jobs(pb::LeaseJobsRequest {
            max_jobs: 10,
            lease_seconds: 30,
            wait_ms: 2000,
        })
        .await
        .expect("lease")
        .into_inner()
        .jobs;
    let lj = leased
        .iter()
        .find(|l| l.job.as_ref().is_some_and(|j| j.host == "bm-2"))
        .expect("idle host's job leased");
    let creds = lj.bmc.clone().expect("bmc credentials");
    assert_eq!(
        (
            creds.address.as_str(),
            creds.username.as_str(),
            creds.password.as_str()
        ),
        ("127.0.0.102", "ADMIN", BMC_PW)
    );
    report(&mut relay, lj.job.as_ref().unwrap(), "power off").await;

    // The same CloudStack state again: nothing changes (the sealed password
    // is kept, not re-sealed).
    let rev_before = h.revision;
    let s = sync(&c);
    assert_eq!(
        s["objects_changed"], 0,
        "second sync changed something: {s}"
    );
    let h2 = get_host(&c, leader, "bm-1").await.unwrap();
    assert_eq!(h2.revision, rev_before);
    assert_eq!(hits.load(Ordering::SeqCst), 2, "imported once");

    // No secret in the log; a status is served.
    let log = c.log_text(leader);
    assert!(!log.contains(BMC_PW) && !log.contains(SECRET));
    let (ok, st, out) = ctl_json(&c, &["cloudstack", "status"]);
    assert!(ok, "{out}");
    assert!(st["syncs"].as_u64().unwrap() >= 2, "{st}");
    assert_eq!(st["objects_changed"], 0, "{st}");

    // Expunged: the reservation goes, the host record stays (idle, BMC kept).
    sim.set("vms", vec![vm("Expunging")]);
    let s = sync(&c);
    assert_eq!(s["objects_changed"], 1, "{s}");
    let back = get_host(&c, leader, "bm-1").await.expect("bm-1 kept, idle");
    assert_eq!(
        (
            back.ip.as_str(),
            back.network.as_str(),
            back.profile.as_str()
        ),
        ("", "", "")
    );
    assert_eq!(back.mac, VM_MAC);
    assert!(!back.labels.contains_key("cloudstack.vm-id"));
    assert!(back.bmc.as_ref().is_some_and(|b| b.password_set));
    // The address is free again for another host.
    let mut other = c.client(leader);
    put(
        &mut other,
        pb::Object {
            record: Some(pb::object::Record::Host(pb::Host {
                name: "hand-made".into(),
                mac: "52:54:00:99:00:01".into(),
                ip: "10.20.0.50".into(),
                rack: "rack-a".into(),
                network: "net-a".into(),
                ..Default::default()
            })),
        },
    )
    .await
    .expect("the freed address can be reserved");
    // The host removed from CloudStack: its record is deleted.
    sim.set("hosts", vec![cs_host(1)]);
    let s = sync(&c);
    assert_eq!(s["objects_changed"], 1, "{s}");
    assert!(get_host(&c, leader, "bm-2").await.is_none());
    assert!(get_host(&c, leader, "bm-1").await.is_some());
    assert!(
        c.metric(
            leader,
            "pxemesh_coordinator_cloudstack_bridge_objects_changed_total"
        )
        .await
        .unwrap_or(0.0)
            >= 4.0
    );
    assert_eq!(sim.state.lock().unwrap().rejected, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starting_instance_gets_ipmi_jobs_and_provision_done_notifies_once() {
    let sim = Sim::start().await;
    populate(&sim, Some("Stopped"));
    let c = cluster(1, &sim);
    let leader = c.wait_leader(&[1], Duration::from_secs(15)).await;
    seed_rack(&c, leader).await;
    sync(&c);
    assert!(
        jobs_of(&c, leader).await.is_empty(),
        "no jobs while stopped"
    );

    // The rack's relay, through its own API (runs the jobs, reports events).
    let relay_tls = c.pki.tls(
        Role::Relay {
            rack: "rack-a".into(),
            name: "relay-1".into(),
        },
        "relay-1",
    );
    let ch = pxemesh_coordinator::client::channel(&c.addr(leader), relay_tls)
        .await
        .unwrap();
    let mut relay = RelayServiceClient::new(ch);

    // CloudStack starts the instance: boot device, then the power state.
    sim.set("vms", vec![vm("Starting")]);
    let s = sync(&c);
    assert_eq!(s["jobs_submitted"], 2, "{s}");
    let actions = |jobs: &[pb::Job]| -> Vec<String> {
        jobs.iter()
            .map(|j| format!("{} {}", j.host, j.action))
            .collect()
    };
    assert_eq!(
        actions(&jobs_of(&c, leader).await),
        ["bm-1 bootdev-pxe", "bm-1 power-status"]
    );
    // The relay runs them: the host is off → power-on follows.
    run_jobs(&mut relay, "power off").await;
    wait_jobs(&c, leader, 3).await;
    assert_eq!(
        actions(&jobs_of(&c, leader).await),
        ["bm-1 bootdev-pxe", "bm-1 power-status", "bm-1 power-on"]
    );
    // Re-syncs while still Starting submit nothing more.
    sync(&c);
    sync(&c);
    assert_eq!(jobs_of(&c, leader).await.len(), 3);

    // The kickstart's provision-done callback, as the rack relay reports it;
    // the first two notifications fail at CloudStack, then it accepts.
    sim.state.lock().unwrap().job_failure = Some((530, "transient".into()));
    report_provision_done(&mut relay, 1)
        .await
        .expect("report provision-done");
    let t = Instant::now();
    while sim.state.lock().unwrap().provision_done.len() < 2 {
        assert!(t.elapsed() < Duration::from_secs(20), "no notify attempts");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sim.state.lock().unwrap().job_failure = None;
    let t = Instant::now();
    while accepted_notifies(&sim) < 1 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "notify never accepted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // More ticks and syncs: no second accepted notification.
    sync(&c);
    tokio::time::sleep(Duration::from_secs(2)).await;
    sync(&c);
    assert_eq!(accepted_notifies(&sim), 1);
    let macs = sim.state.lock().unwrap().provision_done.clone();
    assert!(macs.iter().all(|m| m == VM_MAC), "{macs:?}");
    let h = get_host(&c, leader, "bm-1").await.unwrap();
    assert!(h.labels.contains_key("cloudstack.bridge.notified-event"));
    let log = c.log_text(leader);
    assert!(log.contains("cloudstack notified: provision done"));

    // CloudStack moves it to Running, later Stopped, then Starting again: a
    // new start gets its own pair of jobs.
    sim.set("vms", vec![vm("Running")]);
    sync(&c);
    // A late, repeated callback once it runs: recorded, not sent.
    let attempts = sim.state.lock().unwrap().provision_done.len();
    let before = h.labels["cloudstack.bridge.notified-event"].clone();
    report_provision_done(&mut relay, 2)
        .await
        .expect("report a second provision-done");
    let t = Instant::now();
    loop {
        let h = get_host(&c, leader, "bm-1").await.unwrap();
        if h.labels["cloudstack.bridge.notified-event"] != before {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "late event not handled"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(sim.state.lock().unwrap().provision_done.len(), attempts);
    assert_eq!(accepted_notifies(&sim), 1);
    sim.set("vms", vec![vm("Stopped")]);
    sync(&c);
    sim.set("vms", vec![vm("Starting")]);
    let s = sync(&c);
    assert!(s["jobs_submitted"].as_u64().unwrap() >= 5, "{s}");
    // This time the host is on: it is power-cycled (CloudStack's reboot).
    run_jobs(&mut relay, "power on").await;
    wait_jobs(&c, leader, 6).await;
    let all = actions(&jobs_of(&c, leader).await);
    assert_eq!(
        all[3..],
        ["bm-1 bootdev-pxe", "bm-1 power-status", "bm-1 power-cycle"]
    );
}

/// Leases every queued job as the relay and reports it succeeded
/// (`power-status` answering `status`).
/// The kickstart's provision-done callback for the instance's MAC, as the
/// rack relay reports it (event `sequence`).
async fn report_provision_done(
    relay: &mut RelayServiceClient<tonic::transport::Channel>,
    sequence: u64,
) -> Result<tonic::Response<pb::ReportBootEventsResponse>, tonic::Status> {
    relay
        .report_boot_events(pb::ReportBootEventsRequest {
            events: vec![pb::BootEvent {
                sequence,
                host_mac: VM_MAC.into(),
                kind: "provision-done".into(),
                detail: "GET /baremetal/provisiondone".into(),
                unix_ms: sequence,
            }],
        })
        .await
}

async fn run_jobs(relay: &mut RelayServiceClient<tonic::transport::Channel>, status: &str) {
    // A host's jobs are leased one at a time, in order.
    for _ in 0..10 {
        let leased = relay
            .lease_jobs(pb::LeaseJobsRequest {
                max_jobs: 10,
                lease_seconds: 30,
                wait_ms: 1000,
            })
            .await
            .expect("lease")
            .into_inner()
            .jobs;
        let mut status_done = false;
        for l in leased {
            let j = l.job.expect("job");
            status_done |= j.action == "power-status";
            report(relay, &j, status).await;
        }
        if status_done {
            return;
        }
    }
    panic!("the power-status job was never leased");
}

async fn report(
    relay: &mut RelayServiceClient<tonic::transport::Channel>,
    j: &pb::Job,
    status: &str,
) {
    {
        let result = if j.action == "power-status" {
            status.to_string()
        } else {
            "ok".to_string()
        };
        relay
            .report_job(pb::ReportJobRequest {
                job_id: j.id.clone(),
                state: pb::JobState::Succeeded as i32,
                reason: String::new(),
                result,
                attempts: j.attempts,
                lease_seconds: 0,
            })
            .await
            .expect("report");
    }
}

async fn wait_jobs(c: &Cluster, id: u64, n: usize) {
    let t = Instant::now();
    while jobs_of(c, id).await.len() < n {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "job {n} not submitted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_server_outage_backs_off_and_catches_up() {
    let sim = Sim::start().await;
    populate(&sim, None);
    let c = cluster(1, &sim);
    let leader = c.wait_leader(&[1], Duration::from_secs(15)).await;
    seed_rack(&c, leader).await;
    sync(&c);

    // The management server answers 503 (HTML) to everything for a while.
    sim.fail_next(Failure {
        count: 100_000,
        http_status: 503,
        error: None,
        command: None,
    });
    let calls_at = |sim: &Sim| sim.state.lock().unwrap().accepted.len();
    let start_calls = calls_at(&sim);
    tokio::time::sleep(Duration::from_secs(9)).await;
    let attempts = calls_at(&sim) - start_calls;
    // Back-off 1, 2, 4, 5 s: about 4 attempts in 9 s, not 36 (one per tick).
    assert!(
        (2..=7).contains(&attempts),
        "{attempts} attempts in 9 s while down"
    );
    let (ok, st, out) = ctl_json(&c, &["cloudstack", "status"]);
    assert!(ok, "{out}");
    assert_eq!(st["state"], "backing-off", "{st}");
    assert!(st["last_error"].as_str().unwrap().contains("503"), "{st}");

    // CloudStack gets an instance meanwhile; the server comes back.
    sim.set("vms", vec![vm("Running")]);
    sim.state.lock().unwrap().failure = None;
    let t = Instant::now();
    while !reserved(&c, leader, "bm-1").await {
        assert!(t.elapsed() < Duration::from_secs(15), "did not catch up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = c.log_text(leader);
    assert_eq!(
        log.matches("cloudstack sync failing; backing off").count(),
        1,
        "one line per state change"
    );
    assert_eq!(log.matches("cloudstack sync recovered").count(), 1);
    let (_, st, _) = ctl_json(&c, &["cloudstack", "status"]);
    assert_eq!(st["state"], "up", "{st}");
    assert!(st["failures"].as_u64().unwrap() >= 2);
}

/// (node, term) of a bridge User-Agent.
fn caller(ua: &str) -> Option<(u64, u64)> {
    let mut node = None;
    let mut term = None;
    for w in ua.split_whitespace() {
        if let Some(v) = w.strip_prefix("node=") {
            node = v.parse().ok();
        }
        if let Some(v) = w.strip_prefix("term=") {
            term = v.parse().ok();
        }
    }
    Some((node?, term?))
}

/// Host `name` has a reservation (an instance); idle hosts have none.
async fn reserved(c: &Cluster, id: u64, name: &str) -> bool {
    get_host(c, id, name)
        .await
        .is_some_and(|h| !h.ip.is_empty())
}

/// Waits until `id` runs the bridge and has synced CloudStack's current
/// state (host bm-1 reserved for the instance or idle as `present`).
async fn bridge_on(c: &Cluster, id: u64, present: bool) {
    let t = Instant::now();
    loop {
        let (ok, st, _) = ctl_json(c, &["cloudstack", "status"]);
        if ok
            && st["node_id"] == id
            && st["state"] == "up"
            && reserved(c, id, "bm-1").await == present
        {
            // The stint wrote only after committing its fencing epoch.
            assert_eq!(st["fence_epoch"], st["term"], "{st}");
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(25),
            "bridge did not move to node {id}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_failover_moves_the_bridge_without_overlap() {
    let sim = Sim::start().await;
    populate(&sim, Some("Running"));
    let mut c = cluster(3, &sim);
    let all = [1, 2, 3];
    let first = c.wait_leader(&all, Duration::from_secs(20)).await;
    seed_rack(&c, first).await;
    let s = sync(&c);
    assert_eq!(s["node_id"], first);
    assert!(reserved(&c, first, "bm-1").await);

    // Freeze the leader: the others elect a new one, which takes over.
    c.pause(first);
    let others: Vec<u64> = all.into_iter().filter(|i| *i != first).collect();
    let second = c.wait_leader(&others, Duration::from_secs(20)).await;
    bridge_on(&c, second, true).await;
    sim.set("vms", vec![vm("Expunging")]);
    bridge_on(&c, second, false).await;
    // Thawed, the old leader's bridge wakes up overdue: its fence (term
    // check + ReadIndex) must keep it from calling CloudStack.
    c.resume(first);
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Kill the current leader: the bridge moves again.
    c.kill(second);
    let rest: Vec<u64> = all.into_iter().filter(|i| *i != second).collect();
    let third = c.wait_leader(&rest, Duration::from_secs(20)).await;
    sim.set("vms", vec![vm("Running")]);
    bridge_on(&c, third, true).await;
    let follower = rest.iter().copied().find(|i| *i != third).unwrap();
    assert_eq!(
        c.metric(follower, "pxemesh_coordinator_cloudstack_bridge_active")
            .await,
        Some(0.0)
    );
    assert_eq!(
        c.metric(third, "pxemesh_coordinator_cloudstack_bridge_active")
            .await,
        Some(1.0)
    );

    // Never two at once: each (node, term) called in one contiguous window,
    // windows never interleave, and terms only grow.
    let callers: Vec<(u64, u64)> = sim
        .state
        .lock()
        .unwrap()
        .callers
        .iter()
        .map(|(ua, _, _)| caller(ua).unwrap_or_else(|| panic!("unknown caller {ua:?}")))
        .collect();
    let mut order: Vec<(u64, u64)> = Vec::new();
    for who in &callers {
        if order.last() != Some(who) {
            assert!(
                !order.contains(who),
                "{who:?} called again after another bridge: {order:?}"
            );
            if let Some(prev) = order.last() {
                assert!(who.1 > prev.1, "term went back: {order:?}");
            }
            order.push(*who);
        }
    }
    let nodes: Vec<u64> = order.iter().map(|(n, _)| *n).collect();
    assert_eq!(nodes, [first, second, third], "bridges in turn: {order:?}");
}

/// The leader dies after CloudStack accepted `notifyBaremetalProvisionDone`
/// but before the "notified" label was committed (failpoint
/// `cloudstack_after_notify_accepted=exit` on every node). The new leader
/// finds the committed intent, asks CloudStack for the instance (the
/// simulator moved it Starting → Running on the accepted call, as CloudStack
/// does) and records the notification without calling again. Its syncs fail
/// meanwhile (listTemplates refused), so its host record still says
/// `Starting`: only the intent check keeps it from notifying a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_crash_after_an_accepted_notify_does_not_notify_again() {
    let sim = Sim::start().await;
    populate(&sim, Some("Stopped"));
    let mut c = cluster(3, &sim);
    let all = [1, 2, 3];
    for id in all {
        c.kill(id);
        c.spawn_env(
            id,
            &[(
                "PXEMESH_FAILPOINTS",
                "cloudstack_after_notify_accepted=exit",
            )],
        );
    }
    let first = c.wait_leader(&all, Duration::from_secs(20)).await;
    seed_rack(&c, first).await;
    sim.set("vms", vec![vm("Starting")]);
    let s = sync(&c);
    assert_eq!(s["node_id"], first, "{s}");
    let h = get_host(&c, first, "bm-1").await.expect("bm-1");
    assert_eq!(
        h.labels.get("cloudstack.vm-state").map(String::as_str),
        Some("Starting")
    );
    // From now on every sync fails (the host records keep saying Starting).
    sim.fail_next(Failure {
        count: 100_000,
        http_status: 530,
        error: Some((530, "listTemplates unavailable".into())),
        command: Some("listTemplates"),
    });

    let relay_tls = c.pki.tls(
        Role::Relay {
            rack: "rack-a".into(),
            name: "relay-1".into(),
        },
        "relay-1",
    );
    let ch = pxemesh_coordinator::client::channel(&c.addr(first), relay_tls)
        .await
        .unwrap();
    let mut relay = RelayServiceClient::new(ch);
    report_provision_done(&mut relay, 1)
        .await
        .expect("report provision-done");

    // The leader notifies, CloudStack accepts, the leader dies at once.
    let t = Instant::now();
    let status = loop {
        if let Some(st) = c.exited(first) {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the leader never reached the failpoint"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status.code(), Some(137), "crashed by the failpoint");
    assert_eq!(accepted_notifies(&sim), 1);
    assert_eq!(
        sim.state.lock().unwrap().collections["vms"][0]["state"],
        "Running",
        "CloudStack moved the instance on the accepted call"
    );

    // A new leader takes over and settles the notification in flight.
    let rest: Vec<u64> = all.into_iter().filter(|i| *i != first).collect();
    let second = c.wait_leader(&rest, Duration::from_secs(20)).await;
    let t = Instant::now();
    loop {
        let h = get_host(&c, second, "bm-1").await;
        if h.as_ref()
            .and_then(|h| h.labels.get("cloudstack.bridge.notified-event"))
            .is_some()
        {
            let h = h.unwrap();
            assert_eq!(
                h.labels.get("cloudstack.bridge.notify-intent"),
                h.labels.get("cloudstack.bridge.notified-event")
            );
            assert_eq!(
                h.labels.get("cloudstack.vm-state").map(String::as_str),
                Some("Starting"),
                "the syncs failed: the record still says Starting"
            );
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the new leader never settled the notification"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // More time for a (wrong) second call to show up.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let attempts = sim.state.lock().unwrap().provision_done.clone();
    assert_eq!(attempts, [VM_MAC], "exactly one notify call in all");
    assert_eq!(accepted_notifies(&sim), 1);
    let log = c.log_text(second);
    assert!(
        log.contains("instance already left Starting"),
        "the new leader asked CloudStack"
    );
    assert!(c.exited(second).is_none(), "the new leader did not notify");
}
