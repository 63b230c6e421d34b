//! Protobuf <-> registry types. Validation of incoming requests happens here,
//! on the way in, so nothing invalid is ever proposed to Raft.

use std::collections::BTreeMap;

use crate::error::Result;
use crate::proto::v1 as pb;
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
    pb::Instance {
        service: i.service.clone(),
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
        status: status_to_pb(i.status) as i32,
        create_revision: i.create_revision,
        mod_revision: i.mod_revision,
    }
}

/// Validates a registration and turns it into the command to replicate.
pub fn register_command(req: pb::RegisterRequest) -> Result<Command> {
    let i = req
        .instance
        .ok_or_else(|| crate::error::Error::InvalidArgument("instance is missing".into()))?;
    validate::service_name(&i.service)?;
    validate::instance_id(&i.id)?;
    validate::address(&i.address)?;
    let port = validate::port(i.port)?;
    let weight = validate::weight(i.weight)?;
    validate::tags(&i.tags)?;
    let metadata: BTreeMap<String, String> = i.metadata.into_iter().collect();
    validate::metadata(&metadata)?;
    Ok(Command::Register(Instance {
        service: i.service,
        id: i.id,
        address: i.address,
        port,
        tags: i.tags,
        metadata,
        weight,
        status: HealthStatus::Passing,
        create_revision: 0,
        mod_revision: 0,
    }))
}

/// Validates a (service, id) pair naming an instance.
pub fn instance_ref(service: &str, id: &str) -> Result<()> {
    validate::service_name(service)?;
    validate::instance_id(id)
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
