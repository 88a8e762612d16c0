//! Why the XDP program returned what it did. Each reason has a counter
//! (`STATS[reason]`) and a name that becomes a metric label, so the list
//! here is the documented verdict table (docs/datapath.md).

macro_rules! reasons {
    ($($variant:ident = $n:literal, $name:literal, $verdict:ident;)*) => {
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Reason { $($variant = $n,)* }

        impl Reason {
            pub const ALL: &'static [Reason] = &[$(Reason::$variant,)*];
            pub const COUNT: u32 = Self::ALL.len() as u32;

            /// Metric label for this reason.
            #[must_use]
            pub const fn as_str(self) -> &'static str {
                match self { $(Reason::$variant => $name,)* }
            }

            /// The XDP verdict this reason leads to, as documented. The
            /// program takes its action from here, so a new reason cannot
            /// silently default to one.
            #[must_use]
            pub const fn verdict(self) -> Verdict {
                match self { $(Reason::$variant => Verdict::$verdict,)* }
            }
        }
    };
}

/// What the program does with a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Drop,
    Pass,
    Tx,
    Redirect,
}

impl Verdict {
    /// The `xdp_action` value.
    #[must_use]
    pub const fn action(self) -> u32 {
        match self {
            Verdict::Drop => 1,
            Verdict::Pass => 2,
            Verdict::Tx => 3,
            Verdict::Redirect => 4,
        }
    }

    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Verdict::Drop => "drop",
            Verdict::Pass => "pass",
            Verdict::Tx => "tx",
            Verdict::Redirect => "redirect",
        }
    }

    /// The packet leaves toward another host (rewritten or answered).
    #[must_use]
    pub const fn sends(self) -> bool {
        matches!(self, Verdict::Tx | Verdict::Redirect)
    }
}

reasons! {
    // Outcomes of handled packets.
    ForwardTx = 0, "forward_tx", Tx;
    ForwardRedirect = 1, "forward_redirect", Redirect;
    ReverseTx = 2, "reverse_tx", Tx;
    ReverseRedirect = 3, "reverse_redirect", Redirect;
    ResetSent = 4, "reset_sent", Tx;
    // The next hop's MAC is not known yet (see egress.rs).
    NoNeighbour = 5, "no_neighbour", Drop;
    // Not ours: the kernel's stack handles it.
    NotIpv4 = 6, "not_ipv4", Pass;
    NotTcpUdp = 7, "not_tcp_udp", Pass;
    NotVip = 8, "not_vip", Pass;
    Fragment = 9, "fragment", Pass;
    IpOptions = 10, "ip_options", Pass;
    TtlExpired = 11, "ttl_expired", Pass;
    // Malformed: never forwarded.
    TruncatedEth = 12, "truncated_eth", Drop;
    MalformedIpv4 = 13, "malformed_ipv4", Drop;
    BadIpv4Checksum = 14, "bad_ipv4_checksum", Drop;
    // The L4 header, or a length it carries (TCP data offset, UDP
    // length), does not fit the IP packet (its total length, not the frame).
    TruncatedL4 = 15, "truncated_l4", Drop;
    // Ours, but cannot be served.
    NoBackend = 16, "no_backend", Drop;
    FlowTableFull = 17, "flow_table_full", Drop;
    SnatExhausted = 18, "snat_ports_exhausted", Drop;
    NoRoute = 19, "no_route", Drop;
    NotConfigured = 20, "not_configured", Pass;
    RedirectFailed = 21, "redirect_failed", Drop;
    // Longer than the egress MTU and not DF (XDP cannot fragment; the
    // sender's PMTU discovery is off).
    MtuExceeded = 22, "mtu_exceeded", Drop;
    // TCP flags no connection can carry (SYN+FIN, SYN+RST, none of SYN,
    // ACK, RST): no backend answers them, so they are never forwarded.
    BadTcpFlags = 23, "bad_tcp_flags", Drop;
    // A bare SYN whose TCP checksum is wrong: the backend would ignore it,
    // and an unanswered SYN is passive-health evidence.
    BadL4Checksum = 24, "bad_l4_checksum", Drop;
    // No flow, and the segment cannot open one (an RST, a SYN-ACK).
    NotOpening = 25, "not_opening", Drop;
    // An ICMP error (destination unreachable, time exceeded) about a NATed
    // flow, translated to the flow's other side (icmp.rs).
    IcmpTx = 26, "icmp_tx", Tx;
    IcmpRedirect = 27, "icmp_redirect", Redirect;
    // A well-formed ICMP error about no flow of ours: the node's own
    // sockets (the agent's probes) may be its subject.
    IcmpNoFlow = 28, "icmp_no_flow", Pass;
    // An ICMP error to a VIP or the SNAT address that is truncated (less
    // than an IPv4 header and 8 bytes of L4 quoted), too long, has a bad
    // checksum or quotes a malformed header, or a frag-needed whose MTU
    // no real path has: never translated.
    IcmpMalformed = 29, "icmp_malformed", Drop;
    // A DF packet longer than the egress MTU: answered with an ICMP
    // frag-needed carrying that MTU (toobig.rs).
    FragNeededSent = 30, "frag_needed_sent", Tx;
    // The same, beyond the per-source rate of frag-needed answers.
    FragNeededLimited = 31, "frag_needed_limited", Drop;
    // A tail call into another of the object's programs failed: the agent
    // has not set `JUMPS` (never for a loaded data plane).
    JumpFailed = 32, "jump_failed", Drop;
    // IPv6 (ipv6.rs). Not NotIpv4: an IPv6 frame is that only where the
    // IPv6 program is not loaded. Fragment, TtlExpired (hop limit 0 or 1)
    // and NotTcpUdp (an upper layer other than TCP, UDP and ICMPv6, an
    // unknown next header included) are shared with IPv4.
    // Version not 6, or a payload length that overruns the frame.
    MalformedIpv6 = 33, "malformed_ipv6", Drop;
    // Extension headers the program does not walk: the kernel's.
    Ipv6HopByHop = 34, "ipv6_hop_by_hop", Pass;
    Ipv6Routing = 35, "ipv6_routing", Pass;
    Ipv6DestOptions = 36, "ipv6_dest_options", Pass;
    // ICMPv6 to a VIP or the SNAT address (neighbour discovery, echo,
    // errors): the kernel's; errors are not translated through the NAT.
    Icmpv6 = 37, "icmpv6", Pass;
    // UDP over IPv6 without a checksum, which RFC 8200 makes invalid.
    UdpZeroChecksum = 38, "udp_zero_checksum", Drop;
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn discriminants_are_dense_and_names_unique() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
            assert!(r.verdict().action() >= 1 && r.verdict().action() <= 4);
            assert!((*r as u32) < crate::STATS_SLOTS, "{r:?} has a counter slot");
            for other in &Reason::ALL[i + 1..] {
                assert_ne!(r.as_str(), other.as_str());
            }
        }
    }
}
