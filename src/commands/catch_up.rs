//! `hookrelay catch-up`: the webhooks GitHub or GitLab could not deliver to the relay,
//! delivered again (see [`crate::catch_up`]), and what it did said a line per event.

use std::process::ExitCode;

use crate::catch_up::{CatchUp, CredentialRef, Event, Forge, HookUrl, Report};
use crate::outbox::OfflineStore;
use crate::secret::SecretRef;
use crate::store::StoreLocation;

/// What `hookrelay catch-up` was asked.
pub struct CatchUpArgs<'a> {
    pub store: &'a StoreLocation,
    /// Where the source's `catch_up` is read when no `--hook` is given.
    pub config: &'a std::path::Path,
    /// The `[source.NAME]` the hook sends to: whose webhooks the store is asked about.
    pub source: &'a str,
    pub hook: Option<&'a str>,
    pub token: Option<&'a str>,
    /// A GitHub App's ID and key reference (`--app`, `--key`, given together).
    pub app: Option<&'a str>,
    pub key: Option<&'a str>,
    pub since: i64,
    pub most: usize,
    pub dry_run: bool,
    pub json: bool,
}

/// The hook and credential of `source`'s `catch_up = { … }` in the configuration at
/// `config`, as `--hook` and `--token` (or `--app` and `--key`) would give them. Secrets
/// are not read (the operator's shell may lack the relay's); they are read when the
/// command uses them.
fn configured(
    config: &std::path::Path,
    source: &str,
) -> Result<(Vec<HookUrl>, CredentialRef), String> {
    let loaded = crate::config::load_without_secrets(config).map_err(|problems| {
        format!(
            "no --hook given, and the configuration at {} (--config) cannot be read for \
             the catch_up of [source.{source}]:\n{problems}",
            config.display()
        )
    })?;
    let Some(found) = loaded.sources.get(source) else {
        return Err(format!(
            "no --hook given, and {} (--config) has no [source.{source}]",
            config.display()
        ));
    };
    let Some(catch_up) = &found.catch_up else {
        return Err(format!(
            "no --hook given, and [source.{source}] in {} (--config) has no catch_up = \
             {{ hook = \"…\", token = \"…\" }}: give --hook, or set it there",
            config.display()
        ));
    };
    Ok((catch_up.hooks.clone(), catch_up.credential_ref.clone()))
}

/// The hooks and credential the flags name, with the source's `catch_up` in `--config`
/// filling in what they leave out (all its hooks). An error is the message for exit
/// status 2.
fn chosen(args: &CatchUpArgs<'_>) -> Result<(Vec<HookUrl>, CredentialRef), String> {
    let flagged = match (args.token, args.app, args.key) {
        (Some(token), _, _) => Some(CredentialRef::Token(
            SecretRef::parse(token).map_err(|message| format!("--token: {message}"))?,
        )),
        (None, Some(app), Some(key)) => {
            crate::catch_up::github_app::check_app(app)
                .map_err(|message| format!("--app: {message}"))?;
            Some(CredentialRef::App {
                app: app.to_owned(),
                key: SecretRef::parse(key).map_err(|message| format!("--key: {message}"))?,
            })
        }
        _ => None,
    };
    let (hooks, credential) = match args.hook {
        Some(hook) => {
            let hook = HookUrl::parse(hook).map_err(|message| format!("--hook: {message}"))?;
            let credential = match flagged {
                Some(credential) => credential,
                None if hook.is_app() => {
                    return Err(format!(
                        "{} is a GitHub App's own hook: give the App's --app ID and --key \
                         file:PATH (its private key)",
                        hook.shown()
                    ));
                }
                None => CredentialRef::Token(SecretRef::Env(
                    match hook.forge {
                        Forge::GitHub => "GITHUB_TOKEN",
                        Forge::GitLab => "GITLAB_TOKEN",
                    }
                    .into(),
                )),
            };
            (vec![hook], credential)
        }
        None => {
            let (hooks, configured) = configured(args.config, args.source)?;
            (hooks, flagged.unwrap_or(configured))
        }
    };
    for hook in &hooks {
        credential.fits(hook)?;
    }
    Ok((hooks, credential))
}

/// Exit status 0 when every event that needed it was redelivered (or, in a dry run,
/// listed); 1 when the forge refused some, stopped the run, does not call the hook, or its
/// log or the store could not be read; 2 for arguments that cannot be used.
pub fn catch_up(args: CatchUpArgs<'_>) -> ExitCode {
    ExitCode::from(catch_up_source(&args))
}

/// `--all`: every source with `catch_up` in `--config`, in name order, each as
/// `--source NAME` alone runs it; the worst exit status of them.
pub fn catch_up_all(args: CatchUpArgs<'_>) -> ExitCode {
    let loaded = match crate::config::load_without_secrets(args.config) {
        Ok(loaded) => loaded,
        Err(problems) => {
            eprintln!(
                "hookrelay catch-up: the configuration at {} (--config) cannot be read:\n{problems}",
                args.config.display()
            );
            return ExitCode::from(2);
        }
    };
    // Read from this one load (`check` made sure each credential fits its hooks), not
    // loaded again for each source.
    let mut sources: Vec<(&str, &crate::catch_up::CatchUpConfig)> = loaded
        .sources
        .values()
        .filter_map(|source| Some((source.name.as_str(), source.catch_up.as_ref()?)))
        .collect();
    sources.sort_unstable_by_key(|(name, _)| *name);
    if sources.is_empty() {
        eprintln!(
            "hookrelay catch-up: no source in {} (--config) has catch_up = {{ hook = \"…\", … }}",
            args.config.display()
        );
        return ExitCode::from(2);
    }
    let worst = sources
        .into_iter()
        .map(|(source, catch_up)| {
            run_hooks(
                &CatchUpArgs { source, ..args },
                &catch_up.hooks,
                &catch_up.credential_ref,
            )
        })
        .max()
        .unwrap_or_default();
    ExitCode::from(worst)
}

/// One source's run, with the hooks and credential the flags and `--config` give; its
/// exit status.
fn catch_up_source(args: &CatchUpArgs<'_>) -> u8 {
    match chosen(args) {
        Ok((hooks, credential)) => run_hooks(args, &hooks, &credential),
        Err(message) => {
            eprintln!("hookrelay catch-up: {message}");
            2
        }
    }
}

/// One source's run over `hooks`; its exit status.
fn run_hooks(args: &CatchUpArgs<'_>, hooks: &[HookUrl], credential: &CredentialRef) -> u8 {
    let refused = |message: String| {
        eprintln!("hookrelay catch-up: {message}");
        2
    };
    let credential = match credential.resolve() {
        Ok(credential) => credential,
        Err(message) => {
            let flag = match credential {
                CredentialRef::Token(_) => "token",
                CredentialRef::App { .. } => "key",
            };
            return refused(format!("the {flag}: {message}"));
        }
    };
    let mut store = match OfflineStore::open(args.store) {
        Ok(store) => store,
        Err(err) => {
            eprintln!("hookrelay catch-up: {err}");
            return 1;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("hookrelay catch-up: cannot start: {err}");
            return 1;
        }
    };
    // Each hook in turn (a source's catch_up may name several); one whose log cannot be
    // read is said, and the others are still read.
    let mut all_done = true;
    for hook in hooks {
        let run = CatchUp {
            source: args.source,
            hook,
            credential: &credential,
            since: args.since,
            most: args.most,
            dry_run: args.dry_run,
        };
        let mut is_stored = |guid: &str| {
            store
                .holds_webhook_from(args.source, guid)
                .map_err(|err| err.to_string())
        };
        let report = match runtime.block_on(run.run(&mut is_stored)) {
            Ok(report) => report,
            Err(message) => {
                eprintln!("hookrelay catch-up: {message}");
                all_done = false;
                continue;
            }
        };
        if args.json {
            print_json(&report, hook, args.dry_run);
        } else {
            print_report(&report, hook, args.source, args.dry_run);
        }
        all_done &= report.refused.is_empty()
            && report.stopped.is_none()
            && report.left.is_empty()
            && report.hook_disabled.is_none();
    }
    u8::from(!all_done)
}

fn described(event: &Event) -> String {
    format!(
        "{} ({}, {} attempt{}, the last at {}: {})",
        event.guid,
        event.event,
        event.attempts,
        if event.attempts == 1 { "" } else { "s" },
        event.newest_at,
        event.newest_answer
    )
}

fn print_report(report: &Report, hook: &HookUrl, source: &str, dry_run: bool) {
    let forge = hook.forge.name();
    let again_by_hand = match hook.forge {
        Forge::GitHub => "press Redeliver on the hook's page",
        Forge::GitLab => "press Resend request in the hook's Recent events",
    };
    if let Some(disabled) = &report.hook_disabled {
        println!("{forge} does not call this hook now: {disabled}");
    }
    for event in &report.redelivered {
        let done = if dry_run {
            "would redeliver"
        } else {
            "redelivered"
        };
        println!("{done} {}", described(event));
    }
    for (event, answer) in &report.refused {
        println!(
            "{forge} refused to redeliver {}: {answer}",
            described(event)
        );
    }
    for event in &report.rejected {
        println!(
            "not redelivered, the relay refused it: {} (a redelivery would be refused again: fix the cause, e.g. the source's secret, then {again_by_hand})",
            described(event)
        );
    }
    for event in &report.stored {
        println!(
            "left alone, the relay stored it though {forge} saw no 2xx: {}",
            described(event)
        );
    }
    for event in &report.left {
        println!("left for another run: {}", described(event));
    }
    if report.keyless > 0 {
        println!(
            "{} failed attempts carry no Idempotency-Key (GitLab before 17.4): whether the relay holds them cannot be told, and they are not resent",
            report.keyless
        );
    }
    if let Some(why) = &report.stopped {
        println!("stopped: {why}");
    }
    if report.truncated {
        println!(
            "the window holds more attempts than one run reads; its oldest were not looked at: narrow --since and run again"
        );
    }
    let redelivered = if dry_run {
        "to redeliver"
    } else {
        "redelivered"
    };
    let read = if report.failures_only {
        format!(
            "{} failed attempts (no answer, 5xx or 429) of {} events",
            report.attempts, report.events
        )
    } else {
        format!("{} attempts of {} events", report.attempts, report.events)
    };
    let delivered = if report.failures_only {
        String::new()
    } else {
        format!("{} delivered, ", report.delivered)
    };
    println!(
        "{read} in the log of {}: {delivered}{} in the store of source {source:?} though {forge} saw no 2xx, {} refused by the relay, {} {redelivered}{}{}",
        hook.shown(),
        report.stored.len(),
        report.rejected.len(),
        report.redelivered.len(),
        match report.refused.len() {
            0 => String::new(),
            n => format!(", {n} refused"),
        },
        match report.left.len() {
            0 => String::new(),
            n => format!(", {n} left for another run"),
        },
    );
}

/// One JSON object a hook, on a line of its own.
fn print_json(report: &Report, hook: &HookUrl, dry_run: bool) {
    let guids =
        |events: &[Event]| -> Vec<String> { events.iter().map(|e| e.guid.clone()).collect() };
    let value = serde_json::json!({
        "hook": hook.shown(),
        "dry_run": dry_run,
        "attempts": report.attempts,
        "events": report.events,
        "delivered": report.delivered,
        "stored": guids(&report.stored),
        "rejected": guids(&report.rejected),
        "redelivered": guids(&report.redelivered),
        "refused": report.refused.iter().map(|(event, answer)| serde_json::json!({
            "guid": event.guid, "answer": answer
        })).collect::<Vec<_>>(),
        "left": guids(&report.left),
        "stopped": report.stopped,
        "truncated": report.truncated,
        "hook_disabled": report.hook_disabled,
        "keyless": report.keyless,
    });
    println!("{value}");
}
