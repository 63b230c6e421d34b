//! Roster vs etcd, same machine, same load generator, one run.
//!
//!   cargo bench --features bench --bench cluster [-- --quick] [-- --out FILE]
//!
//! (`benches/run.sh` installs etcd and protoc first, then runs this.)
//! Writes the results table into BENCHMARKS.md between its result markers.
//!
//! `PHASES` below is the whole benchmark: each phase's name (what `--only`
//! matches), what it measures, the systems it compares, the runs that include
//! it, and the function that runs it (`phases/`). The load generators the
//! phases share are in `workload.rs`, the table and its markdown in `report.rs`.

/// The tests' CA and `[tls]` section, for the TLS phase (the tests' other
/// helpers there go unused).
#[path = "../../tests/common/certs.rs"]
#[allow(dead_code)]
mod certs;
mod mux;
mod phases;
/// The tests' port picker: below the ephemeral range, never one port twice.
#[path = "../../tests/common/ports.rs"]
mod ports;
mod procs;
// Written for the tests; the benchmark uses only part of it.
#[allow(dead_code)]
#[path = "../../tests/common/proxy.rs"]
mod proxy;
mod report;
mod stats;
mod sut;
mod workload;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use phases::{Done, Shared};
use report::Report;

/// Nodes in each cluster under test.
const NODES: usize = 3;
/// Connections each load generator spreads its clients over: connection `i`
/// goes to node `i % NODES` (an index into the endpoint list).
const POOL: usize = 32;

/// The runs a phase can be part of when `--only` does not choose.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// `--quick`: 2 s phases and smaller sizes.
    Quick,
    /// No flag: 8 s phases.
    Full,
    /// `--scale`: the phases that take 1,000,000 instances.
    Scale,
}

/// Every run but `--scale`.
const QUICK_FULL: &[Mode] = &[Mode::Quick, Mode::Full];
/// Every run.
const ALL_RUNS: &[Mode] = &[Mode::Quick, Mode::Full, Mode::Scale];

#[derive(Clone, Copy)]
enum Systems {
    Both,
    RosterOnly,
}

impl fmt::Display for Systems {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            Systems::Both => "Roster and etcd",
            Systems::RosterOnly => "Roster only",
        })
    }
}

/// What a phase runs on, and the function that runs it.
enum Run {
    /// The clusters started once for these phases, in the order of the table.
    Shared(for<'a> fn(&'a mut Shared, &'a Opts, &'a mut Report) -> Done<'a>),
    /// Fresh clusters of its own under the directory it is given (named
    /// after the phase), once the shared ones are gone.
    Fresh(for<'a> fn(&'a Path, &'a Opts, &'a mut Report) -> Done<'a>),
}

struct Phase {
    /// What `--only` matches (any part of it).
    name: &'static str,
    measures: &'static str,
    systems: Systems,
    /// The runs that include it without `--only`.
    modes: &'static [Mode],
    run: Run,
}

/// The phases in the order they run and their rows appear; those on the
/// shared clusters come first.
const PHASES: &[Phase] = &[
    Phase {
        name: "disk",
        measures: "bytes written per acknowledged write and the data dir, 100 instances",
        systems: Systems::Both,
        modes: QUICK_FULL,
        run: Run::Shared(|s, o, r| Box::pin(phases::disk::disk(s, o, r))),
    },
    Phase {
        name: "register",
        measures: "registrations from 1 client on the leader, 64 and 1,000 clients",
        systems: Systems::Both,
        modes: QUICK_FULL,
        run: Run::Shared(|s, o, r| Box::pin(phases::writes::register(s, o, r))),
    },
    Phase {
        name: "namespaces",
        measures: "registrations and watch delay (1,000 watchers) over 100 namespaces against one",
        systems: Systems::RosterOnly,
        modes: QUICK_FULL,
        run: Run::Shared(|s, o, r| Box::pin(phases::namespaces::namespaces(s, o, r))),
    },
    Phase {
        name: "heartbeat",
        measures: "heartbeat round trips, 64 clients",
        systems: Systems::Both,
        modes: QUICK_FULL,
        run: Run::Shared(|s, o, r| Box::pin(phases::writes::heartbeat(s, o, r))),
    },
    Phase {
        name: "query",
        measures: "reads of a 100-instance service, linearizable and stale",
        systems: Systems::Both,
        modes: QUICK_FULL,
        run: Run::Shared(|s, o, r| Box::pin(phases::reads::query(s, o, r))),
    },
    Phase {
        name: "dns",
        measures: "DNS and HTTP reads on each node, and the same by gRPC",
        systems: Systems::Both,
        modes: QUICK_FULL,
        run: Run::Shared(|s, o, r| Box::pin(phases::dns::dns(s, o, r))),
    },
    Phase {
        name: "consul",
        measures: "HTTP and Consul API reads of a 100-instance service, Consul blocking-query wake-up beside the gRPC watch",
        systems: Systems::RosterOnly,
        modes: QUICK_FULL,
        run: Run::Shared(|s, o, r| Box::pin(phases::consul::consul(s, o, r))),
    },
    Phase {
        name: "stale_under_writes",
        measures: "stale reads on the leader and a follower, with and without writes",
        systems: Systems::Both,
        modes: QUICK_FULL,
        run: Run::Shared(|s, o, r| Box::pin(phases::reads::stale_under_writes(s, o, r))),
    },
    Phase {
        name: "watch",
        measures: "registration ack → watch event, 1 to 10,000 watchers",
        systems: Systems::Both,
        modes: QUICK_FULL,
        run: Run::Shared(|s, o, r| Box::pin(phases::watch::watch(s, o, r))),
    },
    Phase {
        name: "xds",
        measures: "registration ack → xDS endpoints, 1 to 1,000 ADS streams",
        systems: Systems::RosterOnly,
        modes: QUICK_FULL,
        run: Run::Shared(|s, o, r| Box::pin(phases::watch::xds(s, o, r))),
    },
    Phase {
        name: "failover",
        measures: "leader SIGKILL and SIGTERM → first accepted write",
        systems: Systems::Both,
        modes: QUICK_FULL,
        run: Run::Shared(|s, o, r| Box::pin(phases::failover::failover(s, o, r))),
    },
    Phase {
        name: "health",
        measures: "CPU and memory of TCP health checks every second",
        systems: Systems::RosterOnly,
        modes: QUICK_FULL,
        run: Run::Fresh(|d, o, r| Box::pin(phases::liveness::health(d, o, r))),
    },
    Phase {
        name: "rtt",
        measures: "registrations and linearizable reads with 0, 10 and 50 ms between nodes",
        systems: Systems::Both,
        modes: QUICK_FULL,
        run: Run::Fresh(|d, o, r| Box::pin(phases::rtt::rtt(d, o, r))),
    },
    Phase {
        name: "secure",
        measures: "register, query and watch with TLS and auth, against plaintext",
        systems: Systems::Both,
        modes: QUICK_FULL,
        run: Run::Fresh(|d, o, r| Box::pin(phases::secure::secure(d, o, r))),
    },
    Phase {
        name: "replicas",
        measures: "10,000 and 50,000 watchers over 3 voters, then over 3 voters + 2 read replicas, writes beside",
        systems: Systems::RosterOnly,
        modes: QUICK_FULL,
        run: Run::Fresh(|d, o, r| Box::pin(phases::replicas::replicas(d, o, r))),
    },
    Phase {
        name: "mux",
        measures: "memory per watched service and per stream, watches multiplexed",
        systems: Systems::Both,
        modes: QUICK_FULL,
        run: Run::Fresh(|d, o, r| Box::pin(phases::watch::mux(d, o, r))),
    },
    Phase {
        name: "namespace-memory",
        measures: "memory per instance over 100 namespaces against one",
        systems: Systems::RosterOnly,
        modes: QUICK_FULL,
        run: Run::Fresh(|d, o, r| Box::pin(phases::namespaces::memory(d, o, r))),
    },
    Phase {
        name: "sessions",
        measures: "CPU of session renewals, 1,000 sessions holding every instance",
        systems: Systems::RosterOnly,
        modes: ALL_RUNS,
        run: Run::Fresh(|d, o, r| Box::pin(phases::liveness::sessions(d, o, r))),
    },
    Phase {
        name: "scale",
        measures: "load, queries, memory, restart, snapshot and disk at size",
        systems: Systems::Both,
        modes: ALL_RUNS,
        run: Run::Fresh(|d, o, r| Box::pin(phases::scale::scale(d, o, r))),
    },
];

struct Opts {
    quick: bool,
    /// `--scale`: the scale and sessions phases with 1,000,000 instances
    /// (10,000 services × 100), and only those unless `--only` says otherwise.
    scale: bool,
    out: PathBuf,
    /// Run only phases whose name contains one of these (`--only watch,query`).
    only: Vec<String>,
}

impl Opts {
    fn parse() -> Opts {
        let args: Vec<String> = std::env::args().collect();
        let after = |flag: &str| {
            let i = args.iter().position(|a| a == flag)?;
            args.get(i + 1).cloned()
        };
        let out = after("--out").map(PathBuf::from).unwrap_or_else(|| {
            PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/BENCHMARKS.md"))
        });
        let only = after("--only")
            .map(|s| s.split(',').map(str::to_string).collect())
            .unwrap_or_default();
        Opts {
            quick: args.iter().any(|a| a == "--quick"),
            scale: args.iter().any(|a| a == "--scale"),
            out,
            only,
        }
    }

    fn mode(&self) -> Mode {
        match (self.quick, self.scale) {
            (_, true) => Mode::Scale,
            (true, false) => Mode::Quick,
            (false, false) => Mode::Full,
        }
    }

    fn selects(&self, phase: &Phase) -> bool {
        if self.only.is_empty() {
            phase.modes.contains(&self.mode())
        } else {
            self.only.iter().any(|o| phase.name.contains(o.as_str()))
        }
    }

    /// How long each load of a phase runs.
    fn phase(&self) -> Duration {
        Duration::from_secs(if self.quick { 2 } else { 8 })
    }

    /// Instances in the scale and sessions phases.
    fn instances(&self) -> u64 {
        match self.mode() {
            Mode::Scale => 1_000_000,
            Mode::Quick => 10_000,
            Mode::Full => 100_000,
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let opts = Opts::parse();
    // BENCH_KEEP=1 keeps the nodes' directories and logs for a look afterwards.
    let dir = tempfile::Builder::new()
        .prefix("roster-bench-")
        .disable_cleanup(std::env::var_os("BENCH_KEEP").is_some())
        .tempdir()?;
    eprintln!("data and logs under {}", dir.path().display());
    let mut shared = Some(Shared::start(dir.path()).await?);
    let mut report = Report::default();
    for phase in PHASES.iter().filter(|p| opts.selects(p)) {
        eprintln!(
            "phase {}: {} ({})",
            phase.name, phase.measures, phase.systems
        );
        match phase.run {
            Run::Shared(run) => {
                let s = shared
                    .as_mut()
                    .context("a shared phase after a fresh one")?;
                run(s, &opts, &mut report).await?;
            }
            Run::Fresh(run) => {
                if let Some(s) = shared.take() {
                    s.release(&mut report);
                }
                run(&dir.path().join(phase.name), &opts, &mut report).await?;
            }
        }
    }
    if let Some(s) = shared.take() {
        s.release(&mut report);
    }
    report.write(opts.mode(), &opts.out)
}
