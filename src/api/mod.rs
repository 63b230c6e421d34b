//! The public gRPC API: the `Registry`, `Cluster` and `Acl` services, the
//! conversions between protobuf and registry types, authorization by token,
//! forwarding to the leader, and the `[limits]` on what one client may take.

pub mod acl;
pub mod auth;
mod body;
pub mod cluster;
pub mod convert;
pub mod forward;
pub mod limits;
pub mod registry;
