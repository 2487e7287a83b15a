//! Test harness: a cluster of real `pxemesh-coordinator` processes on loopback
//! with real certificates from a throw-away CA.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pxemesh_certs::{Ca, Identity, LeafRequest, Role, Tls, TlsPaths};
use pxemesh_coordinator::client;
use pxemesh_proto::v1 as pb;
use pxemesh_proto::v1::admin_service_client::AdminServiceClient;
use tonic::transport::Channel;

pub const TRUST_DOMAIN: &str = "test.pxemesh";

pub struct Pki {
    pub dir: PathBuf,
    pub ca: Ca,
}

impl Pki {
    pub fn new(dir: &Path) -> Pki {
        let ca = Ca::generate(TRUST_DOMAIN, 30).expect("generate CA");
        ca.save(dir).expect("save CA");
        Pki {
            dir: dir.to_path_buf(),
            ca,
        }
    }

    pub fn issue_with(
        &self,
        role: Role,
        stem: &str,
        edit: impl FnOnce(&mut LeafRequest),
    ) -> TlsPaths {
        let mut req = LeafRequest::new(Identity::new(TRUST_DOMAIN, role), 30);
        req.dns_names = vec!["localhost".into()];
        req.ips = vec!["127.0.0.1".parse().unwrap()];
        edit(&mut req);
        let leaf = self.ca.issue(&req).expect("issue leaf");
        leaf.save(&self.dir, stem).expect("save leaf");
        TlsPaths::in_dir(&self.dir, stem)
    }

    pub fn issue(&self, role: Role, stem: &str) -> TlsPaths {
        self.issue_with(role, stem, |_| {})
    }

    pub fn tls(&self, role: Role, stem: &str) -> Arc<Tls> {
        Tls::load(self.issue(role, stem)).expect("load tls")
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct NodeProc {
    pub id: u64,
    pub addr: String,
    pub metrics: String,
    pub config: PathBuf,
    pub log: PathBuf,
    pub child: Option<Child>,
}

pub struct Cluster {
    pub tmp: tempfile::TempDir,
    pub pki: Pki,
    pub nodes: BTreeMap<u64, NodeProc>,
    pub admin: Arc<Tls>,
    pub snapshot_entries: u64,
    pub catchup_entries: u64,
    pub proposal_timeout_ms: u64,
    /// Appended to every node's configuration (e.g. an `[images]` section).
    pub extra_config: String,
}

pub fn coordinator_bin() -> &'static str {
    env!("CARGO_BIN_EXE_pxemesh-coordinator")
}

pub fn ctl_bin() -> &'static str {
    env!("CARGO_BIN_EXE_pxemeshctl")
}

impl Cluster {
    pub fn new(n: u64) -> Cluster {
        Cluster::with(n, 10_000, 1_000, 5_000)
    }

    pub fn with(
        n: u64,
        snapshot_entries: u64,
        catchup_entries: u64,
        proposal_timeout_ms: u64,
    ) -> Cluster {
        Cluster::with_extra(
            n,
            snapshot_entries,
            catchup_entries,
            proposal_timeout_ms,
            "",
        )
    }

    /// Like [`Cluster::with`], with `extra` appended to every configuration.
    pub fn with_extra(
        n: u64,
        snapshot_entries: u64,
        catchup_entries: u64,
        proposal_timeout_ms: u64,
        extra: &str,
    ) -> Cluster {
        let tmp = tempfile::tempdir().unwrap();
        let pki = Pki::new(tmp.path());
        let admin = pki.tls(
            Role::Admin {
                name: "admin".into(),
            },
            "admin",
        );
        let status = Command::new(coordinator_bin())
            .args(["gen-cluster-key"])
            .arg(tmp.path().join("cluster.key"))
            .status()
            .unwrap();
        assert!(status.success());
        let mut c = Cluster {
            tmp,
            pki,
            nodes: BTreeMap::new(),
            admin,
            snapshot_entries,
            catchup_entries,
            proposal_timeout_ms,
            extra_config: extra.to_string(),
        };
        for id in 1..=n {
            c.define(id);
        }
        let ids: Vec<u64> = c.nodes.keys().copied().collect();
        for id in &ids {
            c.write_config(*id, &ids, false);
        }
        for id in ids {
            c.spawn(id);
        }
        c
    }

    pub fn dir(&self) -> &Path {
        self.tmp.path()
    }

    fn define(&mut self, id: u64) {
        self.pki
            .issue(Role::Coordinator { id }, &format!("coordinator-{id}"));
        let node_dir = self.dir().join(format!("node{id}"));
        std::fs::create_dir_all(&node_dir).unwrap();
        self.nodes.insert(
            id,
            NodeProc {
                id,
                addr: format!("127.0.0.1:{}", free_port()),
                metrics: format!("127.0.0.1:{}", free_port()),
                config: node_dir.join("coordinator.toml"),
                log: node_dir.join("coordinator.log"),
                child: None,
            },
        );
    }

    fn write_config(&self, id: u64, peers: &[u64], join: bool) {
        let n = &self.nodes[&id];
        let d = self.dir();
        let mut cfg = format!(
            "node_id = {id}\nlisten = \"{}\"\nmetrics_listen = \"{}\"\ndata_dir = \"{}\"\ncluster_key_file = \"{}\"\njoin = {join}\n\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\nreload_check_seconds = 1\n\n[raft]\nsnapshot_entries = {}\ncatchup_entries = {}\nproposal_timeout_ms = {}\n",
            n.addr,
            n.metrics,
            d.join(format!("node{id}/data")).display(),
            d.join("cluster.key").display(),
            d.join("ca.pem").display(),
            d.join(format!("coordinator-{id}.pem")).display(),
            d.join(format!("coordinator-{id}-key.pem")).display(),
            self.snapshot_entries,
            self.catchup_entries,
            self.proposal_timeout_ms,
        );
        cfg.push_str(&self.extra_config);
        for p in peers {
            cfg.push_str(&format!(
                "\n[[peers]]\nid = {p}\naddress = \"{}\"\n",
                self.nodes[p].addr
            ));
        }
        std::fs::write(&n.config, cfg).unwrap();
    }

    pub fn spawn(&mut self, id: u64) {
        self.spawn_env(id, &[]);
    }

    /// Start node `id` with extra environment variables (e.g. failpoints).
    pub fn spawn_env(&mut self, id: u64, env: &[(&str, &str)]) {
        let n = self.nodes.get_mut(&id).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&n.log)
            .unwrap();
        let child = Command::new(coordinator_bin())
            .arg("--config")
            .arg(&n.config)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn coordinator");
        n.child = Some(child);
    }

    /// Define, configure and start a node that joins the running cluster.
    pub fn spawn_joiner(&mut self, id: u64) -> String {
        self.define(id);
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        self.write_config(id, &ids, true);
        self.spawn(id);
        self.nodes[&id].addr.clone()
    }

    pub fn pid(&self, id: u64) -> i32 {
        self.nodes[&id].child.as_ref().expect("running").id() as i32
    }

    /// SIGKILL: no chance to flush or say goodbye.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut c) = self.nodes.get_mut(&id).unwrap().child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The exit status of node `id` if its process has ended (reaped).
    pub fn exited(&mut self, id: u64) -> Option<std::process::ExitStatus> {
        let n = self.nodes.get_mut(&id).unwrap();
        let st = n.child.as_mut()?.try_wait().ok()??;
        n.child = None;
        Some(st)
    }

    pub fn running(&self, id: u64) -> bool {
        self.nodes[&id].child.is_some()
    }

    pub fn signal(&self, id: u64, sig: i32) {
        let rc = unsafe { libc::kill(self.pid(id), sig) };
        assert_eq!(rc, 0, "kill({id}, {sig})");
    }

    pub fn pause(&self, id: u64) {
        self.signal(id, libc::SIGSTOP);
    }

    pub fn resume(&self, id: u64) {
        self.signal(id, libc::SIGCONT);
    }

    pub fn addr(&self, id: u64) -> String {
        self.nodes[&id].addr.clone()
    }

    pub fn endpoints(&self) -> String {
        self.nodes
            .values()
            .map(|n| n.addr.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn client_with(&self, id: u64, tls: Arc<Tls>) -> AdminServiceClient<Channel> {
        let ch = client::channel_lazy(&self.addr(id), tls).expect("channel");
        AdminServiceClient::new(ch)
    }

    pub fn client(&self, id: u64) -> AdminServiceClient<Channel> {
        self.client_with(id, self.admin.clone())
    }

    pub async fn status(&self, id: u64) -> Result<pb::ClusterStatusResponse, tonic::Status> {
        let mut c = self.client(id);
        let mut req = tonic::Request::new(pb::ClusterStatusRequest {});
        req.set_timeout(Duration::from_secs(2));
        c.cluster_status(req).await.map(|r| r.into_inner())
    }

    /// Wait until every node in `among` answers and agrees on one leader in `among`.
    pub async fn wait_leader(&self, among: &[u64], within: Duration) -> u64 {
        let deadline = Instant::now() + within;
        loop {
            let mut leaders = Vec::new();
            for id in among {
                if let Ok(s) = self.status(*id).await {
                    leaders.push(s.leader_id);
                }
            }
            if leaders.len() == among.len()
                && leaders.iter().all(|l| *l == leaders[0])
                && among.contains(&leaders[0])
            {
                return leaders[0];
            }
            assert!(
                Instant::now() < deadline,
                "no agreed leader among {among:?} within {within:?}: saw {leaders:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn metric(&self, id: u64, name: &str) -> Option<f64> {
        let addr = self.nodes[&id].metrics.clone();
        let body = tokio::task::spawn_blocking(move || http_get(&addr, "/metrics"))
            .await
            .ok()??;
        body.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    pub fn log_text(&self, id: u64) -> String {
        std::fs::read_to_string(&self.nodes[&id].log).unwrap_or_default()
    }

    pub fn ctl(&self, args: &[&str]) -> std::process::Output {
        self.ctl_as("admin", args)
    }

    pub fn ctl_as(&self, stem: &str, args: &[&str]) -> std::process::Output {
        Command::new(ctl_bin())
            .arg("--endpoints")
            .arg(self.endpoints())
            .arg("--tls-dir")
            .arg(self.dir())
            .arg("--cert-stem")
            .arg(stem)
            .args(args)
            .output()
            .expect("run pxemeshctl")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in &ids {
            if let Some(c) = &self.nodes[id].child {
                unsafe { libc::kill(c.id() as i32, libc::SIGCONT) };
            }
            self.kill(*id);
        }
        if std::thread::panicking() {
            for id in ids {
                let text = self.log_text(id);
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                eprintln!("---- node {id} log (last 40 lines) ----");
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}

/// Minimal HTTP/1.0 GET for the plain-text metrics endpoint.
pub fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

pub fn rack(name: &str) -> pb::Object {
    pb::Object {
        record: Some(pb::object::Record::Rack(pb::Rack {
            name: name.into(),
            ..Default::default()
        })),
    }
}

pub fn network(name: &str, rack: &str, subnet: &str) -> pb::Object {
    pb::Object {
        record: Some(pb::object::Record::Network(pb::Network {
            name: name.into(),
            rack: rack.into(),
            subnet: subnet.into(),
            ..Default::default()
        })),
    }
}

/// Host number `i` in rack r1 / network n1 (10.10.0.0/16).
pub fn host(i: u32) -> pb::Object {
    host_named(&format!("h{i}"), i)
}

pub fn host_named(name: &str, i: u32) -> pb::Object {
    let ip = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 10, 0, 10)) + i);
    let b = i.to_be_bytes();
    pb::Object {
        record: Some(pb::object::Record::Host(pb::Host {
            name: name.into(),
            mac: format!("52:54:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3]),
            ip: ip.to_string(),
            rack: "r1".into(),
            network: "n1".into(),
            ..Default::default()
        })),
    }
}

pub async fn put(
    c: &mut AdminServiceClient<Channel>,
    obj: pb::Object,
) -> Result<pb::PutResponse, tonic::Status> {
    let mut req = tonic::Request::new(pb::PutRequest { object: Some(obj) });
    req.set_timeout(Duration::from_secs(8));
    c.put(req).await.map(|r| r.into_inner())
}

/// Rack r1 and network n1, the parents of `host(i)`.
pub async fn seed(c: &mut AdminServiceClient<Channel>) {
    put(c, rack("r1")).await.expect("put rack");
    put(c, network("n1", "r1", "10.10.0.0/16"))
        .await
        .expect("put network");
}

pub async fn host_names(
    c: &mut AdminServiceClient<Channel>,
    consistency: pb::Consistency,
) -> Result<std::collections::BTreeSet<String>, tonic::Status> {
    let mut req = tonic::Request::new(pb::ListRequest {
        kind: pb::Kind::Host as i32,
        rack: String::new(),
        consistency: consistency as i32,
    });
    req.set_timeout(Duration::from_secs(8));
    let resp = c.list(req).await?.into_inner();
    Ok(resp
        .objects
        .into_iter()
        .filter_map(|o| match o.record {
            Some(pb::object::Record::Host(h)) => Some(h.name),
            _ => None,
        })
        .collect())
}
