//! TTL renewals, kept in memory on the leader only: a heartbeat is not
//! replicated, only the status change it may cause.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

#[derive(Default)]
pub struct Leases {
    renewed: Mutex<HashMap<(String, String), Instant>>,
}

impl Leases {
    pub fn renew(&self, service: &str, id: &str) {
        if let Ok(mut m) = self.renewed.lock() {
            m.insert((service.to_string(), id.to_string()), Instant::now());
        }
    }

    pub fn last_renewal(&self, service: &str, id: &str) -> Option<Instant> {
        let m = self.renewed.lock().ok()?;
        m.get(&(service.to_string(), id.to_string())).copied()
    }

    pub fn forget(&self, service: &str, id: &str) {
        if let Ok(mut m) = self.renewed.lock() {
            m.remove(&(service.to_string(), id.to_string()));
        }
    }
}
