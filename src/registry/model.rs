//! Registry data as it is replicated and stored.

use serde::{Deserialize, Serialize};

use super::acl::Token;
use super::namespace::{Namespace, Quota};
use crate::error::Error;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum HealthStatus {
    #[default]
    Passing,
    Warning,
    Critical,
}

/// How the leader decides whether an instance is healthy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CheckKind {
    /// The instance must call `Heartbeat` at least every `ttl_ms`.
    Ttl { ttl_ms: u64 },
    /// A TCP connection to `port` must succeed.
    Tcp { port: u16 },
    /// `GET http://address:port{path}` must answer 2xx.
    Http { port: u16, path: String },
    /// The `grpc.health.v1` check of `service` must answer SERVING.
    Grpc { port: u16, service: String },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckSpec {
    pub kind: CheckKind,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// Consecutive failed probes before a passing instance turns critical.
    pub failures_before_critical: u32,
    /// Consecutive successful probes before a critical instance passes again.
    pub successes_before_passing: u32,
    /// Remove the instance once it has been critical this long; 0: never.
    pub deregister_after_ms: u64,
}

impl CheckSpec {
    /// How long a new leader waits before it may mark this instance critical.
    pub fn grace_ms(&self) -> u64 {
        match self.kind {
            CheckKind::Ttl { ttl_ms } => ttl_ms,
            _ => self.interval_ms,
        }
    }
}

/// An instance's metadata: a map kept as a sorted vector. Most instances
/// carry none or a few keys, and a `BTreeMap` with one entry allocates a
/// whole node (~540 bytes); at a million instances that was half the
/// catalogue. Stored and replicated as a map, like the `BTreeMap` it replaced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Metadata(Vec<(String, String)>);

impl Metadata {
    /// Sorts and deduplicates `pairs` in place.
    fn from_pairs(mut pairs: Vec<(String, String)>) -> Self {
        // Reversed, so that the stable sort puts the last value first and
        // `dedup_by` keeps it.
        pairs.reverse();
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        pairs.dedup_by(|later, kept| later.0 == kept.0);
        pairs.shrink_to_fit();
        Metadata(pairs)
    }

    fn find(&self, key: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| k.as_str().cmp(key))
    }

    pub fn get(&self, key: &str) -> Option<&String> {
        self.find(key).ok().map(|i| &self.0[i].1)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.find(key).is_ok()
    }

    pub fn insert(&mut self, key: String, value: String) -> Option<String> {
        match self.find(&key) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, value)),
            Err(i) => {
                // No spare room: stored instances are rarely changed.
                self.0.reserve_exact(1);
                self.0.insert(i, (key, value));
                None
            }
        }
    }

    pub fn remove(&mut self, key: &str) -> Option<String> {
        let i = self.find(key).ok()?;
        Some(self.0.remove(i).1)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// In key order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

impl FromIterator<(String, String)> for Metadata {
    /// A later value for the same key wins, as in a map.
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Self {
        Metadata::from_pairs(iter.into_iter().collect())
    }
}

impl Serialize for Metadata {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Metadata {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Pairs;
        impl<'de> serde::de::Visitor<'de> for Pairs {
            type Value = Metadata;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map of strings")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Metadata, A::Error> {
                let mut pairs = Vec::with_capacity(a.size_hint().unwrap_or(0));
                while let Some(pair) = a.next_entry()? {
                    pairs.push(pair);
                }
                Ok(Metadata::from_pairs(pairs))
            }
        }
        d.deserialize_map(Pairs)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub service: String,
    pub id: String,
    pub address: String,
    pub port: u16,
    pub tags: Vec<String>,
    pub metadata: Metadata,
    pub weight: u32,
    pub status: HealthStatus,
    pub create_revision: u64,
    pub mod_revision: u64,
    pub check: Option<CheckSpec>,
    /// What the check said at the last status change.
    pub check_output: String,
    /// The leader's wall clock (ms since the epoch) at the last status change.
    pub status_since_ms: u64,
    /// Accessor of the token that registered it (empty without auth).
    pub registered_by: String,
}

impl Instance {
    pub fn has_tags(&self, tags: &[String]) -> bool {
        tags.iter().all(|t| self.tags.contains(t))
    }

    /// The session holding the instance, if any (see [`SESSION_KEY`]).
    pub fn session(&self) -> Option<&str> {
        self.metadata.get(SESSION_KEY).map(String::as_str)
    }

    /// Why the instance is in maintenance, if it is (see [`MAINTENANCE_KEY`]).
    pub fn maintenance(&self) -> Option<&str> {
        self.metadata.get(MAINTENANCE_KEY).map(String::as_str)
    }

    /// In rotation: its check passes and it is not in maintenance. Every
    /// healthy view (queries, DNS, xDS, counts) asks this.
    pub fn passing(&self) -> bool {
        self.status == HealthStatus::Passing && self.maintenance().is_none()
    }

    /// A passing instance at 127.0.0.1:80 with no check, for tests and the simulation.
    #[cfg(any(test, feature = "sim"))]
    pub fn example(service: &str, id: &str) -> Instance {
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
            check: None,
            check_output: String::new(),
            status_since_ms: 0,
            registered_by: String::new(),
        }
    }

    /// `example` with a 1 s TTL check, for tests.
    #[cfg(test)]
    pub fn example_ttl(service: &str, id: &str) -> Instance {
        Instance {
            check: Some(CheckSpec {
                kind: CheckKind::Ttl { ttl_ms: 1_000 },
                interval_ms: 1_000,
                timeout_ms: 1_000,
                failures_before_critical: 1,
                successes_before_passing: 1,
                deregister_after_ms: 0,
            }),
            ..Instance::example(service, id)
        }
    }
}

/// The metadata key naming the session an instance was registered under.
/// Reserved: set by the registry from `RegisterRequest.session`, so every
/// reader of an instance (queries, watches, snapshots) sees its session
/// without a second record, as Nacos reserves `preserved.*` keys.
pub const SESSION_KEY: &str = "roster.session";

/// The metadata key holding why an instance is in maintenance (set by
/// `SetMaintenance`, reserved like [`SESSION_KEY`]). A re-registration keeps
/// it: taking an instance out of rotation is the operator's call, not the
/// instance's.
pub const MAINTENANCE_KEY: &str = "roster.maintenance";

/// What happens to a session's instances when it expires or is closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum OnSessionEnd {
    /// They turn critical (and leave the session).
    #[default]
    Critical,
    /// They are deregistered.
    Deregister,
}

/// A client's lease on any number of instances: one renewal keeps them all;
/// without one for `ttl_ms` the leader ends the session in one Raft entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub id: String,
    /// Free text naming the holder, for operators.
    pub name: String,
    pub ttl_ms: u64,
    pub on_end: OnSessionEnd,
    pub create_revision: u64,
    /// Accessor of the token that created it (empty without auth).
    pub created_by: String,
}

/// A replicated write: the payload of a Raft log entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Creates the instance, or replaces it (keeping its create revision).
    Register(Instance),
    Deregister {
        service: String,
        id: String,
    },
    /// Status transitions decided by the leader's health checks, batched.
    SetHealth(Vec<HealthUpdate>),
    /// Below this percentage of passing instances, healthy-only queries return
    /// every instance rather than overload the few left (0 disables).
    ConfigureService {
        service: String,
        protect_threshold_pct: u32,
    },
    /// Adds a token; `bootstrap` makes the first admin token, once per cluster.
    CreateToken {
        token: Token,
        bootstrap: bool,
    },
    RevokeToken {
        accessor: String,
    },
    /// Opens a session (its id chosen by the leader).
    CreateSession(Session),
    /// Ends sessions, expired (no renewal in time) or closed, and applies
    /// each one's `on_end` to its instances, in this one entry.
    EndSessions {
        ids: Vec<String>,
        expired: bool,
        at_ms: u64,
    },
    /// Creates a namespace, or sets an existing one's quotas; at most
    /// `max_namespaces` (the leader's limit, carried so every node agrees).
    PutNamespace {
        namespace: Namespace,
        max_namespaces: u32,
    },
    /// Deletes a namespace; with instances only if `force`, which
    /// deregisters them and drops its services' settings in this one entry.
    DeleteNamespace {
        name: String,
        force: bool,
    },
    /// Opens a session in a namespace other than `default` (whose sessions
    /// `CreateSession` opens): it holds instances of that namespace only.
    CreateSessionIn {
        namespace: String,
        session: Session,
    },
    /// Puts an instance (`id`), or every instance `service` holds now (no
    /// `id`), into maintenance with `reason`, or out of it (no `reason`).
    SetMaintenance {
        service: String,
        id: Option<String>,
        reason: Option<String>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthUpdate {
    pub service: String,
    pub id: String,
    pub status: HealthStatus,
    pub output: String,
    pub at_ms: u64,
}

/// Per-service settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceConfig {
    pub protect_threshold_pct: u32,
}

/// The payload of one Raft log entry: commands proposed together, applied in
/// order at one revision (the entry's index), like a transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal(pub Vec<Command>);

/// What applying a command did, at which revision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResponse {
    pub revision: u64,
    pub outcome: Outcome,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Registered(Box<Instance>),
    Deregistered,
    NotFound,
    /// How many health updates applied (stale ones are skipped).
    HealthUpdated(usize),
    Configured,
    TokenCreated,
    TokenRevoked,
    /// A bootstrap after the first one: nothing changed.
    AlreadyBootstrapped,
    SessionCreated(Box<Session>),
    /// A registration named a session that does not exist (any more).
    SessionNotFound,
    /// How many of the named sessions ended, and how many instances they held.
    SessionsEnded {
        sessions: usize,
        instances: usize,
    },
    NamespacePut(Box<Namespace>),
    /// How many instances a forced delete deregistered.
    NamespaceDeleted {
        instances: usize,
    },
    /// The write names a namespace that does not exist (any more).
    NamespaceNotFound(String),
    /// A delete without force of a namespace holding instances.
    NamespaceNotEmpty {
        instances: usize,
    },
    TooManyNamespaces {
        limit: u32,
    },
    /// Nothing changed: the write would take `namespace` past a quota.
    QuotaExceeded {
        namespace: String,
        quota: Quota,
        limit: u64,
    },
    /// How many instances entered or left maintenance (0: all were already
    /// where the command put them).
    MaintenanceSet(usize),
}

impl Outcome {
    /// The error a refused write answers with; `None` for an applied one.
    /// The one place a refusal of the state machine's becomes a status.
    pub fn refusal(&self) -> Option<Error> {
        Some(match self {
            Outcome::NamespaceNotFound(ns) => Error::NotFound(format!(
                "namespace {ns:?}: create it first (roster namespace create {ns})"
            )),
            Outcome::NamespaceNotEmpty { instances } => Error::FailedPrecondition(format!(
                "the namespace holds {instances} instances: deregister them, or delete with force"
            )),
            Outcome::TooManyNamespaces { limit } => Error::ResourceExhausted(format!(
                "the cluster holds {limit} namespaces, its limit ([limits] max_namespaces = \
                 {limit}): delete one, or raise the limit on every node"
            )),
            Outcome::QuotaExceeded {
                namespace,
                quota,
                limit,
            } => Error::ResourceExhausted(format!(
                "namespace {namespace:?} is at its quota {} = {limit}: remove some, or raise \
                 it (roster namespace create {namespace} --{} N)",
                quota.name(),
                quota.name().replace('_', "-")
            )),
            _ => return None,
        })
    }

    /// The refusal's error; for an outcome that is none, an internal one
    /// (a caller only asks of what it knows refused).
    pub fn into_error(self) -> Error {
        self.refusal()
            .unwrap_or_else(|| Error::Internal(format!("{self:?} is not a refusal")))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change to one instance. `instance` is the new state for a put, the last one for a delete.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub kind: EventKind,
    pub revision: u64,
    pub instance: Instance,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn metadata_is_stored_as_the_map_it_replaced() {
        let pairs = [("zone", "b"), ("a", "1"), ("zone", "c")].map(|(k, v)| (k.into(), v.into()));
        let md: Metadata = pairs.clone().into_iter().collect();
        let map: BTreeMap<String, String> = pairs.into_iter().collect();
        // Later values win, keys come out in order, as in the map.
        assert_eq!(md.get("zone").map(String::as_str), Some("c"));
        assert_eq!(md.len(), 2);
        assert!(md.iter().eq(map.iter()));
        let bytes = bincode::serialize(&map).expect("encode");
        assert_eq!(bincode::serialize(&md).expect("encode"), bytes);
        let back: Metadata = bincode::deserialize(&bytes).expect("decode");
        assert_eq!(back, md);
        let mut md = back;
        assert_eq!(md.insert("a".into(), "2".into()).as_deref(), Some("1"));
        assert_eq!(md.remove("zone").as_deref(), Some("c"));
        assert!(!md.contains_key("zone"));
    }
}
