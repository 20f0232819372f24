//! Opening an HTTP/1.1 connection to the service: shared by the load
//! connections, the verifier and the metrics sampler.

use std::io;

use hyper::body::Body;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Connects to `host:port` and drives the connection in a background task;
/// the returned sender issues requests on it (keep-alive).
pub(crate) async fn connect<B>(host: &str, port: u16) -> io::Result<http1::SendRequest<B>>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect((host, port)).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(io::Error::other)?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}
