//! Latency samples and their summary.

use std::time::Duration;

#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub throughput: f64,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
    pub errors: usize,
}

impl Summary {
    /// `elapsed` is the wall time the samples were taken over (for throughput).
    pub fn of(mut samples: Vec<Duration>, elapsed: Duration, errors: usize) -> Summary {
        samples.sort_unstable();
        let at = |q: f64| {
            if samples.is_empty() {
                Duration::ZERO
            } else {
                samples[((samples.len() - 1) as f64 * q).round() as usize]
            }
        };
        Summary {
            throughput: samples.len() as f64 / elapsed.as_secs_f64().max(1e-9),
            p50: at(0.5),
            p99: at(0.99),
            max: samples.last().copied().unwrap_or_default(),
            errors,
        }
    }
}

pub fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}
