//! The catalogue of instances held by every node, and the deterministic
//! application of commands to it.

use std::collections::BTreeMap;

use super::model::{Command, CommandResponse, Event, EventKind, HealthStatus, Instance, Outcome};

#[derive(Clone, Debug, Default)]
pub struct Catalog {
    services: BTreeMap<String, BTreeMap<String, Instance>>,
    /// Log index of the last applied entry.
    revision: u64,
}

/// Per-service counts, for listings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSummary {
    pub name: String,
    pub instances: u32,
    pub passing: u32,
}

impl Catalog {
    pub fn from_instances(revision: u64, instances: impl IntoIterator<Item = Instance>) -> Self {
        let mut c = Catalog {
            revision,
            ..Default::default()
        };
        for i in instances {
            c.insert(i);
        }
        c
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Records that the entry at `revision` was applied without changing instances.
    pub fn advance(&mut self, revision: u64) {
        self.revision = self.revision.max(revision);
    }

    /// Applies `cmd` as the entry at `revision`; the events say what changed.
    pub fn apply(&mut self, revision: u64, cmd: &Command) -> (CommandResponse, Vec<Event>) {
        self.advance(revision);
        let mut events = Vec::new();
        let outcome = match cmd {
            Command::Register(spec) => {
                let mut inst = spec.clone();
                inst.mod_revision = revision;
                inst.create_revision = self
                    .get(&inst.service, &inst.id)
                    .map_or(revision, |old| old.create_revision);
                if inst.status == HealthStatus::default() {
                    inst.status = HealthStatus::Passing;
                }
                self.insert(inst.clone());
                events.push(Event {
                    kind: EventKind::Put,
                    revision,
                    instance: inst.clone(),
                });
                Outcome::Registered(inst)
            }
            Command::Deregister { service, id } => match self.remove(service, id) {
                Some(old) => {
                    events.push(Event {
                        kind: EventKind::Delete,
                        revision,
                        instance: old,
                    });
                    Outcome::Deregistered
                }
                None => Outcome::NotFound,
            },
        };
        (CommandResponse { revision, outcome }, events)
    }

    pub fn get(&self, service: &str, id: &str) -> Option<&Instance> {
        self.services.get(service)?.get(id)
    }

    pub fn instances_of(&self, service: &str) -> impl Iterator<Item = &Instance> {
        self.services
            .get(service)
            .into_iter()
            .flat_map(|m| m.values())
    }

    pub fn all_instances(&self) -> impl Iterator<Item = &Instance> {
        self.services.values().flat_map(|m| m.values())
    }

    pub fn len(&self) -> usize {
        self.services.values().map(|m| m.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    pub fn summaries(&self) -> Vec<ServiceSummary> {
        self.services
            .iter()
            .map(|(name, m)| ServiceSummary {
                name: name.clone(),
                instances: m.len() as u32,
                passing: m
                    .values()
                    .filter(|i| i.status == HealthStatus::Passing)
                    .count() as u32,
            })
            .collect()
    }

    fn insert(&mut self, inst: Instance) {
        self.services
            .entry(inst.service.clone())
            .or_default()
            .insert(inst.id.clone(), inst);
    }

    fn remove(&mut self, service: &str, id: &str) -> Option<Instance> {
        let m = self.services.get_mut(service)?;
        let old = m.remove(id);
        if m.is_empty() {
            self.services.remove(service);
        }
        old
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn inst(service: &str, id: &str) -> Instance {
        Instance {
            service: service.into(),
            id: id.into(),
            address: "127.0.0.1".into(),
            port: 80,
            tags: vec![],
            metadata: Default::default(),
            weight: 1,
            status: HealthStatus::Passing,
            create_revision: 0,
            mod_revision: 0,
        }
    }

    #[test]
    fn register_keeps_create_revision() {
        let mut c = Catalog::default();
        c.apply(3, &Command::Register(inst("a", "1")));
        let (resp, ev) = c.apply(5, &Command::Register(inst("a", "1")));
        let Outcome::Registered(i) = resp.outcome else {
            panic!("unexpected outcome {resp:?}")
        };
        assert_eq!((i.create_revision, i.mod_revision), (3, 5));
        assert_eq!(ev.len(), 1);
        assert_eq!(c.revision(), 5);
    }

    #[test]
    fn deregister_unknown_changes_nothing() {
        let mut c = Catalog::default();
        c.apply(1, &Command::Register(inst("a", "1")));
        let (resp, ev) = c.apply(
            2,
            &Command::Deregister {
                service: "a".into(),
                id: "2".into(),
            },
        );
        assert_eq!(resp.outcome, Outcome::NotFound);
        assert!(ev.is_empty());
        assert_eq!(c.len(), 1);
        let (resp, ev) = c.apply(
            3,
            &Command::Deregister {
                service: "a".into(),
                id: "1".into(),
            },
        );
        assert_eq!(resp.outcome, Outcome::Deregistered);
        assert_eq!(ev[0].kind, EventKind::Delete);
        assert!(c.is_empty());
    }
}
