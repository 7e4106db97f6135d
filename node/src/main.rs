//! `tapledger-node`: the operator's binary.
//!
//! `init` prepares a data directory; `run` serves it over QUIC until SIGTERM
//! or Ctrl-C, then shuts down cleanly.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tapledger_node::config::{DataDir, NodeConfig};
use tapledger_node::init::init_data_dir;
use tapledger_node::server::RunningNode;

#[derive(Parser)]
#[command(
    name = "tapledger-node",
    version,
    about = "Settles tap-to-pay payments over QUIC"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the data directory: ledger file, TLS certificate and admin credential.
    Init {
        /// Data directory (created if missing).
        #[arg(long, env = "TAPLEDGER_DATA", default_value = "tapledger-data")]
        data: PathBuf,
        /// Names for the generated certificate (DNS names or IP addresses).
        #[arg(long = "name", default_values_t = vec!["localhost".to_string(), "127.0.0.1".to_string()])]
        names: Vec<String>,
    },
    /// Serve the data directory over QUIC.
    Run {
        #[arg(long, env = "TAPLEDGER_DATA", default_value = "tapledger-data")]
        data: PathBuf,
        /// Address to listen on.
        #[arg(long, env = "TAPLEDGER_LISTEN", default_value = "127.0.0.1:7443")]
        listen: SocketAddr,
        /// Seconds a lone half waits for its partner.
        #[arg(long, env = "TAPLEDGER_HALF_TTL_SECS", default_value_t = 300.0)]
        half_ttl_secs: f64,
        /// Largest payment in minor units.
        #[arg(long, env = "TAPLEDGER_MAX_AMOUNT", default_value_t = tapledger_actors::MAX_AMOUNT_DEFAULT)]
        max_amount: u64,
        /// Seconds to let requests in flight finish at shutdown.
        #[arg(long, default_value_t = 10)]
        grace_secs: u64,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Init { data, names } => {
            let report = init_data_dir(&DataDir::new(&data), &names)
                .with_context(|| format!("initialising {}", data.display()))?;
            for path in &report.created {
                println!("created  {path}");
            }
            for path in &report.kept {
                println!("kept     {path}");
            }
            println!(
                "certificate fingerprint (SHA-256, pin this in clients): {}",
                report.fingerprint
            );
            Ok(())
        }
        Command::Run {
            data,
            listen,
            half_ttl_secs,
            max_amount,
            grace_secs,
        } => {
            anyhow::ensure!(
                half_ttl_secs.is_finite() && half_ttl_secs > 0.0,
                "--half-ttl-secs must be positive"
            );
            let mut config = NodeConfig::new(&data, listen);
            config.half_ttl = Duration::from_secs_f64(half_ttl_secs);
            config.max_amount = max_amount;
            let node = RunningNode::start(config)
                .await
                .with_context(|| format!("starting node on {}", data.display()))?;
            println!(
                "listening on {} (fingerprint {})",
                node.local_addr, node.fingerprint
            );
            wait_for_signal().await;
            tracing::info!("shutting down");
            node.shutdown(Duration::from_secs(grace_secs)).await;
            tracing::info!("stopped");
            Ok(())
        }
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
