//! Builds the kernel programs (`weft-collector-ebpf`) for `bpfel-unknown-none` with the nightly
//! toolchain and bpf-linker, so that `cargo build` at the root builds everything; `main.rs`
//! embeds the object with `aya::include_bytes_aligned!`. `AYA_BUILD_SKIP=1` skips it.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

const EBPF_PACKAGE: &str = "weft-collector-ebpf";

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let package = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == EBPF_PACKAGE)
        .ok_or_else(|| anyhow!("{EBPF_PACKAGE} package not found in the workspace"))?;
    let root_dir = package
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", package.manifest_path))?;
    let toolchain = std::env::var("WEFT_EBPF_TOOLCHAIN").ok();
    println!("cargo:rerun-if-env-changed=WEFT_EBPF_TOOLCHAIN");
    let toolchain = match toolchain.as_deref() {
        Some(t) => Toolchain::Custom(t),
        None => Toolchain::Nightly,
    };
    aya_build::build_ebpf(
        [Package {
            name: EBPF_PACKAGE,
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        toolchain,
    )
}
