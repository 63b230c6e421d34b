//! Watch: each applied change is routed once to the watch streams that follow
//! its services, with a bounded history so a reconnecting watcher can resume
//! where it left off.
//!
//! Delivery costs per change, not per watcher: the hub groups a change's
//! events by service once, makes one shared [`Update`] per service (which a
//! front-end encodes once, [`Update::rendered`]), and puts a pointer to it in
//! the bounded inbox of every stream following that service. A stream that
//! falls a whole inbox behind receives nothing more until it reads again, and
//! then catches each of its keys up from history (or from the full state,
//! past it): a slow stream never holds up the others.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::task::{ready, Context, Poll, Waker};

use bytes::Bytes;
use futures::Stream;

use super::catalog::Catalog;
use super::model::{Event, Instance};

/// The events of one applied log entry.
#[derive(Debug)]
struct Change {
    revision: u64,
    events: Vec<Event>,
    /// The hub's floor when this change was published.
    compact_revision: u64,
}

impl Change {
    fn message(&self, events: Vec<Event>) -> WatchMessage {
        WatchMessage {
            revision: self.revision,
            reset: None,
            instances: vec![],
            events,
            compact_revision: self.compact_revision,
        }
    }

    /// The change's events by service, for the services `key_of` names (by
    /// the follower's own shared name): an entry usually touches one;
    /// ordered so output is deterministic.
    fn by_service<'k>(
        &self,
        key_of: impl Fn(&str) -> Option<&'k Arc<str>>,
    ) -> BTreeMap<&'k Arc<str>, Vec<Event>> {
        let mut by_service: BTreeMap<&Arc<str>, Vec<Event>> = BTreeMap::new();
        for e in &self.events {
            if let Some(key) = key_of(&e.instance.service) {
                by_service.entry(key).or_default().push(e.clone());
            }
        }
        by_service
    }
}

/// Messages a stream's inbox holds before the stream counts as behind: it
/// then receives nothing until it catches up from history.
const INBOX_CAPACITY: usize = 1024;

/// Where the hub puts a stream's messages, and how it wakes the stream.
struct Inbox {
    /// The stream's id in the hub's subscriber lists.
    id: u64,
    queue: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    messages: VecDeque<Arc<Update>>,
    /// Set when the stream must catch up from history before reading on (its
    /// inbox overflowed, or history was replaced): every message up to this
    /// revision was queued.
    behind: Option<u64>,
    /// The node is stopping: the stream ends once it has read what is queued.
    closed: bool,
    /// The stream's task, while it waits.
    waker: Option<Waker>,
}

enum Taken {
    Message(Arc<Update>),
    Behind(u64),
}

impl Inbox {
    fn new() -> Arc<Inbox> {
        Arc::new(Inbox {
            id: NEXT_STREAM.fetch_add(1, Ordering::Relaxed),
            queue: Mutex::default(),
        })
    }

    /// Changes the queue with `f` and, if it says so, wakes the stream
    /// (outside the lock).
    fn update(&self, f: impl FnOnce(&mut Queue) -> bool) {
        let waker = match self.queue.lock() {
            Ok(mut q) => f(&mut q).then(|| q.waker.take()).flatten(),
            Err(_) => None,
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    fn push(&self, u: &Arc<Update>) {
        self.update(|q| {
            if q.behind.is_some() || q.closed {
                return false;
            }
            if q.messages.len() < INBOX_CAPACITY {
                q.messages.push_back(u.clone());
            } else {
                q.behind = Some(u.message.revision.saturating_sub(1));
            }
            true
        });
    }

    /// History was replaced: nothing later can be assumed queued.
    fn invalidate(&self) {
        self.update(|q| {
            q.behind = Some(0);
            true
        });
    }

    fn close(&self) {
        self.update(|q| {
            q.closed = true;
            true
        });
    }

    /// The next message, or that the stream is behind; `None` once closed
    /// (or if a pusher panicked). Taken only when returned.
    fn poll_take(&self, cx: &mut Context<'_>) -> Poll<Option<Taken>> {
        let Ok(mut q) = self.queue.lock() else {
            return Poll::Ready(None);
        };
        if let Some(m) = q.messages.pop_front() {
            return Poll::Ready(Some(Taken::Message(m)));
        }
        if let Some(through) = q.behind.take() {
            return Poll::Ready(Some(Taken::Behind(through)));
        }
        if q.closed {
            return Poll::Ready(None);
        }
        // A burst leaves a large queue behind; a stream lives long.
        if q.messages.capacity() > 64 {
            q.messages.shrink_to_fit();
        }
        if !q.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            q.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}

/// The streams following one service: most often one (a service one
/// process follows), which then needs no map of its own.
enum Followers {
    One(Arc<Inbox>),
    /// Boxed, so that the common case (one per service, and a hub entry
    /// per watched service) stays small.
    #[allow(clippy::box_collection)]
    Many(Box<HashMap<u64, Arc<Inbox>>>),
}

impl Followers {
    /// Adds `inbox`'s stream; false if it was there.
    fn insert(&mut self, inbox: &Arc<Inbox>) -> bool {
        match self {
            Followers::One(one) if one.id == inbox.id => false,
            Followers::One(one) => {
                let many = HashMap::from([(one.id, one.clone()), (inbox.id, inbox.clone())]);
                *self = Followers::Many(Box::new(many));
                true
            }
            Followers::Many(m) => m.insert(inbox.id, inbox.clone()).is_none(),
        }
    }

    /// Removes stream `id`; whether it was there, and whether any is left.
    fn remove(&mut self, id: u64) -> (bool, bool) {
        match self {
            Followers::One(one) => (one.id == id, one.id != id),
            Followers::Many(m) => (m.remove(&id).is_some(), !m.is_empty()),
        }
    }

    fn push(&self, u: &Arc<Update>) {
        match self {
            Followers::One(inbox) => inbox.push(u),
            Followers::Many(m) => m.values().for_each(|inbox| inbox.push(u)),
        }
    }
}

/// The streams following each key, by stream id.
#[derive(Default)]
struct Subscribers {
    all: HashMap<u64, Arc<Inbox>>,
    /// The key is the first follower's own (`Keys`): one string per service.
    services: HashMap<Arc<str>, Followers>,
    /// Every stream, with the number of keys it follows.
    streams: HashMap<u64, (Arc<Inbox>, usize)>,
    closed: bool,
}

impl Subscribers {
    fn join(&mut self, inbox: &Arc<Inbox>) {
        if self.closed {
            inbox.close();
        }
        self.streams.insert(inbox.id, (inbox.clone(), 0));
    }

    fn leave(&mut self, id: u64, keys: &Keys) {
        keys.iter()
            .for_each(|key| self.unfollow(id, key.map(|s| &**s)));
        self.streams.remove(&id);
    }

    fn follow(&mut self, inbox: &Arc<Inbox>, key: Option<&Arc<str>>) {
        let fresh = match key {
            None => self.all.insert(inbox.id, inbox.clone()).is_none(),
            Some(s) => match self.services.get_mut(&**s) {
                Some(f) => f.insert(inbox),
                None => {
                    self.services
                        .insert(s.clone(), Followers::One(inbox.clone()));
                    true
                }
            },
        };
        if let Some((_, n)) = self.streams.get_mut(&inbox.id).filter(|_| fresh) {
            *n += 1;
        }
    }

    fn unfollow(&mut self, id: u64, key: Option<&str>) {
        let gone = match key {
            None => self.all.remove(&id).is_some(),
            Some(s) => match self.services.get_mut(s) {
                Some(f) => {
                    let (gone, left) = f.remove(id);
                    if !left {
                        self.services.remove(s);
                    }
                    gone
                }
                None => false,
            },
        };
        if let Some((_, n)) = self.streams.get_mut(&id).filter(|_| gone) {
            *n -= 1;
        }
    }
}

pub struct WatchHub {
    subscribers: Mutex<Subscribers>,
    history: VecDeque<Change>,
    /// Events in `history`, bounded by `capacity`: an entry may carry
    /// hundreds (writes committed together), each a whole instance.
    held: usize,
    /// Every change after this revision is in `history`.
    floor: u64,
    capacity: usize,
}

impl WatchHub {
    pub fn new(floor: u64, capacity: usize) -> Self {
        WatchHub {
            subscribers: Mutex::default(),
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
        let change = Change {
            revision,
            events,
            compact_revision: self.floor,
        };
        self.deliver(&change);
        self.history.push_back(change);
    }

    /// Puts `change` in the inbox of every stream that follows it: one shared
    /// message per service, and one for the streams following every service.
    fn deliver(&self, change: &Change) {
        let Some(subs) = self.subscribers() else {
            return;
        };
        if !subs.all.is_empty() && !change.events.is_empty() {
            let u = Update::new(None, change.message(change.events.clone()));
            subs.all.values().for_each(|inbox| inbox.push(&u));
        }
        if subs.services.is_empty() {
            return;
        }
        for (s, events) in change.by_service(|s| subs.services.get_key_value(s).map(|(k, _)| k)) {
            let u = Update::new(Some(s.clone()), change.message(events));
            if let Some(followers) = subs.services.get(&**s) {
                followers.push(&u);
            }
        }
    }

    pub fn reset(&mut self, revision: u64) {
        self.history.clear();
        self.held = 0;
        self.floor = revision;
        if let Some(subs) = self.subscribers() {
            subs.streams
                .values()
                .for_each(|(inbox, _)| inbox.invalidate());
        }
    }

    /// Watch streams currently following something.
    pub fn watchers(&self) -> usize {
        self.subscribers()
            .map_or(0, |s| s.streams.values().filter(|(_, n)| *n > 0).count())
    }

    /// The node is stopping: every watch stream ends (its client resumes on
    /// another node), and so does any opened from now on.
    pub fn close(&self) {
        if let Some(mut subs) = self.subscribers() {
            subs.closed = true;
            subs.streams.values().for_each(|(inbox, _)| inbox.close());
        }
    }

    fn subscribers(&self) -> Option<std::sync::MutexGuard<'_, Subscribers>> {
        self.subscribers.lock().ok()
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

/// A message for one of a watcher's keys: a service, or every service
/// (`None`). Every stream following the key receives the same one.
#[derive(Debug)]
pub struct Update {
    pub service: Option<Arc<str>>,
    pub message: WatchMessage,
    rendered: OnceLock<Bytes>,
}

impl Update {
    fn new(service: Option<Arc<str>>, message: WatchMessage) -> Arc<Update> {
        Arc::new(Update {
            service,
            message,
            rendered: OnceLock::new(),
        })
    }

    /// The message as a front-end encodes it: made by the first stream that
    /// sends it, shared by the others.
    pub fn rendered(&self, render: impl FnOnce(&WatchMessage) -> Bytes) -> &Bytes {
        self.rendered.get_or_init(|| render(&self.message))
    }
}

/// The keys a watcher follows, each with a revision: the key has every change
/// up to it, and only later changes are given to it.
#[derive(Default)]
struct Keys {
    all: Option<u64>,
    services: HashMap<Arc<str>, u64>,
}

impl Keys {
    fn is_empty(&self) -> bool {
        self.all.is_none() && self.services.is_empty()
    }

    fn insert(&mut self, key: Option<Arc<str>>, at: u64) {
        match key {
            None => self.all = Some(at),
            Some(s) => {
                self.services.insert(s, at);
            }
        }
    }

    fn at(&mut self, key: Option<&str>) -> Option<&mut u64> {
        match key {
            None => self.all.as_mut(),
            Some(s) => self.services.get_mut(s),
        }
    }

    fn iter(&self) -> impl Iterator<Item = Option<&Arc<str>>> {
        let all = self.all.map(|_| None);
        all.into_iter().chain(self.services.keys().map(Some))
    }

    /// Queues `change`'s events for each key that does not have them yet.
    fn route(&self, change: &Change, out: &mut VecDeque<Arc<Update>>) {
        let wants = |at: u64| change.revision > at;
        if self.all.is_some_and(wants) && !change.events.is_empty() {
            out.push_back(Update::new(None, change.message(change.events.clone())));
        }
        if self.services.is_empty() {
            return;
        }
        let by_service = change.by_service(|s| {
            let (key, &at) = self.services.get_key_value(s)?;
            wants(at).then_some(key)
        });
        out.extend(
            by_service
                .into_iter()
                .map(|(s, events)| Update::new(Some(s.clone()), change.message(events))),
        );
    }
}

impl RegistryState {
    /// Queues what brings each of `keys` from its revision up to the
    /// catalogue's, and records them in `into` at that revision. History is
    /// read once for all of them. Revision 0 asks for the full state when
    /// `added`; when resyncing a key it means the key has seen nothing yet.
    fn catch_up(&self, keys: Keys, added: bool, into: &mut Keys, out: &mut VecDeque<Arc<Update>>) {
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
                Some(reason) => out.push_back(Update::new(
                    key.clone(),
                    WatchMessage {
                        revision: now,
                        reset: Some(reason),
                        instances: match &key {
                            Some(s) => self.catalog.instances_of(s).cloned().collect(),
                            None => self.catalog.all_instances().cloned().collect(),
                        },
                        events: vec![],
                        compact_revision: floor,
                    },
                )),
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

/// A stream's ids in the hub's subscriber lists.
static NEXT_STREAM: AtomicU64 = AtomicU64::new(1);

/// A watch stream's state: the keys it follows, and what it still has to send.
/// Many keys share one inbox.
pub struct Watcher {
    state: SharedState,
    inbox: Arc<Inbox>,
    keys: Keys,
    /// Catch-up messages, sent before anything from the inbox.
    pending: VecDeque<Arc<Update>>,
}

/// The registry's state could not be read (a writer panicked).
#[derive(Debug, thiserror::Error)]
#[error("the registry state is unavailable")]
pub struct StateUnavailable;

impl Watcher {
    pub fn new(state: SharedState) -> Self {
        let w = Watcher {
            state,
            inbox: Inbox::new(),
            keys: Keys::default(),
            pending: VecDeque::new(),
        };
        // Joined from the start, so that a stopping node ends it even
        // before it follows anything.
        match w.state.read() {
            Ok(st) => {
                if let Some(mut subs) = st.hub.subscribers() {
                    subs.join(&w.inbox);
                }
            }
            Err(_) => w.inbox.close(),
        }
        w
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
            added.insert(key.map(Arc::from), since);
        }
        let st = self.state.read().map_err(|_| StateUnavailable)?;
        // Subscribe under the same lock as the catch-up: nothing falls
        // between, and what is in both is sent once (`next` skips it).
        let mut subs = st.hub.subscribers().ok_or(StateUnavailable)?;
        added.iter().for_each(|key| subs.follow(&self.inbox, key));
        drop(subs);
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
        if let Ok(st) = self.state.read() {
            if let Some(mut subs) = st.hub.subscribers() {
                subs.unfollow(self.inbox.id, key);
            }
        }
    }

    fn drop_pending(&mut self, key: Option<&str>) {
        self.pending.retain(|u| u.service.as_deref() != key);
    }

    /// The next message for any key; `None` once the registry is gone.
    /// Cancel safe.
    pub async fn next(&mut self) -> Option<Arc<Update>> {
        poll_fn(|cx| self.poll_next_update(cx)).await
    }

    /// `next` as a poll: a watch stream is polled straight through, with no
    /// future of its own in between.
    pub fn poll_next_update(&mut self, cx: &mut Context<'_>) -> Poll<Option<Arc<Update>>> {
        loop {
            if let Some(u) = self.pending.pop_front() {
                return Poll::Ready(Some(u));
            }
            if self.pending.capacity() > 64 {
                self.pending.shrink_to_fit();
            }
            match ready!(self.inbox.poll_take(cx)) {
                None => return Poll::Ready(None),
                Some(Taken::Message(u)) => {
                    // Skips what a key already has: a message queued before
                    // the key was (re)added or caught up.
                    if let Some(at) = self.keys.at(u.service.as_deref()) {
                        if u.message.revision > *at {
                            *at = u.message.revision;
                            return Poll::Ready(Some(u));
                        }
                    }
                }
                Some(Taken::Behind(through)) => {
                    // Catch every key up from where it stands, under the lock.
                    let Ok(st) = self.state.read() else {
                        return Poll::Ready(None);
                    };
                    let mut stale = std::mem::take(&mut self.keys);
                    stale.all = stale.all.map(|at| at.max(through));
                    stale
                        .services
                        .values_mut()
                        .for_each(|at| *at = (*at).max(through));
                    st.catch_up(stale, false, &mut self.keys, &mut self.pending);
                }
            }
        }
    }
}

impl Stream for Watcher {
    type Item = Arc<Update>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Arc<Update>>> {
        self.get_mut().poll_next_update(cx)
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        if let Ok(st) = self.state.read() {
            if let Some(mut subs) = st.hub.subscribers() {
                subs.leave(self.inbox.id, &self.keys);
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
) -> impl Stream<Item = Arc<Update>> + Send {
    let mut w = Watcher::new(state);
    if w.add([(service, since)]).is_err() {
        // The state is gone: the stream ends at once.
        w.inbox.close();
    }
    w
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
        Box::pin(
            watch_stream(state.clone(), service.map(String::from), since)
                .map(|u| u.message.clone()),
        )
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
    async fn overflowing_the_inbox_resumes_from_history() {
        let total = INBOX_CAPACITY as u64 + 100;
        let state = shared(total as usize);
        register(&state, 1, "a", "1");
        let mut w = watch(&state, None, 0);
        assert_eq!(next(&mut w).reset, Some(ResetReason::Initial));
        // Published while the watcher is not polled: more than its inbox holds.
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
        let total = INBOX_CAPACITY as u64 + 100;
        let state = shared(10);
        register(&state, 1, "a", "1");
        let mut w = watch(&state, None, 0);
        assert_eq!(next(&mut w).reset, Some(ResetReason::Initial));
        for rev in 2..=total {
            register(&state, rev, "a", &(rev % 50).to_string());
        }
        // What the inbox held comes first, in order; then the state, as the
        // changes after it are gone from history.
        for rev in 2..=INBOX_CAPACITY as u64 + 1 {
            let m = next(&mut w);
            assert_eq!((m.reset, m.revision), (None, rev));
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
            out.push((
                u.service.as_deref().unwrap_or_default().to_string(),
                u.message.revision,
                ids,
            ));
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
        let total = INBOX_CAPACITY as u64 + 100;
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

    #[tokio::test]
    async fn a_change_is_routed_once_and_encoded_once_for_every_watcher_of_a_service() {
        let state = shared(100);
        let mut watchers: Vec<Watcher> = (0..3).map(|_| Watcher::new(state.clone())).collect();
        for w in &mut watchers {
            w.add([key("a", 0)]).expect("add");
            assert_eq!(ready(w).len(), 1, "the initial state");
        }
        let mut other = Watcher::new(state.clone());
        other.add([key("b", 0)]).expect("add b");
        ready(&mut other);
        register(&state, 1, "a", "a1");
        let got: Vec<Arc<Update>> = watchers
            .iter_mut()
            .map(|w| w.next().now_or_never().flatten().expect("a message"))
            .collect();
        assert!(
            got.iter().all(|u| Arc::ptr_eq(u, &got[0])),
            "one shared message"
        );
        let mut renders = 0;
        for u in &got {
            let bytes = u.rendered(|m| {
                renders += 1;
                Bytes::from(m.revision.to_string())
            });
            assert_eq!(bytes, &"1");
        }
        assert_eq!(renders, 1, "encoded by the first stream only");
        assert_idle_watcher(&mut other);
    }

    #[tokio::test]
    async fn a_slow_watcher_does_not_hold_up_others_and_leaves_the_hub_when_dropped() {
        let total = 3 * INBOX_CAPACITY as u64;
        let state = shared(total as usize);
        let mut fast = Watcher::new(state.clone());
        let mut slow = Watcher::new(state.clone());
        fast.add([key("a", 0)]).expect("add");
        slow.add([key("a", 0)]).expect("add");
        ready(&mut fast);
        assert_eq!(state.read().expect("lock").hub.watchers(), 2);
        for rev in 1..=total {
            register(&state, rev, "a", &rev.to_string());
            // The fast one reads as changes come; the slow one never does.
            let u = fast
                .next()
                .now_or_never()
                .flatten()
                .expect("delivered at once");
            assert_eq!(u.message.revision, rev);
        }
        // The slow one's inbox stopped at its bound; it gets every change
        // in order once it reads, the rest from history.
        let got = ready(&mut slow);
        assert_eq!(got.len() as u64, total + 1);
        assert!(got[1..].iter().zip(1..).all(|(r, rev)| r.1 == rev));
        drop(slow);
        assert_eq!(state.read().expect("lock").hub.watchers(), 1);
        fast.remove(Some("a"));
        assert_eq!(state.read().expect("lock").hub.watchers(), 0);
    }

    #[tokio::test]
    async fn closing_the_hub_ends_every_stream_after_what_it_queued() {
        let state = shared(100);
        let mut following = Watcher::new(state.clone());
        following.add([key("a", 0)]).expect("add");
        let mut idle = Watcher::new(state.clone());
        register(&state, 1, "a", "a1");
        state.read().expect("lock").hub.close();
        assert_eq!(ready(&mut following).len(), 2, "the initial state, then a1");
        assert!(matches!(following.next().now_or_never(), Some(None)));
        assert!(
            matches!(idle.next().now_or_never(), Some(None)),
            "even following nothing"
        );
        let mut late = Watcher::new(state.clone());
        assert!(
            matches!(late.next().now_or_never(), Some(None)),
            "opened after the close"
        );
    }
}
