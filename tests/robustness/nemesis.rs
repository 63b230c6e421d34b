//! Faults injected into a real cluster. Each fault is injected, held, then
//! healed; a new kind is a variant of `Fault` with its arms in `inject` and `heal`.

use std::time::{Duration, Instant};

use roster::proto::v1::{AddMemberRequest, RemoveMemberRequest};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::common::{faults, poll, poll_every, TestCluster};

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
    /// Fill a random node's disk (its data directory's tmpfs): it must stop
    /// with an error, losing nothing acknowledged; restarted once there is room.
    DiskFull,
    /// SIGKILL a random node and cut its main sled file in half before the
    /// restart: it must refuse to start (unless the cut only hit dead space);
    /// healed as docs/operations.md says (member remove, wipe, start, member add).
    DamageRandom,
    /// Stop a random node (SIGINT or SIGKILL) and cut the last 4 KiB of its
    /// sled file, as a disk that lied about a flush or a restored file-system
    /// snapshot would: it must refuse to start if that lost anything it
    /// acknowledged; healed as `DamageRandom`.
    LoseTail,
    /// Hold 1,200 idle connections to the leader (past its 1,024-descriptor limit).
    FloodLeader,
}

impl Fault {
    pub const ALL: [Fault; 10] = [
        Fault::KillRandom,
        Fault::KillLeader,
        Fault::KillAll,
        Fault::PauseLeader,
        Fault::PartitionLeader,
        Fault::PartitionRandom,
        Fault::DiskFull,
        Fault::DamageRandom,
        Fault::LoseTail,
        Fault::FloodLeader,
    ];

    /// Whether the cluster was set up for this fault.
    fn possible(self, c: &TestCluster) -> bool {
        match self {
            Fault::PartitionLeader | Fault::PartitionRandom => c.net.is_some(),
            Fault::DiskFull => !c.disks.is_empty(),
            _ => true,
        }
    }
}

/// What an injected fault changed, so `heal` can undo it.
#[derive(Debug)]
pub enum Injected {
    Killed(Vec<u64>),
    Paused(u64),
    /// This node is cut off the others.
    Partitioned(u64),
    DiskFull(u64),
    Damaged(u64),
    /// Idle connections held against this node.
    Flooding(u64, Flood),
}

pub struct Flood {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for Flood {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("1200 idle connections")
    }
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
    Fault::ALL.into_iter().filter(|f| f.possible(c)).collect()
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
        Fault::DiskFull => {
            let id = random_node(c);
            c.disks[(id - 1) as usize].fill();
            Injected::DiskFull(id)
        }
        Fault::DamageRandom => {
            let id = random_node(c);
            c.kill(id);
            cut_sled_file(c, id, |len| len / 2);
            c.start_node(id);
            Injected::Damaged(id)
        }
        Fault::LoseTail => {
            let id = random_node(c);
            if fastrand::bool() {
                c.signal(id, "INT");
                if exit_of(c, id, Duration::from_secs(20)).await.is_none() {
                    c.kill(id);
                }
            } else {
                c.kill(id);
            }
            cut_sled_file(c, id, |len| len.saturating_sub(4096));
            c.start_node(id);
            Injected::Damaged(id)
        }
        Fault::FloodLeader => {
            let id = leader_or_random(c).await;
            let (stop, stopped) = watch::channel(false);
            let task = tokio::spawn(faults::flood(c.endpoint(id), 1200, stopped));
            Injected::Flooding(id, Flood { stop, task })
        }
    }
}

/// Waits for node `id` to exit by itself; `None` if it still runs after `limit`.
async fn exit_of(
    c: &mut TestCluster,
    id: u64,
    limit: Duration,
) -> Option<std::process::ExitStatus> {
    poll(limit, || std::future::ready(c.exited(id))).await
}

/// Runs a Cluster API call on any other running node until it succeeds.
async fn on_cluster<F, Fut>(c: &TestCluster, not: u64, what: &str, f: F) -> Result<(), String>
where
    F: Fn(roster::proto::v1::cluster_client::ClusterClient<tonic::transport::Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<(), tonic::Status>>,
{
    let last = std::cell::RefCell::new(String::new());
    let every = Duration::from_millis(200);
    poll_every(Duration::from_secs(60), every, || async {
        for n in c.nodes.iter().filter(|n| n.id != not && c.is_running(n.id)) {
            match f(c.cluster_client(n.id).await).await {
                Ok(()) => return Some(()),
                Err(e) => *last.borrow_mut() = e.to_string(),
            }
        }
        None
    })
    .await
    .ok_or_else(|| format!("{what}: {}", last.borrow()))
}

/// The recovery of a node whose data is gone (docs/operations.md): remove the member,
/// wipe its directory, start it without `initial_cluster`, add it back.
async fn rejoin_empty(c: &mut TestCluster, id: u64) -> Result<(), String> {
    on_cluster(c, id, "member remove", |mut cc| async move {
        cc.remove_member(RemoveMemberRequest { id })
            .await
            .map(|_| ())
    })
    .await?;
    for entry in std::fs::read_dir(c.data_dir(id)).map_err(|e| e.to_string())? {
        let path = entry.map_err(|e| e.to_string())?.path();
        let gone = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        gone.map_err(|e| format!("wipe {}: {e}", path.display()))?;
    }
    c.clear_initial_cluster(id);
    c.start_node(id);
    let address = c.endpoint(id);
    on_cluster(c, id, "member add", |mut cc| {
        let address = address.clone();
        async move {
            cc.add_member(AddMemberRequest {
                id,
                address,
                replica: false,
            })
            .await
            .map(|_| ())
        }
    })
    .await
}

/// Undoes a fault. `Ok` says what happened worth reporting; `Err` is a
/// broken promise (a node that ran on with a full disk or damaged data).
pub async fn heal(c: &mut TestCluster, i: Injected) -> Result<Option<String>, String> {
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
        Injected::DiskFull(id) => {
            // Writes keep arriving: the node must stop once it cannot make one
            // durable. Sled may go on writing into space its file already
            // holds; a node still running must then be keeping up, since it
            // acknowledges only what it flushed and its marker covers.
            let status = exit_of(c, id, Duration::from_secs(60)).await;
            let Some(status) = status else {
                let kept_up = caught_up(c, &[id], Duration::from_secs(10)).await.is_ok();
                c.disks[(id - 1) as usize].free();
                if !kept_up {
                    return Err(format!(
                        "node {id} ran on for 60 s with a full disk without keeping up"
                    ));
                }
                return Ok(Some(format!(
                    "node {id} ran on with a full disk, keeping up (its log still fits its file)"
                )));
            };
            c.disks[(id - 1) as usize].free();
            if status.success() {
                return Err(format!("node {id} exited 0 on a full disk"));
            }
            c.start_node(id);
            return Ok(Some(format!(
                "node {id} stopped on the full disk ({status})"
            )));
        }
        Injected::Damaged(id) => {
            let Some(status) = exit_of(c, id, Duration::from_secs(20)).await else {
                // Still running: the cut hit only dead space, every record it
                // holds was verified at start. The checker judges the rest.
                return Ok(Some(format!(
                    "node {id} started: the cut held no live data"
                )));
            };
            if status.success() || !c.log(id).contains("is not what node") {
                return Err(format!(
                    "node {id} with a damaged directory exited ({status}) without refusing it"
                ));
            }
            rejoin_empty(c, id).await?;
            return Ok(Some(format!(
                "node {id} refused its damaged directory; rejoined empty"
            )));
        }
        Injected::Flooding(id, flood) => {
            let _ = flood.stop.send(true);
            flood.task.await.expect("flood task");
            if let Some(status) = c.exited(id) {
                return Err(format!(
                    "node {id} died under a connection flood ({status})"
                ));
            }
        }
    }
    Ok(None)
}

/// Cuts node `id`'s main sled file to `to(its length)` bytes.
fn cut_sled_file(c: &TestCluster, id: u64, to: impl FnOnce(u64) -> u64) {
    let db = c.data_dir(id).join("db");
    let len = std::fs::metadata(&db).map(|m| m.len()).unwrap_or(0);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&db)
        .and_then(|f| f.set_len(to(len)))
        .expect("truncate the sled file");
}

/// Waits until every node runs, one leader is agreed, and every node has
/// applied what the leader had when asked. `Err` after `limit`.
pub async fn wait_recovered(c: &TestCluster, limit: Duration) -> Result<Duration, String> {
    let all: Vec<u64> = c.nodes.iter().map(|n| n.id).collect();
    caught_up(c, &all, limit).await
}

/// Waits until the nodes `ids` follow one agreed leader and have applied what
/// it had when asked. `Err` after `limit`.
async fn caught_up(c: &TestCluster, ids: &[u64], limit: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    poll(limit, || async {
        let l = current_leader(c).await?;
        let ls = c.status(l).await?;
        for &id in ids {
            let s = c.status(id).await?;
            if s.leader_id != l || s.applied_index + 64 < ls.applied_index {
                return None;
            }
        }
        Some(started.elapsed())
    })
    .await
    .ok_or_else(|| format!("nodes {ids:?} not caught up after {limit:?}"))
}
