//! `--report FILE.html|FILE.svg`: throughput and latency over time, and the
//! latency percentile distribution, drawn as plain SVG.

use std::fmt::Write as _;
use std::path::Path;

use hdrhistogram::Histogram;

use crate::stats::Summary;

const WIDTH: f64 = 900.0;
const PANEL_HEIGHT: f64 = 220.0;
const MARGIN_LEFT: f64 = 70.0;
const MARGIN_RIGHT: f64 = 20.0;
const PANEL_GAP: f64 = 60.0;

/// Percentiles plotted in the distribution panel.
const QUANTILES: [f64; 9] = [0.0, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 0.9999, 1.0];

struct Panel {
    top: f64,
    x_max: f64,
    y_max: f64,
}

impl Panel {
    fn x(&self, v: f64) -> f64 {
        MARGIN_LEFT + (WIDTH - MARGIN_LEFT - MARGIN_RIGHT) * (v / self.x_max.max(f64::MIN_POSITIVE))
    }

    fn y(&self, v: f64) -> f64 {
        self.top + PANEL_HEIGHT * (1.0 - v / self.y_max.max(f64::MIN_POSITIVE))
    }

    fn frame(&self, svg: &mut String, title: &str, y_label: &str) {
        let (left, right) = (MARGIN_LEFT, WIDTH - MARGIN_RIGHT);
        let bottom = self.top + PANEL_HEIGHT;
        let _ = write!(
            svg,
            r##"<text x="{left}" y="{}" font-size="14" font-weight="bold">{title}</text>
<rect x="{left}" y="{}" width="{}" height="{PANEL_HEIGHT}" fill="none" stroke="#999"/>
<text x="12" y="{}" font-size="11" transform="rotate(-90 12 {})">{y_label}</text>
"##,
            self.top - 8.0,
            self.top,
            right - left,
            self.top + PANEL_HEIGHT / 2.0,
            self.top + PANEL_HEIGHT / 2.0,
        );
        for step in 0..=4 {
            let value = self.y_max * f64::from(step) / 4.0;
            let y = self.y(value);
            let _ = write!(
                svg,
                r##"<line x1="{left}" y1="{y:.1}" x2="{right}" y2="{y:.1}" stroke="#eee"/><text x="{}" y="{:.1}" font-size="10" text-anchor="end">{}</text>"##,
                left - 4.0,
                y + 3.0,
                short(value)
            );
        }
        let _ = write!(
            svg,
            r##"<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#999"/>"##
        );
    }

    /// Labels the x axis in seconds.
    fn seconds_axis(&self, svg: &mut String) {
        for step in 0..=4 {
            let value = self.x_max * f64::from(step) / 4.0;
            let _ = write!(
                svg,
                r##"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="middle">{:.0} s</text>"##,
                self.x(value),
                self.top + PANEL_HEIGHT + 14.0,
                value
            );
        }
    }

    fn line(&self, svg: &mut String, points: &[(f64, f64)], color: &str, label: &str, slot: usize) {
        let path: Vec<String> = points
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", self.x(*x), self.y(*y)))
            .collect();
        let legend_x = WIDTH - MARGIN_RIGHT - 150.0;
        let legend_y = self.top + 14.0 + 14.0 * slot as f64;
        let _ = write!(
            svg,
            r##"<polyline fill="none" stroke="{color}" stroke-width="1.8" points="{}"/>
<rect x="{legend_x}" y="{:.1}" width="10" height="10" fill="{color}"/><text x="{:.1}" y="{legend_y:.1}" font-size="11">{label}</text>
"##,
            path.join(" "),
            legend_y - 9.0,
            legend_x + 14.0,
        );
    }
}

fn short(v: f64) -> String {
    if v >= 1_000_000.0 {
        format!("{:.1}M", v / 1_000_000.0)
    } else if v >= 1_000.0 {
        format!("{:.1}k", v / 1_000.0)
    } else if v >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// The report as a standalone SVG document.
pub(crate) fn svg(summary: &Summary, latency: &Histogram<u64>) -> String {
    let height = 3.0 * (PANEL_HEIGHT + PANEL_GAP) + 20.0;
    let mut svg = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif">
<rect width="100%" height="100%" fill="white"/>
"##
    );
    let seconds = summary.timeline.len().max(1) as f64;
    let throughput: Vec<(f64, f64)> = summary
        .timeline
        .iter()
        .map(|p| (p.second as f64 + 0.5, p.events as f64))
        .collect();
    let errors: Vec<(f64, f64)> = summary
        .timeline
        .iter()
        .map(|p| {
            (
                p.second as f64 + 0.5,
                p.errors as f64 * summary.batch_size as f64,
            )
        })
        .collect();
    let panel = Panel {
        top: 40.0,
        x_max: seconds,
        y_max: throughput.iter().map(|p| p.1).fold(1.0, f64::max) * 1.1,
    };
    panel.frame(&mut svg, "Events per second over time", "events/s");
    panel.seconds_axis(&mut svg);
    panel.line(&mut svg, &throughput, "#1f77b4", "events sent/s", 0);
    panel.line(&mut svg, &errors, "#d62728", "errors (events)/s", 1);

    let p50: Vec<(f64, f64)> = summary
        .timeline
        .iter()
        .map(|p| (p.second as f64 + 0.5, p.p50_ms))
        .collect();
    let p99: Vec<(f64, f64)> = summary
        .timeline
        .iter()
        .map(|p| (p.second as f64 + 0.5, p.p99_ms))
        .collect();
    let panel = Panel {
        top: 40.0 + PANEL_HEIGHT + PANEL_GAP,
        x_max: seconds,
        y_max: p99.iter().map(|p| p.1).fold(0.1, f64::max) * 1.1,
    };
    panel.frame(&mut svg, "Latency over time, ms", "ms");
    panel.seconds_axis(&mut svg);
    panel.line(&mut svg, &p50, "#2ca02c", "p50", 0);
    panel.line(&mut svg, &p99, "#ff7f0e", "p99", 1);

    // Percentile distribution on a log scale of 1/(1-q): 0, 50, 90, 99, 99.9 ...
    let position = |q: f64| (1.0 / (1.0 - q.min(0.99999))).log10();
    let points: Vec<(f64, f64)> = QUANTILES
        .iter()
        .map(|&q| (position(q), latency.value_at_quantile(q) as f64 / 1000.0))
        .collect();
    let panel = Panel {
        top: 40.0 + 2.0 * (PANEL_HEIGHT + PANEL_GAP),
        x_max: position(0.99999),
        y_max: points.iter().map(|p| p.1).fold(0.1, f64::max) * 1.1,
    };
    panel.frame(&mut svg, "Latency by percentile, ms", "ms");
    panel.line(&mut svg, &points, "#9467bd", "latency", 0);
    for (q, label) in [
        (0.5, "50%"),
        (0.9, "90%"),
        (0.99, "99%"),
        (0.999, "99.9%"),
        (0.9999, "99.99%"),
    ] {
        let x = panel.x(position(q));
        let _ = write!(
            svg,
            r##"<text x="{x:.1}" y="{:.1}" font-size="10" text-anchor="middle">{label}</text>"##,
            panel.top + PANEL_HEIGHT + 14.0
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The report as an HTML page: the summary table above the plots.
pub(crate) fn html(summary: &Summary, latency: &Histogram<u64>) -> String {
    format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>eventflow-loadgen report</title>\
         <style>body{{font-family:sans-serif;margin:2em}}pre{{background:#f6f6f6;padding:1em}}</style></head>\
         <body><h1>eventflow-loadgen</h1><pre>{}</pre>{}</body></html>\n",
        escape(&summary.table()),
        svg(summary, latency)
    )
}

/// Writes the report; the extension chooses the format.
pub(crate) fn write(
    path: &Path,
    summary: &Summary,
    latency: &Histogram<u64>,
) -> std::io::Result<()> {
    let content = match path.extension().and_then(|e| e.to_str()) {
        Some("svg") => svg(summary, latency),
        _ => html(summary, latency),
    };
    std::fs::write(path, content)
}
