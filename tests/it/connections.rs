//! Connections that never speak HTTP/2, or sit idle, must not hold a node's
//! file descriptors: they are closed, and under a flood of them at a 1,024
//! descriptor limit writes through every node keep succeeding.

use std::time::{Duration, Instant};

use crate::common::faults::flood;
use crate::common::*;
use roster::proto::v1::registry_client::RegistryClient;
use roster::proto::v1::{RegisterRequest, WatchRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tonic::transport::Endpoint;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame: with the preface, a client's side of the HTTP/2 handshake.
const SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];

/// Reads until the server closes the connection; returns what it sent, or
/// `None` if the connection is still open after `within`.
async fn until_closed(s: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .ok()
    .map(|()| got)
}

#[tokio::test]
async fn silent_and_idle_connections_are_closed_busy_ones_are_not() {
    let c = TestCluster::start_with(
        1,
        "[connections]\nhandshake_timeout_ms = 1000\nidle_timeout_ms = 1500\nkeepalive_interval_ms = 60000\n",
    )
    .await;
    let addr = c.endpoint(1);

    // A watch keeps a request in flight on its connection for as long as it runs.
    let watch_channel = Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut watch = RegistryClient::new(watch_channel)
        .watch(WatchRequest {
            namespace: Default::default(),
            service: "payments".into(),
            since_revision: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    watch
        .message()
        .await
        .expect("initial state")
        .expect("a message");

    let mut silent = TcpStream::connect(&addr).await.expect("connect");
    let mut http1 = TcpStream::connect(&addr).await.expect("connect");
    http1
        .write_all(b"GET / HTTP/1.1\r\nHost: roster\r\n\r\n")
        .await
        .expect("send");
    for (what, s) in [("silent", &mut silent), ("HTTP/1", &mut http1)] {
        assert!(
            until_closed(s, Duration::from_secs(10)).await.is_some(),
            "a {what} connection is still open"
        );
    }

    let mut idle = TcpStream::connect(&addr).await.expect("connect");
    idle.write_all(&[PREFACE, SETTINGS].concat())
        .await
        .expect("handshake");
    let opened = Instant::now();
    let got = until_closed(&mut idle, Duration::from_secs(10))
        .await
        .expect("an idle HTTP/2 connection is still open");
    assert_eq!(
        got.get(3),
        Some(&4),
        "the server's first frame is its SETTINGS: {got:?}"
    );
    assert!(
        opened.elapsed() >= Duration::from_millis(1000),
        "closed after {:?}, before the idle timeout",
        opened.elapsed()
    );

    // The watch's connection outlived the idle timeout and still delivers.
    register(&c.client(), "payments", "p-1", 80).await;
    let change = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("watch event in time")
        .expect("watch still open")
        .expect("a message");
    assert_eq!(change.events.len(), 1, "{change:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_idle_connections_do_not_stop_writes() {
    // The flood below needs more descriptors than a default soft limit gives.
    rlimit::increase_nofile_limit(u64::MAX).expect("raise the test's file limit");
    // Election timeouts tolerant of a loaded test machine (the flood itself
    // takes CPU): what is tested is the nodes' descriptors, not the scheduler.
    let c = TestCluster::start_limited(
        3,
        "[connections]\nhandshake_timeout_ms = 2000\n[raft]\nheartbeat_ms = 100\nelection_timeout_min_ms = 1500\nelection_timeout_max_ms = 3000\n",
        Some(1024),
    )
    .await;
    let leader = c.leader().await;
    let term = c.status(leader).await.expect("status").term;

    // More idle connections per node than its descriptor limit allows.
    const HOLD: usize = 1200;
    let (stop, stopped) = watch::channel(false);
    let floods: Vec<_> = c
        .endpoints()
        .into_iter()
        .map(|addr| tokio::spawn(flood(addr, HOLD, stopped.clone())))
        .collect();
    // Wait until every node has been pushed to its connection cap.
    c.wait_for(
        "every node to reach its connection cap",
        Duration::from_secs(60),
        || async {
            c.nodes
                .iter()
                .all(|n| {
                    std::fs::read_to_string(n.config.with_extension("log"))
                        .is_ok_and(|log| log.contains("connection limit reached"))
                })
                .then_some(())
        },
    )
    .await;

    for n in &c.nodes {
        let client = c.node_client(n.id);
        for i in 0..20 {
            let started = Instant::now();
            let r = client
                .register(RegisterRequest {
                    instance: Some(instance("payments", &format!("n{}-{i}", n.id), 80)),
                    ..Default::default()
                })
                .await;
            assert!(
                r.is_ok(),
                "write {i} through node {} during the flood: {r:?}",
                n.id
            );
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "write {i} through node {} took {:?}",
                n.id,
                started.elapsed()
            );
        }
    }

    // The leader kept its quorum the whole time: same leader, same term.
    let after = c.status(leader).await.expect("status");
    assert_eq!((after.leader_id, after.term), (leader, term));
    stop.send(true).expect("stop the flood");
    for f in floods {
        f.await.expect("flood task");
    }
    assert_eq!(
        ids(
            &c.client(),
            "payments",
            roster::proto::v1::Consistency::Linearizable
        )
        .await
        .len(),
        60
    );
}
