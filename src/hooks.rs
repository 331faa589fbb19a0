//! `POST /hooks/{source}`: a webhook from a configured source, verified, normalized, and
//! turned by the rules into trigger calls.
//!
//! The delivery and its triggers are committed to the outbox before the answer, so an
//! acknowledged webhook is never lost; a delivery id the source already sent is answered
//! `200` with `"duplicate": true` and queues nothing.
//! The answer (`202` when triggers were queued, else `200`) names the delivery, summarizes
//! each event and lists each trigger (rule, upstream, project, ref), or carries a note saying
//! why there is nothing to do (a ping, an event the source does not handle, a change another
//! webhook carries). Those are `200`: a sender must never retry them or count them as
//! failures (GitLab disables a webhook after four failures in a row). Only a bad signature
//! (`401`), a body that is not the sender's (`400`), or an unknown source (`404`) is an error.

use std::time::SystemTime;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use serde::Serialize;
use serde_json::{Value, json};

use crate::app::{App, Runtime};
use crate::error::{ApiError, json_response};
use crate::event::Event;
use crate::git_ref::GitRef;
use crate::outbox::{Accepted, NewDelivery, NewTrigger};
use crate::sources::{self, Outcome, Received, Verification, WebhookRequest};

/// Verifies and reads one webhook for the source named in the URL (looked up, and its
/// proof headers checked, by the server before the body was read), runs the rules, and
/// records the delivery with its triggers; answers once they are on disk. `?ref=` in the
/// URL overrides the target ref of every trigger. The stages, in the order of the data
/// flow: [`verify`] → [`plan`] → [`build`] → [`check_upstream_limits`] → [`record`] →
/// [`answer`].
pub async fn handle(
    app: &App,
    runtime: &Runtime,
    source: &sources::SourceConfig,
    parts: &http::request::Parts,
    body: &Bytes,
    room: Option<tokio::sync::OwnedSemaphorePermit>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let request = WebhookRequest {
        headers: &parts.headers,
        body,
    };
    let (mut received, url_ref) = verify(app, source, parts, &request)?;
    if let Outcome::Pipeline(event) = &received.outcome {
        check_source_limit(runtime, source, &received).await?;
        return pipeline_event(app, source, parts, &request, &received, event.clone()).await;
    }
    // A webhook a limit refuses is recorded as such (and the refusal answered).
    let refused = |received: &Received, err: ApiError| {
        turn_away(
            app,
            source,
            parts,
            &request,
            received,
            TurnedAway::Refused(&err),
        );
        err
    };
    check_source_limit(runtime, source, &received)
        .await
        .map_err(|err| refused(&received, err))?;
    compare(app, runtime, source, &mut received).await;
    let received = received;
    let (planned, unmatched) = plan(app, runtime, source, &received, url_ref.as_ref());
    let mut reply = reply(&source.name, &received);
    reply.url_ref = url_ref.as_ref().map(GitRef::as_str);
    explain_unmatched(&mut reply, runtime, source, unmatched);
    let built = build(&runtime.config, source, &received, planned);
    reply.errors = built.errors;
    if !already_stored_past_limits(app, runtime, source, &received, &built.triggers).await {
        check_upstream_limits(runtime, &built.triggers)
            .await
            .map_err(|err| refused(&received, err))?;
    }
    let delivery = webhook_record(source, parts, &request, &received, &reply, built.triggers);
    let accepted = record(app, delivery, room).await?;
    if matches!(accepted, Accepted::Duplicate { .. }) {
        turn_away(
            app,
            source,
            parts,
            &request,
            &received,
            TurnedAway::Duplicate,
        );
    }
    Ok(answer(
        app,
        source,
        &received,
        reply,
        built.queued,
        accepted,
    ))
}

/// Asks the source's forge which files each branch push changed, where the webhook does
/// not list them all and a rule's `paths` would read them ([`crate::compare`]); every push
/// of the webhook within one `compare.timeout`, and none of a webhook stored before.
async fn compare(
    app: &App,
    runtime: &Runtime,
    source: &sources::SourceConfig,
    received: &mut Received,
) {
    let (Some(config), Some(client)) = (&source.compare, runtime.compare.forge(&source.name))
    else {
        return;
    };
    let Outcome::Events(events) = &mut received.outcome else {
        return;
    };
    let asked = crate::compare::to_ask(events, config, &runtime.config.rules);
    if asked.is_empty() {
        return;
    }
    // A redelivery queues nothing (its record keeps the first answer): not asked again.
    let (name, delivery) = (source.name.clone(), received.delivery.clone());
    if app
        .outbox
        .read_apart(move |engine| engine.is_stored(&name, &delivery))
        .await
        .unwrap_or(false)
    {
        return;
    }
    crate::compare::ask_about(client, config, events, &asked).await;
    for &i in &asked {
        let event = &events[i];
        match &event.compared {
            Some(crate::event::Compared::Listed) => {
                app.metrics
                    .compare(&source.name, crate::metrics::CompareOutcome::Listed);
                tracing::info!(
                    source = %source.name,
                    delivery = %event.delivery,
                    git_ref = %event.git_ref,
                    files = event.files.as_ref().map_or(0, Vec::len),
                    "asked the forge which files the push changed"
                );
            }
            Some(crate::event::Compared::Failed(reason)) => {
                app.metrics
                    .compare(&source.name, crate::metrics::CompareOutcome::Failed);
                tracing::warn!(
                    source = %source.name,
                    delivery = %event.delivery,
                    git_ref = %event.git_ref,
                    %reason,
                    "could not ask the forge which files the push changed; its rules' path filters let it through"
                );
            }
            None => {}
        }
    }
}

/// Checks the signature and the URL's `?ref=`; reads the webhook into its events.
fn verify(
    app: &App,
    source: &sources::SourceConfig,
    parts: &http::request::Parts,
    request: &WebhookRequest<'_>,
) -> Result<(Received, Option<GitRef>), ApiError> {
    let url_ref = url_ref(parts.uri.query())?;
    let now = SystemTime::now();
    // Logged once, by the server, with the reason (and no more than its budget a second:
    // anyone can send these).
    let received =
        sources::receive(source, request, Verification::Check { now }).map_err(|err| {
            if matches!(err, sources::SourceError::Signature(_)) {
                app.metrics.signature_failure(&source.name);
            }
            ApiError::from(err)
        })?;
    if let Some(git_ref) = &url_ref {
        source.allows_url_ref(git_ref).map_err(|reason| {
            tracing::warn!(source = %source.name, delivery = %received.delivery, %reason, "webhook URL ref refused");
            ApiError::BadUrlRef(reason)
        })?;
    }
    Ok((received, url_ref))
}

/// The source's limit, when it rejects what is over it.
async fn check_source_limit(
    runtime: &Runtime,
    source: &sources::SourceConfig,
    received: &Received,
) -> Result<(), ApiError> {
    if let Some(limiter) = runtime.limits.source(&source.name)
        && limiter.limit.on_limit == crate::limits::OnLimit::Reject
        && let Err(refused) = limiter.check(&source.name).await
    {
        tracing::warn!(source = %source.name, delivery = %received.delivery, limit = %limiter.name, ?refused, "webhook not admitted by its limit");
        return Err(ApiError::limited(&limiter.name, refused));
    }
    Ok(())
}

/// Why a webhook was answered without queuing anything, for its record.
enum TurnedAway<'a> {
    Duplicate,
    Refused(&'a ApiError),
}

/// Records a webhook that was refused by a limit (with its body, so `replay --replan` can
/// run it later) or that repeated a delivery id (without), as a delivery of its own
/// (`ID~refused-…`, `ID~duplicate-…`) that queues nothing, so `deliveries` shows it. At
/// most one a second per source and kind is recorded, saying how many were not: a flood
/// must not become a flood of writes.
fn turn_away(
    app: &App,
    source: &sources::SourceConfig,
    parts: &http::request::Parts,
    request: &WebhookRequest<'_>,
    received: &Received,
    why: TurnedAway<'_>,
) {
    // A refused webhook keeps its body (a replan may run it); a duplicate's is stored already.
    let (kind, reason, body) = match why {
        TurnedAway::Duplicate => (
            "duplicate",
            format!(
                "delivery {} was received before; this one was acknowledged and queued nothing",
                received.delivery
            ),
            None,
        ),
        TurnedAway::Refused(err) => ("refused", err.to_string(), Some(request)),
    };
    let allowed = app
        .turned_away
        .lock()
        .expect("not poisoned")
        .allow((source.name.clone(), kind));
    let Some(not_recorded) = allowed else {
        return;
    };
    let mut summary = reply(&source.name, received);
    summary.turned_away = Some(json!({
        "as": kind,
        "reason": reason,
        "not_recorded_before": not_recorded,
    }));
    let body = body.map_or_else(Bytes::new, |request| {
        sources::storable_body(source, request)
    });
    // Few by the throttle above, so never waited for: dropped only when the writer is
    // tens of thousands of records behind.
    app.outbox.try_note(NewDelivery {
        source: source.name.clone(),
        delivery_id: format!("{}~{kind}-{}", received.delivery, crate::outbox::now_ms()),
        event_type: received.event_type.clone(),
        headers: stored_headers(&parts.headers, source),
        body: crate::store::StoredBody::encode(body),
        summary: summary.to_json(),
        triggers: Vec::new(),
    });
}

/// Most rules listed, with their reasons, for an event no rule matched.
const MAX_REASONS: usize = 20;

/// For one event that matched no rule: its index, and each of the source's rules (at most
/// [`MAX_REASONS`]) with the first reason it did not match, as `explain` words it.
struct Unmatched {
    event: usize,
    reasons: Vec<(String, String)>,
}

/// Runs the rules over each event; logs one line per event, with why nothing matched when
/// nothing did.
fn plan(
    app: &App,
    runtime: &Runtime,
    source: &sources::SourceConfig,
    received: &Received,
    url_ref: Option<&GitRef>,
) -> (Vec<crate::rules::Planned>, Vec<Unmatched>) {
    let mut planned = Vec::new();
    let mut unmatched = Vec::new();
    match &received.outcome {
        Outcome::Events(events) => {
            for (index, event) in events.iter().enumerate() {
                let triggers = runtime.config.rules.plan(event, url_ref);
                let mut counted: Vec<&str> = Vec::new();
                for planned in &triggers {
                    if !counted.contains(&planned.rule.as_str()) {
                        counted.push(&planned.rule);
                        app.metrics.rule_matched(&planned.rule);
                    }
                }
                // Nothing matched: each rule's first reason, for the answer; the first
                // three for the log line.
                let why = triggers.is_empty().then(|| {
                    let reasons: Vec<(String, String)> = runtime
                        .config
                        .rules
                        .verdicts_bounded(event, MAX_REASONS)
                        .into_iter()
                        .filter_map(|(rule, why)| Some((rule.name().to_owned(), why?)))
                        .collect();
                    let said = if reasons.is_empty() {
                        format!("source {} has no rules", source.name)
                    } else {
                        reasons
                            .iter()
                            .take(3)
                            .map(|(rule, why)| format!("{rule}: {why}"))
                            .collect::<Vec<_>>()
                            .join("; ")
                    };
                    unmatched.push(Unmatched {
                        event: index,
                        reasons,
                    });
                    said
                });
                tracing::info!(
                    source = %source.name,
                    delivery = %received.delivery,
                    kind = event.kind.as_str(),
                    repository = %event.repository,
                    git_ref = %event.git_ref,
                    after = %event.after,
                    triggers = triggers.len(),
                    why = why.as_deref(),
                    "{}",
                    if why.is_some() { "webhook event matched no rule" } else { "webhook event" }
                );
                planned.extend(triggers);
            }
        }
        Outcome::Ping(_) => {
            tracing::info!(source = %source.name, delivery = %received.delivery, "webhook ping")
        }
        Outcome::Skipped(note) => tracing::info!(
            source = %source.name,
            delivery = %received.delivery,
            event_type = %received.event_type,
            note = %note,
            "webhook skipped"
        ),
        // Answered by `pipeline_event`; a pipeline event never runs the rules.
        Outcome::Pipeline(_) => {}
    }
    (planned, unmatched)
}

/// Puts why nothing ran into the answer (and so into the stored summary `deliveries`
/// reads): each unmatched event lists the source's rules with their first reasons, and
/// the answer's `note` says so when no event matched at all.
fn explain_unmatched(
    reply: &mut Reply<'_>,
    runtime: &Runtime,
    source: &sources::SourceConfig,
    unmatched: Vec<Unmatched>,
) {
    if unmatched.is_empty() {
        return;
    }
    let all = unmatched.len() == reply.events.len();
    let total = runtime.config.rules.count_for_source(&source.name);
    for Unmatched { event, reasons } in unmatched {
        if reasons.is_empty() {
            continue;
        }
        let listed: Vec<Value> = reasons
            .iter()
            .map(|(rule, reason)| json!({ "rule": rule, "reason": reason }))
            .collect();
        let shown = &mut reply.events[event];
        shown.rules = listed;
        if total > MAX_REASONS {
            shown.rules_not_shown = Some(total - MAX_REASONS);
        }
    }
    if all {
        reply.note = Some(if total == 0 {
            format!(
                "no rule matched: source {0} has no rules; add a [[rule]] with source = \"{0}\"",
                source.name
            )
        } else {
            format!(
                "no rule matched: each of source {}'s rules is listed under events[].rules with the first reason it did not match (`hookrelay explain` shows the same)",
                source.name
            )
        });
    }
}

/// The planned triggers made ready to store, with their entries for the answer and the
/// rules whose templates failed.
pub(crate) struct Built {
    pub triggers: Vec<NewTrigger>,
    pub queued: Vec<QueuedEntry>,
    pub errors: Vec<Value>,
}

/// A trigger as the answer lists it: what will be called, and once it is stored, its id
/// (and the waiting trigger it merged into, if it was coalesced).
#[derive(Clone, Debug, Serialize)]
pub struct QueuedEntry {
    pub rule: String,
    pub upstream: String,
    pub project: String,
    #[serde(rename = "ref")]
    pub git_ref: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coalesced_into: Option<i64>,
}

pub(crate) fn build(
    config: &crate::config::Config,
    source: &sources::SourceConfig,
    received: &Received,
    planned: Vec<crate::rules::Planned>,
) -> Built {
    let mut built = Built {
        triggers: Vec::new(),
        queued: Vec::new(),
        errors: Vec::new(),
    };
    for plan in planned {
        match plan.trigger {
            Ok(trigger) => {
                built.queued.push(QueuedEntry {
                    rule: plan.rule.clone(),
                    upstream: trigger.upstream.clone(),
                    project: trigger.project.to_string(),
                    git_ref: trigger.git_ref.as_str().to_owned(),
                    id: None,
                    coalesced_into: None,
                });
                // The rule's window, else the upstream's.
                let coalesce = plan.coalesce.or_else(|| {
                    config
                        .upstreams
                        .get(&trigger.upstream)
                        .and_then(|u| u.coalesce)
                });
                let target = status_target(
                    config,
                    source,
                    &trigger,
                    &plan.status_context,
                    plan.commit.clone(),
                )
                .map(|target| serde_json::to_string(&target).expect("a target serializes"));
                let mut queued = NewTrigger::queued(plan.rule, &trigger, &plan.token_ref, coalesce);
                queued.status_target = target;
                built.triggers.push(queued);
            }
            Err(error) => {
                tracing::warn!(source = %source.name, delivery = %received.delivery, rule = %plan.rule, %error, "trigger not built");
                built
                    .errors
                    .push(json!({ "rule": plan.rule, "error": error }));
            }
        }
    }
    built
}

/// Where the statuses of a planned trigger's pipeline go, when its source reports them.
pub(crate) fn status_target(
    config: &crate::config::Config,
    source: &sources::SourceConfig,
    trigger: &crate::trigger::Trigger,
    context: &str,
    commit: Option<(String, String)>,
) -> Option<crate::status::StatusTarget> {
    let status = source.status.as_ref()?;
    let (repository, sha) = commit?;
    let upstream = config.upstreams.get(&trigger.upstream);
    let base = upstream.map_or_else(String::new, crate::upstream::UpstreamConfig::base_url);
    let project = trigger.project.to_string();
    Some(crate::status::StatusTarget {
        source: source.name.clone(),
        forge: status.forge,
        api_url: status.api_url.clone(),
        token_ref: status.token_ref.to_string(),
        repository,
        sha,
        context: context.to_owned(),
        fallback_url: if project.parse::<u64>().is_ok() {
            base
        } else {
            format!("{base}/{project}")
        },
        poll_after_ms: upstream
            .filter(|u| u.read_token.is_some())
            .map_or(0, |u| u.poll_interval.as_millis().max(1) as u64),
    })
}

/// Whether the webhook is a repeat of one stored before, looked up only where an upstream
/// limit would refuse its triggers: a repeat queues nothing, so no limit applies to it and
/// it is answered as the duplicate it is. Otherwise a sender's redelivery of a webhook that
/// did its work (GitHub's "Redeliver") read `429`, and spent the project's budget. A store
/// that cannot be read counts as "not stored"; the record that follows says why.
async fn already_stored_past_limits(
    app: &App,
    runtime: &Runtime,
    source: &sources::SourceConfig,
    received: &Received,
    triggers: &[NewTrigger],
) -> bool {
    let limited = triggers.iter().any(|trigger| {
        runtime
            .limits
            .upstream_project(&trigger.upstream)
            .is_some_and(|l| l.limit.on_limit == crate::limits::OnLimit::Reject)
    });
    if !limited {
        return false;
    }
    let (name, delivery) = (source.name.clone(), received.delivery.clone());
    app.outbox
        .read_apart(move |engine| engine.is_stored(&name, &delivery))
        .await
        .unwrap_or(false)
}

/// An upstream limit that rejects refuses the webhook while a project has no room.
async fn check_upstream_limits(runtime: &Runtime, triggers: &[NewTrigger]) -> Result<(), ApiError> {
    for trigger in triggers {
        let limiter = runtime.limits.upstream_project(&trigger.upstream);
        if let Some(limiter) =
            limiter.filter(|l| l.limit.on_limit == crate::limits::OnLimit::Reject)
            && let Err(refused) = limiter.check(&trigger.project).await
        {
            return Err(ApiError::limited(&limiter.name, refused));
        }
    }
    Ok(())
}

/// Commits the delivery and its triggers; returns once they are on disk. `room`, the
/// body's under `[server] body_memory`, is held until then.
async fn record(
    app: &App,
    delivery: NewDelivery,
    room: Option<tokio::sync::OwnedSemaphorePermit>,
) -> Result<Accepted, ApiError> {
    confirmed(
        app.server.ack_timeout,
        app.outbox.accept_holding(delivery, room),
        || app.outbox.health.problem(),
    )
    .await
}

/// The store's answer to a webhook, waited for at most `within` (`[server] ack_timeout`).
/// A disk or database that stops answering raises no error, and the sender would wait
/// until it gave up (GitHub and GitLab after 10 s, a script perhaps for ever) and see
/// only a timeout; past `within` it is told the webhook is not acknowledged, and why
/// (`problem`: the store's trouble, if it knows one). The webhook stays queued for the
/// writer with its body's room, and is written and sent once the store answers again.
async fn confirmed<T>(
    within: std::time::Duration,
    answer: impl std::future::Future<Output = Result<T, crate::outbox::StoreError>>,
    problem: impl FnOnce() -> Option<String>,
) -> Result<T, ApiError> {
    match tokio::time::timeout(within, answer).await {
        Ok(answer) => answer.map_err(ApiError::Store),
        Err(_) => Err(ApiError::NotConfirmed {
            within,
            problem: problem(),
        }),
    }
}

/// Why a repeated delivery id queued nothing, and what runs it again.
fn duplicate_note(delivery: &str) -> String {
    format!(
        "delivery {delivery} was received before, so nothing was queued again (a redelivery never starts pipelines twice); to run it again: `hookrelay replay delivery:{delivery}` (its triggers as they were), `hookrelay replay --replan delivery:{delivery}` (through today's rules), or Replay on the dashboard"
    )
}

/// The answer once the delivery is on disk: `202` naming each queued trigger, `200` for a
/// duplicate or when nothing was queued; one log line per queued trigger.
fn answer(
    app: &App,
    source: &sources::SourceConfig,
    received: &Received,
    mut reply: Reply<'_>,
    mut queued: Vec<QueuedEntry>,
    accepted: Accepted,
) -> Response<Full<Bytes>> {
    let (trigger_ids, coalesced) = match accepted {
        Accepted::Duplicate { .. } => {
            tracing::info!(source = %source.name, delivery = %received.delivery, "duplicate delivery acknowledged; nothing queued");
            reply.duplicate = Some(true);
            // Senders show this answer beside their "Redeliver" button: say what would
            // run it again, since a redelivery never does (unless nothing would run
            // anyway, which its note already says).
            if reply.note.is_none() {
                reply.note = Some(duplicate_note(&received.delivery));
            }
            reply.triggers = Some(Vec::new());
            return json_response(StatusCode::OK, &reply);
        }
        Accepted::Queued {
            trigger_ids,
            coalesced,
            ..
        } => (trigger_ids, coalesced),
    };
    app.metrics.triggers(
        crate::metrics::TriggerOutcome::Queued,
        trigger_ids.len() as u64,
    );
    for ((entry, id), into) in queued.iter_mut().zip(&trigger_ids).zip(&coalesced) {
        tracing::info!(
            delivery = %received.delivery,
            source = %source.name,
            rule = %entry.rule,
            project = %entry.project,
            git_ref = %entry.git_ref,
            trigger = id,
            coalesced_into = into.map(|i| i.to_string()).as_deref().unwrap_or("-"),
            "trigger queued"
        );
        entry.id = Some(*id);
        entry.coalesced_into = *into;
    }
    let merged = coalesced.iter().filter(|c| c.is_some()).count() as u64;
    if merged > 0 {
        app.metrics
            .triggers(crate::metrics::TriggerOutcome::Coalesced, merged);
    }
    let status = if queued.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    reply.triggers = Some(queued);
    json_response(status, &reply)
}

/// A received webhook's record as the outbox keeps it: its ids, its headers without
/// secrets, its body as it may be stored, the answer it got, and what it queued.
fn webhook_record(
    source: &sources::SourceConfig,
    parts: &http::request::Parts,
    request: &WebhookRequest<'_>,
    received: &Received,
    reply: &Reply<'_>,
    triggers: Vec<NewTrigger>,
) -> NewDelivery {
    NewDelivery {
        source: source.name.clone(),
        delivery_id: received.delivery.clone(),
        event_type: received.event_type.clone(),
        headers: stored_headers(&parts.headers, source),
        body: crate::store::StoredBody::encode(sources::storable_body(source, request)),
        summary: reply.to_json(),
        triggers,
    }
}

/// Words that mark a header name as one that may carry a secret.
const SECRET_HEADER_WORDS: [&str; 8] = [
    "token",
    "signature",
    "secret",
    "authorization",
    "cookie",
    "password",
    "api-key",
    "apikey",
];

/// Header names that may carry a secret: never stored. `name` is lowercase, as
/// [`http::HeaderName`] keeps every name. One pass over the name finds any of the words
/// (eight `str::contains` each set up a searcher: 2,000 instructions a header).
fn is_secret_header(name: &str) -> bool {
    static WORDS: std::sync::LazyLock<aho_corasick::AhoCorasick> = std::sync::LazyLock::new(|| {
        aho_corasick::AhoCorasick::new(SECRET_HEADER_WORDS).expect("fixed words build")
    });
    WORDS.is_match(name)
}

/// The headers kept with a delivery (for replay and `explain` after the fact): everything
/// but signatures, tokens and credentials, including a generic source's own header.
fn stored_headers(
    headers: &http::HeaderMap,
    source: &crate::sources::SourceConfig,
) -> Vec<(String, String)> {
    let own = match &source.generic.scheme {
        crate::sources::GenericScheme::Hmac { header, .. }
        | crate::sources::GenericScheme::Token { header } => Some(header.to_ascii_lowercase()),
        _ => None,
    };
    headers
        .iter()
        .filter(|(name, _)| {
            !is_secret_header(name.as_str()) && own.as_deref() != Some(name.as_str())
        })
        .filter_map(|(name, value)| {
            Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned()))
        })
        .collect()
}

/// `?ref=` from a webhook URL, validated like every ref.
fn url_ref(query: Option<&str>) -> Result<Option<GitRef>, ApiError> {
    let Some(query) = query else { return Ok(None) };
    let Some((_, value)) = form_urlencoded::parse(query.as_bytes()).find(|(key, _)| key == "ref")
    else {
        return Ok(None);
    };
    GitRef::parse(&value)
        .map(Some)
        .map_err(|err| ApiError::BadUrlRef(err.to_string()))
}

/// The JSON answer for a received webhook; without its triggers, the summary stored with
/// the delivery (`deliveries` and the dashboard read it). Typed and borrowed from the
/// webhook, so answering costs one pass of writing JSON.
#[derive(Debug, Serialize)]
pub struct Reply<'a> {
    pub source: &'a str,
    pub delivery: &'a str,
    pub event_type: &'a str,
    pub events: Vec<EventSummary<'a>>,
    /// Why nothing ran, when nothing did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<Value>,
    /// Rules whose templates failed: `{"rule", "error"}`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duplicate: Option<bool>,
    /// Refused by a limit, or a repeated delivery id (in the record only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub turned_away: Option<Value>,
    /// The stored webhook a `replay --replan` ran again (in the record only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replan_of: Option<&'a str>,
    /// The webhook URL's `?ref=`, which every trigger built: kept with the delivery, so a
    /// replan (and `explain --delivery`) builds it again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url_ref: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub triggers: Option<Vec<QueuedEntry>>,
}

impl Reply<'_> {
    /// The reply as JSON text.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a reply serializes")
    }

    /// The reply as a JSON tree, for those who add what it has no field for.
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).expect("a reply serializes")
    }
}

/// The answer for a received webhook, before its rules ran.
pub fn reply<'a>(source: &'a str, received: &'a Received) -> Reply<'a> {
    let (events, note) = match &received.outcome {
        Outcome::Events(events) => (events.iter().map(summary).collect(), None),
        Outcome::Ping(_) => (
            Vec::new(),
            Some("ping received; the webhook reaches hookrelay".into()),
        ),
        Outcome::Skipped(note) => (Vec::new(), Some(note.clone())),
        Outcome::Pipeline(_) => (Vec::new(), None),
    };
    let pipeline = match &received.outcome {
        Outcome::Pipeline(pipeline) => Some(json!({
            "id": pipeline.pipeline_id,
            "status": pipeline.status,
            "project": pipeline.project_name(),
        })),
        _ => None,
    };
    Reply {
        source,
        delivery: &received.delivery,
        event_type: &received.event_type,
        events,
        note,
        pipeline,
        errors: Vec::new(),
        duplicate: None,
        turned_away: None,
        replan_of: None,
        url_ref: None,
        triggers: None,
    }
}

/// A GitLab pipeline event on a source tied to an upstream: recorded with the status post
/// it calls for in one commit, then answered `200` with what it did. An event for a
/// pipeline hookrelay did not start is answered with a note and writes nothing.
async fn pipeline_event(
    app: &App,
    source: &sources::SourceConfig,
    parts: &http::request::Parts,
    request: &WebhookRequest<'_>,
    received: &Received,
    event: crate::status::PipelineEvent,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let mut reply = reply(&source.name, received);
    let upstream = source.pipelines_of.clone().unwrap_or_default();
    let delivery = webhook_record(source, parts, request, received, &reply, Vec::new());
    let (pipeline, status) = (event.pipeline_id, event.status.clone());
    let applied = confirmed(
        app.server.ack_timeout,
        app.outbox.pipeline(crate::status::PipelineUpdate {
            upstream: upstream.clone(),
            event,
            delivery: Some(delivery),
        }),
        || app.outbox.health.problem(),
    )
    .await?;
    let note = applied.note();
    tracing::info!(source = %source.name, delivery = %received.delivery, %upstream, pipeline, %status, %note, "pipeline event");
    if matches!(applied, crate::status::Applied::Duplicate) {
        reply.duplicate = Some(true);
    }
    reply.note = Some(note);
    reply.triggers = Some(Vec::new());
    Ok(json_response(StatusCode::OK, &reply))
}

/// An event without its payload, as answers and the dashboard show it; `rules` lists
/// the source's rules with why each did not match, when none did.
#[derive(Debug, Serialize)]
pub struct EventSummary<'a> {
    pub kind: crate::event::EventKind,
    pub repository: &'a str,
    #[serde(rename = "ref")]
    pub git_ref: &'a str,
    pub ref_name: &'a str,
    pub before: &'a str,
    pub after: &'a str,
    pub pusher: &'a str,
    pub commit_count: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deleted_kind: Option<crate::event::RefType>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rules_not_shown: Option<usize>,
    /// What the forge said when asked which files the push changed (`compare`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compared: Option<crate::event::ComparedRecord>,
}

pub fn summary(event: &Event) -> EventSummary<'_> {
    EventSummary {
        kind: event.kind,
        repository: &event.repository,
        git_ref: &event.git_ref,
        ref_name: &event.ref_name,
        before: &event.before,
        after: &event.after,
        pusher: &event.pusher,
        commit_count: event.commit_count,
        deleted_kind: event.deleted_kind,
        rules: Vec::new(),
        rules_not_shown: None,
        compared: event.compared_record(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store that does not answer within the timeout: the webhook is told it is not
    /// acknowledged, with the store's trouble; one that answers in time is heard, errors
    /// included.
    #[tokio::test]
    async fn a_store_that_does_not_confirm_in_time_leaves_the_webhook_unacknowledged() {
        let within = std::time::Duration::from_millis(50);
        let never = std::future::pending::<Result<(), crate::outbox::StoreError>>();
        let err = confirmed(within, never, || {
            Some("its write under way has not finished for 7 s".into())
        })
        .await
        .unwrap_err();
        let response = crate::error::error_response(&err);
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let message = err.to_string();
        assert!(
            message.contains("did not confirm this webhook within 50ms ([server] ack_timeout): its write under way has not finished for 7 s, so it is not acknowledged"),
            "{message}"
        );
        let never = std::future::pending::<Result<(), crate::outbox::StoreError>>();
        let message = confirmed(within, never, || None)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("within 50ms ([server] ack_timeout), so it is not"),
            "{message}"
        );

        let failed = async {
            Err::<(), _>(crate::outbox::StoreError {
                place: String::new(),
                reason: "disk full".into(),
                refused: true,
            })
        };
        let err = confirmed(within, failed, || None).await.unwrap_err();
        assert!(matches!(err, ApiError::Store(_)), "{err}");
        assert_eq!(
            confirmed(within, async { Ok(7) }, || None).await.unwrap(),
            7
        );
    }

    /// A word anywhere in a name marks it, as `str::contains` would for each word.
    #[test]
    fn every_secret_word_is_found_anywhere_in_a_name() {
        for word in SECRET_HEADER_WORDS {
            for name in [
                word.to_owned(),
                format!("x-{word}"),
                format!("{word}-256"),
                format!("a{word}b"),
            ] {
                assert!(is_secret_header(&name), "{name}");
            }
        }
        for name in ["x-github-event", "content-type", "x-request-id", "host", ""] {
            assert!(!is_secret_header(name), "{name}");
        }
    }

    #[test]
    fn headers_that_may_carry_a_secret_are_not_stored() {
        let mut headers = http::HeaderMap::new();
        for (name, value) in [
            ("X-Hub-Signature-256", "sha256=00"),
            ("X-Gitlab-Token", "t"),
            ("Authorization", "Bearer t"),
            ("Cookie", "c=1"),
            ("X-Api-Key", "k"),
            ("X-GitHub-Event", "push"),
            ("X-GitHub-Delivery", "d-1"),
        ] {
            headers.insert(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                http::HeaderValue::from_static(value),
            );
        }
        let source = sources::fuzz::source(crate::event::Provider::Github);
        let kept: Vec<String> = stored_headers(&headers, &source)
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        assert_eq!(kept, ["x-github-event", "x-github-delivery"]);
    }
}
