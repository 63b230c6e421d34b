//! The xDS service's resources and protocol, asked over real gRPC with
//! Envoy's own ADS stubs (envoy-types) on a follower: listener, route,
//! cluster and endpoints agree; versions increase with pushes; ACKs are
//! quiet, a NACK is counted and not answered with a resend; a service going
//! away leaves the listeners; tokens scope what a stream sees. A real gRPC
//! client (Python grpcio) is in `tests/xds_python.rs`.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::common::*;
use envoy_types::pb::envoy::config::cluster::v3::{cluster, Cluster};
use envoy_types::pb::envoy::config::core::v3::{config_source, Node};
use envoy_types::pb::envoy::config::endpoint::v3::{lb_endpoint, ClusterLoadAssignment};
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::{route, route_action};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager, HttpConnectionManager,
};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;
use roster::proto::v1::{CreateTokenRequest, DeregisterRequest, RegisterRequest, Role};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::Streaming;

const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const ENDPOINTS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const LIMIT: Duration = Duration::from_secs(20);

/// One ADS stream, as an xDS client holds it.
struct Ads {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: Streaming<DiscoveryResponse>,
}

impl Ads {
    async fn open(c: &TestCluster, id: u64, token: Option<&str>) -> Result<Ads, tonic::Status> {
        let channel = c.channel(&c.endpoint(id)).await;
        let (tx, requests) = mpsc::channel(16);
        let mut req = tonic::Request::new(ReceiverStream::new(requests));
        if let Some(t) = token {
            let v: MetadataValue<_> = format!("Bearer {t}").parse().expect("header");
            req.metadata_mut().insert("authorization", v);
        }
        let rx = AggregatedDiscoveryServiceClient::new(channel)
            .stream_aggregated_resources(req)
            .await?
            .into_inner();
        Ok(Ads { tx, rx })
    }

    /// Subscribes to `names` of `type_url`, or answers `last` (ACK, or NACK
    /// with `error`).
    async fn send(
        &self,
        type_url: &str,
        names: &[&str],
        last: Option<&DiscoveryResponse>,
        error: Option<&str>,
    ) {
        let req = DiscoveryRequest {
            node: Some(Node {
                id: "rust-test".into(),
                ..Default::default()
            }),
            type_url: type_url.into(),
            resource_names: names.iter().map(|n| n.to_string()).collect(),
            version_info: last.map(|r| r.version_info.clone()).unwrap_or_default(),
            response_nonce: last.map(|r| r.nonce.clone()).unwrap_or_default(),
            error_detail: error.map(|m| RpcStatus {
                code: 3,
                message: m.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        self.tx.send(req).await.expect("the stream is open");
    }

    async fn recv(&mut self) -> DiscoveryResponse {
        tokio::time::timeout(LIMIT, self.rx.message())
            .await
            .expect("a response in time")
            .expect("a response, not an error")
            .expect("the stream goes on")
    }

    /// Subscribes and takes the answer, which it ACKs.
    async fn subscribe(&mut self, type_url: &str, names: &[&str]) -> DiscoveryResponse {
        self.send(type_url, names, None, None).await;
        let r = self.recv().await;
        assert_eq!(r.type_url, type_url);
        self.send(type_url, names, Some(&r), None).await;
        r
    }
}

fn decode<M: Message + Default>(r: &DiscoveryResponse) -> Vec<M> {
    r.resources
        .iter()
        .map(|a| M::decode(a.value.as_slice()).expect("a resource of the response's type"))
        .collect()
}

fn version(r: &DiscoveryResponse) -> u64 {
    r.version_info.parse().expect("versions are revisions")
}

/// `ip:port` of each endpoint, by locality zone.
fn endpoints(r: &DiscoveryResponse) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for cla in decode::<ClusterLoadAssignment>(r) {
        for l in cla.endpoints {
            let zone = l.locality.map(|l| l.zone).unwrap_or_default();
            for e in l.lb_endpoints {
                let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = e.host_identifier else {
                    panic!("an endpoint");
                };
                let sa = ep
                    .address
                    .and_then(|a| a.address)
                    .map(|a| format!("{a:?}"))
                    .unwrap_or_default();
                out.insert((zone.clone(), sa));
            }
        }
    }
    out
}

async fn put(c: &TestCluster, service: &str, id: &str, port: u32, zone: &str) -> u64 {
    let mut inst = instance(service, id, port);
    inst.metadata.insert("zone".into(), zone.into());
    c.client()
        .register(RegisterRequest {
            instance: Some(inst),
            ..Default::default()
        })
        .await
        .expect("register")
        .revision
}

async fn follower(c: &TestCluster) -> u64 {
    let leader = c.leader().await;
    (1..=3).find(|&i| i != leader).expect("a follower")
}

async fn nacks(c: &TestCluster, id: u64) -> u64 {
    c.scrape(id)
        .await
        .lines()
        .find_map(|l| l.strip_prefix("roster_xds_nacks_total "))
        .and_then(|v| v.parse().ok())
        .expect("the NACK counter")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resources_agree_versions_increase_and_nacks_are_not_resent() {
    let c = TestCluster::start(3).await;
    put(&c, "api", "api-1", 9001, "z1").await;
    put(&c, "api", "api-2", 9002, "z2").await;
    put(&c, "gone", "gone-1", 9100, "z1").await;
    let f = follower(&c).await;
    c.wait_applied(f, c.leader_applied().await).await;
    let mut ads = Ads::open(&c, f, None).await.expect("an ADS stream");

    // Listener → inline route → cluster `api`; an unknown name is left out.
    let lds = ads.subscribe(LISTENER, &["api", "gone", "nope"]).await;
    let listeners: Vec<Listener> = decode(&lds);
    let names: Vec<&str> = listeners.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["api", "gone"]);
    let hcm = HttpConnectionManager::decode(
        listeners[0]
            .api_listener
            .as_ref()
            .and_then(|a| a.api_listener.as_ref())
            .expect("an API listener")
            .value
            .as_slice(),
    )
    .expect("an HTTP connection manager");
    let Some(http_connection_manager::RouteSpecifier::RouteConfig(rc)) = hcm.route_specifier else {
        panic!("an inline route configuration");
    };
    let Some(route::Action::Route(action)) = &rc.virtual_hosts[0].routes[0].action else {
        panic!("a route to a cluster");
    };
    assert_eq!(
        action.cluster_specifier,
        Some(route_action::ClusterSpecifier::Cluster("api".into()))
    );

    // The cluster takes its endpoints from EDS over this same stream.
    let cds = ads.subscribe(CLUSTER, &["api"]).await;
    let clusters: Vec<Cluster> = decode(&cds);
    let eds = clusters[0]
        .eds_cluster_config
        .as_ref()
        .expect("an EDS cluster");
    assert_eq!(eds.service_name, "api");
    assert!(matches!(
        eds.eds_config
            .as_ref()
            .and_then(|s| s.config_source_specifier.as_ref()),
        Some(config_source::ConfigSourceSpecifier::Ads(_))
    ));
    assert_eq!(
        clusters[0].cluster_discovery_type,
        Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Eds as i32
        ))
    );

    let first = ads.subscribe(ENDPOINTS, &["api"]).await;
    let zones: BTreeSet<String> = endpoints(&first).into_iter().map(|(z, _)| z).collect();
    assert_eq!(zones, BTreeSet::from(["z1".into(), "z2".into()]));
    assert_eq!(endpoints(&first).len(), 2);

    // A registration is pushed as the follower applies it, at a higher
    // version; the listeners and clusters do not change, so only endpoints come.
    let rev = put(&c, "api", "api-3", 9003, "z1").await;
    let pushed = ads.recv().await;
    assert_eq!(pushed.type_url, ENDPOINTS);
    assert!(version(&pushed) >= rev && version(&pushed) > version(&first));
    assert_eq!(endpoints(&pushed).len(), 3);

    // A NACK is counted, and nothing is sent again for it: the next message
    // is the next change.
    ads.send(
        ENDPOINTS,
        &["api"],
        Some(&pushed),
        Some("rejected by the test"),
    )
    .await;
    c.wait_for("the NACK counted", LIMIT, || async {
        (nacks(&c, f).await == 1).then_some(())
    })
    .await;
    put(&c, "api", "api-4", 9004, "z2").await;
    let next = ads.recv().await;
    assert_eq!(next.type_url, ENDPOINTS);
    assert!(version(&next) > version(&pushed));
    assert_eq!(endpoints(&next).len(), 4);
    ads.send(ENDPOINTS, &["api"], Some(&next), None).await;

    // A service whose last instance goes leaves the listeners.
    c.client()
        .deregister(DeregisterRequest {
            namespace: Default::default(),
            service: "gone".into(),
            id: "gone-1".into(),
        })
        .await
        .expect("deregister");
    let lds2 = ads.recv().await;
    assert_eq!(lds2.type_url, LISTENER);
    let names: Vec<String> = decode::<Listener>(&lds2)
        .into_iter()
        .map(|l| l.name)
        .collect();
    assert_eq!(names, ["api"]);
    assert!(version(&lds2) > version(&lds));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_auth_xds_serves_the_scope_of_its_token() {
    let secret = format!("xds-test-{:032x}", fastrand::u128(..));
    let setup = Setup {
        auth: true,
        auth_secret: Some(secret.clone()),
        ..Setup::default()
    };
    let extra = format!("[auth]\nenabled = true\n[xds]\ntoken = \"{secret}\"\n");
    let c = TestCluster::start_setup(3, &extra, setup)
        .await
        .expect("cluster");
    put(&c, "api", "api-1", 9001, "z1").await;
    put(&c, "db", "db-1", 9002, "z1").await;
    let f = follower(&c).await;
    c.wait_applied(f, c.leader_applied().await).await;

    // No token: the one in [xds] token (here the admin's) answers.
    let mut ads = Ads::open(&c, f, None)
        .await
        .expect("a stream on [xds] token");
    let all = ads.subscribe(LISTENER, &["api", "db"]).await;
    assert_eq!(all.resources.len(), 2);

    // A scoped token of its own sees its services only.
    let scoped = c
        .client()
        .create_token(CreateTokenRequest {
            role: Role::Read as i32,
            services: vec!["api".into()],
            description: "xds test".into(),
        })
        .await
        .expect("create token")
        .secret;
    c.wait_for("the token on the follower", LIMIT, || async {
        let mut ads = Ads::open(&c, f, Some(&scoped)).await.ok()?;
        let r = ads.subscribe(LISTENER, &["api", "db"]).await;
        let names: Vec<String> = decode::<Listener>(&r).into_iter().map(|l| l.name).collect();
        (names == ["api"]).then_some(())
    })
    .await;

    let Err(refused) = Ads::open(&c, f, Some("not-a-token")).await else {
        panic!("an unknown token is refused");
    };
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused}");

    // A token of namespace team-a: its `api.team-a`, nothing of `default`,
    // not even through the wildcard.
    c.client()
        .create_namespace(roster::proto::v1::CreateNamespaceRequest {
            name: "team-a".into(),
            quotas: None,
        })
        .await
        .expect("namespace");
    c.client()
        .register(RegisterRequest {
            instance: Some(instance("api", "api-a", 9003)),
            namespace: "team-a".into(),
            ..Default::default()
        })
        .await
        .expect("register in team-a");
    let team = c
        .client()
        .create_token(CreateTokenRequest {
            role: Role::Read as i32,
            services: vec!["team-a/*".into()],
            description: "xds team-a".into(),
        })
        .await
        .expect("create token")
        .secret;
    c.wait_for(
        "team-a's token and instance on the follower",
        LIMIT,
        || async {
            let mut ads = Ads::open(&c, f, Some(&team)).await.ok()?;
            let r = ads.subscribe(LISTENER, &["api", "api.team-a", "db"]).await;
            let names: Vec<String> = decode::<Listener>(&r).into_iter().map(|l| l.name).collect();
            (names == ["api.team-a"]).then_some(())
        },
    )
    .await;
    let mut ads = Ads::open(&c, f, Some(&team)).await.expect("a stream");
    let every = ads.subscribe(CLUSTER, &[]).await;
    assert!(decode::<Cluster>(&every).is_empty(), "{every:?}");
}

#[tokio::test]
async fn with_auth_and_no_xds_token_a_call_without_one_is_told_what_to_set() {
    let setup = Setup {
        auth: true,
        ..Setup::default()
    };
    let c = TestCluster::start_setup(1, "[auth]\nenabled = true\n", setup)
        .await
        .expect("cluster");
    let Err(refused) = Ads::open(&c, 1, None).await else {
        panic!("a call without a token is refused");
    };
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused}");
    assert!(refused.message().contains("[xds] token"), "{refused}");
}

#[tokio::test]
async fn a_stream_naming_too_many_services_is_told_the_limit() {
    let c = TestCluster::start_with(1, "[limits]\nmax_watched_services_per_stream = 2\n").await;
    let mut ads = Ads::open(&c, 1, None).await.expect("an ADS stream");
    ads.send(ENDPOINTS, &["a", "b", "c"], None, None).await;
    let ended = tokio::time::timeout(LIMIT, ads.rx.message())
        .await
        .expect("an answer in time");
    let Err(status) = ended else {
        panic!("the stream ends with an error, not {ended:?}");
    };
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status}");
    assert!(
        status.message().contains("max_watched_services_per_stream"),
        "{status}"
    );
}

#[tokio::test]
async fn delta_xds_answers_unimplemented_saying_what_is_served() {
    let c = TestCluster::start(1).await;
    let channel = c.channel(&c.endpoint(1)).await;
    let (_tx, requests) = mpsc::channel::<DeltaDiscoveryRequest>(1);
    let Err(delta) = AggregatedDiscoveryServiceClient::new(channel)
        .delta_aggregated_resources(ReceiverStream::new(requests))
        .await
    else {
        panic!("delta xDS is not served");
    };
    assert_eq!(delta.code(), tonic::Code::Unimplemented, "{delta}");
    assert!(
        delta.message().contains("StreamAggregatedResources"),
        "{delta}"
    );
}

#[tokio::test]
async fn xds_turned_off_answers_unimplemented() {
    let c = TestCluster::start_with(1, "[xds]\nenabled = false\n").await;
    let Err(off) = Ads::open(&c, 1, None).await else {
        panic!("no xDS with [xds] enabled = false");
    };
    assert_eq!(off.code(), tonic::Code::Unimplemented, "{off}");
}

/// `xds:///<service>.<namespace>` reaches a namespace's service; the wildcard
/// lists `default`'s alone.
#[tokio::test]
async fn a_namespace_s_service_is_the_resource_service_dot_namespace() {
    let c = TestCluster::start(3).await;
    let client = c.client();
    client
        .create_namespace(roster::proto::v1::CreateNamespaceRequest {
            name: "team-a".into(),
            quotas: None,
        })
        .await
        .expect("namespace");
    put(&c, "api", "api-d", 9001, "z1").await;
    let mut a = instance("api", "api-a", 9002);
    a.address = "127.0.0.1".into();
    client
        .register(RegisterRequest {
            instance: Some(a),
            namespace: "team-a".into(),
            ..Default::default()
        })
        .await
        .expect("register in team-a");
    let mut ads = Ads::open(&c, c.leader().await, None)
        .await
        .expect("an ADS stream");
    let lds = ads.subscribe(LISTENER, &["api.team-a"]).await;
    let listeners: Vec<Listener> = decode(&lds);
    let names: Vec<&str> = listeners.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["api.team-a"]);
    let cds = ads.subscribe(CLUSTER, &[]).await;
    let clusters: Vec<Cluster> = decode(&cds);
    let names: Vec<&str> = clusters.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["api"], "the wildcard is default's");
    let eds = ads.subscribe(ENDPOINTS, &["api.team-a"]).await;
    let cla: Vec<ClusterLoadAssignment> = decode(&eds);
    assert_eq!(cla.len(), 1);
    assert_eq!(cla[0].cluster_name, "api.team-a");
    let ports: Vec<u32> = cla[0]
        .endpoints
        .iter()
        .flat_map(|l| &l.lb_endpoints)
        .filter_map(|e| match &e.host_identifier {
            Some(lb_endpoint::HostIdentifier::Endpoint(ep)) => ep.address.as_ref(),
            _ => None,
        })
        .filter_map(|a| match &a.address {
            Some(envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(s)) => {
                match s.port_specifier {
                    Some(envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(p)) => Some(p),
                    _ => None,
                }
            }
            _ => None,
        })
        .collect();
    assert_eq!(ports, [9002], "team-a's instance only");
}

/// An instance put into maintenance leaves its cluster's endpoints in the
/// next push, and comes back in the one after it is taken out.
#[tokio::test]
async fn an_instance_in_maintenance_leaves_the_endpoints() {
    let c = TestCluster::start(3).await;
    put(&c, "api", "api-1", 9001, "z1").await;
    put(&c, "api", "api-2", 9002, "z1").await;
    let mut ads = Ads::open(&c, c.leader().await, None)
        .await
        .expect("an ADS stream");
    let first = ads.subscribe(ENDPOINTS, &["api"]).await;
    assert_eq!(endpoints(&first).len(), 2);
    let set = |enable| roster::proto::v1::SetMaintenanceRequest {
        service: "api".into(),
        id: "api-1".into(),
        enable,
        reason: "drain".into(),
        namespace: String::new(),
    };
    c.client().set_maintenance(set(true)).await.expect("enable");
    let pushed = ads.recv().await;
    let left: Vec<String> = endpoints(&pushed).into_iter().map(|(_, a)| a).collect();
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].contains("9002"), "{left:?}");
    ads.send(ENDPOINTS, &["api"], Some(&pushed), None).await;
    c.client()
        .set_maintenance(set(false))
        .await
        .expect("disable");
    let back = ads.recv().await;
    assert_eq!(endpoints(&back).len(), 2);
}
