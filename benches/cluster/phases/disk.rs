//! What writing costs on disk: bytes written per acknowledged write and the
//! data directory, here at 100 instances and in the scale phase at size.

use std::sync::Arc;

use anyhow::Result;

use super::Shared;
use crate::procs::Cluster;
use crate::report::{size, times, Report, Row};
use crate::sut::System;
use crate::workload::{load, retried};
use crate::Opts;

/// 100 instances on the shared clusters, then `Disk` of each.
pub async fn disk(s: &mut Shared, _: &Opts, report: &mut Report) -> Result<()> {
    load(&s.roster, 0..100, 100).await?;
    load(&s.etcd, 0..100, 100).await?;
    let r = disk_cost(&s.roster, &s.rc).await?;
    let e = disk_cost(&s.etcd, &s.ec).await?;
    report.rows(disk_rows(100, &r, &e));
    Ok(())
}

/// What writing costs on disk at a catalogue size.
pub struct Disk {
    /// Bytes written to storage per acknowledged registration (the most of
    /// any node), one client registering one instance after another.
    per_write: u64,
    /// The largest data directory afterwards.
    dir: u64,
}

/// Measures `Disk` with 500 registrations sent to the leader one at a time.
pub async fn disk_cost<S: System>(sys: &Arc<S>, cluster: &Cluster) -> Result<Disk> {
    const WRITES: u64 = 500;
    let leader = sys.leader().await?;
    let before = cluster.written();
    for n in 0..WRITES {
        let id = format!("d-{n}");
        retried(|| sys.register(leader, "disk", &id)).await?;
    }
    let after = cluster.written();
    let most = before
        .iter()
        .zip(&after)
        .map(|(b, a)| a.saturating_sub(*b))
        .max()
        .unwrap_or(0);
    Ok(Disk {
        per_write: most / WRITES,
        dir: cluster.max_dir(),
    })
}

/// The two rows of `Disk` at `instances`.
pub fn disk_rows(instances: u64, r: &Disk, e: &Disk) -> [Row; 2] {
    let ratio = |a: u64, b: u64| times(a as f64, b.max(1) as f64);
    [
        Row {
            name: format!(
                "{instances} instances: bytes written to disk per acknowledged write (1 client, most of any node)"
            ),
            roster: format!("{:.1} KiB", r.per_write as f64 / 1024.0),
            etcd: format!("{:.1} KiB", e.per_write as f64 / 1024.0),
            ratio: ratio(r.per_write, e.per_write),
            target: "Roster ≤ etcd",
        },
        Row {
            name: format!("{instances} instances: data dir per node"),
            roster: size(r.dir),
            etcd: size(e.dir),
            ratio: ratio(r.dir, e.dir),
            target: "Roster ≤ etcd",
        },
    ]
}
