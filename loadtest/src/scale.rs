//! `scale`: fill a coordinator cluster with many racks and hosts, then time
//! full rack resyncs the way a relay with an empty store does them.
//!
//! The load goes through `AdminService.Apply`, one atomic batch per rack (the
//! rack, its network and its hosts with BMC records, passwords included, so
//! the sealed-secret path is part of the figure). Several batches are in
//! flight at once. The resync is a `RelayService.Watch` from revision 0 with
//! a relay certificate of a random rack, timed until the rack snapshot has
//! arrived and decoded; trials rotate over the endpoints so followers serve
//! some of them.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use pxemesh_certs::{Tls, TlsPaths};
use pxemesh_coordinator::client;
use pxemesh_proto::v1 as pb;
use pxemesh_proto::v1::admin_service_client::AdminServiceClient;
use serde::Serialize;

use crate::propagation::{issue_relay_certs, watch_from_scratch};

pub struct ScaleConfig {
    pub endpoints: Vec<String>,
    pub tls_dir: PathBuf,
    pub cert_stem: String,
    pub racks: u32,
    pub hosts_per_rack: u32,
    /// Apply batches in flight at once.
    pub concurrency: usize,
    pub resync_trials: u32,
    /// Skip the load (the cluster already holds the data of an earlier run).
    pub skip_load: bool,
    pub prefix: String,
}

#[derive(Serialize)]
pub struct ScaleReport {
    pub racks: u32,
    pub hosts: u64,
    pub load_seconds: f64,
    pub hosts_per_second: f64,
    pub revision_after_load: u64,
    pub resync_trials: u32,
    /// Hosts in each resynced rack snapshot (all trials must match).
    pub snapshot_hosts: u64,
    /// Encoded size of one rack snapshot message, bytes.
    pub rack_snapshot_bytes: u64,
    pub resync_ms_p50: f64,
    pub resync_ms_p99: f64,
    pub resync_ms_max: f64,
}

impl ScaleReport {
    pub fn to_text(&self) -> String {
        format!(
            "loaded {} hosts in {} racks: {:.1} s ({:.0} hosts/s), revision {}\n\
             full rack resync ({} trials, {} hosts and {} bytes per rack snapshot): \
             p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms\n",
            self.hosts,
            self.racks,
            self.load_seconds,
            self.hosts_per_second,
            self.revision_after_load,
            self.resync_trials,
            self.snapshot_hosts,
            self.rack_snapshot_bytes,
            self.resync_ms_p50,
            self.resync_ms_p99,
            self.resync_ms_max,
        )
    }
}

/// The rack's objects: rack, one /24-or-larger network, its hosts.
fn rack_objects(prefix: &str, r: u32, hosts: u32) -> Vec<pb::Object> {
    let rack = format!("{prefix}{r:05}");
    let net = format!("{rack}-prov");
    // Every rack gets its own /22 out of 10.0.0.0/8 (up to 4096 racks,
    // 1021 hosts each): distinct, non-overlapping subnets like a real site.
    let base = (10u32 << 24) | (r << 10);
    let ip = |n: u32| std::net::Ipv4Addr::from(base + n).to_string();
    let mut objs = vec![
        pb::Object {
            record: Some(pb::object::Record::Rack(pb::Rack {
                name: rack.clone(),
                oob_networks: vec![format!("172.16.{}.0/24", r % 256)],
                ..Default::default()
            })),
        },
        pb::Object {
            record: Some(pb::object::Record::Network(pb::Network {
                name: net.clone(),
                rack: rack.clone(),
                subnet: format!("{}/22", ip(0)),
                gateway: ip(1),
                dns: vec![ip(2)],
                ..Default::default()
            })),
        },
    ];
    for h in 0..hosts {
        let n = r * 1024 + h;
        objs.push(pb::Object {
            record: Some(pb::object::Record::Host(pb::Host {
                name: format!("{rack}-h{h:04}"),
                mac: format!(
                    "52:56:{:02x}:{:02x}:{:02x}:{:02x}",
                    (n >> 24) as u8,
                    (n >> 16) as u8,
                    (n >> 8) as u8,
                    n as u8
                ),
                ip: ip(10 + h),
                hostname: format!("{rack}-h{h:04}"),
                rack: rack.clone(),
                network: net.clone(),
                labels: [("role".to_string(), "compute".to_string())].into(),
                bmc: Some(pb::Bmc {
                    address: format!("172.16.{}.{}", r % 256, 10 + h % 240),
                    username: "ADMIN".into(),
                    password: format!("bmc-secret-{n}"),
                    cipher_suite: 3,
                    ..Default::default()
                }),
                ..Default::default()
            })),
        });
    }
    objs
}

pub async fn scale(cfg: &ScaleConfig) -> Result<ScaleReport> {
    if cfg.endpoints.is_empty() || cfg.racks == 0 || cfg.racks > 4096 {
        bail!("need endpoints and 1..=4096 racks");
    }
    if cfg.hosts_per_rack > 1000 {
        bail!("at most 1000 hosts per rack (each rack gets a /22)");
    }
    let admin_tls = Tls::load(TlsPaths::in_dir(&cfg.tls_dir, &cfg.cert_stem))?;
    let channel = client::channel(&cfg.endpoints[0], admin_tls.clone()).await?;
    let admin = AdminServiceClient::new(channel)
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(256 << 20);

    let started = Instant::now();
    let mut revision = 0;
    if !cfg.skip_load {
        let mut next = 0u32;
        let mut inflight = tokio::task::JoinSet::new();
        let mut last_report = Instant::now();
        while next < cfg.racks || !inflight.is_empty() {
            while next < cfg.racks && inflight.len() < cfg.concurrency.max(1) {
                let objects = rack_objects(&cfg.prefix, next, cfg.hosts_per_rack);
                let mut a = admin.clone();
                inflight.spawn(async move {
                    a.apply(pb::ApplyRequest {
                        objects,
                        dry_run: false,
                    })
                    .await
                });
                next += 1;
            }
            match inflight.join_next().await {
                Some(r) => {
                    let resp = r
                        .context("apply task")?
                        .context("apply of a rack batch")?
                        .into_inner();
                    revision = revision.max(resp.revision);
                }
                None => break,
            }
            if last_report.elapsed() > Duration::from_secs(10) {
                eprintln!("loaded {next}/{} racks", cfg.racks);
                last_report = Instant::now();
            }
        }
    }
    let load = started.elapsed();

    let scratch = tempfile::tempdir()?;
    let mut hist = Histogram::<u64>::new(3)?;
    let mut snapshot_hosts = None;
    let mut snapshot_bytes = 0;
    for t in 0..cfg.resync_trials {
        // Spread the trials over racks and endpoints deterministically.
        let r = (t.wrapping_mul(2_654_435_761) >> 7) % cfg.racks;
        let rack = format!("{}{r:05}", cfg.prefix);
        let dir = scratch.path().join(format!("t{t}"));
        std::fs::create_dir_all(&dir)?;
        let tls = issue_relay_certs(&cfg.tls_dir, &dir, &rack, 1)?
            .pop()
            .context("relay certificate")?;
        let endpoint = &cfg.endpoints[t as usize % cfg.endpoints.len()];
        let t0 = Instant::now();
        let (_stream, snap) = watch_from_scratch(endpoint, tls)
            .await
            .with_context(|| format!("rack {rack}"))?;
        let took = t0.elapsed();
        hist.record((took.as_micros() as u64).max(1))?;
        let hosts = snap
            .objects
            .iter()
            .filter(|o| matches!(o.record, Some(pb::object::Record::Host(_))))
            .count() as u64;
        if snapshot_hosts.is_some_and(|n| n != hosts) {
            bail!("rack {rack}: snapshot has {hosts} hosts, earlier ones had {snapshot_hosts:?}");
        }
        if hosts != u64::from(cfg.hosts_per_rack) {
            bail!(
                "rack {rack}: snapshot has {hosts} hosts, expected {}",
                cfg.hosts_per_rack
            );
        }
        // Scoping holds at scale too: nothing of another rack, no secrets.
        for o in &snap.objects {
            if let Some(pb::object::Record::Host(h)) = &o.record {
                if h.rack != rack {
                    bail!(
                        "rack {rack}: snapshot carries host {} of rack {}",
                        h.name,
                        h.rack
                    );
                }
                // BMC secrets reach relays only with a leased power job.
                if h.bmc.as_ref().is_some_and(|b| !b.password.is_empty()) {
                    bail!("rack {rack}: host {} arrived with its BMC password", h.name);
                }
            }
        }
        snapshot_hosts = Some(hosts);
        snapshot_bytes = prost::Message::encoded_len(&snap) as u64;
        revision = revision.max(snap.revision);
    }
    let ms = |us: u64| us as f64 / 1000.0;
    let hosts = u64::from(cfg.racks) * u64::from(cfg.hosts_per_rack);
    Ok(ScaleReport {
        racks: cfg.racks,
        hosts,
        load_seconds: load.as_secs_f64(),
        hosts_per_second: if cfg.skip_load {
            0.0
        } else {
            hosts as f64 / load.as_secs_f64().max(1e-9)
        },
        revision_after_load: revision,
        resync_trials: cfg.resync_trials,
        snapshot_hosts: snapshot_hosts.unwrap_or(0),
        rack_snapshot_bytes: snapshot_bytes,
        resync_ms_p50: ms(hist.value_at_quantile(0.5)),
        resync_ms_p99: ms(hist.value_at_quantile(0.99)),
        resync_ms_max: ms(hist.max()),
    })
}
