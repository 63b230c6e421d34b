//! The web console in headless Chromium: `tests/console/check_console.py`
//! (selenium, run by `ROSTER_PYTHON`) against a follower of a 3-node
//! cluster: the page loads, shows a registered instance, and turns it
//! critical live when its TTL check runs out. `.ci/run` installs Debian's
//! chromium and chromium-driver and selenium into its venv, and sets
//! `ROSTER_CHROMIUM`; without both the test says so and skips.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

#[tokio::test]
async fn python_console_in_headless_chromium() {
    let (Ok(python), Ok(_)) = (
        std::env::var("ROSTER_PYTHON"),
        std::env::var("ROSTER_CHROMIUM"),
    ) else {
        eprintln!("skipped: set ROSTER_PYTHON (with selenium) and ROSTER_CHROMIUM (.ci/run does)");
        return;
    };
    let setup = Setup {
        http: true,
        ..Setup::default()
    };
    let c = TestCluster::start_setup(3, "", setup)
        .await
        .expect("cluster");
    let leader = c.leader().await;
    let follower = (1..=3).find(|id| *id != leader).expect("a follower");
    let base = format!("http://127.0.0.1:{}", c.node(follower).http_port);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/console/check_console.py");
    let mut cmd = Command::new(python);
    cmd.arg(script).arg(&base);
    // Where to keep a screenshot of the page (the README's comes from here).
    if let Ok(shot) = std::env::var("ROSTER_CONSOLE_SCREENSHOT") {
        cmd.arg(shot);
    }
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("join")
        .expect("run the console check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("turned critical live"), "{stdout}");
    assert!(stdout.contains("console ok"), "{stdout}");
}
