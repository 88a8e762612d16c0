//! A one-namespace lab for driving the real XDP program with
//! BPF_PROG_TEST_RUN: a client leg (vc0) and a backend leg (va0) with
//! static neighbours, so FIB lookups resolve without any traffic.
//!
//! ```text
//!  client 192.0.2.100 ... vc0 192.0.2.1 [edge] va0 198.51.100.1 ... backends 198.51.100.11-13
//!  (same-leg backend 192.0.2.50 behind vc0; 198.51.100.99 has no neighbour)
//!
//!  client 2001:db8:c::100 ... vc0 2001:db8:c::1 [edge] va0 2001:db8:b::1 ... backends 2001:db8:b::11-13
//!  (IPv6 VIP 2001:db8:f::10; IPv6 is served once `enable_v6` set the node's SNAT address)
//! ```

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, Result};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use failover_agent::agent::ids::addr6;
use failover_agent::dataplane::Dataplane;
use failover_common::{
    Addr6, Backend, NO_BACKEND, Node, Node6, RING_MAX, Reason, Ring, Service, ServiceKey, state,
};

use crate::netns::{Entered, Netns};

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const VC0_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const VA0_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 0x01];
pub const BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 0x02];
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
pub const SAME_LEG_BACKEND: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 50);
pub const SNAT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub const VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
pub const NO_NEIGH_BACKEND: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 99);
pub const PORT_MIN: u16 = 40_000;
pub const PORT_MAX: u16 = 40_999;
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 0x100);
pub const SNAT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xb, 0, 0, 0, 0, 1);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xf, 0, 0, 0, 0, 0x10);
/// The backends' port in labs made by [`Lab::with_tcp_service`].
pub const BPORT: u16 = 8000;

static NEXT: AtomicU32 = AtomicU32::new(0);

pub struct Lab {
    // Field order is drop order: leave the namespace, unload, unpin, then
    // delete the namespace.
    _entered: Entered,
    pub dp: Dataplane,
    pins: PinDir,
    pub ns: Netns,
    pub vc0: u32,
    pub va0: u32,
}

struct PinDir(PathBuf);
impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = Dataplane::remove_pins(&self.0);
    }
}

pub fn backend_addr(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 51, 100, 10 + i)
}

/// IPv6 backend `i` (1..=3 have neighbours): 2001:db8:b::1i.
pub fn backend6_addr(i: u8) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0xb, 0, 0, 0, 0, 0x10 + u16::from(i))
}

impl Lab {
    pub fn new() -> Result<Self> {
        Self::over(None)
    }

    /// A lab whose maps an older build pinned first, with a `JUMPS` map of
    /// `slots` program slots (an upgrade in place).
    pub fn over_older_jumps(slots: u32) -> Result<Self> {
        Self::over(Some(slots))
    }

    fn over(old_jumps: Option<u32>) -> Result<Self> {
        let ns = Netns::new("kt")?;
        ns.exec(&format!(
            "ip link add vc0 address {vc0} type veth peer name vc1 address {cl} && \
             ip link add va0 address {va0} type veth peer name va1 address {be} && \
             for l in vc0 vc1 va0 va1; do ip link set $l up; done && \
             ip addr add 192.0.2.1/24 dev vc0 && ip addr add {SNAT}/24 dev va0 && \
             ip neigh add {CLIENT} lladdr {cl} dev vc0 nud permanent && \
             ip neigh add {SAME_LEG_BACKEND} lladdr {cl} dev vc0 nud permanent && \
             for i in 11 12 13; do ip neigh add 198.51.100.$i lladdr {be} dev va0 nud permanent; done && \
             sysctl -qw net.ipv4.ip_forward=1 && \
             ip -6 addr add 2001:db8:c::1/64 dev vc0 nodad && \
             ip -6 addr add {SNAT6}/64 dev va0 nodad && \
             ip -6 neigh add {CLIENT6} lladdr {cl} dev vc0 nud permanent && \
             for i in 11 12 13; do ip -6 neigh add 2001:db8:b::$i lladdr {be} dev va0 nud permanent; done && \
             sysctl -qw net.ipv6.conf.all.forwarding=1",
            vc0 = mac(VC0_MAC),
            cl = mac(CLIENT_MAC),
            va0 = mac(VA0_MAC),
            be = mac(BACKEND_MAC),
        ))?;
        let entered = ns.enter()?;
        let pins = PinDir(PathBuf::from(format!(
            "/sys/fs/bpf/failover-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        )));
        if let Some(slots) = old_jumps {
            let maps = pins.0.join("maps");
            std::fs::create_dir_all(&maps)?;
            aya::EbpfLoader::new()
                .default_map_pin_directory(&maps)
                .map_max_entries(failover_common::names::JUMPS, slots)
                .load(failover_agent::dataplane::OBJECT)
                .context("pin an older build's maps")?;
        }
        let mut dp = Dataplane::load(&pins.0).context("load the XDP object")?;
        let vc0 = failover_agent::dataplane::ifindex("vc0")?;
        let va0 = failover_agent::dataplane::ifindex("va0")?;
        dp.add_egress(vc0)?;
        dp.add_egress(va0)?;
        dp.set_node(Node {
            snat_be: u32::from(SNAT).to_be(),
            port_min: PORT_MIN,
            port_max: PORT_MAX,
            seed: 7,
            flags: 0,
        })?;
        Ok(Self {
            _entered: entered,
            dp,
            pins,
            ns,
            vc0,
            va0,
        })
    }

    /// A lab with backends 1..=3 up on the backend leg (port [`BPORT`])
    /// and a TCP service 0 on VIP:80 whose ring of 13 slots holds `ids`.
    pub fn with_tcp_service(ids: &[u32], flags: u32) -> Result<Self> {
        let mut lab = Self::new()?;
        for id in 1..=3u32 {
            lab.backend(id, backend_addr(id as u8), BPORT, state::UP)?;
        }
        lab.service(0, 80, 6, flags, 13, ids)?;
        Ok(lab)
    }

    /// The same over IPv6: the node's IPv6 SNAT address, backends 1..=3
    /// up at `backend6_addr` (port [`BPORT`]), and a TCP service 0 on
    /// VIP6:80 whose ring of 13 slots holds `ids`.
    pub fn with_tcp_service6(ids: &[u32], flags: u32) -> Result<Self> {
        let mut lab = Self::new()?;
        lab.enable_v6()?;
        for id in 1..=3u32 {
            lab.backend6(id, backend6_addr(id as u8), BPORT, state::UP)?;
        }
        lab.service6(0, 80, 6, flags, 13, ids)?;
        Ok(lab)
    }

    /// Serves IPv6: the node's IPv6 SNAT address.
    pub fn enable_v6(&mut self) -> Result<()> {
        self.dp.set_node6(Node6 { snat: addr6(SNAT6) })?;
        Ok(())
    }

    /// Programs backend slot `id` at IPv6 `addr:port` in `st`: the address
    /// first, then the entry that makes it live.
    pub fn backend6(&mut self, id: u32, addr: Ipv6Addr, port: u16, st: u8) -> Result<()> {
        self.dp.set_backend_addr6(id, addr6(addr))?;
        self.backend(id, Ipv4Addr::UNSPECIFIED, port, st)
    }

    /// [`service`](Self::service) on VIP6.
    pub fn service6(
        &mut self,
        sid: u32,
        port: u16,
        proto: u8,
        flags: u32,
        ring_size: u32,
        ids: &[u32],
    ) -> Result<ServiceKey<Addr6>> {
        let key = ServiceKey {
            vip_be: addr6(VIP6),
            port_be: port.to_be(),
            proto,
            _pad: 0,
        };
        self.dp.write_ring(sid, 0, &ring_of(ring_size, ids))?;
        self.dp
            .put_service6(key, service_value(sid, flags, ring_size))?;
        self.refresh_vips()?;
        Ok(key)
    }

    /// The VIP filter from every service of both families.
    fn refresh_vips(&mut self) -> Result<()> {
        let mut vips: Vec<std::net::IpAddr> = self
            .dp
            .services()?
            .iter()
            .map(|(k, _)| Ipv4Addr::from(u32::from_be(k.vip_be)).into())
            .collect();
        vips.extend(
            self.dp.services6()?.iter().map(|(k, _)| {
                std::net::IpAddr::from(failover_agent::agent::ids::ipv6_of(k.vip_be))
            }),
        );
        self.dp.set_vips(vips)?;
        Ok(())
    }

    /// The program's count of `r`.
    pub fn count(&self, r: Reason) -> u64 {
        self.dp.reason_count(r).expect("read STATS")
    }

    /// Runs `frame` from the client leg and checks that it got `reason`'s
    /// documented verdict, left untouched, with exactly one count of it.
    pub fn assert_verdict(&self, frame: &[u8], reason: Reason) {
        let before = self.count(reason);
        let (got, out) = self.run(self.vc0, frame).expect("test run");
        assert_eq!(got, reason.verdict().action(), "verdict for {reason:?}");
        assert_eq!(out, frame, "{reason:?}: frame untouched");
        assert_eq!(self.count(reason), before + 1, "{reason:?} counted");
    }

    pub fn pin_dir(&self) -> &std::path::Path {
        &self.pins.0
    }

    /// Programs backend slot `id` at `addr:port` in `st`.
    pub fn backend(&mut self, id: u32, addr: Ipv4Addr, port: u16, st: u8) -> Result<()> {
        self.dp.set_backend(
            id,
            Backend {
                addr_be: u32::from(addr).to_be(),
                port_be: port.to_be(),
                state: st,
                _pad: 0,
            },
        )?;
        Ok(())
    }

    /// Programs a service whose ring of `ring_size` slots cycles through
    /// `ids` (or is empty: fail closed), and adds the VIP to the filter.
    pub fn service(
        &mut self,
        sid: u32,
        port: u16,
        proto: u8,
        flags: u32,
        ring_size: u32,
        ids: &[u32],
    ) -> Result<ServiceKey> {
        let key = ServiceKey {
            vip_be: u32::from(VIP).to_be(),
            port_be: port.to_be(),
            proto,
            _pad: 0,
        };
        let ring = ring_of(ring_size, ids);
        self.dp.write_ring(sid, 0, &ring)?;
        self.dp
            .put_service(key, service_value(sid, flags, ring_size))?;
        self.refresh_vips()?;
        Ok(key)
    }

    /// Runs one frame through the NAT program as if received on `ifindex`.
    pub fn run(&self, ifindex: u32, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        run_on(self.dp.program(), ifindex, frame)
    }

    pub fn down(&mut self, id: u32) -> Result<()> {
        self.dp.set_backend_state(id, state::DOWN)?;
        Ok(())
    }
}

/// The node of an agent config for this lab (both legs, SKB mode, the
/// lab's SNAT address and ports, pins under `pin`), with the control
/// socket at `api_socket` and metrics on an ephemeral loopback port when
/// given.
pub fn node_config(
    pin: &std::path::Path,
    api_socket: Option<&std::path::Path>,
) -> failover_agent::config::Node {
    let mut node = crate::configs::node(&["vc0", "va0"], SNAT, (PORT_MIN, PORT_MAX), pin);
    node.xdp_mode = failover_agent::config::XdpMode::Skb;
    node.hash_seed = 7;
    if let Some(sock) = api_socket {
        node.metrics_address = Some((Ipv4Addr::LOCALHOST, 0).into());
        node.api_socket = sock.to_owned();
    }
    node
}

/// An agent config for this lab: [`node_config`] and one TCP service
/// `web` on VIP:80 over `web` (a ring of 13 slots) probed with `probe`,
/// then `backends`.
pub fn web_config(
    pin: &std::path::Path,
    api_socket: Option<&std::path::Path>,
    web: &[&str],
    probe: failover_agent::config::Probe,
    backends: Vec<failover_agent::config::Backend>,
) -> failover_agent::config::Config {
    let mut s = crate::configs::service("web", VIP, 80, web, probe);
    s.policy.ring_size = 13;
    failover_agent::config::Config {
        node: node_config(pin, api_socket),
        services: vec![s],
        backends,
    }
}

/// A lab service's `SERVICES` value: ring slot 0, half-open for 10 s.
fn service_value(sid: u32, flags: u32, ring_size: u32) -> Service {
    Service {
        id: sid,
        flags,
        active_slot: 0,
        ring_size,
        generation: 1,
        half_open_ms: 10_000,
        _pad: 0,
    }
}

/// A ring of `size` slots cycling through `ids`; all NO_BACKEND if empty.
pub fn ring_of(size: u32, ids: &[u32]) -> Box<Ring> {
    let mut ring = Box::new(Ring {
        backends: [NO_BACKEND; RING_MAX],
    });
    if !ids.is_empty() {
        for i in 0..size as usize {
            ring.backends[i] = ids[i % ids.len()];
        }
    }
    ring
}

/// BPF_PROG_TEST_RUN of one frame, repeat = 1, with `ingress_ifindex` set
/// so the program's FIB lookup starts from that interface.
pub fn run_on(prog: &Xdp, ifindex: u32, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
    let mut out = vec![0u8; frame.len() + 256];
    let ctx = xdp_md(frame.len() as u32, ifindex);
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..TestRunOptions::new()
        })
        .context("BPF_PROG_TEST_RUN")?;
    out.truncate(r.data_size_out as usize);
    Ok((r.return_value, out))
}

/// `struct xdp_md` for test runs: data 0, data_end = len, no metadata.
pub fn xdp_md(len: u32, ifindex: u32) -> [u8; 24] {
    let mut b = [0u8; 24];
    b[4..8].copy_from_slice(&len.to_ne_bytes());
    b[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    b
}

pub fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
