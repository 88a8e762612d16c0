//! Traffic shares per priority tier: Envoy's priority load rule with an
//! overprovisioning factor, plus a warm-standby floor.
//!
//! A tier whose healthy share `h` (healthy weight over configured weight)
//! times the factor `f` reaches 100% keeps everything it is offered; below
//! that it keeps `h * f` and the rest cascades to the next tier. When all
//! tiers together offer less than 100% the shares are normalised so they
//! still add up (Envoy's "degraded" case).

/// One tier's weights, in the tier order (preferred first).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TierWeights {
    pub tier: u8,
    /// Sum of configured weights of the allowed backends.
    pub configured: f64,
    /// Sum of effective weights: configured times the health factor.
    pub healthy: f64,
}

impl TierWeights {
    /// Healthy share `h` in [0, 1].
    #[must_use]
    pub fn health(&self) -> f64 {
        if self.configured > 0.0 {
            (self.healthy / self.configured).clamp(0.0, 1.0)
        } else {
            0.0
        }
    }
}

/// The traffic split over the tiers given to [`allocate`].
#[derive(Clone, Debug, PartialEq)]
pub struct Allocation {
    /// Share of traffic per tier, same order as the input; sums to 1.
    pub traffic: Vec<f64>,
    /// `min(1, h * f)` per tier: what each tier can absorb.
    pub availability: Vec<f64>,
    /// The tiers together offered less than 100%: shares were normalised.
    pub normalised: bool,
    /// Index of the tier that would carry everything when healthy: the
    /// first with any traffic.
    pub primary: usize,
    /// Share the primary tier lost to health (before the standby floor).
    pub spilled: f64,
    /// `(index, share moved)` when the standby floor moved traffic.
    pub standby: Option<(usize, f64)>,
}

/// Shares below this are rounding noise, not traffic.
pub const EPSILON: f64 = 1e-9;

/// Splits traffic over `tiers` (preferred first). `None` when no tier has
/// any healthy weight: the caller's panic rule decides.
#[must_use]
pub fn allocate(
    tiers: &[TierWeights],
    overprovisioning: f64,
    standby_share: f64,
) -> Option<Allocation> {
    let f = sane_factor(overprovisioning);
    let availability: Vec<f64> = tiers.iter().map(|t| (t.health() * f).min(1.0)).collect();
    let total: f64 = availability.iter().sum();
    if total <= EPSILON {
        return None;
    }
    let normaliser = total.min(1.0);
    let mut remaining = 1.0f64;
    let mut traffic: Vec<f64> = availability
        .iter()
        .map(|a| {
            let take = (a / normaliser).min(remaining);
            remaining -= take;
            take
        })
        .collect();
    let primary = traffic
        .iter()
        .position(|&t| t > EPSILON)
        .expect("some tier is available");
    // The first tier with allowed backends is "home"; a tier before the
    // primary with allowed backends but none healthy also counts as spill.
    let home = tiers
        .iter()
        .position(|t| t.configured > 0.0)
        .unwrap_or(primary);
    let spilled = (1.0 - traffic[home]).max(0.0);

    let mut standby = None;
    let s = sane_share(standby_share);
    if s > 0.0
        && let Some(next) = (primary + 1..tiers.len()).find(|&i| availability[i] > EPSILON)
        && traffic[next] < s
    {
        let moved = (s - traffic[next]).min(traffic[primary]);
        traffic[primary] -= moved;
        traffic[next] += moved;
        standby = Some((next, moved));
    }
    Some(Allocation {
        traffic,
        availability,
        normalised: total < 1.0 - EPSILON,
        primary,
        spilled,
        standby,
    })
}

/// A factor that is not a positive number means "no headroom".
#[must_use]
pub fn sane_factor(f: f64) -> f64 {
    if f.is_finite() && f > 0.0 { f } else { 1.0 }
}

/// The standby floor lives in [0, 1); anything else means "none".
#[must_use]
pub fn sane_share(s: f64) -> f64 {
    if s.is_finite() && (0.0..1.0).contains(&s) {
        s
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiers(spec: &[(f64, f64)]) -> Vec<TierWeights> {
        spec.iter()
            .enumerate()
            .map(|(i, &(configured, healthy))| TierWeights {
                tier: i as u8,
                configured,
                healthy,
            })
            .collect()
    }

    fn close(a: &[f64], b: &[f64]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-9)
    }

    #[test]
    fn envoy_priority_table() {
        // (tiers as (configured, healthy), factor, standby, want traffic, normalised)
        type Case = (&'static [(f64, f64)], f64, f64, &'static [f64], bool);
        let cases: &[Case] = &[
            (&[(2.0, 2.0), (2.0, 2.0)], 1.4, 0.0, &[1.0, 0.0], false),
            // 1/2 healthy x1.4 = 70%: 30% spills.
            (&[(2.0, 1.0), (2.0, 2.0)], 1.4, 0.0, &[0.7, 0.3], false),
            // 3/4 healthy x1.4 = 105%: still everything.
            (&[(4.0, 3.0), (2.0, 2.0)], 1.4, 0.0, &[1.0, 0.0], false),
            // Without headroom any loss spills.
            (&[(4.0, 3.0), (2.0, 2.0)], 1.0, 0.0, &[0.75, 0.25], false),
            // Cascade through a weak middle tier.
            (
                &[(10.0, 2.0), (10.0, 2.0), (1.0, 1.0)],
                1.4,
                0.0,
                &[0.28, 0.28, 0.44],
                false,
            ),
            // Everything weak: 42% + 28% = 70% < 100%, normalised.
            (&[(10.0, 3.0), (10.0, 2.0)], 1.4, 0.0, &[0.6, 0.4], true),
            // Tier 0 dead: all on tier 1.
            (&[(2.0, 0.0), (2.0, 2.0)], 1.4, 0.0, &[0.0, 1.0], false),
            // A tier with no allowed backends is skipped.
            (&[(0.0, 0.0), (2.0, 2.0)], 1.4, 0.0, &[0.0, 1.0], false),
            // Standby floor keeps 10% on tier 1.
            (&[(2.0, 2.0), (2.0, 2.0)], 1.4, 0.1, &[0.9, 0.1], false),
            // Floor already met by spill: nothing moves.
            (&[(2.0, 1.0), (2.0, 2.0)], 1.4, 0.1, &[0.7, 0.3], false),
            // Floor tops spill up.
            (&[(10.0, 9.0), (2.0, 2.0)], 1.0, 0.2, &[0.8, 0.2], false),
            // No healthy standby: the floor has nowhere to go.
            (&[(2.0, 2.0), (2.0, 0.0)], 1.4, 0.1, &[1.0, 0.0], false),
            // Tier 0 dead: the standby floor applies to the next tier down.
            (
                &[(2.0, 0.0), (2.0, 2.0), (1.0, 1.0)],
                1.4,
                0.1,
                &[0.0, 0.9, 0.1],
                false,
            ),
            // Nonsense factor and share are ignored.
            (&[(2.0, 1.0), (2.0, 2.0)], f64::NAN, 1.5, &[0.5, 0.5], false),
        ];
        for (i, (spec, f, s, want, normalised)) in cases.iter().enumerate() {
            let a = allocate(&tiers(spec), *f, *s).expect("healthy");
            assert!(
                close(&a.traffic, want),
                "case {i}: {:?} != {want:?}",
                a.traffic
            );
            assert_eq!(a.normalised, *normalised, "case {i}");
            assert!(
                (a.traffic.iter().sum::<f64>() - 1.0).abs() < 1e-9,
                "case {i}"
            );
        }
    }

    #[test]
    fn spill_is_measured_from_home_tier() {
        let a = allocate(&tiers(&[(2.0, 1.0), (2.0, 2.0)]), 1.4, 0.0).unwrap();
        assert!((a.spilled - 0.3).abs() < 1e-9);
        assert_eq!(a.primary, 0);
        let a = allocate(&tiers(&[(2.0, 0.0), (2.0, 2.0)]), 1.4, 0.0).unwrap();
        assert!((a.spilled - 1.0).abs() < 1e-9);
        assert_eq!(a.primary, 1);
        let a = allocate(&tiers(&[(2.0, 2.0), (2.0, 2.0)]), 1.4, 0.25).unwrap();
        assert!(a.spilled.abs() < 1e-9);
        assert_eq!(a.standby, Some((1, 0.25)));
    }

    #[test]
    fn nothing_healthy_is_none() {
        assert_eq!(allocate(&tiers(&[(2.0, 0.0), (1.0, 0.0)]), 1.4, 0.1), None);
        assert_eq!(allocate(&tiers(&[(0.0, 0.0)]), 1.4, 0.0), None);
        assert_eq!(allocate(&[], 1.4, 0.0), None);
    }
}
