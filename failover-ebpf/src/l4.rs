//! TCP and UDP: ports, flags, and the port/pseudo-header checksum update
//! that goes with a NAT rewrite.

use aya_ebpf::{bindings::xdp_md, helpers::generated::bpf_xdp_load_bytes, programs::XdpContext};
use failover_common::{
    Addr, Reason, checksum,
    tcp::{self, SynWorth},
};
use network_types::{tcp::TcpHdr, udp::UdpHdr};

use crate::{
    family::{Family, Ip},
    maps::PATH_MSS,
    parse::{IPPROTO_TCP, ptr_at},
};

pub use failover_common::tcp::{ACK as TCP_ACK, FIN as TCP_FIN, RST as TCP_RST, SYN as TCP_SYN};

pub use failover_common::tcp::{BACKEND, CLIENT, Closing, note};

/// The closing rule (`tcp::closing`) for this segment.
#[inline(always)]
pub fn closing(l4: &L4, fins: u8, peer_fin_ack: u32, side: tcp::Side) -> Closing {
    tcp::closing(
        &tcp::Segment {
            flags: l4.flags,
            seq: l4.seq,
            ack: l4.ack,
            payload: l4.payload,
        },
        fins,
        peer_fin_ack,
        side,
    )
}

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
pub fn syn_worth<F: Family>(ctx: &XdpContext, ip: &Ip<F>, l4: &L4) -> SynWorth {
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
    tcp::judge_syn(F::src(ip).sum() + F::dst(ip).sum(), &buf, hlen)
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
    let (window, avail) = if hlen >= tcp::MIN_HEADER + 8 {
        let Some(o) = ptr_at::<[u8; 8]>(ctx, opts_off) else {
            return;
        };
        (u64::from_be_bytes(unsafe { *o }), 8)
    } else {
        let Some(o) = ptr_at::<[u8; 4]>(ctx, opts_off) else {
            return;
        };
        ((u32::from_be_bytes(unsafe { *o }) as u64) << 32, 4)
    };
    let Some((at, value)) = tcp::early_mss(window, avail) else {
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

/// A NAT rewrite: the addresses and ports a packet leaves with. Forward
/// and reverse build one each, from the flow's target or its reverse
/// entry (by reference: an IPv6 entry's addresses stay where they are).
pub struct Nat<'a, A> {
    pub src: &'a A,
    pub dst: &'a A,
    pub sport_be: u16,
    pub dport_be: u16,
}

/// Rewrites the IP header and the L4 ports to `to`, with the checksums
/// that cover them (the address change folded into the L4 checksum as one
/// sum).
#[inline(always)]
pub fn nat<F: Family>(
    ctx: &XdpContext,
    ip: &Ip<F>,
    l4: &L4,
    to: &Nat<'_, F::A>,
) -> Result<(), Reason> {
    let delta = F::rewrite(ip, to.src, to.dst);
    rewrite(ctx, l4, delta, to.sport_be, to.dport_be)
}

/// Rewrites ports and folds the address change (`addr_delta`, from the IP
/// rewrite) into the L4 checksum, which covers the pseudo-header. An
/// invalid checksum stays invalid by the same amount, so a corrupted
/// segment is never made to look valid.
#[inline(always)]
fn rewrite(
    ctx: &XdpContext,
    l4: &L4,
    addr_delta: u32,
    sport_be: u16,
    dport_be: u16,
) -> Result<(), Reason> {
    if l4.tcp {
        let t: *mut TcpHdr = ptr_at(ctx, l4.off).ok_or(Reason::TruncatedL4)?;
        let t = unsafe { &mut *t };
        let mut c = checksum::apply(u16::from_ne_bytes(t.check), addr_delta);
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
        // (Over IPv6 it is invalid, and dropped before this.)
        if c != 0 {
            c = checksum::apply(c, addr_delta);
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
