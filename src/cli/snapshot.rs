//! `roster snapshot`: backups saved from a running cluster, inspected, and
//! restored into the data directories of a new cluster; `roster recover`,
//! which makes a survivor of a lost quorum a cluster of its own.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;

use anyhow::Context;

use crate::config::{parse_initial_cluster, NodeConfig};
use crate::node;
use crate::raft::storage::snapshot_file::SnapshotFile;
use crate::raft::storage::state_machine::SnapshotSummary;

use super::commands::client;
use super::{RecoverArgs, SnapshotCommand};

pub async fn snapshot(c: SnapshotCommand) -> anyhow::Result<()> {
    match c {
        SnapshotCommand::Save { endpoints, file } => {
            let bytes = client(&endpoints)?.save_snapshot().await?;
            // Verified before it replaces anything: a broken stream is no backup.
            let summary = SnapshotSummary::read(&bytes, &file)?;
            SnapshotFile::at(&file).write_bytes(&bytes)?;
            println!("saved {}", file.display());
            print!("{}", describe(&summary, &bytes));
        }
        SnapshotCommand::Inspect { file } => {
            let bytes = read(&file)?;
            let summary = SnapshotSummary::read(&bytes, &file)?;
            print!("{}", describe(&summary, &bytes));
        }
        SnapshotCommand::Restore {
            file,
            data_dir,
            id,
            initial_cluster,
            cluster_id,
        } => {
            let bytes = read(&file)?;
            let summary = SnapshotSummary::read(&bytes, &file)?;
            let members = parse_initial_cluster(&initial_cluster)?;
            let cluster_id =
                cluster_id.unwrap_or_else(|| format!("restored-{}", &sha256(&bytes)[..8]));
            // Only the identity and the directory matter for seeding.
            let any = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
            let mut cfg = NodeConfig::new(id, any, any, data_dir.clone());
            cfg.cluster_id = cluster_id.clone();
            node::restore(&cfg, &summary, members).await?;
            println!(
                "node {id} of cluster {cluster_id:?} seeded in {} at revision {}",
                data_dir.display(),
                summary.revision
            );
            println!(
                "start it with: roster server --id {id} --cluster-id {cluster_id} --data-dir {} \
                 (and its usual --listen, --advertise, --peer-listen, --peer-advertise, TLS and \
                 auth flags)",
                data_dir.display()
            );
        }
    }
    Ok(())
}

pub async fn recover(a: RecoverArgs) -> anyhow::Result<()> {
    let any = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let mut cfg = NodeConfig::new(a.id, any, any, a.data_dir.clone());
    cfg.cluster_id = a.cluster_id;
    let index = node::recover(&cfg, a.peer_address.clone()).await?;
    println!(
        "node {} in {} is now the only voter (at {}), from log index {index}",
        a.id,
        a.data_dir.display(),
        a.peer_address
    );
    println!(
        "start it as before (its --initial-cluster is ignored), then add each other node back \
         from an empty data directory: roster member add --id N --address host:port"
    );
    Ok(())
}

fn read(file: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))
}

fn sha256(bytes: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    d.as_ref().iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// What `inspect` and `save` print: one `name: value` per line.
fn describe(s: &SnapshotSummary, bytes: &[u8]) -> String {
    format!(
        "revision: {}\ninstances: {}\nservices: {}\ntokens: {}\nsessions: {}\nsize: {} bytes\nsha256: {}\nchecksum: ok\n",
        s.revision,
        s.instances,
        s.services,
        s.tokens,
        s.sessions,
        bytes.len(),
        sha256(bytes)
    )
}
