//! `eventflow-loadgen`: drives load at an eventflow service and reports
//! throughput, HDR latency percentiles, and (with `--verify`) whether every
//! accepted event was published exactly once.
//!
//! Exit codes: 0 the run succeeded (and verified, with `--verify`); 1 no
//! request succeeded; 2 invalid arguments; 3 `--verify` found an event
//! lost, failed or published twice, or a sink failing.
//!
//! Layout: `args` (flags → plan), `consume` (consumers of a named
//! subscription), `workload` (request bodies), `http`
//! (opening a connection), `pacer` (open-loop timing), `driver` (the
//! connections, closed and open loop), `stats` (recorders and summary),
//! `verify` (stream subscriber and reconciliation), `sampler` (the
//! service's /metrics during the run), `report` (SVG/HTML plots).

mod args;
mod consume;
mod driver;
mod http;
mod pacer;
mod report;
mod sampler;
mod stats;
mod verify;
mod workload;

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::Parser;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::args::Args;
use crate::stats::Summary;

/// Exit code when no request got a 2xx answer.
const EXIT_NOTHING_SUCCEEDED: u8 = 1;
/// Exit code for invalid arguments.
const EXIT_USAGE: u8 = 2;
/// Exit code when `--verify` found an event lost, failed or published
/// twice, or a sink failing.
const EXIT_NOT_VERIFIED: u8 = 3;

fn main() -> ExitCode {
    let args = Args::parse();
    let run_id = format!("{:08x}", rand::random::<u32>());
    let plan = match args.plan(&run_id) {
        Ok(plan) => plan,
        Err(error) => {
            eprintln!("eventflow-loadgen: {error}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("eventflow-loadgen: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(args, plan))
}

async fn run(args: Args, plan: args::Plan) -> ExitCode {
    let live = Arc::new(driver::Live::default());
    let subscriber = if args.verify {
        match verify::subscribe(&plan, Arc::clone(&live)).await {
            Ok(subscriber) => Some(subscriber),
            Err(error) => {
                eprintln!("eventflow-loadgen: --verify cannot subscribe: {error}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let consumers = match &plan.consume {
        Some(consume) => match consume::start(&plan, consume, Arc::clone(&live)).await {
            Ok(consumers) => Some(consumers),
            Err(error) => {
                eprintln!("eventflow-loadgen: --consumers cannot start: {error}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let (stop_sampler, stopped) = tokio::sync::watch::channel(false);
    let sampler = plan
        .metrics_url
        .clone()
        .map(|url| tokio::spawn(sampler::sample(url, plan.warmup, stopped)));

    let progress = progress_bar(&args, &plan);
    let ticker = {
        let (live, progress) = (Arc::clone(&live), progress.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(200));
            let started = tokio::time::Instant::now();
            loop {
                every.tick().await;
                let requests = live.requests.load(Ordering::Relaxed);
                let secs = started.elapsed().as_secs_f64().max(1e-3);
                progress.set_position(requests);
                progress.set_message(format!(
                    "{:.0} req/s  {:.0} events/s  {} errors",
                    requests as f64 / secs,
                    live.events.load(Ordering::Relaxed) as f64 / secs,
                    live.errors.load(Ordering::Relaxed)
                ));
            }
        })
    };

    let (recorder, elapsed) = driver::run(&plan, args.verify, Arc::clone(&live)).await;
    ticker.abort();
    progress.finish_and_clear();
    let _ = stop_sampler.send(true);

    let mut summary = Summary::new(&plan, &recorder, elapsed);
    if let Some(sampler) = sampler {
        match sampler.await {
            Ok(Ok(stats)) => summary.service = Some(stats),
            Ok(Err(error)) => eprintln!("eventflow-loadgen: {error}"),
            Err(error) => eprintln!("eventflow-loadgen: sampler failed: {error}"),
        }
    }
    if let Some(consumers) = consumers {
        let accepted = args.verify.then_some(&recorder.accepted[..]);
        summary.consume =
            Some(consume::finish(consumers, &plan, accepted, args.verify_timeout).await);
    }
    if let Some(subscriber) = subscriber {
        summary.verify =
            Some(verify::finish(subscriber, &plan, &recorder.accepted, args.verify_timeout).await);
    }
    if let Some(path) = &args.report
        && let Err(error) = report::write(path, &summary, &recorder.latency)
    {
        eprintln!(
            "eventflow-loadgen: cannot write {}: {error}",
            path.display()
        );
    }
    // Stdout is this tool's output: the summary, as a table or as JSON.
    let mut stdout = std::io::stdout().lock();
    if args.json {
        match serde_json::to_string_pretty(&summary) {
            Ok(json) => {
                let _ = writeln!(stdout, "{json}");
            }
            Err(error) => eprintln!("eventflow-loadgen: {error}"),
        }
    } else {
        let _ = write!(stdout, "{}", summary.table());
    }
    if let Some(v) = &summary.verify
        && v.publish_errors.is_none()
    {
        eprintln!(
            "eventflow-loadgen: --verify could not read the service's /metrics: publish errors unchecked, so not verified"
        );
    }
    // A run in which nothing succeeded (no service there, say) measured
    // nothing: its percentiles are of failures.
    let succeeded: u64 = summary
        .status
        .iter()
        .filter(|(status, _)| status.starts_with('2'))
        .map(|(_, count)| count)
        .sum();
    if succeeded == 0 {
        eprintln!(
            "eventflow-loadgen: no request succeeded ({} timeouts, {} transport errors, {} never sent)",
            summary.timeouts, summary.transport_errors, summary.unsent
        );
        return ExitCode::from(EXIT_NOTHING_SUCCEEDED);
    }
    // With an unreadable answer the accepted set is unknown: not verified.
    let verified = summary.verify.as_ref().is_none_or(|v| {
        v.lost == 0
            && v.failed == 0
            && v.duplicated == 0
            && v.publish_errors == Some(0)
            && summary.unreadable_answers == 0
    }) && (!args.verify
        || summary
            .consume
            .as_ref()
            .is_none_or(consume::ConsumeReport::verified));
    if verified {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_NOT_VERIFIED)
    }
}

fn progress_bar(args: &Args, plan: &args::Plan) -> ProgressBar {
    let visible = !args.no_progress && std::io::stderr().is_terminal();
    let bar = match plan.requests {
        Some(total) => ProgressBar::new(total),
        None => ProgressBar::no_length(),
    };
    if !visible {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    let template = if plan.requests.is_some() {
        "{elapsed_precise} [{bar:30}] {pos}/{len} requests  {msg}"
    } else {
        "{elapsed_precise} {spinner} {pos} requests  {msg}"
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}
