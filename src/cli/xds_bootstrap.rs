//! `roster xds-bootstrap`: the bootstrap file a gRPC client reads
//! (`GRPC_XDS_BOOTSTRAP`) to resolve `xds:///<service>` through the nodes.

use std::net::SocketAddr;
use std::path::Path;

use serde_json::{json, Value};

use super::XdsBootstrapArgs;

pub(super) fn print(a: XdsBootstrapArgs) -> anyhow::Result<()> {
    let e = &a.endpoints;
    if e.token.is_some() {
        eprintln!(
            "note: gRPC's xDS clients send no token; with [auth], the nodes serve xDS with \
             the scope of their [xds] token"
        );
    }
    let uri = match a.server_uri {
        Some(u) => u,
        None => server_uri(&e.endpoints)?,
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
    let bootstrap = json!({
        "xds_servers": [{
            "server_uri": uri,
            "channel_creds": [creds],
            "server_features": ["xds_v3"],
        }],
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

/// One gRPC target naming every node, so that the client's xDS channel moves
/// to another node when its own goes away: several IP addresses become an
/// `ipv4:`/`ipv6:` address list (C++, Python, Ruby, PHP, Node); a single
/// endpoint is left to DNS, which may return every node (the way for Go and
/// Java, whose gRPC has no address-list targets).
fn server_uri(endpoints: &[String]) -> anyhow::Result<String> {
    match endpoints {
        [] => anyhow::bail!("give the nodes with --endpoints"),
        [one] => Ok(one.clone()),
        many => {
            let addrs: Vec<SocketAddr> = many
                .iter()
                .map(|e| e.parse())
                .collect::<Result<_, _>>()
                .map_err(|_| {
                anyhow::anyhow!(
                    "several --endpoints make one gRPC target only as IP addresses \
                         (ipv4:a,b,c); with host names, give one name that resolves to every \
                         node, or the target itself with --server-uri (dns:///roster.example:7001)"
                )
            })?;
            let scheme = if addrs.iter().all(SocketAddr::is_ipv4) {
                "ipv4"
            } else if addrs.iter().all(SocketAddr::is_ipv6) {
                "ipv6"
            } else {
                anyhow::bail!(
                    "--endpoints mixes IPv4 and IPv6 addresses, which no gRPC target takes \
                     together; give one family, or --server-uri"
                )
            };
            let list: Vec<String> = addrs.iter().map(SocketAddr::to_string).collect();
            Ok(format!("{scheme}:{}", list.join(",")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::server_uri;

    #[test]
    fn one_target_names_every_node() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            server_uri(&v(&["127.0.0.1:7001", "127.0.0.1:7002"])).ok(),
            Some("ipv4:127.0.0.1:7001,127.0.0.1:7002".into())
        );
        assert_eq!(
            server_uri(&v(&["[::1]:7001", "[::1]:7002"])).ok(),
            Some("ipv6:[::1]:7001,[::1]:7002".into())
        );
        assert_eq!(
            server_uri(&v(&["roster.internal:7001"])).ok(),
            Some("roster.internal:7001".into())
        );
        let e = server_uri(&v(&["a.example:7001", "b.example:7001"])).expect_err("names");
        assert!(e.to_string().contains("--server-uri"), "{e}");
        assert!(server_uri(&v(&["127.0.0.1:1", "[::1]:1"])).is_err());
    }
}
