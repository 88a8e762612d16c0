//! Builds the XDP program (failover-ebpf) with the nightly toolchain and
//! bpf-linker, and places the object in OUT_DIR for `include_bytes_aligned!`.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let meta = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = meta
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "failover-ebpf")
        .ok_or_else(|| anyhow!("failover-ebpf package not found"))?;
    let root = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    // Watch every source file of the program and of the types it shares
    // with us: a directory given to rerun-if-changed is not rescanned when
    // a file inside it changes, and failover-common is not a build input.
    let common = root.parent().map(|w| w.join("failover-common"));
    for dir in [Some(root.to_path_buf()), common].into_iter().flatten() {
        watch(dir.as_std_path())?;
    }
    aya_build::build_ebpf(
        [Package {
            name: "failover-ebpf",
            root_dir: root.as_str(),
            ..Default::default()
        }],
        Toolchain::default(),
    )
}

fn watch(dir: &std::path::Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n != "target") {
                watch(&path)?;
            }
        } else {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    Ok(())
}
