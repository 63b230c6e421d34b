//! Storage formats 2 to 4 kept the applied state (and, in format 2, the
//! current snapshot) in sled; format 5 keeps it only in the snapshot file.
//! These move a data directory of those formats on, at start.

use std::path::Path;

use super::{damaged, snapshot_meta, Applied, SnapshotPayload, StoredSnapshot};
use crate::error::Error;
use crate::raft::storage::snapshot_file::SnapshotFile;
use crate::raft::storage::stored::decode;
use crate::raft::trees;

/// Storage formats 2 to 4 also kept the applied state in sled's state
/// machine tree (see [`migrate_tree`]): instances as `i:<service>\0<id>`,
/// service settings `s:<service>`, tokens `t:<accessor>`, sessions `x:<id>`,
/// and metadata under `m:`.
pub(super) const INSTANCE_PREFIX: &[u8] = b"i:";
pub(super) const SERVICE_PREFIX: &[u8] = b"s:";
pub(super) const TOKEN_PREFIX: &[u8] = b"t:";
pub(super) const SESSION_PREFIX: &[u8] = b"x:";
pub(super) const ACL_BOOTSTRAPPED: &[u8] = b"m:acl_bootstrapped";
pub(super) const LAST_APPLIED: &[u8] = b"m:last_applied";
pub(super) const MEMBERSHIP: &[u8] = b"m:membership";
/// Where storage format 2 kept the current snapshot (see [`migrate_snapshot`]).
pub(super) const SLED_SNAPSHOT: &[u8] = b"m:snapshot";

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

/// Storage formats 2 to 4 to 5: the applied state that sled's state machine
/// tree held, every record verified, becomes the snapshot file where it
/// reaches further than that file; then the tree goes. The file is durable
/// before the tree is dropped, so a crash in between only repeats this.
pub fn migrate_tree(db: &sled::Db, dir: &Path) -> crate::error::Result<()> {
    let sm = db.open_tree(trees::STATE_MACHINE)?;
    if let Some(payload) = read_tree(&sm)? {
        let file = SnapshotFile::in_dir(dir);
        let current: Option<StoredSnapshot> =
            file.read().map_err(|e| Error::Storage(e.to_string()))?;
        let behind = current.is_none_or(|s| s.meta.last_log_id < payload.applied.last_applied);
        if behind {
            let data = payload.encode().map_err(damaged("state"))?;
            let snap = StoredSnapshot {
                meta: snapshot_meta(payload.applied),
                data,
            };
            file.write(&snap)
                .map_err(|e| Error::Storage(e.to_string()))?;
        }
    }
    drop(sm);
    db.drop_tree(trees::STATE_MACHINE)?;
    Ok(())
}

/// The state sled's state machine tree holds (formats 2 to 4), if any.
fn read_tree(sm: &sled::Tree) -> crate::error::Result<Option<SnapshotPayload>> {
    let Some(last) = sm.get(LAST_APPLIED)? else {
        return Ok(None);
    };
    let applied = Applied {
        last_applied: decode(&last).map_err(damaged("last applied id"))?,
        membership: sm
            .get(MEMBERSHIP)?
            .map(|b| decode(&b))
            .transpose()
            .map_err(damaged("membership"))?
            .unwrap_or_default(),
    };
    // Each record under `prefix` with the key after the prefix, decoded.
    fn records<T: serde::de::DeserializeOwned>(
        sm: &sled::Tree,
        prefix: &[u8],
        what: &str,
    ) -> crate::error::Result<Vec<(String, T)>> {
        sm.scan_prefix(prefix)
            .map(|kv| {
                let (k, v) = kv?;
                let name = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                let shown = name.replace('\0', "/");
                Ok((
                    name,
                    decode(&v).map_err(damaged(format!("{what} {shown}")))?,
                ))
            })
            .collect()
    }
    fn values<T>(records: Vec<(String, T)>) -> Vec<T> {
        records.into_iter().map(|(_, v)| v).collect()
    }
    Ok(Some(SnapshotPayload {
        applied,
        instances: values(records(sm, INSTANCE_PREFIX, "instance")?),
        services: records(sm, SERVICE_PREFIX, "service")?,
        tokens: values(records(sm, TOKEN_PREFIX, "token")?),
        acl_bootstrapped: match sm.get(ACL_BOOTSTRAPPED)? {
            Some(b) => decode(&b).map_err(damaged("ACL bootstrap flag"))?,
            None => false,
        },
        sessions: values(records(sm, SESSION_PREFIX, "session")?),
        namespaces: Vec::new(),
        session_namespaces: Vec::new(),
    }))
}
