//! Gitea and Forgejo (Forgejo sends Gitea's payloads and all of Gitea's headers).
//!
//! Proof: `X-Gitea-Signature` or `X-Forgejo-Signature` (bare hex HMAC-SHA256), or
//! `X-Hub-Signature-256` (`sha256=` + the same hex); an empty value means "no signature"
//! (Gitea sends the headers empty when the webhook has no secret). The HMAC covers the JSON
//! payload — for a form body, the `payload` field, not the form bytes. Event name:
//! `X-Gitea-Event` (or `X-Forgejo-Event`); delivery id: `X-Gitea-Delivery` (or
//! `X-Forgejo-Delivery`).
//!
//! Which webhook carries which change: `push` carries branch pushes, new branches, new
//! tags (`refs/tags/…`) and tag deletions (a zero `after`). A deleted branch arrives only as
//! `delete`, so `delete` with `ref_type: branch` is acted on; `delete` for a tag and every
//! `create` are answered with a note naming `push`. There is no ping: "Test Delivery"
//! sends a push of the default branch.

use serde::Deserialize;

use super::{
    Outcome, Received, SourceConfig, SourceError, Verification, WebhookRequest, context,
    delivery_id, one_event, payload, typed, verify_sha256_headers,
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
    total_commits: Option<u64>,
    /// For an annotated tag, `after` is the tag object; this is its commit.
    head_commit: Option<super::HeadCommit>,
}

#[derive(Deserialize)]
pub(super) struct User {
    login: Option<String>,
    username: Option<String>,
}

impl User {
    pub(super) fn name(self) -> String {
        self.login.or(self.username).unwrap_or_default()
    }
}

/// `create` and `delete`: a short ref name and its type.
#[derive(Deserialize)]
pub(super) struct RefEvent {
    #[serde(rename = "ref")]
    pub(super) git_ref: String,
    pub(super) ref_type: String,
    pub(super) sha: Option<String>,
    pub(super) repository: super::ForgeRepository,
    pub(super) sender: Option<User>,
}

/// The headers that may carry the HMAC-SHA256 of the payload, with their prefixes: any one
/// of them proves the webhook (Forgejo renames Gitea's; both also send GitHub's form).
pub(super) const SIGNATURE_HEADERS: &[(&str, &str)] = &[
    ("X-Gitea-Signature", ""),
    ("X-Forgejo-Signature", ""),
    ("X-Hub-Signature-256", "sha256="),
];

pub fn receive(
    source: &SourceConfig,
    request: &WebhookRequest<'_>,
    verification: Verification,
) -> Result<Received, SourceError> {
    let payload_bytes = request.payload_bytes()?;
    if let Verification::Check { .. } = verification {
        verify_sha256_headers(source, request, SIGNATURE_HEADERS, &payload_bytes)?;
    }
    let event_type = request
        .header("x-gitea-event")
        .or_else(|| request.header("x-forgejo-event"))
        .ok_or(SourceError::MissingEventHeader {
            header: "X-Gitea-Event",
            provider: source.provider,
        })?
        .to_owned();
    let delivery = delivery_id(request, &["x-gitea-delivery", "x-forgejo-delivery"]);
    let received = |outcome| Received {
        delivery: delivery.clone(),
        event_type: event_type.clone(),
        outcome,
    };
    // As the configuration names the sender, in notes and errors.
    let sender = match source.provider {
        crate::event::Provider::Forgejo => "Forgejo",
        _ => "Gitea",
    };
    let outcome = match event_type.as_str() {
        "push" => {
            let payload = payload(payload_bytes.clone(), true);
            let push: Push = typed(&payload, &format!("{sender} push"))?;
            let mut ctx = context(source, &delivery, payload.clone());
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
                    commit_count: push.total_commits,
                    commit: push.head_commit.map(|c| c.id),
                    files: None,
                },
            )?
        }
        "delete" => {
            let payload = payload(payload_bytes.clone(), true);
            let deleted: RefEvent = typed(&payload, &format!("{sender} delete"))?;
            if deleted.ref_type == "branch" {
                let mut ctx = context(source, &delivery, payload.clone());
                deleted.repository.describe(&mut ctx);
                ctx.pusher = deleted.sender.map(User::name).unwrap_or_default();
                one_event(
                    &ctx,
                    RefChange {
                        full_ref: full_ref(RefType::Branch, &deleted.git_ref),
                        before: ZERO_ID.into(),
                        after: ZERO_ID.into(),
                        deleted: true,
                        ..RefChange::default()
                    },
                )?
            } else {
                Outcome::Skipped(format!(
                    "{sender} also sends a `push` event (with a zero `after`) when a {} is deleted; hookrelay acts on that `push`",
                    deleted.ref_type
                ))
            }
        }
        "create" => Outcome::Skipped(format!(
            "{sender} also sends a `push` event for a new branch or tag; hookrelay acts on that `push`"
        )),
        other => Outcome::Skipped(format!(
            "{sender} event `{other}` is not handled; hookrelay acts on `push` and on `delete` for branches"
        )),
    };
    Ok(received(outcome))
}
