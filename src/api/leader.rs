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
use crate::raft::coalesce::Coalescer;
use crate::raft::network::channel;
use crate::raft::{Node, NodeId, Raft};
use crate::registry::{Command, CommandResponse, Proposal};

/// Set on a forwarded request, so it is never forwarded a second time.
const FORWARDED_HEADER: &str = "roster-forwarded";
/// Commands per log entry. Bounded so that an entry stays far below the
/// transport's message limit even when every command carries maximal metadata.
const MAX_COMMANDS_PER_ENTRY: usize = 128;
/// Raft rounds in flight at once: one being replicated while the next fills up.
const ROUNDS_IN_FLIGHT: usize = 2;

pub enum Route<T> {
    /// This node is the leader and did the work.
    Here(T),
    /// Another node leads: send the request there, over this channel.
    Leader(Channel),
}

/// Why the work was not done here.
#[derive(Clone, Debug)]
enum Refusal {
    NotLeader(ForwardToLeader<NodeId, Node>),
    Failed(Error),
}

pub struct LeaderRouter {
    raft: Raft,
    id: NodeId,
    timeout: Duration,
    channels: Mutex<HashMap<String, Channel>>,
    writes: Coalescer<Command, std::result::Result<CommandResponse, Refusal>>,
    reads: Coalescer<(), std::result::Result<(), Refusal>>,
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

fn write_refusal(e: RaftError<NodeId, ClientWriteError<NodeId, Node>>) -> Refusal {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => Refusal::NotLeader(f),
        RaftError::APIError(e) => Refusal::Failed(Error::Internal(e.to_string())),
        RaftError::Fatal(e) => Refusal::Failed(Error::Unavailable(format!("raft stopped: {e}"))),
    }
}

fn read_refusal(e: RaftError<NodeId, CheckIsLeaderError<NodeId, Node>>) -> Refusal {
    match e {
        RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)) => Refusal::NotLeader(f),
        RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(e)) => {
            Refusal::Failed(Error::Unavailable(format!("leader lost its quorum: {e}")))
        }
        RaftError::Fatal(e) => Refusal::Failed(Error::Unavailable(format!("raft stopped: {e}"))),
    }
}

impl LeaderRouter {
    /// Must be called inside a tokio runtime: it starts the coalescing tasks.
    pub fn new(raft: Raft, id: NodeId, timeout: Duration) -> Self {
        let r = raft.clone();
        let writes = Coalescer::spawn(
            ROUNDS_IN_FLIGHT,
            MAX_COMMANDS_PER_ENTRY,
            move |cmds: Vec<Command>| {
                let raft = r.clone();
                async move {
                    let n = cmds.len();
                    match raft.client_write(Proposal(cmds)).await {
                        Ok(r) => r.data.into_iter().map(Ok).collect(),
                        Err(e) => vec![Err(write_refusal(e)); n],
                    }
                }
            },
        );
        let r = raft.clone();
        // A read may share a check only if it arrived before the check began,
        // which is what coalescing gives: it joins the next round.
        let reads = Coalescer::spawn(ROUNDS_IN_FLIGHT, usize::MAX, move |waiting: Vec<()>| {
            let raft = r.clone();
            async move {
                let answer = raft
                    .ensure_linearizable()
                    .await
                    .map(|_| ())
                    .map_err(read_refusal);
                vec![answer; waiting.len()]
            }
        });
        LeaderRouter {
            raft,
            id,
            timeout,
            channels: Mutex::new(HashMap::new()),
            writes,
            reads,
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Replicates `cmd` through Raft and returns what applying it did.
    pub async fn write(&self, cmd: Command, forwarded: bool) -> Result<Route<CommandResponse>> {
        let answer = self.within_timeout(self.writes.submit(cmd)).await?;
        self.route(answer, forwarded)
    }

    /// Confirms leadership with a quorum and waits until this node has applied
    /// everything committed before the call (read index).
    pub async fn linearizable(&self, forwarded: bool) -> Result<Route<()>> {
        let answer = self.within_timeout(self.reads.submit(())).await?;
        self.route(answer, forwarded)
    }

    /// Routes by this node's current view of the leader, without a quorum round trip.
    pub fn current(&self, forwarded: bool) -> Result<Route<()>> {
        // Heartbeats come this way at a high rate: read the metrics in place, no clone.
        let (leader_id, leader_node) = {
            let rx = self.raft.metrics();
            let m = rx.borrow();
            if m.current_leader == Some(self.id) {
                return Ok(Route::Here(()));
            }
            let node = m
                .current_leader
                .and_then(|l| m.membership_config.membership().get_node(&l).cloned());
            (m.current_leader, node)
        };
        self.to_leader(
            ForwardToLeader {
                leader_id,
                leader_node,
            },
            forwarded,
        )
    }

    async fn within_timeout<T>(
        &self,
        answer: impl std::future::Future<Output = Option<T>>,
    ) -> Result<T> {
        tokio::time::timeout(self.timeout, answer)
            .await
            .map_err(|_| {
                Error::Unavailable(format!(
                    "no answer from a quorum within {:?}; the cluster may have lost its majority",
                    self.timeout
                ))
            })?
            .ok_or_else(|| Error::Unavailable("node is shutting down".into()))
    }

    fn route<T>(
        &self,
        answer: std::result::Result<T, Refusal>,
        forwarded: bool,
    ) -> Result<Route<T>> {
        match answer {
            Ok(v) => Ok(Route::Here(v)),
            Err(Refusal::NotLeader(f)) => self.to_leader(f, forwarded),
            Err(Refusal::Failed(e)) => Err(e),
        }
    }

    fn to_leader<T>(&self, f: ForwardToLeader<NodeId, Node>, forwarded: bool) -> Result<Route<T>> {
        let Some(node) = f.leader_node else {
            return Err(Error::Unavailable(
                "no leader elected at the moment; retry".into(),
            ));
        };
        if forwarded {
            // The node we were forwarded to no longer leads; let the client retry rather than bounce.
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
        Ok(Route::Leader(ch))
    }
}
