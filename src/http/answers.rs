//! Rendered answers to service reads, kept per question and reused while
//! the service has not changed.
//!
//! A read still makes its gRPC call, which checks the token, the namespace
//! and the consistency as for any caller, but it carries the service
//! revision of the answer held (`unchanged_since`): when the node says
//! nothing changed, the call carries no instances and the body held is
//! sent as it is. Without this a 100-instance read was encoded three
//! times (protobuf both ways, then JSON) and spent most of its time there.

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;
use tonic::Status;

use super::Grpc;
use crate::proto::v1 as pb;
use crate::proto::v1::registry_client::RegistryClient;

/// At most this many answers, and this many bytes of them, are held;
/// past either, every one is dropped and the reads that follow render
/// again.
const MAX_ANSWERS: usize = 4096;
const MAX_BYTES: usize = 64 << 20;

/// A read of a service, as far as its answer depends on it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub(super) struct Question {
    /// Which rendering (each route has its own).
    pub route: &'static str,
    pub namespace: String,
    pub service: String,
    pub healthy: bool,
    pub tags: Vec<String>,
}

/// An answer rendered from a service's instances.
#[derive(Clone)]
pub(super) struct Rendered {
    pub body: Bytes,
    /// The newest `mod_revision` among the instances rendered.
    pub newest: u64,
}

/// A rendered answer and the service revision it shows.
#[derive(Clone)]
struct Kept {
    service_revision: u64,
    rendered: Rendered,
}

#[derive(Default)]
pub(super) struct Answers(Mutex<Held>);

#[derive(Default)]
struct Held {
    answers: HashMap<Question, Kept>,
    bytes: usize,
}

impl Answers {
    /// Asks `registry` for `req` and renders its instances with `render`,
    /// or reuses the answer held for `question` if the service has not
    /// changed since. The response comes back without its instances.
    pub async fn read(
        &self,
        registry: &mut RegistryClient<Grpc>,
        question: Question,
        mut req: tonic::Request<pb::GetServiceRequest>,
        render: impl FnOnce(&[pb::Instance]) -> serde_json::Result<Vec<u8>>,
    ) -> Result<(tonic::Response<pb::GetServiceResponse>, Rendered), Status> {
        let held = self.held(&question);
        if let Some(k) = &held {
            req.get_mut().unchanged_since = k.service_revision;
        }
        let mut r = registry.get_service(req).await?;
        let a = r.get_mut();
        let rendered = match (a.unchanged, held) {
            (true, Some(k)) => k.rendered,
            (true, None) => {
                return Err(Status::internal(
                    "a read answered `unchanged` to a question it was not asked",
                ))
            }
            (false, _) => {
                let rendered = Rendered {
                    body: render(&a.instances)
                        .map_err(|e| Status::internal(format!("encoding the answer: {e}")))?
                        .into(),
                    newest: a
                        .instances
                        .iter()
                        .map(|i| i.mod_revision)
                        .max()
                        .unwrap_or(0),
                };
                a.instances = Vec::new();
                self.keep(question, a.service_revision, rendered.clone());
                rendered
            }
        };
        Ok((r, rendered))
    }

    fn held(&self, q: &Question) -> Option<Kept> {
        let held = self.0.lock().unwrap_or_else(|p| p.into_inner());
        held.answers.get(q).cloned()
    }

    fn keep(&self, q: Question, service_revision: u64, rendered: Rendered) {
        let size = rendered.body.len();
        // A service with no change on record says 0: nothing to vouch for.
        // One answer may not take more than a quarter of the room.
        if service_revision == 0 || size > MAX_BYTES / 4 {
            return;
        }
        let mut held = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if held.answers.len() >= MAX_ANSWERS || held.bytes + size > MAX_BYTES {
            held.answers.clear();
            held.bytes = 0;
        }
        let kept = Kept {
            service_revision,
            rendered,
        };
        match held.answers.insert(q, kept) {
            Some(old) => held.bytes = held.bytes + size - old.rendered.body.len(),
            None => held.bytes += size,
        }
    }
}
