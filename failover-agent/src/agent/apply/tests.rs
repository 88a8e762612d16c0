//! The applier over a [`Recorder`]: its writes, their order and the
//! keep-last-good rule, without a kernel (plain `cargo test`, no root).
//!
//! Ids: `web` is service 0 (`api` 1); b1, b2, b3 are backends 0, 1, 2.

use std::time::{Duration, Instant, SystemTime};

use super::{Applier, ApplyOptions, ApplyReport};
use crate::agent::{
    execute::Recorder,
    operator_state::Deadline,
    reconcile::{self, Current, Write},
    states::DataplaneState,
};
use crate::{
    config::{self, Config},
    health::{EventSource, HealthEvent, HealthState},
    planner,
};

const WEB: &str = "  - name: web
    vip: 192.0.2.10
    port: 80
    protocol: tcp
    backends: [b1, b2, b3]
    probe: { kind: tcp }
    policy: { ring_size: 13 }
";

const API: &str = "  - name: api
    vip: 192.0.2.20
    port: 443
    protocol: tcp
    backends: [b2]
    probe: { kind: tcp }
    policy: { ring_size: 13 }
";

/// The node, `services` (YAML list items) and `backends` of b1..b3 (b3
/// in tier 1).
fn cfg_with(services: &str, backends: &[&str]) -> Config {
    let mut y = format!(
        "node:
  interfaces: [eth0]
  snat_address: 198.51.100.1
  snat_ports: {{ min: 10000, max: 32767 }}
services:
{services}backends:
"
    );
    for (i, b) in backends.iter().enumerate() {
        let tier = u8::from(*b == "b3");
        y.push_str(&format!(
            "  - {{ name: {b}, address: 203.0.113.{}, port: 8080, tier: {tier}, cloud: c, region: r, jurisdiction: EU }}\n",
            i + 11
        ));
    }
    config::parse(&y, "test").expect("valid config")
}

fn cfg() -> Config {
    cfg_with(WEB, &["b1", "b2", "b3"])
}

fn opts(hold: Duration) -> ApplyOptions {
    ApplyOptions {
        startup_hold: hold,
        ..ApplyOptions::default()
    }
}

fn applier(cfg: Config) -> Applier<Recorder> {
    Applier::with_executor(Recorder::default(), cfg, opts(Duration::from_secs(60))).unwrap()
}

fn ev(backend: &str, from: HealthState, to: HealthState) -> HealthEvent {
    HealthEvent {
        backend: backend.into(),
        from,
        to,
        reason: "test".into(),
        latency: None,
        source: EventSource::Active,
        at: Instant::now(),
    }
}

fn up(a: &mut Applier<Recorder>, backends: &[&str]) -> ApplyReport {
    let evs: Vec<HealthEvent> = backends
        .iter()
        .map(|b| ev(b, HealthState::Unknown, HealthState::Up))
        .collect();
    a.on_health(&evs).unwrap()
}

/// The writes since the last call, one line each.
fn take(a: &mut Applier<Recorder>) -> Vec<String> {
    let log = a.executor().log();
    a.executor_mut().clear();
    log
}

/// An applier with every backend up, its writes so far forgotten.
fn serving() -> Applier<Recorder> {
    let mut a = applier(cfg());
    up(&mut a, &["b1", "b2", "b3"]);
    take(&mut a);
    a
}

fn to(a: &Applier<Recorder>, service: &str) -> Vec<String> {
    a.programmed(service).unwrap().to.clone()
}

#[test]
fn a_fresh_start_programs_backends_then_the_ring_then_the_vips() {
    let mut a = applier(cfg());
    assert_eq!(
        take(&mut a),
        [
            "node",
            "backend 0 203.0.113.11:8080 down",
            "backend 1 203.0.113.12:8080 down",
            "backend 2 203.0.113.13:8080 down",
            // No verdict yet: a closed ring, but the service exists.
            "ring 0 slot 0",
            "flip web slot 0 gen 1",
            "vips 192.0.2.10",
        ]
    );
    assert!(a.programmed("web").unwrap().to.is_empty());
    assert_eq!(a.hold_deadline(), None, "nothing recovered, nothing held");

    // First verdicts: states up before any ring holds them.
    let r = up(&mut a, &["b1", "b2", "b3"]);
    assert_eq!(
        take(&mut a),
        [
            "state 0 up",
            "state 1 up",
            "state 2 up",
            "ring 0 slot 1",
            "flip web slot 1 gen 2",
        ]
    );
    assert_eq!(r.flipped, [("web".to_owned(), 2)]);
    assert_eq!(r.state_writes, 3);
    assert!(r.latency.is_some());
    // b3 is tier 1: a standby while tier 0 is up.
    assert_eq!(to(&a, "web"), ["b1", "b2"]);
    assert_eq!(a.executor().vips(), None, "cleared: no new VIP filter");
}

#[test]
fn attaching_writes_the_vip_filter_again_once_the_program_is_in() {
    // The start's filter write keeps what an older program may read
    // (`Maps`); once attached, the filter is written exactly.
    let mut a = applier(cfg());
    take(&mut a);
    a.attach().unwrap();
    assert_eq!(a.executor().attached, ["eth0"]);
    assert_eq!(take(&mut a), ["vips 192.0.2.10"]);
}

#[test]
fn a_failover_writes_the_state_first_then_the_ring_then_nudges() {
    let mut a = serving();
    let r = a
        .on_health(&[ev("b1", HealthState::Up, HealthState::Down)])
        .unwrap();
    assert_eq!(
        take(&mut a),
        ["state 0 down", "ring 0 slot 0", "flip web slot 0 gen 3"]
    );
    assert_eq!(r.state_writes, 1);
    // One of tier 0 left: tier 1 helps (the planner's floor).
    assert_eq!(to(&a, "web"), ["b2", "b3"]);
    assert_eq!(a.state_latency().count, 1, "the fast write is timed");
    assert_eq!(a.flip_latency().count, 3, "start, all up, b1 down");
    // The nudge waits for the run loop, after the switch.
    assert!(a.has_nudges());
    a.flush_nudges();
    assert_eq!(take(&mut a), ["nudge 0"]);
    assert!(!a.has_nudges());

    // The same verdict again writes nothing.
    let r = a
        .on_health(&[ev("b1", HealthState::Down, HealthState::Down)])
        .unwrap();
    assert!(take(&mut a).is_empty());
    assert_eq!(r.state_writes, 0);
    assert!(r.flipped.is_empty());

    // Recovery: up before the ring holds it, no nudge.
    a.on_health(&[ev("b1", HealthState::Down, HealthState::Up)])
        .unwrap();
    assert_eq!(
        take(&mut a),
        ["state 0 up", "ring 0 slot 1", "flip web slot 1 gen 4"]
    );
    assert!(!a.has_nudges());
}

#[test]
fn the_last_tier_0_backend_down_fails_over_to_tier_1() {
    let mut a = serving();
    a.on_health(&[
        ev("b1", HealthState::Up, HealthState::Down),
        ev("b2", HealthState::Up, HealthState::Down),
    ])
    .unwrap();
    assert_eq!(
        take(&mut a),
        [
            "state 0 down",
            "state 1 down",
            "ring 0 slot 0",
            "flip web slot 0 gen 3"
        ]
    );
    assert_eq!(to(&a, "web"), ["b3"]);
    a.flush_nudges();
    assert_eq!(take(&mut a), ["nudge 0,1"], "one nudge for both");
}

#[test]
fn a_passive_mark_down_is_one_write_and_only_one() {
    let mut a = serving();
    assert!(a.mark_down("b2", Instant::now()).unwrap());
    assert_eq!(take(&mut a), ["state 1 down"]);
    assert!(!a.mark_down("b2", Instant::now()).unwrap(), "already down");
    assert!(!a.mark_down("nobody", Instant::now()).unwrap());
    assert!(take(&mut a).is_empty());
    // The re-plan that follows: the state is written already.
    a.on_health(&[ev("b2", HealthState::Up, HealthState::Down)])
        .unwrap();
    assert_eq!(take(&mut a), ["ring 0 slot 0", "flip web slot 0 gen 3"]);
    a.flush_nudges();
    assert_eq!(take(&mut a), ["nudge 1"]);
}

/// Nudges block the run loop while they read the flow tables: they are
/// due a little after the latest backend went down, so that a backend
/// written DOWN just before gets its ring switch first, but no later than
/// `max_wait` after the first.
#[test]
fn nudges_are_due_after_the_latest_down_within_a_cap() {
    let (delay, cap) = (Duration::from_millis(5), Duration::from_millis(50));
    let mut a = serving();
    assert_eq!(a.nudge_due(delay, cap), None);
    let t0 = Instant::now();
    assert!(a.mark_down("b1", t0).unwrap());
    let first = a.nudge_due(delay, cap).unwrap();
    assert!(first >= t0 + delay);
    std::thread::sleep(Duration::from_millis(2));
    assert!(a.mark_down("b2", Instant::now()).unwrap());
    let later = a.nudge_due(delay, cap).unwrap();
    assert!(
        later >= first + Duration::from_millis(2),
        "moved to the latest"
    );
    // However long the delay, no later than the cap after the first.
    let capped = a.nudge_due(Duration::from_secs(1), cap).unwrap();
    assert!(capped <= Instant::now() + cap);
    assert!(capped < later + Duration::from_secs(1));
    a.flush_nudges();
    assert_eq!(take(&mut a), ["state 0 down", "state 1 down", "nudge 0,1"]);
    assert_eq!(a.nudge_due(delay, cap), None);
}

#[test]
fn a_drain_is_draining_before_the_ring_and_undrain_brings_it_back() {
    let mut a = serving();
    a.set_draining("b1", true, Instant::now()).unwrap();
    assert_eq!(
        take(&mut a),
        ["state 0 draining", "ring 0 slot 0", "flip web slot 0 gen 3"]
    );
    assert!(a.is_draining("b1"));
    assert_eq!(to(&a, "web"), ["b2", "b3"]);
    assert_eq!(a.effective_weights()["b1"], 0);
    // Draining again changes nothing.
    a.set_draining("b1", true, Instant::now()).unwrap();
    assert!(take(&mut a).is_empty());
    // A drained backend found dead loses its flows at once.
    a.on_health(&[ev("b1", HealthState::Up, HealthState::Down)])
        .unwrap();
    assert_eq!(take(&mut a), ["state 0 down"]);
    a.on_health(&[ev("b1", HealthState::Down, HealthState::Up)])
        .unwrap();
    assert_eq!(take(&mut a), ["state 0 draining"]);

    a.set_draining("b1", false, Instant::now()).unwrap();
    assert_eq!(
        take(&mut a),
        ["state 0 up", "ring 0 slot 1", "flip web slot 1 gen 4"]
    );
    assert!(!a.is_draining("b1"));
    assert!(a.operator_state().is_empty());
    // Unknown backends are no drain.
    assert!(
        a.set_draining("nobody", true, Instant::now())
            .unwrap()
            .flipped
            .is_empty()
    );
}

#[test]
fn an_override_holds_its_tier_until_it_expires() {
    let mut a = serving();
    let now = Instant::now();
    let until = Deadline::after(now, SystemTime::now(), Duration::from_secs(30));
    let ov = planner::Override { to_tier: 1 };
    let r = a.set_override("web", ov, until, now, None).unwrap();
    assert_eq!(r.flipped, [("web".to_owned(), 3)]);
    assert_eq!(take(&mut a), ["ring 0 slot 0", "flip web slot 0 gen 3"]);
    assert_eq!(to(&a, "web"), ["b3"]);
    assert_eq!(a.override_of("web").map(|o| o.ov), Some(ov));
    assert_eq!(a.next_expiry(), Some(until.at()));

    // Not yet due: nothing happens.
    let r = a.expire_overrides(now + Duration::from_secs(10)).unwrap();
    assert!(r.flipped.is_empty());
    assert!(take(&mut a).is_empty());
    assert!(a.override_of("web").is_some());

    // Due: the planner's own choice returns, and nothing is left to expire.
    let r = a.expire_overrides(until.at()).unwrap();
    assert_eq!(r.flipped, [("web".to_owned(), 4)]);
    assert_eq!(take(&mut a), ["ring 0 slot 1", "flip web slot 1 gen 4"]);
    assert_eq!(to(&a, "web"), ["b1", "b2"]);
    assert_eq!(a.override_of("web"), None);
    assert_eq!(a.next_expiry(), None);
    assert!(a.operator_state().is_empty());
}

#[test]
fn a_cancelled_override_ends_at_once() {
    let mut a = serving();
    let now = Instant::now();
    let until = Deadline::after(now, SystemTime::now(), Duration::from_secs(30));
    a.set_override("web", planner::Override { to_tier: 1 }, until, now, None)
        .unwrap();
    take(&mut a);
    assert!(a.cancel_override("web", now).unwrap());
    assert_eq!(take(&mut a), ["ring 0 slot 1", "flip web slot 1 gen 4"]);
    assert_eq!(a.next_expiry(), None);
    assert!(!a.cancel_override("web", now).unwrap(), "none left");
    assert!(take(&mut a).is_empty());
}

/// A second agent over the state `first` left pinned.
fn restart(first: &Applier<Recorder>, hold: Duration) -> Applier<Recorder> {
    let rec = Recorder::pinned_from(first.current());
    Applier::with_executor(rec, first.config().clone(), opts(hold)).unwrap()
}

#[test]
fn a_restart_keeps_the_last_good_ring_until_every_verdict() {
    let first = serving();
    let ring = first.programmed("web").unwrap().ring.clone();
    let mut a = restart(&first, Duration::from_secs(60));
    // No ring, no state written: only the node and the VIP filter.
    assert_eq!(take(&mut a), ["node", "vips 192.0.2.10"]);
    assert!(a.hold_deadline().is_some());
    let p = a.programmed("web").unwrap();
    assert_eq!(p.ring, ring);
    assert_eq!(p.to, ["b1", "b2"], "names of the ring's ids");
    assert_eq!(p.entry.generation, 2);
    assert!(p.weights.is_empty(), "unknown until planned");

    // Verdicts come in: the ring is kept while one is missing.
    let r = up(&mut a, &["b1"]);
    assert_eq!(r.held, ["web"]);
    assert!(take(&mut a).is_empty());
    let r = up(&mut a, &["b2", "b3"]);
    assert!(r.held.is_empty());
    // All up: the plan is the ring already there. Nothing to write.
    assert!(take(&mut a).is_empty());
    let p = a.programmed("web").unwrap();
    assert_eq!(p.entry.generation, 2);
    assert_eq!(p.weights.keys().collect::<Vec<_>>(), ["b1", "b2"]);
    assert_eq!(a.current().state(2), Some(DataplaneState::Up));
}

#[test]
fn a_start_up_hold_that_runs_out_plans_with_what_is_known() {
    let first = serving();
    let mut a = restart(&first, Duration::from_secs(60));
    take(&mut a);
    up(&mut a, &["b1"]);
    assert!(take(&mut a).is_empty());
    let r = a.end_hold(Instant::now()).unwrap();
    assert_eq!(a.hold_deadline(), None);
    assert!(r.held.is_empty());
    // The ring switches first; backends without a verdict leave after.
    assert_eq!(
        take(&mut a),
        [
            "ring 0 slot 0",
            "flip web slot 0 gen 3",
            "state 1 down",
            "state 2 down",
        ]
    );
    assert_eq!(to(&a, "web"), ["b1"]);
    // Once only.
    assert!(a.end_hold(Instant::now()).unwrap().flipped.is_empty());
}

#[test]
fn a_hold_without_a_bound_left_ends_at_the_first_apply() {
    let first = serving();
    let mut a = restart(&first, Duration::ZERO);
    // The first apply (at start) found the hold over: every service is
    // planned, and no verdict means down.
    assert_eq!(
        take(&mut a),
        [
            "node",
            "ring 0 slot 0",
            "flip web slot 0 gen 3",
            "vips 192.0.2.10",
            "state 0 down",
            "state 1 down",
            "state 2 down",
        ]
    );
}

#[test]
fn a_reload_adds_and_removes_services_and_frees_ids_after_the_switch() {
    let mut a = serving();
    let diff = a
        .reload(
            cfg_with(&format!("{WEB}{API}"), &["b1", "b2", "b3"]),
            Instant::now(),
        )
        .unwrap();
    assert!(!diff.is_empty());
    // `web` is untouched; `api` gets its ring, then its VIP lets packets in.
    assert_eq!(
        take(&mut a),
        [
            "ring 1 slot 0",
            "flip api slot 0 gen 1",
            "vips 192.0.2.10,192.0.2.20"
        ]
    );
    assert_eq!(to(&a, "api"), ["b2"]);
    assert_eq!(a.programmed("web").unwrap().entry.generation, 2);
    // The same config again: no change, no write.
    assert!(
        a.reload(a.config().clone(), Instant::now())
            .unwrap()
            .is_empty()
    );
    assert!(take(&mut a).is_empty());

    // `api` and b3 (a standby, in no ring) go: the service first, the
    // VIP filter after the plan, b3's id last.
    let web = WEB.replace("[b1, b2, b3]", "[b1, b2]");
    a.reload(cfg_with(&web, &["b1", "b2"]), Instant::now())
        .unwrap();
    assert_eq!(
        take(&mut a),
        ["remove service 1", "vips 192.0.2.10", "unused 2"]
    );
    assert_eq!(a.programmed("web").unwrap().entry.generation, 2);
    assert!(a.programmed("api").is_none());
    assert_eq!(a.current().state(2), None);
    assert_eq!(a.health("b1"), HealthState::Up, "health is kept");
}

#[test]
fn a_reload_that_moves_a_backend_starts_it_over() {
    let mut a = serving();
    let mut new = cfg();
    new.backends[0].port = 9090;
    a.reload(new, Instant::now()).unwrap();
    let log = take(&mut a);
    // A new id, down until its first verdict; the old id is freed after
    // the ring that named it switched.
    assert_eq!(
        log,
        [
            "backend 3 203.0.113.11:9090 down",
            "ring 0 slot 0",
            "flip web slot 0 gen 3",
            "unused 0",
        ]
    );
    assert_eq!(a.health("b1"), HealthState::Unknown);
    assert_eq!(to(&a, "web"), ["b2", "b3"]);
}

#[test]
fn take_out_writes_each_serving_backend_down_once() {
    let a = serving();
    let held = Default::default();
    let inp = reconcile::Inputs {
        cfg: a.config(),
        ids: a.ids(),
        health: &[("b1", HealthState::Down), ("b2", HealthState::Down)]
            .into_iter()
            .map(|(n, h)| (n.to_owned(), h))
            .collect(),
        load: &Default::default(),
        operator: a.operator_state(),
        graces: &Default::default(),
        held: &held,
        holding: false,
    };
    let mut cur: Current = a.current().clone();
    // b2 is down already; b3 has no down verdict; names repeat.
    cur.record(cur.set_state(1, DataplaneState::Down).unwrap());
    let names: Vec<String> = ["b1", "b1", "b2", "b3", "nobody"]
        .into_iter()
        .map(str::to_owned)
        .collect();
    let w = reconcile::take_out(&inp, &cur, &names);
    assert_eq!(w.len(), 1);
    assert_eq!(w[0].to_string(), "state 0 down");
    assert!(matches!(w[0], Write::State { id: 0, .. }));
}

#[test]
fn a_slow_backend_drains_for_its_grace_then_goes_down() {
    let grace = Duration::from_secs(30);
    let web = WEB.replace("ring_size: 13 }", "ring_size: 13, slow_grace: 30s }");
    let mut a = applier(cfg_with(&web, &["b1", "b2", "b3"]));
    up(&mut a, &["b1", "b2", "b3"]);
    take(&mut a);
    let t0 = Instant::now();
    let sick = HealthEvent {
        reason: crate::health::Reason::new("timeout", Some(crate::health::Failure::Timeout)),
        at: t0,
        ..ev("b1", HealthState::Up, HealthState::Down)
    };
    a.on_health(&[sick]).unwrap();
    // No fast DOWN: it leaves the ring, its streams in progress finish.
    assert_eq!(
        take(&mut a),
        ["state 0 draining", "ring 0 slot 0", "flip web slot 0 gen 3"]
    );
    assert!(!a.has_nudges());
    assert_eq!(a.grace_left("b1", t0), Some(grace));
    assert_eq!(a.grace_deadline(), Some(t0 + grace));
    assert_eq!(a.end_graces(t0 + grace / 2).unwrap().state_writes, 0);
    assert!(take(&mut a).is_empty());
    let r = a.end_graces(t0 + grace).unwrap();
    assert_eq!(r.state_writes, 1);
    assert_eq!(take(&mut a), ["state 0 down"]);
    assert_eq!(a.grace_deadline(), None);
}

#[test]
fn a_path_mtu_is_clamped_before_the_backend_takes_traffic_and_follows_reloads() {
    let mut small = cfg();
    small.backends[1].path_mtu = Some(1400);
    let mut a = applier(small.clone());
    let log = take(&mut a);
    // b2's clamp (1400 less 40) before its entry; none for the others.
    assert_eq!(
        &log[..3],
        ["node", "mss 1 1360", "backend 0 203.0.113.11:8080 down"]
    );
    assert_eq!(log.iter().filter(|w| w.starts_with("mss")).count(), 1);

    // A restart reads the clamp from the pins and writes nothing again.
    let mut b = restart(&a, Duration::from_secs(60));
    assert!(!take(&mut b).iter().any(|w| w.starts_with("mss")));

    // A reload that changes or removes it writes the new value.
    let mut new = small.clone();
    new.backends[1].path_mtu = Some(1280);
    a.reload(new.clone(), Instant::now()).unwrap();
    assert_eq!(take(&mut a), ["mss 1 1240"]);
    new.backends[1].path_mtu = None;
    a.reload(new, Instant::now()).unwrap();
    assert_eq!(take(&mut a), ["mss 1 0"]);
}

/// `web` with a vLLM load facet on its probe.
const WEB_LOADED: &str = "  - name: web
    vip: 192.0.2.10
    port: 80
    protocol: tcp
    backends: [b1, b2, b3]
    probe: { kind: tcp, load: { profile: vllm, rebuild_interval: 2s } }
    policy: { ring_size: 13 }
";

fn queued(waiting: f64) -> Result<crate::load::Figures, crate::load::Refusal> {
    Ok(crate::load::Figures {
        waiting,
        running: Some(4.0),
        kv: Some(0.5),
    })
}

#[test]
fn load_reweights_with_one_ring_switch_per_interval_and_an_audited_record() {
    let dir = std::env::temp_dir().join(format!(
        "failover-load-audit-{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let audit = dir.join("audit.jsonl");
    let mut a = Applier::with_executor(
        Recorder::default(),
        cfg_with(WEB_LOADED, &["b1", "b2", "b3"]),
        ApplyOptions {
            journal: Some(super::super::Journal::open(&audit).unwrap()),
            ..opts(Duration::from_secs(60))
        },
    )
    .unwrap();
    up(&mut a, &["b1", "b2", "b3"]);
    take(&mut a);
    assert_eq!(a.effective_weights()["b1"], 100);
    let t0 = Instant::now();

    // b1 queues up to queue_high: its factor drops 15%, one ring switch,
    // no state write (it keeps serving, its pinned flows stay).
    let r = a.on_load("b1", &queued(8.0), t0).unwrap();
    assert_eq!(r.changes.len(), 1);
    assert_eq!((r.changes[0].from, r.changes[0].to), (1.0, 0.85));
    assert_eq!(r.apply.flipped.len(), 1);
    assert_eq!(take(&mut a), ["ring 0 slot 0", "flip web slot 0 gen 3"]);
    assert_eq!(a.effective_weights()["b1"], 85);
    assert_eq!(a.effective_weights()["b2"], 100);
    assert_eq!(a.load_factor("b1"), 0.85);

    // Within rebuild_interval: b2's change waits; a refused scrape
    // changes nothing.
    let r = a
        .on_load("b2", &queued(8.0), t0 + Duration::from_secs(1))
        .unwrap();
    assert!(r.changes.is_empty());
    let bad = Err(crate::load::Refusal::Malformed("garbage".into()));
    let r = a
        .on_load("b1", &bad, t0 + Duration::from_millis(1500))
        .unwrap();
    assert!(r.changes.is_empty() && r.observed.refusal_changed);
    assert!(take(&mut a).is_empty());
    assert_eq!(a.effective_weights()["b1"], 85);

    // The interval over: b2's held change goes, with b1's own next one
    // (its queue just gone, the smoothed one still 5.6: x0.895).
    let r = a
        .on_load("b1", &queued(0.0), t0 + Duration::from_secs(2))
        .unwrap();
    let mut changed: Vec<&str> = r.changes.iter().map(|c| c.backend.as_str()).collect();
    changed.sort_unstable();
    assert_eq!(changed, ["b1", "b2"]);
    // One decision, at most one switch (a 13-slot ring may come out the
    // same: then each change is audited on its own).
    let log = take(&mut a);
    assert!(
        log.is_empty() || log == ["ring 0 slot 1", "flip web slot 1 gen 4"],
        "{log:?}"
    );
    assert_eq!(a.effective_weights()["b1"], 76);
    assert_eq!(a.effective_weights()["b2"], 85);

    a.flush_audit();
    let text = std::fs::read_to_string(&audit).unwrap();
    let load_line = text
        .lines()
        .find(|l| l.contains("\"factor_to\":0.85"))
        .expect("an audited load change");
    let rec: crate::audit::DecisionRecord = serde_json::from_str(load_line).unwrap();
    assert!(
        rec.reason
            .starts_with("load: b1 load 1 -> 0.85 (waiting 8, running 4, kv 0.5)"),
        "{}",
        rec.reason
    );
    let w = &rec.weights[0];
    assert_eq!((w.backend.as_str(), w.from, w.to), ("b1", 100, 85));
    let note = w.load.as_ref().unwrap();
    assert_eq!(
        (
            note.waiting,
            note.running,
            note.kv,
            note.factor_from,
            note.factor_to
        ),
        (Some(8.0), Some(4.0), Some(0.5), 1.0, 0.85)
    );
    assert!(crate::audit::verify(&audit).unwrap().records >= 4);
    assert!(text.contains("\"factor_to\":0.76"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_load_change_of_a_backend_out_of_rings_is_audited_without_a_switch() {
    let mut a = applier(cfg_with(WEB_LOADED, &["b1", "b2", "b3"]));
    up(&mut a, &["b1", "b2", "b3"]);
    // b3 is tier 1, idle while tier 0 serves: reweighting it switches no
    // ring.
    take(&mut a);
    let r = a.on_load("b3", &queued(8.0), Instant::now()).unwrap();
    assert_eq!(r.changes.len(), 1);
    assert!(r.apply.flipped.is_empty());
    assert!(take(&mut a).is_empty());
    assert_eq!(a.load_factor("b3"), 0.85);
}

#[test]
fn a_degraded_and_loaded_backend_keeps_the_product_of_both_factors() {
    let mut a = applier(cfg_with(WEB_LOADED, &["b1", "b2", "b3"]));
    up(&mut a, &["b1", "b2", "b3"]);
    // Rate limited (429) or a slow first token: degraded, half its weight
    // (a tcp probe's default degraded_weight).
    a.on_health(&[ev("b1", HealthState::Up, HealthState::Degraded)])
        .unwrap();
    assert_eq!(a.effective_weights()["b1"], 50);
    // And queueing: its load factor scales that again.
    a.on_load("b1", &queued(8.0), Instant::now()).unwrap();
    let load = a.load_factor("b1");
    assert_eq!(load, 0.85);
    assert_eq!(
        a.effective_weights()["b1"],
        (100.0 * 0.5 * load).round() as u32
    );
    // Recovered from the 429s: the load factor alone.
    a.on_health(&[ev("b1", HealthState::Degraded, HealthState::Up)])
        .unwrap();
    assert_eq!(a.effective_weights()["b1"], 85);
    assert_eq!(a.effective_weights()["b2"], 100);
}

/// A dual-stack `web`: `vip` with b1 (IPv4) and `vip6` with b6 (IPv6).
fn dual_cfg(vip6: bool) -> Config {
    let vip6 = if vip6 { "    vip6: 2001:db8::10\n" } else { "" };
    let b6 = if vip6.is_empty() { "" } else { ", b6" };
    let y = format!(
        "node:
  interfaces: [eth0]
  snat_addresses: [198.51.100.1, 2001:db8:100::1]
  snat_ports: {{ min: 10000, max: 32767 }}
services:
  - name: web
    vip: 192.0.2.10
{vip6}    port: 80
    protocol: tcp
    backends: [b1{b6}]
    probe: {{ kind: tcp }}
    policy: {{ ring_size: 13 }}
backends:
  - {{ name: b1, address: 203.0.113.11, port: 8080, cloud: c, region: r, jurisdiction: EU }}
  - {{ name: b6, address: 2001:db8:2::11, port: 8080, path_mtu: 1400, cloud: c, region: r, jurisdiction: EU }}
"
    );
    config::parse(&y, "test").expect("valid config")
}

#[test]
fn a_dual_stack_service_has_a_ring_and_entry_per_vip_and_ipv6_addresses_go_first() {
    use crate::agent::ids::VipKey;
    let mut a = applier(dual_cfg(true));
    assert_eq!(
        take(&mut a),
        [
            "node",
            "node6 2001:db8:100::1",
            // An IPv6 backend's MSS: its path_mtu less 60.
            "mss 1 1340",
            "backend 0 203.0.113.11:8080 down",
            // Address before state.
            "addr6 1 2001:db8:2::11",
            "backend 1 [addr6 1]:8080 down",
            "ring 0 slot 0",
            "ring 1 slot 0",
            "flip web/v6 slot 0 gen 1",
            "flip web slot 0 gen 1",
            "vips 192.0.2.10,2001:db8::10",
        ]
    );
    assert!(matches!(a.programmed("web").unwrap().key, VipKey::V4(_)));
    assert!(matches!(a.programmed("web/v6").unwrap().key, VipKey::V6(_)));

    // Each VIP's ring holds the backends of its family only; one switch
    // reports both.
    let r = up(&mut a, &["b1", "b6"]);
    assert_eq!(r.flipped, [("web".to_owned(), 2)]);
    let ring = |a: &Applier<Recorder>, s: &str| -> std::collections::BTreeSet<u32> {
        a.programmed(s).unwrap().ring.iter().copied().collect()
    };
    assert_eq!(ring(&a, "web"), [0].into());
    assert_eq!(ring(&a, "web/v6"), [1].into());
    assert_eq!(to(&a, "web"), ["b1", "b6"]);

    // b6 fails: the IPv6 ring closes, the IPv4 one is written again as it
    // was, and both flip together.
    take(&mut a);
    let r = a
        .on_health(&[ev("b6", HealthState::Up, HealthState::Down)])
        .unwrap();
    assert_eq!(r.flipped, [("web".to_owned(), 3)]);
    assert_eq!(ring(&a, "web"), [0].into());
    assert_eq!(ring(&a, "web/v6"), [failover_common::NO_BACKEND].into());

    // A restart recovers both VIPs' ids and the IPv6 backend's address.
    let pinned = Recorder::pinned_from(a.current());
    let mut b =
        Applier::with_executor(pinned, dual_cfg(true), opts(Duration::from_secs(60))).unwrap();
    let log = take(&mut b);
    assert!(
        !log.iter()
            .any(|w| w.starts_with("backend") || w.starts_with("addr6")),
        "{log:?}"
    );
    assert_eq!(b.ids().service("web/v6").unwrap().id, 1);
    assert_eq!(b.ids().backend("b6").unwrap().id, 1);

    // Dropping the IPv6 VIP removes its SERVICES6 entry.
    let mut single = dual_cfg(false);
    single.node.snat_addresses.truncate(1);
    a.reload(single, Instant::now()).unwrap();
    let log = take(&mut a);
    assert!(log.contains(&"remove service 1".to_owned()), "{log:?}");
    assert!(a.programmed("web/v6").is_none());
    assert!(log.contains(&"vips 192.0.2.10".to_owned()), "{log:?}");
}

#[test]
fn an_ipv6_only_service_is_one_services6_entry_over_its_ipv6_backends() {
    use crate::agent::ids::VipKey;
    let y = "node:
  interfaces: [eth0]
  snat_address: 2001:db8:100::1
  snat_ports: { min: 10000, max: 32767 }
services:
  - name: web
    vip: 2001:db8::10
    port: 80
    protocol: tcp
    backends: [b6]
    probe: { kind: tcp }
    policy: { ring_size: 13 }
backends:
  - { name: b6, address: 2001:db8:2::11, port: 8080, cloud: c, region: r, jurisdiction: EU }
";
    let mut a = applier(config::parse(y, "test").unwrap());
    // No IPv4 SNAT address: NODE's is 0.
    assert!(
        a.executor()
            .writes
            .iter()
            .any(|w| matches!(w, Write::Node(n) if n.snat_be == 0))
    );
    assert_eq!(
        take(&mut a),
        [
            "node",
            "node6 2001:db8:100::1",
            "addr6 0 2001:db8:2::11",
            "backend 0 [addr6 0]:8080 down",
            "ring 0 slot 0",
            "flip web slot 0 gen 1",
            "vips 2001:db8::10",
        ]
    );
    assert!(matches!(a.programmed("web").unwrap().key, VipKey::V6(_)));
    up(&mut a, &["b6"]);
    assert!(a.programmed("web").unwrap().ring.iter().all(|&i| i == 0));
}
