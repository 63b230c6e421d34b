//! What a failed call tells its caller, without tonic's types: the code, the
//! node's message, and whether sending the call again is safe.

use std::fmt;

/// A gRPC status code, as Roster's nodes answer them (see the error table in
/// docs/api.md): `Unavailable` means not applied, `DeadlineExceeded` and `Aborted`
/// an unknown outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Code {
    Ok,
    Cancelled,
    Unknown,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Aborted,
    OutOfRange,
    Unimplemented,
    Internal,
    Unavailable,
    DataLoss,
    Unauthenticated,
}

impl From<tonic::Code> for Code {
    fn from(c: tonic::Code) -> Self {
        use tonic::Code as T;
        match c {
            T::Ok => Code::Ok,
            T::Cancelled => Code::Cancelled,
            T::Unknown => Code::Unknown,
            T::InvalidArgument => Code::InvalidArgument,
            T::DeadlineExceeded => Code::DeadlineExceeded,
            T::NotFound => Code::NotFound,
            T::AlreadyExists => Code::AlreadyExists,
            T::PermissionDenied => Code::PermissionDenied,
            T::ResourceExhausted => Code::ResourceExhausted,
            T::FailedPrecondition => Code::FailedPrecondition,
            T::Aborted => Code::Aborted,
            T::OutOfRange => Code::OutOfRange,
            T::Unimplemented => Code::Unimplemented,
            T::Internal => Code::Internal,
            T::Unavailable => Code::Unavailable,
            T::DataLoss => Code::DataLoss,
            T::Unauthenticated => Code::Unauthenticated,
        }
    }
}

/// A failed call: the node's status, and whether the call is safe to send
/// again (it was certainly not applied, or applying it twice is harmless, and
/// another attempt may succeed).
#[derive(Clone)]
pub struct Error {
    status: tonic::Status,
    retry_is_safe: bool,
}

impl Error {
    pub fn code(&self) -> Code {
        self.status.code().into()
    }

    /// The node's message: what failed and what to do.
    pub fn message(&self) -> &str {
        self.status.message()
    }

    /// Whether sending the call again is safe and may succeed. The client
    /// has already retried such errors on every node for its retry period.
    pub fn retry_is_safe(&self) -> bool {
        self.retry_is_safe
    }

    /// Whether the call may or may not have been applied.
    pub fn outcome_unknown(&self) -> bool {
        outcome_unknown(self.status.code())
    }

    /// The status as tonic gives it, metadata included.
    pub fn status(&self) -> &tonic::Status {
        &self.status
    }
}

pub(crate) fn outcome_unknown(c: tonic::Code) -> bool {
    matches!(c, tonic::Code::DeadlineExceeded | tonic::Code::Aborted)
}

impl From<tonic::Status> for Error {
    /// Not applied (`UNAVAILABLE`) or an unknown outcome: every Roster call
    /// may be sent again (each retry class in `rules` allows it).
    fn from(status: tonic::Status) -> Self {
        use tonic::Code as T;
        let retry_is_safe = matches!(status.code(), T::Unavailable | T::Unknown | T::Cancelled)
            || outcome_unknown(status.code());
        Error {
            status,
            retry_is_safe,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        e.status
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("code", &self.code())
            .field("message", &self.message())
            .field("retry_is_safe", &self.retry_is_safe)
            .finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.code(), self.message())
    }
}

/// The cause under the status: the transport's or TLS's error when the call
/// never reached a node.
impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.status)
    }
}
