//! `stdout` sink: one JSON line per event, and an event counts as written
//! once its line was handed to the kernel (`write` returned), not when it
//! entered a buffer of ours.
//!
//! Workers hand over the buffer of lines each pass wrote (shared, not
//! copied) and wait. A dedicated writer thread takes every pass that has
//! queued up, writes them in one vectored write, and then tells each
//! waiting worker how its pass went: so a slow reader of stdout slows the
//! workers (and, through the permits they hold, admission) but never blocks
//! the async runtime, and a busy pipeline costs one system call per group
//! of passes (the passes that queue up while the previous write runs).
//!
//! A failed write breaks the sink for good (a closed pipe does not reopen):
//! the events whose lines were not written whole are reported back as not
//! written, and every later pass is refused at once.
//!
//! stdout only ever carries whole lines, a forced exit included: the
//! writer writes at most [`WRITE_CHUNK`] bytes a call, and once
//! [`finish_line`] asks it to stop it finishes the line in progress and
//! starts no other, while the caller waits (bounded) for that.

use std::io::{self, IoSlice, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::{Condvar, Mutex};
use tokio::sync::{Notify, oneshot};

use super::{Publications, PublishError, Sink, SinkError};

/// Queued bytes at which publishers wait for the writer.
const BUFFER_LIMIT: usize = 1024 * 1024;
/// Most bytes one write hands the kernel: a blocking write to a pipe
/// returns only once all of it is taken, and the writer looks at whether
/// it must stop between writes.
const WRITE_CHUNK: usize = 64 * 1024;

/// The writer of the process's standard output, for [`finish_line`].
static PROCESS_STDOUT: OnceLock<Arc<Shared>> = OnceLock::new();

/// Before a forced exit: stops the stdout writer at the end of the line it
/// is writing (it starts no other), and waits up to `wait` for that, so
/// that stdout does not end with half a line while its reader keeps
/// reading. Returns at once when nothing is being written.
pub fn finish_line(wait: Duration) {
    let Some(shared) = PROCESS_STDOUT.get() else {
        return;
    };
    shared.stop_at_line_end(wait);
}

/// How a queued pass was written.
type WriteResult = Result<(), WriteFailure>;

/// A pass whose lines were not all written.
#[derive(Debug)]
struct WriteFailure {
    /// Its lines, from the first, that were written whole.
    written: usize,
    kind: io::ErrorKind,
    reason: String,
}

/// A worker's pass, waiting for the writer.
struct Pass {
    lines: Arc<String>,
    done: oneshot::Sender<WriteResult>,
}

#[derive(Default)]
struct State {
    /// Passes waiting to be written, in order.
    queued: Vec<Pass>,
    /// Their bytes in total.
    queued_bytes: usize,
    flush_requests: Vec<oneshot::Sender<io::Result<()>>>,
    /// The sink was dropped: the writer thread ends once the queue is written.
    closing: bool,
    /// The writer is writing a batch (it may be mid-line).
    writing: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the writer when the queue stops being empty.
    work: Condvar,
    /// Wakes publishers waiting for room.
    room: Notify,
    /// Why the sink is broken, once a write failed.
    broken: OnceLock<String>,
    /// A forced exit asked the writer to stop at the end of its line.
    stopping: AtomicBool,
    /// Wakes [`Shared::stop_at_line_end`] when the writer stops writing.
    idle: Condvar,
}

impl Shared {
    fn stop_at_line_end(&self, wait: Duration) {
        self.stopping.store(true, Ordering::Release);
        let mut state = self.state.lock();
        let _ = self
            .idle
            .wait_while_for(&mut state, |state| state.writing, wait);
    }
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
    /// A sink writing to the process's standard output, unbuffered: each
    /// write goes straight to file descriptor 1 (`io::Stdout` would line-
    /// buffer it once more).
    pub fn stdout() -> Self {
        let sink = Self::stdout_writer();
        let _ = PROCESS_STDOUT.set(Arc::clone(&sink.shared));
        sink
    }

    fn stdout_writer() -> Self {
        #[cfg(unix)]
        {
            use std::os::fd::AsFd;
            if let Ok(fd) = io::stdout().as_fd().try_clone_to_owned() {
                return Self::with_writer(std::fs::File::from(fd));
            }
        }
        Self::with_writer(io::stdout())
    }

    /// A sink writing to any writer (used by tests).
    pub fn with_writer<W: Write + Send + 'static>(writer: W) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            room: Notify::new(),
            broken: OnceLock::new(),
            stopping: AtomicBool::new(false),
            idle: Condvar::new(),
        });
        let for_writer = Arc::clone(&shared);
        let spawned = thread::Builder::new()
            .name("eventflow-stdout".into())
            .spawn(move || {
                let wrote = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    write_loop(&for_writer, writer);
                }));
                if wrote.is_err() {
                    writer_died(&for_writer);
                }
            });
        if let Err(error) = spawned {
            tracing::error!(%error, "could not start the stdout writer thread");
            let _ = shared
                .broken
                .set(format!("no writer thread could be started: {error}"));
        }
        Self { shared }
    }

    fn broken_error(&self) -> Option<SinkError> {
        self.shared.broken.get().map(|reason| SinkError::Broken {
            sink: "stdout",
            reason: reason.clone(),
        })
    }
}

impl Drop for StdoutSink {
    fn drop(&mut self) {
        self.shared.state.lock().closing = true;
        self.shared.work.notify_one();
    }
}

/// The writer thread panicked: the sink is broken, and whatever was queued
/// for it is answered as not written (rather than waited for forever).
fn writer_died(shared: &Shared) {
    let _ = shared.broken.set("the writer thread panicked".into());
    tracing::error!("the stdout writer thread panicked: the sink takes nothing more");
    let (queued, flushes) = {
        let mut state = shared.state.lock();
        state.queued_bytes = 0;
        (
            std::mem::take(&mut state.queued),
            std::mem::take(&mut state.flush_requests),
        )
    };
    shared.room.notify_waiters();
    let error = io::Error::other("the stdout writer thread panicked");
    report_failure(queued.into_iter(), 0, &error);
    for done in flushes {
        let _ = done.send(Err(io::Error::other("the stdout writer thread panicked")));
    }
}

fn write_loop<W: Write>(shared: &Shared, mut out: W) {
    let mut batch: Vec<Pass> = Vec::new();
    loop {
        let flushes = {
            let mut state = shared.state.lock();
            while state.queued.is_empty() && state.flush_requests.is_empty() {
                if state.closing {
                    return;
                }
                shared.work.wait(&mut state);
            }
            std::mem::swap(&mut state.queued, &mut batch);
            state.queued_bytes = 0;
            state.writing = true;
            std::mem::take(&mut state.flush_requests)
        };
        shared.room.notify_waiters();
        if shared.stopping.load(Ordering::Acquire) {
            let _ = shared.broken.set("the process is exiting".into());
        }
        let result = match shared.broken.get() {
            // Broken since these were queued: none of them is written.
            Some(reason) => Err((io::Error::other(reason.clone()), 0)),
            None => write_passes(&mut out, &batch, &shared.stopping)
                .and_then(|()| out.flush().map_err(|error| (error, usize::MAX))),
        };
        {
            shared.state.lock().writing = false;
            shared.idle.notify_all();
        }
        match &result {
            Ok(()) => {
                for pass in batch.drain(..) {
                    let _ = pass.done.send(Ok(()));
                }
            }
            Err((error, written)) => {
                if shared
                    .broken
                    .set(format!("writing failed: {error}"))
                    .is_ok()
                {
                    tracing::error!(
                        %error,
                        "writing to stdout failed: the events not written are marked failed, \
                         and the sink takes nothing more"
                    );
                }
                report_failure(batch.drain(..), *written, error);
            }
        }
        for done in flushes {
            let _ = done.send(match &result {
                Ok(()) => Ok(()),
                Err((error, _)) => Err(io::Error::new(error.kind(), error.to_string())),
            });
        }
    }
}

/// Tells each pass of a failed write how many of its lines were written,
/// given that the write stopped after `written` bytes of them all.
fn report_failure(passes: impl Iterator<Item = Pass>, written: usize, error: &io::Error) {
    let mut left = written;
    for pass in passes {
        let bytes = pass.lines.as_bytes();
        let whole = left.min(bytes.len());
        left -= whole;
        let lines = bytes.iter().filter(|&&b| b == b'\n').count();
        let written_lines = bytes[..whole].iter().filter(|&&b| b == b'\n').count();
        let _ = pass.done.send(if written_lines == lines {
            Ok(())
        } else {
            Err(WriteFailure {
                written: written_lines,
                kind: error.kind(),
                reason: error.to_string(),
            })
        });
    }
}

/// Writes every pass, in order, in vectored writes of at most
/// [`WRITE_CHUNK`] bytes; on failure, the error and how many bytes were
/// written. Once `stopping` is set it finishes the line in progress and
/// stops there.
fn write_passes<W: Write>(
    out: &mut W,
    passes: &[Pass],
    stopping: &AtomicBool,
) -> Result<(), (io::Error, usize)> {
    let mut slices: Vec<IoSlice<'_>> = passes
        .iter()
        .filter(|p| !p.lines.is_empty())
        .map(|p| IoSlice::new(p.lines.as_bytes()))
        .collect();
    let mut unwritten = &mut slices[..];
    let mut total = 0;
    while !unwritten.is_empty() {
        if stopping.load(Ordering::Acquire) {
            if !at_line_start(passes, total) {
                // Every pass ends with a newline: the rest of the current
                // line is in the first unwritten slice.
                let line_end = unwritten[0]
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(unwritten[0].len(), |end| end + 1);
                let rest = &unwritten[0][..line_end];
                out.write_all(rest).map_err(|error| (error, total))?;
                total += rest.len();
            }
            return Err((io::Error::other("the process is exiting"), total));
        }
        // At most WRITE_CHUNK bytes: the leading slices that fit, or a
        // part of the first one.
        let mut count = 0;
        let mut bytes = 0;
        for slice in unwritten.iter() {
            if count > 0 && bytes + slice.len() > WRITE_CHUNK {
                break;
            }
            bytes += slice.len();
            count += 1;
        }
        let result = if count == 1 && unwritten[0].len() > WRITE_CHUNK {
            out.write(&unwritten[0][..WRITE_CHUNK])
        } else {
            out.write_vectored(&unwritten[..count])
        };
        match result {
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

/// Whether the first `written` bytes of the passes end at the start of a
/// line: nothing written, or a newline last.
fn at_line_start(passes: &[Pass], written: usize) -> bool {
    if written == 0 {
        return true;
    }
    let mut left = written;
    for pass in passes.iter().filter(|p| !p.lines.is_empty()) {
        let bytes = pass.lines.as_bytes();
        if left <= bytes.len() {
            return bytes[left - 1] == b'\n';
        }
        left -= bytes.len();
    }
    true
}

#[async_trait]
impl Sink for StdoutSink {
    fn name(&self) -> &'static str {
        "stdout"
    }

    async fn publish(&self, publications: Publications<'_>) -> Result<(), PublishError> {
        if publications.is_empty() {
            return Ok(());
        }
        let (done, written) = oneshot::channel();
        let mut done = Some(done);
        loop {
            // Register for room before checking, so a wake-up cannot be missed.
            let room = self.shared.room.notified();
            {
                let mut state = self.shared.state.lock();
                if let Some(error) = self.broken_error() {
                    return Err(error.into());
                }
                // A pass goes in whole: the queue may pass the limit by one.
                if state.queued_bytes < BUFFER_LIMIT
                    && let Some(done) = done.take()
                {
                    let was_empty = state.queued.is_empty();
                    state.queued_bytes += publications.lines().len();
                    state.queued.push(Pass {
                        lines: publications.shared_lines(),
                        done,
                    });
                    if was_empty {
                        self.shared.work.notify_one();
                    }
                    break;
                }
            }
            room.await;
        }
        match written.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(failure)) => Err(PublishError {
                written: failure.written,
                error: SinkError::Io {
                    sink: "stdout",
                    source: io::Error::new(failure.kind, failure.reason),
                },
            }),
            Err(_) => Err(SinkError::Closed("stdout").into()),
        }
    }

    async fn flush(&self) -> Result<(), SinkError> {
        let (done, flushed) = oneshot::channel();
        {
            let mut state = self.shared.state.lock();
            if let Some(error) = self.broken_error() {
                return Err(error);
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

    fn broken(&self) -> Option<String> {
        self.shared.broken.get().cloned()
    }
}

#[cfg(test)]
mod tests;
