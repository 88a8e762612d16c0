//! ICMP errors about NATed flows, translated to the flow's other side
//! (RFC 5508 section 4, as a NAT must): a destination unreachable (a
//! frag-needed above all) or time exceeded from the backend's side,
//! addressed to the SNAT address, goes to the client; one from the
//! client's side, addressed to the VIP, goes to the backend. The outer
//! header, the quoted header (addresses and ports back to the recipient's
//! view of its own packet), the quoted header's checksums and the ICMP
//! checksum are rewritten; the outer source becomes the address the
//! recipient talks to (the VIP, or the SNAT address), so a router's
//! address inside another cloud never leaks, and no edge filter drops a
//! source it does not route.
//!
//! What it never does: change a flow's state, or send an error to anyone
//! but the flow's own client or backend. An error must carry a checksum
//! that verifies over the whole message, quote an IPv4 header and 8 bytes
//! of L4 whose source is the address it came to, and match a flow by its
//! whole tuple (the SNAT port included, which an off-path sender does not
//! know); a frag-needed must carry an MTU a real path has (see
//! `failover_common::icmp`). Anything else keeps its reason: malformed ones
//! are dropped, and the rest pass to the kernel, whose own sockets (the
//! agent's probes) may be their subject.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::{bpf_csum_diff, bpf_ktime_get_coarse_ns, bpf_xdp_load_bytes},
    programs::XdpContext,
};
use failover_common::{FlowKey, Node, Reason, ReverseKey, checksum, icmp};
use network_types::ip::Ipv4Hdr;

use crate::{
    egress::{self, Route},
    ipv4::{self, Ipv4},
    maps::{BACKENDS, FLOWS, ICMP_BUF, NEXTHOPS, REVERSE},
    parse::{IPPROTO_TCP, IPPROTO_UDP, ptr_at},
};

/// The quoted packet as its recipient sent it.
struct Quote {
    src_be: u32,
    dst_be: u32,
    sport_be: u16,
    dport_be: u16,
}

const DROP: u32 = xdp_action::XDP_DROP;
const PASS: u32 = xdp_action::XDP_PASS;
/// Where TCP's checksum sits in its header.
const TCP_CHECK: usize = 16;

#[inline(always)]
pub fn handle(ctx: &XdpContext, node: &Node, ip: &Ipv4, reverse: bool) -> (u32, Reason) {
    let len = ip.tot_len as usize - Ipv4Hdr::LEN;
    if len < icmp::HEADER {
        return (DROP, Reason::IcmpMalformed);
    }
    let Some(h) = ptr_at::<[u8; icmp::HEADER]>(ctx, ip.l4_off) else {
        return (DROP, Reason::IcmpMalformed);
    };
    let h = unsafe { *h };
    if !icmp::is_error(h[0]) {
        // Echo and the rest: the kernel's, as before.
        return (PASS, Reason::NotTcpUdp);
    }
    if !(icmp::HEADER + icmp::QUOTE_MIN..=icmp::MESSAGE_MAX).contains(&len)
        || !sum_ok(ctx, ICMP_BUF.get_ptr_mut(0), ip.l4_off, len, 0)
    {
        return (DROP, Reason::IcmpMalformed);
    }
    let q_off = ip.l4_off + icmp::HEADER;
    let Some(q) = ptr_at::<[u8; icmp::QUOTE_MIN]>(ctx, q_off) else {
        return (DROP, Reason::IcmpMalformed);
    };
    let q = unsafe { *q };
    if q[0] >> 4 != 4 || q[0] & 0x0f < 5 {
        return (DROP, Reason::IcmpMalformed);
    }
    let proto = q[9];
    // We never NAT a packet with IP options, nor any but TCP and UDP.
    if q[0] & 0x0f != 5 || (proto != IPPROTO_TCP && proto != IPPROTO_UDP) {
        return (PASS, Reason::IcmpNoFlow);
    }
    let outer_dst = unsafe { (*ip.hdr).dst_addr };
    if q[12..16] != outer_dst {
        return (PASS, Reason::IcmpNoFlow);
    }
    if h[0] == icmp::DEST_UNREACH
        && h[1] == icmp::FRAG_NEEDED
        && !icmp::mtu_plausible(
            u16::from_be_bytes([h[6], h[7]]),
            u16::from_be_bytes([q[2], q[3]]),
        )
    {
        return (DROP, Reason::IcmpMalformed);
    }
    let src = u32::from_ne_bytes([q[12], q[13], q[14], q[15]]);
    let dst = u32::from_ne_bytes([q[16], q[17], q[18], q[19]]);
    let sport = u16::from_ne_bytes([q[20], q[21]]);
    let dport = u16::from_ne_bytes([q[22], q[23]]);
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let route = |to: &Quote| Route {
        proto: icmp::PROTO,
        // The recipient hears from the address it sent its packet to.
        src_be: to.dst_be,
        dst_be: to.src_be,
        tot_len: ip.tot_len,
        tx: Reason::IcmpTx,
        redirect: Reason::IcmpRedirect,
        now,
    };
    if reverse {
        // About a packet the edge sent a backend for a client.
        let key = ReverseKey::new(dst, node.snat_be, dport, sport, proto);
        let Some(rev) = REVERSE.get_ptr_mut(&key) else {
            return (PASS, Reason::IcmpNoFlow);
        };
        let rev = unsafe { &mut *rev };
        let to = Quote {
            src_be: rev.client_be,
            dst_be: rev.vip_be,
            sport_be: rev.cport_be,
            dport_be: rev.vport_be,
        };
        let r = route(&to);
        if let Err((e, _)) = egress::resolve::<crate::family::V4>(ctx, &mut rev.nh, &r) {
            return (DROP, e);
        }
        translate(ctx, ip, q_off, len, proto, &to);
        egress::out(ctx, &rev.nh, &r)
    } else {
        // About a packet the edge sent a client for a backend.
        let key = FlowKey::new(dst, src, dport, sport, proto);
        let Some(flow) = (unsafe { FLOWS.get(&key) }) else {
            return (PASS, Reason::IcmpNoFlow);
        };
        let (Some(be), Some(nh)) = (
            BACKENDS.get(flow.backend_id),
            NEXTHOPS.get_ptr_mut(flow.backend_id),
        ) else {
            return (PASS, Reason::IcmpNoFlow);
        };
        let nh = unsafe { &mut *nh };
        let to = Quote {
            src_be: be.addr_be,
            dst_be: node.snat_be,
            sport_be: be.port_be,
            dport_be: flow.nat_port_be,
        };
        let r = route(&to);
        if let Err((e, _)) = egress::resolve::<crate::family::V4>(ctx, nh, &r) {
            return (DROP, e);
        }
        translate(ctx, ip, q_off, len, proto, &to);
        egress::out(ctx, nh, &r)
    }
}

/// The ICMP checksum verifies over the whole message (`len` bytes, at
/// most `N` words), its sum starting from `init` (ICMPv6's pseudo-header).
/// The message is copied into the per-CPU buffer `buf` and summed by the
/// kernel's `csum_partial` (`bpf_csum_diff`, at most 512 bytes a call).
/// A loop in the program costs more twice over: the verifier walks a
/// plain loop once per word, and everything after it once per way out
/// (the 310 words of ICMPv6 took `failover_icmp6` to 981,778 of its
/// million instructions), and under `bpf_loop` a 556-byte error cost
/// 50 to 90 ns more than this (`cargo xtask bench datapath`,
/// `icmp_error`).
#[inline(always)]
pub fn sum_ok<const N: usize>(
    ctx: &XdpContext,
    buf: Option<*mut [u32; N]>,
    off: usize,
    len: usize,
    init: u32,
) -> bool {
    let Some(buf) = buf else {
        return false;
    };
    // Hidden from the optimiser, which knows what the caller checked and
    // would drop the bound checks the verifier needs here.
    let len = unsafe { core::ptr::read_volatile(&len) };
    if !(icmp::HEADER..=N * 4).contains(&len) {
        return false;
    }
    // Zero the word the message ends in, so its bytes past the end count
    // as the zero padding of RFC 1071, and the sum runs over whole words.
    let last = unsafe { core::ptr::read_volatile(&(len / 4)) };
    if let Some(w) = unsafe { (*buf).get_mut(last) } {
        *w = 0;
    }
    let rc = unsafe { bpf_xdp_load_bytes(ctx.ctx, off as u32, buf.cast(), len as u32) };
    if rc != 0 {
        return false;
    }
    let bytes = len.div_ceil(4) * 4;
    let mut sum = init;
    let mut at = 0;
    while at < N * 4 {
        if at >= bytes {
            break;
        }
        let n = unsafe { core::ptr::read_volatile(&(bytes - at).min(CSUM_MAX)) };
        if n > CSUM_MAX || at + n > N * 4 {
            return false;
        }
        let words = unsafe { buf.cast::<u8>().add(at) };
        let r = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, words.cast(), n as u32, sum) };
        if r < 0 {
            return false;
        }
        sum = r as u32;
        at += CSUM_MAX;
    }
    checksum::fold(sum) == 0xffff
}

/// The most `bpf_csum_diff` sums in one call.
const CSUM_MAX: usize = 512;

/// Rewrites the outer header toward the quoted packet's sender, and the
/// quote to `to`, with every checksum it touches: the outer header's, the
/// quoted header's, the quoted L4 checksum when the quote holds it (TCP's
/// sits past the first 8 bytes) and the ICMP checksum over all of it.
#[inline(always)]
fn translate(ctx: &XdpContext, ip: &Ipv4, q_off: usize, len: usize, proto: u8, to: &Quote) {
    ipv4::rewrite(ip.hdr, to.dst_be, to.src_be);
    let Some(q) = ptr_at::<[u8; icmp::QUOTE_MIN]>(ctx, q_off) else {
        return;
    };
    let q = unsafe { &mut *q };
    let src = u32::from_ne_bytes([q[12], q[13], q[14], q[15]]);
    let dst = u32::from_ne_bytes([q[16], q[17], q[18], q[19]]);
    let sport = u16::from_ne_bytes([q[20], q[21]]);
    let dport = u16::from_ne_bytes([q[22], q[23]]);
    let ip_check = u16::from_ne_bytes([q[10], q[11]]);
    let mut new_ip_check = checksum::replace32(ip_check, src, to.src_be);
    new_ip_check = checksum::replace32(new_ip_check, dst, to.dst_be);

    let Some(h) = ptr_at::<[u8; icmp::HEADER]>(ctx, ip.l4_off) else {
        return;
    };
    let h = unsafe { &mut *h };
    let mut c = u16::from_ne_bytes([h[2], h[3]]);
    c = checksum::replace32(c, src, to.src_be);
    c = checksum::replace32(c, dst, to.dst_be);
    c = checksum::replace16(c, ip_check, new_ip_check);
    c = checksum::replace16(c, sport, to.sport_be);
    c = checksum::replace16(c, dport, to.dport_be);

    // The quoted L4 checksum, where the quote holds it: UDP's always
    // (in the first 8 bytes), TCP's only past them.
    let moved = |old: u16| {
        let mut n = checksum::replace32(old, src, to.src_be);
        n = checksum::replace32(n, dst, to.dst_be);
        n = checksum::replace16(n, sport, to.sport_be);
        checksum::replace16(n, dport, to.dport_be)
    };
    if proto == IPPROTO_UDP {
        let old = u16::from_ne_bytes([q[26], q[27]]);
        // Zero means "no checksum" in UDP over IPv4: keep it that way.
        if old != 0 {
            let n = checksum::udp_adjust(moved(old));
            c = checksum::replace16(c, old, n);
            q[26..28].copy_from_slice(&n.to_ne_bytes());
        }
    } else if len - icmp::HEADER - Ipv4Hdr::LEN >= TCP_CHECK + 2
        && let Some(l4c) = ptr_at::<[u8; 2]>(ctx, q_off + Ipv4Hdr::LEN + TCP_CHECK)
    {
        let l4c = unsafe { &mut *l4c };
        let old = u16::from_ne_bytes(*l4c);
        let n = moved(old);
        c = checksum::replace16(c, old, n);
        *l4c = n.to_ne_bytes();
    }

    q[10..12].copy_from_slice(&new_ip_check.to_ne_bytes());
    q[12..16].copy_from_slice(&to.src_be.to_ne_bytes());
    q[16..20].copy_from_slice(&to.dst_be.to_ne_bytes());
    q[20..22].copy_from_slice(&to.sport_be.to_ne_bytes());
    q[22..24].copy_from_slice(&to.dport_be.to_ne_bytes());
    h[2..4].copy_from_slice(&c.to_ne_bytes());
}
