//! Certificates made at test time (rcgen): a CA per test, and certificates
//! it issues for servers and clients.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

/// A certificate authority made for one test.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A certificate and its key, PEM.
pub struct Issued {
    pub cert: String,
    pub key: String,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("self-signed");
        Ca { cert, key }
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A certificate for servers and clients, valid for `sans`, naming no node.
    pub fn issue(&self, name: &str, sans: &[&str]) -> Issued {
        self.issue_for(name, sans, None)
    }

    /// Node `id`'s certificate (URI SAN `urn:roster:node:<id>`), valid for `sans`.
    pub fn node(&self, id: u64, sans: &[&str]) -> Issued {
        self.issue_for(&format!("node-{id}"), sans, Some(id))
    }

    /// Certificates of nodes 1 to `n`, all on 127.0.0.1.
    pub fn nodes(&self, n: u64) -> Vec<Issued> {
        (1..=n).map(|id| self.node(id, &["127.0.0.1"])).collect()
    }

    fn issue_for(&self, name: &str, sans: &[&str], node: Option<u64>) -> Issued {
        let key = KeyPair::generate().expect("key");
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans).expect("params");
        if let Some(id) = node {
            let urn = format!("urn:roster:node:{id}").try_into().expect("ASCII");
            params.subject_alt_names.push(SanType::URI(urn));
        }
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.cert, &self.key).expect("sign");
        Issued {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// Writes node certificates into `dir`, `nodes[i]` as node `i + 1`'s
/// (`node-<id>.key`, then `node-<id>.crt`, as a tool writing them one by
/// one would).
pub fn write_nodes(dir: &Path, nodes: &[Issued]) {
    for (id, node) in (1..).zip(nodes) {
        std::fs::write(dir.join(format!("node-{id}.key")), &node.key).expect("write pem");
        std::fs::write(dir.join(format!("node-{id}.crt")), &node.cert).expect("write pem");
    }
}

/// Writes the node certificates `nodes` (`write_nodes`) and the CA `ca_pem`
/// into `dir`, and returns the `[tls]` section with which each node serves
/// its own; `client_ca` makes the client port and HTTPS ask for client
/// certificates from that CA.
pub fn tls_section(dir: &Path, nodes: &[Issued], ca_pem: &str, client_ca: bool) -> String {
    write_nodes(dir, nodes);
    let ca = dir.join("ca.crt");
    std::fs::write(&ca, ca_pem).expect("write pem");
    let (dir, ca) = (dir.display(), ca.display());
    let mut s = format!(
        "[tls]\ncert = \"{dir}/node-{{id}}.crt\"\nkey = \"{dir}/node-{{id}}.key\"\nca = \"{ca}\"\n"
    );
    if client_ca {
        s.push_str(&format!("client_ca = \"{ca}\"\n"));
    }
    s
}
