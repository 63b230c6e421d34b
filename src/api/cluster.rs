//! The `Cluster` gRPC service: membership and Raft progress of the node asked.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::{ChangeMembers, ServerState};
use tonic::{Request, Response, Status};

use crate::config::parse_initial_cluster;
use crate::error::Error;
use crate::peers::Peers;
use crate::proto::v1 as pb;
use crate::proto::v1::cluster_client::ClusterClient;
use crate::proto::v1::cluster_server::Cluster;
use crate::raft::liveness::autopilot::{wait_stable, Policy};
use crate::raft::liveness::election::Contact;
use crate::raft::liveness::leadership::{lag_entries, transfer, TRANSFER_LIMIT};
use crate::raft::liveness::membership::{when_settled, ChangeError};
use crate::raft::proposer::Proposer;
use crate::raft::storage::marker::Identity;
use crate::raft::storage::state_machine::StateMachine;
use crate::raft::{Node, NodeId, Raft};
use crate::registry::watch::SharedState;

const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(30);
/// A backup goes out in pieces of this size.
const BACKUP_CHUNK: usize = 1 << 20;
/// A new member must catch up with the log (or take a snapshot) within this.
pub const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);
/// How often autopilot looks whether a node being added is still caught up.
const STABLE_POLL: Duration = Duration::from_millis(100);
/// How long a membership change waits for another one under way.
const MEMBERSHIP_WAIT: Duration = Duration::from_secs(10);
/// How long a node being added may take to answer its first Status.
const STARTING_NODE_WAIT: Duration = Duration::from_secs(10);

/// What this node tells others to dial.
pub struct Advertised {
    /// Its client address (`--advertise`), if set.
    pub client: Option<String>,
    /// Its peer address (`--peer-advertise`, else `--peer-listen`).
    pub peer: String,
}

pub struct ClusterApi {
    raft: Raft,
    /// This node's data directory: cluster, node id and incarnation.
    me: Identity,
    advertised: Advertised,
    state: SharedState,
    proposer: Arc<Proposer>,
    peers: Peers,
    contact: Contact,
    state_machine: StateMachine,
    /// `[autopilot]`: a node added becomes a voter once stable.
    autopilot: Option<Policy>,
}

impl ClusterApi {
    pub fn new(
        raft: Raft,
        me: Identity,
        advertised: Advertised,
        proposer: Arc<Proposer>,
        peers: Peers,
        contact: Contact,
        state_machine: StateMachine,
    ) -> Self {
        ClusterApi {
            raft,
            me,
            advertised,
            state: state_machine.state(),
            proposer,
            peers,
            contact,
            state_machine,
            autopilot: None,
        }
    }

    pub fn with_autopilot(mut self, policy: Option<Policy>) -> Self {
        self.autopilot = policy;
        self
    }

    fn members(&self) -> Vec<pb::Member> {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let leading = m.current_leader == Some(self.me.node_id);
        let rtts = self.peers.rtts();
        let contacts = self.peers.last_contacts();
        let acknowledged = |id: &NodeId| {
            m.replication
                .as_ref()
                .and_then(|r| r.get(id).copied().flatten())
                .map(|l| l.index)
        };
        membership
            .nodes()
            .map(|(id, node)| pb::Member {
                id: *id,
                address: node.addr.clone(),
                peer_address: node.peer_addr.clone(),
                voter: membership.voter_ids().any(|v| v == *id),
                acknowledged_index: acknowledged(id),
                incarnation: node.incarnation,
                rtt_ms: rtts
                    .get(id)
                    .filter(|_| leading)
                    .map(|d| d.as_secs_f64() * 1000.0),
                last_contact_ms: contacts
                    .get(id)
                    .filter(|_| leading && *id != self.me.node_id)
                    .map(|d| d.as_secs_f64() * 1000.0),
                lag_entries: lag_entries(&m, *id),
                replica: node.replica,
            })
            .collect()
    }

    /// Refuses to change what kind of member node `id` is: a voter made a
    /// replica would leave the quorum unannounced, and a replica made a voter
    /// would keep its record saying it never votes. A learner an earlier
    /// `AddMember` left on its way to a vote may go on to one, not become a
    /// replica: adding a node keeps the record it has.
    fn same_kind(&self, id: NodeId, replica: bool) -> Result<(), Error> {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voter = membership.voter_ids().any(|v| v == id);
        let record = membership.get_node(&id).map(|n| n.replica);
        let remove = format!("remove it first (roster member remove --id {id}), then add it");
        match (replica, voter, record) {
            (true, true, _) => Err(Error::FailedPrecondition(format!(
                "node {id} is a voter, not a replica: {remove} with --replica"
            ))),
            (true, false, Some(false)) => Err(Error::FailedPrecondition(format!(
                "node {id} is a learner on its way to becoming a voter: {remove} with --replica"
            ))),
            (false, _, Some(true)) => Err(Error::FailedPrecondition(format!(
                "node {id} is a read replica: {remove} without --replica to make it a voter"
            ))),
            _ => Ok(()),
        }
    }

    /// The member record of the node serving clients at `addr`, which must be
    /// node `id` of this cluster: its peer address and data-directory
    /// incarnation, as it states them. A node just started may not listen yet:
    /// it is asked again for a while.
    async fn joining(&self, id: NodeId, addr: &str) -> Result<Node, Error> {
        let timeout = self.proposer.timeout();
        // With TLS, the node's own certificate is its client certificate.
        let ch = self
            .peers
            .channel(addr)
            .map_err(|e| Error::InvalidArgument(format!("address {addr}: {e}")))?;
        let deadline = tokio::time::Instant::now() + STARTING_NODE_WAIT;
        let s = loop {
            let mut req = Request::new(pb::StatusRequest::default());
            req.set_timeout(timeout);
            match ClusterClient::new(ch.clone()).status(req).await {
                Ok(s) => break s.into_inner(),
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(Error::Unavailable(format!(
                        "cannot ask node {id} at {addr} for its status (is it running?): {}",
                        e.message()
                    )))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        if s.node_id != id || s.cluster_id != self.me.cluster_id {
            return Err(Error::FailedPrecondition(format!(
                "the node at {addr} is node {} of cluster {:?}, not node {id} of {:?}",
                s.node_id, s.cluster_id, self.me.cluster_id
            )));
        }
        if !s.advertise_address.is_empty() && s.advertise_address != addr {
            return Err(Error::FailedPrecondition(format!(
                "node {id} advertises {}, not {addr}: add it with --address {} \
                 (or restart it with --advertise {addr})",
                s.advertise_address, s.advertise_address
            )));
        }
        let known = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&id)
            .map_or(0, |n| n.incarnation);
        if known != 0 && known != s.incarnation {
            return Err(Error::FailedPrecondition(format!(
                "node {id} is a member with data-directory incarnation {known}, but the node at \
                 {addr} has incarnation {}: its state is not that member's; remove node {id} \
                 first (roster member remove --id {id}), then add it",
                s.incarnation
            )));
        }
        let peer_addr = s.peer_advertise_address;
        let dialable = peer_addr
            .rsplit_once(':')
            .is_some_and(|(host, _)| !matches!(host, "0.0.0.0" | "[::]" | "::" | ""));
        if !dialable {
            return Err(Error::FailedPrecondition(format!(
                "node {id} gives {peer_addr:?} as its peer address, which peers cannot dial: \
                 restart it with --peer-advertise host:port"
            )));
        }
        Ok(Node {
            addr: addr.to_string(),
            peer_addr,
            incarnation: s.incarnation,
            replica: false,
        })
    }

    fn voters(&self) -> BTreeSet<NodeId> {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect()
    }

    /// Commits the voter set `edit` makes of the current one, once no other
    /// change is under way; the answer is the resulting membership.
    async fn change(
        &self,
        edit: impl Fn(&mut BTreeSet<NodeId>),
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        when_settled(&self.raft, MEMBERSHIP_WAIT, || {
            let mut voters = self.voters();
            edit(&mut voters);
            self.raft.change_membership(voters, false)
        })
        .await
        .map_err(membership_error)?;
        Ok(self.membership())
    }

    /// Removes learner `id` (a replica) from the membership, once no other
    /// change is under way. Its removal changes no voter configuration.
    async fn remove_learner(&self, id: NodeId) -> Result<Response<pb::MembershipResponse>, Status> {
        when_settled(&self.raft, MEMBERSHIP_WAIT, || {
            let gone = ChangeMembers::RemoveNodes(BTreeSet::from([id]));
            self.raft.change_membership(gone, false)
        })
        .await
        .map_err(membership_error)?;
        Ok(self.membership())
    }

    /// The answer to a membership change: the membership now.
    fn membership(&self) -> Response<pb::MembershipResponse> {
        Response::new(pb::MembershipResponse {
            members: self.members(),
        })
    }
}

fn membership_error(e: ChangeError) -> Error {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => {
            Error::Unavailable("leadership moved during the membership change; retry".into())
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(
            ChangeMembershipError::InProgress(e),
        )) => Error::Unavailable(format!(
            "another membership change did not commit within {MEMBERSHIP_WAIT:?} ({e}): \
             check that a majority of the voters is up, then retry"
        )),
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            Error::FailedPrecondition(e.to_string())
        }
        RaftError::Fatal(e) => Error::Unavailable(format!("raft stopped: {e}")),
    }
}

/// This node's role; `own` is its record in the membership, if a member.
fn role(s: ServerState, own: Option<&Node>) -> &'static str {
    match s {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner if own.is_some_and(|n| n.replica) => "replica",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

type BackupStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::SnapshotChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Cluster for ClusterApi {
    type SaveSnapshotStream = BackupStream;

    /// On the leader after a read index, so the copy holds every write
    /// acknowledged before the call; a follower's refusal is forwarded.
    async fn save_snapshot(
        &self,
        _req: Request<pb::SaveSnapshotRequest>,
    ) -> Result<Response<BackupStream>, Status> {
        self.proposer.read_index().await?;
        let sm = self.state_machine.clone();
        let bytes = tokio::task::spawn_blocking(move || sm.backup())
            .await
            .map_err(|e| Error::Internal(format!("backup task: {e}")))??;
        let chunks: Vec<Result<pb::SnapshotChunk, Status>> = bytes
            .chunks(BACKUP_CHUNK)
            .map(|c| Ok(pb::SnapshotChunk { data: c.to_vec() }))
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
    }

    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        if req.into_inner().linearizable {
            self.proposer.read_index().await?;
        }
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let members = self.members();
        let leader = self.contact.leader(&m);
        let leader_address = leader
            .and_then(|l| membership.get_node(&l))
            .map(|n| n.addr.clone())
            .unwrap_or_default();
        let revision = super::read_state(&self.state, |s| s.catalog.revision())?;
        Ok(Response::new(pb::StatusResponse {
            node_id: m.id,
            cluster_id: self.me.cluster_id.clone(),
            leader_id: leader.unwrap_or(0),
            leader_address,
            term: m.current_term,
            role: role(m.state, membership.get_node(&m.id)).to_string(),
            last_log_index: m.last_log_index.unwrap_or(0),
            applied_index: m.last_applied.map_or(0, |l| l.index),
            snapshot_index: m.snapshot.map_or(0, |l| l.index),
            members,
            revision,
            purged_index: m.purged.map_or(0, |l| l.index),
            incarnation: self.me.incarnation,
            advertise_address: self.advertised.client.clone().unwrap_or_default(),
            peer_advertise_address: self.advertised.peer.clone(),
            leader_contact_ms: self
                .contact
                .leader_contact()
                .filter(|_| m.state != ServerState::Leader)
                .map(|d| d.as_secs_f64() * 1000.0),
        }))
    }

    async fn add_member(
        &self,
        req: Request<pb::AddMemberRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        let pb::AddMemberRequest {
            id,
            address: addr,
            replica,
        } = req.into_inner();
        if id == 0 {
            return Err(Error::InvalidArgument("node id must be 1 or more".into()).into());
        }
        parse_initial_cluster(&format!("{id}={addr}"))
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        self.proposer.here()?;
        self.same_kind(id, replica)?;
        let node = Node {
            replica,
            ..self.joining(id, &addr).await?
        };
        let learner = when_settled(&self.raft, MEMBERSHIP_WAIT, || {
            self.raft.add_learner(id, node.clone(), true)
        });
        tokio::time::timeout(CATCH_UP_TIMEOUT, learner)
            .await
            .map_err(|_| {
                Error::Unavailable(format!(
                    "node {id} did not catch up within {CATCH_UP_TIMEOUT:?}"
                ))
            })?
            .map_err(membership_error)?;
        if replica {
            // Caught up, and a learner for good: neither this call nor
            // autopilot makes it a voter.
            return Ok(self.membership());
        }
        if let Some(policy) = self.autopilot {
            let limit = CATCH_UP_TIMEOUT + policy.stabilization;
            let stable = wait_stable(&self.raft, &self.peers, id, policy, STABLE_POLL);
            tokio::time::timeout(limit, stable).await.map_err(|_| {
                Error::Unavailable(format!(
                    "node {id} caught up but did not stay caught up for {:?} within {limit:?}; \
                     it stays a learner: check its link and disk, then add it again",
                    policy.stabilization
                ))
            })?;
        }
        self.change(|voters| {
            voters.insert(id);
        })
        .await
    }

    async fn remove_member(
        &self,
        req: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        let id = req.into_inner().id;
        self.proposer.here()?;
        let learner = {
            let m = self.raft.metrics().borrow().clone();
            let membership = m.membership_config.membership();
            membership.get_node(&id).is_some() && !membership.voter_ids().any(|v| v == id)
        };
        if learner {
            // A replica, or a learner an interrupted AddMember left: it holds
            // no vote, so only its node record goes.
            return self.remove_learner(id).await;
        }
        let mut voters = self.voters();
        if !voters.remove(&id) {
            return Err(Error::NotFound(format!("node {id} is not a member")).into());
        }
        if voters.is_empty() {
            return Err(Error::InvalidArgument("cannot remove the last voter".into()).into());
        }
        if id == self.me.node_id {
            // Openraft 0.9 asserts when a leader commits its own removal: hand
            // leadership on first, and the new leader (to which the refusal
            // below sends this request) removes this node.
            let handed = self
                .proposer
                .hand_over(transfer(&self.raft, &self.me, &self.peers, TRANSFER_LIMIT))
                .await;
            self.proposer.here()?;
            return Err(Error::Unavailable(format!(
                "node {id} leads and could not hand leadership to another voter{}; \
                 retry once another node leads",
                if handed.is_none() { " in time" } else { "" }
            ))
            .into());
        }
        self.change(|voters| {
            voters.remove(&id);
        })
        .await
    }

    async fn snapshot(
        &self,
        _req: Request<pb::SnapshotRequest>,
    ) -> Result<Response<pb::SnapshotResponse>, Status> {
        let applied = self
            .raft
            .metrics()
            .borrow()
            .last_applied
            .map_or(0, |l| l.index);
        let stopped =
            |e: openraft::error::Fatal<u64>| Error::Unavailable(format!("raft stopped: {e}"));
        self.raft.trigger().snapshot().await.map_err(stopped)?;
        let m = self
            .raft
            .wait(Some(SNAPSHOT_TIMEOUT))
            .metrics(
                |m| m.snapshot.is_some_and(|s| s.index >= applied),
                "snapshot built",
            )
            .await
            .map_err(|e| Error::Unavailable(format!("snapshot: {e}")))?;
        let snapshot_index = m.snapshot.map_or(0, |l| l.index);
        self.raft
            .trigger()
            .purge_log(snapshot_index)
            .await
            .map_err(stopped)?;
        // The file's size: reading the snapshot back through openraft would
        // hold its state machine task (and so every apply) for as long as
        // reading a large file takes.
        let size_bytes = self
            .state_machine
            .snapshot_size()
            .map_err(|e| Error::Storage(format!("snapshot file: {e}")))?;
        Ok(Response::new(pb::SnapshotResponse {
            snapshot_index,
            size_bytes,
        }))
    }
}
