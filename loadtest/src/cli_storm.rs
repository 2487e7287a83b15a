//! Command-line front of the boot storm (`storm`, `storm-rack`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use pxemesh_loadtest::storm::{
    self, baseline::Baseline, dhcp, fleet, fleet::BootFiles, fleet::Fleet, register, tftp, Arrival,
    Profile, StormConfig, StormResults, Target,
};
use pxemesh_loadtest::TlsPaths;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProfileArg {
    /// TFTP boot loader, then iPXE: script, kernel, initrd over HTTP.
    Http,
    /// Classic PXE: loader, pxelinux config, kernel, initrd over TFTP.
    Tftp,
}

impl From<ProfileArg> for Profile {
    fn from(p: ProfileArg) -> Profile {
        match p {
            ProfileArg::Http => Profile::Http,
            ProfileArg::Tftp => Profile::Tftp,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ArrivalArg {
    /// Every host powers on at once.
    All,
    /// Evenly spread over --ramp-seconds.
    Ramp,
    /// Poisson arrivals at --rate per second.
    Poisson,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DhcpModeArg {
    /// Unicast to --dhcp-server as a relay agent (giaddr = the subnet's .1).
    Agent,
    /// Broadcast from port 68 on --interface (root; network namespaces).
    Broadcast,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BaselineArg {
    Dnsmasq,
}

/// The hosts and files shared by `storm` and `storm-rack`.
#[derive(Args, Clone)]
pub struct FleetArgs {
    /// Simulated hosts.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub hosts: u64,
    /// Host name prefix (<prefix>-00000, ...).
    #[arg(long, default_value = "storm")]
    pub prefix: String,
    /// Hosts' network; .1 is the relay agent address (giaddr), hosts start at .10.
    #[arg(long, default_value = "127.16.0.0/16")]
    pub subnet: String,
    /// Boot loader, kernel and initrd names (relative to the boot directory).
    #[arg(long, default_value = "undionly.kpxe")]
    pub loader: String,
    #[arg(long, default_value = "storm/vmlinuz")]
    pub kernel: String,
    #[arg(long, default_value = "storm/initrd.img")]
    pub initrd: String,
}

impl FleetArgs {
    pub fn fleet(&self) -> Result<Fleet> {
        let (ip, len) = self
            .subnet
            .split_once('/')
            .context("--subnet must be ADDRESS/PREFIX")?;
        let f = Fleet {
            prefix: self.prefix.clone(),
            count: self.hosts as usize,
            subnet: ip.parse().context("--subnet address")?,
            prefix_len: len.parse().context("--subnet prefix length")?,
        };
        f.validate().map_err(anyhow::Error::msg)?;
        Ok(f)
    }

    pub fn files(&self) -> BootFiles {
        BootFiles {
            loader: self.loader.clone(),
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
        }
    }
}

#[derive(Args)]
pub struct StormRackArgs {
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// Where to write the rack file (static mode of pxemesh-relay).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn storm_rack(a: &StormRackArgs) -> Result<()> {
    let f = a.fleet.fleet()?;
    std::fs::write(&a.out, f.rack_toml(&a.fleet.files()))
        .with_context(|| format!("writing {}", a.out.display()))?;
    Ok(())
}

#[derive(Args)]
pub struct StormArgs {
    #[command(flatten)]
    pub fleet: FleetArgs,
    #[arg(long, value_enum, default_value_t = ProfileArg::Http)]
    pub profile: ProfileArg,
    #[arg(long, value_enum, default_value_t = ArrivalArg::All)]
    pub arrival: ArrivalArg,
    #[arg(long, default_value_t = 10.0)]
    pub ramp_seconds: f64,
    /// Arrivals per second (Poisson).
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Name of the server under test in reports.
    #[arg(long, default_value = "pxemesh-relay")]
    pub label: String,
    #[arg(long, value_enum, default_value_t = DhcpModeArg::Agent)]
    pub dhcp_mode: DhcpModeArg,
    /// DHCP server (agent mode).
    #[arg(long, default_value = "127.0.0.1:67")]
    pub dhcp_server: SocketAddr,
    /// Port the relay agent listens on for answers (the server's relay_agent_port).
    #[arg(long, default_value_t = 67)]
    pub agent_port: u16,
    /// Interface to broadcast on (broadcast mode).
    #[arg(long)]
    pub interface: Option<String>,
    /// Server port for broadcasts (broadcast mode).
    #[arg(long, default_value_t = 67)]
    pub dhcp_port: u16,
    /// TFTP port on next-server.
    #[arg(long, default_value_t = 69)]
    pub tftp_port: u16,
    /// First DHCP retransmission timeout (RFC 2131: 4000), doubled per retry up to 64 s.
    #[arg(long, default_value_t = 4000, value_parser = clap::value_parser!(u64).range(1..))]
    pub dhcp_timeout_ms: u64,
    #[arg(long, default_value_t = 4)]
    pub dhcp_retries: u32,
    #[arg(long, default_value_t = 1468, value_parser = clap::value_parser!(u16).range(8..=65464))]
    pub blksize: u16,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub windowsize: u16,
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub tftp_timeout_ms: u64,
    #[arg(long, default_value_t = 5)]
    pub tftp_retries: u32,
    /// Inactivity timeout of one HTTP request, seconds.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub http_timeout: u64,
    #[arg(long, default_value_t = 2)]
    pub http_retries: u32,
    /// Skip GET /baremetal/provisiondone/<mac> at the end (http profile).
    #[arg(long)]
    pub no_provision_done: bool,
    /// Hard stop; hosts not done by then count as unfinished.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_seconds: u64,
    #[arg(long)]
    pub json: Option<PathBuf>,
    #[arg(long)]
    pub html: Option<PathBuf>,
    /// No progress bars (they are also off when stderr is not a terminal).
    #[arg(long)]
    pub no_progress: bool,
    /// Run the identical storm against a reference server afterwards.
    #[arg(long, value_enum)]
    pub baseline: Option<BaselineArg>,
    /// The baseline's profile (default: --profile); e.g. tftp for "dnsmasq TFTP for everything".
    #[arg(long, value_enum)]
    pub baseline_profile: Option<ProfileArg>,
    /// Directory with the boot files (the relay's boot.dir), for the baseline.
    #[arg(long)]
    pub files_dir: Option<PathBuf>,
    /// Where the baseline's configuration and file links go (default: a temp dir).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Register the hosts through the admin API first, delete them after.
    #[arg(long)]
    pub register: bool,
    #[arg(long, value_delimiter = ',')]
    pub endpoints: Vec<String>,
    #[arg(long, default_value = ".")]
    pub tls_dir: PathBuf,
    #[arg(long, default_value = "admin")]
    pub cert_stem: String,
    #[arg(long, default_value = fleet::RACK)]
    pub rack: String,
    #[arg(long, default_value = fleet::NETWORK)]
    pub network: String,
    /// After --register, wait this long for relays to receive the hosts.
    #[arg(long, default_value_t = 2.0)]
    pub register_settle_seconds: f64,
}

impl StormArgs {
    fn config(&self, profile: Profile) -> Result<StormConfig> {
        let mut c = StormConfig::new(self.fleet.fleet()?, profile);
        c.arrival = match self.arrival {
            ArrivalArg::All => Arrival::All,
            ArrivalArg::Ramp if self.ramp_seconds >= 0.0 => Arrival::Ramp {
                seconds: self.ramp_seconds,
            },
            ArrivalArg::Poisson if self.rate > 0.0 => Arrival::Poisson { rate: self.rate },
            _ => bail!("--ramp-seconds must be >= 0 and --rate > 0"),
        };
        c.dhcp_timeout = Duration::from_millis(self.dhcp_timeout_ms);
        c.dhcp_retries = self.dhcp_retries;
        c.tftp = tftp::TftpOptions {
            blksize: self.blksize,
            windowsize: self.windowsize,
            timeout: Duration::from_millis(self.tftp_timeout_ms),
            retries: self.tftp_retries,
        };
        c.http_timeout = Duration::from_secs(self.http_timeout);
        c.http_retries = self.http_retries;
        c.provision_done = !self.no_provision_done;
        c.max_duration = Duration::from_secs(self.max_seconds);
        c.progress = !self.no_progress;
        Ok(c)
    }

    fn target(&self, fleet: &Fleet) -> Result<Target> {
        let dhcp = match self.dhcp_mode {
            DhcpModeArg::Agent => dhcp::Mode::Agent {
                server: self.dhcp_server,
                giaddr: fleet.giaddr(),
                agent_port: self.agent_port,
            },
            DhcpModeArg::Broadcast => dhcp::Mode::Broadcast {
                interface: self
                    .interface
                    .clone()
                    .context("--dhcp-mode broadcast needs --interface")?,
                server_port: self.dhcp_port,
            },
        };
        Ok(Target {
            label: self.label.clone(),
            dhcp,
            tftp_port: self.tftp_port,
        })
    }
}

pub async fn storm(a: StormArgs) -> Result<()> {
    let cfg = a.config(a.profile.into())?;
    if a.baseline.is_some() && a.files_dir.is_none() {
        bail!("--baseline needs --files-dir (the boot files the relay serves)");
    }
    let registered = if a.register {
        if a.endpoints.is_empty() {
            bail!("--register needs --endpoints");
        }
        let reg = register::Registration {
            endpoints: a.endpoints.clone(),
            tls: TlsPaths::in_dir(&a.tls_dir, &a.cert_stem),
            rack: a.rack.clone(),
            network: a.network.clone(),
        };
        let r = register::register(&reg, &cfg.fleet, &a.fleet.files()).await?;
        eprintln!("registered {} hosts in rack {}", cfg.fleet.count, a.rack);
        tokio::time::sleep(Duration::from_secs_f64(
            a.register_settle_seconds.clamp(0.0, 600.0),
        ))
        .await;
        Some(r)
    } else {
        None
    };
    let target = a.target(&cfg.fleet)?;
    let mut runs = vec![storm::run(&cfg, &target).await?];
    if let Some(BaselineArg::Dnsmasq) = a.baseline {
        let profile: Profile = a.baseline_profile.unwrap_or(a.profile).into();
        let bcfg = a.config(profile)?;
        let files_dir = a.files_dir.as_deref().unwrap_or(std::path::Path::new("."));
        let b = Baseline::start_dnsmasq(
            &bcfg.fleet,
            profile,
            files_dir,
            &a.fleet.files(),
            a.work_dir.as_deref(),
        )
        .await?;
        let r = storm::run(&bcfg, &b.target).await;
        b.stop();
        runs.push(r?);
    }
    if let Some(r) = registered {
        let failed = r.cleanup().await?;
        if failed > 0 {
            eprintln!("warning: {failed} registered hosts could not be deleted");
        }
    }
    let results = StormResults::new(runs);
    print!("{}", results.to_text());
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_vec_pretty(&results)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &a.html {
        std::fs::write(p, storm::html::render(&results))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if !results.all_done() {
        let lost: usize = results.runs.iter().map(|r| r.failed).sum();
        bail!("{lost} hosts did not finish booting (see failures by cause)");
    }
    Ok(())
}

#[derive(Args)]
pub struct TftpArgs {
    /// TFTP server (host:port).
    #[arg(long, default_value = "127.0.0.1:69")]
    pub server: SocketAddr,
    #[arg(long, default_value = "undionly.kpxe")]
    pub file: String,
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub count: u64,
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub concurrency: u64,
    #[arg(long, default_value_t = 1468, value_parser = clap::value_parser!(u16).range(8..=65464))]
    pub blksize: u16,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub windowsize: u16,
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout_ms: u64,
    #[arg(long, default_value_t = 5)]
    pub retries: u32,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Args)]
pub struct HttpArgs {
    /// URL to fetch (http://address[:port]/path).
    #[arg(long)]
    pub url: String,
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub count: u64,
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub concurrency: u64,
    /// Inactivity timeout, seconds.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Args)]
pub struct DhcpArgs {
    /// The reserved hosts (the same as `storm-rack` wrote for the server).
    #[command(flatten)]
    pub fleet: FleetArgs,
    #[arg(long, default_value = "127.0.0.1:67")]
    pub dhcp_server: SocketAddr,
    #[arg(long, default_value_t = 67)]
    pub agent_port: u16,
    /// DORA exchanges started per second, one rate after another.
    #[arg(long, value_delimiter = ',', default_value = "100,500,1000,2000")]
    pub rates: Vec<f64>,
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// How long to wait for each OFFER and ACK (no retransmission).
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..))]
    pub wait_ms: u64,
    /// A rate passes with at most this share of lost exchanges.
    #[arg(long, default_value_t = 1.0)]
    pub max_lost_pct: f64,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

fn write_json<T: serde::Serialize>(path: &Option<PathBuf>, v: &T) -> Result<()> {
    if let Some(p) = path {
        std::fs::write(p, serde_json::to_vec_pretty(v)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

pub async fn tftp_driver(a: TftpArgs) -> Result<()> {
    let opts = tftp::TftpOptions {
        blksize: a.blksize,
        windowsize: a.windowsize,
        timeout: Duration::from_millis(a.timeout_ms),
        retries: a.retries,
    };
    let r = storm::drivers::tftp(
        a.server,
        a.file,
        opts,
        a.count as usize,
        a.concurrency as usize,
    )
    .await?;
    print!("{}", r.to_text());
    write_json(&a.json, &r)?;
    if r.failed > 0 {
        bail!("{} of {} transfers failed", r.failed, r.count);
    }
    Ok(())
}

pub async fn http_driver(a: HttpArgs) -> Result<()> {
    let r = storm::drivers::http(
        a.url,
        Duration::from_secs(a.timeout),
        a.count as usize,
        a.concurrency as usize,
    )
    .await?;
    print!("{}", r.to_text());
    write_json(&a.json, &r)?;
    if r.failed > 0 {
        bail!("{} of {} requests failed", r.failed, r.count);
    }
    Ok(())
}

pub async fn dhcp_driver(a: DhcpArgs) -> Result<()> {
    let fleet = a.fleet.fleet()?;
    let mode = dhcp::Mode::Agent {
        server: a.dhcp_server,
        giaddr: fleet.giaddr(),
        agent_port: a.agent_port,
    };
    let r = storm::drivers::dhcp_sweep(
        &mode,
        &fleet,
        &a.rates,
        a.seconds,
        Duration::from_millis(a.wait_ms),
        a.max_lost_pct,
    )
    .await?;
    print!("{}", r.to_text());
    write_json(&a.json, &r)?;
    if r.best_rate.is_none() {
        bail!(
            "no rate passed (more than {} % lost at every rate)",
            a.max_lost_pct
        );
    }
    Ok(())
}
