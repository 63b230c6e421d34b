//! A client in another language, written from `proto/` alone: the README's
//! Python snippet (grpcio), run as written against a TLS cluster that asks
//! for client certificates, with certificates made by `deploy/tls/make-certs.sh`
//! (openssl). `.ci/run` installs grpcio into a venv and sets `ROSTER_PYTHON`;
//! without it the test says so and skips.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use roster::client::tls_from_files;
use roster::proto::v1::Consistency;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// The README's Python snippet, between its markers.
fn readme_snippet() -> String {
    let readme = std::fs::read_to_string(Path::new(REPO).join("README.md")).expect("README");
    let start = readme
        .find("<!-- python-tls-snippet -->")
        .expect("the snippet's start marker");
    let end = readme
        .find("<!-- /python-tls-snippet -->")
        .expect("the snippet's end marker");
    let block = &readme[start..end];
    let code = block
        .split_once("```python\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .map(|(code, _)| code)
        .expect("a python code block between the markers");
    code.to_string()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn python_grpcio_client_from_the_readme_over_tls() {
    let Ok(python) = std::env::var("ROSTER_PYTHON") else {
        eprintln!(
            "skipped: set ROSTER_PYTHON to a python with grpcio and grpcio-tools (.ci/run does)"
        );
        return;
    };
    let dir = tempfile::tempdir().expect("dir");
    let certs = dir.path().join("certs");
    run(
        Command::new(Path::new(REPO).join("deploy/tls/make-certs.sh"))
            .arg(&certs)
            .arg("node=127.0.0.1,localhost"),
    );
    let extra = format!(
        "[tls]\ncert = \"{0}/node.crt\"\nkey = \"{0}/node.key\"\nca = \"{0}/ca.crt\"\nclient_ca = \"{0}/ca.crt\"\n",
        certs.display()
    );
    let client_tls = tls_from_files(
        &certs.join("ca.crt"),
        Some((&certs.join("client.crt"), &certs.join("client.key"))),
    )
    .expect("client TLS files");
    let setup = Setup {
        client_tls: Some(client_tls),
        ..Setup::default()
    };
    let c = TestCluster::start_setup(3, &extra, setup)
        .await
        .expect("a TLS cluster");
    let leader = c.leader().await;
    let follower = (1..=3).find(|&i| i != leader).expect("a follower");

    let gen = dir.path().join("gen");
    std::fs::create_dir_all(&gen).expect("gen dir");
    run(Command::new(&python)
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(Path::new(REPO).join("proto"))
        .arg(format!("--python_out={}", gen.display()))
        .arg(format!("--grpc_python_out={}", gen.display()))
        .arg(Path::new(REPO).join("proto/roster/v1/registry.proto")));
    let script = dir.path().join("snippet.py");
    std::fs::write(&script, readme_snippet()).expect("write snippet");
    // Through a follower: the write is forwarded to the leader over mutual TLS.
    let printed = run(Command::new(&python)
        .arg(&script)
        .current_dir(dir.path())
        .env("ROSTER_ENDPOINT", c.endpoint(follower)));
    assert!(printed.contains("10.0.0.7:8080"), "{printed}");
    assert_eq!(
        ids(&c.client(), "payments", Consistency::Linearizable).await,
        vec!["payments-1"]
    );

    // The same snippet without a client certificate is refused by the node.
    let anonymous = readme_snippet()
        .replace("private_key=read(\"certs/client.key\"),", "")
        .replace("certificate_chain=read(\"certs/client.crt\"),", "");
    std::fs::write(&script, anonymous).expect("write snippet");
    let out = Command::new(&python)
        .arg(&script)
        .current_dir(dir.path())
        .env("ROSTER_ENDPOINT", c.endpoint(follower))
        .output()
        .expect("run python");
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("UNAVAILABLE"),
        "{out:?}"
    );
}
