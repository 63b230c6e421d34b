//! The registry state machine: applies committed entries to the in-memory
//! catalogue and persists the result in sled, so a restart resumes from the
//! last applied entry instead of replaying the log. The current snapshot is
//! a file of its own ([`SnapshotFile`]), durable before openraft may purge the
//! log it covers; a restart finding it ahead of sled's state starts from it.

// Openraft's storage traits fix the error type to its (large) StorageError.
#![allow(clippy::result_large_err)]

use std::io::Cursor;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use openraft::storage::{RaftStateMachine, SnapshotSignature};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, Snapshot, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};

use super::marker::Marker;
use super::snapshot_file::SnapshotFile;
use super::stored::{decode, encode, CodecError};
use super::{trees, Node, NodeId, TypeConfig};
use crate::error::Error;
use crate::registry::acl::{Acl, Token};
use crate::registry::model::{ServiceConfig, Session};
use crate::registry::watch::{RegistryState, SharedState, WatchHub};
use crate::registry::{
    Catalog, Command, CommandResponse, Event, EventKind, Instance, Outcome, Proposal,
};

type StorageResult<T> = Result<T, StorageError<NodeId>>;

/// Instance keys are `i:<service>\0<id>`, service settings `s:<service>`;
/// state machine metadata keys start with `m:`.
const INSTANCE_PREFIX: &[u8] = b"i:";
const SERVICE_PREFIX: &[u8] = b"s:";
/// Tokens are `t:<accessor>`; whether the ACL was bootstrapped, `m:acl_bootstrapped`.
const TOKEN_PREFIX: &[u8] = b"t:";
/// Open sessions are `x:<id>` (their instances name them in their metadata).
const SESSION_PREFIX: &[u8] = b"x:";
const ACL_BOOTSTRAPPED: &[u8] = b"m:acl_bootstrapped";
const LAST_APPLIED: &[u8] = b"m:last_applied";
const MEMBERSHIP: &[u8] = b"m:membership";
/// Where storage format 2 kept the current snapshot (see [`migrate_snapshot`]).
const SLED_SNAPSHOT: &[u8] = b"m:snapshot";

fn instance_key(service: &str, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(INSTANCE_PREFIX.len() + service.len() + 1 + id.len());
    k.extend_from_slice(INSTANCE_PREFIX);
    k.extend_from_slice(service.as_bytes());
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

fn service_key(service: &str) -> Vec<u8> {
    [SERVICE_PREFIX, service.as_bytes()].concat()
}

fn token_key(accessor: &str) -> Vec<u8> {
    [TOKEN_PREFIX, accessor.as_bytes()].concat()
}

fn session_key(id: &str) -> Vec<u8> {
    [SESSION_PREFIX, id.as_bytes()].concat()
}

#[derive(Clone, Default, Serialize, Deserialize)]
struct Applied {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Node>,
}

/// What a snapshot holds: the whole catalogue and the tokens, plus the Raft
/// position it reflects.
#[derive(Serialize, Deserialize)]
struct SnapshotPayload {
    applied: Applied,
    instances: Vec<Instance>,
    services: Vec<(String, ServiceConfig)>,
    tokens: Vec<Token>,
    acl_bootstrapped: bool,
    sessions: Vec<Session>,
}

/// A snapshot as storage format 3 wrote it: before sessions.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct SnapshotPayloadV3 {
    applied: Applied,
    instances: Vec<Instance>,
    services: Vec<(String, ServiceConfig)>,
    tokens: Vec<Token>,
    acl_bootstrapped: bool,
}

impl SnapshotPayload {
    /// The catalogue the payload describes, as of `revision`.
    fn catalog(self, revision: u64) -> Catalog {
        Catalog::from_parts(revision, self.instances, self.services)
            .with_acl(Acl::restore(self.tokens, self.acl_bootstrapped))
            .with_sessions(self.sessions)
    }

    /// Decodes a payload of this format or of format 3 (a backup taken, or a
    /// snapshot sent by a leader, before the upgrade). The checksum rules out
    /// damage, so a record too short for this layout is the older one.
    fn decode(data: &[u8]) -> Result<Self, CodecError> {
        decode(data).or_else(|e| {
            let old: SnapshotPayloadV3 = decode(data).map_err(|_| e)?;
            Ok(SnapshotPayload {
                applied: old.applied,
                instances: old.instances,
                services: old.services,
                tokens: old.tokens,
                acl_bootstrapped: old.acl_bootstrapped,
                sessions: Vec::new(),
            })
        })
    }
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, Node>,
    data: Vec<u8>,
}

/// A snapshot file's content (a backup's), verified: what `roster snapshot
/// inspect` shows and what a restore seeds.
pub struct SnapshotSummary {
    /// The revision (last applied log index) the state is as of.
    pub revision: u64,
    pub instances: usize,
    /// Names with instances or settings.
    pub services: usize,
    pub tokens: usize,
    pub sessions: usize,
    /// The encoded state, as a snapshot carries it.
    data: Vec<u8>,
}

impl SnapshotSummary {
    /// Reads and verifies the bytes of a snapshot file; `path` names them in errors.
    pub fn read(bytes: &[u8], path: &Path) -> crate::error::Result<Self> {
        let bad = |e: &dyn std::fmt::Display| Error::InvalidArgument(e.to_string());
        let snap: StoredSnapshot = SnapshotFile::decode(bytes, path).map_err(|e| bad(&e))?;
        let payload = SnapshotPayload::decode(&snap.data).map_err(|e| {
            bad(&format!(
                "{}: the state inside is damaged: {e}",
                path.display()
            ))
        })?;
        let names: std::collections::BTreeSet<&str> = payload
            .instances
            .iter()
            .map(|i| i.service.as_str())
            .chain(payload.services.iter().map(|(n, _)| n.as_str()))
            .collect();
        Ok(SnapshotSummary {
            revision: snap.meta.last_log_id.map_or(0, |l| l.index),
            instances: payload.instances.len(),
            services: names.len(),
            tokens: payload.tokens.len(),
            sessions: payload.sessions.len(),
            data: snap.data,
        })
    }
}

/// Storage format 2 to 3: moves the current snapshot out of sled into its
/// file. The file is durable before the key is removed, so a crash in between
/// only repeats the move at the next start.
pub fn migrate_snapshot(db: &sled::Db, dir: &Path) -> crate::error::Result<()> {
    let sm = db.open_tree(trees::STATE_MACHINE)?;
    if let Some(b) = sm.get(SLED_SNAPSHOT)? {
        let snap: StoredSnapshot = decode(&b).map_err(damaged("snapshot"))?;
        SnapshotFile::in_dir(dir)
            .write(&snap)
            .map_err(|e| Error::Storage(e.to_string()))?;
        sm.remove(SLED_SNAPSHOT)?;
    }
    Ok(())
}

/// The last applied log index on disk, read at start before the state is loaded.
pub fn applied_index(db: &sled::Db) -> crate::error::Result<Option<u64>> {
    let sm = db.open_tree(trees::STATE_MACHINE)?;
    let last: Option<Option<LogId<NodeId>>> = sm
        .get(LAST_APPLIED)?
        .map(|b| decode(&b))
        .transpose()
        .map_err(damaged("last applied id"))?;
    Ok(last.flatten().map(|l| l.index))
}

#[derive(Clone)]
pub struct StateMachine {
    sm: sled::Tree,
    state: SharedState,
    /// Held from a change of `state` until sled holds that change too (taken
    /// before `state`'s lock, released after it): whoever holds it finds
    /// `state`, this and sled describing the same entry. Disk writes happen
    /// under this lock only, so readers of `state` never wait for them.
    applied: Arc<Mutex<Applied>>,
    /// Held while a snapshot is built or installed (taken before `applied`),
    /// so that a snapshot built from an older copy never replaces one
    /// installed meanwhile.
    snapshots: Arc<Mutex<()>>,
    file: Arc<SnapshotFile>,
    marker: Arc<Marker>,
}

/// A record of the state machine tree that fails its checksum or does not decode.
fn damaged(what: impl std::fmt::Display) -> impl FnOnce(CodecError) -> Error {
    move |e| Error::Storage(format!("state machine {what}: {e}"))
}

impl StateMachine {
    /// Loads the whole state, verifying every record's checksum, from sled or
    /// from the snapshot file in `dir` if that reaches further.
    pub fn open(
        db: &sled::Db,
        dir: &Path,
        watch_history: usize,
        marker: Arc<Marker>,
    ) -> crate::error::Result<Self> {
        let sm = db.open_tree(trees::STATE_MACHINE)?;
        let applied: Applied = match sm.get(LAST_APPLIED)? {
            Some(b) => Applied {
                last_applied: decode(&b).map_err(damaged("last applied id"))?,
                membership: sm
                    .get(MEMBERSHIP)?
                    .map(|b| decode(&b))
                    .transpose()
                    .map_err(damaged("membership"))?
                    .unwrap_or_default(),
            },
            None => Applied::default(),
        };
        let mut instances = Vec::new();
        for kv in sm.scan_prefix(INSTANCE_PREFIX) {
            let (k, v) = kv?;
            let key = String::from_utf8_lossy(&k).replace('\0', "/");
            instances.push(decode(&v).map_err(damaged(format!("instance {key}")))?);
        }
        let mut services = Vec::new();
        for kv in sm.scan_prefix(SERVICE_PREFIX) {
            let (k, v) = kv?;
            let name = String::from_utf8_lossy(&k[SERVICE_PREFIX.len()..]).into_owned();
            let config = decode(&v).map_err(damaged(format!("service {name}")))?;
            services.push((name, config));
        }
        let mut tokens = Vec::new();
        for kv in sm.scan_prefix(TOKEN_PREFIX) {
            let (k, v) = kv?;
            let accessor = String::from_utf8_lossy(&k[TOKEN_PREFIX.len()..]).into_owned();
            tokens.push(decode(&v).map_err(damaged(format!("token {accessor}")))?);
        }
        let acl_bootstrapped = match sm.get(ACL_BOOTSTRAPPED)? {
            Some(b) => decode(&b).map_err(damaged("ACL bootstrap flag"))?,
            None => false,
        };
        let mut sessions = Vec::new();
        for kv in sm.scan_prefix(SESSION_PREFIX) {
            let (k, v) = kv?;
            let id = String::from_utf8_lossy(&k[SESSION_PREFIX.len()..]).into_owned();
            sessions.push(decode(&v).map_err(damaged(format!("session {id}")))?);
        }
        let file = Arc::new(SnapshotFile::in_dir(dir));
        let snapshot: Option<StoredSnapshot> =
            file.read().map_err(|e| Error::Storage(e.to_string()))?;
        let revision = applied.last_applied.map_or(0, |l| l.index);
        let state = Arc::new(RwLock::new(RegistryState {
            catalog: Catalog::from_parts(revision, instances, services)
                .with_acl(Acl::restore(tokens, acl_bootstrapped))
                .with_sessions(sessions),
            hub: WatchHub::new(revision, watch_history),
        }));
        let last_applied = applied.last_applied;
        let sm = StateMachine {
            sm,
            state,
            applied: Arc::new(Mutex::new(applied)),
            snapshots: Arc::default(),
            file,
            marker,
        };
        // The snapshot was installed or built, the log it covers maybe purged,
        // but sled's copy of the state had not reached the disk.
        if let Some(snap) = snapshot.filter(|s| s.meta.last_log_id > last_applied) {
            tracing::info!(snapshot = %snap.meta.snapshot_id, "starting from the snapshot file");
            sm.install(&snap.meta, &snap.data)
                .map_err(|e| Error::Storage(format!("snapshot file: {e}")))?;
        }
        Ok(sm)
    }

    /// The catalogue and watch hub, shared with the API.
    pub fn state(&self) -> SharedState {
        self.state.clone()
    }

    fn read_snapshot(&self) -> StorageResult<Option<StoredSnapshot>> {
        self.file
            .read()
            .map_err(|e| StorageIOError::read_snapshot(None, &e).into())
    }

    /// Copies the catalogue and stores the copy as the current snapshot.
    /// Openraft builds snapshots concurrently with applying and installing.
    /// `applied` is held only while the catalogue is copied, so the copy and
    /// its position agree and applies wait for the copy alone, not for its
    /// encoding and storing; `snapshots` keeps an installed snapshot from
    /// being overwritten by this older one.
    fn store_copy(&self) -> StorageResult<StoredSnapshot> {
        let _building = self.snapshots.lock().map_err(read_lock_err)?;
        let stored = self.copy()?;
        self.store_snapshot(&stored)?;
        Ok(stored)
    }

    /// The catalogue and tokens as of the last applied entry, encoded.
    fn copy(&self) -> StorageResult<StoredSnapshot> {
        let payload = {
            let applied = self.applied.lock().map_err(read_lock_err)?.clone();
            let st = self.state.read().map_err(read_lock_err)?;
            SnapshotPayload {
                applied,
                instances: st.catalog.all_instances().cloned().collect(),
                services: st
                    .catalog
                    .configs()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                tokens: st.catalog.acl().tokens().cloned().collect(),
                acl_bootstrapped: st.catalog.acl().bootstrapped(),
                sessions: st.catalog.sessions().cloned().collect(),
            }
        };
        let data = encode(&payload).map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        Ok(StoredSnapshot {
            meta: snapshot_meta(payload.applied),
            data,
        })
    }

    /// A copy of the whole state as of the last applied entry, as the bytes
    /// of a snapshot file: a backup.
    pub fn backup(&self) -> crate::error::Result<Vec<u8>> {
        let snap = self
            .copy()
            .map_err(|e| Error::Storage(format!("backup: {e}")))?;
        SnapshotFile::encode(&snap).map_err(|e| Error::Storage(format!("backup: {e}")))
    }

    /// Makes this (new, empty) state machine hold a backup's state at the
    /// backup's revision, as the first state of a cluster of `membership`.
    /// The log position gets term 0, below any term the new cluster elects
    /// in. Returns that position.
    pub async fn seed(
        &mut self,
        backup: &SnapshotSummary,
        membership: openraft::Membership<NodeId, Node>,
    ) -> crate::error::Result<LogId<NodeId>> {
        let at = LogId::new(openraft::CommittedLeaderId::new(0, 0), backup.revision);
        self.install_at(at, membership, backup.data.clone()).await?;
        Ok(at)
    }

    /// Keeps the state as it is but makes `membership` the one it was
    /// reached with, at log position `at` (a lost quorum's recovery: the
    /// survivor alone, at its last entry).
    pub async fn reseat(
        &mut self,
        at: LogId<NodeId>,
        membership: openraft::Membership<NodeId, Node>,
    ) -> crate::error::Result<()> {
        let data = self
            .copy()
            .map_err(|e| Error::Storage(format!("copying the state: {e}")))?
            .data;
        self.install_at(at, membership, data).await
    }

    /// Installs `data` as a snapshot at `at` with `membership`: the state in
    /// memory and in sled, and the snapshot file a lagging member is sent.
    async fn install_at(
        &mut self,
        at: LogId<NodeId>,
        membership: openraft::Membership<NodeId, Node>,
        data: Vec<u8>,
    ) -> crate::error::Result<()> {
        let meta = SnapshotMeta {
            last_log_id: Some(at),
            last_membership: StoredMembership::new(Some(at), membership),
            snapshot_id: format!("seeded-{}-{}", at.leader_id.term, at.index),
        };
        self.install_snapshot(&meta, Box::new(Cursor::new(data)))
            .await
            .map_err(|e| Error::Storage(format!("installing the state: {e}")))
    }

    /// Writes `snap` as the current snapshot, durably: openraft may purge the
    /// log up to a snapshot as soon as it is built or installed.
    fn store_snapshot(&self, snap: &StoredSnapshot) -> StorageResult<()> {
        self.file
            .write(snap)
            .map_err(|e| StorageIOError::write_snapshot(Some(snap.meta.signature()), &e).into())
    }

    /// Replaces the state in memory and in sled with the snapshot's (sled's
    /// copy is made durable by the log's next flush; until then a restart
    /// starts from the snapshot file again).
    fn install(&self, meta: &SnapshotMeta<NodeId, Node>, data: &[u8]) -> StorageResult<()> {
        let sig = Some(meta.signature());
        let payload = SnapshotPayload::decode(data)
            .map_err(|e| StorageIOError::read_snapshot(sig.clone(), &e))?;
        let revision = meta.last_log_id.map_or(0, |l| l.index);
        let installed = Applied {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
        };
        let batch = self.snapshot_batch(&payload, &installed, &sig)?;
        let catalog = payload.catalog(revision);
        let replaced = {
            let mut applied = self.applied.lock().map_err(write_lock_err)?;
            self.sm
                .apply_batch(batch)
                .map_err(|e| StorageIOError::write_snapshot(sig.clone(), &e))?;
            self.marker
                .note(|p| p.applied = p.applied.max(meta.last_log_id.map(|l| l.index)));
            let mut st = self.state.write().map_err(write_lock_err)?;
            st.hub.reset(revision);
            *applied = installed;
            std::mem::replace(&mut st.catalog, catalog)
        };
        // Dropped outside the locks: freeing a large catalogue takes a while.
        drop(replaced);
        Ok(())
    }

    /// Applies one entry to the catalogue and `applied`, staging in `batch` what
    /// it changed; returns its responses and its events (none for an entry that
    /// changed no instance).
    fn apply_entry(
        st: &mut RegistryState,
        applied: &mut Applied,
        batch: &mut sled::Batch,
        entry: Entry<TypeConfig>,
    ) -> StorageResult<(Vec<CommandResponse>, Vec<Event>)> {
        let rev = entry.log_id.index;
        applied.last_applied = Some(entry.log_id);
        match entry.payload {
            EntryPayload::Normal(proposal) => {
                return Self::apply_proposal(&mut st.catalog, rev, &proposal, batch)
                    .map_err(|e| StorageIOError::apply(entry.log_id, &e).into());
            }
            EntryPayload::Membership(m) => {
                applied.membership = StoredMembership::new(Some(entry.log_id), m);
            }
            EntryPayload::Blank => {}
        }
        st.catalog.advance(rev);
        Ok((Vec::new(), Vec::new()))
    }

    /// Runs a proposal's commands as the entry at `rev`, staging the service
    /// settings and instances they changed.
    fn apply_proposal(
        catalog: &mut Catalog,
        rev: u64,
        proposal: &Proposal,
        batch: &mut sled::Batch,
    ) -> Result<(Vec<CommandResponse>, Vec<Event>), CodecError> {
        let mut events = Vec::new();
        let mut responses = Vec::with_capacity(proposal.0.len());
        for cmd in &proposal.0 {
            let (resp, evs) = catalog.apply(rev, cmd);
            events.extend(evs);
            match cmd {
                Command::ConfigureService { service, .. } => {
                    batch.insert(service_key(service), encode(&catalog.config(service))?);
                }
                Command::CreateToken { token, bootstrap }
                    if resp.outcome == Outcome::TokenCreated =>
                {
                    batch.insert(token_key(&token.accessor), encode(token)?);
                    if *bootstrap {
                        batch.insert(ACL_BOOTSTRAPPED, encode(&true)?);
                    }
                }
                Command::RevokeToken { accessor } => batch.remove(token_key(accessor)),
                Command::CreateSession(spec) => {
                    if let Some(session) = catalog.session(&spec.id) {
                        batch.insert(session_key(&spec.id), encode(session)?);
                    }
                }
                Command::EndSessions { ids, .. } => {
                    for id in ids {
                        batch.remove(session_key(id));
                    }
                }
                _ => {}
            }
            responses.push(resp);
        }
        for e in &events {
            let k = instance_key(&e.instance.service, &e.instance.id);
            match e.kind {
                EventKind::Put => batch.insert(k, encode(&e.instance)?),
                EventKind::Delete => batch.remove(k),
            }
        }
        Ok((responses, events))
    }

    /// A batch replacing every instance and service setting with a snapshot's.
    fn snapshot_batch(
        &self,
        payload: &SnapshotPayload,
        applied: &Applied,
        sig: &Option<SnapshotSignature<NodeId>>,
    ) -> StorageResult<sled::Batch> {
        let werr = |e: &(dyn std::error::Error + 'static)| {
            StorageIOError::write_snapshot(sig.clone(), &std::io::Error::other(e.to_string()))
        };
        let mut batch = sled::Batch::default();
        for kv in self
            .sm
            .scan_prefix(INSTANCE_PREFIX)
            .chain(self.sm.scan_prefix(SERVICE_PREFIX))
            .chain(self.sm.scan_prefix(TOKEN_PREFIX))
            .chain(self.sm.scan_prefix(SESSION_PREFIX))
        {
            batch.remove(kv.map_err(|e| werr(&e))?.0);
        }
        for t in &payload.tokens {
            batch.insert(token_key(&t.accessor), encode(t).map_err(|e| werr(&e))?);
        }
        batch.insert(
            ACL_BOOTSTRAPPED,
            encode(&payload.acl_bootstrapped).map_err(|e| werr(&e))?,
        );
        for session in &payload.sessions {
            let v = encode(session).map_err(|e| werr(&e))?;
            batch.insert(session_key(&session.id), v);
        }
        for (name, config) in &payload.services {
            batch.insert(service_key(name), encode(config).map_err(|e| werr(&e))?);
        }
        for i in &payload.instances {
            let v = encode(i).map_err(|e| werr(&e))?;
            batch.insert(instance_key(&i.service, &i.id), v);
        }
        stage_applied(&mut batch, applied).map_err(|e| werr(&e))?;
        Ok(batch)
    }
}

/// Stages the last applied id and membership, written with the changes they cover.
fn stage_applied(batch: &mut sled::Batch, applied: &Applied) -> Result<(), CodecError> {
    batch.insert(LAST_APPLIED, encode(&applied.last_applied)?);
    batch.insert(MEMBERSHIP, encode(&applied.membership)?);
    Ok(())
}

/// A poisoned lock (a panic while it was held) met while reading the state.
fn read_lock_err<T>(_: T) -> StorageError<NodeId> {
    StorageIOError::read_state_machine(&std::io::Error::other("state lock poisoned")).into()
}

/// A poisoned lock met while applying entries or installing a snapshot.
fn write_lock_err<T>(_: T) -> StorageError<NodeId> {
    StorageIOError::write_state_machine(&std::io::Error::other("state lock poisoned")).into()
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        // Copying, encoding and storing a large catalogue takes a while: on a
        // blocking thread, so that the runtime's threads go on replicating and
        // answering meanwhile.
        let sm = self.clone();
        let stored = tokio::task::spawn_blocking(move || sm.store_copy())
            .await
            .map_err(|e| StorageIOError::write_snapshot(None, &e))??;
        Ok(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        })
    }
}

/// A snapshot's metadata: the position it reflects, named after its last log id.
fn snapshot_meta(applied: Applied) -> SnapshotMeta<NodeId, Node> {
    let last = applied.last_applied;
    SnapshotMeta {
        last_log_id: last,
        last_membership: applied.membership,
        snapshot_id: match last {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.leader_id.node_id, l.index),
            None => "empty".to_string(),
        },
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> StorageResult<(Option<LogId<NodeId>>, StoredMembership<NodeId, Node>)> {
        let a = self.applied.lock().map_err(read_lock_err)?;
        Ok((a.last_applied, a.membership.clone()))
    }

    /// The catalogue changes and the watch events are published under the
    /// state's write lock, the sled batch is written after it is released;
    /// `applied` stays held until sled has the batch.
    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<Vec<CommandResponse>>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut applied = self.applied.lock().map_err(write_lock_err)?;
        let mut batch = sled::Batch::default();
        let mut responses = Vec::new();
        {
            let mut st = self.state.write().map_err(write_lock_err)?;
            let mut changes = Vec::new();
            for entry in entries {
                let rev = entry.log_id.index;
                let (resps, events) = Self::apply_entry(&mut st, &mut applied, &mut batch, entry)?;
                responses.push(resps);
                if !events.is_empty() {
                    changes.push((rev, events));
                }
            }
            // Under the same lock as the catalogue changes: a watch starting in
            // between would otherwise get a change both in its state and as an event.
            for (rev, events) in changes {
                st.hub.publish(rev, events);
            }
        }
        let werr = |e: &(dyn std::error::Error + 'static)| {
            StorageIOError::write_state_machine(&std::io::Error::other(e.to_string()))
        };
        stage_applied(&mut batch, &applied).map_err(|e| werr(&e))?;
        self.sm.apply_batch(batch).map_err(|e| werr(&e))?;
        let index = applied.last_applied.map(|l| l.index);
        self.marker.note(|p| p.applied = p.applied.max(index));
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Node>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        // The file first: once it is durable, a crash at any later point
        // restarts from it. On a blocking thread, as writing and fsyncing a
        // large snapshot takes a while.
        let sm = self.clone();
        let snap = StoredSnapshot {
            meta: meta.clone(),
            data: snapshot.into_inner(),
        };
        tokio::task::spawn_blocking(move || {
            let _installing = sm.snapshots.lock().map_err(write_lock_err)?;
            sm.store_snapshot(&snap)?;
            sm.install(&snap.meta, &snap.data)
        })
        .await
        .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        Ok(self.read_snapshot()?.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use openraft::CommittedLeaderId;

    use super::*;
    use crate::raft::marker::{Identity, Progress};

    fn open_db(dir: &Path) -> (sled::Db, StateMachine) {
        let db = sled::open(dir).expect("open sled");
        let marker = Arc::new(Marker::new(dir, Identity::new("c", 1), Progress::default()));
        let sm = StateMachine::open(&db, dir, 16, marker).expect("open state machine");
        (db, sm)
    }

    fn open(dir: &Path) -> StateMachine {
        open_db(dir).1
    }

    fn register(index: u64, id: &str) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Proposal(vec![Command::Register(Instance::example(
                "s", id,
            ))])),
        }
    }

    fn ids(sm: &StateMachine) -> Vec<String> {
        let st = sm.state.read().expect("state lock");
        st.catalog.all_instances().map(|i| i.id.clone()).collect()
    }

    /// Install writes sled before it swaps the catalogue and fsyncs after:
    /// what a reopened node finds is the snapshot, not a mix with what it replaced.
    #[tokio::test]
    async fn an_installed_snapshot_replaces_the_state_in_memory_and_on_disk() {
        let src_dir = tempfile::tempdir().expect("temp dir");
        let mut src = open(src_dir.path());
        src.apply(vec![register(1, "a"), register(2, "b")])
            .await
            .expect("apply");
        let snap = src.build_snapshot().await.expect("build");

        let dir = tempfile::tempdir().expect("temp dir");
        {
            let mut sm = open(dir.path());
            sm.apply(vec![register(1, "replaced")])
                .await
                .expect("apply");
            sm.install_snapshot(&snap.meta, snap.snapshot)
                .await
                .expect("install");
            assert_eq!(ids(&sm), ["a", "b"]);
        }
        let (db, mut sm) = open_db(dir.path());
        assert_eq!(ids(&sm), ["a", "b"]);
        let (last, _) = sm.applied_state().await.expect("applied state");
        assert_eq!(last, snap.meta.last_log_id);
        let current = sm
            .get_current_snapshot()
            .await
            .expect("read snapshot")
            .expect("a current snapshot");
        assert_eq!(current.meta, snap.meta);
        assert_eq!(applied_index(&db).expect("applied index"), Some(2));
    }

    /// A snapshot file ahead of sled (the crash came after the file was
    /// durable, before sled's copy of the state was): the state starts from it.
    #[tokio::test]
    async fn a_snapshot_file_ahead_of_sled_is_where_the_state_starts() {
        let src_dir = tempfile::tempdir().expect("temp dir");
        let mut src = open(src_dir.path());
        src.apply(vec![register(1, "a"), register(2, "b"), register(3, "c")])
            .await
            .expect("apply");
        src.build_snapshot().await.expect("build");

        let dir = tempfile::tempdir().expect("temp dir");
        {
            let mut sm = open(dir.path());
            sm.apply(vec![register(1, "a")]).await.expect("apply");
        }
        std::fs::copy(
            src_dir
                .path()
                .join(crate::raft::snapshot_file::SNAPSHOT_FILE),
            dir.path().join(crate::raft::snapshot_file::SNAPSHOT_FILE),
        )
        .expect("copy the snapshot file");
        let (db, mut sm) = open_db(dir.path());
        assert_eq!(ids(&sm), ["a", "b", "c"]);
        let (last, _) = sm.applied_state().await.expect("applied state");
        assert_eq!(last.map(|l| l.index), Some(3));
        assert_eq!(applied_index(&db).expect("applied index"), Some(3));
        sm.apply(vec![register(4, "d")]).await.expect("apply after");
        assert_eq!(ids(&sm), ["a", "b", "c", "d"]);
    }

    /// A snapshot or backup from before sessions (format 3) still installs;
    /// a snapshot carries open sessions, and a reopened node finds them.
    #[tokio::test]
    async fn snapshots_carry_sessions_and_format_3_payloads_still_decode() {
        let old = SnapshotPayloadV3 {
            applied: Applied::default(),
            instances: vec![Instance::example("s", "a")],
            services: Vec::new(),
            tokens: Vec::new(),
            acl_bootstrapped: true,
        };
        let p =
            SnapshotPayload::decode(&encode(&old).expect("encode")).expect("a format 3 payload");
        assert_eq!(p.instances.len(), 1);
        assert!(p.acl_bootstrapped && p.sessions.is_empty());

        let src_dir = tempfile::tempdir().expect("temp dir");
        let mut src = open(src_dir.path());
        let session = Session {
            id: "0123456789abcdef0123456789abcdef".into(),
            name: "n".into(),
            ttl_ms: 5_000,
            on_end: crate::registry::model::OnSessionEnd::Deregister,
            create_revision: 0,
            created_by: String::new(),
        };
        let create = Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), 1),
            payload: EntryPayload::Normal(Proposal(vec![Command::CreateSession(session.clone())])),
        };
        src.apply(vec![create]).await.expect("apply");
        let snap = src.build_snapshot().await.expect("build");
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let mut sm = open(dir.path());
            sm.install_snapshot(&snap.meta, snap.snapshot)
                .await
                .expect("install");
        }
        for sm in [open(dir.path()), src] {
            let st = sm.state.read().expect("state lock");
            let found = st.catalog.session(&session.id).expect("the session");
            assert_eq!((found.create_revision, found.ttl_ms), (1, 5_000));
        }
    }
}
