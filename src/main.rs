//! The `cronguard` binary: parse the command line, set up logging, run.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use cronguard::app::App;
use cronguard::clock::SystemClock;
use cronguard::config::{Config, DEFAULT_LISTEN, LogFormat, Settings};
use cronguard::shutdown::Shutdown;
use cronguard::store::{SqliteOptions, Store};

/// mimalloc instead of glibc's malloc: allocation and free were a quarter
/// of the service's CPU during a burst of fires (`docs/performance.md`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A persistent, supervised job scheduler service.
#[derive(Debug, Parser)]
#[command(name = "cronguard", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the scheduler and its HTTP API.
    Serve(Box<ServeArgs>),
    /// Create or upgrade the database schema, then exit.
    Migrate {
        /// Database URL or path [default: sqlite://./cronguard.db]
        #[arg(long, env = "CRONGUARD_DATABASE", value_name = "URL")]
        database: Option<String>,
    },
    /// Print the OpenAPI 3.1 document of the API (as in `openapi/cronguard.json`).
    Openapi {
        /// Print the control backend protocol instead (`openapi/backend.json`)
        #[arg(long)]
        backend: bool,
    },
    /// Print the tokens-file line for a token read from standard input
    /// (`NAME SCOPE sha256:HEX`), so the secret is stored nowhere.
    HashToken {
        /// The token's name (appears in audit logs).
        name: String,
        /// read, write or admin.
        scope: String,
    },
    /// Probe a running service's /livez; exit 0 when alive (for container
    /// HEALTHCHECK without curl).
    Healthcheck {
        /// URL to probe [default: http://<listen>/livez]
        #[arg(long, value_name = "URL")]
        url: Option<String>,
        /// The service's listen address, to build the default URL
        #[arg(long, env = "CRONGUARD_LISTEN", value_name = "ADDR:PORT")]
        listen: Option<String>,
        /// Give up after this long
        #[arg(long, default_value = "3s", value_name = "DURATION")]
        timeout: humantime::Duration,
    },
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// TOML file with settings (same names as the flags, `_` for `-`);
    /// flags and environment variables take precedence over it
    #[arg(long, env = "CRONGUARD_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: Settings,
}

fn init_logging(filter: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).init(),
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build()
}

fn serve(args: ServeArgs) -> ExitCode {
    let config = match Config::load(args.settings, args.config.as_ref()) {
        Ok(mut config) => {
            // The binary owns its process tree: orphaned descendants of
            // command runs are reparented to it, found and reaped.
            config.process_supervision = true;
            config.command_shim = std::env::current_exe().ok();
            config
        }
        Err(e) => {
            eprintln!("cronguard: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(&config.log, config.log_format);
    if let Err(e) = cronguard::procfs::become_subreaper() {
        tracing::warn!(error = %e, "could not become child subreaper; daemonized grandchildren escape to init");
    }
    let result = runtime().map_err(|e| e.to_string()).and_then(|rt| {
        rt.block_on(async {
            let app = App::build(config, Arc::new(SystemClock))
                .await
                .map_err(|e| e.to_string())?;
            let shutdown = Shutdown::new();
            let signals = tokio::spawn(shutdown.clone().watch_signals());
            let result = app.run(shutdown.clone()).await.map_err(|e| e.to_string());
            shutdown.kill.cancel();
            let _ = signals.await;
            result
        })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "cronguard failed");
            eprintln!("cronguard: {e}");
            ExitCode::FAILURE
        }
    }
}

fn migrate(database: Option<String>) -> ExitCode {
    let url = database.unwrap_or_else(|| cronguard::config::DEFAULT_DATABASE.to_owned());
    let result = runtime().map_err(|e| e.to_string()).and_then(|rt| {
        rt.block_on(Store::migrate_only(&SqliteOptions::new(url.clone())))
            .map_err(|e| e.to_string())
    });
    match result {
        Ok(()) => {
            println!(
                "{}: schema up to date",
                cronguard::secrets::redact_url_credentials(&url)
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cronguard migrate: {e}");
            ExitCode::FAILURE
        }
    }
}

fn healthcheck(url: Option<String>, listen: Option<String>, timeout: Duration) -> ExitCode {
    let url = url.unwrap_or_else(|| {
        let listen = listen.unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        // A wildcard listen address is reachable on loopback.
        let listen = listen.replace("0.0.0.0", "127.0.0.1").replace("[::]", "[::1]");
        format!("http://{listen}/livez")
    });
    let result = runtime().map_err(|e| e.to_string()).and_then(|rt| {
        rt.block_on(async {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let client = reqwest::Client::builder()
                .timeout(timeout)
                .build()
                .map_err(|e| e.to_string())?;
            let response = client.get(&url).send().await.map_err(|e| e.to_string())?;
            let status = response.status();
            let body = response.text().await.unwrap_or_default();
            if status.is_success() {
                Ok(())
            } else {
                Err(format!("{url} answered {status}: {}", body.trim()))
            }
        })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cronguard healthcheck: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    // The command shim starts with every command run: skip argument parsing.
    let mut args = std::env::args_os();
    if args.nth(1).is_some_and(|a| a == cronguard::executor::SHIM_ARG) {
        cronguard::executor::shim::main(args.collect());
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Migrate { database } => migrate(database),
        Command::HashToken { name, scope } => {
            let mut secret = String::new();
            if std::io::stdin().read_line(&mut secret).is_err() || secret.trim().len() < 16 {
                eprintln!("cronguard hash-token: give the secret (at least 16 characters) on standard input");
                return ExitCode::from(2);
            }
            if scope.parse::<cronguard::api::auth::Scope>().is_err() {
                eprintln!("cronguard hash-token: the scope is read, write or admin");
                return ExitCode::from(2);
            }
            println!(
                "{name} {scope} sha256:{}",
                cronguard::api::auth::hash_secret(secret.trim())
            );
            ExitCode::SUCCESS
        }
        Command::Openapi { backend } => {
            if backend {
                print!("{}", cronguard::protocol::backend_document());
            } else {
                print!("{}", cronguard::api::openapi::document());
            }
            ExitCode::SUCCESS
        }
        Command::Healthcheck { url, listen, timeout } => healthcheck(url, listen, timeout.into()),
    }
}
