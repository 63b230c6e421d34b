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

/// CheckQuorum's view of this node's leadership: since when it leads.
#[derive(Default)]
struct Office {
    since: Option<Instant>,
}

impl Office {
    /// How long this leader has not heard from a quorum, if longer than
    /// `lease` (it should step down). A fresh leader with no quorum
    /// acknowledgement yet counts from when it took office.
    fn lost_quorum(
        &mut self,
        m: &RaftMetrics<NodeId, Node>,
        id: NodeId,
        lease: Duration,
    ) -> Option<Duration> {
        if m.state != ServerState::Leader || m.current_leader != Some(id) {
            self.since = None;
            return None;
        }
        let Some(since) = self.since else {
            self.since = Some(Instant::now());
            return None;
        };
        let silence = m
            .millis_since_quorum_ack
            .map_or_else(|| since.elapsed(), Duration::from_millis);
        // Mutation: no step-down.
        (silence > lease && !mutation::active(Mutation::NoStepDown)).then_some(silence)
    }
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
    let (term, applied) = {
        let m = raft.metrics();
        let m = m.borrow();
        (m.current_term, m.last_applied)
    };
    // The vote is refused if it names less log than this node holds. The
    // data metrics can lag an append just flushed (a hand-over then lost 20
    // ms to a retry); what is applied is in the log too.
    let last_log_id = raft.data_metrics().borrow().last_log.max(applied);
    let req = VoteRequest::new(Vote::new(term + 1, candidate), last_log_id);
    matches!(raft.vote(req).await, Ok(resp) if resp.vote_granted)
}

/// CheckQuorum: steps this node down when it has led without hearing from a
/// quorum for longer than `lease`, so clients are told at once that there is
/// no leader instead of waiting for a write that cannot commit. Ends with Raft.
pub async fn check_quorum(raft: Raft, id: NodeId, lease: Duration, poll: Duration) {
    let mut office = Office::default();
    let mut metrics = std::pin::pin!(metrics_every(&raft, poll));
    while let Some(m) = metrics.next().await {
        if let Some(s) = office.lost_quorum(&m, id, lease) {
            if vote_next_term(&raft, NOBODY).await {
                tracing::warn!(
                    "stepped down: no quorum of voters answered for {} ms (lease {} ms)",
                    s.as_millis(),
                    lease.as_millis()
                );
            }
        }
    }
}

/// The voter a leader `id` hands leadership to: the one that acknowledged
/// the most of its log (learners never). `None` off the leader.
fn transfer_target(m: &RaftMetrics<NodeId, Node>, id: NodeId) -> Option<NodeId> {
    if m.current_leader != Some(id) {
        return None;
    }
    let membership = m.membership_config.membership();
    let voters: Vec<NodeId> = membership.voter_ids().collect();
    m.replication
        .as_ref()?
        .iter()
        .filter(|(n, _)| **n != id && voters.contains(n))
        .max_by_key(|(_, matched)| matched.map(|l| l.index))
        .map(|(n, _)| *n)
}

/// If this node leads, hands leadership to the most up-to-date voter and waits
/// (up to `limit`) for it to take over. The caller must have stopped proposing
/// ([`Proposer::hand_over`](crate::raft::proposer::Proposer::hand_over)).
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
        let target = transfer_target(&m, id)?;
        let node = m.membership_config.membership().get_node(&target)?.clone();
        (target, node, m.vote)
    };
    // The follower must hold every entry this leader has, or it cannot win
    // the vote; and this leader must have applied them, or the writes in
    // flight would be answered as interrupted instead of done.
    let caught_up = raft
        .wait(Some(
            deadline.saturating_duration_since(tokio::time::Instant::now()),
        ))
        .metrics(
            |m| {
                let last = m.last_log_index;
                m.last_applied.map(|l| l.index) >= last
                    && m.replication
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

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Arc;

    use openraft::{CommittedLeaderId, LogId, Membership, StoredMembership};

    use super::*;

    fn leader(voters: &[NodeId], learners: &[NodeId]) -> RaftMetrics<NodeId, Node> {
        let mut m = RaftMetrics::new_initial(1);
        m.state = ServerState::Leader;
        m.current_leader = Some(1);
        let nodes: BTreeMap<NodeId, Node> = voters
            .iter()
            .chain(learners)
            .map(|id| (*id, Node::unbound(format!("127.0.0.1:{}", 7100 + id))))
            .collect();
        let config = BTreeSet::from_iter(voters.iter().copied());
        m.membership_config = Arc::new(StoredMembership::new(
            None,
            Membership::new(vec![config], nodes),
        ));
        m
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_steps_down_once_no_quorum_answered_for_its_lease() {
        let lease = Duration::from_millis(600);
        let mut m = leader(&[1, 2, 3], &[]);
        let mut office = Office::default();
        // Just elected, no acknowledgement yet: the silence counts from now.
        assert_eq!(office.lost_quorum(&m, 1, lease), None);
        tokio::time::advance(lease).await;
        assert_eq!(office.lost_quorum(&m, 1, lease), None);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(
            office.lost_quorum(&m, 1, lease),
            Some(lease + Duration::from_millis(1))
        );
        // A quorum heard recently keeps it; one heard too long ago does not.
        m.millis_since_quorum_ack = Some(100);
        assert_eq!(office.lost_quorum(&m, 1, lease), None);
        m.millis_since_quorum_ack = Some(700);
        assert_eq!(
            office.lost_quorum(&m, 1, lease),
            Some(Duration::from_millis(700))
        );
        // Stepped down; leading again later starts a new term of office.
        m.state = ServerState::Follower;
        assert_eq!(office.lost_quorum(&m, 1, lease), None);
        m.state = ServerState::Leader;
        m.millis_since_quorum_ack = None;
        assert_eq!(office.lost_quorum(&m, 1, lease), None);
    }

    #[test]
    fn leadership_goes_to_the_most_up_to_date_voter() {
        let mut m = leader(&[1, 2, 3], &[4]);
        let at = |i| Some(LogId::new(CommittedLeaderId::new(2, 1), i));
        m.replication = Some(BTreeMap::from([(2, at(5)), (3, at(9)), (4, at(20))]));
        // The learner holds more, but cannot be elected.
        assert_eq!(transfer_target(&m, 1), Some(3));
        m.replication = Some(BTreeMap::from([(2, at(5)), (3, None)]));
        assert_eq!(transfer_target(&m, 1), Some(2));
        // Only a leader hands over.
        m.current_leader = Some(2);
        assert_eq!(transfer_target(&m, 1), None);
    }
}
