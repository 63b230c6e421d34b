//! One `WatchServices` stream per client, shared by all its resolvers: a
//! process following 500 services holds one stream, not 500. The stream is
//! reopened (on whichever node answers) after a disconnect, each service
//! resuming from the last revision it was sent.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures::channel::mpsc;
use futures::StreamExt;
use tokio::sync::watch;
use tonic::Code;

use super::{RosterClient, Shared, WatchStream};
use crate::proto::v1::watch_services_response::Result as Outcome;
use crate::proto::v1::{
    EventType, HealthStatus, Instance, ResetReason, WatchResponse, WatchServicesRequest,
    WatchServicesResponse,
};

/// The healthy instances at a revision, ordered by id.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ResolvedSet {
    pub revision: u64,
    pub instances: Vec<Instance>,
}

/// Applies watch messages to the full set of instances (all statuses).
#[derive(Default)]
pub(crate) struct Tracked {
    pub revision: u64,
    all: BTreeMap<String, Instance>,
}

impl Tracked {
    pub fn apply(&mut self, m: WatchResponse) {
        if m.reset != ResetReason::Unspecified as i32 {
            self.all = m.instances.into_iter().map(|i| (i.id.clone(), i)).collect();
        }
        for e in m.events {
            let Some(i) = e.instance else { continue };
            if e.r#type == EventType::Delete as i32 {
                self.all.remove(&i.id);
            } else {
                self.all.insert(i.id.clone(), i);
            }
        }
        self.revision = self.revision.max(m.revision);
    }

    pub fn healthy(&self) -> ResolvedSet {
        ResolvedSet {
            revision: self.revision,
            instances: self
                .all
                .values()
                .filter(|i| i.status == HealthStatus::Passing as i32)
                .cloned()
                .collect(),
        }
    }
}

/// How long a service whose add was refused waits before it is added again.
const RETRY: Duration = Duration::from_secs(1);

/// A followed service: its namespace (empty: `default`) and its name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    namespace: String,
    service: String,
}

impl Key {
    pub fn new(namespace: &str, service: &str) -> Key {
        // Answers name `default` as empty: one key for both spellings.
        let namespace = if namespace == "default" {
            ""
        } else {
            namespace
        };
        Key {
            namespace: namespace.to_string(),
            service: service.to_string(),
        }
    }
}

pub(crate) enum Command {
    Follow {
        key: Key,
        id: u64,
        tx: watch::Sender<Arc<ResolvedSet>>,
    },
    Unfollow {
        key: Key,
        id: u64,
    },
}

/// The resolvers' side: commands to the task that owns the stream.
pub(crate) struct Feed {
    commands: mpsc::UnboundedSender<Command>,
}

impl Feed {
    /// Starts the task; it holds the client weakly and ends with it.
    pub fn start(client: Weak<Shared>) -> Feed {
        let (commands, rx) = mpsc::unbounded();
        tokio::spawn(run(client, rx));
        Feed { commands }
    }

    pub fn send(&self, c: Command) {
        // The task ends only when the client (and so this feed) is gone.
        let _ = self.commands.unbounded_send(c);
    }
}

/// A followed service: where it stands and who hears about it.
struct Followed {
    tracked: Tracked,
    subscribers: Vec<(u64, watch::Sender<Arc<ResolvedSet>>)>,
}

impl Followed {
    fn publish(&self) {
        let set = self.tracked.healthy();
        for (_, tx) in &self.subscribers {
            tx.send_if_modified(|cur| {
                let publish = cur.revision == 0 || cur.instances != set.instances;
                if publish {
                    *cur = Arc::new(set.clone());
                }
                publish
            });
        }
    }

    fn add(&self, key: &Key) -> WatchServicesRequest {
        WatchServicesRequest::add_in(&*key.namespace, &*key.service, self.tracked.revision)
    }
}

type Stream = (
    mpsc::UnboundedSender<WatchServicesRequest>,
    WatchStream<WatchServicesResponse>,
);

async fn run(client: Weak<Shared>, mut commands: mpsc::UnboundedReceiver<Command>) {
    let mut followed: HashMap<Key, Followed> = HashMap::new();
    let mut stream: Option<Stream> = None;
    let mut pause = Duration::from_millis(50);
    // Services refused by the node, to add again at this time.
    let mut refused: Vec<Key> = Vec::new();
    let mut retry_at = tokio::time::Instant::now();
    // Set when the stream just failed or ended: wait this long before reopening.
    let mut backoff: Option<Duration> = None;
    loop {
        if stream.is_none() && !followed.is_empty() {
            if let Some(wait) = backoff.take() {
                if !idle(wait, &mut commands, &mut followed).await {
                    return;
                }
                continue;
            }
            let Some(shared) = client.upgrade() else {
                return;
            };
            let c = RosterClient { shared };
            let adds = followed.iter().map(|(s, f)| f.add(s)).collect();
            match c.watch_services(adds).await {
                Ok(s) => {
                    stream = Some(s);
                    refused.clear();
                    pause = Duration::from_millis(50);
                }
                Err(_) => {
                    backoff = Some(pause);
                    pause = (pause * 2).min(Duration::from_secs(2));
                    continue;
                }
            }
        }
        let message = async {
            match stream.as_mut() {
                Some((_, s)) => s.message().await,
                None => std::future::pending().await,
            }
        };
        let retry = async {
            if refused.is_empty() {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep_until(retry_at).await;
        };
        tokio::select! {
            c = commands.next() => match c {
                Some(c) => apply(c, &mut followed, stream.as_ref().map(|(tx, _)| tx)),
                None => return,
            },
            m = message => match m {
                Ok(Some(m)) => {
                    if let Some(key) = receive(m, &mut followed) {
                        if refused.is_empty() {
                            retry_at = tokio::time::Instant::now() + RETRY;
                        }
                        refused.push(key);
                    }
                }
                // Ended or broken: reopen, every service resuming where it stood.
                Ok(None) | Err(_) => {
                    stream = None;
                    backoff = Some(pause);
                }
            },
            () = retry => {
                if let Some((tx, _)) = &stream {
                    for key in refused.drain(..) {
                        if let Some(f) = followed.get(&key) {
                            let _ = tx.unbounded_send(f.add(&key));
                        }
                    }
                }
            }
        }
    }
}

/// Waits `wait` while applying commands; `false` once the client is gone.
async fn idle(
    wait: Duration,
    commands: &mut mpsc::UnboundedReceiver<Command>,
    followed: &mut HashMap<Key, Followed>,
) -> bool {
    let wait = tokio::time::sleep(wait);
    tokio::pin!(wait);
    loop {
        tokio::select! {
            () = &mut wait => return true,
            c = commands.next() => match c {
                Some(c) => apply(c, followed, None),
                None => return false,
            },
        }
    }
}

/// Applies a resolver's command, telling the open stream (if any).
fn apply(
    c: Command,
    followed: &mut HashMap<Key, Followed>,
    stream: Option<&mpsc::UnboundedSender<WatchServicesRequest>>,
) {
    let request = match c {
        Command::Follow { key, id, tx } => {
            if let Some(f) = followed.get_mut(&key) {
                if f.tracked.revision > 0 {
                    tx.send_replace(Arc::new(f.tracked.healthy()));
                }
                f.subscribers.push((id, tx));
                return;
            }
            let f = Followed {
                tracked: Tracked::default(),
                subscribers: vec![(id, tx)],
            };
            let add = f.add(&key);
            followed.insert(key, f);
            add
        }
        Command::Unfollow { key, id } => {
            let Some(f) = followed.get_mut(&key) else {
                return;
            };
            f.subscribers.retain(|(i, _)| *i != id);
            if !f.subscribers.is_empty() {
                return;
            }
            followed.remove(&key);
            WatchServicesRequest::remove_in(key.namespace, key.service)
        }
    };
    if let Some(tx) = stream {
        let _ = tx.unbounded_send(request);
    }
}

/// Applies one message; returns the service if the node refused its add.
fn receive(m: WatchServicesResponse, followed: &mut HashMap<Key, Followed>) -> Option<Key> {
    let key = Key::new(&m.namespace, &m.service);
    let f = followed.get_mut(&key)?;
    match m.result? {
        Outcome::Update(u) => {
            f.tracked.apply(u);
            f.publish();
            None
        }
        // The answer to a remove.
        Outcome::Ended(e) if e.code == Code::Ok as i32 => None,
        Outcome::Ended(e) => {
            // A revision the cluster never reached (it was restored from a
            // backup): start again from the full state.
            if e.code == Code::OutOfRange as i32 {
                f.tracked.revision = 0;
            }
            Some(key)
        }
    }
}
