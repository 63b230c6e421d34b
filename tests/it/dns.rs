//! DNS against a 3-node cluster, asked with a real stub resolver
//! (hickory-resolver): answers from a follower, SRV targets that resolve,
//! tags, instance names, NXDOMAIN against an empty answer, truncation and
//! the retry over TCP, tokens. `dig` runs in `tests/outside.rs`.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::common::*;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::{Resolver, TokioResolver};
use roster::proto::v1::health_check::Kind as CheckKind;
use roster::proto::v1::{
    CreateNamespaceRequest, CreateTokenRequest, DeregisterRequest, HealthCheck, Instance,
    RegisterRequest, Role, TtlCheck,
};

const LIMIT: Duration = Duration::from_secs(20);

/// A stub resolver asking only `addr`, without a cache; `edns` says whether
/// it offers a buffer larger than 512 bytes.
fn resolver(addr: SocketAddr, udp: bool, tcp: bool, edns: bool) -> TokioResolver {
    let mut conns = Vec::new();
    if udp {
        conns.push(ConnectionConfig::udp());
    }
    if tcp {
        conns.push(ConnectionConfig::tcp());
    }
    for c in &mut conns {
        c.port = addr.port();
    }
    let ns = NameServerConfig::new(addr.ip(), true, conns);
    let mut b = Resolver::builder_with_config(
        ResolverConfig::from_name_servers(vec![ns]),
        TokioRuntimeProvider::default(),
    );
    let o = b.options_mut();
    o.cache_size = 0;
    o.use_hosts_file = ResolveHosts::Never;
    o.attempts = 0;
    o.edns0 = edns;
    o.timeout = Duration::from_secs(2);
    b.build().expect("resolver")
}

/// The records of the answer to `name`, or the resolver's error.
async fn ask(r: &TokioResolver, name: &str, t: RecordType) -> Result<Vec<RData>, NetError> {
    let l = r.lookup(name, t).await?;
    Ok(l.answers().iter().map(|rec| rec.data.clone()).collect())
}

fn ips(records: &[RData]) -> BTreeSet<IpAddr> {
    records
        .iter()
        .filter_map(|r| match r {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

/// A TTL check nobody renews.
fn unrenewed() -> HealthCheck {
    HealthCheck {
        kind: Some(CheckKind::Ttl(TtlCheck { ttl_ms: 1500 })),
        ..Default::default()
    }
}

fn dns_addr(c: &TestCluster, id: u64) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], c.node(id).dns_port))
}

async fn put(c: &TestCluster, id: &str, address: &str, port: u32, f: impl FnOnce(&mut Instance)) {
    let mut inst = instance("web", id, port);
    inst.address = address.into();
    f(&mut inst);
    c.client()
        .register(RegisterRequest {
            instance: Some(inst),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("register {id}: {e}"));
}

async fn follower(c: &TestCluster) -> u64 {
    let leader = c.leader().await;
    (1..=3).find(|id| *id != leader).expect("a follower")
}

#[tokio::test]
async fn a_follower_answers_srv_a_aaaa_tags_and_instances() {
    let setup = Setup {
        dns: Some("ttl_s = 0".into()),
        ..Setup::default()
    };
    let c = TestCluster::start_setup(3, "", setup)
        .await
        .expect("cluster");
    put(&c, "web-1", "10.0.0.1", 8080, |i| {
        i.tags = vec!["v2".into()];
        i.weight = 5;
    })
    .await;
    put(&c, "web-2", "10.0.0.2", 8081, |_| {}).await;
    put(&c, "web-3.eu", "::1", 8082, |_| {}).await;
    // Never renewed: critical once its TTL runs out, and so out of the answers.
    put(&c, "web-down", "10.0.0.9", 8083, |i| {
        i.check = Some(unrenewed())
    })
    .await;
    let mut lonely = instance("lonely", "l-1", 9000);
    lonely.check = Some(unrenewed());
    c.client()
        .register(RegisterRequest {
            instance: Some(lonely),
            ..Default::default()
        })
        .await
        .expect("register lonely");

    let f = follower(&c).await;
    let r = resolver(dns_addr(&c, f), true, true, true);
    // The follower answers once it has applied the writes and web-down's
    // status change.
    let srv = c
        .wait_for("the follower's SRV answer", LIMIT, || async {
            let got = ask(&r, "web.service.roster.", RecordType::SRV).await.ok()?;
            (got.len() == 3).then_some(got)
        })
        .await;
    let mut seen = BTreeSet::new();
    for rec in &srv {
        let RData::SRV(s) = rec else {
            panic!("not an SRV record: {rec:?}")
        };
        let target = s.target.to_ascii();
        // Every target resolves to its instance's address.
        let (want, t) = match s.port {
            8080 => ("10.0.0.1", RecordType::A),
            8081 => ("10.0.0.2", RecordType::A),
            8082 => ("::1", RecordType::AAAA),
            p => panic!("port {p} of a critical instance or none: {rec:?}"),
        };
        assert_eq!(s.weight, if s.port == 8080 { 5 } else { 1 }, "{rec:?}");
        let got = ask(&r, &target, t).await.expect("the SRV target resolves");
        assert_eq!(
            ips(&got),
            BTreeSet::from([want.parse().expect("ip")]),
            "{target}"
        );
        seen.insert(target);
    }
    assert!(
        seen.contains("web-3.eu.web.instance.roster."),
        "an id with a dot keeps it: {seen:?}"
    );

    let a = ask(&r, "web.service.roster.", RecordType::A)
        .await
        .expect("A");
    let want: BTreeSet<IpAddr> = ["10.0.0.1", "10.0.0.2"]
        .map(|s| s.parse().expect("ip"))
        .into();
    assert_eq!(ips(&a), want, "passing instances only");
    let aaaa = ask(&r, "WEB.Service.roster.", RecordType::AAAA)
        .await
        .expect("AAAA, any case");
    assert_eq!(ips(&aaaa), BTreeSet::from(["::1".parse().expect("ip")]));
    let tagged = ask(&r, "v2.web.service.roster.", RecordType::A)
        .await
        .expect("tag");
    assert_eq!(
        ips(&tagged),
        BTreeSet::from(["10.0.0.1".parse().expect("ip")])
    );
    // An instance's own name answers whatever its health.
    let down = ask(&r, "web-down.web.instance.roster.", RecordType::A)
        .await
        .expect("instance");
    assert_eq!(
        ips(&down),
        BTreeSet::from(["10.0.0.9".parse().expect("ip")])
    );

    let e = ask(&r, "nope.service.roster.", RecordType::A)
        .await
        .expect_err("unknown");
    assert!(e.is_nx_domain(), "an unknown service is NXDOMAIN: {e:?}");
    let e = c
        .wait_for("lonely's instance critical", LIMIT, || async {
            ask(&r, "lonely.service.roster.", RecordType::A).await.err()
        })
        .await;
    assert!(
        e.is_no_records_found() && !e.is_nx_domain(),
        "a service with no passing instance is an empty NOERROR: {e:?}"
    );
    let e = ask(&r, "v9.web.service.roster.", RecordType::A)
        .await
        .expect_err("no tag");
    assert!(!e.is_nx_domain(), "{e:?}");
    let e = ask(&r, "x.web.instance.roster.", RecordType::A)
        .await
        .expect_err("no such id");
    assert!(e.is_nx_domain(), "{e:?}");

    // A change reaches the answers as the follower applies it.
    c.client()
        .deregister(DeregisterRequest {
            namespace: Default::default(),
            service: "web".into(),
            id: "web-2".into(),
        })
        .await
        .expect("deregister");
    c.wait_for("web-2 gone from the follower's answer", LIMIT, || async {
        let a = ask(&r, "web.service.roster.", RecordType::A).await.ok()?;
        (ips(&a) == BTreeSet::from(["10.0.0.1".parse().expect("ip")])).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_large_answer_is_truncated_over_udp_and_whole_over_tcp() {
    let setup = Setup {
        dns: Some(String::new()),
        ..Setup::default()
    };
    let c = TestCluster::start_setup(3, "", setup)
        .await
        .expect("cluster");
    // 100 A records (16 bytes each) do not fit the 1,232 bytes the resolver offers.
    let client = c.client();
    let client = &client;
    let regs = (0..100u32).map(|n| async move {
        let mut inst = instance("big", &format!("b-{n}"), 8000 + n);
        inst.address = format!("10.0.1.{n}");
        client
            .register(RegisterRequest {
                instance: Some(inst),
                ..Default::default()
            })
            .await
            .expect("register")
    });
    futures::future::join_all(regs).await;
    let node = dns_addr(&c, follower(&c).await);
    let both = resolver(node, true, true, true);
    let all = c
        .wait_for("all 100 answers, retried over TCP", LIMIT, || async {
            let got = ask(&both, "big.service.roster.", RecordType::A)
                .await
                .ok()?;
            (got.len() == 100).then_some(got)
        })
        .await;
    assert_eq!(ips(&all).len(), 100);
    let udp = resolver(node, true, false, true);
    let e = ask(&udp, "big.service.roster.", RecordType::A)
        .await
        .expect_err("truncated");
    assert!(matches!(e, NetError::Truncated), "UDP alone: {e:?}");
    let tcp = resolver(node, false, true, false);
    let got = ask(&tcp, "big.service.roster.", RecordType::A)
        .await
        .expect("TCP");
    assert_eq!(got.len(), 100);
}

#[tokio::test]
async fn with_auth_dns_answers_with_its_token() {
    let secret = format!("dns-test-{:032x}", fastrand::u128(..));
    let setup = Setup {
        auth: true,
        auth_secret: Some(secret.clone()),
        dns: Some(format!("token = \"{secret}\"")),
        ..Setup::default()
    };
    let c = TestCluster::start_setup(3, "[auth]\nenabled = true\n", setup)
        .await
        .expect("cluster");
    let mut inst = instance("web", "web-1", 8080);
    inst.address = "10.0.0.1".into();
    c.client()
        .register(RegisterRequest {
            instance: Some(inst),
            ..Default::default()
        })
        .await
        .expect("register");
    let r = resolver(dns_addr(&c, follower(&c).await), true, true, true);
    c.wait_for("an answer under the configured token", LIMIT, || async {
        let a = ask(&r, "web.service.roster.", RecordType::A).await.ok()?;
        (ips(&a) == BTreeSet::from(["10.0.0.1".parse().expect("ip")])).then_some(())
    })
    .await;
}

#[tokio::test]
async fn tokens_without_auth_are_warned_about_at_start() {
    let setup = Setup {
        dns: Some("token = \"s3cret\"".into()),
        ..Setup::default()
    };
    let c = TestCluster::start_setup(1, "[xds]\ntoken = \"s3cret\"\n", setup)
        .await
        .expect("cluster");
    let log = c.log(1);
    for name in ["[xds] token", "[dns] token"] {
        let warned = log.lines().any(|l| {
            l.contains("WARN")
                && l.contains(&format!("{name} is set but has no effect without [auth]"))
        });
        assert!(warned, "no WARN line for {name}:\n{log}");
    }
}

/// `<service>.service.<namespace>.<domain>` names a namespace's service;
/// the name without a namespace stays `default`'s.
#[tokio::test]
async fn a_namespace_is_named_after_service_and_instance() {
    let setup = Setup {
        dns: Some("ttl_s = 0".into()),
        ..Setup::default()
    };
    let c = TestCluster::start_setup(3, "", setup)
        .await
        .expect("cluster");
    let client = c.client();
    client
        .create_namespace(CreateNamespaceRequest {
            name: "team-a".into(),
            quotas: None,
        })
        .await
        .expect("namespace");
    put(&c, "web-d", "10.0.0.1", 8080, |_| {}).await;
    let mut a = instance("web", "web-a", 8081);
    a.address = "10.0.0.2".into();
    client
        .register(RegisterRequest {
            instance: Some(a),
            namespace: "team-a".into(),
            ..Default::default()
        })
        .await
        .expect("register in team-a");
    let r = resolver(dns_addr(&c, c.leader().await), true, true, true);
    let in_a = ask(&r, "web.service.team-a.roster.", RecordType::A)
        .await
        .expect("team-a's web");
    assert_eq!(
        ips(&in_a),
        BTreeSet::from(["10.0.0.2".parse().expect("ip")])
    );
    let default = ask(&r, "web.service.roster.", RecordType::A)
        .await
        .expect("default's web");
    assert_eq!(
        ips(&default),
        BTreeSet::from(["10.0.0.1".parse().expect("ip")])
    );
    let srv = ask(&r, "web.service.team-a.roster.", RecordType::SRV)
        .await
        .expect("SRV");
    let targets: Vec<String> = srv
        .iter()
        .filter_map(|d| match d {
            RData::SRV(s) => Some(s.target.to_ascii()),
            _ => None,
        })
        .collect();
    assert_eq!(targets, ["web-a.web.instance.team-a.roster."]);
    let one = ask(&r, "web-a.web.instance.team-a.roster.", RecordType::A)
        .await
        .expect("the instance");
    assert_eq!(ips(&one).len(), 1);
    let e = ask(&r, "web.service.team-b.roster.", RecordType::A).await;
    assert!(e.is_err(), "no such namespace: NXDOMAIN, got {e:?}");
}

/// A `[dns] token` scoped to one namespace answers for that namespace only:
/// another namespace's service, whether it exists or not, and `default`'s
/// get the same REFUSED, so DNS tells nothing of what lies outside.
#[tokio::test]
async fn a_namespace_scoped_token_answers_for_its_namespace_only() {
    let secret = format!("dns-test-{:032x}", fastrand::u128(..));
    let setup = Setup {
        auth: true,
        auth_secret: Some(secret.clone()),
        dns: Some(format!("token = \"{secret}\"\nttl_s = 0")),
        ..Setup::default()
    };
    let mut c = TestCluster::start_setup(3, "[auth]\nenabled = true\n", setup)
        .await
        .expect("cluster");
    let admin = c.client();
    for (ns, address) in [
        ("team-a", "10.0.0.2"),
        ("team-b", "10.0.0.3"),
        ("", "10.0.0.1"),
    ] {
        if !ns.is_empty() {
            admin
                .create_namespace(CreateNamespaceRequest {
                    name: ns.into(),
                    quotas: None,
                })
                .await
                .expect("namespace");
        }
        let mut i = instance("web", "web-1", 8080);
        i.address = address.into();
        admin
            .register(RegisterRequest {
                instance: Some(i),
                namespace: ns.into(),
                ..Default::default()
            })
            .await
            .expect("register");
    }
    let scoped = admin
        .create_token(CreateTokenRequest {
            role: Role::Read as i32,
            services: vec!["team-a/*".into()],
            description: "DNS of team-a".into(),
        })
        .await
        .expect("token")
        .secret;
    // The follower answers DNS with the scoped token from its next start.
    let f = follower(&c).await;
    c.kill(f);
    let config = &c.node(f).config;
    let text = std::fs::read_to_string(config).expect("config");
    let swapped = text.replace(
        &format!("token = \"{secret}\""),
        &format!("token = \"{scoped}\""),
    );
    assert_ne!(text, swapped, "the [dns] token line");
    std::fs::write(config, swapped).expect("config");
    c.start_node(f);
    let r = resolver(dns_addr(&c, f), true, true, true);
    let in_a = c
        .wait_for("team-a's web under the scoped token", LIMIT, || async {
            ask(&r, "web.service.team-a.roster.", RecordType::A)
                .await
                .ok()
        })
        .await;
    assert_eq!(
        ips(&in_a),
        BTreeSet::from(["10.0.0.2".parse().expect("ip")])
    );
    for name in [
        "web.service.team-b.roster.",
        "web.service.team-c.roster.",
        "web.service.roster.",
        "web-1.web.instance.team-b.roster.",
    ] {
        let e = ask(&r, name, RecordType::A).await.expect_err(name);
        assert!(
            matches!(
                e,
                NetError::Dns(DnsError::ResponseCode(ResponseCode::Refused))
            ),
            "{name}: REFUSED, got {e:?}"
        );
    }
}

/// An instance in maintenance leaves the service's A and SRV answers; its
/// own instance name still resolves (it is registered).
#[tokio::test]
async fn an_instance_in_maintenance_leaves_the_answers() {
    let setup = Setup {
        dns: Some("ttl_s = 0".into()),
        ..Setup::default()
    };
    let c = TestCluster::start_setup(3, "", setup)
        .await
        .expect("cluster");
    put(&c, "web-1", "10.0.0.1", 8080, |_| {}).await;
    put(&c, "web-2", "10.0.0.2", 8080, |_| {}).await;
    let set = |enable| roster::proto::v1::SetMaintenanceRequest {
        service: "web".into(),
        id: "web-1".into(),
        enable,
        reason: "kernel upgrade".into(),
        namespace: String::new(),
    };
    c.client().set_maintenance(set(true)).await.expect("enable");
    let r = resolver(dns_addr(&c, c.leader().await), true, true, true);
    let a = ask(&r, "web.service.roster.", RecordType::A)
        .await
        .expect("web-2 left");
    assert_eq!(ips(&a), BTreeSet::from(["10.0.0.2".parse().expect("ip")]));
    let srv = ask(&r, "web.service.roster.", RecordType::SRV)
        .await
        .expect("SRV");
    assert_eq!(srv.len(), 1, "{srv:?}");
    c.client()
        .set_maintenance(set(false))
        .await
        .expect("disable");
    let a = ask(&r, "web.service.roster.", RecordType::A)
        .await
        .expect("both");
    assert_eq!(ips(&a).len(), 2);
}
