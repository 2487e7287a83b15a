//! Hostile input against the real `pxemesh-relay` binary in a network
//! namespace: malformed and spoofed DHCP packets, random-MAC floods and
//! requests for another host's reserved address while a real client
//! (busybox udhcpc) still gets its reservation; odd TFTP options, duplicate
//! RRQs, ACK floods, abandoned transfers and connection floods while real
//! clients (tftp-hpa, curl) still fetch byte-identical files. Every phase
//! checks the drop counters on /metrics and explicit ceilings on the
//! relay's file descriptors and resident memory.
//!
//! Topology: namespace S holds bridge br0 (10.77.0.1/24) and the relay;
//! namespace C has two veth links into br0: c0 (the legitimate client) and
//! c1 (the attacker; no address at first, so its broadcasts leave from
//! 0.0.0.0 like a NIC ROM's). Nothing links to the root namespace.
//!
//! Needs root (skipped loudly otherwise).

mod netns;

use std::collections::HashSet;
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use dhcproto::v4::{DhcpOption, Flags, Message, MessageType};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};
use netns::{is_root, skip_unless, wait_for, Netns};

const RELAY: &str = env!("CARGO_BIN_EXE_pxemesh-relay");
const SERVER: &str = "10.77.0.1";
const N1_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xad, 0x00, 0x01];
const N1_IP: &str = "10.77.0.10";
const N2_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xad, 0x00, 0x02];
const N2_IP: &str = "10.77.0.11";
/// The attacker's address in phases that need one.
const ATTACKER_IP: &str = "10.77.0.66";
const CLIENT_IP: &str = "10.77.0.20";
const BIG: usize = 3 * 1024 * 1024 + 777;
/// Caps the test configures (small, so a few sockets reach them).
const TFTP_PER_CLIENT: usize = 8;
const HTTP_PER_CLIENT: usize = 16;

struct Lab {
    dir: tempfile::TempDir,
    s: Netns,
    c: Netns,
    pid: u32,
    big: Vec<u8>,
}

fn rand_bytes(n: usize, seed: u64) -> Vec<u8> {
    // xorshift: deterministic content, no dependency.
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

impl Lab {
    fn new(tag: &str) -> Lab {
        Lab::with(tag, |_| {})
    }

    /// `prepare(dir)` runs before the relay starts (e.g. mounts `dir/data`).
    fn with(tag: &str, prepare: impl FnOnce(&std::path::Path)) -> Lab {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        fs::create_dir_all(d.join("boot")).unwrap();
        let big = rand_bytes(BIG, 0x5eed);
        fs::write(d.join("boot/big.bin"), &big).unwrap();
        let mac = |m: [u8; 6]| {
            m.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        };
        let rack = format!(
            r#"rack = "adv"

[[networks]]
name = "prov"
rack = "adv"
subnet = "10.77.0.0/24"
gateway = "10.77.0.1"
dns = ["10.77.0.1"]
domain = "adv.pxemesh.test"
mtu = 1500
lease_seconds = 600
pool = ["10.77.0.100", "10.77.0.160"]

[[hosts]]
name = "n1"
mac = "{}"
ip = "{N1_IP}"
rack = "adv"
network = "prov"

[[hosts]]
name = "n2"
mac = "{}"
ip = "{N2_IP}"
rack = "adv"
network = "prov"
"#,
            mac(N1_MAC),
            mac(N2_MAC)
        );
        fs::write(d.join("rack.toml"), rack).unwrap();
        let relay = format!(
            r#"name = "adv"
data_dir = "{d}/data"
static_state = "{d}/rack.toml"
metrics_listen = "127.0.0.1:9200"

[[interfaces]]
name = "br0"
address = "{SERVER}"

[dhcp]
offer_hold_seconds = 30

[tftp]
listen = "0.0.0.0:69"
timeout_ms = 300
retries = 3

[http]
listen = "0.0.0.0:8080"

[boot]
dir = "{d}/boot"

[limits]
dhcp_source_per_second = 100.0
dhcp_source_burst = 500
tftp_per_client = {TFTP_PER_CLIENT}
http_per_client = {HTTP_PER_CLIENT}
"#,
            d = d.display()
        );
        fs::write(d.join("relay.toml"), relay).unwrap();
        prepare(d);

        let s = Netns::new(&format!("adv{tag}s"));
        let c = Netns::new(&format!("adv{tag}c"));
        s.bridge("br0", &format!("{SERVER}/24"));
        for (port, cif) in [("p0", "c0"), ("p1", "c1")] {
            s.ip(&[
                "link", "add", port, "type", "veth", "peer", "name", cif, "netns", &c.name,
            ]);
            s.ip(&["link", "set", port, "master", "br0"]);
            s.ip(&["link", "set", port, "up"]);
            c.ip(&["link", "set", cif, "up"]);
        }
        let mut lab = Lab {
            dir,
            s,
            c,
            pid: 0,
            big,
        };
        let log = lab.path("relay.log");
        let cfg = lab.path("relay.toml").display().to_string();
        lab.pid = lab.s.spawn(RELAY, &["-c", &cfg, "--log", "info"], &log);
        let up = wait_for(Duration::from_secs(20), || {
            if !lab.alive() {
                return Some(String::new());
            }
            lab.try_metrics().filter(|m| m.contains("pxemesh_relay"))
        })
        .filter(|m| !m.is_empty());
        assert!(up.is_some(), "relay did not start:\n{}", lab.log());
        lab
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn log(&self) -> String {
        fs::read_to_string(self.path("relay.log")).unwrap_or_default()
    }

    fn try_metrics(&self) -> Option<String> {
        in_netns(&self.s.name, || -> Option<String> {
            let mut t = TcpStream::connect("127.0.0.1:9200").ok()?;
            t.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            t.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
                .ok()?;
            let mut s = String::new();
            t.read_to_string(&mut s).ok()?;
            Some(s)
        })
    }

    fn metrics(&self) -> String {
        self.try_metrics().expect("metrics endpoint")
    }

    /// A sample's value (0 when absent).
    fn value(&self, text: &str, name_and_labels: &str) -> f64 {
        text.lines()
            .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    fn dropped(&self, text: &str, protocol: &str, reason: &str) -> f64 {
        self.value(
            text,
            &format!("pxemesh_relay_dropped_total{{protocol=\"{protocol}\",reason=\"{reason}\"}}"),
        )
    }

    fn fds(&self) -> usize {
        fs::read_dir(format!("/proc/{}/fd", self.pid))
            .map(|d| d.count())
            .unwrap_or(usize::MAX)
    }

    fn rss_kib(&self) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(u64::MAX)
    }

    /// Running (a dead child stays a zombie until the namespace guard reaps it).
    fn alive(&self) -> bool {
        fs::read_to_string(format!("/proc/{}/status", self.pid))
            .map(|s| {
                !s.lines()
                    .any(|l| l.starts_with("State:") && l.contains('Z'))
            })
            .unwrap_or(false)
    }
}

/// Run `f` on a thread inside network namespace `ns`.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: a valid fd of a network namespace; affects this thread only.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("thread in namespace")
}

/// A UDP socket on `dev` (SO_BINDTODEVICE), broadcast allowed.
fn dev_socket(dev: &str, bind: SocketAddr) -> UdpSocket {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
    s.set_reuse_address(true).unwrap();
    s.set_broadcast(true).unwrap();
    s.bind_device(Some(dev.as_bytes())).unwrap();
    s.bind(&bind.into()).unwrap();
    let u: UdpSocket = s.into();
    u.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    u
}

fn dhcp(kind: MessageType, mac: [u8; 6], xid: u32, opts: &[DhcpOption]) -> Vec<u8> {
    let u = Ipv4Addr::UNSPECIFIED;
    let mut m = Message::new_with_id(xid, u, u, u, u, &mac);
    m.set_flags(Flags::default().set_broadcast());
    m.opts_mut().insert(DhcpOption::MessageType(kind));
    for o in opts {
        m.opts_mut().insert(o.clone());
    }
    let mut b = Vec::new();
    m.encode(&mut Encoder::new(&mut b)).unwrap();
    b
}

fn random_mac(i: u32) -> [u8; 6] {
    let b = i.to_be_bytes();
    [0x02, 0xee, b[0], b[1], b[2], b[3]]
}

const BCAST: &str = "255.255.255.255:67";

#[test]
fn dhcp_hostile_input_and_floods() {
    if skip_unless(is_root(), "not root: network namespaces") {
        return;
    }
    if skip_unless(netns::have("udhcpc"), "udhcpc not installed") {
        return;
    }
    let lab = Lab::new("d");
    let (fd0, rss0) = (lab.fds(), lab.rss_kib());
    let before = lab.metrics();

    // --- malformed and spoofed packets, 5 of each --------------------------
    let good = dhcp(MessageType::Discover, random_mac(1), 1, &[]);
    let mut truncated = good.clone();
    truncated.truncate(120);
    let mut oversize = good.clone();
    oversize.resize(5000, 0);
    let mut bad_cookie = good.clone();
    bad_cookie[236] = 0x42;
    let mut bad_len = good[..240].to_vec();
    bad_len.extend_from_slice(&[53, 1, 1, 60, 250, b'P', b'X', 255]);
    let mut spoofed = good.clone();
    spoofed[24..28].copy_from_slice(&[10, 77, 0, 99]); // giaddr from a NIC with no address
    let cases = vec![truncated, oversize, bad_cookie, bad_len, spoofed];
    in_netns(&lab.c.name, move || {
        let sock = dev_socket("c1", "0.0.0.0:0".parse().unwrap());
        for _ in 0..5 {
            for p in &cases {
                sock.send_to(p, BCAST).unwrap();
            }
        }
    });

    // --- a reserved address asked for by others -----------------------------
    // A pool client (unknown MAC) and the other reserved host request n1's
    // address: both get a NAK, never an ACK of it.
    let replies = in_netns(&lab.c.name, move || {
        let sock = dev_socket("c1", "0.0.0.0:68".parse().unwrap());
        let n1: Ipv4Addr = N1_IP.parse().unwrap();
        let server: Ipv4Addr = SERVER.parse().unwrap();
        let mut got = Vec::new();
        for (xid, mac) in [(0xbad1u32, random_mac(0xff00)), (0xbad2, N2_MAC)] {
            let req = dhcp(
                MessageType::Request,
                mac,
                xid,
                &[
                    DhcpOption::RequestedIpAddress(n1),
                    DhcpOption::ServerIdentifier(server),
                ],
            );
            let mut reply = None;
            for _ in 0..5 {
                sock.send_to(&req, BCAST).unwrap();
                let mut buf = [0u8; 1500];
                let until = Instant::now() + Duration::from_millis(500);
                while Instant::now() < until {
                    let Ok((n, _)) = sock.recv_from(&mut buf) else {
                        continue;
                    };
                    let Ok(m) = Message::decode(&mut Decoder::new(&buf[..n])) else {
                        continue;
                    };
                    if m.xid() == xid {
                        reply = Some((m.opts().msg_type(), m.yiaddr()));
                        break;
                    }
                }
                if reply.is_some() {
                    break;
                }
            }
            got.push(reply);
        }
        got
    });
    for r in &replies {
        assert_eq!(
            *r,
            Some((Some(MessageType::Nak), Ipv4Addr::UNSPECIFIED)),
            "a request for another host's reserved address: {replies:?}"
        );
    }

    // --- starvation: 3000 random MACs from 0.0.0.0 while udhcpc boots --------
    let flood_ns = lab.c.name.clone();
    let flood = std::thread::spawn(move || {
        in_netns(&flood_ns, move || {
            let sock = dev_socket("c1", "0.0.0.0:0".parse().unwrap());
            let start = Instant::now();
            for i in 0..3000u32 {
                let p = dhcp(MessageType::Discover, random_mac(0x1000 + i), i, &[]);
                let _ = sock.send_to(&p, BCAST);
                if i % 100 == 99 {
                    std::thread::sleep(Duration::from_millis(50));
                }
                if start.elapsed() > Duration::from_secs(20) {
                    break;
                }
            }
        })
    });
    lab.c.ip(&["link", "set", "c0", "down"]);
    lab.c
        .ip(&["link", "set", "c0", "address", "52:54:00:ad:00:01"]);
    lab.c.ip(&["link", "set", "c0", "up"]);
    let out = lab
        .c
        .cmd("udhcpc")
        .args([
            "-f",
            "-q",
            "-n",
            "-t",
            "6",
            "-T",
            "2",
            "-i",
            "c0",
            "-s",
            "/bin/true",
        ])
        .output()
        .expect("run udhcpc");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    flood.join().unwrap();
    assert!(out.status.success(), "udhcpc during the flood: {text}");
    assert!(
        text.contains(&format!("lease of {N1_IP} obtained")),
        "udhcpc got its reservation: {text}"
    );

    // --- one MAC hammering: the per-MAC bucket (burst 20) -------------------
    in_netns(&lab.c.name, || {
        let sock = dev_socket("c1", "0.0.0.0:0".parse().unwrap());
        let p = dhcp(MessageType::Discover, random_mac(0xdead), 7, &[]);
        for _ in 0..200 {
            let _ = sock.send_to(&p, BCAST);
        }
    });

    // --- a sender with an address spraying MACs: the per-source bucket ------
    lab.c
        .ip(&["addr", "add", &format!("{ATTACKER_IP}/24"), "dev", "c1"]);
    in_netns(&lab.c.name, || {
        let sock = dev_socket("c1", format!("{ATTACKER_IP}:0").parse().unwrap());
        for i in 0..6000u32 {
            let p = dhcp(MessageType::Discover, random_mac(0x10_0000 + i), i, &[]);
            let _ = sock.send_to(&p, BCAST);
        }
    });

    let after = wait_for(Duration::from_secs(5), || {
        let m = lab.metrics();
        (lab.dropped(&m, "dhcp", "rate_limited_source") > 0.0).then_some(m)
    })
    .unwrap_or_else(|| lab.metrics());
    let delta =
        |reason: &str| lab.dropped(&after, "dhcp", reason) - lab.dropped(&before, "dhcp", reason);
    for reason in [
        "malformed",
        "oversize",
        "bad_cookie",
        "bad_option_length",
        "spoofed_giaddr",
    ] {
        assert_eq!(delta(reason), 5.0, "{reason}:\n{after}");
    }
    assert_eq!(delta("foreign_reservation"), 2.0, "{after}");
    let mac_limited = delta("rate_limited_mac");
    let source_limited = delta("rate_limited_source");
    assert!(
        mac_limited >= 150.0,
        "200 packets of one MAC, burst 20: {mac_limited}"
    );
    assert!(
        source_limited >= 2000.0,
        "6000 packets from one address, burst 500: {source_limited}"
    );
    let exhausted = lab.value(
        &after,
        "pxemesh_relay_dhcp_messages_total{msg_type=\"discover\",outcome=\"ignored-pool-exhausted\"}",
    );
    assert!(exhausted > 1000.0, "the pool ran out: {exhausted}");
    let tracked = lab.value(&after, "pxemesh_relay_dhcp_limiter_tracked_keys");
    assert!(
        tracked > 3000.0 && tracked <= 65_536.0,
        "tracked keys {tracked}"
    );
    // No MAC or address ever becomes a label value.
    for l in after
        .lines()
        .filter(|l| l.starts_with("pxemesh_relay_dropped"))
    {
        assert!(!l.contains("02:ee") && !l.contains("10.77."), "{l}");
    }
    let (fd1, rss1) = (lab.fds(), lab.rss_kib());
    eprintln!(
        "dhcp: fds {fd0} -> {fd1}, rss {rss0} -> {rss1} KiB, dropped mac {mac_limited} source {source_limited}, pool-exhausted {exhausted}, tracked {tracked}"
    );
    assert!(lab.alive(), "relay died:\n{}", lab.log());
    assert!(fd1 <= fd0 + 4, "fds grew: {fd0} -> {fd1}");
    assert!(rss1 < 96 * 1024, "RSS {rss1} KiB");
    assert!(rss1 < rss0 + 48 * 1024, "RSS grew {rss0} -> {rss1} KiB");
}

// ---------------------------------------------------------------- TFTP/HTTP

fn rrq(name: &str, opts: &[(&str, &str)]) -> Vec<u8> {
    let mut b = vec![0, 1];
    b.extend_from_slice(name.as_bytes());
    b.push(0);
    b.extend_from_slice(b"octet\0");
    for (k, v) in opts {
        b.extend_from_slice(k.as_bytes());
        b.push(0);
        b.extend_from_slice(v.as_bytes());
        b.push(0);
    }
    b
}

fn ack(block: u16) -> [u8; 4] {
    let b = block.to_be_bytes();
    [0, 4, b[0], b[1]]
}

#[derive(Debug, PartialEq)]
enum Reply {
    Data(u16, usize),
    Oack(Vec<(String, String)>),
    Error(u16, String),
    Other,
}

fn parse_reply(b: &[u8]) -> Reply {
    if b.len() < 4 {
        return Reply::Other;
    }
    let n = u16::from_be_bytes([b[2], b[3]]);
    match b[1] {
        3 => Reply::Data(n, b.len() - 4),
        5 => Reply::Error(
            n,
            String::from_utf8_lossy(&b[4..])
                .trim_end_matches('\0')
                .into(),
        ),
        6 => {
            let parts: Vec<String> = b[2..]
                .split(|&c| c == 0)
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect();
            Reply::Oack(
                parts
                    .chunks(2)
                    .filter(|c| c.len() == 2 && !c[0].is_empty())
                    .map(|c| (c[0].clone(), c[1].clone()))
                    .collect(),
            )
        }
        _ => Reply::Other,
    }
}

fn client(ip: &str) -> UdpSocket {
    let s = UdpSocket::bind(format!("{ip}:0")).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    s
}

/// Send an RRQ and return the first reply and the transfer port.
fn first_reply(s: &UdpSocket, req: &[u8]) -> (Reply, SocketAddr) {
    s.send_to(req, format!("{SERVER}:69")).unwrap();
    let mut buf = vec![0u8; 70000];
    let (n, from) = s.recv_from(&mut buf).expect("a reply to the RRQ");
    (parse_reply(&buf[..n]), from)
}

fn abort(s: &UdpSocket, to: SocketAddr) {
    let _ = s.send_to(b"\x00\x05\x00\x00done\x00", to);
}

/// A lockstep download after the first reply (tolerates duplicates).
fn download(
    s: &UdpSocket,
    blksize: usize,
    first: (Reply, SocketAddr),
    acks_flood: usize,
) -> Vec<u8> {
    let (reply, peer) = first;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 70000];
    let mut expect: u16 = 1;
    assert!(matches!(reply, Reply::Oack(_)), "{reply:?}");
    // Re-ACK well within the relay's give-up time (300 ms x 3 retries).
    s.set_read_timeout(Some(Duration::from_millis(150)))
        .unwrap();
    s.send_to(&ack(0), peer).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut flooded = false;
    loop {
        assert!(Instant::now() < deadline, "download stalled");
        let Ok((n, from)) = s.recv_from(&mut buf) else {
            s.send_to(&ack(expect.wrapping_sub(1)), peer).unwrap();
            continue;
        };
        if from == peer && n >= 4 && buf[1] == 5 {
            panic!(
                "the relay ended the transfer at block {expect}: {:?}",
                parse_reply(&buf[..n])
            );
        }
        if from != peer || n < 4 || buf[1] != 3 {
            continue;
        }
        let block = u16::from_be_bytes([buf[2], buf[3]]);
        if block != expect {
            continue;
        }
        out.extend_from_slice(&buf[4..n]);
        s.send_to(&ack(block), peer).unwrap();
        if !flooded && acks_flood > 0 {
            // ACK flood: the same ACK and stale ones, thousands of times.
            for i in 0..acks_flood {
                let _ = s.send_to(&ack(block.wrapping_sub((i % 3) as u16)), peer);
            }
            flooded = true;
        }
        if n - 4 < blksize {
            return out;
        }
        expect = expect.wrapping_add(1);
    }
}

#[test]
fn tftp_and_http_hostile_clients() {
    if skip_unless(is_root(), "not root: network namespaces") {
        return;
    }
    if skip_unless(
        netns::have("tftp") && netns::have("curl"),
        "tftp-hpa or curl not installed",
    ) {
        return;
    }
    let lab = Lab::new("t");
    lab.c
        .ip(&["addr", "add", &format!("{CLIENT_IP}/24"), "dev", "c0"]);
    // /32: the subnet route (and so the source of tftp-hpa, which cannot
    // choose one) stays the legitimate client's.
    lab.c
        .ip(&["addr", "add", &format!("{ATTACKER_IP}/32"), "dev", "c1"]);
    let (fd0, rss0) = (lab.fds(), lab.rss_kib());
    let before = lab.metrics();
    let big = lab.big.clone();

    // --- odd options: each answered within the limits ------------------------
    let results = in_netns(&lab.c.name, || {
        let mut r = Vec::new();
        for opts in [
            vec![("blksize", "0")],
            vec![("blksize", "7")],
            vec![("blksize", "999999")],
            vec![("blksize", "1001")],
            vec![("windowsize", "0")],
            vec![("windowsize", "999999")],
            vec![("windowsize", "65535")],
            vec![("blksize", "-5"), ("windowsize", "x")],
            vec![("timeout", "0"), ("tsize", "banana")],
        ] {
            let s = client(ATTACKER_IP);
            let (reply, peer) = first_reply(&s, &rrq("big.bin", &opts));
            abort(&s, peer);
            r.push((format!("{opts:?}"), reply));
        }
        // Hundreds of options in one RRQ.
        let many: Vec<(String, String)> = (0..400).map(|i| (format!("x{i}"), "1".into())).collect();
        let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let s = client(ATTACKER_IP);
        let (reply, peer) = first_reply(&s, &rrq("big.bin", &many));
        abort(&s, peer);
        r.push(("400 unknown options".into(), reply));
        // Malformed: no mode terminator.
        let s = client(ATTACKER_IP);
        let (reply, _) = first_reply(&s, b"\x00\x01big.bin\x00oct");
        r.push(("no mode".into(), reply));
        r
    });
    let oack = |pairs: &[(&str, &str)]| {
        Reply::Oack(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    };
    let expected = [
        Reply::Data(1, 512),
        Reply::Data(1, 512),
        oack(&[("blksize", "1468")]),
        oack(&[("blksize", "1001")]),
        Reply::Data(1, 512),
        Reply::Data(1, 512),
        oack(&[("windowsize", "64")]),
        Reply::Data(1, 512),
        Reply::Data(1, 512),
        Reply::Data(1, 512),
        Reply::Error(4, "malformed request".into()),
    ];
    for ((what, got), want) in results.iter().zip(expected.iter()) {
        assert_eq!(got, want, "RRQ with {what}");
    }

    // --- duplicate RRQs from one port: one transfer -------------------------
    let ports = in_netns(&lab.c.name, || {
        let s = client(ATTACKER_IP);
        let req = rrq("big.bin", &[("blksize", "1468")]);
        for _ in 0..50 {
            s.send_to(&req, format!("{SERVER}:69")).unwrap();
        }
        let mut ports = HashSet::new();
        let mut buf = vec![0u8; 2000];
        s.set_read_timeout(Some(Duration::from_millis(400)))
            .unwrap();
        while let Ok((_, from)) = s.recv_from(&mut buf) {
            ports.insert(from);
        }
        for p in &ports {
            abort(&s, *p);
        }
        ports.len()
    });
    assert_eq!(ports, 1, "50 identical RRQs from one port");

    // --- ACK flood in the middle of a transfer: still byte-identical ---------
    let got = in_netns(&lab.c.name, || {
        let s = client(ATTACKER_IP);
        let first = first_reply(&s, &rrq("big.bin", &[("blksize", "1468")]));
        download(&s, 1468, first, 5000)
    });
    assert!(
        got == big,
        "ACK-flooded download differs ({} bytes)",
        got.len()
    );

    // --- transfers abandoned mid-way, beyond the per-client cap --------------
    let idle = |lab: &Lab| {
        wait_for(Duration::from_secs(10), || {
            let m = lab.metrics();
            (lab.value(&m, "pxemesh_relay_tftp_active_transfers") == 0.0).then_some(())
        })
        .is_some()
    };
    assert!(idle(&lab), "earlier transfers still active");
    let (started, busy) = in_netns(&lab.c.name, || {
        let mut started = 0;
        let mut busy = 0;
        let mut keep = Vec::new();
        for _ in 0..(TFTP_PER_CLIENT + 4) {
            let s = client(ATTACKER_IP);
            match first_reply(&s, &rrq("big.bin", &[])) {
                (Reply::Data(1, 512), peer) => {
                    s.send_to(&ack(1), peer).unwrap(); // then walk away
                    started += 1;
                }
                (Reply::Error(0, m), _) if m == "server busy" => busy += 1,
                (r, _) => panic!("unexpected {r:?}"),
            }
            keep.push(s);
        }
        (started, busy)
    });
    assert_eq!((started, busy), (TFTP_PER_CLIENT, 4));
    // Meanwhile another client is served, byte-identical (tftp-hpa).
    let out = lab.path("tftp-hpa.bin");
    let st = lab
        .c
        .cmd("tftp")
        .args(["-m", "binary", SERVER, "-c", "get", "big.bin"])
        .arg(&out)
        .current_dir(lab.path(""))
        .status()
        .unwrap();
    assert!(st.success());
    assert!(fs::read(&out).unwrap() == big, "tftp-hpa copy differs");
    // The abandoned transfers time out (300 ms x 3 retries) and free the slots.
    assert!(idle(&lab), "abandoned transfers still active");
    let again = in_netns(&lab.c.name, || {
        let s = client(ATTACKER_IP);
        let (r, peer) = first_reply(&s, &rrq("big.bin", &[]));
        abort(&s, peer);
        r
    });
    assert_eq!(again, Reply::Data(1, 512), "slots freed after the timeouts");

    // --- HTTP: a connection flood from one address ---------------------------
    let (held, refused, fds_during) = {
        let pid = lab.pid;
        in_netns(&lab.c.name, move || {
            let mut held = Vec::new();
            let mut refused = 0;
            for _ in 0..(HTTP_PER_CLIENT + 24) {
                let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                    .unwrap();
                sock.bind(
                    &format!("{ATTACKER_IP}:0")
                        .parse::<SocketAddr>()
                        .unwrap()
                        .into(),
                )
                .unwrap();
                sock.connect(
                    &format!("{SERVER}:8080")
                        .parse::<SocketAddr>()
                        .unwrap()
                        .into(),
                )
                .unwrap();
                let mut t: TcpStream = sock.into();
                t.set_read_timeout(Some(Duration::from_millis(300)))
                    .unwrap();
                let mut b = [0u8; 64];
                match t.read(&mut b) {
                    Ok(n) if n > 0 => {
                        assert!(b[..n].starts_with(b"HTTP/1.1 503"), "{:?}", &b[..n]);
                        refused += 1;
                    }
                    Ok(_) => refused += 1, // closed
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        held.push(t) // idle: a slot is held
                    }
                    Err(_) => refused += 1, // reset
                }
            }
            let fds = fs::read_dir(format!("/proc/{pid}/fd"))
                .map(|d| d.count())
                .unwrap_or(0);
            // While the idle connections are held, a real client is served.
            let out = Command::new("curl")
                .args(["-sf", "--interface", CLIENT_IP, "-o", "-"])
                .arg(format!("http://{SERVER}:8080/files/big.bin"))
                .output()
                .unwrap();
            assert!(out.status.success(), "curl during the flood");
            assert!(out.stdout == rand_bytes(BIG, 0x5eed), "curl copy differs");
            (held.len(), refused, fds)
        })
    };
    assert_eq!((held, refused), (HTTP_PER_CLIENT, 24));

    let after = lab.metrics();
    let delta = |p: &str, r: &str| lab.dropped(&after, p, r) - lab.dropped(&before, p, r);
    assert_eq!(delta("tftp", "client_transfer_cap"), 4.0, "{after}");
    assert_eq!(delta("tftp", "malformed"), 1.0, "{after}");
    assert_eq!(delta("http", "client_transfer_cap"), 24.0, "{after}");
    let (fd1, rss1) = (lab.fds(), lab.rss_kib());
    eprintln!(
        "tftp/http: fds {fd0} -> {fds_during} (with {HTTP_PER_CLIENT} idle connections held) -> {fd1}, rss {rss0} -> {rss1} KiB"
    );
    assert!(lab.alive(), "relay died:\n{}", lab.log());
    assert!(
        fds_during <= fd0 + HTTP_PER_CLIENT + 4,
        "fds during the flood: {fd0} -> {fds_during}"
    );
    assert!(
        fd1 <= fd0 + HTTP_PER_CLIENT + 4,
        "fds after: {fd0} -> {fd1}"
    );
    assert!(rss1 < 128 * 1024, "RSS {rss1} KiB");
}

/// `/metrics` has no authentication: a non-loopback bind is refused unless
/// explicitly allowed (no namespace needed: the relay exits before binding).
#[test]
fn remote_metrics_bind_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fs::write(d.join("rack.toml"), "rack = \"r\"\n").unwrap();
    let write = |extra: &str| {
        fs::write(
            d.join("relay.toml"),
            format!(
                "name = \"r\"\ndata_dir = \"{0}/data\"\nstatic_state = \"{0}/rack.toml\"\nmetrics_listen = \"0.0.0.0:0\"\n{extra}\n[dhcp]\nenabled = false\n[tftp]\nenabled = false\n[http]\nenabled = false\n",
                d.display()
            ),
        )
        .unwrap();
    };
    write("");
    let out = Command::new(RELAY)
        .args(["-c"])
        .arg(d.join("relay.toml"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("not a loopback address") && err.contains("metrics_allow_remote"),
        "{err}"
    );
}

// ---------------------------------------------------------------- disk full

/// `dir` with a size-limited tmpfs mounted on it; unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Tmpfs {
        fs::create_dir_all(dir).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs on {}", dir.display());
        Tmpfs(dir.to_path_buf())
    }

    /// Write zeros to `name` until the file system is full.
    fn fill(&self, name: &str) -> u64 {
        let mut f = fs::File::create(self.0.join(name)).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        let mut n = 0u64;
        while f.write_all(&chunk).is_ok() {
            n += chunk.len() as u64;
            assert!(n < 1 << 30, "tmpfs does not fill");
        }
        // Top up the last partial chunk byte by byte (bounded).
        for _ in 0..chunk.len() {
            if f.write_all(&[0]).is_err() {
                break;
            }
        }
        n
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// One DISCOVER/OFFER/REQUEST exchange from `mac` on c1: the ACKed address,
/// or None (no OFFER or no ACK within the retries).
fn dora(ns: &str, mac: [u8; 6], xid: u32) -> Option<Ipv4Addr> {
    in_netns(ns, move || {
        let sock = dev_socket("c1", "0.0.0.0:68".parse().unwrap());
        let server: Ipv4Addr = SERVER.parse().unwrap();
        let exchange = |p: &[u8], want: MessageType| -> Option<Message> {
            let mut buf = [0u8; 1500];
            for _ in 0..3 {
                sock.send_to(p, BCAST).ok()?;
                let until = Instant::now() + Duration::from_millis(700);
                while Instant::now() < until {
                    let Ok((n, _)) = sock.recv_from(&mut buf) else {
                        continue;
                    };
                    let Ok(m) = Message::decode(&mut Decoder::new(&buf[..n])) else {
                        continue;
                    };
                    if m.xid() == xid && m.opts().msg_type() == Some(want) {
                        return Some(m);
                    }
                }
            }
            None
        };
        let offer = exchange(
            &dhcp(MessageType::Discover, mac, xid, &[]),
            MessageType::Offer,
        )?;
        let req = dhcp(
            MessageType::Request,
            mac,
            xid,
            &[
                DhcpOption::RequestedIpAddress(offer.yiaddr()),
                DhcpOption::ServerIdentifier(server),
            ],
        );
        exchange(&req, MessageType::Ack).map(|m| m.yiaddr())
    })
}

/// The relay's data directory (pool lease log, sled with the boot events)
/// on a full file system: new pool leases are refused (never ACKed without
/// being durable), reserved hosts keep booting, the log says why. Once space
/// returns, the lease log's next group commit succeeds and new leases are
/// granted without a restart; after a restart every lease ACKed before
/// (also on the nearly full disk) is intact.
#[test]
fn relay_database_on_a_full_disk() {
    if skip_unless(is_root(), "not root: network namespaces and tmpfs mounts") {
        return;
    }
    let mut mount = None;
    let mut lab = Lab::with("f", |d| {
        // The relay needs 16 MiB free to start (limits::STARTUP_MIN_FREE_BYTES).
        mount = Some(Tmpfs::mount(&d.join("data"), "32m"));
    });
    let mount = mount.expect("mounted");
    let first = dora(&lab.c.name, random_mac(0xf001), 0xf001);
    assert!(first.is_some(), "a pool lease before the disk fills");
    let _ = &mut lab;

    let filled = mount.fill("filler");
    // Writes into pages the database already holds still succeed on a full
    // tmpfs, so keep asking for new leases until one needs a new page.
    let mut acked = vec![(random_mac(0xf001), first)];
    let mut refused = None;
    for i in 0..40u32 {
        let mac = random_mac(0xf100 + i);
        match dora(&lab.c.name, mac, 0xf100 + i) {
            Some(ip) => acked.push((mac, Some(ip))),
            None => {
                refused = Some(i);
                break;
            }
        }
    }
    let reserved = dora(&lab.c.name, N2_MAC, 0xf003);
    assert!(lab.alive(), "relay died on a full disk:\n{}", lab.log());
    fs::remove_file(mount.0.join("filler")).unwrap();
    // The changes the failed sync kept are written by the next one.
    let recovered = dora(&lab.c.name, random_mac(0xf004), 0xf004);
    let log = lab.log();
    eprintln!(
        "disk full: filled {filled} bytes; {} leases ACKed before one was refused ({refused:?}); reserved during: {reserved:?}; after: {recovered:?}",
        acked.len() - 1
    );
    assert!(
        refused.is_some(),
        "40 new leases on a full disk, none refused"
    );
    let journal_warnings = log.matches("cannot flush the boot event journal").count();
    assert!(
        journal_warnings <= 2,
        "journal flush failures flood the log: {journal_warnings} lines"
    );
    assert_eq!(
        reserved,
        Some(N2_IP.parse().unwrap()),
        "reserved host during"
    );
    assert!(
        log.contains("No space left on device") || log.contains("os error 28"),
        "the log names the cause:\n{log}"
    );
    assert!(
        recovered.is_some(),
        "no new pool lease after space returned (without a restart):\n{log}"
    );
    acked.push((random_mac(0xf004), recovered));

    // Stopped and started while the disk is full: refused with the cause
    // (sled opened on a full disk may corrupt itself), not half-opened.
    let cfg = lab.path("relay.toml").display().to_string();
    let _ = Command::new("kill").arg(lab.pid.to_string()).status();
    wait_for(Duration::from_secs(10), || (!lab.alive()).then_some(()));
    mount.fill("filler2");
    let out = lab
        .s
        .cmd(RELAY)
        .args(["-c", &cfg])
        .output()
        .expect("run the relay on a full disk");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("No space left on device"),
        "start on a full disk: {:?}\n{err}",
        out.status
    );
    eprintln!("start on a full disk: {}", err.trim());
    fs::remove_file(mount.0.join("filler2")).unwrap();
    // Restart on the same database once space is back.
    let log2 = lab.path("relay2.log");
    lab.pid = lab.s.spawn(RELAY, &["-c", &cfg, "--log", "info"], &log2);
    let up = wait_for(Duration::from_secs(20), || {
        lab.try_metrics().filter(|m| m.contains("pxemesh_relay"))
    });
    assert!(
        up.is_some(),
        "relay did not restart on its database:\n{}",
        fs::read_to_string(&log2).unwrap_or_default()
    );
    // Space is back: new leases again.
    let fresh = dora(&lab.c.name, random_mac(0xf005), 0xf005);
    assert!(fresh.is_some(), "no new lease after the restart");
    // Every lease ever ACKed survived (renewed to the same address).
    for (i, (mac, ip)) in acked.iter().enumerate() {
        let again = dora(&lab.c.name, *mac, 0xf200 + i as u32);
        assert_eq!(again, *ip, "lease {i} of {} after the restart", acked.len());
    }
    drop(lab);
    drop(mount);
}

/// A client trickling its request head a byte every few seconds is cut off
/// once the head has taken 60 s (not kept while each byte arrives in time).
#[test]
fn slow_request_head_is_cut_off() {
    if skip_unless(is_root(), "not root: network namespaces") {
        return;
    }
    let lab = Lab::new("s");
    lab.c
        .ip(&["addr", "add", &format!("{CLIENT_IP}/24"), "dev", "c0"]);
    let (closed_after, sent) = in_netns(&lab.c.name, || {
        let mut t = TcpStream::connect(format!("{SERVER}:8080")).unwrap();
        t.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
        let start = Instant::now();
        t.write_all(b"GET /files/big.bin HTTP/1.1\r\nX-Slow: ")
            .unwrap();
        let mut sent = 0;
        let mut b = [0u8; 64];
        loop {
            assert!(
                start.elapsed() < Duration::from_secs(80),
                "still open after 80 s"
            );
            // The relay closed: EOF, a reset, or a failed write.
            match t.read(&mut b) {
                Ok(0) => return (start.elapsed(), sent),
                Ok(_) => panic!("a reply to an incomplete head"),
                Err(e)
                    if !matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return (start.elapsed(), sent)
                }
                Err(_) => {}
            }
            if t.write_all(b"a").is_err() {
                return (start.elapsed(), sent);
            }
            sent += 1;
            std::thread::sleep(Duration::from_secs(2));
        }
    });
    eprintln!("slow head: closed after {closed_after:?}, {sent} bytes trickled");
    assert!(
        closed_after >= Duration::from_secs(55) && closed_after < Duration::from_secs(70),
        "closed after {closed_after:?}"
    );
}
