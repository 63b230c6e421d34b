//! Reads by gRPC: a 100-instance service linearizable and stale, and stale
//! reads on the leader or a follower while others write.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;

use super::Shared;
use crate::report::Report;
use crate::stats::Summary;
use crate::sut::System;
use crate::workload::{self, closed_loop};
use crate::{Opts, NODES, POOL};

/// Clients registering on the leader while stale reads are timed.
const STALE_WRITERS: usize = 64;

pub async fn query(s: &mut Shared, o: &Opts, report: &mut Report) -> Result<()> {
    for (linearizable, label) in [(true, "linearizable"), (false, "stale / serializable")] {
        eprintln!("query {label}");
        let r = workload::query(&s.roster, 64, o.phase(), linearizable).await?;
        let e = workload::query(&s.etcd, 64, o.phase(), linearizable).await?;
        let name = format!("query 100 instances, {label}, 64 clients");
        report.load_with(&name, &r, &e, "", "p99 ≤ 1×");
    }
    Ok(())
}

/// Connection `k` of those to `node`.
fn conn_to(node: usize, k: usize) -> usize {
    node + NODES * (k % (POOL / NODES))
}

#[derive(Clone, Copy)]
enum Role {
    Leader,
    Follower,
}

pub async fn stale_under_writes(s: &mut Shared, o: &Opts, report: &mut Report) -> Result<()> {
    for (role, on) in [(Role::Leader, "the leader"), (Role::Follower, "a follower")] {
        for writers in [0, STALE_WRITERS] {
            eprintln!("stale reads on {on}, {writers} writers");
            let (r, rw) = stale_reads(&s.roster, role, writers, o.phase()).await?;
            let (e, ew) = stale_reads(&s.etcd, role, writers, o.phase()).await?;
            let name = format!(
                "stale / serializable read of 100 instances on {on}, {writers} clients registering"
            );
            report.latency(&name, &r, &e, "");
            if writers > 0 {
                let writes = format!("{name}, writes");
                report.throughput(&writes, &rw, &ew, "");
                report.errors(&writes, &rw, &ew);
            }
        }
    }
    Ok(())
}

/// One reader issuing stale (etcd: serializable) reads of a 100-instance
/// service back to back on the `role` node, while `writers` clients register
/// other instances on the leader. A stale read waits only for the node's own
/// state, so its latency shows what applying the writes costs readers there.
/// Returns the reads and the writes.
async fn stale_reads<S: System>(
    sys: &Arc<S>,
    role: Role,
    writers: usize,
    dur: Duration,
) -> Result<(Summary, Summary)> {
    const SERVICE: &str = "stale";
    const INSTANCES: usize = 100;
    let leader = sys.leader().await?;
    let node = match role {
        Role::Leader => leader,
        Role::Follower => (leader + 1) % NODES,
    };
    let reader = conn_to(node, 0);
    for i in 0..INSTANCES {
        sys.register(i, SERVICE, &format!("s-{i}")).await?;
    }
    crate::procs::wait_until(
        "the read node to hold every instance",
        Duration::from_secs(30),
        || async {
            sys.query(reader, SERVICE, false)
                .await
                .is_ok_and(|n| n == INSTANCES)
        },
    )
    .await?;
    let reads = closed_loop(sys, 1, dur, move |s, _, _| async move {
        let n = s.query(reader, SERVICE, false).await?;
        anyhow::ensure!(n == INSTANCES, "stale read returned {n} instances");
        Ok(())
    });
    // Writers use the leader's other connections, never the reader's.
    let writes = closed_loop(sys, writers, dur, move |s, c, n| async move {
        let conn = conn_to(leader, 1 + c % (POOL / NODES - 1));
        s.register(conn, "stale-writes", &format!("w{c}-{n}")).await
    });
    Ok(tokio::join!(reads, writes))
}
