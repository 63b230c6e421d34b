//! Roster's subset of Consul's HTTP API, used by a real Consul client
//! library (py-consul, which `.ci/run` installs into its venv): register
//! with a TTL check, pass, warn and fail it, a blocking health query that returns on the
//! next change, maintenance, deregistration. Its errors as Consul's.

use std::process::Command;

use serde_json::Value;

use crate::common::*;
use crate::http::http_cluster;

const SCRIPT: &str = r#"
import os, threading, time
import consul

c = consul.Consul(host="127.0.0.1", port=int(os.environ["PORT"]))
assert c.agent.service.register("web", service_id="web-1", address="127.0.0.1", port=8080,
                                tags=["v1"], check=consul.Check.ttl("30s"))
assert c.agent.check.ttl_pass("service:web-1")
index, nodes = c.health.service("web", passing=True)
assert [n["Service"]["ID"] for n in nodes] == ["web-1"], nodes
def ttl_check(note_expected, status_expected):
    _, nodes = c.health.service("web")
    (ch,) = [ch for n in nodes for ch in n["Checks"] if ch["CheckID"] == "service:web-1"]
    assert (ch["Status"], ch["Output"]) == (status_expected, note_expected), ch
# warn and fail set the TTL check's status and its output, as Consul's do;
# ?passing keeps only passing instances.
assert c.agent.check.ttl_warn("service:web-1", notes="queue backing up")
ttl_check("queue backing up", "warning")
assert c.health.service("web", passing=True)[1] == []
assert c.agent.check.ttl_fail("service:web-1", notes="out of memory")
ttl_check("out of memory", "critical")
assert c.agent.check.ttl_pass("service:web-1", notes="recovered")
ttl_check("recovered", "passing")
index, nodes = c.health.service("web", passing=True)
assert [n["Service"]["ID"] for n in nodes] == ["web-1"], nodes
assert int(index) > 0, index
# A blocking query returns on the next change, not at the end of its wait.
def later():
    time.sleep(0.5)
    c.agent.service.register("web", service_id="web-2", address="127.0.0.1", port=8081)
threading.Thread(target=later).start()
started = time.time()
index2, nodes = c.health.service("web", index=index, wait="60s")
took = time.time() - started
assert int(index2) > int(index), (index, index2)
assert sorted(n["Service"]["ID"] for n in nodes) == ["web-1", "web-2"], nodes
assert took < 30, took
# Maintenance: out of the passing view, with Consul's maintenance check.
assert c.agent.service.maintenance("web-1", True, reason="kernel upgrade")
_, nodes = c.health.service("web", passing=True)
assert [n["Service"]["ID"] for n in nodes] == ["web-2"], nodes
_, nodes = c.health.service("web")
checks = {ch["CheckID"]: ch for n in nodes for ch in n["Checks"]}
assert checks["_service_maintenance:web-1"]["Status"] == "critical", checks
assert checks["_service_maintenance:web-1"]["Notes"] == "kernel upgrade", checks
assert c.agent.service.maintenance("web-1", False)
_, services = c.catalog.services()
assert services == {"web": ["v1"]}, services
assert c.agent.service.deregister("web-1")
_, nodes = c.health.service("web")
assert [n["Service"]["ID"] for n in nodes] == ["web-2"], nodes
assert not c.agent.service.deregister("nope"), "an unknown id is 404"
assert c.status.leader(), "a leader"
print("ok")
"#;

#[tokio::test]
async fn python_consul_client_registers_passes_blocks_and_deregisters() {
    let Some(python) = python() else {
        return;
    };
    let c = http_cluster("", false).await;
    // A follower: writes are forwarded to the leader, as over gRPC.
    let leader = c.leader().await;
    let f = (1..=3).find(|&i| i != leader).expect("a follower");
    let out = Command::new(&python)
        .args(["-c", SCRIPT])
        .env("PORT", c.node(f).http_port.to_string())
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
}

/// Errors as Consul answers them: plain text, its status codes, and
/// nothing stored on a refused registration.
#[tokio::test]
async fn bad_requests_get_consul_s_answers() {
    let c = http_cluster("", false).await;
    let base = format!("http://127.0.0.1:{}", c.node(1).http_port);
    let http = reqwest::Client::new();
    let put = |path: &str, body: &str| {
        http.put(format!("{base}{path}"))
            .body(body.to_string())
            .send()
    };
    let said = |r: reqwest::Response| async move {
        let status = r.status().as_u16();
        (status, r.text().await.expect("body"))
    };
    let (s, t) = said(
        put("/v1/agent/service/register", "{not json")
            .await
            .expect("PUT"),
    )
    .await;
    assert_eq!(s, 400, "{t}");
    assert!(t.starts_with("Request decode failed"), "{t}");
    let (s, t) = said(
        put(
            "/v1/agent/service/register",
            r#"{"Name": "web", "Address": "127.0.0.1", "Bogus": 1}"#,
        )
        .await
        .expect("PUT"),
    )
    .await;
    assert_eq!(s, 400);
    assert!(t.contains("unknown field \"Bogus\""), "{t}");
    let (s, t) = said(
        put("/v1/agent/check/pass/service:nope", "")
            .await
            .expect("PUT"),
    )
    .await;
    assert_eq!(s, 404);
    assert!(t.starts_with("Unknown check ID \"service:nope\""), "{t}");
    let (s, t) = said(
        put("/v1/agent/service/maintenance/nope", "")
            .await
            .expect("PUT"),
    )
    .await;
    assert_eq!((s, t.as_str()), (400, "Missing value for enable"));
    let (s, t) = said(
        http.get(format!("{base}/v1/kv/x"))
            .send()
            .await
            .expect("GET"),
    )
    .await;
    assert_eq!(s, 404, "{t}");
    assert!(
        t.contains("/v1/catalog"),
        "an unknown route names what is served: {t}"
    );
    let (s, t) = said(
        http.get(format!("{base}/v1/health/service/web?filter=x"))
            .send()
            .await
            .expect("GET"),
    )
    .await;
    assert_eq!(s, 400);
    assert!(t.contains("does not serve ?filter"), "{t}");
    // Nothing was stored; an empty service is `[]` with an index.
    let r = http
        .get(format!("{base}/v1/catalog/service/web"))
        .send()
        .await
        .expect("GET");
    let index: u64 = r
        .headers()
        .get("x-consul-index")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("X-Consul-Index");
    assert!(index > 0);
    let body: Value = serde_json::from_str(&r.text().await.expect("body")).expect("JSON");
    assert_eq!(body, serde_json::json!([]));
}
