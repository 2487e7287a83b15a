//! Option negotiation: blksize (RFC 2348), timeout and tsize (RFC 2349),
//! windowsize (RFC 7440). Unknown or malformed options are ignored, as RFC
//! 2347 allows; every accepted option is echoed in the OACK in the client's
//! order.

use std::time::Duration;

pub const DEFAULT_BLKSIZE: u16 = 512;
pub const MIN_BLKSIZE: u16 = 8;
pub const MAX_BLKSIZE: u16 = 65464;

/// What the server allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_blksize: u16,
    pub max_windowsize: u16,
    /// Retransmission timeout when the client negotiates none.
    pub default_timeout: Duration,
}

/// The parameters of one transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub blksize: u16,
    pub windowsize: u16,
    pub timeout: Duration,
    /// Options to send in an OACK (empty: no OACK, data starts at once).
    pub oack: Vec<(String, String)>,
}

/// A decimal number as TFTP options carry them (digits only, no sign).
fn number(v: &str) -> Option<u64> {
    let v = v.trim_matches(' ');
    if v.is_empty() || v.len() > 19 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}

/// Negotiate `requested` (names lower-case) against `limits`. `tsize` is the
/// size to report when the client asks for it, `None` when it cannot be known
/// in advance (netascii conversion of a disk file): the option is then not
/// acknowledged.
pub fn negotiate(
    requested: &[(String, String)],
    limits: &Limits,
    tsize: Option<u64>,
) -> Negotiated {
    let mut n = Negotiated {
        blksize: DEFAULT_BLKSIZE,
        windowsize: 1,
        timeout: limits.default_timeout,
        oack: Vec::new(),
    };
    let max_blksize = limits.max_blksize.clamp(MIN_BLKSIZE, MAX_BLKSIZE);
    let max_windowsize = limits.max_windowsize.max(1);
    let mut seen: Vec<&str> = Vec::new();
    for (name, value) in requested {
        if seen.contains(&name.as_str()) {
            continue; // the first occurrence wins
        }
        seen.push(name);
        let Some(v) = number(value) else { continue };
        let accepted = match name.as_str() {
            // RFC 2348: 8..=65464; the server may answer with a smaller value.
            // A larger request is capped rather than refused (lenient).
            "blksize" if v >= u64::from(MIN_BLKSIZE) => {
                n.blksize = v.min(u64::from(max_blksize)) as u16;
                Some(n.blksize.to_string())
            }
            // RFC 2349: 1..=255 seconds; the server must use it or ignore it.
            "timeout" if (1..=255).contains(&v) => {
                n.timeout = Duration::from_secs(v);
                Some(v.to_string())
            }
            // RFC 2349: on a read request the client sends 0 and the server
            // answers with the size.
            "tsize" => tsize.map(|s| s.to_string()),
            // RFC 7440: 1..=65535, the server may answer with a smaller value.
            "windowsize" if (1..=65535).contains(&v) => {
                n.windowsize = v.min(u64::from(max_windowsize)) as u16;
                Some(n.windowsize.to_string())
            }
            _ => None,
        };
        if let Some(a) = accepted {
            n.oack.push((name.clone(), a));
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const LIMITS: Limits = Limits {
        max_blksize: 1468,
        max_windowsize: 16,
        default_timeout: Duration::from_millis(1000),
    };

    #[test]
    fn no_options_means_rfc1350_defaults_and_no_oack() {
        let n = negotiate(&[], &LIMITS, Some(10));
        assert_eq!(
            (n.blksize, n.windowsize, n.timeout),
            (512, 1, Duration::from_secs(1))
        );
        assert!(n.oack.is_empty());
        // Only unknown options: no OACK either.
        let n = negotiate(
            &req(&[("multicast", ""), ("utimeout", "5000")]),
            &LIMITS,
            Some(10),
        );
        assert!(n.oack.is_empty());
    }

    #[test]
    fn accepted_options_are_echoed_in_order_and_capped() {
        let n = negotiate(
            &req(&[
                ("tsize", "0"),
                ("blksize", "65464"),
                ("foo", "1"),
                ("windowsize", "64"),
                ("timeout", "3"),
            ]),
            &LIMITS,
            Some(123_456),
        );
        assert_eq!(n.blksize, 1468);
        assert_eq!(n.windowsize, 16);
        assert_eq!(n.timeout, Duration::from_secs(3));
        assert_eq!(
            n.oack,
            req(&[
                ("tsize", "123456"),
                ("blksize", "1468"),
                ("windowsize", "16"),
                ("timeout", "3")
            ])
        );
    }

    #[test]
    fn invalid_values_are_ignored() {
        let n = negotiate(
            &req(&[
                ("blksize", "7"),
                ("timeout", "0"),
                ("windowsize", "0"),
                ("tsize", "x"),
            ]),
            &LIMITS,
            Some(1),
        );
        assert_eq!(
            (n.blksize, n.windowsize, n.timeout),
            (512, 1, Duration::from_secs(1))
        );
        assert!(n.oack.is_empty());
        let n = negotiate(
            &req(&[
                ("timeout", "256"),
                ("windowsize", "65536"),
                ("blksize", "-1"),
                ("blksize", "+9"),
            ]),
            &LIMITS,
            None,
        );
        assert!(n.oack.is_empty());
        // Huge blksize values are capped, not refused; a duplicate option is ignored.
        let n = negotiate(
            &req(&[("blksize", "99999999999"), ("blksize", "8")]),
            &LIMITS,
            None,
        );
        assert_eq!(n.blksize, 1468);
        assert_eq!(n.oack, req(&[("blksize", "1468")]));
        let n = negotiate(&req(&[("blksize", "8")]), &LIMITS, None);
        assert_eq!(n.blksize, 8);
    }

    #[test]
    fn tsize_only_when_known() {
        assert!(negotiate(&req(&[("tsize", "0")]), &LIMITS, None)
            .oack
            .is_empty());
        assert_eq!(
            negotiate(&req(&[("tsize", "0")]), &LIMITS, Some(0)).oack,
            req(&[("tsize", "0")])
        );
    }

    #[test]
    fn limits_are_sanitized() {
        let l = Limits {
            max_blksize: 0,
            max_windowsize: 0,
            default_timeout: Duration::from_secs(1),
        };
        let n = negotiate(&req(&[("blksize", "1024"), ("windowsize", "4")]), &l, None);
        assert_eq!((n.blksize, n.windowsize), (8, 1));
    }
}
