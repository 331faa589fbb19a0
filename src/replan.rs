//! `hookrelay replay --replan`: a stored webhook run through the rules as they are now.
//!
//! After a rule is fixed, the webhook that found nothing to do (or the wrong thing) can be
//! planned again without asking the sender to redeliver (a redelivery is a duplicate, and
//! is ignored). The new triggers belong to a new delivery named after the original
//! (`ID~replan-…`), whose answer records `replan_of`, so `deliveries` shows both.

use std::path::Path;

use crate::hooks::QueuedEntry;
use crate::outbox::{Accepted, DeliveryRow, ListFilter, NewDelivery, OfflineStore};
use crate::sources::{self, Outcome, Verification, WebhookRequest};
use crate::store::StoreLocation;

/// What a replan queued, or in a dry run would queue.
pub struct Replanned {
    pub original: String,
    /// The delivery recorded for it; `None` in a dry run.
    pub delivery_id: Option<String>,
    /// `(trigger id, rule, project, ref)` per trigger; no id in a dry run.
    pub triggers: Vec<(Option<i64>, String, String, String)>,
}

impl Replanned {
    /// The new delivery's id, or what stands for it in a dry run.
    pub fn delivery(&self) -> &str {
        self.delivery_id.as_deref().unwrap_or("(none: dry run)")
    }

    /// The queued triggers' ids (none in a dry run).
    pub fn trigger_ids(&self) -> Vec<i64> {
        self.triggers.iter().filter_map(|t| t.0).collect()
    }

    /// `{"delivery_id", "as", "triggers": [{"id", "rule", "project", "ref"}]}`; no `as`
    /// nor trigger ids in a dry run, which records nothing.
    pub fn to_json(&self) -> serde_json::Value {
        let triggers: Vec<serde_json::Value> = self
            .triggers
            .iter()
            .map(|(id, rule, project, git_ref)| {
                let mut trigger =
                    serde_json::json!({ "rule": rule, "project": project, "ref": git_ref });
                if let Some(id) = id {
                    trigger["id"] = (*id).into();
                }
                trigger
            })
            .collect();
        let mut json = serde_json::json!({ "delivery_id": self.original, "triggers": triggers });
        if let Some(id) = &self.delivery_id {
            json["as"] = id.as_str().into();
        }
        json
    }
}

/// What replans did, as JSON for scripts (the dashboard's API and `replay --json`):
/// `{"message", "planned" (a dry run: "would_plan"), "left_out"}`.
pub fn replans_json(
    mode: Mode,
    message: &str,
    replanned: &[Replanned],
    left_out: &[String],
) -> serde_json::Value {
    let planned = match mode {
        Mode::Record => "planned",
        Mode::DryRun => "would_plan",
    };
    let replanned: Vec<serde_json::Value> = replanned.iter().map(Replanned::to_json).collect();
    serde_json::json!({ "message": message, planned: replanned, "left_out": left_out })
}

/// Whether a replan records what it plans, or only says it (`--dry-run`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Record,
    DryRun,
}

/// The configuration at `config_path` (tokens kept by reference: the relay that sends
/// reads them) and the store it, `state` and `store` name: what a replan from the command
/// line runs with.
pub fn configured(
    config_path: &Path,
    state: &Path,
    store: Option<&str>,
) -> Result<(crate::config::Config, StoreLocation), String> {
    let config = crate::config::load_without_secrets(config_path)
        .map_err(|problems| problems.to_string())?;
    let location = StoreLocation::choose(state, store, config.store.clone())?;
    Ok((config, location))
}

/// Reads the stored webhook `delivery` (an id or its unique start; with a source, that
/// source's webhook of that whole id), runs it through the configuration at
/// `config_path` and records what it plans as a new delivery.
pub fn replan(
    config_path: &Path,
    state: &Path,
    store: Option<&str>,
    delivery: (Option<&str>, &str),
    mode: Mode,
    only_rule: Option<&str>,
) -> Result<Replanned, String> {
    let (config, location) = configured(config_path, state, store)?;
    replan_with(
        &config,
        &config_path.display().to_string(),
        &location,
        delivery,
        mode,
        only_rule,
    )
}

/// [`replan`] with a configuration already loaded (`named` says where it came from, for
/// messages) against the store at `location`: the dashboard's "replay through today's
/// rules".
pub fn replan_with(
    config: &crate::config::Config,
    named: &str,
    location: &StoreLocation,
    delivery: (Option<&str>, &str),
    mode: Mode,
    only_rule: Option<&str>,
) -> Result<Replanned, String> {
    knows_rule(config, named, only_rule)?;
    let mut store = OfflineStore::open(location).map_err(|err| err.to_string())?;
    let plan = plan(config, named, &mut store, delivery, mode, only_rule)?;
    record(&mut store, vec![plan])
        .map_err(|err| err.to_string())?
        .pop()
        .expect("one plan has one outcome")
}

/// Refuses a rule to replan through that `config` does not have.
fn knows_rule(
    config: &crate::config::Config,
    named: &str,
    rule: Option<&str>,
) -> Result<(), String> {
    match rule {
        Some(rule) if !config.rules.rules().iter().any(|r| r.name() == rule) => {
            // A name from a request is repeated cut to a length.
            let rule = crate::clipped::Clipped(rule);
            Err(format!("{named} has no rule named \"{rule}\""))
        }
        _ => Ok(()),
    }
}

/// A stored webhook planned again, not recorded yet.
struct Plan {
    original: String,
    /// The delivery that records it; `None` in a dry run.
    delivery: Option<NewDelivery>,
    queued: Vec<QueuedEntry>,
}

/// The stored webhook `delivery` (of its source, if given; else the newest with that id
/// or a unique start of one) run through `config`'s rules (only `only_rule`, known to be
/// in `config`, if given), or why it still starts nothing.
fn plan(
    config: &crate::config::Config,
    named: &str,
    store: &mut OfflineStore,
    delivery: (Option<&str>, &str),
    mode: Mode,
    only_rule: Option<&str>,
) -> Result<Plan, String> {
    let stored = match delivery {
        (Some(source), id) => store.stored_webhook_from(source, id),
        (None, id) => store.stored_webhook(id),
    }
    .map_err(|err| err.to_string())?;
    let source = config.sources.get(&stored.source).ok_or_else(|| {
        format!(
            "delivery {} came from source {:?}, which {} no longer configures",
            stored.delivery_id, stored.source, named
        )
    })?;
    let headers = crate::explain::stored_request_headers(&stored.headers);
    let mut received = sources::receive(
        source,
        &WebhookRequest {
            headers: &headers,
            body: &stored.body,
        },
        Verification::Skip,
    )
    .map_err(|err| format!("delivery {}: {err}", stored.delivery_id))?;
    received.restore_compared(&stored.compared);
    let events = match &received.outcome {
        Outcome::Events(events) => events,
        Outcome::Ping(_) => {
            return Err(format!(
                "delivery {} is a ping; there is nothing to run",
                stored.delivery_id
            ));
        }
        Outcome::Skipped(note) => return Err(format!("delivery {}: {note}", stored.delivery_id)),
        Outcome::Pipeline(_) => {
            return Err(format!(
                "delivery {} is a GitLab pipeline event; it moves a commit status and starts nothing",
                stored.delivery_id
            ));
        }
    };
    // The `?ref=` it arrived with builds every trigger again, if the source still allows it.
    let url_ref = stored
        .url_ref
        .as_deref()
        .map(|text| {
            let git_ref = crate::git_ref::GitRef::parse(text).map_err(|err| err.to_string())?;
            source.allows_url_ref(&git_ref)?;
            Ok(git_ref)
        })
        .transpose()
        .map_err(|reason: String| {
            format!(
                "delivery {} arrived with ?ref={}, which builds every trigger of it, but the configuration in {named} does not take it now: {reason}",
                stored.delivery_id,
                stored.url_ref.as_deref().unwrap_or_default(),
            )
        })?;
    let mut planned = Vec::new();
    let mut problems = Vec::new();
    let chosen = |rule: &str| only_rule.is_none_or(|only| only == rule);
    for event in events {
        let found: Vec<_> = config
            .rules
            .plan(event, url_ref.as_ref())
            .into_iter()
            .filter(|plan| chosen(&plan.rule))
            .collect();
        if found.is_empty() {
            for (rule, why) in config.rules.verdicts(event) {
                if let Some(why) = why.filter(|_| chosen(rule.name())) {
                    problems.push(format!("{}: {why}", rule.name()));
                }
            }
        }
        planned.extend(found);
    }
    // Built as a webhook's triggers are: the same entries, windows and errors.
    let built = crate::hooks::build(config, source, &received, planned);
    for error in &built.errors {
        problems.push(format!(
            "{}: {}",
            error["rule"].as_str().unwrap_or_default(),
            error["error"].as_str().unwrap_or_default()
        ));
    }
    let (triggers, queued) = (built.triggers, built.queued);
    if triggers.is_empty() {
        let (rules, none) = match only_rule {
            Some(rule) => (
                format!("rule {rule:?}"),
                format!("rule {rule:?} does not react to source {}", source.name),
            ),
            None => (
                "the rules".to_owned(),
                format!("source {} has no rules", source.name),
            ),
        };
        return Err(format!(
            "delivery {} still starts nothing with {rules} in {named}: {}",
            stored.delivery_id,
            if problems.is_empty() {
                none
            } else {
                problems.join("; ")
            }
        ));
    }
    if mode == Mode::DryRun {
        return Ok(Plan {
            original: stored.delivery_id,
            delivery: None,
            queued,
        });
    }
    let delivery_id = format!(
        "{}{REPLAN_MARK}{}",
        stored.delivery_id,
        crate::outbox::now_ms()
    );
    let mut summary = crate::hooks::reply(&source.name, &received);
    summary.replan_of = Some(&stored.delivery_id);
    summary.url_ref = url_ref.as_ref().map(crate::git_ref::GitRef::as_str);
    summary.triggers = Some(queued.clone());
    let delivery = NewDelivery {
        source: source.name.clone(),
        delivery_id,
        event_type: received.event_type.clone(),
        headers: stored.headers.clone(),
        body: crate::store::StoredBody::encode(stored.body.clone()),
        summary: summary.to_json(),
        triggers,
    };
    Ok(Plan {
        original: stored.delivery_id,
        delivery: Some(delivery),
        queued,
    })
}

/// Records `plans` (all of one [`Mode`]) in one transaction, and says what each queued;
/// a dry run's are said, not recorded.
fn record(
    store: &mut OfflineStore,
    mut plans: Vec<Plan>,
) -> Result<Vec<Result<Replanned, String>>, crate::outbox::StoreError> {
    let deliveries: Vec<NewDelivery> = plans
        .iter_mut()
        .filter_map(|plan| plan.delivery.take())
        .collect();
    if deliveries.is_empty() {
        return Ok(plans
            .into_iter()
            .map(|plan| Ok(replanned(plan, None, Vec::new())))
            .collect());
    }
    let accepted = store.accept_all(&deliveries)?;
    Ok(plans
        .into_iter()
        .zip(deliveries)
        .zip(accepted)
        .map(|((plan, delivery), accepted)| {
            let Accepted::Queued { trigger_ids, .. } = accepted else {
                return Err(format!(
                    "delivery {} is already in the store",
                    delivery.delivery_id
                ));
            };
            Ok(replanned(plan, Some(delivery.delivery_id), trigger_ids))
        })
        .collect())
}

/// What `plan` queued as the delivery `delivery_id`, its triggers numbered
/// `trigger_ids` in order (none in a dry run).
fn replanned(plan: Plan, delivery_id: Option<String>, trigger_ids: Vec<i64>) -> Replanned {
    let ids = trigger_ids
        .into_iter()
        .map(Some)
        .chain(std::iter::repeat(None));
    Replanned {
        original: plan.original,
        delivery_id,
        triggers: ids
            .zip(plan.queued)
            .map(|(id, entry)| (id, entry.rule, entry.project, entry.git_ref))
            .collect(),
    }
}

/// Which stored webhooks a replan of a window runs through today's rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replans {
    /// `replay --failed --replan`: webhooks with a trigger that failed for good (after a
    /// rule's project or ref was fixed). One that also has a trigger sent or still under
    /// way is left out: replanning it would start that pipeline again.
    Failed,
    /// `replay --unmatched`: webhooks that started nothing because no rule matched them or
    /// a matching rule's trigger could not be built (after a rule was added or fixed).
    /// Pings, events the source does not act on, duplicates and refusals are not theirs.
    Unmatched,
    /// `replay --replan --rule NAME --since …`: every webhook of the window through that
    /// one rule (a rule added since, or one that should have matched: a backfill), the
    /// other rules left out, so what they started is not started again. A webhook with a
    /// trigger of that rule already is left out.
    Rule,
}

impl Replans {
    /// The command that asks for it, for messages.
    pub fn command(self) -> &'static str {
        match self {
            Replans::Failed => "hookrelay replay --failed --replan",
            Replans::Unmatched => "hookrelay replay --unmatched",
            Replans::Rule => "hookrelay replay --replan --rule",
        }
    }
}

/// Why a window could not be replanned.
#[derive(Debug)]
pub enum WindowError {
    /// It holds [`MOST_READ`] rows or more: to be narrowed.
    TooWide(String),
    /// The store could not be read or written.
    Store(String),
    /// The rule to run the window through is not in the configuration.
    NoSuchRule(String),
}

impl std::fmt::Display for WindowError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WindowError::TooWide(message)
            | WindowError::Store(message)
            | WindowError::NoSuchRule(message) => f.write_str(message),
        }
    }
}

/// Rows one window's replan (or `replay --failed`) reads; a window holding more is to be
/// narrowed.
pub const MOST_READ: usize = 20_000;

/// The rows `filter` selects, at most [`MOST_READ`].
pub fn rows_in_window(
    location: &StoreLocation,
    filter: ListFilter,
) -> Result<Vec<DeliveryRow>, WindowError> {
    let mut store = OfflineStore::open(location).map_err(WindowError::from)?;
    rows_of_window(&mut store, filter)
}

fn rows_of_window(
    store: &mut OfflineStore,
    filter: ListFilter,
) -> Result<Vec<DeliveryRow>, WindowError> {
    let filter = ListFilter {
        limit: MOST_READ,
        ..filter
    };
    let rows = store.list(&filter)?;
    if rows.len() >= MOST_READ {
        return Err(WindowError::TooWide(format!(
            "the window holds {MOST_READ} or more rows; narrow it (since, source, rule, project)"
        )));
    }
    Ok(rows)
}

impl From<crate::outbox::StoreError> for WindowError {
    fn from(err: crate::outbox::StoreError) -> WindowError {
        WindowError::Store(err.to_string())
    }
}

/// What a replan's delivery id carries after its webhook's: `ID~replan-…`.
const REPLAN_MARK: &str = "~replan-";

/// Webhooks a window's replan records in one transaction: one commit (and flush) for
/// many, while a relay beside it waits for the store's write lock a few milliseconds at
/// most.
const RECORDED_TOGETHER: usize = 64;

/// What a replan of a window did: each webhook planned again, and each left out with why.
pub struct WindowReplanned {
    pub which: Replans,
    pub mode: Mode,
    pub replanned: Vec<Replanned>,
    pub left_out: Vec<String>,
}

impl WindowReplanned {
    /// As JSON: see [`replans_json`].
    pub fn to_json(&self) -> serde_json::Value {
        replans_json(self.mode, &self.summary(), &self.replanned, &self.left_out)
    }

    /// One sentence for the whole.
    pub fn summary(&self) -> String {
        match (self.replanned.len(), self.left_out.len()) {
            (0, 0) => format!(
                "{}; nothing planned again",
                match self.which {
                    Replans::Failed => "no webhook's trigger failed for good in that window",
                    Replans::Unmatched => "no webhook in that window matched no rule",
                    Replans::Rule => "no webhook in that window",
                }
            ),
            (0, _) if self.mode == Mode::DryRun => "nothing would be planned again".to_owned(),
            (0, _) => "nothing planned again".to_owned(),
            (n, _) if self.mode == Mode::DryRun => format!(
                "{n} webhook{} would be planned again; nothing was recorded (dry run)",
                if n == 1 { "" } else { "s" }
            ),
            (n, _) => format!(
                "{n} webhook{} planned again; a running relay sends their triggers within a second",
                if n == 1 { "" } else { "s" }
            ),
        }
    }
}

/// Every stored webhook in `filter`'s window that `which` selects, run through the rules
/// of `config` (`named` says where it came from), unless it was replanned already: asking
/// twice plans nothing twice. A webhook that still starts nothing is left out with the
/// reason and nothing is recorded for it, so the same window can be replanned again after
/// the next fix.
pub fn replan_window(
    config: &crate::config::Config,
    named: &str,
    location: &StoreLocation,
    filter: ListFilter,
    which: Replans,
    mode: Mode,
    only_rule: Option<&str>,
) -> Result<WindowReplanned, WindowError> {
    knows_rule(config, named, only_rule).map_err(WindowError::NoSuchRule)?;
    // The replans recorded since the window began: those of its webhooks among them (a
    // replan comes after its webhook). One read, where a read of each webhook's replans
    // by the start of their ids would read every delivery stored, once a webhook.
    let replans_since = ListFilter {
        kind: Some(crate::store::DeliveryKind::Webhook),
        source: filter.source.clone(),
        since: filter.since,
        text: Some(REPLAN_MARK.to_owned()),
        ..ListFilter::default()
    };
    let filter = ListFilter {
        kind: Some(crate::store::DeliveryKind::Webhook),
        state: match which {
            Replans::Failed => Some(crate::store::StateFilter::Failed),
            Replans::Unmatched => Some(crate::store::StateFilter::None),
            Replans::Rule => None,
        },
        ..filter
    };
    let mut store = OfflineStore::open(location)?;
    let rows = rows_of_window(&mut store, filter)?;
    let mut replans: std::collections::HashMap<(String, String), Vec<DeliveryRow>> =
        std::collections::HashMap::new();
    for row in rows_of_window(&mut store, replans_since)? {
        // Under each webhook it descends from: `X~replan-1~replan-2` is a replan of
        // `X~replan-1` (whose trigger failed) and so of `X` too.
        for (at, _) in row.delivery_id.match_indices(REPLAN_MARK) {
            let ancestor = (row.source.clone(), row.delivery_id[..at].to_owned());
            replans.entry(ancestor).or_default().push(row.clone());
        }
    }
    let unmatched = |row: &DeliveryRow| {
        row.state.is_none()
            && matches!(
                crate::delivery_rows::row_state(row).0.as_str(),
                "no match" | "error"
            )
    };
    let mut candidates: Vec<(String, String)> = rows
        .iter()
        .filter(|row| match which {
            Replans::Failed => row.kind.as_deref() == Some("trigger"),
            Replans::Unmatched => unmatched(row) && !row.delivery_id.contains(REPLAN_MARK),
            // Webhooks as their senders sent them (not the records of replans, duplicates
            // or refusals), that were acted on or matched nothing: not pings, nor events
            // the source does not act on.
            Replans::Rule => {
                !row.delivery_id.contains('~')
                    && (row.kind.as_deref() == Some("trigger") || unmatched(row))
            }
        })
        .map(|row| (row.source.clone(), row.delivery_id.clone()))
        .collect();
    candidates.sort();
    candidates.dedup();
    let mut done = WindowReplanned {
        which,
        mode,
        replanned: Vec::new(),
        left_out: Vec::new(),
    };
    for chunk in candidates.chunks(RECORDED_TOGETHER) {
        let mut plans = Vec::new();
        for candidate in chunk {
            let (source, id) = candidate;
            // Its own rows, found by its whole id.
            let own = store.list(&ListFilter::of_webhook(source, id, MOST_READ))?;
            let its_replans = replans.get(candidate).map_or(&[][..], Vec::as_slice);
            match planned_again(id, &own, its_replans, which, only_rule) {
                Some(reason) => done.left_out.push(reason),
                None => match plan(
                    config,
                    named,
                    &mut store,
                    (Some(source), id),
                    mode,
                    only_rule,
                ) {
                    Ok(plan) => plans.push(plan),
                    Err(message) => done.left_out.push(message),
                },
            }
        }
        for outcome in record(&mut store, plans)? {
            match outcome {
                Ok(replanned) => done.replanned.push(replanned),
                Err(message) => done.left_out.push(message),
            }
        }
    }
    Ok(done)
}

/// Why the webhook `id` (its rows `own`, its replans' rows `replans`) is not to be
/// planned again for `which`, if it is not: it was replanned already, it has
/// `only_rule`'s trigger already, or a trigger of it is sent or under way (replanning
/// would start that pipeline again).
fn planned_again(
    id: &str,
    own: &[DeliveryRow],
    replans: &[DeliveryRow],
    which: Replans,
    only_rule: Option<&str>,
) -> Option<String> {
    if which == Replans::Rule {
        let of_rule = own
            .iter()
            .chain(replans)
            .find(|row| row.kind.as_deref() == Some("trigger") && row.rule.as_deref() == only_rule);
        return of_rule.map(|row| {
            format!(
                "{id}: has trigger {} of rule {} already",
                row.trigger_id.unwrap_or_default(),
                only_rule.unwrap_or_default()
            )
        });
    }
    if let Some(replan) = replans.first() {
        return Some(format!(
            "{id}: replanned already, as {}",
            replan.delivery_id
        ));
    }
    let started = own.iter().find(|row| {
        row.kind.as_deref() == Some("trigger")
            && !matches!(row.state.as_deref(), Some("failed" | "cancelled"))
    });
    started.map(|row| {
        format!(
            "{id}: trigger {} is {} (replanning would start it again; `hookrelay replay --replan {id}` does it anyway)",
            row.trigger_id.unwrap_or_default(),
            row.state.as_deref().unwrap_or("unknown")
        )
    })
}
