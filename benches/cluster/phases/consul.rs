//! The HTTP side (issue 34): reads of a 100-instance service through
//! Roster's own HTTP route and through its Consul API, on a follower, and
//! how soon a Consul blocking query wakes after a registration, beside the
//! gRPC watch delay on the same cluster (Roster only: etcd serves neither).

use std::collections::HashSet;
use std::net::SocketAddr;

use anyhow::{anyhow, Context, Result};

use super::dns::http_load;
use super::Shared;
use crate::report::{Report, Row};
use crate::stats::ms;
use crate::sut::{System, Watch};
use crate::workload::{delivery_delay, watch_delay};
use crate::Opts;

const SERVICE: &str = "q100";
const CLIENTS: usize = 64;
/// Long polls, and gRPC watchers beside them.
const WAITERS: usize = 100;
const EVENTS: usize = 50;
/// What issue 34 measured for r-nacos 0.8.8 with wrk, 64 connections, on
/// this machine: the target for Roster's HTTP reads.
const R_NACOS: &str = "≥ 19,173/s (r-nacos 0.8.8, issue 34)";

pub async fn consul(s: &mut Shared, o: &Opts, report: &mut Report) -> Result<()> {
    let dur = o.phase();
    for i in 0..100 {
        s.roster.register(i, SERVICE, &format!("q-{i}")).await?;
    }
    let leader = s.roster.leader().await?;
    let f = (0..s.rc.procs.len())
        .find(|&i| i != leader)
        .context("a follower")?;
    let addr = s.rc.procs[f]
        .http
        .context("the bench's Roster nodes serve HTTP")?;
    for (label, path) in [
        (
            "HTTP GET /v1/services (stale)",
            format!("/v1/services/{SERVICE}?consistency=stale"),
        ),
        (
            "Consul API GET /v1/health/service (stale)",
            format!("/v1/health/service/{SERVICE}?stale"),
        ),
        (
            "Consul API GET /v1/catalog/service (stale)",
            format!("/v1/catalog/service/{SERVICE}?stale"),
        ),
    ] {
        eprintln!("{label}, {CLIENTS} clients");
        let h = http_load(format!("http://{addr}{path}"), CLIENTS, dur).await;
        report.row(Row {
            name: format!(
                "{label} of a 100-instance service, {CLIENTS} clients, a follower: \
                 throughput / p99 (errors)"
            ),
            roster: format!("{:.0}/s / {} ({})", h.throughput, ms(h.p99), h.errors),
            etcd: "—".into(),
            ratio: "—".into(),
            target: R_NACOS,
        });
    }
    eprintln!("Consul blocking queries, {WAITERS} long polls");
    let roster = s.roster.clone();
    let polls = delivery_delay(
        &roster,
        WAITERS,
        (EVENTS, EVENTS),
        move |_, _| LongPoll::open(addr),
        |k, id| {
            let roster = roster.clone();
            async move { roster.register(k, "bq", &id).await }
        },
    )
    .await?;
    eprintln!("gRPC watch, {WAITERS} watchers");
    let grpc = watch_delay(&s.roster, WAITERS, EVENTS).await?;
    report.latency(
        &format!(
            "Consul blocking query wake-up, {WAITERS} long polls on a follower (Roster column) \
             against the gRPC watch delay, {WAITERS} watchers (etcd column: Roster's gRPC watch)"
        ),
        &polls.after_ack,
        &grpc.after_ack,
        "",
    );
    Ok(())
}

/// A Consul blocking query on `bq`, asked again with the index of each
/// answer, as Consul clients do.
struct LongPoll {
    http: reqwest::Client,
    url: String,
    index: String,
    known: HashSet<String>,
}

impl LongPoll {
    async fn open(addr: SocketAddr) -> Result<LongPoll> {
        let mut p = LongPoll {
            http: reqwest::Client::new(),
            url: format!("http://{addr}/v1/health/service/bq"),
            index: "0".into(),
            known: HashSet::new(),
        };
        // The first answer does not block: the state and its index.
        p.ask().await?;
        Ok(p)
    }

    /// The ids of the answer not seen before.
    async fn ask(&mut self) -> Result<Vec<String>> {
        let r = self
            .http
            .get(format!("{}?stale&index={}&wait=60s", self.url, self.index))
            .send()
            .await?
            .error_for_status()?;
        self.index = r
            .headers()
            .get("x-consul-index")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| anyhow!("no X-Consul-Index"))?
            .to_string();
        let body: serde_json::Value = serde_json::from_slice(&r.bytes().await?)?;
        let ids = body
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["Service"]["ID"].as_str().map(String::from));
        Ok(ids.filter(|id| self.known.insert(id.clone())).collect())
    }
}

impl Watch for LongPoll {
    async fn next_puts(&mut self) -> Result<Vec<String>> {
        loop {
            let new = self.ask().await?;
            if !new.is_empty() {
                return Ok(new);
            }
        }
    }
}
