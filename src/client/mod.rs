//! Rust client for Roster: talks to any node of a cluster and moves on to the
//! next one when a node is down or has no leader.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use roster::client::RosterClient;
//! use roster::proto::v1::{GetServiceRequest, Instance, RegisterRequest};
//!
//! let client = RosterClient::new(&["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"])?;
//! client
//!     .register(RegisterRequest {
//!         instance: Some(Instance {
//!             service: "payments".into(),
//!             id: "payments-1".into(),
//!             address: "10.0.0.7".into(),
//!             port: 8080,
//!             ..Default::default()
//!         }),
//!         ..Default::default()
//!     })
//!     .await?;
//! let found = client
//!     .get_service(GetServiceRequest { service: "payments".into(), healthy_only: true, ..Default::default() })
//!     .await?;
//! println!("{} instances at revision {}", found.instances.len(), found.revision);
//! # Ok(())
//! # }
//! ```

mod error;
mod feed;
pub mod keepalive;
pub mod picker;
pub mod resolver;

pub use error::{Code, Error};

use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, PoisonError};
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::{Response, Status, Streaming};

use crate::grpc::{channel, FORWARDED_HEADER, LEADER_ADDRESS_HEADER, MAX_MESSAGE_BYTES};
use crate::proto::v1::acl_client::AclClient;
use crate::proto::v1::cluster_client::ClusterClient;
use crate::proto::v1::registry_client::RegistryClient;
use crate::proto::v1::*;
use crate::rules::{self, Retry, Serves};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no endpoints given")]
    NoEndpoints,
    #[error("bad endpoint {0:?}: {1}")]
    BadEndpoint(String, String),
    #[error("TLS file {0}: {1}")]
    Tls(String, std::io::Error),
    #[error("a token is printable ASCII (as roster token create prints it)")]
    BadToken,
}

/// TLS for a cluster whose client ports serve it: the CA that issued the
/// nodes' certificates (`ca`, PEM) and, for nodes that ask clients for a
/// certificate, this client's certificate and key (PEM). Endpoints are then
/// dialled as `https://host:port`, and each node's certificate must name the
/// host it is dialled by.
pub fn tls_from_pem(ca: &[u8], identity: Option<(&[u8], &[u8])>) -> ClientTlsConfig {
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    match identity {
        Some((cert, key)) => tls.identity(Identity::from_pem(cert, key)),
        None => tls,
    }
}

/// [`tls_from_pem`] with the PEM read from files.
pub fn tls_from_files(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<ClientTlsConfig, ClientError> {
    let read =
        |p: &Path| std::fs::read(p).map_err(|e| ClientError::Tls(p.display().to_string(), e));
    let ca = read(ca)?;
    let identity = match identity {
        Some((cert, key)) => Some((read(cert)?, read(key)?)),
        None => None,
    };
    Ok(tls_from_pem(
        &ca,
        identity.as_ref().map(|(c, k)| (c.as_slice(), k.as_slice())),
    ))
}

/// A client of a Roster cluster: any of its nodes serves any call, and a
/// call moves on to the next node while one is down or has no leader (for
/// [`RosterClient::retry_for`], five seconds). Writes go to the leader once
/// it is found, so they are not forwarded. Cheap to clone: clones share the
/// connections, the node they prefer and the watch stream that feeds every
/// [`RosterClient::resolve`].
///
/// Every call returns [`Error`] on failure: its code, the node's message, and
/// whether sending the call again is safe.
#[derive(Clone)]
pub struct RosterClient {
    shared: Arc<Shared>,
}

struct Shared {
    endpoints: Vec<String>,
    channels: Vec<Channel>,
    /// Index of the node tried first; moves on when that node fails.
    preferred: AtomicUsize,
    /// Index of the node leader-only calls are sent to first: the leader once
    /// found, so a write is not forwarded (one round trip between nodes less).
    writes_to: AtomicUsize,
    /// How long a call keeps trying other nodes while the cluster is unavailable.
    retry_for: Duration,
    /// `Bearer <secret>`, sent with every call when the cluster requires tokens.
    token: Option<MetadataValue<Ascii>>,
    /// The watch stream this client's resolvers share, opened by the first.
    feed: OnceLock<feed::Feed>,
}

impl Shared {
    /// The endpoint that is the leader a forwarded answer names
    /// (`LEADER_ADDRESS_HEADER`), if it is one of this client's.
    fn leader_endpoint(&self, meta: &tonic::metadata::MetadataMap) -> Option<usize> {
        let addr = meta.get(LEADER_ADDRESS_HEADER)?.to_str().ok()?;
        let bare = |e: &str| {
            let e = e
                .strip_prefix("http://")
                .or_else(|| e.strip_prefix("https://"))
                .unwrap_or(e);
            e.trim_end_matches('/').to_string()
        };
        self.endpoints.iter().position(|e| bare(e) == addr)
    }
}

impl RosterClient {
    /// Endpoints are `host:port`; connections are made lazily, in plaintext.
    pub fn new<S: AsRef<str>>(endpoints: &[S]) -> Result<Self, ClientError> {
        Self::connect(endpoints, None)
    }

    /// Like [`RosterClient::new`], to nodes serving TLS ([`tls_from_files`]).
    pub fn with_tls<S: AsRef<str>>(
        endpoints: &[S],
        tls: ClientTlsConfig,
    ) -> Result<Self, ClientError> {
        Self::connect(endpoints, Some(tls))
    }

    fn connect<S: AsRef<str>>(
        endpoints: &[S],
        tls: Option<ClientTlsConfig>,
    ) -> Result<Self, ClientError> {
        let endpoints: Vec<String> = endpoints
            .iter()
            .map(|e| e.as_ref().trim().to_string())
            .filter(|e| !e.is_empty())
            .collect();
        if endpoints.is_empty() {
            return Err(ClientError::NoEndpoints);
        }
        let channels = endpoints
            .iter()
            .map(|e| {
                channel(e, Duration::from_millis(500), tls.as_ref())
                    .map_err(|err| ClientError::BadEndpoint(e.clone(), err.to_string()))
            })
            .collect::<Result<_, _>>()?;
        Ok(RosterClient {
            shared: Arc::new(Shared {
                endpoints,
                channels,
                preferred: AtomicUsize::new(0),
                writes_to: AtomicUsize::new(0),
                retry_for: Duration::from_secs(5),
                token: None,
                feed: OnceLock::new(),
            }),
        })
    }

    /// Sends `secret` (from `roster acl bootstrap` or `roster token create`)
    /// with every call, for clusters with `[auth]` enabled. The result is a
    /// client of its own, on the same connections.
    pub fn with_token(self, secret: &str) -> Result<Self, ClientError> {
        let value = MetadataValue::try_from(format!("Bearer {}", secret.trim()))
            .map_err(|_| ClientError::BadToken)?;
        let s = &self.shared;
        Ok(RosterClient {
            shared: Arc::new(Shared {
                endpoints: s.endpoints.clone(),
                channels: s.channels.clone(),
                preferred: AtomicUsize::new(s.preferred.load(Ordering::Relaxed)),
                writes_to: AtomicUsize::new(s.writes_to.load(Ordering::Relaxed)),
                retry_for: s.retry_for,
                token: Some(value),
                feed: OnceLock::new(),
            }),
        })
    }

    /// How long a call keeps trying the nodes while none can serve it.
    pub fn retry_for(&self) -> Duration {
        self.shared.retry_for
    }

    /// `msg` as a request, with the token.
    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if let Some(t) = &self.shared.token {
            r.metadata_mut().insert("authorization", t.clone());
        }
        r
    }

    /// The endpoint that answered last.
    pub fn current_endpoint(&self) -> &str {
        let s = &self.shared;
        &s.endpoints[s.preferred.load(Ordering::Relaxed) % s.endpoints.len()]
    }

    /// The endpoint writes are sent to first (the leader, once found).
    pub fn write_endpoint(&self) -> &str {
        let s = &self.shared;
        &s.endpoints[s.writes_to.load(Ordering::Relaxed) % s.endpoints.len()]
    }

    /// Sends `req` to the RPC at `path` with `send`: first to the node its
    /// rule says ([`rules`]: the leader, once found, for what only the
    /// leader serves), then the others, pausing briefly between rounds while
    /// nodes are down or a leader is being elected; every method goes through
    /// here. A follower marks the answers it forwarded (`FORWARDED_HEADER`),
    /// with the leader's address, so the next such call goes to the leader
    /// (or, if that address is not among the endpoints, the next node:
    /// within n − 1 calls they go straight to the leader). A retry of a removal that answers `NOT_FOUND`
    /// after an attempt with an unknown outcome is a success (the default
    /// answer: revision 0, as the revision it was removed at is not known).
    async fn send<Req, T, F, Fut>(&self, path: &str, req: Req, mut send: F) -> Result<T, Error>
    where
        Req: Clone,
        T: Default,
        F: FnMut(Channel, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let rule = rules::of(path);
        let s = &self.shared;
        let first = match rule.serves {
            Serves::Leader => &s.writes_to,
            Serves::Any => &s.preferred,
        };
        let n = s.channels.len();
        let deadline = tokio::time::Instant::now() + s.retry_for;
        let mut pause = Duration::from_millis(20);
        let mut last = Error::from(Status::unavailable("no endpoint tried"));
        let mut uncertain = false;
        // An election takes a few hundred milliseconds: short pauses find the
        // new leader quickly (a longer cap adds up to the cap to every failover).
        while tokio::time::Instant::now() < deadline {
            let start = first.load(Ordering::Relaxed);
            for step in 0..n {
                let i = (start + step) % n;
                let e = match send(s.channels[i].clone(), self.request(req.clone())).await {
                    Ok(v) => {
                        let next = if v.metadata().contains_key(FORWARDED_HEADER) {
                            s.leader_endpoint(v.metadata()).unwrap_or((i + 1) % n)
                        } else {
                            i
                        };
                        // Only if no concurrent call moved it meanwhile: a late
                        // answer from a node left behind must not move it back.
                        let _ = first.compare_exchange(
                            start,
                            next,
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                        );
                        return Ok(v.into_inner());
                    }
                    Err(status) => Error::from(status),
                };
                if e.code() == Code::NotFound && uncertain && rule.retry == Retry::AbsentMeansDone {
                    return Ok(T::default());
                }
                if !e.retry_is_safe() {
                    return Err(e);
                }
                uncertain |= e.code() != Code::Unavailable;
                last = e;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(80));
        }
        Err(last)
    }

    fn registry(ch: Channel) -> RegistryClient<Channel> {
        RegistryClient::new(ch)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    fn cluster(ch: Channel) -> ClusterClient<Channel> {
        ClusterClient::new(ch)
    }

    fn acl(ch: Channel) -> AclClient<Channel> {
        AclClient::new(ch)
    }
}

/// One method per unary RPC: `name(Request) -> Response = Service/Rpc by stub`.
/// Where it is sent and how it is retried come from its row in [`rules`].
macro_rules! unary {
    ($($(#[$doc:meta])* $name:ident($req:ty) -> $resp:ty = $svc:literal / $rpc:literal by $stub:ident;)*) => {
        impl RosterClient {
            $(
                $(#[$doc])*
                pub async fn $name(&self, req: $req) -> Result<$resp, Error> {
                    self.send(concat!("/roster.v1.", $svc, "/", $rpc), req, |ch, r| async move {
                        Self::$stub(ch).$name(r).await
                    })
                    .await
                }
            )*
        }
    };
}

unary! {
    /// Registers an instance, or replaces it (same service and id).
    register(RegisterRequest) -> RegisterResponse = "Registry" / "Register" by registry;
    /// Removes an instance. A retry after an attempt with an unknown outcome
    /// that answers `NOT_FOUND` means the first attempt removed it: that is
    /// a success (with revision 0, as the revision it was removed at is not known).
    deregister(DeregisterRequest) -> DeregisterResponse = "Registry" / "Deregister" by registry;
    /// Renews an instance's TTL check.
    heartbeat(HeartbeatRequest) -> HeartbeatResponse = "Registry" / "Heartbeat" by registry;
    /// Opens a session; see [`RosterClient::open_session`] for one renewed in the background.
    create_session(CreateSessionRequest) -> CreateSessionResponse = "Registry" / "CreateSession" by registry;
    /// Renews sessions, batched.
    renew_sessions(RenewSessionsRequest) -> RenewSessionsResponse = "Registry" / "RenewSessions" by registry;
    /// Ends a session now.
    close_session(CloseSessionRequest) -> CloseSessionResponse = "Registry" / "CloseSession" by registry;
    list_sessions(ListSessionsRequest) -> ListSessionsResponse = "Registry" / "ListSessions" by registry;
    /// A service's instances, at the consistency asked.
    get_service(GetServiceRequest) -> GetServiceResponse = "Registry" / "GetService" by registry;
    list_services(ListServicesRequest) -> ListServicesResponse = "Registry" / "ListServices" by registry;
    /// Creates a namespace, or sets an existing one's quotas (admin).
    create_namespace(CreateNamespaceRequest) -> CreateNamespaceResponse = "Registry" / "CreateNamespace" by registry;
    /// The namespaces the token reaches, with what each holds.
    list_namespaces(ListNamespacesRequest) -> ListNamespacesResponse = "Registry" / "ListNamespaces" by registry;
    /// Deletes a namespace; with force, its instances too (admin). A retry
    /// that answers `NOT_FOUND` after an unknown outcome means it is gone.
    delete_namespace(DeleteNamespaceRequest) -> DeleteNamespaceResponse = "Registry" / "DeleteNamespace" by registry;
    /// Per-service settings (the protection threshold).
    configure_service(ConfigureServiceRequest) -> ConfigureServiceResponse = "Registry" / "ConfigureService" by registry;
    /// Takes an instance (or a whole service) out of rotation, or puts it back.
    set_maintenance(SetMaintenanceRequest) -> SetMaintenanceResponse = "Registry" / "SetMaintenance" by registry;
    /// Adds a running node as a voter (the cluster grows online).
    add_member(AddMemberRequest) -> MembershipResponse = "Cluster" / "AddMember" by cluster;
    /// Removes a voter (the cluster shrinks online).
    remove_member(RemoveMemberRequest) -> MembershipResponse = "Cluster" / "RemoveMember" by cluster;
    /// Creates the cluster's first admin token; works once per cluster.
    bootstrap(BootstrapRequest) -> CreatedToken = "Acl" / "Bootstrap" by acl;
    create_token(CreateTokenRequest) -> CreatedToken = "Acl" / "CreateToken" by acl;
    revoke_token(RevokeTokenRequest) -> RevokeTokenResponse = "Acl" / "RevokeToken" by acl;
}

impl RosterClient {
    /// Status of the first node that answers.
    pub async fn status(&self) -> Result<StatusResponse, Error> {
        self.send(
            "/roster.v1.Cluster/Status",
            StatusRequest::default(),
            |ch, r| async move { Self::cluster(ch).status(r).await },
        )
        .await
    }

    pub async fn list_tokens(&self) -> Result<ListTokensResponse, Error> {
        self.send(
            "/roster.v1.Acl/ListTokens",
            ListTokensRequest {},
            |ch, r| async move { Self::acl(ch).list_tokens(r).await },
        )
        .await
    }

    /// A backup (admin): the bytes of a snapshot file with the whole state
    /// as of now, streamed from the leader; retried whole on another node if
    /// the stream breaks.
    pub async fn save_snapshot(&self) -> Result<Vec<u8>, Error> {
        self.send(
            "/roster.v1.Cluster/SaveSnapshot",
            SaveSnapshotRequest {},
            |ch, r| async move {
                let mut stream = Self::cluster(ch).save_snapshot(r).await?.into_inner();
                let mut bytes = Vec::new();
                while let Some(chunk) = stream.message().await? {
                    bytes.extend_from_slice(&chunk.data);
                }
                Ok(Response::new(bytes))
            },
        )
        .await
    }

    /// Opens a watch stream on the first node that accepts it.
    pub async fn watch(&self, req: WatchRequest) -> Result<WatchStream<WatchResponse>, Error> {
        const PATH: &str = "/roster.v1.Registry/Watch";
        self.send(PATH, req, |ch, r| async move {
            Ok(Self::registry(ch).watch(r).await?.map(Some))
        })
        .await
        .and_then(WatchStream::new)
    }

    /// Opens a WatchServices stream on the first node that accepts it, sending
    /// `initial` first; later adds and removes go through the returned sender.
    pub async fn watch_services(
        &self,
        initial: Vec<WatchServicesRequest>,
    ) -> Result<
        (
            futures::channel::mpsc::UnboundedSender<WatchServicesRequest>,
            WatchStream<WatchServicesResponse>,
        ),
        Error,
    > {
        const PATH: &str = "/roster.v1.Registry/WatchServices";
        // Each attempt gets its own request stream; the one that opened is kept.
        let opened = std::sync::Mutex::new(None);
        let responses = self
            .send(PATH, initial, |ch, r| {
                let (tx, rx) = futures::channel::mpsc::unbounded();
                *opened.lock().unwrap_or_else(PoisonError::into_inner) = Some(tx);
                let r =
                    r.map(|initial| futures::StreamExt::chain(futures::stream::iter(initial), rx));
                async move { Ok(Self::registry(ch).watch_services(r).await?.map(Some)) }
            })
            .await?;
        let tx = opened
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner)
            .ok_or_else(|| Status::internal("watch_services opened without a request stream"))?;
        Ok((tx, WatchStream::new(responses)?))
    }

    /// The watch stream shared by this client's resolvers.
    fn feed(&self) -> &feed::Feed {
        self.shared
            .feed
            .get_or_init(|| feed::Feed::start(Arc::downgrade(&self.shared)))
    }

    /// Registers `instance` with a TTL check and keeps it alive: a background
    /// task heartbeats three times per TTL (through any node, across leader
    /// changes) until the handle is shut down or dropped, which deregisters it.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// use roster::client::RosterClient;
    /// use roster::proto::v1::Instance;
    ///
    /// let client = RosterClient::new(&["127.0.0.1:7001", "127.0.0.1:7002"])?;
    /// let me = Instance { service: "echo".into(), id: "echo-1".into(), address: "10.0.0.5".into(), port: 9000, ..Default::default() };
    /// let registration = client.register_with_keepalive(me, Duration::from_secs(3)).await?;
    /// // ... serve ...
    /// registration.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn register_with_keepalive(
        &self,
        instance: Instance,
        ttl: Duration,
    ) -> Result<keepalive::Registration, Error> {
        keepalive::Registration::start(self.clone(), instance, ttl).await
    }

    /// Opens a session renewed in the background until it is closed or
    /// dropped: register instances through it and one renewal per interval
    /// keeps all of them.
    pub async fn open_session(
        &self,
        name: &str,
        ttl: Duration,
        on_end: SessionEnd,
    ) -> Result<keepalive::KeptSession, Error> {
        self.open_session_in("", name, ttl, on_end).await
    }

    /// [`open_session`](Self::open_session) in `namespace` (empty:
    /// `default`): the session holds instances of that namespace only.
    pub async fn open_session_in(
        &self,
        namespace: &str,
        name: &str,
        ttl: Duration,
        on_end: SessionEnd,
    ) -> Result<keepalive::KeptSession, Error> {
        keepalive::KeptSession::open(self.clone(), namespace, name, ttl, on_end).await
    }

    /// Follows `service`'s healthy instances; see [`resolver::Resolver`]. All
    /// of a client's resolvers share one watch stream.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// use roster::client::{picker::RoundRobin, RosterClient};
    ///
    /// let client = RosterClient::new(&["127.0.0.1:7001"])?;
    /// let mut payments = client.resolve("payments");
    /// payments.ready(Duration::from_secs(5)).await;
    /// let rr = RoundRobin::default();
    /// if let Some(p) = payments.pick(&rr) {
    ///     println!("call {}:{}", p.instance.address, p.instance.port);
    /// }
    /// // Or let tonic balance over them, dropping instances the registry marks critical:
    /// let channel = payments.balanced_channel();
    /// # drop(channel);
    /// # Ok(())
    /// # }
    /// ```
    pub fn resolve(&self, service: &str) -> resolver::Resolver {
        self.resolve_in("", service)
    }

    /// [`resolve`](Self::resolve) a service of `namespace` (empty:
    /// `default`); the same stream carries every namespace's services.
    pub fn resolve_in(&self, namespace: &str, service: &str) -> resolver::Resolver {
        resolver::Resolver::new(self.clone(), namespace, service)
    }

    /// Status of every endpoint, in order; a node that does not answer gives its error.
    pub async fn status_all(&self) -> Vec<(String, Result<StatusResponse, Error>)> {
        let mut out = Vec::new();
        for (e, ch) in self.shared.endpoints.iter().zip(&self.shared.channels) {
            let r = Self::cluster(ch.clone())
                .status(self.request(StatusRequest::default()))
                .await;
            out.push((e.clone(), r.map(|r| r.into_inner()).map_err(Error::from)));
        }
        out
    }
}

/// The messages of a watch stream, as tonic's `Streaming` gives them but with
/// [`Error`]s.
pub struct WatchStream<T> {
    inner: Streaming<T>,
}

impl<T> std::fmt::Debug for WatchStream<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchStream").finish_non_exhaustive()
    }
}

impl<T> WatchStream<T> {
    /// `inner` is what `send` answered: `Some` once a node opened the
    /// stream (`None` is only its default, for removals).
    fn new(inner: Option<Streaming<T>>) -> Result<Self, Error> {
        let inner = inner.ok_or_else(|| Status::internal("a watch answered without a stream"))?;
        Ok(WatchStream { inner })
    }

    /// The next message; `None` once the node ended the stream.
    pub async fn message(&mut self) -> Result<Option<T>, Error> {
        self.inner.message().await.map_err(Error::from)
    }
}

impl<T> futures::Stream for WatchStream<T> {
    type Item = Result<T, Error>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        std::pin::Pin::new(&mut self.inner)
            .poll_next(cx)
            .map(|m| m.map(|r| r.map_err(Error::from)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_forwarded_answer_sends_writes_to_the_endpoint_it_names() {
        let c = RosterClient::new(&["127.0.0.1:7001", "http://127.0.0.1:7002/"]).expect("client");
        let named = |addr: &str| {
            let mut meta = tonic::metadata::MetadataMap::new();
            meta.insert(LEADER_ADDRESS_HEADER, addr.parse().expect("header value"));
            c.shared.leader_endpoint(&meta)
        };
        assert_eq!(named("127.0.0.1:7001"), Some(0));
        assert_eq!(named("127.0.0.1:7002"), Some(1), "scheme and slash aside");
        assert_eq!(
            named("10.0.0.9:7001"),
            None,
            "not an endpoint: the next node"
        );
        assert_eq!(
            c.shared
                .leader_endpoint(&tonic::metadata::MetadataMap::new()),
            None
        );
    }
}
