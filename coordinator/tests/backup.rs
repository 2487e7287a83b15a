//! The backup and restore procedure of docs/operations.md, done to real
//! coordinator processes: stop a follower gracefully (SIGTERM, as
//! `systemctl stop` does), copy its data directory, start it again; later
//! lose the whole cluster and restore every node from that one copy. The
//! restored cluster elects a leader, holds exactly the state of the backup
//! and takes writes again.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use pxemesh_proto::v1 as pb;

fn exited(pid: i32) -> bool {
    // Our child stays a zombie until reaped: state Z counts as gone.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
    }
}

fn copy_dir(from: &Path, to: &Path) {
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("cp");
    assert!(st.success(), "cp -a {} {}", from.display(), to.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_of_a_stopped_follower_restores_the_whole_cluster() {
    let mut cluster = Cluster::new(3);
    let leader = cluster
        .wait_leader(&[1, 2, 3], Duration::from_secs(15))
        .await;
    let mut c = cluster.client(leader);
    seed(&mut c).await;
    for i in 0..20 {
        put(&mut c, host(i)).await.expect("put");
    }
    let backed_up = host_names(&mut c, pb::Consistency::Linearizable)
        .await
        .unwrap();
    assert_eq!(backed_up.len(), 20);

    // Backup: a follower, stopped the way systemd stops it, copied, restarted.
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let pid = cluster.pid(follower);
    cluster.signal(follower, libc::SIGTERM);
    let t = Instant::now();
    while !exited(pid) {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "node did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    cluster.kill(follower); // reap
    let backup = cluster.dir().join("backup");
    copy_dir(&cluster.dir().join(format!("node{follower}/data")), &backup);
    cluster.spawn(follower);

    // Writes after the backup: the restore goes back to before them.
    for i in 100..105 {
        put(&mut c, host(i)).await.expect("put after backup");
    }

    // The whole cluster is lost.
    for id in 1..=3 {
        cluster.kill(id);
    }
    for id in 1..=3 {
        let data = cluster.dir().join(format!("node{id}/data"));
        std::fs::remove_dir_all(&data).unwrap();
        copy_dir(&backup, &data);
    }
    for id in 1..=3 {
        cluster.spawn(id);
    }
    let leader = cluster
        .wait_leader(&[1, 2, 3], Duration::from_secs(20))
        .await;
    let mut c = cluster.client(leader);
    let restored = host_names(&mut c, pb::Consistency::Linearizable)
        .await
        .unwrap();
    assert_eq!(restored, backed_up, "the restored state is the backup's");
    // The restored cluster takes writes again.
    put(&mut c, host(200)).await.expect("write after restore");
    for id in 1..=3 {
        let mut n = cluster.client(id);
        let t = Instant::now();
        loop {
            let names = host_names(&mut n, pb::Consistency::Serializable)
                .await
                .unwrap_or_default();
            if names.len() == 21 {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "node {id} has {names:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
