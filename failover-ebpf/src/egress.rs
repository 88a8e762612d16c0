//! Next hop: a FIB lookup gives the egress interface and MACs. Same
//! interface: XDP_TX. Another: redirect through DEVMAP. Neighbour unknown:
//! pass the rewritten packet up so the kernel resolves ARP; the next packets
//! take the fast path.

use aya_ebpf::{
    bindings::{bpf_fib_lookup, xdp_action},
    helpers::bpf_fib_lookup as fib_lookup,
    programs::XdpContext,
};
use core::mem::{size_of, zeroed};
use failover_common::Reason;
use network_types::eth::EthHdr;

use crate::{maps::DEVMAP, parse::ptr_at};

const AF_INET: u8 = 2;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;
const BPF_FIB_LKUP_RET_FRAG_NEEDED: i64 = 8;

/// `tx` and `redirect` are the reasons to count for each outcome.
#[inline(always)]
pub fn send(
    ctx: &XdpContext,
    proto: u8,
    src_be: u32,
    dst_be: u32,
    tot_len: u16,
    tx: Reason,
    redirect: Reason,
) -> (u32, Reason) {
    let mut p: bpf_fib_lookup = unsafe { zeroed() };
    p.family = AF_INET;
    p.l4_protocol = proto;
    p.__bindgen_anon_1.tot_len = tot_len;
    p.ifindex = ctx.ingress_ifindex() as u32;
    p.__bindgen_anon_3.ipv4_src = src_be;
    p.__bindgen_anon_4.ipv4_dst = dst_be;
    let rc = unsafe {
        fib_lookup(ctx.ctx.cast(), &mut p, size_of::<bpf_fib_lookup>() as i32, 0)
    };
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => {}
        BPF_FIB_LKUP_RET_NO_NEIGH => return (xdp_action::XDP_PASS, Reason::NoNeighbour),
        BPF_FIB_LKUP_RET_FRAG_NEEDED => return (xdp_action::XDP_DROP, Reason::MtuExceeded),
        _ => return (xdp_action::XDP_DROP, Reason::NoRoute),
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return (xdp_action::XDP_DROP, Reason::TruncatedEth);
    };
    unsafe {
        (*eth).dst_addr = p.dmac;
        (*eth).src_addr = p.smac;
    }
    if p.ifindex == ctx.ingress_ifindex() as u32 {
        return (xdp_action::XDP_TX, tx);
    }
    match DEVMAP.redirect(p.ifindex, 0) {
        Ok(action) => (action, redirect),
        // The interface has no XDP program of ours: let the kernel forward.
        Err(_) => (xdp_action::XDP_PASS, Reason::RedirectFailed),
    }
}
