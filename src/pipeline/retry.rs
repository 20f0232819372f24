//! Retrying failed events: a failed event goes back in the backlog as a
//! fresh pending record (the same event and arrival sequence), takes a
//! place in the pipeline like a new one, and once published gets a new
//! publication sequence.

use std::sync::Arc;
use std::time::Instant;

use super::{IngestError, Pipeline};
use crate::event::EventId;
use crate::queue::Overloaded;
use crate::store::{PageQuery, Record, Status, event_footprint};

/// Why one event could not be retried.
#[derive(Debug, thiserror::Error)]
pub enum RetryError {
    /// No event with that id is held (404).
    #[error("no event with id `{0}`")]
    NotFound(String),
    /// It is not failed (409).
    #[error("event `{id}` is {status:?}, not failed: only a failed event is retried")]
    NotFailed {
        /// The id.
        id: String,
        /// Its status now.
        status: Status,
    },
    /// No room, draining, or the backend unavailable (503).
    #[error(transparent)]
    Refused(#[from] IngestError),
}

/// A failed event queued again.
#[derive(Debug, Clone)]
pub struct Retried {
    /// Its fresh, pending record.
    pub record: Arc<Record>,
    /// Times it was queued for processing, this one included.
    pub attempts: u32,
}

/// What a retry of many did.
#[derive(Debug, Clone, Default)]
pub struct RetriedPage {
    /// Failed events queued again.
    pub requeued: usize,
    /// Where the next call goes on (an arrival sequence), if more may follow.
    pub next: Option<u64>,
}

impl Pipeline {
    /// Puts the failed event `id` back in the backlog.
    pub async fn retry(&self, id: &EventId) -> Result<Retried, RetryError> {
        let _in_progress = self.enter()?;
        let record = self
            .inner
            .store
            .get(id)
            .await
            .map_err(IngestError::from)?
            .ok_or_else(|| RetryError::NotFound(id.to_string()))?;
        let not_failed = |record: &Record| RetryError::NotFailed {
            id: id.to_string(),
            status: record.status(),
        };
        if record.status() != Status::Failed {
            return Err(not_failed(&record));
        }
        match self.requeue(&record).await? {
            Some(retried) => {
                self.inner.admission.retried(1);
                Ok(retried)
            }
            // Retried (or evicted) by someone else since it was looked up.
            None => Err(not_failed(&record)),
        }
    }

    /// Puts up to `limit` failed events after arrival sequence `after` back
    /// in the backlog, in arrival order, stopping early when the pipeline
    /// fills (the answer's `next` goes on from there; 503 only when not
    /// even the first fits).
    pub async fn retry_failed(&self, after: u64, limit: usize) -> Result<RetriedPage, IngestError> {
        let _in_progress = self.enter()?;
        let page = self
            .inner
            .store
            .page(PageQuery {
                after,
                limit,
                status: Some(Status::Failed),
            })
            .await?;
        let mut done = RetriedPage {
            requeued: 0,
            next: page.next,
        };
        let mut last = after;
        for record in &page.records {
            match self.requeue(record).await {
                Ok(Some(_)) => done.requeued += 1,
                Ok(None) => {}
                Err(IngestError::Overloaded) if last > after => {
                    done.next = Some(last);
                    break;
                }
                Err(error) => {
                    self.inner.admission.retried(done.requeued);
                    return Err(error);
                }
            }
            last = record.sequence;
        }
        self.inner.admission.retried(done.requeued);
        Ok(done)
    }

    /// Queues a fresh record for failed `record`, with a place in the
    /// pipeline; `None` when it is no longer the failed record held.
    async fn requeue(&self, record: &Record) -> Result<Option<Retried>, IngestError> {
        let bytes = event_footprint(&record.event);
        let permit = self
            .inner
            .backpressure
            .try_acquire(bytes)
            .map_err(|Overloaded| self.refusal(1, bytes))?;
        let store = &self.inner.store;
        let Some(fresh) = store.retry(record).await? else {
            return Ok(None);
        };
        // Held by `enter`, the queue is open; should the push still fail,
        // the record leaves the store as a refused new event would.
        self.enqueue(vec![Arc::clone(&fresh)], permit, Instant::now(), Vec::new())
            .await
            .map_err(|(error, _)| error)?;
        let attempts = store.attempts(&fresh);
        Ok(Some(Retried {
            record: fresh,
            attempts,
        }))
    }
}
