//! `pxemesh-relay`: the rack relay (DHCP, TFTP, HTTP boot, image cache, IPMI
//! executor). Its services are built by the relay work that follows the
//! coordinator foundation; until then the binary refuses to start rather than
//! pretend to serve a rack.

fn main() -> std::process::ExitCode {
    eprintln!("pxemesh-relay: this build has no relay services yet; nothing is served");
    std::process::ExitCode::from(2)
}
