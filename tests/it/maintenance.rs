//! Maintenance mode: an instance (or every instance of a service) taken out
//! of rotation stays registered with its checks running, leaves every
//! healthy view, survives its own re-registration and a failover, and comes
//! back as its check says. DNS, xDS and HTTP have theirs in their modules.

use std::process::Command as Process;
use std::time::Duration;

use crate::common::*;
use roster::client::{Code, RosterClient};
use roster::proto::v1::*;

const LIMIT: Duration = Duration::from_secs(10);

fn maintenance(service: &str, id: &str, enable: bool, reason: &str) -> SetMaintenanceRequest {
    SetMaintenanceRequest {
        service: service.into(),
        id: id.into(),
        enable,
        reason: reason.into(),
        namespace: String::new(),
    }
}

async fn healthy_ids(c: &RosterClient, service: &str) -> Vec<String> {
    let r = c
        .get_service(GetServiceRequest {
            service: service.into(),
            healthy_only: true,
            ..Default::default()
        })
        .await
        .expect("healthy view");
    r.instances.into_iter().map(|i| i.id).collect()
}

async fn one(c: &RosterClient, service: &str, id: &str) -> Instance {
    let r = c
        .get_service(get_req(service, Consistency::Linearizable))
        .await
        .expect("get");
    r.instances
        .into_iter()
        .find(|i| i.id == id)
        .unwrap_or_else(|| panic!("{id} is registered"))
}

fn cli(c: &TestCluster, args: &[&str]) -> String {
    let out = Process::new(env!("CARGO_BIN_EXE_roster"))
        .args(args)
        .args(["--endpoints", &c.endpoint(1)])
        .output()
        .expect("roster");
    assert!(out.status.success(), "roster {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn an_instance_in_maintenance_leaves_the_healthy_views_and_comes_back() {
    let mut c = TestCluster::start(3).await;
    let client = c.client();
    for id in ["w-1", "w-2"] {
        register(&client, "web", id, 80).await;
    }
    let mut resolver = client.resolve("web");
    assert!(resolver.ready(LIMIT).await);
    let mut watch = client
        .watch(WatchRequest {
            service: "web".into(),
            ..Default::default()
        })
        .await
        .expect("watch");
    watch.message().await.expect("full state").expect("open");

    // Through the CLI, with a reason.
    let said = cli(
        &c,
        &[
            "maintenance",
            "enable",
            "web",
            "w-1",
            "--reason",
            "disk swap",
        ],
    );
    assert!(
        said.contains("web/w-1: in maintenance; 1 instance(s)"),
        "{said}"
    );
    let m = watch.message().await.expect("event").expect("open");
    let i = m.events[0].instance.clone().expect("instance");
    assert_eq!(
        (i.id.as_str(), i.status),
        ("w-1", HealthStatus::Maintenance as i32)
    );
    assert_eq!(i.maintenance, "disk swap");
    assert_eq!(i.check_status, HealthStatus::Passing as i32);
    assert_eq!(
        i.metadata.get("roster.maintenance").map(String::as_str),
        Some("disk swap")
    );
    assert_eq!(healthy_ids(&client, "web").await, ["w-2"]);
    c.wait_for("the resolver to drop w-1", LIMIT, || async {
        let ids: Vec<String> = resolver
            .current()
            .instances
            .iter()
            .map(|i| i.id.clone())
            .collect();
        (ids == ["w-2"]).then_some(())
    })
    .await;
    let listed = client
        .list_services(ListServicesRequest::default())
        .await
        .expect("list");
    assert_eq!(
        (listed.services[0].instances, listed.services[0].passing),
        (2, 1)
    );
    let shown = cli(&c, &["get", "web"]);
    assert!(
        shown.contains("web/w-1 10.0.0.1:80 maintenance") && shown.contains("check_status=passing"),
        "{shown}"
    );

    // Its own re-registration (a restart, a keepalive) keeps it out.
    register(&client, "web", "w-1", 80).await;
    assert_eq!(one(&client, "web", "w-1").await.maintenance, "disk swap");
    // A failover keeps it too: it is in the replicated state.
    let leader = c.leader().await;
    c.kill(leader);
    let client = c.client();
    c.wait_for("a new leader's healthy view", LIMIT, || async {
        let r = client
            .get_service(GetServiceRequest {
                service: "web".into(),
                healthy_only: true,
                ..Default::default()
            })
            .await
            .ok()?;
        let ids: Vec<String> = r.instances.into_iter().map(|i| i.id).collect();
        (ids == ["w-2"]).then_some(())
    })
    .await;
    c.start_node(leader);

    // A whole service, without a reason: the default text.
    let r = client
        .set_maintenance(maintenance("web", "", true, ""))
        .await
        .expect("every instance");
    assert_eq!(r.instances, 2, "w-1 changes its reason, w-2 enters");
    assert!(healthy_ids(&client, "web").await.is_empty());
    assert!(one(&client, "web", "w-2")
        .await
        .maintenance
        .contains("no reason"));
    let r = client
        .set_maintenance(maintenance("web", "", false, ""))
        .await
        .expect("back");
    assert_eq!(r.instances, 2);
    assert_eq!(healthy_ids(&client, "web").await, ["w-1", "w-2"]);
    let w1 = one(&client, "web", "w-1").await;
    assert_eq!(
        (w1.status, w1.maintenance.as_str()),
        (HealthStatus::Passing as i32, "")
    );
    assert!(!w1.metadata.contains_key("roster.maintenance"));
    c.wait_for("the resolver to take both back", LIMIT, || async {
        (resolver.current().instances.len() == 2).then_some(())
    })
    .await;
}

#[tokio::test]
async fn bad_maintenance_requests_say_what_is_wrong_and_change_nothing() {
    let c = TestCluster::start(1).await;
    let client = c.client();
    register(&client, "web", "w-1", 80).await;
    let before = one(&client, "web", "w-1").await;
    let e = client
        .set_maintenance(maintenance("web", "w-9", true, "x"))
        .await
        .expect_err("unknown instance");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("w-9"), "{e:?}");
    let e = client
        .set_maintenance(maintenance("nothing", "", true, "x"))
        .await
        .expect_err("unknown service");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = client
        .set_maintenance(maintenance("web", "w-1", true, &"x".repeat(300)))
        .await
        .expect_err("long reason");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("the limit is 256"), "{e:?}");
    let mut i = instance("web", "w-1", 80);
    i.metadata
        .insert("roster.maintenance".into(), "sneaky".into());
    let e = client
        .register(RegisterRequest {
            instance: Some(i),
            ..Default::default()
        })
        .await
        .expect_err("reserved key");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("roster maintenance enable"), "{e:?}");
    assert_eq!(one(&client, "web", "w-1").await, before, "nothing changed");
    assert_eq!(healthy_ids(&client, "web").await, ["w-1"]);
}
