//! RelayService: the contract relays sync over. Authorization (relay
//! certificates only, rack from the certificate) is enforced by the auth layer
//! and `rack_of`; the streaming sync itself is delivered by the relay-sync work
//! and answers UNIMPLEMENTED until then, so a relay fails loudly, not silently.

use std::pin::Pin;

use futures::Stream;
use pxemesh_certs::Role;
use pxemesh_proto::v1 as pb;
use pxemesh_proto::v1::relay_service_server::RelayService;
use tonic::{Request, Response, Status};

use super::auth::peer;

pub struct RelayApi;

/// The rack a relay may see: only the one named in its certificate.
pub fn rack_of<T>(req: &Request<T>) -> Result<(String, String), Status> {
    match peer(req)?.role {
        Role::Relay { rack, name } => Ok((rack, name)),
        _ => Err(Status::permission_denied(
            "RelayService is for relay certificates",
        )),
    }
}

fn not_yet<T>(req: &Request<T>, what: &str) -> Status {
    let who = rack_of(req)
        .map(|(r, n)| format!("relay {n} of rack {r}"))
        .unwrap_or_default();
    Status::unimplemented(format!(
        "RelayService/{what} is not served by this coordinator version ({who})"
    ))
}

type Stream2<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl RelayService for RelayApi {
    type WatchStream = Stream2<pb::WatchResponse>;
    type FetchBlobStream = Stream2<pb::BlobChunk>;

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(not_yet(&req, "Watch"))
    }
    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        Err(not_yet(&req, "Heartbeat"))
    }
    async fn lease_jobs(
        &self,
        req: Request<pb::LeaseJobsRequest>,
    ) -> Result<Response<pb::LeaseJobsResponse>, Status> {
        Err(not_yet(&req, "LeaseJobs"))
    }
    async fn report_job(
        &self,
        req: Request<pb::ReportJobRequest>,
    ) -> Result<Response<pb::ReportJobResponse>, Status> {
        Err(not_yet(&req, "ReportJob"))
    }
    async fn report_boot_events(
        &self,
        req: Request<pb::ReportBootEventsRequest>,
    ) -> Result<Response<pb::ReportBootEventsResponse>, Status> {
        Err(not_yet(&req, "ReportBootEvents"))
    }
    async fn fetch_blob(
        &self,
        req: Request<pb::FetchBlobRequest>,
    ) -> Result<Response<Self::FetchBlobStream>, Status> {
        Err(not_yet(&req, "FetchBlob"))
    }
}
