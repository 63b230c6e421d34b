//! The two clusters under test, as real processes on loopback: three `roster
//! server`s and three `etcd`s, each with its data on the same disk.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub use crate::ports::free_port;

/// CPU time (user + system) a process has used, from /proc.
pub fn cpu_time(pid: u32) -> std::time::Duration {
    let ticks = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // After the parenthesised command name come fields 3 (state) onwards:
            // utime and stime, fields 14 and 15, are at 11 and 12.
            let rest = s.rsplit_once(')')?.1.to_string();
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    // Linux reports in USER_HZ, 100 per second on every common configuration.
    std::time::Duration::from_millis(ticks * 10)
}

/// The first number after `key` in `/proc/<pid>/<file>` (0 if unreadable).
fn proc_field(pid: u32, file: &str, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// Resident set size of a process, from /proc.
pub fn rss_bytes(pid: u32) -> u64 {
    proc_field(pid, "status", "VmRSS:") * 1024
}

/// Bytes a process has caused to be written to storage, from /proc (its
/// `write_bytes`: what reached the disk, not what it handed the page cache).
pub fn written_bytes(pid: u32) -> u64 {
    proc_field(pid, "io", "write_bytes:")
}

pub fn dir_bytes(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

pub struct Proc {
    pub endpoint: String,
    /// Where a Roster node answers DNS (UDP).
    pub dns: Option<SocketAddr>,
    /// Where a Roster node serves the HTTP/JSON API.
    pub http: Option<SocketAddr>,
    pub data: PathBuf,
    args: Vec<String>,
    program: PathBuf,
    child: Option<Child>,
}

impl Proc {
    pub fn start(&mut self) -> Result<()> {
        // Appended to: a node restarted by the failover rounds keeps the
        // log of its earlier runs.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data.with_extension("log"))?;
        let child = Command::new(&self.program)
            .args(&self.args)
            .env(
                "RUST_LOG",
                std::env::var("BENCH_ROSTER_LOG").unwrap_or_else(|_| "error".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", self.program.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL, as in a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, as an orchestrator stops a container; `wait` reaps it afterwards.
    pub fn terminate(&mut self) -> Result<()> {
        let pid = self.pid().context("process not running")?;
        let ok = Command::new("kill")
            .args(["-s", "TERM", &pid.to_string()])
            .status()?;
        anyhow::ensure!(ok.success(), "kill -s TERM {pid}");
        Ok(())
    }

    /// Waits for a terminated process to exit.
    pub fn wait(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.wait()?;
        }
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Cluster {
    pub procs: Vec<Proc>,
}

impl Cluster {
    pub fn endpoints(&self) -> Vec<String> {
        self.procs.iter().map(|p| p.endpoint.clone()).collect()
    }

    pub fn rss(&self) -> Vec<u64> {
        self.procs
            .iter()
            .filter_map(|p| p.pid())
            .map(rss_bytes)
            .collect()
    }

    /// `written_bytes` of each running node.
    pub fn written(&self) -> Vec<u64> {
        self.procs
            .iter()
            .filter_map(|p| p.pid())
            .map(written_bytes)
            .collect()
    }

    /// The CPU each running node uses over the next `window`, in cores.
    pub async fn cores_over(&self, window: Duration) -> Vec<f64> {
        let pids: Vec<u32> = self.procs.iter().filter_map(|p| p.pid()).collect();
        let cpu0: Vec<Duration> = pids.iter().map(|p| cpu_time(*p)).collect();
        tokio::time::sleep(window).await;
        pids.iter()
            .zip(&cpu0)
            .map(|(p, c0)| (cpu_time(*p) - *c0).as_secs_f64() / window.as_secs_f64())
            .collect()
    }

    /// The largest data directory.
    pub fn max_dir(&self) -> u64 {
        self.procs
            .iter()
            .map(|p| dir_bytes(&p.data))
            .max()
            .unwrap_or(0)
    }

    pub fn start_all(&mut self) -> Result<()> {
        for p in &mut self.procs {
            p.start()?;
        }
        Ok(())
    }

    pub fn kill_all(&mut self) {
        for p in &mut self.procs {
            p.kill();
        }
    }
}

/// Where peers reach a node whose peer port is `listen`: `Direct`ly, or at
/// an address returned by `Front`, such as a proxy started in front of it.
pub enum Peers<'a> {
    Direct,
    Front(&'a mut dyn FnMut(SocketAddr) -> Result<SocketAddr>),
}

impl Peers<'_> {
    /// One address per port, in order.
    fn advertise(&mut self, ports: &[u16]) -> Result<Vec<SocketAddr>> {
        ports
            .iter()
            .map(|p| {
                let listen = SocketAddr::from(([127, 0, 0, 1], *p));
                match self {
                    Peers::Direct => Ok(listen),
                    Peers::Front(front) => front(listen),
                }
            })
            .collect()
    }
}

/// A plain cluster (no TLS, no tokens), each node also serving DNS and HTTP.
pub fn roster(dir: &Path, n: usize, peers: Peers) -> Result<Cluster> {
    roster_cluster(dir, n, peers, "", true)
}

/// PEM files of a node certificate (for every etcd node: they all run on
/// 127.0.0.1) and the CA that issued it.
pub struct Certs {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// Like `roster`, with `extra` appended to every node's TOML config (`{id}`
/// in it replaced by the node's id), and without DNS and HTTP (with `[auth]`
/// DNS needs a token, and with `[tls]` HTTP is HTTPS, which the HTTP load
/// does not speak).
pub fn roster_with(dir: &Path, n: usize, peers: Peers, extra: &str) -> Result<Cluster> {
    roster_cluster(dir, n, peers, extra, false)
}

/// Like `roster`, with `extra` appended to every node's TOML config.
pub fn roster_cluster(
    dir: &Path,
    n: usize,
    mut peers: Peers,
    extra: &str,
    front_ends: bool,
) -> Result<Cluster> {
    std::fs::create_dir_all(dir)?;
    let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
    let peer: Vec<u16> = (0..n).map(|_| free_port()).collect();
    let advertise = peers.advertise(&peer)?;
    let initial: Vec<String> = (0..n)
        .map(|i| format!("{}={}", i + 1, advertise[i]))
        .collect();
    let initial = format!("initial_cluster = \"{}\"\n{extra}", initial.join(","));
    let procs = (0..n)
        .map(|i| {
            let at = || SocketAddr::from(([127, 0, 0, 1], free_port()));
            let (dns, http) = match front_ends {
                true => (Some(at()), Some(at())),
                false => (None, None),
            };
            let mut config = initial.clone();
            if let (Some(dns), Some(http)) = (dns, http) {
                config.push_str(&format!(
                    "\n[dns]\nlisten = \"{dns}\"\n[http]\nlisten = \"{http}\"\n"
                ));
            }
            let mut p = roster_node(dir, i as u64 + 1, ports[i], peer[i], advertise[i], &config)?;
            p.dns = dns;
            p.http = http;
            Ok(p)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut c = Cluster { procs };
    c.start_all()?;
    Ok(c)
}

/// A node `id` to be added to a running cluster (no initial cluster),
/// started; `extra` ends its TOML config.
pub fn roster_joiner(dir: &Path, id: u64, extra: &str) -> Result<Proc> {
    let (port, peer) = (free_port(), free_port());
    let advertise = SocketAddr::from(([127, 0, 0, 1], peer));
    let mut p = roster_node(dir, id, port, peer, advertise, extra)?;
    p.start()?;
    Ok(p)
}

/// Node `id`'s config file and process; `extra` ends its TOML config.
fn roster_node(
    dir: &Path,
    id: u64,
    port: u16,
    peer: u16,
    advertise: SocketAddr,
    extra: &str,
) -> Result<Proc> {
    let data = dir.join(format!("roster-{id}"));
    let config = dir.join(format!("roster-{id}.toml"));
    std::fs::write(
        &config,
        format!(
            "id = {id}\ncluster_id = \"bench\"\nlisten = \"127.0.0.1:{port}\"\n\
             peer_listen = \"127.0.0.1:{peer}\"\npeer_advertise = \"{advertise}\"\n\
             data_dir = \"{}\"\n{}\n",
            data.display(),
            extra.replace("{id}", &id.to_string()),
        ),
    )?;
    Ok(Proc {
        endpoint: format!("127.0.0.1:{port}"),
        dns: None,
        http: None,
        data,
        args: vec![
            "server".into(),
            "--config".into(),
            config.display().to_string(),
        ],
        program: PathBuf::from(env!("CARGO_BIN_EXE_roster")),
        child: None,
    })
}

/// `flags` are added to every node's command line.
pub fn etcd(dir: &Path, n: usize, peers: Peers, flags: &[String]) -> Result<Cluster> {
    etcd_with(dir, n, peers, flags, None)
}

/// Like `etcd`; with `tls`, clients and peers speak TLS, peers mutual TLS.
pub fn etcd_with(
    dir: &Path,
    n: usize,
    mut peers: Peers,
    flags: &[String],
    tls: Option<&Certs>,
) -> Result<Cluster> {
    std::fs::create_dir_all(dir)?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let program = which("etcd").context(
        "etcd is not installed: run benches/run.sh, which installs Debian's etcd-server",
    )?;
    let client: Vec<u16> = (0..n).map(|_| free_port()).collect();
    let peer: Vec<u16> = (0..n).map(|_| free_port()).collect();
    let advertise = peers.advertise(&peer)?;
    let initial: Vec<String> = (0..n)
        .map(|i| format!("e{}={scheme}://{}", i + 1, advertise[i]))
        .collect();
    let mut procs = Vec::new();
    for i in 0..n {
        let data = dir.join(format!("etcd-{}", i + 1));
        let mut args = vec![
            format!("--name=e{}", i + 1),
            format!("--data-dir={}", data.display()),
            format!("--listen-client-urls={scheme}://127.0.0.1:{}", client[i]),
            format!("--advertise-client-urls={scheme}://127.0.0.1:{}", client[i]),
            format!("--listen-peer-urls={scheme}://127.0.0.1:{}", peer[i]),
            format!("--initial-advertise-peer-urls={scheme}://{}", advertise[i]),
            format!("--initial-cluster={}", initial.join(",")),
            "--initial-cluster-state=new".into(),
            "--initial-cluster-token=bench".into(),
            "--logger=zap".into(),
            "--log-level=error".into(),
        ];
        args.extend_from_slice(flags);
        if let Some(t) = tls {
            let (cert, key, ca) = (t.cert.display(), t.key.display(), t.ca.display());
            args.extend([
                // No --trusted-ca-file for clients: in etcd it means client
                // certificates are required, which Roster's client port does not ask.
                format!("--cert-file={cert}"),
                format!("--key-file={key}"),
                format!("--peer-cert-file={cert}"),
                format!("--peer-key-file={key}"),
                format!("--peer-trusted-ca-file={ca}"),
                "--peer-client-cert-auth".into(),
            ]);
        }
        procs.push(Proc {
            endpoint: format!("127.0.0.1:{}", client[i]),
            dns: None,
            http: None,
            data,
            args,
            program: program.clone(),
            child: None,
        });
    }
    let mut c = Cluster { procs };
    c.start_all()?;
    Ok(c)
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

pub async fn wait_until<F, Fut>(what: &str, limit: Duration, mut f: F) -> Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if f().await {
            return Ok(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("timed out after {limit:?} waiting for {what}")
}
