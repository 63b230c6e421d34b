//! Networks as they are: latency between nodes, slow and lossy links, nodes
//! cut off and coming back. Faults are injected by the harness's proxy in
//! front of each node's peer address, so they hit node-to-node traffic only;
//! the test's own requests go straight to a node, over a raw gRPC client that
//! never retries, so every failure a client would see is counted.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::proxy::{Dir, Link};
use crate::common::*;
use roster::proto::v1::registry_client::RegistryClient;
use roster::proto::v1::*;
use tonic::transport::Channel;

async fn proxied(n: u64) -> TestCluster {
    let setup = Setup {
        proxies: true,
        ..Setup::default()
    };
    TestCluster::start_setup(n, "", setup)
        .await
        .expect("a proxied cluster needs nothing special")
}

fn delay(ms: u64) -> Link {
    Link {
        delay: Duration::from_millis(ms),
        ..Link::default()
    }
}

/// A client of node `id` alone, with no retries.
async fn raw(c: &TestCluster, id: u64) -> RegistryClient<Channel> {
    RegistryClient::connect(format!("http://{}", c.endpoint(id)))
        .await
        .expect("connect")
}

async fn write(
    client: &mut RegistryClient<Channel>,
    service: &str,
    id: &str,
) -> Result<(), String> {
    client
        .register(RegisterRequest {
            instance: Some(instance(service, id, 80)),
            ..Default::default()
        })
        .await
        .map(|_| ())
        .map_err(|s| format!("register {service}/{id}: {:?} {}", s.code(), s.message()))
}

/// A linearizable read that must see `id`.
async fn read(client: &mut RegistryClient<Channel>, service: &str, id: &str) -> Result<(), String> {
    let r = client
        .get_service(get_req(service, Consistency::Linearizable))
        .await
        .map_err(|s| format!("get {service}: {:?} {}", s.code(), s.message()))?;
    match r.into_inner().instances.iter().any(|i| i.id == id) {
        true => Ok(()),
        false => Err(format!("linearizable read of {service} misses {id}")),
    }
}

fn followers(leader: u64) -> Vec<u64> {
    (1..=3).filter(|&i| i != leader).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_and_writes_work_with_20_50_and_100_ms_between_nodes() {
    let c = proxied(3).await;
    let leader = c.leader().await;
    let term = c.status(leader).await.expect("leader status").term;
    for ms in [20, 50, 100] {
        // Every node-to-node message takes `ms` more: a round trip of `ms`.
        for p in &c.proxies {
            p.set(Dir::ToTarget, delay(ms));
        }
        for node in [leader, followers(leader)[0]] {
            let mut client = raw(&c, node).await;
            for i in 0..5 {
                let id = format!("d{ms}-n{node}-{i}");
                let took = Instant::now();
                write(&mut client, "far", &id).await.expect("write");
                read(&mut client, "far", &id).await.expect("read");
                // A write waits for a follower, a read for a quorum's word.
                assert!(took.elapsed() >= Duration::from_millis(2 * ms));
            }
        }
        // The leader measures the round trip to each follower.
        c.wait_for(
            &format!("the leader to measure {ms} ms to its followers"),
            Duration::from_secs(10),
            || async {
                let s = c.status(leader).await?;
                let rtts: Vec<f64> = s.members.iter().filter_map(|m| m.rtt_ms).collect();
                (rtts.len() == 2
                    && rtts
                        .iter()
                        .all(|r| *r >= ms as f64 * 0.9 && *r < ms as f64 + 100.0))
                .then_some(())
            },
        )
        .await;
    }
    let s = c.status(leader).await.expect("leader status");
    assert_eq!(
        (s.leader_id, s.term),
        (leader, term),
        "latency alone must not move leadership"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wan_profile_works_with_400_ms_round_trips() {
    let setup = Setup {
        proxies: true,
        ..Setup::default()
    };
    let c = TestCluster::start_setup(3, "[raft]\nnetwork = \"wan\"\n", setup)
        .await
        .expect("a proxied cluster");
    let leader = c.leader().await;
    let term = c.status(leader).await.expect("leader status").term;
    // 200 ms each way: beyond the lan profile's deadline of 500 ms once a
    // retransmission is added, within the wan profile's.
    for p in &c.proxies {
        p.set_both(delay(200));
    }
    for node in [leader, followers(leader)[0]] {
        let mut client = raw(&c, node).await;
        for i in 0..3 {
            let id = format!("wan-n{node}-{i}");
            write(&mut client, "wan", &id).await.expect("write");
            read(&mut client, "wan", &id).await.expect("read");
        }
    }
    let s = c.status(leader).await.expect("leader status");
    assert_eq!((s.leader_id, s.term), (leader, term));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linearizable_reads_reuse_the_peer_connections() {
    let c = proxied(3).await;
    let leader = c.leader().await;
    let mut client = raw(&c, leader).await;
    write(&mut client, "conn", "c-1").await.expect("write");
    read(&mut client, "conn", "c-1").await.expect("read");
    let accepted =
        |c: &TestCluster| -> u64 { c.proxies.iter().map(|p| p.connections_accepted()).sum() };
    let before = accepted(&c);
    for _ in 0..200 {
        read(&mut client, "conn", "c-1").await.expect("read");
    }
    let opened = accepted(&c) - before;
    assert!(
        opened == 0,
        "200 linearizable reads opened {opened} new node-to-node connections"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_behind_a_slow_lossy_link_keeps_up() {
    let c = proxied(3).await;
    let leader = c.leader().await;
    let far = followers(leader)[1];
    // What its interface would do with 100 ms of delay on what it sends and
    // 5% loss both ways: a lost segment stalls its stream for a
    // retransmission timeout (200 ms).
    let lossy = Link {
        loss: 0.05,
        stall: Duration::from_millis(200),
        ..Link::default()
    };
    c.proxy(far).set(
        Dir::FromTarget,
        Link {
            delay: Duration::from_millis(100),
            ..lossy.clone()
        },
    );
    c.proxy(far).set(Dir::ToTarget, lossy);
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (stop, written) = (stop.clone(), written.clone());
        let mut client = raw(&c, leader).await;
        writers.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                write(&mut client, "load", &format!("w{w}-{i}"))
                    .await
                    .expect("a write to the leader");
                written.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        }));
    }
    // Sample the lag in entries while the load runs.
    let start_applied = c.status(far).await.expect("status").applied_index;
    let mut max_lag = 0;
    let load_until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < load_until {
        let lead = c.status(leader).await.expect("leader status").applied_index;
        let mine = c.status(far).await.expect("status").applied_index;
        max_lag = max_lag.max(lead.saturating_sub(mine));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer");
    }
    let target = c.status(leader).await.expect("leader status").applied_index;
    let caught_up = Instant::now();
    c.wait_applied(far, target).await;
    let catch_up = caught_up.elapsed();
    eprintln!(
        "{} writes; slow follower: max lag {max_lag} entries, caught up {catch_up:?} after the load",
        written.load(Ordering::Relaxed)
    );
    assert!(target > start_applied + 20, "the load wrote too little");
    assert!(
        max_lag < 1_000,
        "the slow follower fell {max_lag} entries behind"
    );
    assert!(
        catch_up < Duration::from_secs(3),
        "the slow follower needed {catch_up:?} to catch up"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_follower_rejoins_without_one_failed_request() {
    let c = proxied(3).await;
    let leader = c.leader().await;
    let [near, cut] = followers(leader)[..] else {
        unreachable!("three nodes")
    };
    let term = c.status(leader).await.expect("leader status").term;
    // Writes and linearizable reads through the leader and the other follower
    // for the whole test; any failure is recorded.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let done = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for node in [leader, near] {
        let (stop, failures, done) = (stop.clone(), failures.clone(), done.clone());
        let mut client = raw(&c, node).await;
        clients.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let id = format!("n{node}-{i}");
                let r = match write(&mut client, "rejoin", &id).await {
                    Ok(()) => read(&mut client, "rejoin", &id).await,
                    e => e,
                };
                if let Err(e) = r {
                    failures.lock().expect("lock").push(e);
                }
                done.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
        }));
    }
    // Nothing reaches the cut follower for 5 s: it hears from no leader.
    c.proxy(cut).isolate(true);
    tokio::time::sleep(Duration::from_secs(5)).await;
    c.proxy(cut).heal();
    let target = c.status(leader).await.expect("leader status").applied_index;
    c.wait_applied(cut, target).await;
    // And a while of traffic after it is back.
    let after = done.load(Ordering::Relaxed) + 20;
    c.wait_for("20 more requests", Duration::from_secs(20), || async {
        (done.load(Ordering::Relaxed) >= after).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for t in clients {
        t.await.expect("client task");
    }
    let failures = failures.lock().expect("lock").clone();
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    for id in 1..=3 {
        let s = c.status(id).await.expect("status");
        assert_eq!(
            (s.leader_id, s.term),
            (leader, term),
            "node {id}: the rejoining node must not move leadership or terms"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_write_that_times_out_says_its_outcome_is_unknown() {
    let c = proxied(3).await;
    let leader = c.leader().await;
    let follower = followers(leader)[0];
    // Requests into the leader are held: the follower's forward gets no answer.
    c.proxy(leader).set(
        Dir::ToTarget,
        Link {
            blocked: true,
            ..Link::default()
        },
    );
    let mut client = raw(&c, follower).await;
    let err = client
        .register(RegisterRequest {
            instance: Some(instance("held", "h-1", 80)),
            ..Default::default()
        })
        .await
        .expect_err("no answer can come back");
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
    assert!(err.message().contains("may have been applied"), "{err:?}");
    // Once the link delivers, the held write is applied: it was in flight.
    c.proxy(leader).heal();
    let leader_client = raw(&c, leader).await;
    c.wait_for("the held write to apply", Duration::from_secs(10), || {
        let mut cl = leader_client.clone();
        async move { read(&mut cl, "held", "h-1").await.ok() }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flaky_follower_neither_stops_writes_nor_moves_leadership() {
    let c = proxied(3).await;
    let leader = c.leader().await;
    let flaky = followers(leader)[1];
    let term = c.status(leader).await.expect("leader status").term;
    // 100-300 ms each way and 15% of the chunks stalled.
    c.proxy(flaky).set_both(Link {
        delay: Duration::from_millis(100),
        jitter: Duration::from_millis(200),
        loss: 0.15,
        stall: Duration::from_millis(200),
        ..Link::default()
    });
    let mut clients = Vec::new();
    for node in [leader, followers(leader)[0], flaky] {
        let mut client = raw(&c, node).await;
        clients.push(tokio::spawn(async move {
            for i in 0..30 {
                let id = format!("n{node}-{i}");
                write(&mut client, "flaky", &id).await?;
                read(&mut client, "flaky", &id).await?;
            }
            Ok::<_, String>(())
        }));
    }
    for t in clients {
        t.await
            .expect("client task")
            .expect("every request succeeds");
    }
    // Round trips up to 600 ms are beyond the lan profile: the operator is
    // told (once the leader's heartbeat samples show it: the writes above may
    // finish sooner), the flaky follower may fall behind, and catches up once
    // its link is sound again.
    let warning = format!("round trip to node {flaky} is");
    c.wait_for(
        "the leader to warn about the slow round trip",
        Duration::from_secs(20),
        || async { c.log(leader).contains(&warning).then_some(()) },
    )
    .await;
    c.proxy(flaky).heal();
    let target = c.status(leader).await.expect("leader status").applied_index;
    c.wait_applied(flaky, target).await;
    let s = c.status(leader).await.expect("leader status");
    assert_eq!((s.leader_id, s.term), (leader, term));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_crosses_a_slow_narrow_link() {
    let mut c = proxied(3).await;
    let leader = c.leader().await;
    let down = followers(leader)[0];
    c.kill(down);
    // About 2 MiB of catalogue, 4 KiB of metadata per instance.
    let big = "x".repeat(4000);
    let mut tasks = Vec::new();
    for t in 0..4 {
        let mut client = raw(&c, leader).await;
        let big = big.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..125 {
                let mut inst = instance("bulk", &format!("b-{t}-{i}"), 80);
                inst.metadata.insert("blob".into(), big.clone());
                client
                    .register(RegisterRequest {
                        instance: Some(inst),
                        ..Default::default()
                    })
                    .await
                    .expect("register");
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    let snap = c.snapshot_and_purge(leader).await;
    assert!(
        snap.size_bytes > 3 << 19,
        "snapshot of {} bytes",
        snap.size_bytes
    );
    // 50 ms and 256 KiB/s towards the returning node: the snapshot takes ~8 s.
    c.proxy(down).set(
        Dir::ToTarget,
        Link {
            delay: Duration::from_millis(50),
            bytes_per_sec: Some(256 * 1024),
            ..Link::default()
        },
    );
    c.start_node(down);
    let target = c.status(leader).await.expect("leader status").applied_index;
    let caught_up = c.wait_applied(down, target).await;
    assert!(caught_up.snapshot_index >= snap.snapshot_index);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_behind_a_slow_link_hands_over_and_forwards() {
    let c = TestCluster::start_linked(3).await;
    let slow = c.leader().await;
    let term = c.status(slow).await.expect("leader status").term;
    // 600 ms each way between the leader and both followers: beyond the lan
    // profile's 500 ms deadline, while the followers talk to each other freely.
    for f in followers(slow) {
        c.link(slow, f, delay(600));
        c.link(f, slow, delay(600));
    }
    let cut = Instant::now();
    c.wait_for(
        "the slow leader to step down",
        Duration::from_secs(5),
        || async { c.status(slow).await.filter(|s| s.leader_id != slow) },
    )
    .await;
    let stepped_down = cut.elapsed();
    // The longest election timeout (900 ms) after its last acknowledged
    // heartbeat, plus this test's polling.
    assert!(
        stepped_down < Duration::from_millis(1_600),
        "the slow leader led on for {stepped_down:?}"
    );
    let new = c
        .wait_for("a new leader", Duration::from_secs(10), || async {
            let [a, b] = followers(slow)[..] else {
                return None;
            };
            let (sa, sb) = (c.status(a).await?, c.status(b).await?);
            (sa.leader_id == sb.leader_id && sa.leader_id != 0 && sa.term > term)
                .then_some(sa.leader_id)
        })
        .await;
    assert_ne!(new, slow);
    eprintln!(
        "stepped down after {stepped_down:?}, node {new} leads after {:?}",
        cut.elapsed()
    );
    // The slow node hears of the new leader 600 ms after it is elected.
    c.wait_for(
        "the slow node to follow",
        Duration::from_secs(5),
        || async { c.status(slow).await.filter(|s| s.leader_id == new) },
    )
    .await;
    // Writes and linearizable reads through every node, the slow one included
    // (it forwards to the new leader over its slow link).
    for node in 1..=3 {
        let mut client = raw(&c, node).await;
        let id = format!("after-{node}");
        write(&mut client, "handover", &id).await.expect("write");
        read(&mut client, "handover", &id).await.expect("read");
    }
}

/// The leader's count of early AppendEntries to `peer` with `outcome`.
async fn early_appends(c: &TestCluster, leader: u64, peer: u64, outcome: &str) -> u64 {
    let body = c.scrape(leader).await;
    let (peer, outcome) = (format!("peer=\"{peer}\""), format!("outcome=\"{outcome}\""));
    body.lines()
        .filter(|l| l.starts_with("roster_raft_early_appends_total"))
        .find(|l| l.contains(&peer) && l.contains(&outcome))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_to_far_followers_are_pipelined() {
    let c = proxied(3).await;
    let leader = c.leader().await;
    for p in &c.proxies {
        p.set(Dir::ToTarget, delay(50));
    }
    // Concurrent writers keep entries coming while earlier ones are in
    // flight; the leader pipelines to a follower once its heartbeats have
    // shown the follower far (the least round trip of the last 2 s).
    let mut round = 0;
    c.wait_for(
        "the leader to send entries to both followers ahead of openraft",
        Duration::from_secs(20),
        || {
            round += 1;
            let round = round;
            let c = &c;
            async move {
                let mut writers = Vec::new();
                for w in 0..8 {
                    let mut client = raw(c, leader).await;
                    writers.push(tokio::spawn(async move {
                        for i in 0..5 {
                            write(&mut client, "piped", &format!("r{round}-w{w}-{i}")).await?;
                        }
                        Ok::<_, String>(())
                    }));
                }
                for w in writers {
                    w.await.expect("writer task").expect("every write succeeds");
                }
                let mut all = true;
                for f in followers(leader) {
                    all &= early_appends(c, leader, f, "accepted").await > 0;
                }
                all.then_some(())
            }
        },
    )
    .await;
    for f in followers(leader) {
        let accepted = early_appends(&c, leader, f, "accepted").await;
        let broken = early_appends(&c, leader, f, "broken").await;
        // Requests taken up out of order wait for the ones before them
        // instead of breaking the chain (about every other one broke it
        // before they did).
        assert!(
            broken * 10 <= accepted,
            "follower {f}: {broken} early requests refused against {accepted} accepted"
        );
    }
    // Every write is on every node.
    let applied = c.status(leader).await.expect("leader status").applied_index;
    for f in followers(leader) {
        c.wait_applied(f, applied).await;
    }
}
