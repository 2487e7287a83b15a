//! A minimal HTTP/1.1 GET client, enough for what iPXE does during a boot:
//! one request per connection, a `Content-Length` body (counted, or kept for
//! a script), an inactivity timeout on every read.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::timeout;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("bad URL {0:?}")]
    Url(String),
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("timeout ({0})")]
    Timeout(&'static str),
    #[error("status {0}")]
    Status(u16),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

impl HttpError {
    pub fn is_timeout(&self) -> bool {
        matches!(self, HttpError::Timeout(_))
    }

    /// Worth another attempt (iPXE retries connection failures).
    pub fn retryable(&self) -> bool {
        matches!(self, HttpError::Connect(_) | HttpError::Timeout(_))
    }

    /// A short, stable label for counting failures by cause.
    pub fn cause(&self) -> String {
        match self {
            HttpError::Connect(e) => format!("connect: {}", io_kind(e)),
            HttpError::Io(e) => format!("io: {}", io_kind(e)),
            other => other.to_string(),
        }
    }
}

pub fn io_kind(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "connection refused".into(),
        std::io::ErrorKind::ConnectionReset => "connection reset".into(),
        std::io::ErrorKind::UnexpectedEof => "connection closed early".into(),
        k => format!("{k:?}"),
    }
}

/// `http://host[:port]/path` → (address, host header, path).
pub fn split_url(url: &str) -> Result<(SocketAddr, String, String), HttpError> {
    let bad = || HttpError::Url(url.to_string());
    let rest = url.strip_prefix("http://").ok_or_else(bad)?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h, p.parse::<u16>().map_err(|_| bad())?),
        None => (authority, 80),
    };
    let ip: Ipv4Addr = host.parse().map_err(|_| bad())?;
    Ok((
        SocketAddr::new(ip.into(), port),
        authority.to_string(),
        path.to_string(),
    ))
}

#[derive(Debug, Default)]
pub struct Got {
    pub bytes: u64,
    pub body: Option<Vec<u8>>,
}

const HEAD_MAX: usize = 16 * 1024;
const KEEP_MAX: usize = 1 << 20;

/// GET `url`; keep the body when `keep` (up to 1 MiB). Every read must make
/// progress within `idle`.
pub async fn get(url: &str, local: Ipv4Addr, keep: bool, idle: Duration) -> Result<Got, HttpError> {
    let (addr, authority, path) = split_url(url)?;
    let sock = TcpSocket::new_v4().map_err(HttpError::Connect)?;
    if !local.is_unspecified() {
        sock.bind(SocketAddr::new(local.into(), 0))
            .map_err(HttpError::Connect)?;
    }
    let mut s: TcpStream = timeout(idle, sock.connect(addr))
        .await
        .map_err(|_| HttpError::Timeout("connect"))?
        .map_err(HttpError::Connect)?;
    let _ = s.set_nodelay(true);
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: iPXE/1.21.1 (pxemesh-loadtest)\r\nConnection: close\r\n\r\n"
    );
    timeout(idle, s.write_all(req.as_bytes()))
        .await
        .map_err(|_| HttpError::Timeout("sending the request"))??;
    let mut buf = vec![0u8; 256 * 1024];
    let mut head: Vec<u8> = Vec::new();
    let body_start;
    loop {
        let n = timeout(idle, s.read(&mut buf))
            .await
            .map_err(|_| HttpError::Timeout("waiting for the response head"))??;
        if n == 0 {
            return Err(HttpError::Protocol(
                "connection closed before the response head".into(),
            ));
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            body_start = i + 4;
            break;
        }
        if head.len() > HEAD_MAX {
            return Err(HttpError::Protocol("response head too large".into()));
        }
    }
    let head_text = String::from_utf8_lossy(&head[..body_start]).to_string();
    let mut lines = head_text.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| HttpError::Protocol("no status line".into()))?;
    let mut length: Option<u64> = None;
    let mut chunked = false;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            let k = k.trim().to_ascii_lowercase();
            if k == "content-length" {
                length = v.trim().parse().ok();
            } else if k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked") {
                chunked = true;
            }
        }
    }
    if status != 200 {
        return Err(HttpError::Status(status));
    }
    if chunked {
        return Err(HttpError::Protocol(
            "chunked bodies are not supported".into(),
        ));
    }
    let mut got = Got {
        bytes: 0,
        body: keep.then(Vec::new),
    };
    let take = |data: &[u8], got: &mut Got| -> Result<(), HttpError> {
        got.bytes += data.len() as u64;
        if let Some(b) = got.body.as_mut() {
            if b.len() + data.len() > KEEP_MAX {
                return Err(HttpError::Protocol("body too large to keep".into()));
            }
            b.extend_from_slice(data);
        }
        Ok(())
    };
    take(&head[body_start..], &mut got)?;
    loop {
        if length.is_some_and(|l| got.bytes >= l) {
            break;
        }
        let n = timeout(idle, s.read(&mut buf))
            .await
            .map_err(|_| HttpError::Timeout("body stalled"))??;
        if n == 0 {
            break;
        }
        take(&buf[..n], &mut got)?;
    }
    if let Some(l) = length {
        if got.bytes != l {
            return Err(HttpError::Protocol(format!(
                "body {} of {l} bytes",
                got.bytes
            )));
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let (a, h, p) = split_url("http://127.0.0.1:8080/files/k").unwrap();
        assert_eq!(a, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(h, "127.0.0.1:8080");
        assert_eq!(p, "/files/k");
        let (a, _, p) = split_url("http://10.0.0.1").unwrap();
        assert_eq!((a.port(), p.as_str()), (80, "/"));
        assert!(split_url("https://x/").is_err());
        assert!(split_url("http://name.example/").is_err());
    }
}
