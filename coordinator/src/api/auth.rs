//! Authorization of every RPC from the verified client certificate.
//!
//! A tower layer in front of all gRPC services: it maps the method path to the
//! role it needs, derives the caller's identity from the certificate chain that
//! rustls verified during the handshake, and refuses before any handler runs.
//! Handlers find the caller as `Peer` in the request extensions (relays use it
//! for rack scoping). Request fields never grant anything.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use pxemesh_certs::{Identity, Role, Tls};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::Status;
use tower::{Layer, Service};
use tracing::warn;

use crate::metrics::{Metrics, RpcLabels};

/// How long a verified certificate's identity is reused without re-checking
/// the chain. The handshake already verified it; re-checking on every call
/// (an ECDSA verification) only matters after a CA change, which this bounds.
const IDENTITY_TTL: Duration = Duration::from_secs(60);
const IDENTITY_CACHE_CAP: usize = 4096;

type IdentityCache = Arc<Mutex<HashMap<Vec<u8>, (Identity, Instant)>>>;

/// The verified caller, inserted into request extensions.
#[derive(Debug, Clone)]
pub struct Peer(pub Identity);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Health checks: open to probes without a certificate.
    Nobody,
    /// Any identity of our trust domain (server reflection).
    AnyIdentity,
    AdminRead,
    AdminWrite,
    Relay,
    Coordinator,
    /// A relay or a coordinator (image blob downloads).
    BlobReader,
    /// Unknown method: refuse.
    Deny,
}

pub fn need_for(path: &str) -> Need {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let service = parts.next().unwrap_or("");
    let method = parts.next().unwrap_or("");
    match service {
        "grpc.health.v1.Health" => Need::Nobody,
        "grpc.reflection.v1.ServerReflection" | "grpc.reflection.v1alpha.ServerReflection" => {
            Need::AnyIdentity
        }
        "pxemesh.v1.AdminService" => match method {
            "ClusterStatus" | "Get" | "List" | "ListEvents" | "WatchEvents" => Need::AdminRead,
            "ListJobs" | "GetJob" | "WatchJobs" => Need::AdminRead,
            "CloudStackStatus" => Need::AdminRead,
            _ => Need::AdminWrite,
        },
        // Relays fetch blobs, and so do peer coordinators replicating them.
        "pxemesh.v1.RelayService" if method == "FetchBlob" => Need::BlobReader,
        "pxemesh.v1.RelayService" => Need::Relay,
        "pxemesh.v1.RaftService" => Need::Coordinator,
        _ => Need::Deny,
    }
}

pub fn permits(need: Need, who: &Identity) -> bool {
    matches!(
        (need, &who.role),
        (Need::Nobody | Need::AnyIdentity, _)
            | (Need::AdminRead, Role::Admin { .. } | Role::Viewer { .. })
            | (Need::AdminWrite, Role::Admin { .. })
            | (Need::Relay, Role::Relay { .. })
            | (Need::Coordinator, Role::Coordinator { .. })
            | (
                Need::BlobReader,
                Role::Relay { .. } | Role::Coordinator { .. }
            )
    )
}

fn describe(need: Need) -> &'static str {
    match need {
        Need::Nobody | Need::AnyIdentity => "any identity",
        Need::AdminRead => "an admin or viewer certificate",
        Need::AdminWrite => "an admin certificate (viewers are read-only)",
        Need::Relay => "a relay certificate",
        Need::Coordinator => "a coordinator certificate",
        Need::BlobReader => "a relay or coordinator certificate",
        Need::Deny => "a known method",
    }
}

#[derive(Clone)]
pub struct AuthLayer {
    tls: Arc<Tls>,
    metrics: Arc<Metrics>,
    cache: IdentityCache,
}

impl AuthLayer {
    pub fn new(tls: Arc<Tls>, metrics: Arc<Metrics>) -> AuthLayer {
        AuthLayer {
            tls,
            metrics,
            cache: Arc::default(),
        }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            tls: self.tls.clone(),
            metrics: self.metrics.clone(),
            cache: self.cache.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    tls: Arc<Tls>,
    metrics: Arc<Metrics>,
    cache: IdentityCache,
}

impl<S> Auth<S> {
    fn check<B>(&self, req: &http::Request<B>) -> Result<Option<Identity>, Status> {
        let path = req.uri().path();
        let need = need_for(path);
        if need == Need::Nobody {
            return Ok(None);
        }
        let info = req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>();
        let remote = info.and_then(|i| i.get_ref().remote_addr());
        let certs = info.and_then(|i| i.peer_certs());
        let Some(certs) = certs.filter(|c| !c.is_empty()) else {
            warn!(method = path, remote = ?remote, "unauthenticated call refused: no client certificate");
            self.count(path, "unauthenticated");
            return Err(Status::unauthenticated(
                "a client certificate issued by this installation's CA is required",
            ));
        };
        let who = self.identity(&certs).map_err(|e| {
            warn!(method = path, remote = ?remote, error = %e, "call refused: client certificate carries no usable identity");
            self.count(path, "unauthenticated");
            Status::unauthenticated(format!("client certificate not accepted: {e}"))
        })?;
        if !permits(need, &who) {
            self.count(path, "permission_denied");
            warn!(method = path, peer_identity = %who, remote = ?remote, "permission denied: {} needs {}", path, describe(need));
            return Err(Status::permission_denied(format!(
                "{who} may not call {path}: it needs {}",
                describe(need)
            )));
        }
        self.count(path, "admitted");
        Ok(Some(who))
    }

    fn count(&self, method: &str, admission: &str) {
        self.metrics
            .rpcs
            .get_or_create(&RpcLabels {
                method: method.to_string(),
                admission: admission.to_string(),
            })
            .inc();
    }

    fn identity(
        &self,
        certs: &[rustls_pki_types::CertificateDer<'static>],
    ) -> Result<Identity, pxemesh_certs::CertError> {
        let leaf = certs[0].as_ref();
        if let Ok(cache) = self.cache.lock() {
            if let Some((who, at)) = cache.get(leaf) {
                if at.elapsed() < IDENTITY_TTL {
                    return Ok(who.clone());
                }
            }
        }
        let who = self.tls.peer_identity(certs)?;
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= IDENTITY_CACHE_CAP {
                cache.clear();
            }
            cache.insert(leaf.to_vec(), (who.clone(), Instant::now()));
        }
        Ok(who)
    }
}

impl<S, B, RB> Service<http::Request<B>> for Auth<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        match self.check(&req) {
            Ok(who) => {
                if let Some(who) = who {
                    req.extensions_mut().insert(Peer(who));
                }
                // The ready inner service is the one in `self`; leave a fresh clone behind.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(async move { inner.call(req).await })
            }
            Err(status) => {
                self.metrics.auth_denied.inc();
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

/// The verified caller of a request that passed the layer.
pub fn peer<T>(req: &tonic::Request<T>) -> Result<Identity, Status> {
    req.extensions()
        .get::<Peer>()
        .map(|p| p.0.clone())
        .ok_or_else(|| Status::unauthenticated("no verified peer identity"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(role: Role) -> Identity {
        Identity::new("test.local", role)
    }

    #[test]
    fn policy() {
        let admin = id(Role::Admin { name: "a".into() });
        let viewer = id(Role::Viewer { name: "v".into() });
        let relay = id(Role::Relay {
            rack: "r1".into(),
            name: "x".into(),
        });
        let coord = id(Role::Coordinator { id: 1 });
        let put = need_for("/pxemesh.v1.AdminService/Put");
        let list = need_for("/pxemesh.v1.AdminService/List");
        assert!(permits(put, &admin));
        assert!(!permits(put, &viewer));
        assert!(permits(list, &viewer));
        assert!(!permits(list, &relay));
        assert!(!permits(need_for("/pxemesh.v1.RaftService/Stream"), &admin));
        assert!(permits(need_for("/pxemesh.v1.RaftService/Stream"), &coord));
        assert!(permits(need_for("/pxemesh.v1.RelayService/Watch"), &relay));
        assert!(!permits(need_for("/pxemesh.v1.RelayService/Watch"), &coord));
        let fetch = need_for("/pxemesh.v1.RelayService/FetchBlob");
        assert!(permits(fetch, &coord) && permits(fetch, &relay));
        assert!(!permits(fetch, &admin) && !permits(fetch, &viewer));
        assert!(!permits(
            need_for("/pxemesh.v1.AdminService/PushBlob"),
            &viewer
        ));
        assert!(permits(
            need_for("/pxemesh.v1.AdminService/StatBlob"),
            &admin
        ));
        assert_eq!(need_for("/grpc.health.v1.Health/Check"), Need::Nobody);
        assert_eq!(need_for("/evil.Service/Do"), Need::Deny);
        assert!(!permits(Need::Deny, &admin));
    }
}
