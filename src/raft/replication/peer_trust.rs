//! Who may speak on the peer port. Its mutual TLS proves only that a caller
//! holds a certificate of the cluster CA, as applications' client
//! certificates do. A member's certificate also names its node id, in a URI
//! SAN `urn:roster:node:<id>`. With `[tls]`, [`PeerGate`], in front of every
//! service of the peer port, admits a request only over such a certificate,
//! and, once this node has a membership, only if the node it names is a
//! member (voter or learner); the Raft service then admits a message only if
//! the sender it claims is that node ([`PeerTrust::check_sender`]), so one
//! member cannot speak for another. A pristine node admits any node
//! certificate: the leader adding it dials it before it has a membership.
//! A node that was away while a member was added does not know it, and that
//! member may lead by the time it is back: so a node asks the members it
//! knows about a node certificate it refused, and admits that node for a
//! while once one of them names it a member ([`Vouched`]).
//! Without TLS nothing is checked: whoever reaches the peer port speaks Raft.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use http::Extensions;
use rustls_pki_types::CertificateDer;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::transport::server::TcpConnectInfo;
use tonic::Status;
use tower::Service;

use crate::error::Error;
use crate::peers::{Peers, Reminders};
use crate::raft::rpc::{extra_call, Extra};
use crate::raft::storage::marker::Identity;
use crate::raft::{Node, NodeId, Raft};

/// A node certificate's URI SAN is this and the node id.
pub const NODE_URN: &str = "urn:roster:node:";

/// How long a member's word that a node is a member admits that node.
const VOUCHED_FOR: Duration = Duration::from_secs(10);
/// A node's members are asked about one node at most this often.
const ASK_EVERY: Duration = Duration::from_secs(2);

/// What every refusal says the peer port admits.
const ADMITS: &str = "the peer port admits only members of this cluster: a certificate of \
                      the cluster CA naming a member (URI SAN urn:roster:node:<id>), sending \
                      as that node; node certificates made before Roster checked this lack \
                      the name and must be issued again";

/// What a connection's TLS client certificate says of its holder; the
/// listener puts it on every request of the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerCertificate {
    /// It names this node id, and no other.
    Node(NodeId),
    /// It names no node, or several: known to the log by its serial number.
    NotANode { serial: String },
}

impl PeerCertificate {
    /// Reads a certificate the TLS handshake has verified.
    pub fn of(cert: &CertificateDer<'_>) -> PeerCertificate {
        let Ok(cert) = webpki::EndEntityCert::try_from(cert) else {
            return PeerCertificate::NotANode {
                serial: "(unreadable)".into(),
            };
        };
        let mut ids = cert
            .valid_uri_names()
            .filter_map(|uri| uri.strip_prefix(NODE_URN));
        match (ids.next().map(str::parse::<NodeId>), ids.next()) {
            (Some(Ok(id)), None) if id > 0 => PeerCertificate::Node(id),
            _ => PeerCertificate::NotANode {
                serial: cert.serial().iter().map(|b| format!("{b:02x}")).collect(),
            },
        }
    }
}

/// Why the peer port refused a request: the label of its counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Refusal {
    NoCertificate,
    NotANode,
    NotAMember,
    OtherSender,
}

impl Refusal {
    const ALL: [Refusal; 4] = [
        Refusal::NoCertificate,
        Refusal::NotANode,
        Refusal::NotAMember,
        Refusal::OtherSender,
    ];

    fn label(self) -> &'static str {
        match self {
            Refusal::NoCertificate => "no_certificate",
            Refusal::NotANode => "not_a_node",
            Refusal::NotAMember => "not_a_member",
            Refusal::OtherSender => "other_sender",
        }
    }
}

/// The peer port's refusals: counted by reason, and logged once per peer
/// and reason (again every `REMIND` while it goes on), not per request.
#[derive(Default)]
pub struct PeerRefusals {
    counts: [AtomicU64; Refusal::ALL.len()],
    logged: Reminders<(Refusal, String)>,
}

impl PeerRefusals {
    /// Refusals so far by reason label, for the metrics.
    pub fn counts(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Refusal::ALL
            .into_iter()
            .map(|r| (r.label(), self.counts[r as usize].load(Ordering::Relaxed)))
    }

    /// `peer` names the caller (certificate and address), `what` what is wrong.
    fn refuse(&self, why: Refusal, peer: String, what: &str) -> Status {
        self.counts[why as usize].fetch_add(1, Ordering::Relaxed);
        let message = format!("{what}; {ADMITS}");
        if self.logged.due((why, peer.clone())) {
            tracing::warn!("peer port refused {peer}: {what}");
        }
        match why {
            Refusal::NoCertificate => Error::Unauthenticated(message),
            _ => Error::PermissionDenied(message),
        }
        .into()
    }
}

/// The `Members` request: the asker, a member of the node it asks.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct MembersRequest {
    pub asker: NodeId,
}

/// The ids of the nodes of `raft`'s membership (voters and learners), the
/// answer to a `Members` request.
pub fn members(raft: &Raft) -> Vec<NodeId> {
    let metrics = raft.metrics();
    let m = metrics.borrow();
    m.membership_config
        .membership()
        .nodes()
        .map(|(id, _)| *id)
        .collect()
}

/// Nodes not in this node's membership that one of its members named a
/// member, and when; and when the members were last asked about each.
#[derive(Default)]
struct Vouched {
    by_member: HashMap<NodeId, Instant>,
    asked: HashMap<NodeId, Instant>,
}

/// The checks the peer port's services share.
#[derive(Clone)]
pub struct PeerTrust(Option<Arc<Checks>>);

struct Checks {
    raft: Raft,
    /// This node, and its channels to the members it asks about a stranger.
    me: Identity,
    peers: Peers,
    refusals: Arc<PeerRefusals>,
    vouched: Mutex<Vouched>,
}

impl PeerTrust {
    /// With `tls` false (a plaintext peer port) everything is admitted.
    pub fn new(
        raft: Raft,
        me: Identity,
        peers: Peers,
        refusals: Arc<PeerRefusals>,
        tls: bool,
    ) -> Self {
        PeerTrust(tls.then(|| {
            Arc::new(Checks {
                raft,
                me,
                peers,
                refusals,
                vouched: Mutex::default(),
            })
        }))
    }

    /// `inner` behind the certificate and membership checks.
    pub fn guard<S>(&self, inner: S) -> PeerGate<S> {
        PeerGate {
            inner,
            trust: self.clone(),
        }
    }

    /// A Raft message (the request's `extensions`) claiming to come from
    /// `sender` must come over that node's certificate.
    pub fn check_sender(&self, extensions: &Extensions, sender: NodeId) -> Result<(), Status> {
        let Some(checks) = &self.0 else {
            return Ok(());
        };
        match extensions.get::<PeerCertificate>() {
            Some(PeerCertificate::Node(id)) if *id != sender => Err(checks.refusals.refuse(
                Refusal::OtherSender,
                caller(&format!("node {id}'s certificate"), extensions),
                &format!("a raft message from node {sender} over node {id}'s certificate"),
            )),
            Some(PeerCertificate::Node(_)) => Ok(()),
            // The gate refused these before they got here.
            _ => checks.admit(extensions),
        }
    }
}

/// `certificate` from the caller's address, as the log names a refused peer.
fn caller(certificate: &str, extensions: &Extensions) -> String {
    let from = extensions
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .map_or_else(|| "an unknown address".into(), |a| a.ip().to_string());
    format!("{certificate} from {from}")
}

impl Checks {
    fn admit(self: &Arc<Self>, extensions: &Extensions) -> Result<(), Status> {
        let id = match extensions.get::<PeerCertificate>() {
            None => {
                return Err(self.refusals.refuse(
                    Refusal::NoCertificate,
                    caller("a connection without a certificate", extensions),
                    "no client certificate",
                ))
            }
            Some(PeerCertificate::NotANode { serial }) => {
                return Err(self.refusals.refuse(
                    Refusal::NotANode,
                    caller(&format!("certificate serial {serial}"), extensions),
                    "the client certificate names no node",
                ))
            }
            Some(PeerCertificate::Node(id)) => *id,
        };
        let (pristine, member) = {
            let metrics = self.raft.metrics();
            let m = metrics.borrow();
            let membership = m.membership_config.membership();
            let pristine = membership.nodes().next().is_none();
            (pristine, membership.get_node(&id).is_some())
        };
        if pristine || member || self.vouched_for(id) {
            return Ok(());
        }
        self.ask_about(id);
        Err(self.refusals.refuse(
            Refusal::NotAMember,
            caller(&format!("node {id}'s certificate"), extensions),
            &format!(
                "node {id} is not a member in this node's membership (asking its members \
                 whether it was added)"
            ),
        ))
    }

    fn vouched_for(&self, id: NodeId) -> bool {
        let vouched = self.vouched.lock().unwrap_or_else(|p| p.into_inner());
        vouched
            .by_member
            .get(&id)
            .is_some_and(|t| t.elapsed() < VOUCHED_FOR)
    }

    /// Asks this node's members, one after another, whether `id` is one of
    /// them, unless they were asked just now; the first that says so vouches
    /// for it. Keys are node ids of the CA's node certificates: few.
    fn ask_about(self: &Arc<Self>, id: NodeId) {
        {
            let mut vouched = self.vouched.lock().unwrap_or_else(|p| p.into_inner());
            if vouched
                .asked
                .get(&id)
                .is_some_and(|t| t.elapsed() < ASK_EVERY)
            {
                return;
            }
            vouched.asked.insert(id, Instant::now());
        }
        let checks = self.clone();
        tokio::spawn(async move {
            let others: Vec<(NodeId, Node)> = {
                let metrics = checks.raft.metrics();
                let m = metrics.borrow();
                let membership = m.membership_config.membership();
                membership
                    .nodes()
                    .filter(|(n, _)| **n != checks.me.node_id)
                    .map(|(n, node)| (*n, node.clone()))
                    .collect()
            };
            let ask = MembersRequest {
                asker: checks.me.node_id,
            };
            let timeout = checks.peers.rpc_timeout();
            for (member, node) in others {
                let answer: Result<Vec<NodeId>, String> = extra_call(
                    &checks.peers,
                    &checks.me,
                    &node,
                    Extra::Members,
                    &ask,
                    timeout,
                )
                .await;
                if answer.is_ok_and(|ids| ids.contains(&id)) {
                    tracing::info!(
                        "node {id} is a member in node {member}'s membership, not yet in this \
                         node's: admitted while this node catches up"
                    );
                    let mut vouched = checks.vouched.lock().unwrap_or_else(|p| p.into_inner());
                    vouched.by_member.insert(id, Instant::now());
                    return;
                }
            }
        });
    }
}

/// A service of the peer port, behind [`PeerTrust`]'s checks.
#[derive(Clone)]
pub struct PeerGate<S> {
    inner: S,
    trust: PeerTrust,
}

impl<S: NamedService> NamedService for PeerGate<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for PeerGate<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let admitted = match &self.trust.0 {
            Some(checks) => checks.admit(req.extensions()),
            None => Ok(()),
        };
        match admitted {
            Ok(()) => Box::pin(self.inner.call(req)),
            Err(refused) => {
                let refused = refused.into_http();
                Box::pin(async move { Ok(refused) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, SanType};

    fn cert(uris: &[&str]) -> CertificateDer<'static> {
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("params");
        for uri in uris {
            let uri = uri.to_string().try_into().expect("ASCII");
            params.subject_alt_names.push(SanType::URI(uri));
        }
        let key = KeyPair::generate().expect("key");
        params.self_signed(&key).expect("sign").der().clone()
    }

    #[test]
    fn a_node_certificate_names_one_node() {
        assert_eq!(
            PeerCertificate::of(&cert(&["urn:roster:node:3"])),
            PeerCertificate::Node(3)
        );
        assert_eq!(
            PeerCertificate::of(&cert(&["spiffe://x/y", "urn:roster:node:12"])),
            PeerCertificate::Node(12)
        );
        let not_a_node = |uris: &[&str]| {
            matches!(
                PeerCertificate::of(&cert(uris)),
                PeerCertificate::NotANode { .. }
            )
        };
        assert!(not_a_node(&[]), "no URI");
        assert!(not_a_node(&["urn:roster:node:0"]), "no node 0");
        assert!(not_a_node(&["urn:roster:node:two"]));
        assert!(not_a_node(&["urn:roster:node:1", "urn:roster:node:2"]));
    }

    #[test]
    fn a_refusal_says_what_the_port_admits_and_is_counted() {
        let refusals = PeerRefusals::default();
        let s = refusals.refuse(Refusal::NoCertificate, "p".into(), "no client certificate");
        assert_eq!(s.code(), tonic::Code::Unauthenticated);
        assert!(s.message().contains(ADMITS), "{s:?}");
        let s = refusals.refuse(Refusal::NotAMember, "p".into(), "node 4 is not a member");
        assert_eq!(s.code(), tonic::Code::PermissionDenied);
        refusals.refuse(Refusal::NotAMember, "p".into(), "node 4 is not a member");
        let counts: Vec<_> = refusals.counts().collect();
        assert_eq!(
            counts,
            [
                ("no_certificate", 1),
                ("not_a_node", 0),
                ("not_a_member", 2),
                ("other_sender", 0)
            ]
        );
    }
}
