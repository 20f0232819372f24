//! Building and running the service.
//!
//! [`App::build`] binds the listener (port 0 works, which is how tests get
//! a free port) and wires store, queue, sinks and workers;
//! [`App::run_until_stopped`] serves until the given shutdown future
//! resolves, then drains in this order:
//!
//! 1. readiness turns 503; for `server.shutdown_delay` the service still
//!    serves and accepts events, so that load balancers notice first;
//! 2. new ingest calls are refused, the listener stops accepting, idle
//!    connections close and in-flight requests finish;
//! 3. once no ingest call is in progress the queue is closed, and the
//!    workers publish everything left in it;
//! 4. sinks are flushed, SSE streams end, the server task completes.
//!
//! All of it within `server.shutdown_grace` of the signal; otherwise, or when a sink
//! failed to write accepted events during the run, an [`Unpublished`]
//! report says what was left.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::serve::{ConnectionLimits, serve};
use crate::api::{self, AnswerBudget, AppState, BodyBudget, RateLimit, SharedState};
use crate::auth::Tokens;
use crate::backend::{Backend, BackendFailure};
use crate::config::{BackendKind, Settings};
use crate::pipeline::{Pipeline, PipelineParts, WorkerPool};
use crate::queue::Backpressure;
use crate::shutdown::{Phase, Readiness, Unpublished};
use crate::sink::{Sink, build_sinks};
use crate::telemetry::TraceSampling;
use crate::telemetry::metrics::{Metrics, names};

/// SSE subscribers that render stored events again at once: one, so that a
/// storm of clients resuming from 0 keeps to one core.
const REPLAYS_AT_ONCE: usize = 1;
/// Most of the grace kept back, at its end, for a drain that runs out of
/// time: to flush what was published and finish stdout's line in progress
/// before exiting, all within `server.shutdown_grace`.
const FORCED_EXIT_RESERVE: Duration = Duration::from_secs(2);
/// How often histogram buffers are drained between scrapes.
/// (The exporter buffers histogram samples until then: a short interval
/// bounds that buffer at high event rates.)
const METRICS_UPKEEP: Duration = Duration::from_secs(1);

/// A built service: listener bound, workers started, not yet serving.
#[derive(Debug)]
pub struct App {
    listener: TcpListener,
    local_addr: SocketAddr,
    admin: Option<TcpListener>,
    state: AppState,
    /// The whole pipeline, for the drain (the API holds narrow handles).
    pipeline: Pipeline,
    workers: WorkerPool,
    shutdown_grace: Duration,
    /// Says why, should the backend fail for good after start-up.
    backend_failure: BackendFailure,
}

impl App {
    /// Builds the service from settings with the configured sinks.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let sinks = build_sinks(&settings.publish).await?;
        Self::build_with_sinks(settings, sinks).await
    }

    /// Builds the service with explicit sinks (tests use this to observe output).
    pub async fn build_with_sinks(
        settings: Settings,
        sinks: Vec<Arc<dyn Sink>>,
    ) -> anyhow::Result<Self> {
        let addr = settings.server.socket_addr()?;
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (server.addr)"))?;
        let local_addr = listener.local_addr()?;
        let admin = match &settings.server.admin_addr {
            Some(admin) => Some(
                TcpListener::bind(admin.as_str())
                    .await
                    .with_context(|| format!("cannot listen on {admin} (server.admin_addr)"))?,
            ),
            None => None,
        };
        let tokens = Tokens::from_settings(&settings.auth)?;
        // Before any wait on the network (a backend may take seconds to
        // answer): a SIGHUP meanwhile must not end the process.
        reload_tokens_on_hangup(tokens.clone());
        let sink_names: Vec<&'static str> = sinks.iter().map(|s| s.name()).collect();
        let metrics = Metrics::new(&sink_names);
        let backpressure = Backpressure::new(
            settings.pipeline.queue_capacity,
            settings.pipeline.queue_max_bytes,
        );
        // The one place the backend is chosen.
        tracing::info!(
            backend = settings.backend.kind.name(),
            "starting the backend"
        );
        let backend = match settings.backend.kind {
            BackendKind::Memory => Backend::memory(&settings),
            BackendKind::Nats => Backend::nats(&settings, &backpressure, &metrics).await?,
        };
        let auth_failures = metrics.counter(names::AUTH_FAILURES, &[]);
        let rate_limit =
            RateLimit::from_settings(&settings.server, metrics.counter(names::RATE_LIMITED, &[]));
        let backend_failure = backend.failure;
        let backend_subscriptions = backend.subscriptions;
        let parts = PipelineParts {
            store: backend.store,
            queue: backend.queue,
            feed: backend.feed,
            sinks,
            backpressure: Some(backpressure),
            chain: None,
            // A request waits at most half its timeout for the backend, so
            // that an outage is answered 503 in time, never 408.
            write_deadline: Some(settings.server.request_timeout / 2),
            metrics,
        };
        let pipeline = Pipeline::new(settings.pipeline.clone(), parts);
        let workers = pipeline.start_workers();
        let state = AppState::new(SharedState {
            reader: pipeline.reader(),
            writer: pipeline.writer(),
            subscriptions: backend_subscriptions,
            readiness: Readiness::default(),
            server: Arc::new(settings.server.clone()),
            stream_stop: CancellationToken::new(),
            sampling: TraceSampling::from_settings(&settings.telemetry),
            bodies: BodyBudget::new(settings.server.max_inflight_body_bytes)
                .with_stall_timeout(settings.server.request_timeout),
            answers: AnswerBudget::new(settings.server.max_inflight_answer_bytes),
            tokens,
            auth_failures,
            rate_limit,
            subscribers: Arc::new(tokio::sync::Semaphore::new(
                settings
                    .server
                    .max_subscribers
                    .min(tokio::sync::Semaphore::MAX_PERMITS),
            )),
            replays: Arc::new(tokio::sync::Semaphore::new(REPLAYS_AT_ONCE)),
        });
        Ok(Self {
            listener,
            local_addr,
            admin,
            state,
            pipeline,
            workers,
            shutdown_grace: settings.server.shutdown_grace,
            backend_failure,
        })
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The admin listener's address, when `server.admin_addr` is set.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
            .as_ref()
            .and_then(|admin| admin.local_addr().ok())
    }

    /// The shared state (the API's handles, budgets, readiness).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// The whole pipeline (what the drain closes and waits for).
    pub fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }

    /// Serves until `shutdown` resolves, then drains (see the module docs).
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), Unpublished> {
        let Self {
            listener,
            local_addr,
            admin,
            state,
            pipeline,
            workers,
            shutdown_grace,
            backend_failure,
        } = self;
        let limits = ConnectionLimits {
            max_connections: state.server.max_connections,
            per_client: state.server.max_connections_per_client,
            trusted: state.server.trusted_proxies.clone().into(),
            refused: state
                .writer
                .metrics()
                .counter(names::CONNECTIONS_REFUSED, &[]),
            idle_timeout: state.server.idle_timeout,
            peer_address: state.rate_limit.is_some(),
        };
        let shutdown_delay = state.server.shutdown_delay;
        let readiness = state.readiness.clone();
        let stream_stop = state.stream_stop.clone();
        let http_stop = CancellationToken::new();
        let kept = state.clone();
        let admin_addr = admin.as_ref().and_then(|admin| admin.local_addr().ok());
        let auth_on = state.tokens.enabled();
        let routers = api::routers(state);
        let admin_server = match (admin, routers.admin) {
            // Health and metrics keep answering through the drain.
            (Some(listener), Some(router)) => Some(tokio::spawn(serve(
                listener,
                router,
                limits.clone(),
                stream_stop.clone(),
            ))),
            _ => None,
        };
        let server = tokio::spawn(serve(listener, routers.api, limits, http_stop.clone()));
        spawn_upkeep(kept, http_stop.clone());
        readiness.set(Phase::Ready);
        tracing::info!(
            addr = %local_addr,
            admin_addr = admin_addr.map(|a| a.to_string()),
            auth = auth_on,
            workers = workers.len(),
            "eventflow listening"
        );

        let backend_failed = tokio::select! {
            () = shutdown => None,
            why = backend_failure.failed() => {
                tracing::error!(error = %why, "the backend failed: shutting down");
                Some(why)
            }
        };
        Drain {
            pipeline,
            readiness,
            workers,
            server,
            admin_server,
            http_stop,
            stream_stop,
            shutdown_delay,
            shutdown_grace,
            backend_failed,
        }
        .run()
        .await
    }
}

/// Runs the metrics' upkeep (and forgets idle rate-limit entries) until
/// `stop`.
fn spawn_upkeep(state: AppState, stop: CancellationToken) {
    let metrics = state.writer.metrics().clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(METRICS_UPKEEP);
        for tick in 1u64.. {
            tokio::select! {
                _ = every.tick() => metrics.run_upkeep(),
                () = stop.cancelled() => break,
            }
            if tick % 10 == 0
                && let Some(limit) = &state.rate_limit
            {
                limit.forget_idle();
            }
        }
    });
}

/// What the drain after a signal (or a backend failure) works with.
struct Drain {
    pipeline: Pipeline,
    readiness: Readiness,
    workers: WorkerPool,
    server: tokio::task::JoinHandle<()>,
    admin_server: Option<tokio::task::JoinHandle<()>>,
    http_stop: CancellationToken,
    stream_stop: CancellationToken,
    shutdown_delay: Duration,
    shutdown_grace: Duration,
    backend_failed: Option<String>,
}

impl Drain {
    /// Readiness 503 for the delay, then the listener closed, the pipeline
    /// drained within the grace, and the report of what it left.
    async fn run(self) -> Result<(), Unpublished> {
        let started = tokio::time::Instant::now();
        self.readiness.set(Phase::Draining);
        if !self.shutdown_delay.is_zero() {
            tracing::info!(delay = ?self.shutdown_delay, "shutting down: readiness is 503, still serving for the delay");
            tokio::time::sleep(self.shutdown_delay).await;
        }
        tracing::info!(grace = ?self.shutdown_grace, "shutting down: draining accepted events");
        self.pipeline.close_ingest();
        self.http_stop.cancel();
        // A grace too large to add is as good as none.
        let deadline = started
            .checked_add(self.shutdown_grace)
            .unwrap_or_else(|| started + Duration::from_secs(100 * 365 * 86_400));
        // A drain that runs out of time leaves this much of the grace to
        // flush and finish stdout's line: the exit stays within the grace.
        let reserve = (self.shutdown_grace / 4).min(FORCED_EXIT_RESERVE);
        let pipeline = &self.pipeline;
        let drain = async {
            pipeline.ingest_idle().await;
            pipeline.close_queue();
            self.workers.stopped().await;
            pipeline.flush_sinks().await;
        };
        match tokio::time::timeout_at(deadline - reserve, drain).await {
            Ok(()) => self.finished(started, deadline).await,
            Err(_) => self.ran_out_of_time(deadline, reserve).await,
        }
    }

    /// Every accepted event is published or failed; what is left is
    /// connections finishing their answers. One that stalls (a half-sent
    /// request, a client that stopped reading) is cut at the deadline
    /// rather than failing a complete drain.
    async fn finished(
        self,
        started: tokio::time::Instant,
        deadline: tokio::time::Instant,
    ) -> Result<(), Unpublished> {
        self.stream_stop.cancel();
        let mut server = self.server;
        if tokio::time::timeout_at(deadline, &mut server)
            .await
            .is_err()
        {
            server.abort();
            tracing::warn!("connections still open at the shutdown deadline were closed");
        }
        if let Some(admin) = self.admin_server {
            admin.abort();
        }
        let sink_failed = self.pipeline.sink_failures();
        if sink_failed > 0 || self.backend_failed.is_some() {
            return Err(Unpublished {
                grace: self.shutdown_grace,
                deadline_passed: false,
                queued: 0,
                in_flight: 0,
                sink_failed,
                backend_failed: self.backend_failed,
            });
        }
        // Rounded to milliseconds: "1s 234ms", not "1.234567891s".
        let took =
            Duration::from_millis(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX));
        tracing::info!(took = %humantime::format_duration(took), "shutdown complete: every accepted event was published");
        Ok(())
    }

    /// The drain ran out of time: report what is left, still make what was
    /// published visible, and end stdout on a whole line, within what is
    /// left of the grace.
    async fn ran_out_of_time(
        self,
        deadline: tokio::time::Instant,
        reserve: Duration,
    ) -> Result<(), Unpublished> {
        let pipeline = &self.pipeline;
        let report = Unpublished {
            grace: self.shutdown_grace,
            deadline_passed: true,
            queued: pipeline.queue_depth(),
            in_flight: pipeline.backpressure().in_use(),
            sink_failed: pipeline.sink_failures(),
            backend_failed: self.backend_failed,
        };
        tracing::error!(
            queued = report.queued,
            in_flight = report.in_flight,
            sink_failed = report.sink_failed,
            "shutdown deadline passed before the drain finished"
        );
        let flushed = tokio::time::Instant::now() + reserve / 2;
        let _ = tokio::time::timeout_at(flushed, pipeline.flush_sinks()).await;
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        tokio::task::spawn_blocking(move || crate::sink::finish_line(left))
            .await
            .ok();
        self.stream_stop.cancel();
        Err(report)
    }
}

/// Re-reads `auth.tokens_file` on each SIGHUP; a file that does not read
/// well keeps the tokens in force. (Caught even without a file, so that a
/// stray SIGHUP does not end the service.)
fn reload_tokens_on_hangup(tokens: Tokens) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(hangups) => hangups,
            Err(error) => {
                tracing::warn!(%error, "cannot catch SIGHUP: auth.tokens_file is read at start only");
                return;
            }
        };
        tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                if !tokens.has_file() {
                    tracing::info!("SIGHUP: no auth.tokens_file to re-read");
                    continue;
                }
                match tokens.reload() {
                    Ok(count) => tracing::info!(tokens = count, "SIGHUP: auth tokens re-read"),
                    Err(error) => {
                        tracing::error!(%error, "SIGHUP: auth tokens not re-read; the previous ones stay in force");
                    }
                }
            }
        });
    }
    #[cfg(not(unix))]
    let _ = tokens;
}
