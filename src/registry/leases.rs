//! TTL and session renewals, kept in memory on the leader only: a heartbeat
//! or renewal is not replicated, only the status change it may cause. Here, below the API and
//! the health checker, because both use them: the API records heartbeats, the
//! checker reads them.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// Service → instance id → last renewal. Nested so that look-ups and renewals
/// of known instances (every heartbeat, every check tick) allocate nothing.
#[derive(Default)]
pub struct Leases {
    renewed: Mutex<HashMap<String, HashMap<String, Instant>>>,
    /// Session id → last renewal.
    sessions: Mutex<HashMap<String, Instant>>,
}

impl Leases {
    pub fn renew(&self, service: &str, id: &str) {
        self.renew_at(service, id, Instant::now());
    }

    /// A renewal at `now`: the checker's tests run on a clock of their own.
    pub fn renew_at(&self, service: &str, id: &str, now: Instant) {
        let Ok(mut m) = self.renewed.lock() else {
            return;
        };
        match m.get_mut(service).and_then(|ids| ids.get_mut(id)) {
            Some(at) => *at = now,
            None => {
                m.entry(service.to_string())
                    .or_default()
                    .insert(id.to_string(), now);
            }
        }
    }

    pub fn last_renewal(&self, service: &str, id: &str) -> Option<Instant> {
        let m = self.renewed.lock().ok()?;
        m.get(service)?.get(id).copied()
    }

    pub fn forget(&self, service: &str, id: &str) {
        let Ok(mut m) = self.renewed.lock() else {
            return;
        };
        if let Some(ids) = m.get_mut(service) {
            ids.remove(id);
            if ids.is_empty() {
                m.remove(service);
            }
        }
    }

    /// Renews every session in `ids` at `now`.
    pub fn renew_sessions<'a>(&self, ids: impl IntoIterator<Item = &'a str>, now: Instant) {
        let Ok(mut m) = self.sessions.lock() else {
            return;
        };
        for id in ids {
            match m.get_mut(id) {
                Some(at) => *at = now,
                None => {
                    m.insert(id.to_string(), now);
                }
            }
        }
    }

    pub fn session_renewed(&self, id: &str) -> Option<Instant> {
        self.sessions.lock().ok()?.get(id).copied()
    }

    /// Drops the renewals of sessions that `open` says ended.
    pub fn retain_sessions(&self, open: impl Fn(&str) -> bool) {
        if let Ok(mut m) = self.sessions.lock() {
            m.retain(|id, _| open(id));
        }
    }
}

/// The check output of a TTL instance whose heartbeat arrived in time.
pub const TTL_RENEWED: &str = "TTL: heartbeat received";

/// Wall-clock milliseconds, as statuses and check outputs record them.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
