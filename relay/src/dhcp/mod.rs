//! DHCPv4 server of the relay (dhcproto).
//!
//! Reservations (MAC → IP per network) first; an optional dynamic pool per
//! network for unknown machines; PXE answers chosen by client architecture
//! and firmware (PXE ROM, iPXE, UEFI HTTP boot); relayed requests answered to
//! the relay agent with option 82 echoed verbatim.
//!
//! Layout: [`packet`] (bytes ↔ messages, validation), [`handler`] (the
//! decision chain, no sockets), [`leases`] (the sled-backed pool), and here
//! the sockets and receive loops.

pub mod handler;
pub mod leaselog;
pub mod leases;
pub mod packet;

#[cfg(test)]
mod tests;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket as StdUdpSocket};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

pub use handler::{Handled, Outgoing, Server};
pub use leases::{Lease, LeaseState, Leases};
pub use packet::{Reply, Request};

use crate::config::{Interface, RelayConfig};
use crate::error::RelayError;
use crate::events::EventLog;
use crate::metrics::RelayMetrics;
use crate::state::SharedState;

pub struct DhcpContext {
    pub config: Arc<RelayConfig>,
    pub state: SharedState,
    pub leases: Leases,
    pub events: Arc<EventLog>,
    pub metrics: Arc<RelayMetrics>,
    /// Which clients just fetched our boot loader (`boot.chainload_ipxe`).
    pub loaders: Arc<crate::boot::LoaderTracker>,
}

/// Largest datagram read (jumbo-frame DHCP is still far below this).
const RECV_BUF: usize = 4096;
/// Replies waiting for a lease flush, per socket (each a few hundred bytes).
/// When it is full the reply is dropped and counted
/// (`dhcp_messages{outcome="dropped-flush-backlog"}`): the client retransmits
/// its REQUEST, and receiving never stops behind a slow disk (DISCOVERs
/// need no flush and keep being answered).
const MAX_PENDING_FLUSHES: usize = 4096;

/// Bind the DHCP socket of one interface: `0.0.0.0:port`, SO_REUSEADDR,
/// SO_BROADCAST, SO_BINDTODEVICE (skipped for "lo" or an empty name, for
/// loopback tests), nonblocking. One socket per interface is how broadcasts
/// are told apart by arrival interface.
pub fn bind(iface: &Interface, port: u16) -> std::io::Result<StdUdpSocket> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.set_broadcast(true)?;
    // A boot storm arrives as a burst; the default ~200 KiB buffer overflowed
    // in our perfdhcp runs (kernel drops before a single reply was late).
    // The kernel caps this at net.core.rmem_max (see docs/operations.md).
    let _ = s.set_recv_buffer_size(crate::net::STORM_RCVBUF);
    if !iface.name.is_empty() && iface.name != "lo" {
        s.bind_device(Some(iface.name.as_bytes())).map_err(|e| {
            std::io::Error::new(e.kind(), format!("SO_BINDTODEVICE {}: {e}", iface.name))
        })?;
    }
    let addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port));
    s.bind(&addr.into()).map_err(|e| {
        std::io::Error::new(e.kind(), format!("bind {addr} on {}: {e}", iface.name))
    })?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Serve until `shutdown` is cancelled: one receive loop per socket.
pub async fn run(
    ctx: Arc<DhcpContext>,
    sockets: Vec<(Interface, UdpSocket)>,
    shutdown: CancellationToken,
) -> Result<(), RelayError> {
    if sockets.is_empty() {
        warn!("dhcp: no sockets to serve");
        shutdown.cancelled().await;
        return Ok(());
    }
    let guard = Arc::new(crate::limits::DhcpGuard::new(
        &ctx.config.limits,
        ctx.metrics.clone(),
    ));
    let server = Arc::new(Server::new(ctx));
    // A loop that dies stops its siblings (not the rest of the relay).
    let stop = shutdown.child_token();
    let mut loops = tokio::task::JoinSet::new();
    for (iface, sock) in sockets {
        info!(interface = %iface.name, address = %iface.address, port = sock.local_addr().map(|a| a.port()).unwrap_or(0), "dhcp: serving");
        loops.spawn(serve_socket(
            server.clone(),
            guard.clone(),
            iface,
            Arc::new(sock),
            stop.clone(),
        ));
    }
    let mut result = Ok(());
    while let Some(joined) = loops.join_next().await {
        if let Err(e) = joined {
            error!(error = %e, "dhcp: receive loop failed");
            stop.cancel();
            result = Err(RelayError::Io(std::io::Error::other(format!(
                "dhcp receive loop failed: {e}"
            ))));
        }
    }
    result
}

async fn serve_socket(
    server: Arc<Server>,
    guard: Arc<crate::limits::DhcpGuard>,
    iface: Interface,
    sock: Arc<UdpSocket>,
    stop: CancellationToken,
) {
    // One byte more than we accept: a datagram that fills it was oversize.
    let mut buf = vec![0u8; RECV_BUF + 1];
    // Group commit: replies that need a durable lease wait in this queue; one
    // flusher makes everything queued so far durable with a single flush and
    // then sends all of it. A full queue applies back-pressure to receiving.
    let (durable_tx, mut durable_rx) = tokio::sync::mpsc::channel::<Outgoing>(MAX_PENDING_FLUSHES);
    let flusher = {
        let (server, sock, iface) = (server.clone(), sock.clone(), iface.clone());
        tokio::spawn(async move {
            let mut batch = Vec::new();
            while let Some(first) = durable_rx.recv().await {
                batch.push(first);
                while let Ok(more) = durable_rx.try_recv() {
                    batch.push(more);
                }
                match server.ctx.leases.flush_async().await {
                    Ok(()) => {
                        for out in batch.drain(..) {
                            send(&sock, &iface, &out).await;
                        }
                    }
                    Err(e) => {
                        error!(error = %e, replies = batch.len(), "dhcp: lease flush failed; replies not sent");
                        batch.clear();
                    }
                }
            }
        })
    };
    let mut last_error_log = 0u64;
    let mut last_backlog_log = 0u64;
    loop {
        let received = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            r = sock.recv_from(&mut buf) => r,
        };
        let n = match received {
            Ok((n, peer)) => {
                // Flood control and shape checks (limits.rs), before decoding.
                if !guard.admit(&buf[..n], buf.len(), peer, std::time::Instant::now()) {
                    continue;
                }
                n
            }
            Err(e) => {
                let now = unix_now();
                if now >= last_error_log + 60 {
                    warn!(interface = %iface.name, error = %e, "dhcp: receive error");
                    last_error_log = now;
                }
                // Never spin on a persistent error.
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
                continue;
            }
        };
        let Some(out) = server.process(&iface, &buf[..n], unix_now()) else {
            continue;
        };
        if !out.flush {
            send(&sock, &iface, &out).await;
            continue;
        }
        // A new or renewed pool lease: durable before the client hears of it.
        match durable_tx.try_send(out) {
            Ok(()) => {}
            Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                // Only bound leases need a flush: those are REQUEST answers.
                server.ctx.metrics.dhcp("request", "dropped-flush-backlog");
                let now = unix_now();
                if now >= last_backlog_log + 60 {
                    warn!(interface = %iface.name, queued = MAX_PENDING_FLUSHES, "dhcp: lease flushes are behind (slow disk?); dropping replies that need one until they catch up");
                    last_backlog_log = now;
                }
            }
            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => break,
        }
    }
    // Let the flusher finish what is queued, bounded.
    drop(durable_tx);
    let _ = tokio::time::timeout(Duration::from_secs(5), flusher).await;
}

async fn send(sock: &UdpSocket, iface: &Interface, out: &Outgoing) {
    if let Err(e) = sock.send_to(&out.bytes, out.dest).await {
        warn!(interface = %iface.name, dest = %out.dest, error = %e, "dhcp: send failed");
    }
}
