//! HTTP boot: per-host iPXE scripts, boot files with Range and ETag, and the
//! provision-done callback CloudStack's kickstart templates call.
//!
//! Routes:
//! - `GET /boot/<mac>.ipxe`               the host's script, rendered from its profile
//! - `GET|HEAD /files/<path>`             files of the boot directory (Range, ETag, If-None-Match, If-Range)
//! - `GET /baremetal/provisiondone/<mac>` records a provision-done event

use std::collections::HashMap;
use std::io::SeekFrom;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use axum::body::Body;
use axum::extract::{ConnectInfo, Path as UrlPath, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use pxemesh_coordinator::model::Mac;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::boot::{self, LoaderTracker};
use crate::config::RelayConfig;
use crate::events::{EventKind, EventLog};
use crate::files::{self, PathError};
use crate::metrics::RelayMetrics;
use crate::state::SharedState;

pub struct HttpContext {
    pub config: Arc<RelayConfig>,
    pub state: SharedState,
    pub events: Arc<EventLog>,
    pub metrics: Arc<RelayMetrics>,
    pub loaders: Arc<LoaderTracker>,
    /// sha256 ETags by (path, length, mtime): computed once per file version.
    etags: Mutex<HashMap<(PathBuf, u64, SystemTime), String>>,
    /// Image cache (sync mode): serves `/files/images/<image>/<path>`.
    pub cache: Option<Arc<crate::cache::BlobCache>>,
}

impl HttpContext {
    pub fn new(
        config: Arc<RelayConfig>,
        state: SharedState,
        events: Arc<EventLog>,
        metrics: Arc<RelayMetrics>,
        loaders: Arc<LoaderTracker>,
    ) -> HttpContext {
        HttpContext {
            config,
            state,
            events,
            metrics,
            loaders,
            etags: Mutex::new(HashMap::new()),
            cache: None,
        }
    }
}

type Ctx = Arc<HttpContext>;

pub fn router(ctx: Ctx) -> Router {
    Router::new()
        .route("/boot/{file}", get(script))
        .route("/files/{*path}", get(file).head(file))
        .route("/baremetal/provisiondone/{mac}", get(provision_done))
        .fallback(not_found)
        .with_state(ctx)
}

/// Serve until `shutdown`; in-flight downloads get the graceful-shutdown drain.
pub async fn run(
    ctx: Ctx,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = router(ctx.clone());
    crate::http_fast::serve(ctx, app, listener, shutdown).await
}

fn text(code: StatusCode, body: String) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body + "\n",
    )
        .into_response()
}

async fn not_found(State(ctx): State<Ctx>) -> Response {
    ctx.metrics.http("other", 404);
    text(StatusCode::NOT_FOUND, "no such route".into())
}

fn client_v4(addr: SocketAddr) -> Option<Ipv4Addr> {
    match addr.ip() {
        IpAddr::V4(v) => Some(v),
        IpAddr::V6(v) => v.to_ipv4_mapped(),
    }
}

async fn script(
    State(ctx): State<Ctx>,
    UrlPath(file): UrlPath<String>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    let Some(mac_text) = file.strip_suffix(".ipxe") else {
        ctx.metrics.http("script", 404);
        return text(
            StatusCode::NOT_FOUND,
            format!("{file}: expected <mac>.ipxe"),
        );
    };
    let Ok(mac) = mac_text.parse::<Mac>() else {
        ctx.metrics.http("script", 400);
        return text(
            StatusCode::BAD_REQUEST,
            format!("{mac_text:?} is not a MAC address"),
        );
    };
    let state = ctx.state.load();
    let Some(host) = state.host_by_mac(&mac) else {
        ctx.metrics.http("script", 404);
        debug!(%mac, %peer, "script requested for an unknown host");
        return text(
            StatusCode::NOT_FOUND,
            format!("no host with MAC {mac} in rack {}", state.rack),
        );
    };
    let Some(server) = state
        .network(&host.network)
        .and_then(|n| ctx.config.address_for(n))
        .or_else(|| client_local_guess(&ctx))
    else {
        ctx.metrics.http("script", 500);
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("no relay address configured for network {}", host.network),
        );
    };
    let base = boot::http_base(server, ctx.config.http_port());
    match boot::ipxe_script(host, state.profile_of(host), &base) {
        Ok(s) => {
            ctx.metrics.http("script", 200);
            ctx.metrics.http_bytes.inc_by(s.len() as u64);
            ctx.events.record(
                &mac.to_string(),
                EventKind::HttpFile,
                &format!("/boot/{file}"),
            );
            (
                [
                    (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
                    (header::CACHE_CONTROL, "no-store"),
                ],
                s,
            )
                .into_response()
        }
        Err(e) => {
            ctx.metrics.http("script", 404);
            text(StatusCode::NOT_FOUND, e.0)
        }
    }
}

fn client_local_guess(ctx: &HttpContext) -> Option<Ipv4Addr> {
    ctx.config
        .advertise_address
        .or_else(|| ctx.config.interfaces.first().map(|i| i.address))
}

async fn provision_done(
    State(ctx): State<Ctx>,
    UrlPath(mac): UrlPath<String>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    let Ok(mac) = mac.parse::<Mac>() else {
        ctx.metrics.http("provisiondone", 400);
        return text(
            StatusCode::BAD_REQUEST,
            format!("{mac:?} is not a MAC address"),
        );
    };
    let Some(host_ip) = ctx.state.load().host_by_mac(&mac).and_then(|h| h.ip) else {
        ctx.metrics.http("provisiondone", 404);
        warn!(%mac, %peer, "provision-done from an unknown host");
        return text(StatusCode::NOT_FOUND, format!("no host with MAC {mac}"));
    };
    if ctx.config.http.provision_done_from == crate::config::ProvisionDoneFrom::Host
        && peer.ip() != std::net::IpAddr::V4(host_ip)
    {
        ctx.metrics.http("provisiondone", 403);
        ctx.metrics
            .limits
            .drop("http", crate::limits::DropReason::ProvisionDoneNotFromHost);
        warn!(%mac, %peer, host_ip = %host_ip, "provision-done refused: not sent from the host's own address");
        return text(
            StatusCode::FORBIDDEN,
            format!("provision-done for {mac} is accepted only from {host_ip}"),
        );
    }
    ctx.events.record(
        &mac.to_string(),
        EventKind::ProvisionDone,
        &peer.ip().to_string(),
    );
    ctx.metrics.http("provisiondone", 200);
    text(StatusCode::OK, "recorded".into())
}

/// A parsed single `Range: bytes=` header against a body of `len` bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeReq {
    Full,
    Part(u64, u64),
    Unsatisfiable,
}

pub fn parse_range(h: Option<&HeaderValue>, len: u64) -> RangeReq {
    let Some(v) = h.and_then(|v| v.to_str().ok()) else {
        return RangeReq::Full;
    };
    let Some(spec) = v.trim().strip_prefix("bytes=") else {
        return RangeReq::Full;
    };
    // Several ranges: serving the whole body is allowed and keeps it simple.
    if spec.contains(',') {
        return RangeReq::Full;
    }
    let Some((a, b)) = spec.split_once('-') else {
        return RangeReq::Full;
    };
    let (a, b) = (a.trim(), b.trim());
    let parsed = match (a.is_empty(), b.is_empty()) {
        (true, false) => b.parse::<u64>().ok().map(|n| {
            (
                len.saturating_sub(n.min(len)),
                len.saturating_sub(1),
                n == 0,
            )
        }),
        (false, true) => a
            .parse::<u64>()
            .ok()
            .map(|s| (s, len.saturating_sub(1), false)),
        (false, false) => match (a.parse::<u64>(), b.parse::<u64>()) {
            (Ok(s), Ok(e)) if s <= e => Some((s, e.min(len.saturating_sub(1)), false)),
            _ => None,
        },
        (true, true) => None,
    };
    match parsed {
        None => RangeReq::Full,
        Some((_, _, true)) => RangeReq::Unsatisfiable,
        Some((s, e, _)) if s >= len || len == 0 || s > e => RangeReq::Unsatisfiable,
        Some((s, e, _)) => RangeReq::Part(s, e),
    }
}

async fn etag_for(
    ctx: &HttpContext,
    path: &std::path::Path,
    len: u64,
    mtime: SystemTime,
) -> std::io::Result<String> {
    let key = (path.to_path_buf(), len, mtime);
    if let Some(t) = ctx.etags.lock().ok().and_then(|m| m.get(&key).cloned()) {
        return Ok(t);
    }
    let p = path.to_path_buf();
    let digest = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
        let mut f = std::fs::File::open(p)?;
        let mut h = Sha256::new();
        std::io::copy(&mut f, &mut h)?;
        Ok(hex::encode(h.finalize()))
    })
    .await
    .map_err(std::io::Error::other)??;
    let tag = format!("\"sha256:{digest}\"");
    if let Ok(mut m) = ctx.etags.lock() {
        if m.len() > 4096 {
            m.clear();
        }
        m.insert(key, tag.clone());
    }
    Ok(tag)
}

async fn file(
    State(ctx): State<Ctx>,
    method: Method,
    UrlPath(path): UrlPath<String>,
    headers: HeaderMap,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    let reply = plan_file(&ctx, &method, &path, &headers, peer).await;
    let mut resp = Response::builder().status(reply.status);
    if let Some(h) = resp.headers_mut() {
        h.extend(reply.headers);
    }
    let body = match reply.body {
        ReplyBody::Bytes(b) => Body::from(b),
        ReplyBody::File { file, start, count } => {
            let mut f = tokio::fs::File::from_std(file);
            if start > 0 {
                if let Err(e) = f.seek(SeekFrom::Start(start)).await {
                    warn!(path, error = %e, "cannot seek boot file");
                    return text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("cannot read {path}: {e}"),
                    );
                }
            }
            Body::from_stream(tokio_util::io::ReaderStream::with_capacity(
                f.take(count),
                256 * 1024,
            ))
        }
    };
    resp.body(body).unwrap_or_default()
}

/// A boot-file response, decided once and written by either the axum route or
/// the sendfile fast path (`crate::http_fast`), so both answer identically.
pub(crate) struct Reply {
    pub status: StatusCode,
    /// Every header of the response, `Content-Length` included.
    pub headers: HeaderMap,
    pub body: ReplyBody,
}

pub(crate) enum ReplyBody {
    Bytes(bytes::Bytes),
    /// `count` bytes of `file` from offset `start`.
    File {
        file: std::fs::File,
        start: u64,
        count: u64,
    },
}

fn text_reply(code: StatusCode, body: String) -> Reply {
    let body = bytes::Bytes::from(body + "\n");
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    Reply {
        status: code,
        headers,
        body: ReplyBody::Bytes(body),
    }
}

/// A file of the boot directory, opened, with its length and sha256 ETag.
async fn open_boot_file(
    ctx: &HttpContext,
    path: &str,
    peer: SocketAddr,
) -> Result<(std::fs::File, u64, String), Reply> {
    let full = match files::resolve(&ctx.config.boot.dir, path) {
        Ok(p) => p,
        Err(PathError::Forbidden(p)) => {
            ctx.metrics.http("files", 403);
            warn!(%peer, path = %p, "HTTP path outside the boot directory refused");
            return Err(text_reply(
                StatusCode::FORBIDDEN,
                format!("access violation: {p}"),
            ));
        }
        Err(PathError::NotFound(p)) => {
            ctx.metrics.http("files", 404);
            return Err(text_reply(
                StatusCode::NOT_FOUND,
                format!("file not found: {p}"),
            ));
        }
    };
    let opened = async {
        // Opened through tokio (a blocking-pool hop per request, not per chunk).
        let f = tokio::fs::File::open(&full).await?.into_std().await;
        let meta = f.metadata()?;
        if !meta.is_file() {
            return Err(std::io::Error::other("not a regular file"));
        }
        let len = meta.len();
        let etag = etag_for(ctx, &full, len, meta.modified()?).await?;
        Ok::<_, std::io::Error>((f, len, etag))
    }
    .await;
    opened.map_err(|e| {
        ctx.metrics.http("files", 500);
        warn!(path = %full.display(), error = %e, "cannot read boot file");
        text_reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot read {path}: {e}"),
        )
    })
}

/// The status and byte span of a `GET|HEAD` of a file of `len` bytes whose
/// ETag is `etag`: `If-None-Match` (304), `If-Range`, then a single `Range`
/// (206 or 416; anything else serves the whole file). Returns (status, first
/// byte, byte count); 304 and 416 carry no body (0, 0). Pure, so the fuzz
/// target `http_path` drives it directly.
pub fn range_decision(headers: &HeaderMap, etag: &str, len: u64) -> (StatusCode, u64, u64) {
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"))
    {
        return (StatusCode::NOT_MODIFIED, 0, 0);
    }
    let if_range_ok = headers
        .get(header::IF_RANGE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| v.trim() == etag);
    let range = if if_range_ok {
        parse_range(headers.get(header::RANGE), len)
    } else {
        RangeReq::Full
    };
    let (code, start, end) = match range {
        RangeReq::Full => (StatusCode::OK, 0, len.saturating_sub(1)),
        RangeReq::Part(s, e) => (StatusCode::PARTIAL_CONTENT, s, e),
        RangeReq::Unsatisfiable => return (StatusCode::RANGE_NOT_SATISFIABLE, 0, 0),
    };
    let count = if len == 0 { 0 } else { end - start + 1 };
    (code, start, count)
}

/// Resolve `GET|HEAD /files/<path>`: traversal checks, ETag, conditional and
/// range requests, metrics and the boot event.
pub(crate) async fn plan_file(
    ctx: &HttpContext,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    peer: SocketAddr,
) -> Reply {
    // Image files come from the cache (ETag = the blob's digest, verified
    // before it is served), the rest from the boot directory.
    let blob = match (&ctx.cache, files::sanitize(path)) {
        (Some(cache), Ok(rel)) => {
            crate::cache::resolve(&ctx.state.load(), &rel).map(|(d, _)| (cache.clone(), d))
        }
        _ => None,
    };
    let opened = match blob {
        Some((cache, digest)) => match cache.open_blob(&digest).await {
            Ok((f, len)) => (f, len, format!("\"{digest}\"")),
            Err(e) => {
                ctx.metrics.http("files", 503);
                warn!(%peer, path, error = %e, "image file unavailable");
                return text_reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("image file {path} unavailable: {e}"),
                );
            }
        },
        None => match open_boot_file(ctx, path, peer).await {
            Ok(x) => x,
            Err(reply) => return reply,
        },
    };
    let served = async {
        let (f, len, etag) = opened;
        let (code, start, count) = range_decision(headers, &etag, len);
        let f = matches!(code, StatusCode::OK | StatusCode::PARTIAL_CONTENT).then_some(f);
        Ok::<_, std::io::Error>((code, etag, start, count, f, len))
    }
    .await;
    let (code, etag, start, count, f, len) = match served {
        Ok(x) => x,
        Err(e) => {
            ctx.metrics.http("files", 500);
            warn!(path, error = %e, "cannot read boot file");
            return text_reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot read {path}: {e}"),
            );
        }
    };
    ctx.metrics.http("files", code.as_u16());
    let mut h = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    let empty = |status, mut h: HeaderMap| {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(0u64));
        Reply {
            status,
            headers: h,
            body: ReplyBody::Bytes(bytes::Bytes::new()),
        }
    };
    match code {
        StatusCode::NOT_MODIFIED => return empty(code, h),
        StatusCode::RANGE_NOT_SATISFIABLE => {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                h.insert(header::CONTENT_RANGE, v);
            }
            return empty(code, h);
        }
        StatusCode::PARTIAL_CONTENT => {
            if let Ok(v) =
                HeaderValue::from_str(&format!("bytes {start}-{}/{len}", start + count - 1))
            {
                h.insert(header::CONTENT_RANGE, v);
            }
        }
        _ => {}
    }
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(count));
    if let Some(ip) = client_v4(peer) {
        if boot::is_loader(path, &ctx.config.boot) {
            ctx.loaders.loaded(ip);
        }
        let state = ctx.state.load();
        let mac = state
            .host_by_ip(ip)
            .map(|h| h.mac.to_string())
            .unwrap_or_else(|| "-".into());
        ctx.events
            .record(&mac, EventKind::HttpFile, &format!("/files/{path}"));
    }
    let body = match f {
        Some(file) if *method != Method::HEAD && count > 0 => {
            ctx.metrics.http_bytes.inc_by(count);
            ReplyBody::File { file, start, count }
        }
        _ => ReplyBody::Bytes(bytes::Bytes::new()),
    };
    Reply {
        status: code,
        headers: h,
        body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let h = |s: &str| HeaderValue::from_str(s).unwrap();
        assert_eq!(parse_range(None, 100), RangeReq::Full);
        assert_eq!(
            parse_range(Some(&h("bytes=0-9")), 100),
            RangeReq::Part(0, 9)
        );
        assert_eq!(
            parse_range(Some(&h("bytes=90-")), 100),
            RangeReq::Part(90, 99)
        );
        assert_eq!(
            parse_range(Some(&h("bytes=-10")), 100),
            RangeReq::Part(90, 99)
        );
        assert_eq!(
            parse_range(Some(&h("bytes=-500")), 100),
            RangeReq::Part(0, 99)
        );
        assert_eq!(
            parse_range(Some(&h("bytes=50-500")), 100),
            RangeReq::Part(50, 99)
        );
        assert_eq!(
            parse_range(Some(&h("bytes=100-")), 100),
            RangeReq::Unsatisfiable
        );
        assert_eq!(
            parse_range(Some(&h("bytes=-0")), 100),
            RangeReq::Unsatisfiable
        );
        assert_eq!(parse_range(Some(&h("bytes=0-1,5-6")), 100), RangeReq::Full);
        assert_eq!(parse_range(Some(&h("bytes=9-2")), 100), RangeReq::Full);
        assert_eq!(parse_range(Some(&h("items=0-1")), 100), RangeReq::Full);
        assert_eq!(parse_range(Some(&h("bytes=x-y")), 100), RangeReq::Full);
    }

    #[test]
    fn range_decision_conditionals_and_spans() {
        let etag = "\"sha256:ab\"";
        let hm = |pairs: &[(header::HeaderName, &str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.insert(k.clone(), HeaderValue::from_str(v).unwrap());
            }
            m
        };
        assert_eq!(
            range_decision(&hm(&[]), etag, 100),
            (StatusCode::OK, 0, 100)
        );
        assert_eq!(range_decision(&hm(&[]), etag, 0), (StatusCode::OK, 0, 0));
        let none_match = hm(&[(header::IF_NONE_MATCH, "\"x\", \"sha256:ab\"")]);
        assert_eq!(
            range_decision(&none_match, etag, 100),
            (StatusCode::NOT_MODIFIED, 0, 0)
        );
        let range = hm(&[(header::RANGE, "bytes=10-19")]);
        assert_eq!(
            range_decision(&range, etag, 100),
            (StatusCode::PARTIAL_CONTENT, 10, 10)
        );
        // If-Range with another validator: the whole file.
        let stale = hm(&[
            (header::RANGE, "bytes=10-19"),
            (header::IF_RANGE, "\"old\""),
        ]);
        assert_eq!(range_decision(&stale, etag, 100), (StatusCode::OK, 0, 100));
        let past = hm(&[(header::RANGE, "bytes=100-")]);
        assert_eq!(
            range_decision(&past, etag, 100),
            (StatusCode::RANGE_NOT_SATISFIABLE, 0, 0)
        );
        // The largest file: the span never overflows.
        let tail = hm(&[(header::RANGE, "bytes=-1")]);
        assert_eq!(
            range_decision(&tail, etag, u64::MAX),
            (StatusCode::PARTIAL_CONTENT, u64::MAX - 1, 1)
        );
    }
}
