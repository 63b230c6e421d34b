//! Health checking by the leader, against real TCP, HTTP and gRPC servers.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::targets::{refusing_port, Kind, Target};
use crate::common::*;
use roster::client::RosterClient;
use roster::proto::v1::health_check::Kind as CheckKind;
use roster::proto::v1::*;

const PASSING: i32 = HealthStatus::Passing as i32;
const CRITICAL: i32 = HealthStatus::Critical as i32;

#[derive(Clone, Debug)]
struct Seen {
    id: String,
    kind: i32,
    status: i32,
    revision: u64,
}

/// Records every event of `service` seen by a watcher on `client`.
async fn record(client: &RosterClient, service: &str) -> Arc<Mutex<Vec<Seen>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut stream = client
        .watch(WatchRequest {
            namespace: Default::default(),
            service: service.into(),
            since_revision: 0,
        })
        .await
        .expect("watch");
    let out = seen.clone();
    tokio::spawn(async move {
        while let Ok(Some(m)) = stream.message().await {
            let mut v = out.lock().expect("lock");
            for e in m.events {
                let i = e.instance.expect("instance");
                v.push(Seen {
                    id: i.id,
                    kind: e.r#type,
                    status: i.status,
                    revision: e.revision,
                });
            }
        }
    });
    seen
}

fn statuses(seen: &Arc<Mutex<Vec<Seen>>>, id: &str) -> Vec<(i32, u64)> {
    seen.lock()
        .expect("lock")
        .iter()
        .filter(|s| s.id == id && s.kind == EventType::Put as i32)
        .map(|s| (s.status, s.revision))
        .collect()
}

fn check(kind: CheckKind, interval_ms: u32, failures: u32, successes: u32) -> HealthCheck {
    HealthCheck {
        kind: Some(kind),
        interval_ms,
        timeout_ms: interval_ms.min(500),
        failures_before_critical: failures,
        successes_before_passing: successes,
        deregister_after_ms: 0,
    }
}

async fn register_checked(
    c: &RosterClient,
    service: &str,
    id: &str,
    port: u32,
    hc: HealthCheck,
) -> u64 {
    c.register(RegisterRequest {
        instance: Some(Instance {
            service: service.into(),
            id: id.into(),
            address: "127.0.0.1".into(),
            port,
            check: Some(hc),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("register {id}: {e}"))
    .revision
}

async fn status_of(c: &RosterClient, service: &str, id: &str) -> Option<Instance> {
    c.get_service(get_req(service, Consistency::Linearizable))
        .await
        .ok()?
        .instances
        .into_iter()
        .find(|i| i.id == id)
}

async fn wait_status(
    c: &TestCluster,
    client: &RosterClient,
    service: &str,
    id: &str,
    status: i32,
    limit: Duration,
) -> Instance {
    c.wait_for(&format!("{id} to reach status {status}"), limit, || async {
        status_of(client, service, id)
            .await
            .filter(|i| i.status == status)
    })
    .await
}

/// Waits until every target has answered `more` probes beyond `from` (its
/// count taken earlier), so a test holding a state knows the checks really ran.
async fn wait_probes(c: &TestCluster, targets: &[&Target], from: &[u64], more: u64) {
    c.wait_for(
        &format!("{more} more probes of each target"),
        Duration::from_secs(10),
        || async {
            targets
                .iter()
                .zip(from)
                .all(|(t, &n)| t.probes() >= n + more)
                .then_some(())
        },
    )
    .await;
}

/// Waits until the watcher has seen `id` at `revision` or later.
async fn wait_seen(c: &TestCluster, seen: &Arc<Mutex<Vec<Seen>>>, id: &str, revision: u64) {
    c.wait_for(
        &format!("the watcher to see {id} at revision {revision}"),
        Duration::from_secs(5),
        || async {
            seen.lock()
                .expect("lock")
                .iter()
                .any(|s| s.id == id && s.revision >= revision)
                .then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn tcp_http_and_grpc_checks_detect_failure_and_recovery() {
    let c = TestCluster::start(3).await;
    let client = c.client();
    let seen = record(&client, "checked").await;
    let mut targets = Vec::new();
    for kind in [Kind::Tcp, Kind::Http, Kind::Grpc] {
        let t = Target::start(kind).await;
        let hc = match kind {
            Kind::Tcp => CheckKind::Tcp(TcpCheck { port: 0 }),
            Kind::Http => CheckKind::Http(HttpCheck {
                port: 0,
                path: "/health".into(),
            }),
            _ => CheckKind::Grpc(GrpcCheck {
                port: 0,
                service: String::new(),
            }),
        };
        register_checked(
            &client,
            "checked",
            &format!("{kind:?}"),
            t.port(),
            check(hc, 200, 2, 1),
        )
        .await;
        targets.push(t);
    }
    // Healthy servers stay passing through more probes than it takes to fail.
    let all: Vec<&Target> = targets.iter().collect();
    let from: Vec<u64> = vec![0; all.len()];
    wait_probes(&c, &all, &from, 4).await;
    for t in &targets {
        let i = status_of(&client, "checked", &format!("{:?}", t.kind))
            .await
            .expect("instance");
        assert_eq!(i.status, PASSING, "{:?} while its server runs", t.kind);
    }

    for t in &mut targets {
        t.stop();
    }
    for t in &targets {
        let i = wait_status(
            &c,
            &client,
            "checked",
            &format!("{:?}", t.kind),
            CRITICAL,
            Duration::from_secs(10),
        )
        .await;
        assert!(
            !i.check_output.is_empty(),
            "{:?}: critical without a reason",
            t.kind
        );
        assert!(i.status_since_ms > 0);
    }
    for t in &mut targets {
        t.restart().await;
    }
    for t in &targets {
        let id = format!("{:?}", t.kind);
        let i = wait_status(
            &c,
            &client,
            "checked",
            &id,
            PASSING,
            Duration::from_secs(10),
        )
        .await;
        wait_seen(&c, &seen, &id, i.mod_revision).await;
    }
    for t in &targets {
        let s = statuses(&seen, &format!("{:?}", t.kind));
        let changes: Vec<i32> = s.iter().map(|(st, _)| *st).collect();
        assert_eq!(
            changes,
            vec![PASSING, CRITICAL, PASSING],
            "{:?}: {s:?}",
            t.kind
        );
        assert!(
            s.windows(2).all(|w| w[0].1 < w[1].1),
            "revisions must increase: {s:?}"
        );
    }
}

#[tokio::test]
async fn ttl_check_follows_heartbeats() {
    let c = TestCluster::start(3).await;
    let client = c.client();
    let seen = record(&client, "ttl").await;
    register_checked(
        &client,
        "ttl",
        "t-1",
        80,
        check(CheckKind::Ttl(TtlCheck { ttl_ms: 1500 }), 0, 0, 0),
    )
    .await;
    let beat = || async {
        client
            .heartbeat(HeartbeatRequest {
                namespace: Default::default(),
                service: "ttl".into(),
                id: "t-1".into(),
                ..Default::default()
            })
            .await
            .expect("heartbeat")
    };
    // Heartbeats at a fifth of the TTL over two TTLs: the instance must read
    // passing after every one, with no slack so thin that a slow scheduler flips it.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert_eq!(
            beat().await.status,
            PASSING,
            "a heartbeat answered not passing"
        );
        let i = status_of(&client, "ttl", "t-1").await.expect("instance");
        assert_eq!(i.status, PASSING, "went critical: {}", i.check_output);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        statuses(&seen, "t-1").len(),
        1,
        "heartbeats must keep it passing"
    );
    let i = wait_status(&c, &client, "ttl", "t-1", CRITICAL, Duration::from_secs(5)).await;
    assert!(i.check_output.contains("TTL"), "{}", i.check_output);
    // A heartbeat revives the instance at once: the answer and the very next
    // linearizable read already say passing.
    let r = beat().await;
    assert_eq!(
        r.status, PASSING,
        "the heartbeat answers with the new status"
    );
    let now = client
        .get_service(get_req("ttl", Consistency::Linearizable))
        .await
        .expect("get");
    assert_eq!(now.instances[0].status, PASSING);
}

#[tokio::test]
async fn long_critical_instances_are_deregistered() {
    let c = TestCluster::start(3).await;
    let client = c.client();
    let seen = record(&client, "doomed").await;
    let (_held, dead_port) = refusing_port();
    let mut hc = check(CheckKind::Tcp(TcpCheck { port: 0 }), 200, 1, 1);
    hc.deregister_after_ms = 1000;
    register_checked(&client, "doomed", "d-1", dead_port, hc).await;
    register(&client, "doomed", "unchecked", 80).await;
    wait_status(
        &c,
        &client,
        "doomed",
        "d-1",
        CRITICAL,
        Duration::from_secs(5),
    )
    .await;
    c.wait_for(
        "d-1 to be deregistered",
        Duration::from_secs(10),
        || async { (status_of(&client, "doomed", "d-1").await.is_none()).then_some(()) },
    )
    .await;
    c.wait_for(
        "watchers to get the removal",
        Duration::from_secs(5),
        || async {
            seen.lock()
                .expect("lock")
                .iter()
                .any(|s| s.id == "d-1" && s.kind == EventType::Delete as i32)
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        ids(&client, "doomed", Consistency::Linearizable).await,
        vec!["unchecked"]
    );
}

#[tokio::test]
async fn new_leader_takes_over_checks_without_marking_live_instances_critical() {
    let mut c = TestCluster::start(3).await;
    let client = c.client();
    let mut live = Vec::new();
    for n in 0..4 {
        let t = Target::start(Kind::Tcp).await;
        register_checked(
            &client,
            "fleet",
            &format!("live-{n}"),
            t.port(),
            check(CheckKind::Tcp(TcpCheck { port: 0 }), 300, 2, 1),
        )
        .await;
        live.push(t);
    }
    let (_held, dead_port) = refusing_port();
    register_checked(
        &client,
        "fleet",
        "dead",
        dead_port,
        check(CheckKind::Tcp(TcpCheck { port: 0 }), 300, 2, 1),
    )
    .await;
    register_checked(
        &client,
        "fleet",
        "ttl",
        80,
        check(CheckKind::Ttl(TtlCheck { ttl_ms: 1500 }), 0, 0, 0),
    )
    .await;
    wait_status(
        &c,
        &client,
        "fleet",
        "dead",
        CRITICAL,
        Duration::from_secs(5),
    )
    .await;

    // Keep the TTL instance alive through the failover, as a well-behaved service would.
    let beating = {
        let client = c.client();
        tokio::spawn(async move {
            loop {
                let _ = client
                    .heartbeat(HeartbeatRequest {
                        namespace: Default::default(),
                        service: "fleet".into(),
                        id: "ttl".into(),
                        ..Default::default()
                    })
                    .await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let old = c.leader().await;
    let survivor = (1..=3).find(|&i| i != old).expect("a follower");
    let seen = record(&c.node_client(survivor), "fleet").await;
    c.kill(old);
    let new = c.leader().await;
    let elected = Instant::now();
    assert_ne!(new, old);
    let probed: Vec<u64> = live.iter().map(Target::probes).collect();
    // The hold means something only if the new leader probed through it (one
    // probe may still have come from the old leader): four probes of each.
    let targets: Vec<&Target> = live.iter().collect();
    wait_probes(&c, &targets, &probed, 4).await;
    // That nothing turned critical is a claim about a window, so the window
    // stays: the TTL instance's grace is its TTL (1.5 s) from the election,
    // and a new leader that ignored the heartbeats would mark it critical
    // only after that. Two TTLs without such an event is the assertion.
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(elected.elapsed())).await;
    let flipped: Vec<Seen> = seen
        .lock()
        .expect("lock")
        .iter()
        .filter(|s| s.id != "dead" && s.status == CRITICAL)
        .cloned()
        .collect();
    assert!(
        flipped.is_empty(),
        "live instances marked critical across the failover: {flipped:?}"
    );
    let dead = status_of(&client, "fleet", "dead")
        .await
        .expect("dead instance");
    assert_eq!(dead.status, CRITICAL, "the dead instance stays critical");

    // The new leader really checks: a server stopping now is detected.
    live[0].stop();
    wait_status(
        &c,
        &client,
        "fleet",
        "live-0",
        CRITICAL,
        Duration::from_secs(10),
    )
    .await;
    beating.abort();
}

#[tokio::test]
async fn flapping_server_does_not_flip_status_on_every_probe() {
    let c = TestCluster::start(3).await;
    let client = c.client();
    let seen = record(&client, "flappy").await;
    let t = Target::start(Kind::FlappingHttp).await;
    let hc = check(
        CheckKind::Http(HttpCheck {
            port: 0,
            path: "/".into(),
        }),
        150,
        2,
        2,
    );
    register_checked(&client, "flappy", "f-1", t.port(), hc).await;
    // Many probes, alternating: any two failing in a row would flip it.
    wait_probes(&c, &[&t], &[0], 16).await;
    let s = statuses(&seen, "f-1");
    assert_eq!(
        s.len(),
        1,
        "alternating results must not change the status: {s:?}"
    );
    let i = status_of(&client, "flappy", "f-1").await.expect("instance");
    assert_eq!(i.status, PASSING);
}

#[tokio::test]
async fn protection_threshold_returns_all_instances_when_too_few_pass() {
    let c = TestCluster::start(3).await;
    let client = c.client();
    let mut targets = Vec::new();
    for n in 0..4 {
        let t = Target::start(Kind::Tcp).await;
        register_checked(
            &client,
            "guarded",
            &format!("g-{n}"),
            t.port(),
            check(CheckKind::Tcp(TcpCheck { port: 0 }), 200, 1, 1),
        )
        .await;
        targets.push(t);
    }
    client
        .configure_service(ConfigureServiceRequest {
            namespace: Default::default(),
            service: "guarded".into(),
            protect_threshold_percent: 50,
        })
        .await
        .expect("configure");
    let healthy = GetServiceRequest {
        service: "guarded".into(),
        healthy_only: true,
        ..Default::default()
    };
    targets[0].stop();
    wait_status(
        &c,
        &client,
        "guarded",
        "g-0",
        CRITICAL,
        Duration::from_secs(5),
    )
    .await;
    let r = client.get_service(healthy.clone()).await.expect("query");
    assert_eq!((r.instances.len(), r.protection_active), (3, false));
    targets[1].stop();
    targets[2].stop();
    wait_status(
        &c,
        &client,
        "guarded",
        "g-2",
        CRITICAL,
        Duration::from_secs(5),
    )
    .await;
    wait_status(
        &c,
        &client,
        "guarded",
        "g-1",
        CRITICAL,
        Duration::from_secs(5),
    )
    .await;
    let r = client.get_service(healthy).await.expect("query");
    assert!(r.protection_active, "1 of 4 passing is under 50%");
    assert_eq!(r.instances.len(), 4);
    let e = client
        .configure_service(ConfigureServiceRequest {
            namespace: Default::default(),
            service: "guarded".into(),
            protect_threshold_percent: 101,
        })
        .await
        .expect_err("over 100%");
    assert_eq!(e.code(), roster::client::Code::InvalidArgument);
}
