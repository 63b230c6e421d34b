//! The storage seam: what the log store and the marker write through. In
//! production the log lives in sled ([`SledLog`]) and the marker in a file
//! ([`DirFile`]), and blocking work runs on threads of its own
//! ([`Offload::Thread`]); the deterministic simulation (`crate::sim`) puts a
//! simulated disk under the same code, inline on its one thread.

use std::io;
use std::ops::Bound;
use std::path::{Path, PathBuf};

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
}

impl SledLog {
    pub fn open(db: &sled::Db) -> Result<Self, sled::Error> {
        Ok(SledLog {
            db: db.clone(),
            log: db.open_tree(crate::raft::trees::LOG)?,
            meta: db.open_tree(crate::raft::trees::RAFT_META)?,
        })
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

    fn flush(&self) -> io::Result<()> {
        self.db.flush().map(|_| ()).map_err(sled_io)
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

    fn write_at(&self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
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
