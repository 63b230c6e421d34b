//! A registration kept alive by heartbeats until it is dropped or shut down.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::{Code, Status};

use super::RosterClient;
use crate::proto::v1::*;

/// Heartbeats per TTL: one lost or slow heartbeat (a failover) still leaves two.
const BEATS_PER_TTL: u32 = 3;

pub struct Registration {
    client: Arc<RosterClient>,
    service: String,
    id: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Registration {
    pub(super) async fn start(
        client: Arc<RosterClient>,
        mut instance: Instance,
        ttl: Duration,
    ) -> Result<Registration, Status> {
        instance.check = Some(HealthCheck {
            kind: Some(health_check::Kind::Ttl(TtlCheck {
                ttl_ms: u32::try_from(ttl.as_millis()).unwrap_or(u32::MAX),
            })),
            ..Default::default()
        });
        let req = RegisterRequest {
            instance: Some(instance.clone()),
        };
        client.register(req.clone()).await?;
        let (stop, mut stopped) = oneshot::channel();
        let beat = HeartbeatRequest {
            service: instance.service.clone(),
            id: instance.id.clone(),
        };
        let c = client.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(ttl / BEATS_PER_TTL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = &mut stopped => return,
                    _ = tick.tick() => {}
                }
                match c.heartbeat(beat.clone()).await {
                    Ok(_) => {}
                    // Removed behind our back (deregister_after, an operator): register again.
                    Err(s) if s.code() == Code::NotFound => {
                        if let Err(e) = c.register(req.clone()).await {
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
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// Stops heartbeating and deregisters the instance.
    pub async fn shutdown(mut self) -> Result<(), Status> {
        self.stop_heartbeats().await;
        let req = DeregisterRequest {
            service: self.service.clone(),
            id: self.id.clone(),
        };
        match self.client.deregister(req).await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(s),
        }
    }

    async fn stop_heartbeats(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for Registration {
    /// Dropped without `shutdown`: stop beating and deregister in the background.
    fn drop(&mut self) {
        let Some(task) = self.task.take() else { return };
        task.abort();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let client = self.client.clone();
            let req = DeregisterRequest {
                service: self.service.clone(),
                id: self.id.clone(),
            };
            rt.spawn(async move {
                let _ = client.deregister(req).await;
            });
        }
    }
}
