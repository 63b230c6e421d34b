//! The web console in headless Chromium: `tests/console/check_console.py`
//! (selenium, run by `ROSTER_PYTHON`) against a follower of a 3-node
//! cluster: the page loads, shows registered instances, turns one critical
//! live when its TTL check runs out, puts one into maintenance and back and
//! deregisters one from its buttons, charts the changes it saw and shows the
//! members' round trips; over plain HTTP, and over
//! HTTPS on a cluster with `[tls]` and `[auth]`, where Chromium trusts the
//! test CA through an NSS database (`certutil`; no certificate error is
//! ignored) and the console is refused until given a token. `.ci/run`
//! installs Debian's chromium, chromium-driver and libnss3-tools and
//! selenium into its venv, and sets `ROSTER_CHROMIUM`; without both the
//! tests say so and skip.

use std::path::Path;
use std::process::Command;

use crate::common::certs::{tls_section, Ca};
use crate::common::*;

/// `ROSTER_PYTHON`, or `None` after saying the test skips.
fn python() -> Option<String> {
    let (Ok(python), Ok(_)) = (
        std::env::var("ROSTER_PYTHON"),
        std::env::var("ROSTER_CHROMIUM"),
    ) else {
        eprintln!("skipped: set ROSTER_PYTHON (with selenium) and ROSTER_CHROMIUM (.ci/run does)");
        return None;
    };
    Some(python)
}

/// A follower of `c`, as the console's node.
async fn follower(c: &TestCluster) -> u64 {
    let leader = c.leader().await;
    (1..=3).find(|id| *id != leader).expect("a follower")
}

/// Runs the check against `base` with `args`; its output, once it passed.
async fn check_console(python: String, base: String, args: Vec<String>) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/console/check_console.py");
    let mut cmd = Command::new(python);
    cmd.arg(script).arg(&base).args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("join")
        .expect("run the console check");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("turned critical live"), "{stdout}");
    for said in [
        "maintenance from the page: maintenance: from the console",
        "deregistered from the page",
        "charted (registrations, health changes, deliveries)",
        "members' round trips (ms)",
    ] {
        assert!(stdout.contains(said), "{said}: {stdout}");
    }
    assert!(stdout.contains("console ok"), "{stdout}");
    stdout
}

#[tokio::test]
async fn python_console_in_headless_chromium() {
    let Some(python) = python() else { return };
    let setup = Setup {
        http: true,
        ..Setup::default()
    };
    let c = TestCluster::start_setup(3, "", setup)
        .await
        .expect("cluster");
    c.client()
        .create_namespace(roster::proto::v1::CreateNamespaceRequest {
            name: "team-a".into(),
            quotas: None,
        })
        .await
        .expect("a namespace to switch to");
    let base = format!("http://127.0.0.1:{}", c.node(follower(&c).await).http_port);
    let mut args = vec!["--namespace".to_string(), "team-a".to_string()];
    // Where to keep a screenshot of the page (the README's comes from here).
    if let Ok(shot) = std::env::var("ROSTER_CONSOLE_SCREENSHOT") {
        args.extend(["--screenshot".to_string(), shot]);
    }
    let stdout = check_console(python, base, args).await;
    assert!(
        stdout.contains("namespace team-a shows: ['api']"),
        "{stdout}"
    );
    assert!(stdout.contains("back in default: ['web']"), "{stdout}");
}

#[tokio::test]
async fn python_console_over_https_with_a_token() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().expect("dir");
    let ca = Ca::new("console test CA");
    let extra =
        tls_section(dir.path(), &ca.nodes(3), &ca.pem(), false) + "[auth]\nenabled = true\n";
    let setup = Setup {
        http: true,
        auth: true,
        client_tls: Some(roster::client::tls_from_pem(ca.pem().as_bytes(), None)),
        ..Setup::default()
    };
    let c = TestCluster::start_setup(3, &extra, setup)
        .await
        .expect("a cluster with TLS and auth");
    let base = format!("https://127.0.0.1:{}", c.node(follower(&c).await).http_port);
    let cacert = dir.path().join("ca.crt").display().to_string();
    let args = vec![
        "--cacert".to_string(),
        cacert,
        "--token".to_string(),
        c.token().to_string(),
    ];
    let stdout = check_console(python, base, args).await;
    assert!(
        stdout.contains("served over HTTPS, the chain trusted"),
        "{stdout}"
    );
    assert!(
        stdout.contains("refused without the token: UNAUTHENTICATED"),
        "{stdout}"
    );
}
