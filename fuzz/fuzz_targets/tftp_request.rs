//! One datagram on the TFTP server port, through the same steps the
//! dispatcher and a transfer take before any file is read: packet parsing
//! (RRQ/WRQ/DATA/ACK/ERROR/OACK), the mode check, path sanitising and the
//! rendered-name check (`pxelinux.cfg/01-<mac>`, `<mac>.ipxe`) with the
//! per-host rendering, resolution inside a real boot directory (traversal,
//! symlinks), option negotiation (blksize/tsize/timeout/windowsize) and the
//! OACK we would send; ACK block numbers through the window arithmetic.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use pxemesh_relay::boot;
use pxemesh_relay::files;
use pxemesh_relay::state::RackState;
use pxemesh_relay::tftp::files::{rendered, to_netascii};
use pxemesh_relay::tftp::options::{negotiate, Limits, MAX_BLKSIZE, MIN_BLKSIZE};
use pxemesh_relay::tftp::packet::{self, Packet};
use pxemesh_relay::tftp::transfer::{classify_ack, AckKind};

const RACK: &str = include_str!("../data/rack.toml");

struct World {
    state: RackState,
    root: PathBuf,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("pxemesh-fuzz-tftp-{}", std::process::id()));
        let root = dir.join("boot");
        std::fs::create_dir_all(root.join("centos")).expect("boot dir");
        std::fs::write(root.join("undionly.kpxe"), b"loader").expect("file");
        std::fs::write(root.join("centos/vmlinuz"), b"kernel").expect("file");
        std::fs::write(dir.join("secret"), b"outside").expect("file");
        let _ = std::os::unix::fs::symlink("../secret", root.join("escape"));
        let _ = std::os::unix::fs::symlink("centos/vmlinuz", root.join("inside"));
        let rack = dir.join("rack.toml");
        std::fs::write(&rack, RACK).expect("write rack");
        let state = RackState::from_static_file(&rack).expect("rack state");
        World { state, root }
    })
}

fuzz_target!(|data: &[u8]| {
    let w = world();
    let req = match Packet::parse(data) {
        Ok(Packet::Rrq(r)) | Ok(Packet::Wrq(r)) => r,
        Ok(Packet::Ack(block)) => {
            // The window arithmetic of a transfer, for a few window positions.
            for (base, len) in [(1u64, 1u64), (65_535, 8), (65_536, 64), (1 << 20, 65_535)] {
                if let AckKind::Advance(n) = classify_ack(base, len, block) {
                    assert!(n >= 1 && n <= len, "advance {n} outside a window of {len}");
                }
            }
            return;
        }
        _ => return,
    };
    if req.mode != "octet" && req.mode != "netascii" {
        return;
    }
    // Path handling: a sanitised name never leaves the root.
    if let Ok(rel) = files::sanitize(&req.filename) {
        assert!(!rel.is_empty() && !rel.starts_with('/'), "{rel:?}");
        assert!(
            rel.split('/')
                .all(|c| !c.is_empty() && c != "." && c != ".."),
            "{rel:?}"
        );
        if let Some(r) = rendered(&rel) {
            if let Some(host) = w.state.host_by_mac(&r.mac()) {
                let profile = w.state.profile_of(host);
                let base = boot::http_base(std::net::Ipv4Addr::new(10, 20, 0, 2), 8080);
                if let Ok(text) = boot::ipxe_script(host, profile, &base) {
                    let _ = to_netascii(text.as_bytes());
                }
                let _ = boot::pxelinux_config(host, profile);
            }
        }
        if let Ok(full) = files::resolve(&w.root, &rel) {
            let root = w.root.canonicalize().expect("root");
            assert!(full.starts_with(&root), "{full:?} outside {root:?}");
        }
    }
    // Negotiation as a transfer does it, for the limits the config allows.
    for (max_blksize, max_windowsize, tsize) in [
        (1468u16, 16u16, Some(123_456u64)),
        (MAX_BLKSIZE, 65_535, None),
        (0, 0, Some(u64::MAX)),
    ] {
        let limits = Limits {
            max_blksize,
            max_windowsize,
            default_timeout: Duration::from_millis(1000),
        };
        let n = negotiate(&req.options, &limits, tsize);
        assert!((MIN_BLKSIZE..=MAX_BLKSIZE).contains(&n.blksize));
        assert!(n.blksize <= max_blksize.max(MIN_BLKSIZE) || n.blksize == 512);
        assert!(n.windowsize >= 1);
        if !n.oack.is_empty() {
            let oack = packet::oack(&n.oack);
            assert!(matches!(Packet::parse(&oack), Ok(Packet::Oack(_))));
        }
    }
});
