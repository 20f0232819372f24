//! The stdout sink: whole lines in order, published only once written,
//! failures reported per event and breaking the sink.

use std::sync::{Arc, Mutex};
use std::time::Duration;

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
async fn publish(
    sink: &StdoutSink,
    event: &PublishedEvent,
    jsons: &[&str],
) -> Result<(), PublishError> {
    let events: Vec<Publication<'_>> = jsons
        .iter()
        .map(|json| Publication {
            event,
            sequence: 1,
            json,
        })
        .collect();
    let lines = Arc::new(jsons.iter().map(|j| format!("{j}\n")).collect::<String>());
    sink.publish(Publications::new(&events, &lines)).await
}

#[tokio::test]
async fn writes_one_line_per_event_before_answering() {
    let out = Shared::default();
    let sink = StdoutSink::with_writer(out.clone());
    let event = event();
    publish(&sink, &event, &[r#"{"n":1}"#]).await.unwrap();
    // Answered: so already written, no flush needed.
    assert_eq!(&*out.0.lock().unwrap(), b"{\"n\":1}\n");
    publish(&sink, &event, &[]).await.unwrap();
    publish(&sink, &event, &[r#"{"n":2}"#, r#"{"n":3}"#])
        .await
        .unwrap();
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
        publish(&sink, &event, &refs).await.unwrap();
        for json in &jsons {
            expected.push_str(json);
            expected.push('\n');
        }
    }
    let written = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    assert_eq!(written, expected);
}

/// Takes nothing until the test opens it: a reader that stopped reading.
/// `entered` is set once a write waits.
#[derive(Clone, Default)]
struct Blocked(
    Arc<(Mutex<bool>, std::sync::Condvar)>,
    Shared,
    Arc<std::sync::atomic::AtomicBool>,
);

impl Write for Blocked {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let (open, opened) = &*self.0;
        let mut open = open.lock().unwrap();
        self.2.store(true, std::sync::atomic::Ordering::SeqCst);
        while !*open {
            open = opened.wait(open).unwrap();
        }
        self.1.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_pass_is_not_published_while_its_write_waits() {
    let out = Blocked::default();
    let sink = Arc::new(StdoutSink::with_writer(out.clone()));
    let publishing = {
        let sink = Arc::clone(&sink);
        tokio::spawn(async move { publish(&sink, &event(), &[r#"{"n":1}"#]).await })
    };
    // Once the writer waits in its write, the pass must wait too: given
    // time to (wrongly) finish, it does not.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !out.2.load(std::sync::atomic::Ordering::SeqCst) {
        assert!(std::time::Instant::now() < deadline, "never written");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut publishing = publishing;
    assert!(
        tokio::time::timeout(Duration::from_millis(200), &mut publishing)
            .await
            .is_err(),
        "answered before it was written"
    );
    *out.0.0.lock().unwrap() = true;
    out.0.1.notify_all();
    tokio::time::timeout(Duration::from_secs(5), publishing)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(&*out.1.0.lock().unwrap(), b"{\"n\":1}\n");
}

/// Takes this many bytes, then fails: a reader that went away mid-way.
struct BreaksAfter(usize, Shared);

impl Write for BreaksAfter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.0 == 0 {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let n = buf.len().min(self.0);
        self.0 -= n;
        self.1.write(&buf[..n])
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_failed_write_reports_what_was_written_and_breaks_the_sink() {
    let out = Shared::default();
    // Room for the first line and half the second.
    let sink = StdoutSink::with_writer(BreaksAfter(12, out.clone()));
    let event = event();
    let failed = publish(&sink, &event, &[r#"{"n":1}"#, r#"{"n":2}"#, r#"{"n":3}"#])
        .await
        .unwrap_err();
    assert_eq!(failed.written, 1, "one line written whole: {failed}");
    assert!(
        matches!(&failed.error, SinkError::Io { source, .. } if source.kind() == io::ErrorKind::BrokenPipe),
        "{failed:?}"
    );
    assert!(sink.broken().unwrap().contains("writing failed"));
    // Every later pass is refused at once, written or not.
    let again = publish(&sink, &event, &[r#"{"n":4}"#]).await.unwrap_err();
    assert_eq!(again.written, 0);
    assert!(
        matches!(again.error, SinkError::Broken { sink: "stdout", .. }),
        "{again:?}"
    );
    assert!(sink.flush().await.is_err());
    assert_eq!(&*out.0.lock().unwrap(), b"{\"n\":1}\n{\"n\"");
}

#[test]
fn a_failure_is_split_among_the_passes_of_the_write() {
    let error = io::Error::from(io::ErrorKind::BrokenPipe);
    let mut answers = Vec::new();
    let passes: Vec<Pass> = ["a\nbb\n", "c\n", "d\n"]
        .iter()
        .map(|lines| {
            let (done, answer) = oneshot::channel();
            answers.push(answer);
            Pass {
                lines: Arc::new((*lines).to_owned()),
                done,
            }
        })
        .collect();
    // Five bytes: the first pass whole, the second not begun.
    report_failure(passes.into_iter(), 5, &error);
    let written: Vec<Option<usize>> = answers
        .into_iter()
        .map(|mut answer| match answer.try_recv().unwrap() {
            Ok(()) => None,
            Err(failure) => Some(failure.written),
        })
        .collect();
    assert_eq!(written, [None, Some(0), Some(0)]);
}

#[tokio::test]
async fn dropping_the_sink_ends_the_writer() {
    let out = Shared::default();
    let sink = StdoutSink::with_writer(out.clone());
    publish(&sink, &event(), &[r#"{"n":1}"#]).await.unwrap();
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

/// Panics on its first write, as a writer with a bug might.
struct Panics;

impl Write for Panics {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        panic!("a writer bug");
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_writer_thread_that_dies_breaks_the_sink_instead_of_hanging_it() {
    let sink = StdoutSink::with_writer(Panics);
    let event = event();
    let first = tokio::time::timeout(
        Duration::from_secs(5),
        publish(&sink, &event, &[r#"{"n":1}"#]),
    )
    .await
    .expect("answered, not left waiting");
    assert!(first.is_err());
    // Broken from then on: refused at once, never queued for a dead thread.
    for _ in 0..500 {
        if sink.broken().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(sink.broken().unwrap().contains("panicked"));
    let later = tokio::time::timeout(
        Duration::from_secs(5),
        publish(&sink, &event, &[r#"{"n":2}"#]),
    )
    .await
    .expect("refused at once");
    assert!(later.is_err());
}

/// Takes at most 700 bytes a call, 1 ms each: a slow reader.
#[derive(Clone, Default)]
struct Slow(Shared);

impl Write for Slow {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        std::thread::sleep(Duration::from_millis(1));
        let n = buf.len().min(700);
        self.0.write(&buf[..n])
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_stop_finishes_the_line_in_progress_and_starts_no_other() {
    let out = Slow::default();
    let sink = Arc::new(StdoutSink::with_writer(out.clone()));
    let event = event();
    // Lines of 1,000 bytes, 200 kB in all: written over ~300 calls.
    let line = format!("{{\"x\":\"{}\"}}", "y".repeat(992));
    let jsons: Vec<&str> = (0..200).map(|_| line.as_str()).collect();
    let publishing = {
        let sink = Arc::clone(&sink);
        let jsons: Vec<String> = jsons.iter().map(|j| (*j).to_owned()).collect();
        tokio::spawn(async move {
            let refs: Vec<&str> = jsons.iter().map(String::as_str).collect();
            let event = self::event();
            publish(&sink, &event, &refs).await
        })
    };
    // Mid-way through, once something is written (700 does not divide
    // 1,001, so the stop is rarely at a line's end).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while out.0.0.lock().unwrap().is_empty() {
        assert!(std::time::Instant::now() < deadline, "nothing written");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let shared = Arc::clone(&sink.shared);
    tokio::task::spawn_blocking(move || shared.stop_at_line_end(Duration::from_secs(5)))
        .await
        .unwrap();
    let written = out.0.0.lock().unwrap().clone();
    assert!(!written.is_empty(), "something was written first");
    assert!(written.len() < 200 * 1_001, "it stopped early");
    assert_eq!(written.last(), Some(&b'\n'), "ends with a whole line");
    assert_eq!(written.len() % 1_001, 0, "whole lines only");
    // The pass is answered as not all written; nothing is written after.
    let failed = publishing.await.unwrap().unwrap_err();
    assert_eq!(failed.written, written.len() / 1_001);
    assert!(publish(&sink, &event, &[r#"{"late":1}"#]).await.is_err());
    assert_eq!(out.0.0.lock().unwrap().len(), written.len());
}
