//! Client -> VIP: find the service, pin the flow to a backend (or follow
//! the existing pin), source-NAT it, and send it on.

use aya_ebpf::{
    bindings::{BPF_NOEXIST, xdp_action},
    helpers::bpf_ktime_get_ns,
    programs::XdpContext,
};
use failover_common::{
    FLOW_SYN_SENT, Flow, FlowKey, Node, Reason, Reverse, ReverseKey, SNAT_PROBES, SVC_F_RESET,
    ServiceKey, hash, state,
};

use crate::{
    egress, ipv4,
    ipv4::Ipv4,
    l4::{self, L4, TCP_RST, TCP_SYN},
    maps::{BACKENDS, FLOWS, REVERSE, SERVICES},
    reset, select, stats,
};

#[inline(always)]
pub fn handle(ctx: &XdpContext, node: &Node, ip: &Ipv4, l4: &L4) -> (u32, Reason) {
    let h = unsafe { &*ip.hdr };
    let src = u32::from_ne_bytes(h.src_addr);
    let dst = u32::from_ne_bytes(h.dst_addr);
    let skey = ServiceKey { vip_be: dst, port_be: l4.dport_be, proto: ip.proto, _pad: 0 };
    let Some(svc) = (unsafe { SERVICES.get(&skey) }) else {
        // A VIP filter false positive, or a port we do not serve.
        return (xdp_action::XDP_PASS, Reason::NotVip);
    };
    let fkey = FlowKey {
        src_be: src,
        dst_be: dst,
        sport_be: l4.sport_be,
        dport_be: l4.dport_be,
        proto: ip.proto,
        _pad: [0; 3],
    };

    // Existing flow: follow its pin unless the backend went down.
    let mut pinned = None;
    if let Some(flow) = FLOWS.get_ptr(&fkey) {
        let flow = unsafe { *flow };
        let usable = match BACKENDS.get(flow.backend_id) {
            Some(be) => be.state == state::UP || be.state == state::DRAINING,
            None => false,
        };
        if usable {
            pinned = Some(flow);
        } else {
            forget(&fkey, &flow, node);
            if l4.tcp && svc.flags & SVC_F_RESET != 0 {
                if let Some(s) = stats::backend(flow.backend_id) {
                    s.resets += 1;
                }
                if let Some(s) = stats::service(svc.id) {
                    s.resets += 1;
                }
                return reset::send(ctx, ip, l4);
            }
            // Reselect below: the client's next segment reaches a live
            // backend, which answers RST for a mid-stream TCP segment.
        }
    }

    let flow = match pinned {
        Some(f) => f,
        None => match new_flow(node, svc.id, svc, &fkey) {
            Ok(f) => f,
            Err(Reason::NoBackend) if l4.tcp && l4.flags & TCP_RST == 0 => {
                // Fail closed, but tell the client now instead of letting
                // it retransmit into silence.
                if let Some(s) = stats::service(svc.id) {
                    s.resets += 1;
                }
                return reset::send(ctx, ip, l4);
            }
            Err(r) => return (xdp_action::XDP_DROP, r),
        },
    };

    let Some(be) = BACKENDS.get(flow.backend_id) else {
        return (xdp_action::XDP_DROP, Reason::NoBackend);
    };
    let (be_addr, be_port) = (be.addr_be, be.port_be);
    let bytes = ip.tot_len as u64;
    if let Some(s) = stats::service(svc.id) {
        s.fwd_packets += 1;
        s.fwd_bytes += bytes;
    }
    if let Some(s) = stats::backend(flow.backend_id) {
        s.fwd_packets += 1;
        s.fwd_bytes += bytes;
        if l4.flags & TCP_SYN != 0 {
            s.syns += 1;
        }
    }

    ipv4::rewrite(ip.hdr, node.snat_be, be_addr);
    if let Err(r) = l4::rewrite(ctx, l4, src, dst, node.snat_be, be_addr, flow.nat_port_be, be_port) {
        return (xdp_action::XDP_DROP, r);
    }
    if l4.flags & TCP_RST != 0 {
        // The client ended the flow: free its entries now, not at LRU age.
        forget(&fkey, &flow, node);
    }
    egress::send(ctx, ip.proto, node.snat_be, be_addr, ip.tot_len, Reason::ForwardTx, Reason::ForwardRedirect)
}

/// Select a backend, claim a SNAT port, and insert both table entries.
#[inline(always)]
fn new_flow(node: &Node, svc_id: u32, svc: &failover_common::Service, k: &FlowKey) -> Result<Flow, Reason> {
    let fh = hash::flow_hash(k.src_be, k.dst_be, k.sport_be, k.dport_be, k.proto, node.seed);
    let chosen = select::select(svc, fh).ok_or(Reason::NoBackend)?;
    let now = unsafe { bpf_ktime_get_ns() };
    let range = (node.port_max as u32).saturating_sub(node.port_min as u32) + 1;
    let rval = Reverse {
        client_be: k.src_be,
        vip_be: k.dst_be,
        cport_be: k.sport_be,
        vport_be: k.dport_be,
        backend_id: chosen.id,
        service_id: svc_id,
        state: FLOW_SYN_SENT,
        created_ns: now,
    };
    let mut rkey = ReverseKey {
        backend_be: chosen.backend.addr_be,
        snat_be: node.snat_be,
        bport_be: chosen.backend.port_be,
        nat_port_be: 0,
        proto: k.proto,
        _pad: [0; 3],
    };
    // Derive the port from the hash; on a collision with another flow to
    // the same backend, try the next ports (a linear probe covers
    // SNAT_PROBES distinct ports whatever the hash).
    let start = hash::mix32(fh ^ 0x5eed) % range;
    let mut claimed = false;
    let mut i = 0;
    while i < SNAT_PROBES {
        let port = node.port_min as u32 + (start + i) % range;
        rkey.nat_port_be = (port as u16).to_be();
        if REVERSE.insert(&rkey, &rval, BPF_NOEXIST as u64).is_ok() {
            claimed = true;
            break;
        }
        i += 1;
    }
    if !claimed {
        return Err(Reason::SnatExhausted);
    }
    let flow = Flow {
        backend_id: chosen.id,
        service_id: svc_id,
        nat_port_be: rkey.nat_port_be,
        _pad: [0; 6],
        created_ns: now,
    };
    if FLOWS.insert(k, &flow, 0).is_err() {
        let _ = REVERSE.remove(&rkey);
        return Err(Reason::FlowTableFull);
    }
    if let Some(s) = stats::service(svc_id) {
        s.new_flows += 1;
    }
    if let Some(s) = stats::backend(chosen.id) {
        s.new_flows += 1;
    }
    Ok(flow)
}

/// Remove a flow's forward and reverse entries.
#[inline(always)]
fn forget(k: &FlowKey, flow: &Flow, node: &Node) {
    if let Some(be) = BACKENDS.get(flow.backend_id) {
        let rkey = ReverseKey {
            backend_be: be.addr_be,
            snat_be: node.snat_be,
            bport_be: be.port_be,
            nat_port_be: flow.nat_port_be,
            proto: k.proto,
            _pad: [0; 3],
        };
        let _ = REVERSE.remove(&rkey);
    }
    let _ = FLOWS.remove(k);
}
