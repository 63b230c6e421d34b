//! What a member stores: its Raft log ([`log_store`] over the [`disk`] seam),
//! its data directory's [`marker`], snapshot files, the in-memory state machine
//! and the checksummed format of everything written ([`stored`]).

pub mod disk;
pub mod log_store;
pub mod marker;
pub mod snapshot_file;
pub mod state_machine;
pub mod stored;
