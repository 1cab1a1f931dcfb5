//! The `parasol` binary: command line and exit codes. Everything else lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use parasol::Config;

#[derive(Parser)]
#[command(
    name = "parasol",
    version,
    about = "A caching media proxy for Fediverse instances"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default when no command is given).
    Serve {
        /// Config file; default config/parasol.toml when present, else built-in defaults.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print the signed proxy URL of a source URL.
    Sign {
        /// The remote media URL.
        url: String,
        /// A configured variant (e.g. avatar, preview).
        #[arg(long)]
        variant: Option<String>,
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Validate the configuration and print it with secrets redacted.
    CheckConfig {
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    parasol::telemetry::init_logging();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("parasol: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command.unwrap_or(Command::Serve { config: None }) {
        Command::Serve { config } => serve(load(config.as_deref())?),
        Command::Sign {
            url,
            variant,
            config,
        } => {
            let config = load(config.as_deref())?;
            let source = parasol::api::parse_source(&url)
                .map_err(|e| anyhow::anyhow!("{url}: {}", e.public_message()))?;
            let signer = parasol::signing::Signer::new(parasol::signing_keys(&config)?);
            let base = &config.server.public_base_url;
            println!(
                "{}",
                parasol::api::native::sign_url(base, &signer, source.as_str(), variant.as_deref())
            );
            Ok(())
        }
        Command::CheckConfig { config } => {
            let config = load(config.as_deref())?;
            print!("{}", config.to_redacted_toml());
            Ok(())
        }
    }
}

fn load(path: Option<&std::path::Path>) -> anyhow::Result<Config> {
    Ok(Config::load(path)?)
}

fn serve(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async move { Ok(parasol::run(config, shutdown_signal()).await?) })
}

/// Completes on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
