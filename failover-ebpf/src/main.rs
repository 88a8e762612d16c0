//! The failover XDP program: full NAT toward healthy backends.
//!
//! Packet walk: `parse` (Ethernet, VLAN) -> `ipv4` (validate) -> `l4`
//! (ports, flags) -> `forward` (client -> VIP) or `reverse` (backend ->
//! SNAT address) -> `select` (Maglev ring) / `reset` (RST to the client) ->
//! `egress` (FIB, TX or redirect; `toobig` answers what the MTU refuses).
//! ICMP to a VIP or the SNAT address goes to `icmp` instead of `l4`
//! (ICMPv6 to `icmp6`).
//! Every packet ends in exactly one `Reason`, counted in `STATS`; the
//! verdict table is in docs/datapath.md.
#![no_std]
#![no_main]
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and values are passed by reference so each stays in one slot of the 512-byte BPF stack"
)]

mod egress;
mod family;
mod forward;
mod generator;
mod icmp;
mod icmp6;
mod ipv4;
mod ipv6;
mod l4;
mod maps;
mod parse;
mod pending;
mod reset;
mod reverse;
mod scratch;
mod select;
mod stats;
mod toobig;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use failover_common::Reason;
use network_types::ip::Ipv4Hdr;

use crate::maps::{JUMPS, NODE, NODE6, VIP_FILTER};

// Inlined into the entry the macro wraps it in: without it, LLVM keeps
// this body a BPF-to-BPF call once the IPv6 fast paths are in it.
#[xdp]
#[inline(always)]
pub fn failover_xdp(ctx: XdpContext) -> u32 {
    let (action, reason) = match try_failover(&ctx) {
        Ok(v) => v,
        Err(r) => (verdict(r), r),
    };
    stats::reason(reason);
    action
}

/// The action for a packet that ended early with `r`: its documented
/// verdict, from the one table in `failover_common::reason`.
#[inline(always)]
fn verdict(r: Reason) -> u32 {
    r.verdict().action()
}

#[inline(always)]
fn try_failover(ctx: &XdpContext) -> Result<(u32, Reason), Reason> {
    let l2 = parse::ethernet(ctx).ok_or(Reason::TruncatedEth)?;
    if l2.ether_type != parse::ETH_P_IPV4 {
        if l2.ether_type == parse::ETH_P_IPV6 {
            return classify6(ctx, l2.l3_off);
        }
        return Err(Reason::NotIpv4);
    }
    let hdr = ipv4::header(ctx, l2.l3_off)?;
    let node = NODE.get(0).ok_or(Reason::NotConfigured)?;
    if node.snat_be == 0 {
        return Err(Reason::NotConfigured);
    }
    // Classify by destination before any further work, so traffic that is
    // not ours costs one inlined array read.
    let dst = u32::from_ne_bytes(unsafe { (*hdr).dst_addr });
    let is_reverse = dst == node.snat_be;
    if !is_reverse {
        let filter = VIP_FILTER.get(0).ok_or(Reason::NotConfigured)?;
        let (word, mask) = failover_common::VipFilter::slot(dst);
        if word >= filter.bits.len() || filter.bits[word] & mask == 0 {
            return Err(Reason::NotVip);
        }
    }
    let ip = ipv4::validate(ctx, hdr, l2.l3_off)?;
    if ip.proto == failover_common::icmp::PROTO {
        // Continues in `failover_icmp`; if the jump is not there (an agent
        // that has not set it yet), ICMP passes as it always did.
        unsafe { JUMPS.tail_call(ctx, failover_common::JUMP_ICMP) };
        return Err(Reason::NotTcpUdp);
    }
    // No IP options get here (validate passes them to the kernel).
    // L4 is bounded by the IP packet, not by the frame (which may carry
    // Ethernet padding or bytes a forger appended).
    let mut l4 = l4::parse(ctx, ip.l4_off, ip.proto, ip.tot_len - Ipv4Hdr::LEN as u16)?;
    Ok(if is_reverse {
        reverse::handle(ctx, node.snat_be, &ip, &l4)
    } else {
        forward::handle(ctx, node, &ip, &mut l4)
    })
}

/// Where an IPv6 frame goes: traffic that is not ours leaves here, after
/// one array read as for IPv4 (a tail call and a second parse cost more
/// than the rest of its way); replies to the SNAT address go straight to
/// `failover_rev6`, and packets to a VIP to `failover_v6`. Without those
/// programs IPv6 passes, as it did before the program knew IPv6.
#[inline(always)]
fn classify6(ctx: &XdpContext, l3_off: usize) -> Result<(u32, Reason), Reason> {
    // A node without IPv6 leaves IPv6 to the kernel, malformed or not.
    let snat = NODE6.get(0).ok_or(Reason::NotConfigured)?.snat;
    if snat == [0; 4] {
        return Err(Reason::NotConfigured);
    }
    let hdr = ipv6::header(ctx, l3_off)?;
    let dst = family::addr6(unsafe { &raw const (*hdr).dst_addr });
    if dst == snat {
        // As for a VIP below: an established flow's plain reply is sent
        // from here (`reverse::established_only`).
        let (ip, l4) = walk6(ctx, hdr, l3_off)?;
        if let Some(out) = reverse::established_only(ctx, snat, &ip, &l4) {
            return Ok(out);
        }
        unsafe { JUMPS.tail_call(ctx, failover_common::JUMP_REV6) };
        return Err(Reason::NotIpv4);
    }
    let filter = VIP_FILTER.get(0).ok_or(Reason::NotConfigured)?;
    let (word, mask) = failover_common::VipFilter::slot_of(dst);
    if word >= filter.bits.len() || filter.bits[word] & mask == 0 {
        return Err(Reason::NotVip);
    }
    // What `failover_v6` would check first, then an established flow's
    // plain packet is sent from here (`forward::established_only`).
    let (ip, l4) = walk6(ctx, hdr, l3_off)?;
    let node = NODE.get(0).ok_or(Reason::NotConfigured)?;
    if let Some(out) = forward::established_only(ctx, node, &ip, &l4) {
        return Ok(out);
    }
    unsafe { JUMPS.tail_call(ctx, failover_common::JUMP_V6) };
    Err(Reason::NotIpv4)
}

/// ICMP to a VIP or the SNAT address (icmp.rs), tail-called from
/// `failover_xdp` once its checks passed; they are done again here, as a
/// tail call carries no state but the packet.
#[xdp]
pub fn failover_icmp(ctx: XdpContext) -> u32 {
    let (action, reason) = match try_icmp(&ctx) {
        Ok(v) => v,
        Err(r) => (verdict(r), r),
    };
    stats::reason(reason);
    action
}

#[inline(always)]
fn try_icmp(ctx: &XdpContext) -> Result<(u32, Reason), Reason> {
    let l2 = parse::ethernet(ctx).ok_or(Reason::TruncatedEth)?;
    if l2.ether_type != parse::ETH_P_IPV4 {
        return Err(Reason::NotIpv4);
    }
    let hdr = ipv4::header(ctx, l2.l3_off)?;
    let node = NODE.get(0).ok_or(Reason::NotConfigured)?;
    let dst = u32::from_ne_bytes(unsafe { (*hdr).dst_addr });
    let ip = ipv4::validate(ctx, hdr, l2.l3_off)?;
    if ip.proto != failover_common::icmp::PROTO {
        return Err(Reason::NotTcpUdp);
    }
    Ok(icmp::handle(ctx, node, &ip, dst == node.snat_be))
}

/// TCP segments to a VIP with no established flow (forward::new_tcp),
/// tail-called from `failover_xdp`.
#[xdp]
pub fn failover_new_tcp(ctx: XdpContext) -> u32 {
    let (action, reason) = match try_new_tcp(&ctx) {
        Ok(v) => v,
        Err(r) => (verdict(r), r),
    };
    stats::reason(reason);
    action
}

#[inline(always)]
fn try_new_tcp(ctx: &XdpContext) -> Result<(u32, Reason), Reason> {
    let l2 = parse::ethernet(ctx).ok_or(Reason::TruncatedEth)?;
    if l2.ether_type != parse::ETH_P_IPV4 {
        return Err(Reason::NotIpv4);
    }
    let hdr = ipv4::header(ctx, l2.l3_off)?;
    let node = NODE.get(0).ok_or(Reason::NotConfigured)?;
    let ip = ipv4::validate(ctx, hdr, l2.l3_off)?;
    let mut l4 = l4::parse(ctx, ip.l4_off, ip.proto, ip.tot_len - Ipv4Hdr::LEN as u16)?;
    if !l4.tcp {
        return Err(Reason::JumpFailed);
    }
    Ok(forward::new_tcp(ctx, node, &ip, &mut l4))
}

/// IPv6 frames to a VIP (`ipv6.rs`, then the same walk as IPv4 over
/// 16-byte addresses), tail-called from `failover_xdp` once `classify6`
/// found the destination in the VIP filter (only it jumps here).
#[xdp]
pub fn failover_v6(ctx: XdpContext) -> u32 {
    let (action, reason) = match try_v6(&ctx) {
        Ok(v) => v,
        Err(r) => (verdict(r), r),
    };
    stats::reason(reason);
    action
}

#[inline(always)]
fn try_v6(ctx: &XdpContext) -> Result<(u32, Reason), Reason> {
    let l2 = parse::ethernet(ctx).ok_or(Reason::TruncatedEth)?;
    if l2.ether_type != parse::ETH_P_IPV6 {
        return Err(Reason::NotIpv4);
    }
    let node = NODE.get(0).ok_or(Reason::NotConfigured)?;
    let hdr = ipv6::header(ctx, l2.l3_off)?;
    let (ip, mut l4) = walk6(ctx, hdr, l2.l3_off)?;
    Ok(forward::handle(ctx, node, &ip, &mut l4))
}

/// An IPv6 packet of ours up to its L4 header: `validate6`, the ports
/// and flags, and a UDP checksum present.
#[inline(always)]
fn walk6(
    ctx: &XdpContext,
    hdr: *mut network_types::ip::Ipv6Hdr,
    l3_off: usize,
) -> Result<(ipv6::Ipv6, l4::L4), Reason> {
    let ip = validate6(ctx, hdr, l3_off)?;
    let l4 = l4::parse(ctx, ip.l4_off, ip.proto, ip.l4_len())?;
    ipv6::udp_checksum_present(ctx, &l4)?;
    Ok((ip, l4))
}

/// `ipv6::validate`, with ICMPv6 continuing in `failover_icmp6`; without
/// it, ICMPv6 passes as it did before errors were translated.
#[inline(always)]
fn validate6(
    ctx: &XdpContext,
    hdr: *mut network_types::ip::Ipv6Hdr,
    l3_off: usize,
) -> Result<ipv6::Ipv6, Reason> {
    match ipv6::validate(ctx, hdr, l3_off) {
        Err(Reason::Icmpv6) => {
            unsafe { JUMPS.tail_call(ctx, failover_common::JUMP_ICMP6) };
            Err(Reason::Icmpv6)
        }
        ip => ip,
    }
}

/// ICMPv6 to a VIP or the SNAT address (icmp6.rs), tail-called from
/// `failover_v6`.
#[xdp]
pub fn failover_icmp6(ctx: XdpContext) -> u32 {
    let (action, reason) = match try_icmp6(&ctx) {
        Ok(v) => v,
        Err(r) => (verdict(r), r),
    };
    stats::reason(reason);
    action
}

#[inline(always)]
fn try_icmp6(ctx: &XdpContext) -> Result<(u32, Reason), Reason> {
    let l2 = parse::ethernet(ctx).ok_or(Reason::TruncatedEth)?;
    if l2.ether_type != parse::ETH_P_IPV6 {
        return Err(Reason::NotIpv4);
    }
    let hdr = ipv6::header(ctx, l2.l3_off)?;
    let snat = NODE6.get(0).ok_or(Reason::NotConfigured)?.snat;
    let ip = ipv6::validate_icmp(ctx, hdr, l2.l3_off)?;
    let is_reverse = family::addr6(unsafe { &raw const (*hdr).dst_addr }) == snat;
    Ok(icmp6::handle(ctx, &snat, &ip, is_reverse))
}

/// IPv6 to the SNAT address (backend -> client), tail-called from
/// `failover_xdp`.
#[xdp]
pub fn failover_rev6(ctx: XdpContext) -> u32 {
    let (action, reason) = match try_rev6(&ctx) {
        Ok(v) => v,
        Err(r) => (verdict(r), r),
    };
    stats::reason(reason);
    action
}

#[inline(always)]
fn try_rev6(ctx: &XdpContext) -> Result<(u32, Reason), Reason> {
    let l2 = parse::ethernet(ctx).ok_or(Reason::TruncatedEth)?;
    let hdr = ipv6::header(ctx, l2.l3_off)?;
    let snat = NODE6.get(0).ok_or(Reason::NotConfigured)?.snat;
    let (ip, l4) = walk6(ctx, hdr, l2.l3_off)?;
    Ok(reverse::handle(ctx, snat, &ip, &l4))
}

/// An IPv6 packet too long for its next hop (toobig.rs), tail-called from
/// the other IPv6 programs before they rewrite it.
#[xdp]
pub fn failover_toobig6(ctx: XdpContext) -> u32 {
    let (action, reason) = match parse::ethernet(&ctx) {
        Some(l2) => {
            let now = unsafe { aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns() };
            toobig::answer6(&ctx, l2.l3_off, now)
        }
        None => (verdict(Reason::TruncatedEth), Reason::TruncatedEth),
    };
    stats::reason(reason);
    action
}

/// IPv6 TCP segments to a VIP with no established flow, tail-called from
/// `failover_v6` (whose checks are done again: a tail call carries only
/// the packet).
#[xdp]
pub fn failover_new_tcp6(ctx: XdpContext) -> u32 {
    let (action, reason) = match try_new_tcp6(&ctx) {
        Ok(v) => v,
        Err(r) => (verdict(r), r),
    };
    stats::reason(reason);
    action
}

#[inline(always)]
fn try_new_tcp6(ctx: &XdpContext) -> Result<(u32, Reason), Reason> {
    let l2 = parse::ethernet(ctx).ok_or(Reason::TruncatedEth)?;
    if l2.ether_type != parse::ETH_P_IPV6 {
        return Err(Reason::NotIpv4);
    }
    let hdr = ipv6::header(ctx, l2.l3_off)?;
    let node = NODE.get(0).ok_or(Reason::NotConfigured)?;
    let ip = ipv6::validate(ctx, hdr, l2.l3_off)?;
    let mut l4 = l4::parse(ctx, ip.l4_off, ip.proto, ip.l4_len())?;
    if !l4.tcp {
        return Err(Reason::JumpFailed);
    }
    Ok(forward::new_tcp(ctx, node, &ip, &mut l4))
}

/// Attached to veth peers (XDP_TX/redirect frames only arrive on a veth
/// with a program), and the empty baseline of the datapath benchmark.
#[xdp]
pub fn failover_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// The benchmarks' traffic generator (`generator.rs`), run by BPF_PROG_TEST_RUN
/// in live-frames mode; never loaded by the agent.
#[xdp]
pub fn failover_gen(ctx: XdpContext) -> u32 {
    generator::generate(&ctx)
}

/// The benchmarks' sink: the receiving veth still counts every frame.
/// Never loaded by the agent.
#[xdp]
pub fn failover_drop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
