//! Client-side load balancing through Roster.
//!
//! With `cargo run -- dev` running, start three echo servers (each registers
//! itself with a keep-alive and deregisters on Ctrl-C):
//!
//!   cargo run --example echo -- serve echo-1 9101
//!   cargo run --example echo -- serve echo-2 9102
//!   cargo run --example echo -- serve echo-3 9103
//!
//! and a caller that balances over the healthy ones:
//!
//!   cargo run --example echo -- call
//!
//! Stop a server (Ctrl-C, or kill -9: its TTL then runs out) and its share
//! moves to the other two; start it again and it comes back.
//!
//! Against a cluster with TLS and tokens (`cargo run -- dev --tls`, or one with
//! `[auth]`), set what the CLI reads: `ROSTER_ENDPOINTS`, `ROSTER_CACERT`
//! (with `ROSTER_CERT` and `ROSTER_KEY` for a client certificate) and
//! `ROSTER_TOKEN`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use roster::client::{tls_from_files, RosterClient};
use roster::proto::echo::echo_client::EchoClient;
use roster::proto::echo::echo_server::{Echo, EchoServer};
use roster::proto::echo::{EchoReply, EchoRequest};
use roster::proto::v1::Instance;
use tonic::{Request, Response, Status};

struct Named(String);

#[tonic::async_trait]
impl Echo for Named {
    async fn say(&self, req: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        Ok(Response::new(EchoReply {
            message: req.into_inner().message,
            instance: self.0.clone(),
        }))
    }
}

/// A client as the environment says, like the CLI's.
fn roster() -> Result<RosterClient, Box<dyn std::error::Error>> {
    let var = |name| std::env::var(name).ok();
    let endpoints: Vec<String> = var("ROSTER_ENDPOINTS")
        .unwrap_or_else(|| "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003".into())
        .split(',')
        .map(str::to_string)
        .collect();
    let client = match var("ROSTER_CACERT") {
        Some(ca) => {
            let (cert, key) = (var("ROSTER_CERT"), var("ROSTER_KEY"));
            let identity = cert
                .as_deref()
                .map(Path::new)
                .zip(key.as_deref().map(Path::new));
            RosterClient::with_tls(&endpoints, tls_from_files(Path::new(&ca), identity)?)?
        }
        None => RosterClient::new(&endpoints)?,
    };
    Ok(match var("ROSTER_TOKEN") {
        Some(token) => client.with_token(&token)?,
        None => client,
    })
}

async fn serve(name: String, port: u16) -> Result<(), Box<dyn std::error::Error>> {
    let client = roster()?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    let server = tonic::transport::Server::builder()
        .add_service(EchoServer::new(Named(name.clone())))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    let me = Instance {
        service: "echo".into(),
        id: name.clone(),
        address: "127.0.0.1".into(),
        port: u32::from(port),
        ..Default::default()
    };
    let registration = client
        .register_with_keepalive(me, Duration::from_secs(2))
        .await?;
    println!("{name} serving on 127.0.0.1:{port} and registered; Ctrl-C to stop");
    tokio::select! {
        r = server => r?,
        _ = tokio::signal::ctrl_c() => {}
    }
    registration.shutdown().await?;
    println!("{name} deregistered");
    Ok(())
}

async fn call() -> Result<(), Box<dyn std::error::Error>> {
    let client = roster()?;
    let mut echo = client.resolve("echo");
    echo.ready(Duration::from_secs(5)).await;
    let mut rpc = EchoClient::new(echo.balanced_channel());
    let mut window = Instant::now();
    let mut served: BTreeMap<String, u32> = BTreeMap::new();
    loop {
        match rpc
            .say(EchoRequest {
                message: "hi".into(),
            })
            .await
        {
            Ok(r) => *served.entry(r.into_inner().instance).or_default() += 1,
            Err(e) => *served.entry(format!("error ({})", e.code())).or_default() += 1,
        }
        if window.elapsed() >= Duration::from_secs(1) {
            let healthy: Vec<String> = echo
                .current()
                .instances
                .iter()
                .map(|i| i.id.clone())
                .collect();
            println!("healthy {healthy:?} served {served:?}");
            served.clear();
            window = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") if args.len() == 3 => serve(args[1].clone(), args[2].parse()?).await,
        Some("call") => call().await,
        _ => {
            eprintln!(
                "usage: echo serve <name> <port> | echo call   (ROSTER_ENDPOINTS=host:port,...)"
            );
            std::process::exit(2);
        }
    }
}
