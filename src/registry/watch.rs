//! Watch: one broadcast per applied change, fanned out to every watcher, with a
//! bounded history so a reconnecting watcher can resume where it left off.

use std::collections::VecDeque;
use std::sync::{Arc, RwLock};

use tokio::sync::{broadcast, mpsc};

use super::catalog::Catalog;
use super::model::{Event, Instance};

/// The events of one applied log entry.
#[derive(Debug)]
struct Change {
    pub revision: u64,
    pub events: Vec<Event>,
    /// The hub's floor when this change was published.
    compact_revision: u64,
}

#[derive(Clone, Debug)]
enum Notice {
    Change(Arc<Change>),
    /// History was discarded (a snapshot was installed): watchers must resync.
    Reset,
}

/// Live buffer per watcher before it counts as lagging and resumes from history.
const BROADCAST_CAPACITY: usize = 4096;

pub struct WatchHub {
    tx: broadcast::Sender<Notice>,
    history: VecDeque<Arc<Change>>,
    /// Every change after this revision is in `history`.
    floor: u64,
    capacity: usize,
}

impl WatchHub {
    pub fn new(floor: u64, capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(BROADCAST_CAPACITY);
        WatchHub {
            tx,
            history: VecDeque::new(),
            floor,
            capacity: capacity.max(1),
        }
    }

    pub fn publish(&mut self, revision: u64, events: Vec<Event>) {
        if self.history.len() == self.capacity {
            if let Some(old) = self.history.pop_front() {
                self.floor = old.revision;
            }
        }
        let change = Arc::new(Change {
            revision,
            events,
            compact_revision: self.floor,
        });
        self.history.push_back(change.clone());
        // No receivers is fine: nobody is watching.
        let _ = self.tx.send(Notice::Change(change));
    }

    pub fn reset(&mut self, revision: u64) {
        self.history.clear();
        self.floor = revision;
        let _ = self.tx.send(Notice::Reset);
    }

    pub fn floor(&self) -> u64 {
        self.floor
    }
}

/// The catalogue and its watch hub, behind one lock so that a watcher's initial
/// state and its subscription are taken atomically.
pub struct RegistryState {
    pub catalog: Catalog,
    pub hub: WatchHub,
}

pub type SharedState = Arc<RwLock<RegistryState>>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetReason {
    Initial,
    Compacted,
}

/// What a watcher is sent: either the full state (`reset` set) or the events of one revision.
#[derive(Clone, Debug, PartialEq)]
pub struct WatchMessage {
    pub revision: u64,
    pub reset: Option<ResetReason>,
    pub instances: Vec<Instance>,
    pub events: Vec<Event>,
    pub compact_revision: u64,
}

impl RegistryState {
    /// Messages that bring a watcher at `since` (0: nothing) up to date, and the
    /// subscription that carries on from there.
    fn resume(
        &self,
        service: Option<&str>,
        since: u64,
    ) -> (Vec<WatchMessage>, broadcast::Receiver<Notice>) {
        let rx = self.hub.tx.subscribe();
        let floor = self.hub.floor;
        let reset = if since == 0 {
            Some(ResetReason::Initial)
        } else if since < floor {
            Some(ResetReason::Compacted)
        } else {
            None
        };
        let msgs = match reset {
            Some(reason) => {
                let instances = match service {
                    Some(s) => self.catalog.instances_of(s).cloned().collect(),
                    None => self.catalog.all_instances().cloned().collect(),
                };
                vec![WatchMessage {
                    revision: self.catalog.revision(),
                    reset: Some(reason),
                    instances,
                    events: vec![],
                    compact_revision: floor,
                }]
            }
            None => self
                .hub
                .history
                .iter()
                .filter(|c| c.revision > since)
                .filter_map(|c| events_message(c, service))
                .collect(),
        };
        (msgs, rx)
    }
}

fn events_message(change: &Change, service: Option<&str>) -> Option<WatchMessage> {
    let events: Vec<Event> = change
        .events
        .iter()
        .filter(|e| service.is_none_or(|s| e.instance.service == s))
        .cloned()
        .collect();
    (!events.is_empty()).then(|| WatchMessage {
        revision: change.revision,
        reset: None,
        instances: vec![],
        events,
        compact_revision: change.compact_revision,
    })
}

/// Streams `service`'s changes (every service's when `None`) after `since` into
/// `out` until the receiving side goes away.
pub async fn run_watcher(
    state: SharedState,
    service: Option<String>,
    since: u64,
    out: mpsc::Sender<WatchMessage>,
) {
    let mut last = since;
    loop {
        let (msgs, mut rx) = match state.read() {
            Ok(st) => st.resume(service.as_deref(), last),
            Err(_) => return,
        };
        for m in msgs {
            last = m.revision;
            if out.send(m).await.is_err() {
                return;
            }
        }
        // Follow the live broadcast until it resets or we fall behind it; then resume from history.
        loop {
            let notice = tokio::select! {
                n = rx.recv() => n,
                _ = out.closed() => return,
            };
            match notice {
                Ok(Notice::Change(c)) if c.revision > last => {
                    let msg = events_message(&c, service.as_deref());
                    last = c.revision;
                    if let Some(m) = msg {
                        if out.send(m).await.is_err() {
                            return;
                        }
                    }
                }
                Ok(Notice::Change(_)) => {}
                Ok(Notice::Reset) | Err(broadcast::error::RecvError::Lagged(_)) => break,
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }
}
