//! `roster dev --tls`: a throwaway CA and certificates for a loopback cluster.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use crate::config::TlsFiles;

/// Where the files went: what the nodes serve with, and what a client needs.
pub struct DevCerts {
    pub node: TlsFiles,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// Writes a CA, one certificate for every node (all on 127.0.0.1) and one
/// for a client into `dir`.
pub fn make(dir: &Path) -> anyhow::Result<DevCerts> {
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
    let issue = |name: &str, sans: Vec<String>| -> anyhow::Result<(PathBuf, PathBuf)> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(sans)?;
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
    let (cert, key) = issue("node", vec!["127.0.0.1".into(), "localhost".into()])?;
    let (client_cert, client_key) = issue("client", vec!["roster-dev-client".into()])?;
    Ok(DevCerts {
        node: TlsFiles {
            cert,
            key,
            ca: ca_path,
            client_ca: None,
        },
        client_cert,
        client_key,
    })
}
