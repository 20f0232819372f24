//! `stdout` sink: one JSON line per event.
//!
//! Workers append lines to a shared buffer; a dedicated writer thread swaps
//! the buffer out and writes it, so a slow reader of stdout slows the
//! workers (they wait once the buffer is full) but never blocks the async
//! runtime, and a busy pipeline costs one write per batch of lines rather
//! than a thread wake-up and a syscall per event. The writer waits
//! [`LINGER`] after the first line of a batch, so idle output appears
//! within milliseconds.

use std::io::{self, Write};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::{Condvar, Mutex};
use tokio::sync::{Notify, oneshot};

use super::{Publications, Sink, SinkError};

/// Buffered bytes at which publishers wait for the writer.
const BUFFER_LIMIT: usize = 1024 * 1024;
/// How long the writer lets a batch accumulate after its first line.
const LINGER: Duration = Duration::from_millis(2);

#[derive(Default)]
struct State {
    buffer: Vec<u8>,
    flush_requests: Vec<oneshot::Sender<io::Result<()>>>,
    failed: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the writer when the buffer stops being empty.
    work: Condvar,
    /// Wakes publishers waiting for room.
    room: Notify,
}

/// Writes published events as JSON lines to a writer (standard output in production).
pub struct StdoutSink {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for StdoutSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StdoutSink").finish_non_exhaustive()
    }
}

impl StdoutSink {
    /// A sink writing to the process's standard output.
    pub fn stdout() -> Self {
        Self::with_writer(io::stdout())
    }

    /// A sink writing to any writer (used by tests).
    pub fn with_writer<W: Write + Send + 'static>(writer: W) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            room: Notify::new(),
        });
        let for_writer = Arc::clone(&shared);
        let spawned = thread::Builder::new()
            .name("eventflow-stdout".into())
            .spawn(move || write_loop(&for_writer, writer));
        if let Err(error) = spawned {
            tracing::error!(%error, "could not start the stdout writer thread");
            shared.state.lock().failed = true;
        }
        Self { shared }
    }
}

fn write_loop<W: Write>(shared: &Shared, mut out: W) {
    let mut spare = Vec::new();
    loop {
        let (batch, flushes) = {
            let mut state = shared.state.lock();
            while state.buffer.is_empty() && state.flush_requests.is_empty() {
                shared.work.wait(&mut state);
            }
            if state.flush_requests.is_empty() {
                // Let the batch grow a little before writing it.
                let _ = shared.work.wait_for(&mut state, LINGER);
            }
            std::mem::swap(&mut state.buffer, &mut spare);
            (
                std::mem::take(&mut spare),
                std::mem::take(&mut state.flush_requests),
            )
        };
        shared.room.notify_waiters();
        let result = if batch.is_empty() {
            out.flush()
        } else {
            out.write_all(&batch).and_then(|()| out.flush())
        };
        if let Err(error) = &result {
            tracing::error!(%error, "writing to stdout failed; dropping further output");
            shared.state.lock().failed = true;
        }
        for done in flushes {
            let _ = done.send(match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            });
        }
        spare = batch;
        spare.clear();
    }
}

#[async_trait]
impl Sink for StdoutSink {
    fn name(&self) -> &'static str {
        "stdout"
    }

    async fn publish(&self, publications: Publications<'_>) -> Result<(), SinkError> {
        loop {
            // Register for room before checking, so a wake-up cannot be missed.
            let room = self.shared.room.notified();
            {
                let mut state = self.shared.state.lock();
                if state.failed {
                    return Err(SinkError::Closed("stdout"));
                }
                // A chunk goes in whole: the buffer may pass the limit by one.
                if state.buffer.len() < BUFFER_LIMIT {
                    let was_empty = state.buffer.is_empty();
                    state
                        .buffer
                        .extend_from_slice(publications.lines().as_bytes());
                    if was_empty {
                        self.shared.work.notify_one();
                    }
                    return Ok(());
                }
            }
            room.await;
        }
    }

    async fn flush(&self) -> Result<(), SinkError> {
        let (done, flushed) = oneshot::channel();
        {
            let mut state = self.shared.state.lock();
            if state.failed {
                return Err(SinkError::Closed("stdout"));
            }
            state.flush_requests.push(done);
            self.shared.work.notify_one();
        }
        flushed
            .await
            .map_err(|_| SinkError::Closed("stdout"))?
            .map_err(|source| SinkError::Io {
                sink: "stdout",
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::event::{EventId, PublishedEvent};
    use crate::sink::Publication;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn writes_one_line_per_event_and_flushes() {
        let out = Shared::default();
        let sink = StdoutSink::with_writer(out.clone());
        let event = PublishedEvent {
            id: EventId::parse("a").unwrap(),
            timestamp: 1,
            payload: "X".into(),
            metadata: None,
        };
        let publication = |json| Publication {
            event: &event,
            sequence: 1,
            json,
        };
        let one = [publication(r#"{"n":1}"#)];
        sink.publish(Publications::new(&one, "{\"n\":1}\n"))
            .await
            .unwrap();
        let two = [publication(r#"{"n":2}"#), publication(r#"{"n":3}"#)];
        sink.publish(Publications::new(&two, "{\"n\":2}\n{\"n\":3}\n"))
            .await
            .unwrap();
        sink.flush().await.unwrap();
        let written = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert_eq!(written, "{\"n\":1}\n{\"n\":2}\n{\"n\":3}\n");
    }
}
