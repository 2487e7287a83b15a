// Generates the pxemesh.v1 types and services with a vendored protoc, so a fresh
// machine builds without a system protobuf-compiler package.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("pxemesh_descriptor.bin"))
        .compile_protos(&["proto/pxemesh/v1/pxemesh.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
