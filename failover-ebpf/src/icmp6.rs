//! ICMPv6 errors about NATed flows, translated to the flow's other side:
//! the IPv6 counterpart of icmp.rs, in its own program (`failover_icmp6`),
//! with the same rules. A destination unreachable, packet too big or time
//! exceeded from the backend's side, addressed to the SNAT address, goes
//! to the client; one from the client's side, addressed to the VIP, goes
//! to the backend. The outer header, the quoted addresses and ports, the
//! quoted L4 checksum when the quote holds it and the ICMPv6 checksum are
//! rewritten; the outer source becomes the address the recipient talks to.
//!
//! What differs from IPv4: the ICMPv6 checksum covers a pseudo-header, so
//! the outer addresses' change is folded into it; the quote has no header
//! checksum; a router quotes up to the IPv6 minimum MTU, so a message may
//! be 1,240 bytes long (a packet too big about a full-size packet is);
//! a packet too big carries a 32-bit MTU, at least 1,280.
//!
//! What it never does, as for IPv4: change a flow's state, or send an
//! error to anyone but the flow's own client or backend. Checked, in
//! order: the type (any other ICMPv6, neighbour discovery included,
//! passes as `icmpv6`); the length and the checksum over the whole
//! message; the quote's version, protocol and source (the address the
//! error came to); a packet too big's MTU; the hop limit; then the flow,
//! by its whole tuple (the SNAT port included).

use aya_ebpf::{bindings::xdp_action, helpers::bpf_ktime_get_coarse_ns, programs::XdpContext};
use failover_common::{Addr, Addr6, FlowKey, Reason, ReverseKey, checksum, icmp6};
use network_types::ip::Ipv6Hdr;

use crate::{
    egress::{self, Route},
    family::{Family, V6, addr6},
    icmp::sum_ok,
    ipv6::{self, Ipv6},
    maps::{BACKEND_ADDR6, BACKENDS, FLOWS6, ICMP6_BUF, NEXTHOPS6, REVERSE6},
    parse::{IPPROTO_TCP, IPPROTO_UDP, ptr_at},
};

/// The quoted packet as its recipient sent it.
struct Quote {
    src: Addr6,
    dst: Addr6,
    sport_be: u16,
    dport_be: u16,
}

const DROP: u32 = xdp_action::XDP_DROP;
const PASS: u32 = xdp_action::XDP_PASS;
/// Offsets in the quote: addresses, ports, and the L4 checksums (UDP's in
/// the first 8 bytes of L4, TCP's past them).
const Q_SRC: usize = 8;
const Q_DST: usize = 24;
const Q_L4: usize = Ipv6Hdr::LEN;
const UDP_CHECK: usize = Q_L4 + 6;
const TCP_CHECK: usize = Q_L4 + 16;

#[inline(always)]
pub fn handle(ctx: &XdpContext, snat: &Addr6, ip: &Ipv6, reverse: bool) -> (u32, Reason) {
    let len = ip.l4_len() as usize;
    let Some(h) = ptr_at::<[u8; icmp6::HEADER]>(ctx, ip.l4_off) else {
        return (DROP, Reason::IcmpMalformed);
    };
    let h = unsafe { *h };
    if len < icmp6::HEADER {
        return (DROP, Reason::IcmpMalformed);
    }
    if !icmp6::is_error(h[0]) {
        // Neighbour discovery, echo and the rest: the kernel's, as before.
        return (PASS, Reason::Icmpv6);
    }
    let outer_src = V6::src(ip);
    let outer_dst = V6::dst(ip);
    // The pseudo-header: both addresses, the length and the next header,
    // as native words (`checksum::l4_ne`).
    let pseudo = checksum::fold(
        outer_src.sum()
            + outer_dst.sum()
            + u32::from(u16::from_ne_bytes((len as u16).to_be_bytes()))
            + u32::from(u16::from_ne_bytes([0, icmp6::PROTO])),
    ) as u32;
    if !(icmp6::HEADER + icmp6::QUOTE_MIN..=icmp6::MESSAGE_MAX).contains(&len)
        || !sum_ok(ctx, ICMP6_BUF.get_ptr_mut(0), ip.l4_off, len, pseudo)
    {
        return (DROP, Reason::IcmpMalformed);
    }
    let q_off = ip.l4_off + icmp6::HEADER;
    let Some(q) = ptr_at::<[u8; icmp6::QUOTE_MIN]>(ctx, q_off) else {
        return (DROP, Reason::IcmpMalformed);
    };
    let q = unsafe { &mut *q };
    if q[0] >> 4 != 6 {
        return (DROP, Reason::IcmpMalformed);
    }
    // We never NAT a packet with an extension header, nor any but TCP and
    // UDP.
    let proto = q[6];
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return (PASS, Reason::IcmpNoFlow);
    }
    let src = addr6((&raw const q[Q_SRC]).cast());
    if src != outer_dst {
        return (PASS, Reason::IcmpNoFlow);
    }
    if h[0] == icmp6::PACKET_TOO_BIG
        && !icmp6::mtu_plausible(
            u32::from_be_bytes([h[4], h[5], h[6], h[7]]),
            u16::from_be_bytes([q[4], q[5]]) as u32 + Ipv6Hdr::LEN as u32,
        )
    {
        return (DROP, Reason::IcmpMalformed);
    }
    if unsafe { (*ip.hdr).hop_limit } <= 1 {
        return (PASS, Reason::TtlExpired);
    }
    let dst = addr6((&raw const q[Q_DST]).cast());
    let sport = u16::from_ne_bytes([q[Q_L4], q[Q_L4 + 1]]);
    let dport = u16::from_ne_bytes([q[Q_L4 + 2], q[Q_L4 + 3]]);
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let route = |to: &Quote| Route {
        proto: icmp6::PROTO,
        // The recipient hears from the address it sent its packet to.
        src_be: to.dst,
        dst_be: to.src,
        tot_len: ip.tot_len,
        tx: Reason::IcmpTx,
        redirect: Reason::IcmpRedirect,
        now,
    };
    if reverse {
        // About a packet the edge sent a backend for a client.
        let key = ReverseKey::new(dst, *snat, dport, sport, proto);
        let Some(rev) = REVERSE6.get_ptr_mut(&key) else {
            return (PASS, Reason::IcmpNoFlow);
        };
        let rev = unsafe { &mut *rev };
        let to = Quote {
            src: rev.client_be,
            dst: rev.vip_be,
            sport_be: rev.cport_be,
            dport_be: rev.vport_be,
        };
        let r = route(&to);
        if let Err((e, _)) = egress::resolve::<V6>(ctx, &mut rev.nh, &r) {
            return (DROP, e);
        }
        translate(ctx, ip, q_off, len, proto, &to);
        egress::out(ctx, &rev.nh, &r)
    } else {
        // About a packet the edge sent a client for a backend.
        let key = FlowKey::new(dst, src, dport, sport, proto);
        let Some(flow) = (unsafe { FLOWS6.get(&key) }) else {
            return (PASS, Reason::IcmpNoFlow);
        };
        let (Some(be), Some(addr), Some(nh)) = (
            BACKENDS.get(flow.backend_id),
            BACKEND_ADDR6.get(flow.backend_id),
            NEXTHOPS6.get_ptr_mut(flow.backend_id),
        ) else {
            return (PASS, Reason::IcmpNoFlow);
        };
        let nh = unsafe { &mut *nh };
        let to = Quote {
            src: *addr,
            dst: *snat,
            sport_be: be.port_be,
            dport_be: flow.nat_port_be,
        };
        let r = route(&to);
        if let Err((e, _)) = egress::resolve::<V6>(ctx, nh, &r) {
            return (DROP, e);
        }
        translate(ctx, ip, q_off, len, proto, &to);
        egress::out(ctx, nh, &r)
    }
}

/// Rewrites the outer header toward the quoted packet's sender, and the
/// quote to `to`, with the checksums that cover them: the quoted L4
/// checksum when the quote holds it, and the ICMPv6 checksum, whose
/// pseudo-header holds the outer addresses.
#[inline(always)]
fn translate(ctx: &XdpContext, ip: &Ipv6, q_off: usize, len: usize, proto: u8, to: &Quote) {
    let outer = ipv6::rewrite(ip.hdr, &to.dst, &to.src);
    let Some(q) = ptr_at::<[u8; icmp6::QUOTE_MIN]>(ctx, q_off) else {
        return;
    };
    let q = unsafe { &mut *q };
    let mut moved = ipv6::replace_addr((&raw mut q[Q_SRC]).cast(), &to.src)
        + ipv6::replace_addr((&raw mut q[Q_DST]).cast(), &to.dst);
    let sport = u16::from_ne_bytes([q[Q_L4], q[Q_L4 + 1]]);
    let dport = u16::from_ne_bytes([q[Q_L4 + 2], q[Q_L4 + 3]]);
    moved += checksum::delta16(sport, to.sport_be) + checksum::delta16(dport, to.dport_be);
    q[Q_L4..Q_L4 + 2].copy_from_slice(&to.sport_be.to_ne_bytes());
    q[Q_L4 + 2..Q_L4 + 4].copy_from_slice(&to.dport_be.to_ne_bytes());

    let Some(h) = ptr_at::<[u8; icmp6::HEADER]>(ctx, ip.l4_off) else {
        return;
    };
    let h = unsafe { &mut *h };
    let mut c = checksum::apply(u16::from_ne_bytes([h[2], h[3]]), outer + moved);
    // The quoted L4 checksum covers the quoted addresses and ports.
    if proto == IPPROTO_UDP {
        let old = u16::from_ne_bytes([q[UDP_CHECK], q[UDP_CHECK + 1]]);
        let n = checksum::udp_adjust(checksum::apply(old, moved));
        c = checksum::replace16(c, old, n);
        q[UDP_CHECK..UDP_CHECK + 2].copy_from_slice(&n.to_ne_bytes());
    } else if len - icmp6::HEADER >= TCP_CHECK + 2
        && let Some(l4c) = ptr_at::<[u8; 2]>(ctx, q_off + TCP_CHECK)
    {
        let l4c = unsafe { &mut *l4c };
        let old = u16::from_ne_bytes(*l4c);
        let n = checksum::apply(old, moved);
        c = checksum::replace16(c, old, n);
        *l4c = n.to_ne_bytes();
    }
    h[2..4].copy_from_slice(&c.to_ne_bytes());
}
