//! A real 3-node cluster of coordinator processes on loopback with real
//! certificates: replication, leader failure, restart, snapshots, membership,
//! and minority partitions.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use pxemesh_proto::v1 as pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_through_any_node_and_status_names_the_leader() {
    let cluster = Cluster::new(3);
    let leader = cluster
        .wait_leader(&[1, 2, 3], Duration::from_secs(10))
        .await;
    assert!((1..=3).contains(&leader));

    // A write through each node, followers included.
    seed(&mut cluster.client(1)).await;
    for id in 1..=3u64 {
        let out = put(&mut cluster.client(id), host(id as u32))
            .await
            .expect("put through node");
        assert_eq!(out.outcome, pb::Outcome::Created as i32);
        assert!(out.revision >= 3);
    }
    // Linearizable reads on every node see every write.
    for id in 1..=3u64 {
        let names = host_names(&mut cluster.client(id), pb::Consistency::Linearizable)
            .await
            .unwrap();
        assert_eq!(
            names,
            BTreeSet::from(["h1".to_string(), "h2".into(), "h3".into()]),
            "node {id}"
        );
    }

    // pxemeshctl cluster status names leader, term, members and applied index.
    let out = cluster.ctl(&["-o", "json", "cluster", "status"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json status");
    assert_eq!(v["leader_id"].as_u64(), Some(leader), "{v}");
    assert!(v["term"].as_u64().unwrap_or(0) >= 1, "{v}");
    let members = v["members"].as_array().expect("members");
    assert_eq!(members.len(), 3, "{v}");
    let nodes = v["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 3);
    for n in nodes {
        assert!(n["applied_index"].as_u64().unwrap_or(0) >= 5, "{n}");
    }
    let table = cluster.ctl(&["cluster", "status"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(table.status.success() && text.contains("leader"), "{text}");

    // Leadership moves on request (e.g. before maintenance of the leader's host).
    let target = (1..=3u64).find(|id| *id != leader).unwrap();
    let out = cluster.ctl(&["cluster", "transfer-leader", "--id", &target.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        cluster
            .wait_leader(&[1, 2, 3], Duration::from_secs(10))
            .await,
        target
    );
    put(&mut cluster.client(leader), host(9))
        .await
        .expect("write after transfer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_the_leader_loses_no_acknowledged_write() {
    let mut cluster = Cluster::new(3);
    let leader = cluster
        .wait_leader(&[1, 2, 3], Duration::from_secs(10))
        .await;
    seed(&mut cluster.client(leader)).await;

    let acked: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let mut writers = Vec::new();
    // Four writers, each cycling through all nodes so one of them is always
    // talking to the leader that is about to die.
    for w in 0..4u32 {
        let clients: Vec<_> = (1..=3).map(|id| cluster.client(id)).collect();
        let acked = acked.clone();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut clients = clients;
            let mut attempts = 0u32;
            for i in 0..2_000u32 {
                if stop.is_cancelled() {
                    break;
                }
                let n = w * 10_000 + i;
                let c = &mut clients[(i as usize) % 3];
                attempts += 1;
                if put(c, host_named(&format!("w{n}"), n)).await.is_ok() {
                    acked.lock().unwrap().insert(format!("w{n}"));
                }
            }
            attempts
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = acked.lock().unwrap().len();
    assert!(
        before > 10,
        "writes should be flowing before the kill (got {before})"
    );

    cluster.kill(leader);
    let killed_at = Instant::now();
    let survivors: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    let new_leader = loop {
        let mut seen = None;
        for id in &survivors {
            if let Ok(s) = cluster.status(*id).await {
                if s.leader_id != 0 && s.leader_id != leader {
                    seen = Some(s.leader_id);
                }
            }
        }
        if let Some(l) = seen {
            break l;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(10),
            "no new leader after kill -9"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let election = killed_at.elapsed();
    assert!(
        election < Duration::from_secs(3),
        "new leader {new_leader} took {election:?}"
    );

    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.cancel();
    for w in writers {
        w.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > before, "writes continued after the failover");

    for id in &survivors {
        let names = host_names(&mut cluster.client(*id), pb::Consistency::Linearizable)
            .await
            .unwrap();
        let missing: Vec<_> = acked.difference(&names).collect();
        assert!(
            missing.is_empty(),
            "node {id} lost acknowledged writes: {missing:?}"
        );
    }

    // The killed node comes back from its data dir and converges.
    cluster.spawn(leader);
    let deadline = Instant::now() + Duration::from_secs(20);
    let want = host_names(
        &mut cluster.client(new_leader),
        pb::Consistency::Linearizable,
    )
    .await
    .unwrap();
    loop {
        if let Ok(names) =
            host_names(&mut cluster.client(leader), pb::Consistency::Serializable).await
        {
            if names == want {
                break;
            }
        }
        assert!(Instant::now() < deadline, "restarted node did not converge");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "failover: {} acknowledged writes, new leader {new_leader} elected {election:?} after kill -9 of {leader}",
        acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_snapshot_catch_up_and_member_removal() {
    // Compact after 40 entries, keep 5: a late joiner must take a snapshot.
    let mut cluster = Cluster::with(3, 40, 5, 5_000);
    let leader = cluster
        .wait_leader(&[1, 2, 3], Duration::from_secs(10))
        .await;
    let mut c = cluster.client(leader);
    seed(&mut c).await;
    for i in 0..120 {
        put(&mut c, host(i)).await.expect("put");
    }
    let want = host_names(&mut c, pb::Consistency::Linearizable)
        .await
        .unwrap();
    assert_eq!(want.len(), 120);
    let status = cluster.status(leader).await.unwrap();
    assert!(
        status.snapshot_index > 0 && status.first_index > 1,
        "log was compacted: {status:?}"
    );

    // Every node killed at once: nothing survives except the data dirs. After
    // the restart every node holds every acknowledged write again; the log is
    // durable on disk, and the commit point is recovered from the quorum.
    for id in 1..=3 {
        cluster.kill(id);
    }
    for id in 1..=3 {
        cluster.spawn(id);
    }
    let leader = cluster
        .wait_leader(&[1, 2, 3], Duration::from_secs(15))
        .await;
    for id in 1..=3 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(names) =
                host_names(&mut cluster.client(id), pb::Consistency::Serializable).await
            {
                if names == want {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "node {id} lost state across a full restart"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // Node 4 joins after compaction and must catch up from a snapshot.
    let addr4 = cluster.spawn_joiner(4);
    let resp = cluster
        .client(leader)
        .add_member(pb::AddMemberRequest {
            id: 4,
            address: addr4,
            learner: false,
        })
        .await
        .expect("add member")
        .into_inner();
    assert_eq!(resp.members.len(), 4);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(names) = host_names(&mut cluster.client(4), pb::Consistency::Serializable).await {
            if names == want {
                break;
            }
        }
        assert!(Instant::now() < deadline, "node 4 did not catch up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let installed = cluster
        .metric(4, "pxemesh_coordinator_snapshots_installed_total")
        .await;
    assert!(
        installed.unwrap_or(0.0) >= 1.0,
        "node 4 should have installed a snapshot: {installed:?}"
    );
    // New writes reach the new member too.
    put(&mut cluster.client(4), host(500))
        .await
        .expect("write through the new member");
    assert!(
        host_names(&mut cluster.client(4), pb::Consistency::Linearizable)
            .await
            .unwrap()
            .contains("h500")
    );

    // Remove node 4: it stops receiving raft traffic, the rest keep working.
    let resp = cluster
        .client(leader)
        .remove_member(pb::RemoveMemberRequest { id: 4 })
        .await
        .expect("remove member")
        .into_inner();
    assert!(resp.members.iter().all(|m| m.id != 4));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = cluster.status(4).await.unwrap().raft_messages_received;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = cluster.status(4).await.unwrap().raft_messages_received;
    assert_eq!(before, after, "removed node still receives raft traffic");
    put(&mut cluster.client(leader), host(501))
        .await
        .expect("write after removal");
    for id in 1..=3 {
        let s = cluster.status(id).await.unwrap();
        assert!(
            s.members.iter().all(|m| m.id != 4),
            "node {id} still lists node 4"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn majority_keeps_writing_and_an_isolated_node_accepts_nothing() {
    let cluster = Cluster::with(3, 10_000, 1_000, 3_000);
    let leader = cluster
        .wait_leader(&[1, 2, 3], Duration::from_secs(10))
        .await;
    seed(&mut cluster.client(leader)).await;

    // One follower frozen: the other two are a majority and keep accepting writes.
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    cluster.pause(follower);
    let others: Vec<u64> = (1..=3).filter(|id| *id != follower).collect();
    for (i, id) in others.iter().enumerate() {
        put(&mut cluster.client(*id), host(i as u32))
            .await
            .expect("majority write");
    }
    cluster.resume(follower);

    // Freeze two nodes: the remaining one is a minority of one.
    let isolated = follower;
    let frozen: Vec<u64> = (1..=3).filter(|id| *id != isolated).collect();
    for id in &frozen {
        cluster.pause(*id);
    }
    // Give check-quorum time to make a lone leader step down, if it was one.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut c = cluster.client(isolated);
    for i in 0..3 {
        let res = put(&mut c, host(100 + i)).await;
        let err = res.expect_err("an isolated node must not acknowledge writes");
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    }
    let err = host_names(&mut c, pb::Consistency::Linearizable)
        .await
        .expect_err("no linearizable reads without quorum");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    // Stale reads stay available on request.
    host_names(&mut c, pb::Consistency::Serializable)
        .await
        .expect("serializable read");

    for id in &frozen {
        cluster.resume(*id);
    }
    let leader = cluster
        .wait_leader(&[1, 2, 3], Duration::from_secs(10))
        .await;
    put(&mut cluster.client(leader), host(200))
        .await
        .expect("writes resume after healing");
}
