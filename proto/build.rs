//! Generates Rust code for every `.proto` under `proto/`.
//!
//! protoc comes from the `protoc-bin-vendored` crate unless `PROTOC` is already set, so a fresh
//! machine needs nothing installed beyond cargo.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        std::env::set_var("PROTOC", protoc);
    }
    let include = protoc_bin_vendored::include_path()?;
    let root = PathBuf::from("proto");
    let files = [
        "cloudstate/entity.proto",
        "cloudstate/entity_key.proto",
        "cloudstate/legacy_entity_key.proto",
        "cloudstate/eventing.proto",
        "google/api/http.proto",
        "google/api/annotations.proto",
        "cloudstate/crdt.proto",
        "latticed/crdt.proto",
        "latticed/peer.proto",
        "latticed/route.proto",
        "latticed/admin.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed=proto/{f}");
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("descriptors.bin"))
        .bytes(".latticed")
        .compile_protos(
            &files.iter().map(|f| root.join(f)).collect::<Vec<_>>(),
            &[root, include],
        )?;
    Ok(())
}
