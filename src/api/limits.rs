//! The `[limits]` of the public API: request size, instance counts, health
//! checks and watch streams. Each refusal is `RESOURCE_EXHAUSTED` naming the
//! limit's config key; nothing else on the node is affected.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::Status;
use tower::Service;

use super::body::{observed, Observer};
use crate::config::Limits;
use crate::error::Error;
use crate::registry::namespace::Quota;
use crate::registry::{Catalog, Instance, Outcome};

pub(crate) fn exhausted(what: String, key: &str, limit: usize, remedy: &str) -> Error {
    Error::ResourceExhausted(format!(
        "{what}: the limit limits.{key} is {limit}; {remedy}"
    ))
}

/// Instances and checks that registrations in flight may still add, beyond
/// what the catalogue holds.
#[derive(Clone, Copy, Debug, Default)]
struct InFlight {
    of_service: usize,
    total: usize,
    checks: usize,
}

/// Refuses the registration of `i` if, with what is in flight, it would pass
/// an instance or health check limit. Replacing an instance never adds one;
/// it adds a check only if the stored instance had none.
fn refusal(limits: &Limits, catalog: &Catalog, i: &Instance, more: InFlight) -> Result<(), Error> {
    let stored = catalog.get(&i.service, &i.id);
    if stored.is_none() {
        let held = catalog.instance_count_of(&i.service) + more.of_service;
        if held >= limits.max_instances_per_service {
            return Err(exhausted(
                format!("service {:?} has {held} instances", i.service),
                "max_instances_per_service",
                limits.max_instances_per_service,
                "deregister instances of this service, or raise the limit on every node",
            ));
        }
        let held = catalog.instance_count() + more.total;
        if held >= limits.max_instances {
            return Err(exhausted(
                format!("the registry has {held} instances"),
                "max_instances",
                limits.max_instances,
                "deregister instances, or raise the limit on every node",
            ));
        }
    }
    let adds_check = i.check.is_some() && stored.is_none_or(|s| s.check.is_none());
    let held = catalog.checked_count() + more.checks;
    if adds_check && held >= limits.max_health_checks {
        return Err(exhausted(
            format!("the registry has {held} instances with a health check"),
            "max_health_checks",
            limits.max_health_checks,
            "register without a check, deregister checked instances, or raise the limit on every node",
        ));
    }
    Ok(())
}

/// The leader's admission of registrations against the instance and health
/// check limits. A registration admitted here counts until it is answered, so
/// that registrations in flight together cannot pass a limit; once applied it
/// is in the catalogue and counted there only.
pub struct Admission {
    limits: Limits,
    pending: Mutex<Pending>,
}

#[derive(Default)]
struct Pending {
    next: u64,
    admitted: HashMap<u64, Admitted>,
    per_service: HashMap<String, usize>,
    checks: usize,
}

struct Admitted {
    service: String,
    id: String,
    checked: bool,
}

/// An admitted registration; dropped when its proposal is answered (or abandoned).
pub struct Ticket<'a> {
    admission: &'a Admission,
    number: u64,
}

impl Admission {
    pub fn new(limits: Limits) -> Self {
        Admission {
            limits,
            pending: Mutex::default(),
        }
    }

    /// Admits `i` against `catalog` (applied on this node, the leader) and the
    /// registrations in flight. Far from the limits this costs a few lookups;
    /// close to one, a pass over the registrations in flight tells those that
    /// add an instance or check from those that replace one.
    pub fn admit(&self, catalog: &Catalog, i: &Instance) -> Result<Ticket<'_>, Error> {
        let mut p = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        let at_most = InFlight {
            of_service: p.per_service.get(&i.service).copied().unwrap_or(0),
            total: p.admitted.len(),
            checks: p.checks,
        };
        if refusal(&self.limits, catalog, i, at_most).is_err() {
            refusal(&self.limits, catalog, i, p.growth(catalog, i))?;
        }
        let number = p.next;
        p.next += 1;
        *p.per_service.entry(i.service.clone()).or_default() += 1;
        p.checks += usize::from(i.check.is_some());
        p.admitted.insert(
            number,
            Admitted {
                service: i.service.clone(),
                id: i.id.clone(),
                checked: i.check.is_some(),
            },
        );
        Ok(Ticket {
            admission: self,
            number,
        })
    }
}

impl Pending {
    /// What the registrations in flight, other than those of `i` itself, add
    /// to the catalogue: distinct new instances and new checks.
    fn growth(&self, catalog: &Catalog, i: &Instance) -> InFlight {
        let mut new = HashSet::new();
        let mut checks = HashSet::new();
        for a in self.admitted.values() {
            if a.service == i.service && a.id == i.id {
                continue;
            }
            let stored = catalog.get(&a.service, &a.id);
            if stored.is_none() {
                new.insert((&a.service, &a.id));
            }
            if a.checked && stored.is_none_or(|s| s.check.is_none()) {
                checks.insert((&a.service, &a.id));
            }
        }
        InFlight {
            of_service: new.iter().filter(|(s, _)| **s == i.service).count(),
            total: new.len(),
            checks: checks.len(),
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let mut p = self
            .admission
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(a) = p.admitted.remove(&self.number) else {
            return;
        };
        p.checks -= usize::from(a.checked);
        if let Some(n) = p.per_service.get_mut(&a.service) {
            *n -= 1;
            if *n == 0 {
                p.per_service.remove(&a.service);
            }
        }
    }
}

/// Open watch streams, on this node and per client connection.
pub struct WatchSlots {
    max: usize,
    max_per_connection: usize,
    open: Mutex<Open>,
}

#[derive(Default)]
struct Open {
    total: usize,
    /// Streams per connection, by the client's address and port; a
    /// connection with none has no entry.
    per_connection: HashMap<SocketAddr, usize>,
    /// Streams following a namespace other than `default`, by namespace.
    per_namespace: HashMap<String, usize>,
}

/// One open watch stream; its place is freed when it is dropped (the stream
/// ended, the client cancelled or disconnected, the node closed it).
pub struct WatchSlot {
    slots: Arc<WatchSlots>,
    connection: Option<SocketAddr>,
}

impl WatchSlots {
    pub fn new(limits: &Limits) -> Arc<Self> {
        Arc::new(WatchSlots {
            max: limits.max_watch_streams,
            max_per_connection: limits.max_watch_streams_per_connection,
            open: Mutex::default(),
        })
    }

    /// A place for one more stream from `connection` (unknown for in-process
    /// calls, which count only towards the node's total).
    pub fn acquire(self: &Arc<Self>, connection: Option<SocketAddr>) -> Result<WatchSlot, Error> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if open.total >= self.max {
            return Err(exhausted(
                format!("this node serves {} watch streams", open.total),
                "max_watch_streams",
                self.max,
                "watch on another node, close unused watches, or raise the limit",
            ));
        }
        if let Some(c) = connection {
            let on_conn = open.per_connection.get(&c).copied().unwrap_or(0);
            if on_conn >= self.max_per_connection {
                return Err(exhausted(
                    format!("this connection carries {on_conn} watch streams"),
                    "max_watch_streams_per_connection",
                    self.max_per_connection,
                    "close unused watches (one per service suffices), or raise the limit",
                ));
            }
            open.per_connection.insert(c, on_conn + 1);
        }
        open.total += 1;
        Ok(WatchSlot {
            slots: self.clone(),
            connection,
        })
    }
}

/// A stream's place in a namespace's `max_watch_streams` quota, freed when
/// it is dropped.
pub struct NamespaceSlot {
    slots: Arc<WatchSlots>,
    namespace: String,
}

impl WatchSlots {
    /// A place for one more stream in namespace `ns`, whose quota is `limit`
    /// streams on this node (0: none).
    pub fn enter(self: &Arc<Self>, ns: &str, limit: u64) -> Result<NamespaceSlot, Error> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let n = open.per_namespace.entry(ns.to_string()).or_default();
        if limit > 0 && *n as u64 >= limit {
            return Err(Outcome::QuotaExceeded {
                namespace: ns.to_string(),
                quota: Quota::WatchStreams,
                limit,
            }
            .into_error());
        }
        *n += 1;
        Ok(NamespaceSlot {
            slots: self.clone(),
            namespace: ns.to_string(),
        })
    }
}

impl Drop for NamespaceSlot {
    fn drop(&mut self) {
        let mut open = self
            .slots
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = open.per_namespace.get_mut(&self.namespace) {
            *n -= 1;
            if *n == 0 {
                open.per_namespace.remove(&self.namespace);
            }
        }
    }
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut open = self
            .slots
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        open.total -= 1;
        if let Some(c) = self.connection {
            if let Some(n) = open.per_connection.get_mut(&c) {
                *n -= 1;
                if *n == 0 {
                    open.per_connection.remove(&c);
                }
            }
        }
    }
}

/// Wraps a public gRPC service so that a request message over
/// `limits.max_request_bytes` is refused as soon as its length prefix
/// arrives, before its bytes are buffered. (tonic's own cap answers
/// OUT_OF_RANGE and names no setting; it stays at the transport's cap.)
#[derive(Clone)]
pub struct RequestLimit<S> {
    inner: S,
    max: usize,
}

impl<S> RequestLimit<S> {
    pub fn new(inner: S, max: usize) -> Self {
        RequestLimit { inner, max }
    }
}

impl<S: NamedService> NamedService for RequestLimit<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for RequestLimit<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
{
    type Response = S::Response;
    type Error = Infallible;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let max = self.max;
        self.inner
            .call(req.map(|body| observed(body, Framing::new(max))))
    }
}

/// Follows the gRPC framing of a request body (each message: a flag byte, a
/// big-endian u32 length, the message) and checks every length.
struct Framing {
    max: usize,
    header: [u8; 5],
    /// Bytes of the current header received.
    have: usize,
    /// Bytes of the current message still to come.
    skip: usize,
}

impl Framing {
    fn new(max: usize) -> Self {
        Framing {
            max,
            header: [0; 5],
            have: 0,
            skip: 0,
        }
    }

    /// Takes the next bytes of the body; a message over the limit is an error.
    fn feed(&mut self, mut data: &[u8]) -> Result<(), Error> {
        while !data.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = &data[n..];
                continue;
            }
            let n = (self.header.len() - self.have).min(data.len());
            self.header[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have == self.header.len() {
                self.have = 0;
                let mut len = &self.header[1..];
                let len = usize::try_from(len.get_u32()).unwrap_or(usize::MAX);
                if len > self.max {
                    return Err(exhausted(
                        format!("the request message is {len} bytes"),
                        "max_request_bytes",
                        self.max,
                        "send a smaller request (valid registrations are far smaller), or raise the limit",
                    ));
                }
                self.skip = len;
            }
        }
        Ok(())
    }
}

impl Observer for Framing {
    fn data(&mut self, data: &Bytes) -> Result<(), Status> {
        self.feed(data).map_err(Status::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(len: usize) -> Vec<u8> {
        let mut m = vec![0];
        m.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
        m.extend(std::iter::repeat_n(7, len));
        m
    }

    #[test]
    fn framing_checks_every_message_however_the_body_is_split() {
        let mut body = message(10);
        body.extend(message(0));
        body.extend(message(10));
        for chunk in [1, 2, 4, 5, 6, body.len()] {
            let mut f = Framing::new(10);
            assert!(
                body.chunks(chunk).all(|c| f.feed(c).is_ok()),
                "chunks of {chunk}"
            );
        }
        let mut over = message(10);
        over.extend(message(11));
        let mut f = Framing::new(10);
        let refused = over.chunks(3).map(|c| f.feed(c)).find_map(Result::err);
        let e = refused.expect("refused");
        assert!(matches!(e, Error::ResourceExhausted(_)), "{e}");
        assert!(
            e.to_string().contains("limits.max_request_bytes is 10"),
            "{e}"
        );
        // Refused from the header alone, before the message's bytes come.
        assert!(Framing::new(10).feed(&message(1 << 20)[..5]).is_err());
    }

    /// The defaults leave room: the largest valid registration is a fraction of
    /// `max_request_bytes`, and a full service of typical instances fits in
    /// one message (a GetService answer, a watch's full state) with room to
    /// spare. A service of the largest instances reaches the message cap much
    /// sooner; docs/operations.md ("Limits") tells operators of such fleets to lower the limit.
    #[test]
    fn the_largest_valid_registration_fits_the_defaults() {
        use crate::api::convert;
        use crate::proto::v1 as pb;
        use crate::registry::validate::*;
        use prost::Message;
        let per_key = MAX_METADATA_BYTES / MAX_METADATA_KEYS;
        let instance = pb::Instance {
            service: "s".repeat(MAX_NAME_LEN),
            id: "i".repeat(MAX_ID_LEN),
            address: format!(
                "{}.{}.{}.example",
                "a".repeat(63),
                "b".repeat(63),
                "c".repeat(63)
            ),
            port: 65_535,
            tags: (0..MAX_TAGS)
                .map(|t| format!("{t:0>MAX_TAG_LEN$}"))
                .collect(),
            metadata: (0..MAX_METADATA_KEYS)
                .map(|k| (format!("{k:0>2}"), "v".repeat(per_key - 2)))
                .collect(),
            weight: MAX_WEIGHT,
            check: Some(pb::HealthCheck {
                kind: Some(pb::health_check::Kind::Http(pb::HttpCheck {
                    port: 65_535,
                    path: format!("/{}", "p".repeat(1023)),
                })),
                ..Default::default()
            }),
            ..Default::default()
        };
        let req = pb::RegisterRequest {
            instance: Some(instance.clone()),
            ..Default::default()
        };
        assert!(
            convert::register_command(req.clone(), None).is_ok(),
            "valid"
        );
        let d = Limits::default();
        assert!(
            req.encoded_len() * 4 < d.max_request_bytes,
            "{}",
            req.encoded_len()
        );
        let typical = pb::Instance {
            service: "payments-api".into(),
            id: "payments-api-7f9c6d5b8-x2x4q".into(),
            address: "10.12.34.56".into(),
            port: 8080,
            tags: vec!["v2".into(), "canary".into(), "zone-a".into()],
            metadata: (0..4)
                .map(|k| (format!("key-{k}"), format!("value-{k:0>12}")))
                .collect(),
            weight: 100,
            check: Some(pb::HealthCheck {
                kind: Some(pb::health_check::Kind::Http(pb::HttpCheck {
                    port: 8080,
                    path: "/healthz".into(),
                })),
                ..Default::default()
            }),
            create_revision: u64::MAX,
            mod_revision: u64::MAX,
            status_since_ms: u64::MAX,
            check_output: "HTTP 200 OK".into(),
            ..Default::default()
        };
        let full_service = typical.encoded_len() * d.max_instances_per_service;
        assert!(
            full_service < crate::grpc::MAX_MESSAGE_BYTES / 2,
            "{full_service}"
        );
    }

    #[test]
    fn watch_slots_count_per_node_and_per_connection_until_dropped() {
        let limits = Limits {
            max_watch_streams: 3,
            max_watch_streams_per_connection: 2,
            ..Limits::default()
        };
        let slots = WatchSlots::new(&limits);
        let (a, b) = (
            Some("10.0.0.1:1000".parse().expect("addr")),
            Some("10.0.0.1:1001".parse().expect("addr")),
        );
        let a1 = slots.acquire(a).expect("a1");
        let _a2 = slots.acquire(a).expect("a2");
        let e = slots.acquire(a).err().expect("a full");
        assert!(
            e.to_string().contains("max_watch_streams_per_connection"),
            "{e}"
        );
        let _b1 = slots.acquire(b).expect("b1");
        let e = slots.acquire(None).err().expect("node full");
        assert!(
            e.to_string().contains("limits.max_watch_streams is 3"),
            "{e}"
        );
        drop(a1);
        let _a3 = slots.acquire(a).expect("a's freed place");
        assert!(slots.acquire(b).is_err());
    }

    #[test]
    fn registration_limits_spare_updates() {
        let limits = Limits {
            max_instances_per_service: 2,
            max_instances: 3,
            max_health_checks: 1,
            ..Limits::default()
        };
        let inst = |service: &str, id: &str, checked: bool| match checked {
            true => Instance::example_ttl(service, id),
            false => Instance::example(service, id),
        };
        let c = Catalog::from_parts(
            1,
            [
                inst("a", "1", true),
                inst("a", "2", false),
                inst("b", "1", false),
            ],
            [],
        );
        let admission = Admission::new(limits.clone());
        let refused = |i: Instance| match admission.admit(&c, &i) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        };
        assert!(refused(inst("a", "3", false)).contains("max_instances_per_service"));
        assert!(refused(inst("c", "1", false)).contains("limits.max_instances is 3"));
        assert!(refused(inst("b", "1", true)).contains("max_health_checks"));
        assert_eq!(refused(inst("a", "1", true)), "");
        assert_eq!(refused(inst("a", "2", false)), "");
        assert_eq!(refused(inst("b", "1", false)), "");

        // Registrations in flight count until answered, each instance once;
        // one that replaces a stored instance adds nothing.
        let admission = Admission::new(Limits {
            max_instances: 4,
            ..limits
        });
        let refused = |c: &Catalog, i: Instance| match admission.admit(c, &i) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        };
        let update = admission.admit(&c, &inst("a", "2", false)).expect("update");
        let new = admission.admit(&c, &inst("c", "1", false));
        let new = new.expect("the last place");
        let again = admission.admit(&c, &inst("c", "1", false));
        let again = again.expect("the same instance again");
        assert!(refused(&c, inst("c", "2", false)).contains("limits.max_instances is 4"));
        drop(new);
        assert!(refused(&c, inst("c", "2", false)).contains("max_instances"));
        drop(again);
        assert_eq!(refused(&c, inst("c", "2", false)), "");
        drop(update);
        let unchecked = Catalog::from_parts(1, [inst("a", "1", false)], []);
        let first = admission.admit(&unchecked, &inst("a", "1", true));
        let first = first.expect("adds the first check");
        assert!(refused(&unchecked, inst("b", "1", true)).contains("max_health_checks"));
        drop(first);
        assert_eq!(refused(&unchecked, inst("b", "1", true)), "");
    }
}
