//! Members bound to their data directories. The membership records each
//! member's data-directory incarnation; every Raft RPC names the incarnation
//! the sender knows for its target and the sender's own, and the receiver
//! refuses a mismatch. A node whose directory was wiped, even one that slipped
//! past the start-up check and bootstrapped again, can then neither vote nor
//! acknowledge entries as the member whose state it lost: to the cluster it is
//! a dead node until it is removed and added back as a new one.
//!
//! Initial members bootstrap knowing no incarnation (all must propose the same
//! membership); the leader learns them from its peers' replies and records
//! them with a membership change ([`bind`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::{ChangeMembers, Membership, ServerState};
use tonic::metadata::MetadataMap;

use super::{Node, NodeId, Raft};

/// A Raft request that does not fit the incarnations the membership records.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Mismatch {
    #[error("this node's data directory (incarnation {mine}) is not the one the cluster knows as node {id} (incarnation {known}): it was replaced or wiped")]
    Replaced { id: NodeId, mine: u64, known: u64 },
    #[error("node {id} presents data directory incarnation {presented} but is known as incarnation {known}: its directory was replaced or wiped, so it is refused as that member")]
    Impostor {
        id: NodeId,
        presented: u64,
        known: u64,
    },
}

/// Checks a request from `sender` to node `me` (incarnation `mine`) against
/// `membership`, as this receiver knows it. 0 means "not known" and passes.
pub fn check(
    membership: &Membership<NodeId, Node>,
    me: NodeId,
    mine: u64,
    target: u64,
    sender: NodeId,
    presented: u64,
) -> Result<(), Mismatch> {
    if target != 0 && target != mine {
        return Err(Mismatch::Replaced {
            id: me,
            mine,
            known: target,
        });
    }
    let known = membership.get_node(&sender).map_or(0, |n| n.incarnation);
    if known != 0 && known != presented {
        return Err(Mismatch::Impostor {
            id: sender,
            presented,
            known,
        });
    }
    Ok(())
}

/// An incarnation header's value; 0 if absent or unreadable.
pub fn header(meta: &MetadataMap, name: &str) -> u64 {
    meta.get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The incarnations peers last stated in their replies, by node id.
#[derive(Clone, Default)]
pub struct Learned(Arc<Mutex<BTreeMap<NodeId, u64>>>);

impl Learned {
    pub fn record(&self, id: NodeId, incarnation: u64) {
        if incarnation != 0 {
            lock(&self.0).insert(id, incarnation);
        }
    }

    fn get(&self, id: NodeId) -> Option<u64> {
        lock(&self.0).get(&id).copied()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The members whose incarnation the membership lacks but that are now known:
/// this node's own, and those its peers stated.
fn learnable(
    membership: &Membership<NodeId, Node>,
    me: NodeId,
    mine: u64,
    learned: &Learned,
) -> BTreeMap<NodeId, Node> {
    membership
        .nodes()
        .filter(|(_, n)| n.incarnation == 0)
        .filter_map(|(id, n)| {
            let incarnation = if *id == me { mine } else { learned.get(*id)? };
            Some((
                *id,
                Node {
                    addr: n.addr.clone(),
                    incarnation,
                },
            ))
        })
        .collect()
}

/// On the leader: records in the membership every member incarnation that has
/// become known. Only changes node data, never the voters. A new leader waits
/// `settle` first, so that every live member has replied and one change binds
/// them all. Ends with Raft.
pub async fn bind(
    raft: Raft,
    me: NodeId,
    mine: u64,
    learned: Learned,
    settle: Duration,
    poll: Duration,
) {
    let mut metrics = raft.metrics();
    let mut tick = tokio::time::interval(poll);
    let mut leading_since = None;
    loop {
        tick.tick().await;
        if metrics.has_changed().is_err() {
            return;
        }
        let nodes = {
            let m = metrics.borrow_and_update();
            if m.state != ServerState::Leader {
                leading_since = None;
                continue;
            }
            if leading_since.get_or_insert_with(Instant::now).elapsed() < settle {
                continue;
            }
            learnable(m.membership_config.membership(), me, mine, &learned)
        };
        if nodes.is_empty() {
            continue;
        }
        let bound: Vec<String> = nodes
            .iter()
            .map(|(id, n)| format!("node {id}: {}", n.incarnation))
            .collect();
        // Fails while another membership change is under way: retried next tick.
        match raft
            .change_membership(ChangeMembers::SetNodes(nodes), false)
            .await
        {
            Ok(_) => tracing::info!(
                "bound members to their data directories (incarnations): {}",
                bound.join(", ")
            ),
            Err(e) => tracing::debug!("binding incarnations: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn membership(incarnations: &[(NodeId, u64)]) -> Membership<NodeId, Node> {
        let voters: BTreeSet<NodeId> = incarnations.iter().map(|(id, _)| *id).collect();
        let nodes: BTreeMap<NodeId, Node> = incarnations
            .iter()
            .map(|(id, inc)| {
                (
                    *id,
                    Node {
                        addr: format!("n{id}:1"),
                        incarnation: *inc,
                    },
                )
            })
            .collect();
        Membership::new(vec![voters], nodes)
    }

    #[test]
    fn refuses_a_replaced_target_and_an_impostor_sender() {
        let m = membership(&[(1, 11), (2, 22), (3, 0)]);
        // Known and matching, or not known yet: accepted.
        assert_eq!(check(&m, 1, 11, 11, 2, 22), Ok(()));
        assert_eq!(check(&m, 1, 11, 0, 3, 99), Ok(()));
        assert_eq!(check(&m, 1, 11, 0, 7, 99), Ok(()));
        assert_eq!(
            check(&m, 1, 12, 11, 2, 22),
            Err(Mismatch::Replaced {
                id: 1,
                mine: 12,
                known: 11
            })
        );
        assert_eq!(
            check(&m, 1, 11, 0, 2, 23),
            Err(Mismatch::Impostor {
                id: 2,
                presented: 23,
                known: 22
            })
        );
    }

    #[test]
    fn learns_only_unbound_members_it_knows() {
        let m = membership(&[(1, 0), (2, 0), (3, 33)]);
        let learned = Learned::default();
        learned.record(3, 34);
        let nodes = learnable(&m, 1, 11, &learned);
        assert_eq!(nodes.keys().copied().collect::<Vec<_>>(), vec![1]);
        assert_eq!(nodes[&1].incarnation, 11);
        learned.record(2, 22);
        learned.record(2, 0);
        let nodes = learnable(&m, 1, 11, &learned);
        assert_eq!(nodes[&2].incarnation, 22);
        assert_eq!(nodes[&2].addr, "n2:1");
        assert!(!nodes.contains_key(&3));
    }
}
