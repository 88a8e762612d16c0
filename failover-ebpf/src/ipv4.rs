//! IPv4: validation of packets we handle, and header rewrites with
//! incremental checksum updates (RFC 1624).

use aya_ebpf::programs::XdpContext;
use failover_common::{Reason, checksum, icmp};
use network_types::ip::Ipv4Hdr;

use crate::{
    family::{Ip, V4},
    parse::{IPPROTO_TCP, IPPROTO_UDP, ptr_at},
};

/// A validated IPv4 header without options, and the protocol after it
/// (TCP, UDP or ICMP).
pub type Ipv4 = Ip<V4>;

/// Reads the header far enough to learn the destination. A frame too short
/// for an IPv4 header is malformed whoever it is for.
#[inline(always)]
pub fn header(ctx: &XdpContext, l3_off: usize) -> Result<*mut Ipv4Hdr, Reason> {
    ptr_at(ctx, l3_off).ok_or(Reason::MalformedIpv4)
}

/// Full validation, done only for packets addressed to a VIP or to our SNAT
/// address: anything else is the kernel's to judge.
#[inline(always)]
pub fn validate(ctx: &XdpContext, hdr: *mut Ipv4Hdr, l3_off: usize) -> Result<Ipv4, Reason> {
    let h = unsafe { &*hdr };
    let version = h.vihl >> 4;
    let ihl = h.vihl & 0x0f;
    if version != 4 || ihl < 5 {
        return Err(Reason::MalformedIpv4);
    }
    if ihl > 5 {
        // Options are rare and legal; the kernel handles them (slow path).
        return Err(Reason::IpOptions);
    }
    let tot_len = u16::from_be_bytes(h.tot_len);
    if (tot_len as usize) < Ipv4Hdr::LEN || l3_off + tot_len as usize > ctx.data_end() - ctx.data()
    {
        return Err(Reason::MalformedIpv4);
    }
    if !checksum_ok(h) {
        return Err(Reason::BadIpv4Checksum);
    }
    // MF set or a non-zero offset: any fragment. Ports are only in the
    // first one, so none can be NATed consistently here.
    if u16::from_be_bytes(h.frags) & 0x3fff != 0 {
        return Err(Reason::Fragment);
    }
    if h.ttl <= 1 {
        // The kernel answers with ICMP time exceeded.
        return Err(Reason::TtlExpired);
    }
    if h.proto != IPPROTO_TCP && h.proto != IPPROTO_UDP && h.proto != icmp::PROTO {
        return Err(Reason::NotTcpUdp);
    }
    Ok(Ipv4 {
        hdr,
        l4_off: l3_off + Ipv4Hdr::LEN,
        proto: h.proto,
        tot_len,
        _f: core::marker::PhantomData,
    })
}

/// A valid header's words sum to 0xffff (RFC 1071).
#[inline(always)]
fn checksum_ok(h: &Ipv4Hdr) -> bool {
    let words: &[u16; 10] = unsafe { &*(h as *const Ipv4Hdr).cast::<[u16; 10]>() };
    let mut sum = 0u32;
    let mut i = 0;
    while i < 10 {
        sum += words[i] as u32;
        i += 1;
    }
    checksum::fold(sum) == 0xffff
}

/// Rewrites source and destination and decrements the TTL, updating the
/// header checksum incrementally. Returns the address change as a checksum
/// delta (`checksum::apply`), for the L4 pseudo-header update.
#[inline(always)]
pub fn rewrite(hdr: *mut Ipv4Hdr, src_be: u32, dst_be: u32) -> u32 {
    let h = unsafe { &mut *hdr };
    let old_src = u32::from_ne_bytes(h.src_addr);
    let old_dst = u32::from_ne_bytes(h.dst_addr);
    let delta = checksum::delta32(old_src, src_be) + checksum::delta32(old_dst, dst_be);
    let mut check = checksum::apply(u16::from_ne_bytes(h.check), delta);
    // TTL shares a 16-bit word with the protocol.
    let old_word = u16::from_ne_bytes([h.ttl, h.proto]);
    h.ttl -= 1;
    let new_word = u16::from_ne_bytes([h.ttl, h.proto]);
    check = checksum::replace16(check, old_word, new_word);
    h.src_addr = src_be.to_ne_bytes();
    h.dst_addr = dst_be.to_ne_bytes();
    h.check = check.to_ne_bytes();
    delta
}

/// A fresh header from the packet's destination back to its source (TTL
/// 64, DF, id 0), for an answer built in place (reset.rs).
#[inline(always)]
pub fn answer_header(ctx: &XdpContext, l3_off: usize, proto: u8, l4_len: u16) -> Option<()> {
    let hdr = ptr_at::<[u8; Ipv4Hdr::LEN]>(ctx, l3_off)?;
    let h = unsafe { &mut *hdr };
    let mut n = [0u8; Ipv4Hdr::LEN];
    n[0] = 0x45;
    n[2..4].copy_from_slice(&(Ipv4Hdr::LEN as u16 + l4_len).to_be_bytes());
    n[6] = 0x40; // DF
    n[8] = 64;
    n[9] = proto;
    n[12..16].copy_from_slice(&h[16..20]);
    n[16..20].copy_from_slice(&h[12..16]);
    let c = checksum::ipv4_header(&n);
    n[10..12].copy_from_slice(&c.to_be_bytes());
    *h = n;
    Some(())
}
