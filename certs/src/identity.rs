//! SPIFFE identities: who holds a certificate, as named by its single `spiffe://` URI SAN.
//!
//! Authorization in pxemesh is decided from these identities only, so parsing is strict:
//! one canonical spelling per identity, nothing that could be read two ways.

use std::fmt;

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use crate::CertError;

const SCHEME: &str = "spiffe://";
/// SPIFFE caps URIs at 2048 bytes; anything longer is not a real identity.
const MAX_URI_LEN: usize = 2048;
/// DNS caps names at 253 characters; trust domains are DNS-like names.
const MAX_TRUST_DOMAIN_LEN: usize = 253;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Role {
    /// A coordinator node, by Raft node id (never 0: raft-rs reserves it).
    Coordinator { id: u64 },
    /// A rack relay; it may only act for its own rack.
    Relay { rack: String, name: String },
    /// A full administrator.
    Admin { name: String },
    /// A read-only administrator (`/admin/viewer/<name>`).
    Viewer { name: String },
}

impl Role {
    /// Short stable name of the role kind: `coordinator`, `relay`, `admin` or `viewer`.
    pub fn kind(&self) -> &'static str {
        match self {
            Role::Coordinator { .. } => "coordinator",
            Role::Relay { .. } => "relay",
            Role::Admin { .. } => "admin",
            Role::Viewer { .. } => "viewer",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Role::Coordinator { id } => write!(f, "coordinator {id}"),
            Role::Relay { rack, name } => write!(f, "relay {name} (rack {rack})"),
            Role::Admin { name } => write!(f, "admin {name}"),
            Role::Viewer { name } => write!(f, "viewer {name} (read-only admin)"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pub trust_domain: String,
    pub role: Role,
}

impl Identity {
    /// Builds an identity without validating it (this constructor cannot fail);
    /// [`Identity::validate`] runs before anything is issued for it.
    pub fn new(trust_domain: &str, role: Role) -> Identity {
        Identity {
            trust_domain: trust_domain.to_string(),
            role,
        }
    }

    /// The SPIFFE URI naming this identity.
    pub fn uri(&self) -> String {
        let td = &self.trust_domain;
        match &self.role {
            Role::Coordinator { id } => format!("{SCHEME}{td}/coordinator/{id}"),
            Role::Relay { rack, name } => format!("{SCHEME}{td}/relay/{rack}/{name}"),
            Role::Admin { name } => format!("{SCHEME}{td}/admin/{name}"),
            Role::Viewer { name } => format!("{SCHEME}{td}/admin/viewer/{name}"),
        }
    }

    /// Checks that this identity follows the naming rules, i.e. that its URI parses back
    /// to exactly this identity (a segment with a `/` in it, for instance, would not).
    pub fn validate(&self) -> Result<(), CertError> {
        let uri = self.uri();
        let parsed = Identity::parse_uri(&uri)?;
        if &parsed != self {
            return Err(invalid(&uri, "does not round-trip to the same identity"));
        }
        Ok(())
    }

    pub fn parse_uri(uri: &str) -> Result<Identity, CertError> {
        if uri.len() > MAX_URI_LEN {
            return Err(invalid(uri, "longer than 2048 bytes"));
        }
        let rest = uri
            .strip_prefix(SCHEME)
            .ok_or_else(|| invalid(uri, "must start with spiffe://"))?;
        let (td, path) = rest
            .split_once('/')
            .ok_or_else(|| invalid(uri, "has no path after the trust domain"))?;
        validate_trust_domain(td).map_err(|reason| invalid(uri, &reason))?;
        let segs: Vec<&str> = path.split('/').collect();
        for seg in &segs {
            validate_segment(seg).map_err(|reason| invalid(uri, &reason))?;
        }
        let role = match segs.as_slice() {
            ["coordinator", id] => Role::Coordinator {
                id: parse_node_id(id).map_err(|reason| invalid(uri, &reason))?,
            },
            ["relay", rack, name] => Role::Relay {
                rack: rack.to_string(),
                name: name.to_string(),
            },
            ["admin", "viewer", name] => Role::Viewer {
                name: name.to_string(),
            },
            // `/admin/viewer` alone would read as "the viewer role" to a human but
            // would be a full admin named "viewer"; refuse the ambiguity.
            ["admin", "viewer"] => {
                return Err(invalid(
                    uri,
                    "\"viewer\" is reserved: a read-only admin is /admin/viewer/<name>",
                ))
            }
            ["admin", name] => Role::Admin {
                name: name.to_string(),
            },
            [kind, ..] if matches!(*kind, "coordinator" | "relay" | "admin") => {
                return Err(invalid(
                    uri,
                    &format!("wrong number of path segments for a {kind} identity"),
                ))
            }
            _ => {
                return Err(invalid(
                    uri,
                    "path must be /coordinator/<id>, /relay/<rack>/<name>, /admin/<name> or /admin/viewer/<name>",
                ))
            }
        };
        Ok(Identity {
            trust_domain: td.to_string(),
            role,
        })
    }

    /// The identity named by the single `spiffe://` URI SAN of a DER certificate.
    /// This does not verify the certificate; callers that need trust use
    /// [`crate::Tls::peer_identity`].
    pub fn from_cert_der(der: &[u8]) -> Result<Identity, CertError> {
        let (_, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|e| CertError::Certificate {
                context: "certificate".into(),
                reason: format!("not a valid X.509 DER certificate: {e}"),
            })?;
        identity_of(&cert)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri())
    }
}

/// The identity of a parsed certificate (see [`Identity::from_cert_der`]).
pub(crate) fn identity_of(cert: &X509Certificate<'_>) -> Result<Identity, CertError> {
    let context = || format!("certificate \"{}\"", cert.subject());
    let uris = spiffe_uris(cert).map_err(|reason| CertError::Certificate {
        context: context(),
        reason,
    })?;
    match uris.as_slice() {
        [uri] => Identity::parse_uri(uri),
        [] => Err(CertError::Certificate {
            context: context(),
            reason: "has no spiffe:// URI SAN".into(),
        }),
        // Two identities in one certificate would let the holder pick whichever is
        // more privileged depending on who checks; refuse outright.
        _ => Err(CertError::Certificate {
            context: context(),
            reason: format!(
                "has {} spiffe:// URI SANs, expected exactly one",
                uris.len()
            ),
        }),
    }
}

/// All URI SANs that use the spiffe scheme (compared case-insensitively, so that a
/// `SPIFFE://` SAN cannot hide a second identity from the "exactly one" check).
pub(crate) fn spiffe_uris(cert: &X509Certificate<'_>) -> Result<Vec<String>, String> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("malformed subjectAltName extension: {e}"))?;
    Ok(san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|gn| match gn {
                    GeneralName::URI(u)
                        if u.get(..SCHEME.len())
                            .is_some_and(|p| p.eq_ignore_ascii_case(SCHEME)) =>
                    {
                        Some(u.to_string())
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// Trust domains are lowercase DNS-like names: `[a-z0-9._-]`, dot-separated non-empty
/// labels. Returns the reason on failure.
pub fn validate_trust_domain(td: &str) -> Result<(), String> {
    if td.is_empty() {
        return Err("trust domain is empty".into());
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(format!(
            "trust domain is longer than {MAX_TRUST_DOMAIN_LEN} characters"
        ));
    }
    if let Some(c) = td
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
    {
        let hint = if c.is_ascii_uppercase() {
            " (trust domains are lowercase)"
        } else {
            ""
        };
        return Err(format!(
            "trust domain {td:?} contains {c:?}; allowed: a-z 0-9 . - _{hint}"
        ));
    }
    if td.split('.').any(str::is_empty) {
        return Err(format!("trust domain {td:?} has an empty label"));
    }
    Ok(())
}

fn validate_segment(seg: &str) -> Result<(), String> {
    if seg.is_empty() {
        return Err("empty path segment".into());
    }
    // Dot segments would be normalised away by URI tooling and name a different path.
    if seg == "." || seg == ".." {
        return Err(format!("path segment {seg:?} is not allowed"));
    }
    if let Some(c) = seg
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "path segment {seg:?} contains {c:?}; allowed: A-Z a-z 0-9 . _ -"
        ));
    }
    Ok(())
}

/// Node ids are canonical decimal (no sign, no leading zeros) so that one node has
/// exactly one URI.
fn parse_node_id(s: &str) -> Result<u64, String> {
    if !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0')) {
        return Err(format!(
            "coordinator id {s:?} must be a decimal number without sign or leading zeros"
        ));
    }
    match s.parse::<u64>() {
        Ok(0) => Err("coordinator id must be > 0".into()),
        Ok(id) => Ok(id),
        Err(_) => Err(format!("coordinator id {s:?} does not fit in 64 bits")),
    }
}

fn invalid(input: &str, reason: &str) -> CertError {
    CertError::InvalidIdentity {
        input: input.to_string(),
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(role: Role) -> Identity {
        Identity::new("pxe.example", role)
    }

    #[test]
    fn round_trip() {
        let cases = [
            (
                id(Role::Coordinator { id: 7 }),
                "spiffe://pxe.example/coordinator/7",
            ),
            (
                id(Role::Relay {
                    rack: "r-01".into(),
                    name: "relay_a.1".into(),
                }),
                "spiffe://pxe.example/relay/r-01/relay_a.1",
            ),
            (
                id(Role::Admin {
                    name: "alice".into(),
                }),
                "spiffe://pxe.example/admin/alice",
            ),
            (
                id(Role::Viewer { name: "bob".into() }),
                "spiffe://pxe.example/admin/viewer/bob",
            ),
        ];
        for (ident, uri) in cases {
            assert_eq!(ident.uri(), uri);
            assert_eq!(ident.to_string(), uri);
            assert_eq!(Identity::parse_uri(uri).unwrap(), ident);
            ident.validate().unwrap();
        }
    }

    #[test]
    fn rejections() {
        let bad = [
            "",
            "https://pxe.example/admin/alice",
            "SPIFFE://pxe.example/admin/alice",
            "spiffe://pxe.example",
            "spiffe://pxe.example/",
            "spiffe:///admin/alice",
            "spiffe://PXE.example/admin/alice",
            "spiffe://pxe..example/admin/alice",
            "spiffe://.pxe/admin/alice",
            "spiffe://pxe.example:443/admin/alice",
            "spiffe://user@pxe.example/admin/alice",
            "spiffe://pxe.example/coordinator/0",
            "spiffe://pxe.example/coordinator/01",
            "spiffe://pxe.example/coordinator/+1",
            "spiffe://pxe.example/coordinator/-1",
            "spiffe://pxe.example/coordinator/x",
            "spiffe://pxe.example/coordinator/18446744073709551616",
            "spiffe://pxe.example/coordinator/1/extra",
            "spiffe://pxe.example/relay/r1",
            "spiffe://pxe.example/relay/r1/n1/x",
            "spiffe://pxe.example/relay//n1",
            "spiffe://pxe.example/relay/r1/..",
            "spiffe://pxe.example/relay/r1/.",
            "spiffe://pxe.example/admin/al ice",
            "spiffe://pxe.example/admin/al%20ice",
            "spiffe://pxe.example/admin/alice?x=1",
            "spiffe://pxe.example/admin/alice#frag",
            "spiffe://pxe.example/admin/alice/",
            "spiffe://pxe.example/admin/viewer",
            "spiffe://pxe.example/admin/viewer/bob/x",
            "spiffe://pxe.example/admin/é",
            "spiffe://pxe.example/operator/x",
        ];
        for uri in bad {
            let err = Identity::parse_uri(uri).expect_err(uri);
            assert!(
                matches!(err, CertError::InvalidIdentity { .. }),
                "{uri}: {err}"
            );
        }
        let long = format!("spiffe://pxe.example/admin/{}", "a".repeat(3000));
        assert!(Identity::parse_uri(&long).is_err());
    }

    #[test]
    fn error_messages_name_the_problem() {
        let e = Identity::parse_uri("spiffe://pxe.example/relay/r1/n 1").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("n 1") && msg.contains("' '"), "{msg}");
        let e = Identity::parse_uri("spiffe://Pxe/admin/a").unwrap_err();
        assert!(e.to_string().contains("lowercase"), "{e}");
    }

    #[test]
    fn validate_rejects_unrepresentable_identities() {
        let slash = id(Role::Relay {
            rack: "r1/x".into(),
            name: "n".into(),
        });
        assert!(slash.validate().is_err());
        assert!(id(Role::Coordinator { id: 0 }).validate().is_err());
        assert!(id(Role::Admin {
            name: "viewer".into()
        })
        .validate()
        .is_err());
        assert!(Identity::new(
            "Bad",
            Role::Admin {
                name: "alice".into()
            }
        )
        .validate()
        .is_err());
    }

    #[test]
    fn garbage_der_is_an_error() {
        let err = Identity::from_cert_der(b"not a certificate").unwrap_err();
        assert!(err.to_string().contains("X.509"), "{err}");
    }
}
