//! Sessions: create, renew, close, list. Renewals are the hot path (every
//! client process, every interval), so a follower does not forward each one:
//! it gathers the renewals arriving within a short window, per caller token,
//! sends them to the leader in one call, and answers each caller when the
//! leader has recorded them. The leader keeps renewals in memory
//! (`Leases`); only a session's creation and end go through Raft.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::HeaderValue;
use tokio::sync::oneshot;
use tonic::{Request, Status};

use super::auth::{self, Grant};
use super::convert;
use super::forward::{self, Leader};
use crate::error::Error;
use crate::peers::Peers;
use crate::proto::v1 as pb;
use crate::raft::proposer::Proposer;
use crate::registry::leases::{now_ms, Leases};
use crate::registry::model::{OnSessionEnd, Session};
use crate::registry::namespace;
use crate::registry::validate;
use crate::registry::watch::{RegistryState, SharedState};
use crate::registry::{Command, Outcome};

/// How long a follower gathers renewals before sending them on: short
/// against any TTL (at least 1 s), long enough to batch a busy node's callers.
const BATCH_WINDOW: Duration = Duration::from_millis(20);
/// Ids in one renewal call.
const MAX_RENEW_IDS: usize = 10_000;

pub struct Sessions {
    state: SharedState,
    proposer: Arc<Proposer>,
    leases: Arc<Leases>,
    batches: Arc<Batches>,
}

/// Renewals waiting on a follower to be sent to the leader, by the caller's
/// credentials (the leader authorizes each batch as its callers' token).
struct Batches {
    peers: Peers,
    proposer: Arc<Proposer>,
    pending: Mutex<HashMap<Option<HeaderValue>, Batch>>,
}

/// The leader's answer to a batch: the ids it does not know.
type Answer = Result<Arc<HashSet<String>>, Status>;

#[derive(Default)]
struct Batch {
    ids: BTreeSet<String>,
    waiters: Vec<oneshot::Sender<Answer>>,
}

fn session_to_pb(s: &Session, instances: usize, ns: &str) -> pb::Session {
    pb::Session {
        namespace: convert::namespace_to_pb(ns),
        id: s.id.clone(),
        name: s.name.clone(),
        ttl_ms: u32::try_from(s.ttl_ms).unwrap_or(u32::MAX),
        on_end: match s.on_end {
            OnSessionEnd::Critical => pb::SessionEnd::Critical,
            OnSessionEnd::Deregister => pb::SessionEnd::Deregister,
        } as i32,
        create_revision: s.create_revision,
        instances: u32::try_from(instances).unwrap_or(u32::MAX),
        created_by: s.created_by.clone(),
    }
}

fn on_end_from_pb(v: i32) -> Result<OnSessionEnd, Status> {
    match pb::SessionEnd::try_from(v) {
        Ok(pb::SessionEnd::Critical) => Ok(OnSessionEnd::Critical),
        Ok(pb::SessionEnd::Deregister) => Ok(OnSessionEnd::Deregister),
        Err(_) => Err(Error::InvalidArgument(format!(
            "on_end {v} is not a SessionEnd: 0 (critical) or 1 (deregister)"
        ))
        .into()),
    }
}

pub(super) fn unknown_session(id: &str) -> Status {
    Error::NotFound(format!(
        "session {id:?}: expired or closed; create a new session and register its instances again"
    ))
    .into()
}

impl Sessions {
    pub fn new(
        state: SharedState,
        proposer: Arc<Proposer>,
        peers: Peers,
        leases: Arc<Leases>,
    ) -> Self {
        Sessions {
            batches: Arc::new(Batches {
                peers,
                proposer: proposer.clone(),
                pending: Mutex::default(),
            }),
            state,
            proposer,
            leases,
        }
    }

    fn read<T>(&self, f: impl FnOnce(&RegistryState) -> T) -> Result<T, Status> {
        Ok(super::read_state(&self.state, f)?)
    }

    /// Checks that `session` is open in namespace `ns`, for a registration
    /// under it (the entry checks again when applied): a session of another
    /// namespace is not there for it.
    pub async fn check_open(&self, session: &str, ns: &str) -> Result<(), Status> {
        validate::session_id(session)?;
        let open = |st: &RegistryState| {
            st.catalog.session(session).is_some() && st.catalog.session_namespace(session) == ns
        };
        if !self.read(open)? {
            // A leader may not have applied everything committed yet.
            self.proposer.read_index().await?;
            if !self.read(open)? {
                return Err(unknown_session(session));
            }
        }
        Ok(())
    }

    pub async fn create(
        &self,
        req: Request<pb::CreateSessionRequest>,
    ) -> Result<pb::CreateSessionResponse, Status> {
        let grant = auth::grant(&req);
        let msg = req.into_inner();
        validate::session_name(&msg.name)?;
        self.proposer.here()?;
        let ns =
            super::namespaces::enter(&self.state, &self.proposer, grant.as_ref(), &msg.namespace)
                .await?
                .to_string();
        let session = Session {
            id: auth::random_hex(validate::SESSION_ID_LEN / 2)?,
            name: msg.name,
            ttl_ms: validate::session_ttl(msg.ttl_ms)?,
            on_end: on_end_from_pb(msg.on_end)?,
            create_revision: 0,
            created_by: grant.map(|g| g.accessor().to_string()).unwrap_or_default(),
        };
        // The quota as the entry will judge it: refused here, nothing is logged.
        self.read(|st| st.catalog.admit_session(&ns))?
            .map_err(Outcome::into_error)?;
        let cmd = match ns.as_str() {
            namespace::DEFAULT => Command::CreateSession(session),
            _ => Command::CreateSessionIn {
                namespace: ns.clone(),
                session,
            },
        };
        let r = self.proposer.propose(cmd).await?;
        if let Some(refused) = r.outcome.refusal() {
            return Err(refused.into());
        }
        let Outcome::SessionCreated(s) = r.outcome else {
            return Err(
                Error::Internal(format!("create session applied as {:?}", r.outcome)).into(),
            );
        };
        self.leases.renew_sessions([s.id.as_str()], Instant::now());
        Ok(pb::CreateSessionResponse {
            revision: r.revision,
            session: Some(session_to_pb(&s, 0, &ns)),
        })
    }

    pub async fn renew(
        &self,
        req: Request<pb::RenewSessionsRequest>,
    ) -> Result<pb::RenewSessionsResponse, Status> {
        let credentials = auth::credentials(&req);
        let ids: BTreeSet<String> = req.into_inner().ids.into_iter().collect();
        if ids.len() > MAX_RENEW_IDS {
            return Err(Error::InvalidArgument(format!(
                "{} session ids in one renewal, the limit is {MAX_RENEW_IDS}",
                ids.len()
            ))
            .into());
        }
        for id in &ids {
            validate::session_id(id)?;
        }
        // Answered from this leader's state: it must hold every committed write.
        let unknown = match self.proposer.current().await {
            Ok(()) => self.renew_here(&ids).await?,
            Err(_) => self.batches.clone().renew(&ids, credentials).await?,
        };
        Ok(pb::RenewSessionsResponse {
            unknown: ids.into_iter().filter(|i| unknown.contains(i)).collect(),
        })
    }

    /// On the leader: records the renewal of the open ones among `ids`.
    async fn renew_here(&self, ids: &BTreeSet<String>) -> Result<Arc<HashSet<String>>, Status> {
        let unknown = |st: &RegistryState| -> HashSet<String> {
            ids.iter()
                .filter(|id| st.catalog.session(id).is_none())
                .cloned()
                .collect()
        };
        let mut missing = self.read(unknown)?;
        if !missing.is_empty() {
            // Just elected, the leader may not have applied every committed entry.
            self.proposer.read_index().await?;
            missing = self.read(unknown)?;
        }
        let now = Instant::now();
        self.leases.renew_sessions(
            ids.iter()
                .map(String::as_str)
                .filter(|id| !missing.contains(*id)),
            now,
        );
        Ok(Arc::new(missing))
    }

    pub async fn close(
        &self,
        req: Request<pb::CloseSessionRequest>,
    ) -> Result<pb::CloseSessionResponse, Status> {
        let grant = auth::grant(&req);
        let pb::CloseSessionRequest { id, namespace } = req.into_inner();
        validate::session_id(&id)?;
        let ns = convert::namespace_of(&namespace)?;
        let creator = self.read(|st| {
            st.catalog
                .session(&id)
                .filter(|_| st.catalog.session_namespace(&id) == ns)
                .map(|s| s.created_by.clone())
        })?;
        let creator = creator.ok_or_else(|| unknown_session(&id))?;
        may_close(grant.as_ref(), &creator, &id)?;
        let cmd = Command::EndSessions {
            ids: vec![id.clone()],
            expired: false,
            at_ms: now_ms(),
        };
        let r = self.proposer.propose(cmd).await?;
        match r.outcome {
            Outcome::SessionsEnded {
                sessions: 1,
                instances,
            } => Ok(pb::CloseSessionResponse {
                revision: r.revision,
                instances: u32::try_from(instances).unwrap_or(u32::MAX),
            }),
            _ => Err(unknown_session(&id)),
        }
    }

    /// Namespace `ns`'s sessions.
    pub async fn list(
        &self,
        grant: Option<&Grant>,
        ns: &str,
    ) -> Result<pb::ListSessionsResponse, Status> {
        let ns = super::namespaces::enter(&self.state, &self.proposer, grant, ns).await?;
        self.read(|st| pb::ListSessionsResponse {
            revision: st.catalog.revision(),
            sessions: st
                .catalog
                .sessions()
                .filter(|s| st.catalog.session_namespace(&s.id) == ns)
                .map(|s| session_to_pb(s, st.catalog.session_size(&s.id), ns))
                .collect(),
        })
    }
}

/// Ending a session ends what it holds, possibly instances of services the
/// caller's token does not reach: only its creator or an admin may.
fn may_close(grant: Option<&Grant>, creator: &str, id: &str) -> Result<(), Status> {
    match grant {
        Some(g) if !g.is_admin() && g.accessor() != creator => Err(Error::PermissionDenied(
            format!(
                "session {id} was created by token {creator}; close it with that token or an admin token"
            ),
        )
        .into()),
        _ => Ok(()),
    }
}

impl Batches {
    /// Adds `ids` to the batch of callers with `credentials`, starting the
    /// batch if none is gathering, and waits for the leader's answer.
    async fn renew(
        self: Arc<Self>,
        ids: &BTreeSet<String>,
        credentials: Option<HeaderValue>,
    ) -> Answer {
        let (tx, rx) = oneshot::channel();
        let first = {
            let mut pending = self
                .pending
                .lock()
                .map_err(|_| Error::Internal("renewal batch lock poisoned".into()))?;
            let first = !pending.contains_key(&credentials);
            let batch = pending.entry(credentials.clone()).or_default();
            batch.ids.extend(ids.iter().cloned());
            batch.waiters.push(tx);
            first
        };
        if first {
            tokio::spawn(self.clone().flush(credentials));
        }
        rx.await.unwrap_or_else(|_| {
            Err(Error::Unavailable("renewal batch dropped; retry".into()).into())
        })
    }

    async fn flush(self: Arc<Self>, credentials: Option<HeaderValue>) {
        tokio::time::sleep(BATCH_WINDOW).await;
        let batch = match self.pending.lock() {
            Ok(mut p) => p.remove(&credentials).unwrap_or_default(),
            Err(_) => return,
        };
        let answer = self.send(batch.ids, credentials).await;
        for w in batch.waiters {
            let _ = w.send(answer.clone());
        }
    }

    async fn send(&self, ids: BTreeSet<String>, credentials: Option<HeaderValue>) -> Answer {
        let leader = match self.proposer.here() {
            // Elected while gathering: the caller retries, and this node answers.
            Ok(()) => {
                return Err(Error::Unavailable(
                    "this node just became leader; retry the renewal".into(),
                )
                .into())
            }
            Err(refusal) => Leader::named_by(&refusal).ok_or_else(|| Status::from(refusal))?,
        };
        let msg = pb::RenewSessionsRequest {
            ids: ids.into_iter().collect(),
        };
        let timeout = self.proposer.timeout();
        let r = forward::ask_leader(
            &self.peers,
            leader,
            timeout,
            credentials,
            msg,
            |ch, r| async move { forward::registry_client(ch).renew_sessions(r).await },
        )
        .await?;
        Ok(Arc::new(r.unknown.into_iter().collect()))
    }
}
