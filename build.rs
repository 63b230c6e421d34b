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
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // protox compiles in pure Rust, so building needs no system protoc.
    let public = protox::compile(PUBLIC, ["proto"])?;
    std::fs::write(
        out.join("roster_public_descriptor.bin"),
        public.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .codec_path("crate::codec::Codec")
        .compile_fds(protox::compile(all, ["proto"])?)?;
    Ok(())
}
