//! `--report FILE.html|FILE.svg`: throughput and latency over time, and the
//! latency percentile distribution, drawn with `plotters`' SVG backend.

use std::path::Path;

use hdrhistogram::Histogram;
use plotters::prelude::*;

use crate::stats::Summary;

const WIDTH: u32 = 900;
const PANEL_HEIGHT: u32 = 280;

/// Percentiles drawn in the distribution panel (up to 99.999 %: the axis
/// cannot reach 100 %, and the maximum is in the summary table).
const QUANTILES: [f64; 9] = [0.0, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 0.9999, 0.99999];

/// Where a quantile sits on the distribution's x axis: log10 of 1/(1-q),
/// so that 90, 99, 99.9 … % are evenly spaced.
fn position(q: f64) -> f64 {
    (1.0 / (1.0 - q.min(0.99999))).log10()
}

/// Why a report could not be drawn or written.
#[derive(Debug)]
pub(crate) struct ReportError(String);

impl std::fmt::Display for ReportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl<E: std::error::Error + Send + Sync> From<DrawingAreaErrorKind<E>> for ReportError {
    fn from(error: DrawingAreaErrorKind<E>) -> Self {
        Self(format!("drawing failed: {error}"))
    }
}

type Points = Vec<(f64, f64)>;

/// One line chart: its series share the axes.
struct Chart<'a> {
    title: &'a str,
    x_label: &'a str,
    y_label: &'a str,
    x_max: f64,
    series: Vec<(&'a str, RGBColor, Points)>,
}

impl Chart<'_> {
    fn draw<DB: DrawingBackend>(
        &self,
        area: &DrawingArea<DB, plotters::coord::Shift>,
    ) -> Result<(), ReportError>
    where
        DB::ErrorType: 'static,
    {
        let y_max = self
            .series
            .iter()
            .flat_map(|(_, _, points)| points.iter().map(|p| p.1))
            .fold(0.0_f64, f64::max)
            .max(0.001)
            * 1.1;
        let mut chart = ChartBuilder::on(area)
            .caption(self.title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(32)
            .y_label_area_size(64)
            .build_cartesian_2d(0.0..self.x_max.max(0.001), 0.0..y_max)?;
        chart
            .configure_mesh()
            .x_desc(self.x_label)
            .y_desc(self.y_label)
            .light_line_style(WHITE.mix(0.0))
            .draw()?;
        for (label, color, points) in &self.series {
            let color = *color;
            chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    color.stroke_width(2),
                ))?
                .label(*label)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK.mix(0.3))
            .draw()?;
        Ok(())
    }
}

/// The report as a standalone SVG document.
pub(crate) fn svg(summary: &Summary, latency: &Histogram<u64>) -> Result<String, ReportError> {
    let seconds = summary.timeline.len().max(1) as f64;
    let over_time = |value: &dyn Fn(&crate::stats::TimelinePoint) -> f64| -> Points {
        summary
            .timeline
            .iter()
            .map(|p| (p.second as f64 + 0.5, value(p)))
            .collect()
    };
    let batch = summary.batch_size as f64;
    let charts = [
        Chart {
            title: "Events per second over time",
            x_label: "seconds",
            y_label: "events/s",
            x_max: seconds,
            series: vec![
                (
                    "events sent/s",
                    RGBColor(31, 119, 180),
                    over_time(&|p| p.events as f64),
                ),
                (
                    "errors (events)/s",
                    RGBColor(214, 39, 40),
                    over_time(&|p| p.errors as f64 * batch),
                ),
            ],
        },
        Chart {
            title: "Latency over time",
            x_label: "seconds",
            y_label: "ms",
            x_max: seconds,
            series: vec![
                ("p50", RGBColor(44, 160, 44), over_time(&|p| p.p50_ms)),
                ("p99", RGBColor(255, 127, 14), over_time(&|p| p.p99_ms)),
            ],
        },
        Chart {
            title: "Latency by percentile (x: log10 of 1/(1-q): 1 = 90 %, 2 = 99 %, 3 = 99.9 %)",
            x_label: "percentile position",
            y_label: "ms",
            x_max: position(0.99999),
            series: vec![(
                "latency",
                RGBColor(148, 103, 189),
                QUANTILES
                    .iter()
                    .map(|&q| (position(q), latency.value_at_quantile(q) as f64 / 1000.0))
                    .collect(),
            )],
        },
    ];
    let mut out = String::new();
    {
        let height = PANEL_HEIGHT * charts.len() as u32;
        let root = SVGBackend::with_string(&mut out, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE)?;
        for (chart, area) in charts.iter().zip(root.split_evenly((charts.len(), 1))) {
            chart.draw(&area)?;
        }
        root.present()?;
    }
    Ok(out)
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The report as an HTML page: the summary table above the plots.
pub(crate) fn html(summary: &Summary, latency: &Histogram<u64>) -> Result<String, ReportError> {
    Ok(format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>eventflow-loadgen report</title>\
         <style>body{{font-family:sans-serif;margin:2em}}pre{{background:#f6f6f6;padding:1em}}</style></head>\
         <body><h1>eventflow-loadgen</h1><pre>{}</pre>{}</body></html>\n",
        escape(&summary.table()),
        svg(summary, latency)?
    ))
}

/// Writes the report; the extension chooses the format.
pub(crate) fn write(
    path: &Path,
    summary: &Summary,
    latency: &Histogram<u64>,
) -> Result<(), ReportError> {
    let content = match path.extension().and_then(|e| e.to_str()) {
        Some("svg") => svg(summary, latency)?,
        _ => html(summary, latency)?,
    };
    std::fs::write(path, content).map_err(|error| ReportError(error.to_string()))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use clap::Parser;

    use super::*;
    use crate::args::Args;
    use crate::stats::{Outcome, Recorder};

    #[test]
    fn a_report_draws_three_charts_with_their_series() {
        let plan = Args::try_parse_from(["eventflow-loadgen", "-n", "3"])
            .unwrap()
            .plan("r")
            .unwrap();
        let start = Instant::now();
        let mut recorder = Recorder::new(start, false);
        for (i, status) in [202, 202, 503].into_iter().enumerate() {
            let due = start + Duration::from_millis(400 * i as u64);
            recorder.record(
                due,
                due + Duration::from_millis(2),
                1,
                Outcome::Answer {
                    status,
                    accepted: Vec::new(),
                },
            );
        }
        let summary = Summary::new(&plan, &recorder, Duration::from_millis(1200));
        let svg = svg(&summary, &recorder.latency).unwrap();
        assert!(svg.starts_with("<svg"), "{svg}");
        for text in [
            "Events per second over time",
            "Latency over time",
            "Latency by percentile",
            "events sent/s",
            "p99",
        ] {
            assert!(svg.contains(text), "{text} missing");
        }
        assert!(svg.matches("<polyline").count() >= 5, "one line per series");
        let page = html(&summary, &recorder.latency).unwrap();
        assert!(
            page.contains("<pre>mode"),
            "the summary table heads the page"
        );
    }
}
