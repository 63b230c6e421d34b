//! The leader's check loop. It follows the catalogue through a watch stream,
//! keeps one probe task per checked instance (bounded by a semaphore), turns
//! results into a desired status through the thresholds, and proposes only
//! the differences from the replicated status, batched, once per tick.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::MissedTickBehavior;

use super::probe::Prober;
use super::tracker::Tracker;
use super::CheckContext;
use crate::raft::proposer::Refusal;
use crate::registry::leases::{now_ms, TTL_RENEWED};
use crate::registry::model::{CheckKind, CheckSpec, HealthUpdate};
use crate::registry::watch::{watch_stream, WatchMessage};
use crate::registry::{Command, EventKind, HealthStatus, Instance};

/// How often transitions are collected and proposed.
const TICK: Duration = Duration::from_millis(100);
/// A proposal not reflected in the catalogue by then is made again.
const REPROPOSE_AFTER: Duration = Duration::from_secs(2);

type Key = (String, String);

struct ProbeResult {
    key: Key,
    result: Result<String, String>,
}

#[derive(Clone, Copy, PartialEq)]
enum Proposed {
    Status(HealthStatus),
    Deregister,
}

struct Target {
    /// The instance as the registry holds it.
    inst: Instance,
    spec: CheckSpec,
    tracker: Tracker,
    desired: HealthStatus,
    output: String,
    /// No critical verdict before this: a new leader first gives instances a chance.
    grace_until: Instant,
    /// TTL baseline when no heartbeat has been seen by this leader.
    seen_at: Instant,
    probe: Option<AbortHandle>,
    proposed: Option<(Proposed, Instant)>,
}

impl Target {
    fn proposed_recently(&self, what: Proposed, now: Instant) -> bool {
        matches!(self.proposed, Some((p, at)) if p == what && now.duration_since(at) < REPROPOSE_AFTER)
    }
}

struct Runner {
    ctx: Arc<CheckContext>,
    started: Instant,
    /// Set once the first full state has been taken in.
    synced: bool,
    targets: HashMap<Key, Target>,
    probes: JoinSet<()>,
    slots: Arc<Semaphore>,
    results: mpsc::Sender<ProbeResult>,
}

/// Runs until aborted (leadership lost) or the catalogue stream ends.
pub async fn run(ctx: Arc<CheckContext>) {
    let (tx, mut rx) = mpsc::channel(4096);
    let mut watch = Box::pin(watch_stream(ctx.state.clone(), None, 0));
    let mut r = Runner {
        slots: Arc::new(Semaphore::new(ctx.max_concurrent_probes.max(1))),
        ctx,
        started: Instant::now(),
        synced: false,
        targets: HashMap::new(),
        probes: JoinSet::new(),
        results: tx,
    };
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            m = watch.next() => match m {
                Some(m) => r.follow(m),
                None => return,
            },
            Some(p) = rx.recv() => r.record(p),
            _ = tick.tick() => r.propose(),
        }
    }
}

impl Runner {
    fn follow(&mut self, m: WatchMessage) {
        if m.reset.is_some() {
            let keep: std::collections::HashSet<Key> = m
                .instances
                .iter()
                .map(|i| (i.service.clone(), i.id.clone()))
                .collect();
            let gone: Vec<Key> = self
                .targets
                .keys()
                .filter(|k| !keep.contains(*k))
                .cloned()
                .collect();
            for k in gone {
                self.remove(&k);
            }
            for i in m.instances {
                self.upsert(i);
            }
            self.synced = true;
        }
        for e in m.events {
            match e.kind {
                EventKind::Put => self.upsert(e.instance),
                EventKind::Delete => self.remove(&(e.instance.service, e.instance.id)),
            }
        }
    }

    fn upsert(&mut self, inst: Instance) {
        let key = (inst.service.clone(), inst.id.clone());
        let Some(spec) = inst.check.clone() else {
            self.remove(&key);
            return;
        };
        if let Some(t) = self.targets.get_mut(&key) {
            if t.spec == spec && t.inst.address == inst.address {
                if matches!(t.proposed, Some((Proposed::Status(s), _)) if s == inst.status) {
                    t.proposed = None;
                }
                t.inst = inst;
                return;
            }
            self.remove(&key);
        }
        let now = Instant::now();
        // Instances present when this node became leader get one interval (or TTL) of grace.
        let grace_until = if self.synced {
            now
        } else {
            self.started + Duration::from_millis(spec.grace_ms())
        };
        let probe = self.spawn_probe(&key, &inst.address, &spec);
        self.targets.insert(
            key,
            Target {
                tracker: Tracker::new(inst.status),
                desired: inst.status,
                output: inst.check_output.clone(),
                inst,
                spec,
                grace_until,
                seen_at: now,
                probe,
                proposed: None,
            },
        );
    }

    fn remove(&mut self, key: &Key) {
        if let Some(t) = self.targets.remove(key) {
            if let Some(p) = t.probe {
                p.abort();
            }
            if matches!(t.spec.kind, CheckKind::Ttl { .. }) {
                self.ctx.leases.forget(&key.0, &key.1);
            }
        }
    }

    fn spawn_probe(&mut self, key: &Key, address: &str, spec: &CheckSpec) -> Option<AbortHandle> {
        if matches!(spec.kind, CheckKind::Ttl { .. }) {
            return None;
        }
        let (key, address, spec) = (key.clone(), address.to_string(), spec.clone());
        let (slots, results) = (self.slots.clone(), self.results.clone());
        Some(
            self.probes
                .spawn(probe_loop(key, address, spec, slots, results)),
        )
    }

    fn record(&mut self, p: ProbeResult) {
        let Some(t) = self.targets.get_mut(&p.key) else {
            return;
        };
        let ok = p.result.is_ok();
        t.desired = t.tracker.record(
            ok,
            t.spec.failures_before_critical,
            t.spec.successes_before_passing,
        );
        t.output = p.result.unwrap_or_else(|e| e);
    }

    fn propose(&mut self) {
        while self.probes.try_join_next().is_some() {}
        let now = Instant::now();
        let wall = now_ms();
        let mut commands = Vec::new();
        let mut updates = Vec::new();
        for ((service, id), t) in self.targets.iter_mut() {
            if let CheckKind::Ttl { ttl_ms } = t.spec.kind {
                let renewed = self
                    .ctx
                    .leases
                    .last_renewal(service, id)
                    .map_or(t.seen_at, |r| r.max(t.seen_at));
                let silent = now.duration_since(renewed);
                let desired = if silent > Duration::from_millis(ttl_ms) {
                    HealthStatus::Critical
                } else {
                    HealthStatus::Passing
                };
                // Only a change needs words: this runs for every TTL instance on every tick.
                if desired != t.desired || t.output.is_empty() {
                    t.desired = desired;
                    t.output = match desired {
                        HealthStatus::Passing => TTL_RENEWED.into(),
                        _ => format!(
                            "TTL expired: no heartbeat for {} ms (TTL {ttl_ms} ms)",
                            silent.as_millis()
                        ),
                    };
                }
            }
            let blocked_by_grace = t.desired == HealthStatus::Critical && now < t.grace_until;
            if t.desired != t.inst.status
                && !blocked_by_grace
                && !t.proposed_recently(Proposed::Status(t.desired), now)
            {
                t.proposed = Some((Proposed::Status(t.desired), now));
                updates.push(HealthUpdate {
                    service: service.clone(),
                    id: id.clone(),
                    status: t.desired,
                    output: t.output.clone(),
                    at_ms: wall,
                });
            }
            let dereg = t.spec.deregister_after_ms;
            if t.inst.status == HealthStatus::Critical
                && dereg > 0
                && wall.saturating_sub(t.inst.status_since_ms) >= dereg
                && !t.proposed_recently(Proposed::Deregister, now)
            {
                t.proposed = Some((Proposed::Deregister, now));
                commands.push(Command::Deregister {
                    service: service.clone(),
                    id: id.clone(),
                });
            }
        }
        if !updates.is_empty() {
            commands.push(Command::SetHealth(updates));
        }
        for cmd in commands {
            let proposer = self.ctx.proposer.clone();
            // Never forwarded: a node that lost leadership must not pass its verdicts on.
            tokio::spawn(async move {
                match proposer.propose(cmd).await {
                    Ok(_) => {}
                    Err(Refusal::NotLeader(_)) => {
                        tracing::debug!("health transition dropped: no longer leader")
                    }
                    Err(Refusal::Failed(e)) => {
                        tracing::warn!("health transition not committed: {e}")
                    }
                }
            });
        }
    }
}

/// Probes one instance every interval until aborted.
async fn probe_loop(
    key: Key,
    address: String,
    spec: CheckSpec,
    slots: Arc<Semaphore>,
    results: mpsc::Sender<ProbeResult>,
) {
    let timeout = Duration::from_millis(spec.timeout_ms);
    let interval = Duration::from_millis(spec.interval_ms.max(1));
    let mut prober = match Prober::new(&address, &spec.kind, timeout) {
        Ok(Some(p)) => p,
        Ok(None) => return,
        Err(e) => {
            let _ = results
                .send(ProbeResult {
                    key,
                    result: Err(e),
                })
                .await;
            return;
        }
    };
    // Spread instances over the interval instead of probing them all at once.
    let mut h = DefaultHasher::new();
    key.hash(&mut h);
    tokio::time::sleep(Duration::from_millis(
        h.finish() % interval.as_millis().max(1) as u64,
    ))
    .await;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let result = {
            let Ok(_slot) = slots.acquire().await else {
                return;
            };
            tokio::time::timeout(timeout, prober.probe())
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {} ms", spec.timeout_ms)))
        };
        if results
            .send(ProbeResult {
                key: key.clone(),
                result,
            })
            .await
            .is_err()
        {
            return;
        }
    }
}
