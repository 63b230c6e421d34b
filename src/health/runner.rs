//! The leader's check loop. It follows the catalogue through a watch stream,
//! keeps one probe task per checked instance (bounded by a semaphore), feeds
//! results to `checks`, and proposes what `checks` finds due, once per tick.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::MissedTickBehavior;

use super::checks::{Checks, Key, ProbeChange};
use super::probe::Prober;
use super::sessions::Expiry;
use super::CheckContext;
use crate::raft::proposer::Refusal;
use crate::registry::leases::now_ms;
use crate::registry::model::CheckSpec;
use crate::registry::watch::{watch_stream, ResetReason, WatchMessage};
use crate::registry::Command;

/// How often transitions are collected and proposed.
const TICK: Duration = Duration::from_millis(100);

struct ProbeResult {
    key: Key,
    result: Result<String, String>,
}

/// The decisions (`Checks`) and the tasks that carry them out.
struct Runner {
    ctx: Arc<CheckContext>,
    checks: Checks,
    sessions: Expiry,
    probes: JoinSet<()>,
    running: HashMap<Key, AbortHandle>,
    slots: Arc<Semaphore>,
    results: mpsc::Sender<ProbeResult>,
}

/// Runs until aborted (leadership lost) or the catalogue stream ends.
pub async fn run(ctx: Arc<CheckContext>) {
    let (tx, mut rx) = mpsc::channel(4096);
    let Some(checked) = checked_instances(&ctx) else {
        return;
    };
    let mut watch = Box::pin(watch_stream(ctx.state.clone(), None, checked.revision));
    let mut r = Runner {
        slots: Arc::new(Semaphore::new(ctx.max_concurrent_probes.max(1))),
        checks: Checks::new(ctx.leases.clone(), Instant::now()),
        sessions: Expiry::new(ctx.leases.clone(), Instant::now()),
        ctx,
        probes: JoinSet::new(),
        running: HashMap::new(),
        results: tx,
    };
    r.follow(checked);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            m = watch.next() => match m {
                Some(u) => r.follow(u.message.clone()),
                None => return,
            },
            Some(p) = rx.recv() => r.checks.record(&p.key, p.result),
            _ = tick.tick() => r.tick(),
        }
    }
}

/// The instances with a check, as a full-state watch message; changes after
/// its revision come from the watch. Only these matter here, and a full-state
/// watch would copy the whole catalogue under the state lock just as this node
/// is elected, holding up its first writes (100-200 ms at 150,000 instances).
fn checked_instances(ctx: &CheckContext) -> Option<WatchMessage> {
    let st = ctx.state.read().ok()?;
    Some(WatchMessage {
        revision: st.catalog.revision(),
        reset: Some(ResetReason::Initial),
        instances: st
            .catalog
            .all_instances()
            .filter(|i| i.check.is_some())
            .cloned()
            .collect(),
        events: Vec::new(),
        compact_revision: 0,
    })
}

impl Runner {
    fn follow(&mut self, m: WatchMessage) {
        for change in self.checks.follow(m, Instant::now()) {
            match change {
                ProbeChange::Stop(key) => {
                    if let Some(p) = self.running.remove(&key) {
                        p.abort();
                    }
                }
                ProbeChange::Start { key, address, spec } => {
                    let (slots, results) = (self.slots.clone(), self.results.clone());
                    let probe =
                        self.probes
                            .spawn(probe_loop(key.clone(), address, spec, slots, results));
                    self.running.insert(key, probe);
                }
            }
        }
    }

    fn tick(&mut self) {
        while self.probes.try_join_next().is_some() {}
        let (now, wall) = (Instant::now(), now_ms());
        for cmd in self.checks.due(now, wall) {
            self.submit(cmd);
        }
        let ending = self.ctx.state.read().ok().and_then(|st| {
            let open = st.catalog.sessions().map(|s| (s.id.as_str(), s.ttl_ms));
            self.sessions.due(open, now, wall)
        });
        if let Some(cmd) = ending {
            self.submit(cmd);
        }
    }

    /// Proposes `cmd` in the background; the catalogue shows whether it applied.
    fn submit(&self, cmd: Command) {
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
