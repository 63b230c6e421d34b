//! Deterministic simulation of a Roster cluster's Raft layer (feature `sim`).
//!
//! Three or five members run the real `raft/` code — log store and marker,
//! state machine and snapshots, pre-vote elections, check-quorum, pipelined
//! replication, incarnations, leadership transfer, proposer and read index —
//! through [`crate::raft::replica::Replica`], as a node does, in one process
//! on one thread. Only the seams are simulated ([`crate::raft::storage::disk`],
//! [`crate::raft::wire`], tokio's paused clock): a disk ([`disk`]) and a
//! network ([`net`]) whose faults a seeded nemesis chooses, while clients
//! register, deregister, heartbeat and read. Everything random is drawn
//! from the seed — tokio's scheduler too (`rng_seed`) — so one seed replays
//! the same run, event for event.
//!
//! What a run checks as it goes: a leader leads under its own committed vote
//! (openraft's leader ids are (term, node), so one term may have two), one
//! entry per applied index, one applied state per revision, and a member that restarts must find
//! on its disk what its marker says it wrote. The client history it returns
//! is checked for linearizability by the robustness suite's checker
//! (`tests/sim.rs`).

mod checks;
pub mod disk;
mod nemesis;
pub mod net;
mod workload;

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use openraft::{LogId, RaftLogReader, ServerState};
use tokio::time::Instant;

use crate::config::NodeConfig;
use crate::peers::Peers;
use crate::raft::liveness::leadership;
use crate::raft::mutation;
pub use crate::raft::mutation::Mutation;
use crate::raft::proposer::Refusal;
use crate::raft::replica::{Replica, Setup};
use crate::raft::replication::peer_trust::PeerTrust;
use crate::raft::storage::disk::Offload;
use crate::raft::storage::log_store::{self, LogStore};
use crate::raft::storage::marker::{self, Found, Identity, Marker, Progress};
use crate::raft::storage::state_machine::{Current, StateMachine};
use crate::raft::{Node, NodeId};
use crate::registry::model::{Command, EventKind, Instance, Outcome};
use crate::registry::watch::watch_stream;
use futures::StreamExt;

use disk::Disk;
use net::{Net, Weather};

const CLUSTER: &str = "sim";
const SERVICE: &str = "svc";
/// Instances the clients write: few, so that operations on each collide.
const KEYS: u64 = 4;
const CLIENTS: usize = 3;
/// The client that reads every key at the end.
pub const FINAL_READER: usize = CLIENTS;
/// Watchers of the service, each moving from member to member.
const WATCHERS: usize = 2;

/// One simulated run.
#[derive(Clone, Debug)]
pub struct Options {
    pub seed: u64,
    /// 3 or 5.
    pub nodes: usize,
    /// Simulated time under load and faults, before the cluster is healed.
    pub load: Duration,
    pub mutation: Option<Mutation>,
}

impl Options {
    /// The default run of `seed`: 3 or 5 members (by the seed), 2 s of load.
    pub fn new(seed: u64) -> Self {
        Options {
            seed,
            nodes: if seed % 4 == 3 { 5 } else { 3 },
            load: Duration::from_secs(2),
            mutation: None,
        }
    }
}

/// What a client asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Input {
    Put(u64),
    Delete,
    /// Linearizable read.
    Get,
    /// A heartbeat: answered by the leader from its own state.
    Exists,
}

/// What it was answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Output {
    Ok,
    NotFound,
    Value(Option<u64>),
    /// May or may not have taken effect.
    Unknown,
}

/// One client operation: simulated nanoseconds from the start; `ret` is
/// `None` when the outcome is unknown.
#[derive(Clone, Debug, Hash)]
pub struct Record {
    pub client: usize,
    pub key: u64,
    pub input: Input,
    pub output: Output,
    pub call: u64,
    pub ret: Option<u64>,
    /// The revision an acknowledged write was applied at.
    pub revision: Option<u64>,
}

/// One message of a watch stream, by key (instance) and value (address).
#[derive(Clone, Debug, Default, Hash)]
pub struct WatchMsg {
    pub revision: u64,
    /// The full state: `instances` replaces what the watcher held.
    pub reset: bool,
    pub instances: Vec<(u64, u64)>,
    /// (revision, key, new value or `None` for a delete).
    pub events: Vec<(u64, u64, Option<u64>)>,
}

/// One watch stream a watcher opened on `node`, resuming after `since`.
#[derive(Clone, Debug, Default, Hash)]
pub struct WatchSession {
    pub node: u64,
    pub since: u64,
    pub msgs: Vec<WatchMsg>,
}

/// What a run did and found.
#[derive(Debug, Default)]
pub struct Report {
    pub history: Vec<Record>,
    /// Values stale reads returned, each of which some write must have written.
    pub stale_reads: Vec<Option<u64>>,
    pub violations: Vec<String>,
    /// The faults injected, in order, with their simulated time.
    pub faults: Vec<String>,
    /// Each watcher's streams, in order.
    pub watchers: Vec<Vec<WatchSession>>,
    /// The revision every watcher had to reach at the end.
    pub fence: u64,
    /// Acknowledged writes.
    pub acked: usize,
    /// A digest of everything observable: equal for two runs of one seed.
    pub fingerprint: u64,
}

thread_local! {
    /// The last panic on this thread (a simulation's task), for its report.
    static PANIC: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Records the first panic's message on its thread, then reports it as before.
fn keep_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let at = info.location().map(|l| l.to_string()).unwrap_or_default();
            let what = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_default();
            PANIC.with(|p| {
                p.borrow_mut().get_or_insert(format!("{what} at {at}"));
            });
            previous(info);
        }));
    });
}

/// Runs one seed to the end. Everything runs on the calling thread.
pub fn run(opts: &Options) -> Report {
    keep_panics();
    PANIC.with(|p| p.borrow_mut().take());
    fastrand::seed(opts.seed);
    mutation::set(opts.mutation);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .rng_seed(tokio::runtime::RngSeed::from_bytes(
            &opts.seed.to_le_bytes(),
        ))
        .build();
    let report = match rt {
        // The world is made inside the runtime: its clock is the paused one.
        Ok(rt) => {
            let mut report = rt.block_on(async { World::new(opts).run().await });
            // A task that panicked (an openraft assertion) died alone; the
            // run went on without it, and the panic is a finding.
            if let Some(what) = PANIC.with(|p| p.borrow_mut().take()) {
                report
                    .violations
                    .insert(0, format!("a task panicked: {what}"));
            }
            report
        }
        Err(e) => Report {
            violations: vec![format!("cannot build the runtime: {e}")],
            ..Report::default()
        },
    };
    mutation::set(None);
    report
}

/// Why a member's process did not start.
enum Start {
    /// What its disk holds is not what it wrote.
    Refused(String),
    /// An I/O error.
    Failed(String),
}

/// A member's running process.
struct Running {
    process: u64,
    replica: Arc<Replica>,
}

struct Member {
    disk: Disk,
    /// Holds the snapshot file, which the simulation keeps on a real
    /// (temporary) file system: it is written whole and synced before use.
    dir: tempfile::TempDir,
    identity: Option<Identity>,
    running: Option<Running>,
    /// Bumped whenever the process starts or stops: a pending restart of
    /// an older stop is void.
    epoch: u64,
}

impl Member {
    /// A node with an empty disk.
    fn new() -> Self {
        // On tmpfs where there is one: a snapshot's fsync costs no real time.
        let shm = std::path::Path::new("/dev/shm");
        let dir = match shm.is_dir() {
            true => tempfile::tempdir_in(shm),
            false => tempfile::tempdir(),
        }
        .expect("a temporary directory for snapshots");
        Member {
            disk: Disk::default(),
            dir,
            identity: None,
            running: None,
            epoch: 0,
        }
    }
}

#[derive(Default)]
struct Observed {
    /// Applied index → the entry's log id.
    applied: BTreeMap<u64, LogId<NodeId>>,
    /// Revision (the last applied index) → the applied state's digest.
    states: BTreeMap<u64, u64>,
    /// Since when each member has been unable to reach a quorum of voters.
    cut_off: BTreeMap<NodeId, Instant>,
    violations: Vec<String>,
    faults: Vec<String>,
}

struct World {
    opts: Options,
    timing: crate::raft::liveness::election::Timing,
    net: Net,
    members: Mutex<BTreeMap<NodeId, Member>>,
    observed: Mutex<Observed>,
    rng: Mutex<fastrand::Rng>,
    start: Instant,
    history: Mutex<Vec<Record>>,
    stale_reads: Mutex<Vec<Option<u64>>>,
    watch_logs: Mutex<Vec<Vec<WatchSession>>>,
    /// Set at the end: the revision the watchers must reach before they stop.
    fence: Mutex<Option<(u64, Instant)>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn config(id: NodeId, dir: PathBuf) -> Result<NodeConfig, String> {
    // Snapshots every few dozen entries, so that runs build, send and install them.
    let text = format!(
        "id = {id}\ncluster_id = \"{CLUSTER}\"\nlisten = \"127.0.0.1:1\"\npeer_listen = \"127.0.0.1:2\"\n\
         data_dir = {dir:?}\nrequest_timeout_ms = 1500\n\
         [raft]\nsnapshot_after_entries = 40\nkeep_entries_after_snapshot = 8\n"
    );
    toml::from_str(&text).map_err(|e| format!("simulation config: {e}"))
}

impl World {
    fn new(opts: &Options) -> Arc<Self> {
        let members = (1..=opts.nodes as NodeId + 1)
            .map(|id| (id, Member::new()))
            .collect();
        let timing = config(1, PathBuf::new())
            .map(|c| c.raft.timing())
            .expect("the simulation's configuration parses");
        Arc::new(World {
            opts: opts.clone(),
            timing,
            net: Net::new(opts.seed ^ 0x9e37_79b9_7f4a_7c15),
            members: Mutex::new(members),
            observed: Mutex::default(),
            rng: Mutex::new(fastrand::Rng::with_seed(opts.seed.rotate_left(17))),
            start: Instant::now(),
            history: Mutex::default(),
            stale_reads: Mutex::default(),
            watch_logs: Mutex::new(vec![Vec::new(); WATCHERS]),
            fence: Mutex::default(),
        })
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn rng<T>(&self, f: impl FnOnce(&mut fastrand::Rng) -> T) -> T {
        f(&mut lock(&self.rng))
    }

    fn violation(&self, what: String) {
        lock(&self.observed).violations.push(what);
    }

    fn fault(&self, what: String) {
        let at = self.start.elapsed().as_millis();
        lock(&self.observed)
            .faults
            .push(format!("{at:>6} ms {what}"));
    }

    /// The initial members.
    fn ids(&self) -> Vec<NodeId> {
        (1..=self.opts.nodes as NodeId).collect()
    }

    /// A node that is not an initial member: it joins (a new, empty node),
    /// is made a voter, and is removed and wiped.
    fn spare(&self) -> NodeId {
        self.opts.nodes as NodeId + 1
    }

    /// The nodes the leader's membership holds, voters and learners.
    fn membership(&self) -> Option<std::collections::BTreeSet<NodeId>> {
        let leader = self.leader().and_then(|l| self.replica(l))?;
        let m = leader.raft.metrics().borrow().membership_config.clone();
        Some(m.membership().nodes().map(|(id, _)| *id).collect())
    }

    fn replica(&self, id: NodeId) -> Option<Arc<Replica>> {
        lock(&self.members)
            .get(&id)?
            .running
            .as_ref()
            .map(|r| r.replica.clone())
    }

    fn running(&self) -> Vec<(NodeId, Arc<Replica>)> {
        lock(&self.members)
            .iter()
            .filter_map(|(id, m)| Some((*id, m.running.as_ref()?.replica.clone())))
            .collect()
    }

    /// Starts a process of member `id` on what its disk holds, as a node
    /// starts: the marker is checked against the log first.
    async fn start_member(self: &Arc<Self>, id: NodeId) {
        let (disk, dir, identity) = {
            let members = lock(&self.members);
            let Some(m) = members.get(&id) else { return };
            if m.running.is_some() {
                return;
            }
            (
                m.disk.clone(),
                m.dir.path().to_path_buf(),
                m.identity.clone(),
            )
        };
        match self.open(id, &disk, dir, identity).await {
            Ok((replica, process, pristine)) => {
                let replica = Arc::new(replica);
                replica.spawn_consensus();
                let trust = PeerTrust::new(
                    replica.raft.clone(),
                    replica.me.clone(),
                    replica.peers.clone(),
                    Arc::default(),
                    false,
                );
                let service = replica.service("(simulation)".into(), trust);
                self.net.up(id, process, service, replica.raft.clone());
                {
                    let mut members = lock(&self.members);
                    if let Some(m) = members.get_mut(&id) {
                        m.identity = Some(replica.me.clone());
                        m.running = Some(Running {
                            process,
                            replica: replica.clone(),
                        });
                        m.epoch += 1;
                    }
                }
                // The initial members bootstrap; a node that joins later waits to be added.
                if pristine && id <= self.opts.nodes as NodeId {
                    let nodes: BTreeMap<NodeId, Node> = self
                        .ids()
                        .into_iter()
                        .map(|i| (i, Node::unbound(net::peer_addr(i))))
                        .collect();
                    let _ = replica.raft.initialize(nodes).await;
                }
                tokio::spawn(self.clone().supervise(id, process, replica));
            }
            // The disk is not what the node wrote: in the simulation, where
            // no disk lies, the marker claimed more than was written.
            Err(Start::Refused(e)) => self.violation(format!("node {id} refuses to start: {e}")),
            // An injected I/O error at start: the process exits and is restarted.
            Err(Start::Failed(e)) => {
                self.fault(format!("node {id} fails to start: {e}"));
                self.restart_later(id, Duration::from_millis(200));
            }
        }
    }

    async fn open(
        &self,
        id: NodeId,
        disk: &Disk,
        dir: PathBuf,
        identity: Option<Identity>,
    ) -> Result<(Replica, u64, bool), Start> {
        let refused = |e: String| Start::Refused(e);
        let failed = |e: String| Start::Failed(e);
        let handle = disk.handle();
        let recorded = Marker::read_from(&*handle).map_err(|e| refused(e.to_string()))?;
        let current = Current::read(&dir).map_err(|e| refused(e.to_string()))?;
        let (last_log, vote_term) =
            log_store::inspect(&*handle).map_err(|e| refused(e.to_string()))?;
        let found = Found {
            has_data: identity.is_some(),
            identity: identity.clone(),
            progress: Progress {
                last_log,
                vote_term,
                applied: current.applied_index(),
            },
        };
        marker::check(recorded.as_ref(), &found).map_err(refused)?;
        let me = identity.unwrap_or_else(|| Identity::new(CLUSTER, id));
        let marker = Arc::new(Marker::on(handle.clone(), me.clone(), found.progress));
        if found.identity.is_none() {
            marker.write_now().map_err(|e| failed(e.to_string()))?;
        }
        let cfg = config(id, dir.clone()).map_err(failed)?;
        let state_machine = StateMachine::open(&dir, current, 64, marker.clone())
            .map_err(|e| refused(e.to_string()))?
            .inline();
        let mut log_store = LogStore::on(handle.clone(), marker, Offload::Inline);
        let pristine = Replica::pristine(&mut log_store)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let timing = cfg.raft.timing();
        let process = disk.process();
        let setup = Setup {
            id,
            config: crate::node::raft_config(&cfg).map_err(|e| failed(e.to_string()))?,
            timing,
            request_timeout: cfg.request_timeout(),
            client_addr: format!("node{id}:5000"),
            peers: Peers::on(
                timing.rpc_timeout,
                self.net.wire(id, process, timing.rpc_timeout),
            ),
        };
        let replica = Replica::start(setup, log_store, state_machine, me)
            .await
            .map_err(|e| failed(e.to_string()))?;
        Ok((replica, process, pristine))
    }

    /// Stops member `id`'s process at once, as a crash or a kill does: the
    /// disk keeps what `kept` says of its unflushed writes.
    fn crash(&self, id: NodeId, kept: impl FnOnce(usize) -> usize) -> bool {
        let running = {
            let mut members = lock(&self.members);
            let Some(m) = members.get_mut(&id) else {
                return false;
            };
            let Some(r) = m.running.take() else {
                return false;
            };
            m.epoch += 1;
            m.disk.crash(kept);
            r
        };
        self.net.down(id);
        let raft = running.replica.raft.clone();
        running.replica.proposer.close();
        // The dead process's tasks can change nothing now (its disk handle
        // and its wire are retired); stop them so they do not linger.
        tokio::spawn(async move {
            let _ = raft.shutdown().await;
        });
        true
    }

    /// As a node does when its Raft stops (a flush failed): the process
    /// exits, and is restarted (by systemd, say) a little later.
    async fn supervise(self: Arc<Self>, id: NodeId, process: u64, replica: Arc<Replica>) {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            tick.tick().await;
            let current = lock(&self.members)
                .get(&id)
                .and_then(|m| m.running.as_ref().map(|r| r.process));
            if current != Some(process) {
                return;
            }
            let failed = {
                let m = replica.raft.metrics().borrow().clone();
                m.running_state.is_err() || m.state == ServerState::Shutdown
            };
            if failed {
                let kept = self.rng(|r| r.usize(..=usize::MAX / 2));
                self.crash(id, |n| kept % (n + 1));
                self.fault(format!("node {id} exits: its raft stopped"));
                let pause = self.rng(|r| r.u64(50..800));
                self.restart_later(id, Duration::from_millis(pause));
                return;
            }
        }
    }

    fn restart_later(self: &Arc<Self>, id: NodeId, after: Duration) {
        let epoch = lock(&self.members).get(&id).map(|m| m.epoch);
        let world = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            if lock(&world.members).get(&id).map(|m| m.epoch) == epoch {
                world.fault(format!("node {id} restarts"));
                world.start_member(id).await;
            }
        });
    }

    async fn run(self: Arc<Self>) -> Report {
        for id in self.ids() {
            self.start_member(id).await;
        }
        let end = Instant::now() + self.opts.load;
        let monitor = tokio::spawn(self.clone().monitor());
        let nemesis = tokio::spawn(self.clone().nemesis(end));
        let clients: Vec<_> = (0..CLIENTS)
            .map(|c| tokio::spawn(self.clone().client(c, end)))
            .collect();
        let watchers: Vec<_> = (0..WATCHERS)
            .map(|w| tokio::spawn(self.clone().watcher(w)))
            .collect();
        let _ = nemesis.await;
        for c in clients {
            let _ = c.await;
        }
        self.heal().await;
        let settled = self.settle().await;
        let mut fence = 0;
        if settled {
            fence = self.final_reads().await;
            self.check_logs().await;
        }
        *lock(&self.fence) = Some((fence, Instant::now() + Duration::from_secs(5)));
        for w in watchers {
            let _ = w.await;
        }
        if !settled {
            self.violation(
                "the cluster did not recover within 30 s of simulated time after every fault was healed".into(),
            );
        }
        monitor.abort();
        for id in 1..=self.spare() {
            self.crash(id, |n| n);
        }
        let history = std::mem::take(&mut *lock(&self.history));
        let stale_reads = std::mem::take(&mut *lock(&self.stale_reads));
        let watchers = std::mem::take(&mut *lock(&self.watch_logs));
        let mut observed = std::mem::take(&mut *lock(&self.observed));
        observed.violations.extend(self.net.findings());
        let acked = history
            .iter()
            .filter(|r| matches!(r.input, Input::Put(_) | Input::Delete) && r.ret.is_some())
            .count();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        history.hash(&mut h);
        watchers.hash(&mut h);
        observed.faults.hash(&mut h);
        self.net.sent().hash(&mut h);
        Report {
            history,
            stale_reads,
            violations: observed.violations,
            faults: observed.faults,
            watchers,
            fence,
            acked,
            fingerprint: h.finish(),
        }
    }

    fn leader(&self) -> Option<NodeId> {
        self.running().into_iter().find_map(|(id, r)| {
            (r.raft.metrics().borrow().state == ServerState::Leader).then_some(id)
        })
    }

    /// Ends every fault and starts every member that is down.
    async fn heal(self: &Arc<Self>) {
        self.net.heal();
        self.net.set_weather(Weather::calm());
        let down: Vec<NodeId> = {
            let members = lock(&self.members);
            for m in members.values() {
                m.disk.set_full(false);
                m.disk.fail_flushes(0);
                m.disk.fail_marker_writes(0);
            }
            members
                .iter()
                .filter(|(_, m)| m.running.is_none())
                .map(|(id, _)| *id)
                .collect()
        };
        let spare_member = self.membership().is_some_and(|m| m.contains(&self.spare()));
        let down = down
            .into_iter()
            .filter(|id| *id != self.spare() || spare_member);
        for id in down {
            if let Some(m) = lock(&self.members).get_mut(&id) {
                m.epoch += 1;
            }
            self.start_member(id).await;
        }
        if let Some(l) = self.leader().and_then(|l| self.replica(l)) {
            let all: std::collections::BTreeSet<NodeId> = self.ids().into_iter().collect();
            let _ =
                tokio::time::timeout(Duration::from_secs(5), l.raft.change_membership(all, true))
                    .await;
        }
    }

    /// Waits until one member leads and every member has applied its log.
    async fn settle(self: &Arc<Self>) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            // A member whose Raft stopped is restarted by its supervisor.
            let Some(members) = self.membership() else {
                continue;
            };
            let running: Vec<_> = self
                .running()
                .into_iter()
                .filter(|(id, _)| members.contains(id))
                .collect();
            if running.len() < members.len() {
                continue;
            }
            let Some(leader) = self.leader().and_then(|l| self.replica(l)) else {
                continue;
            };
            // A change its leader did not finish (a joint configuration) is
            // finished, as an operator retrying it would.
            let joint = leader
                .raft
                .metrics()
                .borrow()
                .membership_config
                .membership()
                .get_joint_config()
                .len()
                > 1;
            if joint {
                let all: std::collections::BTreeSet<NodeId> = self.ids().into_iter().collect();
                let change = leader.raft.change_membership(all, true);
                let _ = tokio::time::timeout(Duration::from_secs(2), change).await;
                continue;
            }
            let target = leader.raft.metrics().borrow().last_log_index;
            if running
                .iter()
                .all(|(_, r)| r.raft.metrics().borrow().last_applied.map(|l| l.index) == target)
                && leader.proposer.read_index().await.is_ok()
            {
                return true;
            }
        }
        false
    }
}
