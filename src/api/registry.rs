//! The `Registry` gRPC service.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::convert::{self, instance_to_pb, status_to_pb};
use super::leader::{is_forwarded, Effect, Leader, LeaderRouter, Route};
use crate::error::Error;
use crate::grpc::MAX_MESSAGE_BYTES;
use crate::proto::v1 as pb;
use crate::proto::v1::registry_client::RegistryClient;
use crate::proto::v1::registry_server::Registry;
use crate::registry::leases::{now_ms, Leases, TTL_RENEWED};
use crate::registry::model::{CheckKind, HealthUpdate};
use crate::registry::validate;
use crate::registry::watch::{watch_stream, RegistryState, SharedState};
use crate::registry::{Command, HealthStatus, Instance, Outcome};

pub struct RegistryApi {
    state: SharedState,
    router: Arc<LeaderRouter>,
    leases: Arc<Leases>,
}

fn registry(ch: Channel) -> RegistryClient<Channel> {
    RegistryClient::new(ch)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// Registering or heartbeating a TTL-checked instance on the leader renews its lease.
fn renews_lease(i: &Instance) -> bool {
    matches!(
        i.check.as_ref().map(|c| &c.kind),
        Some(CheckKind::Ttl { .. })
    )
}

impl RegistryApi {
    pub fn new(state: SharedState, router: Arc<LeaderRouter>, leases: Arc<Leases>) -> Self {
        RegistryApi {
            state,
            router,
            leases,
        }
    }

    fn read<T>(&self, f: impl FnOnce(&RegistryState) -> T) -> Result<T, Status> {
        let st = self
            .state
            .read()
            .map_err(|_| Error::Internal("state lock poisoned".into()))?;
        Ok(f(&st))
    }

    async fn relay_deregister(
        &self,
        l: Leader,
        msg: pb::DeregisterRequest,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        l.relay(
            msg,
            self.router.timeout(),
            Effect::Write,
            |ch, r| async move { registry(ch).deregister(r).await },
        )
        .await
    }

    /// Prepares this node for a watch. A fresh watch's initial state must hold
    /// every write acknowledged before the call, so the node first catches up
    /// with the cluster's revision (read index). A watch may resume from a
    /// revision this node has not applied yet (the client saw it on a node
    /// further ahead), but not from one the cluster has not reached: that would
    /// silently skip the changes up to it.
    async fn catch_up(&self, since: u64) -> Result<(), Status> {
        let local = self.read(|st| st.catalog.revision())?;
        if since != 0 && since <= local {
            return Ok(());
        }
        let cluster = match self.router.linearizable(false).await? {
            Route::Here(()) => self.read(|st| st.catalog.revision())?,
            Route::Leader(l) => {
                let req = pb::ListServicesRequest {
                    consistency: pb::Consistency::Linearizable as i32,
                };
                l.relay(
                    req,
                    self.router.timeout(),
                    Effect::Read,
                    |ch, r| async move { registry(ch).list_services(r).await },
                )
                .await?
                .into_inner()
                .revision
            }
        };
        if since > cluster {
            return Err(Error::OutOfRange(format!(
                "since_revision {since} is ahead of the cluster's revision {cluster}; \
                 resume from a revision you received, or watch without since_revision"
            ))
            .into());
        }
        if since == 0 {
            self.router.wait_applied(cluster).await?;
        }
        Ok(())
    }

    /// A heartbeat on the leader: renews a TTL instance's lease, and revives a
    /// critical one at once, through Raft like any status change, rather than
    /// at the next check tick.
    async fn heartbeat_here(
        &self,
        msg: &pb::HeartbeatRequest,
        forwarded: bool,
    ) -> Result<Route<pb::HeartbeatResponse>, Status> {
        let found = self.read(|st| {
            st.catalog
                .get(&msg.service, &msg.id)
                .map(|i| (st.catalog.revision(), i.status, renews_lease(i)))
        })?;
        let (revision, status, ttl) = found.ok_or_else(|| {
            Error::NotFound(format!(
                "instance {:?} of service {:?}",
                msg.id, msg.service
            ))
        })?;
        let answer = |revision, status| pb::HeartbeatResponse {
            revision,
            status: status_to_pb(status) as i32,
        };
        if ttl {
            self.leases.renew(&msg.service, &msg.id);
        }
        if !ttl || status == HealthStatus::Passing {
            return Ok(Route::Here(answer(revision, status)));
        }
        let revive = Command::SetHealth(vec![HealthUpdate {
            service: msg.service.clone(),
            id: msg.id.clone(),
            status: HealthStatus::Passing,
            output: TTL_RENEWED.into(),
            at_ms: now_ms(),
        }]);
        Ok(match self.router.write(revive, forwarded).await? {
            Route::Here(r) => Route::Here(answer(r.revision, HealthStatus::Passing)),
            Route::Leader(l) => Route::Leader(l),
        })
    }

    /// Routes a read by the requested consistency: `Here` means read local state now.
    async fn route_read(&self, consistency: i32, forwarded: bool) -> Result<Route<()>, Status> {
        if consistency == pb::Consistency::Stale as i32 {
            return Ok(Route::Here(()));
        }
        Ok(self.router.linearizable(forwarded).await?)
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Registry for RegistryApi {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let forwarded = is_forwarded(req.metadata());
        let msg = req.into_inner();
        let cmd = convert::register_command(msg.clone())?;
        match self.router.write(cmd, forwarded).await? {
            Route::Here(r) => match r.outcome {
                Outcome::Registered(i) => {
                    if renews_lease(&i) {
                        self.leases.renew(&i.service, &i.id);
                    }
                    Ok(Response::new(pb::RegisterResponse {
                        revision: r.revision,
                        instance: Some(instance_to_pb(&i)),
                    }))
                }
                other => Err(Error::Internal(format!("register applied as {other:?}")).into()),
            },
            Route::Leader(l) => {
                l.relay(
                    msg,
                    self.router.timeout(),
                    Effect::Write,
                    |ch, r| async move { registry(ch).register(r).await },
                )
                .await
            }
        }
    }

    async fn deregister(
        &self,
        req: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        let forwarded = is_forwarded(req.metadata());
        let msg = req.into_inner();
        convert::instance_ref(&msg.service, &msg.id)?;
        let not_found = || {
            Status::from(Error::NotFound(format!(
                "instance {:?} of service {:?}",
                msg.id, msg.service
            )))
        };
        // An unknown instance is answered NOT_FOUND without a Raft entry: once
        // the read index confirms this node is current, absence is the truth.
        let held = |st: &RegistryState| st.catalog.get(&msg.service, &msg.id).is_some();
        if !self.read(held)? {
            match self.router.linearizable(forwarded).await? {
                Route::Here(()) if !self.read(held)? => return Err(not_found()),
                Route::Here(()) => {}
                Route::Leader(l) => return self.relay_deregister(l, msg).await,
            }
        }
        let cmd = Command::Deregister {
            service: msg.service.clone(),
            id: msg.id.clone(),
        };
        match self.router.write(cmd, forwarded).await? {
            Route::Here(r) => match r.outcome {
                Outcome::Deregistered => Ok(Response::new(pb::DeregisterResponse {
                    revision: r.revision,
                })),
                _ => Err(not_found()),
            },
            Route::Leader(l) => self.relay_deregister(l, msg).await,
        }
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let forwarded = is_forwarded(req.metadata());
        let msg = req.into_inner();
        convert::instance_ref(&msg.service, &msg.id)?;
        let route = match self.router.current(forwarded)? {
            Route::Here(()) => self.heartbeat_here(&msg, forwarded).await?,
            Route::Leader(l) => Route::Leader(l),
        };
        match route {
            Route::Here(answer) => Ok(Response::new(answer)),
            Route::Leader(l) => {
                l.relay(
                    msg,
                    self.router.timeout(),
                    Effect::Read,
                    |ch, r| async move { registry(ch).heartbeat(r).await },
                )
                .await
            }
        }
    }

    async fn get_service(
        &self,
        req: Request<pb::GetServiceRequest>,
    ) -> Result<Response<pb::GetServiceResponse>, Status> {
        let forwarded = is_forwarded(req.metadata());
        let msg = req.into_inner();
        validate::service_name(&msg.service)?;
        match self.route_read(msg.consistency, forwarded).await? {
            Route::Here(()) => self.read(|st| {
                let view = st.catalog.view(&msg.service, msg.healthy_only, &msg.tags);
                Response::new(pb::GetServiceResponse {
                    revision: st.catalog.revision(),
                    instances: view.instances.into_iter().map(instance_to_pb).collect(),
                    protection_active: view.protection_active,
                })
            }),
            Route::Leader(l) => {
                l.relay(
                    msg,
                    self.router.timeout(),
                    Effect::Read,
                    |ch, r| async move { registry(ch).get_service(r).await },
                )
                .await
            }
        }
    }

    async fn list_services(
        &self,
        req: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        let forwarded = is_forwarded(req.metadata());
        let msg = req.into_inner();
        match self.route_read(msg.consistency, forwarded).await? {
            Route::Here(()) => self.read(|st| {
                let services = st
                    .catalog
                    .summaries()
                    .into_iter()
                    .map(|s| pb::ServiceSummary {
                        name: s.name,
                        instances: s.instances,
                        passing: s.passing,
                    })
                    .collect();
                Response::new(pb::ListServicesResponse {
                    revision: st.catalog.revision(),
                    services,
                })
            }),
            Route::Leader(l) => {
                l.relay(
                    msg,
                    self.router.timeout(),
                    Effect::Read,
                    |ch, r| async move { registry(ch).list_services(r).await },
                )
                .await
            }
        }
    }

    async fn configure_service(
        &self,
        req: Request<pb::ConfigureServiceRequest>,
    ) -> Result<Response<pb::ConfigureServiceResponse>, Status> {
        let forwarded = is_forwarded(req.metadata());
        let msg = req.into_inner();
        validate::service_name(&msg.service)?;
        let cmd = Command::ConfigureService {
            service: msg.service.clone(),
            protect_threshold_pct: validate::percent(
                "protect threshold",
                msg.protect_threshold_percent,
            )?,
        };
        match self.router.write(cmd, forwarded).await? {
            Route::Here(r) => Ok(Response::new(pb::ConfigureServiceResponse {
                revision: r.revision,
            })),
            Route::Leader(l) => {
                l.relay(
                    msg,
                    self.router.timeout(),
                    Effect::Write,
                    |ch, r| async move { registry(ch).configure_service(r).await },
                )
                .await
            }
        }
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let msg = req.into_inner();
        let service = if msg.service.is_empty() {
            None
        } else {
            validate::service_name(&msg.service)?;
            Some(msg.service)
        };
        self.catch_up(msg.since_revision).await?;
        // Watch streams never end by themselves; a stopping node ends them so
        // that clients resume elsewhere and the server can finish.
        let stream = watch_stream(self.state.clone(), service, msg.since_revision)
            .map(|m| Ok(convert::watch_message_to_pb(&m)));
        let stream = futures::StreamExt::take_until(stream, self.router.closing());
        Ok(Response::new(Box::pin(stream)))
    }
}
