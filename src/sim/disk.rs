//! A simulated disk under one node's log store and marker. Writes land in
//! a volatile view at once and become durable at the next flush; a crash
//! keeps the durable state plus a prefix of the writes since (the unflushed
//! suffix lost, or torn inside an append). A flush can fail (EIO), the disk
//! can be full (ENOSPC for writes that allocate: sled's, not the marker's
//! in-place slots), and a marker write can fail. Each process a node runs
//! gets its own handle; a crash retires it, so a task of the dead process
//! that is still scheduled can change nothing.

use std::collections::BTreeMap;
use std::io;
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::raft::storage::disk::{LogDisk, MarkerFile, Tree, Visit};

type Trees = BTreeMap<(Tree, Vec<u8>), Vec<u8>>;

#[derive(Clone)]
enum Write {
    Put(Tree, Vec<u8>, Vec<u8>),
    Remove(Tree, Vec<Vec<u8>>),
}

fn apply(trees: &mut Trees, w: &Write) {
    match w {
        Write::Put(t, k, v) => {
            trees.insert((*t, k.clone()), v.clone());
        }
        Write::Remove(t, keys) => {
            for k in keys {
                trees.remove(&(*t, k.clone()));
            }
        }
    }
}

#[derive(Default)]
struct State {
    durable: Trees,
    current: Trees,
    pending: Vec<Write>,
    marker: Option<Vec<u8>>,
    /// The process whose handle may write; bumped by a crash.
    process: u64,
    full: bool,
    failing_flushes: u32,
    failing_marker_writes: u32,
}

/// One node's disk, kept across its restarts.
#[derive(Clone, Default)]
pub struct Disk(Arc<Mutex<State>>);

/// The disk as one process of the node sees it.
pub struct Handle {
    disk: Disk,
    process: u64,
}

impl Disk {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A handle for a new process of the node.
    pub fn handle(&self) -> Arc<Handle> {
        Arc::new(Handle {
            disk: self.clone(),
            process: self.lock().process,
        })
    }

    /// The process stops: the writes since the last flush are kept up to
    /// `kept` of them (a prefix), the rest is lost.
    pub fn crash(&self, kept: impl FnOnce(usize) -> usize) {
        let mut s = self.lock();
        let n = kept(s.pending.len()).min(s.pending.len());
        let pending = std::mem::take(&mut s.pending);
        for w in &pending[..n] {
            apply(&mut s.durable, w);
        }
        s.current = s.durable.clone();
        s.process += 1;
    }

    /// The process number of the next handle.
    pub fn process(&self) -> u64 {
        self.lock().process
    }

    /// Unflushed writes, for choosing how much a crash keeps.
    pub fn unflushed(&self) -> usize {
        self.lock().pending.len()
    }

    pub fn set_full(&self, full: bool) {
        self.lock().full = full;
    }

    pub fn fail_flushes(&self, n: u32) {
        self.lock().failing_flushes = n;
    }

    pub fn fail_marker_writes(&self, n: u32) {
        self.lock().failing_marker_writes = n;
    }
}

fn gone() -> io::Error {
    io::Error::other("the process that opened this disk has stopped")
}

fn enospc() -> io::Error {
    io::Error::from_raw_os_error(28)
}

impl Handle {
    /// The disk's state, if this handle's process is still the running one.
    fn live(&self) -> io::Result<MutexGuard<'_, State>> {
        let s = self.disk.lock();
        if s.process != self.process {
            return Err(gone());
        }
        Ok(s)
    }

    fn write(&self, w: Write) -> io::Result<()> {
        let mut s = self.live()?;
        if s.full && matches!(w, Write::Put(..)) {
            return Err(enospc());
        }
        apply(&mut s.current, &w);
        s.pending.push(w);
        Ok(())
    }
}

impl LogDisk for Handle {
    fn get(&self, tree: Tree, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        Ok(self.live()?.current.get(&(tree, key.to_vec())).cloned())
    }

    fn insert(&self, tree: Tree, key: &[u8], value: Vec<u8>) -> io::Result<()> {
        self.write(Write::Put(tree, key.to_vec(), value))
    }

    fn remove(&self, tree: Tree, keys: Vec<Vec<u8>>) -> io::Result<()> {
        self.write(Write::Remove(tree, keys))
    }

    fn scan(
        &self,
        tree: Tree,
        from: Bound<&[u8]>,
        to: Bound<&[u8]>,
        visit: &mut Visit<'_>,
    ) -> io::Result<()> {
        let key = |b: Bound<&[u8]>| b.map(|k| (tree, k.to_vec()));
        // Copied out: `visit` may call back into the disk.
        let pairs: Vec<(Vec<u8>, Vec<u8>)> = {
            let s = self.live()?;
            let lower = match key(from) {
                Bound::Unbounded => Bound::Included((tree, Vec::new())),
                b => b,
            };
            s.current
                .range((lower, key(to)))
                .take_while(|((t, _), _)| *t == tree)
                .map(|((_, k), v)| (k.clone(), v.clone()))
                .collect()
        };
        for (k, v) in pairs {
            if !visit(&k, &v)? {
                break;
            }
        }
        Ok(())
    }

    fn last(&self, tree: Tree) -> io::Result<Option<(Vec<u8>, Vec<u8>)>> {
        Ok(self
            .live()?
            .current
            .iter()
            .rev()
            .find(|((t, _), _)| *t == tree)
            .map(|((_, k), v)| (k.clone(), v.clone())))
    }

    fn flush(&self) -> io::Result<()> {
        let mut s = self.live()?;
        if s.failing_flushes > 0 {
            s.failing_flushes -= 1;
            return Err(io::Error::other("simulated fsync failure (EIO)"));
        }
        if s.full && s.pending.iter().any(|w| matches!(w, Write::Put(..))) {
            return Err(enospc());
        }
        let pending = std::mem::take(&mut s.pending);
        for w in &pending {
            apply(&mut s.durable, w);
        }
        Ok(())
    }
}

impl MarkerFile for Handle {
    fn read(&self) -> io::Result<Option<Vec<u8>>> {
        Ok(self.live()?.marker.clone())
    }

    fn write_at(&self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        let mut s = self.live()?;
        if s.failing_marker_writes > 0 {
            s.failing_marker_writes -= 1;
            return Err(io::Error::other("simulated marker write failure (EIO)"));
        }
        let file = s.marker.get_or_insert_with(Vec::new);
        let end = offset as usize + bytes.len();
        if file.len() < end {
            file.resize(end, 0);
        }
        file[offset as usize..end].copy_from_slice(bytes);
        Ok(())
    }

    fn replace(&self, bytes: &[u8]) -> io::Result<()> {
        let mut s = self.live()?;
        if s.full {
            return Err(enospc());
        }
        s.marker = Some(bytes.to_vec());
        Ok(())
    }
}
