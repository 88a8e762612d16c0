//! Why the XDP program returned what it did. Each reason has a counter
//! (`STATS[reason]`) and a name that becomes a metric label, so the list
//! here is the documented verdict table (docs/datapath.md).

macro_rules! reasons {
    ($($variant:ident = $n:literal, $name:literal, $verdict:literal;)*) => {
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

            /// The XDP verdict this reason leads to, as documented.
            #[must_use]
            pub const fn verdict(self) -> &'static str {
                match self { $(Reason::$variant => $verdict,)* }
            }
        }
    };
}

reasons! {
    // Outcomes of handled packets.
    ForwardTx = 0, "forward_tx", "tx";
    ForwardRedirect = 1, "forward_redirect", "redirect";
    ReverseTx = 2, "reverse_tx", "tx";
    ReverseRedirect = 3, "reverse_redirect", "redirect";
    ResetSent = 4, "reset_sent", "tx";
    // The next hop's MAC is not known yet (see egress.rs).
    NoNeighbour = 5, "no_neighbour", "drop";
    // Not ours: the kernel's stack handles it.
    NotIpv4 = 6, "not_ipv4", "pass";
    NotTcpUdp = 7, "not_tcp_udp", "pass";
    NotVip = 8, "not_vip", "pass";
    Fragment = 9, "fragment", "pass";
    IpOptions = 10, "ip_options", "pass";
    TtlExpired = 11, "ttl_expired", "pass";
    // Malformed: never forwarded.
    TruncatedEth = 12, "truncated_eth", "drop";
    MalformedIpv4 = 13, "malformed_ipv4", "drop";
    BadIpv4Checksum = 14, "bad_ipv4_checksum", "drop";
    TruncatedL4 = 15, "truncated_l4", "drop";
    // Ours, but cannot be served.
    NoBackend = 16, "no_backend", "drop";
    FlowTableFull = 17, "flow_table_full", "drop";
    SnatExhausted = 18, "snat_ports_exhausted", "drop";
    NoRoute = 19, "no_route", "drop";
    NotConfigured = 20, "not_configured", "pass";
    RedirectFailed = 21, "redirect_failed", "drop";
    MtuExceeded = 22, "mtu_exceeded", "drop";
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn discriminants_are_dense_and_names_unique() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
            assert!(matches!(r.verdict(), "tx" | "redirect" | "pass" | "drop"));
            for other in &Reason::ALL[i + 1..] {
                assert_ne!(r.as_str(), other.as_str());
            }
        }
    }
}
