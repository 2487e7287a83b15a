//! TFTP packets (RFC 1350, OACK from RFC 2347): parsing and encoding.
//! Parsing never panics on client data; anything that does not follow the
//! format is a [`ParseError`].

use std::fmt;

pub const OP_RRQ: u16 = 1;
pub const OP_WRQ: u16 = 2;
pub const OP_DATA: u16 = 3;
pub const OP_ACK: u16 = 4;
pub const OP_ERROR: u16 = 5;
pub const OP_OACK: u16 = 6;

/// Error codes of RFC 1350 (and 8 from RFC 2347).
pub mod code {
    pub const NOT_DEFINED: u16 = 0;
    pub const FILE_NOT_FOUND: u16 = 1;
    pub const ACCESS_VIOLATION: u16 = 2;
    pub const DISK_FULL: u16 = 3;
    pub const ILLEGAL_OPERATION: u16 = 4;
    pub const UNKNOWN_TID: u16 = 5;
    pub const OPTION_REFUSED: u16 = 8;
}

/// Size of the DATA header (opcode + block number).
pub const DATA_HEADER: usize = 4;

/// A read or write request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub filename: String,
    /// Lower-cased transfer mode ("octet", "netascii", "mail", ...).
    pub mode: String,
    /// Options in the client's order, names lower-cased, values as sent.
    pub options: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet<'a> {
    Rrq(Request),
    Wrq(Request),
    Data { block: u16, data: &'a [u8] },
    Ack(u16),
    Error { code: u16, message: String },
    Oack(Vec<(String, String)>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    TooShort,
    UnknownOpcode(u16),
    /// A request without a NUL-terminated file name and mode.
    Unterminated,
    /// File name or mode is not UTF-8.
    NotUtf8,
    EmptyFilename,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::TooShort => write!(f, "packet too short"),
            ParseError::UnknownOpcode(op) => write!(f, "unknown opcode {op}"),
            ParseError::Unterminated => write!(f, "request strings not NUL-terminated"),
            ParseError::NotUtf8 => write!(f, "request strings are not UTF-8"),
            ParseError::EmptyFilename => write!(f, "empty file name"),
        }
    }
}

impl std::error::Error for ParseError {}

/// The opcode of a datagram, if it has one (for classifying malformed requests).
pub fn opcode(buf: &[u8]) -> Option<u16> {
    (buf.len() >= 2).then(|| u16::from_be_bytes([buf[0], buf[1]]))
}

impl<'a> Packet<'a> {
    pub fn parse(buf: &'a [u8]) -> Result<Packet<'a>, ParseError> {
        let op = opcode(buf).ok_or(ParseError::TooShort)?;
        let body = &buf[2..];
        match op {
            OP_RRQ => parse_request(body).map(Packet::Rrq),
            OP_WRQ => parse_request(body).map(Packet::Wrq),
            OP_DATA => {
                if body.len() < 2 {
                    return Err(ParseError::TooShort);
                }
                Ok(Packet::Data {
                    block: u16::from_be_bytes([body[0], body[1]]),
                    data: &body[2..],
                })
            }
            OP_ACK => {
                if body.len() < 2 {
                    return Err(ParseError::TooShort);
                }
                // Trailing bytes after the block number are tolerated (some
                // firmware pads short frames).
                Ok(Packet::Ack(u16::from_be_bytes([body[0], body[1]])))
            }
            OP_ERROR => {
                if body.len() < 2 {
                    return Err(ParseError::TooShort);
                }
                let text = &body[2..];
                // The message should end with NUL; accept it without one.
                let end = text.iter().position(|b| *b == 0).unwrap_or(text.len());
                Ok(Packet::Error {
                    code: u16::from_be_bytes([body[0], body[1]]),
                    message: String::from_utf8_lossy(&text[..end]).into_owned(),
                })
            }
            OP_OACK => Ok(Packet::Oack(parse_options(body))),
            other => Err(ParseError::UnknownOpcode(other)),
        }
    }
}

/// NUL-terminated fields; an unterminated tail is returned separately.
fn fields(body: &[u8]) -> (Vec<&[u8]>, bool) {
    let mut out: Vec<&[u8]> = body.split(|b| *b == 0).collect();
    // `split` yields one more (possibly empty) piece after the last NUL.
    let tail = out.pop().unwrap_or_default();
    (out, !tail.is_empty())
}

fn parse_request(body: &[u8]) -> Result<Request, ParseError> {
    let (f, _unterminated_tail) = fields(body);
    if f.len() < 2 {
        return Err(ParseError::Unterminated);
    }
    let filename = std::str::from_utf8(f[0]).map_err(|_| ParseError::NotUtf8)?;
    let mode = std::str::from_utf8(f[1]).map_err(|_| ParseError::NotUtf8)?;
    if filename.is_empty() {
        return Err(ParseError::EmptyFilename);
    }
    Ok(Request {
        filename: filename.to_string(),
        mode: mode.to_ascii_lowercase(),
        options: pairs(&f[2..]),
    })
}

fn parse_options(body: &[u8]) -> Vec<(String, String)> {
    let (f, _) = fields(body);
    pairs(&f)
}

/// Option name/value pairs. Stops at an empty name (NUL padding) or an
/// incomplete pair; options that are not UTF-8 are skipped.
fn pairs(f: &[&[u8]]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for pair in f.chunks(2) {
        let [name, value] = pair else { break };
        if name.is_empty() {
            break;
        }
        if let (Ok(n), Ok(v)) = (std::str::from_utf8(name), std::str::from_utf8(value)) {
            out.push((n.to_ascii_lowercase(), v.to_string()));
        }
    }
    out
}

/// A DATA packet: header for `block`, then `payload`.
pub fn data(block: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(DATA_HEADER + payload.len());
    p.extend_from_slice(&OP_DATA.to_be_bytes());
    p.extend_from_slice(&block.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

pub fn ack(block: u16) -> Vec<u8> {
    let mut p = OP_ACK.to_be_bytes().to_vec();
    p.extend_from_slice(&block.to_be_bytes());
    p
}

pub fn error(code: u16, message: &str) -> Vec<u8> {
    let mut p = Vec::with_capacity(5 + message.len());
    p.extend_from_slice(&OP_ERROR.to_be_bytes());
    p.extend_from_slice(&code.to_be_bytes());
    // A NUL inside the message would end it early on the client; drop them.
    p.extend(message.bytes().filter(|b| *b != 0));
    p.push(0);
    p
}

pub fn oack(options: &[(String, String)]) -> Vec<u8> {
    let mut p = OP_OACK.to_be_bytes().to_vec();
    for (k, v) in options {
        p.extend_from_slice(k.as_bytes());
        p.push(0);
        p.extend_from_slice(v.as_bytes());
        p.push(0);
    }
    p
}

/// A read request (used by tests and probes).
pub fn rrq(filename: &str, mode: &str, options: &[(&str, &str)]) -> Vec<u8> {
    request(OP_RRQ, filename, mode, options)
}

pub fn wrq(filename: &str, mode: &str, options: &[(&str, &str)]) -> Vec<u8> {
    request(OP_WRQ, filename, mode, options)
}

fn request(op: u16, filename: &str, mode: &str, options: &[(&str, &str)]) -> Vec<u8> {
    let mut p = op.to_be_bytes().to_vec();
    for s in [filename, mode]
        .into_iter()
        .chain(options.iter().flat_map(|(k, v)| [*k, *v]))
    {
        p.extend_from_slice(s.as_bytes());
        p.push(0);
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn request_round_trip() {
        let p = rrq(
            "pxelinux.0",
            "OCTET",
            &[("TSize", "0"), ("blksize", "1456")],
        );
        let Packet::Rrq(r) = Packet::parse(&p).unwrap() else {
            panic!("not an RRQ")
        };
        assert_eq!(r.filename, "pxelinux.0");
        assert_eq!(r.mode, "octet");
        assert_eq!(r.options, opts(&[("tsize", "0"), ("blksize", "1456")]));
        let Packet::Wrq(w) = Packet::parse(&wrq("x", "netascii", &[])).unwrap() else {
            panic!("not a WRQ")
        };
        assert_eq!(
            (w.filename.as_str(), w.mode.as_str(), w.options.len()),
            ("x", "netascii", 0)
        );
    }

    #[test]
    fn request_leniency_and_errors() {
        // NUL padding after the options, and an incomplete trailing pair.
        let mut p = rrq("a", "octet", &[("blksize", "1024")]);
        p.extend_from_slice(b"\0\0\0");
        let Packet::Rrq(r) = Packet::parse(&p).unwrap() else {
            panic!()
        };
        assert_eq!(r.options, opts(&[("blksize", "1024")]));
        let mut p = rrq("a", "octet", &[("blksize", "1024")]);
        p.extend_from_slice(b"tsize\0");
        let Packet::Rrq(r) = Packet::parse(&p).unwrap() else {
            panic!()
        };
        assert_eq!(r.options, opts(&[("blksize", "1024")]));
        // Unterminated option value: dropped, request still valid.
        let mut p = rrq("a", "octet", &[]);
        p.extend_from_slice(b"tsize\x000");
        let Packet::Rrq(r) = Packet::parse(&p).unwrap() else {
            panic!()
        };
        assert!(r.options.is_empty());

        assert_eq!(Packet::parse(b""), Err(ParseError::TooShort));
        assert_eq!(Packet::parse(b"\x00"), Err(ParseError::TooShort));
        assert_eq!(
            Packet::parse(b"\x00\x01file"),
            Err(ParseError::Unterminated)
        );
        assert_eq!(
            Packet::parse(b"\x00\x01file\0octet"),
            Err(ParseError::Unterminated)
        );
        assert_eq!(
            Packet::parse(b"\x00\x01\0octet\0"),
            Err(ParseError::EmptyFilename)
        );
        assert_eq!(
            Packet::parse(b"\x00\x01\xff\xfe\0octet\0"),
            Err(ParseError::NotUtf8)
        );
        assert_eq!(
            Packet::parse(b"\x00\x09abc"),
            Err(ParseError::UnknownOpcode(9))
        );
        assert_eq!(Packet::parse(b"\x00\x04\x01"), Err(ParseError::TooShort));
        assert_eq!(Packet::parse(b"\x00\x03\x01"), Err(ParseError::TooShort));
        assert_eq!(Packet::parse(b"\x00\x05\x00"), Err(ParseError::TooShort));
    }

    #[test]
    fn data_ack_error_oack() {
        let d = data(0xfffe, b"hello");
        assert_eq!(&d[..4], &[0, 3, 0xff, 0xfe]);
        assert_eq!(
            Packet::parse(&d).unwrap(),
            Packet::Data {
                block: 0xfffe,
                data: b"hello"
            }
        );
        assert_eq!(
            Packet::parse(&data(1, b"")).unwrap(),
            Packet::Data {
                block: 1,
                data: b""
            }
        );
        assert_eq!(Packet::parse(&ack(65535)).unwrap(), Packet::Ack(65535));
        assert_eq!(
            Packet::parse(b"\x00\x04\x00\x07\x00\x00").unwrap(),
            Packet::Ack(7)
        );
        let e = error(code::ACCESS_VIOLATION, "access\0 violation");
        assert_eq!(e.last(), Some(&0));
        assert_eq!(
            Packet::parse(&e).unwrap(),
            Packet::Error {
                code: 2,
                message: "access violation".into()
            }
        );
        // ERROR without the terminating NUL.
        assert_eq!(
            Packet::parse(b"\x00\x05\x00\x00probe done").unwrap(),
            Packet::Error {
                code: 0,
                message: "probe done".into()
            }
        );
        let o = opts(&[("blksize", "1456"), ("tsize", "123")]);
        assert_eq!(oack(&o), b"\x00\x06blksize\x001456\x00tsize\x00123\x00");
        assert_eq!(Packet::parse(&oack(&o)).unwrap(), Packet::Oack(o));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic fuzz: every prefix/mutation of valid packets.
        let seeds = [
            rrq(
                "pxelinux.cfg/default",
                "octet",
                &[("tsize", "0"), ("blksize", "1468"), ("windowsize", "8")],
            ),
            error(0, "x"),
            oack(&opts(&[("a", "b")])),
            data(3, &[0; 20]),
        ];
        let mut x: u32 = 12345;
        for s in &seeds {
            for n in 0..=s.len() {
                let _ = Packet::parse(&s[..n]);
                let mut m = s[..n].to_vec();
                for _ in 0..4 {
                    if m.is_empty() {
                        break;
                    }
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    let i = (x as usize >> 8) % m.len();
                    m[i] = (x >> 16) as u8;
                    let _ = Packet::parse(&m);
                }
            }
        }
    }
}
