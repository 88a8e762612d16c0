//! How much of the kernel's verifier budget (one million instructions
//! walked per program) each program of the XDP object uses. The new-flow
//! programs' half-open scan is a 32-step loop the verifier walks step by
//! step, and small changes to what follows it have taken a program past
//! the limit (docs/datapath.md, "Verifier budget"): this fails first, and
//! says by how much.
//!
//! Needs root: run through `cargo xtask test`.

use aya::{EbpfLoader, programs::Xdp};
use failover_agent::dataplane::OBJECT;

/// The share of the budget a program may use: what is left is the room
/// a change has before the kernel refuses the object.
const HEADROOM_LIMIT: u32 = 800_000;

#[test]
fn every_program_leaves_verifier_headroom() {
    let mut ebpf = EbpfLoader::new()
        .map_max_entries("FLOWS", 4096)
        .map_max_entries("REVERSE", 4096)
        .map_max_entries("FLOWS6", 4096)
        .map_max_entries("REVERSE6", 4096)
        .load(OBJECT)
        .expect("load the object");
    let names: Vec<String> = ebpf.programs().map(|(n, _)| n.to_owned()).collect();
    let mut report = Vec::new();
    for name in &names {
        let prog: &mut Xdp = ebpf.program_mut(name).unwrap().try_into().unwrap();
        prog.load().unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let n = prog
            .info()
            .unwrap()
            .verified_instruction_count()
            .unwrap_or(0);
        report.push((name.clone(), n));
    }
    report.sort_by_key(|r| std::cmp::Reverse(r.1));
    for (name, n) in &report {
        eprintln!("{name:24} {n:>9} instructions verified");
    }
    for (name, n) in &report {
        assert!(
            *n <= HEADROOM_LIMIT,
            "{name}: {n} of the verifier's 1,000,000"
        );
    }
}
