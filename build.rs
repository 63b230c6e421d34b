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
    tonic_prost_build::configure()
        .build_server(server)
        .codec_path("crate::codec::Codec")
        .compile_fds(protox::compile(all, ["proto"])?)?;
    Ok(())
}
