//! Roster: a Raft-replicated service registry.
//!
//! The crate is laid out by layer; `ARCHITECTURE.md` walks a write, a read and a
//! watch event through them.

pub mod api;
pub mod client;
pub mod codec;
pub mod config;
pub mod error;
pub mod health;
pub mod metrics;
pub mod net;
pub mod node;
pub mod proto;
pub mod raft;
pub mod registry;
