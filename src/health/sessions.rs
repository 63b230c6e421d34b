//! Session expiry on the leader. A session not renewed within its TTL is
//! ended; every session due in one tick ends in one Raft entry. A new leader
//! counts from its election at the earliest: renewals sent to the old leader
//! were not replicated, so each session gets one TTL of grace.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::registry::leases::Leases;
use crate::registry::Command;

/// How long an expiry proposed but not yet applied waits before it is
/// proposed again.
const REPROPOSE_AFTER: Duration = Duration::from_secs(1);
/// How often renewals and proposals of ended sessions are forgotten.
const PRUNE_EVERY: Duration = Duration::from_secs(10);

pub struct Expiry {
    leases: Arc<Leases>,
    started: Instant,
    proposed: HashMap<String, Instant>,
    pruned: Instant,
}

impl Expiry {
    pub fn new(leases: Arc<Leases>, started: Instant) -> Self {
        Expiry {
            leases,
            started,
            proposed: HashMap::new(),
            pruned: started,
        }
    }

    /// The command ending the sessions due at `now`, if any; `open` lists
    /// each open session's id and TTL.
    pub fn due<'a>(
        &mut self,
        open: impl Iterator<Item = (&'a str, u64)>,
        now: Instant,
        wall_ms: u64,
    ) -> Option<Command> {
        let prune = now.saturating_duration_since(self.pruned) >= PRUNE_EVERY;
        let mut seen = HashSet::new();
        let mut ids = Vec::new();
        for (id, ttl_ms) in open {
            if prune {
                seen.insert(id);
            }
            let since = self
                .leases
                .session_renewed(id)
                .map_or(self.started, |at| at.max(self.started));
            let expired = now.saturating_duration_since(since) >= Duration::from_millis(ttl_ms);
            let pending = self
                .proposed
                .get(id)
                .is_some_and(|at| now.saturating_duration_since(*at) < REPROPOSE_AFTER);
            if expired && !pending {
                self.proposed.insert(id.to_string(), now);
                ids.push(id.to_string());
            }
        }
        if prune {
            self.pruned = now;
            self.proposed.retain(|id, _| seen.contains(id.as_str()));
            self.leases.retain_sessions(|id| seen.contains(id));
        }
        (!ids.is_empty()).then_some(Command::EndSessions {
            ids,
            expired: true,
            at_ms: wall_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ended(cmd: Option<Command>) -> Vec<String> {
        match cmd {
            Some(Command::EndSessions { ids, expired, .. }) => {
                assert!(expired);
                ids
            }
            None => vec![],
            Some(other) => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn renewed_sessions_live_silent_ones_end_together() {
        let t0 = Instant::now();
        let leases = Arc::new(Leases::default());
        let mut e = Expiry::new(leases.clone(), t0);
        let open = [("a", 1_000), ("b", 1_000), ("c", 5_000)];
        let at = |ms| t0 + Duration::from_millis(ms);
        // Within the grace every session lives, renewed or not.
        assert!(ended(e.due(open.into_iter(), at(999), 0)).is_empty());
        leases.renew_sessions(["a"], at(900));
        let due = ended(e.due(open.into_iter(), at(1_000), 0));
        assert_eq!(due, ["b"], "a was renewed, c has a longer TTL");
        // Proposed once; again only if still open a while later.
        assert!(ended(e.due(open.into_iter(), at(1_100), 0)).is_empty());
        assert_eq!(ended(e.due(open.into_iter(), at(2_000), 0)), ["a", "b"]);
        leases.renew_sessions(["c"], at(4_000));
        assert!(!ended(e.due([("c", 5_000)].into_iter(), at(8_999), 0)).contains(&"c".into()));
        assert_eq!(
            ended(e.due([("c", 5_000)].into_iter(), at(9_000), 0)),
            ["c"]
        );
    }

    #[test]
    fn a_renewal_before_the_election_counts_from_the_election() {
        let t0 = Instant::now();
        let leases = Arc::new(Leases::default());
        leases.renew_sessions(["a"], t0);
        let elected = t0 + Duration::from_millis(800);
        let mut e = Expiry::new(leases, elected);
        let open = || [("a", 1_000)].into_iter();
        assert!(ended(e.due(open(), t0 + Duration::from_millis(1_500), 0)).is_empty());
        assert_eq!(
            ended(e.due(open(), t0 + Duration::from_millis(1_800), 7)),
            ["a"]
        );
    }

    #[test]
    fn ended_sessions_are_forgotten() {
        let t0 = Instant::now();
        let leases = Arc::new(Leases::default());
        leases.renew_sessions(["gone", "kept"], t0);
        let mut e = Expiry::new(leases.clone(), t0);
        e.due([("kept", 60_000)].into_iter(), t0 + PRUNE_EVERY, 0);
        assert!(leases.session_renewed("gone").is_none());
        assert!(leases.session_renewed("kept").is_some());
    }
}
