//! Outbound Raft RPCs: openraft's network traits over the `RaftTransport` gRPC service.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::Vote;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

use super::incarnation::{self, Learned};
use super::marker::Identity;
use super::{
    decode, encode, Node, NodeId, TypeConfig, CLUSTER_ID_HEADER, INCARNATION_HEADER,
    TARGET_INCARNATION_HEADER,
};
use crate::proto::raft_v1::raft_transport_client::RaftTransportClient;
use crate::proto::raft_v1::RaftPayload;

/// Snapshot chunks and entry batches can be several MiB; tonic's default cap is 4 MiB.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// A lazily connecting channel to `addr` ("host:port").
pub fn channel(addr: &str, connect_timeout: Duration) -> Result<Channel, tonic::transport::Error> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .connect_lazy())
}

/// Peer requests carry the cluster id, so a node of another cluster refuses
/// them, and the target's incarnation, so a node whose data directory was
/// replaced refuses to act as the member it was (see [`incarnation`]).
fn peer_request<T>(
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

/// Asks `target` to campaign at once (leadership transfer).
/// `leader_vote` names the leader asking; the node refuses if it follows another.
pub async fn timeout_now(
    me: &Identity,
    target: &Node,
    leader_vote: &Vote<NodeId>,
) -> Result<(), String> {
    let timeout = Duration::from_secs(1);
    let ch = channel(&target.addr, timeout).map_err(|e| e.to_string())?;
    let data = encode(leader_vote).map_err(|e| e.to_string())?;
    let req = peer_request(RaftPayload { data }, me, target, timeout).map_err(|e| e.to_string())?;
    RaftTransportClient::new(ch)
        .timeout_now(req)
        .await
        .map(|_| ())
        .map_err(|s| s.message().to_string())
}

/// An error and its causes on one line: "transport error: tcp connect error:
/// Connection refused (os error 111)", without repeats.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    // A status's Display carries its source in Debug form: take its message.
    let mut out = match e.downcast_ref::<tonic::Status>() {
        Some(s) => s.message().to_string(),
        None => e.to_string(),
    };
    let mut cause = e.source();
    while let Some(c) = cause {
        let s = c.to_string();
        if !out.contains(&s) {
            out = format!("{out}: {s}");
        }
        cause = c.source();
    }
    out
}

/// Peer reachability, for logging: a peer that is down is reported when it
/// goes down, every `REMIND` while it stays down, and when it is back, rather
/// than on every heartbeat and vote request.
#[derive(Default)]
struct PeerLog {
    down: HashMap<NodeId, Outage>,
}

struct Outage {
    since: Instant,
    reported: Instant,
    failures: u64,
    /// The peer answered and refused, rather than could not be reached: a
    /// change between the two is reported at once.
    refused: bool,
}

pub(super) const REMIND: Duration = Duration::from_secs(30);

impl PeerLog {
    fn failed(&mut self, target: NodeId, addr: &str, cause: &str, refused: bool) {
        let now = Instant::now();
        match self.down.get_mut(&target) {
            Some(o) if o.refused != refused => {
                self.down.remove(&target);
                self.failed(target, addr, cause, refused);
            }
            None => {
                tracing::warn!("cannot reach node {target} at {addr}: {cause}; retrying");
                self.down.insert(
                    target,
                    Outage {
                        since: now,
                        reported: now,
                        failures: 1,
                        refused,
                    },
                );
            }
            Some(o) => {
                o.failures += 1;
                if now.duration_since(o.reported) >= REMIND {
                    o.reported = now;
                    tracing::warn!(
                        "node {target} at {addr} unreachable for {}s ({} attempts): {cause}",
                        now.duration_since(o.since).as_secs(),
                        o.failures
                    );
                }
            }
        }
    }

    fn succeeded(&mut self, target: NodeId, addr: &str) {
        if let Some(o) = self.down.remove(&target) {
            tracing::info!(
                "node {target} at {addr} reachable again after {}s",
                o.since.elapsed().as_secs()
            );
        }
    }
}

#[derive(Clone)]
pub struct Network {
    me: Arc<Identity>,
    peers: Arc<Mutex<PeerLog>>,
    learned: Learned,
}

impl Network {
    /// `me` is this node; the incarnations peers state in their replies are
    /// recorded in `learned`.
    pub fn new(me: Identity, learned: Learned) -> Self {
        Network {
            me: Arc::new(me),
            peers: Arc::default(),
            learned,
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> PeerClient {
        let client = channel(&node.addr, Duration::from_secs(1)).map(|c| {
            RaftTransportClient::new(c)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES)
        });
        PeerClient {
            target,
            node: node.clone(),
            me: self.me.clone(),
            client: client.map_err(|e| e.to_string()),
            peers: self.peers.clone(),
            learned: self.learned.clone(),
        }
    }
}

pub struct PeerClient {
    target: NodeId,
    /// The target as this node's membership recorded it when the client was made.
    node: Node,
    me: Arc<Identity>,
    peers: Arc<Mutex<PeerLog>>,
    learned: Learned,
    /// An unparsable peer address is reported on every call, not at construction.
    client: Result<RaftTransportClient<Channel>, String>,
}

#[derive(Clone, Copy)]
enum Rpc {
    AppendEntries,
    Vote,
    InstallSnapshot,
}

impl PeerClient {
    async fn call<Req, Resp, E>(
        &mut self,
        rpc: Rpc,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, Node, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let client = self.client.as_mut().map_err(|e| {
            RPCError::Unreachable(Unreachable::new(&std::io::Error::other(e.clone())))
        })?;
        let data = encode(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let request = peer_request(
            RaftPayload { data },
            &self.me,
            &self.node,
            option.hard_ttl(),
        )
        .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let reply = match rpc {
            Rpc::AppendEntries => client.append_entries(request).await,
            Rpc::Vote => client.vote(request).await,
            Rpc::InstallSnapshot => client.install_snapshot(request).await,
        };
        if let Ok(mut peers) = self.peers.lock() {
            let addr = &self.node.addr;
            match &reply {
                Ok(_) => peers.succeeded(self.target, addr),
                Err(s) if s.code() == Code::FailedPrecondition => peers.failed(
                    self.target,
                    addr,
                    &format!("it refuses this node: {}", s.message()),
                    true,
                ),
                Err(s) => peers.failed(self.target, addr, &error_chain(s), false),
            }
        }
        let reply = reply.map_err(|status| match status.code() {
            // Openraft backs off from an unreachable peer instead of retrying hot;
            // a peer that refuses this node (another cluster, another
            // incarnation) is as good as unreachable.
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::FailedPrecondition => RPCError::Unreachable(Unreachable::new(&status)),
            _ => RPCError::Network(NetworkError::new(&status)),
        })?;
        self.learned.record(
            self.target,
            incarnation::header(reply.metadata(), INCARNATION_HEADER),
        );
        let result: Result<Resp, RaftError<NodeId, E>> = decode(&reply.into_inner().data)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        self.call(Rpc::AppendEntries, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Node, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(Rpc::InstallSnapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        self.call(Rpc::Vote, &rpc, &option).await
    }
}
