//! What a storm measured: per-phase latency distributions (HdrHistogram),
//! completions and throughput over time, retries, timeouts and failures by
//! cause; as JSON, a terminal table and (see `html`) a report page.

use std::collections::BTreeMap;
use std::time::Duration;

use comfy_table::{presets::UTF8_FULL_CONDENSED, Cell, CellAlignment, Table};
use hdrhistogram::Histogram;
use serde::Serialize;

use super::{HostOutcome, StormConfig, Target};

/// Latency summary of one phase, milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    /// (percentile, ms) points of the distribution, for charts.
    pub cdf: Vec<(f64, f64)>,
}

const CDF_POINTS: [f64; 21] = [
    0.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 95.0, 97.5, 99.0, 99.5, 99.9,
    99.95, 99.99, 99.995, 99.999, 100.0,
];

impl Latency {
    pub(crate) fn of(samples: impl Iterator<Item = f64>) -> anyhow::Result<Latency> {
        // Microseconds, 3 significant digits, auto-resizing.
        let mut h = Histogram::<u64>::new(3)?;
        for ms in samples {
            h.record((ms * 1e3).round().max(1.0) as u64)?;
        }
        if h.is_empty() {
            return Ok(Latency::default());
        }
        let ms = |us: u64| us as f64 / 1e3;
        Ok(Latency {
            count: h.len(),
            mean: (h.mean() / 1e3 * 1000.0).round() / 1000.0,
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            max: ms(h.max()),
            cdf: CDF_POINTS
                .iter()
                .map(|&p| (p, ms(h.value_at_quantile(p / 100.0))))
                .collect(),
        })
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Phases {
    pub dhcp: Latency,
    pub tftp: Latency,
    pub http: Latency,
    pub total: Latency,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Retries {
    pub dhcp: u64,
    pub tftp: u64,
    pub http: u64,
}

/// One storm against one server.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub label: String,
    pub profile: super::Profile,
    pub arrival: super::Arrival,
    pub hosts: usize,
    pub completed: usize,
    pub failed: usize,
    /// Of the failed: hosts that gave up waiting (or were cut by the deadline).
    pub timeouts: usize,
    /// Seconds from the start until the last host was done (only when every
    /// host was done).
    pub time_to_last_host_s: Option<f64>,
    pub wall_s: f64,
    /// Completed hosts per second over the whole run.
    pub hosts_per_s: f64,
    pub bytes: u64,
    /// Payload bytes (TFTP + HTTP) per second, MiB/s, over the whole run.
    pub mib_per_s: f64,
    pub phases: Phases,
    pub retries: Retries,
    /// "phase: cause" → hosts.
    pub failures_by_cause: BTreeMap<String, u64>,
    /// Width of the time bins below.
    pub bin_s: f64,
    /// Hosts done by the end of each bin (cumulative).
    pub completions: Vec<u64>,
    /// Hosts done per second in each bin.
    pub throughput_hosts_per_s: Vec<f64>,
    pub settings: Settings,
    pub per_host: Vec<HostOutcome>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub dhcp_timeout_ms: u64,
    pub dhcp_retries: u32,
    pub tftp_blksize: u16,
    pub tftp_windowsize: u16,
    pub tftp_timeout_ms: u64,
    pub tftp_retries: u32,
    pub http_timeout_ms: u64,
    pub provision_done: bool,
    pub max_seconds: f64,
}

impl RunReport {
    pub fn build(
        cfg: &StormConfig,
        target: &Target,
        per_host: Vec<HostOutcome>,
        wall: Duration,
    ) -> anyhow::Result<RunReport> {
        let done: Vec<&HostOutcome> = per_host.iter().filter(|o| o.failure.is_none()).collect();
        let phases = Phases {
            dhcp: Latency::of(done.iter().map(|o| o.dhcp_ms))?,
            tftp: Latency::of(done.iter().map(|o| o.tftp_ms))?,
            http: Latency::of(
                done.iter()
                    .filter(|_| cfg.profile == super::Profile::Http)
                    .map(|o| o.http_ms),
            )?,
            total: Latency::of(done.iter().filter_map(|o| o.total_ms))?,
        };
        let mut failures_by_cause = BTreeMap::new();
        let mut timeouts = 0;
        for f in per_host.iter().filter_map(|o| o.failure.as_ref()) {
            *failures_by_cause
                .entry(format!("{}: {}", f.phase.as_str(), f.cause))
                .or_insert(0u64) += 1;
            if f.timeout {
                timeouts += 1;
            }
        }
        let last_done = done.iter().filter_map(|o| o.done_s).fold(0.0f64, f64::max);
        let wall_s = wall.as_secs_f64();
        let span = if done.len() == per_host.len() {
            last_done
        } else {
            wall_s
        }
        .max(1e-3);
        // About 100 bins, at least 0.1 s each.
        let bin_s = ((span / 100.0 * 10.0).ceil() / 10.0).max(0.1);
        let bins = (span / bin_s).ceil().max(1.0) as usize;
        let mut per_bin = vec![0u64; bins];
        for t in done.iter().filter_map(|o| o.done_s) {
            let i = ((t / bin_s) as usize).min(bins - 1);
            per_bin[i] += 1;
        }
        let mut cum = 0;
        let completions = per_bin
            .iter()
            .map(|n| {
                cum += n;
                cum
            })
            .collect();
        let bytes: u64 = per_host.iter().map(|o| o.bytes).sum();
        Ok(RunReport {
            label: target.label.clone(),
            profile: cfg.profile,
            arrival: cfg.arrival,
            hosts: per_host.len(),
            completed: done.len(),
            failed: per_host.len() - done.len(),
            timeouts,
            time_to_last_host_s: (done.len() == per_host.len() && !done.is_empty())
                .then(|| (last_done * 1000.0).round() / 1000.0),
            wall_s,
            hosts_per_s: done.len() as f64 / span,
            bytes,
            mib_per_s: bytes as f64 / (1 << 20) as f64 / span,
            phases,
            retries: Retries {
                dhcp: per_host.iter().map(|o| u64::from(o.dhcp_retries)).sum(),
                tftp: per_host.iter().map(|o| u64::from(o.tftp_retries)).sum(),
                http: per_host.iter().map(|o| u64::from(o.http_retries)).sum(),
            },
            failures_by_cause,
            bin_s,
            completions,
            throughput_hosts_per_s: per_bin.iter().map(|&n| n as f64 / bin_s).collect(),
            settings: Settings {
                dhcp_timeout_ms: cfg.dhcp_timeout.as_millis() as u64,
                dhcp_retries: cfg.dhcp_retries,
                tftp_blksize: cfg.tftp.blksize,
                tftp_windowsize: cfg.tftp.windowsize,
                tftp_timeout_ms: cfg.tftp.timeout.as_millis() as u64,
                tftp_retries: cfg.tftp.retries,
                http_timeout_ms: cfg.http_timeout.as_millis() as u64,
                provision_done: cfg.provision_done,
                max_seconds: cfg.max_duration.as_secs_f64(),
            },
            per_host,
        })
    }

    pub fn all_done(&self) -> bool {
        self.failed == 0 && self.completed == self.hosts
    }

    pub fn phase(&self, p: &str) -> &Latency {
        match p {
            "dhcp" => &self.phases.dhcp,
            "tftp" => &self.phases.tftp,
            "http" => &self.phases.http,
            _ => &self.phases.total,
        }
    }
}

/// `a / b` for the comparison table (how many times `b` the value `a` is).
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub ours: String,
    pub baseline: String,
    /// ours / baseline of the time to the last host (< 1: ours finished sooner).
    pub time_to_last_host_ratio: Option<f64>,
    pub total_p50_ratio: Option<f64>,
    pub total_p99_ratio: Option<f64>,
    pub hosts_per_s_ratio: Option<f64>,
}

fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0 && a.is_finite()).then(|| (a / b * 1000.0).round() / 1000.0)
}

/// A whole invocation: the run against pxemesh and, with `--baseline`, the
/// same storm against the reference server.
#[derive(Debug, Clone, Serialize)]
pub struct StormResults {
    pub tool: String,
    pub started_utc: String,
    pub machine: String,
    pub runs: Vec<RunReport>,
    pub comparison: Option<Comparison>,
}

impl StormResults {
    pub fn new(runs: Vec<RunReport>) -> StormResults {
        let comparison = match runs.as_slice() {
            [a, b, ..] => Some(Comparison {
                ours: a.label.clone(),
                baseline: b.label.clone(),
                time_to_last_host_ratio: match (a.time_to_last_host_s, b.time_to_last_host_s) {
                    (Some(x), Some(y)) => ratio(x, y),
                    _ => None,
                },
                total_p50_ratio: ratio(a.phases.total.p50, b.phases.total.p50),
                total_p99_ratio: ratio(a.phases.total.p99, b.phases.total.p99),
                hosts_per_s_ratio: ratio(a.hosts_per_s, b.hosts_per_s),
            }),
            _ => None,
        };
        StormResults {
            tool: format!("pxemesh-loadtest {}", env!("CARGO_PKG_VERSION")),
            started_utc: utc_now(),
            machine: machine(),
            runs,
            comparison,
        }
    }

    pub fn all_done(&self) -> bool {
        self.runs.iter().all(RunReport::all_done)
    }

    /// The terminal summary: one column per run.
    pub fn to_text(&self) -> String {
        let mut t = Table::new();
        t.load_preset(UTF8_FULL_CONDENSED);
        let mut head = vec![Cell::new("")];
        head.extend(self.runs.iter().map(|r| Cell::new(&r.label)));
        t.set_header(head);
        let f1 = |v: f64| format!("{v:.1}");
        let mut row = |name: &str, cells: Vec<String>| {
            let mut r = vec![Cell::new(name)];
            r.extend(
                cells
                    .into_iter()
                    .map(|c| Cell::new(c).set_alignment(CellAlignment::Right)),
            );
            t.add_row(r);
        };
        let per = |f: &dyn Fn(&RunReport) -> String| self.runs.iter().map(f).collect::<Vec<_>>();
        row(
            "profile / arrival",
            per(&|r| format!("{} / {}", r.profile.as_str(), r.arrival.describe())),
        );
        row(
            "hosts done / total",
            per(&|r| format!("{} / {}", r.completed, r.hosts)),
        );
        row(
            "failed (of which timeouts)",
            per(&|r| format!("{} ({})", r.failed, r.timeouts)),
        );
        row(
            "time to last host (s)",
            per(&|r| {
                r.time_to_last_host_s
                    .map(|v| format!("{v:.2}"))
                    .unwrap_or("- (not all done)".into())
            }),
        );
        row("hosts/s", per(&|r| format!("{:.1}", r.hosts_per_s)));
        row("payload MiB/s", per(&|r| f1(r.mib_per_s)));
        for p in ["dhcp", "tftp", "http", "total"] {
            row(
                &format!("{p} p50/p90/p99/max (ms)"),
                per(&|r| {
                    let l = r.phase(p);
                    if l.count == 0 {
                        "-".into()
                    } else {
                        format!(
                            "{} / {} / {} / {}",
                            f1(l.p50),
                            f1(l.p90),
                            f1(l.p99),
                            f1(l.max)
                        )
                    }
                }),
            );
        }
        row(
            "retries dhcp/tftp/http",
            per(&|r| {
                format!(
                    "{} / {} / {}",
                    r.retries.dhcp, r.retries.tftp, r.retries.http
                )
            }),
        );
        let mut s = t.to_string();
        s.push('\n');
        for r in &self.runs {
            if !r.failures_by_cause.is_empty() {
                s.push_str(&format!("{}: failures by cause\n", r.label));
                for (c, n) in &r.failures_by_cause {
                    s.push_str(&format!("  {n:>6}  {c}\n"));
                }
            }
        }
        if let Some(c) = &self.comparison {
            s.push_str(&format!(
                "{} / {}: time to last host x{}, total p50 x{}, p99 x{}, hosts/s x{}\n",
                c.ours,
                c.baseline,
                opt(c.time_to_last_host_ratio),
                opt(c.total_p50_ratio),
                opt(c.total_p99_ratio),
                opt(c.hosts_per_s_ratio)
            ));
        }
        s
    }
}

pub fn opt(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into())
}

fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let (days, rem) = ((secs / 86400) as i64, secs % 86400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| format!("{:.0} GiB", kb / 1048576.0))
        .unwrap_or_else(|| "? GiB".into());
    format!("{cpus} CPUs, {mem}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_percentiles() {
        let l = Latency::of((1..=1000).map(|i| i as f64)).unwrap();
        assert_eq!(l.count, 1000);
        assert!((l.p50 - 500.0).abs() < 1.0, "{l:?}");
        assert!((l.p99 - 990.0).abs() < 1.0, "{l:?}");
        assert!((l.max - 1000.0).abs() < 1.0);
        assert_eq!(l.cdf.len(), CDF_POINTS.len());
        assert_eq!(Latency::of(std::iter::empty()).unwrap().count, 0);
        assert_eq!(utc_now().len(), 20);
    }
}
