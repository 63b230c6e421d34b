use std::path::PathBuf;

use prost::Message;

/// The API clients may call; gRPC reflection describes only these.
const PUBLIC: &[&str] = &["roster/v1/registry.proto"];
/// Node-to-node transport and the example's service: compiled, never advertised.
const INTERNAL: &[&str] = &["roster/v1/raft.proto", "roster/examples/echo.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let all: Vec<&str> = PUBLIC.iter().chain(INTERNAL).copied().collect();
    for p in &all {
        println!("cargo:rerun-if-changed=proto/{p}");
    }
    // Only the node serves these services: a client-only build (no `server`
    // feature) gets the messages and client stubs, and no reflection data.
    let server = std::env::var_os("CARGO_FEATURE_SERVER").is_some();
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // protox compiles in pure Rust, so building needs no system protoc.
    if server {
        let public = protox::compile(PUBLIC, ["proto"])?.encode_to_vec();
        std::fs::write(out.join("roster_public_descriptor.bin"), &public)?;
        // The HTTP/JSON API's serde impls: the proto3 JSON mapping
        // (lowerCamelCase names, enums by name, 64-bit integers as strings).
        pbjson_build::Builder::new()
            .register_descriptors(&public)?
            .out_dir(&out)
            .build(&[".roster.v1"])?;
    }
    let fds = protox::compile(all, ["proto"])?;
    // The messages and the client stubs.
    tonic_prost_build::configure()
        .build_server(false)
        .codec_path("crate::codec::Codec")
        .compile_fds(fds.clone())?;
    if server {
        // The servers, on their own (proto.rs includes them beside the
        // messages): every message is the one generated above, except what
        // the watch streams send, which is encoded once and shared between
        // streams (crate::codec::encoded).
        let dir = out.join("server");
        std::fs::create_dir_all(&dir)?;
        tonic_prost_build::configure()
            .build_client(false)
            .codec_path("crate::codec::Codec")
            .extern_path(".roster.v1", "crate::proto::v1")
            .extern_path(".roster.raft.v1", "crate::proto::raft_v1")
            .extern_path(".roster.examples", "crate::proto::echo")
            .extern_path(
                ".roster.v1.WatchResponse",
                "crate::codec::encoded::WatchResponse",
            )
            .extern_path(
                ".roster.v1.WatchServicesResponse",
                "crate::codec::encoded::WatchServicesResponse",
            )
            .out_dir(&dir)
            .compile_fds(fds)?;
    }
    Ok(())
}
