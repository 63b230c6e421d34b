//! Outbound Raft RPCs: openraft's network traits over the `RaftTransport` gRPC service.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;

use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError,
    Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::LogId;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::metadata::MetadataValue;
use tonic::Code;

use super::pipeline::{self, Answer, Early, Pipeline, MAX_ENTRIES};
use crate::peers::{Method, Peers, FAR};
use crate::proto::raft_v1::RaftPayload;
use crate::raft::liveness::incarnation::{self, Learned};
use crate::raft::rpc::peer_request;
use crate::raft::storage::log_store::Appends;
use crate::raft::storage::marker::Identity;
use crate::raft::{decode, encode, Node, NodeId, TypeConfig, EARLY_HEADER};

/// An AppendEntries larger than this is split (entries carry up to 128
/// commands each, with metadata).
const MAX_BATCH_BYTES: u64 = 4 * 1024 * 1024;
const MAX_BACKOFF: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct Network {
    me: Arc<Identity>,
    peers: Peers,
    learned: Learned,
    heartbeat: Duration,
    appends: Appends,
}

impl Network {
    /// `me` is this node; the incarnations peers state in their replies are
    /// recorded in `learned`. `heartbeat`: the leader's heartbeat interval.
    /// `appends`: the log store's, which the pipelines follow.
    pub fn new(
        me: Identity,
        peers: Peers,
        learned: Learned,
        heartbeat: Duration,
        appends: Appends,
    ) -> Self {
        Network {
            me: Arc::new(me),
            peers,
            learned,
            heartbeat,
            appends,
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> PeerClient {
        PeerClient {
            link: Link {
                target,
                node: node.clone(),
                me: self.me.clone(),
                peers: self.peers.clone(),
                learned: self.learned.clone(),
            },
            max_entries: None,
            heartbeat: self.heartbeat,
            answered: Arc::default(),
            deferred: Arc::default(),
            pipeline: Arc::default(),
            appends: self.appends.clone(),
            behind: false,
        }
    }
}

/// Requests to one peer.
#[derive(Clone)]
struct Link {
    target: NodeId,
    /// The target as this node's membership recorded it when the client was made.
    node: Node,
    me: Arc<Identity>,
    peers: Peers,
    learned: Learned,
}

/// One of openraft's clients of a peer: a replication stream, a snapshot
/// sender, or a leadership confirmation.
#[derive(Clone)]
pub struct PeerClient {
    link: Link,
    /// Entries per AppendEntries this link has carried in time, once a batch
    /// did not: halved on each such timeout, doubled on each success within
    /// half the deadline.
    max_entries: Option<u64>,
    heartbeat: Duration,
    /// When the peer last answered an AppendEntries of this client (or of
    /// its background heartbeats).
    answered: Arc<Mutex<Option<Instant>>>,
    /// A higher vote a heartbeat sent in the background came back with: the
    /// next call reports it.
    deferred: Arc<Mutex<Option<AppendEntriesResponse<NodeId>>>>,
    /// Early sends of appended entries to the peer (see [`pipeline`]).
    pipeline: Arc<Pipeline>,
    appends: Appends,
    /// The peer was found to lack entries of an earlier term (see
    /// `PeerClient::holds`): it gets them from then on without being asked.
    behind: bool,
}

#[derive(Clone, Copy)]
enum Rpc {
    AppendEntries,
    /// An AppendEntries sent ahead of openraft (see [`pipeline`]).
    EarlyAppend,
    Vote,
    InstallSnapshot,
}

impl Link {
    async fn call<Req, Resp, E>(
        &self,
        rpc: Rpc,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, Node, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let data = encode(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let request = peer_request(
            RaftPayload { data },
            &self.me,
            &self.node,
            option.hard_ttl(),
        )
        .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut request = request;
        let method = match rpc {
            Rpc::AppendEntries => Method::AppendEntries,
            Rpc::EarlyAppend => {
                request
                    .metadata_mut()
                    .insert(EARLY_HEADER, MetadataValue::from_static("1"));
                Method::AppendEntries
            }
            Rpc::Vote => Method::Vote,
            Rpc::InstallSnapshot => Method::InstallSnapshot,
        };
        // The channel is taken anew each call: after a certificate reload it is a new one.
        let reply = self.peers.call(&self.node.peer_addr, method, request).await;
        self.peers.logged(
            self.target,
            &self.node.peer_addr,
            &reply.as_ref().map(|_| ()),
        );
        let reply = reply.map_err(|status| match status.code() {
            // Openraft backs off from an unreachable peer instead of retrying hot;
            // a peer that refuses this node (another cluster, another
            // incarnation) is as good as unreachable. A request that timed
            // out has waited already: it is retried at once, so a slow link
            // is used as fast as it delivers.
            Code::Unavailable | Code::FailedPrecondition => {
                RPCError::Unreachable(Unreachable::new(&status))
            }
            _ => RPCError::Network(NetworkError::new(&status)),
        })?;
        self.learned
            .record(self.target, incarnation::stated(reply.metadata()));
        let result: Result<Resp, RaftError<NodeId, E>> = decode(&reply.into_inner().data)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    /// Sends an early AppendEntries and passes its answer on; one without
    /// success breaks the pipeline's chain.
    async fn send_early(&self, early: Early, pipeline: Weak<Pipeline>) {
        let option = RPCOption::new(early.deadline);
        let reply = tokio::time::timeout(
            early.deadline,
            self.call::<_, AppendEntriesResponse<NodeId>, openraft::error::Infallible>(
                Rpc::EarlyAppend,
                &early.request,
                &option,
            ),
        )
        .await;
        let answer = match reply {
            Ok(Ok(AppendEntriesResponse::Success)) => Answer::Success,
            Ok(Ok(AppendEntriesResponse::HigherVote(v))) => Answer::Higher(v),
            other => {
                let why = match other {
                    Ok(Ok(r)) => r.to_string(),
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "timed out".to_string(),
                };
                tracing::debug!(
                    "early AppendEntries to node {} after {:?} not accepted: {why}",
                    self.target,
                    early.request.prev_log_id,
                );
                if let Some(p) = pipeline.upgrade() {
                    p.break_chain();
                }
                Answer::Failed
            }
        };
        self.peers
            .count_early(self.target, !matches!(answer, Answer::Failed));
        let _ = early.answer.send(Some(answer));
    }
}

impl PeerClient {
    /// Sends an AppendEntries of `n` entries, halving the batch on a link too
    /// slow for it, and samples heartbeat round trips.
    async fn send_append(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
        n: u64,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        if n > 1 {
            let size = bincode::serialized_size(&rpc).unwrap_or(0);
            if size > MAX_BATCH_BYTES {
                let fit = (n * MAX_BATCH_BYTES / size).max(1);
                return Err(RPCError::PayloadTooLarge(
                    PayloadTooLarge::new_entries_hint(fit),
                ));
            }
        }
        let sent = Instant::now();
        let mut probe = (n == 0).then(|| RttProbe {
            peers: self.link.peers.clone(),
            target: self.link.target,
            sent,
        });
        let deadline = batch_deadline(&option);
        let reply = if n > 1 {
            match tokio::time::timeout(deadline, self.link.call(Rpc::AppendEntries, &rpc, &option))
                .await
            {
                Ok(r) => r,
                Err(_) => {
                    let max = (n / 2).max(1);
                    self.max_entries = Some(max);
                    return Err(RPCError::PayloadTooLarge(
                        PayloadTooLarge::new_entries_hint(max),
                    ));
                }
            }
        } else {
            self.link.call(Rpc::AppendEntries, &rpc, &option).await
        };
        match &reply {
            // A batch that made it in half the time may double: loss, not
            // size, is what makes most batches late on a long link, so the
            // cap must not stick at its low after one unlucky stall.
            Ok(_) if sent.elapsed() < deadline / 2 => {
                self.max_entries = self.max_entries.map(|m| m * 2).filter(|m| *m < MAX_ENTRIES);
            }
            // No round trip to learn from a peer that could not be reached.
            Err(RPCError::Unreachable(_)) => probe = None,
            _ => {}
        }
        drop(probe);
        if matches!(&reply, Ok(r) if !matches!(r, AppendEntriesResponse::HigherVote(_))) {
            *self.answered.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        }
        reply
    }
}

impl PeerClient {
    /// Starts feeding this stream's pipeline with the log store's appends,
    /// once; the task ends with the stream.
    fn follow_appends(&self) {
        if !self.pipeline.start_listening() {
            return;
        }
        let (link, weak, appends) = (
            self.link.clone(),
            Arc::downgrade(&self.pipeline),
            self.appends.clone(),
        );
        tokio::spawn(async move {
            let early_weak = weak.clone();
            pipeline::follow(weak, &appends, |early| {
                let (link, weak) = (link.clone(), early_weak.clone());
                tokio::spawn(async move { link.send_early(early, weak).await });
            })
            .await
        });
    }

    /// Sends a heartbeat without waiting for it; a higher vote in its
    /// answer is reported on the next call.
    fn in_background(&self, rpc: AppendEntriesRequest<TypeConfig>, option: RPCOption) {
        let mut bg = self.clone();
        tokio::spawn(async move {
            if let Ok(higher @ AppendEntriesResponse::HigherVote(_)) =
                bg.send_append(rpc, option, 0).await
            {
                *bg.deferred.lock().unwrap_or_else(|p| p.into_inner()) = Some(higher);
            }
        });
    }

    /// Openraft's request `rpc` was answered (`reply`) from an early send
    /// that carried the commit index `carried`: see [`commit_heartbeat`].
    fn pass_commit_on(
        &self,
        rpc: &AppendEntriesRequest<TypeConfig>,
        carried: Option<LogId<NodeId>>,
        reply: &AppendEntriesResponse<NodeId>,
        option: RPCOption,
    ) {
        if let Some(heartbeat) = commit_heartbeat(rpc, carried, reply) {
            self.in_background(heartbeat, option);
        }
    }

    /// A new leader does not know where a follower's log ends: openraft 0.9
    /// searches for it by sending entries from the middle of its log on,
    /// thousands the follower most likely holds already, and its first entry
    /// of the new term commits only after them (a failover with 100,000
    /// instances took 100-200 ms longer than one with none). The last entry
    /// of an earlier term in a request is first asked about with an empty
    /// request: a follower that holds it holds every entry before it (Raft's
    /// log matching), and gets only the entries of this leader's term after
    /// it, or none. `Err`: the answer; `Ok`: the request to send.
    async fn holds(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: &RPCOption,
    ) -> Result<AppendEntriesRequest<TypeConfig>, AppendEntriesResponse<NodeId>> {
        let term = rpc.vote.leader_id().term;
        // Terms never fall along a log: when the first entry is of this term,
        // so are all (the steady state, checked in O(1)).
        let older = |e: &openraft::Entry<TypeConfig>| e.log_id.leader_id.term < term;
        if self.behind || !rpc.entries.first().is_some_and(older) {
            return Ok(rpc);
        }
        let Some(k) = rpc.entries.iter().rposition(older) else {
            return Ok(rpc);
        };
        let last = rpc.entries[k].log_id;
        let ask = AppendEntriesRequest {
            vote: rpc.vote,
            prev_log_id: Some(last),
            // Nothing past what the answer vouches for.
            leader_commit: rpc.leader_commit.min(Some(last)),
            entries: Vec::new(),
        };
        match self.send_append(ask, option.clone(), 0).await {
            Ok(AppendEntriesResponse::Success) if k + 1 == rpc.entries.len() => {
                Err(AppendEntriesResponse::Success)
            }
            // The follower's success for the rest answers the whole request.
            Ok(AppendEntriesResponse::Success) => {
                rpc.entries.drain(..=k);
                rpc.prev_log_id = Some(last);
                Ok(rpc)
            }
            Ok(higher @ AppendEntriesResponse::HigherVote(_)) => Err(higher),
            // Behind: it is sent what it lacks from now on.
            Ok(_) => {
                self.behind = true;
                Ok(rpc)
            }
            // Unreachable: the request fails the same way, and openraft retries.
            Err(_) => Ok(rpc),
        }
    }
}

/// Samples a heartbeat's round trip when it ends: answered, timed out, or
/// dropped by openraft at its deadline. The last two give the time waited, a
/// lower bound, so the RTT shown does not keep its value from before a link
/// slowed down.
struct RttProbe {
    peers: Peers,
    target: NodeId,
    sent: Instant,
}

impl Drop for RttProbe {
    fn drop(&mut self) {
        self.peers.sample_rtt(self.target, self.sent.elapsed());
    }
}

/// Openraft gives an AppendEntries as long as a heartbeat round trip may take;
/// a batch that needs longer on a slow link would time out forever. A batch
/// that misses this share of the deadline is cut in half instead.
fn batch_deadline(option: &RPCOption) -> Duration {
    option.soft_ttl()
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        let rpc = match self.holds(rpc, &option).await {
            Ok(rpc) => rpc,
            Err(answer) => return Ok(answer),
        };
        let n = rpc.entries.len() as u64;
        if let Some(max) = self.max_entries.filter(|max| n > *max) {
            return Err(RPCError::PayloadTooLarge(
                PayloadTooLarge::new_entries_hint(max),
            ));
        }
        if let Some(higher) = self
            .deferred
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            return Ok(higher);
        }
        // Openraft sends a heartbeat right after each commit (to pass the
        // commit index on) and waits for its answer before sending the next
        // entries: on a long link every write would wait a round trip behind
        // it (nearby, the wait is short and lets the next batch grow). A
        // heartbeat to a far peer, on a replication stream it answered within
        // two heartbeat intervals and a round trip goes out in the background
        // instead; a higher vote in its answer is reported on the next call.
        // So the leader's record of quorum contact runs ahead of the truth by
        // that much at most. Answers to a fresh client (a leadership
        // confirmation for a read) are never presumed.
        let answered = *self.answered.lock().unwrap_or_else(|p| p.into_inner());
        let (rtt, distance) = self.link.peers.rtt(self.link.target);
        if n == 0
            && distance >= FAR
            && answered.is_some_and(|t| t.elapsed() < self.heartbeat * 2 + rtt)
        {
            self.in_background(rpc, option);
            return Ok(AppendEntriesResponse::Success);
        }
        if n == 0 {
            return self.send_append(rpc, option, n).await;
        }
        if let Some(covered) = self.pipeline.covering(&rpc) {
            let carried = covered.committed();
            if let Some(reply) = self.pipeline.answer(&rpc, covered).await {
                if !matches!(reply, AppendEntriesResponse::HigherVote(_)) {
                    *self.answered.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
                }
                self.pass_commit_on(&rpc, carried, &reply, option);
                return Ok(reply);
            }
        }
        let (vote, committed, deadline) = (rpc.vote, rpc.leader_commit, option.hard_ttl());
        let last = rpc.entries.last().map(|e| e.log_id);
        let reply = self.send_append(rpc, option, n).await;
        let matching = match &reply {
            Ok(AppendEntriesResponse::Success) => last,
            Ok(AppendEntriesResponse::PartialSuccess(m)) => *m,
            _ => None,
        };
        // Every follower gets appended entries at once, so that the leader's
        // fsync and the followers' run side by side: a far one as many as
        // come, a near one one request at a time.
        if let Some(matching) = matching {
            self.pipeline.set_near(distance < FAR);
            self.follow_appends();
            if let Some(early) = self.pipeline.succeeded(vote, committed, matching, deadline) {
                let (link, weak) = (self.link.clone(), Arc::downgrade(&self.pipeline));
                tokio::spawn(async move { link.send_early(early, weak).await });
            }
        }
        reply
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Node, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.link.call(Rpc::InstallSnapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        self.link.call(Rpc::Vote, &rpc, &option).await
    }

    /// A peer that cannot be reached is tried again after 50 ms, then less and
    /// less often, up to once a second.
    fn backoff(&self) -> Backoff {
        Backoff::new((0..).map(|i| Duration::from_millis(50 << u32::min(i, 4)).min(MAX_BACKOFF)))
    }
}

/// When openraft's request `rpc` carries a newer commit index than the early
/// send that answered it (`carried`: the entries committed while they were on
/// their way), the heartbeat that passes it on. Openraft will not send it
/// again (as far as it knows, it did), and the follower would otherwise apply
/// the entries, and tell its watchers, only with the next write or heartbeat.
/// Up to what the follower holds by `reply`, and no further.
fn commit_heartbeat(
    rpc: &AppendEntriesRequest<TypeConfig>,
    carried: Option<LogId<NodeId>>,
    reply: &AppendEntriesResponse<NodeId>,
) -> Option<AppendEntriesRequest<TypeConfig>> {
    let holds = match reply {
        AppendEntriesResponse::Success => rpc.entries.last().map(|e| e.log_id),
        AppendEntriesResponse::PartialSuccess(m) => *m,
        _ => None,
    };
    let commit = rpc.leader_commit.min(holds);
    (holds.is_some() && commit > carried).then(|| AppendEntriesRequest {
        vote: rpc.vote,
        prev_log_id: holds,
        leader_commit: commit,
        entries: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, Entry, EntryPayload, Vote};

    use super::*;

    fn id(index: u64) -> LogId<NodeId> {
        LogId::new(CommittedLeaderId::new(2, 1), index)
    }

    /// Openraft's request for entries 5..=7, sent once 7 had committed.
    fn rpc() -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: Vote::new_committed(2, 1),
            prev_log_id: Some(id(4)),
            leader_commit: Some(id(7)),
            entries: (5..=7)
                .map(|i| Entry {
                    log_id: id(i),
                    payload: EntryPayload::Blank,
                })
                .collect(),
        }
    }

    #[test]
    fn a_commit_newer_than_the_early_send_carried_is_passed_on() {
        let hb = commit_heartbeat(&rpc(), Some(id(4)), &AppendEntriesResponse::Success)
            .expect("a heartbeat");
        assert_eq!(
            (hb.prev_log_id, hb.leader_commit, hb.entries.len()),
            (Some(id(7)), Some(id(7)), 0)
        );
        // No further than the follower holds.
        let partial = AppendEntriesResponse::PartialSuccess(Some(id(6)));
        let hb = commit_heartbeat(&rpc(), Some(id(4)), &partial).expect("a heartbeat");
        assert_eq!(
            (hb.prev_log_id, hb.leader_commit),
            (Some(id(6)), Some(id(6)))
        );
    }

    #[test]
    fn nothing_is_sent_when_the_follower_knows_the_commit_or_refused() {
        assert!(commit_heartbeat(&rpc(), Some(id(7)), &AppendEntriesResponse::Success).is_none());
        let refused = [
            AppendEntriesResponse::Conflict,
            AppendEntriesResponse::HigherVote(Vote::new(3, 2)),
            AppendEntriesResponse::PartialSuccess(None),
        ];
        for reply in refused {
            assert!(
                commit_heartbeat(&rpc(), Some(id(4)), &reply).is_none(),
                "{reply:?}"
            );
        }
    }
}
