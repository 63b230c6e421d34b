//! The public gRPC API: the `Registry`, `Cluster` and `Acl` services, the
//! conversions between protobuf and registry types, authorization by token,
//! forwarding to the leader, and the `[limits]` on what one client may take.

use crate::error::Error;
use crate::registry::watch::{RegistryState, SharedState};

pub mod acl;
pub mod auth;
mod body;
pub mod cluster;
pub mod convert;
pub mod forward;
pub mod limits;
mod namespaces;
pub mod registry;
mod sessions;
mod watch;

/// Runs `f` on the node's state under its read lock.
pub(crate) fn read_state<T>(
    state: &SharedState,
    f: impl FnOnce(&RegistryState) -> T,
) -> Result<T, Error> {
    let st = state
        .read()
        .map_err(|_| Error::Internal("state lock poisoned".into()))?;
    Ok(f(&st))
}

/// What the tower layers in front of the services (`auth`, `forward`) answer with.
type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

/// The service `poll_ready` made ready, for this call; a clone of it stays
/// behind for the next call, which readies it again.
fn take_ready<S: Clone>(inner: &mut S) -> S {
    let next = inner.clone();
    std::mem::replace(inner, next)
}
