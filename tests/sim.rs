//! The deterministic simulation (`roster::sim`): thousands of seeded fault
//! schedules against the real Raft layer, each history checked by the
//! robustness suite's linearizability checker.
//!
//! `cargo test --features sim --test sim` runs `ROSTER_SIM_SEEDS` seeds
//! (default 1,200) from a base drawn at random and printed; a failing seed
//! is printed with the command that replays it:
//! `ROSTER_SIM_SEED=<seed> cargo test --features sim --test sim -- replay --nocapture`.
//! A soak: `ROSTER_SIM_SEEDS=100000 cargo test --release --features sim --test sim seeds`.
#![cfg(feature = "sim")]

#[allow(dead_code)]
#[path = "robustness/checker.rs"]
mod checker;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use roster::sim::{self, Input, Options, Output, Report};

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Everything wrong with one run: the simulation's own findings, then the
/// linearizability checker's and the stale reads'.
fn problems(report: &Report) -> Vec<String> {
    let mut out = report.violations.clone();
    let ops: Vec<checker::Op> = report
        .history
        .iter()
        .map(|r| checker::Op {
            client: r.client,
            key: checker::Key {
                service: "svc".into(),
                id: r.key.to_string(),
            },
            input: match r.input {
                Input::Put(v) => checker::Input::Put(v),
                Input::Delete => checker::Input::Delete,
                Input::Get => checker::Input::Get,
                Input::Exists => checker::Input::Exists,
            },
            output: match r.output {
                Output::Ok => checker::Output::Ok,
                Output::NotFound => checker::Output::NotFound,
                Output::Value(v) => checker::Output::Value(v),
                Output::Unknown => checker::Output::Unknown,
            },
            call: r.call,
            ret: r.ret.unwrap_or(checker::OPEN),
        })
        .collect();
    let (bad, _) = checker::check_linearizable(&ops);
    for v in bad {
        out.push(format!("not linearizable: {v}"));
    }
    let written: std::collections::BTreeSet<u64> = report
        .history
        .iter()
        .filter_map(|r| match r.input {
            Input::Put(v) => Some(v),
            _ => None,
        })
        .collect();
    for v in report.stale_reads.iter().flatten() {
        if !written.contains(v) {
            out.push(format!("a stale read returned {v}, which no client wrote"));
        }
    }
    out
}

fn replay_line(opts: &Options) -> String {
    let m = opts
        .mutation
        .map(|m| format!(" ROSTER_SIM_MUTATION={m:?}"))
        .unwrap_or_default();
    format!(
        "ROSTER_SIM_SEED={}{m} cargo test --features sim --test sim -- replay --nocapture",
        opts.seed
    )
}

/// Runs `count` seeds from `base` on two threads; the first failing seed, if any.
fn search(
    base: u64,
    count: u64,
    mutation: Option<sim::Mutation>,
) -> Option<(Options, Vec<String>)> {
    let next = AtomicU64::new(0);
    let found: Mutex<Option<(Options, Vec<String>)>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count || found.lock().map(|f| f.is_some()).unwrap_or(true) {
                    return;
                }
                let mut opts = Options::new(base.wrapping_add(i));
                opts.mutation = mutation;
                let p = problems(&sim::run(&opts));
                if !p.is_empty() {
                    if let Ok(mut f) = found.lock() {
                        if f.as_ref().is_none_or(|(o, _)| o.seed > opts.seed) {
                            *f = Some((opts, p));
                        }
                    }
                }
            });
        }
    });
    found.into_inner().ok().flatten()
}

#[test]
fn seeds() {
    let count = env_u64("ROSTER_SIM_SEEDS").unwrap_or(1_200);
    let base = env_u64("ROSTER_SIM_BASE").unwrap_or_else(|| fastrand::u64(..u64::MAX / 2));
    let started = Instant::now();
    println!("simulating seeds {base}..{} ({count})", base + count);
    if let Some((opts, p)) = search(base, count, None) {
        panic!(
            "seed {} fails:\n  {}\nreplay: {}",
            opts.seed,
            p.join("\n  "),
            replay_line(&opts)
        );
    }
    println!(
        "{count} seeds passed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// Replays `ROSTER_SIM_SEED` (with `ROSTER_SIM_MUTATION`), printing its faults and history.
#[test]
fn replay() {
    let Some(seed) = env_u64("ROSTER_SIM_SEED") else {
        return;
    };
    let mut opts = Options::new(seed);
    opts.mutation = std::env::var("ROSTER_SIM_MUTATION").ok().and_then(|m| {
        sim::Mutation::ALL
            .into_iter()
            .find(|x| format!("{x:?}") == m)
    });
    let report = sim::run(&opts);
    for f in &report.faults {
        println!("fault {f}");
    }
    for r in &report.history {
        println!("op {r:?}");
    }
    let p = problems(&report);
    assert!(p.is_empty(), "seed {seed} fails:\n  {}", p.join("\n  "));
}

#[test]
fn a_seed_replays_exactly() {
    for seed in [1, 2, 3] {
        let a = sim::run(&Options::new(seed));
        let b = sim::run(&Options::new(seed));
        assert_eq!(a.fingerprint, b.fingerprint, "seed {seed} ran two ways");
        assert_eq!(a.faults, b.faults, "seed {seed}");
        assert!(a.acked > 0, "seed {seed} acknowledged no write");
    }
}

/// Each deliberately broken variant of the Raft layer is caught within the
/// budget; the seed and the search time are printed.
#[test]
fn mutations_are_caught() {
    let budget = env_u64("ROSTER_SIM_MUTATION_SEEDS").unwrap_or(200);
    let mut missed = Vec::new();
    for m in sim::Mutation::ALL {
        let started = Instant::now();
        match search(0, budget, Some(m)) {
            Some((opts, p)) => println!(
                "{m:?}: caught by seed {} after {:.1} s: {}\n  replay: {}",
                opts.seed,
                started.elapsed().as_secs_f64(),
                p[0],
                replay_line(&opts)
            ),
            None => missed.push(format!("{m:?}")),
        }
    }
    assert!(
        missed.is_empty(),
        "not caught within {budget} seeds: {missed:?}"
    );
}
