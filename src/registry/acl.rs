//! Access control: tokens with a role and an optional service scope, kept by
//! the hash of their secret (the secret itself is never stored).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::namespace;

/// What a token may do. Each role includes the ones before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Role {
    /// GetService, ListServices, Watch, Status.
    Read,
    /// Also Register, Deregister, Heartbeat, ConfigureService.
    Write,
    /// Also membership, snapshots and token management; never scoped.
    Admin,
}

/// The SHA-256 of a token's secret.
pub type SecretHash = [u8; 32];

/// A token as the cluster keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    /// Public id of the token: what revocation names and writes record.
    pub accessor: String,
    pub secret_hash: SecretHash,
    pub role: Role,
    /// Service names or `prefix*` patterns a read or write token is limited
    /// to, of `default`, or of a namespace as `ns/pattern` (`*/pattern`: of
    /// every namespace); empty: every service of `default`.
    pub services: Vec<String>,
    pub description: String,
    pub created_ms: u64,
}

impl Token {
    /// Whether the token reaches the service keyed `key` (namespace::qualify).
    pub fn covers(&self, key: &str) -> bool {
        let (ns, service) = namespace::split(key);
        self.role == Role::Admin
            || (self.services.is_empty() && ns == namespace::DEFAULT)
            || self
                .patterns()
                .any(|(pns, p)| in_scope(pns, ns) && pattern_matches(p, service))
    }

    /// Whether the token reaches any service of namespace `ns`.
    pub fn covers_namespace(&self, ns: &str) -> bool {
        self.role == Role::Admin
            || (self.services.is_empty() && ns == namespace::DEFAULT)
            || self.patterns().any(|(pns, _)| in_scope(pns, ns))
    }

    /// Each pattern's namespace and service pattern.
    fn patterns(&self) -> impl Iterator<Item = (&str, &str)> {
        self.services
            .iter()
            .map(|p| p.split_once('/').unwrap_or((namespace::DEFAULT, p)))
    }
}

fn in_scope(pattern_ns: &str, ns: &str) -> bool {
    pattern_ns == "*" || pattern_ns == ns
}

/// `name` exactly, or a `prefix*` of it.
fn pattern_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

/// The cluster's tokens, shared: a call admitted with one holds it without a copy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Acl {
    by_hash: BTreeMap<SecretHash, Arc<Token>>,
    /// Accessor to secret hash.
    accessors: BTreeMap<String, SecretHash>,
    /// Whether the first admin token was made (`roster acl bootstrap` works once).
    bootstrapped: bool,
}

impl Acl {
    pub fn find(&self, secret_hash: &SecretHash) -> Option<&Arc<Token>> {
        self.by_hash.get(secret_hash)
    }

    pub fn tokens(&self) -> impl Iterator<Item = &Token> {
        self.by_hash.values().map(|t| t.as_ref())
    }

    pub fn bootstrapped(&self) -> bool {
        self.bootstrapped
    }

    pub(super) fn insert(&mut self, token: Token) {
        self.accessors
            .insert(token.accessor.clone(), token.secret_hash);
        self.by_hash.insert(token.secret_hash, Arc::new(token));
    }

    /// Removes the token with `accessor`; false if there is none.
    pub(super) fn revoke(&mut self, accessor: &str) -> bool {
        match self.accessors.remove(accessor) {
            Some(hash) => self.by_hash.remove(&hash).is_some(),
            None => false,
        }
    }

    pub(super) fn set_bootstrapped(&mut self) {
        self.bootstrapped = true;
    }

    /// Rebuilds the table from stored tokens (a snapshot, or the state on disk).
    pub fn restore(tokens: impl IntoIterator<Item = Token>, bootstrapped: bool) -> Acl {
        let mut acl = Acl {
            bootstrapped,
            ..Acl::default()
        };
        for t in tokens {
            acl.insert(t);
        }
        acl
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(role: Role, services: &[&str]) -> Token {
        Token {
            accessor: "a".into(),
            secret_hash: [7; 32],
            role,
            services: services.iter().map(|s| s.to_string()).collect(),
            description: String::new(),
            created_ms: 0,
        }
    }

    #[test]
    fn scopes_are_exact_names_or_prefixes_and_admins_are_never_scoped() {
        let pay = token(Role::Write, &["pay*", "billing-api"]);
        assert!(pay.covers("payments"));
        assert!(pay.covers("pay"));
        assert!(pay.covers("billing-api"));
        assert!(!pay.covers("billing"));
        assert!(!pay.covers("xpay"));
        assert!(token(Role::Read, &[]).covers("anything"));
        // Namespaces: bare patterns and no scope mean `default`.
        assert!(!token(Role::Read, &[]).covers("team-a/web"));
        assert!(!pay.covers("team-a/payments"));
        let a = token(Role::Write, &["team-a/*", "*/shared"]);
        assert!(a.covers("team-a/web") && a.covers("b/shared") && a.covers("shared"));
        assert!(!a.covers("team-b/web") && !a.covers("web"));
        assert!(a.covers_namespace("team-a") && a.covers_namespace("zzz"));
        let only_a = token(Role::Read, &["team-a/pay*"]);
        assert!(only_a.covers_namespace("team-a") && !only_a.covers_namespace("default"));
        assert!(token(Role::Admin, &[]).covers("team-b/x"));
        assert!(token(Role::Admin, &["pay*"]).covers("billing"));
        assert!(Role::Admin > Role::Write && Role::Write > Role::Read);
    }

    #[test]
    fn revoking_removes_the_token_by_its_accessor() {
        let mut acl = Acl::default();
        acl.insert(token(Role::Read, &[]));
        assert!(acl.find(&[7; 32]).is_some());
        assert!(!acl.revoke("other"));
        assert!(acl.revoke("a"));
        assert!(acl.find(&[7; 32]).is_none());
        assert_eq!(acl.tokens().count(), 0);
    }
}
