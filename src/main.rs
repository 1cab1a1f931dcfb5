//! The `parasol` binary: command line and exit codes. Everything else lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use parasol::Config;

#[derive(Parser)]
#[command(name = "parasol", version, about = "A caching media proxy for Fediverse instances")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

/// The URL forms `parasol sign` can produce.
#[derive(Clone, Copy, clap::ValueEnum)]
enum Scheme {
    Native,
    Camo,
    Akkoma,
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
        /// A configured variant (e.g. avatar, preview); with `--scheme akkoma`, any variant
        /// selects Akkoma's `/proxy/preview/` form.
        #[arg(long)]
        variant: Option<String>,
        /// URL scheme: native, camo (needs compat.camo_key), akkoma (needs compat.akkoma_secret).
        #[arg(long, value_enum, default_value_t = Scheme::Native)]
        scheme: Scheme,
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Validate the configuration and print it with secrets redacted.
    CheckConfig {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Check every cached blob against its hash and repair the store (run with parasol
    /// stopped): corrupt, short or missing blobs and orphan files are removed.
    Verify {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// A media worker (started by the server; not for operators), or with `--self-check`,
    /// a check from inside a real worker that its sandbox refuses files, sockets and programs.
    #[command(hide = true)]
    MediaWorker {
        /// Start one worker as the server would, try what its sandbox must refuse, print the
        /// findings as JSON and exit 0 only if everything was refused.
        #[arg(long)]
        self_check: bool,
        /// With --self-check: the file the worker tries to open.
        #[arg(long, default_value = "/etc/hostname")]
        open: PathBuf,
        /// With --self-check: the address the worker tries to connect to.
        #[arg(long, default_value = "127.0.0.1:9")]
        connect: std::net::SocketAddr,
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long, default_value_t = 512 << 20)]
        memory: u64,
        #[arg(long, default_value_t = 11)]
        cpu_seconds: u64,
        #[arg(long, default_value_t = 1000)]
        jobs: u32,
        #[arg(long, default_value_t = 100 << 20)]
        max_input: u64,
        /// Become this program (ffmpeg) inside the sandbox, with the arguments after `--`.
        #[arg(long)]
        tool: Option<PathBuf>,
        /// With --tool: the one directory the program may write its result into.
        #[arg(long)]
        scratch: Option<PathBuf>,
        #[arg(last = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// What each origin costs, from a running parasol's admin API (`GET /admin/origins`):
    /// stored, fetched and served bytes, requests, hits, errors, last fetch.
    Usage {
        /// Order by: stored, fetched, served or requests (largest first).
        #[arg(long, default_value = "stored")]
        sort: String,
        /// Print at most this many origins.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print the admin API's JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// The running server's config (its admin listener and token).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Find any stored file, from a running parasol's admin API (`GET /admin/lookup`): every
    /// URL and rendition that yields it and the URLs viewers reach it by, its origin, size,
    /// age, pin and ban state.
    Lookup {
        /// A source URL, a blake3 (of the bytes served or the origin's) or a SHA-256 of the
        /// origin's bytes.
        query: String,
        /// Print the admin API's JSON instead.
        #[arg(long)]
        json: bool,
        /// The running server's config (its admin listener, token and signing keys).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Exit 0 if a running parasol answers its admin listener's `/healthz` (with `--ready`,
    /// `/readyz`), else 1: a container's or a load balancer's health check.
    Health {
        #[arg(long)]
        ready: bool,
        /// The running server's config (its admin listener).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Summarise the outbound audit log: per origin host, requests, bytes, headers sent.
    /// Exits 1 if any request carried a header outside the outbound allowlist.
    Audit {
        /// Log file; default: the configured `audit.path`.
        file: Option<PathBuf>,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
        /// Summarise the moderation log instead (default: `moderation.log`): decisions by
        /// rule and action.
        #[arg(long)]
        moderation: bool,
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A worker starts nothing else (no runtime, no logging setup): it raises its sandbox
    // first thing and then only reads jobs.
    if let Some(Command::MediaWorker {
        self_check: false,
        memory,
        cpu_seconds,
        jobs,
        max_input,
        tool,
        scratch,
        args,
        ..
    }) = cli.command
    {
        let limits = parasol::media::worker::Limits { memory, cpu_seconds, jobs };
        return match tool {
            Some(program) => {
                parasol::media::worker::tool::exec(&limits, &program, scratch.as_deref(), &args)
            }
            None => parasol::media::worker::child::run(limits, max_input),
        };
    }
    // `serve` sets its logging up once its config has said where traces go.
    if !matches!(cli.command, None | Some(Command::Serve { .. })) {
        parasol::telemetry::init_logging(None);
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("parasol: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command.unwrap_or(Command::Serve { config: None }) {
        Command::Serve { config } => serve(config).map(|()| ExitCode::SUCCESS),
        Command::Verify { config } => {
            let config = load(config.as_deref())?;
            let runtime =
                tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
            let report = runtime
                .block_on(parasol::cache::verify::verify(&config.cache.dir))
                .map_err(|e| anyhow::anyhow!("{}: {e}", config.cache.dir.display()))?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            if report.fixed_anything() {
                eprintln!("parasol: repaired the store; removed entries are refetched on demand");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit { file, json, moderation: true, config } => {
            let file = match file {
                Some(f) => f,
                None => load(config.as_deref())?.moderation_log_path(),
            };
            moderation_summary(&file, json)
        }
        Command::Audit { file, json, config, .. } => {
            let file = match file {
                Some(f) => f,
                None => load(config.as_deref())?.audit_path(),
            };
            audit(&file, json)
        }
        Command::Sign { url, variant, scheme, config } => sign(url, variant, scheme, config),
        Command::MediaWorker { open, connect, config, .. } => {
            let config = load(config.as_deref())?;
            let metrics = parasol::telemetry::Metrics::new();
            let exe = parasol::Options::default().worker_exe;
            let pool = parasol::media_pool(&config, exe, &metrics);
            let runtime =
                tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
            let report = runtime
                .block_on(pool.self_check(open, connect))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(if report.is_sandboxed() { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Command::Usage { sort, limit, json, config } => {
            let config = load(config.as_deref())?;
            let answer = admin_get(&config, &format!("/admin/origins?sort={sort}&limit={limit}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&answer)?);
            } else {
                let rows: Vec<parasol::ledger::Row> =
                    serde_json::from_value(answer["origins"].clone())?;
                print!("{}", parasol::admin::client::origins_table(&rows));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Lookup { query, json, config } => {
            let config = load(config.as_deref())?;
            let q: String =
                form_urlencoded::Serializer::new(String::new()).append_pair("q", &query).finish();
            let answer = admin_get(&config, &format!("/admin/lookup?{q}"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&answer)?);
            } else {
                let signer = parasol::signing::Signer::new(parasol::signing_keys(&config)?);
                print!("{}", parasol::admin::client::lookup_text(&config, &signer, &answer));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Health { ready, config } => {
            let config = load(config.as_deref())?;
            let runtime =
                tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
            match runtime.block_on(parasol::admin::client::health(&config, ready)) {
                Ok(()) => Ok(ExitCode::SUCCESS),
                Err(e) => {
                    eprintln!("parasol health: {e}");
                    Ok(ExitCode::from(1))
                }
            }
        }
        Command::CheckConfig { config } => {
            let config = load(config.as_deref())?;
            print!("{}", config.to_redacted_toml());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// GETs `path_and_query` from the admin API of the running server `config` describes.
fn admin_get(config: &Config, path_and_query: &str) -> anyhow::Result<serde_json::Value> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime
        .block_on(parasol::admin::client::get_json(config, path_and_query))
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// `parasol sign`: the URL of `url` (as `variant`) in `scheme`, printed.
fn sign(
    url: String,
    variant: Option<String>,
    scheme: Scheme,
    config: Option<std::path::PathBuf>,
) -> anyhow::Result<ExitCode> {
    let config = load(config.as_deref())?;
    let source = parasol::api::parse_source(&url)
        .map_err(|e| anyhow::anyhow!("{url}: {}", e.public_message()))?;
    let base = &config.server.public_base_url;
    let compat = &config.compat;
    if let Some(v) = variant.as_deref().filter(|v| !config.variants.contains_key(*v)) {
        let known: Vec<&str> = config.variants.keys().map(String::as_str).collect();
        anyhow::bail!("unknown --variant {v:?}: configured are {}", known.join(", "));
    }
    let signed = match scheme {
        Scheme::Native => {
            let signer = parasol::signing::Signer::new(parasol::signing_keys(&config)?);
            parasol::api::native::sign_url(base, &signer, source.as_str(), variant.as_deref())
        }
        Scheme::Camo if !compat.camo_key.is_empty() => {
            parasol::api::camo::sign_url(base.as_str(), compat.camo_key.as_bytes(), source.as_str())
        }
        Scheme::Akkoma if !compat.akkoma_secret.is_empty() => parasol::api::akkoma::sign_url(
            base.as_str(),
            compat.akkoma_secret.as_bytes(),
            &source,
            variant.is_some(),
        ),
        Scheme::Camo => anyhow::bail!("--scheme camo needs compat.camo_key"),
        Scheme::Akkoma => anyhow::bail!("--scheme akkoma needs compat.akkoma_secret"),
    };
    println!("{signed}");
    Ok(ExitCode::SUCCESS)
}

fn load(path: Option<&std::path::Path>) -> anyhow::Result<Config> {
    Ok(Config::load(path)?)
}

fn serve(path: Option<PathBuf>) -> anyhow::Result<()> {
    // Errors until the log is set up are printed by `main`.
    let config = load(path.as_deref())?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let traces = parasol::telemetry::traces::layer(&config.telemetry, runtime.handle());
    let (layer, exporter) = traces.map_err(anyhow::Error::msg)?.unzip();
    parasol::telemetry::init_logging(layer);
    // Every viewer connection and every blob streamed holds a descriptor, as do the blobs of
    // entries sent with sendfile; the usual soft limit of 1024 would run out long before
    // server.max_connections.
    let wanted =
        u64::from(config.server.max_connections) * 2 + 1024 + parasol::cache::HELD_FILES as u64;
    match rlimit::increase_nofile_limit(wanted) {
        Ok(limit) if limit < wanted => tracing::warn!(
            limit,
            wanted,
            "open-file limit is below what server.max_connections needs; raise it or lower max_connections"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    let served = runtime.block_on(async move {
        let shutdown = shutdown_signal()?;
        let hangups = sighup()?;
        let options = parasol::Options { config_path: path, ..Default::default() };
        let bound = parasol::Bound::bind(config, options).await?;
        tracing::info!(public = %bound.public_addr(), admin = %bound.admin_addr(), pictrs = ?bound.pictrs_addr(), "listening");
        reload_on(hangups, bound.reloader());
        bound.serve(shutdown).await;
        Ok(())
    });
    // The last spans go out while the runtime that sends them still runs.
    if let Some(exporter) = exporter {
        exporter.shutdown();
    }
    // Whatever is still running once the grace period is over (a fill waiting on its origin,
    // a job on a stuck worker, whose process is killed as its task is dropped) is cancelled;
    // a blocking file write gets one more second.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    served
}

/// SIGHUP, registered before the listeners open (its default action would end the process).
#[cfg(unix)]
fn sighup() -> anyhow::Result<tokio::signal::unix::Signal> {
    use tokio::signal::unix::{SignalKind, signal};
    signal(SignalKind::hangup()).context("cannot handle SIGHUP")
}

/// Each SIGHUP re-reads the config file and applies its `[policy]` without a restart.
#[cfg(unix)]
fn reload_on(mut hangups: tokio::signal::unix::Signal, reloader: parasol::admin::Reloader) {
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            match reloader.reload().await {
                Ok(purged) => tracing::info!(?purged, "configuration reloaded"),
                Err(e) => tracing::error!(error = %e, "reload failed; keeping the running policy"),
            }
        }
    });
}

#[cfg(not(unix))]
fn sighup() -> anyhow::Result<()> {
    Ok(())
}

#[cfg(not(unix))]
fn reload_on(_: (), _: parasol::admin::Reloader) {}

/// Registers for SIGTERM and SIGINT now (before the listeners open, so an early signal is not
/// lost to the default action) and returns a future that completes on either.
#[cfg(unix)]
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

#[cfg(not(unix))]
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}

/// `parasol audit`: prints the per-host summary and every violation; exit 1 on a violation.
fn audit(file: &std::path::Path, json: bool) -> anyhow::Result<ExitCode> {
    // Rotated files first (oldest, highest number), then the current one, as one stream.
    let mut files: Vec<PathBuf> = (1..=1000)
        .map(|n| PathBuf::from(format!("{}.{n}", file.display())))
        .take_while(|p| p.exists())
        .collect();
    files.reverse();
    files.push(file.to_path_buf());
    let mut text = Vec::new();
    for f in &files {
        let mut bytes =
            std::fs::read(f).with_context(|| format!("cannot open audit log {}", f.display()))?;
        if !bytes.is_empty() && !bytes.ends_with(b"\n") {
            bytes.push(b'\n');
        }
        text.extend_from_slice(&bytes);
    }
    let summary = parasol::audit::summarize(text.as_slice())
        .with_context(|| format!("cannot read audit log {}", file.display()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "{:<40} {:>9} {:>7} {:>14}  {:<24} {:<24} headers",
            "host", "requests", "views", "bytes", "first", "last"
        );
        for (host, s) in &summary.hosts {
            let names: Vec<&str> = s.header_names.iter().map(String::as_str).collect();
            // The share of its fetches a viewer's look caused (the rest: arrivals, prefetches).
            let views = s.by_trigger.get("view").copied().unwrap_or(0);
            let share = format!("{}%", views * 100 / s.requests.max(1));
            println!(
                "{host:<40} {:>9} {share:>7} {:>14}  {:<24} {:<24} {}",
                s.requests,
                s.bytes,
                s.first,
                s.last,
                names.join(",")
            );
        }
        for line in &summary.unreadable_lines {
            println!("line {line}: not an audit record (skipped)");
        }
        for v in &summary.violations {
            println!(
                "VIOLATION line {}: sent {} to {} (outside the outbound allowlist)",
                v.line,
                v.headers.join(", "),
                v.host
            );
        }
    }
    if !summary.unreadable_lines.is_empty() {
        eprintln!(
            "parasol: {} line(s) are not audit records; the log cannot be vouched for",
            summary.unreadable_lines.len()
        );
        return Ok(ExitCode::from(1));
    }
    if summary.violations.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "parasol: {} request(s) carried headers outside the allowlist",
            summary.violations.len()
        );
        Ok(ExitCode::from(1))
    }
}

/// `parasol audit --moderation`: decisions by rule and action; exit 1 on unreadable lines.
fn moderation_summary(file: &std::path::Path, json: bool) -> anyhow::Result<ExitCode> {
    let text = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot open {}", file.display())),
    };
    let summary = parasol::moderation::log::summarize(&text);
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!("{:<12} {:<10} {:>9}", "rule", "action", "decisions");
        for (rule, actions) in &summary.decisions {
            for (action, n) in actions {
                println!("{rule:<12} {action:<10} {n:>9}");
            }
        }
        if let (Some(first), Some(last)) = (&summary.first, &summary.last) {
            println!("from {first} to {last}");
        }
    }
    if summary.unreadable_lines.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("parasol: lines {:?} are not moderation decisions", summary.unreadable_lines);
        Ok(ExitCode::from(1))
    }
}
