//! AdminService: operators' reads and writes, cluster membership.

use std::sync::Arc;
use std::time::Duration;

use pxemesh_proto::v1 as pb;
use pxemesh_proto::v1::admin_service_server::AdminService;
use raft::eraftpb::{ConfChange, ConfChangeType};
use tonic::{Request, Response, Status};
use tracing::info;

use super::convert::*;
use crate::blobs::BlobStore;
use crate::crypto::ClusterKey;
use crate::error::{CoordError, StateError};
use crate::metrics::Metrics;
use crate::model::{Host, Kind, Record};
use crate::node::{NodeHandle, NodeStatus};
use crate::state::Command;

pub struct AdminApi {
    node: NodeHandle,
    key: ClusterKey,
    blobs: Arc<BlobStore>,
    metrics: Arc<Metrics>,
    cloudstack: Option<crate::cloudstack::bridge::BridgeHandle>,
}

impl AdminApi {
    /// Write one record through Raft (image manifests only when this node
    /// holds their blobs): the answer of `Put`, shared by `ImportImage`.
    async fn put_one(&self, rec: Record) -> Result<pb::PutResponse, CoordError> {
        super::images::check_manifests(&self.blobs, std::slice::from_ref(&rec)).await?;
        let out = self.node.propose(&Command::Put(vec![rec])).await?;
        let outcome = out
            .results
            .first()
            .map(|r| outcome_to_proto(r.outcome))
            .unwrap_or_default();
        Ok(pb::PutResponse {
            object: out.records.first().map(record_to_proto),
            outcome: outcome as i32,
            revision: out.revision,
        })
    }

    pub fn new(
        node: NodeHandle,
        key: ClusterKey,
        blobs: Arc<BlobStore>,
        metrics: Arc<Metrics>,
    ) -> AdminApi {
        AdminApi {
            node,
            key,
            blobs,
            metrics,
            cloudstack: None,
        }
    }

    /// The CloudStack bridge of this coordinator, when configured.
    pub fn with_cloudstack(
        mut self,
        handle: Option<crate::cloudstack::bridge::BridgeHandle>,
    ) -> AdminApi {
        self.cloudstack = handle;
        self
    }

    fn record_from_object(&self, obj: &pb::Object) -> Result<Record, CoordError> {
        use pb::object::Record as O;
        Ok(match &obj.record {
            Some(O::Rack(r)) => Record::Rack(rack_from_proto(r)?),
            Some(O::Network(n)) => Record::Network(network_from_proto(n)?),
            Some(O::Host(h)) => {
                let (mut host, password) = host_from_proto(h)?;
                self.seal_password(&mut host, password)?;
                Record::Host(host)
            }
            Some(O::Profile(p)) => Record::Profile(profile_from_proto(p)?),
            Some(O::Image(i)) => Record::Image(image_from_proto(i)?),
            Some(O::Job(_)) => {
                return Err(CoordError::invalid(
                    "jobs are created by power and bootdev commands, not written directly",
                ))
            }
            Some(O::Relay(_)) => {
                return Err(CoordError::invalid(
                    "relay records are written by the relays themselves",
                ))
            }
            None => return Err(CoordError::invalid("object must carry a record")),
        })
    }

    /// Seal a new password; keep the stored ciphertext when the request repeats
    /// the same password (so re-imports are "unchanged") or omits it.
    fn seal_password(&self, host: &mut Host, password: Option<String>) -> Result<(), CoordError> {
        let Some(bmc) = host.bmc.as_mut() else {
            return Ok(());
        };
        let existing = match self.node.state().get(Kind::Host, &host.name)? {
            Some(Record::Host(h)) => h.bmc.and_then(|b| b.password),
            _ => None,
        };
        bmc.password = match (password, existing) {
            (Some(p), Some(s)) if self.key.open(&s).ok().as_deref() == Some(p.as_str()) => Some(s),
            (Some(p), _) => Some(self.key.seal(&p)?),
            (None, s) => s,
        };
        Ok(())
    }

    async fn barrier(&self, consistency: i32) -> Result<(), CoordError> {
        if consistency == pb::Consistency::Serializable as i32 {
            Ok(())
        } else {
            self.node.read_barrier().await
        }
    }

    fn members(status: &NodeStatus) -> Vec<pb::Member> {
        status
            .members
            .iter()
            .map(|m| pb::Member {
                id: m.id,
                address: m.address.clone(),
                learner: m.learner,
                matched_index: m.matched,
            })
            .collect()
    }

    async fn change_membership(
        &self,
        cc: ConfChange,
    ) -> Result<pb::MembershipResponse, CoordError> {
        self.node.conf_change(cc).await?;
        let status = self.node.status().await?;
        Ok(pb::MembershipResponse {
            members: Self::members(&status),
        })
    }
}

pub fn event_to_proto(e: &crate::state::StoredEvent) -> pb::HostEvent {
    pb::HostEvent {
        id: e.id,
        mac: e.mac.clone(),
        host: e.host.clone(),
        rack: e.rack.clone(),
        relay: e.relay.clone(),
        kind: e.kind.clone(),
        detail: e.detail.clone(),
        unix_ms: e.unix_ms,
    }
}

type EventStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::HostEvent, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl AdminService for AdminApi {
    type WatchEventsStream = EventStream;
    type WatchJobsStream = super::jobs::JobStream;

    async fn submit_jobs(
        &self,
        req: Request<pb::SubmitJobsRequest>,
    ) -> Result<Response<pb::SubmitJobsResponse>, Status> {
        Ok(Response::new(
            super::jobs::submit(&self.node, req.into_inner()).await?,
        ))
    }

    async fn list_jobs(
        &self,
        req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        Ok(Response::new(
            super::jobs::list(&self.node, req.into_inner()).await?,
        ))
    }

    async fn get_job(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::JobResponse>, Status> {
        Ok(Response::new(
            super::jobs::get(&self.node, req.into_inner()).await?,
        ))
    }

    async fn cancel_job(
        &self,
        req: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::JobResponse>, Status> {
        Ok(Response::new(
            super::jobs::cancel(&self.node, req.into_inner()).await?,
        ))
    }

    async fn watch_jobs(
        &self,
        req: Request<pb::WatchJobsRequest>,
    ) -> Result<Response<Self::WatchJobsStream>, Status> {
        Ok(Response::new(super::jobs::watch(
            &self.node,
            req.into_inner(),
        )?))
    }

    async fn list_events(
        &self,
        req: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsResponse>, Status> {
        let r = req.into_inner();
        self.barrier(r.consistency).await?;
        let limit = match r.limit {
            0 => 100,
            n => n.min(1000) as usize,
        };
        let mac = (!r.mac.is_empty()).then_some(r.mac.as_str());
        let events = self.node.state().events(mac, r.after_id, limit)?;
        Ok(Response::new(pb::ListEventsResponse {
            events: events.iter().map(event_to_proto).collect(),
        }))
    }

    async fn watch_events(
        &self,
        req: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let r = req.into_inner();
        let node = self.node.clone();
        let state = node.state().clone();
        let mut last = if r.after_id == 0 {
            state.last_event_id()?
        } else {
            r.after_id
        };
        let mac = (!r.mac.is_empty()).then_some(r.mac);
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(async move {
            let mut applied = node.applied_watch();
            loop {
                let batch = match state.events(mac.as_deref(), last, 500) {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                        return;
                    }
                };
                let full = batch.len() == 500;
                for e in &batch {
                    last = e.id;
                    if tx.send(Ok(event_to_proto(e))).await.is_err() {
                        return;
                    }
                }
                if full {
                    continue;
                }
                tokio::select! {
                    r = applied.changed() => if r.is_err() { return },
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn cluster_status(
        &self,
        _req: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let s = self.node.status().await?;
        Ok(Response::new(pb::ClusterStatusResponse {
            node_id: s.id,
            leader_id: s.leader_id,
            term: s.term,
            role: s.role.clone(),
            applied_index: s.applied,
            commit_index: s.commit,
            first_index: s.first_index,
            last_index: s.last_index,
            snapshot_index: s.snapshot_index,
            revision: s.revision,
            members: Self::members(&s),
            version: env!("CARGO_PKG_VERSION").to_string(),
            raft_messages_received: s.messages_received,
            removed: s.removed,
        }))
    }

    async fn add_member(
        &self,
        req: Request<pb::AddMemberRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        let r = req.into_inner();
        if r.id == 0 {
            return Err(Status::invalid_argument(
                "member id must be a positive integer",
            ));
        }
        if r.address.parse::<std::net::SocketAddr>().is_err() && !r.address.contains(':') {
            return Err(Status::invalid_argument(format!(
                "member address {:?} must be host:port",
                r.address
            )));
        }
        let status = self.node.status().await?;
        if status
            .members
            .iter()
            .any(|m| m.id == r.id && m.learner == r.learner)
        {
            return Err(Status::already_exists(format!(
                "node {} is already a member",
                r.id
            )));
        }
        let mut cc = ConfChange {
            node_id: r.id,
            ..Default::default()
        };
        cc.set_change_type(if r.learner {
            ConfChangeType::AddLearnerNode
        } else {
            ConfChangeType::AddNode
        });
        cc.context = r.address.clone().into_bytes().into();
        info!(member = r.id, address = %r.address, learner = r.learner, "adding cluster member");
        Ok(Response::new(self.change_membership(cc).await?))
    }

    async fn remove_member(
        &self,
        req: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        let r = req.into_inner();
        let status = self.node.status().await?;
        if !status.members.iter().any(|m| m.id == r.id) {
            return Err(Status::not_found(format!("node {} is not a member", r.id)));
        }
        if status.members.iter().filter(|m| !m.learner).count() == 1
            && !status.members.iter().any(|m| m.id == r.id && m.learner)
        {
            return Err(Status::failed_precondition(
                "refusing to remove the last voting member",
            ));
        }
        let mut cc = ConfChange {
            node_id: r.id,
            ..Default::default()
        };
        cc.set_change_type(ConfChangeType::RemoveNode);
        info!(member = r.id, "removing cluster member");
        Ok(Response::new(self.change_membership(cc).await?))
    }

    async fn transfer_leader(
        &self,
        req: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::TransferLeaderResponse>, Status> {
        let to = req.into_inner().id;
        let status = self.node.status().await?;
        if !status.members.iter().any(|m| m.id == to && !m.learner) {
            return Err(Status::invalid_argument(format!(
                "node {to} is not a voting member"
            )));
        }
        self.node.transfer_leader(to).await?;
        // Leadership moves within an election timeout; report what happened.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let s = self.node.status().await?;
            if s.leader_id == to {
                return Ok(Response::new(pb::TransferLeaderResponse { leader_id: to }));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Status::deadline_exceeded(format!(
                    "leadership did not move to node {to} within 5 s (leader is {})",
                    s.leader_id
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn put(&self, req: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let obj = req.into_inner().object.unwrap_or_default();
        let rec = self.record_from_object(&obj)?;
        Ok(Response::new(self.put_one(rec).await?))
    }

    async fn apply(
        &self,
        req: Request<pb::ApplyRequest>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        let r = req.into_inner();
        if r.objects.is_empty() {
            return Err(Status::invalid_argument("apply needs at least one object"));
        }
        if r.objects.len() > 10_000 {
            return Err(Status::invalid_argument(
                "apply takes at most 10000 objects per call",
            ));
        }
        let records = r
            .objects
            .iter()
            .enumerate()
            .map(|(i, o)| {
                self.record_from_object(o)
                    .map_err(|e| Status::invalid_argument(format!("object {}: {e}", i + 1)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        super::images::check_manifests(&self.blobs, &records).await?;
        let cmd = Command::Put(records);
        let out = if r.dry_run {
            self.node.read_barrier().await?;
            self.node
                .state()
                .execute(&cmd, None)?
                .map_err(CoordError::from)?
        } else {
            self.node.propose(&cmd).await?
        };
        Ok(Response::new(pb::ApplyResponse {
            results: out
                .results
                .iter()
                .map(|i| pb::ApplyResult {
                    kind: kind_to_proto(i.kind) as i32,
                    name: i.name.clone(),
                    outcome: outcome_to_proto(i.outcome) as i32,
                })
                .collect(),
            revision: out.revision,
        }))
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        let r = req.into_inner();
        let kind = kind_from_proto(r.kind)?;
        self.barrier(r.consistency).await?;
        let state = self.node.state();
        let revision = state.revision()?;
        match state.get(kind, &r.name)? {
            Some(rec) => Ok(Response::new(pb::GetResponse {
                object: Some(record_to_proto(&rec)),
                revision,
            })),
            None => Err(CoordError::from(StateError::NotFound {
                kind: kind.to_string(),
                name: r.name,
            })
            .into()),
        }
    }

    async fn list(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let r = req.into_inner();
        let kind = kind_from_proto(r.kind)?;
        self.barrier(r.consistency).await?;
        let state = self.node.state();
        let revision = state.revision()?;
        let objects = state
            .list(kind)?
            .iter()
            .filter(|rec| r.rack.is_empty() || rec.rack() == Some(r.rack.as_str()))
            .map(record_to_proto)
            .collect();
        Ok(Response::new(pb::ListResponse { objects, revision }))
    }

    async fn delete(
        &self,
        req: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let r = req.into_inner();
        let kind = kind_from_proto(r.kind)?;
        if matches!(kind, Kind::Job | Kind::Relay) {
            return Err(Status::invalid_argument(format!(
                "{kind} records are not deleted through this call"
            )));
        }
        let out = self
            .node
            .propose(&Command::Delete { kind, name: r.name })
            .await?;
        let outcome = out
            .results
            .first()
            .map(|r| outcome_to_proto(r.outcome))
            .unwrap_or_default();
        Ok(Response::new(pb::DeleteResponse {
            outcome: outcome as i32,
            revision: out.revision,
        }))
    }

    async fn stat_blob(
        &self,
        req: Request<pb::StatBlobRequest>,
    ) -> Result<Response<pb::StatBlobResponse>, Status> {
        Ok(Response::new(
            super::images::stat(&self.blobs, req.into_inner()).await?,
        ))
    }

    async fn push_blob(
        &self,
        req: Request<tonic::Streaming<pb::BlobUpload>>,
    ) -> Result<Response<pb::PushBlobResponse>, Status> {
        Ok(Response::new(
            super::images::push(&self.blobs, &self.metrics, req.into_inner()).await?,
        ))
    }

    async fn import_image(
        &self,
        req: Request<pb::ImportImageRequest>,
    ) -> Result<Response<pb::ImportImageResponse>, Status> {
        let req = req.into_inner();
        let files = super::images::import_plan(&req)?;
        let tls = crate::cloudstack::client::tls_config(None)
            .map_err(|e| CoordError::Config(format!("TLS for image import: {e}")))?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .connect_timeout(Duration::from_secs(15))
            .redirect(reqwest::redirect::Policy::limited(5))
            .build()
            .map_err(|e| CoordError::Config(format!("HTTP client for image import: {e}")))?;
        let mut image_files = Vec::with_capacity(files.len());
        let mut downloaded = 0;
        for (url, path, mode) in &files {
            let (digest, size) = super::images::import_url(&http, &self.blobs, url).await?;
            tracing::info!(image = %req.name, %url, path, %digest, size, "image file imported");
            downloaded += size;
            image_files.push(pb::ImageFile {
                path: path.clone(),
                digest: digest.to_string(),
                size,
                mode: *mode,
            });
        }
        let manifest = pb::ImageManifest {
            name: req.name.clone(),
            files: image_files,
            ..Default::default()
        };
        let rec = Record::Image(image_from_proto(&manifest)?);
        let put = self.put_one(rec).await?;
        let image = match put.object {
            Some(pb::Object {
                record: Some(pb::object::Record::Image(i)),
            }) => Some(i),
            _ => Some(manifest),
        };
        Ok(Response::new(pb::ImportImageResponse {
            image,
            outcome: put.outcome,
            revision: put.revision,
            bytes_downloaded: downloaded,
        }))
    }

    async fn cloud_stack_sync(
        &self,
        req: Request<pb::CloudStackSyncRequest>,
    ) -> Result<Response<pb::CloudStackStatusResponse>, Status> {
        Ok(Response::new(
            super::cloudstack::sync(self.cloudstack.as_ref(), req.into_inner()).await?,
        ))
    }

    async fn cloud_stack_status(
        &self,
        _req: Request<pb::CloudStackStatusRequest>,
    ) -> Result<Response<pb::CloudStackStatusResponse>, Status> {
        Ok(Response::new(super::cloudstack::status(
            self.cloudstack.as_ref(),
        )?))
    }
}
