//! Inbound Raft RPCs: the `RaftTransport` gRPC service, handing requests to openraft.

use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::{Request, Response, Status};

use openraft::Vote;

use super::{decode, encode, NodeId, Raft, CLUSTER_ID_HEADER};
use crate::error::Error;
use crate::proto::raft_v1::raft_transport_server::RaftTransport;
use crate::proto::raft_v1::RaftPayload;

pub struct RaftService {
    raft: Raft,
    cluster_id: String,
}

impl RaftService {
    pub fn new(raft: Raft, cluster_id: String) -> Self {
        RaftService { raft, cluster_id }
    }

    /// Rejects peers of another cluster before anything reaches the log.
    fn admit<T: DeserializeOwned>(&self, req: Request<RaftPayload>) -> Result<T, Status> {
        let theirs = req
            .metadata()
            .get(CLUSTER_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if theirs != self.cluster_id {
            return Err(Error::FailedPrecondition(format!(
                "peer belongs to cluster {theirs:?}, this node to {:?}",
                self.cluster_id
            ))
            .into());
        }
        decode(&req.into_inner().data)
            .map_err(|e| Error::InvalidArgument(format!("undecodable raft message: {e}")).into())
    }
}

fn reply<T: Serialize>(v: &T) -> Result<Response<RaftPayload>, Status> {
    let data = encode(v).map_err(|e| Error::Internal(format!("encode raft reply: {e}")))?;
    Ok(Response::new(RaftPayload { data }))
}

#[tonic::async_trait]
impl RaftTransport for RaftService {
    async fn append_entries(
        &self,
        req: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let rpc = self.admit(req)?;
        reply(&self.raft.append_entries(rpc).await)
    }

    async fn vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let rpc = self.admit(req)?;
        reply(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        req: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let rpc = self.admit(req)?;
        reply(&self.raft.install_snapshot(rpc).await)
    }

    async fn timeout_now(
        &self,
        req: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let leader_vote: Vote<NodeId> = self.admit(req)?;
        let mine = self.raft.metrics().borrow().vote;
        if mine != leader_vote {
            return Err(Error::FailedPrecondition(format!(
                "asked to take over from leader vote {leader_vote}, but this node follows {mine}"
            ))
            .into());
        }
        self.raft
            .trigger()
            .elect()
            .await
            .map_err(|e| Error::Unavailable(format!("raft stopped: {e}")))?;
        reply(&())
    }
}
