//! Protobuf <-> registry types. Validation of incoming requests happens here,
//! on the way in, so nothing invalid is ever proposed to Raft.

use super::auth::Grant;
use crate::error::Error;
use crate::error::Result;
use crate::proto::v1 as pb;
use crate::registry::catalog::Usage;
use crate::registry::model::{CheckKind, CheckSpec, Metadata, SESSION_KEY};
use crate::registry::namespace::{self, Namespace, Quotas, DEFAULT};
use crate::registry::validate;
use crate::registry::watch::{ResetReason, WatchMessage};
use crate::registry::{Command, Event, EventKind, HealthStatus, Instance};

pub fn status_to_pb(s: HealthStatus) -> pb::HealthStatus {
    match s {
        HealthStatus::Passing => pb::HealthStatus::Passing,
        HealthStatus::Warning => pb::HealthStatus::Warning,
        HealthStatus::Critical => pb::HealthStatus::Critical,
    }
}

pub fn instance_to_pb(i: &Instance) -> pb::Instance {
    let (ns, service) = namespace::split(&i.service);
    pb::Instance {
        service: service.to_string(),
        namespace: namespace_to_pb(ns),
        id: i.id.clone(),
        address: i.address.clone(),
        port: u32::from(i.port),
        tags: i.tags.clone(),
        metadata: i
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        weight: i.weight,
        status: if i.maintenance().is_some() {
            pb::HealthStatus::Maintenance
        } else {
            status_to_pb(i.status)
        } as i32,
        maintenance: i.maintenance().unwrap_or_default().to_string(),
        check_status: status_to_pb(i.status) as i32,
        create_revision: i.create_revision,
        mod_revision: i.mod_revision,
        check: i.check.as_ref().map(check_to_pb),
        check_output: i.check_output.clone(),
        status_since_ms: i.status_since_ms,
        registered_by: i.registered_by.clone(),
    }
}

fn check_to_pb(c: &CheckSpec) -> pb::HealthCheck {
    use pb::health_check::Kind;
    let kind = match &c.kind {
        CheckKind::Ttl { ttl_ms } => Kind::Ttl(pb::TtlCheck {
            ttl_ms: *ttl_ms as u32,
        }),
        CheckKind::Tcp { port } => Kind::Tcp(pb::TcpCheck {
            port: u32::from(*port),
        }),
        CheckKind::Http { port, path } => Kind::Http(pb::HttpCheck {
            port: u32::from(*port),
            path: path.clone(),
        }),
        CheckKind::Grpc { port, service } => Kind::Grpc(pb::GrpcCheck {
            port: u32::from(*port),
            service: service.clone(),
        }),
    };
    pb::HealthCheck {
        kind: Some(kind),
        interval_ms: c.interval_ms as u32,
        timeout_ms: c.timeout_ms as u32,
        failures_before_critical: c.failures_before_critical,
        successes_before_passing: c.successes_before_passing,
        deregister_after_ms: c.deregister_after_ms,
    }
}

/// A check port: 0 means the instance's own.
fn check_port(port: u32, instance_port: u16) -> Result<u16> {
    if port == 0 {
        Ok(instance_port)
    } else {
        validate::port(port)
    }
}

/// Validates a check and fills in its defaults.
fn check_from_pb(c: pb::HealthCheck, instance_port: u16) -> Result<CheckSpec> {
    use pb::health_check::Kind;
    let kind = match c.kind {
        None => {
            return Err(Error::InvalidArgument(
                "check has no kind (ttl, tcp, http or grpc)".into(),
            ))
        }
        Some(Kind::Ttl(t)) => CheckKind::Ttl {
            ttl_ms: validate::period_ms("TTL", u64::from(t.ttl_ms), validate::DEFAULT_TTL_MS)?,
        },
        Some(Kind::Tcp(t)) => CheckKind::Tcp {
            port: check_port(t.port, instance_port)?,
        },
        Some(Kind::Http(h)) => CheckKind::Http {
            port: check_port(h.port, instance_port)?,
            path: validate::http_path(&h.path)?,
        },
        Some(Kind::Grpc(g)) => {
            if g.service.len() > validate::MAX_ID_LEN {
                return Err(Error::InvalidArgument(format!(
                    "gRPC health service name is over {} bytes",
                    validate::MAX_ID_LEN
                )));
            }
            CheckKind::Grpc {
                port: check_port(g.port, instance_port)?,
                service: g.service,
            }
        }
    };
    let interval_ms = validate::period_ms(
        "check interval",
        u64::from(c.interval_ms),
        validate::DEFAULT_CHECK_INTERVAL_MS,
    )?;
    let timeout_ms = validate::period_ms(
        "check timeout",
        u64::from(c.timeout_ms),
        validate::DEFAULT_CHECK_TIMEOUT_MS.min(interval_ms),
    )?;
    if timeout_ms > interval_ms {
        return Err(Error::InvalidArgument(format!(
            "check timeout {timeout_ms} ms is longer than its interval {interval_ms} ms"
        )));
    }
    Ok(CheckSpec {
        kind,
        interval_ms,
        timeout_ms,
        failures_before_critical: validate::threshold(
            "failures_before_critical",
            c.failures_before_critical,
            validate::DEFAULT_FAILURES_BEFORE_CRITICAL,
        )?,
        successes_before_passing: validate::threshold(
            "successes_before_passing",
            c.successes_before_passing,
            validate::DEFAULT_SUCCESSES_BEFORE_PASSING,
        )?,
        deregister_after_ms: c.deregister_after_ms,
    })
}

/// A request's namespace: empty means `default`.
pub fn namespace_of(ns: &str) -> Result<&str> {
    if ns.is_empty() {
        return Ok(DEFAULT);
    }
    validate::namespace_name(ns)?;
    Ok(ns)
}

/// A namespace as answers name it: `default` as empty, as requests may.
pub fn namespace_to_pb(ns: &str) -> String {
    if ns == DEFAULT {
        String::new()
    } else {
        ns.to_string()
    }
}

/// The catalogue's key for a request's (namespace, service), both validated.
pub fn service_key(ns: &str, service: &str) -> Result<String> {
    let ns = namespace_of(ns)?;
    validate::service_name(service)?;
    Ok(namespace::qualify(ns, service))
}

pub fn namespace_to_pb_full(n: &Namespace, usage: Usage) -> pb::Namespace {
    pb::Namespace {
        name: n.name.clone(),
        quotas: Some(pb::NamespaceQuotas {
            max_instances: n.quotas.instances,
            max_services: n.quotas.services,
            max_sessions: n.quotas.sessions,
            max_watch_streams: n.quotas.watch_streams,
        }),
        create_revision: n.create_revision,
        instances: usage.instances,
        services: usage.services,
        sessions: usage.sessions,
    }
}

pub fn quotas_from_pb(q: Option<pb::NamespaceQuotas>) -> Quotas {
    let q = q.unwrap_or_default();
    Quotas {
        instances: q.max_instances,
        services: q.max_services,
        sessions: q.max_sessions,
        watch_streams: q.max_watch_streams,
    }
}

/// Validates a registration and turns it into the command to replicate.
/// The command a Register asks for; the registry records `grant`'s accessor
/// as who registered it, whatever the request says.
pub fn register_command(req: pb::RegisterRequest, grant: Option<&Grant>) -> Result<Command> {
    let i = req
        .instance
        .ok_or_else(|| Error::InvalidArgument("instance is missing".into()))?;
    if !i.namespace.is_empty() && i.namespace != req.namespace {
        return Err(Error::InvalidArgument(format!(
            "instance.namespace is {:?} but the request's namespace is {:?}: leave \
             instance.namespace empty, or set both alike",
            i.namespace, req.namespace
        )));
    }
    let service = service_key(&req.namespace, &i.service)?;
    validate::instance_id(&i.id)?;
    validate::address(&i.address)?;
    let port = validate::port(i.port)?;
    let weight = validate::weight(i.weight)?;
    validate::tags(&i.tags)?;
    let mut metadata: Metadata = i.metadata.into_iter().collect();
    validate::metadata(&metadata)?;
    if !req.session.is_empty() {
        validate::session_id(&req.session)?;
        metadata.insert(SESSION_KEY.into(), req.session);
    }
    let check = i.check.map(|c| check_from_pb(c, port)).transpose()?;
    Ok(Command::Register(Instance {
        service,
        id: i.id,
        address: i.address,
        port,
        tags: i.tags,
        metadata,
        weight,
        status: HealthStatus::Passing,
        create_revision: 0,
        mod_revision: 0,
        check,
        check_output: String::new(),
        status_since_ms: crate::registry::leases::now_ms(),
        registered_by: grant.map(|g| g.accessor().to_string()).unwrap_or_default(),
    }))
}

/// Validates a (namespace, service, id) naming an instance; the service's
/// catalogue key.
pub fn instance_ref(ns: &str, service: &str, id: &str) -> Result<String> {
    let key = service_key(ns, service)?;
    validate::instance_id(id)?;
    Ok(key)
}

fn event_to_pb(e: &Event) -> pb::WatchEvent {
    pb::WatchEvent {
        r#type: match e.kind {
            EventKind::Put => pb::EventType::Put,
            EventKind::Delete => pb::EventType::Delete,
        } as i32,
        revision: e.revision,
        instance: Some(instance_to_pb(&e.instance)),
    }
}

pub fn watch_message_to_pb(m: &WatchMessage) -> pb::WatchResponse {
    pb::WatchResponse {
        revision: m.revision,
        reset: match m.reset {
            None => pb::ResetReason::Unspecified,
            Some(ResetReason::Initial) => pb::ResetReason::Initial,
            Some(ResetReason::Compacted) => pb::ResetReason::Compacted,
        } as i32,
        instances: m.instances.iter().map(instance_to_pb).collect(),
        events: m.events.iter().map(event_to_pb).collect(),
        compact_revision: m.compact_revision,
    }
}
