//! Flood control for the relay's boot services: DHCP admission (cheap
//! well-formedness checks on raw bytes, relay-agent sources, token buckets
//! per client MAC and per sending address) and concurrency slots for TFTP
//! and HTTP transfers (per client address and in total).
//!
//! Every refusal is counted in `pxemesh_relay_dropped_total{protocol,
//! reason}`; label values are a fixed vocabulary ([`DropReason`]), never a MAC or
//! an address, so a flood of random MACs cannot grow the metrics either.
//!
//! Memory is bounded: the bucket maps hold at most
//! `limits.dhcp_tracked_clients` keys each and evict the oldest key first.
//! Eviction only forgets a client's history (its next packet starts with a
//! full bucket), so it can make the limiter more lenient, never stricter.
//!
//! Decisions (see docs/operations.md, "Flood control"):
//! - A booting client sends from 0.0.0.0, so the per-source limit cannot
//!   tell booting clients apart; it applies to senders that have an address.
//!   Direct clients with an address (renewals, INFORM, a host spraying
//!   MACs) share `dhcp_source_*`; relayed packets (giaddr set) are keyed by
//!   the relay agent's address with their own, much larger allowance
//!   (`dhcp_relay_agent_*`, unlimited by default: one agent forwards a whole
//!   rack's boot storm). The per-MAC limit applies to everything.
//! - giaddr: a relayed request must come from an address (relay agents
//!   never send from 0.0.0.0), giaddr must be a unicast address, and when
//!   `dhcp_relay_agents` is set the sender must be inside one of those
//!   networks. A client on the segment that sets giaddr cannot make the
//!   relay send to an arbitrary host: the packet is dropped (and a giaddr
//!   outside every configured network was already ignored by the handler).

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ipnet::Ipv4Net;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Deserialize;

/// `[limits]` of the relay configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// DHCP packets per second per client MAC (chaddr), and the burst.
    /// A PXE boot needs 4-8 packets (ROM, then iPXE, with retries).
    pub dhcp_mac_per_second: f64,
    pub dhcp_mac_burst: u32,
    /// DHCP packets per second per sending address for direct (not
    /// relayed) senders that have an address; 0 turns the limit off.
    pub dhcp_source_per_second: f64,
    pub dhcp_source_burst: u32,
    /// DHCP packets per second per relay agent (keyed by the agent's
    /// address); 0 (the default) turns the limit off.
    pub dhcp_relay_agent_per_second: f64,
    pub dhcp_relay_agent_burst: u32,
    /// Networks relay agents send from; empty accepts relayed requests from
    /// any address except 0.0.0.0.
    pub dhcp_relay_agents: Vec<Ipv4Net>,
    /// Keys each bucket map remembers (memory bound: ~100 bytes a key).
    pub dhcp_tracked_clients: usize,
    /// Concurrent TFTP transfers per client address (the total is
    /// `tftp.max_transfers`); 0 turns the per-client cap off.
    pub tftp_per_client: usize,
    /// Concurrent HTTP connections per client address, and in total; 0
    /// turns a cap off.
    pub http_per_client: usize,
    pub http_max_connections: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            dhcp_mac_per_second: 5.0,
            dhcp_mac_burst: 20,
            dhcp_source_per_second: 1000.0,
            dhcp_source_burst: 4000,
            dhcp_relay_agent_per_second: 0.0,
            dhcp_relay_agent_burst: 0,
            dhcp_relay_agents: Vec::new(),
            dhcp_tracked_clients: 65_536,
            tftp_per_client: 32,
            http_per_client: 128,
            http_max_connections: 4096,
        }
    }
}

impl LimitsConfig {
    pub fn validate(&self) -> Result<(), String> {
        let rate_ok = |r: f64| r.is_finite() && r >= 0.0;
        if !rate_ok(self.dhcp_mac_per_second)
            || !rate_ok(self.dhcp_source_per_second)
            || !rate_ok(self.dhcp_relay_agent_per_second)
        {
            return Err("[limits] dhcp_*_per_second must be finite and >= 0 (0 = off)".into());
        }
        let burst_ok = |r: f64, b: u32| r == 0.0 || b >= 1;
        if !burst_ok(self.dhcp_mac_per_second, self.dhcp_mac_burst)
            || !burst_ok(self.dhcp_source_per_second, self.dhcp_source_burst)
            || !burst_ok(
                self.dhcp_relay_agent_per_second,
                self.dhcp_relay_agent_burst,
            )
        {
            return Err("[limits] a dhcp_*_burst must be >= 1 when its rate is set".into());
        }
        if !(16..=10_000_000).contains(&self.dhcp_tracked_clients) {
            return Err("[limits] dhcp_tracked_clients must be 16-10000000".into());
        }
        Ok(())
    }
}

/// Free space needed to open the relay's database at all: sled writes while
/// it opens, and the coordinator's disk-full test found a sled opened on a
/// full disk left corrupt (coordinator/src/limits.rs). Below this the relay
/// refuses to start, with the cause, instead.
pub const STARTUP_MIN_FREE_BYTES: u64 = 16 * 1024 * 1024;

/// Refuse to open the database in `dir` on a (nearly) full file system.
pub fn check_startup_space(dir: &std::path::Path) -> Result<(), crate::error::RelayError> {
    match pxemesh_coordinator::limits::available_bytes(dir) {
        Ok(free) if free < STARTUP_MIN_FREE_BYTES => Err(crate::error::RelayError::Io(
            std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                format!(
                    "data directory {} has {free} bytes available; at least {STARTUP_MIN_FREE_BYTES} are needed to open the database safely (No space left on device); free space and start again",
                    dir.display()
                ),
            ),
        )),
        _ => Ok(()),
    }
}

/// Why a packet or a transfer was refused (the metric's `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Shorter than a BOOTP header, or a TFTP packet that does not parse.
    Malformed,
    /// Larger than the receive buffer (it was truncated).
    Oversize,
    /// No DHCP magic cookie.
    BadCookie,
    /// An option's length runs past the end of the packet.
    BadOptionLength,
    /// giaddr set by a sender that cannot be a relay agent.
    SpoofedGiaddr,
    /// A REQUEST for an address reserved to another MAC (answered by NAK).
    ForeignReservation,
    RateLimitedMac,
    RateLimitedSource,
    RateLimitedRelayAgent,
    /// Per-client transfer cap reached.
    ClientTransferCap,
    /// Total transfer cap reached.
    TransferCap,
    /// A provision-done callback for a host, from an address other than the
    /// host's (`http.provision_done_from = "host"`).
    ProvisionDoneNotFromHost,
}

impl DropReason {
    pub fn label(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::Oversize => "oversize",
            DropReason::BadCookie => "bad_cookie",
            DropReason::BadOptionLength => "bad_option_length",
            DropReason::SpoofedGiaddr => "spoofed_giaddr",
            DropReason::ForeignReservation => "foreign_reservation",
            DropReason::RateLimitedMac => "rate_limited_mac",
            DropReason::RateLimitedSource => "rate_limited_source",
            DropReason::RateLimitedRelayAgent => "rate_limited_relay_agent",
            DropReason::ClientTransferCap => "client_transfer_cap",
            DropReason::TransferCap => "transfer_cap",
            DropReason::ProvisionDoneNotFromHost => "provision_done_not_from_host",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    pub protocol: &'static str,
    pub reason: &'static str,
}

/// Metrics of this module, registered by `RelayMetrics`.
#[derive(Default)]
pub struct LimitMetrics {
    pub dropped: Family<DropLabels, Counter>,
    /// Keys currently remembered by the DHCP buckets (bounded).
    pub dhcp_tracked: Gauge,
}

impl LimitMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "dropped",
            "Packets, requests and connections refused by flood control or validation, by protocol and reason",
            self.dropped.clone(),
        );
        r.register(
            "dhcp_limiter_tracked_keys",
            "MACs and addresses the DHCP rate limiter remembers (bounded by limits.dhcp_tracked_clients)",
            self.dhcp_tracked.clone(),
        );
    }

    pub fn drop(&self, protocol: &'static str, why: DropReason) {
        self.dropped
            .get_or_create(&DropLabels {
                protocol,
                reason: why.label(),
            })
            .inc();
    }
}

/// A token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Token buckets by key with a hard cap on keys (oldest evicted first).
pub struct KeyedBuckets<K> {
    map: HashMap<K, Bucket>,
    order: VecDeque<K>,
    cap: usize,
    rate: f64,
    burst: f64,
}

impl<K: Hash + Eq + Copy> KeyedBuckets<K> {
    /// `rate` tokens a second up to `burst`; rate 0 admits everything.
    pub fn new(rate: f64, burst: u32, cap: usize) -> KeyedBuckets<K> {
        KeyedBuckets {
            map: HashMap::new(),
            order: VecDeque::new(),
            cap: cap.max(1),
            rate,
            burst: f64::from(burst.max(1)),
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Take a token for `key`; false when its bucket is empty.
    pub fn allow(&mut self, key: K, now: Instant) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        if let Some(b) = self.map.get_mut(&key) {
            let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
            b.tokens = (b.tokens + elapsed * self.rate).min(self.burst);
            b.last = now;
            if b.tokens >= 1.0 {
                b.tokens -= 1.0;
                return true;
            }
            return false;
        }
        while self.map.len() >= self.cap {
            match self.order.pop_front() {
                Some(old) => {
                    self.map.remove(&old);
                }
                None => break,
            }
        }
        self.map.insert(
            key,
            Bucket {
                tokens: self.burst - 1.0,
                last: now,
            },
        );
        self.order.push_back(key);
        true
    }
}

/// Smallest BOOTP message (fixed header + magic cookie).
const BOOTP_MIN: usize = 240;
const MAGIC: [u8; 4] = [99, 130, 83, 99];

/// Structural checks on a raw DHCP datagram before decoding: the header is
/// complete, the magic cookie is there, and every option's length stays
/// inside the packet. `received` is what the socket reported; `capacity` the
/// buffer size (a datagram that filled it was truncated).
pub fn dhcp_shape(bytes: &[u8], capacity: usize) -> Result<(), DropReason> {
    if bytes.len() >= capacity {
        return Err(DropReason::Oversize);
    }
    if bytes.len() < BOOTP_MIN {
        return Err(DropReason::Malformed);
    }
    if bytes[236..240] != MAGIC {
        return Err(DropReason::BadCookie);
    }
    let mut i = BOOTP_MIN;
    while i < bytes.len() {
        match bytes[i] {
            0 => i += 1,
            255 => return Ok(()),
            _ => {
                let Some(&len) = bytes.get(i + 1) else {
                    return Err(DropReason::BadOptionLength);
                };
                let end = i + 2 + usize::from(len);
                if end > bytes.len() {
                    return Err(DropReason::BadOptionLength);
                }
                i = end;
            }
        }
    }
    // No END option: tolerated (the decoder stops at the end of the data).
    Ok(())
}

fn giaddr_of(bytes: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(bytes[24], bytes[25], bytes[26], bytes[27])
}

fn chaddr_of(bytes: &[u8]) -> [u8; 6] {
    let mut m = [0u8; 6];
    m.copy_from_slice(&bytes[28..34]);
    m
}

struct DhcpBuckets {
    mac: KeyedBuckets<[u8; 6]>,
    source: KeyedBuckets<Ipv4Addr>,
    agent: KeyedBuckets<Ipv4Addr>,
}

/// DHCP admission, shared by the receive loops of all interfaces.
pub struct DhcpGuard {
    agents: Vec<Ipv4Net>,
    buckets: Mutex<DhcpBuckets>,
    metrics: Arc<crate::metrics::RelayMetrics>,
}

impl DhcpGuard {
    pub fn new(cfg: &LimitsConfig, metrics: Arc<crate::metrics::RelayMetrics>) -> DhcpGuard {
        let cap = cfg.dhcp_tracked_clients;
        DhcpGuard {
            agents: cfg.dhcp_relay_agents.clone(),
            buckets: Mutex::new(DhcpBuckets {
                mac: KeyedBuckets::new(cfg.dhcp_mac_per_second, cfg.dhcp_mac_burst, cap),
                source: KeyedBuckets::new(cfg.dhcp_source_per_second, cfg.dhcp_source_burst, cap),
                agent: KeyedBuckets::new(
                    cfg.dhcp_relay_agent_per_second,
                    cfg.dhcp_relay_agent_burst,
                    cap,
                ),
            }),
            metrics,
        }
    }

    /// Whether a received datagram goes on to the handler; a refusal is
    /// counted here. Cheap: no decoding, one short lock.
    pub fn admit(&self, bytes: &[u8], capacity: usize, peer: SocketAddr, now: Instant) -> bool {
        match self.check(bytes, capacity, peer, now) {
            Ok(()) => true,
            Err(why) => {
                self.metrics.limits.drop("dhcp", why);
                false
            }
        }
    }

    fn check(
        &self,
        bytes: &[u8],
        capacity: usize,
        peer: SocketAddr,
        now: Instant,
    ) -> Result<(), DropReason> {
        dhcp_shape(bytes, capacity)?;
        let src = match peer.ip() {
            IpAddr::V4(a) => a,
            IpAddr::V6(a) => a.to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED),
        };
        let giaddr = giaddr_of(bytes);
        let relayed = !giaddr.is_unspecified();
        if relayed
            && (src.is_unspecified()
                || giaddr.is_broadcast()
                || giaddr.is_multicast()
                || (!self.agents.is_empty() && !self.agents.iter().any(|n| n.contains(&src))))
        {
            return Err(DropReason::SpoofedGiaddr);
        }
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if relayed {
            if !b.agent.allow(src, now) {
                return Err(DropReason::RateLimitedRelayAgent);
            }
        } else if !src.is_unspecified() && !b.source.allow(src, now) {
            return Err(DropReason::RateLimitedSource);
        }
        let allowed = b.mac.allow(chaddr_of(bytes), now);
        let tracked = b.mac.len() + b.source.len() + b.agent.len();
        drop(b);
        self.metrics.limits.dhcp_tracked.set(tracked as i64);
        if allowed {
            Ok(())
        } else {
            Err(DropReason::RateLimitedMac)
        }
    }
}

/// Concurrency slots per client address and in total; a slot is held by a
/// [`Slot`] and freed when it drops. The per-address map has at most
/// `total` entries (every entry holds at least one slot).
#[derive(Clone)]
pub struct TransferSlots {
    inner: Arc<Mutex<SlotCounts>>,
    per_client: usize,
    total: usize,
}

#[derive(Default)]
struct SlotCounts {
    by_ip: HashMap<IpAddr, usize>,
    total: usize,
}

/// One held slot.
pub struct Slot {
    inner: Arc<Mutex<SlotCounts>>,
    ip: IpAddr,
}

impl TransferSlots {
    /// Caps of 0 mean unlimited.
    pub fn new(per_client: usize, total: usize) -> TransferSlots {
        let unlimited = |n: usize| if n == 0 { usize::MAX } else { n };
        TransferSlots {
            inner: Arc::default(),
            per_client: unlimited(per_client),
            total: unlimited(total),
        }
    }

    pub fn try_acquire(&self, ip: IpAddr) -> Result<Slot, DropReason> {
        let mut c = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if c.total >= self.total {
            return Err(DropReason::TransferCap);
        }
        let mine = c.by_ip.get(&ip).copied().unwrap_or(0);
        if mine >= self.per_client {
            return Err(DropReason::ClientTransferCap);
        }
        c.by_ip.insert(ip, mine + 1);
        c.total += 1;
        Ok(Slot {
            inner: self.inner.clone(),
            ip,
        })
    }

    /// Slots held now (for tests and gauges).
    pub fn in_use(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.by_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.by_ip.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn packet() -> Vec<u8> {
        let mut b = vec![0u8; 240];
        b[0] = 1;
        b[236..240].copy_from_slice(&MAGIC);
        b.extend_from_slice(&[53, 1, 1, 0, 0, 255]);
        b
    }

    #[test]
    fn shape_checks() {
        let ok = packet();
        assert_eq!(dhcp_shape(&ok, 4097), Ok(()));
        assert_eq!(dhcp_shape(&ok[..100], 4097), Err(DropReason::Malformed));
        assert_eq!(dhcp_shape(&ok, ok.len()), Err(DropReason::Oversize));
        let mut bad = ok.clone();
        bad[237] = 0;
        assert_eq!(dhcp_shape(&bad, 4097), Err(DropReason::BadCookie));
        let mut long = ok.clone();
        long[241] = 200; // option 53 claims 200 bytes
        assert_eq!(dhcp_shape(&long, 4097), Err(DropReason::BadOptionLength));
        let mut cut = ok[..241].to_vec(); // option code without a length
        cut[240] = 53;
        assert_eq!(dhcp_shape(&cut, 4097), Err(DropReason::BadOptionLength));
        // No END: tolerated.
        assert_eq!(dhcp_shape(&ok[..243], 4097), Ok(()));
    }

    #[test]
    fn buckets_refill_and_stay_bounded() {
        let t0 = Instant::now();
        let mut b = KeyedBuckets::new(2.0, 3, 4);
        assert!((0..3).all(|_| b.allow(1u32, t0)));
        assert!(!b.allow(1, t0));
        assert!(b.allow(1, t0 + Duration::from_millis(600)));
        assert!(!b.allow(1, t0 + Duration::from_millis(600)));
        for k in 2..1000u32 {
            assert!(b.allow(k, t0));
            assert!(b.len() <= 4);
        }
        // Key 1 was evicted: it starts over with a full bucket.
        assert!(b.allow(1, t0 + Duration::from_millis(600)));
        let mut off = KeyedBuckets::new(0.0, 0, 4);
        assert!((0..100).all(|_| off.allow(7u32, t0)));
        assert!(off.is_empty());
    }

    #[test]
    fn guard_limits_macs_sources_and_agents() {
        let metrics = Arc::new(crate::metrics::RelayMetrics::new());
        let cfg = LimitsConfig {
            dhcp_mac_burst: 2,
            dhcp_source_burst: 3,
            dhcp_relay_agents: vec!["10.9.0.0/16".parse().unwrap()],
            ..Default::default()
        };
        let g = DhcpGuard::new(&cfg, metrics.clone());
        let now = Instant::now();
        let zero: SocketAddr = "0.0.0.0:68".parse().unwrap();
        let p = packet();
        assert!(g.admit(&p, 4097, zero, now));
        assert!(g.admit(&p, 4097, zero, now));
        assert!(!g.admit(&p, 4097, zero, now), "third packet of one MAC");
        // A sender with an address spraying MACs: the source bucket stops it.
        let host: SocketAddr = "10.1.0.5:68".parse().unwrap();
        let mut admitted = 0;
        for i in 0..10u8 {
            let mut q = p.clone();
            q[33] = i.wrapping_add(1);
            admitted += usize::from(g.admit(&q, 4097, host, now));
        }
        assert_eq!(admitted, 3);
        // giaddr from 0.0.0.0, or from outside the agent networks.
        let mut relayed = p.clone();
        relayed[24..28].copy_from_slice(&[10, 9, 0, 1]);
        relayed[33] = 99;
        assert!(!g.admit(&relayed, 4097, zero, now));
        assert!(!g.admit(&relayed, 4097, "192.0.2.1:67".parse().unwrap(), now));
        assert!(g.admit(&relayed, 4097, "10.9.0.1:67".parse().unwrap(), now));
        let text = metrics.render();
        for (reason, n) in [
            ("rate_limited_mac", 1),
            ("rate_limited_source", 7),
            ("spoofed_giaddr", 2),
        ] {
            let line =
                format!("pxemesh_relay_dropped_total{{protocol=\"dhcp\",reason=\"{reason}\"}} {n}");
            assert!(text.contains(&line), "{line} not in\n{text}");
        }
    }

    #[test]
    fn slots_per_client_and_total() {
        let s = TransferSlots::new(2, 3);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = s.try_acquire(a).unwrap();
        let _a2 = s.try_acquire(a).unwrap();
        assert_eq!(s.try_acquire(a).err(), Some(DropReason::ClientTransferCap));
        let _b1 = s.try_acquire(b).unwrap();
        assert_eq!(s.try_acquire(b).err(), Some(DropReason::TransferCap));
        drop(a1);
        assert_eq!(s.in_use(), 2);
        let _b2 = s.try_acquire(b).unwrap();
        let unlimited = TransferSlots::new(0, 0);
        let held: Vec<_> = (0..100)
            .map(|_| unlimited.try_acquire(a).unwrap())
            .collect();
        assert_eq!(unlimited.in_use(), held.len());
    }
}
