//! Size: fresh clusters loaded with 100,000 instances (`--quick` 10,000,
//! `--scale` 1,000,000), and at that size queries, memory, a full restart,
//! disk, and for Roster a snapshot under writes and a member it brings up.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;

use super::disk::{disk_cost, disk_rows, Disk};
use super::{fresh_etcd, roster_client};
use crate::procs::{self, Cluster, Peers};
use crate::report::{list_mib, mib, times, Report, Row};
use crate::stats::{ms, Summary};
use crate::sut::{Roster, System};
use crate::workload::{closed_loop, load, reads};
use crate::Opts;

/// Query latency is compared at this size and at the full one.
const QUERY_AT: u64 = 100_000;
/// Services per ListServices page in the scale phase (a console's page).
const LIST_PAGE: u32 = 100;
/// The scale phase's nodes hold more than the default `max_instances`
/// (1,000,000): the loaded instances plus those the later phases register.
const SCALE_CONFIG: &str = "[limits]\nmax_instances = 2000000\n";

/// A system's figures at size.
struct Scale {
    load_rate: f64,
    rss: Vec<u64>,
    restart: Duration,
    rss_after_restart: Vec<u64>,
    disk: Disk,
    /// Query latencies by catalogue size.
    queries: Vec<(u64, Queries)>,
}

struct Queries {
    get: Summary,
    /// Every service in one answer.
    list: Option<Summary>,
    /// The first `LIST_PAGE` services.
    page: Option<Summary>,
}

/// What a snapshot build costs the writes going on meanwhile.
struct Stall {
    writes: Summary,
    took: Duration,
    bytes: u64,
}

/// Scale on fresh clusters, so that earlier phases do not count.
pub async fn scale(dir: &Path, o: &Opts, report: &mut Report) -> Result<()> {
    let (instances, dur) = (o.instances(), o.phase());
    let (rs, stall, joined) = roster_at_scale(dir, instances, dur).await?;
    let (mut ec, etcd) = fresh_etcd(dir).await?;
    let es = at_scale(&etcd, &mut ec, instances, dur).await?;
    query_rows(report, &rs, &es);
    snapshot_rows(report, instances, &stall, joined);
    size_rows(report, instances, &rs, &es);
    Ok(())
}

/// Roster's `Scale`, then its snapshot under writes and a new member caught
/// up by it; printed as they come, so that a failure with etcd keeps them.
async fn roster_at_scale(
    dir: &Path,
    instances: u64,
    dur: Duration,
) -> Result<(Scale, Stall, Duration)> {
    let mut rc = procs::roster_with(dir, 3, Peers::Direct, SCALE_CONFIG)?;
    let roster = roster_client(&rc).await?;
    eprintln!("scale: {instances} instances");
    let rs = at_scale(&roster, &mut rc, instances, dur).await?;
    eprintln!(
        "roster, {instances} instances: loaded at {:.0}/s; RSS per node {} ({} after the restart); full restart {}",
        rs.load_rate,
        list_mib(&rs.rss),
        list_mib(&rs.rss_after_restart),
        ms(rs.restart)
    );
    for (size, q) in &rs.queries {
        eprintln!(
            "roster, {size} instances: GetService p99 {}, ListServices p99 {} (a page of {LIST_PAGE}: {})",
            ms(q.get.p99),
            q.list.as_ref().map_or("—".into(), |l| ms(l.p99)),
            q.page.as_ref().map_or("—".into(), |l| ms(l.p99))
        );
    }
    let stall = snapshot_stall(&roster, dur).await?;
    let joined = join_by_snapshot(&roster, dir, instances).await?;
    drop((roster, rc));
    eprintln!(
        "roster, {instances} instances: writes during a snapshot p99 / max {} / {} ({} failed); new member caught up {}",
        ms(stall.writes.p99),
        ms(stall.writes.max),
        stall.writes.errors,
        ms(joined)
    );
    Ok((rs, stall, joined))
}

/// Loads `instances` registrations (100 per service), timing queries at
/// `QUERY_AT` and at the full size, then measures memory and a full restart.
async fn at_scale<S: System>(
    sys: &Arc<S>,
    cluster: &mut Cluster,
    instances: u64,
    dur: Duration,
) -> Result<Scale> {
    let mut sizes = vec![QUERY_AT.min(instances), instances];
    sizes.dedup();
    let (mut loaded, mut loading, mut queries) = (0, Duration::ZERO, Vec::new());
    for size in sizes {
        loading += load(sys, loaded..size, 100).await?;
        loaded = size;
        queries.push((size, scale_queries(sys, dur).await?));
    }
    let load_rate = instances as f64 / loading.as_secs_f64();
    anyhow::ensure!(
        sys.count().await? >= instances,
        "not every instance was stored"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = cluster.rss();
    let disk = disk_cost(sys, cluster).await?;

    cluster.kill_all();
    let restarted = Instant::now();
    cluster.start_all()?;
    procs::wait_until(
        "the restarted cluster to serve every instance",
        Duration::from_secs(120),
        || async { sys.count().await.is_ok_and(|n| n >= instances) },
    )
    .await?;
    let restart = restarted.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    Ok(Scale {
        load_rate,
        rss,
        restart,
        rss_after_restart: cluster.rss(),
        disk,
        queries,
    })
}

/// GetService of a 100-instance service (64 clients, linearizable) and, where
/// the system has it, ListServices (8 clients).
async fn scale_queries<S: System>(sys: &Arc<S>, dur: Duration) -> Result<Queries> {
    let get = reads(sys, 64, dur, "svc-0", 100, true).await;
    let mut lists = Vec::new();
    for page_size in [0, LIST_PAGE] {
        lists.push(match sys.list_services(0, page_size).await? {
            None => None,
            Some(_) => Some(
                closed_loop(sys, 8, dur, move |s, c, _| async move {
                    s.list_services(c, page_size).await.map(|_| ())
                })
                .await,
            ),
        });
    }
    let page = lists.pop().flatten();
    let list = lists.pop().flatten();
    Ok(Queries { get, list, page })
}

/// 16 clients register for `dur`; a second in, the leader builds a snapshot
/// (and purges its log, so a new member needs that snapshot).
async fn snapshot_stall(roster: &Arc<Roster>, dur: Duration) -> Result<Stall> {
    let leader = roster.leader().await?;
    let writes = {
        let roster = roster.clone();
        tokio::spawn(async move {
            closed_loop(&roster, 16, dur, |s, c, n| async move {
                s.register(c, "stall", &format!("s{c}-{n}")).await
            })
            .await
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let start = Instant::now();
    let bytes = roster.snapshot(leader).await?;
    let took = start.elapsed();
    let writes = writes.await?;
    // A stall figure from refused writes alone would measure nothing.
    anyhow::ensure!(
        writes.throughput > 0.0,
        "every write during the snapshot failed ({} errors)",
        writes.errors
    );
    Ok(Stall {
        writes,
        took,
        bytes,
    })
}

/// Starts a fourth node, adds it, and times until it serves every instance.
async fn join_by_snapshot(roster: &Arc<Roster>, dir: &Path, instances: u64) -> Result<Duration> {
    let joiner = procs::roster_joiner(dir, 4, SCALE_CONFIG)?;
    procs::wait_until(
        "the new node to answer",
        Duration::from_secs(30),
        || async { roster.count_on(&joiner.endpoint).await.is_ok() },
    )
    .await?;
    let start = Instant::now();
    roster.add_member(4, &joiner.endpoint, false).await?;
    procs::wait_until(
        "the new member to serve every instance",
        Duration::from_secs(120),
        || async {
            roster
                .count_on(&joiner.endpoint)
                .await
                .is_ok_and(|n| n >= instances)
        },
    )
    .await?;
    Ok(start.elapsed())
}

/// GetService and ListServices at each size, and how Roster's grew.
fn query_rows(report: &mut Report, rs: &Scale, es: &Scale) {
    for ((size, r), (_, e)) in rs.queries.iter().zip(&es.queries) {
        let name =
            format!("{size} instances: GetService of 100 instances, linearizable, 64 clients");
        report.latency(&name, &r.get, &e.get, "");
        for (what, list) in [
            ("ListServices".to_string(), &r.list),
            (format!("ListServices, a page of {LIST_PAGE}"), &r.page),
        ] {
            if let Some(list) = list {
                report.row(Row {
                    name: format!("{size} instances: {what}, 8 clients: p50 / p99"),
                    roster: format!("{} / {}", ms(list.p50), ms(list.p99)),
                    etcd: "—".into(),
                    ratio: String::new(),
                    target: "",
                });
            }
        }
    }
    if let [(small, r0), (large, r1)] = &rs.queries[..] {
        let growth = |a: Duration, b: Duration| b.as_secs_f64() / a.as_secs_f64().max(1e-9);
        report.note(format!(
            "Roster query p99 at {large} instances against {small}: GetService {:.2}×{}.",
            growth(r0.get.p99, r1.get.p99),
            match (&r0.list, &r1.list, &r0.page, &r1.page) {
                (Some(a), Some(b), Some(pa), Some(pb)) => format!(
                    ", ListServices {:.2}× whole, {:.2}× a page of {LIST_PAGE} (target: within 1.5× for both)",
                    growth(a.p99, b.p99),
                    growth(pa.p99, pb.p99)
                ),
                _ => String::new(),
            }
        ));
    }
}

/// Roster only: writes during a snapshot, and the member it brought up.
fn snapshot_rows(report: &mut Report, instances: u64, stall: &Stall, joined: Duration) {
    report.row(Row {
        name: format!("{instances} instances: writes (16 clients) while the leader builds a snapshot: p99 / max (failed)"),
        roster: format!(
            "{} / {} ({})",
            ms(stall.writes.p99),
            ms(stall.writes.max),
            stall.writes.errors
        ),
        etcd: "—".into(),
        ratio: String::new(),
        target: "Roster max ≤ 100 ms",
    });
    report.row(Row {
        name: format!("{instances} instances: a new member caught up by snapshot → serving all"),
        roster: ms(joined),
        etcd: "—".into(),
        ratio: String::new(),
        target: if instances >= 1_000_000 {
            "Roster ≤ 15 s"
        } else {
            ""
        },
    });
    report.note(format!(
        "Roster snapshot with {instances} instances built in {} while 16 clients kept registering.",
        ms(stall.took)
    ));
    report.note(format!(
        "Roster snapshot with {instances} instances: {} bytes ({}).",
        stall.bytes,
        mib(stall.bytes)
    ));
}

/// Load rate, memory, restart and disk, side by side.
fn size_rows(report: &mut Report, instances: u64, rs: &Scale, es: &Scale) {
    let max = |v: &[u64]| v.iter().copied().max().unwrap_or(0);
    report.row(Row {
        name: format!("{instances} instances: load rate (256 clients)"),
        roster: format!("{:.0}/s", rs.load_rate),
        etcd: format!("{:.0}/s", es.load_rate),
        ratio: times(rs.load_rate, es.load_rate.max(1e-9)),
        target: "",
    });
    report.row(Row {
        name: format!("{instances} instances: RSS per node (max)"),
        roster: mib(max(&rs.rss)),
        etcd: mib(max(&es.rss)),
        ratio: times(max(&rs.rss) as f64, max(&es.rss).max(1) as f64),
        target: if instances >= 1_000_000 {
            "Roster ≤ 1 GiB"
        } else {
            "Roster < 300 MB"
        },
    });
    report.row(Row {
        name: format!("{instances} instances: full restart → all served"),
        roster: ms(rs.restart),
        etcd: ms(es.restart),
        ratio: times(rs.restart.as_secs_f64(), es.restart.as_secs_f64().max(1e-9)),
        target: "",
    });
    report.rows(disk_rows(instances, &rs.disk, &es.disk));
    report.note(format!(
        "RSS per node with {instances} instances: Roster {} after loading, {} after the restart; etcd {} after loading.",
        list_mib(&rs.rss),
        list_mib(&rs.rss_after_restart),
        list_mib(&es.rss)
    ));
}
