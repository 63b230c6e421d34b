//! Code generated from `proto/` at build time.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

pub mod v1 {
    tonic::include_proto!("roster.v1");
    #[cfg(feature = "server")]
    include!(concat!(env!("OUT_DIR"), "/server/roster.v1.rs"));
    // serde for the HTTP/JSON API (proto3 JSON mapping); the node only.
    #[cfg(feature = "server")]
    include!(concat!(env!("OUT_DIR"), "/roster.v1.serde.rs"));

    impl HealthStatus {
        /// A status as one lowercase word (`passing`, `warning`, `critical`,
        /// `maintenance`), as the CLI and Prometheus labels show it;
        /// `unknown` for a value this build does not know.
        pub fn word(status: i32) -> &'static str {
            match HealthStatus::try_from(status) {
                Ok(HealthStatus::Passing) => "passing",
                Ok(HealthStatus::Warning) => "warning",
                Ok(HealthStatus::Critical) => "critical",
                Ok(HealthStatus::Maintenance) => "maintenance",
                _ => "unknown",
            }
        }
    }

    impl WatchServicesRequest {
        /// Follow `service` after `since_revision` (0: from its full state).
        pub fn add(service: impl Into<String>, since_revision: u64) -> Self {
            Self::add_in("", service, since_revision)
        }

        /// Follow `service` of namespace `namespace` (empty: `default`).
        pub fn add_in(
            namespace: impl Into<String>,
            service: impl Into<String>,
            since_revision: u64,
        ) -> Self {
            WatchServicesRequest {
                action: Some(watch_services_request::Action::Add(WatchRequest {
                    service: service.into(),
                    since_revision,
                    namespace: namespace.into(),
                })),
                namespace: String::new(),
            }
        }

        /// Stop following `service`.
        pub fn remove(service: impl Into<String>) -> Self {
            Self::remove_in("", service)
        }

        /// Stop following `service` of namespace `namespace` (empty: `default`).
        pub fn remove_in(namespace: impl Into<String>, service: impl Into<String>) -> Self {
            WatchServicesRequest {
                action: Some(watch_services_request::Action::Remove(service.into())),
                namespace: namespace.into(),
            }
        }
    }
}

/// The node-to-node transport.
#[cfg(feature = "server")]
pub mod raft_v1 {
    tonic::include_proto!("roster.raft.v1");
    include!(concat!(env!("OUT_DIR"), "/server/roster.raft.v1.rs"));
}

/// The echo service of `examples/echo.rs` and the client tests.
pub mod echo {
    tonic::include_proto!("roster.examples");
    #[cfg(feature = "server")]
    include!(concat!(env!("OUT_DIR"), "/server/roster.examples.rs"));
}

/// Encoded `FileDescriptorSet` of the public API only (`roster.v1`), served by
/// gRPC reflection; the Raft transport and the example stay unadvertised.
#[cfg(feature = "server")]
pub const PUBLIC_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/roster_public_descriptor.bin"));
