//! The gRPC ports' listener. It accepts continuously and hands the server only
//! connections that complete the TLS handshake (when the port serves TLS) and
//! open with the HTTP/2 preface in time; it closes connections
//! that carry no request for `idle_timeout`; and it keeps open connections
//! within a cap derived from the file-descriptor limit. At the cap a new
//! connection pushes out an idle one — one that never carried a request first,
//! then the one idle the longest — so connections that carry requests (Raft
//! traffic between nodes, followers forwarding to the leader, watches) are not
//! crowded out by idle ones.

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::task::AtomicWaker;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Sleep;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::config::ConnectionLimits;
use crate::raft::replication::peer_trust::PeerCertificate;

/// Every HTTP/2 connection opens with these bytes (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// File descriptors kept from client connections for sled, the runtime, Raft
/// and forwarding channels to peers, and metrics scrapes.
const FD_RESERVE: usize = 128;
/// Below this many connections a node is barely usable; the cap never goes lower.
const MIN_CONNECTIONS: usize = 32;
/// Evicted connections close as soon as their task runs; until then this many
/// more may be open than the cap.
const EVICTION_SLACK: usize = 64;
/// How long a plaintext client on a TLS port gets to read the GOAWAY that
/// tells it so and hang up.
const LINGER: Duration = Duration::from_secs(2);
/// Warnings about the cap or accept errors are logged at most this often.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the soft limit in force.
pub fn raise_fd_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => {
            tracing::info!(limit, "file descriptor limit");
            limit
        }
        Err(e) => {
            let limit = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft);
            tracing::warn!(limit, "cannot raise the file descriptor limit: {e}");
            limit
        }
    }
}

/// The configured connection cap, or what `fd_limit` leaves after the reserve
/// and one descriptor per concurrent health probe.
pub fn max_connections(limits: &ConnectionLimits, fd_limit: u64, probes: usize) -> usize {
    if let Some(max) = limits.max_connections {
        return max;
    }
    let fds = usize::try_from(fd_limit).unwrap_or(usize::MAX);
    let max = fds.saturating_sub(FD_RESERVE + probes);
    if max < MIN_CONNECTIONS {
        tracing::warn!(
            fd_limit,
            probes,
            "file descriptor limit too low for {probes} concurrent probes; allowing {MIN_CONNECTIONS} connections"
        );
    }
    max.max(MIN_CONNECTIONS)
}

/// What one connection is doing, shared by its I/O, its requests and the cap.
struct Activity {
    epoch: Instant,
    /// Requests whose response has not finished.
    in_flight: AtomicUsize,
    /// Whether the connection ever carried a request.
    used: AtomicBool,
    /// Milliseconds after `epoch` when the last request finished (or the connection was accepted).
    last_active: AtomicU64,
    evicted: AtomicBool,
    /// The task that owns the connection, woken on eviction.
    waker: AtomicWaker,
}

impl Activity {
    fn new(epoch: Instant) -> Self {
        let a = Activity {
            epoch,
            in_flight: AtomicUsize::new(0),
            used: AtomicBool::new(false),
            last_active: AtomicU64::new(0),
            evicted: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        };
        a.touch();
        a
    }

    fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_active.store(ms, Ordering::Release);
    }

    /// When the connection became idle; `None` while a request is in flight.
    fn idle_since(&self) -> Option<Instant> {
        (self.in_flight.load(Ordering::Acquire) == 0)
            .then(|| self.epoch + Duration::from_millis(self.last_active.load(Ordering::Acquire)))
    }

    fn is_evicted(&self) -> bool {
        self.evicted.load(Ordering::Acquire)
    }

    fn evict(&self) {
        self.evicted.store(true, Ordering::Release);
        self.waker.wake();
    }

    async fn evicted(&self) {
        poll_fn(|cx| {
            self.waker.register(cx.waker());
            if self.is_evicted() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }
}

/// The open connections of one listener.
struct Tracker {
    epoch: Instant,
    max: usize,
    open: Mutex<Open>,
}

#[derive(Default)]
struct Open {
    next_id: u64,
    conns: HashMap<u64, Arc<Activity>>,
    /// Of `conns`, those told to close.
    evicted: usize,
}

enum Admission {
    Admitted(Slot),
    /// Admitted after telling the longest idle connection to close.
    Replacing(Slot),
    /// At the cap and every connection busy.
    Refused,
}

impl Tracker {
    fn admit(self: &Arc<Self>) -> Admission {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let live = open.conns.len() - open.evicted;
        let mut replacing = false;
        if live >= self.max {
            if open.conns.len() >= self.max + EVICTION_SLACK {
                return Admission::Refused;
            }
            // Connections that never carried a request go first, so a burst of
            // new ones cannot push out a peer's between two heartbeats.
            let Some(victim) = open
                .conns
                .values()
                .filter(|a| !a.is_evicted())
                .filter_map(|a| {
                    let since = a.idle_since()?;
                    Some(((a.used.load(Ordering::Acquire), since), a))
                })
                .min_by_key(|(rank, _)| *rank)
                .map(|(_, a)| a)
            else {
                return Admission::Refused;
            };
            victim.evict();
            open.evicted += 1;
            replacing = true;
        }
        let id = open.next_id;
        open.next_id += 1;
        let activity = Arc::new(Activity::new(self.epoch));
        open.conns.insert(id, activity.clone());
        let slot = Slot {
            tracker: self.clone(),
            id,
            activity,
        };
        if replacing {
            Admission::Replacing(slot)
        } else {
            Admission::Admitted(slot)
        }
    }
}

/// A place under the cap; freed when the connection closes.
struct Slot {
    tracker: Arc<Tracker>,
    id: u64,
    activity: Arc<Activity>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self
            .tracker
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if open.conns.remove(&self.id).is_some() && self.activity.is_evicted() {
            open.evicted -= 1;
        }
    }
}

/// Lets a warning through at most every `WARN_EVERY`.
#[derive(Default)]
pub struct Throttle(Option<Instant>);

impl Throttle {
    pub fn due(&mut self) -> bool {
        let due = self.0.is_none_or(|t| t.elapsed() >= WARN_EVERY);
        if due {
            self.0 = Some(Instant::now());
        }
        due
    }
}

/// After a failed accept: nothing if the client gave up before it was
/// accepted; otherwise (out of descriptors or buffers) a warning and a pause,
/// since retrying at once would spin.
pub async fn accept_failed(e: io::Error, warn: &mut Throttle) {
    if matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    ) {
        return;
    }
    if warn.due() {
        tracing::warn!("accept: {e}");
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// Where a TLS port takes its configuration for each new connection (it
/// changes when certificates are reloaded).
pub type TlsSource = Arc<dyn Fn() -> Arc<ServerConfig> + Send + Sync>;

/// Accepts on `listener` until the returned stream is dropped (the server
/// stopped); with `tls`, each connection is a TLS one.
pub fn incoming(
    listener: TcpListener,
    limits: &ConnectionLimits,
    max: usize,
    tls: Option<TlsSource>,
) -> ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(64);
    let tracker = Arc::new(Tracker {
        epoch: Instant::now(),
        max,
        open: Mutex::default(),
    });
    let handshake = Duration::from_millis(limits.handshake_timeout_ms);
    let idle = Duration::from_millis(limits.idle_timeout_ms);
    tracing::info!(max_connections = max, "accepting connections");
    tokio::spawn(async move {
        let mut warn = Throttle::default();
        loop {
            let accepted = tokio::select! {
                () = tx.closed() => return,
                a = listener.accept() => a,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    accept_failed(e, &mut warn).await;
                    continue;
                }
            };
            let slot = match tracker.admit() {
                Admission::Admitted(slot) => slot,
                Admission::Replacing(slot) => {
                    if warn.due() {
                        tracing::warn!(max, "connection limit reached: closing idle connections");
                    }
                    slot
                }
                // Closing at once keeps the kernel's backlog from filling up.
                Admission::Refused => {
                    if warn.due() {
                        tracing::warn!(max, "connection limit reached, all busy: refusing");
                    }
                    continue;
                }
            };
            // Without TCP_NODELAY small replies wait for delayed ACKs (~40 ms on Linux).
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!("TCP_NODELAY: {e}");
            }
            // Per connection, so a slow or silent client holds up no one.
            let tls = tls.as_ref().map(|source| TlsAcceptor::from(source()));
            tokio::spawn(await_preface(
                stream,
                tls,
                slot,
                handshake,
                idle,
                tx.clone(),
            ));
        }
    });
    ReceiverStream::new(rx)
}

/// Hands the connection to the server once it has completed the TLS
/// handshake (with `tls`) and sent the HTTP/2 preface, both within `within`;
/// otherwise drops (closes) it.
async fn await_preface(
    stream: TcpStream,
    tls: Option<TlsAcceptor>,
    slot: Slot,
    within: Duration,
    idle: Duration,
    server: mpsc::Sender<io::Result<Conn>>,
) {
    let tcp = stream.connect_info();
    let opened = async {
        let (mut io, peer_cert) = match tls {
            Some(_) if sends_plaintext_http2(&stream).await => {
                tell_to_use_tls(stream).await;
                return None;
            }
            Some(acceptor) => match acceptor.accept(stream).await {
                Ok(s) => {
                    let cert = s.get_ref().1.peer_certificates().and_then(|c| c.first());
                    let cert = cert.map(PeerCertificate::of);
                    (Io::Tls(Box::new(s)), cert)
                }
                Err(e) => {
                    tracing::debug!(remote = ?tcp.remote_addr(), "TLS handshake: {e}");
                    return None;
                }
            },
            None => (Io::Plain(stream), None),
        };
        let mut preface = [0u8; PREFACE.len()];
        io.read_exact(&mut preface).await.ok()?;
        (&preface == PREFACE).then_some((io, peer_cert))
    };
    let opened = tokio::select! {
        r = tokio::time::timeout(within, opened) => r,
        () = slot.activity.evicted() => return,
    };
    let Ok(Some((io, peer_cert))) = opened else {
        return;
    };
    let conn = Conn {
        io,
        tcp,
        peer_cert,
        replayed: 0,
        slot,
        idle_timeout: idle,
        idle: Box::pin(tokio::time::sleep(idle)),
    };
    // Fails only when the server has stopped; the connection is dropped then.
    let _ = server.send(Ok(conn)).await;
}

/// Whether a client opened with HTTP/2's preface, not a TLS handshake.
async fn sends_plaintext_http2(stream: &TcpStream) -> bool {
    let mut first = [0u8; 1];
    matches!(stream.peek(&mut first).await, Ok(1) if first[0] == PREFACE[0])
}

/// Answers a plaintext HTTP/2 client on a TLS port with a GOAWAY that says
/// why, which gRPC clients show, instead of a bare protocol error.
async fn tell_to_use_tls(mut stream: TcpStream) {
    const WHY: &[u8] = b"this port serves TLS: connect with TLS (roster --cacert, https://)";
    let mut frames = Vec::with_capacity(9 + 9 + 8 + WHY.len());
    // An empty SETTINGS frame: the server's connection preface.
    frames.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
    // GOAWAY, no stream processed, PROTOCOL_ERROR, the reason as debug data.
    let len = u32::try_from(8 + WHY.len()).unwrap_or(0).to_be_bytes();
    frames.extend_from_slice(&[len[1], len[2], len[3], 0x7, 0, 0, 0, 0, 0]);
    frames.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0x1]);
    frames.extend_from_slice(WHY);
    let mut preface = [0u8; PREFACE.len()];
    if stream.read_exact(&mut preface).await.is_ok() {
        answer_and_close(stream, &frames).await;
    }
}

/// Writes `answer` to a plaintext client of a TLS port and closes.
pub async fn answer_and_close(mut stream: TcpStream, answer: &[u8]) {
    if stream.write_all(answer).await.is_err() {
        return;
    }
    let _ = stream.shutdown().await;
    // Closing with the client's bytes unread would send a reset, which can
    // reach the client before the answer does: read until it hangs up.
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(LINGER, async {
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// A connection's bytes: as they come, or through TLS.
enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// An accepted connection that sent the HTTP/2 preface.
pub struct Conn {
    io: Io,
    tcp: TcpConnectInfo,
    /// What the client's TLS certificate names, read once per connection.
    peer_cert: Option<PeerCertificate>,
    /// Bytes of the preface (read for the check) already passed on to the server.
    replayed: usize,
    slot: Slot,
    idle_timeout: Duration,
    idle: Pin<Box<Sleep>>,
}

/// What a request learns of its connection (a request extension).
#[derive(Clone)]
pub struct ConnInfo {
    activity: Arc<Activity>,
    /// The addresses, which `TrackRequests` passes on for `Request::remote_addr`.
    tcp: TcpConnectInfo,
    /// Passed on by `TrackRequests` for the peer port's checks.
    peer_cert: Option<PeerCertificate>,
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        ConnInfo {
            activity: self.slot.activity.clone(),
            tcp: self.tcp.clone(),
            peer_cert: self.peer_cert.clone(),
        }
    }
}

impl Conn {
    /// With nothing to read: an error closes the connection if it was evicted
    /// or idle too long; otherwise the idle timer is armed to look again.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let activity = &self.slot.activity;
        loop {
            if activity.is_evicted() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "closed for a new connection at the connection limit",
                )));
            }
            let now = tokio::time::Instant::now();
            match activity.idle_since() {
                Some(since) => {
                    let deadline = tokio::time::Instant::from_std(since + self.idle_timeout);
                    if deadline <= now {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "no request within the idle timeout",
                        )));
                    }
                    if self.idle.deadline() != deadline {
                        self.idle.as_mut().reset(deadline);
                    }
                }
                // Requests finish in other tasks; look again one timeout from now.
                None if self.idle.deadline() <= now => {
                    self.idle.as_mut().reset(now + self.idle_timeout);
                }
                None => {}
            }
            if self.idle.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.replayed < PREFACE.len() {
            let rest = &PREFACE[this.replayed..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.replayed += n;
            return Poll::Ready(Ok(()));
        }
        this.slot.activity.waker.register(cx.waker());
        if this.slot.activity.is_evicted() {
            return this.poll_idle(cx);
        }
        // Bytes already here (a request racing the idle timer) are read first.
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Pending => this.poll_idle(cx),
            ready => ready,
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// One stream or the other, to `Conn`.
macro_rules! either_io {
    ($io:expr, $s:ident => $e:expr) => {
        match $io {
            Io::Plain($s) => $e,
            Io::Tls($s) => $e,
        }
    };
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        either_io!(self.get_mut(), s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        either_io!(self.get_mut(), s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        either_io!(self.get_mut(), s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        either_io!(self, s => s.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        either_io!(self.get_mut(), s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        either_io!(self.get_mut(), s => Pin::new(s).poll_shutdown(cx))
    }
}

/// Counts each request as in flight on its connection until its response
/// body has been sent (or dropped), which is what the idle timer watches.
/// Also gives each request its connection's addresses (`TcpConnectInfo`), as
/// tonic does for a plain `TcpStream`, and what its client certificate
/// names (`PeerCertificate`), when it has one.
#[derive(Clone, Copy, Debug, Default)]
pub struct TrackRequestsLayer;

impl<S> tower::Layer<S> for TrackRequestsLayer {
    type Service = TrackRequests<S>;

    fn layer(&self, inner: S) -> TrackRequests<S> {
        TrackRequests { inner }
    }
}

#[derive(Clone, Debug)]
pub struct TrackRequests<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, Req, Res> tower::Service<http::Request<Req>> for TrackRequests<S>
where
    S: tower::Service<http::Request<Req>, Response = http::Response<Res>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Tracked<Res>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Req>) -> Self::Future {
        let conn = req.extensions().get::<ConnInfo>().cloned();
        let in_flight = conn.map(|c| {
            req.extensions_mut().insert(c.tcp);
            if let Some(cert) = c.peer_cert {
                req.extensions_mut().insert(cert);
            }
            InFlight::start(c.activity)
        });
        let response = self.inner.call(req);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| Tracked {
                body,
                _in_flight: in_flight,
            }))
        })
    }
}

struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        activity.used.store(true, Ordering::Release);
        InFlight(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // Stamp first, so the connection never looks idle since before this request.
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request counted until it is done.
pub struct Tracked<B> {
    body: B,
    _in_flight: Option<InFlight>,
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_leaves_room_for_the_node_itself() {
        let limits = ConnectionLimits::default();
        assert_eq!(max_connections(&limits, 1024, 512), 1024 - 128 - 512);
        assert_eq!(max_connections(&limits, 256, 512), MIN_CONNECTIONS);
        let fixed = ConnectionLimits {
            max_connections: Some(10),
            ..ConnectionLimits::default()
        };
        assert_eq!(max_connections(&fixed, 1024, 512), 10);
    }
}
