//! Access control: tokens with a role and an optional service scope, kept by
//! the hash of their secret (the secret itself is never stored).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

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
    /// to; empty: every service.
    pub services: Vec<String>,
    pub description: String,
    pub created_ms: u64,
}

impl Token {
    /// Whether the token reaches `service`.
    pub fn covers(&self, service: &str) -> bool {
        self.role == Role::Admin
            || self.services.is_empty()
            || self.services.iter().any(|p| pattern_matches(p, service))
    }
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
