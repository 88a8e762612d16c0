//! The maps, declared once; names, sizes and layouts come from
//! failover-common so the agent sees the same contract.
//!
//! Every map is pinned by name, so a restarted agent re-opens the same maps
//! and traffic keeps flowing while it starts.

use aya_ebpf::{
    macros::map,
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray, ProgramArray},
};
use failover_common::{
    Addr6, Backend, BackendStats, DEVMAP_MAX, FLOWS_MAX, Flow, FlowKey, GenConfig, ICMP_SLOTS,
    JUMP_SLOTS, LRU_FLAGS, MAX_BACKENDS, MAX_SERVICES, NextHop, Node, Node6, PENDING_MAX, Pending,
    RING_SLOTS, Reverse, ReverseKey, Ring, STATS_SLOTS, Service, ServiceKey, ServiceStats,
    VipFilter,
};

#[map(name = "NODE")]
pub static NODE: Array<Node> = Array::pinned(1, 0);

#[map(name = "VIP_FILTER")]
pub static VIP_FILTER: Array<VipFilter> = Array::pinned(1, 0);

#[map(name = "SERVICES")]
pub static SERVICES: HashMap<ServiceKey, Service> = HashMap::pinned(MAX_SERVICES, 0);

#[map(name = "BACKENDS")]
pub static BACKENDS: Array<Backend> = Array::pinned(MAX_BACKENDS, 0);

#[map(name = "RINGS")]
pub static RINGS: Array<Ring> = Array::pinned(MAX_SERVICES * RING_SLOTS, 0);

#[map(name = "FLOWS")]
pub static FLOWS: LruHashMap<FlowKey, Flow> = LruHashMap::pinned(FLOWS_MAX, LRU_FLAGS);

#[map(name = "REVERSE")]
pub static REVERSE: LruHashMap<ReverseKey, Reverse> = LruHashMap::pinned(FLOWS_MAX, LRU_FLAGS);

/// Half-open flows, by backend lane and NAT port (see `Pending`).
#[map(name = "PENDING")]
pub static PENDING: Array<Pending> = Array::pinned(PENDING_MAX, 0);

#[map(name = "DEVMAP")]
pub static DEVMAP: DevMapHash = DevMapHash::pinned(DEVMAP_MAX, 0);

#[map(name = "STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::pinned(STATS_SLOTS, 0);

#[map(name = "SVC_STATS")]
pub static SVC_STATS: PerCpuArray<ServiceStats> = PerCpuArray::pinned(MAX_SERVICES, 0);

#[map(name = "BE_STATS")]
pub static BE_STATS: PerCpuArray<BackendStats> = PerCpuArray::pinned(MAX_BACKENDS, 0);

/// Next hop toward each backend, per CPU (no torn MAC writes).
#[map]
pub static NEXTHOPS: PerCpuArray<NextHop> = PerCpuArray::pinned(MAX_BACKENDS, 0);

/// `PATH_MSS[backend id]`: the MSS that fits the path to the backend
/// (`path_mtu` less 40), clamped into SYNs and SYN-ACKs; 0 = no clamp.
/// Apart from `BACKENDS`, so the per-packet entry stays 8 bytes: only
/// handshakes read it.
/// Each backend's last resolved next hop, shared by all CPUs: the
/// fallback when the FIB has no neighbour (`LAST_HOP_TTL_NS`). A CPU
/// whose own `NEXTHOPS` entry is stale or empty still finds one another
/// CPU resolved.
#[map(name = "LAST_HOPS")]
pub static LAST_HOPS: Array<NextHop> = Array::pinned(MAX_BACKENDS, 0);

#[map(name = "PATH_MSS")]
pub static PATH_MSS: Array<u32> = Array::pinned(MAX_BACKENDS, 0);

/// When each source slot last got a frag-needed from the edge (toobig.rs).
#[map(name = "ICMP_LIMIT")]
pub static ICMP_LIMIT: PerCpuArray<u64> = PerCpuArray::pinned(ICMP_SLOTS, 0);

/// Programs the main one tail-calls (`JUMP_*`), each verified on its own.
#[map(name = "JUMPS")]
pub static JUMPS: ProgramArray = ProgramArray::pinned(JUMP_SLOTS, 0);

/// Whether the SYN the main program judged is passive-health evidence,
/// handed to `failover_new_tcp` across the tail call (same CPU, at once).
#[map(name = "EVIDENCE")]
pub static EVIDENCE: PerCpuArray<u32> = PerCpuArray::pinned(1, 0);

/// A per-CPU copy of an ICMP error being checked (icmp.rs): 140 words
/// hold the longest message a router sends (`icmp::MESSAGE_MAX`).
#[map(name = "ICMP_BUF")]
pub static ICMP_BUF: PerCpuArray<[u32; 140]> = PerCpuArray::pinned(1, 0);

/// The same for an ICMPv6 error (icmp6.rs): 310 words hold the longest
/// a router sends (`icmp6::MESSAGE_MAX`).
#[map(name = "ICMP6_BUF")]
pub static ICMP6_BUF: PerCpuArray<[u32; 310]> = PerCpuArray::pinned(1, 0);

// IPv6 (the `failover_v6` programs). Keys and values are the IPv4 ones
// with 16-byte addresses; ids, rings, backend states and counters are
// shared with IPv4.

#[map(name = "NODE6")]
pub static NODE6: Array<Node6> = Array::pinned(1, 0);

#[map(name = "SERVICES6")]
pub static SERVICES6: HashMap<ServiceKey<Addr6>, Service> = HashMap::pinned(MAX_SERVICES, 0);

/// An IPv6 backend's address; its port and state are in `BACKENDS`.
#[map(name = "BACKEND_ADDR6")]
pub static BACKEND_ADDR6: Array<Addr6> = Array::pinned(MAX_BACKENDS, 0);

#[map(name = "FLOWS6")]
pub static FLOWS6: LruHashMap<FlowKey<Addr6>, Flow> = LruHashMap::pinned(FLOWS_MAX, LRU_FLAGS);

#[map(name = "REVERSE6")]
pub static REVERSE6: LruHashMap<ReverseKey<Addr6>, Reverse<Addr6>> =
    LruHashMap::pinned(FLOWS_MAX, LRU_FLAGS);

#[map(name = "PENDING6")]
pub static PENDING6: Array<Pending<Addr6>> = Array::pinned(PENDING_MAX, 0);

#[map(name = "NEXTHOPS6")]
pub static NEXTHOPS6: PerCpuArray<NextHop<Addr6>> = PerCpuArray::pinned(MAX_BACKENDS, 0);

#[map(name = "LAST_HOPS6")]
pub static LAST_HOPS6: Array<NextHop<Addr6>> = Array::pinned(MAX_BACKENDS, 0);

/// Per-CPU scratch space for values too large for the 512-byte stack
/// beside everything else a path holds (`scratch.rs`).
#[map(name = "SCRATCH")]
pub static SCRATCH: PerCpuArray<[u64; crate::scratch::WORDS]> =
    PerCpuArray::pinned(crate::scratch::SLOTS, 0);

/// The MTU a packet-too-big answer carries, handed to `failover_toobig6`
/// across the tail call (same CPU, at once).
#[map(name = "TOOBIG_MTU")]
pub static TOOBIG_MTU: PerCpuArray<u32> = PerCpuArray::pinned(1, 0);

/// `GEN[0]`: the benchmark generator's frame (`generator.rs`). Not pinned: each
/// load of the benchmark programs has its own.
#[map(name = "GEN")]
pub static GEN: Array<GenConfig> = Array::with_max_entries(1, 0);
