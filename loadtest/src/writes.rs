//! The write-path benchmark: N clients, each on its own mTLS connection, write
//! one host record per request until a shared request budget is used up.
//!
//! * pxemesh: `AdminService/Put` of a `Host` in rack `r1`, network `n1`
//!   (10.64.0.0/16; both are created first, idempotently).
//! * etcd: `KV/Put` of the same host record, JSON-serialized exactly as the
//!   coordinator stores it, under `/pxemesh/hosts/<name>`.
//!
//! Every request writes a new host: unique name, MAC and IP. The first request
//! index defaults to the target's current revision, which every earlier
//! successful write has raised, so repeated runs against one cluster do not
//! collide.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use hdrhistogram::Histogram;
use pxemesh_coordinator::model;
use pxemesh_proto::v1 as pb;
use pxemesh_proto::v1::admin_service_client::AdminServiceClient;
use serde::Serialize;
use tokio::task::JoinSet;
use tonic::transport::Channel;

use crate::etcd;
use pxemesh_certs::{Tls, TlsPaths};
use pxemesh_coordinator::client;

/// Rack and network every benchmark host belongs to.
pub const RACK: &str = "r1";
pub const NETWORK: &str = "n1";
pub const SUBNET: &str = "10.64.0.0/16";
const SUBNET_BASE: Ipv4Addr = Ipv4Addr::new(10, 64, 0, 0);
/// Usable host addresses in the /16 (network and broadcast excluded).
pub const MAX_HOSTS: u64 = 65_534;
/// etcd key prefix for host records.
pub const ETCD_PREFIX: &str = "/pxemesh/hosts/";

/// Largest latency the histogram tracks (longer ones are clamped).
const MAX_TRACKED_US: u64 = 120_000_000;
/// Distinct error messages kept for the report.
const ERROR_SAMPLES: usize = 5;
/// How long to look for a leader (and to retry setup writes) before giving up.
const SETUP_PATIENCE: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    Pxemesh,
    Etcd,
}

impl Target {
    pub fn as_str(self) -> &'static str {
        match self {
            Target::Pxemesh => "pxemesh",
            Target::Etcd => "etcd",
        }
    }
}

/// Which endpoints the clients connect to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ConnectMode {
    /// Every client connects to the current leader (found by asking each endpoint).
    Leader,
    /// Client i connects to endpoint i mod N (followers forward to the leader).
    Spread,
}

/// Parameters of one `writes` run.
#[derive(Debug, Clone)]
pub struct WritesConfig {
    pub target: Target,
    pub endpoints: Vec<String>,
    pub tls: TlsPaths,
    pub clients: usize,
    /// Measured requests, shared by all clients.
    pub requests: u64,
    /// Unmeasured requests sent (by all clients) before the measured ones.
    pub warmup: u64,
    /// Host names are `<prefix>-<index>`.
    pub prefix: String,
    /// First request index (names, MACs, IPs); `None`: the target's revision.
    pub first_index: Option<u64>,
    pub connect: ConnectMode,
    /// Hard stop for the whole run, setup included.
    pub max_duration: Duration,
    /// Deadline of one request.
    pub request_timeout: Duration,
}

impl WritesConfig {
    pub fn new(target: Target, endpoints: Vec<String>, tls: TlsPaths) -> WritesConfig {
        WritesConfig {
            target,
            endpoints,
            tls,
            clients: 1,
            requests: 1000,
            warmup: 0,
            prefix: "bench".into(),
            first_index: None,
            connect: ConnectMode::Leader,
            max_duration: Duration::from_secs(300),
            request_timeout: Duration::from_secs(10),
        }
    }

    fn validate(&self) -> Result<()> {
        if self.endpoints.is_empty() {
            bail!("no endpoints given");
        }
        if self.clients == 0 {
            bail!("--clients must be at least 1");
        }
        if self.requests == 0 {
            bail!("--requests must be at least 1");
        }
        model::validate_name("host", &format!("{}-0", self.prefix))
            .map_err(|e| anyhow!("--prefix {:?}: {e}", self.prefix))?;
        Ok(())
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub min: u64,
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

/// What one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct WritesReport {
    pub target: Target,
    pub connect: ConnectMode,
    /// The endpoint each client used, in client order (deduplicated).
    pub endpoints: Vec<String>,
    pub clients: usize,
    pub requests: u64,
    pub warmup: u64,
    pub first_index: u64,
    /// Bytes of the first measured host record in the coordinator's stored
    /// form (JSON): what etcd is sent as the value, and what pxemesh writes
    /// to its Raft log and state machine.
    pub record_bytes: usize,
    /// Encoded size of the first measured request message (protobuf).
    pub request_bytes: usize,
    /// Measured requests that got an answer or failed (excludes `unfinished`).
    pub attempted: u64,
    pub ok: u64,
    pub errors: u64,
    /// Requests cut off by the hard stop (not counted as errors).
    pub unfinished: u64,
    pub warmup_errors: u64,
    pub error_rate: f64,
    pub elapsed_seconds: f64,
    pub writes_per_second: f64,
    /// Successful requests only.
    pub latency_us: Latency,
    /// True when the hard stop (`max_duration`) ended the run early.
    pub stopped_early: bool,
    pub error_samples: Vec<String>,
}

impl WritesReport {
    /// More than 1% of the measured requests failed, or none succeeded.
    pub fn failed(&self) -> bool {
        self.ok == 0 || self.error_rate > 0.01
    }

    /// A human-readable summary.
    pub fn to_text(&self) -> String {
        let ms = |us: u64| format!("{:.3}", us as f64 / 1000.0);
        let l = &self.latency_us;
        let mut rows: Vec<(&str, String)> = vec![
            ("target", self.target.as_str().to_string()),
            (
                "endpoints",
                format!(
                    "{} ({})",
                    self.endpoints.join(","),
                    match self.connect {
                        ConnectMode::Leader => "leader",
                        ConnectMode::Spread => "spread",
                    }
                ),
            ),
            ("clients", self.clients.to_string()),
            (
                "requests",
                format!(
                    "{} measured, {} warmup, first index {}",
                    self.requests, self.warmup, self.first_index
                ),
            ),
            (
                "bytes",
                format!(
                    "record {} (JSON), request {} (protobuf)",
                    self.record_bytes, self.request_bytes
                ),
            ),
            (
                "ok / errors",
                format!(
                    "{} / {} ({:.2}%){}",
                    self.ok,
                    self.errors,
                    self.error_rate * 100.0,
                    if self.unfinished > 0 {
                        format!(", {} unfinished", self.unfinished)
                    } else {
                        String::new()
                    }
                ),
            ),
            ("elapsed", format!("{:.3} s", self.elapsed_seconds)),
            ("writes/s", format!("{:.1}", self.writes_per_second)),
            (
                "latency ms",
                format!(
                    "min {}  mean {:.3}  p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
                    ms(l.min),
                    l.mean / 1000.0,
                    ms(l.p50),
                    ms(l.p90),
                    ms(l.p99),
                    ms(l.p999),
                    ms(l.max)
                ),
            ),
        ];
        if self.stopped_early {
            rows.push(("note", "stopped early by --max-seconds".into()));
        }
        if self.warmup_errors > 0 {
            rows.push(("warmup errors", self.warmup_errors.to_string()));
        }
        for (i, e) in self.error_samples.iter().enumerate() {
            rows.push((if i == 0 { "errors seen" } else { "" }, e.clone()));
        }
        let mut out = String::new();
        for (k, v) in rows {
            let _ = writeln!(out, "{k:<14}{v}");
        }
        out
    }
}

// ---------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------

/// Host number `index`: name `<prefix>-<index>`, a locally administered MAC
/// and an address in 10.64.0.0/16 derived from the index.
pub fn host_fields(prefix: &str, index: u64) -> (String, model::Mac, Ipv4Addr) {
    let name = format!("{prefix}-{index}");
    let b = index.to_be_bytes();
    let mac = model::Mac([0x52, 0x54, b[4], b[5], b[6], b[7]]);
    let ip = Ipv4Addr::from(
        u32::from(SUBNET_BASE)
            .wrapping_add(1)
            .wrapping_add(index as u32),
    );
    (name, mac, ip)
}

fn pxemesh_put(prefix: &str, index: u64) -> pb::PutRequest {
    let (name, mac, ip) = host_fields(prefix, index);
    pb::PutRequest {
        object: Some(pb::Object {
            record: Some(pb::object::Record::Host(pb::Host {
                hostname: name.clone(),
                name,
                mac: mac.to_string(),
                ip: ip.to_string(),
                rack: RACK.into(),
                network: NETWORK.into(),
                ..Default::default()
            })),
        }),
    }
}

/// The coordinator's stored form of the same host (`model::Record` as JSON).
pub fn host_record_json(prefix: &str, index: u64) -> Result<(String, Vec<u8>)> {
    let (name, mac, ip) = host_fields(prefix, index);
    let record = model::Record::Host(model::Host {
        hostname: name.clone(),
        name: name.clone(),
        mac,
        ip: Some(ip),
        rack: RACK.into(),
        network: NETWORK.into(),
        profile: None,
        labels: BTreeMap::new(),
        bmc: None,
        meta: model::Meta::default(),
    });
    Ok((name, serde_json::to_vec(&record)?))
}

fn etcd_put(prefix: &str, index: u64) -> Result<etcd::pb::PutRequest> {
    let (name, value) = host_record_json(prefix, index)?;
    Ok(etcd::pb::PutRequest {
        key: format!("{ETCD_PREFIX}{name}").into_bytes(),
        value,
        ..Default::default()
    })
}

enum Payload {
    Pxemesh(Box<pb::PutRequest>),
    Etcd(etcd::pb::PutRequest),
}

impl Payload {
    fn build(target: Target, prefix: &str, index: u64) -> Result<Payload> {
        Ok(match target {
            Target::Pxemesh => Payload::Pxemesh(Box::new(pxemesh_put(prefix, index))),
            Target::Etcd => Payload::Etcd(etcd_put(prefix, index)?),
        })
    }

    fn encoded_len(&self) -> usize {
        use prost::Message as _;
        match self {
            Payload::Pxemesh(p) => p.encoded_len(),
            Payload::Etcd(p) => p.encoded_len(),
        }
    }
}

fn status_text(s: &tonic::Status) -> String {
    if s.message().is_empty() {
        format!("{:?}", s.code())
    } else {
        format!("{:?}: {}", s.code(), s.message())
    }
}

/// One client's connection.
enum Conn {
    Pxemesh(AdminServiceClient<Channel>),
    Etcd(etcd::KvClient<Channel>),
}

impl Conn {
    async fn open(target: Target, endpoint: &str, tls: Arc<Tls>) -> Result<Conn> {
        let ch = client::channel(endpoint, tls).await?;
        Ok(match target {
            Target::Pxemesh => Conn::Pxemesh(AdminServiceClient::new(ch)),
            Target::Etcd => Conn::Etcd(etcd::KvClient::new(ch)),
        })
    }

    async fn put(&mut self, payload: Payload, timeout: Duration) -> Result<(), String> {
        let fut = async {
            match (self, payload) {
                (Conn::Pxemesh(c), Payload::Pxemesh(p)) => {
                    let mut req = tonic::Request::new(*p);
                    req.set_timeout(timeout);
                    c.put(req).await.map(|_| ()).map_err(|s| status_text(&s))
                }
                (Conn::Etcd(c), Payload::Etcd(p)) => {
                    let mut req = tonic::Request::new(p);
                    req.set_timeout(timeout);
                    c.put(req).await.map(|_| ()).map_err(|s| status_text(&s))
                }
                _ => Err("payload does not match the connection's target".into()),
            }
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {timeout:?}")),
        }
    }
}

// ---------------------------------------------------------------------------
// Leader discovery and setup
// ---------------------------------------------------------------------------

/// The endpoint that answers as the leader, and its revision.
async fn find_leader(cfg: &WritesConfig, tls: &Arc<Tls>) -> Result<(String, u64)> {
    let give_up = Instant::now() + SETUP_PATIENCE;
    let mut last = String::new();
    loop {
        let mut seen = Vec::new();
        for ep in &cfg.endpoints {
            match probe(cfg.target, ep, tls.clone()).await {
                Ok((true, revision)) => return Ok((ep.clone(), revision)),
                Ok((false, _)) => seen.push(format!("{ep}: not the leader")),
                Err(e) => seen.push(format!("{ep}: {e:#}")),
            }
        }
        last = if seen.is_empty() {
            last
        } else {
            seen.join("; ")
        };
        if Instant::now() >= give_up {
            bail!("no leader found within {SETUP_PATIENCE:?}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Ask one endpoint: is it the leader, and what is its revision?
async fn probe(target: Target, endpoint: &str, tls: Arc<Tls>) -> Result<(bool, u64)> {
    let ch = client::channel(endpoint, tls).await?;
    let timeout = Duration::from_secs(3);
    match target {
        Target::Pxemesh => {
            let mut req = tonic::Request::new(pb::ClusterStatusRequest {});
            req.set_timeout(timeout);
            let s = AdminServiceClient::new(ch)
                .cluster_status(req)
                .await
                .map_err(|s| anyhow!(status_text(&s)))?
                .into_inner();
            Ok((s.role == "leader", s.revision))
        }
        Target::Etcd => {
            let mut req = tonic::Request::new(etcd::pb::StatusRequest {});
            req.set_timeout(timeout);
            let s = etcd::MaintenanceClient::new(ch)
                .status(req)
                .await
                .map_err(|s| anyhow!(status_text(&s)))?
                .into_inner();
            let header = s.header.unwrap_or_default();
            let leader = s.leader != 0 && s.leader == header.member_id;
            Ok((leader, u64::try_from(header.revision).unwrap_or(0)))
        }
    }
}

/// Create rack r1 and network n1 (10.64.0.0/16) if they are not there yet.
async fn pxemesh_setup(endpoint: &str, tls: Arc<Tls>) -> Result<u64> {
    let mut client = AdminServiceClient::new(client::channel(endpoint, tls).await?);
    let objects = [
        pb::object::Record::Rack(pb::Rack {
            name: RACK.into(),
            description: "pxemesh-loadtest".into(),
            ..Default::default()
        }),
        pb::object::Record::Network(pb::Network {
            name: NETWORK.into(),
            rack: RACK.into(),
            subnet: SUBNET.into(),
            ..Default::default()
        }),
    ];
    let mut revision = 0;
    for record in objects {
        let give_up = Instant::now() + SETUP_PATIENCE;
        loop {
            let mut req = tonic::Request::new(pb::PutRequest {
                object: Some(pb::Object {
                    record: Some(record.clone()),
                }),
            });
            req.set_timeout(Duration::from_secs(5));
            match client.put(req).await {
                Ok(r) => {
                    revision = r.into_inner().revision;
                    break;
                }
                Err(s) if s.code() == tonic::Code::Unavailable && Instant::now() < give_up => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(s) => bail!("setup write to {endpoint} failed: {}", status_text(&s)),
            }
        }
    }
    Ok(revision)
}

// ---------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------

struct ClientStats {
    ok: u64,
    errors: u64,
    unfinished: u64,
    hist: Histogram<u64>,
    samples: Vec<String>,
}

impl ClientStats {
    fn new() -> Result<ClientStats> {
        Ok(ClientStats {
            ok: 0,
            errors: 0,
            unfinished: 0,
            hist: Histogram::new_with_bounds(1, MAX_TRACKED_US, 3)
                .context("creating the latency histogram")?,
            samples: Vec::new(),
        })
    }

    fn note_error(&mut self, e: String) {
        self.errors += 1;
        if self.samples.len() < ERROR_SAMPLES && !self.samples.contains(&e) {
            self.samples.push(e);
        }
    }
}

struct Phase {
    target: Target,
    prefix: Arc<str>,
    next: Arc<AtomicU64>,
    end: u64,
    deadline: Instant,
    request_timeout: Duration,
}

async fn client_loop(mut conn: Conn, phase: Arc<Phase>) -> Result<(Conn, ClientStats)> {
    let mut stats = ClientStats::new()?;
    loop {
        let now = Instant::now();
        let left = phase.deadline.saturating_duration_since(now);
        if left.is_zero() {
            break;
        }
        let i = phase.next.fetch_add(1, Ordering::Relaxed);
        if i >= phase.end {
            break;
        }
        let payload = match Payload::build(phase.target, &phase.prefix, i) {
            Ok(p) => p,
            Err(e) => {
                stats.note_error(format!("building request {i}: {e:#}"));
                continue;
            }
        };
        let timeout = phase.request_timeout.min(left);
        let start = Instant::now();
        let result = conn.put(payload, timeout).await;
        let took = start.elapsed();
        match result {
            Ok(()) => {
                stats.ok += 1;
                let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
                stats.hist.saturating_record(us.clamp(1, MAX_TRACKED_US));
            }
            Err(_) if Instant::now() >= phase.deadline => stats.unfinished += 1,
            Err(e) => stats.note_error(e),
        }
    }
    Ok((conn, stats))
}

/// Run indices `[first, first + count)` over `conns`; returns the connections,
/// the merged stats and the wall time.
async fn run_phase(
    cfg: &WritesConfig,
    conns: Vec<Conn>,
    first: u64,
    count: u64,
    deadline: Instant,
) -> Result<(Vec<Conn>, ClientStats, Duration)> {
    let phase = Arc::new(Phase {
        target: cfg.target,
        prefix: Arc::from(cfg.prefix.as_str()),
        next: Arc::new(AtomicU64::new(first)),
        end: first + count,
        deadline,
        request_timeout: cfg.request_timeout,
    });
    let start = Instant::now();
    let mut set = JoinSet::new();
    for conn in conns {
        set.spawn(client_loop(conn, phase.clone()));
    }
    let mut total = ClientStats::new()?;
    let mut back = Vec::new();
    while let Some(joined) = set.join_next().await {
        let (conn, s) = joined.context("benchmark client task failed")??;
        back.push(conn);
        total.ok += s.ok;
        total.errors += s.errors;
        total.unfinished += s.unfinished;
        total
            .hist
            .add(&s.hist)
            .map_err(|e| anyhow!("merging histograms: {e:?}"))?;
        for e in s.samples {
            if total.samples.len() < ERROR_SAMPLES && !total.samples.contains(&e) {
                total.samples.push(e);
            }
        }
    }
    Ok((back, total, start.elapsed()))
}

/// Run the write benchmark described by `cfg`.
pub async fn writes(cfg: &WritesConfig) -> Result<WritesReport> {
    cfg.validate()?;
    let deadline = Instant::now() + cfg.max_duration;
    let tls = Tls::load(cfg.tls.clone())?;

    let (leader, _) = find_leader(cfg, &tls).await?;
    let targets: Vec<String> = match cfg.connect {
        ConnectMode::Leader => vec![leader.clone(); cfg.clients],
        ConnectMode::Spread => (0..cfg.clients)
            .map(|i| cfg.endpoints[i % cfg.endpoints.len()].clone())
            .collect(),
    };
    if cfg.target == Target::Pxemesh {
        pxemesh_setup(&leader, tls.clone()).await?;
    }
    let first_index = match cfg.first_index {
        Some(i) => i,
        // After setup, so the revision counts the setup writes too.
        None => find_leader(cfg, &tls).await?.1,
    };
    let total = cfg.warmup + cfg.requests;
    if cfg.target == Target::Pxemesh && first_index + total > MAX_HOSTS {
        bail!(
            "host indices {first_index}..{} do not fit network {NETWORK} ({SUBNET}, {MAX_HOSTS} addresses): \
             use a fresh cluster, fewer requests or a lower --first-index",
            first_index + total
        );
    }
    let first_measured = first_index + cfg.warmup;
    let record_bytes = host_record_json(&cfg.prefix, first_measured)?.1.len();
    let request_bytes = Payload::build(cfg.target, &cfg.prefix, first_measured)?.encoded_len();

    // Every client gets its own connection, established before anything is timed.
    let mut set = JoinSet::new();
    for (i, ep) in targets.iter().enumerate() {
        let (target, ep, tls) = (cfg.target, ep.clone(), tls.clone());
        set.spawn(async move { (i, Conn::open(target, &ep, tls).await) });
    }
    let mut opened: Vec<(usize, Conn)> = Vec::with_capacity(cfg.clients);
    while let Some(joined) = set.join_next().await {
        let (i, conn) = joined.context("connect task failed")?;
        opened.push((i, conn.with_context(|| format!("client {i}"))?));
    }
    opened.sort_by_key(|(i, _)| *i);
    let mut conns: Vec<Conn> = opened.into_iter().map(|(_, c)| c).collect();

    let mut warmup_errors = 0;
    if cfg.warmup > 0 {
        let (back, stats, _) = run_phase(cfg, conns, first_index, cfg.warmup, deadline).await?;
        conns = back;
        warmup_errors = stats.errors;
    }
    let (_conns, stats, elapsed) =
        run_phase(cfg, conns, first_index + cfg.warmup, cfg.requests, deadline).await?;

    let attempted = stats.ok + stats.errors;
    let secs = elapsed.as_secs_f64();
    let h = &stats.hist;
    let latency_us = if stats.ok > 0 {
        Latency {
            min: h.min(),
            mean: h.mean(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    } else {
        Latency::default()
    };
    let mut endpoints = Vec::new();
    for t in targets {
        if !endpoints.contains(&t) {
            endpoints.push(t);
        }
    }
    Ok(WritesReport {
        target: cfg.target,
        connect: cfg.connect,
        endpoints,
        clients: cfg.clients,
        requests: cfg.requests,
        warmup: cfg.warmup,
        first_index,
        record_bytes,
        request_bytes,
        attempted,
        ok: stats.ok,
        errors: stats.errors,
        unfinished: stats.unfinished,
        warmup_errors,
        error_rate: if attempted > 0 {
            stats.errors as f64 / attempted as f64
        } else {
            0.0
        },
        elapsed_seconds: secs,
        writes_per_second: if secs > 0.0 {
            stats.ok as f64 / secs
        } else {
            0.0
        },
        latency_us,
        stopped_early: attempted < cfg.requests,
        error_samples: stats.samples,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_unique_and_valid() {
        let (n0, m0, ip0) = host_fields("bench", 0);
        let (n1, m1, ip1) = host_fields("bench", 65_533);
        assert_eq!(n0, "bench-0");
        assert_eq!(ip0, Ipv4Addr::new(10, 64, 0, 1));
        assert_eq!(ip1, Ipv4Addr::new(10, 64, 255, 254));
        assert_ne!(m0, m1);
        assert_ne!(n0, n1);
        assert_eq!(m1.to_string(), "52:54:00:00:ff:fd");
        let (name, json) = host_record_json("bench", 7).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(v["kind"], "host");
        assert_eq!(v["spec"]["name"], name);
        assert_eq!(v["spec"]["ip"], "10.64.0.8");
        let p = etcd_put("bench", 7).unwrap();
        assert_eq!(p.key, b"/pxemesh/hosts/bench-7");
    }
}
