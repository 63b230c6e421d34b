//! Leadership hygiene that openraft 0.9 leaves to the application: a leader
//! that has lost its quorum steps down (etcd's CheckQuorum), and a leader that
//! is being stopped hands leadership to an up-to-date follower first.
//!
//! Openraft 0.9 has no step-down or transfer call. Both are built on its vote
//! handling: a leader whose lease has run out grants a vote for a higher term,
//! which turns it into a follower. Voting for node 0 (never a member) gives
//! the vote to nobody; voting for a caught-up follower and then telling that
//! follower to campaign (`TimeoutNow`, as in the Raft thesis) hands over.

use std::time::Duration;

use tokio::time::Instant;

use crate::raft::mutation::{self, Mutation};

use openraft::raft::VoteRequest;
use openraft::{RaftMetrics, ServerState, Vote};

use crate::raft::storage::marker::Identity;
use futures::StreamExt;

use super::election::Contact;
use crate::peers::Peers;
use crate::raft::metrics_every;
use crate::raft::rpc::{extra_call, Extra};
use crate::raft::{Node, NodeId, Raft};

/// How long a leader waits for a follower to take over when it hands
/// leadership on (stopping, or removing itself).
pub const TRANSFER_LIMIT: Duration = Duration::from_secs(2);

/// A vote for this id is a vote for nobody: node ids start at 1.
const NOBODY: NodeId = 0;

/// How long ago this leader last heard from a quorum; `None` if it does not lead.
/// `leading_since` covers a fresh leader that has no quorum acknowledgement yet.
fn quorum_silence(
    m: &RaftMetrics<NodeId, Node>,
    id: NodeId,
    leading_since: Instant,
) -> Option<Duration> {
    if m.state != ServerState::Leader || m.current_leader != Some(id) {
        return None;
    }
    Some(match m.millis_since_quorum_ack {
        Some(ms) => Duration::from_millis(ms),
        None => leading_since.elapsed(),
    })
}

/// Whether this node can serve linearizable requests now: it leads with a
/// recent quorum, or follows a leader it hears from. Readiness, not liveness.
pub fn can_serve(
    m: &RaftMetrics<NodeId, Node>,
    id: NodeId,
    lease: Duration,
    contact: &Contact,
) -> bool {
    if m.running_state.is_err() || m.state == ServerState::Shutdown {
        return false;
    }
    match contact.leader(m) {
        Some(l) if l == id => m
            .millis_since_quorum_ack
            .is_some_and(|ms| Duration::from_millis(ms) <= lease),
        Some(_) => true,
        None => false,
    }
}

/// Grants a vote for `candidate` in the next term on this node, which makes a
/// leader whose lease has expired a follower.
async fn vote_next_term(raft: &Raft, candidate: NodeId) -> bool {
    let term = raft.metrics().borrow().current_term;
    let last_log_id = raft.data_metrics().borrow().last_log;
    let req = VoteRequest::new(Vote::new(term + 1, candidate), last_log_id);
    matches!(raft.vote(req).await, Ok(resp) if resp.vote_granted)
}

/// CheckQuorum: steps this node down when it has led without hearing from a
/// quorum for longer than `lease`, so clients are told at once that there is
/// no leader instead of waiting for a write that cannot commit. Ends with Raft.
pub async fn check_quorum(raft: Raft, id: NodeId, lease: Duration, poll: Duration) {
    let mut leading_since = Instant::now();
    let mut was_leading = false;
    let mut metrics = std::pin::pin!(metrics_every(&raft, poll));
    while let Some(m) = metrics.next().await {
        match quorum_silence(&m, id, leading_since) {
            None => was_leading = false,
            Some(_) if !was_leading => {
                was_leading = true;
                leading_since = Instant::now();
            }
            // Mutation: no step-down.
            Some(s) if s > lease && !mutation::active(Mutation::NoStepDown) => {
                if vote_next_term(&raft, NOBODY).await {
                    tracing::warn!(
                        "stepped down: no quorum of voters answered for {} ms (lease {} ms)",
                        s.as_millis(),
                        lease.as_millis()
                    );
                }
            }
            Some(_) => {}
        }
    }
}

/// If this node leads, hands leadership to the most up-to-date voter and waits
/// (up to `limit`) for it to take over. The caller must have stopped proposing.
/// Returns the new leader, or `None` when this node did not lead or no
/// follower could take over in time (the cluster then elects one as usual).
pub async fn transfer(
    raft: &Raft,
    me: &Identity,
    peers: &Peers,
    limit: Duration,
) -> Option<NodeId> {
    let id = me.node_id;
    let deadline = tokio::time::Instant::now() + limit;
    let (target, node, leader_vote) = {
        let m = raft.metrics().borrow().clone();
        if m.current_leader != Some(id) {
            return None;
        }
        let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
        let (target, _) = m
            .replication
            .as_ref()?
            .iter()
            .filter(|(n, _)| **n != id && voters.contains(n))
            .max_by_key(|(_, matched)| matched.map(|l| l.index))?;
        let node = m.membership_config.membership().get_node(target)?.clone();
        (*target, node, m.vote)
    };
    // The follower must hold every entry this leader has, or it cannot win the vote.
    let caught_up = raft
        .wait(Some(
            deadline.saturating_duration_since(tokio::time::Instant::now()),
        ))
        .metrics(
            |m| {
                let last = m.last_log_index;
                m.replication
                    .as_ref()
                    .and_then(|r| r.get(&target))
                    .is_some_and(|matched| matched.map(|l| l.index) >= last)
            },
            "transfer target caught up",
        )
        .await;
    if caught_up.is_err() {
        tracing::warn!("leadership transfer: node {target} did not catch up in time");
        return None;
    }
    // The leader's own lease may refuse the vote for a moment after it was elected.
    while !vote_next_term(raft, target).await {
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The follower campaigns only for the leader it follows, named by its vote.
    let asked: Result<(), String> = extra_call(
        peers,
        me,
        &node,
        Extra::TimeoutNow,
        &leader_vote,
        deadline.saturating_duration_since(tokio::time::Instant::now()),
    )
    .await;
    if let Err(e) = asked {
        tracing::warn!("leadership transfer: asking node {target} to campaign: {e}");
        return None;
    }
    let took_over = raft
        .wait(Some(
            deadline.saturating_duration_since(tokio::time::Instant::now()),
        ))
        .metrics(
            |m| m.current_leader.is_some_and(|l| l != id),
            "another leader",
        )
        .await;
    took_over.ok().and_then(|m| m.current_leader)
}

/// Log entries member `id` lacks as this leader last knew (its last log
/// index minus what the member acknowledged; one that acknowledged nothing
/// since this leader took office lacks all); `None` off the leader or for the
/// leader itself.
pub fn lag_entries(m: &RaftMetrics<NodeId, Node>, id: NodeId) -> Option<u64> {
    let acknowledged = m
        .replication
        .as_ref()
        .and_then(|r| r.get(&id).copied().flatten())
        .map_or(0, |l| l.index);
    (m.current_leader == Some(m.id) && id != m.id)
        .then(|| m.last_log_index.unwrap_or(0).saturating_sub(acknowledged))
}
