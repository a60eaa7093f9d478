//! `--plot FILE.svg`: throughput and latency over time, as a plain SVG
//! (two stacked line charts, no dependencies).

use std::fmt::Write as _;
use std::path::Path;

use crate::report::TimelinePoint;

const WIDTH: f64 = 800.0;
const PANEL: f64 = 220.0;
const MARGIN: f64 = 60.0;

/// Writes the chart for `timeline` to `path`.
pub fn write(path: &Path, title: &str, timeline: &[TimelinePoint]) -> Result<(), String> {
    let svg = render(title, timeline);
    std::fs::write(path, svg).map_err(|e| format!("--plot {}: {e}", path.display()))
}

/// The SVG document.
pub fn render(title: &str, timeline: &[TimelinePoint]) -> String {
    let height = 2.0 * PANEL + 3.0 * MARGIN;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{MARGIN}" y="24" font-size="15">{}</text>"#,
        escape(title)
    );
    let t_max = timeline.iter().map(|p| p.t_s).fold(0.0, f64::max).max(1e-9);
    let rate: Vec<(f64, f64)> = timeline
        .iter()
        .map(|p| (p.t_s, p.deliveries_per_s))
        .collect();
    let p50: Vec<(f64, f64)> = timeline.iter().map(|p| (p.t_s, p.p50_us)).collect();
    let p99: Vec<(f64, f64)> = timeline.iter().map(|p| (p.t_s, p.p99_us)).collect();
    panel(
        &mut s,
        MARGIN,
        "deliveries/s",
        t_max,
        &[(&rate, "#1f77b4", "deliveries/s")],
    );
    panel(
        &mut s,
        2.0 * MARGIN + PANEL,
        "latency (µs)",
        t_max,
        &[(&p50, "#2ca02c", "p50"), (&p99, "#d62728", "p99")],
    );
    s.push_str("</svg>\n");
    s
}

/// One line: its points, colour and legend.
type Series<'a> = (&'a [(f64, f64)], &'a str, &'a str);

fn panel(s: &mut String, top: f64, label: &str, t_max: f64, series: &[Series<'_>]) {
    let left = MARGIN;
    let w = WIDTH - 2.0 * MARGIN;
    let y_max = series
        .iter()
        .flat_map(|(pts, _, _)| pts.iter().map(|p| p.1))
        .fold(0.0, f64::max)
        .max(1e-9)
        * 1.1;
    let _ = writeln!(
        s,
        r#"<rect x="{left}" y="{top}" width="{w}" height="{PANEL}" fill="none" stroke="gray"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="{}">{}</text>"#,
        top - 6.0,
        escape(label)
    );
    // Ticks at round values (0, 1/2/5 × 10^k steps) with light grid
    // lines, so a reader can read a value off the line, not only the range.
    for value in ticks(y_max) {
        let y = top + PANEL - PANEL * value / y_max;
        if value > 0.0 {
            let _ = writeln!(
                s,
                r##"<line x1="{left}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#e0e0e0"/>"##,
                left + w
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
            left - 4.0,
            y + 4.0,
            tick_label(value)
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="end">{:.1} s</text>"#,
        left + w,
        top + PANEL + 14.0,
        t_max
    );
    for (i, (pts, color, name)) in series.iter().enumerate() {
        let mut d = String::new();
        for (t, v) in pts.iter() {
            let x = left + w * t / t_max;
            let y = top + PANEL - PANEL * v / y_max;
            let _ = write!(d, "{x:.1},{y:.1} ");
        }
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{d}"/>"#
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" fill="{color}">{}</text>"#,
            left + w - 80.0,
            top + 16.0 + 14.0 * i as f64,
            escape(name)
        );
    }
}

/// Round tick values from 0 up to `max`: four to ten of them, a step of
/// 1, 2 or 5 times a power of ten.
fn ticks(max: f64) -> Vec<f64> {
    if !(max.is_finite() && max > 0.0) {
        return vec![0.0];
    }
    let rough = max / 8.0;
    let magnitude = 10f64.powf(rough.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= rough)
        .unwrap_or(10.0 * magnitude);
    (0..=10)
        .map(|i| i as f64 * step)
        .take_while(|v| *v <= max)
        .collect()
}

/// A tick value, short: `250`, `1.5k`, `2M`, `0.5`.
fn tick_label(v: f64) -> String {
    let trim = |x: f64| {
        let t = format!("{x:.1}");
        t.strip_suffix(".0").map(str::to_string).unwrap_or(t)
    };
    if v >= 1e6 {
        format!("{}M", trim(v / 1e6))
    } else if v >= 1e3 {
        format!("{}k", trim(v / 1e3))
    } else if v >= 1.0 || v == 0.0 {
        trim(v)
    } else {
        format!("{v:.2}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_both_panels() {
        let tl: Vec<TimelinePoint> = (1..=5)
            .map(|i| TimelinePoint {
                t_s: i as f64,
                deliveries_per_s: 1000.0 * i as f64,
                p50_us: 10.0,
                p99_us: 40.0,
            })
            .collect();
        let svg = render("a <test>", &tl);
        assert!(svg.starts_with("<svg"));
        assert_eq!(svg.matches("<polyline").count(), 3);
        assert!(svg.contains("a &lt;test&gt;"));
        assert!(svg.trim_end().ends_with("</svg>"));
        // Intermediate ticks on both y axes, not only 0 and the top.
        for label in [">1k<", ">2k<", ">5k<", ">10<", ">20<", ">40<"] {
            assert!(svg.contains(label), "no tick {label} in {svg}");
        }
    }

    #[test]
    fn ticks_are_round_and_within_the_axis() {
        assert_eq!(
            ticks(5500.0),
            vec![0.0, 1000.0, 2000.0, 3000.0, 4000.0, 5000.0]
        );
        assert_eq!(ticks(44.0), vec![0.0, 10.0, 20.0, 30.0, 40.0]);
        assert_eq!(ticks(0.0), vec![0.0]);
        for max in [0.3, 7.0, 123.0, 9.9e6] {
            let t = ticks(max);
            assert!((4..=11).contains(&t.len()), "{max}: {t:?}");
            assert!(t.iter().all(|v| *v <= max));
        }
        assert_eq!(tick_label(1500.0), "1.5k");
        assert_eq!(tick_label(2e6), "2M");
        assert_eq!(tick_label(250.0), "250");
    }
}
