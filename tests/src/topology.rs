//! The end-to-end topology, all in namespaces this process creates:
//!
//! ```text
//! [client 192.0.2.100] c0 --- ec [edge] ea --- a0 [cloud-a 198.51.100.11, .12]
//!                                      eb --- b0 [cloud-b 198.51.100.75, .76]
//! ```
//!
//! cloud-a is 198.51.100.0/26, cloud-b 198.51.100.64/26, the VIP
//! 203.0.113.10 is routed to the edge, and the SNAT address is the edge's
//! cloud-a address. Every namespace is dual-stack, the same shape in
//! 2001:db8::/32 ([`Family::V6`]): client 2001:db8:c::100 (edge ::1),
//! cloud-a 2001:db8:a::/64 (backends ::11, ::12), cloud-b 2001:db8:b::/64
//! (::75, ::76), VIP6 2001:db8:f::10 and SNAT6 2001:db8:a::1. IPv6
//! addresses skip duplicate address detection (nothing else is on these
//! links, and a tentative address would fail the first connections).
//! Nothing routes off the machine: every namespace's only routes are these
//! subnets and a default via the edge. The XDP program
//! runs on the edge's three legs; the peers carry the pass program so that
//! redirected and XDP_TX frames are delivered.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use failover_agent::dataplane::{Dataplane, XdpMode};

use crate::netns::Netns;

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
pub const VIP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
pub const SNAT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub const CLOUD_A: [Ipv4Addr; 2] = [
    Ipv4Addr::new(198, 51, 100, 11),
    Ipv4Addr::new(198, 51, 100, 12),
];
pub const CLOUD_B: [Ipv4Addr; 2] = [
    Ipv4Addr::new(198, 51, 100, 75),
    Ipv4Addr::new(198, 51, 100, 76),
];
pub const BACKEND_PORT: u16 = 8000;

/// The documentation address 2001:db8:`net`::`host`.
const fn doc6(net: u16, host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, net, 0, 0, 0, 0, host)
}
pub const CLIENT6: Ipv6Addr = doc6(0xc, 0x100);
pub const VIP6: Ipv6Addr = doc6(0xf, 0x10);
pub const SNAT6: Ipv6Addr = doc6(0xa, 1);
pub const CLOUD_A6: [Ipv6Addr; 2] = [doc6(0xa, 0x11), doc6(0xa, 0x12)];
pub const CLOUD_B6: [Ipv6Addr; 2] = [doc6(0xb, 0x75), doc6(0xb, 0x76)];

/// The address family of the topology's client, VIP, SNAT and backend
/// addresses: the one place a test picks IPv4 or IPv6.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn client(self) -> IpAddr {
        self.pick(CLIENT.into(), CLIENT6.into())
    }
    pub fn vip(self) -> IpAddr {
        self.pick(VIP.into(), VIP6.into())
    }
    pub fn snat(self) -> IpAddr {
        self.pick(SNAT.into(), SNAT6.into())
    }
    /// Backend `i` (0 or 1) of cloud-b, or of cloud-a.
    pub fn backend_addr(self, in_cloud_b: bool, i: usize) -> IpAddr {
        match (self, in_cloud_b) {
            (Family::V4, false) => CLOUD_A[i].into(),
            (Family::V4, true) => CLOUD_B[i].into(),
            (Family::V6, false) => CLOUD_A6[i].into(),
            (Family::V6, true) => CLOUD_B6[i].into(),
        }
    }
    /// A backend's name in this family: IPv6 ones end in `-6`, so that a
    /// dual-stack pool holds both and an answer names its family.
    pub fn name(self, base: &str) -> String {
        match self {
            Family::V4 => base.to_owned(),
            Family::V6 => format!("{base}-6"),
        }
    }
    /// `ip`'s prefix length of a single address.
    pub fn host_prefix(self) -> u8 {
        self.pick(32, 128)
    }
    fn pick<T>(self, v4: T, v6: T) -> T {
        match self {
            Family::V4 => v4,
            Family::V6 => v6,
        }
    }
}

impl std::str::FromStr for Family {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "4" => Ok(Family::V4),
            "6" => Ok(Family::V6),
            other => Err(format!("family {other:?}: 4 or 6")),
        }
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.pick("IPv4", "IPv6"))
    }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Removes the pin directory (detaching every pinned link) on drop.
pub struct Pins(pub PathBuf);
impl Drop for Pins {
    fn drop(&mut self) {
        let _ = Dataplane::remove_pins(&self.0);
    }
}

/// Kills a backend process on drop.
pub struct Proc(pub Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The test backend binary, built beside the test executables by cargo
/// (tests run from target/<profile>/deps/).
pub fn testbackend_bin() -> Result<String> {
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().context("exe dir")?;
    if dir.ends_with("deps") {
        dir = dir.parent().context("profile dir")?;
    }
    let bin = dir.join("failover-testbackend");
    if !bin.exists() {
        bail!(
            "{} not built (cargo test builds it with the tests)",
            bin.display()
        );
    }
    Ok(bin.to_string_lossy().into_owned())
}

/// A binary of another package, built into the same profile directory as
/// the running executable (`cargo build -p failover-agent` first).
pub fn sibling_bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().context("exe dir")?;
    if dir.ends_with("deps") {
        dir = dir.parent().context("profile dir")?;
    }
    let bin = dir.join(name);
    if !bin.exists() {
        bail!(
            "{} not built: run `cargo build{} -p failover-agent` (cargo xtask test/demo/bench do)",
            bin.display(),
            if dir.ends_with("release") {
                " --release"
            } else {
                ""
            }
        );
    }
    Ok(bin)
}

pub struct Topology {
    // Drop order: processes, then pins, then namespaces.
    pub backends: Vec<(String, Proc)>,
    pub pins: Pins,
    pub client: Netns,
    pub edge: Netns,
    pub cloud_a: Netns,
    pub cloud_b: Netns,
}

impl Topology {
    pub fn new() -> Result<Self> {
        let client = Netns::new("cl")?;
        let edge = Netns::new("ed")?;
        let cloud_a = Netns::new("ca")?;
        let cloud_b = Netns::new("cb")?;
        // Before the links exist, so that every device (link-local
        // addresses included) is created without DAD.
        for ns in [&client, &edge, &cloud_a, &cloud_b] {
            ns.exec(
                "sysctl -qw net.ipv6.conf.all.accept_dad=0 && \
                 sysctl -qw net.ipv6.conf.default.accept_dad=0",
            )?;
        }
        let pins = Pins(PathBuf::from(format!(
            "/sys/fs/bpf/failover-test-e2e-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        )));
        let link = |a: &Netns, an: &str, b: &Netns, bn: &str| {
            crate::netns::sh(&format!(
                "ip link add {an} netns {} type veth peer name {bn} netns {}",
                a.name, b.name
            ))
        };
        link(&client, "c0", &edge, "ec")?;
        link(&cloud_a, "a0", &edge, "ea")?;
        link(&cloud_b, "b0", &edge, "eb")?;
        // Hosts in namespaces send with checksum offload: the L4 checksum
        // is left partial for a NIC to finish. A real NIC's receive side
        // never sees that, but XDP on a veth does; have the kernel compute
        // full checksums, as frames from a wire carry.
        client.exec("ethtool -K c0 tx off >/dev/null")?;
        cloud_a.exec("ethtool -K a0 tx off >/dev/null")?;
        cloud_b.exec("ethtool -K b0 tx off >/dev/null")?;
        client.exec(
            "ip addr add 192.0.2.100/24 dev c0 && \
             ip -6 addr add 2001:db8:c::100/64 dev c0 nodad && ip link set c0 up && \
             ip route add default via 192.0.2.1 && \
             ip -6 route add default via 2001:db8:c::1",
        )?;
        edge.exec(
            "ip addr add 192.0.2.1/24 dev ec && ip addr add 198.51.100.1/26 dev ea && \
             ip addr add 198.51.100.65/26 dev eb && \
             ip -6 addr add 2001:db8:c::1/64 dev ec nodad && \
             ip -6 addr add 2001:db8:a::1/64 dev ea nodad && \
             ip -6 addr add 2001:db8:b::1/64 dev eb nodad && \
             for l in ec ea eb; do ip link set $l up; done && \
             sysctl -qw net.ipv4.ip_forward=1 && \
             sysctl -qw net.ipv6.conf.all.forwarding=1",
        )?;
        // A cloud: its own address, the two backends' addresses of each
        // family, and defaults via the edge. keep_addr_on_down: a
        // blackholed cloud's link goes down and up again, and its IPv6
        // addresses would otherwise leave with it.
        let cloud = |ns: &Netns,
                     dev: &str,
                     own: &str,
                     v4: [Ipv4Addr; 2],
                     v6: [Ipv6Addr; 2],
                     gw: (&str, &str)| {
            ns.exec(&format!(
                "ip addr add {own}/26 dev {dev} && ip addr add {}/26 dev {dev} && \
                 ip addr add {}/26 dev {dev} && \
                 sysctl -qw net.ipv6.conf.{dev}.keep_addr_on_down=1 && \
                 ip -6 addr add {}/64 dev {dev} nodad && ip -6 addr add {}/64 dev {dev} nodad && \
                 ip link set {dev} up && ip route add default via {} && \
                 ip -6 route add default via {}",
                v4[0], v4[1], v6[0], v6[1], gw.0, gw.1
            ))
        };
        let gw_a = ("198.51.100.1", "2001:db8:a::1");
        cloud(&cloud_a, "a0", "198.51.100.10", CLOUD_A, CLOUD_A6, gw_a)?;
        let gw_b = ("198.51.100.65", "2001:db8:b::1");
        cloud(&cloud_b, "b0", "198.51.100.74", CLOUD_B, CLOUD_B6, gw_b)?;
        Ok(Self {
            backends: Vec::new(),
            pins,
            client,
            edge,
            cloud_a,
            cloud_b,
        })
    }

    /// Loads the data plane in the edge and attaches it to the edge's legs,
    /// with the pass program on every peer.
    pub fn load_dataplane(&self) -> Result<Dataplane> {
        self.load_dataplane_in(XdpMode::Native)
    }

    /// As [`Self::load_dataplane`], attached in `mode`. In generic (skb)
    /// mode, which `Auto` is on these veths, the peers need no program:
    /// redirected frames leave through the stack's transmit path.
    pub fn load_dataplane_in(&self, mode: XdpMode) -> Result<Dataplane> {
        let (mut dp, native) = {
            let _in = self.edge.enter()?;
            let mut dp = Dataplane::load(&self.pins.0)?;
            let mut native = false;
            for l in ["ec", "ea", "eb"] {
                let a = dp.attach(l, mode).with_context(|| format!("attach {l}"))?;
                native |= a.mode != XdpMode::Skb;
            }
            (dp, native)
        };
        if native {
            self.pass_on_peers(&mut dp)?;
        }
        Ok(dp)
    }

    /// The data plane's object loaded against `self.pins` and attached
    /// nowhere, for tests where the agent attaches it: it shares the
    /// agent's maps when the agent uses the same pin path. The agent's
    /// `xdp_mode: auto` is generic mode on these veths, so the peers need
    /// no program.
    pub fn open_dataplane(&self) -> Result<Dataplane> {
        let _in = self.edge.enter()?;
        Ok(Dataplane::load(&self.pins.0)?)
    }

    /// The pass program on c0, a0 and b0, so that frames the edge
    /// redirects or sends with XDP_TX into a veth are delivered.
    fn pass_on_peers(&self, dp: &mut Dataplane) -> Result<()> {
        for (ns, l) in [
            (&self.client, "c0"),
            (&self.cloud_a, "a0"),
            (&self.cloud_b, "b0"),
        ] {
            let _in = ns.enter()?;
            dp.attach_pass(l, XdpMode::Native)
                .with_context(|| format!("attach pass {l}"))?;
        }
        Ok(())
    }

    /// Starts a test backend `name` on `addr:BACKEND_PORT` in `ns`, and
    /// waits until it answers.
    pub fn start_backend(
        &mut self,
        name: &str,
        in_cloud_b: bool,
        addr: impl Into<IpAddr>,
    ) -> Result<()> {
        self.start_backend_on(name, in_cloud_b, addr, BACKEND_PORT)
    }

    /// As [`Self::start_backend`], on `port`.
    pub fn start_backend_on(
        &mut self,
        name: &str,
        in_cloud_b: bool,
        addr: impl Into<IpAddr>,
        port: u16,
    ) -> Result<()> {
        self.start_backend_with(name, in_cloud_b, addr, port, &[])
    }

    /// As [`Self::start_backend_on`], with more of the test backend's
    /// arguments (`--service-rate 50`, ...).
    pub fn start_backend_with(
        &mut self,
        name: &str,
        in_cloud_b: bool,
        addr: impl Into<IpAddr>,
        port: u16,
        extra: &[String],
    ) -> Result<()> {
        let target = SocketAddr::from((addr.into(), port));
        let ns = if in_cloud_b {
            &self.cloud_b
        } else {
            &self.cloud_a
        };
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, &testbackend_bin()?])
            .args(["--name", name, "--listen", &target.to_string()])
            .args(["--token-interval-ms", "20"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawn test backend")?;
        self.backends.push((name.to_owned(), Proc(child)));
        // Ready when a connection from the edge succeeds (this also puts
        // the backend in the edge's neighbour table, as the agent's probes
        // do in production).
        let deadline = Instant::now() + Duration::from_secs(10);
        let _in = self.edge.enter()?;
        while Instant::now() < deadline {
            if std::net::TcpStream::connect_timeout(&target, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("backend {name} at {target} did not come up")
    }
}
