//! The boot storm: N simulated hosts, each with its own MAC, go through the
//! boot path a real machine takes, and every phase is timed.
//!
//! One host, `http` profile (iPXE):
//! 1. DHCP as a BIOS PXE ROM (DISCOVER/OFFER/REQUEST/ACK, RFC 2131 back-off),
//! 2. the boot loader named in the ACK over TFTP from next-server,
//! 3. DHCP again as iPXE (user class "iPXE", option 175): the ACK names the
//!    per-host script URL,
//! 4. the script, then every kernel/initrd URL in it over HTTP,
//! 5. optionally `GET /baremetal/provisiondone/<mac>`.
//!
//! `tftp` profile (classic PXE, pxelinux): 1, 2, then
//! `pxelinux.cfg/01-<mac>` and the kernel and initrds it names, all over TFTP.
//!
//! Phases measured per host: `dhcp` (all DHCP exchanges), `tftp` (all TFTP
//! transfers), `http` (all HTTP requests), `total` (arrival to done).
//! Nothing is hidden: every host ends done, failed (phase + cause) or
//! unfinished at the run deadline.

pub mod baseline;
pub mod dhcp;
pub mod drivers;
pub mod fleet;
pub mod html;
pub mod http;
pub mod progress;
pub mod register;
pub mod report;
pub mod tftp;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use self::dhcp::{ClientKind, Dhcp};
use self::fleet::{Fleet, SimHost};
pub use self::report::{RunReport, StormResults};
use self::tftp::TftpOptions;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// TFTP boot loader, then iPXE fetches script, kernel and initrd over HTTP.
    Http,
    /// Classic PXE: loader, pxelinux config, kernel and initrd all over TFTP.
    Tftp,
}

impl Profile {
    pub fn as_str(self) -> &'static str {
        match self {
            Profile::Http => "http",
            Profile::Tftp => "tftp",
        }
    }
}

/// When hosts power on.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Arrival {
    /// Every host at t = 0.
    All,
    /// Evenly spread over `seconds`.
    Ramp { seconds: f64 },
    /// A Poisson process of `rate` arrivals per second.
    Poisson { rate: f64 },
}

impl Arrival {
    /// Start offsets (seconds) for `n` hosts, ascending.
    pub fn offsets(&self, n: usize) -> Vec<f64> {
        match *self {
            Arrival::All => vec![0.0; n],
            Arrival::Ramp { seconds } => (0..n)
                .map(|i| seconds * i as f64 / (n.max(2) - 1) as f64)
                .collect(),
            Arrival::Poisson { rate } => {
                let mut t = 0.0;
                (0..n)
                    .map(|_| {
                        let u: f64 = rand::random::<f64>().max(f64::MIN_POSITIVE);
                        let now = t;
                        t += -u.ln() / rate.max(1e-9);
                        now
                    })
                    .collect()
            }
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Arrival::All => "all at once".into(),
            Arrival::Ramp { seconds } => format!("linear ramp over {seconds} s"),
            Arrival::Poisson { rate } => format!("Poisson, {rate}/s"),
        }
    }
}

/// The server side of a run: where DHCP, TFTP and HTTP are.
#[derive(Debug, Clone)]
pub struct Target {
    /// Label in reports ("pxemesh-relay", "dnsmasq").
    pub label: String,
    pub dhcp: dhcp::Mode,
    /// TFTP port on next-server (69 unless the server was moved).
    pub tftp_port: u16,
}

#[derive(Debug, Clone)]
pub struct StormConfig {
    pub fleet: Fleet,
    pub profile: Profile,
    pub arrival: Arrival,
    /// First DHCP retransmission timeout (RFC 2131: 4 s), doubled per retry.
    pub dhcp_timeout: Duration,
    /// Retransmissions of a DISCOVER or REQUEST before the host gives up.
    pub dhcp_retries: u32,
    pub tftp: TftpOptions,
    /// Inactivity timeout of one HTTP request.
    pub http_timeout: Duration,
    /// Further attempts of an HTTP request after a connect error or timeout.
    pub http_retries: u32,
    pub provision_done: bool,
    /// Hard stop: hosts not done by then count as unfinished.
    pub max_duration: Duration,
    pub progress: bool,
}

impl StormConfig {
    pub fn new(fleet: Fleet, profile: Profile) -> StormConfig {
        StormConfig {
            fleet,
            profile,
            arrival: Arrival::All,
            dhcp_timeout: Duration::from_secs(4),
            dhcp_retries: 4,
            tftp: TftpOptions {
                blksize: 1468,
                windowsize: 1,
                timeout: Duration::from_secs(1),
                retries: 5,
            },
            http_timeout: Duration::from_secs(30),
            http_retries: 2,
            provision_done: true,
            max_duration: Duration::from_secs(600),
            progress: true,
        }
    }
}

/// Phases of one boot, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Dhcp,
    Tftp,
    Http,
    Done,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Dhcp => "dhcp",
            Phase::Tftp => "tftp",
            Phase::Http => "http",
            Phase::Done => "done",
        }
    }

    fn from_u8(v: u8) -> Phase {
        match v {
            0 => Phase::Dhcp,
            1 => Phase::Tftp,
            2 => Phase::Http,
            _ => Phase::Done,
        }
    }
}

/// Why a host did not finish.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Failure {
    pub phase: Phase,
    pub cause: String,
    pub timeout: bool,
}

/// Everything measured about one host.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HostOutcome {
    pub index: usize,
    pub mac: String,
    /// Seconds after the run started.
    pub arrived_s: f64,
    pub done_s: Option<f64>,
    pub dhcp_ms: f64,
    pub tftp_ms: f64,
    pub http_ms: f64,
    pub total_ms: Option<f64>,
    pub dhcp_retries: u32,
    pub tftp_retries: u32,
    pub http_retries: u32,
    pub bytes: u64,
    pub failure: Option<Failure>,
}

/// Counters the progress display reads while the storm runs.
#[derive(Default)]
pub struct Live {
    pub arrived: AtomicU64,
    pub past_dhcp: AtomicU64,
    pub past_tftp: AtomicU64,
    pub done: AtomicU64,
    pub failed: AtomicU64,
    pub retries: AtomicU64,
    pub bytes: AtomicU64,
}

struct Ctx {
    cfg: StormConfig,
    target: Target,
    dhcp: Arc<Dhcp>,
    t0: Instant,
    live: Arc<Live>,
}

type Step<T> = Result<T, Failure>;

fn fail(phase: Phase, cause: impl Into<String>, timeout: bool) -> Failure {
    Failure {
        phase,
        cause: cause.into(),
        timeout,
    }
}

struct Host<'a> {
    ctx: &'a Ctx,
    sim: &'a SimHost,
    out: HostOutcome,
    phase: &'a AtomicU8,
    local: Ipv4Addr,
}

impl Host<'_> {
    fn enter(&self, p: Phase) {
        self.phase.store(p as u8, Ordering::Relaxed);
    }

    /// One DISCOVER/OFFER/REQUEST/ACK exchange.
    async fn dora(&mut self, kind: ClientKind) -> Step<dhcp::Reply> {
        self.enter(Phase::Dhcp);
        let started = Instant::now();
        let r = self.dora_inner(kind).await;
        self.out.dhcp_ms += started.elapsed().as_secs_f64() * 1e3;
        r
    }

    async fn dora_inner(&mut self, kind: ClientKind) -> Step<dhcp::Reply> {
        let c = self.ctx;
        let xid: u32 = rand::random();
        let mut guard = c.dhcp.listen(xid);
        let giaddr = c.dhcp.giaddr();
        let mac = self.sim.mac;
        let begun = Instant::now();
        let secs = || begun.elapsed().as_secs().min(u64::from(u16::MAX)) as u16;
        let what = match kind {
            ClientKind::PxeRom => "",
            ClientKind::Ipxe => "iPXE: ",
        };
        let mut offer = None;
        for attempt in 0..=c.cfg.dhcp_retries {
            if attempt > 0 {
                self.out.dhcp_retries += 1;
                c.live.retries.fetch_add(1, Ordering::Relaxed);
            }
            let b = dhcp::encode_request(dhcp::DISCOVER, xid, secs(), mac, giaddr, kind, None);
            if let Err(e) = c.dhcp.send(&b).await {
                return Err(fail(
                    Phase::Dhcp,
                    format!("send: {}", http::io_kind(&e)),
                    false,
                ));
            }
            let wait = dhcp::backoff(c.cfg.dhcp_timeout, attempt);
            let deadline = tokio::time::Instant::now() + wait;
            while let Ok(Some(r)) = tokio::time::timeout_at(deadline, guard.rx.recv()).await {
                if r.msg_type == dhcp::OFFER {
                    offer = Some(r);
                    break;
                }
            }
            if offer.is_some() {
                break;
            }
        }
        let Some(offer) = offer else {
            return Err(fail(
                Phase::Dhcp,
                format!("{what}no OFFER after {} DISCOVERs", c.cfg.dhcp_retries + 1),
                true,
            ));
        };
        let server = offer.server_id.unwrap_or(offer.siaddr);
        for attempt in 0..=c.cfg.dhcp_retries {
            if attempt > 0 {
                self.out.dhcp_retries += 1;
                c.live.retries.fetch_add(1, Ordering::Relaxed);
            }
            let b = dhcp::encode_request(
                dhcp::REQUEST,
                xid,
                secs(),
                mac,
                giaddr,
                kind,
                Some((offer.yiaddr, server)),
            );
            if let Err(e) = c.dhcp.send(&b).await {
                return Err(fail(
                    Phase::Dhcp,
                    format!("send: {}", http::io_kind(&e)),
                    false,
                ));
            }
            let wait = dhcp::backoff(c.cfg.dhcp_timeout, attempt);
            let deadline = tokio::time::Instant::now() + wait;
            while let Ok(Some(r)) = tokio::time::timeout_at(deadline, guard.rx.recv()).await {
                match r.msg_type {
                    dhcp::ACK => return Ok(r),
                    dhcp::NAK => return Err(fail(Phase::Dhcp, format!("{what}NAK"), false)),
                    _ => {}
                }
            }
        }
        Err(fail(
            Phase::Dhcp,
            format!("{what}no ACK after {} REQUESTs", c.cfg.dhcp_retries + 1),
            true,
        ))
    }

    async fn tftp(&mut self, server: Ipv4Addr, file: &str, keep: bool) -> Step<Option<Vec<u8>>> {
        self.enter(Phase::Tftp);
        let started = Instant::now();
        let addr = SocketAddr::new(server.into(), self.ctx.target.tftp_port);
        let r = tftp::fetch(addr, self.local, file, &self.ctx.cfg.tftp, keep).await;
        self.out.tftp_ms += started.elapsed().as_secs_f64() * 1e3;
        match r {
            Ok(f) => {
                self.out.tftp_retries += f.retransmissions;
                self.out.bytes += f.bytes;
                self.ctx
                    .live
                    .retries
                    .fetch_add(u64::from(f.retransmissions), Ordering::Relaxed);
                self.ctx.live.bytes.fetch_add(f.bytes, Ordering::Relaxed);
                Ok(f.body)
            }
            Err(e) => Err(fail(
                Phase::Tftp,
                format!("{}: {e}", file_kind(file)),
                e.is_timeout(),
            )),
        }
    }

    async fn http(&mut self, url: &str, keep: bool) -> Step<Option<Vec<u8>>> {
        self.enter(Phase::Http);
        let started = Instant::now();
        let mut attempt = 0;
        let r = loop {
            match http::get(url, self.local, keep, self.ctx.cfg.http_timeout).await {
                Err(e) if e.retryable() && attempt < self.ctx.cfg.http_retries => {
                    attempt += 1;
                    self.out.http_retries += 1;
                    self.ctx.live.retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                other => break other,
            }
        };
        self.out.http_ms += started.elapsed().as_secs_f64() * 1e3;
        match r {
            Ok(g) => {
                self.out.bytes += g.bytes;
                self.ctx.live.bytes.fetch_add(g.bytes, Ordering::Relaxed);
                Ok(g.body)
            }
            Err(e) => Err(fail(
                Phase::Http,
                format!("{}: {}", url_kind(url), e.cause()),
                e.is_timeout(),
            )),
        }
    }

    async fn boot(&mut self) -> Step<()> {
        let c = self.ctx;
        let ack = self.dora(ClientKind::PxeRom).await?;
        if ack.yiaddr.is_loopback() {
            // On loopback each host sends from the address it was given.
            self.local = ack.yiaddr;
        }
        let Some(next) = ack.next_server() else {
            return Err(fail(Phase::Dhcp, "ACK names no next-server", false));
        };
        let Some(loader) = ack.bootfile.clone() else {
            return Err(fail(Phase::Dhcp, "ACK names no boot file", false));
        };
        c.live.past_dhcp.fetch_add(1, Ordering::Relaxed);
        self.tftp(next, &loader, false).await?;
        match c.cfg.profile {
            Profile::Tftp => {
                let name = format!("pxelinux.cfg/01-{}", self.sim.mac_text().replace(':', "-"));
                let cfg = self.tftp(next, &name, true).await?.unwrap_or_default();
                let files = fleet::pxelinux_files(&String::from_utf8_lossy(&cfg));
                if files.is_empty() {
                    return Err(fail(Phase::Tftp, "pxelinux config names no kernel", false));
                }
                for f in files {
                    self.tftp(next, &f, false).await?;
                }
                c.live.past_tftp.fetch_add(1, Ordering::Relaxed);
            }
            Profile::Http => {
                c.live.past_tftp.fetch_add(1, Ordering::Relaxed);
                let ack2 = self.dora(ClientKind::Ipxe).await?;
                let Some(url) = ack2.bootfile.filter(|u| u.starts_with("http://")) else {
                    return Err(fail(Phase::Dhcp, "iPXE: ACK names no script URL", false));
                };
                let script = self.http(&url, true).await?.unwrap_or_default();
                let urls = fleet::script_urls(&String::from_utf8_lossy(&script));
                if urls.is_empty() {
                    return Err(fail(Phase::Http, "script names no kernel", false));
                }
                for u in &urls {
                    self.http(u, false).await?;
                }
                if c.cfg.provision_done {
                    let (addr, _, _) = http::split_url(&url)
                        .map_err(|e| fail(Phase::Http, e.to_string(), false))?;
                    let done = format!(
                        "http://{addr}/baremetal/provisiondone/{}",
                        self.sim.mac_text()
                    );
                    self.http(&done, false).await?;
                }
            }
        }
        Ok(())
    }
}

fn file_kind(file: &str) -> &'static str {
    if file.starts_with("pxelinux.cfg/") {
        "pxelinux config"
    } else if file.contains("vmlinuz") || file.contains("kernel") {
        "kernel"
    } else if file.contains("initrd") {
        "initrd"
    } else {
        "boot loader"
    }
}

fn url_kind(url: &str) -> &'static str {
    if url.ends_with(".ipxe") {
        "script"
    } else if url.contains("/provisiondone/") {
        "provision-done"
    } else {
        match file_kind(url) {
            "boot loader" => "file",
            k => k,
        }
    }
}

async fn run_host(
    ctx: Arc<Ctx>,
    sim: SimHost,
    offset: f64,
    deadline: tokio::time::Instant,
) -> HostOutcome {
    let start_at = tokio::time::Instant::from_std(ctx.t0) + Duration::from_secs_f64(offset);
    tokio::time::sleep_until(start_at.min(deadline)).await;
    let arrived = ctx.t0.elapsed().as_secs_f64();
    let phase = AtomicU8::new(Phase::Dhcp as u8);
    let mut host = Host {
        ctx: &ctx,
        sim: &sim,
        phase: &phase,
        local: Ipv4Addr::UNSPECIFIED,
        out: HostOutcome {
            index: sim.index,
            mac: sim.mac_text(),
            arrived_s: arrived,
            done_s: None,
            dhcp_ms: 0.0,
            tftp_ms: 0.0,
            http_ms: 0.0,
            total_ms: None,
            dhcp_retries: 0,
            tftp_retries: 0,
            http_retries: 0,
            bytes: 0,
            failure: None,
        },
    };
    ctx.live.arrived.fetch_add(1, Ordering::Relaxed);
    let begun = Instant::now();
    let result = if start_at >= deadline {
        Err(fail(Phase::Dhcp, "run deadline before arrival", true))
    } else {
        match tokio::time::timeout_at(deadline, host.boot()).await {
            Ok(r) => r,
            Err(_) => Err(fail(
                Phase::from_u8(phase.load(Ordering::Relaxed)),
                "unfinished at the run deadline",
                true,
            )),
        }
    };
    let mut out = host.out;
    match result {
        Ok(()) => {
            out.total_ms = Some(begun.elapsed().as_secs_f64() * 1e3);
            out.done_s = Some(ctx.t0.elapsed().as_secs_f64());
            ctx.live.done.fetch_add(1, Ordering::Relaxed);
        }
        Err(f) => {
            ctx.live.failed.fetch_add(1, Ordering::Relaxed);
            out.failure = Some(f);
        }
    }
    out
}

/// Run one storm against `target`. Errors only for setup problems (sockets);
/// host failures are in the report.
pub async fn run(cfg: &StormConfig, target: &Target) -> anyhow::Result<RunReport> {
    cfg.fleet.validate().map_err(anyhow::Error::msg)?;
    raise_nofile_limit();
    let stop = CancellationToken::new();
    let _stop_guard = stop.clone().drop_guard();
    let dhcp = Dhcp::start(&target.dhcp, stop.clone())
        .map_err(|e| anyhow::anyhow!("{}: DHCP socket: {e}", target.label))?;
    let live = Arc::new(Live::default());
    let t0 = Instant::now();
    let ctx = Arc::new(Ctx {
        cfg: cfg.clone(),
        target: target.clone(),
        dhcp,
        t0,
        live: live.clone(),
    });
    let bars = progress::Progress::start(cfg, &target.label, live.clone(), stop.clone());
    let deadline = tokio::time::Instant::from_std(t0) + cfg.max_duration;
    let offsets = cfg.arrival.offsets(cfg.fleet.count);
    let mut tasks = tokio::task::JoinSet::new();
    for (sim, off) in cfg.fleet.hosts().into_iter().zip(offsets) {
        tasks.spawn(run_host(ctx.clone(), sim, off, deadline));
    }
    let mut outcomes = Vec::with_capacity(cfg.fleet.count);
    let grace = deadline + Duration::from_secs(5);
    loop {
        match timeout(
            grace.saturating_duration_since(tokio::time::Instant::now()),
            tasks.join_next(),
        )
        .await
        {
            Ok(Some(Ok(o))) => outcomes.push(o),
            Ok(Some(Err(e))) => anyhow::bail!("a host task failed: {e}"),
            Ok(None) => break,
            Err(_) => {
                tasks.abort_all();
                break;
            }
        }
    }
    let wall = t0.elapsed();
    bars.finish();
    // Hosts whose task never returned (cannot happen short of a bug) are
    // still accounted for.
    let seen: std::collections::HashSet<usize> = outcomes.iter().map(|o| o.index).collect();
    for sim in cfg.fleet.hosts() {
        if !seen.contains(&sim.index) {
            outcomes.push(HostOutcome {
                index: sim.index,
                mac: sim.mac_text(),
                arrived_s: 0.0,
                done_s: None,
                dhcp_ms: 0.0,
                tftp_ms: 0.0,
                http_ms: 0.0,
                total_ms: None,
                dhcp_retries: 0,
                tftp_retries: 0,
                http_retries: 0,
                bytes: 0,
                failure: Some(fail(Phase::Dhcp, "host task lost", true)),
            });
        }
    }
    outcomes.sort_by_key(|o| o.index);
    report::RunReport::build(cfg, target, outcomes, wall)
}

/// Thousands of hosts need thousands of sockets: lift the soft limit on
/// open files to the hard one (best effort).
fn raise_nofile_limit() {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
            l.rlim_cur = l.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrivals() {
        assert_eq!(Arrival::All.offsets(3), vec![0.0; 3]);
        let r = Arrival::Ramp { seconds: 10.0 }.offsets(11);
        assert_eq!((r[0], r[5], r[10]), (0.0, 5.0, 10.0));
        let p = Arrival::Poisson { rate: 100.0 }.offsets(5000);
        assert!(p.windows(2).all(|w| w[0] <= w[1]));
        let mean_gap = p[4999] / 4999.0;
        assert!((0.008..0.012).contains(&mean_gap), "{mean_gap}");
    }
}
