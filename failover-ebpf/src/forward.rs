//! Client -> VIP: follow the flow's pin (fast path: one flow lookup), or
//! find the service and pick a backend: a TCP flow starts half-open in
//! `PENDING` (pending.rs) and reaches `FLOWS` when its handshake completes;
//! a UDP flow is pinned at once. Then rewrite and send.

use aya_ebpf::{
    bindings::{BPF_NOEXIST, xdp_action},
    helpers::{bpf_ktime_get_ns, generated::bpf_ktime_get_coarse_ns},
    programs::XdpContext,
};
use failover_common::{
    Addr, Backend, DATA_ASKED, FLOW_ESTABLISHED, Flow, FlowKey, LAST_HOP_TTL_NS, NextHop, Node,
    Reason, Reverse, ReverseKey, SEEN_SHIFT, SNAT_PROBES, SVC_F_RESET, Service, ServiceKey, hash,
    state,
    tcp::{self, SynWorth},
};

use crate::{
    egress::{self, Route},
    family::{Family, Ip},
    l4::{self, Closing, L4, Nat},
    maps::{BACKENDS, EVIDENCE, JUMPS},
    pending, reset, scratch, select, stats,
};

/// The packet in hand once its flow is looked up: what sending it on
/// reads. One value instead of four arguments on every step after the
/// lookup.
pub struct Packet<'a, F: Family> {
    pub ctx: &'a XdpContext,
    pub node: &'a Node,
    pub ip: &'a Ip<F>,
    pub l4: &'a L4,
}

/// Where a forwarded packet goes: the backend, and the flow's NAT port.
#[derive(Clone, Copy)]
pub struct Target<A> {
    pub backend_id: u32,
    pub service_id: u32,
    pub addr_be: A,
    pub port_be: u16,
    pub nat_port_be: u16,
}

impl<A: Addr> Target<A> {
    /// An established flow's target: its backend's current address.
    #[inline(always)]
    fn pinned<F: Family<A = A>>(flow: &Flow, be: &Backend) -> Option<Self> {
        Some(Self {
            backend_id: flow.backend_id,
            service_id: flow.service_id,
            addr_be: F::backend_addr(flow.backend_id, be)?,
            port_be: be.port_be,
            nat_port_be: flow.nat_port_be,
        })
    }
}

#[inline(always)]
pub fn handle<F: Family>(ctx: &XdpContext, node: &Node, ip: &Ip<F>, l4: &mut L4) -> (u32, Reason) {
    let fkey = flow_key(ip, l4);

    // A bare SYN opens a connection.
    let opening = l4.tcp && tcp::opening(l4.flags);
    // Only a SYN every live backend must answer is passive-health
    // evidence; one with a wrong checksum goes nowhere (tcp.rs).
    if opening && l4.payload == 0 {
        match l4::syn_worth(ctx, ip, l4) {
            SynWorth::Evidence => l4.evidence = true,
            SynWorth::Ignored => {}
            SynWorth::BadChecksum => return (xdp_action::XDP_DROP, Reason::BadL4Checksum),
        }
    }
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let l4 = &*l4;
    let pkt = Packet { ctx, node, ip, l4 };

    // Fast path: an established flow whose backend still takes traffic.
    if let Some(flow) = F::flows().get_ptr_mut(&fkey) {
        let flow = unsafe { &mut *flow };
        let be = BACKENDS.get(flow.backend_id);
        let pinned = be.and_then(|be| Target::pinned::<F>(flow, be));
        match (be, pinned) {
            (Some(be), Some(t)) if be.state == state::UP || be.state == state::DRAINING => {
                if opening {
                    // A new connection on a reused client port: the old
                    // one's entries outlived it (its last ACK was missed).
                    // It follows the ring as any new flow: after a failback
                    // it goes home, and its handshake counts for passive
                    // health.
                    let f = *flow;
                    forget::<F>(&fkey, &f, node);
                } else {
                    let out = forward_pinned(&pkt, flow, &t, now);
                    if l4.tcp {
                        match l4::closing(l4, flow.fins, flow.fin_ack, l4::CLIENT) {
                            Closing::Free => {
                                let f = *flow;
                                forget::<F>(&fkey, &f, node);
                            }
                            Closing::Note { bits, fin_ack } => {
                                let rkey = reverse_key(&t, F::snat(node), ip.proto);
                                let rev =
                                    F::reverse().get_ptr_mut(&rkey).map(|r| unsafe { &mut *r });
                                l4::note(
                                    &mut flow.fins,
                                    rev.map(|r| (&mut r.fins, &mut r.fin_ack)),
                                    bits,
                                    fin_ack,
                                );
                            }
                            Closing::Keep => {}
                        }
                    }
                    return out;
                }
            }
            _ => {
                let f = *flow;
                forget::<F>(&fkey, &f, node);
                if l4.tcp && f.svc_flags & SVC_F_RESET != 0 && !opening {
                    return reset(ctx, ip, l4, f.service_id, Some(f.backend_id));
                }
                // Otherwise select again below: a SYN gets a live backend;
                // a mid-stream TCP segment is picked up, and the new
                // backend answers it with an RST.
            }
        }
    }

    if l4.tcp {
        // A TCP segment without an established flow: the half-open path
        // (pending.rs) runs as its own program, so the verifier walks its
        // probe loops apart from this one's paths. Its one input that
        // cannot be read from the packet again is the SYN's worth.
        if let Some(e) = EVIDENCE.get_ptr_mut(0) {
            unsafe { *e = l4.evidence as u32 };
        }
        unsafe { JUMPS.tail_call(ctx, F::JUMP_NEW_TCP) };
        return (xdp_action::XDP_DROP, Reason::JumpFailed);
    }
    let Some((svc, fh)) = service::<F>(node, &fkey) else {
        // A VIP filter false positive, or a port we do not serve.
        return (xdp_action::XDP_PASS, Reason::NotVip);
    };
    let Some(chosen) = select::select::<F>(svc, fh) else {
        // Fail closed.
        return (xdp_action::XDP_DROP, Reason::NoBackend);
    };
    new_udp_flow(&pkt, &fkey, svc, &chosen, now)
}

/// An established flow's packet that only needs forwarding (its backend
/// takes traffic; it opens and closes nothing), sent from `failover_xdp`
/// itself for IPv6: the tail call to `failover_v6` and its second parse
/// cost about 27 ns of `established6`'s 210 (`bench datapath`, with
/// `failover_v6` run alone beside it). `None`, with nothing changed, for
/// anything else: `failover_v6` then walks the packet from the start.
#[inline(always)]
pub fn established_only<F: Family>(
    ctx: &XdpContext,
    node: &Node,
    ip: &Ip<F>,
    l4: &L4,
) -> Option<(u32, Reason)> {
    if l4.tcp && tcp::opening(l4.flags) {
        return None;
    }
    let fkey = flow_key(ip, l4);
    let flow = unsafe { &mut *F::flows().get_ptr_mut(&fkey)? };
    let be = BACKENDS.get(flow.backend_id)?;
    if be.state != state::UP && be.state != state::DRAINING {
        return None;
    }
    if l4.tcp
        && !matches!(
            l4::closing(l4, flow.fins, flow.fin_ack, l4::CLIENT),
            Closing::Keep
        )
    {
        return None;
    }
    let t = Target::pinned::<F>(flow, be)?;
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    Some(forward_pinned(&Packet { ctx, node, ip, l4 }, flow, &t, now))
}

/// An established flow's packet on to its backend: the flow's last-seen
/// time, its first request payload, then `send`.
#[inline(always)]
fn forward_pinned<F: Family>(
    pkt: &Packet<'_, F>,
    flow: &mut Flow,
    t: &Target<F::A>,
    now: u64,
) -> (u32, Reason) {
    flow.seen = (now >> SEEN_SHIFT) as u32;
    if pkt.l4.payload != 0 && flow.data & DATA_ASKED == 0 {
        asked(flow);
    }
    send(pkt, t, false, now)
}

/// The flow's first request payload: the backend now owes it an answer
/// (`health::wedge` in the agent). Once per flow, so the established
/// path pays one test of a byte it already has in cache.
#[inline(never)]
pub fn asked(flow: &mut Flow) {
    flow.data |= DATA_ASKED;
    if let Some(s) = stats::backend(flow.backend_id) {
        s.asked += 1;
    }
}

/// The client's 5-tuple as received: the `FLOWS` key.
#[inline(always)]
fn flow_key<F: Family>(ip: &Ip<F>, l4: &L4) -> FlowKey<F::A> {
    FlowKey::new(F::src(ip), F::dst(ip), l4.sport_be, l4.dport_be, ip.proto)
}

/// The service `k` is addressed to, and the flow's hash.
#[inline(always)]
fn service<F: Family>(node: &Node, k: &FlowKey<F::A>) -> Option<(&'static Service, u32)> {
    let skey = ServiceKey {
        vip_be: k.dst_be,
        port_be: k.dport_be,
        proto: k.proto,
        _pad: 0,
    };
    let svc = unsafe { F::services().get(&skey) }?;
    let fh = hash::flow_hash(
        k.src_be.word(),
        k.dst_be.word(),
        k.sport_be,
        k.dport_be,
        k.proto,
        node.seed,
    );
    Some((svc, fh))
}

/// A TCP segment with no established flow (`failover_new_tcp`, tail-called
/// from `handle`): its half-open slot, or a new one.
#[inline(always)]
pub fn new_tcp<F: Family>(ctx: &XdpContext, node: &Node, ip: &Ip<F>, l4: &mut L4) -> (u32, Reason) {
    let fkey = flow_key(ip, l4);
    l4.evidence = EVIDENCE.get(0).is_some_and(|e| *e != 0);
    let Some((svc, fh)) = service::<F>(node, &fkey) else {
        return (xdp_action::XDP_PASS, Reason::NotVip);
    };
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let pkt = Packet {
        ctx,
        node,
        ip,
        l4: &*l4,
    };
    pending::forward(&pkt, &fkey, svc, fh, now)
}

/// A UDP flow has no handshake to wait for: pinned at once, in both tables.
#[inline(always)]
fn new_udp_flow<F: Family>(
    pkt: &Packet<'_, F>,
    k: &FlowKey<F::A>,
    svc: &Service,
    chosen: &select::Chosen<F::A>,
    now: u64,
) -> (u32, Reason) {
    let node = pkt.node;
    let created = unsafe { bpf_ktime_get_ns() };
    let Some(rval) = established(k, chosen.id, svc.id, now, created) else {
        return (xdp_action::XDP_DROP, Reason::FlowTableFull);
    };
    let mut t = Target {
        backend_id: chosen.id,
        service_id: svc.id,
        addr_be: chosen.addr_be,
        port_be: chosen.port_be,
        nat_port_be: 0,
    };
    let snat = F::snat(node);
    let mut claimed = false;
    let mut i = 0;
    while i < SNAT_PROBES {
        t.nat_port_be = (snat_port(node, k, i) as u16).to_be();
        if F::reverse()
            .insert(&reverse_key(&t, snat, k.proto), rval, BPF_NOEXIST as u64)
            .is_ok()
        {
            claimed = true;
            break;
        }
        i += 1;
    }
    if !claimed {
        return (xdp_action::XDP_DROP, Reason::SnatExhausted);
    }
    let flow = Flow {
        backend_id: chosen.id,
        service_id: svc.id,
        nat_port_be: t.nat_port_be,
        fins: 0,
        data: 0,
        svc_flags: svc.flags,
        fin_ack: 0,
        seen: (now >> SEEN_SHIFT) as u32,
        created_ns: created,
    };
    if F::flows().insert(k, &flow, 0).is_err() {
        forget::<F>(k, &flow, node);
        return (xdp_action::XDP_DROP, Reason::FlowTableFull);
    }
    let out = send(pkt, &t, true, now);
    if !sent(out) {
        // Not sent (no route, no neighbour, ...): keep no state for it.
        forget::<F>(k, &flow, node);
    }
    out
}

/// A new established flow's `REVERSE` value, built in scratch space
/// (`scratch.rs`): 112 bytes for IPv6.
#[inline(always)]
pub fn established<A: Addr>(
    k: &FlowKey<A>,
    backend_id: u32,
    service_id: u32,
    now_c: u64,
    created_ns: u64,
) -> Option<&'static Reverse<A>> {
    let r = scratch::take::<Reverse<A>>(scratch::REVERSE)?;
    r.client_be = k.src_be;
    r.vip_be = k.dst_be;
    r.cport_be = k.sport_be;
    r.vport_be = k.dport_be;
    r.backend_id = backend_id;
    r.service_id = service_id;
    r.state = FLOW_ESTABLISHED;
    r.seen = (now_c >> SEEN_SHIFT) as u32;
    r.created_ns = created_ns;
    Some(r)
}

/// The `i`-th SNAT port to try for `k`: the client's port shifted by a
/// per-client offset, so one client's ports map one to one onto SNAT ports
/// and a backend sees each client port's connections on one SNAT port, in
/// order. Linux gives every 4-tuple its own TCP timestamp offset: a port
/// derived from the whole tuple's hash would hand a port still in the
/// backend's TIME_WAIT to another client tuple, whose SYN then fails PAWS
/// and stalls. On a collision, the next ports are tried.
#[inline(always)]
pub fn snat_port<A: Addr>(node: &Node, k: &FlowKey<A>, i: u32) -> u32 {
    let range = (node.port_max as u32).saturating_sub(node.port_min as u32) + 1;
    let cport = u16::from_be(k.sport_be) as u32;
    let start = cport.wrapping_add(hash::mix32(k.src_be.word() ^ node.seed)) % range;
    node.port_min as u32 + (start + i) % range
}

/// Counts, rewrites toward the backend, and sends. `new`: the packet opens
/// a flow, which is then counted too (with the same counter lookups). The
/// next hop is resolved first: a packet too long for it is answered with a
/// frag-needed quoting it as the client sent it (toobig.rs).
#[inline(always)]
pub fn send<F: Family>(
    pkt: &Packet<'_, F>,
    t: &Target<F::A>,
    new: bool,
    now: u64,
) -> (u32, Reason) {
    let Packet { ctx, node, ip, l4 } = *pkt;
    let route = Route {
        proto: ip.proto,
        src_be: F::snat(node),
        dst_be: t.addr_be,
        tot_len: ip.tot_len,
        tx: Reason::ForwardTx,
        redirect: Reason::ForwardRedirect,
        now,
    };
    let out = match F::nexthops().get_ptr_mut(t.backend_id) {
        Some(nh) => {
            let nh = unsafe { &mut *nh };
            let hop = match egress::resolve::<F>(ctx, nh, &route) {
                Ok(()) => {
                    // Just looked up: share it with the other CPUs.
                    if nh.at_ns == now {
                        remember::<F>(t.backend_id, nh);
                    }
                    Ok(&*nh)
                }
                // The neighbour just vanished (a link lost carrier): go on
                // with the last one found, as the kernel does with a STALE
                // neighbour, so the packet is sent (and a SYN is evidence
                // of the backend's health) instead of dropped. The per-CPU
                // entry stays empty: the next packet asks the FIB again.
                Err((Reason::NoNeighbour, _)) => {
                    last_hop::<F>(t.backend_id, &route.dst_be, now).ok_or((Reason::NoNeighbour, 0))
                }
                Err(e) => Err(e),
            };
            match hop {
                Ok(nh) => rewrite_out(ctx, ip, l4, t, nh, &route),
                Err((Reason::MtuExceeded, mtu)) => F::too_big(ctx, ip, mtu, now),
                Err((r, _)) => (xdp_action::XDP_DROP, r),
            }
        }
        None => (xdp_action::XDP_DROP, Reason::NoBackend),
    };
    let bytes = ip.tot_len as u64;
    let sent = sent(out);
    let opened = (new && sent) as u64;
    if let Some(s) = stats::service(t.service_id) {
        s.fwd_packets += 1;
        s.fwd_bytes += bytes;
        s.new_flows += opened;
    }
    if let Some(s) = stats::backend(t.backend_id) {
        s.traffic.fwd_packets += 1;
        s.traffic.fwd_bytes += bytes;
        s.traffic.new_flows += opened;
        // Count only SYNs that left: one dropped here (no neighbour yet,
        // no route) must not look like a SYN the backend left unanswered.
        if l4.tcp && tcp::opening(l4.flags) && sent {
            if l4.evidence {
                s.syns += 1;
            } else {
                s.syns_ignored += 1;
            }
        }
    }
    out
}

/// Keeps a next hop toward backend `id` just resolved as its last known
/// one (`LAST_HOPS`), for every CPU. Not inlined: it runs once per
/// refresh, and its copy stays out of the per-packet paths' frames.
/// Several CPUs may write one entry at once and a reader may see a mix of
/// their fields; every writer holds a FIB result for the same backend
/// from the same moment, and `last_hop` checks the address, so a mix is
/// at worst a next hop as stale as the one it replaces, used for at most
/// `LAST_HOP_TTL_NS` and only when the FIB has none.
#[inline(never)]
fn remember<F: Family>(id: u32, nh: &NextHop<F::A>) {
    if let Some(last) = F::last_hops().get_ptr_mut(id) {
        unsafe { *last = *nh };
    }
}

/// Backend `id`'s last known next hop, if it was resolved for `dst_be`
/// within `LAST_HOP_TTL_NS`. The FIB checks the MTU before the
/// neighbour, so a packet it found no neighbour for fits the route's MTU.
/// Not inlined, for the same reason as `remember`.
#[inline(never)]
fn last_hop<F: Family>(id: u32, dst_be: &F::A, now: u64) -> Option<&'static NextHop<F::A>> {
    let last = F::last_hops().get(id)?;
    // Another CPU's clock reading may be a tick ahead of ours: saturate.
    let fresh = now.saturating_sub(last.at_ns) <= LAST_HOP_TTL_NS;
    (last.ifindex != 0 && last.dst_be == *dst_be && fresh).then_some(last)
}

/// The packet went on toward its backend (not dropped, not answered).
#[inline(always)]
pub fn sent(out: (u32, Reason)) -> bool {
    matches!(out.1, Reason::ForwardTx | Reason::ForwardRedirect)
}

/// Rewrites the packet toward `t` (clamping a SYN's MSS to the path) and
/// sends it to the resolved next hop.
#[inline(always)]
fn rewrite_out<F: Family>(
    ctx: &XdpContext,
    ip: &Ip<F>,
    l4: &L4,
    t: &Target<F::A>,
    nh: &NextHop<F::A>,
    route: &Route<F::A>,
) -> (u32, Reason) {
    if l4.tcp && l4.flags & l4::TCP_SYN != 0 {
        l4::clamp_mss(ctx, l4, t.backend_id);
    }
    let to = Nat {
        src: &route.src_be,
        dst: &t.addr_be,
        sport_be: t.nat_port_be,
        dport_be: t.port_be,
    };
    if let Err(r) = l4::nat(ctx, ip, l4, &to) {
        return (xdp_action::XDP_DROP, r);
    }
    egress::out(ctx, nh, route)
}

/// Sends an RST to the client and counts it if one was sent.
#[inline(always)]
pub fn reset<F: Family>(
    ctx: &XdpContext,
    ip: &Ip<F>,
    l4: &L4,
    service_id: u32,
    backend_id: Option<u32>,
) -> (u32, Reason) {
    let out = reset::send(ctx, ip, l4);
    if out.1 != Reason::ResetSent {
        return out;
    }
    if let Some(s) = stats::service(service_id) {
        s.resets += 1;
    }
    if let Some(id) = backend_id
        && let Some(s) = stats::backend(id)
    {
        s.traffic.resets += 1;
    }
    out
}

#[inline(always)]
pub fn reverse_key<A: Addr>(t: &Target<A>, snat: A, proto: u8) -> ReverseKey<A> {
    ReverseKey::new(t.addr_be, snat, t.port_be, t.nat_port_be, proto)
}

/// Remove a flow's forward and reverse entries. A BPF subprogram, not
/// inlined: it runs once per flow, from four places, and each inlined copy
/// would hold its keys in the caller's frame (the IPv6 program's frame
/// must stay under the 512-byte stack with its callees').
#[inline(never)]
fn forget<F: Family>(k: &FlowKey<F::A>, flow: &Flow, node: &Node) {
    if let Some(be) = BACKENDS.get(flow.backend_id)
        && let Some(t) = Target::pinned::<F>(flow, be)
    {
        let _ = F::reverse().remove(&reverse_key(&t, F::snat(node), k.proto));
    }
    let _ = F::flows().remove(k);
}
