//! Openraft's own storage test suite run against the sled-backed log store and
//! state machine, each case on a fresh data directory opened as a node opens it.

// Openraft's storage traits fix the error type to its (large) StorageError.
#![allow(clippy::result_large_err)]

use openraft::testing::{StoreBuilder, Suite};
use openraft::{StorageError, StorageIOError};
use tempfile::TempDir;

use super::storage::{open_storage, Storage};
use crate::config::NodeConfig;
use crate::raft::storage::log_store::LogStore;
use crate::raft::storage::state_machine::StateMachine;
use crate::raft::{NodeId, TypeConfig};

struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for SledBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError<NodeId>> {
        let dir = TempDir::new().map_err(|e| StorageIOError::read(&e))?;
        let any = ([127, 0, 0, 1], 0).into();
        let cfg = NodeConfig::new(1, any, any, dir.path().to_path_buf());
        let Storage {
            db,
            marker,
            state_machine,
            ..
        } = open_storage(&cfg).map_err(|e| StorageIOError::read(&e))?;
        let log_store =
            LogStore::open(&db, &cfg.data_dir, marker).map_err(|e| StorageIOError::read(&e))?;
        Ok((dir, log_store, state_machine))
    }
}

// A plain test, not a tokio one: the suite runs every case on a runtime of its
// own, which cannot be started from inside another.
#[test]
fn openraft_storage_suite() -> Result<(), StorageError<NodeId>> {
    Suite::test_all(SledBuilder)
}
