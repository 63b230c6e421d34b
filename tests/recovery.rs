//! Recovery from a lost quorum: `roster recover` makes a stopped survivor the
//! only voter of its cluster with every acknowledged write; the cluster then
//! grows back with `member add`.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
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
