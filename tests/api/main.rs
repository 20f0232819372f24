//! Integration tests: the real server on 127.0.0.1:0, spoken to over HTTP.

// Test code: a failed unwrap is a failed test, which is what we want.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod auth;
mod batch;
mod binary;
mod budgets;
mod cli;
mod events;
mod fuzz;
mod health;
mod helpers;
mod input;
mod list;
mod metrics;
mod nats;
mod prometheus;
mod publication;
mod readers;
mod retry;
mod shutdown;
mod stream;
mod subscriptions;
mod tracing;
