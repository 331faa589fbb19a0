//! GitLab (GitLab.com and self-managed), project and system hooks.
//!
//! Proof: `X-Gitlab-Token` (the secret token, compared in constant time) when the source
//! has a `secret`, and GitLab's signing token when it has a `signing_secret`: Standard
//! Webhooks (`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64>`) with a
//! timestamp tolerance (default 5 minutes) against replays. Both are required when both
//! are configured. Event name: `X-Gitlab-Event`; delivery id: the signed `webhook-id` when
//! the source has a signing token, else `Idempotency-Key` (stable across GitLab's retries),
//! else `X-Gitlab-Event-UUID`.
//!
//! Which webhook carries which change: GitLab sends one webhook per change. `Push Hook`
//! carries branch pushes and branch deletions; `Tag Push Hook` carries tags and tag
//! deletions; a `System Hook` carries either, told apart by `event_name`. A change whose
//! `checkout_sha` is null is a deletion (GitLab sets it from the new revision, which a
//! deleted ref lacks); `after` is kept as sent. There is no ping: GitLab's "Test" sends a
//! real-looking push.

use serde::Deserialize;

use super::signature::{
    SignatureError, StandardWebhookHeaders, any_token_matches, verify_standard_webhook,
};
use super::{
    Outcome, Received, SourceConfig, SourceError, Verification, WebhookRequest, context,
    delivery_id, event_type, one_event, payload, text, typed,
};
use crate::event::{Commit, RefChange};

#[derive(Deserialize)]
struct Push {
    #[serde(rename = "ref")]
    git_ref: String,
    before: String,
    after: String,
    /// `Some(None)` when the key is present and null: the ref is gone.
    #[serde(default, deserialize_with = "present_or_null")]
    checkout_sha: Option<Option<String>>,
    user_username: Option<String>,
    user_name: Option<String>,
    project: Project,
    #[serde(default)]
    commits: Vec<super::PushCommit>,
    total_commits_count: Option<u64>,
}

fn present_or_null<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(deserializer).map(Some)
}

#[derive(Deserialize)]
struct Project {
    path_with_namespace: String,
    git_http_url: Option<String>,
    web_url: Option<String>,
}

#[derive(Deserialize)]
struct Kind {
    object_kind: Option<String>,
    event_name: Option<String>,
}

pub fn receive(
    source: &SourceConfig,
    request: &WebhookRequest<'_>,
    verification: Verification,
) -> Result<Received, SourceError> {
    if let Verification::Check { now } = verification {
        verify(source, request, now)?;
    }
    let event_type = event_type(request, "X-Gitlab-Event", source.provider)?;
    // With a signing token, the signed `webhook-id` is the delivery id (stable across
    // GitLab's retries): an unsigned `Idempotency-Key` must not make a replay look new.
    let delivery = if !source.signing_keys.is_empty() {
        delivery_id(request, &[super::signature::WEBHOOK_ID])
    } else {
        delivery_id(request, &["idempotency-key", "x-gitlab-event-uuid"])
    };
    let received = |outcome| Received {
        delivery: delivery.clone(),
        event_type: event_type.clone(),
        outcome,
    };
    if event_type == "Pipeline Hook" {
        // Pipeline events move statuses; they never start a pipeline (GitLab's loop guard).
        let outcome = match &source.pipelines_of {
            Some(_) => Outcome::Pipeline(
                crate::status::PipelineEvent::from_hook(request.body).map_err(|reason| {
                    SourceError::Payload(format!("GitLab Pipeline Hook: {reason}"))
                })?,
            ),
            None => Outcome::Skipped(format!(
                "GitLab pipeline events move commit statuses only on a source tied to the GitLab that runs the pipelines: add `upstream = \"NAME\"` to [source.{}]",
                source.name
            )),
        };
        return Ok(received(outcome));
    }
    if !matches!(
        event_type.as_str(),
        "Push Hook" | "Tag Push Hook" | "System Hook"
    ) {
        return Ok(received(Outcome::Skipped(format!(
            "GitLab event `{event_type}` is not handled; hookrelay acts on `Push Hook`, `Tag Push Hook` and their system-hook forms"
        ))));
    }
    let payload = payload(request.body.clone(), false);
    let kind: Kind = typed(&payload, "GitLab")?;
    let kind = kind.object_kind.or(kind.event_name).unwrap_or_default();
    if !matches!(kind.as_str(), "push" | "tag_push") {
        return Ok(received(Outcome::Skipped(format!(
            "GitLab {event_type} event `{kind}` is not handled; hookrelay acts on `push` and `tag_push`"
        ))));
    }
    let push: Push = typed(&payload, "GitLab push")?;
    let mut ctx = context(source, &delivery, payload.clone());
    ctx.repository = push.project.path_with_namespace;
    ctx.repository_url = text(&push.project.git_http_url);
    ctx.repository_web_url = text(&push.project.web_url);
    ctx.pusher = push.user_username.or(push.user_name).unwrap_or_default();
    let commits = push.commits.into_iter().map(Commit::from).collect();
    let outcome = one_event(
        &ctx,
        RefChange {
            full_ref: push.git_ref,
            before: push.before,
            after: push.after,
            deleted: matches!(push.checkout_sha, Some(None)),
            commits,
            commit_count: push.total_commits_count,
            // For a tag, GitLab's `checkout_sha` is the commit the tag points to.
            commit: push.checkout_sha.clone().flatten(),
            files: None,
        },
    )?;
    Ok(received(outcome))
}

/// The header GitLab puts the webhook's secret token in.
pub(super) const TOKEN_HEADER: &str = "X-Gitlab-Token";

fn verify(
    source: &SourceConfig,
    request: &WebhookRequest<'_>,
    now: std::time::SystemTime,
) -> Result<(), SourceError> {
    if !source.secrets.is_empty() {
        match request
            .headers
            .get(TOKEN_HEADER)
            .and_then(|v| v.to_str().ok())
        {
            None => {
                return Err(SignatureError::Missing {
                    header: TOKEN_HEADER.into(),
                }
                .into());
            }
            Some(token) if !any_token_matches(&source.secrets, token) => {
                return Err(SignatureError::Mismatch {
                    header: TOKEN_HEADER.into(),
                }
                .into());
            }
            Some(_) => {}
        }
    }
    if !source.signing_keys.is_empty() {
        let headers = StandardWebhookHeaders::of(request);
        verify_standard_webhook(
            &source.signing_keys,
            &headers,
            request.body,
            now,
            source.timestamp_tolerance,
        )?;
    }
    Ok(())
}
