//! Watch streams against a real cluster: order, resume, resync.

use std::time::Duration;

use crate::common::*;
use roster::client::RosterClient;
use roster::client::WatchStream;
use roster::proto::v1::*;

async fn next(s: &mut WatchStream<WatchResponse>) -> WatchResponse {
    tokio::time::timeout(Duration::from_secs(10), s.message())
        .await
        .expect("watch message within 10 s")
        .expect("watch stream healthy")
        .expect("watch stream open")
}

/// Collects (type, id, revision) of events until `n` have arrived.
async fn events(s: &mut WatchStream<WatchResponse>, n: usize) -> Vec<(i32, String, u64)> {
    let mut out = Vec::new();
    while out.len() < n {
        let m = next(s).await;
        assert_eq!(
            m.reset,
            ResetReason::Unspecified as i32,
            "unexpected reset: {m:?}"
        );
        for e in m.events {
            assert_eq!(e.revision, m.revision);
            out.push((e.r#type, e.instance.expect("event instance").id, e.revision));
        }
    }
    out
}

async fn deregister(c: &RosterClient, service: &str, id: &str) -> u64 {
    c.deregister(DeregisterRequest {
        namespace: Default::default(),
        service: service.into(),
        id: id.into(),
    })
    .await
    .expect("deregister")
    .revision
}

const PUT: i32 = EventType::Put as i32;
const DELETE: i32 = EventType::Delete as i32;

#[tokio::test]
async fn watch_streams_changes_in_order_and_resumes_without_gaps_or_duplicates() {
    let c = TestCluster::start(3).await;
    let client = c.client();
    register(&client, "web", "w-0", 80).await;
    register(&client, "other", "x", 80).await;

    // Watch through a follower: nodes other than the leader serve watches too.
    let leader = c.leader().await;
    let follower = (1..=3).find(|&i| i != leader).expect("a follower");
    let watcher = c.node_client(follower);
    let mut s = watcher
        .watch(WatchRequest {
            namespace: Default::default(),
            service: "web".into(),
            since_revision: 0,
        })
        .await
        .expect("watch");
    let first = next(&mut s).await;
    assert_eq!(first.reset, ResetReason::Initial as i32);
    assert_eq!(
        first.instances.len(),
        1,
        "initial state holds only the watched service"
    );
    assert_eq!(first.instances[0].id, "w-0");

    let r1 = register(&client, "web", "w-1", 81).await.revision;
    register(&client, "other", "y", 80).await; // another service: not seen
    let r2 = register(&client, "web", "w-2", 82).await.revision;
    let r3 = deregister(&client, "web", "w-1").await;
    let got = events(&mut s, 3).await;
    assert_eq!(
        got,
        vec![
            (PUT, "w-1".into(), r1),
            (PUT, "w-2".into(), r2),
            (DELETE, "w-1".into(), r3)
        ]
    );
    assert!(first.revision < r1 && r1 < r2 && r2 < r3);
    drop(s);

    // Changes while disconnected, then resume from the last revision seen.
    let r4 = register(&client, "web", "w-3", 83).await.revision;
    let r5 = deregister(&client, "web", "w-0").await;
    let mut s = c
        .node_client(leader)
        .watch(WatchRequest {
            namespace: Default::default(),
            service: "web".into(),
            since_revision: r3,
        })
        .await
        .expect("resume watch");
    assert_eq!(
        events(&mut s, 2).await,
        vec![(PUT, "w-3".into(), r4), (DELETE, "w-0".into(), r5)]
    );
    let r6 = register(&client, "web", "w-4", 84).await.revision;
    assert_eq!(
        events(&mut s, 1).await,
        vec![(PUT, "w-4".into(), r6)],
        "no duplicate after the live switch"
    );

    // A watch on every service sees both.
    let mut all = client
        .watch(WatchRequest {
            namespace: Default::default(),
            service: String::new(),
            since_revision: r6,
        })
        .await
        .expect("watch all");
    let a = register(&client, "other", "z", 80).await.revision;
    let b = register(&client, "web", "w-5", 85).await.revision;
    assert_eq!(
        events(&mut all, 2).await,
        vec![(PUT, "z".into(), a), (PUT, "w-5".into(), b)]
    );
}

#[tokio::test]
async fn compacted_revision_gets_a_resync_with_full_state() {
    let mut c = TestCluster::start_with(3, "watch_history = 4").await;
    let client = c.client();
    let first = register(&client, "api", "a-0", 80).await.revision;
    for i in 1..10 {
        register(&client, "api", &format!("a-{i}"), 80).await;
    }
    let last = deregister(&client, "api", "a-0").await;
    let leader = c.leader().await;
    c.wait_applied(leader, last).await;

    let mut s = c
        .node_client(leader)
        .watch(WatchRequest {
            namespace: Default::default(),
            service: "api".into(),
            since_revision: first,
        })
        .await
        .expect("watch");
    let m = next(&mut s).await;
    assert_eq!(
        m.reset,
        ResetReason::Compacted as i32,
        "expected a resync, got {m:?}"
    );
    assert!(m.compact_revision > first);
    assert_eq!(m.revision, last.max(m.revision));
    let mut got: Vec<String> = m.instances.into_iter().map(|i| i.id).collect();
    got.sort();
    let want: Vec<String> = (1..10).map(|i| format!("a-{i}")).collect();
    assert_eq!(got, want);
    // After the resync the stream carries on live.
    let r = register(&client, "api", "a-10", 80).await.revision;
    assert_eq!(events(&mut s, 1).await, vec![(PUT, "a-10".into(), r)]);
    drop(s);

    // A restarted node keeps only the changes it re-applied from its log: an older revision means resync.
    let follower = (1..=3).find(|&i| i != leader).expect("a follower");
    c.kill(follower);
    c.start_node(follower);
    c.wait_applied(follower, r).await;
    let mut s = c
        .node_client(follower)
        .watch(WatchRequest {
            namespace: Default::default(),
            service: "api".into(),
            since_revision: first + 1,
        })
        .await
        .expect("watch after restart");
    let m = next(&mut s).await;
    assert_eq!(m.reset, ResetReason::Compacted as i32);
    assert_eq!(m.instances.len(), 10);
}

/// The `roster_watch_streams` gauge of node `id`.
async fn watch_streams(c: &TestCluster, id: u64) -> u64 {
    let body = c.scrape(id).await;
    body.lines()
        .find_map(|l| l.strip_prefix("roster_watch_streams "))
        .and_then(|v| v.trim().parse().ok())
        .expect("roster_watch_streams in the metrics")
}

async fn next_mux(
    s: &mut WatchStream<WatchServicesResponse>,
) -> (String, watch_services_response::Result) {
    let m = tokio::time::timeout(Duration::from_secs(10), s.message())
        .await
        .expect("message within 10 s")
        .expect("stream healthy")
        .expect("stream open");
    (m.service, m.result.expect("a result"))
}

fn update(r: watch_services_response::Result) -> WatchResponse {
    match r {
        watch_services_response::Result::Update(u) => u,
        other => panic!("expected an update, got {other:?}"),
    }
}

fn ended(r: watch_services_response::Result) -> WatchEnded {
    match r {
        watch_services_response::Result::Ended(e) => e,
        other => panic!("expected an end, got {other:?}"),
    }
}

#[tokio::test]
async fn one_stream_follows_500_services_added_and_removed_while_open() {
    use futures::StreamExt;
    let c = TestCluster::start(3).await;
    let client = c.client();
    let names: Vec<String> = (0..500).map(|i| format!("svc-{i}")).collect();
    futures::stream::iter(&names)
        .for_each_concurrent(32, |s| {
            let client = &client;
            async move {
                register(client, s, &format!("{s}-0"), 80).await;
            }
        })
        .await;

    let leader = c.leader().await;
    let follower = (1..=3).find(|&i| i != leader).expect("a follower");
    let before = watch_streams(&c, follower).await;
    let (tx, mut s) = c
        .node_client(follower)
        .watch_services(
            names
                .iter()
                .map(|n| WatchServicesRequest::add(n, 0))
                .collect(),
        )
        .await
        .expect("watch_services");
    // Each service's full state, holding every write acknowledged before.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..names.len() {
        let (service, r) = next_mux(&mut s).await;
        let u = update(r);
        assert_eq!(u.reset, ResetReason::Initial as i32, "{service}");
        let ids: Vec<&str> = u.instances.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, [format!("{service}-0")]);
        assert!(seen.insert(service), "one initial state per service");
    }
    assert_eq!(seen.len(), 500);
    assert_eq!(
        watch_streams(&c, follower).await,
        before + 1,
        "500 services, one stream"
    );

    // Changes reach exactly the services they touch, in revision order.
    let r1 = register(&client, "svc-7", "svc-7-1", 81).await.revision;
    register(&client, "unwatched", "u", 80).await;
    let r2 = deregister(&client, "svc-321", "svc-321-0").await;
    let (service, r) = next_mux(&mut s).await;
    let u = update(r);
    assert_eq!((service.as_str(), u.revision), ("svc-7", r1));
    assert_eq!(u.events[0].r#type, PUT);
    let (service, r) = next_mux(&mut s).await;
    let u = update(r);
    assert_eq!((service.as_str(), u.revision), ("svc-321", r2));
    assert_eq!(u.events[0].r#type, DELETE);

    // Removed: acknowledged, and its later changes are not sent.
    tx.unbounded_send(WatchServicesRequest::remove("svc-7"))
        .expect("send");
    let (service, r) = next_mux(&mut s).await;
    assert_eq!((service.as_str(), ended(r).code), ("svc-7", 0));
    register(&client, "svc-7", "svc-7-2", 82).await;
    let r3 = register(&client, "svc-8", "svc-8-1", 81).await.revision;
    let (service, r) = next_mux(&mut s).await;
    assert_eq!((service.as_str(), update(r).revision), ("svc-8", r3));

    // Added again later, resuming from a revision it saw: exactly what it missed.
    tx.unbounded_send(WatchServicesRequest::add("svc-7", r1))
        .expect("send");
    let (service, r) = next_mux(&mut s).await;
    let u = update(r);
    assert_eq!(service, "svc-7");
    assert_eq!(u.reset, ResetReason::Unspecified as i32);
    let ids: Vec<String> = u
        .events
        .iter()
        .map(|e| e.instance.clone().expect("instance").id)
        .collect();
    assert_eq!(ids, ["svc-7-2"]);

    // Refused adds are answered for that service alone; the stream goes on.
    for bad in [
        WatchServicesRequest::add("", 0),
        WatchServicesRequest::add("Not A Name!", 0),
        WatchServicesRequest::add("svc-9", r3 + 1_000_000),
    ] {
        tx.unbounded_send(bad).expect("send");
    }
    let mut codes = Vec::new();
    for _ in 0..3 {
        let (service, r) = next_mux(&mut s).await;
        let e = ended(r);
        assert!(!e.message.is_empty(), "a refusal says why");
        codes.push((service, tonic::Code::from_i32(e.code)));
    }
    assert_eq!(
        codes,
        [
            (String::new(), tonic::Code::InvalidArgument),
            ("Not A Name!".to_string(), tonic::Code::InvalidArgument),
            ("svc-9".to_string(), tonic::Code::OutOfRange),
        ]
    );
    // svc-9 was followed before its refused re-add; the refusal ended it.
    register(&client, "svc-9", "svc-9-1", 81).await;
    let r4 = register(&client, "svc-10", "svc-10-1", 81).await.revision;
    let (service, r) = next_mux(&mut s).await;
    assert_eq!((service.as_str(), update(r).revision), ("svc-10", r4));
}

#[tokio::test]
async fn resolvers_of_one_client_share_one_stream() {
    let c = TestCluster::start(3).await;
    let writer = c.client();
    for i in 0..20 {
        register(&writer, &format!("api-{i}"), "a-0", 80).await;
    }
    let leader = c.leader().await;
    let follower = (1..=3).find(|&i| i != leader).expect("a follower");
    let before = watch_streams(&c, follower).await;
    let client = std::sync::Arc::new(c.node_client(follower));
    let mut resolvers = Vec::new();
    for i in 0..20 {
        let mut r = client.resolve(&format!("api-{i}"));
        assert!(r.ready(Duration::from_secs(10)).await, "api-{i} resolved");
        assert_eq!(r.current().instances.len(), 1);
        resolvers.push(r);
    }
    assert_eq!(watch_streams(&c, follower).await, before + 1);

    // Two resolvers of one service share its entry; dropping one keeps the other.
    let mut twin = client.resolve("api-0");
    assert!(twin.ready(Duration::from_secs(10)).await);
    let kept = resolvers.remove(0);
    drop(resolvers.drain(..10).collect::<Vec<_>>());
    register(&writer, "api-0", "a-1", 81).await;
    register(&writer, "api-15", "a-1", 81).await;
    for r in [&mut twin, &mut resolvers[4]] {
        let set = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let set = r.changed().await;
                if set.instances.len() == 2 {
                    return set;
                }
            }
        })
        .await
        .expect("the change arrives");
        assert_eq!(set.instances[1].id, "a-1");
    }
    assert_eq!(kept.current().instances.len(), 2);
    assert_eq!(watch_streams(&c, follower).await, before + 1);
}

/// A stopping node ends its watch streams (followed or not yet following
/// anything), so that clients resume on another node and the node exits.
#[tokio::test]
async fn a_stopping_node_ends_its_watch_streams() {
    let mut c = TestCluster::start(3).await;
    let node = 2;
    let client = c.node_client(node);
    let mut watch = client
        .watch(WatchRequest {
            namespace: Default::default(),
            service: "web".into(),
            since_revision: 0,
        })
        .await
        .expect("watch");
    next(&mut watch).await;
    let (_adds, mut mux) = client
        .watch_services(vec![WatchServicesRequest::add("web", 0)])
        .await
        .expect("watch services");
    mux.message()
        .await
        .expect("mux healthy")
        .expect("the initial state");
    let (_none, mut idle) = client.watch_services(vec![]).await.expect("an idle stream");
    c.signal(node, "TERM");
    let limit = Duration::from_secs(10);
    let watch_ended = tokio::time::timeout(limit, watch.message()).await;
    assert!(
        matches!(watch_ended, Ok(Ok(None) | Err(_))),
        "Watch: {watch_ended:?}"
    );
    for (name, s) in [
        ("WatchServices", &mut mux),
        ("idle WatchServices", &mut idle),
    ] {
        let ended = tokio::time::timeout(limit, s.message()).await;
        assert!(matches!(ended, Ok(Ok(None) | Err(_))), "{name}: {ended:?}");
    }
    let status = c.wait_exit(node, Duration::from_secs(20)).await;
    assert!(status.success(), "node {node} exited with {status}");
}
