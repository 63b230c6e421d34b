//! A running Roster node: storage, Raft and the gRPC server, assembled and torn down.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{InitializeError, RaftError};
use openraft::storage::RaftLogStorage;
use openraft::{BasicNode, ServerState, SnapshotPolicy};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Server;

use crate::api::cluster::ClusterApi;
use crate::api::leader::LeaderRouter;
use crate::api::registry::RegistryApi;
use crate::config::NodeConfig;
use crate::error::{Error, Result};
use crate::health::{self, CheckContext, Leases};
use crate::net;
use crate::proto::raft_v1::raft_transport_server::RaftTransportServer;
use crate::proto::v1::cluster_server::ClusterServer;
use crate::proto::v1::registry_server::RegistryServer;
use crate::proto::PUBLIC_DESCRIPTOR_SET;
use crate::raft::leadership;
use crate::raft::log_store::LogStore;
use crate::raft::network::{Network, MAX_MESSAGE_BYTES};
use crate::raft::state_machine::StateMachine;
use crate::raft::transport::RaftService;
use crate::raft::{trees, NodeId, Raft};

pub struct NodeHandle {
    pub id: NodeId,
    /// The address the server is bound to (useful when `listen` had port 0).
    pub addr: SocketAddr,
    pub raft: Raft,
    cluster_id: String,
    router: Arc<LeaderRouter>,
    stop: oneshot::Sender<()>,
    server: JoinHandle<std::result::Result<(), tonic::transport::Error>>,
    metrics: Option<JoinHandle<()>>,
}

/// How long a stopping leader waits for a follower to take over.
const TRANSFER_LIMIT: Duration = Duration::from_secs(2);

impl NodeHandle {
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
        self.router.close();
        match leadership::transfer(&self.raft, self.id, &self.cluster_id, TRANSFER_LIMIT).await {
            Some(to) => tracing::info!("handed leadership to node {to}"),
            None => tracing::debug!("no leadership to hand over"),
        }
        let _ = self.stop.send(());
        if let Some(m) = &self.metrics {
            m.abort();
        }
        let served = self.server.await;
        self.raft
            .shutdown()
            .await
            .map_err(|e| Error::Internal(format!("raft shutdown: {e}")))?;
        match served {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::Internal(format!("server: {e}"))),
            Err(e) => Err(Error::Internal(format!("server task: {e}"))),
        }
    }
}

/// Refuses a data directory written by another cluster or another node id.
fn check_identity(db: &sled::Db, cfg: &NodeConfig) -> Result<()> {
    let meta = db.open_tree(trees::NODE_META)?;
    let identity = format!("{}/{}", cfg.cluster_id, cfg.id);
    match meta.get(b"identity")? {
        Some(stored) if stored.as_ref() != identity.as_bytes() => {
            Err(Error::FailedPrecondition(format!(
                "data directory {} belongs to {:?} (cluster/node), not {identity:?}",
                cfg.data_dir.display(),
                String::from_utf8_lossy(&stored)
            )))
        }
        Some(_) => Ok(()),
        None => {
            meta.insert(b"identity", identity.as_bytes())?;
            db.flush()?;
            Ok(())
        }
    }
}

fn raft_config(cfg: &NodeConfig) -> Result<openraft::Config> {
    let r = &cfg.raft;
    let c = openraft::Config {
        cluster_name: cfg.cluster_id.clone(),
        heartbeat_interval: r.heartbeat_ms,
        election_timeout_min: r.election_timeout_min_ms,
        election_timeout_max: r.election_timeout_max_ms,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(r.snapshot_after_entries),
        max_in_snapshot_log_to_keep: r.keep_entries_after_snapshot,
        install_snapshot_timeout: 10_000,
        // Entries carry up to 128 commands each; keep an AppendEntries message well under the transport limit.
        max_payload_entries: 32,
        ..Default::default()
    };
    c.validate()
        .map_err(|e| Error::InvalidArgument(format!("raft config: {e}")))
}

/// Opens the data directory, starts Raft and serves gRPC on `cfg.listen`.
/// A node whose data directory is empty bootstraps the initial cluster.
pub async fn start(cfg: NodeConfig) -> Result<NodeHandle> {
    let members = cfg
        .validate()
        .map_err(|e| Error::InvalidArgument(e.to_string()))?;
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|e| Error::Storage(format!("create {}: {e}", cfg.data_dir.display())))?;
    let db = sled::Config::new()
        .path(&cfg.data_dir)
        .cache_capacity(cfg.cache_mb * 1024 * 1024)
        .open()
        .map_err(|e| Error::Storage(format!("open {}: {e}", cfg.data_dir.display())))?;
    check_identity(&db, &cfg)?;

    let mut log_store = LogStore::open(&db)?;
    // Only a node that has never voted nor logged anything bootstraps.
    let pristine = log_store.read_vote().await.map_err(storage)?.is_none()
        && log_store
            .get_log_state()
            .await
            .map_err(storage)?
            .last_log_id
            .is_none();
    let state_machine = StateMachine::open(&db, cfg.watch_history)?;
    let state = state_machine.state();
    let raft = Raft::new(
        cfg.id,
        Arc::new(raft_config(&cfg)?),
        Network::new(cfg.cluster_id.clone()),
        log_store,
        state_machine,
    )
    .await
    .map_err(|e| Error::Internal(format!("start raft: {e}")))?;

    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| Error::Unavailable(format!("bind {}: {e}", cfg.listen)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Internal(e.to_string()))?;

    let router = Arc::new(LeaderRouter::new(
        raft.clone(),
        cfg.id,
        cfg.request_timeout(),
    ));
    let leases = Arc::new(Leases::default());
    tokio::spawn(health::supervise(
        raft.clone(),
        cfg.id,
        Arc::new(CheckContext {
            state: state.clone(),
            router: router.clone(),
            leases: leases.clone(),
            max_concurrent_probes: cfg.max_concurrent_probes,
        }),
    ));
    let lease = Duration::from_millis(cfg.raft.election_timeout_max_ms);
    let poll = Duration::from_millis(cfg.raft.heartbeat_ms);
    // Followers campaign after the lease plus at least the minimum timeout; a
    // leader that has heard from no quorum for that long is no longer needed.
    let quorum_timeout = lease + Duration::from_millis(cfg.raft.election_timeout_min_ms);
    tokio::spawn(leadership::check_quorum(
        raft.clone(),
        cfg.id,
        quorum_timeout,
        poll,
    ));
    let (health_reporter, health) = tonic_health::server::health_reporter();
    tokio::spawn(report_readiness(
        raft.clone(),
        cfg.id,
        lease,
        poll,
        health_reporter,
    ));
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

    let limits = &cfg.connections;
    let max_connections =
        net::max_connections(limits, net::raise_fd_limit(), cfg.max_concurrent_probes);
    let (stop, stopped) = oneshot::channel::<()>();
    let server = Server::builder()
        // Pings find dead peers and clients; the listener closes idle and silent ones.
        .http2_keepalive_interval(Some(Duration::from_millis(limits.keepalive_interval_ms)))
        .http2_keepalive_timeout(Some(Duration::from_millis(limits.keepalive_timeout_ms)))
        .layer(net::TrackRequestsLayer)
        .add_service(
            RaftTransportServer::new(RaftService::new(raft.clone(), cfg.cluster_id.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            RegistryServer::new(RegistryApi::new(state.clone(), router.clone(), leases))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(ClusterServer::new(ClusterApi::new(
            raft.clone(),
            cfg.cluster_id.clone(),
            state.clone(),
            router.clone(),
        )))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(net::incoming(listener, limits, max_connections), async {
            let _ = stopped.await;
        });
    let server = tokio::spawn(server);
    let metrics = match cfg.metrics_listen {
        Some(addr) => Some(crate::metrics::serve(addr, raft.clone(), state).await?),
        None => None,
    };

    if !members.is_empty() && pristine {
        bootstrap(&raft, members).await?;
    }
    tracing::info!(id = cfg.id, %addr, cluster = %cfg.cluster_id, "node started");
    Ok(NodeHandle {
        id: cfg.id,
        addr,
        raft,
        cluster_id: cfg.cluster_id,
        router,
        stop,
        server,
        metrics,
    })
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
    reporter: tonic_health::server::HealthReporter,
) {
    use tonic_health::ServingStatus;
    let services = [
        <RegistryServer<RegistryApi> as tonic::server::NamedService>::NAME,
        <ClusterServer<ClusterApi> as tonic::server::NamedService>::NAME,
    ];
    let mut metrics = raft.metrics();
    let mut last = None;
    let mut tick = tokio::time::interval(poll);
    loop {
        tick.tick().await;
        if metrics.has_changed().is_err() {
            break;
        }
        let ready = leadership::can_serve(&metrics.borrow_and_update(), id, lease);
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
async fn bootstrap(raft: &Raft, members: BTreeMap<NodeId, String>) -> Result<()> {
    let nodes: BTreeMap<NodeId, BasicNode> = members
        .into_iter()
        .map(|(id, addr)| (id, BasicNode { addr }))
        .collect();
    match raft.initialize(nodes).await {
        Ok(()) | Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
        Err(e) => Err(Error::Internal(format!("bootstrap: {e}"))),
    }
}
