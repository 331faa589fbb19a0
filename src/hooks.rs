//! `POST /hooks/{source}`: a webhook from a configured source, verified and normalized.
//!
//! The answer names the delivery and summarizes each event, or carries a note saying why
//! there is nothing to do (a ping, an event the source does not handle, a change another
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
use crate::server::App;
use crate::sources::{self, Outcome, Received, Verification, WebhookRequest};

/// Verifies and reads one webhook for the source named in the URL.
pub fn handle(
    app: &App,
    source_name: &str,
    headers: &http::HeaderMap,
    body: &Bytes,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let source = app
        .config
        .sources
        .get(source_name)
        .ok_or_else(|| ApiError::UnknownSource(source_name.to_owned()))?;
    let request = WebhookRequest { headers, body };
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
    match &received.outcome {
        Outcome::Events(events) => {
            for event in events {
                tracing::info!(
                    source = %source.name,
                    delivery = %received.delivery,
                    kind = event.kind.as_str(),
                    repository = %event.repository,
                    git_ref = %event.git_ref,
                    after = %event.after,
                    "webhook event"
                );
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
    Ok(json_response(
        StatusCode::OK,
        &reply(&source.name, &received),
    ))
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
