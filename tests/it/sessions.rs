//! Sessions on a real 3-node cluster: one renewal keeps many instances,
//! expiry ends them all in one revision, renewals through a follower, a
//! failover keeps sessions, the client replaces a session the cluster ended,
//! and only a session's creator or an admin closes it.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use roster::client::RosterClient;
use roster::proto::v1::*;

const TTL: Duration = Duration::from_millis(1500);

async fn instances_of(c: &RosterClient, service: &str) -> Vec<Instance> {
    c.get_service(get_req(service, Consistency::Linearizable))
        .await
        .unwrap_or_else(|e| panic!("get {service}: {e}"))
        .instances
}

/// A session no one renews (beyond what the test does by hand).
async fn bare_session(c: &RosterClient, name: &str, on_end: SessionEnd) -> Session {
    c.create_session(CreateSessionRequest {
        namespace: Default::default(),
        name: name.into(),
        ttl_ms: TTL.as_millis() as u32,
        on_end: on_end as i32,
    })
    .await
    .expect("create session")
    .session
    .expect("session")
}

async fn register_under(c: &RosterClient, session: &str, service: &str, n: usize) {
    for i in 0..n {
        c.register(RegisterRequest {
            namespace: Default::default(),
            instance: Some(instance(service, &format!("{i}"), 80)),
            session: session.into(),
        })
        .await
        .unwrap_or_else(|e| panic!("register {service}/{i} under {session}: {e}"));
    }
}

fn all_passing(v: &[Instance]) -> bool {
    v.iter().all(|i| i.status == HealthStatus::Passing as i32)
}

#[tokio::test]
async fn one_renewal_keeps_many_instances_and_expiry_ends_them_in_one_revision() {
    let c = TestCluster::start(3).await;
    let leader = c.leader().await;
    let follower = (1..=3).find(|&n| n != leader).expect("a follower");
    // Everything goes through a follower: it forwards creations and batches renewals.
    let via = Arc::new(c.node_client(follower));

    let kept = via
        .open_session("kept", TTL, SessionEnd::Critical)
        .await
        .expect("open session");
    for i in 0..20 {
        kept.register(instance("kept", &format!("{i}"), 80))
            .await
            .expect("register under the kept session");
    }
    let lapsing = bare_session(&via, "lapsing", SessionEnd::Critical).await;
    register_under(&via, &lapsing.id, "lapsing", 10).await;

    let listed = via
        .list_sessions(ListSessionsRequest::default())
        .await
        .expect("list sessions")
        .sessions;
    let size = |id: &str| listed.iter().find(|s| s.id == id).map(|s| s.instances);
    assert_eq!(size(&kept.id()), Some(20), "{listed:?}");
    assert_eq!(size(&lapsing.id), Some(10), "{listed:?}");
    let held = instances_of(&via, "kept").await;
    assert!(
        held.iter()
            .all(|i| i.metadata.get("roster.session") == Some(&kept.id())),
        "{held:?}"
    );

    // Renewing by hand through the follower keeps the lapsing session past its TTL...
    let start = Instant::now();
    while start.elapsed() < TTL * 2 {
        let r = via
            .renew_sessions(RenewSessionsRequest {
                ids: vec![lapsing.id.clone()],
            })
            .await
            .expect("renew");
        assert!(r.unknown.is_empty(), "{r:?}");
        assert!(all_passing(&instances_of(&via, "lapsing").await));
        tokio::time::sleep(TTL / 4).await;
    }
    // ...and once it stops, the leader ends it: all ten at one revision.
    let ended = c
        .wait_for(
            "the lapsing session's instances to turn critical",
            TTL * 6,
            || async {
                let v = instances_of(&via, "lapsing").await;
                v.iter()
                    .all(|i| i.status == HealthStatus::Critical as i32)
                    .then_some(v)
            },
        )
        .await;
    let revisions: BTreeSet<u64> = ended.iter().map(|i| i.mod_revision).collect();
    assert_eq!(revisions.len(), 1, "one entry ends them all: {ended:?}");
    for i in &ended {
        assert!(i.check_output.contains("expired"), "{i:?}");
        assert!(!i.metadata.contains_key("roster.session"), "{i:?}");
    }
    let r = via
        .renew_sessions(RenewSessionsRequest {
            ids: vec![lapsing.id.clone(), kept.id()],
        })
        .await
        .expect("renew");
    assert_eq!(r.unknown, vec![lapsing.id.clone()], "the kept one is open");

    // The kept session's background renewals held all twenty all along:
    // longer than its TTL, while the leader's expiry was running.
    assert!(start.elapsed() > TTL * 2);
    assert!(all_passing(&instances_of(&via, "kept").await));
    assert_eq!(
        c.scrape(leader)
            .await
            .lines()
            .find(|l| l.starts_with("roster_registry_sessions "))
            .map(str::to_string),
        Some("roster_registry_sessions 1".to_string())
    );

    // Closing ends them at once, saying so.
    let closed = kept.close().await.expect("close");
    assert_eq!(closed.instances, 20);
    let v = instances_of(&via, "kept").await;
    assert!(v.iter().all(|i| i.status == HealthStatus::Critical as i32
        && i.mod_revision == closed.revision
        && i.check_output.contains("closed")));
}

#[tokio::test]
async fn deregister_on_end_and_refusals() {
    let c = TestCluster::start(3).await;
    let client = c.client();

    let s = bare_session(&client, "gone", SessionEnd::Deregister).await;
    register_under(&client, &s.id, "gone", 5).await;
    let r = client
        .close_session(CloseSessionRequest {
            id: s.id.clone(),
            ..Default::default()
        })
        .await
        .expect("close");
    assert_eq!(r.instances, 5);
    assert!(instances_of(&client, "gone").await.is_empty());
    let e = client
        .close_session(CloseSessionRequest {
            id: s.id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("closed twice");
    assert_eq!(e.code(), roster::client::Code::NotFound, "{e:?}");

    let reg = |session: &str, metadata: &[(&str, &str)]| {
        let mut i = instance("x", "1", 80);
        i.metadata = metadata
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        RegisterRequest {
            namespace: Default::default(),
            instance: Some(i),
            session: session.into(),
        }
    };
    let e = client
        .register(reg(&s.id, &[]))
        .await
        .expect_err("register under a closed session");
    assert_eq!(e.code(), roster::client::Code::NotFound, "{e:?}");
    assert!(e.message().contains("create a new session"), "{e:?}");
    let e = client
        .register(reg("not-a-session", &[]))
        .await
        .expect_err("malformed session id");
    assert_eq!(e.code(), roster::client::Code::InvalidArgument, "{e:?}");
    let e = client
        .register(reg("", &[("roster.session", &s.id)]))
        .await
        .expect_err("reserved metadata key");
    assert_eq!(e.code(), roster::client::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("roster.session"), "{e:?}");
    let e = client
        .create_session(CreateSessionRequest {
            ttl_ms: 500,
            ..Default::default()
        })
        .await
        .expect_err("TTL too short");
    assert_eq!(e.code(), roster::client::Code::InvalidArgument, "{e:?}");
    assert!(
        instances_of(&client, "x").await.is_empty(),
        "nothing stored"
    );

    // A session created without a TTL gets the default.
    let d = client
        .create_session(CreateSessionRequest::default())
        .await
        .expect("default TTL")
        .session
        .expect("session");
    assert_eq!(d.ttl_ms, 10_000);
}

#[tokio::test]
async fn sessions_survive_a_failover_and_the_new_leader_expires_them() {
    let mut c = TestCluster::start(3).await;
    let client = Arc::new(c.client());
    let kept = client
        .open_session("kept", TTL, SessionEnd::Critical)
        .await
        .expect("open session");
    for i in 0..3 {
        kept.register(instance("kept", &format!("{i}"), 80))
            .await
            .expect("register");
    }
    let lapsing = bare_session(&client, "lapsing", SessionEnd::Critical).await;
    register_under(&client, &lapsing.id, "lapsing", 3).await;

    let old = c.leader().await;
    let killed = Instant::now();
    c.kill(old);
    let new = c.leader().await;
    assert_ne!(new, old);
    let elected = Instant::now();
    // The new leader ends the session no one renews (after one TTL of grace)...
    c.wait_for(
        "the new leader to end the unrenewed session",
        TTL * 8,
        || async {
            let v = instances_of(&client, "lapsing").await;
            v.iter()
                .all(|i| i.status == HealthStatus::Critical as i32)
                .then_some(())
        },
    )
    .await;
    // The election came after the kill, and the grace after the election.
    assert!(
        killed.elapsed() >= TTL,
        "one TTL of grace after the election"
    );
    // ...and keeps the one renewed through it, well past its TTL: a window
    // in which nothing may happen, so it is a fixed one (two TTLs from the
    // election; the grace is one).
    tokio::time::sleep((TTL * 2).saturating_sub(elected.elapsed())).await;
    assert!(all_passing(&instances_of(&client, "kept").await));
    let ids: Vec<String> = client
        .list_sessions(ListSessionsRequest::default())
        .await
        .expect("list")
        .sessions
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(ids, vec![kept.id()]);
}

#[tokio::test]
async fn the_client_replaces_a_session_the_cluster_ended() {
    let c = TestCluster::start(3).await;
    let client = Arc::new(c.client());
    let kept = client
        .open_session("replaced", TTL, SessionEnd::Critical)
        .await
        .expect("open session");
    for i in 0..4 {
        kept.register(instance("replaced", &format!("{i}"), 80))
            .await
            .expect("register");
    }
    let first = kept.id();
    // An operator ends it behind the client's back.
    c.client()
        .close_session(CloseSessionRequest {
            id: first.clone(),
            ..Default::default()
        })
        .await
        .expect("close");
    let again = c
        .wait_for(
            "the client to hold its instances under a new session",
            TTL * 4,
            || async {
                let v = instances_of(&client, "replaced").await;
                let held = v.len() == 4
                    && all_passing(&v)
                    && v.iter().all(|i| {
                        i.metadata
                            .get("roster.session")
                            .is_some_and(|s| *s != first)
                    });
                held.then(|| kept.id())
            },
        )
        .await;
    assert_ne!(again, first);
    kept.deregister("replaced", "0").await.expect("deregister");
    let closed = kept.close().await.expect("close");
    assert_eq!(closed.instances, 3);
}

#[tokio::test]
async fn only_its_creator_or_an_admin_closes_a_session() {
    let setup = Setup {
        auth: true,
        ..Setup::default()
    };
    let c = TestCluster::start_setup(3, "[auth]\nenabled = true\n", setup)
        .await
        .expect("an auth cluster");
    let admin = c.client();
    let token = |role: Role| {
        admin.create_token(CreateTokenRequest {
            role: role as i32,
            services: vec!["pay*".into()],
            description: format!("{role:?}"),
        })
    };
    let a = token(Role::Write).await.expect("create token");
    let b = token(Role::Write).await.expect("create token");
    let read = token(Role::Read).await.expect("create token");
    let leader = c.leader_applied().await;
    for n in 1..=3 {
        c.wait_applied(n, leader).await;
    }
    let as_token = |t: &CreatedToken| roster_client(&c.endpoints(), None, Some(&t.secret));
    let (ca, cb, cr) = (as_token(&a), as_token(&b), as_token(&read));

    let s = bare_session(&ca, "a's", SessionEnd::Critical).await;
    assert_eq!(
        Some(s.created_by.as_str()),
        a.token.as_ref().map(|t| t.accessor.as_str())
    );
    register_under(&ca, &s.id, "payments", 2).await;
    let e = ca
        .register(RegisterRequest {
            namespace: Default::default(),
            instance: Some(instance("billing", "1", 80)),
            session: s.id.clone(),
        })
        .await
        .expect_err("outside the token's scope");
    assert_eq!(e.code(), roster::client::Code::PermissionDenied, "{e:?}");
    let e = cr
        .create_session(CreateSessionRequest::default())
        .await
        .expect_err("a read token creates a session");
    assert_eq!(e.code(), roster::client::Code::PermissionDenied, "{e:?}");
    let e = cb
        .close_session(CloseSessionRequest {
            id: s.id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("another token closes it");
    assert_eq!(e.code(), roster::client::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("admin"), "{e:?}");
    assert!(all_passing(&instances_of(&admin, "payments").await));
    let r = admin
        .close_session(CloseSessionRequest {
            id: s.id.clone(),
            ..Default::default()
        })
        .await
        .expect("an admin closes it");
    assert_eq!(r.instances, 2);
    let own = bare_session(&cb, "b's", SessionEnd::Deregister).await;
    cb.close_session(CloseSessionRequest {
        id: own.id,
        ..Default::default()
    })
    .await
    .expect("its creator closes it");
}
