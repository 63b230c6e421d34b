//! The cluster grows from 3 to 5 voters and back, online, without losing writes.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::common::*;
use roster::client::RosterClient;
use roster::proto::v1::*;

fn voters(m: &MembershipResponse) -> BTreeSet<u64> {
    m.members.iter().filter(|m| m.voter).map(|m| m.id).collect()
}

#[tokio::test]
async fn cluster_grows_to_five_voters_and_shrinks_back_online() {
    let mut c = TestCluster::start(3).await;
    // The initial members bootstrap without incarnations; the leader binds them.
    assert_eq!(c.wait_bound().await.len(), 3);
    let client = c.client();
    let mut expected = Vec::new();
    for n in 0..20 {
        register(&client, "grow", &format!("g-{n}"), 80).await;
        expected.push(format!("g-{n}"));
    }

    let (n4, n5) = (c.start_spare(), c.start_spare());
    // Peers dial what a node advertises: added under another address, it is refused.
    let other = c.endpoint(n4).replace("127.0.0.1", "localhost");
    let e = client
        .add_member(AddMemberRequest {
            id: n4,
            address: other,
            replica: false,
        })
        .await
        .expect_err("another address than the node advertises");
    assert_eq!(e.code(), roster::client::Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message()
            .contains(&format!("advertises {}", c.endpoint(n4))),
        "{e:?}"
    );
    for id in [n4, n5] {
        let r = client
            .add_member(AddMemberRequest {
                id,
                address: c.endpoint(id),
                replica: false,
            })
            .await
            .unwrap_or_else(|e| panic!("add node {id}: {e}"));
        assert!(voters(&r).contains(&id), "{r:?}");
        // Added bound to its data directory, at the address it advertises.
        let own = c.status(id).await.expect("status");
        assert_eq!(own.advertise_address, c.endpoint(id));
        let own = own.incarnation;
        let member = r.members.iter().find(|m| m.id == id).expect("member");
        assert!(own != 0 && member.incarnation == own, "{r:?}");
        // Its peer address, asked of the node itself.
        assert_eq!(member.peer_address, c.node(id).peer, "{r:?}");
    }
    let all = c.client();
    let m = c.status(c.leader().await).await.expect("status");
    assert_eq!(m.members.iter().filter(|m| m.voter).count(), 5, "{m:?}");
    // The initial members were known by their peer addresses only; the leader
    // has learned where each serves clients.
    for member in &m.members {
        assert_eq!(member.address, c.endpoint(member.id), "{m:?}");
        assert_eq!(member.peer_address, c.node(member.id).peer, "{m:?}");
    }
    for n in 20..30 {
        register(&all, "grow", &format!("g-{n}"), 80).await;
        expected.push(format!("g-{n}"));
    }
    expected.sort();
    let at = c.leader_applied().await;
    for id in [n4, n5] {
        c.wait_applied(id, at).await;
        assert_eq!(
            ids(&c.node_client(id), "grow", Consistency::Stale).await,
            expected,
            "node {id}"
        );
    }

    // Five voters survive two failures, the leader among them.
    let leader = c.leader().await;
    let other = (1..=5).find(|&i| i != leader).expect("another node");
    c.kill(leader);
    c.kill(other);
    for n in 30..40 {
        register(&all, "grow", &format!("g-{n}"), 80).await;
        expected.push(format!("g-{n}"));
    }
    c.start_node(leader);
    c.start_node(other);
    c.leader().await;

    // Back to three, once the restarted nodes have caught up (a leader that
    // is removed hands leadership to one of them).
    let applied = c.leader_applied().await;
    for id in 1..=5 {
        c.wait_applied(id, applied).await;
    }
    for id in [n4, n5] {
        // UNAVAILABLE (no hand-over in time) is to be retried, as it says.
        let r = c
            .wait_for("the removal", Duration::from_secs(20), || async {
                match all.remove_member(RemoveMemberRequest { id }).await {
                    Ok(r) => Some(r),
                    Err(e) if e.code() == roster::client::Code::Unavailable => None,
                    Err(e) => panic!("remove node {id}: {e}"),
                }
            })
            .await;
        assert!(!voters(&r).contains(&id), "{r:?}");
    }
    // Removed, still running: no series of theirs on the leader, and
    // `roster status` says they are no members, which they may never learn.
    // (Not c.leader(): the removed nodes soon know no leader.)
    let leader = c
        .wait_for(
            "a leader among the three",
            Duration::from_secs(20),
            || async {
                let l = c.status(1).await?.leader_id;
                (l != 0 && ![n4, n5].contains(&l)).then_some(l)
            },
        )
        .await;
    let metrics = c.scrape(leader).await;
    assert!(metrics.contains("roster_raft_is_leader 1"), "{metrics}");
    for id in [n4, n5] {
        assert!(!metrics.contains(&format!("peer=\"{id}\"")), "{metrics}");
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_roster"))
        .args(["status", "--endpoints", &c.endpoints().join(",")])
        .output()
        .expect("run roster status");
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{status}");
    let line = |id: u64| {
        let prefix = format!("{}: ", c.endpoint(id));
        status
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no node {id} in {status}"))
    };
    for id in 1..=3 {
        assert!(line(id).contains(&format!("node {id} ")), "{status}");
        assert!(!line(id).contains("(not a member"), "{status}");
    }
    // Both still run: a leader asked to remove itself hands leadership on first.
    for id in [n4, n5] {
        assert!(line(id).contains("(not a member"), "{status}");
    }
    c.kill(n4);
    c.kill(n5);
    let three = c.client();
    let m = c.status(c.leader().await).await.expect("status");
    let left: BTreeSet<u64> = m.members.iter().filter(|m| m.voter).map(|m| m.id).collect();
    assert_eq!(left, BTreeSet::from([1, 2, 3]));
    assert_eq!(c.wait_bound().await.len(), 3);
    for n in 40..45 {
        register(&three, "grow", &format!("g-{n}"), 80).await;
        expected.push(format!("g-{n}"));
    }
    expected.sort();
    assert_eq!(
        ids(&three, "grow", Consistency::Linearizable).await,
        expected
    );

    let e = three
        .remove_member(RemoveMemberRequest { id: 9 })
        .await
        .expect_err("unknown node");
    assert_eq!(e.code(), roster::client::Code::NotFound);
    let e = three
        .add_member(AddMemberRequest {
            id: 6,
            address: "no port".into(),
            replica: false,
        })
        .await
        .expect_err("bad address");
    assert_eq!(e.code(), roster::client::Code::InvalidArgument);
}

#[tokio::test]
async fn the_leader_reports_each_members_lag_and_last_contact() {
    let mut c = TestCluster::start(3).await;
    let leader = c.leader().await;
    let client = c.client();
    register(&client, "lag", "l-0", 80).await;
    // Healthy followers: caught up, and heard from within the last second.
    let healthy =
        |m: &Member| m.lag_entries == Some(0) && m.last_contact_ms.is_some_and(|t| t < 1_000.0);
    let s = c
        .wait_for(
            "the followers to be caught up",
            Duration::from_secs(10),
            || async {
                let s = c.status(leader).await?;
                s.members
                    .iter()
                    .filter(|m| m.id != leader)
                    .all(healthy)
                    .then_some(s)
            },
        )
        .await;
    let own = s.members.iter().find(|m| m.id == leader).expect("leader");
    assert_eq!(
        (own.lag_entries, own.last_contact_ms),
        (None, None),
        "{s:?}"
    );
    // Followers do not know: only the leader reports health.
    let follower = (1..=3).find(|&i| i != leader).expect("a follower");
    let theirs = c.status(follower).await.expect("follower status");
    assert!(
        theirs.members.iter().all(|m| m.lag_entries.is_none()),
        "{theirs:?}"
    );

    // A dead follower falls behind and goes silent.
    c.kill(follower);
    for n in 1..=5 {
        register(&client, "lag", &format!("l-{n}"), 80).await;
    }
    c.wait_for(
        "the dead follower's lag and silence",
        Duration::from_secs(10),
        || async {
            let s = c.status(leader).await?;
            let m = s.members.iter().find(|m| m.id == follower)?;
            (m.lag_entries.is_some_and(|l| l >= 5)
                && m.last_contact_ms.is_some_and(|t| t > 1_000.0))
            .then_some(())
        },
    )
    .await;
}

/// `[autopilot]`: a dead voter is removed while `min_quorum` voters remain,
/// kept (and said so) when removing it would leave fewer, and a node added
/// becomes a voter only after it has stayed caught up for the stabilization time.
#[tokio::test]
async fn autopilot_removes_dead_voters_down_to_min_quorum_and_promotes_stable_nodes() {
    let extra = "[autopilot]\nenabled = true\ndead_server_after_ms = 1500\nmin_quorum = 3\n\
                 server_stabilization_time_ms = 1000\n";
    let mut c = TestCluster::start_with(4, extra).await;
    let leader = c.leader().await;
    let voters = |s: &StatusResponse| -> BTreeSet<u64> {
        s.members.iter().filter(|m| m.voter).map(|m| m.id).collect()
    };
    let mut followers = (1..=4).filter(|&i| i != leader);
    let (a, b) = (followers.next().expect("a"), followers.next().expect("b"));

    c.kill(a);
    c.wait_for(
        "autopilot to remove the dead voter",
        Duration::from_secs(20),
        || async {
            let s = c.status(leader).await?;
            (!voters(&s).contains(&a)).then_some(())
        },
    )
    .await;
    assert_eq!(voters(&c.status(leader).await.expect("status")).len(), 3);
    register(&c.client(), "payments", "p-1", 80).await;

    // Three voters left: removing another would leave two, below min_quorum.
    c.kill(b);
    c.wait_for(
        "autopilot to keep the second dead voter",
        Duration::from_secs(20),
        || async {
            c.log(leader)
                .contains("autopilot keeps a dead voter")
                .then_some(())
        },
    )
    .await;
    let s = c.status(leader).await.expect("status");
    assert!(voters(&s).contains(&b), "{s:?}");
    register(&c.client(), "payments", "p-2", 80).await;

    let spare = c.start_spare();
    let started = std::time::Instant::now();
    c.client()
        .add_member(AddMemberRequest {
            id: spare,
            address: c.endpoint(spare),
            replica: false,
        })
        .await
        .expect("add a member");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "promoted after {:?}, before the stabilization time",
        started.elapsed()
    );
    assert!(c
        .log(leader)
        .contains("autopilot: member caught up and stable"));
    let s = c.status(leader).await.expect("status");
    assert!(voters(&s).contains(&spare), "{s:?}");
}

#[tokio::test]
async fn a_leader_asked_to_remove_itself_hands_over_first_and_keeps_running() {
    let mut c = TestCluster::start(3).await;
    let leader = c.leader().await;
    register(&c.client(), "web", "w-0", 80).await;
    // Asked through itself, the node that is removed.
    let r = c
        .node_client(leader)
        .remove_member(RemoveMemberRequest { id: leader })
        .await
        .expect("remove the leader");
    assert!(!voters(&r).contains(&leader), "{r:?}");
    assert_eq!(voters(&r).len(), 2, "{r:?}");
    let others: Vec<u64> = (1..=3).filter(|&i| i != leader).collect();
    let new_leader = c
        .wait_for(
            "a leader among the other two",
            Duration::from_secs(20),
            || async {
                let l = c.status(others[0]).await?.leader_id;
                others.contains(&l).then_some(l)
            },
        )
        .await;
    assert_ne!(new_leader, leader);
    assert!(
        c.exited(leader).is_none(),
        "the removed leader is still running"
    );
    let two = RosterClient::new(&others.iter().map(|&i| c.endpoint(i)).collect::<Vec<_>>())
        .expect("client");
    register(&two, "web", "w-1", 81).await;
}
