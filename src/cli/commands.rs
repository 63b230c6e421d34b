//! Client subcommands: one call each, printed for people.

use crate::client::{tls_from_files, RosterClient};
use crate::proto::v1::*;

use super::{
    AclCommand, CheckArgs, CheckKindArg, Endpoints, GetArgs, InstanceArgs, ListArgs,
    MaintenanceCommand, MemberCommand, NamespaceCommand, ProtectArgs, RegisterArgs, SessionCommand,
    StatusArgs, TokenCommand, WatchArgs,
};

pub(super) fn client(e: &Endpoints) -> anyhow::Result<RosterClient> {
    let identity = e.cert.as_deref().zip(e.key.as_deref());
    let c = match &e.cacert {
        Some(ca) => RosterClient::with_tls(&e.endpoints, tls_from_files(ca, identity)?)?,
        None if identity.is_some() => {
            anyhow::bail!("--cert and --key are for TLS: give the nodes' CA with --cacert too")
        }
        None => RosterClient::new(&e.endpoints)?,
    };
    Ok(match &e.token {
        Some(t) => c.with_token(t)?,
        None => c,
    })
}

fn consistency(stale: bool) -> i32 {
    if stale {
        Consistency::Stale as i32
    } else {
        Consistency::Linearizable as i32
    }
}

fn show(i: &Instance) -> String {
    let ns = if i.namespace.is_empty() {
        String::new()
    } else {
        format!("{}:", i.namespace)
    };
    let mut s = format!(
        "{ns}{}/{} {}:{} {} weight={} rev={}",
        i.service,
        i.id,
        i.address,
        i.port,
        HealthStatus::word(i.status),
        i.weight,
        i.mod_revision
    );
    if !i.maintenance.is_empty() {
        s.push_str(&format!(
            " check_status={}",
            HealthStatus::word(i.check_status)
        ));
    }
    if !i.tags.is_empty() {
        s.push_str(&format!(" tags={}", i.tags.join(",")));
    }
    let mut md: Vec<_> = i.metadata.iter().collect();
    md.sort();
    for (k, v) in md {
        s.push_str(&format!(" {k}={v}"));
    }
    if !i.registered_by.is_empty() {
        s.push_str(&format!(" registered_by={}", i.registered_by));
    }
    if !i.check_output.is_empty() {
        s.push_str(&format!(" check: {}", i.check_output));
    }
    s
}

fn check(a: CheckArgs) -> Option<HealthCheck> {
    use health_check::Kind;
    let kind = match a.check? {
        CheckKindArg::Ttl => Kind::Ttl(TtlCheck { ttl_ms: a.ttl_ms }),
        CheckKindArg::Tcp => Kind::Tcp(TcpCheck { port: a.check_port }),
        CheckKindArg::Http => Kind::Http(HttpCheck {
            port: a.check_port,
            path: a.http_path,
        }),
        CheckKindArg::Grpc => Kind::Grpc(GrpcCheck {
            port: a.check_port,
            service: a.grpc_service,
        }),
    };
    Some(HealthCheck {
        kind: Some(kind),
        interval_ms: a.interval_ms,
        timeout_ms: a.timeout_ms,
        failures_before_critical: a.failures_before_critical,
        successes_before_passing: a.successes_before_passing,
        deregister_after_ms: a.deregister_after_ms,
    })
}

pub async fn register(a: RegisterArgs) -> anyhow::Result<()> {
    let metadata = a
        .metadata
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| anyhow::anyhow!("--meta {kv:?} is not key=value"))
        })
        .collect::<anyhow::Result<_>>()?;
    let r = client(&a.instance.endpoints)?
        .register(RegisterRequest {
            instance: Some(Instance {
                service: a.instance.service,
                id: a.instance.id,
                address: a.address,
                port: a.port,
                tags: a.tags,
                metadata,
                weight: a.weight,
                check: check(a.check),
                ..Default::default()
            }),
            session: a.session,
            namespace: a.instance.endpoints.namespace.clone(),
        })
        .await?;
    if let Some(i) = &r.instance {
        println!("registered {} at revision {}", show(i), r.revision);
    }
    Ok(())
}

pub async fn deregister(a: InstanceArgs) -> anyhow::Result<()> {
    let r = client(&a.endpoints)?
        .deregister(DeregisterRequest {
            service: a.service.clone(),
            id: a.id.clone(),
            namespace: a.endpoints.namespace.clone(),
        })
        .await?;
    println!(
        "deregistered {}/{} at revision {}",
        a.service, a.id, r.revision
    );
    Ok(())
}

pub async fn heartbeat(a: InstanceArgs) -> anyhow::Result<()> {
    let r = client(&a.endpoints)?
        .heartbeat(HeartbeatRequest {
            service: a.service.clone(),
            id: a.id.clone(),
            namespace: a.endpoints.namespace.clone(),
            ..Default::default()
        })
        .await?;
    println!(
        "{}/{} {} at revision {}",
        a.service,
        a.id,
        HealthStatus::word(r.status),
        r.revision
    );
    Ok(())
}

pub async fn get(a: GetArgs) -> anyhow::Result<()> {
    let r = client(&a.endpoints)?
        .get_service(GetServiceRequest {
            service: a.service,
            healthy_only: a.healthy,
            tags: a.tags,
            consistency: consistency(a.stale),
            namespace: a.endpoints.namespace.clone(),
            ..Default::default()
        })
        .await?;
    println!("revision {}", r.revision);
    if r.protection_active {
        println!("protection active: too few instances pass, so all are listed");
    }
    for i in &r.instances {
        println!("{}", show(i));
    }
    Ok(())
}

pub async fn list(a: ListArgs) -> anyhow::Result<()> {
    let r = client(&a.endpoints)?
        .list_services(ListServicesRequest {
            consistency: consistency(a.stale),
            namespace: a.endpoints.namespace.clone(),
            ..Default::default()
        })
        .await?;
    println!("revision {}", r.revision);
    for s in &r.services {
        println!("{} instances={} passing={}", s.name, s.instances, s.passing);
    }
    Ok(())
}

pub async fn maintenance(c: MaintenanceCommand) -> anyhow::Result<()> {
    let (t, enable, reason) = match c {
        MaintenanceCommand::Enable { target, reason } => (target, true, reason),
        MaintenanceCommand::Disable { target } => (target, false, String::new()),
    };
    let r = client(&t.endpoints)?
        .set_maintenance(SetMaintenanceRequest {
            service: t.service.clone(),
            id: t.id.clone().unwrap_or_default(),
            enable,
            reason,
            namespace: t.endpoints.namespace.clone(),
        })
        .await?;
    let what = match &t.id {
        Some(id) => format!("{}/{id}", t.service),
        None => format!("{} (every instance)", t.service),
    };
    let state = if enable {
        "in maintenance"
    } else {
        "in rotation"
    };
    println!(
        "{what}: {state}; {} instance(s) changed at revision {}",
        r.instances, r.revision
    );
    Ok(())
}

pub async fn protect(a: ProtectArgs) -> anyhow::Result<()> {
    let r = client(&a.endpoints)?
        .configure_service(ConfigureServiceRequest {
            service: a.service.clone(),
            protect_threshold_percent: a.threshold_percent,
            namespace: a.endpoints.namespace.clone(),
        })
        .await?;
    println!(
        "{}: protection threshold {}% at revision {}",
        a.service, a.threshold_percent, r.revision
    );
    Ok(())
}

pub async fn watch(a: WatchArgs) -> anyhow::Result<()> {
    let mut stream = client(&a.endpoints)?
        .watch(WatchRequest {
            service: a.service.unwrap_or_default(),
            since_revision: a.since,
            namespace: a.endpoints.namespace.clone(),
        })
        .await?;
    while let Some(m) = stream.message().await? {
        match ResetReason::try_from(m.reset) {
            Ok(ResetReason::Initial) | Ok(ResetReason::Compacted) => {
                let why = if m.reset == ResetReason::Compacted as i32 {
                    "resync (history compacted)"
                } else {
                    "state"
                };
                println!(
                    "{why} at revision {}: {} instances",
                    m.revision,
                    m.instances.len()
                );
                for i in &m.instances {
                    println!("  {}", show(i));
                }
            }
            _ => {
                for e in &m.events {
                    let kind = if e.r#type == EventType::Delete as i32 {
                        "DELETE"
                    } else {
                        "PUT"
                    };
                    let inst = e.instance.as_ref().map(show).unwrap_or_default();
                    println!("{} {kind} {inst}", e.revision);
                }
            }
        }
    }
    Ok(())
}

pub async fn status(a: StatusArgs) -> anyhow::Result<()> {
    let replies = client(&a.endpoints)?.status_all().await;
    // Membership as the newest leader that answered knows it: a removed node
    // may never learn of its removal, and goes on naming its old leader.
    let leader_members = replies
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok())
        .filter(|s| s.role == "leader")
        .max_by_key(|s| s.term)
        .map(|s| &s.members);
    for (endpoint, r) in &replies {
        match r {
            Ok(s) => {
                let advertise = match s.advertise_address.as_str() {
                    "" => String::new(),
                    a => format!(" advertise={a}"),
                };
                let advertise = format!("{advertise} peer={}", s.peer_advertise_address);
                let known = leader_members.unwrap_or(&s.members);
                let outside = if known.iter().any(|m| m.id == s.node_id) {
                    ""
                } else {
                    " (not a member: not added yet, or removed)"
                };
                let contact = s
                    .leader_contact_ms
                    .map(|c| format!(" leader_contact={c:.0}ms"))
                    .unwrap_or_default();
                println!(
                    "{endpoint}: node {} {}{outside} term={} leader={} last_log={} applied={} snapshot={} revision={} cluster={} incarnation={}{advertise}{contact}",
                    s.node_id, s.role, s.term, s.leader_id, s.last_log_index, s.applied_index, s.snapshot_index, s.revision, s.cluster_id, s.incarnation
                );
                println!("  members: {}", members(&s.members));
            }
            Err(e) => println!("{endpoint}: unreachable ({})", e.message()),
        }
    }
    Ok(())
}

/// What the leader knows of a follower's health: lag and last contact.
fn health(m: &Member) -> String {
    let lag = m.lag_entries.map(|l| format!("lag {l}"));
    let contact = m.last_contact_ms.map(|c| format!("contact {c:.0}ms ago"));
    match (lag, contact) {
        (None, None) => String::new(),
        (a, b) => format!(
            "({})",
            a.into_iter().chain(b).collect::<Vec<_>>().join(", ")
        ),
    }
}

fn members(ms: &[Member]) -> String {
    ms.iter()
        .map(|m| {
            format!(
                "{}={}(peer {}){}{}{}",
                m.id,
                m.address,
                m.peer_address,
                match (m.voter, m.replica) {
                    (true, _) => "",
                    (false, true) => "(replica)",
                    (false, false) => "(learner)",
                },
                m.rtt_ms
                    .map(|r| format!("(rtt {r:.1}ms)"))
                    .unwrap_or_default(),
                health(m)
            )
        })
        .collect::<Vec<_>>()
        .join(",")
}

pub async fn member(m: MemberCommand) -> anyhow::Result<()> {
    let r = match m {
        MemberCommand::Add {
            endpoints,
            id,
            address,
            replica,
        } => {
            client(&endpoints)?
                .add_member(AddMemberRequest {
                    id,
                    address,
                    replica,
                })
                .await?
        }
        MemberCommand::Remove { endpoints, id } => {
            client(&endpoints)?
                .remove_member(RemoveMemberRequest { id })
                .await?
        }
    };
    println!("members: {}", members(&r.members));
    Ok(())
}

fn role_name(r: i32) -> &'static str {
    match Role::try_from(r) {
        Ok(Role::Read) => "read",
        Ok(Role::Write) => "write",
        Ok(Role::Admin) => "admin",
        _ => "unknown",
    }
}

fn print_created(t: &CreatedToken) {
    if let Some(info) = &t.token {
        println!("accessor: {}", info.accessor);
        println!("role: {}", role_name(info.role));
        if !info.services.is_empty() {
            println!("services: {}", info.services.join(","));
        }
    }
    println!("secret: {}", t.secret);
    println!("(the secret is shown only now; send it as --token or ROSTER_TOKEN)");
}

pub async fn acl(a: AclCommand) -> anyhow::Result<()> {
    let AclCommand::Bootstrap {
        endpoints,
        description,
        secret_file,
    } = a;
    let secret = match secret_file {
        Some(f) => std::fs::read_to_string(&f)
            .map_err(|e| anyhow::anyhow!("cannot read the secret file {}: {e}", f.display()))?
            .trim()
            .to_string(),
        None => String::new(),
    };
    let t = client(&endpoints)?
        .bootstrap(BootstrapRequest {
            description,
            secret,
        })
        .await?;
    print_created(&t);
    Ok(())
}

pub async fn session(c: SessionCommand) -> anyhow::Result<()> {
    match c {
        SessionCommand::List { endpoints, stale } => {
            let r = client(&endpoints)?
                .list_sessions(ListSessionsRequest {
                    namespace: Default::default(),
                    consistency: consistency(stale),
                })
                .await?;
            println!("revision {}", r.revision);
            for s in &r.sessions {
                let on_end = match SessionEnd::try_from(s.on_end) {
                    Ok(SessionEnd::Deregister) => "deregister",
                    _ => "critical",
                };
                println!(
                    "{} ttl={}ms on_end={} instances={} name={:?} created_by={}",
                    s.id, s.ttl_ms, on_end, s.instances, s.name, s.created_by
                );
            }
        }
        SessionCommand::Close { endpoints, id } => {
            let r = client(&endpoints)?
                .close_session(CloseSessionRequest {
                    id: id.clone(),
                    namespace: endpoints.namespace.clone(),
                })
                .await?;
            println!(
                "closed session {id} at revision {}: {} instances ended",
                r.revision, r.instances
            );
        }
    }
    Ok(())
}

pub async fn namespace(c: NamespaceCommand) -> anyhow::Result<()> {
    let show = |n: &Namespace| {
        let q = n.quotas.unwrap_or_default();
        let limit = |v: u64| {
            if v == 0 {
                "-".to_string()
            } else {
                v.to_string()
            }
        };
        format!(
            "{} instances={}/{} services={}/{} sessions={}/{}",
            n.name,
            n.instances,
            limit(q.max_instances),
            n.services,
            limit(q.max_services),
            n.sessions,
            limit(q.max_sessions)
        )
    };
    match c {
        NamespaceCommand::Create {
            endpoints,
            name,
            max_instances,
            max_services,
            max_sessions,
            max_watch_streams,
        } => {
            let r = client(&endpoints)?
                .create_namespace(CreateNamespaceRequest {
                    name,
                    quotas: Some(NamespaceQuotas {
                        max_instances,
                        max_services,
                        max_sessions,
                        max_watch_streams,
                    }),
                })
                .await?;
            if let Some(n) = &r.namespace {
                println!("{} at revision {}", show(n), r.revision);
            }
        }
        NamespaceCommand::List { endpoints, stale } => {
            let r = client(&endpoints)?
                .list_namespaces(ListNamespacesRequest {
                    consistency: consistency(stale),
                })
                .await?;
            println!("revision {}", r.revision);
            for n in &r.namespaces {
                println!("{}", show(n));
            }
        }
        NamespaceCommand::Delete {
            endpoints,
            name,
            force,
        } => {
            let r = client(&endpoints)?
                .delete_namespace(DeleteNamespaceRequest {
                    name: name.clone(),
                    force,
                })
                .await?;
            println!(
                "deleted namespace {name} at revision {}: {} instances deregistered",
                r.revision, r.instances
            );
        }
    }
    Ok(())
}

pub async fn token(t: TokenCommand) -> anyhow::Result<()> {
    match t {
        TokenCommand::Create {
            endpoints,
            role,
            services,
            description,
        } => {
            let role = match role.as_str() {
                "read" => Role::Read,
                "write" => Role::Write,
                "admin" => Role::Admin,
                other => anyhow::bail!("--role {other:?}: use read, write or admin"),
            };
            let created = client(&endpoints)?
                .create_token(CreateTokenRequest {
                    role: role as i32,
                    services,
                    description,
                })
                .await?;
            print_created(&created);
        }
        TokenCommand::List { endpoints } => {
            for t in client(&endpoints)?.list_tokens().await?.tokens {
                let scope = match t.services.is_empty() {
                    true => "every service".to_string(),
                    false => t.services.join(","),
                };
                println!(
                    "{} {} {} {}",
                    t.accessor,
                    role_name(t.role),
                    scope,
                    t.description
                );
            }
        }
        TokenCommand::Revoke {
            endpoints,
            accessor,
        } => {
            let r = client(&endpoints)?
                .revoke_token(RevokeTokenRequest { accessor })
                .await?;
            println!("revoked at revision {}", r.revision);
        }
    }
    Ok(())
}
