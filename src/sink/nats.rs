//! `nats` sink (memory mode): one core NATS message per published event,
//! its JSON line, on `publish.nats.subject`. Written means the messages
//! were flushed to the server's socket. (In nats mode the backend's
//! published stream carries every event, and this sink is refused.)

use std::time::Duration;

use async_nats::Client;
use async_trait::async_trait;
use bytes::Bytes;

use super::{Publications, PublishError, Sink, SinkError};

/// Longest a pass waits for its messages to reach the server.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Publishes every published event to a NATS subject.
#[derive(Debug, Clone)]
pub struct NatsSink {
    client: Client,
    subject: async_nats::Subject,
}

impl NatsSink {
    /// A sink publishing on `subject` through `client`.
    pub fn new(client: Client, subject: &str) -> Self {
        Self {
            client,
            subject: async_nats::Subject::from(subject),
        }
    }

    fn error(reason: impl ToString) -> SinkError {
        SinkError::Io {
            sink: "nats",
            source: std::io::Error::other(reason.to_string()),
        }
    }
}

#[async_trait]
impl Sink for NatsSink {
    fn name(&self) -> &'static str {
        "nats"
    }

    async fn publish(&self, publications: Publications<'_>) -> Result<(), PublishError> {
        if let Some(why) = crate::nats::unreachable(&self.client) {
            return Err(Self::error(why).into());
        }
        for publication in publications.events() {
            let line = Bytes::copy_from_slice(publication.json.as_bytes());
            self.client
                .publish(self.subject.clone(), line)
                .await
                .map_err(Self::error)?;
        }
        self.flush().await.map_err(PublishError::from)
    }

    async fn flush(&self) -> Result<(), SinkError> {
        match tokio::time::timeout(FLUSH_TIMEOUT, self.client.flush()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(Self::error(error)),
            Err(_) => Err(Self::error(format!(
                "NATS did not take the messages within {FLUSH_TIMEOUT:?}"
            ))),
        }
    }

    fn broken(&self) -> Option<String> {
        crate::nats::unreachable(&self.client)
    }
}
