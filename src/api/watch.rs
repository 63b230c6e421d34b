//! Watch streams: `Watch` follows one service (or all), `WatchServices` many
//! on one stream, added and removed while it is open. Both are served from
//! this node's state; only their start may need the leader's revision.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;

use futures::{FutureExt, Stream, StreamExt};
use http::HeaderValue;
use prost::Message;
use tonic::{Request, Status, Streaming};

use super::auth::{self, Grant};
use super::convert;
use super::forward::{self, Leader};
use super::limits::{exhausted, NamespaceSlot, WatchSlot, WatchSlots};
use crate::codec::encoded;
use crate::config::Limits;
use crate::error::Error;
use crate::peers::Peers;
use crate::proto::v1 as pb;
use crate::proto::v1::watch_services_request::Action;
use crate::proto::v1::watch_services_response::Result as Outcome;
use crate::raft::proposer::Proposer;
use crate::registry::namespace;
use crate::registry::watch::{watch_stream, SharedState, Update, WatchMessage, Watcher};
use crate::registry::Instance;

pub type WatchStream = Pin<Box<dyn Stream<Item = Result<encoded::WatchResponse, Status>> + Send>>;
pub type WatchServicesStream =
    Pin<Box<dyn Stream<Item = Result<encoded::WatchServicesResponse, Status>> + Send>>;

/// Requests a stream takes in one go: their starts share one read index and one lock.
const ADD_BATCH: usize = 1024;

#[derive(Clone)]
pub struct Watches {
    state: SharedState,
    proposer: Arc<Proposer>,
    peers: Peers,
    slots: Arc<WatchSlots>,
    max_per_stream: usize,
}

impl Watches {
    pub fn new(state: SharedState, proposer: Arc<Proposer>, peers: Peers, limits: &Limits) -> Self {
        Watches {
            state,
            proposer,
            peers,
            slots: WatchSlots::new(limits),
            max_per_stream: limits.max_watched_services_per_stream,
        }
    }

    pub async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<WatchStream, Status> {
        let grant = auth::grant(&req);
        let credentials = auth::credentials(&req);
        let slot = self.slots.acquire(req.remote_addr())?;
        let msg = req.into_inner();
        let service = if msg.service.is_empty() {
            None
        } else {
            let key = convert::service_key(&msg.namespace, &msg.service)?;
            auth::may_use(grant.as_ref(), &key)?;
            Some(key)
        };
        let ceiling = self.catch_up([msg.since_revision], credentials).await?;
        within(msg.since_revision, ceiling)?;
        let ns =
            super::namespaces::enter(&self.state, &self.proposer, grant.as_ref(), &msg.namespace)
                .await?
                .to_string();
        let in_namespace = self.slots.enter(&ns, self.watch_quota(&ns)?)?;
        // The slots are held for as long as the stream lives.
        let stream =
            watch_stream(self.state.clone(), service, msg.since_revision).filter_map(move |u| {
                let _held = (&slot, &in_namespace);
                // Watching every service is watching every service of one
                // namespace that the token reaches; a revision with nothing
                // of them in it is not sent.
                let keep = |i: &Instance| {
                    namespace::holds(&ns, &i.service)
                        && grant.as_ref().is_none_or(|g| g.covers(&i.service))
                };
                let m = &u.message;
                let whole = u.service.is_some()
                    || (m.instances.iter().all(keep) && m.events.iter().all(|e| keep(&e.instance)));
                futures::future::ready(if whole {
                    Some(Ok(encoded::WatchResponse(u)))
                } else {
                    let mut m = m.clone();
                    m.instances.retain(keep);
                    m.events.retain(|e| keep(&e.instance));
                    let empty = m.reset.is_none() && m.events.is_empty();
                    (!empty).then(|| {
                        Ok(encoded::WatchResponse::own(&convert::watch_message_to_pb(
                            &m,
                        )))
                    })
                })
            });
        Ok(Box::pin(stream))
    }

    pub async fn watch_services(
        &self,
        req: Request<Streaming<pb::WatchServicesRequest>>,
    ) -> Result<WatchServicesStream, Status> {
        let mux = Mux {
            grant: auth::grant(&req),
            credentials: auth::credentials(&req),
            _slot: self.slots.acquire(req.remote_addr())?,
            in_namespaces: HashMap::new(),
            watches: self.clone(),
            watcher: Watcher::new(self.state.clone()),
            inbound: Some(req.into_inner()),
            out: VecDeque::new(),
            failed: false,
        };
        let stream = futures::stream::unfold(mux, |mut mux| async move {
            let item = mux.next().await?;
            Some((item, mux))
        });
        // Watch streams never end by themselves; a stopping node ends them
        // through the hub (Watcher::next), so that clients resume elsewhere.
        Ok(Box::pin(stream))
    }

    /// Namespace `ns`'s quota of watch streams on each node (0: none).
    fn watch_quota(&self, ns: &str) -> Result<u64, Status> {
        Ok(super::read_state(&self.state, |st| {
            st.catalog
                .namespace(ns)
                .map_or(0, |n| n.quotas.watch_streams)
        })?)
    }

    /// Prepares this node for watches starting after these revisions, and
    /// returns the highest revision they may start from. A watch from the
    /// full state (0) must hold every write acknowledged before the call, so
    /// the node first catches up with the cluster's revision (read index). A
    /// watch may resume from a revision this node has not applied yet (the
    /// client saw it on a node further ahead), but not from one the cluster
    /// has not reached: that would silently skip the changes up to it.
    async fn catch_up(
        &self,
        sinces: impl IntoIterator<Item = u64>,
        credentials: Option<HeaderValue>,
    ) -> Result<u64, Status> {
        let local = super::read_state(&self.state, |st| st.catalog.revision())?;
        let (mut fresh, mut ahead) = (false, false);
        for since in sinces {
            fresh |= since == 0;
            ahead |= since > local;
        }
        if !fresh && !ahead {
            return Ok(local);
        }
        let cluster = match self.proposer.read_index().await {
            Ok(()) => super::read_state(&self.state, |st| st.catalog.revision())?,
            Err(refusal) => match Leader::named_by(&refusal) {
                Some(leader) => {
                    let timeout = self.proposer.timeout();
                    forward::leader_revision(&self.peers, leader, timeout, credentials).await?
                }
                None => return Err(refusal.into()),
            },
        };
        if fresh {
            self.proposer.wait_applied(cluster).await?;
        }
        Ok(cluster)
    }
}

fn within(since: u64, ceiling: u64) -> Result<(), Status> {
    if since > ceiling {
        return Err(Error::OutOfRange(format!(
            "since_revision {since} is ahead of the cluster's revision {ceiling}; \
             resume from a revision you received, or watch without since_revision"
        ))
        .into());
    }
    Ok(())
}

enum Event {
    Request(Option<Result<pb::WatchServicesRequest, Status>>),
    Update(Option<Arc<Update>>),
}

/// One WatchServices stream.
struct Mux {
    grant: Option<Grant>,
    credentials: Option<HeaderValue>,
    _slot: WatchSlot,
    /// Its place in each namespace it has followed a service of.
    in_namespaces: HashMap<String, NamespaceSlot>,
    watches: Watches,
    watcher: Watcher,
    /// `None` once the client has sent all its requests: the stream goes on.
    inbound: Option<Streaming<pb::WatchServicesRequest>>,
    /// Answers to requests, sent before further updates.
    out: VecDeque<encoded::WatchServicesResponse>,
    failed: bool,
}

impl Mux {
    async fn next(&mut self) -> Option<Result<encoded::WatchServicesResponse, Status>> {
        loop {
            if let Some(r) = self.out.pop_front() {
                return Some(Ok(r));
            }
            if self.failed {
                return None;
            }
            let inbound = &mut self.inbound;
            let next_req = async {
                match inbound.as_mut() {
                    Some(s) => s.next().await,
                    None => std::future::pending().await,
                }
            };
            let event = tokio::select! {
                biased;
                req = next_req => Event::Request(req),
                update = self.watcher.next() => Event::Update(update),
            };
            match event {
                Event::Request(Some(Ok(first))) => {
                    if let Err(status) = self.take(first).await {
                        self.failed = true;
                        return Some(Err(status));
                    }
                }
                // The client broke the stream off: nobody reads the rest.
                Event::Request(Some(Err(_))) => return None,
                Event::Request(None) => self.inbound = None,
                Event::Update(update) => {
                    return update.map(|u| {
                        let key = u.service.clone().unwrap_or_else(|| Arc::from(""));
                        Ok(encoded::WatchServicesResponse::Update {
                            namespace_end: namespace::namespace_end(&key),
                            key,
                            update: encoded::WatchResponse(u),
                        })
                    })
                }
            }
        }
    }

    /// Handles `first` and the requests that arrived with it, in order;
    /// consecutive adds start together.
    async fn take(&mut self, first: pb::WatchServicesRequest) -> Result<(), Status> {
        let mut batch = vec![first];
        while batch.len() < ADD_BATCH {
            let Some(inbound) = self.inbound.as_mut() else {
                break;
            };
            match inbound.next().now_or_never() {
                Some(Some(Ok(r))) => batch.push(r),
                Some(Some(Err(_))) | Some(None) => {
                    self.inbound = None;
                    break;
                }
                None => break,
            }
        }
        let mut adds = Vec::new();
        for req in batch {
            match req.action {
                // From here on an add names its service by its catalogue key.
                Some(Action::Add(mut w)) => {
                    let raw = namespace::qualify(&w.namespace, &w.service);
                    match self.admit(&w, &adds).and_then(|key| self.hold(key)) {
                        Ok(key) => {
                            w.service = key;
                            adds.push(w);
                        }
                        Err(status) => self.refuse(raw, &status),
                    }
                }
                Some(Action::Remove(service)) => {
                    self.start(std::mem::take(&mut adds)).await?;
                    let key = namespace::qualify(&req.namespace, &service);
                    self.watcher.remove(Some(&key));
                    self.out.push_back(ended(key, &Status::ok("removed")));
                }
                None => {
                    let status = Status::invalid_argument(
                        "a WatchServicesRequest sets add (a service and since_revision) or remove",
                    );
                    self.refuse(String::new(), &status);
                }
            }
        }
        self.start(adds).await
    }

    /// Answers a refused add. The service is no longer followed, even if it
    /// was before: the answer says nothing more comes for it.
    fn refuse(&mut self, service: String, status: &Status) {
        self.watcher.remove(Some(&service));
        self.out.push_back(ended(service, status));
    }

    /// Takes the stream's place in the namespace of `key` (once per
    /// namespace, kept until the stream ends).
    fn hold(&mut self, key: String) -> Result<String, Status> {
        let ns = namespace::split(&key).0;
        if !self.in_namespaces.contains_key(ns) {
            let quota = self.watches.watch_quota(ns)?;
            let slot = self.watches.slots.enter(ns, quota)?;
            self.in_namespaces.insert(ns.to_string(), slot);
        }
        Ok(key)
    }

    /// The add's catalogue key, if it may start.
    fn admit(&self, w: &pb::WatchRequest, queued: &[pb::WatchRequest]) -> Result<String, Status> {
        if w.service.is_empty() {
            return Err(Status::invalid_argument(
                "add needs a service; to watch every service, use Watch",
            ));
        }
        let key = convert::service_key(&w.namespace, &w.service)?;
        auth::may_use(self.grant.as_ref(), &key)?;
        let ns = namespace::split(&key).0;
        if !super::read_state(&self.watches.state, |st| st.catalog.namespace(ns).is_some())? {
            return Err(crate::registry::Outcome::NamespaceNotFound(ns.into())
                .into_error()
                .into());
        }
        let max = self.watches.max_per_stream;
        if self.watcher.followed() + queued.len() >= max
            && !self.watcher.follows(&key)
            && !queued.iter().any(|q| q.service == key)
        {
            return Err(exhausted(
                format!(
                    "this stream follows {} services",
                    self.watcher.followed() + queued.len()
                ),
                "max_watched_services_per_stream",
                max,
                "remove services you no longer need, or open another stream",
            )
            .into());
        }
        Ok(key)
    }

    /// Starts the watches of `adds` together: one catch-up, one lock.
    async fn start(&mut self, adds: Vec<pb::WatchRequest>) -> Result<(), Status> {
        if adds.is_empty() {
            return Ok(());
        }
        let sinces = adds.iter().map(|w| w.since_revision);
        let ceiling = match self
            .watches
            .catch_up(sinces, self.credentials.clone())
            .await
        {
            Ok(c) => c,
            Err(status) => {
                for w in adds {
                    self.refuse(w.service, &status);
                }
                return Ok(());
            }
        };
        let mut keys = Vec::with_capacity(adds.len());
        for w in adds {
            match within(w.since_revision, ceiling) {
                Ok(()) => keys.push((Some(w.service), w.since_revision)),
                Err(status) => self.refuse(w.service, &status),
            }
        }
        self.watcher
            .add(keys)
            .map_err(|e| Status::from(Error::Internal(e.to_string())))
    }
}

/// The answer that ends the watch of the service keyed `key`.
fn ended(key: String, status: &Status) -> encoded::WatchServicesResponse {
    let (ns, service) = namespace::split(&key);
    encoded::WatchServicesResponse::Other(pb::WatchServicesResponse {
        service: service.to_string(),
        namespace: convert::namespace_to_pb(ns),
        result: Some(Outcome::Ended(pb::WatchEnded {
            code: status.code() as i32,
            message: status.message().to_string(),
        })),
    })
}

/// An update is encoded by the first stream that sends it, for all of them.
impl encoded::Encoded for Update {
    fn encoded(&self) -> &[u8] {
        self.rendered(|m: &WatchMessage| convert::watch_message_to_pb(m).encode_to_vec().into())
    }
}
