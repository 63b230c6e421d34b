//! The `Cluster` gRPC service: membership and Raft progress of the node asked.

use std::time::Duration;

use openraft::ServerState;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::proto::v1 as pb;
use crate::proto::v1::cluster_server::Cluster;
use crate::raft::Raft;
use crate::registry::watch::SharedState;

const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(30);

pub struct ClusterApi {
    raft: Raft,
    cluster_id: String,
    state: SharedState,
}

impl ClusterApi {
    pub fn new(raft: Raft, cluster_id: String, state: SharedState) -> Self {
        ClusterApi {
            raft,
            cluster_id,
            state,
        }
    }
}

fn role(s: ServerState) -> &'static str {
    match s {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

#[tonic::async_trait]
impl Cluster for ClusterApi {
    async fn status(
        &self,
        _req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let members = membership
            .nodes()
            .map(|(id, node)| pb::Member {
                id: *id,
                address: node.addr.clone(),
                voter: membership.voter_ids().any(|v| v == *id),
            })
            .collect();
        let leader_address = m
            .current_leader
            .and_then(|l| membership.get_node(&l))
            .map(|n| n.addr.clone())
            .unwrap_or_default();
        let revision = self
            .state
            .read()
            .map(|s| s.catalog.revision())
            .map_err(|_| Status::internal("state lock poisoned"))?;
        Ok(Response::new(pb::StatusResponse {
            node_id: m.id,
            cluster_id: self.cluster_id.clone(),
            leader_id: m.current_leader.unwrap_or(0),
            leader_address,
            term: m.current_term,
            role: role(m.state).to_string(),
            last_log_index: m.last_log_index.unwrap_or(0),
            applied_index: m.last_applied.map_or(0, |l| l.index),
            snapshot_index: m.snapshot.map_or(0, |l| l.index),
            members,
            revision,
            purged_index: m.purged.map_or(0, |l| l.index),
        }))
    }

    async fn snapshot(
        &self,
        _req: Request<pb::SnapshotRequest>,
    ) -> Result<Response<pb::SnapshotResponse>, Status> {
        let applied = self
            .raft
            .metrics()
            .borrow()
            .last_applied
            .map_or(0, |l| l.index);
        let stopped =
            |e: openraft::error::Fatal<u64>| Error::Unavailable(format!("raft stopped: {e}"));
        self.raft.trigger().snapshot().await.map_err(stopped)?;
        let m = self
            .raft
            .wait(Some(SNAPSHOT_TIMEOUT))
            .metrics(
                |m| m.snapshot.is_some_and(|s| s.index >= applied),
                "snapshot built",
            )
            .await
            .map_err(|e| Error::Unavailable(format!("snapshot: {e}")))?;
        let snapshot_index = m.snapshot.map_or(0, |l| l.index);
        self.raft
            .trigger()
            .purge_log(snapshot_index)
            .await
            .map_err(stopped)?;
        let size_bytes = match self.raft.get_snapshot().await {
            Ok(Some(s)) => s.snapshot.get_ref().len() as u64,
            Ok(None) => 0,
            Err(e) => return Err(Error::Unavailable(format!("read snapshot: {e}")).into()),
        };
        Ok(Response::new(pb::SnapshotResponse {
            snapshot_index,
            size_bytes,
        }))
    }
}
