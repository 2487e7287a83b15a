//! `pxemeshctl cloudstack sync|status` and `pxemeshctl host find --bmc`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Result};
use clap::Subcommand;
use pxemesh_proto::v1::object::Record;
use pxemesh_proto::v1::{
    CloudStackStatusRequest, CloudStackStatusResponse, CloudStackSyncRequest, Consistency, Kind,
    ListRequest,
};
use serde_json::json;

use super::{new_table, print_json, print_table, Ctl, Output};

#[derive(Subcommand)]
pub enum CloudStackCmd {
    /// Run a sync now on the coordinator running the bridge (the leader) and
    /// show its outcome.
    Sync {
        /// Seconds to wait for the sync.
        #[arg(long, default_value_t = 60)]
        wait: u32,
    },
    /// Last sync, objects seen/changed, last error, state, running node.
    Status,
}

fn ago(unix_ms: u64) -> String {
    if unix_ms == 0 {
        return "never".into();
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    format!("{:.1} s ago", now.saturating_sub(unix_ms) as f64 / 1000.0)
}

fn show(ctl: &Ctl, s: &CloudStackStatusResponse) -> Result<()> {
    match ctl.output {
        Output::Json => print_json(&json!({
            "node_id": s.node_id,
            "term": s.term,
            "fence_epoch": s.fence_epoch,
            "state": s.state,
            "last_sync_unix_ms": s.last_sync_unix_ms,
            "last_success_unix_ms": s.last_success_unix_ms,
            "last_sync_duration_ms": s.last_sync_duration_ms,
            "objects_seen": s.objects_seen,
            "objects_changed": s.objects_changed,
            "last_error": s.last_error,
            "syncs": s.syncs,
            "failures": s.failures,
            "notifies_accepted": s.notifies_accepted,
            "jobs_submitted": s.jobs_submitted,
            "skipped": s.skipped,
        })),
        Output::Table => {
            let mut t = new_table(&["field", "value"]);
            let rows: [(&str, String); 13] = [
                (
                    "running on",
                    format!("node {} (term {})", s.node_id, s.term),
                ),
                ("fencing epoch", s.fence_epoch.to_string()),
                ("state", s.state.clone()),
                ("last sync", ago(s.last_sync_unix_ms)),
                ("last success", ago(s.last_success_unix_ms)),
                ("last sync took", format!("{} ms", s.last_sync_duration_ms)),
                ("objects seen", s.objects_seen.to_string()),
                ("objects changed", s.objects_changed.to_string()),
                ("last error", s.last_error.clone()),
                ("syncs / failures", format!("{} / {}", s.syncs, s.failures)),
                ("notifies accepted", s.notifies_accepted.to_string()),
                ("jobs submitted", s.jobs_submitted.to_string()),
                ("skipped", s.skipped.join("\n")),
            ];
            for (k, v) in rows {
                t.add_row(vec![k.to_string(), v]);
            }
            print_table(&mut t);
            Ok(())
        }
    }
}

pub async fn cloudstack(ctl: &Ctl, cmd: CloudStackCmd) -> Result<()> {
    match cmd {
        CloudStackCmd::Sync { wait } => {
            let msg = CloudStackSyncRequest {
                timeout_seconds: wait,
            };
            let ctl2 = Ctl {
                endpoints: ctl.endpoints.clone(),
                tls: ctl.tls.clone(),
                timeout: ctl.timeout.max(Duration::from_secs(u64::from(wait) + 5)),
                output: ctl.output,
            };
            let s = ctl2
                .call(msg, |mut c, r| async move { c.cloud_stack_sync(r).await })
                .await?;
            show(ctl, &s)?;
            if !s.last_error.is_empty() {
                bail!("sync failed: {}", s.last_error);
            }
            Ok(())
        }
        CloudStackCmd::Status => {
            let s = ctl
                .call(CloudStackStatusRequest {}, |mut c, r| async move {
                    c.cloud_stack_status(r).await
                })
                .await?;
            show(ctl, &s)
        }
    }
}

/// Names of the hosts whose BMC address is `bmc` (exit status 1 when none).
pub async fn host_find_bmc(ctl: &Ctl, bmc: &str) -> Result<()> {
    let msg = ListRequest {
        kind: Kind::Host as i32,
        rack: String::new(),
        consistency: Consistency::Linearizable as i32,
    };
    let resp = ctl
        .call(msg, |mut c, r| async move { c.list(r).await })
        .await?;
    let mut names = Vec::new();
    for o in resp.objects {
        if let Some(Record::Host(h)) = o.record {
            if h.bmc.as_ref().is_some_and(|b| b.address == bmc) {
                names.push(h.name);
            }
        }
    }
    if names.is_empty() {
        bail!("no host has BMC address {bmc}");
    }
    match ctl.output {
        Output::Json => print_json(&json!({ "hosts": names })),
        Output::Table => {
            for n in names {
                println!("{n}");
            }
            Ok(())
        }
    }
}
