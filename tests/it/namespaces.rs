//! Namespaces: one cluster shared by teams. The same service name lives
//! apart in each namespace, a token scoped to one namespace learns nothing
//! of another, quotas refuse writes that would pass them, and a namespace
//! holding instances is deleted only with force.

use std::time::Duration;

use futures::FutureExt;

use crate::common::targets::{refusing_port, Kind, Target};
use crate::common::*;
use roster::client::{Code, RosterClient};
use roster::proto::v1::watch_services_response::Result as MuxResult;
use roster::proto::v1::*;

fn reg_in(ns: &str, service: &str, id: &str) -> RegisterRequest {
    RegisterRequest {
        instance: Some(instance(service, id, 80)),
        namespace: ns.into(),
        ..Default::default()
    }
}

fn get_in(ns: &str, service: &str) -> GetServiceRequest {
    GetServiceRequest {
        service: service.into(),
        namespace: ns.into(),
        ..Default::default()
    }
}

async fn create_ns(c: &RosterClient, name: &str, max_instances: u64, max_services: u64) {
    c.create_namespace(CreateNamespaceRequest {
        name: name.into(),
        quotas: Some(NamespaceQuotas {
            max_instances,
            max_services,
            max_sessions: 1,
            max_watch_streams: 0,
        }),
    })
    .await
    .expect("create namespace");
}

/// The (namespace, service, id) of each instance of `service` in `ns`.
async fn held(c: &RosterClient, ns: &str, service: &str) -> Vec<(String, String, String)> {
    let r = c.get_service(get_in(ns, service)).await.expect("get");
    r.instances
        .into_iter()
        .map(|i| (i.namespace, i.service, i.id))
        .collect()
}

fn named(ns: &str, service: &str, id: &str) -> (String, String, String) {
    (ns.into(), service.into(), id.into())
}

#[tokio::test]
async fn a_service_name_lives_apart_in_each_namespace_and_scoped_tokens_see_only_theirs() {
    let setup = Setup {
        auth: true,
        ..Setup::default()
    };
    let c = TestCluster::start_setup(3, "[auth]\nenabled = true\n", setup)
        .await
        .expect("an auth cluster");
    let admin = c.client();
    create_ns(&admin, "team-a", 0, 0).await;
    create_ns(&admin, "team-b", 0, 0).await;
    for ns in ["team-a", "team-b", ""] {
        admin
            .register(reg_in(ns, "web", "w-1"))
            .await
            .expect("register");
    }
    // Each namespace holds its own `web`; answers name the namespace apart.
    assert_eq!(
        held(&admin, "team-a", "web").await,
        [named("team-a", "web", "w-1")]
    );
    assert_eq!(
        held(&admin, "team-b", "web").await,
        [named("team-b", "web", "w-1")]
    );
    assert_eq!(held(&admin, "", "web").await, [named("", "web", "w-1")]);
    assert_eq!(
        held(&admin, "default", "web").await,
        [named("", "web", "w-1")]
    );
    // Old clients (no namespace) list `default` alone.
    let listed = admin
        .list_services(ListServicesRequest::default())
        .await
        .expect("list");
    let names: Vec<&str> = listed.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["web"]);
    let in_a = admin
        .list_services(ListServicesRequest {
            namespace: "team-a".into(),
            ..Default::default()
        })
        .await
        .expect("list team-a");
    assert_eq!(in_a.services.len(), 1);
    assert_eq!(in_a.services[0].name, "web");

    // A token scoped to team-a: its namespace, nothing else.
    let token = admin
        .create_token(CreateTokenRequest {
            role: Role::Write as i32,
            services: vec!["team-a/*".into()],
            description: "team a".into(),
        })
        .await
        .expect("a scoped token");
    let a = c.client_with(2, Some(&token.secret));
    c.wait_for("the token on node 2", Duration::from_secs(10), || async {
        a.get_service(get_in("team-a", "web")).await.ok()
    })
    .await;
    a.register(reg_in("team-a", "api", "a-1"))
        .await
        .expect("in its namespace");
    let denied = |e: roster::client::Error| {
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        e.message().to_string()
    };
    // Another namespace, existing or not: the same refusal, nothing learned.
    let other = denied(a.get_service(get_in("team-b", "web")).await.expect_err("b"));
    let missing = denied(
        a.get_service(get_in("nope", "web"))
            .await
            .expect_err("nope"),
    );
    assert!(
        other.contains("team-b") && missing.contains("nope"),
        "{other} / {missing}"
    );
    denied(a.get_service(get_in("", "web")).await.expect_err("default"));
    denied(
        a.register(reg_in("team-b", "web", "x"))
            .await
            .expect_err("write b"),
    );
    for ns in ["team-b", ""] {
        let e = a
            .list_services(ListServicesRequest {
                namespace: ns.into(),
                ..Default::default()
            })
            .await
            .expect_err("list another namespace");
        denied(e);
        let e = a
            .watch(WatchRequest {
                namespace: ns.into(),
                ..Default::default()
            })
            .await;
        match e {
            Err(e) => denied(e),
            Ok(_) => panic!("a watch of namespace {ns:?} opened"),
        };
    }
    let listed = a
        .list_namespaces(ListNamespacesRequest::default())
        .await
        .expect("list namespaces");
    let names: Vec<&str> = listed.namespaces.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["team-a"], "only the token's own");
    let all = admin
        .list_namespaces(ListNamespacesRequest::default())
        .await
        .expect("admin lists");
    let counts: Vec<(&str, u64, u64)> = all
        .namespaces
        .iter()
        .map(|n| (n.name.as_str(), n.instances, n.services))
        .collect();
    let quotas: Vec<u64> = all
        .namespaces
        .iter()
        .map(|n| n.quotas.as_ref().map_or(0, |q| q.max_sessions))
        .collect();
    assert_eq!(quotas, [0, 1, 1]);
    assert_eq!(
        counts,
        [("default", 1, 1), ("team-a", 2, 2), ("team-b", 1, 1)]
    );

    // An admin is told a namespace does not exist, by name.
    let e = admin
        .get_service(get_in("nope", "web"))
        .await
        .expect_err("no such namespace");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("\"nope\""), "{e:?}");
    let e = admin
        .get_service(get_in("Not_A_Label", "web"))
        .await
        .expect_err("bad name");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("namespace"), "{e:?}");
}

#[tokio::test]
async fn watches_keep_to_their_namespace() {
    let c = TestCluster::start(3).await;
    let client = c.client();
    create_ns(&client, "team-a", 0, 0).await;
    // Watching every service of `default` (an old client's watch).
    let mut all = client
        .watch(WatchRequest::default())
        .await
        .expect("watch default");
    let first = all.message().await.expect("initial").expect("a message");
    assert!(first.instances.is_empty(), "{first:?}");
    let mut in_a = client
        .watch(WatchRequest {
            namespace: "team-a".into(),
            ..Default::default()
        })
        .await
        .expect("watch team-a");
    in_a.message().await.expect("initial").expect("a message");
    client
        .register(reg_in("team-a", "web", "a-1"))
        .await
        .expect("register in team-a");
    client
        .register(reg_in("", "web", "d-1"))
        .await
        .expect("register in default");
    // Each stream's first event is its own namespace's.
    let mut seen = Vec::new();
    for stream in [&mut all, &mut in_a] {
        let m = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("an event in time")
            .expect("no error")
            .expect("a message");
        let i = m.events[0].instance.as_ref().expect("instance");
        seen.push((i.namespace.clone(), i.id.clone()));
    }
    assert_eq!(
        seen,
        [
            (String::new(), "d-1".to_string()),
            ("team-a".to_string(), "a-1".to_string())
        ]
    );

    // One WatchServices stream follows `web` of two namespaces, told apart.
    let adds = ["team-a", ""]
        .map(|ns| WatchServicesRequest::add_in(ns, "web", 0))
        .to_vec();
    let (_more, mut mux) = client.watch_services(adds).await.expect("mux");
    let mut got = Vec::new();
    while got.len() < 2 {
        let r = mux.message().await.expect("no error").expect("a response");
        let Some(MuxResult::Update(u)) = r.result else {
            panic!("an update: {r:?}");
        };
        let ids: Vec<String> = u.instances.iter().map(|i| i.id.clone()).collect();
        got.push((r.namespace, r.service, ids));
    }
    got.sort();
    assert_eq!(
        got,
        [
            (String::new(), "web".to_string(), vec!["d-1".to_string()]),
            (
                "team-a".to_string(),
                "web".to_string(),
                vec!["a-1".to_string()]
            ),
        ]
    );
}

#[tokio::test]
async fn quotas_refuse_what_would_pass_them_and_a_namespace_with_instances_needs_force() {
    let c = TestCluster::start(3).await;
    let client = c.client();
    create_ns(&client, "q", 3, 1).await;
    for id in ["1", "2"] {
        client
            .register(reg_in("q", "web", id))
            .await
            .expect("in quota");
    }
    let exhausted = |e: roster::client::Error, quota: &str| {
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        let m = e.message();
        assert!(m.contains("\"q\"") && m.contains(quota), "{m}");
    };
    exhausted(
        client
            .register(reg_in("q", "api", "1"))
            .await
            .expect_err("over"),
        "max_services = 1",
    );
    client
        .register(reg_in("q", "web", "3"))
        .await
        .expect("third");
    exhausted(
        client
            .register(reg_in("q", "web", "4"))
            .await
            .expect_err("over"),
        "max_instances = 3",
    );
    // Nothing changed; raising the quota lets the write in.
    assert_eq!(held(&client, "q", "web").await.len(), 3);
    assert!(held(&client, "q", "api").await.is_empty());
    create_ns(&client, "q", 4, 1).await;
    client
        .register(reg_in("q", "web", "4"))
        .await
        .expect("room now");

    // A namespace holding instances goes only with force; its watchers see them go.
    let mut watch = client
        .watch(WatchRequest {
            service: "web".into(),
            namespace: "q".into(),
            ..Default::default()
        })
        .await
        .expect("watch");
    let first = watch.message().await.expect("initial").expect("a message");
    assert_eq!(first.instances.len(), 4);
    let delete = |force| DeleteNamespaceRequest {
        name: "q".into(),
        force,
    };
    let e = client
        .delete_namespace(delete(false))
        .await
        .expect_err("not empty");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("4 instances"), "{e:?}");
    let r = client.delete_namespace(delete(true)).await.expect("forced");
    assert_eq!(r.instances, 4);
    let m = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("the deletes in time")
        .expect("no error")
        .expect("a message");
    assert_eq!(m.events.len(), 4);
    assert!(m
        .events
        .iter()
        .all(|e| e.r#type == EventType::Delete as i32));
    let e = client
        .get_service(get_in("q", "web"))
        .await
        .expect_err("gone");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = client
        .delete_namespace(delete(true))
        .await
        .expect_err("again");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = client
        .delete_namespace(DeleteNamespaceRequest {
            name: "default".into(),
            force: true,
        })
        .await
        .expect_err("default stays");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
}

/// The fixture written by the previous version (tests/fixtures/format5).
fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/format5")
        .join(name)
}

/// What the previous version stored is `default`'s, and namespaces can be
/// added beside it.
async fn holds_the_fixture_in_default(c: &TestCluster, ids: &[&str]) {
    let client = c.client();
    let got: Vec<String> = client
        .get_service(get_in("", "web"))
        .await
        .expect("web")
        .instances
        .into_iter()
        .map(|i| {
            assert!(i.namespace.is_empty(), "{i:?}");
            i.id
        })
        .collect();
    assert_eq!(got, ids);
    let listed = client
        .list_namespaces(ListNamespacesRequest::default())
        .await
        .expect("namespaces");
    let names: Vec<&str> = listed.namespaces.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["default"]);
    create_ns(&client, "team-a", 1, 1).await;
    client
        .register(reg_in("team-a", "web", "w-1"))
        .await
        .expect("a namespace beside the old data");
    assert_eq!(held(&client, "", "web").await.len(), ids.len());
}

#[tokio::test]
async fn a_backup_of_the_previous_version_restores_into_default() {
    let setup = Setup {
        restore_from: Some(fixture("backup.snap")),
        ..Setup::default()
    };
    let c = TestCluster::start_setup(3, "", setup)
        .await
        .expect("a cluster from the old backup");
    holds_the_fixture_in_default(&c, &["w-1", "w-2"]).await;
}

#[tokio::test]
async fn a_data_directory_of_the_previous_version_starts_and_keeps_its_data() {
    let setup = Setup {
        data_dir_from: Some(fixture("data")),
        ..Setup::default()
    };
    let c = TestCluster::start_setup(1, "", setup)
        .await
        .expect("a node on the old data directory");
    holds_the_fixture_in_default(&c, &["w-1", "w-2"]).await;
    let api = held(&c.client(), "", "api").await;
    assert_eq!(
        api,
        [named("", "api", "a-1")],
        "the log's tail after the backup"
    );
    // The settings came along: the protection threshold of 50%.
    let before = c
        .client()
        .get_service(get_in("", "web"))
        .await
        .expect("web");
    assert!(!before.protection_active);
}

/// A session belongs to a namespace: it holds that namespace's instances
/// only, is listed and closed there, counts against its quota, and ends
/// with it.
#[tokio::test]
async fn sessions_live_in_a_namespace() {
    let c = TestCluster::start(3).await;
    let client = c.client();
    create_ns(&client, "q", 0, 0).await;
    let open = |ns: &str| CreateSessionRequest {
        name: "holder".into(),
        ttl_ms: 60_000,
        namespace: ns.into(),
        ..Default::default()
    };
    let s = client
        .create_session(open("q"))
        .await
        .expect("a session in q")
        .session
        .expect("session");
    assert_eq!(s.namespace, "q");
    let e = client.create_session(open("q")).await.expect_err("quota");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("max_sessions = 1"), "{e:?}");
    let under = |ns: &str, id: &str| RegisterRequest {
        session: s.id.clone(),
        ..reg_in(ns, "web", id)
    };
    client
        .register(under("q", "w-1"))
        .await
        .expect("in its namespace");
    let e = client
        .register(under("", "w-2"))
        .await
        .expect_err("default");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let list = |ns: &str| ListSessionsRequest {
        namespace: ns.into(),
        ..Default::default()
    };
    let in_q = client.list_sessions(list("q")).await.expect("list q");
    assert_eq!(in_q.sessions.len(), 1);
    assert_eq!(in_q.sessions[0].instances, 1);
    let in_default = client.list_sessions(list("")).await.expect("list default");
    assert!(in_default.sessions.is_empty(), "{in_default:?}");
    let e = client
        .close_session(CloseSessionRequest {
            id: s.id.clone(),
            namespace: String::new(),
        })
        .await
        .expect_err("not default's");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    // Deleting the namespace ends its sessions in the same entry.
    client
        .delete_namespace(DeleteNamespaceRequest {
            name: "q".into(),
            force: true,
        })
        .await
        .expect("forced");
    create_ns(&client, "q", 0, 0).await;
    let again = client.list_sessions(list("q")).await.expect("list q again");
    assert!(again.sessions.is_empty(), "{again:?}");
    client.create_session(open("q")).await.expect("room again");
}

/// A namespace's watch-stream quota counts the streams on each node that
/// follow it; a stream's place is freed when it ends.
#[tokio::test]
async fn watch_streams_of_a_namespace_are_within_its_quota_on_each_node() {
    let c = TestCluster::start(3).await;
    let leader = c.leader().await;
    let client = c.node_client(leader);
    client
        .create_namespace(CreateNamespaceRequest {
            name: "w".into(),
            quotas: Some(NamespaceQuotas {
                max_watch_streams: 1,
                ..Default::default()
            }),
        })
        .await
        .expect("namespace");
    let watch_w = || WatchRequest {
        service: "web".into(),
        namespace: "w".into(),
        ..Default::default()
    };
    let first = client.watch(watch_w()).await.expect("the first stream");
    match client.watch(watch_w()).await {
        Ok(_) => panic!("a second stream in w on one node"),
        Err(e) => {
            assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
            assert!(e.message().contains("max_watch_streams = 1"), "{e:?}");
        }
    }
    // On a WatchServices stream, the add in w alone is refused.
    let adds = ["w", ""]
        .map(|ns| WatchServicesRequest::add_in(ns, "web", 0))
        .to_vec();
    let (_more, mut mux) = client.watch_services(adds).await.expect("mux");
    let mut answers = Vec::new();
    while answers.len() < 2 {
        let r = mux.message().await.expect("no error").expect("a response");
        let ended = match r.result {
            Some(MuxResult::Ended(e)) => Some(e.code),
            _ => None,
        };
        answers.push((r.namespace, ended));
    }
    answers.sort();
    assert_eq!(
        answers,
        [
            (String::new(), None),
            ("w".to_string(), Some(tonic::Code::ResourceExhausted as i32))
        ]
    );
    // Another node counts its own streams.
    let other = (1..=3).find(|&i| i != leader).expect("a follower");
    let _there = c
        .node_client(other)
        .watch(watch_w())
        .await
        .expect("on another node");
    drop(first);
    c.wait_for(
        "the first stream's place freed",
        Duration::from_secs(10),
        || async { client.watch(watch_w()).await.ok() },
    )
    .await;
}

/// The leader checks a namespace's instances like `default`'s, and a
/// protection threshold set in one namespace guards that namespace's service
/// only: the same name in `default` is not protected.
#[tokio::test]
async fn health_checks_and_protection_thresholds_keep_to_their_namespace() {
    let c = TestCluster::start(3).await;
    let client = c.client();
    create_ns(&client, "team-a", 0, 0).await;
    let live = Target::start(Kind::Tcp).await;
    let (_held, dead) = refusing_port();
    let checked = |ns: &str, port: u32| RegisterRequest {
        instance: Some(Instance {
            check: Some(HealthCheck {
                kind: Some(health_check::Kind::Tcp(TcpCheck { port: 0 })),
                interval_ms: 200,
                timeout_ms: 200,
                failures_before_critical: 1,
                successes_before_passing: 1,
                deregister_after_ms: 0,
            }),
            address: "127.0.0.1".into(),
            ..instance("web", "w-1", port)
        }),
        namespace: ns.into(),
        ..Default::default()
    };
    // The same service and id in both: team-a's points at a refusing port.
    client
        .register(checked("team-a", dead))
        .await
        .expect("team-a's w-1");
    client
        .register(checked("", live.port()))
        .await
        .expect("default's w-1");
    for ns in ["team-a", ""] {
        client
            .register(reg_in(ns, "web", "w-2"))
            .await
            .expect("w-2");
    }
    client
        .configure_service(ConfigureServiceRequest {
            namespace: "team-a".into(),
            service: "web".into(),
            protect_threshold_percent: 60,
        })
        .await
        .expect("team-a's threshold");
    let status = |ns: &'static str| {
        let client = client.clone();
        async move {
            let r = client.get_service(get_in(ns, "web")).await.ok()?;
            r.instances
                .into_iter()
                .find(|i| i.id == "w-1")
                .map(|i| i.status)
        }
    };
    c.wait_for("team-a's w-1 critical", Duration::from_secs(10), || {
        status("team-a").map(|s| (s == Some(HealthStatus::Critical as i32)).then_some(()))
    })
    .await;
    // Probed and passing: the two w-1 are checked apart.
    c.wait_for(
        "default's w-1 probed and passing",
        Duration::from_secs(10),
        || {
            let probed = live.probes() > 0;
            status("")
                .map(move |s| (probed && s == Some(HealthStatus::Passing as i32)).then_some(()))
        },
    )
    .await;
    let healthy = |ns: &str| GetServiceRequest {
        healthy_only: true,
        ..get_in(ns, "web")
    };
    // 1 of 2 passing is under team-a's 60%: every instance comes back.
    let a = client.get_service(healthy("team-a")).await.expect("team-a");
    assert!(a.protection_active, "{a:?}");
    assert_eq!(a.instances.len(), 2);
    let d = client.get_service(healthy("")).await.expect("default");
    assert!(!d.protection_active, "{d:?}");
    assert_eq!(d.instances.len(), 2, "both pass in default: {d:?}");
}

/// The Rust client resolves a namespace's service and keeps a session in a
/// namespace; `default` spelled out is the same as left empty.
#[tokio::test]
async fn the_rust_client_resolves_and_keeps_sessions_in_a_namespace() {
    let c = TestCluster::start(3).await;
    let client = c.client();
    create_ns(&client, "team-a", 0, 0).await;
    client
        .register(reg_in("", "web", "w-d"))
        .await
        .expect("default's");
    let kept = client
        .open_session_in(
            "team-a",
            "web-a",
            Duration::from_secs(10),
            SessionEnd::Deregister,
        )
        .await
        .expect("a session in team-a");
    // No namespace on the instance: the session's.
    kept.register(instance("web", "w-a", 80))
        .await
        .expect("under the session");
    assert_eq!(
        held(&client, "team-a", "web").await,
        [named("team-a", "web", "w-a")]
    );
    let ids = |r: &roster::client::resolver::Resolver| -> Vec<String> {
        r.current().instances.iter().map(|i| i.id.clone()).collect()
    };
    let mut in_a = client.resolve_in("team-a", "web");
    let mut in_default = client.resolve_in("default", "web");
    let mut plain = client.resolve("web");
    for r in [&mut in_a, &mut in_default, &mut plain] {
        assert!(r.ready(Duration::from_secs(10)).await);
    }
    assert_eq!(ids(&in_a), ["w-a"]);
    assert_eq!(ids(&in_default), ["w-d"]);
    assert_eq!(ids(&plain), ["w-d"]);
    kept.deregister("web", "w-a")
        .await
        .expect("deregister in team-a");
    c.wait_for(
        "team-a's resolver empty",
        Duration::from_secs(10),
        || async { in_a.current().instances.is_empty().then_some(()) },
    )
    .await;
    assert_eq!(ids(&plain), ["w-d"]);
    kept.close().await.expect("close in team-a");
    let left = client
        .list_sessions(ListSessionsRequest {
            namespace: "team-a".into(),
            ..Default::default()
        })
        .await
        .expect("list");
    assert!(left.sessions.is_empty(), "{left:?}");
}
