//! Roster nodes as containers on a private Docker network, so a node can be
//! cut off the network (not just killed). The image is built from the test
//! binary by deploy/docker/build-image.sh: nothing is pulled.
//!
//! Without a Docker engine these tests skip themselves with a message, unless
//! ROSTER_DOCKER_TESTS=1 (as in .ci/run), which makes a missing engine a failure.

use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::common::certs::Ca;
use crate::common::*;
use roster::client::{tls_from_pem, RosterClient};
use roster::proto::v1::*;
use tonic::transport::ClientTlsConfig;

const IMAGE: &str = "roster:test";

fn docker(args: &[&str]) -> Result<String, String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .map_err(|e| format!("docker {args:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "docker {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Whether to run: the engine answers, or the environment demands it.
fn engine_ready() -> bool {
    let required = std::env::var("ROSTER_DOCKER_TESTS").is_ok_and(|v| v == "1");
    match docker(&["info", "--format", "{{.ServerVersion}}"]) {
        Ok(_) => true,
        Err(e) if required => {
            panic!("ROSTER_DOCKER_TESTS=1 but the Docker engine does not answer: {e}")
        }
        Err(e) => {
            eprintln!("skipping container tests: no Docker engine ({e})");
            false
        }
    }
}

fn image() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/docker/build-image.sh");
        let out = Command::new("bash")
            .arg(script)
            .arg(IMAGE)
            .env("ROSTER_BIN", env!("CARGO_BIN_EXE_roster"))
            .output()
            .expect("run build-image.sh");
        assert!(
            out.status.success(),
            "image build failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

/// Node i's name on the container network.
fn alias(i: u64) -> String {
    format!("roster-{i}")
}

/// `n` voters at their peer addresses, as `--initial-cluster` takes them.
fn initial_cluster(n: u64) -> String {
    (1..=n)
        .map(|i| format!("{i}={}:7002", alias(i)))
        .collect::<Vec<_>>()
        .join(",")
}

/// Containers on their own network; removed (with the network) on drop.
struct DockerCluster {
    tag: String,
    network: String,
    secure: Option<Secure>,
    /// How many nodes.
    n: u64,
    /// Started by docker-compose from this file (project `tag`), not by `launch`.
    compose: Option<&'static str>,
    /// The shipped compose files publish the same host ports (7001-7005):
    /// one of their clusters at a time, held until it is taken down.
    _ports: Option<std::sync::MutexGuard<'static, ()>>,
}

static COMPOSE_PORTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// TLS on both ports and tokens: the certificates (mounted into every
/// container), how the test's clients dial, and the bootstrap token.
struct Secure {
    _certs: tempfile::TempDir,
    tls: ClientTlsConfig,
    token: OnceLock<String>,
}

impl DockerCluster {
    fn start() -> DockerCluster {
        Self::launch(3, None, None)
    }

    /// With TLS on both ports (mutual between the nodes) and `--auth`; the
    /// test's clients bootstrap the ACL and use that token.
    async fn start_secure() -> DockerCluster {
        let dir = tempfile::tempdir().expect("cert dir");
        let ca = Ca::new("containers");
        std::fs::write(dir.path().join("ca.crt"), ca.pem()).expect("write cert");
        for id in 1..=3 {
            // Peers dial each other by alias; the test dials the published ports.
            let node = ca.node(id, &[&alias(id), "127.0.0.1"]);
            for (ext, pem) in [("crt", node.cert), ("key", node.key)] {
                std::fs::write(dir.path().join(format!("node-{id}.{ext}")), pem)
                    .expect("write cert");
            }
        }
        let secure = Secure {
            tls: tls_from_pem(ca.pem().as_bytes(), None),
            _certs: dir,
            token: OnceLock::new(),
        };
        let c = Self::launch(3, Some(secure), None);
        // A secret of our own: a retry after a lost answer gets the same token.
        let req = BootstrapRequest {
            secret: format!("containers-{:032x}", fastrand::u128(..)),
            ..BootstrapRequest::default()
        };
        let created = c
            .wait("the ACL bootstrap", || async {
                match c.client(&[1, 2, 3]).bootstrap(req.clone()).await {
                    Ok(t) => Some(t),
                    Err(e) => {
                        if e.code() != roster::client::Code::Unavailable {
                            eprintln!("bootstrap: {e:?}");
                        }
                        None
                    }
                }
            })
            .await;
        if let Some(s) = &c.secure {
            let _ = s.token.set(created.secret);
        }
        c
    }

    /// `n` nodes; with `data`, node i's data directory is `data/node-i` on
    /// the host (bind-mounted), so the host can seed or recover it.
    fn launch(n: u64, secure: Option<Secure>, data: Option<&std::path::Path>) -> DockerCluster {
        image();
        let tag = format!("rt{}-{}", std::process::id(), fastrand::u32(..));
        let network = format!("{tag}-net");
        docker(&["network", "create", &network]).expect("network");
        let mut c = DockerCluster {
            tag,
            network,
            secure,
            n: 0,
            compose: None,
            _ports: None,
        };
        let initial = initial_cluster(n);
        for i in 1..=n {
            c.run_node(i, Some(&initial), data);
        }
        c
    }

    /// Starts container `i`: an initial member, or (no `initial`) a node
    /// that waits to be added. The cluster's containers are 1..=`n`.
    fn run_node(&mut self, i: u64, initial: Option<&str>, data: Option<&std::path::Path>) {
        self.n = self.n.max(i);
        let certs = self
            .secure
            .as_ref()
            .map(|s| format!("{}:/certs:ro", s._certs.path().display()));
        let (name, alias) = (self.name(i), self.host(i));
        let mut args = vec![
            "run",
            "-d",
            "--name",
            &name,
            "--network",
            &self.network,
            "--network-alias",
            &alias,
            "-p",
            "127.0.0.1::7001",
            "-e",
            "RUST_LOG=warn,openraft=error",
        ];
        if let Some(volume) = &certs {
            args.extend(["-v", volume.as_str()]);
        }
        let mount = data.map(|d| format!("{}:/data", d.join(format!("node-{i}")).display()));
        if let Some(mount) = &mount {
            args.extend(["-v", mount.as_str()]);
        }
        let (peer_advertise, advertise) = (format!("{alias}:7002"), format!("{alias}:7001"));
        let id = i.to_string();
        args.extend([
            IMAGE,
            "server",
            "--id",
            &id,
            "--cluster-id",
            "containers",
            "--listen",
            "0.0.0.0:7001",
            "--advertise",
            &advertise,
            "--peer-listen",
            "0.0.0.0:7002",
            "--peer-advertise",
            &peer_advertise,
            "--data-dir",
            "/data",
        ]);
        if let Some(initial) = initial {
            args.extend(["--initial-cluster", initial]);
        }
        let tls = [
            format!("--tls-cert=/certs/node-{i}.crt"),
            format!("--tls-key=/certs/node-{i}.key"),
        ];
        if self.secure.is_some() {
            args.extend(tls.iter().map(String::as_str));
            args.extend(["--tls-ca=/certs/ca.crt", "--auth"]);
        }
        docker(&args).expect("run container");
    }

    /// A shipped compose file's cluster, as an operator starts it, from the
    /// test's image.
    fn compose(file: &'static str, n: u64) -> DockerCluster {
        image();
        let tag = format!("rt{}c{}", std::process::id(), fastrand::u32(..));
        let ports = COMPOSE_PORTS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let c = DockerCluster {
            network: format!("{tag}_roster"),
            tag,
            secure: None,
            n,
            compose: Some(file),
            _ports: Some(ports),
        };
        let out = Command::new("docker-compose")
            .args(["-p", &c.tag, "-f", file, "up", "-d"])
            .env("ROSTER_IMAGE", IMAGE)
            .output()
            .expect("run docker-compose");
        assert!(out.status.success(), "docker-compose up: {out:?}");
        c
    }

    fn name(&self, i: u64) -> String {
        match self.compose {
            Some(_) => format!("{}_roster-{i}_1", self.tag),
            None => format!("{}-n{i}", self.tag),
        }
    }

    fn host(&self, i: u64) -> String {
        alias(i)
    }

    /// The loopback address the container's port 7001 is published on.
    fn endpoint(&self, i: u64) -> String {
        let out = docker(&["port", &self.name(i), "7001/tcp"]).expect("port");
        // Compose publishes on every address; the test dials loopback.
        let first = out.lines().next().unwrap_or_default();
        first.replace("0.0.0.0:", "127.0.0.1:")
    }

    fn client(&self, nodes: &[u64]) -> RosterClient {
        let eps: Vec<String> = nodes.iter().map(|i| self.endpoint(*i)).collect();
        let tls = self.secure.as_ref().map(|s| &s.tls);
        let token = self.secure.as_ref().and_then(|s| s.token.get());
        roster_client(&eps, tls, token.map(String::as_str))
    }

    fn disconnect(&self, i: u64) {
        docker(&["network", "disconnect", &self.network, &self.name(i)]).expect("disconnect");
    }

    fn reconnect(&self, i: u64) {
        docker(&[
            "network",
            "connect",
            "--alias",
            &self.host(i),
            &self.network,
            &self.name(i),
        ])
        .expect("connect");
    }

    async fn status(&self, i: u64) -> Option<StatusResponse> {
        let c = self.client(&[i]);
        tokio::time::timeout(Duration::from_secs(1), async {
            c.status_all().await.pop().and_then(|(_, r)| r.ok())
        })
        .await
        .ok()
        .flatten()
    }

    async fn wait<T, F, Fut>(&self, what: &str, f: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        wait_until(what, Duration::from_secs(60), f).await
    }

    async fn leader(&self, among: &[u64]) -> u64 {
        self.wait("a leader", || async {
            let mut leader = None;
            for &i in among {
                let s = self.status(i).await?;
                if s.leader_id == 0 || leader.is_some_and(|l| l != s.leader_id) {
                    return None;
                }
                leader = Some(s.leader_id);
            }
            leader.filter(|l| among.contains(l))
        })
        .await
    }
}

impl Drop for DockerCluster {
    fn drop(&mut self) {
        for i in 1..=self.n {
            if std::thread::panicking() {
                if let Ok(logs) = docker(&["logs", "--tail", "30", &self.name(i)]) {
                    eprintln!("--- {} ---\n{logs}", self.name(i));
                }
            }
            if self.compose.is_none() {
                let _ = docker(&["rm", "-f", &self.name(i)]);
            }
        }
        match self.compose {
            Some(file) => {
                let _ = Command::new("docker-compose")
                    .args(["-p", &self.tag, "-f", file, "down", "-v"])
                    .env("ROSTER_IMAGE", IMAGE)
                    .output();
            }
            None => {
                let _ = docker(&["network", "rm", &self.network]);
            }
        }
    }
}

#[tokio::test]
async fn container_partitioned_leader_is_replaced_and_rejoins_without_losing_writes() {
    if !engine_ready() {
        return;
    }
    // With TLS on both ports and tokens: partitions and rejoins work the same.
    let c = DockerCluster::start_secure().await;
    let old = c.leader(&[1, 2, 3]).await;
    let all = c.client(&[1, 2, 3]);
    for n in 0..20 {
        register(&all, "orders", &format!("o-{n}"), 9000 + n).await;
    }

    // Cut the leader off: the other two elect a new one and go on accepting writes.
    c.disconnect(old);
    let majority: Vec<u64> = (1..=3).filter(|&i| i != old).collect();
    let new = c.leader(&majority).await;
    assert_ne!(new, old);
    let side = c.client(&majority);
    for n in 20..40 {
        register(&side, "orders", &format!("o-{n}"), 9000 + n).await;
    }
    let during = ids(&side, "orders", Consistency::Linearizable).await;
    assert_eq!(during.len(), 40);

    // Heal: the old leader rejoins as a follower and converges on the same state.
    c.reconnect(old);
    let target = c.status(new).await.expect("leader status").applied_index;
    let rejoined = c
        .wait("the old leader to catch up", || async {
            c.status(old)
                .await
                .filter(|s| s.applied_index >= target && s.leader_id == new)
        })
        .await;
    assert_eq!(rejoined.role, "follower");
    let theirs = ids(&c.client(&[old]), "orders", Consistency::Stale).await;
    assert_eq!(theirs, during);
    // Without the token, or in plaintext, the cluster answers no one.
    let stranger = tls_from_pem(Ca::new("someone else").pem().as_bytes(), None);
    let e = RosterClient::with_tls(&[c.endpoint(new)], stranger)
        .expect("client")
        .status()
        .await
        .expect_err("no trust in the cluster's CA");
    assert!(std::error::Error::source(&e).is_some(), "{e:?}");
    let secure = c.secure.as_ref().expect("secure");
    let e = RosterClient::with_tls(&[c.endpoint(new)], secure.tls.clone())
        .expect("client")
        .status()
        .await
        .expect_err("no token");
    assert_eq!(e.code(), roster::client::Code::Unauthenticated, "{e:?}");
}

#[tokio::test]
async fn container_killed_node_restarts_from_its_volume_and_catches_up() {
    if !engine_ready() {
        return;
    }
    let c = DockerCluster::start();
    let leader = c.leader(&[1, 2, 3]).await;
    // Each node gives its peers the names it advertises (its alias on the
    // container network, not its 0.0.0.0 listen addresses), and the membership
    // the cluster replicates records those names: the peer addresses from the
    // initial cluster, the client addresses once the leader has heard them.
    let members = c
        .wait("the leader to learn every client address", || async {
            let members = c.status(leader).await?.members;
            members
                .iter()
                .all(|m| !m.address.is_empty())
                .then_some(members)
        })
        .await;
    assert_eq!(members.len(), 3, "{members:?}");
    for m in &members {
        let advertised = format!("{}:7001", c.host(m.id));
        assert_eq!(m.address, advertised, "{members:?}");
        assert_eq!(
            m.peer_address,
            format!("{}:7002", c.host(m.id)),
            "{members:?}"
        );
        let s = c.status(m.id).await.expect("status");
        assert_eq!(s.advertise_address, advertised);
    }
    let follower = {
        let l = c.leader(&[1, 2, 3]).await;
        (1..=3).find(|&i| i != l).expect("a follower")
    };
    let all = c.client(&[1, 2, 3]);
    register(&all, "carts", "c-0", 80).await;
    docker(&["kill", &c.name(follower)]).expect("kill");
    let rest: Vec<u64> = (1..=3).filter(|&i| i != follower).collect();
    let side = c.client(&rest);
    for n in 1..30 {
        register(&side, "carts", &format!("c-{n}"), 80).await;
    }
    docker(&["start", &c.name(follower)]).expect("start");
    let leader = c.leader(&[1, 2, 3]).await;
    let target = c.status(leader).await.expect("status").applied_index;
    c.wait("the restarted node to catch up", || async {
        c.status(follower)
            .await
            .filter(|s| s.applied_index >= target)
    })
    .await;
    let node = RosterClient::new(&[c.endpoint(follower)]).expect("client");
    assert_eq!(ids(&node, "carts", Consistency::Stale).await.len(), 30);
}

#[tokio::test]
async fn container_killed_leader_with_tls_and_tokens_is_replaced_and_catches_up() {
    if !engine_ready() {
        return;
    }
    let c = DockerCluster::start_secure().await;
    let old = c.leader(&[1, 2, 3]).await;
    let all = c.client(&[1, 2, 3]);
    for n in 0..10 {
        register(&all, "payments", &format!("p-{n}"), 80).await;
    }
    // SIGKILL the leader: the others elect one over mutual TLS and go on.
    docker(&["kill", &c.name(old)]).expect("kill");
    let rest: Vec<u64> = (1..=3).filter(|&i| i != old).collect();
    let new = c.leader(&rest).await;
    assert_ne!(new, old);
    let side = c.client(&rest);
    for n in 10..20 {
        register(&side, "payments", &format!("p-{n}"), 80).await;
    }
    // It restarts from its volume, rejoins as a follower and serves the token.
    docker(&["start", &c.name(old)]).expect("start");
    let target = c.status(new).await.expect("status").applied_index;
    let back = c
        .wait("the old leader to catch up", || async {
            c.status(old)
                .await
                .filter(|s| s.applied_index >= target && s.leader_id != 0)
        })
        .await;
    assert_eq!(back.role, "follower", "{back:?}");
    let there = ids(&c.client(&[old]), "payments", Consistency::Stale).await;
    assert_eq!(there.len(), 20, "{there:?}");
}

/// The 5-node compose cluster (deploy/compose/docker-compose.5.yml): serves
/// writes and linearizable reads with two nodes stopped, refuses writes with
/// three (UNAVAILABLE, at once), and comes back whole when every node is
/// started again from its volume.
#[tokio::test]
async fn container_five_nodes_lose_two_serve_lose_three_refuse_then_restart_from_their_data() {
    if !engine_ready() {
        return;
    }
    let c = DockerCluster::compose(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/compose/docker-compose.5.yml"
        ),
        5,
    );
    let all: Vec<u64> = (1..=5).collect();
    let leader = c.leader(&all).await;
    let client = c.client(&all);
    for n in 0..20 {
        register(&client, "orders", &format!("o-{n}"), 9000 + n).await;
    }
    // Two stopped, the leader among them.
    let first_two = [leader, (1..=5).find(|&i| i != leader).expect("another")];
    for i in first_two {
        docker(&["stop", "-t", "10", &c.name(i)]).expect("stop");
    }
    let up: Vec<u64> = all
        .iter()
        .copied()
        .filter(|i| !first_two.contains(i))
        .collect();
    let three = c.client(&up);
    for n in 20..30 {
        register(&three, "orders", &format!("o-{n}"), 9000 + n).await;
    }
    assert_eq!(
        ids(&three, "orders", Consistency::Linearizable).await.len(),
        30
    );
    // A third stopped: two of five are no majority. Once they know it (no
    // leader), a write is refused at once, not left to time out.
    docker(&["stop", "-t", "10", &c.name(up[0])]).expect("stop");
    let stopped = Instant::now();
    c.wait("the two left to know they have no leader", || async {
        for &i in &up[1..] {
            if c.status(i).await?.leader_id != 0 {
                return None;
            }
        }
        Some(())
    })
    .await;
    let leaderless = stopped.elapsed();
    let channel = endpoint(&c.endpoint(up[1]), None)
        .connect()
        .await
        .expect("connect");
    let started = Instant::now();
    let e = roster::proto::v1::registry_client::RegistryClient::new(channel)
        .register(RegisterRequest {
            instance: Some(instance("orders", "refused", 1)),
            ..Default::default()
        })
        .await
        .expect_err("a write without a majority");
    let took = started.elapsed();
    eprintln!(
        "no leader {leaderless:?} after the third stop; a write then refused in {took:?}: {e}"
    );
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(took < Duration::from_secs(1), "refused after {took:?}");

    // The whole cluster stopped, then started from its data.
    for &i in &up[1..] {
        docker(&["stop", "-t", "10", &c.name(i)]).expect("stop");
    }
    for &i in &all {
        docker(&["start", &c.name(i)]).expect("start");
    }
    c.leader(&all).await;
    let back = c.client(&all);
    let ids_back = c
        .wait("the restarted cluster to serve", || async {
            let got = ids(&back, "orders", Consistency::Linearizable).await;
            (got.len() >= 30).then_some(got)
        })
        .await;
    assert_eq!(ids_back.len(), 30, "{ids_back:?}");
    assert!(!ids_back.contains(&"refused".to_string()));
}

/// The compose file of 3 voters and 2 read replicas
/// (deploy/compose/docker-compose.3+2.yml), as an operator starts it: its
/// one-shot services add nodes 4 and 5 as replicas, which then serve stale
/// reads of what the voters took, and writes go on with both stopped.
#[tokio::test]
async fn container_three_voters_and_two_replicas_from_the_compose_file() {
    if !engine_ready() {
        return;
    }
    let c = DockerCluster::compose(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/compose/docker-compose.3+2.yml"
        ),
        5,
    );
    let voters = [1, 2, 3];
    let leader = c.leader(&voters).await;
    c.wait("nodes 4 and 5 to be replicas", || async {
        let members = c.status(leader).await?.members;
        let replicas = members.iter().filter(|m| m.replica && !m.voter).count();
        (replicas == 2 && members.len() == 5).then_some(())
    })
    .await;
    let writer = c.client(&voters);
    for n in 0..10 {
        register(&writer, "orders", &format!("o-{n}"), 9000 + n).await;
    }
    for replica in [4, 5] {
        let reader = c.client(&[replica]);
        let got = c
            .wait("the replica to serve every write", || async {
                let got = ids(&reader, "orders", Consistency::Stale).await;
                (got.len() == 10).then_some(got)
            })
            .await;
        assert_eq!(got.len(), 10, "node {replica}: {got:?}");
    }
    for replica in [4, 5] {
        docker(&["stop", "-t", "10", &c.name(replica)]).expect("stop");
    }
    register(&writer, "orders", "o-10", 9010).await;
    assert_eq!(
        ids(&writer, "orders", Consistency::Linearizable)
            .await
            .len(),
        11
    );
}

/// A backup of one cluster of containers restored into a fresh one; then, in
/// that one, a lost quorum recovered from a single survivor.
#[tokio::test]
async fn container_backup_restores_into_a_fresh_cluster_and_a_lost_quorum_is_recovered() {
    if !engine_ready() {
        return;
    }
    let roster = env!("CARGO_BIN_EXE_roster");
    let dir = tempfile::tempdir().expect("temp dir");
    let backup = dir.path().join("containers.backup");
    {
        let old = DockerCluster::start();
        old.leader(&[1, 2, 3]).await;
        let client = old.client(&[1, 2, 3]);
        for n in 0..40 {
            register(&client, "carts", &format!("c-{n}"), 7000 + n).await;
        }
        let out = Command::new(roster)
            .args(["snapshot", "save", "--endpoints", &old.endpoint(2)])
            .arg(&backup)
            .output()
            .expect("roster snapshot save");
        assert!(out.status.success(), "{out:?}");
    }

    let data = dir.path().join("data");
    let initial = initial_cluster(3);
    for i in 1..=3u64 {
        let out = Command::new(roster)
            .args(["snapshot", "restore"])
            .arg(&backup)
            .arg("--data-dir")
            .arg(data.join(format!("node-{i}")))
            .args(["--id", &i.to_string(), "--cluster-id", "containers"])
            .args(["--initial-cluster", &initial])
            .output()
            .expect("roster snapshot restore");
        assert!(out.status.success(), "{out:?}");
    }
    let c = DockerCluster::launch(3, None, Some(&data));
    let leader = c.leader(&[1, 2, 3]).await;
    for i in 1..=3 {
        let node = RosterClient::new(&[c.endpoint(i)]).expect("client");
        let got = c
            .wait("every node to serve the restored state", || async {
                let got = ids(&node, "carts", Consistency::Stale).await;
                (got.len() == 40).then_some(got)
            })
            .await;
        assert_eq!(got.len(), 40);
    }

    // Two nodes lost for good, the leader among them; the survivor stopped,
    // recovered from the host, started alone.
    let survivor = (1..=3).find(|&i| i != leader).expect("a follower");
    for i in (1..=3).filter(|&i| i != survivor) {
        docker(&["kill", &c.name(i)]).expect("kill");
    }
    docker(&["stop", "-t", "10", &c.name(survivor)]).expect("stop");
    let started = Instant::now();
    let out = Command::new(roster)
        .arg("recover")
        .arg("--data-dir")
        .arg(data.join(format!("node-{survivor}")))
        .args(["--id", &survivor.to_string(), "--cluster-id", "containers"])
        .args(["--peer-address", &format!("{}:7002", c.host(survivor))])
        .output()
        .expect("roster recover");
    assert!(out.status.success(), "{out:?}");
    docker(&["start", &c.name(survivor)]).expect("start");
    assert_eq!(c.leader(&[survivor]).await, survivor);
    let alone = RosterClient::new(&[c.endpoint(survivor)]).expect("client");
    register(&alone, "carts", "after", 1).await;
    eprintln!(
        "recovered survivor took its first write {:?} after recover began",
        started.elapsed()
    );
    assert_eq!(
        ids(&alone, "carts", Consistency::Linearizable).await.len(),
        41
    );
}

/// The cluster grows 3 → 5 → 3 with membership changes while a client keeps
/// writing: no acknowledged write is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_cluster_grows_to_five_and_shrinks_to_three_under_writes() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    if !engine_ready() {
        return;
    }
    let mut c = DockerCluster::launch(3, None, None);
    c.leader(&[1, 2, 3]).await;
    let client = Arc::new(c.client(&[1, 2, 3]));
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let failed = Arc::new(Mutex::new(0u32));
    let writer = {
        let (client, stop, acked, failed) =
            (client.clone(), stop.clone(), acked.clone(), failed.clone());
        tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let id = format!("g-{n}");
                let req = RegisterRequest {
                    instance: Some(instance("growing", &id, 8000)),
                    ..Default::default()
                };
                match client.register(req).await {
                    Ok(_) => acked.lock().expect("acked").push(id),
                    Err(_) => *failed.lock().expect("failed") += 1,
                }
                n += 1;
            }
        })
    };
    let voters = |s: &StatusResponse| -> Vec<u64> {
        let mut v: Vec<u64> = s.members.iter().filter(|m| m.voter).map(|m| m.id).collect();
        v.sort();
        v
    };
    for id in [4, 5] {
        c.run_node(id, None, None);
        client
            .add_member(AddMemberRequest {
                id,
                address: format!("{}:7001", c.host(id)),
                replica: false,
            })
            .await
            .expect("add a member");
    }
    let all: Vec<u64> = (1..=5).collect();
    let leader = c.leader(&all).await;
    let s = c.status(leader).await.expect("status");
    assert_eq!(voters(&s), all);
    for id in [5, 4] {
        client
            .remove_member(RemoveMemberRequest { id })
            .await
            .expect("remove a member");
        docker(&["stop", "-t", "10", &c.name(id)]).expect("stop");
    }
    let leader = c.leader(&[1, 2, 3]).await;
    assert_eq!(voters(&c.status(leader).await.expect("status")), [1, 2, 3]);
    let before = acked.lock().expect("acked").len();
    c.wait("writes after the shrink", || async {
        (acked.lock().expect("acked").len() > before + 20).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    writer.await.expect("writer");
    let acked = acked.lock().expect("acked").clone();
    let mut stored = ids(&client, "growing", Consistency::Linearizable).await;
    stored.sort();
    let lost: Vec<_> = acked
        .iter()
        .filter(|id| stored.binary_search(id).is_err())
        .collect();
    eprintln!(
        "3 -> 5 -> 3: {} writes acknowledged, {} failed, {} lost",
        acked.len(),
        failed.lock().expect("failed"),
        lost.len()
    );
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
}
