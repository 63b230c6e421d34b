//! HTTP/JSON: the Registry's operations as REST resources, a service's watch
//! as Server-Sent Events, and the cluster's status.
//!
//! Every request becomes the gRPC call the client port serves, made
//! in-process through that port's own service stack: the same token check,
//! limits, validation, forwarding to the leader and error codes, so the two
//! APIs cannot disagree. Bodies are the proto3 JSON mapping of the same
//! messages (`pbjson`): lowerCamelCase names, enums by name, 64-bit integers
//! as strings. Errors are `{"code": "<gRPC code name>", "message": ...}` with
//! an HTTP status that fits the code. With `[tls]` it is served over HTTPS
//! only (`https`).

use std::convert::Infallible;

use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use futures::{Stream, StreamExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::body::Body;
use tonic::{Code, Status};
use tower::util::BoxCloneSyncService;

use crate::grpc::LEADER_CONTACT_HEADER;
use crate::proto::v1 as pb;
use crate::proto::v1::cluster_client::ClusterClient;
use crate::proto::v1::registry_client::RegistryClient;
use crate::rules;

mod answers;
mod consul;
mod https;
mod prometheus;
pub use https::Https;

/// A gRPC service of the client port, as this module calls it.
pub type Grpc = BoxCloneSyncService<http::Request<Body>, http::Response<Body>, Infallible>;

/// The OpenAPI document of these routes.
const OPENAPI: &str = include_str!("openapi.json");
/// The web console: one page, its script and style inline (no CDN, no
/// build step), fed by this API.
const CONSOLE: &str = include_str!("console.html");

#[derive(Clone)]
struct Api {
    registry: RegistryClient<Grpc>,
    cluster: ClusterClient<Grpc>,
    answers: std::sync::Arc<answers::Answers>,
}

/// What a namespace's routes start with, in place of `/v1`, which names
/// `default`'s.
const NAMESPACED: &str = "/v1/namespaces/{namespace}";

/// A route's path parameters: each route has the ones it names.
#[derive(Default, serde::Deserialize)]
struct Params {
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    service: String,
    #[serde(default)]
    id: String,
}

/// The route the rules table gives `roster.v1.<rpc>` (see [`rules`]).
fn route(rpc: &str) -> &'static str {
    rules::http_route(&format!("/roster.v1.{rpc}"))
}

/// Serves the HTTP API on `listener`, over TLS with `https`, until the
/// returned task is aborted.
pub fn serve(
    listener: TcpListener,
    https: Option<Https>,
    registry: Grpc,
    cluster: Grpc,
) -> JoinHandle<()> {
    let api = Api {
        registry: RegistryClient::new(registry),
        cluster: ClusterClient::new(cluster),
        answers: Default::default(),
    };
    // A namespace's routes are `default`'s under /v1/namespaces/{namespace}.
    let mut app = Router::new();
    for prefix in ["/v1", NAMESPACED] {
        let at = |route: &str| format!("{prefix}{}", route.trim_start_matches("/v1"));
        app = app
            .route(&at(route("Registry/ListServices")), get(list_services))
            .route(&at(route("Registry/GetService")), get(get_service))
            .route(
                &at(route("Registry/Register")),
                put(register).delete(deregister),
            )
            .route(&at(route("Registry/Heartbeat")), post(heartbeat))
            .route(&at(route("Registry/SetMaintenance")), put(set_maintenance))
            .route(&at("/v1/watch"), get(watch_all))
            .route(&at("/v1/discovery/prometheus"), get(prometheus::targets))
            .route(&at(route("Registry/Watch")), get(watch));
    }
    let app = app
        .route(route("Registry/ListNamespaces"), get(list_namespaces))
        .route(route("Cluster/Status"), get(status))
        .route("/v1/openapi.json", get(openapi))
        .route("/ui", get(console))
        .merge(consul::routes())
        .fallback(not_served)
        .with_state(api);
    tokio::spawn(async move {
        let served = match https {
            Some(https) => axum::serve(https::Listener::new(listener, https), app).await,
            None => axum::serve(listener, app).await,
        };
        if let Err(e) = served {
            tracing::error!("HTTP API stopped: {e}");
        }
    })
}

/// A gRPC status as an HTTP answer.
struct Failure(Status);

impl From<Status> for Failure {
    fn from(s: Status) -> Self {
        Failure(s)
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (http_status(self.0.code()), Json(error_json(&self.0))).into_response()
    }
}

/// An error's JSON body: `{"code": "NOT_FOUND", "message": "..."}`.
fn error_json(s: &Status) -> serde_json::Value {
    serde_json::json!({"code": code_name(s.code()), "message": s.message()})
}

/// The HTTP status that fits a gRPC code (as grpc-gateway maps them).
fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
            StatusCode::BAD_REQUEST
        }
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The code's name as gRPC spells it (`NOT_FOUND`).
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

type Answer<T> = std::result::Result<Reply<T>, Failure>;

/// A gRPC answer as JSON, with the staleness metadata a node that does not
/// lead put on it (`LEADER_CONTACT_HEADER`) as an HTTP header of that name.
struct Reply<T>(tonic::Response<T>);

impl<T: serde::Serialize> IntoResponse for Reply<T> {
    fn into_response(self) -> Response {
        let contact = staleness(self.0.metadata());
        (contact, Json(self.0.into_inner())).into_response()
    }
}

/// The `LEADER_CONTACT_HEADER` of a gRPC answer, as an HTTP header.
fn staleness(meta: &tonic::metadata::MetadataMap) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Some(v) = meta.as_ref().get(LEADER_CONTACT_HEADER) {
        headers.insert(LEADER_CONTACT_HEADER, v.clone());
    }
    headers
}

/// `msg` as a gRPC request carrying the HTTP request's token.
fn request<T>(headers: &HeaderMap, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        if let Ok(v) = v.to_str().unwrap_or_default().parse() {
            r.metadata_mut().insert("authorization", v);
        }
    }
    r
}

fn bad_request(what: String) -> Failure {
    Failure(Status::invalid_argument(what))
}

fn unknown(key: &str) -> Failure {
    bad_request(format!("unknown query parameter {key:?}"))
}

/// The query string's pairs, keys repeated as given.
fn pairs(query: Option<String>) -> std::result::Result<Vec<(String, String)>, Failure> {
    serde_urlencoded::from_str(query.as_deref().unwrap_or_default())
        .map_err(|e| bad_request(format!("query string: {e}")))
}

fn flag(key: &str, v: &str) -> std::result::Result<bool, Failure> {
    match v {
        "" | "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(bad_request(format!("{key}={v:?}: use true or false"))),
    }
}

fn consistency(v: &str) -> std::result::Result<pb::Consistency, Failure> {
    match v {
        "linearizable" => Ok(pb::Consistency::Linearizable),
        "stale" => Ok(pb::Consistency::Stale),
        _ => Err(bad_request(format!(
            "consistency={v:?}: use linearizable or stale"
        ))),
    }
}

async fn list_services(
    State(mut api): State<Api>,
    p: Option<Path<Params>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Answer<pb::ListServicesResponse> {
    let mut msg = pb::ListServicesRequest {
        namespace: p.map(|Path(p)| p.namespace).unwrap_or_default(),
        ..Default::default()
    };
    for (k, v) in pairs(query)? {
        match k.as_str() {
            "consistency" => msg.consistency = consistency(&v)? as i32,
            "page_size" => {
                msg.page_size = v.parse().map_err(|_| {
                    bad_request(format!("page_size={v:?}: a number of services (0: all)"))
                })?
            }
            "page_token" => msg.page_token = v,
            _ => return Err(unknown(&k)),
        }
    }
    let r = api.registry.list_services(request(&headers, msg)).await?;
    Ok(Reply(r))
}

async fn get_service(
    State(mut api): State<Api>,
    Path(p): Path<Params>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, Failure> {
    let mut msg = pb::GetServiceRequest {
        service: p.service,
        namespace: p.namespace,
        ..Default::default()
    };
    for (k, v) in pairs(query)? {
        match k.as_str() {
            "healthy" => msg.healthy_only = flag(&k, &v)?,
            "tag" => msg.tags.push(v),
            "consistency" => msg.consistency = consistency(&v)? as i32,
            _ => return Err(unknown(&k)),
        }
    }
    let question = answers::Question {
        route: "service",
        namespace: msg.namespace.clone(),
        service: msg.service.clone(),
        healthy: msg.healthy_only,
        tags: msg.tags.clone(),
    };
    let render = |all: &[pb::Instance]| serde_json::to_vec(all);
    let (r, rendered) = api
        .answers
        .read(&mut api.registry, question, request(&headers, msg), render)
        .await?;
    let body = service_json(r.get_ref(), &rendered.body);
    Ok((
        staleness(r.metadata()),
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response())
}

/// A `GetServiceResponse` in the proto3 JSON mapping, as pbjson writes it
/// (fields in order, defaults left out), with its instances already
/// rendered as a JSON array.
fn service_json(r: &pb::GetServiceResponse, instances: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(instances.len() + 96);
    let mut field = |name: &str, value: &[u8]| {
        out.push(if out.is_empty() { b'{' } else { b',' });
        out.extend_from_slice(format!("\"{name}\":").as_bytes());
        out.extend_from_slice(value);
    };
    if r.revision != 0 {
        field("revision", format!("\"{}\"", r.revision).as_bytes());
    }
    if instances != b"[]" {
        field("instances", instances);
    }
    if r.protection_active {
        field("protectionActive", b"true");
    }
    if r.service_revision != 0 {
        field(
            "serviceRevision",
            format!("\"{}\"", r.service_revision).as_bytes(),
        );
    }
    if out.is_empty() {
        out.push(b'{');
    }
    out.push(b'}');
    out
}

/// The body is a `SetMaintenanceRequest` without its service and namespace
/// (the path's): `{"id": "web-1", "enable": true, "reason": "disk swap"}`;
/// no `id`: every instance of the service.
async fn set_maintenance(
    State(mut api): State<Api>,
    Path(Params {
        namespace, service, ..
    }): Path<Params>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Answer<pb::SetMaintenanceResponse> {
    let msg: pb::SetMaintenanceRequest = serde_json::from_slice(&body).map_err(|e| {
        bad_request(format!(
            "body: not a maintenance request in JSON ({{\"id\", \"enable\", \"reason\"}}): {e}"
        ))
    })?;
    if !msg.service.is_empty() || !msg.namespace.is_empty() {
        return Err(bad_request(
            "body: the service and namespace are the path's; leave them out".into(),
        ));
    }
    let msg = pb::SetMaintenanceRequest {
        service,
        namespace,
        ..msg
    };
    let r = api.registry.set_maintenance(request(&headers, msg)).await?;
    Ok(Reply(r))
}

/// The body is the instance (its `service` and `id` may be left out; given,
/// they must match the path); `?session=` registers it under a session.
async fn register(
    State(mut api): State<Api>,
    Path(Params {
        namespace,
        service,
        id,
    }): Path<Params>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: axum::body::Bytes,
) -> Answer<pb::RegisterResponse> {
    let mut inst: pb::Instance = serde_json::from_slice(&body)
        .map_err(|e| bad_request(format!("body: not an Instance in JSON: {e}")))?;
    for (field, given, path) in [("service", &inst.service, &service), ("id", &inst.id, &id)] {
        if !given.is_empty() && given != path {
            return Err(bad_request(format!(
                "body's {field} {given:?} differs from the path's {path:?}"
            )));
        }
    }
    inst.service = service;
    inst.id = id;
    let mut msg = pb::RegisterRequest {
        instance: Some(inst),
        namespace,
        ..Default::default()
    };
    for (k, v) in pairs(query)? {
        match k.as_str() {
            "session" => msg.session = v,
            _ => return Err(unknown(&k)),
        }
    }
    let r = api.registry.register(request(&headers, msg)).await?;
    Ok(Reply(r))
}

async fn deregister(
    State(mut api): State<Api>,
    Path(p): Path<Params>,
    headers: HeaderMap,
) -> Answer<pb::DeregisterResponse> {
    let msg = pb::DeregisterRequest {
        service: p.service,
        id: p.id,
        namespace: p.namespace,
    };
    let r = api.registry.deregister(request(&headers, msg)).await?;
    Ok(Reply(r))
}

async fn heartbeat(
    State(mut api): State<Api>,
    Path(p): Path<Params>,
    headers: HeaderMap,
) -> Answer<pb::HeartbeatResponse> {
    let msg = pb::HeartbeatRequest {
        service: p.service,
        id: p.id,
        namespace: p.namespace,
        ..Default::default()
    };
    let r = api.registry.heartbeat(request(&headers, msg)).await?;
    Ok(Reply(r))
}

async fn list_namespaces(
    State(mut api): State<Api>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Answer<pb::ListNamespacesResponse> {
    let mut msg = pb::ListNamespacesRequest::default();
    for (k, v) in pairs(query)? {
        match k.as_str() {
            "consistency" => msg.consistency = consistency(&v)? as i32,
            _ => return Err(unknown(&k)),
        }
    }
    let r = api.registry.list_namespaces(request(&headers, msg)).await?;
    Ok(Reply(r))
}

async fn status(
    State(mut api): State<Api>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Answer<pb::StatusResponse> {
    let mut msg = pb::StatusRequest::default();
    for (k, v) in pairs(query)? {
        match k.as_str() {
            "linearizable" => msg.linearizable = flag(&k, &v)?,
            _ => return Err(unknown(&k)),
        }
    }
    let r = api.cluster.status(request(&headers, msg)).await?;
    Ok(Reply(r))
}

/// A path no route serves: 404 saying what is served.
async fn not_served(uri: axum::http::Uri) -> Failure {
    Failure(Status::not_found(format!(
        "no route {}: this port serves Roster's API under /v1/services, /v1/namespaces, \
         /v1/watch, /v1/cluster and /v1/discovery (GET /v1/openapi.json), the console at /ui, \
         and a subset of Consul's under /v1/catalog, /v1/health, /v1/status and /v1/agent \
         (docs/api.md)",
        uri.path()
    )))
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

async fn console() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        CONSOLE,
    )
}

/// Every service's changes: what the console follows.
async fn watch_all(
    state: State<Api>,
    p: Option<Path<Params>>,
    headers: HeaderMap,
    query: RawQuery,
) -> std::result::Result<
    (
        HeaderMap,
        Sse<impl Stream<Item = std::result::Result<Event, Infallible>>>,
    ),
    Failure,
> {
    // Every service of the route's namespace.
    let every = Params {
        namespace: p.map(|Path(p)| p.namespace).unwrap_or_default(),
        ..Params::default()
    };
    watch(state, Path(every), headers, query).await
}

/// A service's watch as Server-Sent Events: each message of the gRPC stream
/// is one event, its `id` the message's revision, so a client that
/// reconnects with `Last-Event-ID` (browsers do it by themselves) resumes
/// after it, on this node or any other. `event: reset` carries a full state
/// (the initial one, or after compaction), `event: events` changes; an error
/// ends the stream with `event: error` and the JSON error.
async fn watch(
    State(mut api): State<Api>,
    Path(p): Path<Params>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> std::result::Result<
    (
        HeaderMap,
        Sse<impl Stream<Item = std::result::Result<Event, Infallible>>>,
    ),
    Failure,
> {
    let mut since = 0;
    for (k, v) in pairs(query)? {
        match k.as_str() {
            "since" => {
                since = v
                    .parse()
                    .map_err(|_| bad_request(format!("since={v:?}: not a revision")))?
            }
            _ => return Err(unknown(&k)),
        }
    }
    if let Some(v) = headers.get("last-event-id") {
        since = v
            .to_str()
            .ok()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad_request("Last-Event-ID: not a revision".into()))?;
    }
    let msg = pb::WatchRequest {
        service: p.service,
        since_revision: since,
        namespace: p.namespace,
    };
    let answer = api.registry.watch(request(&headers, msg)).await?;
    let contact = staleness(answer.metadata());
    let stream = answer.into_inner();
    let events = stream
        .map(|m| match m {
            Ok(m) => {
                let kind = match m.reset {
                    r if r == pb::ResetReason::Unspecified as i32 => "events",
                    _ => "reset",
                };
                let data = serde_json::to_string(&m).unwrap_or_default();
                (
                    Event::default()
                        .id(m.revision.to_string())
                        .event(kind)
                        .data(data),
                    false,
                )
            }
            Err(s) => (
                Event::default()
                    .event("error")
                    .data(error_json(&s).to_string()),
                true,
            ),
        })
        // Up to and including the first error.
        .scan(false, |ended, (event, error)| {
            let item = (!*ended).then_some(Ok(event));
            *ended |= error;
            futures::future::ready(item)
        });
    Ok((contact, Sse::new(events).keep_alive(KeepAlive::default())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_fitting_statuses_and_their_names() {
        for (code, status, name) in [
            (Code::InvalidArgument, 400, "INVALID_ARGUMENT"),
            (Code::OutOfRange, 400, "OUT_OF_RANGE"),
            (Code::Unauthenticated, 401, "UNAUTHENTICATED"),
            (Code::PermissionDenied, 403, "PERMISSION_DENIED"),
            (Code::NotFound, 404, "NOT_FOUND"),
            (Code::ResourceExhausted, 429, "RESOURCE_EXHAUSTED"),
            (Code::Unavailable, 503, "UNAVAILABLE"),
            (Code::DeadlineExceeded, 504, "DEADLINE_EXCEEDED"),
        ] {
            assert_eq!(http_status(code).as_u16(), status, "{code:?}");
            let body = error_json(&Status::new(code, "why"));
            assert_eq!(body["code"], name);
            assert_eq!(body["message"], "why");
        }
    }

    /// The answer spliced from a rendered instance array is the one pbjson
    /// writes for the whole message, byte for byte.
    #[test]
    fn a_service_answer_spliced_from_kept_instances_is_pbjson_s() {
        let one = pb::Instance {
            service: "web".into(),
            id: "web-1".into(),
            address: "10.0.0.1".into(),
            port: 80,
            tags: vec!["v1".into()],
            metadata: [("zone".to_string(), "a\"b".to_string())].into(),
            ..Default::default()
        };
        for (revision, instances, protection_active, service_revision) in [
            (0, vec![], false, 0),
            (7, vec![], false, 0),
            (7, vec![one.clone()], false, 5),
            (9, vec![one.clone(), one], true, 9),
        ] {
            let whole = pb::GetServiceResponse {
                revision,
                instances,
                protection_active,
                service_revision,
                unchanged: false,
            };
            let rendered = serde_json::to_vec(&whole.instances).expect("JSON");
            let spliced = service_json(&whole, &rendered);
            let expected = serde_json::to_vec(&whole).expect("JSON");
            assert_eq!(
                String::from_utf8_lossy(&spliced),
                String::from_utf8_lossy(&expected)
            );
        }
    }
}
