//! A live set of a service's healthy instances, kept current by the client's
//! shared watch stream (`feed`), which resumes from its last revision after a
//! disconnect.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::sync::watch;
use tonic::transport::channel::Change as ChannelChange;
use tonic::transport::{Channel, Endpoint};
use tower::discover::Change;

pub use super::feed::ResolvedSet;
use super::feed::{Command, Key};
use super::picker::{Picked, Picker};
use super::RosterClient;
use crate::proto::v1::Instance;

/// Tells the feed to stop following when the last handle is dropped; keeps
/// the client (and so the feed) alive until then.
struct Following {
    client: RosterClient,
    key: Option<Key>,
    id: u64,
}

impl Drop for Following {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.client
                .feed()
                .send(Command::Unfollow { key, id: self.id });
        }
    }
}

#[derive(Clone)]
pub struct Resolver {
    rx: watch::Receiver<Arc<ResolvedSet>>,
    _following: Arc<Following>,
}

impl Resolver {
    /// Starts following `service` of `namespace` (empty: `default`); the
    /// set is empty until the first answer.
    pub(crate) fn new(client: RosterClient, namespace: &str, service: &str) -> Resolver {
        static IDS: AtomicU64 = AtomicU64::new(0);
        let (tx, rx) = watch::channel(Arc::new(ResolvedSet::default()));
        let id = IDS.fetch_add(1, Ordering::Relaxed);
        let key = Key::new(namespace, service);
        client.feed().send(Command::Follow {
            key: key.clone(),
            id,
            tx,
        });
        Resolver {
            rx,
            _following: Arc::new(Following {
                client,
                key: Some(key),
                id,
            }),
        }
    }

    /// The current healthy instances.
    pub fn current(&self) -> Arc<ResolvedSet> {
        self.rx.borrow().clone()
    }

    /// Waits until the set differs from the one last seen through this handle.
    pub async fn changed(&mut self) -> Arc<ResolvedSet> {
        // The sender lives as long as the task, which lives as long as `self`.
        let _ = self.rx.changed().await;
        self.rx.borrow_and_update().clone()
    }

    /// Waits until the first answer from the registry (at most `limit`).
    pub async fn ready(&mut self, limit: Duration) -> bool {
        let wait = self.rx.wait_for(|s| s.revision > 0);
        matches!(tokio::time::timeout(limit, wait).await, Ok(Ok(_)))
    }

    pub fn pick(&self, picker: &dyn Picker) -> Option<Picked> {
        picker.pick(&self.current().instances)
    }

    /// The set as a `tower::discover::Discover`: an insert for each instance
    /// that turns healthy, a removal for each that stops being healthy.
    pub fn discover(
        &self,
    ) -> impl Stream<Item = Result<Change<String, Instance>, Infallible>> + Send + 'static {
        let rx = self.rx.clone();
        let keep = self._following.clone();
        futures::stream::unfold(
            (rx, BTreeMap::<String, Instance>::new(), Vec::new(), keep),
            |(mut rx, mut known, mut pending, keep)| async move {
                loop {
                    if let Some(c) = pending.pop() {
                        return Some((Ok(c), (rx, known, pending, keep)));
                    }
                    let set = rx.borrow_and_update().clone();
                    let now: BTreeMap<String, Instance> = set
                        .instances
                        .iter()
                        .map(|i| (i.id.clone(), i.clone()))
                        .collect();
                    for id in known.keys().filter(|k| !now.contains_key(*k)) {
                        pending.push(Change::Remove(id.clone()));
                    }
                    for (id, i) in &now {
                        if known.get(id) != Some(i) {
                            pending.push(Change::Insert(id.clone(), i.clone()));
                        }
                    }
                    known = now;
                    if pending.is_empty() && rx.changed().await.is_err() {
                        return None;
                    }
                }
            },
        )
    }

    /// A tonic `Channel` that balances requests over the healthy instances and
    /// drops an instance as soon as the registry stops reporting it healthy.
    pub fn balanced_channel(&self) -> Channel {
        let (channel, tx) = Channel::balance_channel::<String>(64);
        let changes = self.discover();
        tokio::spawn(async move {
            futures::pin_mut!(changes);
            while let Some(Ok(change)) = futures::StreamExt::next(&mut changes).await {
                let change = match change {
                    Change::Insert(id, i) => {
                        let Ok(ep) = Endpoint::from_shared(format!("http://{}", authority(&i)))
                        else {
                            continue;
                        };
                        ChannelChange::Insert(id, ep.connect_timeout(Duration::from_secs(1)))
                    }
                    Change::Remove(id) => ChannelChange::Remove(id),
                };
                if tx.send(change).await.is_err() {
                    return;
                }
            }
        });
        channel
    }
}

/// `address:port`, with brackets around an IPv6 address.
pub fn authority(i: &Instance) -> String {
    if i.address.contains(':') {
        format!("[{}]:{}", i.address, i.port)
    } else {
        format!("{}:{}", i.address, i.port)
    }
}
