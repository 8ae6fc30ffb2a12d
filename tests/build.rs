//! Generates the conformance model's code and its descriptor set (with every import, as a
//! CloudState user function sends it at discovery). protoc comes from `protoc-bin-vendored`
//! unless `PROTOC` is set.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    let include = protoc_bin_vendored::include_path()?;
    println!("cargo:rerun-if-changed=proto/cloudstate/tck/model/crdt.proto");
    println!("cargo:rerun-if-changed=proto/latticed/test/http_rules.proto");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("model.bin"))
        .compile_protos(
            &[PathBuf::from("proto/cloudstate/tck/model/crdt.proto")],
            &[
                PathBuf::from("proto"),
                PathBuf::from("../proto/proto"),
                include,
            ],
        )?;
    // the interop suite's user function (served by the real JavaScript support library)
    println!("cargo:rerun-if-changed=interop/protos/interop/crdts.proto");
    tonic_prost_build::configure()
        .build_server(false)
        .compile_protos(
            &[PathBuf::from("interop/protos/interop/crdts.proto")],
            &[
                PathBuf::from("interop/protos"),
                PathBuf::from("../proto/proto"),
            ],
        )?;
    // HTTP rules over the model's messages, for the front-end's tests: descriptors only
    std::fs::create_dir_all(out.join("http_rules"))?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .file_descriptor_set_path(out.join("http_rules.bin"))
        .out_dir(out.join("http_rules"))
        .compile_protos(
            &[PathBuf::from("proto/latticed/test/http_rules.proto")],
            &[
                PathBuf::from("proto"),
                PathBuf::from("../proto/proto"),
                protoc_bin_vendored::include_path()?,
            ],
        )?;
    Ok(())
}
