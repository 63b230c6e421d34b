//! The nemesis: a seeded fault every 50-400 ms (cuts, crashes keeping some
//! of the unflushed writes, full disks, failed flushes and marker writes,
//! network weather, snapshots, stops, membership changes).

use super::*;

impl World {
    /// Picks a fault every 50-400 ms until `end`.
    pub(super) async fn nemesis(self: Arc<Self>, end: Instant) {
        loop {
            let pause = self.rng(|r| r.u64(50..400));
            tokio::time::sleep(Duration::from_millis(pause)).await;
            if Instant::now() >= end {
                return;
            }
            let ids = self.ids();
            let (pick, a, b, k) = self.rng(|r| {
                (
                    r.u32(0..15),
                    ids[r.usize(..ids.len())],
                    ids[r.usize(..ids.len())],
                    r.u64(..),
                )
            });
            // Faults aimed at the leader half the time: that is where they bite.
            let a = match self.leader() {
                Some(l) if k % 2 == 0 => l,
                _ => a,
            };
            self.inflict(pick, a, b, k).await;
        }
    }

    /// Fault `pick` (of 15), aimed at `a` (and `b`), with `k` for its details.
    async fn inflict(self: &Arc<Self>, pick: u32, a: NodeId, b: NodeId, k: u64) {
        match pick {
            0 => {
                for o in self.ids().into_iter().filter(|o| *o != a) {
                    self.net.cut(a, o);
                    self.net.cut(o, a);
                }
                self.fault(format!("node {a} cut off"));
            }
            1 if a != b => {
                self.net.cut(a, b);
                self.fault(format!("link {a} -> {b} cut (one way)"));
            }
            2 | 3 => {
                self.net.heal();
                self.fault("network healed".into());
            }
            4 | 5 => self.crash_some(a, k),
            6 => self.stop(a, Duration::from_millis(k % 1000 + 50)).await,
            7 => self.fill_disk(a, k),
            8 => {
                if let Some(m) = lock(&self.members).get(&a) {
                    m.disk.fail_flushes(1);
                }
                self.fault(format!("node {a}'s next flush fails"));
            }
            9 => {
                if let Some(m) = lock(&self.members).get(&a) {
                    m.disk.fail_marker_writes(1);
                }
                self.fault(format!("node {a}'s next marker write fails"));
            }
            10 => self.change_weather(k),
            11 => {
                if let Some(r) = self.replica(a) {
                    let _ = r.raft.trigger().snapshot().await;
                    self.fault(format!("node {a} builds a snapshot"));
                }
            }
            12..=14 => self.change_membership(a, k >> 16).await,
            _ => {}
        }
    }

    /// Crashes `a`, keeping none, all or a prefix of its unflushed writes.
    fn crash_some(self: &Arc<Self>, a: NodeId, k: u64) {
        let kept = self.rng(|r| r.u32(0..3));
        let n = lock(&self.members)
            .get(&a)
            .map_or(0, |m| m.disk.unflushed());
        let keep = match kept {
            0 => 0,
            1 => n,
            _ => (k as usize >> 8) % (n + 1),
        };
        if self.crash(a, |_| keep) {
            self.fault(format!(
                "node {a} crashes, keeping {keep} of {n} unflushed writes"
            ));
            self.restart_later(a, Duration::from_millis(k % 1500 + 20));
        }
    }

    /// `a`'s disk is full for a while.
    fn fill_disk(&self, a: NodeId, k: u64) {
        let ms = k % 1200 + 100;
        if let Some(d) = lock(&self.members).get(&a).map(|m| m.disk.clone()) {
            d.set_full(true);
            self.fault(format!("node {a}'s disk is full for {ms} ms"));
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                d.set_full(false);
            });
        }
    }

    /// Calm, or delays, losses and duplicates.
    fn change_weather(&self, k: u64) {
        let rough = k.is_multiple_of(3);
        self.net.set_weather(if rough {
            Weather {
                delay_min: Duration::from_micros(500),
                delay_max: Duration::from_millis(k % 30 + 5),
                loss: (k % 150) as u32,
                duplicate: 50,
            }
        } else {
            Weather::calm()
        });
        self.fault(format!("weather {:?}", self.net.weather()));
    }

    /// A stop by SIGTERM, as `NodeHandle::shutdown` does it: stop proposing,
    /// hand leadership over, stop Raft, sync the log; back after `down`.
    async fn stop(self: &Arc<Self>, id: NodeId, down: Duration) {
        let Some(replica) = self.replica(id) else {
            return;
        };
        self.fault(format!("node {id} is stopped (SIGTERM)"));
        replica.proposer.close();
        let to = leadership::transfer(
            &replica.raft,
            &replica.me,
            &replica.peers,
            leadership::TRANSFER_LIMIT,
        )
        .await;
        if let Some(to) = to {
            self.fault(format!("node {id} handed leadership to node {to}"));
        }
        let _ = replica.raft.shutdown().await;
        let synced = replica.log.sync().await.is_ok();
        if self.crash(id, |n| if synced { n } else { 0 }) {
            self.restart_later(id, down);
        }
    }

    /// Through the leader: the spare node joins as a learner, is made a
    /// voter, or is removed and wiped; or a voter is made a learner, or
    /// every initial member a voter again.
    async fn change_membership(self: &Arc<Self>, id: NodeId, k: u64) {
        let Some(leader) = self.leader().and_then(|l| self.replica(l)) else {
            return;
        };
        if k.is_multiple_of(2) {
            return self.move_spare(&leader).await;
        }
        let voters: std::collections::BTreeSet<NodeId> = leader
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect();
        let all: std::collections::BTreeSet<NodeId> = self.ids().into_iter().collect();
        let (next, what) = if voters != all {
            (all, "every member is a voter again".to_string())
        } else if voters.len() > 3 || (voters.len() == 3 && id != leader.me.node_id) {
            let mut v = voters.clone();
            v.remove(&id);
            (v, format!("node {id} is made a learner"))
        } else {
            return;
        };
        let change = tokio::time::timeout(
            Duration::from_secs(2),
            leader.raft.change_membership(next, true),
        )
        .await;
        if matches!(change, Ok(Ok(_))) {
            self.fault(what);
        }
    }

    async fn move_spare(self: &Arc<Self>, leader: &Replica) {
        let spare = self.spare();
        let m = leader.raft.metrics().borrow().membership_config.clone();
        let membership = m.membership();
        let limit = Duration::from_secs(2);
        let (change, what) = if membership.get_node(&spare).is_none() {
            self.start_member(spare).await;
            // As `AddMember` does: the new node is asked who it is, and added
            // bound to its data directory.
            let Some(incarnation) = lock(&self.members)
                .get(&spare)
                .and_then(|m| m.identity.as_ref().map(|i| i.incarnation))
            else {
                return;
            };
            let node = Node {
                addr: format!("node{spare}:5000"),
                peer_addr: net::peer_addr(spare),
                incarnation,
                replica: false,
            };
            let add = tokio::time::timeout(limit, leader.raft.add_learner(spare, node, false));
            (add.await.is_ok_and(|r| r.is_ok()), "joins as a learner")
        } else if membership.voter_ids().all(|v| v != spare) {
            let mut voters: std::collections::BTreeSet<NodeId> = membership.voter_ids().collect();
            voters.insert(spare);
            let change = leader.raft.change_membership(voters, true);
            let done = tokio::time::timeout(limit, change).await;
            (done.is_ok_and(|r| r.is_ok()), "is made a voter")
        } else {
            let voters: std::collections::BTreeSet<NodeId> =
                membership.voter_ids().filter(|v| *v != spare).collect();
            let change = leader.raft.change_membership(voters, false);
            let done = tokio::time::timeout(limit, change)
                .await
                .is_ok_and(|r| r.is_ok());
            if done {
                // Removed: stopped and wiped, to join again as a new node.
                self.crash(spare, |n| n);
                lock(&self.members).insert(spare, Member::new());
            }
            (done, "is removed and wiped")
        };
        if change {
            self.fault(format!("node {spare} {what}"));
        }
    }
}
