//! The `roster` command line: server, local dev cluster and client subcommands.

mod commands;
mod dev_tls;
mod server;
mod snapshot;
mod xds_bootstrap;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "roster", version, about = "Raft-replicated service registry")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
pub struct Endpoints {
    /// Registry nodes, comma separated host:port; any node will do.
    #[arg(
        long,
        // The name the xDS issue gave `roster xds-bootstrap`'s list.
        alias = "service-endpoints",
        env = "ROSTER_ENDPOINTS",
        value_delimiter = ',',
        default_value = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003",
        global = true
    )]
    endpoints: Vec<String>,
    /// CA certificate (PEM) of nodes that serve TLS; dial them with TLS.
    #[arg(long, env = "ROSTER_CACERT", global = true)]
    cacert: Option<PathBuf>,
    /// Client certificate (PEM), for nodes that ask for one; needs --key.
    #[arg(long, env = "ROSTER_CERT", global = true, requires = "key")]
    cert: Option<PathBuf>,
    /// Client certificate's private key (PEM).
    #[arg(long, env = "ROSTER_KEY", global = true, requires = "cert")]
    key: Option<PathBuf>,
    /// Token secret, for clusters with [auth] enabled.
    #[arg(long, env = "ROSTER_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// The namespace services are registered, read and watched in; empty:
    /// `default`.
    #[arg(long, env = "ROSTER_NAMESPACE", global = true, default_value = "")]
    namespace: String,
}

#[derive(Subcommand)]
enum Command {
    /// Run a registry node.
    Server(ServerArgs),
    /// Run a local 3-node cluster on loopback, data in a temporary directory, until Ctrl-C.
    Dev(DevArgs),
    /// Register (or replace) an instance.
    Register(RegisterArgs),
    /// Remove an instance.
    Deregister(InstanceArgs),
    /// Renew an instance's TTL.
    Heartbeat(InstanceArgs),
    /// Show the instances of a service.
    Get(GetArgs),
    /// List services with instance counts.
    List(ListArgs),
    /// Set a service's protection threshold (percent of passing instances).
    Protect(ProtectArgs),
    /// Take an instance (or every instance of a service) out of rotation, or
    /// put it back: it stays registered and its checks keep running.
    #[command(subcommand)]
    Maintenance(MaintenanceCommand),
    /// Stream changes of one service (or all) as they happen.
    Watch(WatchArgs),
    /// Show each node's role, term, indexes and the membership.
    Status(StatusArgs),
    /// Grow or shrink the cluster online.
    #[command(subcommand)]
    Member(MemberCommand),
    /// Access control: the first admin token.
    #[command(subcommand)]
    Acl(AclCommand),
    /// Create, list and revoke tokens (admin).
    #[command(subcommand)]
    Token(TokenCommand),
    /// List sessions and close one (its instances turn critical or go).
    #[command(subcommand)]
    Session(SessionCommand),
    /// Create, list and delete namespaces, and set their quotas.
    #[command(subcommand)]
    Namespace(NamespaceCommand),
    /// Back up a cluster, inspect a backup, restore one into a new cluster.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Print a gRPC xDS bootstrap file: clients that read it (GRPC_XDS_BOOTSTRAP)
    /// resolve `xds:///<service>` through the nodes at --endpoints.
    XdsBootstrap(XdsBootstrapArgs),
    /// Lost quorum: make a stopped survivor the only voter of its cluster,
    /// keeping everything in its log; then add the others back.
    Recover(RecoverArgs),
}

#[derive(Args)]
pub struct RecoverArgs {
    /// The stopped node's data directory.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// The node's id.
    #[arg(long)]
    pub id: u64,
    /// The node's cluster id, as it was started with.
    #[arg(long, default_value = "roster")]
    pub cluster_id: String,
    /// The address peers reach the node's peer port at (its --peer-advertise).
    #[arg(long)]
    pub peer_address: String,
}

#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// Save the whole state (instances, settings, tokens), as of now, from the
    /// leader to FILE (written atomically; admin token with auth).
    Save {
        #[command(flatten)]
        endpoints: Endpoints,
        file: PathBuf,
    },
    /// Verify a backup's checksum and print its revision, counts and SHA-256.
    Inspect { file: PathBuf },
    /// Seed the empty data directory of one node of a new cluster from a
    /// backup: run it for each node, with the same --initial-cluster.
    Restore {
        file: PathBuf,
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        id: u64,
        /// The new cluster's voters at their peer addresses: 1=host:port,2=host:port,3=host:port.
        #[arg(long)]
        initial_cluster: String,
        /// The new cluster's id; default `restored-` and the first 8 hex
        /// digits of the file's SHA-256, alike for every node restored from it.
        #[arg(long)]
        cluster_id: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum AclCommand {
    /// Create the cluster's first admin token; works once per cluster.
    Bootstrap {
        #[command(flatten)]
        endpoints: Endpoints,
        #[arg(long, default_value = "")]
        description: String,
        /// A file holding the token's secret (32-256 characters, e.g. from
        /// `openssl rand -hex 32`); running the command again with the same
        /// file answers the same token. Without it the leader draws one.
        #[arg(long)]
        secret_file: Option<std::path::PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum SessionCommand {
    /// Open sessions: id, TTL, what happens at their end, instances held, holder.
    List {
        #[command(flatten)]
        endpoints: Endpoints,
        /// Answer from the node asked, without confirming with the leader.
        #[arg(long)]
        stale: bool,
    },
    /// End a session now (its creator's token or an admin token).
    Close {
        #[command(flatten)]
        endpoints: Endpoints,
        #[arg(long)]
        id: String,
    },
}

#[derive(Subcommand)]
pub enum NamespaceCommand {
    /// Create a namespace, or set an existing one's quotas (admin); a quota
    /// of 0 (or left out) is no limit.
    Create {
        #[command(flatten)]
        endpoints: Endpoints,
        name: String,
        #[arg(long, default_value_t = 0)]
        max_instances: u64,
        #[arg(long, default_value_t = 0)]
        max_services: u64,
        #[arg(long, default_value_t = 0)]
        max_sessions: u64,
        /// Watch streams on each node.
        #[arg(long, default_value_t = 0)]
        max_watch_streams: u64,
    },
    /// The namespaces your token reaches, with their quotas and what they hold.
    List {
        #[command(flatten)]
        endpoints: Endpoints,
        #[arg(long)]
        stale: bool,
    },
    /// Delete a namespace (admin); refused while it holds instances, unless --force.
    Delete {
        #[command(flatten)]
        endpoints: Endpoints,
        name: String,
        /// Deregister its instances and drop its services' settings too.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Create a token; prints its accessor and, once, its secret.
    Create {
        #[command(flatten)]
        endpoints: Endpoints,
        /// read (queries, watches, status), write (also registrations) or admin (everything).
        #[arg(long)]
        role: String,
        /// A service name or `prefix*` the token is limited to (repeatable; none: every service).
        #[arg(long = "service")]
        services: Vec<String>,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List tokens (accessors, never secrets).
    List {
        #[command(flatten)]
        endpoints: Endpoints,
    },
    /// Revoke a token by its accessor; refused on every node once applied.
    Revoke {
        #[command(flatten)]
        endpoints: Endpoints,
        #[arg(long)]
        accessor: String,
    },
}

#[derive(Args)]
pub struct ServerArgs {
    /// TOML file with the node's settings; the flags below override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    #[arg(long, conflicts_with = "id_from_hostname")]
    id: Option<u64>,
    /// Derive the node id from a StatefulSet-style host name: `name-N` is node N+1.
    /// A node whose id the initial cluster does not list starts without it
    /// (a pod scaled up later, to be added with `roster member add`).
    #[arg(long)]
    id_from_hostname: bool,
    /// Added to the id --id-from-hostname derives: a second StatefulSet
    /// (read replicas, say) takes ids of its own, `name-N` being node
    /// N+1+offset.
    #[arg(long, default_value_t = 0, requires = "id_from_hostname")]
    id_offset: u64,
    #[arg(long)]
    cluster_id: Option<String>,
    /// Client port to bind, e.g. 0.0.0.0:7001.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Address clients reach this node at (defaults to --listen).
    #[arg(long)]
    advertise: Option<String>,
    /// Peer port to bind (Raft and forwarded requests), e.g. 0.0.0.0:7002.
    #[arg(long)]
    peer_listen: Option<SocketAddr>,
    /// Address peers reach the peer port at (defaults to --peer-listen).
    #[arg(long)]
    peer_advertise: Option<String>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Voters of a new cluster at their peer addresses: 1=host:port,2=host:port,3=host:port.
    /// Used once, on an empty data dir.
    #[arg(long)]
    initial_cluster: Option<String>,
    /// Serve Prometheus metrics on this address (GET /metrics).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Answer DNS queries (UDP and TCP) on this address: <service>.service.roster.
    #[arg(long)]
    dns_listen: Option<SocketAddr>,
    /// Serve the HTTP/JSON API on this address (GET /v1/services, ...).
    #[arg(long)]
    http_listen: Option<SocketAddr>,
    /// This node's certificate (PEM) for TLS on both ports; with --tls-key and --tls-ca.
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The cluster CA (PEM): peers must present a certificate it issued.
    #[arg(long, requires = "tls_cert")]
    tls_ca: Option<PathBuf>,
    /// Clients must present a certificate this CA (PEM) issued.
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Require a token on every call (`[auth] enabled`); make the first with `roster acl bootstrap`.
    #[arg(long)]
    auth: bool,
}

#[derive(Args)]
pub struct DevArgs {
    /// Client port of node 1; nodes 2 and 3 take the next ones. Peer, DNS and
    /// HTTP ports are 100, 200 and 300 above.
    #[arg(long, default_value_t = 7001)]
    base_port: u16,
    #[arg(long, default_value_t = 3)]
    nodes: u16,
    /// Serve TLS on both ports with a throwaway CA and certificates made in
    /// the temporary directory; prints how to connect.
    #[arg(long)]
    tls: bool,
    /// Require tokens ([auth]); bootstraps the ACL and prints the admin token.
    #[arg(long)]
    auth: bool,
}

#[derive(Args)]
pub struct InstanceArgs {
    #[command(flatten)]
    endpoints: Endpoints,
    #[arg(long)]
    service: String,
    #[arg(long)]
    id: String,
}

#[derive(Args)]
pub struct RegisterArgs {
    #[command(flatten)]
    instance: InstanceArgs,
    #[arg(long)]
    address: String,
    #[arg(long)]
    port: u32,
    /// Repeatable.
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// key=value, repeatable.
    #[arg(long = "meta")]
    metadata: Vec<String>,
    #[arg(long, default_value_t = 0)]
    weight: u32,
    /// Hold the instance under this open session (see `roster session list`).
    #[arg(long, default_value = "")]
    session: String,
    #[command(flatten)]
    check: CheckArgs,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum CheckKindArg {
    Ttl,
    Tcp,
    Http,
    Grpc,
}

/// Health check flags; 0 means the default (see docs/api.md, "Health checks").
#[derive(Args)]
pub struct CheckArgs {
    /// Health check kind; without it the instance stays passing until deregistered.
    #[arg(long)]
    check: Option<CheckKindArg>,
    /// TTL for --check ttl: heartbeat at least this often.
    #[arg(long, default_value_t = 0)]
    ttl_ms: u32,
    #[arg(long, default_value_t = 0)]
    interval_ms: u32,
    #[arg(long, default_value_t = 0)]
    timeout_ms: u32,
    /// Port to probe, if not the instance's.
    #[arg(long, default_value_t = 0)]
    check_port: u32,
    /// Path for --check http.
    #[arg(long, default_value = "/")]
    http_path: String,
    /// Service name for --check grpc (empty: the whole server).
    #[arg(long, default_value = "")]
    grpc_service: String,
    #[arg(long, default_value_t = 0)]
    failures_before_critical: u32,
    #[arg(long, default_value_t = 0)]
    successes_before_passing: u32,
    /// Remove the instance after it has been critical this long (0: never).
    #[arg(long, default_value_t = 0)]
    deregister_after_ms: u64,
}

#[derive(Args)]
pub struct GetArgs {
    #[command(flatten)]
    endpoints: Endpoints,
    service: String,
    /// Only passing instances.
    #[arg(long)]
    healthy: bool,
    /// Only instances with this tag; repeatable.
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// Read the local state of the node asked instead of going through the leader.
    #[arg(long)]
    stale: bool,
}

#[derive(Subcommand)]
pub enum MaintenanceCommand {
    /// Into maintenance: out of every healthy view until disabled.
    Enable {
        #[command(flatten)]
        target: MaintenanceTarget,
        /// Why, shown with the instance.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Back into rotation (as its check says).
    Disable {
        #[command(flatten)]
        target: MaintenanceTarget,
    },
}

#[derive(Args)]
pub struct MaintenanceTarget {
    #[command(flatten)]
    endpoints: Endpoints,
    service: String,
    /// The instance; left out: every instance the service holds now.
    id: Option<String>,
}

#[derive(Args)]
pub struct ProtectArgs {
    #[command(flatten)]
    endpoints: Endpoints,
    service: String,
    /// Below this share of passing instances, healthy-only queries return all of them; 0 turns it off.
    #[arg(long)]
    threshold_percent: u32,
}

#[derive(Args)]
pub struct ListArgs {
    #[command(flatten)]
    endpoints: Endpoints,
    #[arg(long)]
    stale: bool,
}

#[derive(Args)]
pub struct WatchArgs {
    #[command(flatten)]
    endpoints: Endpoints,
    /// Service to watch; all services when omitted.
    service: Option<String>,
    /// Resume after this revision instead of starting from the full state.
    #[arg(long, default_value_t = 0)]
    since: u64,
}

#[derive(Subcommand)]
pub enum MemberCommand {
    /// Add a running node (started without --initial-cluster) as a voter,
    /// or with --replica as a read replica.
    Add {
        #[command(flatten)]
        endpoints: Endpoints,
        #[arg(long)]
        id: u64,
        /// The node's advertised host:port.
        #[arg(long)]
        address: String,
        /// Add it as a read replica: it serves stale reads and watches from
        /// its own copy and never votes.
        #[arg(long)]
        replica: bool,
    },
    /// Remove a voter or a read replica.
    Remove {
        #[command(flatten)]
        endpoints: Endpoints,
        #[arg(long)]
        id: u64,
    },
}

#[derive(Args)]
pub struct XdsBootstrapArgs {
    #[command(flatten)]
    endpoints: Endpoints,
    /// The client's node id: the nodes' logs name it (a rejected update, say).
    #[arg(long, default_value = "roster-xds-client")]
    node_id: String,
    /// The gRPC target of the xDS server, instead of one made from
    /// --endpoints (for example dns:///roster.internal:7001).
    #[arg(long, conflicts_with = "from_membership")]
    server_uri: Option<String>,
    /// Ask --endpoints for the cluster's membership and list its members'
    /// client addresses instead: read replicas first (a client starts on
    /// the first that answers, so replicas take the xDS streams), then voters.
    #[arg(long)]
    from_membership: bool,
    /// Write the file here instead of to standard output.
    #[arg(long, short)]
    output: Option<PathBuf>,
}

#[derive(Args)]
pub struct StatusArgs {
    #[command(flatten)]
    endpoints: Endpoints,
}

/// The `roster` binary: parses the command line and runs it.
#[tokio::main]
pub async fn main() -> std::process::ExitCode {
    let args = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                // Openraft logs every failed RPC to a down peer; Roster reports
                // peers going down and coming back itself (raft::network), and
                // a stopped Raft core on exit; a membership change refused
                // because leadership just moved is returned to its caller.
                tracing_subscriber::EnvFilter::new(
                    "info,openraft=error,openraft::core::raft_core=off,openraft::replication=off,openraft::raft::impl_raft_blocking_write=off,sled=warn",
                )
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Server(a) => server::server(a).await,
        Command::Dev(a) => server::dev(a).await,
        Command::Register(a) => commands::register(a).await,
        Command::Deregister(a) => commands::deregister(a).await,
        Command::Heartbeat(a) => commands::heartbeat(a).await,
        Command::Get(a) => commands::get(a).await,
        Command::List(a) => commands::list(a).await,
        Command::Protect(a) => commands::protect(a).await,
        Command::Maintenance(c) => commands::maintenance(c).await,
        Command::Watch(a) => commands::watch(a).await,
        Command::Status(a) => commands::status(a).await,
        Command::Member(m) => commands::member(m).await,
        Command::Acl(a) => commands::acl(a).await,
        Command::Token(t) => commands::token(t).await,
        Command::Session(c) => commands::session(c).await,
        Command::Namespace(c) => commands::namespace(c).await,
        Command::Snapshot(s) => snapshot::snapshot(s).await,
        Command::Recover(r) => snapshot::recover(r).await,
        Command::XdsBootstrap(a) => xds_bootstrap::print(a).await,
    }
}
