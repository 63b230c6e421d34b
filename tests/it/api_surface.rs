//! What a generic gRPC tool or an operator sees: health, reflection, the dev
//! cluster command, and fast failure without a quorum.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use roster::client::RosterClient;
use roster::proto::v1::*;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Symbols a reflection client asks about, and whether the server should describe them.
const SYMBOLS: [&str; 4] = [
    "roster.v1.Registry",
    "roster.v1.Cluster.Status",
    "roster.raft.v1.RaftTransport",
    "roster.examples.Echo",
];

/// Talks to the server's reflection service of version `$v` (`v1`, `v1alpha`) as
/// a reflection tool would: lists the services, then asks for the file of each
/// of `SYMBOLS`. Returns the sorted service names and, per symbol, whether a
/// file came back. The two versions share no types, hence a macro.
macro_rules! reflect {
    ($v:ident, $channel:expr) => {{
        use tonic_reflection::pb::$v::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::$v::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::$v::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::$v::ServerReflectionRequest;
        let mut client = ServerReflectionClient::new($channel);
        // One stream per question: the server ends a stream with an error
        // status when it cannot answer.
        let mut ask = async |m| {
            let request = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(m),
            };
            let mut replies = client
                .server_reflection_info(tokio_stream::iter([request]))
                .await
                .expect("reflection")
                .into_inner();
            replies
                .message()
                .await
                .map(|r| r.and_then(|m| m.message_response).expect("a reply"))
        };
        let list = ask(MessageRequest::ListServices(String::new())).await;
        let Ok(MessageResponse::ListServicesResponse(list)) = list else {
            panic!("reflection did not answer the service list: {list:?}");
        };
        let mut services: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        services.sort();
        let mut symbols = Vec::new();
        for symbol in SYMBOLS {
            let found = match ask(MessageRequest::FileContainingSymbol(symbol.into())).await {
                Ok(MessageResponse::FileDescriptorResponse(f)) => {
                    !f.file_descriptor_proto.is_empty()
                }
                Err(e) if e.code() == tonic::Code::NotFound => false,
                other => panic!("{symbol}: unexpected reply {other:?}"),
            };
            symbols.push((symbol, found));
        }
        (services, symbols)
    }};
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    let c = TestCluster::start(3).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", c.endpoint(2)))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let health = HealthClient::new(channel.clone());
    // Readiness follows Raft's metrics on the next tick after a leader is known.
    for service in ["", "roster.v1.Registry"] {
        c.wait_for(
            &format!("service {service:?} to be SERVING"),
            Duration::from_secs(10),
            || {
                let mut health = health.clone();
                async move {
                    let r = health
                        .check(HealthCheckRequest {
                            service: service.into(),
                        })
                        .await
                        .expect("health check")
                        .into_inner();
                    (r.status == ServingStatus::Serving as i32).then_some(())
                }
            },
        )
        .await;
    }

    for version in ["v1", "v1alpha"] {
        let (services, symbols) = if version == "v1" {
            reflect!(v1, channel.clone())
        } else {
            reflect!(v1alpha, channel.clone())
        };
        assert_eq!(
            services,
            [
                "grpc.health.v1.Health".into(),
                format!("grpc.reflection.{version}.ServerReflection"),
                "roster.v1.Acl".into(),
                "roster.v1.Cluster".into(),
                "roster.v1.Registry".into(),
            ],
            "reflection {version}: only the public services are listed"
        );
        assert_eq!(
            symbols,
            [
                ("roster.v1.Registry", true),
                ("roster.v1.Cluster.Status", true),
                ("roster.raft.v1.RaftTransport", false),
                ("roster.examples.Echo", false),
            ],
            "reflection {version}: which symbols are described"
        );
    }
}

/// The metric names the shipped alert rules and dashboard refer to.
fn shipped_metrics() -> Vec<String> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/monitoring/");
    let text: String = ["roster-alerts.yml", "roster-dashboard.json"]
        .iter()
        .map(|f| std::fs::read_to_string(format!("{dir}{f}")).expect("a monitoring file"))
        .collect();
    let mut names: Vec<String> = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("roster_") && w.len() > "roster_".len())
        .map(|w| w.strip_suffix("_bucket").unwrap_or(w).to_string())
        .collect();
    names.sort();
    names.dedup();
    assert!(names.len() >= 10, "{names:?}");
    names
}

#[tokio::test]
async fn prometheus_metrics_show_raft_and_catalogue_state() {
    let c = TestCluster::start(3).await;
    let leader = c.leader().await;
    register(&c.client(), "payments", "p-1", 80).await;
    c.client()
        .create_namespace(CreateNamespaceRequest {
            name: "team-a".into(),
            quotas: Some(NamespaceQuotas {
                max_instances: 5,
                ..Default::default()
            }),
        })
        .await
        .expect("namespace");
    c.client()
        .register(RegisterRequest {
            instance: Some(instance("payments", "p-1", 80)),
            namespace: "team-a".into(),
            ..Default::default()
        })
        .await
        .expect("register in team-a");
    let applied = c.status(leader).await.expect("status").applied_index;
    for n in &c.nodes {
        c.wait_applied(n.id, applied).await;
        let body = c.scrape(n.id).await;
        let is_leader = if n.id == leader { 1 } else { 0 };
        for want in [
            format!("roster_raft_is_leader {is_leader}"),
            format!("roster_raft_leader_id {leader}"),
            "roster_raft_voters 3".to_string(),
            "roster_registry_instances{status=\"passing\"} 2".to_string(),
            "roster_registry_services 2".to_string(),
            // Per namespace (at most `[limits] max_namespaces` of them).
            "roster_namespace_instances{namespace=\"default\"} 1".to_string(),
            "roster_namespace_instances{namespace=\"team-a\"} 1".to_string(),
            "roster_namespace_services{namespace=\"team-a\"} 1".to_string(),
            "roster_namespace_sessions{namespace=\"team-a\"} 0".to_string(),
            "roster_namespace_quota{namespace=\"team-a\",quota=\"max_instances\"} 5".to_string(),
            "roster_registry_sessions 0".to_string(),
        ] {
            assert!(
                body.lines().any(|l| l == want),
                "node {}: no line {want:?} in\n{body}",
                n.id
            );
        }
        // Only the leader sends heartbeats, so only it knows round trips.
        let rtts = body
            .lines()
            .filter(|l| l.starts_with("roster_raft_peer_rtt_seconds{peer="))
            .count();
        assert_eq!(rtts, if n.id == leader { 2 } else { 0 }, "{body}");
        // And how many entries each lacks: caught up, none.
        let lags: Vec<&str> = body
            .lines()
            .filter(|l| l.starts_with("roster_raft_peer_lag_entries{peer="))
            .collect();
        match n.id == leader {
            true => assert!(
                lags.len() == 2 && lags.iter().all(|l| l.ends_with(" 0")),
                "{body}"
            ),
            false => assert!(lags.is_empty(), "{body}"),
        }
        // Each flush of the log is timed; the write above needed at least one.
        let flushes: u64 = body
            .lines()
            .find_map(|l| l.strip_prefix("roster_log_fsync_seconds_count "))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no fsync count in\n{body}"));
        assert!(flushes > 0, "{body}");
        // The leader exports every metric the shipped alerts and dashboard use.
        if n.id == leader {
            for name in shipped_metrics() {
                assert!(
                    body.lines().any(|l| l.starts_with(&name)),
                    "deploy/monitoring uses {name}, not in\n{body}"
                );
            }
        }
        // Readiness over plain HTTP, for probes that cannot speak gRPC over TLS.
        let ready = reqwest::get(format!("http://127.0.0.1:{}/ready", n.metrics_port))
            .await
            .expect("readiness");
        assert_eq!(ready.status(), reqwest::StatusCode::OK, "node {}", n.id);
    }
    let missing = reqwest::get(format!("http://127.0.0.1:{}/other", c.node(1).metrics_port))
        .await
        .expect("request");
    assert_eq!(missing.status(), reqwest::StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn without_a_quorum_requests_fail_with_unavailable_instead_of_hanging() {
    let mut c = TestCluster::start(3).await;
    let leader = c.leader().await;
    register(&c.client(), "payments", "p-1", 80).await;
    // Keep the leader alone: it can neither commit nor confirm leadership.
    for id in (1..=3).filter(|&i| i != leader) {
        c.kill(id);
    }
    let alone = c.node_client(leader);
    for what in ["write", "linearizable read"] {
        let started = Instant::now();
        let e = if what == "write" {
            alone
                .register(roster::proto::v1::RegisterRequest {
                    instance: Some(instance("payments", "p-2", 80)),
                    ..Default::default()
                })
                .await
                .expect_err("write without quorum")
        } else {
            alone
                .get_service(get_req("payments", Consistency::Linearizable))
                .await
                .expect_err("read without quorum")
        };
        assert_eq!(e.code(), roster::client::Code::Unavailable, "{what}: {e}");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{what} took {:?}",
            started.elapsed()
        );
    }
    // Stale reads still answer from the local state.
    assert_eq!(
        ids(&alone, "payments", Consistency::Stale).await,
        vec!["p-1"]
    );
    // And the node says it is not ready once it has stepped down.
    let url = format!("http://127.0.0.1:{}/ready", c.node(leader).metrics_port);
    let status = c
        .wait_for(
            "the lone node to report not ready",
            Duration::from_secs(10),
            || async {
                let s = reqwest::get(&url).await.ok()?.status();
                (s == reqwest::StatusCode::SERVICE_UNAVAILABLE).then_some(s)
            },
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::SERVICE_UNAVAILABLE);
}

/// Raft is spoken on the peer port only: the client port does not know the
/// service, so a forged Raft message sent there reaches nothing; the peer
/// port serves Raft and the public services (what followers forward), and no
/// health or reflection.
#[tokio::test]
async fn raft_is_served_on_the_peer_port_and_not_on_the_client_port() {
    use roster::proto::raft_v1::raft_transport_client::RaftTransportClient;
    use roster::proto::raft_v1::RaftPayload;
    let c = TestCluster::start(3).await;
    let vote = || RaftPayload { data: vec![0; 8] };
    let on = |addr: String| async move {
        tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect()
            .await
            .expect("connect")
    };
    let client_port = on(c.endpoint(1)).await;
    let e = RaftTransportClient::new(client_port.clone())
        .vote(vote())
        .await
        .expect_err("no Raft on the client port");
    assert_eq!(e.code(), tonic::Code::Unimplemented, "{e:?}");

    let peer_port = on(c.node(1).peer.clone()).await;
    // Reaches the Raft service, which refuses a message without the cluster id.
    let e = RaftTransportClient::new(peer_port.clone())
        .vote(vote())
        .await
        .expect_err("a vote from no member");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("cluster"), "{e:?}");
    let status = cluster_client::ClusterClient::new(peer_port.clone())
        .status(StatusRequest::default())
        .await
        .expect("the public services on the peer port")
        .into_inner();
    assert_eq!(status.node_id, 1);
    assert_eq!(status.peer_advertise_address, c.node(1).peer);
    let e = HealthClient::new(peer_port)
        .check(HealthCheckRequest::default())
        .await
        .expect_err("no health service on the peer port");
    assert_eq!(e.code(), tonic::Code::Unimplemented, "{e:?}");
    // The client port still serves clients.
    let s = cluster_client::ClusterClient::new(client_port)
        .status(StatusRequest::default())
        .await
        .expect("status on the client port")
        .into_inner();
    assert_eq!(s.advertise_address, c.endpoint(1));
}

#[tokio::test]
async fn dev_command_runs_a_working_three_node_cluster() {
    // Three consecutive free ports for `roster dev --base-port`.
    let base = loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let p = l.local_addr().expect("addr").port();
        // The dev cluster's peer, DNS and HTTP ports are 100, 200 and 300
        // above its client ports.
        let free = |i| {
            std::net::TcpListener::bind(("127.0.0.1", p + i)).is_ok()
                && std::net::UdpSocket::bind(("127.0.0.1", p + i)).is_ok()
        };
        if p < 65000
            && (1..3)
                .chain(100..103)
                .chain(200..203)
                .chain(300..303)
                .all(free)
        {
            break p;
        }
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_roster"))
        .args(["dev", "--base-port", &base.to_string()])
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn roster dev");
    let stdout = child.stdout.take().expect("stdout");
    let lines = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .take_while(|l| !l.starts_with("Ctrl-C"))
            .collect::<Vec<_>>()
    });
    let result = async {
        let endpoints: Vec<String> = (0..3).map(|i| format!("127.0.0.1:{}", base + i)).collect();
        let client = RosterClient::new(&endpoints).expect("client");
        let r = register(&client, "dev", "d-1", 80).await;
        assert!(r.revision > 0);
        assert_eq!(
            ids(&client, "dev", Consistency::Linearizable).await,
            vec!["d-1"]
        );
        client.status().await.expect("status")
    }
    .await;
    // The nodes serve before `roster dev` prints where they listen: wait for
    // its output (up to its "Ctrl-C" line) before stopping it. Not past 20 s:
    // the child is stopped either way, and the assertions below say what
    // it did print.
    poll(Duration::from_secs(20), || async {
        lines.is_finished().then_some(())
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let printed = lines.join().expect("stdout reader");
    assert!(result.members.len() == 3, "{result:?}");
    for i in 0..3 {
        assert!(
            printed
                .iter()
                .any(|l| l.contains(&format!("127.0.0.1:{}", base + i))),
            "dev output does not say where node {} listens: {printed:?}",
            i + 1
        );
    }
}

#[tokio::test]
async fn a_linearizable_status_is_the_leaders_after_a_read_index() {
    let c = TestCluster::start(3).await;
    let leader = c.leader().await;
    let written = register(&c.client(), "web", "w-1", 80).await.revision;
    let status = |id: u64, linearizable: bool| {
        let c = &c;
        async move {
            c.cluster_client(id)
                .await
                .status(StatusRequest { linearizable })
                .await
                .unwrap_or_else(|e| panic!("status of node {id}: {e}"))
                .into_inner()
        }
    };
    let s = status(leader, true).await;
    assert!(s.revision >= written, "{} < {written}", s.revision);
    // A follower hands the call to the leader, like every call the leader must serve.
    let follower = (1..=3).find(|&i| i != leader).expect("a follower");
    let s = status(follower, true).await;
    assert_eq!(s.node_id, leader);
    assert!(s.revision >= written, "{} < {written}", s.revision);
    // Without the flag every node answers from its own state.
    assert_eq!(status(follower, false).await.node_id, follower);
}
