//! The `eventflow` binary: parse flags, load settings, start telemetry, run
//! until SIGINT/SIGTERM. Everything else lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use eventflow::app::App;
use eventflow::config::Settings;
use eventflow::{healthcheck, shutdown, telemetry};

/// Event ingest and processing service.
///
/// Configuration: built-in defaults < TOML file (--config) < environment
/// variables EVENTFLOW__SECTION__KEY (e.g. EVENTFLOW__SERVER__ADDR=0.0.0.0:9000).
#[derive(Debug, Parser)]
#[command(name = "eventflow", version, about, long_about)]
struct Cli {
    /// TOML configuration file.
    #[arg(
        long,
        short = 'c',
        env = "EVENTFLOW_CONFIG",
        value_name = "PATH",
        global = true
    )]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve (the default).
    Serve,
    /// Exit 0 if the service on the configured port answers /healthz (for container health checks).
    Healthcheck,
}

/// Many small, short-lived allocations per request and per event: mimalloc
/// serves them faster than glibc's allocator and returns memory better.
/// (Built without transparent huge pages: see `Cargo.toml`.)
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code when accepted events were not published (the drain deadline
/// passed, or a sink failed), or the service fails to start.
const EXIT_FAILURE: u8 = 1;
/// Exit code for invalid configuration.
const EXIT_CONFIG: u8 = 2;
/// Exit code when a second signal forces exit.
const EXIT_FORCED: i32 = 130;
/// How long a forced exit waits for stdout to finish the line it is
/// writing (its reader may be slow).
const FINISH_LINE: std::time::Duration = std::time::Duration::from_secs(2);

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(settings) => settings,
        Err(error) => {
            // Logging is not set up yet (its settings may be what is wrong).
            eprintln!("eventflow: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Some(Command::Healthcheck) = cli.command {
        return match healthcheck::check(&settings.server) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("eventflow healthcheck: {error}");
                ExitCode::from(EXIT_FAILURE)
            }
        };
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("eventflow: cannot start the async runtime: {error}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    runtime.block_on(run(settings))
}

async fn run(settings: Settings) -> ExitCode {
    let telemetry = match telemetry::init_subscriber(&settings.telemetry) {
        Ok(guard) => guard,
        Err(error) => {
            eprintln!("eventflow: cannot initialise telemetry: {error:#}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // Before the service listens: a signal from then on drains it.
    let mut signals = match shutdown::Signals::install() {
        Ok(signals) => signals,
        Err(error) => {
            tracing::error!(%error, "cannot install the SIGINT/SIGTERM handlers");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let app = match App::build(settings).await {
        Ok(app) => app,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "cannot start");
            // Tokens that do not load are configuration, like any other key.
            let configuration = error.downcast_ref::<eventflow::auth::AuthError>().is_some()
                || error
                    .downcast_ref::<eventflow::config::ConfigError>()
                    .is_some();
            return ExitCode::from(if configuration {
                EXIT_CONFIG
            } else {
                EXIT_FAILURE
            });
        }
    };
    let stop = async move {
        let name = signals.next().await;
        tracing::info!(signal = name, "signal received");
        tokio::spawn(async move {
            let name = signals.next().await;
            tracing::error!(
                signal = name,
                "second signal: exiting without finishing the drain"
            );
            eventflow::sink::finish_line(FINISH_LINE);
            std::process::exit(EXIT_FORCED);
        });
    };
    let outcome = app.run_until_stopped(stop).await;
    if let Err(report) = &outcome
        && !report.deadline_passed
    {
        // A sink failure (a missed deadline finished its line itself,
        // within the grace).
        eventflow::sink::finish_line(FINISH_LINE);
    }
    telemetry.shutdown().await;
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(report) => {
            tracing::error!(%report, "exiting with accepted events that were not published");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
