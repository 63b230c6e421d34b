//! The load generators more than one phase uses: closed loops of clients,
//! registrations, reads, watch delivery, bulk loading, and the retries that
//! go with them.

use std::future::Future;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::stats::Summary;
use crate::sut::{System, Watch};

/// Registrations per watch-delay round, 20 ms apart.
pub const WATCH_EVENTS: usize = 50;

/// `clients` tasks each run `op` back to back for `dur`; every call is one sample.
pub async fn closed_loop<S, F, Fut>(sys: &Arc<S>, clients: usize, dur: Duration, op: F) -> Summary
where
    S: System,
    F: Fn(Arc<S>, usize, u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<()>> + Send,
{
    load_loop(sys.clone(), sys.name(), clients, dur, op).await
}

/// `closed_loop` over any shared `ctx`; `name` labels the first error of each client.
pub async fn load_loop<T, F, Fut>(
    ctx: Arc<T>,
    name: &'static str,
    clients: usize,
    dur: Duration,
    op: F,
) -> Summary
where
    T: Send + Sync + 'static,
    F: Fn(Arc<T>, usize, u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<()>> + Send,
{
    let start = Instant::now();
    let deadline = start + dur;
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (ctx, op) = (ctx.clone(), op.clone());
        tasks.push(tokio::spawn(async move {
            let (mut lat, mut errors, mut seq) = (Vec::new(), 0, 0u64);
            while Instant::now() < deadline {
                let t = Instant::now();
                match op(ctx.clone(), c, seq).await {
                    Ok(()) => lat.push(t.elapsed()),
                    Err(e) => {
                        // The first failure of each client says what the errors were.
                        if errors == 0 {
                            eprintln!("{name}: client {c}: {e:#}");
                        }
                        errors += 1
                    }
                }
                seq += 1;
            }
            (lat, errors)
        }));
    }
    let (mut all, mut errors) = (Vec::new(), 0);
    for t in tasks {
        if let Ok((lat, e)) = t.await {
            all.extend(lat);
            errors += e;
        }
    }
    Summary::of(all, start.elapsed(), errors)
}

/// `clients` clients registering new instances back to back.
pub async fn register<S: System>(sys: &Arc<S>, clients: usize, dur: Duration) -> Summary {
    closed_loop(sys, clients, dur, move |s, c, n| async move {
        // Over 16 services: one would reach Roster's limit of 100,000
        // instances per service within a phase (12,500/s for 8 s), and every
        // write after it would be refused.
        let service = format!("reg{clients}-{}", c % 16);
        s.register(c, &service, &format!("c{c}-{n}")).await
    })
    .await
}

/// Registers a 100-instance service, then `reads` it.
pub async fn query<S: System>(
    sys: &Arc<S>,
    clients: usize,
    dur: Duration,
    linearizable: bool,
) -> Result<Summary> {
    for i in 0..100 {
        sys.register(i, "query", &format!("q-{i}")).await?;
    }
    Ok(reads(sys, clients, dur, "query", 100, linearizable).await)
}

/// `clients` clients reading `service` back to back; a read counts only if
/// it returns `want` instances.
pub async fn reads<S: System>(
    sys: &Arc<S>,
    clients: usize,
    dur: Duration,
    service: &'static str,
    want: usize,
    linearizable: bool,
) -> Summary {
    closed_loop(sys, clients, dur, move |s, c, _| async move {
        let n = s.query(c, service, linearizable).await?;
        anyhow::ensure!(n == want, "query returned {n} instances");
        Ok(())
    })
    .await
}

/// Time from a register's acknowledgement to each watcher receiving its event.
pub async fn watch_delay<S: System>(
    sys: &Arc<S>,
    watchers: usize,
    events: usize,
) -> Result<Delivery> {
    let service: Arc<str> = format!("watch{watchers}").into();
    let watched = service.clone();
    delivery_delay(
        sys,
        watchers,
        (events, events),
        move |sys, w| {
            let service = watched.clone();
            async move { sys.watch(w, &service).await }
        },
        |k, id| {
            let (sys, service) = (sys.clone(), service.clone());
            async move { sys.register(k, &service, &id).await }
        },
    )
    .await
}

/// How fast changes reached the streams.
pub struct Delivery {
    /// From the writer's acknowledgement to each stream's arrival (0 when
    /// it arrived first): what a watcher waits beyond the writer.
    pub after_ack: Summary,
    /// From the write's start (the request sent) to each arrival: the whole
    /// path, which a system that acknowledges only after its fan-out cannot
    /// hide in its write latency.
    pub after_send: Summary,
    /// The writes' own latency, send to acknowledgement.
    pub ack: Summary,
    /// When the writes began and ended (the streams were all open).
    pub window: (Instant, Instant),
}

/// Opens `watchers` streams with `open`, registers `events` instances (ids
/// `w-K`) with `write` 20 ms apart, and times each one's arrival on every
/// stream, each of which waits for the `per_stream` writes to its service.
pub async fn delivery_delay<S, W, F, Fut, G, GFut>(
    sys: &Arc<S>,
    watchers: usize,
    (events, per_stream): (usize, usize),
    open: F,
    write: G,
) -> Result<Delivery>
where
    S: System,
    W: Watch,
    F: Fn(Arc<S>, usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<W>> + Send,
    G: Fn(usize, String) -> GFut,
    GFut: Future<Output = Result<()>>,
{
    let sem = Arc::new(tokio::sync::Semaphore::new(256));
    let mut opening = Vec::new();
    for w in 0..watchers {
        let (sys, sem, open) = (sys.clone(), sem.clone(), open.clone());
        opening.push(tokio::spawn(async move {
            let _permit = sem.acquire().await?;
            open(sys, w).await
        }));
    }
    let mut tasks = Vec::new();
    for o in opening {
        let mut watch = o.await??;
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::with_capacity(per_stream);
            while got.len() < per_stream {
                let ids = watch.next_puts().await?;
                let now = Instant::now();
                got.extend(ids.into_iter().map(|id| (id, now)));
            }
            anyhow::Ok(got)
        }));
    }
    eprintln!("  {watchers} streams open; writing");
    let start = Instant::now();
    let mut writes = std::collections::HashMap::new();
    let mut acks = Vec::new();
    for k in 0..events {
        let id = format!("w-{k}");
        let sent = Instant::now();
        write(k, id.clone()).await?;
        let acked = Instant::now();
        acks.push(acked - sent);
        writes.insert(id, (sent, acked));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let written = Instant::now();
    let (mut after_ack, mut after_send) = (Vec::new(), Vec::new());
    for t in tasks {
        let got = tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .context("watchers did not receive every event within 60 s")???;
        for (id, at) in got {
            if let Some((sent, acked)) = writes.get(&id) {
                // An event may arrive before the writer sees its ack: count that as zero delay.
                after_ack.push(at.saturating_duration_since(*acked));
                if std::env::var_os("PROBE").is_some()
                    && at.saturating_duration_since(*acked) > Duration::from_millis(5)
                {
                    let wall = |i: &Instant| {
                        (std::time::SystemTime::now() - i.elapsed())
                            .duration_since(std::time::UNIX_EPOCH)
                            .map(|d| d.as_secs_f64())
                            .unwrap_or(0.0)
                    };
                    eprintln!(
                        "late {id}: sent {:.6} acked {:.6} arrived {:.6}",
                        wall(sent),
                        wall(acked),
                        wall(&at)
                    );
                }
                after_send.push(at.saturating_duration_since(*sent));
            }
        }
    }
    let elapsed = start.elapsed();
    Ok(Delivery {
        window: (start, written),
        after_ack: Summary::of(after_ack, elapsed, 0),
        after_send: Summary::of(after_send, elapsed, 0),
        ack: Summary::of(acks, elapsed, 0),
    })
}

/// Registers instances `range`, `per_service` per service (`svc-N`, ids
/// `i-N`), from 256 clients; returns the time it took.
pub async fn load<S: System>(
    sys: &Arc<S>,
    range: Range<u64>,
    per_service: u64,
) -> Result<Duration> {
    let sys = sys.clone();
    spread(range, 256, move |c, i| {
        let sys = sys.clone();
        async move {
            let service = format!("svc-{}", i / per_service);
            let id = format!("i-{i}");
            retried(|| sys.register(c, &service, &id)).await
        }
    })
    .await
}

/// Runs `op(client, i)` for each `i` in `range`, one at a time per client:
/// client `c` of `clients` takes `range.start + c`, then every `clients`th
/// after it. Returns the time it took.
pub async fn spread<F, Fut>(range: Range<u64>, clients: u64, op: F) -> Result<Duration>
where
    F: Fn(usize, u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<()>> + Send,
{
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (op, range) = (op.clone(), range.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = range.start + c;
            while i < range.end {
                op(c as usize, i).await?;
                i += clients;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(start.elapsed())
}

/// Runs `write` until it succeeds, for up to 5 s (250 tries 20 ms apart): a node of a
/// fresh cluster may not know the leader yet, and a loaded 2-core machine
/// sees an election now and then (registrations are safe to repeat).
pub async fn retried<F, Fut>(mut write: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let mut attempts = 0;
    while let Err(e) = write().await {
        attempts += 1;
        if attempts == 250 {
            return Err(e);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Until `f` answers, for at most 30 s.
pub async fn first_answer<T, F, Fut>(what: &str, f: F) -> Result<T>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => return Err(e.context(what.to_string())),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
