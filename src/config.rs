//! Node configuration: from a TOML file, command-line flags, or both (flags win).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::grpc::MAX_MESSAGE_BYTES;
use crate::raft::liveness::election::Timing;
use crate::raft::NodeId;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The network between the nodes, which sets the Raft timing defaults.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum NetworkProfile {
    /// Nodes in one data centre or region: round trips up to 100 ms, with
    /// room for a retransmission (an RPC may take 500 ms).
    #[default]
    Lan,
    /// Nodes in different regions: round trips up to 500 ms, at the cost of
    /// slower failure detection (elections after 2-3 s instead of 0.6-0.9 s).
    Wan,
}

/// Raft timing and log retention. Unset timings come from `network`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftTuning {
    pub network: NetworkProfile,
    /// How often a leader sends heartbeats.
    pub heartbeat_ms: Option<u64>,
    /// Deadline of one node-to-node request (append, vote, read confirmation):
    /// it must cover a round trip plus the transfer of a batch of entries.
    pub rpc_timeout_ms: Option<u64>,
    /// A follower that has heard from no leader for a random time in this
    /// range asks its peers whether they would elect it (pre-vote).
    pub election_timeout_min_ms: Option<u64>,
    pub election_timeout_max_ms: Option<u64>,
    /// Build a snapshot after this many applied entries since the last one.
    pub snapshot_after_entries: Option<u64>,
    /// Entries kept in the log behind a snapshot, so slightly lagging followers need no snapshot.
    pub keep_entries_after_snapshot: Option<u64>,
}

impl NetworkProfile {
    fn timing(self) -> Timing {
        let ms = Duration::from_millis;
        match self {
            NetworkProfile::Lan => Timing {
                heartbeat: ms(50),
                rpc_timeout: ms(500),
                election_min: ms(600),
                election_max: ms(900),
            },
            NetworkProfile::Wan => Timing {
                heartbeat: ms(150),
                rpc_timeout: ms(1_500),
                election_min: ms(2_000),
                election_max: ms(3_000),
            },
        }
    }
}

impl RaftTuning {
    pub fn timing(&self) -> Timing {
        let d = self.network.timing();
        let or = |v: Option<u64>, d: Duration| v.map(Duration::from_millis).unwrap_or(d);
        Timing {
            heartbeat: or(self.heartbeat_ms, d.heartbeat),
            rpc_timeout: or(self.rpc_timeout_ms, d.rpc_timeout),
            election_min: or(self.election_timeout_min_ms, d.election_min),
            election_max: or(self.election_timeout_max_ms, d.election_max),
        }
    }

    pub fn snapshot_after_entries(&self) -> u64 {
        self.snapshot_after_entries.unwrap_or(10_000)
    }

    pub fn keep_entries_after_snapshot(&self) -> u64 {
        self.keep_entries_after_snapshot.unwrap_or(1_000)
    }
}

/// Limits on the gRPC port's connections (`[connections]` in the config file).
/// A socket that never speaks HTTP/2, or carries no request for long, must not
/// hold one of the process's file descriptors forever.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectionLimits {
    /// A connection must send the HTTP/2 preface within this time, or it is closed.
    pub handshake_timeout_ms: u64,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout_ms: u64,
    /// Interval of HTTP/2 pings to every connection; one unanswered within
    /// `keepalive_timeout_ms` closes the connection (a dead peer or client).
    pub keepalive_interval_ms: u64,
    pub keepalive_timeout_ms: u64,
    /// Open connections at most; by default the file-descriptor limit less a
    /// reserve for sled, Raft and forwarding channels and health probes. At the
    /// limit a new connection replaces the one idle the longest.
    pub max_connections: Option<usize>,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            handshake_timeout_ms: 5_000,
            idle_timeout_ms: 300_000,
            keepalive_interval_ms: 20_000,
            keepalive_timeout_ms: 10_000,
            max_connections: None,
        }
    }
}

/// What one client may take of a node (`[limits]` in the config file). Each
/// limit reached is answered `RESOURCE_EXHAUSTED` naming it; docs/api.md ("Limits and errors") says
/// why each default is what it is.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request message on the client port (the Raft transport keeps
    /// `grpc::MAX_MESSAGE_BYTES`).
    pub max_request_bytes: usize,
    pub max_instances_per_service: usize,
    pub max_instances: usize,
    /// Open watch streams on this node, and on one client connection to it.
    pub max_watch_streams: usize,
    pub max_watch_streams_per_connection: usize,
    /// Services one WatchServices stream follows.
    pub max_watched_services_per_stream: usize,
    /// Instances with a health check (probe or TTL), cluster-wide: the leader runs them all.
    pub max_health_checks: usize,
    /// Namespaces in the cluster, `default` included: each adds series to
    /// the metrics, so they stay bounded.
    pub max_namespaces: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_bytes: 64 * 1024,
            max_instances_per_service: 100_000,
            max_instances: 1_000_000,
            max_watch_streams: 10_000,
            max_watch_streams_per_connection: 1_000,
            max_watched_services_per_stream: 10_000,
            max_health_checks: 50_000,
            max_namespaces: 1_000,
        }
    }
}

/// `[autopilot]`: the leader looks after the membership (Consul's
/// autopilot); off by default.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Autopilot {
    pub enabled: bool,
    /// A voter that has not answered the leader for this long is removed,
    /// if at least `min_quorum` voters remain.
    pub dead_server_after_ms: u64,
    pub min_quorum: usize,
    /// A node added with `member add` becomes a voter only once it has stayed
    /// caught up with the leader for this long.
    pub server_stabilization_time_ms: u64,
}

impl Autopilot {
    /// The policy the leader follows, when enabled.
    pub fn policy(&self) -> Option<crate::raft::liveness::autopilot::Policy> {
        self.enabled
            .then(|| crate::raft::liveness::autopilot::Policy {
                dead_after: Duration::from_millis(self.dead_server_after_ms),
                min_quorum: self.min_quorum,
                stabilization: Duration::from_millis(self.server_stabilization_time_ms),
            })
    }
}

impl Default for Autopilot {
    fn default() -> Self {
        Autopilot {
            enabled: false,
            dead_server_after_ms: 30_000,
            min_quorum: 3,
            server_stabilization_time_ms: 10_000,
        }
    }
}

/// `[dns]`: the catalogue served as DNS names (see `dns`); off unless `listen` is set.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Dns {
    /// UDP and TCP address of the DNS server.
    pub listen: Option<SocketAddr>,
    /// The zone answered: `<service>.service.<domain>` and so on.
    pub domain: String,
    /// TTL of every answer, in seconds.
    pub ttl_s: u32,
    /// With `[auth] enabled`: the secret of the token whose scope DNS answers
    /// for (a read token). DNS carries no credentials of its own.
    pub token: Option<String>,
}

impl Default for Dns {
    fn default() -> Self {
        Dns {
            listen: None,
            domain: "roster.".to_string(),
            ttl_s: 2,
            token: None,
        }
    }
}

/// `[http]`: the HTTP/JSON API (see `http`); off unless `listen` is set.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpApi {
    pub listen: Option<SocketAddr>,
}

/// `[xds]`: the Aggregated Discovery Service on the client port (see `xds`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Xds {
    /// Serve it (on by default: it costs nothing until a client connects).
    pub enabled: bool,
    /// With `[auth] enabled`: the secret of the token whose scope an xDS call
    /// without an `authorization` header gets. gRPC's xDS clients send none.
    pub token: Option<String>,
}

impl Default for Xds {
    fn default() -> Self {
        Xds {
            enabled: true,
            token: None,
        }
    }
}

/// `[auth]`: tokens with roles and service scopes (see `api::auth`).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Auth {
    /// Every call but gRPC health then needs a token; create the first with
    /// `roster acl bootstrap`. Every node of a cluster should agree.
    #[serde(default)]
    pub enabled: bool,
}

/// `[tls]`: PEM files for both ports, read again when they change (or on SIGHUP).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// This node's certificate chain, served on both ports and presented to
    /// peers as its client certificate; it must name the advertised hosts.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The cluster CA: the peer port accepts only certificates it issued,
    /// and peers' certificates are checked against it.
    pub ca: PathBuf,
    /// When set, the client port accepts only clients with a certificate
    /// from this CA.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub id: NodeId,
    /// Every node of one cluster carries the same id; peers of another cluster are refused.
    #[serde(default = "default_cluster_id")]
    pub cluster_id: String,
    /// Address the client port binds: the public gRPC services.
    pub listen: SocketAddr,
    /// Address clients use to reach this node; defaults to `listen`.
    #[serde(default)]
    pub advertise: Option<String>,
    /// Address the peer port binds: Raft between the nodes, and requests a
    /// follower forwards to the leader. Not served on the client port.
    pub peer_listen: SocketAddr,
    /// Address peers use to reach this node's peer port; defaults to `peer_listen`.
    #[serde(default)]
    pub peer_advertise: Option<String>,
    pub data_dir: PathBuf,
    /// `1=host:port,2=host:port,...`: the voters a new cluster starts with, at
    /// their peer addresses. Used once, when the data directory is empty.
    #[serde(default)]
    pub initial_cluster: String,
    /// Deadline for a write or linearizable read to be confirmed by a quorum.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Instance changes (watch events) kept in memory for watchers resuming
    /// with `since_revision`; whole entries are dropped, oldest first.
    #[serde(default = "default_watch_history")]
    pub watch_history: usize,
    /// sled page cache, in MiB.
    #[serde(default = "default_cache_mb")]
    pub cache_mb: u64,
    /// Where to serve Prometheus metrics (`GET /metrics`); off when unset.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// Health probes the leader runs at once, across all instances.
    #[serde(default = "default_max_concurrent_probes")]
    pub max_concurrent_probes: usize,
    #[serde(default)]
    pub raft: RaftTuning,
    #[serde(default)]
    pub connections: ConnectionLimits,
    #[serde(default)]
    pub limits: Limits,
    /// TLS on both ports when set; plaintext otherwise.
    #[serde(default)]
    pub tls: Option<TlsFiles>,
    #[serde(default)]
    pub auth: Auth,
    #[serde(default)]
    pub autopilot: Autopilot,
    #[serde(default)]
    pub dns: Dns,
    #[serde(default)]
    pub http: HttpApi,
    #[serde(default)]
    pub xds: Xds,
}

fn default_cluster_id() -> String {
    "roster".to_string()
}
fn default_request_timeout_ms() -> u64 {
    5_000
}
fn default_watch_history() -> usize {
    10_000
}
fn default_cache_mb() -> u64 {
    64
}
fn default_max_concurrent_probes() -> usize {
    512
}

impl NodeConfig {
    pub fn new(id: NodeId, listen: SocketAddr, peer_listen: SocketAddr, data_dir: PathBuf) -> Self {
        NodeConfig {
            id,
            cluster_id: default_cluster_id(),
            listen,
            advertise: None,
            peer_listen,
            peer_advertise: None,
            data_dir,
            initial_cluster: String::new(),
            request_timeout_ms: default_request_timeout_ms(),
            watch_history: default_watch_history(),
            cache_mb: default_cache_mb(),
            max_concurrent_probes: default_max_concurrent_probes(),
            metrics_listen: None,
            raft: RaftTuning::default(),
            connections: ConnectionLimits::default(),
            limits: Limits::default(),
            tls: None,
            auth: Auth::default(),
            autopilot: Autopilot::default(),
            dns: Dns::default(),
            http: HttpApi::default(),
            xds: Xds::default(),
        }
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    pub fn advertise_addr(&self) -> String {
        self.advertise
            .clone()
            .unwrap_or_else(|| self.listen.to_string())
    }

    pub fn peer_advertise_addr(&self) -> String {
        self.peer_advertise
            .clone()
            .unwrap_or_else(|| self.peer_listen.to_string())
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// Checks everything that can be checked without touching disk or network.
    pub fn validate(&self) -> Result<BTreeMap<NodeId, String>, ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.id == 0 {
            return invalid("node id must be 1 or more".into());
        }
        if self.cluster_id.is_empty() || !self.cluster_id.bytes().all(|b| b.is_ascii_graphic()) {
            return invalid(format!(
                "cluster id {:?} must be non-empty printable ASCII",
                self.cluster_id
            ));
        }
        let t = self.raft.timing();
        if t.heartbeat.is_zero()
            || t.rpc_timeout <= t.heartbeat
            || t.election_min <= t.rpc_timeout
            || t.election_max <= t.election_min
        {
            return invalid(format!(
                "raft timing needs 0 < heartbeat_ms ({}) < rpc_timeout_ms ({}) < election_timeout_min_ms ({}) < election_timeout_max_ms ({})",
                t.heartbeat.as_millis(),
                t.rpc_timeout.as_millis(),
                t.election_min.as_millis(),
                t.election_max.as_millis()
            ));
        }
        let c = &self.connections;
        if c.handshake_timeout_ms == 0
            || c.idle_timeout_ms == 0
            || c.keepalive_interval_ms == 0
            || c.keepalive_timeout_ms == 0
            || c.max_connections == Some(0)
        {
            return invalid(format!("connection limits must all be positive: {c:?}"));
        }
        let l = &self.limits;
        if l.max_request_bytes == 0
            || l.max_instances_per_service == 0
            || l.max_instances == 0
            || l.max_watch_streams == 0
            || l.max_watch_streams_per_connection == 0
            || l.max_watched_services_per_stream == 0
            || l.max_health_checks == 0
            || l.max_namespaces == 0
            || l.max_namespaces > u32::MAX as usize
        {
            return invalid(format!("limits must all be positive: {l:?}"));
        }
        if l.max_request_bytes > MAX_MESSAGE_BYTES {
            return invalid(format!(
                "limits.max_request_bytes {} is over the transport's cap of {MAX_MESSAGE_BYTES}",
                l.max_request_bytes
            ));
        }
        let members = parse_initial_cluster(&self.initial_cluster)?;
        if !members.is_empty() && !members.contains_key(&self.id) {
            return invalid(format!(
                "initial cluster {:?} does not include this node's id {}",
                self.initial_cluster, self.id
            ));
        }
        if self.listen == self.peer_listen {
            return invalid(format!(
                "listen and peer_listen are both {}: the client and peer ports must differ",
                self.listen
            ));
        }
        // Peers dial what the initial cluster says: it must be what this node advertises.
        if let (Some(listed), Some(advertised)) = (members.get(&self.id), &self.peer_advertise) {
            if listed != advertised {
                return invalid(format!(
                    "the initial cluster lists node {} at {listed}, but its peer port is \
                     advertised as {advertised}; make them the same address",
                    self.id
                ));
            }
        }
        Ok(members)
    }

    /// Settings that the rest of the config leaves without effect: logged
    /// as warnings at start, since the node runs without them.
    pub fn warnings(&self) -> Vec<String> {
        let tokens = [
            ("[xds] token", self.xds.token.is_some()),
            ("[dns] token", self.dns.token.is_some()),
        ];
        tokens
            .into_iter()
            .filter(|(_, set)| *set && !self.auth.enabled)
            .map(|(name, _)| {
                format!(
                    "{name} is set but has no effect without [auth] enabled: \
                     no call or query needs a token then"
                )
            })
            .collect()
    }
}

/// Parses `1=host:port,2=host:port`.
pub fn parse_initial_cluster(s: &str) -> Result<BTreeMap<NodeId, String>, ConfigError> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part.split_once('=').ok_or_else(|| {
            ConfigError::Invalid(format!(
                "initial cluster entry {part:?} is not id=host:port"
            ))
        })?;
        let id: NodeId = id.trim().parse().map_err(|_| {
            ConfigError::Invalid(format!(
                "initial cluster entry {part:?}: {id:?} is not a node id"
            ))
        })?;
        let addr = addr.trim();
        let valid_addr = addr.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0)
        });
        if !valid_addr {
            return Err(ConfigError::Invalid(format!(
                "initial cluster entry {part:?}: {addr:?} is not host:port"
            )));
        }
        if out.insert(id, addr.to_string()).is_some() {
            return Err(ConfigError::Invalid(format!(
                "node id {id} appears twice in the initial cluster"
            )));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The commented example operators copy parses, every section included.
    #[test]
    fn the_example_config_parses() {
        let text = include_str!("../deploy/config/node-1.toml");
        let cfg: NodeConfig = toml::from_str(text).expect("deploy/config/node-1.toml");
        assert_eq!(cfg.autopilot, Autopilot::default());
        assert!(cfg.autopilot.policy().is_none());
    }

    #[test]
    fn the_documented_config_parses() {
        let page = include_str!("../docs/operations.md");
        let text = page
            .split("```toml\n")
            .find(|b| b.starts_with("id = 1"))
            .and_then(|b| b.split("```").next())
            .expect("the node config in docs/operations.md");
        let cfg: NodeConfig = toml::from_str(text).expect("the node config in docs/operations.md");
        assert_eq!(cfg.dns.domain, "roster.");
        assert!(cfg.dns.listen.is_some() && cfg.http.listen.is_some());
    }

    #[test]
    fn tokens_without_auth_are_warned_about() {
        let any = ([127, 0, 0, 1], 0).into();
        let mut cfg = NodeConfig::new(1, any, any, "/tmp/x".into());
        assert!(cfg.warnings().is_empty());
        cfg.xds.token = Some("s3cret".into());
        cfg.dns.token = Some("s3cret".into());
        let w = cfg.warnings();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].starts_with("[xds] token") && w[0].contains("without [auth]"),
            "{w:?}"
        );
        assert!(
            w[1].starts_with("[dns] token") && w[1].contains("without [auth]"),
            "{w:?}"
        );
        cfg.auth.enabled = true;
        assert!(cfg.warnings().is_empty(), "with [auth] the tokens serve");
    }

    #[test]
    fn initial_cluster() {
        let m = parse_initial_cluster("1=127.0.0.1:7001, 2=node-2:7002").unwrap_or_default();
        assert_eq!(m.len(), 2);
        assert_eq!(m[&2], "node-2:7002");
        assert!(parse_initial_cluster("1=a:1,1=b:2").is_err());
        assert!(parse_initial_cluster("x=a:1").is_err());
        assert!(parse_initial_cluster("1=a").is_err());
        assert!(parse_initial_cluster("1=a:0").is_err());
    }

    #[test]
    fn the_initial_cluster_must_list_this_node_at_its_advertised_peer_address() {
        let cfg = |advertise: &str| -> NodeConfig {
            let text = format!(
                "id = 1\nlisten = \"0.0.0.0:7001\"\npeer_listen = \"0.0.0.0:7002\"\n{advertise}\
                 data_dir = \"/tmp/x\"\ninitial_cluster = \"1=node-1:7002,2=node-2:7002\"\n"
            );
            toml::from_str(&text).expect("valid config")
        };
        assert!(cfg("peer_advertise = \"node-1:7002\"\n").validate().is_ok());
        assert!(cfg("").validate().is_ok());
        // The client address is not what peers dial.
        assert!(cfg("advertise = \"node-1:7001\"\n").validate().is_ok());
        let e = cfg("peer_advertise = \"10.0.0.1:7002\"\n")
            .validate()
            .expect_err("another address");
        assert!(e.to_string().contains("lists node 1 at node-1:7002"), "{e}");
    }

    #[test]
    fn toml_rejects_unknown_fields() {
        let ok = "id = 1\nlisten = \"127.0.0.1:7001\"\npeer_listen = \"127.0.0.1:7002\"\n\
                  data_dir = \"/tmp/x\"\n[raft]\nheartbeat_ms = 40\n";
        let cfg: NodeConfig = toml::from_str(ok).expect("valid config");
        assert_eq!(cfg.raft.timing().heartbeat, Duration::from_millis(40));
        assert_eq!(cfg.raft.timing().election_min, Duration::from_millis(600));
        let wan = "id = 1\nlisten = \"127.0.0.1:7001\"\npeer_listen = \"127.0.0.1:7002\"\n\
                   data_dir = \"/tmp/x\"\n[raft]\nnetwork = \"wan\"\n";
        let cfg: NodeConfig = toml::from_str(wan).expect("valid config");
        assert_eq!(cfg.raft.timing().rpc_timeout, Duration::from_millis(1_500));
        assert!(
            toml::from_str::<NodeConfig>("id = 1\nlisten = \"x\"\ndata_dir = \"/tmp\"").is_err()
        );
        assert!(toml::from_str::<NodeConfig>(&format!("{ok}\nbogus = 1")).is_err());
        // The peer port is not optional: Raft is not served on the client port.
        let no_peer = "id = 1\nlisten = \"127.0.0.1:7001\"\ndata_dir = \"/tmp/x\"\n";
        let e = toml::from_str::<NodeConfig>(no_peer).expect_err("no peer_listen");
        assert!(e.to_string().contains("peer_listen"), "{e}");
    }

    #[test]
    fn validation() {
        let addr = |a: &str| a.parse().expect("addr");
        let mut cfg = NodeConfig::new(
            1,
            addr("127.0.0.1:7001"),
            addr("127.0.0.1:7002"),
            "/tmp/x".into(),
        );
        cfg.initial_cluster = "2=127.0.0.1:7012".into();
        assert!(cfg.validate().is_err());
        cfg.initial_cluster = "1=127.0.0.1:7002".into();
        assert!(cfg.validate().is_ok());
        cfg.peer_listen = cfg.listen;
        let e = cfg.validate().expect_err("one port for both");
        assert!(e.to_string().contains("must differ"), "{e}");
        cfg.peer_listen = addr("127.0.0.1:7002");
        cfg.raft.election_timeout_min_ms = Some(500);
        assert!(cfg.validate().is_err());
    }

    #[test]
    fn limits_are_optional_positive_and_named() {
        let base = "id = 1\nlisten = \"127.0.0.1:7001\"\npeer_listen = \"127.0.0.1:7002\"\n\
                    data_dir = \"/tmp/x\"\n";
        let cfg: NodeConfig = toml::from_str(base).expect("valid config");
        assert_eq!(cfg.limits, Limits::default());
        let cfg: NodeConfig =
            toml::from_str(&format!("{base}[limits]\nmax_instances = 7\n")).expect("valid config");
        assert_eq!(cfg.limits.max_instances, 7);
        assert_eq!(
            cfg.limits.max_health_checks,
            Limits::default().max_health_checks
        );
        assert!(cfg.validate().is_ok());
        assert!(
            toml::from_str::<NodeConfig>(&format!("{base}[limits]\nmax_watchers = 1\n")).is_err()
        );
        let zero: NodeConfig =
            toml::from_str(&format!("{base}[limits]\nmax_watch_streams = 0\n")).expect("parses");
        assert!(zero.validate().is_err());
        let huge: NodeConfig = toml::from_str(&format!(
            "{base}[limits]\nmax_request_bytes = {}\n",
            MAX_MESSAGE_BYTES + 1
        ))
        .expect("parses");
        assert!(huge.validate().is_err());
    }
}
