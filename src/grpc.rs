//! What the client and the node share about gRPC connections.

use std::time::Duration;

use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

/// Snapshot chunks and entry batches can be several MiB; tonic's default cap is 4 MiB.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// An endpoint for `addr` ("host:port") with the settings every connection
/// uses; TLS when `tls` is given (the host is the name the server's
/// certificate must carry).
pub fn endpoint(
    addr: &str,
    connect_timeout: Duration,
    tls: Option<&ClientTlsConfig>,
) -> Result<Endpoint, tonic::transport::Error> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true);
    match tls {
        Some(tls) => endpoint.tls_config(tls.clone()),
        None => Ok(endpoint),
    }
}

/// A lazily connecting channel to `addr` ("host:port").
pub fn channel(
    addr: &str,
    connect_timeout: Duration,
    tls: Option<&ClientTlsConfig>,
) -> Result<Channel, tonic::transport::Error> {
    Ok(endpoint(addr, connect_timeout, tls)?.connect_lazy())
}

/// Response header a follower adds to an answer it forwarded from the leader:
/// the client then sends its next write to another node.
pub const FORWARDED_HEADER: &str = "roster-forwarded";

/// The leader's client address (`host:port`), where a node knows it: on a
/// refusal that names the leader, and on an answer forwarded to it. A client
/// that has that address among its endpoints sends its next write there.
pub const LEADER_ADDRESS_HEADER: &str = "roster-leader-address";

/// Response header on an answer a node that does not lead gave from its own
/// state (a stale read, a watch, its status): how many milliseconds ago it
/// last heard from a leader, or `none` if it has heard from none since it
/// started. The answer holds no write acknowledged after that contact. Only
/// the node (`api::forward`, `http`) names it.
#[cfg(feature = "server")]
pub const LEADER_CONTACT_HEADER: &str = "roster-leader-contact-ms";
