//! Single-protocol drivers built from the storm's clients:
//! * [`tftp`] / [`http`]: `count` fetches of one file, `concurrency` in flight;
//! * [`dhcp_sweep`]: DORA exchanges of reserved hosts at a series of rates,
//!   each rate for a fixed time, one attempt each (no retransmission: a lost
//!   packet is a lost exchange, as perfdhcp counts it).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::dhcp::{self, ClientKind, Dhcp};
use super::fleet::Fleet;
use super::report::Latency;
use super::{http as httpc, tftp as tftpc};

/// Result of a fetch driver.
#[derive(Debug, Clone, Serialize)]
pub struct FetchReport {
    pub what: String,
    pub count: usize,
    pub concurrency: usize,
    pub ok: usize,
    pub failed: usize,
    pub seconds: f64,
    pub bytes: u64,
    pub mib_per_s: f64,
    pub latency_ms: Latency,
    pub failures_by_cause: BTreeMap<String, u64>,
}

impl FetchReport {
    pub fn to_text(&self) -> String {
        let l = &self.latency_ms;
        let mut s = format!(
            "{}: {}/{} ok, {} in flight, {:.2} s, {:.1} MiB/s; latency p50 {:.1} p90 {:.1} p99 {:.1} max {:.1} ms\n",
            self.what, self.ok, self.count, self.concurrency, self.seconds, self.mib_per_s, l.p50, l.p90, l.p99, l.max
        );
        for (c, n) in &self.failures_by_cause {
            s.push_str(&format!("  {n:>6}  {c}\n"));
        }
        s
    }
}

async fn fetch_many<F, Fut>(
    what: String,
    count: usize,
    concurrency: usize,
    one: F,
) -> anyhow::Result<FetchReport>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<u64, String>> + Send + 'static,
{
    let one = Arc::new(one);
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let t0 = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..count {
        let permit = sem.clone().acquire_owned().await?;
        let one = one.clone();
        set.spawn(async move {
            let started = Instant::now();
            let r = one().await;
            drop(permit);
            (started.elapsed(), r)
        });
    }
    let mut lat = Vec::new();
    let mut causes = BTreeMap::new();
    let mut bytes = 0;
    while let Some(j) = set.join_next().await {
        match j {
            Ok((d, Ok(b))) => {
                bytes += b;
                lat.push(d.as_secs_f64() * 1e3);
            }
            Ok((_, Err(c))) => *causes.entry(c).or_insert(0) += 1,
            Err(e) => *causes.entry(format!("task: {e}")).or_insert(0) += 1,
        }
    }
    let seconds = t0.elapsed().as_secs_f64().max(1e-6);
    Ok(FetchReport {
        what,
        count,
        concurrency,
        ok: lat.len(),
        failed: count - lat.len(),
        seconds,
        bytes,
        mib_per_s: bytes as f64 / 1048576.0 / seconds,
        latency_ms: Latency::of(lat.into_iter())?,
        failures_by_cause: causes,
    })
}

pub async fn tftp(
    server: SocketAddr,
    file: String,
    opts: tftpc::TftpOptions,
    count: usize,
    concurrency: usize,
) -> anyhow::Result<FetchReport> {
    let what = format!("tftp {file} from {server}");
    fetch_many(what, count, concurrency, move || {
        let (file, opts) = (file.clone(), opts.clone());
        async move {
            tftpc::fetch(server, Ipv4Addr::UNSPECIFIED, &file, &opts, false)
                .await
                .map(|f| f.bytes)
                .map_err(|e| e.to_string())
        }
    })
    .await
}

pub async fn http(
    url: String,
    idle: Duration,
    count: usize,
    concurrency: usize,
) -> anyhow::Result<FetchReport> {
    let what = format!("http {url}");
    fetch_many(what, count, concurrency, move || {
        let url = url.clone();
        async move {
            httpc::get(&url, Ipv4Addr::UNSPECIFIED, false, idle)
                .await
                .map(|g| g.bytes)
                .map_err(|e| e.cause())
        }
    })
    .await
}

/// One rate of a DHCP sweep.
#[derive(Debug, Clone, Serialize)]
pub struct RatePoint {
    pub rate: f64,
    pub started: u64,
    pub completed: u64,
    /// No OFFER, or no ACK, within the timeout (one attempt each).
    pub lost: u64,
    pub nak: u64,
    pub lost_pct: f64,
    pub achieved_per_s: f64,
    pub latency_ms: Latency,
}

#[derive(Debug, Clone, Serialize)]
pub struct SweepReport {
    pub hosts: usize,
    pub seconds_per_rate: f64,
    pub max_lost_pct: f64,
    pub points: Vec<RatePoint>,
    /// Highest rate with at most `max_lost_pct` lost.
    pub best_rate: Option<f64>,
}

impl SweepReport {
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "DHCP sweep over {} reserved hosts, {} s per rate (pass: <= {} % lost)\n  rate/s  started  done  lost  lost%  DORA/s  p50 ms  p99 ms\n",
            self.hosts, self.seconds_per_rate, self.max_lost_pct
        );
        for p in &self.points {
            s.push_str(&format!(
                "  {:>6} {:>8} {:>5} {:>5} {:>6.2} {:>7.1} {:>7.2} {:>7.2}\n",
                p.rate,
                p.started,
                p.completed,
                p.lost,
                p.lost_pct,
                p.achieved_per_s,
                p.latency_ms.p50,
                p.latency_ms.p99
            ));
        }
        s.push_str(&format!(
            "highest passing rate: {}\n",
            self.best_rate
                .map(|r| format!("{r}/s"))
                .unwrap_or_else(|| "none".into())
        ));
        s
    }
}

enum Dora {
    Done(Duration),
    Lost,
    Nak,
}

async fn one_dora(d: Arc<Dhcp>, mac: [u8; 6], wait: Duration) -> Dora {
    let started = Instant::now();
    let xid: u32 = rand::random();
    let mut g = d.listen(xid);
    let gi = d.giaddr();
    let disc = dhcp::encode_request(dhcp::DISCOVER, xid, 0, mac, gi, ClientKind::PxeRom, None);
    if d.send(&disc).await.is_err() {
        return Dora::Lost;
    }
    let deadline = tokio::time::Instant::now() + wait;
    let offer = loop {
        match tokio::time::timeout_at(deadline, g.rx.recv()).await {
            Ok(Some(r)) if r.msg_type == dhcp::OFFER => break r,
            Ok(Some(_)) => continue,
            _ => return Dora::Lost,
        }
    };
    let server = offer.server_id.unwrap_or(offer.siaddr);
    let req = dhcp::encode_request(
        dhcp::REQUEST,
        xid,
        0,
        mac,
        gi,
        ClientKind::PxeRom,
        Some((offer.yiaddr, server)),
    );
    if d.send(&req).await.is_err() {
        return Dora::Lost;
    }
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, g.rx.recv()).await {
            Ok(Some(r)) if r.msg_type == dhcp::ACK => return Dora::Done(started.elapsed()),
            Ok(Some(r)) if r.msg_type == dhcp::NAK => return Dora::Nak,
            Ok(Some(_)) => continue,
            _ => return Dora::Lost,
        }
    }
}

/// For each rate: start DORA exchanges of the fleet's (reserved) hosts, in
/// turn, at that rate for `seconds`; wait `wait` for each answer.
pub async fn dhcp_sweep(
    mode: &dhcp::Mode,
    fleet: &Fleet,
    rates: &[f64],
    seconds: f64,
    wait: Duration,
    max_lost_pct: f64,
) -> anyhow::Result<SweepReport> {
    let stop = CancellationToken::new();
    let _guard = stop.clone().drop_guard();
    let d = Dhcp::start(mode, stop.clone())?;
    let hosts = fleet.hosts();
    let mut points = Vec::new();
    let mut next = 0usize;
    for &rate in rates {
        if rate <= 0.0 {
            anyhow::bail!("rates must be > 0");
        }
        let n = (rate * seconds).round().max(1.0) as u64;
        let t0 = tokio::time::Instant::now();
        let mut set = JoinSet::new();
        for i in 0..n {
            tokio::time::sleep_until(t0 + Duration::from_secs_f64(i as f64 / rate)).await;
            let mac = hosts[next % hosts.len()].mac;
            next += 1;
            set.spawn(one_dora(d.clone(), mac, wait));
        }
        let (mut lat, mut lost, mut nak) = (Vec::new(), 0, 0);
        while let Some(j) = set.join_next().await {
            match j {
                Ok(Dora::Done(t)) => lat.push(t.as_secs_f64() * 1e3),
                Ok(Dora::Nak) => nak += 1,
                _ => lost += 1,
            }
        }
        let elapsed = t0.elapsed().as_secs_f64().max(1e-6);
        let completed = lat.len() as u64;
        points.push(RatePoint {
            rate,
            started: n,
            completed,
            lost,
            nak,
            lost_pct: (lost + nak) as f64 * 100.0 / n as f64,
            achieved_per_s: completed as f64 / elapsed,
            latency_ms: Latency::of(lat.into_iter())?,
        });
    }
    let best_rate = points
        .iter()
        .filter(|p| p.lost_pct <= max_lost_pct)
        .map(|p| p.rate)
        .fold(None, |a: Option<f64>, r| Some(a.map_or(r, |a| a.max(r))));
    Ok(SweepReport {
        hosts: hosts.len(),
        seconds_per_rate: seconds,
        max_lost_pct,
        points,
        best_rate,
    })
}
