//! Bad input gets the right status code and leaves stored state untouched.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;
use roster::client::RosterClient;
use roster::proto::raft_v1::raft_transport_client::RaftTransportClient;
use roster::proto::raft_v1::RaftPayload;
use roster::proto::v1::*;
use tonic::Code;

async fn everything(c: &RosterClient) -> (u64, Vec<Instance>) {
    let r = c
        .get_service(get_req("payments", Consistency::Linearizable))
        .await
        .expect("read");
    (r.revision, r.instances)
}

#[tokio::test]
async fn bad_requests_get_clear_errors_and_change_nothing() {
    let c = TestCluster::start(3).await;
    let client = c.client();
    register(&client, "payments", "p-1", 8080).await;
    let before = everything(&client).await;

    let ok = instance("payments", "p-2", 8080);
    let big: HashMap<String, String> = [("blob".to_string(), "x".repeat(5000))].into();
    let many_keys: HashMap<String, String> =
        (0..65).map(|i| (format!("k{i}"), "v".into())).collect();
    let cases: Vec<(&str, Option<Instance>)> = vec![
        ("missing instance", None),
        (
            "empty service",
            Some(Instance {
                service: "".into(),
                ..ok.clone()
            }),
        ),
        (
            "long service",
            Some(Instance {
                service: "s".repeat(64),
                ..ok.clone()
            }),
        ),
        (
            "service outside DNS label",
            Some(Instance {
                service: "pay_ments".into(),
                ..ok.clone()
            }),
        ),
        (
            "service starting with -",
            Some(Instance {
                service: "-pay".into(),
                ..ok.clone()
            }),
        ),
        (
            "empty id",
            Some(Instance {
                id: "".into(),
                ..ok.clone()
            }),
        ),
        (
            "id with space",
            Some(Instance {
                id: "p 2".into(),
                ..ok.clone()
            }),
        ),
        (
            "long id",
            Some(Instance {
                id: "i".repeat(129),
                ..ok.clone()
            }),
        ),
        (
            "empty address",
            Some(Instance {
                address: "".into(),
                ..ok.clone()
            }),
        ),
        (
            "bad address",
            Some(Instance {
                address: "not an address".into(),
                ..ok.clone()
            }),
        ),
        (
            "port 0",
            Some(Instance {
                port: 0,
                ..ok.clone()
            }),
        ),
        (
            "port over 65535",
            Some(Instance {
                port: 65536,
                ..ok.clone()
            }),
        ),
        (
            "oversized metadata",
            Some(Instance {
                metadata: big,
                ..ok.clone()
            }),
        ),
        (
            "too many metadata keys",
            Some(Instance {
                metadata: many_keys,
                ..ok.clone()
            }),
        ),
        (
            "too many tags",
            Some(Instance {
                tags: (0..33).map(|i| i.to_string()).collect(),
                ..ok.clone()
            }),
        ),
        (
            "empty tag",
            Some(Instance {
                tags: vec!["".into()],
                ..ok.clone()
            }),
        ),
        (
            "huge weight",
            Some(Instance {
                weight: 1_000_000,
                ..ok.clone()
            }),
        ),
    ];
    for (what, inst) in cases {
        // Through every node: a follower must reject before forwarding.
        for id in 1..=3 {
            let e = c
                .node_client(id)
                .register(RegisterRequest {
                    instance: inst.clone(),
                    ..Default::default()
                })
                .await
                .expect_err(what);
            assert_eq!(
                e.code(),
                roster::client::Code::InvalidArgument,
                "{what} via node {id}: {e}"
            );
            assert!(!e.message().is_empty());
        }
    }

    let e = client
        .deregister(DeregisterRequest {
            namespace: Default::default(),
            service: "payments".into(),
            id: "nope".into(),
        })
        .await
        .expect_err("unknown instance");
    assert_eq!(e.code(), roster::client::Code::NotFound, "{e}");
    assert!(e.message().contains("nope"));
    let e = client
        .deregister(DeregisterRequest {
            namespace: Default::default(),
            service: "".into(),
            id: "p-1".into(),
        })
        .await
        .expect_err("empty service");
    assert_eq!(e.code(), roster::client::Code::InvalidArgument);
    let e = client
        .heartbeat(HeartbeatRequest {
            namespace: Default::default(),
            service: "payments".into(),
            id: "nope".into(),
            ..Default::default()
        })
        .await
        .expect_err("unknown heartbeat");
    assert_eq!(e.code(), roster::client::Code::NotFound);
    // A reported status: only a TTL instance takes one, never maintenance,
    // and its output is bounded.
    let report = |status: HealthStatus, output: usize| HeartbeatRequest {
        service: "payments".into(),
        id: "p-1".into(),
        status: status as i32,
        output: "x".repeat(output),
        ..Default::default()
    };
    for (req, code, says) in [
        (
            report(HealthStatus::Warning, 0),
            roster::client::Code::FailedPrecondition,
            "has no TTL check",
        ),
        (
            report(HealthStatus::Maintenance, 0),
            roster::client::Code::InvalidArgument,
            "SetMaintenance",
        ),
        (
            report(HealthStatus::Passing, 5000),
            roster::client::Code::InvalidArgument,
            "at most 4096",
        ),
    ] {
        let e = client.heartbeat(req).await.expect_err("refused report");
        assert_eq!(e.code(), code, "{}", e.message());
        assert!(e.message().contains(says), "{}", e.message());
    }
    let e = client
        .get_service(get_req("bad_name", Consistency::Stale))
        .await
        .expect_err("bad get");
    assert_eq!(e.code(), roster::client::Code::InvalidArgument);
    let e = client
        .watch(WatchRequest {
            namespace: Default::default(),
            service: "bad name".into(),
            since_revision: 0,
        })
        .await
        .expect_err("bad watch");
    assert_eq!(e.code(), roster::client::Code::InvalidArgument);

    let after = everything(&client).await;
    assert_eq!(after.1, before.1, "stored instances changed");
    let hb = client
        .heartbeat(HeartbeatRequest {
            namespace: Default::default(),
            service: "payments".into(),
            id: "p-1".into(),
            ..Default::default()
        })
        .await
        .expect("heartbeat of a known instance");
    assert_eq!(hb.status, HealthStatus::Passing as i32);
}

#[tokio::test]
async fn peers_and_data_of_another_cluster_are_refused() {
    let mut c = TestCluster::start(3).await;
    let client = c.client();
    register(&client, "payments", "p-1", 8080).await;
    let before = everything(&client).await;

    // A Raft message from another cluster is refused before it reaches the log.
    let mut raft = RaftTransportClient::connect(format!("http://{}", c.node(1).peer))
        .await
        .expect("connect");
    let mut req = tonic::Request::new(RaftPayload {
        data: vec![1, 2, 3],
    });
    req.metadata_mut()
        .insert("roster-cluster-id", "elsewhere".parse().expect("header"));
    let e = raft.vote(req).await.expect_err("foreign vote");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    let e = raft
        .append_entries(tonic::Request::new(RaftPayload { data: vec![] }))
        .await
        .expect_err("vote without cluster id");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");

    // Node 3's data directory, started as a member of another cluster, is refused.
    c.kill(3);
    let cfg = std::fs::read_to_string(&c.node(3).config).expect("config");
    let foreign = c.dir.path().join("foreign.toml");
    std::fs::write(
        &foreign,
        cfg.replace("cluster_id = \"test\"", "cluster_id = \"other\""),
    )
    .expect("write");
    let (code, err) = run_server(&foreign);
    assert_ne!(code, Some(0));
    assert!(
        err.contains("belongs to node 3 of cluster \"test\"") && err.contains("\"other\""),
        "stderr: {err}"
    );

    // Malformed configuration: unknown field, bad address, missing file.
    let bad = c.dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "id = 1\nlisten = \"nowhere\"\ndata_dir = \"/tmp/x\"\n",
    )
    .expect("write");
    let (code, err) = run_server(&bad);
    assert_ne!(code, Some(0));
    assert!(
        err.contains("bad.toml") && err.contains("listen"),
        "stderr: {err}"
    );
    std::fs::write(
        &bad,
        "id = 1\nlisten = \"127.0.0.1:1\"\ndata_dir = \"/tmp/x\"\nbogus = true\n",
    )
    .expect("write");
    let (_, err) = run_server(&bad);
    assert!(err.contains("bogus"), "stderr: {err}");
    let (code, err) = run_server(&c.dir.path().join("missing.toml"));
    assert_ne!(code, Some(0));
    assert!(err.contains("missing.toml"), "stderr: {err}");

    // Node 3 restarts with its real config and nothing was lost or corrupted.
    c.start_node(3);
    let leader = c.leader().await;
    let applied = c.status(leader).await.expect("status").applied_index;
    c.wait_applied(3, applied).await;
    let node3 = c
        .node_client(3)
        .get_service(get_req("payments", Consistency::Stale))
        .await
        .expect("read node 3");
    assert_eq!(node3.instances, before.1);
}

/// Runs `roster server --config path`, expecting it to exit by itself.
fn run_server(config: &std::path::Path) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_roster"))
        .args(["server", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let exited = poll_blocking(Duration::from_secs(10), || child.try_wait().expect("wait"));
    if exited.is_none() {
        let _ = child.kill();
        panic!(
            "roster server kept running with config {}",
            config.display()
        );
    }
    let out = child.wait_with_output().expect("output");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn list_services_pages_through_in_name_order() {
    let c = TestCluster::start(3).await;
    let client = c.client();
    for n in 0..25 {
        register(&client, &format!("svc-{n:02}"), "a", 8080).await;
    }
    let client = &client;
    let page = |page_size: u32, page_token: String| async move {
        client
            .list_services(ListServicesRequest {
                namespace: Default::default(),
                consistency: Consistency::Linearizable as i32,
                page_size,
                page_token,
            })
            .await
    };
    let mut names = Vec::new();
    let mut sizes = Vec::new();
    let mut token = String::new();
    loop {
        let r = page(10, token).await.expect("a page");
        sizes.push(r.services.len());
        names.extend(r.services.into_iter().map(|s| s.name));
        if r.next_page_token.is_empty() {
            break;
        }
        token = r.next_page_token;
    }
    assert_eq!(sizes, [10, 10, 5]);
    let every: Vec<String> = (0..25).map(|n| format!("svc-{n:02}")).collect();
    assert_eq!(names, every, "each service once, in name order");
    // No page size: every service, no token.
    let all = page(0, String::new()).await.expect("all");
    assert_eq!((all.services.len(), all.next_page_token.as_str()), (25, ""));
    // A page ending on the last service says nothing follows.
    let last = page(5, "svc-19".into()).await.expect("the last page");
    assert_eq!(
        (last.services.len(), last.next_page_token.as_str()),
        (5, "")
    );
    let bad = page(10, "not a name!".into())
        .await
        .expect_err("a token no answer gave");
    assert_eq!(bad.code(), roster::client::Code::InvalidArgument, "{bad}");
    assert!(bad.message().contains("next_page_token"), "{bad}");
}
