//! The fault-injecting proxy of the harness, against a plain echo server, and
//! a cluster whose node-to-node traffic runs through proxies. Per-link faults
//! need network namespaces (root): those tests fail, not skip, without them.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crate::common::proxy::{Dir, Link, Proxy};
use crate::common::*;
use roster::proto::v1::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

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

/// A connection to `to` from `source` (any 127/8 address is a loopback source).
async fn connect_from(source: [u8; 4], to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().expect("socket");
    s.bind((source, 0).into()).expect("bind the source address");
    s.connect(to).await.expect("connect")
}

#[tokio::test]
async fn rules_by_source_address_override_the_proxy_wide_setting() {
    let p = Proxy::start(echo_server().await).await.expect("proxy");
    let mut one = connect_from([127, 0, 0, 1], p.addr()).await;
    let mut two = connect_from([127, 0, 0, 2], p.addr()).await;
    round_trip(&mut one, b"warm").await;
    round_trip(&mut two, b"warm").await;

    // On connections already open; the other direction keeps the proxy-wide setting.
    let two_ip = IpAddr::from([127, 0, 0, 2]);
    p.set_from(two_ip, Dir::ToTarget, delay(100));
    p.set(Dir::FromTarget, delay(50));
    let rtt = round_trip(&mut one, b"from .1").await;
    assert!(
        rtt >= Duration::from_millis(50) && rtt < Duration::from_millis(50) + SLACK,
        "{rtt:?}"
    );
    let rtt = round_trip(&mut two, b"from .2").await;
    assert!(
        rtt >= Duration::from_millis(150) && rtt < Duration::from_millis(150) + SLACK,
        "{rtt:?}"
    );

    // A rule wins over the proxy-wide setting, even one that adds nothing.
    p.set(Dir::ToTarget, delay(200));
    p.set_from(two_ip, Dir::ToTarget, Link::default());
    let rtt = round_trip(&mut two, b"rule wins").await;
    assert!(
        rtt >= Duration::from_millis(50) && rtt < Duration::from_millis(50) + SLACK,
        "{rtt:?}"
    );

    p.heal();
    for s in [&mut one, &mut two] {
        let rtt = round_trip(s, b"healed").await;
        assert!(rtt < SLACK, "{rtt:?}");
    }
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
    let closed = poll(Duration::from_secs(5), || async {
        (p.open_connections() == 1).then_some(())
    })
    .await;
    assert!(closed.is_some(), "{} still open", p.open_connections());
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

/// The leader's outbound links are slow, the link between the followers is
/// not: writes still commit, only the slow node's links are slow, and
/// healing them ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_behind_a_slow_link() {
    let c = TestCluster::start_linked(3).await;
    let slow = c.leader().await;
    let followers: Vec<u64> = (1..=3).filter(|&i| i != slow).collect();
    // Replicated through the proxies in the test's namespace.
    register(&c.node_client(followers[0]), "links", "l-1", 80).await;
    for id in 1..=3 {
        assert!(
            c.proxy(id).connections_accepted() > 0,
            "nothing reached node {id} through its proxy"
        );
    }

    for &f in &followers {
        c.link(slow, f, delay(300));
    }
    let start = Instant::now();
    register(&c.node_client(followers[1]), "links", "l-2", 80).await;
    let took = start.elapsed();
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert_eq!(
        ids(&c.client(), "links", Consistency::Linearizable).await,
        ["l-1", "l-2"]
    );

    // A write the leader takes waits for a follower's answer: 300 ms and more
    // if the slow node still leads, far less if another node took over, its
    // link to the third node being fast. (Not the leader's `rtt_ms`: heartbeats
    // that time out leave it at its value from before the fault.)
    let tries = std::cell::Cell::new(0);
    let write_through = async |node: u64| {
        tries.set(tries.get() + 1);
        let start = Instant::now();
        let id = format!("timed-{}", tries.get());
        c.node_client(node)
            .register(RegisterRequest {
                instance: Some(instance("links", &id, 80)),
                ..Default::default()
            })
            .await
            .ok()
            .map(|_| start.elapsed())
    };
    let (leader, took) = c
        .wait_for(
            "a write timed under one leader",
            Duration::from_secs(10),
            || async {
                let leader = c.leader().await;
                let took = write_through(leader).await?;
                (c.leader().await == leader).then_some((leader, took))
            },
        )
        .await;
    if leader == slow {
        assert!(took >= Duration::from_millis(300), "{took:?}");
    } else {
        assert!(
            took < Duration::from_millis(200),
            "{took:?} under node {leader}"
        );
    }

    // Healed, the slow node's writes (forwarded, or its own as leader) are
    // fast again once what the slow links still held is delivered.
    c.heal_links();
    c.wait_for(
        "a fast write through the formerly slow node",
        Duration::from_secs(5),
        || async {
            write_through(slow)
                .await
                .filter(|t| *t < Duration::from_millis(200))
        },
    )
    .await;
}
