//! Real servers that registered instances point their health checks at:
//! a TCP listener, an HTTP/1.1 server, a gRPC server with the standard health
//! service, and that plus the example echo service (which answers with the
//! target's name). Each can be stopped and started again on the same port.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use roster::proto::echo::echo_server::{Echo, EchoServer};
use roster::proto::echo::{EchoReply, EchoRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Tcp,
    Http,
    /// HTTP that answers 500 to every other request.
    FlappingHttp,
    Grpc,
    /// gRPC health plus the echo service.
    Echo,
}

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

/// A port on which connections are refused and that nobody else can take while
/// the returned socket lives: bound, never listening. (A port merely freed may be
/// reused by another test's server running in parallel.)
pub fn refusing_port() -> (tokio::net::TcpSocket, u32) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let port = socket.local_addr().expect("addr").port();
    (socket, u32::from(port))
}

pub struct Target {
    pub kind: Kind,
    pub name: String,
    pub addr: SocketAddr,
    task: Option<JoinHandle<()>>,
    /// Probes served: TCP connections accepted, HTTP requests, gRPC calls.
    requests: Arc<AtomicU64>,
    /// Accepted gRPC connections: the server spawns tasks of its own for them,
    /// so stopping it means shutting the sockets.
    grpc_conns: Arc<Mutex<Vec<std::net::TcpStream>>>,
}

impl Target {
    pub async fn start(kind: Kind) -> Target {
        Self::start_named(kind, "").await
    }

    pub async fn start_named(kind: Kind, name: &str) -> Target {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut t = Target {
            kind,
            name: name.to_string(),
            addr,
            task: None,
            requests: Arc::new(AtomicU64::new(0)),
            grpc_conns: Arc::default(),
        };
        t.serve(listener);
        t
    }

    pub fn port(&self) -> u32 {
        u32::from(self.addr.port())
    }

    /// How many probes this server has answered, so a test can tell that checks ran.
    pub fn probes(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// Closes the listener and every connection.
    pub fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        if let Ok(mut conns) = self.grpc_conns.lock() {
            for c in conns.drain(..) {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    pub async fn restart(&mut self) {
        self.stop();
        // The port was ours a moment ago; retry briefly while the kernel releases it.
        let addr = self.addr;
        let l = super::wait_until(
            &format!("{addr} to bind again"),
            std::time::Duration::from_secs(2),
            || async move { TcpListener::bind(addr).await.ok() },
        )
        .await;
        self.serve(l);
    }

    fn serve(&mut self, listener: TcpListener) {
        let requests = self.requests.clone();
        self.task = Some(match self.kind {
            Kind::Tcp => tokio::spawn(async move {
                let mut open = Vec::new();
                while let Ok((s, _)) = listener.accept().await {
                    requests.fetch_add(1, Ordering::SeqCst);
                    open.push(s);
                    open.truncate(64);
                }
            }),
            Kind::Http | Kind::FlappingHttp => {
                let flapping = self.kind == Kind::FlappingHttp;
                tokio::spawn(async move {
                    let mut conns = tokio::task::JoinSet::new();
                    while let Ok((s, _)) = listener.accept().await {
                        let requests = requests.clone();
                        conns.spawn(http_conn(s, requests, flapping));
                    }
                })
            }
            Kind::Grpc | Kind::Echo => {
                let (conns, name, echo) = (
                    self.grpc_conns.clone(),
                    self.name.clone(),
                    self.kind == Kind::Echo,
                );
                let counted = move |r: Request<()>| {
                    requests.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Status>(r)
                };
                tokio::spawn(async move {
                    let (tx, rx) =
                        tokio::sync::mpsc::channel::<std::io::Result<tokio::net::TcpStream>>(16);
                    let (reporter, health) = tonic_health::server::health_reporter();
                    reporter
                        .set_service_status("", tonic_health::ServingStatus::Serving)
                        .await;
                    let health =
                        tonic::service::interceptor::InterceptedService::new(health, counted);
                    let mut router = tonic::transport::Server::builder().add_service(health);
                    if echo {
                        router = router.add_service(EchoServer::new(Named(name)));
                    }
                    let server =
                        router.serve_with_incoming(tokio_stream::wrappers::ReceiverStream::new(rx));
                    let accept = async move {
                        while let Ok((s, _)) = listener.accept().await {
                            let Ok(std) = s.into_std() else { continue };
                            if let (Ok(keep), Ok(mut conns)) = (std.try_clone(), conns.lock()) {
                                conns.push(keep);
                            }
                            let Ok(s) = tokio::net::TcpStream::from_std(std) else {
                                continue;
                            };
                            if tx.send(Ok(s)).await.is_err() {
                                return;
                            }
                        }
                    };
                    tokio::select! {
                        _ = server => {}
                        _ = accept => {}
                    }
                })
            }
        });
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Answers HTTP/1.1 requests on one connection: 200, or alternately 500 when flapping.
async fn http_conn(mut s: tokio::net::TcpStream, requests: Arc<AtomicU64>, flapping: bool) {
    let mut buf = vec![0u8; 4096];
    let mut have = Vec::new();
    loop {
        let n = match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        have.extend_from_slice(&buf[..n]);
        while let Some(end) = have.windows(4).position(|w| w == b"\r\n\r\n") {
            have.drain(..end + 4);
            let n = requests.fetch_add(1, Ordering::SeqCst);
            let status = if flapping && n % 2 == 1 {
                "500 Internal Server Error"
            } else {
                "200 OK"
            };
            let reply = format!("HTTP/1.1 {status}\r\ncontent-length: 2\r\n\r\nok");
            if s.write_all(reply.as_bytes()).await.is_err() {
                return;
            }
        }
    }
}
