//! HAProxy (`ROSTER_HAPROXY`, which `.ci/run` installs and sets) balancing
//! over Roster's DNS SRV records in RFC 2782 form: `server-template` asks
//! for `_web._tcp.service.roster`, spreads requests over the registered
//! servers, and follows a registration and a deregistration.

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::ports::free_port;
use crate::common::targets::{Kind, Target};
use crate::common::*;
use roster::proto::v1::{DeregisterRequest, Instance, RegisterRequest, SetMaintenanceRequest};

const LIMIT: Duration = Duration::from_secs(20);

/// Which targets answer `n` requests for `host` through the proxy at
/// `port`: those whose request count grew.
pub async fn answering(port: u16, host: &str, targets: &[Target], n: usize) -> BTreeSet<usize> {
    let before: Vec<u64> = targets.iter().map(Target::probes).collect();
    let http = reqwest::Client::new();
    for _ in 0..n {
        let _ = http
            .get(format!("http://127.0.0.1:{port}/"))
            .header(reqwest::header::HOST, host)
            .timeout(Duration::from_secs(2))
            .send()
            .await;
    }
    targets
        .iter()
        .zip(before)
        .enumerate()
        .filter(|(_, (t, b))| t.probes() > *b)
        .map(|(i, _)| i)
        .collect()
}

#[tokio::test]
async fn haproxy_balances_over_srv_records_and_follows_changes() {
    let Ok(haproxy) = std::env::var("ROSTER_HAPROXY") else {
        eprintln!("skipped: set ROSTER_HAPROXY (.ci/run installs haproxy and does)");
        return;
    };
    let setup = Setup {
        dns: Some("ttl_s = 0".into()),
        ..Setup::default()
    };
    let c = TestCluster::start_setup(3, "", setup)
        .await
        .expect("cluster");
    let client = c.client();
    let mut targets = Vec::new();
    for _ in 0..3 {
        targets.push(Target::start(Kind::Http).await);
    }
    let reg = |i: usize| RegisterRequest {
        instance: Some(Instance {
            address: "127.0.0.1".into(),
            ..instance("web", &format!("web-{i}"), targets[i].port())
        }),
        ..Default::default()
    };
    for i in 0..2 {
        client.register(reg(i)).await.expect("register");
    }
    let port = free_port();
    let dns = c.node(c.leader().await).dns_port;
    let config = c.dir.path().join("haproxy.cfg");
    // The README's resolvers and backend, pointed at the leader's DNS.
    let backend =
        doc_block("haproxy-example").replace("127.0.0.1:7201", &format!("127.0.0.1:{dns}"));
    std::fs::write(
        &config,
        format!(
            "defaults\n  mode http\n  timeout connect 1s\n  timeout client 5s\n  timeout server 5s\n\
             frontend fe\n  bind 127.0.0.1:{port}\n  default_backend web\n{backend}"
        ),
    )
    .expect("haproxy.cfg");
    let _proxy = Stopped(
        Command::new(&haproxy)
            .args(["-db", "-f"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy"),
    );
    c.wait_for("HAProxy to reach both servers", LIMIT, || async {
        (answering(port, "web", &targets, 10).await == BTreeSet::from([0, 1])).then_some(())
    })
    .await;
    client.register(reg(2)).await.expect("a third");
    c.wait_for("HAProxy to add the third", LIMIT, || async {
        (answering(port, "web", &targets, 12).await == BTreeSet::from([0, 1, 2])).then_some(())
    })
    .await;
    client
        .deregister(DeregisterRequest {
            service: "web".into(),
            id: "web-0".into(),
            namespace: String::new(),
        })
        .await
        .expect("deregister");
    c.wait_for("HAProxy to drop the first", LIMIT, || async {
        (answering(port, "web", &targets, 12).await == BTreeSet::from([1, 2])).then_some(())
    })
    .await;
    // Maintenance takes a server out as a deregistration does.
    client
        .set_maintenance(SetMaintenanceRequest {
            service: "web".into(),
            id: "web-1".into(),
            enable: true,
            reason: "drain".into(),
            namespace: String::new(),
        })
        .await
        .expect("maintenance");
    c.wait_for("HAProxy to drop the one in maintenance", LIMIT, || async {
        (answering(port, "web", &targets, 12).await == BTreeSet::from([2])).then_some(())
    })
    .await;
}
