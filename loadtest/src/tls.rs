//! mTLS gRPC channels for the load generator.
//!
//! One connector serves every target (pxemesh and etcd alike), so a comparison
//! between them measures the servers, not two different client stacks: rustls
//! with the ring provider, ALPN `h2`, TCP_NODELAY, and the same HTTP/2 settings
//! as `pxemesh_coordinator::client`.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use http::Uri;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

/// Time allowed to establish TCP + TLS + HTTP/2 to one endpoint.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The client's CA bundle, certificate (chain) and private key, all PEM.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// `dir/ca.pem`, `dir/<stem>.pem`, `dir/<stem>-key.pem`: the layout
    /// `pxemesh-certs` writes.
    pub fn in_dir(dir: &Path, stem: &str) -> TlsFiles {
        TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}-key.pem")),
        }
    }

    /// A rustls client configuration: server verified against `ca`, client
    /// certificate `cert`/`key`, ALPN `h2`.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>> {
        let ca: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&self.ca)
            .with_context(|| format!("reading {}", self.ca.display()))?
            .collect::<Result<_, _>>()
            .with_context(|| format!("parsing {}", self.ca.display()))?;
        if ca.is_empty() {
            bail!("{}: no certificate found", self.ca.display());
        }
        let mut roots = RootCertStore::empty();
        for c in ca {
            roots
                .add(c)
                .with_context(|| format!("{}: unusable trust anchor", self.ca.display()))?;
        }
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&self.cert)
            .with_context(|| format!("reading {}", self.cert.display()))?
            .collect::<Result<_, _>>()
            .with_context(|| format!("parsing {}", self.cert.display()))?;
        if chain.is_empty() {
            bail!("{}: no certificate found", self.cert.display());
        }
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .with_context(|| format!("reading the private key {}", self.key.display()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .with_context(|| {
                format!(
                    "TLS client configuration from {} + {}",
                    self.cert.display(),
                    self.key.display()
                )
            })?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

/// Where to connect and which name to verify.
#[derive(Clone, Debug)]
struct Target {
    host: String,
    port: u16,
    uri: String,
    server_name: ServerName<'static>,
}

fn parse_endpoint(endpoint: &str) -> Result<Target> {
    let trimmed = endpoint.trim();
    let rest = match trimmed.split_once("://") {
        Some(("https", rest)) => rest,
        Some((scheme, _)) => bail!("endpoint {endpoint:?}: unsupported scheme {scheme:?}"),
        None => trimmed,
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let authority: http::uri::Authority = rest
        .parse()
        .map_err(|e| anyhow!("endpoint {endpoint:?}: {e}"))?;
    let port = authority
        .port_u16()
        .ok_or_else(|| anyhow!("endpoint {endpoint:?}: missing port (expected host:port)"))?;
    let host = authority.host();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
        .to_string();
    if host.is_empty() {
        bail!("endpoint {endpoint:?}: missing host");
    }
    let server_name = ServerName::try_from(host.clone())
        .map_err(|e| anyhow!("endpoint {endpoint:?}: not a valid TLS server name: {e}"))?;
    Ok(Target {
        host,
        port,
        uri: format!("http://{}", authority.as_str()),
        server_name,
    })
}

type ConnectFuture =
    Pin<Box<dyn Future<Output = io::Result<TokioIo<TlsStream<TcpStream>>>> + Send>>;

fn connector(
    target: Target,
    config: Arc<ClientConfig>,
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
        let config = config.clone();
        Box::pin(async move {
            let tcp = TcpStream::connect((target.host.as_str(), target.port)).await?;
            tcp.set_nodelay(true)?;
            let stream = TlsConnector::from(config)
                .connect(target.server_name.clone(), tcp)
                .await?;
            Ok(TokioIo::new(stream))
        })
    })
}

/// A new HTTP/2 connection to `endpoint` (`host:port` or `https://host:port`)
/// over mTLS, established before this returns. Every call makes its own
/// connection: channels are never shared between benchmark clients.
pub async fn connect(endpoint: &str, config: Arc<ClientConfig>) -> Result<Channel> {
    let target = parse_endpoint(endpoint)?;
    let ep = Endpoint::from_shared(target.uri.clone())
        .with_context(|| format!("endpoint {endpoint:?}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(15))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    let fut = ep.connect_with_connector(connector(target, config));
    match tokio::time::timeout(CONNECT_TIMEOUT + Duration::from_secs(1), fut).await {
        Ok(Ok(ch)) => Ok(ch),
        Ok(Err(e)) => Err(anyhow!("cannot connect to {endpoint}: {}", error_chain(&e))),
        Err(_) => bail!("cannot connect to {endpoint}: timed out"),
    }
}

/// `err` and its sources joined with ": " (tonic hides the useful part, e.g. a
/// certificate problem, in the source chain).
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
        let t = parse_endpoint("https://localhost:2379/").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("localhost", 2379));
        assert!(parse_endpoint("http://h:1").is_err());
        assert!(parse_endpoint("host").is_err());
    }
}
