//! `eventflow healthcheck`: a dependency-free HTTP probe of `/healthz`, so
//! that container images need no shell or curl for their health check. It
//! probes the admin listener when `server.admin_addr` is set (health is
//! served only there then), else `server.addr`.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

use crate::config::{ConfigError, ServerSettings};

/// How long the probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the probe failed.
#[derive(Debug, thiserror::Error)]
pub enum HealthcheckError {
    /// The configured address is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// No connection or no answer.
    #[error("cannot reach {addr}: {source}")]
    Io {
        /// Where the probe went.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// An answer other than 200.
    #[error("unhealthy: {0}")]
    Status(String),
}

/// Probes `GET /healthz` on the admin listener if there is one, else on the
/// service's port (on loopback when it listens on all interfaces).
pub fn check(server: &ServerSettings) -> Result<(), HealthcheckError> {
    let mut addr = match server.admin_socket_addr()? {
        Some(admin) => admin,
        None => server.socket_addr()?,
    };
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            Ipv4Addr::LOCALHOST.into()
        } else {
            Ipv6Addr::LOCALHOST.into()
        });
    }
    let io = |source| HealthcheckError::Io { addr, source };
    let mut stream = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT).map_err(io)?;
    stream.set_read_timeout(Some(PROBE_TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(PROBE_TIMEOUT)).map_err(io)?;
    stream
        .write_all(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .map_err(io)?;
    let mut answer = Vec::new();
    stream.take(4096).read_to_end(&mut answer).map_err(io)?;
    let status_line = String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    if status_line.split_whitespace().nth(1) == Some("200") {
        Ok(())
    } else {
        Err(HealthcheckError::Status(status_line))
    }
}
