//! Serving connections: hyper's HTTP/1.1 connection with its own timers,
//! one task per connection, a cap on open connections, graceful shutdown.
//!
//! What libraries do, each with `server.idle_timeout`:
//! - hyper closes a connection whose next request head has not fully
//!   arrived in time (`header_read_timeout`): a client trickling a head,
//!   and a keep-alive connection left idle, since hyper starts that timer
//!   whenever it waits for a head;
//! - `tokio-io-timeout` fails a write the client has not taken in time
//!   (hyper has no write timeout: hyper#1628), which ends a connection
//!   whose client stopped reading its answer;
//! - `hyper-util`'s `GracefulShutdown` closes idle connections at shutdown
//!   and lets busy ones finish their answer.
//!
//! At shutdown a connection with no request in progress (idle, or still
//! receiving a head it may never finish) does not hold the exit: once
//! every answer under way is sent, the rest are closed at once.
//!
//! (A body that arrives too slowly is the body reader's business, with
//! `server.request_timeout` per chunk in `api::body`, and the backstop
//! timeout's in `api::layered`.)
//!
//! What is ours: the caps. At `server.max_connections` the listener stops
//! accepting and new connections wait in the kernel's backlog until one
//! closes; without it a flood of connections grows memory up to the file
//! descriptor limit. A client address that holds
//! `server.max_connections_per_client` already has its next connection
//! closed as soon as it is accepted (a 503 written if the socket takes it
//! at once), so that one client cannot take the cap from the others;
//! trusted proxies, which speak for many clients, are exempt.
//!
//! hyper's write buffer is `CONNECTION_BUFFER` (its read buffer too, and so
//! the longest request head), rather than its default ~400 KiB: answers
//! held in memory are the answers' budget's business (`api::answer`), and
//! what every connection may hold on top is kept small.
//!
//! HTTP/1.1 only: hyper-util's protocol-sniffing connection runs no timer
//! until it has picked HTTP/1 or 2, so a client that sends nothing would
//! hold its slot; load balancers speak HTTP/1.1 to their targets anyway.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_io_timeout::TimeoutStream;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// How connections are limited.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Connections open at once (`server.max_connections`).
    pub max_connections: usize,
    /// Connections one client address holds at once
    /// (`server.max_connections_per_client`).
    pub per_client: usize,
    /// Addresses exempt from `per_client` (`server.trusted_proxies`).
    pub trusted: Arc<[ipnet::IpNet]>,
    /// Counts connections refused for `per_client`.
    pub refused: metrics::Counter,
    /// Wait for a request head, or for the client to take a write
    /// (`server.idle_timeout`).
    pub idle_timeout: Duration,
    /// Give each request its peer's address (`ConnectInfo`): only the rate
    /// limit reads it, and it costs an extensions map per request.
    pub peer_address: bool,
}

/// Serves `router` on `listener` until `stop` is cancelled, then stops
/// accepting and waits for the open connections to finish (idle ones are
/// closed at once). Dropping the future closes every connection.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    stop: CancellationToken,
) {
    const YEAR: Duration = Duration::from_secs(365 * 86_400);
    let idle_timeout = limits.idle_timeout.min(YEAR);
    let slots = Arc::new(Semaphore::new(
        limits.max_connections.clamp(1, Semaphore::MAX_PERMITS),
    ));
    let clients = Arc::new(Clients::default());
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .max_buf_size(CONNECTION_BUFFER)
        .header_read_timeout(idle_timeout)
        .keep_alive(true)
        // A small answer's head and body go out as one buffer in one
        // `write`, measured a few per cent cheaper than a `writev` of the
        // two (docs/performance.md).
        .writev(false);
    let graceful = GracefulShutdown::new();
    let answering = Answering::default();
    // Dropping the set aborts every connection task.
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        // The semaphore is never closed, so this only waits for a slot.
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => slot.ok(),
            () = stop.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    accept_failed(&error).await;
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        let Some(client_slot) = clients.admit(peer.ip(), &limits) else {
            limits.refused.increment(1);
            refuse(&stream);
            drop(slot);
            continue;
        };
        // Answers are small and latency matters more than packet count.
        let _ = stream.set_nodelay(true);
        let mut stream = TimeoutStream::new(stream);
        stream.set_write_timeout(Some(idle_timeout));
        let io = TokioIo::new(Box::pin(stream));
        let router = router.clone();
        let peer_address = limits.peer_address;
        let answering = answering.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            if peer_address {
                request.extensions_mut().insert(ConnectInfo(peer));
            }
            // Counted from the head's arrival until the answer's last byte.
            let answer = answering.begin();
            let response = router.clone().oneshot(request.map(axum::body::Body::new));
            async move {
                let response = response.await?;
                Ok::<_, std::convert::Infallible>(response.map(|body| {
                    axum::body::Body::new(Counted {
                        body,
                        _answer: answer,
                    })
                }))
            }
        });
        let connection = graceful.watch(http.serve_connection(io, service));
        connections.spawn(async move {
            if let Err(error) = connection.await {
                // A client that left, timed out or sent garbage: routine.
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
            drop(slot);
            drop(client_slot);
        });
    }
    drop(listener);
    // Connections finish their answers; what no answer holds (an idle
    // connection, a head that may never finish) is dropped once the last
    // answer is sent.
    let finished = async {
        graceful.shutdown().await;
        while connections.join_next().await.is_some() {}
    };
    tokio::select! {
        () = finished => {}
        () = answering.none() => {}
    }
}

/// hyper's buffer size for each connection (read and write).
const CONNECTION_BUFFER: usize = 64 * 1024;

/// Connections each client address holds now.
#[derive(Debug, Default)]
struct Clients(parking_lot::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

impl Clients {
    /// A place for one more connection from `peer`, unless it holds
    /// `limits.per_client` already (trusted proxies always get one).
    fn admit(
        self: &Arc<Self>,
        peer: std::net::IpAddr,
        limits: &ConnectionLimits,
    ) -> Option<ClientSlot> {
        let peer = peer.to_canonical();
        if super::limit::trusted(&limits.trusted, peer) {
            return Some(ClientSlot(None));
        }
        let client = super::limit::per_host(peer);
        let mut counts = self.0.lock();
        let held = counts.entry(client).or_insert(0);
        if *held >= limits.per_client {
            return None;
        }
        *held += 1;
        Some(ClientSlot(Some((Arc::clone(self), client))))
    }
}

/// One connection counted against its client address, until dropped.
struct ClientSlot(Option<(Arc<Clients>, std::net::IpAddr)>);

impl Drop for ClientSlot {
    fn drop(&mut self) {
        if let Some((clients, client)) = self.0.take() {
            let mut counts = clients.0.lock();
            if let Some(held) = counts.get_mut(&client) {
                *held -= 1;
                if *held == 0 {
                    counts.remove(&client);
                }
            }
        }
    }
}

/// Writes a 503 to a refused connection if its socket takes it at once
/// (never waiting on a client that floods us), then closes it.
fn refuse(stream: &tokio::net::TcpStream) {
    static REFUSAL: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
        let problem = super::ApiError::TooManyConnections.problem();
        let body = serde_json::to_string(&problem).unwrap_or_default();
        format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\n\
             retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    });
    let _ = stream.try_write(&REFUSAL);
}

/// Requests whose answers are under way, on every connection.
#[derive(Debug, Clone, Default)]
struct Answering(Arc<(std::sync::atomic::AtomicUsize, tokio::sync::Notify)>);

impl Answering {
    fn begin(&self) -> AnswerGuard {
        self.0.0.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        AnswerGuard(self.clone())
    }

    /// Resolves once no answer is under way.
    async fn none(&self) {
        loop {
            let changed = self.0.1.notified();
            if self.0.0.load(std::sync::atomic::Ordering::Acquire) == 0 {
                return;
            }
            changed.await;
        }
    }
}

/// One answer under way, until dropped.
#[derive(Debug)]
struct AnswerGuard(Answering);

impl Drop for AnswerGuard {
    fn drop(&mut self) {
        if self.0.0.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == 1 {
            self.0.0.1.notify_waiters();
        }
    }
}

/// A response body that keeps its request counted until its last byte is
/// taken (or the connection drops it).
struct Counted {
    body: axum::body::Body,
    /// Dropped with the body.
    _answer: AnswerGuard,
}

impl hyper::body::Body for Counted {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// After a failed `accept`: a connection that failed before it was
/// accepted is the client's business; anything else (out of file
/// descriptors) is logged and retried after a pause, as axum's `serve` does.
async fn accept_failed(error: &std::io::Error) {
    use std::io::ErrorKind;
    if matches!(
        error.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(%error, "accepting a connection failed; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use tokio::time::Instant;

    use super::*;

    /// Serves `GET /` with 200 (`GET /big` with 32 MiB, `GET /slow` after
    /// 150 ms) with these limits.
    async fn start(max: usize, idle_timeout: Duration) -> (SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
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
            )
            .route(
                "/peer",
                axum::routing::get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move {
                    peer.to_string()
                }),
            );
        let stop = CancellationToken::new();
        let limits = ConnectionLimits {
            max_connections: max,
            per_client: max,
            trusted: Arc::new([]),
            refused: metrics::Counter::noop(),
            idle_timeout,
            peer_address: true,
        };
        tokio::spawn(serve(listener, router, limits, stop.clone()));
        (addr, stop)
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
    async fn idle_keep_alive_connections_are_closed_and_busy_ones_kept() {
        let (addr, _stop) = start(10, Duration::from_millis(300)).await;
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut idle_after_a_request = TcpStream::connect(addr).await.unwrap();
        get(&mut idle_after_a_request, "/").await;
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
        assert!(closed_within(&mut idle_after_a_request, Duration::from_secs(5)).await);
        asking.await.unwrap();
    }

    #[tokio::test]
    async fn a_request_head_that_never_finishes_arriving_is_cut() {
        let (addr, _stop) = start(10, Duration::from_millis(300)).await;
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
    async fn answers_slower_than_the_idle_timeout_are_not_cut() {
        // Each answer takes 150 ms of a 100 ms idle timeout: a handler at
        // work is not idleness.
        let (addr, _stop) = start(10, Duration::from_millis(100)).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        for _ in 0..4 {
            get(&mut client, "/slow").await;
            let mut buf = [0u8; 1024];
            let n = client.read(&mut buf).await.unwrap();
            assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{n} bytes");
        }
    }

    #[tokio::test]
    async fn a_connection_past_the_cap_waits_for_a_slot() {
        let (addr, _stop) = start(1, Duration::from_secs(60)).await;
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
    async fn a_client_that_stops_reading_its_answer_gives_its_slot_back() {
        let (addr, _stop) = start(1, Duration::from_millis(200)).await;
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

    #[tokio::test]
    async fn handlers_see_the_peer_address() {
        let (addr, _stop) = start(10, Duration::from_secs(60)).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        let local = client.local_addr().unwrap();
        get(&mut client, "/peer").await;
        let mut buf = [0u8; 1024];
        let n = client.read(&mut buf).await.unwrap();
        let answer = String::from_utf8_lossy(&buf[..n]);
        assert!(answer.ends_with(&local.to_string()), "{answer}");
    }

    #[tokio::test]
    async fn stopping_closes_idle_connections_and_finishes_busy_ones() {
        let (addr, stop) = start(10, Duration::from_secs(60)).await;
        let mut idle = TcpStream::connect(addr).await.unwrap();
        get(&mut idle, "/").await;
        let mut buf = [0u8; 1024];
        assert!(idle.read(&mut buf).await.unwrap() > 0);
        let mut busy = TcpStream::connect(addr).await.unwrap();
        get(&mut busy, "/slow").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        stop.cancel();
        assert!(closed_within(&mut idle, Duration::from_secs(5)).await);
        let n = busy.read(&mut buf).await.unwrap();
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200"),
            "the busy one got its answer"
        );
        assert!(
            TcpStream::connect(addr).await.is_err()
                || closed_within(
                    &mut TcpStream::connect(addr).await.unwrap(),
                    Duration::from_secs(1)
                )
                .await,
            "no new connection is served"
        );
    }
}
