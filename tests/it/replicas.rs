//! Read replicas: learners that stay learners. They serve stale reads and
//! watches from their own copy, forward the rest to the leader, and never
//! vote or count toward a quorum.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::common::*;
use roster::client::{Code, RosterClient};
use roster::proto::v1::registry_client::RegistryClient;
use roster::proto::v1::*;

const CONTACT_HEADER: &str = "roster-leader-contact-ms";

/// Adds running node `id` as a read replica through `client`.
async fn add_replica(c: &TestCluster, client: &RosterClient, id: u64) -> MembershipResponse {
    let r = client
        .add_member(AddMemberRequest {
            id,
            address: c.endpoint(id),
            replica: true,
        })
        .await
        .unwrap_or_else(|e| panic!("add node {id} as a replica: {e}"));
    let m = r.members.iter().find(|m| m.id == id).expect("the replica");
    assert!(m.replica && !m.voter, "{r:?}");
    r
}

fn voters(members: &[Member]) -> BTreeSet<u64> {
    members.iter().filter(|m| m.voter).map(|m| m.id).collect()
}

fn replicas(members: &[Member]) -> BTreeSet<u64> {
    members.iter().filter(|m| m.replica).map(|m| m.id).collect()
}

/// A client of the voters only.
fn voters_client(c: &TestCluster, ids: &[u64]) -> RosterClient {
    c.client_to(&ids.iter().map(|&i| c.endpoint(i)).collect::<Vec<_>>())
}

/// The voters' terms, once every running voter reports the same one.
async fn voters_term(c: &TestCluster, ids: &[u64]) -> u64 {
    c.wait_for(
        "the voters to agree on a term",
        Duration::from_secs(10),
        || async {
            let mut terms = BTreeSet::new();
            for &id in ids.iter().filter(|&&id| c.is_running(id)) {
                terms.insert(c.status(id).await?.term);
            }
            (terms.len() == 1)
                .then(|| terms.into_iter().next())
                .flatten()
        },
    )
    .await
}

/// A GetService on node `id` alone, without the client's retries: the
/// answer or the refusal, the staleness header, and how long it took.
async fn get_on(
    c: &TestCluster,
    id: u64,
    service: &str,
    consistency: Consistency,
) -> (Result<Vec<String>, tonic::Status>, Option<String>, Duration) {
    let mut client = RegistryClient::new(c.channel(&c.endpoint(id)).await);
    let started = Instant::now();
    let answer = client.get_service(get_req(service, consistency)).await;
    let took = started.elapsed();
    match answer {
        Ok(r) => {
            let header = r
                .metadata()
                .get(CONTACT_HEADER)
                .map(|v| v.to_str().expect("ascii").to_string());
            let mut ids: Vec<String> = r.into_inner().instances.into_iter().map(|i| i.id).collect();
            ids.sort();
            (Ok(ids), header, took)
        }
        Err(s) => (Err(s), None, took),
    }
}

async fn register_all(client: &RosterClient, service: &str, range: std::ops::Range<u32>) {
    for n in range {
        register(client, service, &format!("{service}-{n:03}"), 80).await;
    }
}

fn names(service: &str, range: std::ops::Range<u32>) -> Vec<String> {
    range.map(|n| format!("{service}-{n:03}")).collect()
}

/// Three voters and two replicas: the replicas serve stale reads with their
/// staleness, forward writes and linearizable reads, show in `Status` and
/// `roster status`, are not needed for writes, rejoin without moving the
/// voters' term, and are removed like any member.
#[tokio::test]
async fn replicas_serve_stale_reads_and_writes_go_on_without_them() {
    let mut c = TestCluster::start(3).await;
    c.wait_bound().await;
    let three = voters_client(&c, &[1, 2, 3]);
    register_all(&three, "web", 0..10).await;
    let (r4, r5) = (c.start_spare(), c.start_spare());
    add_replica(&c, &three, r4).await;
    let r = add_replica(&c, &three, r5).await;
    assert_eq!(voters(&r.members), BTreeSet::from([1, 2, 3]), "{r:?}");
    assert_eq!(replicas(&r.members), BTreeSet::from([r4, r5]), "{r:?}");
    // Adding it again changes nothing; making it a voter is refused.
    let again = add_replica(&c, &three, r4).await;
    assert_eq!(voters(&again.members), voters(&r.members));
    assert_eq!(replicas(&again.members), replicas(&r.members));
    let e = three
        .add_member(AddMemberRequest {
            id: r4,
            address: c.endpoint(r4),
            replica: false,
        })
        .await
        .expect_err("a replica is not promoted");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("is a read replica"), "{e:?}");
    let e = three
        .add_member(AddMemberRequest {
            id: 1,
            address: c.endpoint(1),
            replica: true,
        })
        .await
        .expect_err("a voter is not demoted");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("is a voter, not a replica"), "{e:?}");

    // A replica's stale read: its own copy, marked with its leader contact.
    let at = c.leader_applied().await;
    let own = c.wait_applied(r4, at).await;
    assert_eq!(own.role, "replica", "{own:?}");
    assert!(
        own.leader_contact_ms.is_some_and(|ms| ms < 1_000.0),
        "{own:?}"
    );
    let (read, header, _) = get_on(&c, r4, "web", Consistency::Stale).await;
    assert_eq!(read.expect("stale read"), names("web", 0..10));
    let ms: u64 = header.expect("staleness header").parse().expect("ms");
    assert!(ms < 1_000, "{ms}");
    let leader = c.leader().await;
    let (_, header, _) = get_on(&c, leader, "web", Consistency::Stale).await;
    assert_eq!(header, None, "the leader's answers carry no staleness");
    // Writes and linearizable reads through a replica go to the leader.
    let via_replica = c.node_client(r4);
    register(&via_replica, "web", "web-010", 80).await;
    assert_eq!(
        ids(&via_replica, "web", Consistency::Linearizable).await,
        names("web", 0..11)
    );
    // A client given a replica first reads there and writes through it.
    let mixed = c.client_to(&[r4, 1, 2, 3].map(|i| c.endpoint(i)));
    register(&mixed, "web", "web-011", 80).await;
    register(&mixed, "web", "web-012", 80).await;
    let at = c.leader_applied().await;
    c.wait_applied(r4, at).await;
    assert_eq!(
        ids(&mixed, "web", Consistency::Stale).await,
        names("web", 0..13)
    );
    // xDS clients are sent to the replicas first.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_roster"))
        .args(["xds-bootstrap", "--from-membership", "--endpoints"])
        .arg(c.endpoint(leader))
        .output()
        .expect("run roster xds-bootstrap");
    assert!(out.status.success(), "{out:?}");
    let bootstrap: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let uris: Vec<String> = bootstrap["xds_servers"]
        .as_array()
        .expect("servers")
        .iter()
        .map(|s| s["server_uri"].as_str().expect("uri").to_string())
        .collect();
    let expected: Vec<String> = [r4, r5, 1, 2, 3]
        .map(|i| format!("dns:///{}", c.endpoint(i)))
        .to_vec();
    assert_eq!(uris, expected);
    // Voter changes keep the replicas as they are.
    let n6 = c.start_spare();
    let r = three
        .add_member(AddMemberRequest {
            id: n6,
            address: c.endpoint(n6),
            replica: false,
        })
        .await
        .expect("add a voter");
    assert_eq!(voters(&r.members), BTreeSet::from([1, 2, 3, n6]), "{r:?}");
    assert_eq!(replicas(&r.members), BTreeSet::from([r4, r5]), "{r:?}");
    let r = three
        .remove_member(RemoveMemberRequest { id: n6 })
        .await
        .expect("remove the voter");
    assert_eq!(voters(&r.members), BTreeSet::from([1, 2, 3]), "{r:?}");
    assert_eq!(replicas(&r.members), BTreeSet::from([r4, r5]), "{r:?}");
    c.kill(n6);
    let metrics = c.scrape(r4).await;
    assert!(
        metrics.contains("roster_leader_contact_seconds "),
        "{metrics}"
    );
    assert!(c.scrape(leader).await.contains("roster_raft_replicas 2"));

    // Both replicas down: the three voters still commit.
    let term = voters_term(&c, &[1, 2, 3]).await;
    c.kill(r4);
    c.kill(r5);
    register_all(&three, "web", 13..20).await;
    // The log it lacks is purged: it catches up by snapshot.
    let snap = c.snapshot_and_purge(c.leader().await).await;
    c.start_node(r4);
    let at = c.leader_applied().await;
    let caught = c.wait_applied(r4, at).await;
    assert!(caught.snapshot_index >= snap.snapshot_index, "{caught:?}");
    let (read, _, _) = get_on(&c, r4, "web", Consistency::Stale).await;
    assert_eq!(read.expect("stale read"), names("web", 0..20));
    assert_eq!(
        voters_term(&c, &[1, 2, 3]).await,
        term,
        "a replica moved the term"
    );

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_roster"))
        .args(["status", "--endpoints", &c.endpoint(r4)])
        .output()
        .expect("run roster status");
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{status}");
    assert!(status.contains(&format!("node {r4} replica")), "{status}");
    assert!(status.contains("(replica)"), "{status}");
    assert!(status.contains("leader_contact="), "{status}");

    // A dead replica is removed like any member, and not as a voter.
    let r = three
        .remove_member(RemoveMemberRequest { id: r5 })
        .await
        .expect("remove a replica");
    assert_eq!(replicas(&r.members), BTreeSet::from([r4]), "{r:?}");
    assert_eq!(voters(&r.members), BTreeSet::from([1, 2, 3]), "{r:?}");
    register(&three, "web", "web-020", 80).await;
}

/// A replica cut off from the leader keeps serving what it holds, says how
/// stale it is, refuses linearizable reads at once, and catches up when the
/// link comes back, without moving the voters' term.
#[tokio::test(flavor = "multi_thread")]
async fn a_partitioned_replica_serves_stale_refuses_linearizable_and_catches_up() {
    let setup = Setup {
        proxies: true,
        http: true,
        ..Setup::default()
    };
    let mut c = TestCluster::start_setup(3, "", setup)
        .await
        .expect("a cluster with proxies");
    let three = voters_client(&c, &[1, 2, 3]);
    register_all(&three, "cut", 0..10).await;
    let r4 = c.start_spare();
    add_replica(&c, &three, r4).await;
    let at = c.leader_applied().await;
    c.wait_applied(r4, at).await;
    let mut watch = c
        .node_client(r4)
        .watch(WatchRequest {
            namespace: Default::default(),
            service: "cut".into(),
            since_revision: 0,
        })
        .await
        .expect("watch on the replica");
    let first = watch.message().await.expect("first").expect("a message");
    assert_eq!(first.instances.len(), 10);
    let revision = first.revision;
    let term = voters_term(&c, &[1, 2, 3]).await;

    // Nothing reaches the replica's peer port any more.
    c.proxy(r4).isolate(true);
    register_all(&three, "cut", 10..20).await;
    let refusal = c
        .wait_for(
            "the replica to refuse linearizable reads",
            Duration::from_secs(10),
            || async {
                match get_on(&c, r4, "cut", Consistency::Linearizable).await.0 {
                    Err(s) if s.code() == tonic::Code::Unavailable => Some(s),
                    _ => None,
                }
            },
        )
        .await;
    assert!(
        refusal
            .message()
            .contains("read replica cut off from the leader"),
        "{refusal:?}"
    );
    assert!(refusal.message().contains("STALE"), "{refusal:?}");
    let (answer, _, took) = get_on(&c, r4, "cut", Consistency::Linearizable).await;
    assert_eq!(
        answer.expect_err("refused").code(),
        tonic::Code::Unavailable
    );
    assert!(took < Duration::from_millis(500), "refused after {took:?}");
    // Stale reads go on, from what it holds, saying how old that is.
    let (read, header, _) = get_on(&c, r4, "cut", Consistency::Stale).await;
    assert_eq!(read.expect("stale read"), names("cut", 0..10));
    let ms: u64 = header.expect("staleness header").parse().expect("ms");
    assert!(ms >= 500, "cut off {ms} ms ago");
    let own = c.status(r4).await.expect("the replica's status");
    assert!(own.leader_contact_ms.is_some_and(|c| c >= 500.0), "{own:?}");
    // The HTTP API's stale reads say the same.
    let url = format!(
        "http://127.0.0.1:{}/v1/services/cut?consistency=stale",
        c.node(r4).http_port
    );
    let answer = reqwest::get(&url).await.expect("HTTP stale read");
    assert!(answer.status().is_success(), "{answer:?}");
    let ms: u64 = answer.headers()[CONTACT_HEADER]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("ms");
    assert!(ms >= 500, "cut off {ms} ms ago");
    // A watch resumes on it from a revision it holds.
    let mut resumed = c
        .node_client(r4)
        .watch(WatchRequest {
            namespace: Default::default(),
            service: "cut".into(),
            since_revision: revision,
        })
        .await
        .expect("resume on the cut-off replica");

    c.proxy(r4).isolate(false);
    let at = c.status(1).await.expect("a voter's status").applied_index;
    c.wait_applied(r4, at).await;
    let (read, _, _) = get_on(&c, r4, "cut", Consistency::Stale).await;
    assert_eq!(read.expect("stale read"), names("cut", 0..20));
    assert_eq!(
        voters_term(&c, &[1, 2, 3]).await,
        term,
        "the replica moved the term"
    );
    assert_eq!(c.status(r4).await.expect("status").term, term);
    // Both watches come up to date (a snapshot installed would reset them to
    // the full state).
    let held: BTreeSet<String> = names("cut", 0..10).into_iter().collect();
    for (w, mut seen) in [(&mut watch, held.clone()), (&mut resumed, held)] {
        while seen.len() < 20 {
            let m = tokio::time::timeout(Duration::from_secs(20), w.message())
                .await
                .expect("the watch catches up")
                .expect("no error")
                .expect("a message");
            assert!(m.revision > revision || m.reset != 0, "{m:?}");
            if m.reset != 0 {
                seen = m.instances.iter().map(|i| i.id.clone()).collect();
            }
            seen.extend(
                m.events
                    .iter()
                    .filter_map(|e| e.instance.as_ref())
                    .map(|i| i.id.clone()),
            );
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), names("cut", 0..20));
    }
}

/// A watch on a replica sees every write, in revision order, while the
/// leader is killed and another elected.
#[tokio::test]
async fn a_watcher_on_a_replica_sees_every_change_in_order_through_a_failover() {
    let mut c = TestCluster::start(3).await;
    let three = voters_client(&c, &[1, 2, 3]);
    let r4 = c.start_spare();
    add_replica(&c, &three, r4).await;
    let mut watch = c
        .node_client(r4)
        .watch(WatchRequest {
            namespace: Default::default(),
            service: "fo".into(),
            since_revision: 0,
        })
        .await
        .expect("watch on the replica");
    let first = watch.message().await.expect("first").expect("a message");
    assert!(first.instances.is_empty(), "{first:?}");
    let mut last = first.revision;

    let written = names("fo", 0..40);
    let old_leader = c.leader().await;
    for (n, id) in written.iter().enumerate() {
        if n == 20 {
            c.kill(old_leader);
        }
        register(&three, "fo", id, 80).await;
    }
    let new_leader = c.leader().await;
    assert_ne!(new_leader, old_leader);

    let mut seen: Vec<String> = Vec::new();
    while seen.len() < written.len() {
        let m = tokio::time::timeout(Duration::from_secs(20), watch.message())
            .await
            .expect("the watch goes on")
            .expect("no error")
            .expect("a message");
        assert_eq!(m.reset, 0, "no reset through a failover: {m:?}");
        assert!(m.revision > last, "revision {} after {last}", m.revision);
        let mut at = last;
        for e in &m.events {
            assert!(e.revision > at, "event at {} after {at}", e.revision);
            at = e.revision;
            let id = e.instance.as_ref().expect("instance").id.clone();
            // A retried write may apply twice: seen once, in write order.
            if seen.last() != Some(&id) {
                seen.push(id);
            }
        }
        last = m.revision;
    }
    assert_eq!(seen, written, "every change, in order, no gap");
}

/// With autopilot on, a dead replica is neither removed nor counted, and a
/// replica added is never promoted, while a dead voter is removed.
#[tokio::test]
async fn autopilot_never_removes_or_promotes_a_replica() {
    let extra = "[autopilot]\nenabled = true\ndead_server_after_ms = 1500\nmin_quorum = 2\n\
                 server_stabilization_time_ms = 60000\n";
    let mut c = TestCluster::start_with(3, extra).await;
    let three = voters_client(&c, &[1, 2, 3]);
    let (r4, r5) = (c.start_spare(), c.start_spare());
    let started = Instant::now();
    add_replica(&c, &three, r4).await;
    // No stabilization wait (a minute here): a replica is not on its way to a vote.
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    add_replica(&c, &three, r5).await;
    c.kill(r5);
    let leader = c.leader().await;
    let dead = (1..=3).find(|&i| i != leader).expect("a follower");
    c.kill(dead);
    // The dead voter goes (it died after the replica, so autopilot has
    // judged the replica dead for longer)...
    let s = c
        .wait_for(
            "autopilot to remove the dead voter",
            Duration::from_secs(20),
            || async {
                let s = c.status(leader).await?;
                (!voters(&s.members).contains(&dead)).then_some(s)
            },
        )
        .await;
    // ... the replicas stay, neither removed nor promoted.
    assert_eq!(replicas(&s.members), BTreeSet::from([r4, r5]), "{s:?}");
    assert!(!voters(&s.members).contains(&r4) && !voters(&s.members).contains(&r5));
    let live: Vec<u64> = (1..=3).filter(|&i| i != dead).collect();
    register(&voters_client(&c, &live), "ap", "ap-1", 80).await;
}
