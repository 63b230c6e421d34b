//! The data directory's lifecycle: open and check it against its marker,
//! migrate older storage formats, seed it from a backup (`restore`) and make
//! it the only voter after a lost quorum (`recover`).

use std::collections::BTreeMap;
use std::sync::Arc;

use openraft::storage::RaftLogStorage;

use crate::config::NodeConfig;
use crate::error::{Error, Result};
use crate::raft::storage::disk::SledLog;
use crate::raft::storage::log_store::LogStore;
use crate::raft::storage::marker::{self, Found, Identity, Marker, Progress};
use crate::raft::storage::snapshot_file::SnapshotFile;
use crate::raft::storage::state_machine::{SnapshotSummary, StateMachine};
use crate::raft::storage::{log_store, state_machine, stored};
use crate::raft::{trees, Node, NodeId};

pub(super) const IDENTITY_KEY: &[u8] = b"identity";

/// The storage format a data directory was written in, beside its identity.
pub(super) const FORMAT_KEY: &[u8] = b"format";

/// Format 6 adds namespaces (log entries and snapshots an older binary cannot
/// read; format 5 data reads as it is, all of it in `default`).
/// Format 5 keeps the applied state only in the snapshot file, no longer also
/// in sled (migrated on start: the state sled held becomes the snapshot).
/// Format 4 adds sessions (log entries and snapshots an older binary cannot
/// read; format 3 data reads as it is). Format 3 keeps the current snapshot in
/// its own file; format 2, in sled (migrated on start). Format 2 records the
/// members' peer addresses; format 1 (no format key) is what Roster wrote
/// before that and cannot be read.
pub(super) const STORAGE_FORMAT: u32 = 6;

/// The storage of a node, checked to be what it last wrote.
/// Why a data directory was not opened.
#[derive(Debug, thiserror::Error)]
pub(super) enum OpenError {
    /// Sled cannot open its files; most often a running node holds them.
    #[error("sled cannot open it: {0}")]
    Unopenable(sled::Error),
    /// What it holds is not what this node last wrote, or cannot be read.
    #[error("{0}")]
    Damaged(String),
    /// It is another node's or cluster's, or of a storage format this binary
    /// does not read: the error says which.
    #[error(transparent)]
    Refused(Error),
}

impl From<Error> for OpenError {
    fn from(e: Error) -> Self {
        match e {
            Error::Storage(what) => OpenError::Damaged(what),
            e => OpenError::Refused(e),
        }
    }
}

impl From<sled::Error> for OpenError {
    fn from(e: sled::Error) -> Self {
        OpenError::Damaged(e.to_string())
    }
}

impl From<OpenError> for Error {
    fn from(e: OpenError) -> Self {
        match e {
            OpenError::Refused(e) => e,
            e => Error::Storage(e.to_string()),
        }
    }
}

impl OpenError {
    /// As a starting node reports it: a directory it cannot use comes with
    /// the way to bring the node back.
    pub(super) fn on_start(self, cfg: &NodeConfig) -> Error {
        match self {
            OpenError::Refused(e) => e,
            e => damaged(cfg, &e.to_string()),
        }
    }
}

pub(super) struct Storage {
    pub db: sled::Db,
    pub marker: Arc<Marker>,
    pub state_machine: StateMachine,
    /// A new data directory: this node has no state yet.
    pub fresh: bool,
}

/// Opens the data directory and refuses it unless it is what this node last
/// wrote. Sled panics on some damaged files (its recovery and page reads run on
/// the calling thread): such a panic becomes a storage error, not a crash.
pub(super) fn open_storage(cfg: &NodeConfig) -> Result<Storage, OpenError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| open_checked(cfg))) {
        Ok(opened) => opened,
        Err(panic) => {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(OpenError::Damaged(format!(
                "sled panicked reading it: {why}"
            )))
        }
    }
}

/// Verifies every record, then compares the database with the marker; a new
/// directory gets its identity here.
fn open_checked(cfg: &NodeConfig) -> Result<Storage, OpenError> {
    let db = sled::Config::new()
        .path(&cfg.data_dir)
        .cache_capacity(cfg.cache_mb * 1024 * 1024)
        .open()
        .map_err(OpenError::Unopenable)?;
    let meta = db.open_tree(trees::NODE_META)?;
    let stored: Option<Identity> = meta
        .get(IDENTITY_KEY)?
        .map(|b| stored::decode(&b))
        .transpose()
        .map_err(|e| Error::Storage(format!("node identity: {e}")))?;
    if let Some(id) = &stored {
        if id.cluster_id != cfg.cluster_id || id.node_id != cfg.id {
            return Err(OpenError::Refused(Error::FailedPrecondition(format!(
                "data directory {} belongs to node {} of cluster {:?}, not node {} of {:?}",
                cfg.data_dir.display(),
                id.node_id,
                id.cluster_id,
                cfg.id,
                cfg.cluster_id
            ))));
        }
    }
    if stored.is_some() {
        check_format(cfg, &db, &meta)?;
    }
    let recorded = Marker::read(&cfg.data_dir).map_err(|e| Error::Storage(e.to_string()))?;
    let current = state_machine::Current::read(&cfg.data_dir)?;
    let (last_log, vote_term) = log_store::inspect(&SledLog::open(&db, &cfg.data_dir)?)?;
    let mut has_data = false;
    for name in db.tree_names() {
        has_data |= !db.open_tree(name)?.is_empty();
    }
    has_data |= SnapshotFile::in_dir(&cfg.data_dir).exists();
    let found = Found {
        identity: stored,
        progress: Progress {
            last_log,
            vote_term,
            applied: current.applied_index(),
        },
        has_data,
    };
    marker::check(recorded.as_ref(), &found).map_err(Error::Storage)?;
    let fresh = found.identity.is_none();
    let identity = found
        .identity
        .unwrap_or_else(|| Identity::new(&cfg.cluster_id, cfg.id));
    let marker = Arc::new(Marker::new(&cfg.data_dir, identity, found.progress));
    let state_machine =
        StateMachine::open(&cfg.data_dir, current, cfg.watch_history, marker.clone())?;
    if fresh {
        let b = stored::encode(marker.identity())
            .map_err(|e| Error::Storage(format!("node identity: {e}")))?;
        meta.insert(FORMAT_KEY, encode_format(STORAGE_FORMAT)?)?;
        meta.insert(IDENTITY_KEY, b)?;
        db.flush()?;
        marker
            .write_now()
            .map_err(|e| Error::Storage(e.to_string()))?;
    }
    Ok(Storage {
        db,
        marker,
        state_machine,
        fresh,
    })
}

/// Seeds the empty data directory of a node of a new cluster with a
/// backup's state (`roster snapshot restore`): its identity, the state at the
/// backup's revision, a log that starts after it, and `members` (id to peer
/// address) as the membership. Every member is seeded from the same backup;
/// started, they elect a leader and serve that state at that revision.
pub async fn restore(
    cfg: &NodeConfig,
    backup: &SnapshotSummary,
    members: BTreeMap<NodeId, String>,
) -> Result<()> {
    if !members.contains_key(&cfg.id) {
        return Err(Error::InvalidArgument(format!(
            "node {} is not among the members given ({:?}): give its own id and address too",
            cfg.id,
            members.keys().collect::<Vec<_>>()
        )));
    }
    let dir = &cfg.data_dir;
    if std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some()) {
        return Err(Error::FailedPrecondition(format!(
            "data directory {} is not empty: a restore seeds a new node's directory; \
             give an empty or missing one",
            dir.display()
        )));
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::Storage(format!("create {}: {e}", dir.display())))?;
    let Storage {
        db,
        marker,
        mut state_machine,
        ..
    } = open_storage(cfg)?;
    let voters = members.keys().copied().collect();
    let nodes: BTreeMap<NodeId, Node> = members
        .into_iter()
        .map(|(id, addr)| (id, Node::unbound(addr)))
        .collect();
    let at = state_machine
        .seed(backup, openraft::Membership::new(vec![voters], nodes))
        .await?;
    let mut log_store = LogStore::open(&db, &cfg.data_dir, marker)?;
    log_store.start_after(at).await?;
    Ok(())
}

/// Recovery from a lost quorum (`roster recover`): makes a stopped node's
/// data directory that of a cluster with itself as the only voter, at
/// `peer_addr`. Every entry in its log is applied first and kept (all it
/// has: those a majority acknowledged are among them); the members are then
/// added back with `roster member add`, from empty data directories.
/// Returns the log index it now starts after.
pub async fn recover(cfg: &NodeConfig, peer_addr: String) -> Result<u64> {
    use openraft::storage::RaftStateMachine;
    use openraft::RaftLogReader;

    let Storage {
        db,
        marker,
        mut state_machine,
        fresh,
    } = open_storage(cfg).map_err(|e| match e {
        OpenError::Unopenable(_) => {
            Error::FailedPrecondition(format!("{e}: is the node still running? Stop it first"))
        }
        e => e.on_start(cfg),
    })?;
    if fresh {
        return Err(Error::FailedPrecondition(format!(
            "data directory {} holds no node's data: nothing to recover",
            cfg.data_dir.display()
        )));
    }
    let mut log_store = LogStore::open(&db, &cfg.data_dir, marker)?;
    let (applied, _) = state_machine.applied_state().await?;
    let last = log_store.get_log_state().await?.last_log_id;
    let from = applied.map_or(0, |l| l.index + 1);
    let entries = log_store.try_get_log_entries(from..).await?;
    if !entries.is_empty() {
        state_machine.apply(entries).await?;
    }
    let Some(at) = last.max(applied) else {
        return Err(Error::FailedPrecondition(
            "the node has neither log entries nor state: nothing to recover".into(),
        ));
    };
    let me = BTreeMap::from([(cfg.id, Node::unbound(peer_addr))]);
    let membership = openraft::Membership::new(vec![me.keys().copied().collect()], me);
    state_machine.reseat(at, membership).await?;
    log_store.start_after(at).await?;
    Ok(at.index)
}

pub(super) fn encode_format(format: u32) -> Result<Vec<u8>> {
    stored::encode(&format).map_err(|e| Error::Storage(format!("storage format: {e}")))
}

/// Migrates a data directory of an older storage format that this binary
/// knows how to read, and refuses one of any other format, before anything
/// in it is decoded as this format.
pub(super) fn check_format(cfg: &NodeConfig, db: &sled::Db, meta: &sled::Tree) -> Result<()> {
    let found: u32 = match meta.get(FORMAT_KEY)? {
        Some(b) => {
            stored::decode(&b).map_err(|e| Error::Storage(format!("storage format: {e}")))?
        }
        None => 1,
    };
    let dir = cfg.data_dir.display();
    let why = match found {
        f if f == STORAGE_FORMAT => return Ok(()),
        f @ 2..=5 => {
            if f == 2 {
                state_machine::migrate::migrate_snapshot(db, &cfg.data_dir)?;
            }
            if f <= 4 {
                state_machine::migrate::migrate_tree(db, &cfg.data_dir)?;
            }
            meta.insert(FORMAT_KEY, encode_format(STORAGE_FORMAT)?)?;
            db.flush()?;
            tracing::info!(data_dir = %dir, "migrated the data directory from storage format {f} to {STORAGE_FORMAT}");
            return Ok(());
        }
        f if f > STORAGE_FORMAT => format!(
            "it was written by a newer Roster (storage format {f}); this binary reads \
             format {STORAGE_FORMAT}: run the newer version"
        ),
        f => format!(
            "it was written by an older Roster (storage format {f}); this binary reads \
             format {STORAGE_FORMAT} and migrates formats 2 to 5, but has no migration from {f}: \
             keep running the older version, or start this node on an empty directory and add it \
             as a new member (roster member remove, then roster member add)"
        ),
    };
    Err(Error::FailedPrecondition(format!(
        "data directory {dir} cannot be opened: {why}"
    )))
}

/// The refusal to start on a damaged or replaced data directory, with the way back.
pub(super) fn damaged(cfg: &NodeConfig, what: &str) -> Error {
    Error::Storage(format!(
        "data directory {} is not what node {} last wrote: {what}. \
         The node refuses to start rather than take part with lost state. {}",
        cfg.data_dir.display(),
        cfg.id,
        recovery(cfg)
    ))
}

/// How to bring back a node whose state is gone: as a new member.
pub(super) fn recovery(cfg: &NodeConfig) -> String {
    let dir = cfg.data_dir.display();
    let id = cfg.id;
    format!(
        "To recover: on a running member run `roster member remove --id {id}`, \
         delete {dir}, start this node without --initial-cluster, then run \
         `roster member add --id {id} --address {}`",
        cfg.advertise_addr()
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    /// Sled lets go of a database's file lock a moment after its last handle
    /// is dropped (its flusher thread lets go last): open again until it has.
    fn unlocked<T, E: std::fmt::Display>(
        open: impl Fn() -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match open() {
                Err(e)
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20))
                }
                r => return r,
            }
        }
    }

    #[tokio::test]
    async fn a_data_directory_of_another_storage_format_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let any = ([127, 0, 0, 1], 0).into();
        let cfg = NodeConfig::new(1, any, any, dir.path().to_path_buf());
        let set_format = |format: Option<u32>| {
            let db = unlocked(|| sled::open(dir.path())).expect("reopen");
            let meta = db.open_tree(trees::NODE_META).expect("meta");
            match format {
                Some(f) => meta.insert(FORMAT_KEY, stored::encode(&f).expect("encode")),
                None => meta.remove(FORMAT_KEY),
            }
            .expect("write");
            db.flush().expect("flush");
        };
        drop(unlocked(|| open_checked(&cfg)).expect("a new directory"));
        drop(unlocked(|| open_checked(&cfg)).expect("its own format"));
        set_format(None);
        let e = unlocked(|| open_checked(&cfg))
            .err()
            .expect("an older format");
        assert!(
            e.to_string().contains("older Roster (storage format 1)"),
            "{e}"
        );
        set_format(Some(STORAGE_FORMAT + 1));
        let e = unlocked(|| open_checked(&cfg))
            .err()
            .expect("a newer format");
        assert!(e.to_string().contains("run the newer version"), "{e}");
        set_format(Some(STORAGE_FORMAT));
        assert!(unlocked(|| open_checked(&cfg)).is_ok());
        // Format 3 reads as it is: only its format key changes.
        set_format(Some(3));
        drop(unlocked(|| open_checked(&cfg)).expect("format 3"));
        let db = unlocked(|| sled::open(dir.path())).expect("reopen");
        let meta = db.open_tree(trees::NODE_META).expect("meta");
        let format: u32 = stored::decode(&meta.get(FORMAT_KEY).expect("read").expect("a format"))
            .expect("decode");
        assert_eq!(format, STORAGE_FORMAT);
    }

    /// Format 2 kept the snapshot in sled; opened by this binary, it is moved
    /// into the snapshot file and the directory becomes the current format.
    #[tokio::test]
    async fn a_format_2_directory_is_migrated_on_start() {
        use openraft::storage::RaftStateMachine;
        use openraft::RaftSnapshotBuilder;

        let dir = tempfile::tempdir().expect("temp dir");
        let any = ([127, 0, 0, 1], 0).into();
        let cfg = NodeConfig::new(1, any, any, dir.path().to_path_buf());
        let snap_meta = {
            let mut st = unlocked(|| open_checked(&cfg)).expect("a new directory");
            let snap = st.state_machine.build_snapshot().await.expect("build");
            snap.meta
        };
        // Back to what format 2 wrote: the snapshot (the file's bytes after
        // its magic are the record format 2 stored) under `m:snapshot`.
        let file = dir
            .path()
            .join(crate::raft::storage::snapshot_file::SNAPSHOT_FILE);
        let bytes = std::fs::read(&file).expect("snapshot file");
        std::fs::remove_file(&file).expect("remove the snapshot file");
        {
            let db = unlocked(|| sled::open(dir.path())).expect("reopen");
            let sm = db.open_tree(trees::STATE_MACHINE).expect("sm tree");
            sm.insert(b"m:snapshot", &bytes[8..]).expect("insert");
            let meta = db.open_tree(trees::NODE_META).expect("meta");
            meta.insert(FORMAT_KEY, stored::encode(&2u32).expect("encode"))
                .expect("format 2");
            db.flush().expect("flush");
        }
        let mut st = unlocked(|| open_checked(&cfg)).expect("migrated");
        assert!(file.exists(), "the snapshot moved into its file");
        let sm = st.db.open_tree(trees::STATE_MACHINE).expect("sm tree");
        assert!(sm.get(b"m:snapshot").expect("read").is_none());
        let meta = st.db.open_tree(trees::NODE_META).expect("meta");
        let format: u32 = stored::decode(&meta.get(FORMAT_KEY).expect("read").expect("a format"))
            .expect("decode");
        assert_eq!(format, STORAGE_FORMAT);
        let current = st
            .state_machine
            .get_current_snapshot()
            .await
            .expect("read snapshot")
            .expect("the migrated snapshot");
        assert_eq!(current.meta, snap_meta);
    }
}
