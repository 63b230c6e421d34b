//! Pipelined replication: every appended batch goes to far followers at
//! once, and to near ones one request at a time (see `State::near`).
//!
//! Openraft 0.9 keeps one AppendEntries in flight per follower, and hands an
//! entry to replication only after the leader's own fsync. On a long link a
//! write then waits for the request in flight to come back before its own goes
//! out: 1.5 round trips on average, where etcd sends entries to followers as
//! soon as it appends them (one round trip, its fsync alongside).
//!
//! A [`Pipeline`] sends every batch the leader appends to a follower at
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
use std::sync::{Mutex, Weak};
use std::time::Duration;

use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse};
use openraft::{LogId, Vote};
use tokio::sync::{broadcast, watch};

use crate::raft::storage::log_store::{Appends, Batch};
use crate::raft::{NodeId, TypeConfig};

/// Entries per AppendEntries at most (openraft's `max_payload_entries` is set
/// to this): many, so that a follower behind a long link catches up by the
/// round trip, not the entry; `MAX_BATCH_BYTES` keeps the message small.
pub const MAX_ENTRIES: u64 = 512;
/// Appended batches not yet sent early that a pipeline keeps, and the most
/// early sends it has in flight.
const WINDOW: usize = 64;

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
    /// A near follower (under `peers::FAR`) gets one early send at a time:
    /// enough for its fsync to run beside the leader's, while under load
    /// openraft's requests carry the larger batches that keep messages and
    /// fsyncs few.
    near: bool,
}

struct Sent {
    last: LogId<NodeId>,
    /// The commit index it carried.
    committed: Option<LogId<NodeId>>,
    answer: watch::Receiver<Option<Answer>>,
}

/// How openraft's request is answered from an early send.
pub(super) struct Covered {
    answer: watch::Receiver<Option<Answer>>,
    /// The last entry the early send carried.
    last: LogId<NodeId>,
    /// The commit index it carried.
    committed: Option<LogId<NodeId>>,
}

impl Covered {
    pub(super) fn committed(&self) -> Option<LogId<NodeId>> {
        self.committed
    }
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
            committed: sent.committed,
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

    /// Whether the follower is near (see `State::near`).
    pub(super) fn set_near(&self, near: bool) {
        self.lock().near = near;
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
        // Batches the follower has, or of another leader (never to chain).
        while self.recent.front().is_some_and(|b| {
            b.last().is_some_and(|e| {
                e.log_id.index <= tail.index || e.log_id.leader_id != *vote.leader_id()
            })
        }) {
            self.recent.pop_front();
        }
        let window = if self.near { 1 } else { WINDOW };
        if self.sent.len() >= window {
            return None;
        }
        let mut entries = Vec::new();
        let mut last = tail;
        while let Some(batch) = self.recent.front() {
            let chains = batch.first().is_some_and(|e| {
                e.log_id.index == last.index + 1 && e.log_id.leader_id == *vote.leader_id()
            });
            if !chains || entries.len() + batch.len() > MAX_ENTRIES as usize {
                break;
            }
            let batch = self.recent.pop_front()?;
            entries.extend(batch.iter().cloned());
            last = entries.last()?.log_id;
        }
        let first = entries.first()?.log_id.index;
        let (answer, rx) = watch::channel(None);
        self.sent.insert(
            first,
            Sent {
                last,
                committed: self.committed,
                answer: rx,
            },
        );
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
    let mut rx = appends.subscribe();
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use openraft::{CommittedLeaderId, Entry, EntryPayload};

    use super::*;

    fn id(term: u64, index: u64) -> LogId<NodeId> {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    fn batch(term: u64, indexes: std::ops::RangeInclusive<u64>) -> Batch {
        Arc::new(
            indexes
                .map(|i| Entry {
                    log_id: id(term, i),
                    payload: EntryPayload::Blank,
                })
                .collect(),
        )
    }

    /// Openraft's request: `entries` after `prev`.
    fn rpc(prev: u64, entries: std::ops::RangeInclusive<u64>) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: Vote::new_committed(2, 1),
            prev_log_id: Some(id(2, prev)),
            leader_commit: Some(id(2, prev)),
            entries: batch(2, entries).to_vec(),
        }
    }

    fn anchored(at: u64) -> Pipeline {
        let p = Pipeline::default();
        let vote = Vote::new_committed(2, 1);
        let early = p.succeeded(vote, Some(id(2, at)), id(2, at), Duration::from_secs(1));
        assert!(early.is_none(), "nothing was appended yet");
        p
    }

    fn range(e: &Early) -> (Option<u64>, u64, u64) {
        let first = e.request.entries.first().expect("entries").log_id.index;
        let last = e.request.entries.last().expect("entries").log_id.index;
        (e.request.prev_log_id.map(|p| p.index), first, last)
    }

    #[tokio::test]
    async fn appended_batches_chain_and_answer_openraft_requests() {
        let p = anchored(5);
        let first = p.appended(batch(2, 6..=6)).expect("chains to 5");
        assert_eq!(range(&first), (Some(5), 6, 6));
        let second = p.appended(batch(2, 7..=8)).expect("chains to 6");
        assert_eq!(range(&second), (Some(6), 7, 8));
        assert_eq!(second.request.leader_commit, Some(id(2, 5)));

        // Openraft asks for 6..=8 at once: the first early answer covers 6.
        let ask = rpc(5, 6..=8);
        let covered = p.covering(&ask).expect("6 was sent early");
        first.answer.send_replace(Some(Answer::Success));
        let reply = p.answer(&ask, covered).await.expect("answered");
        assert!(matches!(reply, AppendEntriesResponse::PartialSuccess(Some(m)) if m == id(2, 6)));

        let ask = rpc(6, 7..=8);
        let covered = p.covering(&ask).expect("7..=8 were sent early");
        second.answer.send_replace(Some(Answer::Success));
        let reply = p.answer(&ask, covered).await.expect("answered");
        assert!(matches!(reply, AppendEntriesResponse::Success));
        assert!(p.lock().sent.is_empty(), "answered sends are forgotten");
    }

    #[tokio::test]
    async fn a_failed_early_send_breaks_the_chain_until_openraft_succeeds() {
        let p = anchored(5);
        let early = p.appended(batch(2, 6..=6)).expect("chains to 5");
        let ask = rpc(5, 6..=6);
        let covered = p.covering(&ask).expect("sent early");
        early.answer.send_replace(Some(Answer::Failed));
        assert!(
            p.answer(&ask, covered).await.is_none(),
            "openraft must send it itself"
        );
        assert!(p.appended(batch(2, 7..=7)).is_none(), "no chain to follow");
        assert!(p.covering(&rpc(6, 7..=7)).is_none());

        // Openraft's own request for 6..=7 succeeded: the chain starts again.
        let vote = Vote::new_committed(2, 1);
        assert!(p
            .succeeded(vote, Some(id(2, 7)), id(2, 7), Duration::from_secs(1))
            .is_none());
        let next = p.appended(batch(2, 8..=8)).expect("chains to 7");
        assert_eq!(range(&next), (Some(7), 8, 8));
    }

    #[tokio::test]
    async fn a_higher_vote_is_passed_on() {
        let p = anchored(5);
        let early = p.appended(batch(2, 6..=6)).expect("chains to 5");
        let ask = rpc(5, 6..=6);
        let covered = p.covering(&ask).expect("sent early");
        let higher = Vote::new_committed(3, 2);
        early.answer.send_replace(Some(Answer::Higher(higher)));
        let reply = p.answer(&ask, covered).await.expect("answered");
        assert!(matches!(reply, AppendEntriesResponse::HigherVote(v) if v == higher));
    }

    #[tokio::test]
    async fn a_near_follower_gets_one_early_send_at_a_time() {
        let p = anchored(5);
        p.set_near(true);
        let first = p.appended(batch(2, 6..=6)).expect("chains to 5");
        assert!(
            p.appended(batch(2, 7..=7)).is_none(),
            "one in flight is the most"
        );
        // Openraft's request for 6..=7 is answered for 6 from the early send,
        // and it sends 7 itself, as it would without a pipeline.
        let ask = rpc(5, 6..=7);
        let covered = p.covering(&ask).expect("6 was sent early");
        first.answer.send_replace(Some(Answer::Success));
        let reply = p.answer(&ask, covered).await.expect("answered");
        assert!(matches!(reply, AppendEntriesResponse::PartialSuccess(Some(m)) if m == id(2, 6)));
        let vote = Vote::new_committed(2, 1);
        assert!(p
            .succeeded(vote, Some(id(2, 7)), id(2, 7), Duration::from_secs(1))
            .is_none());
        let next = p
            .appended(batch(2, 8..=8))
            .expect("the window is free again");
        assert_eq!(range(&next), (Some(7), 8, 8));
    }

    #[test]
    fn batches_appended_before_the_anchor_go_out_with_it() {
        let p = Pipeline::default();
        assert!(p.appended(batch(2, 6..=6)).is_none(), "no anchor yet");
        assert!(p.appended(batch(2, 7..=7)).is_none(), "no anchor yet");
        let vote = Vote::new_committed(2, 1);
        let early = p
            .succeeded(vote, Some(id(2, 5)), id(2, 5), Duration::from_secs(1))
            .expect("6 and 7 wait for the anchor");
        assert_eq!(range(&early), (Some(5), 6, 7));
    }

    #[test]
    fn entries_of_another_term_or_after_a_gap_are_not_chained() {
        let p = anchored(5);
        assert!(p.appended(batch(3, 6..=6)).is_none(), "another leader's");
        let p = anchored(5);
        assert!(p.appended(batch(2, 7..=7)).is_none(), "6 is missing");
        // Another vote in openraft's request resets what was sent.
        let p = anchored(5);
        assert!(p.appended(batch(2, 6..=6)).is_some());
        let other = Vote::new_committed(3, 1);
        p.succeeded(other, None, id(3, 9), Duration::from_secs(1));
        assert!(p.lock().sent.is_empty());
    }
}
