//! `pxemesh-relay`: parse config, bind sockets, run the library.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use pxemesh_relay::config::RelayConfig;
use pxemesh_relay::server::{run, RelayListeners};
use tokio_util::sync::CancellationToken;

// Small, short-lived allocations on the DHCP path, freed on other threads
// (events, lease log): mimalloc handles that pattern far better than glibc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "pxemesh-relay",
    version,
    about = "pxemesh rack relay: DHCP, TFTP and HTTP boot for one rack"
)]
struct Cli {
    /// TOML configuration file.
    #[arg(long, short = 'c', env = "PXEMESH_RELAY_CONFIG")]
    config: PathBuf,
    /// Override static_state (the rack file served in static mode; a
    /// configuration with a [coordinators] section is refused with it).
    #[arg(long)]
    static_state: Option<PathBuf>,
    /// Log filter (RUST_LOG syntax).
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log: String,
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
    let mut config = RelayConfig::from_file(&cli.config)?;
    if let Some(p) = cli.static_state {
        config.static_state = Some(p);
    }
    config.validate()?;

    let mut listeners = RelayListeners::default();
    if config.dhcp.enabled {
        for iface in &config.interfaces {
            let s = pxemesh_relay::dhcp::bind(iface, config.dhcp.port).with_context(|| {
                format!("binding DHCP on {} port {}", iface.name, config.dhcp.port)
            })?;
            listeners.dhcp.push((iface.clone(), s));
        }
    }
    if config.tftp.enabled {
        listeners.tftp = Some(
            pxemesh_relay::net::bind_udp(config.tftp.listen)
                .with_context(|| format!("binding TFTP {}", config.tftp.listen))?,
        );
    }
    if config.http.enabled {
        listeners.http = Some(
            pxemesh_relay::net::bind_tcp(config.http.listen)
                .with_context(|| format!("binding HTTP {}", config.http.listen))?,
        );
    }
    if let Some(m) = config.metrics_listen {
        listeners.metrics =
            Some(std::net::TcpListener::bind(m).with_context(|| format!("binding metrics {m}"))?);
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        let sd = shutdown.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let Ok(mut term) = signal(SignalKind::terminate()) else {
                return;
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("signal received; shutting down");
            sd.cancel();
        });
        run(config, listeners, shutdown).await?;
        Ok(())
    })
}
