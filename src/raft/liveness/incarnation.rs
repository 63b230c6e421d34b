//! Members bound to their data directories. The membership records each
//! member's data-directory incarnation; every Raft RPC names the incarnation
//! the sender knows for its target, and a target of another incarnation
//! refuses it. A node whose directory was wiped, even one that slipped past
//! the start-up check and bootstrapped again, can then neither vote nor
//! acknowledge entries as the member whose state it lost: to the cluster it is
//! a dead node until it is removed and added back as a new one.
//!
//! The receiver does not judge the sender by its own membership: a node
//! catching up (say from a snapshot taken before the sender was re-added with
//! a new directory) holds a stale view and would refuse the very entries that
//! bring it up to date. A wiped sender is harmless anyway: its log is behind,
//! so no vote goes to it, and it leads nobody.
//!
//! Initial members bootstrap knowing no incarnation (all must propose the same
//! membership); the leader learns them from its peers' replies and records
//! them with a membership change ([`bind`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use openraft::{ChangeMembers, Membership, ServerState};
use tonic::metadata::MetadataMap;

use futures::StreamExt;

use super::membership::settled;
use crate::raft::{metrics_every, Node, NodeId, Raft, CLIENT_ADDRESS_HEADER, INCARNATION_HEADER};

/// A Raft request meant for another incarnation of this node.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("this node's data directory (incarnation {mine}) is not the one the cluster knows as node {id} (incarnation {known}): it was replaced or wiped")]
pub struct Replaced {
    pub id: NodeId,
    pub mine: u64,
    pub known: u64,
}

/// Checks a request the sender meant for incarnation `target` of node `me`
/// (incarnation `mine`). 0 means "not known yet" and passes.
pub fn check(me: NodeId, mine: u64, target: u64) -> Result<(), Replaced> {
    if target != 0 && target != mine {
        return Err(Replaced {
            id: me,
            mine,
            known: target,
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

/// What a Raft reply's metadata states about the peer that sent it.
pub fn stated(meta: &MetadataMap) -> Stated {
    Stated {
        incarnation: header(meta, INCARNATION_HEADER),
        addr: meta
            .get(CLIENT_ADDRESS_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string(),
    }
}

/// What a node states about itself in its Raft replies.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stated {
    pub incarnation: u64,
    /// Its client address.
    pub addr: String,
}

/// What peers last stated in their replies, by node id.
#[derive(Clone, Default)]
pub struct Learned(Arc<Mutex<BTreeMap<NodeId, Stated>>>);

impl Learned {
    pub fn record(&self, id: NodeId, stated: Stated) {
        if stated.incarnation != 0 {
            lock(&self.0).insert(id, stated);
        }
    }

    fn get(&self, id: NodeId) -> Option<Stated> {
        lock(&self.0).get(&id).cloned()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The members whose incarnation or client address the membership lacks but
/// that are now known: this node's own, and those its peers stated. A peer of
/// another incarnation than the one recorded is not the member: nothing of it
/// is taken.
fn learnable(
    membership: &Membership<NodeId, Node>,
    me: NodeId,
    mine: &Stated,
    learned: &Learned,
) -> BTreeMap<NodeId, Node> {
    membership
        .nodes()
        .filter(|(_, n)| n.incarnation == 0 || n.addr.is_empty())
        .filter_map(|(id, n)| {
            let stated = if *id == me {
                mine.clone()
            } else {
                learned.get(*id)?
            };
            if n.incarnation != 0 && n.incarnation != stated.incarnation {
                return None;
            }
            let node = Node {
                addr: if n.addr.is_empty() {
                    stated.addr
                } else {
                    n.addr.clone()
                },
                incarnation: stated.incarnation,
                ..n.clone()
            };
            (node != *n).then_some((*id, node))
        })
        .collect()
}

/// On the leader: records in the membership every member incarnation and
/// client address that has become known. Only changes node data, never the voters. A new leader waits
/// `settle` first, so that every live member has replied and one change binds
/// them all. Ends with Raft.
pub async fn bind(
    raft: Raft,
    me: NodeId,
    mine: Stated,
    learned: Learned,
    settle: Duration,
    poll: Duration,
) {
    let mut leading_since = None;
    let mut metrics = std::pin::pin!(metrics_every(&raft, poll));
    while let Some(m) = metrics.next().await {
        if m.state != ServerState::Leader {
            leading_since = None;
            continue;
        }
        if leading_since.get_or_insert_with(Instant::now).elapsed() < settle {
            continue;
        }
        let nodes = learnable(m.membership_config.membership(), me, &mine, &learned);
        if nodes.is_empty() || !settled(&m) {
            continue;
        }
        let bound: Vec<String> = nodes
            .iter()
            .map(|(id, n)| format!("node {id}: {n}"))
            .collect();
        // Fails if another change began since `settled`: retried next tick.
        match raft
            .change_membership(ChangeMembers::SetNodes(nodes), false)
            .await
        {
            Ok(_) => tracing::info!(
                "bound members to their data directories and client addresses: {}",
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
                        peer_addr: format!("n{id}:2"),
                        incarnation: *inc,
                        replica: false,
                    },
                )
            })
            .collect();
        Membership::new(vec![voters], nodes)
    }

    #[test]
    fn refuses_a_request_meant_for_another_incarnation() {
        assert_eq!(check(1, 11, 11), Ok(()));
        assert_eq!(check(1, 11, 0), Ok(()));
        assert_eq!(
            check(1, 12, 11),
            Err(Replaced {
                id: 1,
                mine: 12,
                known: 11
            })
        );
    }

    #[test]
    fn learns_only_unbound_members_it_knows() {
        let stated = |incarnation, addr: &str| Stated {
            incarnation,
            addr: addr.into(),
        };
        let m = membership(&[(1, 0), (2, 0), (3, 33)]);
        let learned = Learned::default();
        learned.record(3, stated(34, "n3:1"));
        let mine = stated(11, "n1:1");
        let nodes = learnable(&m, 1, &mine, &learned);
        assert_eq!(nodes.keys().copied().collect::<Vec<_>>(), vec![1]);
        assert_eq!(nodes[&1].incarnation, 11);
        learned.record(2, stated(22, "n2:1"));
        learned.record(2, stated(0, ""));
        let nodes = learnable(&m, 1, &mine, &learned);
        assert_eq!(nodes[&2].incarnation, 22);
        assert_eq!(nodes[&2].peer_addr, "n2:2");
        assert!(!nodes.contains_key(&3));
    }

    #[test]
    fn learns_an_initial_members_client_address_from_that_member_only() {
        let mut m = membership(&[(1, 0), (2, 7), (3, 8)]);
        let mut nodes: BTreeMap<NodeId, Node> = m.nodes().map(|(id, n)| (*id, n.clone())).collect();
        for n in nodes.values_mut() {
            n.addr.clear();
        }
        m = Membership::new(vec![[1, 2, 3].into()], nodes);
        let learned = Learned::default();
        learned.record(
            2,
            Stated {
                incarnation: 7,
                addr: "c2:1".into(),
            },
        );
        // Another incarnation answering as node 3: not the member.
        learned.record(
            3,
            Stated {
                incarnation: 9,
                addr: "c3:1".into(),
            },
        );
        let mine = Stated {
            incarnation: 11,
            addr: "c1:1".into(),
        };
        let nodes = learnable(&m, 1, &mine, &learned);
        assert_eq!(nodes[&1].addr, "c1:1");
        assert_eq!(nodes[&2].addr, "c2:1");
        assert_eq!(nodes[&2].incarnation, 7);
        assert!(!nodes.contains_key(&3));
    }
}
