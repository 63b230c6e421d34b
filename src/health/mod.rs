//! Health checking. Only the Raft leader probes; it starts when it becomes
//! leader and stops when it loses leadership, and only status *transitions* go
//! through Raft, batched, so every node and watcher sees the same status.

pub mod checks;
pub mod probe;
pub mod runner;
pub mod sessions;
pub mod tracker;

use std::sync::Arc;

use openraft::ServerState;

use crate::raft::proposer::Proposer;
use crate::raft::{NodeId, Raft};
use crate::registry::leases::Leases;
use crate::registry::watch::SharedState;

/// What the leader's check loop needs from its node.
pub struct CheckContext {
    pub state: SharedState,
    pub proposer: Arc<Proposer>,
    pub leases: Arc<Leases>,
    /// Probes running at once, across all instances.
    pub max_concurrent_probes: usize,
}

/// Runs the check loop while this node leads; ends when Raft shuts down.
pub async fn supervise(raft: Raft, id: NodeId, ctx: Arc<CheckContext>) {
    let mut metrics = raft.metrics();
    let mut running: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        let leading = {
            let m = metrics.borrow_and_update();
            m.state == ServerState::Leader && m.current_leader == Some(id)
        };
        match (leading, running.is_some()) {
            (true, false) => {
                tracing::info!("leader: starting health checks");
                running = Some(tokio::spawn(runner::run(ctx.clone())));
            }
            (false, true) => {
                tracing::info!("no longer leader: stopping health checks");
                if let Some(t) = running.take() {
                    t.abort();
                }
            }
            _ => {}
        }
        if metrics.changed().await.is_err() {
            break;
        }
    }
    if let Some(t) = running {
        t.abort();
    }
}
