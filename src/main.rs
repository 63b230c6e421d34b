mod cli;

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                // Openraft logs every failed RPC to a down peer; Roster reports
                // peers going down and coming back itself (raft::network), and
                // a stopped Raft core on exit; a membership change refused
                // because leadership just moved is returned to its caller.
                tracing_subscriber::EnvFilter::new(
                    "info,openraft=error,openraft::core::raft_core=off,openraft::replication=off,openraft::raft::impl_raft_blocking_write=off,sled=warn",
                )
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli::run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
