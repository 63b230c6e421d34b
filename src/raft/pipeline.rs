//! Pipelined replication to far followers.
//!
//! Openraft 0.9 keeps one AppendEntries in flight per follower, and hands an
//! entry to replication only after the leader's own fsync. On a long link a
//! write then waits for the request in flight to come back before its own goes
//! out: 1.5 round trips on average, where etcd sends entries to followers as
//! soon as it appends them (one round trip, its fsync alongside).
//!
//! A [`Pipeline`] sends every batch the leader appends to a far follower at
//! once ("early"), chained after what was sent before, while openraft's own
//! request is still in flight. When openraft then asks to send those entries,
//! the follower's answer to the early send is the answer. That answer is the
//! follower's for the same leader vote and the same entries, so it says what a
//! direct answer would: the follower holds them durably. A late answer is one
//! Raft already tolerates.
//!
//! The chain starts from an entry the follower is known to hold (a successful
//! request of openraft's) and stops at the first early send that is not
//! answered with success (refused because it overtook the entries it follows,
//! a timeout, a lost connection): openraft's next request is then sent as it
//! is and starts the chain again. Nothing here decides what is committed.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse};
use openraft::{Entry, LogId, Vote};
use tokio::sync::{broadcast, watch};

use super::{NodeId, TypeConfig};

/// Entries one `append` of the log store wrote, in order.
pub type Batch = Arc<Vec<Entry<TypeConfig>>>;

/// Appended batches not yet sent early that a pipeline keeps, and the most
/// early sends it has in flight.
const WINDOW: usize = 64;

/// The log store's appends as they happen, for pipelines that follow them.
/// Costs nothing while no pipeline listens (no far follower).
#[derive(Clone)]
pub struct Appends {
    tx: broadcast::Sender<Batch>,
}

impl Default for Appends {
    fn default() -> Self {
        Appends {
            tx: broadcast::channel(WINDOW).0,
        }
    }
}

impl Appends {
    pub(super) fn wanted(&self) -> bool {
        self.tx.receiver_count() > 0
    }

    pub(super) fn publish(&self, batch: Batch) {
        let _ = self.tx.send(batch);
    }
}

/// An early AppendEntries, and where its answer goes.
pub(super) struct Early {
    pub request: AppendEntriesRequest<TypeConfig>,
    pub deadline: Duration,
    pub answer: watch::Sender<Option<Answer>>,
}

/// What an early send came back with.
#[derive(Clone, Copy, Debug)]
pub(super) enum Answer {
    /// The follower holds every entry of it.
    Success,
    /// The follower knows a newer leader.
    Higher(Vote<NodeId>),
    /// Refused (it overtook the entries it chains to), timed out, or lost.
    Failed,
}

/// The pipeline of one replication stream (one follower, one leader term).
#[derive(Default)]
pub(super) struct Pipeline {
    state: Mutex<State>,
    listening: AtomicBool,
}

#[derive(Default)]
struct State {
    /// The leader's vote, commit index and request deadline, as openraft's
    /// last request to this follower gave them.
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId<NodeId>>,
    deadline: Duration,
    /// The last entry sent to the follower: the next early send chains to it.
    /// `None`: no chain (not started, or broken).
    tail: Option<LogId<NodeId>>,
    /// Appended batches not sent early yet, oldest first.
    recent: VecDeque<Batch>,
    /// Early sends by the index of their first entry.
    sent: BTreeMap<u64, Sent>,
}

struct Sent {
    last: LogId<NodeId>,
    answer: watch::Receiver<Option<Answer>>,
}

/// How openraft's request is answered from an early send.
pub(super) struct Covered {
    answer: watch::Receiver<Option<Answer>>,
    /// The last entry the early send carried.
    last: LogId<NodeId>,
}

impl Pipeline {
    /// True once, for the caller that is to start following the log store.
    pub(super) fn start_listening(&self) -> bool {
        !self.listening.swap(true, Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The early send that already carries the first entry of `rpc`, if any.
    pub(super) fn covering(&self, rpc: &AppendEntriesRequest<TypeConfig>) -> Option<Covered> {
        let first = rpc.entries.first()?.log_id;
        let st = self.lock();
        if st.vote != Some(rpc.vote) {
            return None;
        }
        let (_, sent) = st.sent.range(..=first.index).next_back()?;
        (sent.last.index >= first.index).then(|| Covered {
            answer: sent.answer.clone(),
            last: sent.last,
        })
    }

    /// Openraft's answer to `rpc` from the early send that covers it, or
    /// `None` if that send got no success: then the chain is broken and `rpc`
    /// must be sent as it is.
    pub(super) async fn answer(
        &self,
        rpc: &AppendEntriesRequest<TypeConfig>,
        mut covered: Covered,
    ) -> Option<AppendEntriesResponse<NodeId>> {
        let answer = covered
            .answer
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|a| *a);
        let matching = match answer {
            Some(Answer::Success) => covered.last,
            Some(Answer::Higher(vote)) => return Some(AppendEntriesResponse::HigherVote(vote)),
            _ => {
                self.break_chain();
                return None;
            }
        };
        let last = rpc.entries.last().map(|e| e.log_id)?;
        let prev = rpc.prev_log_id.map(|p| p.index);
        if prev.is_some_and(|p| matching.index < p) {
            self.break_chain();
            return None;
        }
        self.lock()
            .sent
            .retain(|_, s| s.last.index > matching.index);
        Some(if matching.index >= last.index {
            AppendEntriesResponse::Success
        } else {
            AppendEntriesResponse::PartialSuccess(Some(matching))
        })
    }

    /// Openraft's request with `vote` and `committed` succeeded up to
    /// `matching`: the follower holds everything up to there, so the chain
    /// may continue from it. Returns what to send early now.
    pub(super) fn succeeded(
        &self,
        vote: Vote<NodeId>,
        committed: Option<LogId<NodeId>>,
        matching: LogId<NodeId>,
        deadline: Duration,
    ) -> Option<Early> {
        let mut st = self.lock();
        if st.vote != Some(vote) {
            st.sent.clear();
            st.tail = None;
        }
        st.vote = Some(vote);
        st.committed = committed;
        st.deadline = deadline;
        if st.tail.is_none_or(|t| t.index < matching.index) {
            st.tail = Some(matching);
        }
        st.next()
    }

    /// A batch the leader appended. Returns what to send early now.
    fn appended(&self, batch: Batch) -> Option<Early> {
        let mut st = self.lock();
        st.recent.push_back(batch);
        if st.recent.len() > WINDOW {
            st.recent.pop_front();
        }
        st.next()
    }

    /// An early send came back without success: every later one chains to it.
    pub(super) fn break_chain(&self) {
        let mut st = self.lock();
        st.tail = None;
        st.sent.clear();
    }
}

impl State {
    /// The appended entries that chain to `tail`, as one early request.
    fn next(&mut self) -> Option<Early> {
        let tail = self.tail?;
        let vote = self.vote?;
        while self
            .recent
            .front()
            .and_then(|b| b.last())
            .is_some_and(|e| e.log_id.index <= tail.index)
        {
            self.recent.pop_front();
        }
        if self.sent.len() >= WINDOW {
            return None;
        }
        let mut entries = Vec::new();
        let mut last = tail;
        while let Some(batch) = self.recent.front() {
            let chains = batch.first().is_some_and(|e| {
                e.log_id.index == last.index + 1 && e.log_id.leader_id == *vote.leader_id()
            });
            if !chains || entries.len() + batch.len() > super::network::MAX_ENTRIES as usize {
                break;
            }
            let batch = self.recent.pop_front()?;
            entries.extend(batch.iter().cloned());
            last = entries.last()?.log_id;
        }
        let first = entries.first()?.log_id.index;
        let (answer, rx) = watch::channel(None);
        self.sent.insert(first, Sent { last, answer: rx });
        self.tail = Some(last);
        Some(Early {
            request: AppendEntriesRequest {
                vote,
                prev_log_id: Some(tail),
                leader_commit: self.committed,
                entries,
            },
            deadline: self.deadline,
            answer,
        })
    }
}

/// Feeds `pipeline` with the log store's appends until it is dropped; `send`
/// sends each early request.
pub(super) async fn follow(pipeline: Weak<Pipeline>, appends: &Appends, send: impl Fn(Early)) {
    let mut rx = appends.tx.subscribe();
    loop {
        let batch = match rx.recv().await {
            Ok(b) => b,
            Err(broadcast::error::RecvError::Lagged(_)) => {
                // Batches were missed: no chain can cross the gap.
                match pipeline.upgrade() {
                    Some(p) => p.break_chain(),
                    None => return,
                }
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let Some(p) = pipeline.upgrade() else { return };
        let early = p.appended(batch);
        drop(p);
        if let Some(early) = early {
            send(early);
        }
    }
}
