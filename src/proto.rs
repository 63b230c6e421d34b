//! Code generated from `proto/` at build time.

#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("roster.v1");
}

/// The node-to-node transport.
#[cfg(feature = "server")]
pub mod raft_v1 {
    tonic::include_proto!("roster.raft.v1");
}

/// The echo service of `examples/echo.rs` and the client tests.
pub mod echo {
    tonic::include_proto!("roster.examples");
}

/// Encoded `FileDescriptorSet` of the public API only (`roster.v1`), served by
/// gRPC reflection; the Raft transport and the example stay unadvertised.
#[cfg(feature = "server")]
pub const PUBLIC_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/roster_public_descriptor.bin"));
