//! Namespaces: one cluster shared by teams and environments.
//!
//! A namespace is part of a service's name inside the catalogue: `web` of
//! namespace `team-a` is keyed `team-a/web`, and `default`'s services keep
//! their bare names. So every keyed structure (instances, settings, health
//! checks, leases, watch keys) keeps its layout, data written before
//! namespaces is `default`'s as it stands, and a request that names no
//! namespace writes exactly the log entries it wrote before. Neither a
//! namespace nor a service name may hold a `/` (both are DNS labels), so
//! the split is unambiguous. Front-ends qualify names on the way in and
//! split them on the way out: no answer shows a `/` in a service name.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The namespace of every request that names none, and of all data written
/// before namespaces.
pub const DEFAULT: &str = "default";

/// The catalogue's key for `service` of namespace `ns` (empty: `default`).
pub fn qualify(ns: &str, service: &str) -> String {
    if ns.is_empty() || ns == DEFAULT {
        service.to_string()
    } else {
        format!("{ns}/{service}")
    }
}

/// A catalogue key's namespace and service name.
pub fn split(key: &str) -> (&str, &str) {
    key.split_once('/').unwrap_or((DEFAULT, key))
}

/// Where the namespace ends in `key`: 0 for `default`'s (no namespace in
/// it), else the separator's position.
pub fn namespace_end(key: &str) -> usize {
    key.find('/').unwrap_or(0)
}

/// How messages name the service keyed `key`: `"web"`, or `"web" of
/// namespace "team-a"`; never the key itself.
pub fn describe(key: &str) -> String {
    match split(key) {
        (DEFAULT, service) => format!("{service:?}"),
        (ns, service) => format!("{service:?} of namespace {ns:?}"),
    }
}

/// Whether the catalogue key `key` belongs to namespace `ns`.
pub fn holds(ns: &str, key: &str) -> bool {
    split(key).0 == ns
}

/// The most a namespace may hold; 0: no limit. Stored as a map by name, so
/// a quota added later reads old records (as no limit) without a new format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "BTreeMap<String, u64>", from = "BTreeMap<String, u64>")]
pub struct Quotas {
    pub instances: u64,
    pub services: u64,
    pub sessions: u64,
    /// Watch streams on each node (streams are a node's, not replicated).
    pub watch_streams: u64,
}

impl From<Quotas> for BTreeMap<String, u64> {
    fn from(q: Quotas) -> Self {
        Quota::ALL
            .iter()
            .map(|k| (k.name().to_string(), k.of(&q)))
            .filter(|(_, v)| *v > 0)
            .collect()
    }
}

impl From<BTreeMap<String, u64>> for Quotas {
    fn from(m: BTreeMap<String, u64>) -> Self {
        let get = |k: Quota| m.get(k.name()).copied().unwrap_or(0);
        Quotas {
            instances: get(Quota::Instances),
            services: get(Quota::Services),
            sessions: get(Quota::Sessions),
            watch_streams: get(Quota::WatchStreams),
        }
    }
}

/// Which quota a refusal names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Quota {
    Instances,
    Services,
    Sessions,
    WatchStreams,
}

impl Quota {
    pub const ALL: [Quota; 4] = [
        Quota::Instances,
        Quota::Services,
        Quota::Sessions,
        Quota::WatchStreams,
    ];

    /// The name operators set it by (`roster namespace create --max-…`).
    pub fn name(self) -> &'static str {
        match self {
            Quota::Instances => "max_instances",
            Quota::Services => "max_services",
            Quota::Sessions => "max_sessions",
            Quota::WatchStreams => "max_watch_streams",
        }
    }

    pub fn of(self, q: &Quotas) -> u64 {
        match self {
            Quota::Instances => q.instances,
            Quota::Services => q.services,
            Quota::Sessions => q.sessions,
            Quota::WatchStreams => q.watch_streams,
        }
    }
}

/// A namespace as the cluster keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespace {
    pub name: String,
    pub quotas: Quotas,
    pub create_revision: u64,
}

impl Namespace {
    /// `default`, which always exists and has no quotas.
    pub fn default_one() -> Namespace {
        Namespace {
            name: DEFAULT.into(),
            quotas: Quotas::default(),
            create_revision: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_keeps_bare_names_and_others_are_prefixed() {
        assert_eq!(qualify("", "web"), "web");
        assert_eq!(qualify(DEFAULT, "web"), "web");
        assert_eq!(qualify("team-a", "web"), "team-a/web");
        assert_eq!(split("web"), (DEFAULT, "web"));
        assert_eq!(split("team-a/web"), ("team-a", "web"));
        assert!(holds(DEFAULT, "web") && holds("team-a", "team-a/web"));
        assert!(!holds(DEFAULT, "team-a/web") && !holds("team-a", "web"));
    }

    #[test]
    fn quotas_are_stored_by_name_so_later_ones_read_old_records() {
        let q = Quotas {
            instances: 10,
            services: 0,
            sessions: 0,
            watch_streams: 0,
        };
        let bytes = bincode::serialize(&q).expect("encode");
        let map: BTreeMap<String, u64> = bincode::deserialize(&bytes).expect("a map");
        assert_eq!(map.len(), 1, "no limit is not stored: {map:?}");
        assert_eq!(bincode::deserialize::<Quotas>(&bytes).expect("decode"), q);
    }
}
