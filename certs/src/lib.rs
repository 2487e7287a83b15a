//! pxemesh identities: the installation CA, leaf certificates carrying a SPIFFE URI SAN,
//! reloadable rustls configurations for mTLS gRPC, and mapping a verified peer
//! certificate back to an [`Identity`].

pub mod identity;
pub mod inspect;
pub mod issue;
pub mod tls;

mod files;

pub use identity::{Identity, Role};
pub use issue::{Ca, Leaf, LeafRequest};
pub use tls::{Tls, TlsPaths};

use std::path::PathBuf;

/// Everything that can go wrong in this crate. Each variant names the file, identity or
/// certificate concerned, because these errors end up in operator logs. The underlying
/// error is part of the message rather than a `source()`, since logs print `%e` only.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A SPIFFE URI or an [`Identity`] that does not follow the pxemesh naming rules.
    #[error("invalid identity {input:?}: {reason}")]
    InvalidIdentity { input: String, reason: String },

    /// A file could not be read, written or inspected.
    #[error("cannot {action} {}: {error}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },

    /// A file that should hold PEM data holds none of the expected kind, or garbage.
    #[error("{}: {reason}", path.display())]
    Pem { path: PathBuf, reason: String },

    /// A certificate that cannot be parsed or does not have the shape we require.
    #[error("{context}: {reason}")]
    Certificate { context: String, reason: String },

    /// An identity from a different trust domain than the CA / our own.
    #[error("identity {identity} is not in trust domain {expected:?}")]
    TrustDomainMismatch { identity: String, expected: String },

    /// `Ca::save` found an existing CA key; overwriting it would orphan every issued leaf.
    #[error("refusing to overwrite existing CA key {}", path.display())]
    AlreadyExists { path: PathBuf },

    /// A private key file readable by group/other.
    #[error("{}: private key is accessible by group/other (mode {mode:03o}); run `chmod 600` on it", path.display())]
    InsecureKey { path: PathBuf, mode: u32 },

    /// Invalid parameters for a certificate to be issued.
    #[error("cannot issue certificate for {identity}: {reason}")]
    InvalidRequest { identity: String, reason: String },

    /// rcgen failed to generate a key or certificate.
    #[error("{context}: {error}")]
    Generate {
        context: String,
        error: rcgen::Error,
    },

    /// rustls refused our material while building a configuration (key mismatch, ...).
    #[error("TLS configuration from {context}: {error}")]
    Tls {
        context: String,
        error: rustls::Error,
    },

    /// A certificate chain did not verify against our CA.
    #[error("certificate of {identity} rejected: {error}")]
    Verify {
        identity: String,
        error: rustls::Error,
    },

    /// The peer presented no certificate at all.
    #[error("peer presented no client certificate")]
    NoPeerCertificate,
}
