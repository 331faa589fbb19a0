//! The commands that read and change the delivery store beside (or without) a running
//! relay: `deliveries` and its table, `replay`, `replay --replan`, `cancel` and `backup`.

use std::path::Path;
use std::process::ExitCode;

use crate::delivery_rows::{next_attempt, row_state};
use crate::outbox::{ListFilter, ReplayTarget};
use crate::replan::{Mode, Replans, WindowError};
use crate::store::StoreLocation;

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
    // On standard error, so that the table stays the whole of standard output.
    if rows
        .iter()
        .any(|row| matches!(row_state(row).0.as_str(), "no match" | "error"))
    {
        eprintln!(
            "hint: after fixing a rule, `hookrelay replay --unmatched --since …` runs the webhooks that matched no rule through it (--dry-run first shows what it would start)"
        );
    }
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

/// Where a replan from the command line reads its rules and its store, whether it records
/// what it plans, and whether it answers in lines or in JSON (`--json`, for scripts).
pub struct ReplanRun<'a> {
    pub config: &'a Path,
    pub state: &'a Path,
    pub store: Option<&'a str>,
    pub mode: Mode,
    pub json: bool,
}

/// `hookrelay replay --replan`: a stored webhook (`source`'s, when given) through the
/// current rules (in a dry run, what that would queue, recording nothing).
pub fn replan(
    run: &ReplanRun<'_>,
    delivery: &str,
    source: Option<&str>,
    only_rule: Option<&str>,
) -> ExitCode {
    let delivery = delivery.strip_prefix("delivery:").unwrap_or(delivery);
    let mode = run.mode;
    let replanned = crate::replan::replan(
        run.config,
        run.state,
        run.store,
        (source, delivery),
        mode,
        only_rule,
    );
    match replanned {
        Ok(replanned) => {
            let message = match mode {
                Mode::Record => "a running relay sends them within a second",
                Mode::DryRun => "nothing was recorded (dry run)",
            };
            if run.json {
                print_json(&crate::replan::replans_json(
                    mode,
                    message,
                    std::slice::from_ref(&replanned),
                    &[],
                ));
            } else {
                print_replanned(&replanned);
                println!("{message}");
            }
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

/// `message` on standard output; with `--json`, an object of it beside `key`'s `value`.
fn say(message: &str, json: bool, key: &str, value: serde_json::Value) {
    if json {
        print_json(&serde_json::json!({ "message": message, key: value }));
    } else {
        println!("{message}");
    }
}

/// `value` on standard output, as `deliveries --json` prints.
fn print_json(value: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("JSON serializes")
    );
}

/// What a replan queued (or in a dry run would queue), a line per trigger.
fn print_replanned(replanned: &crate::replan::Replanned) {
    match &replanned.delivery_id {
        Some(id) => println!(
            "delivery {} run through the current rules as delivery {id}:",
            replanned.original
        ),
        None => println!(
            "delivery {} would run through the current rules:",
            replanned.original
        ),
    }
    for (id, rule, project, git_ref) in &replanned.triggers {
        let trigger = id.map_or("a trigger".to_owned(), |id| format!("trigger {id}"));
        println!("  {trigger}: rule {rule} -> project {project}, ref {git_ref}");
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
pub fn cancel(store: &StoreLocation, target: &crate::outbox::CancelTarget, json: bool) -> ExitCode {
    let ids = match crate::outbox::cancel_offline(store, target) {
        Ok(ids) => ids,
        Err(err) => {
            eprintln!("hookrelay cancel: {err}");
            return ExitCode::FAILURE;
        }
    };
    let message = if ids.is_empty() {
        format!("{target}: no trigger is waiting; nothing to cancel")
    } else {
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
        format!("{what}; `hookrelay deliveries --status cancelled` lists them")
    };
    say(&message, json, "cancelled", serde_json::json!(ids));
    ExitCode::SUCCESS
}

/// `hookrelay replay ID`: queues a trigger, or every trigger of a delivery, again; with
/// `source`, the triggers of the webhook that source sent as ID (its whole id).
pub fn replay(store: &StoreLocation, target: &str, source: Option<&str>, json: bool) -> ExitCode {
    let (target, replayed) = match source {
        Some(source) => {
            let id = target.strip_prefix("delivery:").unwrap_or(target);
            (
                format!("delivery {id} from source {source}"),
                crate::outbox::replay_from_offline(store, source, id),
            )
        }
        None => {
            let target = ReplayTarget::parse(target);
            (
                target.to_string(),
                crate::outbox::replay_offline(store, &target),
            )
        }
    };
    match replayed {
        Ok(ids) => {
            let listed: Vec<String> = ids.iter().map(ToString::to_string).collect();
            let message = format!(
                "{target} queued again as trigger {}; a running relay sends it within a second",
                listed.join(", ")
            );
            say(&message, json, "queued", serde_json::json!(ids));
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("hookrelay replay: {err}");
            ExitCode::FAILURE
        }
    }
}

/// The rows `filter` selects for `replay --failed`: a window too wide to read is to be
/// narrowed (exit 2), and a store that cannot be read fails (exit 1); either is said on
/// standard error after `command`.
fn rows_in_window(
    store: &StoreLocation,
    filter: ListFilter,
    command: &str,
) -> Result<Vec<crate::outbox::DeliveryRow>, ExitCode> {
    crate::replan::rows_in_window(store, filter).map_err(|err| window_refused(command, &err))
}

/// Says why a window could not be read or replanned, after `command`: one too wide is to
/// be narrowed (exit 2), a store that failed is exit 1.
fn window_refused(command: &str, err: &WindowError) -> ExitCode {
    eprintln!(
        "{command}: {}",
        crate::terminal::escape_controls(&err.to_string())
    );
    match err {
        WindowError::TooWide(_) | WindowError::NoSuchRule(_) => ExitCode::from(2),
        WindowError::Store(_) => ExitCode::FAILURE,
    }
}

/// `hookrelay replay --failed`: every trigger that failed for good and that `filter`
/// selects, queued again (each a new trigger, linked to the one it replays), unless it was
/// replayed already: running the command twice queues nothing twice. Gateway calls are
/// their callers' to repeat, and status posts follow their pipelines: neither is replayed.
pub fn replay_failed(
    store: &StoreLocation,
    filter: ListFilter,
    mode: Mode,
    json: bool,
) -> ExitCode {
    let rows = match rows_in_window(store, filter, "hookrelay replay") {
        Ok(rows) => rows,
        Err(code) => return code,
    };
    let replayed: std::collections::BTreeSet<i64> =
        rows.iter().filter_map(|row| row.replay_of).collect();
    let mut failed: Vec<i64> = rows
        .iter()
        .filter(|row| {
            row.kind.as_deref() == Some("trigger")
                && row.source != "gateway"
                && row.state.as_deref() == Some("failed")
        })
        .filter_map(|row| row.trigger_id)
        .filter(|id| !replayed.contains(id))
        .collect();
    failed.sort_unstable();
    failed.dedup();
    if failed.is_empty() {
        let message = "no trigger failed for good in that window, or each was replayed already; nothing queued again";
        let queued = match mode {
            Mode::Record => "queued",
            Mode::DryRun => "would_queue",
        };
        say(message, json, queued, serde_json::json!([]));
        return ExitCode::SUCCESS;
    }
    if mode == Mode::DryRun {
        print_failed_dry_run(&rows, &failed, json);
        return ExitCode::SUCCESS;
    }
    let queued: Vec<(i64, i64)> = match crate::outbox::replay_triggers_offline(store, &failed) {
        Ok(replays) => replays
            .into_iter()
            .flat_map(|(id, new)| new.into_iter().map(move |new| (id, new)))
            .collect(),
        Err(err) => {
            eprintln!("hookrelay replay: {err}; nothing was queued again");
            return ExitCode::FAILURE;
        }
    };
    if json {
        let queued: Vec<serde_json::Value> = queued
            .iter()
            .map(|(old, new)| serde_json::json!({ "trigger": old, "as": new }))
            .collect();
        print_json(&serde_json::json!({
            "message": failed_message(queued.len(), "queued again; a running relay sends them within a second"),
            "queued": queued,
        }));
        return ExitCode::SUCCESS;
    }
    let shown: Vec<String> = queued
        .iter()
        .take(20)
        .map(|(old, new)| format!("{old} as {new}"))
        .collect();
    println!(
        "queued again {} failed trigger{}: {}{}; a running relay sends them within a second",
        queued.len(),
        if queued.len() == 1 { "" } else { "s" },
        shown.join(", "),
        if queued.len() > shown.len() {
            ", …"
        } else {
            ""
        }
    );
    ExitCode::SUCCESS
}

/// What `replay --failed --dry-run` would queue again: each of the `failed` triggers with
/// its rule, project, ref and last answer (the first 20 as lines; all of them as JSON).
fn print_failed_dry_run(rows: &[crate::outbox::DeliveryRow], failed: &[i64], json: bool) {
    // Each failed trigger's row, looked up once rather than searched for each trigger.
    let mut row_of = std::collections::HashMap::new();
    for row in rows {
        if let Some(id) = row.trigger_id {
            row_of.entry(id).or_insert(row);
        }
    }
    let failed_rows = failed.iter().filter_map(|id| row_of.get(id).copied());
    let message = failed_message(
        failed.len(),
        "would be queued again; nothing was recorded (dry run)",
    );
    if json {
        let would: Vec<serde_json::Value> = failed_rows
            .map(|row| {
                serde_json::json!({
                    "trigger": row.trigger_id,
                    "rule": row.rule,
                    "project": row.project,
                    "ref": row.git_ref,
                    "last_answer": row_state(row).1,
                })
            })
            .collect();
        print_json(&serde_json::json!({ "message": message, "would_queue": would }));
        return;
    }
    const SHOWN: usize = 20;
    for row in failed_rows.take(SHOWN) {
        println!(
            "  trigger {}: rule {} -> project {}, ref {}; {}",
            row.trigger_id.unwrap_or_default(),
            row.rule.as_deref().unwrap_or_default(),
            row.project.as_deref().unwrap_or_default(),
            row.git_ref.as_deref().unwrap_or_default(),
            crate::terminal::escape_controls(&row_state(row).1)
        );
    }
    if failed.len() > SHOWN {
        println!("  … and {} more", failed.len() - SHOWN);
    }
    println!("{message}");
}

/// `count` failed trigger(s) and what became of them.
fn failed_message(count: usize, done: &str) -> String {
    format!(
        "{count} failed trigger{} {done}",
        if count == 1 { "" } else { "s" }
    )
}

/// Lines of "left out" shown before the rest are counted: a window of a busy source may
/// hold thousands of webhooks that still match nothing.
const LEFT_OUT_SHOWN: usize = 20;

/// `hookrelay replay --failed --replan`, `replay --unmatched` and `replay --replan --rule`:
/// every stored webhook in `filter`'s window that `which` selects, run through today's
/// rules (`only_rule` alone, when given; see
/// [`crate::replan::replan_window`]), each planned or left out said on a line of its own.
pub fn replan_window(
    run: &ReplanRun<'_>,
    filter: ListFilter,
    which: Replans,
    only_rule: Option<&str>,
) -> ExitCode {
    let command = which.command();
    let (config, location) = match crate::replan::configured(run.config, run.state, run.store) {
        Ok(configured) => configured,
        Err(message) => {
            eprintln!("{command}: {}", crate::terminal::escape_controls(&message));
            return ExitCode::FAILURE;
        }
    };
    let done = match crate::replan::replan_window(
        &config,
        &run.config.display().to_string(),
        &location,
        filter,
        which,
        run.mode,
        only_rule,
    ) {
        Ok(done) => done,
        Err(err) => return window_refused(command, &err),
    };
    if run.json {
        print_json(&done.to_json());
        return ExitCode::SUCCESS;
    }
    for replanned in &done.replanned {
        print_replanned(replanned);
    }
    for why in done.left_out.iter().take(LEFT_OUT_SHOWN) {
        println!("left out: {}", crate::terminal::escape_controls(why));
    }
    if done.left_out.len() > LEFT_OUT_SHOWN {
        println!(
            "left out: {} more (`hookrelay deliveries{}` with the same window lists them)",
            done.left_out.len() - LEFT_OUT_SHOWN,
            match which {
                Replans::Failed => " --status failed",
                Replans::Unmatched => " --status none",
                Replans::Rule => " --kind webhook",
            }
        );
    }
    println!("{}", done.summary());
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
