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
            sock,
            stop.clone(),
        ));
    }
    let mut result = Ok(());
    while let Some(joined) = loops.join_next().await {
        let failed = match joined {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(e) => Some(e.to_string()),
        };
        if let Some(e) = failed {
            error!(error = %e, "dhcp: receive loop failed");
            stop.cancel();
            result = Err(RelayError::Io(std::io::Error::other(format!(
                "dhcp receive loop failed: {e}"
            ))));
        }
    }
    result
}

/// Shortest interval between two lease syncs of one socket.
const SYNC_LINGER: Duration = Duration::from_millis(2);
/// How often an idle receive thread looks at the shutdown token.
const STOP_POLL: Duration = Duration::from_millis(100);

/// One socket, served by two dedicated OS threads rather than tokio tasks:
/// a receive thread that decides and answers inline, and a sync thread that
/// makes pool leases durable in groups and then sends the answers that
/// waited for it. A blocking `recv_from` costs one system call per packet
/// and drains a burst without sleeping; the earlier tokio loop paid for an
/// `epoll_wait`, a failed `recv_from` and a task wake-up per packet, which
/// was most of its CPU in a perfdhcp storm (docs/benchmarks.md).
async fn serve_socket(
    server: Arc<Server>,
    guard: Arc<crate::limits::DhcpGuard>,
    iface: Interface,
    sock: UdpSocket,
    stop: CancellationToken,
) -> Result<(), String> {
    let name = iface.name.clone();
    let fail = |what: &str, e: std::io::Error| format!("interface {name}: {what}: {e}");
    let sock = sock
        .into_std()
        .and_then(|s| {
            s.set_nonblocking(false)?;
            s.set_read_timeout(Some(STOP_POLL))?;
            Ok(s)
        })
        .map_err(|e| fail("cannot prepare the socket", e))?;
    let send_sock = sock
        .try_clone()
        .map_err(|e| fail("cannot clone the socket", e))?;
    let queue = Arc::new(DurableQueue::default());
    // Either thread ending stops the other: a dead sync thread must not
    // leave the receive thread queueing replies nobody sends.
    let stop = stop.child_token();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<bool>();
    let sync_thread = {
        let (server, queue, iface) = (server.clone(), queue.clone(), iface.clone());
        let stop_on_exit = stop.clone();
        std::thread::Builder::new()
            .name(format!("dhcp-sync-{}", iface.name))
            .spawn(move || {
                let _stop = stop_on_exit.drop_guard();
                sync_loop(&server, &queue, &send_sock, &iface)
            })
            .map_err(|e| fail("cannot start the lease sync thread", e))?
    };
    let rx_iface = iface.clone();
    let rx_queue = queue.clone();
    let rx = std::thread::Builder::new()
        .name(format!("dhcp-rx-{}", iface.name))
        .spawn(move || {
            let received = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                receive_loop(&server, &guard, &rx_iface, &sock, &rx_queue, &stop)
            }));
            rx_queue.close();
            // The sync thread sends what is queued, then ends.
            let synced = sync_thread.join();
            let _ = done_tx.send(received.is_ok() && synced.is_ok());
        });
    if let Err(e) = rx {
        queue.close();
        return Err(fail("cannot start the receive thread", e));
    }
    // Both threads end within STOP_POLL of the token plus the last flush.
    match done_rx.await {
        Ok(true) => Ok(()),
        _ => Err(format!(
            "interface {}: the DHCP receive or lease sync thread panicked",
            iface.name
        )),
    }
}

/// Replies waiting for a group commit of the lease log.
#[derive(Default)]
struct DurableQueue {
    inner: std::sync::Mutex<DurableInner>,
    ready: std::sync::Condvar,
}

#[derive(Default)]
struct DurableInner {
    replies: Vec<Outgoing>,
    closed: bool,
    /// The sync thread sleeps on `ready` (a push must wake it).
    waiting: bool,
}

impl DurableQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, DurableInner> {
        // Pushes and takes are single operations: a poisoned queue is intact.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a reply; false when [`MAX_PENDING_FLUSHES`] are already waiting.
    fn push(&self, out: Outgoing) -> bool {
        let mut q = self.lock();
        if q.replies.len() >= MAX_PENDING_FLUSHES {
            return false;
        }
        q.replies.push(out);
        let wake = q.waiting;
        drop(q);
        if wake {
            self.ready.notify_one();
        }
        true
    }

    fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_one();
    }

    /// Everything queued (waiting for at least one); None once closed and empty.
    fn take(&self, into: &mut Vec<Outgoing>) -> Option<()> {
        let mut q = self.lock();
        loop {
            if !q.replies.is_empty() {
                std::mem::swap(&mut q.replies, into);
                return Some(());
            }
            if q.closed {
                return None;
            }
            q.waiting = true;
            q = self.ready.wait(q).unwrap_or_else(|p| p.into_inner());
            q.waiting = false;
        }
    }
}

fn receive_loop(
    server: &Server,
    guard: &crate::limits::DhcpGuard,
    iface: &Interface,
    sock: &StdUdpSocket,
    queue: &DurableQueue,
    stop: &CancellationToken,
) {
    // One byte more than we accept: a datagram that fills it was oversize.
    let mut buf = vec![0u8; RECV_BUF + 1];
    let mut last_error_log = 0u64;
    let mut last_backlog_log = 0u64;
    while !stop.is_cancelled() {
        let n = match sock.recv_from(&mut buf) {
            Ok((n, peer)) => {
                // Flood control and shape checks (limits.rs), before decoding.
                if !guard.admit(&buf[..n], buf.len(), peer, std::time::Instant::now()) {
                    continue;
                }
                n
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => {
                let now = unix_now();
                if now >= last_error_log + 60 {
                    warn!(interface = %iface.name, error = %e, "dhcp: receive error");
                    last_error_log = now;
                }
                // Never spin on a persistent error.
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        let Some(out) = server.process(iface, &buf[..n], unix_now()) else {
            continue;
        };
        if !out.flush {
            send(sock, iface, &out);
            continue;
        }
        // A new or renewed pool lease: durable before the client hears of it.
        if !queue.push(out) {
            // Only bound leases need a flush: those are REQUEST answers.
            server.ctx.metrics.dhcp("request", "dropped-flush-backlog");
            let now = unix_now();
            if now >= last_backlog_log + 60 {
                warn!(interface = %iface.name, queued = MAX_PENDING_FLUSHES, "dhcp: lease flushes are behind (slow disk?); dropping replies that need one until they catch up");
                last_backlog_log = now;
            }
        }
    }
}

/// Group commit: one flush makes everything queued so far durable, then all
/// of it is sent. Runs until the queue is closed and drained.
fn sync_loop(server: &Server, queue: &DurableQueue, sock: &StdUdpSocket, iface: &Interface) {
    let mut batch = Vec::new();
    let mut last_sync: Option<std::time::Instant> = None;
    loop {
        // At most one sync per SYNC_LINGER: on a fast disk a sync per ACK
        // (plus two context switches each) cost more CPU than answering;
        // a lease waits at most SYNC_LINGER longer for its ACK.
        if let Some(wait) = last_sync.and_then(|t| SYNC_LINGER.checked_sub(t.elapsed())) {
            std::thread::sleep(wait);
        }
        if queue.take(&mut batch).is_none() {
            break;
        }
        last_sync = Some(std::time::Instant::now());
        match server.ctx.leases.flush() {
            Ok(()) => {
                for out in batch.drain(..) {
                    send(sock, iface, &out);
                }
            }
            Err(e) => {
                error!(error = %e, replies = batch.len(), "dhcp: lease flush failed; replies not sent");
                batch.clear();
            }
        }
    }
}

fn send(sock: &StdUdpSocket, iface: &Interface, out: &Outgoing) {
    if let Err(e) = sock.send_to(&out.bytes, out.dest) {
        warn!(interface = %iface.name, dest = %out.dest, error = %e, "dhcp: send failed");
    }
}
