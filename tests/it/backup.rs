//! Backup and restore: `roster snapshot save` from a running cluster,
//! `inspect`, and `restore` into the data directories of a new cluster that
//! serves exactly that state at that revision.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use crate::common::*;
use roster::proto::v1::*;

fn roster(args: &[&str], file: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_roster"))
        .args(args)
        .arg(file)
        .output()
        .expect("run roster")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The value of a `name: value` line of `roster snapshot inspect`.
fn field(out: &Output, name: &str) -> String {
    let t = String::from_utf8_lossy(&out.stdout).into_owned();
    t.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")).map(str::to_string))
        .unwrap_or_else(|| panic!("no {name} in {t}"))
}

/// Every service's instances as (id, port), read linearizably.
async fn catalogue(c: &TestCluster) -> Vec<(String, Vec<(String, u32)>)> {
    let mut out = Vec::new();
    for s in ["orders", "payments", "search"] {
        let r = c
            .client()
            .get_service(get_req(s, Consistency::Linearizable))
            .await
            .expect("get service");
        let mut v: Vec<_> = r.instances.into_iter().map(|i| (i.id, i.port)).collect();
        v.sort();
        out.push((s.to_string(), v));
    }
    out
}

#[tokio::test]
async fn a_backup_restored_into_a_new_cluster_serves_the_same_state_at_its_revision() {
    let old = TestCluster::start(3).await;
    let client = old.client();
    for n in 0..45u32 {
        let service = ["orders", "payments", "search"][(n % 3) as usize];
        register(&client, service, &format!("{service}-{n}"), 9000 + n).await;
    }
    for n in [0u32, 3, 6] {
        client
            .deregister(DeregisterRequest {
                namespace: Default::default(),
                service: "orders".into(),
                id: format!("orders-{n}"),
            })
            .await
            .expect("deregister");
    }
    client
        .configure_service(ConfigureServiceRequest {
            namespace: Default::default(),
            service: "empty".into(),
            protect_threshold_percent: 50,
        })
        .await
        .expect("configure");
    let token = client
        .bootstrap(BootstrapRequest::default())
        .await
        .expect("bootstrap");
    // A namespace with a quota and an instance, which the backup carries.
    client
        .create_namespace(CreateNamespaceRequest {
            name: "team-a".into(),
            quotas: Some(NamespaceQuotas {
                max_instances: 7,
                ..Default::default()
            }),
        })
        .await
        .expect("namespace");
    client
        .register(RegisterRequest {
            instance: Some(instance("orders", "team-orders-1", 9100)),
            namespace: "team-a".into(),
            ..Default::default()
        })
        .await
        .expect("register in team-a");
    let before = catalogue(&old).await;
    let leader = old.leader().await;
    let follower = (1..=3).find(|&i| i != leader).expect("a follower");

    // Saved through a follower: the leader makes the copy.
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("roster.backup");
    let out = roster(
        &["snapshot", "save", "--endpoints", &old.endpoint(follower)],
        &file,
    );
    assert!(out.status.success(), "{}", text(&out));
    let revision: u64 = field(&out, "revision").parse().expect("a revision");
    let applied = old.leader_applied().await;
    assert!(
        revision > 0 && revision <= applied,
        "{revision} vs {applied}"
    );
    assert!(!dir.path().join("roster.backup.tmp").exists());

    // A bare file name lands in the current directory.
    let out = Command::new(env!("CARGO_BIN_EXE_roster"))
        .args(["snapshot", "save", "--endpoints", &old.endpoint(follower)])
        .arg("bare.backup")
        .current_dir(dir.path())
        .output()
        .expect("run roster");
    assert!(out.status.success(), "{}", text(&out));
    assert!(dir.path().join("bare.backup").is_file());
    // A missing directory is not made, and the error names the cause once.
    let missing = dir.path().join("missing").join("roster.backup");
    let out = roster(
        &["snapshot", "save", "--endpoints", &old.endpoint(follower)],
        &missing,
    );
    assert!(!out.status.success(), "{}", text(&out));
    assert_eq!(
        text(&out).matches("No such file or directory").count(),
        1,
        "{}",
        text(&out)
    );
    assert!(!dir.path().join("missing").exists());

    let out = roster(&["snapshot", "inspect"], &file);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(field(&out, "revision"), revision.to_string());
    // team-a's instance and service among them.
    assert_eq!(field(&out, "instances"), "43");
    assert_eq!(field(&out, "services"), "5");
    assert_eq!(field(&out, "tokens"), "1");
    assert_eq!(field(&out, "checksum"), "ok");
    let sum = Command::new("sha256sum")
        .arg(&file)
        .output()
        .expect("sha256sum");
    let sum = String::from_utf8_lossy(&sum.stdout);
    assert_eq!(
        Some(field(&out, "sha256").as_str()),
        sum.split_whitespace().next()
    );
    drop(old);

    // A truncated or altered file is refused, and nothing is seeded from it.
    let bytes = std::fs::read(&file).expect("read backup");
    let cut = dir.path().join("cut.backup");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).expect("truncate");
    let flipped = dir.path().join("flipped.backup");
    let mut altered = bytes.clone();
    altered[bytes.len() / 2] ^= 0x10;
    std::fs::write(&flipped, &altered).expect("alter");
    for bad in [&cut, &flipped] {
        let out = roster(&["snapshot", "inspect"], bad);
        assert!(!out.status.success(), "{}", text(&out));
        assert!(text(&out).contains("is damaged"), "{}", text(&out));
        let seeded = dir.path().join("refused");
        let out = Command::new(env!("CARGO_BIN_EXE_roster"))
            .args(["snapshot", "restore"])
            .arg(bad)
            .arg("--data-dir")
            .arg(&seeded)
            .args(["--id", "1", "--initial-cluster", "1=127.0.0.1:1"])
            .output()
            .expect("restore");
        assert!(!out.status.success(), "{}", text(&out));
        assert!(text(&out).contains("is damaged"), "{}", text(&out));
        assert!(!seeded.exists(), "nothing seeded from a damaged backup");
    }

    // With auth on: the old bootstrap secret is the restored cluster's admin
    // token (the harness bootstraps with it and gets that token back).
    let token_info = token.token.clone().expect("token info");
    let setup = Setup {
        restore_from: Some(file.clone()),
        auth: true,
        auth_secret: Some(token.secret.clone()),
        ..Setup::default()
    };
    let new = TestCluster::start_setup(3, "[auth]\nenabled = true\n", setup)
        .await
        .expect("a restored cluster");
    let e = new
        .client_with(1, Some(&"f".repeat(64)))
        .status()
        .await
        .expect_err("an unknown token");
    assert_eq!(e.code(), roster::client::Code::Unauthenticated, "{e:?}");
    assert_eq!(catalogue(&new).await, before);
    let status = new.status(new.leader().await).await.expect("status");
    // After the backup's entries: the new leader's blank entry (and soon the
    // one binding the members to their data directories).
    assert!(
        status.revision > revision,
        "{} vs {revision}",
        status.revision
    );
    let tokens = new.client().list_tokens().await.expect("list tokens");
    let accessors: Vec<_> = tokens.tokens.iter().map(|t| t.accessor.clone()).collect();
    assert_eq!(accessors, [token_info.accessor]);
    let namespaces = new
        .client()
        .list_namespaces(ListNamespacesRequest::default())
        .await
        .expect("namespaces");
    let team: Vec<_> = namespaces
        .namespaces
        .iter()
        .filter(|n| n.name == "team-a")
        .map(|n| (n.instances, n.quotas.as_ref().map(|q| q.max_instances)))
        .collect();
    assert_eq!(team, [(1, Some(7))], "{namespaces:?}");
    let got = new
        .client()
        .get_service(GetServiceRequest {
            service: "orders".into(),
            namespace: "team-a".into(),
            ..Default::default()
        })
        .await
        .expect("team-a's orders");
    assert_eq!(got.instances.len(), 1, "{got:?}");

    // A watcher resuming from a revision before the backup's gets the whole
    // state (compacted), not a gap.
    let mut watch = new
        .client()
        .watch(WatchRequest {
            namespace: Default::default(),
            service: "orders".into(),
            since_revision: revision - 10,
        })
        .await
        .expect("watch");
    let first = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("a first message")
        .expect("a message")
        .expect("not ended");
    assert_eq!(first.reset, ResetReason::Compacted as i32);
    assert_eq!(first.instances.len(), before[0].1.len());

    // It takes writes, after the backup's revision.
    let r = register(&new.client(), "orders", "orders-new", 9999).await;
    assert!(r.revision > revision);

    // A data directory that holds anything is not seeded over.
    let out = Command::new(env!("CARGO_BIN_EXE_roster"))
        .args(["snapshot", "restore"])
        .arg(&file)
        .arg("--data-dir")
        .arg(new.data_dir(1))
        .args(["--id", "1", "--initial-cluster", "1=127.0.0.1:1"])
        .output()
        .expect("restore");
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("is not empty"), "{}", text(&out));
}
