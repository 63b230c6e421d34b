//! A real Prometheus server (`ROSTER_PROMETHEUS`, from Debian's package,
//! which `.ci/run` installs and sets) finding its targets through Roster's
//! `http_sd` endpoint: it scrapes the registered nodes' own `/metrics`
//! (`up == 1`), drops a deregistered one and one put into maintenance, and
//! follows a registration within its refresh. (Debian's build, 2.42.0+ds,
//! has no `consul_sd_configs`: it refuses the field, so the Consul API is
//! tried with a Consul client library instead, in `consul.rs`.)

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::common::ports::free_port;
use crate::common::*;
use crate::http::http_cluster;
use roster::proto::v1::{DeregisterRequest, Instance, RegisterRequest, SetMaintenanceRequest};

const LIMIT: Duration = Duration::from_secs(30);

/// The `roster_id` label of each `up` series of value `value`.
async fn up(port: u16, value: &str) -> Option<BTreeSet<String>> {
    let url = format!("http://127.0.0.1:{port}/api/v1/query?query=up%7Bjob%3D%22roster%22%7D");
    let body: Value =
        serde_json::from_str(&reqwest::get(url).await.ok()?.text().await.ok()?).ok()?;
    let series = body["data"]["result"].as_array()?;
    Some(
        series
            .iter()
            .filter(|s| s["value"][1] == value)
            .filter_map(|s| s["metric"]["roster_id"].as_str().map(String::from))
            .collect(),
    )
}

/// The `roster_id` of each target Prometheus scrapes now.
async fn active(port: u16) -> Option<BTreeSet<String>> {
    let url = format!("http://127.0.0.1:{port}/api/v1/targets?state=active");
    let body: Value =
        serde_json::from_str(&reqwest::get(url).await.ok()?.text().await.ok()?).ok()?;
    let targets = body["data"]["activeTargets"].as_array()?;
    Some(
        targets
            .iter()
            .filter_map(|t| t["labels"]["roster_id"].as_str().map(String::from))
            .collect(),
    )
}

fn ids(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

fn prometheus() -> Option<String> {
    let p = std::env::var("ROSTER_PROMETHEUS").ok();
    if p.is_none() {
        eprintln!("skipped: set ROSTER_PROMETHEUS (.ci/run installs prometheus and does)");
    }
    p
}

#[tokio::test]
async fn prometheus_scrapes_what_http_sd_lists_and_follows_changes() {
    let Some(prometheus) = prometheus() else {
        return;
    };
    let c = http_cluster("", false).await;
    // The README's scrape config, pointed at node 1.
    let scrape = doc_block("prometheus-sd-example").replace(
        "127.0.0.1:7301",
        &format!("127.0.0.1:{}", c.node(1).http_port),
    );
    scrapes_and_follows(&c, &prometheus, &scrape).await;
}

/// Registers each node's own `/metrics` as `roster-metrics`, runs
/// Prometheus with `scrape` (a `scrape_configs` section whose job is
/// `roster` and labels targets `roster_id`), and checks that it scrapes
/// them, drops a deregistered one and one in maintenance, and takes one back.
async fn scrapes_and_follows(c: &TestCluster, prometheus: &str, scrape: &str) {
    let client = c.client();
    // Each node's own /metrics, registered as a service.
    let reg = |n: u64| RegisterRequest {
        instance: Some(Instance {
            address: "127.0.0.1".into(),
            ..instance(
                "roster-metrics",
                &format!("node-{n}"),
                u32::from(c.node(n).metrics_port),
            )
        }),
        ..Default::default()
    };
    for n in 1..=3 {
        client.register(reg(n)).await.expect("register");
    }
    client
        .register(RegisterRequest {
            instance: Some(instance("not-scraped", "x", 1)),
            ..Default::default()
        })
        .await
        .expect("another service");
    let port = free_port();
    let dir = c.dir.path().join("prometheus");
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n{scrape}"),
    )
    .expect("prometheus.yml");
    let _server = Stopped(
        Command::new(prometheus)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            // Beside the nodes' logs, which a failed wait names.
            .stderr(std::fs::File::create(dir.join("prometheus.log")).expect("log"))
            .spawn()
            .expect("prometheus"),
    );
    c.wait_for("every node scraped, up == 1", LIMIT, || async {
        (up(port, "1").await? == ids(&["node-1", "node-2", "node-3"])).then_some(())
    })
    .await;
    client
        .deregister(DeregisterRequest {
            service: "roster-metrics".into(),
            id: "node-3".into(),
            namespace: String::new(),
        })
        .await
        .expect("deregister");
    c.wait_for("node-3 dropped", LIMIT, || async {
        (active(port).await? == ids(&["node-1", "node-2"])).then_some(())
    })
    .await;
    client
        .set_maintenance(SetMaintenanceRequest {
            service: "roster-metrics".into(),
            id: "node-2".into(),
            enable: true,
            reason: "upgrade".into(),
            namespace: String::new(),
        })
        .await
        .expect("maintenance");
    c.wait_for("node-2 in maintenance dropped", LIMIT, || async {
        (active(port).await? == ids(&["node-1"])).then_some(())
    })
    .await;
    client.register(reg(3)).await.expect("register again");
    c.wait_for("node-3 back", LIMIT, || async {
        (active(port).await? == ids(&["node-1", "node-3"])).then_some(())
    })
    .await;
}
