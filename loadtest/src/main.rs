//! `pxemesh-loadtest`: command-line front of the `pxemesh_loadtest` library.

mod cli_storm;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use pxemesh_loadtest::{ConnectMode, Target, TlsPaths, WritesConfig};

#[derive(Parser)]
#[command(
    name = "pxemesh-loadtest",
    version,
    about = "Load generators and benchmarks for pxemesh"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write-path benchmark: each request writes one new host record.
    Writes(WritesArgs),
    /// Time from an acknowledged write until every watching relay has it.
    Propagation(PropagationArgs),
    /// Fill the cluster with racks and hosts, then time full rack resyncs.
    Scale(ScaleArgs),
    /// Boot storm: simulated hosts through DHCP, TFTP and HTTP boot.
    Storm(Box<cli_storm::StormArgs>),
    /// Write the static-mode rack file reserving a storm's hosts.
    StormRack(cli_storm::StormRackArgs),
    /// DHCP rate sweep: DORA of reserved hosts at increasing rates.
    Dhcp(cli_storm::DhcpArgs),
    /// Concurrent TFTP transfers of one file.
    Tftp(cli_storm::TftpArgs),
    /// Concurrent HTTP downloads of one URL.
    Http(cli_storm::HttpArgs),
    /// Power-job storm: one job per selected host through the coordinators,
    /// timed from submit to finished.
    Ipmi(IpmiArgs),
}

#[derive(Args)]
struct IpmiArgs {
    /// Coordinator gRPC endpoints (host:port), comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    endpoints: Vec<String>,
    /// Directory holding ca.pem and the admin certificate and key.
    #[arg(long, default_value = ".")]
    tls_dir: PathBuf,
    #[arg(long, default_value = "admin")]
    cert_stem: String,
    /// power-on, power-off, power-cycle, power-reset, power-soft,
    /// power-status, bootdev-pxe or bootdev-disk.
    #[arg(long, default_value = "power-on")]
    action: String,
    /// Every host of this rack.
    #[arg(long, default_value = "")]
    rack: String,
    /// Only hosts with this label (key=value; repeatable).
    #[arg(long = "label")]
    labels: Vec<String>,
    /// Host names (in addition to --rack / --label).
    hosts: Vec<String>,
    /// Seconds to wait for every job.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    timeout: u64,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Args)]
struct ScaleArgs {
    /// Coordinator gRPC endpoints (host:port), comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    endpoints: Vec<String>,
    /// Directory with ca.pem, ca-key.pem (relay certificates for the resync
    /// trials are issued from it) and the admin certificate.
    #[arg(long, default_value = ".")]
    tls_dir: PathBuf,
    #[arg(long, default_value = "admin")]
    cert_stem: String,
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=4096))]
    racks: u32,
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(0..=1000))]
    hosts_per_rack: u32,
    /// Apply batches (one per rack) in flight at once.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=256))]
    concurrency: u64,
    /// Full rack resyncs timed after the load.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    resync_trials: u32,
    /// Do not load; only time resyncs against what an earlier run loaded.
    #[arg(long)]
    skip_load: bool,
    /// Rack name prefix: racks are <prefix>NNNNN.
    #[arg(long, default_value = "scale-")]
    prefix: String,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Args)]
struct PropagationArgs {
    /// Coordinator gRPC endpoints (host:port), comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    endpoints: Vec<String>,
    /// Directory with ca.pem, ca-key.pem (watcher certificates are issued from
    /// it) and the admin certificate.
    #[arg(long, default_value = ".")]
    tls_dir: PathBuf,
    #[arg(long, default_value = "admin")]
    cert_stem: String,
    /// In-process relay watchers, spread over the endpoints.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=5000))]
    watchers: u64,
    /// Writes measured one after another.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    writes: u64,
    #[arg(long, default_value = "prop-bench")]
    rack: String,
    /// Seconds to wait for all watchers on one write.
    #[arg(long, default_value_t = 5)]
    timeout: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Args)]
struct WritesArgs {
    /// What to write to: a pxemesh coordinator cluster, or etcd v3 for comparison.
    #[arg(long, value_enum)]
    target: Target,
    /// gRPC endpoints (host:port), comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    endpoints: Vec<String>,
    /// Directory holding ca.pem and the client certificate and key.
    #[arg(long, default_value = ".")]
    tls_dir: PathBuf,
    /// Client certificate stem: loads <tls-dir>/<stem>.pem and <stem>-key.pem.
    #[arg(long, default_value = "admin")]
    cert_stem: String,
    /// etcd client certificate (default: <tls-dir>/<cert-stem>.pem).
    #[arg(long)]
    etcd_cert: Option<PathBuf>,
    /// etcd client key (default: <tls-dir>/<cert-stem>-key.pem).
    #[arg(long)]
    etcd_key: Option<PathBuf>,
    /// CA bundle that signed etcd's server certificates (default: <tls-dir>/ca.pem).
    #[arg(long)]
    etcd_ca: Option<PathBuf>,
    /// Concurrent clients, each on its own connection.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    clients: u64,
    /// Measured requests (shared by all clients).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    requests: u64,
    /// Unmeasured requests sent first.
    #[arg(long, default_value_t = 0)]
    warmup: u64,
    /// Host name prefix: hosts are named <prefix>-<index>.
    #[arg(long, default_value = "bench")]
    prefix: String,
    /// First host index (default: the target's current revision, so repeated
    /// runs against one cluster write new hosts).
    #[arg(long)]
    first_index: Option<u64>,
    /// Connect every client to the leader, or spread clients over the endpoints.
    #[arg(long, value_enum, default_value_t = ConnectMode::Leader)]
    connect: ConnectMode,
    /// Hard stop for the whole run, in seconds.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    max_seconds: u64,
    /// Deadline of one request, in seconds.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    request_timeout: u64,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

impl WritesArgs {
    fn config(&self) -> WritesConfig {
        let ours = TlsPaths::in_dir(&self.tls_dir, &self.cert_stem);
        let tls = match self.target {
            Target::Pxemesh => ours,
            Target::Etcd => TlsPaths {
                ca: self.etcd_ca.clone().unwrap_or(ours.ca),
                cert: self.etcd_cert.clone().unwrap_or(ours.cert),
                key: self.etcd_key.clone().unwrap_or(ours.key),
            },
        };
        let endpoints = self
            .endpoints
            .iter()
            .map(|e| e.trim().to_string())
            .filter(|e| !e.is_empty())
            .collect();
        let mut cfg = WritesConfig::new(self.target, endpoints, tls);
        cfg.clients = self.clients as usize;
        cfg.requests = self.requests;
        cfg.warmup = self.warmup;
        cfg.prefix = self.prefix.clone();
        cfg.first_index = self.first_index;
        cfg.connect = self.connect;
        cfg.max_duration = Duration::from_secs(self.max_seconds);
        cfg.request_timeout = Duration::from_secs(self.request_timeout);
        cfg
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Writes(args) => {
            let report = pxemesh_loadtest::writes(&args.config()).await?;
            match args.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
                Output::Table => print!("{}", report.to_text()),
            }
            if report.ok == 0 {
                bail!("no request succeeded");
            }
            if report.failed() {
                bail!(
                    "{} of {} requests failed ({:.2}%; more than 1% fails the run)",
                    report.errors,
                    report.attempted,
                    report.error_rate * 100.0
                );
            }
            Ok(())
        }
        Cmd::Storm(a) => cli_storm::storm(*a).await,
        Cmd::StormRack(a) => cli_storm::storm_rack(&a),
        Cmd::Dhcp(a) => cli_storm::dhcp_driver(a).await,
        Cmd::Tftp(a) => cli_storm::tftp_driver(a).await,
        Cmd::Http(a) => cli_storm::http_driver(a).await,
        Cmd::Ipmi(a) => {
            let mut labels = std::collections::BTreeMap::new();
            for l in &a.labels {
                let Some((k, v)) = l.split_once('=') else {
                    bail!("--label {l:?}: expected key=value");
                };
                labels.insert(k.to_string(), v.to_string());
            }
            let cfg = pxemesh_loadtest::ipmi::IpmiConfig {
                endpoints: a.endpoints,
                tls: TlsPaths::in_dir(&a.tls_dir, &a.cert_stem),
                action: a.action,
                rack: a.rack,
                labels,
                hosts: a.hosts,
                timeout: Duration::from_secs(a.timeout),
            };
            let report = pxemesh_loadtest::ipmi::ipmi(&cfg).await?;
            match a.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
                Output::Table => print!("{}", report.to_text()),
            }
            if !report.all_succeeded() {
                bail!(
                    "{} of {} jobs did not succeed",
                    report.jobs - report.succeeded,
                    report.jobs
                );
            }
            Ok(())
        }
        Cmd::Propagation(a) => {
            let cfg = pxemesh_loadtest::propagation::PropagationConfig {
                endpoints: a.endpoints,
                tls_dir: a.tls_dir,
                cert_stem: a.cert_stem,
                watchers: a.watchers as usize,
                writes: a.writes,
                rack: a.rack,
                timeout: Duration::from_secs(a.timeout),
            };
            let report = pxemesh_loadtest::propagation::propagation(&cfg).await?;
            print!("{}", report.to_text());
            if report.timeouts > 0 {
                bail!(
                    "{} writes did not reach every watcher in time",
                    report.timeouts
                );
            }
            Ok(())
        }
        Cmd::Scale(a) => {
            let cfg = pxemesh_loadtest::scale::ScaleConfig {
                endpoints: a.endpoints,
                tls_dir: a.tls_dir,
                cert_stem: a.cert_stem,
                racks: a.racks,
                hosts_per_rack: a.hosts_per_rack,
                concurrency: a.concurrency as usize,
                resync_trials: a.resync_trials,
                skip_load: a.skip_load,
                prefix: a.prefix,
            };
            let report = pxemesh_loadtest::scale::scale(&cfg).await?;
            match a.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
                Output::Table => print!("{}", report.to_text()),
            }
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }
}
