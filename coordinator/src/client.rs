//! mTLS gRPC channels to coordinators.
//!
//! Used by `pxemeshctl`, by coordinator peers (the Raft transport) and by tests.
//! TLS is done by our own connector rather than tonic's built-in TLS so that every
//! new connection picks up the *current* client configuration of a
//! [`pxemesh_certs::Tls`]: a certificate reload applies to the next connection
//! without rebuilding channels.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::Uri;
use hyper_util::rt::TokioIo;
use pxemesh_certs::Tls;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

/// Time allowed to establish TCP + TLS to one endpoint.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Interval of HTTP/2 keepalive pings on an established connection.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
/// Time to wait for a keepalive ping's answer before the connection is dropped.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors building or connecting a channel.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The endpoint string is not `host:port` or `https://host:port`.
    #[error("invalid endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint {
        /// The endpoint as given.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Connecting (TCP, TLS or the HTTP/2 handshake) failed.
    #[error("cannot connect to {endpoint}: {source}")]
    Connect {
        /// The endpoint as given.
        endpoint: String,
        /// The transport error (its source chain holds the I/O or TLS cause).
        #[source]
        source: tonic::transport::Error,
    },
    /// No endpoints were given.
    #[error("no endpoints given")]
    NoEndpoints,
    /// Every endpoint failed; one message per endpoint.
    #[error("no endpoint reachable: {}", .0.join("; "))]
    NoneReachable(Vec<String>),
}

/// A parsed endpoint: where to connect and which name to verify.
#[derive(Clone, Debug)]
struct Target {
    /// Host without IPv6 brackets (IP literal or DNS name).
    host: String,
    port: u16,
    /// `http://host:port` (plain scheme: TLS is done by our connector).
    uri: String,
    server_name: ServerName<'static>,
}

fn parse_endpoint(endpoint: &str) -> Result<Target, ClientError> {
    let invalid = |reason: &str| ClientError::InvalidEndpoint {
        endpoint: endpoint.to_string(),
        reason: reason.to_string(),
    };
    let trimmed = endpoint.trim();
    let rest = match trimmed.split_once("://") {
        Some(("https", rest)) => rest,
        Some((scheme, _)) => {
            return Err(invalid(&format!(
                "unsupported scheme {scheme:?} (use host:port or https://host:port)"
            )))
        }
        None => trimmed,
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() {
        return Err(invalid("empty"));
    }
    if rest.contains('/') || rest.contains('@') {
        return Err(invalid("expected host:port"));
    }
    let authority: http::uri::Authority = rest.parse().map_err(|e| invalid(&format!("{e}")))?;
    let port = authority
        .port_u16()
        .ok_or_else(|| invalid("missing port (expected host:port)"))?;
    let host = authority.host();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
        .to_string();
    if host.is_empty() {
        return Err(invalid("missing host"));
    }
    let server_name = ServerName::try_from(host.clone())
        .map_err(|e| invalid(&format!("not a valid TLS server name: {e}")))?;
    let uri = format!("http://{}", authority.as_str());
    Ok(Target {
        host,
        port,
        uri,
        server_name,
    })
}

fn endpoint_builder(endpoint: &str, target: &Target) -> Result<Endpoint, ClientError> {
    let ep =
        Endpoint::from_shared(target.uri.clone()).map_err(|e| ClientError::InvalidEndpoint {
            endpoint: endpoint.to_string(),
            reason: e.to_string(),
        })?;
    Ok(ep
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true))
}

type ConnectFuture =
    Pin<Box<dyn Future<Output = io::Result<TokioIo<TlsStream<TcpStream>>>> + Send>>;

/// The connector: TCP to the target, then a TLS handshake with the client
/// configuration `tls` holds at that moment.
fn connector(
    target: Target,
    tls: Arc<Tls>,
) -> impl tower::Service<
    Uri,
    Response = TokioIo<TlsStream<TcpStream>>,
    Error = io::Error,
    Future = ConnectFuture,
> + Clone
       + Send
       + 'static {
    tower::service_fn(move |_uri: Uri| -> ConnectFuture {
        let target = target.clone();
        let tls = tls.clone();
        Box::pin(async move {
            let tcp = TcpStream::connect((target.host.as_str(), target.port)).await?;
            tcp.set_nodelay(true)?;
            let stream = TlsConnector::from(tls.client_config())
                .connect(target.server_name.clone(), tcp)
                .await?;
            Ok(TokioIo::new(stream))
        })
    })
}

/// A channel to `endpoint` (`host:port` or `https://host:port`) over mTLS that
/// connects on first use. Needs a Tokio runtime (the channel spawns a worker).
pub fn channel_lazy(endpoint: &str, tls: Arc<Tls>) -> Result<Channel, ClientError> {
    let target = parse_endpoint(endpoint)?;
    let ep = endpoint_builder(endpoint, &target)?;
    Ok(ep.connect_with_connector_lazy(connector(target, tls)))
}

/// A channel to `endpoint` (`host:port` or `https://host:port`) over mTLS,
/// connected (TCP + TLS + HTTP/2) before it is returned.
pub async fn channel(endpoint: &str, tls: Arc<Tls>) -> Result<Channel, ClientError> {
    let target = parse_endpoint(endpoint)?;
    let ep = endpoint_builder(endpoint, &target)?;
    ep.connect_with_connector(connector(target, tls))
        .await
        .map_err(|source| ClientError::Connect {
            endpoint: endpoint.to_string(),
            source,
        })
}

/// Connects to the first endpoint of `endpoints`, in order, that accepts a
/// connection; returns it with its channel.
pub async fn first_reachable(
    endpoints: &[String],
    tls: Arc<Tls>,
) -> Result<(String, Channel), ClientError> {
    if endpoints.is_empty() {
        return Err(ClientError::NoEndpoints);
    }
    let mut failures = Vec::new();
    for endpoint in endpoints {
        match channel(endpoint, tls.clone()).await {
            Ok(ch) => return Ok((endpoint.clone(), ch)),
            Err(e) => failures.push(error_chain(&e)),
        }
    }
    Err(ClientError::NoneReachable(failures))
}

/// `err` and its sources, joined with ": " (tonic's transport errors hide the
/// useful part, e.g. "connection refused" or a certificate problem, in sources).
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let msg = s.to_string();
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_endpoints() {
        let t = parse_endpoint("127.0.0.1:7000").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("127.0.0.1", 7000));
        assert_eq!(t.uri, "http://127.0.0.1:7000");
        assert!(matches!(t.server_name, ServerName::IpAddress(_)));

        let t = parse_endpoint("https://coord-1.example.org:7000/").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("coord-1.example.org", 7000));
        assert!(matches!(t.server_name, ServerName::DnsName(_)));

        let t = parse_endpoint("[::1]:7001").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 7001));
        assert_eq!(t.uri, "http://[::1]:7001");
        assert!(matches!(t.server_name, ServerName::IpAddress(_)));
    }

    #[test]
    fn rejects_bad_endpoints() {
        for bad in [
            "",
            "host",
            "http://h:1",
            "h:port",
            "h:1/x",
            "u@h:1",
            ":7000",
        ] {
            assert!(parse_endpoint(bad).is_err(), "{bad:?} accepted");
        }
    }
}
