//! Generates the Connect RPC service traits and message types from the checked-in descriptor set
//! (`proto/envd.fds`), so that a clean machine needs no `protoc`. Regenerate the descriptor set
//! with `proto/regen.sh` after editing a `.proto` file.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/envd.fds");
    connectrpc_build::Config::new()
        .files(&["process/process.proto", "filesystem/filesystem.proto"])
        .descriptor_set("proto/envd.fds")
        .include_file("_connectrpc.rs")
        .compile()?;
    Ok(())
}
