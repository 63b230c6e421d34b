//! The client library against a real 3-node registry: balancing that follows
//! health, keep-alive across a leader failover, and resolver reconnects.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::targets::{Kind, Target};
use crate::common::*;
use roster::client::RosterClient;
use roster::proto::echo::echo_client::EchoClient;
use roster::proto::echo::EchoRequest;
use roster::proto::v1::*;

fn echo_instance(t: &Target, check: Option<HealthCheck>) -> Instance {
    Instance {
        service: "echo".into(),
        id: t.name.clone(),
        address: "127.0.0.1".into(),
        port: t.port(),
        check,
        ..Default::default()
    }
}

/// Who answers `n` calls through `rpc`; failed calls count under "error".
async fn spread(
    rpc: &mut EchoClient<tonic::transport::Channel>,
    n: usize,
) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for _ in 0..n {
        let who = match rpc
            .say(EchoRequest {
                message: "hi".into(),
            })
            .await
        {
            Ok(r) => r.into_inner().instance,
            Err(_) => "error".to_string(),
        };
        *m.entry(who).or_default() += 1;
    }
    m
}

fn healthy_ids(r: &roster::client::resolver::Resolver) -> Vec<String> {
    r.current().instances.iter().map(|i| i.id.clone()).collect()
}

#[tokio::test]
async fn balanced_channel_follows_health_and_deregistration() {
    let c = TestCluster::start(3).await;
    let client = c.client();
    let mut nodes = Vec::new();
    for name in ["e1", "e2", "e3"] {
        let n = Target::start_named(Kind::Echo, name).await;
        let check = HealthCheck {
            kind: Some(health_check::Kind::Grpc(GrpcCheck::default())),
            interval_ms: 200,
            timeout_ms: 150,
            failures_before_critical: 2,
            successes_before_passing: 1,
            deregister_after_ms: 0,
        };
        client
            .register(RegisterRequest {
                instance: Some(echo_instance(&n, Some(check))),
                ..Default::default()
            })
            .await
            .expect("register");
        nodes.push(n);
    }
    let mut resolver = client.resolve("echo");
    assert!(resolver.ready(Duration::from_secs(5)).await);
    let mut rpc = EchoClient::new(resolver.balanced_channel());
    let all = c
        .wait_for("calls to reach all three", Duration::from_secs(10), || {
            let mut rpc = rpc.clone();
            async move {
                let s = spread(&mut rpc, 60).await;
                (s.len() == 3 && !s.contains_key("error")).then_some(s)
            }
        })
        .await;
    assert!(all.values().all(|&n| n >= 5), "{all:?}");

    // Stop e1: once the registry marks it critical, it gets no more calls.
    nodes[0].stop();
    c.wait_for(
        "e1 to leave the resolved set",
        Duration::from_secs(10),
        || async { (!healthy_ids(&resolver).contains(&"e1".to_string())).then_some(()) },
    )
    .await;
    // The channel applies the resolver's change on its own task: wait until
    // calls avoid e1, then check that they keep doing so.
    c.wait_for("calls to avoid e1", Duration::from_secs(5), || {
        let mut rpc = rpc.clone();
        async move {
            let s = spread(&mut rpc, 30).await;
            (s.keys().map(String::as_str).collect::<Vec<_>>() == ["e2", "e3"]).then_some(())
        }
    })
    .await;
    let after = spread(&mut rpc, 60).await;
    assert_eq!(
        after.keys().cloned().collect::<Vec<_>>(),
        vec!["e2", "e3"],
        "{after:?}"
    );

    // Back up: passing again, and calls return to it.
    nodes[0].restart().await;
    c.wait_for("calls to reach e1 again", Duration::from_secs(10), || {
        let mut rpc = rpc.clone();
        async move { spread(&mut rpc, 30).await.contains_key("e1").then_some(()) }
    })
    .await;

    // Deregistered (its server still runs): after the watch event, never called.
    client
        .deregister(DeregisterRequest {
            namespace: Default::default(),
            service: "echo".into(),
            id: "e2".into(),
        })
        .await
        .expect("deregister");
    let set = c
        .wait_for(
            "e2 to leave the resolved set",
            Duration::from_secs(5),
            || async {
                let ids = healthy_ids(&resolver);
                (!ids.contains(&"e2".to_string())).then_some(ids)
            },
        )
        .await;
    assert_eq!(set, vec!["e1", "e3"]);
    c.wait_for("calls to avoid e2", Duration::from_secs(5), || {
        let mut rpc = rpc.clone();
        async move { (!spread(&mut rpc, 30).await.contains_key("e2")).then_some(()) }
    })
    .await;
    let last = spread(&mut rpc, 100).await;
    assert!(
        !last.contains_key("e2"),
        "a deregistered instance was called: {last:?}"
    );
}

#[tokio::test]
async fn writes_go_to_the_leader_and_follow_it_after_a_kill() {
    let mut c = TestCluster::start(3).await;
    let leader = c.leader().await;
    // Followers first: the first write lands on one and is forwarded.
    let mut order: Vec<u64> = (1..=3).filter(|&i| i != leader).collect();
    order.push(leader);
    let client = c.client_to(&order.iter().map(|&i| c.endpoint(i)).collect::<Vec<_>>());
    for i in 0..3 {
        register(&client, "w", &format!("w{i}"), 1000 + i).await;
    }
    assert_eq!(client.write_endpoint(), c.endpoint(leader));
    // Reads stay on the node they started on.
    client
        .get_service(get_req("w", Consistency::Stale))
        .await
        .expect("read");
    assert_eq!(client.current_endpoint(), c.endpoint(order[0]));

    c.kill(leader);
    let new = c.leader().await;
    for i in 3..6 {
        register(&client, "w", &format!("w{i}"), 1000 + i).await;
    }
    assert_eq!(client.write_endpoint(), c.endpoint(new));
    assert_eq!(ids(&client, "w", Consistency::Linearizable).await.len(), 6);
}

#[tokio::test]
async fn keepalive_registration_stays_passing_through_a_leader_kill() {
    let mut c = TestCluster::start(3).await;
    let client = c.client();
    let node = Target::start_named(Kind::Echo, "ka").await;
    let registration = client
        .register_with_keepalive(echo_instance(&node, None), Duration::from_millis(1500))
        .await
        .expect("register");
    let old = c.leader().await;
    // Watched on a node that survives the kill, so the stream spans the failover.
    let survivor = if old == 1 { 2 } else { 1 };
    let mut stream = c
        .node_client(survivor)
        .watch(WatchRequest {
            namespace: Default::default(),
            service: "echo".into(),
            since_revision: 0,
        })
        .await
        .expect("watch");
    let (synced, initial) = tokio::sync::oneshot::channel();
    let critical = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = critical.clone();
    let watcher = tokio::spawn(async move {
        let mut synced = Some(synced);
        while let Ok(Some(m)) = stream.message().await {
            if let Some(s) = synced.take() {
                let _ = s.send(m.instances);
            }
            if m.events.iter().any(|e| {
                e.instance
                    .as_ref()
                    .is_some_and(|i| i.status == HealthStatus::Critical as i32)
            }) {
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });
    // Once the watcher holds the full state, every later change reaches it.
    let initial = tokio::time::timeout(Duration::from_secs(10), initial)
        .await
        .expect("the watch's initial state")
        .expect("watcher running");
    assert_eq!(initial.len(), 1);
    assert_eq!(initial[0].status, HealthStatus::Passing as i32);
    c.kill(old);
    c.leader().await;
    // Several TTLs after the failover it has never read critical: a fixed
    // window, since that nothing happens within it is the assertion.
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        let i = c
            .client()
            .get_service(get_req("echo", Consistency::Linearizable))
            .await
            .expect("read")
            .instances;
        assert_eq!(i.len(), 1);
        assert_eq!(
            i[0].status,
            HealthStatus::Passing as i32,
            "went {:?}: {}",
            i[0].status,
            i[0].check_output
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        !critical.load(std::sync::atomic::Ordering::SeqCst),
        "a watcher saw it critical"
    );
    assert!(
        !watcher.is_finished(),
        "the watch ended during the failover"
    );
    registration.shutdown().await.expect("shutdown");
    assert!(
        ids(&c.client(), "echo", Consistency::Linearizable)
            .await
            .is_empty(),
        "shutdown deregisters"
    );
    watcher.abort();
}

#[tokio::test]
async fn resolver_moves_to_another_node_and_misses_no_change() {
    let mut c = TestCluster::start(3).await;
    let writer = c.client();
    for n in 0..5 {
        register(&writer, "payments", &format!("p-{n}"), 8000 + n).await;
    }
    // The resolver's client prefers node 1, so its watch starts there.
    let client = RosterClient::new(&c.endpoints()).expect("client");
    let mut resolver = client.resolve("payments");
    assert!(resolver.ready(Duration::from_secs(5)).await);
    assert_eq!(resolver.current().instances.len(), 5);
    assert_eq!(client.current_endpoint(), c.endpoint(1));

    c.kill(1);
    // Changes while the resolver reconnects.
    let mut last = 0;
    for n in 5..10 {
        last = register(&writer, "payments", &format!("p-{n}"), 8000 + n)
            .await
            .revision;
    }
    for n in [0, 2] {
        last = writer
            .deregister(DeregisterRequest {
                namespace: Default::default(),
                service: "payments".into(),
                id: format!("p-{n}"),
            })
            .await
            .expect("deregister")
            .revision;
    }
    let truth = ids(&writer, "payments", Consistency::Linearizable).await;
    let seen = c
        .wait_for(
            "the resolver to catch up",
            Duration::from_secs(15),
            || async {
                let cur = resolver.current();
                (cur.revision >= last).then(|| {
                    cur.instances
                        .iter()
                        .map(|i| i.id.clone())
                        .collect::<Vec<_>>()
                })
            },
        )
        .await;
    let mut seen = seen;
    seen.sort();
    assert_eq!(seen, truth);
    assert_ne!(
        client.current_endpoint(),
        c.endpoint(1),
        "the resolver moved off the dead node"
    );
}
