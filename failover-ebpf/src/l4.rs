//! TCP and UDP: ports, flags, and the port/pseudo-header checksum update
//! that goes with a NAT rewrite.

use aya_ebpf::{bindings::xdp_md, helpers::generated::bpf_xdp_load_bytes, programs::XdpContext};
use failover_common::{
    ACKED_BACKEND, ACKED_BOTH, ACKED_CLIENT, FIN_BACKEND, FIN_CLIENT, Reason, checksum,
    tcp::{self, SynWorth},
};
use network_types::{ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};

use crate::{
    maps::PATH_MSS,
    parse::{IPPROTO_TCP, ptr_at},
};

pub use failover_common::tcp::{ACK as TCP_ACK, FIN as TCP_FIN, RST as TCP_RST, SYN as TCP_SYN};

/// What a TCP segment does to its flow's NAT entries, in either direction.
pub enum Closing {
    /// Nothing: the flow goes on.
    Keep,
    /// Note `bits` (`FIN_*`, `ACKED_*`) on both entries; `fin_ack`: the
    /// segment is a FIN, which the other side ACKs with this number (kept
    /// in the entry the other side's segments read).
    Note { bits: u8, fin_ack: Option<u32> },
    /// An RST, or the segment that ACKs the second FIN: free both.
    Free,
}

/// Which side sent the segment: its `FIN_*` bit, and the other side's
/// `FIN_*` and `ACKED_*` bits.
pub struct Side {
    pub fin: u8,
    pub peer_fin: u8,
    pub peer_acked: u8,
}

/// The closing rule, for both directions. `fins`: the entry's bits so far;
/// `peer_fin_ack`: the number that ACKs the other side's FIN, once it sent
/// one. Sequence numbers, not just flags, decide what a FIN's ACK is: when
/// both sides close at once each ACKs the other's FIN, and an ACK of data
/// sent before a FIN is not its ACK.
#[inline(always)]
pub fn closing(l4: &L4, fins: u8, peer_fin_ack: u32, side: Side) -> Closing {
    if l4.flags & TCP_RST != 0 {
        return Closing::Free;
    }
    if l4.flags & TCP_FIN == 0 && fins == 0 {
        return Closing::Keep;
    }
    let mut bits = 0;
    let mut fin_ack = None;
    if l4.flags & TCP_FIN != 0 {
        bits |= side.fin;
        // The FIN takes the sequence number after the segment's data.
        fin_ack = Some(l4.seq.wrapping_add(l4.payload as u32).wrapping_add(1));
    }
    if l4.flags & TCP_ACK != 0
        && fins & side.peer_fin != 0
        && l4.ack.wrapping_sub(peer_fin_ack) as i32 >= 0
    {
        bits |= side.peer_acked;
    }
    if (fins | bits) & ACKED_BOTH == ACKED_BOTH {
        Closing::Free
    } else if bits & !fins != 0 || fin_ack.is_some() {
        Closing::Note { bits, fin_ack }
    } else {
        Closing::Keep
    }
}

/// Carries out a `Closing::Note` on the entry at hand (`fins`) and, when it
/// is found, on the other side's entry (its bits and its `fin_ack`: the
/// other side ACKs this FIN, and its segments read that entry). Both
/// entries end with the same bits, so either side's last ACK frees them.
#[inline(always)]
pub fn note(fins: &mut u8, other: Option<(&mut u8, &mut u32)>, bits: u8, fin_ack: Option<u32>) {
    *fins |= bits;
    if let Some((other_fins, other_fin_ack)) = other {
        *other_fins |= bits;
        if let Some(n) = fin_ack {
            *other_fin_ack = n;
        }
        *fins |= *other_fins;
    }
}

pub const CLIENT: Side = Side {
    fin: FIN_CLIENT,
    peer_fin: FIN_BACKEND,
    peer_acked: ACKED_BACKEND,
};
pub const BACKEND: Side = Side {
    fin: FIN_BACKEND,
    peer_fin: FIN_CLIENT,
    peer_acked: ACKED_CLIENT,
};

/// Where the ports and checksum of a TCP or UDP header sit.
pub struct L4 {
    pub off: usize,
    pub tcp: bool,
    pub sport_be: u16,
    pub dport_be: u16,
    /// TCP flags byte; 0 for UDP.
    pub flags: u8,
    /// TCP header length in bytes (20..=60); 0 for UDP.
    pub hlen: u8,
    /// TCP sequence and acknowledgment numbers (host order) and the
    /// segment's data length; 0 for UDP.
    pub seq: u32,
    pub ack: u32,
    pub payload: u16,
    /// A forwarded SYN counts as passive-health evidence (set by the
    /// forward path after `syn_worth`).
    pub evidence: bool,
}

/// `l4_len`: the IP payload's length (the IP total length less its
/// header). Every length the header carries must fit inside it.
#[inline(always)]
pub fn parse(ctx: &XdpContext, off: usize, proto: u8, l4_len: u16) -> Result<L4, Reason> {
    if proto == IPPROTO_TCP {
        if (l4_len as usize) < TcpHdr::LEN {
            return Err(Reason::TruncatedL4);
        }
        let t: *mut TcpHdr = ptr_at(ctx, off).ok_or(Reason::TruncatedL4)?;
        let t = unsafe { &*t };
        let raw: &[u8; TcpHdr::LEN] = unsafe { &*(t as *const TcpHdr).cast() };
        // The data offset must hold the header itself and fit the segment.
        let hlen = (raw[12] >> 4) as u16 * 4;
        if (hlen as usize) < TcpHdr::LEN || hlen > l4_len {
            return Err(Reason::TruncatedL4);
        }
        let flags = raw[13];
        if !tcp::flags_valid(flags) {
            return Err(Reason::BadTcpFlags);
        }
        Ok(L4 {
            off,
            tcp: true,
            sport_be: u16::from_ne_bytes(t.source),
            dport_be: u16::from_ne_bytes(t.dest),
            flags,
            hlen: hlen as u8,
            seq: u32::from_be_bytes([raw[4], raw[5], raw[6], raw[7]]),
            ack: u32::from_be_bytes([raw[8], raw[9], raw[10], raw[11]]),
            payload: l4_len - hlen,
            evidence: false,
        })
    } else {
        if (l4_len as usize) < UdpHdr::LEN {
            return Err(Reason::TruncatedL4);
        }
        let u: *mut UdpHdr = ptr_at(ctx, off).ok_or(Reason::TruncatedL4)?;
        let u = unsafe { &*u };
        let len = u16::from_be_bytes(u.len);
        if (len as usize) < UdpHdr::LEN || len > l4_len {
            return Err(Reason::TruncatedL4);
        }
        Ok(L4 {
            off,
            tcp: false,
            sport_be: u16::from_ne_bytes(u.src),
            dport_be: u16::from_ne_bytes(u.dst),
            flags: 0,
            hlen: 0,
            seq: 0,
            ack: 0,
            payload: 0,
            evidence: false,
        })
    }
}

/// Judges a bare SYN without data (`tcp::judge_syn`): its header is
/// copied to the stack with `bpf_xdp_load_bytes`, checksummed and its
/// options walked. This runs only for opening SYNs, never per established
/// packet. (A helper copy, not a loop of checked reads: the verifier then
/// sees one buffer of unknown bytes whatever the header's length.)
#[inline(always)]
pub fn syn_worth(ctx: &XdpContext, ip: *const Ipv4Hdr, l4: &L4) -> SynWorth {
    let mut buf = [0u8; tcp::MAX_HEADER];
    let hlen = l4.hlen as usize;
    if !(tcp::MIN_HEADER..=tcp::MAX_HEADER).contains(&hlen) {
        return SynWorth::BadChecksum;
    }
    // parse() checked the header against the IP length, which validate()
    // checked against the frame.
    let rc =
        unsafe { bpf_xdp_load_bytes(ctx.ctx, l4.off as u32, buf.as_mut_ptr().cast(), hlen as u32) };
    if rc != 0 {
        return SynWorth::BadChecksum;
    }
    let h = unsafe { &*ip };
    tcp::judge_syn(
        u32::from_ne_bytes(h.src_addr),
        u32::from_ne_bytes(h.dst_addr),
        &buf,
        hlen,
    )
}

/// Clamps the MSS option of a SYN or SYN-ACK to the path toward
/// `backend_id` (`PATH_MSS`, set from its `path_mtu`), so neither side
/// sends segments the path cannot carry even where ICMP is filtered. Only
/// handshakes toward backends with a clamp pay for it: one array read and
/// a fixed 8-byte window (`tcp::early_mss`). The checksum is updated for
/// the two bytes, at whatever offset they sit.
#[inline(always)]
pub fn clamp_mss(ctx: &XdpContext, l4: &L4, backend_id: u32) {
    clamp_mss_at(ctx.ctx, l4.off, l4.hlen as usize, backend_id);
}

/// A BPF subprogram, not inlined: the handshake paths that call it are
/// inlined several times, and each would otherwise carry every way through
/// it on to the rest of the program.
#[inline(never)]
fn clamp_mss_at(raw: *mut xdp_md, off: usize, hlen: usize, backend_id: u32) {
    let ctx = &XdpContext::new(raw);
    let Some(&mss) = PATH_MSS.get(backend_id) else {
        return;
    };
    if mss == 0 || hlen < tcp::MIN_HEADER + 4 {
        return;
    }
    let opts_off = off + tcp::MIN_HEADER;
    let mut opts = [0u8; 8];
    let avail = if hlen >= tcp::MIN_HEADER + 8 {
        let Some(o) = ptr_at::<[u8; 8]>(ctx, opts_off) else {
            return;
        };
        opts = unsafe { *o };
        8
    } else {
        let Some(o) = ptr_at::<[u8; 4]>(ctx, opts_off) else {
            return;
        };
        let o = unsafe { *o };
        opts[..4].copy_from_slice(&o);
        4
    };
    let Some((at, value)) = tcp::early_mss(&opts, avail) else {
        return;
    };
    if value as u32 <= mss {
        return;
    }
    let at = at & 7;
    let old = value.to_be_bytes();
    let new = (mss as u16).to_be_bytes();
    let (Some(v), Some(t)) = (
        ptr_at::<[u8; 2]>(ctx, opts_off + at),
        ptr_at::<TcpHdr>(ctx, off),
    ) else {
        return;
    };
    unsafe {
        *v = new;
        let t = &mut *t;
        let c =
            checksum::replace_pair_at(u16::from_ne_bytes(t.check), tcp::MIN_HEADER + at, old, new);
        t.check = c.to_ne_bytes();
    }
}

/// Rewrites ports and folds the address change into the L4 checksum, which
/// covers the pseudo-header. An invalid checksum stays invalid by the same
/// amount, so a corrupted segment is never made to look valid.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn rewrite(
    ctx: &XdpContext,
    l4: &L4,
    old_src: u32,
    old_dst: u32,
    src_be: u32,
    dst_be: u32,
    sport_be: u16,
    dport_be: u16,
) -> Result<(), Reason> {
    if l4.tcp {
        let t: *mut TcpHdr = ptr_at(ctx, l4.off).ok_or(Reason::TruncatedL4)?;
        let t = unsafe { &mut *t };
        let mut c = u16::from_ne_bytes(t.check);
        c = checksum::replace32(c, old_src, src_be);
        c = checksum::replace32(c, old_dst, dst_be);
        c = checksum::replace16(c, l4.sport_be, sport_be);
        c = checksum::replace16(c, l4.dport_be, dport_be);
        t.source = sport_be.to_ne_bytes();
        t.dest = dport_be.to_ne_bytes();
        t.check = c.to_ne_bytes();
    } else {
        let u: *mut UdpHdr = ptr_at(ctx, l4.off).ok_or(Reason::TruncatedL4)?;
        let u = unsafe { &mut *u };
        let mut c = u16::from_ne_bytes(u.check);
        // Zero means "no checksum" in UDP over IPv4: keep it that way.
        if c != 0 {
            c = checksum::replace32(c, old_src, src_be);
            c = checksum::replace32(c, old_dst, dst_be);
            c = checksum::replace16(c, l4.sport_be, sport_be);
            c = checksum::replace16(c, l4.dport_be, dport_be);
            c = checksum::udp_adjust(c);
        }
        u.src = sport_be.to_ne_bytes();
        u.dst = dport_be.to_ne_bytes();
        u.check = c.to_ne_bytes();
    }
    Ok(())
}
