//! What every front-end's request checks of the namespace it names.

use tonic::Status;

use super::auth;
use super::convert;
use crate::raft::proposer::Proposer;
use crate::registry::watch::{RegistryState, SharedState};
use crate::registry::Outcome;

/// The request's namespace, once the grant reaches it and it exists: in
/// that order, so a token learns nothing of a namespace it cannot use. Its
/// absence is confirmed by a read index before it is told.
pub(super) async fn enter<'n>(
    state: &SharedState,
    proposer: &Proposer,
    grant: Option<&auth::Grant>,
    ns: &'n str,
) -> Result<&'n str, Status> {
    let ns = convert::namespace_of(ns)?;
    auth::may_enter(grant, ns)?;
    let exists = |st: &RegistryState| st.catalog.namespace(ns).is_some();
    if !super::read_state(state, exists)? {
        proposer.read_index().await?;
        if !super::read_state(state, exists)? {
            return Err(Outcome::NamespaceNotFound(ns.into()).into_error().into());
        }
    }
    Ok(ns)
}
