//! Membership changes from more than one place at once. The leader binds
//! incarnations ([`super::incarnation::bind`]), autopilot removes dead voters
//! and operators add and remove members. Openraft refuses a change while
//! another is uncommitted, so a change waits for the one under way instead of
//! failing an operator's request on a race.

use std::future::Future;
use std::time::Duration;

use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::RaftMetrics;
use tokio::time::Instant;

use crate::raft::{Node, NodeId, Raft};

pub type ChangeError = RaftError<NodeId, ClientWriteError<NodeId, Node>>;

/// How often a change waiting for another looks again.
const POLL: Duration = Duration::from_millis(20);

/// Whether this node's latest membership is applied (hence committed) and not
/// joint: no change is under way, not even between a change's two steps, when
/// a third party's change would leave the cluster in a joint configuration.
pub fn settled(m: &RaftMetrics<NodeId, Node>) -> bool {
    let config = m.membership_config.log_id();
    let uniform = m.membership_config.membership().get_joint_config().len() == 1;
    uniform && (config.is_none() || m.last_applied >= *config)
}

/// Runs `change` (which reads the membership afresh each time) once no other
/// change is under way, again while openraft still finds one in progress,
/// for up to `within`; then its error stands.
pub async fn when_settled<T, F, Fut>(
    raft: &Raft,
    within: Duration,
    mut change: F,
) -> Result<T, ChangeError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ChangeError>>,
{
    let deadline = Instant::now() + within;
    loop {
        while !settled(&raft.metrics().borrow()) && Instant::now() < deadline {
            tokio::time::sleep(POLL).await;
        }
        match change().await {
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                ChangeMembershipError::InProgress(_),
            ))) if Instant::now() < deadline => tokio::time::sleep(POLL).await,
            r => return r,
        }
    }
}
