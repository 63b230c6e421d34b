//! `roster xds-bootstrap`: the bootstrap file a gRPC client reads
//! (`GRPC_XDS_BOOTSTRAP`) to resolve `xds:///<service>` through the nodes.

use std::path::Path;

use serde_json::{json, Value};

use super::{Endpoints, XdsBootstrapArgs};
use crate::proto::v1::Member;

pub(super) async fn print(a: XdsBootstrapArgs) -> anyhow::Result<()> {
    let e = &a.endpoints;
    if e.token.is_some() {
        eprintln!(
            "note: gRPC's xDS clients send no token; with [auth], the nodes serve xDS with \
             the scope of their [xds] token"
        );
    }
    let uris = match a.server_uri {
        Some(u) => vec![u],
        None if a.from_membership => server_uris(&member_addresses(e).await?)?,
        None => server_uris(&e.endpoints)?,
    };
    let absolute = |p: &Path| -> anyhow::Result<String> {
        let full =
            std::fs::canonicalize(p).map_err(|err| anyhow::anyhow!("{}: {err}", p.display()))?;
        Ok(full.display().to_string())
    };
    let creds = match &e.cacert {
        // gRFC A65: file-based TLS credentials for the xDS server.
        Some(ca) => {
            let mut config = json!({ "ca_certificate_file": absolute(ca)? });
            if let (Some(cert), Some(key)) = (&e.cert, &e.key) {
                config["certificate_file"] = Value::String(absolute(cert)?);
                config["private_key_file"] = Value::String(absolute(key)?);
            }
            json!({ "type": "tls", "config": config })
        }
        None => json!({ "type": "insecure" }),
    };
    let servers: Vec<Value> = uris
        .into_iter()
        .map(|uri| {
            json!({
                "server_uri": uri,
                "channel_creds": [creds.clone()],
                "server_features": ["xds_v3"],
            })
        })
        .collect();
    let bootstrap = json!({
        "xds_servers": servers,
        "node": { "id": a.node_id, "locality": {} },
    });
    let text = serde_json::to_string_pretty(&bootstrap)? + "\n";
    match a.output {
        Some(path) => std::fs::write(&path, text)
            .map_err(|err| anyhow::anyhow!("write {}: {err}", path.display()))?,
        None => print!("{text}"),
    }
    Ok(())
}

/// The client addresses of the members the leader (else the node of the
/// highest term that answered) records: read replicas first, then voters,
/// each in id order. Learners on their way to becoming voters are left out.
async fn member_addresses(e: &Endpoints) -> anyhow::Result<Vec<String>> {
    let replies = super::commands::client(e)?.status_all().await;
    let status = replies
        .into_iter()
        .filter_map(|(_, r)| r.ok())
        .max_by_key(|s| (s.role == "leader", s.term))
        .ok_or_else(|| anyhow::anyhow!("no node at --endpoints answered"))?;
    let mut members: Vec<&Member> = status
        .members
        .iter()
        .filter(|m| (m.voter || m.replica) && !m.address.is_empty())
        .collect();
    members.sort_by_key(|m| (!m.replica, m.id));
    Ok(members.into_iter().map(|m| m.address.clone()).collect())
}

/// A gRPC target per node, in order: a client starts on the first that
/// answers (gRFC A71, xDS fallback). An address list (`ipv4:a,b`) is no
/// choice: gRPC takes the list as the call's authority, which HTTP/2 servers
/// refuse. A single endpoint may be a name that resolves to every node (a
/// Kubernetes headless service); the client's xDS channel then moves to
/// another node when its own goes away.
fn server_uris(endpoints: &[String]) -> anyhow::Result<Vec<String>> {
    if endpoints.is_empty() {
        anyhow::bail!("give the nodes' client addresses with --endpoints");
    }
    Ok(endpoints.iter().map(|e| format!("dns:///{e}")).collect())
}

#[cfg(test)]
mod tests {
    use super::server_uris;

    #[test]
    fn a_target_per_node_in_order() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            server_uris(&v(&["127.0.0.1:7001", "roster-2.internal:7001"])).ok(),
            Some(v(&[
                "dns:///127.0.0.1:7001",
                "dns:///roster-2.internal:7001"
            ]))
        );
        assert!(server_uris(&[]).is_err());
    }
}
