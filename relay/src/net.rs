//! Listening sockets sized for boot storms.
//!
//! Hundreds of machines powered on together send their first DHCP, TFTP and
//! HTTP packets within a second. The kernel defaults (a 128-connection accept
//! backlog, ~200 KiB of UDP receive buffer) drop part of that burst before
//! the relay sees it, and every drop costs the client a retransmission
//! timeout (seconds in PXE firmware). Both values are capped by sysctls
//! (`net.core.somaxconn`, `net.core.rmem_max`); `docs/operations.md` lists
//! the settings we recommend.

use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

/// Receive buffer asked for on DHCP and TFTP sockets.
pub const STORM_RCVBUF: usize = 4 << 20;
/// Accept backlog asked for on the HTTP listener.
pub const STORM_BACKLOG: i32 = 4096;

/// A UDP socket bound to `addr`, with a storm-sized receive buffer.
pub fn bind_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: an unprivileged relay above rmem_max gets the cap.
    let _ = s.set_recv_buffer_size(STORM_RCVBUF);
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// A TCP listener on `addr` with a storm-sized accept backlog.
pub fn bind_tcp(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(STORM_BACKLOG)?;
    Ok(s.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_get_storm_sizes() {
        let u = bind_udp("127.0.0.1:0".parse().unwrap()).unwrap();
        let got = socket2::SockRef::from(&u).recv_buffer_size().unwrap();
        // Linux doubles the request and caps it at rmem_max; anything above
        // the ~200 KiB default shows the request was made.
        assert!(got > 256 * 1024 || got >= rmem_max(), "rcvbuf {got}");
        let t = bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        assert!(t.local_addr().unwrap().port() != 0);
    }

    fn rmem_max() -> usize {
        std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }
}
