//! Change delivery: watch events and xDS pushes after a registration, and
//! what multiplexed watches cost a node in memory.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use super::{fresh_etcd, roster_client, Shared};
use crate::procs::{self, Peers};
use crate::report::{list_mib, times, Report, Row};
use crate::stats::{ms, Summary};
use crate::sut::{Roster, System};
use crate::workload::{delivery_delay, load, watch_delay, WATCH_EVENTS};
use crate::{mux, Opts};

pub async fn watch(s: &mut Shared, o: &Opts, report: &mut Report) -> Result<()> {
    s.watched = true;
    // `BENCH_WATCHERS=N,M` runs only those counts (a profile of one).
    let chosen: Option<Vec<usize>> = std::env::var("BENCH_WATCHERS")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect());
    let ws: &[usize] = match &chosen {
        Some(c) => c,
        None if o.quick => &[1, 100, 1000],
        None => &[1, 100, 1000, 10_000, 50_000],
    };
    for &w in ws {
        eprintln!("watch delay, {w} watchers");
        let r = watch_delay(&s.roster, w, WATCH_EVENTS).await?;
        let e = watch_delay(&s.etcd, w, WATCH_EVENTS).await?;
        report.latency(
            &format!("watch delay, {w} watchers"),
            &r.after_ack,
            &e.after_ack,
            "p99 ≤ 1×",
        );
        report.latency(
            &format!("watch delay from the write's start, {w} watchers"),
            &r.after_send,
            &e.after_send,
            "",
        );
        report.note(format!(
            "With {w} watchers, the writes themselves (send → ack) took p50 / p99: Roster {} / {}, etcd {} / {}.",
            ms(r.ack.p50),
            ms(r.ack.p99),
            ms(e.ack.p50),
            ms(e.ack.p99)
        ));
    }
    Ok(())
}

/// Roster only: etcd serves no xDS.
pub async fn xds(s: &mut Shared, _: &Opts, report: &mut Report) -> Result<()> {
    for w in [1, 100, 1000] {
        eprintln!("xDS push delay, {w} streams");
        let x = xds_delay(&s.roster, w, WATCH_EVENTS).await?;
        report.row(Row {
            name: format!(
                "xDS push delay, {w} ADS streams (registration ack → endpoints): p50 / p99 / max"
            ),
            roster: format!("{} / {} / {}", ms(x.p50), ms(x.p99), ms(x.max)),
            etcd: "—".into(),
            ratio: "—".into(),
            target: "",
        });
    }
    Ok(())
}

/// Time from a register's acknowledgement to each of `streams` xDS streams
/// receiving the endpoints that hold it.
async fn xds_delay(roster: &Arc<Roster>, streams: usize, events: usize) -> Result<Summary> {
    let service: Arc<str> = format!("xds{streams}").into();
    let watched = service.clone();
    delivery_delay(
        roster,
        streams,
        (events, events),
        move |r, w| {
            let service = watched.clone();
            async move { r.xds(w, &service).await }
        },
        |k, id| {
            let service = service.clone();
            async move { roster.register(k, &service, &id).await }
        },
    )
    .await
    .map(|d| d.after_ack)
}

/// Multiplexed watches on one node of a fresh cluster of each system:
/// streams following `per_stream` services each, one instance per service.
/// `BENCH_MUX=STREAMS,PER_STREAM` overrides the shape.
pub async fn mux(dir: &Path, o: &Opts, report: &mut Report) -> Result<()> {
    let shape = std::env::var("BENCH_MUX").ok().and_then(|v| {
        let (a, b) = v.split_once(',')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    });
    let (streams, per_stream) = shape.unwrap_or(if o.quick { (100, 100) } else { (1000, 100) });
    let services = (streams * per_stream) as u64;
    eprintln!("multiplexed watch: {services} services over {streams} streams");
    let r = mux_roster(dir, streams, per_stream).await?;
    let (ec, etcd) = fresh_etcd(dir).await?;
    load(&etcd, 0..services, 1).await?;
    let pid = ec.procs[0].pid().context("etcd node 1 is running")?;
    let e = mux::etcd(&ec.endpoints()[0], pid, streams, per_stream).await?;
    let bytes = |b: f64| format!("{b:.0} B");
    report.row(Row {
        name: format!("multiplexed watch: memory per watched service ({services} over {streams} streams, one node)"),
        roster: bytes(r.per_watch()),
        etcd: bytes(e.per_watch()),
        ratio: times(r.per_watch(), e.per_watch().max(1.0)),
        target: "Roster ≤ 350 B",
    });
    report.row(Row {
        name: "multiplexed watch: memory per stream".to_string(),
        roster: bytes(r.per_stream_cost()),
        etcd: bytes(e.per_stream_cost()),
        ratio: times(r.per_stream_cost(), e.per_stream_cost().max(1.0)),
        target: "",
    });
    report.note(format!(
        "Multiplexed watch, RSS of the node the {streams} streams go to (before any, one service each, {per_stream} each): Roster {}; etcd {}.",
        list_mib(&r.rss),
        list_mib(&e.rss)
    ));
    Ok(())
}

/// Roster's figures, on a fresh cluster stopped afterwards; a change made
/// after them still reaches its stream.
async fn mux_roster(dir: &Path, streams: usize, per_stream: usize) -> Result<mux::Figures> {
    let services = (streams * per_stream) as u64;
    let rc = procs::roster(dir, 3, Peers::Direct)?;
    let roster = roster_client(&rc).await?;
    load(&roster, 0..services, 1).await?;
    let pid = rc.procs[0].pid().context("roster node 1 is running")?;
    let r = mux::roster(&rc.endpoints()[0], pid, streams, per_stream).await?;
    // Delivery still works: a change to the last stream's last service reaches it.
    let last = &r.received[streams - 1];
    let seen = last.load(Ordering::Relaxed);
    let service = mux::service(streams - 1, per_stream - 1, per_stream);
    roster.register(0, &service, "late").await?;
    procs::wait_until(
        "the late change on its stream",
        Duration::from_secs(10),
        || async { last.load(Ordering::Relaxed) > seen },
    )
    .await?;
    drop((r.received.clone(), roster, rc));
    Ok(r)
}
