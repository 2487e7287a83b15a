//! `ipmi`: a power-job storm through the coordinators. One `SubmitJobs` for
//! every selected host, then the job stream (`WatchJobs`, opened before the
//! submit so no transition is missed) until every job has finished or the
//! deadline passes. Measures submit → finished per job, and counts failures
//! by reason; the BMCs are whatever the hosts' records point at (real ones,
//! or ipmi_sim instances as in `relay/bench/ipmi-power-storm.sh`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use pxemesh_certs::{Tls, TlsPaths};
use pxemesh_coordinator::client;
use pxemesh_proto::v1 as pb;
use pxemesh_proto::v1::admin_service_client::AdminServiceClient;
use serde::Serialize;

pub struct IpmiConfig {
    pub endpoints: Vec<String>,
    pub tls: TlsPaths,
    /// power-on, power-off, power-cycle, power-reset, power-soft,
    /// power-status, bootdev-pxe, bootdev-disk.
    pub action: String,
    pub rack: String,
    pub labels: BTreeMap<String, String>,
    pub hosts: Vec<String>,
    pub timeout: Duration,
}

#[derive(Serialize)]
pub struct IpmiReport {
    pub action: String,
    pub jobs: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub cancelled: u64,
    /// Not finished when the deadline passed.
    pub unfinished: u64,
    /// Submit → last job finished.
    pub seconds_to_last: f64,
    pub latency_ms_p50: f64,
    pub latency_ms_p90: f64,
    pub latency_ms_p99: f64,
    pub latency_ms_max: f64,
    /// Failure reasons (first 160 characters) and how often each occurred.
    pub failures: BTreeMap<String, u64>,
}

impl IpmiReport {
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "{} jobs ({}): {} succeeded, {} failed, {} cancelled, {} unfinished; last done after {:.2} s\n\
             submit -> finished: p50 {:.0} ms, p90 {:.0} ms, p99 {:.0} ms, max {:.0} ms\n",
            self.jobs,
            self.action,
            self.succeeded,
            self.failed,
            self.cancelled,
            self.unfinished,
            self.seconds_to_last,
            self.latency_ms_p50,
            self.latency_ms_p90,
            self.latency_ms_p99,
            self.latency_ms_max
        );
        for (reason, n) in &self.failures {
            s.push_str(&format!("  {n} x {reason}\n"));
        }
        s
    }

    pub fn all_succeeded(&self) -> bool {
        self.jobs > 0 && self.succeeded == self.jobs
    }
}

fn finished(state: i32) -> bool {
    state == pb::JobState::Succeeded as i32
        || state == pb::JobState::Failed as i32
        || state == pb::JobState::Cancelled as i32
}

pub async fn ipmi(cfg: &IpmiConfig) -> Result<IpmiReport> {
    if cfg.rack.is_empty() && cfg.labels.is_empty() && cfg.hosts.is_empty() {
        bail!("select hosts: --rack, --label or host names");
    }
    let tls: Arc<Tls> = Tls::load(cfg.tls.clone()).context("loading the admin certificate")?;
    let (_, ch) = client::first_reachable(&cfg.endpoints, tls)
        .await
        .map_err(|e| anyhow::anyhow!("no coordinator reachable: {e}"))?;
    let mut admin = AdminServiceClient::new(ch);
    // Watch first: a job that finishes before we look is still seen.
    let mut stream = admin
        .watch_jobs(pb::WatchJobsRequest {
            ids: vec![],
            rack: cfg.rack.clone(),
        })
        .await
        .context("opening the job stream")?
        .into_inner();
    let t0 = Instant::now();
    let submitted = admin
        .submit_jobs(pb::SubmitJobsRequest {
            action: cfg.action.clone(),
            hosts: Some(pb::HostSelector {
                names: cfg.hosts.clone(),
                macs: vec![],
                rack: cfg.rack.clone(),
                labels: cfg.labels.clone().into_iter().collect(),
            }),
            args: Default::default(),
            idempotency_key: String::new(),
        })
        .await
        .context("submitting the jobs")?
        .into_inner();
    if submitted.jobs.is_empty() {
        bail!("the selection matched no host");
    }
    let mut open: HashMap<String, ()> = submitted
        .jobs
        .iter()
        .filter(|j| !finished(j.state))
        .map(|j| (j.id.clone(), ()))
        .collect();
    let mut done: HashMap<String, (pb::Job, Duration)> = submitted
        .jobs
        .iter()
        .filter(|j| finished(j.state))
        .map(|j| (j.id.clone(), (j.clone(), t0.elapsed())))
        .collect();
    let deadline = tokio::time::Instant::now() + cfg.timeout;
    while !open.is_empty() {
        let job = match tokio::time::timeout_at(deadline, stream.message()).await {
            Err(_) => break,
            Ok(Err(e)) => bail!("job stream failed: {}", e.message()),
            Ok(Ok(None)) => bail!("the coordinator closed the job stream"),
            Ok(Ok(Some(j))) => j,
        };
        if finished(job.state) && open.remove(&job.id).is_some() {
            done.insert(job.id.clone(), (job, t0.elapsed()));
        }
    }
    let mut hist = Histogram::<u64>::new(3)?;
    let (mut ok, mut failed, mut cancelled, mut last) = (0, 0, 0, Duration::ZERO);
    let mut failures = BTreeMap::new();
    for (job, at) in done.values() {
        hist.record((at.as_millis() as u64).max(1))?;
        last = last.max(*at);
        match pb::JobState::try_from(job.state) {
            Ok(pb::JobState::Succeeded) => ok += 1,
            Ok(pb::JobState::Cancelled) => cancelled += 1,
            _ => {
                failed += 1;
                let reason: String = job.reason.chars().take(160).collect();
                *failures.entry(reason).or_insert(0) += 1;
            }
        }
    }
    let q = |p: f64| {
        if hist.is_empty() {
            0.0
        } else {
            hist.value_at_quantile(p) as f64
        }
    };
    Ok(IpmiReport {
        action: cfg.action.clone(),
        jobs: submitted.jobs.len() as u64,
        succeeded: ok,
        failed,
        cancelled,
        unfinished: open.len() as u64,
        seconds_to_last: last.as_secs_f64(),
        latency_ms_p50: q(0.5),
        latency_ms_p90: q(0.9),
        latency_ms_p99: q(0.99),
        latency_ms_max: hist.max() as f64,
        failures,
    })
}
