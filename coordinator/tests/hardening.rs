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
