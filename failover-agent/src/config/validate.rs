//! Semantic checks on a deserialized config. Each finds every problem, not
//! just the first, and names the field path it concerns.

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, Ipv6Addr},
    time::Duration,
};

use failover_common::{MAX_BACKENDS, MAX_SERVICES, RING_MAX};

use super::{
    Backend, Bytes, Config, InferenceCheck, LoadProfile, LoadScrape, Node, Policy, Probe,
    ProbeKind, Service, UdpCheck,
};

/// Largest backend weight: keeps the Maglev permutation fill loop (which
/// runs in proportion to the weights) bounded.
pub const MAX_WEIGHT: u32 = 10_000;

/// Linux interface names are at most IFNAMSIZ - 1 bytes.
const IFNAME_MAX: usize = 15;

/// Names appear in metrics labels, audit records and CLI arguments.
const NAME_MAX: usize = 63;

/// Longest `hold_down_max` and `hold_down_decay`: longer holds a backend
/// out, or remembers its flaps, past what an operator would look for.
const HOLD_DOWN_LIMIT: Duration = Duration::from_secs(3600);

/// Longest `slow_grace`: a stream still running after an hour on a
/// backend its probes call down is not one to wait for.
const SLOW_GRACE_LIMIT: Duration = Duration::from_secs(3600);

/// Largest UDP probe payload: one datagram in a 1500-byte frame, never
/// fragmented (1500 - 20 IPv4 - 8 UDP).
pub const MAX_UDP_PAYLOAD: usize = 1472;

/// Largest expected UDP answer: the largest datagram over IPv4.
const MAX_UDP_ANSWER: usize = 65_507;

/// Probe `interval` limits: below a millisecond a prober spins; above
/// five minutes active probes detect nothing in useful time.
const INTERVAL_LIMITS: (Duration, Duration) = (Duration::from_millis(1), Duration::from_secs(300));

/// Probe `timeout` limits: a backend that takes over a minute to answer
/// its health check is down for any client, and a longer timeout only
/// delays the verdict.
const TIMEOUT_LIMITS: (Duration, Duration) = (Duration::from_millis(1), Duration::from_secs(60));

/// Longest `min_dwell`: as for the hold-downs.
const MIN_DWELL_LIMIT: Duration = Duration::from_secs(3600);

/// What validation reads from the host it runs on: the kernel's
/// ephemeral port range, which NAT ports should keep clear of
/// (docs/datapath.md, "Requirements on the edge node").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    /// `net.ipv4.ip_local_port_range`.
    pub ephemeral_ports: (u16, u16),
    /// `net.ipv4.ip_local_reserved_ports`: never handed out as ephemeral.
    pub reserved_ports: Vec<(u16, u16)>,
    /// False when the range is the kernel's default because the host's
    /// could not be read.
    pub read: bool,
}

impl Host {
    /// The kernel's default ephemeral range.
    pub const DEFAULT_EPHEMERAL_PORTS: (u16, u16) = (32_768, 60_999);
    const RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
    const RESERVED: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

    /// This host's settings, or the kernel's defaults where they cannot
    /// be read.
    pub fn current() -> Self {
        let range = std::fs::read_to_string(Self::RANGE)
            .ok()
            .and_then(|text| parse_port_range(&text));
        let reserved = std::fs::read_to_string(Self::RESERVED)
            .ok()
            .and_then(|text| parse_port_list(&text))
            .unwrap_or_default();
        Self {
            ephemeral_ports: range.unwrap_or(Self::DEFAULT_EPHEMERAL_PORTS),
            reserved_ports: if range.is_some() {
                reserved
            } else {
                Vec::new()
            },
            read: range.is_some(),
        }
    }

    /// The kernel's defaults, whatever this host says (tests).
    pub fn defaults() -> Self {
        Self {
            ephemeral_ports: Self::DEFAULT_EPHEMERAL_PORTS,
            reserved_ports: Vec::new(),
            read: false,
        }
    }

    /// Ports of `min..=max` the kernel may hand out as ephemeral ports:
    /// the first and last of them and how many, or `None`.
    fn ephemeral_overlap(&self, min: u16, max: u16) -> Option<(u16, u16, u32)> {
        let (lo, hi) = self.ephemeral_ports;
        let (from, to) = (min.max(lo), max.min(hi));
        let taken: Vec<u16> = (from..=to)
            .filter(|p| {
                !self
                    .reserved_ports
                    .iter()
                    .any(|(a, b)| (a..=b).contains(&p))
            })
            .collect();
        Some((*taken.first()?, *taken.last()?, taken.len() as u32))
    }
}

/// `"32768\t60999\n"` -> (32768, 60999).
fn parse_port_range(text: &str) -> Option<(u16, u16)> {
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    match (it.next(), it.next(), it.next()) {
        (Some(Ok(lo)), Some(Ok(hi)), None) if lo <= hi => Some((lo, hi)),
        _ => None,
    }
}

/// `"8080,9000-9010\n"` -> [(8080, 8080), (9000, 9010)]; `""` -> [].
fn parse_port_list(text: &str) -> Option<Vec<(u16, u16)>> {
    text.trim()
        .split(',')
        .filter(|item| !item.is_empty())
        .map(|item| match item.split_once('-') {
            Some((lo, hi)) => Some((lo.trim().parse().ok()?, hi.trim().parse().ok()?)),
            None => item.trim().parse().ok().map(|p| (p, p)),
        })
        .collect()
}

/// One finding of the checks: an error refuses the config, a warning is
/// printed by `validate` and logged by `run`.
pub(super) struct Issue {
    pub(super) path: String,
    pub(super) message: String,
    pub(super) warning: bool,
}

struct Checker<'h> {
    issues: Vec<Issue>,
    host: &'h Host,
}

impl Checker<'_> {
    fn fail(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.issues.push(Issue {
            path: path.into(),
            message: message.into(),
            warning: false,
        });
    }

    fn warn(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.issues.push(Issue {
            path: path.into(),
            message: message.into(),
            warning: true,
        });
    }
}

pub(super) fn check(config: &Config, host: &Host) -> Vec<Issue> {
    let mut checker = Checker {
        issues: Vec::new(),
        host,
    };
    check_node(&mut checker, &config.node);
    check_backends(&mut checker, &config.backends);
    check_services(&mut checker, config);
    check_addresses(&mut checker, config);
    checker.issues
}

/// Addresses that collide: a backend or a SNAT address that is also a
/// VIP, a backend at a SNAT address or on loopback.
fn check_addresses(c: &mut Checker, config: &Config) {
    let vip_of = |address: IpAddr| {
        config
            .services
            .iter()
            .enumerate()
            .find(|(_, s)| s.vips().any(|vip| vip == address))
            .map(|(j, s)| format!("the VIP of service {:?} (services[{j}])", s.name))
    };
    let snats = &config.node.snat_addresses;
    for (k, &snat) in snats.iter().enumerate() {
        if let Some(vip) = vip_of(snat) {
            c.fail(
                snat_path(k),
                format!(
                    "{snat} is also {vip}: backends' replies to the NAT address would meet the \
                     VIP's handling; give the node an address of its own for SNAT"
                ),
            );
        }
    }
    for (i, backend) in config.backends.iter().enumerate() {
        let path = format!("backends[{i}].address");
        let address = backend.address;
        if let Some(vip) = vip_of(address) {
            c.fail(
                path,
                format!(
                    "{address} is {vip}: traffic to this backend would come back to the \
                     load balancer; use the backend's own address"
                ),
            );
        } else if let Some(k) = snats.iter().position(|&s| s == address) {
            c.fail(
                path,
                format!(
                    "{address} is {}: the node would send NAT traffic to \
                     itself; use the backend's own address",
                    snat_path(k)
                ),
            );
        } else if address.is_loopback() {
            c.warn(
                path,
                format!(
                    "{address} is a loopback address: probes reach this node itself (and \
                     pass) while the data plane cannot forward client traffic there (it \
                     is dropped, no_route); use the backend's own address"
                ),
            );
        }
    }
}

/// The field of the `k`th SNAT address: `node.snat_addresses[k]`.
fn snat_path(k: usize) -> String {
    format!("node.snat_addresses[{k}]")
}

/// `IPv4` or `IPv6`.
fn family(address: IpAddr) -> &'static str {
    if address.is_ipv4() { "IPv4" } else { "IPv6" }
}

fn check_node(c: &mut Checker, node: &Node) {
    if node.interfaces.is_empty() {
        c.fail("node.interfaces", "at least one interface is required");
    }
    if !Node::FLOW_CAPACITY.contains(&node.flow_capacity) {
        c.fail(
            "node.flow_capacity",
            format!(
                "flow_capacity {} must be from {} to {}",
                node.flow_capacity,
                Node::FLOW_CAPACITY.start(),
                Node::FLOW_CAPACITY.end()
            ),
        );
    }
    let mut seen = BTreeSet::new();
    for (i, name) in node.interfaces.iter().enumerate() {
        let path = format!("node.interfaces[{i}]");
        if name.is_empty() || name.len() > IFNAME_MAX || name.contains(['/', ' ']) {
            c.fail(
                &path,
                format!(
                    "invalid interface name {name:?} (1 to {IFNAME_MAX} bytes, no '/' or space)"
                ),
            );
        } else if !seen.insert(name) {
            c.fail(path, format!("interface {name:?} is listed twice"));
        }
    }
    if node.snat_addresses.is_empty() {
        c.fail(
            "node.snat_addresses",
            "give the node a SNAT address (one per family its VIPs use)",
        );
    }
    for (k, &address) in node.snat_addresses.iter().enumerate() {
        let path = snat_path(k);
        check_unicast(c, &path, address);
        if let Some(j) = node.snat_addresses[..k]
            .iter()
            .position(|a| a.is_ipv4() == address.is_ipv4())
        {
            c.fail(
                path,
                format!(
                    "a second {} SNAT address (the first is node.snat_addresses[{j}]); \
                     the node has one per family",
                    family(address)
                ),
            );
        } else if address.is_ipv6() && address.is_loopback() {
            c.fail(
                path,
                format!("{address} is a loopback address: backends cannot answer it"),
            );
        }
    }
    let ports = node.snat_ports;
    if ports.min == 0 {
        c.fail(
            "node.snat_ports.min",
            "port 0 cannot be used for SNAT; start at 1 or above",
        );
    }
    if ports.min > ports.max {
        c.fail(
            "node.snat_ports.max",
            format!("max {} is below min {}", ports.max, ports.min),
        );
    } else if let Some((first, last, count)) = c.host.ephemeral_overlap(ports.min.max(1), ports.max)
    {
        let (lo, hi) = c.host.ephemeral_ports;
        let whose = if c.host.read {
            "net.ipv4.ip_local_port_range on this host"
        } else {
            "the kernel's default; this host's net.ipv4.ip_local_port_range could not be read"
        };
        let ports_text = if first == last {
            format!("port {first} is")
        } else {
            format!("{count} ports ({first}-{last}) are")
        };
        c.warn(
            "node.snat_ports",
            format!(
                "snat_ports {}-{}: {ports_text} in the kernel's ephemeral range {lo}-{hi} ({whose}); \
                 the node's own connections (the agent's probes among them) take ports \
                 from it, and one on a NAT port toward the same backend would have its \
                 replies rewritten toward a client (docs/datapath.md, \"Requirements on \
                 the edge node\"): keep the NAT ports clear of it (for example {{ min: \
                 10000, max: 32767 }} with the default range) or reserve them in \
                 net.ipv4.ip_local_reserved_ports",
                ports.min, ports.max
            ),
        );
    }
    if !node.api_socket.is_absolute() {
        c.fail(
            "node.api_socket",
            format!("{} is not an absolute path", node.api_socket.display()),
        );
    }
    if let Some(file) = &node.state_file
        && (!file.is_absolute() || file.file_name().is_none())
    {
        c.fail(
            "node.state_file",
            format!("{} is not an absolute file path", file.display()),
        );
    }
}

fn check_backends(c: &mut Checker, backends: &[Backend]) {
    if backends.len() > MAX_BACKENDS as usize {
        c.fail(
            "backends",
            format!(
                "{} backends configured; the data plane holds at most {MAX_BACKENDS}",
                backends.len()
            ),
        );
    }
    let mut first: HashMap<&str, usize> = HashMap::new();
    for (i, backend) in backends.iter().enumerate() {
        let path = format!("backends[{i}]");
        check_name(c, &format!("{path}.name"), &backend.name);
        if let Some(j) = first.get(backend.name.as_str()) {
            c.fail(
                format!("{path}.name"),
                format!(
                    "duplicate backend name {:?} (first at backends[{j}])",
                    backend.name
                ),
            );
        } else {
            first.insert(&backend.name, i);
        }
        check_unicast(c, &format!("{path}.address"), backend.address);
        if let (IpAddr::V6(_), Some(mtu)) = (backend.address, backend.path_mtu)
            && mtu < super::IPV6_MIN_MTU
            && super::PATH_MTU_RANGE.contains(&mtu)
        {
            c.fail(
                format!("{path}.path_mtu"),
                format!(
                    "path_mtu {mtu} is below IPv6's minimum link MTU {} (RFC 8200)",
                    super::IPV6_MIN_MTU
                ),
            );
        }
        if backend.port == 0 {
            c.fail(format!("{path}.port"), "port must be 1 to 65535");
        }
        for (field, value) in [
            ("cloud", &backend.cloud),
            ("region", &backend.region),
            ("jurisdiction", &backend.jurisdiction),
        ] {
            if value.trim().is_empty() {
                c.fail(
                    format!("{path}.{field}"),
                    format!("{field} must not be empty"),
                );
            }
        }
        if backend.weight == 0 || backend.weight > MAX_WEIGHT {
            c.fail(
                format!("{path}.weight"),
                format!(
                    "weight {} is out of range 1 to {MAX_WEIGHT}",
                    backend.weight
                ),
            );
        }
        if let Some(mtu) = backend.path_mtu
            && !super::PATH_MTU_RANGE.contains(&mtu)
        {
            c.fail(
                format!("{path}.path_mtu"),
                format!(
                    "path_mtu {mtu} is out of range {} to {}",
                    super::PATH_MTU_RANGE.start(),
                    super::PATH_MTU_RANGE.end()
                ),
            );
        }
    }
}

fn check_services(c: &mut Checker, config: &Config) {
    let services = &config.services;
    // Each VIP is a data-plane service: a dual-stack service takes two.
    let vips: usize = services.iter().map(|s| s.vips().count()).sum();
    if services.len() > MAX_SERVICES as usize {
        c.fail(
            "services",
            format!(
                "{} services configured; the data plane holds at most {MAX_SERVICES}",
                services.len()
            ),
        );
    } else if vips > MAX_SERVICES as usize {
        c.fail(
            "services",
            format!(
                "{vips} VIPs configured (a dual-stack service has two); the data plane \
                 holds at most {MAX_SERVICES}"
            ),
        );
    }
    let mut first_name: HashMap<&str, usize> = HashMap::new();
    let mut first_listener = HashMap::new();
    for (i, service) in services.iter().enumerate() {
        let path = format!("services[{i}]");
        check_name(c, &format!("{path}.name"), &service.name);
        if let Some(j) = first_name.get(service.name.as_str()) {
            c.fail(
                format!("{path}.name"),
                format!(
                    "duplicate service name {:?} (first at services[{j}])",
                    service.name
                ),
            );
        } else {
            first_name.insert(&service.name, i);
        }
        if service.port == 0 {
            c.fail(format!("{path}.port"), "port must be 1 to 65535");
        }
        for (field, vip) in vip_fields(service) {
            let vpath = format!("{path}.{field}");
            check_unicast(c, &vpath, vip);
            if vip.is_ipv6() && vip.is_loopback() {
                c.fail(
                    &vpath,
                    format!("{vip} is a loopback address: no client outside this node reaches it"),
                );
            }
            if config.node.snat_for(vip).is_none() {
                c.fail(
                    &vpath,
                    format!(
                        "{vip} is an {fam} VIP but node.snat_addresses has no {fam} \
                         address: the node needs one to reach {fam} backends",
                        fam = family(vip)
                    ),
                );
            }
            let listener = (vip, service.port, service.protocol);
            if let Some(&(j, other_field)) = first_listener.get(&listener) {
                let other: &Service = &services[j];
                c.fail(
                    vpath,
                    format!(
                        "{} is already served by service {:?} (services[{j}].{other_field})",
                        listener_text(vip, service),
                        other.name
                    ),
                );
            } else {
                first_listener.insert(listener, (i, field));
            }
        }
        if let (IpAddr::V6(v6), Some(_)) = (service.vip, service.vip6) {
            c.fail(
                format!("{path}.vip6"),
                format!(
                    "vip {v6} is already IPv6: a dual-stack service has an IPv4 `vip` \
                     and an IPv6 `vip6`"
                ),
            );
        }
        let pool = check_pool(c, &path, service, config);
        check_families(c, &path, service, config);
        check_probe(c, &format!("{path}.probe"), &service.probe);
        check_policy(c, &format!("{path}.policy"), &service.policy, &pool);
        check_timeouts(c, &format!("{path}.timeouts"), &service.timeouts);
    }
    check_one_probe_per_backend(c, services);
}

fn check_timeouts(c: &mut Checker, path: &str, t: &crate::config::Timeouts) {
    use crate::config::Timeouts;
    let show = |d: Duration| humantime::format_duration(d).to_string();
    for (field, value) in [
        ("tcp_half_open", t.tcp_half_open),
        ("tcp_idle", t.tcp_idle),
        ("udp_idle", t.udp_idle),
    ] {
        if !(Timeouts::MIN..=Timeouts::MAX).contains(&value) {
            c.fail(
                format!("{path}.{field}"),
                format!(
                    "{field} {} must be from {} to {}",
                    show(value),
                    show(Timeouts::MIN),
                    show(Timeouts::MAX)
                ),
            );
        }
    }
}

/// A backend has one prober, with the probe of the first service listing
/// it: another service's different probe would silently never run (a UDP
/// service behind a TCP service's probe would then go unchecked).
fn check_one_probe_per_backend(c: &mut Checker, services: &[Service]) {
    let mut first: HashMap<&str, usize> = HashMap::new();
    for (i, service) in services.iter().enumerate() {
        let mut clash: Option<(&str, usize)> = None;
        for name in &service.backends {
            match first.get(name.as_str()) {
                None => {
                    first.insert(name, i);
                }
                Some(&j) if clash.is_none() && services[j].probe != service.probe => {
                    clash = Some((name, j));
                }
                Some(_) => {}
            }
        }
        if let Some((name, j)) = clash {
            c.fail(
                format!("services[{i}].probe"),
                format!(
                    "backend {name:?} is also in service {:?} (services[{j}]), whose probe differs; \
                     a backend is probed once, so this probe would never run for it \
                     (give this service its own backend entries, at the same address if need be)",
                    services[j].name
                ),
            );
        }
    }
}

/// The VIP fields of a service with their values: `vip`, and `vip6`.
fn vip_fields(service: &Service) -> impl Iterator<Item = (&'static str, IpAddr)> {
    std::iter::once(("vip", service.vip)).chain(service.vip6.map(|v| ("vip6", IpAddr::V6(v))))
}

/// `192.0.2.1:80/tcp`, `[2001:db8::1]:80/tcp`.
fn listener_text(vip: IpAddr, service: &Service) -> String {
    format!(
        "{}/{}",
        std::net::SocketAddr::new(vip, service.port),
        service.protocol
    )
}

/// Each backend of the pool is of a family one of the service's VIPs has,
/// and each VIP has a backend of its family.
fn check_families(c: &mut Checker, path: &str, service: &Service, config: &Config) {
    let mut served = [false; 2];
    for (j, name) in service.backends.iter().enumerate() {
        let Some(backend) = config.backend(name) else {
            continue;
        };
        let address = backend.address;
        if let Some(vip) = service.vip_for(address) {
            served[usize::from(vip.is_ipv6())] = true;
            continue;
        }
        let vips: Vec<String> = vip_fields(service)
            .map(|(field, vip)| format!("{field} {vip}"))
            .collect();
        let hint = if address.is_ipv6() {
            "; give the service an IPv6 `vip6` to make it dual-stack"
        } else {
            ""
        };
        c.fail(
            format!("{path}.backends[{j}]"),
            format!(
                "backend {name:?} has an {} address ({address}) but the service has no {} \
                 VIP ({}): a VIP's traffic goes to backends of its own family{hint}",
                family(address),
                family(address),
                vips.join(", ")
            ),
        );
    }
    if service.backends.is_empty() {
        return;
    }
    for (field, vip) in vip_fields(service) {
        let all_resolved = service.backends.iter().all(|n| config.backend(n).is_some());
        if all_resolved && !served[usize::from(vip.is_ipv6())] {
            c.fail(
                format!("{path}.{field}"),
                format!(
                    "no backend of the pool has an {} address: this VIP would send \
                     nothing anywhere",
                    family(vip)
                ),
            );
        }
    }
}

/// Checks the service's backend references and returns those that resolve.
fn check_pool<'c>(
    c: &mut Checker,
    path: &str,
    service: &Service,
    config: &'c Config,
) -> Vec<&'c Backend> {
    if service.backends.is_empty() {
        c.fail(format!("{path}.backends"), "list at least one backend");
    }
    let mut pool = Vec::new();
    let mut seen = BTreeSet::new();
    for (j, name) in service.backends.iter().enumerate() {
        let item = format!("{path}.backends[{j}]");
        if !seen.insert(name) {
            c.fail(item, format!("backend {name:?} is listed twice"));
        } else if let Some(backend) = config.backend(name) {
            pool.push(backend);
        } else {
            c.fail(
                item,
                format!("unknown backend {name:?} (not defined under backends)"),
            );
        }
    }
    pool
}

fn check_duration(
    c: &mut Checker,
    path: &str,
    field: &str,
    value: Duration,
    (min, max): (Duration, Duration),
) {
    if !(min..=max).contains(&value) {
        c.fail(
            format!("{path}.{field}"),
            format!(
                "{field} {} must be from {} to {}",
                show(value),
                show(min),
                show(max)
            ),
        );
    }
}

/// A duration as written: `1000h` rather than humantime's `1month 11days
/// 5h 26m 24s` for long whole hours.
fn show(d: Duration) -> String {
    let secs = d.as_secs();
    if d.subsec_nanos() == 0 && secs >= 24 * 3600 && secs.is_multiple_of(3600) {
        format!("{}h", secs / 3600)
    } else {
        humantime::format_duration(d).to_string()
    }
}

fn check_probe(c: &mut Checker, path: &str, probe: &Probe) {
    check_duration(c, path, "interval", probe.interval, INTERVAL_LIMITS);
    check_duration(c, path, "timeout", probe.timeout, TIMEOUT_LIMITS);
    check_duration(
        c,
        path,
        "min_dwell",
        probe.min_dwell,
        (Duration::ZERO, MIN_DWELL_LIMIT),
    );
    if probe.rise == 0 {
        c.fail(format!("{path}.rise"), "rise must be at least 1");
    }
    if probe.fall == 0 {
        c.fail(format!("{path}.fall"), "fall must be at least 1");
    }
    check_hold_down(c, path, probe);
    if let Some(load) = &probe.load {
        check_load(c, &format!("{path}.load"), load);
    }

    match &probe.kind {
        ProbeKind::Tcp(_) | ProbeKind::Grpc(_) => {}
        ProbeKind::Http(http) => {
            if let Some(http_path) = &http.path {
                check_http_path(c, path, http_path);
            }
            if let Some(status) = http.expect_status
                && !(100..=599).contains(&status)
            {
                c.fail(
                    format!("{path}.expect_status"),
                    format!("status {status} is not an HTTP status (100 to 599)"),
                );
            }
        }
        ProbeKind::Inference(inference) => check_inference(c, path, probe, inference),
        ProbeKind::Udp(udp) => check_udp(c, path, udp),
    }
}

/// Load scrape `interval` limits: faster than 100 ms costs the model
/// server more than it tells; slower than a minute follows no load.
const LOAD_INTERVAL_LIMITS: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(60));

/// `rebuild_interval` limits: at most ten rebuilds a second per service,
/// at least one every ten minutes.
const REBUILD_INTERVAL_LIMITS: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(600));

/// Largest `queue_high`: no engine queues more requests than this.
const QUEUE_HIGH_MAX: f64 = 100_000.0;

fn check_load(c: &mut Checker, path: &str, load: &LoadScrape) {
    check_http_path(c, path, &load.path);
    check_duration(c, path, "interval", load.interval, LOAD_INTERVAL_LIMITS);
    check_duration(
        c,
        path,
        "rebuild_interval",
        load.rebuild_interval,
        REBUILD_INTERVAL_LIMITS,
    );
    // The range checks also refuse NaN.
    if !(0.0..1.0).contains(&load.min_change) {
        c.fail(
            format!("{path}.min_change"),
            format!(
                "min_change {} must be at least 0 and below 1 (the relative change of \
                 the load factor that rewrites a weight)",
                load.min_change
            ),
        );
    }
    if !(load.min_factor > 0.0 && load.min_factor <= 1.0) {
        c.fail(
            format!("{path}.min_factor"),
            format!(
                "min_factor {} must be above 0 and at most 1 (the share of its weight \
                 the most loaded backend keeps)",
                load.min_factor
            ),
        );
    }
    if let Some(q) = load.queue_high
        && !(1.0..=QUEUE_HIGH_MAX).contains(&q)
    {
        c.fail(
            format!("{path}.queue_high"),
            format!("queue_high {q} must be from 1 to {QUEUE_HIGH_MAX} waiting requests"),
        );
    }
    if let Some(k) = load.kv_high
        && !(k > 0.0 && k <= 1.0)
    {
        c.fail(
            format!("{path}.kv_high"),
            format!("kv_high {k} must be above 0 and at most 1 (a KV-cache fill)"),
        );
    }
    match (load.profile, &load.metrics) {
        (LoadProfile::Custom, None) => c.fail(
            format!("{path}.metrics"),
            "a custom profile names its metrics: metrics: {waiting: NAME, running: NAME, kv: NAME}",
        ),
        (LoadProfile::Custom, Some(m)) => {
            let names = [
                ("waiting", Some(&m.waiting)),
                ("running", m.running.as_ref()),
                ("kv", m.kv.as_ref()),
            ];
            for (field, name) in names {
                if let Some(name) = name
                    && !is_metric_name(name)
                {
                    c.fail(
                        format!("{path}.metrics.{field}"),
                        format!(
                            "{name:?} is not a Prometheus metric name ([a-zA-Z_:][a-zA-Z0-9_:]*)"
                        ),
                    );
                }
            }
            if load.queue_high.is_none() {
                c.fail(
                    format!("{path}.queue_high"),
                    "a custom profile sets its threshold: queue_high (waiting requests at \
                     which its weight falls fastest)",
                );
            }
            if m.kv.is_some() && load.kv_high.is_none() {
                c.fail(
                    format!("{path}.kv_high"),
                    "a custom profile with a kv metric sets its threshold: kv_high (0..1)",
                );
            }
        }
        (profile, Some(_)) => c.fail(
            format!("{path}.metrics"),
            format!(
                "metrics are named only by a custom profile; {profile} reads its own \
                 (use profile: custom to name others)"
            ),
        ),
        (_, None) => {}
    }
    if load.kv_high.is_some() && load.names().is_some_and(|n| n.kv.is_none()) {
        c.warn(
            format!("{path}.kv_high"),
            format!(
                "kv_high has no effect: profile {} reads no KV-cache metric",
                load.profile
            ),
        );
    }
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`.
fn is_metric_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_' || b == b':')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
}

fn check_http_path(c: &mut Checker, path: &str, http_path: &str) {
    if !http_path.starts_with('/') {
        c.fail(
            format!("{path}.path"),
            format!("path {http_path:?} must start with '/'"),
        );
    }
}

fn check_inference(c: &mut Checker, path: &str, probe: &Probe, inference: &InferenceCheck) {
    if let Some(prefix) = &inference.path {
        check_http_path(c, path, prefix);
    }
    match &inference.model {
        None => c.fail(
            format!("{path}.model"),
            "an inference probe needs the model that must be loaded",
        ),
        Some(model) if model.trim().is_empty() => {
            c.fail(format!("{path}.model"), "model must not be empty");
        }
        Some(_) => {}
    }
    match inference.ttft_budget {
        Some(budget) if budget.is_zero() => c.fail(
            format!("{path}.ttft_budget"),
            "ttft_budget must be greater than 0",
        ),
        Some(budget) if budget > probe.timeout => c.fail(
            format!("{path}.ttft_budget"),
            format!(
                "ttft_budget {} is above timeout {}: the probe would time out before \
                 it could find the backend slow",
                humantime::format_duration(budget),
                humantime::format_duration(probe.timeout)
            ),
        ),
        _ => {}
    }
    if let Some(every) = inference.generation_interval
        && every < probe.interval
    {
        c.fail(
            format!("{path}.generation_interval"),
            format!(
                "generation_interval {} is below the probe's interval {}: a generation \
                 runs at most once a probe",
                humantime::format_duration(every),
                humantime::format_duration(probe.interval)
            ),
        );
    }
    if let Some(budget) = inference.wedge_budget
        && !(Duration::from_millis(50)..=Duration::from_secs(60)).contains(&budget)
    {
        c.fail(
            format!("{path}.wedge_budget"),
            format!(
                "wedge_budget {} must be between 50ms and 60s (how long a backend with \
                 waiting requests may send nothing)",
                humantime::format_duration(budget)
            ),
        );
    }
    if inference.wedge_min_flows == Some(0) {
        c.fail(
            format!("{path}.wedge_min_flows"),
            "wedge_min_flows must be at least 1",
        );
    }
    if let Some(factor) = inference.degraded_weight
        && !(factor > 0.0 && factor <= 1.0)
    {
        c.fail(
            format!("{path}.degraded_weight"),
            format!(
                "degraded_weight {factor} must be above 0 and at most 1 (the share of \
                 its weight a degraded backend keeps)"
            ),
        );
    }
    if let Some(prefix) = &inference.path {
        let trimmed = prefix.trim_end_matches('/');
        if let Some(route) = ["/v1/chat/completions", "/v1/models", "/v1"]
            .into_iter()
            .find(|route| trimmed.ends_with(route))
        {
            c.fail(
                format!("{path}.path"),
                format!(
                    "an inference probe's path is the prefix its OpenAI routes sit \
                     under (it adds /v1/models and /v1/chat/completions itself), so \
                     {prefix:?} would probe {trimmed}/v1/models; leave path out for \
                     routes at the root, or give only the prefix before {route}"
                ),
            );
        }
    }
}

fn check_bytes(c: &mut Checker, path: &str, field: &str, value: &Bytes, len: (usize, usize)) {
    let (min, max) = len;
    match value.to_vec() {
        None => c.fail(
            format!("{path}.{field}"),
            format!("{field} hex must be pairs of hex digits (0-9, a-f), nothing else"),
        ),
        Some(b) if b.len() < min || b.len() > max => c.fail(
            format!("{path}.{field}"),
            format!("{field} is {} bytes; {min} to {max} allowed", b.len()),
        ),
        Some(_) => {}
    }
}

fn check_udp(c: &mut Checker, path: &str, udp: &UdpCheck) {
    match &udp.payload {
        None => c.fail(
            format!("{path}.payload"),
            "a udp probe needs the payload it sends",
        ),
        Some(p) => check_bytes(c, path, "payload", p, (1, MAX_UDP_PAYLOAD)),
    }
    if let Some(e) = &udp.expect {
        check_bytes(c, path, "expect", e, (0, MAX_UDP_ANSWER));
    }
    if let Some(e) = &udp.expect_prefix {
        check_bytes(c, path, "expect_prefix", e, (1, MAX_UDP_ANSWER));
    }
    if udp.expect.is_some() && udp.expect_prefix.is_some() {
        c.fail(
            format!("{path}.expect_prefix"),
            "set expect (the whole answer) or expect_prefix (its start), not both",
        );
    }
}

fn check_hold_down(c: &mut Checker, path: &str, probe: &Probe) {
    let show = |d: Duration| humantime::format_duration(d).to_string();
    let limit = show(HOLD_DOWN_LIMIT);
    if probe.hold_down_max > HOLD_DOWN_LIMIT {
        c.fail(
            format!("{path}.hold_down_max"),
            format!(
                "hold_down_max {} is above the limit of {limit}",
                show(probe.hold_down_max)
            ),
        );
    } else if probe.hold_down > probe.hold_down_max {
        c.fail(
            format!("{path}.hold_down_max"),
            format!(
                "hold_down_max {} is below hold_down {}",
                show(probe.hold_down_max),
                show(probe.hold_down)
            ),
        );
    }
    if probe.hold_down_decay.is_zero() || probe.hold_down_decay > HOLD_DOWN_LIMIT {
        c.fail(
            format!("{path}.hold_down_decay"),
            format!(
                "hold_down_decay {} must be greater than 0 and at most {limit}",
                show(probe.hold_down_decay)
            ),
        );
    }
}

fn check_policy(c: &mut Checker, path: &str, policy: &Policy, pool: &[&Backend]) {
    // The range check also rejects NaN.
    if !(1.0..=f64::MAX).contains(&policy.overprovisioning) {
        c.fail(
            format!("{path}.overprovisioning"),
            format!(
                "overprovisioning {} must be a number >= 1.0",
                policy.overprovisioning
            ),
        );
    }
    if !(0.0..1.0).contains(&policy.standby_share) {
        c.fail(
            format!("{path}.standby_share"),
            format!("standby_share {} must be in [0, 1)", policy.standby_share),
        );
    }
    let ring = policy.ring_size;
    if ring as usize > RING_MAX || !is_prime(ring) {
        c.fail(
            format!("{path}.ring_size"),
            format!("ring_size {ring} must be a prime no larger than {RING_MAX}"),
        );
    } else if (ring as usize) < pool.len() {
        c.fail(
            format!("{path}.ring_size"),
            format!(
                "ring_size {ring} is smaller than the {} backends",
                pool.len()
            ),
        );
    }
    for (field, values) in [
        ("allowed_jurisdictions", &policy.allowed_jurisdictions),
        ("allowed_regions", &policy.allowed_regions),
    ] {
        for (k, value) in values.iter().enumerate() {
            if value.trim().is_empty() {
                c.fail(format!("{path}.{field}[{k}]"), "must not be empty");
            }
        }
    }
    if policy.slow_grace > SLOW_GRACE_LIMIT {
        c.fail(
            format!("{path}.slow_grace"),
            format!(
                "slow_grace {} is above the limit of {}",
                humantime::format_duration(policy.slow_grace),
                humantime::format_duration(SLOW_GRACE_LIMIT)
            ),
        );
    }
    let admitted = pool.iter().filter(|backend| policy.admits(backend)).count();
    if policy.min_healthy == 0 {
        c.fail(
            format!("{path}.min_healthy"),
            "min_healthy must be at least 1",
        );
    } else if admitted > 0 && policy.min_healthy as usize > admitted {
        c.fail(
            format!("{path}.min_healthy"),
            format!(
                "min_healthy {} is more than the {admitted} backends the policy admits",
                policy.min_healthy
            ),
        );
    }
    if !pool.is_empty() && admitted == 0 {
        let names: Vec<&str> = pool.iter().map(|backend| backend.name.as_str()).collect();
        c.fail(
            path.to_owned(),
            format!(
                "sovereignty policy ({}) admits none of the service's backends ({}); \
                 the service could never take traffic",
                describe_policy(policy),
                names.join(", ")
            ),
        );
    }
}

fn describe_policy(policy: &Policy) -> String {
    let mut parts = Vec::new();
    if !policy.allowed_jurisdictions.is_empty() {
        parts.push(format!(
            "allowed_jurisdictions [{}]",
            policy.allowed_jurisdictions.join(", ")
        ));
    }
    if !policy.allowed_regions.is_empty() {
        parts.push(format!(
            "allowed_regions [{}]",
            policy.allowed_regions.join(", ")
        ));
    }
    if !policy.required_labels.is_empty() {
        let labels: Vec<String> = policy
            .required_labels
            .iter()
            .map(|(key, value)| format!("{key}={value}"))
            .collect();
        parts.push(format!("required_labels {{{}}}", labels.join(", ")));
    }
    parts.join("; ")
}

fn check_name(c: &mut Checker, path: &str, name: &str) {
    let valid = !name.is_empty()
        && name.len() <= NAME_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !valid {
        c.fail(
            path,
            format!("invalid name {name:?} (1 to {NAME_MAX} of A-Z a-z 0-9 - _ .)"),
        );
    }
}

/// An address the data plane can send to or answer from: unicast, and
/// for IPv6 global in scope and written as IPv6.
fn check_unicast(c: &mut Checker, path: &str, address: IpAddr) {
    match address {
        IpAddr::V4(a) => {
            if a.is_unspecified() || a.is_multicast() || a.is_broadcast() {
                c.fail(path, format!("{a} is not a unicast address"));
            }
        }
        IpAddr::V6(a) => {
            if let Some(why) = ipv6_unusable(a) {
                c.fail(path, format!("{a} {why}"));
            }
        }
    }
}

/// Why an IPv6 address cannot be a VIP, backend or SNAT address, if so.
/// Loopback is left to the callers (a backend on it only warns).
fn ipv6_unusable(a: Ipv6Addr) -> Option<String> {
    let first = a.segments()[0];
    if a.is_unspecified() {
        Some("is the unspecified address, not a unicast one".to_owned())
    } else if a.is_multicast() {
        Some("is a multicast address (ff00::/8), not a unicast one".to_owned())
    } else if first & 0xffc0 == 0xfe80 {
        Some(
            "is link-local (fe80::/10): it names no host without an interface scope, \
             and the data plane routes by address alone; use a global or unique-local one"
                .to_owned(),
        )
    } else if let Some(v4) = a.to_ipv4_mapped() {
        Some(format!(
            "is an IPv4-mapped address (::ffff:0:0/96): write the IPv4 address {v4} instead"
        ))
    } else if first & 0xffc0 == 0xfec0 {
        Some("is site-local (fec0::/10, deprecated by RFC 3879); use a unique-local one".to_owned())
    } else if a.segments()[..6] == [0; 6] && !a.is_loopback() {
        Some(
            "is IPv4-compatible (::/96, deprecated by RFC 4291); write the IPv4 address instead"
                .to_owned(),
        )
    } else {
        None
    }
}

pub(super) fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let n = u64::from(n);
    let mut d = 2;
    while d * d <= n {
        if n % d == 0 {
            return false;
        }
        d += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::{is_prime, parse_port_list, parse_port_range};

    #[test]
    fn kernel_port_settings_parse() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some((32_768, 60_999)));
        assert_eq!(parse_port_range("1024 65535"), Some((1024, 65_535)));
        assert_eq!(parse_port_range("60999 32768"), None);
        assert_eq!(parse_port_range("x"), None);
        assert_eq!(parse_port_list("\n"), Some(vec![]));
        assert_eq!(
            parse_port_list("8080,9000-9010\n"),
            Some(vec![(8080, 8080), (9000, 9010)])
        );
        assert_eq!(parse_port_list("80,x"), None);
    }

    #[test]
    fn primes() {
        let small: Vec<u32> = (0..30).filter(|&n| is_prime(n)).collect();
        assert_eq!(small, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
        assert!(is_prime(65_537));
        assert!(!is_prime(65_535));
        assert!(is_prime(u32::MAX - 4)); // 4294967291, the largest 32-bit prime
    }
}
