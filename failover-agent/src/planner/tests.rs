//! Table-driven planner tests. Configs are built in code; the parts the
//! planner ignores (node, probe) go through serde so that fields the config
//! module adds later keep their defaults here.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::json;

use super::*;
use crate::config::{Config, Policy, Service};

pub(super) fn be(
    name: &str,
    jurisdiction: &str,
    region: &str,
    tier: u8,
    weight: u32,
    labels: &[(&str, &str)],
) -> Backend {
    let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
    serde_json::from_value(json!({
        "name": name, "address": "192.0.2.10", "port": 8000, "cloud": "test",
        "region": region, "jurisdiction": jurisdiction, "tier": tier,
        "weight": weight, "labels": labels,
    }))
    .expect("backend fixture")
}

pub(super) fn svc(name: &str, pool: &[&str], policy: Policy) -> Service {
    serde_json::from_value(json!({
        "name": name, "vip": "203.0.113.1", "port": 443, "protocol": "tcp",
        "backends": pool, "probe": { "kind": "tcp" },
        "policy": serde_json::to_value(policy).expect("policy"),
    }))
    .expect("service fixture")
}

pub(super) fn cfg(services: Vec<Service>, backends: Vec<Backend>) -> Config {
    let mut c: Config = serde_json::from_value(json!({
        "node": {
            "interfaces": ["eth0"], "snat_address": "198.51.100.1",
            "snat_ports": { "min": 20000, "max": 60000 },
        },
        "services": [], "backends": [],
    }))
    .expect("config fixture");
    c.services = services;
    c.backends = backends;
    c
}

/// Ids 1, 2, ... in config order.
fn ids_of(c: &Config) -> BackendIds {
    c.backends
        .iter()
        .zip(1..)
        .map(|(b, id)| (b.name.clone(), id))
        .collect()
}

fn ring_ids(ring: &[u32]) -> BTreeSet<u32> {
    ring.iter()
        .copied()
        .filter(|&id| id != NO_BACKEND)
        .collect()
}

fn ring_share(ring: &[u32], id: u32) -> f64 {
    ring.iter().filter(|&&x| x == id).count() as f64 / ring.len() as f64
}

const UP: BackendHealth = BackendHealth::Up;
const DOWN: BackendHealth = BackendHealth::Down;
const DRAIN: BackendHealth = BackendHealth::Draining;
const fn deg(f: f64) -> BackendHealth {
    BackendHealth::Degraded { weight_factor: f }
}

/// Two tiers of two: a1, a2 (tier 0), b1, b2 (tier 1), weight 100 each.
fn two_tiers(policy: Policy, a1_weight: u32) -> Config {
    cfg(
        vec![svc("chat", &["a1", "a2", "b1", "b2"], policy)],
        vec![
            be("a1", "EU", "r0", 0, a1_weight, &[]),
            be("a2", "EU", "r0", 0, 100, &[]),
            be("b1", "EU", "r1", 1, 100, &[]),
            be("b2", "EU", "r1", 1, 100, &[]),
        ],
    )
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Want {
    Normal,
    Spill(f64),
    Override(u8),
    FailOpen,
    Closed,
}

struct Case {
    name: &'static str,
    health: [BackendHealth; 4],
    policy: Policy,
    a1_weight: u32,
    ov: Option<u8>,
    mode: Want,
    /// Share of each of a1, a2, b1, b2.
    shares: [f64; 4],
    /// Substrings the justification must contain.
    says: &'static [&'static str],
}

fn pol(f: impl FnOnce(&mut Policy)) -> Policy {
    let mut p = Policy {
        ring_size: 4099,
        ..Policy::default()
    };
    f(&mut p);
    p
}

#[test]
fn table() {
    let open = |p: &mut Policy| p.panic = PanicMode::FailOpen;
    let cases = [
        Case {
            name: "all up: tier 0 only",
            health: [UP, UP, UP, UP],
            policy: pol(|_| {}),
            a1_weight: 100,
            ov: None,
            mode: Want::Normal,
            shares: [0.5, 0.5, 0.0, 0.0],
            says: &["tier 0: 2/2 healthy, health 100%, x1.4 = 140% -> 100%"],
        },
        Case {
            name: "weights split a tier",
            health: [UP, UP, UP, UP],
            policy: pol(|_| {}),
            a1_weight: 300,
            ov: None,
            mode: Want::Normal,
            shares: [0.75, 0.25, 0.0, 0.0],
            says: &[],
        },
        Case {
            name: "half of tier 0 down: 30% spills",
            health: [DOWN, UP, UP, UP],
            policy: pol(|_| {}),
            a1_weight: 100,
            ov: None,
            mode: Want::Spill(0.3),
            shares: [0.0, 0.7, 0.15, 0.15],
            says: &[
                "tier 0: 1/2 healthy, health 50%, x1.4 = 70% -> 70%",
                "30% spills from tier 0 to tier 1",
            ],
        },
        Case {
            name: "draining is like down for new flows",
            health: [DRAIN, UP, UP, UP],
            policy: pol(|_| {}),
            a1_weight: 100,
            ov: None,
            mode: Want::Spill(0.3),
            shares: [0.0, 0.7, 0.15, 0.15],
            says: &[],
        },
        Case {
            name: "spill follows health share without headroom",
            health: [deg(0.5), UP, UP, UP],
            policy: pol(|p| p.overprovisioning = 1.0),
            a1_weight: 100,
            ov: None,
            mode: Want::Spill(0.25),
            shares: [0.25, 0.5, 0.125, 0.125],
            says: &["tier 0: 2/2 healthy (1 degraded), health 75%, x1 = 75% -> 75%"],
        },
        Case {
            name: "degraded within headroom: tier keeps all, reduced weight",
            health: [deg(0.5), UP, UP, UP],
            policy: pol(|_| {}),
            a1_weight: 100,
            ov: None,
            mode: Want::Normal,
            shares: [1.0 / 3.0, 2.0 / 3.0, 0.0, 0.0],
            says: &[],
        },
        Case {
            name: "degraded to zero counts as down",
            health: [deg(0.0), UP, UP, UP],
            policy: pol(|_| {}),
            a1_weight: 100,
            ov: None,
            mode: Want::Spill(0.3),
            shares: [0.0, 0.7, 0.15, 0.15],
            says: &[],
        },
        Case {
            name: "everything weak: normalised",
            health: [DOWN, UP, DOWN, deg(0.5)],
            policy: pol(|p| p.overprovisioning = 1.0),
            a1_weight: 100,
            ov: None,
            mode: Want::Spill(1.0 / 3.0),
            shares: [0.0, 2.0 / 3.0, 0.0, 1.0 / 3.0],
            says: &["shares normalised"],
        },
        Case {
            name: "tier 0 dead: all to tier 1",
            health: [DOWN, DOWN, UP, UP],
            policy: pol(|_| {}),
            a1_weight: 100,
            ov: None,
            mode: Want::Spill(1.0),
            shares: [0.0, 0.0, 0.5, 0.5],
            says: &["100% spills from tier 0 to tier 1"],
        },
        Case {
            name: "nothing healthy, fail closed",
            health: [DOWN, DOWN, DOWN, DRAIN],
            policy: pol(|_| {}),
            a1_weight: 100,
            ov: None,
            mode: Want::Closed,
            shares: [0.0; 4],
            says: &["fail closed: none of 4 allowed backends healthy (3 down, 1 draining)"],
        },
        Case {
            name: "nothing healthy, fail open skips draining",
            health: [DOWN, DOWN, DOWN, DRAIN],
            policy: pol(open),
            a1_weight: 100,
            ov: None,
            mode: Want::FailOpen,
            shares: [1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0, 0.0],
            says: &["panic, fail open"],
        },
        Case {
            name: "fail open with everything draining closes",
            health: [DRAIN; 4],
            policy: pol(open),
            a1_weight: 100,
            ov: None,
            mode: Want::Closed,
            shares: [0.0; 4],
            says: &["nothing to open to"],
        },
        Case {
            name: "standby share keeps tier 1 warm",
            health: [UP, UP, UP, UP],
            policy: pol(|p| p.standby_share = 0.1),
            a1_weight: 100,
            ov: None,
            mode: Want::Normal,
            shares: [0.45, 0.45, 0.05, 0.05],
            says: &["standby floor 10%: 10% moved to tier 1"],
        },
        Case {
            name: "standby share needs a healthy standby",
            health: [UP, UP, DOWN, DOWN],
            policy: pol(|p| p.standby_share = 0.1),
            a1_weight: 100,
            ov: None,
            mode: Want::Normal,
            shares: [0.5, 0.5, 0.0, 0.0],
            says: &[],
        },
        Case {
            name: "override forces tier 1",
            health: [UP, UP, UP, DOWN],
            policy: pol(|_| {}),
            a1_weight: 100,
            ov: Some(1),
            mode: Want::Override(1),
            shares: [0.0, 0.0, 1.0, 0.0],
            says: &["override: all traffic forced to tier 1"],
        },
        Case {
            name: "override to a dead tier falls back",
            health: [UP, UP, DOWN, DOWN],
            policy: pol(|_| {}),
            a1_weight: 100,
            ov: Some(1),
            mode: Want::Normal,
            shares: [0.5, 0.5, 0.0, 0.0],
            says: &["override to tier 1 ignored: no healthy allowed backend there"],
        },
        Case {
            name: "override to a tier that does not exist falls back",
            health: [UP, UP, UP, UP],
            policy: pol(|_| {}),
            a1_weight: 100,
            ov: Some(7),
            mode: Want::Normal,
            shares: [0.5, 0.5, 0.0, 0.0],
            says: &["override to tier 7 ignored"],
        },
    ];
    for case in cases {
        let c = two_tiers(case.policy.clone(), case.a1_weight);
        let ids = ids_of(&c);
        let health: HealthView = ["a1", "a2", "b1", "b2"]
            .into_iter()
            .zip(case.health)
            .collect();
        let overrides: Overrides = case
            .ov
            .map(|t| ("chat".to_owned(), Override { to_tier: t }))
            .into_iter()
            .collect();
        let plan = plan(&c, &health, &ids, &overrides);
        let sp = plan.service("chat").expect("planned");
        let name = case.name;
        let ctx = format!("{name}: {}", sp.justification);

        match (case.mode, &sp.mode) {
            (Want::Normal, Mode::Normal)
            | (Want::FailOpen, Mode::PanicFailOpen)
            | (Want::Closed, Mode::FailClosed) => {}
            (Want::Override(a), Mode::Override { tier }) => assert_eq!(a, *tier, "{ctx}"),
            (Want::Spill(want), Mode::Spill { spilled, .. }) => {
                assert!((want - spilled).abs() < 1e-9, "{ctx}: spilled {spilled}");
            }
            (want, got) => panic!("{ctx}: mode {got:?}, want {want:?}"),
        }
        assert_eq!(sp.ring.len(), 4099, "{ctx}");
        assert_eq!(sp.is_closed(), case.mode == Want::Closed, "{ctx}");
        for (i, b) in sp.backends.iter().enumerate() {
            let want = case.shares[i];
            assert!(
                (b.share - want).abs() < 1e-9,
                "{ctx}: {} share {}",
                b.name,
                b.share
            );
            // The ring follows the shares (Maglev rounding only).
            let got = ring_share(&sp.ring, b.id);
            assert!(
                (got - want).abs() < 0.002,
                "{ctx}: {} ring share {got}",
                b.name
            );
            assert_eq!(b.weight == 0, want == 0.0, "{ctx}: {}", b.name);
        }
        if !sp.is_closed() {
            assert!(sp.ring.iter().all(|&id| id != NO_BACKEND), "{ctx}: holes");
        }
        for s in case.says {
            assert!(sp.justification.contains(s), "{ctx}\n  missing: {s}");
        }
        assert!(
            sp.sovereignty_ok && sp.sovereignty.starts_with("sovereignty ok"),
            "{ctx}"
        );
        let total: f64 = sp.tiers.iter().map(|t| t.traffic).sum();
        let want_total = if sp.is_closed() { 0.0 } else { 1.0 };
        assert!(
            (total - want_total).abs() < 1e-9,
            "{ctx}: tiers {:?}",
            sp.tiers
        );
    }
}

#[test]
fn active_tiers_and_tier_report() {
    let c = two_tiers(pol(|_| {}), 100);
    let health: HealthView = [("a1", DOWN), ("a2", UP), ("b1", UP), ("b2", UP)]
        .into_iter()
        .collect();
    let p = plan(&c, &health, &ids_of(&c), &Overrides::new());
    let sp = &p.services[0];
    assert_eq!(sp.active_tiers, [0, 1]);
    assert_eq!(sp.tiers[0].backends, 2);
    assert_eq!(sp.tiers[0].healthy, 1);
    assert!((sp.tiers[0].health - 0.5).abs() < 1e-9);
    assert!((sp.tiers[1].traffic - 0.3).abs() < 1e-9);
    let health: HealthView = [("a1", UP), ("a2", UP)].into_iter().collect();
    let p = plan(&c, &health, &ids_of(&c), &Overrides::new());
    assert_eq!(p.services[0].active_tiers, [0]);
}

#[test]
fn unknown_health_counts_as_down() {
    let c = two_tiers(pol(|_| {}), 100);
    let p = plan(&c, &HealthView::new(), &ids_of(&c), &Overrides::new());
    assert_eq!(p.services[0].mode, Mode::FailClosed);
    assert!(p.services[0].is_closed());
}

#[test]
fn default_ring_is_full_size() {
    let c = two_tiers(Policy::default(), 100);
    let health: HealthView = [("a1", UP)].into_iter().collect();
    let p = plan(&c, &health, &ids_of(&c), &Overrides::new());
    assert_eq!(p.services[0].ring.len(), 65_537);
    assert_eq!(ring_ids(&p.services[0].ring), BTreeSet::from([1]));
}

#[test]
fn bad_ring_size_fails_closed() {
    for size in [4098, 0, 70_001] {
        let c = two_tiers(pol(|p| p.ring_size = size), 100);
        let health: HealthView = [("a1", UP)].into_iter().collect();
        let p = plan(&c, &health, &ids_of(&c), &Overrides::new());
        let sp = &p.services[0];
        assert_eq!(sp.mode, Mode::FailClosed, "{size}");
        assert!(sp.is_closed() && sp.active_tiers.is_empty(), "{size}");
        assert!(
            sp.justification.contains("failing closed"),
            "{}",
            sp.justification
        );
    }
}

#[test]
fn backend_without_id_is_left_out() {
    let c = two_tiers(pol(|_| {}), 100);
    let mut ids = ids_of(&c);
    ids.remove("a1");
    let health: HealthView = ["a1", "a2", "b1", "b2"]
        .into_iter()
        .map(|n| (n, UP))
        .collect();
    let p = plan(&c, &health, &ids, &Overrides::new());
    let sp = &p.services[0];
    assert_eq!(ring_ids(&sp.ring), BTreeSet::from([2]));
    assert!(sp.justification.contains("a1 has no data-plane id"));
}

#[test]
fn deterministic_and_independent_of_config_order() {
    let c = two_tiers(pol(|p| p.standby_share = 0.2), 250);
    let health: HealthView = [("a1", UP), ("a2", deg(0.3)), ("b1", UP), ("b2", UP)]
        .into_iter()
        .collect();
    let ids = ids_of(&c);
    let p1 = plan(&c, &health, &ids, &Overrides::new());
    assert_eq!(p1, plan(&c, &health, &ids, &Overrides::new()));
    let mut shuffled = c.clone();
    shuffled.backends.reverse();
    shuffled.services[0].backends.rotate_left(1);
    let p2 = plan(&shuffled, &health, &ids, &Overrides::new());
    assert_eq!(p1.services[0].ring, p2.services[0].ring);
}

#[test]
fn duplicate_pool_entries_count_once() {
    let mut c = two_tiers(pol(|_| {}), 100);
    c.services[0].backends.push("a1".into());
    let health: HealthView = [("a1", UP), ("a2", UP)].into_iter().collect();
    let p = plan(&c, &health, &ids_of(&c), &Overrides::new());
    let sp = &p.services[0];
    assert_eq!(sp.backends.len(), 4);
    assert!((ring_share(&sp.ring, 1) - 0.5).abs() < 0.002);
}

#[test]
fn shared_id_between_allowed_and_denied_fails_closed() {
    // A broken id map that gives a US backend an EU backend's id would let
    // the data plane reach the US backend: the final check refuses it.
    let c = cfg(
        vec![svc(
            "eu",
            &["eu1", "us1"],
            pol(|p| p.allowed_jurisdictions = vec!["EU".into()]),
        )],
        vec![
            be("eu1", "EU", "r", 0, 1, &[]),
            be("us1", "US", "r", 0, 1, &[]),
        ],
    );
    let ids: BackendIds = [("eu1".to_owned(), 5), ("us1".to_owned(), 5)]
        .into_iter()
        .collect();
    let health: HealthView = [("eu1", UP), ("us1", UP)].into_iter().collect();
    let p = plan(&c, &health, &ids, &Overrides::new());
    let sp = &p.services[0];
    assert!(!sp.sovereignty_ok);
    assert!(sp.is_closed());
    assert_eq!(sp.mode, Mode::FailClosed);
    assert!(sp.sovereignty.contains("VIOLATION"), "{}", sp.sovereignty);
}

#[test]
fn undefined_pool_member_is_excluded() {
    let c = cfg(
        vec![svc("s", &["ghost", "a"], pol(|_| {}))],
        vec![be("a", "EU", "r", 0, 1, &[])],
    );
    let health: HealthView = [("a", UP), ("ghost", UP)].into_iter().collect();
    let mut ids = ids_of(&c);
    ids.insert("ghost".into(), 9);
    let p = plan(&c, &health, &ids, &Overrides::new());
    assert_eq!(ring_ids(&p.services[0].ring), BTreeSet::from([1]));
    assert!(p.services[0].sovereignty.contains("ghost (not defined)"));
}

#[test]
fn effective_weights_follow_health() {
    let ids_for = |c: &Config| ids_of(c);
    let weights = |p: &ServicePlan| -> Vec<(String, u32)> {
        p.backends
            .iter()
            .map(|b| (b.name.clone(), b.effective_weight))
            .collect()
    };
    let w = |v: [(&str, u32); 4]| -> Vec<(String, u32)> {
        v.iter().map(|(n, w)| ((*n).to_owned(), *w)).collect()
    };
    // a1 rate limited (its probe's degraded_weight 0.25): 25 of 100; the
    // idle tier 1 (tier 0 keeps all: 62.5% x 2) is not in the ring.
    let c = two_tiers(pol(|p| p.overprovisioning = 2.0), 100);
    let h: HealthView = [("a1", deg(0.25)), ("a2", UP), ("b1", UP), ("b2", UP)]
        .into_iter()
        .collect();
    let p = plan(&c, &h, &ids_for(&c), &Overrides::new());
    assert_eq!(
        weights(&p.services[0]),
        w([("a1", 25), ("a2", 100), ("b1", 0), ("b2", 0)])
    );
    // Nothing healthy, fail open: the configured weights.
    let c = two_tiers(pol(|p| p.panic = PanicMode::FailOpen), 40);
    let h: HealthView = [("a1", DOWN), ("a2", DOWN), ("b1", DOWN), ("b2", DRAIN)]
        .into_iter()
        .collect();
    let p = plan(&c, &h, &ids_for(&c), &Overrides::new());
    assert_eq!(
        weights(&p.services[0]),
        w([("a1", 40), ("a2", 100), ("b1", 100), ("b2", 0)])
    );
    // Fail closed: nothing.
    let c = two_tiers(pol(|_| {}), 100);
    let p = plan(&c, &h, &ids_for(&c), &Overrides::new());
    assert!(
        p.services[0]
            .backends
            .iter()
            .all(|b| b.effective_weight == 0)
    );
    // A tiny factor never rounds a serving backend's weight to 0.
    assert_eq!(deg(0.001).effective_weight(100), 1);
    assert_eq!(DOWN.effective_weight(100), 0);
}

#[test]
fn check_override_refuses_tiers_outside_the_policy() {
    let c = sovereign_config(257);
    assert_eq!(
        check_override(&c, "eu-open", Override { to_tier: 0 }),
        Ok(())
    );
    assert_eq!(
        check_override(&c, "eu-open", Override { to_tier: 1 }),
        Ok(())
    );
    // Tier 2 has a backend (eu-outside), in no service's pool: the tier
    // does not exist for them, whatever the policy says.
    let err = check_override(&c, "us-east", Override { to_tier: 2 }).unwrap_err();
    assert_eq!(
        err,
        PlanError::NoSuchTier {
            service: "us-east".into(),
            tier: 2,
            tiers: vec![0, 1],
        }
    );
    assert_eq!(
        err.to_string(),
        "service \"us-east\" has no backend in tier 2 (its pool's tiers: 0, 1)"
    );
    assert!(matches!(
        check_override(&c, "eu-open", Override { to_tier: 7 }),
        Err(PlanError::NoSuchTier { tier: 7, .. })
    ));
    // A tier whose every backend the policy excludes: the policy's doing.
    let mut c = c;
    c.services[3].backends = vec!["us-a1".into(), "eu-b1".into()];
    let err = check_override(&c, "us-east", Override { to_tier: 1 }).unwrap_err();
    assert_eq!(
        err,
        PlanError::TierNotAllowed {
            service: "us-east".into(),
            tier: 1,
            policy: "region in [us-east-1]".into(),
            allowed_tiers: vec![0],
        }
    );
    assert!(err.to_string().contains("allows no backend there"));
    assert_eq!(
        check_override(&c, "nope", Override { to_tier: 0 }),
        Err(PlanError::UnknownService("nope".into()))
    );
}

#[test]
fn hundred_backends_full_ring() {
    // The size of the performance target; timing is measured by the bench.
    let names: Vec<String> = (0..100).map(|i| format!("be-{i:03}")).collect();
    let backends = names
        .iter()
        .enumerate()
        .map(|(i, n)| be(n, "EU", "r", (i / 50) as u8, 100, &[]))
        .collect();
    let pool: Vec<&str> = names.iter().map(String::as_str).collect();
    let c = cfg(vec![svc("big", &pool, Policy::default())], backends);
    let health: HealthView = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), if i % 3 == 0 { DOWN } else { UP }))
        .collect();
    let p = plan(&c, &health, &ids_of(&c), &Overrides::new());
    let sp = &p.services[0];
    assert_eq!(sp.ring.len(), 65_537);
    assert!(sp.ring.iter().all(|&id| id != NO_BACKEND));
    // 33/50 healthy in tier 0 (66%) x1.4 = 92.4%: 7.6% spills.
    match sp.mode {
        Mode::Spill { spilled, .. } => assert!((spilled - 0.076).abs() < 1e-9, "{spilled}"),
        ref m => panic!("{m:?}"),
    }
}

// ---- Exhaustive sovereignty ----

/// 3 EU and 3 US backends over 2 tiers, every one in every pool, plus an
/// EU backend outside all pools; four services with different policies.
fn sovereign_config(ring_size: u32) -> Config {
    let backends = vec![
        be("eu-a1", "EU", "eu-west-1", 0, 100, &[("gpu", "h100")]),
        be("eu-a2", "EU", "eu-central-1", 0, 100, &[]),
        be("us-a1", "US", "us-east-1", 0, 100, &[("gpu", "h100")]),
        be("eu-b1", "EU", "eu-west-1", 1, 100, &[("gpu", "h100")]),
        be("us-b1", "US", "us-east-1", 1, 50, &[]),
        be("us-b2", "US", "us-west-2", 1, 100, &[("gpu", "h100")]),
        be("eu-outside", "EU", "eu-west-1", 2, 100, &[("gpu", "h100")]),
    ];
    let pool = ["eu-a1", "eu-a2", "us-a1", "eu-b1", "us-b1", "us-b2"];
    let base = |f: &dyn Fn(&mut Policy)| {
        let mut p = Policy {
            ring_size,
            ..Policy::default()
        };
        f(&mut p);
        p
    };
    let services = vec![
        svc(
            "eu-open",
            &pool,
            base(&|p| {
                p.allowed_jurisdictions = vec!["EU".into()];
                p.panic = PanicMode::FailOpen;
            }),
        ),
        svc(
            "eu-closed",
            &pool,
            base(&|p| {
                p.allowed_jurisdictions = vec!["EU".into(), "CH".into()];
                p.panic = PanicMode::FailClosed;
                p.standby_share = 0.2;
            }),
        ),
        svc(
            "gpu",
            &pool,
            base(&|p| {
                p.required_labels = [("gpu".to_owned(), "h100".to_owned())].into();
                p.panic = PanicMode::FailClosed;
                p.overprovisioning = 1.0;
            }),
        ),
        svc(
            "us-east",
            &pool,
            base(&|p| {
                p.allowed_regions = vec!["us-east-1".into()];
                p.panic = PanicMode::FailOpen;
            }),
        ),
    ];
    cfg(services, backends)
}

#[test]
fn sovereignty_holds_in_every_failure_combination() {
    let c = sovereign_config(257);
    let ids = ids_of(&c);
    let pool = ["eu-a1", "eu-a2", "us-a1", "eu-b1", "us-b1", "us-b2"];
    // Written out by hand, not derived from the planner's policy code.
    let allowed: BTreeMap<&str, (&[&str], PanicMode)> = [
        (
            "eu-open",
            (&["eu-a1", "eu-a2", "eu-b1"][..], PanicMode::FailOpen),
        ),
        (
            "eu-closed",
            (&["eu-a1", "eu-a2", "eu-b1"][..], PanicMode::FailClosed),
        ),
        (
            "gpu",
            (
                &["eu-a1", "us-a1", "eu-b1", "us-b2"][..],
                PanicMode::FailClosed,
            ),
        ),
        ("us-east", (&["us-a1", "us-b1"][..], PanicMode::FailOpen)),
    ]
    .into();
    let id = |n: &str| ids[n];
    let states = [UP, deg(0.5), DOWN, DRAIN];
    let override_sets: [Overrides; 3] = [
        Overrides::new(),
        c.services
            .iter()
            .map(|s| (s.name.clone(), Override { to_tier: 0 }))
            .collect(),
        c.services
            .iter()
            .map(|s| (s.name.clone(), Override { to_tier: 1 }))
            .collect(),
    ];
    let mut plans = 0usize;
    let mut closed_seen = 0usize;
    let mut open_panic_seen = 0usize;
    for combo in 0..states.len().pow(pool.len() as u32) {
        let mut health = HealthView::new();
        health.set("eu-outside", UP);
        let mut k = combo;
        for name in pool {
            health.set(name, states[k % states.len()]);
            k /= states.len();
        }
        let healthy = |n: &str| health.get(n).factor() > 0.0;
        for overrides in &override_sets {
            let plan = plan(&c, &health, &ids, overrides);
            for sp in &plan.services {
                plans += 1;
                let (allowed_names, panic) = allowed[sp.service.as_str()];
                let allowed_ids: BTreeSet<u32> = allowed_names.iter().map(|n| id(n)).collect();
                let healthy_ids: BTreeSet<u32> = allowed_names
                    .iter()
                    .filter(|n| healthy(n))
                    .map(|n| id(n))
                    .collect();
                let in_ring = ring_ids(&sp.ring);
                let ctx = || {
                    format!(
                        "{} {health:?} {overrides:?}: {}",
                        sp.service, sp.justification
                    )
                };

                // Never a disallowed backend, in any mode.
                assert!(
                    in_ring.is_subset(&allowed_ids),
                    "{} leaked {in_ring:?}",
                    ctx()
                );
                assert!(sp.sovereignty_ok, "{}", ctx());
                assert!(!in_ring.contains(&id("eu-outside")), "{}", ctx());

                if healthy_ids.is_empty() {
                    match panic {
                        PanicMode::FailClosed => {
                            closed_seen += 1;
                            assert!(sp.is_closed(), "{}", ctx());
                            assert_eq!(sp.mode, Mode::FailClosed, "{}", ctx());
                        }
                        PanicMode::FailOpen => {
                            let open: BTreeSet<u32> = allowed_names
                                .iter()
                                .filter(|n| health.get(n) != DRAIN)
                                .map(|n| id(n))
                                .collect();
                            assert_eq!(in_ring, open, "{}", ctx());
                            if !open.is_empty() {
                                open_panic_seen += 1;
                                assert_eq!(sp.mode, Mode::PanicFailOpen, "{}", ctx());
                            }
                        }
                    }
                } else {
                    // Something allowed is healthy: only healthy ones serve,
                    // and the ring has no holes.
                    assert!(in_ring.is_subset(&healthy_ids), "{}", ctx());
                    assert!(sp.ring.iter().all(|&x| x != NO_BACKEND), "{}", ctx());
                    let forced = overrides.get(&sp.service).map(|o| o.to_tier);
                    let tier_of = |x: u32| c.backends[(x - 1) as usize].tier;
                    if let Some(t) = forced
                        && healthy_ids.iter().any(|&x| tier_of(x) == t)
                    {
                        assert!(in_ring.iter().all(|&x| tier_of(x) == t), "{}", ctx());
                        assert_eq!(sp.mode, Mode::Override { tier: t }, "{}", ctx());
                    }
                }
            }
        }
    }
    assert_eq!(plans, 4096 * 3 * 4);
    assert!(closed_seen > 0 && open_panic_seen > 0);
}

#[test]
fn load_scales_shares_within_a_tier_and_multiplies_with_degraded() {
    let ids_for = |c: &Config| ids_of(c);
    let c = two_tiers(pol(|_| {}), 100);
    let mut h: HealthView = [("a1", UP), ("a2", UP), ("b1", UP), ("b2", UP)]
        .into_iter()
        .collect();
    h.set_load("a1", 0.5);
    let p = plan(&c, &h, &ids_for(&c), &Overrides::new());
    let s = &p.services[0];
    let by = |n: &str| s.backends.iter().find(|b| b.name == n).unwrap().clone();
    assert_eq!(s.mode, Mode::Normal, "load never spills a tier");
    assert_eq!((by("a1").effective_weight, by("a1").load), (50, 0.5));
    assert_eq!(by("a2").effective_weight, 100);
    assert!(
        (by("a1").share - 1.0 / 3.0).abs() < 1e-9,
        "{}",
        by("a1").share
    );
    assert!((by("a2").share - 2.0 / 3.0).abs() < 1e-9);
    let ring_a1 = s.ring.iter().filter(|&&id| id == by("a1").id).count();
    let ring_a2 = s.ring.iter().filter(|&&id| id == by("a2").id).count();
    assert!(
        ring_a1 * 2 > ring_a2 * 9 / 10 && ring_a1 * 2 < ring_a2 * 11 / 10,
        "ring slots {ring_a1} vs {ring_a2}"
    );
    // 429s or a slow first token (degraded 0.5) and load 0.5: 0.25.
    h.set("a1", deg(0.5));
    let p = plan(&c, &h, &ids_for(&c), &Overrides::new());
    let a1 = p.services[0]
        .backends
        .iter()
        .find(|b| b.name == "a1")
        .unwrap();
    assert_eq!(a1.effective_weight, 25);
    assert!((a1.share - 0.25 / 1.25).abs() < 1e-9, "{}", a1.share);
    // Every backend of a tier equally loaded: the same shares as none.
    let mut even: HealthView = [("a1", UP), ("a2", UP), ("b1", UP), ("b2", UP)]
        .into_iter()
        .collect();
    let plain = plan(&c, &even, &ids_for(&c), &Overrides::new());
    even.set_load("a1", 0.2);
    even.set_load("a2", 0.2);
    let loaded = plan(&c, &even, &ids_for(&c), &Overrides::new());
    assert_eq!(plain.services[0].ring, loaded.services[0].ring);
    assert_eq!(plain.services[0].mode, loaded.services[0].mode);
    // Load never takes a backend out, nor brings a down one back.
    h.set("a1", UP);
    h.set_load("a1", 0.0);
    h.set_load("a2", f64::NAN);
    h.set("b1", DOWN);
    h.set_load("b1", 1.0);
    let p = plan(&c, &h, &ids_for(&c), &Overrides::new());
    let w: Vec<u32> = p.services[0]
        .backends
        .iter()
        .map(|b| b.effective_weight)
        .collect();
    assert_eq!(w, [100, 100, 0, 0]);
    assert_eq!(UP.loaded_weight(100, 0.001), 1);
    assert_eq!(deg(0.5).loaded_weight(100, 0.3), 15);
    assert_eq!(DOWN.loaded_weight(100, 1.0), 0);
}

/// A dual-stack `chat`: a1, a2, b1, b2 over IPv4 and a1-6 .. b2-6 over
/// IPv6, a* in tier 0 and b* in tier 1; ids 1..=8 in that order.
fn dual_stack(policy: Policy) -> Config {
    let pool = ["a1", "a2", "b1", "b2", "a1-6", "a2-6", "b1-6", "b2-6"];
    let mut s = svc("chat", &pool, policy);
    s.vip6 = Some("2001:db8::10".parse().unwrap());
    let backends = pool
        .iter()
        .enumerate()
        .map(|(i, &name)| {
            let mut b = be(name, "EU", "r0", u8::from(name.starts_with('b')), 100, &[]);
            if i >= 4 {
                b.address = format!("2001:db8:1::{}", i + 1).parse().unwrap();
            }
            b
        })
        .collect();
    cfg(vec![s], backends)
}

#[test]
fn each_family_of_a_dual_stack_service_fails_over_on_its_own() {
    // IPv4's tier 0 healthy, IPv6's down: IPv6 clients go to IPv6's tier 1
    // while IPv4 clients stay home. Planned over the whole pool, tier 0
    // was "2 of 4 healthy x 2 = 100%" and IPv6's ring came out empty.
    let c = dual_stack(pol(|_| {}));
    let health: HealthView = [
        ("a1", UP),
        ("a2", UP),
        ("b1", UP),
        ("b2", UP),
        ("a1-6", DOWN),
        ("a2-6", DOWN),
        ("b1-6", UP),
        ("b2-6", UP),
    ]
    .into_iter()
    .collect();
    let p = plan(&c, &health, &ids_of(&c), &Overrides::new());
    let sp = &p.services[0];
    assert_eq!(
        ring_ids(&sp.ring),
        BTreeSet::from([1, 2]),
        "IPv4 stays in tier 0"
    );
    let ring6 = sp.ring6.as_ref().expect("a ring for vip6");
    assert_eq!(
        ring_ids(ring6),
        BTreeSet::from([7, 8]),
        "IPv6 fails over to tier 1"
    );
    assert_eq!(sp.mode, Mode::Normal);
    assert!(
        matches!(sp.mode6, Some(Mode::Spill { from_tier: 0, .. })),
        "{:?}",
        sp.mode6
    );
    assert!(
        sp.justification.starts_with("IPv4: "),
        "{}",
        sp.justification
    );
    assert!(
        sp.justification.contains("; IPv6: "),
        "{}",
        sp.justification
    );
    assert_eq!(sp.active_tiers, [0, 1]);
    // Shares are each family's own: IPv4's tier 0 and IPv6's tier 1 each
    // take all of their VIP's new flows.
    let share = |n: &str| sp.backends.iter().find(|b| b.name == n).unwrap().share;
    assert!((share("a1") + share("a2") - 1.0).abs() < 1e-9);
    assert!((share("b1-6") + share("b2-6") - 1.0).abs() < 1e-9);
    assert_eq!(share("a1-6") + share("b1"), 0.0);
    // In pool order, each with its family.
    let names: Vec<(&str, bool)> = sp
        .backends
        .iter()
        .map(|b| (b.name.as_str(), b.ipv6))
        .collect();
    assert_eq!(names[0], ("a1", false));
    assert_eq!(names[4], ("a1-6", true));
}

#[test]
fn a_dual_stack_family_with_nothing_healthy_fails_alone() {
    let c = dual_stack(pol(|p| p.panic = crate::config::PanicMode::FailClosed));
    let health: HealthView = [("a1", UP), ("a2", UP), ("b1", UP), ("b2", UP)]
        .into_iter()
        .collect();
    let p = plan(&c, &health, &ids_of(&c), &Overrides::new());
    let sp = &p.services[0];
    assert_eq!(sp.mode, Mode::Normal);
    assert_eq!(sp.mode6, Some(Mode::FailClosed));
    assert_eq!(ring_ids(&sp.ring), BTreeSet::from([1, 2]));
    assert!(ring_ids(sp.ring6.as_ref().unwrap()).is_empty());
    assert!(!sp.is_closed(), "IPv4 still serves");
    // Fail open panics IPv6 alone: its own backends, never IPv4's.
    let c = dual_stack(pol(|p| p.panic = crate::config::PanicMode::FailOpen));
    let p = plan(&c, &health, &ids_of(&c), &Overrides::new());
    let sp = &p.services[0];
    assert_eq!(sp.mode6, Some(Mode::PanicFailOpen));
    assert_eq!(*sp.mode_of(true), Mode::PanicFailOpen);
    assert_eq!(*sp.mode_of(false), Mode::Normal);
    assert_eq!(
        ring_ids(sp.ring6.as_ref().unwrap()),
        BTreeSet::from([5, 6, 7, 8])
    );
    assert_eq!(ring_ids(&sp.ring), BTreeSet::from([1, 2]));
}
