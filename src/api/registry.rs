//! The `Registry` gRPC service.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::convert::{self, instance_to_pb, status_to_pb};
use super::leader::{forward_request, is_forwarded, LeaderRouter, Route};
use crate::error::Error;
use crate::health::Leases;
use crate::proto::v1 as pb;
use crate::proto::v1::registry_client::RegistryClient;
use crate::proto::v1::registry_server::Registry;
use crate::raft::network::MAX_MESSAGE_BYTES;
use crate::registry::model::CheckKind;
use crate::registry::validate;
use crate::registry::watch::{watch_stream, RegistryState, SharedState};
use crate::registry::{Command, Instance, Outcome};

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
            Route::Leader(ch) => {
                registry(ch)
                    .register(forward_request(msg, self.router.timeout()))
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
        let cmd = Command::Deregister {
            service: msg.service.clone(),
            id: msg.id.clone(),
        };
        match self.router.write(cmd, forwarded).await? {
            Route::Here(r) => match r.outcome {
                Outcome::Deregistered => Ok(Response::new(pb::DeregisterResponse {
                    revision: r.revision,
                })),
                _ => Err(Error::NotFound(format!(
                    "instance {:?} of service {:?}",
                    msg.id, msg.service
                ))
                .into()),
            },
            Route::Leader(ch) => {
                registry(ch)
                    .deregister(forward_request(msg, self.router.timeout()))
                    .await
            }
        }
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let forwarded = is_forwarded(req.metadata());
        let msg = req.into_inner();
        convert::instance_ref(&msg.service, &msg.id)?;
        match self.router.current(forwarded)? {
            Route::Here(()) => {
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
                if ttl {
                    self.leases.renew(&msg.service, &msg.id);
                }
                Ok(Response::new(pb::HeartbeatResponse {
                    revision,
                    status: status_to_pb(status) as i32,
                }))
            }
            Route::Leader(ch) => {
                registry(ch)
                    .heartbeat(forward_request(msg, self.router.timeout()))
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
            Route::Leader(ch) => {
                registry(ch)
                    .get_service(forward_request(msg, self.router.timeout()))
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
            Route::Leader(ch) => {
                registry(ch)
                    .list_services(forward_request(msg, self.router.timeout()))
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
            Route::Leader(ch) => {
                registry(ch)
                    .configure_service(forward_request(msg, self.router.timeout()))
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
        let stream = watch_stream(self.state.clone(), service, msg.since_revision)
            .map(|m| Ok(convert::watch_message_to_pb(&m)));
        Ok(Response::new(Box::pin(stream)))
    }
}
