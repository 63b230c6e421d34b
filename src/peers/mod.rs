//! The node's connections to its peers: one channel per peer address, shared
//! by every Raft RPC and every client request forwarded to another node (never
//! a connection per request), the TLS they are made with, and what they
//! measure (round trips, last contact). Below `raft/`, which frames its RPCs
//! over [`Peers::call`], and `api/`, which forwards over [`Peers::channel`].

mod wire;

pub use wire::{Method, Wire};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tonic::transport::{Channel, ClientTlsConfig};
use tonic::Code;

use crate::grpc::{endpoint, MAX_MESSAGE_BYTES};
use crate::proto::raft_v1::raft_transport_client::RaftTransportClient;
use crate::proto::raft_v1::RaftPayload;

/// A node's id in the cluster (Raft's).
pub type NodeId = u64;

/// A peer this far (least round trip) is far: waiting a round trip costs more
/// than the larger batches the wait allows.
pub const FAR: Duration = Duration::from_millis(2);
/// How long the least round trip seen stands for the distance to a peer.
const FLOOR_WINDOW: Duration = Duration::from_secs(2);

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
    /// Early AppendEntries to each peer (see `raft::replication::pipeline`): answered with
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

    /// Peers whose Raft RPCs go over `wire` (see [`wire`]).
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
    pub async fn call(
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
    pub(crate) fn sample_rtt(&self, target: NodeId, sample: Duration) {
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
    pub(crate) fn rtt(&self, target: NodeId) -> (Duration, Duration) {
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

    pub(crate) fn count_early(&self, target: NodeId, accepted: bool) {
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

    pub(crate) fn logged(&self, target: NodeId, addr: &str, reply: &Result<(), &tonic::Status>) {
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

pub(crate) const REMIND: Duration = Duration::from_secs(30);

/// Keys remembered at most; past that all are forgotten, so a flood of
/// distinct callers cannot grow the map without bound.
const REMEMBERED: usize = 1024;

/// When to log something that repeats (a refused peer keeps retrying): the
/// first time for a key, then every `REMIND` while it goes on.
pub(crate) struct Reminders<K>(Mutex<HashMap<K, Instant>>);

impl<K> Default for Reminders<K> {
    fn default() -> Self {
        Reminders(Mutex::default())
    }
}

impl<K: std::hash::Hash + Eq> Reminders<K> {
    /// Whether `key` is to be logged now.
    pub(crate) fn due(&self, key: K) -> bool {
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
