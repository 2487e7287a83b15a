//! Hostile conditions for a real cluster of coordinator processes: a stalled
//! (SIGSTOPped) follower under write load, the unauthenticated metrics
//! endpoint's bind rule, and secrets kept out of every surface.

mod common;

use std::time::{Duration, Instant};

use common::*;
use pxemesh_proto::v1 as pb;

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_follower_neither_stalls_writes_nor_grows_the_leader() {
    let cluster = Cluster::with(3, 10_000, 1_000, 3_000);
    let leader = cluster
        .wait_leader(&[1, 2, 3], Duration::from_secs(10))
        .await;
    seed(&mut cluster.client(leader)).await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    // Warm up, then measure the leader's memory with the follower frozen.
    for i in 0..50 {
        put(&mut cluster.client(leader), host(i))
            .await
            .expect("put");
    }
    let rss_before = rss_kib(cluster.pid(leader));
    cluster.pause(follower);
    let frozen_at = Instant::now();
    let writers = 4u32;
    let per_writer = 250u32;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let mut c = cluster.client(leader);
        tasks.push(tokio::spawn(async move {
            let mut worst = Duration::ZERO;
            for i in 0..per_writer {
                let t = Instant::now();
                put(&mut c, host(1000 + w * per_writer + i))
                    .await
                    .expect("a majority keeps committing with a follower frozen");
                worst = worst.max(t.elapsed());
            }
            worst
        }));
    }
    let mut worst = Duration::ZERO;
    for t in tasks {
        worst = worst.max(t.await.unwrap());
    }
    let took = frozen_at.elapsed();
    let rss_after = rss_kib(cluster.pid(leader));
    let dropped = cluster
        .metric(leader, "pxemesh_coordinator_raft_messages_dropped_total")
        .await
        .unwrap_or(0.0);
    // Keep it frozen a while longer: heartbeats keep queueing for it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_idle = rss_kib(cluster.pid(leader));
    cluster.resume(follower);
    let total = writers * per_writer;
    eprintln!(
        "stalled follower {follower}: {total} writes in {took:?} (worst {worst:?}); leader RSS {rss_before} KiB -> {rss_after} KiB -> {rss_idle} KiB after 3 s more; raft messages dropped {dropped}"
    );
    assert!(
        worst < Duration::from_secs(2),
        "a frozen follower stalled a write for {worst:?}"
    );
    // Bounded: the per-peer queue (4096 messages) and raft's in-flight window
    // (256 appends) cap what is held for the frozen peer.
    let growth = rss_idle.saturating_sub(rss_before);
    assert!(
        growth < 128 * 1024,
        "leader grew by {growth} KiB while a follower was frozen"
    );
    // After SIGCONT the follower catches up.
    let want = host_names(&mut cluster.client(leader), pb::Consistency::Linearizable)
        .await
        .unwrap();
    assert_eq!(want.len(), 50 + total as usize);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(n) =
            host_names(&mut cluster.client(follower), pb::Consistency::Serializable).await
        {
            if n == want {
                break;
            }
        }
        assert!(Instant::now() < deadline, "follower did not catch up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_exit(cluster: &mut Cluster, id: u64, within: Duration) -> Option<i32> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(st) = cluster.exited(id) {
            return Some(st.code().unwrap_or(-1));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_stays_on_loopback_unless_allowed() {
    let mut cluster = Cluster::new(1);
    cluster.wait_leader(&[1], Duration::from_secs(10)).await;
    cluster.kill(1);
    let cfg_path = cluster.nodes[&1].config.clone();
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    let loopback = cluster.nodes[&1].metrics.clone();
    let port = loopback.rsplit(':').next().unwrap().to_string();
    let public = cfg.replace(
        &format!("metrics_listen = \"{loopback}\""),
        &format!("metrics_listen = \"0.0.0.0:{port}\""),
    );
    assert_ne!(public, cfg);
    std::fs::write(&cfg_path, &public).unwrap();
    cluster.spawn(1);
    let code = wait_exit(&mut cluster, 1, Duration::from_secs(10)).await;
    assert!(
        matches!(code, Some(c) if c != 0),
        "a non-loopback metrics bind must be refused: {code:?}"
    );
    let log = cluster.log_text(1);
    assert!(log.contains("not a loopback address"), "{log}");
    assert!(common::http_get(&loopback, "/metrics").is_none());

    // Explicitly allowed: it starts and serves on every address.
    std::fs::write(&cfg_path, format!("metrics_allow_remote = true\n{public}")).unwrap();
    cluster.spawn(1);
    cluster.wait_leader(&[1], Duration::from_secs(10)).await;
    let body = tokio::task::spawn_blocking(move || common::http_get(&loopback, "/metrics"))
        .await
        .unwrap()
        .expect("metrics served when allowed");
    assert!(body.contains("pxemesh_coordinator_"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn secrets_reach_no_log_metric_argument_or_error() {
    let mut cluster = Cluster::new(3);
    // Debug logging: the most verbose the nodes are ever run with.
    for id in 1..=3 {
        cluster.kill(id);
        cluster.spawn_env(id, &[("RUST_LOG", "debug")]);
    }
    let leader = cluster
        .wait_leader(&[1, 2, 3], Duration::from_secs(15))
        .await;
    let mut c = cluster.client(leader);
    seed(&mut c).await;
    let secret = format!("Bmc-Secret-{}", std::process::id());
    let with_bmc = |name: &str, i: u32, ip: &str| {
        let mut o = host_named(name, i);
        if let Some(pb::object::Record::Host(h)) = &mut o.record {
            h.bmc = Some(pb::Bmc {
                address: ip.into(),
                username: "ADMIN".into(),
                password: secret.clone(),
                ..Default::default()
            });
        }
        o
    };
    put(&mut c, with_bmc("s1", 1, "10.99.0.1"))
        .await
        .expect("host with BMC");
    // Errors about requests that carry the password must not echo it.
    let mut errors = Vec::new();
    for bad in [
        {
            let mut o = with_bmc("s1", 1, "10.99.0.1");
            if let Some(pb::object::Record::Host(h)) = &mut o.record {
                if let Some(b) = &mut h.bmc {
                    b.cipher_suite = 99; // only 3 and 17 are allowed
                }
            }
            o
        },
        with_bmc("s2", 1, "10.99.0.2"), // duplicate MAC/IP of s1
        {
            let mut o = with_bmc("s3", 3, "10.99.0.3");
            if let Some(pb::object::Record::Host(h)) = &mut o.record {
                h.rack = "nope".into();
            }
            o
        },
    ] {
        let e = put(&mut c, bad).await.expect_err("invalid host refused");
        errors.push(format!("{e:?}"));
    }
    // Jobs open the password for the relay; submitting one must not log it.
    let out = cluster.ctl(&["power", "status", "s1"]);
    errors.push(String::from_utf8_lossy(&out.stdout).into_owned());
    errors.push(String::from_utf8_lossy(&out.stderr).into_owned());
    tokio::time::sleep(Duration::from_millis(500)).await;

    let cluster_key = std::fs::read_to_string(cluster.dir().join("cluster.key")).unwrap();
    let cluster_key = cluster_key.trim().to_string();
    let mut secrets = vec![
        ("BMC password", secret.clone()),
        ("cluster key", cluster_key),
    ];
    for stem in ["coordinator-1", "coordinator-2", "coordinator-3", "admin"] {
        let pem = std::fs::read_to_string(cluster.dir().join(format!("{stem}-key.pem"))).unwrap();
        // Any full base64 line of the private key.
        for line in pem
            .lines()
            .filter(|l| !l.starts_with("-----") && l.len() >= 40)
        {
            secrets.push(("private key", line.to_string()));
        }
    }
    let mut surfaces: Vec<(String, String)> = Vec::new();
    for id in 1..=3 {
        surfaces.push((format!("node {id} log"), cluster.log_text(id)));
        let addr = cluster.nodes[&id].metrics.clone();
        let m = tokio::task::spawn_blocking(move || common::http_get(&addr, "/metrics"))
            .await
            .unwrap()
            .unwrap_or_default();
        assert!(m.contains("pxemesh_coordinator_"), "metrics of node {id}");
        surfaces.push((format!("node {id} metrics"), m));
        let pid = cluster.pid(id);
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        surfaces.push((
            format!("node {id} argv"),
            String::from_utf8_lossy(&cmdline).into_owned(),
        ));
    }
    for (i, e) in errors.iter().enumerate() {
        surfaces.push((format!("error {i}"), e.clone()));
    }
    let log_lines: usize = (1..=3).map(|id| cluster.log_text(id).lines().count()).sum();
    assert!(log_lines > 50, "debug logs expected, got {log_lines} lines");
    let mut leaks = Vec::new();
    for (what, s) in &secrets {
        for (surface, text) in &surfaces {
            if text.contains(s.as_str()) {
                leaks.push(format!("{what} in {surface}"));
            }
        }
    }
    eprintln!(
        "secrets checked: {} needles over {} surfaces ({} debug log lines, {} error messages)",
        secrets.len(),
        surfaces.len(),
        log_lines,
        errors.len()
    );
    assert!(leaks.is_empty(), "secrets leaked: {leaks:?}");
}

const LIBFAKETIME: [&str; 2] = [
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/faketime/libfaketimeMT.so.1",
];

/// `YYYY-MM-DDTHH` of now + `offset`, as the tracing timestamps print it.
fn hour_prefix(offset: time::Duration) -> String {
    let t = time::OffsetDateTime::now_utc() + offset;
    format!(
        "{:04}-{:02}-{:02}T{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour()
    )
}

fn faketime_lib(test: &str) -> Option<&'static str> {
    let lib = LIBFAKETIME
        .iter()
        .copied()
        .find(|p| std::path::Path::new(p).exists());
    if lib.is_none() {
        eprintln!(
            "\n\n*** SKIPPED {test}: libfaketime not installed (Debian package faketime, in deploy/test-packages.txt) ***\n"
        );
    }
    lib
}

/// Restart every node under libfaketime: only the wall clock
/// (CLOCK_REALTIME) can be moved, as an NTP step or an operator's `date -s`
/// would; the monotonic clock runs on. Returns the per-node offset file.
fn restart_under_faketime(cluster: &mut Cluster, lib: &str) -> impl Fn(u64) -> std::path::PathBuf {
    let dir = cluster.dir().to_path_buf();
    let clock = move |id: u64| dir.join(format!("node{id}/faketime"));
    let ids: Vec<u64> = cluster.nodes.keys().copied().collect();
    for id in ids {
        std::fs::write(clock(id), "+0\n").unwrap();
        cluster.kill(id);
        let file = clock(id).display().to_string();
        cluster.spawn_env(
            id,
            &[
                ("LD_PRELOAD", lib),
                ("FAKETIME_TIMESTAMP_FILE", &file),
                ("FAKETIME_NO_CACHE", "1"),
                ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
            ],
        );
    }
    clock
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wall_clock_jumps_do_not_disturb_raft() {
    let Some(lib) = faketime_lib("wall_clock_jumps_do_not_disturb_raft") else {
        return;
    };
    let mut cluster = Cluster::with(3, 10_000, 1_000, 3_000);
    cluster
        .wait_leader(&[1, 2, 3], Duration::from_secs(20))
        .await;
    let clock = restart_under_faketime(&mut cluster, lib);
    let leader = cluster
        .wait_leader(&[1, 2, 3], Duration::from_secs(15))
        .await;
    seed(&mut cluster.client(leader)).await;
    let term = cluster.status(leader).await.unwrap().term;
    let followers: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    // The leader's wall clock jumps 3 hours ahead, one follower's 4 minutes
    // back, the other's a day ahead. (Further back than the certificates'
    // 5-minute backdating and mTLS itself refuses them as not yet valid:
    // X.509 validity is wall-clock time; see docs.)
    std::fs::write(clock(leader), "+3h\n").unwrap();
    std::fs::write(clock(followers[0]), "-4m\n").unwrap();
    std::fs::write(clock(followers[1]), "+1d\n").unwrap();
    let started = Instant::now();
    let mut worst = Duration::ZERO;
    let mut i = 0u32;
    while started.elapsed() < Duration::from_secs(6) && i < 2_000 {
        let id = 1 + u64::from(i % 3);
        let t = Instant::now();
        put(&mut cluster.client(id), host(i))
            .await
            .expect("writes continue across wall-clock jumps");
        worst = worst.max(t.elapsed());
        i += 1;
    }
    let status = cluster.status(leader).await.unwrap();
    // Proof the jump is real: a SIGHUP makes the leader log a line (TLS
    // reload), stamped with its wall clock.
    let ahead = hour_prefix(time::Duration::hours(3));
    cluster.signal(leader, libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cluster.log_text(leader).contains(&ahead) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let jumped = cluster.log_text(leader).contains(&ahead);
    eprintln!(
        "clock jumps (+3h leader, -4m and +1d followers): {i} writes in {:?}, worst {worst:?}; leader {} term {} -> leader {} term {}; jump visible in the leader's log: {jumped}",
        started.elapsed(),
        leader,
        term,
        status.leader_id,
        status.term
    );
    assert!(
        jumped,
        "the faked wall clock did not take effect (no {ahead} in the log)"
    );
    assert_eq!(
        status.leader_id, leader,
        "leadership moved after a wall-clock jump"
    );
    assert_eq!(status.term, term, "an election ran after a wall-clock jump");
    assert!(worst < Duration::from_secs(2), "a write stalled {worst:?}");
    let names = host_names(
        &mut cluster.client(followers[1]),
        pb::Consistency::Linearizable,
    )
    .await
    .unwrap();
    assert_eq!(names.len(), i as usize);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_watchers_do_not_make_the_coordinator_buffer() {
    use pxemesh_proto::v1::relay_service_client::RelayServiceClient;
    let cluster = Cluster::new(1);
    cluster.wait_leader(&[1], Duration::from_secs(20)).await;
    let admin = cluster.client(1);
    seed(&mut admin.clone()).await;
    let relay = cluster.pki.tls(
        pxemesh_certs::Role::Relay {
            rack: "r1".into(),
            name: "slow".into(),
        },
        "relay-r1-slow",
    );
    // 8 KiB per event: unbounded buffering would hold WRITES x 8 KiB per watcher.
    const WRITES: usize = 2_000;
    let pad = "x".repeat(8 * 1024);
    let write_all = |base: usize| {
        let mut admin = admin.clone();
        let pad = pad.clone();
        async move {
            let started = Instant::now();
            for i in base..base + WRITES {
                let obj = pb::Object {
                    record: Some(pb::object::Record::Rack(pb::Rack {
                        name: "r1".into(),
                        description: format!("{i} {pad}"),
                        ..Default::default()
                    })),
                };
                put(&mut admin, obj)
                    .await
                    .expect("writes are not held up by slow watchers");
            }
            started.elapsed()
        }
    };
    // Baseline: the same writes with nobody watching (the state machine and
    // its change history grow with them).
    let rss_start = rss_kib(cluster.pid(1));
    let took_alone = write_all(0).await;
    let baseline = rss_kib(cluster.pid(1)).saturating_sub(rss_start);
    // Ten relays watch the rack on their own connections and then stop
    // reading: HTTP/2 flow control pushes back, each watch's bounded queue
    // fills, and its producer waits.
    const WATCHERS: usize = 10;
    let mut streams = Vec::new();
    for _ in 0..WATCHERS {
        let ch =
            pxemesh_coordinator::client::channel_lazy(&cluster.addr(1), relay.clone()).unwrap();
        let mut s = RelayServiceClient::new(ch)
            .watch(pb::WatchRequest {
                from_revision: 0,
                rack: String::new(),
            })
            .await
            .expect("watch")
            .into_inner();
        let first = tokio::time::timeout(Duration::from_secs(5), s.message()).await;
        assert!(matches!(first, Ok(Ok(Some(_)))), "snapshot: {first:?}");
        streams.push(s);
    }
    let rss_before = rss_kib(cluster.pid(1));
    let took = write_all(WRITES).await;
    let rss_after = rss_kib(cluster.pid(1));
    let unbounded_kib = (WATCHERS * WRITES * 8) as u64;
    let growth = rss_after.saturating_sub(rss_before);
    let attributable = growth.saturating_sub(baseline);
    eprintln!(
        "slow watchers: {WRITES} writes of 8 KiB alone in {took_alone:?} (+{baseline} KiB RSS), then with {WATCHERS} stalled watches in {took:?} (+{growth} KiB RSS): {attributable} KiB attributable to the watchers; unbounded buffering would need ~{unbounded_kib} KiB"
    );
    assert!(
        attributable < unbounded_kib / 2,
        "coordinator grew {attributable} KiB more with stalled watchers"
    );
    // A stalled watcher that resumes reading still gets every change, in order.
    let s = &mut streams[0];
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last_seen = None;
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), s.message()).await {
            Ok(Ok(Some(m))) => {
                if let Some(pb::watch_response::Message::Event(ev)) = m.message {
                    if let Some(pb::object::Record::Rack(r)) = ev.object.and_then(|o| o.record) {
                        let n: usize = r
                            .description
                            .split(' ')
                            .next()
                            .and_then(|n| n.parse().ok())
                            .unwrap_or(usize::MAX);
                        if let Some(prev) = last_seen {
                            assert!(n > prev, "out of order: {n} after {prev}");
                        }
                        last_seen = Some(n);
                        if n == 2 * WRITES - 1 {
                            break;
                        }
                    }
                }
            }
            other => panic!("watch ended early: {other:?}"),
        }
    }
    assert_eq!(
        last_seen,
        Some(2 * WRITES - 1),
        "resumed watcher did not catch up"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_with_a_slow_disk_does_not_slow_the_majority() {
    let mut cluster = Cluster::with(3, 10_000, 1_000, 3_000);
    let leader = cluster
        .wait_leader(&[1, 2, 3], Duration::from_secs(20))
        .await;
    seed(&mut cluster.client(leader)).await;
    // Every log append on this follower now takes 300 ms more (a failing
    // disk): its Raft actor stalls on each one.
    let slow = (1..=3).find(|id| *id != leader).unwrap();
    cluster.kill(slow);
    cluster.spawn_env(
        slow,
        &[("PXEMESH_FAILPOINTS", "after_log_append=sleep(300)")],
    );
    let leader = cluster
        .wait_leader(&[1, 2, 3], Duration::from_secs(20))
        .await;
    let mut c = cluster.client(leader);
    let started = Instant::now();
    let mut worst = Duration::ZERO;
    const WRITES: u32 = 200;
    for i in 0..WRITES {
        let t = Instant::now();
        put(&mut c, host(i)).await.expect("majority write");
        worst = worst.max(t.elapsed());
    }
    let took = started.elapsed();
    let stalls = cluster
        .log_text(slow)
        .matches("FAILPOINT after_log_append")
        .count();
    eprintln!(
        "slow follower disk (+300 ms per append on node {slow}): {WRITES} writes through leader {leader} in {took:?}, worst {worst:?}; the follower stalled {stalls} times"
    );
    assert!(stalls > 0, "the slow-disk failpoint never fired");
    // Waiting for the slow follower would cost >= 300 ms per write.
    assert!(
        took < Duration::from_millis(150) * WRITES,
        "writes waited for the slow follower: {WRITES} took {took:?}"
    );
    assert!(
        worst < Duration::from_secs(2),
        "a slow follower slowed a write to {worst:?}"
    );
    // It still converges.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(n) = host_names(&mut cluster.client(slow), pb::Consistency::Serializable).await {
            if n.len() == WRITES as usize {
                break;
            }
        }
        assert!(Instant::now() < deadline, "slow follower never caught up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn job_leases_survive_a_wall_clock_jump() {
    use pxemesh_proto::v1::relay_service_client::RelayServiceClient;
    let Some(lib) = faketime_lib("job_leases_survive_a_wall_clock_jump") else {
        return;
    };
    let mut cluster = Cluster::with(3, 10_000, 1_000, 3_000);
    cluster
        .wait_leader(&[1, 2, 3], Duration::from_secs(20))
        .await;
    let clock = restart_under_faketime(&mut cluster, lib);
    let leader = cluster
        .wait_leader(&[1, 2, 3], Duration::from_secs(20))
        .await;
    let mut admin = cluster.client(leader);
    seed(&mut admin).await;
    let mut h = host_named("j1", 1);
    if let Some(pb::object::Record::Host(h)) = &mut h.record {
        h.bmc = Some(pb::Bmc {
            address: "10.99.0.1".into(),
            username: "ADMIN".into(),
            password: "pw".into(),
            ..Default::default()
        });
    }
    put(&mut admin, h).await.expect("host");
    admin
        .submit_jobs(pb::SubmitJobsRequest {
            action: "power-status".into(),
            hosts: Some(pb::HostSelector {
                names: vec!["j1".into()],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("submit");
    let relay = |name: &str| {
        cluster.pki.tls(
            pxemesh_certs::Role::Relay {
                rack: "r1".into(),
                name: name.into(),
            },
            &format!("relay-r1-{name}"),
        )
    };
    let (a, b) = (relay("a"), relay("b"));
    let lease = |tls: std::sync::Arc<pxemesh_certs::Tls>, node: u64| {
        let addr = cluster.addr(node);
        async move {
            let ch = pxemesh_coordinator::client::channel_lazy(&addr, tls).unwrap();
            RelayServiceClient::new(ch)
                .lease_jobs(pb::LeaseJobsRequest {
                    max_jobs: 1,
                    lease_seconds: 60,
                    wait_ms: 0,
                })
                .await
                .expect("lease")
                .into_inner()
                .jobs
        }
    };
    let got = lease(a.clone(), leader).await;
    assert_eq!(got.len(), 1, "relay a leases the job");
    let job = got[0].job.clone().unwrap();
    // Every node's wall clock jumps 3 hours ahead: the 60 s lease must hold.
    for id in 1..=3 {
        std::fs::write(clock(id), "+3h\n").unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut stolen = 0;
    for id in 1..=3 {
        stolen += lease(b.clone(), id).await.len();
    }
    let step = cluster
        .metric(leader, "pxemesh_coordinator_wall_clock_step_ms")
        .await
        .unwrap_or(0.0);
    // The lease holder's report is still accepted with its token.
    let ch = pxemesh_coordinator::client::channel_lazy(&cluster.addr(leader), a).unwrap();
    let report = RelayServiceClient::new(ch)
        .report_job(pb::ReportJobRequest {
            job_id: job.id.clone(),
            state: pb::JobState::Running as i32,
            attempts: job.attempts,
            lease_seconds: 60,
            ..Default::default()
        })
        .await;
    eprintln!(
        "job lease across a +3h wall-clock step: re-leased {stolen} times; leader reports a step of {step} ms; holder's report accepted: {}",
        report.is_ok()
    );
    assert_eq!(stolen, 0, "a wall-clock step expired a 60 s lease");
    assert!(
        (step - 3.0 * 3600.0 * 1000.0).abs() < 60_000.0,
        "step gauge {step}"
    );
    report.expect("the lease holder keeps its lease");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_are_refused_and_change_nothing() {
    let cluster = Cluster::with_extra(
        1,
        10_000,
        1_000,
        3_000,
        "\n[limits]\nmax_request_bytes = 1048576\n",
    );
    cluster.wait_leader(&[1], Duration::from_secs(20)).await;
    let mut c = cluster.client(1);
    seed(&mut c).await;
    let big = pb::Object {
        record: Some(pb::object::Record::Rack(pb::Rack {
            name: "big".into(),
            description: "x".repeat(2 * 1024 * 1024),
            ..Default::default()
        })),
    };
    let err = put(&mut c, big)
        .await
        .expect_err("a 2 MiB request over a 1 MiB limit");
    eprintln!("oversized request: {:?}: {}", err.code(), err.message());
    assert!(
        matches!(
            err.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
        ),
        "{err:?}"
    );
    let mut req = tonic::Request::new(pb::GetRequest {
        kind: pb::Kind::Rack as i32,
        name: "big".into(),
        consistency: pb::Consistency::Linearizable as i32,
    });
    req.set_timeout(Duration::from_secs(5));
    let got = c.get(req).await.expect_err("nothing was written");
    assert_eq!(got.code(), tonic::Code::NotFound);
    // The same connection and node keep serving.
    put(&mut c, host(1))
        .await
        .expect("a normal write after the refusal");
}
