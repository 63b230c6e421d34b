//! TLS on both ports, from PEM files that are read again when they change.
//!
//! The client port serves TLS with the node's certificate and, when
//! `client_ca` is set, accepts only clients with a certificate from that CA;
//! so does the HTTP API (HTTPS), with the client port's very settings.
//! The peer port verifies client certificates against the cluster CA (`ca`):
//! one from another CA fails the handshake, and a connection without one is
//! answered UNAUTHENTICATED, saying what the port admits
//! (`raft::peer_trust`, which also refuses certificates naming no member).
//! The node dials its peers with the same certificate as its client
//! certificate. The files are read again every `RELOAD_EVERY` and on SIGHUP;
//! a set that does not load is logged and the one in force stays.

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::crypto::{ring, CryptoProvider};
use tokio_rustls::rustls::server::danger::ClientCertVerifier;
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::config::TlsFiles;
use crate::error::{Error, Result};

/// How often the files are looked at for a rotation.
const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// The TLS settings in force, replaced whole when the files change.
pub struct Tls {
    files: TlsFiles,
    current: RwLock<Arc<Loaded>>,
}

struct Loaded {
    /// The files' bytes, to tell a change.
    read: Vec<Vec<u8>>,
    client_port: Arc<ServerConfig>,
    /// The client port's settings, speaking HTTP/1.1 instead of gRPC's HTTP/2.
    http: Arc<ServerConfig>,
    peer_port: Arc<ServerConfig>,
    dial_peers: ClientTlsConfig,
}

/// Which listener a server configuration is for.
#[derive(Clone, Copy)]
pub enum Port {
    Client,
    /// The HTTP API and the console.
    Http,
    Peer,
}

impl Tls {
    pub fn load(files: &TlsFiles) -> Result<Arc<Tls>> {
        let loaded = Loaded::read(files)?;
        Ok(Arc::new(Tls {
            files: files.clone(),
            current: RwLock::new(Arc::new(loaded)),
        }))
    }

    fn current(&self) -> Arc<Loaded> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// What a new connection on `port` is served with.
    pub fn server(&self, port: Port) -> Arc<ServerConfig> {
        let c = self.current();
        match port {
            Port::Client => c.client_port.clone(),
            Port::Http => c.http.clone(),
            Port::Peer => c.peer_port.clone(),
        }
    }

    /// What a new connection to a peer is made with.
    pub fn dial_peers(&self) -> ClientTlsConfig {
        self.current().dial_peers.clone()
    }

    /// Reads the files again; true if they changed and now serve. A set that
    /// does not load leaves the one in force and is reported.
    pub fn reload(&self) -> Result<bool> {
        let read = read_all(&self.files)?;
        if read == self.current().read {
            return Ok(false);
        }
        let loaded = Loaded::from_bytes(&self.files, read)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(loaded);
        Ok(true)
    }
}

/// Reloads `tls` every `RELOAD_EVERY` and on SIGHUP; `changed` runs after
/// each change (the peers' channels are made anew with it). Runs until the
/// process ends.
pub async fn watch(tls: Arc<Tls>, changed: impl Fn() + Send + 'static) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!("no SIGHUP handler, certificates reload on change only: {e}");
            None
        }
    };
    let mut tick = tokio::time::interval(RELOAD_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let why = tokio::select! {
            _ = tick.tick() => "changed",
            Some(()) = async { hup.as_mut()?.recv().await } => "SIGHUP",
        };
        match tls.reload() {
            Ok(true) => {
                tracing::info!("TLS certificates reloaded ({why})");
                changed();
            }
            Ok(false) if why == "SIGHUP" => tracing::info!("SIGHUP: TLS certificates unchanged"),
            Ok(false) => {}
            Err(e) => tracing::error!("TLS certificates not reloaded, the previous ones stay: {e}"),
        }
    }
}

fn read_all(files: &TlsFiles) -> Result<Vec<Vec<u8>>> {
    let mut paths = vec![&files.cert, &files.key, &files.ca];
    paths.extend(&files.client_ca);
    paths
        .into_iter()
        .map(|p| {
            std::fs::read(p).map_err(|e| Error::InvalidArgument(format!("{}: {e}", p.display())))
        })
        .collect()
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

impl Loaded {
    fn read(files: &TlsFiles) -> Result<Loaded> {
        Loaded::from_bytes(files, read_all(files)?)
    }

    fn from_bytes(files: &TlsFiles, read: Vec<Vec<u8>>) -> Result<Loaded> {
        let bad = |path: &Path, what: String| {
            Error::InvalidArgument(format!("TLS file {}: {what}", path.display()))
        };
        let [cert, key, ca, rest @ ..] = read.as_slice() else {
            return Err(Error::Internal("TLS files read incompletely".into()));
        };
        let chain = certificates(cert).map_err(|e| bad(&files.cert, e))?;
        let key_der = PrivateKeyDer::from_pem_slice(key)
            .map_err(|e| bad(&files.key, format!("no private key: {e}")))?;
        let cluster = roots(ca).map_err(|e| bad(&files.ca, e))?;
        let clients = match (rest.first(), &files.client_ca) {
            (Some(pem), Some(path)) => Some(roots(pem).map_err(|e| bad(path, e))?),
            _ => None,
        };
        // `anonymous`: a client without a certificate gets through the handshake.
        let verifier = |roots: Arc<RootCertStore>, anonymous: bool| {
            let builder = WebPkiClientVerifier::builder_with_provider(roots, provider());
            match anonymous {
                true => builder.allow_unauthenticated(),
                false => builder,
            }
            .build()
            .map_err(|e| bad(&files.ca, format!("cannot verify with it: {e}")))
        };
        let serve = |verify: Option<Arc<dyn ClientCertVerifier>>| -> Result<Arc<ServerConfig>> {
            let builder = ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| Error::Internal(format!("TLS versions: {e}")))?;
            let builder = match verify {
                Some(verifier) => builder.with_client_cert_verifier(verifier),
                None => builder.with_no_client_auth(),
            };
            let mut config = builder
                .with_single_cert(chain.clone(), key_der.clone_key())
                .map_err(|e| bad(&files.key, format!("does not fit the certificate: {e}")))?;
            // gRPC is HTTP/2 only.
            config.alpn_protocols = vec![b"h2".to_vec()];
            Ok(Arc::new(config))
        };
        let dial_peers = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .identity(Identity::from_pem(cert, key));
        let client_port = serve(clients.map(|r| verifier(r, false)).transpose()?)?;
        // axum serves HTTP/1.1 only: a browser offered h2 would speak it anyway.
        let mut http = (*client_port).clone();
        http.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Loaded {
            client_port,
            http: Arc::new(http),
            // The peer port's gate tells such a caller what it admits.
            peer_port: serve(Some(verifier(cluster, true)?))?,
            dial_peers,
            read,
        })
    }
}

fn certificates(pem: &[u8]) -> std::result::Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err("holds no certificate".into());
    }
    Ok(certs)
}

fn roots(pem: &[u8]) -> std::result::Result<Arc<RootCertStore>, String> {
    let mut store = RootCertStore::empty();
    for cert in certificates(pem)? {
        store
            .add(cert)
            .map_err(|e| format!("not a CA certificate: {e}"))?;
    }
    Ok(Arc::new(store))
}
