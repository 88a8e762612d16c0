use std::time::{Duration, Instant};

use super::*;
use crate::config::{LoadProfile, LoadScrape};

/// minimal.yaml's service, with a third backend, and a load facet on
/// its probe.
fn config(facet: LoadScrape) -> Config {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/minimal.yaml");
    let mut cfg = crate::config::load(&path).unwrap();
    let mut third = cfg.backends[0].clone();
    third.name = "web-3".into();
    third.address = std::net::Ipv4Addr::new(203, 0, 113, 13).into();
    cfg.backends.push(third);
    cfg.services[0].backends.push("web-3".into());
    cfg.services[0].probe.load = Some(facet);
    cfg
}

fn busy(waiting: f64) -> Result<Figures, Refusal> {
    Ok(Figures {
        waiting,
        running: Some(4.0),
        kv: Some(0.3),
    })
}

const IDLE: Result<Figures, Refusal> = Ok(Figures {
    waiting: 0.0,
    running: Some(1.0),
    kv: Some(0.1),
});

struct World {
    t: Tracker,
    now: Instant,
    a: String,
    b: String,
    c: String,
}

fn world(facet: LoadScrape) -> World {
    let cfg = config(facet);
    let mut t = Tracker::default();
    let now = Instant::now();
    t.sync(&cfg, now);
    let svc = &cfg.services[0];
    World {
        t,
        now,
        a: svc.backends[0].clone(),
        b: svc.backends[1].clone(),
        c: svc.backends[2].clone(),
    }
}

#[test]
fn hysteresis_holds_small_changes_back() {
    let mut w = world(LoadScrape::new(LoadProfile::Vllm));
    assert_eq!(w.t.factor(&w.a), 1.0);
    assert_eq!(w.t.factor("not-tracked"), 1.0);
    // One waiting request: x0.95, under the 10% min_change.
    w.t.observe(&w.a, &busy(1.0), w.now);
    assert!(w.t.due(w.now).is_empty());
    assert_eq!(w.t.factor(&w.a), 1.0);
    // A long queue: applied.
    let w2 = w.now + Duration::from_secs(1);
    w.t.observe(&w.a, &busy(20.0), w2);
    let due = w.t.due(w2);
    assert_eq!(due.len(), 1, "{due:?}");
    assert_eq!(due[0].from, 1.0);
    assert!(due[0].to <= 0.9, "{due:?}");
    assert_eq!(due[0].figures.unwrap().waiting, 20.0);
    let lowered = w.t.factor(&w.a);
    // Its queue gone: the target climbs back in small steps, applied only
    // once they add up to 10%, or reach 1.
    let mut applied = Vec::new();
    let mut held = 0;
    for i in 1..=200 {
        let at = w.now + Duration::from_secs(10 * i);
        w.t.observe(&w.a, &IDLE, at);
        match w.t.due(at).as_slice() {
            [] => held += 1,
            [c] => applied.push((c.from, c.to)),
            more => panic!("{more:?}"),
        }
    }
    assert!(held > 0, "some steps held back");
    for &(from, to) in &applied {
        assert!(
            to >= 1.0 || (to - from).abs() >= 0.1 * from - 1e-9,
            "{from} -> {to}: {applied:?}"
        );
    }
    assert_eq!(w.t.factor(&w.a), 1.0, "{applied:?}");
    assert!(lowered < 1.0);
}

#[test]
fn one_rebuild_per_service_per_rebuild_interval() {
    let mut w = world(LoadScrape::new(LoadProfile::Vllm));
    w.t.observe(&w.a, &busy(8.0), w.now);
    assert_eq!(w.t.due(w.now).len(), 1);
    // Within 2 s: nothing more for this service, whoever changes.
    for ms in [100, 1000, 1999] {
        let at = w.now + Duration::from_millis(ms);
        w.t.observe(&w.a, &busy(8.0), at);
        w.t.observe(&w.b, &busy(8.0), at);
        w.t.observe(&w.c, &IDLE, at);
        assert!(w.t.due(at).is_empty(), "{ms} ms");
    }
    assert_eq!(w.t.factor(&w.a), 0.85);
    assert_eq!(w.t.factor(&w.b), 1.0);
    // Then both at once: one rebuild.
    let at = w.now + Duration::from_secs(2);
    let due = w.t.due(at);
    let mut changed: Vec<&str> = due.iter().map(|c| c.backend.as_str()).collect();
    changed.sort_unstable();
    let mut both = vec![w.a.as_str(), w.b.as_str()];
    both.sort_unstable();
    assert_eq!(changed, both);
    assert!(w.t.due(at).is_empty());
}

#[test]
fn targets_are_relative_within_a_service() {
    let mut w = world(LoadScrape::new(LoadProfile::Vllm));
    // Every backend queueing alike (the service over capacity): the
    // shares stay equal, no weight is rewritten.
    for i in 0..5 {
        let at = w.now + Duration::from_secs(i);
        for b in [&w.a, &w.b, &w.c] {
            w.t.observe(b, &busy(8.0), at);
        }
        assert!(w.t.due(at).is_empty(), "{i}");
    }
    // One queueing more than the others: it alone falls; the least
    // loaded stays at 1.
    let mut w = world(LoadScrape::new(LoadProfile::Vllm));
    for i in 0..10 {
        let at = w.now + Duration::from_secs(3 * i);
        w.t.observe(&w.a, &busy(8.0), at);
        w.t.observe(&w.b, &busy(2.0), at);
        w.t.observe(&w.c, &busy(2.0), at);
        w.t.due(at);
    }
    let (a, b, c) = (w.t.factor(&w.a), w.t.factor(&w.b), w.t.factor(&w.c));
    assert!(a < 0.5 && b == 1.0 && c == 1.0, "{a} {b} {c}");
    // Relative to the backends serving: one out of service (no queue,
    // factor 1) does not hold the others down.
    let mut w = world(LoadScrape::new(LoadProfile::Vllm));
    let out = w.c.clone();
    let serving = |b: &str| b != out;
    for i in 0..5 {
        let at = w.now + Duration::from_secs(3 * i);
        w.t.observe_among(&w.a, &busy(8.0), at, &serving);
        w.t.observe_among(&w.b, &busy(8.0), at, &serving);
        w.t.observe_among(&w.c, &IDLE, at, &serving);
        assert!(w.t.due(at).is_empty(), "{i}");
    }
}

#[test]
fn refusals_change_nothing_until_the_metrics_are_stale() {
    let mut w = world(LoadScrape::new(LoadProfile::Vllm));
    w.t.observe(&w.a, &busy(8.0), w.now);
    w.t.due(w.now);
    assert_eq!(w.t.factor(&w.a), 0.85);
    let bad = Err(Refusal::Malformed("x".into()));
    let o = w.t.observe(&w.a, &bad, w.now + Duration::from_secs(1));
    assert_eq!(
        o,
        Observed {
            refusal_changed: true,
            went_stale: false
        }
    );
    let o = w.t.observe(&w.a, &bad, w.now + Duration::from_secs(2));
    assert!(!o.refusal_changed, "logged on change only");
    assert!(w.t.due(w.now + Duration::from_secs(2)).is_empty());
    assert_eq!(w.t.factor(&w.a), 0.85);
    assert!(w.t.figures(&w.a).is_some());
    // Three intervals without a good scrape: probe-only health.
    let at = w.now + Duration::from_secs(3);
    let o = w.t.observe(&w.a, &Err(Refusal::Status(503)), at);
    assert!(o.went_stale && o.refusal_changed, "{o:?}");
    assert_eq!(w.t.figures(&w.a), None);
    let due = w.t.due(at);
    assert_eq!(due.len(), 1);
    assert_eq!((due[0].from, due[0].to, due[0].figures), (0.85, 1.0, None));
    // A good scrape again: refusal over, controlled again.
    let o = w.t.observe(&w.a, &busy(8.0), at + Duration::from_secs(5));
    assert!(o.refusal_changed && !o.went_stale);
    assert_eq!(w.t.due(at + Duration::from_secs(5))[0].to, 0.85);
}

#[test]
fn a_reload_keeps_unchanged_facets_and_drops_gone_ones() {
    let mut w = world(LoadScrape::new(LoadProfile::Vllm));
    w.t.observe(&w.a, &busy(8.0), w.now);
    w.t.due(w.now);
    let same = config(LoadScrape::new(LoadProfile::Vllm));
    w.t.sync(&same, w.now);
    assert_eq!(w.t.factor(&w.a), 0.85);
    let mut other = LoadScrape::new(LoadProfile::Vllm);
    other.min_change = 0.2;
    w.t.sync(&config(other), w.now);
    assert_eq!(w.t.factor(&w.a), 1.0, "a changed facet starts over");
    let mut none = same.clone();
    none.services[0].probe.load = None;
    w.t.sync(&none, w.now);
    assert_eq!(w.t.factors().count(), 0);
    assert_eq!(w.t.facet(&w.a), None);
}
