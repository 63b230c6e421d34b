//! HTTPS for the HTTP API and the console: a listener that hands axum each
//! connection once its TLS handshake is done. The handshake takes the
//! settings in force when the connection arrives, so a rotated certificate
//! serves the next connection; handshakes run apart, so a slow client holds
//! up no one, and each must finish within the handshake deadline.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::net::{self, TlsSource};

/// The first byte of every TLS connection: a handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// How the HTTP API serves TLS.
pub struct Https {
    /// The settings a new connection is served with.
    pub tls: TlsSource,
    /// How long a connection has to complete its handshake.
    pub handshake: Duration,
}

type Handshaken = Option<(TlsStream<TcpStream>, SocketAddr)>;

pub(super) struct Listener {
    tcp: TcpListener,
    https: Https,
    /// Dropped with the listener when the server stops: so are they.
    handshakes: JoinSet<Handshaken>,
    warn: net::Throttle,
}

impl Listener {
    pub(super) fn new(tcp: TcpListener, https: Https) -> Listener {
        Listener {
            tcp,
            https,
            handshakes: JoinSet::new(),
            warn: net::Throttle::default(),
        }
    }
}

impl axum::serve::Listener for Listener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            tokio::select! {
                accepted = self.tcp.accept() => match accepted {
                    Ok((stream, from)) => {
                        let tls = TlsAcceptor::from((self.https.tls)());
                        self.handshakes
                            .spawn(handshake(stream, from, tls, self.https.handshake));
                    }
                    Err(e) => net::accept_failed(e, &mut self.warn).await,
                },
                Some(done) = self.handshakes.join_next() => {
                    if let Ok(Some(conn)) = done {
                        return conn;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// The connection once it has completed the handshake within `within`; a
/// plaintext client is told to use HTTPS and closed.
async fn handshake(
    stream: TcpStream,
    from: SocketAddr,
    tls: TlsAcceptor,
    within: Duration,
) -> Handshaken {
    // Without TCP_NODELAY small replies wait for delayed ACKs (~40 ms on Linux).
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!("TCP_NODELAY: {e}");
    }
    let done = tokio::time::timeout(within, async {
        let mut first = [0u8; 1];
        match stream.peek(&mut first).await {
            Ok(1) if first[0] == TLS_HANDSHAKE => {}
            Ok(1) => {
                tell_to_use_https(stream).await;
                return None;
            }
            _ => return None,
        }
        match tls.accept(stream).await {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::debug!(remote = %from, "HTTPS handshake: {e}");
                None
            }
        }
    })
    .await;
    Some((done.ok()??, from))
}

/// A 400 that says why, instead of a bare closed connection.
async fn tell_to_use_https(mut stream: TcpStream) {
    const WHY: &str = "this port serves HTTPS: use https://\n";
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{WHY}",
        WHY.len()
    );
    let mut head = [0u8; 4096];
    if stream.read(&mut head).await.is_ok() {
        net::answer_and_close(stream, answer.as_bytes()).await;
    }
}
