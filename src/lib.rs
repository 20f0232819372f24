//! eventflow: an observability-first event ingest and processing service.
//!
//! Clients POST events over HTTP; eventflow validates and stores them, a
//! pool of workers transforms each one and publishes the result to stdout,
//! logs, NATS and a live Server-Sent-Events stream, and on SIGINT/SIGTERM it
//! drains every accepted event before it exits. An event is published once
//! every sink has written it; each published event gets a gap-free
//! publication sequence, which the SSE stream's ids are.
//!
//! An event's path: [`api`] → [`pipeline::admission`] (a permit, the
//! [`store`], the queue) → the workers ([`pipeline`]: transforms, then every
//! [`sink`] writes it) → the store records the outcome → the [`feed`] gives
//! it its publication sequence → SSE subscribers and `?wait=published`.
//!
//! # Layout
//!
//! - [`config`]: typed, layered settings (defaults < TOML file < environment).
//! - [`app`]: builds the service from settings (binds the listener, chooses
//!   the backend, wires store, queue, feed, sinks and workers) and runs it
//!   until shutdown.
//! - [`backend`]: where the store, queue and feed live: in memory, or on
//!   NATS JetStream shared by many replicas ([`backend::nats`]).
//! - [`nats`]: connecting to NATS (the nats backend and the nats sink).
//! - [`api`]: the axum routers, one module per resource, the problem+json
//!   error type, and the serve loop ([`api::serve`]: hyper connections,
//!   their timeouts and cap).
//! - [`auth`]: the bearer tokens the API accepts (one hash-set lookup,
//!   re-read on SIGHUP).
//! - [`event`]: the incoming event parsed into valid types, and the
//!   published event.
//! - [`feed`]: the published-events feed (publication sequence, replay then
//!   live) behind `GET /events/stream` and `?wait=published`.
//! - [`queue`]: the seam between ingest and the workers: the `Queue`
//!   trait, its in-memory implementation, and the backpressure permits
//!   every queued event holds.
//! - [`pipeline`]: admission (permits, counting), batch admission, the
//!   worker pool (a pass as named steps) and the transform chain.
//! - [`store`]: the `Store` trait and its bounded in-memory implementation.
//! - [`sink`]: the `Sink` trait (a sink answers once it has written), the
//!   stdout, log and nats sinks.
//! - [`telemetry`]: logs (JSON, with trace ids), OpenTelemetry traces over
//!   OTLP, and the Prometheus metrics (each described once, in
//!   [`telemetry::catalogue`]).
//! - [`time`]: fast RFC 3339 timestamps for published events.
//! - [`trace_id`]: the W3C trace id an event carries (depends on nothing of ours).
//! - [`healthcheck`]: the `eventflow healthcheck` probe used by containers.
//! - [`shutdown`]: signals, readiness, and the report of what a shutdown
//!   left unpublished.
//!
//! `shutdown`, `time` and `trace_id` depend on nothing of ours, `config`
//! only on `event`'s limits;
//! `scripts/check-layers.py` (run in CI) fails on any import cycle between
//! the modules.

pub mod api;
pub mod app;
pub mod auth;
pub mod backend;
pub mod config;
pub mod event;
pub mod feed;
pub mod healthcheck;
pub mod nats;
pub mod pipeline;
pub mod queue;
pub mod shutdown;
pub mod sink;
pub mod store;
pub mod subscription;
pub mod telemetry;
#[cfg(any(test, feature = "test-util"))]
pub mod testkit;
pub mod time;
pub mod trace_id;
