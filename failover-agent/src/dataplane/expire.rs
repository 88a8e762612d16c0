//! Idle timeouts of established flows. The program stamps each entry with
//! the coarse monotonic clock at its side's last packet (`Flow::seen`,
//! `Reverse::seen`, in units of `1 << SEEN_SHIFT` ns: one store into a line
//! the packet already reads, where `bpf_ktime_get_ns` would add a costlier
//! helper to every packet). The agent reads the same clock
//! (`CLOCK_MONOTONIC_COARSE`), sweeps both tables in batches and removes
//! the flows idle in both directions for longer than their service's
//! timeout, so a stream only the backend still sends on stays. Half-open
//! flows expire in the program itself (`Pending::expires_ns`).

use std::collections::HashMap;
use std::time::Duration;

use failover_common::{Addr, Flow, FlowKey, Reverse, ReverseKey, SEEN_SHIFT};

/// A flow to remove: both of its entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expired<A = u32> {
    pub flow: FlowKey<A>,
    pub reverse: Option<ReverseKey<A>>,
}

/// The flows idle longer than `timeout(service_id, proto)` at stamp `now`
/// ([`now_stamp`]). A flow's last activity is the later of its two stamps
/// (compared modulo 2^32). Either family: `A` is the address.
pub fn expired<A: Addr>(
    flows: &[(FlowKey<A>, Flow)],
    reverse: &[(ReverseKey<A>, Reverse<A>)],
    now: u32,
    snat_be: A,
    backend_of: impl Fn(u32) -> Option<(A, u16)>,
    timeout: impl Fn(u32, u8) -> Option<Duration>,
) -> Vec<Expired<A>> {
    let rev: HashMap<ReverseKey<A>, u32> = reverse.iter().map(|(k, v)| (*k, v.seen)).collect();
    let mut out = Vec::new();
    for (k, f) in flows {
        let Some(limit) = timeout(f.service_id, k.proto) else {
            continue;
        };
        let limit = u64::try_from(limit.as_nanos()).unwrap_or(u64::MAX) >> SEEN_SHIFT;
        let rkey = backend_of(f.backend_id).map(|(addr_be, port_be)| ReverseKey {
            backend_be: addr_be,
            snat_be,
            bport_be: port_be,
            nat_port_be: f.nat_port_be,
            proto: k.proto,
            _pad: [0; 3],
        });
        let idle_fwd = now.wrapping_sub(f.seen);
        let idle = match rkey.and_then(|r| rev.get(&r)) {
            Some(&seen) => idle_fwd.min(now.wrapping_sub(seen)),
            None => idle_fwd,
        };
        if u64::from(idle) > limit {
            out.push(Expired {
                flow: *k,
                reverse: rkey,
            });
        }
    }
    out
}

/// The stamp of now, on the clock the program stamps with.
pub fn now_stamp() -> u32 {
    let ns = super::clock_ns(libc::CLOCK_MONOTONIC_COARSE);
    #[expect(clippy::cast_possible_truncation, reason = "stamps wrap at 32 bits")]
    let stamp = (ns >> SEEN_SHIFT) as u32;
    stamp
}

#[cfg(test)]
mod tests {
    use super::*;

    const SNAT: u32 = 0x0164_33c6;

    fn flow(port: u16, backend_id: u32, service_id: u32, seen: u32) -> (FlowKey, Flow) {
        (
            FlowKey {
                src_be: 0x6402_00c0,
                dst_be: 0x0a71_00cb,
                sport_be: port.to_be(),
                dport_be: 80u16.to_be(),
                proto: 6,
                _pad: [0; 3],
            },
            Flow {
                backend_id,
                service_id,
                nat_port_be: (port + 1).to_be(),
                seen,
                ..Flow::default()
            },
        )
    }

    fn rev(port: u16, seen: u32) -> (ReverseKey, Reverse) {
        (
            ReverseKey {
                backend_be: 0x0b64_33c6,
                snat_be: SNAT,
                bport_be: 8000u16.to_be(),
                nat_port_be: (port + 1).to_be(),
                proto: 6,
                _pad: [0; 3],
            },
            Reverse {
                seen,
                ..Reverse::default()
            },
        )
    }

    #[test]
    fn a_flow_idle_both_ways_expires_and_a_one_sided_stream_stays() {
        // One stamp is 2^20 ns, about 1.05 ms.
        let now = 100_000;
        let flows = [
            flow(1, 1, 0, now - 50_000), // idle 50 s both ways
            flow(2, 1, 0, now - 50_000), // client silent, backend streaming
            flow(3, 1, 0, now - 1_000),  // active
            flow(4, 1, 1, now - 50_000), // another service, longer timeout
            flow(5, 9, 0, now - 50_000), // backend gone: judged on its own stamp
        ];
        let reverse = [rev(1, now - 50_000), rev(2, now - 10), rev(3, now - 60_000)];
        let got = expired(
            &flows,
            &reverse,
            now,
            SNAT,
            |id| (id == 1).then_some((0x0b64_33c6, 8000u16.to_be())),
            |svc, _| Some(Duration::from_secs(if svc == 0 { 30 } else { 3600 })),
        );
        let ports: Vec<u16> = got.iter().map(|e| u16::from_be(e.flow.sport_be)).collect();
        assert_eq!(ports, [1, 5]);
        assert_eq!(got[0].reverse.unwrap(), reverse[0].0);
        assert_eq!(got[1].reverse, None);
    }

    #[test]
    fn stamps_compare_across_the_32_bit_wrap() {
        let now = 5u32;
        let flows = [
            flow(1, 1, 0, u32::MAX - 10),
            flow(2, 1, 0, u32::MAX - 40_000),
        ];
        let got = expired(
            &flows,
            &[],
            now,
            SNAT,
            |_| None,
            |_, _| Some(Duration::from_secs(30)),
        );
        assert_eq!(got.len(), 1);
        assert_eq!(u16::from_be(got[0].flow.sport_be), 2);
    }

    #[test]
    fn the_stamp_is_the_coarse_monotonic_clock() {
        let a = now_stamp();
        let b = now_stamp();
        assert!(b.wrapping_sub(a) < 1_000, "{a} {b}");
    }
}
