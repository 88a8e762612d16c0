//! Answer a client's TCP segment with an RST, built in place and sent back
//! out of the interface it came in on. Used when the flow's backend is down
//! (on services with SVC_F_RESET) and when a service fails closed: the
//! client learns at once instead of retransmitting into silence.

use aya_ebpf::{bindings::xdp_action, helpers::bpf_xdp_adjust_tail, programs::XdpContext};
use failover_common::{Reason, checksum};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
};

use crate::{
    ipv4::Ipv4,
    ipv6::Ipv6,
    l4::{L4, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    parse::{IPPROTO_TCP, ptr_at},
};

const RST_LEN: usize = Ipv4Hdr::LEN + TcpHdr::LEN;
const RST6_LEN: usize = Ipv6Hdr::LEN + TcpHdr::LEN;

/// RFC 793 reset generation: if the segment has an ACK, the RST takes its
/// sequence number from it; otherwise it ACKs what the segment used.
/// Returns the RST's TCP header, checksum zero.
#[inline(always)]
fn rst_header(l4: &L4) -> [u8; TcpHdr::LEN] {
    let (seq, ack, payload) = (l4.seq, l4.ack, l4.payload as u32);
    let (rst_seq, rst_ack, rst_flags) = if l4.flags & TCP_ACK != 0 {
        (ack, 0, TCP_RST)
    } else {
        let used = payload + (l4.flags & TCP_SYN != 0) as u32 + (l4.flags & TCP_FIN != 0) as u32;
        (0, seq.wrapping_add(used), TCP_RST | TCP_ACK)
    };
    let mut t = [0u8; TcpHdr::LEN];
    t[0..2].copy_from_slice(&l4.dport_be.to_ne_bytes());
    t[2..4].copy_from_slice(&l4.sport_be.to_ne_bytes());
    t[4..8].copy_from_slice(&rst_seq.to_be_bytes());
    t[8..12].copy_from_slice(&rst_ack.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = rst_flags;
    t
}

/// Trims the frame to `len` bytes and swaps its MACs.
#[inline(always)]
fn trim_and_turn(ctx: &XdpContext, len: usize) -> Option<()> {
    let frame_len = (ctx.data_end() - ctx.data()) as i32;
    let delta = len as i32 - frame_len;
    if delta < 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } != 0 {
        return None;
    }
    // Pointers are invalid after the tail moved: take them again.
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    unsafe {
        let e = &mut *eth;
        core::mem::swap(&mut e.dst_addr, &mut e.src_addr);
    }
    Some(())
}

/// The IPv6 RST: the same TCP header, under a 40-byte IPv6 header (hop
/// limit 64, traffic class and flow label 0), the checksum over the IPv6
/// pseudo-header.
#[inline(always)]
pub fn send6(ctx: &XdpContext, ip: &Ipv6, l4: &L4) -> (u32, Reason) {
    if l4.flags & TCP_RST != 0 {
        return (xdp_action::XDP_DROP, Reason::NoBackend);
    }
    let l3_off = ip.l3_off();
    let (client, vip) = {
        let h = unsafe { &*ip.hdr };
        (h.src_addr, h.dst_addr)
    };
    let mut t = rst_header(l4);
    if trim_and_turn(ctx, l3_off + RST6_LEN).is_none() {
        return (xdp_action::XDP_DROP, Reason::TruncatedL4);
    }
    let (Some(iph), Some(tcp)) = (
        ptr_at::<[u8; Ipv6Hdr::LEN]>(ctx, l3_off),
        ptr_at::<[u8; TcpHdr::LEN]>(ctx, l3_off + Ipv6Hdr::LEN),
    ) else {
        return (xdp_action::XDP_DROP, Reason::TruncatedL4);
    };
    let c = checksum::ipv6_l4(vip, client, IPPROTO_TCP, &t);
    t[16..18].copy_from_slice(&c.to_be_bytes());
    unsafe {
        let h = &mut *iph;
        *h = [0; Ipv6Hdr::LEN];
        h[0] = 0x60;
        h[4..6].copy_from_slice(&(TcpHdr::LEN as u16).to_be_bytes());
        h[6] = IPPROTO_TCP;
        h[7] = 64;
        h[8..24].copy_from_slice(&vip);
        h[24..40].copy_from_slice(&client);
        *tcp = t;
    }
    (xdp_action::XDP_TX, Reason::ResetSent)
}

#[inline(always)]
pub fn send(ctx: &XdpContext, ip: &Ipv4, l4: &L4) -> (u32, Reason) {
    // Never answer an RST with an RST (RFC 793).
    if l4.flags & TCP_RST != 0 {
        return (xdp_action::XDP_DROP, Reason::NoBackend);
    }
    let l3_off = ip.l3_off();
    let (client, vip) = {
        let h = unsafe { &*ip.hdr };
        (h.src_addr, h.dst_addr)
    };
    let mut t = rst_header(l4);
    // Trim everything after the bare TCP header.
    if trim_and_turn(ctx, l3_off + RST_LEN).is_none() {
        return (xdp_action::XDP_DROP, Reason::TruncatedL4);
    }
    let (Some(iph), Some(tcp)) = (
        ptr_at::<[u8; Ipv4Hdr::LEN]>(ctx, l3_off),
        ptr_at::<[u8; TcpHdr::LEN]>(ctx, l3_off + Ipv4Hdr::LEN),
    ) else {
        return (xdp_action::XDP_DROP, Reason::TruncatedL4);
    };

    let mut h = [0u8; Ipv4Hdr::LEN];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&(RST_LEN as u16).to_be_bytes());
    h[6] = 0x40; // DF
    h[8] = 64;
    h[9] = IPPROTO_TCP;
    h[12..16].copy_from_slice(&vip);
    h[16..20].copy_from_slice(&client);
    let c = checksum::ipv4_header(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());

    let c = checksum::ipv4_l4(vip, client, IPPROTO_TCP, &t);
    t[16..18].copy_from_slice(&c.to_be_bytes());

    unsafe {
        *iph = h;
        *tcp = t;
    }
    (xdp_action::XDP_TX, Reason::ResetSent)
}
