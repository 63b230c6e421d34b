//! Each `[limits]` entry: reaching it is answered RESOURCE_EXHAUSTED naming
//! the limit, the refused request leaves nothing behind, and the node goes on
//! serving everyone else.

use std::time::Duration;

use crate::common::*;
use roster::client::RosterClient;
use roster::proto::v1::health_check::Kind as CheckKind;
use roster::proto::v1::registry_client::RegistryClient;
use roster::proto::v1::*;
use tonic::transport::Channel;
use tonic::{Code, Status};

fn assert_exhausted<T: std::fmt::Debug, E: Into<roster::client::Error> + std::fmt::Debug>(
    r: Result<T, E>,
    key: &str,
) {
    let s: roster::client::Error = r.expect_err("refused at the limit").into();
    assert_eq!(s.code(), roster::client::Code::ResourceExhausted, "{s:?}");
    assert!(
        s.message().contains(&format!("limits.{key}")),
        "the message names limits.{key}: {s:?}"
    );
}

fn with_ttl(mut i: Instance) -> Instance {
    i.check = Some(HealthCheck {
        kind: Some(CheckKind::Ttl(TtlCheck { ttl_ms: 60_000 })),
        ..Default::default()
    });
    i
}

async fn put(c: &RosterClient, i: Instance) -> Result<RegisterResponse, roster::client::Error> {
    c.register(RegisterRequest {
        instance: Some(i),
        ..Default::default()
    })
    .await
}

#[tokio::test]
async fn registrations_past_a_limit_are_refused_and_others_go_on() {
    let c = TestCluster::start_with(
        3,
        "[limits]\nmax_request_bytes = 4096\nmax_instances_per_service = 3\n\
         max_instances = 6\nmax_health_checks = 2\n",
    )
    .await;
    let leader = c.leader().await;
    let follower = (1..=3).find(|&id| id != leader).expect("a follower");
    // Through a follower, so that the leader's refusal is forwarded back.
    let client = c.node_client(follower);

    // Instances per service.
    for id in ["a1", "a2", "a3"] {
        register(&client, "alpha", id, 80).await;
    }
    assert_exhausted(
        put(&client, instance("alpha", "a4", 80)).await,
        "max_instances_per_service",
    );
    // Replacing an instance at the limit is no new instance.
    put(&client, instance("alpha", "a1", 81))
        .await
        .expect("update at the limit");

    // Health checks in total, counted on instances of any service.
    put(&client, with_ttl(instance("beta", "b1", 80)))
        .await
        .expect("first check");
    put(&client, with_ttl(instance("beta", "b2", 80)))
        .await
        .expect("second check");
    assert_exhausted(
        put(&client, with_ttl(instance("beta", "b3", 80))).await,
        "max_health_checks",
    );
    // The same instance without a check fits; a checked one may be replaced.
    register(&client, "beta", "b3", 80).await;
    put(&client, with_ttl(instance("beta", "b1", 81)))
        .await
        .expect("update of a checked instance at the limit");

    // Instances in total: alpha 3 + beta 3.
    assert_exhausted(
        put(&client, instance("gamma", "g1", 80)).await,
        "max_instances",
    );
    let leader_client = c.node_client(leader);
    assert_exhausted(
        put(&leader_client, instance("gamma", "g1", 80)).await,
        "max_instances",
    );

    // Request size, refused on whichever node receives it.
    let mut big = instance("alpha", "a1", 80);
    big.metadata.insert("blob".into(), "x".repeat(8_000));
    for node in [follower, leader] {
        assert_exhausted(
            put(&c.node_client(node), big.clone()).await,
            "max_request_bytes",
        );
    }

    // Nothing refused was stored; a freed place is taken at once.
    let lin = Consistency::Linearizable;
    assert_eq!(ids(&client, "alpha", lin).await, ["a1", "a2", "a3"]);
    assert_eq!(ids(&client, "beta", lin).await, ["b1", "b2", "b3"]);
    assert!(ids(&client, "gamma", lin).await.is_empty());
    let a1 = client
        .get_service(get_req("alpha", lin))
        .await
        .expect("read")
        .instances
        .into_iter()
        .find(|i| i.id == "a1")
        .expect("a1");
    assert!(
        a1.metadata.is_empty(),
        "the oversized update was not applied"
    );
    let b3 = client
        .get_service(get_req("beta", lin))
        .await
        .expect("read")
        .instances
        .into_iter()
        .find(|i| i.id == "b3")
        .expect("b3");
    assert!(b3.check.is_none(), "the refused check was not stored");
    client
        .deregister(DeregisterRequest {
            namespace: Default::default(),
            service: "alpha".into(),
            id: "a3".into(),
        })
        .await
        .expect("deregister");
    register(&client, "gamma", "g1", 80).await;
    assert_eq!(ids(&client, "gamma", lin).await, ["g1"]);
}

/// A client on a connection of its own (each `connect` opens one).
async fn connection(c: &TestCluster, node: u64) -> RegistryClient<Channel> {
    RegistryClient::connect(format!("http://{}", c.endpoint(node)))
        .await
        .expect("connect")
}

/// Opens a watch and waits for its first message, so the stream is open.
async fn open_watch(
    client: &mut RegistryClient<Channel>,
    service: &str,
) -> Result<tonic::Streaming<WatchResponse>, Status> {
    let mut stream = client
        .watch(WatchRequest {
            service: service.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    stream.message().await?.expect("initial state");
    Ok(stream)
}

#[tokio::test]
async fn watch_streams_are_limited_per_node_and_per_connection() {
    let c = TestCluster::start_with(
        3,
        "[limits]\nmax_watch_streams = 3\nmax_watch_streams_per_connection = 2\n",
    )
    .await;
    register(&c.client(), "alpha", "a1", 80).await;
    let mut first = connection(&c, 1).await;
    let w1 = open_watch(&mut first, "alpha").await.expect("watch 1");
    let _w2 = open_watch(&mut first, "").await.expect("watch 2");
    assert_exhausted(
        open_watch(&mut first, "alpha").await,
        "max_watch_streams_per_connection",
    );
    // The full connection still serves other calls.
    first
        .get_service(get_req("alpha", Consistency::Linearizable))
        .await
        .expect("read on the full connection");

    // Another connection gets the node's last place, then the node is full.
    let mut second = connection(&c, 1).await;
    let mut w3 = open_watch(&mut second, "alpha").await.expect("watch 3");
    assert_exhausted(open_watch(&mut second, "alpha").await, "max_watch_streams");
    // Other nodes count their own streams; writes go on and reach the watchers.
    let mut other = connection(&c, 2).await;
    let _elsewhere = open_watch(&mut other, "alpha").await.expect("other node");
    register(&c.client(), "alpha", "a2", 80).await;
    let change = w3
        .message()
        .await
        .expect("watch 3 goes on")
        .expect("a message");
    let ids: Vec<&str> = change
        .events
        .iter()
        .filter_map(|e| Some(e.instance.as_ref()?.id.as_str()))
        .collect();
    assert_eq!(ids, ["a2"]);

    // A cancelled watch frees its place once the node has seen it end.
    drop(w1);
    let _w4 = c
        .wait_for(
            "the cancelled watch's place",
            Duration::from_secs(10),
            || {
                let mut second = second.clone();
                async move { open_watch(&mut second, "alpha").await.ok() }
            },
        )
        .await;
}

/// Registrations in flight together count against the limit: a burst of new
/// instances through every node fills it exactly.
#[tokio::test]
async fn a_burst_of_concurrent_registrations_fills_a_limit_exactly() {
    let c = TestCluster::start_with(3, "[limits]\nmax_instances_per_service = 4\n").await;
    let clients: Vec<RosterClient> = (1..=3).map(|id| c.node_client(id)).collect();
    let burst = (0..24).map(|k| put(&clients[k % 3], instance("burst", &format!("b{k}"), 80)));
    let answers = futures::future::join_all(burst).await;
    let mut admitted = 0;
    for a in answers {
        match a {
            Ok(_) => admitted += 1,
            Err(s) => {
                assert_eq!(s.code(), roster::client::Code::ResourceExhausted, "{s:?}");
                assert!(
                    s.message().contains("limits.max_instances_per_service"),
                    "{s:?}"
                );
            }
        }
    }
    assert_eq!(admitted, 4);
    let held = ids(&clients[0], "burst", Consistency::Linearizable).await;
    assert_eq!(held.len(), 4, "{held:?}");
}

#[tokio::test]
async fn services_on_one_watch_stream_are_limited() {
    let c = TestCluster::start_with(3, "[limits]\nmax_watched_services_per_stream = 3\n").await;
    let add = |s: &str| WatchServicesRequest::add(s, 0);
    let (tx, mut s) = c
        .client()
        .watch_services(["a", "b", "c", "d"].map(add).to_vec())
        .await
        .expect("watch_services");
    async fn next(
        s: &mut roster::client::WatchStream<WatchServicesResponse>,
    ) -> (String, watch_services_response::Result) {
        let m = s.message().await.expect("stream").expect("message");
        (m.service, m.result.expect("result"))
    }
    let mut started = Vec::new();
    for _ in 0..4 {
        match next(&mut s).await {
            (service, watch_services_response::Result::Update(_)) => started.push(service),
            (service, watch_services_response::Result::Ended(e)) => {
                assert_eq!(service, "d");
                assert_exhausted::<(), Status>(
                    Err(Status::new(Code::from_i32(e.code), e.message)),
                    "max_watched_services_per_stream",
                );
            }
        }
    }
    started.sort();
    assert_eq!(started, ["a", "b", "c"]);
    // Adding a followed service again is no new place; removing one frees one.
    tx.unbounded_send(add("a")).expect("send");
    tx.unbounded_send(WatchServicesRequest::remove("b"))
        .expect("send");
    tx.unbounded_send(add("d")).expect("send");
    let mut answers = Vec::new();
    for _ in 0..3 {
        let (service, r) = next(&mut s).await;
        let kind = match r {
            watch_services_response::Result::Update(u) => format!("update {}", u.reset),
            watch_services_response::Result::Ended(e) => format!("ended {}", e.code),
        };
        answers.push(format!("{service}: {kind}"));
    }
    // Answers to requests may overtake updates of other services.
    answers.sort();
    assert_eq!(answers, ["a: update 1", "b: ended 0", "d: update 1"]);
}
