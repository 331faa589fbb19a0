//! The command-line commands. `main` parses arguments and calls these; everything a
//! command does lives here so it can be tested.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::app::App;
use crate::config::{self, Config};
use crate::outbox::forwarder::ForwarderOptions;
use crate::outbox::{Durability, ListFilter, Outbox, ReplayTarget};
use crate::server;
use crate::store::StoreLocation;

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
/// terminal or the pipe; when that thread falls behind, callers wait rather than lose
/// lines. The thread writes every line it has waiting with one system call, within a few
/// milliseconds. Keep the guard until the end of `main`.
pub fn init_logging(format: LogFormat) -> std::io::Result<LogGuard> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (writer, guard) = crate::log_writer::start(std::io::stderr())?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_timer(LogTime)
        .with_writer(writer);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .fmt_fields(escaped_fields())
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

/// Text log fields as the default formatter writes them (`name=value`, the message
/// first), with control characters that came from payloads shown as escapes: a log line
/// must never drive the terminal that shows it.
fn escaped_fields() -> impl for<'w> tracing_subscriber::fmt::FormatFields<'w> {
    use std::fmt::Write;
    use tracing_subscriber::field::MakeExt;
    tracing_subscriber::fmt::format::debug_fn(|writer, field, value| {
        let mut out = crate::terminal::Escaping(writer);
        match field.name() {
            "message" => write!(out, "{value:?}"),
            name => write!(out, "{name}={value:?}"),
        }
    })
    .delimited(" ")
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

/// Every address the relay calls (upstreams, and forges for statuses), by what calls it.
fn called_addresses(config: &Config) -> Vec<(String, String)> {
    let upstreams = config.upstreams.values().map(|u| {
        (
            format!("upstream {:?}", u.name),
            u.url.to_string().trim_end_matches('/').to_owned(),
        )
    });
    let forges = config.sources.values().filter_map(|s| {
        let status = s.status.as_ref()?;
        Some((format!("statuses of {:?}", s.name), status.api_url.clone()))
    });
    upstreams.chain(forges).collect()
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
            let url = u.url.to_string().trim_end_matches('/').to_owned();
            format!("{} ({url}{})", u.name, via_proxy(&url))
        })
        .collect();
    let gateway = match &config.gateway {
        Some(gateway) => format!("enabled, forwarding to {}", gateway.upstream),
        None => "disabled".into(),
    };
    let sources: Vec<String> = config
        .sources
        .values()
        .map(|s| {
            let mut shown = format!("{} ({}, POST /hooks/{}", s.name, s.provider, s.name);
            if let Some(status) = &s.status {
                shown.push_str(&format!(
                    ", statuses to {}{} with {}",
                    status.api_url,
                    via_proxy(&status.api_url),
                    status.token_ref
                ));
            }
            if let Some(upstream) = &s.pipelines_of {
                shown.push_str(&format!(", pipeline events of {upstream}"));
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
            });
        admin.listen = listen;
        if admin.token.is_none() && !listen.ip().is_loopback() {
            eprintln!(
                "hookrelay: not starting: --admin-listen {listen} is not a loopback address, so the dashboard needs [admin] token = \"env:HOOKRELAY_ADMIN_TOKEN\""
            );
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    }
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
    };
    let app = App::with_options(
        config,
        outbox.clone(),
        Some(options.config.clone()),
        options.dry_run,
    )
    .context("setting up the relay (upstream clients, the listener's certificate)")?;
    let _ = app.restart_only.set(restart_only);
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    let bound = listener.local_addr().context("reading the bound address")?;
    let admin = match app.runtime().config.admin.clone() {
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
    };
    let waiting = outbox
        .depth()
        .map(|(depth, _)| depth.to_string())
        .unwrap_or_else(|_| "unknown".into());
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
    let reloader = tokio::spawn(crate::reload::watch(
        app.clone(),
        RELOAD_POLL,
        stopped.clone(),
    ));
    let scheduler = tokio::spawn(crate::scheduler::run(app.clone(), stopped.clone()));
    let forwarder = tokio::spawn(crate::outbox::forwarder::run(
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
    let _ = tokio::join!(reloader, scheduler, forwarder);
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

/// `hookrelay deliveries`: the newest deliveries and their triggers, from the store.
pub fn deliveries(store: &StoreLocation, filter: &ListFilter, json: bool) -> ExitCode {
    let rows = match crate::outbox::list(store, filter) {
        Ok(rows) => rows,
        Err(err) => {
            eprintln!("hookrelay deliveries: {err}");
            return ExitCode::FAILURE;
        }
    };
    let now = crate::outbox::now_ms();
    if json {
        let rows: Vec<serde_json::Value> = rows
            .iter()
            .map(|row| {
                let mut value = serde_json::to_value(row).expect("rows serialize");
                // The webhook's answer as an object, not JSON text inside JSON.
                if let Ok(summary) = serde_json::from_str::<serde_json::Value>(&row.summary) {
                    value["summary"] = summary;
                }
                value["received"] = chrono::DateTime::from_timestamp_millis(row.received_at)
                    .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                    .into();
                let (state, why) = row_state(row);
                value["shown_state"] = state.into();
                value["why"] = why.into();
                value["next_attempt"] = next_attempt(row, now).into();
                value
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).expect("rows serialize")
        );
        return ExitCode::SUCCESS;
    }
    if rows.is_empty() {
        println!("no deliveries match");
        return ExitCode::SUCCESS;
    }
    print!("{}", table(&rows, now));
    ExitCode::SUCCESS
}

/// The rows as `deliveries` prints them: a column each, as wide as its widest cell.
fn table(rows: &[crate::outbox::DeliveryRow], now: i64) -> String {
    let cut = |text: &str, width: usize| {
        if text.chars().count() > width {
            format!("{}…", text.chars().take(width - 1).collect::<String>())
        } else {
            text.to_owned()
        }
    };
    let header = [
        "TIME (UTC)",
        "SOURCE",
        "DELIVERY",
        "ID",
        "RULE",
        "PROJECT",
        "REF",
        "STATUS",
        "TRY",
        "NEXT",
        "LAST ANSWER / WHY",
    ];
    let lines: Vec<[String; 11]> = rows
        .iter()
        .map(|row| {
            let time = chrono::DateTime::from_timestamp_millis(row.received_at)
                .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                .unwrap_or_default();
            let (state, why) = row_state(row);
            [
                time,
                cut(&row.source, 20),
                row.delivery_id.clone(),
                row.trigger_id.map(|id| id.to_string()).unwrap_or_default(),
                cut(row.rule.as_deref().unwrap_or(""), 24),
                cut(row.project.as_deref().unwrap_or(""), 32),
                cut(row.git_ref.as_deref().unwrap_or(""), 24),
                state,
                // A delivery that queued nothing tried nothing, and a gateway call is
                // its caller's one try, answered as it was made.
                match row.trigger_id {
                    Some(_) if row.source != "gateway" => row.attempts.to_string(),
                    _ => String::new(),
                },
                next_attempt(row, now).unwrap_or_default(),
                why,
            ]
            // Delivery ids and GitLab's messages are shown, never obeyed by the terminal.
            .map(|cell| crate::terminal::escape_controls(&cell).into_owned())
        })
        .collect();
    // Each column as wide as its widest cell (the last one runs on).
    let mut widths = header.map(|title| title.chars().count());
    for line in &lines {
        for (width, cell) in widths.iter_mut().zip(line) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let format_line = |cells: [&str; 11]| {
        let mut line = String::new();
        for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
            let pad = width.saturating_sub(cell.chars().count());
            match i {
                10 => line.push_str(cell),
                // Numbers to the right.
                3 | 8 => line.push_str(&format!("{}{cell} ", " ".repeat(pad))),
                _ => line.push_str(&format!("{cell}{} ", " ".repeat(pad))),
            }
        }
        line.trim_end().to_owned()
    };
    let mut text = format_line(header) + "\n";
    for cells in &lines {
        text.push_str(&format_line(cells.each_ref().map(String::as_str)));
        text.push('\n');
    }
    text
}

/// A row's state as shown, and its last answer or why nothing ran. A delivery without a
/// trigger says which of the reasons it was, from the answer it got.
pub(crate) fn row_state(row: &crate::outbox::DeliveryRow) -> (String, String) {
    let Some(state) = row.state.as_deref() else {
        let summary: serde_json::Value = serde_json::from_str(&row.summary).unwrap_or_default();
        let note = summary["note"].as_str().unwrap_or_default().to_owned();
        let first_error = summary["errors"][0]["error"].as_str();
        let no_events = summary["events"].as_array().is_none_or(Vec::is_empty);
        let turned_away = &summary["turned_away"];
        return if let Some(kind) = turned_away["as"].as_str() {
            let mut reason = turned_away["reason"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            match turned_away["not_recorded_before"].as_u64() {
                Some(held) if held > 0 => {
                    reason.push_str(&format!(" ({held} more since the previous record)"))
                }
                _ => {}
            }
            (kind.to_owned(), reason)
        } else if let Some(error) = first_error {
            ("error".into(), error.to_owned())
        } else if summary.get("pipeline").is_some() {
            ("pipeline".into(), note)
        } else if summary.get("admin").is_some() {
            ("admin".into(), note)
        } else if row.event_type == "ping" || note.starts_with("ping") {
            ("ping".into(), note)
        } else if no_events {
            ("not handled".into(), note)
        } else {
            let why = summary["events"]
                .as_array()
                .into_iter()
                .flatten()
                .find_map(|event| {
                    let first = &event["rules"][0];
                    Some(format!(
                        "{}: {}",
                        first["rule"].as_str()?,
                        first["reason"].as_str()?
                    ))
                })
                .unwrap_or(note);
            ("no match".into(), why)
        };
    };
    // Status posts and polls say so; a trigger's state stands alone.
    let kind = match row.kind.as_deref() {
        Some(kind @ ("status" | "poll")) => format!("{kind} "),
        _ => String::new(),
    };
    let state = match (state, row.replay_of, row.coalesced_into) {
        ("queued", _, _) if row.attempts > 0 => format!("{kind}retrying"),
        (state, None, None) => format!("{kind}{state}"),
        (state, _, Some(into)) => format!("{state} into {into}"),
        (state, Some(of), None) => format!("{kind}{state} (replay of {of})"),
    };
    let answer = match (&row.pipeline_url, &row.last_error) {
        (Some(url), _) if row.state.as_deref() == Some("sent") => url.clone(),
        (_, Some(error)) => match row.last_status {
            Some(status) if !error.starts_with(&status.to_string()) => format!("{status}: {error}"),
            _ => error.clone(),
        },
        (Some(url), None) => url.clone(),
        (None, None) => match row.waits_for {
            Some(head) => format!(
                "waits for {head}: {}",
                match row.kind.as_deref() {
                    Some("status") => "one status post at a time per commit and context, in order",
                    Some("poll") => "one poll at a time per pipeline",
                    _ => "one trigger at a time per project and ref, in order",
                }
            ),
            None => String::new(),
        },
    };
    (state, answer)
}

/// When a waiting trigger is tried next: `now`, how long until then, or after which
/// trigger (the one ahead of it for the same upstream, project and ref).
pub(crate) fn next_attempt(row: &crate::outbox::DeliveryRow, now: i64) -> Option<String> {
    if row.state.as_deref() != Some("queued") {
        return None;
    }
    if let Some(head) = row.waits_for {
        return Some(format!("after {head}"));
    }
    let wait = row.due_at? - now;
    Some(if wait <= 0 {
        "now".into()
    } else {
        let seconds = (wait + 999) / 1000;
        match seconds {
            s if s < 120 => format!("in {s}s"),
            s if s < 7200 => format!("in {}m", s / 60),
            s => format!("in {}h", s / 3600),
        }
    })
}

/// `hookrelay replay --replan`: a stored webhook through the current rules.
pub fn replan(config: &Path, state: &Path, store: Option<&str>, delivery: &str) -> ExitCode {
    let delivery = delivery.strip_prefix("delivery:").unwrap_or(delivery);
    match crate::replan::replan(config, state, store, delivery) {
        Ok(replanned) => {
            println!(
                "delivery {} run through the current rules as delivery {}:",
                replanned.original, replanned.delivery_id
            );
            for (id, rule, project, git_ref) in &replanned.triggers {
                println!("  trigger {id}: rule {rule} -> project {project}, ref {git_ref}");
            }
            println!("a running relay sends them within a second");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!(
                "hookrelay replay --replan: {}",
                crate::terminal::escape_controls(&message)
            );
            ExitCode::FAILURE
        }
    }
}

/// `hookrelay backup`: a copy of the SQLite store, taken beside the running relay.
pub fn backup(store: &StoreLocation, to: &Path) -> ExitCode {
    let StoreLocation::Folder(state) = store else {
        eprintln!(
            "hookrelay backup: the store is a PostgreSQL database ({}); back it up with pg_dump or the database's own backups",
            store.describe()
        );
        return ExitCode::from(2);
    };
    match crate::store::sqlite::backup(state, to) {
        Ok(bytes) => {
            println!(
                "{} copied to {} ({:.1} MiB); to restore it, stop the relay and put it in an empty --state folder as {}",
                store.describe(),
                to.display(),
                bytes as f64 / (1024.0 * 1024.0),
                crate::store::sqlite::STORE_FILE
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("hookrelay backup: {err}");
            ExitCode::FAILURE
        }
    }
}

/// `hookrelay cancel`: stops a waiting or retrying trigger, or every one of a project.
pub fn cancel(store: &StoreLocation, target: &crate::outbox::CancelTarget) -> ExitCode {
    match crate::outbox::cancel_offline(store, target) {
        Ok(ids) if ids.is_empty() => {
            println!("{target}: no trigger is waiting; nothing to cancel");
            ExitCode::SUCCESS
        }
        Ok(ids) => {
            // A project's backlog may be thousands: the first few ids name it well enough.
            const SHOWN: usize = 20;
            let mut list: Vec<String> = ids.iter().take(SHOWN).map(ToString::to_string).collect();
            if ids.len() > SHOWN {
                list.push(format!("… ({} more)", ids.len() - SHOWN));
            }
            let what = match target {
                crate::outbox::CancelTarget::Trigger(_) => format!("cancelled {target}"),
                _ => format!(
                    "cancelled {} of {target}: {}",
                    match ids.len() {
                        1 => "1 trigger".to_owned(),
                        n => format!("{n} triggers"),
                    },
                    list.join(", ")
                ),
            };
            println!("{what}; `hookrelay deliveries --status cancelled` lists them");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("hookrelay cancel: {err}");
            ExitCode::FAILURE
        }
    }
}

/// A time for `--since`/`--until`: a duration back from now (`2h`, `30m`), or a UTC time
/// (`2026-12-02T10:00:00Z`, `2026-12-02 10:00`, `2026-12-02`).
pub fn parse_time(text: &str, now: i64) -> Result<i64, String> {
    if let Ok(ago) = crate::config::parse_duration(text) {
        return Ok(now - ago.as_millis() as i64);
    }
    if let Ok(time) = chrono::DateTime::parse_from_rfc3339(text) {
        return Ok(time.timestamp_millis());
    }
    for format in ["%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M"] {
        if let Ok(time) = chrono::NaiveDateTime::parse_from_str(text, format) {
            return Ok(time.and_utc().timestamp_millis());
        }
    }
    if let Ok(date) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(date
            .and_hms_opt(0, 0, 0)
            .expect("midnight exists")
            .and_utc()
            .timestamp_millis());
    }
    Err(format!(
        "{text:?} is neither a duration back from now (2h, 30m) nor a UTC time (2026-12-02T10:00:00Z, 2026-12-02 10:00, 2026-12-02)"
    ))
}

/// `hookrelay replay ID`: queues a trigger, or every trigger of a delivery, again.
pub fn replay(store: &StoreLocation, target: &str) -> ExitCode {
    let target = ReplayTarget::parse(target);
    match crate::outbox::replay_offline(store, &target) {
        Ok(ids) => {
            let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
            println!(
                "{target} queued again as trigger {}; a running relay sends it within a second",
                ids.join(", ")
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("hookrelay replay: {err}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::fmt::format::Writer;
    use tracing_subscriber::fmt::time::{FormatTime, SystemTime};

    fn row(trigger: i64, state: &str) -> crate::outbox::DeliveryRow {
        crate::outbox::DeliveryRow {
            row: trigger,
            received_at: 1_796_354_760_000,
            source: "github".into(),
            delivery_id: format!("d-{trigger}"),
            event_type: "push".into(),
            trigger_id: Some(trigger),
            rule: Some("tags".into()),
            project: Some("acme/app".into()),
            git_ref: Some("main".into()),
            state: Some(state.into()),
            attempts: 0,
            last_status: None,
            last_error: None,
            pipeline_url: None,
            replay_of: None,
            coalesced_into: None,
            due_at: Some(1_796_354_760_000),
            waits_for: None,
            summary: "{}".into(),
            kind: Some("trigger".into()),
        }
    }

    /// A trigger waiting behind its key's head says which one, where it would otherwise
    /// read "due now" with nothing to say why; a long status keeps the columns in line.
    #[test]
    fn the_table_says_what_a_waiting_trigger_waits_for_and_keeps_its_columns() {
        let now = 1_796_354_770_000;
        let head = crate::outbox::DeliveryRow {
            attempts: 3,
            last_status: Some(503),
            last_error: Some("upstream says 503".into()),
            due_at: Some(now + 12_500),
            ..row(8, "queued")
        };
        let behind = crate::outbox::DeliveryRow {
            waits_for: Some(8),
            ..row(9, "queued")
        };
        let replayed = crate::outbox::DeliveryRow {
            replay_of: Some(1),
            attempts: 1,
            ..row(10, "sent")
        };
        assert_eq!(next_attempt(&head, now).as_deref(), Some("in 13s"));
        assert_eq!(next_attempt(&behind, now).as_deref(), Some("after 8"));
        assert_eq!(
            row_state(&behind),
            (
                "queued".into(),
                "waits for 8: one trigger at a time per project and ref, in order".into()
            )
        );
        let status_behind = crate::outbox::DeliveryRow {
            kind: Some("status".into()),
            waits_for: Some(20),
            ..row(21, "queued")
        };
        assert!(
            row_state(&status_behind)
                .1
                .starts_with("waits for 20: one status post at a time per commit and context")
        );
        let ping = crate::outbox::DeliveryRow {
            trigger_id: None,
            state: None,
            event_type: "ping".into(),
            summary: r#"{"note":"ping received"}"#.into(),
            ..row(11, "sent")
        };
        let text = table(&[replayed, behind, head, ping], now);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        // Every line has its TRY and NEXT columns where the header has them.
        let at = |line: &str, what: &str| {
            line.find(what)
                .unwrap_or_else(|| panic!("{what} in {line}"))
        };
        let tries = at(lines[0], "TRY");
        assert_eq!(&lines[3][tries..tries + 3], "  3", "{text}");
        assert_eq!(&lines[4][tries..tries + 3], "   ", "nothing tried: {text}");
        let next = at(lines[0], "NEXT");
        let why = at(lines[0], "LAST ANSWER / WHY");
        assert_eq!(
            at(lines[1], "sent (replay of 1)"),
            at(lines[0], "STATUS"),
            "{text}"
        );
        assert_eq!(at(lines[2], "after 8"), next, "{text}");
        assert_eq!(at(lines[2], "waits for 8: one trigger"), why, "{text}");
        assert_eq!(at(lines[3], "in 13s"), next, "{text}");
        assert_eq!(at(lines[3], "503: upstream says 503"), why, "{text}");
    }

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
