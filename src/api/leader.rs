//! Routing to the Raft leader: writes and linearizable reads run on the leader;
//! a follower forwards the caller's request there and relays the answer, so
//! clients never need to know who leads.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;

use openraft::error::{CheckIsLeaderError, ClientWriteError, ForwardToLeader, RaftError};
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;
use tonic::{Response, Status};

use crate::error::{Error, Result};
use crate::raft::coalesce::{Coalescer, Slot};
use crate::raft::election::Contact;
use crate::raft::network::{error_chain, Peers, FAR};
use crate::raft::{Node, NodeId, Raft};
use crate::registry::{Command, CommandResponse, Proposal};

/// Extra time a follower waits for the leader's answer to a forwarded request.
const FORWARD_MARGIN: Duration = Duration::from_secs(1);
/// Set on a forwarded request, so it is never forwarded a second time.
const FORWARDED_HEADER: &str = "roster-forwarded";
/// Commands per log entry. Bounded so that an entry stays far below the
/// transport's message limit even when every command carries maximal metadata.
const MAX_COMMANDS_PER_ENTRY: usize = 128;
/// Raft rounds in flight at once: one being replicated while the next fills up.
const ROUNDS_IN_FLIGHT: usize = 2;

pub enum Route<T> {
    /// This node is the leader and did the work.
    Here(T),
    /// Another node leads: send the request there.
    Leader(Leader),
}

/// The leader as a follower sees it, for forwarding.
pub struct Leader {
    pub id: NodeId,
    pub addr: String,
    pub channel: Channel,
}

/// Whether a forwarded request changes state: a write whose connection breaks
/// mid-call has an unknown outcome, a read can simply be retried.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    Read,
    Write,
}

impl Leader {
    /// Sends the caller's request to the leader, marked as forwarded, and relays
    /// the leader's answer. Transport failures are said as such, naming the leader.
    pub async fn relay<T, R, F, Fut>(
        self,
        msg: T,
        timeout: Duration,
        effect: Effect,
        call: F,
    ) -> std::result::Result<Response<R>, Status>
    where
        F: FnOnce(Channel, tonic::Request<T>) -> Fut,
        Fut: Future<Output = std::result::Result<Response<R>, Status>>,
    {
        // The leader gets `timeout` and answers by then; the margin lets its
        // answer (which knows whether the write was applied) travel back.
        let answer = call(
            self.channel.clone(),
            forward_request(msg, timeout + FORWARD_MARGIN),
        )
        .await;
        answer.map_err(|s| self.transport_failure(s, effect))
    }

    fn transport_failure(&self, s: Status, effect: Effect) -> Status {
        if s.code() == tonic::Code::Cancelled
            && s.message() == tonic::TimeoutExpired(()).to_string()
        {
            let what = format!(
                "forwarded to leader {} at {}, no answer in time",
                self.id, self.addr
            );
            return match effect {
                Effect::Read => Error::Unavailable(format!("{what}; retry")),
                Effect::Write => Error::Timeout(format!("{what}; the write may have been applied")),
            }
            .into();
        }
        // The leader's own answers carry no source; transport failures do.
        if std::error::Error::source(&s).is_none() {
            return s;
        }
        let cause = error_chain(&s);
        let what = format!(
            "forwarding to leader {} at {} failed: {cause}",
            self.id, self.addr
        );
        if !sent(&s) {
            // The connection could not be made: the request never left this node.
            Error::Unavailable(format!("{what}; not applied, retry"))
        } else if effect == Effect::Read {
            Error::Unavailable(format!("{what}; retry"))
        } else {
            Error::Interrupted(what)
        }
        .into()
    }
}

/// Whether the request may have reached the peer: only a failure to connect
/// (tonic's `ConnectError` somewhere in the causes) proves it did not.
fn sent(s: &Status) -> bool {
    let mut cause = std::error::Error::source(s);
    while let Some(c) = cause {
        if c.downcast_ref::<tonic::ConnectError>().is_some() {
            return false;
        }
        cause = c.source();
    }
    true
}

/// Why the work was not done here.
#[derive(Clone, Debug)]
enum Refusal {
    NotLeader(ForwardToLeader<NodeId, Node>),
    Failed(Error),
}

pub struct LeaderRouter {
    raft: Raft,
    id: NodeId,
    timeout: Duration,
    /// Set when the node begins to shut down: nothing new is proposed, and
    /// streams end so the server can stop.
    closed: tokio::sync::watch::Sender<bool>,
    peers: Peers,
    contact: Contact,
    writes: Coalescer<Command, std::result::Result<CommandResponse, Refusal>>,
    reads: Coalescer<(), std::result::Result<(), Refusal>>,
}

pub fn is_forwarded(meta: &MetadataMap) -> bool {
    meta.contains_key(FORWARDED_HEADER)
}

/// Wraps a message for the leader, marked as forwarded.
fn forward_request<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(timeout);
    r.metadata_mut().insert(
        FORWARDED_HEADER,
        tonic::metadata::MetadataValue::from_static("1"),
    );
    r
}

/// One Raft round of writes. A leader deposed while its entry is in flight
/// answers at once that the outcome is unknown, rather than holding the round
/// (and every write queued behind it) until the entry is committed or dropped
/// by a leader it may not reach.
async fn propose(
    raft: Raft,
    id: NodeId,
    mut durable: watch::Receiver<Option<u64>>,
    peers: Peers,
    cmds: Vec<Command>,
    slot: Slot,
) -> Vec<std::result::Result<CommandResponse, Refusal>> {
    let n = cmds.len();
    // Between far nodes (a few milliseconds apart or more), a round whose entry is
    // on disk here only waits for the followers: the next round may start,
    // and replication carries both, instead of each waiting a round trip for
    // the other. Nearby, the round keeps its slot to the end, so that rounds
    // (and fsyncs) stay few and large.
    let (appended, far) = {
        let rx = raft.metrics();
        let m = rx.borrow();
        let voters = m.membership_config.membership().voter_ids().count();
        (m.last_log_index, peers.quorum_distance(voters) >= FAR)
    };
    let released = async move {
        if far {
            let _ = durable.wait_for(|d| *d > appended).await;
            drop(slot);
        }
        std::future::pending::<()>().await
    };
    let mut server = raft.server_metrics();
    let vote = {
        let m = server.borrow_and_update();
        (m.current_leader == Some(id)).then_some(m.vote)
    };
    let write = raft.client_write(Proposal(cmds));
    let deposed = async {
        match vote {
            Some(v) => {
                let _ = server.wait_for(|m| m.vote != v).await;
            }
            // Not leading: openraft refuses at once.
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        biased;
        () = released => unreachable!("never completes"),
        answer = write => match answer {
            Ok(r) => r.data.into_iter().map(Ok).collect(),
            Err(e) => vec![Err(write_refusal(e)); n],
        },
        () = deposed => vec![
            Err(Refusal::Failed(Error::Interrupted(format!(
                "node {id} stopped leading while the write was in flight; it may or may not be applied"
            ))));
            n
        ],
    }
}

// Openraft answers ForwardToLeader for a write it did not append, or whose
// entry was truncated by a new leader: either way it is not applied.
fn write_refusal(e: RaftError<NodeId, ClientWriteError<NodeId, Node>>) -> Refusal {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => Refusal::NotLeader(f),
        RaftError::APIError(e) => Refusal::Failed(Error::Internal(e.to_string())),
        RaftError::Fatal(e) => Refusal::Failed(Error::Interrupted(format!(
            "the Raft core stopped while the write was in flight ({e})"
        ))),
    }
}

fn read_refusal(e: RaftError<NodeId, CheckIsLeaderError<NodeId, Node>>) -> Refusal {
    match e {
        RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)) => Refusal::NotLeader(f),
        RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(e)) => {
            Refusal::Failed(Error::Unavailable(format!(
                "this node led but could not confirm it with a quorum of voters {:?}; retry, possibly on another node",
                e.cluster
            )))
        }
        RaftError::Fatal(e) => Refusal::Failed(Error::Unavailable(format!("raft stopped: {e}"))),
    }
}

impl LeaderRouter {
    /// Must be called inside a tokio runtime: it starts the coalescing tasks.
    pub fn new(
        raft: Raft,
        id: NodeId,
        durable: watch::Receiver<Option<u64>>,
        peers: Peers,
        contact: Contact,
        timeout: Duration,
    ) -> Self {
        let (r, p) = (raft.clone(), peers.clone());
        let writes = Coalescer::spawn(
            ROUNDS_IN_FLIGHT,
            MAX_COMMANDS_PER_ENTRY,
            move |cmds: Vec<Command>, slot| {
                propose(r.clone(), id, durable.clone(), p.clone(), cmds, slot)
            },
        );
        let r = raft.clone();
        // A read may share a check only if it arrived before the check began,
        // which is what coalescing gives: it joins the next round.
        let reads = Coalescer::spawn(
            ROUNDS_IN_FLIGHT,
            usize::MAX,
            move |waiting: Vec<()>, slot| {
                let raft = r.clone();
                async move {
                    let _slot = slot;
                    let answer = raft
                        .ensure_linearizable()
                        .await
                        .map(|_| ())
                        .map_err(read_refusal);
                    vec![answer; waiting.len()]
                }
            },
        );
        LeaderRouter {
            raft,
            id,
            timeout,
            closed: tokio::sync::watch::Sender::new(false),
            peers,
            contact,
            writes,
            reads,
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// From now on nothing new is proposed here; requests are forwarded to
    /// the leader or refused as not applied.
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// Resolves once the node has begun to shut down.
    pub fn closing(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut closed = self.closed.subscribe();
        async move {
            let _ = closed.wait_for(|c| *c).await;
        }
    }

    fn check_open(&self) -> Result<()> {
        if *self.closed.borrow() {
            return Err(Error::Unavailable(format!(
                "node {} is shutting down; not applied, retry on another node",
                self.id
            )));
        }
        Ok(())
    }

    /// Replicates `cmd` through Raft and returns what applying it did.
    pub async fn write(&self, cmd: Command, forwarded: bool) -> Result<Route<CommandResponse>> {
        if let Route::Leader(l) = self.current(forwarded)? {
            return Ok(Route::Leader(l));
        }
        let answer = tokio::time::timeout(self.timeout, self.writes.submit(cmd))
            .await
            .map_err(|_| {
                Error::Timeout(format!(
                    "no quorum confirmed the write within {:?}",
                    self.timeout
                ))
            })?
            .ok_or_else(|| Error::Interrupted("node is shutting down".into()))?;
        self.route(answer, forwarded)
    }

    /// Confirms leadership with a quorum and waits until this node has applied
    /// everything committed before the call (read index).
    pub async fn linearizable(&self, forwarded: bool) -> Result<Route<()>> {
        if let Route::Leader(l) = self.current(forwarded)? {
            return Ok(Route::Leader(l));
        }
        let answer = tokio::time::timeout(self.timeout, self.reads.submit(()))
            .await
            .map_err(|_| {
                Error::Unavailable(format!(
                    "no quorum confirmed this node's view within {:?}; the cluster may have lost its majority",
                    self.timeout
                ))
            })?
            .ok_or_else(|| Error::Unavailable("node is shutting down".into()))?;
        self.route(answer, forwarded)
    }

    /// Waits until this node has applied `index`.
    pub async fn wait_applied(&self, index: u64) -> Result<()> {
        self.raft
            .wait(Some(self.timeout))
            .applied_index_at_least(Some(index), "catch up with the leader")
            .await
            .map(|_| ())
            .map_err(|e| {
                Error::Unavailable(format!(
                    "node {} could not catch up with revision {index}: {e}; retry, possibly on another node",
                    self.id
                ))
            })
    }

    /// Routes by this node's current view of the leader, without a quorum round trip.
    pub fn current(&self, forwarded: bool) -> Result<Route<()>> {
        self.check_open()?;
        // Heartbeats come this way at a high rate: read the metrics in place, no clone.
        let (leader_id, leader_node) = {
            let rx = self.raft.metrics();
            let m = rx.borrow();
            let leader = self.contact.leader(&m);
            if leader == Some(self.id) {
                return Ok(Route::Here(()));
            }
            let node = leader.and_then(|l| m.membership_config.membership().get_node(&l).cloned());
            (leader, node)
        };
        self.to_leader(
            ForwardToLeader {
                leader_id,
                leader_node,
            },
            forwarded,
        )
    }

    fn route<T>(
        &self,
        answer: std::result::Result<T, Refusal>,
        forwarded: bool,
    ) -> Result<Route<T>> {
        match answer {
            Ok(v) => Ok(Route::Here(v)),
            Err(Refusal::NotLeader(f)) => self.to_leader(f, forwarded),
            Err(Refusal::Failed(e)) => Err(e),
        }
    }

    fn to_leader<T>(&self, f: ForwardToLeader<NodeId, Node>, forwarded: bool) -> Result<Route<T>> {
        let (Some(id), Some(node)) = (f.leader_id, f.leader_node) else {
            return Err(Error::Unavailable(
                "no leader elected at the moment; not applied, retry".into(),
            ));
        };
        if forwarded {
            // The node we were forwarded to no longer leads; let the client retry rather than bounce.
            return Err(Error::Unavailable(format!(
                "leadership is moving (to node {id}); not applied, retry"
            )));
        }
        let channel = self.peers.channel(&node.addr).map_err(Error::Unavailable)?;
        Ok(Route::Leader(Leader {
            id,
            addr: node.addr,
            channel,
        }))
    }
}
