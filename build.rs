use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "roster/v1/registry.proto",
        "roster/v1/raft.proto",
        "roster/examples/echo.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed=proto/{p}");
    }
    // protox compiles in pure Rust, so building needs no system protoc.
    let fds = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("roster_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .codec_path("crate::codec::Codec")
        .compile_fds(fds)?;
    Ok(())
}
