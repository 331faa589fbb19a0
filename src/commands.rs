//! The command-line commands. `main` parses arguments and calls these; everything a
//! command does lives here so it can be tested.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::config::{self, Config};
use crate::server::{self, App};

/// Exit status for configuration that cannot be used (`EX_USAGE`), before anything binds.
pub const EXIT_CONFIG: u8 = 64;

/// How often the configuration folder is checked for changes.
const RELOAD_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// Options of `hookrelay serve`.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub config: PathBuf,
    pub listen: Option<SocketAddr>,
    pub state: PathBuf,
}

/// Sets up logging to standard error; `RUST_LOG` filters it (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// `hookrelay check`: validates the configuration; every problem as `file:line: message`.
pub fn check(path: &Path) -> ExitCode {
    match config::load(path) {
        Ok(config) => {
            println!("{}", summary(&config));
            ExitCode::SUCCESS
        }
        Err(problems) => {
            for problem in &problems.0 {
                eprintln!("{problem}");
            }
            eprintln!(
                "{} problem{} found",
                problems.0.len(),
                if problems.0.len() == 1 { "" } else { "s" }
            );
            ExitCode::FAILURE
        }
    }
}

/// A short description of a loaded configuration.
fn summary(config: &Config) -> String {
    let files: Vec<String> = config
        .files
        .iter()
        .map(|f| f.display().to_string())
        .collect();
    let upstreams: Vec<String> = config
        .upstreams
        .values()
        .map(|u| format!("{} ({})", u.name, u.url.to_string().trim_end_matches('/')))
        .collect();
    let gateway = match &config.gateway {
        Some(gateway) => format!("enabled, forwarding to {}", gateway.upstream),
        None => "disabled".into(),
    };
    let sources: Vec<String> = config
        .sources
        .values()
        .map(|s| format!("{} ({}, POST /hooks/{})", s.name, s.provider, s.name))
        .collect();
    let or_none = |list: Vec<String>| {
        if list.is_empty() {
            "none".to_owned()
        } else {
            list.join(", ")
        }
    };
    let scheduled = config
        .rules
        .rules()
        .iter()
        .filter(|r| r.spec.schedule.is_some())
        .count();
    format!(
        "configuration OK: {}\n  upstreams: {}\n  gateway: {gateway}\n  sources: {}\n  rules: {} ({scheduled} scheduled)",
        files.join(", "),
        or_none(upstreams),
        or_none(sources),
        config.rules.len(),
    )
}

/// `hookrelay serve`: loads the configuration, binds and serves until SIGTERM or Ctrl-C.
pub async fn serve(options: ServeOptions) -> anyhow::Result<ExitCode> {
    let mut config = match config::load(&options.config) {
        Ok(config) => config,
        Err(problems) => {
            for problem in &problems.0 {
                eprintln!("{problem}");
            }
            eprintln!(
                "hookrelay: not starting: fix the configuration above (`hookrelay check` shows the same)"
            );
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    };
    if let Some(listen) = options.listen {
        config.server.listen = listen;
    }
    std::fs::create_dir_all(&options.state)
        .with_context(|| format!("creating the state folder {}", options.state.display()))?;
    let listen = config.server.listen;
    let gateway = config.gateway.clone();
    let app = App::with_config_path(config, Some(options.config.clone()))
        .context("setting up the upstream clients")?;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    let bound = listener.local_addr().context("reading the bound address")?;
    match gateway {
        Some(gateway) => {
            tracing::info!(address = %bound, gateway_upstream = %gateway.upstream, "hookrelay listening")
        }
        None => tracing::info!(address = %bound, "hookrelay listening (trigger gateway disabled)"),
    }
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let reloader = tokio::spawn(crate::reload::watch(
        app.clone(),
        RELOAD_POLL,
        stopped.clone(),
    ));
    let scheduler = tokio::spawn(crate::scheduler::run(app.clone(), stopped));
    let served = server::run(listener, app, shutdown_signal()).await;
    let _ = stop.send(true);
    let _ = tokio::join!(reloader, scheduler);
    served.context("serving")?;
    Ok(ExitCode::SUCCESS)
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("Ctrl-C received"),
        () = terminate => tracing::info!("SIGTERM received"),
    }
}
