//! `pxemesh-coordinator`: parse config, bind sockets, run the library.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use pxemesh_coordinator::config::{Config, PeerConfig};
use pxemesh_coordinator::crypto::ClusterKey;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "pxemesh-coordinator",
    version,
    about = "pxemesh coordinator node (Raft-replicated desired state)"
)]
struct Cli {
    /// TOML configuration file.
    #[arg(long, short = 'c', env = "PXEMESH_COORDINATOR_CONFIG")]
    config: Option<PathBuf>,
    /// Override node_id.
    #[arg(long)]
    node_id: Option<u64>,
    /// Override the gRPC listen address.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Override the metrics listen address.
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Override data_dir.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Replace the initial peers: ID=HOST:PORT, repeatable.
    #[arg(long = "peer", value_parser = parse_peer)]
    peers: Vec<PeerConfig>,
    /// Join a running cluster instead of bootstrapping.
    #[arg(long)]
    join: bool,
    /// Override raft.snapshot_entries.
    #[arg(long)]
    snapshot_entries: Option<u64>,
    /// Override raft.catchup_entries.
    #[arg(long)]
    catchup_entries: Option<u64>,
    /// Log filter (RUST_LOG syntax).
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Write a new random cluster key (0600) for sealing BMC passwords; share it with every coordinator.
    GenClusterKey { path: PathBuf },
}

fn parse_peer(s: &str) -> Result<PeerConfig, String> {
    let (id, address) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected ID=HOST:PORT"))?;
    let id = id
        .parse()
        .map_err(|_| format!("{s:?}: peer id must be a number"))?;
    Ok(PeerConfig {
        id,
        address: address.to_string(),
    })
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| "info".into()),
        )
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    if let Some(Command::GenClusterKey { path }) = &cli.command {
        ClusterKey::generate(path)?;
        println!("wrote cluster key {}", path.display());
        return Ok(());
    }
    let path = cli.config.clone().context("--config is required")?;
    let mut config = Config::from_file(&path)?;
    if let Some(v) = cli.node_id {
        config.node_id = v;
    }
    if let Some(v) = cli.listen {
        config.listen = v;
    }
    if let Some(v) = cli.metrics_listen {
        config.metrics_listen = Some(v);
    }
    if let Some(v) = cli.data_dir.clone() {
        config.data_dir = v;
    }
    if !cli.peers.is_empty() {
        config.peers = cli.peers.clone();
    }
    if cli.join {
        config.join = true;
    }
    if let Some(v) = cli.snapshot_entries {
        config.raft.snapshot_entries = v;
    }
    if let Some(v) = cli.catchup_entries {
        config.raft.catchup_entries = v;
    }
    config.validate()?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let grpc = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding gRPC listener {}", config.listen))?;
        let metrics = match config.metrics_listen {
            Some(a) => Some(
                tokio::net::TcpListener::bind(a)
                    .await
                    .with_context(|| format!("binding metrics listener {a}"))?,
            ),
            None => None,
        };
        let shutdown = CancellationToken::new();
        let sd = shutdown.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = match signal(SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("signal received; shutting down");
            sd.cancel();
        });
        pxemesh_coordinator::run(
            config,
            pxemesh_coordinator::Listeners { grpc, metrics },
            shutdown,
        )
        .await?;
        Ok(())
    })
}
