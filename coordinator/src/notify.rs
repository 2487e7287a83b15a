//! systemd readiness notification (`Type=notify`), without libsystemd.
//!
//! When the service manager sets `NOTIFY_SOCKET`, a daemon reports state
//! changes as newline-separated `KEY=value` datagrams on that Unix socket:
//! `READY=1` once every listener serves, `STOPPING=1` when shutdown begins,
//! `STATUS=...` for `systemctl status`. Outside systemd (tests, the
//! quickstart) the variable is unset and every call is a no-op.

use std::os::unix::net::UnixDatagram;

/// Send `state` to the service manager, if there is one. Errors are returned
/// for logging only: a daemon must keep running when notification fails.
pub fn notify(state: &str) -> std::io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let sock = UnixDatagram::unbound()?;
    let bytes = path.as_encoded_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        // An abstract socket: '@' stands for the leading NUL byte.
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        sock.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        sock.send_to(state.as_bytes(), &path)?;
    }
    Ok(true)
}

/// `notify`, with a failure logged rather than returned.
pub fn notify_or_log(state: &str) {
    if let Err(e) = notify(state) {
        tracing::warn!(error = %e, "cannot notify the service manager (NOTIFY_SOCKET)");
    }
}
