//! The error type of the registry, and its single mapping to gRPC status codes.
//!
//! The codes tell a client what to do: `UNAVAILABLE` means the request was
//! certainly not applied and may be retried anywhere; `DEADLINE_EXCEEDED` and
//! `ABORTED` mean it was handed to Raft (or to the leader) and its outcome is
//! unknown: it may still be applied. Every write is safe to retry after either
//! (see `OUTCOME_UNKNOWN_HINT`).

use tonic::{Code, Status};

use crate::grpc::LEADER_ADDRESS_HEADER;

/// What a client may do after a write with an unknown outcome.
pub const OUTCOME_UNKNOWN_HINT: &str = "the write may or may not be applied; \
     Register, Heartbeat and ConfigureService are safe to retry, and a retried \
     Deregister answers NOT_FOUND if the first one was applied";

#[derive(Clone, Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("not found: {0}")]
    NotFound(String),
    /// A watch asked for a revision this cluster has not reached.
    #[error("out of range: {0}")]
    OutOfRange(String),
    /// Not applied: no leader, no quorum, shutting down, or the leader could not
    /// be reached. The caller may retry, possibly on another node.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// This node does not lead; nothing was applied. `leader` is the leader it
    /// knows (id and client address, empty while not recorded yet), which the
    /// status carries for forwarding and for clients.
    #[error("unavailable: {}", not_leader(leader))]
    NotLeader { leader: Option<(u64, String)> },
    /// Proposed, but no answer before the deadline: the outcome is unknown.
    #[error("outcome unknown: {0}; {OUTCOME_UNKNOWN_HINT}")]
    Timeout(String),
    /// Proposed or forwarded, then interrupted (leadership moved, connection
    /// lost): the outcome is unknown.
    #[error("outcome unknown: {0}; {OUTCOME_UNKNOWN_HINT}")]
    Interrupted(String),
    /// The request does not fit the cluster's state: a peer or data directory
    /// of another cluster, a membership change openraft refuses.
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// No token, or one the cluster does not know (`[auth]`).
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The token's role or service scope does not cover the request.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// A configured limit (`[limits]`) is reached; the message names it.
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    #[error("storage: {0}")]
    Storage(String),
    #[error("internal: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::Unavailable(_) | Error::NotLeader { .. } => Code::Unavailable,
            Error::Timeout(_) => Code::DeadlineExceeded,
            Error::Interrupted(_) => Code::Aborted,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::Storage(_) | Error::Internal(_) => Code::Internal,
        }
    }
}

/// Response metadata naming the leader when a node refuses with `NotLeader`:
/// followers forward by it (`api::forward`), and clients may use it as a hint.
pub const LEADER_ID_HEADER: &str = "roster-leader-id";

fn not_leader(leader: &Option<(u64, String)>) -> String {
    match leader {
        Some((id, addr)) if addr.is_empty() => {
            format!("this node does not lead, node {id} does; not applied, retry")
        }
        Some((id, addr)) => {
            format!("this node does not lead, node {id} at {addr} does; not applied, retry")
        }
        None => "no leader elected at the moment; not applied, retry".into(),
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let mut meta = tonic::metadata::MetadataMap::new();
        if let Error::NotLeader {
            leader: Some((id, addr)),
        } = &e
        {
            meta.insert(LEADER_ID_HEADER, (*id).into());
            // An address not known yet, or no valid header value, is not given.
            let value = Some(addr).filter(|a| !a.is_empty());
            if let Some(v) = value.and_then(|a| a.parse().ok()) {
                meta.insert(LEADER_ADDRESS_HEADER, v);
            }
        }
        Status::with_metadata(e.code(), e.to_string(), meta)
    }
}

impl From<sled::Error> for Error {
    fn from(e: sled::Error) -> Self {
        Error::Storage(e.to_string())
    }
}

/// Openraft's storage errors, which the log store and state machine return.
impl From<openraft::StorageError<u64>> for Error {
    fn from(e: openraft::StorageError<u64>) -> Self {
        Error::Storage(e.to_string())
    }
}

impl From<bincode::Error> for Error {
    fn from(e: bincode::Error) -> Self {
        Error::Storage(format!("decode: {e}"))
    }
}
