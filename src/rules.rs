//! The rules of every public RPC, in one table: the role a token needs, whether
//! only the leader serves it (a follower forwards it), what a failure after
//! sending means, its deadline, how the client may retry it, and its HTTP
//! route where it has one. Authorization (`api::auth`), forwarding
//! (`api::forward`), the HTTP API and the Rust client all read it; a test
//! checks it against the public descriptor set, so an RPC without a row fails.

// The client reads where to send a call and how to retry it; the rest is the server's.
#![cfg_attr(not(feature = "server"), allow(dead_code))]

/// The token role a call needs (`[auth]`); each includes the ones before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    /// No token at all: the ACL bootstrap, which makes the first one.
    Anyone,
    Read,
    Write,
    Admin,
}

/// Which node serves a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Serves {
    /// Any node, from its own copy (or asking the leader itself, as a
    /// linearizable read does): a follower does not forward it.
    Any,
    /// Only the leader: a follower forwards it without asking its own handler,
    /// and the client sends it to the node that last served one itself.
    Leader,
}

/// What a failure after the request was sent means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Nothing changed, or repeating it changes nothing: retry.
    Read,
    /// It may have been applied: the outcome is unknown.
    Write,
}

/// How long the leader may take to answer a forwarded call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deadline {
    /// The node's request timeout.
    Request,
    /// A new member's catch-up, a large catalogue's stream: a minute.
    CatchUp,
}

/// What the Rust client does after an answer that leaves the outcome unknown
/// (`DEADLINE_EXCEEDED`, `ABORTED`, a connection lost mid-call).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retry {
    /// Retries it: repeating it is harmless.
    Safe,
    /// Retries it, and a retry that answers `NOT_FOUND` means the first
    /// attempt removed it: a success.
    AbsentMeansDone,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Rule {
    /// The gRPC path: `/roster.v1.Registry/Register`.
    pub path: &'static str,
    pub access: Access,
    pub serves: Serves,
    pub effect: Effect,
    pub deadline: Deadline,
    pub retry: Retry,
    /// The HTTP/JSON API's method and route for it, if it has one.
    pub http: Option<(&'static str, &'static str)>,
}

use Access::{Admin, Anyone, Read as R, Write as W};
use Deadline::{CatchUp, Request};
use Effect::{Read, Write};
use Retry::{AbsentMeansDone, Safe};
use Serves::{Any, Leader};

const fn rule(
    path: &'static str,
    access: Access,
    serves: Serves,
    effect: Effect,
    deadline: Deadline,
    retry: Retry,
    http: Option<(&'static str, &'static str)>,
) -> Rule {
    Rule {
        path,
        access,
        serves,
        effect,
        deadline,
        retry,
        http,
    }
}

const INSTANCE: &str = "/v1/services/{service}/instances/{id}";

/// Every public RPC. Heartbeat's effect is Read: repeating one changes
/// nothing a client relies on. A follower answers RenewSessions itself,
/// batching renewals to the leader (`api::sessions`).
#[rustfmt::skip]
pub const RULES: &[Rule] = &[
    rule("/roster.v1.Registry/Register", W, Leader, Write, Request, Safe, Some(("PUT", INSTANCE))),
    rule("/roster.v1.Registry/Deregister", W, Leader, Write, Request, AbsentMeansDone, Some(("DELETE", INSTANCE))),
    rule("/roster.v1.Registry/Heartbeat", W, Leader, Read, Request, Safe, Some(("POST", "/v1/services/{service}/instances/{id}/heartbeat"))),
    rule("/roster.v1.Registry/GetService", R, Any, Read, Request, Safe, Some(("GET", "/v1/services/{service}"))),
    rule("/roster.v1.Registry/ListServices", R, Any, Read, Request, Safe, Some(("GET", "/v1/services"))),
    rule("/roster.v1.Registry/Watch", R, Any, Read, Request, Safe, Some(("GET", "/v1/watch/{service}"))),
    rule("/roster.v1.Registry/WatchServices", R, Any, Read, Request, Safe, None),
    rule("/roster.v1.Registry/ConfigureService", W, Leader, Write, Request, Safe, None),
    rule("/roster.v1.Registry/SetMaintenance", W, Leader, Write, Request, Safe, Some(("PUT", "/v1/services/{service}/maintenance"))),
    rule("/roster.v1.Registry/CreateSession", W, Leader, Write, Request, Safe, None),
    rule("/roster.v1.Registry/RenewSessions", W, Any, Read, Request, Safe, None),
    rule("/roster.v1.Registry/CloseSession", W, Leader, Write, Request, Safe, None),
    rule("/roster.v1.Registry/ListSessions", R, Any, Read, Request, Safe, None),
    rule("/roster.v1.Registry/CreateNamespace", Admin, Leader, Write, Request, Safe, None),
    rule("/roster.v1.Registry/ListNamespaces", R, Any, Read, Request, Safe, Some(("GET", "/v1/namespaces"))),
    rule("/roster.v1.Registry/DeleteNamespace", Admin, Leader, Write, Request, AbsentMeansDone, None),
    rule("/roster.v1.Cluster/Status", R, Any, Read, Request, Safe, Some(("GET", "/v1/cluster/status"))),
    rule("/roster.v1.Cluster/AddMember", Admin, Leader, Write, CatchUp, Safe, None),
    rule("/roster.v1.Cluster/RemoveMember", Admin, Leader, Write, Request, Safe, None),
    rule("/roster.v1.Cluster/Snapshot", Admin, Any, Write, Request, Safe, None),
    rule("/roster.v1.Cluster/SaveSnapshot", Admin, Any, Read, CatchUp, Safe, None),
    rule("/roster.v1.Acl/Bootstrap", Anyone, Leader, Write, Request, Safe, None),
    rule("/roster.v1.Acl/CreateToken", Admin, Leader, Write, Request, Safe, None),
    rule("/roster.v1.Acl/ListTokens", Admin, Any, Read, Request, Safe, None),
    rule("/roster.v1.Acl/RevokeToken", Admin, Leader, Write, Request, Safe, None),
];

/// What a path not in the table gets: an admin's token, and forwarding that
/// is never wrong, only more cautious (the handler decides; a failure is an
/// unknown outcome).
pub const UNKNOWN: Rule = rule("", Admin, Any, Write, Request, Safe, None);

/// Services outside `roster.v1` that need a read token: reflection, and xDS
/// (which serves what the token's scope covers).
pub const READ_SERVICES: &[&str] = &[
    "/grpc.reflection.",
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/",
];

/// The rule of the RPC at `path`, or [`UNKNOWN`].
pub fn of(path: &str) -> &'static Rule {
    RULES.iter().find(|r| r.path == path).unwrap_or(&UNKNOWN)
}

/// The HTTP route of the RPC at `path`. Panics on a path without one: the
/// HTTP API names only RPCs the table gives a route (a unit test calls each).
pub fn http_route(path: &str) -> &'static str {
    match of(path).http {
        Some((_, route)) => route,
        None => panic!("{path} has no HTTP route in rules::RULES"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_unique_and_lookups_find_them() {
        for (i, r) in RULES.iter().enumerate() {
            assert!(
                RULES[i + 1..].iter().all(|o| o.path != r.path),
                "{} twice",
                r.path
            );
            assert_eq!(of(r.path), r);
        }
        assert_eq!(of("/roster.v1.Registry/SomethingNew"), &UNKNOWN);
    }

    #[test]
    fn reads_are_served_anywhere_and_retried() {
        for r in RULES.iter().filter(|r| r.access == Access::Read) {
            assert_eq!(
                (r.serves, r.effect, r.retry),
                (Serves::Any, Effect::Read, Retry::Safe),
                "{}",
                r.path
            );
        }
    }

    #[test]
    fn routes_are_named_once_per_method() {
        let routes: Vec<_> = RULES.iter().filter_map(|r| r.http).collect();
        for (i, r) in routes.iter().enumerate() {
            assert!(!routes[i + 1..].contains(r), "{r:?} twice");
        }
        assert_eq!(http_route("/roster.v1.Registry/Register"), INSTANCE);
    }

    /// Every RPC of the public API has a row, and every row an RPC.
    #[cfg(feature = "server")]
    #[test]
    fn every_public_rpc_has_a_rule() {
        use prost::Message;
        let set = prost_types::FileDescriptorSet::decode(crate::proto::PUBLIC_DESCRIPTOR_SET)
            .expect("the public descriptor set");
        let mut public: Vec<String> = set
            .file
            .iter()
            .flat_map(|f| {
                f.service.iter().flat_map(move |s| {
                    s.method
                        .iter()
                        .map(move |m| format!("/{}.{}/{}", f.package(), s.name(), m.name()))
                })
            })
            .collect();
        public.sort();
        let mut ruled: Vec<String> = RULES.iter().map(|r| r.path.to_string()).collect();
        ruled.sort();
        assert_eq!(
            public, ruled,
            "src/rules.rs RULES must hold one row per public RPC"
        );
    }
}
