//! The write and read paths every front-end shares (the gRPC API, the health
//! checker): commands proposed through Raft in group-committed rounds, and
//! linearizable reads confirmed by a shared read index. A node that does not
//! lead refuses with the leader it knows, for the caller to forward to (the
//! API) or to drop (the health checker).

use std::future::Future;
use std::time::Duration;

use openraft::error::{CheckIsLeaderError, ClientWriteError, ForwardToLeader, RaftError};
use tokio::sync::watch;

use super::liveness::election::Contact;
use super::replication::coalesce::{Coalescer, Slot};
use super::{Node, NodeId, Raft};
use crate::error::Error;
use crate::peers::{Peers, FAR};
use crate::registry::{Command, CommandResponse, Proposal};

/// Commands per log entry. Bounded so that an entry stays far below the
/// transport's message limit even when every command carries maximal metadata.
const MAX_COMMANDS_PER_ENTRY: usize = 128;
/// Raft rounds in flight at once: one being replicated while the next fills up.
const ROUNDS_IN_FLIGHT: usize = 2;

/// Why the work was not done here.
#[derive(Clone, Debug)]
pub enum Refusal {
    /// Another node leads, or none is known: nothing was proposed.
    NotLeader(ForwardToLeader<NodeId, Node>),
    Failed(Error),
}

impl From<Refusal> for Error {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::NotLeader(f) => Error::NotLeader {
                leader: f
                    .leader_id
                    .map(|id| (id, f.leader_node.map(|n| n.addr).unwrap_or_default())),
            },
            Refusal::Failed(e) => e,
        }
    }
}

impl From<Refusal> for tonic::Status {
    fn from(r: Refusal) -> Self {
        Error::from(r).into()
    }
}

/// Where a node is in its life, as its proposer sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Serving,
    /// Leadership is being handed to another node: writes and reads wait
    /// until it leads, then go to it (the API forwards them), so a rolling
    /// restart answers them instead of refusing.
    HandingOver,
    /// The node is shutting down: nothing new is proposed, and streams end
    /// so the server can stop.
    Closed,
}

pub struct Proposer {
    raft: Raft,
    id: NodeId,
    timeout: Duration,
    phase: watch::Sender<Phase>,
    contact: Contact,
    writes: Coalescer<Command, Result<CommandResponse, Refusal>>,
    reads: Coalescer<(), Result<(), Refusal>>,
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
        let voters: Vec<_> = m.membership_config.membership().voter_ids().collect();
        (m.last_log_index, peers.quorum_distance(&voters) >= FAR)
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
                "node {id} stopped leading while the write was in flight"
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

/// Confirms leadership with a quorum, then waits (up to `timeout`) until this
/// node has applied the read index. A leader is always elected (see
/// [`LogStore::resign`](super::storage::log_store::LogStore::resign)), so the read index
/// is at least its first entry of the term, after every acknowledged write.
async fn read_index(raft: &Raft, timeout: Duration) -> Result<(), Refusal> {
    let (read, applied) = raft.get_read_log_id().await.map_err(read_refusal)?;
    let index = read.map(|l| l.index);
    if index > applied.map(|l| l.index) {
        raft.wait(Some(timeout))
            .applied_index_at_least(index, "read index")
            .await
            .map_err(|e| {
                Refusal::Failed(Error::Unavailable(format!(
                    "this node leads but has not applied the read index {index:?}: {e}; retry"
                )))
            })?;
    }
    Ok(())
}

impl Proposer {
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
                    let answer = read_index(&raft, timeout).await;
                    vec![answer; waiting.len()]
                }
            },
        );
        Proposer {
            raft,
            id,
            timeout,
            phase: watch::Sender::new(Phase::Serving),
            contact,
            writes,
            reads,
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// How long ago this node last heard from a leader (see [`Contact`]).
    pub fn leader_contact(&self) -> Option<Duration> {
        self.contact.leader_contact()
    }

    /// From now on nothing new is proposed here: every call is refused as not
    /// applied, naming the leader when another node leads (for the API to forward).
    pub fn close(&self) {
        self.phase.send_replace(Phase::Closed);
    }

    /// Runs `transfer` (which hands leadership to another node) with this
    /// node's writes and reads held meanwhile: once another node leads they
    /// are refused with its name, for the API to forward, so callers are
    /// answered rather than told to retry. Nothing is proposed here while it
    /// runs, so the successor can catch up.
    pub async fn hand_over<T>(&self, transfer: impl Future<Output = T>) -> T {
        self.shift(Phase::Serving, Phase::HandingOver);
        let done = transfer.await;
        self.shift(Phase::HandingOver, Phase::Serving);
        done
    }

    /// Moves the phase from `from` to `to`; any other phase (closed meanwhile) stays.
    fn shift(&self, from: Phase, to: Phase) {
        self.phase.send_if_modified(|p| {
            let at = *p == from;
            if at {
                *p = to;
            }
            at
        });
    }

    /// Resolves once the node has begun to shut down.
    pub fn closing(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut phase = self.phase.subscribe();
        async move {
            let _ = phase.wait_for(|p| *p == Phase::Closed).await;
        }
    }

    fn shutting_down(&self) -> Refusal {
        Refusal::Failed(Error::Unavailable(format!(
            "node {} is shutting down; not applied, retry on another node",
            self.id
        )))
    }

    /// While leadership is being handed on from this node, waits (up to the
    /// request timeout) until another node leads or the hand-over ends.
    async fn settled(&self) {
        // Every write passes here: no subscription unless handing over.
        if *self.phase.borrow() != Phase::HandingOver {
            return;
        }
        let mut phase = self.phase.subscribe();
        let mut metrics = self.raft.metrics();
        let elsewhere = |m: &openraft::RaftMetrics<NodeId, Node>| {
            self.contact.leader(m).is_some_and(|l| l != self.id)
        };
        let _ = tokio::time::timeout(self.timeout, async {
            tokio::select! {
                _ = metrics.wait_for(elsewhere) => {}
                _ = phase.wait_for(|p| *p != Phase::HandingOver) => {}
            }
        })
        .await;
    }

    /// Replicates `cmd` through Raft and returns what applying it did.
    pub async fn propose(&self, cmd: Command) -> Result<CommandResponse, Refusal> {
        self.settled().await;
        self.here()?;
        let late = || {
            Error::Timeout(format!(
                "no quorum confirmed the write within {:?}",
                self.timeout
            ))
        };
        self.bounded(self.writes.submit(cmd), late, Error::Interrupted)
            .await
    }

    /// Confirms leadership with a quorum and waits until this node has applied
    /// everything committed before the call (read index).
    pub async fn read_index(&self) -> Result<(), Refusal> {
        self.settled().await;
        self.here()?;
        let late = || {
            Error::Unavailable(format!(
                "no quorum confirmed this node's view within {:?}; the cluster may have lost its majority",
                self.timeout
            ))
        };
        self.bounded(self.reads.submit(()), late, Error::Unavailable)
            .await
    }

    /// A coalesced round's answer within the request timeout; `late` says why
    /// it did not come in time, `stopped` wraps the answer for a stopped node.
    async fn bounded<T>(
        &self,
        answer: impl Future<Output = Option<Result<T, Refusal>>>,
        late: impl FnOnce() -> Error,
        stopped: fn(String) -> Error,
    ) -> Result<T, Refusal> {
        tokio::time::timeout(self.timeout, answer)
            .await
            .map_err(|_| Refusal::Failed(late()))?
            .unwrap_or_else(|| Err(Refusal::Failed(stopped("node is shutting down".into()))))
    }

    /// Waits until this node has applied `index`.
    pub async fn wait_applied(&self, index: u64) -> Result<(), Error> {
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

    /// As [`Proposer::here`], once this leader has applied an entry of its
    /// own term: everything committed before it was elected is then applied,
    /// and its own state answers what a read would. A leader just elected
    /// (by a transfer, say) has not applied what its predecessor committed
    /// last, and would answer from an older state; it waits (up to the
    /// request timeout) instead. Found by the simulation (`crate::sim`).
    pub async fn current(&self) -> Result<(), Refusal> {
        self.here()?;
        let mut metrics = self.raft.metrics();
        let current = |m: &openraft::RaftMetrics<NodeId, Node>| {
            m.vote.is_committed()
                && m.last_applied
                    .is_some_and(|l| l.leader_id == *m.vote.leader_id())
        };
        let applied = tokio::time::timeout(self.timeout, metrics.wait_for(current))
            .await
            .is_ok_and(|r| r.is_ok());
        match applied {
            true => self.here(),
            false => Err(Refusal::Failed(Error::Unavailable(format!(
                "node {} was just elected and has not applied what its predecessor committed within {:?}; retry",
                self.id, self.timeout
            )))),
        }
    }

    /// Why a read replica that knows no leader refuses: it cannot vote for
    /// one, so none will be found here until the leader reaches it again.
    fn cut_off(&self) -> Error {
        let heard = match self.contact.leader_contact() {
            Some(d) => format!("last heard from a leader {} ms ago", d.as_millis()),
            None => "has heard from no leader since it started".into(),
        };
        Error::Unavailable(format!(
            "node {} is a read replica cut off from the leader ({heard}); not applied: \
             retry on another node, or read with STALE consistency here",
            self.id
        ))
    }

    /// Whether this node leads, by its current view and without a quorum
    /// round trip; if not, the leader it knows. A read replica that knows no
    /// leader refuses outright (`cut_off`). A node shutting down serves
    /// nothing itself, but still names the leader it knows, so what reaches
    /// it until its server stops is forwarded rather than refused.
    pub fn here(&self) -> Result<(), Refusal> {
        let closed = *self.phase.borrow() == Phase::Closed;
        // Heartbeats come this way at a high rate: read the metrics in place, no clone.
        let (leader_id, leader_node) = {
            let rx = self.raft.metrics();
            let m = rx.borrow();
            let leader = self.contact.leader(&m);
            if closed && leader.is_none_or(|l| l == self.id) {
                return Err(self.shutting_down());
            }
            if leader == Some(self.id) {
                return Ok(());
            }
            let membership = m.membership_config.membership();
            if leader.is_none() && membership.get_node(&self.id).is_some_and(|n| n.replica) {
                return Err(Refusal::Failed(self.cut_off()));
            }
            let node = leader.and_then(|l| membership.get_node(&l).cloned());
            (leader, node)
        };
        Err(Refusal::NotLeader(ForwardToLeader {
            leader_id,
            leader_node,
        }))
    }
}
