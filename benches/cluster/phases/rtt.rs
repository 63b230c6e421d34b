//! Round trips between nodes: registrations and linearizable reads with the
//! nodes 0, 10 and 50 ms apart.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;

use super::{etcd_client, wait_leader};
use crate::procs::{self, Peers};
use crate::proxy::{Link, Proxy};
use crate::report::Report;
use crate::sut::{Etcd, Roster, System};
use crate::workload::{query, register};
use crate::{Opts, POOL};

/// Round trips between nodes the `rtt` phase measures at.
const RTTS_MS: [u64; 3] = [0, 10, 50];
/// etcd's defaults, kept at every round trip in `RTTS_MS`: its tuning guide
/// wants the heartbeat around the round trip between members and the election
/// timeout at least 10× that round trip, which 100/1000 ms covers up to 50 ms
/// (https://etcd.io/docs/v3.4/tuning/).
const ETCD_RTT_FLAGS: [&str; 2] = ["--heartbeat-interval=100", "--election-timeout=1000"];

/// Writes and linearizable reads with the nodes `RTTS_MS` apart, on fresh
/// clusters whose peers dial each other through a delaying proxy; the load
/// generator dials the nodes directly, so only node-to-node traffic is delayed.
pub async fn rtt(dir: &Path, o: &Opts, report: &mut Report) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut proxies = Vec::new();
    let mut front = |target: SocketAddr| -> Result<SocketAddr> {
        let p = Proxy::spawn(SocketAddr::from(([127, 0, 0, 1], 0)), target)?;
        let addr = p.addr();
        proxies.push(p);
        Ok(addr)
    };
    let rc = procs::roster(dir, 3, Peers::Front(&mut front))?;
    let flags = ETCD_RTT_FLAGS.map(String::from);
    let ec = procs::etcd(dir, 3, Peers::Front(&mut front), &flags)?;
    let roster = Arc::new(Roster::new(&rc.endpoints(), POOL)?);
    let etcd = etcd_client(&ec).await?;
    let mut elections = Vec::new();
    for rtt_ms in RTTS_MS {
        // Half each way rather than all on requests: an etcd node sends its
        // messages to a peer over a stream the peer dialed, so its messages and
        // their replies alike travel the proxies' reply direction.
        let half = Link {
            delay: Duration::from_millis(rtt_ms) / 2,
            ..Link::default()
        };
        for p in &proxies {
            p.set_both(half.clone());
        }
        elections.push(at_rtt(&roster, &etcd, rtt_ms, o.phase(), report).await?);
    }
    report.note(format!(
        "RTT rows: a proxy in front of each node's peer port delays every byte between nodes by half the round trip \
         each way; clients reach the nodes directly. Roster with its default timing (`[raft] network = \"lan\"`: \
         heartbeat 50 ms, RPC timeout 500 ms, elections after 600-900 ms); etcd with {} (its defaults).",
        ETCD_RTT_FLAGS.join(" ")
    ));
    report.note(format!(
        "Raft term increase while measuring the RTT rows (0: no election): {}.",
        elections.join("; ")
    ));
    Ok(())
}

/// The rows at one round trip; returns the elections there were meanwhile.
async fn at_rtt(
    roster: &Arc<Roster>,
    etcd: &Arc<Etcd>,
    rtt_ms: u64,
    dur: Duration,
    report: &mut Report,
) -> Result<String> {
    wait_leader(roster).await?;
    wait_leader(etcd).await?;
    let terms = (roster.term().await?, etcd.term().await?);

    eprintln!("register, RTT {rtt_ms} ms");
    let r = register(roster, 64, dur).await;
    let e = register(etcd, 64, dur).await;
    let name = format!("register, RTT {rtt_ms} ms, 64 clients");
    report.load(&name, &r, &e, "Roster ≥ etcd");

    eprintln!("query linearizable, RTT {rtt_ms} ms");
    let r = query(roster, 64, dur, true).await?;
    let e = query(etcd, 64, dur, true).await?;
    let name = format!("query 100 instances, linearizable, RTT {rtt_ms} ms, 64 clients");
    report.load(&name, &r, &e, "Roster ≥ etcd");

    Ok(format!(
        "{rtt_ms} ms: Roster +{}, etcd +{}",
        roster.term().await?.saturating_sub(terms.0),
        etcd.term().await?.saturating_sub(terms.1)
    ))
}
