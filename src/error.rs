//! The error type of the registry, and its single mapping to gRPC status codes.

use tonic::{Code, Status};

#[derive(Clone, Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("not found: {0}")]
    NotFound(String),
    /// No leader, no quorum, or the leader could not be reached: the caller may retry.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A peer or data directory belongs to another cluster or node.
    #[error("wrong cluster: {0}")]
    WrongCluster(String),
    #[error("storage: {0}")]
    Storage(String),
    #[error("internal: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let code = match &e {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::Unavailable(_) => Code::Unavailable,
            Error::WrongCluster(_) => Code::FailedPrecondition,
            Error::Storage(_) | Error::Internal(_) => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}

impl From<sled::Error> for Error {
    fn from(e: sled::Error) -> Self {
        Error::Storage(e.to_string())
    }
}

impl From<bincode::Error> for Error {
    fn from(e: bincode::Error) -> Self {
        Error::Storage(format!("decode: {e}"))
    }
}
