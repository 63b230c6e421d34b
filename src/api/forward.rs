//! Forwarding to the Raft leader, once for every RPC of the public services.
//!
//! A handler does its work on this node or refuses with `Error::NotLeader`,
//! whose status names the leader (`LEADER_ID_HEADER`). `Forward`, in front of
//! the `Registry` and `Cluster` services on the client port, keeps the
//! request's bytes as the handler reads them; on such a refusal it replays
//! them to the leader's peer port, and relays the leader's answer. The peer
//! port serves the same services without this layer, so a forwarded request
//! is never forwarded again. Handlers hold no forwarding code, and an RPC
//! added later (or a check in front of the handlers) is forwarded the same way.
//!
//! A method only the leader serves (the policy table says which) skips the
//! detour: a follower that knows the leader streams the request straight on,
//! without decoding it, recording it or running the handler.

use std::convert::Infallible;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Uri};
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::Status;
use tower::{Service, ServiceExt};

use super::auth::AUTHORIZATION;
use super::body::{observed, Observer};
use super::cluster::CATCH_UP_TIMEOUT;
use super::BoxFuture;
use crate::error::{Error, LEADER_ID_HEADER};
use crate::grpc::{
    FORWARDED_HEADER, LEADER_ADDRESS_HEADER, LEADER_CONTACT_HEADER, MAX_MESSAGE_BYTES,
};
use crate::peers::{error_chain, Peers};
use crate::proto::v1 as pb;
use crate::proto::v1::cluster_client::ClusterClient;
use crate::proto::v1::registry_client::RegistryClient;
use crate::raft::proposer::{Proposer, Refusal};
use crate::raft::NodeId;
use crate::rules::{self, Deadline, Effect, Serves};

/// Extra time a follower waits for the leader's answer to a forwarded request:
/// the leader answers within its own deadline, and its answer (which knows
/// whether the write was applied) must still travel back.
const FORWARD_MARGIN: Duration = Duration::from_secs(1);

/// How a call is forwarded, by its method.
#[derive(Debug, PartialEq)]
struct Policy {
    /// What a failure after sending means.
    effect: Effect,
    /// How long the leader may take.
    timeout: Duration,
    /// Only the leader serves it, so a follower forwards it without asking its
    /// own handler first.
    leader_only: bool,
}

/// How a call to `path` is forwarded ([`rules`]); `timeout`: the node's request timeout.
fn policy(path: &str, timeout: Duration) -> Policy {
    let rule = rules::of(path);
    Policy {
        effect: rule.effect,
        timeout: match rule.deadline {
            Deadline::Request => timeout,
            Deadline::CatchUp => CATCH_UP_TIMEOUT,
        },
        leader_only: rule.serves == Serves::Leader,
    }
}

/// Wraps a public gRPC service so that a follower forwards what it cannot do.
#[derive(Clone)]
pub struct Forward<S> {
    inner: S,
    relay: Arc<Relay>,
}

struct Relay {
    proposer: Arc<Proposer>,
    peers: Peers,
    /// How long the leader takes at most for a request (its request timeout).
    timeout: Duration,
}

impl<S> Forward<S> {
    pub fn new(inner: S, proposer: Arc<Proposer>, peers: Peers, timeout: Duration) -> Self {
        Forward {
            inner,
            relay: Arc::new(Relay {
                proposer,
                peers,
                timeout,
            }),
        }
    }
}

impl<S: NamedService> NamedService for Forward<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for Forward<S>
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

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let mut inner = super::take_ready(&mut self.inner);
        let relay = self.relay.clone();
        if policy(req.uri().path(), relay.timeout).leader_only {
            if let Some(leader) = relay.elsewhere() {
                return Box::pin(async move { Ok(relay.forward(leader, req).await) });
            }
        }
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let replay = Replay {
                uri: parts.uri.clone(),
                headers: parts.headers.clone(),
                tape: Arc::default(),
            };
            let body = observed(body, Recorder(replay.tape.clone()));
            let answer = inner.call(http::Request::from_parts(parts, body)).await?;
            if !answer.headers().contains_key(LEADER_ID_HEADER) {
                return Ok(relay.stamp(answer));
            }
            Ok(match (relay.elsewhere(), replay.body()) {
                (Some(leader), Some(body)) => {
                    let mut req = http::Request::new(Body::new(http_body_util::Full::new(body)));
                    *req.uri_mut() = replay.uri;
                    *req.headers_mut() = replay.headers;
                    relay.forward(leader, req).await
                }
                // Here, or a request stream the handler did not read to its end:
                // the refusal goes to the client, which retries.
                _ => answer,
            })
        })
    }
}

/// What it takes to send a request again.
struct Replay {
    uri: Uri,
    headers: HeaderMap,
    tape: Arc<Mutex<Tape>>,
}

impl Replay {
    /// The whole request body, if the handler read it to its end.
    fn body(&self) -> Option<Bytes> {
        let tape = self.tape.lock().unwrap_or_else(PoisonError::into_inner);
        if !tape.ended || tape.len > MAX_MESSAGE_BYTES {
            return None;
        }
        Some(match tape.chunks.as_slice() {
            [one] => one.clone(),
            many => many
                .iter()
                .fold(BytesMut::with_capacity(tape.len), |mut all, c| {
                    all.extend_from_slice(c);
                    all
                })
                .freeze(),
        })
    }
}

/// The request body as the handler reads it. Unary and server-streaming calls
/// send one message and end; a longer stream stops being kept past the
/// message size limit.
#[derive(Default)]
struct Tape {
    chunks: Vec<Bytes>,
    len: usize,
    ended: bool,
}

/// Keeps the body in the tape.
struct Recorder(Arc<Mutex<Tape>>);

impl Observer for Recorder {
    fn data(&mut self, data: &Bytes) -> Result<(), Status> {
        let mut tape = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        tape.len += data.len();
        if tape.len <= MAX_MESSAGE_BYTES {
            tape.chunks.push(data.clone());
        } else {
            tape.chunks.clear();
        }
        Ok(())
    }

    fn ended(&mut self) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).ended = true;
    }
}

/// The leader as a follower sees it: its id, peer address and client
/// address (empty until the leader has learned it).
#[derive(Clone, Debug, PartialEq)]
pub struct Leader {
    id: NodeId,
    addr: String,
    client_addr: String,
}

impl Leader {
    /// The leader a refusal names, if it names one this node can reach.
    pub fn named_by(refusal: &Refusal) -> Option<Leader> {
        match refusal {
            Refusal::NotLeader(f) => Some(Leader {
                id: f.leader_id?,
                addr: f.leader_node.as_ref()?.peer_addr.clone(),
                client_addr: f.leader_node.as_ref()?.addr.clone(),
            }),
            Refusal::Failed(_) => None,
        }
    }
}

impl Relay {
    /// Marks an answer this node gave itself while it does not lead with how
    /// stale it may be: the Registry's and Cluster's stale reads, watches and
    /// statuses on the client port all pass here.
    fn stamp(&self, mut answer: http::Response<Body>) -> http::Response<Body> {
        if self.proposer.here().is_ok() {
            return answer;
        }
        let contact = match self.proposer.leader_contact() {
            Some(d) => HeaderValue::from(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            None => HeaderValue::from_static("none"),
        };
        answer.headers_mut().insert(LEADER_CONTACT_HEADER, contact);
        answer
    }

    /// The leader, when this node knows it is another node.
    fn elsewhere(&self) -> Option<Leader> {
        Leader::named_by(&self.proposer.here().err()?)
    }

    /// Sends the request to the leader and relays its answer; transport
    /// failures are said as such, naming the leader.
    async fn forward(&self, leader: Leader, mut req: http::Request<Body>) -> http::Response<Body> {
        let Policy {
            effect, timeout, ..
        } = policy(req.uri().path(), self.timeout);
        mark_forwarded(req.headers_mut(), timeout);
        let sent = async {
            let channel = self
                .peers
                .channel(&leader.addr)
                .map_err(Error::Unavailable)?;
            channel
                .oneshot(req)
                .await
                .map_err(|e| Status::from_error(Box::new(e)))
        };
        match sent.await {
            Ok(mut answer) => {
                // Tells the client to send its writes elsewhere: to the
                // leader's client address if it is one of its endpoints.
                let headers = answer.headers_mut();
                headers.insert(FORWARDED_HEADER, HeaderValue::from(leader.id));
                if let Ok(v) = HeaderValue::from_str(&leader.client_addr) {
                    if !leader.client_addr.is_empty() {
                        headers.insert(LEADER_ADDRESS_HEADER, v);
                    }
                }
                answer
            }
            Err(s) => leader.transport_failure(s, effect).into_http(),
        }
    }
}

/// Gives a forwarded request the time the leader gets to answer.
fn mark_forwarded(headers: &mut HeaderMap, timeout: Duration) {
    // gRPC's timeout header: at most 8 digits and a unit.
    let ms = (timeout + FORWARD_MARGIN).as_millis().min(99_999_999);
    if let Ok(v) = HeaderValue::from_str(&format!("{ms}m")) {
        headers.insert("grpc-timeout", v);
    }
}

/// Calls the leader's `Registry` on behalf of a caller with `credentials`
/// (which the leader checks again): for what a follower asks of the leader
/// itself rather than forwarding a request as it came.
pub async fn ask_leader<M, T, F, Fut>(
    peers: &Peers,
    leader: Leader,
    timeout: Duration,
    credentials: Option<HeaderValue>,
    msg: M,
    call: F,
) -> Result<T, Status>
where
    F: FnOnce(tonic::transport::Channel, tonic::Request<M>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
{
    let channel = peers
        .channel(&leader.addr)
        .map_err(|e| Status::from(Error::Unavailable(e)))?;
    let mut headers = HeaderMap::new();
    mark_forwarded(&mut headers, timeout);
    if let Some(c) = credentials {
        headers.insert(AUTHORIZATION, c);
    }
    let req = tonic::Request::from_parts(
        tonic::metadata::MetadataMap::from_headers(headers),
        tonic::Extensions::default(),
        msg,
    );
    match call(channel, req).await {
        Ok(r) => Ok(r.into_inner()),
        // Both callers only read or renew: safe to retry.
        Err(s) => Err(leader.transport_failure(s, Effect::Read)),
    }
}

/// The cluster's revision, asked of the leader after a read index there
/// (a status call: its cost does not grow with the catalogue).
pub async fn leader_revision(
    peers: &Peers,
    leader: Leader,
    timeout: Duration,
    credentials: Option<HeaderValue>,
) -> Result<u64, Status> {
    let msg = pb::StatusRequest { linearizable: true };
    let r = ask_leader(
        peers,
        leader,
        timeout,
        credentials,
        msg,
        |ch, r| async move { ClusterClient::new(ch).status(r).await },
    )
    .await?;
    Ok(r.revision)
}

/// A Registry client on a peer channel, for calls asked of the leader.
pub fn registry_client(ch: tonic::transport::Channel) -> RegistryClient<tonic::transport::Channel> {
    RegistryClient::new(ch).max_decoding_message_size(MAX_MESSAGE_BYTES)
}

impl Leader {
    fn transport_failure(&self, s: Status, effect: Effect) -> Status {
        if s.code() == tonic::Code::Cancelled
            && s.message() == tonic::TimeoutExpired(()).to_string()
        {
            let what = format!(
                "forwarded to leader {} at {}, no answer in time",
                self.id, self.addr
            );
            return match effect {
                Effect::Read => Error::Unavailable(format!("{what}; retry")),
                Effect::Write => Error::Timeout(format!("{what}; the write may have been applied")),
            }
            .into();
        }
        // The leader's own answers carry no source; transport failures do.
        if std::error::Error::source(&s).is_none() {
            return s;
        }
        let cause = error_chain(&s);
        let what = format!(
            "forwarding to leader {} at {} failed: {cause}",
            self.id, self.addr
        );
        if !sent(&s) {
            // The connection could not be made: the request never left this node.
            Error::Unavailable(format!("{what}; not applied, retry"))
        } else if effect == Effect::Read {
            Error::Unavailable(format!("{what}; retry"))
        } else {
            Error::Interrupted(what)
        }
        .into()
    }
}

/// Whether the request may have reached the peer: only a failure to connect
/// (tonic's `ConnectError` somewhere in the causes) proves it did not.
fn sent(s: &Status) -> bool {
    let mut cause = std::error::Error::source(s);
    while let Some(c) = cause {
        if c.downcast_ref::<tonic::ConnectError>().is_some() {
            return false;
        }
        cause = c.source();
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_membership_changes_have_their_own_policy() {
        let t = Duration::from_secs(3);
        let of = |m| {
            let p = policy(&format!("/roster.v1.Registry/{m}"), t);
            (p.effect, p.timeout, p.leader_only)
        };
        assert_eq!(of("GetService"), (Effect::Read, t, false));
        assert_eq!(of("Watch"), (Effect::Read, t, false));
        assert_eq!(of("Heartbeat"), (Effect::Read, t, true));
        assert_eq!(of("Register"), (Effect::Write, t, true));
        // A follower answers renewals itself, batching them to the leader.
        assert_eq!(of("RenewSessions"), (Effect::Read, t, false));
        assert_eq!(of("CreateSession"), (Effect::Write, t, true));
        assert_eq!(of("CloseSession"), (Effect::Write, t, true));
        // Unknown: the handler decides, and a failure is an unknown outcome.
        assert_eq!(of("SomethingNew"), (Effect::Write, t, false));
        assert_eq!(
            policy("/roster.v1.Cluster/AddMember", t),
            Policy {
                effect: Effect::Write,
                timeout: CATCH_UP_TIMEOUT,
                leader_only: true
            }
        );
    }
}
