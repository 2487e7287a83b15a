//! The lease loop: lease the rack's jobs (long poll), run each on its own
//! task under a semaphore (`max_parallel`), one at a time per BMC, and report
//! the outcome with the lease token the coordinators check.
//!
//! Crash safety comes from the coordinators: a job this relay leased and
//! never reported returns to the queue when the lease expires, and a report
//! carrying an old token is refused. Before touching a BMC the relay reports
//! `running`; if that is refused (the job was cancelled or leased again), it
//! does nothing.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;
use pxemesh_certs::Tls;
use pxemesh_coordinator::client::channel_lazy;
use pxemesh_proto::v1 as pb;
use pxemesh_proto::v1::relay_service_client::RelayServiceClient;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::Code;
use tracing::{debug, error, info, warn};

use super::backend::{Action, BmcTarget, PowerBackend, PowerError};
use super::{IpmiConfig, IpmiMetrics};

/// The rack's OOB networks as this relay knows them (None: not synced yet).
pub type OobSource = Arc<dyn Fn() -> Option<Vec<IpNet>> + Send + Sync>;

pub struct RunnerContext<B: PowerBackend> {
    pub config: IpmiConfig,
    pub backend: Arc<B>,
    pub endpoints: Vec<String>,
    pub tls: Arc<Tls>,
    pub rack: String,
    pub relay: String,
    pub oob: OobSource,
    pub metrics: Arc<IpmiMetrics>,
}

/// How long one LeaseJobs call waits at the coordinator for work.
const LEASE_WAIT_MS: u32 = 10_000;
/// Well above the coordinator's wait plus a proposal: an answer given up on
/// leaves its jobs leased to us until the lease expires.
const RPC_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Time given to running jobs at shutdown before they are abandoned (their
/// leases expire and the jobs run again).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// Coordinator connection with failover across endpoints.
struct Coord {
    endpoints: Vec<String>,
    tls: Arc<Tls>,
    cur: Mutex<(usize, Option<RelayServiceClient<Channel>>)>,
}

impl Coord {
    fn client(&self) -> Option<RelayServiceClient<Channel>> {
        let mut g = self.cur.lock().ok()?;
        if g.1.is_none() {
            let endpoint = &self.endpoints[g.0 % self.endpoints.len()];
            match channel_lazy(endpoint, self.tls.clone()) {
                Ok(ch) => g.1 = Some(RelayServiceClient::new(ch)),
                Err(e) => {
                    warn!(endpoint, error = %e, "jobs: cannot reach coordinator");
                    g.0 = (g.0 + 1) % self.endpoints.len();
                    return None;
                }
            }
        }
        g.1.clone()
    }

    fn rotate(&self) {
        if let Ok(mut g) = self.cur.lock() {
            g.0 = (g.0 + 1) % self.endpoints.len();
            g.1 = None;
        }
    }
}

struct Shared<B: PowerBackend> {
    ctx: RunnerContext<B>,
    coord: Coord,
    /// One job at a time per BMC (address:port). Entries go when unused.
    bmc_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

pub async fn run<B: PowerBackend>(ctx: RunnerContext<B>, shutdown: CancellationToken) {
    if ctx.endpoints.is_empty() {
        return;
    }
    let max = ctx.config.max_parallel.max(1);
    let shared = Arc::new(Shared {
        coord: Coord {
            endpoints: ctx.endpoints.clone(),
            tls: ctx.tls.clone(),
            cur: Mutex::new((0, None)),
        },
        ctx,
        bmc_locks: Mutex::new(HashMap::new()),
    });
    info!(rack = %shared.ctx.rack, relay = %shared.ctx.relay, backend = shared.ctx.backend.name(), max_parallel = max, "power job executor started");
    let sem = Arc::new(Semaphore::new(max));
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut backoff = Duration::from_millis(200);
    let mut unsynced_logged = false;
    loop {
        while tasks.try_join_next().is_some() {}
        if shutdown.is_cancelled() {
            break;
        }
        let free = sem.available_permits();
        if free == 0 {
            tokio::select! {
                _ = tasks.join_next() => {}
                _ = shutdown.cancelled() => break,
            }
            continue;
        }
        // No lease before the rack's OOB networks are known.
        if (shared.ctx.oob)().is_none() {
            if !unsynced_logged {
                info!(rack = %shared.ctx.rack, "power jobs wait for the rack state (OOB networks) from the coordinators");
                unsynced_logged = true;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                _ = shutdown.cancelled() => break,
            }
        }
        let Some(mut client) = shared.coord.client() else {
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.cancelled() => break,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
            continue;
        };
        let mut req = tonic::Request::new(pb::LeaseJobsRequest {
            max_jobs: free as u32,
            lease_seconds: shared.ctx.config.lease_seconds,
            wait_ms: LEASE_WAIT_MS,
        });
        req.set_timeout(RPC_TIMEOUT);
        let res = tokio::select! {
            r = client.lease_jobs(req) => r,
            _ = shutdown.cancelled() => break,
        };
        match res {
            Ok(resp) => {
                backoff = Duration::from_millis(200);
                for leased in resp.into_inner().jobs {
                    let Ok(permit) = sem.clone().try_acquire_owned() else {
                        // Cannot happen (we asked for `free`); the lease expires.
                        error!("jobs: leased more jobs than free slots; one is left to expire");
                        continue;
                    };
                    shared.ctx.metrics.leased.inc();
                    let s = shared.clone();
                    tasks.spawn(async move {
                        run_job(&s, leased).await;
                        drop(permit);
                    });
                }
            }
            Err(status) => {
                if status.code() != Code::DeadlineExceeded {
                    warn!(code = ?status.code(), message = %status.message(), "jobs: LeaseJobs failed; trying the next coordinator");
                }
                shared.coord.rotate();
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => break,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
        warn!(
            running = tasks.len(),
            "jobs still running at shutdown are abandoned; their leases expire and they run again"
        );
        tasks.shutdown().await;
    }
}

/// The final word on a job, as reported.
struct Outcome {
    state: pb::JobState,
    reason: String,
    result: String,
    label: &'static str,
}

fn failed(label: &'static str, reason: String) -> Outcome {
    Outcome {
        state: pb::JobState::Failed,
        reason,
        result: String::new(),
        label,
    }
}

async fn run_job<B: PowerBackend>(s: &Shared<B>, leased: pb::LeasedJob) {
    let Some(job) = leased.job else { return };
    let token = job.attempts;
    let lease_ms = job.lease_expires_unix_ms.saturating_sub(now_ms());
    let report_window = Duration::from_millis(lease_ms.clamp(1000, 3_600_000));
    let outcome = match prepare(s, &job, leased.bmc).await {
        Err(o) => o,
        Ok((action, target)) => {
            // Claim the job before touching the BMC: a cancelled or re-leased
            // job stops here.
            let lease_seconds = s.ctx.config.lease_seconds;
            match report(s, &job, running(&job, token, lease_seconds), report_window).await {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => {
                    warn!(job = %job.id, error = %e, "cannot tell the coordinators the job runs; leaving it to the lease expiry");
                    return;
                }
            }
            s.ctx.metrics.running.inc();
            let outcome = execute_renewing(s, &job, token, action, &target).await;
            s.ctx.metrics.running.dec();
            sweep_locks(s);
            match outcome {
                Some(o) => o,
                None => return,
            }
        }
    };
    s.ctx.metrics.finish(
        if outcome.state == pb::JobState::Succeeded {
            "succeeded"
        } else {
            "failed"
        },
        outcome.label,
    );
    if outcome.state == pb::JobState::Succeeded {
        info!(job = %job.id, host = %job.host, action = %job.action, result = %outcome.result, "job succeeded");
    } else {
        warn!(job = %job.id, host = %job.host, action = %job.action, reason = %outcome.reason, "job failed");
    }
    let msg = pb::ReportJobRequest {
        job_id: job.id.clone(),
        state: outcome.state as i32,
        reason: outcome.reason,
        result: outcome.result,
        attempts: token,
        lease_seconds: 0,
    };
    if let Err(e) = report(s, &job, msg, report_window).await {
        warn!(job = %job.id, error = %e, "job outcome not delivered; the lease expires and the job runs again");
    }
}

/// Everything that can be refused without touching a BMC.
async fn prepare<B: PowerBackend>(
    s: &Shared<B>,
    job: &pb::Job,
    bmc: Option<pb::BmcCredentials>,
) -> Result<(Action, BmcTarget), Outcome> {
    let args = job.args.clone().into_iter().collect();
    let action = Action::parse(&job.action, &args).map_err(|e| failed("bad-job", e))?;
    let Some(bmc) = bmc else {
        return Err(failed(
            "bad-job",
            format!("host {} has no BMC configured", job.host),
        ));
    };
    let port = if bmc.port == 0 { 623 } else { bmc.port };
    let Ok(port) = u16::try_from(port) else {
        return Err(failed("bad-job", format!("BMC port {port} is not a port")));
    };
    let suite = match bmc.cipher_suite {
        0 => 17,
        n => n,
    };
    let address = resolve(&bmc.address, port).await.map_err(|e| {
        failed(
            "unreachable",
            format!(
                "Unable to {} host via IPMI: cannot resolve BMC address {:?}: {e}",
                action.verb(),
                bmc.address
            ),
        )
    })?;
    let nets = (s.ctx.oob)().unwrap_or_default();
    if !nets.iter().any(|n| n.contains(&address)) {
        let list = if nets.is_empty() {
            "none configured".to_string()
        } else {
            nets.iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(failed(
            "outside-oob",
            format!(
                "refused: BMC address {address} of host {} is outside the OOB networks of rack {} ({list})",
                job.host, s.ctx.rack
            ),
        ));
    }
    Ok((
        action,
        BmcTarget {
            address,
            port,
            username: bmc.username,
            password: bmc.password,
            cipher_suite: suite as u8,
        },
    ))
}

async fn resolve(address: &str, port: u16) -> Result<IpAddr, String> {
    if let Ok(ip) = address.parse::<IpAddr>() {
        return Ok(ip);
    }
    let lookup = tokio::net::lookup_host((address, port));
    match tokio::time::timeout(Duration::from_secs(5), lookup).await {
        Ok(Ok(mut addrs)) => addrs
            .next()
            .map(|a| a.ip())
            .ok_or_else(|| "no address".to_string()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("lookup timed out".into()),
    }
}

/// A `running` report that also renews the lease.
fn running(job: &pb::Job, token: u32, lease_seconds: u32) -> pb::ReportJobRequest {
    pb::ReportJobRequest {
        job_id: job.id.clone(),
        state: pb::JobState::Running as i32,
        reason: String::new(),
        result: String::new(),
        attempts: token,
        lease_seconds,
    }
}

/// Runs the action while renewing the lease every third of its length.
/// None: the lease was lost (cancelled or taken over); the action is dropped
/// (its ipmitool process is killed).
async fn execute_renewing<B: PowerBackend>(
    s: &Shared<B>,
    job: &pb::Job,
    token: u32,
    action: Action,
    target: &BmcTarget,
) -> Option<Outcome> {
    let lease_seconds = s.ctx.config.lease_seconds;
    let every = (Duration::from_secs(u64::from(lease_seconds)) / 3).max(Duration::from_secs(1));
    let exec = execute(s, job, action, target);
    tokio::pin!(exec);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            o = &mut exec => return Some(o),
            _ = tick.tick() => {
                match report(s, job, running(job, token, lease_seconds), every).await {
                    Ok(true) => debug!(job = %job.id, "lease renewed"),
                    Ok(false) => {
                        warn!(job = %job.id, "lease lost while the job ran; abandoning it");
                        return None;
                    }
                    Err(e) => warn!(job = %job.id, error = %e, "lease renewal failed; the lease may expire"),
                }
            }
        }
    }
}

fn sweep_locks<B: PowerBackend>(s: &Shared<B>) {
    let mut locks = s.bmc_locks.lock().unwrap_or_else(|p| p.into_inner());
    locks.retain(|_, l| Arc::strong_count(l) > 1);
}

async fn execute<B: PowerBackend>(
    s: &Shared<B>,
    job: &pb::Job,
    action: Action,
    target: &BmcTarget,
) -> Outcome {
    let key = target.endpoint();
    let lock = {
        let mut locks = s.bmc_locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(key.clone()).or_default().clone()
    };
    let guard = lock.lock().await;
    s.ctx.metrics.started.inc();
    let cfg = &s.ctx.config;
    let attempts = cfg.retries + 1;
    let mut last: Option<PowerError> = None;
    let mut outcome = None;
    for attempt in 1..=attempts {
        debug!(job = %job.id, bmc = %key, attempt, "running IPMI action");
        match s.ctx.backend.execute(target, action).await {
            Ok(result) => {
                outcome = Some(Outcome {
                    state: pb::JobState::Succeeded,
                    reason: String::new(),
                    result,
                    label: "ok",
                });
                break;
            }
            Err(e) if e.retryable() && attempt < attempts => {
                let pause = Duration::from_millis(
                    cfg.retry_backoff_ms
                        .saturating_mul(1 << (attempt - 1).min(20)),
                );
                warn!(job = %job.id, host = %job.host, bmc = %key, attempt, error = %e, retry_in_ms = pause.as_millis() as u64, "BMC did not answer; retrying");
                s.ctx.metrics.attempts_retried.inc();
                last = Some(e);
                tokio::time::sleep(pause).await;
            }
            Err(e) => {
                let verb = action.verb();
                outcome = Some(if e.retryable() {
                    failed(
                        e.kind(),
                        format!(
                            "Unable to {verb} host via IPMI: BMC {key} unreachable after {attempt} attempts: {e}"
                        ),
                    )
                } else {
                    failed(e.kind(), format!("Unable to {verb} host via IPMI: {e}"))
                });
                last = Some(e);
                break;
            }
        }
    }
    drop(guard);
    drop(lock);
    outcome.unwrap_or_else(|| {
        failed(
            "unreachable",
            format!(
                "Unable to {} host via IPMI: no attempt finished ({})",
                action.verb(),
                last.map(|e| e.to_string()).unwrap_or_default()
            ),
        )
    })
}

/// Reports to the coordinators until one answers or `window` runs out.
/// Ok(false): refused (lease lost, job cancelled or gone): drop the job.
async fn report<B: PowerBackend>(
    s: &Shared<B>,
    job: &pb::Job,
    msg: pb::ReportJobRequest,
    window: Duration,
) -> Result<bool, String> {
    let deadline = tokio::time::Instant::now() + window;
    let mut pause = Duration::from_millis(100);
    let mut last = String::new();
    for _ in 0..1000 {
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        if let Some(mut c) = s.coord.client() {
            let mut req = tonic::Request::new(msg.clone());
            req.set_timeout(Duration::from_secs(10));
            match c.report_job(req).await {
                Ok(_) => return Ok(true),
                Err(st)
                    if matches!(
                        st.code(),
                        Code::FailedPrecondition | Code::NotFound | Code::InvalidArgument
                    ) =>
                {
                    s.ctx.metrics.reports_refused.inc();
                    info!(job = %job.id, lease = msg.attempts, message = %st.message(), "job report refused; dropping the job");
                    return Ok(false);
                }
                Err(st) => {
                    last = format!("{:?}: {}", st.code(), st.message());
                    s.coord.rotate();
                }
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
    Err(format!("no coordinator took the report ({last})"))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
