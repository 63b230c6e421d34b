//! The results: the table's rows and the notes below it, and the markdown
//! they become between BENCHMARKS.md's result markers (or in `--out FILE`).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::stats::{ms, Summary};
use crate::Mode;

pub struct Row {
    pub name: String,
    pub roster: String,
    pub etcd: String,
    pub ratio: String,
    pub target: &'static str,
}

/// Rows, and notes (a bullet each) under the table.
#[derive(Default)]
pub struct Report {
    rows: Vec<Row>,
    notes: Vec<String>,
}

impl Report {
    pub fn row(&mut self, row: Row) {
        self.rows.push(row);
    }

    pub fn rows(&mut self, rows: impl IntoIterator<Item = Row>) {
        self.rows.extend(rows);
    }

    pub fn note(&mut self, note: String) {
        self.notes.push(note);
    }

    /// A throughput row, then the latency rows.
    pub fn load(&mut self, name: &str, r: &Summary, e: &Summary, throughput: &'static str) {
        self.load_with(name, r, e, throughput, "");
    }

    /// `load`, with a target for p99 too.
    pub fn load_with(
        &mut self,
        name: &str,
        r: &Summary,
        e: &Summary,
        throughput: &'static str,
        p99: &'static str,
    ) {
        self.throughput(name, r, e, throughput);
        self.latency(name, r, e, p99);
    }

    pub fn throughput(&mut self, name: &str, r: &Summary, e: &Summary, target: &'static str) {
        self.row(Row {
            name: format!("{name}: throughput"),
            roster: format!("{:.0}/s", r.throughput),
            etcd: format!("{:.0}/s", e.throughput),
            ratio: times(r.throughput, e.throughput.max(1e-9)),
            target,
        });
    }

    /// p50 / max and p99, and the errors if there were any.
    pub fn latency(&mut self, name: &str, r: &Summary, e: &Summary, p99: &'static str) {
        // Below 10 µs a ratio says nothing (watch events often beat the writer's ack).
        let ratio = |a: Duration, b: Duration| {
            if b < Duration::from_micros(10) {
                "—".to_string()
            } else {
                format!("{:.2}×", a.as_secs_f64() / b.as_secs_f64())
            }
        };
        self.row(Row {
            name: format!("{name}: p50 / max"),
            roster: format!("{} / {}", ms(r.p50), ms(r.max)),
            etcd: format!("{} / {}", ms(e.p50), ms(e.max)),
            ratio: ratio(r.p50, e.p50),
            target: "",
        });
        self.row(Row {
            name: format!("{name}: p99"),
            roster: ms(r.p99),
            etcd: ms(e.p99),
            ratio: ratio(r.p99, e.p99),
            target: p99,
        });
        self.errors(name, r, e);
    }

    /// A row of the errors, if there were any.
    pub fn errors(&mut self, name: &str, r: &Summary, e: &Summary) {
        if r.errors + e.errors > 0 {
            self.row(Row {
                name: format!("{name}: errors"),
                roster: r.errors.to_string(),
                etcd: e.errors.to_string(),
                ratio: String::new(),
                target: "",
            });
        }
    }

    /// A Roster-only row: throughput, p50, p99 and errors in one cell.
    pub fn roster_load(&mut self, label: &str, s: &Summary, etcd: &str) {
        self.row(Row {
            name: format!("{label}: throughput / p50 / p99 (errors)"),
            roster: format!(
                "{:.0}/s / {} / {} ({})",
                s.throughput,
                ms(s.p50),
                ms(s.p99),
                s.errors
            ),
            etcd: etcd.into(),
            ratio: "—".into(),
            target: "",
        });
    }

    /// The run's heading, the table and the notes, in markdown.
    fn markdown(&self, mode: Mode) -> String {
        let mut t = String::new();
        t.push_str(&format!(
            "Run: {} mode, {}.\n\nMachine: {}.\n\n",
            match mode {
                Mode::Scale => "scale (1,000,000 instances)",
                Mode::Quick => "quick",
                Mode::Full => "full",
            },
            command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            machine()
        ));
        t.push_str("| workload | Roster | etcd | Roster/etcd | target |\n|---|---|---|---|---|\n");
        for r in &self.rows {
            t.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                r.name, r.roster, r.etcd, r.ratio, r.target
            ));
        }
        t.push('\n');
        for e in &self.notes {
            t.push_str(&format!("- {e}\n"));
        }
        t
    }

    /// Replaces what is between `out`'s result markers (or writes a new
    /// file with them), and prints it.
    pub fn write(&self, mode: Mode, out: &Path) -> Result<()> {
        const START: &str = "<!-- results:start -->";
        const END: &str = "<!-- results:end -->";
        let t = self.markdown(mode);
        let old = std::fs::read_to_string(out).unwrap_or_default();
        let new = match (old.find(START), old.find(END)) {
            (Some(s), Some(e)) if s < e => format!("{}{START}\n{t}{}", &old[..s], &old[e..]),
            _ => format!("# Benchmarks\n\n{START}\n{t}{END}\n"),
        };
        std::fs::write(out, new).with_context(|| format!("write {}", out.display()))?;
        println!("{t}\nwritten to {}", out.display());
        Ok(())
    }
}

/// `a / b` as a ratio cell.
pub fn times(a: f64, b: f64) -> String {
    format!("{:.2}×", a / b)
}

pub fn mib(b: u64) -> String {
    format!("{:.0} MiB", b as f64 / (1024.0 * 1024.0))
}

/// `b` in KiB below a MiB, else in MiB.
pub fn size(b: u64) -> String {
    if b < 1024 * 1024 {
        format!("{} KiB", b / 1024)
    } else {
        mib(b)
    }
}

pub fn list_mib(v: &[u64]) -> String {
    v.iter().map(|b| mib(*b)).collect::<Vec<_>>().join(", ")
}

fn command_line(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines().next().map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse::<u64>()
                    .unwrap_or(0)
            })
        })
        .unwrap_or(0);
    format!(
        "{} cores ({cpu}), {:.0} GiB RAM, Linux {}; {}; {}; Roster {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        mem as f64 / 1024.0 / 1024.0,
        command_line("uname", &["-r"]),
        command_line("rustc", &["--version"]),
        command_line("etcd", &["--version"]).replace("etcd Version: ", "etcd "),
        env!("CARGO_PKG_VERSION"),
    )
}
