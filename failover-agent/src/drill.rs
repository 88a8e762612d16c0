//! Failover drills: a backend or tier is marked down in the data plane for
//! a bounded time while real traffic flows; the control loop samples the
//! data plane's per-backend counters every [`SAMPLE_INTERVAL`], restores,
//! and the samples become a report (failover time, packets lost, which
//! backends took over) and an SVG timeline.

use std::{collections::BTreeMap, time::Duration};

use plotters::{coord::Shift, prelude::*};
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

/// Where a drill is: sampling (before, during or after the fault), or
/// finished with its report complete.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, strum::IntoStaticStr, strum::Display,
)]
#[serde(rename_all = "lowercase")]
#[strum(serialize_all = "lowercase")]
pub enum DrillState {
    Running,
    Done,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DrillReport {
    pub service: String,
    pub targets: Vec<String>,
    pub state: DrillState,
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

/// Timeline size in pixels, and the width of the legend on its right.
const SIZE: (u32, u32) = (900, 420);
const LEGEND_W: u32 = 160;
/// The backends' line colours (matplotlib's tab10), and the fault's.
const COLOURS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];
const FAULT: RGBColor = RGBColor(214, 39, 40);

/// A timeline chart: packets per backend per sample interval, the fault
/// window shaded. Self-contained SVG, opens in any browser.
pub fn svg(r: &DrillReport) -> String {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, SIZE).into_drawing_area();
        // Drawing into a String cannot fail short of a plotters bug; the
        // document is closed (`</svg>`) when the backend is dropped anyway.
        if let Err(e) = draw_timeline(&root, r) {
            tracing::warn!("drill timeline: {e}");
        }
    }
    out
}

/// Each backend's (time, packets per second) points.
type Series = Vec<Vec<(f64, f64)>>;

/// The backends (as named in the first sample) and each one's packets per
/// second over every sample interval, at the interval's end.
fn rates(r: &DrillReport) -> (Vec<&String>, Series) {
    let names: Vec<&String> = r
        .samples
        .first()
        .map_or(Vec::new(), |s| s.packets.keys().collect());
    let mut series: Series = vec![Vec::new(); names.len()];
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
    (names, series)
}

fn draw_timeline(
    root: &DrawingArea<SVGBackend<'_>, Shift>,
    r: &DrillReport,
) -> Result<(), DrawingAreaErrorKind<std::io::Error>> {
    let (names, series) = rates(r);
    let t_max = r.samples.last().map_or(1.0, |s| s.t_s).max(0.001);
    // A little headroom above the peak rate.
    let y_top = series.iter().flatten().map(|p| p.1).fold(1.0_f64, f64::max) * 1.05;
    let title = format!(
        "drill: {} down in {} — failover {}, {} packets lost",
        r.targets.join(", "),
        r.service,
        r.failover_ms
            .map_or_else(|| "not observed".to_owned(), |m| format!("{m:.0} ms")),
        r.lost_packets
    );
    root.fill(&WHITE)?;
    let body = root.titled(&title, ("sans-serif", 17))?;
    let (plot, legend) = body.split_horizontally(SIZE.0 - LEGEND_W);
    let mut chart = ChartBuilder::on(&plot)
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..t_max, 0.0..y_top)?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(5)
        .y_labels(5)
        .x_label_formatter(&|t| format!("{t:.2}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .x_desc("time (s)")
        .y_desc("packets/s to backend")
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 14))
        .draw()?;
    // The fault window, within the time axis (a running drill's may end
    // after the last sample).
    let (f0, f1) = (
        r.fault_start_s.clamp(0.0, t_max),
        r.fault_end_s.clamp(0.0, t_max),
    );
    chart.draw_series(std::iter::once(Rectangle::new(
        [(f0, 0.0), (f1.max(f0), y_top)],
        FAULT.mix(0.12).filled(),
    )))?;
    for (i, points) in series.iter().enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        chart.draw_series(LineSeries::new(points.iter().copied(), c.stroke_width(2)))?;
    }
    // The legend, right of the chart: one line per backend, then the fault.
    let font = ("sans-serif", 14).into_font();
    let mut row = 10;
    for (i, n) in names.iter().enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        legend.draw(&Rectangle::new([(12, row + 5), (24, row + 8)], c.filled()))?;
        legend.draw(&Text::new(n.as_str(), (30, row), font.clone()))?;
        row += 18;
    }
    legend.draw(&Rectangle::new(
        [(12, row + 1), (24, row + 12)],
        FAULT.mix(0.12).filled(),
    ))?;
    legend.draw(&Text::new("fault window", (30, row), font.color(&FAULT)))?;
    root.present()
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
            state: DrillState::Done,
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
        assert!(
            svg.contains("drill: a down in web — failover 40 ms, 3 packets lost"),
            "{svg}"
        );
    }

    /// How a backend's line starts in the SVG (axes and ticks are 1 wide).
    const LINE: &str = r#"stroke-width="2" points="#;

    /// The text content of every `<text>` element, unescaped.
    fn texts(svg: &str) -> Vec<String> {
        svg.split("<text")
            .skip(1)
            .filter_map(|t| t.split_once('>')?.1.split_once("</text>"))
            .map(|(body, _)| {
                body.trim()
                    .replace("&lt;", "<")
                    .replace("&gt;", ">")
                    .replace("&quot;", "\"")
                    .replace("&apos;", "'")
                    .replace("&amp;", "&")
            })
            .collect()
    }

    #[test]
    fn the_timeline_shows_every_backend_the_fault_and_the_axes() {
        let s = |t: f64, gpu: u64, cpu: u64| Sample {
            t_s: t,
            packets: [("gpu-1".to_owned(), gpu), ("cpu <&> 2".to_owned(), cpu)].into(),
            dropped: 0,
        };
        let mut r = DrillReport {
            service: "infer".into(),
            targets: vec!["gpu-1".into()],
            state: DrillState::Done,
            fault_start_s: 0.2,
            fault_end_s: 0.6,
            samples: vec![
                s(0.0, 0, 0),
                s(0.1, 100, 0),
                s(0.2, 200, 0),
                s(0.3, 200, 90),
                s(0.6, 200, 400),
                s(0.8, 400, 400),
            ],
            failover_ms: None,
            lost_packets: 0,
            took_over: vec![],
        };
        analyze(&mut r);
        let svg = svg(&r);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        let texts = texts(&svg);
        for want in [
            "drill: gpu-1 down in infer — failover 100 ms, 0 packets lost",
            "gpu-1",
            "cpu <&> 2",
            "fault window",
            "time (s)",
            "packets/s to backend",
        ] {
            assert!(texts.iter().any(|t| t == want), "{want:?} not in {texts:?}");
        }
        // Axis ticks: times with two decimals, rates up to the peak (gpu-1's
        // 1000 packets/s before the fault and after it).
        assert!(texts.iter().any(|t| t == "0.00"), "{texts:?}");
        assert!(texts.iter().any(|t| t == "1000"), "{texts:?}");
        // One line per backend (the axes are thinner polylines), and the
        // shaded fault window.
        assert_eq!(svg.matches(LINE).count(), 2, "{svg}");
        assert!(svg.contains(r##"opacity="0.12" fill="#D62728""##), "{svg}");
    }

    #[test]
    fn a_drill_without_samples_still_draws() {
        let r = DrillReport {
            service: "web".into(),
            targets: vec!["a".into(), "b".into()],
            state: DrillState::Running,
            fault_start_s: 0.5,
            fault_end_s: 5.5,
            samples: vec![],
            failover_ms: None,
            lost_packets: 0,
            took_over: vec![],
        };
        let svg = svg(&r);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("drill: a, b down in web — failover not observed, 0 packets lost"));
        assert!(!svg.contains(LINE), "{svg}");
    }

    #[test]
    fn the_drill_state_reads_the_same_in_json_and_text() {
        for (st, word) in [(DrillState::Running, "running"), (DrillState::Done, "done")] {
            assert_eq!(serde_json::to_value(st).unwrap(), word);
            assert_eq!(
                serde_json::from_value::<DrillState>(word.into()).unwrap(),
                st
            );
            assert_eq!(st.to_string(), word);
            assert_eq!(<&str>::from(st), word);
        }
    }
}
