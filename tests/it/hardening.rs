//! Faults and misuse a production registry meets, each against real `roster
//! server` processes: a stopped or isolated leader, writes whose outcome is
//! unknown, requests that must change nothing, bad bytes, a full disk.

use std::time::{Duration, Instant};

use crate::common::faults::Tmpfs;
use crate::common::*;
use roster::proto::v1::registry_client::RegistryClient;
use roster::proto::v1::*;
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

async fn raw(c: &TestCluster, id: u64) -> RegistryClient<Channel> {
    RegistryClient::connect(format!("http://{}", c.endpoint(id)))
        .await
        .expect("connect")
}

fn register_req(service: &str, id: &str) -> RegisterRequest {
    RegisterRequest {
        instance: Some(instance(service, id, 80)),
        ..Default::default()
    }
}

async fn health(c: &TestCluster, id: u64, service: &str) -> ServingStatus {
    let ch = Channel::from_shared(format!("http://{}", c.endpoint(id)))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let r = HealthClient::new(ch)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("health check");
    ServingStatus::try_from(r.into_inner().status).expect("known status")
}

fn followers(c: &TestCluster, leader: u64) -> Vec<u64> {
    c.nodes
        .iter()
        .map(|n| n.id)
        .filter(|id| *id != leader)
        .collect()
}

#[tokio::test]
async fn sigterm_on_the_leader_hands_leadership_over_before_exiting() {
    let mut c = TestCluster::start(3).await;
    let client = c.client();
    register(&client, "api", "a-1", 80).await;
    let leader = c.leader().await;

    c.signal(leader, "TERM");
    let exit = c.wait_exit(leader, Duration::from_secs(10)).await;
    assert!(exit.success(), "a stopped node exits cleanly: {exit:?}");
    // The leader waited for a successor before exiting: one is in charge at
    // once, without the election timeout a crash would cost.
    let mut successor = None;
    for id in followers(&c, leader) {
        let s = c.status(id).await.expect("status of a running node");
        if s.role == "leader" {
            successor = Some((id, s.term));
        }
    }
    let (new_leader, _) = successor.unwrap_or_else(|| {
        panic!(
            "no leader among the others the moment node {leader} exited; logs in {}",
            c.dir.path().display()
        )
    });
    register(&client, "api", "a-2", 80).await;
    assert_eq!(
        ids(&c.node_client(new_leader), "api", Consistency::Linearizable).await,
        ["a-1", "a-2"]
    );

    c.start_node(leader);
    c.wait_for(
        "the restarted node to rejoin",
        Duration::from_secs(20),
        || async { c.status(leader).await.filter(|s| s.leader_id == new_leader) },
    )
    .await;
    let errors = c.logged_errors(leader);
    assert!(
        errors.is_empty(),
        "a normal restart logs no ERROR: {errors:?}"
    );
}

/// A rolling restart as clients see it: writes that reach the leader while
/// it hands leadership on are held and forwarded to its successor, so they
/// are answered, not refused; none is left with an unknown outcome.
#[tokio::test]
async fn writes_reaching_a_stopping_leader_are_forwarded_to_its_successor() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    let mut c = TestCluster::start(3).await;
    let leader = c.leader().await;
    let written = Arc::new(AtomicUsize::new(0));
    // Four writers back to back on the leader's own connection, each until
    // its first error (the node refusing as it stops, or gone).
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (endpoint, written) = (c.endpoint(leader), written.clone());
            tokio::spawn(async move {
                let mut api = RegistryClient::connect(format!("http://{endpoint}"))
                    .await
                    .expect("connect");
                let mut forwarded = 0;
                for n in 0.. {
                    let req = register_req("rolling", &format!("w{w}-{n}"));
                    match api.register(req).await {
                        Ok(r) => {
                            written.fetch_add(1, Ordering::Relaxed);
                            forwarded += usize::from(r.metadata().contains_key("roster-forwarded"));
                        }
                        Err(e) => return (forwarded, e),
                    }
                }
                unreachable!("the loop ends at the first error")
            })
        })
        .collect();
    c.wait_for("writes to flow", Duration::from_secs(10), || async {
        (written.load(Ordering::Relaxed) >= 40).then_some(())
    })
    .await;
    c.signal(leader, "TERM");
    let exit = c.wait_exit(leader, Duration::from_secs(10)).await;
    assert!(exit.success(), "a stopped node exits cleanly: {exit:?}");
    let mut forwarded = 0;
    for w in writers {
        let (f, last) = w.await.expect("writer");
        forwarded += f;
        assert!(
            !matches!(last.code(), Code::Aborted | Code::DeadlineExceeded),
            "no write to a stopping leader is left with an unknown outcome: {last:?}"
        );
    }
    assert!(
        forwarded > 0,
        "writes that arrived during the hand-over were forwarded to the new leader; logs in {}",
        c.dir.path().display()
    );
}

#[tokio::test]
async fn an_isolated_leader_steps_down_and_fails_fast() {
    let mut c = TestCluster::start(3).await;
    let leader = c.leader().await;
    c.wait_for("a ready leader", Duration::from_secs(5), || async {
        (health(&c, leader, "roster.v1.Registry").await == ServingStatus::Serving).then_some(())
    })
    .await;
    for f in followers(&c, leader) {
        c.kill(f);
    }
    c.wait_for(
        "the isolated leader to step down",
        Duration::from_secs(5),
        || async { c.status(leader).await.filter(|s| s.role != "leader") },
    )
    .await;

    let mut api = raw(&c, leader).await;
    let started = Instant::now();
    let err = api
        .register(register_req("api", "lonely"))
        .await
        .expect_err("no quorum, no write");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "failing took {:?}",
        started.elapsed()
    );
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("not applied"), "{}", err.message());

    let started = Instant::now();
    let err = api
        .get_service(get_req("api", Consistency::Linearizable))
        .await
        .expect_err("no quorum, no linearizable read");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        !err.message().contains("Membership") && !err.message().contains('{'),
        "a readable message, not a debug dump: {}",
        err.message()
    );

    // Readiness follows; liveness stays a plain "the process runs".
    c.wait_for(
        "NOT_SERVING for the registry",
        Duration::from_secs(5),
        || async {
            (health(&c, leader, "roster.v1.Registry").await == ServingStatus::NotServing)
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        health(&c, leader, "roster.v1.Cluster").await,
        ServingStatus::NotServing
    );
    assert_eq!(health(&c, leader, "").await, ServingStatus::Serving);
}

#[tokio::test]
async fn a_write_cut_off_mid_flight_is_reported_as_unknown_and_refused_ones_never_apply() {
    let c = TestCluster::start(3).await;
    let leader = c.leader().await;
    let mut api = raw(&c, leader).await;
    for f in followers(&c, leader) {
        c.signal(f, "STOP");
    }
    // Proposed, then the quorum is gone: the leader cannot know whether the
    // entry will be committed by the next leader.
    let err = api
        .register(register_req("api", "in-flight"))
        .await
        .expect_err("no quorum");
    assert!(
        matches!(err.code(), Code::Aborted | Code::DeadlineExceeded),
        "{err:?}"
    );
    assert!(
        err.message().contains("outcome unknown"),
        "{}",
        err.message()
    );

    // Once it has stepped down, nothing is proposed: UNAVAILABLE means not applied.
    c.wait_for(
        "the leader to step down",
        Duration::from_secs(5),
        || async { c.status(leader).await.filter(|s| s.role != "leader") },
    )
    .await;
    let err = api
        .register(register_req("api", "refused"))
        .await
        .expect_err("no leader");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    for f in followers(&c, leader) {
        c.signal(f, "CONT");
    }
    c.leader().await;
    let client = c.client();
    register(&client, "api", "after", 80).await;
    let now = ids(&client, "api", Consistency::Linearizable).await;
    assert!(!now.contains(&"refused".to_string()), "{now:?}");
    assert!(now.contains(&"after".to_string()));
}

#[tokio::test]
async fn deregistering_an_unknown_instance_changes_nothing_stored() {
    let c = TestCluster::start(3).await;
    let client = c.client();
    register(&client, "api", "a-1", 80).await;
    // Binding members to their data directories appends a membership entry of
    // its own shortly after start: let it land everywhere first.
    c.wait_bound().await;
    let last = c.wait_applied(c.leader().await, 0).await.last_log_index;
    for node in 1..=3 {
        c.wait_applied(node, last).await;
    }
    let logs = || async {
        let mut v = Vec::new();
        for node in 1..=3 {
            let s = c.status(node).await?;
            v.push((s.term, s.last_log_index));
        }
        Some(v)
    };
    // A leader change appends an entry of its own: measure within one term.
    c.wait_for(
        "NOT_FOUND answers within one term",
        Duration::from_secs(60),
        || async {
            let before = logs().await?;
            for node in 1..=3 {
                let mut api = raw(&c, node).await;
                for i in 0..20 {
                    let err = api
                        .deregister(DeregisterRequest {
                            namespace: Default::default(),
                            service: "api".into(),
                            id: format!("ghost-{i}"),
                        })
                        .await
                        .expect_err("unknown instance");
                    if err.code() == Code::Unavailable {
                        return None;
                    }
                    assert_eq!(err.code(), Code::NotFound, "{err:?}");
                }
            }
            let after = logs().await?;
            let same_term = before.iter().zip(&after).all(|(b, a)| b.0 == a.0);
            if same_term {
                assert_eq!(before, after, "NOT_FOUND answers appended entries");
            }
            same_term.then_some(())
        },
    )
    .await;
    // A known one still goes through, from any node.
    let r = c
        .wait_for(
            "a deregister through node 2",
            Duration::from_secs(10),
            || async {
                raw(&c, 2)
                    .await
                    .deregister(DeregisterRequest {
                        namespace: Default::default(),
                        service: "api".into(),
                        id: "a-1".into(),
                    })
                    .await
                    .ok()
            },
        )
        .await;
    assert!(r.into_inner().revision > 0);
}

#[tokio::test]
async fn a_watch_from_a_future_revision_is_refused_and_compaction_is_reported() {
    // Snapshots every few entries, so that the restart below starts from one.
    let mut c = TestCluster::start_with(3, "[raft]\nsnapshot_after_entries = 4\n").await;
    let client = c.client();
    let rev = register(&client, "api", "a-1", 80).await.revision;
    let leader = c.leader().await;
    for node in 1..=3 {
        let err = raw(&c, node)
            .await
            .watch(WatchRequest {
                namespace: Default::default(),
                service: "api".into(),
                since_revision: rev + 3,
            })
            .await
            .expect_err("future revision");
        assert_eq!(err.code(), Code::OutOfRange, "node {node}: {err:?}");
    }
    // The current revision is fine, and the next change arrives.
    let follower = followers(&c, leader)[0];
    let mut w = raw(&c, follower)
        .await
        .watch(WatchRequest {
            namespace: Default::default(),
            service: "api".into(),
            since_revision: rev,
        })
        .await
        .expect("watch")
        .into_inner();
    let next = register(&client, "api", "a-2", 80).await.revision;
    let m = w.message().await.expect("stream").expect("message");
    assert_eq!(m.revision, next, "{m:?}");
    assert_eq!(
        m.events[0].instance.as_ref().map(|i| i.id.as_str()),
        Some("a-2")
    );

    for n in 3..10 {
        register(&client, "api", &format!("a-{n}"), 80).await;
    }
    let next = register(&client, "api", "a-10", 80).await.revision;

    // A restarted node starts from its snapshot and replays the log after it:
    // its history begins at the snapshot, and it says so to an older watch.
    c.signal(follower, "TERM");
    c.wait_exit(follower, Duration::from_secs(10)).await;
    c.start_node(follower);
    let s = c.wait_applied(follower, next).await;
    let mut w = raw(&c, follower)
        .await
        .watch(WatchRequest {
            namespace: Default::default(),
            service: "api".into(),
            since_revision: 1,
        })
        .await
        .expect("watch")
        .into_inner();
    let m = w.message().await.expect("stream").expect("message");
    assert_eq!(m.reset, ResetReason::Compacted as i32);
    assert!(
        m.compact_revision > 1 && m.compact_revision <= s.applied_index,
        "compact_revision {} should be where the restarted node's history begins",
        m.compact_revision
    );
    assert!(m.compact_revision <= s.snapshot_index, "{m:?} {s:?}");
}

/// Sends raw bytes as a gRPC request body.
#[derive(Clone, Default)]
struct RawCodec;

struct RawBytes;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawBytes;
    type Decoder = RawBytes;
    fn encoder(&mut self) -> RawBytes {
        RawBytes
    }
    fn decoder(&mut self) -> RawBytes {
        RawBytes
    }
}

impl tonic::codec::Encoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf;
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

#[tokio::test]
async fn undecodable_requests_are_invalid_arguments() {
    let c = TestCluster::start(1).await;
    let ch = Channel::from_shared(format!("http://{}", c.endpoint(1)))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready().await.expect("ready");
    let err = grpc
        .unary(
            tonic::Request::new(vec![0xff; 16]),
            tonic::codegen::http::uri::PathAndQuery::from_static("/roster.v1.Registry/Register"),
            RawCodec,
        )
        .await
        .expect_err("garbage is refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("RegisterRequest"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn a_follower_says_which_leader_it_could_not_reach() {
    let mut c = TestCluster::start(3).await;
    // A follower that has just forwarded to the leader, which still leads.
    let (leader, api) = c
        .wait_for(
            "a write forwarded to the leader",
            Duration::from_secs(20),
            || async {
                let leader = c.leader().await;
                let mut api = raw(&c, followers(&c, leader)[0]).await;
                api.register(register_req("api", "warm")).await.ok()?;
                (c.leader().await == leader).then_some((leader, api))
            },
        )
        .await;
    c.kill(leader);
    // Until the follower notices, it still forwards to the dead leader. A
    // request in flight on the old connection may have an unknown outcome
    // (ABORTED); once the connection is refused, the request was never sent.
    let expected = format!("forwarding to leader {leader} at {}", c.node(leader).peer);
    let seen = c
        .wait_for(
            "a refused forward naming the leader",
            Duration::from_secs(5),
            || {
                let mut api = api.clone();
                let expected = expected.clone();
                async move {
                    let err = api.register(register_req("api", "x")).await.err()?;
                    assert!(
                        matches!(err.code(), Code::Unavailable | Code::Aborted),
                        "{err:?}"
                    );
                    (err.code() == Code::Unavailable && err.message().contains(&expected))
                        .then_some(err)
                }
            },
        )
        .await;
    assert!(
        seen.message().contains("not applied"),
        "connection refused: never sent: {}",
        seen.message()
    );
}

#[tokio::test]
async fn a_down_peer_is_logged_when_it_goes_not_on_every_rpc() {
    let mut c = TestCluster::start(3).await;
    let client = c.client();
    let leader = c.leader().await;
    let down = followers(&c, leader)[0];
    c.kill(down);
    // Hundreds of heartbeats and appends to the dead peer fail meanwhile.
    for i in 0..300 {
        register(&client, "api", &format!("i-{i}"), 80).await;
    }
    let leader = c.leader().await;
    let log = c.log(leader);
    let loud: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    assert!(
        loud.iter()
            .any(|l| l.contains(&format!("cannot reach node {down} at"))),
        "the outage is reported:\n{log}"
    );
    assert!(
        loud.len() <= 3,
        "{} warnings and errors:\n{log}",
        loud.len()
    );
}

#[tokio::test]
async fn a_full_disk_stops_the_node_and_loses_nothing_acknowledged() {
    let mut c = TestCluster::start(3).await;
    let client = c.client();
    register(&client, "api", "before", 80).await;
    let leader = c.leader().await;
    let node = followers(&c, leader)[0];
    c.signal(node, "TERM");
    c.wait_exit(node, Duration::from_secs(10)).await;
    let Some(disk) = Tmpfs::over(&c.data_dir(node), 48) else {
        eprintln!("skipping: mounting a tmpfs needs root");
        return;
    };
    c.start_node(node);
    let applied = c.leader_applied().await;
    c.wait_applied(node, applied).await;

    disk.fill();
    // Writes go on through the other two; the full node must stop, not limp on.
    let mut acked = vec!["before".to_string()];
    let mut n = 0;
    let status = loop {
        n += 1;
        let id = format!("w-{n}");
        let mut inst = instance("api", &id, 80);
        inst.metadata.insert("pad".into(), "x".repeat(2000));
        if client
            .register(RegisterRequest {
                instance: Some(inst),
                ..Default::default()
            })
            .await
            .is_ok()
        {
            acked.push(id);
        }
        if let Some(status) = c.exited(node) {
            break status;
        }
        assert!(n < 5_000, "node {node} kept running on a full disk");
    };
    assert!(!status.success(), "exit status {status:?}");
    let log = c.log(node);
    assert!(
        log.contains("No space left on device") || log.contains("storage"),
        "the log says why:\n{log}"
    );

    // Nothing acknowledged is lost, and the node comes back once there is room.
    acked.sort();
    assert_eq!(ids(&client, "api", Consistency::Linearizable).await, acked);
    disk.free();
    c.start_node(node);
    let applied = c.leader_applied().await;
    c.wait_applied(node, applied).await;
    assert_eq!(
        ids(&c.node_client(node), "api", Consistency::Stale).await,
        acked
    );
    c.kill(node);
}

#[tokio::test]
async fn a_follower_forwards_every_rpc_and_a_forwarded_one_names_the_leader() {
    let c = TestCluster::start(3).await;
    let leader = c.leader().await;
    let follower = followers(&c, leader)[0];
    // The leader learns its members' client addresses from their first answers.
    c.wait_for(
        "the follower to know the leader's client address",
        Duration::from_secs(10),
        || async {
            c.status(follower)
                .await
                .filter(|s| s.leader_id == leader && s.leader_address == c.endpoint(leader))
        },
    )
    .await;
    let mut api = raw(&c, follower).await;
    // Writes and linearizable reads sent to a follower are done by the leader.
    let rev = api
        .register(register_req("fwd", "a"))
        .await
        .expect("register through a follower")
        .into_inner()
        .revision;
    let got = api
        .get_service(GetServiceRequest {
            service: "fwd".into(),
            consistency: Consistency::Linearizable as i32,
            ..Default::default()
        })
        .await
        .expect("linearizable read through a follower")
        .into_inner();
    assert!(got.revision >= rev, "{got:?}");
    assert_eq!(got.instances.len(), 1);
    // What comes in on the peer port, as forwarded requests do, is never
    // forwarded again: the follower refuses, naming the leader (by its client
    // address) in the message and in metadata.
    let mut peer_port = RegistryClient::connect(format!("http://{}", c.node(follower).peer))
        .await
        .expect("connect to the follower's peer port");
    let err = peer_port
        .register(register_req("fwd", "b"))
        .await
        .expect_err("a follower refuses");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let named = |k| err.metadata().get(k).and_then(|v| v.to_str().ok());
    assert_eq!(named("roster-leader-id"), Some(leader.to_string().as_str()));
    assert_eq!(
        named("roster-leader-address"),
        Some(c.endpoint(leader).as_str())
    );
    assert!(err.message().contains("not applied"), "{}", err.message());
    // Nothing of the refused request was applied.
    let after = raw(&c, leader)
        .await
        .get_service(GetServiceRequest {
            service: "fwd".into(),
            consistency: Consistency::Linearizable as i32,
            ..Default::default()
        })
        .await
        .expect("read on the leader")
        .into_inner();
    assert_eq!(after.instances.len(), 1, "{after:?}");
}
