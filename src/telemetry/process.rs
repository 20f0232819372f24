//! The standard process metrics (CPU, memory, file descriptors, start
//! time), appended to each scrape as the catalogue describes them.

use std::fmt::Write as _;

use super::catalogue::{find, names};

/// Appends the standard process metrics (CPU as a float counter, which the
/// `metrics` crate's integer counters cannot express).
pub(super) fn render_process(text: &mut String) {
    let process = metrics_process::collector::collect();
    let samples = [
        (names::PROCESS_CPU, process.cpu_seconds_total),
        (
            names::PROCESS_RSS,
            process.resident_memory_bytes.map(|v| v as f64),
        ),
        (names::PROCESS_OPEN_FDS, process.open_fds.map(|v| v as f64)),
        (names::PROCESS_MAX_FDS, process.max_fds.map(|v| v as f64)),
        (
            names::PROCESS_START,
            process.start_time_seconds.map(|v| v as f64),
        ),
    ];
    for (name, value) in samples {
        let (Some(value), Some(metric)) = (value, find(name)) else {
            continue;
        };
        let _ = write!(
            text,
            "# HELP {name} {}\n# TYPE {name} {}\n{name} {value}\n",
            metric.help,
            metric.kind.as_str()
        );
    }
}
