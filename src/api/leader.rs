//! Routing to the Raft leader: writes and linearizable reads run on the leader;
//! a follower forwards the caller's request there and relays the answer, so
//! clients never need to know who leads.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use openraft::error::{CheckIsLeaderError, ClientWriteError, ForwardToLeader, RaftError};
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;

use crate::error::{Error, Result};
use crate::proto::v1::registry_client::RegistryClient;
use crate::raft::network::{channel, MAX_MESSAGE_BYTES};
use crate::raft::{Node, NodeId, Raft};
use crate::registry::{Command, CommandResponse};

/// Set on a forwarded request, so it is never forwarded a second time.
const FORWARDED_HEADER: &str = "roster-forwarded";

pub enum Route<T> {
    /// This node is the leader and did the work.
    Here(T),
    /// Another node leads: send the request there.
    Leader(RegistryClient<Channel>),
}

pub struct LeaderRouter {
    raft: Raft,
    id: NodeId,
    timeout: Duration,
    channels: Mutex<HashMap<String, Channel>>,
}

pub fn is_forwarded(meta: &MetadataMap) -> bool {
    meta.contains_key(FORWARDED_HEADER)
}

/// Wraps a message for the leader, marked as forwarded.
pub fn forward_request<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(timeout);
    r.metadata_mut().insert(
        FORWARDED_HEADER,
        tonic::metadata::MetadataValue::from_static("1"),
    );
    r
}

impl LeaderRouter {
    pub fn new(raft: Raft, id: NodeId, timeout: Duration) -> Self {
        LeaderRouter {
            raft,
            id,
            timeout,
            channels: Mutex::new(HashMap::new()),
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Replicates `cmd` through Raft and returns what applying it did.
    pub async fn write(&self, cmd: Command, forwarded: bool) -> Result<Route<CommandResponse>> {
        let res = tokio::time::timeout(self.timeout, self.raft.client_write(cmd))
            .await
            .map_err(|_| self.not_committed())?;
        match res {
            Ok(r) => Ok(Route::Here(r.data)),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                self.to_leader(f, forwarded)
            }
            Err(RaftError::APIError(e)) => Err(Error::Internal(e.to_string())),
            Err(RaftError::Fatal(e)) => Err(Error::Unavailable(format!("raft stopped: {e}"))),
        }
    }

    /// Confirms leadership with a quorum and waits until this node has applied
    /// everything committed before the call (read index).
    pub async fn linearizable(&self, forwarded: bool) -> Result<Route<()>> {
        let res = tokio::time::timeout(self.timeout, self.raft.ensure_linearizable())
            .await
            .map_err(|_| self.not_committed())?;
        match res {
            Ok(_) => Ok(Route::Here(())),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                self.to_leader(f, forwarded)
            }
            Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(e))) => {
                Err(Error::Unavailable(format!("leader lost its quorum: {e}")))
            }
            Err(RaftError::Fatal(e)) => Err(Error::Unavailable(format!("raft stopped: {e}"))),
        }
    }

    /// Routes by this node's current view of the leader, without a quorum round trip.
    pub fn current(&self, forwarded: bool) -> Result<Route<()>> {
        let m = self.raft.metrics().borrow().clone();
        if m.current_leader == Some(self.id) {
            return Ok(Route::Here(()));
        }
        let node = m
            .current_leader
            .and_then(|l| m.membership_config.membership().get_node(&l).cloned());
        self.to_leader(
            ForwardToLeader {
                leader_id: m.current_leader,
                leader_node: node,
            },
            forwarded,
        )
    }

    fn to_leader<T>(&self, f: ForwardToLeader<NodeId, Node>, forwarded: bool) -> Result<Route<T>> {
        let Some(node) = f.leader_node else {
            return Err(Error::Unavailable(
                "no leader elected at the moment; retry".into(),
            ));
        };
        if forwarded {
            // The leader we forwarded to no longer leads; let the client retry rather than bounce.
            return Err(Error::Unavailable(format!(
                "leadership is moving (to node {:?}); retry",
                f.leader_id
            )));
        }
        let mut channels = self
            .channels
            .lock()
            .map_err(|_| Error::Internal("channel cache poisoned".into()))?;
        let ch = match channels.get(&node.addr) {
            Some(c) => c.clone(),
            None => {
                let c = channel(&node.addr, Duration::from_secs(1)).map_err(|e| {
                    Error::Unavailable(format!("leader address {}: {e}", node.addr))
                })?;
                channels.insert(node.addr.clone(), c.clone());
                c
            }
        };
        Ok(Route::Leader(
            RegistryClient::new(ch)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        ))
    }

    fn not_committed(&self) -> Error {
        Error::Unavailable(format!(
            "no answer from a quorum within {:?}; the cluster may have lost its majority",
            self.timeout
        ))
    }
}
