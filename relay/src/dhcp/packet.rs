//! Wire layer: raw bytes → [`Request`] and [`Reply`] → raw bytes.
//!
//! dhcproto does the decoding and encoding, but two things are done here on
//! the raw bytes first:
//!
//! * validation. dhcproto's option decoder has `debug_assert!`s and
//!   unchecked subtractions on option lengths (rapid commit, client network
//!   interface, client FQDN, bulk lease query), and `Message::chaddr()`
//!   slices by the packet's `hlen`. A packet that would trip any of those is
//!   refused here as malformed, and the decode itself runs under
//!   `catch_unwind` as a second line of defence, so packet data can never
//!   panic the server.
//! * option 82 (relay agent information). dhcproto parses it into a map,
//!   which reorders sub-options and drops duplicates when re-encoded. RFC 3046
//!   wants it echoed verbatim, so the raw bytes are kept and spliced back
//!   into the reply as the last option.

use std::net::Ipv4Addr;

use dhcproto::v4::{Message, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};
use pxemesh_coordinator::model::Mac;

/// BOOTP fixed header (236 bytes) plus the DHCP magic cookie.
const HEADER_LEN: usize = 240;
const MAGIC: [u8; 4] = [99, 130, 83, 99];
/// RFC 1542: BOOTP relay agents may drop messages shorter than this.
const MIN_REPLY_LEN: usize = 300;
const REPLY_CAPACITY: usize = 640;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("packet is {0} bytes, shorter than a DHCP header")]
    Short(usize),
    #[error("no DHCP magic cookie (BOOTP or garbage)")]
    NoMagic,
    #[error("hardware address length {0} > 16")]
    BadHlen(u8),
    #[error("option {code} is truncated")]
    TruncatedOption { code: u8 },
    #[error("option {code} has invalid length {len}")]
    BadOptionLength { code: u8, len: usize },
    #[error("undecodable: {0}")]
    Decode(String),
}

/// A decoded client message and what the raw bytes told us beyond it.
#[derive(Debug, Clone)]
pub struct Request {
    pub msg: Message,
    /// Ethernet MAC (htype 1, hlen 6), `None` for other hardware types.
    pub mac: Option<Mac>,
    /// Option 82 exactly as received (all instances concatenated, RFC 3396).
    pub relay_info: Option<Vec<u8>>,
}

/// A reply and where it goes.
#[derive(Debug, Clone)]
pub struct Reply {
    pub msg: Message,
    pub dest: std::net::SocketAddr,
    /// Option 82 to echo verbatim (from the request).
    pub relay_info: Option<Vec<u8>>,
}

/// One option of the raw option area, consecutive instances of the same
/// code merged (that is how dhcproto decodes them).
struct RawOpt {
    code: u8,
    len: usize,
}

/// Walk the option area: bounded by the packet length (every step consumes
/// at least one byte).
fn scan_options(opts: &[u8]) -> Result<(Vec<RawOpt>, Option<Vec<u8>>), Malformed> {
    let mut out: Vec<RawOpt> = Vec::new();
    let mut relay: Option<Vec<u8>> = None;
    let mut i = 0;
    let mut last_code: Option<u8> = None;
    while i < opts.len() {
        let code = opts[i];
        match code {
            0 => {
                i += 1;
                last_code = None;
                continue;
            }
            255 => break,
            _ => {}
        }
        let Some(&len) = opts.get(i + 1) else {
            return Err(Malformed::TruncatedOption { code });
        };
        let len = len as usize;
        let Some(data) = opts.get(i + 2..i + 2 + len) else {
            return Err(Malformed::TruncatedOption { code });
        };
        if code == 82 {
            relay.get_or_insert_with(Vec::new).extend_from_slice(data);
        }
        match out.last_mut() {
            Some(prev) if last_code == Some(code) => prev.len += len,
            _ => out.push(RawOpt { code, len }),
        }
        last_code = Some(code);
        i += 2 + len;
    }
    Ok((out, relay))
}

/// Lengths dhcproto assumes rather than checks.
fn check_lengths(opts: &[RawOpt]) -> Result<(), Malformed> {
    for o in opts {
        let ok = match o.code {
            80 => o.len == 0,
            94 => o.len == 3,
            81 => o.len >= 3,
            151 => o.len >= 1,
            152..=155 => o.len == 4,
            _ => true,
        };
        if !ok {
            return Err(Malformed::BadOptionLength {
                code: o.code,
                len: o.len,
            });
        }
    }
    Ok(())
}

/// Decode one datagram. Never panics.
pub fn decode(bytes: &[u8]) -> Result<Request, Malformed> {
    if bytes.len() < HEADER_LEN {
        return Err(Malformed::Short(bytes.len()));
    }
    if bytes[236..240] != MAGIC {
        return Err(Malformed::NoMagic);
    }
    let (htype, hlen) = (bytes[1], bytes[2]);
    if hlen > 16 {
        return Err(Malformed::BadHlen(hlen));
    }
    let (opts, relay_info) = scan_options(&bytes[HEADER_LEN..])?;
    check_lengths(&opts)?;
    let msg = std::panic::catch_unwind(|| Message::decode(&mut Decoder::new(bytes)))
        .map_err(|_| Malformed::Decode("decoder panicked".into()))?
        .map_err(|e| Malformed::Decode(e.to_string()))?;
    let mac = (htype == 1 && hlen == 6).then(|| {
        let mut m = [0u8; 6];
        m.copy_from_slice(&bytes[28..34]);
        Mac(m)
    });
    Ok(Request {
        msg,
        mac,
        relay_info,
    })
}

/// Encode a reply: dhcproto's encoding, then option 82 spliced in verbatim
/// just before the end option, then padded to the BOOTP minimum.
/// Takes the reply mutably to drop any option 82 from the message in place
/// (a clone of the whole message per reply was a measurable cost).
pub fn encode(reply: &mut Reply) -> Result<Vec<u8>, String> {
    reply
        .msg
        .opts_mut()
        .remove(OptionCode::RelayAgentInformation);
    // Room for a typical PXE reply without regrowing.
    let mut buf = Vec::with_capacity(REPLY_CAPACITY);
    reply
        .msg
        .encode(&mut Encoder::new(&mut buf))
        .map_err(|e| e.to_string())?;
    if let Some(info) = &reply.relay_info {
        if buf.last() != Some(&255) {
            return Err("encoded reply has no end option".into());
        }
        buf.pop();
        // RFC 3396 long-option splitting; an empty option 82 is echoed empty.
        if info.is_empty() {
            buf.extend_from_slice(&[82, 0]);
        }
        for chunk in info.chunks(255) {
            buf.push(82);
            buf.push(chunk.len() as u8);
            buf.extend_from_slice(chunk);
        }
        buf.push(255);
    }
    if buf.len() < MIN_REPLY_LEN {
        buf.resize(MIN_REPLY_LEN, 0);
    }
    Ok(buf)
}

/// The message type name used in logs and metric labels.
pub fn msg_type_name(msg: &Message) -> &'static str {
    use dhcproto::v4::MessageType as T;
    match msg.opts().msg_type() {
        Some(T::Discover) => "discover",
        Some(T::Offer) => "offer",
        Some(T::Request) => "request",
        Some(T::Decline) => "decline",
        Some(T::Ack) => "ack",
        Some(T::Nak) => "nak",
        Some(T::Release) => "release",
        Some(T::Inform) => "inform",
        Some(_) => "other",
        None => "none",
    }
}

/// Options read from a request, with the wrong-typed cases folded to `None`.
pub fn requested_ip(msg: &Message) -> Option<Ipv4Addr> {
    match msg.opts().get(OptionCode::RequestedIpAddress) {
        Some(dhcproto::v4::DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
        _ => None,
    }
}

pub fn server_id(msg: &Message) -> Option<Ipv4Addr> {
    match msg.opts().get(OptionCode::ServerIdentifier) {
        Some(dhcproto::v4::DhcpOption::ServerIdentifier(ip)) => Some(*ip),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dhcproto::v4::{DhcpOption, MessageType};

    fn discover() -> Message {
        let mut m = Message::new(
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &[0x52, 0x54, 0, 1, 2, 3],
        );
        m.opts_mut()
            .insert(DhcpOption::MessageType(MessageType::Discover));
        m
    }

    fn bytes(m: &Message) -> Vec<u8> {
        let mut b = Vec::new();
        m.encode(&mut Encoder::new(&mut b)).unwrap();
        b
    }

    #[test]
    fn decodes_a_discover() {
        let r = decode(&bytes(&discover())).unwrap();
        assert_eq!(r.mac, Some(Mac([0x52, 0x54, 0, 1, 2, 3])));
        assert_eq!(msg_type_name(&r.msg), "discover");
        assert!(r.relay_info.is_none());
    }

    #[test]
    fn malformed_inputs_are_errors_not_panics() {
        let good = bytes(&discover());
        assert!(matches!(decode(&[]), Err(Malformed::Short(0))));
        assert!(matches!(decode(&good[..239]), Err(Malformed::Short(239))));
        let mut b = good.clone();
        b[236] = 0;
        assert_eq!(decode(&b).unwrap_err(), Malformed::NoMagic);
        let mut b = good.clone();
        b[2] = 200;
        assert_eq!(decode(&b).unwrap_err(), Malformed::BadHlen(200));
        // Options dhcproto would debug_assert on.
        for (code, data) in [
            (80u8, vec![1u8]),
            (94, vec![1]),
            (81, vec![0]),
            (151, vec![]),
            (152, vec![1, 2]),
        ] {
            let mut b = good[..240].to_vec();
            b.extend_from_slice(&[53, 1, 1, code, data.len() as u8]);
            b.extend_from_slice(&data);
            b.push(255);
            assert!(
                matches!(decode(&b), Err(Malformed::BadOptionLength { .. })),
                "option {code}"
            );
        }
        // Two consecutive option-94 instances merge to length 6.
        let mut b = good[..240].to_vec();
        b.extend_from_slice(&[53, 1, 1, 94, 3, 1, 2, 3, 94, 3, 1, 2, 3, 255]);
        assert!(decode(&b).is_err());
        // Truncated option.
        let mut b = good[..240].to_vec();
        b.extend_from_slice(&[53, 1, 1, 12, 40, b'x']);
        assert_eq!(
            decode(&b).unwrap_err(),
            Malformed::TruncatedOption { code: 12 }
        );
        // Every prefix and a pile of pseudo-random mutations: errors or values, never panics.
        for n in 0..good.len() {
            let _ = decode(&good[..n]);
        }
        let mut seed: u32 = 0x1234_5678;
        for _ in 0..3000 {
            let mut b = good.clone();
            b.extend_from_slice(&[
                61, 7, 1, 0x52, 0x54, 0, 1, 2, 3, 82, 4, 1, 2, 0xaa, 0xbb, 255,
            ]);
            for _ in 0..8 {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                let i = (seed as usize) % b.len();
                b[i] = (seed >> 24) as u8;
            }
            let _ = decode(&b);
        }
    }

    #[test]
    fn option82_is_echoed_verbatim() {
        // Sub-options out of order and duplicated: a map would reorder/drop them.
        let raw82 = vec![2, 2, 0xbe, 0xef, 1, 3, b'e', b't', b'h', 2, 1, 0x01, 9, 0];
        let mut b = bytes(&discover());
        assert_eq!(b.pop(), Some(255));
        b.push(82);
        b.push(raw82.len() as u8);
        b.extend_from_slice(&raw82);
        b.push(255);
        let r = decode(&b).unwrap();
        assert_eq!(r.relay_info.as_deref(), Some(&raw82[..]));
        let mut reply = Reply {
            msg: discover(),
            dest: "10.0.0.1:67".parse().unwrap(),
            relay_info: r.relay_info,
        };
        let out = encode(&mut reply).unwrap();
        assert!(out.len() >= MIN_REPLY_LEN);
        let back = decode(&out).unwrap();
        assert_eq!(back.relay_info.as_deref(), Some(&raw82[..]));
        // Option 82 is the last option before the end marker.
        let end = out.iter().rposition(|&x| x == 255).unwrap();
        assert_eq!(
            &out[end - raw82.len() - 2..end],
            &[&[82u8, raw82.len() as u8][..], &raw82[..]].concat()[..]
        );
    }
}
