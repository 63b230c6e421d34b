//! The storage seam: what the log store and the marker write through. In
//! production the log lives in sled ([`SledLog`]) and the marker in a file
//! ([`DirFile`]), and blocking work runs on threads of its own
//! ([`Offload::Thread`]); the deterministic simulation (`crate::sim`) puts a
//! simulated disk under the same code, inline on its one thread.

use std::io;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The two key spaces of the log store: entries by index, and its metadata
/// (vote, committed, last purged).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tree {
    Log,
    Meta,
}

/// Called with each key and value a scan meets; false stops the scan.
pub type Visit<'a> = dyn FnMut(&[u8], &[u8]) -> io::Result<bool> + 'a;

/// Keys and values as bytes, written without syncing until [`LogDisk::flush`].
pub trait LogDisk: Send + Sync + 'static {
    fn get(&self, tree: Tree, key: &[u8]) -> io::Result<Option<Vec<u8>>>;
    fn insert(&self, tree: Tree, key: &[u8], value: Vec<u8>) -> io::Result<()>;
    /// Removes `keys` at once: after a crash, all of them or none.
    fn remove(&self, tree: Tree, keys: Vec<Vec<u8>>) -> io::Result<()>;
    /// Visits the pairs from `from` up to `to` in key order until `visit`
    /// returns false.
    fn scan(
        &self,
        tree: Tree,
        from: Bound<&[u8]>,
        to: Bound<&[u8]>,
        visit: &mut Visit<'_>,
    ) -> io::Result<()>;
    fn last(&self, tree: Tree) -> io::Result<Option<(Vec<u8>, Vec<u8>)>>;
    /// Makes every write before it durable. Blocking.
    fn flush(&self) -> io::Result<()>;
}

/// How blocking storage work (a flush, a snapshot) runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offload {
    /// On a thread of its own, so that the runtime goes on meanwhile.
    Thread,
    /// On the calling task after 4 simulated milliseconds of I/O: the
    /// simulation's single thread, where every step must happen in an order
    /// the seed decides, and other tasks go on while the disk works.
    Inline,
}

impl Offload {
    pub async fn run<T: Send + 'static>(
        self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<T> {
        match self {
            Offload::Thread => tokio::task::spawn_blocking(f)
                .await
                .map_err(|e| io::Error::other(format!("storage thread: {e}"))),
            Offload::Inline => {
                tokio::time::sleep(std::time::Duration::from_millis(4)).await;
                Ok(f())
            }
        }
    }
}

/// The log store's trees in one sled database.
pub struct SledLog {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
    /// sled's file, and the bytes inserted since its clean pages were last
    /// dropped from the kernel's page cache (see [`SledLog::flush`]).
    file: PathBuf,
    inserted: AtomicUsize,
}

/// Bytes inserted between two drops of sled's file from the page cache:
/// thousands of small writes, a few dozen entries of a bulk load.
const DROP_CACHE_AFTER: usize = 1 << 20;

impl SledLog {
    /// The trees of `db`, the sled database in `dir`.
    pub fn open(db: &sled::Db, dir: &Path) -> Result<Self, sled::Error> {
        Ok(SledLog {
            db: db.clone(),
            log: db.open_tree(crate::raft::trees::LOG)?,
            meta: db.open_tree(crate::raft::trees::RAFT_META)?,
            file: dir.join("db"),
            inserted: AtomicUsize::new(0),
        })
    }

    /// Drops the clean pages of sled's file from the kernel's page cache.
    ///
    /// Why: Linux (6.x, ext4 here) keeps what was written in large chunks
    /// as large folios, up to 64 KiB here. When sled later reuses that part
    /// of its file for a small write, the whole folio is dirtied and
    /// written back: after a bulk load of 19 KB entries each 220-byte
    /// write cost 40-60 KiB of disk writes (`write_bytes`), against 5 KiB
    /// in a file that only ever saw small writes. Dropped, the pages come
    /// back as small ones. sled reads through its own cache, so losing the
    /// kernel's copy costs little; dirty pages are never dropped.
    fn drop_cached(&self) {
        #[cfg(target_os = "linux")]
        if let Ok(f) = std::fs::File::open(&self.file) {
            use std::os::fd::AsRawFd;
            // SAFETY: posix_fadvise reads only its arguments, and the
            // descriptor stays open for the call.
            let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            if r != 0 {
                tracing::debug!("posix_fadvise({}): error {r}", self.file.display());
            }
        }
    }

    fn tree(&self, tree: Tree) -> &sled::Tree {
        match tree {
            Tree::Log => &self.log,
            Tree::Meta => &self.meta,
        }
    }
}

fn sled_io(e: sled::Error) -> io::Error {
    match e {
        sled::Error::Io(e) => e,
        e => io::Error::other(e),
    }
}

impl LogDisk for SledLog {
    fn get(&self, tree: Tree, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        Ok(self
            .tree(tree)
            .get(key)
            .map_err(sled_io)?
            .map(|v| v.to_vec()))
    }

    fn insert(&self, tree: Tree, key: &[u8], value: Vec<u8>) -> io::Result<()> {
        self.inserted.fetch_add(value.len(), Ordering::Relaxed);
        self.tree(tree).insert(key, value).map_err(sled_io)?;
        Ok(())
    }

    fn remove(&self, tree: Tree, keys: Vec<Vec<u8>>) -> io::Result<()> {
        let mut batch = sled::Batch::default();
        for k in keys {
            batch.remove(k);
        }
        self.tree(tree).apply_batch(batch).map_err(sled_io)
    }

    fn scan(
        &self,
        tree: Tree,
        from: Bound<&[u8]>,
        to: Bound<&[u8]>,
        visit: &mut Visit<'_>,
    ) -> io::Result<()> {
        for kv in self.tree(tree).range::<&[u8], _>((from, to)) {
            let (k, v) = kv.map_err(sled_io)?;
            if !visit(&k, &v)? {
                break;
            }
        }
        Ok(())
    }

    fn last(&self, tree: Tree) -> io::Result<Option<(Vec<u8>, Vec<u8>)>> {
        Ok(self
            .tree(tree)
            .last()
            .map_err(sled_io)?
            .map(|(k, v)| (k.to_vec(), v.to_vec())))
    }

    /// Flushes, then drops sled's file from the page cache once a
    /// `DROP_CACHE_AFTER` bytes were inserted since the last time ([`SledLog::drop_cached`]):
    /// after the flush, so that what was written is clean and can go.
    fn flush(&self) -> io::Result<()> {
        self.db.flush().map_err(sled_io)?;
        if self.inserted.load(Ordering::Relaxed) >= DROP_CACHE_AFTER {
            self.inserted.store(0, Ordering::Relaxed);
            self.drop_cached();
        }
        Ok(())
    }
}

/// The marker's file: two slots written in place, laid out anew atomically.
pub trait MarkerFile: Send + Sync + 'static {
    /// The whole file; `None` if there is none.
    fn read(&self) -> io::Result<Option<Vec<u8>>>;
    /// Overwrites `bytes` at `offset` and syncs them.
    fn write_at(&self, offset: u64, bytes: &[u8]) -> io::Result<()>;
    /// Replaces the whole file with `bytes`, durably and atomically.
    fn replace(&self, bytes: &[u8]) -> io::Result<()>;
}

/// A marker file at a path.
pub struct DirFile {
    path: PathBuf,
}

impl DirFile {
    pub fn at(path: &Path) -> Self {
        DirFile {
            path: path.to_path_buf(),
        }
    }
}

impl MarkerFile for DirFile {
    fn read(&self) -> io::Result<Option<Vec<u8>>> {
        match std::fs::read(&self.path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sector-aligned writes bypass the page cache (`O_DIRECT`) where the
    /// file system allows it: through the cache, any write dirties (and
    /// writes back) a whole 4 KiB page, eight times a marker update.
    /// Elsewhere (tmpfs, a disk of 4 KiB sectors) through the cache.
    fn write_at(&self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        #[cfg(target_os = "linux")]
        if offset.is_multiple_of(512) && bytes.len().is_multiple_of(512) {
            match write_direct(&self.path, offset, bytes) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                done => return done,
            }
        }
        // Opened per update: the file may have been replaced (a restore).
        let f = std::fs::File::options().write(true).open(&self.path)?;
        f.write_all_at(bytes, offset)?;
        f.sync_data()
    }

    fn replace(&self, bytes: &[u8]) -> io::Result<()> {
        use std::io::Write;
        let tmp = self.path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_data()?;
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

/// Writes `bytes` at `offset` with `O_DIRECT` and syncs them; `EINVAL` where
/// the file system or the device's sector size does not allow it.
#[cfg(target_os = "linux")]
fn write_direct(path: &Path, offset: u64, bytes: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    // Direct I/O wants the buffer aligned too: 4 KiB covers any sector size.
    const ALIGN: usize = 4096;
    let mut buf = vec![0u8; bytes.len() + ALIGN];
    let start = buf.as_ptr().align_offset(ALIGN);
    let aligned = &mut buf[start..start + bytes.len()];
    aligned.copy_from_slice(bytes);
    let f = std::fs::File::options()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    f.write_all_at(aligned, offset)?;
    // The data is on the device, perhaps only in its cache: flush that.
    f.sync_data()
}
