//! The fault-injecting proxy of the harness, against a plain echo server, and
//! a cluster whose node-to-node traffic runs through proxies.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::proxy::{Dir, Link, Proxy};
use common::*;
use roster::proto::v1::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Generous slack over an expected time: the machine is shared.
const SLACK: Duration = Duration::from_millis(150);

/// A server that echoes every byte and closes its side after the peer's EOF.
async fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

async fn proxied() -> (Proxy, TcpStream) {
    let p = Proxy::start(echo_server().await).await.expect("proxy");
    let s = TcpStream::connect(p.addr()).await.expect("connect");
    (p, s)
}

/// Sends `msg` and waits for its echo; returns how long that took.
async fn round_trip(s: &mut TcpStream, msg: &[u8]) -> Duration {
    let start = Instant::now();
    s.write_all(msg).await.expect("write");
    let mut back = vec![0; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
        .await
        .expect("echo within 5 s")
        .expect("read");
    assert_eq!(back, msg);
    start.elapsed()
}

/// Asserts nothing comes back on `s` for 300 ms (a read is cancel-safe).
async fn silent(s: &mut TcpStream) {
    let mut byte = [0; 1];
    let r = tokio::time::timeout(Duration::from_millis(300), s.read(&mut byte)).await;
    assert!(r.is_err(), "expected no data, got {r:?}");
}

fn delay(ms: u64) -> Link {
    Link {
        delay: Duration::from_millis(ms),
        ..Link::default()
    }
}

#[tokio::test]
async fn delay_is_added_once_per_direction() {
    let (p, mut s) = proxied().await;
    round_trip(&mut s, b"warm").await;

    p.set(Dir::ToTarget, delay(100));
    let rtt = round_trip(&mut s, b"one way").await;
    assert!(
        rtt >= Duration::from_millis(100) && rtt < Duration::from_millis(100) + SLACK,
        "{rtt:?}"
    );

    p.set_both(delay(100));
    let rtt = round_trip(&mut s, b"both ways").await;
    assert!(
        rtt >= Duration::from_millis(200) && rtt < Duration::from_millis(200) + SLACK,
        "{rtt:?}"
    );

    p.heal();
    let rtt = round_trip(&mut s, b"healed").await;
    assert!(rtt < SLACK, "{rtt:?}");
}

#[tokio::test]
async fn jitter_never_reorders_bytes() {
    let (p, mut s) = proxied().await;
    p.set_both(Link {
        jitter: Duration::from_millis(40),
        ..Link::default()
    });
    let sent: Vec<u8> = (0..100).collect();
    for b in &sent {
        s.write_all(&[*b]).await.expect("write");
        // Separate writes, so the proxy reads separate chunks with their own jitter.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut back = vec![0; sent.len()];
    s.read_exact(&mut back).await.expect("read");
    assert_eq!(back, sent);
}

#[tokio::test]
async fn a_blocked_direction_holds_data_until_unblocked() {
    let (p, mut s) = proxied().await;
    for dir in [Dir::ToTarget, Dir::FromTarget] {
        p.set(
            dir,
            Link {
                blocked: true,
                ..Link::default()
            },
        );
        s.write_all(b"held").await.expect("write");
        silent(&mut s).await;
        p.set(dir, Link::default());
        let mut back = [0; 4];
        s.read_exact(&mut back).await.expect("read");
        assert_eq!(&back, b"held", "{dir:?}");
    }
}

#[tokio::test]
async fn bandwidth_cap_paces_bulk_data() {
    let (p, s) = proxied().await;
    p.set(
        Dir::ToTarget,
        Link {
            bytes_per_sec: Some(100 * 1024),
            ..Link::default()
        },
    );
    let (mut r, mut w) = s.into_split();
    let data = vec![7u8; 200 * 1024];
    let start = Instant::now();
    let send = async {
        w.write_all(&data).await.expect("write");
    };
    let receive = async {
        let mut back = vec![0; data.len()];
        r.read_exact(&mut back).await.expect("read");
    };
    tokio::join!(send, receive);
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(1800) && took < Duration::from_millis(3000),
        "{took:?}"
    );
}

#[tokio::test]
async fn loss_stalls_every_lost_chunk() {
    let (p, mut s) = proxied().await;
    p.set(
        Dir::ToTarget,
        Link {
            loss: 1.0,
            stall: Duration::from_millis(100),
            ..Link::default()
        },
    );
    for i in 0..3 {
        let rtt = round_trip(&mut s, format!("chunk {i}").as_bytes()).await;
        assert!(
            rtt >= Duration::from_millis(100) && rtt < Duration::from_millis(100) + SLACK,
            "{rtt:?}"
        );
    }
    // A zero stall means the default, 200 ms.
    p.set(
        Dir::ToTarget,
        Link {
            loss: 1.0,
            ..Link::default()
        },
    );
    let rtt = round_trip(&mut s, b"default stall").await;
    assert!(
        rtt >= Duration::from_millis(200) && rtt < Duration::from_millis(200) + SLACK,
        "{rtt:?}"
    );
}

#[tokio::test]
async fn isolation_hangs_old_and_new_connections_until_healed() {
    let (p, mut old) = proxied().await;
    round_trip(&mut old, b"before").await;
    p.isolate(true);
    let mut new = TcpStream::connect(p.addr())
        .await
        .expect("accepted while isolated");
    for s in [&mut old, &mut new] {
        s.write_all(b"cut").await.expect("write");
        silent(s).await;
    }
    assert_eq!((p.connections_accepted(), p.open_connections()), (2, 2));
    p.heal();
    for s in [&mut old, &mut new] {
        let mut back = [0; 3];
        s.read_exact(&mut back).await.expect("read");
        assert_eq!(&back, b"cut");
    }
}

#[tokio::test]
async fn half_close_arrives_after_the_queued_data() {
    let (p, mut s) = proxied().await;
    p.set_both(delay(50));
    s.write_all(b"last words").await.expect("write");
    s.shutdown().await.expect("shutdown");
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut back))
        .await
        .expect("EOF within 5 s")
        .expect("read");
    assert_eq!(back, b"last words");
}

#[tokio::test]
async fn counts_connections_and_closes_them_when_dropped() {
    let (p, mut first) = proxied().await;
    round_trip(&mut first, b"1").await;
    let mut more = Vec::new();
    for i in 0..2 {
        let mut s = TcpStream::connect(p.addr()).await.expect("connect");
        round_trip(&mut s, format!("{i}").as_bytes()).await;
        more.push(s);
    }
    assert_eq!((p.connections_accepted(), p.open_connections()), (3, 3));

    drop(more);
    let deadline = Instant::now() + Duration::from_secs(5);
    while p.open_connections() != 1 {
        assert!(
            Instant::now() < deadline,
            "{} still open",
            p.open_connections()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(p.connections_accepted(), 3);

    drop(p);
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), first.read_to_end(&mut rest)).await;
    assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_traffic_runs_through_the_proxies() {
    let setup = Setup {
        proxies: true,
        ..Setup::default()
    };
    let c = TestCluster::start_setup(3, "", setup)
        .await
        .expect("proxied cluster");
    let leader = c.leader().await;
    let follower = (1..=3).find(|&i| i != leader).expect("a follower");
    // Written through a follower, which forwards it to the leader.
    register(&c.node_client(follower), "proxied", "p-1", 80).await;
    assert_eq!(
        ids(&c.client(), "proxied", Consistency::Linearizable).await,
        ["p-1"]
    );
    for id in 1..=3 {
        let p = c.proxy(id);
        assert_eq!(c.node(id).peer, p.addr().to_string());
        assert!(
            p.connections_accepted() > 0,
            "nothing reached node {id} through its proxy"
        );
    }

    // Replication crosses the proxies too: with 15 ms each way on every link,
    // a write the leader takes directly waits a round trip to a follower.
    // (More would need slower Raft timing: an AppendEntries times out after
    // one heartbeat interval, 50 ms by default.)
    for p in &c.proxies {
        p.set_both(delay(15));
    }
    let start = Instant::now();
    register(&c.node_client(leader), "proxied", "p-2", 80).await;
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(30), "{took:?}");
}
