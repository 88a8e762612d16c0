//! Linker settings of the eBPF object, and a rebuild when bpf-linker
//! changes, since cargo cannot see the linker as an input otherwise.
use which::which;

fn main() {
    // Packet fields sit at any alignment (an IPv6 address at byte 22). The
    // kernel allows misaligned packet access where the CPU does (x86,
    // arm64); without this, LLVM reads each such word a byte at a time,
    // and a 16-byte address takes 16 loads and the registers to join them.
    println!("cargo:rustc-link-arg-bins=--cpu-features=+allows-misaligned-mem-access");
    if let Ok(linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
