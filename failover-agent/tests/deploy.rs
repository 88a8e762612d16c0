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
    let cfg = failover_agent::config::parse(config, "configmap.yaml:data.config.yaml")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.node.pin_path, Path::new("/sys/fs/bpf/failover"));
    assert!(
        cfg.node.snat_ports.max < 32_768,
        "SNAT ports below the ephemeral range"
    );
}
