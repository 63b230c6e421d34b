//! Namespaces (issue 33): registrations, watch delay and memory per instance
//! with 100 namespaces against the same load in one (Roster alone: etcd has
//! none). Each row puts the 100-namespace figure in the Roster column and the
//! one-namespace figure in the etcd column.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;

use super::{roster_client, Shared};
use crate::procs::{self, Peers};
use crate::report::{list_mib, times, Report, Row};
use crate::stats::{ms, Summary};
use crate::sut::Roster;
use crate::workload::{closed_loop, delivery_delay, retried, spread, Delivery};
use crate::Opts;

const NAMESPACES: usize = 100;
const CLIENTS: usize = 64;
const WATCHERS: usize = 1000;

/// Which namespace instance `i` goes to: all in `default`, or spread over
/// `NAMESPACES`.
fn namespace_of(spread_out: bool, i: usize) -> String {
    if spread_out {
        format!("ns-{}", i % NAMESPACES)
    } else {
        String::new()
    }
}

async fn create_namespaces(roster: &Roster) -> Result<()> {
    for i in 0..NAMESPACES {
        roster.create_namespace(&namespace_of(true, i)).await?;
    }
    Ok(())
}

pub async fn namespaces(s: &mut Shared, o: &Opts, report: &mut Report) -> Result<()> {
    let roster = &s.roster;
    create_namespaces(roster).await?;
    let dur = o.phase();
    // One, many, many, one: each layout runs once before and once after
    // the other, so what the cluster gathers from run to run weighs on both.
    let (mut one, mut many) = (Vec::new(), Vec::new());
    for spread_out in [false, true, true, false] {
        eprintln!("register, {CLIENTS} clients, spread over namespaces: {spread_out}");
        let s = register(roster, dur, spread_out).await;
        if spread_out { &mut many } else { &mut one }.push(s);
    }
    let (one, many) = (mean(&one), mean(&many));
    let show = |s: &Summary| format!("{:.0}/s, p99 {}", s.throughput, ms(s.p99));
    report.row(Row {
        name: format!(
            "register, {CLIENTS} clients: over {NAMESPACES} namespaces (Roster column) \
             against one namespace (etcd column: Roster again), mean of two runs each"
        ),
        roster: show(&many),
        etcd: show(&one),
        ratio: times(many.throughput, one.throughput),
        target: "≥ 0.95×",
    });
    let (mut one, mut many) = (Vec::new(), Vec::new());
    for spread_out in [false, true, true, false] {
        eprintln!("watch delay, {WATCHERS} watchers, spread over namespaces: {spread_out}");
        let d = watch_delay(roster, spread_out).await?;
        if spread_out { &mut many } else { &mut one }.push(d.after_ack);
    }
    report.latency(
        &format!(
            "watch delay, {WATCHERS} watchers: over {NAMESPACES} namespaces (Roster column) \
             against one namespace (etcd column: Roster again), mean of two runs each"
        ),
        &mean(&many),
        &mean(&one),
        "p99 ≤ 1.05×",
    );
    Ok(())
}

/// The mean of runs of the same load: throughput and percentiles averaged,
/// the largest maximum, the errors summed.
fn mean(runs: &[Summary]) -> Summary {
    let n = runs.len().max(1) as u32;
    Summary {
        throughput: runs.iter().map(|s| s.throughput).sum::<f64>() / f64::from(n),
        p50: runs.iter().map(|s| s.p50).sum::<Duration>() / n,
        p99: runs.iter().map(|s| s.p99).sum::<Duration>() / n,
        max: runs.iter().map(|s| s.max).max().unwrap_or_default(),
        errors: runs.iter().map(|s| s.errors).sum(),
    }
}

/// `CLIENTS` clients registering back to back over 16 services per
/// namespace, each write in `default` or in one of `NAMESPACES` in turn.
async fn register(roster: &Arc<Roster>, dur: Duration, spread_out: bool) -> Summary {
    closed_loop(roster, CLIENTS, dur, move |s, c, n| async move {
        let service = format!("nsreg-{}", c % 16);
        let ns = namespace_of(spread_out, c + n as usize);
        s.register_in(c, &ns, &service, &format!("c{c}-{n}")).await
    })
    .await
}

/// `WATCHERS` streams, each on a service of its own namespace's (the same
/// name in each) or, all in `default`, on one of as many services; the
/// writes go to each in turn, so every service sees the same changes.
async fn watch_delay(roster: &Arc<Roster>, spread_out: bool) -> Result<Delivery> {
    let service = move |i: usize| {
        let ns = namespace_of(spread_out, i);
        let name = if spread_out {
            "nswatch".to_string()
        } else {
            format!("nswatch-{}", i % NAMESPACES)
        };
        (ns, name)
    };
    // Each of the 100 services gets 5 of the 500 writes.
    delivery_delay(
        roster,
        WATCHERS,
        (500, 500 / NAMESPACES),
        move |r, w| async move {
            let (ns, name) = service(w);
            r.watch_in(w, &ns, &name).await
        },
        |k, id| async move {
            let (ns, name) = service(k);
            roster.register_in(k, &ns, &name, &id).await
        },
    )
    .await
}

/// Memory per instance on fresh clusters: `instances` registrations in
/// `default` against the same spread over 100 namespaces. Both clusters hold
/// the 100 namespaces, so only where the instances live differs.
pub async fn memory(dir: &Path, o: &Opts, report: &mut Report) -> Result<()> {
    let instances: u64 = if o.quick { 20_000 } else { 100_000 };
    let (one, one_rss) = per_instance(&dir.join("one"), instances, false).await?;
    let (many, many_rss) = per_instance(&dir.join("many"), instances, true).await?;
    report.row(Row {
        name: format!(
            "memory per instance, {instances} instances: over {NAMESPACES} namespaces \
             (Roster column) against one namespace (etcd column: Roster again)"
        ),
        roster: format!("{many:.0} B"),
        etcd: format!("{one:.0} B"),
        ratio: times(many, one),
        target: "≤ 1.05×",
    });
    report.note(format!(
        "Memory per instance: the mean over the 3 nodes of the RSS grown while \
         loading {instances} instances (100 per service). RSS before / after, \
         one namespace: {}; {NAMESPACES} namespaces: {}.",
        one_rss, many_rss
    ));
    Ok(())
}

/// Bytes per instance (mean RSS growth over the nodes) and the RSS before
/// and after, on a fresh 3-node cluster.
async fn per_instance(dir: &Path, instances: u64, spread_out: bool) -> Result<(f64, String)> {
    let rc = procs::roster(dir, 3, Peers::Direct)?;
    let roster = roster_client(&rc).await?;
    create_namespaces(&roster).await?;
    settle().await;
    let before = rc.rss();
    let r = roster.clone();
    spread(0..instances, 256, move |c, i| {
        let r = r.clone();
        async move {
            let ns = namespace_of(spread_out, (i / 100) as usize);
            let (service, id) = (format!("svc-{}", i / 100), format!("i-{i}"));
            retried(|| r.register_in(c, &ns, &service, &id)).await
        }
    })
    .await?;
    settle().await;
    let after = rc.rss();
    let grown: u64 = after
        .iter()
        .zip(&before)
        .map(|(a, b)| a.saturating_sub(*b))
        .sum();
    let per = grown as f64 / after.len().max(1) as f64 / instances as f64;
    Ok((per, format!("{} / {}", list_mib(&before), list_mib(&after))))
}

/// Lets every node apply what it was sent before its RSS is read.
async fn settle() {
    tokio::time::sleep(Duration::from_secs(2)).await;
}
