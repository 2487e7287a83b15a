//! One read transfer on its own socket: OACK handshake (RFC 2347), then
//! lock-step or windowed (RFC 7440) DATA with bounded retransmission.
//!
//! Rules that keep a boot storm calm:
//! - a client ERROR ends the transfer at once, whatever the phase (a PXE ROM
//!   answering the OACK with ERROR after a tsize probe is normal);
//! - a window is resent only on timeout or on an ACK inside the window (the
//!   client lost something after it); a duplicate ACK never triggers a resend
//!   (Sorcerer's Apprentice);
//! - after `retries` retransmissions of the same window the transfer is
//!   abandoned silently.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::files::Source;
use super::packet::{self, code, Packet};
use crate::metrics::RelayMetrics;

/// How a transfer ended (the `outcome` label of `tftp_transfers`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// ERROR in answer to the OACK: the tsize probe of PXE ROMs.
    ClientAbort {
        code: u16,
        message: String,
    },
    /// ERROR during the data phase.
    ClientError {
        code: u16,
        message: String,
    },
    Timeout,
    /// The same client port sent a different request.
    Superseded,
    Shutdown,
    Io(String),
}

impl Outcome {
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::ClientAbort { .. } => "client-abort",
            Outcome::ClientError { .. } => "client-error",
            Outcome::Timeout => "timeout",
            Outcome::Superseded => "superseded",
            Outcome::Shutdown => "shutdown",
            Outcome::Io(_) => "io-error",
        }
    }
}

/// What an ACK means for the window of blocks `[base, base + len)`
/// (absolute block numbers, starting at 1; the wire carries them mod 2^16).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckKind {
    /// The client has everything up to and including the n-th block of the window.
    Advance(u64),
    /// The ACK of the block before the window (already acknowledged).
    Duplicate,
    /// Neither: an old delayed ACK or garbage.
    Stray,
}

pub fn classify_ack(base: u64, len: u64, wire: u16) -> AckKind {
    let prev = base.saturating_sub(1);
    // Distance from the last acknowledged block, modulo the 16-bit wrap. A
    // window holds at most 65535 blocks, so the match is unambiguous.
    let d = u64::from(wire).wrapping_sub(prev) & 0xffff;
    if d == 0 {
        AckKind::Duplicate
    } else if d <= len {
        AckKind::Advance(d)
    } else {
        AckKind::Stray
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Params {
    pub blksize: u16,
    pub windowsize: u16,
    pub timeout: Duration,
    pub retries: u32,
}

enum Reply {
    Ack(u16),
    Error(u16, String),
    Timeout,
    Cancelled,
}

/// At most this many "unknown transfer ID" errors per transfer, so the
/// transfer socket cannot be used as a reflector.
const MAX_STRANGER_ERRORS: u32 = 16;

pub struct Link<'a> {
    pub sock: &'a UdpSocket,
    pub peer: SocketAddr,
    /// Cancelled when the transfer must stop (shutdown or superseded).
    pub cancel: &'a CancellationToken,
    pub shutdown: &'a CancellationToken,
    pub metrics: &'a RelayMetrics,
    strangers: u32,
}

impl<'a> Link<'a> {
    pub fn new(
        sock: &'a UdpSocket,
        peer: SocketAddr,
        cancel: &'a CancellationToken,
        shutdown: &'a CancellationToken,
        metrics: &'a RelayMetrics,
    ) -> Link<'a> {
        Link {
            sock,
            peer,
            cancel,
            shutdown,
            metrics,
            strangers: 0,
        }
    }

    async fn send(&self, pkt: &[u8]) {
        if let Err(e) = self.sock.send_to(pkt, self.peer).await {
            // Treated like a lost packet: the timeout resends it.
            debug!(client = %self.peer, error = %e, "TFTP send failed");
        }
    }

    pub async fn send_error(&self, code: u16, message: &str) {
        self.send(&packet::error(code, message)).await;
    }

    fn cancelled(&self) -> Outcome {
        if self.shutdown.is_cancelled() {
            Outcome::Shutdown
        } else {
            Outcome::Superseded
        }
    }

    /// Wait for an ACK or ERROR from the client until `deadline`. Packets
    /// from anyone else get ERROR 5; anything else from the client is ignored.
    async fn recv_reply(&mut self, deadline: Instant) -> Reply {
        let mut buf = [0u8; 1500];
        loop {
            let r = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return Reply::Cancelled,
                _ = tokio::time::sleep_until(deadline) => return Reply::Timeout,
                r = self.sock.recv_from(&mut buf) => r,
            };
            match r {
                Ok((n, from)) if from != self.peer => {
                    if self.strangers < MAX_STRANGER_ERRORS {
                        self.strangers += 1;
                        let e = packet::error(code::UNKNOWN_TID, "unknown transfer ID");
                        let _ = self.sock.send_to(&e, from).await;
                    }
                    debug!(client = %self.peer, stranger = %from, bytes = n, "TFTP packet from unknown TID");
                }
                Ok((n, _)) => match Packet::parse(&buf[..n]) {
                    Ok(Packet::Ack(b)) => return Reply::Ack(b),
                    Ok(Packet::Error { code, message }) => return Reply::Error(code, message),
                    _ => {
                        debug!(client = %self.peer, bytes = n, "TFTP packet ignored during transfer")
                    }
                },
                Err(e) => {
                    // Should not happen on an unconnected UDP socket; do not spin.
                    debug!(client = %self.peer, error = %e, "TFTP receive error");
                    tokio::select! {
                        _ = self.cancel.cancelled() => return Reply::Cancelled,
                        _ = tokio::time::sleep_until(deadline.min(Instant::now() + Duration::from_millis(10))) => {}
                    }
                    if Instant::now() >= deadline {
                        return Reply::Timeout;
                    }
                }
            }
        }
    }

    /// Run the transfer. `oack` is the encoded OACK when options were
    /// accepted; `on_first_ack` runs once the client has acknowledged
    /// something (it has locked onto this transfer's port).
    pub async fn serve(
        &mut self,
        p: Params,
        oack: Option<Vec<u8>>,
        source: &mut Source,
        mut on_first_ack: impl FnMut(),
    ) -> Outcome {
        let had_oack = oack.is_some();
        if let Some(oack) = oack {
            let mut tries = 0;
            loop {
                self.send(&oack).await;
                let deadline = Instant::now() + p.timeout;
                let acked = loop {
                    match self.recv_reply(deadline).await {
                        Reply::Ack(0) => break true,
                        Reply::Ack(_) => continue,
                        Reply::Error(code, message) => {
                            return Outcome::ClientAbort { code, message }
                        }
                        Reply::Timeout => break false,
                        Reply::Cancelled => return self.cancelled(),
                    }
                };
                if acked {
                    break;
                }
                tries += 1;
                if tries > p.retries {
                    return Outcome::Timeout;
                }
                self.metrics.tftp_retransmits.inc();
            }
            on_first_ack();
        }

        let blksize = usize::from(p.blksize);
        let windowsize = usize::from(p.windowsize.max(1));
        let mut window: VecDeque<(u64, Vec<u8>)> = VecDeque::with_capacity(windowsize);
        let mut base: u64 = 1;
        let mut next: u64 = 1;
        let mut highest_sent: u64 = 0;
        let mut last_read = false;
        let mut tries = 0;
        let mut acked_once = had_oack;
        loop {
            while !last_read && window.len() < windowsize {
                let mut pkt = packet::data((next & 0xffff) as u16, &[]);
                pkt.reserve(blksize);
                match source.read_block(blksize, &mut pkt).await {
                    Ok(n) => last_read = n < blksize,
                    Err(e) => {
                        self.send_error(code::NOT_DEFINED, "read error").await;
                        return Outcome::Io(e.to_string());
                    }
                }
                window.push_back((next, pkt));
                next += 1;
            }
            if window.front().is_some_and(|(abs, _)| *abs <= highest_sent) {
                self.metrics.tftp_retransmits.inc();
            }
            for (abs, pkt) in &window {
                self.send(pkt).await;
                self.metrics
                    .tftp_bytes
                    .inc_by((pkt.len() - packet::DATA_HEADER) as u64);
                highest_sent = highest_sent.max(*abs);
            }
            let deadline = Instant::now() + p.timeout;
            let advanced = loop {
                match self.recv_reply(deadline).await {
                    Reply::Ack(b) => match classify_ack(base, window.len() as u64, b) {
                        AckKind::Advance(n) => break Some(n),
                        AckKind::Duplicate | AckKind::Stray => continue,
                    },
                    Reply::Error(code, message) => return Outcome::ClientError { code, message },
                    Reply::Timeout => break None,
                    Reply::Cancelled => return self.cancelled(),
                }
            };
            match advanced {
                Some(n) => {
                    if !acked_once {
                        acked_once = true;
                        on_first_ack();
                    }
                    window.drain(..(n as usize).min(window.len()));
                    base += n;
                    tries = 0;
                    if last_read && window.is_empty() {
                        return Outcome::Ok;
                    }
                }
                None => {
                    tries += 1;
                    if tries > p.retries {
                        return Outcome::Timeout;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_classification() {
        // Window of 8 starting at block 1.
        assert_eq!(classify_ack(1, 8, 0), AckKind::Duplicate);
        assert_eq!(classify_ack(1, 8, 1), AckKind::Advance(1));
        assert_eq!(classify_ack(1, 8, 5), AckKind::Advance(5));
        assert_eq!(classify_ack(1, 8, 8), AckKind::Advance(8));
        assert_eq!(classify_ack(1, 8, 9), AckKind::Stray);
        assert_eq!(classify_ack(1, 8, 65535), AckKind::Stray);
        // Window 9..=16: an old ACK of block 3 is stray, 8 is a duplicate.
        assert_eq!(classify_ack(9, 8, 3), AckKind::Stray);
        assert_eq!(classify_ack(9, 8, 8), AckKind::Duplicate);
        assert_eq!(classify_ack(9, 8, 12), AckKind::Advance(4));
    }

    #[test]
    fn ack_classification_across_rollover() {
        // Blocks 65534..=65541 are 65534, 65535, 0, 1, ..., 5 on the wire.
        assert_eq!(classify_ack(65534, 8, 65533), AckKind::Duplicate);
        assert_eq!(classify_ack(65534, 8, 65535), AckKind::Advance(2));
        assert_eq!(classify_ack(65534, 8, 0), AckKind::Advance(3));
        assert_eq!(classify_ack(65534, 8, 5), AckKind::Advance(8));
        assert_eq!(classify_ack(65534, 8, 6), AckKind::Stray);
        // Lock-step at the wrap: block 65536 is wire 0, its predecessor 65535.
        assert_eq!(classify_ack(65536, 1, 65535), AckKind::Duplicate);
        assert_eq!(classify_ack(65536, 1, 0), AckKind::Advance(1));
        // Second wrap.
        assert_eq!(classify_ack(131_072, 1, 0), AckKind::Advance(1));
        assert_eq!(classify_ack(131_072, 1, 65535), AckKind::Duplicate);
        // Largest window: every wire value but the duplicate advances.
        assert_eq!(classify_ack(10, 65535, 9), AckKind::Duplicate);
        assert_eq!(classify_ack(10, 65535, 8), AckKind::Advance(65535));
    }

    /// A scripted client on a real loopback socket: the window/ACK logic end to end.
    async fn pair() -> (UdpSocket, UdpSocket) {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        (server, client)
    }

    async fn recv(client: &UdpSocket, wait_ms: u64) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 70_000];
        match tokio::time::timeout(Duration::from_millis(wait_ms), client.recv_from(&mut buf)).await
        {
            Ok(Ok((n, _))) => Some(buf[..n].to_vec()),
            _ => None,
        }
    }

    fn block_of(p: &[u8]) -> u16 {
        assert_eq!(&p[..2], &[0, 3], "not DATA: {p:?}");
        u16::from_be_bytes([p[2], p[3]])
    }

    #[tokio::test]
    async fn partial_ack_resends_from_the_next_block_and_duplicates_do_nothing() {
        let (server, client) = pair().await;
        let peer = client.local_addr().unwrap();
        let saddr = server.local_addr().unwrap();
        let metrics = RelayMetrics::new();
        let cancel = CancellationToken::new();
        let shutdown = CancellationToken::new();
        // 10 blocks of 8 bytes + a short 11th.
        let data: Vec<u8> = (0..84u8).collect();
        let task = async {
            let mut link = Link::new(&server, peer, &cancel, &shutdown, &metrics);
            let p = Params {
                blksize: 8,
                windowsize: 4,
                timeout: Duration::from_millis(300),
                retries: 2,
            };
            link.serve(p, None, &mut Source::memory(data.clone()), || {})
                .await
        };
        let script = async {
            let mut got = Vec::new();
            for _ in 0..4 {
                got.push(block_of(&recv(&client, 1000).await.unwrap()));
            }
            assert_eq!(got, [1, 2, 3, 4]);
            // "Lost" 3 and 4: ACK 2 → the next window starts at 3.
            client.send_to(&packet::ack(2), saddr).await.unwrap();
            let mut got = Vec::new();
            for _ in 0..4 {
                got.push(block_of(&recv(&client, 1000).await.unwrap()));
            }
            assert_eq!(got, [3, 4, 5, 6]);
            // Duplicate ACK 2: nothing is sent before the timeout (300 ms).
            let t = std::time::Instant::now();
            client.send_to(&packet::ack(2), saddr).await.unwrap();
            let again = recv(&client, 1000).await.unwrap();
            assert_eq!(block_of(&again), 3);
            assert!(
                t.elapsed() >= Duration::from_millis(250),
                "resent on a duplicate ACK"
            );
            for _ in 0..3 {
                recv(&client, 1000).await.unwrap();
            }
            client.send_to(&packet::ack(6), saddr).await.unwrap();
            let mut got = Vec::new();
            for _ in 0..4 {
                got.push(recv(&client, 1000).await.unwrap());
            }
            assert_eq!(
                got.iter().map(|p| block_of(p)).collect::<Vec<_>>(),
                [7, 8, 9, 10]
            );
            client.send_to(&packet::ack(10), saddr).await.unwrap();
            let last = recv(&client, 1000).await.unwrap();
            assert_eq!((block_of(&last), last.len() - 4), (11, 4));
            client.send_to(&packet::ack(11), saddr).await.unwrap();
        };
        let (outcome, ()) = tokio::join!(task, script);
        assert_eq!(outcome, Outcome::Ok);
        assert_eq!(metrics.tftp_retransmits.get(), 2);
        // Windows 1-4, 3-6 (partial ACK), 3-6 (timeout), 7-10, then 4 bytes of block 11.
        assert_eq!(metrics.tftp_bytes.get(), 4 * 4 * 8 + 4);
    }

    #[tokio::test]
    async fn client_error_ends_at_once_and_silence_times_out() {
        let (server, client) = pair().await;
        let peer = client.local_addr().unwrap();
        let saddr = server.local_addr().unwrap();
        let metrics = RelayMetrics::new();
        let cancel = CancellationToken::new();
        let shutdown = CancellationToken::new();
        let p = Params {
            blksize: 512,
            windowsize: 1,
            timeout: Duration::from_millis(100),
            retries: 3,
        };
        let oack = packet::oack(&[("tsize".into(), "1000".into())]);

        // ERROR after the OACK: client-abort, nothing else sent.
        let mut link = Link::new(&server, peer, &cancel, &shutdown, &metrics);
        let script = async {
            let o = recv(&client, 1000).await.unwrap();
            assert_eq!(&o[..2], &[0, 6]);
            client
                .send_to(&packet::error(0, "probe done"), saddr)
                .await
                .unwrap();
        };
        let mut src = Source::memory(vec![1; 1000]);
        let (outcome, ()) =
            tokio::join!(link.serve(p, Some(oack.clone()), &mut src, || {}), script);
        assert_eq!(
            outcome,
            Outcome::ClientAbort {
                code: 0,
                message: "probe done".into()
            }
        );
        assert!(recv(&client, 300).await.is_none());

        // No answer at all: 1 + retries OACKs, then timeout.
        let mut link = Link::new(&server, peer, &cancel, &shutdown, &metrics);
        let outcome = link
            .serve(p, Some(oack), &mut Source::memory(vec![1; 1000]), || {})
            .await;
        assert_eq!(outcome, Outcome::Timeout);
        let mut n = 0;
        while let Some(pkt) = recv(&client, 50).await {
            assert_eq!(&pkt[..2], &[0, 6]);
            n += 1;
        }
        assert_eq!(n, 4);

        // Cancellation.
        cancel.cancel();
        let mut link = Link::new(&server, peer, &cancel, &shutdown, &metrics);
        let outcome = link
            .serve(p, None, &mut Source::memory(vec![1; 1000]), || {})
            .await;
        assert_eq!(outcome, Outcome::Superseded);
    }
}
