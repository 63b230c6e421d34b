//! The registry state machine: applies committed entries to the in-memory
//! catalogue and persists the result in sled, so a restart resumes from the
//! last applied entry instead of replaying the log.

// Openraft's storage traits fix the error type to its (large) StorageError.
#![allow(clippy::result_large_err)]

use std::io::Cursor;
use std::sync::{Arc, Mutex, RwLock};

use openraft::storage::RaftStateMachine;
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, Snapshot, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};

use super::marker::Marker;
use super::stored::{decode, encode, CodecError};
use super::{trees, Node, NodeId, TypeConfig};
use crate::error::Error;
use crate::registry::model::ServiceConfig;
use crate::registry::watch::{RegistryState, SharedState, WatchHub};
use crate::registry::{Catalog, Command, CommandResponse, EventKind, Instance};

type StorageResult<T> = Result<T, StorageError<NodeId>>;

/// Instance keys are `i:<service>\0<id>`, service settings `s:<service>`;
/// state machine metadata keys start with `m:`.
const INSTANCE_PREFIX: &[u8] = b"i:";
const SERVICE_PREFIX: &[u8] = b"s:";
const LAST_APPLIED: &[u8] = b"m:last_applied";
const MEMBERSHIP: &[u8] = b"m:membership";
const CURRENT_SNAPSHOT: &[u8] = b"m:snapshot";

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

#[derive(Clone, Default, Serialize, Deserialize)]
struct Applied {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Node>,
}

/// What a snapshot holds: the whole catalogue plus the Raft position it reflects.
#[derive(Serialize, Deserialize)]
struct SnapshotPayload {
    applied: Applied,
    instances: Vec<Instance>,
    services: Vec<(String, ServiceConfig)>,
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, Node>,
    data: Vec<u8>,
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
    db: sled::Db,
    sm: sled::Tree,
    state: SharedState,
    /// Updated while `state`'s write lock is held, so both always describe the same entry.
    applied: Arc<Mutex<Applied>>,
    marker: Arc<Marker>,
}

/// A record of the state machine tree that fails its checksum or does not decode.
fn damaged(what: impl std::fmt::Display) -> impl FnOnce(CodecError) -> Error {
    move |e| Error::Storage(format!("state machine {what}: {e}"))
}

impl StateMachine {
    /// Loads the whole state, verifying every record's checksum.
    pub fn open(
        db: &sled::Db,
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
        if let Some(b) = sm.get(CURRENT_SNAPSHOT)? {
            let snap: StoredSnapshot = decode(&b).map_err(damaged("snapshot"))?;
            if snap.meta.last_log_id > applied.last_applied {
                return Err(Error::Storage(format!(
                    "state machine has applied up to {:?} but its snapshot reaches {:?}",
                    applied.last_applied, snap.meta.last_log_id
                )));
            }
        }
        let revision = applied.last_applied.map_or(0, |l| l.index);
        let state = Arc::new(RwLock::new(RegistryState {
            catalog: Catalog::from_parts(revision, instances, services),
            hub: WatchHub::new(revision, watch_history),
        }));
        Ok(StateMachine {
            db: db.clone(),
            sm,
            state,
            applied: Arc::new(Mutex::new(applied)),
            marker,
        })
    }

    /// The catalogue and watch hub, shared with the API.
    pub fn state(&self) -> SharedState {
        self.state.clone()
    }

    fn read_snapshot(&self) -> StorageResult<Option<StoredSnapshot>> {
        let b = self
            .sm
            .get(CURRENT_SNAPSHOT)
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        b.map(|b| decode(&b).map_err(|e| StorageIOError::read_snapshot(None, &e).into()))
            .transpose()
    }

    fn save_snapshot(&self, snap: &StoredSnapshot) -> StorageResult<()> {
        let sig = Some(snap.meta.signature());
        let b = encode(snap).map_err(|e| StorageIOError::write_snapshot(sig.clone(), &e))?;
        self.sm
            .insert(CURRENT_SNAPSHOT, b)
            .map_err(|e| StorageIOError::write_snapshot(sig.clone(), &e))?;
        // The log may be purged up to this snapshot once it is built: the snapshot and
        // the state machine it describes must be on disk first.
        self.db
            .flush()
            .map_err(|e| StorageIOError::write_snapshot(sig, &e))?;
        Ok(())
    }
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
        let (applied, data) = {
            let st = self.state.read().map_err(read_lock_err)?;
            let applied = self.applied.lock().map_err(read_lock_err)?.clone();
            let payload = SnapshotPayload {
                applied: applied.clone(),
                instances: st.catalog.all_instances().cloned().collect(),
                services: st
                    .catalog
                    .configs()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            };
            let data = encode(&payload).map_err(|e| StorageIOError::write_snapshot(None, &e))?;
            (applied, data)
        };
        let last = applied.last_applied;
        let meta = SnapshotMeta {
            last_log_id: last,
            last_membership: applied.membership,
            snapshot_id: match last {
                Some(l) => format!("{}-{}-{}", l.leader_id.term, l.leader_id.node_id, l.index),
                None => "empty".to_string(),
            },
        };
        let stored = StoredSnapshot { meta, data };
        self.save_snapshot(&stored)?;
        Ok(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        })
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

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<Vec<CommandResponse>>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut st = self.state.write().map_err(write_lock_err)?;
        let mut applied = self.applied.lock().map_err(write_lock_err)?;
        let mut batch = sled::Batch::default();
        let mut changes = Vec::new();
        let mut responses = Vec::new();
        for entry in entries {
            let rev = entry.log_id.index;
            applied.last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Normal(proposal) => {
                    let mut events = Vec::new();
                    let mut resps = Vec::with_capacity(proposal.0.len());
                    for cmd in &proposal.0 {
                        let (resp, evs) = st.catalog.apply(rev, cmd);
                        resps.push(resp);
                        events.extend(evs);
                        if let Command::ConfigureService { service, .. } = cmd {
                            let v = encode(&st.catalog.config(service))
                                .map_err(|err| StorageIOError::apply(entry.log_id, &err))?;
                            batch.insert(service_key(service), v);
                        }
                    }
                    for e in &events {
                        let k = instance_key(&e.instance.service, &e.instance.id);
                        match e.kind {
                            EventKind::Put => {
                                let v = encode(&e.instance)
                                    .map_err(|err| StorageIOError::apply(entry.log_id, &err))?;
                                batch.insert(k, v);
                            }
                            EventKind::Delete => batch.remove(k),
                        }
                    }
                    if !events.is_empty() {
                        changes.push((rev, events));
                    }
                    responses.push(resps);
                    continue;
                }
                EntryPayload::Membership(m) => {
                    applied.membership = StoredMembership::new(Some(entry.log_id), m);
                }
                EntryPayload::Blank => {}
            }
            st.catalog.advance(rev);
            responses.push(Vec::new());
        }
        let werr = |e: &dyn std::error::Error| {
            StorageIOError::write_state_machine(&std::io::Error::other(e.to_string()))
        };
        batch.insert(
            LAST_APPLIED,
            encode(&applied.last_applied).map_err(|e| werr(&e))?,
        );
        batch.insert(
            MEMBERSHIP,
            encode(&applied.membership).map_err(|e| werr(&e))?,
        );
        self.sm.apply_batch(batch).map_err(|e| werr(&e))?;
        let index = applied.last_applied.map(|l| l.index);
        self.marker.note(|p| p.applied = p.applied.max(index));
        for (rev, events) in changes {
            st.hub.publish(rev, events);
        }
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
        let sig = Some(meta.signature());
        let data = snapshot.into_inner();
        let payload: SnapshotPayload =
            decode(&data).map_err(|e| StorageIOError::read_snapshot(sig.clone(), &e))?;
        let werr = |e: &dyn std::error::Error| {
            StorageIOError::write_snapshot(sig.clone(), &std::io::Error::other(e.to_string()))
        };

        let mut st = self.state.write().map_err(write_lock_err)?;
        let mut applied = self.applied.lock().map_err(write_lock_err)?;
        let mut batch = sled::Batch::default();
        for kv in self
            .sm
            .scan_prefix(INSTANCE_PREFIX)
            .chain(self.sm.scan_prefix(SERVICE_PREFIX))
        {
            let (k, _) = kv.map_err(|e| werr(&e))?;
            batch.remove(k);
        }
        for (name, config) in &payload.services {
            batch.insert(service_key(name), encode(config).map_err(|e| werr(&e))?);
        }
        for i in &payload.instances {
            batch.insert(
                instance_key(&i.service, &i.id),
                encode(i).map_err(|e| werr(&e))?,
            );
        }
        batch.insert(
            LAST_APPLIED,
            encode(&meta.last_log_id).map_err(|e| werr(&e))?,
        );
        batch.insert(
            MEMBERSHIP,
            encode(&meta.last_membership).map_err(|e| werr(&e))?,
        );
        self.sm.apply_batch(batch).map_err(|e| werr(&e))?;
        self.save_snapshot(&StoredSnapshot {
            meta: meta.clone(),
            data,
        })?;
        let index = meta.last_log_id.map(|l| l.index);
        self.marker.note(|p| p.applied = p.applied.max(index));

        let revision = meta.last_log_id.map_or(0, |l| l.index);
        st.catalog = Catalog::from_parts(revision, payload.instances, payload.services);
        st.hub.reset(revision);
        *applied = Applied {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
        };
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        Ok(self.read_snapshot()?.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}
