//! The registry state machine: applies committed entries to the in-memory
//! catalogue. Like etcd's WAL and snapshot, what is durable is the log (in
//! sled) and the current snapshot (a file of its own, [`SnapshotFile`],
//! durable before openraft may purge the log it covers): a restart loads the
//! snapshot and openraft re-applies the committed entries after it. Applying
//! writes nothing to disk, so it costs the same at a million instances as at
//! ten.

// Openraft's storage traits fix the error type to its (large) StorageError.
#![allow(clippy::result_large_err)]

use std::io::Cursor;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use openraft::storage::RaftStateMachine;
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, Snapshot, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};

use super::disk::Offload;
use super::marker::Marker;
use super::snapshot_file::SnapshotFile;
use super::stored::{decode, encode, CodecError};
use crate::error::Error;
use crate::raft::{Node, NodeId, TypeConfig};
use crate::registry::acl::{Acl, Token};
use crate::registry::model::{ServiceConfig, Session};
use crate::registry::namespace::Namespace;
use crate::registry::watch::{RegistryState, SharedState, WatchHub};
use crate::registry::{Catalog, CommandResponse, Event, Instance};

pub mod migrate;

type StorageResult<T> = Result<T, StorageError<NodeId>>;

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
    instances: Vec<Arc<Instance>>,
    services: Vec<(String, ServiceConfig)>,
    tokens: Vec<Token>,
    acl_bootstrapped: bool,
    sessions: Vec<Session>,
    /// Every namespace but `default`, and `default` if it has quotas.
    namespaces: Vec<Namespace>,
    /// The namespace of each session not in `default`, by id.
    session_namespaces: Vec<(String, String)>,
}

/// Opens a payload of storage format 6 (namespaces). An earlier payload
/// starts with an option's tag (0 or 1), never this; and bincode reads a
/// shorter layout out of a longer record without complaint, so the formats
/// are told apart by the mark, not by trying each.
const PAYLOAD_MARK: [u8; 8] = *b"RSTRNS06";

/// A snapshot as storage formats 4 and 5 wrote it: before namespaces.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct SnapshotPayloadV5 {
    applied: Applied,
    instances: Vec<Arc<Instance>>,
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
            .with_namespaces(self.namespaces)
            .with_sessions(self.sessions, self.session_namespaces)
    }

    fn encode(&self) -> Result<Vec<u8>, CodecError> {
        encode(&(PAYLOAD_MARK, self))
    }

    /// Decodes a payload of this format, of formats 4-5 or of format 3 (a
    /// backup taken, or a snapshot sent by a leader, before the upgrade):
    /// what was written before namespaces is `default`'s.
    fn decode(data: &[u8]) -> Result<Self, CodecError> {
        match decode::<([u8; 8], SnapshotPayload)>(data) {
            Ok((mark, payload)) if mark == PAYLOAD_MARK => return Ok(payload),
            Err(e @ (CodecError::Checksum | CodecError::Short(_))) => return Err(e),
            _ => {}
        }
        let old = match decode::<SnapshotPayloadV5>(data) {
            Ok(v5) => v5,
            Err(e) => {
                let v3: SnapshotPayloadV3 = decode(data).map_err(|_| e)?;
                SnapshotPayloadV5 {
                    applied: v3.applied,
                    instances: v3.instances.into_iter().map(Arc::new).collect(),
                    services: v3.services,
                    tokens: v3.tokens,
                    acl_bootstrapped: v3.acl_bootstrapped,
                    sessions: Vec::new(),
                }
            }
        };
        Ok(SnapshotPayload {
            applied: old.applied,
            instances: old.instances,
            services: old.services,
            tokens: old.tokens,
            acl_bootstrapped: old.acl_bootstrapped,
            sessions: old.sessions,
            namespaces: Vec::new(),
            session_namespaces: Vec::new(),
        })
    }
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, Node>,
    /// As bytes: the layout bincode gives a `Vec<u8>` (length, then the
    /// bytes), encoded and decoded as one copy. Element by element, reading a
    /// million-instance snapshot took openraft's state machine task (which
    /// also applies entries) some 300 ms, and writes stalled meanwhile.
    #[serde(with = "serde_bytes")]
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

/// The current snapshot of a data directory, verified, read before the node
/// starts: the state machine starts from it.
pub struct Current(Option<StoredSnapshot>);

impl Current {
    pub fn read(dir: &Path) -> crate::error::Result<Self> {
        SnapshotFile::in_dir(dir)
            .read()
            .map(Current)
            .map_err(|e| Error::Storage(e.to_string()))
    }

    /// The last log index the snapshot covers: what the node has durably applied.
    pub fn applied_index(&self) -> Option<u64> {
        self.0.as_ref()?.meta.last_log_id.map(|l| l.index)
    }
}

#[derive(Clone)]
pub struct StateMachine {
    state: SharedState,
    /// The last applied entry and the membership of `state`: held while
    /// `state` changes and while it is copied, so that a copy and its
    /// position agree.
    applied: Arc<Mutex<Applied>>,
    /// Held while a snapshot is built or installed (taken before `applied`),
    /// so that a snapshot built from an older copy never replaces one
    /// installed meanwhile.
    snapshots: Arc<Mutex<()>>,
    file: Arc<SnapshotFile>,
    marker: Arc<Marker>,
    /// Where snapshots are encoded and written.
    offload: Offload,
}

/// A record of the state machine tree that fails its checksum or does not decode.
fn damaged(what: impl std::fmt::Display) -> impl FnOnce(CodecError) -> Error {
    move |e| Error::Storage(format!("state machine {what}: {e}"))
}

impl StateMachine {
    /// Starts from the current snapshot of `dir` (an empty state without one);
    /// openraft re-applies the committed entries after it.
    pub fn open(
        dir: &Path,
        current: Current,
        watch_history: usize,
        marker: Arc<Marker>,
    ) -> crate::error::Result<Self> {
        let sm = StateMachine {
            state: Arc::new(RwLock::new(RegistryState {
                catalog: Catalog::default(),
                hub: WatchHub::new(0, watch_history),
            })),
            applied: Arc::default(),
            snapshots: Arc::default(),
            file: Arc::new(SnapshotFile::in_dir(dir)),
            marker,
            offload: Offload::Thread,
        };
        if let Some(snap) = current.0 {
            sm.install(&snap.meta, &snap.data)
                .map_err(|e| Error::Storage(format!("snapshot file: {e}")))?;
        }
        Ok(sm)
    }

    /// Builds and installs snapshots on the calling task (the simulation).
    #[cfg(feature = "sim")]
    pub fn inline(mut self) -> Self {
        self.offload = Offload::Inline;
        self
    }

    /// The catalogue and watch hub, shared with the API.
    pub fn state(&self) -> SharedState {
        self.state.clone()
    }

    /// Size of the current snapshot's file, in bytes (0 without one).
    pub fn snapshot_size(&self) -> Result<u64, super::snapshot_file::SnapshotFileError> {
        self.file.size()
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
                instances: st.catalog.shared_instances().collect(),
                services: st
                    .catalog
                    .configs()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                tokens: st.catalog.acl().tokens().cloned().collect(),
                acl_bootstrapped: st.catalog.acl().bootstrapped(),
                sessions: st.catalog.sessions().cloned().collect(),
                namespaces: st.catalog.namespace_specs().collect(),
                session_namespaces: st
                    .catalog
                    .session_namespaces()
                    .map(|(id, ns)| (id.clone(), ns.clone()))
                    .collect(),
            }
        };
        let data = payload
            .encode()
            .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
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
    /// memory and the snapshot file, which a restart starts from and a
    /// lagging member is sent.
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
    /// log up to a snapshot as soon as it is built or installed, and a
    /// restart starts from it.
    fn store_snapshot(&self, snap: &StoredSnapshot) -> StorageResult<()> {
        self.file
            .write(snap)
            .map_err(|e| StorageIOError::write_snapshot(Some(snap.meta.signature()), &e))?;
        let index = snap.meta.last_log_id.map(|l| l.index);
        self.marker.note(|p| p.applied = p.applied.max(index));
        Ok(())
    }

    /// Replaces the state with the snapshot's.
    fn install(&self, meta: &SnapshotMeta<NodeId, Node>, data: &[u8]) -> StorageResult<()> {
        let sig = Some(meta.signature());
        let payload = SnapshotPayload::decode(data)
            .map_err(|e| StorageIOError::read_snapshot(sig.clone(), &e))?;
        let revision = meta.last_log_id.map_or(0, |l| l.index);
        let installed = Applied {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
        };
        let catalog = payload.catalog(revision);
        let replaced = {
            let mut applied = self.applied.lock().map_err(write_lock_err)?;
            let mut st = self.state.write().map_err(write_lock_err)?;
            st.hub.reset(revision);
            *applied = installed;
            std::mem::replace(&mut st.catalog, catalog)
        };
        // Dropped outside the locks: freeing a large catalogue takes a while.
        drop(replaced);
        Ok(())
    }

    /// Applies one entry to the catalogue and `applied`; returns its
    /// responses and its events (none for an entry that changed no instance).
    fn apply_entry(
        st: &mut RegistryState,
        applied: &mut Applied,
        entry: Entry<TypeConfig>,
    ) -> (Vec<CommandResponse>, Vec<Event>) {
        let rev = entry.log_id.index;
        applied.last_applied = Some(entry.log_id);
        match entry.payload {
            EntryPayload::Normal(proposal) => {
                let mut events = Vec::new();
                let responses = (proposal.0.iter())
                    .map(|cmd| {
                        let (resp, evs) = st.catalog.apply(rev, cmd);
                        events.extend(evs);
                        resp
                    })
                    .collect();
                return (responses, events);
            }
            EntryPayload::Membership(m) => {
                applied.membership = StoredMembership::new(Some(entry.log_id), m);
            }
            EntryPayload::Blank => {}
        }
        st.catalog.advance(rev);
        (Vec::new(), Vec::new())
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
        // Copying, encoding and storing a large catalogue takes a while: on a
        // blocking thread, so that the runtime's threads go on replicating and
        // answering meanwhile.
        let sm = self.clone();
        let stored = in_background(self.offload, move || sm.store_copy())
            .await
            .map_err(|e| StorageIOError::write_snapshot(None, &e))??;
        Ok(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        })
    }
}

/// Runs `f` on a thread of its own at a lower CPU priority (nice 10), and
/// waits for it without holding a runtime thread. Encoding or decoding a
/// million-instance snapshot takes a core for most of a second; at normal
/// priority it competed with the Raft and gRPC tasks of a small machine,
/// and writes stalled behind it.
/// With [`Offload::Inline`] (the simulation) it runs on the calling task.
async fn in_background<T: Send + 'static>(
    offload: Offload,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<T> {
    if offload == Offload::Inline {
        return Ok(f());
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("snapshot".into())
        .spawn(move || {
            // Best effort: at worst the work runs at normal priority. On
            // Linux a priority set through a thread's id is that thread's.
            // SAFETY: plain system calls on the calling thread.
            #[cfg(target_os = "linux")]
            unsafe {
                let tid = libc::gettid();
                libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 10);
            }
            let _ = tx.send(f());
        })?;
    rx.await
        .map_err(|_| std::io::Error::other("the snapshot thread panicked"))
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
    /// state's write lock.
    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<Vec<CommandResponse>>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut applied = self.applied.lock().map_err(write_lock_err)?;
        let mut st = self.state.write().map_err(write_lock_err)?;
        let mut responses = Vec::new();
        let mut changes = Vec::new();
        for entry in entries {
            let rev = entry.log_id.index;
            let (resps, events) = Self::apply_entry(&mut st, &mut applied, entry);
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
        in_background(self.offload, move || {
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

    use super::migrate::*;
    use super::*;
    use crate::raft::storage::marker::{Identity, Progress};
    use crate::raft::trees;
    use crate::registry::{Command, Proposal};

    fn open(dir: &Path) -> StateMachine {
        let marker = Arc::new(Marker::new(dir, Identity::new("c", 1), Progress::default()));
        let current = Current::read(dir).expect("read the snapshot file");
        StateMachine::open(dir, current, 16, marker).expect("open state machine")
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

    /// An installed snapshot replaces the state, and a reopened node starts
    /// from it, not from a mix with what it replaced.
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
        let mut sm = open(dir.path());
        assert_eq!(ids(&sm), ["a", "b"]);
        let (last, _) = sm.applied_state().await.expect("applied state");
        assert_eq!(last, snap.meta.last_log_id);
        let current = sm
            .get_current_snapshot()
            .await
            .expect("read snapshot")
            .expect("a current snapshot");
        assert_eq!(current.meta, snap.meta);
        let on_disk = Current::read(dir.path()).expect("read");
        assert_eq!(on_disk.applied_index(), Some(2));
    }

    /// Formats 2 to 4 kept the applied state in sled too: where it reaches
    /// further than the snapshot file it becomes that file, the tree goes,
    /// and the state starts from the file.
    #[tokio::test]
    async fn a_state_machine_tree_ahead_of_the_snapshot_file_becomes_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let mut sm = open(dir.path());
            sm.apply(vec![register(1, "old")]).await.expect("apply");
            sm.build_snapshot().await.expect("build");
        }
        let db = sled::open(dir.path()).expect("open sled");
        let tree = db.open_tree(trees::STATE_MACHINE).expect("sm tree");
        let at = Some(LogId::new(CommittedLeaderId::new(1, 1), 3));
        let put = |k: &[u8], v: Vec<u8>| {
            tree.insert(k, v).expect("insert");
        };
        put(LAST_APPLIED, encode(&at).expect("encode"));
        put(
            b"i:s\0a",
            encode(&Instance::example("s", "a")).expect("encode"),
        );
        put(
            b"i:s\0b",
            encode(&Instance::example("s", "b")).expect("encode"),
        );
        put(b"s:s", encode(&ServiceConfig::default()).expect("encode"));
        put(ACL_BOOTSTRAPPED, encode(&true).expect("encode"));
        drop(tree);

        for _ in 0..2 {
            migrate_tree(&db, dir.path()).expect("migrate");
        }
        assert!(!db
            .tree_names()
            .iter()
            .any(|n| n == trees::STATE_MACHINE.as_bytes()));
        let mut sm = open(dir.path());
        assert_eq!(ids(&sm), ["a", "b"]);
        let (last, _) = sm.applied_state().await.expect("applied state");
        assert_eq!(last, at);
        let st = sm.state.read().expect("state lock");
        assert!(st.catalog.acl().bootstrapped());
        assert_eq!(st.catalog.configs().count(), 1);
    }

    #[test]
    fn snapshot_bytes_keep_the_layout_of_a_vec() {
        // What files written before `serde_bytes` hold: the data as a plain
        // `Vec<u8>`. They must read, and be written the same way.
        #[derive(Serialize)]
        struct Before {
            meta: SnapshotMeta<NodeId, Node>,
            data: Vec<u8>,
        }
        let meta = snapshot_meta(Applied::default());
        let data: Vec<u8> = (0..=255).collect();
        let before = encode(&Before {
            meta: meta.clone(),
            data: data.clone(),
        })
        .expect("encode");
        let now: StoredSnapshot = decode(&before).expect("decode an old file's record");
        assert_eq!(now.data, data);
        assert_eq!(encode(&now).expect("encode"), before);
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

    /// Namespaces and their quotas travel in snapshots; a payload written
    /// before them (formats 4-5) decodes with everything in `default`.
    #[tokio::test]
    async fn snapshots_carry_namespaces_and_format_5_payloads_still_decode() {
        use crate::registry::namespace::{Namespace, Quotas};
        let old = SnapshotPayloadV5 {
            applied: Applied::default(),
            instances: vec![Arc::new(Instance::example("s", "a"))],
            services: Vec::new(),
            tokens: Vec::new(),
            acl_bootstrapped: false,
            sessions: Vec::new(),
        };
        let p =
            SnapshotPayload::decode(&encode(&old).expect("encode")).expect("a format 5 payload");
        assert_eq!(p.instances.len(), 1);
        assert!(p.namespaces.is_empty());

        let src_dir = tempfile::tempdir().expect("temp dir");
        let mut src = open(src_dir.path());
        let team = Namespace {
            name: "team-a".into(),
            quotas: Quotas {
                instances: 5,
                services: 2,
                sessions: 3,
                watch_streams: 0,
            },
            create_revision: 0,
        };
        let mut quota_of_default = Namespace::default_one();
        quota_of_default.quotas.instances = 9;
        let entries = [
            Command::PutNamespace {
                namespace: team.clone(),
                max_namespaces: 10,
            },
            Command::PutNamespace {
                namespace: quota_of_default,
                max_namespaces: 10,
            },
            Command::Register(Instance::example("team-a/web", "1")),
            Command::CreateSessionIn {
                namespace: "team-a".into(),
                session: Session {
                    id: "0123456789abcdef0123456789abcdef".into(),
                    name: "n".into(),
                    ttl_ms: 5_000,
                    on_end: crate::registry::model::OnSessionEnd::Critical,
                    create_revision: 0,
                    created_by: String::new(),
                },
            },
        ]
        .into_iter()
        .enumerate()
        .map(|(i, c)| Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), i as u64 + 1),
            payload: EntryPayload::Normal(Proposal(vec![c])),
        })
        .collect::<Vec<_>>();
        src.apply(entries).await.expect("apply");
        let snap = src.build_snapshot().await.expect("build");
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let mut sm = open(dir.path());
            sm.install_snapshot(&snap.meta, snap.snapshot)
                .await
                .expect("install");
        }
        let sm = open(dir.path());
        let st = sm.state.read().expect("state lock");
        let got = st.catalog.namespace("team-a").expect("the namespace");
        assert_eq!((got.quotas, got.create_revision), (team.quotas, 1));
        assert_eq!(
            st.catalog.namespace("default").map(|n| n.quotas.instances),
            Some(9)
        );
        assert_eq!(
            st.catalog
                .session_namespace("0123456789abcdef0123456789abcdef"),
            "team-a"
        );
        let usage = st.catalog.usage_of("team-a");
        assert_eq!((usage.instances, usage.services, usage.sessions), (1, 1, 1));
    }
}
