//! Read replicas taking watch load off the voters: the same watchers spread
//! over the 3 voters, then over the 3 voters and 2 replicas, while 64 clients
//! register other instances beside them.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::{wait_leader, WATCH_LIMITS};
use crate::procs::{self, Peers};
use crate::report::{Report, Row};
use crate::stats::ms;
use crate::sut::{Roster, System};
use crate::workload::{watch_delay, Delivery, WATCH_EVENTS};
use crate::{Opts, POOL};

/// Clients registering beside the watchers.
const WRITERS: usize = 64;

pub async fn replicas(dir: &Path, o: &Opts, report: &mut Report) -> Result<()> {
    let rc = procs::roster_cluster(dir, 3, Peers::Direct, WATCH_LIMITS, false)?;
    let voters = Arc::new(Roster::new(&rc.endpoints(), POOL)?);
    wait_leader(&voters).await?;
    let mut spare = Vec::new();
    for id in [4, 5] {
        let p = procs::roster_joiner(dir, id, WATCH_LIMITS)?;
        procs::wait_until("the replica to answer", Duration::from_secs(30), || async {
            voters.count_on(&p.endpoint).await.is_ok()
        })
        .await?;
        voters.add_member(id, &p.endpoint, true).await?;
        spare.push(p);
    }
    let mut all = rc.endpoints();
    all.extend(spare.iter().map(|p| p.endpoint.clone()));
    let spread = Arc::new(Roster::new(&all, POOL)?);
    let counts: &[usize] = if o.quick { &[1000] } else { &[10_000, 50_000] };
    for &w in counts {
        for (over, sys) in [("3 voters", &voters), ("3 voters + 2 replicas", &spread)] {
            eprintln!("watch delay with writes beside, {w} watchers over {over}");
            let leader = voters.leader().await?;
            let pid = rc.procs[leader].pid().context("the leader's process")?;
            let m = beside_writes(sys, &voters, w, pid).await?;
            rows(report, w, over, &m);
        }
    }
    Ok(())
}

struct Measured {
    delivery: Delivery,
    /// Writes of the 64 clients per second, while the watch events went out.
    writes_per_sec: f64,
    /// The leader's CPU then, in cores.
    leader_cores: f64,
}

/// `watchers` watchers of `sys` (its pool's connections spread over its
/// endpoints) measured as the watch rows do, with `WRITERS` clients of
/// `writer` registering other instances throughout.
async fn beside_writes(
    sys: &Arc<Roster>,
    writer: &Arc<Roster>,
    watchers: usize,
    leader_pid: u32,
) -> Result<Measured> {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(Mutex::new(Vec::new()));
    let cpu = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for c in 0..WRITERS {
        let (writer, stop, done) = (writer.clone(), stop.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                if writer
                    .register(c, &format!("beside-{}", c % 16), &format!("b{c}-{n}"))
                    .await
                    .is_ok()
                {
                    done.lock().map(|mut d| d.push(Instant::now())).ok();
                }
            }
        }));
    }
    let sampler = {
        let (stop, cpu) = (stop.clone(), cpu.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let sample = (Instant::now(), procs::cpu_time(leader_pid));
                cpu.lock().map(|mut c| c.push(sample)).ok();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let delivery = watch_delay(sys, watchers, WATCH_EVENTS).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await?;
    }
    sampler.await?;
    let delivery = delivery?;
    let (from, to) = delivery.window;
    let secs = (to - from).as_secs_f64().max(1e-3);
    let writes = done
        .lock()
        .map_or(0, |d| d.iter().filter(|t| **t >= from && **t <= to).count());
    let cpu = cpu.lock().map(|c| c.clone()).unwrap_or_default();
    let inside: Vec<_> = cpu.iter().filter(|(t, _)| *t >= from && *t <= to).collect();
    let leader_cores = match (inside.first(), inside.last()) {
        (Some((t0, c0)), Some((t1, c1))) if t1 > t0 => {
            (*c1 - *c0).as_secs_f64() / (*t1 - *t0).as_secs_f64()
        }
        _ => 0.0,
    };
    Ok(Measured {
        delivery,
        writes_per_sec: writes as f64 / secs,
        leader_cores,
    })
}

fn rows(report: &mut Report, watchers: usize, over: &str, m: &Measured) {
    let d = &m.delivery;
    report.row(Row {
        name: format!(
            "replicas: {watchers} watchers over {over}, 64 clients registering beside: \
             watch delay p50 / p99 (from the write's start p50 / p99); writes/s; leader CPU"
        ),
        roster: format!(
            "{} / {} ({} / {}); {:.0}/s; {:.2} cores",
            ms(d.after_ack.p50),
            ms(d.after_ack.p99),
            ms(d.after_send.p50),
            ms(d.after_send.p99),
            m.writes_per_sec,
            m.leader_cores
        ),
        etcd: "—".into(),
        ratio: "—".into(),
        target: "",
    });
}
