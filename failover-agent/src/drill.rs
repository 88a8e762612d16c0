//! Failover drills: a backend or tier is marked down in the data plane for
//! a bounded time while real traffic flows; the control loop samples the
//! data plane's per-backend counters every [`SAMPLE_INTERVAL`], restores,
//! and the samples become a report (failover time, packets lost, which
//! backends took over) and an SVG timeline.

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use serde::{Deserialize, Serialize};

pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(10);
/// Sampling before the fault, for a baseline.
pub const BASELINE: Duration = Duration::from_millis(500);
/// Sampling after the restore, to show the failback.
pub const TAIL: Duration = Duration::from_secs(1);
pub const MAX_DRILL: Duration = Duration::from_secs(300);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrillRequest {
    pub service: String,
    pub backend: Option<String>,
    pub tier: Option<u8>,
    /// How long the target stays down, e.g. "5s".
    #[serde(rename = "for")]
    pub for_: String,
    /// Drill even when the service would be left below its floor.
    #[serde(default)]
    pub force: bool,
}

/// One sample: time since the drill began, cumulative forwarded packets
/// per backend of the service, cumulative drops and resets.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub t_s: f64,
    pub packets: BTreeMap<String, u64>,
    pub dropped: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DrillReport {
    pub service: String,
    pub targets: Vec<String>,
    /// `running` or `done`.
    pub state: String,
    pub fault_start_s: f64,
    pub fault_end_s: f64,
    pub samples: Vec<Sample>,
    /// From the fault to the first sample in which the targets got no
    /// packet and others did (sample resolution); none if traffic never
    /// moved.
    pub failover_ms: Option<f64>,
    /// Packets dropped or reset by the data plane during the fault, above
    /// the baseline rate of drops before it (so unrelated drops, e.g. of
    /// traffic for no service, do not count).
    pub lost_packets: u64,
    /// Backends that forwarded packets during the fault.
    pub took_over: Vec<String>,
}

/// Fills in `failover_ms`, `lost_packets` and `took_over` from the samples.
pub fn analyze(r: &mut DrillReport) {
    let s = &r.samples;
    let is_target = |n: &str| r.targets.iter().any(|t| t == n);
    r.failover_ms = None;
    r.took_over.clear();
    let mut took = std::collections::BTreeSet::new();
    for w in s.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        if b.t_s <= r.fault_start_s || a.t_s >= r.fault_end_s {
            continue;
        }
        let delta = |n: &String| {
            b.packets
                .get(n)
                .copied()
                .unwrap_or(0)
                .saturating_sub(a.packets.get(n).copied().unwrap_or(0))
        };
        let to_targets: u64 = b.packets.keys().filter(|n| is_target(n)).map(&delta).sum();
        let to_others: u64 = b.packets.keys().filter(|n| !is_target(n)).map(&delta).sum();
        for n in b.packets.keys().filter(|n| !is_target(n)) {
            if delta(n) > 0 {
                took.insert(n.clone());
            }
        }
        if r.failover_ms.is_none() && to_targets == 0 && to_others > 0 {
            r.failover_ms = Some(((b.t_s - r.fault_start_s).max(0.0)) * 1e3);
        }
    }
    r.took_over = took.into_iter().collect();
    let (first_t, first_d) = s.first().map_or((0.0, 0), |x| (x.t_s, x.dropped));
    let start = s
        .iter()
        .rev()
        .find(|x| x.t_s <= r.fault_start_s)
        .map_or((first_t, first_d), |x| (x.t_s, x.dropped));
    let end = s
        .iter()
        .find(|x| x.t_s >= r.fault_end_s)
        .or(s.last())
        .map_or(start, |x| (x.t_s, x.dropped));
    #[allow(clippy::cast_precision_loss)]
    let base_rate = if start.0 > first_t {
        start.1.saturating_sub(first_d) as f64 / (start.0 - first_t)
    } else {
        0.0
    };
    let expected = base_rate * (end.0 - start.0).max(0.0);
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    let lost = (end.1.saturating_sub(start.1) as f64 - expected)
        .max(0.0)
        .round() as u64;
    r.lost_packets = lost;
}

/// A timeline chart: packets per backend per sample interval, the fault
/// window shaded. Self-contained SVG, opens in any browser.
pub fn svg(r: &DrillReport) -> String {
    const W: f64 = 900.0;
    const H: f64 = 420.0;
    const L: f64 = 60.0;
    const R: f64 = 160.0;
    const T: f64 = 40.0;
    const B: f64 = 50.0;
    const COLOURS: &[&str] = &[
        "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
    ];
    let names: Vec<&String> = r
        .samples
        .first()
        .map_or(Vec::new(), |s| s.packets.keys().collect());
    let t_max = r.samples.last().map_or(1.0, |s| s.t_s).max(0.001);
    // Rates per interval.
    let mut series: Vec<Vec<(f64, f64)>> = vec![Vec::new(); names.len()];
    for w in r.samples.windows(2) {
        let dt = (w[1].t_s - w[0].t_s).max(1e-6);
        for (i, n) in names.iter().enumerate() {
            let d = w[1]
                .packets
                .get(*n)
                .copied()
                .unwrap_or(0)
                .saturating_sub(w[0].packets.get(*n).copied().unwrap_or(0));
            #[allow(clippy::cast_precision_loss)]
            series[i].push((w[1].t_s, d as f64 / dt));
        }
    }
    let y_max = series.iter().flatten().map(|p| p.1).fold(1.0_f64, f64::max);
    let x = |t: f64| L + (t / t_max) * (W - L - R);
    let y = |v: f64| H - B - (v / y_max) * (H - T - B);
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(o, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        o,
        r#"<rect x="{:.1}" y="{T}" width="{:.1}" height="{:.1}" fill="rgb(214,39,40)" fill-opacity="0.12"/>"#,
        x(r.fault_start_s),
        (x(r.fault_end_s) - x(r.fault_start_s)).max(1.0),
        H - T - B
    );
    let title = format!(
        "drill: {} down in {} — failover {}, {} packets lost",
        r.targets.join(", "),
        r.service,
        r.failover_ms
            .map_or_else(|| "not observed".to_owned(), |m| format!("{m:.0} ms")),
        r.lost_packets
    );
    let _ = writeln!(
        o,
        r#"<text x="{L}" y="24" font-size="14">{}</text>"#,
        xml(&title)
    );
    let _ = writeln!(
        o,
        r#"<line x1="{L}" y1="{}" x2="{}" y2="{}" stroke="black"/><line x1="{L}" y1="{T}" x2="{L}" y2="{}" stroke="black"/>"#,
        H - B,
        W - R,
        H - B,
        H - B
    );
    let _ = writeln!(
        o,
        r#"<text x="{}" y="{}" text-anchor="middle">time (s)</text><text x="14" y="{}" transform="rotate(-90 14 {})" text-anchor="middle">packets/s to backend</text>"#,
        (L + W - R) / 2.0,
        H - 12.0,
        H / 2.0,
        H / 2.0
    );
    for k in 0..=4 {
        let t = t_max * f64::from(k) / 4.0;
        let v = y_max * f64::from(k) / 4.0;
        let _ = writeln!(
            o,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{t:.2}</text><text x="{}" y="{:.1}" text-anchor="end">{v:.0}</text>"#,
            x(t),
            H - B + 16.0,
            L - 6.0,
            y(v) + 4.0
        );
    }
    for (i, n) in names.iter().enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        let pts: Vec<String> = series[i]
            .iter()
            .map(|(t, v)| format!("{:.1},{:.1}", x(*t), y(*v)))
            .collect();
        let _ = writeln!(
            o,
            r#"<polyline fill="none" stroke="{c}" stroke-width="1.5" points="{}"/>"#,
            pts.join(" ")
        );
        #[allow(clippy::cast_precision_loss)]
        let ly = T + 16.0 * i as f64 + 10.0;
        let _ = writeln!(
            o,
            r#"<rect x="{}" y="{:.1}" width="12" height="3" fill="{c}"/><text x="{}" y="{:.1}">{}</text>"#,
            W - R + 12.0,
            ly - 3.0,
            W - R + 30.0,
            ly + 2.0,
            xml(n)
        );
    }
    let _ = writeln!(
        o,
        r#"<text x="{}" y="{:.1}" fill="rgb(214,39,40)">fault window</text>"#,
        W - R + 12.0,
        T + 16.0 * names.len() as f64 + 14.0
    );
    o.push_str("</svg>\n");
    o
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(t: f64, a: u64, b: u64, dropped: u64) -> Sample {
        Sample {
            t_s: t,
            packets: [("a".to_owned(), a), ("b".to_owned(), b)].into(),
            dropped,
        }
    }

    #[test]
    fn failover_time_loss_and_takeover_come_from_the_counters() {
        let mut r = DrillReport {
            service: "web".into(),
            targets: vec!["a".into()],
            state: "done".into(),
            fault_start_s: 0.5,
            fault_end_s: 1.0,
            samples: vec![
                sample(0.40, 100, 0, 0),
                sample(0.50, 110, 0, 0),
                sample(0.52, 112, 0, 1), // still reaching a
                sample(0.54, 112, 5, 3), // moved: 40 ms
                sample(0.90, 112, 50, 3),
                sample(1.00, 112, 60, 3),
                sample(1.20, 130, 60, 3),
            ],
            failover_ms: None,
            lost_packets: 0,
            took_over: vec![],
        };
        analyze(&mut r);
        let ms = r.failover_ms.unwrap();
        assert!((ms - 40.0).abs() < 1e-6, "{ms}");
        assert_eq!(r.lost_packets, 3);
        assert_eq!(r.took_over, ["b"]);
        let svg = svg(&r);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("fault window") && svg.contains("polyline"));
    }
}
