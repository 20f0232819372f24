//! `--metrics-url`: samples the service's Prometheus endpoint during the
//! run for queue depth, resident memory and CPU time.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Uri, header};
use http_body_util::{BodyExt, Empty};
use serde::Serialize;
use tokio::sync::watch;

/// How often the endpoint is sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(500);

/// What the samples showed.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub(crate) struct ServiceStats {
    /// Largest `eventflow_queue_depth` seen.
    pub(crate) queue_depth_max: u64,
    /// Largest `eventflow_inflight_events` seen.
    pub(crate) inflight_max: u64,
    /// Largest `process_resident_memory_bytes` seen.
    pub(crate) rss_max_bytes: u64,
    /// `process_cpu_seconds_total` used between the first and last sample.
    pub(crate) cpu_seconds: f64,
    /// Samples taken.
    pub(crate) samples: u64,
    /// RSS over time, one value per sample (MiB).
    pub(crate) rss_mib: Vec<f64>,
}

/// The samples of a Prometheus text exposition (unparsable lines are
/// skipped by the parser).
pub(crate) fn parse(text: &str) -> Vec<prometheus_parse::Sample> {
    prometheus_parse::Scrape::parse(text.lines().map(|line| Ok(line.to_owned())))
        .map(|scrape| scrape.samples)
        .unwrap_or_default()
}

/// A sample's value, when it is a single number.
fn number(sample: &prometheus_parse::Sample) -> Option<f64> {
    match sample.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => Some(v),
        _ => None,
    }
}

/// The value of the unlabelled series `name`.
pub(crate) fn series(samples: &[prometheus_parse::Sample], name: &str) -> Option<f64> {
    samples
        .iter()
        .find(|s| s.metric == name && s.labels.is_empty())
        .and_then(number)
}

impl ServiceStats {
    fn add(&mut self, text: &str, first_cpu: &mut Option<f64>) {
        let text = &parse(text);
        self.samples += 1;
        if let Some(depth) = series(text, "eventflow_queue_depth") {
            self.queue_depth_max = self.queue_depth_max.max(depth as u64);
        }
        if let Some(inflight) = series(text, "eventflow_inflight_events") {
            self.inflight_max = self.inflight_max.max(inflight as u64);
        }
        if let Some(rss) = series(text, "process_resident_memory_bytes") {
            self.rss_max_bytes = self.rss_max_bytes.max(rss as u64);
            self.rss_mib.push(rss / 1_048_576.0);
        }
        if let Some(cpu) = series(text, "process_cpu_seconds_total") {
            let first = *first_cpu.get_or_insert(cpu);
            self.cpu_seconds = cpu - first;
        }
    }
}

/// The sum of every series of `name`, labelled or not.
pub(crate) fn series_sum(samples: &[prometheus_parse::Sample], name: &str) -> Option<f64> {
    let values: Vec<f64> = samples
        .iter()
        .filter(|s| s.metric == name)
        .filter_map(number)
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// How long one scrape may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(2);

/// The endpoint's text, if it answered 200 within [`FETCH_TIMEOUT`].
pub(crate) async fn fetch(uri: &Uri) -> Option<String> {
    tokio::time::timeout(FETCH_TIMEOUT, fetch_unbounded(uri))
        .await
        .ok()
        .flatten()
}

async fn fetch_unbounded(uri: &Uri) -> Option<String> {
    let host = uri
        .host()?
        .trim_matches(|c| c == '[' || c == ']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let mut sender = crate::http::connect(&host, port).await.ok()?;
    let path = uri.path_and_query().map_or("/metrics", |p| p.as_str());
    let authority = uri
        .authority()
        .map_or_else(|| format!("{host}:{port}"), |a| a.to_string());
    let request = Request::get(path)
        .header(header::HOST, authority)
        .body(Empty::<Bytes>::new())
        .ok()?;
    let response = sender.send_request(request).await.ok()?;
    // A wrong path's 404 page is not a sample of zeros.
    if response.status() != 200 {
        return None;
    }
    let body = response.into_body().collect().await.ok()?.to_bytes();
    String::from_utf8(body.to_vec()).ok()
}

/// Samples from `warmup` on (the warm-up is not the run's) until `stop`
/// turns true; then one last sample.
pub(crate) async fn sample(
    url: String,
    warmup: Duration,
    mut stop: watch::Receiver<bool>,
) -> Result<ServiceStats, String> {
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("--metrics-url `{url}`: {e}"))?;
    tokio::select! {
        () = tokio::time::sleep(warmup) => {}
        _ = stop.changed() => {}
    }
    let mut stats = ServiceStats::default();
    let mut first_cpu = None;
    let mut every = tokio::time::interval(SAMPLE_EVERY);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stop.changed() => {}
        }
        if let Some(text) = fetch(&uri).await {
            stats.add(&text, &mut first_cpu);
        }
        if *stop.borrow() {
            break;
        }
    }
    if stats.samples == 0 {
        return Err(format!("no sample could be read from {url}"));
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_series_and_keeps_maxima() {
        let a = "# TYPE eventflow_queue_depth gauge\neventflow_queue_depth 12\nprocess_resident_memory_bytes 1048576\nprocess_cpu_seconds_total 1.5\neventflow_queue_depth_other 99\n";
        let b = "eventflow_queue_depth 3\nprocess_resident_memory_bytes 3145728\nprocess_cpu_seconds_total 4.0\n";
        assert_eq!(series(&parse(a), "eventflow_queue_depth"), Some(12.0));
        assert_eq!(series(&parse(a), "missing"), None);
        let mut stats = ServiceStats::default();
        let mut first = None;
        stats.add(a, &mut first);
        stats.add(b, &mut first);
        assert_eq!(stats.queue_depth_max, 12);
        assert_eq!(stats.rss_max_bytes, 3_145_728);
        assert!((stats.cpu_seconds - 2.5).abs() < 1e-9);
        assert_eq!(stats.samples, 2);
    }

    #[test]
    fn sums_labelled_series() {
        let text = "# HELP eventflow_publish_errors_total x\neventflow_publish_errors_total{sink=\"stdout\"} 2\neventflow_publish_errors_total{sink=\"log\"} 3\neventflow_publish_errors_totally 7\n";
        assert_eq!(
            series_sum(&parse(text), "eventflow_publish_errors_total"),
            Some(5.0)
        );
        assert_eq!(
            series_sum(&parse("x 1\n"), "eventflow_publish_errors_total"),
            None
        );
        assert_eq!(series_sum(&parse("y 4\n"), "y"), Some(4.0));
    }
}
