//! Inbound Raft RPCs: the `RaftTransport` gRPC service, handing requests to openraft.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};

use openraft::Vote;

use super::incarnation;
use super::marker::Identity;
use super::network::REMIND;
use super::{
    decode, encode, NodeId, Raft, TypeConfig, CLUSTER_ID_HEADER, INCARNATION_HEADER,
    TARGET_INCARNATION_HEADER,
};
use crate::error::Error;
use crate::proto::raft_v1::raft_transport_server::RaftTransport;
use crate::proto::raft_v1::RaftPayload;

pub struct RaftService {
    raft: Raft,
    me: Identity,
    /// How to bring this node back when the cluster knows another incarnation of it.
    recovery: String,
    /// When a refusal of each peer was last logged.
    refusals: Mutex<HashMap<NodeId, Instant>>,
}

/// Every Raft request names its sender in the vote it carries.
trait Sent {
    fn vote(&self) -> &Vote<NodeId>;

    fn sender(&self) -> NodeId {
        self.vote().leader_id().voted_for().unwrap_or_default()
    }
}

impl Sent for AppendEntriesRequest<TypeConfig> {
    fn vote(&self) -> &Vote<NodeId> {
        &self.vote
    }
}

impl Sent for VoteRequest<NodeId> {
    fn vote(&self) -> &Vote<NodeId> {
        &self.vote
    }
}

impl Sent for InstallSnapshotRequest<TypeConfig> {
    fn vote(&self) -> &Vote<NodeId> {
        &self.vote
    }
}

/// TimeoutNow carries the vote of the leader asking.
impl Sent for Vote<NodeId> {
    fn vote(&self) -> &Vote<NodeId> {
        self
    }
}

impl RaftService {
    /// `recovery` is appended to the refusal of a request meant for another
    /// incarnation of this node: what the operator must do.
    pub fn new(raft: Raft, me: Identity, recovery: String) -> Self {
        RaftService {
            raft,
            me,
            recovery,
            refusals: Mutex::default(),
        }
    }

    /// Rejects peers of another cluster before anything reaches the log, and
    /// requests that do not fit the incarnations the membership records.
    fn admit<T: DeserializeOwned + Sent>(&self, req: Request<RaftPayload>) -> Result<T, Status> {
        let meta = req.metadata();
        let theirs = meta
            .get(CLUSTER_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if theirs != self.me.cluster_id {
            return Err(Error::FailedPrecondition(format!(
                "peer belongs to cluster {theirs:?}, this node to {:?}",
                self.me.cluster_id
            ))
            .into());
        }
        let target = incarnation::header(meta, TARGET_INCARNATION_HEADER);
        let msg: T = decode(&req.into_inner().data)
            .map_err(|e| Error::InvalidArgument(format!("undecodable raft message: {e}")))?;
        let sender = msg.sender();
        match incarnation::check(self.me.node_id, self.me.incarnation, target) {
            Ok(()) => Ok(msg),
            Err(e) => {
                let why = format!("{e}. {}", self.recovery);
                self.log_refusal(sender, &why);
                Err(Error::FailedPrecondition(why).into())
            }
        }
    }

    /// A refused peer keeps retrying: log it when it starts and every `REMIND`.
    fn log_refusal(&self, sender: NodeId, why: &str) {
        let mut last = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if last
            .get(&sender)
            .is_none_or(|t| now.duration_since(*t) >= REMIND)
        {
            last.insert(sender, now);
            tracing::warn!("refused a raft request from node {sender}: {why}");
        }
    }

    /// Replies state this node's incarnation, from which the leader learns it.
    fn reply<T: Serialize>(&self, v: &T) -> Result<Response<RaftPayload>, Status> {
        let data = encode(v).map_err(|e| Error::Internal(format!("encode raft reply: {e}")))?;
        let mut r = Response::new(RaftPayload { data });
        r.metadata_mut()
            .insert(INCARNATION_HEADER, MetadataValue::from(self.me.incarnation));
        Ok(r)
    }
}

#[tonic::async_trait]
impl RaftTransport for RaftService {
    async fn append_entries(
        &self,
        req: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let rpc = self.admit(req)?;
        self.reply(&self.raft.append_entries(rpc).await)
    }

    async fn vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let rpc = self.admit(req)?;
        self.reply(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        req: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let rpc = self.admit(req)?;
        self.reply(&self.raft.install_snapshot(rpc).await)
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
        self.reply(&())
    }
}
