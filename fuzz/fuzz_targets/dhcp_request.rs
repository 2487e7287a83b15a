//! One UDP datagram into the relay's DHCP server as the receive loop handles
//! it: the flood guard's shape checks and per-client/per-agent buckets
//! (`limits::DhcpGuard::admit`, from a fixed client address), then — for
//! every datagram, admitted or not, so the rate limit does not hide the
//! decoder — `Server::process`, which decodes it (dhcproto plus our own
//! option-length checks), runs the whole decision chain against a static
//! rack (reservations, a dynamic pool with its lease log in a temporary dir,
//! PXE/iPXE/HTTP-boot profiles, relay agents) and encodes the reply. Every
//! reply we produce must decode again.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use pxemesh_relay::boot::LoaderTracker;
use pxemesh_relay::config::{Interface, RelayConfig};
use pxemesh_relay::dhcp::{packet, DhcpContext, Leases, Server};
use pxemesh_relay::events::EventLog;
use pxemesh_relay::limits::{dhcp_shape, DhcpGuard};
use pxemesh_relay::metrics::RelayMetrics;
use pxemesh_relay::state::{shared, RackState};

const RACK: &str = include_str!("../data/rack.toml");
const CONFIG: &str = include_str!("../data/relay.toml");

struct World {
    server: Server,
    guard: DhcpGuard,
    ifaces: Vec<Interface>,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("pxemesh-fuzz-dhcp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let rack = dir.join("rack.toml");
        std::fs::write(&rack, RACK).expect("write rack");
        let state = shared(RackState::from_static_file(&rack).expect("rack state"));
        let config = RelayConfig::from_toml(CONFIG).expect("relay config");
        config.validate().expect("valid relay config");
        let ifaces = config.interfaces.clone();
        let db = sled::Config::new()
            .temporary(true)
            .path(dir.join("db"))
            .open()
            .expect("sled");
        let metrics = Arc::new(RelayMetrics::new());
        let events = Arc::new(EventLog::open(&db, metrics.clone()).expect("events"));
        let leases = Leases::open(&dir.join("leases"), None).expect("leases");
        // n1 has just fetched our boot loader (chainloading): its iPXE gets
        // the script; every other iPXE client is chainloaded first.
        let loaders = Arc::new(LoaderTracker::default());
        loaders.loaded(std::net::Ipv4Addr::new(10, 20, 0, 11));
        let guard = DhcpGuard::new(&config.limits, metrics.clone());
        let server = Server::new(Arc::new(DhcpContext {
            config: Arc::new(config),
            state,
            leases,
            events,
            metrics,
            loaders,
        }));
        World {
            server,
            guard,
            ifaces,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    // A fixed clock keeps a crash reproducible from its input alone (lease
    // state still carries over between inputs, as on a real server).
    let now = 1_800_000_000;
    // The socket buffer is one byte larger than the largest datagram accepted.
    let capacity = 4097;
    let shape = dhcp_shape(data, capacity);
    let peer = std::net::SocketAddr::from(([10, 20, 0, 50], 68));
    let admitted = w
        .guard
        .admit(data, capacity, peer, std::time::Instant::now());
    assert!(!admitted || shape.is_ok(), "admitted a malformed datagram");
    for iface in &w.ifaces {
        if let Some(out) = w.server.process(iface, data, now) {
            let back = packet::decode(&out.bytes);
            assert!(back.is_ok(), "our own reply does not decode: {back:?}");
        }
    }
});
