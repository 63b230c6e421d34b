//! xDS: the catalogue served to proxyless gRPC clients (and Envoy) over the
//! Aggregated Discovery Service, state of the world, on the client port.
//!
//! A stream subscribes to resources by name; every service is a Listener,
//! RouteConfiguration, Cluster and ClusterLoadAssignment of its own name
//! (`resources`), so `xds:///echo` reaches the service `echo`. Answers come
//! from this node's catalogue, like a stale GetService: a follower answers as
//! the leader does and pushes each change as it applies it. The stream
//! follows its services through the watch hub; a change to a service's
//! instances sends its ClusterLoadAssignment, a service appearing or going
//! away sends the Listeners and Clusters again. Each response's version is
//! the catalogue's revision it was built at.
//!
//! ACK and NACK (xDS protocol): a request answering an older nonce is stale
//! and ignored; one with `error_detail` is a NACK, logged and counted, and
//! nothing is sent again for it: the client keeps what it had, and the next
//! change brings a new version.

mod resources;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use envoy_types::pb::envoy::config::core::v3::ControlPlane;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryService;
pub use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use futures::{FutureExt, Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::api::auth::{self, Grant};
use crate::api::limits::{exhausted, WatchSlot, WatchSlots};
use crate::config::Limits;
use crate::error::Error;
use crate::registry::namespace;
use crate::registry::watch::{SharedState, Update, Watcher};
pub use resources::Kind;

type Responses = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;
type DeltaResponses = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

/// What the xDS streams of a node have done, for `/metrics`.
#[derive(Default)]
pub struct XdsStats {
    /// Streams open now.
    pub streams: AtomicU64,
    /// Responses sent.
    pub responses: AtomicU64,
    /// Responses clients rejected (NACK).
    pub nacks: AtomicU64,
}

/// The ADS service of one node.
pub struct Xds {
    state: SharedState,
    slots: Arc<WatchSlots>,
    stats: Arc<XdsStats>,
    max_services: usize,
    built: Arc<Built>,
}

/// Resources as last built, shared by a node's streams: a change pushed to
/// a thousand streams is built and encoded once, not a thousand times.
#[derive(Default)]
struct Built {
    /// Per type (`Kind::index`), by service.
    latest: Mutex<[HashMap<String, AtRevision>; Kind::ALL.len()]>,
}

/// A resource (`None`: the service does not exist) and the catalogue
/// revision it was built at.
type AtRevision = (u64, Option<Any>);

/// Entries kept per type before the cache starts over: services no stream
/// follows any more are dropped then.
const BUILT_ENTRIES: usize = 65_536;

impl Built {
    /// `service`'s resource of `kind` at `revision`, built by `build` unless
    /// a stream already did at that revision.
    fn get(
        &self,
        kind: Kind,
        service: &str,
        revision: u64,
        build: impl FnOnce() -> Option<Any>,
    ) -> Option<Any> {
        let mut latest = self.latest.lock().unwrap_or_else(PoisonError::into_inner);
        let of_kind = &mut latest[kind.index()];
        if let Some((at, r)) = of_kind.get(service) {
            if *at == revision {
                return r.clone();
            }
        }
        let r = build();
        if of_kind.len() >= BUILT_ENTRIES {
            of_kind.clear();
        }
        of_kind.insert(service.to_string(), (revision, r.clone()));
        r
    }
}

impl Xds {
    /// xDS streams take their places from `[limits]`' watch stream limits,
    /// counted apart from the Registry's watches; a stream names at most
    /// `max_watched_services_per_stream` services.
    pub fn new(state: SharedState, limits: &Limits, stats: Arc<XdsStats>) -> Self {
        Xds {
            state,
            slots: WatchSlots::new(limits),
            stats,
            max_services: limits.max_watched_services_per_stream,
            built: Arc::default(),
        }
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Xds {
    type StreamAggregatedResourcesStream = Responses;
    type DeltaAggregatedResourcesStream = DeltaResponses;

    async fn stream_aggregated_resources(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Responses>, Status> {
        let slot = self.slots.acquire(req.remote_addr())?;
        let ads = Ads {
            grant: auth::grant(&req),
            open: Open::new(self.stats.clone(), slot),
            state: self.state.clone(),
            watcher: Watcher::new(self.state.clone()),
            inbound: req.into_inner(),
            subs: BTreeMap::new(),
            followed: Followed::default(),
            max_services: self.max_services,
            built: self.built.clone(),
            nonce: 0,
            out: VecDeque::new(),
            node: String::new(),
        };
        let stream = futures::stream::unfold(ads, |mut ads| async move {
            let item = ads.next().await?;
            Some((item, ads))
        });
        // A stopping node ends its streams through the watch hub: clients
        // reconnect to another.
        Ok(Response::new(Box::pin(stream)))
    }

    async fn delta_aggregated_resources(
        &self,
        _req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaResponses>, Status> {
        Err(Status::unimplemented(
            "Roster serves state-of-the-world ADS (StreamAggregatedResources), not delta xDS; \
             gRPC clients use state of the world unless told otherwise",
        ))
    }
}

/// A stream's place: counted in the stats and the watch limits while it is open.
struct Open {
    stats: Arc<XdsStats>,
    _slot: WatchSlot,
}

impl Open {
    fn new(stats: Arc<XdsStats>, slot: WatchSlot) -> Self {
        stats.streams.fetch_add(1, Ordering::Relaxed);
        Open { stats, _slot: slot }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.stats.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a stream asked for of one resource type.
#[derive(Default)]
struct Subscription {
    /// Every service (an empty first request for listeners or clusters, or `*`).
    wildcard: bool,
    names: BTreeSet<String>,
    /// Nonce of the last response of this type; empty before the first.
    nonce: String,
    /// All but endpoints: the services the last response held (those
    /// resources change only when a service comes or goes).
    sent: BTreeSet<String>,
}

/// The watch keys a stream follows: every service, or these.
#[derive(Default, PartialEq)]
struct Followed {
    all: bool,
    services: BTreeSet<String>,
}

/// One ADS stream.
struct Ads {
    grant: Option<Grant>,
    open: Open,
    state: SharedState,
    watcher: Watcher,
    inbound: Streaming<DiscoveryRequest>,
    subs: BTreeMap<Kind, Subscription>,
    followed: Followed,
    max_services: usize,
    built: Arc<Built>,
    nonce: u64,
    out: VecDeque<DiscoveryResponse>,
    /// The client's node id, for the log.
    node: String,
}

/// Which services changed: some, or all of them (the watch was reset).
enum Changed {
    All,
    Some(BTreeSet<String>),
}

impl Ads {
    async fn next(&mut self) -> Option<Result<DiscoveryResponse, Status>> {
        loop {
            if let Some(r) = self.out.pop_front() {
                return Some(Ok(r));
            }
            tokio::select! {
                biased;
                req = self.inbound.next() => match req {
                    Some(Ok(req)) => {
                        if let Err(e) = self.request(req) {
                            return Some(Err(e.into()));
                        }
                    }
                    // The client ended the stream or broke it off.
                    Some(Err(_)) | None => return None,
                },
                update = self.watcher.next() => {
                    let update = update?;
                    let mut changed = touched(&update);
                    // A burst of changes is one response: take what is queued.
                    while let Some(Some(u)) = self.watcher.next().now_or_never() {
                        changed = merge(changed, touched(&u));
                    }
                    if let Err(e) = self.push(changed) {
                        return Some(Err(e.into()));
                    }
                }
            }
        }
    }

    fn request(&mut self, req: DiscoveryRequest) -> Result<(), Error> {
        if let Some(node) = req.node.as_ref().filter(|_| self.node.is_empty()) {
            self.node = node.id.clone();
        }
        let Some(kind) = Kind::from_type_url(&req.type_url) else {
            tracing::debug!(node = %self.node, type_url = %req.type_url, "xDS request for a type Roster does not serve; ignored");
            return Ok(());
        };
        // No subscription of this type yet: this is the type's first request.
        let first = !self.subs.contains_key(&kind);
        let sub = self.subs.entry(kind).or_default();
        if !req.response_nonce.is_empty() && req.response_nonce != sub.nonce {
            // Answers a response that a newer one replaced.
            return Ok(());
        }
        if let Some(error) = &req.error_detail {
            tracing::warn!(
                node = %self.node,
                type_url = %req.type_url,
                version = %req.version_info,
                "an xDS client rejected Roster's resources (NACK): {}; it keeps its previous ones",
                error.message
            );
            self.open.stats.nacks.fetch_add(1, Ordering::Relaxed);
        }
        let mut names: BTreeSet<String> = req.resource_names.into_iter().collect();
        let wildcard =
            names.remove("*") || (kind.full_state() && names.is_empty() && (first || sub.wildcard));
        if !first && names == sub.names && wildcard == sub.wildcard {
            // An ACK, a NACK, or the same subscription again: nothing to send.
            return Ok(());
        }
        sub.names = names;
        sub.wildcard = wildcard;
        let named = self.wanted().services.len();
        if named > self.max_services {
            return Err(exhausted(
                format!("this xDS stream names {named} services"),
                "max_watched_services_per_stream",
                self.max_services,
                "subscribe to fewer, or to every listener or cluster at once (a wildcard)",
            ));
        }
        let revision = self.respond(kind, None)?;
        self.follow(revision)
    }

    /// Queues a response of `kind` with every subscribed resource; after
    /// `changed` services changed, only if they touch it: the endpoints of
    /// those services, the other types only when a service appeared or went
    /// away. Returns the revision it was built at.
    fn respond(&mut self, kind: Kind, changed: Option<&BTreeSet<String>>) -> Result<u64, Error> {
        let grant = &self.grant;
        let covers = |s: &str| grant.as_ref().is_none_or(|g| g.covers(s));
        let sub = self.subs.entry(kind).or_default();
        let partial = changed.filter(|_| kind.follows_instances());
        let built = &self.built;
        let (revision, resources) = crate::api::read_state(&self.state, |st| {
            let catalog = &st.catalog;
            let names: Vec<&str> = if sub.wildcard {
                catalog.service_names_in(namespace::DEFAULT).collect()
            } else {
                sub.names.iter().map(String::as_str).collect()
            };
            let revision = catalog.revision();
            let resources: Vec<(String, _)> = names
                .into_iter()
                .filter(|n| {
                    let key = resources::key_of(n);
                    partial.is_none_or(|c| c.contains(&key)) && covers(&key)
                })
                .filter_map(|n| {
                    let built = built.get(kind, n, revision, || kind.build(catalog, n));
                    built.map(|r| (n.to_string(), r))
                })
                .collect();
            (revision, resources)
        })?;
        if kind.follows_instances() {
            if partial.is_some() && resources.is_empty() {
                return Ok(revision);
            }
        } else {
            let present: BTreeSet<String> = resources.iter().map(|(n, _)| n.clone()).collect();
            if changed.is_some() && present == sub.sent {
                return Ok(revision);
            }
            sub.sent = present;
        }
        self.nonce += 1;
        sub.nonce = self.nonce.to_string();
        let response = DiscoveryResponse {
            version_info: revision.to_string(),
            resources: resources.into_iter().map(|(_, r)| r).collect(),
            type_url: kind.type_url().to_string(),
            nonce: sub.nonce.clone(),
            control_plane: Some(ControlPlane {
                identifier: concat!("roster/", env!("CARGO_PKG_VERSION")).into(),
            }),
            ..Default::default()
        };
        self.open.stats.responses.fetch_add(1, Ordering::Relaxed);
        self.out.push_back(response);
        Ok(revision)
    }

    /// Answers changes: each subscribed type whose resources they touch.
    fn push(&mut self, changed: Changed) -> Result<(), Error> {
        let only = match &changed {
            Changed::All => None,
            Changed::Some(services) => Some(services),
        };
        let kinds: Vec<Kind> = self.subs.keys().copied().collect();
        for kind in kinds {
            self.respond(kind, only)?;
        }
        Ok(())
    }

    /// The watch keys the subscriptions need.
    fn wanted(&self) -> Followed {
        let mut want = Followed::default();
        for sub in self.subs.values() {
            want.all |= sub.wildcard;
            want.services
                .extend(sub.names.iter().map(|n| resources::key_of(n)));
        }
        if want.all {
            want.services.clear();
        }
        want
    }

    /// Follows, through the watch hub, what the subscriptions name, from
    /// `revision` (the responses just queued hold everything up to it).
    fn follow(&mut self, revision: u64) -> Result<(), Error> {
        let want = self.wanted();
        if want == self.followed {
            return Ok(());
        }
        let now = std::mem::take(&mut self.followed);
        if now.all && !want.all {
            self.watcher.remove(None);
        }
        for gone in now.services.difference(&want.services) {
            self.watcher.remove(Some(gone));
        }
        let mut added: Vec<(Option<String>, u64)> = want
            .services
            .difference(&now.services)
            .map(|s| (Some(s.clone()), revision))
            .collect();
        if want.all && !now.all {
            added.push((None, revision));
        }
        if !added.is_empty() {
            self.watcher
                .add(added)
                .map_err(|e| Error::Internal(e.to_string()))?;
        }
        self.followed = want;
        Ok(())
    }
}

/// The services an update touches.
fn touched(u: &Update) -> Changed {
    if u.message.reset.is_some() {
        return Changed::All;
    }
    let mut services: BTreeSet<String> = u
        .message
        .events
        .iter()
        .map(|e| e.instance.service.clone())
        .collect();
    services.extend(u.service.as_deref().map(String::from));
    Changed::Some(services)
}

fn merge(a: Changed, b: Changed) -> Changed {
    match (a, b) {
        (Changed::Some(mut x), Changed::Some(y)) => {
            x.extend(y);
            Changed::Some(x)
        }
        _ => Changed::All,
    }
}
