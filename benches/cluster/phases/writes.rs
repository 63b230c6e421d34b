//! Writes: registrations (one client alone on the leader, then many) and
//! heartbeats.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;

use super::Shared;
use crate::report::Report;
use crate::stats::Summary;
use crate::sut::{Heartbeat, System};
use crate::workload::{self, closed_loop};
use crate::Opts;

pub async fn register(s: &mut Shared, o: &Opts, report: &mut Report) -> Result<()> {
    let dur = o.phase();
    eprintln!("register, 1 client");
    let r = register_alone(&s.roster, dur).await?;
    let e = register_alone(&s.etcd, dur).await?;
    report.latency("register, 1 client on the leader", &r, &e, "p99 ≤ 1×");
    for clients in [64, 1000] {
        eprintln!("register, {clients} clients");
        let r = workload::register(&s.roster, clients, dur).await;
        let e = workload::register(&s.etcd, clients, dur).await;
        report.load(&format!("register, {clients} clients"), &r, &e, "≥ 1.5×");
    }
    Ok(())
}

pub async fn heartbeat(s: &mut Shared, o: &Opts, report: &mut Report) -> Result<()> {
    let r = beats(&s.roster, 64, o.phase()).await?;
    let e = beats(&s.etcd, 64, o.phase()).await?;
    report.load("heartbeat, 64 clients", &r, &e, "");
    Ok(())
}

/// One client writing to the leader, one registration at a time: the latency
/// of a single write, with no group commit to hide the fsyncs.
async fn register_alone<S: System>(sys: &Arc<S>, dur: Duration) -> Result<Summary> {
    // Connection `i` goes to node `i`: the leader's own.
    let leader = sys.leader().await?;
    Ok(closed_loop(sys, 1, dur, move |s, _, n| async move {
        s.register(leader, "alone", &format!("a-{n}")).await
    })
    .await)
}

/// `clients` clients, each with an instance of its own, heartbeating back to back.
async fn beats<S: System>(sys: &Arc<S>, clients: usize, dur: Duration) -> Result<Summary> {
    for c in 0..clients {
        sys.register(c, "hb", &format!("hb-{c}")).await?;
    }
    let start = Instant::now();
    let deadline = start + dur;
    let mut tasks = Vec::new();
    for c in 0..clients {
        let sys = sys.clone();
        tasks.push(tokio::spawn(async move {
            let mut beat = sys.heartbeat(c, "hb", &format!("hb-{c}")).await?;
            let (mut lat, mut errors) = (Vec::new(), 0);
            while Instant::now() < deadline {
                let t = Instant::now();
                match beat.beat().await {
                    Ok(()) => lat.push(t.elapsed()),
                    Err(_) => errors += 1,
                }
            }
            anyhow::Ok((lat, errors))
        }));
    }
    let (mut all, mut errors) = (Vec::new(), 0);
    for t in tasks {
        let (lat, e) = t.await??;
        all.extend(lat);
        errors += e;
    }
    Ok(Summary::of(all, start.elapsed(), errors))
}
