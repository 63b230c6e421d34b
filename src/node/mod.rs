//! A running Roster node: storage, Raft and the gRPC server, assembled and torn down.
//! This file wires the parts together; each job has a file of its own:
//! [`storage`] (the data directory's lifecycle), [`consensus`] (starting
//! Raft), [`servers`] (the ports and their services) and [`readiness`].

mod consensus;
mod readiness;
mod servers;
mod storage;

use std::net::SocketAddr;
use std::sync::Arc;

use openraft::ServerState;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic_health::pb::health_server::{Health, HealthServer};

use crate::config::NodeConfig;
use crate::error::{Error, Result};
use crate::health::{self, CheckContext};
use crate::peers::Peers;
use crate::raft::liveness::leadership;
use crate::raft::proposer::Proposer;
use crate::raft::storage::log_store::LogStore;
use crate::raft::storage::marker::Identity;
use crate::raft::{NodeId, Raft};
use crate::registry::leases::Leases;
use crate::tls::Tls;

#[cfg(feature = "sim")]
pub(crate) use consensus::raft_config;
use consensus::{bootstrap, start_raft, Core};
use readiness::report_readiness;
use servers::{beside, bind, serve, Beside, Listeners, ServerTask};
pub use storage::{recover, restore};

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

    /// Hands leadership to a caught-up follower if this node leads, holding
    /// the writes that arrive meanwhile and forwarding them to it (so a
    /// rolling restart costs no election timeout and refuses nothing), then
    /// stops proposing and serving and shuts Raft down; the data directory
    /// can then be reopened.
    pub async fn shutdown(self) -> Result<()> {
        let transfer = leadership::transfer(
            &self.raft,
            &self.me,
            &self.peers,
            leadership::TRANSFER_LIMIT,
        );
        match self.proposer.hand_over(transfer).await {
            Some(to) => tracing::info!("handed leadership to node {to}"),
            None => tracing::debug!("no leadership to hand over"),
        }
        self.proposer.close();
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
        self.log.sync().await?;
        match served {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::Internal(format!("server: {e}"))),
            Err(e) => Err(Error::Internal(format!("server task: {e}"))),
        }
    }
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
    let Beside { metrics, http, dns } = beside(&core, &cfg, &tls, http_stacks).await?;
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
    // A stopping node ends its watch streams (Watch, WatchServices, xDS), so
    // that their clients resume on another node and the server can finish.
    let (closing, state) = (core.replica.proposer.closing(), core.replica.state.clone());
    tokio::spawn(async move {
        closing.await;
        if let Ok(st) = state.read() {
            st.hub.close();
        }
    });
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

#[cfg(test)]
mod storage_suite;
