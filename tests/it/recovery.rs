//! Recovery from a lost quorum: `roster recover` makes a stopped survivor the
//! only voter of its cluster with every acknowledged write; the cluster then
//! grows back with `member add`.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;
use roster::proto::v1::*;

fn recover(c: &TestCluster, id: u64) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_roster"))
        .arg("recover")
        .arg("--data-dir")
        .arg(c.data_dir(id))
        .args(["--id", &id.to_string(), "--cluster-id", "test"])
        .args(["--peer-address", &c.node(id).peer])
        .output()
        .expect("run roster recover")
}

fn voters(s: &StatusResponse) -> Vec<u64> {
    s.members.iter().filter(|m| m.voter).map(|m| m.id).collect()
}

#[tokio::test]
async fn a_survivor_of_a_lost_quorum_serves_every_acknowledged_write_alone_then_grows_back() {
    let mut c = TestCluster::start(3).await;
    let client = c.client();
    for n in 0..30 {
        register(&client, "orders", &format!("o-{n}"), 9000 + n).await;
    }
    // A namespace at its quota of one instance, which recovery keeps.
    client
        .create_namespace(CreateNamespaceRequest {
            name: "team-a".into(),
            quotas: Some(NamespaceQuotas {
                max_instances: 1,
                ..Default::default()
            }),
        })
        .await
        .expect("namespace");
    let in_team = |id: &str| RegisterRequest {
        instance: Some(instance("orders", id, 9500)),
        namespace: "team-a".into(),
        ..Default::default()
    };
    client.register(in_team("t-1")).await.expect("in team-a");
    // The leader and one follower are gone for good; the survivor is stopped.
    let leader = c.leader().await;
    let survivor = (1..=3).find(|&i| i != leader).expect("a follower");
    for id in 1..=3 {
        c.kill(id);
    }

    let started = Instant::now();
    let out = recover(&c, survivor);
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("is now the only voter"), "{said}");
    c.start_node(survivor);
    let alone = c.node_client(survivor);
    c.wait_for(
        "the survivor to lead alone",
        Duration::from_secs(20),
        || async {
            let s = c.status(survivor).await?;
            (s.leader_id == survivor && voters(&s) == [survivor]).then_some(())
        },
    )
    .await;
    register(&alone, "orders", "after", 9999).await;
    eprintln!(
        "recover + restart + first accepted write: {:?}",
        started.elapsed()
    );
    let mut want: Vec<String> = (0..30).map(|n| format!("o-{n}")).collect();
    want.push("after".into());
    want.sort();
    assert_eq!(ids(&alone, "orders", Consistency::Linearizable).await, want);
    // The namespace, its instance and its quota came through.
    let e = alone
        .register(in_team("t-2"))
        .await
        .expect_err("team-a is at its quota");
    assert_eq!(e.code(), roster::client::Code::ResourceExhausted, "{e:?}");
    let team = alone
        .get_service(GetServiceRequest {
            service: "orders".into(),
            namespace: "team-a".into(),
            ..Default::default()
        })
        .await
        .expect("team-a's orders");
    assert_eq!(team.instances.len(), 1, "{team:?}");

    // A running node's directory is not touched.
    let out = recover(&c, survivor);
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("still running"), "{err}");

    // Members are added back from empty data directories.
    let spare = c.start_spare();
    alone
        .add_member(AddMemberRequest {
            id: spare,
            address: c.endpoint(spare),
            replica: false,
        })
        .await
        .expect("add a member back");
    let s = c.status(survivor).await.expect("status");
    assert_eq!(voters(&s), [survivor.min(spare), survivor.max(spare)]);
    let applied = c.wait_applied(survivor, 0).await.applied_index;
    c.wait_applied(spare, applied).await;
    assert_eq!(
        ids(&c.node_client(spare), "orders", Consistency::Stale).await,
        want
    );
}

/// An upgrade as the runbook does it: each node stopped (SIGTERM) and started
/// again, the leader last, under a steady write load. No acknowledged write is
/// lost, and writes fail, if at all, only while a node is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_writes_loses_no_acknowledged_write() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    let mut c = TestCluster::start(3).await;
    let client = Arc::new(c.client());
    let stop = Arc::new(AtomicBool::new(false));
    // (id, acknowledged) per attempt, and when each failure happened.
    let acked = Arc::new(Mutex::new(Vec::new()));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let writer = {
        let (client, stop) = (client.clone(), stop.clone());
        let (acked, failures) = (acked.clone(), failures.clone());
        tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let id = format!("w-{n}");
                let req = RegisterRequest {
                    instance: Some(instance("rolling", &id, 8000)),
                    ..Default::default()
                };
                match client.register(req).await {
                    Ok(_) => acked.lock().expect("acked").push(id),
                    Err(e) => failures.lock().expect("failures").push((Instant::now(), e)),
                }
                n += 1;
            }
        })
    };
    let leader = c.leader().await;
    let order: Vec<u64> = (1..=3).filter(|&i| i != leader).chain([leader]).collect();
    let mut windows = Vec::new();
    for id in order {
        let before = acked.lock().expect("acked").len();
        // Writes go on between restarts.
        c.wait_for("writes before the restart", Duration::from_secs(10), || {
            let acked = acked.clone();
            async move { (acked.lock().expect("acked").len() >= before + 20).then_some(()) }
        })
        .await;
        let down = Instant::now();
        c.signal(id, "TERM");
        let status = c.wait_exit(id, Duration::from_secs(20)).await;
        assert!(status.success(), "node {id} stopped with {status}");
        c.start_node(id);
        let applied = c.leader_applied().await;
        c.wait_applied(id, applied).await;
        windows.push((down, Instant::now()));
    }
    let before = acked.lock().expect("acked").len();
    c.wait_for(
        "writes after the last restart",
        Duration::from_secs(10),
        || {
            let acked = acked.clone();
            async move { (acked.lock().expect("acked").len() >= before + 20).then_some(()) }
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    writer.await.expect("writer");

    let acked = acked.lock().expect("acked").clone();
    let mut stored = ids(&client, "rolling", Consistency::Linearizable).await;
    stored.sort();
    let lost: Vec<_> = acked
        .iter()
        .filter(|id| stored.binary_search(id).is_err())
        .collect();
    let failures = failures.lock().expect("failures");
    eprintln!(
        "rolling restart: {} writes acknowledged, {} failed, {} lost; restarts took {:?}",
        acked.len(),
        failures.len(),
        lost.len(),
        windows.iter().map(|(a, b)| *b - *a).collect::<Vec<_>>()
    );
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    for (at, e) in failures.iter() {
        assert!(
            windows.iter().any(|(a, b)| a <= at && at <= b),
            "a write failed outside any restart: {e:?}"
        );
    }
}
