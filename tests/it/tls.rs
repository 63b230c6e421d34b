//! TLS on both ports with certificates made at test time (rcgen) and real
//! handshakes: the client port serves TLS, the peer port requires mutual TLS
//! against the cluster CA, and certificates rotate without a restart. What
//! the peer port admits beyond the handshake: tests/peer_trust.rs.

use std::time::Duration;

use crate::common::certs::{tls_section, write_nodes, Ca, Issued};
use crate::common::*;
use roster::client::{tls_from_pem, RosterClient};
use roster::proto::raft_v1::raft_transport_client::RaftTransportClient;
use roster::proto::raft_v1::RaftPayload;
use roster::proto::v1::*;
use tonic::transport::{Channel, ClientTlsConfig};
use tonic::Code;

async fn start(extra: &str, client_tls: ClientTlsConfig) -> TestCluster {
    let setup = Setup {
        client_tls: Some(client_tls),
        ..Setup::default()
    };
    TestCluster::start_setup(3, extra, setup)
        .await
        .expect("a TLS cluster")
}

fn dial(addr: &str, tls: Option<ClientTlsConfig>) -> Channel {
    endpoint(addr, tls.as_ref())
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy()
}

/// A Raft vote sent to `addr` with `tls`: what the peer port answers.
async fn vote(addr: &str, tls: Option<ClientTlsConfig>) -> tonic::Status {
    RaftTransportClient::new(dial(addr, tls))
        .vote(RaftPayload { data: vec![0; 8] })
        .await
        .expect_err("no member sent it")
}

async fn status(addr: &str, tls: Option<ClientTlsConfig>) -> Result<StatusResponse, tonic::Status> {
    cluster_client::ClusterClient::new(dial(addr, tls))
        .status(StatusRequest::default())
        .await
        .map(|r| r.into_inner())
}

/// A connection that never got through the TLS handshake fails in transport
/// (the status carries the transport error), before any service saw the request.
fn refused_in_handshake(s: &tonic::Status) -> bool {
    std::error::Error::source(s).is_some()
}

/// What a plaintext client hears from a TLS port.
fn told_to_use_tls(s: &tonic::Status) -> bool {
    refused_in_handshake(s) && format!("{s:?}").contains("this port serves TLS")
}

#[tokio::test]
async fn both_ports_serve_tls_and_the_peer_port_only_to_the_clusters_certificates() {
    let dir = tempfile::tempdir().expect("dir");
    let (ca, other) = (Ca::new("cluster"), Ca::new("someone else"));
    let extra = tls_section(dir.path(), &ca.nodes(3), &ca.pem(), false);
    let trusting = |ca: &Ca| tls_from_pem(ca.pem().as_bytes(), None);
    // Electing a leader and replicating already take mutual TLS between peers.
    let c = start(&extra, trusting(&ca)).await;
    let leader = c.leader().await;
    let follower = (1..=3).find(|&i| i != leader).expect("a follower");
    // A write sent to a follower is forwarded over the peer port's mutual TLS.
    let via_follower = c.node_client(follower);
    register(&via_follower, "tls", "t-1", 80).await;
    assert_eq!(
        ids(&via_follower, "tls", Consistency::Linearizable).await,
        vec!["t-1"]
    );

    // The client port: plaintext and another CA's trust get nowhere.
    let endpoint = c.endpoint(follower);
    let e = status(&endpoint, None).await.expect_err("plaintext to TLS");
    assert!(told_to_use_tls(&e), "{e:?}");
    let e = status(&endpoint, Some(trusting(&other)))
        .await
        .expect_err("a server certificate from another CA");
    assert!(refused_in_handshake(&e), "{e:?}");
    let plain = RosterClient::new(std::slice::from_ref(&endpoint)).expect("client");
    let e = plain
        .status()
        .await
        .expect_err("the Rust client in plaintext");
    assert!(told_to_use_tls(e.status()), "{e:?}");

    // The peer port: with a client certificate from another CA, or in
    // plaintext, a Raft message never gets past the handshake; without a
    // client certificate it is refused before the Raft service.
    let peer = c.node(follower).peer.clone();
    for (what, tls) in [
        ("plaintext", None),
        (
            "a client certificate from another CA",
            Some(trusting(&ca).identity(identity(&other.node(1, &["127.0.0.1"])))),
        ),
    ] {
        let e = vote(&peer, tls).await;
        assert!(refused_in_handshake(&e), "{what}: {e:?}");
    }
    let e = RaftTransportClient::new(dial(&peer, Some(trusting(&ca))))
        .append_entries(RaftPayload { data: vec![] })
        .await
        .expect_err("append entries without a client certificate");
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    // With a member's certificate the Raft service answers (here: no
    // cluster id, so refused as a stranger).
    let member = trusting(&ca).identity(identity(&ca.node(1, &["127.0.0.1"])));
    let e = vote(&peer, Some(member)).await;
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
}

fn identity(issued: &Issued) -> tonic::transport::Identity {
    tonic::transport::Identity::from_pem(&issued.cert, &issued.key)
}

#[tokio::test]
async fn the_client_port_can_ask_for_client_certificates() {
    let dir = tempfile::tempdir().expect("dir");
    let (ca, other) = (Ca::new("cluster"), Ca::new("someone else"));
    let extra = tls_section(dir.path(), &ca.nodes(3), &ca.pem(), true);
    let client = ca.issue("client", &["client"]);
    let with = |issued: Option<&Issued>| {
        let tls = tls_from_pem(ca.pem().as_bytes(), None);
        match issued {
            Some(i) => tls.identity(identity(i)),
            None => tls,
        }
    };
    let c = start(&extra, with(Some(&client))).await;
    let endpoint = c.endpoint(1);
    let s = status(&endpoint, Some(with(Some(&client))))
        .await
        .expect("a client with the CA's certificate");
    assert_eq!(s.node_id, 1);
    let e = status(&endpoint, Some(with(None)))
        .await
        .expect_err("no client certificate");
    assert!(refused_in_handshake(&e), "{e:?}");
    let stranger = other.issue("stranger", &["client"]);
    let e = status(&endpoint, Some(with(Some(&stranger))))
        .await
        .expect_err("a client certificate from another CA");
    assert!(refused_in_handshake(&e), "{e:?}");
}

#[tokio::test]
async fn certificates_rotate_without_a_restart_and_sighup_reloads() {
    let dir = tempfile::tempdir().expect("dir");
    let (old, new) = (Ca::new("old"), Ca::new("new"));
    // Peers trust both CAs while the certificates move from one to the other.
    let both = format!("{}{}", old.pem(), new.pem());
    let extra = tls_section(dir.path(), &old.nodes(3), &both, false);
    let trusting_new = tls_from_pem(new.pem().as_bytes(), None);
    let trusting_both = tls_from_pem(both.as_bytes(), None);
    let mut c = start(&extra, trusting_both).await;
    let endpoint = c.endpoint(1);
    let e = status(&endpoint, Some(trusting_new.clone()))
        .await
        .expect_err("node 1 still serves the old CA's certificate");
    assert!(refused_in_handshake(&e), "{e:?}");

    // The files change under the running nodes.
    write_nodes(dir.path(), &new.nodes(3));
    let s = c
        .wait_for(
            "node 1 to serve the new certificate",
            Duration::from_secs(15),
            || {
                let (endpoint, tls) = (endpoint.clone(), trusting_new.clone());
                async move { status(&endpoint, Some(tls)).await.ok() }
            },
        )
        .await;
    assert_eq!(s.node_id, 1);
    // New peer connections use the new certificates too: the cluster goes on
    // (a write through a follower crosses the peer port).
    let leader = c.leader().await;
    let follower = (1..=3).find(|&i| i != leader).expect("a follower");
    register(&c.node_client(follower), "rotated", "r-1", 80).await;

    let log =
        || std::fs::read_to_string(c.node(1).config.with_extension("log")).unwrap_or_default();
    assert!(
        log().contains("TLS certificates reloaded (changed)"),
        "{}",
        log()
    );

    // SIGHUP asks for a reload; it does not stop the node (its default action would).
    c.signal(1, "HUP");
    c.wait_for(
        "node 1 to answer SIGHUP",
        Duration::from_secs(10),
        || async {
            log()
                .contains("SIGHUP: TLS certificates unchanged")
                .then_some(())
        },
    )
    .await;
    let s = status(&endpoint, Some(trusting_new))
        .await
        .expect("node 1 still serving after SIGHUP");
    assert_eq!(s.node_id, 1);
    assert!(c.exited(1).is_none(), "SIGHUP stopped node 1");
}
