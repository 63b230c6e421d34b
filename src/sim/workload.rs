//! The workload: clients' operations on a few keys, recorded as a history,
//! and watchers that move from member to member.

use super::*;

impl World {
    /// A client: random operations on random keys until `end`.
    pub(super) async fn client(self: Arc<Self>, client: usize, end: Instant) {
        while Instant::now() < end {
            let (key, pick, value) = self.rng(|r| (r.u64(..KEYS), r.u32(0..10), r.u64(1..)));
            let input = match pick {
                0..=3 => Input::Put(value),
                4 | 5 => Input::Delete,
                6 | 7 => Input::Get,
                8 => Input::Exists,
                _ => {
                    self.stale_read(key);
                    continue;
                }
            };
            self.operation(client, key, input).await;
            let pause = self.rng(|r| r.u64(0..20));
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
    }

    /// Any member's own state, however far behind.
    fn stale_read(&self, key: u64) {
        let running = self.running();
        if running.is_empty() {
            return;
        }
        let i = self.rng(|r| r.usize(..running.len()));
        let v = read_value(&running[i].1, key);
        lock(&self.stale_reads).push(v);
    }

    /// One operation, sent where the client believes the leader is and
    /// redirected as a follower would forward it; recorded in the history.
    pub(super) async fn operation(&self, client: usize, key: u64, input: Input) {
        let call = self.now();
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut target = self.leader().unwrap_or(1);
        let mut revision = None;
        let output = loop {
            if Instant::now() >= deadline {
                break Output::Unknown;
            }
            let Some(replica) = self.replica(target) else {
                // Connection refused: nothing was sent; try another member.
                target = self.rng(|r| r.u64(1..=self.opts.nodes as u64));
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            match attempt(&replica, key, input).await {
                Ok((out, rev)) => {
                    revision = rev;
                    break out;
                }
                Err(Refusal::NotLeader(f)) => {
                    target = match f.leader_id {
                        Some(l) if l != target => l,
                        _ => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            self.rng(|r| r.u64(1..=self.opts.nodes as u64))
                        }
                    };
                }
                // A write may have been applied; a read just failed.
                Err(Refusal::Failed(_)) => match input {
                    Input::Put(_) | Input::Delete => break Output::Unknown,
                    _ => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                },
            }
        };
        // An unanswered read says nothing: only writes of unknown outcome count.
        if output == Output::Unknown && matches!(input, Input::Get | Input::Exists) {
            return;
        }
        let ret = (output != Output::Unknown).then(|| self.now());
        lock(&self.history).push(Record {
            client,
            key,
            input,
            output,
            call,
            ret,
            revision,
        });
    }

    /// Whether watchers may stop: the end's fence is set, and `last` reached
    /// it (or the time to reach it ran out).
    fn watch_done(&self, last: u64) -> bool {
        lock(&self.fence).is_some_and(|(fence, until)| last >= fence || Instant::now() >= until)
    }

    /// A watcher of the service: a stream on a random member for a while,
    /// then another resuming from the last revision it received (as a
    /// client does when its connection breaks), until the end's fence.
    pub(super) async fn watcher(self: Arc<Self>, w: usize) {
        let mut last = 0u64;
        while !self.watch_done(last) {
            let running = self.running();
            if running.is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            let (i, length) = self.rng(|r| (r.usize(..running.len()), r.u64(100..1000)));
            let (node, replica) = running[i].clone();
            let until = Instant::now() + Duration::from_millis(length);
            let mut session = WatchSession {
                node,
                since: last,
                msgs: Vec::new(),
            };
            let mut stream = Box::pin(watch_stream(
                replica.state.clone(),
                Some(SERVICE.into()),
                last,
            ));
            loop {
                match tokio::time::timeout(Duration::from_millis(20), stream.next()).await {
                    Ok(Some(u)) => {
                        let m = &u.message;
                        last = last.max(m.revision);
                        session.msgs.push(WatchMsg {
                            revision: m.revision,
                            reset: m.reset.is_some(),
                            instances: m.instances.iter().filter_map(key_value).collect(),
                            events: m
                                .events
                                .iter()
                                .filter_map(|e| {
                                    let (k, v) = key_value(&e.instance)?;
                                    let v = (e.kind == EventKind::Put).then_some(v);
                                    Some((e.revision, k, v))
                                })
                                .collect(),
                        });
                    }
                    Ok(None) => break,
                    Err(_) => {}
                }
                // The member's process is gone (its stream would go on from
                // the dead process's memory), the session is over, or the end.
                let same = self
                    .replica(node)
                    .is_some_and(|r| Arc::ptr_eq(&r, &replica));
                if !same || Instant::now() >= until || self.watch_done(last) {
                    break;
                }
            }
            lock(&self.watch_logs)[w].push(session);
        }
    }
}

fn instance_id(key: u64) -> String {
    format!("i{key}")
}

fn read_value(replica: &Replica, key: u64) -> Option<u64> {
    let state = replica.state.read().unwrap_or_else(|p| p.into_inner());
    state
        .catalog
        .get(SERVICE, &instance_id(key))
        .and_then(|i| i.address.parse().ok())
}

/// One try of `input` on `replica`: its answer, and for a write the
/// revision it was applied at.
async fn attempt(
    replica: &Replica,
    key: u64,
    input: Input,
) -> Result<(Output, Option<u64>), Refusal> {
    let p = &replica.proposer;
    match input {
        Input::Put(v) => {
            let r = p.propose(Command::Register(instance(key, v))).await?;
            Ok(match r.outcome {
                Outcome::Registered(_) => (Output::Ok, Some(r.revision)),
                _ => (Output::Unknown, None),
            })
        }
        Input::Delete => {
            let cmd = Command::Deregister {
                service: SERVICE.into(),
                id: instance_id(key),
            };
            let r = p.propose(cmd).await?;
            Ok(match r.outcome {
                Outcome::Deregistered => (Output::Ok, Some(r.revision)),
                Outcome::NotFound => (Output::NotFound, None),
                _ => (Output::Unknown, None),
            })
        }
        Input::Get => {
            p.read_index().await?;
            Ok((Output::Value(read_value(replica, key)), None))
        }
        Input::Exists => {
            p.current().await?;
            let out = match read_value(replica, key) {
                Some(_) => Output::Ok,
                None => Output::NotFound,
            };
            Ok((out, None))
        }
    }
}

/// An instance of the service as (key, value).
fn key_value(i: &Instance) -> Option<(u64, u64)> {
    let key = i.id.strip_prefix('i')?.parse().ok()?;
    Some((key, i.address.parse().ok()?))
}

fn instance(key: u64, value: u64) -> Instance {
    Instance {
        address: value.to_string(),
        ..Instance::example(SERVICE, &instance_id(key))
    }
}
