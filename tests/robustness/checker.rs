//! Checks a recorded history of registry operations and watch streams.
//!
//! Linearizability is checked per key (one instance: service + id) with the
//! Wing-Gong algorithm and Lowe's memoization, as porcupine does: the calls and
//! returns of one key's operations form a time-ordered list; a depth-first
//! search tries, at each step, to linearize an operation whose call precedes
//! every pending return, and backtracks when a return is reached whose
//! operation is not linearized yet. A cache of (set of linearized operations,
//! model state) cuts revisits. Operations with an unknown outcome (timeout,
//! UNAVAILABLE, lost connection) never return: they may be linearized at any
//! point after their call, or last of all, which is the same as never applied.
//!
//! Reads of a whole service are projected onto its keys before checking: a
//! linearizable history stays linearizable under projection, so a violation
//! found on a key is a real one (cross-key anomalies can go unseen).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

/// Nanoseconds since the start of the run.
pub type Time = u64;
/// Completion time of an operation whose outcome is unknown.
pub const OPEN: Time = Time::MAX;

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub service: String,
    pub id: String,
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.service, self.id)
    }
}

/// Every registration writes a value (a write id) no other write uses, so a
/// read tells which write it saw.
pub type Value = u64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Input {
    /// Register (create or replace) with this value.
    Put(Value),
    /// Deregister.
    Delete,
    /// Linearizable read: the key's value, or absent.
    Get,
    /// Heartbeat: whether the instance exists (served by the leader's local state).
    Exists,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// Acknowledged; for `Exists`: present.
    Ok,
    /// NOT_FOUND: the key was absent.
    NotFound,
    /// What a `Get` returned.
    Value(Option<Value>),
    /// The operation may or may not have taken effect.
    Unknown,
}

#[derive(Clone, Debug)]
pub struct Op {
    pub client: usize,
    pub key: Key,
    pub input: Input,
    pub output: Output,
    pub call: Time,
    /// `OPEN` when the outcome is unknown.
    pub ret: Time,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |t: Time| t as f64 / 1e6;
        let ret = if self.ret == OPEN {
            "open".to_string()
        } else {
            format!("{:.3}", ms(self.ret))
        };
        write!(
            f,
            "[{:>10.3} .. {:>10}] client {:>2} {:<16} {:?} -> {:?}",
            ms(self.call),
            ret,
            self.client,
            self.key.to_string(),
            self.input,
            self.output
        )
    }
}

type State = Option<Value>;

/// The model of one key: the state after `input` answered `output`, or `None`
/// if that answer is impossible in `s`.
fn step(s: State, input: Input, output: Output) -> Option<State> {
    match (input, output) {
        (Input::Put(v), Output::Ok | Output::Unknown) => Some(Some(v)),
        (Input::Delete, Output::Ok) => s.map(|_| None),
        (Input::Delete, Output::NotFound) => s.is_none().then_some(None),
        (Input::Delete, Output::Unknown) => Some(None),
        (Input::Get, Output::Value(v)) => (v == s).then_some(s),
        (Input::Exists, Output::Ok) => s.is_some().then_some(s),
        (Input::Exists, Output::NotFound) => s.is_none().then_some(s),
        _ => None,
    }
}

#[derive(Clone, Copy)]
struct Entry {
    op: usize,
    call: bool,
    /// Index of the matching return entry (calls only).
    partner: usize,
}

/// Whether one key's operations are linearizable from an absent key.
pub fn linearizable(ops: &[Op]) -> bool {
    linearizable_within(ops, u64::MAX) != Some(false)
}

/// As `linearizable`, giving up (`None`) after `budget` search steps.
pub fn linearizable_within(ops: &[Op], budget: u64) -> Option<bool> {
    let mut steps = 0u64;
    let n = ops.len();
    let mut timed: Vec<(Time, bool, usize)> = Vec::with_capacity(2 * n);
    for (i, o) in ops.iter().enumerate() {
        timed.push((o.call, true, i));
        timed.push((o.ret, false, i));
    }
    // Returns after calls at the same instant: touching operations count as concurrent.
    timed.sort_by_key(|&(t, call, i)| (t, !call, i));
    let mut ret_at = vec![0; n];
    for (pos, &(_, call, i)) in timed.iter().enumerate() {
        if !call {
            ret_at[i] = pos;
        }
    }
    let entries: Vec<Entry> = timed
        .iter()
        .map(|&(_, call, op)| Entry {
            op,
            call,
            partner: if call { ret_at[op] } else { usize::MAX },
        })
        .collect();
    // A doubly linked list over entry positions; slot `len` is the head sentinel.
    let len = entries.len();
    let head = len;
    const NIL: usize = usize::MAX;
    let mut next: Vec<usize> = (0..=len)
        .map(|i| if i == head { 0 } else { i + 1 })
        .map(|i| if i >= len { NIL } else { i })
        .collect();
    let mut prev: Vec<usize> = (0..=len)
        .map(|i| match i {
            0 => head,
            i if i == head => NIL,
            i => i - 1,
        })
        .collect();
    let unlink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, e: usize| {
        let (p, nx) = (prev[e], next[e]);
        next[p] = nx;
        if nx != NIL {
            prev[nx] = p;
        }
    };
    let relink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, e: usize| {
        let (p, nx) = (prev[e], next[e]);
        next[p] = e;
        if nx != NIL {
            prev[nx] = e;
        }
    };

    let words = n.div_ceil(64).max(1);
    let mut linearized = vec![0u64; words];
    let mut cache: HashSet<(Vec<u64>, State)> = HashSet::new();
    // (call entry, state before it) of each operation linearized so far.
    let mut stack: Vec<(usize, State)> = Vec::new();
    let mut state: State = None;
    let mut cur = next[head];
    while next[head] != NIL {
        steps += 1;
        if steps > budget {
            return None;
        }
        if cur == NIL {
            return Some(false); // unreachable: a return always ends the list
        }
        let e = entries[cur];
        if e.call {
            let o = &ops[e.op];
            if let Some(after) = step(state, o.input, o.output) {
                linearized[e.op / 64] |= 1 << (e.op % 64);
                if cache.insert((linearized.clone(), after)) {
                    stack.push((cur, state));
                    state = after;
                    unlink(&mut next, &mut prev, cur);
                    unlink(&mut next, &mut prev, e.partner);
                    cur = next[head];
                    continue;
                }
                linearized[e.op / 64] &= !(1 << (e.op % 64));
            }
            cur = next[cur];
        } else {
            // This operation's return is reached unlinearized: undo the last choice.
            let Some((call, before)) = stack.pop() else {
                return Some(false);
            };
            let c = entries[call];
            state = before;
            linearized[c.op / 64] &= !(1 << (c.op % 64));
            relink(&mut next, &mut prev, c.partner);
            relink(&mut next, &mut prev, call);
            cur = next[call];
        }
    }
    Some(true)
}

/// Splits a history by key.
pub fn by_key(ops: &[Op]) -> BTreeMap<Key, Vec<Op>> {
    let mut m: BTreeMap<Key, Vec<Op>> = BTreeMap::new();
    for o in ops {
        m.entry(o.key.clone()).or_default().push(o.clone());
    }
    m
}

/// A key whose sub-history is not linearizable, with that sub-history.
pub struct Violation {
    pub key: Key,
    pub ops: Vec<Op>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "not linearizable: {} ({} operations, by call time):",
            self.key,
            self.ops.len()
        )?;
        let mut ops = self.ops.clone();
        ops.sort_by_key(|o| o.call);
        for o in ops {
            writeln!(f, "  {o}")?;
        }
        Ok(())
    }
}

/// Search steps allowed per key before its check is called inconclusive.
pub const STEP_BUDGET: u64 = 20_000_000;

/// Every key of `ops` whose sub-history is not linearizable, and the keys
/// whose search ran out of budget (neither proven nor refuted).
pub fn check_linearizable(ops: &[Op]) -> (Vec<Violation>, Vec<Key>) {
    let mut bad = Vec::new();
    let mut inconclusive = Vec::new();
    for (key, ops) in by_key(ops) {
        match linearizable_within(&ops, STEP_BUDGET) {
            Some(true) => {}
            Some(false) => bad.push(Violation { key, ops }),
            None => inconclusive.push(key),
        }
    }
    (bad, inconclusive)
}

// ---------------------------------------------------------------- watches

/// One change carried by a watch event: the key's new value, or `None` for a delete.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Change {
    pub key: Key,
    pub value: Option<Value>,
}

#[derive(Clone, Debug, Default)]
pub struct WatchMsg {
    pub revision: u64,
    /// A full-state message: `instances` replaces what the watcher held.
    pub reset: bool,
    pub instances: Vec<(Key, Value)>,
    /// (revision, change) in stream order.
    pub events: Vec<(u64, Change)>,
}

/// One watch stream, opened with `since` (0: from the full state).
#[derive(Clone, Debug, Default)]
pub struct WatchSession {
    pub node: u64,
    pub since: u64,
    pub msgs: Vec<WatchMsg>,
}

/// A watcher's successive streams; each resumes from the last revision the previous one delivered.
#[derive(Clone, Debug, Default)]
pub struct WatchLog {
    pub sessions: Vec<WatchSession>,
}

/// What one watcher ends with, and the revisions it can vouch for.
pub struct Replay {
    pub state: BTreeMap<Key, Value>,
    pub last: u64,
    /// Changes by revision, as this watcher received them.
    pub changes: BTreeMap<u64, Vec<Change>>,
    /// Revision ranges (a, b] over which the watcher saw every change.
    pub covered: Vec<(u64, u64)>,
    /// Revision of the first full state received.
    pub first: Option<u64>,
    /// Every (key, value) a full-state message carried.
    pub snapshots: Vec<(Key, Value)>,
    pub violations: Vec<String>,
}

impl Replay {
    pub fn covers(&self, r: u64) -> bool {
        self.covered.iter().any(|&(a, b)| a < r && r <= b)
    }
}

/// Replays one watcher's streams: revisions strictly increase, every event
/// belongs to its message's revision, a resumed stream starts after the
/// revision it resumed from (or with a reset), deletes hit present keys.
pub fn replay(log: &WatchLog) -> Replay {
    let mut r = Replay {
        state: BTreeMap::new(),
        last: 0,
        changes: BTreeMap::new(),
        covered: Vec::new(),
        first: None,
        snapshots: Vec::new(),
        violations: Vec::new(),
    };
    let mut synced = false; // holds a full state
    for (si, s) in log.sessions.iter().enumerate() {
        let mut last = s.since;
        if s.since != r.last {
            r.violations.push(format!(
                "session {si} (node {}) resumed from {} but the watcher was at {}",
                s.node, s.since, r.last
            ));
        }
        for (mi, m) in s.msgs.iter().enumerate() {
            let at = format!("session {si} (node {}) message {mi}", s.node);
            // A reset may come at any point of any stream: a member that
            // installs a snapshot resets its live watchers (compacted), fresh
            // ones included (found by the simulation, seed 1694471917593660366).
            if m.reset {
                r.state = m.instances.iter().cloned().collect();
                r.snapshots.extend(m.instances.iter().cloned());
                r.first.get_or_insert(m.revision);
                synced = true;
                last = m.revision;
                r.last = m.revision;
                continue;
            }
            if mi == 0 && s.since == 0 {
                r.violations
                    .push(format!("{at}: fresh watch did not start with a reset"));
            }
            if m.revision <= last {
                r.violations.push(format!(
                    "{at}: revision {} not after {last} (duplicate or out of order)",
                    m.revision
                ));
            }
            if m.events.is_empty() {
                r.violations.push(format!("{at}: message without events"));
            }
            if synced && m.revision > last {
                r.covered.push((last, m.revision));
            }
            for (rev, c) in &m.events {
                if *rev != m.revision {
                    r.violations.push(format!(
                        "{at}: event of revision {rev} in the message of revision {}",
                        m.revision
                    ));
                }
                match c.value {
                    Some(v) => {
                        r.state.insert(c.key.clone(), v);
                    }
                    None => {
                        if r.state.remove(&c.key).is_none() && synced {
                            r.violations.push(format!(
                                "{at}: delete of {} at {rev}, which the watcher did not hold",
                                c.key
                            ));
                        }
                    }
                }
                r.changes.entry(*rev).or_default().push(c.clone());
            }
            last = last.max(m.revision);
            r.last = last;
        }
    }
    for cs in r.changes.values_mut() {
        cs.sort();
    }
    r
}

/// Watchers that covered the same revision must have seen the same changes.
pub fn compare_replays(replays: &[Replay]) -> Vec<String> {
    let mut out = Vec::new();
    let mut truth: BTreeMap<u64, (usize, &Vec<Change>)> = BTreeMap::new();
    for (w, r) in replays.iter().enumerate() {
        for (rev, cs) in &r.changes {
            truth.entry(*rev).or_insert((w, cs));
        }
    }
    for (w, r) in replays.iter().enumerate() {
        for (rev, (src, cs)) in &truth {
            if !r.covers(*rev) {
                continue;
            }
            let mine = r.changes.get(rev);
            if mine != Some(cs) {
                out.push(format!(
                    "watcher {w} covered revision {rev} and saw {mine:?}; watcher {src} saw {cs:?}"
                ));
            }
        }
    }
    out
}

/// An acknowledged write and the revision its response gave.
pub struct AckedWrite {
    pub revision: u64,
    pub change: Change,
}

/// Acknowledged writes that a watcher covering their revision did not see:
/// lost (or hidden from watchers). Also returns how many no watcher covered.
pub fn lost_writes(acked: &[AckedWrite], replays: &[Replay]) -> (Vec<String>, usize) {
    let mut lost = Vec::new();
    let mut uncovered = 0;
    for a in acked {
        let covering: Vec<usize> = (0..replays.len())
            .filter(|&w| replays[w].covers(a.revision))
            .collect();
        if covering.is_empty() {
            uncovered += 1;
        }
        for w in covering {
            let seen = replays[w]
                .changes
                .get(&a.revision)
                .is_some_and(|cs| cs.contains(&a.change));
            if !seen {
                lost.push(format!(
                    "acknowledged {:?} at revision {} missing from watcher {w}",
                    a.change, a.revision
                ));
            }
        }
    }
    (lost, uncovered)
}

/// Differences between a watcher's final state and the final linearizable reads.
pub fn final_state_diff(
    watcher: &BTreeMap<Key, Value>,
    read: &BTreeMap<Key, Value>,
) -> Vec<String> {
    let keys: std::collections::BTreeSet<&Key> = watcher.keys().chain(read.keys()).collect();
    keys.into_iter()
        .filter(|k| watcher.get(*k) != read.get(*k))
        .map(|k| {
            format!(
                "{k}: watcher holds {:?}, read {:?}",
                watcher.get(k),
                read.get(k)
            )
        })
        .collect()
}

/// Whether the watchers together saw every revision from `from` to `to`.
pub fn gap_free(replays: &[Replay], from: u64, to: u64) -> bool {
    let mut spans: Vec<(u64, u64)> = replays.iter().flat_map(|r| r.covered.clone()).collect();
    spans.sort();
    let mut reached = from;
    for (a, b) in spans {
        if a <= reached {
            reached = reached.max(b);
        }
    }
    reached >= to
}

/// Settles unknown outcomes with what the watchers saw, as etcd's robustness
/// checker does, when together they followed every revision: an unknown
/// register whose value no watcher ever saw was never applied; unknown
/// deregisters of a key with no more delete events than acknowledged deletes
/// were never applied. Those operations are dropped, which only narrows the
/// linearizations the checker may choose: it cannot hide a violation.
/// Returns the remaining history and how many were dropped.
pub fn settle_unknown(ops: &[Op], replays: &[Replay]) -> (Vec<Op>, usize) {
    let mut seen: HashSet<(&Key, Value)> = HashSet::new();
    let mut deletes: BTreeMap<u64, Vec<&Key>> = BTreeMap::new();
    for r in replays {
        for (rev, cs) in &r.changes {
            for c in cs {
                match c.value {
                    Some(v) => {
                        seen.insert((&c.key, v));
                    }
                    None => {
                        let d = deletes.entry(*rev).or_default();
                        if !d.contains(&&c.key) {
                            d.push(&c.key);
                        }
                    }
                }
            }
        }
        for (k, v) in r
            .state
            .iter()
            .chain(r.snapshots.iter().map(|(k, v)| (k, v)))
        {
            seen.insert((k, *v));
        }
    }
    let mut delete_events: HashMap<&Key, usize> = HashMap::new();
    for k in deletes.values().flatten() {
        *delete_events.entry(*k).or_default() += 1;
    }
    let mut acked_deletes: HashMap<&Key, usize> = HashMap::new();
    for o in ops
        .iter()
        .filter(|o| o.input == Input::Delete && o.output == Output::Ok)
    {
        *acked_deletes.entry(&o.key).or_default() += 1;
    }
    let keep = |o: &Op| match (o.input, o.output) {
        (Input::Put(v), Output::Unknown) => seen.contains(&(&o.key, v)),
        (Input::Delete, Output::Unknown) => {
            delete_events.get(&o.key).copied().unwrap_or(0)
                > acked_deletes.get(&o.key).copied().unwrap_or(0)
        }
        _ => true,
    };
    let kept: Vec<Op> = ops.iter().filter(|o| keep(o)).cloned().collect();
    let dropped = ops.len() - kept.len();
    (kept, dropped)
}

/// Counts per operation kind, for the summary.
pub fn count_kinds(ops: &[Op]) -> HashMap<&'static str, usize> {
    let mut m = HashMap::new();
    for o in ops {
        let kind = match o.input {
            Input::Put(_) => "register",
            Input::Delete => "deregister",
            Input::Get => "get (per key)",
            Input::Exists => "heartbeat",
        };
        *m.entry(kind).or_default() += 1;
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Key {
        Key {
            service: "s".into(),
            id: "a".into(),
        }
    }

    fn op(client: usize, input: Input, output: Output, call: Time, ret: Time) -> Op {
        Op {
            client,
            key: key(),
            input,
            output,
            call,
            ret,
        }
    }

    fn put(c: usize, v: Value, call: Time, ret: Time) -> Op {
        op(c, Input::Put(v), Output::Ok, call, ret)
    }

    fn get(c: usize, v: Option<Value>, call: Time, ret: Time) -> Op {
        op(c, Input::Get, Output::Value(v), call, ret)
    }

    #[test]
    fn rejects_stale_read_after_acknowledged_write() {
        let h = [put(0, 1, 0, 10), put(0, 2, 20, 30), get(1, Some(1), 40, 50)];
        assert!(!linearizable(&h));
    }

    #[test]
    fn rejects_lost_acknowledged_write() {
        let h = [put(0, 1, 0, 10), get(1, None, 20, 30)];
        assert!(!linearizable(&h));
        // Deregister answering NOT_FOUND after an acknowledged register is the same loss.
        let h = [
            put(0, 1, 0, 10),
            op(1, Input::Delete, Output::NotFound, 20, 30),
        ];
        assert!(!linearizable(&h));
    }

    #[test]
    fn rejects_read_of_a_value_never_written() {
        assert!(!linearizable(&[get(0, Some(7), 0, 10)]));
        let h = [put(0, 1, 0, 10), get(1, Some(2), 5, 20)];
        assert!(!linearizable(&h));
    }

    #[test]
    fn rejects_non_monotonic_reads() {
        // Both reads overlap the write of 2, but once 2 is seen, 1 cannot come back.
        let h = [
            put(0, 1, 0, 10),
            put(0, 2, 20, 100),
            get(1, Some(2), 30, 40),
            get(1, Some(1), 50, 60),
        ];
        assert!(!linearizable(&h));
        // The same with two concurrent writers: 1 then 2 then 1 again.
        let h = [
            put(0, 1, 0, 50),
            put(1, 2, 10, 60),
            get(2, Some(1), 70, 80),
            get(2, Some(2), 90, 100),
        ];
        assert!(!linearizable(&h));
    }

    #[test]
    fn rejects_delete_of_an_absent_instance_acknowledged() {
        let h = [op(0, Input::Delete, Output::Ok, 0, 10)];
        assert!(!linearizable(&h));
    }

    #[test]
    fn rejects_unknown_write_seen_before_it_was_sent() {
        let h = [
            get(1, Some(1), 0, 10),
            op(0, Input::Put(1), Output::Unknown, 20, OPEN),
        ];
        assert!(!linearizable(&h));
    }

    #[test]
    fn accepts_concurrent_reads_on_either_side_of_a_write() {
        let h = [
            put(0, 1, 0, 100),
            get(1, None, 10, 20),
            get(2, Some(1), 30, 40),
            get(1, Some(1), 50, 60),
        ];
        assert!(linearizable(&h));
        let h = [
            put(0, 1, 0, 50),
            put(1, 2, 10, 60),
            get(2, Some(2), 70, 80),
            get(3, Some(2), 65, 90),
        ];
        assert!(linearizable(&h));
    }

    #[test]
    fn accepts_unknown_outcomes_applied_late_or_never() {
        let h = [
            op(0, Input::Put(1), Output::Unknown, 0, OPEN),
            get(1, None, 10, 20),
            get(1, Some(1), 1000, 1010),
            put(2, 2, 2000, 2010),
            op(3, Input::Put(3), Output::Unknown, 2020, OPEN),
            get(1, Some(2), 3000, 3010),
        ];
        assert!(linearizable(&h));
        let h = [
            put(0, 1, 0, 10),
            op(0, Input::Delete, Output::Unknown, 20, OPEN),
            get(1, Some(1), 30, 40),
            get(1, None, 50, 60),
            op(2, Input::Exists, Output::NotFound, 70, 80),
        ];
        assert!(linearizable(&h));
    }

    #[test]
    fn accepts_random_histories_generated_from_the_model() {
        for seed in 0..200 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut ops = Vec::new();
            // (linearization point, op): applied in point order to a real register.
            let mut points = Vec::new();
            let mut next_value = 1;
            for c in 0..5 {
                let mut t = rng.u64(0..50);
                for _ in 0..12 {
                    let call = t;
                    let point = call + rng.u64(1..40);
                    let ret = point + rng.u64(1..40);
                    t = ret + rng.u64(1..30);
                    let input = match rng.u8(0..10) {
                        0..=3 => {
                            next_value += 1;
                            Input::Put(next_value)
                        }
                        4..=5 => Input::Delete,
                        6 => Input::Exists,
                        _ => Input::Get,
                    };
                    let unknown =
                        rng.u8(0..10) == 0 && !matches!(input, Input::Get | Input::Exists);
                    points.push((point, ops.len()));
                    ops.push(op(
                        c,
                        input,
                        Output::Unknown,
                        call,
                        if unknown { OPEN } else { ret },
                    ));
                }
            }
            points.sort();
            let mut s: State = None;
            for (_, i) in points {
                let o = &mut ops[i];
                // An unknown outcome is applied half the time.
                let applied = o.ret != OPEN || rng.bool();
                o.output = match o.input {
                    Input::Put(v) => {
                        if applied {
                            s = Some(v);
                        }
                        if o.ret == OPEN {
                            Output::Unknown
                        } else {
                            Output::Ok
                        }
                    }
                    Input::Delete if o.ret == OPEN => {
                        if applied {
                            s = None;
                        }
                        Output::Unknown
                    }
                    Input::Delete => match s.take() {
                        Some(_) => Output::Ok,
                        None => Output::NotFound,
                    },
                    Input::Get => Output::Value(s),
                    Input::Exists => {
                        if s.is_some() {
                            Output::Ok
                        } else {
                            Output::NotFound
                        }
                    }
                };
            }
            assert!(
                linearizable(&ops),
                "seed {seed}: a model history was rejected"
            );
            // Corrupt one read: it must now fail unless the value happens to fit.
            if let Some(i) = ops
                .iter()
                .position(|o| matches!(o.output, Output::Value(Some(_))))
            {
                ops[i].output = Output::Value(Some(999_999));
                assert!(
                    !linearizable(&ops),
                    "seed {seed}: a read of a value never written passed"
                );
            }
        }
    }

    fn msg(revision: u64, events: &[(&str, Option<Value>)]) -> WatchMsg {
        WatchMsg {
            revision,
            reset: false,
            instances: vec![],
            events: events
                .iter()
                .map(|(id, value)| {
                    (
                        revision,
                        Change {
                            key: Key {
                                service: "s".into(),
                                id: (*id).into(),
                            },
                            value: *value,
                        },
                    )
                })
                .collect(),
        }
    }

    fn initial(revision: u64) -> WatchMsg {
        WatchMsg {
            revision,
            reset: true,
            ..Default::default()
        }
    }

    fn session(since: u64, msgs: Vec<WatchMsg>) -> WatchSession {
        WatchSession {
            node: 1,
            since,
            msgs,
        }
    }

    #[test]
    fn watch_replay_accepts_ordered_resumed_streams() {
        let log = WatchLog {
            sessions: vec![
                session(0, vec![initial(3), msg(5, &[("a", Some(1))])]),
                session(5, vec![msg(7, &[("a", None), ("b", Some(2))])]),
            ],
        };
        let r = replay(&log);
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        assert_eq!(r.last, 7);
        assert!(r.covers(4) && r.covers(6) && !r.covers(3) && !r.covers(8));
        assert_eq!(r.state.len(), 1);
    }

    #[test]
    fn watch_replay_rejects_duplicates_and_disorder() {
        let log = WatchLog {
            sessions: vec![
                session(0, vec![initial(3), msg(5, &[("a", Some(1))])]),
                // Resumed from 5 but 5 is delivered again.
                session(5, vec![msg(5, &[("a", Some(1))])]),
            ],
        };
        assert!(!replay(&log).violations.is_empty());
        let log = WatchLog {
            sessions: vec![session(
                0,
                vec![
                    initial(3),
                    msg(6, &[("a", Some(1))]),
                    msg(5, &[("b", Some(2))]),
                ],
            )],
        };
        assert!(!replay(&log).violations.is_empty());
    }

    #[test]
    fn watchers_disagreeing_on_a_covered_revision_are_a_gap() {
        let a = replay(&WatchLog {
            sessions: vec![session(
                0,
                vec![
                    initial(1),
                    msg(4, &[("a", Some(1))]),
                    msg(6, &[("a", Some(2))]),
                ],
            )],
        });
        // b never saw revision 4, a never saw 5, though each claims to have followed every revision.
        let b = replay(&WatchLog {
            sessions: vec![session(
                0,
                vec![
                    initial(1),
                    msg(5, &[("b", Some(9))]),
                    msg(6, &[("a", Some(2))]),
                ],
            )],
        });
        let v = compare_replays(&[a, b]);
        assert_eq!(v.len(), 2, "{v:?}"); // each missed the other's revision
    }

    #[test]
    fn acknowledged_write_missing_from_a_covering_watcher_is_lost() {
        let r = replay(&WatchLog {
            sessions: vec![session(0, vec![initial(1), msg(6, &[("a", Some(2))])])],
        });
        let change = |v| Change {
            key: Key {
                service: "s".into(),
                id: "a".into(),
            },
            value: Some(v),
        };
        let acked = [
            AckedWrite {
                revision: 6,
                change: change(2),
            },
            AckedWrite {
                revision: 4,
                change: change(1),
            },
            AckedWrite {
                revision: 9,
                change: change(3),
            },
        ];
        let (lost, uncovered) = lost_writes(&acked, &[r]);
        assert_eq!(lost.len(), 1, "{lost:?}");
        assert_eq!(uncovered, 1);
    }

    #[test]
    fn settling_drops_only_unknown_writes_no_watcher_saw() {
        let r = replay(&WatchLog {
            sessions: vec![session(
                0,
                vec![
                    initial(1),
                    msg(4, &[("a", Some(1))]),
                    msg(6, &[("a", None)]),
                ],
            )],
        });
        assert!(
            gap_free(std::slice::from_ref(&r), 1, 6) && !gap_free(std::slice::from_ref(&r), 1, 7)
        );
        let h = [
            op(0, Input::Put(1), Output::Unknown, 0, OPEN),
            op(1, Input::Put(2), Output::Unknown, 0, OPEN),
            op(2, Input::Delete, Output::Unknown, 10, OPEN),
            op(3, Input::Delete, Output::Ok, 10, 20),
        ];
        let (kept, dropped) = settle_unknown(&h, &[r]);
        // Put(2) was never seen; the one delete event is the acknowledged delete's.
        assert_eq!(dropped, 2);
        assert!(kept.iter().any(|o| o.input == Input::Put(1)));
        // Dropping never applied writes can turn a pass into a failure, never the reverse.
        let h = [
            op(0, Input::Put(2), Output::Unknown, 0, OPEN),
            get(1, Some(2), 5, 10),
        ];
        let r = replay(&WatchLog {
            sessions: vec![session(0, vec![initial(1), msg(3, &[("b", Some(9))])])],
        });
        assert!(linearizable(&h));
        assert!(!linearizable(&settle_unknown(&h, &[r]).0));
    }
}
