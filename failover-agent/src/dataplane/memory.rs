//! What the maps cost in kernel memory, logged at start so an operator
//! sizing `node.flow_capacity` sees the bill. An estimate from the kernel's
//! layouts: a hash map entry carries about 48 bytes of bookkeeping beside
//! its key and value (each rounded up to 8), plus a 16-byte bucket per
//! power-of-two slot; an array holds its values rounded up to 8; per-CPU
//! maps hold one copy per possible CPU.

use std::mem::size_of;

use failover_common::{
    Addr6, Backend, BackendStats, DEVMAP_MAX, Flow, FlowKey, MAX_BACKENDS, MAX_SERVICES, NextHop,
    Node, Node6, PENDING_MAX, Pending, RING_SLOTS, Reverse, ReverseKey, Ring, STATS_SLOTS, Service,
    ServiceKey, ServiceStats, VipFilter, names,
};

const HASH_ENTRY_OVERHEAD: u64 = 48;
const BUCKET: u64 = 16;

fn round8(n: usize) -> u64 {
    (n as u64).div_ceil(8) * 8
}

fn hash(key: usize, value: usize, entries: u32) -> u64 {
    let e = u64::from(entries);
    e * (HASH_ENTRY_OVERHEAD + round8(key) + round8(value)) + e.next_power_of_two() * BUCKET
}

fn array(value: usize, entries: u32) -> u64 {
    u64::from(entries) * round8(value)
}

/// Each map's estimated size in bytes, with `flow_capacity` entries in the
/// flow tables and `cpus` possible CPUs.
pub fn estimate(flow_capacity: u32, cpus: u32) -> Vec<(&'static str, u64)> {
    let cpus = u64::from(cpus.max(1));
    vec![
        (names::NODE, array(size_of::<Node>(), 1)),
        (names::VIP_FILTER, array(size_of::<VipFilter>(), 1)),
        (
            names::SERVICES,
            hash(size_of::<ServiceKey>(), size_of::<Service>(), MAX_SERVICES),
        ),
        (names::BACKENDS, array(size_of::<Backend>(), MAX_BACKENDS)),
        (
            names::RINGS,
            array(size_of::<Ring>(), MAX_SERVICES * RING_SLOTS),
        ),
        (
            names::FLOWS,
            hash(size_of::<FlowKey>(), size_of::<Flow>(), flow_capacity),
        ),
        (
            names::REVERSE,
            hash(size_of::<ReverseKey>(), size_of::<Reverse>(), flow_capacity),
        ),
        (names::PENDING, array(size_of::<Pending>(), PENDING_MAX)),
        (names::DEVMAP, hash(4, 4, DEVMAP_MAX)),
        (names::STATS, cpus * array(8, STATS_SLOTS)),
        (
            names::SVC_STATS,
            cpus * array(size_of::<ServiceStats>(), MAX_SERVICES),
        ),
        (
            names::BE_STATS,
            cpus * array(size_of::<BackendStats>(), MAX_BACKENDS),
        ),
        (
            names::NEXTHOPS,
            cpus * array(size_of::<NextHop>(), MAX_BACKENDS),
        ),
        (names::LAST_HOPS, array(size_of::<NextHop>(), MAX_BACKENDS)),
        // IPv6: the same tables with 16-byte addresses, sized alike.
        (names::NODE6, array(size_of::<Node6>(), 1)),
        (
            names::SERVICES6,
            hash(
                size_of::<ServiceKey<Addr6>>(),
                size_of::<Service>(),
                MAX_SERVICES,
            ),
        ),
        (
            names::BACKEND_ADDR6,
            array(size_of::<Addr6>(), MAX_BACKENDS),
        ),
        (
            names::FLOWS6,
            hash(
                size_of::<FlowKey<Addr6>>(),
                size_of::<Flow>(),
                flow_capacity,
            ),
        ),
        (
            names::REVERSE6,
            hash(
                size_of::<ReverseKey<Addr6>>(),
                size_of::<Reverse<Addr6>>(),
                flow_capacity,
            ),
        ),
        (
            names::PENDING6,
            array(size_of::<Pending<Addr6>>(), PENDING_MAX),
        ),
        (
            names::NEXTHOPS6,
            cpus * array(size_of::<NextHop<Addr6>>(), MAX_BACKENDS),
        ),
        (
            names::LAST_HOPS6,
            array(size_of::<NextHop<Addr6>>(), MAX_BACKENDS),
        ),
    ]
}

/// The number of possible CPUs (per-CPU maps are sized by it).
pub fn possible_cpus() -> u32 {
    std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| {
            s.trim()
                .split(',')
                .map(|r| match r.split_once('-') {
                    Some((a, b)) => Some(b.parse::<u32>().ok()? - a.parse::<u32>().ok()? + 1),
                    None => r.parse::<u32>().ok().map(|_| 1),
                })
                .sum::<Option<u32>>()
        })
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// The default sizes on a 64-CPU node: the budget an operator plans
    /// for. RINGS is the largest fixed part: 128 rings of 65,537 backend
    /// ids (33.5 MB), so that every service can use the largest Maglev
    /// table and flip between two of them; that is worth its memory on an
    /// edge node, which has GBs. The flow tables scale with
    /// `flow_capacity`; the IPv6 ones (`FLOWS6`, `REVERSE6`) have as many
    /// entries as the IPv4 ones, with larger keys and values (about 90 MiB
    /// more at the default size).
    #[test]
    fn the_default_sizes_fit_the_budget() {
        let maps = estimate(failover_common::FLOWS_MAX, 64);
        let get = |n: &str| maps.iter().find(|(m, _)| *m == n).unwrap().1;
        assert_eq!(get(names::RINGS), 128 * 262_152);
        let total: u64 = maps.iter().map(|(_, b)| b).sum();
        assert!(total <= 224 * MIB, "{} MiB", total / MIB);
        assert!(get(names::FLOWS6) + get(names::REVERSE6) <= 96 * MIB);
        assert!(get(names::FLOWS) + get(names::REVERSE) <= 72 * MIB);
        // About 264 bytes a flow in the two tables: 264 MiB per 1M.
        let big = estimate(1 << 20, 64);
        let flows = |m: &[(&str, u64)]| {
            m.iter()
                .filter(|(n, _)| [names::FLOWS, names::REVERSE].contains(n))
                .map(|(_, b)| b)
                .sum::<u64>()
        };
        assert!(flows(&big) <= 270 * MIB, "{}", flows(&big) / MIB);
    }

    #[test]
    fn possible_cpus_reads_ranges() {
        assert!(possible_cpus() >= 1);
    }
}
