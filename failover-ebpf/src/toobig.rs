//! A DF packet longer than the egress MTU: the edge answers its sender with
//! an ICMP frag-needed carrying that MTU, as a router on the path would, so
//! PMTU discovery works through the NAT (RFC 1191). The frame is rebuilt in
//! place and sent back out of the interface it came in on, as reset.rs
//! does. A packet without DF is dropped: XDP cannot fragment.
//!
//! The answer comes from the address the packet was sent to (the VIP for a
//! client, the SNAT address for a backend) and quotes the packet as its
//! sender sent it, so the sender's stack matches it to its socket. Answers
//! are limited per source slot (`ICMP_LIMIT`), so a flood of oversize
//! packets from forged sources costs a bounded number of small replies.

use aya_ebpf::{
    bindings::{xdp_action, xdp_md},
    helpers::bpf_xdp_adjust_tail,
    programs::XdpContext,
};
use failover_common::{
    Addr, ICMP_INTERVAL_NS, ICMP_SLOTS, JUMP_TOOBIG6, Reason, checksum, hash, icmp, icmp6,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::{
    family::addr6,
    ipv4::Ipv4,
    ipv6::{self, ICMPV6},
    maps::{ICMP_LIMIT, JUMPS, TOOBIG_MTU},
    parse::ptr_at,
};

const DF: u16 = 0x4000;
const ANSWER_LEN: usize = Ipv4Hdr::LEN + icmp::FRAG_NEEDED_LEN;

#[inline(always)]
pub fn answer(ctx: &XdpContext, ip: &Ipv4, mtu: u16, now: u64) -> (u32, Reason) {
    outcome(answer_at(
        ctx.ctx,
        ip.l4_off - Ipv4Hdr::LEN,
        mtu as u64,
        now,
    ))
}

/// The verdict of an answer's code.
#[inline(always)]
fn outcome(code: u32) -> (u32, Reason) {
    match code {
        SENT => (xdp_action::XDP_TX, Reason::FragNeededSent),
        LIMITED => (xdp_action::XDP_DROP, Reason::FragNeededLimited),
        _ => (xdp_action::XDP_DROP, Reason::MtuExceeded),
    }
}

/// Whether a source hashed to `src_word` may get an answer at `now` (one
/// per slot per `ICMP_INTERVAL_NS`, per CPU); if so, its slot is stamped.
#[inline(always)]
fn allowed(src_word: u32, now: u64) -> bool {
    let slot = hash::mix32(src_word) & (ICMP_SLOTS - 1);
    let Some(last) = ICMP_LIMIT.get_ptr_mut(slot) else {
        return false;
    };
    let last = unsafe { &mut *last };
    if *last != 0 && now.wrapping_sub(*last) < ICMP_INTERVAL_NS {
        return false;
    }
    *last = now;
    true
}

/// Trims the frame to `len` bytes (it is longer: the MTU refused it).
#[inline(always)]
fn trim(ctx: &XdpContext, len: usize) -> bool {
    let delta = len as i32 - (ctx.data_end() - ctx.data()) as i32;
    delta >= 0 || unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } == 0
}

const SENT: u32 = 0;
const NOT_SENT: u32 = 1;
const LIMITED: u32 = 2;

/// A BPF subprogram, not inlined: every path that sends a packet on may
/// end here, and each would otherwise carry its own copy through the
/// verifier.
#[inline(never)]
fn answer_at(raw: *mut xdp_md, l3_off: usize, mtu: u64, now: u64) -> u32 {
    let ctx = &XdpContext::new(raw);
    let Some(hdr) = ptr_at::<Ipv4Hdr>(ctx, l3_off) else {
        return NOT_SENT;
    };
    let (src, dst, frags) = {
        let h = unsafe { &*hdr };
        (h.src_addr, h.dst_addr, u16::from_be_bytes(h.frags))
    };
    if frags & DF == 0 {
        return NOT_SENT;
    }
    if !allowed(u32::from_ne_bytes(src), now) {
        return LIMITED;
    }
    if !trim(ctx, l3_off + ANSWER_LEN) {
        return NOT_SENT;
    }
    // Built in place, so the stack stays small (this runs a call deep
    // below the program's own frame): the quote, the packet's IP header
    // and first 8 bytes of L4 (parse() checked they are there), moves
    // behind the new IP and ICMP headers. Pointers are invalid after the
    // tail moved: take them again.
    let q_off = l3_off + Ipv4Hdr::LEN + icmp::HEADER;
    let (Some(eth), Some(iph), Some(msg), Some(from), Some(to)) = (
        ptr_at::<EthHdr>(ctx, 0),
        ptr_at::<[u8; Ipv4Hdr::LEN]>(ctx, l3_off),
        ptr_at::<[u8; icmp::FRAG_NEEDED_LEN]>(ctx, l3_off + Ipv4Hdr::LEN),
        ptr_at::<[u8; icmp::QUOTE_MIN]>(ctx, l3_off),
        ptr_at::<[u8; icmp::QUOTE_MIN]>(ctx, q_off),
    ) else {
        return NOT_SENT;
    };
    unsafe {
        *to = *from;
        let e = &mut *eth;
        core::mem::swap(&mut e.dst_addr, &mut e.src_addr);
        let m = &mut *msg;
        m[..icmp::HEADER].copy_from_slice(&icmp::frag_needed_header(mtu as u16));
        let c = !checksum::fold(checksum::sum_bytes(m, 0));
        m[2..4].copy_from_slice(&c.to_be_bytes());
        let h = &mut *iph;
        *h = [0; Ipv4Hdr::LEN];
        h[0] = 0x45;
        h[1] = 0xc0; // precedence "internetwork control", as Linux sends ICMP
        h[2..4].copy_from_slice(&(ANSWER_LEN as u16).to_be_bytes());
        h[8] = 64;
        h[9] = icmp::PROTO;
        h[12..16].copy_from_slice(&dst);
        h[16..20].copy_from_slice(&src);
        let c = checksum::ipv4_header(h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
    }
    SENT
}

/// What an IPv6 answer quotes: the IPv6 header and the first 8 bytes of L4
/// (the ports, and TCP's sequence number), which is what a stack needs to
/// find the socket. RFC 4443 allows any length up to the minimum MTU.
const QUOTE6: usize = Ipv6Hdr::LEN + 8;
const MSG6_LEN: usize = icmp::HEADER + QUOTE6;
const ANSWER6_LEN: usize = Ipv6Hdr::LEN + MSG6_LEN;

/// The IPv6 counterpart of `answer`, in its own program
/// (`failover_toobig6`, the IPv6 programs' stack being full): the MTU
/// crosses the tail call in `TOOBIG_MTU`. Every IPv6 packet is "DF":
/// routers never fragment it, so a packet too long is always answered
/// (within the same per-source limit).
#[inline(always)]
pub fn jump6(ctx: &XdpContext, mtu: u16) -> (u32, Reason) {
    if let Some(m) = TOOBIG_MTU.get_ptr_mut(0) {
        unsafe { *m = mtu as u32 };
        unsafe { JUMPS.tail_call(ctx, JUMP_TOOBIG6) };
    }
    (xdp_action::XDP_DROP, Reason::MtuExceeded)
}

/// `failover_toobig6`'s work: the packet at `l3_off` was too long for `mtu`.
#[inline(always)]
pub fn answer6(ctx: &XdpContext, l3_off: usize, now: u64) -> (u32, Reason) {
    let Some(&mtu) = TOOBIG_MTU.get(0) else {
        return (xdp_action::XDP_DROP, Reason::MtuExceeded);
    };
    outcome(answer6_at(ctx.ctx, l3_off, mtu as u64, now))
}

#[inline(never)]
fn answer6_at(raw: *mut xdp_md, l3_off: usize, mtu: u64, now: u64) -> u32 {
    let ctx = &XdpContext::new(raw);
    let Some(hdr) = ptr_at::<Ipv6Hdr>(ctx, l3_off) else {
        return NOT_SENT;
    };
    // The answer's pseudo-header has the same two addresses, swapped:
    // their sum is taken now, before the header is rewritten.
    let (addr_sum, src_word) = {
        let h = unsafe { &*hdr };
        let src = addr6(&h.src_addr);
        (src.sum() + addr6(&h.dst_addr).sum(), src.word())
    };
    if !allowed(src_word, now) {
        return LIMITED;
    }
    if !trim(ctx, l3_off + ANSWER6_LEN) {
        return NOT_SENT;
    }
    // In place, as for IPv4: the quote moves behind the new headers (the
    // two ranges do not overlap).
    let q_off = l3_off + Ipv6Hdr::LEN + icmp::HEADER;
    let (Some(eth), Some(msg), Some(from), Some(to)) = (
        ptr_at::<EthHdr>(ctx, 0),
        ptr_at::<[u8; MSG6_LEN]>(ctx, l3_off + Ipv6Hdr::LEN),
        ptr_at::<[u8; QUOTE6]>(ctx, l3_off),
        ptr_at::<[u8; QUOTE6]>(ctx, q_off),
    ) else {
        return NOT_SENT;
    };
    unsafe {
        core::ptr::copy_nonoverlapping(from, to, 1);
        let e = &mut *eth;
        core::mem::swap(&mut e.dst_addr, &mut e.src_addr);
        let m = &mut *msg;
        m[..4].copy_from_slice(&[icmp6::PACKET_TOO_BIG, 0, 0, 0]);
        m[4..8].copy_from_slice(&(mtu as u32).to_be_bytes());
        // Words in native order, as `checksum::l4_ne`.
        let mut sum = addr_sum
            + u32::from(u16::from_ne_bytes([0, ICMPV6]))
            + u32::from(u16::from_ne_bytes((MSG6_LEN as u16).to_be_bytes()));
        let mut i = 0;
        while i < MSG6_LEN {
            sum += u32::from(u16::from_ne_bytes([m[i], m[i + 1]]));
            i += 2;
        }
        m[2..4].copy_from_slice(&(!checksum::fold(sum)).to_ne_bytes());
    }
    if ipv6::answer_header(ctx, l3_off, ICMPV6, MSG6_LEN as u16).is_none() {
        return NOT_SENT;
    }
    SENT
}
