//! A subset of Consul's HTTP API on the HTTP port, for the tools that speak
//! it (Prometheus `consul_sd_configs`, Consul client libraries): catalog and
//! health reads with blocking queries, `agent/self` and `status`, agent
//! registration, TTL passes and maintenance. Each request becomes Registry
//! calls through the client port's own stack (tokens, limits, forwarding),
//! as the rest of the HTTP API does; answers and errors are shaped as
//! Consul's (plain-text errors, `X-Consul-*` headers). What Roster cannot do
//! as Consul would is refused with 400 saying so, never half done.

use std::time::Duration;

use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::Router;
use serde_json::{json, Map, Value};
use tonic::{Code, Status};

use super::answers::Question;
use super::{pairs, Api, Failure};
use crate::grpc::LEADER_CONTACT_HEADER;
use crate::proto::v1 as pb;

/// The datacenter every answer names: a Roster cluster is one.
const DATACENTER: &str = "dc1";
/// Consul's default and longest blocking wait.
const DEFAULT_WAIT: Duration = Duration::from_secs(300);
const MAX_WAIT: Duration = Duration::from_secs(600);

/// The routes, merged into the HTTP API's router.
pub(super) fn routes() -> Router<Api> {
    Router::new()
        .route("/v1/catalog/services", get(catalog_services))
        .route("/v1/catalog/service/{service}", get(catalog_service))
        .route("/v1/health/service/{service}", get(health_service))
        .route("/v1/health/state/{state}", get(health_state))
        .route("/v1/status/leader", get(status_leader))
        .route("/v1/status/peers", get(status_peers))
        .route("/v1/agent/self", get(agent_self))
        .route("/v1/agent/service/register", put(register))
        .route("/v1/agent/service/deregister/{id}", put(deregister))
        .route("/v1/agent/service/maintenance/{id}", put(maintenance))
        .route(
            "/v1/agent/check/pass/{check}",
            put(|s, p, h, q| ttl_update(pb::HealthStatus::Passing, s, p, h, q)),
        )
        .route(
            "/v1/agent/check/warn/{check}",
            put(|s, p, h, q| ttl_update(pb::HealthStatus::Warning, s, p, h, q)),
        )
        .route(
            "/v1/agent/check/fail/{check}",
            put(|s, p, h, q| ttl_update(pb::HealthStatus::Critical, s, p, h, q)),
        )
}

/// An error as Consul answers it: a status and a plain-text body.
#[derive(Debug)]
struct Refusal(StatusCode, String);

type Answer = std::result::Result<Response, Refusal>;

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (
            self.0,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            self.1,
        )
            .into_response()
    }
}

fn bad(what: impl Into<String>) -> Refusal {
    Refusal(StatusCode::BAD_REQUEST, what.into())
}

impl From<Status> for Refusal {
    fn from(s: Status) -> Self {
        let code = match s.code() {
            Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
                StatusCode::BAD_REQUEST
            }
            // Consul answers a missing or unknown token 403 too.
            Code::Unauthenticated | Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let text = match s.code() {
            Code::Unauthenticated | Code::PermissionDenied => {
                format!("Permission denied: {}", s.message())
            }
            _ => s.message().to_string(),
        };
        Refusal(code, text)
    }
}

impl From<Failure> for Refusal {
    fn from(f: Failure) -> Self {
        f.0.into()
    }
}

/// What every request may carry: the token, the namespace (`ns`, as
/// Consul Enterprise names it), the consistency and a blocking index.
#[derive(Default)]
struct Query {
    token: Option<String>,
    namespace: String,
    stale: bool,
    consistent: bool,
    index: u64,
    wait: Option<Duration>,
    tags: Vec<String>,
    passing: bool,
    /// Query parameters of the agent endpoints.
    enable: Option<String>,
    reason: String,
}

impl Query {
    fn parse(headers: &HeaderMap, query: Option<String>) -> std::result::Result<Query, Refusal> {
        let mut q = Query::default();
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        if let Some(auth) = header(header::AUTHORIZATION.as_str()) {
            if let Some((scheme, token)) = auth.split_once(' ') {
                if scheme.eq_ignore_ascii_case("bearer") {
                    q.token = Some(token.trim().to_string());
                }
            }
        }
        if let Some(t) = header("x-consul-token") {
            q.token = Some(t.to_string());
        }
        for (k, v) in pairs(query)? {
            match k.as_str() {
                "token" => q.token = Some(v),
                "ns" => q.namespace = v,
                "stale" => q.stale = true,
                "consistent" => q.consistent = true,
                "index" => q.index = v.parse().map_err(|_| bad("Invalid index"))?,
                "wait" => q.wait = Some(go_duration(&v).ok_or_else(|| bad("Invalid wait time"))?),
                "tag" => q.tags.push(v),
                "passing" => {
                    q.passing = v.is_empty()
                        || go_bool(&v).ok_or_else(|| bad("Invalid value for ?passing"))?
                }
                "dc" if v == DATACENTER || v.is_empty() => {}
                "dc" => return Err(Refusal(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("No path to datacenter: a Roster cluster is one datacenter, {DATACENTER:?}"),
                )),
                "enable" => q.enable = Some(v),
                "reason" | "note" => q.reason = v,
                // Accepted as Consul does; they change nothing here.
                "pretty" | "replace-existing-checks" => {}
                other => {
                    return Err(bad(format!(
                        "Roster's Consul API does not serve ?{other} (docs/api.md#consul-compatible-api)"
                    )))
                }
            }
        }
        if q.stale && q.consistent {
            return Err(bad(
                "Cannot specify ?stale with ?consistent, conflicting semantics.",
            ));
        }
        Ok(q)
    }

    /// `msg` as a Registry call carrying the request's token.
    fn call<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if let Some(t) = &self.token {
            if let Ok(v) = format!("Bearer {t}").parse() {
                r.metadata_mut().insert("authorization", v);
            }
        }
        r
    }

    fn consistency(&self) -> pb::Consistency {
        if self.stale {
            pb::Consistency::Stale
        } else {
            pb::Consistency::Linearizable
        }
    }

    /// Consul's name for the consistency a read had.
    fn effective(&self) -> &'static str {
        match (self.stale, self.consistent) {
            (true, _) => "stale",
            (_, true) => "consistent",
            _ => "leader",
        }
    }
}

/// A boolean as Go's `strconv.ParseBool` reads it, as Consul does.
fn go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// A Go duration (`10s`, `1m30s`, `500ms`, `120000ms`, `1.5h`); a bare
/// number is nanoseconds, as Consul's JSON takes it.
fn go_duration(s: &str) -> Option<Duration> {
    if let Ok(ns) = s.parse::<u64>() {
        return Some(Duration::from_nanos(ns));
    }
    let mut total = 0f64;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let value: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += value * seconds;
        rest = &rest[unit_end..];
    }
    Some(Duration::from_secs_f64(total))
}

/// A JSON answer with Consul's read headers.
fn answer(
    body: &impl serde::Serialize,
    index: u64,
    q: &Query,
    meta: &tonic::metadata::MetadataMap,
) -> Response {
    match serde_json::to_vec(body) {
        Ok(body) => json_answer(body.into(), index, q, meta),
        Err(e) => Refusal(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding the answer: {e}"),
        )
        .into_response(),
    }
}

/// An answer already in JSON, with Consul's read headers.
fn json_answer(
    body: bytes::Bytes,
    index: u64,
    q: &Query,
    meta: &tonic::metadata::MetadataMap,
) -> Response {
    let mut headers = HeaderMap::new();
    let mut set = |name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    };
    // Never 0: a client blocking on 0 would not block.
    set("x-consul-index", index.max(1).to_string());
    let contact = meta
        .get(LEADER_CONTACT_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("0")
        .to_string();
    set("x-consul-knownleader", "true".into());
    set("x-consul-lastcontact", contact);
    set("x-consul-effective-consistency", q.effective().into());
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    (headers, body).into_response()
}

/// Blocks while nothing of `service` (every service with `None`) changed
/// after `q.index`, up to the query's wait; returns the revision of the
/// change that ended the wait (0: none, or not a blocking query).
async fn block(
    api: &mut Api,
    q: &Query,
    service: Option<&str>,
) -> std::result::Result<u64, Refusal> {
    if q.index == 0 {
        return Ok(0);
    }
    let wait = q.wait.unwrap_or(DEFAULT_WAIT).min(MAX_WAIT);
    // Consul's jitter, so that clients woken together do not come back together.
    let wait = wait + wait.mul_f64(fastrand::f64() / 16.0);
    let req = pb::WatchRequest {
        service: service.unwrap_or_default().to_string(),
        since_revision: q.index,
        namespace: q.namespace.clone(),
    };
    let mut stream = match api.registry.watch(q.call(req)).await {
        Ok(s) => s.into_inner(),
        // An index past what the cluster holds (it was restored from an
        // older backup): answer now with a lower index, which tells the
        // client to start again.
        Err(s) if s.code() == Code::OutOfRange => return Ok(1),
        Err(s) => return Err(s.into()),
    };
    let changed = async {
        loop {
            match stream.message().await {
                Ok(Some(m)) if !m.events.is_empty() || m.reset != 0 => return Ok(m.revision),
                Ok(Some(_)) => {}
                Ok(None) => return Ok(0),
                Err(s) => return Err(Refusal::from(s)),
            }
        }
    };
    match tokio::time::timeout(wait, changed).await {
        Ok(r) => r,
        Err(_) => Ok(0),
    }
}

async fn instances(
    api: &mut Api,
    q: &Query,
    service: &str,
) -> std::result::Result<(Vec<pb::Instance>, tonic::metadata::MetadataMap), Refusal> {
    let req = pb::GetServiceRequest {
        service: service.to_string(),
        namespace: q.namespace.clone(),
        healthy_only: false,
        tags: q.tags.clone(),
        consistency: q.consistency() as i32,
        ..Default::default()
    };
    let r = api.registry.get_service(q.call(req)).await?;
    let meta = r.metadata().clone();
    Ok((r.into_inner().instances, meta))
}

/// A service's answer in Consul's shape for `route` (`render` writes it
/// from the instances), reused while the service has not changed
/// (`Answers`), with its index and its read's metadata.
async fn service_answer(
    api: &mut Api,
    q: &Query,
    service: &str,
    woke: u64,
    route: &'static str,
    render: impl FnOnce(&[pb::Instance]) -> serde_json::Result<Vec<u8>>,
) -> Answer {
    let req = pb::GetServiceRequest {
        service: service.to_string(),
        namespace: q.namespace.clone(),
        tags: q.tags.clone(),
        consistency: q.consistency() as i32,
        ..Default::default()
    };
    let question = Question {
        route,
        namespace: q.namespace.clone(),
        service: service.to_string(),
        healthy: q.passing,
        tags: q.tags.clone(),
    };
    let (r, rendered) = api
        .answers
        .read(&mut api.registry, question, q.call(req), render)
        .await?;
    // Its newest change that a read shows, the change that woke a blocking
    // query, or the index the query already had when nothing changed (a
    // deregistration leaves no instance behind).
    let index = rendered
        .newest
        .max(woke)
        .max(if woke == 0 { q.index } else { 0 });
    Ok(json_answer(rendered.body, index, q, r.metadata()))
}

/// Every service of the namespace, by name, with its read's metadata.
async fn services(
    api: &mut Api,
    q: &Query,
) -> std::result::Result<(Vec<String>, u64, tonic::metadata::MetadataMap), Refusal> {
    let req = pb::ListServicesRequest {
        namespace: q.namespace.clone(),
        consistency: q.consistency() as i32,
        ..Default::default()
    };
    let r = api.registry.list_services(q.call(req)).await?;
    let meta = r.metadata().clone();
    let r = r.into_inner();
    Ok((
        r.services.into_iter().map(|s| s.name).collect(),
        r.revision,
        meta,
    ))
}

async fn catalog_services(
    State(mut api): State<Api>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Answer {
    let q = Query::parse(&headers, query)?;
    let woke = block(&mut api, &q, None).await?;
    let (names, revision, meta) = services(&mut api, &q).await?;
    let mut out = Map::new();
    for name in names {
        let (all, _) = instances(&mut api, &q, &name).await?;
        let mut tags: Vec<String> = all.into_iter().flat_map(|i| i.tags).collect();
        tags.sort();
        tags.dedup();
        out.insert(name, json!(tags));
    }
    let index = if q.index > 0 && woke == 0 {
        q.index
    } else {
        revision
    };
    Ok(answer(&Value::Object(out), index, &q, &meta))
}

async fn catalog_service(
    State(mut api): State<Api>,
    Path(service): Path<String>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Answer {
    let q = Query::parse(&headers, query)?;
    let woke = block(&mut api, &q, Some(&service)).await?;
    service_answer(&mut api, &q, &service, woke, "consul-catalog", |all| {
        let body: Vec<_> = all.iter().map(shapes::catalog_entry).collect();
        serde_json::to_vec(&body)
    })
    .await
}

async fn health_service(
    State(mut api): State<Api>,
    Path(service): Path<String>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Answer {
    let q = Query::parse(&headers, query)?;
    let woke = block(&mut api, &q, Some(&service)).await?;
    let passing = q.passing;
    service_answer(&mut api, &q, &service, woke, "consul-health", |all| {
        let body: Vec<_> = all
            .iter()
            .filter(|i| !passing || i.status == pb::HealthStatus::Passing as i32)
            .map(shapes::health_entry)
            .collect();
        serde_json::to_vec(&body)
    })
    .await
}

async fn health_state(
    State(mut api): State<Api>,
    Path(state): Path<String>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Answer {
    let q = Query::parse(&headers, query)?;
    if !matches!(state.as_str(), "any" | "passing" | "warning" | "critical") {
        return Err(bad(format!(
            "Unsupported state {state:?}: use any, passing, warning or critical"
        )));
    }
    let woke = block(&mut api, &q, None).await?;
    let (names, revision, meta) = services(&mut api, &q).await?;
    let mut held = Vec::new();
    for name in names {
        held.extend(instances(&mut api, &q, &name).await?.0);
    }
    let out: Vec<_> = held
        .iter()
        .flat_map(shapes::checks)
        .filter(|c| state == "any" || c.status == state)
        .collect();
    let index = if q.index > 0 && woke == 0 {
        q.index
    } else {
        revision
    };
    Ok(answer(&out, index, &q, &meta))
}

async fn status(api: &mut Api, q: &Query) -> std::result::Result<pb::StatusResponse, Refusal> {
    Ok(api
        .cluster
        .status(q.call(pb::StatusRequest::default()))
        .await?
        .into_inner())
}

async fn status_leader(
    State(mut api): State<Api>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Answer {
    let q = Query::parse(&headers, query)?;
    let s = status(&mut api, &q).await?;
    Ok(axum::Json(json!(s.leader_address)).into_response())
}

async fn status_peers(
    State(mut api): State<Api>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Answer {
    let q = Query::parse(&headers, query)?;
    let s = status(&mut api, &q).await?;
    let peers: Vec<String> = s
        .members
        .iter()
        .filter(|m| m.voter)
        .map(|m| m.address.clone())
        .collect();
    Ok(axum::Json(json!(peers)).into_response())
}

/// What clients read of an agent: its datacenter and name. Every value at
/// the top is an object, as Consul's Go client decodes it.
async fn agent_self(
    State(mut api): State<Api>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Answer {
    let q = Query::parse(&headers, query)?;
    let s = status(&mut api, &q).await?;
    let name = format!("roster-{}", s.node_id);
    let (host, port) = s
        .advertise_address
        .rsplit_once(':')
        .unwrap_or((s.advertise_address.as_str(), "0"));
    Ok(axum::Json(json!({
        "Config": {
            "Datacenter": DATACENTER,
            "PrimaryDatacenter": DATACENTER,
            "NodeName": name,
            "NodeID": "",
            "Revision": "",
            "Server": true,
            "Version": env!("CARGO_PKG_VERSION"),
        },
        "DebugConfig": {},
        "Coord": null,
        "Member": {
            "Name": name,
            "Addr": host,
            "Port": port.parse::<u16>().unwrap_or(0),
            "Tags": {"role": "roster", "dc": DATACENTER},
            "Status": 1,
        },
        "Stats": {},
        "Meta": {},
    }))
    .into_response())
}

/// Consul's JSON shapes, written straight from the instances (no JSON tree
/// in between: a health answer of a 100-instance service holds 300 checks).
mod shapes {
    use std::collections::HashMap;

    use serde::Serialize;

    use super::DATACENTER;
    use crate::proto::v1 as pb;

    /// `{}`.
    #[derive(Serialize)]
    pub struct Empty {}

    #[derive(Serialize)]
    #[serde(rename_all = "PascalCase")]
    pub struct Weights {
        passing: u32,
        warning: u32,
    }

    fn weights(i: &pb::Instance) -> Weights {
        Weights {
            passing: i.weight.max(1),
            warning: 1,
        }
    }

    /// A Roster instance is its own Consul node, named after its address:
    /// Roster keeps no agents.
    #[derive(Serialize)]
    #[serde(rename_all = "PascalCase")]
    pub struct Node<'a> {
        #[serde(rename = "ID")]
        id: &'a str,
        node: &'a str,
        address: &'a str,
        datacenter: &'a str,
        tagged_addresses: Option<Empty>,
        meta: Empty,
        create_index: u64,
        modify_index: u64,
    }

    pub fn node(i: &pb::Instance) -> Node<'_> {
        Node {
            id: "",
            node: &i.address,
            address: &i.address,
            datacenter: DATACENTER,
            tagged_addresses: None,
            meta: Empty {},
            create_index: i.create_revision,
            modify_index: i.mod_revision,
        }
    }

    #[derive(Serialize)]
    #[serde(rename_all = "PascalCase")]
    pub struct AgentService<'a> {
        #[serde(rename = "ID")]
        id: &'a str,
        service: &'a str,
        tags: &'a [String],
        address: &'a str,
        meta: &'a HashMap<String, String>,
        port: u32,
        weights: Weights,
        enable_tag_override: bool,
        create_index: u64,
        modify_index: u64,
    }

    pub fn agent_service(i: &pb::Instance) -> AgentService<'_> {
        AgentService {
            id: &i.id,
            service: &i.service,
            tags: &i.tags,
            address: &i.address,
            meta: &i.metadata,
            port: i.port,
            weights: weights(i),
            enable_tag_override: false,
            create_index: i.create_revision,
            modify_index: i.mod_revision,
        }
    }

    #[derive(Serialize)]
    #[serde(rename_all = "PascalCase")]
    pub struct CatalogService<'a> {
        #[serde(rename = "ID")]
        id: &'a str,
        node: &'a str,
        address: &'a str,
        datacenter: &'a str,
        tagged_addresses: Option<Empty>,
        node_meta: Empty,
        service_kind: &'a str,
        #[serde(rename = "ServiceID")]
        service_id: &'a str,
        service_name: &'a str,
        service_tags: &'a [String],
        service_address: &'a str,
        service_weights: Weights,
        service_meta: &'a HashMap<String, String>,
        service_port: u32,
        service_enable_tag_override: bool,
        create_index: u64,
        modify_index: u64,
    }

    pub fn catalog_entry(i: &pb::Instance) -> CatalogService<'_> {
        CatalogService {
            id: "",
            node: &i.address,
            address: &i.address,
            datacenter: DATACENTER,
            tagged_addresses: None,
            node_meta: Empty {},
            service_kind: "",
            service_id: &i.id,
            service_name: &i.service,
            service_tags: &i.tags,
            service_address: &i.address,
            service_weights: weights(i),
            service_meta: &i.metadata,
            service_port: i.port,
            service_enable_tag_override: false,
            create_index: i.create_revision,
            modify_index: i.mod_revision,
        }
    }

    #[derive(Serialize)]
    #[serde(rename_all = "PascalCase")]
    pub struct HealthEntry<'a> {
        node: Node<'a>,
        service: AgentService<'a>,
        checks: Vec<Check<'a>>,
    }

    pub fn health_entry(i: &pb::Instance) -> HealthEntry<'_> {
        HealthEntry {
            node: node(i),
            service: agent_service(i),
            checks: checks(i),
        }
    }

    #[derive(Serialize)]
    #[serde(rename_all = "PascalCase")]
    pub struct Check<'a> {
        node: &'a str,
        #[serde(rename = "CheckID")]
        check_id: String,
        name: String,
        pub status: &'static str,
        notes: &'a str,
        output: &'a str,
        #[serde(rename = "ServiceID")]
        service_id: &'a str,
        service_name: &'a str,
        service_tags: &'a [String],
        #[serde(rename = "Type")]
        kind: &'static str,
        interval: &'static str,
        timeout: &'static str,
        exposed_port: u32,
        definition: Empty,
        create_index: u64,
        modify_index: u64,
    }

    /// Consul's word: it has no maintenance status (a check of its own says
    /// so) and no unknown one.
    fn status_word(s: i32) -> &'static str {
        match pb::HealthStatus::word(s) {
            w @ ("passing" | "warning") => w,
            _ => "critical",
        }
    }

    /// The checks Consul would show for the instance: its node's (always
    /// passing: Roster has no agents to fail), its own (`service:<id>`,
    /// from its check's status), and `_service_maintenance:<id>` while it
    /// is in maintenance.
    pub fn checks(i: &pb::Instance) -> Vec<Check<'_>> {
        use pb::health_check::Kind;
        let of_service = |check_id: String, name: String, status, kind| Check {
            node: &i.address,
            check_id,
            name,
            status,
            notes: "",
            output: "",
            service_id: &i.id,
            service_name: &i.service,
            service_tags: &i.tags,
            kind,
            interval: "",
            timeout: "",
            exposed_port: 0,
            definition: Empty {},
            create_index: i.create_revision,
            modify_index: i.mod_revision,
        };
        let kind = match i.check.as_ref().and_then(|c| c.kind.as_ref()) {
            Some(Kind::Ttl(_)) => "ttl",
            Some(Kind::Tcp(_)) => "tcp",
            Some(Kind::Http(_)) => "http",
            Some(Kind::Grpc(_)) => "grpc",
            None => "",
        };
        let mut out = vec![
            Check {
                check_id: "serfHealth".into(),
                name: "Serf Health Status".into(),
                output: "Agent alive and reachable",
                service_id: "",
                service_name: "",
                service_tags: &[],
                ..of_service(String::new(), String::new(), "passing", "")
            },
            Check {
                output: &i.check_output,
                ..of_service(
                    format!("service:{}", i.id),
                    format!("Service '{}' check", i.service),
                    status_word(i.check_status),
                    kind,
                )
            },
        ];
        if !i.maintenance.is_empty() {
            out.push(Check {
                notes: &i.maintenance,
                ..of_service(
                    format!("_service_maintenance:{}", i.id),
                    "Service Maintenance Mode".into(),
                    "critical",
                    "maintenance",
                )
            });
        }
        out
    }
}

/// The one instance of namespace `q.namespace` with id `id`: Consul's agent
/// endpoints name a service instance by its id alone.
async fn find(api: &mut Api, q: &Query, id: &str) -> std::result::Result<pb::Instance, Refusal> {
    let (names, _, _) = services(api, q).await?;
    let mut found = Vec::new();
    for name in names {
        let (all, _) = instances(api, q, &name).await?;
        found.extend(all.into_iter().filter(|i| i.id == id));
    }
    match found.len() {
        0 => Err(Refusal(
            StatusCode::NOT_FOUND,
            format!("Unknown service ID {id:?}. Ensure that the service ID is passed, not the service name."),
        )),
        1 => Ok(found.remove(0)),
        _ => Err(bad(format!(
            "service ID {id:?} is held by {} services here ({}); Roster's own API names the service too",
            found.len(),
            found.iter().map(|i| i.service.as_str()).collect::<Vec<_>>().join(", ")
        ))),
    }
}

/// An empty 200, as Consul's agent writes answer.
fn done() -> Answer {
    Ok(StatusCode::OK.into_response())
}

async fn deregister(
    State(mut api): State<Api>,
    Path(id): Path<String>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Answer {
    let q = Query::parse(&headers, query)?;
    let i = find(&mut api, &q, &id).await?;
    let req = pb::DeregisterRequest {
        service: i.service,
        id: i.id,
        namespace: q.namespace.clone(),
    };
    api.registry.deregister(q.call(req)).await?;
    done()
}

async fn maintenance(
    State(mut api): State<Api>,
    Path(id): Path<String>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Answer {
    let q = Query::parse(&headers, query)?;
    let enable = match q.enable.as_deref() {
        None => return Err(bad("Missing value for enable")),
        Some(v) => go_bool(v).ok_or_else(|| bad(format!("Invalid value for enable: {v:?}")))?,
    };
    let i = find(&mut api, &q, &id).await?;
    let req = pb::SetMaintenanceRequest {
        service: i.service,
        id: i.id,
        enable,
        reason: q.reason.clone(),
        namespace: q.namespace.clone(),
    };
    api.registry.set_maintenance(q.call(req)).await?;
    done()
}

/// The instance a check id names: `service:<id>`, as Consul names the check
/// of a service registered with one.
async fn checked(
    api: &mut Api,
    q: &Query,
    check: &str,
) -> std::result::Result<pb::Instance, Refusal> {
    let unknown = || {
        Refusal(
            StatusCode::NOT_FOUND,
            format!("Unknown check ID {check:?}. Ensure that the check ID is passed, not the check name."),
        )
    };
    let id = check.strip_prefix("service:").ok_or_else(unknown)?;
    let i = find(api, q, id).await.map_err(|r| match r.0 {
        StatusCode::NOT_FOUND => unknown(),
        _ => r,
    })?;
    Ok(i)
}

/// `pass`, `warn` and `fail` of a TTL check: a heartbeat reporting
/// `status`, with `?note=` as the check's output; it renews the lease, as
/// Consul's reset the TTL.
async fn ttl_update(
    status: pb::HealthStatus,
    State(mut api): State<Api>,
    Path(check): Path<String>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Answer {
    let q = Query::parse(&headers, query)?;
    let i = checked(&mut api, &q, &check).await?;
    if !matches!(
        i.check.as_ref().and_then(|c| c.kind.as_ref()),
        Some(pb::health_check::Kind::Ttl(_))
    ) {
        return Err(Refusal(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("CheckID {check:?} does not have associated TTL"),
        ));
    }
    let req = pb::HeartbeatRequest {
        service: i.service,
        id: i.id,
        namespace: q.namespace.clone(),
        status: status as i32,
        output: q.reason.clone(),
    };
    api.registry.heartbeat(q.call(req)).await?;
    done()
}

/// `PUT /v1/agent/service/register`: a Consul service definition as a
/// Roster registration. Keys match without regard to case, as Consul's do.
async fn register(
    State(mut api): State<Api>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: axum::body::Bytes,
) -> Answer {
    let q = Query::parse(&headers, query)?;
    let def: Value =
        serde_json::from_slice(&body).map_err(|e| bad(format!("Request decode failed: {e}")))?;
    let req = registration(&def, &q.namespace)?;
    api.registry.register(q.call(req)).await?;
    done()
}

/// An object's fields by lowercased name, refusing any not in `known`.
fn fields(
    v: &Value,
    what: &str,
    known: &[&str],
) -> std::result::Result<Map<String, Value>, Refusal> {
    let Value::Object(m) = v else {
        return Err(bad(format!(
            "Request decode failed: {what} is not a JSON object"
        )));
    };
    let mut out = Map::new();
    for (k, v) in m {
        let key = k.to_ascii_lowercase().replace('_', "");
        if !known.contains(&key.as_str()) {
            return Err(bad(format!(
                "Request decode failed: json: unknown field {k:?}"
            )));
        }
        out.insert(key, v.clone());
    }
    Ok(out)
}

fn string(m: &Map<String, Value>, key: &str) -> std::result::Result<String, Refusal> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(v) => Err(bad(format!(
            "Request decode failed: json: cannot unmarshal {v} into field {key} of type string"
        ))),
    }
}

fn duration_ms(m: &Map<String, Value>, key: &str) -> std::result::Result<u64, Refusal> {
    let d = match m.get(key) {
        None | Some(Value::Null) => return Ok(0),
        Some(Value::String(s)) if s.is_empty() => return Ok(0),
        Some(Value::String(s)) => go_duration(s),
        Some(Value::Number(n)) => n.as_u64().map(Duration::from_nanos),
        _ => None,
    };
    d.map(|d| d.as_millis() as u64).ok_or_else(|| {
        bad(format!(
            "Request decode failed: {key}: not a duration such as \"10s\" or \"1m30s\""
        ))
    })
}

const SERVICE_FIELDS: &[&str] = &[
    "name",
    "id",
    "tags",
    "address",
    "port",
    "meta",
    "weights",
    "enabletagoverride",
    "check",
    "checks",
    "kind",
    "taggedaddresses",
    "token",
    "socketpath",
    "proxy",
    "connect",
    "locality",
    "namespace",
];
const CHECK_FIELDS: &[&str] = &[
    "checkid",
    "name",
    "status",
    "notes",
    "ttl",
    "tcp",
    "http",
    "grpc",
    "grpcusetls",
    "interval",
    "timeout",
    "deregistercriticalserviceafter",
    "method",
    "header",
    "tlsskipverify",
    "successbeforepassing",
    "failuresbeforecritical",
    "serviceid",
];

fn registration(def: &Value, namespace: &str) -> std::result::Result<pb::RegisterRequest, Refusal> {
    let m = fields(def, "the service definition", SERVICE_FIELDS)?;
    let name = string(&m, "name")?;
    if name.is_empty() {
        return Err(bad("Missing service name"));
    }
    let id = match string(&m, "id")? {
        id if id.is_empty() => name.clone(),
        id => id,
    };
    let address = string(&m, "address")?;
    if address.is_empty() {
        return Err(bad(
            "Missing service address: Roster has no agent address to fall back on; set Address",
        ));
    }
    for unserved in [
        "kind",
        "proxy",
        "connect",
        "socketpath",
        "taggedaddresses",
        "locality",
    ] {
        if m.get(unserved)
            .is_some_and(|v| !v.is_null() && *v != json!("") && *v != json!({}))
        {
            return Err(bad(format!(
                "Roster does not serve {unserved} (Connect, mesh and socket services)"
            )));
        }
    }
    let tags: Vec<String> = match m.get("tags") {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => serde_json::from_value(v.clone())
            .map_err(|e| bad(format!("Request decode failed: Tags: {e}")))?,
    };
    let metadata: std::collections::HashMap<String, String> = match m.get("meta") {
        None | Some(Value::Null) => Default::default(),
        Some(v) => serde_json::from_value(v.clone())
            .map_err(|e| bad(format!("Request decode failed: Meta: {e}")))?,
    };
    let port = match m.get("port") {
        None | Some(Value::Null) => 0,
        Some(v) => v
            .as_u64()
            .and_then(|p| u32::try_from(p).ok())
            .ok_or_else(|| bad("Request decode failed: Port: not a port number"))?,
    };
    let weight = weight(&m)?;
    let check = one_check(&m, &id, &address)?;
    Ok(pb::RegisterRequest {
        instance: Some(pb::Instance {
            service: name,
            id,
            address,
            port,
            tags,
            metadata,
            weight,
            check,
            ..Default::default()
        }),
        session: String::new(),
        namespace: namespace.to_string(),
    })
}

/// `Weights.Passing`, Roster's weight (Warning has no counterpart).
fn weight(m: &Map<String, Value>) -> std::result::Result<u32, Refusal> {
    let Some(w) = m.get("weights").filter(|w| !w.is_null()) else {
        return Ok(1);
    };
    let w = fields(w, "Weights", &["passing", "warning"])?;
    match w.get("passing").and_then(Value::as_u64) {
        Some(0) => Err(bad("Invalid Weights: Passing must be greater than 0")),
        Some(p) => Ok(u32::try_from(p).unwrap_or(u32::MAX)),
        None => Ok(1),
    }
}

/// `Check` and `Checks` together: at most one, as Roster holds.
fn one_check(
    m: &Map<String, Value>,
    id: &str,
    address: &str,
) -> std::result::Result<Option<pb::HealthCheck>, Refusal> {
    let mut defs: Vec<&Value> = Vec::new();
    if let Some(c) = m.get("check").filter(|c| !c.is_null()) {
        defs.push(c);
    }
    if let Some(Value::Array(cs)) = m.get("checks") {
        defs.extend(cs.iter());
    }
    match defs.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(check(one, id, address)?)),
        _ => Err(bad(format!(
            "Invalid check: {} checks; Roster holds one check per instance",
            defs.len()
        ))),
    }
}

/// A Consul check definition as the instance's one check. TCP, HTTP and
/// gRPC checks must probe the instance's own address: Roster's do.
fn check(def: &Value, id: &str, address: &str) -> std::result::Result<pb::HealthCheck, Refusal> {
    use pb::health_check::Kind;
    let c = fields(def, "the check", CHECK_FIELDS)?;
    let check_id = string(&c, "checkid")?;
    if !check_id.is_empty() && check_id != format!("service:{id}") {
        return Err(bad(format!(
            "Invalid check: CheckID {check_id:?}; Roster names an instance's check \"service:{id}\""
        )));
    }
    if let Some(method) = c.get("method").and_then(Value::as_str) {
        if !method.is_empty() && !method.eq_ignore_ascii_case("GET") {
            return Err(bad(
                "Invalid check: Roster's HTTP checks GET; Method must be GET",
            ));
        }
    }
    if c.get("header")
        .is_some_and(|h| h.as_object().is_some_and(|h| !h.is_empty()))
    {
        return Err(bad("Invalid check: Roster's HTTP checks send no Header"));
    }
    let kind = check_kind(&c, address)?;
    let count = |key: &str| -> u32 {
        c.get(key)
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0)
    };
    let interval = duration_ms(&c, "interval")?;
    let timeout = duration_ms(&c, "timeout")?;
    if !matches!(kind, Kind::Ttl(_)) && interval == 0 {
        return Err(bad(
            "Invalid check: Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or OSService checks",
        ));
    }
    Ok(pb::HealthCheck {
        kind: Some(kind),
        interval_ms: u32::try_from(interval).unwrap_or(u32::MAX),
        timeout_ms: u32::try_from(timeout).unwrap_or(u32::MAX),
        failures_before_critical: count("failuresbeforecritical"),
        successes_before_passing: count("successbeforepassing"),
        deregister_after_ms: duration_ms(&c, "deregistercriticalserviceafter")?,
    })
}

/// What a check probes: TTL, or TCP, HTTP or gRPC at the instance's own
/// address (`host:port` naming it, `localhost` or `127.0.0.1`).
fn check_kind(
    c: &Map<String, Value>,
    address: &str,
) -> std::result::Result<pb::health_check::Kind, Refusal> {
    use pb::health_check::Kind;
    // `host:port` on the instance's own address; the port, or 0 (the instance's).
    let own = |target: &str, what: &str| -> std::result::Result<u32, Refusal> {
        let (host, port) = target
            .rsplit_once(':')
            .ok_or_else(|| bad(format!("Invalid check: {what} {target:?} is not host:port")))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host != address && host != "localhost" && host != "127.0.0.1" {
            return Err(bad(format!(
                "Invalid check: {what} {target:?}; Roster probes the instance's own address {address:?}"
            )));
        }
        port.parse()
            .map_err(|_| bad(format!("Invalid check: {what} {target:?} has no port")))
    };
    let ttl = duration_ms(c, "ttl")?;
    let tcp = string(c, "tcp")?;
    let http = string(c, "http")?;
    let grpc = string(c, "grpc")?;
    Ok(
        match (ttl > 0, tcp.is_empty(), http.is_empty(), grpc.is_empty()) {
            (true, true, true, true) => Kind::Ttl(pb::TtlCheck {
                ttl_ms: u32::try_from(ttl).unwrap_or(u32::MAX),
            }),
            (false, false, true, true) => Kind::Tcp(pb::TcpCheck {
                port: own(&tcp, "TCP")?,
            }),
            (false, true, false, true) => {
                let rest = http.strip_prefix("http://").ok_or_else(|| {
                    bad("Invalid check: Roster's HTTP checks speak http:// to the instance")
                })?;
                let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
                Kind::Http(pb::HttpCheck {
                    port: own(authority, "HTTP")?,
                    path: format!("/{path}"),
                })
            }
            (false, true, true, false) => {
                let (authority, service) = grpc.split_once('/').unwrap_or((grpc.as_str(), ""));
                Kind::Grpc(pb::GrpcCheck {
                    port: own(authority, "GRPC")?,
                    service: service.to_string(),
                })
            }
            (false, true, true, true) => {
                return Err(bad("Invalid check: give one of TTL, TCP, HTTP or GRPC"))
            }
            _ => {
                return Err(bad(
                    "Invalid check: give only one of TTL, TCP, HTTP or GRPC",
                ))
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_parse_as_go_does() {
        let ms = |s: &str| go_duration(s).map(|d| d.as_millis());
        assert_eq!(ms("10s"), Some(10_000));
        assert_eq!(ms("1m30s"), Some(90_000));
        assert_eq!(ms("500ms"), Some(500));
        assert_eq!(ms("120000ms"), Some(120_000));
        assert_eq!(ms("1.5h"), Some(5_400_000));
        assert_eq!(
            ms("1000000000"),
            Some(1_000),
            "a bare number is nanoseconds"
        );
        assert_eq!(ms("10x"), None);
        assert_eq!(ms(""), None);
    }

    #[test]
    fn a_definition_becomes_a_registration_with_its_check() {
        let def = json!({
            "name": "web", "ID": "web-1", "Address": "10.0.0.5", "port": 8080,
            "Tags": ["v1"], "Meta": {"zone": "eu"}, "Weights": {"Passing": 5, "Warning": 1},
            "Check": {"HTTP": "http://10.0.0.5:8080/health", "Interval": "10s", "Timeout": "1s",
                      "DeregisterCriticalServiceAfter": "1m"}
        });
        let r = registration(&def, "").expect("valid");
        let i = r.instance.expect("instance");
        assert_eq!(
            (i.service.as_str(), i.id.as_str(), i.port, i.weight),
            ("web", "web-1", 8080, 5)
        );
        let c = i.check.expect("check");
        assert_eq!(
            c.kind,
            Some(pb::health_check::Kind::Http(pb::HttpCheck {
                port: 8080,
                path: "/health".into()
            }))
        );
        assert_eq!(
            (c.interval_ms, c.timeout_ms, c.deregister_after_ms),
            (10_000, 1_000, 60_000)
        );
        let ttl = json!({"name": "w", "address": "10.0.0.1", "check": {"ttl": "15s"}});
        let i = registration(&ttl, "")
            .expect("ttl")
            .instance
            .expect("instance");
        assert_eq!(i.id, "w", "the id defaults to the name");
        assert_eq!(
            i.check.and_then(|c| c.kind),
            Some(pb::health_check::Kind::Ttl(pb::TtlCheck { ttl_ms: 15_000 }))
        );
    }

    #[test]
    fn what_roster_cannot_do_is_refused_saying_so() {
        let refused = |def: Value| {
            registration(&def, "")
                .err()
                .map(|r| r.1)
                .unwrap_or_default()
        };
        assert!(refused(json!({"address": "a"})).contains("Missing service name"));
        assert!(refused(json!({"name": "w", "address": "a", "foo": 1})).contains("unknown field"));
        assert!(refused(json!({"name": "w"})).contains("Missing service address"));
        let two = json!({"name": "w", "address": "a", "checks": [{"ttl": "1s"}, {"ttl": "2s"}]});
        assert!(refused(two).contains("one check per instance"));
        let elsewhere = json!({"name": "w", "address": "10.0.0.1", "check": {"tcp": "10.9.9.9:80", "interval": "1s"}});
        assert!(refused(elsewhere).contains("own address"));
        let no_interval = json!({"name": "w", "address": "a", "check": {"tcp": "a:80"}});
        assert!(refused(no_interval).contains("Interval must be > 0"));
    }
}
