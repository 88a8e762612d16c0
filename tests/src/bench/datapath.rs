//! Per-packet cost of the XDP program with BPF_PROG_TEST_RUN.
//!
//! One packet per call (repeat = 1): with repeat > 1 the kernel feeds the
//! rewritten frame back in and iteration 2 measures the wrong path. The
//! kernel's own per-run duration is averaged over many calls; the empty
//! program, timed the same way in the same run, is subtracted. Cases are
//! interleaved in rounds so machine noise hits them alike. Every call's
//! return code is checked.

use std::net::Ipv4Addr;

use anyhow::{Result, bail};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use failover_common::{Node, state};
use serde::Serialize;

use crate::{
    lab::{self, BACKEND_MAC, CLIENT, Lab, SNAT, VA0_MAC, VIP, backend_addr},
    packet::{Frame, ports},
};

const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

#[derive(Debug, Serialize)]
pub struct CaseResult {
    pub case: &'static str,
    pub raw_ns: f64,
    pub own_ns: f64,
    pub return_code: u32,
    pub calls: u64,
}

struct Case {
    name: &'static str,
    expect: u32,
    total_ns: u128,
    calls: u64,
}

fn time_one(prog: &Xdp, ifindex: u32, frame: &[u8], out: &mut [u8]) -> Result<(u32, u128)> {
    let ctx = lab::xdp_md(frame.len() as u32, ifindex);
    let r = prog.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(out),
        ctx_in: Some(&ctx),
        ..TestRunOptions::new()
    })?;
    Ok((r.return_value, r.duration.as_nanos()))
}

/// Runs `calls` calls per case (at least 100,000 is the method's floor).
pub fn run(calls: u64) -> Result<Vec<CaseResult>> {
    let mut lab = Lab::new()?;
    for id in 1..=3u32 {
        lab.backend(id, backend_addr(id as u8), 8000, state::UP)?;
    }
    lab.service(0, 80, 6, 0, failover_common::RING_DEFAULT, &[1, 2, 3])?;
    // A wide SNAT range so every new-flow call finds a free port.
    lab.dp.set_node(Node {
        snat_be: u32::from(SNAT).to_be(),
        port_min: 1024,
        port_max: 65_535,
        seed: 7,
        flags: 0,
    })?;

    // An established flow, and its backend's reply.
    let syn = Frame::tcp(CLIENT, 50_000, VIP, 80);
    let (_, out) = lab.run(lab.vc0, &syn.build())?;
    let (nat_port, _) = ports(&out);
    let be = {
        let p = etherparse::SlicedPacket::from_ethernet(&out)?;
        match p.net {
            Some(etherparse::NetSlice::Ipv4(ip)) => ip.header().destination_addr(),
            _ => bail!("forward output is not IPv4"),
        }
    };
    let established = syn.clone().data(&[0u8; 18]).build();
    let mut reply = Frame::tcp(be, 8000, SNAT, nat_port);
    reply.src_mac = BACKEND_MAC;
    reply.dst_mac = VA0_MAC;
    // The backend's SYN-ACK and the client's ACK complete the handshake,
    // so the flow is established (half-open flows live apart).
    let synack = reply.clone().synack(5000).build();
    let complete = |lab: &Lab| -> Result<()> {
        let (rc, _) = lab.run(lab.va0, &synack)?;
        anyhow::ensure!(rc == XDP_REDIRECT, "SYN-ACK: {rc}");
        let ack = syn.clone().segment(1001, Some(5001), false, false, false);
        let (rc, _) = lab.run(lab.vc0, &ack.build())?;
        anyhow::ensure!(rc == XDP_REDIRECT, "ACK: {rc}");
        Ok(())
    };
    complete(&lab)?;
    // `data` makes it an ACK segment with 18 bytes.
    let reply = reply.data(&[0u8; 18]).build();
    let passthrough = Frame::tcp(CLIENT, 50_001, Ipv4Addr::new(203, 0, 113, 200), 80).build();

    let mut cases = [
        Case {
            name: "empty",
            expect: XDP_PASS,
            total_ns: 0,
            calls: 0,
        },
        Case {
            name: "established",
            expect: XDP_REDIRECT,
            total_ns: 0,
            calls: 0,
        },
        Case {
            name: "new_flow",
            expect: XDP_REDIRECT,
            total_ns: 0,
            calls: 0,
        },
        Case {
            name: "reverse",
            expect: XDP_REDIRECT,
            total_ns: 0,
            calls: 0,
        },
        Case {
            name: "passthrough",
            expect: XDP_PASS,
            total_ns: 0,
            calls: 0,
        },
    ];
    let mut out = vec![0u8; 256];
    let rounds = 20u64;
    let per_round = calls.div_ceil(rounds);
    let mut flow_no: u32 = 1 << 10;
    let mut syn_frame = Frame::tcp(CLIENT, 0, VIP, 80);
    for _ in 0..rounds {
        // Start each round from the one established flow, so the SNAT
        // space stays as loaded as in steady state, not ever fuller.
        lab.dp.clear_flows()?;
        let (_, again) = lab.run(lab.vc0, &syn.build())?;
        anyhow::ensure!(
            ports(&again).0 == nat_port,
            "the established flow got its port back"
        );
        complete(&lab)?;
        let nat = lab.dp.program();
        let empty = lab.dp.pass_program();
        for case in &mut cases {
            for _ in 0..per_round {
                let (rc, ns) = match case.name {
                    "empty" => time_one(empty, lab.vc0, &established, &mut out)?,
                    "established" => time_one(nat, lab.vc0, &established, &mut out)?,
                    "reverse" => time_one(nat, lab.va0, &reply, &mut out)?,
                    "passthrough" => time_one(nat, lab.vc0, &passthrough, &mut out)?,
                    _ => {
                        // A distinct client tuple for every call.
                        flow_no += 1;
                        syn_frame.src = Ipv4Addr::new(192, 0, 2, 100 + (flow_no >> 16) as u8);
                        syn_frame.sport = (flow_no & 0xffff) as u16;
                        time_one(nat, lab.vc0, &syn_frame.build(), &mut out)?
                    }
                };
                if rc != case.expect {
                    let counts: Vec<String> = lab
                        .dp
                        .reason_counts()?
                        .iter()
                        .filter(|c| c.count > 0)
                        .map(|c| format!("{}={}", c.reason.as_str(), c.count))
                        .collect();
                    bail!(
                        "case {} call {}: return code {rc}, expected {} (counters: {})",
                        case.name,
                        case.calls,
                        case.expect,
                        counts.join(" ")
                    );
                }
                case.total_ns += ns;
                case.calls += 1;
            }
        }
    }
    let raw = |c: &Case| c.total_ns as f64 / c.calls.max(1) as f64;
    let empty_ns = raw(&cases[0]);
    Ok(cases
        .iter()
        .map(|c| CaseResult {
            case: c.name,
            raw_ns: raw(c),
            own_ns: raw(c) - empty_ns,
            return_code: c.expect,
            calls: c.calls,
        })
        .collect())
}
