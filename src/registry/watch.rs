//! Watch: one broadcast per applied change, fanned out to every watcher, with a
//! bounded history so a reconnecting watcher can resume where it left off.

use std::collections::{BTreeMap, HashMap, VecDeque};
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
    /// Events in `history`, bounded by `capacity`: an entry may carry
    /// hundreds (writes committed together), each a whole instance.
    held: usize,
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
            held: 0,
            floor,
            capacity: capacity.max(1),
        }
    }

    pub fn publish(&mut self, revision: u64, events: Vec<Event>) {
        // The newest change stays, however large.
        while self.held + events.len() > self.capacity {
            let Some(old) = self.history.pop_front() else {
                break;
            };
            self.held -= old.events.len();
            self.floor = old.revision;
        }
        self.held += events.len();
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
        self.held = 0;
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

/// A message for one of a watcher's keys: a service, or every service (`None`).
#[derive(Clone, Debug, PartialEq)]
pub struct Update {
    pub service: Option<String>,
    pub message: WatchMessage,
}

/// The keys a watcher follows, each with a revision: the key has every change
/// up to it, and only later changes are routed to it.
#[derive(Default)]
struct Keys {
    all: Option<u64>,
    services: HashMap<String, u64>,
}

impl Keys {
    fn is_empty(&self) -> bool {
        self.all.is_none() && self.services.is_empty()
    }

    fn insert(&mut self, key: Option<String>, at: u64) {
        match key {
            None => self.all = Some(at),
            Some(s) => {
                self.services.insert(s, at);
            }
        }
    }

    /// Queues `change`'s events for each key that does not have them yet.
    fn route(&self, change: &Change, out: &mut VecDeque<Update>) {
        let message = |events: Vec<Event>| WatchMessage {
            revision: change.revision,
            reset: None,
            instances: vec![],
            events,
            compact_revision: change.compact_revision,
        };
        if self.all.is_some_and(|at| change.revision > at) && !change.events.is_empty() {
            out.push_back(Update {
                service: None,
                message: message(change.events.clone()),
            });
        }
        if self.services.is_empty() {
            return;
        }
        // An entry usually touches one service; ordered so output is deterministic.
        let mut by_service: BTreeMap<&str, Vec<Event>> = BTreeMap::new();
        for e in &change.events {
            let s = e.instance.service.as_str();
            if self.services.get(s).is_some_and(|&at| change.revision > at) {
                by_service.entry(s).or_default().push(e.clone());
            }
        }
        out.extend(by_service.into_iter().map(|(s, events)| Update {
            service: Some(s.to_string()),
            message: message(events),
        }));
    }
}

impl RegistryState {
    /// Queues what brings each of `keys` from its revision up to the
    /// catalogue's, and records them in `into` at that revision. History is
    /// read once for all of them. Revision 0 asks for the full state when
    /// `added`; when resyncing a key it means the key has seen nothing yet.
    fn catch_up(&self, keys: Keys, added: bool, into: &mut Keys, out: &mut VecDeque<Update>) {
        let floor = self.hub.floor;
        let now = self.catalog.revision();
        let mut from_history = Keys::default();
        let wanted = keys
            .all
            .map(|at| (None, at))
            .into_iter()
            .chain(keys.services.into_iter().map(|(s, at)| (Some(s), at)));
        for (key, at) in wanted {
            let reset = if at == 0 && added {
                Some(ResetReason::Initial)
            } else if at < floor {
                Some(ResetReason::Compacted)
            } else {
                None
            };
            match reset {
                Some(reason) => out.push_back(Update {
                    message: WatchMessage {
                        revision: now,
                        reset: Some(reason),
                        instances: match &key {
                            Some(s) => self.catalog.instances_of(s).cloned().collect(),
                            None => self.catalog.all_instances().cloned().collect(),
                        },
                        events: vec![],
                        compact_revision: floor,
                    },
                    service: key.clone(),
                }),
                None => from_history.insert(key.clone(), at),
            }
            // A key resuming from a revision this node has not reached yet
            // (seen on a node further ahead) skips the changes up to it.
            into.insert(key, at.max(now));
        }
        if !from_history.is_empty() {
            for change in &self.hub.history {
                from_history.route(change, out);
            }
        }
    }
}

/// A watch stream's state: the keys it follows, and what it still has to send.
/// Many keys share one broadcast subscription.
pub struct Watcher {
    state: SharedState,
    keys: Keys,
    /// Revision of the last change taken from `rx`: every key has it.
    seen: u64,
    pending: VecDeque<Update>,
    /// `None` until (re)subscribed: before the first key, after a reset or after lagging.
    rx: Option<broadcast::Receiver<Notice>>,
}

/// The registry's state could not be read (a writer panicked).
#[derive(Debug, thiserror::Error)]
#[error("the registry state is unavailable")]
pub struct StateUnavailable;

impl Watcher {
    pub fn new(state: SharedState) -> Self {
        Watcher {
            state,
            keys: Keys::default(),
            seen: 0,
            pending: VecDeque::new(),
            rx: None,
        }
    }

    /// Number of keys followed.
    pub fn followed(&self) -> usize {
        usize::from(self.keys.all.is_some()) + self.keys.services.len()
    }

    pub fn follows(&self, service: &str) -> bool {
        self.keys.services.contains_key(service)
    }

    /// Starts following each key after its revision (0: from its full state);
    /// a key already followed starts again. One lock for all of them.
    pub fn add(
        &mut self,
        keys: impl IntoIterator<Item = (Option<String>, u64)>,
    ) -> Result<(), StateUnavailable> {
        let mut added = Keys::default();
        for (key, since) in keys {
            self.drop_pending(key.as_deref());
            added.insert(key, since);
        }
        let st = self.state.read().map_err(|_| StateUnavailable)?;
        if self.rx.is_none() {
            // Subscribe under the same lock as the catch-up: nothing falls between.
            self.rx = Some(st.hub.tx.subscribe());
        }
        st.catch_up(added, true, &mut self.keys, &mut self.pending);
        Ok(())
    }

    /// Stops following `key`, dropping what was queued for it.
    pub fn remove(&mut self, key: Option<&str>) {
        match key {
            None => self.keys.all = None,
            Some(s) => {
                self.keys.services.remove(s);
            }
        }
        self.drop_pending(key);
        if self.keys.is_empty() {
            // Nothing to follow: stop taking every change.
            self.rx = None;
        }
    }

    fn drop_pending(&mut self, key: Option<&str>) {
        self.pending.retain(|u| u.service.as_deref() != key);
    }

    /// The next message for any key; `None` once the registry is gone. Cancel
    /// safe: a message is taken from the broadcast only where it is then returned.
    pub async fn next(&mut self) -> Option<Update> {
        loop {
            if let Some(u) = self.pending.pop_front() {
                return Some(u);
            }
            // A burst (many adds, a resync) leaves a large queue behind; a
            // watcher lives long, so give the room back.
            if self.pending.capacity() > 64 {
                self.pending.shrink_to_fit();
            }
            let Some(rx) = self.rx.as_mut() else {
                if self.keys.is_empty() {
                    return std::future::pending().await;
                }
                // Catch every key up from where it stands, under the lock,
                // then follow the broadcast again.
                let seen = self.seen;
                let mut stale = std::mem::take(&mut self.keys);
                stale.all = stale.all.map(|at| at.max(seen));
                stale
                    .services
                    .values_mut()
                    .for_each(|at| *at = (*at).max(seen));
                let st = self.state.read().ok()?;
                self.rx = Some(st.hub.tx.subscribe());
                st.catch_up(stale, false, &mut self.keys, &mut self.pending);
                continue;
            };
            match rx.recv().await {
                Ok(Notice::Change(c)) => {
                    self.seen = self.seen.max(c.revision);
                    self.keys.route(&c, &mut self.pending);
                }
                Ok(Notice::Reset) | Err(broadcast::error::RecvError::Lagged(_)) => self.rx = None,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

/// `service`'s changes (every service's when `None`) after `since` (0: from the
/// full state), for as long as the stream is polled. The stream is driven by
/// its consumer, so a watcher costs no task of its own.
pub fn watch_stream(
    state: SharedState,
    service: Option<String>,
    since: u64,
) -> impl Stream<Item = WatchMessage> + Send {
    let mut w = Watcher::new(state);
    let started = w.add([(service, since)]).is_ok();
    futures::stream::unfold(w, move |mut w| async move {
        if !started {
            return None;
        }
        let u = w.next().await?;
        Some((u.message, w))
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

    /// Drains the updates that are ready now, as (service, revision, instance ids).
    fn ready(w: &mut Watcher) -> Vec<(String, u64, Vec<String>)> {
        let mut out = Vec::new();
        while let Some(Some(u)) = w.next().now_or_never() {
            let ids = if u.message.reset.is_some() {
                ids(&u.message.instances)
                    .into_iter()
                    .map(String::from)
                    .collect()
            } else {
                u.message
                    .events
                    .iter()
                    .map(|e| e.instance.id.clone())
                    .collect()
            };
            out.push((u.service.unwrap_or_default(), u.message.revision, ids));
        }
        out
    }

    fn key(s: &str, since: u64) -> (Option<String>, u64) {
        (Some(s.to_string()), since)
    }

    fn row(s: &str, rev: u64, ids: &[&str]) -> (String, u64, Vec<String>) {
        (
            s.to_string(),
            rev,
            ids.iter().map(|i| i.to_string()).collect(),
        )
    }

    #[tokio::test]
    async fn one_watcher_follows_many_services_each_from_its_own_start() {
        let state = shared(100);
        register(&state, 1, "a", "a1");
        register(&state, 2, "b", "b1");
        register(&state, 3, "c", "c1");
        let mut w = Watcher::new(state.clone());
        // a from its full state, b resumed after revision 1 (so b1 comes as an event).
        w.add([key("a", 0), key("b", 1)]).expect("add");
        let mut first = ready(&mut w);
        first.sort();
        assert_eq!(first, [row("a", 3, &["a1"]), row("b", 2, &["b1"])]);
        // Published before c is added but not yet taken from the broadcast:
        // c's full state covers it, so c is not sent it again.
        register(&state, 4, "c", "c2");
        w.add([key("c", 0)]).expect("add c");
        register(&state, 5, "c", "c3");
        register(&state, 6, "other", "x");
        assert_eq!(
            ready(&mut w),
            [row("c", 4, &["c1", "c2"]), row("c", 5, &["c3"])]
        );
        // One entry touching two watched services reaches each at that revision.
        let status = crate::registry::model::HealthStatus::Critical;
        let update = |service: &str, id: &str| crate::registry::model::HealthUpdate {
            service: service.into(),
            id: id.into(),
            status,
            output: String::new(),
            at_ms: 1,
        };
        apply(
            &state,
            7,
            Command::SetHealth(vec![
                update("a", "a1"),
                update("c", "c1"),
                update("other", "x"),
            ]),
        );
        assert_eq!(ready(&mut w), [row("a", 7, &["a1"]), row("c", 7, &["c1"])]);
        assert_eq!(w.followed(), 3);
    }

    #[tokio::test]
    async fn removing_a_service_drops_its_queued_messages_and_readding_restarts_it() {
        let state = shared(100);
        register(&state, 1, "a", "a1");
        let mut w = Watcher::new(state.clone());
        w.add([key("a", 0), key("b", 0)]).expect("add");
        register(&state, 2, "a", "a2");
        w.remove(Some("a"));
        register(&state, 3, "a", "a3");
        register(&state, 4, "b", "b1");
        assert_eq!(ready(&mut w), [row("b", 1, &[]), row("b", 4, &["b1"])]);
        w.add([key("a", 2)]).expect("re-add");
        assert_eq!(ready(&mut w), [row("a", 3, &["a3"])]);
        // With nothing followed the watcher waits, and takes up again on an add.
        w.remove(Some("a"));
        w.remove(Some("b"));
        assert_eq!(w.followed(), 0);
        register(&state, 5, "b", "b2");
        assert_idle_watcher(&mut w);
        w.add([key("b", 4)]).expect("add b");
        assert_eq!(ready(&mut w), [row("b", 5, &["b2"])]);
    }

    fn assert_idle_watcher(w: &mut Watcher) {
        assert!(w.next().now_or_never().is_none(), "no update expected");
    }

    #[tokio::test]
    async fn a_lagging_watcher_resumes_every_service_from_where_it_stood() {
        let total = BROADCAST_CAPACITY as u64 + 100;
        let state = shared(total as usize + 10);
        let mut w = Watcher::new(state.clone());
        w.add([key("a", 0), key("b", 0)]).expect("add");
        assert_eq!(ready(&mut w).len(), 2);
        for rev in 1..=total {
            let service = if rev % 2 == 0 { "a" } else { "b" };
            register(&state, rev, service, &rev.to_string());
        }
        let got = ready(&mut w);
        assert_eq!(
            got.len() as u64,
            total,
            "every change once, none as a reset"
        );
        for (i, (service, rev, ids)) in got.into_iter().enumerate() {
            assert_eq!(rev, i as u64 + 1);
            assert_eq!(service, if rev % 2 == 0 { "a" } else { "b" });
            assert_eq!(ids, [rev.to_string()]);
        }
    }

    #[tokio::test]
    async fn history_is_bounded_by_events_not_entries() {
        let state = shared(5);
        use crate::registry::model::HealthStatus;
        let batch = |ids: &[&str], status: HealthStatus| {
            Command::SetHealth(
                ids.iter()
                    .map(|id| crate::registry::model::HealthUpdate {
                        service: "a".into(),
                        id: id.to_string(),
                        status,
                        output: String::new(),
                        at_ms: 1,
                    })
                    .collect(),
            )
        };
        for (rev, id) in (1..=3).zip(["1", "2", "3"]) {
            register(&state, rev, "a", id);
        }
        // Three events in one entry: with the three before, over the five
        // kept, so the oldest entry goes.
        apply(&state, 4, batch(&["1", "2", "3"], HealthStatus::Critical));
        let mut w = watch(&state, Some("a"), 1);
        let got: Vec<(u64, u64)> = (0..3)
            .map(|_| next(&mut w))
            .map(|m| (m.revision, m.compact_revision))
            .collect();
        assert_eq!(got, [(2, 0), (3, 0), (4, 1)]);
        // An entry larger than the whole history is kept alone.
        apply(&state, 5, batch(&["1", "2", "3"], HealthStatus::Passing));
        register(&state, 6, "a", "4");
        register(&state, 7, "a", "5");
        register(&state, 8, "a", "6");
        let mut w = watch(&state, Some("a"), 5);
        let revs: Vec<u64> = (0..3).map(|_| next(&mut w).revision).collect();
        assert_eq!(revs, [6, 7, 8]);
        let mut w = watch(&state, Some("a"), 4);
        let m = next(&mut w);
        assert_eq!(
            (m.reset, m.compact_revision),
            (Some(ResetReason::Compacted), 5)
        );
    }
}
