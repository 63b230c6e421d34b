//! The current snapshot, in its own file beside sled
//! (`<data_dir>/roster.snapshot`): a magic string, then the snapshot encoded
//! with its checksum ([`stored`](super::stored)). Written whole to a
//! temporary file, fsynced and renamed over the old one, so a crash leaves
//! the old snapshot or the new one, never a mix. Outside sled, so that
//! writing a multi-megabyte snapshot does not hold up the log's group commit,
//! which flushes the same sled database. A backup (`Cluster.SaveSnapshot`,
//! `roster snapshot save`) is a file of the same format.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::stored::{self, CodecError};

pub const SNAPSHOT_FILE: &str = "roster.snapshot";
/// Names the file's format; a later format gets another.
const MAGIC: &[u8; 8] = b"RSTRSNP1";
/// Bytes written between syncs of a snapshot file.
const SYNC_EVERY: usize = 4 << 20;

/// The cause is part of the message and not a `source`: callers print the
/// message alone, and an error chain would repeat the cause.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotFileError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{0} is not a Roster snapshot (it does not start with the snapshot file's magic)")]
    NotASnapshot(PathBuf),
    #[error("{path} is damaged: {error}")]
    Damaged { path: PathBuf, error: CodecError },
}

pub struct SnapshotFile {
    path: PathBuf,
}

impl SnapshotFile {
    pub fn in_dir(dir: &Path) -> Self {
        Self::at(&dir.join(SNAPSHOT_FILE))
    }

    /// A snapshot file anywhere, such as a backup.
    pub fn at(path: &Path) -> Self {
        SnapshotFile {
            path: path.to_path_buf(),
        }
    }

    /// The file's bytes for `v`.
    pub fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, CodecError> {
        let body = stored::encode(v)?;
        Ok([MAGIC.as_slice(), &body].concat())
    }

    /// `bytes` (the file's, or a backup's as received), verified against the
    /// checksum; `path` names them in errors.
    pub fn decode<T: DeserializeOwned>(bytes: &[u8], path: &Path) -> Result<T, SnapshotFileError> {
        let body = bytes
            .strip_prefix(MAGIC)
            .ok_or_else(|| SnapshotFileError::NotASnapshot(path.to_path_buf()))?;
        stored::decode(body).map_err(|error| SnapshotFileError::Damaged {
            path: path.to_path_buf(),
            error,
        })
    }

    pub fn exists(&self) -> bool {
        self.path.exists()
    }

    /// The file's size in bytes; 0 if there is none.
    pub fn size(&self) -> Result<u64, SnapshotFileError> {
        match std::fs::metadata(&self.path) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(error) => Err(SnapshotFileError::Io {
                path: self.path.clone(),
                error,
            }),
        }
    }

    /// Replaces the file with `v`, durably: written, fsynced, renamed, and the
    /// directory fsynced so the rename survives a crash.
    pub fn write<T: Serialize>(&self, v: &T) -> Result<(), SnapshotFileError> {
        let body = stored::encode(v).map_err(|error| SnapshotFileError::Damaged {
            path: self.path.clone(),
            error,
        })?;
        self.write_parts(&[MAGIC.as_slice(), &body])
    }

    /// Replaces the file with `bytes` (already in the file's format), durably.
    pub fn write_bytes(&self, bytes: &[u8]) -> Result<(), SnapshotFileError> {
        self.write_parts(&[bytes])
    }

    /// Writes `parts` one after another into the temporary file, syncing
    /// every `SYNC_EVERY` bytes: a million-instance snapshot is ~150 MB, and
    /// one fsync of all of it at the end held the log's own fsyncs (same
    /// disk, same journal) for hundreds of milliseconds, stalling writes.
    fn write_parts(&self, parts: &[&[u8]]) -> Result<(), SnapshotFileError> {
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |error| SnapshotFileError::Io { path, error }
        };
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        for chunk in parts.iter().flat_map(|p| p.chunks(SYNC_EVERY)) {
            f.write_all(chunk).map_err(io(&tmp))?;
            if chunk.len() == SYNC_EVERY {
                f.sync_data().map_err(io(&tmp))?;
            }
        }
        f.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, &self.path).map_err(io(&self.path))?;
        if let Some(dir) = self.path.parent() {
            // A bare file name's parent is empty: the current directory.
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io(dir))?;
        }
        Ok(())
    }

    /// The snapshot, verified against its checksum; `None` if there is none.
    pub fn read<T: DeserializeOwned>(&self) -> Result<Option<T>, SnapshotFileError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => {
                return Err(SnapshotFileError::Io {
                    path: self.path.clone(),
                    error,
                })
            }
        };
        Self::decode(&bytes, &self.path).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_snapshot_reads_back_and_damage_is_reported() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = SnapshotFile::in_dir(dir.path());
        assert!(file.read::<Vec<u32>>().expect("no file yet").is_none());
        file.write(&vec![1u32, 2, 3]).expect("write");
        file.write(&vec![4u32, 5]).expect("replace");
        assert_eq!(file.read::<Vec<u32>>().expect("read"), Some(vec![4, 5]));
        assert!(!dir.path().join("roster.snapshot.tmp").exists());
        // Larger than a sync chunk: written and synced in pieces.
        let big: Vec<u8> = (0..(2 * SYNC_EVERY + 5)).map(|i| i as u8).collect();
        file.write(&big).expect("write in chunks");
        assert_eq!(file.read::<Vec<u8>>().expect("read"), Some(big));
        file.write(&vec![4u32, 5]).expect("replace");

        let path = dir.path().join(SNAPSHOT_FILE);
        let mut bytes = std::fs::read(&path).expect("bytes");
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).expect("flip a bit");
        let e = file.read::<Vec<u32>>().expect_err("damaged");
        assert!(e.to_string().contains("damaged: checksum mismatch"), "{e}");

        std::fs::write(&path, b"something else").expect("overwrite");
        let e = file.read::<Vec<u32>>().expect_err("not a snapshot");
        assert!(e.to_string().contains("not a Roster snapshot"), "{e}");
    }
}
