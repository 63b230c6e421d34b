//! What the client and the node share about gRPC connections.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

/// Snapshot chunks and entry batches can be several MiB; tonic's default cap is 4 MiB.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// An endpoint for `addr` ("host:port") with the settings every connection uses.
pub fn endpoint(
    addr: &str,
    connect_timeout: Duration,
) -> Result<Endpoint, tonic::transport::Error> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true))
}

/// A lazily connecting channel to `addr` ("host:port").
pub fn channel(addr: &str, connect_timeout: Duration) -> Result<Channel, tonic::transport::Error> {
    Ok(endpoint(addr, connect_timeout)?.connect_lazy())
}
