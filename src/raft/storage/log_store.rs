//! The Raft log, vote and commit marker, in sled ([`super::disk`]).
//!
//! Appends are written without flushing; a single flusher task fsyncs once for
//! every batch of appends queued meanwhile, moves the last-written marker up to
//! what the fsync covered, and only then reports them durable to openraft
//! (group commit).

// Openraft's storage traits fix the error type to its (large) StorageError.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote};
use tokio::sync::{broadcast, mpsc, watch};

use super::disk::{LogDisk, Offload, SledLog, Tree};
use super::marker::Marker;
use super::stored::{decode, encode};
use crate::error::Error;
use crate::raft::mutation::{self, Mutation};
use crate::raft::{NodeId, TypeConfig};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

type StorageResult<T> = Result<T, StorageError<NodeId>>;

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const LAST_PURGED: &[u8] = b"last_purged";

/// Entries one `append` of the log store wrote, in order.
pub type Batch = Arc<Vec<Entry<TypeConfig>>>;

/// The log store's appends as they happen, for the replication pipelines that
/// send them ahead (`raft::replication::pipeline`). Costs nothing while none
/// listens; one that falls `APPENDS_KEPT` batches behind misses some, and
/// openraft's own requests carry them.
#[derive(Clone)]
pub struct Appends {
    tx: broadcast::Sender<Batch>,
}

const APPENDS_KEPT: usize = 64;

impl Default for Appends {
    fn default() -> Self {
        Appends {
            tx: broadcast::channel(APPENDS_KEPT).0,
        }
    }
}

impl Appends {
    pub fn subscribe(&self) -> broadcast::Receiver<Batch> {
        self.tx.subscribe()
    }

    fn wanted(&self) -> bool {
        self.tx.receiver_count() > 0
    }

    fn publish(&self, batch: Batch) {
        let _ = self.tx.send(batch);
    }
}

#[derive(Clone)]
pub struct LogStore {
    disk: Arc<dyn LogDisk>,
    offload: Offload,
    flusher: mpsc::UnboundedSender<LogFlushed<TypeConfig>>,
    marker: Arc<Marker>,
    durable: watch::Receiver<Option<u64>>,
    appends: Appends,
    fsync: Histogram,
}

/// Seconds each group-commit flush of the log took: 0.25 ms to ~8 s.
fn fsync_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
}

impl LogStore {
    /// The log in sled, flushed on threads of their own. Must be called
    /// inside a tokio runtime: it spawns the flusher task, which lives as long
    /// as any clone of the store.
    pub fn open(db: &sled::Db, dir: &Path, marker: Arc<Marker>) -> Result<Self, sled::Error> {
        Ok(Self::on(
            Arc::new(SledLog::open(db, dir)?),
            marker,
            Offload::Thread,
        ))
    }

    /// The log on `disk`; see [`LogStore::open`].
    pub fn on(disk: Arc<dyn LogDisk>, marker: Arc<Marker>, offload: Offload) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let (durable_tx, durable) = watch::channel(None);
        let fsync = fsync_histogram();
        tokio::spawn(run_flusher(
            disk.clone(),
            offload,
            marker.clone(),
            rx,
            durable_tx,
            fsync.clone(),
        ));
        LogStore {
            disk,
            offload,
            flusher: tx,
            marker,
            durable,
            appends: Appends::default(),
            fsync,
        }
    }

    /// How long the log's flushes take (`roster_log_fsync_seconds`).
    pub fn fsync_seconds(&self) -> Histogram {
        self.fsync.clone()
    }

    /// The last log index known to be on disk, updated after every flush.
    pub fn durable(&self) -> watch::Receiver<Option<u64>> {
        self.durable.clone()
    }

    /// Every batch of entries as it is appended, before it is on disk.
    pub fn appends(&self) -> Appends {
        self.appends.clone()
    }

    fn read_meta<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> StorageResult<Option<T>> {
        let v = self
            .disk
            .get(Tree::Meta, key)
            .map_err(|e| StorageIOError::read(&e))?;
        v.map(|b| decode(&b).map_err(|e| StorageIOError::read(&e).into()))
            .transpose()
    }

    fn write_meta<T: serde::Serialize>(&self, key: &[u8], v: &T) -> StorageResult<()> {
        let b = encode(v).map_err(|e| StorageIOError::write(&e))?;
        self.disk
            .insert(Tree::Meta, key, b)
            .map_err(|e| StorageIOError::write(&e))?;
        Ok(())
    }

    fn last_log_id(&self) -> StorageResult<Option<LogId<NodeId>>> {
        match self
            .disk
            .last(Tree::Log)
            .map_err(|e| StorageIOError::read_logs(&e))?
        {
            Some((_, v)) => {
                let e: Entry<TypeConfig> = decode(&v).map_err(|e| StorageIOError::read_logs(&e))?;
                Ok(Some(e.log_id))
            }
            None => Ok(None),
        }
    }
}

fn key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

/// Reads and verifies the whole log at start: every entry's checksum, its key,
/// and that the entries after the last purged one are contiguous. Returns the
/// last log index and the vote's term; an `Error::Storage` names the damage.
pub fn inspect(disk: &dyn LogDisk) -> Result<(Option<u64>, u64), Error> {
    let damaged = |what: String| Error::Storage(what);
    let io = |e: std::io::Error| Error::Storage(format!("raft log: {e}"));
    let read_meta = |k: &[u8]| disk.get(Tree::Meta, k).map_err(io);
    let last_purged: Option<LogId<NodeId>> = read_meta(LAST_PURGED)?
        .map(|b| decode(&b))
        .transpose()
        .map_err(|e| damaged(format!("raft meta last_purged: {e}")))?;
    let vote: Option<Vote<NodeId>> = read_meta(VOTE)?
        .map(|b| decode(&b))
        .transpose()
        .map_err(|e| damaged(format!("raft meta vote: {e}")))?;
    read_meta(COMMITTED)?
        .map(|b| decode::<Option<LogId<NodeId>>>(&b))
        .transpose()
        .map_err(|e| damaged(format!("raft meta committed: {e}")))?;

    // A crash during a purge may leave entries at or below the purged index; they are never read.
    let first = key(last_purged.map_or(0, |p| p.index + 1));
    let mut last = last_purged.map(|p| p.index);
    let mut damage = None;
    disk.scan(
        Tree::Log,
        Bound::Included(&first),
        Bound::Unbounded,
        &mut |k, v| {
            let entry: Entry<TypeConfig> = match decode(v) {
                Ok(e) => e,
                Err(e) => {
                    damage = Some(format!(
                        "raft log entry under key {}: {e}",
                        k.try_into().map_or(0, u64::from_be_bytes)
                    ));
                    return Ok(false);
                }
            };
            let index = entry.log_id.index;
            if k != key(index) {
                damage = Some(format!(
                    "raft log entry {index} is stored under another index's key"
                ));
                return Ok(false);
            }
            let expected = last.map_or(0, |l| l + 1);
            if index != expected {
                damage = Some(format!(
                    "raft log has a gap: entry {index} follows {}",
                    last.map_or("nothing".to_string(), |l| l.to_string())
                ));
                return Ok(false);
            }
            last = Some(index);
            Ok(true)
        },
    )
    .map_err(io)?;
    match damage {
        Some(what) => Err(damaged(what)),
        None => Ok((last, vote.map_or(0, |v| v.leader_id.term))),
    }
}

/// Completes flush callbacks in arrival order; each fsync covers every append
/// that queued its callback before the fsync began, and the marker is moved up
/// to what it covered before any of them is reported durable. Once a flush or
/// a marker write has failed, every callback fails: openraft stops the core on
/// the first, and the node must not acknowledge anything after a write it
/// could not make durable.
async fn run_flusher(
    disk: Arc<dyn LogDisk>,
    offload: Offload,
    marker: Arc<Marker>,
    mut rx: mpsc::UnboundedReceiver<LogFlushed<TypeConfig>>,
    durable: watch::Sender<Option<u64>>,
    fsync: Histogram,
) {
    let mut pending = Vec::new();
    let mut failed: Option<String> = None;
    while let Some(first) = rx.recv().await {
        pending.push(first);
        while let Ok(cb) = rx.try_recv() {
            pending.push(cb);
        }
        if failed.is_none() {
            match flush_and_mark(&disk, offload, &marker, Some(&fsync)).await {
                Ok(last_log) => {
                    durable.send_replace(last_log);
                }
                Err(e) => failed = Some(e),
            }
            if let Some(e) = &failed {
                tracing::error!(error = %e, "the log cannot be made durable: this node stops");
            }
        }
        let res = failed.clone().map_or(Ok(()), Err);
        for cb in pending.drain(..) {
            cb.log_io_completed(res.clone().map_err(std::io::Error::other));
        }
    }
}

/// Flushes the log, then records in the marker what was written before the flush
/// began (timing the flush into `fsync`). Returns the last log index covered.
async fn flush_and_mark(
    disk: &Arc<dyn LogDisk>,
    offload: Offload,
    marker: &Arc<Marker>,
    fsync: Option<&Histogram>,
) -> Result<Option<u64>, String> {
    let ticket = marker.sample();
    let (disk, marker, fsync) = (disk.clone(), marker.clone(), fsync.cloned());
    let flush = move || {
        let started = tokio::time::Instant::now();
        let flushed = disk.flush();
        if let Some(h) = fsync {
            h.observe(started.elapsed().as_secs_f64());
        }
        flushed.map_err(|e| format!("flush: {e}"))?;
        marker.record(ticket).map_err(|e| e.to_string())?;
        Ok(ticket.last_log())
    };
    offload.run(flush).await.map_err(|e| e.to_string())?
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end_key;
        let end = match range.end_bound() {
            Bound::Included(i) => {
                end_key = key(*i);
                Bound::Included(&end_key[..])
            }
            Bound::Excluded(i) => {
                end_key = key(*i);
                Bound::Excluded(&end_key[..])
            }
            Bound::Unbounded => Bound::Unbounded,
        };
        let mut out = Vec::new();
        self.disk
            .scan(Tree::Log, Bound::Included(&key(start)), end, &mut |_, v| {
                out.push(decode(v).map_err(std::io::Error::other)?);
                Ok(true)
            })
            .map_err(|e| StorageIOError::read_logs(&e))?;
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let last_purged_log_id: Option<LogId<NodeId>> = self.read_meta(LAST_PURGED)?;
        let last_log_id = self.last_log_id()?.or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        self.write_meta(VOTE, vote)?;
        self.marker
            .note(|p| p.vote_term = p.vote_term.max(vote.leader_id.term));
        // A vote must be durable before it is granted or acted on.
        self.sync().await
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        self.read_meta(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        self.write_meta(COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        Ok(self
            .read_meta::<Option<LogId<NodeId>>>(COMMITTED)?
            .flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // One insert per entry, not a sled batch: sled writes a batch's
        // manifest in an I/O buffer of its own and closes the one before it,
        // so each batch cost three synced writes of the same disk page (12 KiB
        // written per acknowledged write at one client, against 4 KiB now).
        // Atomicity is not needed: sled recovers a prefix of the inserts, and a
        // prefix of an append is a valid log (none of it was acknowledged).
        let mut last = None;
        let mut published = self.appends.wanted().then(Vec::new);
        for e in entries {
            let b = encode(&e).map_err(|err| StorageIOError::write_log_entry(e.log_id, &err))?;
            self.disk
                .insert(Tree::Log, &key(e.log_id.index), b)
                .map_err(|err| StorageIOError::write_log_entry(e.log_id, &err))?;
            last = Some(e.log_id.index);
            if let Some(p) = &mut published {
                p.push(e);
            }
        }
        // Mutation: the marker claims one entry more than was written.
        let last = match mutation::active(Mutation::MarkerAhead) {
            true => last.map(|l| l + 1),
            false => last,
        };
        self.marker.note(|p| p.last_log = p.last_log.max(last));
        // Followers get the entries now, while this node fsyncs them.
        if let Some(p) = published.filter(|p| !p.is_empty()) {
            self.appends.publish(Arc::new(p));
        }
        // Mutation: reported durable before the flush.
        if mutation::active(Mutation::AckBeforeFlush) {
            callback.log_io_completed(Ok(()));
            return Ok(());
        }
        self.flusher.send(callback).map_err(|_| {
            StorageIOError::write_logs(&std::io::Error::other("log flusher stopped"))
        })?;
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        // The marker must stop claiming these entries before they go.
        self.marker
            .lower_log(log_id.index.checked_sub(1))
            .map_err(|e| StorageIOError::write_logs(&e))?;
        self.remove_range(Bound::Included(key(log_id.index)), Bound::Unbounded)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        // Record the purge first: a crash in between leaves extra entries, never a hole.
        self.write_meta(LAST_PURGED, &log_id)?;
        // With the log purged up to a snapshot, the last log index is at least that.
        self.marker
            .note(|p| p.last_log = p.last_log.max(Some(log_id.index)));
        self.remove_range(Bound::Unbounded, Bound::Included(key(log_id.index)))
    }
}

impl LogStore {
    /// Withdraws a leadership this node held when it stopped; call before Raft
    /// starts. Openraft 0.9 restores a node whose committed vote is its own as
    /// leader in the same term, but its log may have lost entries it proposed
    /// (a flush that failed, a crash before its own flush while followers
    /// already held them): leading again in that term, it would give their log
    /// ids to other entries, and log matching, which trusts a (term, index)
    /// pair to name one entry, would keep both. With the vote uncommitted the
    /// node is a candidate of that term, and leads again only by winning an
    /// election in a later one. Returns whether it led.
    pub async fn resign(&mut self, me: NodeId) -> StorageResult<bool> {
        match self.read_vote().await? {
            // Mutation: the fix of the 2026-12-07 soak's lost write undone.
            Some(_) if mutation::active(Mutation::LeadAgainInSameTerm) => Ok(false),
            Some(v) if v.is_committed() && v.leader_id.voted_for() == Some(me) => {
                self.save_vote(&Vote::new(v.leader_id.term, me)).await?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Makes an empty log start after `at` (a restored snapshot's position),
    /// committed up to it, durably.
    pub async fn start_after(&mut self, at: LogId<NodeId>) -> StorageResult<()> {
        self.purge(at).await?;
        self.save_committed(Some(at)).await?;
        self.sync().await
    }

    /// Makes everything written so far durable, and the marker say so.
    pub async fn sync(&self) -> StorageResult<()> {
        flush_and_mark(&self.disk, self.offload, &self.marker, None)
            .await
            .map_err(|e| StorageIOError::write_logs(&std::io::Error::other(e)))?;
        Ok(())
    }

    fn remove_range(&self, from: Bound<[u8; 8]>, to: Bound<[u8; 8]>) -> StorageResult<()> {
        let mut keys = Vec::new();
        self.disk
            .scan(
                Tree::Log,
                from.as_ref().map(|k| &k[..]),
                to.as_ref().map(|k| &k[..]),
                &mut |k, _| {
                    keys.push(k.to_vec());
                    Ok(true)
                },
            )
            .map_err(|e| StorageIOError::write_logs(&e))?;
        self.disk
            .remove(Tree::Log, keys)
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }
}
