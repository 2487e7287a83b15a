//! The simulated hosts' DHCP side: requests built and replies parsed by hand
//! (fixed BOOTP header plus a TLV walk; nothing here can panic on a reply),
//! and one shared socket whose replies are handed to the waiting host by xid.
//!
//! Two ways to reach a server:
//! * **relay agent** (default): requests are unicast to the server with
//!   `giaddr` set and `hops = 1`, as a DHCP relay agent forwards them; the
//!   server answers to `giaddr:<agent port>`, where our socket listens. Works
//!   on loopback (giaddr in 127.0.0.0/8) without any privileges.
//! * **broadcast**: requests go to 255.255.255.255:67 from port 68 on one
//!   interface (SO_BINDTODEVICE), like a NIC ROM; answers are broadcast to
//!   port 68. Needs root, meant for network namespaces.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const MAGIC: [u8; 4] = [99, 130, 83, 99];
const HEADER_LEN: usize = 236;

pub const DISCOVER: u8 = 1;
pub const OFFER: u8 = 2;
pub const REQUEST: u8 = 3;
pub const ACK: u8 = 5;
pub const NAK: u8 = 6;

/// What a client says about itself in its requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientKind {
    /// A BIOS NIC ROM (PXEClient, option 93 = 0).
    PxeRom,
    /// iPXE, after the boot loader was chainloaded (user class "iPXE", option 175).
    Ipxe,
}

/// One DHCP request, encoded.
pub fn encode_request(
    msg_type: u8,
    xid: u32,
    secs: u16,
    mac: [u8; 6],
    giaddr: Ipv4Addr,
    kind: ClientKind,
    requested: Option<(Ipv4Addr, Ipv4Addr)>,
) -> Vec<u8> {
    let mut b = vec![0u8; HEADER_LEN];
    b[0] = 1; // BOOTREQUEST
    b[1] = 1; // Ethernet
    b[2] = 6;
    b[3] = u8::from(!giaddr.is_unspecified()); // hops
    b[4..8].copy_from_slice(&xid.to_be_bytes());
    b[8..10].copy_from_slice(&secs.to_be_bytes());
    if giaddr.is_unspecified() {
        b[10] = 0x80; // broadcast flag: we cannot receive unicast before ACK
    }
    b[24..28].copy_from_slice(&giaddr.octets());
    b[28..34].copy_from_slice(&mac);
    b.extend_from_slice(&MAGIC);
    let mut opt = |code: u8, data: &[u8]| {
        b.push(code);
        b.push(data.len() as u8);
        b.extend_from_slice(data);
    };
    opt(53, &[msg_type]);
    let mut client_id = vec![1u8];
    client_id.extend_from_slice(&mac);
    opt(61, &client_id);
    if let Some((ip, server)) = requested {
        opt(50, &ip.octets());
        opt(54, &server.octets());
    }
    opt(57, &1472u16.to_be_bytes());
    // subnet, router, DNS, hostname, domain, vendor, TFTP server, bootfile, PXE
    opt(55, &[1, 3, 6, 12, 15, 43, 66, 67, 128, 129, 130, 131, 132]);
    opt(93, &[0, 0]); // BIOS x86
    opt(94, &[1, 2, 1]); // UNDI 2.1
    let mut uuid = vec![0u8; 17];
    uuid[11..17].copy_from_slice(&mac);
    opt(97, &uuid);
    opt(60, b"PXEClient:Arch:00000:UNDI:002001");
    if kind == ClientKind::Ipxe {
        opt(77, b"iPXE");
        opt(175, &[0xb1, 1, 1]); // iPXE feature: an encapsulated "priority"
    }
    b.push(255);
    // Pad to the BOOTP minimum (300 bytes), as real clients do.
    if b.len() < 300 {
        b.resize(300, 0);
    }
    b
}

/// The fields of a reply the simulated client acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub xid: u32,
    pub msg_type: u8,
    pub yiaddr: Ipv4Addr,
    pub siaddr: Ipv4Addr,
    pub server_id: Option<Ipv4Addr>,
    /// Option 67, else the BOOTP `file` field.
    pub bootfile: Option<String>,
    /// Option 66 (TFTP server name), if it is an address.
    pub tftp_server: Option<Ipv4Addr>,
}

impl Reply {
    /// Where the boot file is fetched from over TFTP: siaddr, else option
    /// 66, else the server identifier.
    pub fn next_server(&self) -> Option<Ipv4Addr> {
        if !self.siaddr.is_unspecified() {
            return Some(self.siaddr);
        }
        self.tftp_server.or(self.server_id)
    }
}

fn text(b: &[u8]) -> Option<String> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    let s = std::str::from_utf8(&b[..end]).ok()?.trim();
    (!s.is_empty()).then(|| s.to_string())
}

fn ip4(b: &[u8]) -> Option<Ipv4Addr> {
    let a: [u8; 4] = b.get(..4)?.try_into().ok()?;
    Some(Ipv4Addr::from(a))
}

/// Parse a BOOTREPLY; `None` for anything else or anything malformed.
pub fn parse_reply(b: &[u8]) -> Option<Reply> {
    if b.len() < HEADER_LEN + 4 || b[0] != 2 || b[HEADER_LEN..HEADER_LEN + 4] != MAGIC {
        return None;
    }
    let xid = u32::from_be_bytes(b[4..8].try_into().ok()?);
    let mut r = Reply {
        xid,
        msg_type: 0,
        yiaddr: ip4(&b[16..20])?,
        siaddr: ip4(&b[20..24])?,
        server_id: None,
        bootfile: text(&b[108..236]),
        tftp_server: None,
    };
    let mut i = HEADER_LEN + 4;
    while i < b.len() {
        let code = b[i];
        if code == 255 {
            break;
        }
        if code == 0 {
            i += 1;
            continue;
        }
        let len = *b.get(i + 1)? as usize;
        let data = b.get(i + 2..i + 2 + len)?;
        match code {
            53 => r.msg_type = *data.first()?,
            54 => r.server_id = ip4(data),
            66 => r.tftp_server = text(data).and_then(|s| s.parse().ok()),
            67 => r.bootfile = text(data).or(r.bootfile),
            _ => {}
        }
        i += 2 + len;
    }
    (r.msg_type != 0).then_some(r)
}

/// How requests reach the server.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Relay agent: bind `giaddr:agent_port`, send to `server`.
    Agent {
        server: SocketAddr,
        giaddr: Ipv4Addr,
        agent_port: u16,
    },
    /// Broadcast on `interface` from port 68 to 255.255.255.255:`server_port`.
    Broadcast { interface: String, server_port: u16 },
}

/// The shared socket and the table of hosts waiting for replies.
pub struct Dhcp {
    sock: Arc<UdpSocket>,
    dest: SocketAddr,
    giaddr: Ipv4Addr,
    waiting: Mutex<HashMap<u32, mpsc::Sender<Reply>>>,
}

fn bind(mode: &Mode) -> std::io::Result<(std::net::UdpSocket, SocketAddr, Ipv4Addr)> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    // A storm's replies arrive in bursts; a large buffer keeps the kernel
    // from dropping them before we read them (best effort).
    let _ = s.set_recv_buffer_size(8 << 20);
    let _ = s.set_send_buffer_size(8 << 20);
    force_recv_buffer(&s, 8 << 20);
    let (local, dest, giaddr) = match mode {
        Mode::Agent {
            server,
            giaddr,
            agent_port,
        } => (SocketAddrV4::new(*giaddr, *agent_port), *server, *giaddr),
        Mode::Broadcast {
            interface,
            server_port,
        } => {
            s.set_broadcast(true)?;
            s.bind_device(Some(interface.as_bytes())).map_err(|e| {
                std::io::Error::new(e.kind(), format!("SO_BINDTODEVICE {interface}: {e}"))
            })?;
            (
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68),
                SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::BROADCAST, *server_port)),
                Ipv4Addr::UNSPECIFIED,
            )
        }
    };
    s.bind(&SocketAddr::V4(local).into())
        .map_err(|e| std::io::Error::new(e.kind(), format!("bind {local}: {e}")))?;
    s.set_nonblocking(true)?;
    Ok((s.into(), dest, giaddr))
}

/// As root, SO_RCVBUFFORCE lifts the receive buffer above `net.core.rmem_max`
/// so that drops under a storm happen at the server, not in the driver.
fn force_recv_buffer(s: &Socket, bytes: libc::c_int) {
    use std::os::fd::AsRawFd;
    // SAFETY: setsockopt on a socket we own with a pointer to a local int.
    unsafe {
        let _ = libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

impl Dhcp {
    /// Bind the socket and start the receive loop (ends with `stop`).
    pub fn start(mode: &Mode, stop: CancellationToken) -> std::io::Result<Arc<Dhcp>> {
        let (std_sock, dest, giaddr) = bind(mode)?;
        let sock = Arc::new(UdpSocket::from_std(std_sock)?);
        let d = Arc::new(Dhcp {
            sock,
            dest,
            giaddr,
            waiting: Mutex::new(HashMap::new()),
        });
        let rx = d.clone();
        tokio::spawn(async move { rx.receive(stop).await });
        Ok(d)
    }

    pub fn giaddr(&self) -> Ipv4Addr {
        self.giaddr
    }

    async fn receive(&self, stop: CancellationToken) {
        let mut buf = vec![0u8; 4096];
        loop {
            let r = tokio::select! {
                _ = stop.cancelled() => return,
                r = self.sock.recv_from(&mut buf) => r,
            };
            let n = match r {
                Ok((n, _)) => n,
                Err(_) => {
                    // ICMP errors surface here on some kernels; never spin.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
            };
            let Some(reply) = parse_reply(&buf[..n]) else {
                continue;
            };
            let tx = self
                .waiting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&reply.xid)
                .cloned();
            if let Some(tx) = tx {
                let _ = tx.try_send(reply);
            }
        }
    }

    /// Register `xid`; replies carrying it arrive on the returned receiver
    /// until the guard is dropped.
    pub fn listen(self: &Arc<Self>, xid: u32) -> XidGuard {
        let (tx, rx) = mpsc::channel(8);
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(xid, tx);
        XidGuard {
            dhcp: self.clone(),
            xid,
            rx,
        }
    }

    pub async fn send(&self, bytes: &[u8]) -> std::io::Result<()> {
        self.sock.send_to(bytes, self.dest).await.map(|_| ())
    }
}

pub struct XidGuard {
    dhcp: Arc<Dhcp>,
    xid: u32,
    pub rx: mpsc::Receiver<Reply>,
}

impl Drop for XidGuard {
    fn drop(&mut self) {
        self.dhcp
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.xid);
    }
}

/// Retransmission schedule: `initial`, doubled each time, capped at 64 s
/// (RFC 2131 4.1: 4, 8, 16, 32, 64 s), each randomized by up to ±1/8 of it
/// (RFC 2131 says ±1 s on a 4 s base).
pub fn backoff(initial: Duration, attempt: u32) -> Duration {
    let base = initial
        .saturating_mul(1u32 << attempt.min(16))
        .min(Duration::from_secs(64).max(initial));
    let spread = base.as_secs_f64() / 8.0;
    let jitter = (rand::random::<f64>() * 2.0 - 1.0) * spread;
    Duration::from_secs_f64((base.as_secs_f64() + jitter).max(0.001))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips_through_the_parser_shape() {
        let mac = [2, 0x50, 0, 0, 0, 7];
        let b = encode_request(
            DISCOVER,
            0xdead_beef,
            3,
            mac,
            "127.16.0.1".parse().unwrap(),
            ClientKind::Ipxe,
            None,
        );
        assert!(b.len() >= 300, "{}", b.len());
        assert_eq!(&b[28..34], &mac);
        assert_eq!(b[3], 1);
        // A request is not a reply.
        assert_eq!(parse_reply(&b), None);
        let mut reply = b.clone();
        reply[0] = 2;
        reply[16..20].copy_from_slice(&[127, 16, 0, 9]);
        let r = parse_reply(&reply).unwrap();
        assert_eq!(r.xid, 0xdead_beef);
        assert_eq!(r.msg_type, DISCOVER);
        assert_eq!(r.yiaddr, Ipv4Addr::new(127, 16, 0, 9));
    }

    #[test]
    fn parser_refuses_truncated_options() {
        let mut b = encode_request(
            DISCOVER,
            1,
            0,
            [2, 0, 0, 0, 0, 1],
            Ipv4Addr::UNSPECIFIED,
            ClientKind::PxeRom,
            None,
        );
        b[0] = 2;
        b.truncate(HEADER_LEN + 4 + 3); // option 53, then half of option 61
        b[HEADER_LEN + 4 + 2] = 61;
        let _ = parse_reply(&b); // must not panic
        for cut in 0..b.len() {
            let _ = parse_reply(&b[..cut]);
        }
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let i = Duration::from_secs(4);
        for (a, want) in [
            (0, 4.0),
            (1, 8.0),
            (2, 16.0),
            (3, 32.0),
            (4, 64.0),
            (9, 64.0),
        ] {
            let d = backoff(i, a).as_secs_f64();
            assert!((d - want).abs() <= want / 8.0 + 1e-9, "attempt {a}: {d}");
        }
        let short = backoff(Duration::from_millis(100), 1).as_secs_f64();
        assert!((0.17..=0.23).contains(&short), "{short}");
    }
}
