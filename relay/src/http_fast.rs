//! The HTTP listener: a `sendfile(2)` fast path for boot-file downloads in
//! front of the axum router.
//!
//! A boot storm is mostly `GET /files/<kernel|initrd>`: hundreds of clients
//! pulling the same large files. Streaming them through user space costs a
//! read copy, a write copy and a blocking-pool hand-off per chunk; `sendfile`
//! moves page-cache pages to the socket with neither. So each connection is
//! read here first: a plain `GET`/`HEAD` of `/files/...` (HTTP/1.x, no body,
//! no percent-encoding or query) is answered by this module with the same
//! [`Reply`] the axum route would produce (`http::plan_file`), body by
//! `sendfile`. The first request that is anything else hands the connection,
//! with the bytes already read, to hyper + the axum router for the rest of its
//! life. Responses are therefore identical on both paths; only the copy differs.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method};
use axum::Router;
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use tracing::{debug, warn};

use crate::http::{plan_file, HttpContext, Reply, ReplyBody};

/// Largest request head the fast path buffers before handing over to hyper
/// (which answers 431 for heads beyond its own limit).
const MAX_HEAD: usize = 16 * 1024;
/// How long an idle keep-alive connection is kept open.
const IDLE: Duration = Duration::from_secs(60);
/// A client that accepts no byte for this long is dropped (a stalled reader
/// must not pin a connection and a file descriptor forever).
const STALL: Duration = Duration::from_secs(30);
/// Bytes per `sendfile` call. Measured on loopback: chunks about half the
/// autotuned send buffer keep a reader-paced connection from ever hitting
/// EAGAIN (and the epoll round trip that follows it); 4 MiB chunks filled the
/// buffer and cost a third of the throughput. Small enough that one
/// connection cannot monopolise a worker either.
const SENDFILE_CHUNK: usize = 2 * 1024 * 1024;
const MAX_HEADERS: usize = 64;
/// The answer to a connection over a cap.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// Accept connections until `shutdown`, then let in-flight responses finish.
pub async fn serve(
    ctx: Arc<HttpContext>,
    app: Router,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let tracker = TaskTracker::new();
    // Connection caps per client address and in total (limits.rs): a client
    // over its cap gets a 503 at once instead of a queue.
    let slots = crate::limits::TransferSlots::new(
        ctx.config.limits.http_per_client,
        ctx.config.limits.http_max_connections,
    );
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let slot = match slots.try_acquire(peer.ip()) {
            Ok(s) => s,
            Err(why) => {
                ctx.metrics.limits.drop("http", why);
                ctx.metrics.http("over-limit", 503);
                debug!(%peer, reason = why.label(), "HTTP connection refused: cap reached");
                // Best effort and never waits: the socket buffer of a fresh
                // connection takes this; the connection is closed on drop.
                let _ = stream.try_write(BUSY);
                continue;
            }
        };
        let (ctx, app, sd) = (ctx.clone(), app.clone(), shutdown.clone());
        tracker.spawn(async move {
            let _slot = slot;
            if let Err(e) = connection(ctx, app, stream, peer, sd).await {
                debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
        });
    }
    tracker.close();
    tracker.wait().await;
    Ok(())
}

/// One parsed request head that the fast path can answer.
pub struct FastRequest {
    pub method: Method,
    /// After `/files/`.
    pub path: String,
    pub headers: HeaderMap,
    pub keep_alive: bool,
    pub head_len: usize,
}

/// What [`parse`] made of the bytes read so far.
pub enum Parsed {
    Fast(FastRequest),
    /// Anything else: hyper takes the connection.
    Other,
    Incomplete,
}

/// Parse the bytes read so far of a connection (raw network input; public so
/// the fuzz target `http_path` drives it directly).
pub fn parse(buf: &[u8]) -> Parsed {
    let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut raw);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Incomplete,
        Err(_) => return Parsed::Other,
    };
    let method = match req.method {
        Some("GET") => Method::GET,
        Some("HEAD") => Method::HEAD,
        _ => return Parsed::Other,
    };
    let Some(path) = req
        .path
        .and_then(|p| p.strip_prefix("/files/"))
        .filter(|p| !p.is_empty() && !p.contains(['%', '?', '#']))
    else {
        return Parsed::Other;
    };
    let version = req.version.unwrap_or(0);
    let mut headers = HeaderMap::new();
    let mut keep_alive = version == 1;
    for h in req.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) else {
            return Parsed::Other;
        };
        if name == axum::http::header::CONTENT_LENGTH && h.value != b"0"
            || name == axum::http::header::TRANSFER_ENCODING
            || name == axum::http::header::EXPECT
            || name == axum::http::header::UPGRADE
        {
            return Parsed::Other;
        }
        if name == axum::http::header::CONNECTION {
            let v = String::from_utf8_lossy(h.value).to_ascii_lowercase();
            if v.split(',').any(|t| t.trim() == "close") {
                keep_alive = false;
            } else if v.split(',').any(|t| t.trim() == "keep-alive") {
                keep_alive = true;
            }
        }
        headers.append(name, value);
    }
    Parsed::Fast(FastRequest {
        method,
        path: path.to_string(),
        headers,
        keep_alive,
        head_len,
    })
}

async fn connection(
    ctx: Arc<HttpContext>,
    app: Router,
    mut stream: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        // The whole head within IDLE, not each read: a client trickling a
        // byte at a time must not hold the connection forever (slowloris).
        let head_deadline = tokio::time::Instant::now() + IDLE;
        let req = loop {
            match parse(&buf) {
                Parsed::Fast(r) => break Some(r),
                Parsed::Other => break None,
                Parsed::Incomplete if buf.len() >= MAX_HEAD => break None,
                Parsed::Incomplete => {}
            }
            let n = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                r = tokio::time::timeout_at(head_deadline, stream.read_buf(&mut buf)) => match r {
                    Ok(r) => r?,
                    Err(_) => return Ok(()),
                },
            };
            if n == 0 {
                return Ok(());
            }
        };
        let Some(req) = req else {
            return hand_to_hyper(app, stream, buf, peer, shutdown).await;
        };
        buf.advance(req.head_len);
        let reply = plan_file(&ctx, &req.method, &req.path, &req.headers, peer).await;
        let keep_alive = req.keep_alive && !shutdown.is_cancelled();
        write_reply(&mut stream, reply, keep_alive).await?;
        if !keep_alive {
            let _ = stream.shutdown().await;
            return Ok(());
        }
    }
}

async fn write_reply(
    stream: &mut TcpStream,
    reply: Reply,
    keep_alive: bool,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(reply.status.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(reply.status.canonical_reason().unwrap_or("").as_bytes());
    head.extend_from_slice(b"\r\n");
    for (name, value) in reply.headers.iter() {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"date: ");
    head.extend_from_slice(httpdate::fmt_http_date(std::time::SystemTime::now()).as_bytes());
    head.extend_from_slice(if keep_alive {
        // Redundant for HTTP/1.1, required for an HTTP/1.0 keep-alive client.
        b"\r\nconnection: keep-alive\r\n\r\n".as_slice()
    } else {
        b"\r\nconnection: close\r\n\r\n".as_slice()
    });
    match reply.body {
        ReplyBody::Bytes(b) => {
            head.extend_from_slice(&b);
            write_all(stream, &head).await
        }
        ReplyBody::File { file, start, count } => {
            write_all(stream, &head).await?;
            send_file(stream, &file, start, count).await
        }
    }
}

async fn write_all(stream: &mut TcpStream, data: &[u8]) -> std::io::Result<()> {
    tokio::time::timeout(STALL, stream.write_all(data))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "client stalled"))?
}

/// `count` bytes of `file` from `start` to the socket with `sendfile(2)`.
async fn send_file(
    stream: &TcpStream,
    file: &std::fs::File,
    start: u64,
    count: u64,
) -> std::io::Result<()> {
    let (sock, fd) = (stream.as_raw_fd(), file.as_raw_fd());
    let mut offset = libc::off_t::try_from(start).map_err(std::io::Error::other)?;
    let mut left = count;
    while left > 0 {
        let want = usize::try_from(left)
            .unwrap_or(usize::MAX)
            .min(SENDFILE_CHUNK);
        let sent = tokio::time::timeout(STALL, async {
            loop {
                stream.writable().await?;
                // SAFETY: both descriptors are open for the duration of the
                // call (borrowed from live owners) and `offset` is a valid
                // pointer; sendfile does not retain either.
                let r = stream.try_io(Interest::WRITABLE, || {
                    let n = unsafe { libc::sendfile(sock, fd, &mut offset, want) };
                    if n < 0 {
                        Err(std::io::Error::last_os_error())
                    } else {
                        Ok(n as usize)
                    }
                });
                match r {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    other => return other,
                }
            }
        })
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "client stalled"))??;
        if sent == 0 {
            // The file shrank under us; the promised length cannot be kept,
            // so the connection is closed and the client sees a short body.
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "file shorter than its announced length",
            ));
        }
        left -= sent as u64;
        if sent == want {
            // Let the other connections on this worker have their turn.
            tokio::task::yield_now().await;
        }
    }
    Ok(())
}

async fn hand_to_hyper(
    app: Router,
    stream: TcpStream,
    read: BytesMut,
    peer: SocketAddr,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let io = hyper_util::rt::TokioIo::new(Rewind {
        prefix: read,
        inner: stream,
    });
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        app.clone().oneshot(req.map(axum::body::Body::new))
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(IDLE)
        .serve_connection(io, svc);
    tokio::pin!(conn);
    let r = tokio::select! {
        r = conn.as_mut() => r,
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    r.map_err(std::io::Error::other)
}

/// The socket with the bytes the fast path already read put back in front.
struct Rewind {
    prefix: BytesMut,
    inner: TcpStream,
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(out.remaining());
            out.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, out)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_file_gets_take_the_fast_path() {
        let fast = |s: &str| matches!(parse(s.as_bytes()), Parsed::Fast(_));
        assert!(fast("GET /files/a/vmlinuz HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(fast("HEAD /files/a HTTP/1.0\r\n\r\n"));
        assert!(!fast("GET /boot/52:54:00:00:00:01.ipxe HTTP/1.1\r\n\r\n"));
        assert!(!fast("GET /files/a%20b HTTP/1.1\r\n\r\n"));
        assert!(!fast("GET /files/a?x=1 HTTP/1.1\r\n\r\n"));
        assert!(!fast(
            "POST /files/a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"
        ));
        assert!(!fast(
            "GET /files/a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        ));
        assert!(!fast("GET /files/ HTTP/1.1\r\n\r\n"));
        assert!(matches!(
            parse(b"GET /files/a HTTP/1.1\r\nHo"),
            Parsed::Incomplete
        ));
        assert!(matches!(parse(b"\x00\x01garbage\r\n\r\n"), Parsed::Other));
    }

    #[test]
    fn keep_alive_follows_version_and_connection_header() {
        let ka = |s: &str| match parse(s.as_bytes()) {
            Parsed::Fast(r) => r.keep_alive,
            _ => panic!("not fast: {s}"),
        };
        assert!(ka("GET /files/a HTTP/1.1\r\n\r\n"));
        assert!(!ka("GET /files/a HTTP/1.1\r\nConnection: close\r\n\r\n"));
        assert!(!ka("GET /files/a HTTP/1.0\r\n\r\n"));
        assert!(ka(
            "GET /files/a HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"
        ));
    }
}
