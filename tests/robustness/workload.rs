//! Clients and watchers that drive the cluster and record what they saw.
//!
//! Keys: service `e<epoch>-s<j>`, instance ids `a` and `b`. The epoch moves on
//! every `EPOCH`, so each key's history is a few seconds long and the
//! linearizability search stays small however long the run. Every
//! registration carries a fresh write id in metadata `w`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use roster::client::RosterClient;
use roster::proto::v1::registry_client::RegistryClient;
use roster::proto::v1::*;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

use crate::checker::{
    AckedWrite, Change, Input, Key, Op, Output, Time, Value, WatchLog, WatchMsg, WatchSession, OPEN,
};

pub const EPOCH: Duration = Duration::from_secs(15);
pub const SERVICES: u64 = 3;
pub const IDS: [&str; 2] = ["a", "b"];
/// A client gives up on an operation after this long (the outcome is then unknown).
pub const OP_DEADLINE: Duration = Duration::from_secs(4);
/// A value no write uses: what a read records when an instance carries no parsable write id.
pub const GARBAGE: Value = Value::MAX;

pub struct Recorder {
    start: Instant,
    next_value: AtomicU64,
    pub ops: Mutex<Vec<Op>>,
    pub acked: Mutex<Vec<AckedWrite>>,
    /// Operations that failed without effect (refused before being sent, or a failed read).
    pub failed: AtomicU64,
    pub stop: AtomicBool,
    /// Watchers that hold their initial state.
    pub watchers_ready: AtomicU64,
}

impl Recorder {
    pub fn new() -> Arc<Recorder> {
        Arc::new(Recorder {
            start: Instant::now(),
            next_value: AtomicU64::new(1),
            ops: Mutex::default(),
            acked: Mutex::default(),
            failed: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            watchers_ready: AtomicU64::new(0),
        })
    }

    pub fn now(&self) -> Time {
        self.start.elapsed().as_nanos() as Time
    }

    pub fn value(&self) -> Value {
        self.next_value.fetch_add(1, Ordering::Relaxed)
    }

    pub fn record(&self, op: Op) {
        self.ops.lock().expect("history lock").push(op);
    }

    fn epoch(&self) -> u64 {
        self.start.elapsed().as_secs() / EPOCH.as_secs()
    }
}

pub fn service(epoch: u64, j: u64) -> String {
    format!("e{epoch}-s{j}")
}

pub fn key(service: &str, id: &str) -> Key {
    Key {
        service: service.into(),
        id: id.into(),
    }
}

fn value_of(i: &Instance) -> Value {
    i.metadata
        .get("w")
        .and_then(|w| w.parse().ok())
        .unwrap_or(GARBAGE)
}

pub fn instance(service: &str, id: &str, value: Value) -> Instance {
    Instance {
        service: service.into(),
        id: id.into(),
        address: "10.0.0.1".into(),
        port: 1 + (value % 60000) as u32,
        metadata: [("w".to_string(), value.to_string())].into(),
        ..Default::default()
    }
}

pub fn registry(addr: &str) -> RegistryClient<Channel> {
    let ch = Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_millis(500))
        .connect_lazy();
    RegistryClient::new(ch)
}

/// How a write's failure is recorded: definite refusals have no effect,
/// everything else may have been applied.
fn write_failure(code: Code) -> Option<Output> {
    match code {
        Code::NotFound => Some(Output::NotFound),
        Code::InvalidArgument | Code::FailedPrecondition => None,
        _ => Some(Output::Unknown),
    }
}

/// One client: writes go once to one node (raw gRPC, no retry, so one operation
/// is at most one application); reads and heartbeats go either to that node or,
/// for roaming clients, through `RosterClient`, which fails over.
pub async fn client(id: usize, rec: Arc<Recorder>, endpoints: Vec<String>, roaming: bool) {
    let pool = RosterClient::new(&endpoints).expect("client");
    let nodes: Vec<RegistryClient<Channel>> = endpoints.iter().map(|e| registry(e)).collect();
    let mut node = id % nodes.len();
    while !rec.stop.load(Ordering::Relaxed) {
        let svc = service(rec.epoch(), fastrand::u64(0..SERVICES));
        let iid = IDS[fastrand::usize(..IDS.len())];
        let mut raw = nodes[node].clone();
        let call = rec.now();
        let ok = match fastrand::u8(0..100) {
            0..=34 => {
                let v = rec.value();
                let req = RegisterRequest {
                    instance: Some(instance(&svc, iid, v)),
                    ..Default::default()
                };
                let r = tokio::time::timeout(OP_DEADLINE, raw.register(req)).await;
                let (output, revision) = match r {
                    Ok(Ok(resp)) => (Some(Output::Ok), Some(resp.into_inner().revision)),
                    Ok(Err(s)) => (write_failure(s.code()), None),
                    Err(_) => (Some(Output::Unknown), None),
                };
                finish_write(&rec, id, &svc, iid, Input::Put(v), output, call, revision)
            }
            35..=54 => {
                let req = DeregisterRequest {
                    namespace: Default::default(),
                    service: svc.clone(),
                    id: iid.into(),
                };
                let r = tokio::time::timeout(OP_DEADLINE, raw.deregister(req)).await;
                let (output, revision) = match r {
                    Ok(Ok(resp)) => (Some(Output::Ok), Some(resp.into_inner().revision)),
                    Ok(Err(s)) => (write_failure(s.code()), None),
                    Err(_) => (Some(Output::Unknown), None),
                };
                finish_write(&rec, id, &svc, iid, Input::Delete, output, call, revision)
            }
            55..=89 => {
                let req = GetServiceRequest {
                    service: svc.clone(),
                    consistency: Consistency::Linearizable as i32,
                    ..Default::default()
                };
                let r = if roaming {
                    tokio::time::timeout(OP_DEADLINE, pool.get_service(req)).await
                } else {
                    tokio::time::timeout(OP_DEADLINE, async {
                        raw.get_service(req)
                            .await
                            .map(|r| r.into_inner())
                            .map_err(roster::client::Error::from)
                    })
                    .await
                };
                match r {
                    Ok(Ok(resp)) => {
                        let ret = rec.now();
                        record_read(&rec, id, &svc, &resp.instances, call, ret);
                        true
                    }
                    _ => false,
                }
            }
            _ => {
                let req = HeartbeatRequest {
                    namespace: Default::default(),
                    service: svc.clone(),
                    id: iid.into(),
                    ..Default::default()
                };
                let r = if roaming {
                    tokio::time::timeout(OP_DEADLINE, pool.heartbeat(req)).await
                } else {
                    tokio::time::timeout(OP_DEADLINE, async {
                        raw.heartbeat(req)
                            .await
                            .map(|r| r.into_inner())
                            .map_err(roster::client::Error::from)
                    })
                    .await
                };
                let output = match r {
                    Ok(Ok(_)) => Some(Output::Ok),
                    Ok(Err(s)) if s.code() == roster::client::Code::NotFound => {
                        Some(Output::NotFound)
                    }
                    _ => None,
                };
                if let Some(output) = output {
                    let ret = rec.now();
                    rec.record(Op {
                        client: id,
                        key: key(&svc, iid),
                        input: Input::Exists,
                        output,
                        call,
                        ret,
                    });
                }
                output.is_some()
            }
        };
        if !ok {
            rec.failed.fetch_add(1, Ordering::Relaxed);
            if roaming {
                node = (node + 1) % nodes.len();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        } else {
            tokio::time::sleep(Duration::from_millis(fastrand::u64(0..15))).await;
        }
    }
}

/// Records a write; `None` output means refused without effect. Returns whether it succeeded.
#[allow(clippy::too_many_arguments)]
fn finish_write(
    rec: &Recorder,
    client: usize,
    svc: &str,
    iid: &str,
    input: Input,
    output: Option<Output>,
    call: Time,
    revision: Option<u64>,
) -> bool {
    let Some(output) = output else {
        return false;
    };
    let ret = if output == Output::Unknown {
        OPEN
    } else {
        rec.now()
    };
    if let (Some(revision), Output::Ok) = (revision, output) {
        let value = match input {
            Input::Put(v) => Some(v),
            _ => None,
        };
        rec.acked.lock().expect("acked lock").push(AckedWrite {
            revision,
            change: Change {
                key: key(svc, iid),
                value,
            },
        });
    }
    rec.record(Op {
        client,
        key: key(svc, iid),
        input,
        output,
        call,
        ret,
    });
    output != Output::Unknown
}

/// A read of a whole service, projected onto each of its keys.
pub fn record_read(
    rec: &Recorder,
    client: usize,
    svc: &str,
    found: &[Instance],
    call: Time,
    ret: Time,
) {
    for iid in IDS {
        let v = found.iter().find(|i| i.id == iid).map(value_of);
        rec.record(Op {
            client,
            key: key(svc, iid),
            input: Input::Get,
            output: Output::Value(v),
            call,
            ret,
        });
    }
    // An instance id no client writes is a read of something never written.
    for i in found.iter().filter(|i| !IDS.contains(&i.id.as_str())) {
        rec.record(Op {
            client,
            key: key(svc, &i.id),
            input: Input::Get,
            output: Output::Value(Some(value_of(i))),
            call,
            ret,
        });
    }
}

fn to_msg(m: WatchResponse) -> WatchMsg {
    let k = |i: &Instance| key(&i.service, &i.id);
    WatchMsg {
        revision: m.revision,
        reset: m.reset != ResetReason::Unspecified as i32,
        instances: m.instances.iter().map(|i| (k(i), value_of(i))).collect(),
        events: m
            .events
            .iter()
            .filter_map(|e| {
                let i = e.instance.as_ref()?;
                let value = (e.r#type == EventType::Put as i32).then(|| value_of(i));
                Some((e.revision, Change { key: k(i), value }))
            })
            .collect(),
    }
}

/// A watcher of every service: starts on node `first`, and on any error or
/// silence moves to the next node, resuming from the last revision it holds.
/// After `rec.stop` it runs on until it has reached `target` (set by the test
/// once the fence write is acknowledged) or `catch_up` has passed.
pub async fn watcher(
    first: usize,
    rec: Arc<Recorder>,
    endpoints: Vec<String>,
    target: Arc<AtomicU64>,
    catch_up: Duration,
) -> WatchLog {
    let mut log = WatchLog::default();
    let mut node = first % endpoints.len();
    let mut last = 0;
    let mut stopped_at: Option<Instant> = None;
    loop {
        let mut session = WatchSession {
            node: node as u64 + 1,
            since: last,
            msgs: Vec::new(),
        };
        let mut raw = registry(&endpoints[node]);
        let req = WatchRequest {
            namespace: Default::default(),
            service: String::new(),
            since_revision: last,
        };
        if let Ok(Ok(resp)) = tokio::time::timeout(OP_DEADLINE, raw.watch(req)).await {
            let mut stream = resp.into_inner();
            loop {
                let done = |last: u64| {
                    let t = target.load(Ordering::Relaxed);
                    t != 0 && last >= t
                };
                if done(last) {
                    break;
                }
                // Silence may be a stopped or cut-off node: move on after a while.
                match tokio::time::timeout(Duration::from_secs(5), stream.message()).await {
                    Ok(Ok(Some(m))) => {
                        if log.sessions.is_empty() && session.msgs.is_empty() {
                            rec.watchers_ready.fetch_add(1, Ordering::Relaxed);
                        }
                        last = m.revision.max(if m.reset != 0 { 0 } else { last });
                        session.msgs.push(to_msg(m));
                    }
                    _ => break,
                }
            }
        }
        let empty = session.msgs.is_empty();
        if !empty || log.sessions.is_empty() {
            log.sessions.push(session);
        }
        let t = target.load(Ordering::Relaxed);
        if t != 0 && last >= t {
            return log;
        }
        if rec.stop.load(Ordering::Relaxed) {
            let at = *stopped_at.get_or_insert_with(Instant::now);
            if at.elapsed() > catch_up {
                return log;
            }
        }
        node = (node + 1) % endpoints.len();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The final state every watcher must hold: linearizable reads of every service written.
pub async fn final_reads(
    rec: &Recorder,
    pool: &RosterClient,
    services: &[String],
) -> Result<BTreeMap<Key, Value>, String> {
    let mut state = BTreeMap::new();
    for svc in services {
        let req = GetServiceRequest {
            service: svc.clone(),
            consistency: Consistency::Linearizable as i32,
            ..Default::default()
        };
        let call = rec.now();
        let resp = tokio::time::timeout(Duration::from_secs(20), pool.get_service(req))
            .await
            .map_err(|_| format!("final read of {svc} timed out"))?
            .map_err(|e| format!("final read of {svc}: {e}"))?;
        record_read(rec, usize::MAX, svc, &resp.instances, call, rec.now());
        for i in &resp.instances {
            state.insert(key(svc, &i.id), value_of(i));
        }
    }
    Ok(state)
}
