//! The registry itself: what an instance is, what a valid one looks like, the
//! catalogue every node holds, and the watch hub that streams its changes.
//! Nothing here knows about Raft, sled or gRPC.

pub mod acl;
pub mod catalog;
pub mod leases;
pub mod model;
pub mod namespace;
pub mod validate;
pub mod watch;

pub use catalog::Catalog;
pub use model::{
    Command, CommandResponse, Event, EventKind, HealthStatus, Instance, Outcome, Proposal,
};
