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

#[cfg(test)]
mod tests {
    use futures::{FutureExt, StreamExt};

    use super::*;
    use crate::registry::model::EventKind;
    use crate::registry::Command;

    fn shared(history: usize) -> SharedState {
        Arc::new(RwLock::new(RegistryState {
            catalog: Catalog::default(),
            hub: WatchHub::new(0, history),
        }))
    }

    /// Applies `cmd` as the entry at `rev` and publishes its events, as the state machine does.
    fn apply(state: &SharedState, rev: u64, cmd: Command) {
        let mut st = state.write().expect("lock");
        let (_, events) = st.catalog.apply(rev, &cmd);
        if !events.is_empty() {
            st.hub.publish(rev, events);
        }
    }

    fn register(state: &SharedState, rev: u64, service: &str, id: &str) {
        apply(
            state,
            rev,
            Command::Register(Instance::example(service, id)),
        );
    }

    /// Replaces the state as a Raft snapshot install does.
    fn install(state: &SharedState, rev: u64, instances: Vec<Instance>) {
        let mut st = state.write().expect("lock");
        st.catalog = Catalog::from_parts(rev, instances, []);
        st.hub.reset(rev);
    }

    fn ids(instances: &[Instance]) -> Vec<&str> {
        let mut v: Vec<&str> = instances.iter().map(|i| i.id.as_str()).collect();
        v.sort_unstable();
        v
    }

    type Watch = std::pin::Pin<Box<dyn Stream<Item = WatchMessage> + Send>>;

    fn watch(state: &SharedState, service: Option<&str>, since: u64) -> Watch {
        Box::pin(watch_stream(
            state.clone(),
            service.map(String::from),
            since,
        ))
    }

    /// The next message, which must be ready now: everything here is published before polling.
    fn next(w: &mut Watch) -> WatchMessage {
        w.next()
            .now_or_never()
            .expect("a message is ready")
            .expect("stream open")
    }

    fn assert_idle(w: &mut Watch) {
        assert!(w.next().now_or_never().is_none(), "no message expected");
    }

    #[tokio::test]
    async fn resume_inside_history_sends_exactly_the_later_events() {
        let state = shared(100);
        for rev in 1..=10 {
            // Other services' changes are filtered out, not sent as empty messages.
            let service = if rev % 3 == 0 { "other" } else { "a" };
            register(&state, rev, service, &rev.to_string());
        }
        let mut w = watch(&state, Some("a"), 4);
        let mut revs = Vec::new();
        for rev in [5, 7, 8, 10] {
            let m = next(&mut w);
            assert_eq!(m.reset, None);
            assert_eq!(m.revision, rev);
            assert_eq!(m.events.len(), 1);
            assert_eq!(m.events[0].kind, EventKind::Put);
            assert_eq!(m.events[0].instance.id, rev.to_string());
            revs.push(m.revision);
        }
        assert_idle(&mut w);
        // Then live changes follow on, with nothing repeated.
        register(&state, 11, "a", "11");
        apply(
            &state,
            12,
            Command::Deregister {
                service: "a".into(),
                id: "5".into(),
            },
        );
        let m = next(&mut w);
        assert_eq!((m.revision, m.events[0].instance.id.as_str()), (11, "11"));
        let m = next(&mut w);
        assert_eq!(m.revision, 12);
        assert_eq!(m.events[0].kind, EventKind::Delete);
        assert_idle(&mut w);
    }

    #[tokio::test]
    async fn fresh_watch_gets_full_state_then_changes() {
        let state = shared(100);
        register(&state, 1, "a", "1");
        register(&state, 2, "b", "2");
        let mut w = watch(&state, None, 0);
        let m = next(&mut w);
        assert_eq!(m.reset, Some(ResetReason::Initial));
        assert_eq!(m.revision, 2);
        assert_eq!(ids(&m.instances), ["1", "2"]);
        assert_idle(&mut w);
        register(&state, 3, "a", "3");
        assert_eq!(next(&mut w).revision, 3);
    }

    #[tokio::test]
    async fn lagging_past_the_broadcast_resumes_from_history() {
        let total = BROADCAST_CAPACITY as u64 + 100;
        let state = shared(total as usize);
        register(&state, 1, "a", "1");
        let mut w = watch(&state, None, 0);
        assert_eq!(next(&mut w).reset, Some(ResetReason::Initial));
        // Published while the watcher is not polled: more than the broadcast holds.
        for rev in 2..=total {
            register(&state, rev, "a", &rev.to_string());
        }
        for rev in 2..=total {
            let m = next(&mut w);
            assert_eq!(m.reset, None, "at revision {rev}");
            assert_eq!(m.revision, rev);
            assert_eq!(m.events[0].instance.id, rev.to_string());
        }
        assert_idle(&mut w);
    }

    #[tokio::test]
    async fn lagging_past_the_history_resyncs_with_full_state() {
        let total = BROADCAST_CAPACITY as u64 + 100;
        let state = shared(10);
        register(&state, 1, "a", "1");
        let mut w = watch(&state, None, 0);
        assert_eq!(next(&mut w).reset, Some(ResetReason::Initial));
        for rev in 2..=total {
            register(&state, rev, "a", &(rev % 50).to_string());
        }
        let m = next(&mut w);
        assert_eq!(m.reset, Some(ResetReason::Compacted));
        assert_eq!(m.revision, total);
        assert_eq!(m.compact_revision, total - 10);
        assert_eq!(m.instances.len(), 50);
        assert_idle(&mut w);
        register(&state, total + 1, "a", "new");
        let m = next(&mut w);
        assert_eq!((m.reset, m.revision), (None, total + 1));
    }

    #[tokio::test]
    async fn resume_before_the_history_resyncs_with_full_state() {
        let state = shared(3);
        for rev in 1..=10 {
            register(&state, rev, "a", &rev.to_string());
        }
        // The history holds 8..=10: a watcher at 7 misses nothing.
        let mut w = watch(&state, None, 7);
        let revs: Vec<u64> = (0..3).map(|_| next(&mut w).revision).collect();
        assert_eq!(revs, [8, 9, 10]);
        assert_idle(&mut w);

        let mut w = watch(&state, Some("a"), 6);
        let m = next(&mut w);
        assert_eq!(m.reset, Some(ResetReason::Compacted));
        assert_eq!((m.revision, m.compact_revision), (10, 7));
        assert_eq!(m.instances.len(), 10);
        assert!(m.events.is_empty());
        assert_idle(&mut w);
    }

    #[tokio::test]
    async fn snapshot_install_resyncs_watchers_with_the_new_state() {
        let state = shared(100);
        register(&state, 1, "a", "old");
        let mut live = watch(&state, Some("a"), 0);
        assert_eq!(next(&mut live).reset, Some(ResetReason::Initial));
        register(&state, 2, "a", "old2");
        assert_eq!(next(&mut live).revision, 2);

        install(
            &state,
            20,
            vec![
                Instance::example("a", "new1"),
                Instance::example("a", "new2"),
                Instance::example("b", "x"),
            ],
        );
        let m = next(&mut live);
        assert_eq!(m.reset, Some(ResetReason::Compacted));
        assert_eq!((m.revision, m.compact_revision), (20, 20));
        assert_eq!(ids(&m.instances), ["new1", "new2"]);
        assert_idle(&mut live);

        // A watcher resuming from before the snapshot gets the new state too.
        let mut resumed = watch(&state, None, 2);
        let m = next(&mut resumed);
        assert_eq!(m.reset, Some(ResetReason::Compacted));
        assert_eq!(ids(&m.instances), ["new1", "new2", "x"]);

        // Changes after the snapshot reach both as events.
        register(&state, 21, "a", "new3");
        for w in [&mut live, &mut resumed] {
            let m = next(w);
            assert_eq!((m.reset, m.revision), (None, 21));
            assert_eq!(m.events[0].instance.id, "new3");
        }
    }
}
