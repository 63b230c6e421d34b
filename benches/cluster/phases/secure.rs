//! TLS and auth: register, linearizable query and watch on secured clusters
//! of each system, and Roster in plaintext beside them.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use etcd_client::{ConnectOptions, Permission};
use roster::proto::v1::{BootstrapRequest, CreateTokenRequest, Role};
use tonic::transport::ClientTlsConfig;

use super::{roster_client, wait_leader};
use crate::procs::{self, Peers};
use crate::report::Report;
use crate::stats::{ms, Summary};
use crate::sut::{self, Etcd, Roster, System};
use crate::workload::{first_answer, query, register, watch_delay, WATCH_EVENTS};
use crate::{certs, Opts, NODES, POOL};

/// What the `secure` phase measures on each cluster.
struct Secured {
    register_64: Summary,
    register_1000: Summary,
    query: Summary,
    watch: Summary,
}

async fn secured_workloads<S: System>(sys: &Arc<S>, dur: Duration) -> Result<Secured> {
    Ok(Secured {
        register_64: register(sys, 64, dur).await,
        register_1000: register(sys, 1000, dur).await,
        query: query(sys, 64, dur, true).await?,
        watch: watch_delay(sys, 100, WATCH_EVENTS).await?.after_ack,
    })
}

/// Register, linearizable query and watch with TLS and auth: Roster with TLS
/// on both ports (mutual between nodes) and a write token, etcd with TLS for
/// clients and peers (mutual between members) and a user whose role may read
/// and write the registry's prefix. All on fresh clusters, Roster also in
/// plaintext beside them, so the cost of TLS and auth is measured in one run.
pub async fn secure(dir: &Path, o: &Opts, report: &mut Report) -> Result<()> {
    let dur = o.phase();
    std::fs::create_dir_all(dir)?;
    let ca = certs::Ca::new("bench");
    // Each Roster node serves its own certificate (the peer port admits a
    // member by the id it names); etcd's nodes share node 1's.
    let config = certs::tls_section(dir, &ca.nodes(NODES as u64), &ca.pem(), false)
        + "[auth]\nenabled = true\n";
    let files = procs::Certs {
        cert: dir.join("node-1.crt"),
        key: dir.join("node-1.key"),
        ca: dir.join("ca.crt"),
    };
    let tls = roster::client::tls_from_pem(ca.pem().as_bytes(), None);

    eprintln!("secure: Roster in plaintext");
    let rc = procs::roster(&dir.join("plain"), NODES, Peers::Direct)?;
    let plain = secured_workloads(&roster_client(&rc).await?, dur).await?;
    drop(rc);

    eprintln!("secure: Roster with TLS and a token");
    let secure = roster_secured(&dir.join("roster"), &config, &tls, dur).await?;
    eprintln!("secure: etcd with TLS and a user");
    let etcd = etcd_secured(&dir.join("etcd"), &files, tls, dur).await?;
    rows(report, &plain, &secure, &etcd);
    Ok(())
}

/// Roster with `config` (TLS and auth), driven with a write token.
async fn roster_secured(
    dir: &Path,
    config: &str,
    tls: &ClientTlsConfig,
    dur: Duration,
) -> Result<Secured> {
    let rc = procs::roster_with(dir, NODES, Peers::Direct, config)?;
    let admin = roster::client::RosterClient::with_tls(&rc.endpoints(), tls.clone())?;
    let bootstrap = first_answer("the ACL bootstrap", || async {
        Ok(admin.bootstrap(BootstrapRequest::default()).await?)
    })
    .await?;
    let admin = admin.with_token(&bootstrap.secret)?;
    let write = admin
        .create_token(CreateTokenRequest {
            role: Role::Write as i32,
            services: Vec::new(),
            description: "bench".into(),
        })
        .await?;
    let access = sut::Access {
        tls: tls.clone(),
        token: write.secret,
    };
    let roster = Arc::new(Roster::connect(&rc.endpoints(), POOL, Some(access))?);
    // The token counts on a node once the node has applied its creation.
    first_answer("the token on every node", || async {
        anyhow::ensure!(roster.statuses_answered().await? == NODES, "not yet");
        Ok(())
    })
    .await?;
    wait_leader(&roster).await?;
    let secure = secured_workloads(&roster, dur).await?;
    drop((roster, admin, rc));
    Ok(secure)
}

/// etcd with TLS for clients and peers and auth, driven as a user whose
/// role may read and write `/services/`.
async fn etcd_secured(
    dir: &Path,
    files: &procs::Certs,
    tls: ClientTlsConfig,
    dur: Duration,
) -> Result<Secured> {
    let ec = procs::etcd_with(dir, NODES, Peers::Direct, &[], Some(files))?;
    let root = ConnectOptions::new().with_tls(tls.clone());
    // Every member up before the client balances over them.
    for e in ec.endpoints() {
        first_answer("an etcd member over TLS", || async {
            let mut c = etcd_client::Client::connect([e.as_str()], Some(root.clone())).await?;
            c.status().await?;
            Ok(())
        })
        .await?;
    }
    let mut c = etcd_client::Client::connect(ec.endpoints(), Some(root.clone())).await?;
    c.user_add("root", "root-password", None).await?;
    c.user_grant_role("root", "root").await?;
    c.role_add("registry").await?;
    c.role_grant_permission(
        "registry",
        Permission::read_write("/services/").with_prefix(),
    )
    .await?;
    c.user_add("bench", "bench-password", None).await?;
    c.user_grant_role("bench", "registry").await?;
    c.auth_enable().await?;
    let access = sut::EtcdAccess {
        tls,
        user: "bench".into(),
        password: "bench-password".into(),
    };
    let etcd = Arc::new(Etcd::connect(&ec.endpoints(), POOL, Some(&access)).await?);
    wait_leader(&etcd).await?;
    let figures = secured_workloads(&etcd, dur).await?;
    drop((etcd, c, ec));
    Ok(figures)
}

fn rows(report: &mut Report, plain: &Secured, secure: &Secured, etcd: &Secured) {
    let with = |name: &str| format!("TLS + auth: {name}");
    for (name, r, e) in [
        (
            "register, 64 clients",
            &secure.register_64,
            &etcd.register_64,
        ),
        (
            "register, 1000 clients",
            &secure.register_1000,
            &etcd.register_1000,
        ),
    ] {
        report.load(&with(name), r, e, "≥ 1.5×");
    }
    let query_name = with("query 100 instances, linearizable, 64 clients");
    report.load(&query_name, &secure.query, &etcd.query, "");
    report.latency(
        &with("watch delay, 100 watchers"),
        &secure.watch,
        &etcd.watch,
        "",
    );
    let kept = |s: &Summary, p: &Summary| 100.0 * s.throughput / p.throughput.max(1e-9);
    report.note(format!(
        "TLS + auth against plaintext, Roster, fresh clusters in this run: register 64 clients {:.0}/s vs {:.0}/s ({:.0}% kept), \
         1000 clients {:.0}/s vs {:.0}/s ({:.0}% kept; target ≥ 85%), linearizable query {:.0}/s vs {:.0}/s ({:.0}% kept), \
         watch delay p99 {} vs {}.",
        secure.register_64.throughput,
        plain.register_64.throughput,
        kept(&secure.register_64, &plain.register_64),
        secure.register_1000.throughput,
        plain.register_1000.throughput,
        kept(&secure.register_1000, &plain.register_1000),
        secure.query.throughput,
        plain.query.throughput,
        kept(&secure.query, &plain.query),
        ms(secure.watch.p99),
        ms(plain.watch.p99),
    ));
}
