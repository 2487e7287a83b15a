//! The installation CA and the leaf certificates it issues.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};

use crate::files::{self, CERT_MODE, KEY_MODE};
use crate::identity::{spiffe_uris, validate_trust_domain};
use crate::{CertError, Identity, Role};

const CA_CERT_FILE: &str = "ca.pem";
const CA_KEY_FILE: &str = "ca-key.pem";

/// Certificates start slightly in the past so that a verifier whose clock is a little
/// behind the issuer's does not reject a freshly issued certificate.
const BACKDATE: Duration = Duration::minutes(5);

/// What to put in a leaf certificate.
#[derive(Debug, Clone)]
pub struct LeafRequest {
    pub identity: Identity,
    pub dns_names: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl LeafRequest {
    /// A request without DNS/IP SANs, valid from 5 minutes ago for `validity_days`.
    pub fn new(identity: Identity, validity_days: u32) -> LeafRequest {
        let now = OffsetDateTime::now_utc();
        LeafRequest {
            identity,
            dns_names: Vec::new(),
            ips: Vec::new(),
            not_before: now - BACKDATE,
            not_after: now + Duration::days(i64::from(validity_days)),
        }
    }
}

/// An issued leaf certificate and its private key, both PEM.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for Leaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leaf")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"[elided]")
            .finish()
    }
}

impl Leaf {
    /// Writes `<dir>/<stem>.pem` and `<dir>/<stem>-key.pem` (mode 0600 from creation),
    /// replacing existing files atomically so that a running service's reloader never
    /// picks up a half-written file. Returns (cert path, key path).
    pub fn save(&self, dir: &Path, stem: &str) -> Result<(PathBuf, PathBuf), CertError> {
        validate_stem(stem)?;
        files::create_dir_all(dir)?;
        let cert_path = dir.join(format!("{stem}.pem"));
        let key_path = dir.join(format!("{stem}-key.pem"));
        // Key first: a reloader that sees the new key with the old certificate fails the
        // key/cert match check and keeps the old config until the certificate follows.
        files::write_atomic(&key_path, self.key_pem.as_bytes(), KEY_MODE)?;
        files::write_atomic(&cert_path, self.cert_pem.as_bytes(), CERT_MODE)?;
        Ok((cert_path, key_path))
    }
}

/// The installation CA: a self-signed ECDSA P-256 certificate and its key.
pub struct Ca {
    trust_domain: String,
    cert_pem: String,
    not_after: OffsetDateTime,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// A new self-signed CA for `trust_domain`, valid from 5 minutes ago for
    /// `validity_days`.
    pub fn generate(trust_domain: &str, validity_days: u32) -> Result<Ca, CertError> {
        validate_trust_domain(trust_domain).map_err(|reason| CertError::InvalidIdentity {
            input: trust_domain.to_string(),
            reason,
        })?;
        if validity_days == 0 {
            return Err(CertError::InvalidRequest {
                identity: format!("CA of {trust_domain}"),
                reason: "validity must be at least one day".into(),
            });
        }
        let gen_err = |error| CertError::Generate {
            context: format!("generating CA for trust domain {trust_domain}"),
            error,
        };
        let key = KeyPair::generate().map_err(gen_err)?;
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("pxemesh CA ({trust_domain})"));
        // Two CAs of one trust domain (say, after a re-init) would otherwise share a
        // name, and a verifier would report a certificate from the other one as a bad
        // signature instead of an unknown issuer. The key hash also tells operators
        // which CA generation issued a leaf.
        let key_hash = hex::encode(&Sha256::digest(key.public_key_raw())[..6]);
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, format!("ca-{key_hash}"));
        // Path length 0: the CA signs leaves directly; an intermediate it signed by
        // mistake could not issue anything that verifies.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.subject_alt_names = vec![SanType::URI(
            format!("spiffe://{trust_domain}")
                .try_into()
                .map_err(gen_err)?,
        )];
        params.not_before = now - BACKDATE;
        params.not_after = now + Duration::days(i64::from(validity_days));
        let cert = params.self_signed(&key).map_err(gen_err)?;
        Ok(Ca {
            trust_domain: trust_domain.to_string(),
            cert_pem: cert.pem(),
            not_after: params.not_after,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads `dir/ca.pem` and `dir/ca-key.pem`, checking that they belong together and
    /// that the key is not readable by group/other.
    pub fn load(dir: &Path) -> Result<Ca, CertError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let cert_pem = files::read_to_string(&cert_path)?;
        let certs = files::parse_certs_pem(&cert_pem, &cert_path)?;
        // Signing with the wrong one of several CAs would be silent; demand exactly one.
        let [der] = certs.as_slice() else {
            return Err(CertError::Pem {
                path: cert_path,
                reason: format!(
                    "holds {} certificates; the CA directory must hold exactly the CA certificate",
                    certs.len()
                ),
            });
        };
        let key_pem = files::read_to_string(&key_path)?;
        files::check_key_mode(&key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|error| CertError::Generate {
            context: format!("{}: cannot load private key", key_path.display()),
            error,
        })?;

        let cert_err = |reason: String| CertError::Certificate {
            context: cert_path.display().to_string(),
            reason,
        };
        let (_, x509) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| cert_err(format!("not a valid X.509 certificate: {e}")))?;
        if !x509.is_ca() {
            return Err(cert_err(
                "is not a CA certificate (basicConstraints CA:false)".into(),
            ));
        }
        if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(cert_err(format!(
                "does not match the private key in {}",
                key_path.display()
            )));
        }
        let trust_domain = ca_trust_domain(&x509).map_err(cert_err)?;
        let not_after = x509.validity().not_after.to_datetime();
        let issuer = Issuer::from_ca_cert_der(der, key).map_err(|error| CertError::Generate {
            context: format!("{}: cannot use as issuer", cert_path.display()),
            error,
        })?;
        Ok(Ca {
            trust_domain,
            cert_pem,
            not_after,
            issuer,
        })
    }

    /// Writes `dir/ca.pem` and `dir/ca-key.pem` (0600, created with that mode). Refuses
    /// to overwrite an existing CA key: that would orphan every certificate it issued.
    pub fn save(&self, dir: &Path) -> Result<(), CertError> {
        files::create_dir_all(dir)?;
        let key_path = dir.join(CA_KEY_FILE);
        // symlink_metadata so that a dangling symlink also counts as "exists".
        if std::fs::symlink_metadata(&key_path).is_ok() {
            return Err(CertError::AlreadyExists { path: key_path });
        }
        let key_pem = self.issuer.key().serialize_pem();
        files::write_new(&key_path, key_pem.as_bytes(), KEY_MODE).map_err(|e| match e {
            CertError::Io { error, .. } if error.kind() == std::io::ErrorKind::AlreadyExists => {
                CertError::AlreadyExists {
                    path: key_path.clone(),
                }
            }
            e => e,
        })?;
        files::write_atomic(&dir.join(CA_CERT_FILE), self.cert_pem.as_bytes(), CERT_MODE)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// When the CA certificate expires; leaves issued past it are useless after it.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// Issues an ECDSA P-256 leaf for `req.identity`, usable as both TLS server and
    /// client (every pxemesh process is both).
    pub fn issue(&self, req: &LeafRequest) -> Result<Leaf, CertError> {
        let ident = &req.identity;
        ident.validate()?;
        if ident.trust_domain != self.trust_domain {
            return Err(CertError::TrustDomainMismatch {
                identity: ident.uri(),
                expected: self.trust_domain.clone(),
            });
        }
        let invalid = |reason: String| CertError::InvalidRequest {
            identity: ident.uri(),
            reason,
        };
        if req.not_after <= req.not_before {
            return Err(invalid(format!(
                "not_after ({}) must be later than not_before ({})",
                req.not_after, req.not_before
            )));
        }
        let gen_err = |error| CertError::Generate {
            context: format!("issuing certificate for {ident}"),
            error,
        };

        let mut sans = vec![SanType::URI(ident.uri().try_into().map_err(gen_err)?)];
        for name in &req.dns_names {
            // webpki would refuse to match a malformed name later; fail at issue time
            // where the operator can still fix the command line.
            rustls_pki_types::DnsName::try_from(name.as_str())
                .map_err(|_| invalid(format!("invalid DNS name {name:?}")))?;
            sans.push(SanType::DnsName(name.as_str().try_into().map_err(gen_err)?));
        }
        sans.extend(req.ips.iter().copied().map(SanType::IpAddress));

        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, ident.uri());
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = req.not_before;
        params.not_after = req.not_after;

        let key = KeyPair::generate().map_err(gen_err)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(gen_err)?;
        Ok(Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// The trust domain a CA certificate names with its `spiffe://<td>` URI SAN.
fn ca_trust_domain(x509: &x509_parser::certificate::X509Certificate<'_>) -> Result<String, String> {
    let uris = spiffe_uris(x509)?;
    let [uri] = uris.as_slice() else {
        return Err(format!(
            "CA certificate must have exactly one spiffe://<trust-domain> URI SAN, found {}",
            uris.len()
        ));
    };
    let td = uri
        .strip_prefix("spiffe://")
        .ok_or_else(|| format!("CA URI SAN {uri:?} must start with spiffe://"))?;
    validate_trust_domain(td).map_err(|e| format!("CA URI SAN {uri:?}: {e}"))?;
    Ok(td.to_string())
}

/// The conventional file stem for an identity's certificate files.
pub fn default_stem(identity: &Identity) -> String {
    match &identity.role {
        Role::Coordinator { id } => format!("coordinator-{id}"),
        Role::Relay { rack, name } => format!("relay-{rack}-{name}"),
        Role::Admin { name } => format!("admin-{name}"),
        Role::Viewer { name } => format!("viewer-{name}"),
    }
}

/// Stems become file names; keep them to one plain path component.
fn validate_stem(stem: &str) -> Result<(), CertError> {
    let ok = !stem.is_empty()
        && !stem.starts_with('.')
        && stem
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(CertError::InvalidRequest {
            identity: format!("file stem {stem:?}"),
            reason: "stem must be non-empty, not start with '.', and use only A-Z a-z 0-9 . _ -"
                .into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::CertificateDer;
    use std::os::unix::fs::PermissionsExt;

    fn first_cert_der(pem: &str, what: &Path) -> Result<CertificateDer<'static>, CertError> {
        files::parse_certs_pem(pem, what)?
            .into_iter()
            .next()
            .ok_or_else(|| CertError::Pem {
                path: what.to_path_buf(),
                reason: "no CERTIFICATE block found".into(),
            })
    }

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn ca_generate_save_load() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("pxe.test", 30).unwrap();
        assert_eq!(ca.trust_domain(), "pxe.test");
        ca.save(dir.path()).unwrap();
        assert_eq!(mode(&dir.path().join("ca-key.pem")), 0o600);

        let der = first_cert_der(ca.cert_pem(), Path::new("ca.pem")).unwrap();
        let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(x509.is_ca());
        let subject = x509.subject().to_string();
        assert!(
            subject.starts_with("CN=pxemesh CA (pxe.test), OU=ca-"),
            "{subject}"
        );
        let ku = x509.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign());

        let loaded = Ca::load(dir.path()).unwrap();
        assert_eq!(loaded.trust_domain(), "pxe.test");
        assert_eq!(loaded.cert_pem(), ca.cert_pem());

        // Saving again must not clobber the key.
        let err = Ca::generate("pxe.test", 30)
            .unwrap()
            .save(dir.path())
            .unwrap_err();
        assert!(matches!(err, CertError::AlreadyExists { .. }), "{err}");
        assert_eq!(Ca::load(dir.path()).unwrap().cert_pem(), ca.cert_pem());
    }

    #[test]
    fn ca_load_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = Ca::load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("ca.pem"), "{err}");

        Ca::generate("pxe.test", 30)
            .unwrap()
            .save(dir.path())
            .unwrap();
        let key = dir.path().join("ca-key.pem");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Ca::load(dir.path()).unwrap_err();
        assert!(matches!(err, CertError::InsecureKey { .. }), "{err}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

        // A key from another CA.
        let other = Ca::generate("pxe.test", 30).unwrap();
        std::fs::write(&key, other.issuer.key().serialize_pem()).unwrap();
        let err = Ca::load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");

        std::fs::write(dir.path().join("ca.pem"), "garbage").unwrap();
        let err = Ca::load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("no CERTIFICATE"), "{err}");
    }

    #[test]
    fn issue_and_read_back_identity() {
        let ca = Ca::generate("pxe.test", 30).unwrap();
        let ident = Identity::new("pxe.test", Role::Coordinator { id: 3 });
        let mut req = LeafRequest::new(ident.clone(), 10);
        req.dns_names = vec!["localhost".into(), "coord3.pxe.test".into()];
        req.ips = vec!["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()];
        let leaf = ca.issue(&req).unwrap();
        let der = first_cert_der(&leaf.cert_pem, Path::new("leaf")).unwrap();
        assert_eq!(Identity::from_cert_der(&der).unwrap(), ident);

        let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(!x509.is_ca());
        assert_eq!(
            x509.subject().to_string(),
            "CN=spiffe://pxe.test/coordinator/3"
        );
        assert!(x509
            .issuer()
            .to_string()
            .starts_with("CN=pxemesh CA (pxe.test)"));
        let eku = x509.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        let san = x509.subject_alternative_name().unwrap().unwrap().value;
        assert_eq!(san.general_names.len(), 5);

        let dir = tempfile::tempdir().unwrap();
        let (cert_path, key_path) = leaf.save(dir.path(), &default_stem(&ident)).unwrap();
        assert_eq!(cert_path, dir.path().join("coordinator-3.pem"));
        assert_eq!(key_path, dir.path().join("coordinator-3-key.pem"));
        assert_eq!(mode(&key_path), 0o600);
        // Overwriting a key that had loose permissions still yields 0600.
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o644)).unwrap();
        leaf.save(dir.path(), "coordinator-3").unwrap();
        assert_eq!(mode(&key_path), 0o600);
        assert!(leaf.save(dir.path(), "../x").is_err());
    }

    #[test]
    fn issue_rejections() {
        let ca = Ca::generate("pxe.test", 30).unwrap();
        let other_td = Identity::new("other.test", Role::Admin { name: "a".into() });
        let err = ca.issue(&LeafRequest::new(other_td, 1)).unwrap_err();
        assert!(
            matches!(err, CertError::TrustDomainMismatch { .. }),
            "{err}"
        );

        let bad = Identity::new("pxe.test", Role::Admin { name: "a b".into() });
        assert!(ca.issue(&LeafRequest::new(bad, 1)).is_err());

        let ident = Identity::new("pxe.test", Role::Admin { name: "a".into() });
        let mut req = LeafRequest::new(ident.clone(), 1);
        req.not_after = req.not_before;
        assert!(ca.issue(&req).is_err());

        let mut req = LeafRequest::new(ident, 1);
        req.dns_names = vec!["bad name".into()];
        let err = ca.issue(&req).unwrap_err();
        assert!(err.to_string().contains("bad name"), "{err}");
    }

    #[test]
    fn stems() {
        let s = |role| default_stem(&Identity::new("t", role));
        assert_eq!(s(Role::Coordinator { id: 2 }), "coordinator-2");
        assert_eq!(
            s(Role::Relay {
                rack: "r1".into(),
                name: "a".into()
            }),
            "relay-r1-a"
        );
        assert_eq!(s(Role::Admin { name: "al".into() }), "admin-al");
        assert_eq!(s(Role::Viewer { name: "v".into() }), "viewer-v");
    }
}
