//! The DHCP server driven with bytes through `Server::process`, no sockets.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use dhcproto::v4::{
    Architecture, DhcpOption, Flags, Message, MessageType, Opcode, OptionCode, UnknownOption,
};
use dhcproto::{Encodable, Encoder};

use super::packet::decode;
use super::*;
use crate::config::{Interface, RelayConfig};
use crate::events::EventLog;
use crate::metrics::{DhcpLabels, RelayMetrics};
use crate::state::{shared, RackState};

const RACK: &str = r#"
rack = "r1"

[[networks]]
name = "prov"
rack = "r1"
subnet = "10.20.0.0/24"
gateway = "10.20.0.1"
dns = ["10.20.0.1", "10.20.0.3"]
domain = "rack1.example"
mtu = 9000
lease_seconds = 600

[[networks]]
name = "dyn"
rack = "r1"
subnet = "10.30.0.0/24"
gateway = "10.30.0.1"
dns = ["10.30.0.1"]
mtu = 1500
pool = ["10.30.0.200", "10.30.0.203"]
lease_seconds = 1000

[[networks]]
name = "remote"
rack = "r1"
subnet = "10.40.0.0/24"
gateway = "10.40.0.1"
mtu = 1500
lease_seconds = 3600

[[profiles]]
name = "centos"
kind = "kickstart"
kernel = "centos/vmlinuz"

[[hosts]]
name = "n1"
mac = "52:54:00:12:34:01"
ip = "10.20.0.11"
rack = "r1"
network = "prov"
profile = "centos"
hostname = "n1.rack1.example"

[[hosts]]
name = "d1"
mac = "52:54:00:12:34:02"
ip = "10.30.0.201"
rack = "r1"
network = "dyn"

[[hosts]]
name = "far1"
mac = "52:54:00:12:34:03"
ip = "10.40.0.50"
rack = "r1"
network = "remote"

# Known (an idle CloudStack bare metal host) but without a reservation.
[[hosts]]
name = "idle1"
mac = "52:54:00:12:34:09"
rack = "r1"
"#;

const CONFIG: &str = r#"
name = "relay-1"
data_dir = "/nonexistent"
static_state = "/nonexistent/rack.toml"
[[interfaces]]
name = "eth0"
address = "10.20.0.2"
[[interfaces]]
name = "eth1"
address = "10.30.0.2"
[http]
listen = "0.0.0.0:8080"
"#;

const N1: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x01];
const D1: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x02];
const FAR1: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x03];

struct T {
    server: Server,
    _dir: tempfile::TempDir,
    db_path: std::path::PathBuf,
}

fn eth0() -> Interface {
    Interface {
        name: "eth0".into(),
        address: ip("10.20.0.2"),
    }
}

fn eth1() -> Interface {
    Interface {
        name: "eth1".into(),
        address: ip("10.30.0.2"),
    }
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn setup() -> T {
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("db");
    let server = server_at(&dir, &db_path);
    T {
        server,
        _dir: dir,
        db_path,
    }
}

fn server_at(dir: &tempfile::TempDir, db_path: &std::path::Path) -> Server {
    let rack = dir.path().join("rack.toml");
    std::fs::write(&rack, RACK).unwrap();
    let state = shared(RackState::from_static_file(&rack).unwrap());
    let config = Arc::new(RelayConfig::from_toml(CONFIG).unwrap());
    let db = crate::durable::test_db(db_path);
    let metrics = Arc::new(RelayMetrics::new());
    let events = Arc::new(EventLog::open(&db, metrics.clone()).unwrap());
    let leases = Leases::open(&db_path.with_extension("leases"), None).unwrap();
    Server::new(Arc::new(DhcpContext {
        config,
        state,
        leases,
        events,
        metrics,
        loaders: Default::default(),
    }))
}

impl T {
    fn count(&self, msg_type: &str, outcome: &str) -> u64 {
        self.server
            .ctx
            .metrics
            .dhcp_messages
            .get_or_create(&DhcpLabels {
                msg_type: msg_type.into(),
                outcome: outcome.into(),
            })
            .get()
    }

    /// Send `m` on `iface`: the decoded reply and its destination.
    fn send(
        &self,
        iface: &Interface,
        m: &Message,
    ) -> Option<(Message, SocketAddr, Option<Vec<u8>>)> {
        self.send_bytes(iface, &enc(m))
    }

    fn send_bytes(
        &self,
        iface: &Interface,
        b: &[u8],
    ) -> Option<(Message, SocketAddr, Option<Vec<u8>>)> {
        let out = self.server.process(iface, b, 1_000_000)?;
        if out.flush {
            self.server.ctx.leases.flush().unwrap();
        }
        let r = decode(&out.bytes).expect("our reply decodes");
        assert_eq!(r.msg.opcode(), Opcode::BootReply);
        Some((r.msg, out.dest, r.relay_info))
    }
}

fn enc(m: &Message) -> Vec<u8> {
    let mut b = Vec::new();
    m.encode(&mut Encoder::new(&mut b)).unwrap();
    b
}

fn msg(kind: MessageType, mac: [u8; 6]) -> Message {
    let mut m = Message::new_with_id(
        0xabcd_0001,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &mac,
    );
    m.opts_mut().insert(DhcpOption::MessageType(kind));
    m.opts_mut().insert(DhcpOption::ParameterRequestList(vec![
        OptionCode::SubnetMask,
        OptionCode::Router,
        OptionCode::DomainNameServer,
        OptionCode::DomainName,
    ]));
    m
}

fn pxe(mut m: Message, class: &str, arch: Option<u16>) -> Message {
    m.opts_mut()
        .insert(DhcpOption::ClassIdentifier(class.as_bytes().to_vec()));
    if let Some(a) = arch {
        m.opts_mut()
            .insert(DhcpOption::ClientSystemArchitecture(Architecture::from(a)));
    }
    m
}

fn opt(m: &Message, code: OptionCode) -> Option<&DhcpOption> {
    m.opts().get(code)
}

fn bytes_opt(m: &Message, code: OptionCode) -> Option<String> {
    match opt(m, code)? {
        DhcpOption::BootfileName(b)
        | DhcpOption::TFTPServerName(b)
        | DhcpOption::ClassIdentifier(b) => Some(String::from_utf8_lossy(b).into_owned()),
        other => panic!("unexpected {other:?}"),
    }
}

/// A header string field (dhcproto's decoder keeps the NUL terminator).
fn hdr(f: Option<&[u8]>) -> &str {
    std::str::from_utf8(f.expect("header field set"))
        .unwrap()
        .trim_end_matches('\0')
}

fn bcast() -> SocketAddr {
    "255.255.255.255:68".parse().unwrap()
}

#[test]
fn bios_pxe_discover_gets_offer_with_all_options() {
    let t = setup();
    let m = pxe(
        msg(MessageType::Discover, N1),
        "PXEClient:Arch:00000:UNDI:002001",
        Some(0),
    );
    let (r, dest, relay) = t.send(&eth0(), &m).expect("offer");
    assert_eq!(r.opts().msg_type(), Some(MessageType::Offer));
    assert_eq!(r.xid(), 0xabcd_0001);
    assert_eq!(r.chaddr(), &N1);
    assert_eq!(r.yiaddr(), ip("10.20.0.11"));
    assert_eq!(dest, bcast());
    assert!(relay.is_none());
    assert_eq!(
        opt(&r, OptionCode::SubnetMask),
        Some(&DhcpOption::SubnetMask(ip("255.255.255.0")))
    );
    assert_eq!(
        opt(&r, OptionCode::Router),
        Some(&DhcpOption::Router(vec![ip("10.20.0.1")]))
    );
    assert_eq!(
        opt(&r, OptionCode::DomainNameServer),
        Some(&DhcpOption::DomainNameServer(vec![
            ip("10.20.0.1"),
            ip("10.20.0.3")
        ]))
    );
    assert_eq!(
        opt(&r, OptionCode::DomainName),
        Some(&DhcpOption::DomainName("rack1.example".into()))
    );
    assert_eq!(
        opt(&r, OptionCode::InterfaceMtu),
        Some(&DhcpOption::InterfaceMtu(9000))
    );
    assert_eq!(
        opt(&r, OptionCode::AddressLeaseTime),
        Some(&DhcpOption::AddressLeaseTime(600))
    );
    assert_eq!(
        opt(&r, OptionCode::Renewal),
        Some(&DhcpOption::Renewal(300))
    );
    assert_eq!(
        opt(&r, OptionCode::Rebinding),
        Some(&DhcpOption::Rebinding(525))
    );
    assert_eq!(
        opt(&r, OptionCode::ServerIdentifier),
        Some(&DhcpOption::ServerIdentifier(ip("10.20.0.2")))
    );
    assert_eq!(
        opt(&r, OptionCode::Hostname),
        Some(&DhcpOption::Hostname("n1.rack1.example".into()))
    );
    // PXE: TFTP from us.
    assert_eq!(r.siaddr(), ip("10.20.0.2"));
    assert_eq!(hdr(r.sname()), "10.20.0.2");
    assert_eq!(hdr(r.fname()), "undionly.kpxe");
    assert_eq!(
        bytes_opt(&r, OptionCode::TFTPServerName).as_deref(),
        Some("10.20.0.2")
    );
    assert_eq!(
        bytes_opt(&r, OptionCode::BootfileName).as_deref(),
        Some("undionly.kpxe")
    );
    assert!(opt(&r, OptionCode::ClassIdentifier).is_none());
    assert_eq!(t.count("discover", "offer"), 1);
    let ev = t.server.ctx.events.since(0, 10);
    assert_eq!(ev.len(), 1);
    assert_eq!(
        (ev[0].mac.as_str(), ev[0].detail.as_str()),
        ("52:54:00:12:34:01", "10.20.0.11")
    );
}

#[test]
fn uefi_x64_gets_the_efi_loader() {
    let t = setup();
    let m = pxe(
        msg(MessageType::Discover, N1),
        "PXEClient:Arch:00007:UNDI:003016",
        Some(7),
    );
    let (r, _, _) = t.send(&eth0(), &m).unwrap();
    assert_eq!(
        bytes_opt(&r, OptionCode::BootfileName).as_deref(),
        Some("ipxe.efi")
    );
    assert_eq!(hdr(r.fname()), "ipxe.efi");
    assert_eq!(r.siaddr(), ip("10.20.0.2"));
}

#[test]
fn uefi_http_boot_gets_a_url_and_httpclient() {
    let t = setup();
    let m = pxe(
        msg(MessageType::Discover, N1),
        "HTTPClient:Arch:00016:UNDI:003001",
        Some(16),
    );
    let (r, _, _) = t.send(&eth0(), &m).unwrap();
    let url = "http://10.20.0.2:8080/files/ipxe.efi";
    assert_eq!(
        bytes_opt(&r, OptionCode::BootfileName).as_deref(),
        Some(url)
    );
    assert_eq!(hdr(r.fname()), url);
    assert_eq!(
        bytes_opt(&r, OptionCode::ClassIdentifier).as_deref(),
        Some("HTTPClient")
    );
    assert!(opt(&r, OptionCode::TFTPServerName).is_none());
}

#[test]
fn ipxe_client_gets_its_script() {
    let t = setup();
    let script = "http://10.20.0.2:8080/boot/52:54:00:12:34:01.ipxe";
    let mut m = pxe(
        msg(MessageType::Discover, N1),
        "PXEClient:Arch:00000:UNDI:002001",
        Some(0),
    );
    m.opts_mut().insert(DhcpOption::UserClass(b"iPXE".to_vec()));
    let (r, _, _) = t.send(&eth0(), &m).unwrap();
    assert_eq!(
        bytes_opt(&r, OptionCode::BootfileName).as_deref(),
        Some(script)
    );
    // Option 175 alone (iPXE's encapsulated options) is enough.
    let mut m = msg(MessageType::Discover, N1);
    m.opts_mut().insert(DhcpOption::Unknown(UnknownOption::new(
        OptionCode::Unknown(175),
        vec![1, 1, 1],
    )));
    let (r, _, _) = t.send(&eth0(), &m).unwrap();
    assert_eq!(
        bytes_opt(&r, OptionCode::BootfileName).as_deref(),
        Some(script)
    );
}

#[test]
fn non_pxe_client_gets_no_boot_options() {
    let t = setup();
    let m = pxe(msg(MessageType::Discover, N1), "udhcp 1.35.0", None);
    let (r, _, _) = t.send(&eth0(), &m).unwrap();
    assert_eq!(r.yiaddr(), ip("10.20.0.11"));
    assert!(opt(&r, OptionCode::BootfileName).is_none());
    assert!(opt(&r, OptionCode::TFTPServerName).is_none());
    assert_eq!(r.siaddr(), Ipv4Addr::UNSPECIFIED);
    assert!(r.fname().is_none());
    assert!(opt(&r, OptionCode::Router).is_some());
}

#[test]
fn request_selecting_acks_and_other_servers_are_ignored() {
    let t = setup();
    let mut m = msg(MessageType::Request, N1);
    m.opts_mut()
        .insert(DhcpOption::ServerIdentifier(ip("10.20.0.2")));
    m.opts_mut()
        .insert(DhcpOption::RequestedIpAddress(ip("10.20.0.11")));
    let (r, dest, _) = t.send(&eth0(), &m).unwrap();
    assert_eq!(r.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(r.yiaddr(), ip("10.20.0.11"));
    assert_eq!(dest, bcast());
    assert_eq!(
        opt(&r, OptionCode::AddressLeaseTime),
        Some(&DhcpOption::AddressLeaseTime(600))
    );
    assert_eq!(t.count("request", "ack"), 1);
    // Selecting another server's offer: silence.
    m.opts_mut()
        .insert(DhcpOption::ServerIdentifier(ip("10.20.0.99")));
    assert!(t.send(&eth0(), &m).is_none());
    assert_eq!(t.count("request", "ignored-not-for-us"), 1);
    // Selecting our server but a wrong address: NAK.
    m.opts_mut()
        .insert(DhcpOption::ServerIdentifier(ip("10.20.0.2")));
    m.opts_mut()
        .insert(DhcpOption::RequestedIpAddress(ip("10.20.0.12")));
    let (r, _, _) = t.send(&eth0(), &m).unwrap();
    assert_eq!(r.opts().msg_type(), Some(MessageType::Nak));
}

#[test]
fn init_reboot_with_a_wrong_address_is_naked() {
    let t = setup();
    let mut m = msg(MessageType::Request, N1);
    m.opts_mut()
        .insert(DhcpOption::RequestedIpAddress(ip("10.20.0.99")));
    let (r, dest, _) = t.send(&eth0(), &m).unwrap();
    assert_eq!(r.opts().msg_type(), Some(MessageType::Nak));
    assert_eq!(r.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert_eq!(
        opt(&r, OptionCode::ServerIdentifier),
        Some(&DhcpOption::ServerIdentifier(ip("10.20.0.2")))
    );
    assert!(opt(&r, OptionCode::AddressLeaseTime).is_none());
    assert_eq!(dest, bcast());
    // Another network's address: NAK too. The right one: ACK.
    m.opts_mut()
        .insert(DhcpOption::RequestedIpAddress(ip("10.99.0.11")));
    assert_eq!(
        t.send(&eth0(), &m).unwrap().0.opts().msg_type(),
        Some(MessageType::Nak)
    );
    m.opts_mut()
        .insert(DhcpOption::RequestedIpAddress(ip("10.20.0.11")));
    assert_eq!(
        t.send(&eth0(), &m).unwrap().0.opts().msg_type(),
        Some(MessageType::Ack)
    );
    assert_eq!(t.count("request", "nak"), 2);
}

#[test]
fn renew_is_unicast_and_rebind_with_a_wrong_address_naks() {
    let t = setup();
    let mut m = msg(MessageType::Request, N1);
    m.set_ciaddr(ip("10.20.0.11"));
    let (r, dest, _) = t.send(&eth0(), &m).unwrap();
    assert_eq!(r.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(r.ciaddr(), ip("10.20.0.11"));
    assert_eq!(dest, "10.20.0.11:68".parse::<SocketAddr>().unwrap());
    m.set_ciaddr(ip("10.20.0.12"));
    let (r, dest, _) = t.send(&eth0(), &m).unwrap();
    assert_eq!(r.opts().msg_type(), Some(MessageType::Nak));
    assert_eq!(dest, bcast());
}

#[test]
fn relayed_requests_go_back_to_the_relay_with_option82() {
    let t = setup();
    let raw82 = vec![1, 4, b'p', b'o', b'r', b't', 2, 2, 0xca, 0xfe];
    let mut m = pxe(
        msg(MessageType::Discover, FAR1),
        "PXEClient:Arch:00000:UNDI:002001",
        Some(0),
    );
    m.set_giaddr(ip("10.40.0.1"));
    m.set_flags(Flags::default().set_broadcast());
    let mut b = enc(&m);
    assert_eq!(b.pop(), Some(255));
    b.extend_from_slice(&[82, raw82.len() as u8]);
    b.extend_from_slice(&raw82);
    b.push(255);
    // Arrives on eth0 (the relay agent forwards to 10.20.0.2).
    let (r, dest, relay) = t.send_bytes(&eth0(), &b).unwrap();
    assert_eq!(r.opts().msg_type(), Some(MessageType::Offer));
    assert_eq!(dest, "10.40.0.1:67".parse::<SocketAddr>().unwrap());
    assert_eq!(relay.as_deref(), Some(&raw82[..]));
    assert_eq!(r.yiaddr(), ip("10.40.0.50"));
    assert_eq!(r.giaddr(), ip("10.40.0.1"));
    assert!(r.flags().broadcast());
    assert_eq!(
        opt(&r, OptionCode::Router),
        Some(&DhcpOption::Router(vec![ip("10.40.0.1")]))
    );
    // Server id and boot server: the address the packet arrived on.
    assert_eq!(
        opt(&r, OptionCode::ServerIdentifier),
        Some(&DhcpOption::ServerIdentifier(ip("10.20.0.2")))
    );
    assert_eq!(r.siaddr(), ip("10.20.0.2"));
    // A relayed NAK goes to the relay too, broadcast bit set.
    let mut m = msg(MessageType::Request, FAR1);
    m.set_giaddr(ip("10.40.0.1"));
    m.opts_mut()
        .insert(DhcpOption::RequestedIpAddress(ip("10.40.0.51")));
    let (r, dest, _) = t.send(&eth0(), &m).unwrap();
    assert_eq!(r.opts().msg_type(), Some(MessageType::Nak));
    assert_eq!(dest, "10.40.0.1:67".parse::<SocketAddr>().unwrap());
    assert!(r.flags().broadcast());
}

#[test]
fn unknown_and_misplaced_macs_get_no_answer() {
    let t = setup();
    let stranger = [0x52, 0x54, 0, 0xde, 0xad, 0x01];
    for _ in 0..3 {
        assert!(t
            .send(&eth0(), &msg(MessageType::Discover, stranger))
            .is_none());
    }
    assert_eq!(t.count("discover", "ignored-unknown-mac"), 3);
    // (The log line is rate-limited per MAC, the counter is not: see below.)
    // Reserved on "prov" but asking on "dyn" (wrong VLAN): no answer.
    assert!(t.send(&eth1(), &msg(MessageType::Discover, N1)).is_none());
    assert_eq!(t.count("discover", "ignored-wrong-network"), 1);
    // An interface outside every network: no answer.
    let odd = Interface {
        name: "eth9".into(),
        address: ip("192.168.1.1"),
    };
    assert!(t.send(&odd, &msg(MessageType::Discover, N1)).is_none());
    assert_eq!(t.count("discover", "ignored-no-network"), 1);
}

/// A host without a reservation is not answered as a host: on a network
/// without a pool it is an unknown MAC, on one with a pool a pool client.
#[test]
fn hosts_without_a_reservation_are_unknown_macs() {
    let t = setup();
    let idle = [0x52, 0x54, 0, 0x12, 0x34, 0x09];
    assert!(t
        .server
        .ctx
        .state
        .load()
        .host_by_mac(&pxemesh_coordinator::model::Mac(idle))
        .is_none());
    assert!(t.send(&eth0(), &msg(MessageType::Discover, idle)).is_none());
    assert_eq!(t.count("discover", "ignored-unknown-mac"), 1);
    let got = pool_lease(&t, idle).expect("a pool lease");
    assert!(
        (ip("10.30.0.200")..=ip("10.30.0.203")).contains(&got) && got != ip("10.30.0.201"),
        "{got}"
    );
}

#[test]
fn log_limiter_allows_one_line_per_mac_per_minute() {
    let l = handler::LogLimiter::new();
    let a = pxemesh_coordinator::model::Mac(N1);
    let b = pxemesh_coordinator::model::Mac(D1);
    assert!(l.allow(a, "unknown-mac", 100));
    assert!(!l.allow(a, "unknown-mac", 159));
    assert!(l.allow(b, "unknown-mac", 120));
    assert!(l.allow(a, "wrong-network", 120));
    assert!(l.allow(a, "unknown-mac", 160));
}

#[test]
fn inform_gets_options_without_a_lease() {
    let t = setup();
    let mut m = pxe(
        msg(MessageType::Inform, N1),
        "PXEClient:Arch:00000:UNDI:002001",
        None,
    );
    m.set_ciaddr(ip("10.20.0.11"));
    let (r, dest, _) = t.send(&eth0(), &m).unwrap();
    assert_eq!(r.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(r.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert!(opt(&r, OptionCode::AddressLeaseTime).is_none());
    assert!(opt(&r, OptionCode::Renewal).is_none());
    assert!(opt(&r, OptionCode::SubnetMask).is_some());
    assert_eq!(
        bytes_opt(&r, OptionCode::BootfileName).as_deref(),
        Some("undionly.kpxe")
    );
    assert_eq!(dest, "10.20.0.11:68".parse::<SocketAddr>().unwrap());
}

fn stranger(n: u8) -> [u8; 6] {
    [0x02, 0, 0, 0, 0, n]
}

/// DISCOVER then REQUEST (selecting) on eth1: the bound address.
fn pool_lease(t: &T, mac: [u8; 6]) -> Option<Ipv4Addr> {
    let (offer, _, _) = t.send(&eth1(), &msg(MessageType::Discover, mac))?;
    assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
    let mut m = msg(MessageType::Request, mac);
    m.opts_mut()
        .insert(DhcpOption::ServerIdentifier(ip("10.30.0.2")));
    m.opts_mut()
        .insert(DhcpOption::RequestedIpAddress(offer.yiaddr()));
    let (ack, _, _) = t.send(&eth1(), &m).unwrap();
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack), "{ack:?}");
    assert_eq!(ack.yiaddr(), offer.yiaddr());
    assert_eq!(
        opt(&ack, OptionCode::AddressLeaseTime),
        Some(&DhcpOption::AddressLeaseTime(1000))
    );
    Some(ack.yiaddr())
}

#[test]
fn pool_allocation_is_unique_sticky_and_bounded() {
    let t = setup();
    // Pool .200-.203, but .201 is d1's reservation: three addresses.
    let a = pool_lease(&t, stranger(1)).unwrap();
    let b = pool_lease(&t, stranger(2)).unwrap();
    let c = pool_lease(&t, stranger(3)).unwrap();
    let mut all = vec![a, b, c];
    all.sort();
    all.dedup();
    assert_eq!(
        all,
        vec![ip("10.30.0.200"), ip("10.30.0.202"), ip("10.30.0.203")]
    );
    // Same MAC, same address.
    assert_eq!(pool_lease(&t, stranger(2)), Some(b));
    // Exhausted: no answer.
    assert!(t
        .send(&eth1(), &msg(MessageType::Discover, stranger(4)))
        .is_none());
    assert_eq!(t.count("discover", "ignored-pool-exhausted"), 1);
    // The reservation still works, from its own address.
    let (r, _, _) = t.send(&eth1(), &msg(MessageType::Discover, D1)).unwrap();
    assert_eq!(r.yiaddr(), ip("10.30.0.201"));
    // Another MAC cannot take a bound address.
    let mut m = msg(MessageType::Request, stranger(4));
    m.opts_mut().insert(DhcpOption::RequestedIpAddress(a));
    assert_eq!(
        t.send(&eth1(), &m).unwrap().0.opts().msg_type(),
        Some(MessageType::Nak)
    );
    // RELEASE frees it for the next client.
    let mut rel = msg(MessageType::Release, stranger(1));
    rel.set_ciaddr(a);
    rel.opts_mut()
        .insert(DhcpOption::ServerIdentifier(ip("10.30.0.2")));
    assert!(t.send(&eth1(), &rel).is_none());
    assert_eq!(t.count("release", "released"), 1);
    assert_eq!(pool_lease(&t, stranger(4)), Some(a));
    // DECLINE quarantines: freed by nobody, offered to nobody.
    let mut dec = msg(MessageType::Decline, stranger(3));
    dec.opts_mut().insert(DhcpOption::RequestedIpAddress(c));
    dec.opts_mut()
        .insert(DhcpOption::ServerIdentifier(ip("10.30.0.2")));
    assert!(t.send(&eth1(), &dec).is_none());
    assert_eq!(t.count("decline", "declined"), 1);
    assert_eq!(
        t.server.ctx.leases.get(c).unwrap().state,
        LeaseState::Declined
    );
    assert!(t
        .send(&eth1(), &msg(MessageType::Discover, stranger(3)))
        .is_none());
    // Renewing (ciaddr set, unicast back to the client).
    let mut renew = msg(MessageType::Request, stranger(2));
    renew.set_ciaddr(b);
    let (r, dest, _) = t.send(&eth1(), &renew).unwrap();
    assert_eq!(r.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(dest, SocketAddr::new(b.into(), 68));
}

#[test]
fn pool_leases_survive_reopening_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("db");
    let a = {
        let t = T {
            server: server_at(&dir, &db_path),
            _dir: tempfile::tempdir().unwrap(),
            db_path: db_path.clone(),
        };
        let a = pool_lease(&t, stranger(7)).unwrap();
        let _ = pool_lease(&t, stranger(8)).unwrap();
        a
    };
    let t = T {
        server: server_at(&dir, &db_path),
        _dir: tempfile::tempdir().unwrap(),
        db_path,
    };
    assert_eq!(t.server.ctx.leases.get(a).unwrap().state, LeaseState::Bound);
    // Same MAC, same address; a new MAC never gets it.
    assert_eq!(pool_lease(&t, stranger(7)), Some(a));
    let c = pool_lease(&t, stranger(9)).unwrap();
    assert_ne!(c, a);
    assert!(t.db_path.exists());
}

#[test]
fn malformed_and_odd_packets_are_counted_and_dropped() {
    let t = setup();
    assert!(t.send_bytes(&eth0(), &[]).is_none());
    assert!(t.send_bytes(&eth0(), &[0xff; 100]).is_none());
    assert!(t.send_bytes(&eth0(), &[0u8; 600]).is_none());
    let mut b = enc(&msg(MessageType::Discover, N1));
    b.truncate(b.len() - 3);
    b.extend_from_slice(&[12, 200, b'x']);
    assert!(t.send_bytes(&eth0(), &b).is_none());
    assert_eq!(t.count("unknown", "malformed"), 4);
    // Garbage after a valid header never panics, whatever it is.
    let good = enc(&pxe(msg(MessageType::Discover, N1), "PXEClient", Some(7)));
    let mut seed: u32 = 0x9e37_79b9;
    for _ in 0..2000 {
        let mut b = good.clone();
        for _ in 0..6 {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            let i = 240 + (seed as usize) % (b.len() - 240);
            b[i] = (seed >> 24) as u8;
        }
        let _ = t.send_bytes(&eth0(), &b);
    }
    // A server's own reply or plain BOOTP is not answered.
    let mut reply = msg(MessageType::Offer, N1);
    reply.set_opcode(Opcode::BootReply);
    assert!(t.send(&eth0(), &reply).is_none());
    let before = t.count("none", "ignored-no-msg-type");
    let mut bootp = msg(MessageType::Discover, N1);
    bootp.opts_mut().clear();
    bootp.opts_mut().insert(DhcpOption::Hostname("x".into()));
    assert!(t.send(&eth0(), &bootp).is_none());
    assert_eq!(t.count("none", "ignored-no-msg-type"), before + 1);
}

#[test]
fn chainload_gives_an_ipxe_rom_our_loader_once() {
    let dir = tempfile::tempdir().unwrap();
    let rack = dir.path().join("rack.toml");
    std::fs::write(&rack, RACK).unwrap();
    let config = Arc::new(
        RelayConfig::from_toml(&format!("{CONFIG}[boot]\nchainload_ipxe = true\n")).unwrap(),
    );
    let db = sled::open(dir.path().join("db")).unwrap();
    let metrics = Arc::new(RelayMetrics::new());
    let loaders: Arc<crate::boot::LoaderTracker> = Default::default();
    let t = T {
        server: Server::new(Arc::new(DhcpContext {
            config,
            state: shared(RackState::from_static_file(&rack).unwrap()),
            leases: Leases::open(&dir.path().join("leases"), None).unwrap(),
            events: Arc::new(EventLog::open(&db, metrics.clone()).unwrap()),
            metrics,
            loaders: loaders.clone(),
        })),
        db_path: dir.path().join("db"),
        _dir: dir,
    };
    let mut m = pxe(
        msg(MessageType::Discover, N1),
        "PXEClient:Arch:00000:UNDI:002001",
        Some(0),
    );
    m.opts_mut().insert(DhcpOption::UserClass(b"iPXE".to_vec()));
    // The NIC ROM's iPXE: gets our loader by TFTP.
    let (r, _, _) = t.send(&eth0(), &m).unwrap();
    assert_eq!(
        bytes_opt(&r, OptionCode::BootfileName).as_deref(),
        Some("undionly.kpxe")
    );
    // Once that address fetched the loader, the next iPXE request gets the script.
    loaders.loaded(ip("10.20.0.11"));
    let (r, _, _) = t.send(&eth0(), &m).unwrap();
    assert_eq!(
        bytes_opt(&r, OptionCode::BootfileName).as_deref(),
        Some("http://10.20.0.2:8080/boot/52:54:00:12:34:01.ipxe")
    );
}
