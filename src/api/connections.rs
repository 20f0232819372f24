//! Limits on connections: how many are open at once
//! (`server.max_connections`), and how long one may stay silent or leave
//! a request unanswered (`server.idle_timeout`).
//!
//! Each connection costs a task and its buffers for as long as the client
//! keeps it open, idle or not, so without a cap a flood of connections
//! grows memory up to the process's file descriptor limit. At the cap the
//! listener stops accepting: new connections wait in the kernel's backlog
//! until one closes. Connections that neither send nor receive anything
//! for the idle timeout are closed, so that abandoned ones give their slot
//! back; so are connections that keep sending without ever being answered
//! for that long, so that a client trickling a request head one byte at a
//! time (axum's server has no header-read timeout) cannot hold a slot
//! forever.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// A listener that holds at most `max` connections open at once and closes
/// those silent for its idle timeout.
#[derive(Debug)]
pub struct LimitedListener {
    inner: TcpListener,
    open: Arc<Semaphore>,
    idle_timeout: Duration,
}

impl LimitedListener {
    /// Wraps `inner`, allowing `max` connections at once, each silent for
    /// at most `idle_timeout` (up to twice that, see [`Counted`]; at most a
    /// year is used).
    pub fn new(inner: TcpListener, max: usize, idle_timeout: Duration) -> Self {
        const YEAR: Duration = Duration::from_secs(365 * 86_400);
        Self {
            inner,
            open: Arc::new(Semaphore::new(max.clamp(1, Semaphore::MAX_PERMITS))),
            idle_timeout: idle_timeout.min(YEAR),
        }
    }
}

impl axum::serve::Listener for LimitedListener {
    type Io = Counted;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        // The semaphore is never closed, so this only waits for a slot.
        let slot = Arc::clone(&self.open).acquire_owned().await.ok();
        // axum's listener retries transient accept errors itself.
        let (stream, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        (
            Counted {
                stream,
                _slot: slot,
                idle_timeout: self.idle_timeout,
                check: Box::pin(tokio::time::sleep(self.idle_timeout)),
                active: false,
                unanswered: false,
                overdue: false,
            },
            addr,
        )
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// An accepted connection, holding its slot until it is dropped.
///
/// Idle time is checked once per idle timeout, not per read: bytes moved
/// only set flags, and when the check comes round a connection that moved
/// some gets another period, one that moved none is closed (the read or
/// write that waits fails with `TimedOut`, which ends it). So a connection
/// that moves nothing, silent or not reading what it is sent, lasts between
/// one and two idle timeouts, and a busy one costs a flag store or two per
/// read or write.
///
/// Bytes received make the connection *unanswered* until bytes are sent
/// back. One still unanswered at two checks in a row has waited at least a
/// whole idle timeout for an answer and is closed too. Every answer comes
/// well within that: the configuration keeps the idle timeout at least
/// twice the request timeout, and every route sits behind the router's
/// backstop timeout, so even a waiting request is answered by then. This
/// only ends requests that never finish arriving.
///
/// The check runs when a read or write waits (hyper keeps a read pending
/// while a handler runs, to notice a client that leaves); when none does,
/// it runs at the next one, which can only delay a cut, never hasten it.
#[derive(Debug)]
pub struct Counted {
    stream: TcpStream,
    _slot: Option<OwnedSemaphorePermit>,
    idle_timeout: Duration,
    check: Pin<Box<Sleep>>,
    /// Bytes read or written since the last check.
    active: bool,
    /// Bytes read since the last bytes written.
    unanswered: bool,
    /// Unanswered at the last check already.
    overdue: bool,
}

/// Answers up to this size are written as one joined buffer.
const JOIN_BYTES: usize = 4096;

thread_local! {
    /// Where a small answer's pieces are joined: one buffer per runtime
    /// thread, not per connection.
    static JOINED: std::cell::RefCell<Vec<u8>> =
        std::cell::RefCell::new(Vec::with_capacity(JOIN_BYTES));
}

impl Counted {
    /// Whether the connection has moved no bytes for a whole period, or
    /// left what it received unanswered for one.
    fn timed_out(&mut self, cx: &mut Context<'_>) -> bool {
        while self.check.as_mut().poll(cx).is_ready() {
            if !std::mem::take(&mut self.active) || self.overdue {
                return true;
            }
            self.overdue = self.unanswered;
            let next = Instant::now() + self.idle_timeout;
            self.check.as_mut().reset(next);
        }
        false
    }

    /// A write's result, noting progress, or `TimedOut` when it waits on a
    /// peer that has taken nothing for a whole period.
    fn wrote(
        &mut self,
        cx: &mut Context<'_>,
        written: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match written {
            Poll::Pending if self.timed_out(cx) => Poll::Ready(Err(io::ErrorKind::TimedOut.into())),
            Poll::Ready(Ok(n)) if n > 0 => {
                self.active = true;
                self.unanswered = false;
                self.overdue = false;
                Poll::Ready(Ok(n))
            }
            other => other,
        }
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Pending if this.timed_out(cx) => Poll::Ready(Err(io::ErrorKind::TimedOut.into())),
            Poll::Pending => Poll::Pending,
            ready => {
                if buf.filled().len() > before {
                    this.active = true;
                    this.unanswered = true;
                }
                ready
            }
        }
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let written = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.wrote(cx, written)
    }

    /// A small answer's head and body (at most [`JOIN_BYTES`] together)
    /// are copied into one buffer and sent with one plain `write`, measured
    /// a few per cent cheaper than a `writev` of the two (docs/performance.md);
    /// larger ones go out as they are, uncopied.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let total = bufs.iter().map(|buf| buf.len()).sum::<usize>();
        let written = if bufs.len() > 1 && total <= JOIN_BYTES {
            JOINED.with_borrow_mut(|joined| {
                joined.clear();
                for buf in bufs {
                    joined.extend_from_slice(buf);
                }
                Pin::new(&mut this.stream).poll_write(cx, joined)
            })
        } else {
            Pin::new(&mut this.stream).poll_write_vectored(cx, bufs)
        };
        this.wrote(cx, written)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Serves `GET /` with 200 (`GET /big` with 32 MiB, `GET /slow` after
    /// 150 ms) on a listener with these limits.
    async fn serve(max: usize, idle_timeout: Duration) -> SocketAddr {
        let inner = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = inner.local_addr().unwrap();
        let router = axum::Router::new()
            .route("/", axum::routing::get(|| async { "ok" }))
            .route(
                "/big",
                axum::routing::get(|| async { vec![b'x'; 32 << 20] }),
            )
            .route(
                "/slow",
                axum::routing::get(|| async {
                    tokio::time::sleep(Duration::from_millis(150)).await;
                    "ok"
                }),
            );
        tokio::spawn(async move {
            axum::serve(LimitedListener::new(inner, max, idle_timeout), router).await
        });
        addr
    }

    /// Sends `GET path` on `stream`.
    async fn get(stream: &mut TcpStream, path: &str) {
        let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
    }

    /// Reads until the server closes the connection or `within` passes.
    async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 1024];
        let deadline = Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
                Err(_) => return false,
                Ok(Ok(0) | Err(_)) => return true,
                Ok(Ok(_)) => {}
            }
        }
    }

    #[tokio::test]
    async fn silent_connections_are_closed_and_busy_ones_kept() {
        let idle = Duration::from_millis(200);
        let addr = serve(10, idle).await;
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut busy = TcpStream::connect(addr).await.unwrap();
        // The busy one asks something every 100 ms for a second.
        let asking = tokio::spawn(async move {
            for _ in 0..10 {
                get(&mut busy, "/").await;
                let mut buf = [0u8; 1024];
                let n = busy.read(&mut buf).await.unwrap();
                assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        assert!(closed_within(&mut silent, Duration::from_secs(5)).await);
        asking.await.unwrap();
    }

    #[tokio::test]
    async fn a_request_that_never_finishes_arriving_is_cut() {
        let idle = Duration::from_millis(200);
        let addr = serve(10, idle).await;
        let mut trickling = TcpStream::connect(addr).await.unwrap();
        trickling.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        // One byte of a header every 50 ms, for at most 5 s: never idle,
        // never a whole request.
        let mut cut = false;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if trickling.write_all(b"x").await.is_err() {
                cut = true;
                break;
            }
        }
        assert!(
            cut || closed_within(&mut trickling, Duration::ZERO).await,
            "a trickled request head kept its connection"
        );
    }

    #[tokio::test]
    async fn answers_slower_than_a_check_period_are_not_cut() {
        // Each answer takes 150 ms of a 200 ms idle timeout, so the checks
        // fall while requests are unanswered; none may be cut.
        let addr = serve(10, Duration::from_millis(200)).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        for _ in 0..8 {
            get(&mut client, "/slow").await;
            let mut buf = [0u8; 1024];
            let n = client.read(&mut buf).await.unwrap();
            assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{n} bytes");
        }
    }

    #[tokio::test]
    async fn a_connection_past_the_cap_waits_for_a_slot() {
        let addr = serve(1, Duration::from_secs(60)).await;
        let mut first = TcpStream::connect(addr).await.unwrap();
        get(&mut first, "/").await;
        let mut buf = [0u8; 1024];
        assert!(first.read(&mut buf).await.unwrap() > 0);
        let mut second = TcpStream::connect(addr).await.unwrap();
        get(&mut second, "/").await;
        let waiting = tokio::time::timeout(Duration::from_millis(200), second.read(&mut buf)).await;
        assert!(waiting.is_err(), "served past the cap");
        drop(first);
        let served = tokio::time::timeout(Duration::from_secs(5), second.read(&mut buf)).await;
        assert!(matches!(served, Ok(Ok(n)) if n > 0), "{served:?}");
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_gives_its_slot_back() {
        let addr = serve(1, Duration::from_millis(200)).await;
        // Asks for far more than the socket buffers hold, then reads nothing.
        let mut stalled = TcpStream::connect(addr).await.unwrap();
        get(&mut stalled, "/big").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut next = TcpStream::connect(addr).await.unwrap();
        get(&mut next, "/").await;
        let mut buf = [0u8; 1024];
        let served = tokio::time::timeout(Duration::from_secs(5), next.read(&mut buf)).await;
        assert!(matches!(served, Ok(Ok(n)) if n > 0), "{served:?}");
        drop(stalled);
    }
}
