//! `roster dev --tls`: a throwaway CA and certificates for a loopback cluster.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, Ia5String, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::config::TlsFiles;
use crate::raft::replication::peer_trust::NODE_URN;

/// Where the files went: what the nodes serve with, and what a client needs.
pub struct DevCerts {
    /// Node `i + 1`'s, naming that node (the peer port admits members only).
    pub nodes: Vec<TlsFiles>,
    pub ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// Writes a CA, a certificate for each of nodes 1 to `nodes` (all on
/// 127.0.0.1) and one for a client into `dir`.
pub fn make(dir: &Path, nodes: u16) -> anyhow::Result<DevCerts> {
    std::fs::create_dir_all(dir)?;
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, "roster dev CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca.self_signed(&ca_key)?;
    let write = |name: &str, pem: String| -> anyhow::Result<PathBuf> {
        let path = dir.join(name);
        std::fs::write(&path, pem)?;
        Ok(path)
    };
    // `node`: the node id the certificate names.
    let issue =
        |name: &str, sans: Vec<String>, node: Option<u16>| -> anyhow::Result<(PathBuf, PathBuf)> {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(sans)?;
            if let Some(id) = node {
                let urn = Ia5String::try_from(format!("{NODE_URN}{id}"))?;
                params.subject_alt_names.push(SanType::URI(urn));
            }
            params.distinguished_name.push(DnType::CommonName, name);
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let cert = params.signed_by(&key, &ca, &ca_key)?;
            Ok((
                write(&format!("{name}.crt"), cert.pem())?,
                write(&format!("{name}.key"), key.serialize_pem())?,
            ))
        };
    let ca_path = write("ca.crt", ca.pem())?;
    let nodes = (1..=nodes)
        .map(|id| {
            let sans = vec!["127.0.0.1".into(), "localhost".into()];
            let (cert, key) = issue(&format!("node-{id}"), sans, Some(id))?;
            Ok(TlsFiles {
                cert,
                key,
                ca: ca_path.clone(),
                client_ca: None,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let (client_cert, client_key) = issue("client", vec!["roster-dev-client".into()], None)?;
    Ok(DevCerts {
        nodes,
        ca: ca_path,
        client_cert,
        client_key,
    })
}
