//! The node's servers: the client and peer ports with their services, and
//! the DNS zone.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Server;
use tonic_health::pb::health_server::{Health, HealthServer};

use super::consensus::Core;
use super::storage::recovery;
use crate::api::acl::AclApi;
use crate::api::auth::Authorize;
use crate::api::cluster::{Advertised, ClusterApi};
use crate::api::forward::Forward;
use crate::api::limits::RequestLimit;
use crate::api::registry::RegistryApi;
use crate::config::NodeConfig;
use crate::error::{Error, Result};
use crate::grpc::MAX_MESSAGE_BYTES;
use crate::http;
use crate::net;
use crate::proto::raft_v1::raft_transport_server::RaftTransportServer;
use crate::proto::v1::acl_server::AclServer;
use crate::proto::v1::cluster_server::ClusterServer;
use crate::proto::v1::registry_server::RegistryServer;
use crate::proto::PUBLIC_DESCRIPTOR_SET;
use crate::raft::replication::peer_trust::PeerTrust;
use crate::raft::replication::transport::RaftService;
use crate::registry::leases::Leases;
use crate::tls::{Port, Tls};
use crate::xds::{AggregatedDiscoveryServiceServer, Xds};

/// What the DNS front-end answers for, from `[dns]`; with auth on, DNS
/// answers with a token's scope, so it needs one.
pub(super) fn dns_zone(cfg: &NodeConfig) -> Result<crate::dns::Zone> {
    let d = &cfg.dns;
    let domain = if d.domain.ends_with('.') {
        d.domain.clone()
    } else {
        format!("{}.", d.domain)
    };
    let domain = hickory_server::proto::rr::Name::from_ascii(&domain)
        .map_err(|e| Error::InvalidArgument(format!("[dns] domain {:?}: {e}", d.domain)))?;
    let token =
        match (&d.token, cfg.auth.enabled) {
            (Some(secret), true) => Some(crate::api::auth::hash_secret(secret)),
            (None, true) => return Err(Error::InvalidArgument(
                "[dns] is on and [auth] enabled, but DNS queries carry no token: set [dns] token \
                 to the secret of a read token whose scope DNS may answer for"
                    .into(),
            )),
            (_, false) => None,
        };
    Ok(crate::dns::Zone {
        domain,
        ttl: d.ttl_s,
        token,
    })
}

pub(super) async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Unavailable(format!("bind {addr}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| Error::Internal(e.to_string()))?;
    Ok((listener, bound))
}

pub(super) struct Listeners {
    pub client: TcpListener,
    pub peer: TcpListener,
}

/// The gRPC servers (client and peer port), until they stop.
pub(super) type ServerTask = JoinHandle<std::result::Result<(), tonic::transport::Error>>;

/// The public services (each behind the request size limit) and Raft's.
struct Services {
    registry: RequestLimit<RegistryServer<RegistryApi>>,
    cluster: RequestLimit<ClusterServer<ClusterApi>>,
    acl: RequestLimit<AclServer<AclApi>>,
    xds: Option<Authorize<RequestLimit<AggregatedDiscoveryServiceServer<Xds>>>>,
    raft_transport: RaftTransportServer<RaftService>,
    trust: PeerTrust,
}

fn services(core: &Core, cfg: &NodeConfig, leases: Arc<Leases>, tls: bool) -> Services {
    let registry = RegistryServer::new(RegistryApi::new(
        core.replica.state.clone(),
        core.replica.proposer.clone(),
        core.replica.peers.clone(),
        leases,
        cfg.limits.clone(),
    ))
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    // Every service of the client port but Raft's, whose messages are large.
    let max_request = cfg.limits.max_request_bytes;
    let registry = RequestLimit::new(registry, max_request);
    let cluster = ClusterServer::new(
        ClusterApi::new(
            core.replica.raft.clone(),
            core.replica.me.clone(),
            Advertised {
                client: cfg.advertise.clone(),
                peer: cfg.peer_advertise_addr(),
            },
            core.replica.proposer.clone(),
            core.replica.peers.clone(),
            core.replica.contact.clone(),
            core.replica.state_machine.clone(),
        )
        .with_autopilot(cfg.autopilot.policy()),
    );
    let cluster = RequestLimit::new(cluster, max_request);
    let acl = RequestLimit::new(
        AclServer::new(AclApi::new(
            core.replica.state.clone(),
            core.replica.proposer.clone(),
        )),
        max_request,
    );
    let xds = xds_service(core, cfg);
    let trust = PeerTrust::new(
        core.replica.raft.clone(),
        core.replica.me.clone(),
        core.replica.peers.clone(),
        core.peer_refusals.clone(),
        tls,
    );
    let raft_transport =
        RaftTransportServer::new(core.replica.service(recovery(cfg), trust.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
    Services {
        registry,
        cluster,
        acl,
        xds,
        raft_transport,
        trust,
    }
}

/// Serves the public services on the client port, and Raft and forwarded
/// requests on the peer port, until the returned sender fires.
pub(super) fn serve(
    core: &Core,
    cfg: &NodeConfig,
    listeners: Listeners,
    tls: Option<Arc<Tls>>,
    leases: Arc<Leases>,
    health: HealthServer<impl Health>,
) -> Result<(oneshot::Sender<()>, ServerTask, (http::Grpc, http::Grpc))> {
    // Both versions, since many tools still speak v1alpha; the public API only.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(PUBLIC_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| Error::Internal(format!("reflection: {e}")))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| Error::Internal(format!("reflection: {e}")))?;
    let max_request = cfg.limits.max_request_bytes;
    let Services {
        registry,
        cluster,
        acl,
        xds,
        raft_transport,
        trust,
    } = services(core, cfg, leases, tls.is_some());
    let timeout = cfg.request_timeout();
    let limits = &cfg.connections;
    let max_connections =
        net::max_connections(limits, net::raise_fd_limit(), cfg.max_concurrent_probes);
    let (stop, stopped) = oneshot::channel::<()>();
    let stopped = stopped.shared();
    let on = |port| tls_source(&tls, port);
    let keepalive = || {
        // Pings find dead peers and clients; the listener closes idle and silent ones.
        Server::builder()
            .http2_keepalive_interval(Some(Duration::from_millis(limits.keepalive_interval_ms)))
            .http2_keepalive_timeout(Some(Duration::from_millis(limits.keepalive_timeout_ms)))
            .layer(net::TrackRequestsLayer)
    };
    let front = Front {
        core,
        timeout,
        auth: cfg.auth.enabled,
    };
    // The HTTP API calls the client port's stacks in-process.
    let http_stacks = (
        http::Grpc::new(front.forwarded(registry.clone())),
        http::Grpc::new(front.forwarded(cluster.clone())),
    );
    let client_port = keepalive()
        .add_service(front.forwarded(registry.clone()))
        .add_service(front.forwarded(cluster.clone()))
        .add_service(front.forwarded(acl.clone()))
        // Health needs no token: probes and load balancers call it.
        .add_service(RequestLimit::new(health, max_request))
        .add_service(front.authorized(RequestLimit::new(reflection_v1, max_request)))
        .add_service(front.authorized(RequestLimit::new(reflection_v1alpha, max_request)))
        .add_optional_service(xds)
        .serve_with_incoming_shutdown(
            net::incoming(listeners.client, limits, max_connections, on(Port::Client)),
            stopped.clone().map(drop),
        );
    // What a follower forwards is served here as on the leader's client
    // port, minus forwarding: it is never forwarded a second time. With TLS
    // only members get through (`PeerTrust`), and forwarded calls still
    // carry their callers' tokens.
    let peer_port = keepalive()
        .add_service(trust.guard(raft_transport))
        .add_service(trust.guard(front.authorized(registry)))
        .add_service(trust.guard(front.authorized(cluster)))
        .add_service(trust.guard(front.authorized(acl)))
        .serve_with_incoming_shutdown(
            net::incoming(listeners.peer, limits, max_connections, on(Port::Peer)),
            stopped.map(drop),
        );
    let server = async move {
        let (client, peer) = tokio::join!(client_port, peer_port);
        client.and(peer)
    };
    Ok((stop, tokio::spawn(server), http_stacks))
}

/// The servers beside the gRPC ports, each where configured: metrics, the
/// HTTP/JSON API (calling the client port's stacks in-process) and DNS.
pub(super) struct Beside {
    pub metrics: Option<JoinHandle<()>>,
    pub http: Option<(SocketAddr, JoinHandle<()>)>,
    pub dns: Option<crate::dns::DnsServer>,
}

pub(super) async fn beside(
    core: &Core,
    cfg: &NodeConfig,
    tls: &Option<Arc<Tls>>,
    (registry, cluster): (http::Grpc, http::Grpc),
) -> Result<Beside> {
    let metrics = match cfg.metrics_listen {
        Some(addr) => Some(
            crate::metrics::serve(
                addr,
                crate::metrics::Sources {
                    raft: core.replica.raft.clone(),
                    state: core.replica.state.clone(),
                    peers: core.replica.peers.clone(),
                    contact: core.replica.contact.clone(),
                    fsync: core.replica.log.fsync_seconds(),
                    xds: core.xds.clone(),
                    peer_refusals: core.peer_refusals.clone(),
                },
                core.replica.timing.election_min,
            )
            .await?,
        ),
        None => None,
    };
    let http = match cfg.http.listen {
        Some(at) => {
            let (listener, bound) = bind(at).await?;
            let https = tls_source(tls, Port::Http).map(|tls| http::Https {
                tls,
                handshake: Duration::from_millis(cfg.connections.handshake_timeout_ms),
            });
            Some((bound, http::serve(listener, https, registry, cluster)))
        }
        None => None,
    };
    let dns = match cfg.dns.listen {
        Some(at) => Some(
            crate::dns::DnsServer::start(at, dns_zone(cfg)?, core.replica.state.clone()).await?,
        ),
        None => None,
    };
    Ok(Beside { metrics, http, dns })
}

/// Where a TLS port takes its settings for each new connection: those in
/// force then, so that rotated certificates serve new connections.
pub(super) fn tls_source(tls: &Option<Arc<Tls>>, port: Port) -> Option<net::TlsSource> {
    let tls = tls.clone()?;
    Some(Arc::new(move || tls.server(port)))
}

/// The xDS service of the client port, unless `[xds] enabled` is false.
/// Its clients send no token: with auth on, a call without one gets the
/// scope of `[xds] token`, or is refused saying so.
pub(super) fn xds_service(
    core: &Core,
    cfg: &NodeConfig,
) -> Option<Authorize<RequestLimit<AggregatedDiscoveryServiceServer<Xds>>>> {
    if !cfg.xds.enabled {
        return None;
    }
    let ads = AggregatedDiscoveryServiceServer::new(Xds::new(
        core.replica.state.clone(),
        &cfg.limits,
        core.xds.clone(),
    ))
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    Some(Authorize::with_fallback(
        RequestLimit::new(ads, cfg.limits.max_request_bytes),
        core.replica.state.clone(),
        cfg.auth.enabled,
        cfg.xds.token.as_deref().map(crate::api::auth::hash_secret),
        "this cluster requires a token, and gRPC's xDS clients send none: set [xds] token \
         on the nodes to the secret of a read token (xDS serves what its scope covers), or \
         send `authorization: Bearer <secret>`",
    ))
}

/// How the public services are put on a port: behind authorization (a no-op
/// without `[auth]`), and on the client port behind forwarding too.
pub(super) struct Front<'a> {
    core: &'a Core,
    timeout: Duration,
    auth: bool,
}

impl Front<'_> {
    fn authorized<S>(&self, service: S) -> Authorize<S> {
        Authorize::new(service, self.core.replica.state.clone(), self.auth)
    }

    fn forwarded<S>(&self, service: S) -> Authorize<Forward<S>> {
        self.authorized(Forward::new(
            service,
            self.core.replica.proposer.clone(),
            self.core.replica.peers.clone(),
            self.timeout,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_with_auth_needs_a_token_and_the_domain_is_qualified() {
        let port = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        let mut cfg = NodeConfig::new(1, port(1), port(2), "/data".into());
        cfg.dns.domain = "sd.example".into();
        let zone = dns_zone(&cfg).expect("no auth, no token needed");
        assert_eq!(zone.domain.to_ascii(), "sd.example.");
        assert!(zone.token.is_none());
        cfg.auth.enabled = true;
        let e = dns_zone(&cfg).expect_err("auth without a DNS token");
        assert!(e.to_string().contains("[dns] token"), "{e}");
        cfg.dns.token = Some("s3cret".into());
        let zone = dns_zone(&cfg).expect("with a token");
        assert_eq!(zone.token, Some(crate::api::auth::hash_secret("s3cret")));
    }
}
