//! Starting the Raft member on an opened data directory: the openraft
//! configuration, the refusal to rejoin as a member whose state is gone, and
//! the initial cluster's bootstrap.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{InitializeError, RaftError};
use openraft::SnapshotPolicy;
use tonic::transport::ClientTlsConfig;

use super::storage::{damaged, open_storage, Storage};
use crate::config::NodeConfig;
use crate::error::{Error, Result};
use crate::peers::Peers;
use crate::proto::v1 as pb;
use crate::proto::v1::cluster_client::ClusterClient;
use crate::raft::replica::{Replica, Setup};
use crate::raft::replication::peer_trust::PeerRefusals;
use crate::raft::replication::pipeline::MAX_ENTRIES;
use crate::raft::storage::log_store::LogStore;
use crate::raft::{Node, NodeId, Raft};
use crate::tls::Tls;
use crate::xds::XdsStats;

/// How long a new node waits for each initial member's status before bootstrapping.
pub(super) const PEER_CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// A new data directory under an id the running cluster has heard from means
/// this node's earlier state is gone: it must not vote again as that member.
/// Only a leader knows which members acknowledged entries; unreachable peers
/// are skipped (all initial members starting together reach none).
pub(super) async fn check_not_known(
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

pub(super) async fn peer_status(
    addr: &str,
    tls: Option<&ClientTlsConfig>,
) -> Option<pb::StatusResponse> {
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
pub(super) fn staggered(entries: u64, id: NodeId) -> u64 {
    entries + entries / 8 * (id % 4)
}

/// Opens and checks the data directory and starts the Raft core on it; also
/// says whether this node has never voted nor logged anything (it may
/// bootstrap).
pub(super) async fn start_raft(
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
    } = open_storage(cfg).map_err(|e| e.on_start(cfg))?;
    let me = marker.identity().clone();
    let mut log_store = LogStore::open(&db, &cfg.data_dir, marker)?;
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

/// Initializes a pristine node. Every initial member does this with the same
/// membership, which openraft allows; a node with state refuses, which is fine.
/// So no incarnation is in it (each node knows only its own): the leader binds
/// them once it has heard from the members.
pub(super) async fn bootstrap(raft: &Raft, members: BTreeMap<NodeId, String>) -> Result<()> {
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

/// What the node's front-ends and background tasks share.
pub(super) struct Core {
    pub replica: Replica,
    /// What the xDS streams do, for the metrics.
    pub xds: Arc<XdsStats>,
    /// What the peer port refused, for the metrics.
    pub peer_refusals: Arc<PeerRefusals>,
}
