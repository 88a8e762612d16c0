//! IPv6: validation of packets we handle, and the NAT66 header rewrite.
//! There is no header checksum; the L4 checksum covers the addresses
//! through the pseudo-header (`l4::nat`).
//!
//! Extension headers are not walked: a packet carrying one passes to the
//! kernel with a reason per kind, as IPv4 options do. A fragment passes as
//! in IPv4 (only the first carries the ports).

use aya_ebpf::programs::XdpContext;
use failover_common::{Addr6, Reason, checksum};
use network_types::ip::Ipv6Hdr;

use crate::{
    family::{Ip, V6},
    l4::L4,
    parse::{IPPROTO_TCP, IPPROTO_UDP, ptr_at},
};

pub type Ipv6 = Ip<V6>;

/// Next-header values (IANA protocol numbers).
pub const HOP_BY_HOP: u8 = 0;
pub const ROUTING: u8 = 43;
pub const FRAGMENT: u8 = 44;
pub const ICMPV6: u8 = 58;
pub const DEST_OPTIONS: u8 = 60;

/// Reads the fixed header far enough to learn the destination. A frame too
/// short for it is malformed whoever it is for.
#[inline(always)]
pub fn header(ctx: &XdpContext, l3_off: usize) -> Result<*mut Ipv6Hdr, Reason> {
    ptr_at(ctx, l3_off).ok_or(Reason::MalformedIpv6)
}

/// Full validation, done only for packets addressed to a VIP or to our SNAT
/// address, in this order: version 6; the payload length within the frame
/// (a shorter one leaves Ethernet padding, which is not forwarded as
/// payload); extension headers and ICMPv6 (ICMPv6 continues in
/// `failover_icmp6`); hop limit 0 or 1 (the kernel answers time exceeded);
/// TCP or UDP.
#[inline(always)]
pub fn validate(ctx: &XdpContext, hdr: *mut Ipv6Hdr, l3_off: usize) -> Result<Ipv6, Reason> {
    let ip = bounded(ctx, hdr, l3_off)?;
    match ip.proto {
        HOP_BY_HOP => return Err(Reason::Ipv6HopByHop),
        ROUTING => return Err(Reason::Ipv6Routing),
        FRAGMENT => return Err(Reason::Fragment),
        DEST_OPTIONS => return Err(Reason::Ipv6DestOptions),
        ICMPV6 => return Err(Reason::Icmpv6),
        _ => {}
    }
    if unsafe { (*hdr).hop_limit } <= 1 {
        return Err(Reason::TtlExpired);
    }
    if ip.proto != IPPROTO_TCP && ip.proto != IPPROTO_UDP {
        return Err(Reason::NotTcpUdp);
    }
    Ok(ip)
}

/// `validate`'s first two checks, and ICMPv6 (`failover_icmp6`, which
/// checks the hop limit only of what it translates).
#[inline(always)]
pub fn validate_icmp(ctx: &XdpContext, hdr: *mut Ipv6Hdr, l3_off: usize) -> Result<Ipv6, Reason> {
    let ip = bounded(ctx, hdr, l3_off)?;
    if ip.proto != ICMPV6 {
        return Err(Reason::JumpFailed);
    }
    Ok(ip)
}

/// Version 6, and the payload length within the frame.
#[inline(always)]
fn bounded(ctx: &XdpContext, hdr: *mut Ipv6Hdr, l3_off: usize) -> Result<Ipv6, Reason> {
    let h = unsafe { &*hdr };
    if h.vcf[0] >> 4 != 6 {
        return Err(Reason::MalformedIpv6);
    }
    let tot_len = u16::from_be_bytes(h.payload_len) as usize + Ipv6Hdr::LEN;
    if tot_len > u16::MAX as usize || l3_off + tot_len > ctx.data_end() - ctx.data() {
        return Err(Reason::MalformedIpv6);
    }
    Ok(Ipv6 {
        hdr,
        l4_off: l3_off + Ipv6Hdr::LEN,
        proto: h.next_hdr,
        tot_len: tot_len as u16,
        _f: core::marker::PhantomData,
    })
}

/// Rewrites source and destination and decrements the hop limit. Returns
/// the address change as a checksum delta (`checksum::apply`) for the L4
/// pseudo-header, summed word by word (read as `family::addr6` explains):
/// 16-byte addresses held in registers would spill, and the stack is 512
/// bytes.
#[inline(always)]
pub fn rewrite(hdr: *mut Ipv6Hdr, src: &Addr6, dst: &Addr6) -> u32 {
    let h = unsafe { &mut *hdr };
    h.hop_limit -= 1;
    let s = (&raw mut h.src_addr).cast::<u32>();
    let d = (&raw mut h.dst_addr).cast::<u32>();
    let mut delta = 0;
    let mut i = 0;
    while i < 4 {
        unsafe {
            delta += checksum::delta32(s.add(i).read_volatile(), src[i]);
            delta += checksum::delta32(d.add(i).read_volatile(), dst[i]);
            s.add(i).write_volatile(src[i]);
            d.add(i).write_volatile(dst[i]);
        }
        i += 1;
    }
    delta
}

/// Writes `new` over the address at `at` (in a quote, icmp6.rs), word by
/// word as `rewrite` does. Returns the change as a checksum delta.
#[inline(always)]
pub fn replace_addr(at: *mut [u8; 16], new: &Addr6) -> u32 {
    let p = at.cast::<u32>();
    let mut delta = 0;
    let mut i = 0;
    while i < 4 {
        unsafe {
            delta += checksum::delta32(p.add(i).read_volatile(), new[i]);
            p.add(i).write_volatile(new[i]);
        }
        i += 1;
    }
    delta
}

/// UDP over IPv6 must carry a checksum (RFC 8200 8.1): a zero one is
/// invalid, and the incremental update would turn it into a wrong one.
#[inline(always)]
pub fn udp_checksum_present(ctx: &XdpContext, l4: &L4) -> Result<(), Reason> {
    if l4.tcp {
        return Ok(());
    }
    let c: *const [u8; 2] = ptr_at(ctx, l4.off + 6).ok_or(Reason::TruncatedL4)?;
    if unsafe { *c } == [0, 0] {
        return Err(Reason::UdpZeroChecksum);
    }
    Ok(())
}

/// A fresh header from the packet's destination back to its source (hop
/// limit 64, traffic class and flow label 0), for an answer built in place
/// (reset.rs, toobig.rs). The addresses are swapped word by word where
/// they are.
#[inline(always)]
pub fn answer_header(ctx: &XdpContext, l3_off: usize, proto: u8, l4_len: u16) -> Option<()> {
    let hdr = ptr_at::<Ipv6Hdr>(ctx, l3_off)?;
    let h = unsafe { &mut *hdr };
    h.vcf = [0x60, 0, 0, 0];
    h.payload_len = l4_len.to_be_bytes();
    h.next_hdr = proto;
    h.hop_limit = 64;
    let s = (&raw mut h.src_addr).cast::<u32>();
    let d = (&raw mut h.dst_addr).cast::<u32>();
    // Word access as `family::addr6` explains.
    let mut i = 0;
    while i < 4 {
        unsafe {
            let w = s.add(i).read_volatile();
            s.add(i).write_volatile(d.add(i).read_volatile());
            d.add(i).write_volatile(w);
        }
        i += 1;
    }
    Some(())
}
