//! Readiness as the gRPC health service reports it.

use std::time::Duration;

use crate::api::cluster::ClusterApi;
use crate::api::registry::RegistryApi;
use crate::proto::v1::cluster_server::ClusterServer;
use crate::proto::v1::registry_server::RegistryServer;
use crate::raft::liveness::election::Contact;
use crate::raft::liveness::leadership;
use crate::raft::{NodeId, Raft};

/// The gRPC health service answers per service: `roster.v1.Registry` and
/// `roster.v1.Cluster` are SERVING only while this node can serve their
/// linearizable requests (readiness); the overall status `""` stays SERVING
/// while the process runs (liveness).
pub(super) async fn report_readiness(
    raft: Raft,
    id: NodeId,
    lease: Duration,
    poll: Duration,
    contact: Contact,
    reporter: tonic_health::server::HealthReporter,
) {
    use tonic_health::ServingStatus;
    let services = [
        <RegistryServer<RegistryApi> as tonic::server::NamedService>::NAME,
        <ClusterServer<ClusterApi> as tonic::server::NamedService>::NAME,
    ];
    let mut last = None;
    let mut metrics = std::pin::pin!(crate::raft::metrics_every(&raft, poll));
    while let Some(m) = futures::StreamExt::next(&mut metrics).await {
        let ready = leadership::can_serve(&m, id, lease, &contact);
        if last != Some(ready) {
            last = Some(ready);
            let status = if ready {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            for s in services {
                reporter.set_service_status(s, status).await;
            }
        }
    }
    for s in services {
        reporter
            .set_service_status(s, ServingStatus::NotServing)
            .await;
    }
}
