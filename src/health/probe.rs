//! One probe of one instance: TCP connect, HTTP GET, or the gRPC health protocol.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::registry::model::CheckKind;

pub enum Prober {
    Tcp(String),
    Http {
        client: reqwest::Client,
        url: String,
    },
    Grpc {
        client: HealthClient<Channel>,
        service: String,
    },
}

/// `host:port`, with brackets around an IPv6 address.
fn authority(address: &str, port: u16) -> String {
    if address.contains(':') {
        format!("[{address}]:{port}")
    } else {
        format!("{address}:{port}")
    }
}

impl Prober {
    /// `None` for TTL checks, which have nothing to probe.
    pub fn new(
        address: &str,
        kind: &CheckKind,
        timeout: Duration,
    ) -> Result<Option<Prober>, String> {
        Ok(Some(match kind {
            CheckKind::Ttl { .. } => return Ok(None),
            CheckKind::Tcp { port } => Prober::Tcp(authority(address, *port)),
            CheckKind::Http { port, path } => Prober::Http {
                client: reqwest::Client::builder()
                    .timeout(timeout)
                    .pool_max_idle_per_host(1)
                    .build()
                    .map_err(|e| e.to_string())?,
                url: format!("http://{}{path}", authority(address, *port)),
            },
            CheckKind::Grpc { port, service } => {
                let channel =
                    Endpoint::from_shared(format!("http://{}", authority(address, *port)))
                        .map_err(|e| e.to_string())?
                        .connect_timeout(timeout)
                        .timeout(timeout)
                        .connect_lazy();
                Prober::Grpc {
                    client: HealthClient::new(channel),
                    service: service.clone(),
                }
            }
        }))
    }

    /// `Ok` with a short description when healthy, `Err` saying why not.
    pub async fn probe(&mut self) -> Result<String, String> {
        match self {
            Prober::Tcp(addr) => tokio::net::TcpStream::connect(addr.as_str())
                .await
                .map(|_| format!("TCP connect to {addr}: ok"))
                .map_err(|e| format!("TCP connect to {addr}: {e}")),
            Prober::Http { client, url } => match client.get(url.as_str()).send().await {
                Ok(r) if r.status().is_success() => Ok(format!("GET {url}: {}", r.status())),
                Ok(r) => Err(format!("GET {url}: {}", r.status())),
                Err(e) => Err(format!("GET {url}: {e}")),
            },
            Prober::Grpc { client, service } => {
                let req = HealthCheckRequest {
                    service: service.clone(),
                };
                match client.check(req).await {
                    Ok(r) => {
                        let status = r.into_inner().status;
                        if status == ServingStatus::Serving as i32 {
                            Ok(format!("gRPC health {service:?}: SERVING"))
                        } else {
                            Err(format!(
                                "gRPC health {service:?}: {}",
                                ServingStatus::try_from(status)
                                    .map_or("unknown", |s| s.as_str_name())
                            ))
                        }
                    }
                    Err(e) => Err(format!("gRPC health {service:?}: {}", e.message())),
                }
            }
        }
    }
}
