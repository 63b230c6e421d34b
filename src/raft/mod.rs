//! Consensus: openraft wired to sled storage and a gRPC transport.
//!
//! Sub-layers, each using only those above it in this list (and `crate::peers`,
//! the connections to other nodes, below all of them):
//! - this file and [`rpc`]: the Raft types, the node-to-node headers and how a
//!   peer request is framed;
//! - [`storage`]: the log store, the marker, snapshot files, the state
//!   machine and the format of what is stored;
//! - [`liveness`]: elections, leadership, incarnations, membership, autopilot;
//! - [`replication`]: openraft's network over gRPC, the pipeline, the
//!   transport service and its trust, group commit;
//! - [`proposer`] and [`replica`] at the top: proposing and reading, and one
//!   member's start.
//!
//! [`mutation`] is a leaf: the simulation's deliberate bugs.

pub mod liveness;
pub mod mutation;
pub mod proposer;
pub mod replica;
pub mod replication;
pub mod rpc;
pub mod storage;

use std::io::Cursor;

use crate::registry::{CommandResponse, Proposal};

openraft::declare_raft_types!(
    /// Roster's Raft: a log entry carries a batch of registry commands and
    /// answers with one response per command.
    pub TypeConfig:
        D = Proposal,
        R = Vec<CommandResponse>,
        Node = Node,
);

pub use crate::peers::NodeId;
pub type Raft = openraft::Raft<TypeConfig>;

/// A member as the Raft membership records it: where it serves clients, where
/// its peers reach it, which data directory it runs on, and whether it is a
/// read replica. A node whose directory was wiped comes back with another
/// incarnation, and its peers refuse it as the old member (see [`transport`]),
/// since it lost the votes and entries that member acknowledged.
///
/// Memberships travel in log entries, snapshots and Raft messages as bincode,
/// which has no field names: a field added to the struct would make every
/// stored membership unreadable. A member that is no replica is therefore
/// encoded as before this flag existed, and a replica behind a marker no old
/// encoding can hold ([`node_codec`]): existing data directories load
/// unchanged, and older binaries replicate with this one until a replica is added.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Node {
    /// `host:port` the node serves clients on (what a follower names as the
    /// leader); empty until the leader has learned it ([`incarnation::bind`]).
    pub addr: String,
    /// `host:port` of its peer port: Raft, and requests forwarded to it.
    pub peer_addr: String,
    /// The member's data-directory incarnation ([`marker::Identity`]); 0 until
    /// the leader has learned it ([`incarnation::bind`]).
    pub incarnation: u64,
    /// A read replica: a learner that is never made a voter (`AddMember`
    /// with `replica`).
    pub replica: bool,
}

impl Node {
    /// An initial member, known by its peer address only.
    pub fn unbound(peer_addr: String) -> Self {
        Node {
            peer_addr,
            ..Node::default()
        }
    }
}

mod node_codec;

impl std::fmt::Display for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (peer port {}, incarnation {}{})",
            self.addr,
            self.peer_addr,
            self.incarnation,
            if self.replica { ", replica" } else { "" }
        )
    }
}

/// Metadata header carrying the cluster id on every node-to-node request.
pub const CLUSTER_ID_HEADER: &str = "roster-cluster-id";
/// Metadata header with the responder's data-directory incarnation on every
/// node-to-node reply, from which the leader learns it.
pub const INCARNATION_HEADER: &str = "roster-incarnation";
/// Metadata header with the responder's client address on every node-to-node
/// reply, from which the leader learns it.
pub const CLIENT_ADDRESS_HEADER: &str = "roster-client-address";
/// Metadata header with the incarnation the sender's membership records for
/// the node it sends to (0: not known yet).
pub const TARGET_INCARNATION_HEADER: &str = "roster-target-incarnation";

/// Metadata header marking an AppendEntries a leader's pipeline sent ahead of
/// the one before it, which may not have been received yet.
pub const EARLY_HEADER: &str = "roster-early";

/// Sled tree names; one database per node holds all of them.
pub(crate) mod trees {
    pub const LOG: &str = "raft_log";
    pub const RAFT_META: &str = "raft_meta";
    /// The applied state, up to storage format 4.
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

/// This node's Raft metrics every `period` until Raft shuts down. Polled
/// rather than awaited: they change on every append, far more often than the
/// leadership checks built on them need to look.
pub fn metrics_every(
    raft: &Raft,
    period: std::time::Duration,
) -> impl futures::Stream<Item = openraft::RaftMetrics<NodeId, Node>> + Send + 'static {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    futures::stream::unfold(
        (raft.metrics(), tick),
        |(mut metrics, mut tick)| async move {
            tick.tick().await;
            metrics.has_changed().ok()?;
            let m = metrics.borrow_and_update().clone();
            Some((m, (metrics, tick)))
        },
    )
}
