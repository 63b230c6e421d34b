//! Watch streams against a real cluster: order, resume, resync.

mod common;

use std::time::Duration;

use common::*;
use roster::client::RosterClient;
use roster::proto::v1::*;
use tonic::Streaming;

async fn next(s: &mut Streaming<WatchResponse>) -> WatchResponse {
    tokio::time::timeout(Duration::from_secs(10), s.message())
        .await
        .expect("watch message within 10 s")
        .expect("watch stream healthy")
        .expect("watch stream open")
}

/// Collects (type, id, revision) of events until `n` have arrived.
async fn events(s: &mut Streaming<WatchResponse>, n: usize) -> Vec<(i32, String, u64)> {
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
            service: "api".into(),
            since_revision: first + 1,
        })
        .await
        .expect("watch after restart");
    let m = next(&mut s).await;
    assert_eq!(m.reset, ResetReason::Compacted as i32);
    assert_eq!(m.instances.len(), 10);
}
