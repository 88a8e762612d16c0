//! Answer a client's TCP segment with an RST, built in place and sent back
//! out of the interface it came in on. Used when the flow's backend is down
//! (on services with SVC_F_RESET) and when a service fails closed: the
//! client learns at once instead of retransmitting into silence. Either
//! family: the IP header is the family's (`Family::answer_header`), the
//! TCP header the same.

use aya_ebpf::{bindings::xdp_action, helpers::bpf_xdp_adjust_tail, programs::XdpContext};
use failover_common::{Addr, Reason, checksum};
use network_types::{eth::EthHdr, tcp::TcpHdr};

use crate::{
    family::{Family, Ip},
    l4::{L4, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    parse::{IPPROTO_TCP, ptr_at},
};

#[inline(always)]
pub fn send<F: Family>(ctx: &XdpContext, ip: &Ip<F>, l4: &L4) -> (u32, Reason) {
    // Never answer an RST with an RST (RFC 793).
    if l4.flags & TCP_RST != 0 {
        return (xdp_action::XDP_DROP, Reason::NoBackend);
    }
    let l3_off = ip.l3_off();
    // Swapping source and destination leaves the pseudo-header's sum as
    // it was: the checksum is done before the packet is touched.
    let mut t = rst_header(l4);
    let addr_sum = F::src(ip).sum() + F::dst(ip).sum();
    let c = checksum::l4_ne(addr_sum, IPPROTO_TCP, &t);
    t[16..18].copy_from_slice(&c.to_ne_bytes());
    // Trim everything after the bare TCP header.
    if trim_and_turn(ctx, l3_off + F::HDR_LEN + TcpHdr::LEN).is_none()
        || F::answer_header(ctx, l3_off, IPPROTO_TCP, TcpHdr::LEN as u16).is_none()
    {
        return (xdp_action::XDP_DROP, Reason::TruncatedL4);
    }
    let Some(tcp) = ptr_at::<[u8; TcpHdr::LEN]>(ctx, l3_off + F::HDR_LEN) else {
        return (xdp_action::XDP_DROP, Reason::TruncatedL4);
    };
    unsafe { *tcp = t };
    (xdp_action::XDP_TX, Reason::ResetSent)
}

/// RFC 793 reset generation: if the segment has an ACK, the RST takes its
/// sequence number from it; otherwise it ACKs what the segment used.
/// Returns the RST's TCP header (data offset 5, window 0), checksum zero.
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
