//! Gogs.
//!
//! Proof: `X-Gogs-Signature` (bare hex HMAC-SHA256 of the JSON payload; for a form body,
//! of its `payload` field). Event name: `X-Gogs-Event`; delivery id: `X-Gogs-Delivery`.
//!
//! Which webhook carries which change: `push` carries branch pushes (a new branch also
//! sends `create`, answered with a note). Gogs sends no push for tags: a tag arrives only
//! as `create` with `ref_type: tag` (acted on, with `sha` as `after`), and every deletion
//! only as `delete` (acted on, branch or tag). "Test Delivery" sends a push of the default
//! branch.

use serde::Deserialize;

use super::gitea::{RefEvent, User};
use super::{
    Outcome, Received, SourceConfig, SourceError, Verification, WebhookRequest, context,
    delivery_id, event_type, one_event, payload, typed, verify_sha256_headers,
};
use crate::event::{Commit, RefChange, RefType, ZERO_ID, full_ref};

#[derive(Deserialize)]
struct Push {
    #[serde(rename = "ref")]
    git_ref: String,
    before: String,
    after: String,
    repository: super::ForgeRepository,
    pusher: Option<User>,
    #[serde(default)]
    commits: Vec<super::PushCommit>,
}

/// The header that carries the HMAC-SHA256 of the payload, bare hex.
pub(super) const SIGNATURE_HEADERS: &[(&str, &str)] = &[("X-Gogs-Signature", "")];

pub fn receive(
    source: &SourceConfig,
    request: &WebhookRequest<'_>,
    verification: Verification,
) -> Result<Received, SourceError> {
    let payload_bytes = request.payload_bytes()?;
    if let Verification::Check { .. } = verification {
        verify_sha256_headers(source, request, SIGNATURE_HEADERS, &payload_bytes)?;
    }
    let event_type = event_type(request, "X-Gogs-Event", source.provider)?;
    let delivery = delivery_id(request, &["x-gogs-delivery"]);
    let received = |outcome| Received {
        delivery: delivery.clone(),
        event_type: event_type.clone(),
        outcome,
    };
    if !matches!(event_type.as_str(), "push" | "create" | "delete") {
        return Ok(received(Outcome::Skipped(format!(
            "Gogs event `{event_type}` is not handled; hookrelay acts on `push`, `create` (tags) and `delete`"
        ))));
    }
    let payload = payload(payload_bytes.clone(), true);
    let mut ctx = context(source, &delivery, payload.clone());
    let outcome = if event_type == "push" {
        let push: Push = typed(&payload, "Gogs push")?;
        push.repository.describe(&mut ctx);
        ctx.pusher = push.pusher.map(User::name).unwrap_or_default();
        let commits = push.commits.into_iter().map(Commit::from).collect();
        one_event(
            &ctx,
            RefChange {
                full_ref: push.git_ref,
                before: push.before,
                after: push.after,
                deleted: false,
                commits,
                commit_count: None,
                commit: None,
                files: None,
            },
        )?
    } else {
        let change: RefEvent = typed(&payload, &format!("Gogs {event_type}"))?;
        change.repository.describe(&mut ctx);
        ctx.pusher = change.sender.map(User::name).unwrap_or_default();
        let ref_type = match change.ref_type.as_str() {
            "tag" => RefType::Tag,
            "branch" => RefType::Branch,
            other => {
                return Ok(received(Outcome::Skipped(format!(
                    "Gogs {event_type} of a `{other}` is not handled"
                ))));
            }
        };
        match (event_type.as_str(), ref_type) {
            ("create", RefType::Branch) => Outcome::Skipped(
                "Gogs also sends a `push` event for a new branch; hookrelay acts on that `push`"
                    .into(),
            ),
            ("create", RefType::Tag) => one_event(
                &ctx,
                RefChange {
                    full_ref: full_ref(RefType::Tag, &change.git_ref),
                    before: ZERO_ID.into(),
                    after: change.sha.unwrap_or_default(),
                    ..RefChange::default()
                },
            )?,
            _ => one_event(
                &ctx,
                RefChange {
                    full_ref: full_ref(ref_type, &change.git_ref),
                    before: ZERO_ID.into(),
                    after: ZERO_ID.into(),
                    deleted: true,
                    ..RefChange::default()
                },
            )?,
        }
    };
    Ok(received(outcome))
}
