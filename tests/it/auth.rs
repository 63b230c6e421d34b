//! Tokens with roles and service scopes (`[auth] enabled`): who may call
//! what, on every node, and how fast a revocation counts.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;
use roster::client::RosterClient;
use roster::proto::v1::*;
use tonic::Code;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

async fn start() -> TestCluster {
    let setup = Setup {
        auth: true,
        ..Setup::default()
    };
    TestCluster::start_setup(3, "[auth]\nenabled = true\n", setup)
        .await
        .expect("an auth cluster")
}

async fn create(c: &TestCluster, role: Role, services: &[&str]) -> CreatedToken {
    c.client()
        .create_token(CreateTokenRequest {
            role: role as i32,
            services: services.iter().map(|s| s.to_string()).collect(),
            description: format!("{role:?} {services:?}"),
        })
        .await
        .expect("create token")
}

fn reg(service: &str, id: &str) -> RegisterRequest {
    RegisterRequest {
        instance: Some(instance(service, id, 80)),
        ..Default::default()
    }
}

fn get(service: &str) -> GetServiceRequest {
    GetServiceRequest {
        service: service.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn calls_need_a_token_whose_role_and_scope_cover_them() {
    let c = start().await;
    let anonymous = c.client_with(1, None);
    let e = anonymous
        .get_service(get("payments"))
        .await
        .expect_err("anonymous");
    assert_eq!(e.code(), roster::client::Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("requires a token"), "{e:?}");
    let e = c
        .client_with(1, Some("not-a-token"))
        .status()
        .await
        .expect_err("unknown token");
    assert_eq!(e.code(), roster::client::Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("unknown token"), "{e:?}");
    // The gRPC health service needs none: probes call it.
    let health = HealthClient::new(c.channel(&c.endpoint(1)).await)
        .check(HealthCheckRequest::default())
        .await;
    assert!(health.is_ok(), "{health:?}");

    // A read token reads, and may not write.
    let read = create(&c, Role::Read, &[]).await;
    let reader = c.client_with(2, Some(&read.secret));
    // A token counts on a node once the node has applied its creation.
    c.wait_for("the token on node 2", Duration::from_secs(5), || async {
        reader.status().await.ok()
    })
    .await;
    reader.get_service(get("payments")).await.expect("read");
    let e = reader
        .register(reg("payments", "p-1"))
        .await
        .expect_err("read token registers");
    assert_eq!(e.code(), roster::client::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("Register needs Write"), "{e:?}");

    // A write token scoped to pay*: payments yes, billing no.
    let write = create(&c, Role::Write, &["pay*"]).await;
    let accessor = write.token.as_ref().expect("info").accessor.clone();
    let writer = c.client_with(3, Some(&write.secret));
    c.wait_for("the token on node 3", Duration::from_secs(5), || async {
        writer.get_service(get("payments")).await.ok()
    })
    .await;
    let r = writer
        .register(reg("payments", "p-1"))
        .await
        .expect("in scope");
    let stored = r.instance.expect("instance");
    // Writes record the token's accessor, never its secret.
    assert_eq!(stored.registered_by, accessor);
    let admin = c.client();
    register(&admin, "billing", "b-1", 80).await;
    let e = writer
        .deregister(DeregisterRequest {
            namespace: Default::default(),
            service: "billing".into(),
            id: "b-1".into(),
        })
        .await
        .expect_err("out of scope");
    assert_eq!(e.code(), roster::client::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("\"billing\""), "{e:?}");
    let e = writer
        .get_service(get("billing"))
        .await
        .expect_err("read out of scope");
    assert_eq!(e.code(), roster::client::Code::PermissionDenied, "{e:?}");
    // Listings show only what the token covers.
    let listed = writer
        .list_services(ListServicesRequest::default())
        .await
        .expect("list");
    let names: Vec<&str> = listed.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, vec!["payments"]);
    // Membership, snapshots and tokens are for admins.
    let e = writer
        .add_member(AddMemberRequest {
            id: 9,
            address: "127.0.0.1:1".into(),
            replica: false,
        })
        .await
        .expect_err("write token changes membership");
    assert_eq!(e.code(), roster::client::Code::PermissionDenied, "{e:?}");
    let e = writer
        .list_tokens()
        .await
        .expect_err("write token lists tokens");
    assert_eq!(e.code(), roster::client::Code::PermissionDenied, "{e:?}");

    // `roster get` shows who registered an instance.
    let out = Command::new(env!("CARGO_BIN_EXE_roster"))
        .args(["get", "payments", "--endpoints", &c.endpoint(1)])
        .env("ROSTER_TOKEN", &read.secret)
        .output()
        .expect("roster get");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("registered_by={accessor}")),
        "{out:?}"
    );

    // The first admin token is made once per cluster. The harness gave its
    // own secret: asking again with it (a retry whose answer was lost) gets
    // the same token; any other secret, or none, is refused.
    let e = anonymous
        .bootstrap(BootstrapRequest::default())
        .await
        .expect_err("a second bootstrap");
    assert_eq!(e.code(), roster::client::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("bootstrapped already"), "{e:?}");
    let secret = c.token();
    let admins: Vec<_> = c
        .client()
        .list_tokens()
        .await
        .expect("list tokens")
        .tokens
        .into_iter()
        .filter(|t| t.role == Role::Admin as i32)
        .collect();
    assert_eq!(admins.len(), 1, "{admins:?}");
    for id in 1..=3 {
        let again = c
            .client_with(id, None)
            .bootstrap(BootstrapRequest {
                secret: secret.to_string(),
                ..BootstrapRequest::default()
            })
            .await
            .expect("a bootstrap retried with its secret");
        assert_eq!(again.secret, secret);
        assert_eq!(again.token.as_ref(), Some(&admins[0]), "node {id}");
    }
    // The same from the command line, with the secret in a file.
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("boot.secret");
    std::fs::write(&file, format!("{secret}\n")).expect("write the secret");
    let out = Command::new(env!("CARGO_BIN_EXE_roster"))
        .args(["acl", "bootstrap", "--endpoints", &c.endpoint(2)])
        .arg("--secret-file")
        .arg(&file)
        .output()
        .expect("roster acl bootstrap");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text.contains(&format!("accessor: {}", admins[0].accessor)),
        "{text}"
    );
    assert!(text.contains(&format!("secret: {secret}")), "{text}");
    let e = anonymous
        .bootstrap(BootstrapRequest {
            secret: "f".repeat(64),
            ..BootstrapRequest::default()
        })
        .await
        .expect_err("a bootstrap with another secret");
    assert_eq!(e.code(), roster::client::Code::FailedPrecondition, "{e:?}");
    let e = anonymous
        .bootstrap(BootstrapRequest {
            secret: "short".into(),
            ..BootstrapRequest::default()
        })
        .await
        .expect_err("a short secret");
    assert_eq!(e.code(), roster::client::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("32 to 256"), "{e:?}");
}

#[tokio::test]
async fn a_scoped_watch_never_shows_other_services() {
    let c = start().await;
    let scoped = create(&c, Role::Read, &["pay*"]).await;
    let watcher = c.client_with(2, Some(&scoped.secret));
    // A token counts on a node once the node has applied its creation.
    c.wait_for("the token on node 2", Duration::from_secs(5), || async {
        watcher.status().await.ok()
    })
    .await;
    let e = watcher
        .watch(WatchRequest {
            namespace: Default::default(),
            service: "billing".into(),
            since_revision: 0,
        })
        .await
        .expect_err("a watch out of scope");
    assert_eq!(e.code(), roster::client::Code::PermissionDenied, "{e:?}");
    let admin = c.client();
    register(&admin, "billing", "b-0", 80).await;
    // Watching every service: the initial state and the changes hold only its own.
    let mut stream = watcher
        .watch(WatchRequest {
            namespace: Default::default(),
            service: String::new(),
            since_revision: 0,
        })
        .await
        .expect("watch all");
    let initial = stream.message().await.expect("stream").expect("initial");
    assert!(initial.instances.is_empty(), "{initial:?}");
    register(&admin, "billing", "b-1", 80).await;
    register(&admin, "payments", "p-1", 80).await;
    let next = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("an event in time")
        .expect("stream")
        .expect("message");
    let services: Vec<String> = next
        .events
        .iter()
        .filter_map(|e| e.instance.as_ref().map(|i| i.service.clone()))
        .collect();
    assert_eq!(services, vec!["payments"], "{next:?}");

    // On one stream of many services, each add is judged alone.
    let (_tx, mut mux) = watcher
        .watch_services(vec![
            WatchServicesRequest::add("billing", 0),
            WatchServicesRequest::add("payments", 0),
        ])
        .await
        .expect("watch_services");
    let mut answers = Vec::new();
    for _ in 0..2 {
        let m = mux.message().await.expect("stream").expect("message");
        let outcome = match m.result.expect("result") {
            watch_services_response::Result::Ended(e) => Err(Code::from_i32(e.code)),
            watch_services_response::Result::Update(u) => Ok(u.instances.len()),
        };
        answers.push((m.service, outcome));
    }
    answers.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        answers,
        [
            ("billing".to_string(), Err(Code::PermissionDenied)),
            ("payments".to_string(), Ok(1)),
        ]
    );
    // Without a token the stream is refused before it opens.
    let e = c
        .client_with(2, None)
        .watch_services(vec![WatchServicesRequest::add("payments", 0)])
        .await
        .expect_err("no token");
    assert_eq!(e.code(), roster::client::Code::Unauthenticated, "{e:?}");
}

#[tokio::test]
async fn a_revoked_token_is_refused_on_every_node_within_a_second() {
    let c = start().await;
    let t = create(&c, Role::Read, &[]).await;
    let accessor = t.token.as_ref().expect("info").accessor.clone();
    let per_node: Vec<RosterClient> = (1..=3)
        .map(|id| c.client_with(id, Some(&t.secret)))
        .collect();
    for (i, client) in per_node.iter().enumerate() {
        // Applied everywhere before it is used: a follower may lag the leader.
        c.wait_for(
            "the token on every node",
            Duration::from_secs(5),
            || async { client.status().await.ok() },
        )
        .await;
        assert!(client.status().await.is_ok(), "node {}", i + 1);
    }
    let listed = c.client().list_tokens().await.expect("list");
    assert!(listed.tokens.iter().any(|k| k.accessor == accessor));
    c.client()
        .revoke_token(RevokeTokenRequest {
            accessor: accessor.clone(),
        })
        .await
        .expect("revoke");
    let revoked = Instant::now();
    for (i, client) in per_node.iter().enumerate() {
        let e = c
            .wait_for(
                "the revocation to count",
                Duration::from_secs(5),
                || async { client.status().await.err() },
            )
            .await;
        assert_eq!(
            e.code(),
            roster::client::Code::Unauthenticated,
            "node {}: {e:?}",
            i + 1
        );
    }
    let took = revoked.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "revocation took {took:?} to reach every node"
    );
    let e = c
        .client()
        .revoke_token(RevokeTokenRequest { accessor })
        .await
        .expect_err("revoked twice");
    assert_eq!(e.code(), roster::client::Code::NotFound, "{e:?}");
}

#[tokio::test]
async fn tokens_survive_restarts_and_reach_a_node_by_snapshot() {
    let mut c = start().await;
    let leader = c.leader().await;
    let lagging = (1..=3).find(|&i| i != leader).expect("a follower");
    c.kill(lagging);
    let kept = create(&c, Role::Read, &[]).await;
    let gone = create(&c, Role::Read, &[]).await;
    c.client()
        .revoke_token(RevokeTokenRequest {
            accessor: gone.token.as_ref().expect("info").accessor.clone(),
        })
        .await
        .expect("revoke");
    // The log is purged past the token changes: the node that missed them
    // gets them in a snapshot.
    c.snapshot_and_purge(leader).await;
    c.start_node(lagging);
    let on_lagging = c.client_with(lagging, Some(&kept.secret));
    c.wait_for(
        "the snapshot's token on the node that missed it",
        Duration::from_secs(20),
        || async { on_lagging.status().await.ok() },
    )
    .await;
    let e = c
        .client_with(lagging, Some(&gone.secret))
        .status()
        .await
        .expect_err("a token revoked before the snapshot");
    assert_eq!(e.code(), roster::client::Code::Unauthenticated, "{e:?}");

    // Every node restarts from its data directory with the same tokens.
    for id in 1..=3 {
        c.kill(id);
    }
    for id in 1..=3 {
        c.start_node(id);
    }
    for id in 1..=3 {
        let client = c.client_with(id, Some(&kept.secret));
        c.wait_for(
            "the token after a restart",
            Duration::from_secs(20),
            || async { client.status().await.ok() },
        )
        .await;
    }
    let e = c
        .client_with(1, None)
        .bootstrap(BootstrapRequest::default())
        .await
        .expect_err("bootstrap after a restart");
    assert_eq!(e.code(), roster::client::Code::FailedPrecondition, "{e:?}");
}
