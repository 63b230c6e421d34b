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

pub mod disk;
pub mod net;

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

    /// Checks Raft's invariants on every member every few milliseconds.
    async fn monitor(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        loop {
            tick.tick().await;
            for (id, replica) in self.running() {
                let metrics = replica.raft.metrics();
                let m = metrics.borrow();
                let mut o = lock(&self.observed);
                // Check-quorum: a leader cut off from its quorum steps down
                // within its lease (plus the poll and an RPC deadline).
                let cut_off = self.cut_off(id, &m);
                let since = o.cut_off.get(&id).copied();
                match (cut_off, since) {
                    (false, _) => {
                        o.cut_off.remove(&id);
                    }
                    (true, None) => {
                        o.cut_off.insert(id, Instant::now());
                    }
                    (true, Some(t)) if m.state == ServerState::Leader => {
                        let limit = self.timing.election_max
                            + self.timing.rpc_timeout
                            + self.timing.heartbeat * 4;
                        if t.elapsed() > limit {
                            let v = format!(
                                "node {id} still leads {} ms after it was cut off from its quorum",
                                t.elapsed().as_millis()
                            );
                            o.violations.push(v);
                            o.cut_off.remove(&id);
                        }
                    }
                    _ => {}
                }
                // Openraft's leader ids are (term, node): two nodes may lead
                // one term, but a leader's id names it, and its vote is committed.
                if m.state == ServerState::Leader
                    && (m.vote.leader_id().voted_for() != Some(id) || !m.vote.is_committed())
                {
                    let v = format!("node {id} leads under vote {}", m.vote);
                    o.violations.push(v);
                }
                if let Some(applied) = m.last_applied {
                    match o.applied.get(&applied.index) {
                        Some(l) if *l != applied => {
                            let v = format!(
                                "index {} applied as {l} on one node and as {applied} on node {id}",
                                applied.index
                            );
                            o.violations.push(v);
                        }
                        Some(_) => {}
                        None => {
                            o.applied.insert(applied.index, applied);
                        }
                    }
                }
                let (revision, digest) = digest(&replica);
                match o.states.get(&revision) {
                    Some(d) if *d != digest => {
                        let v = format!(
                            "node {id}'s state at revision {revision} differs from another node's"
                        );
                        o.violations.push(v);
                    }
                    Some(_) => {}
                    None => {
                        o.states.insert(revision, digest);
                    }
                }
            }
        }
    }

    /// Picks a fault every 50-400 ms until `end`.
    async fn nemesis(self: Arc<Self>, end: Instant) {
        loop {
            let pause = self.rng(|r| r.u64(50..400));
            tokio::time::sleep(Duration::from_millis(pause)).await;
            if Instant::now() >= end {
                return;
            }
            let ids = self.ids();
            let (pick, a, b, k) = self.rng(|r| {
                (
                    r.u32(0..15),
                    ids[r.usize(..ids.len())],
                    ids[r.usize(..ids.len())],
                    r.u64(..),
                )
            });
            // Faults aimed at the leader half the time: that is where they bite.
            let a = match self.leader() {
                Some(l) if k % 2 == 0 => l,
                _ => a,
            };
            match pick {
                0 => {
                    for o in self.ids().into_iter().filter(|o| *o != a) {
                        self.net.cut(a, o);
                        self.net.cut(o, a);
                    }
                    self.fault(format!("node {a} cut off"));
                }
                1 if a != b => {
                    self.net.cut(a, b);
                    self.fault(format!("link {a} -> {b} cut (one way)"));
                }
                2 | 3 => {
                    self.net.heal();
                    self.fault("network healed".into());
                }
                4 | 5 => {
                    let kept = self.rng(|r| r.u32(0..3));
                    let n = lock(&self.members)
                        .get(&a)
                        .map_or(0, |m| m.disk.unflushed());
                    let keep = match kept {
                        0 => 0,
                        1 => n,
                        _ => (k as usize >> 8) % (n + 1),
                    };
                    if self.crash(a, |_| keep) {
                        self.fault(format!(
                            "node {a} crashes, keeping {keep} of {n} unflushed writes"
                        ));
                        self.restart_later(a, Duration::from_millis(k % 1500 + 20));
                    }
                }
                6 => self.stop(a, Duration::from_millis(k % 1000 + 50)).await,
                7 => {
                    let ms = k % 1200 + 100;
                    if let Some(d) = lock(&self.members).get(&a).map(|m| m.disk.clone()) {
                        d.set_full(true);
                        self.fault(format!("node {a}'s disk is full for {ms} ms"));
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_millis(ms)).await;
                            d.set_full(false);
                        });
                    }
                }
                8 => {
                    if let Some(m) = lock(&self.members).get(&a) {
                        m.disk.fail_flushes(1);
                    }
                    self.fault(format!("node {a}'s next flush fails"));
                }
                9 => {
                    if let Some(m) = lock(&self.members).get(&a) {
                        m.disk.fail_marker_writes(1);
                    }
                    self.fault(format!("node {a}'s next marker write fails"));
                }
                10 => {
                    let rough = k % 3 == 0;
                    self.net.set_weather(if rough {
                        Weather {
                            delay_min: Duration::from_micros(500),
                            delay_max: Duration::from_millis(k % 30 + 5),
                            loss: (k % 150) as u32,
                            duplicate: 50,
                        }
                    } else {
                        Weather::calm()
                    });
                    self.fault(format!("weather {:?}", self.net.weather()));
                }
                11 => {
                    if let Some(r) = self.replica(a) {
                        let _ = r.raft.trigger().snapshot().await;
                        self.fault(format!("node {a} builds a snapshot"));
                    }
                }
                12..=14 => self.change_membership(a, k >> 16).await,
                _ => {}
            }
        }
    }

    /// Whether member `id` cannot reach a quorum of the voters (itself
    /// included) both ways.
    fn cut_off(&self, id: NodeId, m: &openraft::RaftMetrics<NodeId, Node>) -> bool {
        let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
        let reachable = voters
            .iter()
            .filter(|v| {
                **v == id
                    || (!self.net.is_cut(id, **v)
                        && !self.net.is_cut(**v, id)
                        && self.replica(**v).is_some())
            })
            .count();
        reachable * 2 <= voters.len()
    }

    fn leader(&self) -> Option<NodeId> {
        self.running().into_iter().find_map(|(id, r)| {
            (r.raft.metrics().borrow().state == ServerState::Leader).then_some(id)
        })
    }

    /// A stop by SIGTERM, as `NodeHandle::shutdown` does it: stop proposing,
    /// hand leadership over, stop Raft, sync the log; back after `down`.
    async fn stop(self: &Arc<Self>, id: NodeId, down: Duration) {
        let Some(replica) = self.replica(id) else {
            return;
        };
        self.fault(format!("node {id} is stopped (SIGTERM)"));
        replica.proposer.close();
        let to = leadership::transfer(
            &replica.raft,
            &replica.me,
            &replica.peers,
            leadership::TRANSFER_LIMIT,
        )
        .await;
        if let Some(to) = to {
            self.fault(format!("node {id} handed leadership to node {to}"));
        }
        let _ = replica.raft.shutdown().await;
        let synced = replica.log.sync().await.is_ok();
        if self.crash(id, |n| if synced { n } else { 0 }) {
            self.restart_later(id, down);
        }
    }

    /// Through the leader: the spare node joins as a learner, is made a
    /// voter, or is removed and wiped; or a voter is made a learner, or
    /// every initial member a voter again.
    async fn change_membership(self: &Arc<Self>, id: NodeId, k: u64) {
        let Some(leader) = self.leader().and_then(|l| self.replica(l)) else {
            return;
        };
        if k.is_multiple_of(2) {
            return self.move_spare(&leader).await;
        }
        let voters: std::collections::BTreeSet<NodeId> = leader
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect();
        let all: std::collections::BTreeSet<NodeId> = self.ids().into_iter().collect();
        let (next, what) = if voters != all {
            (all, "every member is a voter again".to_string())
        } else if voters.len() > 3 || (voters.len() == 3 && id != leader.me.node_id) {
            let mut v = voters.clone();
            v.remove(&id);
            (v, format!("node {id} is made a learner"))
        } else {
            return;
        };
        let change = tokio::time::timeout(
            Duration::from_secs(2),
            leader.raft.change_membership(next, true),
        )
        .await;
        if matches!(change, Ok(Ok(_))) {
            self.fault(what);
        }
    }

    async fn move_spare(self: &Arc<Self>, leader: &Replica) {
        let spare = self.spare();
        let m = leader.raft.metrics().borrow().membership_config.clone();
        let membership = m.membership();
        let limit = Duration::from_secs(2);
        let (change, what) = if membership.get_node(&spare).is_none() {
            self.start_member(spare).await;
            // As `AddMember` does: the new node is asked who it is, and added
            // bound to its data directory.
            let Some(incarnation) = lock(&self.members)
                .get(&spare)
                .and_then(|m| m.identity.as_ref().map(|i| i.incarnation))
            else {
                return;
            };
            let node = Node {
                addr: format!("node{spare}:5000"),
                peer_addr: net::peer_addr(spare),
                incarnation,
            };
            let add = tokio::time::timeout(limit, leader.raft.add_learner(spare, node, false));
            (add.await.is_ok_and(|r| r.is_ok()), "joins as a learner")
        } else if membership.voter_ids().all(|v| v != spare) {
            let mut voters: std::collections::BTreeSet<NodeId> = membership.voter_ids().collect();
            voters.insert(spare);
            let change = leader.raft.change_membership(voters, true);
            let done = tokio::time::timeout(limit, change).await;
            (done.is_ok_and(|r| r.is_ok()), "is made a voter")
        } else {
            let voters: std::collections::BTreeSet<NodeId> =
                membership.voter_ids().filter(|v| *v != spare).collect();
            let change = leader.raft.change_membership(voters, false);
            let done = tokio::time::timeout(limit, change)
                .await
                .is_ok_and(|r| r.is_ok());
            if done {
                // Removed: stopped and wiped, to join again as a new node.
                self.crash(spare, |n| n);
                lock(&self.members).insert(spare, Member::new());
            }
            (done, "is removed and wiped")
        };
        if change {
            self.fault(format!("node {spare} {what}"));
        }
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

    /// A write to a key of its own (the fence every watcher must reach),
    /// then a linearizable read of every key, so that a lost write shows.
    /// Returns the fence's revision.
    async fn final_reads(self: &Arc<Self>) -> u64 {
        self.operation(FINAL_READER, KEYS, Input::Put(u64::MAX))
            .await;
        for key in 0..=KEYS {
            self.operation(FINAL_READER, key, Input::Get).await;
        }
        lock(&self.history)
            .iter()
            .find(|r| r.client == FINAL_READER && r.input == Input::Put(u64::MAX))
            .and_then(|r| r.revision)
            .unwrap_or(0)
    }

    /// Log matching: entries at the same index and term are the same on
    /// every member, and every applied entry is still in the logs or
    /// covered by a snapshot. (A node that is no member any more, such as a
    /// joining node whose addition was lost with its leader, keeps a stale
    /// log nobody replicates to: it is left out.)
    async fn check_logs(&self) {
        let members = self.membership().unwrap_or_default();
        let mut logs = BTreeMap::new();
        for (id, replica) in self.running() {
            if !members.contains(&id) {
                continue;
            }
            let mut reader = replica.log.clone();
            match reader.try_get_log_entries(0..).await {
                Ok(entries) => {
                    logs.insert(id, entries);
                }
                Err(e) => self.violation(format!("node {id}'s log cannot be read: {e}")),
            }
        }
        let mut seen: BTreeMap<LogId<NodeId>, (NodeId, Vec<u8>)> = BTreeMap::new();
        for (id, entries) in &logs {
            for e in entries {
                let bytes = crate::raft::encode(&e.payload).unwrap_or_default();
                match seen.get(&e.log_id) {
                    Some((other, b)) if *b != bytes => self.violation(format!(
                        "log matching: entry {} differs between nodes {other} and {id}",
                        e.log_id
                    )),
                    Some(_) => {}
                    None => {
                        seen.insert(e.log_id, (*id, bytes));
                    }
                }
            }
        }
        let applied: Vec<LogId<NodeId>> = lock(&self.observed).applied.values().copied().collect();
        for (id, entries) in &logs {
            let Some(first) = entries.first().map(|e| e.log_id.index) else {
                continue;
            };
            for l in applied.iter().filter(|l| l.index >= first) {
                let held = entries.iter().find(|e| e.log_id.index == l.index);
                if held.map(|e| e.log_id) != Some(*l) {
                    self.violation(format!(
                        "applied entry {l} is not in node {id}'s log (it holds {:?})",
                        held.map(|e| e.log_id)
                    ));
                }
            }
        }
    }

    /// A client: random operations on random keys until `end`.
    async fn client(self: Arc<Self>, client: usize, end: Instant) {
        while Instant::now() < end {
            let (key, pick, value) = self.rng(|r| (r.u64(..KEYS), r.u32(0..10), r.u64(1..)));
            let input = match pick {
                0..=3 => Input::Put(value),
                4 | 5 => Input::Delete,
                6 | 7 => Input::Get,
                8 => Input::Exists,
                _ => {
                    self.stale_read(key);
                    continue;
                }
            };
            self.operation(client, key, input).await;
            let pause = self.rng(|r| r.u64(0..20));
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
    }

    /// Any member's own state, however far behind.
    fn stale_read(&self, key: u64) {
        let running = self.running();
        if running.is_empty() {
            return;
        }
        let i = self.rng(|r| r.usize(..running.len()));
        let v = read_value(&running[i].1, key);
        lock(&self.stale_reads).push(v);
    }

    /// One operation, sent where the client believes the leader is and
    /// redirected as a follower would forward it; recorded in the history.
    async fn operation(&self, client: usize, key: u64, input: Input) {
        let call = self.now();
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut target = self.leader().unwrap_or(1);
        let mut revision = None;
        let output = loop {
            if Instant::now() >= deadline {
                break Output::Unknown;
            }
            let Some(replica) = self.replica(target) else {
                // Connection refused: nothing was sent; try another member.
                target = self.rng(|r| r.u64(1..=self.opts.nodes as u64));
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            match attempt(&replica, key, input).await {
                Ok((out, rev)) => {
                    revision = rev;
                    break out;
                }
                Err(Refusal::NotLeader(f)) => {
                    target = match f.leader_id {
                        Some(l) if l != target => l,
                        _ => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            self.rng(|r| r.u64(1..=self.opts.nodes as u64))
                        }
                    };
                }
                // A write may have been applied; a read just failed.
                Err(Refusal::Failed(_)) => match input {
                    Input::Put(_) | Input::Delete => break Output::Unknown,
                    _ => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                },
            }
        };
        // An unanswered read says nothing: only writes of unknown outcome count.
        if output == Output::Unknown && matches!(input, Input::Get | Input::Exists) {
            return;
        }
        let ret = (output != Output::Unknown).then(|| self.now());
        lock(&self.history).push(Record {
            client,
            key,
            input,
            output,
            call,
            ret,
            revision,
        });
    }

    /// Whether watchers may stop: the end's fence is set, and `last` reached
    /// it (or the time to reach it ran out).
    fn watch_done(&self, last: u64) -> bool {
        lock(&self.fence).is_some_and(|(fence, until)| last >= fence || Instant::now() >= until)
    }

    /// A watcher of the service: a stream on a random member for a while,
    /// then another resuming from the last revision it received (as a
    /// client does when its connection breaks), until the end's fence.
    async fn watcher(self: Arc<Self>, w: usize) {
        let mut last = 0u64;
        while !self.watch_done(last) {
            let running = self.running();
            if running.is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            let (i, length) = self.rng(|r| (r.usize(..running.len()), r.u64(100..1000)));
            let (node, replica) = running[i].clone();
            let until = Instant::now() + Duration::from_millis(length);
            let mut session = WatchSession {
                node,
                since: last,
                msgs: Vec::new(),
            };
            let mut stream = Box::pin(watch_stream(
                replica.state.clone(),
                Some(SERVICE.into()),
                last,
            ));
            loop {
                match tokio::time::timeout(Duration::from_millis(20), stream.next()).await {
                    Ok(Some(m)) => {
                        last = last.max(m.revision);
                        session.msgs.push(WatchMsg {
                            revision: m.revision,
                            reset: m.reset.is_some(),
                            instances: m.instances.iter().filter_map(key_value).collect(),
                            events: m
                                .events
                                .iter()
                                .filter_map(|e| {
                                    let (k, v) = key_value(&e.instance)?;
                                    let v = (e.kind == EventKind::Put).then_some(v);
                                    Some((e.revision, k, v))
                                })
                                .collect(),
                        });
                    }
                    Ok(None) => break,
                    Err(_) => {}
                }
                // The member's process is gone (its stream would go on from
                // the dead process's memory), the session is over, or the end.
                let same = self
                    .replica(node)
                    .is_some_and(|r| Arc::ptr_eq(&r, &replica));
                if !same || Instant::now() >= until || self.watch_done(last) {
                    break;
                }
            }
            lock(&self.watch_logs)[w].push(session);
        }
    }
}

fn instance_id(key: u64) -> String {
    format!("i{key}")
}

fn read_value(replica: &Replica, key: u64) -> Option<u64> {
    let state = replica.state.read().unwrap_or_else(|p| p.into_inner());
    state
        .catalog
        .get(SERVICE, &instance_id(key))
        .and_then(|i| i.address.parse().ok())
}

/// The applied state's revision, and what it holds as a number.
fn digest(replica: &Replica) -> (u64, u64) {
    let state = replica.state.read().unwrap_or_else(|p| p.into_inner());
    let mut instances: Vec<_> = state
        .catalog
        .all_instances()
        .map(|i| (&i.service, &i.id, &i.address, i.mod_revision))
        .collect();
    instances.sort();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    instances.hash(&mut h);
    (state.catalog.revision(), h.finish())
}

/// One try of `input` on `replica`: its answer, and for a write the
/// revision it was applied at.
async fn attempt(
    replica: &Replica,
    key: u64,
    input: Input,
) -> Result<(Output, Option<u64>), Refusal> {
    let p = &replica.proposer;
    match input {
        Input::Put(v) => {
            let r = p.propose(Command::Register(instance(key, v))).await?;
            Ok(match r.outcome {
                Outcome::Registered(_) => (Output::Ok, Some(r.revision)),
                _ => (Output::Unknown, None),
            })
        }
        Input::Delete => {
            let cmd = Command::Deregister {
                service: SERVICE.into(),
                id: instance_id(key),
            };
            let r = p.propose(cmd).await?;
            Ok(match r.outcome {
                Outcome::Deregistered => (Output::Ok, Some(r.revision)),
                Outcome::NotFound => (Output::NotFound, None),
                _ => (Output::Unknown, None),
            })
        }
        Input::Get => {
            p.read_index().await?;
            Ok((Output::Value(read_value(replica, key)), None))
        }
        Input::Exists => {
            p.current().await?;
            let out = match read_value(replica, key) {
                Some(_) => Output::Ok,
                None => Output::NotFound,
            };
            Ok((out, None))
        }
    }
}

/// An instance of the service as (key, value).
fn key_value(i: &Instance) -> Option<(u64, u64)> {
    let key = i.id.strip_prefix('i')?.parse().ok()?;
    Some((key, i.address.parse().ok()?))
}

fn instance(key: u64, value: u64) -> Instance {
    Instance {
        address: value.to_string(),
        ..Instance::example(SERVICE, &instance_id(key))
    }
}
