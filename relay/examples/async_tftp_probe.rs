//! Measures what async-tftp 0.4 does when a client probes with `tsize`, gets
//! the OACK and aborts with an ERROR packet (what PXE ROMs do before the real
//! download). async-tftp's ack loop parses only ACKs, so the client's ERROR is
//! ignored and the OACK is retransmitted until `max_send_retries` runs out.
//!
//! Run: `cargo run -p pxemesh-relay --example async_tftp_probe`
//!
//! Phase A (the measurement): server timeout 1 s, max_send_retries 5; RRQ with
//! tsize+blksize from a raw UDP socket, receive the OACK, send ERROR 0
//! "probe done", then count every packet that reaches that client socket
//! during the next 10 s.
//!
//! Phase B (consequence): the same probe, then the real RRQ (no options) from
//! the SAME client port, re-sent every second as a client does when nothing
//! comes back; async-tftp keys in-progress requests by client address, so
//! every RRQ is dropped until the aborted transfer has exhausted its retries.
//! Reports how long until the first DATA block arrives.
//!
//! Phase C (comparison): phases A and B against pxemesh's own TFTP server
//! (`pxemesh_relay::tftp`, same timeout and retries).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_tftp::server::TftpServerBuilder;
use tokio::net::UdpSocket;

const FILE: &str = "probe.bin";
const FILE_LEN: usize = 4096;

fn rrq(file: &str, opts: &[(&str, &str)]) -> Vec<u8> {
    let mut p = vec![0, 1];
    for s in [file, "octet"]
        .iter()
        .chain(opts.iter().flat_map(|(k, v)| [k, v]))
    {
        p.extend_from_slice(s.as_bytes());
        p.push(0);
    }
    p
}

fn error_packet(code: u16, msg: &str) -> Vec<u8> {
    let mut p = vec![0, 5];
    p.extend_from_slice(&code.to_be_bytes());
    p.extend_from_slice(msg.as_bytes());
    p.push(0);
    p
}

fn describe(pkt: &[u8]) -> String {
    if pkt.len() < 2 {
        return format!("short packet ({} bytes)", pkt.len());
    }
    let body = &pkt[2..];
    let strings = || {
        body.split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    };
    match u16::from_be_bytes([pkt[0], pkt[1]]) {
        3 if body.len() >= 2 => format!(
            "DATA block {} ({} bytes)",
            u16::from_be_bytes([body[0], body[1]]),
            body.len() - 2
        ),
        5 if body.len() >= 2 => {
            format!(
                "ERROR code {} {:?}",
                u16::from_be_bytes([body[0], body[1]]),
                String::from_utf8_lossy(&body[2..]).trim_end_matches('\0')
            )
        }
        6 => format!("OACK [{}]", strings()),
        op => format!("opcode {op} ({} bytes)", pkt.len()),
    }
}

/// RRQ with tsize+blksize, wait for the OACK, answer ERROR. Returns the
/// transfer's address (the server's TID).
async fn probe(client: &UdpSocket, server: SocketAddr) -> anyhow::Result<SocketAddr> {
    client
        .send_to(&rrq(FILE, &[("tsize", "0"), ("blksize", "1428")]), server)
        .await?;
    let mut buf = [0u8; 2048];
    let (n, tid) =
        tokio::time::timeout(Duration::from_secs(3), client.recv_from(&mut buf)).await??;
    println!("  got {} from {tid}", describe(&buf[..n]));
    anyhow::ensure!(n >= 2 && buf[1] == 6, "expected an OACK");
    client.send_to(&error_packet(0, "probe done"), tid).await?;
    println!("  sent ERROR 0 \"probe done\" to {tid}");
    Ok(tid)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join(FILE), vec![0x5a; FILE_LEN])?;
    let timeout = Duration::from_secs(1);
    let retries = 5;
    let server = TftpServerBuilder::with_dir_ro(dir.path())?
        .bind("127.0.0.1:0".parse()?)
        .timeout(timeout)
        .max_send_retries(retries)
        .build()
        .await?;
    let addr = server.listen_addr()?;
    tokio::spawn(async move {
        if let Err(e) = server.serve().await {
            eprintln!("async-tftp server ended: {e}");
        }
    });
    println!(
        "async-tftp 0.4 dir server on {addr} (timeout {timeout:?}, max_send_retries {retries})"
    );

    phase_a(addr).await?;
    phase_b(addr).await?;

    println!("\n=== pxemesh_relay::tftp (timeout 1 s, retries 5) ===");
    let ours = start_pxemesh(dir.path()).await?;
    phase_a(ours.0).await?;
    phase_b(ours.0).await?;
    ours.1.cancel();
    Ok(())
}

/// pxemesh's server on 127.0.0.1:0 serving `root`.
async fn start_pxemesh(
    root: &std::path::Path,
) -> anyhow::Result<(
    SocketAddr,
    tokio_util::sync::CancellationToken,
    tempfile::TempDir,
)> {
    use pxemesh_relay::{
        config::RelayConfig, events::EventLog, metrics::RelayMetrics, state, tftp,
    };
    let data_dir = tempfile::tempdir()?;
    let data = data_dir.path();
    let toml = format!(
        "name = \"probe\"\ndata_dir = \"{}\"\n[tftp]\ntimeout_ms = 1000\nretries = 5\n[boot]\ndir = \"{}\"\n",
        data.display(),
        root.display()
    );
    let config = RelayConfig::from_toml(&toml)?;
    let metrics = Arc::new(RelayMetrics::new());
    let db = sled::open(data.join("db"))?;
    let events = Arc::new(EventLog::open(&db, metrics.clone())?);
    let ctx = Arc::new(tftp::TftpContext {
        config: Arc::new(config),
        state: state::shared(state::RackState::default()),
        events,
        metrics,
        loaders: Default::default(),
        cache: None,
    });
    let socket = UdpSocket::bind("127.0.0.1:0").await?;
    let addr = socket.local_addr()?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(tftp::run(ctx, socket, shutdown.clone()));
    Ok((addr, shutdown, data_dir))
}

async fn phase_a(addr: SocketAddr) -> anyhow::Result<()> {
    // Phase A.
    println!("\nPhase A: tsize probe, then ERROR; packets at the client socket in the next 10 s");
    let client = UdpSocket::bind("127.0.0.1:0").await?;
    probe(&client, addr).await?;
    let t0 = Instant::now();
    let window = Duration::from_secs(10);
    let mut seen = Vec::new();
    let mut buf = [0u8; 2048];
    while seen.len() < 1000 {
        let Some(left) = window.checked_sub(t0.elapsed()) else {
            break;
        };
        match tokio::time::timeout(left, client.recv_from(&mut buf)).await {
            Ok(Ok((n, from))) => {
                let t = t0.elapsed();
                println!(
                    "  +{:>7.3} s  {} from {from}",
                    t.as_secs_f64(),
                    describe(&buf[..n])
                );
                seen.push((t, describe(&buf[..n])));
            }
            Ok(Err(e)) => {
                println!("  recv error: {e}");
                break;
            }
            Err(_) => break,
        }
    }
    let oacks = seen.iter().filter(|(_, d)| d.starts_with("OACK")).count();
    let errors = seen.iter().filter(|(_, d)| d.starts_with("ERROR")).count();
    println!(
        "RESULT A: {} packets in 10 s after the client's ERROR ({} OACK retransmissions, {} ERROR); last at +{:.3} s",
        seen.len(),
        oacks,
        errors,
        seen.last().map(|(t, _)| t.as_secs_f64()).unwrap_or(0.0)
    );

    Ok(())
}

async fn phase_b(addr: SocketAddr) -> anyhow::Result<()> {
    let mut buf = [0u8; 2048];

    println!("\nPhase B: probe, then the real RRQ (no options) from the same client port, re-sent every 1 s");
    let client = UdpSocket::bind("127.0.0.1:0").await?;
    probe(&client, addr).await?;
    let t0 = Instant::now();
    let limit = Duration::from_secs(20);
    let mut first_data = None;
    let mut stray = 0;
    let mut rrqs = 0;
    let mut next_rrq = t0;
    while t0.elapsed() < limit && stray < 1000 {
        if Instant::now() >= next_rrq {
            client.send_to(&rrq(FILE, &[]), addr).await?;
            rrqs += 1;
            next_rrq += Duration::from_secs(1);
        }
        let wait = next_rrq
            .saturating_duration_since(Instant::now())
            .min(limit.saturating_sub(t0.elapsed()));
        let Ok(Ok((n, from))) = tokio::time::timeout(wait, client.recv_from(&mut buf)).await else {
            continue;
        };
        let d = describe(&buf[..n]);
        println!("  +{:>7.3} s  {d} from {from}", t0.elapsed().as_secs_f64());
        if d.starts_with("DATA block 1 ") {
            first_data = Some(t0.elapsed());
            break;
        }
        stray += 1;
    }
    match first_data {
        Some(t) => println!(
            "RESULT B: first DATA of the real download after {:.3} s ({rrqs} RRQs sent, {stray} stray packets of the aborted probe before it)",
            t.as_secs_f64()
        ),
        None => println!("RESULT B: no DATA within 20 s ({rrqs} RRQs sent, {stray} stray packets)"),
    }
    Ok(())
}
