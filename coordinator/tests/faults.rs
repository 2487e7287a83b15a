//! Fault injection against a real 3-process cluster: crashes at failpoints
//! (between log append and apply, after apply before the reply, during a
//! snapshot install, during log compaction, during a membership change) and
//! kill -9, while clients read and write through the admin API. The recorded
//! history must be linearizable and every acknowledged write must survive.

mod common;
#[path = "common/linearizability.rs"]
mod linearizability;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use linearizability::{Kind, Op};
use pxemesh_proto::v1 as pb;

const KEYS: [&str; 3] = ["k0", "k1", "k2"];
const CLIENTS: usize = 4;
/// Hard bounds on the workload, whatever happens.
const MAX_OPS_PER_CLIENT: usize = 1_500;
const OP_TIMEOUT: Duration = Duration::from_secs(4);

fn rack_with(name: &str, description: &str) -> pb::Object {
    pb::Object {
        record: Some(pb::object::Record::Rack(pb::Rack {
            name: name.into(),
            description: description.into(),
            ..Default::default()
        })),
    }
}

#[derive(Default)]
struct Recorded {
    history: Vec<Op>,
    /// Racks created with a unique name whose Put was acknowledged.
    acked_creates: BTreeSet<String>,
    ok: usize,
    failed: usize,
    /// Failed requests by status code (writes among them are indeterminate).
    errors: std::collections::BTreeMap<String, usize>,
}

impl Recorded {
    fn error(&mut self, s: &tonic::Status) {
        self.failed += 1;
        *self.errors.entry(format!("{:?}", s.code())).or_default() += 1;
        if s.code() == tonic::Code::Internal {
            *self
                .errors
                .entry(format!("Internal: {}", s.message()))
                .or_default() += 1;
        }
    }
}

/// One client: random ops on the register keys through a random node,
/// one at a time, until `stop` or its bounds.
async fn client_loop(
    me: usize,
    addrs: Vec<(u64, String)>,
    admin: Arc<pxemesh_certs::Tls>,
    start: Instant,
    stop: Arc<AtomicBool>,
    rec: Arc<Mutex<Recorded>>,
) {
    use rand::Rng;
    let clients: Vec<_> = addrs
        .iter()
        .map(|(_, a)| {
            pb::admin_service_client::AdminServiceClient::new(
                pxemesh_coordinator::client::channel_lazy(a, admin.clone()).expect("channel"),
            )
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(150);
    for n in 0..MAX_OPS_PER_CLIENT {
        if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
            break;
        }
        let (target, key, roll) = {
            let mut rng = rand::thread_rng();
            (
                rng.gen_range(0..clients.len()),
                KEYS[rng.gen_range(0..KEYS.len())],
                rng.gen_range(0..10u32),
            )
        };
        let mut c = clients[target].clone();
        let now = || start.elapsed().as_nanos() as u64;
        if roll < 4 {
            let value = format!("c{me}-{n}");
            let invoke = now();
            let mut req = tonic::Request::new(pb::PutRequest {
                object: Some(rack_with(key, &value)),
            });
            req.set_timeout(OP_TIMEOUT);
            let res = c.put(req).await;
            let ret = now();
            let mut r = rec.lock().unwrap();
            let ok = res.is_ok();
            match &res {
                Ok(_) => r.ok += 1,
                Err(s) => r.error(s),
            }
            r.history.push(Op {
                client: me,
                key: key.into(),
                kind: Kind::Write(value),
                invoke,
                ret: ok.then_some(ret),
            });
        } else if roll < 8 {
            let invoke = now();
            let mut req = tonic::Request::new(pb::GetRequest {
                kind: pb::Kind::Rack as i32,
                name: key.into(),
                consistency: pb::Consistency::Linearizable as i32,
            });
            req.set_timeout(OP_TIMEOUT);
            let res = c.get(req).await;
            let ret = now();
            let mut r = rec.lock().unwrap();
            let seen = match res {
                Ok(resp) => match resp.into_inner().object.and_then(|o| o.record) {
                    Some(pb::object::Record::Rack(rk)) => Some(Some(rk.description)),
                    other => panic!("Get of rack {key} returned {other:?}"),
                },
                Err(s) if s.code() == tonic::Code::NotFound => Some(None),
                Err(s) => {
                    r.error(&s);
                    None
                }
            };
            if let Some(v) = seen {
                r.ok += 1;
                r.history.push(Op {
                    client: me,
                    key: key.into(),
                    kind: Kind::Read(v),
                    invoke,
                    ret: Some(ret),
                });
            }
        } else {
            // A unique record: must exist at the end if acknowledged.
            let name = format!("u-c{me}-{n}");
            let res = put(&mut c, rack(&name)).await;
            let mut r = rec.lock().unwrap();
            match res {
                Ok(_) => {
                    r.ok += 1;
                    r.acked_creates.insert(name);
                }
                Err(s) => r.error(&s),
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Wait (bounded) for node `id` to exit; returns its exit code.
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

async fn applied(cluster: &Cluster, id: u64) -> u64 {
    cluster
        .status(id)
        .await
        .map(|s| s.applied_index)
        .unwrap_or(0)
}

async fn leader(c: &Cluster) -> u64 {
    c.wait_leader(&[1, 2, 3], Duration::from_secs(20)).await
}

/// Restart `id` with a failpoint, wait until it fires (the process exits
/// with 137), then restart it clean. Returns whether it fired.
async fn crash_at(cluster: &mut Cluster, id: u64, spec: &str, within: Duration) -> bool {
    cluster.kill(id);
    cluster.spawn_env(id, &[("PXEMESH_FAILPOINTS", spec)]);
    let code = wait_exit(cluster, id, within).await;
    if code.is_none() {
        cluster.kill(id);
    }
    cluster.spawn(id);
    let fired = code == Some(pxemesh_coordinator::failpoint::EXIT_CODE)
        && cluster.log_text(id).contains("FAILPOINT");
    eprintln!("fault: node {id} {spec}: exit {code:?}, fired = {fired}");
    fired
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crashes_at_failpoints_keep_the_history_linearizable() {
    // Compact every 60 entries keeping 10: a node that misses ~100 entries
    // catches up by snapshot.
    let mut cluster = Cluster::with(3, 60, 10, 3_000);
    let t0 = Instant::now();
    cluster
        .wait_leader(&[1, 2, 3], Duration::from_secs(10))
        .await;
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let rec = Arc::new(Mutex::new(Recorded::default()));
    let addrs: Vec<(u64, String)> = (1..=3).map(|id| (id, cluster.addr(id))).collect();
    let mut tasks = Vec::new();
    for me in 0..CLIENTS {
        tasks.push(tokio::spawn(client_loop(
            me,
            addrs.clone(),
            cluster.admin.clone(),
            start,
            stop.clone(),
            rec.clone(),
        )));
    }
    let mut faults: Vec<String> = Vec::new();
    let mut fired_all = true;
    tokio::time::sleep(Duration::from_secs(2)).await;

    for round in 0..3u64 {
        // 1. The leader crashes with new entries durable but not yet acknowledged.
        let l = leader(&cluster).await;
        let spec = format!("after_log_append=exit@{}", 20 + 10 * round);
        fired_all &= crash_at(&mut cluster, l, &spec, Duration::from_secs(15)).await;
        faults.push(format!("leader {l}: {spec}"));
        // 2. A follower crashes with committed entries not yet applied.
        let l = leader(&cluster).await;
        let f = (1..=3)
            .find(|id| *id != l && *id != 1 + round % 3)
            .unwrap_or(1 + round % 3);
        let spec = format!("before_apply=exit@{}", 15 + 5 * round);
        fired_all &= crash_at(&mut cluster, f, &spec, Duration::from_secs(15)).await;
        faults.push(format!("follower {f}: {spec}"));
        // 3. The leader crashes after applying, before answering its callers.
        let l = leader(&cluster).await;
        let spec = format!("after_apply=exit@{}", 10 + 5 * round);
        fired_all &= crash_at(&mut cluster, l, &spec, Duration::from_secs(15)).await;
        faults.push(format!("leader {l}: {spec}"));
    }
    // 4. A compaction cut short between the state flush and the log rewrite.
    let l = leader(&cluster).await;
    let f = (1..=3).find(|id| *id != l).unwrap();
    fired_all &= crash_at(
        &mut cluster,
        f,
        "before_compaction_rewrite=exit@1",
        Duration::from_secs(30),
    )
    .await;
    faults.push(format!("follower {f}: before_compaction_rewrite"));
    // 5. kill -9 of a follower; it misses enough entries to need a snapshot,
    //    and crashes during the install, between the state write and the
    //    log restart. The clean restart after that must repair and catch up.
    let l = leader(&cluster).await;
    let f = (1..=3).find(|id| *id != l).unwrap();
    cluster.kill(f);
    faults.push(format!("follower {f}: kill -9"));
    let from = applied(&cluster, l).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while applied(&cluster, l).await < from + 150 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cluster.spawn_env(f, &[("PXEMESH_FAILPOINTS", "after_snapshot_state=exit@1")]);
    let code = wait_exit(&mut cluster, f, Duration::from_secs(20)).await;
    if code.is_none() {
        cluster.kill(f);
    }
    let snap_fired = code == Some(pxemesh_coordinator::failpoint::EXIT_CODE);
    eprintln!("fault: node {f} after_snapshot_state: exit {code:?}");
    fired_all &= snap_fired;
    cluster.spawn(f);
    // The clean restart finds the state ahead of the log and restarts the log there.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cluster
        .log_text(f)
        .contains("log restarted at the applied index")
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let repaired = cluster
        .log_text(f)
        .contains("log restarted at the applied index");
    eprintln!("node {f} repaired its log after the interrupted snapshot install: {repaired}");
    fired_all &= repaired;
    faults.push(format!(
        "follower {f}: after_snapshot_state (snapshot install)"
    ));
    // 6. Membership change: a follower crashes while applying AddMember(4),
    //    then the leader crashes while applying RemoveMember(4).
    let l = leader(&cluster).await;
    let f = (1..=3).find(|id| *id != l).unwrap();
    cluster.kill(f);
    cluster.spawn_env(f, &[("PXEMESH_FAILPOINTS", "during_conf_change=exit@1")]);
    cluster
        .wait_leader(&[1, 2, 3], Duration::from_secs(20))
        .await;
    let addr4 = cluster.spawn_joiner(4);
    let l = leader(&cluster).await;
    let add = cluster
        .client(l)
        .add_member(pb::AddMemberRequest {
            id: 4,
            address: addr4,
            learner: false,
        })
        .await;
    eprintln!(
        "add member 4: {:?}",
        add.as_ref().map(|r| r.get_ref().members.len())
    );
    let code = wait_exit(&mut cluster, f, Duration::from_secs(15)).await;
    if code.is_none() {
        cluster.kill(f);
    }
    fired_all &= code == Some(pxemesh_coordinator::failpoint::EXIT_CODE);
    cluster.spawn(f);
    faults.push(format!("follower {f}: during_conf_change (add member 4)"));
    let l = cluster
        .wait_leader(&[1, 2, 3, 4], Duration::from_secs(30))
        .await;
    cluster.kill(l);
    cluster.spawn_env(l, &[("PXEMESH_FAILPOINTS", "during_conf_change=exit@1")]);
    // Every member applies the removal, so the restarted former leader
    // crashes while applying it, whoever leads now.
    let l2 = cluster
        .wait_leader(&[1, 2, 3, 4], Duration::from_secs(30))
        .await;
    let remove = cluster
        .client(l2)
        .remove_member(pb::RemoveMemberRequest { id: 4 })
        .await;
    eprintln!("remove member 4 via {l2}: ok = {}", remove.is_ok());
    let code = wait_exit(&mut cluster, l, Duration::from_secs(15)).await;
    if code.is_none() {
        cluster.kill(l);
    }
    fired_all &= code == Some(pxemesh_coordinator::failpoint::EXIT_CODE);
    cluster.spawn(l);
    faults.push(format!("node {l}: during_conf_change (remove member 4)"));
    // The removal must have happened (or happen on retry): 3 voters again.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let l = cluster
            .wait_leader(&[1, 2, 3], Duration::from_secs(20))
            .await;
        if let Ok(s) = cluster.status(l).await {
            if s.members.iter().all(|m| m.id != 4) {
                break;
            }
        }
        let _ = cluster
            .client(l)
            .remove_member(pb::RemoveMemberRequest { id: 4 })
            .await;
        assert!(Instant::now() < deadline, "node 4 never left the cluster");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cluster.kill(4);
    // 7. A frozen leader: SIGSTOP long enough for the others to elect a new
    //    one, then SIGCONT. The old leader wakes up believing it leads; its
    //    reads and writes must not break linearizability.
    let l = leader(&cluster).await;
    cluster.pause(l);
    tokio::time::sleep(Duration::from_secs(4)).await;
    cluster.resume(l);
    faults.push(format!("leader {l}: SIGSTOP 4 s, SIGCONT"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    // 8. Finally every node killed at once and restarted from disk.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    for id in 1..=3 {
        cluster.kill(id);
    }
    for id in 1..=3 {
        cluster.spawn(id);
    }
    faults.push("all nodes: kill -9 and restart".into());
    let l = cluster
        .wait_leader(&[1, 2, 3], Duration::from_secs(20))
        .await;

    // Final linearizable reads of every key join the history.
    let mut rec = std::mem::take(&mut *rec.lock().unwrap());
    let mut c = cluster.client(l);
    for key in KEYS {
        let invoke = start.elapsed().as_nanos() as u64;
        let mut req = tonic::Request::new(pb::GetRequest {
            kind: pb::Kind::Rack as i32,
            name: key.into(),
            consistency: pb::Consistency::Linearizable as i32,
        });
        req.set_timeout(Duration::from_secs(8));
        let v = match c.get(req).await {
            Ok(r) => match r.into_inner().object.and_then(|o| o.record) {
                Some(pb::object::Record::Rack(rk)) => Some(rk.description),
                other => panic!("{other:?}"),
            },
            Err(s) if s.code() == tonic::Code::NotFound => None,
            Err(s) => panic!("final read of {key}: {s}"),
        };
        rec.history.push(Op {
            client: usize::MAX,
            key: key.into(),
            kind: Kind::Read(v),
            invoke,
            ret: Some(start.elapsed().as_nanos() as u64),
        });
    }
    // Nothing lost: every acknowledged unique create exists on every node.
    let mut names = BTreeSet::new();
    for id in 1..=3 {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let mut req = tonic::Request::new(pb::ListRequest {
                kind: pb::Kind::Rack as i32,
                rack: String::new(),
                consistency: pb::Consistency::Linearizable as i32,
            });
            req.set_timeout(Duration::from_secs(8));
            if let Ok(resp) = cluster.client(id).list(req).await {
                names = resp
                    .into_inner()
                    .objects
                    .into_iter()
                    .filter_map(|o| match o.record {
                        Some(pb::object::Record::Rack(r)) => Some(r.name),
                        _ => None,
                    })
                    .collect();
                break;
            }
            assert!(Instant::now() < deadline, "node {id} never answered List");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let lost: Vec<_> = rec.acked_creates.difference(&names).collect();
        assert!(
            lost.is_empty(),
            "node {id} lost acknowledged writes: {lost:?}"
        );
    }

    let checked = Instant::now();
    let summary = linearizability::check(&rec.history, 2_000_000).unwrap_or_else(|e| {
        let dump =
            std::env::temp_dir().join(format!("pxemesh-faults-{}.history", std::process::id()));
        let text: String = rec.history.iter().map(|o| format!("{o:?}\n")).collect();
        let _ = std::fs::write(&dump, text);
        panic!(
            "history is not linearizable: {e} (history in {})",
            dump.display()
        )
    });
    // The checker is not vacuous on this very history: make the final read
    // of k0 return the first acknowledged value of k0 (overwritten since),
    // and it must be rejected.
    let first_acked = rec.history.iter().find_map(|o| match (&o.kind, o.ret) {
        (Kind::Write(v), Some(_)) if o.key == "k0" => Some(v.clone()),
        _ => None,
    });
    let mut stale = rec.history.clone();
    if let (Some(v), Some(last)) = (
        first_acked,
        stale
            .iter_mut()
            .rev()
            .find(|o| o.key == "k0" && o.client == usize::MAX),
    ) {
        if last.kind != Kind::Read(Some(v.clone())) {
            last.kind = Kind::Read(Some(v));
            let verdict = linearizability::check(&stale, 2_000_000);
            eprintln!("mutated history (stale final read of k0): {verdict:?}");
            assert!(verdict.is_err(), "the checker accepted a stale final read");
        }
    }
    eprintln!(
        "faults injected: {}\n  {}\nops: {} ok, {} failed ({:?}); register history: {} ops on {} keys ({} indeterminate writes, {} of them observed; failed reads are not recorded), linearizable, checked in {:?} ({} steps); {} acknowledged unique creates all present on 3 nodes; run took {:?}",
        faults.len(),
        faults.join("\n  "),
        rec.ok,
        rec.failed,
        rec.errors,
        summary.ops,
        summary.keys,
        summary.indeterminate_writes,
        summary.indeterminate_observed,
        checked.elapsed(),
        summary.steps,
        rec.acked_creates.len(),
        t0.elapsed(),
    );
    assert!(
        fired_all,
        "every failpoint must have fired (see the fault lines above)"
    );
    assert!(
        rec.acked_creates.len() >= 20,
        "too little acknowledged work to mean anything"
    );
    assert!(summary.ops >= 200, "too small a history: {summary:?}");
    assert!(names.len() >= rec.acked_creates.len());
}
