//! `roster server` and `roster dev`.

use std::net::{Ipv4Addr, SocketAddr};

use crate::api::auth::random_hex;
use crate::client::{tls_from_files, RosterClient};
use crate::config::{parse_initial_cluster, NodeConfig, TlsFiles};
use crate::node;
use crate::proto::v1::BootstrapRequest;
use anyhow::Context;

use super::{DevArgs, ServerArgs};

/// `roster-2` → 3: pod ordinals count from 0, node ids from 1.
fn id_from_hostname(host: &str) -> anyhow::Result<u64> {
    host.rsplit_once('-')
        .and_then(|(_, n)| n.parse::<u64>().ok())
        .map(|n| n + 1)
        .ok_or_else(|| anyhow::anyhow!("host name {host:?} does not end in -<ordinal>"))
}

fn node_config(mut a: ServerArgs) -> anyhow::Result<NodeConfig> {
    if a.id_from_hostname {
        let host = std::env::var("HOSTNAME").context("--id-from-hostname needs $HOSTNAME")?;
        let id = id_from_hostname(&host)?
            .checked_add(a.id_offset)
            .context("--id-offset takes the node id past 2^64")?;
        a.id = Some(id);
    }
    let mut cfg = match &a.config {
        Some(path) => NodeConfig::from_file(path)?,
        None => {
            let missing = |f: &str| anyhow::anyhow!("--{f} is required without --config");
            NodeConfig::new(
                a.id.ok_or_else(|| missing("id"))?,
                a.listen.ok_or_else(|| missing("listen"))?,
                a.peer_listen.ok_or_else(|| missing("peer-listen"))?,
                a.data_dir.clone().ok_or_else(|| missing("data-dir"))?,
            )
        }
    };
    if let Some(v) = a.id {
        cfg.id = v;
    }
    if let Some(v) = a.listen {
        cfg.listen = v;
    }
    if let Some(v) = a.data_dir {
        cfg.data_dir = v;
    }
    if let Some(v) = a.cluster_id {
        cfg.cluster_id = v;
    }
    if let Some(v) = a.advertise {
        cfg.advertise = Some(v);
    }
    if let Some(v) = a.peer_listen {
        cfg.peer_listen = v;
    }
    if let Some(v) = a.peer_advertise {
        cfg.peer_advertise = Some(v);
    }
    if let Some(v) = a.initial_cluster {
        cfg.initial_cluster = v;
    }
    if let Some(v) = a.metrics_listen {
        cfg.metrics_listen = Some(v);
    }
    if let Some(v) = a.dns_listen {
        cfg.dns.listen = Some(v);
    }
    if let Some(v) = a.http_listen {
        cfg.http.listen = Some(v);
    }
    if a.auth {
        cfg.auth.enabled = true;
    }
    if let (Some(cert), Some(key), Some(ca)) = (a.tls_cert, a.tls_key, a.tls_ca) {
        cfg.tls = Some(TlsFiles {
            cert,
            key,
            ca,
            client_ca: a.tls_client_ca,
        });
    }
    if a.id_from_hostname {
        beyond_the_initial_members(&mut cfg)?;
    }
    cfg.validate()?;
    Ok(cfg)
}

/// Every pod of a StatefulSet gets the same initial cluster: a pod scaled up
/// beyond the initial members starts without one, to be added with `roster
/// member add`.
fn beyond_the_initial_members(cfg: &mut NodeConfig) -> anyhow::Result<()> {
    let members = parse_initial_cluster(&cfg.initial_cluster)?;
    if !members.is_empty() && !members.contains_key(&cfg.id) {
        tracing::info!(
            "node {} is not an initial member: starting without the initial cluster, \
             to be added with `roster member add`",
            cfg.id
        );
        cfg.initial_cluster.clear();
    }
    Ok(())
}

/// Resolves on SIGINT or SIGTERM (how Docker and Kubernetes stop a container).
async fn stop_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT").map(|()| "SIGINT"),
        _ = term.recv() => Ok("SIGTERM"),
    }
}

/// Crash-only: a panic anywhere (a Raft core, a storage thread, a handler)
/// leaves state no one should serve from, so the process exits non-zero and
/// its supervisor restarts it from its data directory.
fn exit_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        tracing::error!("panic: {info}; exiting so the node restarts from its data directory");
        std::process::exit(70);
    }));
}

pub async fn server(a: ServerArgs) -> anyhow::Result<()> {
    let cfg = node_config(a)?;
    let handle = node::start(cfg).await?;
    exit_on_panic();
    tokio::select! {
        sig = stop_signal() => tracing::info!("{}: shutting down", sig?),
        e = handle.failed() => {
            return Err(anyhow::anyhow!(e)
                .context("the node cannot go on serving; exiting so that it restarts from its data directory"));
        }
    }
    handle.shutdown().await?;
    Ok(())
}

/// How far above its client port `roster dev` puts a node's peer port.
const DEV_PEER_OFFSET: u16 = 100;
/// DNS of `roster dev` node i: UDP and TCP on the base port + 200 + i.
const DEV_DNS_OFFSET: u16 = 200;
/// The HTTP API of `roster dev` node i: the base port + 300 + i.
const DEV_HTTP_OFFSET: u16 = 300;

pub async fn dev(a: DevArgs) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new().prefix("roster-dev-").tempdir()?;
    anyhow::ensure!(
        a.base_port.checked_add(DEV_HTTP_OFFSET + a.nodes).is_some(),
        "--base-port {} is too high: node ports reach {} above it",
        a.base_port,
        DEV_HTTP_OFFSET + a.nodes
    );
    let certs = match a.tls {
        true => Some(super::dev_tls::make(&dir.path().join("tls"), a.nodes)?),
        false => None,
    };
    // Drawn before the nodes start: DNS and xDS answer with the admin token's scope.
    let admin_secret = a.auth.then(|| random_hex(32)).transpose()?;
    let mut handles = Vec::new();
    for i in 0..a.nodes {
        let cfg = dev_node(&a, i, dir.path(), certs.as_ref(), &admin_secret);
        handles.push(node::start(cfg).await?);
    }
    let endpoints: Vec<String> = handles.iter().map(|h| h.addr.to_string()).collect();
    let http = if certs.is_some() { "HTTPS" } else { "HTTP" };
    for h in &handles {
        let off = |a: Option<SocketAddr>| a.map_or("off".into(), |a| a.to_string());
        println!(
            "node {} listening on {} (peer port {}, DNS {}, {http} {})",
            h.id,
            h.addr,
            h.peer_addr,
            off(h.dns_addr()),
            off(h.http_addr()),
        );
    }
    println!("data in {}", dir.path().display());
    let token = match admin_secret {
        Some(secret) => Some(dev_bootstrap(&endpoints, certs.as_ref(), secret).await?),
        None => None,
    };
    print_dev_hints(&handles, &endpoints, certs.as_ref(), token.as_deref());
    println!("Ctrl-C stops the cluster and deletes its data.");
    exit_on_panic();
    stop_signal().await?;
    for h in handles {
        h.shutdown().await?;
    }
    Ok(())
}

/// Node `i` (from 0) of `roster dev`: ports counted from `--base-port`.
fn dev_node(
    a: &DevArgs,
    i: u16,
    dir: &std::path::Path,
    certs: Option<&super::dev_tls::DevCerts>,
    admin_secret: &Option<String>,
) -> NodeConfig {
    let at = |offset: u16| SocketAddr::from((Ipv4Addr::LOCALHOST, a.base_port + offset));
    let initial: Vec<String> = (0..a.nodes)
        .map(|n| format!("{}={}", n + 1, at(DEV_PEER_OFFSET + n)))
        .collect();
    let mut cfg = NodeConfig::new(
        u64::from(i) + 1,
        at(i),
        at(DEV_PEER_OFFSET + i),
        dir.join(format!("node-{}", i + 1)),
    );
    cfg.cluster_id = "roster-dev".into();
    cfg.initial_cluster = initial.join(",");
    cfg.tls = certs.map(|c| c.nodes[usize::from(i)].clone());
    cfg.auth.enabled = a.auth;
    cfg.dns.listen = Some(at(DEV_DNS_OFFSET + i));
    cfg.dns.token = admin_secret.clone();
    // gRPC's xDS clients send no token either.
    cfg.xds.token = admin_secret.clone();
    // HTTPS with --tls.
    cfg.http.listen = Some(at(DEV_HTTP_OFFSET + i));
    cfg
}

/// Bootstraps the ACL of `roster dev --auth` with `secret` and returns it.
async fn dev_bootstrap(
    endpoints: &[String],
    certs: Option<&super::dev_tls::DevCerts>,
    secret: String,
) -> anyhow::Result<String> {
    let client = match certs {
        Some(c) => RosterClient::with_tls(endpoints, tls_from_files(&c.ca, None)?)?,
        None => RosterClient::new(endpoints)?,
    };
    // Drawn beforehand, so the client's retries (the first election may
    // lose an answer) bootstrap once and get the same token.
    let created = client
        .bootstrap(BootstrapRequest {
            description: "roster dev".into(),
            secret,
        })
        .await?;
    Ok(created.secret)
}

/// What to try against the dev cluster: the CLI, DNS, xDS, HTTP and the console.
fn print_dev_hints(
    handles: &[node::NodeHandle],
    endpoints: &[String],
    certs: Option<&super::dev_tls::DevCerts>,
    token: Option<&str>,
) {
    let tls_flags = match certs {
        Some(c) => format!(
            " --cacert {} (and, for nodes that ask for a client certificate, --cert {} --key {})",
            c.ca.display(),
            c.client_cert.display(),
            c.client_key.display()
        ),
        None => String::new(),
    };
    println!(
        "try: roster status --endpoints {}{}{tls_flags}",
        endpoints.join(","),
        token.map(|t| format!(" --token {t}")).unwrap_or_default()
    );
    if let Some(dns) = handles.first().and_then(|h| h.dns_addr()) {
        println!(
            "     dig @{} -p {} <service>.service.roster SRV",
            dns.ip(),
            dns.port()
        );
    }
    println!(
        "     roster xds-bootstrap --endpoints {}{} > xds-bootstrap.json   # GRPC_XDS_BOOTSTRAP for xds:///<service>",
        endpoints.join(","),
        certs
            .map(|c| format!(" --cacert {}", c.ca.display()))
            .unwrap_or_default()
    );
    if let Some(http) = handles.first().and_then(|h| h.http_addr()) {
        let (url, cacert) = match certs {
            Some(c) => (format!("https://{http}"), Some(c.ca.display())),
            None => (format!("http://{http}"), None),
        };
        let bearer = token
            .map(|t| format!(" -H 'authorization: Bearer {t}'"))
            .unwrap_or_default();
        let curl_cacert = cacert
            .as_ref()
            .map(|ca| format!(" --cacert {ca}"))
            .unwrap_or_default();
        println!("     curl{curl_cacert}{bearer} {url}/v1/services");
        let mut console = format!("web console: {url}/ui");
        if let Some(ca) = &cacert {
            console.push_str(&format!(" (have the browser trust {ca})"));
        }
        if token.is_some() {
            console.push_str(" with the token in its box");
        }
        println!("{console}");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ordinal_ids() {
        assert_eq!(super::id_from_hostname("roster-0").ok(), Some(1));
        assert_eq!(super::id_from_hostname("my-roster-4").ok(), Some(5));
        assert!(super::id_from_hostname("roster").is_err());
    }

    #[test]
    fn a_pod_beyond_the_initial_members_starts_without_them() {
        let port = |p: u16| std::net::SocketAddr::from(([0, 0, 0, 0], p));
        let initial = "1=roster-0:7002,2=roster-1:7002,3=roster-2:7002";
        for (id, kept) in [(3, initial), (4, "")] {
            let mut cfg = super::NodeConfig::new(id, port(7001), port(7002), "/data".into());
            cfg.peer_advertise = Some(format!("roster-{}:7002", id - 1));
            cfg.initial_cluster = initial.into();
            assert!(super::beyond_the_initial_members(&mut cfg).is_ok());
            assert_eq!(cfg.initial_cluster, kept);
            assert!(cfg.validate().is_ok(), "node {id}");
        }
    }
}
