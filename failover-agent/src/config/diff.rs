//! What changed between two valid configs. Reloads are applied as this
//! diff, so unchanged services keep their rings and their flows.

use std::collections::BTreeMap;

use super::{Backend, Config, Node, Service};

/// Changes from an old config to a new one. Services and backends are
/// matched by name; every list is sorted by name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigDiff {
    /// Node fields that changed (`interfaces`, `snat_ports`, ...). Any of
    /// them needs the data plane re-attached or its NODE map rewritten.
    pub node: Vec<&'static str>,
    pub services_added: Vec<String>,
    pub services_removed: Vec<String>,
    pub services_changed: Vec<ServiceChange>,
    pub backends_added: Vec<String>,
    pub backends_removed: Vec<String>,
    pub backends_changed: Vec<BackendChange>,
}

/// A service present in both configs whose definition differs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceChange {
    pub name: String,
    /// Top-level fields that differ: `vip`, `port`, `protocol`,
    /// `backends`, `probe`, `policy`.
    pub fields: Vec<&'static str>,
}

/// A backend present in both configs whose definition differs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendChange {
    pub name: String,
    /// Fields that differ: `address`, `port`, `cloud`, `region`,
    /// `jurisdiction`, `tier`, `weight`, `labels`.
    pub fields: Vec<&'static str>,
}

impl ConfigDiff {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

impl std::fmt::Display for ConfigDiff {
    /// One line for logs, e.g. `services +2 -0 ~1; backends +0 -1 ~3`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_empty() {
            return f.write_str("no changes");
        }
        if !self.node.is_empty() {
            write!(f, "node [{}]; ", self.node.join(", "))?;
        }
        write!(
            f,
            "services +{} -{} ~{}; backends +{} -{} ~{}",
            self.services_added.len(),
            self.services_removed.len(),
            self.services_changed.len(),
            self.backends_added.len(),
            self.backends_removed.len(),
            self.backends_changed.len()
        )
    }
}

/// Describes how to get from `old` to `new`.
pub fn diff(old: &Config, new: &Config) -> ConfigDiff {
    let (services_added, services_removed, services_changed) =
        compare(&old.services, &new.services, |s| &s.name, service_fields)
            .into_parts(|name, fields| ServiceChange { name, fields });
    let (backends_added, backends_removed, backends_changed) =
        compare(&old.backends, &new.backends, |b| &b.name, backend_fields)
            .into_parts(|name, fields| BackendChange { name, fields });
    ConfigDiff {
        node: node_fields(&old.node, &new.node),
        services_added,
        services_removed,
        services_changed,
        backends_added,
        backends_removed,
        backends_changed,
    }
}

struct Compared {
    added: Vec<String>,
    removed: Vec<String>,
    changed: Vec<(String, Vec<&'static str>)>,
}

impl Compared {
    fn into_parts<C>(
        self,
        change: impl Fn(String, Vec<&'static str>) -> C,
    ) -> (Vec<String>, Vec<String>, Vec<C>) {
        let changed = self
            .changed
            .into_iter()
            .map(|(name, fields)| change(name, fields))
            .collect();
        (self.added, self.removed, changed)
    }
}

fn compare<T>(
    old: &[T],
    new: &[T],
    name: impl Fn(&T) -> &String,
    fields: impl Fn(&T, &T) -> Vec<&'static str>,
) -> Compared {
    let old: BTreeMap<&String, &T> = old.iter().map(|item| (name(item), item)).collect();
    let new: BTreeMap<&String, &T> = new.iter().map(|item| (name(item), item)).collect();
    let mut compared = Compared {
        added: Vec::new(),
        removed: Vec::new(),
        changed: Vec::new(),
    };
    for (key, after) in &new {
        match old.get(key) {
            None => compared.added.push((*key).clone()),
            Some(before) => {
                let differ = fields(before, after);
                if !differ.is_empty() {
                    compared.changed.push(((*key).clone(), differ));
                }
            }
        }
    }
    compared.removed = old
        .keys()
        .filter(|key| !new.contains_key(*key))
        .map(|key| (*key).clone())
        .collect();
    compared
}

/// Names of the fields whose values differ, listed as `(name, a == b)`.
fn differing(pairs: &[(&'static str, bool)]) -> Vec<&'static str> {
    pairs
        .iter()
        .filter(|(_, same)| !same)
        .map(|(field, _)| *field)
        .collect()
}

// Each destructures its first argument so that a field added to the type
// later cannot be silently left out of the comparison.

fn node_fields(a: &Node, b: &Node) -> Vec<&'static str> {
    let Node {
        interfaces,
        xdp_mode,
        snat_addresses,
        snat_ports,
        pin_path,
        flow_capacity,
        hash_seed,
        metrics_address,
        api_socket,
        state_file,
    } = a;
    differing(&[
        ("interfaces", *interfaces == b.interfaces),
        ("xdp_mode", *xdp_mode == b.xdp_mode),
        ("snat_addresses", *snat_addresses == b.snat_addresses),
        ("snat_ports", *snat_ports == b.snat_ports),
        ("pin_path", *pin_path == b.pin_path),
        ("flow_capacity", *flow_capacity == b.flow_capacity),
        ("hash_seed", *hash_seed == b.hash_seed),
        ("metrics_address", *metrics_address == b.metrics_address),
        ("api_socket", *api_socket == b.api_socket),
        ("state_file", *state_file == b.state_file),
    ])
}

fn service_fields(a: &Service, b: &Service) -> Vec<&'static str> {
    let Service {
        name: _,
        vip,
        vip6,
        port,
        protocol,
        backends,
        probe,
        policy,
        timeouts,
    } = a;
    differing(&[
        ("vip", *vip == b.vip),
        ("vip6", *vip6 == b.vip6),
        ("port", *port == b.port),
        ("protocol", *protocol == b.protocol),
        ("backends", *backends == b.backends),
        ("probe", *probe == b.probe),
        ("policy", *policy == b.policy),
        ("timeouts", *timeouts == b.timeouts),
    ])
}

fn backend_fields(a: &Backend, b: &Backend) -> Vec<&'static str> {
    let Backend {
        name: _,
        address,
        port,
        cloud,
        region,
        jurisdiction,
        tier,
        weight,
        labels,
        path_mtu,
    } = a;
    differing(&[
        ("address", *address == b.address),
        ("port", *port == b.port),
        ("cloud", *cloud == b.cloud),
        ("region", *region == b.region),
        ("jurisdiction", *jurisdiction == b.jurisdiction),
        ("tier", *tier == b.tier),
        ("weight", *weight == b.weight),
        ("labels", *labels == b.labels),
        ("path_mtu", *path_mtu == b.path_mtu),
    ])
}
