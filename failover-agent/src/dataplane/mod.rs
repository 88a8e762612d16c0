//! The data plane as the agent sees it: load (or re-open) the pinned XDP
//! program and maps, attach it, and read and write its maps.
//!
//! Restart safety: every map is pinned under `<pin_dir>/maps` and every XDP
//! link under `<pin_dir>/links`. A new agent re-opens the same maps (state
//! and traffic carry on) and swaps its program into the pinned links with
//! one `bpf_link_update`, so there is never a moment without a program.

mod attach;
mod batch;
pub mod bpffs;
mod counters;
mod expire;
mod memory;
mod nexthops;
mod nudge;
mod rings;

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, DevMapHash, HashMap, MapData, MapError, PerCpuArray, ProgramArray},
    programs::{ProgramError, Xdp},
};
use failover_common::{
    Addr, Addr6, Backend, BackendStats, Flow, FlowKey, NextHop, Node, Node6, Pending, Reverse,
    ReverseKey, Ring, Service, ServiceKey, ServiceStats, VipFilter, names,
};

pub use attach::{Attached, XdpMode, driver, ifindex};
pub use counters::ReasonCount;
pub use expire::{Expired, now_stamp};
pub use memory::{estimate as memory_estimate, possible_cpus};
pub use rings::FlipTiming;

/// The compiled XDP object, built by this crate's build script.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/failover"));

/// A data plane error; boxed, since aya's errors are large and results
/// travel through every call.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct DataplaneError(Box<ErrorKind>);

impl DataplaneError {
    pub fn kind(&self) -> &ErrorKind {
        &self.0
    }
}

impl<E: Into<ErrorKind>> From<E> for DataplaneError {
    fn from(e: E) -> Self {
        Self(Box::new(e.into()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ErrorKind {
    #[error("loading the XDP object: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("program: {0}")]
    Program(#[source] ProgramError),
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("map DEVMAP: {0}")]
    Devmap(#[source] aya::maps::xdp::XdpMapError),
    #[error("map {0} missing from the object")]
    MissingMap(&'static str),
    #[error("attaching XDP to {iface} in {mode} mode: {source}{hint}")]
    Attach {
        iface: String,
        mode: XdpMode,
        hint: String,
        #[source]
        source: ProgramError,
    },
    #[error("interface {0} not found")]
    NoInterface(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("service {0} is not programmed")]
    NoService(String),
    #[error("ring size {size} of service {service} is out of range (1..={max})")]
    RingSize { service: u32, size: u32, max: usize },
    #[error("pinned link {path}: {source}")]
    Link {
        path: PathBuf,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
}

pub type Result<T> = std::result::Result<T, DataplaneError>;

/// Removes every entry of a flow table (`name` for errors).
fn clear<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<()> {
    let keys: Vec<K> = map
        .keys()
        .collect::<std::result::Result<_, _>>()
        .map_err(map_err(name))?;
    for k in keys {
        let _ = map.remove(&k);
    }
    Ok(())
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| ErrorKind::Map { map, source }.into()
}

/// A flow of either family, as listings show it (`SocketAddr`'s display
/// is canonical: `[2001:db8::1]:443`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowView {
    pub client: SocketAddr,
    pub vip: SocketAddr,
    pub proto: u8,
    pub flow: Flow,
}

/// A live `PENDING` (or `PENDING6`) slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingFlow<A = u32> {
    pub slot: u32,
    pub entry: Pending<A>,
}

impl<A> std::ops::Deref for PendingFlow<A> {
    type Target = Pending<A>;
    fn deref(&self) -> &Pending<A> {
        &self.entry
    }
}

impl<A> PendingFlow<A> {
    /// The NAT port, which the slot index holds (network order).
    pub fn nat_port_be(&self) -> u16 {
        ((self.slot & 0xffff) as u16).to_be()
    }
}

/// `CLOCK_MONOTONIC` in ns: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// `clock` in ns.
fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer; the monotonic clocks always exist.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Loaded program plus typed handles on every map.
pub struct Dataplane {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    node: Array<MapData, Node>,
    vip_filter: Array<MapData, VipFilter>,
    services: HashMap<MapData, ServiceKey, Service>,
    backends: Array<MapData, Backend>,
    rings: Array<MapData, Ring>,
    flows: HashMap<MapData, FlowKey, Flow>,
    reverse: HashMap<MapData, ReverseKey, Reverse>,
    pending: Array<MapData, Pending>,
    node6: Array<MapData, Node6>,
    services6: HashMap<MapData, ServiceKey<Addr6>, Service>,
    backend_addr6: Array<MapData, Addr6>,
    flows6: HashMap<MapData, FlowKey<Addr6>, Flow>,
    reverse6: HashMap<MapData, ReverseKey<Addr6>, Reverse<Addr6>>,
    pending6: Array<MapData, Pending<Addr6>>,
    path_mss: Array<MapData, u32>,
    /// Held so the tail-call table stays set while this agent runs.
    _jumps: ProgramArray<MapData>,
    devmap: DevMapHash<MapData>,
    stats: PerCpuArray<MapData, u64>,
    svc_stats: PerCpuArray<MapData, ServiceStats>,
    be_stats: PerCpuArray<MapData, BackendStats>,
}

macro_rules! take {
    ($ebpf:expr, $name:expr) => {{
        let map = $ebpf.take_map($name).ok_or(ErrorKind::MissingMap($name))?;
        map.try_into().map_err(map_err($name))?
    }};
}

impl Dataplane {
    /// Loads the program, re-using maps already pinned under `pin_dir`
    /// (state survives a restart) or creating and pinning them.
    pub fn load(pin_dir: &Path) -> Result<Self> {
        Self::load_sized(pin_dir, failover_common::FLOWS_MAX)
    }

    /// As [`load`](Self::load), with `flow_capacity` entries in `FLOWS`,
    /// `REVERSE`, `FLOWS6` and `REVERSE6` when they are created. Maps already pinned keep their
    /// size: a new capacity takes effect once the pins are removed.
    pub fn load_sized(pin_dir: &Path, flow_capacity: u32) -> Result<Self> {
        bpffs::ensure_mounted(pin_dir)?;
        let map_dir = pin_dir.join("maps");
        std::fs::create_dir_all(&map_dir).map_err(|source| ErrorKind::Io {
            what: "creating pin directory",
            path: map_dir.clone(),
            source,
        })?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&map_dir)
            .map_max_entries(names::FLOWS, flow_capacity)
            .map_max_entries(names::REVERSE, flow_capacity)
            .map_max_entries(names::FLOWS6, flow_capacity)
            .map_max_entries(names::REVERSE6, flow_capacity)
            .load(OBJECT)
            .map_err(ErrorKind::Load)?;
        let jumped = failover_common::JUMP_TABLE.map(|(_, name)| name);
        for name in [names::PROGRAM, names::PASS_PROGRAM]
            .into_iter()
            .chain(jumped)
        {
            let prog: &mut Xdp = ebpf
                .program_mut(name)
                .ok_or(ErrorKind::Program(ProgramError::NotLoaded))?
                .try_into()
                .map_err(ErrorKind::Program)?;
            prog.load().map_err(ErrorKind::Program)?;
        }
        // The main program tail-calls ICMP, TCP segments without an
        // established flow, and IPv6 into programs of their own. JUMPS is pinned like
        // every map: a restarted agent points it at its own programs, which
        // share every map with the ones before.
        let mut jumps: ProgramArray<MapData> = take!(ebpf, names::JUMPS);
        for (slot, name) in failover_common::JUMP_TABLE {
            let fd = ebpf
                .program(name)
                .ok_or(ErrorKind::Program(ProgramError::NotLoaded))?
                .fd()
                .map_err(ErrorKind::Program)?;
            match jumps.set(slot, fd, 0) {
                Ok(()) => {}
                // A JUMPS pinned by an older build, with fewer slots: that
                // program stays off (its traffic passes to the kernel, as
                // before it existed) rather than the agent failing to start
                // and traffic with it. `failover-agent detach` once lets the
                // map be made anew.
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::E2BIG) =>
                {
                    tracing::warn!(
                        program = name,
                        slot,
                        "the pinned JUMPS map is an older build's and has no slot for this program; \
                         it stays off until `failover-agent detach` (a short outage) and a restart"
                    );
                }
                Err(e) => return Err(map_err(names::JUMPS)(e)),
            }
        }
        Ok(Self {
            node: take!(ebpf, names::NODE),
            vip_filter: take!(ebpf, names::VIP_FILTER),
            services: take!(ebpf, names::SERVICES),
            backends: take!(ebpf, names::BACKENDS),
            rings: take!(ebpf, names::RINGS),
            flows: take!(ebpf, names::FLOWS),
            reverse: take!(ebpf, names::REVERSE),
            pending: take!(ebpf, names::PENDING),
            node6: take!(ebpf, names::NODE6),
            services6: take!(ebpf, names::SERVICES6),
            backend_addr6: take!(ebpf, names::BACKEND_ADDR6),
            flows6: take!(ebpf, names::FLOWS6),
            reverse6: take!(ebpf, names::REVERSE6),
            pending6: take!(ebpf, names::PENDING6),
            path_mss: take!(ebpf, names::PATH_MSS),
            _jumps: jumps,
            devmap: take!(ebpf, names::DEVMAP),
            stats: take!(ebpf, names::STATS),
            svc_stats: take!(ebpf, names::SVC_STATS),
            be_stats: take!(ebpf, names::BE_STATS),
            ebpf,
            pin_dir: pin_dir.to_path_buf(),
        })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The NAT program (for attaching, or BPF_PROG_TEST_RUN in tests).
    pub fn program(&self) -> &Xdp {
        self.xdp(names::PROGRAM)
    }

    /// The trivial XDP_PASS program.
    pub fn pass_program(&self) -> &Xdp {
        self.xdp(names::PASS_PROGRAM)
    }

    fn xdp(&self, name: &str) -> &Xdp {
        // Both programs were loaded and type-checked in `load`.
        match self.ebpf.program(name) {
            Some(aya::programs::Program::Xdp(p)) => p,
            _ => unreachable!("program {name} checked at load"),
        }
    }

    fn xdp_mut(&mut self, name: &str) -> &mut Xdp {
        match self.ebpf.program_mut(name) {
            Some(aya::programs::Program::Xdp(p)) => p,
            _ => unreachable!("program {name} checked at load"),
        }
    }

    pub fn set_node(&mut self, node: Node) -> Result<()> {
        self.node.set(0, node, 0).map_err(map_err(names::NODE))
    }

    pub fn node(&self) -> Result<Node> {
        self.node.get(&0, 0).map_err(map_err(names::NODE))
    }

    /// `NODE6`: the IPv6 SNAT address.
    pub fn set_node6(&mut self, node: Node6) -> Result<()> {
        self.node6.set(0, node, 0).map_err(map_err(names::NODE6))
    }

    pub fn node6(&self) -> Result<Node6> {
        self.node6.get(&0, 0).map_err(map_err(names::NODE6))
    }

    /// Replaces the VIP pre-filter with exactly `vips` (of both families,
    /// which share it), in one write.
    pub fn set_vips(&mut self, vips: impl IntoIterator<Item = impl Into<IpAddr>>) -> Result<()> {
        self.write_vips(Box::new(VipFilter::empty()), vips)
    }

    /// Sets `vips`' bits in the pinned pre-filter, keeping those already
    /// set: while an older build's program is still attached, it reads
    /// the bitmap with its own slot function, which may not be this
    /// build's (the IPv6 fold changed once). A kept bit costs a false
    /// positive, which the service lookup turns into `not_vip`.
    pub fn add_vips(&mut self, vips: impl IntoIterator<Item = impl Into<IpAddr>>) -> Result<()> {
        let pinned = self.vip_filter()?;
        self.write_vips(Box::new(pinned), vips)
    }

    pub fn vip_filter(&self) -> Result<VipFilter> {
        self.vip_filter
            .get(&0, 0)
            .map_err(map_err(names::VIP_FILTER))
    }

    fn write_vips(
        &mut self,
        mut f: Box<VipFilter>,
        vips: impl IntoIterator<Item = impl Into<IpAddr>>,
    ) -> Result<()> {
        for v in vips {
            match v.into() {
                IpAddr::V4(v) => f.insert(crate::agent::ids::addr4(v)),
                IpAddr::V6(v) => f.insert(crate::agent::ids::addr6(v)),
            }
        }
        self.vip_filter
            .set(0, *f, 0)
            .map_err(map_err(names::VIP_FILTER))
    }

    pub fn set_backend(&mut self, id: u32, backend: Backend) -> Result<()> {
        self.backends
            .set(id, backend, 0)
            .map_err(map_err(names::BACKENDS))
    }

    pub fn backend(&self, id: u32) -> Result<Backend> {
        self.backends.get(&id, 0).map_err(map_err(names::BACKENDS))
    }

    /// An IPv6 backend's address (`BACKEND_ADDR6`); written before its
    /// `BACKENDS` entry.
    pub fn set_backend_addr6(&mut self, id: u32, addr: Addr6) -> Result<()> {
        self.backend_addr6
            .set(id, addr, 0)
            .map_err(map_err(names::BACKEND_ADDR6))
    }

    pub fn backend_addr6(&self, id: u32) -> Result<Addr6> {
        self.backend_addr6
            .get(&id, 0)
            .map_err(map_err(names::BACKEND_ADDR6))
    }

    /// The MSS clamped into handshakes toward backend `id` (`path_mtu`
    /// less the headers of its family; 0: none). Written before the backend enters a ring.
    pub fn set_path_mss(&mut self, id: u32, mss: u32) -> Result<()> {
        self.path_mss
            .set(id, mss, 0)
            .map_err(map_err(names::PATH_MSS))
    }

    pub fn path_mss(&self, id: u32) -> Result<u32> {
        self.path_mss.get(&id, 0).map_err(map_err(names::PATH_MSS))
    }

    /// Changes only a backend's state: the fastest way to take a backend
    /// out (flows pinned to it are reset or moved on their next packet).
    pub fn set_backend_state(&mut self, id: u32, state: u8) -> Result<()> {
        let mut b = self.backend(id)?;
        b.state = state;
        self.set_backend(id, b)
    }

    pub fn service(&self, key: &ServiceKey) -> Result<Option<Service>> {
        match self.services.get(key, 0) {
            Ok(s) => Ok(Some(s)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(names::SERVICES)(e)),
        }
    }

    pub fn put_service(&mut self, key: ServiceKey, svc: Service) -> Result<()> {
        self.services
            .insert(key, svc, 0)
            .map_err(map_err(names::SERVICES))
    }

    pub fn remove_service(&mut self, key: &ServiceKey) -> Result<()> {
        match self.services.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(names::SERVICES)(e)),
        }
    }

    pub fn services(&self) -> Result<Vec<(ServiceKey, Service)>> {
        self.services
            .iter()
            .collect::<std::result::Result<_, _>>()
            .map_err(map_err(names::SERVICES))
    }

    pub fn service6(&self, key: &ServiceKey<Addr6>) -> Result<Option<Service>> {
        match self.services6.get(key, 0) {
            Ok(s) => Ok(Some(s)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(names::SERVICES6)(e)),
        }
    }

    pub fn put_service6(&mut self, key: ServiceKey<Addr6>, svc: Service) -> Result<()> {
        self.services6
            .insert(key, svc, 0)
            .map_err(map_err(names::SERVICES6))
    }

    pub fn remove_service6(&mut self, key: &ServiceKey<Addr6>) -> Result<()> {
        match self.services6.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(names::SERVICES6)(e)),
        }
    }

    pub fn services6(&self) -> Result<Vec<(ServiceKey<Addr6>, Service)>> {
        self.services6
            .iter()
            .collect::<std::result::Result<_, _>>()
            .map_err(map_err(names::SERVICES6))
    }

    /// Allows redirects to `ifindex` (an interface with our program).
    pub fn add_egress(&mut self, ifindex: u32) -> Result<()> {
        self.devmap
            .insert(ifindex, ifindex, None, 0)
            .map_err(|e| ErrorKind::Devmap(e).into())
    }

    /// Every flow (client tuple -> backend): the established ones, then
    /// the half-open ones, read in batches.
    pub fn flows(&self) -> Result<Vec<(FlowKey, Flow)>> {
        let mut out = self.established_flows()?;
        out.extend(self.pending()?.iter().map(pending_flow));
        Ok(out)
    }

    /// Every flow of both families, for listings: [`flows`](Self::flows),
    /// then [`flows6`](Self::flows6).
    pub fn all_flows(&self) -> Result<Vec<FlowView>> {
        use crate::agent::ids::{ipv4_of, ipv6_of};
        let mut out: Vec<FlowView> = self
            .flows()?
            .into_iter()
            .map(|(k, flow)| FlowView {
                client: SocketAddr::new(ipv4_of(k.src_be).into(), u16::from_be(k.sport_be)),
                vip: SocketAddr::new(ipv4_of(k.dst_be).into(), u16::from_be(k.dport_be)),
                proto: k.proto,
                flow,
            })
            .collect();
        out.extend(self.flows6()?.into_iter().map(|(k, flow)| FlowView {
            client: SocketAddr::new(ipv6_of(k.src_be).into(), u16::from_be(k.sport_be)),
            vip: SocketAddr::new(ipv6_of(k.dst_be).into(), u16::from_be(k.dport_be)),
            proto: k.proto,
            flow,
        }));
        Ok(out)
    }

    /// Whether the node has an IPv6 SNAT address (`NODE6`): without one
    /// the program makes no IPv6 flow, and the IPv6 tables are not read
    /// (`PENDING6` alone is 6 MiB, read on every listing and nudge).
    pub fn has_ipv6(&self) -> bool {
        self.node6().is_ok_and(|n| n.snat != Addr6::default())
    }

    /// Every IPv6 flow: `FLOWS6`, then the half-open ones (`PENDING6`);
    /// none without an IPv6 SNAT address ([`has_ipv6`](Self::has_ipv6)).
    pub fn flows6(&self) -> Result<Vec<(FlowKey<Addr6>, Flow)>> {
        if !self.has_ipv6() {
            return Ok(Vec::new());
        }
        let mut out = self.established_flows6()?;
        out.extend(self.pending6()?.iter().map(pending_flow));
        Ok(out)
    }

    /// The established IPv6 flows (`FLOWS6`).
    pub fn established_flows6(&self) -> Result<Vec<(FlowKey<Addr6>, Flow)>> {
        use aya::maps::IterableMap as _;
        batch::entries(self.flows6.map())
            .map_err(|e| map_err(names::FLOWS6)(aya::maps::MapError::from(e)))
    }

    /// The half-open flows of both families whose slots are SNAT ports
    /// `ports` (the node's range: the only slots new flows claim). Reading
    /// a slot costs about as much whether it is in use or not, and the
    /// whole 65,536-slot array took ~19 ms on the 2-core bench machine;
    /// the nudge after an ejection waits on it. `v4`/`v6`: which family's
    /// table to read.
    pub fn pending_in(
        &self,
        ports: (u16, u16),
        v4: bool,
        v6: bool,
    ) -> Result<(Vec<PendingFlow>, Vec<PendingFlow<Addr6>>)> {
        use aya::maps::IterableMap as _;
        let (first, last) = (u32::from(ports.0), u32::from(ports.1.max(ports.0)));
        let now = monotonic_ns();
        let p4 = if v4 {
            batch::array_range(self.pending.map(), first, last)
                .map_err(|e| map_err(names::PENDING)(MapError::from(e)))?
        } else {
            Vec::new()
        };
        let p6 = if v6 && self.has_ipv6() {
            batch::array_range(self.pending6.map(), first, last)
                .map_err(|e| map_err(names::PENDING6)(MapError::from(e)))?
        } else {
            Vec::new()
        };
        Ok((live_pending(p4, now), live_pending(p6, now)))
    }

    /// The half-open IPv6 flows (`PENDING6` slots that have not expired).
    pub fn pending6(&self) -> Result<Vec<PendingFlow<Addr6>>> {
        use aya::maps::IterableMap as _;
        let now = monotonic_ns();
        let all: Vec<(u32, Pending<Addr6>)> = batch::entries(self.pending6.map())
            .map_err(|e| map_err(names::PENDING6)(aya::maps::MapError::from(e)))?;
        Ok(live_pending(all, now))
    }

    /// The established flows (`FLOWS`).
    pub fn established_flows(&self) -> Result<Vec<(FlowKey, Flow)>> {
        use aya::maps::IterableMap as _;
        batch::entries(self.flows.map())
            .map_err(|e| map_err(names::FLOWS)(aya::maps::MapError::from(e)))
    }

    /// Every SNAT entry (backend side -> client): the established ones
    /// (`REVERSE`), then the half-open ones in their handshake state.
    pub fn reverse_entries(&self) -> Result<Vec<(ReverseKey, Reverse)>> {
        use aya::maps::IterableMap as _;
        let mut out: Vec<(ReverseKey, Reverse)> = batch::entries(self.reverse.map())
            .map_err(|e| map_err(names::REVERSE)(aya::maps::MapError::from(e)))?;
        out.extend(self.pending()?.iter().map(|p| {
            (
                ReverseKey {
                    backend_be: p.backend_be,
                    snat_be: self.node().map_or(0, |n| n.snat_be),
                    bport_be: p.bport_be,
                    nat_port_be: p.nat_port_be(),
                    proto: p.proto,
                    _pad: [0; 3],
                },
                Reverse {
                    client_be: p.client_be,
                    vip_be: p.vip_be,
                    cport_be: p.cport_be,
                    vport_be: p.vport_be,
                    backend_id: p.backend_id,
                    service_id: p.service_id,
                    state: p.state,
                    fins: 0,
                    data: 0,
                    _pad: 0,
                    fin_ack: 0,
                    seen: 0,
                    created_ns: p.created_ns,
                    nh: NextHop::default(),
                },
            )
        }));
        Ok(out)
    }

    /// Removes the established flows (of both families) idle in both
    /// directions for longer than `timeout(service_id, proto)` (`None`:
    /// never), at stamp `now` ([`now_stamp`]). Returns how many went.
    pub fn expire_idle(
        &mut self,
        now: u32,
        timeout: impl Fn(u32, u8) -> Option<std::time::Duration>,
    ) -> Result<usize> {
        let mut gone = 0;
        let flows = self.established_flows()?;
        if !flows.is_empty() {
            let snat = self.node()?.snat_be;
            let backends = self.backends_of(&flows, |_, b| Some((b.addr_be, b.port_be)));
            gone += expire_family(
                (&mut self.flows, &mut self.reverse, names::REVERSE),
                &flows,
                now,
                snat,
                |id| backends.get(&id).copied().flatten(),
                &timeout,
            )?;
        }
        let flows = if self.has_ipv6() {
            self.established_flows6()?
        } else {
            Vec::new()
        };
        if !flows.is_empty() {
            let snat = self.node6()?.snat;
            let backends = self.backends_of(&flows, |id, b| {
                Some((self.backend_addr6(id).ok()?, b.port_be))
            });
            gone += expire_family(
                (&mut self.flows6, &mut self.reverse6, names::REVERSE6),
                &flows,
                now,
                snat,
                |id| backends.get(&id).copied().flatten(),
                &timeout,
            )?;
        }
        Ok(gone)
    }

    /// Each backend of `flows` once, as `side` reads it (its address and
    /// port as the reverse key holds them).
    fn backends_of<K, A: Addr>(
        &self,
        flows: &[(K, Flow)],
        side: impl Fn(u32, Backend) -> Option<(A, u16)>,
    ) -> std::collections::HashMap<u32, Option<(A, u16)>> {
        let mut backends = std::collections::HashMap::new();
        for (_, f) in flows {
            if let std::collections::hash_map::Entry::Vacant(e) = backends.entry(f.backend_id) {
                e.insert(
                    self.backend(f.backend_id)
                        .ok()
                        .and_then(|b| side(f.backend_id, b)),
                );
            }
        }
        backends
    }

    /// The half-open flows (`PENDING` slots that have not expired).
    pub fn pending(&self) -> Result<Vec<PendingFlow>> {
        use aya::maps::IterableMap as _;
        let now = monotonic_ns();
        let all: Vec<(u32, Pending)> = batch::entries(self.pending.map())
            .map_err(|e| map_err(names::PENDING)(aya::maps::MapError::from(e)))?;
        Ok(live_pending(all, now))
    }

    /// Inserts a reverse entry directly: lets tests fill the SNAT port
    /// space to exercise collision handling.
    pub fn insert_reverse(&mut self, key: ReverseKey, value: Reverse) -> Result<()> {
        self.reverse
            .insert(key, value, 0)
            .map_err(map_err(names::REVERSE))
    }

    /// Forgets every flow (both tables, both families). Clients of established flows
    /// are re-selected on their next packet; used by benchmarks and
    /// operators recovering from a bad state.
    pub fn clear_flows(&mut self) -> Result<()> {
        clear(&mut self.flows, names::FLOWS)?;
        clear(&mut self.reverse, names::REVERSE)?;
        clear(&mut self.flows6, names::FLOWS6)?;
        clear(&mut self.reverse6, names::REVERSE6)?;
        for p in self.pending()? {
            self.pending
                .set(p.slot, Pending::default(), 0)
                .map_err(map_err(names::PENDING))?;
        }
        for p in self.pending6()? {
            self.pending6
                .set(p.slot, Pending::default(), 0)
                .map_err(map_err(names::PENDING6))?;
        }
        Ok(())
    }

    /// Removes every pin under `pin_dir`: detaches pinned links and frees
    /// the maps once no program uses them. For uninstall and tests.
    pub fn remove_pins(pin_dir: &Path) -> Result<()> {
        match std::fs::remove_dir_all(pin_dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(ErrorKind::Io {
                what: "removing pins",
                path: pin_dir.to_path_buf(),
                source,
            }
            .into()),
        }
    }
}

/// The slots of `all` that have not expired at `now`.
fn live_pending<A>(all: Vec<(u32, Pending<A>)>, now: u64) -> Vec<PendingFlow<A>> {
    all.into_iter()
        .filter(|(_, p)| p.expires_ns > now)
        .map(|(slot, p)| PendingFlow { slot, entry: p })
        .collect()
}

/// A half-open flow as the flow listings show it.
fn pending_flow<A: failover_common::Addr>(p: &PendingFlow<A>) -> (FlowKey<A>, Flow) {
    (
        p.flow_key(),
        Flow {
            backend_id: p.backend_id,
            service_id: p.service_id,
            nat_port_be: p.nat_port_be(),
            svc_flags: p.svc_flags,
            created_ns: p.created_ns,
            ..Flow::default()
        },
    )
}

type FlowMap<A> = HashMap<MapData, FlowKey<A>, Flow>;
type ReverseMap<A> = HashMap<MapData, ReverseKey<A>, Reverse<A>>;

/// One family's idle expiry: `flows` (its established flows) against its
/// `REVERSE` entries, and the removal of what expired. Returns how many.
fn expire_family<A: Addr>(
    (flows_map, reverse_map, reverse_name): (&mut FlowMap<A>, &mut ReverseMap<A>, &'static str),
    flows: &[(FlowKey<A>, Flow)],
    now: u32,
    snat: A,
    backend_of: impl Fn(u32) -> Option<(A, u16)>,
    timeout: impl Fn(u32, u8) -> Option<std::time::Duration>,
) -> Result<usize>
where
    FlowKey<A>: aya::Pod,
    ReverseKey<A>: aya::Pod,
    Reverse<A>: aya::Pod,
{
    use aya::maps::IterableMap as _;
    let reverse: Vec<(ReverseKey<A>, Reverse<A>)> = batch::entries(reverse_map.map())
        .map_err(|e| map_err(reverse_name)(aya::maps::MapError::from(e)))?;
    let expired = expire::expired(flows, &reverse, now, snat, backend_of, timeout);
    for e in &expired {
        if let Some(r) = &e.reverse {
            let _ = reverse_map.remove(r);
        }
        let _ = flows_map.remove(&e.flow);
    }
    Ok(expired.len())
}
