//! Faults injected into a real cluster. Each fault is injected, held, then
//! healed; a new kind is a variant of `Fault` with its arms in `inject` and `heal`.

use std::time::{Duration, Instant};

use crate::common::TestCluster;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fault {
    /// SIGKILL a random node; restart it on heal.
    KillRandom,
    /// SIGKILL the leader; restart it on heal.
    KillLeader,
    /// SIGKILL every node; restart them all on heal.
    KillAll,
    /// SIGSTOP the leader; SIGCONT on heal (it wakes up believing it still leads).
    PauseLeader,
    /// Cut the leader off the other nodes, both ways (clients still reach it).
    PartitionLeader,
    /// Cut a random node off the others.
    PartitionRandom,
}

impl Fault {
    pub const ALL: [Fault; 6] = [
        Fault::KillRandom,
        Fault::KillLeader,
        Fault::KillAll,
        Fault::PauseLeader,
        Fault::PartitionLeader,
        Fault::PartitionRandom,
    ];

    fn needs_network(self) -> bool {
        matches!(self, Fault::PartitionLeader | Fault::PartitionRandom)
    }
}

/// What an injected fault changed, so `heal` can undo it.
#[derive(Debug)]
pub enum Injected {
    Killed(Vec<u64>),
    Paused(u64),
    /// This node is cut off the others.
    Partitioned(u64),
}

/// The leader as the running nodes report it: the highest-term node calling
/// itself leader. `None` while there is none (or nobody answers).
pub async fn current_leader(c: &TestCluster) -> Option<u64> {
    let mut best: Option<(u64, u64)> = None;
    for n in c.nodes.iter().filter(|n| c.is_running(n.id)) {
        if let Some(s) = c.status(n.id).await {
            if s.role == "leader" && best.is_none_or(|(t, _)| s.term > t) {
                best = Some((s.term, n.id));
            }
        }
    }
    best.map(|(_, id)| id)
}

fn random_node(c: &TestCluster) -> u64 {
    fastrand::u64(1..=c.nodes.len() as u64)
}

async fn leader_or_random(c: &TestCluster) -> u64 {
    match current_leader(c).await {
        Some(l) => l,
        None => random_node(c),
    }
}

pub fn available(c: &TestCluster) -> Vec<Fault> {
    Fault::ALL
        .into_iter()
        .filter(|f| !f.needs_network() || c.net.is_some())
        .collect()
}

pub async fn inject(c: &mut TestCluster, f: Fault) -> Injected {
    let all: Vec<u64> = c.nodes.iter().map(|n| n.id).collect();
    match f {
        Fault::KillRandom | Fault::KillLeader | Fault::KillAll => {
            let victims = match f {
                Fault::KillAll => all,
                Fault::KillLeader => vec![leader_or_random(c).await],
                _ => vec![random_node(c)],
            };
            for &id in &victims {
                c.kill(id);
            }
            Injected::Killed(victims)
        }
        Fault::PauseLeader => {
            let id = leader_or_random(c).await;
            c.signal(id, "STOP");
            Injected::Paused(id)
        }
        Fault::PartitionLeader | Fault::PartitionRandom => {
            let id = if f == Fault::PartitionLeader {
                leader_or_random(c).await
            } else {
                random_node(c)
            };
            let rest: Vec<u64> = all.into_iter().filter(|&n| n != id).collect();
            let lab = c
                .net
                .as_ref()
                .expect("partitions need the namespace network");
            lab.partition(&[id], &rest).expect("partition");
            Injected::Partitioned(id)
        }
    }
}

pub fn heal(c: &mut TestCluster, i: Injected) {
    match i {
        Injected::Killed(ids) => {
            for id in ids {
                c.start_node(id);
            }
        }
        Injected::Paused(id) => c.signal(id, "CONT"),
        Injected::Partitioned(id) => c
            .net
            .as_ref()
            .expect("partitions need the namespace network")
            .heal()
            .unwrap_or_else(|e| panic!("healing the partition of node {id}: {e}")),
    }
}

/// Waits until every node runs, one leader is agreed, and every node has
/// applied what the leader had when asked. `Err` after `limit`.
pub async fn wait_recovered(c: &TestCluster, limit: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    loop {
        if let Some(l) = current_leader(c).await {
            if let Some(ls) = c.status(l).await {
                let mut ok = true;
                for n in &c.nodes {
                    match c.status(n.id).await {
                        Some(s) if s.leader_id == l && s.applied_index + 64 >= ls.applied_index => {
                        }
                        _ => ok = false,
                    }
                }
                if ok {
                    return Ok(started.elapsed());
                }
            }
        }
        if started.elapsed() > limit {
            return Err(format!("cluster not recovered after {limit:?}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
