//! CloudStack request signing (signature version 3).
//!
//! The management server verifies a request by taking every query parameter
//! except `signature`, encoding each value the way Java's `URLEncoder` does
//! (letters, digits and `.-*_` stay, space becomes `%20` rather than `+`,
//! everything else `%XX`), sorting the `name=value` pairs by name, joining them
//! with `&`, lower-casing the whole string and computing HMAC-SHA1 over it with
//! the account's secret key. The base64 of that MAC, URL-encoded, is the
//! `signature` parameter. We build the query string with the same encoding so
//! the bytes the server decodes are exactly the ones we signed. (Server side:
//! `ApiServer.verifyRequest` in apache/cloudstack; it finds `apikey`,
//! `signatureVersion` and `expires` case-insensitively, so we send every
//! parameter name in lower case.)

use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use hmac::{Hmac, Mac};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha1::Sha1;

/// Characters Java's `URLEncoder` leaves alone besides letters and digits.
const JAVA_URLENCODER: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'.')
    .remove(b'-')
    .remove(b'*')
    .remove(b'_');

/// A CloudStack secret key. Never printed: `Debug` is redacted and there is no
/// `Display`, so it cannot end up in a log line or an error message.
#[derive(Clone)]
pub struct SecretKey(String);

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

impl SecretKey {
    /// Wraps a key given in memory (tests, or a value already read elsewhere).
    pub fn new(key: impl Into<String>) -> Result<SecretKey, String> {
        let key = key.into().trim().to_string();
        if key.is_empty() {
            return Err("the CloudStack secret key is empty".into());
        }
        Ok(SecretKey(key))
    }

    /// Reads the key from a file, trimming surrounding whitespace (a trailing
    /// newline from `echo` or an editor is not part of the key).
    pub fn from_file(path: &Path) -> Result<SecretKey, String> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            format!(
                "cannot read the CloudStack secret key file {}: {e}",
                path.display()
            )
        })?;
        SecretKey::new(text).map_err(|e| format!("{e} (secret key file {})", path.display()))
    }

    fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

/// Encodes one value as the management server does before verifying.
pub fn encode_value(v: &str) -> String {
    utf8_percent_encode(v, JAVA_URLENCODER).to_string()
}

/// The string that is MACed: pairs sorted by (lower-cased) name, values
/// encoded, joined with `&`, all lower case. `signature` must not be in
/// `params`.
pub fn canonical_string(params: &[(String, String)]) -> String {
    let mut pairs: Vec<(String, String)> = params
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), encode_value(v)))
        .collect();
    pairs.sort();
    let joined = pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    joined.to_lowercase()
}

/// base64(HMAC-SHA1(secret, canonical_string(params))), not yet URL-encoded.
pub fn signature(params: &[(String, String)], secret: &SecretKey) -> String {
    signature_of_canonical(&canonical_string(params), secret)
}

pub fn signature_of_canonical(canonical: &str, secret: &SecretKey) -> String {
    // HMAC accepts keys of any length; new_from_slice cannot fail for it.
    let mut mac = match Hmac::<Sha1>::new_from_slice(secret.as_bytes()) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC-SHA1 takes keys of any length"),
    };
    mac.update(canonical.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// The full query string: the parameters (names lower-cased, values encoded
/// like the signature input, in sorted order) followed by `signature`.
pub fn signed_query(params: &[(String, String)], secret: &SecretKey) -> String {
    let sig = signature(params, secret);
    let mut pairs: Vec<(String, String)> = params
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), encode_value(v)))
        .collect();
    pairs.sort();
    let mut q = pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    q.push_str("&signature=");
    q.push_str(&encode_value(&sig));
    q
}

/// `expires` in the format the server parses (`yyyy-MM-dd'T'HH:mm:ssZ`, UTC).
pub fn expires_at(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    format_utc(secs)
}

pub fn format_utc(unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64;
    let rem = unix_secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}+0000",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::process::{Command, Stdio};

    fn p(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The worked example of CloudStack's developer guide ("How to sign an API
    /// call with Python", docs/en-US/signing-api-calls-python.xml in
    /// apache/cloudstack), with its published signature.
    #[test]
    fn official_example_vector() {
        let secret = SecretKey::new(
            "VDaACYb0LV9eNjTetIOElcVQkvJck_J_QljX_FcHRj87ZKiy0z0ty0ZsYBkoXkY9b7eq1EhwJaw7FF3akA3KBQ",
        )
        .unwrap();
        let params = p(&[
            ("command", "listUsers"),
            ("response", "json"),
            (
                "apikey",
                "plgWJfZK4gyS3mOMTVmjUVg-X-jlWlnfaUJ9GAbBbf9EdM-kAYMmAiLqzzq1ElZLYq_u38zCm0bewzGUdP66mg",
            ),
        ]);
        assert_eq!(
            canonical_string(&params),
            "apikey=plgwjfzk4gys3momtvmjuvg-x-jlwlnfauj9gabbbf9edm-kaymmailqzzq1elzlyq_u38zcm0bewzgudp66mg&command=listusers&response=json"
        );
        assert_eq!(signature(&params, &secret), "TTpdDq/7j/J58XCRHomKoQXEQds=");
        let q = signed_query(&params, &secret);
        assert!(
            q.ends_with("&signature=TTpdDq%2F7j%2FJ58XCRHomKoQXEQds%3D"),
            "{q}"
        );
        // Values keep their case on the wire; only the MAC input is lowered.
        assert!(q.contains("command=listUsers"), "{q}");
    }

    /// A second vector computed by the openssl CLI over a canonical string
    /// written out by hand (spaces, slashes, '=' and '~' in values, mixed-case
    /// names, signatureVersion/expires).
    #[test]
    fn openssl_vector_with_awkward_values() {
        let secret_text = "s3cr3t-Key_with.Mixed~Case";
        let secret = SecretKey::new(secret_text).unwrap();
        let params = p(&[
            ("command", "listTemplates"),
            ("templateFilter", "all"),
            ("keyword", "CentOS 7/x86_64 a=b~c"),
            ("apiKey", "AbC-123"),
            ("signatureVersion", "3"),
            ("expires", "2026-11-21T14:30:00+0000"),
            ("response", "json"),
        ]);
        let by_hand = "apikey=abc-123&command=listtemplates&expires=2026-11-21t14%3a30%3a00%2b0000\
&keyword=centos%207%2fx86_64%20a%3db%7ec&response=json&signatureversion=3&templatefilter=all";
        assert_eq!(canonical_string(&params), by_hand);

        let mut child = Command::new("openssl")
            .args(["dgst", "-sha1", "-hmac", secret_text, "-binary"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("openssl CLI must be installed (see deploy/test-packages.txt)");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(by_hand.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        assert_eq!(out.stdout.len(), 20, "openssl printed a raw SHA-1 MAC");
        let expected = base64::engine::general_purpose::STANDARD.encode(&out.stdout);
        assert_eq!(signature(&params, &secret), expected);
    }

    #[test]
    fn secret_key_is_trimmed_and_redacted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "  topsecretvalue\n").unwrap();
        let k = SecretKey::from_file(&path).unwrap();
        assert_eq!(k.as_bytes(), b"topsecretvalue");
        let dbg = format!("{k:?}");
        assert!(!dbg.contains("topsecret"), "{dbg}");
        std::fs::write(&path, "\n\n").unwrap();
        assert!(SecretKey::from_file(&path).is_err());
        assert!(SecretKey::from_file(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn expires_format() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00+0000");
        // 2026-11-21T14:30:05Z
        assert_eq!(format_utc(1_795_271_405), "2026-11-21T14:30:05+0000");
        assert_eq!(format_utc(951_782_400), "2000-02-29T00:00:00+0000");
    }

    #[test]
    fn java_urlencoder_set() {
        assert_eq!(
            encode_value("a b+c*d.e-f_g~h/é"),
            "a%20b%2Bc*d.e-f_g%7Eh%2F%C3%A9"
        );
    }
}
