//! A running Roster node: storage, Raft and the gRPC server, assembled and torn down.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use openraft::error::{InitializeError, RaftError};
use openraft::storage::RaftLogStorage;
use openraft::{ServerState, SnapshotPolicy};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{ClientTlsConfig, Server};
use tonic_health::pb::health_server::{Health, HealthServer};

use crate::api::acl::AclApi;
use crate::api::auth::Authorize;
use crate::api::cluster::{Advertised, ClusterApi};
use crate::api::forward::Forward;
use crate::api::limits::RequestLimit;
use crate::api::registry::RegistryApi;
use crate::config::NodeConfig;
use crate::error::{Error, Result};
use crate::grpc::MAX_MESSAGE_BYTES;
use crate::health::{self, CheckContext};
use crate::http;
use crate::net;
use crate::peers::Peers;
use crate::proto::raft_v1::raft_transport_server::RaftTransportServer;
use crate::proto::v1 as pb;
use crate::proto::v1::acl_server::AclServer;
use crate::proto::v1::cluster_client::ClusterClient;
use crate::proto::v1::cluster_server::ClusterServer;
use crate::proto::v1::registry_server::RegistryServer;
use crate::proto::PUBLIC_DESCRIPTOR_SET;
use crate::raft::liveness::election::Contact;
use crate::raft::liveness::leadership;
use crate::raft::proposer::Proposer;
use crate::raft::replica::{Replica, Setup};
use crate::raft::replication::peer_trust::{PeerRefusals, PeerTrust};
use crate::raft::replication::pipeline::MAX_ENTRIES;
use crate::raft::storage::disk::SledLog;
use crate::raft::storage::log_store::LogStore;
use crate::raft::storage::marker::{self, Found, Identity, Marker, Progress};
use crate::raft::storage::snapshot_file::SnapshotFile;
use crate::raft::storage::state_machine::{SnapshotSummary, StateMachine};
use crate::raft::storage::{log_store, state_machine, stored};
use crate::raft::{trees, Node, NodeId, Raft};
use crate::registry::leases::Leases;
use crate::tls::{Port, Tls};
use crate::xds::{AggregatedDiscoveryServiceServer, Xds, XdsStats};

/// How long a new node waits for each initial member's status before bootstrapping.
const PEER_CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

pub struct NodeHandle {
    pub id: NodeId,
    /// The address the client port is bound to (useful when `listen` had port 0).
    pub addr: SocketAddr,
    /// The address the peer port is bound to.
    pub peer_addr: SocketAddr,
    pub raft: Raft,
    log: LogStore,
    /// This node's data directory: cluster, node id and incarnation.
    me: Identity,
    peers: Peers,
    proposer: Arc<Proposer>,
    stop: oneshot::Sender<()>,
    server: ServerTask,
    metrics: Option<JoinHandle<()>>,
    /// Reloads the TLS files when they change.
    tls_watch: Option<JoinHandle<()>>,
    dns: Option<crate::dns::DnsServer>,
    /// The HTTP/JSON API's address and task.
    http: Option<(SocketAddr, JoinHandle<()>)>,
}

/// The gRPC servers (client and peer port), until they stop.
type ServerTask = JoinHandle<std::result::Result<(), tonic::transport::Error>>;

impl NodeHandle {
    /// The address the HTTP/JSON API is served on, if it is on.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().map(|h| h.0)
    }

    /// The address DNS is served on (UDP and TCP), if it is on.
    pub fn dns_addr(&self) -> Option<SocketAddr> {
        self.dns.as_ref().map(|d| d.addr)
    }

    /// Resolves if the Raft core stops on its own (a storage or internal error):
    /// the node can no longer serve correctly and the process should exit, so
    /// that its supervisor restarts it from its data directory.
    pub async fn failed(&self) -> Error {
        let mut m = self.raft.metrics();
        let stopped = m
            .wait_for(|m| m.running_state.is_err() || m.state == ServerState::Shutdown)
            .await
            .map(|m| match &m.running_state {
                Err(e) => format!("raft core stopped: {e}"),
                Ok(()) => "raft core stopped".to_string(),
            });
        Error::Internal(
            stopped.unwrap_or_else(|_| "raft core ended without a word (panicked?)".to_string()),
        )
    }

    /// Stops proposing, hands leadership to a caught-up follower if this node
    /// leads (so a rolling restart costs no election timeout), then stops
    /// serving and shuts Raft down; the data directory can then be reopened.
    pub async fn shutdown(self) -> Result<()> {
        self.proposer.close();
        match leadership::transfer(
            &self.raft,
            &self.me,
            &self.peers,
            leadership::TRANSFER_LIMIT,
        )
        .await
        {
            Some(to) => tracing::info!("handed leadership to node {to}"),
            None => tracing::debug!("no leadership to hand over"),
        }
        let _ = self.stop.send(());
        let http = self.http.as_ref().map(|h| &h.1);
        for task in self.metrics.iter().chain(&self.tls_watch).chain(http) {
            task.abort();
        }
        if let Some(dns) = self.dns {
            dns.stop().await;
        }
        let served = self.server.await;
        self.raft
            .shutdown()
            .await
            .map_err(|e| Error::Internal(format!("raft shutdown: {e}")))?;
        // The marker then vouches for everything this node wrote, applied state included.
        self.log.sync().await.map_err(storage)?;
        match served {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::Internal(format!("server: {e}"))),
            Err(e) => Err(Error::Internal(format!("server task: {e}"))),
        }
    }
}

const IDENTITY_KEY: &[u8] = b"identity";
/// The storage format a data directory was written in, beside its identity.
const FORMAT_KEY: &[u8] = b"format";
/// Format 5 keeps the applied state only in the snapshot file, no longer also
/// in sled (migrated on start: the state sled held becomes the snapshot).
/// Format 4 adds sessions (log entries and snapshots an older binary cannot
/// read; format 3 data reads as it is). Format 3 keeps the current snapshot in
/// its own file; format 2, in sled (migrated on start). Format 2 records the
/// members' peer addresses; format 1 (no format key) is what Roster wrote
/// before that and cannot be read.
const STORAGE_FORMAT: u32 = 5;

/// The storage of a node, checked to be what it last wrote.
struct Storage {
    db: sled::Db,
    marker: Arc<Marker>,
    state_machine: StateMachine,
    /// A new data directory: this node has no state yet.
    fresh: bool,
}

/// Opens the data directory and refuses it unless it is what this node last
/// wrote. Sled panics on some damaged files (its recovery and page reads run on
/// the calling thread): such a panic becomes a storage error, not a crash.
fn open_storage(cfg: &NodeConfig) -> Result<Storage> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| open_checked(cfg))) {
        Ok(opened) => opened,
        Err(panic) => {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(Error::Storage(format!("sled panicked reading it: {why}")))
        }
    }
}

/// Verifies every record, then compares the database with the marker; a new
/// directory gets its identity here.
fn open_checked(cfg: &NodeConfig) -> Result<Storage> {
    let db = sled::Config::new()
        .path(&cfg.data_dir)
        .cache_capacity(cfg.cache_mb * 1024 * 1024)
        .open()
        .map_err(|e| Error::Storage(format!("sled cannot open it: {e}")))?;
    let meta = db.open_tree(trees::NODE_META)?;
    let stored: Option<Identity> = meta
        .get(IDENTITY_KEY)?
        .map(|b| stored::decode(&b))
        .transpose()
        .map_err(|e| Error::Storage(format!("node identity: {e}")))?;
    if let Some(id) = &stored {
        if id.cluster_id != cfg.cluster_id || id.node_id != cfg.id {
            return Err(Error::FailedPrecondition(format!(
                "data directory {} belongs to node {} of cluster {:?}, not node {} of {:?}",
                cfg.data_dir.display(),
                id.node_id,
                id.cluster_id,
                cfg.id,
                cfg.cluster_id
            )));
        }
    }
    if stored.is_some() {
        check_format(cfg, &db, &meta)?;
    }
    let recorded = Marker::read(&cfg.data_dir).map_err(|e| Error::Storage(e.to_string()))?;
    let current = state_machine::Current::read(&cfg.data_dir)?;
    let (last_log, vote_term) = log_store::inspect(&SledLog::open(&db)?)?;
    let mut has_data = false;
    for name in db.tree_names() {
        has_data |= !db.open_tree(name)?.is_empty();
    }
    has_data |= SnapshotFile::in_dir(&cfg.data_dir).exists();
    let found = Found {
        identity: stored,
        progress: Progress {
            last_log,
            vote_term,
            applied: current.applied_index(),
        },
        has_data,
    };
    marker::check(recorded.as_ref(), &found).map_err(Error::Storage)?;
    let fresh = found.identity.is_none();
    let identity = found
        .identity
        .unwrap_or_else(|| Identity::new(&cfg.cluster_id, cfg.id));
    let marker = Arc::new(Marker::new(&cfg.data_dir, identity, found.progress));
    let state_machine =
        StateMachine::open(&cfg.data_dir, current, cfg.watch_history, marker.clone())?;
    if fresh {
        let b = stored::encode(marker.identity())
            .map_err(|e| Error::Storage(format!("node identity: {e}")))?;
        meta.insert(FORMAT_KEY, encode_format(STORAGE_FORMAT)?)?;
        meta.insert(IDENTITY_KEY, b)?;
        db.flush()?;
        marker
            .write_now()
            .map_err(|e| Error::Storage(e.to_string()))?;
    }
    Ok(Storage {
        db,
        marker,
        state_machine,
        fresh,
    })
}

/// Seeds the empty data directory of a node of a new cluster with a
/// backup's state (`roster snapshot restore`): its identity, the state at the
/// backup's revision, a log that starts after it, and `members` (id to peer
/// address) as the membership. Every member is seeded from the same backup;
/// started, they elect a leader and serve that state at that revision.
pub async fn restore(
    cfg: &NodeConfig,
    backup: &SnapshotSummary,
    members: BTreeMap<NodeId, String>,
) -> Result<()> {
    if !members.contains_key(&cfg.id) {
        return Err(Error::InvalidArgument(format!(
            "node {} is not among the members given ({:?}): give its own id and address too",
            cfg.id,
            members.keys().collect::<Vec<_>>()
        )));
    }
    let dir = &cfg.data_dir;
    if std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some()) {
        return Err(Error::FailedPrecondition(format!(
            "data directory {} is not empty: a restore seeds a new node's directory; \
             give an empty or missing one",
            dir.display()
        )));
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::Storage(format!("create {}: {e}", dir.display())))?;
    let Storage {
        db,
        marker,
        mut state_machine,
        ..
    } = open_storage(cfg)?;
    let voters = members.keys().copied().collect();
    let nodes: BTreeMap<NodeId, Node> = members
        .into_iter()
        .map(|(id, addr)| (id, Node::unbound(addr)))
        .collect();
    let at = state_machine
        .seed(backup, openraft::Membership::new(vec![voters], nodes))
        .await?;
    let mut log_store = LogStore::open(&db, marker)?;
    log_store.start_after(at).await.map_err(storage)?;
    Ok(())
}

/// Recovery from a lost quorum (`roster recover`): makes a stopped node's
/// data directory that of a cluster with itself as the only voter, at
/// `peer_addr`. Every entry in its log is applied first and kept (all it
/// has: those a majority acknowledged are among them); the members are then
/// added back with `roster member add`, from empty data directories.
/// Returns the log index it now starts after.
pub async fn recover(cfg: &NodeConfig, peer_addr: String) -> Result<u64> {
    use openraft::storage::RaftStateMachine;
    use openraft::RaftLogReader;

    let Storage {
        db,
        marker,
        mut state_machine,
        fresh,
    } = open_storage(cfg).map_err(|e| match e {
        Error::Storage(what) if what.contains("sled cannot open it") => {
            Error::FailedPrecondition(format!("{what}: is the node still running? Stop it first"))
        }
        Error::Storage(what) => damaged(cfg, &what),
        e => e,
    })?;
    if fresh {
        return Err(Error::FailedPrecondition(format!(
            "data directory {} holds no node's data: nothing to recover",
            cfg.data_dir.display()
        )));
    }
    let mut log_store = LogStore::open(&db, marker)?;
    let (applied, _) = state_machine.applied_state().await.map_err(storage)?;
    let last = log_store
        .get_log_state()
        .await
        .map_err(storage)?
        .last_log_id;
    let from = applied.map_or(0, |l| l.index + 1);
    let entries = log_store
        .try_get_log_entries(from..)
        .await
        .map_err(storage)?;
    if !entries.is_empty() {
        state_machine.apply(entries).await.map_err(storage)?;
    }
    let Some(at) = last.max(applied) else {
        return Err(Error::FailedPrecondition(
            "the node has neither log entries nor state: nothing to recover".into(),
        ));
    };
    let me = BTreeMap::from([(cfg.id, Node::unbound(peer_addr))]);
    let membership = openraft::Membership::new(vec![me.keys().copied().collect()], me);
    state_machine.reseat(at, membership).await?;
    log_store.start_after(at).await.map_err(storage)?;
    Ok(at.index)
}

fn encode_format(format: u32) -> Result<Vec<u8>> {
    stored::encode(&format).map_err(|e| Error::Storage(format!("storage format: {e}")))
}

/// Migrates a data directory of an older storage format that this binary
/// knows how to read, and refuses one of any other format, before anything
/// in it is decoded as this format.
fn check_format(cfg: &NodeConfig, db: &sled::Db, meta: &sled::Tree) -> Result<()> {
    let found: u32 = match meta.get(FORMAT_KEY)? {
        Some(b) => {
            stored::decode(&b).map_err(|e| Error::Storage(format!("storage format: {e}")))?
        }
        None => 1,
    };
    let dir = cfg.data_dir.display();
    let why = match found {
        f if f == STORAGE_FORMAT => return Ok(()),
        f @ 2..=4 => {
            if f == 2 {
                state_machine::migrate_snapshot(db, &cfg.data_dir)?;
            }
            state_machine::migrate_tree(db, &cfg.data_dir)?;
            meta.insert(FORMAT_KEY, encode_format(STORAGE_FORMAT)?)?;
            db.flush()?;
            tracing::info!(data_dir = %dir, "migrated the data directory from storage format {f} to {STORAGE_FORMAT}");
            return Ok(());
        }
        f if f > STORAGE_FORMAT => format!(
            "it was written by a newer Roster (storage format {f}); this binary reads \
             format {STORAGE_FORMAT}: run the newer version"
        ),
        f => format!(
            "it was written by an older Roster (storage format {f}); this binary reads \
             format {STORAGE_FORMAT} and migrates formats 2 to 4, but has no migration from {f}: \
             keep running the older version, or start this node on an empty directory and add it \
             as a new member (roster member remove, then roster member add)"
        ),
    };
    Err(Error::FailedPrecondition(format!(
        "data directory {dir} cannot be opened: {why}"
    )))
}

/// The refusal to start on a damaged or replaced data directory, with the way back.
fn damaged(cfg: &NodeConfig, what: &str) -> Error {
    Error::Storage(format!(
        "data directory {} is not what node {} last wrote: {what}. \
         The node refuses to start rather than take part with lost state. {}",
        cfg.data_dir.display(),
        cfg.id,
        recovery(cfg)
    ))
}

/// How to bring back a node whose state is gone: as a new member.
fn recovery(cfg: &NodeConfig) -> String {
    let dir = cfg.data_dir.display();
    let id = cfg.id;
    format!(
        "To recover: on a running member run `roster member remove --id {id}`, \
         delete {dir}, start this node without --initial-cluster, then run \
         `roster member add --id {id} --address {}`",
        cfg.advertise_addr()
    )
}

/// A new data directory under an id the running cluster has heard from means
/// this node's earlier state is gone: it must not vote again as that member.
/// Only a leader knows which members acknowledged entries; unreachable peers
/// are skipped (all initial members starting together reach none).
async fn check_not_known(
    cfg: &NodeConfig,
    members: &BTreeMap<NodeId, String>,
    tls: Option<&ClientTlsConfig>,
) -> Result<()> {
    for addr in members
        .iter()
        .filter(|(id, _)| **id != cfg.id)
        .map(|(_, a)| a)
    {
        let Some(status) = peer_status(addr, tls).await else {
            continue;
        };
        if status.cluster_id != cfg.cluster_id {
            continue;
        }
        let leader = if status.leader_id == status.node_id {
            Some(status)
        } else {
            match status.members.iter().find(|m| m.id == status.leader_id) {
                Some(m) => peer_status(&m.peer_address, tls).await,
                None => None,
            }
        };
        let acked = leader
            .iter()
            .flat_map(|l| &l.members)
            .find(|m| m.id == cfg.id)
            .and_then(|m| m.acknowledged_index);
        if let Some(index) = acked {
            return Err(damaged(
                cfg,
                &format!(
                    "it is empty, but cluster {:?} is running with node {} as a member that acknowledged log index {index}",
                    cfg.cluster_id, cfg.id
                ),
            ));
        }
    }
    Ok(())
}

async fn peer_status(addr: &str, tls: Option<&ClientTlsConfig>) -> Option<pb::StatusResponse> {
    let ch = crate::grpc::channel(addr, PEER_CHECK_TIMEOUT, tls).ok()?;
    let mut req = tonic::Request::new(pb::StatusRequest::default());
    req.set_timeout(PEER_CHECK_TIMEOUT);
    ClusterClient::new(ch)
        .status(req)
        .await
        .ok()
        .map(|r| r.into_inner())
}

pub(crate) fn raft_config(cfg: &NodeConfig) -> Result<openraft::Config> {
    let r = &cfg.raft;
    let t = r.timing();
    let ms = |d: Duration| d.as_millis() as u64;
    let c = openraft::Config {
        cluster_name: cfg.cluster_id.clone(),
        // Openraft's heartbeat interval is the deadline of each AppendEntries
        // and leadership confirmation; heartbeats and elections are driven by
        // `raft::election` instead (see there why).
        heartbeat_interval: ms(t.rpc_timeout),
        enable_heartbeat: false,
        enable_elect: false,
        // Its lease: a voter that heard from a leader this recently refuses a
        // vote. As short as openraft allows, so that a candidate that passed
        // the pre-vote is not refused (`Timing::vote_lease`).
        election_timeout_min: ms(t.rpc_timeout) + 1,
        election_timeout_max: ms(t.vote_lease()),
        snapshot_policy: SnapshotPolicy::LogsSinceLast(staggered(
            r.snapshot_after_entries(),
            cfg.id,
        )),
        max_in_snapshot_log_to_keep: r.keep_entries_after_snapshot(),
        // Each chunk has this long: 10 s covers 512 KiB down to ~50 KiB/s.
        install_snapshot_timeout: 10_000,
        snapshot_max_chunk_size: 512 * 1024,
        // Up to MAX_ENTRIES entries an AppendEntries; the network splits larger messages.
        max_payload_entries: MAX_ENTRIES,
        ..Default::default()
    };
    c.validate()
        .map_err(|e| Error::InvalidArgument(format!("raft config: {e}")))
}

/// The snapshot interval of node `id`: the configured one plus an eighth of
/// it per id step (up to three eighths), so that members do not all build a
/// snapshot of the same large catalogue at the same entry and starve the
/// Raft tasks of a small machine together.
fn staggered(entries: u64, id: NodeId) -> u64 {
    entries + entries / 8 * (id % 4)
}

/// What the node's front-ends and background tasks share.
struct Core {
    replica: Replica,
    /// What the xDS streams do, for the metrics.
    xds: Arc<XdsStats>,
    /// What the peer port refused, for the metrics.
    peer_refusals: Arc<PeerRefusals>,
}

/// Opens the data directory, starts Raft and serves gRPC on `cfg.listen`.
/// A node whose data directory is empty bootstraps the initial cluster.
pub async fn start(cfg: NodeConfig) -> Result<NodeHandle> {
    let members = cfg
        .validate()
        .map_err(|e| Error::InvalidArgument(e.to_string()))?;
    for warning in cfg.warnings() {
        tracing::warn!("{warning}");
    }
    let tls = cfg.tls.as_ref().map(Tls::load).transpose()?;
    let (core, pristine) = start_raft(&cfg, &members, tls.as_deref()).await?;
    // Before the peer port answers: a vote granted to a member that
    // initialized first would make this node's own initialize fail (openraft
    // logs that as an ERROR although nothing is wrong).
    if !members.is_empty() && pristine {
        bootstrap(&core.replica.raft, members).await?;
    }
    let (listener, addr) = bind(cfg.listen).await?;
    let (peer_listener, peer_addr) = bind(cfg.peer_listen).await?;
    let leases = Arc::new(Leases::default());
    let health_service = spawn_tasks(&core, &cfg, leases.clone());
    let (stop, server, http_stacks) = serve(
        &core,
        &cfg,
        Listeners {
            client: listener,
            peer: peer_listener,
        },
        tls.clone(),
        leases,
        health_service,
    )?;
    let tls_watch = tls.clone().map(|tls| {
        let peers = core.replica.peers.clone();
        let reloaded = tls.clone();
        tokio::spawn(crate::tls::watch(tls, move || {
            peers.set_tls(reloaded.dial_peers())
        }))
    });
    let metrics = match cfg.metrics_listen {
        Some(addr) => Some(
            crate::metrics::serve(
                addr,
                crate::metrics::Sources {
                    raft: core.replica.raft.clone(),
                    state: core.replica.state.clone(),
                    peers: core.replica.peers.clone(),
                    contact: core.replica.contact.clone(),
                    fsync: core.replica.log.fsync_seconds(),
                    xds: core.xds.clone(),
                    peer_refusals: core.peer_refusals.clone(),
                },
                core.replica.timing.election_min,
            )
            .await?,
        ),
        None => None,
    };
    let http = match cfg.http.listen {
        Some(at) => {
            let (listener, bound) = bind(at).await?;
            let https = tls_source(&tls, Port::Http).map(|tls| http::Https {
                tls,
                handshake: Duration::from_millis(cfg.connections.handshake_timeout_ms),
            });
            let (registry, cluster) = http_stacks;
            Some((bound, http::serve(listener, https, registry, cluster)))
        }
        None => None,
    };
    let dns = match cfg.dns.listen {
        Some(at) => Some(
            crate::dns::DnsServer::start(at, dns_zone(&cfg)?, core.replica.state.clone()).await?,
        ),
        None => None,
    };
    tracing::info!(id = cfg.id, %addr, %peer_addr, cluster = %cfg.cluster_id, "node started");
    Ok(NodeHandle {
        id: cfg.id,
        addr,
        peer_addr,
        raft: core.replica.raft,
        log: core.replica.log,
        me: core.replica.me,
        peers: core.replica.peers,
        proposer: core.replica.proposer,
        stop,
        server,
        metrics,
        tls_watch,
        dns,
        http,
    })
}

/// What the DNS front-end answers for, from `[dns]`; with auth on, DNS
/// answers with a token's scope, so it needs one.
fn dns_zone(cfg: &NodeConfig) -> Result<crate::dns::Zone> {
    let d = &cfg.dns;
    let domain = if d.domain.ends_with('.') {
        d.domain.clone()
    } else {
        format!("{}.", d.domain)
    };
    let domain = hickory_server::proto::rr::Name::from_ascii(&domain)
        .map_err(|e| Error::InvalidArgument(format!("[dns] domain {:?}: {e}", d.domain)))?;
    let token =
        match (&d.token, cfg.auth.enabled) {
            (Some(secret), true) => Some(crate::api::auth::hash_secret(secret)),
            (None, true) => return Err(Error::InvalidArgument(
                "[dns] is on and [auth] enabled, but DNS queries carry no token: set [dns] token \
                 to the secret of a read token whose scope DNS may answer for"
                    .into(),
            )),
            (_, false) => None,
        };
    Ok(crate::dns::Zone {
        domain,
        ttl: d.ttl_s,
        token,
    })
}

async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Unavailable(format!("bind {addr}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| Error::Internal(e.to_string()))?;
    Ok((listener, bound))
}

/// Opens and checks the data directory and starts the Raft core on it; also
/// says whether this node has never voted nor logged anything (it may
/// bootstrap).
async fn start_raft(
    cfg: &NodeConfig,
    members: &BTreeMap<NodeId, String>,
    tls: Option<&Tls>,
) -> Result<(Core, bool)> {
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|e| Error::Storage(format!("create {}: {e}", cfg.data_dir.display())))?;
    let Storage {
        db,
        marker,
        state_machine,
        fresh,
    } = open_storage(cfg).map_err(|e| match e {
        Error::Storage(what) => damaged(cfg, &what),
        e => e,
    })?;
    let me = marker.identity().clone();
    let mut log_store = LogStore::open(&db, marker)?;
    let dial_peers = tls.map(Tls::dial_peers);
    if fresh && !members.is_empty() {
        check_not_known(cfg, members, dial_peers.as_ref()).await?;
    }
    let pristine = Replica::pristine(&mut log_store).await?;
    let timing = cfg.raft.timing();
    let setup = Setup {
        id: cfg.id,
        config: raft_config(cfg)?,
        timing,
        request_timeout: cfg.request_timeout(),
        client_addr: cfg.advertise_addr(),
        peers: Peers::new(timing.rpc_timeout, dial_peers),
    };
    let replica = Replica::start(setup, log_store, state_machine, me).await?;
    let core = Core {
        replica,
        xds: Arc::default(),
        peer_refusals: Arc::default(),
    };
    Ok((core, pristine))
}

/// Starts what runs beside the server: health checks (on the leader),
/// heartbeats and elections, the quorum check, readiness reporting. Returns
/// the gRPC health service readiness is reported on.
fn spawn_tasks(core: &Core, cfg: &NodeConfig, leases: Arc<Leases>) -> HealthServer<impl Health> {
    let (raft, timing) = (&core.replica.raft, core.replica.timing);
    tokio::spawn(health::supervise(
        raft.clone(),
        cfg.id,
        Arc::new(CheckContext {
            state: core.replica.state.clone(),
            proposer: core.replica.proposer.clone(),
            leases,
            max_concurrent_probes: cfg.max_concurrent_probes,
        }),
    ));
    core.replica.spawn_consensus();
    if let Some(policy) = cfg.autopilot.policy() {
        tokio::spawn(crate::raft::liveness::autopilot::run(
            raft.clone(),
            cfg.id,
            core.replica.peers.clone(),
            policy,
            timing.heartbeat,
        ));
    }
    let (health_reporter, health) = tonic_health::server::health_reporter();
    tokio::spawn(report_readiness(
        raft.clone(),
        cfg.id,
        timing.election_min,
        timing.heartbeat,
        core.replica.contact.clone(),
        health_reporter,
    ));
    health
}

struct Listeners {
    client: TcpListener,
    peer: TcpListener,
}

/// Serves the public services on the client port, and Raft and forwarded
/// requests on the peer port, until the returned sender fires.
fn serve(
    core: &Core,
    cfg: &NodeConfig,
    listeners: Listeners,
    tls: Option<Arc<Tls>>,
    leases: Arc<Leases>,
    health: HealthServer<impl Health>,
) -> Result<(oneshot::Sender<()>, ServerTask, (http::Grpc, http::Grpc))> {
    // Both versions, since many tools still speak v1alpha; the public API only.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(PUBLIC_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| Error::Internal(format!("reflection: {e}")))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| Error::Internal(format!("reflection: {e}")))?;
    let registry = RegistryServer::new(RegistryApi::new(
        core.replica.state.clone(),
        core.replica.proposer.clone(),
        core.replica.peers.clone(),
        leases,
        cfg.limits.clone(),
    ))
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    // Every service of the client port but Raft's, whose messages are large.
    let max_request = cfg.limits.max_request_bytes;
    let registry = RequestLimit::new(registry, max_request);
    let cluster = ClusterServer::new(
        ClusterApi::new(
            core.replica.raft.clone(),
            core.replica.me.clone(),
            Advertised {
                client: cfg.advertise.clone(),
                peer: cfg.peer_advertise_addr(),
            },
            core.replica.proposer.clone(),
            core.replica.peers.clone(),
            core.replica.contact.clone(),
            core.replica.state_machine.clone(),
        )
        .with_autopilot(cfg.autopilot.policy()),
    );
    let cluster = RequestLimit::new(cluster, max_request);
    let acl = RequestLimit::new(
        AclServer::new(AclApi::new(
            core.replica.state.clone(),
            core.replica.proposer.clone(),
        )),
        max_request,
    );
    let xds = xds_service(core, cfg);
    let trust = PeerTrust::new(
        core.replica.raft.clone(),
        core.replica.me.clone(),
        core.replica.peers.clone(),
        core.peer_refusals.clone(),
        tls.is_some(),
    );
    let raft_transport =
        RaftTransportServer::new(core.replica.service(recovery(cfg), trust.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let timeout = cfg.request_timeout();
    let limits = &cfg.connections;
    let max_connections =
        net::max_connections(limits, net::raise_fd_limit(), cfg.max_concurrent_probes);
    let (stop, stopped) = oneshot::channel::<()>();
    let stopped = stopped.shared();
    let on = |port| tls_source(&tls, port);
    let keepalive = || {
        // Pings find dead peers and clients; the listener closes idle and silent ones.
        Server::builder()
            .http2_keepalive_interval(Some(Duration::from_millis(limits.keepalive_interval_ms)))
            .http2_keepalive_timeout(Some(Duration::from_millis(limits.keepalive_timeout_ms)))
            .layer(net::TrackRequestsLayer)
    };
    let front = Front {
        core,
        timeout,
        auth: cfg.auth.enabled,
    };
    // The HTTP API calls the client port's stacks in-process.
    let http_stacks = (
        http::Grpc::new(front.forwarded(registry.clone())),
        http::Grpc::new(front.forwarded(cluster.clone())),
    );
    let client_port = keepalive()
        .add_service(front.forwarded(registry.clone()))
        .add_service(front.forwarded(cluster.clone()))
        .add_service(front.forwarded(acl.clone()))
        // Health needs no token: probes and load balancers call it.
        .add_service(RequestLimit::new(health, max_request))
        .add_service(front.authorized(RequestLimit::new(reflection_v1, max_request)))
        .add_service(front.authorized(RequestLimit::new(reflection_v1alpha, max_request)))
        .add_optional_service(xds)
        .serve_with_incoming_shutdown(
            net::incoming(listeners.client, limits, max_connections, on(Port::Client)),
            stopped.clone().map(drop),
        );
    // What a follower forwards is served here as on the leader's client
    // port, minus forwarding: it is never forwarded a second time. With TLS
    // only members get through (`PeerTrust`), and forwarded calls still
    // carry their callers' tokens.
    let peer_port = keepalive()
        .add_service(trust.guard(raft_transport))
        .add_service(trust.guard(front.authorized(registry)))
        .add_service(trust.guard(front.authorized(cluster)))
        .add_service(trust.guard(front.authorized(acl)))
        .serve_with_incoming_shutdown(
            net::incoming(listeners.peer, limits, max_connections, on(Port::Peer)),
            stopped.map(drop),
        );
    let server = async move {
        let (client, peer) = tokio::join!(client_port, peer_port);
        client.and(peer)
    };
    Ok((stop, tokio::spawn(server), http_stacks))
}

/// Where a TLS port takes its settings for each new connection: those in
/// force then, so that rotated certificates serve new connections.
fn tls_source(tls: &Option<Arc<Tls>>, port: Port) -> Option<net::TlsSource> {
    let tls = tls.clone()?;
    Some(Arc::new(move || tls.server(port)))
}

/// The xDS service of the client port, unless `[xds] enabled` is false.
/// Its clients send no token: with auth on, a call without one gets the
/// scope of `[xds] token`, or is refused saying so.
fn xds_service(
    core: &Core,
    cfg: &NodeConfig,
) -> Option<Authorize<RequestLimit<AggregatedDiscoveryServiceServer<Xds>>>> {
    if !cfg.xds.enabled {
        return None;
    }
    let ads = AggregatedDiscoveryServiceServer::new(Xds::new(
        core.replica.state.clone(),
        core.replica.proposer.clone(),
        &cfg.limits,
        core.xds.clone(),
    ))
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    Some(Authorize::with_fallback(
        RequestLimit::new(ads, cfg.limits.max_request_bytes),
        core.replica.state.clone(),
        cfg.auth.enabled,
        cfg.xds.token.as_deref().map(crate::api::auth::hash_secret),
        "this cluster requires a token, and gRPC's xDS clients send none: set [xds] token \
         on the nodes to the secret of a read token (xDS serves what its scope covers), or \
         send `authorization: Bearer <secret>`",
    ))
}

/// How the public services are put on a port: behind authorization (a no-op
/// without `[auth]`), and on the client port behind forwarding too.
struct Front<'a> {
    core: &'a Core,
    timeout: Duration,
    auth: bool,
}

impl Front<'_> {
    fn authorized<S>(&self, service: S) -> Authorize<S> {
        Authorize::new(service, self.core.replica.state.clone(), self.auth)
    }

    fn forwarded<S>(&self, service: S) -> Authorize<Forward<S>> {
        self.authorized(Forward::new(
            service,
            self.core.replica.proposer.clone(),
            self.core.replica.peers.clone(),
            self.timeout,
        ))
    }
}

/// The gRPC health service answers per service: `roster.v1.Registry` and
/// `roster.v1.Cluster` are SERVING only while this node can serve their
/// linearizable requests (readiness); the overall status `""` stays SERVING
/// while the process runs (liveness).
async fn report_readiness(
    raft: Raft,
    id: NodeId,
    lease: Duration,
    poll: Duration,
    contact: Contact,
    reporter: tonic_health::server::HealthReporter,
) {
    use tonic_health::ServingStatus;
    let services = [
        <RegistryServer<RegistryApi> as tonic::server::NamedService>::NAME,
        <ClusterServer<ClusterApi> as tonic::server::NamedService>::NAME,
    ];
    let mut last = None;
    let mut metrics = std::pin::pin!(crate::raft::metrics_every(&raft, poll));
    while let Some(m) = futures::StreamExt::next(&mut metrics).await {
        let ready = leadership::can_serve(&m, id, lease, &contact);
        if last != Some(ready) {
            last = Some(ready);
            let status = if ready {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            for s in services {
                reporter.set_service_status(s, status).await;
            }
        }
    }
    for s in services {
        reporter
            .set_service_status(s, ServingStatus::NotServing)
            .await;
    }
}

fn storage(e: openraft::StorageError<NodeId>) -> Error {
    Error::Storage(e.to_string())
}

/// Initializes a pristine node. Every initial member does this with the same
/// membership, which openraft allows; a node with state refuses, which is fine.
/// So no incarnation is in it (each node knows only its own): the leader binds
/// them once it has heard from the members.
async fn bootstrap(raft: &Raft, members: BTreeMap<NodeId, String>) -> Result<()> {
    // Known by their peer addresses; the leader learns the client addresses.
    let nodes: BTreeMap<NodeId, Node> = members
        .into_iter()
        .map(|(id, addr)| (id, Node::unbound(addr)))
        .collect();
    match raft.initialize(nodes).await {
        Ok(()) | Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
        Err(e) => Err(Error::Internal(format!("bootstrap: {e}"))),
    }
}

#[cfg(test)]
mod storage_suite;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_with_auth_needs_a_token_and_the_domain_is_qualified() {
        let port = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        let mut cfg = NodeConfig::new(1, port(1), port(2), "/data".into());
        cfg.dns.domain = "sd.example".into();
        let zone = dns_zone(&cfg).expect("no auth, no token needed");
        assert_eq!(zone.domain.to_ascii(), "sd.example.");
        assert!(zone.token.is_none());
        cfg.auth.enabled = true;
        let e = dns_zone(&cfg).expect_err("auth without a DNS token");
        assert!(e.to_string().contains("[dns] token"), "{e}");
        cfg.dns.token = Some("s3cret".into());
        let zone = dns_zone(&cfg).expect("with a token");
        assert_eq!(zone.token, Some(crate::api::auth::hash_secret("s3cret")));
    }

    /// Sled lets go of a database's file lock a moment after its last handle
    /// is dropped (its flusher thread lets go last): open again until it has.
    fn unlocked<T, E: std::fmt::Display>(
        open: impl Fn() -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match open() {
                Err(e)
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20))
                }
                r => return r,
            }
        }
    }

    #[tokio::test]
    async fn a_data_directory_of_another_storage_format_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let any = ([127, 0, 0, 1], 0).into();
        let cfg = NodeConfig::new(1, any, any, dir.path().to_path_buf());
        let set_format = |format: Option<u32>| {
            let db = unlocked(|| sled::open(dir.path())).expect("reopen");
            let meta = db.open_tree(trees::NODE_META).expect("meta");
            match format {
                Some(f) => meta.insert(FORMAT_KEY, stored::encode(&f).expect("encode")),
                None => meta.remove(FORMAT_KEY),
            }
            .expect("write");
            db.flush().expect("flush");
        };
        drop(unlocked(|| open_checked(&cfg)).expect("a new directory"));
        drop(unlocked(|| open_checked(&cfg)).expect("its own format"));
        set_format(None);
        let e = unlocked(|| open_checked(&cfg))
            .err()
            .expect("an older format");
        assert!(
            e.to_string().contains("older Roster (storage format 1)"),
            "{e}"
        );
        set_format(Some(STORAGE_FORMAT + 1));
        let e = unlocked(|| open_checked(&cfg))
            .err()
            .expect("a newer format");
        assert!(e.to_string().contains("run the newer version"), "{e}");
        set_format(Some(STORAGE_FORMAT));
        assert!(unlocked(|| open_checked(&cfg)).is_ok());
        // Format 3 reads as it is: only its format key changes.
        set_format(Some(3));
        drop(unlocked(|| open_checked(&cfg)).expect("format 3"));
        let db = unlocked(|| sled::open(dir.path())).expect("reopen");
        let meta = db.open_tree(trees::NODE_META).expect("meta");
        let format: u32 = stored::decode(&meta.get(FORMAT_KEY).expect("read").expect("a format"))
            .expect("decode");
        assert_eq!(format, STORAGE_FORMAT);
    }

    /// Format 2 kept the snapshot in sled; opened by this binary, it is moved
    /// into the snapshot file and the directory becomes the current format.
    #[tokio::test]
    async fn a_format_2_directory_is_migrated_on_start() {
        use openraft::storage::RaftStateMachine;
        use openraft::RaftSnapshotBuilder;

        let dir = tempfile::tempdir().expect("temp dir");
        let any = ([127, 0, 0, 1], 0).into();
        let cfg = NodeConfig::new(1, any, any, dir.path().to_path_buf());
        let snap_meta = {
            let mut st = unlocked(|| open_checked(&cfg)).expect("a new directory");
            let snap = st.state_machine.build_snapshot().await.expect("build");
            snap.meta
        };
        // Back to what format 2 wrote: the snapshot (the file's bytes after
        // its magic are the record format 2 stored) under `m:snapshot`.
        let file = dir
            .path()
            .join(crate::raft::storage::snapshot_file::SNAPSHOT_FILE);
        let bytes = std::fs::read(&file).expect("snapshot file");
        std::fs::remove_file(&file).expect("remove the snapshot file");
        {
            let db = unlocked(|| sled::open(dir.path())).expect("reopen");
            let sm = db.open_tree(trees::STATE_MACHINE).expect("sm tree");
            sm.insert(b"m:snapshot", &bytes[8..]).expect("insert");
            let meta = db.open_tree(trees::NODE_META).expect("meta");
            meta.insert(FORMAT_KEY, stored::encode(&2u32).expect("encode"))
                .expect("format 2");
            db.flush().expect("flush");
        }
        let mut st = unlocked(|| open_checked(&cfg)).expect("migrated");
        assert!(file.exists(), "the snapshot moved into its file");
        let sm = st.db.open_tree(trees::STATE_MACHINE).expect("sm tree");
        assert!(sm.get(b"m:snapshot").expect("read").is_none());
        let meta = st.db.open_tree(trees::NODE_META).expect("meta");
        let format: u32 = stored::decode(&meta.get(FORMAT_KEY).expect("read").expect("a format"))
            .expect("decode");
        assert_eq!(format, STORAGE_FORMAT);
        let current = st
            .state_machine
            .get_current_snapshot()
            .await
            .expect("read snapshot")
            .expect("the migrated snapshot");
        assert_eq!(current.meta, snap_meta);
    }
}
