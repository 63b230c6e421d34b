//! The check loop's decisions, apart from its tasks and clocks: which instances
//! carry checks, the status each should have, and which commands bring the
//! catalogue there. The runner feeds it the catalogue's watch messages, probe
//! results and the time, and carries out what it returns.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::tracker::Tracker;
use crate::registry::leases::Leases;
use crate::registry::model::{CheckKind, CheckSpec, HealthUpdate};
use crate::registry::watch::WatchMessage;
use crate::registry::{Command, EventKind, HealthStatus, Instance};

/// A proposal not reflected in the catalogue by then is made again.
const REPROPOSE_AFTER: Duration = Duration::from_secs(2);

/// An instance: (service, id).
pub type Key = (String, String);

/// What the runner must do about probe tasks after the catalogue changed.
#[derive(Debug, PartialEq)]
pub enum ProbeChange {
    /// Stop probing the instance: it is gone, or its check or address changed.
    Stop(Key),
    /// Probe the instance (TTL checks have nothing to probe).
    Start {
        key: Key,
        address: String,
        spec: CheckSpec,
    },
}

#[derive(Clone, Copy, PartialEq)]
enum Proposed {
    Status(HealthStatus),
    Deregister,
}

struct Target {
    /// The instance as the registry holds it.
    inst: Instance,
    spec: CheckSpec,
    tracker: Tracker,
    desired: HealthStatus,
    output: String,
    /// No critical verdict before this: a new leader first gives instances a chance.
    grace_until: Instant,
    /// TTL baseline when no heartbeat has been seen by this leader.
    seen_at: Instant,
    proposed: Option<(Proposed, Instant)>,
}

impl Target {
    fn proposed_recently(&self, what: Proposed, now: Instant) -> bool {
        matches!(self.proposed, Some((p, at)) if p == what && now.duration_since(at) < REPROPOSE_AFTER)
    }

    /// A TTL instance turns critical once its last renewal (or, lacking
    /// one, the moment this leader took it in) is older than the TTL. Until
    /// then it keeps the status the registry holds: its heartbeats set that
    /// (passing, or the status one reported) through Raft themselves, so a
    /// new leader keeps a reported warning rather than guessing.
    fn judge_ttl(&mut self, ttl_ms: u64, renewed: Option<Instant>, now: Instant) {
        let renewed = renewed.map_or(self.seen_at, |r| r.max(self.seen_at));
        let silent = now.duration_since(renewed);
        if silent <= Duration::from_millis(ttl_ms) {
            self.desired = self.inst.status;
            return;
        }
        // Only a change needs words: this runs for every TTL instance on every tick.
        if self.desired != HealthStatus::Critical || self.output.is_empty() {
            self.desired = HealthStatus::Critical;
            self.output = format!(
                "TTL expired: no heartbeat for {} ms (TTL {ttl_ms} ms)",
                silent.as_millis()
            );
        }
    }

    /// The status to propose now, if the desired one differs from the registry's
    /// and is neither held back by grace nor already proposed.
    fn status_due(&mut self, now: Instant) -> Option<HealthStatus> {
        let blocked_by_grace = self.desired == HealthStatus::Critical && now < self.grace_until;
        let what = Proposed::Status(self.desired);
        if self.desired == self.inst.status || blocked_by_grace || self.proposed_recently(what, now)
        {
            return None;
        }
        self.proposed = Some((what, now));
        Some(self.desired)
    }

    /// Whether to propose removing the instance: critical for `deregister_after_ms`.
    fn deregister_due(&mut self, now: Instant, wall_ms: u64) -> bool {
        let after = self.spec.deregister_after_ms;
        let due = self.inst.status == HealthStatus::Critical
            && after > 0
            && wall_ms.saturating_sub(self.inst.status_since_ms) >= after
            && !self.proposed_recently(Proposed::Deregister, now);
        if due {
            self.proposed = Some((Proposed::Deregister, now));
        }
        due
    }
}

/// The checked instances and their verdicts, as one leader sees them.
pub struct Checks {
    leases: Arc<Leases>,
    /// When this node became leader: the start of every initial instance's grace.
    started: Instant,
    /// Set once the first full state has been taken in.
    synced: bool,
    targets: HashMap<Key, Target>,
}

impl Checks {
    pub fn new(leases: Arc<Leases>, started: Instant) -> Self {
        Checks {
            leases,
            started,
            synced: false,
            targets: HashMap::new(),
        }
    }

    /// Takes in a catalogue change; says which probes to start and stop.
    pub fn follow(&mut self, m: WatchMessage, now: Instant) -> Vec<ProbeChange> {
        let mut changes = Vec::new();
        if m.reset.is_some() {
            let keep: HashSet<Key> = m
                .instances
                .iter()
                .map(|i| (i.service.clone(), i.id.clone()))
                .collect();
            let gone: Vec<Key> = self
                .targets
                .keys()
                .filter(|k| !keep.contains(*k))
                .cloned()
                .collect();
            for k in gone {
                self.remove(k, &mut changes);
            }
            for i in m.instances {
                self.upsert(i, now, &mut changes);
            }
            self.synced = true;
        }
        for e in m.events {
            match e.kind {
                EventKind::Put => self.upsert(e.instance, now, &mut changes),
                EventKind::Delete => self.remove((e.instance.service, e.instance.id), &mut changes),
            }
        }
        changes
    }

    fn upsert(&mut self, inst: Instance, now: Instant, changes: &mut Vec<ProbeChange>) {
        let key = (inst.service.clone(), inst.id.clone());
        let Some(spec) = inst.check.clone() else {
            self.remove(key, changes);
            return;
        };
        if let Some(t) = self.targets.get_mut(&key) {
            if t.spec == spec && t.inst.address == inst.address {
                if matches!(t.proposed, Some((Proposed::Status(s), _)) if s == inst.status) {
                    t.proposed = None;
                }
                t.inst = inst;
                return;
            }
            self.remove(key.clone(), changes);
        }
        // Instances present when this node became leader get one interval (or TTL) of grace.
        let grace_until = if self.synced {
            now
        } else {
            self.started + Duration::from_millis(spec.grace_ms())
        };
        if !matches!(spec.kind, CheckKind::Ttl { .. }) {
            changes.push(ProbeChange::Start {
                key: key.clone(),
                address: inst.address.clone(),
                spec: spec.clone(),
            });
        }
        self.targets.insert(
            key,
            Target {
                tracker: Tracker::new(inst.status),
                desired: inst.status,
                output: inst.check_output.clone(),
                inst,
                spec,
                grace_until,
                seen_at: now,
                proposed: None,
            },
        );
    }

    fn remove(&mut self, key: Key, changes: &mut Vec<ProbeChange>) {
        let Some(t) = self.targets.remove(&key) else {
            return;
        };
        if matches!(t.spec.kind, CheckKind::Ttl { .. }) {
            self.leases.forget(&key.0, &key.1);
        } else {
            changes.push(ProbeChange::Stop(key));
        }
    }

    /// Feeds one probe result through the instance's thresholds.
    pub fn record(&mut self, key: &Key, result: Result<String, String>) {
        let Some(t) = self.targets.get_mut(key) else {
            return;
        };
        t.desired = t.tracker.record(
            result.is_ok(),
            t.spec.failures_before_critical,
            t.spec.successes_before_passing,
        );
        t.output = result.unwrap_or_else(|e| e);
    }

    /// The commands that bring the catalogue to the verdicts at `now`: the status
    /// changes as one `SetHealth` (last), and deregistrations. `wall_ms` is what
    /// the statuses record.
    pub fn due(&mut self, now: Instant, wall_ms: u64) -> Vec<Command> {
        let mut commands = Vec::new();
        let mut updates = Vec::new();
        for ((service, id), t) in self.targets.iter_mut() {
            if let CheckKind::Ttl { ttl_ms } = t.spec.kind {
                t.judge_ttl(ttl_ms, self.leases.last_renewal(service, id), now);
            }
            if let Some(status) = t.status_due(now) {
                updates.push(HealthUpdate {
                    service: service.clone(),
                    id: id.clone(),
                    status,
                    output: t.output.clone(),
                    at_ms: wall_ms,
                });
            }
            if t.deregister_due(now, wall_ms) {
                commands.push(Command::Deregister {
                    service: service.clone(),
                    id: id.clone(),
                });
            }
        }
        if !updates.is_empty() {
            commands.push(Command::SetHealth(updates));
        }
        commands
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::leases::TTL_RENEWED;
    use crate::registry::watch::ResetReason;
    use crate::registry::Catalog;

    /// The wall clock when the test's leader was elected.
    const WALL0: u64 = 1_700_000_000_000;
    const INTERVAL_MS: u64 = 1000;

    fn instance(id: &str, kind: CheckKind, thresholds: (u32, u32), deregister_ms: u64) -> Instance {
        Instance {
            address: "10.0.0.1".into(),
            check: Some(CheckSpec {
                kind,
                interval_ms: INTERVAL_MS,
                timeout_ms: 500,
                failures_before_critical: thresholds.0,
                successes_before_passing: thresholds.1,
                deregister_after_ms: deregister_ms,
            }),
            ..Instance::example("svc", id)
        }
    }

    fn tcp(id: &str, thresholds: (u32, u32)) -> Instance {
        instance(id, CheckKind::Tcp { port: 80 }, thresholds, 0)
    }

    fn ttl(id: &str, ttl_ms: u64) -> Instance {
        instance(id, CheckKind::Ttl { ttl_ms }, (1, 1), 0)
    }

    fn key(id: &str) -> Key {
        ("svc".into(), id.into())
    }

    /// A leader's checker over a catalogue, on a clock of the test's own: what
    /// it proposes is applied at once and comes back as the watch sends it.
    struct Leader {
        catalog: Catalog,
        checks: Checks,
        leases: Arc<Leases>,
        elected: Instant,
        now: Instant,
    }

    impl Leader {
        /// Takes over `instances` as replicated before this node led.
        fn elected(instances: Vec<Instance>) -> Self {
            let catalog = Catalog::from_parts(1, instances, []);
            let leases = Arc::new(Leases::default());
            let now = Instant::now();
            let mut checks = Checks::new(leases.clone(), now);
            checks.follow(
                WatchMessage {
                    revision: catalog.revision(),
                    reset: Some(ResetReason::Initial),
                    instances: catalog.all_instances().cloned().collect(),
                    events: vec![],
                    compact_revision: 0,
                },
                now,
            );
            Leader {
                catalog,
                checks,
                leases,
                elected: now,
                now,
            }
        }

        fn advance(&mut self, ms: u64) {
            self.now += Duration::from_millis(ms);
        }

        fn wall(&self) -> u64 {
            WALL0 + self.now.duration_since(self.elected).as_millis() as u64
        }

        /// Applies `cmd` as the next entry and passes its events on, as the watch does.
        fn apply(&mut self, cmd: &Command) -> Vec<ProbeChange> {
            let rev = self.catalog.revision() + 1;
            let (_, events) = self.catalog.apply(rev, cmd);
            let m = WatchMessage {
                revision: rev,
                reset: None,
                instances: vec![],
                events,
                compact_revision: 0,
            };
            self.checks.follow(m, self.now)
        }

        /// One tick: the commands found due, each applied.
        fn tick(&mut self) -> Vec<Command> {
            let cmds = self.checks.due(self.now, self.wall());
            for c in &cmds {
                self.apply(c);
            }
            cmds
        }

        fn probe(&mut self, id: &str, ok: bool) {
            let result = if ok {
                Ok("up".into())
            } else {
                Err("refused".into())
            };
            self.checks.record(&key(id), result);
        }

        /// A heartbeat as the leader's API takes it: the lease renewed, and
        /// the status it reports (passing unless told) set through Raft
        /// if it differs.
        fn heartbeat(&mut self, id: &str) {
            self.report(id, HealthStatus::Passing, TTL_RENEWED);
        }

        fn report(&mut self, id: &str, status: HealthStatus, output: &str) {
            self.leases.renew_at("svc", id, self.now);
            if self.status(id) != status {
                self.apply(&Command::SetHealth(vec![HealthUpdate {
                    service: "svc".into(),
                    id: id.into(),
                    status,
                    output: output.into(),
                    at_ms: self.wall(),
                }]));
            }
        }

        fn get(&self, id: &str) -> &Instance {
            self.catalog.get("svc", id).expect("instance")
        }

        fn status(&self, id: &str) -> HealthStatus {
            self.get(id).status
        }
    }

    /// The status updates of `cmds`: (id, status).
    fn updates(cmds: &[Command]) -> Vec<(String, HealthStatus)> {
        let mut v: Vec<_> = cmds
            .iter()
            .flat_map(|c| match c {
                Command::SetHealth(u) => u.iter().map(|u| (u.id.clone(), u.status)).collect(),
                _ => vec![],
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    #[test]
    fn a_new_leader_grants_grace_before_critical() {
        let mut l = Leader::elected(vec![tcp("probed", (1, 1)), ttl("ttl", 3000)]);
        l.probe("probed", false);
        assert_eq!(l.tick(), []);
        l.advance(INTERVAL_MS - 1);
        l.probe("probed", false);
        assert_eq!(l.tick(), [], "critical within the grace");
        l.advance(2);
        assert_eq!(
            updates(&l.tick()),
            [("probed".into(), HealthStatus::Critical)]
        );
        assert_eq!(l.status("probed"), HealthStatus::Critical);
        assert_eq!(l.get("probed").status_since_ms, WALL0 + INTERVAL_MS + 1);
        assert_eq!(l.get("probed").check_output, "refused");

        // A TTL instance's grace is its TTL, counted from the election.
        l.advance(3000 - INTERVAL_MS - 1);
        assert_eq!(l.tick(), []);
        l.advance(1);
        assert_eq!(updates(&l.tick()), [("ttl".into(), HealthStatus::Critical)]);

        // An instance registered under this leader gets none.
        let changes = l.apply(&Command::Register(tcp("late", (1, 1))));
        assert!(matches!(&changes[..], [ProbeChange::Start { key: k, .. }] if *k == key("late")));
        l.probe("late", false);
        assert_eq!(
            updates(&l.tick()),
            [("late".into(), HealthStatus::Critical)]
        );
    }

    #[test]
    fn a_ttl_instance_turns_critical_unless_renewed() {
        let mut l = Leader::elected(vec![]);
        for id in ["kept", "silent"] {
            assert_eq!(l.apply(&Command::Register(ttl(id, 1000))), [], "no probe");
        }
        for step in 1..=10 {
            l.advance(400);
            l.heartbeat("kept");
            l.tick();
            assert_eq!(l.status("kept"), HealthStatus::Passing);
            let expected = if step * 400 > 1000 {
                HealthStatus::Critical
            } else {
                HealthStatus::Passing
            };
            assert_eq!(l.status("silent"), expected, "after {} ms", step * 400);
        }
        assert!(l.get("silent").check_output.starts_with("TTL expired"));
        assert_eq!(l.get("silent").status_since_ms, WALL0 + 1200);

        l.heartbeat("silent");
        assert_eq!(l.tick(), [], "the heartbeat revived it itself");
        assert_eq!(l.get("silent").check_output, TTL_RENEWED);
    }

    #[test]
    fn a_reported_status_holds_until_the_ttl_runs_out() {
        let mut l = Leader::elected(vec![]);
        l.apply(&Command::Register(ttl("self", 1000)));
        for status in [HealthStatus::Warning, HealthStatus::Critical] {
            for _ in 0..3 {
                l.advance(400);
                l.report("self", status, "queue backing up");
                assert_eq!(l.tick(), [], "renewed: the report holds");
                assert_eq!(l.status("self"), status);
            }
        }
        l.report("self", HealthStatus::Warning, "queue backing up");
        l.advance(1001);
        assert_eq!(
            updates(&l.tick()),
            [("self".into(), HealthStatus::Critical)]
        );
        assert!(l.get("self").check_output.starts_with("TTL expired"));
        // A new leader keeps the reported status while the TTL holds.
        let mut warned = ttl("other", 1000);
        warned.status = HealthStatus::Warning;
        let mut l = Leader::elected(vec![warned]);
        l.advance(500);
        assert_eq!(l.tick(), []);
        assert_eq!(l.status("other"), HealthStatus::Warning);
    }

    #[test]
    fn thresholds_count_consecutive_results() {
        let mut l = Leader::elected(vec![tcp("a", (3, 2))]);
        l.advance(INTERVAL_MS + 1);
        for _ in 0..2 {
            l.probe("a", false);
            assert_eq!(l.tick(), []);
        }
        l.probe("a", true);
        l.probe("a", false);
        l.probe("a", false);
        assert_eq!(l.tick(), [], "a success restarts the count");
        l.probe("a", false);
        assert_eq!(updates(&l.tick()), [("a".into(), HealthStatus::Critical)]);
        l.probe("a", true);
        assert_eq!(l.tick(), []);
        l.probe("a", true);
        assert_eq!(updates(&l.tick()), [("a".into(), HealthStatus::Passing)]);
        assert_eq!(l.get("a").check_output, "up");
    }

    #[test]
    fn alternating_results_do_not_flip_status() {
        let mut critical = tcp("down", (2, 2));
        critical.status = HealthStatus::Critical;
        let mut l = Leader::elected(vec![tcp("up", (2, 2)), critical]);
        l.advance(INTERVAL_MS + 1);
        for i in 0..50 {
            l.probe("up", i % 2 == 0);
            l.probe("down", i % 2 == 1);
            l.advance(100);
            assert_eq!(l.tick(), [], "after {} results", i + 1);
        }
        assert_eq!(l.status("up"), HealthStatus::Passing);
        assert_eq!(l.status("down"), HealthStatus::Critical);
    }

    #[test]
    fn an_unapplied_proposal_is_made_again_later() {
        let mut l = Leader::elected(vec![tcp("a", (1, 1))]);
        l.advance(INTERVAL_MS + 1);
        l.probe("a", false);
        let wall = l.wall();
        // Proposed but lost: not applied, so the catalogue still says passing.
        assert_eq!(updates(&l.checks.due(l.now, wall)).len(), 1);
        l.advance(REPROPOSE_AFTER.as_millis() as u64 - 1);
        assert_eq!(l.tick(), []);
        l.advance(1);
        assert_eq!(updates(&l.tick()), [("a".into(), HealthStatus::Critical)]);
    }

    #[test]
    fn a_critical_instance_is_deregistered_after_its_limit() {
        let mut l = Leader::elected(vec![instance(
            "a",
            CheckKind::Tcp { port: 80 },
            (1, 1),
            5000,
        )]);
        l.advance(INTERVAL_MS + 1);
        l.probe("a", false);
        l.tick();
        assert_eq!(l.status("a"), HealthStatus::Critical);
        l.advance(4999);
        assert_eq!(l.tick(), []);
        l.advance(1);
        let cmds = l.checks.due(l.now, l.wall());
        let dereg = Command::Deregister {
            service: "svc".into(),
            id: "a".into(),
        };
        assert_eq!(cmds, std::slice::from_ref(&dereg));
        assert_eq!(l.apply(&dereg), [ProbeChange::Stop(key("a"))]);
        assert_eq!(l.tick(), []);
    }

    #[test]
    fn a_changed_check_restarts_the_probe() {
        let mut l = Leader::elected(vec![tcp("a", (1, 1))]);
        let mut moved = tcp("a", (1, 1));
        moved.address = "10.0.0.2".into();
        let changes = l.apply(&Command::Register(moved));
        assert!(matches!(
            &changes[..],
            [ProbeChange::Stop(k1), ProbeChange::Start { key: k2, address, .. }]
                if *k1 == key("a") && *k2 == key("a") && address == "10.0.0.2"
        ));
        // Re-registered without a check: no longer probed.
        let mut unchecked = tcp("a", (1, 1));
        unchecked.check = None;
        assert_eq!(
            l.apply(&Command::Register(unchecked)),
            [ProbeChange::Stop(key("a"))]
        );
    }
}
