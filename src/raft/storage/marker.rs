//! The last-written marker: a small file beside sled (`<data_dir>/roster.marker`)
//! recording what this node has made durable — last log index, vote term, last
//! applied index — and whose directory it is (cluster id, node id, incarnation).
//!
//! The log store moves it up after each group-commit flush, with values sampled
//! before the flush, and only then reports the entries durable to openraft: an
//! entry this node acknowledged (as a follower, or counted toward its own
//! quorum as leader) is always covered, and the marker never claims more than
//! sled holds. At start, sled holding less than the marker says means the
//! directory was damaged or replaced (a disk that lied about a flush, a lost
//! tail, a restored file-system snapshot): the node must not vote or serve with
//! lost state, so it refuses to start.
//!
//! The file has two fixed slots written in turn, each a checksummed record with
//! a generation; an update overwrites the older slot in place and syncs its
//! data. So it allocates nothing (a full disk cannot stop it half-way), costs
//! one data sync, and a torn write leaves the other slot, whose update had
//! completed, to be read.

use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::disk::{DirFile, MarkerFile};
use super::stored::{self, CodecError};
use crate::raft::NodeId;

pub const MARKER_FILE: &str = "roster.marker";
/// Bytes per slot: a length, then the record; a cluster id is at most a few
/// hundred bytes.
const SLOT: usize = 4096;
/// An update rewrites its slot from the start in whole sectors, not the whole
/// slot: a record takes one, and what follows its length is never read. With
/// direct I/O ([`DirFile`]) one sector, not a 4 KiB page, reaches the disk
/// per update, and every flush of the log updates the marker.
const SECTOR: usize = 512;

/// Whose data a directory holds. `incarnation` is random, drawn when the
/// directory is created, so a recreated directory is a different incarnation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub cluster_id: String,
    pub node_id: NodeId,
    pub incarnation: u64,
}

impl Identity {
    pub fn new(cluster_id: &str, node_id: NodeId) -> Self {
        Identity {
            cluster_id: cluster_id.to_string(),
            node_id,
            // Never 0, which stands for "unknown" elsewhere.
            incarnation: fastrand::u64(1..),
        }
    }
}

/// How far the node's durable state reaches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Last log index: the last entry, or the last purged one if the log is empty.
    pub last_log: Option<u64>,
    pub vote_term: u64,
    /// The last index the snapshot file covers: the state applied durably.
    pub applied: Option<u64>,
}

impl Progress {
    /// What `found` lacks compared with `self`, or `None` if it holds at least as much.
    pub fn shortfall(&self, found: &Progress) -> Option<String> {
        let show = |v: Option<u64>| v.map_or("none".to_string(), |v| v.to_string());
        let mut lacks = Vec::new();
        if found.last_log < self.last_log {
            lacks.push(format!(
                "log ends at index {} but reached {}",
                show(found.last_log),
                show(self.last_log)
            ));
        }
        if found.vote_term < self.vote_term {
            lacks.push(format!(
                "vote is for term {} but was for term {}",
                found.vote_term, self.vote_term
            ));
        }
        if found.applied < self.applied {
            lacks.push(format!(
                "snapshot covers entries up to {} but covered up to {}",
                show(found.applied),
                show(self.applied)
            ));
        }
        (!lacks.is_empty()).then(|| lacks.join("; "))
    }
}

#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    identity: Identity,
    progress: Progress,
}

/// One slot's content: the newer generation of the two valid slots is the marker.
#[derive(Debug, Serialize, Deserialize)]
struct Slotted {
    generation: u64,
    record: Record,
}

#[derive(Debug, thiserror::Error)]
pub enum MarkerError {
    #[error("marker file roster.marker: {0}")]
    Io(#[from] std::io::Error),
    #[error("marker file roster.marker: {0}")]
    Codec(#[from] CodecError),
    #[error("marker file roster.marker: a record of {0} bytes does not fit a slot of {1}")]
    TooLarge(usize, usize),
}

/// What a flush will make durable: sampled before it, recorded after it succeeded.
#[derive(Clone, Copy)]
pub struct Ticket {
    seq: u64,
    progress: Progress,
}

impl Ticket {
    pub fn last_log(&self) -> Option<u64> {
        self.progress.last_log
    }
}

/// Tracks progress written to sled and keeps the marker file in step with what is durable.
pub struct Marker {
    file: Arc<dyn MarkerFile>,
    identity: Identity,
    /// Progress written to sled, flushed or not; the counter orders samples.
    written: Mutex<(u64, Progress)>,
    /// The sample the marker file holds: never replaced by an older one.
    recorded: Mutex<(u64, Progress)>,
    /// The generation last written; `None` until this process has laid the
    /// file out in slots (it may be absent, or of the one-record format).
    generation: Mutex<Option<u64>>,
}

impl Marker {
    /// A marker for `identity` whose file records `durable`; the file is written
    /// by the first `record` (or `lower_log`).
    pub fn new(dir: &Path, identity: Identity, durable: Progress) -> Self {
        Self::on(
            Arc::new(DirFile::at(&dir.join(MARKER_FILE))),
            identity,
            durable,
        )
    }

    /// A marker kept in `file`.
    pub fn on(file: Arc<dyn MarkerFile>, identity: Identity, durable: Progress) -> Self {
        Marker {
            file,
            identity,
            written: Mutex::new((0, durable)),
            recorded: Mutex::new((0, durable)),
            generation: Mutex::new(None),
        }
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Reads the marker file of `dir`; `None` if there is none. A file of
    /// one record (what Roster wrote before the slots) reads as that record.
    pub fn read(dir: &Path) -> Result<Option<(Identity, Progress)>, MarkerError> {
        Self::read_from(&DirFile::at(&dir.join(MARKER_FILE)))
    }

    /// Reads the marker kept in `file`; `None` if there is none.
    pub fn read_from(file: &dyn MarkerFile) -> Result<Option<(Identity, Progress)>, MarkerError> {
        let Some(b) = file.read()? else {
            return Ok(None);
        };
        if b.len() != 2 * SLOT {
            let r: Record = stored::decode(&b)?;
            return Ok(Some((r.identity, r.progress)));
        }
        let slots = b.chunks_exact(SLOT).map(|slot| {
            let (len, rest) = slot.split_first_chunk::<4>().ok_or(CodecError::Short(0))?;
            let body = rest
                .get(..u32::from_le_bytes(*len) as usize)
                .ok_or(CodecError::Short(rest.len()))?;
            stored::decode::<Slotted>(body)
        });
        let (mut newest, mut damage) = (None::<Slotted>, None);
        for slot in slots {
            match slot {
                Ok(s) if newest.as_ref().is_none_or(|n| s.generation > n.generation) => {
                    newest = Some(s)
                }
                Ok(_) => {}
                Err(e) => damage = Some(e),
            }
        }
        match (newest, damage) {
            (Some(s), _) => Ok(Some((s.record.identity, s.record.progress))),
            (None, Some(e)) => Err(e.into()),
            (None, None) => unreachable!("two slots read"),
        }
    }

    /// Call after a sled write succeeded.
    pub fn note(&self, update: impl FnOnce(&mut Progress)) {
        let mut w = lock(&self.written);
        update(&mut w.1);
        w.0 += 1;
    }

    /// Call before a flush; hand the ticket to `record` once the flush succeeded.
    pub fn sample(&self) -> Ticket {
        let w = lock(&self.written);
        Ticket {
            seq: w.0,
            progress: w.1,
        }
    }

    /// Writes the marker for a flushed sample, unless a newer one is already recorded.
    pub fn record(&self, t: Ticket) -> Result<(), MarkerError> {
        let mut r = lock(&self.recorded);
        if t.seq < r.0 || t.progress == r.1 {
            return Ok(());
        }
        self.write_file(&t.progress)?;
        *r = (t.seq, t.progress);
        Ok(())
    }

    /// Writes the marker file for the progress recorded so far (a new directory's first).
    pub fn write_now(&self) -> Result<(), MarkerError> {
        let r = lock(&self.recorded);
        self.write_file(&r.1)
    }

    /// Call before truncating the log after `last`: the marker must not claim
    /// entries that are about to be removed, so it is lowered first.
    pub fn lower_log(&self, last: Option<u64>) -> Result<(), MarkerError> {
        let seq = {
            let mut w = lock(&self.written);
            w.1.last_log = w.1.last_log.min(last);
            w.0 += 1;
            w.0
        };
        let mut r = lock(&self.recorded);
        // Samples taken before this point may hold the removed entries: outrank them.
        let mut lowered = r.1;
        lowered.last_log = lowered.last_log.min(last);
        self.write_file(&lowered)?;
        *r = (seq, lowered);
        Ok(())
    }

    /// Writes `progress` into the older slot and syncs it. The first write of
    /// a process lays the file out anew (temp file, sync, rename, directory
    /// sync), so an absent or one-record file becomes two slots atomically.
    fn write_file(&self, progress: &Progress) -> Result<(), MarkerError> {
        let mut generation = lock(&self.generation);
        let next = generation.map_or(1, |g| g + 1);
        let slot = |generation, whole: bool| -> Result<Vec<u8>, MarkerError> {
            let b = stored::encode(&Slotted {
                generation,
                record: Record {
                    identity: self.identity.clone(),
                    progress: *progress,
                },
            })?;
            if b.len() + 4 > SLOT {
                return Err(MarkerError::TooLarge(b.len() + 4, SLOT));
            }
            let mut out = Vec::with_capacity(SLOT);
            out.extend_from_slice(&(b.len() as u32).to_le_bytes());
            out.extend_from_slice(&b);
            let len = if whole {
                SLOT
            } else {
                out.len().div_ceil(SECTOR) * SECTOR
            };
            out.resize(len, 0);
            Ok(out)
        };
        match *generation {
            Some(_) => self
                .file
                .write_at((next % 2) * SLOT as u64, &slot(next, false)?)?,
            None => {
                // Both slots alike: either is a valid marker from the start.
                let mut b = slot(next, true)?;
                b.extend_from_slice(&slot(next, true)?);
                self.file.replace(&b)?;
            }
        }
        *generation = Some(next);
        Ok(())
    }
}

/// What a database holds, read at start.
pub struct Found {
    pub identity: Option<Identity>,
    pub progress: Progress,
    /// Whether any tree holds anything.
    pub has_data: bool,
}

/// Whether `found` is what the marker says this node last wrote; the error says
/// what is missing. No marker and no data is a new directory.
pub fn check(marker: Option<&(Identity, Progress)>, found: &Found) -> Result<(), String> {
    match (marker, &found.identity) {
        (None, None) if found.has_data => {
            Err("the database holds data but no identity, and there is no marker file".into())
        }
        (None, None) => Ok(()),
        (None, Some(_)) => Err(format!(
            "the database has data but the marker file {MARKER_FILE} is missing"
        )),
        (Some((id, _)), None) => Err(format!(
            "the database is empty or lost its identity, but {MARKER_FILE} says it held node {}'s data (incarnation {:x})",
            id.node_id, id.incarnation
        )),
        (Some((id, _)), Some(db_id)) if id != db_id => Err(format!(
            "the database belongs to {db_id:?} but {MARKER_FILE} to {id:?}"
        )),
        (Some((_, recorded)), Some(_)) => match recorded.shortfall(&found.progress) {
            Some(lacks) => Err(format!("the database lost data this node wrote: {lacks}")),
            None => Ok(()),
        },
    }
}

/// The guarded values are plain data: a panic elsewhere cannot leave them half-updated.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(last_log: u64, vote_term: u64, applied: u64) -> Progress {
        Progress {
            last_log: Some(last_log),
            vote_term,
            applied: Some(applied),
        }
    }

    #[test]
    fn shortfall_names_each_lagging_part() {
        let marker = progress(10, 3, 8);
        assert_eq!(marker.shortfall(&progress(10, 3, 8)), None);
        assert_eq!(marker.shortfall(&progress(12, 4, 9)), None);
        let s = marker
            .shortfall(&progress(9, 2, 7))
            .expect("shortfall found");
        assert!(s.contains("log ends at index 9 but reached 10"), "{s}");
        assert!(s.contains("term 2 but was for term 3"), "{s}");
        assert!(
            s.contains("covers entries up to 7 but covered up to 8"),
            "{s}"
        );
        assert!(marker.shortfall(&Progress::default()).is_some());
    }

    #[test]
    fn records_only_newer_samples_and_lowers_before_truncation() {
        let dir = tempfile::tempdir().expect("temp dir");
        let id = Identity::new("c", 2);
        let m = Marker::new(dir.path(), id.clone(), Progress::default());
        assert!(Marker::read(dir.path()).expect("read").is_none());

        m.note(|p| p.last_log = Some(5));
        let old = m.sample();
        m.note(|p| p.last_log = Some(9));
        m.record(m.sample()).expect("record");
        assert_eq!(
            Marker::read(dir.path()).expect("read"),
            Some((
                id.clone(),
                Progress {
                    last_log: Some(9),
                    ..Default::default()
                }
            ))
        );
        // A flush that started earlier finishing later must not move the marker back.
        m.record(old).expect("record");
        let read = Marker::read(dir.path()).expect("read").expect("marker");
        assert_eq!(read.1.last_log, Some(9));

        // A sample from before a truncation must not restore the removed entries.
        let before = m.sample();
        m.lower_log(Some(6)).expect("lower");
        m.record(before).expect("record");
        let read = Marker::read(dir.path()).expect("read").expect("marker");
        assert_eq!(read.1.last_log, Some(6));
    }

    #[test]
    fn a_torn_slot_leaves_the_previous_update_and_old_files_still_read() {
        let dir = tempfile::tempdir().expect("temp dir");
        let id = Identity::new("c", 3);
        let path = dir.path().join(MARKER_FILE);
        // What Roster wrote before the slots: one record, read as it is.
        let old = Record {
            identity: id.clone(),
            progress: progress(4, 1, 2),
        };
        std::fs::write(&path, stored::encode(&old).expect("encode")).expect("write");
        assert_eq!(
            Marker::read(dir.path()).expect("read"),
            Some((id.clone(), progress(4, 1, 2)))
        );

        let m = Marker::new(dir.path(), id.clone(), progress(4, 1, 2));
        for last in 5..=7 {
            m.note(|p| p.last_log = Some(last));
            m.record(m.sample()).expect("record");
            let read = Marker::read(dir.path()).expect("read").expect("marker");
            assert_eq!(read.1.last_log, Some(last));
        }
        assert_eq!(
            std::fs::metadata(&path).expect("stat").len(),
            2 * SLOT as u64
        );
        // Generation 1 (5) laid out both slots, 2 (6) went to slot 0, 3 (7)
        // to slot 1: tearing slot 1 leaves 6.
        let mut b = std::fs::read(&path).expect("read");
        b[SLOT + 20] ^= 0xff;
        std::fs::write(&path, &b).expect("write");
        let read = Marker::read(dir.path()).expect("read").expect("marker");
        assert_eq!(read.1.last_log, Some(6));
        // Both torn: damage.
        b[20] ^= 0xff;
        std::fs::write(&path, &b).expect("write");
        assert!(Marker::read(dir.path()).is_err());
    }

    #[test]
    fn a_cut_marker_file_is_an_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let m = Marker::new(dir.path(), Identity::new("c", 1), Progress::default());
        m.note(|p| p.vote_term = 1);
        m.record(m.sample()).expect("record");
        let path = dir.path().join(MARKER_FILE);
        let b = std::fs::read(&path).expect("read");
        std::fs::write(&path, &b[..SLOT + 100]).expect("write");
        assert!(Marker::read(dir.path()).is_err());
    }

    #[test]
    fn check_accepts_new_and_intact_directories_only() {
        let id = Identity::new("c", 1);
        let intact = Found {
            identity: Some(id.clone()),
            progress: progress(10, 2, 9),
            has_data: true,
        };
        let marker = (id.clone(), progress(10, 2, 8));
        assert_eq!(check(Some(&marker), &intact), Ok(()));
        let empty = Found {
            identity: None,
            progress: Progress::default(),
            has_data: false,
        };
        assert_eq!(check(None, &empty), Ok(()));

        let err = |m: Option<&(Identity, Progress)>, f: &Found| check(m, f).expect_err("damage");
        assert!(err(Some(&marker), &empty).contains("empty or lost its identity"));
        assert!(err(None, &intact).contains("marker file roster.marker is missing"));
        let anonymous = Found {
            identity: None,
            progress: Progress::default(),
            has_data: true,
        };
        assert!(err(None, &anonymous).contains("no identity"));
        let other = (Identity::new("c", 1), progress(1, 1, 1));
        assert!(err(Some(&other), &intact).contains("belongs to"));
        let ahead = (id, progress(11, 2, 9));
        assert!(err(Some(&ahead), &intact).contains("log ends at index 10 but reached 11"));
    }
}
