//! Two edge nodes in front of the same backends, all in namespaces this
//! process creates:
//!
//! ```text
//! [client-1 192.0.2.100] c0 --- ec [edge-1] ea --- ae1 ┐
//!                                            eb --- be1 ┼─┐
//! [client-2 192.0.2.100] c0 --- ec [edge-2] ea --- ae2 ┘ │   br0 [cloud-a 198.51.100.11, .12]
//!                                            eb --- be2 ──┴─ br0 [cloud-b 198.51.100.75, .76]
//! ```
//!
//! Both clients have the same address, so the very same client 5-tuple can
//! be sent through either edge. Each edge is a separate node: its own
//! namespace, its own pinned data plane (`Pins`), its own agent. Edge `i`
//! has the cloud-a address 198.51.100.`i` (its SNAT address) and the
//! cloud-b address 198.51.100.`64 + i`; both clouds bridge the edges' legs
//! (`br0`), and cloud-b routes each SNAT address back to its own edge.
//! Nothing routes off the machine: the clients' only routes are their /24
//! and a default via their edge, the clouds have no default route.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use failover_agent::{
    config::{self, Config, OnBackendDown, PanicMode},
    dataplane::{Dataplane, XdpMode},
};

use crate::configs;
use crate::netns::{Netns, sh};
use crate::topology::{BACKEND_PORT, CLOUD_A, CLOUD_B, Pins, Proc, testbackend_bin};

pub use crate::topology::{CLIENT, VIP};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Edge `i`'s SNAT address (its cloud-a leg).
pub const SNAT: [Ipv4Addr; 2] = [
    Ipv4Addr::new(198, 51, 100, 1),
    Ipv4Addr::new(198, 51, 100, 2),
];
/// Edge `i`'s cloud-b leg.
pub const EDGE_B: [Ipv4Addr; 2] = [
    Ipv4Addr::new(198, 51, 100, 65),
    Ipv4Addr::new(198, 51, 100, 66),
];

/// One edge node and the client behind it.
pub struct EdgeNode {
    // Drop order: pins (detaching every link) before the namespaces.
    pub pins: Pins,
    pub client: Netns,
    pub edge: Netns,
}

pub struct TwoEdges {
    // Drop order: processes, then each edge's pins and namespaces, then
    // the clouds.
    pub backends: Vec<(String, Proc)>,
    pub edges: [EdgeNode; 2],
    pub cloud_a: Netns,
    pub cloud_b: Netns,
}

impl TwoEdges {
    pub fn new() -> Result<Self> {
        let cloud_a = Netns::new("ca")?;
        let cloud_b = Netns::new("cb")?;
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let edge = |i: usize| -> Result<EdgeNode> {
            Ok(EdgeNode {
                pins: Pins(PathBuf::from(format!(
                    "/sys/fs/bpf/failover-test-twoedge{}-{}-{n}",
                    i + 1,
                    std::process::id(),
                ))),
                client: Netns::new(&format!("cl{}", i + 1))?,
                edge: Netns::new(&format!("ed{}", i + 1))?,
            })
        };
        let edges = [edge(0)?, edge(1)?];
        for ns in [&cloud_a, &cloud_b] {
            // No checksum offload anywhere a frame toward an edge leaves
            // (see `Topology::new`): the bridge and its ports.
            ns.exec(
                "ip link add br0 type bridge && ip link set br0 up && \
                 ethtool -K br0 tx off >/dev/null",
            )?;
        }
        for (i, e) in edges.iter().enumerate() {
            let k = i + 1;
            let link = |a: &Netns, an: &str, b: &Netns, bn: &str| {
                sh(&format!(
                    "ip link add {an} netns {} type veth peer name {bn} netns {}",
                    a.name, b.name
                ))
            };
            link(&e.client, "c0", &e.edge, "ec")?;
            link(&cloud_a, &format!("ae{k}"), &e.edge, "ea")?;
            link(&cloud_b, &format!("be{k}"), &e.edge, "eb")?;
            e.client.exec(&format!(
                "ethtool -K c0 tx off >/dev/null && \
                 ip addr add {CLIENT}/24 dev c0 && ip link set c0 up && \
                 ip route add default via 192.0.2.1"
            ))?;
            e.edge.exec(&format!(
                "ip addr add 192.0.2.1/24 dev ec && ip addr add {}/26 dev ea && \
                 ip addr add {}/26 dev eb && \
                 for l in ec ea eb; do ip link set $l up; done && \
                 sysctl -qw net.ipv4.ip_forward=1",
                SNAT[i], EDGE_B[i]
            ))?;
            for (ns, port) in [(&cloud_a, format!("ae{k}")), (&cloud_b, format!("be{k}"))] {
                ns.exec(&format!(
                    "ethtool -K {port} tx off >/dev/null && \
                     ip link set {port} master br0 && ip link set {port} up"
                ))?;
            }
        }
        let [a1, a2] = CLOUD_A;
        let [b1, b2] = CLOUD_B;
        cloud_a.exec(&format!(
            "ip addr add 198.51.100.10/26 dev br0 && ip addr add {a1}/26 dev br0 && \
             ip addr add {a2}/26 dev br0"
        ))?;
        // The SNAT addresses are in cloud-a's subnet: cloud-b sends each
        // back through the edge that owns it.
        cloud_b.exec(&format!(
            "ip addr add 198.51.100.74/26 dev br0 && ip addr add {b1}/26 dev br0 && \
             ip addr add {b2}/26 dev br0 && \
             ip route add {}/32 via {} && ip route add {}/32 via {}",
            SNAT[0], EDGE_B[0], SNAT[1], EDGE_B[1]
        ))?;
        Ok(Self {
            backends: Vec::new(),
            edges,
            cloud_a,
            cloud_b,
        })
    }

    /// Loads edge `i`'s data plane (maps pinned under its pin path, which
    /// its agent then re-opens) and attaches the pass program to the
    /// peers of its legs, so that redirected and XDP_TX frames are
    /// delivered. The agent attaches the NAT program itself.
    pub fn attach_peer_pass(&self, i: usize) -> Result<Dataplane> {
        let e = &self.edges[i];
        let mut dp = {
            let _in = e.edge.enter()?;
            Dataplane::load(&e.pins.0)?
        };
        let k = i + 1;
        for (ns, l) in [
            (&e.client, "c0".to_owned()),
            (&self.cloud_a, format!("ae{k}")),
            (&self.cloud_b, format!("be{k}")),
        ] {
            let _in = ns.enter()?;
            dp.attach_pass(&l, XdpMode::Native)
                .with_context(|| format!("attach pass {l} (edge {k})"))?;
        }
        Ok(dp)
    }

    /// Starts test backend `name` on `addr:BACKEND_PORT` in cloud-a or
    /// cloud-b and waits until it answers from both edges (which also puts
    /// it in both edges' neighbour tables).
    pub fn start_backend(&mut self, name: &str, in_cloud_b: bool, addr: Ipv4Addr) -> Result<()> {
        let ns = if in_cloud_b {
            &self.cloud_b
        } else {
            &self.cloud_a
        };
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, &testbackend_bin()?])
            .args([
                "--name",
                name,
                "--listen",
                &format!("{addr}:{BACKEND_PORT}"),
            ])
            .args(["--token-interval-ms", "20"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawn test backend")?;
        self.backends.push((name.to_owned(), Proc(child)));
        let target = SocketAddr::from((addr, BACKEND_PORT));
        for (i, e) in self.edges.iter().enumerate() {
            let deadline = Instant::now() + Duration::from_secs(10);
            let _in = e.edge.enter()?;
            while std::net::TcpStream::connect_timeout(&target, Duration::from_millis(200)).is_err()
            {
                if Instant::now() > deadline {
                    bail!(
                        "backend {name} at {target} not reachable from edge {}",
                        i + 1
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }
}

/// Backend name, weight, in cloud-b, address. Unequal weights, so the
/// rings are weighted Maglev tables.
pub const BACKENDS: [(&str, u32, bool, Ipv4Addr); 4] = [
    ("a1", 100, false, CLOUD_A[0]),
    ("a2", 200, false, CLOUD_A[1]),
    ("b1", 100, true, CLOUD_B[0]),
    ("b2", 150, true, CLOUD_B[1]),
];

/// Service name, port on the VIP, backends.
pub const SERVICES: [(&str, u16, &[&str]); 2] = [
    ("chat", 80, &["a1", "a2", "b1", "b2"]),
    ("batch", 81, &["a2", "b1", "b2"]),
];

/// The agent config of edge `i`. Both edges get the same services,
/// backends, weights, probes and hash seed; only node-specific fields
/// differ (SNAT address, pin path, control socket). With `reversed`, every
/// list (services, backends, each pool) is in reverse order: the same
/// config to an operator, but a fresh agent hands out its data-plane ids
/// in list order, so the ids differ from the other edge's.
pub fn config(i: usize, pin: &Path, api_socket: &Path, reversed: bool) -> Config {
    fn ordered<T>(mut v: Vec<T>, reversed: bool) -> Vec<T> {
        if reversed {
            v.reverse();
        }
        v
    }
    let probe = configs::probe(serde_json::json!({
        "kind": "http", "path": "/health", "expect_status": 200, "interval": "100ms",
        "timeout": "200ms", "rise": 2, "fall": 2, "passive": false,
    }));
    let services = SERVICES
        .iter()
        .map(|(name, port, pool)| {
            let mut s = configs::service(
                name,
                VIP,
                *port,
                &ordered(pool.to_vec(), reversed),
                probe.clone(),
            );
            s.policy.panic = PanicMode::FailClosed;
            s.policy.on_backend_down = OnBackendDown::Reset;
            s
        })
        .collect();
    let backends = BACKENDS
        .iter()
        .map(|(name, weight, in_b, addr)| {
            let at = if *in_b {
                ("cloud-b", "us-east-1", "US")
            } else {
                ("cloud-a", "eu-west-1", "EU")
            };
            let mut b = configs::located(name, *addr, BACKEND_PORT, at);
            b.weight = *weight;
            b
        })
        .collect();
    let mut node = configs::node(&["ec", "ea", "eb"], SNAT[i], (10_000, 32_767), pin);
    node.xdp_mode = config::XdpMode::Native;
    node.api_socket = api_socket.to_owned();
    node.hash_seed = 0x5eed;
    Config {
        node,
        services: ordered(services, reversed),
        backends: ordered(backends, reversed),
    }
}
