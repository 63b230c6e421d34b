//! Deliberate bugs the deterministic simulation must catch (`crate::sim`):
//! each turns off one line of a real mechanism. They exist only with the
//! `sim` feature; without it [`active`] is a constant `false`.

/// One deliberately broken variant of Roster's Raft layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mutation {
    /// An append is reported durable before the flush that covers it.
    AckBeforeFlush,
    /// A leader that lost its quorum keeps leading (no check-quorum).
    NoStepDown,
    /// A pre-vote is granted whatever the candidate's log holds.
    PreVoteIgnoresLog,
    /// The marker claims one entry more than the log holds.
    MarkerAhead,
    /// A node that led when it stopped leads again in the same term (the
    /// lost write of the 2026-12-07 soak, fixed by `LogStore::resign`).
    LeadAgainInSameTerm,
}

#[cfg(feature = "sim")]
impl Mutation {
    pub const ALL: [Mutation; 5] = [
        Mutation::AckBeforeFlush,
        Mutation::NoStepDown,
        Mutation::PreVoteIgnoresLog,
        Mutation::MarkerAhead,
        Mutation::LeadAgainInSameTerm,
    ];
}

#[cfg(feature = "sim")]
thread_local! {
    /// Per thread: each simulated cluster runs on one thread.
    static ACTIVE: std::cell::Cell<Option<Mutation>> = const { std::cell::Cell::new(None) };
}

/// Turns `m` on (or every mutation off) for the simulation on this thread.
#[cfg(feature = "sim")]
pub fn set(m: Option<Mutation>) {
    ACTIVE.with(|a| a.set(m));
}

#[cfg(feature = "sim")]
pub fn active(m: Mutation) -> bool {
    ACTIVE.with(|a| a.get() == Some(m))
}

#[cfg(not(feature = "sim"))]
#[inline(always)]
pub fn active(_: Mutation) -> bool {
    false
}
