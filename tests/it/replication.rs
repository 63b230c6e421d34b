//! Replication and durability of a 3-node cluster of real `roster server` processes.

use std::time::{Duration, Instant};

use crate::common::*;
use roster::proto::v1::*;

#[tokio::test]
async fn write_through_follower_is_visible_on_every_node() {
    let c = TestCluster::start(3).await;
    let leader = c.leader().await;
    let follower = (1..=3).find(|&i| i != leader).expect("a follower");

    let r = register(&c.node_client(follower), "payments", "p-1", 8080).await;
    assert!(r.revision > 0);
    let inst = r.instance.expect("registered instance");
    assert_eq!(
        (inst.create_revision, inst.mod_revision),
        (r.revision, r.revision)
    );

    for id in 1..=3 {
        c.wait_applied(id, r.revision).await;
        let node = c.node_client(id);
        assert_eq!(
            ids(&node, "payments", Consistency::Stale).await,
            vec!["p-1"],
            "stale read on node {id}"
        );
        let lin = node
            .get_service(get_req("payments", Consistency::Linearizable))
            .await
            .expect("linearizable read");
        assert!(
            lin.revision >= r.revision,
            "linearizable read on node {id} is behind the write"
        );
        assert_eq!(lin.instances.len(), 1);
        assert_eq!(lin.instances[0], inst);
    }
}

#[tokio::test]
async fn leader_kill_loses_no_acknowledged_write() {
    let mut c = TestCluster::start(3).await;
    let client = c.client();
    let mut acked = Vec::new();
    for i in 0..50 {
        register(&client, "orders", &format!("o-{i}"), 9000 + i).await;
        acked.push(format!("o-{i}"));
    }
    let old = c.leader().await;
    let killed_at = Instant::now();
    c.kill(old);

    // The first write accepted after the kill measures the failover as a client sees it.
    register(&client, "orders", "after-kill", 9999).await;
    let failover = killed_at.elapsed();
    println!("failover: leader kill -> first accepted write took {failover:?}");
    assert!(failover < Duration::from_secs(10));
    acked.push("after-kill".into());

    let new = c.leader().await;
    assert_ne!(new, old);
    // The dead leader's port refused connections: the new leader campaigned
    // without waiting for its election timeout.
    assert!(
        c.log(new).contains("refuses connections"),
        "node {new} did not find leader {old} gone"
    );
    for i in 50..80 {
        register(&client, "orders", &format!("o-{i}"), 9000 + i).await;
        acked.push(format!("o-{i}"));
    }
    acked.sort();
    assert_eq!(
        ids(&client, "orders", Consistency::Linearizable).await,
        acked
    );

    // The old leader comes back as a follower and converges.
    c.start_node(old);
    let at = c.status(new).await.expect("leader status").applied_index;
    c.wait_applied(old, at).await;
    assert_eq!(
        ids(&c.node_client(old), "orders", Consistency::Stale).await,
        acked
    );
}

#[tokio::test]
async fn stopped_node_catches_up_by_snapshot_after_log_purge() {
    let mut c = TestCluster::start(3).await;
    let leader = c.leader().await;
    let down = (1..=3).find(|&i| i != leader).expect("a follower");
    c.kill(down);

    let client = c.client();
    let mut tasks = Vec::new();
    for t in 0..8 {
        let client = c.client();
        tasks.push(tokio::spawn(async move {
            let mut last = 0;
            for i in 0..125 {
                last = register(&client, "catalog", &format!("c-{t}-{i}"), 1000 + i)
                    .await
                    .revision;
            }
            last
        }));
    }
    let mut last_write = 0;
    for t in tasks {
        last_write = last_write.max(t.await.expect("writer task"));
    }

    let snap = c.snapshot_and_purge(leader).await;
    assert!(snap.snapshot_index >= last_write);
    assert!(snap.size_bytes > 0);
    let status = c.status(leader).await.expect("leader status");
    assert!(status.snapshot_index >= snap.snapshot_index);

    c.start_node(down);
    let target = c.status(leader).await.expect("leader status").applied_index;
    let caught_up = c.wait_applied(down, target).await;
    assert!(
        caught_up.snapshot_index >= snap.snapshot_index,
        "node {down} should have installed the leader's snapshot, has snapshot {}",
        caught_up.snapshot_index
    );
    let expected = ids(&client, "catalog", Consistency::Linearizable).await;
    assert_eq!(expected.len(), 1000);
    assert_eq!(
        ids(&c.node_client(down), "catalog", Consistency::Stale).await,
        expected
    );

    // And it keeps following after the snapshot.
    let r = register(&client, "catalog", "after-snapshot", 1).await;
    c.wait_applied(down, r.revision).await;
    assert_eq!(
        ids(&c.node_client(down), "catalog", Consistency::Stale)
            .await
            .len(),
        1001
    );
}

#[tokio::test]
async fn full_cluster_restart_keeps_every_acknowledged_write() {
    let mut c = TestCluster::start(3).await;
    let client = c.client();
    let mut before = Vec::new();
    for i in 0..100 {
        before.push(register(&client, "inventory", &format!("i-{i}"), 7000 + i).await);
    }
    for i in 0..10 {
        client
            .deregister(DeregisterRequest {
                namespace: Default::default(),
                service: "inventory".into(),
                id: format!("i-{i}"),
            })
            .await
            .expect("deregister");
    }
    let expected = client
        .get_service(get_req("inventory", Consistency::Linearizable))
        .await
        .expect("read before restart");
    assert_eq!(expected.instances.len(), 90);

    for id in 1..=3 {
        c.kill(id);
    }
    for id in 1..=3 {
        c.start_node(id);
    }
    c.leader().await;

    let after = client
        .get_service(get_req("inventory", Consistency::Linearizable))
        .await
        .expect("read after restart");
    // Same instances with the same revisions: nothing lost, nothing re-applied.
    assert_eq!(after.instances, expected.instances);
    assert!(after.revision >= expected.revision);
    let r = register(&client, "inventory", "new", 1).await;
    assert!(r.revision > after.revision);
}

/// Followers learn that a write committed from the leader at once, not with
/// the next write or heartbeat: their watchers and stale readers see it in
/// milliseconds. Each round is a burst of concurrent writes, then none: the
/// last entries' commit has nothing after it to ride on. Heartbeats here are
/// 2 s apart, so a follower that missed it would wait up to 2 s; the bound,
/// a quarter of that, leaves a slow machine ample room.
#[tokio::test]
async fn followers_apply_a_write_without_waiting_for_the_next_one() {
    let c = TestCluster::start_with(
        3,
        "[raft]\nheartbeat_ms = 2000\nrpc_timeout_ms = 2500\n\
         election_timeout_min_ms = 5000\nelection_timeout_max_ms = 6000\n",
    )
    .await;
    let leader = c.leader().await;
    let client = c.node_client(leader);
    for round in 0..10 {
        let burst = (0..20).map(|k| {
            let client = client.clone();
            async move {
                register(&client, "burst", &format!("b-{round}-{k}"), 80)
                    .await
                    .revision
            }
        });
        let last = futures::future::join_all(burst)
            .await
            .into_iter()
            .max()
            .unwrap_or(0);
        let acked = Instant::now();
        for follower in (1..=3).filter(|&i| i != leader) {
            c.wait_applied(follower, last).await;
            let waited = acked.elapsed();
            assert!(
                waited < Duration::from_millis(500),
                "round {round}: node {follower} applied revision {last} {waited:?} after its ack"
            );
        }
    }
}
