//! Loopback ports for test and benchmark clusters.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::sync::Mutex;

/// Ports this test process has handed out. None is handed out twice, so the
/// nodes of one cluster, and clusters of tests running in parallel, never
/// collide; another process may still take a port between the check and the
/// node's bind, which a cluster's start survives by starting again.
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// A port free now, below the kernel's ephemeral range (32768 and up here):
/// a port the kernel handed out and took back can be given at once to some
/// other process's outgoing connection before the node binds it.
pub fn free_port() -> u16 {
    loop {
        let port = fastrand::u16(20_000..32_000);
        let fresh = HANDED_OUT
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(port);
        if fresh && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}
