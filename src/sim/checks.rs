//! What a run checks: as it goes (a leader under its own committed vote, one
//! entry per applied index, one state per revision, check-quorum judged by
//! reachability) and at the end (the final reads, log matching).

use super::*;

impl World {
    /// Checks Raft's invariants on every member every few milliseconds.
    pub(super) async fn monitor(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        loop {
            tick.tick().await;
            for (id, replica) in self.running() {
                let metrics = replica.raft.metrics();
                let m = metrics.borrow();
                let mut o = lock(&self.observed);
                // Check-quorum: a leader cut off from its quorum steps down
                // within its lease (plus the poll and an RPC deadline).
                let cut_off = self.cut_off(id, &m);
                let since = o.cut_off.get(&id).copied();
                match (cut_off, since) {
                    (false, _) => {
                        o.cut_off.remove(&id);
                    }
                    (true, None) => {
                        o.cut_off.insert(id, Instant::now());
                    }
                    (true, Some(t)) if m.state == ServerState::Leader => {
                        let limit = self.timing.election_max
                            + self.timing.rpc_timeout
                            + self.timing.heartbeat * 4;
                        if t.elapsed() > limit {
                            let v = format!(
                                "node {id} still leads {} ms after it was cut off from its quorum",
                                t.elapsed().as_millis()
                            );
                            o.violations.push(v);
                            o.cut_off.remove(&id);
                        }
                    }
                    _ => {}
                }
                // Openraft's leader ids are (term, node): two nodes may lead
                // one term, but a leader's id names it, and its vote is committed.
                if m.state == ServerState::Leader
                    && (m.vote.leader_id().voted_for() != Some(id) || !m.vote.is_committed())
                {
                    let v = format!("node {id} leads under vote {}", m.vote);
                    o.violations.push(v);
                }
                if let Some(applied) = m.last_applied {
                    match o.applied.get(&applied.index) {
                        Some(l) if *l != applied => {
                            let v = format!(
                                "index {} applied as {l} on one node and as {applied} on node {id}",
                                applied.index
                            );
                            o.violations.push(v);
                        }
                        Some(_) => {}
                        None => {
                            o.applied.insert(applied.index, applied);
                        }
                    }
                }
                let (revision, digest) = digest(&replica);
                match o.states.get(&revision) {
                    Some(d) if *d != digest => {
                        let v = format!(
                            "node {id}'s state at revision {revision} differs from another node's"
                        );
                        o.violations.push(v);
                    }
                    Some(_) => {}
                    None => {
                        o.states.insert(revision, digest);
                    }
                }
            }
        }
    }

    /// Whether member `id` cannot reach a quorum of the voters (itself
    /// included) both ways.
    fn cut_off(&self, id: NodeId, m: &openraft::RaftMetrics<NodeId, Node>) -> bool {
        let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
        let reachable = voters
            .iter()
            .filter(|v| {
                **v == id
                    || (!self.net.is_cut(id, **v)
                        && !self.net.is_cut(**v, id)
                        && self.replica(**v).is_some())
            })
            .count();
        reachable * 2 <= voters.len()
    }

    /// A write to a key of its own (the fence every watcher must reach),
    /// then a linearizable read of every key, so that a lost write shows.
    /// Returns the fence's revision.
    pub(super) async fn final_reads(self: &Arc<Self>) -> u64 {
        self.operation(FINAL_READER, KEYS, Input::Put(u64::MAX))
            .await;
        for key in 0..=KEYS {
            self.operation(FINAL_READER, key, Input::Get).await;
        }
        lock(&self.history)
            .iter()
            .find(|r| r.client == FINAL_READER && r.input == Input::Put(u64::MAX))
            .and_then(|r| r.revision)
            .unwrap_or(0)
    }

    /// Log matching: entries at the same index and term are the same on
    /// every member, and every applied entry is still in the logs or
    /// covered by a snapshot. (A node that is no member any more, such as a
    /// joining node whose addition was lost with its leader, keeps a stale
    /// log nobody replicates to: it is left out.)
    pub(super) async fn check_logs(&self) {
        let members = self.membership().unwrap_or_default();
        let mut logs = BTreeMap::new();
        for (id, replica) in self.running() {
            if !members.contains(&id) {
                continue;
            }
            let mut reader = replica.log.clone();
            match reader.try_get_log_entries(0..).await {
                Ok(entries) => {
                    logs.insert(id, entries);
                }
                Err(e) => self.violation(format!("node {id}'s log cannot be read: {e}")),
            }
        }
        let mut seen: BTreeMap<LogId<NodeId>, (NodeId, Vec<u8>)> = BTreeMap::new();
        for (id, entries) in &logs {
            for e in entries {
                let bytes = crate::raft::encode(&e.payload).unwrap_or_default();
                match seen.get(&e.log_id) {
                    Some((other, b)) if *b != bytes => self.violation(format!(
                        "log matching: entry {} differs between nodes {other} and {id}",
                        e.log_id
                    )),
                    Some(_) => {}
                    None => {
                        seen.insert(e.log_id, (*id, bytes));
                    }
                }
            }
        }
        let applied: Vec<LogId<NodeId>> = lock(&self.observed).applied.values().copied().collect();
        for (id, entries) in &logs {
            let Some(first) = entries.first().map(|e| e.log_id.index) else {
                continue;
            };
            for l in applied.iter().filter(|l| l.index >= first) {
                let held = entries.iter().find(|e| e.log_id.index == l.index);
                if held.map(|e| e.log_id) != Some(*l) {
                    self.violation(format!(
                        "applied entry {l} is not in node {id}'s log (it holds {:?})",
                        held.map(|e| e.log_id)
                    ));
                }
            }
        }
    }
}

/// The applied state's revision, and what it holds as a number.
fn digest(replica: &Replica) -> (u64, u64) {
    let state = replica.state.read().unwrap_or_else(|p| p.into_inner());
    let mut instances: Vec<_> = state
        .catalog
        .all_instances()
        .map(|i| (&i.service, &i.id, &i.address, i.mod_revision))
        .collect();
    instances.sort();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    instances.hash(&mut h);
    (state.catalog.revision(), h.finish())
}
