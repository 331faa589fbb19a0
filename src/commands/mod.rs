//! The command-line commands. `main` parses arguments and calls these; everything a
//! command does lives here so it can be tested. Here: logging, `check` and `serve`; the
//! commands on the delivery store are in [`store`].

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::app::App;
use crate::config::{self, Config};
use crate::forwarder::ForwarderOptions;
use crate::outbox::{Durability, Outbox};
use crate::server;
use crate::store::StoreLocation;

pub mod catch_up;
pub mod store;

pub use crate::replan::{Mode as ReplanMode, Replans};
pub use store::{
    ReplanRun, backup, cancel, deliveries, replan, replan_window, replay, replay_failed,
};

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
    /// `--store URL`: a PostgreSQL database instead of `[store]` or the state folder.
    pub store: Option<String>,
    pub dry_run: bool,
    /// `--admin-listen`: the dashboard's address (overrides `[admin] listen`).
    pub admin_listen: Option<SocketAddr>,
}

impl ServeOptions {
    /// The addresses this command line puts over the files'.
    fn listen_flags(&self) -> config::ListenFlags {
        config::ListenFlags {
            listen: self.listen,
            admin_listen: self.admin_listen,
        }
    }
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One readable line per event.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Keeps the log writer's thread alive; dropping it writes out every line still waiting.
pub type LogGuard = crate::log_writer::LogGuard;

/// Sets up logging to standard error; `RUST_LOG` filters it (default `info`). Lines are
/// written by a thread of their own (`log_writer`), so a request never waits for the
/// terminal or the pipe; when standard error takes nothing for a while (about 4 MiB of
/// lines waiting), lines are dropped and counted rather than holding up requests. The
/// thread writes every line it has waiting with one system call, within a few
/// milliseconds, and when standard error is a file, starts sending them to disk as they come
/// (see `log_writer`). Keep the guard until the end of `main`.
pub fn init_logging(format: LogFormat) -> std::io::Result<LogGuard> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let file = crate::log_writer::regular_file(std::os::fd::AsFd::as_fd(&std::io::stderr()));
    let (writer, guard) = crate::log_writer::start(std::io::stderr(), file)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_timer(LogTime)
        .with_writer(writer);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .fmt_fields(crate::terminal::LogFields)
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
    Ok(guard)
}

/// Each line's time as tracing-subscriber's own `SystemTime` writes it (RFC 3339 in UTC,
/// to the microsecond: `2026-12-03T18:55:03.123456Z`), with the date and time of day
/// worked out once a second per thread instead of for every line (two lines or more a
/// request).
struct LogTime;

impl tracing_subscriber::fmt::time::FormatTime for LogTime {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        use std::cell::RefCell;
        use std::fmt::Write;
        thread_local! {
            static SECOND: RefCell<(i64, String)> = const { RefCell::new((i64::MIN, String::new())) };
        }
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let seconds = since_epoch.as_secs() as i64;
        SECOND.with_borrow_mut(|(cached, text)| {
            if *cached != seconds {
                text.clear();
                let time = chrono::DateTime::from_timestamp(seconds, 0).unwrap_or_default();
                write!(text, "{}", time.format("%Y-%m-%dT%H:%M:%S"))?;
                *cached = seconds;
            }
            write!(w, "{text}.{:06}Z", since_epoch.subsec_micros())
        })
    }
}

/// `hookrelay check`: validates the configuration; every problem as `file:line: message`.
pub fn check(path: &Path) -> ExitCode {
    match config::load(path) {
        Ok(config) => {
            for warning in &config.warnings {
                eprintln!(
                    "{}:{}: warning: {}",
                    warning.file.display(),
                    warning.line.unwrap_or(0),
                    warning.message
                );
            }
            let unusable = unusable_proxies(&config);
            if !unusable.is_empty() {
                for problem in &unusable {
                    eprintln!("{problem}");
                }
                eprintln!(
                    "the configuration is valid, but this environment's proxy settings would stop `serve`"
                );
                return ExitCode::FAILURE;
            }
            println!("{}", summary(&config));
            if !config.warnings.is_empty() {
                let n = config.warnings.len();
                eprintln!(
                    "{n} warning{} (the configuration is valid; fix them, or the rules will not do what they look like)",
                    if n == 1 { "" } else { "s" }
                );
            }
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

/// Every address the relay calls (upstreams, and forges for statuses), named as the
/// clients' errors name them.
fn called_addresses(config: &Config) -> Vec<(crate::upstream::Called, String)> {
    use crate::upstream::Called;
    let upstreams = config
        .upstreams
        .values()
        .map(|u| (Called::Upstream(u.name.clone()), u.base_url()));
    let forges = config.sources.values().flat_map(|s| {
        let status = s.status.as_ref().map(|status| &status.api_url);
        let compare = s.compare.as_ref().map(|compare| &compare.api.api_url);
        status
            .into_iter()
            .chain(compare)
            .map(|url| (Called::Forge(s.name.clone()), url.clone()))
    });
    let hooks = config.sources.values().flat_map(|s| {
        s.catch_up.iter().flat_map(|catch_up| {
            catch_up
                .hooks
                .iter()
                .map(|hook| (Called::Forge(s.name.clone()), hook.shown()))
        })
    });
    upstreams.chain(forges).chain(hooks).collect()
}

/// ` via the proxy …` for a summary, or nothing.
fn via_proxy(url: &str) -> String {
    crate::outbound::Proxy::shown_for(url)
        .map(|proxy| format!(" via the proxy {}", proxy.shown))
        .unwrap_or_default()
}

/// Proxies named by the environment that `serve` could not use, one message each.
fn unusable_proxies(config: &Config) -> Vec<String> {
    called_addresses(config)
        .into_iter()
        .filter_map(|(caller, url)| {
            let uri = url.parse().ok()?;
            let reason = crate::outbound::Proxy::for_destination(&uri).err()?;
            Some(format!("{caller} ({url}): {reason}"))
        })
        .collect()
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
        .map(|u| {
            let url = u.base_url();
            format!("{} ({url}{})", u.name, via_proxy(&url))
        })
        .collect();
    let gateway = match &config.gateway {
        Some(gateway) if !gateway.allow_from.is_empty() => format!(
            "enabled, forwarding to {}, only from {}",
            gateway.upstream,
            crate::config::networks::shown(&gateway.allow_from)
        ),
        Some(gateway) => format!("enabled, forwarding to {}", gateway.upstream),
        None => "disabled".into(),
    };
    let sources: Vec<String> = config
        .sources
        .values()
        .map(|s| {
            let mut shown = format!("{} ({}, POST /hooks/{}", s.name, s.provider, s.name);
            if s.secrets.len() > 1 {
                shown.push_str(&format!(", {} secrets (rotating)", s.secrets.len()));
            }
            if !s.allow_from.is_empty() || s.allow_github_hooks {
                shown.push_str(&format!(
                    ", only from {}",
                    crate::config::networks::shown_with_github(&s.allow_from, s.allow_github_hooks)
                ));
            }
            if let Some(status) = &s.status {
                shown.push_str(&format!(
                    ", statuses to {}{} with {}",
                    status.api_url,
                    via_proxy(&status.api_url),
                    status.token_ref
                ));
            }
            if let Some(compare) = &s.compare {
                shown.push_str(&format!(
                    ", changed files asked of {}{} with {} (within {:?})",
                    compare.api.api_url,
                    via_proxy(&compare.api.api_url),
                    compare.api.token_ref,
                    compare.timeout
                ));
            }
            if let Some(upstream) = &s.pipelines_of {
                shown.push_str(&format!(", pipeline events of {upstream}"));
            }
            if let Some(catch_up) = &s.catch_up {
                let hooks: Vec<String> = catch_up
                    .hooks
                    .iter()
                    .map(|hook| {
                        let shown = hook.shown();
                        let proxy = via_proxy(&shown);
                        format!("{shown}{proxy}")
                    })
                    .collect();
                shown.push_str(&format!(
                    ", catch-up from {} every {} with {}",
                    hooks.join(" and "),
                    humantime::format_duration(catch_up.every),
                    catch_up.credential_ref
                ));
            }
            shown.push(')');
            shown
        })
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
    let mut summary = format!(
        "configuration OK: {}\n  upstreams: {}\n  gateway: {gateway}\n  sources: {}\n  rules: {} ({scheduled} scheduled)",
        files.join(", "),
        or_none(upstreams),
        or_none(sources),
        config.rules.len(),
    );
    if !config.server.trusted_proxies.is_empty() {
        summary.push_str(&format!(
            "\n  trusted proxies: {}",
            crate::config::networks::shown(&config.server.trusted_proxies)
        ));
    }
    summary
}

/// The configuration `serve` runs, with the command line's overrides, and what of it
/// only a restart changes (as the files say it); the exit status after saying what is
/// wrong with it.
fn configured(
    options: &ServeOptions,
) -> Result<(config::Config, crate::app::RestartOnly), ExitCode> {
    let flags = options.listen_flags();
    let mut config = match config::load_serving(
        &options.config,
        &|name| std::env::var(name).ok(),
        flags,
    ) {
        Ok(config) => config,
        Err(problems) => {
            for problem in &problems.0 {
                eprintln!("{problem}");
            }
            eprintln!(
                "hookrelay: not starting: fix the configuration above (`hookrelay check` shows the same)"
            );
            return Err(ExitCode::from(EXIT_CONFIG));
        }
    };
    // As the files say them, before the command line's overrides: what a reload compares.
    let restart_only = crate::app::RestartOnly::of(&config);
    if let Some(listen) = options.listen {
        config.server.listen = listen;
    }
    if let Some(listen) = options.admin_listen {
        let admin = config
            .admin
            .get_or_insert(crate::config::admin::AdminConfig {
                listen,
                token: None,
                tls: None,
                allow_from: Vec::new(),
            });
        admin.listen = listen;
        if admin.token.is_none() && !listen.ip().is_loopback() {
            eprintln!(
                "hookrelay: not starting: --admin-listen {listen} is not a loopback address, so the dashboard needs [admin] token = \"env:HOOKRELAY_ADMIN_TOKEN\""
            );
            return Err(ExitCode::from(EXIT_CONFIG));
        }
        if let Some(warning) = admin.in_the_clear() {
            eprintln!("hookrelay: warning: --admin-listen {warning}");
        }
    }
    Ok((config, restart_only))
}

/// The dashboard's certificate, when it serves HTTPS.
type AdminCertificate = std::sync::Arc<crate::tls::ServerCertificate>;

/// The dashboard's listener and certificate, when `[admin]` asks for one: bound before
/// the relay says it is listening, so a taken address stops the start.
async fn bind_dashboard(
    app: &App,
) -> anyhow::Result<Option<(TcpListener, Option<AdminCertificate>)>> {
    Ok(match app.runtime().config.admin.clone() {
        None => None,
        Some(mut admin) => {
            let listener = TcpListener::bind(admin.listen)
                .await
                .with_context(|| format!("listening on {} ([admin] listen)", admin.listen))?;
            admin.listen = listener
                .local_addr()
                .context("reading the dashboard's address")?;
            let certificate = match &admin.tls {
                Some(files) => {
                    let certificate = crate::tls::ServerCertificate::new(
                        crate::tls::read_server_certificate(&files.cert, &files.key)
                            .map_err(|err| anyhow::anyhow!("[admin] tls_cert: {err}"))?,
                    );
                    let _ = app.admin_tls.set(certificate.clone());
                    Some(certificate)
                }
                None => None,
            };
            tracing::info!(address = %admin.listen, https = certificate.is_some(), token = admin.token.is_some(), "dashboard listening");
            let _ = app.admin.set(admin);
            Some((listener, certificate))
        }
    })
}

/// `hookrelay serve`: loads the configuration, binds and serves until SIGTERM or Ctrl-C.
pub async fn serve(options: ServeOptions) -> anyhow::Result<ExitCode> {
    let (config, restart_only) = match configured(&options) {
        Ok(configured) => configured,
        Err(code) => return Ok(code),
    };
    // Signal handlers first: a SIGTERM from here on shuts down cleanly.
    let shutdown = shutdown_signal();
    raise_open_file_limit();
    let holder = format!(
        "pid {}, started {}, configured to listen on {}",
        std::process::id(),
        chrono::Utc::now().format("%Y-%m-%d %H:%M:%S UTC"),
        config.server.listen
    );
    let store = match StoreLocation::choose(
        &options.state,
        options.store.as_deref(),
        config.store.clone(),
    ) {
        Ok(store) => store,
        Err(message) => {
            eprintln!("hookrelay: not starting: {message}");
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    };
    let outbox = match Outbox::open_at(&store, Durability::Full, &holder) {
        Ok(outbox) => outbox,
        Err(err) if err.refused => {
            eprintln!("hookrelay: not starting: {err}");
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
        Err(err) => return Err(err).context("opening the delivery store"),
    };
    for warning in &config.warnings {
        tracing::warn!(%warning, "configuration warning: this will not do what it looks like");
    }
    let listen = config.server.listen;
    let summary = StartSummary::of(&config, &options.config);
    for (caller, url) in called_addresses(&config) {
        if let Some(proxy) = crate::outbound::Proxy::shown_for(&url) {
            tracing::info!(%caller, %url, proxy = %proxy.shown, "calls go through the proxy the environment names (HTTPS_PROXY, HTTP_PROXY or ALL_PROXY; NO_PROXY for exceptions)");
        }
    }
    let forwarding = ForwarderOptions {
        workers: config.delivery.workers,
        policy: config.delivery.retry.clone(),
        dry_run: options.dry_run,
        retention: config.delivery.retention,
        drain: config.server.shutdown_timeout,
        ..ForwarderOptions::default()
    };
    let app = App::with_options(
        config,
        outbox.clone(),
        Some(options.config.clone()),
        options.dry_run,
    )
    .context("setting up the relay (upstream clients, the listener's certificate)")?;
    let _ = app.restart_only.set(restart_only);
    let _ = app.listen_flags.set(options.listen_flags());
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    let bound = listener.local_addr().context("reading the bound address")?;
    let admin = bind_dashboard(&app).await?;
    let waiting = outbox
        .depth()
        .map(|(depth, _)| depth.to_string())
        .unwrap_or_else(|_| "unknown".into());
    let watcher = crate::reload::Watcher::prepare(&app);
    tracing::info!(
        address = %bound,
        https = app.tls.is_some(),
        config = %summary.config,
        files = summary.files,
        sources = %summary.sources,
        rules = summary.rules,
        upstreams = %summary.upstreams,
        gateway = %summary.gateway,
        store = %store.describe(),
        waiting = %waiting,
        event_loops = crate::event_loops::count(app.server.event_loops, outbox.shared),
        dry_run = options.dry_run,
        "hookrelay listening"
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let reloader = tokio::spawn({
        let (app, stopped) = (app.clone(), stopped.clone());
        async move {
            if let Some(watcher) = watcher {
                crate::reload::watch(watcher, app, RELOAD_POLL, stopped).await;
            }
        }
    });
    // A thread of its own, never joined: a disk that stops answering holds it, not the
    // runtime or the exit.
    if let StoreLocation::Folder(folder) = &store {
        let (app, stopped, folder) = (app.clone(), stopped.clone(), folder.clone());
        std::thread::Builder::new()
            .name("hookrelay-disk-reserve".into())
            .spawn(move || {
                let reserve = || app.runtime().config.delivery.min_free_disk;
                let seen = |look: crate::disk_reserve::Look| {
                    app.metrics.store_disk(look.space.free, look.reserve);
                    app.outbox.health.set_disk_low(look.refusal);
                };
                crate::disk_reserve::watch(folder, reserve, seen, stopped);
            })
            .context("starting the disk reserve's watcher")?;
    }
    let github_hooks = tokio::spawn({
        let (app, stopped) = (app.clone(), stopped.clone());
        // A shared store keeps it for every relay; SQLite's state folder for this one.
        let kept = match app.outbox.shared_state.clone() {
            Some(shared) => crate::github_meta::KeptIn::Store(shared),
            None => crate::github_meta::KeptIn::Folder(options.state.clone()),
        };
        async move {
            let needed = || app.needs_github_hooks();
            let reloads = app.reloads();
            crate::github_meta::run(&app.github_hooks, needed, kept, reloads, stopped).await;
        }
    });
    let scheduler = tokio::spawn(crate::scheduler::run(app.clone(), stopped.clone()));
    let catch_up = tokio::spawn(crate::catch_up_passes::run(app.clone(), stopped.clone()));
    let forwarder = tokio::spawn(crate::forwarder::run(
        app.clone(),
        outbox.clone(),
        forwarding,
        stopped,
    ));
    // Stop taking requests first, then stop sending: what is in flight finishes or goes
    // back to the outbox, and everything is committed before the process exits.
    let (admin_stop, admin_stopped) = tokio::sync::watch::channel(false);
    let dashboard = admin.map(|(listener, certificate)| {
        let mut stopped = admin_stopped;
        tokio::spawn(server::serve(
            listener,
            app.clone(),
            async move {
                let _ = stopped.changed().await;
            },
            server::Site::Admin(certificate),
        ))
    });
    let served = server::run(listener, app, shutdown).await;
    let _ = admin_stop.send(true);
    if let Some(dashboard) = dashboard {
        let _ = dashboard.await;
    }
    let _ = stop.send(true);
    let _ = tokio::join!(reloader, scheduler, catch_up, github_hooks, forwarder);
    outbox.flush().await;
    served.context("serving")?;
    Ok(ExitCode::SUCCESS)
}

/// What the start-up line says about the configuration.
struct StartSummary {
    config: String,
    files: usize,
    sources: String,
    rules: usize,
    upstreams: String,
    gateway: String,
}

impl StartSummary {
    fn of(config: &Config, path: &Path) -> StartSummary {
        let names = |names: Vec<&String>| {
            if names.is_empty() {
                "none".to_owned()
            } else {
                names
                    .iter()
                    .map(|n| n.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            }
        };
        StartSummary {
            config: path.display().to_string(),
            files: config.files.len(),
            sources: names(config.sources.keys().collect()),
            rules: config.rules.len(),
            upstreams: names(config.upstreams.keys().collect()),
            gateway: match &config.gateway {
                Some(gateway) => format!("to {}", gateway.upstream),
                None => "disabled".into(),
            },
        }
    }
}

/// Raises the soft open-file limit to the hard one, and says what it is: every connection,
/// the store and each upstream call takes a descriptor.
fn raise_open_file_limit() {
    let before = rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(soft, _)| soft);
    match (before, rlimit::increase_nofile_limit(u64::MAX)) {
        (Ok(before), Ok(now)) => {
            let connections = crate::connections::default_max_connections(now);
            // Said only when it was raised.
            let before = (before != now).then_some(before);
            if now < 4096 {
                tracing::warn!(
                    open_file_limit = now,
                    raised_from = before,
                    default_max_connections = connections,
                    "the open-file limit is low; raise the hard limit (ulimit -Hn, LimitNOFILE=) for more connections"
                );
            } else {
                tracing::info!(
                    open_file_limit = now,
                    raised_from = before,
                    default_max_connections = connections,
                    "open-file limit"
                );
            }
        }
        (_, Err(err)) | (Err(err), _) => {
            tracing::warn!(error = %err, "the open-file limit could not be read or raised")
        }
    }
}

/// Completes on Ctrl-C or SIGTERM. The handlers are installed when this is called, not
/// when the future is first polled, so a signal that arrives as soon as the relay says it
/// listens is never taken with the default action (an exit without a clean shutdown).
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let mut terminate =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    #[cfg(unix)]
    let mut interrupt =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok();
    async move {
        #[cfg(unix)]
        {
            let terminated = async {
                match &mut terminate {
                    Some(signal) => {
                        signal.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let interrupted = async {
                match &mut interrupt {
                    Some(signal) => {
                        signal.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = interrupted => tracing::info!("Ctrl-C received"),
                () = terminated => tracing::info!("SIGTERM received"),
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("Ctrl-C received");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::fmt::format::Writer;
    use tracing_subscriber::fmt::time::{FormatTime, SystemTime};

    /// Log lines keep the time tracing-subscriber writes: the same text, to the second,
    /// as its own timer read just before (unless a second began between the two).
    #[test]
    fn log_times_read_as_tracing_subscribers_own() {
        for _ in 0..3 {
            let (mut theirs, mut ours) = (String::new(), String::new());
            SystemTime
                .format_time(&mut Writer::new(&mut theirs))
                .unwrap();
            LogTime.format_time(&mut Writer::new(&mut ours)).unwrap();
            assert_eq!(ours.len(), theirs.len(), "{ours} vs {theirs}");
            assert!(ours.ends_with('Z') && ours.as_bytes()[19] == b'.', "{ours}");
            if ours[..19] == theirs[..19] {
                assert!(ours[20..26] >= theirs[20..26], "{ours} vs {theirs}");
                return;
            }
        }
        panic!("a second began between the two readings three times in a row");
    }
}
