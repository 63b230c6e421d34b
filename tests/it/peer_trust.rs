//! The peer port admits members only: forged Raft (real bincode of
//! openraft's `VoteRequest` and `AppendEntriesRequest`, a term 1,000 above
//! the cluster's, with its cluster id in the headers) sent to every node of
//! a running `[tls]` cluster, with certificates from `deploy/tls/make-certs.sh`
//! (the client's, a non-member node's, a member's claiming to be another),
//! another CA's or none, is refused, and no node's term moves.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::certs::Ca;
use crate::common::*;
use openraft::raft::{AppendEntriesRequest, VoteRequest};
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Vote};
use roster::client::tls_from_files;
use roster::proto::raft_v1::raft_transport_client::RaftTransportClient;
use roster::proto::raft_v1::RaftPayload;
use roster::proto::v1::cluster_client::ClusterClient;
use roster::proto::v1::{AddMemberRequest, StatusRequest};
use tonic::metadata::MetadataValue;
use tonic::transport::{ClientTlsConfig, Identity};
use tonic::Code;

// A blank entry's bytes do not depend on the application's types: these
// stand in for Roster's own.
openraft::declare_raft_types!(Forged: D = (), R = (), SnapshotData = std::io::Cursor<Vec<u8>>);

/// What the refusals say the peer port admits.
const ADMITS: &str = "the peer port admits only members of this cluster";

fn pem(dir: &Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Trusting the cluster CA in `dir`, presenting `name`.crt if given.
fn presenting(dir: &Path, name: Option<&str>) -> ClientTlsConfig {
    let tls = tls_from_files(&dir.join("ca.crt"), None).expect("the CA");
    match name {
        Some(n) => tls.identity(Identity::from_pem(
            pem(dir, &format!("{n}.crt")),
            pem(dir, &format!("{n}.key")),
        )),
        None => tls,
    }
}

/// A Raft request as a node sends it: the cluster id, and incarnation 0
/// ("not known yet"), which every node accepts.
fn request(data: Vec<u8>) -> tonic::Request<RaftPayload> {
    let mut req = tonic::Request::new(RaftPayload { data });
    let meta = req.metadata_mut();
    meta.insert("roster-cluster-id", "test".parse().expect("ASCII"));
    meta.insert("roster-target-incarnation", MetadataValue::from(0u64));
    req
}

/// A vote and an append from `sender` at term `forged`, both following the
/// cluster's last log entry (`last`, written in `term` by `leader`).
fn forgeries(sender: u64, forged: u64, leader: u64, term: u64, last: u64) -> [Vec<u8>; 2] {
    let last_id = LogId::new(CommittedLeaderId::new(term, leader), last);
    let vote = VoteRequest::new(Vote::new(forged, sender), Some(last_id));
    let append = AppendEntriesRequest::<Forged> {
        vote: Vote::new_committed(forged, sender),
        prev_log_id: Some(last_id),
        entries: vec![Entry {
            log_id: LogId::new(CommittedLeaderId::new(forged, sender), last + 1),
            payload: EntryPayload::Blank,
        }],
        leader_commit: Some(last_id),
    };
    [
        bincode::serialize(&vote).expect("encode"),
        bincode::serialize(&append).expect("encode"),
    ]
}

/// Sends both forgeries to `peer` over `tls`; the two answers.
async fn send(
    peer: &str,
    tls: ClientTlsConfig,
    [vote, append]: [Vec<u8>; 2],
) -> [tonic::Status; 2] {
    let ch = endpoint(peer, Some(&tls))
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy();
    let mut raft = RaftTransportClient::new(ch);
    let vote = raft.vote(request(vote)).await;
    let append = raft.append_entries(request(append)).await;
    [
        vote.expect_err("a forged vote admitted"),
        append.expect_err("a forged append admitted"),
    ]
}

/// `roster_peer_refused_total` of node `id` for `reason`.
async fn refused(c: &TestCluster, id: u64, reason: &str) -> u64 {
    let series = format!("roster_peer_refused_total{{reason=\"{reason}\"}} ");
    let text = c.scrape(id).await;
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .unwrap_or_else(|| panic!("no {series} in {text}"))
        .parse()
        .expect("a count")
}

/// Three nodes with TLS on both ports, each with its own certificate from `certs`.
async fn tls_cluster(certs: &Path) -> TestCluster {
    let extra = format!(
        "[tls]\ncert = \"{0}/node-{{id}}.crt\"\nkey = \"{0}/node-{{id}}.key\"\nca = \"{0}/ca.crt\"\n",
        certs.display()
    );
    let setup = Setup {
        client_tls: Some(presenting(certs, None)),
        ..Setup::default()
    };
    TestCluster::start_setup(3, &extra, setup)
        .await
        .expect("a TLS cluster")
}

#[tokio::test]
async fn forged_raft_over_the_peer_port_is_refused_and_no_term_moves() {
    let dir = tempfile::tempdir().expect("dir");
    let certs = dir.path().join("certs");
    make_certs(&certs);
    let c = tls_cluster(&certs).await;
    // Elected and replicating over the peer port: the nodes' own certificates pass.
    register(&c.client(), "svc", "i-1", 80).await;
    let leader = c.leader().await;
    let s = c.wait_applied(leader, c.leader_applied().await).await;
    let (term, last) = (s.term, s.last_log_index);
    let forged = term + 1000;
    c.wait_for(
        "every node at the leader's term",
        Duration::from_secs(10),
        || async {
            for id in 1..=3 {
                if c.status(id).await?.term != term {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;

    // Node 4's certificate, from the same CA: a node, not a member.
    make_node_certs(&certs, [4]);
    let other_ca = Ca::new("someone else");
    let stranger = other_ca.node(3, &["127.0.0.1"]);
    let strangers =
        presenting(&certs, None).identity(Identity::from_pem(stranger.cert, stranger.key));
    let handshake = |s: &tonic::Status| std::error::Error::source(s).is_some();
    for id in 1..=3 {
        let peer = c.node(id).peer.clone();
        let as_node_3 = || forgeries(3, forged, leader, term, last);
        // The client certificate make-certs.sh issues: the cluster CA's, naming no node.
        for e in send(&peer, presenting(&certs, Some("client")), as_node_3()).await {
            assert_eq!(e.code(), Code::PermissionDenied, "node {id}: {e:?}");
            assert!(e.message().contains("names no node"), "{e:?}");
            assert!(e.message().contains(ADMITS), "{e:?}");
        }
        // Another CA's certificate, even naming a node: no handshake.
        for e in send(&peer, strangers.clone(), as_node_3()).await {
            assert!(handshake(&e), "node {id}: {e:?}");
        }
        for e in send(&peer, presenting(&certs, None), as_node_3()).await {
            assert_eq!(e.code(), Code::Unauthenticated, "node {id}: {e:?}");
            assert!(e.message().contains(ADMITS), "{e:?}");
        }
        // Nor does it get at the services followers forward to the leader.
        let ch = endpoint(&peer, Some(&presenting(&certs, Some("client")))).connect_lazy();
        let e = ClusterClient::new(ch)
            .status(StatusRequest::default())
            .await
            .expect_err("the client certificate on the peer port");
        assert_eq!(e.code(), Code::PermissionDenied, "node {id}: {e:?}");
        // A node that is no member cannot speak at all.
        let as_node_4 = forgeries(4, forged, leader, term, last);
        for e in send(&peer, presenting(&certs, Some("node-4")), as_node_4).await {
            assert_eq!(e.code(), Code::PermissionDenied, "node {id}: {e:?}");
            assert!(e.message().contains("node 4 is not a member"), "{e:?}");
        }
        // A member's real certificate cannot speak for another member (the
        // messages are decoded to find that out: they are real ones).
        for e in send(&peer, presenting(&certs, Some("node-2")), as_node_3()).await {
            assert_eq!(e.code(), Code::PermissionDenied, "node {id}: {e:?}");
            assert!(
                e.message()
                    .contains("a raft message from node 3 over node 2's certificate"),
                "{e:?}"
            );
        }
    }

    // No node moves to the forged term (nor any other) over the next seconds:
    // that nothing happens is the assertion, so the window is a fixed one.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        for id in 1..=3 {
            let s = c.status(id).await.expect("status");
            assert_eq!(s.term, term, "node {id}'s term moved");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    for id in 1..=3 {
        // Two requests each (and the status call); another CA's never got
        // past the handshake.
        for (reason, n) in [
            ("no_certificate", 2),
            ("not_a_node", 3),
            ("other_sender", 2),
            ("not_a_member", 2),
        ] {
            assert_eq!(refused(&c, id, reason).await, n, "node {id}, {reason}");
        }
        // Each refused peer once, not per request.
        let log = std::fs::read_to_string(c.node(id).config.with_extension("log")).expect("log");
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("peer port refused"))
            .collect();
        assert_eq!(lines.len(), 4, "node {id}: {lines:#?}");
        for peer in [
            "a connection without a certificate from 127.0.0.1",
            "node 2's certificate from 127.0.0.1",
            "node 4's certificate from 127.0.0.1",
            "certificate serial ",
        ] {
            assert_eq!(
                lines.iter().filter(|l| l.contains(peer)).count(),
                1,
                "node {id}, {peer}: {lines:#?}"
            );
        }
    }
}

/// A node that was down while node 4 was added does not know node 4 as a
/// member; once node 4 leads, the node asks the members it knows, learns
/// that node 4 is one of them, and follows it.
#[tokio::test]
async fn a_node_away_while_a_member_was_added_follows_that_member_as_leader() {
    let dir = tempfile::tempdir().expect("dir");
    let certs = dir.path().join("certs");
    make_node_certs(&certs, 1..=4);
    let mut c = tls_cluster(&certs).await;
    c.kill(3);
    let n4 = c.start_spare();
    c.client()
        .add_member(AddMemberRequest {
            id: n4,
            address: c.endpoint(n4),
            replica: false,
        })
        .await
        .expect("add node 4");
    // A leader that stops hands over to the most up-to-date voter: node 4
    // once it has caught up (ties go to the highest id).
    for _ in 0..4 {
        let leader = c.leader().await;
        if leader == n4 {
            break;
        }
        c.signal(leader, "TERM");
        c.wait_exit(leader, Duration::from_secs(15)).await;
        c.start_node(leader);
    }
    assert_eq!(c.leader().await, n4, "node 4 never led");

    c.start_node(3);
    let applied = c.leader_applied().await;
    c.wait_for(
        "node 3 to follow node 4",
        Duration::from_secs(20),
        || async {
            c.status(3).await.filter(|s| {
                s.leader_id == n4
                    && s.applied_index >= applied
                    && s.members.iter().any(|m| m.id == n4)
            })
        },
    )
    .await;
    let log = c.log(3);
    assert!(
        log.contains("node 4 is a member in node"),
        "node 3 admitted node 4 without asking: {log}"
    );
}
