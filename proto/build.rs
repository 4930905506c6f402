//! Compiles `weft/v1/*.proto` with protox (pure Rust, no protoc) and generates the
//! prost messages and tonic services, plus a descriptor set for server reflection.

use prost::Message;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["weft/v1/events.proto", "weft/v1/query.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // Reflection needs the encoded descriptor set; compile_fds does not write it.
    std::fs::write(out.join("weft_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
