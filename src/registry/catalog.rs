//! The catalogue of instances held by every node, and the deterministic
//! application of commands to it.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;

use super::acl::Acl;
use super::model::{
    Command, CommandResponse, Event, EventKind, HealthStatus, HealthUpdate, Instance, OnSessionEnd,
    Outcome, ServiceConfig, Session, MAINTENANCE_KEY, SESSION_KEY,
};
use super::namespace::{self, Namespace, Quota, Quotas};

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
    /// Every namespace but `default` (which always exists), with what it
    /// holds, kept as it changes so quotas are checked without a scan.
    namespaces: BTreeMap<String, Held>,
    /// What `default` holds.
    default_used: Usage,
    /// `default`'s quotas (none unless an operator set some).
    default_quotas: Quotas,
    /// The namespace of each session not in `default`.
    session_namespaces: BTreeMap<String, String>,
    /// The revision of each service's last change a read can see (its
    /// instances or its settings), since this catalogue was built; a
    /// service not here last changed at or before `changed_floor`. Kept
    /// for a while after a service is gone, so that its going counts as a
    /// change. Derived as entries apply: a node rebuilt from a snapshot
    /// knows less and answers higher, never lower.
    changed: BTreeMap<String, u64>,
    changed_floor: u64,
}

/// What a namespace holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub instances: u64,
    /// Names with instances or settings.
    pub services: u64,
    pub sessions: u64,
}

impl Usage {
    /// What counts against `quota` (watch streams are a node's: not here).
    fn of(&self, quota: Quota) -> u64 {
        match quota {
            Quota::Instances => self.instances,
            Quota::Services => self.services,
            Quota::Sessions => self.sessions,
            Quota::WatchStreams => 0,
        }
    }
}

/// A namespace and how much of its quotas it uses.
#[derive(Clone, Debug, Default)]
struct Held {
    spec: Option<Namespace>,
    used: Usage,
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
            changed_floor: revision,
            ..Default::default()
        };
        for i in instances {
            c.insert(i);
        }
        for (service, config) in configs {
            c.set_config(&service, config);
        }
        c
    }

    /// The catalogue with the tokens `acl` holds.
    pub fn with_acl(self, acl: Acl) -> Self {
        Catalog { acl, ..self }
    }

    /// The catalogue with these open sessions, and the namespace of each
    /// one not in `default`.
    pub fn with_sessions(
        mut self,
        sessions: impl IntoIterator<Item = Session>,
        namespaces: impl IntoIterator<Item = (String, String)>,
    ) -> Self {
        self.session_namespaces = namespaces.into_iter().collect();
        for s in sessions {
            let ns = self.session_namespace(&s.id).to_string();
            self.held_in(&ns).sessions += 1;
            self.sessions.insert(s.id.clone(), s);
        }
        self
    }

    /// The namespace of each session not in `default` (for snapshots).
    pub fn session_namespaces(&self) -> impl Iterator<Item = (&String, &String)> {
        self.session_namespaces.iter()
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
            } => self.configure(service, *protect_threshold_pct),
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
            Command::CreateSession(spec) => self.create_session(revision, namespace::DEFAULT, spec),
            Command::CreateSessionIn { namespace, session } => {
                self.create_session(revision, namespace, session)
            }
            Command::EndSessions {
                ids,
                expired,
                at_ms,
            } => self.end_sessions(revision, ids, *expired, *at_ms, &mut events),
            Command::PutNamespace {
                namespace,
                max_namespaces,
            } => self.put_namespace(revision, namespace, *max_namespaces),
            Command::DeleteNamespace { name, force } => {
                self.delete_namespace(revision, name, *force, &mut events)
            }
            Command::SetMaintenance {
                service,
                id,
                reason,
            } => self.set_maintenance(
                revision,
                service,
                id.as_deref(),
                reason.as_deref(),
                &mut events,
            ),
        };
        if let Command::ConfigureService { service, .. } = cmd {
            self.changed(service, revision);
        }
        for e in &events {
            self.changed(&e.instance.service, revision);
        }
        (CommandResponse { revision, outcome }, events)
    }

    /// Records that `service` changed at `revision`.
    fn changed(&mut self, service: &str, revision: u64) {
        match self.changed.get_mut(service) {
            Some(r) => *r = revision,
            None => {
                self.changed.insert(service.to_string(), revision);
            }
        }
        // Services that are gone are forgotten in bulk, by raising the floor
        // past their going, so that churning names cannot grow the map.
        if self.changed.len() > 2 * (self.services.len() + self.configs.len()) + 1024 {
            let (services, configs) = (&self.services, &self.configs);
            self.changed
                .retain(|s, _| services.contains_key(s) || configs.contains_key(s));
            self.changed_floor = revision;
        }
    }

    /// The revision of `service`'s last change a read can see (at most
    /// higher, for a node that was rebuilt from a snapshot since).
    pub fn changed_at(&self, service: &str) -> u64 {
        self.changed
            .get(service)
            .copied()
            .unwrap_or(0)
            .max(self.changed_floor)
    }

    /// Stores `spec` at `revision`, keeping the create revision of the instance it replaces.
    fn register(&mut self, revision: u64, spec: &Instance, events: &mut Vec<Event>) -> Outcome {
        // The session may have ended between the request's check and this
        // entry; one of another namespace is not there for this instance.
        if spec.session().is_some_and(|s| {
            !self.sessions.contains_key(s)
                || self.session_namespace(s) != namespace::split(&spec.service).0
        }) {
            return Outcome::SessionNotFound;
        }
        if let Err(refused) = self.admit_register(spec) {
            return refused;
        }
        let mut inst = spec.clone();
        inst.mod_revision = revision;
        let old = self.get(&inst.service, &inst.id);
        inst.create_revision = old.map_or(revision, |old| old.create_revision);
        if let Some(reason) = old.and_then(Instance::maintenance) {
            inst.metadata
                .insert(MAINTENANCE_KEY.to_string(), reason.to_string());
        }
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

    /// Sets or clears the maintenance reason of instance `id` of `service`,
    /// or of every instance the service holds; `NotFound` if none is there.
    fn set_maintenance(
        &mut self,
        revision: u64,
        service: &str,
        id: Option<&str>,
        reason: Option<&str>,
        events: &mut Vec<Event>,
    ) -> Outcome {
        let Some(held) = self.services.get_mut(service) else {
            return Outcome::NotFound;
        };
        let ids: Vec<String> = match id {
            Some(id) if held.contains_key(id) => vec![id.to_string()],
            Some(_) => return Outcome::NotFound,
            None => held.keys().cloned().collect(),
        };
        let (mut turned, mut changed) = (Vec::new(), 0);
        for id in ids {
            let Some(inst) = held.get_mut(&id).map(Arc::make_mut) else {
                continue;
            };
            if inst.maintenance() == reason {
                continue;
            }
            let was = inst.passing();
            match reason {
                Some(r) => inst
                    .metadata
                    .insert(MAINTENANCE_KEY.to_string(), r.to_string()),
                None => inst.metadata.remove(MAINTENANCE_KEY),
            };
            inst.mod_revision = revision;
            changed += 1;
            if was != inst.passing() {
                turned.push(inst.passing());
            }
            events.push(Event {
                kind: EventKind::Put,
                revision,
                instance: Instance::clone(inst),
            });
        }
        for up in turned {
            self.count_passing(service, up);
        }
        Outcome::MaintenanceSet(changed)
    }

    fn create_session(&mut self, revision: u64, ns: &str, spec: &Session) -> Outcome {
        if let Err(refused) = self.admit_session(ns) {
            return refused;
        }
        let session = Session {
            create_revision: revision,
            ..spec.clone()
        };
        self.held_in(ns).sessions += 1;
        if ns != namespace::DEFAULT {
            self.session_namespaces
                .insert(session.id.clone(), ns.to_string());
        }
        self.sessions.insert(session.id.clone(), session.clone());
        Outcome::SessionCreated(Box::new(session))
    }

    /// Whether namespace `ns` exists and has room for one session more.
    pub fn admit_session(&self, ns: &str) -> Result<(), Outcome> {
        self.admit_in(ns, [Quota::Sessions])
    }

    /// The namespace session `id` is in.
    pub fn session_namespace(&self, id: &str) -> &str {
        self.session_namespaces
            .get(id)
            .map_or(namespace::DEFAULT, String::as_str)
    }

    fn configure(&mut self, service: &str, protect_threshold_pct: u32) -> Outcome {
        let new_service = self.service_name(service).is_none();
        if let Err(refused) = self.admit(service, false, new_service) {
            return refused;
        }
        self.set_config(
            service,
            ServiceConfig {
                protect_threshold_pct,
            },
        );
        Outcome::Configured
    }

    fn set_config(&mut self, service: &str, config: ServiceConfig) {
        if self.service_name(service).is_none() {
            self.held_mut(service).services += 1;
        }
        self.configs.insert(service.to_string(), config);
    }

    /// Whether registering `spec` fits its namespace: it exists, and has
    /// room for the instance (unless it replaces one) and its service.
    pub fn admit_register(&self, spec: &Instance) -> Result<(), Outcome> {
        let fresh = self.get(&spec.service, &spec.id).is_none();
        let new_service = fresh && self.service_name(&spec.service).is_none();
        self.admit(&spec.service, fresh, new_service)
    }

    /// Whether `service`'s namespace exists and has room for one instance
    /// more (`instance`) and one service more (`service`): the check every
    /// node makes alike, so a refused write changes nothing anywhere.
    pub fn admit(&self, key: &str, instance: bool, service: bool) -> Result<(), Outcome> {
        let adds = [(Quota::Instances, instance), (Quota::Services, service)];
        let adds = adds.into_iter().filter_map(|(q, adds)| adds.then_some(q));
        self.admit_in(namespace::split(key).0, adds)
    }

    /// Whether namespace `ns` exists and has room for one more of each of `adds`.
    fn admit_in(&self, ns: &str, adds: impl IntoIterator<Item = Quota>) -> Result<(), Outcome> {
        let (quotas, used) = self
            .usage(ns)
            .ok_or_else(|| Outcome::NamespaceNotFound(ns.into()))?;
        for quota in adds {
            let limit = quota.of(&quotas);
            if limit > 0 && used.of(quota) >= limit {
                return Err(Outcome::QuotaExceeded {
                    namespace: ns.to_string(),
                    quota,
                    limit,
                });
            }
        }
        Ok(())
    }

    /// A namespace's quotas and what it holds; `None` if it does not exist.
    fn usage(&self, ns: &str) -> Option<(Quotas, Usage)> {
        if ns == namespace::DEFAULT {
            return Some((self.default_quotas, self.default_used));
        }
        let held = self.namespaces.get(ns)?;
        Some((held.spec.as_ref()?.quotas, held.used))
    }

    fn held_mut(&mut self, key: &str) -> &mut Usage {
        self.held_in(namespace::split(key).0)
    }

    /// What namespace `ns` holds, to count on.
    fn held_in(&mut self, ns: &str) -> &mut Usage {
        match ns {
            namespace::DEFAULT => &mut self.default_used,
            ns => &mut self.namespaces.entry(ns.to_string()).or_default().used,
        }
    }

    fn put_namespace(&mut self, revision: u64, spec: &Namespace, max_namespaces: u32) -> Outcome {
        if spec.name == namespace::DEFAULT {
            self.default_quotas = spec.quotas;
            return Outcome::NamespacePut(Box::new(Namespace {
                quotas: spec.quotas,
                ..Namespace::default_one()
            }));
        }
        let exists = self.namespace(&spec.name).is_some();
        // `default` counts as one.
        if !exists && self.namespaces.len() + 1 >= max_namespaces as usize {
            return Outcome::TooManyNamespaces {
                limit: max_namespaces,
            };
        }
        let held = self.namespaces.entry(spec.name.clone()).or_default();
        let create_revision = held.spec.as_ref().map_or(revision, |s| s.create_revision);
        let stored = Namespace {
            create_revision,
            ..spec.clone()
        };
        held.spec = Some(stored.clone());
        Outcome::NamespacePut(Box::new(stored))
    }

    fn delete_namespace(
        &mut self,
        revision: u64,
        name: &str,
        force: bool,
        events: &mut Vec<Event>,
    ) -> Outcome {
        let Some(held) = self.namespaces.get(name).filter(|h| h.spec.is_some()) else {
            return Outcome::NamespaceNotFound(name.to_string());
        };
        let instances = held.used.instances as usize;
        if instances > 0 && !force {
            return Outcome::NamespaceNotEmpty { instances };
        }
        let sessions: Vec<String> = self
            .session_namespaces
            .iter()
            .filter(|(_, ns)| *ns == name)
            .map(|(id, _)| id.clone())
            .collect();
        self.end_sessions(revision, &sessions, false, 0, events);
        let keys = Self::keys_in(&self.services, name);
        for service in keys {
            let ids: Vec<String> = self.services[&service].keys().cloned().collect();
            for id in ids {
                self.deregister(revision, &service, &id, events);
            }
        }
        let settings = Self::keys_in(&self.configs, name);
        for service in settings {
            self.configs.remove(&service);
        }
        self.namespaces.remove(name);
        Outcome::NamespaceDeleted { instances }
    }

    /// The keys of `map` in namespace `ns` (not `default`), in order.
    fn keys_in<V>(map: &BTreeMap<String, V>, ns: &str) -> Vec<String> {
        // '0' is the character after '/': the range is exactly `ns/…`.
        let (from, to) = (format!("{ns}/"), format!("{ns}0"));
        map.range::<str, _>((Bound::Included(from.as_str()), Bound::Excluded(to.as_str())))
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// What namespace `ns` holds (nothing if it does not exist).
    pub fn usage_of(&self, ns: &str) -> Usage {
        self.usage(ns).map_or(Usage::default(), |(_, used)| used)
    }

    /// The namespace `name`, if it exists (`default` always does).
    pub fn namespace(&self, name: &str) -> Option<Namespace> {
        if name == namespace::DEFAULT {
            return Some(Namespace {
                quotas: self.default_quotas,
                ..Namespace::default_one()
            });
        }
        self.namespaces.get(name)?.spec.clone()
    }

    /// Every namespace, `default` first, with what it holds.
    pub fn namespaces(&self) -> impl Iterator<Item = (Namespace, Usage)> + '_ {
        let default = (self.namespace(namespace::DEFAULT), self.default_used);
        std::iter::once(default)
            .chain(self.namespaces.values().map(|h| (h.spec.clone(), h.used)))
            .filter_map(|(spec, usage)| Some((spec?, usage)))
    }

    /// The namespaces other than `default`, as stored (for snapshots).
    pub fn namespace_specs(&self) -> impl Iterator<Item = Namespace> + '_ {
        let default = (self.default_quotas != Quotas::default()).then(|| Namespace {
            quotas: self.default_quotas,
            ..Namespace::default_one()
        });
        default
            .into_iter()
            .chain(self.namespaces.values().filter_map(|h| h.spec.clone()))
    }

    /// The catalogue with these namespaces (from a snapshot).
    pub fn with_namespaces(mut self, specs: impl IntoIterator<Item = Namespace>) -> Self {
        for spec in specs {
            if spec.name == namespace::DEFAULT {
                self.default_quotas = spec.quotas;
            } else {
                let name = spec.name.clone();
                self.namespaces.entry(name).or_default().spec = Some(spec);
            }
        }
        self
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
            let was = inst.passing();
            inst.status = u.status;
            inst.check_output = u.output.clone();
            inst.status_since_ms = u.at_ms;
            inst.mod_revision = revision;
            applied += 1;
            let instance = Instance::clone(inst);
            let now = instance.passing();
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
            let ns = self
                .session_namespaces
                .remove(id)
                .unwrap_or_else(|| namespace::DEFAULT.to_string());
            self.held_in(&ns).sessions -= 1;
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

    /// Catalogue keys of the services with instances or a configuration,
    /// of every namespace.
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

    /// The catalogue keys of namespace `ns`'s services with instances or a
    /// configuration.
    pub fn service_names_in<'a>(&'a self, ns: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.service_names()
            .filter(move |k| namespace::holds(ns, k))
    }

    pub fn configs(&self) -> impl Iterator<Item = (&String, &ServiceConfig)> {
        self.configs.iter()
    }

    /// The instances of `service` carrying `tags`; with `healthy_only`, the passing
    /// ones, unless fewer pass than the service's protection threshold (then
    /// all but those in maintenance).
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
        // Instances in maintenance leave every healthy view, even under the
        // protection threshold: an operator took them out.
        let candidates: Vec<&Instance> = candidates
            .into_iter()
            .filter(|i| i.maintenance().is_none())
            .collect();
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
        self.summaries_after(namespace::DEFAULT, None).collect()
    }

    /// Namespace `ns`'s services with instances, in name order, after
    /// `after` (from the first when `None`), named without their namespace:
    /// a page costs its own length (plus a step over each other namespace
    /// for `default`), not the catalogue's.
    pub fn summaries_after<'a>(
        &'a self,
        ns: &'a str,
        after: Option<&str>,
    ) -> impl Iterator<Item = ServiceSummary> + 'a {
        let prefix = match ns {
            namespace::DEFAULT => String::new(),
            ns => format!("{ns}/"),
        };
        let mut cursor = match after {
            Some(name) => Bound::Excluded(format!("{prefix}{name}")),
            None => Bound::Included(prefix.clone()),
        };
        std::iter::from_fn(move || loop {
            let from = cursor.as_ref().map(String::as_str);
            let (key, m) = self
                .services
                .range::<str, _>((from, Bound::Unbounded))
                .next()?;
            let name = if prefix.is_empty() {
                match key.split_once('/') {
                    None => key.as_str(),
                    // Another namespace inside `default`'s range: step over
                    // it ('0' is the character after '/').
                    Some((other, _)) => {
                        cursor = Bound::Included(format!("{other}0"));
                        continue;
                    }
                }
            } else {
                // `None`: past this namespace's keys.
                key.strip_prefix(prefix.as_str())?
            };
            cursor = Bound::Excluded(key.clone());
            return Some(ServiceSummary {
                name: name.to_string(),
                instances: m.len() as u32,
                passing: self.passing.get(key).copied().unwrap_or(0),
            });
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
        if inst.passing() {
            self.count_passing(&inst.service, true);
        }
        let held = inst
            .session()
            .map(|s| (s.to_string(), inst.service.clone()));
        let new_service =
            !self.services.contains_key(&inst.service) && !self.configs.contains_key(&inst.service);
        let in_ns = self.held_mut(&inst.service);
        in_ns.instances += 1;
        in_ns.services += u64::from(new_service);
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
            if !self.configs.contains_key(service) {
                self.held_mut(service).services -= 1;
            }
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
            self.held_mut(&old.service).instances -= 1;
            self.checked -= usize::from(old.check.is_some());
            if old.passing() {
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

    fn put_ns(name: &str, instances: u64, services: u64) -> Command {
        Command::PutNamespace {
            namespace: Namespace {
                name: name.into(),
                quotas: Quotas {
                    instances,
                    services,
                    sessions: 0,
                    watch_streams: 0,
                },
                create_revision: 0,
            },
            max_namespaces: 3,
        }
    }

    fn register(service: &str, id: &str) -> Command {
        Command::Register(Instance::example(service, id))
    }

    fn deregister(service: &str, id: &str) -> Command {
        Command::Deregister {
            service: service.into(),
            id: id.into(),
        }
    }

    #[test]
    fn a_service_s_change_revision_moves_with_its_changes_only() {
        let mut c = Catalog::default();
        c.apply(1, &register("web", "1"));
        c.apply(2, &register("api", "1"));
        assert_eq!((c.changed_at("web"), c.changed_at("api")), (1, 2));
        // A refused command and another service's change leave it.
        c.apply(3, &deregister("web", "nope"));
        assert_eq!(c.changed_at("web"), 1);
        c.apply(
            4,
            &Command::ConfigureService {
                service: "web".into(),
                protect_threshold_pct: 50,
            },
        );
        assert_eq!((c.changed_at("web"), c.changed_at("api")), (4, 2));
        // Its going is a change too.
        c.apply(5, &deregister("api", "1"));
        assert_eq!(c.changed_at("api"), 5);
        // Rebuilt from parts, it knows no better than the revision it has.
        let rebuilt = Catalog::from_parts(5, c.shared_instances().collect::<Vec<_>>(), []);
        assert_eq!((rebuilt.changed_at("web"), rebuilt.changed_at("x")), (5, 5));
        // Churning names do not grow the map: gone ones are folded into the floor.
        for r in 6..3000 {
            let name = format!("churn-{r}");
            c.apply(r, &register(&name, "1"));
            c.apply(r, &deregister(&name, "1"));
        }
        assert!(c.changed.len() < 1100, "{}", c.changed.len());
        assert!(c.changed_at("churn-7") >= 7 && c.changed_at("web") >= 4);
    }

    #[test]
    fn namespaces_hold_their_own_services_within_their_quotas() {
        let mut c = Catalog::default();
        // Not created yet: refused, nothing stored.
        let (r, events) = c.apply(1, &register("a/web", "1"));
        assert_eq!(r.outcome, Outcome::NamespaceNotFound("a".into()));
        assert!(events.is_empty() && c.instance_count() == 0);
        c.apply(2, &put_ns("a", 2, 1));
        c.apply(3, &register("a/web", "1"));
        c.apply(4, &register("web", "1"));
        // Replacing an instance takes no new room.
        assert!(matches!(
            c.apply(5, &register("a/web", "1")).0.outcome,
            Outcome::Registered(_)
        ));
        let refused = |c: &mut Catalog, cmd: &Command| {
            let before = (c.instance_count(), c.usage_of("a"));
            let (r, events) = c.apply(6, cmd);
            assert!(events.is_empty(), "{events:?}");
            assert_eq!((c.instance_count(), c.usage_of("a")), before);
            r.outcome
        };
        let over_services = Outcome::QuotaExceeded {
            namespace: "a".into(),
            quota: Quota::Services,
            limit: 1,
        };
        assert_eq!(refused(&mut c, &register("a/api", "1")), over_services);
        let configure = Command::ConfigureService {
            service: "a/api".into(),
            protect_threshold_pct: 50,
        };
        assert_eq!(refused(&mut c, &configure), over_services);
        c.apply(7, &register("a/web", "2"));
        assert_eq!(
            refused(&mut c, &register("a/web", "3")),
            Outcome::QuotaExceeded {
                namespace: "a".into(),
                quota: Quota::Instances,
                limit: 2,
            }
        );
        let usage = |c: &Catalog, ns| {
            let u = c.usage_of(ns);
            (u.instances, u.services)
        };
        assert_eq!(usage(&c, "a"), (2, 1));
        assert_eq!(usage(&c, namespace::DEFAULT), (1, 1));
        // The cluster's limit counts `default`.
        c.apply(8, &put_ns("b", 0, 0));
        assert_eq!(
            c.apply(9, &put_ns("c", 0, 0)).0.outcome,
            Outcome::TooManyNamespaces { limit: 3 }
        );
        // Raising a quota keeps the create revision.
        let (r, _) = c.apply(10, &put_ns("a", 3, 1));
        assert!(matches!(r.outcome, Outcome::NamespacePut(n) if n.create_revision == 2));
        assert!(matches!(
            c.apply(11, &register("a/web", "3")).0.outcome,
            Outcome::Registered(_)
        ));
    }

    #[test]
    fn listings_keep_to_one_namespace_and_name_services_without_it() {
        let mut c = Catalog::default();
        c.apply(1, &put_ns("a", 0, 0));
        c.apply(2, &put_ns("b", 0, 0));
        for s in ["a/web", "a/zz", "b/web", "api", "web", "zed", "a-x"] {
            c.apply(3, &register(s, "1"));
        }
        let names = |ns: &str, after: Option<&str>| -> Vec<String> {
            c.summaries_after(ns, after).map(|s| s.name).collect()
        };
        assert_eq!(names("default", None), ["a-x", "api", "web", "zed"]);
        assert_eq!(names("default", Some("api")), ["web", "zed"]);
        assert_eq!(names("a", None), ["web", "zz"]);
        assert_eq!(names("a", Some("web")), ["zz"]);
        assert_eq!(names("b", None), ["web"]);
        assert!(names("c", None).is_empty());
        let in_a: Vec<&str> = c.service_names_in("a").collect();
        assert_eq!(in_a, ["a/web", "a/zz"]);
    }

    #[test]
    fn deleting_a_namespace_needs_force_while_it_holds_instances() {
        let mut c = Catalog::default();
        c.apply(1, &put_ns("a", 0, 0));
        c.apply(2, &register("a/web", "1"));
        c.apply(2, &register("a/web", "2"));
        c.apply(2, &register("web", "1"));
        c.apply(
            3,
            &Command::ConfigureService {
                service: "a/api".into(),
                protect_threshold_pct: 10,
            },
        );
        let delete = |force| Command::DeleteNamespace {
            name: "a".into(),
            force,
        };
        let (r, events) = c.apply(4, &delete(false));
        assert_eq!(r.outcome, Outcome::NamespaceNotEmpty { instances: 2 });
        assert!(events.is_empty());
        let (r, events) = c.apply(5, &delete(true));
        assert_eq!(r.outcome, Outcome::NamespaceDeleted { instances: 2 });
        assert_eq!(events.len(), 2);
        assert!(events.iter().all(|e| e.kind == EventKind::Delete));
        assert!(c.namespace("a").is_none() && c.service_names_in("a").next().is_none());
        assert_eq!(c.instance_count(), 1, "default's instance stays");
        assert_eq!(
            c.apply(6, &delete(true)).0.outcome,
            Outcome::NamespaceNotFound("a".into())
        );
    }

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
        let after = |n: Option<&str>| -> Vec<String> {
            c.summaries_after(namespace::DEFAULT, n)
                .map(|s| s.name)
                .collect()
        };
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
                passing: c.instances_of(name).filter(|i| i.passing()).count() as u32,
            })
            .collect()
    }

    #[test]
    fn maintenance_takes_instances_out_of_rotation_and_a_reregistration_keeps_it() {
        let mut c = Catalog::default();
        for id in ["1", "2"] {
            c.apply(1, &Command::Register(Instance::example("a", id)));
        }
        let set = |id: Option<&str>, reason: Option<&str>| Command::SetMaintenance {
            service: "a".into(),
            id: id.map(Into::into),
            reason: reason.map(Into::into),
        };
        let healthy = |c: &Catalog| -> Vec<String> {
            let v = c.view("a", true, &[]);
            v.instances.iter().map(|i| i.id.clone()).collect()
        };
        let (r, ev) = c.apply(2, &set(Some("1"), Some("disk swap")));
        assert_eq!(r.outcome, Outcome::MaintenanceSet(1));
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].instance.maintenance(), Some("disk swap"));
        assert_eq!(ev[0].instance.mod_revision, 2);
        assert_eq!(healthy(&c), ["2"]);
        assert_eq!(c.summaries(), scanned(&c));
        assert_eq!(c.summaries()[0].passing, 1);
        // The instance's own re-registration leaves it in maintenance.
        c.apply(3, &Command::Register(Instance::example("a", "1")));
        assert_eq!(
            c.get("a", "1").and_then(Instance::maintenance),
            Some("disk swap")
        );
        assert_eq!(healthy(&c), ["2"]);
        // Its check keeps running: a status change applies beneath it.
        c.apply(
            4,
            &Command::SetHealth(vec![HealthUpdate {
                service: "a".into(),
                id: "1".into(),
                status: HealthStatus::Critical,
                output: "refused".into(),
                at_ms: 1,
            }]),
        );
        assert_eq!(c.summaries(), scanned(&c));
        let (r, _) = c.apply(5, &set(None, Some("deploy")));
        assert_eq!(r.outcome, Outcome::MaintenanceSet(2), "both changed reason");
        assert!(healthy(&c).is_empty());
        assert_eq!(c.summaries(), scanned(&c));
        let (r, ev) = c.apply(6, &set(None, None));
        assert_eq!(r.outcome, Outcome::MaintenanceSet(2));
        assert!(ev.iter().all(|e| e.instance.maintenance().is_none()));
        assert_eq!(healthy(&c), ["2"], "1 is back, and critical");
        assert_eq!(c.summaries(), scanned(&c));
        let (r, ev) = c.apply(7, &set(None, None));
        assert_eq!((r.outcome, ev.len()), (Outcome::MaintenanceSet(0), 0));
        assert_eq!(
            c.apply(8, &set(Some("9"), Some("x"))).0.outcome,
            Outcome::NotFound
        );
        let other = Command::SetMaintenance {
            service: "b".into(),
            id: None,
            reason: Some("x".into()),
        };
        assert_eq!(c.apply(9, &other).0.outcome, Outcome::NotFound);
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
