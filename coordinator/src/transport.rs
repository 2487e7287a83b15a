//! Raft peer transport: one task per peer holding a long-lived client stream to
//! the peer's `RaftService/Stream` over mTLS.
//!
//! Sending never blocks the Raft actor: each peer has a bounded queue and a full
//! queue drops the message (Raft retransmits) and reports the peer unreachable.
//! Snapshot deliveries are reported back so raft-rs never waits forever on a lost
//! snapshot.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use protobuf::Message as _;
use pxemesh_certs::Tls;
use pxemesh_proto::v1::raft_service_client::RaftServiceClient;
use pxemesh_proto::v1::RaftMessage;
use raft::eraftpb::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::client;
use crate::metrics::Metrics;
use crate::node::{is_snapshot, Request};

const PEER_QUEUE: usize = 4096;
/// Snapshots carry the whole state; allow them through gRPC's size limits.
pub const MAX_RAFT_MESSAGE: usize = 256 * 1024 * 1024;

struct PeerLink {
    addr: String,
    tx: mpsc::Sender<Message>,
    cancel: CancellationToken,
}

pub(crate) struct Transport {
    tls: Arc<Tls>,
    peers: HashMap<u64, PeerLink>,
    node_tx: mpsc::Sender<Request>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    metrics: Arc<Metrics>,
}

impl Transport {
    pub(crate) fn new(
        tls: Arc<Tls>,
        node_tx: mpsc::Sender<Request>,
        shutdown: CancellationToken,
        tracker: TaskTracker,
        metrics: Arc<Metrics>,
    ) -> Transport {
        Transport {
            tls,
            peers: HashMap::new(),
            node_tx,
            shutdown,
            tracker,
            metrics,
        }
    }

    pub(crate) fn set_peer(&mut self, id: u64, addr: String) {
        if self.peers.get(&id).is_some_and(|p| p.addr == addr) {
            return;
        }
        self.remove_peer(id);
        let (tx, rx) = mpsc::channel(PEER_QUEUE);
        let cancel = self.shutdown.child_token();
        info!(peer = id, address = %addr, "raft peer added");
        let task = PeerTask {
            id,
            addr: addr.clone(),
            tls: self.tls.clone(),
            node_tx: self.node_tx.clone(),
            cancel: cancel.clone(),
            metrics: self.metrics.clone(),
        };
        self.tracker.spawn(task.run(rx));
        self.peers.insert(id, PeerLink { addr, tx, cancel });
    }

    pub(crate) fn remove_peer(&mut self, id: u64) {
        if let Some(p) = self.peers.remove(&id) {
            info!(peer = id, address = %p.addr, "raft peer removed; no more traffic to it");
            p.cancel.cancel();
        }
    }

    pub(crate) fn retain(&mut self, keep: impl Fn(u64) -> bool) {
        let gone: Vec<u64> = self.peers.keys().copied().filter(|id| !keep(*id)).collect();
        for id in gone {
            self.remove_peer(id);
        }
    }

    pub(crate) fn shutdown(&mut self) {
        for (_, p) in self.peers.drain() {
            p.cancel.cancel();
        }
    }

    pub(crate) fn send(&mut self, msg: Message) {
        let to = msg.to;
        let Some(peer) = self.peers.get(&to) else {
            debug!(to, "no transport for raft peer; message dropped");
            return;
        };
        let snap = is_snapshot(&msg);
        if peer.tx.try_send(msg).is_err() {
            self.metrics.raft_messages_dropped.inc();
            let _ = self.node_tx.try_send(Request::Unreachable { to });
            if snap {
                let _ = self
                    .node_tx
                    .try_send(Request::SnapshotStatus { to, failed: true });
            }
        }
    }
}

struct PeerTask {
    id: u64,
    addr: String,
    tls: Arc<Tls>,
    node_tx: mpsc::Sender<Request>,
    cancel: CancellationToken,
    metrics: Arc<Metrics>,
}

impl PeerTask {
    async fn run(self, mut rx: mpsc::Receiver<Message>) {
        let mut backoff = Duration::from_millis(50);
        let mut failures = 0u32;
        loop {
            if self.cancel.is_cancelled() {
                return;
            }
            let channel = tokio::select! {
                _ = self.cancel.cancelled() => return,
                c = client::channel(&self.addr, self.tls.clone()) => c,
            };
            let channel = match channel {
                Ok(c) => c,
                Err(e) => {
                    failures += 1;
                    // Log the first failure and then every 50th, not every retry.
                    if failures == 1 || failures.is_multiple_of(50) {
                        warn!(peer = self.id, address = %self.addr, error = %e, failures, "cannot reach raft peer");
                    }
                    self.drop_queued(&mut rx);
                    tokio::select! {
                        _ = self.cancel.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            if failures > 0 {
                info!(peer = self.id, address = %self.addr, "raft peer reachable again");
            }
            failures = 0;
            backoff = Duration::from_millis(50);
            let (stx, srx) = mpsc::channel::<RaftMessage>(1024);
            let mut grpc = RaftServiceClient::new(channel)
                .max_encoding_message_size(MAX_RAFT_MESSAGE)
                .max_decoding_message_size(MAX_RAFT_MESSAGE);
            let mut call = tokio::spawn(async move { grpc.stream(ReceiverStream::new(srx)).await });
            loop {
                tokio::select! {
                    _ = self.cancel.cancelled() => {
                        call.abort();
                        return;
                    }
                    res = &mut call => {
                        match res {
                            Ok(Err(status)) => debug!(peer = self.id, %status, "raft stream ended"),
                            Ok(Ok(_)) => debug!(peer = self.id, "raft stream closed by peer"),
                            Err(e) => debug!(peer = self.id, error = %e, "raft stream task failed"),
                        }
                        break;
                    }
                    m = rx.recv() => {
                        let Some(msg) = m else { return };
                        let snap = is_snapshot(&msg);
                        let bytes = match msg.write_to_bytes() {
                            Ok(b) => b,
                            Err(e) => {
                                warn!(error = %e, "cannot encode raft message");
                                continue;
                            }
                        };
                        self.metrics.raft_messages_sent.inc();
                        let sent = stx.send(RaftMessage { message: bytes }).await.is_ok();
                        if snap {
                            let _ = self.node_tx.try_send(Request::SnapshotStatus { to: self.id, failed: !sent });
                        }
                        if !sent {
                            break;
                        }
                    }
                }
            }
        }
    }

    fn drop_queued(&self, rx: &mut mpsc::Receiver<Message>) {
        while let Ok(m) = rx.try_recv() {
            if is_snapshot(&m) {
                let _ = self.node_tx.try_send(Request::SnapshotStatus {
                    to: self.id,
                    failed: true,
                });
            }
        }
        let _ = self.node_tx.try_send(Request::Unreachable { to: self.id });
    }
}
