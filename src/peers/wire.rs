//! The network seam: how a node's Raft RPCs reach a peer. In production they
//! go over gRPC ([`super::Peers`] keeps a channel per peer); the
//! deterministic simulation (`crate::sim`) sets a [`Wire`] that hands each
//! request to the target's `RaftService` in the same process, with delays,
//! losses and partitions of its choosing. Everything above the wire (request
//! headers, incarnation checks, pipelining, the service's admission) is the
//! same code either way.

use std::time::Duration;

use futures::future::BoxFuture;
use tonic::{Request, Response, Status};

use crate::proto::raft_v1::RaftPayload;

/// The RPCs of the `RaftTransport` service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Method {
    AppendEntries,
    Vote,
    InstallSnapshot,
    PreVote,
    Members,
    TimeoutNow,
}

pub trait Wire: Send + Sync + 'static {
    /// Sends `req` as `method` to the node whose peer port is `addr`.
    fn call(
        &self,
        addr: &str,
        method: Method,
        req: Request<RaftPayload>,
    ) -> BoxFuture<'static, Result<Response<RaftPayload>, Status>>;

    /// Whether a connection to `addr` is refused (nothing listens there)
    /// within `within`; false if it is accepted or nothing answers.
    fn refused(&self, addr: &str, within: Duration) -> BoxFuture<'static, bool>;
}
