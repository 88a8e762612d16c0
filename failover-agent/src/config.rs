//! The agent's YAML configuration: types, loading, validation and diffs.
//!
//! Every error names the field path (`services[1].policy.overprovisioning`)
//! and its line. Syntax and type errors come from the deserializer; the
//! semantic checks in `validate` run on the typed config and are all
//! reported at once, so an operator fixes a file in one pass.

mod bytes;
mod diff;
mod lines;
mod validate;

use std::{
    collections::BTreeMap,
    fmt,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

pub use bytes::Bytes;
pub use diff::{BackendChange, ConfigDiff, ServiceChange, diff};
pub use validate::{MAX_UDP_PAYLOAD, MAX_WEIGHT};

/// Reads and validates the config file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text, &path.display().to_string())
}

/// Parses and validates `text`; `origin` names the source in error messages.
pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
    let deserializer = serde_norway::Deserializer::from_str(text);
    let config: Config = serde_path_to_error::deserialize(deserializer)
        .map_err(|error| ConfigError::Invalid(vec![syntax_error(error, text, origin)]))?;
    let issues = validate::check(&config);
    if issues.is_empty() {
        return Ok(config);
    }
    let index = lines::LineIndex::build(text);
    let mut errors: Vec<FieldError> = issues
        .into_iter()
        .map(|issue| FieldError {
            origin: origin.to_owned(),
            line: index.line(&issue.path),
            field: issue.path,
            message: issue.message,
        })
        .collect();
    // Stable: issues on one line keep the order the checks found them in.
    errors.sort_by_key(|error| error.line);
    Err(ConfigError::Invalid(errors))
}

fn syntax_error(
    error: serde_path_to_error::Error<serde_norway::Error>,
    text: &str,
    origin: &str,
) -> FieldError {
    let path = error.path().to_string();
    let field = if path == "." { String::new() } else { path };
    let inner = error.into_inner();
    let mut message = inner.to_string();
    let line = match inner.location() {
        Some(location) => {
            // serde_norway appends the location; we print it in front instead.
            let at = format!(" at line {} column {}", location.line(), location.column());
            message = message.replacen(&at, "", 1);
            location.line()
        }
        None => lines::LineIndex::build(text).line(&field),
    };
    FieldError {
        origin: origin.to_owned(),
        line,
        message: strip_path_prefix(&message, &field).to_owned(),
        field,
    }
}

/// `serde_norway` prefixes messages with the path of the map it was in,
/// which may be an ancestor of the full path `serde_path_to_error` reports.
fn strip_path_prefix<'m>(message: &'m str, field: &str) -> &'m str {
    let mut candidate = field;
    while !candidate.is_empty() {
        if let Some(rest) = message
            .strip_prefix(candidate)
            .and_then(|rest| rest.strip_prefix(": "))
        {
            return rest;
        }
        candidate = candidate
            .rfind(['.', '['])
            .map_or("", |cut| &candidate[..cut]);
    }
    message
}

/// Why a config was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read config: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// One entry per problem, in line order; never empty.
    #[error("{}", DisplayList(.0))]
    Invalid(Vec<FieldError>),
}

impl ConfigError {
    /// The field errors, or none when the file could not be read.
    pub fn errors(&self) -> &[FieldError] {
        match self {
            Self::Read { .. } => &[],
            Self::Invalid(errors) => errors,
        }
    }
}

struct DisplayList<'a>(&'a [FieldError]);

impl fmt::Display for DisplayList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

/// One problem at one place: `origin:line: field: message`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// The file (or other source) the config came from.
    pub origin: String,
    /// 1-based line of the field, or of its closest ancestor when the
    /// field itself is missing.
    pub line: usize,
    /// Field path such as `services[0].vip`; empty for the document root.
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.origin, self.line)?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for FieldError {}

impl Config {
    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.iter().find(|service| service.name == name)
    }

    pub fn backend(&self, name: &str) -> Option<&Backend> {
        self.backends.iter().find(|backend| backend.name == name)
    }
}

impl Policy {
    /// Whether the sovereignty rules let this service ever reach `backend`.
    /// The planner must never place a backend in a ring unless this holds.
    pub fn admits(&self, backend: &Backend) -> bool {
        (self.allowed_jurisdictions.is_empty()
            || self.allowed_jurisdictions.contains(&backend.jurisdiction))
            && (self.allowed_regions.is_empty() || self.allowed_regions.contains(&backend.region))
            && self
                .required_labels
                .iter()
                .all(|(key, value)| backend.labels.get(key) == Some(value))
    }

    /// Whether any sovereignty rule is set at all.
    pub fn is_restricted(&self) -> bool {
        !(self.allowed_jurisdictions.is_empty()
            && self.allowed_regions.is_empty()
            && self.required_labels.is_empty())
    }
}

/// Addresses parse with a message that quotes the bad text; the standard
/// one ("invalid IPv4 address syntax") does not.
mod ipv4 {
    use std::{fmt, net::Ipv4Addr};

    use serde::{
        Deserializer,
        de::{Error, Visitor},
    };

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Ipv4Addr, D::Error> {
        // Parsing inside the visitor, not after it, lets the YAML
        // deserializer stamp the error with the scalar's own line.
        d.deserialize_str(Ipv4Visitor)
    }

    struct Ipv4Visitor;

    impl Visitor<'_> for Ipv4Visitor {
        type Value = Ipv4Addr;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an IPv4 address")
        }

        fn visit_str<E: Error>(self, text: &str) -> Result<Ipv4Addr, E> {
            text.parse()
                .map_err(|_| E::custom(format_args!("invalid IPv4 address {text:?}")))
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node: Node,
    pub services: Vec<Service>,
    pub backends: Vec<Backend>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Node {
    /// Interfaces the XDP program is attached to (client and backend legs).
    pub interfaces: Vec<String>,
    #[serde(default)]
    pub xdp_mode: XdpMode,
    /// Source address of traffic toward backends.
    #[serde(deserialize_with = "ipv4::deserialize")]
    pub snat_address: Ipv4Addr,
    pub snat_ports: PortRange,
    #[serde(default = "default_pin_path")]
    pub pin_path: PathBuf,
    /// Entries in each established flow table (`FLOWS`, `REVERSE`).
    #[serde(default = "default_flow_capacity")]
    pub flow_capacity: u32,
    /// Seed of the flow hash. Equal on every edge node of a fleet, so that
    /// all of them send a client tuple to the same backend.
    #[serde(default)]
    pub hash_seed: u32,
    /// Prometheus metrics, `/healthz` and `/readyz` (read only); `null`
    /// turns the listener off.
    #[serde(default = "default_metrics_address")]
    pub metrics_address: Option<std::net::SocketAddr>,
    /// Unix socket of the control API (mode 0600).
    #[serde(default = "default_api_socket")]
    pub api_socket: PathBuf,
    /// Where operator drains and overrides are kept across restarts;
    /// unset: [`Node::state_file`]'s default, one file per pin path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_file: Option<PathBuf>,
}

impl Node {
    /// The operator state file: `state_file`, or
    /// `/var/lib/failover/<last component of pin_path>.state.json`
    /// (bpffs, where the pins live, holds no regular files).
    pub fn state_file(&self) -> PathBuf {
        self.state_file.clone().unwrap_or_else(|| {
            let name = self
                .pin_path
                .file_name()
                .map_or_else(|| "failover".into(), |n| n.to_string_lossy());
            PathBuf::from(STATE_DIR).join(format!("{name}.state.json"))
        })
    }
}

/// Where state files go by default.
pub const STATE_DIR: &str = "/var/lib/failover";

fn default_flow_capacity() -> u32 {
    failover_common::FLOWS_MAX
}

impl Node {
    /// Limits of `flow_capacity`: at 4M flows the tables take about 1 GiB.
    pub const FLOW_CAPACITY: std::ops::RangeInclusive<u32> = 4_096..=4_194_304;
}

fn default_pin_path() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/failover")
}

/// Default metrics listener: loopback only.
pub const DEFAULT_METRICS_ADDRESS: std::net::SocketAddr = std::net::SocketAddr::V4(
    std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 9108),
);

#[allow(clippy::unnecessary_wraps)] // serde default of an Option field
fn default_metrics_address() -> Option<std::net::SocketAddr> {
    Some(DEFAULT_METRICS_ADDRESS)
}

fn default_api_socket() -> PathBuf {
    PathBuf::from("/run/failover/agent.sock")
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Generic on veths (faster there); elsewhere native, or generic with
    /// a warning where the driver refuses native XDP.
    #[default]
    Auto,
    /// Native (driver) mode; fails with a hint when the driver lacks it.
    Native,
    /// Generic mode, for drivers without native XDP.
    Skb,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub name: String,
    #[serde(deserialize_with = "ipv4::deserialize")]
    pub vip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
    /// Names of the backends in this service's pool.
    pub backends: Vec<String>,
    pub probe: Probe,
    #[serde(default)]
    pub policy: Policy,
    /// How long flows of this service may stay idle (docs/datapath.md).
    #[serde(default)]
    pub timeouts: Timeouts,
}

/// Flow timeouts of a service. Half-open flows expire in the data plane
/// (their `PENDING` slot is free again); idle established flows are removed
/// by the agent's sweep.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// A TCP flow whose handshake has not completed.
    #[serde(with = "humantime_serde", default = "default_tcp_half_open")]
    pub tcp_half_open: Duration,
    /// An established TCP flow with no packet either way.
    #[serde(with = "humantime_serde", default = "default_tcp_idle")]
    pub tcp_idle: Duration,
    /// A UDP flow with no packet either way.
    #[serde(with = "humantime_serde", default = "default_udp_idle")]
    pub udp_idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            tcp_half_open: default_tcp_half_open(),
            tcp_idle: default_tcp_idle(),
            udp_idle: default_udp_idle(),
        }
    }
}

impl Timeouts {
    /// Bounds of every timeout: below it, a sweep could remove live flows
    /// between two packets; above it, a flow outlives any client.
    pub const MIN: Duration = Duration::from_secs(1);
    pub const MAX: Duration = Duration::from_secs(7 * 24 * 3600);
}

fn default_tcp_half_open() -> Duration {
    Duration::from_secs(10)
}
fn default_tcp_idle() -> Duration {
    Duration::from_secs(3600)
}
fn default_udp_idle() -> Duration {
    Duration::from_secs(30)
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Probe {
    pub kind: ProbeKind,
    #[serde(with = "humantime_serde", default = "default_interval")]
    pub interval: Duration,
    #[serde(with = "humantime_serde", default = "default_timeout")]
    pub timeout: Duration,
    #[serde(default = "default_rise")]
    pub rise: u32,
    #[serde(default = "default_fall")]
    pub fall: u32,
    /// Minimum time in a state before the next change: damps flapping.
    #[serde(with = "humantime_serde", default)]
    pub min_dwell: Duration,
    /// Flap damping (`health::state`): hold before recovering from the
    /// second fall in a row, doubling per further fall up to
    /// `hold_down_max`; one fall is forgotten per `hold_down_decay` served.
    #[serde(with = "humantime_serde", default = "default_hold_down")]
    pub hold_down: Duration,
    #[serde(with = "humantime_serde", default = "default_hold_down_max")]
    pub hold_down_max: Duration,
    #[serde(with = "humantime_serde", default = "default_hold_down_decay")]
    pub hold_down_decay: Duration,
    /// HTTP path (http, inference health check).
    #[serde(default)]
    pub path: Option<String>,
    /// Use TLS (http, grpc, inference).
    #[serde(default)]
    pub tls: bool,
    /// Expected HTTP status (http).
    #[serde(default)]
    pub expect_status: Option<u16>,
    /// Substring the body must contain (http).
    #[serde(default)]
    pub body_contains: Option<String>,
    /// gRPC service name for grpc.health.v1 (empty = server overall).
    #[serde(default)]
    pub grpc_service: Option<String>,
    /// Model that must be loaded (inference).
    #[serde(default)]
    pub model: Option<String>,
    /// Time-to-first-token budget (inference); slower = degraded.
    #[serde(with = "humantime_serde", default)]
    pub ttft_budget: Option<Duration>,
    /// Passive ejection from the data plane's handshake signals.
    #[serde(default = "default_true")]
    pub passive: bool,
    /// Datagram a UDP probe sends (udp; required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Bytes>,
    /// The whole answer a UDP probe expects (udp); unset: any answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect: Option<Bytes>,
    /// What a UDP probe's answer must start with (udp).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_prefix: Option<Bytes>,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProbeKind {
    Tcp,
    Http,
    Grpc,
    Inference,
    Udp,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Jurisdictions this service may ever reach; empty = any.
    #[serde(default)]
    pub allowed_jurisdictions: Vec<String>,
    /// Regions this service may ever reach; empty = any.
    #[serde(default)]
    pub allowed_regions: Vec<String>,
    /// Labels a backend must carry to be reachable.
    #[serde(default)]
    pub required_labels: BTreeMap<String, String>,
    /// Tier capacity headroom: a tier keeps all traffic while
    /// healthy_share * overprovisioning >= 1 (Envoy's priority rule).
    #[serde(default = "default_overprovisioning")]
    pub overprovisioning: f64,
    /// Share of traffic (0..1) kept on the next tier to keep it warm.
    #[serde(default)]
    pub standby_share: f64,
    /// What to do when no allowed backend is healthy.
    #[serde(default)]
    pub panic: PanicMode,
    /// What happens to TCP flows pinned to a backend that went down.
    #[serde(default)]
    pub on_backend_down: OnBackendDown,
    /// Maglev ring size (prime).
    #[serde(default = "default_ring_size")]
    pub ring_size: u32,
    /// Fewest healthy backends taking new flows an operator action (drain,
    /// failover, drill) may leave the service with, unless forced.
    #[serde(default = "default_min_healthy")]
    pub min_healthy: u32,
    /// How long a backend that went down slow or failing (not dead) stays
    /// `DRAINING`, so its streams in progress can finish, before `DOWN`.
    #[serde(with = "humantime_serde", default = "default_slow_grace")]
    pub slow_grace: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            allowed_jurisdictions: Vec::new(),
            allowed_regions: Vec::new(),
            required_labels: BTreeMap::new(),
            overprovisioning: default_overprovisioning(),
            standby_share: 0.0,
            panic: PanicMode::default(),
            on_backend_down: OnBackendDown::default(),
            ring_size: default_ring_size(),
            min_healthy: default_min_healthy(),
            slow_grace: default_slow_grace(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PanicMode {
    /// Nothing healthy: send to every allowed backend anyway.
    FailOpen,
    /// Nothing healthy: reset TCP, drop UDP.
    #[default]
    FailClosed,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnBackendDown {
    /// Answer the client with an RST so it reconnects at once.
    #[default]
    Reset,
    /// Move the flow to another backend (fine for UDP and idempotent TCP).
    Reselect,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    pub name: String,
    #[serde(deserialize_with = "ipv4::deserialize")]
    pub address: Ipv4Addr,
    pub port: u16,
    pub cloud: String,
    pub region: String,
    pub jurisdiction: String,
    /// Priority group: 0 is preferred, 1 takes over when 0 fails, ...
    #[serde(default)]
    pub tier: u8,
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

fn default_interval() -> Duration {
    Duration::from_millis(100)
}
fn default_timeout() -> Duration {
    Duration::from_millis(500)
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    2
}
fn default_hold_down() -> Duration {
    Duration::from_secs(1)
}
fn default_hold_down_max() -> Duration {
    Duration::from_secs(60)
}
fn default_hold_down_decay() -> Duration {
    Duration::from_secs(30)
}
fn default_true() -> bool {
    true
}
fn default_overprovisioning() -> f64 {
    1.4
}
fn default_min_healthy() -> u32 {
    1
}
fn default_slow_grace() -> Duration {
    Duration::from_secs(30)
}
fn default_ring_size() -> u32 {
    failover_common::RING_DEFAULT
}
fn default_weight() -> u32 {
    100
}

#[cfg(test)]
mod tests;
