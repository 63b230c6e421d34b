//! The xDS resources of one service, as a proxyless gRPC client (gRFC A27)
//! or Envoy needs them, built from the catalogue. Every service `S` is:
//! - a Listener `S`: an API listener whose HTTP connection manager holds its
//!   route configuration inline (one round trip less than RDS) and the
//!   router filter, which gRPC requires last;
//! - a RouteConfiguration `S` (also served by RDS): one virtual host for
//!   every authority, every path to the cluster `S`;
//! - a Cluster `S`: EDS over this same ADS stream, round robin;
//! - a ClusterLoadAssignment `S`: the instances GetService returns with
//!   `healthy_only` (the passing ones, or all of them while the protection
//!   threshold is in force), grouped into localities by the `region` and
//!   `zone` metadata keys and into priorities by `priority`.

use std::collections::BTreeMap;
use std::net::IpAddr;

use envoy_types::pb::envoy::config::cluster::v3::{cluster, Cluster};
use envoy_types::pb::envoy::config::core::v3::{
    address, config_source, socket_address, Address, AggregatedConfigSource, ApiVersion,
    ConfigSource, HealthStatus as EnvoyHealth, Locality, SocketAddress,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint, ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::config::listener::v3::{ApiListener, Listener};
use envoy_types::pb::envoy::config::route::v3::{
    route, route_action, route_match, Route, RouteAction, RouteConfiguration, RouteMatch,
    VirtualHost,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager, http_filter, HttpConnectionManager, HttpFilter,
};
use envoy_types::pb::google::protobuf::{Any, UInt32Value};
use envoy_types::util::pack_any;

use crate::registry::catalog::Catalog;
use crate::registry::namespace;
use crate::registry::Instance;

pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINTS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// Instance metadata keys that place an instance in a locality or priority.
pub const REGION_KEY: &str = "region";
pub const ZONE_KEY: &str = "zone";
pub const PRIORITY_KEY: &str = "priority";

/// The resource types served, each with what it is built from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Listener,
    Route,
    Cluster,
    Endpoints,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Listener, Kind::Route, Kind::Cluster, Kind::Endpoints];

    /// Its place in `ALL`.
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn from_type_url(url: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.type_url() == url)
    }

    pub fn type_url(self) -> &'static str {
        match self {
            Kind::Listener => LISTENER,
            Kind::Route => ROUTE,
            Kind::Cluster => CLUSTER,
            Kind::Endpoints => ENDPOINTS,
        }
    }

    /// Listener and Cluster responses hold every subscribed resource, so a
    /// resource left out no longer exists; for the others a response may
    /// hold only what changed (xDS protocol, "state of the world").
    pub fn full_state(self) -> bool {
        matches!(self, Kind::Listener | Kind::Cluster)
    }

    /// Whether a resource of this kind changes with the service's instances
    /// (only the endpoints do: the rest exist while the service does).
    pub fn follows_instances(self) -> bool {
        self == Kind::Endpoints
    }

    /// The resource of this kind named `resource` (a service, or
    /// `<service>.<namespace>`), if the service exists; endpoints always,
    /// empty for a service that does not, so that a client that still holds
    /// some drops them.
    pub fn build(self, catalog: &Catalog, resource: &str) -> Option<Any> {
        let key = key_of(resource);
        let name = match self {
            Kind::Endpoints => resource.to_string(),
            _ => resource_of(catalog.service_name(&key)?),
        };
        Some(match self {
            Kind::Listener => pack_any(listener(&name)),
            Kind::Route => pack_any(route_config(&name)),
            Kind::Cluster => pack_any(cluster(&name)),
            Kind::Endpoints => pack_any(load_assignment(catalog, &key, &name)),
        })
    }
}

/// The catalogue key of resource name `resource`: `web` is `default`'s
/// service, `web.team-a` team-a's (`xds:///web.team-a`); service names hold
/// no dot.
pub fn key_of(resource: &str) -> String {
    match resource.split_once('.') {
        Some((service, ns)) => namespace::qualify(ns, service),
        None => resource.to_string(),
    }
}

/// The resource name of the service keyed `key`.
pub fn resource_of(key: &str) -> String {
    match namespace::split(key) {
        (namespace::DEFAULT, service) => service.to_string(),
        (ns, service) => format!("{service}.{ns}"),
    }
}

fn listener(service: &str) -> Listener {
    let manager = HttpConnectionManager {
        route_specifier: Some(http_connection_manager::RouteSpecifier::RouteConfig(
            route_config(service),
        )),
        http_filters: vec![HttpFilter {
            name: "envoy.filters.http.router".into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(pack_any(
                Router::default(),
            ))),
            ..Default::default()
        }],
        ..Default::default()
    };
    Listener {
        name: service.into(),
        api_listener: Some(ApiListener {
            api_listener: Some(pack_any(manager)),
        }),
        ..Default::default()
    }
}

fn route_config(service: &str) -> RouteConfiguration {
    RouteConfiguration {
        name: service.into(),
        virtual_hosts: vec![VirtualHost {
            name: service.into(),
            domains: vec!["*".into()],
            routes: vec![Route {
                r#match: Some(RouteMatch {
                    path_specifier: Some(route_match::PathSpecifier::Prefix(String::new())),
                    ..Default::default()
                }),
                action: Some(route::Action::Route(RouteAction {
                    cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(
                        service.into(),
                    )),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn cluster(service: &str) -> Cluster {
    Cluster {
        name: service.into(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cluster::EdsClusterConfig {
            eds_config: Some(ConfigSource {
                resource_api_version: ApiVersion::V3 as i32,
                config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
                    AggregatedConfigSource::default(),
                )),
                ..Default::default()
            }),
            service_name: service.into(),
        }),
        lb_policy: cluster::LbPolicy::RoundRobin as i32,
        ..Default::default()
    }
}

/// The instances GetService returns with `healthy_only`: a passing one is
/// HEALTHY; one there only because the protection threshold is in force is
/// UNKNOWN, which clients still send to (that is the threshold's point).
/// Instances registered by host name are left out: gRPC clients take only
/// IP addresses from EDS.
/// `service` is the catalogue key, `name` the resource's.
fn load_assignment(catalog: &Catalog, service: &str, name: &str) -> ClusterLoadAssignment {
    let view = catalog.view(service, true, &[]);
    let instances: Vec<&Instance> = view
        .instances
        .into_iter()
        .filter(|i| i.address.parse::<IpAddr>().is_ok())
        .collect();
    // gRPC wants priorities numbered from 0 without gaps: rank what is set.
    let rank: BTreeMap<u32, u32> = instances
        .iter()
        .map(|i| priority(i))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .zip(0..)
        .collect();
    let mut groups: BTreeMap<(u32, &str, &str), Vec<LbEndpoint>> = BTreeMap::new();
    for i in instances {
        let meta = |k: &str| i.metadata.get(k).map(String::as_str).unwrap_or("");
        let key = (rank[&priority(i)], meta(REGION_KEY), meta(ZONE_KEY));
        groups.entry(key).or_default().push(endpoint(i));
    }
    let endpoints = groups
        .into_iter()
        .map(|((priority, region, zone), lb_endpoints)| {
            // A locality without a weight is ignored by gRPC's weighted
            // target: weigh it by its instances' weights.
            let weight: u32 = lb_endpoints
                .iter()
                .map(|e| e.load_balancing_weight.map_or(1, |w| w.value))
                .fold(0u32, u32::saturating_add);
            LocalityLbEndpoints {
                locality: Some(Locality {
                    region: region.into(),
                    zone: zone.into(),
                    ..Default::default()
                }),
                lb_endpoints,
                load_balancing_weight: Some(UInt32Value {
                    value: weight.max(1),
                }),
                priority,
                ..Default::default()
            }
        })
        .collect();
    ClusterLoadAssignment {
        cluster_name: name.into(),
        endpoints,
        ..Default::default()
    }
}

/// An instance's `priority` metadata (0, the highest, when unset or not a number).
fn priority(i: &Instance) -> u32 {
    i.metadata
        .get(PRIORITY_KEY)
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or(0)
}

fn endpoint(i: &Instance) -> LbEndpoint {
    LbEndpoint {
        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: i.address.clone(),
                    port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(
                        i.port,
                    ))),
                    ..Default::default()
                })),
            }),
            hostname: i.id.clone(),
            ..Default::default()
        })),
        health_status: if i.passing() {
            EnvoyHealth::Healthy
        } else {
            EnvoyHealth::Unknown
        } as i32,
        load_balancing_weight: Some(UInt32Value {
            value: i.weight.max(1),
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::HealthStatus;
    use prost::Message;

    fn catalog(instances: Vec<Instance>) -> Catalog {
        Catalog::from_parts(7, instances, [])
    }

    fn with(id: &str, meta: &[(&str, &str)], status: HealthStatus) -> Instance {
        let mut i = Instance::example("api", id);
        i.metadata = meta
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        i.status = status;
        i
    }

    fn assignment(c: &Catalog) -> ClusterLoadAssignment {
        let any = Kind::Endpoints.build(c, "api").expect("the service exists");
        assert_eq!(any.type_url, ENDPOINTS);
        ClusterLoadAssignment::decode(any.value.as_slice()).expect("decodes")
    }

    #[test]
    fn each_kind_indexes_its_place_and_type_url() {
        for (i, k) in Kind::ALL.into_iter().enumerate() {
            assert_eq!(k.index(), i);
            assert_eq!(Kind::from_type_url(k.type_url()), Some(k));
        }
    }

    #[test]
    fn localities_and_priorities_from_metadata() {
        let c = catalog(vec![
            with("a", &[("zone", "z1")], HealthStatus::Passing),
            with("b", &[("zone", "z2")], HealthStatus::Passing),
            with(
                "c",
                &[("zone", "z2"), ("priority", "5")],
                HealthStatus::Passing,
            ),
            with("d", &[("zone", "z1")], HealthStatus::Critical),
        ]);
        let cla = assignment(&c);
        let groups: Vec<(u32, String, usize)> = cla
            .endpoints
            .iter()
            .map(|l| {
                let zone = l
                    .locality
                    .as_ref()
                    .map(|l| l.zone.clone())
                    .unwrap_or_default();
                (l.priority, zone, l.lb_endpoints.len())
            })
            .collect();
        // Priority 5 becomes 1; the critical instance is left out.
        assert_eq!(
            groups,
            vec![
                (0, "z1".into(), 1),
                (0, "z2".into(), 1),
                (1, "z2".into(), 1)
            ]
        );
        assert!(cla
            .endpoints
            .iter()
            .all(|l| l.load_balancing_weight.is_some_and(|w| w.value >= 1)));
    }

    #[test]
    fn protection_keeps_unhealthy_instances_as_unknown_and_names_are_left_out() {
        let mut c = catalog(vec![
            with("a", &[], HealthStatus::Passing),
            with("b", &[], HealthStatus::Critical),
            with("c", &[], HealthStatus::Critical),
        ]);
        let mut named = Instance::example("api", "by-name");
        named.address = "db-1.internal.example".into();
        c.apply(8, &crate::registry::Command::Register(named));
        assert_eq!(assignment(&c).endpoints[0].lb_endpoints.len(), 1);
        c.apply(
            9,
            &crate::registry::Command::ConfigureService {
                service: "api".into(),
                protect_threshold_pct: 60,
            },
        );
        let statuses: Vec<i32> = assignment(&c).endpoints[0]
            .lb_endpoints
            .iter()
            .map(|e| e.health_status)
            .collect();
        let (h, u) = (EnvoyHealth::Healthy as i32, EnvoyHealth::Unknown as i32);
        assert_eq!(statuses, vec![h, u, u]);
    }

    #[test]
    fn listener_route_and_cluster_agree() {
        let c = catalog(vec![with("a", &[], HealthStatus::Passing)]);
        let l = Listener::decode(
            Kind::Listener
                .build(&c, "api")
                .expect("listener")
                .value
                .as_slice(),
        )
        .expect("listener decodes");
        let hcm = HttpConnectionManager::decode(
            l.api_listener
                .and_then(|a| a.api_listener)
                .expect("an API listener")
                .value
                .as_slice(),
        )
        .expect("HCM decodes");
        assert_eq!(
            hcm.http_filters.last().map(|f| f.name.as_str()),
            Some("envoy.filters.http.router")
        );
        let Some(http_connection_manager::RouteSpecifier::RouteConfig(rc)) = hcm.route_specifier
        else {
            panic!("the route configuration is inline");
        };
        let Some(route::Action::Route(action)) = &rc.virtual_hosts[0].routes[0].action else {
            panic!("a route action");
        };
        assert_eq!(
            action.cluster_specifier,
            Some(route_action::ClusterSpecifier::Cluster("api".into()))
        );
        let cl = Cluster::decode(
            Kind::Cluster
                .build(&c, "api")
                .expect("cluster")
                .value
                .as_slice(),
        )
        .expect("cluster decodes");
        assert_eq!(
            cl.eds_cluster_config.map(|e| e.service_name),
            Some("api".into())
        );
        assert!(Kind::Listener.build(&c, "nope").is_none());
    }
}
