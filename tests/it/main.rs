//! The multi-process tests as one binary (one link of the harness instead of
//! one per file): a module per area, each once a test binary of its own.
//! `cargo test --test it health::` runs one module's tests. `tests/sim.rs`
//! (feature `sim`, dev profile) and `tests/robustness.rs` (built in release
//! by `tests/robustness/run.sh`) stay binaries of their own, so those builds
//! do not compile every test.

#[path = "../common/mod.rs"]
mod common;

mod api_surface;
mod auth;
mod backup;
mod client;
mod connections;
mod console;
mod consul;
mod containers;
mod dns;
mod haproxy;
mod hardening;
mod health;
mod http;
mod limits;
mod maintenance;
mod membership;
mod namespaces;
mod outside;
mod peer_trust;
mod prometheus;
mod proxy;
mod python_client;
mod recovery;
mod replicas;
mod replication;
mod sessions;
mod slow_links;
mod storage_damage;
mod tls;
mod traefik;
mod validation;
mod watch;
mod xds;
mod xds_python;
