//! Human/JSON summaries of certificates, for `pxemesh-certs inspect` and for logs.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::Path;

use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;

use crate::identity::identity_of;
use crate::{CertError, Identity, Role};

/// What `inspect` reports about one certificate.
#[derive(Debug, Clone)]
pub struct CertInfo {
    pub subject: String,
    pub issuer: String,
    pub serial: String,
    pub is_ca: bool,
    /// The leaf identity, when the certificate has exactly one valid SPIFFE URI SAN.
    pub identity: Option<Identity>,
    /// Why `identity` is `None` (for a CA: that it names only a trust domain).
    pub identity_note: Option<String>,
    pub uris: Vec<String>,
    pub dns_names: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// SHA-256 of the DER, lowercase hex: the same as
    /// `openssl x509 -outform der | sha256sum`.
    pub sha256: String,
}

impl CertInfo {
    pub fn from_der(der: &[u8]) -> Result<CertInfo, CertError> {
        let (_, x509) =
            x509_parser::parse_x509_certificate(der).map_err(|e| CertError::Certificate {
                context: "certificate".into(),
                reason: format!("not a valid X.509 certificate: {e}"),
            })?;
        let is_ca = x509.is_ca();
        let (identity, identity_note) = match identity_of(&x509) {
            Ok(id) => (Some(id), None),
            Err(_) if is_ca => (
                None,
                Some("CA certificate (names a trust domain only)".into()),
            ),
            Err(e) => (None, Some(e.to_string())),
        };
        let mut uris = Vec::new();
        let mut dns_names = Vec::new();
        let mut ips = Vec::new();
        if let Ok(Some(san)) = x509.subject_alternative_name() {
            for gn in &san.value.general_names {
                match gn {
                    GeneralName::URI(u) => uris.push(u.to_string()),
                    GeneralName::DNSName(d) => dns_names.push(d.to_string()),
                    GeneralName::IPAddress(b) => {
                        if let Ok(a) = <[u8; 4]>::try_from(*b) {
                            ips.push(IpAddr::from(a));
                        } else if let Ok(a) = <[u8; 16]>::try_from(*b) {
                            ips.push(IpAddr::from(a));
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(CertInfo {
            subject: x509.subject().to_string(),
            issuer: x509.issuer().to_string(),
            serial: x509.raw_serial_as_string(),
            is_ca,
            identity,
            identity_note,
            uris,
            dns_names,
            ips,
            not_before: x509.validity().not_before.to_datetime(),
            not_after: x509.validity().not_after.to_datetime(),
            sha256: hex::encode(Sha256::digest(der)),
        })
    }

    /// Reads a PEM (first certificate of a bundle) or DER file. Returns the info and
    /// how many certificates the file holds.
    pub fn from_file(path: &Path) -> Result<(CertInfo, usize), CertError> {
        let bytes = std::fs::read(path).map_err(|error| CertError::Io {
            action: "read",
            path: path.to_path_buf(),
            error,
        })?;
        let pem_err = |reason: String| CertError::Pem {
            path: path.to_path_buf(),
            reason,
        };
        let in_context = |e: CertError| match e {
            CertError::Certificate { reason, .. } => CertError::Certificate {
                context: path.display().to_string(),
                reason,
            },
            e => e,
        };
        match std::str::from_utf8(&bytes) {
            Ok(text) if text.contains("-----BEGIN") => {
                if !text.contains("-----BEGIN CERTIFICATE-----") && text.contains("PRIVATE KEY") {
                    return Err(pem_err(
                        "holds a private key, not a certificate (nothing printed)".into(),
                    ));
                }
                let certs = crate::files::parse_certs_pem(text, path)?;
                let info = CertInfo::from_der(&certs[0]).map_err(in_context)?;
                Ok((info, certs.len()))
            }
            _ => {
                let info = CertInfo::from_der(&bytes).map_err(|_| {
                    pem_err("neither a PEM certificate nor a DER certificate".into())
                })?;
                Ok((info, 1))
            }
        }
    }

    pub fn is_expired(&self) -> bool {
        OffsetDateTime::now_utc() > self.not_after
    }

    pub fn is_not_yet_valid(&self) -> bool {
        OffsetDateTime::now_utc() < self.not_before
    }

    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let mut line = |k: &str, v: &str| {
            let _ = writeln!(out, "{k:<12} {v}");
        };
        line("subject:", &self.subject);
        line("issuer:", &self.issuer);
        line("serial:", &self.serial);
        line("ca:", if self.is_ca { "yes" } else { "no" });
        match &self.identity {
            Some(id) => {
                line("identity:", &id.uri());
                line("role:", &id.role.to_string());
                line("trust dom.:", &id.trust_domain);
            }
            None => line(
                "identity:",
                &format!("none ({})", self.identity_note.as_deref().unwrap_or("-")),
            ),
        }
        for u in &self.uris {
            line("uri san:", u);
        }
        for d in &self.dns_names {
            line("dns san:", d);
        }
        for ip in &self.ips {
            line("ip san:", &ip.to_string());
        }
        line("not before:", &rfc3339(self.not_before));
        let mut after = rfc3339(self.not_after);
        if self.is_expired() {
            after.push_str("  EXPIRED");
        }
        if self.is_not_yet_valid() {
            after.push_str("  NOT YET VALID");
        }
        line("not after:", &after);
        line("sha256:", &self.sha256);
        out
    }

    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        let role = self.identity.as_ref().map(|id| match &id.role {
            Role::Coordinator { id } => json!({"kind": "coordinator", "id": id}),
            Role::Relay { rack, name } => json!({"kind": "relay", "rack": rack, "name": name}),
            Role::Admin { name } => json!({"kind": "admin", "name": name}),
            Role::Viewer { name } => json!({"kind": "viewer", "name": name}),
        });
        json!({
            "subject": self.subject,
            "issuer": self.issuer,
            "serial": self.serial,
            "is_ca": self.is_ca,
            "identity": self.identity.as_ref().map(Identity::uri),
            "trust_domain": self.identity.as_ref().map(|i| i.trust_domain.clone()),
            "role": role,
            "identity_note": self.identity_note,
            "uris": self.uris,
            "dns_names": self.dns_names,
            "ips": self.ips.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "not_before": rfc3339(self.not_before),
            "not_after": rfc3339(self.not_after),
            "expired": self.is_expired(),
            "not_yet_valid": self.is_not_yet_valid(),
            "sha256": self.sha256,
        })
    }
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Ca, LeafRequest};

    #[test]
    fn inspect_leaf_and_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("pxe.test", 30).unwrap();
        ca.save(dir.path()).unwrap();
        let ident = Identity::new(
            "pxe.test",
            Role::Relay {
                rack: "r1".into(),
                name: "a".into(),
            },
        );
        let mut req = LeafRequest::new(ident.clone(), 1);
        req.not_before = OffsetDateTime::now_utc() - time::Duration::days(3);
        req.not_after = OffsetDateTime::now_utc() - time::Duration::days(1);
        req.ips = vec!["10.0.0.1".parse().unwrap()];
        let (cert, key) = ca
            .issue(&req)
            .unwrap()
            .save(dir.path(), "relay-r1-a")
            .unwrap();

        let (info, n) = CertInfo::from_file(&cert).unwrap();
        assert_eq!(n, 1);
        assert_eq!(info.identity, Some(ident));
        assert!(info.is_expired());
        assert!(info.to_text().contains("EXPIRED"));
        let j = info.to_json();
        assert_eq!(j["role"]["kind"], "relay");
        assert_eq!(j["ips"][0], "10.0.0.1");
        assert_eq!(j["expired"], true);
        assert_eq!(info.sha256.len(), 64);

        let (ca_info, _) = CertInfo::from_file(&dir.path().join("ca.pem")).unwrap();
        assert!(ca_info.is_ca && ca_info.identity.is_none());
        assert_eq!(ca_info.uris, vec!["spiffe://pxe.test".to_string()]);

        let err = CertInfo::from_file(&key).unwrap_err();
        assert!(err.to_string().contains("private key"), "{err}");
        let garbage = dir.path().join("garbage");
        std::fs::write(&garbage, b"\x00\x01garbage").unwrap();
        assert!(CertInfo::from_file(&garbage).is_err());
        assert!(CertInfo::from_file(&dir.path().join("missing")).is_err());
    }
}
