//! Who may call what. With `[auth] enabled`, `Authorize`, in front of every
//! service but gRPC health, admits a call only with `authorization: Bearer
//! <secret>` naming a token whose role covers the method, and hands the
//! handlers its `Grant`, by which they check the service scope. Tokens are
//! read from the node's own replicated state, so a token created or revoked
//! counts on a node as soon as that node has applied the change. A follower
//! authorizes before it forwards; the leader, receiving the same header,
//! authorizes again.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::HeaderMap;
use ring::digest::{digest, SHA256};
use ring::rand::{SecureRandom, SystemRandom};
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::{Request, Status};
use tower::Service;

use super::BoxFuture;
use crate::error::Error;
use crate::registry::acl::{Role, SecretHash, Token};
use crate::registry::namespace;
use crate::registry::watch::SharedState;
use crate::rules::{self, Access};

pub const AUTHORIZATION: &str = "authorization";

/// The token a call was admitted with: a request extension.
#[derive(Clone, Debug)]
pub struct Grant(Arc<Token>);

impl Grant {
    pub fn accessor(&self) -> &str {
        &self.0.accessor
    }

    pub fn covers(&self, service: &str) -> bool {
        self.0.covers(service)
    }

    pub fn is_admin(&self) -> bool {
        self.0.role == Role::Admin
    }
}

/// The grant a call was admitted with; `None` when auth is off.
pub fn grant<T>(req: &Request<T>) -> Option<Grant> {
    req.extensions().get::<Grant>().cloned()
}

/// The caller's `authorization` header, to pass on to the leader.
pub fn credentials<T>(req: &Request<T>) -> Option<http::HeaderValue> {
    req.metadata()
        .get(AUTHORIZATION)
        .and_then(|v| http::HeaderValue::from_bytes(v.as_bytes()).ok())
}

/// Refuses a call on `service` that the grant's scope does not cover.
pub fn may_use(grant: Option<&Grant>, service: &str) -> Result<(), Status> {
    match grant {
        Some(g) if !g.covers(service) => Err(Error::PermissionDenied(format!(
            "token {} is limited to services {}, not {}",
            g.accessor(),
            scope(g),
            namespace::describe(service)
        ))
        .into()),
        _ => Ok(()),
    }
}

/// Refuses a call on namespace `ns` that the grant reaches no service of.
pub fn may_enter(grant: Option<&Grant>, ns: &str) -> Result<(), Status> {
    match grant {
        Some(g) if !g.0.covers_namespace(ns) => Err(Error::PermissionDenied(format!(
            "token {} is limited to services {}, none of namespace {ns:?}",
            g.accessor(),
            scope(g)
        ))
        .into()),
        _ => Ok(()),
    }
}

fn scope(g: &Grant) -> String {
    if g.0.services.is_empty() {
        "of namespace \"default\"".into()
    } else {
        format!("{:?}", g.0.services)
    }
}

/// The role a method needs ([`rules`]); `None`: no token at all (the
/// bootstrap, which makes the first one).
fn required(path: &str) -> Option<Role> {
    if rules::READ_SERVICES.iter().any(|s| path.starts_with(s)) {
        return Some(Role::Read);
    }
    match rules::of(path).access {
        Access::Anyone => None,
        Access::Read => Some(Role::Read),
        Access::Write => Some(Role::Write),
        Access::Admin => Some(Role::Admin),
    }
}

pub fn hash_secret(secret: &str) -> SecretHash {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, secret.as_bytes()).as_ref());
    out
}

/// `n` random bytes from the system's secure generator, as hex.
pub fn random_hex(n: usize) -> Result<String, Error> {
    let mut bytes = vec![0u8; n];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| Error::Internal("the system's random generator failed".into()))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// What `Authorize` checks against.
struct Gate {
    state: SharedState,
    /// For a service whose clients cannot send a token: the token a call
    /// without one is made with.
    fallback: Fallback,
}

/// What a call without a token gets.
enum Fallback {
    Refused(&'static str),
    Token(SecretHash),
}

const SEND_A_TOKEN: &str = "this cluster requires a token: send `authorization: Bearer <secret>` \
                            (roster --token, ROSTER_TOKEN)";

impl Gate {
    fn admit(&self, path: &str, headers: &HeaderMap) -> Result<Option<Grant>, Error> {
        let Some(role) = required(path) else {
            return Ok(None);
        };
        let secret = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let hash = match (secret, &self.fallback) {
            (Some(secret), _) => hash_secret(secret.trim()),
            (None, Fallback::Token(hash)) => *hash,
            (None, Fallback::Refused(why)) => return Err(Error::Unauthenticated(why.to_string())),
        };
        let token = super::read_state(&self.state, |st| st.catalog.acl().find(&hash).cloned())?;
        let token = token.ok_or_else(|| {
            Error::Unauthenticated(
                "unknown token (revoked, or never created on this cluster)".into(),
            )
        })?;
        if token.role < role {
            return Err(Error::PermissionDenied(format!(
                "token {} has role {:?}; {} needs {role:?}",
                token.accessor,
                token.role,
                path.rsplit('/').next().unwrap_or(path)
            )));
        }
        Ok(Some(Grant(token)))
    }
}

/// Wraps a gRPC service so that only authorized calls reach it.
#[derive(Clone)]
pub struct Authorize<S> {
    inner: S,
    gate: Option<Arc<Gate>>,
}

impl<S> Authorize<S> {
    /// With `enabled` false every call passes, without a grant.
    pub fn new(inner: S, state: SharedState, enabled: bool) -> Self {
        Self::with_fallback(inner, state, enabled, None, SEND_A_TOKEN)
    }

    /// For clients that send no token: a call without one is made with
    /// `token` (a secret's hash), or refused saying `refusal` when there is none.
    pub fn with_fallback(
        inner: S,
        state: SharedState,
        enabled: bool,
        token: Option<SecretHash>,
        refusal: &'static str,
    ) -> Self {
        let fallback = match token {
            Some(hash) => Fallback::Token(hash),
            None => Fallback::Refused(refusal),
        };
        Authorize {
            inner,
            gate: enabled.then(|| Arc::new(Gate { state, fallback })),
        }
    }
}

impl<S: NamedService> NamedService for Authorize<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for Authorize<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let mut inner = super::take_ready(&mut self.inner);
        let Some(gate) = &self.gate else {
            return Box::pin(inner.call(req));
        };
        match gate.admit(req.uri().path(), req.headers()) {
            Ok(grant) => {
                if let Some(g) = grant {
                    req.extensions_mut().insert(g);
                }
                Box::pin(inner.call(req))
            }
            Err(e) => {
                let refused = Status::from(e).into_http();
                Box::pin(async move { Ok(refused) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_method_needs_its_role() {
        let of = |m: &str| required(&format!("/roster.v1.Registry/{m}"));
        assert_eq!(of("GetService"), Some(Role::Read));
        assert_eq!(of("Watch"), Some(Role::Read));
        assert_eq!(of("WatchServices"), Some(Role::Read));
        assert_eq!(of("Register"), Some(Role::Write));
        assert_eq!(of("Heartbeat"), Some(Role::Write));
        assert_eq!(of("ListSessions"), Some(Role::Read));
        for m in ["CreateSession", "RenewSessions", "CloseSession"] {
            assert_eq!(of(m), Some(Role::Write), "{m}");
        }
        assert_eq!(required("/roster.v1.Cluster/AddMember"), Some(Role::Admin));
        // A backup holds every token's hash.
        assert_eq!(
            required("/roster.v1.Cluster/SaveSnapshot"),
            Some(Role::Admin)
        );
        assert_eq!(required("/roster.v1.Acl/CreateToken"), Some(Role::Admin));
        assert_eq!(required("/roster.v1.Acl/Bootstrap"), None);
        assert_eq!(
            required("/roster.v1.Registry/SomethingNew"),
            Some(Role::Admin)
        );
        assert_eq!(
            required("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            Some(Role::Read)
        );
        assert_eq!(
            required(
                "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
            ),
            Some(Role::Read)
        );
    }

    #[test]
    fn secrets_are_kept_as_their_hash() {
        let a = random_hex(32).expect("random");
        assert_eq!(a.len(), 64);
        assert_ne!(a, random_hex(32).expect("random"));
        assert_eq!(hash_secret(&a), hash_secret(&a));
        assert_ne!(hash_secret(&a), hash_secret("other"));
    }
}
