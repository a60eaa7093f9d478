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
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="end">{:.0}</text>"#,
        left - 4.0,
        top + 10.0,
        y_max
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="end">0</text>"#,
        left - 4.0,
        top + PANEL
    );
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
    }
}
