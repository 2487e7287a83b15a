//! Power and boot-device jobs on the relay: lease the rack's jobs from the
//! coordinators, run them against the BMCs through a [`PowerBackend`]
//! (ipmitool today), report the outcome.
//!
//! - `backend.rs` — the trait, actions, targets and the error taxonomy
//!   (transport failures are retried, authentication failures are not);
//! - `ipmitool.rs` — the ipmitool implementation (password via `-E`);
//! - `runner.rs` — the lease loop: bounded parallelism, one job per BMC at a
//!   time, OOB-network check, back-off, fenced reports.

pub mod backend;
pub mod ipmitool;
pub mod runner;

use std::path::PathBuf;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use serde::Deserialize;

pub use backend::{Action, BmcTarget, PowerBackend, PowerError};
pub use ipmitool::Ipmitool;

/// `[ipmi]` in the relay configuration (sync mode only).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IpmiConfig {
    /// Lease and run the rack's power jobs (needs `[coordinators]`).
    pub enabled: bool,
    /// The ipmitool binary.
    pub ipmitool: PathBuf,
    /// Jobs run at the same time by this relay (one per BMC at most).
    pub max_parallel: usize,
    /// An ipmitool command still running after this long is killed.
    pub command_timeout_seconds: u64,
    /// ipmitool's per-packet timeout (`-N`).
    pub session_timeout_seconds: u32,
    /// Extra attempts after a transport failure (no answer, timeout).
    pub retries: u32,
    /// First back-off between attempts; doubles each time.
    pub retry_backoff_ms: u64,
    /// How long a leased job stays this relay's before the coordinators
    /// hand it to another lease; renewed every third of it while the job
    /// runs, so it bounds how long a dead relay's jobs wait, not job length.
    pub lease_seconds: u32,
}

impl Default for IpmiConfig {
    fn default() -> Self {
        IpmiConfig {
            enabled: true,
            ipmitool: PathBuf::from("ipmitool"),
            max_parallel: 32,
            command_timeout_seconds: 20,
            session_timeout_seconds: 2,
            retries: 3,
            retry_backoff_ms: 1000,
            lease_seconds: 60,
        }
    }
}

impl IpmiConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=1024).contains(&self.max_parallel) {
            return Err("[ipmi] max_parallel must be 1-1024".into());
        }
        if !(1..=600).contains(&self.command_timeout_seconds) {
            return Err("[ipmi] command_timeout_seconds must be 1-600".into());
        }
        if !(1..=60).contains(&self.session_timeout_seconds) {
            return Err("[ipmi] session_timeout_seconds must be 1-60".into());
        }
        if self.retries > 10 {
            return Err("[ipmi] retries must be 0-10".into());
        }
        if !(10..=60_000).contains(&self.retry_backoff_ms) {
            return Err("[ipmi] retry_backoff_ms must be 10-60000".into());
        }
        if !(5..=3600).contains(&self.lease_seconds) {
            return Err("[ipmi] lease_seconds must be 5-3600".into());
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabels {
    /// succeeded | failed
    pub outcome: String,
    /// ok | auth | unreachable | timeout | command | spawn | outside-oob | bad-job
    pub reason: String,
}

/// Relay metrics of the job executor (registered with the relay's registry).
#[derive(Debug)]
pub struct IpmiMetrics {
    pub leased: Counter,
    pub started: Counter,
    pub finished: Family<JobLabels, Counter>,
    pub attempts_retried: Counter,
    pub reports_refused: Counter,
    pub running: Gauge,
    pub command_seconds: Histogram,
}

impl Default for IpmiMetrics {
    fn default() -> Self {
        IpmiMetrics {
            leased: Counter::default(),
            started: Counter::default(),
            finished: Family::default(),
            attempts_retried: Counter::default(),
            reports_refused: Counter::default(),
            running: Gauge::default(),
            // 5 ms .. ~80 s
            command_seconds: Histogram::new(exponential_buckets(0.005, 2.0, 15)),
        }
    }
}

impl IpmiMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "ipmi_jobs_leased",
            "Power jobs leased from the coordinators",
            self.leased.clone(),
        );
        r.register(
            "ipmi_jobs_started",
            "Power jobs started against a BMC",
            self.started.clone(),
        );
        r.register(
            "ipmi_jobs_finished",
            "Power jobs finished, by outcome and failure reason",
            self.finished.clone(),
        );
        r.register(
            "ipmi_attempts_retried",
            "IPMI attempts retried after a transport failure",
            self.attempts_retried.clone(),
        );
        r.register(
            "ipmi_reports_refused",
            "Job reports the coordinators refused (lease lost or job cancelled)",
            self.reports_refused.clone(),
        );
        r.register(
            "ipmi_jobs_running",
            "Power jobs running now",
            self.running.clone(),
        );
        r.register(
            "ipmi_command_seconds",
            "Duration of one ipmitool command",
            self.command_seconds.clone(),
        );
    }

    pub fn finish(&self, outcome: &str, reason: &str) {
        self.finished
            .get_or_create(&JobLabels {
                outcome: outcome.into(),
                reason: reason.into(),
            })
            .inc();
    }
}
