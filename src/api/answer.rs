//! Answers held in memory (pages, lookups, SSE subscribers' fetched
//! events): the budget they draw on, `server.max_inflight_answer_bytes`,
//! apart from the request bodies' budget, so that readers who do not read
//! their answers can exhaust only their own share: they get 503 and
//! `Retry-After`, writers never do.
//!
//! An answer is charged by the bytes it actually holds: its buffer takes
//! from the budget before it grows, and gives back what it did not use.
//! The bytes and their share are freed together, when hyper has copied the
//! last chunk into its own write buffer (or the connection drops them).

use std::io;
use std::sync::Arc;

use axum::body::Body;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::ApiError;

/// The size of the chunks an answer goes out in. hyper copies what it is
/// offered into its own write buffer (bounded by its `max_buf_size`), so
/// one large chunk would leave the budget at once while still in memory;
/// in chunks, the rest stays here, counted, until sent.
const ANSWER_CHUNK: usize = 16 * 1024;

/// Smallest step an answer's buffer grows by.
const MIN_GROWTH: usize = 4096;

/// Bytes of answers held in memory at once (`server.max_inflight_answer_bytes`).
#[derive(Debug, Clone)]
pub struct AnswerBudget {
    bytes: Arc<Semaphore>,
    total: usize,
}

/// A share of the [`AnswerBudget`], given back when dropped.
#[derive(Debug, Default)]
pub(crate) struct Held(Option<OwnedSemaphorePermit>);

impl Held {
    /// Bytes this share holds.
    pub(crate) fn bytes(&self) -> usize {
        self.0.as_ref().map_or(0, OwnedSemaphorePermit::num_permits)
    }

    /// Gives back all but `keep` bytes.
    pub(crate) fn keep(&mut self, keep: usize) {
        if let Some(permit) = &mut self.0 {
            let extra = permit.num_permits().saturating_sub(keep);
            drop(permit.split(extra));
        }
    }

    fn merge(&mut self, more: Held) {
        match (&mut self.0, more.0) {
            (Some(held), Some(more)) => held.merge(more),
            (held @ None, more) => *held = more,
            (_, None) => {}
        }
    }
}

impl AnswerBudget {
    /// A budget of `bytes`.
    pub fn new(bytes: usize) -> Self {
        let total = bytes.min(Semaphore::MAX_PERMITS);
        Self {
            bytes: Arc::new(Semaphore::new(total)),
            total,
        }
    }

    /// The whole budget.
    pub fn total(&self) -> usize {
        self.total
    }

    /// `bytes` of the budget now, or 503.
    pub(crate) fn try_take(&self, bytes: usize) -> Result<Held, ApiError> {
        if bytes == 0 {
            return Ok(Held(None));
        }
        let bytes = u32::try_from(bytes).map_err(|_| ApiError::AnswersOverBudget)?;
        Arc::clone(&self.bytes)
            .try_acquire_many_owned(bytes)
            .map(|permit| Held(Some(permit)))
            .map_err(|_| ApiError::AnswersOverBudget)
    }

    /// `bytes` of the budget (at most all of it), waiting until they are free.
    pub(crate) async fn take(&self, bytes: usize) -> Held {
        let bytes = u32::try_from(bytes.min(self.total)).unwrap_or(u32::MAX);
        if bytes == 0 {
            return Held(None);
        }
        // The semaphore is never closed.
        Held(Arc::clone(&self.bytes).acquire_many_owned(bytes).await.ok())
    }

    /// An empty answer to render into, charged as it grows.
    pub(crate) fn buffer(&self) -> AnswerBuffer {
        AnswerBuffer {
            budget: self.clone(),
            bytes: Vec::new(),
            held: Held(None),
        }
    }

    /// Bytes no answer holds now.
    #[cfg(test)]
    pub(crate) fn available(&self) -> usize {
        self.bytes.available_permits()
    }
}

/// An answer being rendered: a buffer that takes its share of the budget
/// before it grows (an [`io::Write`] for `serde_json`).
#[derive(Debug)]
pub(crate) struct AnswerBuffer {
    budget: AnswerBudget,
    bytes: Vec<u8>,
    held: Held,
}

impl AnswerBuffer {
    /// Makes room for `more` bytes, or 503 when the budget has not got it.
    fn reserve(&mut self, more: usize) -> Result<(), ApiError> {
        let needed = self.bytes.len().saturating_add(more);
        if needed <= self.bytes.capacity() {
            return Ok(());
        }
        let grown = needed
            .max(self.bytes.capacity().saturating_mul(2))
            .max(MIN_GROWTH);
        let charge = grown.saturating_sub(self.held.bytes());
        self.held.merge(self.budget.try_take(charge)?);
        self.bytes.reserve_exact(grown - self.bytes.len());
        Ok(())
    }

    /// Appends `bytes`, or 503 when the budget has no room for them.
    pub(crate) fn extend(&mut self, bytes: &[u8]) -> Result<(), ApiError> {
        self.reserve(bytes.len())?;
        self.bytes.extend_from_slice(bytes);
        Ok(())
    }

    /// Bytes rendered so far.
    pub(crate) fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Drops what was rendered past `len`.
    pub(crate) fn truncate(&mut self, len: usize) {
        self.bytes.truncate(len);
    }

    /// Appends `value` as the next element of a JSON array whose `[` is
    /// written (`first`: no comma before it), unless that would take the
    /// answer past `limit` bytes: then it is left out (`false`). A first
    /// element is always written, so that a list holds at least one.
    pub(crate) fn list_item(
        &mut self,
        first: bool,
        value: &impl serde::Serialize,
        limit: usize,
    ) -> Result<bool, ApiError> {
        let start = self.len();
        if !first {
            self.extend(b",")?;
        }
        self.json(value)?;
        if !first && self.len() > limit {
            self.truncate(start);
            return Ok(false);
        }
        Ok(true)
    }

    /// Serializes `value` as JSON onto the answer.
    pub(crate) fn json(&mut self, value: &impl serde::Serialize) -> Result<(), ApiError> {
        let mut writer = Writer {
            answer: self,
            over_budget: false,
        };
        match serde_json::to_writer(&mut writer, value) {
            Ok(()) => Ok(()),
            Err(_) if writer.over_budget => Err(ApiError::AnswersOverBudget),
            Err(_) => Err(ApiError::Internal),
        }
    }

    /// The answer as a response body that holds its share of the budget
    /// until its bytes are freed.
    pub(crate) fn into_body(mut self) -> Body {
        // Only what it holds stays charged.
        self.bytes.shrink_to_fit();
        self.held.keep(self.bytes.capacity());
        let bytes = Bytes::from_owner(Owned {
            bytes: self.bytes,
            _held: self.held,
        });
        let chunks = (0..bytes.len())
            .step_by(ANSWER_CHUNK)
            .map(move |start| bytes.slice(start..(start + ANSWER_CHUNK).min(bytes.len())));
        Body::from_stream(futures_util::stream::iter(chunks).map(Ok::<_, std::convert::Infallible>))
    }
}

/// An answer's bytes with their share of the budget: freed together.
struct Owned {
    bytes: Vec<u8>,
    _held: Held,
}

impl AsRef<[u8]> for Owned {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

/// `serde_json`'s writer into an [`AnswerBuffer`], telling a budget
/// refusal from any other failure.
struct Writer<'a> {
    answer: &'a mut AnswerBuffer,
    over_budget: bool,
}

impl io::Write for Writer<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_all(buf)?;
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.answer.extend(buf).map_err(|_| {
            self.over_budget = true;
            io::Error::other("over the answers' budget")
        })
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    #[tokio::test]
    async fn an_answer_holds_its_bytes_until_sent_and_no_more() {
        let budget = AnswerBudget::new(1 << 20);
        let mut answer = budget.buffer();
        answer.json(&vec!["x".repeat(1000); 300]).unwrap();
        let len = answer.len();
        // Charged as it grew, by doubling: never more than twice its size.
        let charged = (1 << 20) - budget.available();
        assert!(charged >= len && charged <= 2 * len, "{charged} for {len}");
        let body = answer.into_body();
        let held = (1 << 20) - budget.available();
        assert!(held >= len && held < len + MIN_GROWTH, "{held} for {len}");
        let sent = body.collect().await.unwrap().to_bytes();
        assert_eq!(sent.len(), len);
        drop(sent);
        assert_eq!(budget.available(), 1 << 20);
    }

    #[tokio::test]
    async fn an_answer_past_the_budget_is_refused_and_gives_back_what_it_took() {
        let budget = AnswerBudget::new(64 * 1024);
        let mut answer = budget.buffer();
        let error = answer.json(&vec!["x".repeat(1000); 300]).unwrap_err();
        assert!(matches!(error, ApiError::AnswersOverBudget), "{error:?}");
        drop(answer);
        assert_eq!(budget.available(), 64 * 1024);
    }

    #[tokio::test]
    async fn a_share_gives_back_what_it_does_not_keep() {
        let budget = AnswerBudget::new(1000);
        let mut held = budget.try_take(600).unwrap();
        assert!(budget.try_take(600).is_err());
        held.keep(100);
        assert_eq!(budget.available(), 900);
        drop(held);
        assert_eq!(budget.available(), 1000);
    }
}
