//! A client in another language, written from `proto/` alone: the README's
//! Python snippet (grpcio), run as written against a cluster with TLS that
//! asks for client certificates and with auth, with certificates made by
//! `deploy/tls/make-certs.sh` (openssl) and a token made with the Rust client. `.ci/run` installs grpcio into a venv and sets `ROSTER_PYTHON`;
//! without it the test says so and skips.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::common::*;
use roster::client::tls_from_files;
use roster::proto::v1::{CreateNamespaceRequest, CreateTokenRequest, GetServiceRequest, Role};

const REPO: &str = env!("CARGO_MANIFEST_DIR");

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn python_grpcio_client_from_the_readme_over_tls() {
    let Some(python) = python() else {
        return;
    };
    let dir = tempfile::tempdir().expect("dir");
    let certs = dir.path().join("certs");
    make_certs(&certs);
    let extra = format!(
        "[tls]\ncert = \"{0}/node-{{id}}.crt\"\nkey = \"{0}/node-{{id}}.key\"\nca = \"{0}/ca.crt\"\nclient_ca = \"{0}/ca.crt\"\n\
         [auth]\nenabled = true\n",
        certs.display()
    );
    let client_tls = tls_from_files(
        &certs.join("ca.crt"),
        Some((&certs.join("client.crt"), &certs.join("client.key"))),
    )
    .expect("client TLS files");
    let setup = Setup {
        client_tls: Some(client_tls),
        auth: true,
        ..Setup::default()
    };
    let c = TestCluster::start_setup(3, &extra, setup)
        .await
        .expect("a TLS cluster");
    let leader = c.leader().await;
    let follower = (1..=3).find(|&i| i != leader).expect("a follower");
    let token = c
        .client()
        .create_token(CreateTokenRequest {
            role: Role::Write as i32,
            services: vec!["pay*".into()],
            description: "python".into(),
        })
        .await
        .expect("a write token");
    let accessor = token.token.as_ref().expect("info").accessor.clone();
    c.wait_for(
        "the token on the follower",
        Duration::from_secs(5),
        || async {
            c.client_with(follower, Some(&token.secret))
                .status()
                .await
                .ok()
        },
    )
    .await;

    let gen = dir.path().join("gen");
    std::fs::create_dir_all(&gen).expect("gen dir");
    run(Command::new(&python)
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(Path::new(REPO).join("proto"))
        .arg(format!("--python_out={}", gen.display()))
        .arg(format!("--grpc_python_out={}", gen.display()))
        .arg(Path::new(REPO).join("proto/roster/v1/registry.proto")));
    // Through a follower: the write is forwarded to the leader over mutual TLS.
    let python_run = |script: &str, token: &str| {
        let path = dir.path().join("snippet.py");
        std::fs::write(&path, script).expect("write snippet");
        Command::new(&python)
            .arg(&path)
            .current_dir(dir.path())
            .env("ROSTER_ENDPOINT", c.endpoint(follower))
            .env("ROSTER_TOKEN", token)
            .output()
            .expect("run python")
    };
    let out = python_run(&doc_block("python-tls-snippet"), &token.secret);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("10.0.0.7:8080"),
        "{out:?}"
    );
    let got = c
        .client()
        .get_service(GetServiceRequest {
            service: "payments".into(),
            ..Default::default()
        })
        .await
        .expect("read back");
    assert_eq!(got.instances.len(), 1, "{got:?}");
    assert_eq!(got.instances[0].registered_by, accessor);

    // With an unknown token the node refuses the call...
    let out = python_run(&doc_block("python-tls-snippet"), "not-a-token");
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("UNAUTHENTICATED"),
        "{out:?}"
    );
    // ...and without a client certificate the connection itself.
    let anonymous = doc_block("python-tls-snippet")
        .replace("private_key=read(\"certs/client.key\"),", "")
        .replace("certificate_chain=read(\"certs/client.crt\"),", "");
    let out = python_run(&anonymous, &token.secret);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("UNAVAILABLE"),
        "{out:?}"
    );
}

/// The docs' namespace snippet, run as written: grpcio with the stubs
/// generated from `proto/`, a token scoped to one namespace.
#[tokio::test]
async fn python_grpcio_client_uses_namespaces() {
    let Some(python) = python() else {
        return;
    };
    let setup = Setup {
        auth: true,
        ..Setup::default()
    };
    let c = TestCluster::start_setup(3, "[auth]\nenabled = true\n", setup)
        .await
        .expect("an auth cluster");
    for name in ["team-a", "team-b"] {
        c.client()
            .create_namespace(CreateNamespaceRequest {
                name: name.into(),
                quotas: None,
            })
            .await
            .expect("namespace");
    }
    let token = c
        .client()
        .create_token(CreateTokenRequest {
            role: Role::Write as i32,
            services: vec!["team-a/*".into()],
            description: "team a, python".into(),
        })
        .await
        .expect("a scoped token");
    let leader = c.leader().await;
    c.wait_for(
        "the token on the leader",
        Duration::from_secs(5),
        || async {
            c.client_with(leader, Some(&token.secret))
                .status()
                .await
                .ok()
        },
    )
    .await;
    let dir = tempfile::tempdir().expect("dir");
    let gen = dir.path().join("gen");
    std::fs::create_dir_all(&gen).expect("gen dir");
    run(Command::new(&python)
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(Path::new(REPO).join("proto"))
        .arg(format!("--python_out={}", gen.display()))
        .arg(format!("--grpc_python_out={}", gen.display()))
        .arg(Path::new(REPO).join("proto/roster/v1/registry.proto")));
    let path = dir.path().join("snippet.py");
    std::fs::write(&path, doc_block("python-namespace-snippet")).expect("write snippet");
    let stdout = run(Command::new(&python)
        .arg(&path)
        .current_dir(dir.path())
        .env("ROSTER_ENDPOINT", c.endpoint(leader))
        .env("ROSTER_TOKEN", &token.secret));
    assert!(stdout.contains("['team-a/web 10.0.0.5:8080']"), "{stdout}");
    assert!(stdout.contains("PERMISSION_DENIED"), "{stdout}");
    let got = c
        .client()
        .get_service(GetServiceRequest {
            service: "web".into(),
            namespace: "team-a".into(),
            ..Default::default()
        })
        .await
        .expect("read back");
    assert_eq!(got.instances.len(), 1, "{got:?}");
}
