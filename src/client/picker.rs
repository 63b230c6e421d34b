//! Choosing one instance among the healthy ones.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::proto::v1::Instance;

/// A chosen instance. For pickers that count requests in flight, the request
/// counts as finished when this is dropped.
pub struct Picked {
    pub instance: Instance,
    _in_flight: Option<InFlight>,
}

pub trait Picker: Send + Sync {
    /// `None` only when `instances` is empty.
    fn pick(&self, instances: &[Instance]) -> Option<Picked>;
}

fn plain(i: &Instance) -> Picked {
    Picked {
        instance: i.clone(),
        _in_flight: None,
    }
}

/// Each instance in turn.
#[derive(Default)]
pub struct RoundRobin(AtomicUsize);

impl Picker for RoundRobin {
    fn pick(&self, instances: &[Instance]) -> Option<Picked> {
        if instances.is_empty() {
            return None;
        }
        let n = self.0.fetch_add(1, Ordering::Relaxed);
        Some(plain(&instances[n % instances.len()]))
    }
}

/// Uniformly at random.
#[derive(Default)]
pub struct Random;

impl Picker for Random {
    fn pick(&self, instances: &[Instance]) -> Option<Picked> {
        if instances.is_empty() {
            return None;
        }
        Some(plain(&instances[fastrand::usize(..instances.len())]))
    }
}

/// At random, in proportion to each instance's weight.
#[derive(Default)]
pub struct WeightedRandom;

impl Picker for WeightedRandom {
    fn pick(&self, instances: &[Instance]) -> Option<Picked> {
        let total: u64 = instances.iter().map(|i| u64::from(i.weight.max(1))).sum();
        if total == 0 {
            return None;
        }
        let mut r = fastrand::u64(..total);
        for i in instances {
            let w = u64::from(i.weight.max(1));
            if r < w {
                return Some(plain(i));
            }
            r -= w;
        }
        instances.last().map(plain)
    }
}

/// Power of two choices: of two instances drawn at random, the one with fewer
/// requests in flight through this picker.
#[derive(Default)]
pub struct LeastLoadedOfTwo {
    in_flight: Mutex<HashMap<String, Arc<AtomicUsize>>>,
}

struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl LeastLoadedOfTwo {
    fn counter(&self, i: &Instance) -> Arc<AtomicUsize> {
        let key = format!("{}/{}", i.service, i.id);
        match self.in_flight.lock() {
            Ok(mut m) => m.entry(key).or_default().clone(),
            Err(_) => Arc::default(),
        }
    }
}

impl Picker for LeastLoadedOfTwo {
    fn pick(&self, instances: &[Instance]) -> Option<Picked> {
        let n = instances.len();
        if n == 0 {
            return None;
        }
        let a = fastrand::usize(..n);
        let b = if n > 1 {
            (a + 1 + fastrand::usize(..n - 1)) % n
        } else {
            a
        };
        let (ca, cb) = (self.counter(&instances[a]), self.counter(&instances[b]));
        let (i, c) = if cb.load(Ordering::Relaxed) < ca.load(Ordering::Relaxed) {
            (&instances[b], cb)
        } else {
            (&instances[a], ca)
        };
        c.fetch_add(1, Ordering::Relaxed);
        Some(Picked {
            instance: i.clone(),
            _in_flight: Some(InFlight(c)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instances(weights: &[u32]) -> Vec<Instance> {
        weights
            .iter()
            .enumerate()
            .map(|(n, w)| Instance {
                service: "s".into(),
                id: format!("i{n}"),
                weight: *w,
                ..Default::default()
            })
            .collect()
    }

    fn counts(p: &dyn Picker, set: &[Instance], draws: usize) -> Vec<usize> {
        let mut c = vec![0; set.len()];
        for _ in 0..draws {
            let picked = p.pick(set).expect("a pick");
            let n: usize = picked.instance.id[1..].parse().expect("id");
            c[n] += 1;
        }
        c
    }

    #[test]
    fn round_robin_spreads_evenly() {
        let set = instances(&[1, 1, 1]);
        let c = counts(&RoundRobin::default(), &set, 3000);
        // ±1% of 1000 each.
        assert!(c.iter().all(|&n| (990..=1010).contains(&n)), "{c:?}");
    }

    #[test]
    fn weighted_random_follows_weights() {
        let set = instances(&[1, 2, 7]);
        let draws = 100_000;
        let c = counts(&WeightedRandom, &set, draws);
        // Within 1.5 percentage points of 10% / 20% / 70% (over 6 standard deviations).
        for (n, share) in [0.1, 0.2, 0.7].iter().enumerate() {
            let got = c[n] as f64 / draws as f64;
            assert!(
                (got - share).abs() < 0.015,
                "instance {n}: {got} vs {share}, {c:?}"
            );
        }
    }

    #[test]
    fn random_covers_every_instance() {
        let set = instances(&[1, 1, 1, 1]);
        let c = counts(&Random, &set, 4000);
        assert!(c.iter().all(|&n| n > 800), "{c:?}");
    }

    #[test]
    fn least_loaded_avoids_busy_instances() {
        let set = instances(&[1, 1]);
        let p = LeastLoadedOfTwo::default();
        // Hold many requests on whichever is picked first; the next picks go to the other.
        let held: Vec<Picked> = (0..10).map(|_| p.pick(&set).expect("pick")).collect();
        let busy: Vec<&str> = held.iter().map(|h| h.instance.id.as_str()).collect();
        let ones = busy.iter().filter(|id| **id == "i1").count();
        assert!(
            (4..=6).contains(&ones),
            "in-flight requests balanced: {busy:?}"
        );
        drop(held);
        assert!(p.pick(&[]).is_none());
    }
}
