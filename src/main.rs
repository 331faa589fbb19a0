//! The `hookrelay` command line: parse arguments, then call into the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc: every webhook allocates many small, short-lived values across threads, the
/// pattern it is built for (measured with `benches/peers.sh`; see the README).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use hookrelay::commands;

#[derive(Parser)]
#[command(
    name = "hookrelay",
    version,
    about = "Webhook relay and rate-limited gateway for GitLab's pipeline trigger API"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay.
    Serve(ServeArgs),
    /// List recent deliveries and their triggers, newest first, with why nothing ran.
    Deliveries(DeliveriesArgs),
    /// Queue a trigger (by its id) or a whole delivery (by its delivery id) again; with
    /// --replan, run a stored webhook through the current rules instead; with --failed,
    /// --unmatched or --replan --rule, every one of a window (--dry-run to look first).
    Replay(ReplayArgs),
    /// Stop a waiting or retrying trigger (by its id), or every waiting trigger of a project.
    Cancel(CancelArgs),
    /// Copy the delivery store to a file, beside a running relay (SQLite; PostgreSQL is
    /// backed up with pg_dump).
    Backup {
        #[command(flatten)]
        state: StateArg,
        /// The file to write: a new one, private to its owner, whole in itself.
        #[arg(value_name = "FILE")]
        to: PathBuf,
    },
    /// Show what hookrelay makes of a webhook payload file, offline.
    Explain(ExplainArgs),
    /// Ask GitHub (or GitLab) to deliver again the webhooks of one hook that never reached
    /// the store (sent while the relay was down, or answered 503): neither does by itself.
    CatchUp(CatchUpArgs),
    /// Validate the configuration; print each problem as file:line: message.
    Check {
        #[command(flatten)]
        config: ConfigArg,
    },
}

/// The arguments of `hookrelay catch-up`.
#[derive(clap::Args)]
struct CatchUpArgs {
    #[command(flatten)]
    state: StateArg,
    /// The [source.NAME] the hook sends to: webhooks it stored are left alone.
    #[arg(long, value_name = "NAME", required_unless_present = "all")]
    source: Option<String>,
    /// Every source with `catch_up = { … }` in --config, in name order, each with its own
    /// hooks and credential (after an outage, one command for all).
    #[arg(long, conflicts_with_all = ["source", "hook", "token", "app", "key"])]
    all: bool,
    /// The hook's API address: https://api.github.com/repos/OWNER/REPO/hooks/ID (or
    /// …/orgs/ORG/hooks/ID, a GitHub App's own https://api.github.com/app/hook;
    /// https://HOST/api/v3/… on GitHub Enterprise Server; on GitLab
    /// https://HOST/api/v4/projects/ID/hooks/ID or …/groups/ID/hooks/ID). Without it, the
    /// source's `catch_up = { hook, … }` in --config.
    #[arg(long, value_name = "URL")]
    hook: Option<String>,
    /// A token that may read and redeliver the hook's deliveries, as env:NAME or
    /// file:PATH (a classic token needs admin:repo_hook or admin:org_hook; a fine-grained
    /// one the permission Webhooks: read and write; on GitLab the api scope and the
    /// Maintainer role). By default the source's catch_up token, or env:GITHUB_TOKEN
    /// (env:GITLAB_TOKEN for a GitLab hook) with --hook.
    #[arg(long, value_name = "REF", conflicts_with_all = ["app", "key"])]
    token: Option<String>,
    /// A GitHub App's ID or client ID, with --key, instead of a token: for the App's own
    /// hook, or a repository's or organisation's hook where the App is installed.
    #[arg(long, value_name = "ID", requires = "key")]
    app: Option<String>,
    /// The GitHub App's private key (the .pem GitHub made for it), as file:PATH or env:NAME.
    #[arg(long, value_name = "REF", requires = "app")]
    key: Option<String>,
    #[command(flatten)]
    config: ConfigArg,
    /// Attempts within this long (`2h`) or since this UTC time are looked at (GitHub
    /// redelivers attempts of the last 3 days; GitLab lists those of the last 7).
    #[arg(long, default_value = "24h")]
    since: String,
    /// Redeliveries asked for at most in this run; the rest are listed for the next.
    #[arg(long, default_value_t = 100)]
    most: usize,
    /// List what would be redelivered, and ask the forge for nothing.
    #[arg(long)]
    dry_run: bool,
    /// One JSON object instead of lines.
    #[arg(long)]
    json: bool,
}

/// The arguments of `hookrelay serve`.
#[derive(clap::Args)]
struct ServeArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// The delivery dashboard's address (overrides [admin] listen; turns it on).
    #[arg(long, value_name = "ADDRESS", value_parser = hookrelay::config::parse_listen)]
    admin_listen: Option<SocketAddr>,
    /// Address to listen on, IP:PORT or localhost:PORT (overrides [server] listen;
    /// default 127.0.0.1:8080).
    #[arg(long, env = "HOOKRELAY_LISTEN", value_name = "ADDR", value_parser = hookrelay::config::parse_listen)]
    listen: Option<SocketAddr>,
    #[command(flatten)]
    state: StateArg,
    /// Record and log the trigger calls that would be sent, without sending any.
    #[arg(long)]
    dry_run: bool,
    /// How log lines are written (to standard error).
    #[arg(long, value_enum, default_value = "text", env = "HOOKRELAY_LOG_FORMAT")]
    log_format: commands::LogFormat,
}

/// The arguments of `hookrelay deliveries`.
#[derive(clap::Args)]
struct DeliveriesArgs {
    #[command(flatten)]
    state: StateArg,
    /// Only this [source.NAME] (or `gateway`, `schedule`).
    #[arg(long)]
    source: Option<String>,
    /// Only triggers of this rule.
    #[arg(long)]
    rule: Option<String>,
    /// Only triggers for this project (as the rule names it: `acme/app` or `42`).
    #[arg(long)]
    project: Option<String>,
    /// Only triggers with this status (`none`: deliveries that queued nothing).
    #[arg(long = "status", value_enum, value_name = "STATUS")]
    status: Option<hookrelay::outbox::StateFilter>,
    /// Only webhooks, gateway calls or schedules.
    #[arg(long, value_enum)]
    kind: Option<hookrelay::outbox::DeliveryKind>,
    /// Only deliveries received since then: `2h`, `30m`, or a UTC time (`2026-12-02 10:00`).
    #[arg(long, value_name = "WHEN")]
    since: Option<String>,
    /// Only deliveries received before then (same forms as --since).
    #[arg(long, value_name = "WHEN")]
    until: Option<String>,
    /// Only this delivery id, or the ids that start with it.
    #[arg(long, value_name = "ID")]
    delivery: Option<String>,
    /// Only deliveries with this text in their id, repository, ref or project.
    #[arg(long, value_name = "TEXT")]
    text: Option<String>,
    /// Only this trigger, with its delivery (as `coalesced into 42` or a replay names it).
    #[arg(long, value_name = "TRIGGER_ID")]
    trigger: Option<i64>,
    /// Only triggers that failed for good (the same as --status failed).
    #[arg(long)]
    failed: bool,
    /// How many rows to show (at least 1).
    #[arg(long, default_value_t = 50, value_name = "N", value_parser = at_least_one)]
    limit: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// The arguments of `hookrelay replay`.
#[derive(clap::Args)]
struct ReplayArgs {
    #[command(flatten)]
    state: StateArg,
    /// Run the stored webhook through the rules as they are now (new triggers, in a
    /// delivery named after the original), instead of re-sending the old calls; with
    /// --failed, every webhook whose triggers failed for good (after fixing a rule).
    #[arg(long)]
    replan: bool,
    #[command(flatten)]
    config: ConfigArg,
    /// Every trigger that failed for good since --since (e.g. after fixing a revoked
    /// trigger token), narrowed by --project, --source and --rule; with --replan, their
    /// webhooks through the current rules instead (those with no trigger sent or under way).
    #[arg(long, conflicts_with_all = ["id", "unmatched"], requires = "since")]
    failed: bool,
    /// Every webhook since --since that matched no rule (or whose trigger could not be
    /// built), through the current rules: after adding or fixing a rule. Narrowed by
    /// --source; one that still matches nothing is left out, saying why.
    #[arg(long, conflicts_with_all = ["id", "project", "rule"], requires = "since")]
    unmatched: bool,
    /// With --failed, --unmatched or --replan --rule: received within this long (`2h`) or
    /// since this UTC time.
    #[arg(long)]
    since: Option<String>,
    /// With --failed: only triggers for this project (as the rule names it).
    #[arg(long, requires = "failed")]
    project: Option<String>,
    /// With --failed, --unmatched or --replan --rule: only webhooks from this source. With
    /// a delivery ID (and --replan or not): the webhook this source sent as ID (its whole
    /// id), where two sources sent the same one (by the id alone, a replay takes both
    /// sources' triggers and a replan the newer webhook).
    #[arg(long)]
    source: Option<String>,
    /// With --failed: only triggers of this rule. With --replan (no --failed): run the
    /// webhook, or every webhook since --since, through this rule alone (a rule added
    /// since: a backfill that starts nothing the other rules started already).
    #[arg(long)]
    rule: Option<String>,
    /// With --replan, --unmatched or --failed: print what would be queued, and record
    /// nothing (to look before starting many pipelines at once).
    #[arg(long)]
    dry_run: bool,
    /// Print what was queued (or would be) as one JSON object, for scripts: `message`, and
    /// `queued`, `planned` or, in a dry run, `would_queue` or `would_plan`, with
    /// `left_out` (each with why) for replans.
    #[arg(long)]
    json: bool,
    /// A trigger id (`42` or `trigger:42`), or a delivery id or its unique start (`delivery:…`).
    #[arg(value_name = "ID", required_unless_present_any = ["failed", "unmatched", "since"])]
    id: Option<String>,
}

/// The arguments of `hookrelay cancel`.
#[derive(clap::Args)]
struct CancelArgs {
    #[command(flatten)]
    state: StateArg,
    /// Every waiting trigger for this project (as the rule names it).
    #[arg(long, conflicts_with = "id")]
    project: Option<String>,
    /// With --project: only triggers for this [upstream.NAME].
    #[arg(long, requires = "project")]
    upstream: Option<String>,
    /// Print what was cancelled as one JSON object, for scripts: `message`, `cancelled`
    /// (trigger ids).
    #[arg(long)]
    json: bool,
    /// A trigger id (`42` or `trigger:42`).
    #[arg(value_name = "TRIGGER", required_unless_present = "project")]
    id: Option<String>,
}

/// The arguments of `hookrelay explain`.
#[derive(clap::Args)]
struct ExplainArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// The [source.NAME] the payload arrives on. With --delivery: that source's webhook of
    /// the id, where two sources sent it; else the stored webhook read through this
    /// source's rules (a stored delivery knows its own).
    #[arg(long)]
    source: Option<String>,
    /// Explain a delivery from the state folder, by its delivery id, instead of a file.
    #[arg(long, value_name = "ID", conflicts_with = "payload")]
    delivery: Option<String>,
    #[command(flatten)]
    state: StateArg,
    /// The sender's event type (X-GitHub-Event, X-Gitlab-Event, X-Event-Key, …).
    #[arg(long, value_name = "TYPE")]
    event: Option<String>,
    /// A request header, "Name: value"; repeatable.
    #[arg(long = "header", value_name = "K: V")]
    headers: Vec<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// A `?ref=` as the webhook URL would carry it (overrides every trigger's ref).
    #[arg(long = "ref", value_name = "REF")]
    url_ref: Option<String>,
    /// Ask the source's forge which files a push changed, as the relay would (a source's
    /// `compare`), instead of only saying that it would: reads the configuration's
    /// secrets (as `serve` does) and calls the forge's API.
    #[arg(long)]
    ask_forge: bool,
    /// Explain a scheduled rule instead: its next times, and the calls it makes then.
    #[arg(long, value_name = "RULE", conflicts_with_all = ["payload", "delivery", "source", "event", "headers", "url_ref", "ask_forge"])]
    schedule: Option<String>,
    /// The payload file (the webhook's body).
    #[arg(value_name = "PAYLOAD.json", required_unless_present_any = ["delivery", "schedule"])]
    payload: Option<PathBuf>,
}

/// `--state` and `--store`, shared by every command that reads the delivery store.
#[derive(clap::Args)]
struct StateArg {
    /// Folder for the relay's state (the SQLite delivery store).
    #[arg(
        long = "state",
        env = "HOOKRELAY_STATE",
        default_value = "hookrelay-data",
        value_name = "DIR"
    )]
    state_dir: PathBuf,
    /// A PostgreSQL database shared by several relays (postgres://user@host:5432/db),
    /// instead of [store] url or HOOKRELAY_STORE_URL. A URL with a password belongs in
    /// HOOKRELAY_STORE_URL, never on the command line.
    #[arg(long = "store", value_name = "URL")]
    store: Option<String>,
}

impl StateArg {
    /// The store of a command that reads no configuration.
    fn location(&self, command: &str) -> Result<hookrelay::store::StoreLocation, ExitCode> {
        hookrelay::store::StoreLocation::from_command_line(&self.state_dir, self.store.as_deref())
            .map_err(|message| {
                eprintln!("hookrelay {command}: {message}");
                ExitCode::from(2)
            })
    }
}

/// `--config`, shared by every command that reads configuration.
#[derive(clap::Args)]
struct ConfigArg {
    /// Configuration file, or folder whose *.toml files are read in name order.
    #[arg(
        long = "config",
        env = "HOOKRELAY_CONFIG",
        default_value = "rules",
        value_name = "FILE|DIR"
    )]
    path: PathBuf,
}

/// `hookrelay deliveries | head` ends the command as it ends any Unix tool: by SIGPIPE
/// once `head` has read enough. Rust ignores that signal, and printing to the closed pipe
/// then panicked. `serve` keeps ignoring it: a peer that hangs up never stops the relay.
fn end_quietly_on_a_closed_pipe() {
    #[cfg(unix)]
    // SAFETY: called before any other thread starts; SIG_DFL is a valid disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// A time flag (`--since 2h`, `--until "2026-12-02 10:00"`) as milliseconds since 1970, or
/// the exit status after saying what is wrong with it.
/// A count that must be at least 1 (`--limit 0` would show nothing and say nothing matched).
fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(count) => Ok(count),
        Err(err) => Err(err.to_string()),
    }
}

fn time_flag(command: &str, flag: &str, text: Option<String>) -> Result<Option<i64>, ExitCode> {
    let now = hookrelay::outbox::now_ms();
    text.map(|text| hookrelay::delivery_rows::parse_time(&text, now))
        .transpose()
        .map_err(|message| {
            eprintln!("hookrelay {command}: {flag}: {message}");
            ExitCode::from(2)
        })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve(_)) {
        end_quietly_on_a_closed_pipe();
    }
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Deliveries(args) => deliveries(args),
        Command::Replay(args) => replay(args),
        Command::Cancel(args) => cancel(args),
        Command::Backup { state, to } => match state.location("backup") {
            Ok(store) => commands::backup(&store, &to),
            Err(code) => code,
        },
        Command::Explain(args) => explain(args),
        Command::CatchUp(args) => catch_up(args),
        Command::Check { config } => commands::check(&config.path),
    }
}

/// `hookrelay catch-up`: what GitHub or GitLab could not deliver, delivered again.
fn catch_up(args: CatchUpArgs) -> ExitCode {
    let store = match args.state.location("catch-up") {
        Ok(store) => store,
        Err(code) => return code,
    };
    let since = match time_flag("catch-up", "--since", Some(args.since)) {
        Ok(since) => since.expect("a --since was given"),
        Err(code) => return code,
    };
    let asked = commands::catch_up::CatchUpArgs {
        store: &store,
        config: &args.config.path,
        source: args.source.as_deref().unwrap_or_default(),
        hook: args.hook.as_deref(),
        token: args.token.as_deref(),
        app: args.app.as_deref(),
        key: args.key.as_deref(),
        since,
        most: args.most,
        dry_run: args.dry_run,
        json: args.json,
    };
    match args.all {
        true => commands::catch_up::catch_up_all(asked),
        false => commands::catch_up::catch_up(asked),
    }
}

/// `hookrelay explain`: a payload file, a stored delivery or a schedule, offline.
fn explain(args: ExplainArgs) -> ExitCode {
    let ExplainArgs {
        config,
        source,
        event,
        headers,
        json,
        url_ref,
        payload,
        delivery,
        state,
        schedule,
        ask_forge,
    } = args;
    let request = hookrelay::explain::ExplainRequest {
        config: &config.path,
        source: source.as_deref(),
        delivery: delivery.as_deref(),
        state: &state.state_dir,
        store: state.store.as_deref(),
        event: event.as_deref(),
        headers: &headers,
        payload: payload.as_deref(),
        json,
        url_ref: url_ref.as_deref(),
        ask_forge,
    };
    let explained = match &schedule {
        Some(rule) => hookrelay::explain::explain_schedule(&config.path, rule, json),
        None => hookrelay::explain::explain(&request),
    };
    match explained {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!(
                "hookrelay explain: {}",
                hookrelay::terminal::escape_controls(&message)
            );
            ExitCode::FAILURE
        }
    }
}

/// `hookrelay deliveries`: the store's rows under the flags' filter.
fn deliveries(args: DeliveriesArgs) -> ExitCode {
    let DeliveriesArgs {
        state,
        source,
        rule,
        project,
        status,
        kind,
        since,
        until,
        delivery,
        text,
        trigger,
        failed,
        limit,
        json,
    } = args;
    let time = |text, flag| time_flag("deliveries", flag, text);
    let (since, until) = match (time(since, "--since"), time(until, "--until")) {
        (Ok(since), Ok(until)) => (since, until),
        (Err(code), _) | (_, Err(code)) => return code,
    };
    let filter = hookrelay::outbox::ListFilter {
        source,
        rule,
        project,
        state: if failed {
            Some(hookrelay::outbox::StateFilter::Failed)
        } else {
            status
        },
        kind,
        since,
        until,
        delivery,
        whole_delivery: None,
        text,
        trigger,
        before: None,
        limit,
    };
    match state.location("deliveries") {
        Ok(store) => commands::deliveries(&store, &filter, json),
        Err(code) => code,
    }
}

/// `hookrelay replay`: one trigger or delivery again, every failed one since a time, or a
/// stored webhook through the current rules (`--replan`).
fn replay(args: ReplayArgs) -> ExitCode {
    if args.dry_run && !(args.replan || args.unmatched || args.failed) {
        eprintln!(
            "hookrelay replay: --dry-run goes with --replan, --unmatched or --failed (a replay of one trigger or delivery sends what was sent before)"
        );
        return ExitCode::from(2);
    }
    let mode = if args.dry_run {
        commands::ReplanMode::DryRun
    } else {
        commands::ReplanMode::Record
    };
    // Where a replan reads its rules and store, and how it answers.
    let run = commands::ReplanRun {
        config: &args.config.path,
        state: &args.state.state_dir,
        store: args.state.store.as_deref(),
        mode,
        json: args.json,
    };
    // A window: failed triggers sent again, or webhooks run through the current rules.
    let window = if args.unmatched {
        Some(commands::Replans::Unmatched)
    } else if args.failed && args.replan {
        Some(commands::Replans::Failed)
    } else if args.replan && args.rule.is_some() && args.id.is_none() {
        Some(commands::Replans::Rule)
    } else {
        None
    };
    if args.failed || window.is_some() {
        if args.since.is_none() {
            eprintln!(
                "hookrelay replay: a window needs --since (2h, or a UTC time); or name a delivery id"
            );
            return ExitCode::from(2);
        }
        let since = match time_flag("replay", "--since", args.since) {
            Ok(since) => since,
            Err(code) => return code,
        };
        // Through one rule, the rule names what runs, not which rows the window holds.
        let (rule, only_rule) = match window {
            Some(commands::Replans::Rule) => (None, args.rule),
            _ => (args.rule, None),
        };
        let filter = hookrelay::outbox::ListFilter {
            source: args.source,
            rule,
            project: args.project,
            since,
            ..Default::default()
        };
        return match window {
            Some(which) => commands::replan_window(&run, filter, which, only_rule.as_deref()),
            None => match args.state.location("replay") {
                Ok(store) => commands::replay_failed(&store, filter, mode, args.json),
                Err(code) => code,
            },
        };
    }
    if args.since.is_some() {
        eprintln!("hookrelay replay: --since goes with --failed, --unmatched or --replan --rule");
        return ExitCode::from(2);
    }
    if args.rule.is_some() && !args.replan {
        eprintln!("hookrelay replay: --rule goes with --failed or --replan");
        return ExitCode::from(2);
    }
    let Some(id) = args.id else {
        eprintln!(
            "hookrelay replay: name a trigger or delivery id, or use --failed or --unmatched"
        );
        return ExitCode::from(2);
    };
    if args.source.is_some() && id.starts_with("trigger:") {
        eprintln!(
            "hookrelay replay: --source names the sender of a delivery id; a trigger is named by its id alone"
        );
        return ExitCode::from(2);
    }
    if args.replan {
        return commands::replan(&run, &id, args.source.as_deref(), args.rule.as_deref());
    }
    match args.state.location("replay") {
        Ok(store) => commands::replay(&store, &id, args.source.as_deref(), args.json),
        Err(code) => code,
    }
}

/// `hookrelay cancel`: one trigger, or every waiting trigger of a project.
fn cancel(args: CancelArgs) -> ExitCode {
    let target = match (args.project, args.id) {
        (Some(project), _) => hookrelay::outbox::CancelTarget::Project {
            project,
            upstream: args.upstream,
        },
        (None, Some(id)) => match id.strip_prefix("trigger:").unwrap_or(&id).parse::<i64>() {
            Ok(id) => hookrelay::outbox::CancelTarget::Trigger(id),
            Err(_) => {
                eprintln!(
                    "hookrelay cancel: {id:?} is not a trigger id (a number, as `hookrelay deliveries` shows in ID)"
                );
                return ExitCode::from(2);
            }
        },
        (None, None) => unreachable!("clap requires one"),
    };
    match args.state.location("cancel") {
        Ok(store) => commands::cancel(&store, &target, args.json),
        Err(code) => code,
    }
}

/// `hookrelay serve`: logging, the async runtime, then the relay until it is stopped.
fn serve(args: ServeArgs) -> ExitCode {
    let _log = match commands::init_logging(args.log_format) {
        Ok(guard) => guard,
        Err(err) => {
            eprintln!("hookrelay: cannot start the log writer's thread: {err}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("hookrelay: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::serve(commands::ServeOptions {
        config: args.config.path,
        listen: args.listen,
        state: args.state.state_dir,
        store: args.state.store,
        dry_run: args.dry_run,
        admin_listen: args.admin_listen,
    })) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("hookrelay: {err:#}");
            ExitCode::FAILURE
        }
    }
}
