//! Failover: the leader stopped, by a crash and by a graceful stop, and the
//! time until a write is accepted again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;

use super::Shared;
use crate::procs::{self, Cluster};
use crate::report::Report;
use crate::stats::Summary;
use crate::sut::System;
use crate::Opts;

#[derive(Clone, Copy, PartialEq)]
enum Stop {
    /// SIGKILL: a crash.
    Kill,
    /// SIGTERM: a rolling restart; both systems hand leadership over first.
    Term,
}

pub async fn failover(s: &mut Shared, o: &Opts, report: &mut Report) -> Result<()> {
    // 20 rounds each (issue 13's measure: one slow round in five hid in 5).
    let (kills, terms) = if o.quick { (2, 2) } else { (20, 20) };
    for (stop, rounds, what, target) in [
        (
            Stop::Kill,
            kills,
            "failover: leader SIGKILL",
            "p50 ≤ 600 ms, max < 1 s",
        ),
        (
            Stop::Term,
            terms,
            "rolling restart: leader SIGTERM",
            "p50 ≤ etcd, max ≤ 100 ms",
        ),
    ] {
        let r = stop_leader(&s.roster, &mut s.rc, rounds, stop).await?;
        let e = stop_leader(&s.etcd, &mut s.ec, rounds, stop).await?;
        let name = format!("{what} → first accepted write ({rounds} rounds)");
        report.latency(&name, &r, &e, target);
    }
    Ok(())
}

/// Stops the leader and times the first write accepted afterwards.
async fn stop_leader<S: System>(
    sys: &Arc<S>,
    cluster: &mut Cluster,
    rounds: usize,
    stop: Stop,
) -> Result<Summary> {
    let mut samples = Vec::new();
    for r in 0..rounds {
        let leader = sys.leader().await?;
        match stop {
            Stop::Kill => cluster.procs[leader].kill(),
            Stop::Term => cluster.procs[leader].terminate()?,
        }
        let killed = Instant::now();
        let mut n = 0;
        loop {
            n += 1;
            let id = format!("f-{r}-{n}");
            // The same per-attempt deadline for both systems: a request stuck on the dead
            // leader is abandoned after 1 s and retried, as a client with a deadline would.
            if let Ok(Ok(())) =
                tokio::time::timeout(Duration::from_secs(1), sys.register_any("failover", &id))
                    .await
            {
                break;
            }
            anyhow::ensure!(
                killed.elapsed() < Duration::from_secs(60),
                "no write accepted 60 s after the kill"
            );
        }
        let took = killed.elapsed();
        samples.push(took);
        // With the wall-clock time of the stop, to read beside the nodes' logs.
        let at = std::time::SystemTime::now() - took;
        eprintln!(
            "{} round {r}: node {} stopped at {:.3} (Unix s), a write accepted after {took:?}",
            sys.name(),
            leader + 1,
            at.duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64()
        );
        cluster.procs[leader].wait()?;
        cluster.procs[leader].start()?;
        // Let the restarted node rejoin and catch up before the next round.
        procs::wait_until(
            "the old leader to rejoin",
            Duration::from_secs(30),
            || async { sys.count().await.is_ok() },
        )
        .await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let total = samples.iter().sum();
    Ok(Summary::of(samples, total, 0))
}
