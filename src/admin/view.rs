//! What the dashboard shows, read through the store interface (SQLite and PostgreSQL
//! alike) and the relay's own state; the pages and the JSON API render the same values.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Value, json};

use crate::app::App;
use crate::outbox::{DeliveryKind, DeliveryRow, ListFilter, StateFilter};
use crate::sources::{Outcome, Verification, WebhookRequest};
use crate::store::StoreLocation;

/// Rows read for one page of deliveries (a delivery with many triggers takes several).
const PAGE_ROWS: usize = 100;

/// A free-text search without `since` looks this far back: it reads every delivery in
/// its window (no index can serve text anywhere in an answer), so the window bounds it.
pub const TEXT_WINDOW: &str = "24h";

/// The list's filters, from a query string.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Filters {
    pub source: String,
    pub rule: String,
    pub project: String,
    pub state: String,
    pub kind: String,
    pub since: String,
    pub until: String,
    pub q: String,
    /// One trigger's row, with its delivery (the links of `merged into` and `replay of`).
    pub trigger: String,
    pub before: String,
}

impl Filters {
    pub fn parse(query: Option<&str>) -> Filters {
        let mut filters = Filters::default();
        for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            let value = value.trim().to_owned();
            match key.as_ref() {
                "source" => filters.source = value,
                "rule" => filters.rule = value,
                "project" => filters.project = value,
                "state" => filters.state = value,
                "kind" => filters.kind = value,
                "since" => filters.since = value,
                "until" => filters.until = value,
                "q" => filters.q = value,
                "trigger" => filters.trigger = value,
                "before" => filters.before = value,
                _ => {}
            }
        }
        filters
    }

    /// The store's filter, or what is wrong with one of these.
    pub fn to_list_filter(&self, now: i64) -> Result<ListFilter, String> {
        let text = |value: &String| (!value.is_empty()).then(|| value.clone());
        let time = |value: &String, name: &str| {
            text(value)
                .map(|v| {
                    crate::delivery_rows::parse_time(&v, now)
                        .map_err(|err| format!("{name}: {err}"))
                })
                .transpose()
        };
        let choice = |value: &String, name: &str| -> Result<Option<String>, String> {
            Ok(text(value).map(|v| v.to_lowercase())).and_then(|v| match v {
                Some(v) if !v.chars().all(|c| c.is_ascii_lowercase()) => {
                    Err(format!("{name}: {v:?} is not one of the choices"))
                }
                v => Ok(v),
            })
        };
        use clap::ValueEnum;
        /// `name: "v" is not one of: a, b, c`, the choices as the command line names them.
        fn one_of<T: ValueEnum>(name: &str, value: &str) -> Result<T, String> {
            T::from_str(value, true).map_err(|_| {
                let choices: Vec<String> = T::value_variants()
                    .iter()
                    .filter_map(|v| v.to_possible_value())
                    .map(|v| v.get_name().to_owned())
                    .collect();
                format!("{name}: {value:?} is not one of: {}", choices.join(", "))
            })
        }
        let state = choice(&self.state, "state")?
            .map(|v| one_of::<StateFilter>("state", &v))
            .transpose()?;
        let kind = choice(&self.kind, "kind")?
            .map(|v| one_of::<DeliveryKind>("kind", &v))
            .transpose()?;
        let before = match self.before.split_once('.') {
            None if self.before.is_empty() => None,
            Some((at, row)) => Some((
                at.parse()
                    .map_err(|_| "before: not a page cursor".to_owned())?,
                row.parse()
                    .map_err(|_| "before: not a page cursor".to_owned())?,
            )),
            None => return Err("before: not a page cursor".into()),
        };
        Ok(ListFilter {
            source: text(&self.source),
            rule: text(&self.rule),
            project: text(&self.project),
            state,
            kind,
            since: match (self.q.is_empty(), self.since.is_empty()) {
                (false, true) => time(&TEXT_WINDOW.to_owned(), "since")?,
                _ => time(&self.since, "since")?,
            },
            until: time(&self.until, "until")?,
            delivery: None,
            whole_delivery: None,
            text: text(&self.q),
            trigger: text(&self.trigger)
                .map(|id| {
                    id.parse::<i64>()
                        .map_err(|_| format!("trigger: {id:?} is not a trigger id"))
                })
                .transpose()?,
            before,
            limit: PAGE_ROWS,
        })
    }

    /// The query string of these filters with another page cursor.
    pub fn with_before(&self, before: &str) -> String {
        let mut query = form_urlencoded::Serializer::new(String::new());
        for (key, value) in [
            ("source", &self.source),
            ("rule", &self.rule),
            ("project", &self.project),
            ("state", &self.state),
            ("kind", &self.kind),
            ("since", &self.since),
            ("until", &self.until),
            ("q", &self.q),
            ("trigger", &self.trigger),
        ] {
            if !value.is_empty() {
                query.append_pair(key, value);
            }
        }
        if !before.is_empty() {
            query.append_pair("before", before);
        }
        query.finish()
    }
}

/// One trigger (or status post, or poll) of a delivery, as shown.
#[derive(Clone, Debug, Serialize)]
pub struct Work {
    pub id: i64,
    pub kind: String,
    pub rule: String,
    pub project: String,
    pub git_ref: String,
    pub state: String,
    pub attempts: i64,
    pub next: String,
    pub answer: String,
    pub pipeline_url: Option<String>,
    pub replay_of: Option<i64>,
    pub coalesced_into: Option<i64>,
    /// Waiting, so it can be cancelled.
    pub waiting: bool,
    /// The trigger ahead of it for the same upstream, project and ref, when it waits for one.
    pub waits_for: Option<i64>,
}

/// One delivery with its work, as shown.
#[derive(Clone, Debug, Serialize)]
pub struct Delivery {
    pub row: i64,
    pub received_at: i64,
    pub received: String,
    pub source: String,
    pub delivery_id: String,
    pub event_type: String,
    /// What the delivery came to, in a word or two.
    pub state: String,
    pub why: String,
    pub work: Vec<Work>,
}

fn time_text(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_default()
}

/// Store rows grouped by delivery, newest first.
fn group(rows: Vec<DeliveryRow>, now: i64) -> Vec<Delivery> {
    let mut deliveries: Vec<Delivery> = Vec::new();
    for row in rows {
        let (state, why) = crate::delivery_rows::row_state(&row);
        if deliveries.last().is_none_or(|d| d.row != row.row) {
            deliveries.push(Delivery {
                row: row.row,
                received_at: row.received_at,
                received: time_text(row.received_at),
                source: row.source.clone(),
                delivery_id: row.delivery_id.clone(),
                event_type: row.event_type.clone(),
                state: if row.trigger_id.is_some() {
                    String::new()
                } else {
                    state.clone()
                },
                why: if row.trigger_id.is_some() {
                    String::new()
                } else {
                    why.clone()
                },
                work: Vec::new(),
            });
        }
        let delivery = deliveries.last_mut().expect("pushed above");
        if let Some(id) = row.trigger_id {
            delivery.work.push(Work {
                id,
                kind: row.kind.clone().unwrap_or_else(|| "trigger".into()),
                rule: row.rule.clone().unwrap_or_default(),
                project: row.project.clone().unwrap_or_default(),
                git_ref: row.git_ref.clone().unwrap_or_default(),
                waiting: row.state.as_deref() == Some("queued"),
                next: crate::delivery_rows::next_attempt(&row, now).unwrap_or_default(),
                state,
                attempts: row.attempts,
                answer: why,
                pipeline_url: row.pipeline_url.clone(),
                replay_of: row.replay_of,
                coalesced_into: row.coalesced_into,
                waits_for: row.waits_for,
            });
        }
    }
    for delivery in &mut deliveries {
        // Oldest first within a delivery, as they were queued.
        delivery.work.reverse();
        if delivery.state.is_empty() {
            delivery.state = summarize(&delivery.work);
        }
    }
    deliveries
}

/// A delivery's state from its work: the least finished of its triggers.
fn summarize(work: &[Work]) -> String {
    let states: Vec<&str> = work.iter().map(|w| w.state.as_str()).collect();
    for wanted in ["sending", "retrying", "queued", "failed"] {
        if states.iter().any(|s| s.ends_with(wanted)) {
            return wanted.into();
        }
    }
    states.first().map_or_else(String::new, |s| s.to_string())
}

/// Where the dashboard reads the store.
pub fn location(app: &App) -> Result<StoreLocation, String> {
    app.outbox
        .location
        .clone()
        .ok_or_else(|| "this relay's store cannot be read beside it".to_owned())
}

/// One page of deliveries, and the cursor of the next (empty: none).
pub fn page(app: &App, filter: &ListFilter) -> Result<(Vec<Delivery>, String), String> {
    let rows = app
        .outbox
        .read(|engine| engine.list(filter))
        .map_err(|err| err.to_string())?;
    let full = rows.len() >= filter.limit;
    let mut deliveries = group(rows, crate::outbox::now_ms());
    // A full page may end partway through a delivery's rows: that one starts the next.
    if full && deliveries.len() > 1 {
        deliveries.pop();
    }
    let next = if full {
        deliveries
            .last()
            .map(|d| format!("{}.{}", d.received_at, d.row))
            .unwrap_or_default()
    } else {
        String::new()
    };
    Ok((deliveries, next))
}

/// Why a delivery's page cannot be shown, with the status to answer: `404` for a delivery
/// the store does not hold, `503` while the store cannot be read.
pub type DetailError = (http::StatusCode, String);

/// Everything about one delivery: its work, the stored webhook and what the rules make
/// of it today.
pub fn detail(app: &App, webhook: &Webhook) -> Result<Value, DetailError> {
    // Found by its id (or a unique start of one) first, then its rows by its whole id and
    // source, one seek each: a listing by the start of an id read every delivery in the
    // store, and could miss an id that starts 500 newer ones ("1" before "10", "11", …).
    // Where two sources sent the same id, the other source's rows are another webhook's.
    let id = webhook.id.as_str();
    let unreadable =
        |err: crate::outbox::StoreError| (http::StatusCode::SERVICE_UNAVAILABLE, err.to_string());
    let stored = match &webhook.source {
        None => app.outbox.stored(id),
        Some(source) => app.outbox.stored_from(source, id),
    };
    let stored = stored.map_err(|err| match err.refused {
        true => (
            http::StatusCode::NOT_FOUND,
            format!("no {} in the store", webhook.describe()),
        ),
        false => unreadable(err),
    })?;
    let filter = ListFilter::of_webhook(&stored.source, &stored.delivery_id, 500);
    let rows = app
        .outbox
        .read(|engine| engine.list(&filter))
        .map_err(unreadable)?;
    let summary: Value = rows
        .first()
        .and_then(|r| serde_json::from_str(&r.summary).ok())
        .unwrap_or(Value::Null);
    let Some(delivery) = group(rows, crate::outbox::now_ms()).into_iter().next() else {
        return Err((
            http::StatusCode::NOT_FOUND,
            format!("no {} in the store", webhook.describe()),
        ));
    };
    let stored = Some(stored);
    let runtime = app.runtime();
    let mut events = Vec::new();
    let mut headers = Vec::new();
    let mut body = String::new();
    if let Some(stored) = &stored {
        headers = stored.headers.clone();
        body = match serde_json::from_slice::<Value>(&stored.body) {
            Ok(json) => serde_json::to_string_pretty(&json).unwrap_or_default(),
            Err(_) => String::from_utf8_lossy(&stored.body).into_owned(),
        };
        if let Some(source) = runtime.config.sources.get(&stored.source) {
            let request_headers = crate::explain::stored_request_headers(&stored.headers);
            let received = crate::sources::receive(
                source,
                &WebhookRequest {
                    headers: &request_headers,
                    body: &stored.body,
                },
                Verification::Skip,
            )
            .map(|mut received| {
                received.restore_compared(&stored.compared);
                received
            });
            if let Ok(received) = &received
                && let Outcome::Events(found) = &received.outcome
            {
                for event in found {
                    let rules: Vec<Value> = runtime
                        .config
                        .rules
                        .verdicts(event)
                        .into_iter()
                        .map(|(rule, why)| {
                            json!({ "rule": rule.name(), "matched": why.is_none(), "reason": why })
                        })
                        .collect();
                    let mut shown = json!(crate::hooks::EventSummary {
                        rules,
                        ..crate::hooks::summary(event)
                    });
                    // What rules' `paths` read: a branch push's changed files, or why not known.
                    if event.kind == crate::event::EventKind::Push
                        && let Some(fields) = shown.as_object_mut()
                    {
                        event.changed_files().add_to(fields);
                    }
                    events.push(shown);
                }
            }
        }
    }
    Ok(json!({
        "delivery": delivery,
        "answer": summary,
        "events": events,
        "headers": headers,
        "body": body,
    }))
}

/// The relay at a glance.
pub fn health(app: &App) -> Value {
    let (depth, oldest) = match app.outbox.depth() {
        Ok((depth, age)) => (Some(depth), Some(age.as_secs())),
        Err(_) => (None, None),
    };
    let mut answers: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for ((upstream, class), counts) in app.metrics.recent_answers.last_hour() {
        let total: u32 = counts.iter().sum();
        answers.entry(upstream).or_default().push(json!({
            "class": class,
            "total": total,
            "per_minute": counts,
        }));
    }
    let refusing: Vec<Value> = app
        .metrics
        .recent_refusals
        .last_hour()
        .into_iter()
        .map(|((limit, _), counts)| {
            json!({
                "limit": limit,
                "last_5_minutes": counts[55..].iter().sum::<u32>(),
                "last_hour": counts.iter().sum::<u32>(),
            })
        })
        .collect();
    let now = std::time::Instant::now();
    let mut paused: Vec<Value> = app
        .holds
        .paused
        .lock()
        .expect("the paused map is never poisoned")
        .iter()
        .filter_map(|(key, until)| {
            let left = until.checked_duration_since(now)?;
            let (upstream, project) = key.split_once('\u{1f}').unwrap_or(("", key));
            Some(
                json!({ "upstream": upstream, "project": project, "seconds_left": left.as_secs() }),
            )
        })
        .collect();
    paused.sort_by_key(|p| p["project"].as_str().unwrap_or_default().to_owned());
    let down: Vec<Value> = app
        .holds
        .outages
        .current(now)
        .into_iter()
        .map(|(upstream, left)| json!({ "upstream": upstream, "seconds_left": left.as_secs() }))
        .collect();
    let reloaded = app.reloaded.lock().expect("never poisoned").clone();
    let runtime = app.runtime();
    // A line per hook of each source with `catch_up`.
    let catch_up: Vec<Value> = runtime
        .config
        .sources
        .values()
        .filter_map(|source| Some((source.name.as_str(), source.catch_up.as_ref()?)))
        .flat_map(|(source, config)| config.hooks.iter().map(move |hook| (source, hook)))
        .map(|(source, hook)| {
            let last = app.catch_up.of(source, hook).map(|pass| {
                json!({
                    "at": time_text(pass.at),
                    "redelivered": pass.redelivered,
                    "rejected": pass.rejected,
                    "not_redelivered": pass.not_redelivered,
                    "error": pass.error,
                })
            });
            json!({ "source": source, "hook": hook.shown(), "last_pass": last })
        })
        .collect();
    json!({
        "configuration": {
            "loaded": time_text(reloaded.loaded_at),
            "reload_failed": reloaded.failed.map(|(at, problems)| json!({
                "at": time_text(at),
                "problems": problems.lines().collect::<Vec<_>>(),
            })),
        },
        "store": app.outbox.health.problem(),
        "log_lines_dropped": crate::log_writer::lines_dropped(),
        "store_failover_risk": app.outbox.failover_risk,
        "outbox_depth": depth,
        "oldest_due_seconds": oldest,
        "answers": answers,
        "limits_refusing": refusing,
        "paused_projects": paused,
        "upstreams_down": down,
        "catch_up": catch_up,
    })
}

/// What the relay is configured to do, as it runs now (after the last reload): sources,
/// upstreams and rules. Secrets by reference only (`env:NAME`), and variables by name
/// only: a value written into a rule may be one.
pub fn configuration(app: &App) -> Value {
    let runtime = app.runtime();
    let config = &runtime.config;
    let now = chrono::Utc::now();
    let shown_patterns =
        |patterns: &Option<crate::rules::Patterns>| patterns.as_ref().map(|p| p.texts.clone());
    let rules: Vec<Value> = config
        .rules
        .rules()
        .iter()
        .map(|rule| {
            let spec = &rule.spec;
            let triggers: Vec<Value> = spec
                .triggers
                .iter()
                .map(|trigger| {
                    json!({
                        "upstream": trigger.upstream,
                        "project": trigger.project,
                        "ref": trigger.git_ref,
                        "token": trigger.token_ref.to_string(),
                        "variables": trigger.variables.iter().map(|(name, _)| name).collect::<Vec<_>>(),
                        "inputs": trigger.inputs.iter().map(|(name, _)| name).collect::<Vec<_>>(),
                    })
                })
                .collect();
            json!({
                "name": spec.name,
                "place": format!("{}:{}", spec.file.display(), spec.line),
                "sources": spec.sources,
                "events": spec.events.iter().map(|kind| kind.as_str()).collect::<Vec<_>>(),
                "repository": shown_patterns(&spec.repository),
                "refs": shown_patterns(&spec.refs),
                "refs_exclude": shown_patterns(&spec.refs_exclude),
                "paths": shown_patterns(&spec.paths),
                "paths_exclude": shown_patterns(&spec.paths_exclude),
                "skip_ci": spec.skip_ci,
                "when": spec.when.as_ref().map(|(expression, _)| expression),
                "schedule": spec.schedule.as_ref().map(|schedule| json!({
                    "cron": schedule.text,
                    "timezone": schedule.timezone.name(),
                    "next": schedule.next_after(now).map(|t| format!(
                        "{} ({})",
                        t.with_timezone(&schedule.timezone).format("%Y-%m-%d %H:%M:%S %Z"),
                        t.format("%H:%M:%S UTC")
                    )),
                })),
                "coalesce_seconds": spec.coalesce.map(|window| window.as_secs()),
                "triggers": triggers,
            })
        })
        .collect();
    let sources: Vec<Value> = config
        .sources
        .values()
        .map(|source| {
            json!({
                "name": source.name,
                "provider": source.provider.as_str(),
                "path": format!("/hooks/{}", source.name),
                "rules": config.rules.count_for_source(&source.name),
                "statuses_to": source.status.as_ref().map(|status| &status.api_url),
                "compares_with": source.compare.as_ref().map(|compare| &compare.api.api_url),
                "pipeline_events_of": source.pipelines_of,
                "secrets": source.secrets.len(),
                "allow_from": crate::config::networks::shown_with_github(&source.allow_from, source.allow_github_hooks),
            })
        })
        .collect();
    let upstreams: Vec<Value> = config
        .upstreams
        .values()
        .map(|upstream| {
            let url = upstream.base_url();
            let proxy = crate::outbound::Proxy::shown_for(&url).map(|proxy| proxy.shown);
            json!({ "name": upstream.name, "url": url, "proxy": proxy })
        })
        .collect();
    json!({
        "files": config.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
        "gateway": config.gateway.as_ref().map(|gateway| &gateway.upstream),
        "gateway_allow_from": config.gateway.as_ref().map(|gateway| crate::config::networks::shown(&gateway.allow_from)),
        "trusted_proxies": crate::config::networks::shown(&config.server.trusted_proxies),
        "sources": sources,
        "upstreams": upstreams,
        "rules": rules,
    })
}

/// A stored webhook as a page or an action names it: by its delivery id, and by the
/// source that sent it where two sources sent the same id (`?source=NAME`, which the
/// deliveries page's links carry). By the id alone, a page shows the newer webhook, a
/// replay takes both sources' triggers and a replan the newer webhook, as `hookrelay
/// replay` does.
#[derive(Clone)]
pub struct Webhook {
    pub id: String,
    pub source: Option<String>,
}

impl Webhook {
    /// The webhook `id` names, with the `source` of the request's `query` if it has one.
    pub(super) fn named(id: &str, query: Option<&str>) -> Webhook {
        let source = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
            .find(|(key, value)| key == "source" && !value.is_empty())
            .map(|(_, value)| value.into_owned());
        Webhook {
            id: id.to_owned(),
            source,
        }
    }

    /// `delivery ID`, and `from source NAME` where the source was named.
    pub(super) fn describe(&self) -> String {
        match &self.source {
            Some(source) => format!(
                "delivery {} from source {}",
                self.id,
                crate::clipped::Clipped(source)
            ),
            None => format!("delivery {}", self.id),
        }
    }

    /// Its page (`action` empty) or an action's path, with its source.
    pub(super) fn path(&self, action: &str) -> String {
        let mut path = format!("/deliveries/{}", super::respond::encode(&self.id));
        if !action.is_empty() {
            path = format!("{path}/{action}");
        }
        match &self.source {
            Some(source) => format!("{path}?source={}", super::respond::encode(source)),
            None => path,
        }
    }
}
