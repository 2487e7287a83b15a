//! Read-only TFTP server (RFC 1350, options RFC 2347/2348/2349, windowsize
//! RFC 7440) on tokio.
//!
//! Written instead of using async-tftp 0.4, whose ACK loop ignores a client's
//! ERROR: a PXE ROM that probes with `tsize` and aborts the OACK with ERROR
//! (normal firmware behaviour) made it retransmit the OACK until its retry
//! budget ran out, and a new request from the same client port was dropped
//! meanwhile (measured by `relay/examples/async_tftp_probe.rs`).
//!
//! The main socket only receives requests. Each transfer runs in its own task
//! on its own ephemeral socket bound to the main socket's IP. Files come from
//! `boot.dir` (never outside it); `pxelinux.cfg/01-<mac>` and `<mac>.ipxe` are
//! rendered from the rack state.

pub mod files;
pub mod options;
pub mod packet;
pub mod transfer;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use pxemesh_coordinator::model::Mac;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::error::RelayError;
use crate::events::EventKind;
use files::{Refusal, Rendered, Source};
use packet::{code, Packet, Request};
use transfer::{Link, Outcome, Params};

/// What the TFTP service needs from the relay.
pub struct TftpContext {
    pub config: Arc<crate::config::RelayConfig>,
    pub state: crate::state::SharedState,
    pub events: Arc<crate::events::EventLog>,
    pub metrics: Arc<crate::metrics::RelayMetrics>,
    /// Notified when a client finished fetching a boot loader (`boot.chainload_ipxe`).
    pub loaders: Arc<crate::boot::LoaderTracker>,
    /// Image cache (sync mode): serves `images/<image>/<path>`.
    pub cache: Option<Arc<crate::cache::BlobCache>>,
}

/// Transfer phases, as seen by the request dispatcher.
const PHASE_NEGOTIATING: u8 = 0;
const PHASE_DATA: u8 = 1;
const PHASE_DONE: u8 = 2;

/// How long a repeated, identical RRQ waits for the transfer it repeats to
/// end (the client's ERROR may still be queued on the transfer socket).
const REPEAT_GRACE: Duration = Duration::from_millis(100);

/// Bound on waiting for transfers to notice shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

struct Entry {
    id: u64,
    /// The request datagram, to tell a retransmitted RRQ from a new one.
    key: Vec<u8>,
    phase: Arc<AtomicU8>,
    cancel: CancellationToken,
    finished: CancellationToken,
    /// A repeated RRQ is already waiting for this transfer to end.
    repeat_waiting: bool,
}

struct Server {
    ctx: Arc<TftpContext>,
    main: Arc<UdpSocket>,
    local: SocketAddr,
    table: Mutex<HashMap<SocketAddr, Entry>>,
    next_id: AtomicU64,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    /// Per-client and total transfer caps (`limits.tftp_per_client`).
    slots: crate::limits::TransferSlots,
}

/// Serve TFTP on `socket` until `shutdown` is cancelled; running transfers
/// are stopped too.
pub async fn run(
    ctx: Arc<TftpContext>,
    socket: UdpSocket,
    shutdown: CancellationToken,
) -> Result<(), RelayError> {
    let local = socket.local_addr()?;
    let server = Arc::new(Server {
        main: Arc::new(socket),
        local,
        table: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(1),
        shutdown: shutdown.clone(),
        tracker: TaskTracker::new(),
        slots: crate::limits::TransferSlots::new(
            ctx.config.limits.tftp_per_client,
            ctx.config.tftp.max_transfers,
        ),
        ctx,
    });
    info!(%local, root = %server.ctx.config.boot.dir.display(), "TFTP server listening");
    let mut buf = vec![0u8; 65536];
    let mut last_error_log: Option<Instant> = None;
    loop {
        let r = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = server.main.recv_from(&mut buf) => r,
        };
        match r {
            Ok((n, peer)) => server.dispatch(&buf[..n], peer),
            Err(e) => {
                if last_error_log.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    warn!(error = %e, "TFTP receive error");
                    last_error_log = Some(Instant::now());
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                }
            }
        }
    }
    server.tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, server.tracker.wait())
        .await
        .is_err()
    {
        warn!("TFTP transfers still running after shutdown grace period");
    }
    info!("TFTP server stopped");
    Ok(())
}

impl Server {
    fn table(&self) -> MutexGuard<'_, HashMap<SocketAddr, Entry>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reply from the main socket (errors to requests that start no transfer).
    fn reply(&self, peer: SocketAddr, code: u16, message: &str) {
        if let Err(e) = self.main.try_send_to(&packet::error(code, message), peer) {
            debug!(client = %peer, error = %e, "TFTP error reply not sent");
        }
    }

    fn dispatch(self: &Arc<Self>, datagram: &[u8], peer: SocketAddr) {
        match Packet::parse(datagram) {
            Ok(Packet::Rrq(req)) => {
                if req.mode != "octet" && req.mode != "netascii" {
                    debug!(client = %peer, mode = ?req.mode, "TFTP request with unsupported mode");
                    self.ctx.metrics.tftp("bad-mode");
                    self.reply(peer, code::ILLEGAL_OPERATION, "unsupported transfer mode");
                    return;
                }
                self.admit(peer, datagram.to_vec(), req, true);
            }
            Ok(Packet::Wrq(req)) => {
                info!(client = %peer, path = ?req.filename, "TFTP write request refused");
                self.ctx.metrics.tftp("wrq-refused");
                self.reply(peer, code::ACCESS_VIOLATION, "read-only server");
            }
            Ok(_) => {
                // DATA/ACK/ERROR/OACK belong on a transfer port, not here.
                debug!(client = %peer, "TFTP non-request packet on the server port ignored");
                self.ctx.metrics.tftp("stray");
            }
            Err(e) => {
                debug!(client = %peer, error = %e, "malformed TFTP packet");
                self.ctx.metrics.tftp("malformed");
                self.ctx
                    .metrics
                    .limits
                    .drop("tftp", crate::limits::DropReason::Malformed);
                if matches!(
                    packet::opcode(datagram),
                    Some(packet::OP_RRQ | packet::OP_WRQ)
                ) {
                    self.reply(peer, code::ILLEGAL_OPERATION, "malformed request");
                }
            }
        }
    }

    /// Start a transfer for an RRQ, unless it repeats one in progress.
    ///
    /// A client never runs two transfers from one port, so an RRQ from the
    /// port of a running transfer is either a retransmission (identical
    /// datagram: ignored, the transfer's own retransmission answers it) or a
    /// new request after the client gave up on the old one (different
    /// datagram: the old transfer is cancelled). An identical RRQ while the
    /// old transfer still waits for its first ACK may follow a client ERROR
    /// that the transfer has not read yet: it waits briefly for that transfer
    /// to end and is then served.
    fn admit(self: &Arc<Self>, peer: SocketAddr, key: Vec<u8>, req: Request, may_wait: bool) {
        if self.shutdown.is_cancelled() {
            return;
        }
        let mut table = self.table();
        if let Some(e) = table.get_mut(&peer) {
            let phase = e.phase.load(Ordering::Acquire);
            if phase != PHASE_DONE {
                if e.key == key {
                    if phase == PHASE_NEGOTIATING && may_wait && !e.repeat_waiting {
                        e.repeat_waiting = true;
                        let finished = e.finished.clone();
                        drop(table);
                        let me = Arc::clone(self);
                        self.tracker.spawn(async move {
                            if tokio::time::timeout(REPEAT_GRACE, finished.cancelled())
                                .await
                                .is_ok()
                            {
                                me.admit(peer, key, req, false);
                            } else {
                                debug!(client = %peer, "TFTP duplicate RRQ ignored");
                                me.ctx.metrics.tftp("duplicate-rrq");
                            }
                        });
                        return;
                    }
                    debug!(client = %peer, "TFTP duplicate RRQ ignored");
                    self.ctx.metrics.tftp("duplicate-rrq");
                    return;
                }
                debug!(client = %peer, path = ?req.filename, "TFTP new request from a busy client port supersedes its transfer");
                e.cancel.cancel();
            }
        } else if table.len() >= self.ctx.config.tftp.max_transfers {
            drop(table);
            debug!(client = %peer, "TFTP server busy");
            self.ctx.metrics.tftp("busy");
            self.ctx
                .metrics
                .limits
                .drop("tftp", crate::limits::DropReason::TransferCap);
            self.reply(peer, code::NOT_DEFINED, "server busy");
            return;
        }
        let slot = match self.slots.try_acquire(peer.ip()) {
            Ok(s) => s,
            Err(why) => {
                drop(table);
                debug!(client = %peer, reason = why.label(), "TFTP transfer cap reached");
                self.ctx.metrics.tftp("busy");
                self.ctx.metrics.limits.drop("tftp", why);
                self.reply(peer, code::NOT_DEFINED, "server busy");
                return;
            }
        };
        let entry = Entry {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            key,
            phase: Arc::new(AtomicU8::new(PHASE_NEGOTIATING)),
            cancel: self.shutdown.child_token(),
            finished: CancellationToken::new(),
            repeat_waiting: false,
        };
        let guard = ActiveGuard {
            server: Arc::clone(self),
            peer,
            id: entry.id,
            phase: entry.phase.clone(),
            finished: entry.finished.clone(),
            _slot: slot,
        };
        self.ctx.metrics.tftp_active.inc();
        let cancel = entry.cancel.clone();
        table.insert(peer, entry);
        drop(table);
        let me = Arc::clone(self);
        self.tracker
            .spawn(async move { me.transfer(guard, peer, req, cancel).await });
    }

    async fn transfer(
        &self,
        guard: ActiveGuard,
        peer: SocketAddr,
        req: Request,
        cancel: CancellationToken,
    ) {
        let started = Instant::now();
        let metrics = &self.ctx.metrics;
        let sock = match UdpSocket::bind(SocketAddr::new(self.local.ip(), 0)).await {
            Ok(s) => s,
            Err(e) => {
                warn!(client = %peer, error = %e, "TFTP cannot bind a transfer socket");
                metrics.tftp("io-error");
                self.reply(peer, code::NOT_DEFINED, "server error");
                return;
            }
        };
        let netascii = req.mode == "netascii";
        let opened = match self.open(&sock, peer, &req.filename, netascii).await {
            Ok(o) => o,
            Err(Refusal::AccessViolation(reason)) => {
                warn!(client = %peer, path = ?req.filename, reason, "TFTP access violation");
                metrics.tftp("access-violation");
                let _ = sock
                    .send_to(
                        &packet::error(code::ACCESS_VIOLATION, "access violation"),
                        peer,
                    )
                    .await;
                return;
            }
            Err(Refusal::NotFound(text)) => {
                debug!(client = %peer, path = ?req.filename, reason = text, "TFTP file not found");
                metrics.tftp("not-found");
                let _ = sock
                    .send_to(&packet::error(code::FILE_NOT_FOUND, &text), peer)
                    .await;
                return;
            }
        };
        let mut source = opened.source;
        let cfg = &self.ctx.config.tftp;
        let limits = options::Limits {
            max_blksize: cfg.max_blksize,
            max_windowsize: cfg.max_windowsize,
            default_timeout: Duration::from_millis(cfg.timeout_ms.max(1)),
        };
        let neg = options::negotiate(&req.options, &limits, opened.tsize);
        let params = Params {
            blksize: neg.blksize,
            windowsize: neg.windowsize,
            timeout: neg.timeout,
            retries: cfg.retries,
        };
        let oack = (!neg.oack.is_empty()).then(|| packet::oack(&neg.oack));
        debug!(client = %peer, path = %opened.rel, blksize = neg.blksize, windowsize = neg.windowsize, oack = ?neg.oack, "TFTP transfer starts");
        let mut link = Link::new(&sock, peer, &cancel, &self.shutdown, metrics);
        let phase = guard.phase.clone();
        let outcome = link
            .serve(params, oack, &mut source, || {
                phase.store(PHASE_DATA, Ordering::Release)
            })
            .await;
        // Release the client port for a new request before the bookkeeping.
        guard.finish();
        metrics.tftp(outcome.label());
        let elapsed = started.elapsed();
        match &outcome {
            Outcome::Ok => {
                metrics.tftp_seconds.observe(elapsed.as_secs_f64());
                if let std::net::IpAddr::V4(ip) = peer.ip() {
                    if crate::boot::is_loader(&opened.rel, &self.ctx.config.boot) {
                        self.ctx.loaders.loaded(ip);
                    }
                }
                let mac = opened.mac.or_else(|| self.mac_of_ip(peer.ip()));
                let mac = mac.map(|m| m.to_string());
                self.ctx.events.record(
                    mac.as_deref().unwrap_or("-"),
                    EventKind::TftpFile,
                    &opened.rel,
                );
                debug!(client = %peer, path = %opened.rel, seconds = elapsed.as_secs_f64(), "TFTP transfer complete");
            }
            Outcome::ClientAbort { code, message } => {
                debug!(client = %peer, path = %opened.rel, code, message, "TFTP client aborted after OACK (tsize probe)");
            }
            Outcome::ClientError { code, message } => {
                info!(client = %peer, path = %opened.rel, code, message, "TFTP client ended the transfer with an error");
            }
            Outcome::Timeout => {
                info!(client = %peer, path = %opened.rel, retries = cfg.retries, "TFTP transfer abandoned: client stopped answering");
            }
            Outcome::Superseded | Outcome::Shutdown => {
                debug!(client = %peer, path = %opened.rel, outcome = outcome.label(), "TFTP transfer stopped");
            }
            Outcome::Io(e) => {
                warn!(client = %peer, path = %opened.rel, error = %e, "TFTP transfer failed reading the file");
            }
        }
        drop(guard);
    }

    /// Resolve a requested name to content.
    async fn open(
        &self,
        sock: &UdpSocket,
        peer: SocketAddr,
        name: &str,
        netascii: bool,
    ) -> Result<Opened, Refusal> {
        let rel = files::sanitize(name).map_err(Refusal::AccessViolation)?;
        let mut unknown_host = None;
        if let Some(r) = files::rendered(&rel) {
            match self.render(r, sock, peer)? {
                Some(text) => {
                    let data = if netascii {
                        files::to_netascii(text.as_bytes())
                    } else {
                        text.into_bytes()
                    };
                    return Ok(Opened {
                        tsize: Some(data.len() as u64),
                        source: Source::memory(data),
                        mac: Some(r.mac()),
                        rel,
                    });
                }
                None => unknown_host = Some(r.mac()),
            }
        }
        if let Some(cache) = &self.ctx.cache {
            let found = crate::cache::resolve(&self.ctx.state.load(), &rel);
            if let Some((digest, _)) = found {
                return match cache.open_blob(&digest).await {
                    Ok((file, size)) => Ok(Opened {
                        source: Source::file(tokio::fs::File::from_std(file), netascii),
                        tsize: (!netascii).then_some(size),
                        mac: None,
                        rel,
                    }),
                    Err(e) => {
                        warn!(client = %peer, path = %rel, error = %e, "TFTP: image file unavailable");
                        Err(Refusal::NotFound(format!("image file unavailable: {e}")))
                    }
                };
            }
        }
        // An unknown host's rendered name may still exist as a file on disk.
        match (
            files::open_in_root(&self.ctx.config.boot.dir, &rel).await,
            unknown_host,
        ) {
            (Ok((file, size)), _) => Ok(Opened {
                source: Source::file(file, netascii),
                tsize: (!netascii).then_some(size),
                mac: None,
                rel,
            }),
            (Err(Refusal::NotFound(_)), Some(mac)) => {
                Err(Refusal::NotFound(format!("unknown host {mac}")))
            }
            (Err(e), _) => Err(e),
        }
    }

    /// The per-host file, or `None` for a MAC the rack does not know.
    fn render(
        &self,
        r: Rendered,
        sock: &UdpSocket,
        peer: SocketAddr,
    ) -> Result<Option<String>, Refusal> {
        let state = self.ctx.state.load();
        let Some(host) = state.host_by_mac(&r.mac()) else {
            return Ok(None);
        };
        let profile = state.profile_of(host);
        let text = match r {
            Rendered::Pxelinux(_) => crate::boot::pxelinux_config(host, profile),
            Rendered::Ipxe(_) => {
                let from_config = state
                    .network(&host.network)
                    .and_then(|n| self.ctx.config.address_for(n));
                let addr = from_config
                    .or_else(|| local_ipv4(sock, peer))
                    .ok_or_else(|| {
                        Refusal::NotFound(format!(
                            "no relay address for network {} of host {}",
                            host.network, host.name
                        ))
                    })?;
                crate::boot::ipxe_script(
                    host,
                    profile,
                    &crate::boot::http_base(addr, self.ctx.config.http_port()),
                )
            }
        };
        text.map(Some).map_err(|e| Refusal::NotFound(e.0))
    }

    /// The host whose reserved address sent the request (for boot events of
    /// files that do not name the MAC).
    fn mac_of_ip(&self, ip: IpAddr) -> Option<Mac> {
        let IpAddr::V4(ip) = ip else { return None };
        self.ctx.state.load().host_by_ip(ip).map(|h| h.mac)
    }
}

/// The relay's IPv4 address as the client sees it: the transfer socket's
/// address, or (socket on 0.0.0.0) the source address the kernel picks to
/// reach the client.
fn local_ipv4(sock: &UdpSocket, peer: SocketAddr) -> Option<Ipv4Addr> {
    if let Ok(SocketAddr::V4(a)) = sock.local_addr() {
        if !a.ip().is_unspecified() {
            return Some(*a.ip());
        }
    }
    let probe = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    probe.connect(peer).ok()?;
    match probe.local_addr().ok()? {
        SocketAddr::V4(a) if !a.ip().is_unspecified() => Some(*a.ip()),
        _ => None,
    }
}

struct Opened {
    source: Source,
    /// Size to report for `tsize` (unknown for netascii from disk).
    tsize: Option<u64>,
    /// MAC named by a rendered file.
    mac: Option<Mac>,
    /// Sanitized name (for logs and events).
    rel: String,
}

/// Frees a transfer's slot and client port when the transfer task ends,
/// however it ends.
struct ActiveGuard {
    server: Arc<Server>,
    peer: SocketAddr,
    id: u64,
    phase: Arc<AtomicU8>,
    finished: CancellationToken,
    /// Freed with the guard, when the transfer task ends.
    _slot: crate::limits::Slot,
}

impl ActiveGuard {
    fn finish(&self) {
        self.phase.store(PHASE_DONE, Ordering::Release);
        self.finished.cancel();
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.finish();
        let mut table = self.server.table();
        if table.get(&self.peer).is_some_and(|e| e.id == self.id) {
            table.remove(&self.peer);
        }
        drop(table);
        self.server.ctx.metrics.tftp_active.dec();
    }
}
