//! The README's example for clients without a library, run as written
//! against a real `roster dev`: `dig` (`ROSTER_DIG`) and `curl`
//! (`ROSTER_CURL`), which `.ci/run` installs and sets; and the HTTPS curl
//! line `roster dev --tls --auth` prints, run as printed. Without them the
//! tests say so and skip.

use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::common::ports::free_port;
use crate::common::{doc_block, poll_blocking};

const LIMIT: Duration = Duration::from_secs(20);

#[test]
fn outside_dig_and_curl_as_the_readme_shows() {
    let (Ok(dig), Ok(curl)) = (std::env::var("ROSTER_DIG"), std::env::var("ROSTER_CURL")) else {
        eprintln!("skipped: set ROSTER_DIG and ROSTER_CURL (.ci/run installs them and does)");
        return;
    };
    let block = doc_block("outside-example");
    let base = free_block();
    let _dev = Dev::start(base);
    let roster = env!("CARGO_BIN_EXE_roster");
    let mut ran = Vec::new();
    for line in block.lines() {
        // The command without its comment, on this test's ports.
        let Some(cmd) = line.split("  #").next().map(str::trim) else {
            continue;
        };
        let mut cmd = cmd.to_string();
        for (dev, port) in [
            (7001, 0),
            (7201, 200),
            (7301, 300),
            (7302, 301),
            (7303, 302),
        ] {
            cmd = cmd.replace(&dev.to_string(), &(base + port).to_string());
        }
        let (cmd, wanted): (String, &str) = if let Some(rest) = cmd.strip_prefix("cargo run -- ") {
            (
                format!("{roster} {rest} --endpoints 127.0.0.1:{base}"),
                "registered",
            )
        } else if let Some(rest) = cmd.strip_prefix("dig ") {
            let wanted = match rest.contains(" SRV") {
                true => "1 1 8080 web-1.web.instance.roster.",
                false => "127.0.0.1",
            };
            (format!("{dig} {rest}"), wanted)
        } else if let Some(rest) = cmd.strip_prefix("curl ") {
            // A watch never ends by itself: cut it after a moment.
            let wanted = match rest.contains("/v1/watch/") {
                true => "event: reset",
                false if rest.contains("PUT") => "\"revision\"",
                false => "\"id\":\"web-2\"",
            };
            (format!("{curl} -sS --max-time 2 {rest}"), wanted)
        } else {
            continue;
        };
        let out = retried(&cmd, wanted)
            .unwrap_or_else(|o| panic!("{cmd}: no {wanted:?} within {LIMIT:?}: {o:?}"));
        ran.push((cmd, out));
    }
    assert_eq!(ran.len(), 6, "the example's commands: {block}");
}

/// The README's namespace example, run as written against `roster dev`.
#[test]
fn outside_namespaces_as_the_readme_shows() {
    let (Ok(dig), Ok(curl)) = (std::env::var("ROSTER_DIG"), std::env::var("ROSTER_CURL")) else {
        eprintln!("skipped: set ROSTER_DIG and ROSTER_CURL (.ci/run installs them and does)");
        return;
    };
    let block = doc_block("namespace-example");
    let base = free_block();
    let _dev = Dev::start(base);
    let roster = env!("CARGO_BIN_EXE_roster");
    // What each line prints, in order.
    let wanted = [
        "team-a instances=0/500 services=0/50 sessions=0/20",
        "registered team-a:web/web-1",
        "team-a:web/web-1 127.0.0.1:8080",
        "127.0.0.1",
        "\"namespace\":\"team-a\"",
        "team-a instances=1/500",
        "deleted namespace team-a",
    ];
    let lines: Vec<&str> = block
        .lines()
        .filter_map(|l| l.split("  #").next().map(str::trim))
        .filter(|l| !l.is_empty() && !l.starts_with("```"))
        .collect();
    assert_eq!(lines.len(), wanted.len(), "{block}");
    for (line, wanted) in lines.into_iter().zip(wanted) {
        let mut cmd = line.to_string();
        for (dev, port) in [(7201, 200), (7301, 300)] {
            cmd = cmd.replace(&dev.to_string(), &(base + port).to_string());
        }
        let cmd = if let Some(rest) = cmd.strip_prefix("cargo run -- ") {
            format!("{roster} {rest} --endpoints 127.0.0.1:{base}")
        } else if let Some(rest) = cmd.strip_prefix("dig ") {
            format!("{dig} {rest}")
        } else if let Some(rest) = cmd.strip_prefix("curl ") {
            format!("{curl} -sS --max-time 2 {rest}")
        } else {
            panic!("a line the test does not know: {line}");
        };
        retried(&cmd, wanted)
            .unwrap_or_else(|o| panic!("{cmd}: no {wanted:?} within {LIMIT:?}: {o:?}"));
    }
}

#[test]
fn roster_dev_tls_auth_prints_an_https_curl_line_that_works() {
    let Ok(curl) = std::env::var("ROSTER_CURL") else {
        eprintln!("skipped: set ROSTER_CURL (.ci/run installs curl and does)");
        return;
    };
    let dir = tempfile::tempdir().expect("dir");
    let printed = dir.path().join("dev.out");
    let out = std::fs::File::create(&printed).expect("dev's output file");
    let base = free_block();
    let _dev = Dev::start_with(base, &["--tls", "--auth"], Stdio::from(out));
    let mut last = String::new();
    let text = poll_blocking(LIMIT, || {
        last = std::fs::read_to_string(&printed).unwrap_or_default();
        last.contains("Ctrl-C").then(|| last.clone())
    })
    .unwrap_or_else(|| panic!("no Ctrl-C line within {LIMIT:?}; roster dev printed: {last}"));
    let https = format!("https://127.0.0.1:{}", base + 300);
    let console = format!("web console: {https}/ui");
    assert!(text.contains(&console), "{text}");
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("curl "))
        .unwrap_or_else(|| panic!("no curl line: {text}"));
    assert!(
        line.contains("--cacert ") && line.contains("authorization: Bearer "),
        "{line}"
    );
    assert!(line.ends_with(&format!("{https}/v1/services")), "{line}");
    // Run as printed: the list (empty), which needs the CA and the token.
    let cmd = format!("{curl} -sS --max-time 2 {}", &line["curl ".len()..]);
    retried(&cmd, "\"revision\"").unwrap_or_else(|o| panic!("{cmd}: {o:?}"));
}

/// Runs `cmd` in a shell until its output holds `wanted` (a node may not
/// have applied the write yet); the last output if it never does.
fn retried(cmd: &str, wanted: &str) -> Result<String, Output> {
    let mut last = None;
    poll_blocking(LIMIT, || {
        let out = Command::new("bash")
            .args(["-c", cmd])
            .output()
            .expect("run bash");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        last = Some(out);
        text.contains(wanted).then_some(text)
    })
    .ok_or_else(|| last.expect("ran at least once"))
}

/// A base port whose client, peer, DNS and HTTP ports (base..+3, +100..,
/// +200.., +300..) are free now.
fn free_block() -> u16 {
    loop {
        let base = free_port();
        let free = [0u16, 100, 200, 300].iter().all(|off| {
            (0..3).all(|i| {
                base.checked_add(off + i).is_some_and(|p| {
                    std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()
                        && std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok()
                })
            })
        });
        if free {
            return base;
        }
    }
}

/// `roster dev` as a process, stopped when dropped.
struct Dev(Child);

impl Dev {
    fn start(base: u16) -> Dev {
        Dev::start_with(base, &[], Stdio::null())
    }

    /// With further `flags`, printing to `stdout`.
    fn start_with(base: u16, flags: &[&str], stdout: Stdio) -> Dev {
        let child = Command::new(env!("CARGO_BIN_EXE_roster"))
            .args(["dev", "--base-port", &base.to_string()])
            .args(flags)
            .stdout(stdout)
            .stderr(Stdio::null())
            .spawn()
            .expect("start roster dev");
        Dev(child)
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
