//! Multiplexed watches: many services followed over few streams, all on one
//! node. What each watched service and each stream cost that node in memory,
//! for Roster (`WatchServices`) and etcd (watches added to a Watch stream).
//! Every stream is read as it goes, as a client does, so that what the node
//! holds is the watches, not answers waiting to be read.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use etcd_client::WatchOptions;
use roster::client::RosterClient;
use roster::proto::v1::watch_services_response::Result as Outcome;
use roster::proto::v1::WatchServicesRequest;

use crate::procs;

/// Client connections the streams are spread over (each well under a
/// server's concurrent stream limit).
const CONNS: usize = 20;

/// Node memory before any stream, with one service per stream, and with all;
/// and the messages each stream received, counted as they arrive.
pub struct Figures {
    pub rss: [u64; 3],
    pub streams: usize,
    pub per_stream: usize,
    pub received: Vec<Arc<AtomicUsize>>,
}

impl Figures {
    /// Bytes per watched service added to an open stream.
    pub fn per_watch(&self) -> f64 {
        let added = self.streams * (self.per_stream - 1);
        self.rss[2].saturating_sub(self.rss[1]) as f64 / added.max(1) as f64
    }

    /// Bytes per stream opened with one service, less that service's share.
    pub fn per_stream_cost(&self) -> f64 {
        let opened = self.rss[1].saturating_sub(self.rss[0]) as f64 / self.streams as f64;
        (opened - self.per_watch()).max(0.0)
    }

    /// Waits until every stream has received `n` messages.
    async fn all_received(&self, n: usize) -> Result<()> {
        let done = || {
            self.received
                .iter()
                .filter(|r| r.load(Ordering::Relaxed) >= n)
                .count()
        };
        let waited = procs::wait_until(
            &format!("{n} answers on each of {} streams", self.streams),
            Duration::from_secs(120),
            || async { done() == self.streams },
        )
        .await;
        waited
            .map(|_| ())
            .map_err(|e| e.context(format!("{} of {} streams have them", done(), self.streams)))
    }
}

/// The service watched as the `k`th of stream `s`.
pub fn service(s: usize, k: usize, per_stream: usize) -> String {
    format!("svc-{}", s * per_stream + k)
}

/// RSS of `pid` once allocations from the last step have settled.
async fn settled_rss(pid: u32) -> u64 {
    tokio::time::sleep(Duration::from_secs(2)).await;
    procs::rss_bytes(pid)
}

/// Runs `read` (a loop over one stream, adding to the counter it is given
/// for each message that counts) in the background.
fn count<F, Fut>(read: F) -> Arc<AtomicUsize>
where
    F: FnOnce(Arc<AtomicUsize>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let n = Arc::new(AtomicUsize::new(0));
    tokio::spawn(read(n.clone()));
    n
}

/// Opens `streams` streams with one service each, then adds the rest, and
/// measures `pid` at each step. `open` opens stream `s` watching a service
/// and returns the function that adds one more to it.
async fn measure<A, O, OF>(pid: u32, streams: usize, per_stream: usize, open: O) -> Result<Figures>
where
    O: Fn(usize, String) -> OF,
    OF: Future<Output = Result<(A, Arc<AtomicUsize>)>>,
    A: FnMut(String) -> Result<()>,
{
    let before = settled_rss(pid).await;
    let mut adders = Vec::with_capacity(streams);
    let mut received = Vec::with_capacity(streams);
    for s in 0..streams {
        let (add, n) = open(s, service(s, 0, per_stream)).await?;
        adders.push(add);
        received.push(n);
    }
    let mut f = Figures {
        rss: [before, 0, 0],
        streams,
        per_stream,
        received,
    };
    f.all_received(1).await?;
    f.rss[1] = settled_rss(pid).await;
    for (s, add) in adders.iter_mut().enumerate() {
        for k in 1..per_stream {
            add(service(s, k, per_stream))?;
        }
    }
    f.all_received(per_stream).await?;
    f.rss[2] = settled_rss(pid).await;
    // The request senders end with the measurement; the streams go on.
    drop(adders);
    Ok(f)
}

/// `streams` WatchServices streams to `endpoint`, `per_stream` services each;
/// `pid` is that node's process. Updates (initial states, then changes) count.
pub async fn roster(
    endpoint: &str,
    pid: u32,
    streams: usize,
    per_stream: usize,
) -> Result<Figures> {
    let clients = (0..CONNS)
        .map(|_| RosterClient::new(&[endpoint]))
        .collect::<Result<Vec<_>, _>>()?;
    let clients = &clients;
    measure(pid, streams, per_stream, |s, first| async move {
        let (tx, mut rx) = clients[s % CONNS]
            .watch_services(vec![WatchServicesRequest::add(first, 0)])
            .await?;
        let n = count(|n| async move {
            while let Ok(Some(m)) = rx.message().await {
                if matches!(m.result, Some(Outcome::Update(_))) {
                    n.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        let adder = move |service| Ok(tx.unbounded_send(WatchServicesRequest::add(service, 0))?);
        Ok((adder, n))
    })
    .await
}

/// The same with etcd: a Watch stream with one prefix watch per service.
/// Created watches and event messages count.
pub async fn etcd(endpoint: &str, pid: u32, streams: usize, per_stream: usize) -> Result<Figures> {
    let mut clients = Vec::with_capacity(CONNS);
    for _ in 0..CONNS {
        clients.push(etcd_client::Client::connect([endpoint], None).await?);
    }
    let clients = &clients;
    let prefix = |s: String| format!("/services/{s}/");
    let opts = || Some(WatchOptions::new().with_prefix());
    measure(pid, streams, per_stream, |s, first| async move {
        let mut c = clients[s % CONNS].clone();
        let (mut tx, mut rx) = c.watch(prefix(first), opts()).await?.split();
        let n = count(|n| async move {
            while let Ok(Some(m)) = rx.message().await {
                if m.created() || !m.events().is_empty() {
                    n.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        // The request sender is async; one task per stream feeds it in order.
        let (queue, mut todo) = futures::channel::mpsc::unbounded::<String>();
        tokio::spawn(async move {
            while let Some(service) = futures::StreamExt::next(&mut todo).await {
                if tx.watch(prefix(service), opts()).await.is_err() {
                    return;
                }
            }
        });
        let adder = move |service| Ok(queue.unbounded_send(service)?);
        Ok((adder, n))
    })
    .await
}
