//! Node-to-node requests: the headers every peer request carries, and the
//! RPCs Roster adds to openraft's (pre-vote, leadership transfer, members).

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::metadata::MetadataValue;

use super::storage::marker::Identity;
use super::{decode, encode, Node, CLUSTER_ID_HEADER, TARGET_INCARNATION_HEADER};
use crate::peers::{error_chain, Method, Peers};
use crate::proto::raft_v1::RaftPayload;

/// Peer requests carry the cluster id, so a node of another cluster refuses
/// them, and the target's incarnation, so a node whose data directory was
/// replaced refuses to act as the member it was (see [`incarnation`]).
pub(crate) fn peer_request<T>(
    msg: T,
    me: &Identity,
    target: &Node,
    timeout: Duration,
) -> Result<tonic::Request<T>, tonic::metadata::errors::InvalidMetadataValue> {
    let mut request = tonic::Request::new(msg);
    request.set_timeout(timeout);
    let meta = request.metadata_mut();
    meta.insert(CLUSTER_ID_HEADER, MetadataValue::try_from(&me.cluster_id)?);
    meta.insert(
        TARGET_INCARNATION_HEADER,
        MetadataValue::from(target.incarnation),
    );
    Ok(request)
}

/// The node-to-node RPCs Roster adds to openraft's.
#[derive(Clone, Copy, Debug)]
pub enum Extra {
    /// Leadership transfer: the payload is the asking leader's vote.
    TimeoutNow,
    /// Would the peer elect this node? See [`super::liveness::election`].
    PreVote,
    /// Which nodes are members, as the peer knows? See [`super::replication::peer_trust`].
    Members,
}

/// Sends `msg` to `target` as `rpc` and decodes its answer.
pub async fn extra_call<Req: Serialize, Resp: DeserializeOwned>(
    peers: &Peers,
    me: &Identity,
    target: &Node,
    rpc: Extra,
    msg: &Req,
    timeout: Duration,
) -> Result<Resp, String> {
    let data = encode(msg).map_err(|e| e.to_string())?;
    let req = peer_request(RaftPayload { data }, me, target, timeout).map_err(|e| e.to_string())?;
    let method = match rpc {
        Extra::TimeoutNow => Method::TimeoutNow,
        Extra::PreVote => Method::PreVote,
        Extra::Members => Method::Members,
    };
    let reply = peers
        .call(&target.peer_addr, method, req)
        .await
        .map_err(|s| format!("{rpc:?} to {}: {}", target.peer_addr, error_chain(&s)))?;
    decode(&reply.into_inner().data).map_err(|e| e.to_string())
}
