//! Thresholds: how consecutive probe results turn into a status.

use crate::registry::HealthStatus;

#[derive(Clone, Debug)]
pub struct Tracker {
    status: HealthStatus,
    failures: u32,
    successes: u32,
}

impl Tracker {
    /// Starts from the status the registry holds.
    pub fn new(status: HealthStatus) -> Self {
        Tracker {
            status,
            failures: 0,
            successes: 0,
        }
    }

    /// Records a probe result; the status changes only after enough of the same in a row.
    pub fn record(
        &mut self,
        ok: bool,
        failures_before_critical: u32,
        successes_before_passing: u32,
    ) -> HealthStatus {
        if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if self.status != HealthStatus::Passing
                && self.successes >= successes_before_passing.max(1)
            {
                self.status = HealthStatus::Passing;
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.status != HealthStatus::Critical
                && self.failures >= failures_before_critical.max(1)
            {
                self.status = HealthStatus::Critical;
            }
        }
        self.status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds() {
        let mut t = Tracker::new(HealthStatus::Passing);
        assert_eq!(t.record(false, 3, 2), HealthStatus::Passing);
        assert_eq!(t.record(false, 3, 2), HealthStatus::Passing);
        assert_eq!(t.record(false, 3, 2), HealthStatus::Critical);
        assert_eq!(t.record(true, 3, 2), HealthStatus::Critical);
        assert_eq!(t.record(true, 3, 2), HealthStatus::Passing);
    }

    #[test]
    fn flapping_does_not_flip_status() {
        let mut t = Tracker::new(HealthStatus::Passing);
        for i in 0..100 {
            assert_eq!(t.record(i % 2 == 0, 2, 2), HealthStatus::Passing);
        }
    }
}
