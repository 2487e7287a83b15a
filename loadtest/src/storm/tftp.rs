//! A TFTP client for simulated hosts (RFC 1350 with the RFC 2347 option
//! negotiation: blksize 2348, tsize 2349, windowsize 7440). One socket per
//! transfer, as a NIC ROM does; the data is counted, not kept, unless asked.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::time::timeout;

#[derive(Debug, Clone)]
pub struct TftpOptions {
    pub blksize: u16,
    pub windowsize: u16,
    /// Retransmission timeout (also sent as the `timeout` option, in seconds, when >= 1 s).
    pub timeout: Duration,
    /// Retransmissions of one request or ACK before the transfer is abandoned.
    pub retries: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum TftpError {
    #[error("timeout ({0})")]
    Timeout(&'static str),
    #[error("server error {code}: {message}")]
    Server { code: u16, message: String },
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

impl TftpError {
    pub fn is_timeout(&self) -> bool {
        matches!(self, TftpError::Timeout(_))
    }
}

#[derive(Debug, Default)]
pub struct Fetched {
    pub bytes: u64,
    pub retransmissions: u32,
    /// The file's content when `keep` was asked for (small files only).
    pub body: Option<Vec<u8>>,
}

/// Largest file kept in memory when `keep` is set.
const KEEP_MAX: usize = 1 << 20;

fn rrq(file: &str, o: &TftpOptions) -> Vec<u8> {
    let mut b = vec![0, 1];
    let mut put = |s: &str| {
        b.extend_from_slice(s.as_bytes());
        b.push(0);
    };
    put(file);
    put("octet");
    put("blksize");
    put(&o.blksize.to_string());
    put("tsize");
    put("0");
    if o.windowsize > 1 {
        put("windowsize");
        put(&o.windowsize.to_string());
    }
    if o.timeout >= Duration::from_secs(1) {
        put("timeout");
        put(&o.timeout.as_secs().min(255).to_string());
    }
    b
}

fn ack(block: u16) -> [u8; 4] {
    let b = block.to_be_bytes();
    [0, 4, b[0], b[1]]
}

fn error_packet(code: u16, msg: &str) -> Vec<u8> {
    let mut b = vec![0, 5];
    b.extend_from_slice(&code.to_be_bytes());
    b.extend_from_slice(msg.as_bytes());
    b.push(0);
    b
}

/// Parse an OACK into (blksize, windowsize) as accepted by the server.
fn parse_oack(b: &[u8]) -> (Option<u16>, Option<u16>) {
    let mut it = b.split(|&c| c == 0);
    let (mut blk, mut win) = (None, None);
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        let k = String::from_utf8_lossy(k).to_ascii_lowercase();
        let v = std::str::from_utf8(v).ok().and_then(|v| v.parse().ok());
        match k.as_str() {
            "blksize" => blk = v,
            "windowsize" => win = v,
            _ => {}
        }
    }
    (blk, win)
}

/// Fetch `file` from `server` (its well-known port). `local` is the address
/// to send from (a host's own address on loopback), or unspecified.
pub async fn fetch(
    server: SocketAddr,
    local: Ipv4Addr,
    file: &str,
    o: &TftpOptions,
    keep: bool,
) -> Result<Fetched, TftpError> {
    let sock = UdpSocket::bind(SocketAddr::new(local.into(), 0)).await?;
    let request = rrq(file, o);
    let mut out = Fetched {
        body: keep.then(Vec::new),
        ..Default::default()
    };
    let mut buf = vec![0u8; o.blksize as usize + 4 + 64];
    // Until the first answer: retransmit the RRQ.
    let mut peer: Option<SocketAddr> = None;
    let mut blksize = 512usize;
    let mut window = 1u16;
    let mut last_ack: Vec<u8> = request.clone();
    let mut expected: u16 = 1;
    let mut in_window = 0u16;
    let mut tries = 0u32;
    sock.send_to(&request, server).await?;
    loop {
        let (n, from) = match timeout(o.timeout, sock.recv_from(&mut buf)).await {
            Ok(r) => r?,
            Err(_) => {
                tries += 1;
                if tries > o.retries {
                    return Err(TftpError::Timeout(if peer.is_none() {
                        "no answer to the read request"
                    } else {
                        "data stopped arriving"
                    }));
                }
                out.retransmissions += 1;
                sock.send_to(&last_ack, peer.unwrap_or(server)).await?;
                in_window = 0;
                continue;
            }
        };
        match peer {
            None if from.ip() == server.ip() => peer = Some(from),
            None => continue,
            Some(p) if p != from => {
                // RFC 1350: a packet from another TID gets an ERROR 5.
                let _ = sock
                    .send_to(&error_packet(5, "unknown transfer ID"), from)
                    .await;
                continue;
            }
            Some(_) => {}
        }
        let Some(p) = peer else { continue };
        let pkt = &buf[..n];
        if pkt.len() < 4 {
            return Err(TftpError::Protocol(format!("{}-byte packet", pkt.len())));
        }
        let op = u16::from_be_bytes([pkt[0], pkt[1]]);
        match op {
            6 if expected == 1 && out.bytes == 0 => {
                // OACK: take what the server accepted, acknowledge block 0.
                let (b, w) = parse_oack(&pkt[2..]);
                blksize = b.unwrap_or(512) as usize;
                window = w.unwrap_or(1).max(1);
                if blksize + 4 > buf.len() {
                    return Err(TftpError::Protocol(format!(
                        "server chose blksize {blksize}, more than asked"
                    )));
                }
                last_ack = ack(0).to_vec();
                tries = 0;
                sock.send_to(&last_ack, p).await?;
            }
            3 => {
                let block = u16::from_be_bytes([pkt[2], pkt[3]]);
                let data = &pkt[4..];
                if block != expected {
                    // Out of order or a duplicate: tell the server where we are
                    // (RFC 7440), unless it is an old retransmission.
                    if block.wrapping_sub(expected) < 0x8000 {
                        in_window = 0;
                        sock.send_to(&last_ack, p).await?;
                    }
                    continue;
                }
                tries = 0;
                out.bytes += data.len() as u64;
                if let Some(body) = out.body.as_mut() {
                    if body.len() + data.len() > KEEP_MAX {
                        return Err(TftpError::Protocol(format!(
                            "{file}: larger than {KEEP_MAX} bytes"
                        )));
                    }
                    body.extend_from_slice(data);
                }
                let last = data.len() < blksize;
                in_window += 1;
                if last || in_window >= window {
                    last_ack = ack(block).to_vec();
                    in_window = 0;
                    sock.send_to(&last_ack, p).await?;
                } else {
                    last_ack = ack(block).to_vec();
                }
                expected = block.wrapping_add(1);
                if last {
                    return Ok(out);
                }
            }
            5 => {
                let code = u16::from_be_bytes([pkt[2], pkt[3]]);
                let message = String::from_utf8_lossy(&pkt[4..])
                    .trim_end_matches('\0')
                    .to_string();
                return Err(TftpError::Server { code, message });
            }
            other => {
                return Err(TftpError::Protocol(format!("unexpected opcode {other}")));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rrq_carries_the_options() {
        let o = TftpOptions {
            blksize: 1468,
            windowsize: 8,
            timeout: Duration::from_secs(2),
            retries: 3,
        };
        let b = rrq("undionly.kpxe", &o);
        let text = String::from_utf8_lossy(&b[2..]).replace('\0', " ");
        assert_eq!(
            text.trim(),
            "undionly.kpxe octet blksize 1468 tsize 0 windowsize 8 timeout 2"
        );
        assert_eq!(
            parse_oack(b"blksize\x001468\x00windowsize\x008\x00tsize\x00100\x00"),
            (Some(1468), Some(8))
        );
        assert_eq!(parse_oack(b"blksize\0"), (None, None));
    }
}
