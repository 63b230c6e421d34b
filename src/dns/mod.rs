//! DNS: the catalogue answered as names, for anything that can resolve one.
//!
//! Under the zone `<domain>` (`roster.` by default):
//! - `<service>.service.<domain>`: A / AAAA of the passing instances (the
//!   service's protection threshold applies, as in GetService), SRV with
//!   port, weight and a target that resolves;
//! - `<tag>.<service>.service.<domain>`: the same, only instances with the tag;
//! - `<id>.<service>.instance.<domain>`: one instance, whatever its health.
//!
//! Answers come from this node's catalogue (a stale read, like GetService
//! without `linearizable`): every node answers, the leader is never asked.
//! Unknown names get NXDOMAIN; a known service with no passing instance gets
//! an empty answer (NOERROR). Over UDP an answer larger than the client's
//! buffer is cut and marked truncated (hickory-server does it), and the
//! client asks again over TCP.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Edns, Header, HeaderCounts, Metadata, OpCode, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA, SOA, SRV};
use hickory_server::proto::rr::{DNSClass, LowerName, Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use hickory_server::Server;
use tokio::net::{TcpListener, UdpSocket};

use crate::error::{Error, Result};
use crate::registry::acl::SecretHash;
use crate::registry::namespace;
use crate::registry::watch::{RegistryState, SharedState};
use crate::registry::Instance;

/// How long a TCP connection may stay idle between queries.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Responses queued per TCP connection.
const TCP_RESPONSE_BUFFER: usize = 32;

/// What the DNS front-end answers for.
#[derive(Clone, Debug)]
pub struct Zone {
    /// The zone's apex, fully qualified (`roster.`).
    pub domain: Name,
    /// TTL of every record: how long a resolver may keep an answer.
    pub ttl: u32,
    /// With auth on: the hash of the token whose scope DNS answers for.
    /// Looked up at each query, so revoking the token stops the answers.
    pub token: Option<SecretHash>,
}

/// A running DNS server (UDP and TCP on one address).
pub struct DnsServer {
    pub addr: SocketAddr,
    server: Server<Handler>,
}

impl DnsServer {
    /// Binds UDP and TCP on `addr` and answers from `state`.
    pub async fn start(addr: SocketAddr, zone: Zone, state: SharedState) -> Result<Self> {
        let bind = |e: std::io::Error| Error::Unavailable(format!("bind DNS on {addr}: {e}"));
        let udp = UdpSocket::bind(addr).await.map_err(bind)?;
        // Port 0 picks the UDP port; TCP takes the same one.
        let addr = udp.local_addr().map_err(bind)?;
        let tcp = TcpListener::bind(addr).await.map_err(bind)?;
        let mut server = Server::new(Handler {
            apex: LowerName::new(&zone.domain),
            zone,
            state,
        });
        server.register_socket(udp);
        server.register_listener(tcp, TCP_IDLE, TCP_RESPONSE_BUFFER);
        Ok(DnsServer { addr, server })
    }

    pub async fn stop(mut self) {
        if let Err(e) = self.server.shutdown_gracefully().await {
            tracing::warn!("DNS server stopped with an error: {e}");
        }
    }
}

struct Handler {
    zone: Zone,
    apex: LowerName,
    state: SharedState,
}

/// A name under the zone, parsed.
#[derive(Debug, PartialEq)]
enum Query {
    /// The zone's apex itself.
    Apex,
    /// `service` is the catalogue key of the name's service and namespace
    /// (as asked: DNS ignores case, the catalogue does not).
    Service {
        service: String,
        tag: Option<String>,
    },
    Instance {
        service: String,
        id: String,
    },
    Unknown,
}

/// What a name resolves to: its records, or that it does not exist.
#[derive(Default)]
struct Answer {
    records: Vec<Record>,
    additionals: Vec<Record>,
    exists: bool,
    /// For a negative answer: the zone's SOA, whose minimum says how long
    /// to cache it (RFC 2308).
    soa: Vec<Record>,
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        // Clients that sent EDNS get their buffer size back; without it a UDP
        // answer is cut at 512 bytes.
        let edns = request.edns.as_ref().map(|q| {
            let mut e = Edns::new();
            e.set_max_payload(q.max_payload().max(512)).set_version(0);
            e
        });
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(e) = &edns {
            builder.edns(e);
        }
        let mut meta = Metadata::response_from_request(&request.metadata);
        let answer = match request.request_info() {
            Ok(info) if request.metadata.op_code == OpCode::Query => {
                let q = info.query;
                self.respond(q.name(), q.query_class(), q.query_type(), &mut meta)
            }
            _ => {
                meta.response_code = ResponseCode::FormErr;
                Answer::default()
            }
        };
        let sent = response
            .send_response(builder.build(
                meta,
                answer.records.iter(),
                [],
                answer.soa.iter(),
                answer.additionals.iter(),
            ))
            .await;
        sent.unwrap_or_else(|_| failed(request))
    }
}

impl Handler {
    /// The answer to a query, its response code set in `meta`.
    fn respond(
        &self,
        name: &LowerName,
        class: DNSClass,
        qtype: RecordType,
        meta: &mut Metadata,
    ) -> Answer {
        if class != DNSClass::IN || !self.apex.zone_of(name) {
            // Not ours: this is no recursive resolver.
            meta.response_code = ResponseCode::Refused;
            return Answer::default();
        }
        meta.authoritative = true;
        let Ok(st) = self.state.read() else {
            meta.response_code = ResponseCode::ServFail;
            return Answer::default();
        };
        match self.answer(&st, name, qtype) {
            Some(a) if !a.exists => {
                meta.response_code = ResponseCode::NXDomain;
                a
            }
            Some(a) => a,
            None => {
                meta.response_code = ResponseCode::Refused;
                Answer::default()
            }
        }
    }

    /// The answer to `name` of type `qtype`; `None` if the token DNS answers
    /// with does not exist (any more) or does not reach the service.
    fn answer(&self, st: &RegistryState, name: &LowerName, qtype: RecordType) -> Option<Answer> {
        let query = self.parse(name);
        if let Some(service) = match &query {
            Query::Service { service, .. } | Query::Instance { service, .. } => Some(service),
            _ => None,
        } {
            if let Some(hash) = &self.zone.token {
                let token = st.catalog.acl().find(hash)?;
                if !token.covers(service) {
                    return None;
                }
            }
        }
        let ttl = self.zone.ttl;
        let mut answer = Answer {
            exists: true,
            ..Answer::default()
        };
        match query {
            Query::Apex if qtype == RecordType::SOA => answer.records.push(self.soa(st)),
            Query::Apex => {}
            Query::Unknown => answer.exists = false,
            Query::Service { service, tag } => match find_service(st, &service) {
                None => answer.exists = false,
                Some(service) => {
                    // The tag as the catalogue spells it (DNS names ignore
                    // case), so that the view, protection threshold
                    // included, is GetService's with that tag.
                    let tags: Vec<String> = match &tag {
                        None => Vec::new(),
                        Some(t) => match find_tag(st, service, t) {
                            Some(t) => vec![t.to_string()],
                            None => return Some(self.negative(st, answer)),
                        },
                    };
                    let mut view = st.catalog.view(service, true, &tags).instances;
                    // Spread the load: resolvers tend to use the first address.
                    fastrand::shuffle(&mut view);
                    let owner = Name::from(name.clone());
                    for inst in view {
                        self.records_of(inst, &owner, qtype, ttl, &mut answer);
                    }
                }
            },
            Query::Instance { service, id } => {
                match find_service(st, &service).and_then(|s| find_instance(st, s, &id)) {
                    None => answer.exists = false,
                    Some(inst) => {
                        let owner = Name::from(name.clone());
                        self.records_of(inst, &owner, qtype, ttl, &mut answer);
                    }
                }
            }
        }
        Some(self.negative(st, answer))
    }

    /// `answer`, with the zone's SOA if it holds no record (RFC 2308).
    fn negative(&self, st: &RegistryState, mut answer: Answer) -> Answer {
        if answer.records.is_empty() {
            answer.soa.push(self.soa(st));
        }
        answer
    }

    /// The records `inst` contributes to an answer for `owner`: its address
    /// for A / AAAA, an SRV record (with the target's address as an
    /// additional record) for SRV.
    fn records_of(
        &self,
        inst: &Instance,
        owner: &Name,
        qtype: RecordType,
        ttl: u32,
        answer: &mut Answer,
    ) {
        let ip = IpAddr::from_str(&inst.address).ok();
        match qtype {
            RecordType::A | RecordType::AAAA => {
                if let Some(rdata) = ip.and_then(|ip| address_rdata(ip, qtype)) {
                    answer
                        .records
                        .push(Record::from_rdata(owner.clone(), ttl, rdata));
                }
            }
            RecordType::SRV => {
                // An instance at an IP is named under `instance.`, which
                // resolves to it; one at a host name points at that name.
                let target = match ip {
                    Some(_) => self.instance_name(inst),
                    None => Name::from_ascii(format!("{}.", inst.address)).ok(),
                };
                let Some(target) = target else { return };
                let weight = u16::try_from(inst.weight).unwrap_or(u16::MAX);
                let srv = SRV::new(1, weight, inst.port, target.clone());
                answer
                    .records
                    .push(Record::from_rdata(owner.clone(), ttl, RData::SRV(srv)));
                if let Some(ip) = ip {
                    let qtype = match ip {
                        IpAddr::V4(_) => RecordType::A,
                        IpAddr::V6(_) => RecordType::AAAA,
                    };
                    if let Some(rdata) = address_rdata(ip, qtype) {
                        answer
                            .additionals
                            .push(Record::from_rdata(target, ttl, rdata));
                    }
                }
            }
            _ => {}
        }
    }

    /// `<id>.<service>.instance[.<namespace>].<domain>`: an instance id may
    /// hold dots, which become labels of their own.
    fn instance_name(&self, inst: &Instance) -> Option<Name> {
        let relative = match namespace::split(&inst.service) {
            (namespace::DEFAULT, service) => format!("{}.{service}.instance", inst.id),
            (ns, service) => format!("{}.{service}.instance.{ns}", inst.id),
        };
        Name::from_ascii(relative)
            .ok()?
            .append_domain(&self.zone.domain)
            .ok()
    }

    /// Which kind of name `name` (inside the zone) is. Labels are read from
    /// the right: a tag or an instance id may hold dots.
    fn parse(&self, name: &LowerName) -> Query {
        let labels: Vec<String> = name
            .iter()
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect();
        let inner = labels.len() - self.apex.iter().len();
        let labels = &labels[..inner];
        // `<…>.service.<namespace>` names a namespace's service; without
        // the namespace, `default`'s (no namespace is named `service` or
        // `instance`).
        let (ns, labels) = match labels {
            [rest @ .., kind, ns]
                if (kind == "service" || kind == "instance")
                    && !rest.is_empty()
                    && ns != "service"
                    && ns != "instance" =>
            {
                (ns.as_str(), &labels[..labels.len() - 1])
            }
            _ => (namespace::DEFAULT, labels),
        };
        // A label holding a '/' would read as another namespace's key.
        if labels.iter().any(|l| l.contains('/')) {
            return Query::Unknown;
        }
        match labels {
            [] if ns == namespace::DEFAULT => Query::Apex,
            // RFC 2782, as Consul answers it: `_<service>._tcp.service`, or
            // `_<service>._<tag>.service`. SRV clients such as HAProxy ask
            // only names that start with an underscore.
            [srv, second, kind]
                if kind == "service"
                    && srv.len() > 1
                    && srv.starts_with('_')
                    && second.starts_with('_') =>
            {
                Query::Service {
                    service: namespace::qualify(ns, &srv[1..]),
                    tag: (second != "_tcp" && second.len() > 1).then(|| second[1..].to_string()),
                }
            }
            [rest @ .., service, kind] if kind == "service" => Query::Service {
                service: namespace::qualify(ns, service),
                tag: (!rest.is_empty()).then(|| rest.join(".")),
            },
            [id @ .., service, kind] if kind == "instance" && !id.is_empty() => Query::Instance {
                service: namespace::qualify(ns, service),
                id: id.join("."),
            },
            _ => Query::Unknown,
        }
    }

    /// The zone's SOA; its serial is the catalogue's revision (truncated to
    /// 32 bits, as the field is), its minimum the TTL of negative answers.
    fn soa(&self, st: &RegistryState) -> Record {
        let revision = st.catalog.revision();
        let domain = &self.zone.domain;
        let under = |label: &str| {
            Name::from_ascii(label)
                .and_then(|n| n.append_domain(domain))
                .unwrap_or_else(|_| domain.clone())
        };
        let soa = SOA::new(
            under("ns"),
            under("hostmaster"),
            revision as u32,
            3600,
            600,
            86400,
            self.zone.ttl,
        );
        Record::from_rdata(domain.clone(), self.zone.ttl, RData::SOA(soa))
    }
}

fn address_rdata(ip: IpAddr, qtype: RecordType) -> Option<RData> {
    match (ip, qtype) {
        (IpAddr::V4(v4), RecordType::A) => Some(RData::A(A(v4))),
        (IpAddr::V6(v6), RecordType::AAAA) => Some(RData::AAAA(AAAA(v6))),
        _ => None,
    }
}

/// The service `name` (lowercase, as DNS compares names) denotes: its exact
/// name, else one that differs only in case. `None` if there is no such
/// service with instances or a configuration.
fn find_service<'a>(st: &'a RegistryState, key: &str) -> Option<&'a str> {
    // The key holds the namespace: comparing whole keys keeps to it.
    st.catalog.service_name(key).or_else(|| {
        st.catalog
            .service_names()
            .find(|s| s.eq_ignore_ascii_case(key))
    })
}

/// The spelling of tag `tag` (lowercase) on one of `service`'s instances.
fn find_tag<'a>(st: &'a RegistryState, service: &str, tag: &str) -> Option<&'a str> {
    st.catalog
        .instances_of(service)
        .flat_map(|i| i.tags.iter())
        .find(|t| t.eq_ignore_ascii_case(tag))
        .map(String::as_str)
}

fn find_instance<'a>(st: &'a RegistryState, service: &str, id: &str) -> Option<&'a Instance> {
    st.catalog.get(service, id).or_else(|| {
        st.catalog
            .instances_of(service)
            .find(|i| i.id.eq_ignore_ascii_case(id))
    })
}

/// The answer's metadata when even a failure could not be sent.
fn failed(request: &Request) -> ResponseInfo {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.response_code = ResponseCode::ServFail;
    ResponseInfo::from(Header {
        metadata,
        counts: HeaderCounts::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handler(domain: &str) -> Handler {
        let domain = Name::from_ascii(domain).expect("domain");
        Handler {
            apex: LowerName::new(&domain),
            zone: Zone {
                domain,
                ttl: 2,
                token: None,
            },
            state: std::sync::Arc::new(std::sync::RwLock::new(RegistryState {
                catalog: crate::registry::Catalog::default(),
                hub: crate::registry::watch::WatchHub::new(0, 10),
            })),
        }
    }

    #[test]
    fn a_token_scopes_the_answers_and_a_missing_one_refuses() {
        use crate::registry::acl::{Acl, Role, Token};
        let mut h = handler("roster.");
        let token = |hash: u8| Token {
            accessor: format!("a{hash}"),
            secret_hash: [hash; 32],
            role: Role::Read,
            services: vec!["web".into()],
            description: String::new(),
            created_ms: 0,
        };
        let web = Instance::example("web", "w-1");
        let api = Instance::example("api", "a-1");
        let catalog = crate::registry::Catalog::from_parts(1, [web, api], [])
            .with_acl(Acl::restore([token(1)], true));
        let st = RegistryState {
            catalog,
            hub: crate::registry::watch::WatchHub::new(0, 10),
        };
        let name = |n: &str| LowerName::new(&Name::from_ascii(n).expect("name"));
        h.zone.token = Some([1; 32]);
        let a = h.answer(&st, &name("web.service.roster."), RecordType::A);
        assert_eq!(a.map(|a| a.records.len()), Some(1), "in scope");
        let a = h.answer(&st, &name("api.service.roster."), RecordType::A);
        assert!(a.is_none(), "out of scope: refused");
        h.zone.token = Some([2; 32]);
        let a = h.answer(&st, &name("web.service.roster."), RecordType::A);
        assert!(a.is_none(), "no such token (revoked): refused");
    }

    fn parse(h: &Handler, name: &str) -> Query {
        h.parse(&LowerName::new(&Name::from_ascii(name).expect("name")))
    }

    #[test]
    fn names_parse_from_the_right() {
        let h = handler("roster.");
        assert_eq!(parse(&h, "roster."), Query::Apex);
        assert_eq!(
            parse(&h, "web.service.roster."),
            Query::Service {
                service: "web".into(),
                tag: None
            }
        );
        assert_eq!(
            parse(&h, "v1.2.web.service.roster."),
            Query::Service {
                service: "web".into(),
                tag: Some("v1.2".into())
            }
        );
        assert_eq!(
            parse(&h, "web-1.a.web.instance.roster."),
            Query::Instance {
                service: "web".into(),
                id: "web-1.a".into()
            }
        );
        assert_eq!(parse(&h, "web.instance.roster."), Query::Unknown);
        assert_eq!(parse(&h, "web.node.roster."), Query::Unknown);
        // A namespace follows `service` / `instance`.
        assert_eq!(
            parse(&h, "v1.web.service.team-a.roster."),
            Query::Service {
                service: "team-a/web".into(),
                tag: Some("v1".into())
            }
        );
        assert_eq!(
            parse(&h, "web-1.web.instance.team-a.roster."),
            Query::Instance {
                service: "team-a/web".into(),
                id: "web-1".into()
            }
        );
        assert_eq!(parse(&h, "service.team-a.roster."), Query::Unknown);
        // RFC 2782: `_tcp` is every instance, another label a tag.
        assert_eq!(
            parse(&h, "_web._tcp.service.roster."),
            Query::Service {
                service: "web".into(),
                tag: None
            }
        );
        assert_eq!(
            parse(&h, "_web._v2.service.team-a.roster."),
            Query::Service {
                service: "team-a/web".into(),
                tag: Some("v2".into())
            }
        );
        // A label may hold any byte on the wire.
        let slashed = Name::from_labels([&b"team-a/web"[..], b"service", b"roster"]).expect("name");
        assert_eq!(h.parse(&LowerName::new(&slashed)), Query::Unknown);
        let h = handler("sd.example.com.");
        assert_eq!(
            parse(&h, "WEB.service.sd.example.com."),
            Query::Service {
                service: "web".into(),
                tag: None
            }
        );
    }
}
