//! The HTTP/JSON API against a 3-node cluster, asked with a real HTTP client
//! (reqwest): writes through a follower, reads, errors as JSON with fitting
//! statuses, tokens, the OpenAPI document, and the SSE watch resumed with
//! `Last-Event-ID` on another node after its node was killed.

mod common;

use std::time::Duration;

use common::*;
use futures::FutureExt;
use serde_json::{json, Value};

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

async fn http_cluster(extra: &str, auth: bool) -> TestCluster {
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
