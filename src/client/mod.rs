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

mod feed;
pub mod keepalive;
pub mod picker;
pub mod resolver;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, PoisonError};
use std::time::Duration;

use std::path::Path;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::{Code, Response, Status, Streaming};

use crate::grpc::{channel, FORWARDED_HEADER, MAX_MESSAGE_BYTES};
use crate::proto::v1::acl_client::AclClient;
use crate::proto::v1::cluster_client::ClusterClient;
use crate::proto::v1::registry_client::RegistryClient;
use crate::proto::v1::*;

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

pub struct RosterClient {
    endpoints: Vec<String>,
    channels: Vec<Channel>,
    /// Index of the node tried first; moves on when that node fails.
    preferred: AtomicUsize,
    /// Index of the node writes are sent to first: the leader once found, so
    /// a write is not forwarded (one round trip between nodes less).
    writes_to: AtomicUsize,
    /// How long a call keeps trying other nodes while the cluster is unavailable.
    retry_for: Duration,
    /// `Bearer <secret>`, sent with every call when the cluster requires tokens.
    token: Option<MetadataValue<Ascii>>,
    /// The watch stream this client's resolvers share, opened by the first.
    feed: OnceLock<feed::Feed>,
}

/// Errors after which another node may succeed. Every Roster write is safe
/// to repeat, so outcome-unknown answers (`DEADLINE_EXCEEDED`, `ABORTED`, and a
/// connection lost mid-call) are retried like `UNAVAILABLE` (not applied).
fn retryable(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled
    ) || outcome_unknown(s)
}

fn outcome_unknown(s: &Status) -> bool {
    matches!(s.code(), Code::DeadlineExceeded | Code::Aborted)
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
            endpoints,
            channels,
            preferred: AtomicUsize::new(0),
            writes_to: AtomicUsize::new(0),
            retry_for: Duration::from_secs(5),
            token: None,
            feed: OnceLock::new(),
        })
    }

    /// Sends `secret` (from `roster acl bootstrap` or `roster token create`)
    /// with every call, for clusters with `[auth]` enabled.
    pub fn with_token(mut self, secret: &str) -> Result<Self, ClientError> {
        let value = MetadataValue::try_from(format!("Bearer {}", secret.trim()))
            .map_err(|_| ClientError::BadToken)?;
        self.token = Some(value);
        Ok(self)
    }

    /// `msg` as a request, with the token.
    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if let Some(t) = &self.token {
            r.metadata_mut().insert("authorization", t.clone());
        }
        r
    }

    /// The endpoint that answered last.
    pub fn current_endpoint(&self) -> &str {
        &self.endpoints[self.preferred.load(Ordering::Relaxed) % self.endpoints.len()]
    }

    /// The endpoint writes are sent to first (the leader, once found).
    pub fn write_endpoint(&self) -> &str {
        &self.endpoints[self.writes_to.load(Ordering::Relaxed) % self.endpoints.len()]
    }

    /// A read or a call any node serves itself: see [`RosterClient::send`].
    async fn call<Req, T, F, Fut>(&self, req: Req, send: F) -> Result<T, Status>
    where
        Req: Clone,
        F: FnMut(Channel, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        self.send(&self.preferred, req, send).await
    }

    /// A call only the leader serves (a follower forwards it): sent to the
    /// node that last served one itself. A follower marks the answers it
    /// forwarded (`FORWARDED_HEADER`), so the next write tries the next node:
    /// within n − 1 writes they go straight to the leader, with no extra call.
    async fn write<Req, T, F, Fut>(&self, req: Req, send: F) -> Result<T, Status>
    where
        Req: Clone,
        F: FnMut(Channel, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        self.send(&self.writes_to, req, send).await
    }

    /// Sends `req` with `send` to the node `first` names, then the others,
    /// pausing briefly between rounds while nodes are down or a leader is
    /// being elected; every method goes through here. `first` then names the
    /// node that answered, or the next one if that node forwarded the call.
    async fn send<Req, T, F, Fut>(
        &self,
        first: &AtomicUsize,
        req: Req,
        mut send: F,
    ) -> Result<T, Status>
    where
        Req: Clone,
        F: FnMut(Channel, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let n = self.channels.len();
        let deadline = tokio::time::Instant::now() + self.retry_for;
        let mut pause = Duration::from_millis(20);
        let mut last = Status::unavailable("no endpoint tried");
        // An election takes a few hundred milliseconds: short pauses find the
        // new leader quickly (a longer cap adds up to the cap to every failover).
        while tokio::time::Instant::now() < deadline {
            let start = first.load(Ordering::Relaxed);
            for step in 0..n {
                let i = (start + step) % n;
                match send(self.channels[i].clone(), self.request(req.clone())).await {
                    Ok(v) => {
                        let next = if v.metadata().contains_key(FORWARDED_HEADER) {
                            (i + 1) % n
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
                    Err(s) if retryable(&s) => last = s,
                    Err(s) => return Err(s),
                }
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

    pub async fn register(&self, req: RegisterRequest) -> Result<RegisterResponse, Status> {
        self.write(
            req,
            |ch, r| async move { Self::registry(ch).register(r).await },
        )
        .await
    }

    /// A retry after an attempt with an unknown outcome that answers
    /// `NOT_FOUND` means the first attempt removed it: that is a success
    /// (with revision 0, as the revision it was removed at is not known).
    pub async fn deregister(&self, req: DeregisterRequest) -> Result<DeregisterResponse, Status> {
        let uncertain = AtomicBool::new(false);
        let answer = self
            .write(req, |ch, r| {
                let uncertain = &uncertain;
                async move {
                    let answer = Self::registry(ch).deregister(r).await;
                    if answer
                        .as_ref()
                        .is_err_and(|s| retryable(s) && s.code() != Code::Unavailable)
                    {
                        uncertain.store(true, Ordering::Relaxed);
                    }
                    answer
                }
            })
            .await;
        match answer {
            Err(s) if s.code() == Code::NotFound && uncertain.load(Ordering::Relaxed) => {
                Ok(DeregisterResponse { revision: 0 })
            }
            other => other,
        }
    }

    pub async fn heartbeat(&self, req: HeartbeatRequest) -> Result<HeartbeatResponse, Status> {
        self.write(
            req,
            |ch, r| async move { Self::registry(ch).heartbeat(r).await },
        )
        .await
    }

    pub async fn create_session(
        &self,
        req: CreateSessionRequest,
    ) -> Result<CreateSessionResponse, Status> {
        self.write(req, |ch, r| async move {
            Self::registry(ch).create_session(r).await
        })
        .await
    }

    pub async fn renew_sessions(
        &self,
        req: RenewSessionsRequest,
    ) -> Result<RenewSessionsResponse, Status> {
        self.call(req, |ch, r| async move {
            Self::registry(ch).renew_sessions(r).await
        })
        .await
    }

    pub async fn close_session(
        &self,
        req: CloseSessionRequest,
    ) -> Result<CloseSessionResponse, Status> {
        self.write(req, |ch, r| async move {
            Self::registry(ch).close_session(r).await
        })
        .await
    }

    pub async fn list_sessions(
        &self,
        req: ListSessionsRequest,
    ) -> Result<ListSessionsResponse, Status> {
        self.call(req, |ch, r| async move {
            Self::registry(ch).list_sessions(r).await
        })
        .await
    }

    pub async fn get_service(&self, req: GetServiceRequest) -> Result<GetServiceResponse, Status> {
        self.call(req, |ch, r| async move {
            Self::registry(ch).get_service(r).await
        })
        .await
    }

    pub async fn list_services(
        &self,
        req: ListServicesRequest,
    ) -> Result<ListServicesResponse, Status> {
        self.call(req, |ch, r| async move {
            Self::registry(ch).list_services(r).await
        })
        .await
    }

    pub async fn configure_service(
        &self,
        req: ConfigureServiceRequest,
    ) -> Result<ConfigureServiceResponse, Status> {
        self.write(req, |ch, r| async move {
            Self::registry(ch).configure_service(r).await
        })
        .await
    }

    /// Opens a watch stream on the first node that accepts it.
    pub async fn watch(&self, req: WatchRequest) -> Result<Streaming<WatchResponse>, Status> {
        self.call(
            req,
            |ch, r| async move { Self::registry(ch).watch(r).await },
        )
        .await
    }

    /// The watch stream shared by this client's resolvers.
    fn feed(self: &Arc<Self>) -> &feed::Feed {
        self.feed.get_or_init(|| feed::Feed::start(self))
    }

    /// Opens a WatchServices stream on the first node that accepts it, sending
    /// `initial` first; later adds and removes go through the returned sender.
    pub async fn watch_services(
        &self,
        initial: Vec<WatchServicesRequest>,
    ) -> Result<
        (
            futures::channel::mpsc::UnboundedSender<WatchServicesRequest>,
            Streaming<WatchServicesResponse>,
        ),
        Status,
    > {
        // Each attempt gets its own request stream; the one that opened is kept.
        let opened = std::sync::Mutex::new(None);
        let responses = self
            .call(initial, |ch, r| {
                let (tx, rx) = futures::channel::mpsc::unbounded();
                *opened.lock().unwrap_or_else(PoisonError::into_inner) = Some(tx);
                let r =
                    r.map(|initial| futures::StreamExt::chain(futures::stream::iter(initial), rx));
                async move { Self::registry(ch).watch_services(r).await }
            })
            .await?;
        let tx = opened
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner)
            .ok_or_else(|| Status::internal("watch_services opened without a request stream"))?;
        Ok((tx, responses))
    }

    /// Registers `instance` with a TTL check and keeps it alive: a background
    /// task heartbeats three times per TTL (through any node, across leader
    /// changes) until the handle is shut down or dropped, which deregisters it.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::sync::Arc;
    /// use std::time::Duration;
    /// use roster::client::RosterClient;
    /// use roster::proto::v1::Instance;
    ///
    /// let client = Arc::new(RosterClient::new(&["127.0.0.1:7001", "127.0.0.1:7002"])?);
    /// let me = Instance { service: "echo".into(), id: "echo-1".into(), address: "10.0.0.5".into(), port: 9000, ..Default::default() };
    /// let registration = client.register_with_keepalive(me, Duration::from_secs(3)).await?;
    /// // ... serve ...
    /// registration.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn register_with_keepalive(
        self: &Arc<Self>,
        instance: Instance,
        ttl: Duration,
    ) -> Result<keepalive::Registration, Status> {
        keepalive::Registration::start(self.clone(), instance, ttl).await
    }

    /// Follows the healthy instances of `service`; see [`resolver::Resolver`].
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::sync::Arc;
    /// use std::time::Duration;
    /// use roster::client::{picker::RoundRobin, RosterClient};
    ///
    /// let client = Arc::new(RosterClient::new(&["127.0.0.1:7001"])?);
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
    /// Opens a session renewed in the background until it is closed or
    /// dropped: register instances through it and one renewal per interval
    /// keeps all of them.
    pub async fn open_session(
        self: &Arc<Self>,
        name: &str,
        ttl: Duration,
        on_end: SessionEnd,
    ) -> Result<keepalive::KeptSession, Status> {
        keepalive::KeptSession::open(self.clone(), name, ttl, on_end).await
    }

    /// Follows `service`'s healthy instances. All of a client's resolvers
    /// share one watch stream.
    pub fn resolve(self: &Arc<Self>, service: &str) -> resolver::Resolver {
        resolver::Resolver::new(self.clone(), service)
    }

    /// Adds a running node as a voter (the cluster grows online).
    pub async fn add_member(&self, req: AddMemberRequest) -> Result<MembershipResponse, Status> {
        self.write(req, |ch, r| async move {
            ClusterClient::new(ch).add_member(r).await
        })
        .await
    }

    /// Removes a voter (the cluster shrinks online).
    pub async fn remove_member(
        &self,
        req: RemoveMemberRequest,
    ) -> Result<MembershipResponse, Status> {
        self.write(req, |ch, r| async move {
            ClusterClient::new(ch).remove_member(r).await
        })
        .await
    }

    /// Status of the first node that answers.
    pub async fn status(&self) -> Result<StatusResponse, Status> {
        self.call(StatusRequest::default(), |ch, r| async move {
            ClusterClient::new(ch).status(r).await
        })
        .await
    }

    /// A backup (admin): the bytes of a snapshot file with the whole state
    /// as of now, streamed from the leader; retried whole on another node if
    /// the stream breaks.
    pub async fn save_snapshot(&self) -> Result<Vec<u8>, Status> {
        self.call(SaveSnapshotRequest {}, |ch, r| async move {
            let mut stream = ClusterClient::new(ch).save_snapshot(r).await?.into_inner();
            let mut bytes = Vec::new();
            while let Some(chunk) = stream.message().await? {
                bytes.extend_from_slice(&chunk.data);
            }
            Ok(Response::new(bytes))
        })
        .await
    }

    /// Creates the cluster's first admin token; works once per cluster.
    pub async fn acl_bootstrap(&self, req: BootstrapRequest) -> Result<CreatedToken, Status> {
        self.write(
            req,
            |ch, r| async move { AclClient::new(ch).bootstrap(r).await },
        )
        .await
    }

    pub async fn create_token(&self, req: CreateTokenRequest) -> Result<CreatedToken, Status> {
        self.write(req, |ch, r| async move {
            AclClient::new(ch).create_token(r).await
        })
        .await
    }

    pub async fn list_tokens(&self) -> Result<ListTokensResponse, Status> {
        self.call(ListTokensRequest {}, |ch, r| async move {
            AclClient::new(ch).list_tokens(r).await
        })
        .await
    }

    pub async fn revoke_token(
        &self,
        req: RevokeTokenRequest,
    ) -> Result<RevokeTokenResponse, Status> {
        self.write(req, |ch, r| async move {
            AclClient::new(ch).revoke_token(r).await
        })
        .await
    }

    /// Status of every endpoint, in order; a node that does not answer gives its error.
    pub async fn status_all(&self) -> Vec<(String, Result<StatusResponse, Status>)> {
        let mut out = Vec::new();
        for (e, ch) in self.endpoints.iter().zip(&self.channels) {
            let r = ClusterClient::new(ch.clone())
                .status(self.request(StatusRequest::default()))
                .await;
            out.push((e.clone(), r.map(|r| r.into_inner())));
        }
        out
    }
}
