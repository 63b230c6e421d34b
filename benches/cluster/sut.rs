//! The systems under test behind one interface, so every workload drives
//! Roster and etcd the same way. Each system holds a pool of connections
//! spread over the three nodes; client `i` uses connection `i % pool`.

use std::future::Future;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use envoy_types::pb::envoy::config::endpoint::v3::{lb_endpoint, ClusterLoadAssignment};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use etcd_client::{GetOptions, PutOptions, WatchOptions};
use prost::Message;
use roster::client::RosterClient;
use roster::proto::v1::cluster_client::ClusterClient;
use roster::proto::v1::registry_client::RegistryClient;
use roster::proto::v1::*;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

pub trait System: Send + Sync + 'static {
    type Beat: Heartbeat;
    type Watch: Watch;

    fn name(&self) -> &'static str;
    /// One durable, replicated registration.
    fn register(
        &self,
        conn: usize,
        service: &str,
        id: &str,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Registers through a client that knows every node and fails over by itself.
    fn register_any(&self, service: &str, id: &str) -> impl Future<Output = Result<()>> + Send;
    /// Sets up a TTL renewal for an instance registered by this client.
    fn heartbeat(
        &self,
        conn: usize,
        service: &str,
        id: &str,
    ) -> impl Future<Output = Result<Self::Beat>> + Send;
    /// Instances of a service; returns how many.
    fn query(
        &self,
        conn: usize,
        service: &str,
        linearizable: bool,
    ) -> impl Future<Output = Result<usize>> + Send;
    /// Opens a watch on a service; returns once the watch is established.
    fn watch(&self, conn: usize, service: &str)
        -> impl Future<Output = Result<Self::Watch>> + Send;
    /// All registered instances, read linearizably.
    fn count(&self) -> impl Future<Output = Result<u64>> + Send;
    /// The service list with counts, read linearizably (its first
    /// `page_size` services; 0: all); how many services. `None` where the
    /// system has no such call (etcd).
    fn list_services(
        &self,
        _conn: usize,
        _page_size: u32,
    ) -> impl Future<Output = Result<Option<usize>>> + Send {
        async { Ok(None) }
    }
    /// Index (into the endpoint list) of the current leader.
    fn leader(&self) -> impl Future<Output = Result<usize>> + Send;
    /// The highest Raft term any reachable node is in: it grows with every election.
    fn term(&self) -> impl Future<Output = Result<u64>> + Send;
}

pub trait Heartbeat: Send + 'static {
    fn beat(&mut self) -> impl Future<Output = Result<()>> + Send;
}

pub trait Watch: Send + 'static {
    /// Ids of the instances put in the next message.
    fn next_puts(&mut self) -> impl Future<Output = Result<Vec<String>>> + Send;
}

fn endpoint(addr: &str, access: &Option<Access>) -> Result<Endpoint> {
    Ok(match access {
        Some(a) => Endpoint::from_shared(format!("https://{addr}"))?.tls_config(a.tls.clone())?,
        None => Endpoint::from_shared(format!("http://{addr}"))?,
    }
    .tcp_nodelay(true))
}

fn with_token<T>(access: &Option<Access>, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(a) = access {
        if let Ok(v) = format!("Bearer {}", a.token).parse() {
            r.metadata_mut().insert("authorization", v);
        }
    }
    r
}

/// Metadata of the size a typical instance carries, registered with both systems.
fn payload(id: &str) -> (String, u32) {
    (format!("10.0.{}.{}", id.len() % 250, id.len()), 8080)
}

// ---------------------------------------------------------------- Roster

pub struct Roster {
    endpoints: Vec<String>,
    pool: Vec<Channel>,
    /// Roster's own client for writes, one per pool slot, each starting at
    /// another node: it finds the leader and sends its writes there.
    writers: Vec<RosterClient>,
    any: RosterClient,
    access: Option<Access>,
    /// Watch opens answered UNAVAILABLE and retried, as docs/api.md tells clients to.
    pub watch_retries: std::sync::atomic::AtomicU64,
}

/// How a client reaches a cluster with TLS and tokens (users, for etcd).
#[derive(Clone)]
pub struct Access {
    pub tls: ClientTlsConfig,
    pub token: String,
}

impl Roster {
    pub fn new(endpoints: &[String], pool: usize) -> Result<Roster> {
        Self::connect(endpoints, pool, None)
    }

    /// Like `new`, to a cluster with TLS and tokens when `access` says so.
    pub fn connect(endpoints: &[String], pool: usize, access: Option<Access>) -> Result<Roster> {
        let pool = (0..pool)
            .map(|i| Ok(endpoint(&endpoints[i % endpoints.len()], &access)?.connect_lazy()))
            .collect::<Result<Vec<_>>>()?;
        let client = |endpoints: &[String]| -> Result<RosterClient> {
            Ok(match &access {
                Some(a) => {
                    RosterClient::with_tls(endpoints, a.tls.clone())?.with_token(&a.token)?
                }
                None => RosterClient::new(endpoints)?,
            })
        };
        let writers = (0..pool.len())
            .map(|i| {
                let mut rotated = endpoints.to_vec();
                rotated.rotate_left(i % endpoints.len());
                client(&rotated)
            })
            .collect::<Result<Vec<_>>>()?;
        let any = client(endpoints)?;
        Ok(Roster {
            endpoints: endpoints.to_vec(),
            pool,
            writers,
            any,
            access,
            watch_retries: Default::default(),
        })
    }

    fn client(&self, conn: usize) -> RegistryClient<Channel> {
        RegistryClient::new(self.pool[conn % self.pool.len()].clone())
    }

    fn writer(&self, conn: usize) -> &RosterClient {
        &self.writers[conn % self.writers.len()]
    }

    /// `msg` with the token, if the cluster wants one.
    fn req<T>(&self, msg: T) -> tonic::Request<T> {
        with_token(&self.access, msg)
    }

    /// How many nodes answer a status call (with TLS and the token if any).
    pub async fn statuses_answered(&self) -> Result<usize> {
        Ok(self.statuses().await?.len())
    }

    /// The status of every node that answers within 300 ms.
    async fn statuses(&self) -> Result<Vec<StatusResponse>> {
        let mut out = Vec::new();
        for e in &self.endpoints {
            let Ok(ch) = endpoint(e, &self.access)?
                .connect_timeout(Duration::from_millis(300))
                .connect()
                .await
            else {
                continue;
            };
            if let Ok(s) = ClusterClient::new(ch)
                .status(self.req(StatusRequest::default()))
                .await
            {
                out.push(s.into_inner());
            }
        }
        Ok(out)
    }

    fn instance(service: &str, id: &str) -> RegisterRequest {
        let (address, port) = payload(id);
        RegisterRequest {
            instance: Some(Instance {
                service: service.into(),
                id: id.into(),
                address,
                port,
                tags: vec!["bench".into()],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Opens a session with `ttl_ms`; returns its id.
    pub async fn create_session(&self, conn: usize, ttl_ms: u32) -> Result<String> {
        let r = self
            .client(conn)
            .create_session(self.req(CreateSessionRequest {
                name: format!("bench-{conn}"),
                ttl_ms,
                ..Default::default()
            }))
            .await?;
        r.into_inner()
            .session
            .map(|s| s.id)
            .ok_or_else(|| anyhow!("CreateSession answered without a session"))
    }

    /// Registers an instance held by `session`.
    pub async fn register_held(
        &self,
        conn: usize,
        service: &str,
        id: &str,
        session: &str,
    ) -> Result<()> {
        let mut r = Self::instance(service, id);
        r.session = session.into();
        self.writer(conn).register(r).await?;
        Ok(())
    }

    /// Renews `ids`; returns how many the cluster did not know.
    pub async fn renew(&self, conn: usize, ids: Vec<String>) -> Result<usize> {
        let r = self
            .client(conn)
            .renew_sessions(self.req(RenewSessionsRequest { ids }))
            .await?;
        Ok(r.into_inner().unknown.len())
    }

    /// Registers an instance at 127.0.0.1:`port` that the leader probes over TCP every `interval_ms`.
    pub async fn register_tcp_checked(
        &self,
        conn: usize,
        service: &str,
        id: &str,
        port: u16,
        interval_ms: u32,
    ) -> Result<()> {
        let mut req = Self::instance(service, id);
        if let Some(i) = req.instance.as_mut() {
            i.address = "127.0.0.1".into();
            i.port = u32::from(port);
            i.check = Some(HealthCheck {
                kind: Some(health_check::Kind::Tcp(TcpCheck { port: 0 })),
                interval_ms,
                ..Default::default()
            });
        }
        self.writer(conn).register(req).await?;
        Ok(())
    }

    /// Instances that are passing, over all services (stale read).
    pub async fn passing(&self) -> Result<u64> {
        let r = self
            .any
            .list_services(ListServicesRequest {
                consistency: Consistency::Stale as i32,
                ..Default::default()
            })
            .await?;
        Ok(r.services.iter().map(|s| u64::from(s.passing)).sum())
    }

    /// Creates namespace `name`, without quotas.
    pub async fn create_namespace(&self, name: &str) -> Result<()> {
        self.any
            .create_namespace(CreateNamespaceRequest {
                name: name.into(),
                quotas: None,
            })
            .await?;
        Ok(())
    }

    /// Registers instance `id` of `service` in namespace `ns`.
    pub async fn register_in(&self, conn: usize, ns: &str, service: &str, id: &str) -> Result<()> {
        let mut r = Self::instance(service, id);
        r.namespace = ns.into();
        self.writer(conn).register(r).await?;
        Ok(())
    }

    /// A watch on `service` of namespace `ns` (empty: `default`), past its
    /// initial full state.
    pub async fn watch_in(&self, conn: usize, ns: &str, service: &str) -> Result<RosterWatch> {
        let request = || WatchRequest {
            service: service.into(),
            since_revision: 0,
            namespace: ns.into(),
        };
        let mut attempts = 0;
        let mut s = loop {
            match self.client(conn).watch(self.req(request())).await {
                Ok(s) => break s.into_inner(),
                Err(e) if e.code() == tonic::Code::Unavailable && attempts < 50 => {
                    attempts += 1;
                    self.watch_retries
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        // The initial full state.
        s.message().await?.ok_or_else(|| anyhow!("watch closed"))?;
        Ok(RosterWatch(s))
    }

    /// Adds a running node as a voter (or a read replica); returns once the
    /// cluster has it.
    pub async fn add_member(&self, id: u64, address: &str, replica: bool) -> Result<()> {
        self.any
            .add_member(AddMemberRequest {
                id,
                address: address.into(),
                replica,
            })
            .await?;
        Ok(())
    }

    /// Instances the node at `addr` holds in its own state (a stale read there).
    pub async fn count_on(&self, addr: &str) -> Result<u64> {
        let ch = endpoint(addr, &self.access)?.connect().await?;
        let r = RegistryClient::new(ch)
            .list_services(self.req(ListServicesRequest {
                consistency: Consistency::Stale as i32,
                ..Default::default()
            }))
            .await?;
        Ok(r.into_inner()
            .services
            .iter()
            .map(|s| u64::from(s.instances))
            .sum())
    }

    /// Forces a snapshot on `node`; returns its size in bytes.
    pub async fn snapshot(&self, node: usize) -> Result<u64> {
        let ch = endpoint(&self.endpoints[node], &self.access)?
            .connect()
            .await?;
        Ok(ClusterClient::new(ch)
            .snapshot(self.req(SnapshotRequest {}))
            .await?
            .into_inner()
            .size_bytes)
    }
}

pub struct RosterBeat {
    client: RegistryClient<Channel>,
    req: HeartbeatRequest,
    access: Option<Access>,
}

impl Heartbeat for RosterBeat {
    async fn beat(&mut self) -> Result<()> {
        let req = with_token(&self.access, self.req.clone());
        self.client.heartbeat(req).await?;
        Ok(())
    }
}

/// An xDS (ADS) stream subscribed to one service's endpoints, as a
/// proxyless gRPC client holds it: each response is ACKed; an instance is
/// "put" when its endpoint first appears.
pub struct RosterXds {
    acks: tokio::sync::mpsc::Sender<DiscoveryRequest>,
    responses: tonic::Streaming<DiscoveryResponse>,
    service: String,
    seen: std::collections::HashSet<String>,
}

const ENDPOINTS_TYPE: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

impl Roster {
    /// An ADS stream on pool connection `conn`, subscribed to `service`'s endpoints.
    pub async fn xds(&self, conn: usize, service: &str) -> Result<RosterXds> {
        let (acks, requests) = tokio::sync::mpsc::channel(4);
        let subscribe = DiscoveryRequest {
            type_url: ENDPOINTS_TYPE.into(),
            resource_names: vec![service.into()],
            ..Default::default()
        };
        acks.send(subscribe).await?;
        let responses =
            AggregatedDiscoveryServiceClient::new(self.pool[conn % self.pool.len()].clone())
                .stream_aggregated_resources(
                    self.req(tokio_stream::wrappers::ReceiverStream::new(requests)),
                )
                .await?
                .into_inner();
        Ok(RosterXds {
            acks,
            responses,
            service: service.into(),
            seen: Default::default(),
        })
    }
}

impl Watch for RosterXds {
    async fn next_puts(&mut self) -> Result<Vec<String>> {
        let r = self
            .responses
            .message()
            .await?
            .ok_or_else(|| anyhow!("xDS stream closed"))?;
        let ack = DiscoveryRequest {
            type_url: r.type_url.clone(),
            resource_names: vec![self.service.clone()],
            version_info: r.version_info.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        };
        self.acks.send(ack).await?;
        let mut new = Vec::new();
        for any in &r.resources {
            let cla = ClusterLoadAssignment::decode(any.value.as_slice())?;
            for e in cla.endpoints.into_iter().flat_map(|l| l.lb_endpoints) {
                if let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = e.host_identifier {
                    if self.seen.insert(ep.hostname.clone()) {
                        new.push(ep.hostname);
                    }
                }
            }
        }
        Ok(new)
    }
}

pub struct RosterWatch(tonic::Streaming<WatchResponse>);

impl Watch for RosterWatch {
    async fn next_puts(&mut self) -> Result<Vec<String>> {
        let m = self
            .0
            .message()
            .await?
            .ok_or_else(|| anyhow!("watch closed"))?;
        Ok(m.events
            .into_iter()
            .filter(|e| e.r#type == EventType::Put as i32)
            .filter_map(|e| e.instance.map(|i| i.id))
            .collect())
    }
}

impl System for Roster {
    type Beat = RosterBeat;
    type Watch = RosterWatch;

    fn name(&self) -> &'static str {
        "Roster"
    }

    async fn register(&self, conn: usize, service: &str, id: &str) -> Result<()> {
        self.writer(conn)
            .register(Self::instance(service, id))
            .await?;
        Ok(())
    }

    async fn register_any(&self, service: &str, id: &str) -> Result<()> {
        self.any.register(Self::instance(service, id)).await?;
        Ok(())
    }

    async fn heartbeat(&self, conn: usize, service: &str, id: &str) -> Result<RosterBeat> {
        Ok(RosterBeat {
            client: self.client(conn),
            req: HeartbeatRequest {
                service: service.into(),
                id: id.into(),
                ..Default::default()
            },
            access: self.access.clone(),
        })
    }

    async fn query(&self, conn: usize, service: &str, linearizable: bool) -> Result<usize> {
        let consistency = if linearizable {
            Consistency::Linearizable
        } else {
            Consistency::Stale
        };
        let r = self
            .client(conn)
            .get_service(self.req(GetServiceRequest {
                service: service.into(),
                consistency: consistency as i32,
                ..Default::default()
            }))
            .await?;
        Ok(r.into_inner().instances.len())
    }

    async fn watch(&self, conn: usize, service: &str) -> Result<RosterWatch> {
        self.watch_in(conn, "", service).await
    }

    async fn list_services(&self, conn: usize, page_size: u32) -> Result<Option<usize>> {
        let r = self
            .client(conn)
            .list_services(self.req(ListServicesRequest {
                page_size,
                ..Default::default()
            }))
            .await?;
        Ok(Some(r.into_inner().services.len()))
    }

    async fn count(&self) -> Result<u64> {
        let r = self
            .any
            .list_services(ListServicesRequest::default())
            .await?;
        Ok(r.services.iter().map(|s| u64::from(s.instances)).sum())
    }

    async fn leader(&self) -> Result<usize> {
        self.statuses()
            .await?
            .into_iter()
            .find(|s| s.leader_id != 0)
            .map(|s| s.leader_id as usize - 1)
            .ok_or_else(|| anyhow!("no Roster leader"))
    }

    async fn term(&self) -> Result<u64> {
        self.statuses()
            .await?
            .into_iter()
            .map(|s| s.term)
            .max()
            .ok_or_else(|| anyhow!("no Roster node answered"))
    }
}

// ---------------------------------------------------------------- etcd

pub struct Etcd {
    endpoints: Vec<String>,
    pool: Vec<etcd_client::Client>,
    any: etcd_client::Client,
    /// One lease per connection, as one process keeps one lease for its registrations.
    leases: Vec<i64>,
    options: Option<etcd_client::ConnectOptions>,
}

/// An etcd user and the TLS a client dials a cluster with TLS and auth with.
pub struct EtcdAccess {
    pub tls: ClientTlsConfig,
    pub user: String,
    pub password: String,
}

impl Etcd {
    pub async fn new(endpoints: &[String], pool: usize) -> Result<Etcd> {
        Self::connect(endpoints, pool, None).await
    }

    /// Like `new`, to a cluster with TLS and auth when `access` says so.
    pub async fn connect(
        endpoints: &[String],
        pool: usize,
        access: Option<&EtcdAccess>,
    ) -> Result<Etcd> {
        let options = access.map(|a| {
            etcd_client::ConnectOptions::new()
                .with_tls(a.tls.clone())
                .with_user(a.user.clone(), a.password.clone())
        });
        let mut clients = Vec::new();
        let mut leases = Vec::new();
        for i in 0..pool {
            let mut c = etcd_client::Client::connect(
                [endpoints[i % endpoints.len()].as_str()],
                options.clone(),
            )
            .await?;
            leases.push(c.lease_grant(600, None).await?.id());
            clients.push(c);
        }
        Ok(Etcd {
            endpoints: endpoints.to_vec(),
            pool: clients,
            any: etcd_client::Client::connect(endpoints, options.clone()).await?,
            leases,
            options,
        })
    }

    fn client(&self, conn: usize) -> (etcd_client::Client, i64) {
        let i = conn % self.pool.len();
        (self.pool[i].clone(), self.leases[i])
    }

    fn key(service: &str, id: &str) -> String {
        format!("/services/{service}/{id}")
    }

    /// The same information a Roster instance holds, as etcd users store it.
    fn value(service: &str, id: &str) -> String {
        let (address, port) = payload(id);
        format!(
            r#"{{"service":"{service}","id":"{id}","address":"{address}","port":{port},"tags":["bench"],"weight":1}}"#
        )
    }
}

pub struct EtcdBeat {
    keeper: etcd_client::LeaseKeeper,
    stream: etcd_client::LeaseKeepAliveStream,
}

impl Heartbeat for EtcdBeat {
    async fn beat(&mut self) -> Result<()> {
        self.keeper.keep_alive().await?;
        self.stream
            .message()
            .await?
            .ok_or_else(|| anyhow!("keep-alive stream closed"))?;
        Ok(())
    }
}

pub struct EtcdWatch(etcd_client::WatchStream);

impl Watch for EtcdWatch {
    async fn next_puts(&mut self) -> Result<Vec<String>> {
        let m = self
            .0
            .message()
            .await?
            .ok_or_else(|| anyhow!("watch closed"))?;
        Ok(m.events()
            .iter()
            .filter(|e| e.event_type() == etcd_client::EventType::Put)
            .filter_map(|e| e.kv())
            .filter_map(|kv| kv.key_str().ok())
            .filter_map(|k| k.rsplit('/').next().map(str::to_string))
            .collect())
    }
}

impl System for Etcd {
    type Beat = EtcdBeat;
    type Watch = EtcdWatch;

    fn name(&self) -> &'static str {
        "etcd"
    }

    async fn register(&self, conn: usize, service: &str, id: &str) -> Result<()> {
        let (mut c, lease) = self.client(conn);
        c.put(
            Self::key(service, id),
            Self::value(service, id),
            Some(PutOptions::new().with_lease(lease)),
        )
        .await?;
        Ok(())
    }

    async fn register_any(&self, service: &str, id: &str) -> Result<()> {
        let mut c = self.any.clone();
        c.put(Self::key(service, id), Self::value(service, id), None)
            .await?;
        Ok(())
    }

    async fn heartbeat(&self, conn: usize, _service: &str, _id: &str) -> Result<EtcdBeat> {
        let (mut c, _) = self.client(conn);
        let lease = c.lease_grant(600, None).await?.id();
        let (keeper, stream) = c.lease_keep_alive(lease).await?;
        Ok(EtcdBeat { keeper, stream })
    }

    async fn query(&self, conn: usize, service: &str, linearizable: bool) -> Result<usize> {
        let (mut c, _) = self.client(conn);
        let mut opts = GetOptions::new().with_prefix();
        if !linearizable {
            opts = opts.with_serializable();
        }
        Ok(c.get(format!("/services/{service}/"), Some(opts))
            .await?
            .kvs()
            .len())
    }

    async fn watch(&self, conn: usize, service: &str) -> Result<EtcdWatch> {
        let (mut c, _) = self.client(conn);
        let mut s = c
            .watch(
                format!("/services/{service}/"),
                Some(WatchOptions::new().with_prefix()),
            )
            .await?;
        let created = s.message().await?.ok_or_else(|| anyhow!("watch closed"))?;
        if !created.created() {
            bail!("etcd watch not created");
        }
        Ok(EtcdWatch(s))
    }

    async fn count(&self) -> Result<u64> {
        let mut c = self.any.clone();
        let r = c
            .get(
                "/services/",
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await?;
        Ok(r.count() as u64)
    }

    async fn leader(&self) -> Result<usize> {
        for e in &self.endpoints {
            let Ok(mut c) = etcd_client::Client::connect([e.as_str()], self.options.clone()).await
            else {
                continue;
            };
            let Ok(s) = c.status().await else { continue };
            let leader = s.leader();
            for (i, e2) in self.endpoints.iter().enumerate() {
                if let Ok(mut c2) =
                    etcd_client::Client::connect([e2.as_str()], self.options.clone()).await
                {
                    if let Ok(s2) = c2.status().await {
                        if s2.header().map(|h| h.member_id()) == Some(leader) {
                            return Ok(i);
                        }
                    }
                }
            }
        }
        bail!("no etcd leader")
    }

    async fn term(&self) -> Result<u64> {
        let mut term = None;
        for e in &self.endpoints {
            let Ok(mut c) = etcd_client::Client::connect([e.as_str()], self.options.clone()).await
            else {
                continue;
            };
            if let Ok(s) = c.status().await {
                term = term.max(Some(s.raft_term()));
            }
        }
        term.ok_or_else(|| anyhow!("no etcd node answered"))
    }
}
