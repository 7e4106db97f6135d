//! `--plot FILE.svg`: throughput and latency over time as a small hand-written
//! SVG (two panels sharing the time axis). No plotting crate: a few polylines,
//! axes and labels are all it takes, and the file opens in any browser.

use std::fmt::Write as _;

use super::report::TimelinePoint;
use crate::text::{duration_text, escape, thousands, trim_number};

const WIDTH: f64 = 900.0;
const PANEL_HEIGHT: f64 = 260.0;
const MARGIN_LEFT: f64 = 80.0;
const MARGIN_RIGHT: f64 = 130.0;
const MARGIN_TOP: f64 = 50.0;
const PANEL_GAP: f64 = 60.0;
const MARGIN_BOTTOM: f64 = 50.0;

/// A latency line: its legend, colour and value at each point.
type Series = (&'static str, &'static str, fn(&TimelinePoint) -> u64);

/// Renders the timeline as an SVG document.
pub fn render_svg(points: &[TimelinePoint], title: &str) -> String {
    let height = MARGIN_TOP + 2.0 * PANEL_HEIGHT + PANEL_GAP + MARGIN_BOTTOM;
    let plot_width = WIDTH - MARGIN_LEFT - MARGIN_RIGHT;
    let seconds_max = points.last().map_or(1.0, |point| point.seconds).max(0.1);
    let x = |seconds: f64| MARGIN_LEFT + seconds / seconds_max * plot_width;

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="24" font-size="15" font-weight="bold">{}</text>"#,
        MARGIN_LEFT,
        escape(title)
    );

    rate_panel(&mut svg, points, seconds_max, &x);
    latency_panel(&mut svg, points, seconds_max, &x);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">seconds since the first tap</text>"#,
        MARGIN_LEFT + plot_width / 2.0,
        height - 12.0
    );
    svg.push_str("</svg>\n");
    svg
}

/// Panel 1: settlements per second, linear.
fn rate_panel(
    svg: &mut String,
    points: &[TimelinePoint],
    seconds_max: f64,
    x: &dyn Fn(f64) -> f64,
) {
    let top = MARGIN_TOP;
    let rate_max = nice_ceiling(
        points
            .iter()
            .map(|point| point.settled_per_sec)
            .fold(0.0, f64::max),
    );
    let y_rate = |rate: f64| top + PANEL_HEIGHT - rate / rate_max * PANEL_HEIGHT;
    frame(svg, top, "settlements per second");
    for step in 0..=4 {
        let value = rate_max * f64::from(step) / 4.0;
        grid_line(svg, y_rate(value), &thousands(value.round() as u64));
    }
    let line: Vec<(f64, f64)> = points
        .iter()
        .map(|point| (x(point.seconds), y_rate(point.settled_per_sec)))
        .collect();
    polyline(svg, &line, "#1f77b4");
    time_axis(svg, top + PANEL_HEIGHT, seconds_max, x);
}

/// Panel 2: latency, log scale, p50 / p99 / max of honest payments.
fn latency_panel(
    svg: &mut String,
    points: &[TimelinePoint],
    seconds_max: f64,
    x: &dyn Fn(f64) -> f64,
) {
    let top = MARGIN_TOP + PANEL_HEIGHT + PANEL_GAP;
    let with_latency: Vec<&TimelinePoint> = points
        .iter()
        .filter(|point| point.latency_count > 0)
        .collect();
    let low = with_latency
        .iter()
        .map(|point| point.p50_us.max(1))
        .min()
        .unwrap_or(100);
    let high = with_latency
        .iter()
        .map(|point| point.max_us.max(1))
        .max()
        .unwrap_or(10_000);
    let decade_low = (low as f64).log10().floor();
    let decade_high = (high as f64).log10().ceil().max(decade_low + 1.0);
    let y_latency = |micros: u64| {
        let position = ((micros.max(1) as f64).log10() - decade_low) / (decade_high - decade_low);
        top + PANEL_HEIGHT - position * PANEL_HEIGHT
    };
    frame(
        svg,
        top,
        "latency, later half's intended send → both phones told",
    );
    let mut decade = decade_low;
    while decade <= decade_high {
        let micros = 10f64.powf(decade) as u64;
        grid_line(svg, y_latency(micros), &duration_text(micros));
        if decade < decade_high {
            for factor in [2, 5] {
                grid_line(
                    svg,
                    y_latency(micros * factor),
                    &duration_text(micros * factor),
                );
            }
        }
        decade += 1.0;
    }
    let series: [Series; 3] = [
        ("max", "#d62728", |point| point.max_us),
        ("p99", "#ff7f0e", |point| point.p99_us),
        ("p50", "#2ca02c", |point| point.p50_us),
    ];
    for (index, (name, colour, value)) in series.iter().enumerate() {
        let line: Vec<(f64, f64)> = with_latency
            .iter()
            .map(|point| (x(point.seconds), y_latency(value(point))))
            .collect();
        polyline(svg, &line, colour);
        let legend_y = top + 16.0 + index as f64 * 18.0;
        let legend_x = WIDTH - MARGIN_RIGHT + 14.0;
        let _ = writeln!(
            svg,
            r#"<line x1="{legend_x}" y1="{legend_y}" x2="{}" y2="{legend_y}" stroke="{colour}" stroke-width="2"/><text x="{}" y="{}">{name}</text>"#,
            legend_x + 20.0,
            legend_x + 26.0,
            legend_y + 4.0
        );
    }
    time_axis(svg, top + PANEL_HEIGHT, seconds_max, x);
}

fn frame(svg: &mut String, top: f64, label: &str) {
    let plot_width = WIDTH - MARGIN_LEFT - MARGIN_RIGHT;
    let _ = writeln!(
        svg,
        r##"<rect x="{MARGIN_LEFT}" y="{top}" width="{plot_width}" height="{PANEL_HEIGHT}" fill="none" stroke="#444"/>"##
    );
    let _ = writeln!(
        svg,
        r#"<text x="{MARGIN_LEFT}" y="{}" font-weight="bold">{}</text>"#,
        top - 8.0,
        escape(label)
    );
}

fn grid_line(svg: &mut String, y: f64, label: &str) {
    let right = WIDTH - MARGIN_RIGHT;
    let _ = writeln!(
        svg,
        r##"<line x1="{MARGIN_LEFT}" y1="{y:.1}" x2="{right}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
        MARGIN_LEFT - 6.0,
        y + 4.0,
        escape(label)
    );
}

fn time_axis(svg: &mut String, bottom: f64, seconds_max: f64, x: &dyn Fn(f64) -> f64) {
    let step = nice_ceiling(seconds_max / 8.0).max(0.1);
    let mut seconds = 0.0;
    while seconds <= seconds_max + 1e-9 {
        let _ = writeln!(
            svg,
            r##"<line x1="{0:.1}" y1="{bottom}" x2="{0:.1}" y2="{1}" stroke="#444"/><text x="{0:.1}" y="{2}" text-anchor="middle">{3}</text>"##,
            x(seconds),
            bottom + 5.0,
            bottom + 18.0,
            trim_number(seconds)
        );
        seconds += step;
    }
}

fn polyline(svg: &mut String, points: &[(f64, f64)], colour: &str) {
    if points.is_empty() {
        return;
    }
    let mut path = String::new();
    for (x, y) in points {
        let _ = write!(path, "{x:.1},{y:.1} ");
    }
    let _ = writeln!(
        svg,
        r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="1.5"/>"#,
        path.trim_end()
    );
}

/// The smallest of 1, 2, 2.5, 5 × 10^k that is at least `value`.
fn nice_ceiling(value: f64) -> f64 {
    if value <= 0.0 || !value.is_finite() {
        return 1.0;
    }
    let magnitude = 10f64.powf(value.log10().floor());
    for factor in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if factor * magnitude >= value {
            return factor * magnitude;
        }
    }
    10.0 * magnitude
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_well_formed_document_with_both_panels() {
        let points: Vec<TimelinePoint> = (1..=50)
            .map(|index| TimelinePoint {
                seconds: f64::from(index) * 0.1,
                settled_per_sec: 4_000.0 + f64::from(index),
                latency_count: 400,
                p50_us: 900,
                p99_us: 4_000,
                max_us: 12_000,
            })
            .collect();
        let svg = render_svg(&points, "a <test> & run");
        assert!(svg.starts_with("<svg "));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 4);
        assert!(svg.contains("a &lt;test&gt; &amp; run"));
        assert!(svg.contains("settlements per second"));
    }

    #[test]
    fn an_empty_timeline_still_renders() {
        let svg = render_svg(&[], "empty");
        assert!(svg.contains("</svg>"));
    }

    #[test]
    fn nice_ceilings() {
        assert_eq!(nice_ceiling(3_700.0), 5_000.0);
        assert_eq!(nice_ceiling(1_000.0), 1_000.0);
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(0.21), 0.25);
    }
}
