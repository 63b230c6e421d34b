//! Roster: a Raft-replicated service registry.
//!
//! The crate is laid out by layer; `ARCHITECTURE.md` walks a write, a read and a
//! watch event through them. The public API is the Rust client and the
//! protobuf types (feature `client`); the default feature `server` adds the
//! node, reached only through `main`, the `roster` binary's entry point.

// No function over 80 lines (clippy.toml): long ones hide their steps.
#![warn(clippy::too_many_lines)]

#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "client")]
mod codec;
#[cfg(feature = "client")]
mod grpc;
#[cfg(feature = "client")]
pub mod proto;
#[cfg(feature = "client")]
mod rules;

#[cfg(feature = "server")]
mod api;
#[cfg(feature = "server")]
mod cli;
#[cfg(feature = "server")]
mod config;
#[cfg(feature = "server")]
mod dns;
#[cfg(feature = "server")]
mod error;
#[cfg(feature = "server")]
mod health;
#[cfg(feature = "server")]
mod http;
#[cfg(feature = "server")]
mod metrics;
#[cfg(feature = "server")]
mod net;
#[cfg(feature = "server")]
mod node;
#[cfg(feature = "server")]
mod peers;
#[cfg(feature = "server")]
mod raft;
#[cfg(feature = "server")]
mod registry;
#[cfg(feature = "sim")]
pub mod sim;
#[cfg(feature = "server")]
mod tls;
#[cfg(feature = "server")]
mod xds;

#[cfg(feature = "server")]
pub use cli::main;
