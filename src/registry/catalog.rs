//! The catalogue of instances held by every node, and the deterministic
//! application of commands to it.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;

use super::acl::Acl;
use super::model::{
    Command, CommandResponse, Event, EventKind, HealthStatus, HealthUpdate, Instance, OnSessionEnd,
    Outcome, ServiceConfig, Session, SESSION_KEY,
};

#[derive(Clone, Debug, Default)]
pub struct Catalog {
    /// Instances behind a pointer: a B-tree node holds room for 11 values,
    /// so a service with one inline instance would cost some 4 KiB. Shared
    /// (`Arc`), so that a snapshot copies pointers under the state lock and
    /// encodes outside it; an instance changed meanwhile is copied on write.
    services: BTreeMap<String, BTreeMap<String, Arc<Instance>>>,
    configs: BTreeMap<String, ServiceConfig>,
    /// Log index of the last applied entry.
    revision: u64,
    acl: Acl,
    /// Instances, and those with a health check: kept as they change, so
    /// that limits are checked without a scan.
    instances: usize,
    checked: usize,
    /// Passing instances per service (services with none are left out), so
    /// that a listing costs a lookup per service, not a scan of every
    /// instance: with a million instances the scan set ListServices' p99.
    passing: BTreeMap<String, u32>,
    sessions: BTreeMap<String, Session>,
    /// Session id → the services it holds instances in, with how many:
    /// derived from their metadata as they come and go. Per service rather
    /// than per instance, which would copy every held instance's names; an
    /// ending session finds its instances among those services' instances.
    held: BTreeMap<String, BTreeMap<String, usize>>,
}

/// The instances a query returns, and whether protection overrode `healthy_only`.
pub struct View<'a> {
    pub instances: Vec<&'a Instance>,
    pub protection_active: bool,
}

/// Per-service counts, for listings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSummary {
    pub name: String,
    pub instances: u32,
    pub passing: u32,
}

impl Catalog {
    pub fn from_parts(
        revision: u64,
        instances: impl IntoIterator<Item = impl Into<Arc<Instance>>>,
        configs: impl IntoIterator<Item = (String, ServiceConfig)>,
    ) -> Self {
        let mut c = Catalog {
            revision,
            configs: configs.into_iter().collect(),
            ..Default::default()
        };
        for i in instances {
            c.insert(i);
        }
        c
    }

    /// The catalogue with the tokens `acl` holds.
    pub fn with_acl(self, acl: Acl) -> Self {
        Catalog { acl, ..self }
    }

    /// The catalogue with these open sessions.
    pub fn with_sessions(self, sessions: impl IntoIterator<Item = Session>) -> Self {
        Catalog {
            sessions: sessions.into_iter().map(|s| (s.id.clone(), s)).collect(),
            ..self
        }
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn acl(&self) -> &Acl {
        &self.acl
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
            Command::Register(spec) => self.register(revision, spec, &mut events),
            Command::Deregister { service, id } => {
                self.deregister(revision, service, id, &mut events)
            }
            Command::SetHealth(updates) => self.set_health(revision, updates, &mut events),
            Command::ConfigureService {
                service,
                protect_threshold_pct,
            } => {
                self.configs.insert(
                    service.clone(),
                    ServiceConfig {
                        protect_threshold_pct: *protect_threshold_pct,
                    },
                );
                Outcome::Configured
            }
            Command::CreateToken { token, bootstrap } => {
                if *bootstrap && self.acl.bootstrapped() {
                    Outcome::AlreadyBootstrapped
                } else {
                    if *bootstrap {
                        self.acl.set_bootstrapped();
                    }
                    self.acl.insert(token.clone());
                    Outcome::TokenCreated
                }
            }
            Command::RevokeToken { accessor } => match self.acl.revoke(accessor) {
                true => Outcome::TokenRevoked,
                false => Outcome::NotFound,
            },
            Command::CreateSession(spec) => {
                let session = Session {
                    create_revision: revision,
                    ..spec.clone()
                };
                self.sessions.insert(session.id.clone(), session.clone());
                Outcome::SessionCreated(Box::new(session))
            }
            Command::EndSessions {
                ids,
                expired,
                at_ms,
            } => self.end_sessions(revision, ids, *expired, *at_ms, &mut events),
        };
        (CommandResponse { revision, outcome }, events)
    }

    /// Stores `spec` at `revision`, keeping the create revision of the instance it replaces.
    fn register(&mut self, revision: u64, spec: &Instance, events: &mut Vec<Event>) -> Outcome {
        // The session may have ended between the request's check and this entry.
        if spec
            .session()
            .is_some_and(|s| !self.sessions.contains_key(s))
        {
            return Outcome::SessionNotFound;
        }
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
        Outcome::Registered(Box::new(inst))
    }

    fn deregister(
        &mut self,
        revision: u64,
        service: &str,
        id: &str,
        events: &mut Vec<Event>,
    ) -> Outcome {
        match self.remove(service, id) {
            Some(old) => {
                events.push(Event {
                    kind: EventKind::Delete,
                    revision,
                    instance: old,
                });
                Outcome::Deregistered
            }
            None => Outcome::NotFound,
        }
    }

    /// Applies the updates that change a known instance's status; others are skipped.
    fn set_health(
        &mut self,
        revision: u64,
        updates: &[HealthUpdate],
        events: &mut Vec<Event>,
    ) -> Outcome {
        let mut applied = 0;
        for u in updates {
            let Some(inst) = self
                .services
                .get_mut(&u.service)
                .and_then(|m| m.get_mut(&u.id))
                .map(Arc::make_mut)
            else {
                continue;
            };
            if inst.status == u.status {
                continue;
            }
            let was = inst.status == HealthStatus::Passing;
            inst.status = u.status;
            inst.check_output = u.output.clone();
            inst.status_since_ms = u.at_ms;
            inst.mod_revision = revision;
            applied += 1;
            let instance = Instance::clone(inst);
            let now = instance.status == HealthStatus::Passing;
            if was != now {
                self.count_passing(&instance.service, now);
            }
            events.push(Event {
                kind: EventKind::Put,
                revision,
                instance,
            });
        }
        Outcome::HealthUpdated(applied)
    }

    /// Ends each named session that is open and applies its `on_end` to the
    /// instances it holds; an instance that stays turns critical and leaves
    /// the session, saying why in its check output.
    fn end_sessions(
        &mut self,
        revision: u64,
        ids: &[String],
        expired: bool,
        at_ms: u64,
        events: &mut Vec<Event>,
    ) -> Outcome {
        let (mut sessions, mut instances) = (0, 0);
        for id in ids {
            let Some(session) = self.sessions.remove(id) else {
                continue;
            };
            sessions += 1;
            let why = if expired {
                format!(
                    "session {id} expired: no renewal within {} ms",
                    session.ttl_ms
                )
            } else {
                format!("session {id} closed")
            };
            let services = self.held.remove(id).unwrap_or_default();
            let held: Vec<(String, String)> = services
                .keys()
                .filter_map(|service| self.services.get(service))
                .flat_map(|m| m.values())
                .filter(|i| i.session() == Some(id))
                .map(|i| (i.service.clone(), i.id.clone()))
                .collect();
            for (service, iid) in held {
                instances += 1;
                if session.on_end == OnSessionEnd::Deregister {
                    self.deregister(revision, &service, &iid, events);
                    continue;
                }
                let Some(mut inst) = self.get(&service, &iid).cloned() else {
                    continue;
                };
                inst.metadata.remove(SESSION_KEY);
                inst.status = HealthStatus::Critical;
                inst.check_output = why.clone();
                inst.status_since_ms = at_ms;
                inst.mod_revision = revision;
                self.insert(inst.clone());
                events.push(Event {
                    kind: EventKind::Put,
                    revision,
                    instance: inst,
                });
            }
        }
        Outcome::SessionsEnded {
            sessions,
            instances,
        }
    }

    pub fn session(&self, id: &str) -> Option<&Session> {
        self.sessions.get(id)
    }

    pub fn sessions(&self) -> impl Iterator<Item = &Session> {
        self.sessions.values()
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Instances registered under session `id`.
    pub fn session_size(&self, id: &str) -> usize {
        self.held
            .get(id)
            .map_or(0, |services| services.values().sum())
    }

    pub fn get(&self, service: &str, id: &str) -> Option<&Instance> {
        self.services.get(service)?.get(id).map(|i| &**i)
    }

    pub fn config(&self, service: &str) -> ServiceConfig {
        self.configs.get(service).cloned().unwrap_or_default()
    }

    /// The catalogue's own copy of the name `service`, if it has instances
    /// or a configuration.
    pub fn service_name(&self, service: &str) -> Option<&str> {
        self.services
            .get_key_value(service)
            .map(|(k, _)| k)
            .or_else(|| self.configs.get_key_value(service).map(|(k, _)| k))
            .map(String::as_str)
    }

    /// Names of the services with instances or a configuration.
    pub fn service_names(&self) -> impl Iterator<Item = &str> {
        self.services
            .keys()
            .chain(
                self.configs
                    .keys()
                    .filter(|k| !self.services.contains_key(*k)),
            )
            .map(String::as_str)
    }

    pub fn configs(&self) -> impl Iterator<Item = (&String, &ServiceConfig)> {
        self.configs.iter()
    }

    /// The instances of `service` carrying `tags`; with `healthy_only`, the passing
    /// ones, unless fewer pass than the service's protection threshold.
    pub fn view(&self, service: &str, healthy_only: bool, tags: &[String]) -> View<'_> {
        let candidates: Vec<&Instance> = self
            .instances_of(service)
            .filter(|i| i.has_tags(tags))
            .collect();
        if !healthy_only {
            return View {
                instances: candidates,
                protection_active: false,
            };
        }
        let passing: Vec<&Instance> = candidates
            .iter()
            .copied()
            .filter(|i| i.status == HealthStatus::Passing)
            .collect();
        let threshold = u64::from(self.config(service).protect_threshold_pct);
        if threshold > 0 && (passing.len() as u64) * 100 < threshold * candidates.len() as u64 {
            View {
                instances: candidates,
                protection_active: true,
            }
        } else {
            View {
                instances: passing,
                protection_active: false,
            }
        }
    }

    pub fn instances_of(&self, service: &str) -> impl Iterator<Item = &Instance> {
        self.services
            .get(service)
            .into_iter()
            .flat_map(|m| m.values().map(|i| &**i))
    }

    pub fn all_instances(&self) -> impl Iterator<Item = &Instance> {
        self.services
            .values()
            .flat_map(|m| m.values().map(|i| &**i))
    }

    /// Every instance, shared rather than copied: a snapshot takes these
    /// under the state lock (a pointer each) and encodes them after it.
    pub fn shared_instances(&self) -> impl Iterator<Item = Arc<Instance>> + '_ {
        self.services.values().flat_map(|m| m.values().cloned())
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    #[cfg(test)]
    pub fn summaries(&self) -> Vec<ServiceSummary> {
        self.summaries_after(None).collect()
    }

    /// Services with instances in name order, after `after` (from the first
    /// when `None`): a page costs its own length, not the catalogue's.
    pub fn summaries_after<'a>(
        &'a self,
        after: Option<&str>,
    ) -> impl Iterator<Item = ServiceSummary> + 'a {
        let from = match after {
            Some(name) => Bound::Excluded(name),
            None => Bound::Unbounded,
        };
        self.services
            .range::<str, _>((from, Bound::Unbounded))
            .map(|(name, m)| ServiceSummary {
                name: name.clone(),
                instances: m.len() as u32,
                passing: self.passing.get(name).copied().unwrap_or(0),
            })
    }

    /// Instances in the catalogue.
    pub fn instance_count(&self) -> usize {
        self.instances
    }

    /// Instances of `service`.
    pub fn instance_count_of(&self, service: &str) -> usize {
        self.services.get(service).map_or(0, BTreeMap::len)
    }

    /// Instances with a health check (probe or TTL).
    pub fn checked_count(&self) -> usize {
        self.checked
    }

    fn insert(&mut self, inst: impl Into<Arc<Instance>>) {
        let inst = inst.into();
        let checked = inst.check.is_some();
        if inst.status == HealthStatus::Passing {
            self.count_passing(&inst.service, true);
        }
        let held = inst
            .session()
            .map(|s| (s.to_string(), inst.service.clone()));
        let old = self
            .services
            .entry(inst.service.clone())
            .or_default()
            .insert(inst.id.clone(), inst);
        self.uncount(old.as_deref());
        self.instances += 1;
        self.checked += usize::from(checked);
        // After `uncount`, which takes the replaced instance out of its session.
        if let Some((session, service)) = held {
            *self
                .held
                .entry(session)
                .or_default()
                .entry(service)
                .or_default() += 1;
        }
    }

    fn remove(&mut self, service: &str, id: &str) -> Option<Instance> {
        let m = self.services.get_mut(service)?;
        let old = m.remove(id).map(Arc::unwrap_or_clone);
        if m.is_empty() {
            self.services.remove(service);
        }
        self.uncount(old.as_ref());
        old
    }

    /// One passing instance more (`up`) or fewer in `service`.
    fn count_passing(&mut self, service: &str, up: bool) {
        if up {
            *self.passing.entry(service.to_string()).or_default() += 1;
        } else if let Some(n) = self.passing.get_mut(service) {
            *n -= 1;
            if *n == 0 {
                self.passing.remove(service);
            }
        }
    }

    fn uncount(&mut self, old: Option<&Instance>) {
        if let Some(old) = old {
            self.instances -= 1;
            self.checked -= usize::from(old.check.is_some());
            if old.status == HealthStatus::Passing {
                self.count_passing(&old.service, false);
            }
            let Some(session) = old.session() else { return };
            let Some(services) = self.held.get_mut(session) else {
                return;
            };
            if let Some(n) = services.get_mut(&old.service) {
                *n -= 1;
                if *n == 0 {
                    services.remove(&old.service);
                }
            }
            if services.is_empty() {
                self.held.remove(session);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(id: &str, on_end: OnSessionEnd) -> Command {
        Command::CreateSession(Session {
            id: id.into(),
            name: "test".into(),
            ttl_ms: 1_000,
            on_end,
            create_revision: 0,
            created_by: String::new(),
        })
    }

    fn held_by(service: &str, id: &str, session: &str) -> Command {
        let mut i = Instance::example(service, id);
        i.metadata.insert(SESSION_KEY.into(), session.into());
        Command::Register(i)
    }

    #[test]
    fn a_session_ends_all_its_instances_in_one_entry() {
        let mut c = Catalog::default();
        c.apply(1, &session("s1", OnSessionEnd::Critical));
        c.apply(2, &session("s2", OnSessionEnd::Deregister));
        for id in ["1", "2", "3"] {
            c.apply(3, &held_by("a", id, "s1"));
            c.apply(3, &held_by("b", id, "s2"));
        }
        c.apply(4, &Command::Register(Instance::example("a", "free")));
        // Re-registered without the session: it leaves it.
        c.apply(5, &Command::Register(Instance::example("a", "3")));
        assert_eq!((c.session_size("s1"), c.session_size("s2")), (2, 3));
        let (resp, ev) = c.apply(
            6,
            &Command::EndSessions {
                ids: vec!["s1".into(), "s2".into(), "gone".into()],
                expired: true,
                at_ms: 9,
            },
        );
        assert_eq!(
            resp.outcome,
            Outcome::SessionsEnded {
                sessions: 2,
                instances: 5
            }
        );
        assert_eq!(ev.len(), 5);
        assert!(ev.iter().all(|e| e.revision == 6));
        let one = c.get("a", "1").expect("kept");
        assert_eq!(one.status, HealthStatus::Critical);
        assert_eq!(one.session(), None);
        assert!(one.check_output.contains("expired"), "{}", one.check_output);
        assert_eq!(c.instances_of("b").count(), 0, "deregistered");
        assert_eq!(c.summaries(), scanned(&c), "critical ones no longer pass");
        assert_eq!(
            c.get("a", "3").map(|i| i.status),
            Some(HealthStatus::Passing)
        );
        assert_eq!(
            c.get("a", "free").map(|i| i.status),
            Some(HealthStatus::Passing)
        );
        assert_eq!(c.session_count(), 0);
        assert_eq!(c.session_size("s1"), 0);
    }

    #[test]
    fn registering_under_an_unknown_session_changes_nothing() {
        let mut c = Catalog::default();
        let (resp, ev) = c.apply(1, &held_by("a", "1", "nope"));
        assert_eq!(resp.outcome, Outcome::SessionNotFound);
        assert!(ev.is_empty());
        assert_eq!(c.instance_count(), 0);
        c.apply(2, &session("s", OnSessionEnd::Critical));
        c.apply(3, &held_by("a", "1", "s"));
        c.apply(
            4,
            &Command::Deregister {
                service: "a".into(),
                id: "1".into(),
            },
        );
        assert_eq!(
            c.session_size("s"),
            0,
            "a deregistered instance leaves its session"
        );
        assert_eq!(c.session("s").map(|s| s.create_revision), Some(2));
    }

    #[test]
    fn register_keeps_create_revision() {
        let mut c = Catalog::default();
        c.apply(3, &Command::Register(Instance::example("a", "1")));
        let (resp, ev) = c.apply(5, &Command::Register(Instance::example("a", "1")));
        let Outcome::Registered(i) = resp.outcome else {
            panic!("unexpected outcome {resp:?}")
        };
        assert_eq!((i.create_revision, i.mod_revision), (3, 5));
        assert_eq!(ev.len(), 1);
        assert_eq!(c.revision(), 5);
    }

    #[test]
    fn health_updates_and_protection() {
        let mut c = Catalog::default();
        for id in ["1", "2", "3", "4"] {
            c.apply(1, &Command::Register(Instance::example("a", id)));
        }
        let down = |id: &str| HealthUpdate {
            service: "a".into(),
            id: id.into(),
            status: HealthStatus::Critical,
            output: "refused".into(),
            at_ms: 7,
        };
        // A snapshot's shared copy, taken before: changes do not reach it.
        let before: Vec<_> = c.shared_instances().collect();
        let (resp, ev) = c.apply(
            2,
            &Command::SetHealth(vec![down("1"), down("2"), down("9")]),
        );
        assert!(before.iter().all(|i| i.status == HealthStatus::Passing));
        assert_eq!(resp.outcome, Outcome::HealthUpdated(2));
        assert_eq!(c.summaries(), scanned(&c));
        assert_eq!(c.summaries()[0].passing, 2);
        assert_eq!(ev.len(), 2);
        assert_eq!(c.get("a", "1").map(|i| i.mod_revision), Some(2));
        // The same status again is no change.
        let (resp, ev) = c.apply(3, &Command::SetHealth(vec![down("1")]));
        assert_eq!(resp.outcome, Outcome::HealthUpdated(0));
        assert!(ev.is_empty());
        assert_eq!(c.view("a", true, &[]).instances.len(), 2);
        c.apply(
            4,
            &Command::ConfigureService {
                service: "a".into(),
                protect_threshold_pct: 60,
            },
        );
        let v = c.view("a", true, &[]);
        assert!(v.protection_active);
        assert_eq!(v.instances.len(), 4);
        assert!(!c.view("a", false, &[]).protection_active);
    }

    #[test]
    fn a_listing_resumes_after_a_name() {
        let c = Catalog::from_parts(3, ["a", "b", "c"].map(|s| Instance::example(s, "1")), []);
        let after =
            |n: Option<&str>| -> Vec<String> { c.summaries_after(n).map(|s| s.name).collect() };
        assert_eq!(after(None), ["a", "b", "c"]);
        assert_eq!(after(Some("a")), ["b", "c"]);
        // A name between two, or past the last, is a bound all the same.
        assert_eq!(after(Some("aa")), ["b", "c"]);
        assert!(after(Some("c")).is_empty());
    }

    /// The listing as a scan of every instance would count it.
    fn scanned(c: &Catalog) -> Vec<ServiceSummary> {
        let mut names: Vec<&str> = c.all_instances().map(|i| i.service.as_str()).collect();
        names.dedup();
        names
            .into_iter()
            .map(|name| ServiceSummary {
                name: name.to_string(),
                instances: c.instances_of(name).count() as u32,
                passing: c
                    .instances_of(name)
                    .filter(|i| i.status == HealthStatus::Passing)
                    .count() as u32,
            })
            .collect()
    }

    #[test]
    fn counts_follow_registrations_updates_and_removals() {
        let checked = Instance::example_ttl;
        let counts = |c: &Catalog| {
            (
                c.instance_count(),
                c.instance_count_of("a"),
                c.instance_count_of("b"),
                c.checked_count(),
            )
        };
        let mut c = Catalog::default();
        c.apply(1, &Command::Register(Instance::example("a", "1")));
        c.apply(2, &Command::Register(checked("a", "2")));
        c.apply(3, &Command::Register(checked("b", "1")));
        assert_eq!(counts(&c), (3, 2, 1, 2));
        // Updates count once; adding or dropping a check moves only that count.
        c.apply(4, &Command::Register(checked("a", "1")));
        c.apply(5, &Command::Register(Instance::example("a", "2")));
        assert_eq!(counts(&c), (3, 2, 1, 2));
        c.apply(6, &Command::Register(Instance::example("b", "1")));
        assert_eq!(counts(&c), (3, 2, 1, 1));
        let gone = |service: &str, id: &str| Command::Deregister {
            service: service.into(),
            id: id.into(),
        };
        c.apply(7, &gone("a", "1"));
        c.apply(8, &gone("a", "1"));
        assert_eq!(counts(&c), (2, 1, 1, 0));
        assert_eq!(c.summaries(), scanned(&c));
        let rebuilt = Catalog::from_parts(8, c.all_instances().cloned().collect::<Vec<_>>(), []);
        assert_eq!(counts(&rebuilt), counts(&c));
        c.apply(9, &gone("a", "2"));
        c.apply(10, &gone("b", "1"));
        assert_eq!(counts(&c), (0, 0, 0, 0));
    }

    #[test]
    fn deregister_unknown_changes_nothing() {
        let mut c = Catalog::default();
        c.apply(1, &Command::Register(Instance::example("a", "1")));
        let (resp, ev) = c.apply(
            2,
            &Command::Deregister {
                service: "a".into(),
                id: "2".into(),
            },
        );
        assert_eq!(resp.outcome, Outcome::NotFound);
        assert!(ev.is_empty());
        assert_eq!(c.all_instances().count(), 1);
        let (resp, ev) = c.apply(
            3,
            &Command::Deregister {
                service: "a".into(),
                id: "1".into(),
            },
        );
        assert_eq!(resp.outcome, Outcome::Deregistered);
        assert_eq!(ev[0].kind, EventKind::Delete);
        assert_eq!(c.service_count(), 0);
    }
}
