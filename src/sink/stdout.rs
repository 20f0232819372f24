//! `stdout` sink: one JSON line per event.
//!
//! Workers hand over the buffer of lines each pass wrote (shared, not
//! copied); a dedicated writer thread takes what has queued up and writes
//! it in one vectored write, so a slow reader of stdout slows the workers
//! (they wait once [`BUFFER_LIMIT`] bytes are queued) but never blocks the
//! async runtime, and a busy pipeline costs one system call per batch of
//! passes rather than a thread wake-up and a syscall per event. The writer
//! waits [`LINGER`] after the first pass of a batch, so idle output appears
//! within milliseconds.

use std::io::{self, IoSlice, Write};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::{Condvar, Mutex};
use tokio::sync::{Notify, oneshot};

use super::{Publications, Sink, SinkError};

/// Queued bytes at which publishers wait for the writer.
const BUFFER_LIMIT: usize = 1024 * 1024;
/// How long the writer lets a batch accumulate after its first pass.
const LINGER: Duration = Duration::from_millis(2);

#[derive(Default)]
struct State {
    /// Passes' lines waiting to be written, in order.
    queued: Vec<Arc<String>>,
    /// Their bytes in total.
    queued_bytes: usize,
    flush_requests: Vec<oneshot::Sender<io::Result<()>>>,
    failed: bool,
    /// Lines taken but not written, not yet reported by `take_lost`.
    lost: usize,
    /// The sink was dropped: the writer thread ends once the queue is written.
    closing: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the writer when the queue stops being empty.
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

impl Drop for StdoutSink {
    fn drop(&mut self) {
        self.shared.state.lock().closing = true;
        self.shared.work.notify_one();
    }
}

fn write_loop<W: Write>(shared: &Shared, mut out: W) {
    let mut batch = Vec::new();
    loop {
        let flushes = {
            let mut state = shared.state.lock();
            while state.queued.is_empty() && state.flush_requests.is_empty() {
                if state.closing {
                    return;
                }
                shared.work.wait(&mut state);
            }
            if state.flush_requests.is_empty() {
                // Let the batch grow a little before writing it.
                let _ = shared.work.wait_for(&mut state, LINGER);
            }
            std::mem::swap(&mut state.queued, &mut batch);
            state.queued_bytes = 0;
            std::mem::take(&mut state.flush_requests)
        };
        shared.room.notify_waiters();
        // A failed flush after whole writes loses what the writer buffered,
        // which it cannot tell: those lines count as written.
        let result = write_queued(&mut out, &batch)
            .and_then(|()| out.flush().map_err(|error| (error, usize::MAX)));
        if let Err((error, written)) = &result {
            let lost = lines_after(&batch, *written);
            tracing::error!(%error, lost, "writing to stdout failed; these lines are lost and further output is dropped");
            let mut state = shared.state.lock();
            state.failed = true;
            state.lost += lost;
        }
        let result = result.map_err(|(error, _)| error);
        for done in flushes {
            let _ = done.send(match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            });
        }
        // Frees the passes' buffers here, off the workers' threads.
        batch.clear();
    }
}

/// Writes every buffer, in order, in as few vectored writes as the writer
/// takes; on failure, the error and how many bytes were written.
fn write_queued<W: Write>(out: &mut W, buffers: &[Arc<String>]) -> Result<(), (io::Error, usize)> {
    let mut slices: Vec<IoSlice<'_>> = buffers
        .iter()
        .filter(|b| !b.is_empty())
        .map(|b| IoSlice::new(b.as_bytes()))
        .collect();
    let mut unwritten = &mut slices[..];
    let mut total = 0;
    while !unwritten.is_empty() {
        match out.write_vectored(unwritten) {
            Ok(0) => return Err((io::ErrorKind::WriteZero.into(), total)),
            Ok(written) => {
                total += written;
                IoSlice::advance_slices(&mut unwritten, written);
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err((error, total)),
        }
    }
    Ok(())
}

/// Lines (each ends with a newline) of `buffers` not wholly within their
/// first `written` bytes.
fn lines_after(buffers: &[Arc<String>], written: usize) -> usize {
    let mut skip = written;
    buffers
        .iter()
        .map(|buffer| {
            let bytes = buffer.as_bytes();
            let from = skip.min(bytes.len());
            skip -= from;
            bytes[from..].iter().filter(|&&b| b == b'\n').count()
        })
        .sum()
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
                // A pass goes in whole: the queue may pass the limit by one.
                if state.queued_bytes < BUFFER_LIMIT {
                    let was_empty = state.queued.is_empty();
                    state.queued_bytes += publications.lines().len();
                    state.queued.push(publications.shared_lines());
                    if was_empty {
                        self.shared.work.notify_one();
                    }
                    return Ok(());
                }
            }
            room.await;
        }
    }

    fn take_lost(&self) -> usize {
        std::mem::take(&mut self.shared.state.lock().lost)
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

    /// Collects what is written, taking at most `max_write` bytes a call
    /// (0: no limit), as a pipe or terminal may.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>, usize);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = if self.1 == 0 {
                buf.len()
            } else {
                buf.len().min(self.1)
            };
            self.0.lock().unwrap().extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn event() -> PublishedEvent {
        PublishedEvent {
            id: EventId::parse("a").unwrap(),
            timestamp: 1,
            payload: "X".into(),
            metadata: None,
        }
    }

    /// Publishes one pass with these lines.
    async fn publish(sink: &StdoutSink, event: &PublishedEvent, jsons: &[&str]) {
        let events: Vec<Publication<'_>> = jsons
            .iter()
            .map(|json| Publication {
                event,
                sequence: 1,
                json,
            })
            .collect();
        let lines = Arc::new(jsons.iter().map(|j| format!("{j}\n")).collect::<String>());
        sink.publish(Publications::new(&events, &lines))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn writes_one_line_per_event_and_flushes() {
        let out = Shared::default();
        let sink = StdoutSink::with_writer(out.clone());
        let event = event();
        publish(&sink, &event, &[r#"{"n":1}"#]).await;
        publish(&sink, &event, &[]).await;
        publish(&sink, &event, &[r#"{"n":2}"#, r#"{"n":3}"#]).await;
        sink.flush().await.unwrap();
        let written = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert_eq!(written, "{\"n\":1}\n{\"n\":2}\n{\"n\":3}\n");
    }

    #[tokio::test]
    async fn short_writes_keep_every_pass_whole_and_in_order() {
        let out = Shared(Arc::default(), 5);
        let sink = StdoutSink::with_writer(out.clone());
        let event = event();
        let mut expected = String::new();
        for pass in 0..50 {
            let jsons: Vec<String> = (0..pass % 4)
                .map(|i| format!("{{\"p\":{pass},\"i\":{i}}}"))
                .collect();
            let refs: Vec<&str> = jsons.iter().map(String::as_str).collect();
            publish(&sink, &event, &refs).await;
            for json in &jsons {
                expected.push_str(json);
                expected.push('\n');
            }
        }
        sink.flush().await.unwrap();
        let written = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert_eq!(written, expected);
    }

    struct Broken;

    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_failed_write_is_reported_and_closes_the_sink() {
        let sink = StdoutSink::with_writer(Broken);
        let event = event();
        publish(&sink, &event, &[r#"{"n":1}"#]).await;
        // The failure reaches the flush as the write's error, or, when the
        // write ran before the flush was asked for, as the closed sink.
        let flushed = sink.flush().await;
        assert!(
            matches!(
                flushed,
                Err(SinkError::Io { ref source, .. }) if source.kind() == io::ErrorKind::BrokenPipe
            ) || matches!(flushed, Err(SinkError::Closed("stdout"))),
            "{flushed:?}"
        );
        // The line it had taken is reported lost, once.
        assert_eq!(sink.take_lost(), 1);
        assert_eq!(sink.take_lost(), 0);
        let lines = Arc::new(String::new());
        let again = sink.publish(Publications::new(&[], &lines)).await;
        assert!(
            matches!(again, Err(SinkError::Closed("stdout"))),
            "{again:?}"
        );
    }

    #[test]
    fn lost_lines_are_those_not_wholly_written() {
        let buffers = [Arc::new("a\nbb\n".to_owned()), Arc::new("c\n".to_owned())];
        assert_eq!(lines_after(&buffers, 0), 3);
        assert_eq!(lines_after(&buffers, 2), 2);
        assert_eq!(lines_after(&buffers, 3), 2, "a line half written is lost");
        assert_eq!(lines_after(&buffers, 5), 1);
        assert_eq!(lines_after(&buffers, 7), 0);
    }

    #[tokio::test]
    async fn dropping_the_sink_writes_what_it_took_and_ends_the_writer() {
        let out = Shared::default();
        let sink = StdoutSink::with_writer(out.clone());
        publish(&sink, &event(), &[r#"{"n":1}"#]).await;
        let writer_alive = Arc::downgrade(&sink.shared);
        drop(sink);
        for _ in 0..500 {
            if writer_alive.strong_count() == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(writer_alive.strong_count(), 0, "the writer thread ended");
        assert_eq!(&*out.0.lock().unwrap(), b"{\"n\":1}\n");
    }
}
