//! Registry data as it is replicated and stored.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::acl::Token;

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

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub service: String,
    pub id: String,
    pub address: String,
    pub port: u16,
    pub tags: Vec<String>,
    pub metadata: BTreeMap<String, String>,
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

    /// A passing instance at 127.0.0.1:80 with no check, for tests.
    #[cfg(test)]
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
