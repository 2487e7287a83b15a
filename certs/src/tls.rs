//! Reloadable rustls configurations for mTLS gRPC (h2) between pxemesh processes.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
};
use rustls_pki_types::{CertificateDer, UnixTime};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::files;
use crate::identity::identity_of;
use crate::{CertError, Identity};

const ALPN_H2: &[u8] = b"h2";

/// Where a process finds its CA bundle, certificate (chain) and private key.
#[derive(Debug, Clone)]
pub struct TlsPaths {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsPaths {
    /// `dir/ca.pem`, `dir/<stem>.pem`, `dir/<stem>-key.pem` — the layout `pxemesh-certs`
    /// writes.
    pub fn in_dir(dir: &Path, stem: &str) -> TlsPaths {
        TlsPaths {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}-key.pem")),
        }
    }

    fn all(&self) -> [&Path; 3] {
        [&self.ca, &self.cert, &self.key]
    }
}

/// Everything built from one consistent read of the three files, swapped as a unit so
/// that a reader never pairs the new server config with the old identity.
struct Loaded {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    identity: Identity,
    not_after: OffsetDateTime,
    /// The un-logged webpki verifier over the current CA bundle, for `peer_identity`.
    verifier: Arc<dyn ClientCertVerifier>,
    /// The files' stamp taken just before reading them: a change during the read makes
    /// the reloader read again.
    stamp: Stamp,
}

/// Our TLS identity and the server/client configs built from it, reloadable at run time.
///
/// Fetch [`Tls::server_config`] / [`Tls::client_config`] per connection (they are cheap
/// `Arc` clones): a config captured once keeps the certificates of that moment.
pub struct Tls {
    paths: TlsPaths,
    provider: Arc<CryptoProvider>,
    current: ArcSwap<Loaded>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cur = self.current.load();
        f.debug_struct("Tls")
            .field("paths", &self.paths)
            .field("identity", &cur.identity.uri())
            .field("not_after", &cur.not_after)
            .finish_non_exhaustive()
    }
}

impl Tls {
    pub fn load(paths: TlsPaths) -> Result<Arc<Tls>, CertError> {
        // Explicit provider: a process-wide default may be absent, or be another
        // provider installed by some dependency.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let loaded = load_material(&paths, &provider)?;
        tracing::info!(
            identity = %loaded.identity,
            not_after = %loaded.not_after,
            cert = %paths.cert.display(),
            "loaded TLS certificates"
        );
        Ok(Arc::new(Tls {
            paths,
            provider,
            current: ArcSwap::from_pointee(loaded),
        }))
    }

    /// Our own identity, from the currently loaded leaf certificate.
    pub fn identity(&self) -> Identity {
        self.current.load().identity.clone()
    }

    pub fn trust_domain(&self) -> String {
        self.current.load().identity.trust_domain.clone()
    }

    /// Expiry of the currently loaded leaf certificate.
    pub fn not_after(&self) -> OffsetDateTime {
        self.current.load().not_after
    }

    pub fn paths(&self) -> &TlsPaths {
        &self.paths
    }

    pub fn server_config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.current.load().server)
    }

    pub fn client_config(&self) -> Arc<ClientConfig> {
        Arc::clone(&self.current.load().client)
    }

    /// Re-reads all three files. On error the previous configs stay in use.
    pub fn reload(&self) -> Result<(), CertError> {
        let loaded = load_material(&self.paths, &self.provider)?;
        self.current.store(Arc::new(loaded));
        Ok(())
    }

    /// Background task: reloads on SIGHUP and whenever any of the three files changes
    /// (mtime, length or inode, polled every `poll`). A change is applied once the files
    /// have looked the same for one more poll, so that a rotation writing key and
    /// certificate one after the other is not caught half-way. Stops when `shutdown` is
    /// cancelled.
    pub fn spawn_reloader(
        self: &Arc<Self>,
        shutdown: CancellationToken,
        poll: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let tls = Arc::clone(self);
        tokio::spawn(async move { tls.reload_loop(shutdown, poll).await })
    }

    async fn reload_loop(&self, shutdown: CancellationToken, poll: Duration) {
        use tokio::signal::unix::{signal, SignalKind};

        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; TLS reload only on file change");
                None
            }
        };
        let mut applied = self.current.load().stamp.clone();
        let mut observed = applied.clone();
        let mut ticker = tokio::time::interval(poll.max(Duration::from_millis(10)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            let trigger = tokio::select! {
                _ = shutdown.cancelled() => return,
                Some(()) = recv_hup(&mut hup) => "SIGHUP",
                _ = ticker.tick() => {
                    let now = stamp(&self.paths);
                    let settled = now == observed;
                    observed = now;
                    if !settled || observed == applied {
                        continue;
                    }
                    "file change"
                }
            };
            // Recorded even when the reload fails: retrying the same broken files every
            // poll would only repeat the warning.
            applied = stamp(&self.paths);
            observed = applied.clone();
            match self.reload() {
                Ok(()) => {
                    let cur = self.current.load();
                    tracing::info!(
                        identity = %cur.identity,
                        not_after = %cur.not_after,
                        trigger,
                        "reloaded TLS certificates"
                    );
                }
                Err(e) => tracing::warn!(
                    error = %e,
                    trigger,
                    "TLS certificate reload failed; keeping the previous certificates"
                ),
            }
        }
    }

    /// Verifies that a peer chain (as presented on an accepted connection) chains to our
    /// current CA bundle and names an identity in our trust domain; returns that
    /// identity.
    ///
    /// The chain is checked at a time inside the leaf's validity: expiry was enforced
    /// by the handshake, and re-checking it here would turn a long-lived gRPC
    /// connection into an outage the moment its certificate expires, while a fresh
    /// connection (with the rotated certificate) would be fine.
    pub fn peer_identity(
        &self,
        peer_certs: &[CertificateDer<'static>],
    ) -> Result<Identity, CertError> {
        let (end, intermediates) = peer_certs
            .split_first()
            .ok_or(CertError::NoPeerCertificate)?;
        let (_, x509) =
            x509_parser::parse_x509_certificate(end).map_err(|e| CertError::Certificate {
                context: "peer certificate".into(),
                reason: format!("not a valid X.509 certificate: {e}"),
            })?;
        let identity = identity_of(&x509)?;
        let cur = self.current.load();
        let at = time_within(
            x509.validity().not_before.to_datetime(),
            x509.validity().not_after.to_datetime(),
        );
        cur.verifier
            .verify_client_cert(end, intermediates, at)
            .map_err(|error| CertError::Verify {
                identity: identity.uri(),
                error,
            })?;
        if identity.trust_domain != cur.identity.trust_domain {
            return Err(CertError::TrustDomainMismatch {
                identity: identity.uri(),
                expected: cur.identity.trust_domain.clone(),
            });
        }
        Ok(identity)
    }
}

async fn recv_hup(hup: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match hup {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

type Stamp = Vec<Option<(SystemTime, u64, u64)>>;

/// What the reloader compares between polls. The inode catches an atomic rename that
/// keeps size and (coarse) mtime; `metadata` follows symlinks, so a swapped symlink
/// (as in Kubernetes secret volumes) shows up as a different target.
fn stamp(paths: &TlsPaths) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    paths
        .all()
        .iter()
        .map(|p| {
            let m = std::fs::metadata(p).ok()?;
            Some((m.modified().ok()?, m.len(), m.ino()))
        })
        .collect()
}

fn load_material(paths: &TlsPaths, provider: &Arc<CryptoProvider>) -> Result<Loaded, CertError> {
    let stamp = stamp(paths);
    let ca_certs = files::read_certs_pem(&paths.ca)?;
    let chain = files::read_certs_pem(&paths.cert)?;
    let key = files::read_key_pem(&paths.key)?;

    let mut roots = RootCertStore::empty();
    for (i, ca) in ca_certs.into_iter().enumerate() {
        roots.add(ca).map_err(|e| CertError::Certificate {
            context: paths.ca.display().to_string(),
            reason: format!("certificate #{} is not a usable trust anchor: {e}", i + 1),
        })?;
    }
    let roots = Arc::new(roots);

    let cert_err = |reason: String| CertError::Certificate {
        context: paths.cert.display().to_string(),
        reason,
    };
    let leaf = &chain[0];
    let (_, x509) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| cert_err(format!("not a valid X.509 certificate: {e}")))?;
    let identity = identity_of(&x509).map_err(|e| cert_err(e.to_string()))?;
    let not_before = x509.validity().not_before.to_datetime();
    let not_after = x509.validity().not_after.to_datetime();
    let now = OffsetDateTime::now_utc();
    if now > not_after || now < not_before {
        // Not fatal: refusing to start would not make the certificate any better, and
        // the process may be waiting for a rotation it will pick up by reload.
        tracing::warn!(
            identity = %identity,
            not_before = %not_before,
            not_after = %not_after,
            cert = %paths.cert.display(),
            "our TLS certificate is outside its validity period; peers will reject it"
        );
    }

    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| CertError::Certificate {
            context: paths.ca.display().to_string(),
            reason: format!("cannot build a verifier from this CA bundle: {e}"),
        })?;
    // Catch a rotation that replaced the CA bundle but not our certificate (or the
    // reverse) here, rather than as handshake failures on every peer.
    verifier
        .verify_client_cert(leaf, &chain[1..], time_within(not_before, not_after))
        .map_err(|e| {
            cert_err(format!(
                "does not chain to the CA bundle {}: {e}",
                paths.ca.display()
            ))
        })?;

    let tls_err = |error| CertError::Tls {
        context: format!("{} + {}", paths.cert.display(), paths.key.display()),
        error,
    };

    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?
        .with_client_cert_verifier(Arc::new(LoggingClientVerifier {
            inner: verifier.clone(),
        }))
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(tls_err)?;
    server.alpn_protocols = vec![ALPN_H2.to_vec()];
    // No session resumption: a resumed session skips client certificate verification,
    // so it would outlive a CA rotation or the certificate's expiry. gRPC connections
    // are long-lived, so full handshakes cost next to nothing.
    server.session_storage = Arc::new(NoServerSessionStorage {});
    server.send_tls13_tickets = 0;

    let mut client = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(tls_err)?;
    client.alpn_protocols = vec![ALPN_H2.to_vec()];

    Ok(Loaded {
        server: Arc::new(server),
        client: Arc::new(client),
        identity,
        not_after,
        verifier,
        stamp,
    })
}

/// Now, clamped into [not_before, not_after], for verifying a chain without re-judging
/// the leaf's validity period.
fn time_within(not_before: OffsetDateTime, not_after: OffsetDateTime) -> UnixTime {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let t = now
        .min(not_after.unix_timestamp())
        .max(not_before.unix_timestamp());
    UnixTime::since_unix_epoch(Duration::from_secs(u64::try_from(t).unwrap_or(0)))
}

/// Delegates to the webpki verifier and tells the operator who was refused and why:
/// rustls itself only fails the handshake.
#[derive(Debug)]
struct LoggingClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for LoggingClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
            .inspect_err(|e| {
                // Unverified, but parse_uri only accepts the strict identity charset,
                // so nothing attacker-chosen beyond that reaches the log.
                let peer = Identity::from_cert_der(end_entity)
                    .map(|i| i.uri())
                    .unwrap_or_else(|_| "unknown".into());
                tracing::warn!(peer_identity = %peer, error = %e, "rejected client certificate");
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::issue::default_stem;
    use crate::{Ca, LeafRequest, Role};
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{PrivateKeyDer, ServerName};
    use std::sync::Mutex;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    const TD: &str = "pxe.test";

    /// Records events as "message k=v ..." lines; installed per test thread, which is
    /// where a current-thread tokio test runs its spawned tasks too.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<String>>>);

    struct Line(String);
    impl tracing::field::Visit for Line {
        fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
            self.0.push_str(&format!(" {}={:?}", field.name(), value));
        }
    }

    impl tracing::Subscriber for Capture {
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, event: &tracing::Event<'_>) {
            let mut line = Line(event.metadata().level().to_string());
            event.record(&mut line);
            self.0.lock().unwrap().push(line.0);
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    impl Capture {
        fn lines(&self) -> Vec<String> {
            self.0.lock().unwrap().clone()
        }
    }

    struct Fixture {
        dir: tempfile::TempDir,
        ca: Ca,
        server: Arc<Tls>,
    }

    fn ident(role: Role) -> Identity {
        Identity::new(TD, role)
    }

    fn alice() -> Identity {
        ident(Role::Admin {
            name: "alice".into(),
        })
    }

    fn issue_to(ca: &Ca, dir: &Path, req: &LeafRequest) -> TlsPaths {
        let stem = default_stem(&req.identity);
        ca.issue(req).unwrap().save(dir, &stem).unwrap();
        TlsPaths::in_dir(dir, &stem)
    }

    fn coordinator_req(id: u64) -> LeafRequest {
        let mut req = LeafRequest::new(ident(Role::Coordinator { id }), 1);
        req.dns_names = vec!["localhost".into()];
        req.ips = vec!["127.0.0.1".parse().unwrap()];
        req
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate(TD, 1).unwrap();
        ca.save(dir.path()).unwrap();
        let paths = issue_to(&ca, dir.path(), &coordinator_req(1));
        let server = Tls::load(paths).unwrap();
        Fixture { dir, ca, server }
    }

    /// A client config that trusts `ca_pem` for the server but presents a leaf that
    /// `Tls::load` would refuse (e.g. from a foreign CA).
    fn raw_client(ca_pem: &str, leaf: Option<&crate::Leaf>) -> Arc<ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let b = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let mut cfg = match leaf {
            Some(l) => b
                .with_client_auth_cert(
                    CertificateDer::pem_slice_iter(l.cert_pem.as_bytes())
                        .map(Result::unwrap)
                        .collect(),
                    PrivateKeyDer::from_pem_slice(l.key_pem.as_bytes()).unwrap(),
                )
                .unwrap(),
            None => b.with_no_client_auth(),
        };
        cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
        Arc::new(cfg)
    }

    struct Outcome {
        /// Peer certificates the server saw, or the server-side handshake error.
        server: Result<Option<Vec<CertificateDer<'static>>>, String>,
        /// The server's certificate as the client saw it, or the client-side error.
        client: Result<Vec<CertificateDer<'static>>, String>,
    }

    async fn handshake(server: Arc<ServerConfig>, client: Arc<ClientConfig>) -> Outcome {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let srv = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = TlsAcceptor::from(server)
                .accept(tcp)
                .await
                .map_err(|e| e.to_string())?;
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(ALPN_H2));
            let peer = tls.get_ref().1.peer_certificates().map(<[_]>::to_vec);
            tls.write_all(b"ok").await.map_err(|e| e.to_string())?;
            tls.shutdown().await.map_err(|e| e.to_string())?;
            Ok(peer)
        });
        let cli = async {
            let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
            let name = ServerName::try_from("localhost").unwrap();
            let mut tls = TlsConnector::from(client)
                .connect(name, tcp)
                .await
                .map_err(|e| e.to_string())?;
            // Under TLS 1.3 the client finishes before the server has judged its
            // certificate; a rejection arrives as an alert on the first read.
            let mut buf = [0u8; 2];
            tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            assert_eq!(&buf, b"ok");
            Ok(tls.get_ref().1.peer_certificates().unwrap().to_vec())
        };
        let deadline = Duration::from_secs(5);
        let client = tokio::time::timeout(deadline, cli).await.unwrap();
        let server = tokio::time::timeout(deadline, srv).await.unwrap().unwrap();
        Outcome { server, client }
    }

    #[tokio::test]
    async fn valid_client_cert_maps_to_identity() {
        let f = fixture();
        let client =
            Tls::load(issue_to(&f.ca, f.dir.path(), &LeafRequest::new(alice(), 1))).unwrap();
        assert_eq!(client.identity(), alice());
        assert_eq!(client.trust_domain(), TD);
        let out = handshake(f.server.server_config(), client.client_config()).await;
        let peer = out.server.unwrap().expect("client certificate");
        assert_eq!(f.server.peer_identity(&peer).unwrap(), alice());
        let server_cert = out.client.unwrap();
        assert_eq!(
            client.peer_identity(&server_cert).unwrap(),
            ident(Role::Coordinator { id: 1 })
        );
    }

    #[tokio::test]
    async fn client_cert_from_other_ca_is_rejected_and_logged() {
        let f = fixture();
        let capture = Capture::default();
        let _guard = tracing::subscriber::set_default(capture.clone());
        let other = Ca::generate(TD, 1).unwrap();
        let mallory = ident(Role::Admin {
            name: "mallory".into(),
        });
        let leaf = other.issue(&LeafRequest::new(mallory.clone(), 1)).unwrap();
        let out = handshake(
            f.server.server_config(),
            raw_client(f.ca.cert_pem(), Some(&leaf)),
        )
        .await;
        assert!(out.server.is_err(), "server accepted a foreign client cert");
        assert!(out.client.is_err());
        let lines = capture.lines();
        assert!(
            lines.iter().any(|l| l.starts_with("WARN")
                && l.contains("rejected client certificate")
                && l.contains("peer_identity=spiffe://pxe.test/admin/mallory")
                && l.contains("UnknownIssuer")),
            "{lines:#?}"
        );

        // Also refused outside a handshake.
        let der: Vec<_> = CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
            .map(Result::unwrap)
            .collect();
        let err = f.server.peer_identity(&der).unwrap_err();
        assert!(matches!(err, CertError::Verify { .. }), "{err}");
        assert!(err.to_string().contains("mallory"), "{err}");
    }

    #[tokio::test]
    async fn expired_client_cert_is_rejected_and_logged() {
        let f = fixture();
        let capture = Capture::default();
        let _guard = tracing::subscriber::set_default(capture.clone());
        let mut req = LeafRequest::new(alice(), 1);
        req.not_before = OffsetDateTime::now_utc() - time::Duration::days(10);
        req.not_after = OffsetDateTime::now_utc() - time::Duration::days(1);
        // Loading an expired certificate works (with a warning) so that a service
        // stays up to pick up its rotation.
        let client = Tls::load(issue_to(&f.ca, f.dir.path(), &req)).unwrap();
        let out = handshake(f.server.server_config(), client.client_config()).await;
        assert!(
            out.server.is_err(),
            "server accepted an expired client cert"
        );
        assert!(out.client.is_err());
        let lines = capture.lines();
        assert!(
            lines
                .iter()
                .any(|l| l.contains("outside its validity period")),
            "{lines:#?}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.contains("rejected client certificate")
                    && l.contains("peer_identity=spiffe://pxe.test/admin/alice")
                    && l.to_lowercase().contains("expired")),
            "{lines:#?}"
        );
    }

    #[tokio::test]
    async fn anonymous_client_is_allowed_without_identity() {
        let f = fixture();
        let out = handshake(f.server.server_config(), raw_client(f.ca.cert_pem(), None)).await;
        assert_eq!(out.server.unwrap(), None);
        assert!(out.client.is_ok());
        assert!(matches!(
            f.server.peer_identity(&[]),
            Err(CertError::NoPeerCertificate)
        ));
    }

    #[tokio::test]
    async fn server_cert_from_other_ca_is_rejected_by_client() {
        let f = fixture();
        let other = Ca::generate(TD, 1).unwrap();
        let out = handshake(f.server.server_config(), raw_client(other.cert_pem(), None)).await;
        assert!(out.client.is_err());
        assert!(out.server.is_err());
    }

    #[tokio::test]
    async fn reload_swaps_identity_and_keeps_old_on_error() {
        let f = fixture();
        let client =
            Tls::load(issue_to(&f.ca, f.dir.path(), &LeafRequest::new(alice(), 1))).unwrap();
        let paths = f.server.paths().clone();
        // Rotate: coordinator 2's certificate written under coordinator 1's file names.
        f.ca.issue(&coordinator_req(2))
            .unwrap()
            .save(f.dir.path(), "coordinator-1")
            .unwrap();
        f.server.reload().unwrap();
        let two = ident(Role::Coordinator { id: 2 });
        assert_eq!(f.server.identity(), two);
        let out = handshake(f.server.server_config(), client.client_config()).await;
        assert_eq!(client.peer_identity(&out.client.unwrap()).unwrap(), two);

        // A broken key is refused and the previous material stays in service.
        std::fs::write(&paths.key, "garbage").unwrap();
        let err = f.server.reload().unwrap_err();
        assert!(err.to_string().contains("coordinator-1-key.pem"), "{err}");
        assert_eq!(f.server.identity(), two);
        let out = handshake(f.server.server_config(), client.client_config()).await;
        assert!(out.server.is_ok() && out.client.is_ok());

        // A key that does not match the certificate is refused too.
        let stray = f.ca.issue(&coordinator_req(3)).unwrap();
        std::fs::write(&paths.key, &stray.key_pem).unwrap();
        let err = f.server.reload().unwrap_err();
        assert!(matches!(err, CertError::Tls { .. }), "{err}");

        // A certificate that no longer chains to the CA file is refused.
        let foreign = Ca::generate(TD, 1).unwrap();
        foreign
            .issue(&coordinator_req(4))
            .unwrap()
            .save(f.dir.path(), "coordinator-1")
            .unwrap();
        let err = f.server.reload().unwrap_err();
        assert!(err.to_string().contains("does not chain"), "{err}");
        assert_eq!(f.server.identity(), two);
    }

    #[tokio::test]
    async fn reloader_follows_file_changes_and_stops() {
        let f = fixture();
        let capture = Capture::default();
        let _guard = tracing::subscriber::set_default(capture.clone());
        let shutdown = CancellationToken::new();
        let task = f
            .server
            .spawn_reloader(shutdown.clone(), Duration::from_millis(20));
        f.ca.issue(&coordinator_req(5))
            .unwrap()
            .save(f.dir.path(), "coordinator-1")
            .unwrap();
        let want = ident(Role::Coordinator { id: 5 });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while f.server.identity() != want {
            assert!(tokio::time::Instant::now() < deadline, "no reload seen");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(capture
            .lines()
            .iter()
            .any(|l| l.contains("reloaded TLS certificates")
                && l.contains("spiffe://pxe.test/coordinator/5")));
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .unwrap()
            .unwrap();
    }

    #[test]
    fn load_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = Tls::load(TlsPaths::in_dir(dir.path(), "nope")).unwrap_err();
        assert!(err.to_string().contains("ca.pem"), "{err}");
        let ca = Ca::generate(TD, 1).unwrap();
        ca.save(dir.path()).unwrap();
        let err = Tls::load(TlsPaths::in_dir(dir.path(), "nope")).unwrap_err();
        assert!(err.to_string().contains("nope.pem"), "{err}");
        std::fs::write(dir.path().join("nope.pem"), "garbage").unwrap();
        let err = Tls::load(TlsPaths::in_dir(dir.path(), "nope")).unwrap_err();
        assert!(err.to_string().contains("no CERTIFICATE"), "{err}");
        // The CA certificate itself is not a leaf identity.
        let paths = TlsPaths {
            ca: dir.path().join("ca.pem"),
            cert: dir.path().join("ca.pem"),
            key: dir.path().join("ca-key.pem"),
        };
        let err = Tls::load(paths).unwrap_err();
        assert!(err.to_string().contains("ca.pem"), "{err}");
    }
}
