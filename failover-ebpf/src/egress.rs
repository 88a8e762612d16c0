//! Next hop: a FIB lookup gives the egress interface and MACs. Same
//! interface: XDP_TX. Another: redirect through DEVMAP. Neighbour unknown:
//! drop (counted), unless toward a backend whose last next hop is recent
//! (`forward::send`, `LAST_HOPS`). Passing the rewritten packet up would not help: its
//! source is the node's own SNAT address, which the kernel refuses to
//! forward as a martian. The agent's probes keep backends' neighbours
//! resolved, and a client's is learned from its own ARP request.
//!
//! The FIB result is cached in the flow entry (`NextHop`) and refreshed
//! after `NEXTHOP_TTL_NS`: a lookup costs several times the rest of
//! the per-packet work.

use aya_ebpf::{
    bindings::{bpf_fib_lookup, xdp_action},
    helpers::bpf_fib_lookup as fib_lookup,
    programs::XdpContext,
};
use core::mem::size_of;
use failover_common::{Addr, NEXTHOP_TTL_NS, NextHop, Reason};
use network_types::eth::EthHdr;

use crate::{family::Family, maps::DEVMAP, parse::ptr_at, scratch};

const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;
const BPF_FIB_LKUP_RET_FRAG_NEEDED: i64 = 8;

/// Where a rewritten packet goes, and the reasons to count for TX and
/// redirect outcomes.
pub struct Route<A: Addr> {
    pub proto: u8,
    pub src_be: A,
    pub dst_be: A,
    pub tot_len: u16,
    pub tx: Reason,
    pub redirect: Reason,
    /// `bpf_ktime_get_coarse_ns`, read once per packet by the caller.
    pub now: u64,
}

/// Where the packet of `r` leaves, resolved before it is rewritten, so
/// that one too long for the egress MTU can still be answered with a
/// frag-needed quoting it as its sender sent it (toobig.rs). `Err` carries
/// the reason and, for `MtuExceeded`, the MTU.
#[inline(always)]
pub fn resolve<F: Family>(
    ctx: &XdpContext,
    nh: &mut NextHop<F::A>,
    r: &Route<F::A>,
) -> Result<(), (Reason, u16)> {
    let now = r.now;
    if nh.ifindex == 0 || nh.dst_be != r.dst_be || now.wrapping_sub(nh.at_ns) > NEXTHOP_TTL_NS {
        let Some(p) = scratch::take::<bpf_fib_lookup>(scratch::FIB) else {
            return Err((Reason::NoRoute, 0));
        };
        p.family = F::AF;
        p.l4_protocol = r.proto;
        p.__bindgen_anon_1.tot_len = r.tot_len;
        p.ifindex = ctx.ingress_ifindex() as u32;
        F::fib(p, r.src_be, r.dst_be);
        let rc = unsafe {
            fib_lookup(
                ctx.ctx.cast(),
                &mut *p,
                size_of::<bpf_fib_lookup>() as i32,
                0,
            )
        };
        match rc {
            BPF_FIB_LKUP_RET_SUCCESS => {}
            BPF_FIB_LKUP_RET_NO_NEIGH => {
                nh.ifindex = 0;
                return Err((Reason::NoNeighbour, 0));
            }
            // The kernel leaves the MTU where tot_len was.
            BPF_FIB_LKUP_RET_FRAG_NEEDED => {
                return Err((Reason::MtuExceeded, unsafe {
                    p.__bindgen_anon_1.mtu_result
                }));
            }
            _ => {
                nh.ifindex = 0;
                return Err((Reason::NoRoute, 0));
            }
        }
        nh.ifindex = p.ifindex;
        nh.dst_be = r.dst_be;
        nh.smac = p.smac;
        nh.dmac = p.dmac;
        nh.mtu = unsafe { p.__bindgen_anon_1.mtu_result };
        nh.at_ns = now;
    } else if r.tot_len > nh.mtu {
        // The lookup checks the length against the MTU; the cache must too.
        return Err((Reason::MtuExceeded, nh.mtu));
    }
    Ok(())
}

/// Sends a packet (rewritten by now) toward the next hop `resolve` found.
#[inline(always)]
pub fn out<A: Addr>(ctx: &XdpContext, nh: &NextHop<A>, r: &Route<A>) -> (u32, Reason) {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return (xdp_action::XDP_DROP, Reason::TruncatedEth);
    };
    unsafe {
        (*eth).dst_addr = nh.dmac;
        (*eth).src_addr = nh.smac;
    }
    if nh.ifindex == ctx.ingress_ifindex() as u32 {
        return (xdp_action::XDP_TX, r.tx);
    }
    match DEVMAP.redirect(nh.ifindex, 0) {
        Ok(action) => (action, r.redirect),
        // An egress interface the agent did not attach to: the frame's MACs
        // are already the next hop's, so the kernel would not take it.
        Err(_) => (xdp_action::XDP_DROP, Reason::RedirectFailed),
    }
}
