//! The address family: what differs between IPv4 and IPv6 on the NAT path
//! (header access and rewrite, the family's maps, the FIB lookup, the
//! answers the edge builds), behind one trait. `forward`, `pending` and
//! `reverse` are generic over it, so both families run the same flow logic;
//! each instance is its own code in its own program (`failover_xdp` and
//! `failover_new_tcp` for IPv4, `failover_v6` and `failover_new_tcp6` for
//! IPv6), and the IPv4 one compiles to what it was before IPv6.

use aya_ebpf::{
    bindings::bpf_fib_lookup,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::XdpContext,
};
use core::marker::PhantomData;
use failover_common::{
    Addr, Addr6, Backend, Flow, FlowKey, NextHop, Node, Pending, Reason, Reverse, ReverseKey,
    Service, ServiceKey,
};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

use crate::maps::{
    BACKEND_ADDR6, FLOWS, FLOWS6, LAST_HOPS, LAST_HOPS6, NEXTHOPS, NEXTHOPS6, NODE6, PENDING,
    PENDING6, REVERSE, REVERSE6, SERVICES, SERVICES6,
};

/// A validated IP header of family `F` without options or extension
/// headers, and the TCP, UDP or ICMP header after it.
pub struct Ip<F: Family> {
    pub hdr: *mut F::Hdr,
    pub l4_off: usize,
    pub proto: u8,
    /// The whole IP packet's length (header included), as the header says.
    pub tot_len: u16,
    pub _f: PhantomData<F>,
}

impl<F: Family> Ip<F> {
    /// The L4 segment's length, as the IP header bounds it.
    #[inline(always)]
    pub fn l4_len(&self) -> u16 {
        self.tot_len - F::HDR_LEN as u16
    }

    #[inline(always)]
    pub fn l3_off(&self) -> usize {
        self.l4_off - F::HDR_LEN
    }
}

pub trait Family: Sized {
    type A: Addr + 'static;
    type Hdr;
    const HDR_LEN: usize;
    /// `bpf_fib_lookup`'s family.
    const AF: u8;
    /// The program that takes this family's TCP segments with no
    /// established flow (`JUMPS`).
    const JUMP_NEW_TCP: u32;

    fn src(ip: &Ip<Self>) -> Self::A;
    fn dst(ip: &Ip<Self>) -> Self::A;
    /// Rewrites source and destination and takes one off the TTL or hop
    /// limit (with the IPv4 header checksum). Returns the address change
    /// as a checksum delta for the L4 pseudo-header (`l4::nat`).
    fn rewrite(ip: &Ip<Self>, src: &Self::A, dst: &Self::A) -> u32;
    /// The node's source address toward this family's backends.
    fn snat(node: &Node) -> Self::A;
    /// Backend `id`'s address (`be` is `BACKENDS[id]`).
    fn backend_addr(id: u32, be: &Backend) -> Option<Self::A>;
    /// Fills the lookup's addresses.
    fn fib(p: &mut bpf_fib_lookup, src: Self::A, dst: Self::A);
    /// Makes the IP header at `l3_off` a fresh one from the packet's
    /// destination back to its source, carrying `l4_len` bytes of `proto`:
    /// the header of an answer the edge builds in place (an RST).
    fn answer_header(ctx: &XdpContext, l3_off: usize, proto: u8, l4_len: u16) -> Option<()>;
    /// A packet too long for its next hop's MTU (toobig.rs).
    fn too_big(ctx: &XdpContext, ip: &Ip<Self>, mtu: u16, now: u64) -> (u32, Reason);

    fn services() -> &'static HashMap<ServiceKey<Self::A>, Service>;
    fn flows() -> &'static LruHashMap<FlowKey<Self::A>, Flow>;
    fn reverse() -> &'static LruHashMap<ReverseKey<Self::A>, Reverse<Self::A>>;
    fn pending() -> &'static Array<Pending<Self::A>>;
    fn nexthops() -> &'static PerCpuArray<NextHop<Self::A>>;
    fn last_hops() -> &'static Array<NextHop<Self::A>>;
}

pub struct V4;
pub struct V6;

impl Family for V4 {
    type A = u32;
    type Hdr = Ipv4Hdr;
    const HDR_LEN: usize = Ipv4Hdr::LEN;
    const AF: u8 = 2;
    const JUMP_NEW_TCP: u32 = failover_common::JUMP_NEW_TCP;

    #[inline(always)]
    fn src(ip: &Ip<Self>) -> u32 {
        u32::from_ne_bytes(unsafe { (*ip.hdr).src_addr })
    }
    #[inline(always)]
    fn dst(ip: &Ip<Self>) -> u32 {
        u32::from_ne_bytes(unsafe { (*ip.hdr).dst_addr })
    }
    #[inline(always)]
    fn rewrite(ip: &Ip<Self>, src: &u32, dst: &u32) -> u32 {
        crate::ipv4::rewrite(ip.hdr, *src, *dst)
    }
    #[inline(always)]
    fn snat(node: &Node) -> u32 {
        node.snat_be
    }
    #[inline(always)]
    fn backend_addr(_id: u32, be: &Backend) -> Option<u32> {
        Some(be.addr_be)
    }
    #[inline(always)]
    fn fib(p: &mut bpf_fib_lookup, src: u32, dst: u32) {
        p.__bindgen_anon_3.ipv4_src = src;
        p.__bindgen_anon_4.ipv4_dst = dst;
    }
    #[inline(always)]
    fn answer_header(ctx: &XdpContext, l3_off: usize, proto: u8, l4_len: u16) -> Option<()> {
        crate::ipv4::answer_header(ctx, l3_off, proto, l4_len)
    }
    #[inline(always)]
    fn too_big(ctx: &XdpContext, ip: &Ip<Self>, mtu: u16, now: u64) -> (u32, Reason) {
        crate::toobig::answer(ctx, ip, mtu, now)
    }
    #[inline(always)]
    fn services() -> &'static HashMap<ServiceKey<u32>, Service> {
        &SERVICES
    }
    #[inline(always)]
    fn flows() -> &'static LruHashMap<FlowKey<u32>, Flow> {
        &FLOWS
    }
    #[inline(always)]
    fn reverse() -> &'static LruHashMap<ReverseKey<u32>, Reverse<u32>> {
        &REVERSE
    }
    #[inline(always)]
    fn pending() -> &'static Array<Pending<u32>> {
        &PENDING
    }
    #[inline(always)]
    fn nexthops() -> &'static PerCpuArray<NextHop<u32>> {
        &NEXTHOPS
    }
    #[inline(always)]
    fn last_hops() -> &'static Array<NextHop<u32>> {
        &LAST_HOPS
    }
}

/// An IPv6 address in the packet as the maps hold it, read as four words.
///
/// The words are read as if aligned, as C programs read `in6_addr`: the
/// kernel allows misaligned packet access where the CPU does (x86, arm64),
/// while an unaligned read makes LLVM load 16 single bytes and join them,
/// whose registers spill past the IPv6 programs' 512-byte stack.
#[inline(always)]
pub fn addr6(bytes: *const [u8; 16]) -> Addr6 {
    unsafe { core::ptr::read_volatile(bytes.cast::<Addr6>()) }
}

impl Family for V6 {
    type A = Addr6;
    type Hdr = Ipv6Hdr;
    const HDR_LEN: usize = Ipv6Hdr::LEN;
    const AF: u8 = 10;
    const JUMP_NEW_TCP: u32 = failover_common::JUMP_NEW_TCP6;

    #[inline(always)]
    fn src(ip: &Ip<Self>) -> Addr6 {
        addr6(unsafe { &raw const (*ip.hdr).src_addr })
    }
    #[inline(always)]
    fn dst(ip: &Ip<Self>) -> Addr6 {
        addr6(unsafe { &raw const (*ip.hdr).dst_addr })
    }
    #[inline(always)]
    fn rewrite(ip: &Ip<Self>, src: &Addr6, dst: &Addr6) -> u32 {
        crate::ipv6::rewrite(ip.hdr, src, dst)
    }
    #[inline(always)]
    fn snat(_node: &Node) -> Addr6 {
        NODE6.get(0).map_or([0; 4], |n| n.snat)
    }
    #[inline(always)]
    fn backend_addr(id: u32, _be: &Backend) -> Option<Addr6> {
        BACKEND_ADDR6.get(id).copied()
    }
    #[inline(always)]
    fn fib(p: &mut bpf_fib_lookup, src: Addr6, dst: Addr6) {
        p.__bindgen_anon_3.ipv6_src = src;
        p.__bindgen_anon_4.ipv6_dst = dst;
    }
    #[inline(always)]
    fn answer_header(ctx: &XdpContext, l3_off: usize, proto: u8, l4_len: u16) -> Option<()> {
        crate::ipv6::answer_header(ctx, l3_off, proto, l4_len)
    }
    #[inline(always)]
    fn too_big(ctx: &XdpContext, ip: &Ip<Self>, mtu: u16, now: u64) -> (u32, Reason) {
        let _ = (ip, now);
        crate::toobig::jump6(ctx, mtu)
    }
    #[inline(always)]
    fn services() -> &'static HashMap<ServiceKey<Addr6>, Service> {
        &SERVICES6
    }
    #[inline(always)]
    fn flows() -> &'static LruHashMap<FlowKey<Addr6>, Flow> {
        &FLOWS6
    }
    #[inline(always)]
    fn reverse() -> &'static LruHashMap<ReverseKey<Addr6>, Reverse<Addr6>> {
        &REVERSE6
    }
    #[inline(always)]
    fn pending() -> &'static Array<Pending<Addr6>> {
        &PENDING6
    }
    #[inline(always)]
    fn nexthops() -> &'static PerCpuArray<NextHop<Addr6>> {
        &NEXTHOPS6
    }
    #[inline(always)]
    fn last_hops() -> &'static Array<NextHop<Addr6>> {
        &LAST_HOPS6
    }
}
