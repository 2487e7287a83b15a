//! Propagation benchmark: how long after an acknowledged admin write every
//! relay watching the rack has received it.
//!
//! `watchers` relay watchers run in this process, each on its own mTLS
//! connection with its own relay certificate (issued here from the
//! installation's CA), spread over the coordinator endpoints; they use the
//! real `RelayService/Watch` client. For each write the latency is measured
//! from the moment the `Put` returned to the moment the last watcher had the
//! event (and, per watcher, to each one's receipt).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use pxemesh_certs::{Ca, Identity, LeafRequest, Role, Tls, TlsPaths};
use pxemesh_coordinator::client;
use pxemesh_proto::v1 as pb;
use pxemesh_proto::v1::admin_service_client::AdminServiceClient;
use pxemesh_proto::v1::relay_service_client::RelayServiceClient;
use tokio::sync::mpsc;

pub struct PropagationConfig {
    pub endpoints: Vec<String>,
    /// Holds ca.pem, ca-key.pem (to issue the watchers' relay certificates)
    /// and the admin certificate.
    pub tls_dir: std::path::PathBuf,
    pub cert_stem: String,
    pub watchers: usize,
    pub writes: u64,
    pub rack: String,
    /// Give up on one write after this long.
    pub timeout: Duration,
}

pub struct PropagationReport {
    pub writes: u64,
    pub watchers: usize,
    /// Write acknowledged → the last watcher has it (µs).
    pub all: Histogram<u64>,
    /// Write acknowledged → each watcher has it (µs).
    pub each: Histogram<u64>,
    /// Write sent (before the Put) → the last watcher has it (µs): includes
    /// the commit itself, a conservative upper bound.
    pub from_send: Histogram<u64>,
    pub timeouts: u64,
}

impl PropagationReport {
    pub fn to_text(&self) -> String {
        let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        format!(
            "{} writes, {} watchers, {} timeouts\n\
             all watchers have it: p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms\n\
             each watcher:         p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms\n\
             from sending the write, all watchers: p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms\n",
            self.writes,
            self.watchers,
            self.timeouts,
            ms(&self.all, 0.5),
            ms(&self.all, 0.99),
            self.all.max() as f64 / 1000.0,
            ms(&self.each, 0.5),
            ms(&self.each, 0.99),
            self.each.max() as f64 / 1000.0,
            ms(&self.from_send, 0.5),
            ms(&self.from_send, 0.99),
            self.from_send.max() as f64 / 1000.0,
        )
    }
}

/// A relay's watch from revision 0, as a relay with an empty store opens
/// it: the stream, and the rack snapshot that must come first on it.
pub(crate) async fn watch_from_scratch(
    endpoint: &str,
    tls: Arc<Tls>,
) -> Result<(tonic::Streaming<pb::WatchResponse>, pb::RackSnapshot)> {
    let mut rs = RelayServiceClient::new(client::channel(endpoint, tls).await?)
        .max_decoding_message_size(256 << 20);
    let mut stream = rs
        .watch(pb::WatchRequest {
            from_revision: 0,
            rack: String::new(),
        })
        .await?
        .into_inner();
    match stream.message().await? {
        Some(pb::WatchResponse {
            message: Some(pb::watch_response::Message::Snapshot(s)),
        }) => Ok((stream, s)),
        other => bail!("expected a snapshot first, got {other:?}"),
    }
}

pub(crate) fn issue_relay_certs(
    ca_dir: &Path,
    out: &Path,
    rack: &str,
    n: usize,
) -> Result<Vec<Arc<Tls>>> {
    let ca = Ca::load(ca_dir)
        .context("loading the CA (ca.pem, ca-key.pem) to issue watcher certificates")?;
    let mut all = Vec::with_capacity(n);
    for i in 0..n {
        let name = format!("watcher-{i}");
        let leaf = ca.issue(&LeafRequest::new(
            Identity::new(
                ca.trust_domain(),
                Role::Relay {
                    rack: rack.into(),
                    name: name.clone(),
                },
            ),
            1,
        ))?;
        let stem = format!("relay-{rack}-{name}");
        leaf.save(out, &stem)?;
        std::fs::copy(ca_dir.join("ca.pem"), out.join("ca.pem"))?;
        all.push(Tls::load(TlsPaths::in_dir(out, &stem))?);
    }
    Ok(all)
}

pub async fn propagation(cfg: &PropagationConfig) -> Result<PropagationReport> {
    if cfg.endpoints.is_empty() || cfg.watchers == 0 || cfg.writes == 0 {
        bail!("need endpoints, at least one watcher and one write");
    }
    let admin_tls = Tls::load(TlsPaths::in_dir(&cfg.tls_dir, &cfg.cert_stem))?;
    let scratch = tempfile::tempdir()?;
    let certs = issue_relay_certs(&cfg.tls_dir, scratch.path(), &cfg.rack, cfg.watchers)?;

    // The rack and a network for the hosts written below.
    let mut admin =
        AdminServiceClient::new(client::channel(&cfg.endpoints[0], admin_tls.clone()).await?);
    let put = |o: pb::object::Record| pb::PutRequest {
        object: Some(pb::Object { record: Some(o) }),
    };
    admin
        .put(put(pb::object::Record::Rack(pb::Rack {
            name: cfg.rack.clone(),
            ..Default::default()
        })))
        .await?;
    let net = format!("{}-net", cfg.rack);
    admin
        .put(put(pb::object::Record::Network(pb::Network {
            name: net.clone(),
            rack: cfg.rack.clone(),
            subnet: "10.250.0.0/16".into(),
            ..Default::default()
        })))
        .await?;

    // Watchers report (watcher, revision, when) for every event they receive.
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, u64, Instant)>();
    let mut tasks = Vec::new();
    for (i, tls) in certs.into_iter().enumerate() {
        let endpoint = cfg.endpoints[i % cfg.endpoints.len()].clone();
        let tx = tx.clone();
        // The snapshot first, so every watcher is live before the writes start.
        let (mut stream, _) = watch_from_scratch(&endpoint, tls)
            .await
            .with_context(|| format!("watcher {i}"))?;
        tasks.push(tokio::spawn(async move {
            while let Ok(Some(m)) = stream.message().await {
                if let Some(pb::watch_response::Message::Event(e)) = m.message {
                    if tx.send((i, e.revision, Instant::now())).is_err() {
                        return;
                    }
                }
            }
        }));
    }
    drop(tx);

    let mut all = Histogram::<u64>::new(3)?;
    let mut each = Histogram::<u64>::new(3)?;
    let mut from_send = Histogram::<u64>::new(3)?;
    let mut timeouts = 0;
    // Events that arrived before their write's ack was seen here.
    let mut early: HashMap<u64, Vec<(usize, Instant)>> = HashMap::new();
    let base = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        % 1_000_000;
    let mut written = Vec::with_capacity(cfg.writes as usize);
    for n in 0..cfg.writes {
        let ip_n = (n % 60_000) as u32 + 10;
        let host = pb::Host {
            name: format!("prop-{base}-{n}"),
            mac: format!(
                "52:55:{:02x}:{:02x}:{:02x}:{:02x}",
                (base >> 8) as u8,
                base as u8,
                (n >> 8) as u8,
                n as u8
            ),
            ip: format!("10.250.{}.{}", ip_n / 256, ip_n % 256),
            rack: cfg.rack.clone(),
            network: net.clone(),
            ..Default::default()
        };
        let sent = Instant::now();
        let name = host.name.clone();
        let resp = admin
            .put(put(pb::object::Record::Host(host)))
            .await?
            .into_inner();
        written.push(name);
        let acked = Instant::now();
        let rev = resp.revision;
        let mut got: Vec<Instant> = early
            .remove(&rev)
            .unwrap_or_default()
            .into_iter()
            .map(|(_, t)| t)
            .collect();
        let deadline = acked + cfg.timeout;
        while got.len() < cfg.watchers {
            match tokio::time::timeout_at(deadline.into(), rx.recv()).await {
                Ok(Some((w, r, t))) if r == rev => {
                    let _ = w;
                    got.push(t);
                }
                Ok(Some((w, r, t))) => early.entry(r).or_default().push((w, t)),
                Ok(None) => bail!("every watcher stream ended"),
                Err(_) => break,
            }
        }
        if got.len() < cfg.watchers {
            timeouts += 1;
            continue;
        }
        let lat = |t: &Instant| t.saturating_duration_since(acked).as_micros() as u64;
        for t in &got {
            each.record(lat(t).max(1))?;
        }
        all.record(got.iter().map(lat).max().unwrap_or(0).max(1))?;
        let last = got.iter().max().copied().unwrap_or(sent);
        from_send.record((last.saturating_duration_since(sent).as_micros() as u64).max(1))?;
        early.retain(|r, _| *r > rev);
    }
    for t in tasks {
        t.abort();
    }
    // Leave the cluster as it was (bounded: one delete per host written).
    for name in written {
        let req = pb::DeleteRequest {
            kind: pb::Kind::Host as i32,
            name,
        };
        if let Err(e) = admin.delete(req).await {
            eprintln!("cleanup: {e}");
        }
    }
    Ok(PropagationReport {
        writes: cfg.writes,
        watchers: cfg.watchers,
        all,
        each,
        from_send,
        timeouts,
    })
}
