//! Prometheus metrics over HTTP (`GET /metrics`): Raft progress and the size
//! and health of the catalogue, read from the node at scrape time. Also
//! `GET /ready`, the readiness the gRPC health service reports, for probes
//! that cannot speak gRPC over TLS (Kubernetes' gRPC probe cannot).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use openraft::{RaftMetrics, ServerState};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::peers::Peers;
use crate::raft::liveness::election::Contact;
use crate::raft::liveness::leadership::{can_serve, lag_entries};
use crate::raft::replication::peer_trust::PeerRefusals;
use crate::raft::{Node, NodeId, Raft};
use crate::registry::catalog::Usage;
use crate::registry::namespace::Quota;
use crate::registry::watch::{RegistryState, SharedState};
use crate::registry::HealthStatus;
use crate::xds::XdsStats;

/// What the metrics are read from.
#[derive(Clone)]
pub struct Sources {
    pub raft: Raft,
    pub state: SharedState,
    pub peers: Peers,
    pub contact: Contact,
    /// The log's flush durations, kept by the log store.
    pub fsync: Histogram,
    pub xds: Arc<XdsStats>,
    pub peer_refusals: Arc<PeerRefusals>,
}

/// Serves `/metrics` and `/ready` on `addr` until the returned task is
/// aborted; `lease` is how long a leader counts as such after a quorum last
/// answered it.
pub async fn serve(addr: SocketAddr, sources: Sources, lease: Duration) -> Result<JoinHandle<()>> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Unavailable(format!("bind metrics listener {addr}: {e}")))?;
    Ok(tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let sources = sources.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let reply = match req.uri().path() {
                        "/metrics" => Response::builder()
                            .header("content-type", "text/plain; version=0.0.4")
                            .body(Full::new(Bytes::from(render(&sources)))),
                        "/ready" => {
                            let m = sources.raft.metrics().borrow().clone();
                            match can_serve(&m, m.id, lease, &sources.contact) {
                                true => Response::builder()
                                    .body(Full::new(Bytes::from_static(b"ready\n"))),
                                false => Response::builder()
                                    .status(StatusCode::SERVICE_UNAVAILABLE)
                                    .body(Full::new(Bytes::from_static(
                                        b"not ready: no leader with a quorum known\n",
                                    ))),
                            }
                        }
                        _ => Response::builder()
                            .status(StatusCode::NOT_FOUND)
                            .body(Full::new(Bytes::from_static(
                                b"only /metrics and /ready here\n",
                            ))),
                    };
                    async move { Ok::<_, Infallible>(reply.unwrap_or_default()) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }))
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: i64) {
    let g: Gauge = Gauge::default();
    g.set(value);
    registry.register(name, help, g);
}

/// The metrics text; built per scrape, so nothing else in the node keeps counters.
pub fn render(s: &Sources) -> String {
    let m = s.raft.metrics().borrow().clone();
    let mut r = Registry::with_prefix("roster");
    raft_metrics(&mut r, &m, &s.peers, &s.contact);
    r.register(
        "log_fsync_seconds",
        "Duration of each group-commit flush (fsync) of the Raft log",
        s.fsync.clone(),
    );
    if let Ok(st) = s.state.read() {
        registry_metrics(&mut r, &st);
    }
    xds_metrics(&mut r, &s.xds);
    let refused: Family<Vec<(String, String)>, Counter> = Family::default();
    for (reason, n) in s.peer_refusals.counts() {
        refused
            .get_or_create(&vec![("reason".to_string(), reason.to_string())])
            .inc_by(n);
    }
    r.register(
        "peer_refused",
        "Requests the peer port refused (with [tls]): no client certificate, one naming no node, a node not a member, or a raft message from another node than the certificate's; the log names each refused peer",
        refused,
    );
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &r);
    out
}

/// The xDS streams of this node.
fn xds_metrics(r: &mut Registry, x: &XdsStats) {
    let read = |a: &AtomicU64| a.load(Ordering::Relaxed);
    gauge(
        r,
        "xds_streams",
        "xDS (ADS) streams open on this node",
        i64::try_from(read(&x.streams)).unwrap_or(i64::MAX),
    );
    for (name, help, v) in [
        (
            "xds_responses",
            "xDS responses sent by this node",
            read(&x.responses),
        ),
        (
            "xds_nacks",
            "xDS responses clients rejected (NACK); the log says why",
            read(&x.nacks),
        ),
    ] {
        let c: Counter = Counter::default();
        c.inc_by(v);
        r.register(name, help, c);
    }
}

fn index(v: Option<u64>) -> i64 {
    i64::try_from(v.unwrap_or(0)).unwrap_or(i64::MAX)
}

/// Raft progress as this node sees it, and on the leader each peer's round trip.
fn raft_metrics(r: &mut Registry, m: &RaftMetrics<NodeId, Node>, peers: &Peers, contact: &Contact) {
    let leading = m.state == ServerState::Leader;
    let gauges = [
        (
            "raft_term",
            "Current Raft term",
            index(Some(m.current_term)),
        ),
        ("raft_is_leader", "1 on the leader", i64::from(leading)),
        (
            "raft_leader_id",
            "Node id of the known leader, 0 if none",
            index(contact.leader(m)),
        ),
        (
            "raft_last_log_index",
            "Last log index",
            index(m.last_log_index),
        ),
        (
            "raft_applied_index",
            "Last applied index",
            index(m.last_applied.map(|l| l.index)),
        ),
        (
            "raft_snapshot_index",
            "Index of the last snapshot",
            index(m.snapshot.map(|l| l.index)),
        ),
        (
            "raft_purged_index",
            "Log purged up to this index",
            index(m.purged.map(|l| l.index)),
        ),
        (
            "raft_voters",
            "Voting members",
            m.membership_config.membership().voter_ids().count() as i64,
        ),
        (
            "raft_replicas",
            "Read replicas (learners never made voters) in the membership",
            m.membership_config
                .membership()
                .nodes()
                .filter(|(_, n)| n.replica)
                .count() as i64,
        ),
    ];
    for (name, help, value) in gauges {
        gauge(r, name, help, value);
    }
    // Absent on the leader, and on a node that has heard from none yet.
    if let Some(heard) = contact.leader_contact().filter(|_| !leading) {
        let g: Gauge<f64, AtomicU64> = Gauge::default();
        g.set(heard.as_secs_f64());
        r.register(
            "leader_contact_seconds",
            "Seconds since this node last heard from a leader: its stale reads and watches hold no write acknowledged since",
            g,
        );
    }
    if leading {
        peer_metrics(r, m, peers);
    }
}

/// On the leader: each member's round trip, lag and early appends.
fn peer_metrics(r: &mut Registry, m: &RaftMetrics<NodeId, Node>, peers: &Peers) {
    // Peers keeps the measurements of removed peers; only members get series.
    let member = |id: &NodeId| m.membership_config.membership().get_node(id).is_some();
    let rtt: Family<Vec<(String, String)>, Gauge<f64, AtomicU64>> = Family::default();
    for (peer, d) in peers.rtts().into_iter().filter(|(p, _)| member(p)) {
        rtt.get_or_create(&vec![("peer".to_string(), peer.to_string())])
            .set(d.as_secs_f64());
    }
    r.register(
        "raft_peer_rtt_seconds",
        "Smoothed heartbeat round trip from this leader to each peer",
        rtt,
    );
    let lag: Family<Vec<(String, String)>, Gauge> = Family::default();
    for peer in m.membership_config.membership().nodes().map(|(id, _)| *id) {
        if let Some(behind) = lag_entries(m, peer) {
            lag.get_or_create(&vec![("peer".to_string(), peer.to_string())])
                .set(i64::try_from(behind).unwrap_or(i64::MAX));
        }
    }
    r.register(
        "raft_peer_lag_entries",
        "Log entries each peer lacks, as this leader last knew",
        lag,
    );
    let early: Family<Vec<(String, String)>, Counter> = Family::default();
    for (peer, (accepted, broken)) in peers.early_appends().into_iter().filter(|(p, _)| member(p)) {
        for (outcome, n) in [("accepted", accepted), ("broken", broken)] {
            early
                .get_or_create(&vec![
                    ("peer".to_string(), peer.to_string()),
                    ("outcome".to_string(), outcome.to_string()),
                ])
                .inc_by(n);
        }
    }
    r.register(
        "raft_early_appends",
        "AppendEntries this leader sent to a far peer ahead of the answer to the previous one: accepted, or refused or lost (the pipeline then restarts)",
        early,
    );
}

/// The catalogue's size and health, and the open watch streams.
fn registry_metrics(r: &mut Registry, st: &RegistryState) {
    gauge(
        r,
        "registry_revision",
        "Revision of the catalogue",
        index(Some(st.catalog.revision())),
    );
    gauge(
        r,
        "registry_services",
        "Services with instances",
        st.catalog.service_count() as i64,
    );
    gauge(
        r,
        "registry_sessions",
        "Open sessions",
        st.catalog.session_count() as i64,
    );
    // One pass over the catalogue: it is read under the lock writes need.
    let mut counts = [0i64; 4];
    for i in st.catalog.all_instances() {
        counts[match i.status {
            _ if i.maintenance().is_some() => 3,
            HealthStatus::Passing => 0,
            HealthStatus::Warning => 1,
            HealthStatus::Critical => 2,
        }] += 1;
    }
    let by_status: Family<Vec<(String, String)>, Gauge> = Family::default();
    for (name, n) in ["passing", "warning", "critical", "maintenance"]
        .into_iter()
        .zip(counts)
    {
        by_status
            .get_or_create(&vec![("status".to_string(), name.to_string())])
            .set(n);
    }
    r.register(
        "registry_instances",
        "Instances by health status",
        by_status,
    );
    gauge(
        r,
        "watch_streams",
        "Open watch streams, the leader's health checker included",
        st.hub.watchers() as i64,
    );
    namespace_metrics(r, st);
}

/// What each namespace holds, and its quotas: series per namespace, which
/// `[limits] max_namespaces` bounds.
fn namespace_metrics(r: &mut Registry, st: &RegistryState) {
    // One pass over the namespaces for all four families.
    let all: Vec<_> = st.catalog.namespaces().collect();
    let held = |what: fn(&Usage) -> u64| {
        let family: Family<Vec<(String, String)>, Gauge> = Family::default();
        for (ns, usage) in &all {
            family
                .get_or_create(&vec![("namespace".to_string(), ns.name.clone())])
                .set(i64::try_from(what(usage)).unwrap_or(i64::MAX));
        }
        family
    };
    r.register(
        "namespace_instances",
        "Instances in each namespace",
        held(|u| u.instances),
    );
    r.register(
        "namespace_services",
        "Services with instances or settings in each namespace",
        held(|u| u.services),
    );
    r.register(
        "namespace_sessions",
        "Open sessions in each namespace",
        held(|u| u.sessions),
    );
    let quotas: Family<Vec<(String, String)>, Gauge> = Family::default();
    for (ns, _) in &all {
        for q in Quota::ALL {
            let limit = q.of(&ns.quotas);
            if limit > 0 {
                let labels = vec![
                    ("namespace".to_string(), ns.name.clone()),
                    ("quota".to_string(), q.name().to_string()),
                ];
                quotas
                    .get_or_create(&labels)
                    .set(i64::try_from(limit).unwrap_or(i64::MAX));
            }
        }
    }
    r.register(
        "namespace_quota",
        "Each namespace's quotas that are set (0 is no limit, and not shown)",
        quotas,
    );
}
