//! Operator actions checked by the planner itself: the action is planned
//! as if applied, with the same planner and policy that will place the
//! traffic, and refused when a service would be left with fewer healthy
//! backends taking new flows than its floor (`policy.min_healthy`, at
//! least 1: "no backend its policy allows" is below any floor).
//!
//! Only a loss is refused: an action that leaves a service no worse off
//! than it is now passes, even below the floor (draining a backend that
//! is down already; an override toward a tier with nothing healthy, which
//! the planner ignores until that tier heals). The check sees health as
//! it is at the time of the action.

use std::fmt;

use serde::Serialize;

use super::{
    BackendHealth, BackendIds, HealthView, Override, Overrides, ServicePlan, plan_service,
};
use crate::config::Config;

/// An operator action, as the planner would see it applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action<'a> {
    /// `drain B`: no new flows to B.
    Drain { backend: &'a str },
    /// `failover --service S --to-tier N`.
    Failover { service: &'a str, tier: u8 },
    /// A drill: these backends marked down (in `service`'s pool).
    MarkDown {
        service: &'a str,
        backends: &'a [String],
    },
}

impl fmt::Display for Action<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Drain { backend } => write!(f, "drain {backend}"),
            Action::Failover { service, tier } => write!(f, "failover {service} to tier {tier}"),
            Action::MarkDown { service, backends } => {
                write!(f, "drill of {} in {service}", backends.join(", "))
            }
        }
    }
}

/// One service the action would leave short.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Shortfall {
    pub service: String,
    /// Healthy backends taking new flows now, and after the action.
    pub before: usize,
    pub after: usize,
    /// `policy.min_healthy`.
    pub floor: u32,
}

/// Why an action was refused: every service it would leave short.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
pub struct Refusal {
    pub action: String,
    pub short: Vec<Shortfall>,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} would leave ", self.action)?;
        for (i, s) in self.short.iter().enumerate() {
            if i > 0 {
                f.write_str("; and ")?;
            }
            write!(
                f,
                "service {} with {} healthy backend{} taking new flows (now {}; policy.min_healthy {})",
                s.service,
                s.after,
                if s.after == 1 { "" } else { "s" },
                s.before,
                s.floor
            )?;
        }
        Ok(())
    }
}

/// Healthy backends the plan gives new flows to (in a fail-open ring,
/// the unhealthy ones do not count).
#[must_use]
pub fn healthy_serving(plan: &ServicePlan) -> usize {
    plan.backends
        .iter()
        .filter(|b| b.weight > 0 && b.health.factor() > 0.0)
        .count()
}

/// Plans `action` against the current inputs and refuses it when it would
/// leave a service below its floor ([`Refusal`]). The inputs are the
/// planner's: the caller's health view, ids and overrides as they are now.
pub fn check_action(
    cfg: &Config,
    health: &HealthView,
    ids: &BackendIds,
    overrides: &Overrides,
    action: Action<'_>,
) -> Result<(), Refusal> {
    let mut after_health = health.clone();
    let mut after_overrides = overrides.clone();
    let touched: Vec<&str> = match action {
        Action::Drain { backend } => {
            after_health.set(backend, BackendHealth::Draining);
            cfg.services
                .iter()
                .filter(|s| s.backends.iter().any(|b| b == backend))
                .map(|s| s.name.as_str())
                .collect()
        }
        Action::Failover { service, tier } => {
            after_overrides.insert(service.to_owned(), Override { to_tier: tier });
            vec![service]
        }
        Action::MarkDown { service, backends } => {
            for b in backends {
                // A drained backend stays drained; anything else goes down.
                if health.get(b) != BackendHealth::Draining {
                    after_health.set(b.as_str(), BackendHealth::Down);
                }
            }
            let mut touched: Vec<&str> = cfg
                .services
                .iter()
                .filter(|s| s.backends.iter().any(|b| backends.contains(b)))
                .map(|s| s.name.as_str())
                .collect();
            if !touched.contains(&service) {
                touched.push(service);
            }
            touched
        }
    };
    let short: Vec<Shortfall> = touched
        .into_iter()
        .filter_map(|name| {
            let svc = cfg.service(name)?;
            let before = healthy_serving(&plan_service(cfg, svc, health, ids, overrides));
            let after = healthy_serving(&plan_service(
                cfg,
                svc,
                &after_health,
                ids,
                &after_overrides,
            ));
            let floor = svc.policy.min_healthy.max(1);
            (after < floor as usize && after < before).then(|| Shortfall {
                service: name.to_owned(),
                before,
                after,
                floor,
            })
        })
        .collect();
    if short.is_empty() {
        Ok(())
    } else {
        Err(Refusal {
            action: action.to_string(),
            short,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{PanicMode, Policy};
    use crate::planner::tests::{be, cfg, svc};

    const UP: BackendHealth = BackendHealth::Up;
    const DOWN: BackendHealth = BackendHealth::Down;

    /// web: a1, a2 (tier 0), b1 (tier 1); api: a2 alone.
    fn setup(policy: impl Fn(&mut Policy)) -> (Config, BackendIds) {
        let mut p = Policy {
            ring_size: 251,
            ..Policy::default()
        };
        policy(&mut p);
        let c = cfg(
            vec![
                svc("web", &["a1", "a2", "b1"], p.clone()),
                svc("api", &["a2"], p),
            ],
            vec![
                be("a1", "EU", "r", 0, 100, &[]),
                be("a2", "EU", "r", 0, 100, &[]),
                be("b1", "EU", "r", 1, 100, &[]),
            ],
        );
        let ids = [("a1", 0), ("a2", 1), ("b1", 2)]
            .into_iter()
            .map(|(n, i)| (n.to_owned(), i))
            .collect();
        (c, ids)
    }

    fn view(h: [BackendHealth; 3]) -> HealthView {
        ["a1", "a2", "b1"].into_iter().zip(h).collect()
    }

    fn check(
        c: &Config,
        ids: &BackendIds,
        h: [BackendHealth; 3],
        a: Action,
    ) -> Result<(), Refusal> {
        check_action(c, &view(h), ids, &Overrides::new(), a)
    }

    #[test]
    fn drains_are_refused_only_below_the_floor() {
        let (c, ids) = setup(|_| {});
        // a1 of two healthy tier-0 backends: web keeps a2.
        assert_eq!(
            check(&c, &ids, [UP, UP, UP], Action::Drain { backend: "a1" }),
            Ok(())
        );
        // a2 is api's only backend: api would keep none.
        let r = check(&c, &ids, [UP, UP, UP], Action::Drain { backend: "a2" }).unwrap_err();
        assert_eq!(
            r.short,
            [Shortfall {
                service: "api".into(),
                before: 1,
                after: 0,
                floor: 1
            }]
        );
        assert_eq!(
            r.to_string(),
            "drain a2 would leave service api with 0 healthy backends taking new flows \
             (now 1; policy.min_healthy 1)"
        );
        // With a2 down already, api loses nothing more: allowed.
        assert_eq!(
            check(&c, &ids, [UP, DOWN, UP], Action::Drain { backend: "a2" }),
            Ok(())
        );
        // Tier 1 takes over web when tier 0 is gone: still a healthy backend.
        assert_eq!(
            check(&c, &ids, [DOWN, UP, UP], Action::Drain { backend: "a1" }),
            Ok(())
        );
    }

    #[test]
    fn a_floor_above_one_counts_backends_taking_new_flows() {
        let (c, ids) = setup(|p| {
            p.min_healthy = 2;
            // Overprovisioning 2: one of two tier-0 backends keeps tier 0.
            p.overprovisioning = 2.0;
        });
        // web: a1 + a2 serve; draining a1 leaves a2 alone (tier 1 is not
        // asked: 50% x 2 = 100%).
        let r = check(&c, &ids, [UP, UP, UP], Action::Drain { backend: "a1" }).unwrap_err();
        assert_eq!((r.short[0].before, r.short[0].after), (2, 1));
        // A failover to tier 1 (one backend) is a loss below the floor too.
        let r = check(
            &c,
            &ids,
            [UP, UP, UP],
            Action::Failover {
                service: "web",
                tier: 1,
            },
        )
        .unwrap_err();
        assert_eq!((r.short[0].before, r.short[0].after), (2, 1));
    }

    #[test]
    fn failover_to_a_tier_with_nothing_healthy_changes_nothing() {
        let (c, ids) = setup(|_| {});
        // The planner ignores an override toward a tier with nothing
        // healthy: web keeps its two backends, nothing to refuse.
        let a = Action::Failover {
            service: "web",
            tier: 1,
        };
        assert_eq!(check(&c, &ids, [UP, UP, DOWN], a), Ok(()));
        assert_eq!(check(&c, &ids, [UP, UP, UP], a), Ok(()));
    }

    #[test]
    fn fail_open_rings_of_unhealthy_backends_count_as_none() {
        let (c, ids) = setup(|p| p.panic = PanicMode::FailOpen);
        // Draining api's last healthy backend would leave a fail-open ring
        // of... nothing allowed and healthy: refused as for fail closed.
        let r = check(&c, &ids, [UP, UP, UP], Action::Drain { backend: "a2" }).unwrap_err();
        assert_eq!(r.short[0].service, "api");
        // Marking web's healthy backends down in a drill leaves a fail-open
        // ring of down backends: 0 healthy.
        let targets = ["a1".to_owned(), "a2".to_owned()];
        let a = Action::MarkDown {
            service: "web",
            backends: &targets,
        };
        let r = check(&c, &ids, [UP, UP, DOWN], a).unwrap_err();
        let services: Vec<&str> = r.short.iter().map(|s| s.service.as_str()).collect();
        assert_eq!(services, ["web", "api"]);
    }
}
