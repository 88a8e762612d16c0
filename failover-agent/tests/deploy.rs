//! The configs shipped in deploy/ must be ones the agent accepts.

use std::path::Path;

#[test]
fn the_kubernetes_configmap_carries_a_valid_config() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/configmap.yaml");
    let text = std::fs::read_to_string(&root).unwrap();
    let doc: serde_norway::Value = serde_norway::from_str(&text).unwrap();
    let config = doc["data"]["config.yaml"]
        .as_str()
        .expect("data.config.yaml");
    let loaded = failover_agent::config::parse_on(
        config,
        "configmap.yaml:data.config.yaml",
        &failover_agent::config::Host::defaults(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let cfg = loaded.config;
    assert_eq!(cfg.node.pin_path, Path::new("/sys/fs/bpf/failover"));
    assert!(
        cfg.node.snat_ports.max < 32_768,
        "SNAT ports below the ephemeral range"
    );
}

/// Every `failover_*` series an alert or dashboard panel queries must be
/// one the agent registers (`src/metrics.rs`), or the alert never fires.
#[test]
fn alerts_and_dashboard_query_only_metrics_the_agent_exports() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let source = std::fs::read_to_string(dir.join("src/metrics.rs")).unwrap();
    for file in ["prometheusrule.yaml", "grafana-dashboard.json"] {
        let text = std::fs::read_to_string(dir.join("../deploy/kubernetes").join(file)).unwrap();
        let mut names: Vec<&str> = text
            .match_indices("failover_")
            // Only where a name starts (not inside failover_failover_...).
            .filter(|(i, _)| !text[..*i].ends_with(|c: char| c.is_ascii_lowercase() || c == '_'))
            .map(|(i, _)| {
                let rest = &text[i..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                    .unwrap_or(rest.len());
                &rest[..end]
            })
            // Labels and identifiers that are not series names.
            .filter(|n| !matches!(*n, "failover_" | "failover_agent"))
            .collect();
        names.sort_unstable();
        names.dedup();
        assert!(!names.is_empty(), "{file} queries no failover_ series");
        for name in names {
            let base = name.strip_prefix("failover_").unwrap_or(name);
            let base = ["_total", "_bucket", "_count", "_sum", "_info"]
                .iter()
                .fold(base, |b, suffix| b.strip_suffix(suffix).unwrap_or(b));
            assert!(
                source.contains(&format!("\"{base}\"")),
                "{file}: {name} is not registered in src/metrics.rs"
            );
        }
    }
}
