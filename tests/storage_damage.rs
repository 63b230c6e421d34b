//! A node whose data directory was damaged or replaced while it was down must
//! refuse to start (it would vote with lost state), say which directory and how
//! to recover; the rest of the cluster keeps serving every acknowledged write.

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
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
        let len = std::fs::metadata(&db).expect("stat").len();
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(&db)
            .expect("open");
        file.seek(SeekFrom::Start(len / 2)).expect("seek");
        file.write_all(&[0xab; 4096]).expect("overwrite");
    })
    .await;

    // The recovery the message gives, with the real CLI.
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

    let client = c.client();
    register(&client, SERVICE, "after-recovery", 80).await;
    expected.push("after-recovery".into());
    expected.sort();
    let at = c
        .status(c.leader().await)
        .await
        .expect("status")
        .applied_index;
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
