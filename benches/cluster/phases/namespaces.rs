//! Namespaces (issue 33): registrations spread over 100 namespaces against
//! the same load in one, on the same cluster (Roster alone: etcd has none).

use std::sync::Arc;

use anyhow::Result;

use super::Shared;
use crate::report::{times, Report, Row};
use crate::stats::{ms, Summary};
use crate::sut::Roster;
use crate::workload::closed_loop;
use crate::Opts;

const NAMESPACES: usize = 100;
const CLIENTS: usize = 64;

pub async fn namespaces(s: &mut Shared, o: &Opts, report: &mut Report) -> Result<()> {
    let roster = &s.roster;
    for i in 0..NAMESPACES {
        roster.create_namespace(&format!("ns-{i}")).await?;
    }
    let dur = o.phase();
    eprintln!("register, {CLIENTS} clients, one namespace");
    let one = register(roster, dur, |_, _| String::new()).await;
    eprintln!("register, {CLIENTS} clients, {NAMESPACES} namespaces");
    let many = register(roster, dur, |c, n| {
        format!("ns-{}", (c + n as usize) % NAMESPACES)
    })
    .await;
    let show = |s: &Summary| format!("{:.0}/s, p99 {}", s.throughput, ms(s.p99));
    report.row(Row {
        name: format!(
            "register, {CLIENTS} clients: over {NAMESPACES} namespaces (Roster column) \
             against one namespace (etcd column: Roster again)"
        ),
        roster: show(&many),
        etcd: show(&one),
        ratio: times(many.throughput, one.throughput),
        target: "≥ 0.95×",
    });
    Ok(())
}

/// `CLIENTS` clients registering back to back, each write in the namespace
/// `ns(client, n)` names (empty: `default`), over 16 services per namespace.
async fn register(
    roster: &Arc<Roster>,
    dur: std::time::Duration,
    ns: fn(usize, u64) -> String,
) -> Summary {
    closed_loop(roster, CLIENTS, dur, move |s, c, n| async move {
        let service = format!("nsreg-{}", c % 16);
        s.register_in(c, &ns(c, n), &service, &format!("c{c}-{n}"))
            .await
    })
    .await
}
