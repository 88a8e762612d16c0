//! Agent configs for tests, built as the agent's own types
//! ([`failover_agent::config::Config`]) and written out with serde: no
//! YAML text by hand, and every field a test leaves alone takes the
//! agent's own default.
//!
//! Each part starts from its required fields, deserialized through the
//! agent's serde (so the defaults are the agent's, not copies of them);
//! a test then sets the public fields it cares about. Probes are built
//! from their YAML fields only ([`probe`]), so the probe's Rust shape can
//! change without touching the tests.

use std::{net::Ipv4Addr, path::Path};

use failover_agent::config::{Backend, Config, Node, Probe, Service};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

/// A value of the agent's config type `T` from its fields as YAML would
/// hold them.
fn from_fields<T: DeserializeOwned>(fields: Value) -> T {
    serde_json::from_value(fields.clone())
        .unwrap_or_else(|e| panic!("not a valid {}: {e}: {fields}", std::any::type_name::<T>()))
}

/// A probe from its fields as the config file has them, e.g.
/// `probe(json!({"kind": "http", "path": "/health", "interval": "100ms"}))`.
pub fn probe(fields: Value) -> Probe {
    from_fields(fields)
}

/// `{ kind: tcp }`: the agent's default timing.
pub fn tcp_probe() -> Probe {
    probe(json!({ "kind": "tcp" }))
}

/// A TCP probe every 20 ms (timeout 200 ms, rise and fall 1): health
/// changes show within a few tens of milliseconds.
pub fn fast_tcp_probe() -> Probe {
    fast_tcp_probe_with(json!({}))
}

/// [`fast_tcp_probe`] with `extra` fields, e.g. `json!({"passive": false})`.
pub fn fast_tcp_probe_with(extra: Value) -> Probe {
    let mut fields = json!({
        "kind": "tcp", "interval": "20ms", "timeout": "200ms", "rise": 1, "fall": 1,
    });
    if let (Some(all), Value::Object(more)) = (fields.as_object_mut(), extra) {
        all.extend(more);
    }
    probe(fields)
}

/// A node attached to `interfaces`, SNAT on `snat` ports `ports`, pinned
/// under `pin`; the rest (XDP mode, listeners, seed) the agent's defaults.
pub fn node(interfaces: &[&str], snat: Ipv4Addr, ports: (u16, u16), pin: &Path) -> Node {
    from_fields(json!({
        "interfaces": interfaces,
        "snat_address": snat.to_string(),
        "snat_ports": { "min": ports.0, "max": ports.1 },
        "pin_path": pin,
    }))
}

/// A TCP service `name` on `vip:port` over `backends`, with the default
/// policy and timeouts.
pub fn service(name: &str, vip: Ipv4Addr, port: u16, backends: &[&str], probe: Probe) -> Service {
    let mut s: Service = from_fields(json!({
        "name": name,
        "vip": vip.to_string(),
        "port": port,
        "protocol": "tcp",
        "backends": backends,
        "probe": { "kind": "tcp" },
    }));
    s.probe = probe;
    s
}

/// Backend `name` at `address:port` in cloud `c`, region `r`, EU; tier 0,
/// weight 100.
pub fn backend(name: &str, address: Ipv4Addr, port: u16) -> Backend {
    located(name, address, port, ("c", "r", "EU"))
}

/// Backend `name` at `address:port` in (cloud, region, jurisdiction);
/// tier 0, weight 100.
pub fn located(name: &str, address: Ipv4Addr, port: u16, at: (&str, &str, &str)) -> Backend {
    let (cloud, region, jurisdiction) = at;
    from_fields(json!({
        "name": name,
        "address": address.to_string(),
        "port": port,
        "cloud": cloud,
        "region": region,
        "jurisdiction": jurisdiction,
    }))
}

/// `cfg` as the YAML the agent reads. Checks that it reads back as the
/// same config (types only: a test may write an invalid config on
/// purpose, and the agent's validation is the test's business).
pub fn to_yaml(cfg: &Config) -> String {
    let text = serde_norway::to_string(cfg).expect("serialize the config");
    let back: Config = serde_norway::from_str(&text)
        .unwrap_or_else(|e| panic!("the serialized config does not read back: {e}\n{text}"));
    assert_eq!(
        &back, cfg,
        "the config changed on its way through YAML:\n{text}"
    );
    text
}

/// `cfg` as the agent loads it: serialized, parsed and validated (on this
/// host). Panics with the agent's errors when it refuses the config.
pub fn checked(cfg: &Config) -> Config {
    let text = to_yaml(cfg);
    failover_agent::config::parse(&text, "test config")
        .unwrap_or_else(|e| panic!("the agent refuses the config:\n{e}\n{text}"))
}

/// Writes `cfg` as YAML to `path`.
pub fn write(cfg: &Config, path: &Path) {
    std::fs::write(path, to_yaml(cfg)).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}
