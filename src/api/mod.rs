//! The public gRPC API: the `Registry` and `Cluster` services, the conversions
//! between protobuf and registry types, forwarding to the leader, and the
//! `[limits]` on what one client may take.

mod body;
pub mod cluster;
pub mod convert;
pub mod forward;
pub mod limits;
pub mod registry;
