// Generates a client for the small subset of etcd's v3 API the benchmark uses
// (proto/etcdserverpb/rpc.proto) with a vendored protoc, like pxemesh-proto does,
// so the build needs no system protobuf compiler and stays on one tonic version.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC.
    unsafe { std::env::set_var("PROTOC", protoc) };
    tonic_prost_build::configure()
        .build_server(false)
        .compile_protos(&["proto/etcdserverpb/rpc.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
