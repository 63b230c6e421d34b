//! Routing to the Raft leader: writes and linearizable reads run on the leader;
//! a follower forwards the caller's request there and relays the answer, so
//! clients never need to know who leads.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::ForwardToLeader;
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;
use tonic::{Response, Status};

use crate::error::{Error, Result};
use crate::raft::network::{error_chain, Peers};
use crate::raft::proposer::{Proposer, Refusal};
use crate::raft::{Node, NodeId};
use crate::registry::{Command, CommandResponse};

/// Extra time a follower waits for the leader's answer to a forwarded request.
const FORWARD_MARGIN: Duration = Duration::from_secs(1);
/// Set on a forwarded request, so it is never forwarded a second time.
const FORWARDED_HEADER: &str = "roster-forwarded";

pub enum Route<T> {
    /// This node is the leader and did the work.
    Here(T),
    /// Another node leads: send the request there.
    Leader(Leader),
}

/// The leader as a follower sees it, for forwarding.
pub struct Leader {
    pub id: NodeId,
    pub addr: String,
    pub channel: Channel,
}

/// Whether a forwarded request changes state: a write whose connection breaks
/// mid-call has an unknown outcome, a read can simply be retried.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    Read,
    Write,
}

impl Leader {
    /// Sends the caller's request to the leader, marked as forwarded, and relays
    /// the leader's answer. Transport failures are said as such, naming the leader.
    pub async fn relay<T, R, F, Fut>(
        self,
        msg: T,
        timeout: Duration,
        effect: Effect,
        call: F,
    ) -> std::result::Result<Response<R>, Status>
    where
        F: FnOnce(Channel, tonic::Request<T>) -> Fut,
        Fut: Future<Output = std::result::Result<Response<R>, Status>>,
    {
        // The leader gets `timeout` and answers by then; the margin lets its
        // answer (which knows whether the write was applied) travel back.
        let answer = call(
            self.channel.clone(),
            forward_request(msg, timeout + FORWARD_MARGIN),
        )
        .await;
        answer.map_err(|s| self.transport_failure(s, effect))
    }

    fn transport_failure(&self, s: Status, effect: Effect) -> Status {
        if s.code() == tonic::Code::Cancelled
            && s.message() == tonic::TimeoutExpired(()).to_string()
        {
            let what = format!(
                "forwarded to leader {} at {}, no answer in time",
                self.id, self.addr
            );
            return match effect {
                Effect::Read => Error::Unavailable(format!("{what}; retry")),
                Effect::Write => Error::Timeout(format!("{what}; the write may have been applied")),
            }
            .into();
        }
        // The leader's own answers carry no source; transport failures do.
        if std::error::Error::source(&s).is_none() {
            return s;
        }
        let cause = error_chain(&s);
        let what = format!(
            "forwarding to leader {} at {} failed: {cause}",
            self.id, self.addr
        );
        if !sent(&s) {
            // The connection could not be made: the request never left this node.
            Error::Unavailable(format!("{what}; not applied, retry"))
        } else if effect == Effect::Read {
            Error::Unavailable(format!("{what}; retry"))
        } else {
            Error::Interrupted(what)
        }
        .into()
    }
}

/// Whether the request may have reached the peer: only a failure to connect
/// (tonic's `ConnectError` somewhere in the causes) proves it did not.
fn sent(s: &Status) -> bool {
    let mut cause = std::error::Error::source(s);
    while let Some(c) = cause {
        if c.downcast_ref::<tonic::ConnectError>().is_some() {
            return false;
        }
        cause = c.source();
    }
    true
}

/// The API's view of the write and read paths: the work is done here when
/// this node leads, or the request goes to the leader.
pub struct LeaderRouter {
    proposer: Arc<Proposer>,
    peers: Peers,
}

pub fn is_forwarded(meta: &MetadataMap) -> bool {
    meta.contains_key(FORWARDED_HEADER)
}

/// Wraps a message for the leader, marked as forwarded.
fn forward_request<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(timeout);
    r.metadata_mut().insert(
        FORWARDED_HEADER,
        tonic::metadata::MetadataValue::from_static("1"),
    );
    r
}

impl LeaderRouter {
    pub fn new(proposer: Arc<Proposer>, peers: Peers) -> Self {
        LeaderRouter { proposer, peers }
    }

    pub fn timeout(&self) -> Duration {
        self.proposer.timeout()
    }

    /// From now on nothing new is proposed here; requests are forwarded to
    /// the leader or refused as not applied.
    pub fn close(&self) {
        self.proposer.close();
    }

    /// Resolves once the node has begun to shut down.
    pub fn closing(&self) -> impl Future<Output = ()> + Send + 'static {
        self.proposer.closing()
    }

    /// Replicates `cmd` through Raft and returns what applying it did.
    pub async fn write(&self, cmd: Command, forwarded: bool) -> Result<Route<CommandResponse>> {
        self.route(self.proposer.propose(cmd).await, forwarded)
    }

    /// Confirms leadership with a quorum and waits until this node has applied
    /// everything committed before the call (read index).
    pub async fn linearizable(&self, forwarded: bool) -> Result<Route<()>> {
        self.route(self.proposer.read_index().await, forwarded)
    }

    /// Waits until this node has applied `index`.
    pub async fn wait_applied(&self, index: u64) -> Result<()> {
        self.proposer.wait_applied(index).await
    }

    /// Routes by this node's current view of the leader, without a quorum round trip.
    pub fn current(&self, forwarded: bool) -> Result<Route<()>> {
        self.route(self.proposer.here(), forwarded)
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
        let (Some(id), Some(node)) = (f.leader_id, f.leader_node) else {
            return Err(Error::Unavailable(
                "no leader elected at the moment; not applied, retry".into(),
            ));
        };
        if forwarded {
            // The node we were forwarded to no longer leads; let the client retry rather than bounce.
            return Err(Error::Unavailable(format!(
                "leadership is moving (to node {id}); not applied, retry"
            )));
        }
        let channel = self.peers.channel(&node.addr).map_err(Error::Unavailable)?;
        Ok(Route::Leader(Leader {
            id,
            addr: node.addr,
            channel,
        }))
    }
}
