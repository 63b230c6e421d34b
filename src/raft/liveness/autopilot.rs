//! Autopilot (Consul's idea, `[autopilot]`): on the leader, a voter that has
//! not answered for `dead_server_after` is removed while at least
//! `min_quorum` voters remain, and a node being added is made a voter only
//! once it has stayed caught up for `server_stabilization_time`. Learners,
//! read replicas among them, are neither: it looks at voters only, and its
//! voter changes (openraft's `ReplaceAllVoters`, without `retain`) keep
//! every learner as it is.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use openraft::ServerState;

use super::leadership::lag_entries;
use super::membership::settled;
use crate::peers::Peers;
use crate::raft::{NodeId, Raft};

/// Entries a member may lack and still count as caught up (Consul's
/// `max_trailing_logs`).
pub const MAX_TRAILING_ENTRIES: u64 = 250;
/// How recently a member must have answered to count as caught up.
const LAST_CONTACT_THRESHOLD: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug)]
pub struct Policy {
    pub dead_after: Duration,
    pub min_quorum: usize,
    pub stabilization: Duration,
}

/// Whether member `id` is caught up with this leader now.
fn caught_up(raft: &Raft, peers: &Peers, id: NodeId) -> bool {
    let m = raft.metrics().borrow().clone();
    let answered = peers
        .last_contacts()
        .get(&id)
        .is_some_and(|d| *d <= LAST_CONTACT_THRESHOLD);
    answered && lag_entries(&m, id).is_some_and(|lag| lag <= MAX_TRAILING_ENTRIES)
}

/// Returns once member `id` has stayed caught up for the stabilization time,
/// polling every `tick`; the caller bounds how long it waits.
pub async fn wait_stable(raft: &Raft, peers: &Peers, id: NodeId, policy: Policy, tick: Duration) {
    let mut since: Option<Instant> = None;
    loop {
        match caught_up(raft, peers, id) {
            true => {
                let start = *since.get_or_insert_with(Instant::now);
                if start.elapsed() >= policy.stabilization {
                    tracing::info!(node = id, stable_for = ?start.elapsed(), "autopilot: member caught up and stable");
                    return;
                }
            }
            false => since = None,
        }
        tokio::time::sleep(tick).await;
    }
}

/// The dead-server cleanup, every `tick` while this node leads.
pub async fn run(raft: Raft, me: NodeId, peers: Peers, policy: Policy, tick: Duration) {
    let mut leading_since: Option<Instant> = None;
    // Voters whose removal would break `min_quorum`, already logged.
    let mut kept = BTreeSet::new();
    loop {
        tokio::time::sleep(tick).await;
        let m = raft.metrics().borrow().clone();
        if m.state != ServerState::Leader {
            leading_since = None;
            kept.clear();
            continue;
        }
        let leading_for = leading_since.get_or_insert_with(Instant::now).elapsed();
        let voters: BTreeSet<NodeId> = m.membership_config.membership().voter_ids().collect();
        let contacts = peers.last_contacts();
        // A voter that never answered this leader is as old as its leadership.
        let silent = |id: &NodeId| {
            contacts
                .get(id)
                .map_or(leading_for, |d| (*d).min(leading_for))
        };
        let Some(dead) = voters
            .iter()
            .copied()
            .filter(|id| *id != me && silent(id) >= policy.dead_after)
            .max_by_key(silent)
        else {
            kept.clear();
            continue;
        };
        let rest: BTreeSet<NodeId> = voters.iter().copied().filter(|id| *id != dead).collect();
        if rest.len() < policy.min_quorum {
            if kept.insert(dead) {
                tracing::warn!(
                    node = dead,
                    silent = ?silent(&dead),
                    voters = rest.len(),
                    min_quorum = policy.min_quorum,
                    "autopilot keeps a dead voter: removing it would leave fewer voters than min_quorum"
                );
            }
            continue;
        }
        if !settled(&m) {
            continue;
        }
        tracing::warn!(node = dead, silent = ?silent(&dead), "autopilot removes a dead voter");
        if let Err(e) = raft.change_membership(rest, false).await {
            tracing::warn!(node = dead, error = %e, "autopilot could not remove a dead voter");
        }
    }
}
