//! Client -> VIP: follow the flow's pin (fast path: one flow lookup), or
//! find the service, pin the flow to a backend and claim a SNAT port; then
//! rewrite and send.

use aya_ebpf::{
    bindings::{BPF_NOEXIST, xdp_action},
    helpers::bpf_ktime_get_ns,
    programs::XdpContext,
};
use failover_common::{
    FLOW_ESTABLISHED, FLOW_SYN_SENT, Flow, FlowKey, NextHop, Node, Reason, Reverse, ReverseKey,
    SNAT_PROBES, SVC_F_RESET, Service, ServiceKey, hash, state,
    tcp::{self, SynWorth},
};

use crate::{
    egress::{self, Route},
    ipv4,
    ipv4::Ipv4,
    l4::{self, Closing, L4},
    maps::{BACKENDS, FLOWS, NEXTHOPS, REVERSE, SERVICES},
    reset, select, stats,
};

#[inline(always)]
pub fn handle(ctx: &XdpContext, node: &Node, ip: &Ipv4, l4: &mut L4) -> (u32, Reason) {
    let h = unsafe { &*ip.hdr };
    let fkey = FlowKey {
        src_be: u32::from_ne_bytes(h.src_addr),
        dst_be: u32::from_ne_bytes(h.dst_addr),
        sport_be: l4.sport_be,
        dport_be: l4.dport_be,
        proto: ip.proto,
        _pad: [0; 3],
    };

    // A bare SYN opens a connection: a retransmitted SYN keeps its pin, a
    // new connection on a reused client port is a new flow.
    let opening = l4.tcp && tcp::opening(l4.flags);
    // Only a SYN every live backend must answer is passive-health
    // evidence; one with a wrong checksum goes nowhere (tcp.rs).
    if opening && l4.payload == 0 {
        match l4::syn_worth(ctx, ip.hdr, l4) {
            SynWorth::Evidence => l4.evidence = true,
            SynWorth::Ignored => {}
            SynWorth::BadChecksum => return (xdp_action::XDP_DROP, Reason::BadL4Checksum),
        }
    }

    // Fast path: a pinned flow whose backend still takes traffic.
    if let Some(flow) = FLOWS.get_ptr_mut(&fkey) {
        let flow = unsafe { &mut *flow };
        match BACKENDS.get(flow.backend_id) {
            Some(be) if be.state == state::UP || be.state == state::DRAINING => {
                let (addr, port) = (be.addr_be, be.port_be);
                if opening && !handshake_pending(flow, addr, port, node, ip.proto, l4) {
                    // The old connection's entries outlived it (its last
                    // ACK was missed). The new one follows the ring as any
                    // new flow: after a failback it goes home, and its
                    // SYN-ACK counts for the passive signals.
                    let f = *flow;
                    forget(&fkey, &f, node);
                } else {
                    let out = send(ctx, node, ip, l4, &fkey, flow, addr, port, false);
                    if l4.tcp {
                        match l4::closing(l4, flow.fins, flow.fin_ack, l4::CLIENT) {
                            Closing::Free => {
                                let f = *flow;
                                forget(&fkey, &f, node);
                            }
                            Closing::Note { bits, fin_ack } => {
                                let rkey = reverse_key(flow, addr, port, node, ip.proto);
                                let rev = REVERSE.get_ptr_mut(&rkey).map(|r| unsafe { &mut *r });
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
                forget(&fkey, &f, node);
                if l4.tcp && f.svc_flags & SVC_F_RESET != 0 && !opening {
                    return reset(ctx, ip, l4, f.service_id, Some(f.backend_id));
                }
                // Otherwise re-select below: a SYN gets a live backend; for
                // a mid-stream TCP segment the new backend answers with an
                // RST and the client reconnects.
            }
        }
    }

    let skey = ServiceKey {
        vip_be: fkey.dst_be,
        port_be: l4.dport_be,
        proto: ip.proto,
        _pad: 0,
    };
    let Some(svc) = (unsafe { SERVICES.get(&skey) }) else {
        // A VIP filter false positive, or a port we do not serve.
        return (xdp_action::XDP_PASS, Reason::NotVip);
    };
    if l4.tcp && !tcp::may_create(l4.flags) {
        // An RST or a SYN-ACK with no flow: nothing to forward it to, and
        // it must not leave entries behind.
        return (xdp_action::XDP_DROP, Reason::NotOpening);
    }
    let flow = match new_flow(node, svc, &fkey, l4, opening) {
        Ok(f) => f,
        Err(Reason::NoBackend) if l4.tcp => {
            // Fail closed, but tell the client now instead of letting it
            // retransmit into silence.
            return reset(ctx, ip, l4, svc.id, None);
        }
        Err(r) => return (xdp_action::XDP_DROP, r),
    };
    let Some(be) = BACKENDS.get(flow.backend_id) else {
        return (xdp_action::XDP_DROP, Reason::NoBackend);
    };
    let (addr, port) = (be.addr_be, be.port_be);
    if FLOWS.insert(&fkey, &flow, 0).is_err() {
        forget(&fkey, &flow, node);
        return (xdp_action::XDP_DROP, Reason::FlowTableFull);
    }
    let out = send(ctx, node, ip, l4, &fkey, &flow, addr, port, true);
    if out.0 == xdp_action::XDP_DROP {
        // Not sent (no route, no neighbour, ...): keep no state for it.
        forget(&fkey, &flow, node);
    }
    out
}

/// Counts, rewrites toward the backend, and sends. `new`: the packet opens
/// `flow`, which is then counted too (with the same counter lookups).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn send(
    ctx: &XdpContext,
    node: &Node,
    ip: &Ipv4,
    l4: &L4,
    k: &FlowKey,
    flow: &Flow,
    be_addr: u32,
    be_port: u16,
    new: bool,
) -> (u32, Reason) {
    ipv4::rewrite(ip.hdr, node.snat_be, be_addr);
    if let Err(r) = l4::rewrite(
        ctx,
        l4,
        k.src_be,
        k.dst_be,
        node.snat_be,
        be_addr,
        flow.nat_port_be,
        be_port,
    ) {
        return (xdp_action::XDP_DROP, r);
    }
    let route = Route {
        proto: ip.proto,
        src_be: node.snat_be,
        dst_be: be_addr,
        tot_len: ip.tot_len,
        tx: Reason::ForwardTx,
        redirect: Reason::ForwardRedirect,
    };
    let out = match NEXTHOPS.get_ptr_mut(flow.backend_id) {
        Some(nh) => egress::send(ctx, unsafe { &mut *nh }, &route),
        None => (xdp_action::XDP_DROP, Reason::NoBackend),
    };
    let bytes = ip.tot_len as u64;
    let opened = (new && out.0 != xdp_action::XDP_DROP) as u64;
    if let Some(s) = stats::service(flow.service_id) {
        s.fwd_packets += 1;
        s.fwd_bytes += bytes;
        s.new_flows += opened;
    }
    if let Some(s) = stats::backend(flow.backend_id) {
        s.traffic.fwd_packets += 1;
        s.traffic.fwd_bytes += bytes;
        s.traffic.new_flows += opened;
        // Count only SYNs that left: one dropped here (no neighbour yet,
        // no route) must not look like a SYN the backend left unanswered.
        if l4.tcp && tcp::opening(l4.flags) && out.0 != xdp_action::XDP_DROP {
            if l4.evidence {
                s.syns += 1;
            } else {
                s.syns_ignored += 1;
            }
        }
    }
    out
}

/// Sends an RST to the client and counts it if one was sent.
#[inline(always)]
fn reset(
    ctx: &XdpContext,
    ip: &Ipv4,
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

/// Select a backend and claim a SNAT port (the reverse entry). The flow
/// entry itself is inserted by the caller once the packet is on its way.
/// `opening`: the packet is a bare SYN. A flow picked up mid-stream (its
/// entries were lost or freed early) has no handshake to watch: the
/// backend's RST to such a segment is no refused SYN, and must not count
/// toward a passive ejection.
#[inline(always)]
fn new_flow(
    node: &Node,
    svc: &Service,
    k: &FlowKey,
    l4: &L4,
    opening: bool,
) -> Result<Flow, Reason> {
    let fh = hash::flow_hash(
        k.src_be, k.dst_be, k.sport_be, k.dport_be, k.proto, node.seed,
    );
    let chosen = select::select(svc, fh).ok_or(Reason::NoBackend)?;
    let now = unsafe { bpf_ktime_get_ns() };
    let range = (node.port_max as u32).saturating_sub(node.port_min as u32) + 1;
    let rval = Reverse {
        client_be: k.src_be,
        vip_be: k.dst_be,
        cport_be: k.sport_be,
        vport_be: k.dport_be,
        backend_id: chosen.id,
        service_id: svc.id,
        state: if opening {
            FLOW_SYN_SENT
        } else {
            FLOW_ESTABLISHED
        },
        fins: 0,
        _pad: [0; 2],
        fin_ack: 0,
        syn_ack: l4.seq.wrapping_add(1),
        created_ns: now,
        nh: NextHop::default(),
    };
    let mut rkey = ReverseKey {
        backend_be: chosen.backend.addr_be,
        snat_be: node.snat_be,
        bport_be: chosen.backend.port_be,
        nat_port_be: 0,
        proto: k.proto,
        _pad: [0; 3],
    };
    // The client's port shifted by a per-client offset, so one client's
    // ports map one to one onto SNAT ports and a backend sees each client
    // port's connections on one SNAT port, in order. Linux gives every
    // 4-tuple its own TCP timestamp offset: a port derived from the whole
    // tuple's hash would hand a port still in the backend's TIME_WAIT to
    // another client tuple, whose SYN then fails PAWS and stalls. On a
    // collision with a live flow to the same backend, try the next ports.
    let cport = u16::from_be(k.sport_be) as u32;
    let start = cport.wrapping_add(hash::mix32(k.src_be ^ node.seed)) % range;
    let mut i = 0;
    while i < SNAT_PROBES {
        let port = node.port_min as u32 + (start + i) % range;
        rkey.nat_port_be = (port as u16).to_be();
        if REVERSE.insert(&rkey, &rval, BPF_NOEXIST as u64).is_ok() {
            return Ok(Flow {
                backend_id: chosen.id,
                service_id: svc.id,
                nat_port_be: rkey.nat_port_be,
                fins: 0,
                _pad: 0,
                svc_flags: svc.flags,
                fin_ack: 0,
                _pad2: 0,
                created_ns: now,
            });
        }
        i += 1;
    }
    Err(Reason::SnatExhausted)
}

#[inline(always)]
fn reverse_key(flow: &Flow, be_addr: u32, be_port: u16, node: &Node, proto: u8) -> ReverseKey {
    ReverseKey {
        backend_be: be_addr,
        snat_be: node.snat_be,
        bport_be: be_port,
        nat_port_be: flow.nat_port_be,
        proto,
        _pad: [0; 3],
    }
}

/// True while the flow's handshake is unanswered: a bare SYN on it is
/// then the client's retransmission, which must reach the same backend.
/// The backend answers the latest SYN, so its ISN is the one to match.
#[inline(always)]
fn handshake_pending(
    flow: &Flow,
    be_addr: u32,
    be_port: u16,
    node: &Node,
    proto: u8,
    syn: &L4,
) -> bool {
    let rkey = reverse_key(flow, be_addr, be_port, node, proto);
    match REVERSE.get_ptr_mut(&rkey) {
        Some(r) if unsafe { (*r).state } == FLOW_SYN_SENT => {
            unsafe { (*r).syn_ack = syn.seq.wrapping_add(1) };
            true
        }
        _ => false,
    }
}

/// Remove a flow's forward and reverse entries.
#[inline(always)]
fn forget(k: &FlowKey, flow: &Flow, node: &Node) {
    if let Some(be) = BACKENDS.get(flow.backend_id) {
        let _ = REVERSE.remove(&reverse_key(flow, be.addr_be, be.port_be, node, k.proto));
    }
    let _ = FLOWS.remove(k);
}
