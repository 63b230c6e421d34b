//! Proxyless gRPC with a client nobody here wrote: the README's Python
//! snippet (grpcio) resolves `xds:///echo` through the nodes' xDS service,
//! with the bootstrap file `roster xds-bootstrap` prints, and calls the echo
//! example's servers (`examples/echo.rs`, real processes registering
//! themselves with a TTL).
//!
//! The bootstrap names the nodes by one DNS name with an A record per node
//! (what a Kubernetes headless service gives), answered by a small DNS
//! server in this test, so that the client's xDS channel can move to another
//! node as gRPC clients do. `.ci/run` installs grpcio into a venv, sets
//! `ROSTER_PYTHON` and builds the example; without them the test says so and
//! skips.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::ports::free_port;
use crate::common::*;
use hickory_server::proto::op::{Message, MessageType, OpCode};
use hickory_server::proto::rr::rdata::A;
use hickory_server::proto::rr::{RData, Record, RecordType};
use roster::proto::v1::Consistency;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const LIMIT: Duration = Duration::from_secs(30);

/// The echo example's binary, next to this test's in the target directory.
fn echo_example() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let echo = dir.join("examples/echo");
    assert!(
        echo.exists(),
        "{} is missing: build it with `cargo build --example echo` (.ci/run does)",
        echo.display()
    );
    echo
}

/// An echo example server named `name` on `port`, registered through
/// `endpoints` (TLS nodes: dialled with the CA `ca`).
fn echo_server(name: &str, port: u16, endpoints: &str, ca: Option<&Path>) -> Child {
    let mut cmd = Command::new(echo_example());
    if let Some(ca) = ca {
        cmd.env("ROSTER_CACERT", ca);
    }
    cmd.args(["serve", name, &port.to_string()])
        .env("ROSTER_ENDPOINTS", endpoints)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start the echo example")
}

/// A DNS server answering every A query with `ips`.
async fn dns_server(ips: Vec<Ipv4Addr>) -> SocketAddr {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind DNS");
    let addr = socket.local_addr().expect("DNS address");
    tokio::spawn(async move {
        let mut buf = vec![0u8; 1500];
        loop {
            let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                return;
            };
            let Ok(q) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut r = Message::new(q.metadata.id, MessageType::Response, OpCode::Query);
            r.metadata.recursion_desired = q.metadata.recursion_desired;
            r.metadata.recursion_available = true;
            for query in q.queries {
                if query.query_type() == RecordType::A {
                    for ip in &ips {
                        r.add_answer(Record::from_rdata(
                            query.name().clone(),
                            1,
                            RData::A(A(*ip)),
                        ));
                    }
                }
                r.add_query(query);
            }
            if let Ok(bytes) = r.to_vec() {
                let _ = socket.send_to(&bytes, from).await;
            }
        }
    });
    addr
}

/// What the Python client printed: one line per call.
struct Calls {
    lines: mpsc::UnboundedReceiver<String>,
    _client: Child,
}

impl Calls {
    /// Runs the README's snippet as it says to: stubs in gen/, then the
    /// client, with `bootstrap`.
    fn start(python: &str, c: &TestCluster, bootstrap: &Path) -> Calls {
        let work = c.dir.path().join("python");
        std::fs::create_dir_all(work.join("gen")).expect("gen/");
        let proto = Path::new(REPO).join("proto");
        let protoc = std::process::Command::new(python)
            .args(["-m", "grpc_tools.protoc", "-I"])
            .arg(&proto)
            .args(["--python_out=gen", "--grpc_python_out=gen"])
            .arg(proto.join("roster/examples/echo.proto"))
            .current_dir(&work)
            .output()
            .expect("run grpc_tools.protoc");
        assert!(protoc.status.success(), "grpc_tools.protoc: {protoc:?}");
        std::fs::write(work.join("client.py"), doc_block("python-xds-snippet"))
            .expect("write the snippet");
        let mut child = Command::new(python)
            .arg("client.py")
            .current_dir(&work)
            .env("GRPC_XDS_BOOTSTRAP", bootstrap)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start the Python client");
        let stdout = child.stdout.take().expect("the client's output");
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut out = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = out.next_line().await {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Calls {
            lines,
            _client: child,
        }
    }

    /// Reads calls until `done` says so; panics after `limit`.
    async fn until(&mut self, what: &str, limit: Duration, mut done: impl FnMut(&str) -> bool) {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.lines.recv()).await {
                Ok(Some(line)) if done(&line) => return,
                Ok(Some(_)) => {}
                Ok(None) => panic!("the Python client exited while waiting for {what}"),
                Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
            }
        }
    }

    /// Waits for `n` calls in a row answered by servers in `from`, and
    /// returns how many each answered.
    async fn run_of(&mut self, what: &str, n: usize, from: &[&str]) -> BTreeMap<String, usize> {
        let mut run: BTreeMap<String, usize> = BTreeMap::new();
        let mut len = 0;
        self.until(what, LIMIT, |line| {
            match line.strip_prefix("ok ") {
                Some(who) if from.contains(&who) => {
                    *run.entry(who.to_string()).or_default() += 1;
                    len += 1;
                }
                _ => {
                    run.clear();
                    len = 0;
                }
            }
            len >= n
        })
        .await;
        run
    }
}

/// Runs `roster xds-bootstrap` with `args`, into a file of the cluster's directory.
fn xds_bootstrap(c: &TestCluster, args: &[&str], more: &[&str]) -> PathBuf {
    let bootstrap = c.dir.path().join("xds-bootstrap.json");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_roster"))
        .args(["xds-bootstrap", "--node-id", "python-test"])
        .args(args)
        .args(more)
        .arg("--output")
        .arg(&bootstrap)
        .output()
        .expect("run roster xds-bootstrap");
    assert!(out.status.success(), "roster xds-bootstrap: {out:?}");
    bootstrap
}

/// Waits until `n` echo instances pass.
async fn passing(c: &TestCluster, n: usize) {
    let client = c.client();
    c.wait_for(&format!("{n} echo servers passing"), LIMIT, || async {
        let mut req = get_req("echo", Consistency::Stale);
        req.healthy_only = true;
        let got = client.get_service(req).await.ok()?.instances.len();
        (got == n).then_some(())
    })
    .await;
}

/// Node `id`'s open xDS streams, from its metrics.
async fn xds_streams(c: &TestCluster, id: u64) -> u64 {
    c.scrape(id)
        .await
        .lines()
        .find_map(|l| l.strip_prefix("roster_xds_streams "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_balances_over_xds_and_follows_changes() {
    let Some(python) = python() else {
        return;
    };
    let setup = Setup {
        loopback_hosts: true,
        ..Setup::default()
    };
    let mut c = TestCluster::start_setup(3, "", setup)
        .await
        .expect("a cluster");
    let endpoints = c.endpoints().join(",");
    let mut servers: BTreeMap<&str, Child> = BTreeMap::new();
    for name in ["echo-1", "echo-2", "echo-3"] {
        servers.insert(name, echo_server(name, free_port(), &endpoints, None));
    }
    passing(&c, 3).await;

    // One name, an A record per node: the client's xDS channel reaches any.
    let ips: Vec<Ipv4Addr> = (1..=3)
        .map(|id| c.node(id).host.parse().expect("an IPv4 address"))
        .collect();
    let dns = dns_server(ips).await;
    let port = c.node(1).port;
    let bootstrap = xds_bootstrap(
        &c,
        &["--endpoints", &endpoints],
        &[
            "--server-uri",
            &format!("dns://{dns}/roster-nodes.test:{port}"),
        ],
    );
    let mut calls = Calls::start(&python, &c, &bootstrap);

    // Calls spread over every passing server: round robin, a third each.
    let all = ["echo-1", "echo-2", "echo-3"];
    let spread = calls.run_of("calls answered by all three", 300, &all).await;
    for name in all {
        let n = spread.get(name).copied().unwrap_or(0);
        assert!(n >= 60, "{name} answered {n} of 300 calls: {spread:?}");
    }

    // A server that hangs (stopped, its connections open) stops answering
    // its heartbeats: its TTL runs out, the leader marks it critical, the
    // node pushes the endpoints without it, and calls stop going there.
    let hung = servers["echo-2"].id().expect("echo-2's pid");
    let stopped = Instant::now();
    assert!(std::process::Command::new("kill")
        .args(["-STOP", &hung.to_string()])
        .status()
        .is_ok_and(|s| s.success()));
    calls
        .run_of(
            "200 calls in a row without echo-2",
            200,
            &["echo-1", "echo-3"],
        )
        .await;
    eprintln!(
        "calls stopped reaching the hung echo-2 within {:?} of its stop (TTL 2 s)",
        stopped.elapsed()
    );
    drop(servers.remove("echo-2"));

    // A server registered starts receiving calls.
    servers.insert(
        "echo-4",
        echo_server("echo-4", free_port(), &endpoints, None),
    );
    calls
        .until("a call answered by echo-4", LIMIT, |l| l == "ok echo-4")
        .await;

    // A server killed outright: its connections close, and calls go on
    // without an error to the others while its TTL runs out.
    drop(servers.remove("echo-1"));
    calls
        .run_of(
            "100 calls in a row after echo-1's death",
            100,
            &["echo-3", "echo-4"],
        )
        .await;

    // The node the client's xDS stream is on goes away: the client keeps
    // calling, moves its stream to another node, and still follows changes.
    let on = c
        .wait_for("the client's xDS stream on a node", LIMIT, || async {
            for id in 1..=3 {
                if xds_streams(&c, id).await == 1 {
                    return Some(id);
                }
            }
            None
        })
        .await;
    c.kill(on);
    let moved = c
        .wait_for("the client's xDS stream on another node", LIMIT, || async {
            for id in (1..=3).filter(|&id| id != on) {
                if xds_streams(&c, id).await == 1 {
                    return Some(id);
                }
            }
            None
        })
        .await;
    eprintln!("node {on} killed; the client's xDS stream moved to node {moved}");
    let rest: Vec<String> = (1..=3)
        .filter(|&id| id != on)
        .map(|id| c.endpoint(id))
        .collect();
    servers.insert(
        "echo-5",
        echo_server("echo-5", free_port(), &rest.join(","), None),
    );
    calls
        .until("a call answered by echo-5", LIMIT, |l| l == "ok echo-5")
        .await;
    calls
        .run_of(
            "100 calls in a row answered after the node's death",
            100,
            &["echo-3", "echo-4", "echo-5"],
        )
        .await;

    // The client took every resource the nodes sent.
    for id in (1..=3).filter(|&id| id != on) {
        let metrics = c.scrape(id).await;
        assert!(
            metrics.lines().any(|l| l == "roster_xds_nacks_total 0"),
            "node {id} counted NACKs:\n{metrics}"
        );
    }
}

/// The xDS stream over TLS: the bootstrap holds gRPC's file-based TLS
/// credentials with the CA (gRFC A65), the node's certificate is checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_over_xds_with_tls() {
    let Some(python) = python() else {
        return;
    };
    let dir = tempfile::tempdir().expect("dir");
    let certs = dir.path().join("certs");
    make_certs(&certs);
    let ca = certs.join("ca.crt");
    let extra = format!(
        "[tls]\ncert = \"{0}/node-{{id}}.crt\"\nkey = \"{0}/node-{{id}}.key\"\nca = \"{0}/ca.crt\"\n",
        certs.display()
    );
    let setup = Setup {
        client_tls: Some(roster::client::tls_from_files(&ca, None).expect("the CA")),
        ..Setup::default()
    };
    let c = TestCluster::start_setup(3, &extra, setup)
        .await
        .expect("a TLS cluster");
    let endpoints = c.endpoints().join(",");
    let _servers: Vec<Child> = ["echo-1", "echo-2"]
        .map(|name| echo_server(name, free_port(), &endpoints, Some(&ca)))
        .into();
    passing(&c, 2).await;
    let ca_arg = ca.display().to_string();
    let bootstrap = xds_bootstrap(&c, &["--endpoints", &endpoints], &["--cacert", &ca_arg]);
    let text = std::fs::read_to_string(&bootstrap).expect("the bootstrap");
    assert!(text.contains("\"type\": \"tls\""), "{text}");
    let mut calls = Calls::start(&python, &c, &bootstrap);
    let run = calls
        .run_of("100 calls answered", 100, &["echo-1", "echo-2"])
        .await;
    assert!(run.len() == 2 && run.values().all(|&n| n >= 20), "{run:?}");
}
