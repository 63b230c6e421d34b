//! Scripted fault sequences that once lost acknowledged writes, each run
//! `ROSTER_SCENARIO_RUNS` times (default 20): a leader whose own log write
//! fails while its entry reaches the followers, and a follower whose sled file
//! loses its tail after it acknowledged entries.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use roster::client::RosterClient;
use roster::proto::v1::{Consistency, RegisterRequest};
use tokio::sync::watch;

use crate::common::{get_req, ids, instance, poll_every, Setup, TestCluster};

const SERVICE: &str = "kept";

pub fn runs() -> usize {
    std::env::var("ROSTER_SCENARIO_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20)
}

/// Registers `id` (padded, so the log grows quickly); whether it was acknowledged.
async fn write(client: &RosterClient, id: &str) -> bool {
    let mut inst = instance(SERVICE, id, 80);
    inst.metadata.insert("pad".into(), "x".repeat(2000));
    client
        .register(RegisterRequest {
            instance: Some(inst),
            ..Default::default()
        })
        .await
        .is_ok()
}

/// Writers registering new ids until told to stop: what each attempted and
/// which were acknowledged.
struct Writers {
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    attempted: Arc<Mutex<BTreeSet<String>>>,
    acked: Arc<Mutex<BTreeSet<String>>>,
}

impl Writers {
    fn start(client: &RosterClient, round: usize, n: usize) -> Writers {
        let (stop, stopped) = watch::channel(false);
        let attempted = Arc::new(Mutex::new(BTreeSet::new()));
        let acked = Arc::new(Mutex::new(BTreeSet::new()));
        let tasks = (0..n)
            .map(|w| {
                let (client, stopped) = (client.clone(), stopped.clone());
                let (attempted, acked) = (attempted.clone(), acked.clone());
                tokio::spawn(async move {
                    for k in 0.. {
                        if *stopped.borrow() {
                            break;
                        }
                        let id = format!("r{round}-w{w}-{k}");
                        attempted.lock().expect("lock").insert(id.clone());
                        if write(&client, &id).await {
                            acked.lock().expect("lock").insert(id);
                        }
                    }
                })
            })
            .collect();
        Writers {
            stop,
            tasks,
            attempted,
            acked,
        }
    }

    /// Stops them; returns (attempted, acknowledged).
    async fn finish(self) -> (BTreeSet<String>, BTreeSet<String>) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            t.await.expect("writer");
        }
        let take = |s: &Mutex<BTreeSet<String>>| std::mem::take(&mut *s.lock().expect("lock"));
        (take(&self.attempted), take(&self.acked))
    }
}

/// Every node holds exactly the same instances, a superset of `acked` within
/// `attempted`, once all have applied what the leader has.
async fn agree(c: &TestCluster, acked: &BTreeSet<String>, attempted: &BTreeSet<String>) {
    let leader = c.leader().await;
    let read: BTreeSet<String> = ids(&c.node_client(leader), SERVICE, Consistency::Linearizable)
        .await
        .into_iter()
        .collect();
    let lost: Vec<_> = acked.difference(&read).collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    let unknown: Vec<_> = read.difference(attempted).collect();
    assert!(unknown.is_empty(), "instances nobody wrote: {unknown:?}");
    let applied = c.leader_applied().await;
    for n in &c.nodes {
        c.wait_applied(n.id, applied).await;
        let stale: BTreeSet<String> = ids(&c.node_client(n.id), SERVICE, Consistency::Stale)
            .await
            .into_iter()
            .collect();
        assert_eq!(stale, read, "node {} differs from the leader", n.id);
    }
}

/// After the nodes stopped: every pair of logs holds the same bytes at every
/// index both hold (log matching), and they share at least `min_common` entries.
fn logs_identical(dirs: &[std::path::PathBuf], min_common: usize) {
    let logs: Vec<std::collections::BTreeMap<u64, Vec<u8>>> = dirs
        .iter()
        .map(|d| {
            let db = sled::open(d).expect("open sled");
            // The log's tree (`raft::trees::LOG`): entries keyed by big-endian index.
            let log = db.open_tree("raft_log").expect("log tree");
            log.iter()
                .map(|kv| {
                    let (k, v) = kv.expect("read log");
                    let k: [u8; 8] = k.as_ref().try_into().expect("8-byte key");
                    (u64::from_be_bytes(k), v.to_vec())
                })
                .collect()
        })
        .collect();
    for (i, a) in logs.iter().enumerate() {
        for (j, b) in logs.iter().enumerate().skip(i + 1) {
            let common: Vec<u64> = a.keys().filter(|k| b.contains_key(k)).copied().collect();
            assert!(
                common.len() >= min_common,
                "logs {i} and {j} share {} entries",
                common.len()
            );
            for k in common {
                assert!(a[&k] == b[&k], "logs {i} and {j} differ at index {k}");
            }
        }
    }
}

/// A fault on the leader's storage that makes its next write fail, and its undoing.
pub trait StorageFault {
    fn inject(&mut self, c: &TestCluster, leader: u64);
    fn heal(&mut self, c: &TestCluster, leader: u64);
}

/// The leader's data directory fills up.
pub struct FullDisk;

impl StorageFault for FullDisk {
    fn inject(&mut self, c: &TestCluster, leader: u64) {
        c.disks[(leader - 1) as usize].fill();
    }
    fn heal(&mut self, c: &TestCluster, leader: u64) {
        c.disks[(leader - 1) as usize].free();
    }
}

/// The leader's marker file answers every write with ENOSPC: /dev/full is
/// bind-mounted over it.
pub struct FullMarker;

impl StorageFault for FullMarker {
    fn inject(&mut self, c: &TestCluster, leader: u64) {
        let marker = c.data_dir(leader).join("roster.marker");
        mount(&["--bind", "/dev/full"], &marker);
    }
    fn heal(&mut self, c: &TestCluster, leader: u64) {
        mount_undo(&c.data_dir(leader).join("roster.marker"));
    }
}

fn mount(args: &[&str], at: &Path) {
    let ok = std::process::Command::new("mount")
        .args(args)
        .arg(at)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "mount {args:?} {}", at.display());
}

fn mount_undo(at: &Path) {
    let ok = std::process::Command::new("umount")
        .arg(at)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "umount {}", at.display());
}

/// Rounds of: the leader's storage fails under concurrent writes, so that the
/// entries it proposed reach the followers while its own write fails; it must
/// exit; it restarts at once on healed storage, finding the followers still in
/// its term. Nothing acknowledged may be lost, and at the end every node's log
/// is the same.
pub async fn leader_storage_fails(mut fault: impl StorageFault) {
    let setup = Setup {
        tmpfs_mb: Some(64),
        ..Setup::default()
    };
    let mut c = match TestCluster::start_setup(3, "", setup).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("skipping: the data directories' tmpfs and mounts need root ({e})");
            return;
        }
    };
    let client = c.client();
    let (mut attempted, mut acked) = (BTreeSet::new(), BTreeSet::new());
    for round in 0..runs() {
        let leader = c.leader().await;
        fault.inject(&c, leader);
        let writers = Writers::start(&client, round, 8);
        // Asked every 20 ms: the restart below must come at once.
        let every = Duration::from_millis(20);
        let status = poll_every(Duration::from_secs(60), every, || {
            std::future::ready(c.exited(leader))
        })
        .await
        .unwrap_or_else(|| {
            panic!("round {round}: leader {leader} ran on for 60 s with failing storage")
        });
        assert!(!status.success(), "round {round}: exit status {status}");
        // Restarted at once, as a supervisor does: before the followers' election
        // timeout, so it finds them still in its term.
        fault.heal(&c, leader);
        c.start_node(leader);
        let after = format!("r{round}-after");
        c.wait_for(
            "a write after the leader restarted",
            Duration::from_secs(30),
            || async { write(&client, &after).await.then_some(()) },
        )
        .await;
        let (tried, done) = writers.finish().await;
        attempted.extend(tried);
        acked.extend(done);
        attempted.insert(after.clone());
        acked.insert(after);
        agree(&c, &acked, &attempted).await;
    }
    eprintln!(
        "{} rounds: {} writes acknowledged, none lost",
        runs(),
        acked.len()
    );
    for id in 1..=3 {
        c.signal(id, "TERM");
        let status = c.wait_exit(id, Duration::from_secs(20)).await;
        assert!(status.success(), "node {id} stopped with {status}");
    }
    let dirs: Vec<_> = (1..=3).map(|id| c.data_dir(id)).collect();
    logs_identical(&dirs, 1);
}

/// A follower acknowledges entries, stops (SIGINT or SIGKILL), and loses the
/// last 4 KiB of its sled file; the leader crashes; the follower and the node
/// that missed the entries start. The damaged follower must refuse to start,
/// naming the damage, so that the two cannot elect a leader without the
/// entries; with the old leader back, every acknowledged write is there. (If
/// the cut held none of its live data it starts, and then the two hold them.)
pub async fn lost_tail(signal: &str) {
    let mut refusals = 0;
    for run in 0..runs() {
        let mut c = TestCluster::start(3).await;
        let a = c.leader().await;
        let mut rest = (1..=3).filter(|&i| i != a);
        let (b, late) = (rest.next().expect("b"), rest.next().expect("c"));
        c.kill(late);
        let client = c.client();
        let mut acked = BTreeSet::new();
        for chunk in 0..6 {
            let ids: Vec<String> = (0..50).map(|k| format!("t{run}-{chunk}-{k}")).collect();
            let done = futures::future::join_all(ids.iter().map(|id| write(&client, id))).await;
            assert!(done.iter().all(|ok| *ok), "run {run}: a write failed");
            acked.extend(ids);
        }
        match signal {
            "KILL" => c.kill(b),
            sig => {
                c.signal(b, sig);
                let status = c.wait_exit(b, Duration::from_secs(20)).await;
                assert!(
                    status.success(),
                    "run {run}: node {b} stopped with {status}"
                );
            }
        }
        let db = c.data_dir(b).join("db");
        let len = std::fs::metadata(&db).expect("sled file").len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&db)
            .and_then(|f| f.set_len(len.saturating_sub(4096)))
            .expect("cut the sled file");
        c.kill(a);
        c.start_node(b);
        c.start_node(late);
        // It refuses at once, or serves because the cut held none of its live
        // data (sled drops what follows its stable log; every record it keeps
        // was verified against the marker).
        let started = Instant::now();
        let refused = loop {
            if let Some(status) = c.exited(b) {
                break Some(status);
            }
            if c.status(b).await.is_some() {
                break None;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "run {run}: node {b} neither refused nor served in 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let serving = match refused {
            Some(status) => {
                let log = c.log(b);
                assert!(!status.success(), "run {run}: node {b} exited 0: {log}");
                assert!(
                    log.contains(&format!(
                        "data directory {} is not what node {b} last wrote",
                        c.data_dir(b).display()
                    )),
                    "run {run}: {log}"
                );
                refusals += 1;
                c.start_node(a);
                [a, late]
            }
            // Without the old leader: the two must hold every acknowledged write.
            None => [b, late],
        };
        let survivors = c.client_to(&[c.endpoint(serving[0]), c.endpoint(serving[1])]);
        let read = c
            .wait_for(
                "a linearizable read from the old leader and the late node",
                Duration::from_secs(30),
                || async {
                    let got = survivors
                        .get_service(get_req(SERVICE, Consistency::Linearizable))
                        .await
                        .ok()?;
                    Some(
                        got.instances
                            .into_iter()
                            .map(|i| i.id)
                            .collect::<BTreeSet<_>>(),
                    )
                },
            )
            .await;
        assert_eq!(read, acked, "run {run}: acknowledged writes lost");
    }
    eprintln!(
        "lost tail after SIG{signal}: {refusals} of {} runs refused, none lost",
        runs()
    );
}
