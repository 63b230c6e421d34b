//! Watch: one broadcast per applied change, fanned out to every watcher, with a
//! bounded history so a reconnecting watcher can resume where it left off.

use std::collections::VecDeque;
use std::sync::{Arc, RwLock};

use futures::Stream;
use tokio::sync::broadcast;

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

    /// Watch streams currently subscribed.
    pub fn watchers(&self) -> usize {
        self.tx.receiver_count()
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

/// A watcher: where it is and what it still has to send.
struct Watcher {
    state: SharedState,
    service: Option<String>,
    last: u64,
    pending: VecDeque<WatchMessage>,
    /// `None` until (re)subscribed: at start, after a reset or after lagging.
    rx: Option<broadcast::Receiver<Notice>>,
}

/// `service`'s changes (every service's when `None`) after `since` (0: from the
/// full state), for as long as the stream is polled. The stream is driven by
/// its consumer, so a watcher costs no task of its own.
pub fn watch_stream(
    state: SharedState,
    service: Option<String>,
    since: u64,
) -> impl Stream<Item = WatchMessage> + Send {
    let w = Watcher {
        state,
        service,
        last: since,
        pending: VecDeque::new(),
        rx: None,
    };
    futures::stream::unfold(w, |mut w| async move {
        loop {
            if let Some(m) = w.pending.pop_front() {
                w.last = m.revision;
                return Some((m, w));
            }
            let Some(rx) = w.rx.as_mut() else {
                let (msgs, rx) = w.state.read().ok()?.resume(w.service.as_deref(), w.last);
                w.pending.extend(msgs);
                w.rx = Some(rx);
                continue;
            };
            match rx.recv().await {
                Ok(Notice::Change(c)) if c.revision > w.last => {
                    w.last = c.revision;
                    if let Some(m) = events_message(&c, w.service.as_deref()) {
                        return Some((m, w));
                    }
                }
                Ok(Notice::Change(_)) => {}
                // Catch up from history under the lock, then follow the broadcast again.
                Ok(Notice::Reset) | Err(broadcast::error::RecvError::Lagged(_)) => w.rx = None,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
}
