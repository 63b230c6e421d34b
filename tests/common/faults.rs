//! Faults the harness can inflict besides signals: a small file system that
//! can be filled (disk full), and floods of idle connections.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::watch;
use tonic::transport::Endpoint;

/// A small tmpfs mounted over a node's data directory, unmounted on drop.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a fresh tmpfs of `mb` MiB at `dir` (created if missing);
    /// `None` where mounting is not allowed (not root).
    pub fn mount(dir: &Path, mb: u32) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).expect("mount point");
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mb}m"), "tmpfs"])
            .arg(dir)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        mounted.then(|| Tmpfs(dir.to_path_buf()))
    }

    /// Moves `dir`'s contents onto a fresh tmpfs mounted at `dir`.
    pub fn over(dir: &Path, mb: u32) -> Option<Tmpfs> {
        let saved = dir.with_extension("saved");
        std::fs::rename(dir, &saved).expect("move the data directory aside");
        let Some(fs) = Tmpfs::mount(dir, mb) else {
            std::fs::remove_dir(dir).expect("remove mount point");
            std::fs::rename(&saved, dir).expect("move the data directory back");
            return None;
        };
        let copied = std::process::Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", saved.display()))
            .arg(dir)
            .status()
            .expect("cp");
        assert!(copied.success(), "copy the data directory onto the tmpfs");
        Some(fs)
    }

    /// Writes a file until the file system is full.
    pub fn fill(&self) {
        let _ = std::process::Command::new("dd")
            .args(["if=/dev/zero", "bs=64k"])
            .arg(format!("of={}", self.0.join("filler").display()))
            .stderr(std::process::Stdio::null())
            .status();
    }

    pub fn free(&self) {
        let _ = std::fs::remove_file(self.0.join("filler"));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Opens an idle connection: one that never sends a byte, or (`handshake`)
/// a tonic channel that completes the HTTP/2 handshake and sends no request.
/// Returned boxed, to be held open and dropped.
pub async fn open_idle(addr: &str, handshake: bool) -> Option<Box<dyn std::any::Any + Send>> {
    if handshake {
        let endpoint = Endpoint::from_shared(format!("http://{addr}")).ok()?;
        let channel = endpoint.connect().await.ok()?;
        Some(Box::new(channel))
    } else {
        let stream = TcpStream::connect(addr).await.ok()?;
        Some(Box::new(stream))
    }
}

/// Holds `hold` idle connections to `addr`, half of each kind, then keeps
/// replacing the oldest with a new one until `stop`. Connections the server
/// refuses are simply tried again.
pub async fn flood(addr: String, hold: usize, mut stop: watch::Receiver<bool>) {
    let mut held = std::collections::VecDeque::with_capacity(hold);
    let mut attempts = 0u64;
    let mut pace = tokio::time::interval(Duration::from_millis(2));
    loop {
        if held.len() < hold {
            if *stop.borrow() {
                return;
            }
        } else {
            tokio::select! {
                _ = stop.changed() => return,
                _ = pace.tick() => {}
            }
            held.pop_front();
        }
        attempts += 1;
        if let Some(c) = open_idle(&addr, attempts.is_multiple_of(2)).await {
            held.push_back(c);
        }
    }
}
