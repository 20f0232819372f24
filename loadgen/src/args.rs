//! Command-line arguments and their validation into a [`Plan`].

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::consume::ConsumePlan;

/// Load generator for eventflow: closed- or open-loop HTTP load, HDR latency
/// percentiles, and a check that every accepted event was published.
#[derive(Debug, Clone, Parser)]
#[command(name = "eventflow-loadgen", version)]
pub(crate) struct Args {
    /// Base URL of the service.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub(crate) url: String,
    /// `closed`: each connection sends as fast as answers come back;
    /// `open`: requests are scheduled at --rate and latency is measured from
    /// the scheduled time, so stalls cannot hide (no coordinated omission).
    #[arg(long, value_enum, default_value_t = Mode::Closed)]
    pub(crate) mode: Mode,
    /// HTTP/1.1 keep-alive connections.
    #[arg(long, short = 'c', default_value_t = 32)]
    pub(crate) connections: usize,
    /// Requests per second (open loop only).
    #[arg(long)]
    pub(crate) rate: Option<f64>,
    /// How the open loop keeps its schedule: `precise` (each request leaves
    /// at its instant, and the generator's core never sleeps), or `tick`
    /// (every millisecond, the requests that have come due leave together:
    /// latencies include up to a millisecond of the generator's timer, and
    /// it leaves the rest of its core to whatever shares it).
    #[arg(long, value_enum, default_value_t = Pacing::Precise)]
    pub(crate) pacing: Pacing,
    /// How long to run, e.g. `30s` (default 10s unless --requests is given).
    #[arg(long, short = 'd', value_parser = humantime::parse_duration)]
    pub(crate) duration: Option<Duration>,
    /// Total requests to send (instead of, or as well as, --duration).
    #[arg(long, short = 'n')]
    pub(crate) requests: Option<u64>,
    /// Load the service this long before --duration starts, unmeasured (a
    /// fresh server's first second is its start-up, not its steady state).
    /// Warm-up requests still count for --verify.
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "requests")]
    pub(crate) warmup: Option<Duration>,
    /// Events per request: 1 posts to /events, more posts to /events/batch.
    #[arg(long, short = 'b', default_value_t = 1)]
    pub(crate) batch_size: usize,
    /// Batch body format.
    #[arg(long, value_enum, default_value_t = BatchFormat::Json)]
    pub(crate) format: BatchFormat,
    /// Gzip request bodies (batches).
    #[arg(long)]
    pub(crate) gzip: bool,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 100)]
    pub(crate) payload_bytes: usize,
    /// Event id pattern: `{run}` becomes a random run id, and the event number
    /// goes where the default has `n` in braces.
    #[arg(long, default_value = "lg-{run}-{n}")]
    pub(crate) id_pattern: String,
    /// Per-request timeout.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub(crate) timeout: Duration,
    /// Print the summary as JSON on stdout instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
    /// Write a report with latency-over-time and percentile plots (.html or .svg).
    #[arg(long, value_name = "FILE")]
    pub(crate) report: Option<PathBuf>,
    /// After the run, confirm every accepted id was published, none twice,
    /// with no sink failing (watches /events/stream during the run, then
    /// checks /events/{id} and the service's publish errors); exit 3 if not.
    #[arg(long)]
    pub(crate) verify: bool,
    /// How long --verify waits for publications after the run.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, requires = "verify")]
    pub(crate) verify_timeout: Duration,
    /// Sample this Prometheus endpoint during the run (queue depth, RSS, CPU);
    /// `auto` means URL/metrics.
    #[arg(long, value_name = "URL")]
    pub(crate) metrics_url: Option<String>,
    /// No progress bar.
    #[arg(long)]
    pub(crate) no_progress: bool,
    /// Consumers polling one named subscription during the run (0: none):
    /// it is created before the load (`start: latest`), every lease is
    /// acknowledged, and the report says how fast; with --verify, that
    /// every accepted event was acknowledged exactly once.
    #[arg(long, default_value_t = 0)]
    pub(crate) consumers: usize,
    /// The subscription's name (default `lg-{run}`; deleted after the run
    /// if the run made it; one that exists is consumed as it is).
    #[arg(long, requires = "consumers")]
    pub(crate) subscription: Option<String>,
    /// Events one poll leases (1..=1000).
    #[arg(long, default_value_t = 100)]
    pub(crate) poll_max: usize,
    /// How long a poll waits for its first event (at most 10s).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub(crate) poll_wait: Duration,
    /// The subscription's ack_timeout (when the run makes it).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub(crate) ack_timeout: Duration,
    /// After this long, one consumer dies holding its last leases
    /// (never acknowledged): they come back to the others after
    /// --ack-timeout.
    #[arg(long, value_parser = humantime::parse_duration, requires = "consumers")]
    pub(crate) kill_consumer_after: Option<Duration>,
}

/// How requests are paced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Mode {
    /// As fast as possible on N connections.
    Closed,
    /// At a fixed rate, whatever the answers (see --pacing).
    Open,
}

/// How the open loop keeps its schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Pacing {
    /// Each request at its own instant, to well under a millisecond.
    Precise,
    /// The requests due, together, on each tick of a 1 ms timer.
    Tick,
}

/// How batches are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum BatchFormat {
    /// A JSON array.
    Json,
    /// One event per line.
    Ndjson,
}

/// A validated run plan.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) mode: Mode,
    pub(crate) connections: usize,
    pub(crate) rate: Option<f64>,
    pub(crate) pacing: Pacing,
    pub(crate) duration: Option<Duration>,
    pub(crate) requests: Option<u64>,
    /// Unmeasured load before the measured run.
    pub(crate) warmup: Duration,
    pub(crate) batch_size: usize,
    pub(crate) format: BatchFormat,
    pub(crate) gzip: bool,
    pub(crate) payload_bytes: usize,
    pub(crate) id_prefix: String,
    pub(crate) id_suffix: String,
    pub(crate) timeout: Duration,
    pub(crate) metrics_url: Option<String>,
    /// Consumers of a named subscription during the run, if any.
    pub(crate) consume: Option<ConsumePlan>,
}

/// Default run length when neither --duration nor --requests is given.
const DEFAULT_DURATION: Duration = Duration::from_secs(10);
/// The service's default `pipeline.max_batch`.
const MAX_BATCH: usize = 10_000;

/// Open-loop rates accepted: one request every 1,000 s at the least (a
/// schedule's interval must be a representable duration), and one every
/// 10 ns at the most.
const MIN_RATE: f64 = 0.001;
const MAX_RATE: f64 = 100_000_000.0;

impl Args {
    /// Checks the arguments and resolves them into a plan.
    pub(crate) fn plan(&self, run_id: &str) -> Result<Plan, String> {
        let uri: http::Uri = self
            .url
            .parse()
            .map_err(|e| format!("--url `{}` is not a URL: {e}", self.url))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!("--url `{}` must start with http://", self.url));
        }
        let host = uri
            .host()
            .ok_or_else(|| format!("--url `{}` has no host", self.url))?
            .trim_matches(|c| c == '[' || c == ']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(80);
        // The routes are the service's own: a path here would be ignored.
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(format!(
                "--url `{}` must be the service's root (http://host:port), without a path",
                self.url
            ));
        }
        if self.connections == 0 {
            return Err("--connections must be at least 1".into());
        }
        let rate = match (self.mode, self.rate) {
            (Mode::Open, None) => return Err("--mode open needs --rate".into()),
            (Mode::Open, Some(r)) if !(MIN_RATE..=MAX_RATE).contains(&r) => {
                return Err(format!(
                    "--rate must be between {MIN_RATE} and {MAX_RATE} requests/s, got {r}"
                ));
            }
            (Mode::Closed, Some(_)) => return Err("--rate only applies to --mode open".into()),
            (_, rate) => rate,
        };
        if self.requests == Some(0) {
            return Err("--requests must be at least 1".into());
        }
        if self.duration.is_some_and(|d| d.is_zero()) {
            return Err("--duration must be positive".into());
        }
        let duration = match (self.duration, self.requests) {
            (None, None) => Some(DEFAULT_DURATION),
            (duration, _) => duration,
        };
        if !(1..=MAX_BATCH).contains(&self.batch_size) {
            return Err(format!("--batch-size must be 1..={MAX_BATCH}"));
        }
        if self.gzip && self.batch_size == 1 {
            return Err("--gzip applies to batches (--batch-size > 1)".into());
        }
        if self.format != BatchFormat::Json && self.batch_size == 1 {
            return Err("--format applies to batches (--batch-size > 1)".into());
        }
        if let Some(report) = &self.report
            && !matches!(
                report.extension().and_then(|e| e.to_str()),
                Some("html" | "htm" | "svg")
            )
        {
            return Err(format!(
                "--report `{}` must end in .html or .svg",
                report.display()
            ));
        }
        let pattern = self.id_pattern.replace("{run}", run_id);
        let (id_prefix, id_suffix) = match pattern.split_once("{n}") {
            Some((prefix, suffix)) if !suffix.contains("{n}") => {
                (prefix.to_owned(), suffix.to_owned())
            }
            _ => return Err("--id-pattern must contain `{n}` exactly once".into()),
        };
        let metrics_url = self.metrics_url.as_ref().map(|m| {
            if m == "auto" {
                format!("{}/metrics", self.url.trim_end_matches('/'))
            } else {
                m.clone()
            }
        });
        let consume = self.consume_plan(run_id)?;
        Ok(Plan {
            host,
            port,
            mode: self.mode,
            connections: self.connections,
            rate,
            pacing: self.pacing,
            duration,
            requests: self.requests,
            warmup: self.warmup.unwrap_or_default(),
            batch_size: self.batch_size,
            format: self.format,
            gzip: self.gzip,
            payload_bytes: self.payload_bytes,
            id_prefix,
            id_suffix,
            timeout: self.timeout,
            metrics_url,
            consume,
        })
    }

    /// The consumers' plan, when `--consumers` is set.
    fn consume_plan(&self, run_id: &str) -> Result<Option<ConsumePlan>, String> {
        if self.consumers == 0 {
            return Ok(None);
        }
        if !(1..=1000).contains(&self.poll_max) {
            return Err("--poll-max must be 1..=1000".into());
        }
        if self.poll_wait > Duration::from_secs(10) {
            return Err("--poll-wait must be at most 10s (the service's request timeout)".into());
        }
        if !(Duration::from_millis(100)..=Duration::from_secs(24 * 3600))
            .contains(&self.ack_timeout)
        {
            return Err("--ack-timeout must be from 100ms to 24h".into());
        }
        if self.kill_consumer_after.is_some() && self.consumers < 2 {
            return Err("--kill-consumer-after needs --consumers 2 or more".into());
        }
        let subscription = self
            .subscription
            .clone()
            .unwrap_or_else(|| format!("lg-{run_id}"));
        let valid = (1..=64).contains(&subscription.len())
            && subscription
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !valid {
            return Err(format!(
                "--subscription `{subscription}` must be 1 to 64 of A-Z, a-z, 0-9, `_` and `-`"
            ));
        }
        Ok(Some(ConsumePlan {
            consumers: self.consumers,
            subscription,
            subscription_named: self.subscription.is_some(),
            poll_max: self.poll_max,
            poll_wait: self.poll_wait,
            ack_timeout: self.ack_timeout,
            kill_after: self.kill_consumer_after,
        }))
    }
}

impl Plan {
    /// `host:port` for URLs and `Host` headers (an IPv6 address in brackets).
    pub(crate) fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The id of event number `n`.
    pub(crate) fn id(&self, n: u64) -> String {
        format!("{}{n}{}", self.id_prefix, self.id_suffix)
    }

    /// The event number of an id this run generated.
    pub(crate) fn number(&self, id: &str) -> Option<u64> {
        id.strip_prefix(&self.id_prefix)?
            .strip_suffix(&self.id_suffix)?
            .parse()
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Plan, String> {
        let mut argv = vec!["eventflow-loadgen"];
        argv.extend_from_slice(args);
        Args::try_parse_from(argv)
            .map_err(|e| e.to_string())?
            .plan("r1")
    }

    #[test]
    fn warmup_is_unmeasured_time_before_a_duration() {
        assert_eq!(parse(&[]).unwrap().warmup, Duration::ZERO);
        let plan = parse(&["--warmup", "2s", "-d", "5s"]).unwrap();
        assert_eq!(
            (plan.warmup, plan.duration),
            (Duration::from_secs(2), Some(Duration::from_secs(5)))
        );
        // A count of requests has no measured window to put a warm-up before.
        let refused = parse(&["--warmup", "2s", "-n", "100"]).unwrap_err();
        assert!(refused.contains("--warmup"), "{refused}");
    }

    #[test]
    fn help_names_the_id_placeholders_on_one_line() {
        use clap::CommandFactory;
        let help = Args::command().render_long_help().to_string();
        let line = help
            .lines()
            .find(|line| line.contains("Event id pattern"))
            .unwrap_or_default();
        assert!(line.contains("`{run}` becomes a random run id"), "{help}");
        assert!(line.contains("the event number"), "{help}");
    }

    #[test]
    fn defaults_are_a_ten_second_closed_loop() {
        let plan = parse(&[]).unwrap();
        assert_eq!(plan.mode, Mode::Closed);
        assert_eq!(plan.connections, 32);
        assert_eq!(plan.duration, Some(Duration::from_secs(10)));
        assert_eq!((plan.host.as_str(), plan.port), ("127.0.0.1", 8080));
        assert_eq!(plan.batch_size, 1);
        assert_eq!(plan.id(7), "lg-r1-7");
        assert_eq!(plan.number("lg-r1-7"), Some(7));
        assert_eq!(plan.number("other-7"), None);
    }

    #[test]
    fn open_loop_needs_a_rate_and_closed_refuses_one() {
        assert!(parse(&["--mode", "open"]).unwrap_err().contains("--rate"));
        assert!(
            parse(&["--rate", "100"])
                .unwrap_err()
                .contains("--mode open")
        );
        assert!(parse(&["--mode", "open", "--rate", "0"]).is_err());
        let plan = parse(&["--mode", "open", "--rate", "5000", "-d", "2s"]).unwrap();
        assert_eq!(plan.rate, Some(5000.0));
        assert_eq!(plan.duration, Some(Duration::from_secs(2)));
    }

    #[test]
    fn count_or_duration() {
        let plan = parse(&["-n", "1000"]).unwrap();
        assert_eq!((plan.requests, plan.duration), (Some(1000), None));
        assert!(parse(&["-n", "0"]).is_err());
        assert!(parse(&["-d", "0s"]).is_err());
        assert!(parse(&["-d", "soon"]).is_err());
    }

    #[test]
    fn batches_formats_and_gzip() {
        let plan = parse(&["-b", "1000", "--format", "ndjson", "--gzip"]).unwrap();
        assert_eq!(
            (plan.batch_size, plan.format, plan.gzip),
            (1000, BatchFormat::Ndjson, true)
        );
        assert!(parse(&["--gzip"]).unwrap_err().contains("batch"));
        assert!(parse(&["-b", "0"]).is_err());
        assert!(parse(&["-b", "10001"]).is_err());
        assert!(parse(&["--format", "xml"]).is_err());
        assert!(
            parse(&["--format", "ndjson"])
                .unwrap_err()
                .contains("batch")
        );
        assert!(
            parse(&["--report", "run.png"])
                .unwrap_err()
                .contains(".svg")
        );
        assert!(parse(&["--report", "run.svg"]).is_ok());
        assert!(parse(&["--verify-timeout", "5s"]).is_err());
        assert!(parse(&["--verify", "--verify-timeout", "5s"]).is_ok());
        assert!(
            parse(&["--url", "http://x:1/api"])
                .unwrap_err()
                .contains("root")
        );
        assert!(parse(&["--url", "http://x:1/"]).is_ok());
    }

    #[test]
    fn urls_patterns_and_metrics() {
        assert!(parse(&["--url", "https://x:1"]).is_err());
        assert!(parse(&["--url", "not a url"]).is_err());
        let plan = parse(&["--url", "http://[::1]:9000/", "--metrics-url", "auto"]).unwrap();
        assert_eq!((plan.host.as_str(), plan.port), ("::1", 9000));
        assert_eq!(
            plan.metrics_url.as_deref(),
            Some("http://[::1]:9000/metrics")
        );
        let plan = parse(&["--id-pattern", "a-{n}-{run}"]).unwrap();
        assert_eq!(plan.id(3), "a-3-r1");
        assert_eq!(plan.number("a-3-r1"), Some(3));
        assert!(parse(&["--id-pattern", "fixed"]).is_err());
        assert!(parse(&["--id-pattern", "{n}{n}"]).is_err());
        assert!(parse(&["-c", "0"]).is_err());
    }

    #[test]
    fn open_loop_rates_are_bounded() {
        for rate in ["0", "1e-300", "nan", "inf", "1e12"] {
            let err = parse(&["--mode", "open", "--rate", rate]).unwrap_err();
            assert!(err.contains("--rate must be between"), "{rate}: {err}");
        }
        assert!(parse(&["--mode", "open", "--rate", "0.5"]).is_ok());
    }
}
