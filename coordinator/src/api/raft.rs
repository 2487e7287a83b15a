//! RaftService: the peer transport's receiving end.

use protobuf::Message as _;
use pxemesh_certs::Role;
use pxemesh_proto::v1 as pb;
use pxemesh_proto::v1::raft_service_server::RaftService;
use raft::eraftpb::Message;
use tonic::{Request, Response, Status, Streaming};
use tracing::warn;

use super::auth::peer;
use crate::node::NodeHandle;

pub struct RaftApi {
    node: NodeHandle,
}

impl RaftApi {
    pub fn new(node: NodeHandle) -> RaftApi {
        RaftApi { node }
    }
}

#[tonic::async_trait]
impl RaftService for RaftApi {
    async fn stream(
        &self,
        req: Request<Streaming<pb::RaftMessage>>,
    ) -> Result<Response<pb::RaftAck>, Status> {
        let who = peer(&req)?;
        let Role::Coordinator { id: sender } = who.role else {
            return Err(Status::permission_denied(
                "RaftService is for coordinator certificates",
            ));
        };
        let mut stream = req.into_inner();
        while let Some(m) = stream.message().await? {
            let msg = Message::parse_from_bytes(&m.message)
                .map_err(|e| Status::invalid_argument(format!("undecodable raft message: {e}")))?;
            // A coordinator certificate speaks only for its own node id.
            if msg.from != sender {
                warn!(peer_identity = %who, claimed = msg.from, "raft message with a forged sender refused");
                return Err(Status::permission_denied(format!(
                    "coordinator {sender} may not send raft messages as node {}",
                    msg.from
                )));
            }
            if msg.to != self.node.id() {
                return Err(Status::invalid_argument(format!(
                    "raft message for node {} reached node {}",
                    msg.to,
                    self.node.id()
                )));
            }
            self.node.step(msg).await.map_err(Status::from)?;
        }
        Ok(Response::new(pb::RaftAck {}))
    }
}
