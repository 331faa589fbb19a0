//! `POST /hooks/{source}`: a webhook from a configured source, verified, normalized, and
//! turned by the rules into trigger calls.
//!
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
use serde_json::{Value, json};

use crate::error::{ApiError, json_response};
use crate::event::Event;
use crate::git_ref::GitRef;
use crate::server::Runtime;
use crate::sources::{self, Outcome, Received, Verification, WebhookRequest};
use crate::trigger::Trigger;

/// Verifies and reads one webhook for the source named in the URL, runs the rules, and
/// starts forwarding the triggers they produce. `?ref=` in the URL overrides the target ref
/// of every trigger.
pub fn handle(
    runtime: &Runtime,
    source_name: &str,
    parts: &http::request::Parts,
    body: &Bytes,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let source = runtime
        .config
        .sources
        .get(source_name)
        .ok_or_else(|| ApiError::UnknownSource(source_name.to_owned()))?;
    let url_ref = url_ref(parts.uri.query())?;
    let request = WebhookRequest {
        headers: &parts.headers,
        body,
    };
    let received = match sources::receive(
        source,
        &request,
        Verification::Check {
            now: SystemTime::now(),
        },
    ) {
        Ok(received) => received,
        Err(err) => {
            tracing::warn!(source = %source.name, provider = %source.provider, error = %err, "webhook refused");
            return Err(err.into());
        }
    };
    let mut planned = Vec::new();
    match &received.outcome {
        Outcome::Events(events) => {
            for event in events {
                let triggers = runtime.config.rules.plan(event, url_ref.as_ref());
                tracing::info!(
                    source = %source.name,
                    delivery = %received.delivery,
                    kind = event.kind.as_str(),
                    repository = %event.repository,
                    git_ref = %event.git_ref,
                    after = %event.after,
                    triggers = triggers.len(),
                    "webhook event"
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
    }
    let mut queued = Vec::new();
    let mut errors = Vec::new();
    for plan in planned {
        match plan.trigger {
            Ok(trigger) => {
                queued.push(json!({
                    "rule": plan.rule,
                    "upstream": trigger.upstream,
                    "project": trigger.project.to_string(),
                    "ref": trigger.git_ref.as_str(),
                }));
                forward_in_background(
                    runtime,
                    &received.delivery,
                    &source.name,
                    plan.rule,
                    trigger,
                );
            }
            Err(error) => {
                tracing::warn!(source = %source.name, delivery = %received.delivery, rule = %plan.rule, %error, "trigger not built");
                errors.push(json!({ "rule": plan.rule, "error": error }));
            }
        }
    }
    let mut reply = reply(&source.name, &received);
    reply["triggers"] = Value::Array(queued);
    if !errors.is_empty() {
        reply["errors"] = Value::Array(errors);
    }
    let status = if reply["triggers"].as_array().is_some_and(|t| !t.is_empty()) {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok(json_response(status, &reply))
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

/// Sends a trigger after the answer; the durable outbox replaces this (issue: durable delivery).
pub fn forward_in_background(
    runtime: &Runtime,
    delivery: &str,
    source: &str,
    rule: String,
    trigger: Trigger,
) {
    let Some(upstream) = runtime.upstreams.get(&trigger.upstream).cloned() else {
        tracing::error!(rule = %rule, upstream = %trigger.upstream, "trigger names an unknown upstream");
        return;
    };
    let delivery = delivery.to_owned();
    let source = source.to_owned();
    tokio::spawn(async move {
        match upstream.send(&trigger.upstream_call()).await {
            Ok(answer) if answer.status.is_success() => tracing::info!(
                %delivery, %source, %rule, project = %trigger.project, git_ref = %trigger.git_ref,
                token = %trigger.token, status = answer.status.as_u16(),
                pipeline = crate::upstream::readable_field(&answer.body, "web_url").as_deref().unwrap_or("-"),
                "trigger sent"
            ),
            Ok(answer) => tracing::warn!(
                %delivery, %source, %rule, project = %trigger.project, git_ref = %trigger.git_ref,
                token = %trigger.token, status = answer.status.as_u16(),
                gitlab_message = crate::upstream::readable_message(&answer.body).as_deref().unwrap_or("-"),
                "trigger refused by GitLab"
            ),
            Err(err) => {
                tracing::warn!(%delivery, %source, %rule, project = %trigger.project, error = %err, "trigger not sent")
            }
        }
    });
}

/// The JSON answer for a received webhook.
pub fn reply(source: &str, received: &Received) -> Value {
    let (events, note): (Vec<Value>, Option<String>) = match &received.outcome {
        Outcome::Events(events) => (events.iter().map(summary).collect(), None),
        Outcome::Ping(_) => (
            Vec::new(),
            Some("ping received; the webhook reaches hookrelay".into()),
        ),
        Outcome::Skipped(note) => (Vec::new(), Some(note.clone())),
    };
    let mut reply = json!({
        "source": source,
        "delivery": received.delivery,
        "event_type": received.event_type,
        "events": events,
    });
    if let Some(note) = note {
        reply["note"] = Value::String(note);
    }
    reply
}

/// An event without its payload, as answers and `explain --json` show it.
pub fn summary(event: &Event) -> Value {
    let mut value = json!({
        "kind": event.kind,
        "repository": event.repository,
        "ref": event.git_ref,
        "ref_name": event.ref_name,
        "before": event.before,
        "after": event.after,
        "pusher": event.pusher,
        "commit_count": event.commit_count,
    });
    if let Some(deleted) = event.deleted_kind {
        value["deleted_kind"] = json!(deleted);
    }
    value
}
