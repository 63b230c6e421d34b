//! One member's consensus machinery, started the same way by the node
//! (`crate::node`, over sled and gRPC) and by the deterministic simulation
//! (`crate::sim`, over a simulated disk and network): Raft on the storage it
//! is handed, the proposer, and the tasks that keep leadership sound
//! (heartbeats, pre-vote campaigns, check-quorum, incarnation binding).

use std::sync::Arc;
use std::time::Duration;

use openraft::storage::RaftLogStorage;

use super::liveness::election::{self, Contact, Timing};
use super::liveness::incarnation::{self, Learned, Stated};
use super::liveness::leadership;
use super::proposer::Proposer;
use super::replication::network::Network;
use super::replication::peer_trust::PeerTrust;
use super::replication::transport::RaftService;
use super::storage::log_store::LogStore;
use super::storage::marker::Identity;
use super::storage::state_machine::StateMachine;
use super::{NodeId, Raft};
use crate::error::Error;
use crate::peers::Peers;
use crate::registry::watch::SharedState;

/// What a member is started with besides its storage.
pub struct Setup {
    pub id: NodeId,
    pub config: openraft::Config,
    pub timing: Timing,
    /// Deadline of a write or linearizable read.
    pub request_timeout: Duration,
    /// The address clients reach this member at, as it states it to peers.
    pub client_addr: String,
    pub peers: Peers,
}

/// A running member.
pub struct Replica {
    pub raft: Raft,
    pub me: Identity,
    /// The log store, beside openraft's copy: its flush durations, and the
    /// last sync at shutdown.
    pub log: LogStore,
    pub state: SharedState,
    /// Openraft's own copy drives applies; this one takes backups.
    pub state_machine: StateMachine,
    pub peers: Peers,
    pub contact: Contact,
    pub proposer: Arc<Proposer>,
    pub timing: Timing,
    client_addr: String,
}

impl Replica {
    /// Starts Raft on `log_store` and `state_machine`, which hold `me`'s data.
    pub async fn start(
        setup: Setup,
        mut log_store: LogStore,
        state_machine: StateMachine,
        me: Identity,
    ) -> Result<Replica, Error> {
        let Setup {
            id,
            config,
            timing,
            request_timeout,
            client_addr,
            peers,
        } = setup;
        if log_store.resign(id).await? {
            tracing::info!("led before it stopped: leads again only if elected in a later term");
        }
        let durable = log_store.durable();
        let log = log_store.clone();
        let appends = log_store.appends();
        let state = state_machine.state();
        let backups = state_machine.clone();
        let learned = Learned::default();
        let raft = Raft::new(
            id,
            Arc::new(config),
            Network::new(
                me.clone(),
                peers.clone(),
                learned.clone(),
                timing.heartbeat,
                appends,
            ),
            log_store,
            state_machine,
        )
        .await
        .map_err(|e| Error::Internal(format!("start raft: {e}")))?;
        let contact = Contact::new(&timing);
        let proposer = Arc::new(Proposer::new(
            raft.clone(),
            id,
            durable,
            peers.clone(),
            contact.clone(),
            request_timeout,
        ));
        // A leader counts as alive for the shortest election timeout after a
        // quorum last answered it; the binding task polls at heartbeat pace.
        let mine = Stated {
            incarnation: me.incarnation,
            addr: client_addr.clone(),
        };
        tokio::spawn(incarnation::bind(
            raft.clone(),
            id,
            mine,
            learned,
            timing.election_min,
            timing.heartbeat,
        ));
        Ok(Replica {
            raft,
            me,
            log,
            state,
            state_machine: backups,
            peers,
            contact,
            proposer,
            timing,
            client_addr,
        })
    }

    /// Starts heartbeats and elections, and the quorum check. Each ends with Raft.
    pub fn spawn_consensus(&self) {
        let (raft, timing, id) = (&self.raft, self.timing, self.me.node_id);
        tokio::spawn(election::heartbeats(raft.clone(), id, timing.heartbeat));
        tokio::spawn(election::campaigns(
            raft.clone(),
            self.me.clone(),
            self.peers.clone(),
            self.contact.clone(),
            timing,
        ));
        // With no answer from a quorum for the longest election timeout, followers
        // will have elected another: the leader steps down.
        tokio::spawn(leadership::check_quorum(
            raft.clone(),
            id,
            timing.election_max,
            timing.heartbeat,
        ));
    }

    /// The peer port's Raft service of this member. `recovery`: what an
    /// operator must do when the cluster knows another incarnation of it.
    pub fn service(&self, recovery: String, trust: PeerTrust) -> RaftService {
        RaftService::new(
            self.raft.clone(),
            self.me.clone(),
            &self.client_addr,
            self.contact.clone(),
            recovery,
            trust,
        )
    }

    /// Whether this member has no vote and no log yet (a new data directory).
    pub async fn pristine(log_store: &mut LogStore) -> Result<bool, Error> {
        Ok(log_store.read_vote().await?.is_none()
            && log_store.get_log_state().await?.last_log_id.is_none())
    }
}
