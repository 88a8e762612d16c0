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
mod nudge;
mod rings;

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, DevMapHash, HashMap, MapData, MapError, PerCpuArray, ProgramArray},
    programs::{ProgramError, Xdp},
};
use failover_common::{
    Backend, BackendStats, Flow, FlowKey, NextHop, Node, Pending, Reverse, ReverseKey, Ring,
    Service, ServiceKey, ServiceStats, VipFilter, names,
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

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| ErrorKind::Map { map, source }.into()
}

/// A live `PENDING` slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingFlow {
    pub slot: u32,
    pub entry: Pending,
}

impl std::ops::Deref for PendingFlow {
    type Target = Pending;
    fn deref(&self) -> &Pending {
        &self.entry
    }
}

impl PendingFlow {
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

    /// As [`load`](Self::load), with `flow_capacity` entries in `FLOWS` and
    /// `REVERSE` when they are created. Maps already pinned keep their
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
            .load(OBJECT)
            .map_err(ErrorKind::Load)?;
        for name in [
            names::PROGRAM,
            names::PASS_PROGRAM,
            names::ICMP_PROGRAM,
            names::NEW_TCP_PROGRAM,
            names::V6_PROGRAM,
            names::NEW_TCP6_PROGRAM,
        ] {
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
        for (slot, name) in [
            (failover_common::JUMP_ICMP, names::ICMP_PROGRAM),
            (failover_common::JUMP_NEW_TCP, names::NEW_TCP_PROGRAM),
            (failover_common::JUMP_V6, names::V6_PROGRAM),
            (failover_common::JUMP_NEW_TCP6, names::NEW_TCP6_PROGRAM),
        ] {
            let fd = ebpf
                .program(name)
                .ok_or(ErrorKind::Program(ProgramError::NotLoaded))?
                .fd()
                .map_err(ErrorKind::Program)?;
            jumps.set(slot, fd, 0).map_err(map_err(names::JUMPS))?;
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

    /// Replaces the VIP pre-filter with exactly `vips`, in one write.
    pub fn set_vips(&mut self, vips: impl IntoIterator<Item = Ipv4Addr>) -> Result<()> {
        let mut f = Box::new(VipFilter::empty());
        for v in vips {
            f.insert(u32::from(v).to_be());
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

    /// The MSS clamped into handshakes toward backend `id` (`path_mtu`
    /// less 40; 0: none). Written before the backend enters a ring.
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
        out.extend(self.pending()?.iter().map(|p| {
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
        }));
        Ok(out)
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

    /// Removes the established flows idle in both directions for longer
    /// than `timeout(service_id, proto)` (`None`: never), at stamp `now`
    /// ([`now_stamp`]). Returns how many went.
    pub fn expire_idle(
        &mut self,
        now: u32,
        timeout: impl Fn(u32, u8) -> Option<std::time::Duration>,
    ) -> Result<usize> {
        use aya::maps::IterableMap as _;
        let flows = self.established_flows()?;
        if flows.is_empty() {
            return Ok(0);
        }
        let reverse: Vec<(ReverseKey, Reverse)> = batch::entries(self.reverse.map())
            .map_err(|e| map_err(names::REVERSE)(aya::maps::MapError::from(e)))?;
        let snat = self.node()?.snat_be;
        let mut backends = std::collections::HashMap::new();
        for (_, f) in &flows {
            if let std::collections::hash_map::Entry::Vacant(e) = backends.entry(f.backend_id) {
                e.insert(self.backend(f.backend_id).ok());
            }
        }
        let gone = expire::expired(
            &flows,
            &reverse,
            now,
            snat,
            |id| {
                backends
                    .get(&id)
                    .copied()
                    .flatten()
                    .map(|b| (b.addr_be, b.port_be))
            },
            timeout,
        );
        for e in &gone {
            if let Some(r) = &e.reverse {
                let _ = self.reverse.remove(r);
            }
            let _ = self.flows.remove(&e.flow);
        }
        Ok(gone.len())
    }

    /// The half-open flows (`PENDING` slots that have not expired).
    pub fn pending(&self) -> Result<Vec<PendingFlow>> {
        use aya::maps::IterableMap as _;
        let now = monotonic_ns();
        let all: Vec<(u32, Pending)> = batch::entries(self.pending.map())
            .map_err(|e| map_err(names::PENDING)(aya::maps::MapError::from(e)))?;
        Ok(all
            .into_iter()
            .filter(|(_, p)| p.expires_ns > now)
            .map(|(slot, p)| PendingFlow { slot, entry: p })
            .collect())
    }

    /// Inserts a reverse entry directly: lets tests fill the SNAT port
    /// space to exercise collision handling.
    pub fn insert_reverse(&mut self, key: ReverseKey, value: Reverse) -> Result<()> {
        self.reverse
            .insert(key, value, 0)
            .map_err(map_err(names::REVERSE))
    }

    /// Forgets every flow (both tables). Clients of established flows
    /// are re-selected on their next packet; used by benchmarks and
    /// operators recovering from a bad state.
    pub fn clear_flows(&mut self) -> Result<()> {
        let keys: Vec<FlowKey> = self
            .flows
            .keys()
            .collect::<std::result::Result<_, _>>()
            .map_err(map_err(names::FLOWS))?;
        for k in keys {
            let _ = self.flows.remove(&k);
        }
        let keys: Vec<ReverseKey> = self
            .reverse
            .keys()
            .collect::<std::result::Result<_, _>>()
            .map_err(map_err(names::REVERSE))?;
        for k in keys {
            let _ = self.reverse.remove(&k);
        }
        for p in self.pending()? {
            self.pending
                .set(p.slot, Pending::default(), 0)
                .map_err(map_err(names::PENDING))?;
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
