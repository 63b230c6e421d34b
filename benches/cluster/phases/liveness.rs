//! What keeping instances alive costs Roster (etcd has neither): TCP health
//! checks every second, and sessions renewed by their holders.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;

use super::roster_client;
use crate::procs::{self, Peers};
use crate::report::{mib, Report};
use crate::sut::{Roster, System};
use crate::workload::{first_answer, retried, spread};
use crate::Opts;

/// The leader health-checking instances over TCP every second: CPU and
/// memory of the leader.
pub async fn health(dir: &Path, o: &Opts, report: &mut Report) -> Result<()> {
    let instances = if o.quick { 1_000 } else { 10_000 };
    let rc = procs::roster(dir, 3, Peers::Direct)?;
    let roster = roster_client(&rc).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let accepted = Arc::new(AtomicU64::new(0));
    let counter = accepted.clone();
    let target = tokio::spawn(async move {
        while let Ok(_conn) = listener.accept().await {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
    eprintln!("health: {instances} instances checked every second");
    let checked = roster.clone();
    spread(0..instances, 256, move |c, i| {
        let roster = checked.clone();
        async move {
            let (service, id) = (format!("hc-{}", i / 100), format!("h-{i}"));
            roster
                .register_tcp_checked(c, &service, &id, port, 1000)
                .await
        }
    })
    .await?;
    // Let every instance's probe settle into its interval.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let leader = roster.leader().await?;
    let probes0 = accepted.load(Ordering::Relaxed);
    let window = Duration::from_secs(10);
    let cores = rc.cores_over(window).await;
    let probes = accepted.load(Ordering::Relaxed) - probes0;
    let cores: Vec<String> = cores.iter().map(|c| format!("{c:.2}")).collect();
    let passing = roster.passing().await?;
    let leader_rss = rc.procs[leader].pid().map_or(0, procs::rss_bytes);
    report.note(format!(
        "Health checking {instances} instances over TCP at a 1 s interval: {:.0} probes/s observed, {passing} passing; \
         CPU in cores per node (leader is node {}): {}; leader RSS {}.",
        probes as f64 / window.as_secs_f64(),
        leader + 1,
        cores.join(", "),
        mib(leader_rss)
    ));
    target.abort();
    Ok(())
}

/// The sessions' TTL.
const TTL_MS: u32 = 10_000;

/// Sessions: 1,000 client processes, each holding its share of the
/// instances under one session with a 10 s TTL and renewing it three times
/// per TTL through its own connection (two thirds land on followers, which
/// batch them to the leader). CPU per node while only renewals run.
pub async fn sessions(dir: &Path, o: &Opts, report: &mut Report) -> Result<()> {
    let (sessions, instances) = (1000, o.instances());
    let rc = procs::roster(dir, 3, Peers::Direct)?;
    let roster = roster_client(&rc).await?;
    eprintln!("sessions: {instances} instances held by {sessions} sessions");
    let mut ids = Vec::with_capacity(sessions);
    for c in 0..sessions {
        ids.push(first_answer("a session", || roster.create_session(c, TTL_MS)).await?);
    }
    let ids = Arc::new(ids);
    let renewing = Renewals::start(&roster, &ids);
    let start = Instant::now();
    hold(&roster, &ids, instances / sessions as u64).await?;
    let loaded = start.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let leader = roster.leader().await?;
    let cores = rc.cores_over(Duration::from_secs(20)).await;
    renewing.stop.store(true, Ordering::Relaxed);
    let passing = roster.passing().await?;
    anyhow::ensure!(
        passing >= instances,
        "{passing} of {instances} instances passing"
    );
    report.note(format!(
        "Sessions: {instances} instances held by {sessions} sessions (TTL 10 s, each renewed three times per TTL through its own connection; loaded in {:.1} s): CPU in cores per node over 20 s of renewals only (leader is node {}): {}; {passing} passing at the end; renewals answered unknown or failed: {}.",
        loaded.as_secs_f64(),
        leader + 1,
        cores.iter().map(|c| format!("{c:.3}")).collect::<Vec<_>>().join(", "),
        renewing.unknown.load(Ordering::Relaxed)
    ));
    renewing.abort();
    Ok(())
}

/// A task per session renewing it three times per TTL.
struct Renewals {
    /// Renewals answered unknown, or failed.
    unknown: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Renewals {
    fn start(roster: &Arc<Roster>, ids: &Arc<Vec<String>>) -> Renewals {
        let sessions = ids.len();
        let unknown = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for c in 0..sessions {
            let (roster, ids, unknown, stop) =
                (roster.clone(), ids.clone(), unknown.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                // Spread over the interval, as independent processes would be.
                let every = Duration::from_millis(u64::from(TTL_MS) / 3);
                tokio::time::sleep(every * c as u32 / sessions as u32).await;
                let mut tick = tokio::time::interval(every);
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    match roster.renew(c, vec![ids[c].clone()]).await {
                        Ok(n) => unknown.fetch_add(n as u64, Ordering::Relaxed),
                        Err(_) => unknown.fetch_add(1, Ordering::Relaxed),
                    };
                }
            }));
        }
        Renewals {
            unknown,
            stop,
            tasks,
        }
    }

    fn abort(self) {
        for t in self.tasks {
            t.abort();
        }
    }
}

/// Registers `per` instances under each session in `ids`, from 256 writers
/// (1,000 at once saturate two cores).
async fn hold(roster: &Arc<Roster>, ids: &Arc<Vec<String>>, per: u64) -> Result<()> {
    let sessions = ids.len();
    let mut tasks = Vec::new();
    for w in 0..256.min(sessions) {
        let (roster, ids) = (roster.clone(), ids.clone());
        tasks.push(tokio::spawn(async move {
            for (c, k) in (w..sessions)
                .step_by(256)
                .flat_map(|c| (0..per).map(move |k| (c, k)))
            {
                let i = c as u64 * per + k;
                let (service, id) = (format!("svc-{}", i / 100), format!("i-{i}"));
                retried(|| roster.register_held(c, &service, &id, &ids[c])).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}
