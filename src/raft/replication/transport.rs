//! Inbound Raft RPCs: the `RaftTransport` gRPC service, handing requests to openraft.

use std::time::Duration;

use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, VoteRequest,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::{Request, Response, Status};

use openraft::Vote;

use super::peer_trust::{members, MembersRequest, PeerTrust};
use crate::peers::Reminders;
use crate::raft::liveness::election::{answer_pre_vote, Contact, PreVoteRequest};
use crate::raft::liveness::incarnation;
use crate::raft::storage::marker::Identity;
use crate::raft::{
    decode, encode, NodeId, Raft, TypeConfig, CLIENT_ADDRESS_HEADER, CLUSTER_ID_HEADER,
    EARLY_HEADER, INCARNATION_HEADER, TARGET_INCARNATION_HEADER,
};

/// How long an early AppendEntries waits for the one it follows
/// ([`RaftService::await_prev`]); then it is refused as out of order.
const EARLY_WAIT: Duration = Duration::from_millis(200);
use crate::error::Error;
use crate::proto::raft_v1::raft_transport_server::RaftTransport;
use crate::proto::raft_v1::RaftPayload;

pub struct RaftService {
    raft: Raft,
    me: Identity,
    /// This node's client address, stated in every reply (None if it cannot
    /// be a header value, which a valid `host:port` always can).
    client_addr: Option<MetadataValue<Ascii>>,
    /// Refreshed by every message from a leader this node accepts.
    contact: Contact,
    /// How to bring this node back when the cluster knows another incarnation of it.
    recovery: String,
    /// When a refusal of each peer was last logged.
    refusals: Reminders<NodeId>,
    /// Who may send what: the sender a message claims is checked here.
    trust: PeerTrust,
}

/// Every Raft request names its sender: in the vote it carries, or outright.
trait Sent {
    fn sender(&self) -> NodeId;
}

fn voted_for(v: &Vote<NodeId>) -> NodeId {
    v.leader_id().voted_for().unwrap_or_default()
}

impl Sent for AppendEntriesRequest<TypeConfig> {
    fn sender(&self) -> NodeId {
        voted_for(&self.vote)
    }
}

impl Sent for VoteRequest<NodeId> {
    fn sender(&self) -> NodeId {
        voted_for(&self.vote)
    }
}

impl Sent for InstallSnapshotRequest<TypeConfig> {
    fn sender(&self) -> NodeId {
        voted_for(&self.vote)
    }
}

impl Sent for MembersRequest {
    fn sender(&self) -> NodeId {
        self.asker
    }
}

impl Sent for PreVoteRequest {
    fn sender(&self) -> NodeId {
        self.candidate
    }
}

/// TimeoutNow carries the vote of the leader asking.
impl Sent for Vote<NodeId> {
    fn sender(&self) -> NodeId {
        voted_for(self)
    }
}

impl RaftService {
    /// `recovery` is appended to the refusal of a request meant for another
    /// incarnation of this node: what the operator must do.
    pub fn new(
        raft: Raft,
        me: Identity,
        client_addr: &str,
        contact: Contact,
        recovery: String,
        trust: PeerTrust,
    ) -> Self {
        RaftService {
            raft,
            me,
            client_addr: MetadataValue::try_from(client_addr).ok(),
            contact,
            recovery,
            refusals: Reminders::default(),
            trust,
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
        let (_, extensions, payload) = req.into_parts();
        let msg: T = decode(&payload.data)
            .map_err(|e| Error::InvalidArgument(format!("undecodable raft message: {e}")))?;
        let sender = msg.sender();
        self.trust.check_sender(&extensions, sender)?;
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
        if self.refusals.due(sender) {
            tracing::warn!("refused a raft request from node {sender}: {why}");
        }
    }

    /// A leader sends entries to a far follower without waiting for the
    /// answer to the ones before ([`super::pipeline`]), and requests that left
    /// in order may be taken up here out of order. An early request whose
    /// previous entry is not in the log yet waits a little for the request
    /// that carries it, instead of being refused at once.
    async fn await_prev(&self, rpc: &AppendEntriesRequest<TypeConfig>) {
        let Some(prev) = rpc.prev_log_id.map(|p| p.index) else {
            return;
        };
        let mut metrics = self.raft.metrics();
        let _ = tokio::time::timeout(
            EARLY_WAIT,
            metrics.wait_for(|m| m.last_log_index >= Some(prev)),
        )
        .await;
    }

    /// Replies state this node's incarnation and client address, from which
    /// the leader learns them.
    fn reply<T: Serialize>(&self, v: &T) -> Result<Response<RaftPayload>, Status> {
        let data = encode(v).map_err(|e| Error::Internal(format!("encode raft reply: {e}")))?;
        let mut r = Response::new(RaftPayload { data });
        let meta = r.metadata_mut();
        meta.insert(INCARNATION_HEADER, MetadataValue::from(self.me.incarnation));
        if let Some(addr) = &self.client_addr {
            meta.insert(CLIENT_ADDRESS_HEADER, addr.clone());
        }
        Ok(r)
    }
}

#[tonic::async_trait]
impl RaftTransport for RaftService {
    async fn append_entries(
        &self,
        req: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let early = req.metadata().contains_key(EARLY_HEADER);
        let rpc: AppendEntriesRequest<TypeConfig> = self.admit(req)?;
        if early {
            self.await_prev(&rpc).await;
        }
        let answer = self.raft.append_entries(rpc).await;
        if matches!(&answer, Ok(r) if !matches!(r, AppendEntriesResponse::HigherVote(_))) {
            self.contact.touch();
        }
        self.reply(&answer)
    }

    async fn vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let rpc = self.admit(req)?;
        let answer = self.raft.vote(rpc).await;
        if matches!(&answer, Ok(r) if r.vote_granted) {
            self.contact.voted();
        }
        self.reply(&answer)
    }

    async fn pre_vote(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let rpc: PreVoteRequest = self.admit(req)?;
        self.reply(&answer_pre_vote(&self.raft, &self.contact, &rpc))
    }

    async fn members(&self, req: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let _: MembersRequest = self.admit(req)?;
        self.reply(&members(&self.raft))
    }

    async fn install_snapshot(
        &self,
        req: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let rpc = self.admit(req)?;
        let answer = self.raft.install_snapshot(rpc).await;
        if answer.is_ok() {
            self.contact.touch();
        }
        self.reply(&answer)
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

/// Hands `req` to `service` as the gRPC server would.
#[cfg(feature = "sim")]
pub async fn dispatch(
    service: &RaftService,
    method: crate::peers::Method,
    req: Request<RaftPayload>,
) -> Result<Response<RaftPayload>, Status> {
    match method {
        crate::peers::Method::AppendEntries => service.append_entries(req).await,
        crate::peers::Method::Vote => service.vote(req).await,
        crate::peers::Method::InstallSnapshot => service.install_snapshot(req).await,
        crate::peers::Method::PreVote => service.pre_vote(req).await,
        crate::peers::Method::Members => service.members(req).await,
        crate::peers::Method::TimeoutNow => service.timeout_now(req).await,
    }
}
