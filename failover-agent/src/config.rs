//! The agent's YAML configuration: types, loading, validation and diffs.
//!
//! Every error names the field path (`services[1].policy.overprovisioning`)
//! and its line. Syntax and type errors come from the deserializer (a
//! syntax error alone, type errors of every part together); the semantic
//! checks in `validate` run on the typed config and are all reported at
//! once, so an operator fixes a file in as few passes as the YAML allows
//! ([`parse_on`]). Some checks only warn ([`Loaded::warnings`]): `validate`
//! prints the warnings, `run` logs them.

mod bytes;
mod diff;
mod lines;
mod load;
mod validate;

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

pub use bytes::Bytes;
pub use diff::{BackendChange, ConfigDiff, ServiceChange, diff};
pub use load::{LoadMetrics, LoadProfile, LoadScrape, ProfileNames};
pub use validate::{Host, MAX_UDP_PAYLOAD, MAX_WEIGHT};

/// Reads and validates the config file at `path`; warnings are dropped
/// (see [`load_checked`]).
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    load_checked(path).map(|loaded| loaded.config)
}

/// Reads and validates the config file at `path`, with what validation
/// warns about: `failover-agent validate` prints the warnings, `run` logs
/// them.
pub fn load_checked(path: &Path) -> Result<Loaded, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_checked(&text, &path.display().to_string())
}

/// Parses and validates `text`; `origin` names the source in error
/// messages. Warnings are dropped (see [`parse_checked`]).
pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
    parse_checked(text, origin).map(|loaded| loaded.config)
}

/// Parses and validates `text` against this host ([`Host::current`]).
pub fn parse_checked(text: &str, origin: &str) -> Result<Loaded, ConfigError> {
    parse_on(text, origin, &Host::current())
}

/// A valid config and the warnings its validation gave.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub config: Config,
    /// Things that work but are likely mistakes, in line order.
    pub warnings: Vec<FieldError>,
}

/// Parses and validates `text` as if on `host`. Every problem is reported
/// at once, as far as the file can be read:
///
/// 1. YAML syntax. The parser cannot go on past a syntax error (what
///    follows cannot be told apart from the broken construct), so a
///    syntax error is reported alone, with its line, and says so. The
///    config is the first YAML document: later documents are reported,
///    not read, and one with a syntax error does not hide the first's
///    errors.
/// 2. Types (a value of the wrong kind, an unknown or missing field),
///    checked for `node`, each service and each backend apart, so every
///    part's first such error is reported together.
/// 3. Values and their relations ([`validate`]), once the types are
///    sound: every error and warning.
pub fn parse_on(text: &str, origin: &str, host: &Host) -> Result<Loaded, ConfigError> {
    let index = lines::LineIndex::build(text);
    // A file with the one-address shorthand `snat_address` hears of it by
    // that name.
    let shorthand = index.has("node.snat_address");
    let at = |path: String, message: String| {
        let path = match path.strip_prefix("node.snat_addresses") {
            Some("" | "[0]") if shorthand => "node.snat_address".to_owned(),
            _ => path,
        };
        FieldError {
            origin: origin.to_owned(),
            line: index.line(&path),
            field: path,
            message,
        }
    };
    let mut documents = serde_norway::Deserializer::from_str(text);
    let value: serde_norway::Value = match documents.next() {
        None => serde_norway::Value::Null,
        Some(document) => serde_path_to_error::deserialize(document)
            .map_err(|error| ConfigError::invalid(unreadable(error, &index, origin)))?,
    };
    // Errors about later documents: they do not stop the first's checks.
    let mut later = Vec::new();
    if let Some(next) = documents.next() {
        let line = index.document_line(1);
        let message = match serde_path_to_error::deserialize::<_, serde_norway::Value>(next) {
            Ok(_) => "a second YAML document: the config is the first one, and this one is not read (remove the `---` and what follows, or merge it into the first)".to_owned(),
            Err(error) => format!(
                "a second YAML document, not read: the config is the first one (and this one has a syntax error: {})",
                without_location(error.inner())
            ),
        };
        later.push(FieldError {
            origin: origin.to_owned(),
            line: line.unwrap_or_else(|| text.lines().count().max(1)),
            field: String::new(),
            message,
        });
    }
    let mut errors = Vec::new();
    let config = typed(value, &mut |path, message| errors.push(at(path, message)));
    let Some(config) = config.filter(|_| errors.is_empty()) else {
        errors.extend(later);
        errors.sort_by_key(|error| error.line);
        return Err(ConfigError::invalid(errors));
    };
    let (mut errors, mut warnings): (Vec<FieldError>, Vec<FieldError>) = {
        let (errs, warns): (Vec<validate::Issue>, Vec<validate::Issue>) =
            validate::check(&config, host)
                .into_iter()
                .partition(|issue| !issue.warning);
        let place = |issues: Vec<validate::Issue>| -> Vec<FieldError> {
            issues
                .into_iter()
                .map(|issue| at(issue.path, issue.message))
                .collect()
        };
        (place(errs), place(warns))
    };
    errors.extend(later);
    // Stable: issues on one line keep the order the checks found them in.
    errors.sort_by_key(|error| error.line);
    warnings.sort_by_key(|warning| warning.line);
    if errors.is_empty() {
        Ok(Loaded { config, warnings })
    } else {
        Err(ConfigError::Invalid { errors, warnings })
    }
}

/// The typed config from a document that is valid YAML: `node`, each
/// service and each backend are deserialized apart, and each failure is
/// reported (`path`, `message`); `None` when any failed.
fn typed(value: serde_norway::Value, report: &mut dyn FnMut(String, String)) -> Option<Config> {
    use serde_norway::Value;
    const FIELDS: [&str; 3] = ["node", "services", "backends"];
    let root = match value {
        // An empty file: every field is missing.
        Value::Null => serde_norway::Mapping::new(),
        Value::Mapping(root) => root,
        other => {
            let (path, message) = type_error::<Config>(other, "");
            report(path, message);
            return None;
        }
    };
    let (mut node, mut services, mut backends) = (None, None, None);
    for (key, value) in root {
        match key.as_str() {
            Some("node") => node = Some(value),
            Some("services") => services = Some(value),
            Some("backends") => backends = Some(value),
            _ => {
                let name = key
                    .as_str()
                    .map_or_else(|| format!("{key:?}"), str::to_owned);
                report(
                    name.clone(),
                    format!(
                        "unknown field `{name}`, expected one of {}",
                        FIELDS.map(|f| format!("`{f}`")).join(", ")
                    ),
                );
            }
        }
    }
    for (field, value) in FIELDS.iter().zip([&node, &services, &backends]) {
        if value.is_none() {
            report(String::new(), format!("missing field `{field}`"));
        }
    }
    let node = node.and_then(|v| part::<Node>(v, "node", report));
    let services = services.and_then(|v| list::<Service>(v, "services", report));
    let backends = backends.and_then(|v| list::<Backend>(v, "backends", report));
    Some(Config {
        node: node?,
        services: services?,
        backends: backends?,
    })
}

/// Each item of a sequence apart; a value that is no sequence is one error.
fn list<T: serde::de::DeserializeOwned>(
    value: serde_norway::Value,
    path: &str,
    report: &mut dyn FnMut(String, String),
) -> Option<Vec<T>> {
    let serde_norway::Value::Sequence(items) = value else {
        return part::<Vec<T>>(value, path, report);
    };
    let mut out = Some(Vec::with_capacity(items.len()));
    for (i, item) in items.into_iter().enumerate() {
        let item = part::<T>(item, &format!("{path}[{i}]"), report);
        out = out.zip(item).map(|(mut out, item)| {
            out.push(item);
            out
        });
    }
    out
}

fn part<T: serde::de::DeserializeOwned>(
    value: serde_norway::Value,
    path: &str,
    report: &mut dyn FnMut(String, String),
) -> Option<T> {
    // A service's probe is read again when the error lies in it (below).
    let probe = value.get("probe").cloned();
    match serde_path_to_error::deserialize(value) {
        Ok(typed) => Some(typed),
        Err(error) => {
            let in_probe = error.path().to_string() == "probe";
            let (path, message) = located_error(error, path);
            let (path, message) = match probe.filter(|_| in_probe) {
                Some(probe) => probe_error(probe, path, message),
                None => (path, message),
            };
            report(path, message);
            None
        }
    }
}

/// The field of an error inside a probe's `kind`. serde reads an
/// internally tagged enum from a buffer of the whole mapping, and errors
/// from that buffer carry no field, so the kind's own fields are read
/// again on their own, where the path names the field (`tls` on a tcp
/// probe: `services[0].probe.tls`).
fn probe_error(probe: serde_norway::Value, path: String, message: String) -> (String, String) {
    use serde_norway::Value;
    let Value::Mapping(mut fields) = probe else {
        return (path, message);
    };
    let kind = fields.shift_remove("kind");
    // The load facet's own fields, read alone so the path names them
    // (`services[0].probe.load.min_change`).
    if let Some(load) = fields.get("load").cloned()
        && let Err(error) = serde_path_to_error::deserialize::<_, Option<LoadScrape>>(load)
    {
        return located_error(error, &format!("{path}.load"));
    }
    // The fields every kind shares are the probe's, not the kind's.
    let mut shared = Vec::new();
    if let Ok(Value::Mapping(probe)) =
        serde_norway::to_value(Probe::new(ProbeKind::Tcp(TcpCheck {})))
    {
        for key in probe.keys().filter(|key| key.as_str() != Some("kind")) {
            fields.shift_remove(key);
            shared.extend(key.as_str().map(|key| format!("`{key}`")));
        }
    }
    let own = Value::Mapping(fields);
    fn error_of<T: serde::de::DeserializeOwned>(
        own: serde_norway::Value,
        path: &str,
    ) -> Option<(String, String)> {
        serde_path_to_error::deserialize::<_, T>(own)
            .err()
            .map(|error| located_error(error, path))
    }
    let again = match kind.as_ref().and_then(Value::as_str) {
        None => None,
        Some("tcp") => error_of::<TcpCheck>(own, &path),
        Some("http") => error_of::<HttpCheck>(own, &path),
        Some("grpc") => error_of::<GrpcCheck>(own, &path),
        Some("inference") => error_of::<InferenceCheck>(own, &path),
        Some("udp") => error_of::<UdpCheck>(own, &path),
        // `unknown variant`: the kind itself is wrong.
        Some(_) => return (format!("{path}.kind"), message),
    };
    // None: read alone, the kind's fields are fine; the error is the
    // probe's own (a missing `kind`).
    let Some((path, message)) = again else {
        return (path, message);
    };
    (path, with_shared_fields(message, &shared))
}

/// serde's `unknown field `x`, expected ...` lists the kind's own fields;
/// the probe's shared ones are just as expected there.
fn with_shared_fields(message: String, shared: &[String]) -> String {
    let Some((field, own)) = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split_once('`'))
    else {
        return message;
    };
    // serde: "there are no fields", "expected `a`", "expected `a` or `b`",
    // "expected one of `a`, `b`, `c`".
    let own = own
        .strip_prefix(", expected one of ")
        .or_else(|| own.strip_prefix(", expected "))
        .map(|list| list.replace(" or ", ", "));
    let expected: Vec<String> = std::iter::once("`kind`".to_owned())
        .chain(shared.iter().cloned())
        .chain(own)
        .collect();
    format!(
        "unknown field `{field}`, expected one of {}",
        expected.join(", ")
    )
}

fn type_error<T: serde::de::DeserializeOwned>(
    value: serde_norway::Value,
    path: &str,
) -> (String, String) {
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(_) => (path.to_owned(), "invalid value".to_owned()),
        Err(error) => located_error(error, path),
    }
}

/// The full field path of an error inside the part at `prefix`, and its
/// message.
fn located_error(
    error: serde_path_to_error::Error<serde_norway::Error>,
    prefix: &str,
) -> (String, String) {
    let inner = error.path().to_string();
    let path = match (prefix, inner.as_str()) {
        (_, ".") => prefix.to_owned(),
        ("", inner) => inner.to_owned(),
        (prefix, inner) if inner.starts_with('[') => format!("{prefix}{inner}"),
        (prefix, inner) => format!("{prefix}.{inner}"),
    };
    let message = without_location(error.inner());
    (path.clone(), strip_path_prefix(&message, &path).to_owned())
}

/// serde_norway's message without the location it appends (we print the
/// line in front instead).
fn without_location(error: &serde_norway::Error) -> String {
    let mut message = error.to_string();
    if let Some(location) = error.location() {
        let at = format!(" at line {} column {}", location.line(), location.column());
        message = message.replacen(&at, "", 1);
    }
    message
}

/// Why nothing past a YAML syntax error is checked, appended to its message.
pub const SYNTAX_STOPS: &str =
    "YAML syntax error: the parser cannot go on past it, so the rest of the file was not checked";

/// Why the first document could not be read: a syntax error, or keys
/// given twice in a mapping (each reported at its repeat).
fn unreadable(
    error: serde_path_to_error::Error<serde_norway::Error>,
    index: &lines::LineIndex,
    origin: &str,
) -> Vec<FieldError> {
    if error
        .inner()
        .to_string()
        .contains("duplicate entry with key")
    {
        let repeats: Vec<FieldError> = index
            .duplicates()
            .map(|(path, line, first)| FieldError {
                origin: origin.to_owned(),
                line,
                field: path.to_owned(),
                message: format!(
                    "given twice in one mapping (first at line {first}); the YAML loader \
                     refuses the mapping, so the rest of the file was not checked"
                ),
            })
            .collect();
        if !repeats.is_empty() {
            return repeats;
        }
    }
    vec![syntax_error(error, index, origin)]
}

fn syntax_error(
    error: serde_path_to_error::Error<serde_norway::Error>,
    index: &lines::LineIndex,
    origin: &str,
) -> FieldError {
    let path = error.path().to_string();
    let field = if path == "." { String::new() } else { path };
    let inner = error.into_inner();
    let message = without_location(&inner);
    let line = inner
        .location()
        .map_or_else(|| index.line(&field), |location| location.line());
    FieldError {
        origin: origin.to_owned(),
        line,
        message: format!("{} ({SYNTAX_STOPS})", strip_path_prefix(&message, &field)),
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
    /// One entry per problem, in line order; never empty. The warnings
    /// the checks also found go along (not in the message).
    #[error("{}", DisplayList(errors))]
    Invalid {
        errors: Vec<FieldError>,
        warnings: Vec<FieldError>,
    },
}

impl ConfigError {
    fn invalid(errors: Vec<FieldError>) -> Self {
        Self::Invalid {
            errors,
            warnings: Vec::new(),
        }
    }

    /// The field errors, or none when the file could not be read.
    pub fn errors(&self) -> &[FieldError] {
        match self {
            Self::Read { .. } => &[],
            Self::Invalid { errors, .. } => errors,
        }
    }

    /// Warnings found along with the errors (none when the checks of
    /// values did not run: the file could not be read or typed).
    pub fn warnings(&self) -> &[FieldError] {
        match self {
            Self::Read { .. } => &[],
            Self::Invalid { warnings, .. } => warnings,
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

impl FieldError {
    /// This entry as a warning: `origin:line: warning: field: message`.
    pub fn as_warning(&self) -> impl fmt::Display + '_ {
        struct Warning<'a>(&'a FieldError);
        impl fmt::Display for Warning<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let w = self.0;
                write!(f, "{}:{}: warning: ", w.origin, w.line)?;
                if !w.field.is_empty() {
                    write!(f, "{}: ", w.field)?;
                }
                f.write_str(&w.message)
            }
        }
        Warning(self)
    }
}

impl Config {
    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.iter().find(|service| service.name == name)
    }

    pub fn backend(&self, name: &str) -> Option<&Backend> {
        self.backends.iter().find(|backend| backend.name == name)
    }

    /// The probe `backend` gets: that of the first service (in config
    /// order) listing it (validation makes every listing service's probe
    /// the same); `None` for a backend in no service.
    pub fn probe_of(&self, backend: &str) -> Option<&Probe> {
        self.services
            .iter()
            .find(|service| service.backends.iter().any(|b| b == backend))
            .map(|service| &service.probe)
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
/// one ("invalid IP address syntax") does not.
mod ip {
    use std::{
        fmt,
        net::{IpAddr, Ipv6Addr},
    };

    use serde::{
        Deserializer,
        de::{Error, SeqAccess, Visitor},
    };

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<IpAddr, D::Error> {
        // Parsing inside the visitor, not after it, lets the YAML
        // deserializer stamp the error with the scalar's own line.
        d.deserialize_str(IpVisitor)
    }

    /// An IPv6 address only (`vip6`); an IPv4 one is refused here.
    pub(super) fn deserialize_v6<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Ipv6Addr>, D::Error> {
        match d.deserialize_str(IpVisitor)? {
            IpAddr::V6(v6) => Ok(Some(v6)),
            IpAddr::V4(v4) => Err(D::Error::custom(format_args!(
                "{v4} is an IPv4 address; `vip6` takes the IPv6 VIP of a dual-stack \
                 service (its IPv4 VIP is `vip`)"
            ))),
        }
    }

    /// One address, or a list of them.
    pub(super) fn deserialize_list<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<IpAddr>, D::Error> {
        d.deserialize_any(ListVisitor)
    }

    struct IpVisitor;

    impl Visitor<'_> for IpVisitor {
        type Value = IpAddr;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an IPv4 or IPv6 address")
        }

        fn visit_str<E: Error>(self, text: &str) -> Result<IpAddr, E> {
            parse(text)
        }
    }

    fn parse<E: Error>(text: &str) -> Result<IpAddr, E> {
        text.parse()
            .map_err(|_| E::custom(format_args!("invalid IP address {text:?}")))
    }

    struct ListVisitor;

    impl<'de> Visitor<'de> for ListVisitor {
        type Value = Vec<IpAddr>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an IP address or a list of them (one per family)")
        }

        fn visit_str<E: Error>(self, text: &str) -> Result<Vec<IpAddr>, E> {
            parse(text).map(|a| vec![a])
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<IpAddr>, A::Error> {
            let mut out = Vec::new();
            while let Some(text) = seq.next_element::<std::borrow::Cow<'de, str>>()? {
                out.push(parse(&text)?);
            }
            Ok(out)
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
    /// Source addresses of traffic toward backends: at most one per
    /// family, and one of each family a VIP has. `snat_address: <one
    /// address>` is read as a list of that one.
    #[serde(alias = "snat_address", deserialize_with = "ip::deserialize_list")]
    pub snat_addresses: Vec<IpAddr>,
    pub snat_ports: PortRange,
    #[serde(default = "default_pin_path")]
    pub pin_path: PathBuf,
    /// Entries in each established flow table (`FLOWS`, `REVERSE`, and
    /// the IPv6 ones, `FLOWS6` and `REVERSE6`).
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
    /// The IPv4 SNAT address, if the node has one.
    pub fn snat4(&self) -> Option<Ipv4Addr> {
        self.snat_addresses.iter().find_map(|a| match a {
            IpAddr::V4(a) => Some(*a),
            IpAddr::V6(_) => None,
        })
    }

    /// The IPv6 SNAT address, if the node has one.
    pub fn snat6(&self) -> Option<Ipv6Addr> {
        self.snat_addresses.iter().find_map(|a| match a {
            IpAddr::V6(a) => Some(*a),
            IpAddr::V4(_) => None,
        })
    }

    /// The SNAT address of `vip`'s family.
    pub fn snat_for(&self, vip: IpAddr) -> Option<IpAddr> {
        self.snat_addresses
            .iter()
            .copied()
            .find(|a| a.is_ipv4() == vip.is_ipv4())
    }

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
    /// Limits of `flow_capacity`: at 4M flows the IPv4 tables take about
    /// 1 GiB, and the IPv6 ones (as many entries) about 1.4 GiB more.
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

#[derive(
    Clone,
    Copy,
    Debug,
    Deserialize,
    Serialize,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    strum::IntoStaticStr,
    strum::Display,
)]
#[serde(rename_all = "lowercase")]
#[strum(serialize_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub name: String,
    /// The address clients reach the service at, IPv4 or IPv6. Its
    /// backends are those of the pool with an address of its family.
    #[serde(deserialize_with = "ip::deserialize")]
    pub vip: IpAddr,
    /// A dual-stack service's IPv6 VIP, beside an IPv4 `vip`: one name,
    /// one policy and one plan, with the pool's IPv6 backends behind this
    /// VIP and its IPv4 ones behind `vip`.
    #[serde(
        default,
        deserialize_with = "ip::deserialize_v6",
        skip_serializing_if = "Option::is_none"
    )]
    pub vip6: Option<Ipv6Addr>,
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

impl Service {
    /// Every VIP of the service: `vip`, then `vip6` when it is dual-stack.
    pub fn vips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        std::iter::once(self.vip).chain(self.vip6.map(IpAddr::V6))
    }

    /// The VIP of `address`'s family: the one its traffic goes through.
    pub fn vip_for(&self, address: IpAddr) -> Option<IpAddr> {
        self.vips().find(|vip| vip.is_ipv4() == address.is_ipv4())
    }
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

/// A service's health probe: what it checks (`kind`, with that kind's own
/// fields), and the timing and damping every kind shares.
///
/// A field of another kind is refused where the config is read (`tls` on a
/// `tcp` probe is an unknown field of a tcp probe), so no check has to
/// know which fields apply to which kind.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct Probe {
    /// `kind: tcp | http | grpc | inference | udp` and that kind's fields.
    /// Fields that are neither shared nor the kind's are refused by the
    /// kind (no `deny_unknown_fields` here: serde cannot combine it with
    /// `flatten`).
    #[serde(flatten)]
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
    /// Passive ejection from the data plane's handshake signals.
    #[serde(default = "default_true")]
    pub passive: bool,
    /// Scrape the model server's metrics and scale the weight by its load
    /// (`crate::load`); absent: no load facet. Serialized even when
    /// absent, so [`probe_error`] knows it as a shared field.
    #[serde(default)]
    pub load: Option<LoadScrape>,
}

impl Probe {
    /// Weight factor of a degraded backend when `degraded_weight` is unset.
    pub const DEFAULT_DEGRADED_WEIGHT: f64 = 0.5;

    /// A probe of `kind` with the default timing and damping.
    pub fn new(kind: ProbeKind) -> Self {
        Self {
            kind,
            interval: default_interval(),
            timeout: default_timeout(),
            rise: default_rise(),
            fall: default_fall(),
            min_dwell: Duration::ZERO,
            hold_down: default_hold_down(),
            hold_down_max: default_hold_down_max(),
            hold_down_decay: default_hold_down_decay(),
            passive: true,
            load: None,
        }
    }

    /// The wedge detector's tuning: inference probes with passive checks
    /// only (a generation confirms a suspicion; other kinds have none).
    pub fn wedge(&self) -> Option<crate::health::WedgeConfig> {
        let ProbeKind::Inference(i) = &self.kind else {
            return None;
        };
        if !self.passive {
            return None;
        }
        let d = crate::health::WedgeConfig::default();
        Some(crate::health::WedgeConfig {
            budget: i.wedge_budget.unwrap_or(d.budget),
            min_flows: i.wedge_min_flows.unwrap_or(d.min_flows),
        })
    }

    /// The factor on the configured weight of a backend this probe finds
    /// degraded: it keeps serving, with fewer new flows. Only an inference
    /// probe finds a backend degraded.
    pub fn degraded_weight(&self) -> f64 {
        match &self.kind {
            ProbeKind::Inference(i) => i.degraded_weight,
            _ => None,
        }
        .unwrap_or(Self::DEFAULT_DEGRADED_WEIGHT)
    }
}

/// What a probe checks: the `kind` and its own fields.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, strum::IntoStaticStr)]
#[serde(tag = "kind", rename_all = "lowercase")]
#[strum(serialize_all = "lowercase")]
pub enum ProbeKind {
    /// A TCP handshake.
    Tcp(TcpCheck),
    /// An HTTP(S) `GET`.
    Http(HttpCheck),
    /// grpc.health.v1 `Check`.
    Grpc(GrpcCheck),
    /// An OpenAI-style endpoint: the model listed, and a one-token answer.
    Inference(InferenceCheck),
    /// A datagram out, an answer back.
    Udp(UdpCheck),
}

impl ProbeKind {
    /// `tcp`, `http`, ...: the `kind` as written in the config.
    pub fn name(&self) -> &'static str {
        self.into()
    }
}

/// A tcp probe has no fields of its own.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TcpCheck {}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HttpCheck {
    /// Path of the `GET`; unset: `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Use TLS.
    #[serde(default)]
    pub tls: bool,
    /// Expected HTTP status; unset: any 2xx.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_status: Option<u16>,
    /// Substring the body must contain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_contains: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GrpcCheck {
    /// Use TLS.
    #[serde(default)]
    pub tls: bool,
    /// gRPC service name for grpc.health.v1 (unset or empty: the server
    /// overall).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_service: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InferenceCheck {
    /// Model that must be loaded (required: validation says so, along
    /// with the file's other problems).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The prefix the OpenAI routes sit under (a gateway's); unset: the
    /// root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Use TLS.
    #[serde(default)]
    pub tls: bool,
    /// Time-to-first-token budget; slower = degraded.
    #[serde(
        with = "humantime_serde",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub ttft_budget: Option<Duration>,
    /// Share of its weight a degraded backend keeps (rate limited with
    /// HTTP 429, or over `ttft_budget`); unset:
    /// [`Probe::DEFAULT_DEGRADED_WEIGHT`]. See [`Probe::degraded_weight`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degraded_weight: Option<f64>,
    /// How often the probe runs its one-token generation (GPU time); the
    /// probes in between only read the model list. Unset: 5 s.
    #[serde(
        with = "humantime_serde",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub generation_interval: Option<Duration>,
    /// Wedge detection from the data plane (with `passive`): how long a
    /// backend with unanswered requests may send no byte before a
    /// generation is run to confirm it hangs. Unset: 300 ms.
    #[serde(
        with = "humantime_serde",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub wedge_budget: Option<Duration>,
    /// Unanswered requests needed for a wedge suspicion. Unset: 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wedge_min_flows: Option<u64>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UdpCheck {
    /// Datagram the probe sends (required: validation says so, along with
    /// the file's other problems).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Bytes>,
    /// The whole answer expected; unset: any answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect: Option<Bytes>,
    /// What the answer must start with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_prefix: Option<Bytes>,
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
    /// IPv4 or IPv6; it must be of the family of the VIP it serves.
    #[serde(deserialize_with = "ip::deserialize")]
    pub address: IpAddr,
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
    /// The largest IP packet the path to this backend carries, when it is
    /// smaller than the edge's own links (a tunnel or interconnect to
    /// another cloud): the data plane clamps the MSS of handshakes with it
    /// to this less 40, so large requests work even where ICMP is filtered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_mtu: Option<u16>,
}

/// IPv4 and TCP headers without options: `path_mtu` less this is the MSS.
pub const IPV4_TCP_HEADERS: u32 = 40;
/// IPv6 and TCP headers without options: an IPv6 backend's MSS.
pub const IPV6_TCP_HEADERS: u32 = 60;
/// The smallest `path_mtu` of an IPv6 backend (RFC 8200's minimum link MTU).
pub const IPV6_MIN_MTU: u16 = 1280;

impl Backend {
    /// The MSS clamped into handshakes toward this backend: its
    /// `path_mtu` less the IP and TCP headers of its family; 0, none.
    pub fn path_mss(&self) -> u32 {
        let headers = if self.address.is_ipv4() {
            IPV4_TCP_HEADERS
        } else {
            IPV6_TCP_HEADERS
        };
        self.path_mtu
            .map_or(0, |m| u32::from(m).saturating_sub(headers))
    }
}
/// The `path_mtu` a backend may have: IPv4's 576 (RFC 791) up to a jumbo
/// frame.
pub const PATH_MTU_RANGE: std::ops::RangeInclusive<u16> = 576..=9216;

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
