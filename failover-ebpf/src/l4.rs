//! TCP and UDP: ports, flags, and the port/pseudo-header checksum update
//! that goes with a NAT rewrite.

use aya_ebpf::programs::XdpContext;
use failover_common::{Reason, checksum};
use network_types::{tcp::TcpHdr, udp::UdpHdr};

use crate::parse::{IPPROTO_TCP, ptr_at};

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// What a TCP segment does to its flow's NAT entries, in either direction.
pub enum Closing {
    /// Nothing: the flow goes on.
    Keep,
    /// A FIN: note its side on both entries.
    Fin,
    /// An RST, or the last ACK once both sides sent a FIN: free both.
    Free,
}

/// The closing rule, given the segment's flags and the FINs seen so far
/// (`FIN_*` bits of the entry at hand).
#[inline(always)]
pub fn closing(flags: u8, fins: u8) -> Closing {
    if flags & TCP_RST != 0 || (flags & TCP_FIN == 0 && fins == failover_common::FIN_BOTH) {
        Closing::Free
    } else if flags & TCP_FIN != 0 {
        Closing::Fin
    } else {
        Closing::Keep
    }
}

/// Where the ports and checksum of a TCP or UDP header sit.
pub struct L4 {
    pub off: usize,
    pub tcp: bool,
    pub sport_be: u16,
    pub dport_be: u16,
    /// TCP flags byte; 0 for UDP.
    pub flags: u8,
}

#[inline(always)]
pub fn parse(ctx: &XdpContext, off: usize, proto: u8) -> Result<L4, Reason> {
    if proto == IPPROTO_TCP {
        let t: *mut TcpHdr = ptr_at(ctx, off).ok_or(Reason::TruncatedL4)?;
        let t = unsafe { &*t };
        let raw: &[u8; TcpHdr::LEN] = unsafe { &*(t as *const TcpHdr).cast() };
        // Data offset below 5 words cannot hold the header itself.
        if raw[12] >> 4 < 5 {
            return Err(Reason::TruncatedL4);
        }
        Ok(L4 {
            off,
            tcp: true,
            sport_be: u16::from_ne_bytes(t.source),
            dport_be: u16::from_ne_bytes(t.dest),
            flags: raw[13],
        })
    } else {
        let u: *mut UdpHdr = ptr_at(ctx, off).ok_or(Reason::TruncatedL4)?;
        let u = unsafe { &*u };
        Ok(L4 {
            off,
            tcp: false,
            sport_be: u16::from_ne_bytes(u.src),
            dport_be: u16::from_ne_bytes(u.dst),
            flags: 0,
        })
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
