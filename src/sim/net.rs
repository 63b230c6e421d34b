//! The simulated network between the nodes' peer ports: every Raft RPC is
//! delayed, and may be lost, duplicated or overtaken by a later one; links
//! can be cut one way or both; a node whose process is down refuses
//! connections. Requests are handed to the target's real `RaftService`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::future::BoxFuture;
use tonic::{Request, Response, Status};

use crate::peers::{Method, Wire};
use crate::proto::raft_v1::RaftPayload;
use crate::raft::liveness::election::{PreVoteRequest, PreVoteResponse};
use crate::raft::replication::transport::dispatch;
use crate::raft::replication::transport::RaftService;
use crate::raft::{decode, NodeId, Raft};

/// How messages fare on every link.
#[derive(Clone, Copy, Debug)]
pub struct Weather {
    pub delay_min: Duration,
    pub delay_max: Duration,
    /// Per mille of messages lost (requests and replies alike).
    pub loss: u32,
    /// Per mille of requests delivered twice.
    pub duplicate: u32,
}

impl Weather {
    pub fn calm() -> Self {
        Weather {
            delay_min: Duration::from_micros(200),
            delay_max: Duration::from_millis(2),
            loss: 0,
            duplicate: 0,
        }
    }
}

#[derive(Default)]
struct State {
    /// The service of each node whose process is up, with the process
    /// number and its Raft (to judge its answers).
    up: BTreeMap<NodeId, (u64, Arc<RaftService>, Raft)>,
    /// Answers that broke a rule of the protocol.
    findings: Vec<String>,
    /// (from, to): messages from `from` to `to` are dropped.
    cut: BTreeSet<(NodeId, NodeId)>,
    weather: Option<Weather>,
    rng: Option<fastrand::Rng>,
    /// Messages sent, by method: a trace of the run, compared across replays.
    sent: u64,
}

#[derive(Clone, Default)]
pub struct Net(Arc<Mutex<State>>);

/// A node's peer address in the simulation.
pub fn peer_addr(id: NodeId) -> String {
    format!("node{id}:7000")
}

fn id_of(addr: &str) -> Option<NodeId> {
    addr.strip_prefix("node")?.split(':').next()?.parse().ok()
}

impl Net {
    pub fn new(seed: u64) -> Self {
        let net = Net::default();
        {
            let mut s = net.lock();
            s.rng = Some(fastrand::Rng::with_seed(seed));
            s.weather = Some(Weather::calm());
        }
        net
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_weather(&self, w: Weather) {
        self.lock().weather = Some(w);
    }

    pub fn weather(&self) -> Weather {
        self.lock().weather.unwrap_or_else(Weather::calm)
    }

    pub fn up(&self, id: NodeId, process: u64, service: RaftService, raft: Raft) {
        self.lock()
            .up
            .insert(id, (process, Arc::new(service), raft));
    }

    pub fn findings(&self) -> Vec<String> {
        std::mem::take(&mut self.lock().findings)
    }

    /// Pre-vote: a voter grants only a candidate whose log is at least as
    /// up to date as its own, judged here on the wire.
    fn judge(
        &self,
        to: NodeId,
        raft: &Raft,
        req: &RaftPayload,
        reply: &Result<Response<RaftPayload>, Status>,
    ) {
        let Ok(reply) = reply else { return };
        let (Ok(asked), Ok(answer)) = (
            decode::<PreVoteRequest>(&req.data),
            decode::<PreVoteResponse>(&reply.get_ref().data),
        ) else {
            return;
        };
        let mine = raft.data_metrics().borrow().last_log;
        if answer.granted && asked.last_log_id < mine {
            self.lock().findings.push(format!(
                "node {to} granted a pre-vote to node {} whose log ends at {:?}, behind its own {:?}",
                asked.candidate, asked.last_log_id, mine
            ));
        }
    }

    pub fn down(&self, id: NodeId) {
        self.lock().up.remove(&id);
    }

    pub fn cut(&self, from: NodeId, to: NodeId) {
        self.lock().cut.insert((from, to));
    }

    pub fn heal(&self) {
        self.lock().cut.clear();
    }

    pub fn is_cut(&self, from: NodeId, to: NodeId) -> bool {
        self.lock().cut.contains(&(from, to))
    }

    pub fn sent(&self) -> u64 {
        self.lock().sent
    }

    /// The delay of one message, and whether it is lost.
    fn fate(&self, from: NodeId, to: NodeId) -> (Duration, bool) {
        let mut s = self.lock();
        let w = s.weather.unwrap_or_else(Weather::calm);
        let cut = s.cut.contains(&(from, to));
        let rng = s.rng.get_or_insert_with(|| fastrand::Rng::with_seed(0));
        let span = w.delay_max.saturating_sub(w.delay_min).as_micros() as u64;
        let delay = w.delay_min + Duration::from_micros(rng.u64(0..=span));
        let lost = cut || rng.u32(0..1000) < w.loss;
        (delay, lost)
    }

    fn duplicated(&self) -> bool {
        let mut s = self.lock();
        let p = s.weather.map_or(0, |w| w.duplicate);
        s.rng.as_mut().is_some_and(|r| r.u32(0..1000) < p)
    }

    /// The service of `id`'s running process.
    fn service(&self, id: NodeId) -> Option<(u64, Arc<RaftService>, Raft)> {
        self.lock().up.get(&id).cloned()
    }

    /// The wire of node `from`'s process `process`; requests time out after `timeout`.
    pub fn wire(&self, from: NodeId, process: u64, timeout: Duration) -> Arc<dyn Wire> {
        Arc::new(SimWire {
            net: self.clone(),
            from,
            process,
            timeout,
        })
    }
}

struct SimWire {
    net: Net,
    from: NodeId,
    process: u64,
    timeout: Duration,
}

fn copy(req: &Request<RaftPayload>) -> Request<RaftPayload> {
    Request::from_parts(
        req.metadata().clone(),
        Default::default(),
        req.get_ref().clone(),
    )
}

impl SimWire {
    /// Whether the process this wire belongs to still runs.
    fn alive(&self) -> bool {
        self.net
            .service(self.from)
            .is_some_and(|(p, _, _)| p == self.process)
    }

    async fn deliver(
        net: Net,
        from: NodeId,
        to: NodeId,
        method: Method,
        req: Request<RaftPayload>,
        timeout: Duration,
    ) -> Result<Response<RaftPayload>, Status> {
        let lost = || Status::deadline_exceeded("simulated: no answer in time");
        let (delay, dropped) = net.fate(from, to);
        tokio::time::sleep(delay).await;
        let Some((process, service, raft)) = net.service(to) else {
            return Err(Status::unavailable("simulated: connection refused"));
        };
        if dropped {
            tokio::time::sleep(timeout).await;
            return Err(lost());
        }
        let payload = (method == Method::PreVote).then(|| req.get_ref().clone());
        let reply = dispatch(&service, method, req).await;
        if let Some(p) = payload {
            net.judge(to, &raft, &p, &reply);
        }
        let (delay, dropped) = net.fate(to, from);
        tokio::time::sleep(delay).await;
        // A reply from a process that died meanwhile, or lost on the way back.
        if dropped || net.service(to).is_none_or(|(p, _, _)| p != process) {
            tokio::time::sleep(timeout.saturating_sub(delay)).await;
            return Err(lost());
        }
        reply
    }
}

impl Wire for SimWire {
    fn call(
        &self,
        addr: &str,
        method: Method,
        req: Request<RaftPayload>,
    ) -> BoxFuture<'static, Result<Response<RaftPayload>, Status>> {
        let (net, from, timeout) = (self.net.clone(), self.from, self.timeout);
        let to = id_of(addr);
        let alive = self.alive();
        Box::pin(async move {
            net.lock().sent += 1;
            let Some(to) = to.filter(|_| alive) else {
                return Err(Status::unavailable("simulated: no such peer"));
            };
            if net.duplicated() {
                let (net, req) = (net.clone(), copy(&req));
                tokio::spawn(Self::deliver(net, from, to, method, req, timeout));
            }
            Self::deliver(net, from, to, method, req, timeout).await
        })
    }

    fn refused(&self, addr: &str, within: std::time::Duration) -> BoxFuture<'static, bool> {
        let (net, from, to) = (self.net.clone(), self.from, id_of(addr));
        Box::pin(async move {
            let Some(to) = to else { return true };
            let (delay, dropped) = net.fate(from, to);
            if dropped {
                tokio::time::sleep(within).await;
                return false;
            }
            tokio::time::sleep(delay).await;
            net.service(to).is_none()
        })
    }
}
