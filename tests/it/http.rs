//! The HTTP/JSON API against a 3-node cluster, asked with a real HTTP client
//! (reqwest): writes through a follower, reads, errors as JSON with fitting
//! statuses, tokens, the OpenAPI document, and the SSE watch resumed with
//! `Last-Event-ID` on another node after its node was killed. Over HTTPS
//! (`[tls]`): curl (`ROSTER_CURL`, which `.ci/run` installs and sets;
//! without it those tests say so and skip) with the cluster's CA, tokens,
//! plaintext refused, client certificates; and rotation, seen in rustls
//! handshakes.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::common::certs::{tls_section, write_nodes, Ca, Issued};
use crate::common::*;
use futures::FutureExt;
use roster::client::tls_from_pem;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls::{crypto::ring, ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

const LIMIT: Duration = Duration::from_secs(20);

fn url(c: &TestCluster, id: u64, path: &str) -> String {
    format!("http://127.0.0.1:{}{path}", c.node(id).http_port)
}

async fn follower(c: &TestCluster) -> u64 {
    let leader = c.leader().await;
    (1..=3).find(|id| *id != leader).expect("a follower")
}

/// An error answer: its HTTP status and the gRPC code's name in the body.
fn assert_error(status: u16, body: &Value, want: u16, code: &str) {
    assert_eq!(
        (status, body["code"].as_str()),
        (want, Some(code)),
        "{body}"
    );
}

/// GET `url`: the status and JSON body.
async fn get_json(http: &reqwest::Client, url: impl reqwest::IntoUrl) -> (u16, Value) {
    answer(http.get(url).send().await.expect("GET")).await
}

/// The status and JSON body of a response.
async fn answer(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let text = r.text().await.expect("body");
    let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    (status, body)
}

pub(crate) async fn http_cluster(extra: &str, auth: bool) -> TestCluster {
    let setup = Setup {
        http: true,
        auth,
        ..Setup::default()
    };
    TestCluster::start_setup(3, extra, setup)
        .await
        .expect("cluster")
}

#[tokio::test]
async fn a_follower_serves_every_operation_and_errors_carry_their_codes() {
    let c = http_cluster("", false).await;
    let f = follower(&c).await;
    let http = reqwest::Client::new();
    let put = |id: &str, body: Value| {
        http.put(url(&c, f, &format!("/v1/services/web/instances/{id}")))
            .body(body.to_string())
            .send()
            .map(|r| async move { answer(r.expect("PUT")).await })
            .flatten()
    };
    // A write through a follower: forwarded to the leader, as over gRPC.
    let web1 = json!({
        "address": "10.0.0.1", "port": 8080, "tags": ["v2"], "metadata": {"zone": "eu-1"}, "weight": 5
    });
    let (s, body) = put("web-1", web1).await;
    assert_eq!(s, 200, "{body}");
    assert!(
        body["revision"].as_str().is_some(),
        "uint64 as a string: {body}"
    );
    assert_eq!(
        body["instance"]["status"], "HEALTH_STATUS_PASSING",
        "{body}"
    );
    let (s, _) = put("web-2", json!({"address": "10.0.0.2", "port": 8081})).await;
    assert_eq!(s, 200);

    let get = |q: &str| get_json(&http, url(&c, f, &format!("/v1/services/web{q}")));
    let (s, body) = get("").await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(
        body["instances"].as_array().map(Vec::len),
        Some(2),
        "{body}"
    );
    let (_, body) = get("?tag=v2&healthy=true&consistency=stale").await;
    let ids: Vec<&str> = body["instances"]
        .as_array()
        .map(|a| a.iter().filter_map(|i| i["id"].as_str()).collect())
        .unwrap_or_default();
    assert!(
        ids == ["web-1"] || ids.is_empty(),
        "a stale read, tag v2: {body}"
    );
    let (_, body) = get("?tag=v2").await;
    assert_eq!(body["instances"][0]["metadata"]["zone"], "eu-1", "{body}");
    assert!(
        body["instances"][0]["createRevision"].as_str().is_some(),
        "{body}"
    );

    let (s, body) = get_json(&http, url(&c, f, "/v1/services")).await;
    assert_eq!(s, 200);
    assert_eq!(body["services"][0]["name"], "web", "{body}");
    assert_eq!(body["services"][0]["instances"], 2, "{body}");
    let (s, body) = get_json(&http, url(&c, f, "/v1/services?page_size=1")).await;
    assert_eq!(
        (s, body["services"].as_array().map(Vec::len)),
        (200, Some(1)),
        "{body}"
    );
    let (s, body) = get_json(&http, url(&c, f, "/v1/services?page_size=many")).await;
    assert_error(s, &body, 400, "INVALID_ARGUMENT");

    // Errors: the gRPC code's name and an HTTP status that fits it.
    let (s, body) = put("bad id!", json!({"address": "10.0.0.3", "port": 1})).await;
    assert_error(s, &body, 400, "INVALID_ARGUMENT");
    let (s, body) = put("web-3", json!({"address": "10.0.0.3", "port": "x"})).await;
    assert_error(s, &body, 400, "INVALID_ARGUMENT");
    let (s, body) = put("web-3", json!({"id": "other", "port": 1})).await;
    assert_eq!(s, 400, "the body's id differs from the path's: {body}");
    let (s, body) = get("?consistency=sometimes").await;
    assert_eq!(s, 400, "{body}");
    let hb = http
        .post(url(&c, f, "/v1/services/web/instances/nobody/heartbeat"))
        .send()
        .await
        .expect("heartbeat");
    let (s, body) = answer(hb).await;
    assert_error(s, &body, 404, "NOT_FOUND");

    let del = || {
        http.delete(url(&c, f, "/v1/services/web/instances/web-2"))
            .send()
    };
    let (s, body) = answer(del().await.expect("DELETE")).await;
    assert_eq!(s, 200, "{body}");
    let (s, body) = answer(del().await.expect("DELETE again")).await;
    assert_error(s, &body, 404, "NOT_FOUND");

    let (s, body) = get_json(&http, url(&c, f, "/v1/cluster/status")).await;
    assert_eq!(s, 200);
    assert_eq!(body["members"].as_array().map(Vec::len), Some(3), "{body}");
    let (s, doc) = get_json(&http, url(&c, f, "/v1/openapi.json")).await;
    assert_eq!(s, 200);
    assert_eq!(doc["openapi"], "3.0.3");
    assert!(
        doc["paths"]["/v1/watch/{service}"]["get"].is_object(),
        "{doc}"
    );
}

#[tokio::test]
async fn tokens_are_checked_as_over_grpc() {
    let c = http_cluster("[auth]\nenabled = true\n", true).await;
    let f = follower(&c).await;
    let http = reqwest::Client::new();
    let path = url(&c, f, "/v1/services/web");
    let (s, body) = get_json(&http, &path).await;
    assert_error(s, &body, 401, "UNAUTHENTICATED");
    let admin = format!("Bearer {}", c.token());
    let created = c
        .client()
        .create_token(roster::proto::v1::CreateTokenRequest {
            role: roster::proto::v1::Role::Read as i32,
            services: vec!["api".into()],
            description: "api reader".into(),
        })
        .await
        .expect("token");
    let scoped = format!("Bearer {}", created.secret);
    // Once the follower has applied the new token, it is known there.
    let (s, body) = c
        .wait_for("the follower to know the new token", LIMIT, || async {
            let r = http
                .get(&path)
                .header("authorization", &scoped)
                .send()
                .await
                .ok()?;
            let (s, body) = answer(r).await;
            (s != 401).then_some((s, body))
        })
        .await;
    assert_error(s, &body, 403, "PERMISSION_DENIED");
    let put = http
        .put(url(&c, f, "/v1/services/web/instances/w-1"))
        .header("authorization", &admin)
        .body(json!({"address": "10.0.0.1", "port": 80}).to_string())
        .send()
        .await
        .expect("PUT");
    assert_eq!(put.status().as_u16(), 200);
    let (s, body) = answer(
        http.get(&path)
            .header("authorization", &admin)
            .send()
            .await
            .expect("GET"),
    )
    .await;
    assert_eq!(s, 200, "{body}");

    // A token of namespace team-a: that namespace's routes, nothing else.
    c.client()
        .create_namespace(roster::proto::v1::CreateNamespaceRequest {
            name: "team-a".into(),
            quotas: None,
        })
        .await
        .expect("namespace");
    let team = c
        .client()
        .create_token(roster::proto::v1::CreateTokenRequest {
            role: roster::proto::v1::Role::Read as i32,
            services: vec!["team-a/*".into()],
            description: "team a".into(),
        })
        .await
        .expect("token");
    let team = format!("Bearer {}", team.secret);
    let get = |path: &str| {
        http.get(url(&c, f, path))
            .header("authorization", &team)
            .send()
            .map(|r| async move { answer(r.expect("GET")).await })
            .flatten()
    };
    let (s, body) = c
        .wait_for("the follower to know team-a's token", LIMIT, || async {
            let (s, body) = get("/v1/namespaces/team-a/services").await;
            (s != 401).then_some((s, body))
        })
        .await;
    assert_eq!(s, 200, "{body}");
    for other in [
        "/v1/services/web",
        "/v1/namespaces/team-b/services",
        "/v1/watch",
    ] {
        let (s, body) = get(other).await;
        assert_error(s, &body, 403, "PERMISSION_DENIED");
    }
    let (_, body) = get("/v1/namespaces").await;
    assert_eq!(body["namespaces"][0]["name"], "team-a", "{body}");
    assert_eq!(
        body["namespaces"].as_array().map(Vec::len),
        Some(1),
        "{body}"
    );
}

/// The events of an SSE body read so far: (event, id, data) each.
fn sse_events(text: &str) -> Vec<(String, String, Value)> {
    text.split("\n\n")
        .filter_map(|block| {
            let (mut event, mut id, mut data) = (String::new(), String::new(), String::new());
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    event = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("id:") {
                    id = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim());
                }
            }
            let data = serde_json::from_str(&data).ok()?;
            (!event.is_empty()).then_some((event, id, data))
        })
        .collect()
}

/// Reads `r` until its events satisfy `done`; returns them.
async fn read_until(
    r: &mut reqwest::Response,
    text: &mut String,
    done: impl Fn(&[(String, String, Value)]) -> bool,
) -> Vec<(String, String, Value)> {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let events = sse_events(text);
        if done(&events) {
            return events;
        }
        let chunk = tokio::time::timeout_at(deadline, r.chunk())
            .await
            .unwrap_or_else(|_| panic!("no such events within {LIMIT:?}: {text}"))
            .expect("the stream");
        match chunk {
            Some(bytes) => text.push_str(&String::from_utf8_lossy(&bytes)),
            None => panic!("the stream ended: {text}"),
        }
    }
}

fn put_ids(events: &[(String, String, Value)]) -> Vec<String> {
    events
        .iter()
        .filter(|(e, _, _)| e == "events")
        .flat_map(|(_, _, d)| d["events"].as_array().cloned().unwrap_or_default())
        .filter_map(|e| e["instance"]["id"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test]
async fn an_sse_watch_resumes_on_another_node_with_last_event_id() {
    let mut c = http_cluster("", false).await;
    let http = reqwest::Client::new();
    let leader = c.leader().await;
    register(&c.client(), "web", "w-1", 8080).await;
    let mut r = http
        .get(url(&c, leader, "/v1/watch/web"))
        .send()
        .await
        .expect("watch");
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        r.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("text/event-stream")
    );
    let mut text = String::new();
    let events = read_until(&mut r, &mut text, |e| {
        e.iter().any(|(k, _, _)| k == "reset")
    })
    .await;
    let (_, _, initial) = &events[0];
    assert_eq!(initial["reset"], "RESET_REASON_INITIAL", "{initial}");
    assert_eq!(initial["instances"][0]["id"], "w-1", "{initial}");
    register(&c.client(), "web", "w-2", 8081).await;
    let events = read_until(&mut r, &mut text, |e| {
        put_ids(e).contains(&"w-2".to_string())
    })
    .await;
    let last_id = events.last().map(|(_, id, _)| id.clone()).expect("an id");

    // The node the stream was on dies; writes go on meanwhile.
    c.kill(leader);
    drop(r);
    let other = (1..=3).find(|id| *id != leader).expect("another node");
    register(&c.client(), "web", "w-3", 8082).await;
    let mut r = http
        .get(url(&c, other, "/v1/watch/web"))
        .header("last-event-id", &last_id)
        .send()
        .await
        .expect("resume");
    assert_eq!(r.status().as_u16(), 200);
    let mut text = String::new();
    let events = read_until(&mut r, &mut text, |e| {
        put_ids(e).contains(&"w-3".to_string())
    })
    .await;
    assert!(
        events.iter().all(|(k, _, _)| k == "events"),
        "resumed without a reset: {events:?}"
    );
    assert_eq!(
        put_ids(&events),
        ["w-3"],
        "only what came after the last id"
    );
}

/// `ROSTER_CURL`, or `None` after saying the test skips.
fn curl_binary() -> Option<String> {
    let curl = std::env::var("ROSTER_CURL").ok();
    if curl.is_none() {
        eprintln!("skipped: set ROSTER_CURL (.ci/run installs curl and does)");
    }
    curl
}

/// Runs curl with `args`: its exit code, the HTTP status (0 without an
/// answer) and the body.
async fn curl(curl: &str, args: &[&str]) -> (Option<i32>, u16, String) {
    let out = tokio::process::Command::new(curl)
        .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .await
        .expect("run curl");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    let status = status.trim().parse().unwrap_or(0);
    (out.status.code(), status, body.to_string())
}

/// `n` nodes with `extra` (their `[tls]` section and more) serving the HTTP
/// API, which `[tls]` makes HTTPS; the harness dials gRPC with `client_tls`.
async fn https_cluster(
    n: u64,
    extra: &str,
    client_tls: tonic::transport::ClientTlsConfig,
    auth: bool,
) -> TestCluster {
    let setup = Setup {
        http: true,
        auth,
        client_tls: Some(client_tls),
        ..Setup::default()
    };
    TestCluster::start_setup(n, extra, setup)
        .await
        .expect("a cluster with TLS")
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 temporary path")
}

#[tokio::test]
async fn https_with_curl_lists_with_a_token_refuses_without_and_refuses_plaintext() {
    let Some(bin) = curl_binary() else { return };
    let dir = tempfile::tempdir().expect("dir");
    let ca = Ca::new("cluster");
    let extra =
        tls_section(dir.path(), &ca.nodes(3), &ca.pem(), false) + "[auth]\nenabled = true\n";
    let c = https_cluster(3, &extra, tls_from_pem(ca.pem().as_bytes(), None), true).await;
    register(&c.client(), "web", "w-1", 8080).await;
    // A follower: the request crosses the peer port's mutual TLS to the leader.
    let f = follower(&c).await;
    let cacert = dir.path().join("ca.crt");
    let cacert = path_str(&cacert);
    let base = format!("https://127.0.0.1:{}", c.node(f).http_port);
    let services = format!("{base}/v1/services");
    let bearer = format!("authorization: Bearer {}", c.token());

    let (code, status, body) = curl(&bin, &["--cacert", cacert, "-H", &bearer, &services]).await;
    assert_eq!((code, status), (Some(0), 200), "{body}");
    let listed: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(listed["services"][0]["name"], "web", "{body}");

    // Without a token: refused as the plain HTTP API refuses it.
    let (_, status, body) = curl(&bin, &["--cacert", cacert, &services]).await;
    let body: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_error(status, &body, 401, "UNAUTHENTICATED");

    // The watch streams over HTTPS too (cut by --max-time, as it never ends).
    let watch = format!("{base}/v1/watch/web");
    let (_, _, events) = curl(
        &bin,
        &[
            "--cacert",
            cacert,
            "-H",
            &bearer,
            "-N",
            "--max-time",
            "2",
            &watch,
        ],
    )
    .await;
    assert!(
        events.contains("event: reset") && events.contains("w-1"),
        "{events}"
    );

    // Plaintext to the same port: no catalogue, a 400 that says why.
    let plain = services.replace("https://", "http://");
    let (_, status, body) = curl(&bin, &["-H", &bearer, &plain]).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("this port serves HTTPS"), "{body}");
    // Without the cluster's CA, curl does not trust the node (60: the peer's
    // certificate cannot be verified).
    let (code, status, body) = curl(&bin, &["-H", &bearer, &services]).await;
    assert_eq!((code, status), (Some(60), 0), "{body}");
}

#[tokio::test]
async fn https_asks_for_a_client_certificate_where_the_client_port_does() {
    let Some(bin) = curl_binary() else { return };
    let dir = tempfile::tempdir().expect("dir");
    let ca = Ca::new("cluster");
    let extra = tls_section(dir.path(), &ca.nodes(1), &ca.pem(), true);
    let client = ca.issue("client", &["client"]);
    let identity = (client.cert.as_bytes(), client.key.as_bytes());
    let tls = tls_from_pem(ca.pem().as_bytes(), Some(identity));
    let c = https_cluster(1, &extra, tls, false).await;
    let (cert, key) = (dir.path().join("client.crt"), dir.path().join("client.key"));
    std::fs::write(&cert, &client.cert).expect("write");
    std::fs::write(&key, &client.key).expect("write");
    let cacert = dir.path().join("ca.crt");
    let status = format!(
        "https://127.0.0.1:{}/v1/cluster/status",
        c.node(1).http_port
    );
    let with = [
        "--cacert",
        path_str(&cacert),
        "--cert",
        path_str(&cert),
        "--key",
        path_str(&key),
    ];
    let (code, got, body) = curl(&bin, &[&with[..], &[&status]].concat()).await;
    assert_eq!((code, got), (Some(0), 200), "{body}");
    let (code, got, body) = curl(&bin, &[&with[..2], &[&status]].concat()).await;
    assert_eq!(got, 0, "no client certificate, no answer: {body}");
    assert_ne!(code, Some(0), "{body}");
}

/// A new HTTPS connection to `addr` from a client trusting only `ca_pem`:
/// the certificate the node served and its answer to `GET path`; `None`
/// when the handshake fails.
async fn https_get(addr: SocketAddr, ca_pem: &str, path: &str) -> Option<(Vec<u8>, String)> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.ok()?).ok()?;
    }
    let config = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .ok()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let name = ServerName::try_from("127.0.0.1").ok()?;
    let mut tls = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .ok()?;
    let served = tls.get_ref().1.peer_certificates()?.first()?.to_vec();
    let request = format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await.ok()?;
    let mut answer = Vec::new();
    // A close without TLS's close_notify is an error here, after the answer.
    let _ = tls.read_to_end(&mut answer).await;
    Some((served, String::from_utf8_lossy(&answer).into_owned()))
}

fn der(issued: &Issued) -> Vec<u8> {
    CertificateDer::from_pem_slice(issued.cert.as_bytes())
        .expect("a PEM certificate")
        .to_vec()
}

#[tokio::test]
async fn https_serves_a_rotated_certificate_to_new_connections() {
    let dir = tempfile::tempdir().expect("dir");
    let (old, new) = (Ca::new("old"), Ca::new("new"));
    let both = format!("{}{}", old.pem(), new.pem());
    let first = old.node(1, &["127.0.0.1"]);
    let extra = tls_section(dir.path(), std::slice::from_ref(&first), &both, false);
    let c = https_cluster(1, &extra, tls_from_pem(both.as_bytes(), None), false).await;
    let addr = SocketAddr::from(([127, 0, 0, 1], c.node(1).http_port));
    let path = "/v1/cluster/status";
    let (served, answer) = https_get(addr, &old.pem(), path)
        .await
        .expect("a handshake with the old CA's certificate");
    assert_eq!(served, der(&first));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        https_get(addr, &new.pem(), path).await.is_none(),
        "the new CA's certificate before the rotation"
    );

    // The files change under the running node.
    let rotated = new.node(1, &["127.0.0.1"]);
    write_nodes(dir.path(), std::slice::from_ref(&rotated));
    let new_pem = new.pem();
    let (served, answer) = c
        .wait_for(
            "HTTPS to serve the new certificate",
            Duration::from_secs(15),
            || https_get(addr, &new_pem, path),
        )
        .await;
    assert_eq!(served, der(&rotated));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// A namespace's routes are `default`'s under `/v1/namespaces/{namespace}`;
/// the old routes stay `default`'s.
#[tokio::test]
async fn a_namespace_has_the_same_routes_under_v1_namespaces() {
    let c = http_cluster("", false).await;
    c.client()
        .create_namespace(roster::proto::v1::CreateNamespaceRequest {
            name: "team-a".into(),
            quotas: None,
        })
        .await
        .expect("namespace");
    let f = follower(&c).await;
    let http = reqwest::Client::new();
    let ns = |path: &str| url(&c, f, &format!("/v1/namespaces/team-a{path}"));
    let r = http
        .put(ns("/services/web/instances/w-1"))
        .body(json!({"address": "10.0.0.1", "port": 8080}).to_string())
        .send()
        .await
        .expect("PUT");
    let (s, body) = answer(r).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["instance"]["namespace"], "team-a", "{body}");
    let (s, body) = get_json(&http, ns("/services/web")).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["instances"][0]["id"], "w-1", "{body}");
    let (_, body) = get_json(&http, ns("/services")).await;
    assert_eq!(body["services"][0]["name"], "web", "{body}");
    let (_, body) = get_json(&http, url(&c, f, "/v1/services")).await;
    assert!(
        body["services"].as_array().is_none_or(Vec::is_empty),
        "{body}"
    );
    let (_, body) = get_json(&http, url(&c, f, "/v1/namespaces")).await;
    let names: Vec<&str> = body["namespaces"]
        .as_array()
        .map(|a| a.iter().filter_map(|n| n["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(names, ["default", "team-a"], "{body}");
    let (s, body) = get_json(&http, url(&c, f, "/v1/namespaces/nope/services")).await;
    assert_error(s, &body, 404, "NOT_FOUND");
    let r = http
        .delete(ns("/services/web/instances/w-1"))
        .send()
        .await
        .expect("DELETE");
    assert_eq!(answer(r).await.0, 200);
}

/// `PUT /v1/services/{service}/maintenance` takes an instance out of the
/// healthy view through a follower; a body naming the service is refused.
#[tokio::test]
async fn maintenance_through_http() {
    let c = http_cluster("", false).await;
    let f = follower(&c).await;
    let http = reqwest::Client::new();
    for id in ["web-1", "web-2"] {
        let r = http
            .put(url(&c, f, &format!("/v1/services/web/instances/{id}")))
            .body(json!({"address": "10.0.0.1", "port": 8080}).to_string())
            .send()
            .await
            .expect("PUT");
        assert_eq!(r.status().as_u16(), 200);
    }
    let maintenance = |body: Value| {
        http.put(url(&c, f, "/v1/services/web/maintenance"))
            .body(body.to_string())
            .send()
            .map(|r| async move { answer(r.expect("PUT")).await })
            .flatten()
    };
    let (s, body) = maintenance(json!({"id": "web-1", "enable": true, "reason": "drain"})).await;
    assert_eq!((s, body["instances"].as_u64()), (200, Some(1)), "{body}");
    let (_, body) = get_json(&http, url(&c, f, "/v1/services/web?healthy=true")).await;
    let ids: Vec<&str> = body["instances"]
        .as_array()
        .map(|a| a.iter().filter_map(|i| i["id"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(ids, ["web-2"], "{body}");
    let (_, body) = get_json(&http, url(&c, f, "/v1/services/web")).await;
    let one = &body["instances"][0];
    assert_eq!(
        (one["status"].as_str(), one["maintenance"].as_str()),
        (Some("HEALTH_STATUS_MAINTENANCE"), Some("drain")),
        "{body}"
    );
    let (s, body) = maintenance(json!({"service": "api", "enable": true})).await;
    assert_error(s, &body, 400, "INVALID_ARGUMENT");
    let (s, body) = maintenance(json!({"id": "web-9", "enable": true})).await;
    assert_error(s, &body, 404, "NOT_FOUND");
}

/// Answers are kept and reused while their service is unchanged: every
/// change of the service shows in the next read, over HTTP (Roster's route
/// and Consul's) and over gRPC (`unchanged_since`), and a change of
/// another service keeps the answer.
#[tokio::test]
async fn kept_answers_follow_every_change_of_their_service() {
    use roster::proto::v1::{
        ConfigureServiceRequest, DeregisterRequest, GetServiceRequest, SetMaintenanceRequest,
    };
    let c = http_cluster("", false).await;
    let f = follower(&c).await;
    let client = c.client();
    let http = reqwest::Client::new();
    // The ids a read of `path` answers (Roster's shape or Consul's), and
    // the whole Roster answer.
    let read = |path: &str| {
        let u = url(&c, f, path);
        let http = http.clone();
        async move {
            let (s, body) = get_json(&http, u).await;
            assert_eq!(s, 200, "{body}");
            let list = body["instances"].as_array().cloned();
            let list = list.unwrap_or_else(|| body.as_array().cloned().unwrap_or_default());
            let mut ids: Vec<String> = list
                .iter()
                .filter_map(|i| i["id"].as_str().or(i["Service"]["ID"].as_str()))
                .map(String::from)
                .collect();
            ids.sort();
            (ids, body)
        }
    };
    register(&client, "web", "web-1", 80).await;
    let (ids, first) = read("/v1/services/web").await;
    assert_eq!(ids, ["web-1"]);
    // Another service's change: the same instances and service revision,
    // a later revision.
    register(&client, "api", "api-1", 80).await;
    let (ids, again) = read("/v1/services/web").await;
    assert_eq!(ids, ["web-1"]);
    assert_eq!(again["serviceRevision"], first["serviceRevision"]);
    assert_ne!(again["revision"], first["revision"]);
    assert_eq!(again["instances"], first["instances"]);
    register(&client, "web", "web-2", 80).await;
    assert_eq!(read("/v1/services/web").await.0, ["web-1", "web-2"]);
    assert_eq!(
        read("/v1/services/web?healthy=true").await.0,
        ["web-1", "web-2"]
    );
    assert_eq!(
        read("/v1/health/service/web?passing").await.0,
        ["web-1", "web-2"]
    );
    client
        .set_maintenance(SetMaintenanceRequest {
            service: "web".into(),
            id: "web-1".into(),
            enable: true,
            ..Default::default()
        })
        .await
        .expect("maintenance");
    assert_eq!(read("/v1/services/web?healthy=true").await.0, ["web-2"]);
    assert_eq!(read("/v1/services/web").await.0, ["web-1", "web-2"]);
    assert_eq!(read("/v1/health/service/web?passing").await.0, ["web-2"]);
    assert_eq!(
        read("/v1/catalog/service/web")
            .await
            .1
            .as_array()
            .map(Vec::len),
        Some(2)
    );
    // A setting is a change too.
    let (_, before) = read("/v1/services/web?healthy=true").await;
    client
        .configure_service(ConfigureServiceRequest {
            service: "web".into(),
            protect_threshold_percent: 100,
            ..Default::default()
        })
        .await
        .expect("configure");
    let (ids, body) = read("/v1/services/web?healthy=true").await;
    assert_eq!(ids, ["web-2"]);
    assert_ne!(body["serviceRevision"], before["serviceRevision"]);
    client
        .deregister(DeregisterRequest {
            service: "web".into(),
            id: "web-2".into(),
            ..Default::default()
        })
        .await
        .expect("deregister");
    assert_eq!(read("/v1/services/web").await.0, ["web-1"]);
    assert_eq!(
        read("/v1/catalog/service/web")
            .await
            .1
            .as_array()
            .map(Vec::len),
        Some(1)
    );

    // Over gRPC: the caller's copy is vouched for until the service changes.
    let get = |since: u64| GetServiceRequest {
        service: "web".into(),
        unchanged_since: since,
        ..Default::default()
    };
    let full = client.get_service(get(0)).await.expect("get");
    assert!(!full.unchanged && full.service_revision > 0);
    let same = client
        .get_service(get(full.service_revision))
        .await
        .expect("get");
    assert!(same.unchanged && same.instances.is_empty(), "{same:?}");
    register(&client, "api", "api-2", 80).await;
    let same = client
        .get_service(get(full.service_revision))
        .await
        .expect("get");
    assert!(same.unchanged, "another service's change keeps it");
    // A revision past what the node holds vouches for nothing.
    let ahead = client
        .get_service(get(same.revision + 1000))
        .await
        .expect("get");
    assert!(!ahead.unchanged && ahead.instances.len() == 1, "{ahead:?}");
    register(&client, "web", "web-3", 80).await;
    let changed = client
        .get_service(get(full.service_revision))
        .await
        .expect("get");
    assert!(
        !changed.unchanged && changed.instances.len() == 2,
        "{changed:?}"
    );
    assert!(changed.service_revision > full.service_revision);
}
