//! `stdout` sink: one JSON line per event.
//!
//! Workers hand lines to a dedicated writer thread over a bounded channel,
//! so a slow reader of stdout slows the workers (backpressure) but never
//! blocks the async runtime. The writer buffers and flushes whenever the
//! channel runs empty, so output is prompt when idle and batched under load.

use std::io::{self, Write};
use std::thread;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};

use super::{Publication, Sink, SinkError};

/// Lines the writer thread may have queued before publishers wait.
const CHANNEL_LINES: usize = 8192;
/// Write buffer size.
const BUFFER_BYTES: usize = 256 * 1024;

enum Command {
    Line(String),
    Flush(oneshot::Sender<io::Result<()>>),
}

/// Writes published events as JSON lines to a writer (standard output in production).
#[derive(Debug)]
pub struct StdoutSink {
    commands: mpsc::Sender<Command>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Line(_) => f.write_str("Line"),
            Self::Flush(_) => f.write_str("Flush"),
        }
    }
}

impl StdoutSink {
    /// A sink writing to the process's standard output.
    pub fn stdout() -> Self {
        Self::with_writer(io::stdout())
    }

    /// A sink writing to any writer (used by tests).
    pub fn with_writer<W: Write + Send + 'static>(writer: W) -> Self {
        let (commands, receiver) = mpsc::channel(CHANNEL_LINES);
        // A plain thread: blocking writes must not stall the async runtime.
        let spawned = thread::Builder::new()
            .name("eventflow-stdout".into())
            .spawn(move || {
                write_loop(receiver, io::BufWriter::with_capacity(BUFFER_BYTES, writer))
            });
        if let Err(error) = spawned {
            // The receiver was dropped with the closure: publishes will report Closed.
            tracing::error!(%error, "could not start the stdout writer thread");
        }
        Self { commands }
    }
}

fn write_loop<W: Write>(mut commands: mpsc::Receiver<Command>, mut out: io::BufWriter<W>) {
    let mut failed = false;
    while let Some(first) = commands.blocking_recv() {
        let mut next = Some(first);
        while let Some(command) = next {
            match command {
                Command::Line(line) if !failed => {
                    let written = out
                        .write_all(line.as_bytes())
                        .and_then(|()| out.write_all(b"\n"));
                    if let Err(error) = written {
                        tracing::error!(%error, "writing to stdout failed; dropping further output");
                        failed = true;
                    }
                }
                Command::Line(_) => {}
                Command::Flush(done) => {
                    let result = if failed {
                        Err(io::Error::other("stdout write failed earlier"))
                    } else {
                        out.flush()
                    };
                    let _ = done.send(result);
                }
            }
            next = commands.try_recv().ok();
        }
        // The channel ran empty: the pipeline is idle, make the lines visible.
        if !failed && let Err(error) = out.flush() {
            tracing::error!(%error, "flushing stdout failed; dropping further output");
            failed = true;
        }
    }
}

#[async_trait]
impl Sink for StdoutSink {
    fn name(&self) -> &'static str {
        "stdout"
    }

    async fn publish(&self, publication: Publication<'_>) -> Result<(), SinkError> {
        self.commands
            .send(Command::Line(publication.json.to_owned()))
            .await
            .map_err(|_| SinkError::Closed("stdout"))
    }

    async fn flush(&self) -> Result<(), SinkError> {
        let (done, flushed) = oneshot::channel();
        self.commands
            .send(Command::Flush(done))
            .await
            .map_err(|_| SinkError::Closed("stdout"))?;
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
        for json in [r#"{"n":1}"#, r#"{"n":2}"#] {
            sink.publish(Publication {
                event: &event,
                sequence: 1,
                json,
            })
            .await
            .unwrap();
        }
        sink.flush().await.unwrap();
        let written = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert_eq!(written, "{\"n\":1}\n{\"n\":2}\n");
    }
}
