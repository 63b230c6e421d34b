//! Elections and heartbeats, driven here rather than by openraft 0.9's timers.
//!
//! Openraft 0.9 has no pre-vote: a follower cut off for a while calls
//! election after election, raising its term each time, and when it comes
//! back its term deposes a healthy leader. Here a voter that has heard from no
//! leader for its (random) election timeout first asks the voters whether they
//! would elect it (pre-vote, Raft thesis 9.6) and campaigns only when a quorum
//! says yes. A voter says yes only if it has itself heard from no leader for
//! the minimum election timeout, and the candidate's log is at least as up to
//! date as its own; a pre-vote changes no state on either side.
//!
//! Openraft's heartbeat interval is also its deadline for every AppendEntries
//! and leadership confirmation, so it is set to the RPC timeout, which must
//! cover a long round trip; the leader's heartbeats are sent from here at the
//! configured, shorter, interval.
//!
//! A leader whose process died is found sooner: after a few missed heartbeats
//! a follower tries to open a TCP connection to the leader's peer port, and a
//! refusal (nothing listens there) means the leader is gone. The follower
//! then campaigns as soon as openraft's vote lease allows, and grants
//! pre-votes likewise. A crashed host or a cut link refuses nothing: those
//! still wait for the election timeout.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::raft::mutation::{self, Mutation};

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use openraft::{LogId, RaftMetrics, ServerState};
use serde::{Deserialize, Serialize};

use crate::peers::Peers;
use crate::raft::rpc::{extra_call, Extra};
use crate::raft::storage::marker::Identity;
use crate::raft::{Node, NodeId, Raft};

/// Raft timing in effect (see `config::RaftTuning`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// How often a leader sends heartbeats.
    pub heartbeat: Duration,
    /// Deadline of one node-to-node request.
    pub rpc_timeout: Duration,
    /// Range of the random time without a leader after which a voter campaigns.
    pub election_min: Duration,
    pub election_max: Duration,
}

impl Timing {
    /// Openraft's vote lease (its `election_timeout_max`): a voter refuses a
    /// vote for this long after its leader's last message. The least openraft
    /// accepts, just over the RPC deadline; the pre-vote, not this lease,
    /// keeps a live leader in place.
    pub fn vote_lease(&self) -> Duration {
        self.rpc_timeout + Duration::from_millis(2)
    }

    /// Silence after which a follower checks whether its leader's process is
    /// still there: a few missed heartbeats.
    fn suspect(&self) -> Duration {
        (self.heartbeat * 4).min(self.rpc_timeout)
    }

    /// When a follower whose leader is gone campaigns: just past the vote
    /// lease, half a heartbeat later for each voter ranked before it (see
    /// `leader_gone`). Drawn at random, two followers a few milliseconds
    /// apart still split the vote now and then (seen: 1 round in 20, 1.4 s).
    fn after_leader_gone(&self, rank: u32) -> Duration {
        self.vote_lease() + Duration::from_millis(10) + self.heartbeat / 2 * rank
    }
}

/// When this node last heard from a leader it accepts, or granted a vote:
/// what its election timer and its answers to pre-votes measure from.
#[derive(Clone)]
pub struct Contact {
    last: Arc<Mutex<Instant>>,
    /// When a leader was last heard from (a vote granted aside), if ever: how
    /// stale this node's own state may be.
    heard: Arc<Mutex<Option<Instant>>>,
    /// The last candidate this node granted a pre-vote, and when.
    pre_voted: Arc<Mutex<Option<(NodeId, Instant)>>>,
    /// The leader's peer port refused a connection since it was last heard.
    gone: Arc<AtomicBool>,
    timing: Timing,
}

impl Contact {
    pub fn new(timing: &Timing) -> Self {
        Contact {
            last: Arc::new(Mutex::new(Instant::now())),
            heard: Arc::default(),
            pre_voted: Arc::new(Mutex::new(None)),
            gone: Arc::default(),
            timing: *timing,
        }
    }

    fn gone(&self) -> bool {
        self.gone.load(Ordering::Relaxed)
    }

    /// How long a leader heard from is presumed alive: the shortest election
    /// timeout, or openraft's vote lease once the leader is known gone.
    fn lease(&self) -> Duration {
        if self.gone() {
            self.timing.vote_lease()
        } else {
            self.timing.election_min
        }
    }

    fn pre_vote_granted(&self, candidate: NodeId) {
        *self.pre_voted.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((candidate, Instant::now()));
    }

    /// A candidate with a higher id than `me` that this node granted a
    /// pre-vote within `within`: two voters whose timers ran out together
    /// would split the vote if both campaigned, so the lower id lets the
    /// higher go first (the grant means its log is at least as recent).
    fn yields_to(&self, me: NodeId, within: Duration) -> Option<NodeId> {
        match *self.pre_voted.lock().unwrap_or_else(|p| p.into_inner()) {
            Some((c, at)) if c > me && at.elapsed() < within => Some(c),
            _ => None,
        }
    }

    /// A leader was heard from.
    pub fn touch(&self) {
        self.voted();
        *self.heard.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        self.gone.store(false, Ordering::Relaxed);
    }

    /// How long ago a leader was last heard from; `None` if never since this
    /// node started. A follower has applied nothing the leader committed after.
    pub fn leader_contact(&self) -> Option<Duration> {
        self.heard
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|at| at.elapsed())
    }

    /// A vote was granted: an election is under way, so this node's timer
    /// starts again, but a leader found gone stays gone until one is heard.
    pub fn voted(&self) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    fn age(&self) -> Duration {
        self.last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
    }

    /// The leader as this node reports it: itself while it leads, the leader
    /// it follows while it hears from it. A follower that has heard from no
    /// leader for the longest election timeout, or found it gone, knows none,
    /// even when the pre-vote keeps it from campaigning (openraft would still
    /// name the lost leader until the next election).
    pub fn leader(&self, m: &RaftMetrics<NodeId, Node>) -> Option<NodeId> {
        match m.current_leader {
            Some(l) if l == m.id => Some(l),
            l if self.age() < self.timing.election_max && !self.gone() => l,
            _ => None,
        }
    }
}

#[derive(Serialize, Deserialize)]
pub struct PreVoteRequest {
    pub candidate: NodeId,
    pub last_log_id: Option<LogId<NodeId>>,
}

#[derive(Serialize, Deserialize)]
pub struct PreVoteResponse {
    pub granted: bool,
}

/// Whether this node would vote for the candidate now: not while it heard
/// from a leader within the lease (see [`Contact`]).
pub fn answer_pre_vote(raft: &Raft, contact: &Contact, req: &PreVoteRequest) -> PreVoteResponse {
    let leading = raft.metrics().borrow().state == ServerState::Leader;
    let mine = raft.data_metrics().borrow().last_log;
    let granted = grants_pre_vote(
        leading,
        contact.age(),
        contact.lease(),
        req.last_log_id,
        mine,
    );
    if granted {
        contact.pre_vote_granted(req.candidate);
    }
    tracing::debug!(
        candidate = req.candidate,
        granted,
        "pre-vote (heard from a leader {} ms ago)",
        contact.age().as_millis()
    );
    PreVoteResponse { granted }
}

/// The pre-vote rule: a voter that leads, or heard from a leader within
/// `lease`, refuses; so does one whose log is more up to date than the
/// candidate's.
fn grants_pre_vote(
    leading: bool,
    heard: Duration,
    lease: Duration,
    candidate: Option<LogId<NodeId>>,
    mine: Option<LogId<NodeId>>,
) -> bool {
    // Mutation: the log comparison left out.
    let log_ok = candidate >= mine || mutation::active(Mutation::PreVoteIgnoresLog);
    !leading && heard >= lease && log_ok
}

/// Sends heartbeats while this node leads, every `every`. Ends with Raft.
pub async fn heartbeats(raft: Raft, id: NodeId, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let metrics = raft.metrics();
    loop {
        tick.tick().await;
        if metrics.has_changed().is_err() {
            return;
        }
        let leading = metrics.borrow().current_leader == Some(id);
        if leading && raft.trigger().heartbeat().await.is_err() {
            return;
        }
    }
}

/// One silence's election timer, as [`campaigns`] keeps it.
#[derive(Clone, Copy, Debug)]
struct Timer {
    /// The election timeout drawn for this silence.
    timeout: Duration,
    /// When to campaign instead if the leader is gone (by this node's rank).
    soon: Duration,
    /// Whether this silence's leader was checked for (see `leader_gone`).
    checked: bool,
}

/// What the election timer says to do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// A few heartbeats missed: check whether the leader's process is gone.
    Check,
    /// The timeout ran out: a pre-vote round, then maybe an election.
    Campaign,
    /// Nothing until then, unless a leader is heard from.
    Wait(Duration),
}

impl Timer {
    fn new(timeout: Duration, rank: u32, gone: bool, timing: &Timing) -> Self {
        Timer {
            timeout,
            soon: timing.after_leader_gone(rank),
            checked: gone,
        }
    }

    /// The next step, `heard` after the last leader contact and
    /// `since_attempt` after the last pre-vote round (the next waits a whole
    /// timeout after it too).
    fn step(&self, heard: Duration, since_attempt: Duration, gone: bool, timing: &Timing) -> Step {
        if !self.checked && heard >= timing.suspect() {
            return Step::Check;
        }
        let due = if gone {
            self.timeout.min(self.soon)
        } else {
            self.timeout
        };
        let wait = due
            .saturating_sub(heard)
            .max(due.saturating_sub(since_attempt));
        match wait {
            w if w.is_zero() => Step::Campaign,
            w if self.checked => Step::Wait(w),
            w => Step::Wait(w.min(timing.suspect().saturating_sub(heard))),
        }
    }
}

/// This node's place among the voters when `leader` is gone: the number of
/// other voters with a higher id, which campaign first.
fn campaign_rank(voters: impl Iterator<Item = NodeId>, leader: NodeId, me: NodeId) -> u32 {
    voters.filter(|v| *v != leader && *v > me).count() as u32
}

/// Runs this node's elections: after a random timeout in the configured range
/// without a leader, a pre-vote round, and an election if a quorum would vote
/// for this node. Ends with Raft.
pub async fn campaigns(raft: Raft, me: Identity, peers: Peers, contact: Contact, timing: Timing) {
    // The last pre-vote round: the next waits a whole timeout after it too.
    let mut attempted = Instant::now();
    // Whether the last round campaigned. Two voters that campaign at the same
    // moment split the vote and neither wins; waiting a whole election
    // timeout again would double the time without a leader, so the next try
    // comes after a short random pause, unless a leader was heard since.
    let mut campaigned = false;
    // This node's place among the voters left when the leader was last found gone.
    let mut rank = 0;
    let draw = |campaigned: bool| {
        if campaigned {
            retry_pause(timing)
        } else {
            random_between(timing.election_min, timing.election_max)
        }
    };
    loop {
        campaigned &= contact.age() >= attempted.elapsed();
        let mut timer = Timer::new(draw(campaigned), rank, contact.gone(), &timing);
        loop {
            let heard = contact.age();
            match timer.step(heard, attempted.elapsed(), contact.gone(), &timing) {
                Step::Campaign => break,
                Step::Check => {
                    timer.checked = true;
                    if let Some(r) = leader_gone(&raft, &me, &peers, timing.rpc_timeout).await {
                        rank = r;
                        timer.soon = timing.after_leader_gone(rank);
                        contact.gone.store(true, Ordering::Relaxed);
                    }
                }
                Step::Wait(nap) => {
                    tokio::time::sleep(nap).await;
                    // A leader was heard from meanwhile: the silence that
                    // follows gets a timeout drawn afresh, as Raft resets its
                    // timer. Kept for the whole leadership, one short draw
                    // would make this voter the first to campaign after every
                    // crash, a long one the last.
                    if contact.age() < heard + nap {
                        timer = Timer::new(draw(false), rank, contact.gone(), &timing);
                    }
                }
            }
        }
        match round(&raft, &me, &peers, &contact, timing).await {
            Some(c) => campaigned = c,
            None => return,
        }
        attempted = Instant::now();
    }
}

/// A pre-vote round and, if a quorum would elect this node, an election.
/// Whether it campaigned; `None` once Raft has stopped.
async fn round(
    raft: &Raft,
    me: &Identity,
    peers: &Peers,
    contact: &Contact,
    timing: Timing,
) -> Option<bool> {
    let metrics = raft.metrics();
    metrics.has_changed().ok()?;
    let (may_campaign, term) = {
        let m = metrics.borrow();
        let voter = m
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == me.node_id);
        (
            voter && matches!(m.state, ServerState::Follower | ServerState::Candidate),
            m.current_term,
        )
    };
    let campaigned = may_campaign
        && pre_vote(raft, me, peers, timing.rpc_timeout).await
        // A vote granted (or a leader heard) while the pre-vote was out
        // means an election is under way: campaigning now would depose
        // the leader it makes (seen: 1.65 s without one). Openraft takes
        // the candidate's term before it answers (it first writes the
        // vote to disk), so the term shows the grant before `contact`.
        && contact.age() >= contact.lease()
        && metrics.borrow().current_term == term;
    if !campaigned {
        return Some(false);
    }
    if let Some(other) = contact.yields_to(me.node_id, timing.rpc_timeout) {
        tracing::debug!("node {other} is campaigning too: letting it go first");
        return Some(true);
    }
    // Raft stopped while the pre-vote was out (a node shutting down):
    // calling into it now only logs openraft's "core stopped" ERROR.
    metrics.has_changed().ok()?;
    tracing::info!(
        "no leader heard from for {} ms and a quorum would elect this node: campaigning after term {term}",
        contact.age().as_millis()
    );
    raft.trigger().elect().await.ok()?;
    Some(true)
}

/// The pause before campaigning again after an election that made no leader:
/// at least two heartbeat intervals, so that an election still collecting
/// votes over a slow link is not cut short, spread over the width of the
/// election timeout range so that two candidates drift apart.
fn retry_pause(t: Timing) -> Duration {
    let min = t.heartbeat * 2;
    random_between(min, min + t.election_max.saturating_sub(t.election_min))
}

/// Whether the leader this node follows is gone: its peer port refuses TCP
/// connections, so its process is not running there. A crashed host or a cut
/// link refuses nothing (the attempt times out), and a live leader accepts.
/// If gone, this node's rank among the other voters, highest id first: the
/// order in which they campaign.
async fn leader_gone(raft: &Raft, me: &Identity, peers: &Peers, within: Duration) -> Option<u32> {
    let metrics = raft.metrics();
    let (addr, rank) = {
        let m = metrics.borrow();
        let leader = m.current_leader.filter(|l| *l != me.node_id)?;
        let membership = m.membership_config.membership();
        let rank = campaign_rank(membership.voter_ids(), leader, me.node_id);
        (membership.get_node(&leader)?.peer_addr.clone(), rank)
    };
    let refused = peers.refused(&addr, within).await;
    if refused {
        tracing::info!("the leader's peer port {addr} refuses connections: campaigning without waiting for the election timeout");
    }
    refused.then_some(rank)
}

fn random_between(min: Duration, max: Duration) -> Duration {
    let span = max.saturating_sub(min).as_millis() as u64;
    min + Duration::from_millis(fastrand::u64(0..=span))
}

/// Whether a quorum of every voter configuration (two during a membership
/// change) would elect this node.
async fn pre_vote(raft: &Raft, me: &Identity, peers: &Peers, timeout: Duration) -> bool {
    let (configs, nodes) = {
        let m = raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let nodes: Vec<_> = membership
            .nodes()
            .filter(|(id, _)| **id != me.node_id)
            .map(|(id, n)| (*id, n.clone()))
            .collect();
        (membership.get_joint_config().clone(), nodes)
    };
    let quorum = |granted: &BTreeSet<NodeId>| {
        configs
            .iter()
            .all(|c| c.iter().filter(|n| granted.contains(n)).count() * 2 > c.len())
    };
    let mut granted = BTreeSet::from([me.node_id]);
    if quorum(&granted) {
        return true;
    }
    let req = PreVoteRequest {
        candidate: me.node_id,
        last_log_id: raft.data_metrics().borrow().last_log,
    };
    let mut answers: FuturesUnordered<_> = nodes
        .iter()
        .filter(|(id, _)| configs.iter().any(|c| c.contains(id)))
        .map(|(id, node)| {
            let req = &req;
            async move {
                let answer: Result<PreVoteResponse, String> =
                    extra_call(peers, me, node, Extra::PreVote, req, timeout).await;
                (*id, answer)
            }
        })
        .collect();
    while let Some((id, answer)) = answers.next().await {
        match answer {
            Ok(a) if a.granted => {
                granted.insert(id);
                if quorum(&granted) {
                    return true;
                }
            }
            Ok(_) => {}
            Err(e) => tracing::debug!("pre-vote: node {id}: {e}"),
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_voter_yields_only_to_a_recent_candidate_with_a_higher_id() {
        let c = Contact::new(&Timing {
            heartbeat: Duration::from_millis(50),
            rpc_timeout: Duration::from_millis(400),
            election_min: Duration::from_millis(450),
            election_max: Duration::from_millis(700),
        });
        assert_eq!(c.yields_to(2, Duration::from_secs(1)), None);
        c.pre_vote_granted(3);
        assert_eq!(c.yields_to(2, Duration::from_secs(1)), Some(3));
        // The higher id goes ahead: exactly one of two campaigns proceeds.
        assert_eq!(c.yields_to(3, Duration::from_secs(1)), None);
        assert_eq!(c.yields_to(4, Duration::from_secs(1)), None);
        // A grant older than the window no longer holds this node back.
        assert_eq!(c.yields_to(2, Duration::ZERO), None);
    }

    #[test]
    fn followers_of_a_gone_leader_campaign_in_turn_after_the_vote_lease() {
        let t = Timing {
            heartbeat: Duration::from_millis(50),
            rpc_timeout: Duration::from_millis(500),
            election_min: Duration::from_millis(600),
            election_max: Duration::from_millis(900),
        };
        let first = t.after_leader_gone(0);
        let second = t.after_leader_gone(1);
        assert!(
            first > t.vote_lease() && first < t.election_min,
            "{first:?}"
        );
        // Far enough apart that the second sees the first's vote request.
        assert!(second >= first + Duration::from_millis(20), "{second:?}");
    }

    #[test]
    fn the_retry_after_a_split_vote_is_shorter_than_an_election_timeout() {
        let t = Timing {
            heartbeat: Duration::from_millis(50),
            rpc_timeout: Duration::from_millis(400),
            election_min: Duration::from_millis(450),
            election_max: Duration::from_millis(700),
        };
        for _ in 0..1000 {
            let p = retry_pause(t);
            assert!(
                p >= Duration::from_millis(100) && p <= Duration::from_millis(350),
                "{p:?}"
            );
        }
    }

    fn timing() -> Timing {
        Timing {
            heartbeat: Duration::from_millis(50),
            rpc_timeout: Duration::from_millis(500),
            election_min: Duration::from_millis(600),
            election_max: Duration::from_millis(900),
        }
    }

    fn log(index: u64) -> Option<LogId<NodeId>> {
        Some(LogId::new(openraft::CommittedLeaderId::new(1, 1), index))
    }

    // Paused clock: `advance` moves tokio's time, which `Contact` reads.
    #[tokio::test(start_paused = true)]
    async fn followers_of_a_dead_leader_campaign_in_rank_order_before_the_election_timeout() {
        let t = timing();
        let contact = Contact::new(&t);
        // Node 1 led and died; node 3 campaigns first, node 2 after it.
        let (first, second) = (
            campaign_rank([1, 2, 3].into_iter(), 1, 3),
            campaign_rank([1, 2, 3].into_iter(), 1, 2),
        );
        assert_eq!((first, second), (0, 1));
        let timers = |checked| {
            [first, second].map(|rank| Timer {
                checked,
                ..Timer::new(t.election_max, rank, false, &t)
            })
        };
        let at = |c: &Contact| (c.age(), c.age());
        // A few missed heartbeats: each asks whether the leader's process is there.
        tokio::time::advance(t.suspect()).await;
        let (heard, since) = at(&contact);
        for timer in timers(false) {
            assert_eq!(timer.step(heard, since, false, &t), Step::Check);
        }
        // Its peer port refuses: the leader is gone.
        contact.gone.store(true, Ordering::Relaxed);
        let [a, b] = timers(true);
        tokio::time::advance(t.after_leader_gone(0) - t.suspect()).await;
        let (heard, since) = at(&contact);
        assert_eq!(a.step(heard, since, true, &t), Step::Campaign);
        assert_eq!(b.step(heard, since, true, &t), Step::Wait(t.heartbeat / 2));
        tokio::time::advance(t.heartbeat / 2).await;
        let (heard, since) = at(&contact);
        assert_eq!(b.step(heard, since, true, &t), Step::Campaign);
        assert!(heard < t.election_min, "{heard:?}");
        // Had the leader not been found gone, both would still wait.
        assert!(matches!(a.step(heard, since, false, &t), Step::Wait(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn leader_contact_counts_leader_messages_not_votes() {
        let c = Contact::new(&timing());
        assert_eq!(c.leader_contact(), None, "no leader heard yet");
        c.touch();
        tokio::time::advance(Duration::from_millis(300)).await;
        // A vote restarts the election timer, but is no news from a leader.
        c.voted();
        assert_eq!(c.leader_contact(), Some(Duration::from_millis(300)));
        c.touch();
        assert_eq!(c.leader_contact(), Some(Duration::ZERO));
    }

    #[tokio::test(start_paused = true)]
    async fn a_vote_granted_keeps_the_leader_gone() {
        let t = timing();
        let c = Contact::new(&t);
        c.gone.store(true, Ordering::Relaxed);
        tokio::time::advance(Duration::from_millis(100)).await;
        // An election is under way: the timer restarts, the leader stays gone,
        // so pre-votes are answered after the vote lease, not a full timeout.
        c.voted();
        assert!(c.gone());
        assert_eq!(c.lease(), t.vote_lease());
        tokio::time::advance(t.vote_lease() - Duration::from_millis(1)).await;
        assert!(!grants_pre_vote(false, c.age(), c.lease(), log(5), log(5)));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(grants_pre_vote(false, c.age(), c.lease(), log(5), log(5)));
        // Only a leader heard from brings it back.
        c.touch();
        assert!(!c.gone());
        assert_eq!(c.lease(), t.election_min);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pre_vote_is_refused_while_a_leader_is_heard_or_the_candidate_is_behind() {
        let t = timing();
        let c = Contact::new(&t);
        c.touch();
        tokio::time::advance(t.election_min - Duration::from_millis(1)).await;
        assert!(!grants_pre_vote(false, c.age(), c.lease(), log(5), log(5)));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(grants_pre_vote(false, c.age(), c.lease(), log(5), log(5)));
        assert!(grants_pre_vote(false, c.age(), c.lease(), log(6), log(5)));
        // A candidate missing entries this voter holds would lose them.
        assert!(!grants_pre_vote(false, c.age(), c.lease(), log(4), log(5)));
        assert!(!grants_pre_vote(false, c.age(), c.lease(), None, log(5)));
        // A leader never helps depose itself.
        assert!(!grants_pre_vote(true, c.age(), c.lease(), log(5), log(5)));
    }

    #[tokio::test(start_paused = true)]
    async fn the_timer_wakes_to_check_the_leader_and_restarts_when_one_is_heard() {
        let t = timing();
        let c = Contact::new(&t);
        let timer = Timer::new(t.election_min, 0, false, &t);
        tokio::time::advance(Duration::from_millis(100)).await;
        let w = timer.step(c.age(), c.age(), false, &t);
        // Not past the suspicion point yet: wake then to check the leader.
        assert_eq!(w, Step::Wait(t.suspect() - Duration::from_millis(100)));
        c.touch();
        assert_eq!(
            Timer {
                checked: true,
                ..timer
            }
            .step(c.age(), Duration::from_millis(100), false, &t),
            Step::Wait(t.election_min)
        );
    }
}
