//! Outbound Raft RPCs: openraft's network traits over the `RaftTransport` gRPC service.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;

use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError,
    Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, ClientTlsConfig};
use tonic::Code;

use super::incarnation::{self, Learned};
use super::marker::Identity;
use super::pipeline::{self, Answer, Appends, Early, Pipeline};
use super::wire::{Method, Wire};
use super::{
    decode, encode, Node, NodeId, TypeConfig, CLUSTER_ID_HEADER, EARLY_HEADER,
    TARGET_INCARNATION_HEADER,
};
use crate::grpc::{endpoint, MAX_MESSAGE_BYTES};
use crate::proto::raft_v1::raft_transport_client::RaftTransportClient;
use crate::proto::raft_v1::RaftPayload;

/// A peer this far (least round trip) is far: waiting a round trip costs more
/// than the larger batches the wait allows.
pub const FAR: Duration = Duration::from_millis(2);
/// How long the least round trip seen stands for the distance to a peer.
const FLOOR_WINDOW: Duration = Duration::from_secs(2);

/// Entries per AppendEntries at most (openraft's `max_payload_entries` is set
/// to this): many, so that a follower behind a long link catches up by the
/// round trip, not the entry; `MAX_BATCH_BYTES` keeps the message small.
pub const MAX_ENTRIES: u64 = 512;
/// An AppendEntries larger than this is split (entries carry up to 128
/// commands each, with metadata).
const MAX_BATCH_BYTES: u64 = 4 * 1024 * 1024;
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// HTTP/2 pings on peer connections: a connection to a peer that vanished
/// (host down, cable cut, no RST) is closed and dialled again on the next
/// request, instead of swallowing requests until each times out.
const PEER_KEEPALIVE: Duration = Duration::from_secs(2);
const PEER_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);

/// A long-lived channel to a peer: one HTTP/2 connection, reconnected when it breaks.
fn peer_channel(
    addr: &str,
    connect_timeout: Duration,
    tls: Option<&ClientTlsConfig>,
) -> Result<Channel, tonic::transport::Error> {
    Ok(endpoint(addr, connect_timeout, tls)?
        .http2_keep_alive_interval(PEER_KEEPALIVE)
        .keep_alive_timeout(PEER_KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        // Hyper's fixed windows (2 MiB a stream, 5 MiB the connection) carry a
        // batch per round trip on a long link. Not the adaptive window: it
        // starts small, and h2 sizes its guard against floods of small DATA
        // frames by the window, which then closes a connection busy with
        // hundreds of forwarded requests ("too_many_data_frames").
        .connect_lazy())
}

/// What this node shares across its connections to peers: one channel per
/// peer address, used by every Raft RPC and by forwarded client requests
/// (never a connection per request), the TLS they are made with, and the
/// measured round-trip times.
#[derive(Clone)]
pub struct Peers {
    inner: Arc<PeersInner>,
}

struct PeersInner {
    /// Deadline of one peer request, and of making a connection.
    rpc_timeout: Duration,
    /// Mutual TLS with the cluster's CA, when the cluster uses TLS.
    tls: Mutex<Option<ClientTlsConfig>>,
    channels: Mutex<HashMap<String, Channel>>,
    rtt: Mutex<HashMap<NodeId, Rtt>>,
    /// Early AppendEntries to each peer (see [`pipeline`]): answered with
    /// success, and not (a broken chain).
    early: Mutex<HashMap<NodeId, (u64, u64)>>,
    log: Mutex<PeerLog>,
    /// Raft RPCs go over this instead of gRPC (the simulation).
    wire: Option<Arc<dyn Wire>>,
}

/// Heartbeat round trips to one peer.
struct Rtt {
    /// RFC 6298's SRTT: what requests to the peer take, its queues included.
    smoothed: Duration,
    /// The least round trip seen lately (as BBR's min RTT): the distance to
    /// the peer, which a busy peer's queues do not inflate.
    floor: Duration,
    floor_at: Instant,
    /// When a round trip too close to the RPC deadline was last reported.
    warned: Option<Instant>,
}

impl Peers {
    pub fn new(rpc_timeout: Duration, tls: Option<ClientTlsConfig>) -> Self {
        Self::build(rpc_timeout, tls, None)
    }

    /// Peers whose Raft RPCs go over `wire` (see [`super::wire`]).
    #[cfg(feature = "sim")]
    pub fn on(rpc_timeout: Duration, wire: Arc<dyn Wire>) -> Self {
        Self::build(rpc_timeout, None, Some(wire))
    }

    fn build(
        rpc_timeout: Duration,
        tls: Option<ClientTlsConfig>,
        wire: Option<Arc<dyn Wire>>,
    ) -> Self {
        Peers {
            inner: Arc::new(PeersInner {
                rpc_timeout,
                tls: Mutex::new(tls),
                channels: Mutex::default(),
                rtt: Mutex::default(),
                early: Mutex::default(),
                log: Mutex::default(),
                wire,
            }),
        }
    }

    /// The deadline of one RPC to a peer.
    pub fn rpc_timeout(&self) -> Duration {
        self.inner.rpc_timeout
    }

    /// The channel to the peer at `addr`, made on first use.
    pub fn channel(&self, addr: &str) -> Result<Channel, String> {
        let mut channels = self
            .inner
            .channels
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let tls = self.inner.tls.lock().unwrap_or_else(|p| p.into_inner());
        let c = peer_channel(addr, self.inner.rpc_timeout, tls.as_ref())
            .map_err(|e| format!("peer address {addr:?}: {e}"))?;
        channels.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    /// New certificates: connections made from now on use them. Channels in
    /// use keep their connection until it breaks; calls take a channel anew
    /// each time, so none lives on with the old certificates.
    pub fn set_tls(&self, tls: ClientTlsConfig) {
        let mut channels = self
            .inner
            .channels
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *self.inner.tls.lock().unwrap_or_else(|p| p.into_inner()) = Some(tls);
        channels.clear();
    }

    /// Sends a Raft RPC to the peer at `addr`.
    async fn call(
        &self,
        addr: &str,
        method: Method,
        req: tonic::Request<RaftPayload>,
    ) -> Result<tonic::Response<RaftPayload>, tonic::Status> {
        if let Some(wire) = &self.inner.wire {
            return wire.call(addr, method, req).await;
        }
        let mut client =
            RaftTransportClient::new(self.channel(addr).map_err(tonic::Status::unavailable)?)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES);
        match method {
            Method::AppendEntries => client.append_entries(req).await,
            Method::Vote => client.vote(req).await,
            Method::InstallSnapshot => client.install_snapshot(req).await,
            Method::PreVote => client.pre_vote(req).await,
            Method::Members => client.members(req).await,
            Method::TimeoutNow => client.timeout_now(req).await,
        }
    }

    /// Whether the peer port at `addr` refuses connections (nothing listens
    /// there) within `within`.
    pub async fn refused(&self, addr: &str, within: Duration) -> bool {
        if let Some(wire) = &self.inner.wire {
            return wire.refused(addr, within).await;
        }
        matches!(
            tokio::time::timeout(within, tokio::net::TcpStream::connect(addr)).await,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused
        )
    }

    /// Records a heartbeat round trip; one that uses up half the RPC deadline
    /// leaves no room for a retransmission or a batch, and the operator is told.
    fn sample_rtt(&self, target: NodeId, sample: Duration) {
        let mut rtt = self.inner.rtt.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let r = rtt.entry(target).or_insert(Rtt {
            smoothed: sample,
            floor: sample,
            floor_at: now,
            warned: None,
        });
        r.smoothed = (r.smoothed * 7 + sample) / 8;
        if sample <= r.floor || now.duration_since(r.floor_at) > FLOOR_WINDOW {
            r.floor = sample;
            r.floor_at = now;
        }
        let limit = self.inner.rpc_timeout / 2;
        if r.smoothed > limit && r.warned.is_none_or(|t| t.elapsed() >= REMIND) {
            r.warned = Some(Instant::now());
            tracing::warn!(
                "round trip to node {target} is {} ms, over half of rpc_timeout_ms ({} ms): \
                 replication to it may stall; use [raft] network = \"wan\" or a larger rpc_timeout_ms",
                r.smoothed.as_millis(),
                self.inner.rpc_timeout.as_millis()
            );
        }
    }

    /// The smoothed round trip to `target` and its distance (see [`Rtt`]),
    /// zero before the first sample.
    fn rtt(&self, target: NodeId) -> (Duration, Duration) {
        let rtt = self.inner.rtt.lock().unwrap_or_else(|p| p.into_inner());
        rtt.get(&target)
            .map(|r| (r.smoothed, r.floor))
            .unwrap_or_default()
    }

    /// The distance within which a quorum of `voters` (this node among them)
    /// answers: the one to the follower that completes the majority. Only
    /// voters count: the measurements of removed peers are kept, but stale.
    pub fn quorum_distance(&self, voters: &[NodeId]) -> Duration {
        let rtt = self.inner.rtt.lock().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<Duration> = voters
            .iter()
            .filter_map(|v| rtt.get(v))
            .map(|r| r.floor)
            .collect();
        all.sort();
        match voters.len() / 2 {
            0 => Duration::ZERO,
            k => all.get(k - 1).copied().unwrap_or_default(),
        }
    }

    /// Smoothed round-trip times of heartbeats this node sent (so: as a leader).
    pub fn rtts(&self) -> HashMap<NodeId, Duration> {
        self.inner
            .rtt
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(id, r)| (*id, r.smoothed))
            .collect()
    }

    /// Early AppendEntries this node sent to each peer as a leader: how many
    /// the peer accepted, and how many broke the chain.
    pub fn early_appends(&self) -> HashMap<NodeId, (u64, u64)> {
        self.inner
            .early
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn count_early(&self, target: NodeId, accepted: bool) {
        let mut early = self.inner.early.lock().unwrap_or_else(|p| p.into_inner());
        let (ok, broken) = early.entry(target).or_default();
        *if accepted { ok } else { broken } += 1;
    }

    /// How long ago each peer last answered this node's Raft RPCs (so, on a
    /// leader: its followers).
    pub fn last_contacts(&self) -> HashMap<NodeId, Duration> {
        let log = self.inner.log.lock().unwrap_or_else(|p| p.into_inner());
        log.answered
            .iter()
            .map(|(id, at)| (*id, at.elapsed()))
            .collect()
    }

    fn logged(&self, target: NodeId, addr: &str, reply: &Result<(), &tonic::Status>) {
        let mut log = self.inner.log.lock().unwrap_or_else(|p| p.into_inner());
        match reply {
            Ok(()) => log.succeeded(target, addr),
            Err(s) if s.code() == Code::FailedPrecondition => log.failed(
                target,
                addr,
                &format!("it refuses this node: {}", s.message()),
                true,
            ),
            Err(s) => log.failed(target, addr, &error_chain(*s), false),
        }
    }
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

/// The node-to-node RPCs Roster adds to openraft's.
#[derive(Clone, Copy, Debug)]
pub enum Extra {
    /// Leadership transfer: the payload is the asking leader's vote.
    TimeoutNow,
    /// Would the peer elect this node? See [`super::election`].
    PreVote,
    /// Which nodes are members, as the peer knows? See [`super::peer_trust`].
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
    /// When each peer last answered a Raft RPC of this node.
    answered: HashMap<NodeId, Instant>,
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

/// Keys remembered at most; past that all are forgotten, so a flood of
/// distinct callers cannot grow the map without bound.
const REMEMBERED: usize = 1024;

/// When to log something that repeats (a refused peer keeps retrying): the
/// first time for a key, then every `REMIND` while it goes on.
pub(super) struct Reminders<K>(Mutex<HashMap<K, Instant>>);

impl<K> Default for Reminders<K> {
    fn default() -> Self {
        Reminders(Mutex::default())
    }
}

impl<K: std::hash::Hash + Eq> Reminders<K> {
    /// Whether `key` is to be logged now.
    pub(super) fn due(&self, key: K) -> bool {
        let mut last = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if last
            .get(&key)
            .is_some_and(|t| now.duration_since(*t) < REMIND)
        {
            return false;
        }
        if last.len() >= REMEMBERED {
            last.clear();
        }
        last.insert(key, now);
        true
    }
}

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
        self.answered.insert(target, Instant::now());
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
    peers: Peers,
    learned: Learned,
    heartbeat: Duration,
    appends: Appends,
}

impl Network {
    /// `me` is this node; the incarnations peers state in their replies are
    /// recorded in `learned`. `heartbeat`: the leader's heartbeat interval.
    /// `appends`: the log store's, which the pipelines follow.
    pub fn new(
        me: Identity,
        peers: Peers,
        learned: Learned,
        heartbeat: Duration,
        appends: Appends,
    ) -> Self {
        Network {
            me: Arc::new(me),
            peers,
            learned,
            heartbeat,
            appends,
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> PeerClient {
        PeerClient {
            link: Link {
                target,
                node: node.clone(),
                me: self.me.clone(),
                peers: self.peers.clone(),
                learned: self.learned.clone(),
            },
            max_entries: None,
            heartbeat: self.heartbeat,
            answered: Arc::default(),
            deferred: Arc::default(),
            pipeline: Arc::default(),
            appends: self.appends.clone(),
            behind: false,
        }
    }
}

/// Requests to one peer.
#[derive(Clone)]
struct Link {
    target: NodeId,
    /// The target as this node's membership recorded it when the client was made.
    node: Node,
    me: Arc<Identity>,
    peers: Peers,
    learned: Learned,
}

/// One of openraft's clients of a peer: a replication stream, a snapshot
/// sender, or a leadership confirmation.
#[derive(Clone)]
pub struct PeerClient {
    link: Link,
    /// Entries per AppendEntries this link has carried in time, once a batch
    /// did not: halved on each such timeout, doubled on each success within
    /// half the deadline.
    max_entries: Option<u64>,
    heartbeat: Duration,
    /// When the peer last answered an AppendEntries of this client (or of
    /// its background heartbeats).
    answered: Arc<Mutex<Option<Instant>>>,
    /// A higher vote a heartbeat sent in the background came back with: the
    /// next call reports it.
    deferred: Arc<Mutex<Option<AppendEntriesResponse<NodeId>>>>,
    /// Early sends of appended entries to the peer (see [`pipeline`]).
    pipeline: Arc<Pipeline>,
    appends: Appends,
    /// The peer was found to lack entries of an earlier term (see
    /// `PeerClient::holds`): it gets them from then on without being asked.
    behind: bool,
}

#[derive(Clone, Copy)]
enum Rpc {
    AppendEntries,
    /// An AppendEntries sent ahead of openraft (see [`pipeline`]).
    EarlyAppend,
    Vote,
    InstallSnapshot,
}

impl Link {
    async fn call<Req, Resp, E>(
        &self,
        rpc: Rpc,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, Node, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let data = encode(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let request = peer_request(
            RaftPayload { data },
            &self.me,
            &self.node,
            option.hard_ttl(),
        )
        .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut request = request;
        let method = match rpc {
            Rpc::AppendEntries => Method::AppendEntries,
            Rpc::EarlyAppend => {
                request
                    .metadata_mut()
                    .insert(EARLY_HEADER, MetadataValue::from_static("1"));
                Method::AppendEntries
            }
            Rpc::Vote => Method::Vote,
            Rpc::InstallSnapshot => Method::InstallSnapshot,
        };
        // The channel is taken anew each call: after a certificate reload it is a new one.
        let reply = self.peers.call(&self.node.peer_addr, method, request).await;
        self.peers.logged(
            self.target,
            &self.node.peer_addr,
            &reply.as_ref().map(|_| ()),
        );
        let reply = reply.map_err(|status| match status.code() {
            // Openraft backs off from an unreachable peer instead of retrying hot;
            // a peer that refuses this node (another cluster, another
            // incarnation) is as good as unreachable. A request that timed
            // out has waited already: it is retried at once, so a slow link
            // is used as fast as it delivers.
            Code::Unavailable | Code::FailedPrecondition => {
                RPCError::Unreachable(Unreachable::new(&status))
            }
            _ => RPCError::Network(NetworkError::new(&status)),
        })?;
        self.learned
            .record(self.target, incarnation::stated(reply.metadata()));
        let result: Result<Resp, RaftError<NodeId, E>> = decode(&reply.into_inner().data)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    /// Sends an early AppendEntries and passes its answer on; one without
    /// success breaks the pipeline's chain.
    async fn send_early(&self, early: Early, pipeline: Weak<Pipeline>) {
        let option = RPCOption::new(early.deadline);
        let reply = tokio::time::timeout(
            early.deadline,
            self.call::<_, AppendEntriesResponse<NodeId>, openraft::error::Infallible>(
                Rpc::EarlyAppend,
                &early.request,
                &option,
            ),
        )
        .await;
        let answer = match reply {
            Ok(Ok(AppendEntriesResponse::Success)) => Answer::Success,
            Ok(Ok(AppendEntriesResponse::HigherVote(v))) => Answer::Higher(v),
            other => {
                let why = match other {
                    Ok(Ok(r)) => r.to_string(),
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "timed out".to_string(),
                };
                tracing::debug!(
                    "early AppendEntries to node {} after {:?} not accepted: {why}",
                    self.target,
                    early.request.prev_log_id,
                );
                if let Some(p) = pipeline.upgrade() {
                    p.break_chain();
                }
                Answer::Failed
            }
        };
        self.peers
            .count_early(self.target, !matches!(answer, Answer::Failed));
        let _ = early.answer.send(Some(answer));
    }
}

impl PeerClient {
    /// Sends an AppendEntries of `n` entries, halving the batch on a link too
    /// slow for it, and samples heartbeat round trips.
    async fn send_append(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
        n: u64,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        if n > 1 {
            let size = bincode::serialized_size(&rpc).unwrap_or(0);
            if size > MAX_BATCH_BYTES {
                let fit = (n * MAX_BATCH_BYTES / size).max(1);
                return Err(RPCError::PayloadTooLarge(
                    PayloadTooLarge::new_entries_hint(fit),
                ));
            }
        }
        let sent = Instant::now();
        let mut probe = (n == 0).then(|| RttProbe {
            peers: self.link.peers.clone(),
            target: self.link.target,
            sent,
        });
        let deadline = batch_deadline(&option);
        let reply = if n > 1 {
            match tokio::time::timeout(deadline, self.link.call(Rpc::AppendEntries, &rpc, &option))
                .await
            {
                Ok(r) => r,
                Err(_) => {
                    let max = (n / 2).max(1);
                    self.max_entries = Some(max);
                    return Err(RPCError::PayloadTooLarge(
                        PayloadTooLarge::new_entries_hint(max),
                    ));
                }
            }
        } else {
            self.link.call(Rpc::AppendEntries, &rpc, &option).await
        };
        match &reply {
            // A batch that made it in half the time may double: loss, not
            // size, is what makes most batches late on a long link, so the
            // cap must not stick at its low after one unlucky stall.
            Ok(_) if sent.elapsed() < deadline / 2 => {
                self.max_entries = self.max_entries.map(|m| m * 2).filter(|m| *m < MAX_ENTRIES);
            }
            // No round trip to learn from a peer that could not be reached.
            Err(RPCError::Unreachable(_)) => probe = None,
            _ => {}
        }
        drop(probe);
        if matches!(&reply, Ok(r) if !matches!(r, AppendEntriesResponse::HigherVote(_))) {
            *self.answered.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        }
        reply
    }
}

impl PeerClient {
    /// Starts feeding this stream's pipeline with the log store's appends,
    /// once; the task ends with the stream.
    fn follow_appends(&self) {
        if !self.pipeline.start_listening() {
            return;
        }
        let (link, weak, appends) = (
            self.link.clone(),
            Arc::downgrade(&self.pipeline),
            self.appends.clone(),
        );
        tokio::spawn(async move {
            let early_weak = weak.clone();
            pipeline::follow(weak, &appends, |early| {
                let (link, weak) = (link.clone(), early_weak.clone());
                tokio::spawn(async move { link.send_early(early, weak).await });
            })
            .await
        });
    }

    /// A new leader does not know where a follower's log ends: openraft 0.9
    /// searches for it by sending entries from the middle of its log on,
    /// thousands the follower most likely holds already, and its first entry
    /// of the new term commits only after them (a failover with 100,000
    /// instances took 100-200 ms longer than one with none). The last entry
    /// of an earlier term in a request is first asked about with an empty
    /// request: a follower that holds it holds every entry before it (Raft's
    /// log matching), and gets only the entries of this leader's term after
    /// it, or none. `Err`: the answer; `Ok`: the request to send.
    async fn holds(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: &RPCOption,
    ) -> Result<AppendEntriesRequest<TypeConfig>, AppendEntriesResponse<NodeId>> {
        let term = rpc.vote.leader_id().term;
        // Terms never fall along a log: when the first entry is of this term,
        // so are all (the steady state, checked in O(1)).
        let older = |e: &openraft::Entry<TypeConfig>| e.log_id.leader_id.term < term;
        if self.behind || !rpc.entries.first().is_some_and(older) {
            return Ok(rpc);
        }
        let Some(k) = rpc.entries.iter().rposition(older) else {
            return Ok(rpc);
        };
        let last = rpc.entries[k].log_id;
        let ask = AppendEntriesRequest {
            vote: rpc.vote,
            prev_log_id: Some(last),
            // Nothing past what the answer vouches for.
            leader_commit: rpc.leader_commit.min(Some(last)),
            entries: Vec::new(),
        };
        match self.send_append(ask, option.clone(), 0).await {
            Ok(AppendEntriesResponse::Success) if k + 1 == rpc.entries.len() => {
                Err(AppendEntriesResponse::Success)
            }
            // The follower's success for the rest answers the whole request.
            Ok(AppendEntriesResponse::Success) => {
                rpc.entries.drain(..=k);
                rpc.prev_log_id = Some(last);
                Ok(rpc)
            }
            Ok(higher @ AppendEntriesResponse::HigherVote(_)) => Err(higher),
            // Behind: it is sent what it lacks from now on.
            Ok(_) => {
                self.behind = true;
                Ok(rpc)
            }
            // Unreachable: the request fails the same way, and openraft retries.
            Err(_) => Ok(rpc),
        }
    }
}

/// Samples a heartbeat's round trip when it ends: answered, timed out, or
/// dropped by openraft at its deadline. The last two give the time waited, a
/// lower bound, so the RTT shown does not keep its value from before a link
/// slowed down.
struct RttProbe {
    peers: Peers,
    target: NodeId,
    sent: Instant,
}

impl Drop for RttProbe {
    fn drop(&mut self) {
        self.peers.sample_rtt(self.target, self.sent.elapsed());
    }
}

/// Openraft gives an AppendEntries as long as a heartbeat round trip may take;
/// a batch that needs longer on a slow link would time out forever. A batch
/// that misses this share of the deadline is cut in half instead.
fn batch_deadline(option: &RPCOption) -> Duration {
    option.soft_ttl()
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        let rpc = match self.holds(rpc, &option).await {
            Ok(rpc) => rpc,
            Err(answer) => return Ok(answer),
        };
        let n = rpc.entries.len() as u64;
        if let Some(max) = self.max_entries.filter(|max| n > *max) {
            return Err(RPCError::PayloadTooLarge(
                PayloadTooLarge::new_entries_hint(max),
            ));
        }
        if let Some(higher) = self
            .deferred
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            return Ok(higher);
        }
        // Openraft sends a heartbeat right after each commit (to pass the
        // commit index on) and waits for its answer before sending the next
        // entries: on a long link every write would wait a round trip behind
        // it (nearby, the wait is short and lets the next batch grow). A
        // heartbeat to a far peer, on a replication stream it answered within
        // two heartbeat intervals and a round trip goes out in the background
        // instead; a higher vote in its answer is reported on the next call.
        // So the leader's record of quorum contact runs ahead of the truth by
        // that much at most. Answers to a fresh client (a leadership
        // confirmation for a read) are never presumed.
        let answered = *self.answered.lock().unwrap_or_else(|p| p.into_inner());
        let (rtt, distance) = self.link.peers.rtt(self.link.target);
        if n == 0
            && distance >= FAR
            && answered.is_some_and(|t| t.elapsed() < self.heartbeat * 2 + rtt)
        {
            let mut bg = self.clone();
            tokio::spawn(async move {
                if let Ok(higher @ AppendEntriesResponse::HigherVote(_)) =
                    bg.send_append(rpc, option, 0).await
                {
                    *bg.deferred.lock().unwrap_or_else(|p| p.into_inner()) = Some(higher);
                }
            });
            return Ok(AppendEntriesResponse::Success);
        }
        if n == 0 {
            return self.send_append(rpc, option, n).await;
        }
        if let Some(covered) = self.pipeline.covering(&rpc) {
            if let Some(reply) = self.pipeline.answer(&rpc, covered).await {
                if !matches!(reply, AppendEntriesResponse::HigherVote(_)) {
                    *self.answered.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
                }
                return Ok(reply);
            }
        }
        let (vote, committed, deadline) = (rpc.vote, rpc.leader_commit, option.hard_ttl());
        let last = rpc.entries.last().map(|e| e.log_id);
        let reply = self.send_append(rpc, option, n).await;
        let matching = match &reply {
            Ok(AppendEntriesResponse::Success) => last,
            Ok(AppendEntriesResponse::PartialSuccess(m)) => *m,
            _ => None,
        };
        // Every follower gets appended entries at once, so that the leader's
        // fsync and the followers' run side by side: a far one as many as
        // come, a near one one request at a time.
        if let Some(matching) = matching {
            self.pipeline.set_near(distance < FAR);
            self.follow_appends();
            if let Some(early) = self.pipeline.succeeded(vote, committed, matching, deadline) {
                let (link, weak) = (self.link.clone(), Arc::downgrade(&self.pipeline));
                tokio::spawn(async move { link.send_early(early, weak).await });
            }
        }
        reply
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Node, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.link.call(Rpc::InstallSnapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        self.link.call(Rpc::Vote, &rpc, &option).await
    }

    /// A peer that cannot be reached is tried again after 50 ms, then less and
    /// less often, up to once a second.
    fn backoff(&self) -> Backoff {
        Backoff::new((0..).map(|i| Duration::from_millis(50 << u32::min(i, 4)).min(MAX_BACKOFF)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reminder_is_due_once_per_key_and_the_map_stays_bounded() {
        let r = Reminders::default();
        assert!(r.due(0));
        assert!(!r.due(0));
        assert!(r.due(1));
        for i in 2..2 * REMEMBERED {
            assert!(r.due(i));
        }
        assert!(r.0.lock().expect("lock").len() <= REMEMBERED);
    }

    #[test]
    fn quorum_distance_counts_only_the_voters() {
        let peers = Peers::new(Duration::from_secs(1), None);
        let ms = Duration::from_millis;
        peers.sample_rtt(2, ms(1));
        peers.sample_rtt(3, ms(50));
        // Removed: still measured, no longer part of any quorum.
        peers.sample_rtt(9, ms(2));
        // Three voters: this node and the nearer follower make the majority.
        assert_eq!(peers.quorum_distance(&[1, 2, 3]), ms(1));
        // Two voters: the majority needs node 3, however near node 9 is.
        assert_eq!(peers.quorum_distance(&[1, 3]), ms(50));
        assert_eq!(peers.quorum_distance(&[1]), Duration::ZERO);
    }
}
