//! Prometheus HTTP service discovery (`http_sd_configs`): each instance is a
//! target group of its own, labelled with its namespace, service, id, tags,
//! health and metadata, so a scrape config can relabel on any of them.
//! Every instance is listed with its health as a label (as Consul's SD
//! does); `?healthy=true` keeps the passing ones only.

use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::Json;
use serde_json::{Map, Value};
use tonic::Code;

use super::{consistency, flag, pairs, request, unknown, Api, Failure, Params};
use crate::proto::v1 as pb;

/// `GET /v1/discovery/prometheus[?service=..][&tag=..][&healthy=true]`:
/// `service` and `tag` may repeat (any of the services; all of the tags).
pub(super) async fn targets(
    State(mut api): State<Api>,
    p: Option<Path<Params>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> std::result::Result<Json<Vec<Value>>, Failure> {
    let namespace = p.map(|Path(p)| p.namespace).unwrap_or_default();
    let (mut services, mut tags, mut healthy) = (Vec::new(), Vec::new(), false);
    // Discovery reads this node's copy unless told otherwise: Prometheus
    // asks again at every refresh.
    let mut read = pb::Consistency::Stale;
    for (k, v) in pairs(query)? {
        match k.as_str() {
            "service" => services.push(v),
            "tag" => tags.push(v),
            "healthy" => healthy = flag(&k, &v)?,
            "consistency" => read = consistency(&v)?,
            _ => return Err(unknown(&k)),
        }
    }
    if services.is_empty() {
        let listed = pb::ListServicesRequest {
            namespace: namespace.clone(),
            consistency: read as i32,
            ..Default::default()
        };
        let r = api
            .registry
            .list_services(request(&headers, listed))
            .await?;
        services = r
            .into_inner()
            .services
            .into_iter()
            .map(|s| s.name)
            .collect();
    }
    let mut groups = Vec::new();
    for service in services {
        let get = pb::GetServiceRequest {
            service,
            namespace: namespace.clone(),
            healthy_only: healthy,
            tags: tags.clone(),
            consistency: read as i32,
            ..Default::default()
        };
        match api.registry.get_service(request(&headers, get)).await {
            Ok(r) => groups.extend(r.into_inner().instances.iter().map(group)),
            // Listed, then gone before its read: nothing to scrape.
            Err(s) if s.code() == Code::NotFound => {}
            Err(s) => return Err(s.into()),
        }
    }
    Ok(Json(groups))
}

/// One instance as a target group: `address:port` and its labels.
fn group(i: &pb::Instance) -> Value {
    let host = if i.address.contains(':') {
        format!("[{}]", i.address)
    } else {
        i.address.clone()
    };
    let mut labels = Map::new();
    let mut label = |name: &str, value: &str| {
        labels.insert(format!("__meta_roster_{name}"), Value::from(value));
    };
    let namespace = if i.namespace.is_empty() {
        "default"
    } else {
        &i.namespace
    };
    label("namespace", namespace);
    label("service", &i.service);
    label("instance_id", &i.id);
    label("tags", &format!(",{},", i.tags.join(",")));
    label("health", pb::HealthStatus::word(i.status));
    label("weight", &i.weight.to_string());
    if !i.maintenance.is_empty() {
        label("maintenance_reason", &i.maintenance);
    }
    for (k, v) in &i.metadata {
        label(&format!("metadata_{}", label_name(k)), v);
    }
    serde_json::json!({
        "targets": [format!("{host}:{}", i.port)],
        "labels": labels,
    })
}

/// A metadata key as a label name: what Prometheus does not allow in one
/// (`[a-zA-Z_][a-zA-Z0-9_]*`) becomes `_`.
fn label_name(key: &str) -> String {
    key.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_is_a_group_with_its_labels() {
        let mut i = pb::Instance {
            service: "web".into(),
            id: "web-1".into(),
            address: "::1".into(),
            port: 8080,
            tags: vec!["v1".into(), "eu".into()],
            weight: 3,
            status: pb::HealthStatus::Maintenance as i32,
            maintenance: "drain".into(),
            ..Default::default()
        };
        i.metadata.insert("roster.session".into(), "s".into());
        let g = group(&i);
        assert_eq!(g["targets"], serde_json::json!(["[::1]:8080"]));
        let l = &g["labels"];
        assert_eq!(l["__meta_roster_namespace"], "default");
        assert_eq!(l["__meta_roster_tags"], ",v1,eu,");
        assert_eq!(l["__meta_roster_health"], "maintenance");
        assert_eq!(l["__meta_roster_maintenance_reason"], "drain");
        assert_eq!(l["__meta_roster_metadata_roster_session"], "s");
    }
}
