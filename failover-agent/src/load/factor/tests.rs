use super::*;

const P: Params = Params {
    queue_high: 8.0,
    kv_high: 0.9,
    min_factor: 0.1,
};

fn figures(waiting: f64, kv: Option<f64>) -> Figures {
    Figures {
        waiting,
        running: None,
        kv,
    }
}

#[test]
fn pressure_from_the_queue_and_the_kv_cache() {
    assert_eq!(pressure(&figures(0.0, Some(0.5)), &P), 0.0);
    assert_eq!(pressure(&figures(1.0, None), &P), 1.0 / 8.0);
    let deep = Params {
        queue_high: 100.0,
        ..P
    };
    assert_eq!(pressure(&figures(1.0, None), &deep), MIN_PRESSURE);
    assert_eq!(pressure(&figures(4.0, None), &P), 0.5);
    assert_eq!(pressure(&figures(80.0, None), &P), 1.0);
    // A fraction of a request (a mean) is no whole waiting one.
    assert_eq!(pressure(&figures(0.5, None), &P), 0.5 / 8.0);
    assert_eq!(pressure(&figures(0.0, Some(0.9)), &P), 0.25);
    assert!((pressure(&figures(0.0, Some(0.95)), &P) - 0.625).abs() < 1e-9);
    assert_eq!(pressure(&figures(0.0, Some(1.0)), &P), 1.0);
    // The worse of the two.
    assert_eq!(pressure(&figures(4.0, Some(0.9)), &P), 0.5);
    let full = Params { kv_high: 1.0, ..P };
    assert_eq!(pressure(&figures(0.0, Some(1.0)), &full), 0.25);
}

#[test]
fn decrease_is_multiplicative_increase_gentle_and_both_bounded() {
    let mut c = Controller::default();
    assert_eq!(c.factor(), 1.0);
    assert_eq!(c.update(&figures(8.0, None), &P), 1.0 - DECREASE);
    assert_eq!(
        c.update(&figures(8.0, None), &P),
        (1.0 - DECREASE) * (1.0 - DECREASE)
    );
    for _ in 0..30 {
        c.update(&figures(100.0, None), &P);
    }
    assert_eq!(c.factor(), P.min_factor, "floored");
    // The smoothed queue drains (halving per scrape) before the factor
    // grows, then +0.05 a scrape.
    let quiet = figures(0.0, Some(0.2));
    let draining = (0..20)
        .take_while(|_| c.update(&quiet, &P) == P.min_factor)
        .count();
    assert!(draining <= 16, "{draining} scrapes to drain");
    let steps = (0..100).take_while(|_| c.update(&quiet, &P) < 1.0).count();
    assert_eq!(steps + 2, 90, "floor to 1 in (1 - 0.1) / 0.01 scrapes");
    assert_eq!(c.factor(), 1.0, "capped");
    c.update(&figures(8.0, None), &P);
    c.reset();
    assert_eq!(c.factor(), 1.0);
}

/// Three backends, one at half the service rate of the others, offered
/// 80% of their total capacity, new requests split by factor (as the
/// ring splits new flows). A request takes one second; each backend
/// runs up to `slots` at once and queues the rest. Steps of 100 ms,
/// one scrape a second.
struct Sim {
    /// Requests per second each serves (slots / service time).
    slots: [f64; 3],
    running: [f64; 3],
    waiting: [f64; 3],
}

impl Sim {
    fn step(&mut self, factors: [f64; 3], offered: f64, dt: f64) {
        let total: f64 = factors.iter().sum();
        for (i, factor) in factors.iter().enumerate() {
            let arrive = offered * dt * factor / total;
            // Service time 1 s: a running request ends at rate running/s.
            let done = self.running[i] * dt;
            self.running[i] -= done;
            self.waiting[i] += arrive;
            let start = (self.slots[i] - self.running[i])
                .max(0.0)
                .min(self.waiting[i]);
            self.waiting[i] -= start;
            self.running[i] += start;
        }
    }
}

#[test]
fn a_half_capacity_backend_converges_lower_and_its_queue_stays_near_zero() {
    let mut sim = Sim {
        slots: [16.0, 16.0, 8.0],
        running: [0.0; 3],
        waiting: [0.0; 3],
    };
    let offered = 0.8 * 40.0;
    let mut controllers = [Controller::default(); 3];
    let mut queue_late = [0.0; 3];
    let mut factor_late = [0.0; 3];
    let (seconds, late) = (300, 150);
    for s in 0..seconds {
        let factors = controllers.map(|c| c.factor());
        for _ in 0..10 {
            sim.step(factors, offered, 0.1);
        }
        for i in 0..3 {
            controllers[i].update(&figures(sim.waiting[i], None), &P);
            if s >= seconds - late {
                queue_late[i] += sim.waiting[i] / f64::from(late);
                factor_late[i] += controllers[i].factor() / f64::from(late);
            }
        }
    }
    // Its fair share of the load would be 32/3 = 10.7 requests a second,
    // over its 8: it settles below 8/12 of its peers' weight.
    assert!(
        factor_late[2] < 0.7,
        "slow backend's factor {factor_late:?}"
    );
    assert!(factor_late[2] > P.min_factor, "{factor_late:?}");
    assert!(
        factor_late[0] > 0.95 && factor_late[1] > 0.95,
        "{factor_late:?}"
    );
    assert!(
        queue_late[2] < 1.0,
        "slow backend's mean queue {queue_late:?}"
    );
    assert!(queue_late[0] < 0.1 && queue_late[1] < 0.1, "{queue_late:?}");
    // Without the controller its queue grows without bound.
    let mut fixed = Sim {
        slots: [16.0, 16.0, 8.0],
        running: [0.0; 3],
        waiting: [0.0; 3],
    };
    for _ in 0..(seconds * 10) {
        fixed.step([1.0; 3], offered, 0.1);
    }
    assert!(fixed.waiting[2] > 100.0, "{:?}", fixed.waiting);
}

#[test]
fn a_passing_snapshot_is_smoothed_away() {
    // A full batch in one scrape (kv 1), then none: one step down, small.
    let mut c = Controller::default();
    c.update(&figures(0.0, Some(0.3)), &P);
    c.update(&figures(0.0, Some(1.0)), &P);
    assert!(c.factor() > 0.8, "{}", c.factor());
    // A queue that stays: down scrape after scrape.
    let mut c = Controller::default();
    let mut last = c.factor();
    for i in 0..10 {
        let now = c.update(&figures(2.0, None), &P);
        assert!(now < last, "scrape {i}: {now} after {last}");
        last = now;
    }
}

#[test]
fn equally_loaded_backends_keep_equal_factors() {
    let mut a = Controller::default();
    let mut b = Controller::default();
    for w in [3.0, 5.0, 0.0, 9.0, 0.0, 0.0] {
        a.update(&figures(w, Some(0.3)), &P);
        b.update(&figures(w, Some(0.3)), &P);
    }
    assert_eq!(a.factor(), b.factor());
}
