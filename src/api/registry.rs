//! The `Registry` gRPC service.

use std::sync::Arc;

use tonic::{Request, Response, Status, Streaming};

use super::auth;
use super::convert::{self, instance_to_pb, status_to_pb};
use super::limits::Admission;
use super::sessions::Sessions;
use super::watch::{WatchServicesStream, WatchStream, Watches};
use crate::config::Limits;
use crate::error::Error;
use crate::peers::Peers;
use crate::proto::v1 as pb;
use crate::proto::v1::registry_server::Registry;
use crate::raft::proposer::Proposer;
use crate::registry::leases::{now_ms, Leases, TTL_RENEWED};
use crate::registry::model::{CheckKind, HealthUpdate};
use crate::registry::namespace::{self, Namespace};
use crate::registry::validate;
use crate::registry::watch::{RegistryState, SharedState};
use crate::registry::{Command, HealthStatus, Instance, Outcome};

/// Handlers validate, then do the work here; on a follower, the proposer's
/// refusal names the leader and `api::forward` sends the request there.
pub struct RegistryApi {
    state: SharedState,
    proposer: Arc<Proposer>,
    leases: Arc<Leases>,
    admission: Admission,
    watches: Watches,
    sessions: Sessions,
    max_namespaces: u32,
}

/// The status a heartbeat reports, if any (unset and PASSING are one), and
/// its output, checked.
fn reported_status(msg: &pb::HeartbeatRequest) -> Result<Option<HealthStatus>, Status> {
    const MAX_OUTPUT: usize = 4096;
    if msg.output.len() > MAX_OUTPUT {
        return Err(Error::InvalidArgument(format!(
            "output is {} bytes; at most {MAX_OUTPUT} are kept: send a shorter one",
            msg.output.len()
        ))
        .into());
    }
    match pb::HealthStatus::try_from(msg.status) {
        Ok(pb::HealthStatus::Unspecified) if msg.output.is_empty() => Ok(None),
        Ok(pb::HealthStatus::Unspecified | pb::HealthStatus::Passing) => {
            Ok(Some(HealthStatus::Passing))
        }
        Ok(pb::HealthStatus::Warning) => Ok(Some(HealthStatus::Warning)),
        Ok(pb::HealthStatus::Critical) => Ok(Some(HealthStatus::Critical)),
        _ => Err(Error::InvalidArgument(format!(
            "status {} cannot be reported by a heartbeat: send PASSING, WARNING or CRITICAL \
             (maintenance is SetMaintenance's)",
            msg.status
        ))
        .into()),
    }
}

/// Registering or heartbeating a TTL-checked instance on the leader renews its lease.
fn renews_lease(i: &Instance) -> bool {
    matches!(
        i.check.as_ref().map(|c| &c.kind),
        Some(CheckKind::Ttl { .. })
    )
}

/// The reason an instance put into maintenance without one shows.
const DEFAULT_MAINTENANCE_REASON: &str = "in maintenance; no reason was given";

fn not_found(service: &str, id: &str) -> Status {
    Error::NotFound(format!(
        "instance {id:?} of service {}",
        namespace::describe(service)
    ))
    .into()
}

impl RegistryApi {
    pub fn new(
        state: SharedState,
        proposer: Arc<Proposer>,
        peers: Peers,
        leases: Arc<Leases>,
        limits: Limits,
    ) -> Self {
        RegistryApi {
            watches: Watches::new(state.clone(), proposer.clone(), peers.clone(), &limits),
            sessions: Sessions::new(
                state.clone(),
                proposer.clone(),
                peers.clone(),
                leases.clone(),
            ),
            state,
            proposer,
            leases,
            max_namespaces: u32::try_from(limits.max_namespaces).unwrap_or(u32::MAX),
            admission: Admission::new(limits),
        }
    }

    fn read<T>(&self, f: impl FnOnce(&RegistryState) -> T) -> Result<T, Status> {
        Ok(super::read_state(&self.state, f)?)
    }

    async fn enter<'n>(&self, grant: Option<&auth::Grant>, ns: &'n str) -> Result<&'n str, Status> {
        super::namespaces::enter(&self.state, &self.proposer, grant, ns).await
    }

    /// Waits, for a read of the given consistency, until local state may be read.
    async fn consistent(&self, consistency: i32) -> Result<(), Status> {
        if consistency != pb::Consistency::Stale as i32 {
            self.proposer.read_index().await?;
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl Registry for RegistryApi {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let grant = auth::grant(&req);
        let cmd = convert::register_command(req.into_inner(), grant.as_ref())?;
        // Limits are the leader's to judge: a follower forwards the request.
        self.proposer.here()?;
        let (_admitted, session) = match &cmd {
            Command::Register(i) => {
                auth::may_use(grant.as_ref(), &i.service)?;
                self.enter(grant.as_ref(), namespace::split(&i.service).0)
                    .await?;
                if let Some(session) = i.session() {
                    let ns = namespace::split(&i.service).0;
                    self.sessions.check_open(session, ns).await?;
                }
                // The namespace's quotas, as the entry will judge them: a
                // write refused here never reaches the log.
                self.read(|st| st.catalog.admit_register(i))?
                    .map_err(Outcome::into_error)?;
                let admitted = self.read(|st| self.admission.admit(&st.catalog, i))??;
                (Some(admitted), i.session().map(str::to_string))
            }
            _ => (None, None),
        };
        let r = self.proposer.propose(cmd).await?;
        if let Some(refused) = r.outcome.refusal() {
            return Err(refused.into());
        }
        let i = match r.outcome {
            Outcome::Registered(i) => i,
            // The session ended between the check and the entry.
            Outcome::SessionNotFound => {
                return Err(super::sessions::unknown_session(
                    session.as_deref().unwrap_or_default(),
                ))
            }
            o => return Err(Error::Internal(format!("register applied as {o:?}")).into()),
        };
        if renews_lease(&i) {
            self.leases.renew(&i.service, &i.id);
        }
        Ok(Response::new(pb::RegisterResponse {
            revision: r.revision,
            instance: Some(instance_to_pb(&i)),
        }))
    }

    async fn deregister(
        &self,
        req: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        let grant = auth::grant(&req);
        let pb::DeregisterRequest {
            service,
            id,
            namespace,
        } = req.into_inner();
        let service = convert::instance_ref(&namespace, &service, &id)?;
        auth::may_use(grant.as_ref(), &service)?;
        // An unknown instance is answered NOT_FOUND without a Raft entry: once
        // the read index confirms this node is current, absence is the truth.
        let held = |st: &RegistryState| st.catalog.get(&service, &id).is_some();
        if !self.read(held)? {
            self.proposer.read_index().await?;
            if !self.read(held)? {
                return Err(not_found(&service, &id));
            }
        }
        let cmd = Command::Deregister {
            service: service.clone(),
            id: id.clone(),
        };
        let r = self.proposer.propose(cmd).await?;
        match r.outcome {
            Outcome::Deregistered => Ok(Response::new(pb::DeregisterResponse {
                revision: r.revision,
            })),
            _ => Err(not_found(&service, &id)),
        }
    }

    /// Renews a TTL instance's lease on the leader, and sets the status it
    /// reports (passing unless told) at once, through Raft like any status
    /// change, rather than at the next check tick.
    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let grant = auth::grant(&req);
        let msg = req.into_inner();
        let service = convert::instance_ref(&msg.namespace, &msg.service, &msg.id)?;
        auth::may_use(grant.as_ref(), &service)?;
        let reported = reported_status(&msg)?;
        // Answered from this leader's state: it must hold every committed write.
        self.proposer.current().await?;
        let found = self.read(|st| {
            st.catalog
                .get(&service, &msg.id)
                .map(|i| (st.catalog.revision(), i.status, renews_lease(i)))
        })?;
        let (mut revision, status, ttl) = found.ok_or_else(|| not_found(&service, &msg.id))?;
        if !ttl {
            if reported.is_some() {
                return Err(Error::FailedPrecondition(format!(
                    "instance {:?} of {:?} has no TTL check, so it cannot report a status: \
                     its check sets it; send the heartbeat without one",
                    msg.id, msg.service
                ))
                .into());
            }
            return Ok(Response::new(pb::HeartbeatResponse {
                revision,
                status: status_to_pb(status) as i32,
            }));
        }
        self.leases.renew(&service, &msg.id);
        let reported = reported.unwrap_or(HealthStatus::Passing);
        // The output travels with a change of status: the state machine
        // records no change without one.
        if reported != status {
            let output = match msg.output.is_empty() {
                true => TTL_RENEWED.into(),
                false => msg.output,
            };
            let set = Command::SetHealth(vec![HealthUpdate {
                service,
                id: msg.id,
                status: reported,
                output,
                at_ms: now_ms(),
            }]);
            revision = self.proposer.propose(set).await?.revision;
        }
        Ok(Response::new(pb::HeartbeatResponse {
            revision,
            status: status_to_pb(reported) as i32,
        }))
    }

    async fn get_service(
        &self,
        req: Request<pb::GetServiceRequest>,
    ) -> Result<Response<pb::GetServiceResponse>, Status> {
        let grant = auth::grant(&req);
        let msg = req.into_inner();
        let service = convert::service_key(&msg.namespace, &msg.service)?;
        auth::may_use(grant.as_ref(), &service)?;
        self.consistent(msg.consistency).await?;
        self.enter(grant.as_ref(), &msg.namespace).await?;
        self.read(|st| {
            let view = st.catalog.view(&service, msg.healthy_only, &msg.tags);
            let (revision, changed) = (st.catalog.revision(), st.catalog.changed_at(&service));
            // Only a revision this node has reached vouches for the caller's copy.
            let since = msg.unchanged_since;
            let unchanged = since > 0 && changed <= since && since <= revision;
            Response::new(pb::GetServiceResponse {
                revision,
                instances: match unchanged {
                    true => Vec::new(),
                    false => view.instances.into_iter().map(instance_to_pb).collect(),
                },
                protection_active: view.protection_active,
                service_revision: changed,
                unchanged,
            })
        })
    }

    async fn list_services(
        &self,
        req: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        let grant = auth::grant(&req);
        let msg = req.into_inner();
        // A token is the last name of the page before.
        let after = match msg.page_token.as_str() {
            "" => None,
            t => {
                validate::service_name(t).map_err(|_| {
                    Error::InvalidArgument(format!(
                        "page_token {t:?} is not one a ListServices answer gave; send the \
                         last answer's next_page_token, or none for the first page"
                    ))
                })?;
                Some(t)
            }
        };
        let page = match msg.page_size {
            0 => usize::MAX,
            n => n as usize,
        };
        self.consistent(msg.consistency).await?;
        let ns = self.enter(grant.as_ref(), &msg.namespace).await?;
        self.read(|st| {
            // A scoped token sees only its services.
            let mut services: Vec<pb::ServiceSummary> = st
                .catalog
                .summaries_after(ns, after)
                .filter(|s| {
                    grant
                        .as_ref()
                        .is_none_or(|g| g.covers(&namespace::qualify(ns, &s.name)))
                })
                .take(page.saturating_add(1))
                .map(|s| pb::ServiceSummary {
                    name: s.name,
                    instances: s.instances,
                    passing: s.passing,
                })
                .collect();
            let next_page_token = if services.len() > page {
                services.truncate(page);
                services.last().map(|s| s.name.clone()).unwrap_or_default()
            } else {
                String::new()
            };
            Response::new(pb::ListServicesResponse {
                revision: st.catalog.revision(),
                services,
                next_page_token,
            })
        })
    }

    async fn configure_service(
        &self,
        req: Request<pb::ConfigureServiceRequest>,
    ) -> Result<Response<pb::ConfigureServiceResponse>, Status> {
        let grant = auth::grant(&req);
        let msg = req.into_inner();
        let service = convert::service_key(&msg.namespace, &msg.service)?;
        auth::may_use(grant.as_ref(), &service)?;
        let cmd = Command::ConfigureService {
            service,
            protect_threshold_pct: validate::percent(
                "protect threshold",
                msg.protect_threshold_percent,
            )?,
        };
        self.proposer.here()?;
        self.enter(grant.as_ref(), &msg.namespace).await?;
        if let Command::ConfigureService { service, .. } = &cmd {
            let fits = self.read(|st| {
                let new_service = st.catalog.service_name(service).is_none();
                st.catalog.admit(service, false, new_service)
            })?;
            fits.map_err(Outcome::into_error)?;
        }
        let r = self.proposer.propose(cmd).await?;
        if let Some(refused) = r.outcome.refusal() {
            return Err(refused.into());
        }
        Ok(Response::new(pb::ConfigureServiceResponse {
            revision: r.revision,
        }))
    }

    async fn set_maintenance(
        &self,
        req: Request<pb::SetMaintenanceRequest>,
    ) -> Result<Response<pb::SetMaintenanceResponse>, Status> {
        let grant = auth::grant(&req);
        let msg = req.into_inner();
        let service = if msg.id.is_empty() {
            convert::service_key(&msg.namespace, &msg.service)?
        } else {
            convert::instance_ref(&msg.namespace, &msg.service, &msg.id)?
        };
        validate::maintenance_reason(&msg.reason)?;
        auth::may_use(grant.as_ref(), &service)?;
        self.proposer.here()?;
        self.enter(grant.as_ref(), &msg.namespace).await?;
        let reason = match (msg.enable, msg.reason.is_empty()) {
            (false, _) => None,
            (true, true) => Some(DEFAULT_MAINTENANCE_REASON.to_string()),
            (true, false) => Some(msg.reason),
        };
        let id = (!msg.id.is_empty()).then_some(msg.id);
        let cmd = Command::SetMaintenance {
            service: service.clone(),
            id: id.clone(),
            reason,
        };
        let r = self.proposer.propose(cmd).await?;
        match r.outcome {
            Outcome::MaintenanceSet(n) => Ok(Response::new(pb::SetMaintenanceResponse {
                revision: r.revision,
                instances: u32::try_from(n).unwrap_or(u32::MAX),
            })),
            _ => Err(match id {
                Some(id) => not_found(&service, &id),
                None => Error::NotFound(format!(
                    "service {} holds no instance",
                    namespace::describe(&service)
                ))
                .into(),
            }),
        }
    }

    async fn create_session(
        &self,
        req: Request<pb::CreateSessionRequest>,
    ) -> Result<Response<pb::CreateSessionResponse>, Status> {
        self.sessions.create(req).await.map(Response::new)
    }

    async fn renew_sessions(
        &self,
        req: Request<pb::RenewSessionsRequest>,
    ) -> Result<Response<pb::RenewSessionsResponse>, Status> {
        self.sessions.renew(req).await.map(Response::new)
    }

    async fn close_session(
        &self,
        req: Request<pb::CloseSessionRequest>,
    ) -> Result<Response<pb::CloseSessionResponse>, Status> {
        self.sessions.close(req).await.map(Response::new)
    }

    async fn list_sessions(
        &self,
        req: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        let grant = auth::grant(&req);
        let msg = req.into_inner();
        self.consistent(msg.consistency).await?;
        self.sessions
            .list(grant.as_ref(), &msg.namespace)
            .await
            .map(Response::new)
    }

    async fn create_namespace(
        &self,
        req: Request<pb::CreateNamespaceRequest>,
    ) -> Result<Response<pb::CreateNamespaceResponse>, Status> {
        let msg = req.into_inner();
        validate::namespace_name(&msg.name)?;
        let cmd = Command::PutNamespace {
            namespace: Namespace {
                name: msg.name,
                quotas: convert::quotas_from_pb(msg.quotas),
                create_revision: 0,
            },
            max_namespaces: self.max_namespaces,
        };
        let r = self.proposer.propose(cmd).await?;
        if let Some(refused) = r.outcome.refusal() {
            return Err(refused.into());
        }
        let Outcome::NamespacePut(n) = r.outcome else {
            return Err(
                Error::Internal(format!("a namespace put applied as {:?}", r.outcome)).into(),
            );
        };
        let usage = self.read(|st| st.catalog.usage_of(&n.name))?;
        Ok(Response::new(pb::CreateNamespaceResponse {
            revision: r.revision,
            namespace: Some(convert::namespace_to_pb_full(&n, usage)),
        }))
    }

    async fn list_namespaces(
        &self,
        req: Request<pb::ListNamespacesRequest>,
    ) -> Result<Response<pb::ListNamespacesResponse>, Status> {
        let grant = auth::grant(&req);
        self.consistent(req.into_inner().consistency).await?;
        self.read(|st| {
            let namespaces = st
                .catalog
                .namespaces()
                .filter(|(n, _)| auth::may_enter(grant.as_ref(), &n.name).is_ok())
                .map(|(n, usage)| convert::namespace_to_pb_full(&n, usage))
                .collect();
            Response::new(pb::ListNamespacesResponse {
                revision: st.catalog.revision(),
                namespaces,
            })
        })
    }

    async fn delete_namespace(
        &self,
        req: Request<pb::DeleteNamespaceRequest>,
    ) -> Result<Response<pb::DeleteNamespaceResponse>, Status> {
        let msg = req.into_inner();
        validate::namespace_name(&msg.name)?;
        if msg.name == namespace::DEFAULT {
            return Err(Error::FailedPrecondition(
                "namespace \"default\" always exists and cannot be deleted; deregister its \
                 instances instead"
                    .into(),
            )
            .into());
        }
        self.proposer.here()?;
        self.enter(None, &msg.name).await?;
        let r = self
            .proposer
            .propose(Command::DeleteNamespace {
                name: msg.name,
                force: msg.force,
            })
            .await?;
        if let Some(refused) = r.outcome.refusal() {
            return Err(refused.into());
        }
        let Outcome::NamespaceDeleted { instances } = r.outcome else {
            return Err(
                Error::Internal(format!("a namespace delete applied as {:?}", r.outcome)).into(),
            );
        };
        Ok(Response::new(pb::DeleteNamespaceResponse {
            revision: r.revision,
            instances: instances as u64,
        }))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.watches.watch(req).await.map(Response::new)
    }

    type WatchServicesStream = WatchServicesStream;

    async fn watch_services(
        &self,
        req: Request<Streaming<pb::WatchServicesRequest>>,
    ) -> Result<Response<Self::WatchServicesStream>, Status> {
        self.watches.watch_services(req).await.map(Response::new)
    }
}
