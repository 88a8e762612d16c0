//! Half-open TCP flows (`PENDING`, see `failover_common::Pending`): a SYN,
//! or a segment picked up mid-stream, claims a slot; the backend's answer
//! is read there for passive health; the flow is promoted to
//! `FLOWS`/`REVERSE` when its handshake completes (the client ACKs the
//! backend's SYN-ACK) or, picked up, when the backend answers without an
//! RST. A spoofed SYN never sees the SYN-ACK, so it never reaches the
//! established tables, and its slot is free again when it expires.

use aya_ebpf::{
    bindings::xdp_action,
    cty::c_void,
    helpers::{bpf_ktime_get_ns, generated::bpf_loop},
    programs::XdpContext,
};
use failover_common::{
    Addr, FLOW_ANSWERED, FLOW_PICKUP, FLOW_SYN_SENT, Flow, FlowKey, HALF_OPEN_MS_DEFAULT, NextHop,
    Node, Pending, Reason, ReverseKey, SEEN_SHIFT, SNAT_PROBES, SVC_F_RESET, Service, state, tcp,
};

use crate::{
    egress::{self, Route},
    family::{Family, Ip},
    forward::{self, Packet, Target},
    l4::{self, L4, TCP_ACK, TCP_RST, TCP_SYN},
    maps::BACKENDS,
    select, stats,
};

/// A client's TCP segment with no established flow: its own pending slot
/// if it has one (a retransmitted SYN keeps its backend, the ACK that
/// completes the handshake promotes), else a new one toward the ring's
/// choice for `fh`: the first free slot, or when every probed slot is taken,
/// the first. So no flood holds the SNAT ports, and a flood's slots, being
/// most of them, are the ones taken most. (Taking the oldest instead would
/// make the verifier walk every order of the 32 slots.)
#[inline(always)]
pub fn forward<F: Family>(
    pkt: &Packet<'_, F>,
    k: &FlowKey<F::A>,
    svc: &Service,
    fh: u32,
    now_c: u64,
) -> (u32, Reason) {
    let Packet { ctx, node, ip, l4 } = *pkt;
    let now = unsafe { bpf_ktime_get_ns() };
    let chosen = select::select::<F>(svc, fh);
    // The first slot that is this flow's or free ends the search: a
    // retransmitted SYN finds its own before any that freed up since. The
    // loop only looks: what is done with the slot comes after it, so the
    // verifier walks the sending code once, not once per probe.
    let (addr_be, port_be) = chosen
        .as_ref()
        .map_or((F::A::default(), 0), |c| (c.addr_be, c.port_be));
    let found = scan::<F>(k, node, addr_be, port_be, now);
    let port = found as u16;
    let (mut mine, mut claim, mut steal) = (None, None, None);
    match found >> 16 {
        MINE => mine = Some(port),
        FREE => claim = Some(port),
        STEAL => steal = Some(port),
        _ => {}
    }
    if let Some(port) = mine
        && let Some(p) = F::pending().get_ptr_mut(port as u32)
    {
        let p = unsafe { &mut *p };
        // A SYN with another ISN after the backend answered: the client
        // gave up on that handshake and opens a new connection, which
        // follows the ring.
        let reopened = tcp::opening(l4.flags)
            && p.state == FLOW_ANSWERED
            && l4.seq.wrapping_add(1) != p.syn_ack;
        let be = BACKENDS.get(p.backend_id);
        let addr = be.and_then(|be| F::backend_addr(p.backend_id, be));
        match (be, addr) {
            (Some(be), Some(addr_be))
                if !reopened && (be.state == state::UP || be.state == state::DRAINING) =>
            {
                let t = Target {
                    backend_id: p.backend_id,
                    service_id: p.service_id,
                    addr_be,
                    port_be: be.port_be,
                    nat_port_be: port.to_be(),
                };
                return ours(pkt, p, &t, now_c);
            }
            _ => {
                // Reopened, or its backend went down during the handshake.
                p.expires_ns = 0;
                if !reopened && p.svc_flags & SVC_F_RESET != 0 && !tcp::opening(l4.flags) {
                    return forward::reset(ctx, ip, l4, p.service_id, Some(p.backend_id));
                }
                // A SYN starts again on the ring, in this slot if it
                // serves the new choice.
                if let Some(c) = &chosen
                    && !held::<F>(&c.addr_be, c.port_be, port, node, k.proto)
                {
                    claim = Some(port);
                }
            }
        }
    }
    if !tcp::may_create(l4.flags) {
        // An RST or a SYN-ACK with no flow: nothing to forward it to, and
        // it must not leave state behind.
        return (xdp_action::XDP_DROP, Reason::NotOpening);
    }
    let Some(chosen) = chosen else {
        // Fail closed, but tell the client now instead of letting it
        // retransmit into silence.
        return forward::reset(ctx, ip, l4, svc.id, None);
    };
    let port = match (claim, steal) {
        (Some(port), _) => port,
        (None, Some(port)) => {
            if let Some(s) = stats::backend(chosen.id) {
                s.pending_evicted += 1;
            }
            port
        }
        // Every probed port is held by an established flow.
        (None, None) => return (xdp_action::XDP_DROP, Reason::SnatExhausted),
    };
    let Some(p) = F::pending().get_ptr_mut(port as u32) else {
        return (xdp_action::XDP_DROP, Reason::SnatExhausted);
    };
    let p = unsafe { &mut *p };
    let half_open_ms = if svc.half_open_ms == 0 {
        HALF_OPEN_MS_DEFAULT
    } else {
        svc.half_open_ms
    };
    // Field by field, in place: a whole value would be built on the stack
    // first (96 bytes for IPv6).
    p.expires_ns = now + half_open_ms as u64 * 1_000_000;
    p.created_ns = now;
    p.client_be = k.src_be;
    p.vip_be = k.dst_be;
    p.cport_be = k.sport_be;
    p.vport_be = k.dport_be;
    p.backend_be = chosen.addr_be;
    p.bport_be = chosen.port_be;
    p.proto = k.proto;
    p.state = if tcp::opening(l4.flags) {
        FLOW_SYN_SENT
    } else {
        FLOW_PICKUP
    };
    p.backend_id = chosen.id;
    p.service_id = svc.id;
    p.svc_flags = svc.flags;
    p.syn_ack = l4.seq.wrapping_add(1);
    p.synack_ack = 0;
    let t = Target {
        backend_id: chosen.id,
        service_id: svc.id,
        addr_be: chosen.addr_be,
        port_be: chosen.port_be,
        nat_port_be: port.to_be(),
    };
    let out = forward::send(pkt, &t, true, now_c);
    if !forward::sent(out) {
        // Not sent (no route, no neighbour, ...): keep no state for it.
        p.expires_ns = 0;
    }
    out
}

const NONE: u32 = 0;
const MINE: u32 = 1;
const FREE: u32 = 2;
const STEAL: u32 = 3;

/// Looks for `k`'s own slot, or the first free one (expired, and no
/// established flow holds its port toward `addr_be:port_be`; unset: no
/// backend to claim for). Returns `MINE`, `FREE`, `STEAL` (no free one: the
/// first half-open slot whose port no established flow holds) or `NONE`,
/// << 16 | the port. What is done with the slot comes after the scan.
///
/// The probes run under `bpf_loop`, whose step the verifier checks once
/// for any index: as a plain loop it was walked step by step, once per
/// way into each step, and the IPv4 new-flow program used half of the
/// verifier's million instructions on it (tests/tests/verifier_budget.rs).
#[inline(always)]
fn scan<F: Family>(k: &FlowKey<F::A>, node: &Node, addr_be: F::A, port_be: u16, now: u64) -> u32 {
    let mut s = Scan::<F> {
        k,
        node,
        addr_be,
        port_be,
        now,
        found: NONE << 16,
    };
    let done = unsafe {
        bpf_loop(
            SNAT_PROBES,
            step::<F> as *mut c_void,
            (&raw mut s).cast(),
            0,
        )
    };
    if done < 0 {
        return NONE << 16;
    }
    s.found
}

/// What `scan`'s steps share.
struct Scan<'a, F: Family> {
    k: &'a FlowKey<F::A>,
    node: &'a Node,
    addr_be: F::A,
    port_be: u16,
    now: u64,
    /// `STEAL` once a takeable slot was seen, then `MINE` or `FREE` at
    /// the step that ends the scan.
    found: u32,
}

/// Probe `i` of `scan`: 1 ends the scan.
extern "C" fn step<F: Family>(i: u64, ctx: *mut c_void) -> i64 {
    let s = unsafe { &mut *ctx.cast::<Scan<'_, F>>() };
    let k = s.k;
    let port = forward::snat_port(s.node, k, i as u32) as u16;
    let Some(p) = F::pending().get(port as u32) else {
        return 0;
    };
    let live = p.expires_ns > s.now;
    if live && is_of(p, k) {
        s.found = MINE << 16 | port as u32;
        return 1;
    }
    let free = !live;
    if s.addr_be != F::A::default()
        && (free || s.found == NONE << 16)
        && !held::<F>(&s.addr_be, s.port_be, port, s.node, k.proto)
    {
        if free {
            s.found = FREE << 16 | port as u32;
            return 1;
        }
        s.found = STEAL << 16 | port as u32;
    }
    0
}

/// An established flow holds `port` toward `addr_be:port_be`.
#[inline(always)]
fn held<F: Family>(addr_be: &F::A, port_be: u16, port: u16, node: &Node, proto: u8) -> bool {
    let key = ReverseKey::new(*addr_be, F::snat(node), port_be, port.to_be(), proto);
    F::reverse().get_ptr(&key).is_some()
}

#[inline(always)]
fn is_of<A: Addr>(p: &Pending<A>, k: &FlowKey<A>) -> bool {
    p.client_be == k.src_be
        && p.cport_be == k.sport_be
        && p.vip_be == k.dst_be
        && p.vport_be == k.dport_be
}

/// The client's segments while its handshake is open.
#[inline(always)]
fn ours<F: Family>(
    pkt: &Packet<'_, F>,
    p: &mut Pending<F::A>,
    t: &Target<F::A>,
    now_c: u64,
) -> (u32, Reason) {
    let l4 = pkt.l4;
    if tcp::opening(l4.flags) {
        // A retransmitted SYN, or a new ISN on the same tuple: the
        // backend answers the latest.
        p.syn_ack = l4.seq.wrapping_add(1);
    } else if p.state == FLOW_ANSWERED && l4.flags & TCP_ACK != 0 && l4.ack == p.synack_ack {
        // The client ACKs the backend's SYN-ACK: the handshake is done.
        if let Err(r) = promote::<F>(p, t, F::snat(pkt.node), now_c) {
            p.expires_ns = 0;
            return (xdp_action::XDP_DROP, r);
        }
        p.expires_ns = 0;
    } else if l4.flags & TCP_RST != 0 {
        p.expires_ns = 0;
    }
    forward::send(pkt, t, false, now_c)
}

/// Moves a pending flow to `FLOWS`/`REVERSE`.
#[inline(always)]
fn promote<F: Family>(
    p: &Pending<F::A>,
    t: &Target<F::A>,
    snat: F::A,
    now_c: u64,
) -> Result<(), Reason> {
    let k = p.flow_key();
    let rkey = forward::reverse_key(t, snat, p.proto);
    let rval = forward::established(&k, p.backend_id, p.service_id, now_c, p.created_ns)
        .ok_or(Reason::FlowTableFull)?;
    if F::reverse().insert(&rkey, rval, 0).is_err() {
        return Err(Reason::FlowTableFull);
    }
    let flow = Flow {
        backend_id: p.backend_id,
        service_id: p.service_id,
        nat_port_be: t.nat_port_be,
        fins: 0,
        data: 0,
        svc_flags: p.svc_flags,
        fin_ack: 0,
        seen: (now_c >> SEEN_SHIFT) as u32,
        created_ns: p.created_ns,
    };
    if F::flows().insert(&k, &flow, 0).is_err() {
        let _ = F::reverse().remove(&rkey);
        return Err(Reason::FlowTableFull);
    }
    Ok(())
}

/// A backend's TCP segment to the SNAT address with no established flow:
/// the answer to a pending one, read for passive health, or not ours.
#[inline(always)]
pub fn reverse<F: Family>(
    ctx: &XdpContext,
    ip: &Ip<F>,
    l4: &L4,
    rkey: &ReverseKey<F::A>,
    now_c: u64,
) -> (u32, Reason) {
    let Some(p) = F::pending().get_ptr_mut(u16::from_be(rkey.nat_port_be) as u32) else {
        return (xdp_action::XDP_PASS, Reason::NotVip);
    };
    let p = unsafe { &mut *p };
    let now = unsafe { bpf_ktime_get_ns() };
    if !l4.tcp
        || p.expires_ns <= now
        || p.backend_be != rkey.backend_be
        || p.bport_be != rkey.bport_be
        || p.proto != rkey.proto
    {
        // Traffic to the node's own sockets on the SNAT address (the
        // agent's probes, for one) is the kernel's.
        return (xdp_action::XDP_PASS, Reason::NotVip);
    }
    let t = Target {
        backend_id: p.backend_id,
        service_id: p.service_id,
        addr_be: p.backend_be,
        port_be: p.bport_be,
        nat_port_be: rkey.nat_port_be,
    };
    // A SYN-ACK or an RST answers the SYN only if it ACKs it: an off-path
    // forger of the backend's address does not know the client's ISN.
    let acks_syn = l4.flags & TCP_ACK != 0 && l4.ack == p.syn_ack;
    if let Some(s) = stats::backend(p.backend_id) {
        s.traffic.rev_packets += 1;
        s.traffic.rev_bytes += ip.tot_len as u64;
        if p.state == FLOW_PICKUP {
            // No handshake to watch: the backend either knows the flow
            // (it answers, and the flow is promoted) or resets it.
            if l4.flags & TCP_RST == 0 && promote::<F>(p, &t, rkey.snat_be, now_c).is_err() {
                return (xdp_action::XDP_DROP, Reason::FlowTableFull);
            }
            p.expires_ns = 0;
        } else if l4.flags & TCP_RST != 0 {
            if acks_syn {
                s.syn_rsts += 1;
                p.expires_ns = 0;
            }
        } else if l4.flags & TCP_SYN != 0 {
            if acks_syn {
                s.synacks += 1;
                if p.state == FLOW_SYN_SENT {
                    s.rtt_last_ns = now.saturating_sub(p.created_ns);
                    s.rtt_at_ns = now;
                }
                p.state = FLOW_ANSWERED;
                p.synack_ack = l4.seq.wrapping_add(1);
            }
        } else {
            // Anything else (a challenge ACK to a SYN on a tuple the backend
            // still holds) answers that SYN, but says nothing of the port:
            // it must not clear refusals, only offset the silence.
            s.syn_other += 1;
        }
    }
    if let Some(s) = stats::service(p.service_id) {
        s.rev_packets += 1;
        s.rev_bytes += ip.tot_len as u64;
    }
    let route = Route {
        proto: ip.proto,
        src_be: p.vip_be,
        dst_be: p.client_be,
        tot_len: ip.tot_len,
        tx: Reason::ReverseTx,
        redirect: Reason::ReverseRedirect,
        now: now_c,
    };
    // A handshake's few replies look the client's next hop up each time;
    // the established entry caches it.
    let mut nh = NextHop::default();
    match egress::resolve::<F>(ctx, &mut nh, &route) {
        Ok(()) => {}
        Err((Reason::MtuExceeded, mtu)) => return F::too_big(ctx, ip, mtu, now_c),
        Err((r, _)) => return (xdp_action::XDP_DROP, r),
    }
    if l4.flags & TCP_SYN != 0 {
        l4::clamp_mss(ctx, l4, p.backend_id);
    }
    let to = l4::Nat {
        src: &p.vip_be,
        dst: &p.client_be,
        sport_be: p.vport_be,
        dport_be: p.cport_be,
    };
    if let Err(e) = l4::nat(ctx, ip, l4, &to) {
        return (xdp_action::XDP_DROP, e);
    }
    egress::out(ctx, &nh, &route)
}
