//! RelayService/Watch against a real 3-node cluster: rack-scoped snapshot and
//! events, resuming on another node after the watched one dies, and a fresh
//! snapshot only when the resume point is gone.

mod common;

use std::time::{Duration, Instant};

use common::*;
use pxemesh_certs::Role;
use pxemesh_proto::v1 as pb;
use pxemesh_proto::v1::relay_service_client::RelayServiceClient;
use pxemesh_proto::v1::watch_response::Message;
use tonic::Streaming;

async fn watch(
    cluster: &Cluster,
    node: u64,
    tls: std::sync::Arc<pxemesh_certs::Tls>,
    from: u64,
) -> Streaming<pb::WatchResponse> {
    let ch = pxemesh_coordinator::client::channel_lazy(&cluster.addr(node), tls).unwrap();
    RelayServiceClient::new(ch)
        .watch(pb::WatchRequest {
            from_revision: from,
            rack: String::new(),
        })
        .await
        .expect("watch")
        .into_inner()
}

async fn next(stream: &mut Streaming<pb::WatchResponse>, within: Duration) -> Option<Message> {
    match tokio::time::timeout(within, stream.message()).await {
        Ok(Ok(Some(m))) => m.message,
        _ => None,
    }
}

/// Next event for a host (skipping progress and other kinds), with its revision.
async fn next_host_event(
    stream: &mut Streaming<pb::WatchResponse>,
    within: Duration,
) -> Option<pb::WatchEvent> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        match next(stream, deadline - Instant::now()).await? {
            Message::Event(e) if e.kind == pb::Kind::Host as i32 => return Some(e),
            _ => continue,
        }
    }
    None
}

fn rack_host(name: &str, rack: &str, net: &str, i: u32) -> pb::Object {
    let mut o = host_named(name, i);
    if let Some(pb::object::Record::Host(h)) = &mut o.record {
        h.rack = rack.into();
        h.network = net.into();
        if rack == "r2" {
            h.ip = format!("10.20.0.{}", 10 + i % 100);
        }
    }
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_watch_is_scoped_live_and_resumes_on_another_node() {
    let mut cluster = Cluster::new(3);
    let leader = cluster
        .wait_leader(&[1, 2, 3], Duration::from_secs(10))
        .await;
    let mut admin = cluster.client(leader);
    seed(&mut admin).await;
    put(&mut admin, rack("r2")).await.unwrap();
    put(&mut admin, network("n2", "r2", "10.20.0.0/24"))
        .await
        .unwrap();
    put(&mut admin, rack_host("a1", "r1", "n1", 1))
        .await
        .unwrap();
    put(&mut admin, rack_host("b1", "r2", "n2", 101))
        .await
        .unwrap();

    let relay = cluster.pki.tls(
        Role::Relay {
            rack: "r1".into(),
            name: "ra".into(),
        },
        "relay-r1-ra",
    );
    // Watch a follower: any node serves watches from its applied state.
    let watched = (1..=3).find(|id| *id != leader).unwrap();
    let mut stream = watch(&cluster, watched, relay.clone(), 0).await;
    let Some(Message::Snapshot(snap)) = next(&mut stream, Duration::from_secs(5)).await else {
        panic!("no snapshot")
    };
    let hosts: Vec<String> = snap
        .objects
        .iter()
        .filter_map(|o| match &o.record {
            Some(pb::object::Record::Host(h)) => Some(h.name.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        hosts,
        vec!["a1".to_string()],
        "rack r2's host must not be in r1's snapshot"
    );

    // A put in r1 arrives within 1 s; a put in r2 never does.
    put(&mut admin, rack_host("b2", "r2", "n2", 102))
        .await
        .unwrap();
    let t = Instant::now();
    put(&mut admin, rack_host("a2", "r1", "n1", 2))
        .await
        .unwrap();
    let ev = next_host_event(&mut stream, Duration::from_secs(1))
        .await
        .expect("event within 1 s");
    assert!(t.elapsed() < Duration::from_secs(1));
    assert_eq!(
        (ev.name.as_str(), ev.r#type),
        ("a2", pb::EventType::Put as i32)
    );
    let Some(pb::object::Record::Host(h)) = ev.object.and_then(|o| o.record) else {
        panic!()
    };
    assert!(
        h.bmc.is_none_or(|b| b.password.is_empty()),
        "no secrets in watch events"
    );
    let mut last = ev.revision;

    // Delete: a DELETE event.
    admin
        .delete(pb::DeleteRequest {
            kind: pb::Kind::Host as i32,
            name: "a2".into(),
        })
        .await
        .unwrap();
    let ev = next_host_event(&mut stream, Duration::from_secs(2))
        .await
        .expect("delete event");
    assert_eq!(
        (ev.name.as_str(), ev.r#type),
        ("a2", pb::EventType::Delete as i32)
    );
    assert!(ev.revision > last);
    last = ev.revision;

    // Kill the watched node; changes made meanwhile are replayed on another
    // node from the resume point, without a snapshot.
    cluster.kill(watched);
    let survivors: Vec<u64> = (1..=3).filter(|id| *id != watched).collect();
    let new_leader = cluster
        .wait_leader(&survivors, Duration::from_secs(10))
        .await;
    let mut admin = cluster.client(new_leader);
    put(&mut admin, rack_host("a3", "r1", "n1", 3))
        .await
        .unwrap();
    let other = survivors[0];
    let mut stream = watch(&cluster, other, relay, last).await;
    let first = next(&mut stream, Duration::from_secs(5))
        .await
        .expect("a message after resuming");
    assert!(
        !matches!(first, Message::Snapshot(_)),
        "resume must not resync: {first:?}"
    );
    let ev = match first {
        Message::Event(e) if e.kind == pb::Kind::Host as i32 => e,
        _ => next_host_event(&mut stream, Duration::from_secs(2))
            .await
            .expect("replayed event"),
    };
    assert_eq!(ev.name, "a3");
    assert!(ev.revision > last);
}

fn boot_event(mac: &str, kind: &str, seq: u64) -> pb::BootEvent {
    pb::BootEvent {
        host_mac: mac.into(),
        kind: kind.into(),
        detail: format!("d{seq}"),
        unix_ms: 1_000 * seq,
        sequence: seq,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn boot_events_are_stored_once_and_shown_in_the_host_timeline() {
    let cluster = Cluster::new(1);
    cluster.wait_leader(&[1], Duration::from_secs(10)).await;
    let mut admin = cluster.client(1);
    seed(&mut admin).await;
    put(&mut admin, host(7)).await.unwrap();
    let mac = "52:54:00:00:00:07";
    let relay = cluster.pki.tls(
        Role::Relay {
            rack: "r1".into(),
            name: "ra".into(),
        },
        "relay-r1-ra",
    );
    let mut rs = RelayServiceClient::new(
        pxemesh_coordinator::client::channel_lazy(&cluster.addr(1), relay).unwrap(),
    );

    // `events watch` started first sees what arrives afterwards.
    let dir = cluster.dir().to_path_buf();
    let endpoints = cluster.endpoints();
    let watcher = std::thread::spawn(move || {
        std::process::Command::new(ctl_bin())
            .args([
                "--endpoints",
                &endpoints,
                "--tls-dir",
                dir.to_str().unwrap(),
                "-o",
                "json",
                "events",
                "watch",
                "--count",
                "3",
            ])
            .output()
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(500)).await;

    let acked = rs
        .report_boot_events(pb::ReportBootEventsRequest {
            events: vec![
                boot_event(mac, "dhcp-offer", 1),
                boot_event(mac, "dhcp-ack", 2),
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .acked_sequence;
    assert_eq!(acked, 2);
    // The relay did not get that ack (say) and sends again, with one new event.
    let acked = rs
        .report_boot_events(pb::ReportBootEventsRequest {
            events: vec![
                boot_event(mac, "dhcp-ack", 2),
                boot_event(mac, "http-file", 3),
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .acked_sequence;
    assert_eq!(acked, 3);
    // Garbage is refused, not stored.
    let err = rs
        .report_boot_events(pb::ReportBootEventsRequest {
            events: vec![boot_event("not-a-mac", "dhcp-ack", 4)],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    let out = cluster.ctl(&["-o", "json", "host", "get", "h7"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let kinds: Vec<&str> = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        vec!["dhcp-offer", "dhcp-ack", "http-file"],
        "each event exactly once: {v}"
    );
    assert_eq!(v["events"][0]["relay"], "ra");

    let watched = watcher.join().unwrap();
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&watched.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines.len(),
        3,
        "{}",
        String::from_utf8_lossy(&watched.stderr)
    );
    assert_eq!(lines[2]["kind"], "http-file");
    assert_eq!(lines[0]["host"], "h7");
}
