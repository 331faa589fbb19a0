//! GitHub and GitHub Enterprise Server.
//!
//! Proof: `X-Hub-Signature-256` (`sha256=` + hex HMAC-SHA256 of the raw body, also for a
//! form-encoded body); the legacy SHA-1 `X-Hub-Signature` only when the source sets
//! `allow_sha1`. Event name: `X-GitHub-Event`; delivery id: `X-GitHub-Delivery` (a
//! redelivery keeps it). Body: JSON, or a form with the JSON in `payload`.
//!
//! Which webhook carries which change: GitHub sends `push` for every change — branch
//! pushes, new branches, tags, and deletions (`deleted: true`) — and additionally `create`
//! or `delete` for new and deleted branches and tags. hookrelay acts on `push`, which has
//! the SHAs; `create` and `delete` are answered with a note. `ping` is a ping.

use serde::Deserialize;

use super::signature::{Algorithm, Encoding, SignatureError, verify_hmac_header};
use super::{
    Outcome, Received, SourceConfig, SourceError, Verification, WebhookRequest, context,
    delivery_id, event_type, one_event, payload, typed,
};
use crate::event::{Commit, RefChange};

#[derive(Deserialize)]
struct Push {
    #[serde(rename = "ref")]
    git_ref: String,
    before: String,
    after: String,
    #[serde(default)]
    deleted: bool,
    repository: super::ForgeRepository,
    pusher: Option<Pusher>,
    sender: Option<User>,
    #[serde(default)]
    commits: Vec<super::PushCommit>,
    /// For an annotated tag, `after` is the tag object; this is its commit.
    head_commit: Option<super::HeadCommit>,
}

#[derive(Deserialize)]
struct Pusher {
    name: Option<String>,
}

#[derive(Deserialize)]
struct User {
    login: Option<String>,
}

#[derive(Deserialize)]
struct Ping {
    repository: Option<super::ForgeRepository>,
    sender: Option<User>,
}

pub fn receive(
    source: &SourceConfig,
    request: &WebhookRequest<'_>,
    verification: Verification,
) -> Result<Received, SourceError> {
    if let Verification::Check { .. } = verification {
        verify(source, request)?;
    }
    let event_type = event_type(request, "X-GitHub-Event", source.provider)?;
    let delivery = delivery_id(request, &["x-github-delivery"]);
    let received = |outcome| Received {
        delivery: delivery.clone(),
        event_type: event_type.clone(),
        outcome,
    };
    let outcome = match event_type.as_str() {
        "push" | "ping" => {
            let payload = payload(request.payload_bytes()?, false);
            let mut ctx = context(source, &delivery, payload.clone());
            if event_type == "ping" {
                let ping: Ping = typed(&payload, "GitHub ping")?;
                if let Some(repository) = ping.repository {
                    repository.describe(&mut ctx);
                }
                ctx.pusher = ping.sender.and_then(|s| s.login).unwrap_or_default();
                return Ok(received(Outcome::Ping(Some(Box::new(ctx.ping())))));
            }
            let push: Push = typed(&payload, "GitHub push")?;
            push.repository.describe(&mut ctx);
            ctx.pusher = push
                .sender
                .and_then(|s| s.login)
                .or(push.pusher.and_then(|p| p.name))
                .unwrap_or_default();
            let commits = push.commits.into_iter().map(Commit::from).collect();
            one_event(
                &ctx,
                RefChange {
                    full_ref: push.git_ref,
                    before: push.before,
                    after: push.after,
                    deleted: push.deleted,
                    commits,
                    commit_count: None,
                    commit: push.head_commit.map(|c| c.id),
                    files: None,
                },
            )?
        }
        "create" | "delete" => Outcome::Skipped(format!(
            "GitHub also sends a `push` event for this {event_type}; hookrelay acts on `push`, \
             which carries the SHAs (subscribe the webhook to push events)"
        )),
        other => Outcome::Skipped(format!(
            "GitHub event `{other}` is not handled; hookrelay acts on `push` (branches, tags and deletions) and `ping`"
        )),
    };
    Ok(received(outcome))
}

/// The header of the HMAC-SHA256 signature, and of the legacy SHA-1 one (`allow_sha1`).
pub(super) const SIGNATURE_HEADER: &str = "X-Hub-Signature-256";
pub(super) const SHA1_HEADER: &str = "X-Hub-Signature";

fn verify(source: &SourceConfig, request: &WebhookRequest<'_>) -> Result<(), SourceError> {
    if source.secrets.is_empty() {
        return Ok(());
    }
    if let Some(value) = request.header(SIGNATURE_HEADER) {
        return Ok(verify_hmac_header(
            SIGNATURE_HEADER,
            value,
            "sha256=",
            Encoding::Hex,
            Algorithm::Sha256,
            &source.secrets,
            request.body,
        )?);
    }
    if source.allow_sha1
        && let Some(value) = request.header(SHA1_HEADER)
    {
        return Ok(verify_hmac_header(
            SHA1_HEADER,
            value,
            "sha1=",
            Encoding::Hex,
            Algorithm::Sha1,
            &source.secrets,
            request.body,
        )?);
    }
    Err(SignatureError::Missing {
        header: if source.allow_sha1 {
            format!("{SIGNATURE_HEADER} (or {SHA1_HEADER})")
        } else {
            SIGNATURE_HEADER.into()
        },
    }
    .into())
}
