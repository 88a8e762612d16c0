//! Backend -> SNAT address: restore VIP:port -> client, and read the TCP
//! handshake for the passive health signals.

use aya_ebpf::{bindings::xdp_action, helpers::bpf_ktime_get_ns, programs::XdpContext};
use failover_common::{
    FLOW_ESTABLISHED, FLOW_SYN_SENT, FlowKey, Node, Reason, Reverse, ReverseKey,
};

use crate::{
    egress::{self, Route},
    ipv4,
    ipv4::Ipv4,
    l4::{self, Closing, L4, TCP_ACK, TCP_RST, TCP_SYN},
    maps::{FLOWS, REVERSE},
    stats,
};

#[inline(always)]
pub fn handle(ctx: &XdpContext, node: &Node, ip: &Ipv4, l4: &L4) -> (u32, Reason) {
    let h = unsafe { &*ip.hdr };
    let src = u32::from_ne_bytes(h.src_addr);
    let rkey = ReverseKey {
        backend_be: src,
        snat_be: node.snat_be,
        bport_be: l4.sport_be,
        nat_port_be: l4.dport_be,
        proto: ip.proto,
        _pad: [0; 3],
    };
    let Some(rev) = REVERSE.get_ptr_mut(&rkey) else {
        // Traffic to the node's own sockets on the SNAT address (the
        // agent's probes, for one) is the kernel's.
        return (xdp_action::XDP_PASS, Reason::NotVip);
    };
    let rev = unsafe { &mut *rev };
    let r = *rev;
    // A SYN-ACK or an RST answers the SYN only if it ACKs it: an off-path
    // forger of the backend's address does not know the client's ISN.
    let handshake = l4.tcp && r.state == FLOW_SYN_SENT;
    let acks_syn = l4.flags & TCP_ACK != 0 && l4.ack == r.syn_ack;

    if let Some(s) = stats::backend(r.backend_id) {
        s.traffic.rev_packets += 1;
        s.traffic.rev_bytes += ip.tot_len as u64;
        if handshake {
            // Anything else from the backend (a challenge ACK to a SYN on
            // a tuple it still holds) proves it alive.
            if l4.flags & TCP_RST != 0 {
                if acks_syn {
                    s.syn_rsts += 1;
                }
            } else if l4.flags & TCP_SYN != 0 {
                if acks_syn {
                    let now = unsafe { bpf_ktime_get_ns() };
                    s.synacks += 1;
                    s.rtt_last_ns = now.saturating_sub(r.created_ns);
                    s.rtt_at_ns = now;
                    rev.state = FLOW_ESTABLISHED;
                }
            } else {
                s.synacks += 1;
            }
        }
    }
    if let Some(s) = stats::service(r.service_id) {
        s.rev_packets += 1;
        s.rev_bytes += ip.tot_len as u64;
    }

    ipv4::rewrite(ip.hdr, r.vip_be, r.client_be);
    if let Err(e) = l4::rewrite(
        ctx,
        l4,
        src,
        node.snat_be,
        r.vip_be,
        r.client_be,
        r.vport_be,
        r.cport_be,
    ) {
        return (xdp_action::XDP_DROP, e);
    }
    let route = Route {
        proto: ip.proto,
        src_be: r.vip_be,
        dst_be: r.client_be,
        tot_len: ip.tot_len,
        tx: Reason::ReverseTx,
        redirect: Reason::ReverseRedirect,
    };
    let out = egress::send(ctx, &mut rev.nh, &route);
    if !l4.tcp || (handshake && l4.flags & TCP_RST != 0 && !acks_syn) {
        // The client ignores an RST that does not ACK its SYN (RFC 9293
        // 3.10.7.3), so the flow's entries must outlive it too.
        return out;
    }
    match l4::closing(l4, r.fins, r.fin_ack, l4::BACKEND) {
        Closing::Free => {
            let _ = FLOWS.remove(&flow_key(&r, ip.proto));
            let _ = REVERSE.remove(&rkey);
        }
        Closing::Note { bits, fin_ack } => {
            let flow = FLOWS
                .get_ptr_mut(&flow_key(&r, ip.proto))
                .map(|f| unsafe { &mut *f });
            l4::note(
                &mut rev.fins,
                flow.map(|f| (&mut f.fins, &mut f.fin_ack)),
                bits,
                fin_ack,
            );
        }
        Closing::Keep => {}
    }
    out
}

/// The client's tuple of the flow `r` belongs to: its `FLOWS` key.
#[inline(always)]
fn flow_key(r: &Reverse, proto: u8) -> FlowKey {
    FlowKey {
        src_be: r.client_be,
        dst_be: r.vip_be,
        sport_be: r.cport_be,
        dport_be: r.vport_be,
        proto,
        _pad: [0; 3],
    }
}
