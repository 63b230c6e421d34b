//! A real cluster for tests: `roster server` processes on loopback ports, each
//! with its own sled data directory, killed with SIGKILL when a test says so.

#![allow(dead_code)] // each test binary uses its own part of the harness

pub mod certs;
pub mod faults;
pub mod netns;
pub mod ports;
pub mod proxy;
pub mod targets;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;

use ports::free_port;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use roster::client::RosterClient;
use roster::proto::v1::cluster_client::ClusterClient;
use roster::proto::v1::*;
use tempfile::TempDir;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

pub struct TestNode {
    pub id: u64,
    /// Address the node listens on: 127.0.0.1, or its namespace's address.
    pub host: String,
    /// Its client port.
    pub port: u16,
    /// Its peer port (Raft and forwarded requests).
    pub peer_port: u16,
    /// `host:port` peers dial: the peer port, or its proxy's (`Setup::proxies`).
    pub peer: String,
    /// Where the node serves Prometheus metrics.
    pub metrics_port: u16,
    /// Where the node answers DNS (UDP and TCP), with `Setup::dns`.
    pub dns_port: u16,
    /// Where the node serves the HTTP/JSON API, with `Setup::http`.
    pub http_port: u16,
    pub config: PathBuf,
    child: Option<Child>,
}

pub struct TestCluster {
    /// Dropped (unmounted) before `dir` is removed.
    pub disks: Vec<faults::Tmpfs>,
    pub dir: TempDir,
    pub nodes: Vec<TestNode>,
    /// Appended to every node's config.
    extra: String,
    /// Hard and soft `RLIMIT_NOFILE` each node process starts with.
    fd_limit: Option<u64>,
    /// Set when each node runs in a network namespace of its own (`Setup::netns`).
    pub net: Option<netns::NetLab>,
    /// One in front of each node, indexed like `nodes`, when `Setup::proxies`.
    pub proxies: Vec<proxy::Proxy>,
    proxied: bool,
    /// TLS of the harness's clients (`Setup::client_tls`).
    pub client_tls: Option<ClientTlsConfig>,
    auth: bool,
    auth_secret: Option<String>,
    dns: Option<String>,
    http: bool,
    /// The bootstrap (admin) token the harness's clients send (`Setup::auth`).
    token: OnceLock<String>,
}

/// How the nodes of a test cluster run, beyond their configuration.
#[derive(Clone, Default)]
pub struct Setup {
    /// What the harness's own clients dial the nodes with, when the config
    /// (`extra`) gives them a `[tls]` section.
    pub client_tls: Option<ClientTlsConfig>,
    /// The config (`extra`) enables `[auth]`: the harness bootstraps the
    /// ACL as the cluster starts and uses that admin token (`TestCluster::token`).
    pub auth: bool,
    /// The secret the harness bootstraps with (default: one of its own); a
    /// restored cluster's bootstrap secret gets its admin token back.
    pub auth_secret: Option<String>,
    /// Hard and soft `RLIMIT_NOFILE` of each node process.
    pub fd_limit: Option<u64>,
    /// Each node in a network namespace of its own, so the test can partition them.
    pub netns: bool,
    /// Each node's data directory on a tmpfs of this many MiB.
    pub tmpfs_mb: Option<u32>,
    /// Each node's peer port behind a `proxy::Proxy` that every peer dials (its
    /// advertised peer address), so the test can inject faults into node-to-node traffic;
    /// clients still dial the nodes directly. Needs a multi-threaded runtime:
    /// the proxies run on the test's. With `netns` the proxies listen on the
    /// lab's `root_ip` and see each peer by its namespace address, so faults
    /// can be set per link (`TestCluster::link`).
    pub proxies: bool,
    /// Seed every node's data directory from this backup first, with
    /// `roster snapshot restore` (cluster id `test`, as the configs say).
    pub restore_from: Option<PathBuf>,
    /// Copy this data directory (written by another version, say) into
    /// every node's before it starts.
    pub data_dir_from: Option<PathBuf>,
    /// Each node serves DNS on its `dns_port`, with these further lines of
    /// its `[dns]` section.
    pub dns: Option<String>,
    /// Each node serves the HTTP/JSON API on its `http_port`.
    pub http: bool,
    /// Node `id` listens on 127.0.0.(10 + id), every node's client port the
    /// same: one DNS name with an A record per node then reaches them all.
    pub loopback_hosts: bool,
}

/// What a node logs when its listen or metrics port was taken before it bound it.
const PORT_TAKEN: &str = "Address already in use";

impl TestCluster {
    /// Starts `n` nodes and waits until they agree on a leader.
    pub async fn start(n: u64) -> TestCluster {
        Self::start_with(n, "").await
    }

    /// `extra` is appended to every node's TOML config, `{id}` in it replaced
    /// by the node's id (each node's own certificate files, say).
    pub async fn start_with(n: u64, extra: &str) -> TestCluster {
        Self::start_setup(n, extra, Setup::default())
            .await
            .expect("a plain cluster needs nothing special")
    }

    /// Like `start_with`, each node process limited to `fd_limit` open files
    /// (hard limit, so the node cannot raise it).
    pub async fn start_limited(n: u64, extra: &str, fd_limit: Option<u64>) -> TestCluster {
        let setup = Setup {
            fd_limit,
            ..Setup::default()
        };
        Self::start_setup(n, extra, setup)
            .await
            .expect("a file limit needs nothing special")
    }

    /// Like `start_with`, with the nodes run as `setup` says. Fails where that
    /// cannot be had: network namespaces (see `netns`) and tmpfs mounts need
    /// root and iproute2.
    pub async fn start_setup(n: u64, extra: &str, setup: Setup) -> Result<TestCluster, String> {
        for _ in 0..3 {
            let c = Self::spawn_setup(n, extra, setup.clone())?;
            if c.started().await {
                return Ok(c);
            }
            eprintln!("a port was taken before a node could bind it; starting on new ports");
        }
        Err("three attempts to start a cluster each lost a port to another process".into())
    }

    /// Waits until the nodes agree on a leader (with `[auth]`, having made
    /// the first admin token); false if a node lost its port.
    async fn started(&self) -> bool {
        let log_says = |n: &TestNode| {
            std::fs::read_to_string(n.config.with_extension("log"))
                .is_ok_and(|l| l.contains(PORT_TAKEN))
        };
        if self.auth {
            // Our own secret: a retry after a lost answer gets the same token.
            let req = BootstrapRequest {
                description: "test harness".into(),
                secret: self
                    .auth_secret
                    .clone()
                    .unwrap_or_else(|| format!("harness-{:032x}", fastrand::u128(..))),
            };
            let bootstrapped = self
                .wait_for("the ACL bootstrap", Duration::from_secs(20), || async {
                    if self.nodes.iter().any(log_says) {
                        return Some(None);
                    }
                    let created = self.client().bootstrap(req.clone()).await.ok()?;
                    Some(Some(created.secret))
                })
                .await;
            let Some(secret) = bootstrapped else {
                return false;
            };
            let _ = self.token.set(secret);
        }
        self.wait_for(
            "a leader all running nodes agree on",
            Duration::from_secs(20),
            || async {
                if self.nodes.iter().any(log_says) {
                    return Some(false);
                }
                self.agreed_leader().await.map(|_| true)
            },
        )
        .await
    }

    fn spawn_setup(n: u64, extra: &str, setup: Setup) -> Result<TestCluster, String> {
        let net = match setup.netns {
            true => Some(netns::NetLab::create(n)?),
            false => None,
        };
        let dir = tempfile::tempdir().expect("temp dir");
        let mut disks = Vec::new();
        if let Some(mb) = setup.tmpfs_mb {
            for id in 1..=n {
                let data = dir.path().join(format!("node-{id}"));
                disks.push(faults::Tmpfs::mount(&data, mb).ok_or("mounting a tmpfs needs root")?);
            }
        }
        let shared_port = free_port();
        let addrs: Vec<(String, u16, u16)> = (1..=n)
            .map(|id| match &net {
                Some(lab) => {
                    let a = lab.addr(id);
                    let (h, p) = a.rsplit_once(':').expect("host:port");
                    let port: u16 = p.parse().expect("port");
                    // Every node has the namespace's address to itself.
                    (h.to_string(), port, port + 1)
                }
                None if setup.loopback_hosts => {
                    (format!("127.0.0.{}", 10 + id), shared_port, free_port())
                }
                None => ("127.0.0.1".to_string(), free_port(), free_port()),
            })
            .collect();
        let mut c = TestCluster {
            dir,
            nodes: Vec::new(),
            extra: extra.to_string(),
            fd_limit: setup.fd_limit,
            net,
            disks,
            proxies: Vec::new(),
            proxied: setup.proxies,
            client_tls: setup.client_tls,
            auth: setup.auth,
            auth_secret: setup.auth_secret,
            dns: setup.dns,
            http: setup.http,
            token: OnceLock::new(),
        };
        for (host, port, peer_port) in addrs {
            c.add_node(&host, port, peer_port);
        }
        let initial: Vec<String> = c
            .nodes
            .iter()
            .map(|n| format!("{}={}", n.id, n.peer))
            .collect();
        for id in 1..=n {
            c.write_config(id, &initial.join(","));
        }
        if let Some(from) = &setup.data_dir_from {
            for id in 1..=n {
                copy_dir(from, &c.data_dir(id));
            }
        }
        if let Some(backup) = &setup.restore_from {
            for id in 1..=n {
                let out = Command::new(env!("CARGO_BIN_EXE_roster"))
                    .args(["snapshot", "restore"])
                    .arg(backup)
                    .arg("--data-dir")
                    .arg(c.data_dir(id))
                    .args(["--id", &id.to_string(), "--cluster-id", "test"])
                    .args(["--initial-cluster", &initial.join(",")])
                    .output()
                    .expect("run roster snapshot restore");
                if !out.status.success() {
                    return Err(format!("restore of node {id} failed: {out:?}"));
                }
            }
        }
        for id in 1..=n {
            c.start_node(id);
        }
        Ok(c)
    }

    /// Adds the next node id, listening on `host:port` and `host:peer_port`,
    /// its peer port behind a proxy of its own when the cluster has proxies;
    /// returns that id.
    fn add_node(&mut self, host: &str, port: u16, peer_port: u16) -> u64 {
        let id = self.nodes.len() as u64 + 1;
        let mut peer = format!("{host}:{peer_port}");
        if self.proxied {
            let target = peer.parse().expect("a node's peer address");
            // Where the nodes can dial it: in a lab, the test's own address there.
            let at = match &self.net {
                Some(lab) => lab.root_ip(),
                None => "127.0.0.1".to_string(),
            };
            let listen = SocketAddr::new(at.parse().expect("an IP"), 0);
            let p = proxy::Proxy::spawn(listen, target).expect("start a proxy");
            peer = p.addr().to_string();
            self.proxies.push(p);
        }
        self.nodes.push(TestNode {
            id,
            host: host.to_string(),
            port,
            peer_port,
            peer,
            metrics_port: free_port(),
            dns_port: free_port(),
            http_port: free_port(),
            config: self.dir.path().join(format!("node-{id}.toml")),
            child: None,
        });
        id
    }

    fn write_config(&self, id: u64, initial_cluster: &str) {
        let n = self.node(id);
        let host = &n.host;
        let text = format!(
            "id = {id}\ncluster_id = \"test\"\nlisten = \"{host}:{}\"\nadvertise = \"{host}:{}\"\n\
             peer_listen = \"{host}:{}\"\npeer_advertise = \"{}\"\nmetrics_listen = \"127.0.0.1:{}\"\n\
             data_dir = \"{}\"\ninitial_cluster = \"{initial_cluster}\"\nrequest_timeout_ms = 3000\n{}\n",
            n.port,
            n.port,
            n.peer_port,
            n.peer,
            n.metrics_port,
            self.data_dir(id).display(),
            self.extra.replace("{id}", &id.to_string())
        );
        let dns = match &self.dns {
            Some(lines) => format!("[dns]\nlisten = \"127.0.0.1:{}\"\n{lines}\n", n.dns_port),
            None => String::new(),
        };
        let http = match self.http {
            true => format!("[http]\nlisten = \"127.0.0.1:{}\"\n", n.http_port),
            false => String::new(),
        };
        std::fs::write(&n.config, text + &dns + &http).expect("write config");
    }

    /// `n` nodes, each in a network namespace behind a proxy, so that a test
    /// can slow single links (`link`). Needs root.
    pub async fn start_linked(n: u64) -> TestCluster {
        let setup = Setup {
            netns: true,
            proxies: true,
            ..Setup::default()
        };
        Self::start_setup(n, "", setup).await.unwrap_or_else(|e| {
            panic!("per-link faults need network namespaces (run as root): {e}")
        })
    }

    /// Has `leader` build a snapshot, waits until it has purged its log up to
    /// it, and returns it.
    pub async fn snapshot_and_purge(&self, leader: u64) -> SnapshotResponse {
        let mut req = tonic::Request::new(SnapshotRequest {});
        if let Some(t) = self.token.get() {
            let bearer = format!("Bearer {t}").parse().expect("a token is ASCII");
            req.metadata_mut().insert("authorization", bearer);
        }
        let snap = self
            .cluster_client(leader)
            .await
            .snapshot(req)
            .await
            .expect("snapshot")
            .into_inner();
        self.wait_for(
            "the leader to purge its log",
            Duration::from_secs(30),
            || async {
                self.status(leader)
                    .await
                    .filter(|s| s.purged_index >= snap.snapshot_index)
            },
        )
        .await;
        snap
    }

    /// Starts one more node that belongs to no cluster until it is added as a
    /// member, at its `peer` address.
    pub fn start_spare(&mut self) -> u64 {
        let id = self.add_node("127.0.0.1", free_port(), free_port());
        self.write_config(id, "");
        self.start_node(id);
        id
    }

    pub fn node(&self, id: u64) -> &TestNode {
        &self.nodes[(id - 1) as usize]
    }

    /// Node `id`'s Prometheus metrics text.
    pub async fn scrape(&self, id: u64) -> String {
        let url = format!("http://127.0.0.1:{}/metrics", self.node(id).metrics_port);
        reqwest::get(&url)
            .await
            .expect("scrape")
            .text()
            .await
            .expect("body")
    }

    /// The proxy in front of node `id` (`Setup::proxies`).
    pub fn proxy(&self, id: u64) -> &proxy::Proxy {
        self.proxies.get((id - 1) as usize).unwrap_or_else(|| {
            panic!("node {id} has no proxy: start the cluster with Setup::proxies")
        })
    }

    /// Makes the traffic node `from` sends to node `to` follow `link`, on new
    /// and open connections, whichever of the two opened them: on `to`'s
    /// proxy for connections from `from`, and on `from`'s proxy for
    /// connections from `to`, in the direction back to `to`. The reverse
    /// direction is left as it is. Needs `Setup { netns: true, proxies: true }`:
    /// on loopback every connection comes from 127.0.0.1, so a proxy cannot
    /// tell its peers apart.
    pub fn link(&self, from: u64, to: u64, link: proxy::Link) {
        assert!(
            self.net.is_some() && !self.proxies.is_empty(),
            "TestCluster::link needs Setup {{ netns: true, proxies: true }}: \
             only nodes at addresses of their own can be told apart by a proxy"
        );
        let ip = |id: u64| -> IpAddr { self.node(id).host.parse().expect("a node's IP") };
        self.proxy(to)
            .set_from(ip(from), proxy::Dir::ToTarget, link.clone());
        self.proxy(from)
            .set_from(ip(to), proxy::Dir::FromTarget, link);
    }

    /// Every proxy back to normal (`Proxy::heal`): the rules `link` set, and
    /// any proxy-wide fault or isolation too.
    pub fn heal_links(&self) {
        for p in &self.proxies {
            p.heal();
        }
    }

    /// Where clients reach node `id`: directly, never through its proxy.
    pub fn endpoint(&self, id: u64) -> String {
        format!("{}:{}", self.node(id).host, self.node(id).port)
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(|n| self.endpoint(n.id)).collect()
    }

    /// A client that fails over across every node.
    pub fn client(&self) -> RosterClient {
        self.client_to(&self.endpoints())
    }

    /// A client bound to one node only.
    pub fn node_client(&self, id: u64) -> RosterClient {
        self.client_to(&[self.endpoint(id)])
    }

    /// A client as the harness's own: its TLS, and its token.
    pub fn client_to(&self, endpoints: &[String]) -> RosterClient {
        let token = self.token.get().map(String::as_str);
        roster_client(endpoints, self.client_tls.as_ref(), token)
    }

    /// The admin token the harness made (`Setup::auth`).
    pub fn token(&self) -> &str {
        self.token.get().map_or("", String::as_str)
    }

    /// A client of one node, sending `token` (or none).
    pub fn client_with(&self, id: u64, token: Option<&str>) -> RosterClient {
        roster_client(&[self.endpoint(id)], self.client_tls.as_ref(), token)
    }

    /// A channel to `addr` ("host:port") as the harness's clients dial it.
    pub async fn channel(&self, addr: &str) -> Channel {
        endpoint(addr, self.client_tls.as_ref())
            .connect()
            .await
            .expect("connect")
    }

    pub async fn cluster_client(&self, id: u64) -> ClusterClient<Channel> {
        ClusterClient::new(self.channel(&self.endpoint(id)).await)
    }

    pub fn start_node(&mut self, id: u64) {
        let node = &mut self.nodes[(id - 1) as usize];
        assert!(node.child.is_none(), "node {id} is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.config.with_extension("log"))
            .expect("log file");
        // `ip netns exec` execs the server in place: the child's pid is the server's.
        let mut cmd = match &self.net {
            Some(lab) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &lab.ns(id), env!("CARGO_BIN_EXE_roster")]);
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_roster")),
        };
        cmd.args(["server", "--config"])
            .arg(&node.config)
            // The default log filter, as operators get it: tests read these logs.
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(limit) = self.fd_limit {
            use std::os::unix::process::CommandExt;
            // SAFETY: runs in the forked child before exec and only calls setrlimit(2),
            // which is async-signal-safe.
            unsafe {
                cmd.pre_exec(move || rlimit::setrlimit(rlimit::Resource::NOFILE, limit, limit));
            }
        }
        let child = cmd.spawn().expect("spawn roster server");
        node.child = Some(child);
    }

    /// SIGKILL: no shutdown path runs, unflushed data is lost as in a crash.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut c) = self.nodes[(id - 1) as usize].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Process id of node `id`'s server, while it runs.
    pub fn pid(&self, id: u64) -> Option<u32> {
        self.node(id).child.as_ref().map(|c| c.id())
    }

    /// Sends `signal` (a `kill` name such as "STOP" or "CONT") to node `id`.
    pub fn signal(&self, id: u64, signal: &str) {
        if let Some(pid) = self.pid(id) {
            let ok = Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(pid.to_string())
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "kill -{signal} {pid} (node {id}) failed");
        }
    }

    /// Whether node `id`'s process has exited by itself (it is then reaped).
    pub fn exited(&mut self, id: u64) -> Option<ExitStatus> {
        let node = &mut self.nodes[(id - 1) as usize];
        let status = node.child.as_mut()?.try_wait().ok()??;
        node.child = None;
        Some(status)
    }

    /// Waits up to `limit` for node `id`'s process to exit by itself.
    pub async fn wait_exit(&mut self, id: u64, limit: Duration) -> ExitStatus {
        let every = Duration::from_millis(20);
        match poll_every(limit, every, || std::future::ready(self.exited(id))).await {
            Some(status) => status,
            None => panic!(
                "node {id} still running after {limit:?}; logs in {}",
                self.dir.path().display()
            ),
        }
    }

    /// The lines node `id` logged at level ERROR (not lines that merely
    /// mention an error, such as an HTTP/2 `INTERNAL_ERROR` in a warning).
    pub fn logged_errors(&self, id: u64) -> Vec<String> {
        self.log(id)
            .lines()
            .map(|l| {
                // Drop the terminal colour codes around the level.
                let mut plain = String::with_capacity(l.len());
                let mut chars = l.chars();
                while let Some(c) = chars.next() {
                    if c == '\u{1b}' {
                        chars.by_ref().find(|c| *c == 'm');
                    } else {
                        plain.push(c);
                    }
                }
                plain
            })
            .filter(|l| l.split_whitespace().nth(1) == Some("ERROR"))
            .collect()
    }

    /// What node `id` has logged so far (stderr, at the harness's log level).
    pub fn log(&self, id: u64) -> String {
        std::fs::read_to_string(self.node(id).config.with_extension("log")).unwrap_or_default()
    }

    /// The node's sled data directory.
    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("node-{id}"))
    }

    /// From now on node `id` starts without `initial_cluster`, as a node joining later does.
    pub fn clear_initial_cluster(&self, id: u64) {
        let path = &self.node(id).config;
        let text = std::fs::read_to_string(path).expect("read config");
        let text: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with("initial_cluster"))
            .collect();
        std::fs::write(path, text.join("\n")).expect("write config");
    }

    pub fn is_running(&self, id: u64) -> bool {
        self.node(id).child.is_some()
    }

    pub async fn status(&self, id: u64) -> Option<StatusResponse> {
        let ch = self.client_to(&[self.endpoint(id)]);
        tokio::time::timeout(Duration::from_millis(500), async {
            ch.status_all().await.pop().and_then(|(_, r)| r.ok())
        })
        .await
        .ok()
        .flatten()
    }

    /// Waits until every running node reports the same leader, and returns it.
    pub async fn leader(&self) -> u64 {
        self.wait_for(
            "a leader all running nodes agree on",
            Duration::from_secs(20),
            || self.agreed_leader(),
        )
        .await
    }

    /// The leader every running node reports, if they agree on one.
    async fn agreed_leader(&self) -> Option<u64> {
        let mut leader = None;
        for n in self.nodes.iter().filter(|n| n.child.is_some()) {
            let s = self.status(n.id).await?;
            if s.leader_id == 0 || leader.is_some_and(|l| l != s.leader_id) {
                return None;
            }
            leader = Some(s.leader_id);
        }
        leader.filter(|l| self.is_running(*l))
    }

    /// What the current leader has applied: once a node reaches it, it holds
    /// every write acknowledged so far.
    pub async fn leader_applied(&self) -> u64 {
        let leader = self.leader().await;
        self.wait_applied(leader, 0).await.applied_index
    }

    /// Waits until node `id` has applied at least `index`.
    pub async fn wait_applied(&self, id: u64, index: u64) -> StatusResponse {
        self.wait_for(
            &format!("node {id} to apply {index}"),
            Duration::from_secs(30),
            || async { self.status(id).await.filter(|s| s.applied_index >= index) },
        )
        .await
    }

    /// Waits until the leader's membership records, for every member, the
    /// data-directory incarnation that member states (a stopped member: any
    /// known one); returns them by node id.
    pub async fn wait_bound(&self) -> std::collections::BTreeMap<u64, u64> {
        self.wait_for(
            "the leader to record every member's incarnation",
            Duration::from_secs(20),
            || async {
                let leader = self.status(self.leader().await).await?;
                let mut bound = std::collections::BTreeMap::new();
                for m in &leader.members {
                    let states = match self.nodes.get((m.id - 1) as usize) {
                        Some(n) if n.child.is_some() => self.status(m.id).await?.incarnation,
                        _ => m.incarnation,
                    };
                    if m.incarnation == 0 || m.incarnation != states {
                        return None;
                    }
                    bound.insert(m.id, m.incarnation);
                }
                Some(bound)
            },
        )
        .await
    }

    /// `wait_until` that names where the cluster's logs are when it times out.
    pub async fn wait_for<T, F, Fut>(&self, what: &str, limit: Duration, f: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        match poll(limit, f).await {
            Some(v) => v,
            None => panic!(
                "timed out after {limit:?} waiting for {what}; logs in {}",
                self.dir.path().display()
            ),
        }
    }
}

/// How often the waits below ask again.
const POLL_EVERY: Duration = Duration::from_millis(50);

/// Asks `f` until it answers `Some` (at once, then every 50 ms), for up to
/// `limit`; `None` if it never did. Every wait in the tests is this,
/// `wait_until` or `TestCluster::wait_for`: a test waits for a condition,
/// never sleeps for a guess at how long one takes. (A fixed window is left
/// only where it is the assertion: nothing happens within it.)
pub async fn poll<T, F, Fut>(limit: Duration, f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    poll_every(limit, POLL_EVERY, f).await
}

/// `poll`, asking every `every`: for a cheap question whose answer a test
/// acts on at once (a process's exit, before a restart).
pub async fn poll_every<T, F, Fut>(limit: Duration, every: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(every).await;
    }
}

/// `poll`, panicking after `limit` with `what` it waited for.
pub async fn wait_until<T, F, Fut>(what: &str, limit: Duration, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    poll(limit, f)
        .await
        .unwrap_or_else(|| panic!("timed out after {limit:?} waiting for {what}"))
}

/// `poll` for a test without a runtime: blocks the thread between asks.
pub fn poll_blocking<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(POLL_EVERY);
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if std::thread::panicking() {
            // Keep the logs of a failed test.
            let path =
                std::mem::replace(&mut self.dir, tempfile::tempdir().expect("temp dir")).keep();
            eprintln!("cluster data and logs kept in {}", path.display());
        }
    }
}

pub fn instance(service: &str, id: &str, port: u32) -> Instance {
    Instance {
        service: service.into(),
        id: id.into(),
        address: "10.0.0.1".into(),
        port,
        ..Default::default()
    }
}

/// A Roster client of `endpoints`, over TLS and with a token when given.
pub fn roster_client(
    endpoints: &[String],
    tls: Option<&ClientTlsConfig>,
    token: Option<&str>,
) -> RosterClient {
    let c = match tls {
        Some(tls) => RosterClient::with_tls(endpoints, tls.clone()),
        None => RosterClient::new(endpoints),
    }
    .expect("client");
    match token {
        Some(t) => c.with_token(t).expect("token"),
        None => c,
    }
}

/// An endpoint for `addr` ("host:port"), over TLS when given.
pub fn endpoint(addr: &str, tls: Option<&ClientTlsConfig>) -> Endpoint {
    match tls {
        Some(tls) => Endpoint::from_shared(format!("https://{addr}"))
            .expect("uri")
            .tls_config(tls.clone())
            .expect("tls"),
        None => Endpoint::from_shared(format!("http://{addr}")).expect("uri"),
    }
}

pub async fn register(c: &RosterClient, service: &str, id: &str, port: u32) -> RegisterResponse {
    c.register(RegisterRequest {
        instance: Some(instance(service, id, port)),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("register {service}/{id}: {e}"))
}

pub fn get_req(service: &str, consistency: Consistency) -> GetServiceRequest {
    GetServiceRequest {
        service: service.into(),
        consistency: consistency as i32,
        ..Default::default()
    }
}

pub async fn ids(c: &RosterClient, service: &str, consistency: Consistency) -> Vec<String> {
    let mut v: Vec<String> = c
        .get_service(get_req(service, consistency))
        .await
        .unwrap_or_else(|e| panic!("get {service}: {e}"))
        .instances
        .into_iter()
        .map(|i| i.id)
        .collect();
    v.sort();
    v
}

/// The code block between `<!-- marker -->` and `<!-- /marker -->` in
/// README.md or, if not there, the first `docs/*.md` (in name order) that
/// holds the marker, without its fence: the documentation's examples run as
/// written.
pub fn doc_block(marker: &str) -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut pages = vec![root.join("README.md")];
    let mut docs: Vec<_> = std::fs::read_dir(root.join("docs"))
        .expect("docs/")
        .map(|entry| entry.expect("docs/ entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "md"))
        .collect();
    docs.sort();
    pages.extend(docs);
    let open = format!("<!-- {marker} -->");
    let rest = pages
        .iter()
        .find_map(|page| {
            let text =
                std::fs::read_to_string(page).unwrap_or_else(|e| panic!("{}: {e}", page.display()));
            text.split_once(&open).map(|(_, rest)| rest.to_string())
        })
        .unwrap_or_else(|| panic!("no <!-- {marker} --> in README.md or docs/*.md"));
    let (block, _) = rest
        .split_once(&format!("<!-- /{marker} -->"))
        .unwrap_or_else(|| panic!("no <!-- /{marker} --> in README.md or docs/*.md"));
    block
        .split_once("```")
        .and_then(|(_, rest)| rest.split_once('\n'))
        .and_then(|(_, rest)| rest.split_once("```"))
        .map(|(code, _)| code.to_string())
        .unwrap_or_else(|| panic!("a code block between the {marker} markers"))
}

/// The python `.ci/run` installs grpcio and grpcio-tools into (`ROSTER_PYTHON`),
/// or `None` after saying the test skips.
pub fn python() -> Option<String> {
    let python = std::env::var("ROSTER_PYTHON").ok();
    if python.is_none() {
        eprintln!(
            "skipped: set ROSTER_PYTHON to a python with grpcio and grpcio-tools (.ci/run does)"
        );
    }
    python
}

/// A CA and certificates made by `deploy/tls/make-certs.sh` (openssl) in
/// `dir`: `node-{id}.crt` for nodes 1 to 3, valid for 127.0.0.1 and
/// localhost, and `client.crt`.
pub fn make_certs(dir: &std::path::Path) {
    make_node_certs(dir, 1..=3);
}

/// Like `make_certs`, for nodes `ids`; the CA already in `dir`, if any, issues them.
pub fn make_node_certs(dir: &std::path::Path, ids: impl IntoIterator<Item = u64>) {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/tls/make-certs.sh");
    let out = Command::new(&script)
        .arg(dir)
        .args(
            ids.into_iter()
                .map(|id| format!("node-{id}=127.0.0.1,localhost")),
        )
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", script.display()));
    assert!(out.status.success(), "make-certs.sh: {out:?}");
}

/// Copies the files of directory `from` (and of its subdirectories) into `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create the data directory");
    for entry in std::fs::read_dir(from).expect("read the fixture") {
        let entry = entry.expect("a fixture entry");
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy a fixture file");
        }
    }
}

/// An outside process a test started (HAProxy, Prometheus), killed and
/// reaped when the test ends, however it ends.
pub struct Stopped(pub std::process::Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
