//! `log` sink: one `tracing` event per published event, written by the
//! log layer before the call returns.

use async_trait::async_trait;

use super::{Publications, PublishError, Sink, SinkError};

/// Logs every published event at INFO on target `eventflow::published`.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogSink;

#[async_trait]
impl Sink for LogSink {
    fn name(&self) -> &'static str {
        "log"
    }

    async fn publish(&self, publications: Publications<'_>) -> Result<(), PublishError> {
        for publication in publications.events() {
            tracing::info!(
                target: "eventflow::published",
                id = %publication.event.id,
                sequence = publication.sequence,
                published = publication.json,
                "event published"
            );
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), SinkError> {
        Ok(())
    }
}
