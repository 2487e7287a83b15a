//! The decision chain, free of sockets: classify → pick network → identify
//! the client (reservation, pool, unknown) → pick the address → build the
//! reply → choose its destination. [`Server::process`] wraps it with decoding,
//! metrics and encoding, so a unit test drives the whole server with bytes.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};

use dhcproto::v4::{DhcpOption, Message, MessageType, Opcode, OptionCode};
use pxemesh_coordinator::model::{Host, Mac, Network};
use tracing::{debug, info, warn};

use super::leases::{in_pool, Commit};
use super::packet::{self, msg_type_name, requested_ip, server_id, Reply, Request};
use super::DhcpContext;
use crate::boot::{self, BootTarget, ClientArch};
use crate::config::Interface;
use crate::state::RackState;

/// What became of one packet.
#[derive(Debug)]
pub struct Handled {
    /// Metric label of the received message type.
    pub msg_type: &'static str,
    /// Metric label of what we did (offer, ack, nak, ignored-..., ...).
    pub outcome: &'static str,
    pub reply: Option<Reply>,
    /// A pool lease was bound: the lease store must be flushed before the
    /// reply is sent.
    pub flush: bool,
}

impl Handled {
    fn ignore(msg_type: &'static str, outcome: &'static str) -> Handled {
        Handled {
            msg_type,
            outcome,
            reply: None,
            flush: false,
        }
    }
}

/// An encoded reply ready for the socket.
#[derive(Debug)]
pub struct Outgoing {
    pub bytes: Vec<u8>,
    pub dest: SocketAddr,
    pub flush: bool,
}

/// Rate limit for log lines about one client: one per MAC and reason per
/// minute (the metric still counts every packet).
pub(crate) struct LogLimiter {
    seen: Mutex<HashMap<(Mac, &'static str), u64>>,
}

const LOG_EVERY_SECS: u64 = 60;
const LOG_LIMITER_MAX: usize = 16_384;

impl LogLimiter {
    pub(crate) fn new() -> LogLimiter {
        LogLimiter {
            seen: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn allow(&self, mac: Mac, why: &'static str, now: u64) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(last) = seen.get(&(mac, why)) {
            if now < last.saturating_add(LOG_EVERY_SECS) {
                return false;
            }
        }
        if seen.len() >= LOG_LIMITER_MAX {
            seen.retain(|_, t| now < t.saturating_add(LOG_EVERY_SECS));
            if seen.len() >= LOG_LIMITER_MAX {
                seen.clear();
            }
        }
        seen.insert((mac, why), now);
        true
    }
}

/// Who the client is to us.
enum Client<'a> {
    /// A host with a reservation, and its reserved address.
    Reserved(&'a Host, Ipv4Addr),
    Pool,
    Unknown,
}

/// The DHCP server: the shared context plus per-server memory (log limits).
pub struct Server {
    pub ctx: Arc<DhcpContext>,
    quiet: LogLimiter,
}

/// The network a packet belongs to: the relay agent's (giaddr) or the
/// arrival interface's.
pub fn pick_network<'s>(
    state: &'s RackState,
    iface: &Interface,
    giaddr: Ipv4Addr,
) -> Option<&'s Network> {
    if giaddr.is_unspecified() {
        state.network_containing(iface.address)
    } else {
        state.network_containing(giaddr)
    }
}

/// Where a reply goes.
pub fn destination(ctx: &DhcpContext, req: &Message, nak: bool) -> SocketAddr {
    let cfg = &ctx.config.dhcp;
    let to = |ip: Ipv4Addr, port: u16| SocketAddr::V4(SocketAddrV4::new(ip, port));
    if !req.giaddr().is_unspecified() {
        return to(req.giaddr(), cfg.relay_agent_port);
    }
    if !nak && !req.ciaddr().is_unspecified() {
        // Renewing / INFORM: the client has a working address.
        return to(req.ciaddr(), cfg.client_port);
    }
    // A client without an address is always answered by broadcast, whatever
    // its broadcast flag says. Unicasting to yiaddr would need an ARP entry
    // injected for an address the client does not have yet; the broadcast
    // works with every client (PXE ROMs, dhclient, udhcpc, iPXE) and costs
    // one frame on a provisioning segment. RFC 2131 also wants NAKs broadcast.
    to(Ipv4Addr::BROADCAST, cfg.client_port)
}

/// PXE facts from the request's options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PxeInfo {
    pub pxe: bool,
    pub http: bool,
    pub ipxe: bool,
    pub arch: Option<u16>,
}

pub fn pxe_info(msg: &Message) -> PxeInfo {
    let class = match msg.opts().get(OptionCode::ClassIdentifier) {
        Some(DhcpOption::ClassIdentifier(c)) => c.as_slice(),
        _ => &[],
    };
    let user_class_ipxe = match msg.opts().get(OptionCode::UserClass) {
        Some(DhcpOption::UserClass(u)) => u.windows(4).any(|w| w == b"iPXE"),
        _ => false,
    };
    let arch = match msg.opts().get(OptionCode::ClientSystemArchitecture) {
        Some(DhcpOption::ClientSystemArchitecture(a)) => Some(u16::from(*a)),
        _ => None,
    };
    PxeInfo {
        pxe: class.starts_with(b"PXEClient"),
        http: class.starts_with(b"HTTPClient"),
        ipxe: user_class_ipxe || msg.opts().get(OptionCode::Unknown(175)).is_some(),
        arch,
    }
}

fn lease_secs_of(net: &Network) -> u32 {
    if net.lease_seconds == 0 {
        3600
    } else {
        net.lease_seconds
    }
}

impl Server {
    pub fn new(ctx: Arc<DhcpContext>) -> Server {
        Server {
            ctx,
            quiet: LogLimiter::new(),
        }
    }

    /// Bytes in, bytes out: decode, handle, count, encode. Never panics on
    /// packet data; a malformed packet is counted and dropped.
    pub fn process(&self, iface: &Interface, bytes: &[u8], now: u64) -> Option<Outgoing> {
        let started = std::time::Instant::now();
        let out = self.process_inner(iface, bytes, now);
        self.ctx
            .metrics
            .dhcp_seconds
            .observe(started.elapsed().as_secs_f64());
        out
    }

    fn process_inner(&self, iface: &Interface, bytes: &[u8], now: u64) -> Option<Outgoing> {
        let req = match packet::decode(bytes) {
            Ok(r) => r,
            Err(e) => {
                debug!(interface = %iface.name, error = %e, len = bytes.len(), "dhcp: malformed packet dropped");
                self.ctx.metrics.dhcp("unknown", "malformed");
                return None;
            }
        };
        let h = self.handle(iface, &req, now);
        self.ctx.metrics.dhcp(h.msg_type, h.outcome);
        let mut reply = h.reply?;
        match packet::encode(&mut reply) {
            Ok(bytes) => Some(Outgoing {
                bytes,
                dest: reply.dest,
                flush: h.flush,
            }),
            Err(e) => {
                warn!(xid = req.msg.xid(), error = %e, "dhcp: cannot encode reply");
                None
            }
        }
    }

    /// The decision for one decoded request.
    pub fn handle(&self, iface: &Interface, req: &Request, now: u64) -> Handled {
        let msg = &req.msg;
        let mt = msg_type_name(msg);
        if msg.opcode() != Opcode::BootRequest {
            return Handled::ignore(mt, "ignored-not-request");
        }
        let Some(kind) = msg.opts().msg_type() else {
            // Plain BOOTP: not served.
            return Handled::ignore(mt, "ignored-no-msg-type");
        };
        if !matches!(
            kind,
            MessageType::Discover
                | MessageType::Request
                | MessageType::Decline
                | MessageType::Release
                | MessageType::Inform
        ) {
            return Handled::ignore(mt, "ignored-not-request");
        }
        let Some(mac) = req.mac else {
            return Handled::ignore(mt, "ignored-not-ethernet");
        };
        let state = self.ctx.state.load();
        let Some(net) = pick_network(&state, iface, msg.giaddr()) else {
            if self.quiet.allow(mac, "no-network", now) {
                warn!(%mac, xid = msg.xid(), msg_type = mt, interface = %iface.name, giaddr = %msg.giaddr(),
                    "dhcp: no network for this interface/relay agent; not answering");
            }
            return Handled::ignore(mt, "ignored-no-network");
        };
        // `host_by_mac` finds only hosts with a reservation; one without
        // (an idle bare metal host) is an unknown MAC here.
        let client = match state.host_by_mac(&mac).and_then(|h| h.ip.map(|ip| (h, ip))) {
            Some((h, _)) if h.network != net.name => {
                if self.quiet.allow(mac, "wrong-network", now) {
                    warn!(%mac, xid = msg.xid(), msg_type = mt, network = %net.name, host = %h.name,
                        reserved_network = %h.network,
                        "dhcp: reserved host asks on another network (wrong VLAN or cabling?); not answering");
                }
                return Handled::ignore(mt, "ignored-wrong-network");
            }
            Some((h, ip)) => Client::Reserved(h, ip),
            None if net.pool.is_some() => Client::Pool,
            None => Client::Unknown,
        };
        if matches!(client, Client::Unknown) && kind != MessageType::Inform {
            if self.quiet.allow(mac, "unknown-mac", now) {
                info!(%mac, xid = msg.xid(), msg_type = mt, network = %net.name,
                    "dhcp: unknown MAC and no pool on this network; not answering (logged once a minute per MAC)");
            }
            return Handled::ignore(mt, "ignored-unknown-mac");
        }
        let cx = Cx {
            server: self,
            state: &state,
            iface,
            req,
            mac,
            net,
            mt,
            now,
        };
        match kind {
            MessageType::Discover => cx.discover(&client),
            MessageType::Request => cx.request(&client),
            MessageType::Decline => cx.decline(&client),
            MessageType::Release => cx.release(&client),
            _ => cx.inform(&client),
        }
    }
}

/// Everything one packet's handling needs.
struct Cx<'a> {
    server: &'a Server,
    state: &'a RackState,
    iface: &'a Interface,
    req: &'a Request,
    mac: Mac,
    net: &'a Network,
    mt: &'static str,
    now: u64,
}

impl Cx<'_> {
    fn ctx(&self) -> &DhcpContext {
        &self.server.ctx
    }

    fn msg(&self) -> &Message {
        &self.req.msg
    }

    /// Our server identifier: the arrival interface's address.
    fn server_id(&self) -> Ipv4Addr {
        self.iface.address
    }

    /// The address clients use for TFTP/HTTP: the arrival interface's, or
    /// for a network reached only through relay agents the configured
    /// `advertise_address` when there is one.
    fn boot_addr(&self) -> Ipv4Addr {
        if self.net.subnet.contains(&self.iface.address) {
            self.iface.address
        } else {
            self.ctx()
                .config
                .advertise_address
                .unwrap_or(self.iface.address)
        }
    }

    /// Addresses the pool must never hand out, besides reservations (which
    /// `is_excluded` looks up by address instead of collecting per packet).
    fn fixed_exclusions(&self) -> HashSet<Ipv4Addr> {
        let cfg = &self.ctx().config;
        let mut ex: HashSet<Ipv4Addr> = HashSet::new();
        ex.extend(self.net.gateway);
        ex.extend(cfg.interfaces.iter().map(|i| i.address));
        ex.extend(cfg.advertise_address);
        ex.extend(self.net.dns.iter().filter_map(|d| match d {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        }));
        ex
    }

    fn ignore(&self, outcome: &'static str) -> Handled {
        Handled::ignore(self.mt, outcome)
    }

    fn discover(&self, client: &Client) -> Handled {
        let ip = match client {
            Client::Reserved(_, ip) => *ip,
            Client::Pool => {
                let hold = self.ctx().config.dhcp.offer_hold_seconds;
                let fixed = self.fixed_exclusions();
                let excluded =
                    |ip: Ipv4Addr| fixed.contains(&ip) || self.state.host_by_ip(ip).is_some();
                match self.ctx().leases.offer(
                    &self.mac,
                    self.net,
                    &excluded,
                    requested_ip(self.msg()),
                    self.now,
                    hold,
                ) {
                    Ok(Some(ip)) => ip,
                    Ok(None) => {
                        if self
                            .server
                            .quiet
                            .allow(self.mac, "pool-exhausted", self.now)
                        {
                            warn!(mac = %self.mac, xid = self.msg().xid(), network = %self.net.name,
                                "dhcp: pool exhausted; not answering");
                        }
                        return self.ignore("ignored-pool-exhausted");
                    }
                    Err(e) => {
                        warn!(mac = %self.mac, error = %e, "dhcp: lease store error");
                        return self.ignore("error-lease-store");
                    }
                }
            }
            Client::Unknown => return self.ignore("ignored-unknown-mac"),
        };
        let host = match client {
            Client::Reserved(h, _) => Some(*h),
            _ => None,
        };
        let reply = self.build(MessageType::Offer, Some(ip), host, true);
        debug!(mac = %self.mac, %ip, network = %self.net.name, xid = self.msg().xid(), msg_type = self.mt,
            option82 = self.req.relay_info.is_some(), "dhcp: offer");
        self.ctx().events.record(
            &self.mac.to_string(),
            crate::events::EventKind::DhcpOffer,
            &ip.to_string(),
        );
        Handled {
            msg_type: self.mt,
            outcome: "offer",
            reply: Some(reply),
            flush: false,
        }
    }

    fn request(&self, client: &Client) -> Handled {
        let msg = self.msg();
        let ciaddr = msg.ciaddr();
        // RFC 2131 4.3.2: the client's state tells which address it wants.
        let (phase, wanted) = match (server_id(msg), requested_ip(msg)) {
            (Some(sid), req_ip) => {
                if sid != self.server_id() {
                    // SELECTING another server's offer: forget ours.
                    if matches!(client, Client::Pool) {
                        let _ = self.ctx().leases.drop_offers(&self.mac, None, self.now);
                    }
                    return self.ignore("ignored-not-for-us");
                }
                (
                    "selecting",
                    req_ip.or((!ciaddr.is_unspecified()).then_some(ciaddr)),
                )
            }
            (None, Some(ip)) if ciaddr.is_unspecified() => ("init-reboot", Some(ip)),
            (None, _) if !ciaddr.is_unspecified() => ("renewing", Some(ciaddr)),
            (None, _) => ("init-reboot", None),
        };
        let Some(wanted) = wanted else {
            return self.nak(phase, "no requested address");
        };
        if !self.net.subnet.contains(&wanted) {
            return self.nak(phase, "address not on this network");
        }
        if self
            .state
            .host_by_ip(wanted)
            .is_some_and(|h| h.mac != self.mac)
        {
            // Another host's reservation: NAKed below; counted as refused.
            self.ctx()
                .metrics
                .limits
                .drop("dhcp", crate::limits::DropReason::ForeignReservation);
        }
        let (host, flush) = match client {
            Client::Reserved(h, ip) => {
                if *ip != wanted {
                    return self.nak(phase, "not your reserved address");
                }
                (Some(*h), false)
            }
            Client::Pool => {
                let lease = lease_secs_of(self.net);
                let fixed = self.fixed_exclusions();
                let excluded =
                    |ip: Ipv4Addr| fixed.contains(&ip) || self.state.host_by_ip(ip).is_some();
                match self
                    .ctx()
                    .leases
                    .commit(&self.mac, self.net, &excluded, wanted, self.now, lease)
                {
                    Ok(Commit::Bound { new }) => {
                        let _ = self
                            .ctx()
                            .leases
                            .drop_offers(&self.mac, Some(wanted), self.now);
                        if new {
                            info!(mac = %self.mac, ip = %wanted, network = %self.net.name, xid = msg.xid(),
                                "dhcp: new pool lease");
                        }
                        (None, true)
                    }
                    Ok(Commit::Refused) => return self.nak(phase, "address not available"),
                    Err(e) => {
                        warn!(mac = %self.mac, error = %e, "dhcp: lease store error");
                        return self.ignore("error-lease-store");
                    }
                }
            }
            Client::Unknown => return self.ignore("ignored-unknown-mac"),
        };
        let reply = self.build(MessageType::Ack, Some(wanted), host, true);
        debug!(mac = %self.mac, ip = %wanted, network = %self.net.name, xid = msg.xid(), msg_type = self.mt, phase,
            option82 = self.req.relay_info.is_some(), "dhcp: ack");
        self.ctx().events.record(
            &self.mac.to_string(),
            crate::events::EventKind::DhcpAck,
            &wanted.to_string(),
        );
        Handled {
            msg_type: self.mt,
            outcome: "ack",
            reply: Some(reply),
            flush,
        }
    }

    fn nak(&self, phase: &'static str, why: &'static str) -> Handled {
        let msg = self.msg();
        info!(mac = %self.mac, xid = msg.xid(), msg_type = self.mt, network = %self.net.name,
            requested = ?requested_ip(msg), ciaddr = %msg.ciaddr(), phase, why,
            option82 = self.req.relay_info.is_some(), "dhcp: nak");
        let mut m = reply_header(msg, MessageType::Nak);
        m.opts_mut()
            .insert(DhcpOption::ServerIdentifier(self.server_id()));
        m.opts_mut().insert(DhcpOption::Message(why.to_string()));
        copy_client_id(msg, &mut m);
        if !msg.giaddr().is_unspecified() {
            // RFC 2131 4.3.2: the relay agent must broadcast a NAK.
            m.set_flags(m.flags().set_broadcast());
        }
        let dest = destination(self.ctx(), msg, true);
        let reply = Reply {
            msg: m,
            dest,
            relay_info: self.req.relay_info.clone(),
        };
        Handled {
            msg_type: self.mt,
            outcome: "nak",
            reply: Some(reply),
            flush: false,
        }
    }

    fn not_ours(&self) -> bool {
        server_id(self.msg()).is_some_and(|sid| sid != self.server_id())
    }

    fn decline(&self, client: &Client) -> Handled {
        if self.not_ours() {
            return self.ignore("ignored-not-for-us");
        }
        let Some(ip) = requested_ip(self.msg()) else {
            return self.ignore("ignored-bad-decline");
        };
        match client {
            Client::Reserved(h, _) => {
                warn!(mac = %self.mac, %ip, host = %h.name, network = %self.net.name,
                    "dhcp: client declined its reserved address: another machine uses it");
                self.ignore("declined-reserved")
            }
            Client::Pool if in_pool(self.net, ip) => {
                match self.ctx().leases.decline(&self.mac, self.net, ip, self.now) {
                    Ok(true) => {
                        warn!(mac = %self.mac, %ip, network = %self.net.name,
                        "dhcp: pool address declined (in use elsewhere); quarantined");
                        self.ignore("declined")
                    }
                    Ok(false) => self.ignore("ignored-bad-decline"),
                    Err(e) => {
                        warn!(mac = %self.mac, error = %e, "dhcp: lease store error");
                        self.ignore("error-lease-store")
                    }
                }
            }
            _ => self.ignore("ignored-bad-decline"),
        }
    }

    fn release(&self, client: &Client) -> Handled {
        if self.not_ours() {
            return self.ignore("ignored-not-for-us");
        }
        let ip = self.msg().ciaddr();
        match client {
            Client::Pool => match self.ctx().leases.release(&self.mac, ip, self.now) {
                Ok(true) => {
                    info!(mac = %self.mac, %ip, network = %self.net.name, "dhcp: pool lease released");
                    self.ignore("released")
                }
                Ok(false) => self.ignore("ignored-bad-release"),
                Err(e) => {
                    warn!(mac = %self.mac, error = %e, "dhcp: lease store error");
                    self.ignore("error-lease-store")
                }
            },
            // A reservation stays the host's whatever it says.
            _ => self.ignore("released"),
        }
    }

    fn inform(&self, client: &Client) -> Handled {
        let ciaddr = self.msg().ciaddr();
        if ciaddr.is_unspecified() || !self.net.subnet.contains(&ciaddr) {
            return self.ignore("ignored-bad-inform");
        }
        let host = match client {
            Client::Reserved(h, _) => Some(*h),
            _ => None,
        };
        let reply = self.build(MessageType::Ack, None, host, false);
        debug!(mac = %self.mac, ip = %ciaddr, network = %self.net.name, xid = self.msg().xid(), msg_type = self.mt, "dhcp: inform ack");
        Handled {
            msg_type: self.mt,
            outcome: "ack",
            reply: Some(reply),
            flush: false,
        }
    }

    /// OFFER/ACK: header, network options, lease times (not for INFORM),
    /// host name, and the boot options of PXE/iPXE/HTTP-boot clients.
    fn build(
        &self,
        kind: MessageType,
        yiaddr: Option<Ipv4Addr>,
        host: Option<&Host>,
        lease: bool,
    ) -> Reply {
        let msg = self.msg();
        let mut m = reply_header(msg, kind);
        if let Some(ip) = yiaddr {
            m.set_yiaddr(ip);
        }
        if kind == MessageType::Ack {
            m.set_ciaddr(msg.ciaddr());
        }
        // dhcproto keeps options in code order, so the parameter request
        // list's order cannot be honoured; every option below is always sent.
        let net = self.net;
        let o = m.opts_mut();
        o.insert(DhcpOption::ServerIdentifier(self.server_id()));
        o.insert(DhcpOption::SubnetMask(net.subnet.netmask()));
        o.insert(DhcpOption::BroadcastAddr(net.subnet.broadcast()));
        if let Some(gw) = net.gateway {
            o.insert(DhcpOption::Router(vec![gw]));
        }
        let dns: Vec<Ipv4Addr> = net
            .dns
            .iter()
            .filter_map(|d| match d {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            })
            .take(16)
            .collect();
        if !dns.is_empty() {
            o.insert(DhcpOption::DomainNameServer(dns));
        }
        if !net.domain.is_empty() {
            o.insert(DhcpOption::DomainName(net.domain.clone()));
        }
        if net.mtu >= 68 {
            o.insert(DhcpOption::InterfaceMtu(net.mtu));
        }
        if lease {
            let secs = lease_secs_of(net);
            o.insert(DhcpOption::AddressLeaseTime(secs));
            o.insert(DhcpOption::Renewal(secs / 2));
            o.insert(DhcpOption::Rebinding((u64::from(secs) * 7 / 8) as u32));
        }
        if let Some(h) = host.filter(|h| !h.hostname.is_empty()) {
            o.insert(DhcpOption::Hostname(h.hostname.clone()));
        }
        copy_client_id(msg, &mut m);
        self.add_boot(&mut m);
        Reply {
            msg: m,
            dest: destination(self.ctx(), msg, false),
            relay_info: self.req.relay_info.clone(),
        }
    }

    fn add_boot(&self, m: &mut Message) {
        let info = pxe_info(self.msg());
        if !(info.pxe || info.http || info.ipxe) {
            return;
        }
        let cfg = &self.ctx().config;
        let addr = self.boot_addr();
        let base = boot::http_base(addr, cfg.http_port());
        let arch = ClientArch::from_option93(info.arch);
        // With chainloading, a ROM's own iPXE is treated like plain PXE until
        // this address has fetched our loader; then its DHCP gets the script.
        let client = if m.yiaddr().is_unspecified() {
            self.msg().ciaddr()
        } else {
            m.yiaddr()
        };
        let ipxe =
            info.ipxe && (!cfg.boot.chainload_ipxe || self.ctx().loaders.recently_loaded(client));
        let target = boot::choose(arch, ipxe, &self.mac.to_string(), &cfg.boot, &base);
        let file = match &target {
            BootTarget::Tftp(f) | BootTarget::Http(f) => f.clone(),
            BootTarget::None => {
                debug!(mac = %self.mac, arch = ?info.arch, "dhcp: no boot file for this architecture");
                return;
            }
        };
        m.set_siaddr(addr);
        // The header field is 128 bytes; longer names only go in option 67.
        if file.len() < 128 {
            m.set_fname_str(&file);
        }
        if let BootTarget::Tftp(_) = target {
            let name = addr.to_string();
            m.set_sname_str(&name);
            m.opts_mut()
                .insert(DhcpOption::TFTPServerName(name.into_bytes()));
        } else if info.http {
            // UEFI HTTP boot only accepts offers that say HTTPClient.
            m.opts_mut()
                .insert(DhcpOption::ClassIdentifier(b"HTTPClient".to_vec()));
        }
        m.opts_mut()
            .insert(DhcpOption::BootfileName(file.into_bytes()));
    }
}

fn reply_header(req: &Message, kind: MessageType) -> Message {
    let mut m = Message::default();
    m.set_opcode(Opcode::BootReply)
        .set_htype(req.htype())
        .set_chaddr(req.chaddr())
        .set_xid(req.xid())
        .set_flags(req.flags())
        .set_giaddr(req.giaddr());
    m.opts_mut().insert(DhcpOption::MessageType(kind));
    m
}

/// RFC 6842: echo the client identifier.
fn copy_client_id(req: &Message, m: &mut Message) {
    if let Some(DhcpOption::ClientIdentifier(id)) = req.opts().get(OptionCode::ClientIdentifier) {
        m.opts_mut()
            .insert(DhcpOption::ClientIdentifier(id.clone()));
    }
}
