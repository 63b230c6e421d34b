//! The phases, a file for each group of related ones; `PHASES` in main.rs
//! says which runs when. Also the clusters the phases run on: the shared ones
//! that the first phases use in turn, and the fresh ones the later phases
//! start for themselves.

pub mod consul;
pub mod disk;
pub mod dns;
pub mod failover;
pub mod liveness;
pub mod namespaces;
pub mod reads;
pub mod replicas;
pub mod rtt;
pub mod scale;
pub mod secure;
pub mod watch;
pub mod writes;

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;

use crate::procs::{self, Cluster, Peers};
use crate::report::{list_mib, Report};
use crate::sut::{Etcd, Roster, System};
use crate::{NODES, POOL};

/// A phase's run, as the table holds it.
pub type Done<'a> = Pin<Box<dyn Future<Output = Result<()>> + 'a>>;

/// The watch rows' largest count, 50,000 streams over the pool's 32
/// connections (about 16,700 per node, 1,600 per connection), is above the
/// default limits (10,000 and 1,000); etcd has none.
pub const WATCH_LIMITS: &str =
    "[limits]\nmax_watch_streams = 60000\nmax_watch_streams_per_connection = 5000\n";

/// A Roster cluster and an etcd cluster started once, for the phases that
/// take them in turn.
pub struct Shared {
    pub roster: Arc<Roster>,
    pub etcd: Arc<Etcd>,
    pub rc: Cluster,
    pub ec: Cluster,
    /// The watch phase ran (its note is written when the clusters go).
    pub watched: bool,
}

impl Shared {
    pub async fn start(dir: &Path) -> Result<Shared> {
        let rc = procs::roster_cluster(dir, NODES, Peers::Direct, WATCH_LIMITS, true)?;
        let ec = procs::etcd(dir, NODES, Peers::Direct, &[])?;
        let roster = Arc::new(Roster::new(&rc.endpoints(), POOL)?);
        let etcd = etcd_client(&ec).await?;
        wait_leader(&roster).await?;
        wait_leader(&etcd).await?;
        Ok(Shared {
            roster,
            etcd,
            rc,
            ec,
            watched: false,
        })
    }

    /// Notes the clusters' memory after the phases, and stops them.
    pub fn release(self, report: &mut Report) {
        report.note(format!(
            "RSS per node after the phases above: Roster {}, etcd {}.",
            list_mib(&self.rc.rss()),
            list_mib(&self.ec.rss())
        ));
        if self.watched {
            report.note(format!(
                "Roster watch opens answered UNAVAILABLE (retried after 20 ms, as clients are told to) in the watch rows: {}.",
                self.roster.watch_retries.load(Ordering::Relaxed)
            ));
        }
    }
}

/// A client of a fresh Roster cluster, once the cluster has a leader.
pub async fn roster_client(rc: &Cluster) -> Result<Arc<Roster>> {
    let roster = Arc::new(Roster::new(&rc.endpoints(), POOL)?);
    wait_leader(&roster).await?;
    Ok(roster)
}

/// A fresh etcd cluster under `dir`, and its client once it has a leader.
pub async fn fresh_etcd(dir: &Path) -> Result<(Cluster, Arc<Etcd>)> {
    let ec = procs::etcd(dir, NODES, Peers::Direct, &[])?;
    let etcd = etcd_client(&ec).await?;
    wait_leader(&etcd).await?;
    Ok((ec, etcd))
}

/// Connects the etcd load generator once the cluster accepts clients.
pub async fn etcd_client(ec: &Cluster) -> Result<Arc<Etcd>> {
    procs::wait_until(
        "etcd to accept clients",
        Duration::from_secs(30),
        || async { Etcd::new(&ec.endpoints(), 1).await.is_ok() },
    )
    .await?;
    Ok(Arc::new(Etcd::new(&ec.endpoints(), POOL).await?))
}

pub async fn wait_leader<S: System>(sys: &Arc<S>) -> Result<()> {
    procs::wait_until(
        &format!("a {} leader", sys.name()),
        Duration::from_secs(30),
        || async { sys.leader().await.is_ok() && sys.count().await.is_ok() },
    )
    .await
    .map(|_| ())
}
