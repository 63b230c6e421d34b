//! A fault-injecting TCP proxy for the links between nodes. This kernel has no
//! netem, so delay, jitter, loss, partitions and bandwidth caps are simulated
//! in user space, per direction, on the byte stream: TCP never loses data, so
//! "loss" is what the application sees of it, a retransmission stall.
//!
//! Each direction of a connection is a reader that stamps every chunk it reads
//! with the time it may be delivered, and a writer that delivers chunks in
//! order once that time has come, the direction is not blocked, and the
//! bandwidth cap allows. The accept itself is never delayed: a peer connects at
//! once and only its data waits.
//!
//! Rules keyed by a connection's source IP (`set_from`) override the
//! proxy-wide setting for that source: with nodes at distinct addresses (see
//! `netns`) one proxy can slow the link from one peer and not from another.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{sleep_until, Instant};

/// How one direction of the proxied link behaves.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Link {
    /// One-way delay added to every byte in this direction.
    pub delay: Duration,
    /// Extra uniform random 0..jitter per chunk; never reorders chunks.
    pub jitter: Duration,
    /// Probability per chunk that it "is lost": it stalls for `stall` extra,
    /// as a TCP retransmission would, holding up everything behind it.
    pub loss: f64,
    /// Default used if zero: 200 ms.
    pub stall: Duration,
    /// Nothing is delivered in this direction (held, not dropped) until unblocked.
    pub blocked: bool,
    /// Bandwidth cap; `Some(0)` is taken as 1 byte/s.
    pub bytes_per_sec: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dir {
    /// From the connecting peer to the proxied target.
    ToTarget,
    /// From the target back to the peer.
    FromTarget,
}

const DEFAULT_STALL: Duration = Duration::from_millis(200);
/// Chunks read ahead of delivery per direction: enough not to throttle a
/// delayed link (real links keep a window in flight), bounded so a blocked
/// direction pushes back on its sender as a full TCP window would.
const QUEUE: usize = 1024;

impl Link {
    /// When a chunk read at `now` may arrive, ignoring earlier chunks.
    fn arrival(&self, now: Instant) -> Instant {
        let mut at = now + self.delay;
        if !self.jitter.is_zero() {
            at += self.jitter.mul_f64(fastrand::f64());
        }
        if self.loss > 0.0 && fastrand::f64() < self.loss {
            at += if self.stall.is_zero() {
                DEFAULT_STALL
            } else {
                self.stall
            };
        }
        at
    }
}

/// What every connection of one proxy obeys; shared through a watch channel so
/// a change reaches connections already open and wakes writers held by a block.
#[derive(Clone, Debug, Default)]
struct State {
    links: [Link; 2],
    /// Per source IP and direction; wins over `links` where present.
    from: HashMap<(IpAddr, Dir), Link>,
    isolated: bool,
}

impl State {
    fn link(&self, source: IpAddr, dir: Dir) -> &Link {
        self.from
            .get(&(source, dir))
            .unwrap_or(&self.links[dir as usize])
    }

    fn blocked(&self, source: IpAddr, dir: Dir) -> bool {
        self.isolated || self.link(source, dir).blocked
    }
}

#[derive(Default)]
struct Counts {
    accepted: AtomicU64,
    open: AtomicUsize,
}

/// Counts a connection as open for as long as its task lives, aborted or not.
struct Open(Arc<Counts>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A proxy running on the current tokio runtime; dropping it stops it and
/// closes its connections.
pub struct Proxy {
    addr: SocketAddr,
    state: watch::Sender<State>,
    counts: Arc<Counts>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// A proxy to `target` on a free port of 127.0.0.1.
    pub async fn start(target: SocketAddr) -> std::io::Result<Proxy> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), target).await
    }

    pub async fn start_on(listen: SocketAddr, target: SocketAddr) -> std::io::Result<Proxy> {
        Self::spawn(listen, target)
    }

    /// `start_on` for callers that are not async (must run inside a tokio
    /// runtime): nothing in starting a proxy waits.
    pub fn spawn(listen: SocketAddr, target: SocketAddr) -> std::io::Result<Proxy> {
        let listener = std::net::TcpListener::bind(listen)?;
        listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(listener)?;
        let addr = listener.local_addr()?;
        let (state, _) = watch::channel(State::default());
        let counts = Arc::new(Counts::default());
        let task = tokio::spawn(accept(listener, target, state.clone(), counts.clone()));
        Ok(Proxy {
            addr,
            state,
            counts,
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Applies at once to new chunks of open connections too; chunks already
    /// read keep the delay they were given.
    pub fn set(&self, dir: Dir, link: Link) {
        self.state.send_modify(|s| s.links[dir as usize] = link);
    }

    pub fn set_both(&self, link: Link) {
        self.state.send_modify(|s| s.links = [link.clone(), link]);
    }

    /// Like `set`, for the connections from `source` only (the peer's IP as
    /// the proxy sees it); they ignore the proxy-wide setting of `dir` while
    /// this rule exists.
    pub fn set_from(&self, source: IpAddr, dir: Dir, link: Link) {
        self.state.send_modify(|s| {
            s.from.insert((source, dir), link);
        });
    }

    /// Both directions back to `Link::default()`, every `set_from` rule
    /// removed, and the end of an `isolate`.
    pub fn heal(&self) {
        self.state.send_replace(State::default());
    }

    /// A partition, like a cut cable: both directions are held, and new
    /// connections are accepted but held too, not forwarded (nor refused),
    /// so a peer sees a hang. Ending it forwards what was held.
    pub fn isolate(&self, on: bool) {
        self.state.send_modify(|s| s.isolated = on);
    }

    /// Connections accepted so far: tests count reconnects with it.
    pub fn connections_accepted(&self) -> u64 {
        self.counts.accepted.load(Ordering::Relaxed)
    }

    pub fn open_connections(&self) -> usize {
        self.counts.open.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    /// Dropping the accept task drops its `JoinSet`, which aborts every connection.
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept(
    listener: TcpListener,
    target: SocketAddr,
    state: watch::Sender<State>,
    counts: Arc<Counts>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            // Reaps finished connections so the set does not grow.
            Some(_) = conns.join_next() => {}
            r = listener.accept() => match r {
                Ok((peer, from)) => {
                    counts.accepted.fetch_add(1, Ordering::Relaxed);
                    counts.open.fetch_add(1, Ordering::Relaxed);
                    let open = Open(counts.clone());
                    conns.spawn(connection(peer, from.ip(), target, state.subscribe(), open));
                }
                // Out of file descriptors and the like: wait for some to close
                // rather than spin on the error.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
        }
    }
}

async fn connection(
    peer: TcpStream,
    source: IpAddr,
    target: SocketAddr,
    mut state: watch::Receiver<State>,
    _open: Open,
) {
    // Held during a partition: accepted, as the kernel already did, but
    // neither refused nor forwarded, so the peer waits as on a cut cable.
    let partition_over = state.wait_for(|s| !s.isolated).await.is_ok();
    if !partition_over {
        return;
    }
    let upstream = match TcpStream::connect(target).await {
        Ok(s) => s,
        Err(_) => {
            // A reset, as the peer would get from a closed port.
            let _ = peer.set_zero_linger();
            return;
        }
    };
    // Nagle would add its own delays to the small frames of gRPC.
    let _ = peer.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (peer_r, peer_w) = peer.into_split();
    let (up_r, up_w) = upstream.into_split();
    tokio::join!(
        direction(peer_r, up_w, (source, Dir::ToTarget), &state),
        direction(up_r, peer_w, (source, Dir::FromTarget), &state),
    );
}

/// Which rules a direction of a connection obeys: its source IP and `Dir`.
type Key = (IpAddr, Dir);

async fn direction(
    from: OwnedReadHalf,
    to: OwnedWriteHalf,
    key: Key,
    state: &watch::Receiver<State>,
) {
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::join!(
        read(from, tx, key, state.clone()),
        deliver(rx, to, key, state.clone())
    );
}

struct Chunk {
    data: Vec<u8>,
    at: Instant,
}

/// Ends at EOF or a read error by dropping `tx`: the writer then delivers what
/// is queued and half-closes (a reset arrives as an orderly close).
async fn read(
    mut from: OwnedReadHalf,
    tx: mpsc::Sender<Chunk>,
    (source, dir): Key,
    state: watch::Receiver<State>,
) {
    let mut buf = vec![0; 64 * 1024];
    let mut last = Instant::now();
    while let Ok(n @ 1..) = from.read(&mut buf).await {
        // Never before an earlier chunk: a byte stream is not reordered.
        let at = state
            .borrow()
            .link(source, dir)
            .arrival(Instant::now())
            .max(last);
        last = at;
        let chunk = Chunk {
            data: buf[..n].to_vec(),
            at,
        };
        if tx.send(chunk).await.is_err() {
            return;
        }
    }
}

async fn deliver(
    mut rx: mpsc::Receiver<Chunk>,
    mut to: OwnedWriteHalf,
    (source, dir): Key,
    mut state: watch::Receiver<State>,
) {
    // When a capped link has sent everything handed to it so far.
    let mut free_at = Instant::now();
    while let Some(chunk) = rx.recv().await {
        sleep_until(chunk.at).await;
        if state.wait_for(|s| !s.blocked(source, dir)).await.is_err() {
            return;
        }
        let rate = state
            .borrow()
            .link(source, dir)
            .bytes_per_sec
            .map(|r| r.max(1));
        // A capped link sends pieces of 20 ms each, so a big chunk trickles
        // out rather than arriving whole after its transmission time.
        let piece = rate.map_or(chunk.data.len(), |r| (r / 50).max(1) as usize);
        for piece in chunk.data.chunks(piece) {
            if let Some(rate) = rate {
                free_at = free_at.max(Instant::now())
                    + Duration::from_secs_f64(piece.len() as f64 / rate as f64);
                sleep_until(free_at).await;
            }
            if to.write_all(piece).await.is_err() {
                return;
            }
        }
    }
    let _ = to.shutdown().await;
}
