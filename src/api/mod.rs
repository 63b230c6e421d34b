//! The public gRPC API: the `Registry` and `Cluster` services, the conversions
//! between protobuf and registry types, and forwarding to the leader.

pub mod cluster;
pub mod convert;
pub mod forward;
pub mod limits;
pub mod registry;
