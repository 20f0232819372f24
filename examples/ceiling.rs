//! The yardstick for ingest benchmarks: a bare axum server whose
//! `POST /events` deserializes the event and answers 202, doing nothing
//! else. Whatever eventflow does beyond this is the cost of the pipeline.
//!
//! Run: `cargo run --release --example ceiling -- 127.0.0.1:8090`

use axum::Json;
use axum::Router;
use axum::http::StatusCode;
use axum::routing::post;
use serde::Deserialize;

/// The event as eventflow receives it.
#[derive(Debug, Deserialize)]
#[allow(dead_code)] // Deserialized to pay the parsing cost; not used.
struct Event {
    id: String,
    timestamp: i64,
    payload: String,
}

async fn accept(Json(_event): Json<Event>) -> StatusCode {
    StatusCode::ACCEPTED
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8090".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    let app = Router::new().route("/events", post(accept));
    axum::serve(listener, app).await
}
