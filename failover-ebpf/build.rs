//! Rebuild the eBPF object when bpf-linker changes, since cargo cannot see
//! the linker as an input otherwise.
use which::which;

fn main() {
    if let Ok(linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
