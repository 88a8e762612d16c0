//! How much of the kernel's verifier budget (one million instructions
//! walked per program) each program of the XDP object uses. The new-flow
//! programs' half-open scan once took half of it as a plain loop, and the
//! IPv6 changes then took a program past the limit (docs/datapath.md,
//! "Verifier budget"): this test fails first, and says by how much.
//!
//! Needs root: run through `cargo xtask test`.

use failover_common::names;
use failover_tests::benchprog::BenchProgs;

/// The most a program may use: what is left is the room a change has
/// before the kernel refuses the object.
const HEADROOM_LIMIT: u32 = 800_000;

const PROGRAMS: [&str; 9] = [
    names::PROGRAM,
    names::ICMP_PROGRAM,
    names::NEW_TCP_PROGRAM,
    names::V6_PROGRAM,
    names::NEW_TCP6_PROGRAM,
    names::REV6_PROGRAM,
    names::TOOBIG6_PROGRAM,
    names::ICMP6_PROGRAM,
    names::PASS_PROGRAM,
];

#[test]
fn every_program_leaves_verifier_headroom() {
    // Loaded with every map at one entry, in a pin directory removed on
    // drop: the walk does not depend on the maps' sizes.
    let mut progs = BenchProgs::load(&PROGRAMS).expect("load the object's programs");
    let mut report: Vec<(&str, u32)> = PROGRAMS
        .iter()
        .map(|&p| (p, progs.verified_instructions(p).expect("verified count")))
        .collect();
    report.sort_by_key(|r| std::cmp::Reverse(r.1));
    for (name, n) in &report {
        eprintln!("{name:24} {n:>9} instructions verified");
    }
    assert!(report[0].1 > 10_000, "the counts are real: {report:?}");
    for (name, n) in &report {
        assert!(
            *n <= HEADROOM_LIMIT,
            "{name}: {n} of the verifier's 1,000,000"
        );
    }
}
