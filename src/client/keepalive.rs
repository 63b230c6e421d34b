//! What the client keeps alive in the background until it is dropped or
//! shut down: a registration (heartbeats) or a session (renewals, holding
//! any number of registrations).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::{Code, Error, RosterClient};
use crate::proto::v1::*;

/// Heartbeats or renewals per TTL: one lost or slow (a failover) still leaves two.
const BEATS_PER_TTL: u32 = 3;

/// A loop run every `period` in a task, until stopped or dropped.
struct Background {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Background {
    fn every<F, Fut>(period: Duration, mut step: F) -> Background
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = &mut stopped => return,
                    _ = tick.tick() => step().await,
                }
            }
        });
        Background {
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops the loop after the step under way, if any.
    async fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }

    /// Aborts the loop; false if it was already stopped.
    fn abort(&mut self) -> bool {
        self.stop = None;
        self.task.take().map(|t| t.abort()).is_some()
    }
}

/// Runs `f` on the current runtime, if any: for the cleanup of a drop.
fn spawn_cleanup<Fut>(f: Fut)
where
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(f);
    }
}

pub struct Registration {
    client: RosterClient,
    service: String,
    id: String,
    namespace: String,
    beats: Background,
}

impl Registration {
    pub(super) async fn start(
        client: RosterClient,
        mut instance: Instance,
        ttl: Duration,
    ) -> Result<Registration, Error> {
        instance.check = Some(HealthCheck {
            kind: Some(health_check::Kind::Ttl(TtlCheck {
                ttl_ms: u32::try_from(ttl.as_millis()).unwrap_or(u32::MAX),
            })),
            ..Default::default()
        });
        // The instance's own namespace is the request's.
        let req = RegisterRequest {
            instance: Some(instance.clone()),
            namespace: instance.namespace.clone(),
            ..Default::default()
        };
        client.register(req.clone()).await?;
        let beat = HeartbeatRequest {
            service: instance.service.clone(),
            id: instance.id.clone(),
            namespace: instance.namespace.clone(),
            ..Default::default()
        };
        let c = client.clone();
        let beats = Background::every(ttl / BEATS_PER_TTL, move || {
            let (c, beat, req) = (c.clone(), beat.clone(), req.clone());
            async move {
                match c.heartbeat(beat.clone()).await {
                    Ok(_) => {}
                    // Removed behind our back (deregister_after, an operator): register again.
                    Err(s) if s.code() == Code::NotFound => {
                        if let Err(e) = c.register(req).await {
                            tracing::warn!("re-registering {}/{}: {e}", beat.service, beat.id);
                        }
                    }
                    // The client already tried every node; keep beating.
                    Err(e) => tracing::warn!("heartbeat {}/{}: {e}", beat.service, beat.id),
                }
            }
        });
        Ok(Registration {
            client,
            service: instance.service,
            id: instance.id,
            namespace: instance.namespace,
            beats,
        })
    }

    /// Stops heartbeating and deregisters the instance.
    pub async fn shutdown(mut self) -> Result<(), Error> {
        self.beats.stop().await;
        let req = DeregisterRequest {
            service: self.service.clone(),
            id: self.id.clone(),
            namespace: self.namespace.clone(),
        };
        match self.client.deregister(req).await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(s),
        }
    }
}

impl Drop for Registration {
    /// Dropped without `shutdown`: stop beating and deregister in the background.
    fn drop(&mut self) {
        if !self.beats.abort() {
            return;
        }
        let client = self.client.clone();
        let req = DeregisterRequest {
            service: self.service.clone(),
            id: self.id.clone(),
            namespace: self.namespace.clone(),
        };
        spawn_cleanup(async move {
            let _ = client.deregister(req).await;
        });
    }
}

/// A session renewed in the background. If the cluster ends it anyway (the
/// client was cut off for longer than its TTL), the next renewal opens a new
/// session and registers the instances held again, as Nacos and Consul
/// clients do after a lost connection or session.
pub struct KeptSession {
    held: Arc<Held>,
    renewals: Background,
}

struct Held {
    client: RosterClient,
    create: CreateSessionRequest,
    id: Mutex<String>,
    instances: Mutex<Vec<Instance>>,
}

impl KeptSession {
    pub(super) async fn open(
        client: RosterClient,
        namespace: &str,
        name: &str,
        ttl: Duration,
        on_end: SessionEnd,
    ) -> Result<KeptSession, Error> {
        let create = CreateSessionRequest {
            namespace: namespace.to_string(),
            name: name.to_string(),
            ttl_ms: u32::try_from(ttl.as_millis()).unwrap_or(u32::MAX),
            on_end: on_end as i32,
        };
        let id = Held::create(&client, &create).await?;
        let held = Arc::new(Held {
            client,
            create,
            id: Mutex::new(id),
            instances: Mutex::default(),
        });
        let h = held.clone();
        let renewals = Background::every(ttl / BEATS_PER_TTL, move || {
            let h = h.clone();
            async move { h.renew().await }
        });
        Ok(KeptSession { held, renewals })
    }

    /// The id of the session now held (a new one after the cluster ended the first).
    pub fn id(&self) -> String {
        self.held.id()
    }

    /// Registers `instance` under the session; it is registered again under
    /// any session that replaces this one. An instance that names no
    /// namespace is registered in the session's.
    pub async fn register(&self, mut instance: Instance) -> Result<RegisterResponse, Error> {
        if instance.namespace.is_empty() {
            instance.namespace.clone_from(&self.held.create.namespace);
        }
        let r = self.held.register(instance.clone()).await?;
        let mut held = lock(&self.held.instances);
        held.retain(|i| !(i.service == instance.service && i.id == instance.id));
        held.push(instance);
        Ok(r)
    }

    /// Deregisters an instance registered under the session.
    pub async fn deregister(&self, service: &str, id: &str) -> Result<DeregisterResponse, Error> {
        lock(&self.held.instances).retain(|i| !(i.service == service && i.id == id));
        self.held
            .client
            .deregister(DeregisterRequest {
                service: service.to_string(),
                id: id.to_string(),
                namespace: self.held.create.namespace.clone(),
            })
            .await
    }

    /// Stops renewing and closes the session: what it holds turns critical
    /// or is deregistered at once, as the session's `on_end` says.
    pub async fn close(mut self) -> Result<CloseSessionResponse, Error> {
        self.renewals.stop().await;
        self.held.close().await
    }
}

impl Drop for KeptSession {
    /// Dropped without `close`: stop renewing and close in the background.
    fn drop(&mut self) {
        if self.renewals.abort() {
            let held = self.held.clone();
            spawn_cleanup(async move {
                let _ = held.close().await;
            });
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The data stays consistent whatever panicked while holding it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Held {
    async fn create(client: &RosterClient, req: &CreateSessionRequest) -> Result<String, Error> {
        let r = client.create_session(req.clone()).await?;
        r.session.map(|s| s.id).ok_or_else(|| {
            Error::from(tonic::Status::internal(
                "CreateSession answered without a session",
            ))
        })
    }

    fn id(&self) -> String {
        lock(&self.id).clone()
    }

    async fn register(&self, instance: Instance) -> Result<RegisterResponse, Error> {
        let req = RegisterRequest {
            namespace: instance.namespace.clone(),
            instance: Some(instance),
            session: self.id(),
        };
        self.client.register(req).await
    }

    async fn renew(&self) {
        let id = self.id();
        let req = RenewSessionsRequest {
            ids: vec![id.clone()],
        };
        match self.client.renew_sessions(req).await {
            Ok(r) if r.unknown.is_empty() => {}
            Ok(_) => self.replace(&id).await,
            // The client already tried every node; keep renewing.
            Err(e) => tracing::warn!("renewing session {id}: {e}"),
        }
    }

    /// The cluster ended session `old`: open another, register all again.
    async fn replace(&self, old: &str) {
        let id = match Self::create(&self.client, &self.create).await {
            Ok(id) => id,
            Err(e) => return tracing::warn!("session {old} ended; opening another: {e}"),
        };
        tracing::warn!("session {old} ended; registering its instances under {id}");
        *lock(&self.id) = id;
        let instances = lock(&self.instances).clone();
        for i in instances {
            if let Err(e) = self.register(i.clone()).await {
                tracing::warn!("re-registering {}/{}: {e}", i.service, i.id);
            }
        }
    }

    async fn close(&self) -> Result<CloseSessionResponse, Error> {
        let req = CloseSessionRequest {
            id: self.id(),
            namespace: self.create.namespace.clone(),
        };
        self.client.close_session(req).await
    }
}
