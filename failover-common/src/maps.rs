//! Map names, sizes, keys and values: the contract between the XDP program
//! and the agent. Read this file to know every map at a glance.

/// Map names as the kernel and bpffs see them (at most 15 bytes).
pub mod names {
    pub const NODE: &str = "NODE";
    pub const VIP_FILTER: &str = "VIP_FILTER";
    pub const SERVICES: &str = "SERVICES";
    pub const BACKENDS: &str = "BACKENDS";
    pub const RINGS: &str = "RINGS";
    pub const FLOWS: &str = "FLOWS";
    pub const REVERSE: &str = "REVERSE";
    pub const DEVMAP: &str = "DEVMAP";
    pub const STATS: &str = "STATS";
    pub const SVC_STATS: &str = "SVC_STATS";
    pub const BE_STATS: &str = "BE_STATS";
    pub const NEXTHOPS: &str = "NEXTHOPS";
    pub const PENDING: &str = "PENDING";
    pub const PATH_MSS: &str = "PATH_MSS";
    pub const ICMP_LIMIT: &str = "ICMP_LIMIT";
    pub const JUMPS: &str = "JUMPS";
    pub const EVIDENCE: &str = "EVIDENCE";
    /// The program's name in the object file.
    pub const PROGRAM: &str = "failover_xdp";
    /// The trivial pass-through program attached to veth peers and used as
    /// the benchmark baseline.
    pub const PASS_PROGRAM: &str = "failover_pass";
    /// ICMP errors, tail-called from the program (`JUMPS[JUMP_ICMP]`):
    /// verified on its own, so its checksum loop costs the main program's
    /// verifier budget nothing.
    pub const ICMP_PROGRAM: &str = "failover_icmp";
    /// TCP segments with no established flow (the half-open path),
    /// tail-called (`JUMPS[JUMP_NEW_TCP]`) for the same reason.
    pub const NEW_TCP_PROGRAM: &str = "failover_new_tcp";
    /// IPv6 frames, tail-called (`JUMPS[JUMP_V6]`): the IPv6 walk is its
    /// own program, so it costs the IPv4 path and its verifier budget
    /// nothing.
    pub const V6_PROGRAM: &str = "failover_v6";
    /// IPv6 TCP segments with no established flow (`JUMPS[JUMP_NEW_TCP6]`).
    pub const NEW_TCP6_PROGRAM: &str = "failover_new_tcp6";
    /// IPv6 backend -> SNAT address (`JUMPS[JUMP_REV6]`). The IPv6 walk
    /// is split where IPv4's is not: its 16-byte addresses need more of
    /// the 512-byte stack, which each program has to itself.
    pub const REV6_PROGRAM: &str = "failover_rev6";
    /// IPv6 packet too big answers (`JUMPS[JUMP_TOOBIG6]`).
    pub const TOOBIG6_PROGRAM: &str = "failover_toobig6";
    /// ICMPv6 errors about NATed flows (`JUMPS[JUMP_ICMP6]`).
    pub const ICMP6_PROGRAM: &str = "failover_icmp6";
    pub const NODE6: &str = "NODE6";
    pub const SERVICES6: &str = "SERVICES6";
    pub const BACKEND_ADDR6: &str = "BACKEND_ADDR6";
    pub const FLOWS6: &str = "FLOWS6";
    pub const REVERSE6: &str = "REVERSE6";
    pub const PENDING6: &str = "PENDING6";
    pub const NEXTHOPS6: &str = "NEXTHOPS6";
    pub const LAST_HOPS: &str = "LAST_HOPS";
    pub const LAST_HOPS6: &str = "LAST_HOPS6";
    pub const SCRATCH: &str = "SCRATCH";
    pub const TOOBIG_MTU: &str = "TOOBIG_MTU";
    /// Benchmark programs, which the agent never loads: an in-kernel
    /// traffic generator for BPF_PROG_TEST_RUN in live-frames mode
    /// ([`GenConfig`]) and a sink for the receiving end.
    pub const GEN_PROGRAM: &str = "failover_gen";
    pub const DROP_PROGRAM: &str = "failover_drop";
    /// `GEN[0]`: the generator's [`GenConfig`](super::GenConfig); not
    /// pinned.
    pub const GEN: &str = "GEN";
}

pub const MAX_SERVICES: u32 = 64;
pub const MAX_BACKENDS: u32 = 1024;
/// Capacity of a Maglev ring; a service may use a smaller prime.
pub const RING_MAX: usize = 65_537;
/// Default ring size: prime, so every backend's permutation covers it.
pub const RING_DEFAULT: u32 = 65_537;
/// Ring slots per service: the active one and the one being written.
pub const RING_SLOTS: u32 = 2;
pub const FLOWS_MAX: u32 = 262_144;
/// `PENDING` has one slot per NAT port: as many half-open flows fit at once
/// as the SNAT port range holds.
pub const PENDING_MAX: u32 = 1 << 16;
/// `Service::half_open_ms` when it is 0: the agent's default.
pub const HALF_OPEN_MS_DEFAULT: u32 = 10_000;
pub const DEVMAP_MAX: u32 = 64;
/// Ring entry meaning "no backend" (an empty, fail-closed ring).
pub const NO_BACKEND: u32 = u32::MAX;
/// SNAT ports tried for one new flow before giving up.
pub const SNAT_PROBES: u32 = 32;
/// Ring slots probed when the hashed slot's backend is marked down but the
/// planner has not yet rebuilt the ring.
pub const RESELECT_TRIES: u32 = 16;
/// Words in the VIP pre-filter bitmap (64 bits each).
pub const VIP_FILTER_WORDS: usize = 1024;
/// Per-source slots of the frag-needed rate limit (`ICMP_LIMIT`), a
/// power of two: a source's slot is its address hashed.
pub const ICMP_SLOTS: u32 = 4096;
/// One frag-needed per source slot per this long, per CPU: at most 100 a
/// second, each much smaller than the packet it answers.
pub const ICMP_INTERVAL_NS: u64 = 10_000_000;
/// `JUMPS` index of the ICMP program.
pub const JUMP_ICMP: u32 = 0;
/// `JUMPS` index of the TCP new-flow program.
pub const JUMP_NEW_TCP: u32 = 1;
/// `JUMPS` index of the IPv6 program.
pub const JUMP_V6: u32 = 2;
/// `JUMPS` index of the IPv6 TCP new-flow program.
pub const JUMP_NEW_TCP6: u32 = 3;
/// `JUMPS` index of the IPv6 reverse program (backend -> SNAT address).
pub const JUMP_REV6: u32 = 4;
/// `JUMPS` index of the IPv6 packet-too-big answer.
pub const JUMP_TOOBIG6: u32 = 5;
/// `JUMPS` index of the ICMPv6 error program.
pub const JUMP_ICMP6: u32 = 6;
/// Every tail-called program and its `JUMPS` slot: the agent loads and
/// sets these, once each.
pub const JUMP_TABLE: [(u32, &str); 7] = [
    (JUMP_ICMP, names::ICMP_PROGRAM),
    (JUMP_NEW_TCP, names::NEW_TCP_PROGRAM),
    (JUMP_V6, names::V6_PROGRAM),
    (JUMP_NEW_TCP6, names::NEW_TCP6_PROGRAM),
    (JUMP_REV6, names::REV6_PROGRAM),
    (JUMP_TOOBIG6, names::TOOBIG6_PROGRAM),
    (JUMP_ICMP6, names::ICMP6_PROGRAM),
];
/// One slot spare, so that a later program does not change the pinned
/// map's size (an agent cannot reuse a pinned `JUMPS` of another size).
pub const JUMP_SLOTS: u32 = 8;
/// Slots in the per-reason counter array (room to add reasons).
pub const STATS_SLOTS: u32 = 64;
/// `BPF_F_NO_COMMON_LRU`: per-CPU LRU free lists, so inserting a flow on
/// one CPU never takes a lock another CPU holds.
pub const LRU_FLAGS: u32 = 1 << 1;

/// Service flag: TCP flows pinned to a down backend get an RST from the
/// edge (clients retry at once). Without it they are re-selected.
pub const SVC_F_RESET: u32 = 1;

/// Backend states in `BACKENDS`.
pub mod state {
    /// Slot not in use.
    pub const UNUSED: u8 = 0;
    /// Takes new and existing flows.
    pub const UP: u8 = 1;
    /// Existing flows are reset or moved; never selected.
    pub const DOWN: u8 = 2;
    /// Existing flows continue; never selected for new ones.
    pub const DRAINING: u8 = 3;
}

/// Handshake progress: `Pending::state` (`FLOW_SYN_SENT`, `FLOW_ANSWERED`,
/// `FLOW_PICKUP`) until the flow is promoted to `FLOWS`/`REVERSE`, whose
/// entries are `FLOW_ESTABLISHED`.
pub const FLOW_SYN_SENT: u8 = 0;
pub const FLOW_ESTABLISHED: u8 = 1;
/// The backend's SYN-ACK came back; the client's ACK of it promotes.
pub const FLOW_ANSWERED: u8 = 2;
/// A segment with ACK and no flow (its entries were lost); the backend's
/// first answer that is not an RST promotes.
pub const FLOW_PICKUP: u8 = 3;

/// `Flow::fins` and `Reverse::fins`, kept the same on both entries: the
/// sides that have sent a FIN, and the FINs the other side has ACKed. The
/// segment that ACKs the second FIN (the last ACK, from either side, also
/// when both sides closed at once) is translated and frees both entries: a
/// closed connection does not wait for the LRU, and long-lived flows are
/// not evicted for dead ones.
pub const FIN_CLIENT: u8 = 1;
pub const FIN_BACKEND: u8 = 2;
/// The backend ACKed the client's FIN.
pub const ACKED_CLIENT: u8 = 4;
/// The client ACKed the backend's FIN.
pub const ACKED_BACKEND: u8 = 8;
pub const ACKED_BOTH: u8 = ACKED_CLIENT | ACKED_BACKEND;

/// `Flow::data`: the client has sent payload on this flow; counted once
/// per flow in `BackendStats::asked`.
pub const DATA_ASKED: u8 = 1;
/// `Reverse::data`: the backend has sent payload on this flow; counted
/// once per flow in `BackendStats::answered`.
pub const DATA_ANSWERED: u8 = 1;

/// `NODE[0]`: this edge node's settings, written by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Node {
    /// Source address for traffic toward backends; 0 = not configured.
    pub snat_be: u32,
    /// SNAT port range, host order, inclusive.
    pub port_min: u16,
    pub port_max: u16,
    /// Seed of the flow hash; equal on every edge node of a fleet.
    pub seed: u32,
    pub flags: u32,
}

/// An address as the maps hold it: its network-order bytes in native
/// words (`u32` for IPv4, [`Addr6`] for IPv6), so a key is compared and
/// hashed as the packet carries it. The per-family code is generic over
/// this; the IPv4 instance compiles to what it was before IPv6.
///
/// Every implementation is valid all zero (keys are built over zeroed
/// values).
pub trait Addr: Copy + Default + PartialEq + Eq + core::hash::Hash + core::fmt::Debug {
    /// One word standing for the address in the flow hash and the VIP
    /// filter (the address itself for IPv4).
    fn word(self) -> u32;
    /// Folds replacing `old` by `new` into a checksum that covers it
    /// (RFC 1624), as the L4 pseudo-header does.
    fn replace_in(check: u16, old: Self, new: Self) -> u16;
    /// What replacing `old` by `new` adds to a checksum, unfolded
    /// (`checksum::apply`).
    fn delta(old: Self, new: Self) -> u32;
    /// The one's-complement sum of its 16-bit words, unfolded.
    fn sum(self) -> u32;
}

/// An IPv6 address: its 16 network-order bytes in four native words.
pub type Addr6 = [u32; 4];

impl Addr for u32 {
    #[inline(always)]
    fn word(self) -> u32 {
        self
    }
    #[inline(always)]
    fn replace_in(check: u16, old: Self, new: Self) -> u16 {
        crate::checksum::replace32(check, old, new)
    }
    #[inline(always)]
    fn delta(old: Self, new: Self) -> u32 {
        crate::checksum::delta32(old, new)
    }
    #[inline(always)]
    fn sum(self) -> u32 {
        (self & 0xffff) + (self >> 16)
    }
}

impl Addr for Addr6 {
    /// The words folded by XOR. The VIP filter, the flow hash and the SNAT
    /// port offset each mix the word afterwards; a chain of four `mix32`
    /// here was about 60 serial instructions on every IPv6 packet's
    /// classification (`passthrough6` 25 → 18 ns own cost, `bench
    /// datapath`). Neither fold is keyed, so a client choosing its
    /// addresses could collide them either way: only cost hangs on it.
    #[inline(always)]
    fn word(self) -> u32 {
        self[0] ^ self[1] ^ self[2] ^ self[3]
    }
    #[inline(always)]
    fn replace_in(mut check: u16, old: Self, new: Self) -> u16 {
        let mut i = 0;
        while i < 4 {
            check = crate::checksum::replace32(check, old[i], new[i]);
            i += 1;
        }
        check
    }
    #[inline(always)]
    fn delta(old: Self, new: Self) -> u32 {
        let mut d = 0;
        let mut i = 0;
        while i < 4 {
            d += crate::checksum::delta32(old[i], new[i]);
            i += 1;
        }
        d
    }
    #[inline(always)]
    fn sum(self) -> u32 {
        let mut s = 0;
        let mut i = 0;
        while i < 4 {
            s += (self[i] & 0xffff) + (self[i] >> 16);
            i += 1;
        }
        s
    }
}

/// `NODE6[0]`: the node's IPv6 source address toward IPv6 backends
/// (all zero: no IPv6 service). Ports and seed come from `NODE`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Node6 {
    pub snat: Addr6,
}

/// `BACKEND_ADDR6[id]`: an IPv6 backend's address. Its port and state stay
/// in `BACKENDS[id]` (whose `addr_be` is 0), so one write moves a backend
/// of either family, and the IPv4 entry stays 8 bytes.
pub type BackendAddr6 = Addr6;

/// `VIP_FILTER[0]`: a bitmap of `mix32(vip) % (64 * VIP_FILTER_WORDS)`.
/// Lets a packet that is not for a VIP leave after one inlined array read
/// instead of a hash lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipFilter {
    pub bits: [u64; VIP_FILTER_WORDS],
}

impl VipFilter {
    pub const BITS: u32 = 64 * VIP_FILTER_WORDS as u32;

    #[must_use]
    pub const fn empty() -> Self {
        Self {
            bits: [0; VIP_FILTER_WORDS],
        }
    }

    #[inline(always)]
    #[must_use]
    pub const fn slot(vip_be: u32) -> (usize, u64) {
        let bit = crate::hash::mix32(vip_be) % Self::BITS;
        ((bit / 64) as usize, 1u64 << (bit % 64))
    }

    /// The slot of a VIP of either family (IPv6 VIPs share the bitmap).
    #[inline(always)]
    #[must_use]
    pub fn slot_of<A: Addr>(vip: A) -> (usize, u64) {
        Self::slot(vip.word())
    }

    pub fn insert<A: Addr>(&mut self, vip: A) {
        let (w, m) = Self::slot_of(vip);
        self.bits[w] |= m;
    }

    #[must_use]
    pub fn may_contain<A: Addr>(&self, vip: A) -> bool {
        let (w, m) = Self::slot_of(vip);
        self.bits[w] & m != 0
    }
}

/// `SERVICES` key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey<A = u32> {
    pub vip_be: A,
    pub port_be: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// `SERVICES` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// Index into `SVC_STATS` and base of this service's `RINGS` slots.
    pub id: u32,
    pub flags: u32,
    /// Which of the two ring slots packets read (0 or 1).
    pub active_slot: u32,
    /// Entries of the ring in use (a prime, at most `RING_MAX`).
    pub ring_size: u32,
    /// Bumped by the agent on every flip; reported, not used per packet.
    pub generation: u64,
    /// How long a TCP flow may stay half-open (`PENDING`) before its slot
    /// is free again, in ms; 0: `HALF_OPEN_MS_DEFAULT`.
    pub half_open_ms: u32,
    pub _pad: u32,
}

impl Service {
    #[inline(always)]
    #[must_use]
    pub const fn ring_index(id: u32, slot: u32) -> u32 {
        id * RING_SLOTS + (slot & 1)
    }
}

/// `BACKENDS[id]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr_be: u32,
    pub port_be: u16,
    /// One of `state::*`.
    pub state: u8,
    pub _pad: u8,
}

/// `RINGS[service_id * 2 + slot]`: a Maglev lookup table of backend ids.
/// One value holds a whole ring, so the agent writes it in one syscall.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ring {
    pub backends: [u32; RING_MAX],
}

/// `FLOWS` key: the client's 5-tuple as received.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey<A = u32> {
    pub src_be: A,
    pub dst_be: A,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl<A: Addr> FlowKey<A> {
    /// A key with its padding zero. Built field by field over a zeroed
    /// value: a literal's 3-byte `_pad` makes LLVM call `memset`, a loop
    /// the BPF verifier walks again at every call.
    #[inline(always)]
    #[must_use]
    pub fn new(src_be: A, dst_be: A, sport_be: u16, dport_be: u16, proto: u8) -> Self {
        // SAFETY: every field, an `Addr` included, is valid all zero.
        let mut k: Self = unsafe { core::mem::zeroed() };
        k.src_be = src_be;
        k.dst_be = dst_be;
        k.sport_be = sport_be;
        k.dport_be = dport_be;
        k.proto = proto;
        k
    }
}

/// A cached FIB result. A FIB lookup costs several times the rest of the
/// per-packet work, so the result is kept per backend and CPU (`NEXTHOPS`,
/// toward backends) and per flow (`Reverse::nh`, toward clients) and
/// refreshed after `NEXTHOP_TTL_NS`: neighbour changes are picked up
/// within that time.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop<A = u32> {
    /// Egress interface; 0 = nothing cached.
    pub ifindex: u32,
    /// The destination this was resolved for: a backend whose address
    /// changed misses the cache instead of using a stale MAC.
    pub dst_be: A,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    /// The egress interface's MTU: a packet longer than this is dropped on
    /// the cached path as on a lookup.
    pub mtu: u16,
    pub _pad: [u8; 2],
    /// `bpf_ktime_get_coarse_ns` when looked up.
    pub at_ns: u64,
}

/// How long a cached next hop stays valid.
pub const NEXTHOP_TTL_NS: u64 = 250_000_000;

/// How long a backend's last resolved next hop (`LAST_HOPS`, shared by
/// all CPUs) is still used when the FIB has no neighbour for it. When a
/// link loses carrier the kernel deletes its neighbours at once; a SYN
/// dropped then is neither sent nor passive-health evidence, so a dead
/// backend would wait for its active probe to be ejected. The kernel
/// itself keeps using a STALE neighbour while it re-probes; this is the
/// edge's equivalent, bounded so that a neighbour gone for good stops
/// being used (the agent's probes keep live backends' neighbours
/// resolved, far more often than this).
pub const LAST_HOP_TTL_NS: u64 = 1_000_000_000;

/// `Flow::seen` and `Reverse::seen` hold `bpf_ktime_get_coarse_ns() >>
/// SEEN_SHIFT`: units of about a millisecond (2^20 ns), which wrap after
/// 52 days in 32 bits. The coarse clock costs one read of a cached value
/// per packet, and the agent reads the same clock
/// (`CLOCK_MONOTONIC_COARSE`).
pub const SEEN_SHIFT: u32 = 20;

/// `FLOWS` value: where the flow is pinned.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    pub backend_id: u32,
    pub service_id: u32,
    pub nat_port_be: u16,
    /// `FIN_*` and `ACKED_*` bits seen so far.
    pub fins: u8,
    /// `DATA_ASKED` once the client sent payload (the wedge signal).
    pub data: u8,
    /// Service flags at creation (so the fast path needs no service lookup).
    pub svc_flags: u32,
    /// Once the backend sent a FIN: the acknowledgment number (host order)
    /// with which the client ACKs it.
    pub fin_ack: u32,
    /// When the client's last packet came (`SEEN_SHIFT`): the agent
    /// expires idle flows from it and `Reverse::seen`.
    pub seen: u32,
    /// `bpf_ktime_get_ns` when the flow was created.
    pub created_ns: u64,
}

/// `REVERSE` key: a backend's reply as received.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ReverseKey<A = u32> {
    pub backend_be: A,
    pub snat_be: A,
    pub bport_be: u16,
    pub nat_port_be: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl<A: Addr> ReverseKey<A> {
    /// A key with its padding zero (see `FlowKey::new`).
    #[inline(always)]
    #[must_use]
    pub fn new(backend_be: A, snat_be: A, bport_be: u16, nat_port_be: u16, proto: u8) -> Self {
        // SAFETY: every field, an `Addr` included, is valid all zero.
        let mut k: Self = unsafe { core::mem::zeroed() };
        k.backend_be = backend_be;
        k.snat_be = snat_be;
        k.bport_be = bport_be;
        k.nat_port_be = nat_port_be;
        k.proto = proto;
        k
    }
}

/// `REVERSE` value: the original tuple to restore.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reverse<A = u32> {
    pub client_be: A,
    pub vip_be: A,
    pub cport_be: u16,
    pub vport_be: u16,
    pub backend_id: u32,
    pub service_id: u32,
    /// `FLOW_ESTABLISHED` (half-open flows live in `PENDING`).
    pub state: u8,
    /// `FIN_*` and `ACKED_*` bits seen so far.
    pub fins: u8,
    /// `DATA_ANSWERED` once the backend sent payload (the wedge signal).
    pub data: u8,
    pub _pad: u8,
    /// Once the client sent a FIN: the acknowledgment number (host order)
    /// with which the backend ACKs it.
    pub fin_ack: u32,
    /// When the backend's last packet came (`SEEN_SHIFT`).
    pub seen: u32,
    pub created_ns: u64,
    /// Next hop toward the client.
    pub nh: NextHop<A>,
}

/// `PENDING[nat_port]` (host order): a flow the edge
/// forwarded whose handshake is not complete (a SYN, or a segment picked up
/// mid-stream). Half-open state lives here, apart from `FLOWS`/`REVERSE`, so
/// a SYN flood never evicts an established flow; a slot is free again once
/// `expires_ns` passes, and when every probed slot is taken a new flow takes
/// the one that expires first, so no flood holds the SNAT ports. Claiming a
/// slot is two stores into an array, with no allocation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pending<A = u32> {
    /// `bpf_ktime_get_ns` from which the slot is free (0: never used).
    pub expires_ns: u64,
    /// When the opening segment was forwarded: the base of the handshake
    /// RTT.
    pub created_ns: u64,
    pub client_be: A,
    pub vip_be: A,
    pub cport_be: u16,
    pub vport_be: u16,
    pub backend_be: A,
    pub bport_be: u16,
    pub proto: u8,
    /// `FLOW_SYN_SENT`, `FLOW_ANSWERED` or `FLOW_PICKUP`.
    pub state: u8,
    pub backend_id: u32,
    pub service_id: u32,
    pub svc_flags: u32,
    /// The acknowledgment number (host order) that answers the client's
    /// latest SYN (its ISN + 1). A SYN-ACK or RST counts for passive health
    /// only if it carries it: an off-path forger does not know it.
    pub syn_ack: u32,
    /// Once answered: the acknowledgment number with which the client
    /// ACKs the backend's SYN-ACK. Only that ACK promotes the flow, so a
    /// spoofed SYN, which never sees the SYN-ACK, never reaches `FLOWS`.
    pub synack_ack: u32,
}

impl<A: Addr> Pending<A> {
    /// The client's tuple of this flow: its `FLOWS` key once promoted.
    #[inline(always)]
    #[must_use]
    pub fn flow_key(&self) -> FlowKey<A> {
        FlowKey::new(
            self.client_be,
            self.vip_be,
            self.cport_be,
            self.vport_be,
            self.proto,
        )
    }
}

/// Traffic counters, per CPU: `SVC_STATS[service_id]` is exactly this,
/// and every `BE_STATS` entry starts with it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub fwd_packets: u64,
    pub fwd_bytes: u64,
    pub rev_packets: u64,
    pub rev_bytes: u64,
    pub new_flows: u64,
    /// RSTs the edge sent to clients (of this service, or of this backend
    /// after it went down).
    pub resets: u64,
}

/// `SVC_STATS[service_id]`, per CPU.
pub type ServiceStats = Traffic;

/// Length of the headers the generator writes: Ethernet, IPv4 without
/// options, UDP.
pub const GEN_HEADER_LEN: usize = 14 + 20 + 8;

/// `GEN[0]`: what `failover_gen` writes into every frame it runs on
/// before it returns `XDP_TX`: `header` whole, then the UDP source port
/// `base_port + prandom % flows`. Live-frames mode recycles its pages
/// without restoring them, so a frame rewritten on its way (NAT, TTL)
/// would come back rewritten: the whole header is written every time.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GenConfig {
    /// Ethernet, IPv4 and UDP headers; the UDP checksum should be 0
    /// (none), since the port changes.
    pub header: [u8; GEN_HEADER_LEN],
    /// How many source ports, from `base_port` (host order); 0 drops.
    pub flows: u16,
    pub base_port: u16,
}

/// `BE_STATS[backend_id]`, per CPU: traffic plus the handshake signals the
/// passive health detector reads.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendStats {
    pub traffic: Traffic,
    /// SYNs forwarded to the backend that any live backend must answer
    /// (`tcp::SynWorth::Evidence`): the passive detector's input.
    pub syns: u64,
    /// SYN-ACKs that ACK those SYNs.
    pub synacks: u64,
    /// RSTs the backend sent in answer to a SYN (port closed, process dead),
    /// carrying the SYN's acknowledgment number.
    pub syn_rsts: u64,
    /// SYNs forwarded without counting as evidence (data, PSH/URG, options
    /// beyond the vanilla set): a live backend may leave them unanswered.
    pub syns_ignored: u64,
    /// Half-open flows toward this backend whose `PENDING` slot a new flow
    /// took because every probed slot was in use (a SYN flood, or more
    /// half-open flows than the port range holds).
    pub pending_evicted: u64,
    /// Other answers to those SYNs: segments without SYN or RST from the
    /// backend while the handshake is open (a challenge ACK to a SYN on a
    /// tuple it still holds in TIME_WAIT). They offset unanswered SYNs but,
    /// unlike a SYN-ACK, do not clear refusals: a host whose port is closed
    /// sends them too, for its dying connections.
    pub syn_other: u64,
    /// Handshake RTT of the last SYN-ACK seen on this CPU, and when.
    pub rtt_last_ns: u64,
    pub rtt_at_ns: u64,
    /// Established TCP flows whose client sent payload (a request), once
    /// per flow, and those the backend sent payload back on (its first
    /// byte): with `reply_data`, the wedge detector's input
    /// (`health::wedge`).
    pub asked: u64,
    pub answered: u64,
    /// The backend's TCP segments carrying payload, on any flow.
    pub reply_data: u64,
}

impl Traffic {
    /// Adds another CPU's counters (the agent sums the per-CPU values).
    pub fn merge(mut self, o: &Self) -> Self {
        self.fwd_packets += o.fwd_packets;
        self.fwd_bytes += o.fwd_bytes;
        self.rev_packets += o.rev_packets;
        self.rev_bytes += o.rev_bytes;
        self.new_flows += o.new_flows;
        self.resets += o.resets;
        self
    }
}

impl BackendStats {
    /// Adds another CPU's counters; the RTT is the most recently measured
    /// of the two.
    pub fn merge(mut self, o: &Self) -> Self {
        self.traffic = self.traffic.merge(&o.traffic);
        self.syns += o.syns;
        self.synacks += o.synacks;
        self.syn_rsts += o.syn_rsts;
        self.syns_ignored += o.syns_ignored;
        self.pending_evicted += o.pending_evicted;
        self.syn_other += o.syn_other;
        self.asked += o.asked;
        self.answered += o.answered;
        self.reply_data += o.reply_data;
        if o.rtt_at_ns > self.rtt_at_ns {
            self.rtt_at_ns = o.rtt_at_ns;
            self.rtt_last_ns = o.rtt_last_ns;
        }
        self
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, with explicit padding only.
    unsafe impl aya::Pod for Node {}
    unsafe impl aya::Pod for VipFilter {}
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for Service {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for Ring {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for Flow {}
    unsafe impl aya::Pod for NextHop {}
    unsafe impl aya::Pod for ReverseKey {}
    unsafe impl aya::Pod for Reverse {}
    unsafe impl aya::Pod for Pending {}
    unsafe impl aya::Pod for Node6 {}
    unsafe impl aya::Pod for ServiceKey<Addr6> {}
    unsafe impl aya::Pod for FlowKey<Addr6> {}
    unsafe impl aya::Pod for NextHop<Addr6> {}
    unsafe impl aya::Pod for ReverseKey<Addr6> {}
    unsafe impl aya::Pod for Reverse<Addr6> {}
    unsafe impl aya::Pod for Pending<Addr6> {}
    unsafe impl aya::Pod for Traffic {}
    unsafe impl aya::Pod for BackendStats {}
    unsafe impl aya::Pod for GenConfig {}
}

// Layout checks: a size change here must be a deliberate one on both sides.
const _: () = {
    use core::mem::size_of;
    assert!(size_of::<Node>() == 16);
    assert!(size_of::<ServiceKey>() == 8);
    assert!(size_of::<Service>() == 32);
    assert!(size_of::<Pending>() == 56);
    assert!(size_of::<Backend>() == 8);
    assert!(size_of::<FlowKey>() == 16);
    assert!(size_of::<NextHop>() == 32);
    assert!(size_of::<Flow>() == 32);
    assert!(size_of::<ReverseKey>() == 16);
    assert!(size_of::<Reverse>() == 72);
    assert!(size_of::<ServiceStats>() == 48);
    assert!(size_of::<BackendStats>() == 136);
    assert!(size_of::<GenConfig>() == GEN_HEADER_LEN + 4);
    assert!(size_of::<Node6>() == 16);
    assert!(size_of::<ServiceKey<Addr6>>() == 20);
    assert!(size_of::<FlowKey<Addr6>>() == 40);
    assert!(size_of::<NextHop<Addr6>>() == 48);
    assert!(size_of::<ReverseKey<Addr6>>() == 40);
    assert!(size_of::<Reverse<Addr6>>() == 112);
    assert!(size_of::<Pending<Addr6>>() == 96);
};
