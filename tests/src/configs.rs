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

use std::{
    net::{IpAddr, Ipv6Addr},
    path::Path,
};

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

/// A node attached to `interfaces`, SNAT on `snat` (IPv4 or IPv6) ports
/// `ports`, pinned under `pin`; the rest (XDP mode, listeners, seed) the
/// agent's defaults.
pub fn node(interfaces: &[&str], snat: impl Into<IpAddr>, ports: (u16, u16), pin: &Path) -> Node {
    dual_node(interfaces, &[snat.into()], ports, pin)
}

/// [`node`] with a SNAT address per family (`node.snat_addresses`), for
/// dual-stack services or IPv4 and IPv6 ones side by side.
pub fn dual_node(interfaces: &[&str], snat: &[IpAddr], ports: (u16, u16), pin: &Path) -> Node {
    let snat: Vec<String> = snat.iter().map(ToString::to_string).collect();
    from_fields(json!({
        "interfaces": interfaces,
        "snat_addresses": snat,
        "snat_ports": { "min": ports.0, "max": ports.1 },
        "pin_path": pin,
    }))
}

/// A TCP service `name` on `vip:port` (IPv4 or IPv6) over `backends`,
/// with the default policy and timeouts.
pub fn service(
    name: &str,
    vip: impl Into<IpAddr>,
    port: u16,
    backends: &[&str],
    probe: Probe,
) -> Service {
    let mut s: Service = from_fields(json!({
        "name": name,
        "vip": vip.into().to_string(),
        "port": port,
        "protocol": "tcp",
        "backends": backends,
        "probe": { "kind": "tcp" },
    }));
    s.probe = probe;
    s
}

/// A dual-stack [`service`]: IPv4 clients at `vip:port` go to the IPv4
/// backends of `backends`, IPv6 clients at `vip6:port` to its IPv6 ones.
pub fn dual_service(
    name: &str,
    (vip, vip6): (impl Into<IpAddr>, Ipv6Addr),
    port: u16,
    backends: &[&str],
    probe: Probe,
) -> Service {
    let mut s = service(name, vip, port, backends, probe);
    s.vip6 = Some(vip6);
    s
}

/// Backend `name` at `address:port` (IPv4 or IPv6) in cloud `c`, region
/// `r`, EU; tier 0, weight 100.
pub fn backend(name: &str, address: impl Into<IpAddr>, port: u16) -> Backend {
    located(name, address, port, ("c", "r", "EU"))
}

/// Backend `name` at `address:port` in (cloud, region, jurisdiction);
/// tier 0, weight 100.
pub fn located(
    name: &str,
    address: impl Into<IpAddr>,
    port: u16,
    at: (&str, &str, &str),
) -> Backend {
    let (cloud, region, jurisdiction) = at;
    from_fields(json!({
        "name": name,
        "address": address.into().to_string(),
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

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    /// An IPv4 service, an IPv6 one and a dual-stack one, built through
    /// these helpers: the agent takes them, and they read back as built.
    #[test]
    fn ipv6_and_dual_stack_configs_build_and_validate() {
        let v6 = |s: &str| -> Ipv6Addr { s.parse().unwrap() };
        let cfg = Config {
            node: dual_node(
                &["eth0"],
                &[
                    Ipv4Addr::new(198, 51, 100, 1).into(),
                    v6("2001:db8:100::1").into(),
                ],
                (10_000, 32_767),
                Path::new("/sys/fs/bpf/failover-test"),
            ),
            services: vec![
                service("v4", Ipv4Addr::new(192, 0, 2, 10), 80, &["a4"], tcp_probe()),
                service("v6", v6("2001:db8::20"), 80, &["a6"], tcp_probe()),
                dual_service(
                    "both",
                    (Ipv4Addr::new(192, 0, 2, 30), v6("2001:db8::30")),
                    80,
                    &["a4", "a6"],
                    tcp_probe(),
                ),
            ],
            backends: vec![
                backend("a4", Ipv4Addr::new(203, 0, 113, 11), 8000),
                backend("a6", v6("2001:db8:2::11"), 8000),
            ],
        };
        let text = to_yaml(&cfg);
        assert!(text.contains("vip6: 2001:db8::30"), "{text}");
        assert_eq!(checked(&cfg), cfg);
        // An IPv4-only node as before: one SNAT address.
        let n = node(
            &["eth0"],
            Ipv4Addr::new(198, 51, 100, 1),
            (10_000, 32_767),
            Path::new("/x"),
        );
        assert_eq!(n.snat_addresses, [IpAddr::from([198, 51, 100, 1])]);
    }
}
