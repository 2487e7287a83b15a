//! Job RPCs: AdminService Submit/List/Get/Cancel/WatchJobs and RelayService
//! LeaseJobs/ReportJob. The services in `admin.rs` and `relay.rs` delegate
//! here; the replicated logic is in `crate::jobs`.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::time::{Duration, Instant};

use futures::Stream;
use pxemesh_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tracing::{info, warn};

use super::convert::record_to_proto;
use crate::crypto::ClusterKey;
use crate::error::CoordError;
use crate::jobs::{self, JobCommand};
use crate::model::{Job, JobState, Kind, Mac, Record};
use crate::node::NodeHandle;
use crate::state::{ChangeOp, Command, Outcome};

pub type JobStream = Pin<Box<dyn Stream<Item = Result<pb::Job, Status>> + Send + 'static>>;

/// Default and bounds of a relay's lease.
const DEFAULT_LEASE_SECONDS: u32 = 60;
const MAX_WAIT: Duration = Duration::from_secs(30);

/// The proposer's clock for job commands: immune to steps of the system
/// clock while running (see `clock.rs`), so leases last what they say.
pub fn now_ms() -> u64 {
    crate::clock::unix_ms()
}

pub fn job_to_proto(j: &Job) -> pb::Job {
    match record_to_proto(&Record::Job(j.clone())).record {
        Some(pb::object::Record::Job(p)) => p,
        _ => pb::Job::default(),
    }
}

pub fn job_state_from_proto(v: i32) -> Result<Option<JobState>, CoordError> {
    Ok(match pb::JobState::try_from(v) {
        Ok(pb::JobState::Unspecified) => None,
        Ok(pb::JobState::Queued) => Some(JobState::Queued),
        Ok(pb::JobState::Leased) => Some(JobState::Leased),
        Ok(pb::JobState::Running) => Some(JobState::Running),
        Ok(pb::JobState::Succeeded) => Some(JobState::Succeeded),
        Ok(pb::JobState::Failed) => Some(JobState::Failed),
        Ok(pb::JobState::Cancelled) => Some(JobState::Cancelled),
        Err(_) => return Err(CoordError::invalid(format!("unknown job state {v}"))),
    })
}

fn jobs_of(records: Vec<Record>) -> Vec<Job> {
    records
        .into_iter()
        .filter_map(|r| match r {
            Record::Job(j) => Some(j),
            _ => None,
        })
        .collect()
}

/// Host names a selector names, checked against the applied state.
fn resolve(node: &NodeHandle, sel: &pb::HostSelector) -> Result<Vec<String>, CoordError> {
    let hosts: Vec<crate::model::Host> = node
        .state()
        .list(Kind::Host)?
        .into_iter()
        .filter_map(|r| match r {
            Record::Host(h) => Some(h),
            _ => None,
        })
        .collect();
    let mut out = BTreeSet::new();
    if !sel.names.is_empty() || !sel.macs.is_empty() {
        for name in &sel.names {
            if !hosts.iter().any(|h| &h.name == name) {
                return Err(CoordError::invalid(format!("unknown host {name:?}")));
            }
            out.insert(name.clone());
        }
        for mac in &sel.macs {
            let m: Mac = mac.parse().map_err(CoordError::invalid)?;
            match hosts.iter().find(|h| h.mac == m) {
                Some(h) => {
                    out.insert(h.name.clone());
                }
                None => return Err(CoordError::invalid(format!("no host has MAC {m}"))),
            }
        }
    } else {
        if sel.rack.is_empty() && sel.labels.is_empty() {
            return Err(CoordError::invalid(
                "select hosts by name, MAC, rack or label",
            ));
        }
        for h in &hosts {
            let rack_ok = sel.rack.is_empty() || h.rack == sel.rack;
            let labels_ok = sel
                .labels
                .iter()
                .all(|(k, v)| h.labels.get(k).is_some_and(|x| x == v));
            if rack_ok && labels_ok {
                out.insert(h.name.clone());
            }
        }
        if out.is_empty() {
            return Err(CoordError::invalid("the selector matches no host"));
        }
    }
    Ok(out.into_iter().collect())
}

pub async fn submit(
    node: &NodeHandle,
    r: pb::SubmitJobsRequest,
) -> Result<pb::SubmitJobsResponse, CoordError> {
    let args: BTreeMap<String, String> = r.args.into_iter().collect();
    jobs::validate_action(&r.action, &args)?;
    if r.idempotency_key.len() > 256 {
        return Err(CoordError::invalid(
            "idempotency key is longer than 256 bytes",
        ));
    }
    node.read_barrier().await?;
    let hosts = resolve(node, &r.hosts.unwrap_or_default())?;
    let out = node
        .propose(&Command::Jobs(JobCommand::Submit {
            action: r.action.clone(),
            args,
            hosts,
            idempotency_key: r.idempotency_key.clone(),
            now_ms: now_ms(),
        }))
        .await?;
    let existing = out.results.iter().all(|i| i.outcome == Outcome::Unchanged);
    let jobs = jobs_of(out.records);
    info!(action = %r.action, jobs = jobs.len(), existing, "jobs submitted");
    Ok(pb::SubmitJobsResponse {
        jobs: jobs.iter().map(job_to_proto).collect(),
        existing,
    })
}

pub async fn list(
    node: &NodeHandle,
    r: pb::ListJobsRequest,
) -> Result<pb::ListJobsResponse, CoordError> {
    if r.consistency != pb::Consistency::Serializable as i32 {
        node.read_barrier().await?;
    }
    let state = job_state_from_proto(r.state)?;
    let limit = match r.limit {
        0 => 100,
        n => n.min(10_000) as usize,
    };
    let mut jobs = jobs_of(node.state().list(Kind::Job)?);
    jobs.retain(|j| {
        (r.rack.is_empty() || j.rack == r.rack)
            && (r.host.is_empty() || j.host == r.host)
            && state.is_none_or(|s| j.state == s)
    });
    // Ids sort by creation: newest first.
    jobs.reverse();
    jobs.truncate(limit);
    Ok(pb::ListJobsResponse {
        jobs: jobs.iter().map(job_to_proto).collect(),
    })
}

fn get_job(node: &NodeHandle, id: &str) -> Result<Job, CoordError> {
    match node.state().get(Kind::Job, id)? {
        Some(Record::Job(j)) => Ok(j),
        _ => Err(crate::error::StateError::NotFound {
            kind: "job".into(),
            name: id.into(),
        }
        .into()),
    }
}

pub async fn get(node: &NodeHandle, r: pb::GetJobRequest) -> Result<pb::JobResponse, CoordError> {
    if r.consistency != pb::Consistency::Serializable as i32 {
        node.read_barrier().await?;
    }
    let j = get_job(node, &r.id)?;
    Ok(pb::JobResponse {
        job: Some(job_to_proto(&j)),
    })
}

pub async fn cancel(
    node: &NodeHandle,
    r: pb::CancelJobRequest,
) -> Result<pb::JobResponse, CoordError> {
    let out = node
        .propose(&Command::Jobs(JobCommand::Cancel {
            id: r.id.clone(),
            now_ms: now_ms(),
        }))
        .await?;
    let job = jobs_of(out.records).into_iter().next();
    info!(job = %r.id, "job cancelled");
    Ok(pb::JobResponse {
        job: job.as_ref().map(job_to_proto),
    })
}

/// Current records of the named jobs, then every change to the selection
/// from the change history.
pub fn watch(node: &NodeHandle, r: pb::WatchJobsRequest) -> Result<JobStream, CoordError> {
    if r.ids.len() > 10_000 {
        return Err(CoordError::invalid("watch at most 10000 jobs by id"));
    }
    let node = node.clone();
    let state = node.state().clone();
    let by_id = !r.ids.is_empty();
    let ids: BTreeSet<String> = r.ids.into_iter().collect();
    let rack = r.rack;
    let wanted = move |j: &Job| {
        (ids.is_empty() || ids.contains(&j.id)) && (rack.is_empty() || j.rack == rack)
    };
    let (tx, rx) = mpsc::channel(256);
    let mut last = state.revision()?;
    // Only a watch by id starts with the current records (a rack-wide watch
    // would replay up to JOBS_RETAIN finished jobs).
    let named = if by_id {
        jobs_of(node.state().list(Kind::Job)?)
            .into_iter()
            .filter(|j| wanted(j))
            .collect()
    } else {
        Vec::new()
    };
    tokio::spawn(async move {
        let mut applied = node.applied_watch();
        for j in named {
            if tx.send(Ok(job_to_proto(&j))).await.is_err() {
                return;
            }
        }
        loop {
            let current = match state.revision() {
                Ok(c) => c,
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            };
            while last < current {
                last += 1;
                let changes = match state.changes_at(last) {
                    Ok(Some(c)) => c,
                    // Compacted while we were behind: skip ahead (bounded history).
                    Ok(None) => continue,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                for c in changes {
                    if let (ChangeOp::Put, Some(Record::Job(j))) = (c.op, &c.record) {
                        if wanted(j) && tx.send(Ok(job_to_proto(j))).await.is_err() {
                            return;
                        }
                    }
                }
            }
            tokio::select! {
                r = applied.changed() => if r.is_err() { return },
                _ = tx.closed() => return,
            }
        }
    });
    Ok(Box::pin(ReceiverStream::new(rx)))
}

/// LeaseJobs for relay `relay` of rack `rack`: proposes a lease only when the
/// applied state shows something to lease, long-polling up to `wait_ms`.
pub async fn lease(
    node: &NodeHandle,
    key: Option<&ClusterKey>,
    rack: &str,
    relay: &str,
    r: pb::LeaseJobsRequest,
) -> Result<pb::LeaseJobsResponse, CoordError> {
    let lease_seconds = match r.lease_seconds {
        0 => DEFAULT_LEASE_SECONDS,
        n => n,
    };
    let deadline = Instant::now() + Duration::from_millis(r.wait_ms as u64).min(MAX_WAIT);
    let mut applied = node.applied_watch();
    loop {
        if jobs::has_leasable(node.state(), rack, now_ms())? {
            let out = node
                .propose(&Command::Jobs(JobCommand::Lease {
                    rack: rack.to_string(),
                    relay: relay.to_string(),
                    max: r.max_jobs.max(1),
                    lease_ms: lease_seconds as u64 * 1000,
                    now_ms: now_ms(),
                }))
                .await?;
            let leased = jobs_of(out.records);
            if !leased.is_empty() {
                let mut jobs = Vec::with_capacity(leased.len());
                for j in leased {
                    let bmc = credentials(node, key, &j)?;
                    info!(job = %j.id, host = %j.host, action = %j.action, relay, attempt = j.attempts, "job leased");
                    jobs.push(pb::LeasedJob {
                        job: Some(job_to_proto(&j)),
                        bmc,
                    });
                }
                return Ok(pb::LeaseJobsResponse { jobs });
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(pb::LeaseJobsResponse { jobs: Vec::new() });
        }
        // Woken by applies; at least once a second so expiring leases are seen.
        if let Ok(Err(_)) =
            tokio::time::timeout(left.min(Duration::from_secs(1)), applied.changed()).await
        {
            return Err(CoordError::Stopped);
        }
    }
}

/// The BMC of a leased job's host, password opened for the relay (mTLS only).
fn credentials(
    node: &NodeHandle,
    key: Option<&ClusterKey>,
    j: &Job,
) -> Result<Option<pb::BmcCredentials>, CoordError> {
    let Some(Record::Host(h)) = node.state().get(Kind::Host, &j.host)? else {
        return Ok(None);
    };
    let Some(bmc) = h.bmc else { return Ok(None) };
    let password = match (&bmc.password, key) {
        (Some(sealed), Some(key)) => match key.open(sealed) {
            Ok(p) => p,
            Err(e) => {
                warn!(job = %j.id, host = %h.name, error = %e, "cannot open the stored BMC password");
                String::new()
            }
        },
        _ => String::new(),
    };
    Ok(Some(pb::BmcCredentials {
        address: bmc.address,
        port: bmc.port as u32,
        username: bmc.username,
        password,
        cipher_suite: bmc.cipher_suite as u32,
    }))
}

pub async fn report(
    node: &NodeHandle,
    rack: &str,
    relay: &str,
    r: pb::ReportJobRequest,
) -> Result<pb::ReportJobResponse, CoordError> {
    let Some(state) = job_state_from_proto(r.state)? else {
        return Err(CoordError::invalid("report needs a job state"));
    };
    let out = node
        .propose(&Command::Jobs(JobCommand::Report {
            rack: rack.to_string(),
            relay: relay.to_string(),
            id: r.job_id.clone(),
            token: r.attempts,
            state,
            reason: r.reason,
            result: r.result,
            now_ms: now_ms(),
            extend_ms: u64::from(r.lease_seconds) * 1000,
        }))
        .await;
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            warn!(job = %r.job_id, relay, lease = r.attempts, error = %e, "job report refused");
            return Err(e);
        }
    };
    let job = jobs_of(out.records).into_iter().next();
    if let Some(j) = &job {
        info!(job = %j.id, host = %j.host, relay, state = jobs::state_word(j.state), reason = %j.reason, result = %j.result, "job report");
    }
    Ok(pb::ReportJobResponse {
        job: job.as_ref().map(job_to_proto),
    })
}
