//! The relay's own catch-up: for each source with `catch_up = { … }`, a pass over its
//! GitHub hook's delivery log when the relay starts (looking back `since`, over the time
//! it was down) and then every `every`, each looking back to the start of the last pass
//! that read the log, so that nothing falls between two passes.
//!
//! A pass waits while the store refuses writes: a webhook redelivered then would be
//! answered `503` again. Each pass that redelivers, or cannot, says so in one log line.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::app::App;
use crate::catch_up::{CatchUp, CatchUpConfig, Event, Forge, HookUrl, LastPass, Report};
use crate::metrics::CatchUpOutcome;

/// How often the loop looks at the configuration (a reload may add or change a source).
const LOOK_EVERY: Duration = Duration::from_secs(30);
/// Redeliveries asked for at most in one pass.
const MOST_PER_PASS: usize = 100;
/// Resends asked of GitLab at most in one pass (it allows five a minute).
const GITLAB_MOST_PER_PASS: usize = 5;

/// Where the passes over one hook of one source stand.
struct Passes {
    /// The start of the last pass that read the log (milliseconds since the epoch).
    read_from: Option<i64>,
    /// When the next pass is due.
    next: tokio::time::Instant,
}

/// Runs until `stopped` turns true.
pub async fn run(app: Arc<App>, mut stopped: watch::Receiver<bool>) {
    // By source and hook: a hook added or changed by a reload starts over.
    let mut passes: HashMap<(String, HookUrl), Passes> = HashMap::new();
    loop {
        let runtime = app.runtime();
        let now = tokio::time::Instant::now();
        // Borrowed from this look's snapshot of the configuration.
        let configured: Vec<(&String, &HookUrl, &CatchUpConfig)> = runtime
            .config
            .sources
            .iter()
            .filter_map(|(name, source)| Some((name, source.catch_up.as_ref()?)))
            .flat_map(|(name, config)| config.hooks.iter().map(move |hook| (name, hook, config)))
            .collect();
        passes
            .retain(|(name, hook), _| configured.iter().any(|(n, h, _)| *n == name && *h == hook));
        let mut sleep = LOOK_EVERY;
        for (name, hook, config) in configured {
            let state = passes
                .entry((name.clone(), hook.clone()))
                .or_insert_with(|| Passes {
                    read_from: None,
                    next: now,
                });
            if state.next > now {
                sleep = sleep.min(state.next - now);
                continue;
            }
            if let Some(problem) = app.outbox.health.problem() {
                tracing::debug!(source = %name, %problem, "catch-up waits for the store to take writes");
                continue;
            }
            if let Some(wait) = another_relays_turn(&app, name, hook, config.every).await {
                state.next = now + wait;
                sleep = sleep.min(wait);
                continue;
            }
            let started = crate::outbox::now_ms();
            let since = window_start(state.read_from, started, config);
            // A pass may take a while (pages of a busy hook, GitHub slow to answer): a
            // relay stopping does not wait for it.
            let read = tokio::select! {
                read = pass(&app, name, hook, config, since) => read,
                _ = stopped.changed() => return,
            };
            if read {
                state.read_from = Some(started);
            }
            state.next = tokio::time::Instant::now() + config.every;
            sleep = sleep.min(config.every);
        }
        tokio::select! {
            _ = tokio::time::sleep(sleep) => {}
            _ = stopped.changed() => return,
        }
        if *stopped.borrow() {
            return;
        }
    }
}

/// Relays sharing a PostgreSQL store take turns: one pass of each hook of a source per
/// `every` among them all (one admission per `every` on the shared limits), so its log is
/// read and its webhooks redelivered once, not once per relay. `Some(wait)` when another
/// relay took this turn. A relay whose last pass was some turns ago reads back to it, so
/// nothing falls between passes made by different relays. When the database cannot say,
/// the pass is made: a redelivery asked for twice arrives as a duplicate, one not asked
/// for is lost.
async fn another_relays_turn(
    app: &App,
    source: &str,
    hook: &HookUrl,
    every: Duration,
) -> Option<Duration> {
    let shared = app.outbox.shared_state.as_ref()?;
    let turn = format!("catch-up pass:{source}:{}", hook.shown());
    match shared.admit(&turn, every, 1, 1).await {
        Ok(wait) if wait.is_zero() => None,
        Ok(wait) => {
            tracing::debug!(source = %source, wait_ms = wait.as_millis() as u64, "catch-up: another relay made this pass");
            Some(wait)
        }
        Err(reason) => {
            tracing::debug!(source = %source, %reason, "catch-up: whose turn it is cannot be told; this relay makes the pass");
            None
        }
    }
}

/// Where a pass starting at `started` reads the log from: the relay's first looks back
/// `since` (over the time it was down); each later one back to an `every` before the
/// start of the last pass that read it, so that an attempt GitHub listed late, or a pass
/// that failed, leaves no gap.
fn window_start(read_from: Option<i64>, started: i64, config: &CatchUpConfig) -> i64 {
    match read_from {
        None => started - config.since.as_millis() as i64,
        Some(from) => from - config.every.as_millis() as i64,
    }
}

/// One pass over `hook`; whether its log was read.
async fn pass(app: &App, source: &str, hook: &HookUrl, config: &CatchUpConfig, since: i64) -> bool {
    let Some(credential) = &config.credential else {
        return false;
    };
    let run = CatchUp {
        source,
        hook,
        credential,
        since,
        most: match hook.forge {
            Forge::GitHub => MOST_PER_PASS,
            // GitLab resends five a minute: a pass asks for as many, paced.
            Forge::GitLab => GITLAB_MOST_PER_PASS,
        },
        // A relay in `--dry-run` causes nothing outside itself: it says what it would ask.
        dry_run: app.dry_run,
    };
    let mut is_stored = |guid: &str| {
        app.outbox
            .read(|engine| engine.stored_webhook_from(source, guid))
            .map(|webhook| webhook.is_some())
            .map_err(|err| err.to_string())
    };
    let at = crate::outbox::now_ms();
    match run.run(&mut is_stored).await {
        Ok(report) => {
            app.catch_up.note(
                source,
                hook,
                LastPass {
                    at,
                    redelivered: report.redelivered.len(),
                    rejected: report.rejected.len(),
                    not_redelivered: report.refused.len() + report.left.len(),
                    error: report
                        .hook_disabled
                        .clone()
                        .or_else(|| report.stopped.clone()),
                },
            );
            say(source, hook, &report, app.dry_run);
            if report.hook_disabled.is_some() {
                app.metrics
                    .catch_up(source, CatchUpOutcome::HookDisabled, 1);
            }
            let counts = [
                (CatchUpOutcome::Redelivered, report.redelivered.len()),
                (CatchUpOutcome::Refused, report.refused.len()),
                (CatchUpOutcome::Rejected, report.rejected.len()),
                (CatchUpOutcome::Left, report.left.len()),
            ];
            for (outcome, count) in counts {
                if count > 0 && !(app.dry_run && outcome == CatchUpOutcome::Redelivered) {
                    app.metrics.catch_up(source, outcome, count as u64);
                }
            }
            true
        }
        Err(reason) => {
            app.metrics.catch_up(source, CatchUpOutcome::Failed, 1);
            app.catch_up.note(
                source,
                hook,
                LastPass {
                    at,
                    redelivered: 0,
                    rejected: 0,
                    not_redelivered: 0,
                    error: Some(reason.clone()),
                },
            );
            tracing::warn!(source = %source, hook = %hook.shown(), %reason, "catch-up could not read the hook's deliveries; trying again at the next pass");
            false
        }
    }
}

fn say(source: &str, hook_url: &HookUrl, report: &Report, dry_run: bool) {
    let hook = hook_url.shown();
    let forge = hook_url.forge.name();
    let guids = |events: &[Event]| {
        events
            .iter()
            .map(|event| event.guid.as_str())
            .collect::<Vec<_>>()
            .join(",")
    };
    if !report.redelivered.is_empty() {
        let asked = if dry_run {
            "catch-up (--dry-run) would ask"
        } else {
            "catch-up asked"
        };
        tracing::info!(
            source = %source,
            hook = %hook,
            count = report.redelivered.len(),
            guids = %guids(&report.redelivered),
            "{asked} {forge} to deliver again webhooks the relay never took"
        );
    }
    if let Some(disabled) = &report.hook_disabled {
        tracing::warn!(
            source = %source,
            hook = %hook,
            %disabled,
            "catch-up: {forge} does not call the relay's hook now"
        );
    }
    if report.keyless > 0 {
        tracing::warn!(
            source = %source,
            hook = %hook,
            count = report.keyless,
            "catch-up: failed attempts without an Idempotency-Key (GitLab before 17.4) cannot be matched with the store, and are not resent"
        );
    }
    if !report.rejected.is_empty() {
        tracing::warn!(
            source = %source,
            hook = %hook,
            count = report.rejected.len(),
            guids = %guids(&report.rejected),
            "catch-up: the relay refused these webhooks (4xx), so they are not redelivered; `hookrelay catch-up --dry-run` says why each"
        );
    }
    if !report.refused.is_empty() || report.stopped.is_some() || !report.left.is_empty() {
        let refused: Vec<String> = report
            .refused
            .iter()
            .map(|(event, answer)| format!("{}: {answer}", event.guid))
            .collect();
        tracing::warn!(
            source = %source,
            hook = %hook,
            refused = %refused.join("; "),
            left = %guids(&report.left),
            stopped = report.stopped.as_deref().unwrap_or("-"),
            "catch-up could not redeliver everything; the rest is asked for at the next pass"
        );
    }
    tracing::debug!(
        source = %source,
        attempts = report.attempts,
        events = report.events,
        delivered = report.delivered,
        stored = report.stored.len(),
        "catch-up pass"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_pass_looks_back_since_and_each_later_one_to_before_the_last_read() {
        let config = CatchUpConfig {
            hooks: vec![HookUrl::parse("https://api.github.com/repos/a/b/hooks/1").unwrap()],
            credential_ref: crate::catch_up::CredentialRef::Token(
                crate::secret::SecretRef::parse("env:T").unwrap(),
            ),
            credential: None,
            every: Duration::from_secs(600),
            since: Duration::from_secs(24 * 3600),
        };
        let hour = 3_600_000;
        assert_eq!(window_start(None, 100 * hour, &config), 76 * hour);
        // The last read began at 99 h; a pass at 100 h (or at 105 h, after passes that
        // could not read the log) reads from 98 h 50 min.
        let from = 99 * hour - 600_000;
        assert_eq!(window_start(Some(99 * hour), 100 * hour, &config), from);
        assert_eq!(window_start(Some(99 * hour), 105 * hour, &config), from);
    }
}
