//! Consensus: openraft wired to sled storage and a gRPC transport.

pub mod coalesce;
pub mod leadership;
pub mod log_store;
pub mod marker;
pub mod network;
pub mod state_machine;
pub mod stored;
pub mod transport;

use std::io::Cursor;

use crate::registry::{CommandResponse, Proposal};

openraft::declare_raft_types!(
    /// Roster's Raft: a log entry carries a batch of registry commands and
    /// answers with one response per command.
    pub TypeConfig:
        D = Proposal,
        R = Vec<CommandResponse>,
);

pub type NodeId = u64;
pub type Node = openraft::BasicNode;
pub type Raft = openraft::Raft<TypeConfig>;

/// Metadata header carrying the cluster id on every node-to-node request.
pub const CLUSTER_ID_HEADER: &str = "roster-cluster-id";

/// Sled tree names; one database per node holds all of them.
pub(crate) mod trees {
    pub const LOG: &str = "raft_log";
    pub const RAFT_META: &str = "raft_meta";
    pub const STATE_MACHINE: &str = "state_machine";
    pub const NODE_META: &str = "node_meta";
}

/// Network messages; what goes to disk uses [`stored`], which adds a checksum.
pub(crate) fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, bincode::Error> {
    bincode::serialize(v)
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, bincode::Error> {
    bincode::deserialize(b)
}
