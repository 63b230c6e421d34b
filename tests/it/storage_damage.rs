//! A node whose data directory was damaged or replaced while it was down must
//! refuse to start (it would vote with lost state), say which directory and how
//! to recover; the rest of the cluster keeps serving every acknowledged write.

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::common::*;
use roster::client::RosterClient;
use roster::proto::v1::*;

/// Enough writes that sled's `db` file holds many log and state records.
const WRITES: usize = 400;
const SERVICE: &str = "kept";

/// A 3-node cluster holding `WRITES` acknowledged registrations, and a follower
/// that has applied all of them.
async fn cluster_with_data() -> (TestCluster, Vec<String>, u64) {
    let c = TestCluster::start(3).await;
    let client = c.client();
    let mut expected = Vec::new();
    for batch in 0..WRITES / 50 {
        let writes = (0..50).map(|n| {
            let id = format!("i-{batch}-{n}");
            let mut inst = instance(SERVICE, &id, 80);
            // Bulk, so that the records span a good part of the files.
            inst.metadata.insert("pad".into(), "x".repeat(400));
            let client = &client;
            async move {
                client
                    .register(RegisterRequest {
                        instance: Some(inst),
                        ..Default::default()
                    })
                    .await
                    .unwrap_or_else(|e| panic!("register {id}: {e}"));
                id
            }
        });
        expected.extend(futures::future::join_all(writes).await);
    }
    expected.sort();
    let leader = c.leader().await;
    let follower = (1..=3).find(|&i| i != leader).expect("a follower");
    let at = c.status(leader).await.expect("status").applied_index;
    c.wait_applied(follower, at).await;
    (c, expected, follower)
}

/// Kills a follower, damages its directory, restarts it: it must exit non-zero
/// naming the directory and the recovery, while the others keep every write.
async fn refuses_after(damage: impl FnOnce(&Path)) -> (TestCluster, Vec<String>, u64) {
    let (mut c, expected, f) = cluster_with_data().await;
    c.kill(f);
    damage(&c.data_dir(f));
    c.start_node(f);
    let status = c.wait_exit(f, Duration::from_secs(30)).await;
    let log = c.log(f);
    assert!(!status.success(), "node {f} exited with {status}: {log}");
    let dir = c.data_dir(f).display().to_string();
    assert!(
        log.contains(&format!(
            "data directory {dir} is not what node {f} last wrote"
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!("roster member remove --id {f}")),
        "{log}"
    );
    assert!(log.contains("roster member add"), "{log}");

    let others: Vec<String> = (1..=3).filter(|&i| i != f).map(|i| c.endpoint(i)).collect();
    let survivors = RosterClient::new(&others).expect("client");
    assert_eq!(
        ids(&survivors, SERVICE, Consistency::Linearizable).await,
        expected
    );
    (c, expected, f)
}

/// The recovery the refusals give, with the real CLI: remove node `f`, wipe
/// its directory, start it without an initial cluster, add it back.
fn recover(c: &mut TestCluster, f: u64) {
    let others: Vec<String> = (1..=3).filter(|&i| i != f).map(|i| c.endpoint(i)).collect();
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_roster"))
            .args(args)
            .args(["--endpoints", &others.join(",")])
            .output()
            .expect("run roster");
        assert!(out.status.success(), "roster {args:?}: {out:?}");
    };
    cli(&["member", "remove", "--id", &f.to_string()]);
    c.kill(f);
    std::fs::remove_dir_all(c.data_dir(f)).expect("wipe");
    c.clear_initial_cluster(f);
    c.start_node(f);
    let address = c.endpoint(f);
    cli(&[
        "member",
        "add",
        "--id",
        &f.to_string(),
        "--address",
        &address,
    ]);
}

fn sled_file(dir: &Path) -> std::path::PathBuf {
    let db = dir.join("db");
    let len = std::fs::metadata(&db).expect("sled db file").len();
    assert!(len > 256 * 1024, "db file is only {len} bytes");
    db
}

#[tokio::test]
async fn truncated_sled_file() {
    refuses_after(|dir| {
        let db = sled_file(dir);
        let len = std::fs::metadata(&db).expect("stat").len();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&db)
            .expect("open");
        f.set_len(len / 2).expect("truncate");
    })
    .await;
}

#[tokio::test]
async fn overwritten_sled_file_then_documented_recovery() {
    let (mut c, mut expected, f) = refuses_after(|dir| {
        let db = sled_file(dir);
        // Sled preallocates its file: the middle of the file may be space
        // never written, and overwriting it damages nothing. The middle of
        // what was written holds records.
        let bytes = std::fs::read(&db).expect("read db");
        let written = bytes.iter().rposition(|&b| b != 0).expect("a written db") as u64;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(&db)
            .expect("open");
        file.seek(SeekFrom::Start(written / 2)).expect("seek");
        file.write_all(&[0xab; 4096]).expect("overwrite");
    })
    .await;

    recover(&mut c, f);
    let client = c.client();
    register(&client, SERVICE, "after-recovery", 80).await;
    expected.push("after-recovery".into());
    expected.sort();
    let at = c.leader_applied().await;
    c.wait_applied(f, at).await;
    assert_eq!(
        ids(&c.node_client(f), SERVICE, Consistency::Stale).await,
        expected
    );
    let m = c.status(f).await.expect("status");
    assert!(m.members.iter().any(|m| m.id == f && m.voter), "{m:?}");
}

#[tokio::test]
async fn deleted_sled_file() {
    refuses_after(|dir| std::fs::remove_file(sled_file(dir)).expect("delete db")).await;
}

#[tokio::test]
async fn emptied_data_directory() {
    refuses_after(|dir| {
        for e in std::fs::read_dir(dir).expect("list") {
            let path = e.expect("entry").path();
            if path.is_dir() {
                std::fs::remove_dir_all(&path).expect("remove dir");
            } else {
                std::fs::remove_file(&path).expect("remove file");
            }
        }
    })
    .await;
}

/// The leader nodes 1 and 2 agree on (node 3 may follow none).
async fn leader_of_1_and_2(c: &TestCluster) -> u64 {
    c.wait_for(
        "a leader nodes 1 and 2 agree on",
        Duration::from_secs(20),
        || async {
            let (a, b) = (c.status(1).await?, c.status(2).await?);
            (a.leader_id != 0 && a.leader_id == b.leader_id).then_some(a.leader_id)
        },
    )
    .await
}

/// A node whose directory was wiped and that bootstraps again with its initial
/// cluster while no peer answers (so the start-up check cannot tell) has a new
/// incarnation: the others refuse it as the old voter, so it neither votes nor
/// acknowledges entries, and no acknowledged write can be lost through it.
#[tokio::test]
async fn wiped_member_bootstrapping_again_is_refused_as_the_old_voter() {
    let mut c = TestCluster::start(3).await;
    let bound = c.wait_bound().await;
    let mut expected = Vec::new();
    let all = c.client();
    for n in 0..10 {
        let id = format!("before-{n}");
        register(&all, SERVICE, &id, 80).await;
        expected.push(id);
    }

    c.kill(3);
    std::fs::remove_dir_all(c.data_dir(3)).expect("wipe");
    let two = RosterClient::new(&[c.endpoint(1), c.endpoint(2)]).expect("client");
    for n in 0..10 {
        let id = format!("while-down-{n}");
        register(&two, SERVICE, &id, 80).await;
        expected.push(id);
    }
    c.signal(1, "STOP");
    c.signal(2, "STOP");
    c.start_node(3);
    let impostor = c
        .wait_for(
            "node 3 to bootstrap again",
            Duration::from_secs(30),
            || async { c.status(3).await.filter(|s| !s.members.is_empty()) },
        )
        .await;
    c.signal(1, "CONT");
    c.signal(2, "CONT");
    assert_ne!(impostor.incarnation, bound[&3]);

    // It refuses the leader's requests meant for the member it replaced, and
    // the leader hears why.
    c.wait_for(
        "the incarnation mismatch to be logged",
        Duration::from_secs(20),
        || async {
            let refused_here = c
                .log(3)
                .contains("is not the one the cluster knows as node 3");
            let told_there = (1..=2).any(|i| {
                c.log(i).contains(
                    "it refuses this node: failed precondition: this node's data directory",
                )
            });
            (refused_here && told_there).then_some(())
        },
    )
    .await;

    // The others carry on without it; it never has a leader nor an entry.
    for n in 0..20 {
        let id = format!("refused-{n}");
        register(&two, SERVICE, &id, 80).await;
        expected.push(id);
        let s = c.status(3).await.expect("node 3 status");
        assert_eq!(s.leader_id, 0, "node 3 was accepted: {s:?}");
        assert_eq!(s.last_log_index, impostor.last_log_index, "{s:?}");
    }
    let leader = c.status(leader_of_1_and_2(&c).await).await.expect("status");
    let known = leader.members.iter().find(|m| m.id == 3).expect("member 3");
    assert_eq!(known.incarnation, bound[&3], "{leader:?}");
    expected.sort();
    assert_eq!(
        ids(&c.node_client(1), SERVICE, Consistency::Linearizable).await,
        expected
    );

    // Node 2 and the impostor are no quorum: no leader, no write.
    c.kill(1);
    c.wait_for(
        "node 2 to have no leader",
        Duration::from_secs(20),
        || async { c.status(2).await.filter(|s| s.leader_id == 0) },
    )
    .await;
    let unacked = "without-quorum";
    let e = c
        .node_client(2)
        .register(RegisterRequest {
            instance: Some(instance(SERVICE, unacked, 80)),
            ..Default::default()
        })
        .await
        .expect_err("a write without a quorum");
    assert!(
        matches!(
            e.code(),
            roster::client::Code::Unavailable
                | roster::client::Code::DeadlineExceeded
                | roster::client::Code::Aborted
        ),
        "{e}"
    );
    for i in [2, 3] {
        let s = c.status(i).await.expect("status");
        assert_eq!(s.leader_id, 0, "node {i}: {s:?}");
    }

    // Node 1 back: every acknowledged write is there.
    c.start_node(1);
    leader_of_1_and_2(&c).await;
    let mut got = ids(&two, SERVICE, Consistency::Linearizable).await;
    got.retain(|id| id != unacked);
    assert_eq!(got, expected);

    // It cannot be added back over the member it replaced...
    let e = two
        .add_member(AddMemberRequest {
            id: 3,
            address: c.endpoint(3),
            replica: false,
        })
        .await
        .expect_err("adding a replaced member in place");
    assert_eq!(e.code(), roster::client::Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("remove node 3 first"), "{e}");

    // ...but the documented recovery makes it a member again, with its new incarnation.
    recover(&mut c, 3);
    let at = c.leader_applied().await;
    c.wait_applied(3, at).await;
    let mut got = ids(&c.node_client(3), SERVICE, Consistency::Stale).await;
    got.retain(|id| id != unacked);
    assert_eq!(got, expected);
    let rebound = c.wait_bound().await;
    assert!(
        rebound[&3] != bound[&3] && rebound[&3] != impostor.incarnation,
        "{rebound:?}"
    );
    let s = c.status(3).await.expect("status");
    assert!(s.members.iter().any(|m| m.id == 3 && m.voter), "{s:?}");
}
