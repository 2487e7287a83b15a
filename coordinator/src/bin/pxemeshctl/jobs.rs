//! `pxemeshctl power|bootdev|job`: power and boot-device jobs.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use pxemesh_coordinator::client;
use pxemesh_proto::v1::admin_service_client::AdminServiceClient;
use pxemesh_proto::v1::{
    CancelJobRequest, GetJobRequest, HostSelector, Job, JobState, ListJobsRequest,
    SubmitJobsRequest, WatchJobsRequest,
};
use serde_json::{json, Value};

use super::{event_time, new_table, parse_label, print_json, print_table, Ctl, Output};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PowerAction {
    On,
    Off,
    Soft,
    Cycle,
    Reset,
    Status,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BootDevice {
    Pxe,
    Disk,
}

/// Which hosts, and how to submit.
#[derive(Args)]
pub struct Target {
    /// Hosts by name or MAC address.
    #[arg(value_name = "HOST")]
    hosts: Vec<String>,
    /// Every host of this rack (with --label: those that also carry the labels).
    #[arg(long)]
    rack: Option<String>,
    /// Only hosts carrying this label (key=value; repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Resubmitting with the same key returns the jobs it created instead of new ones.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Wait until every job has finished; exit non-zero if one failed.
    #[arg(long)]
    wait: bool,
    /// Give up waiting after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    wait_timeout: u64,
}

#[derive(Args)]
pub struct PowerArgs {
    #[arg(value_enum)]
    action: PowerAction,
    #[command(flatten)]
    target: Target,
}

#[derive(Args)]
pub struct BootdevArgs {
    #[arg(value_enum)]
    device: BootDevice,
    /// Boot in UEFI mode (IPMI boot flag "efiboot").
    #[arg(long)]
    uefi: bool,
    /// Keep the device for every boot, not only the next one.
    #[arg(long)]
    persistent: bool,
    #[command(flatten)]
    target: Target,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StateArg {
    Queued,
    Leased,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

#[derive(Subcommand)]
pub enum JobCmd {
    /// Jobs, newest first.
    List {
        #[arg(long)]
        rack: Option<String>,
        #[arg(long)]
        host: Option<String>,
        #[arg(long, value_enum)]
        state: Option<StateArg>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// One job in full.
    Get { id: String },
    /// Cancel a job that has not started running.
    Cancel { id: String },
    /// Stream job changes (Ctrl-C to stop); with ids, stops when all finished.
    Watch {
        ids: Vec<String>,
        #[arg(long)]
        rack: Option<String>,
        /// Stop after this many updates.
        #[arg(long)]
        count: Option<u64>,
    },
}

pub fn state_word(s: i32) -> String {
    super::enum_word(
        JobState::try_from(s)
            .map(|s| s.as_str_name())
            .unwrap_or("?"),
        "JOB_STATE_",
    )
}

fn terminal(s: i32) -> bool {
    s == JobState::Succeeded as i32
        || s == JobState::Failed as i32
        || s == JobState::Cancelled as i32
}

pub fn job_json(j: &Job) -> Value {
    let args: BTreeMap<_, _> = j.args.iter().collect();
    json!({
        "id": j.id,
        "host": j.host,
        "rack": j.rack,
        "action": j.action,
        "args": args,
        "state": state_word(j.state),
        "leased_by": j.leased_by,
        "lease_expires_unix_ms": j.lease_expires_unix_ms,
        "attempts": j.attempts,
        "reason": j.reason,
        "result": j.result,
        "idempotency_key": j.idempotency_key,
        "created_unix_ms": j.created_unix_ms,
        "updated_unix_ms": j.updated_unix_ms,
        "revision": j.revision,
    })
}

fn outcome_text(j: &Job) -> String {
    if !j.reason.is_empty() {
        j.reason.clone()
    } else {
        j.result.clone()
    }
}

fn print_jobs(ctl: &Ctl, jobs: &[Job]) -> Result<()> {
    match ctl.output {
        Output::Json => {
            print_json(&json!({ "jobs": jobs.iter().map(job_json).collect::<Vec<_>>() }))
        }
        Output::Table => {
            let mut t = new_table(&[
                "ID", "HOST", "ACTION", "STATE", "ATTEMPTS", "UPDATED", "RESULT",
            ]);
            for j in jobs {
                t.add_row(vec![
                    j.id.clone(),
                    j.host.clone(),
                    j.action.clone(),
                    state_word(j.state),
                    j.attempts.to_string(),
                    event_time(j.updated_unix_ms),
                    outcome_text(j),
                ]);
            }
            print_table(&mut t);
            Ok(())
        }
    }
}

fn print_one(ctl: &Ctl, j: &Job) -> Result<()> {
    match ctl.output {
        Output::Json => print_json(&job_json(j)),
        Output::Table => {
            let rows = [
                ("id", j.id.clone()),
                ("host", j.host.clone()),
                ("rack", j.rack.clone()),
                ("action", j.action.clone()),
                (
                    "args",
                    j.args
                        .iter()
                        .collect::<BTreeMap<_, _>>()
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(","),
                ),
                ("state", state_word(j.state)),
                ("leased by", j.leased_by.clone()),
                ("attempts", j.attempts.to_string()),
                ("result", j.result.clone()),
                ("reason", j.reason.clone()),
                ("idempotency key", j.idempotency_key.clone()),
                ("created", event_time(j.created_unix_ms)),
                ("updated", event_time(j.updated_unix_ms)),
            ];
            for (k, v) in rows {
                println!("{k:<16} {v}");
            }
            Ok(())
        }
    }
}

async fn submit(ctl: &Ctl, action: String, args: HashMap<String, String>, t: Target) -> Result<()> {
    let mut sel = HostSelector {
        rack: t.rack.unwrap_or_default(),
        labels: t.labels.into_iter().collect(),
        ..Default::default()
    };
    for h in t.hosts {
        if h.parse::<pxemesh_coordinator::model::Mac>().is_ok() {
            sel.macs.push(h);
        } else {
            sel.names.push(h);
        }
    }
    if sel.names.is_empty() && sel.macs.is_empty() && sel.rack.is_empty() && sel.labels.is_empty() {
        bail!("name hosts (by name or MAC), or select them with --rack / --label");
    }
    let msg = SubmitJobsRequest {
        action,
        hosts: Some(sel),
        args,
        idempotency_key: t.idempotency_key.unwrap_or_default(),
    };
    let resp = ctl
        .call(msg, |mut c, r| async move { c.submit_jobs(r).await })
        .await?;
    if resp.existing && ctl.output == Output::Table {
        eprintln!("idempotency key already used: these are the jobs it created");
    }
    if !t.wait {
        return print_jobs(ctl, &resp.jobs);
    }
    let ids: Vec<String> = resp.jobs.iter().map(|j| j.id.clone()).collect();
    let done = wait_all(ctl, &ids, Duration::from_secs(t.wait_timeout)).await?;
    print_jobs(ctl, &done)?;
    let failed: Vec<&Job> = done
        .iter()
        .filter(|j| j.state != JobState::Succeeded as i32)
        .collect();
    if !failed.is_empty() {
        bail!(
            "{} of {} jobs did not succeed: {}",
            failed.len(),
            done.len(),
            failed
                .iter()
                .map(|j| format!("{} ({}): {}", j.id, j.host, outcome_text(j)))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    Ok(())
}

/// Follows the jobs until all finished (reconnecting to another coordinator
/// when a stream breaks), bounded by `within`.
async fn wait_all(ctl: &Ctl, ids: &[String], within: Duration) -> Result<Vec<Job>> {
    let deadline = Instant::now() + within;
    let mut latest: BTreeMap<String, Job> = BTreeMap::new();
    let want: BTreeSet<&String> = ids.iter().collect();
    for _ in 0..1000 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let follow = async {
            let (_, channel) = client::first_reachable(&ctl.endpoints, ctl.tls.clone()).await?;
            let mut stream = AdminServiceClient::new(channel)
                .watch_jobs(WatchJobsRequest {
                    ids: ids.to_vec(),
                    rack: String::new(),
                })
                .await?
                .into_inner();
            while let Some(j) = stream.message().await? {
                latest.insert(j.id.clone(), j);
                if want
                    .iter()
                    .all(|id| latest.get(*id).is_some_and(|j| terminal(j.state)))
                {
                    return Ok::<bool, anyhow::Error>(true);
                }
            }
            Ok(false)
        };
        match tokio::time::timeout(left, follow).await {
            Ok(Ok(true)) => return Ok(ids.iter().filter_map(|id| latest.remove(id)).collect()),
            Ok(Ok(false)) | Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(_) => break,
        }
    }
    let open: Vec<String> = ids
        .iter()
        .filter(|id| !latest.get(*id).is_some_and(|j| terminal(j.state)))
        .cloned()
        .collect();
    bail!(
        "gave up waiting after {} s; unfinished: {}",
        within.as_secs(),
        open.join(", ")
    )
}

pub async fn power(ctl: &Ctl, a: PowerArgs) -> Result<()> {
    let word = match a.action {
        PowerAction::On => "power-on",
        PowerAction::Off => "power-off",
        PowerAction::Soft => "power-soft",
        PowerAction::Cycle => "power-cycle",
        PowerAction::Reset => "power-reset",
        PowerAction::Status => "power-status",
    };
    submit(ctl, word.into(), HashMap::new(), a.target).await
}

pub async fn bootdev(ctl: &Ctl, a: BootdevArgs) -> Result<()> {
    let word = match a.device {
        BootDevice::Pxe => "bootdev-pxe",
        BootDevice::Disk => "bootdev-disk",
    };
    let mut args = HashMap::new();
    if a.uefi {
        args.insert("uefi".to_string(), "true".to_string());
    }
    if a.persistent {
        args.insert("persistent".to_string(), "true".to_string());
    }
    submit(ctl, word.into(), args, a.target).await
}

pub async fn job(ctl: &Ctl, cmd: JobCmd) -> Result<()> {
    match cmd {
        JobCmd::List {
            rack,
            host,
            state,
            limit,
        } => {
            let state = match state {
                None => JobState::Unspecified,
                Some(StateArg::Queued) => JobState::Queued,
                Some(StateArg::Leased) => JobState::Leased,
                Some(StateArg::Running) => JobState::Running,
                Some(StateArg::Succeeded) => JobState::Succeeded,
                Some(StateArg::Failed) => JobState::Failed,
                Some(StateArg::Cancelled) => JobState::Cancelled,
            };
            let msg = ListJobsRequest {
                rack: rack.unwrap_or_default(),
                host: host.unwrap_or_default(),
                state: state as i32,
                limit,
                consistency: 0,
            };
            let resp = ctl
                .call(msg, |mut c, r| async move { c.list_jobs(r).await })
                .await?;
            print_jobs(ctl, &resp.jobs)
        }
        JobCmd::Get { id } => {
            let msg = GetJobRequest { id, consistency: 0 };
            let resp = ctl
                .call(msg, |mut c, r| async move { c.get_job(r).await })
                .await?;
            print_one(ctl, &resp.job.unwrap_or_default())
        }
        JobCmd::Cancel { id } => {
            let resp = ctl
                .call(CancelJobRequest { id }, |mut c, r| async move {
                    c.cancel_job(r).await
                })
                .await?;
            print_one(ctl, &resp.job.unwrap_or_default())
        }
        JobCmd::Watch { ids, rack, count } => {
            let (endpoint, channel) =
                client::first_reachable(&ctl.endpoints, ctl.tls.clone()).await?;
            let mut stream = AdminServiceClient::new(channel)
                .watch_jobs(WatchJobsRequest {
                    ids: ids.clone(),
                    rack: rack.unwrap_or_default(),
                })
                .await
                .with_context(|| format!("watching jobs on {endpoint}"))?
                .into_inner();
            let mut seen = 0u64;
            let mut finished = BTreeSet::new();
            while let Some(j) = stream.message().await? {
                match ctl.output {
                    Output::Json => println!("{}", job_json(&j)),
                    Output::Table => println!(
                        "{} {} {} {} {} {}",
                        event_time(j.updated_unix_ms),
                        j.id,
                        j.host,
                        j.action,
                        state_word(j.state),
                        outcome_text(&j)
                    ),
                }
                if terminal(j.state) {
                    finished.insert(j.id.clone());
                }
                seen += 1;
                if count.is_some_and(|c| seen >= c)
                    || (!ids.is_empty() && ids.iter().all(|i| finished.contains(i)))
                {
                    break;
                }
            }
            Ok(())
        }
    }
}
