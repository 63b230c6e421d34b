//! Roster's other read paths: DNS A queries and HTTP GETs of a service on
//! each node in turn, beside the same reads by gRPC (etcd: serializable).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use super::Shared;
use crate::report::Report;
use crate::stats::Summary;
use crate::sut::System;
use crate::workload::{load_loop, reads};
use crate::{procs, Opts};

const SERVICE: &str = "dns";

/// DNS A queries and HTTP GETs of a 10-instance service against each node
/// in turn, and the same service by stale gRPC GetService (etcd: a
/// serializable get).
pub async fn dns(s: &mut Shared, o: &Opts, report: &mut Report) -> Result<()> {
    let dur = o.phase();
    for i in 0..10 {
        s.roster.register(i, SERVICE, &format!("d-{i}")).await?;
        s.etcd.register(i, SERVICE, &format!("d-{i}")).await?;
    }
    let leader = s.roster.leader().await?;
    let name = format!("{SERVICE}.service.roster.");
    for (i, p) in s.rc.procs.iter().enumerate() {
        let addr = p.dns.context("the bench's Roster nodes serve DNS")?;
        // Until the node has applied all ten.
        let whole = || async {
            dns_load(addr, &name, 10, 1, Duration::from_millis(50))
                .await
                .is_ok_and(|l| l.errors == 0 && l.throughput > 0.0)
        };
        procs::wait_until(
            "the node to answer with all 10",
            Duration::from_secs(10),
            whole,
        )
        .await?;
        let d = dns_load(addr, &name, 10, 64, dur).await?;
        let role = if i == leader { "leader" } else { "follower" };
        let label = format!(
            "DNS A of a 10-instance service, 64 UDP clients, node {} ({role})",
            i + 1
        );
        report.roster_load(&label, &d, "— (no DNS)");
        let addr = p.http.context("the bench's Roster nodes serve HTTP")?;
        let url = format!("http://{addr}/v1/services/{SERVICE}?consistency=stale");
        let h = http_load(url, 64, dur).await;
        let label = format!(
            "HTTP GET of the same service (stale), 64 clients, node {} ({role})",
            i + 1
        );
        report.roster_load(&label, &h, "— (no HTTP/JSON API here)");
    }
    let r = reads(&s.roster, 64, dur, SERVICE, 10, false).await;
    let e = reads(&s.etcd, 64, dur, SERVICE, 10, false).await;
    let name = "the same 10 instances by gRPC, stale / serializable, 64 clients over all nodes";
    report.load(name, &r, &e, "");
    Ok(())
}

/// A DNS query for `name`'s A records, as UDP carries it (id 0; set per send).
fn dns_query(name: &str) -> Vec<u8> {
    // Header: id, flags 0, one question, no records.
    let mut q = vec![0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    // The root label, type A, class IN.
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// The answer count of the reply to query `id`, skipping late replies to
/// earlier queries; an error for anything but a whole NOERROR answer.
async fn dns_answer(sock: &tokio::net::UdpSocket, buf: &mut [u8], id: u16) -> Result<u16> {
    loop {
        let n = sock.recv(buf).await?;
        if n < 12 || buf[0..2] != id.to_be_bytes() {
            continue;
        }
        anyhow::ensure!(buf[3] & 0x0f == 0, "response code {}", buf[3] & 0x0f);
        anyhow::ensure!(buf[2] & 0x02 == 0, "truncated");
        return Ok(u16::from_be_bytes([buf[6], buf[7]]));
    }
}

/// `clients` UDP clients asking `addr` for `name` back to back for `dur`, a
/// Rust stand-in for dnsperf; an answer counts only if it holds `want` records.
async fn dns_load(
    addr: SocketAddr,
    name: &str,
    want: u16,
    clients: usize,
    dur: Duration,
) -> Result<Summary> {
    let mut socks = Vec::new();
    for _ in 0..clients {
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
        sock.connect(addr).await?;
        socks.push(sock);
    }
    let query = Arc::new((socks, dns_query(name)));
    Ok(
        load_loop(query, "dns", clients, dur, move |q, c, seq| async move {
            let (socks, query) = &*q;
            let id = (seq as u16)
                .wrapping_mul(clients as u16)
                .wrapping_add(c as u16);
            let mut msg = query.clone();
            msg[0..2].copy_from_slice(&id.to_be_bytes());
            socks[c].send(&msg).await?;
            let mut buf = [0u8; 1500];
            let answer = dns_answer(&socks[c], &mut buf, id);
            let n = tokio::time::timeout(Duration::from_secs(1), answer).await??;
            anyhow::ensure!(n == want, "{n} records, not {want}");
            Ok(())
        })
        .await,
    )
}

/// `clients` HTTP/1.1 clients (keep-alive) GETting `url` back to back for
/// `dur`; an answer counts only if it is a 200.
pub(super) async fn http_load(url: String, clients: usize, dur: Duration) -> Summary {
    let ctx = Arc::new((reqwest::Client::new(), url));
    load_loop(ctx, "http", clients, dur, |ctx, _, _| async move {
        let (http, url) = &*ctx;
        let r = http.get(url).send().await?.error_for_status()?;
        r.bytes().await?;
        Ok(())
    })
    .await
}
