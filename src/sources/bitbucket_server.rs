//! Bitbucket Server and Data Center.
//!
//! Proof: `X-Hub-Signature` (`sha256=` + hex HMAC-SHA256 of the raw body). Event name:
//! `X-Event-Key`; delivery id: `X-Request-Id`. "Test connection" sends `diagnostics:ping`,
//! which arrives unsigned even when a secret is set: it is answered as a ping without
//! checking a signature, and never becomes an event.
//!
//! Which webhook carries which change: `repo:refs_changed` carries everything as
//! `changes[]` (`ADD`, `UPDATE`, `DELETE` of a `BRANCH` or `TAG`), several per webhook;
//! each becomes its own event. The repository's full name is `project.key/slug`; the clone
//! URL is the `http` entry of `links.clone`.

use serde::Deserialize;

use super::{
    Outcome, Received, SourceConfig, SourceError, Verification, WebhookRequest, context,
    delivery_id, event_type, payload, several_events, text, typed, verify_sha256_headers,
};
use crate::event::{Commit, RefChange};

#[derive(Deserialize)]
struct RefsChanged {
    repository: Repository,
    actor: Option<Actor>,
    changes: Vec<Change>,
    #[serde(default)]
    commits: Vec<ChangeCommit>,
}

#[derive(Deserialize)]
struct Repository {
    slug: String,
    project: Project,
    links: Option<Links>,
}

#[derive(Deserialize)]
struct Project {
    key: String,
}

#[derive(Deserialize)]
struct Links {
    #[serde(default)]
    clone: Vec<NamedHref>,
    #[serde(rename = "self", default)]
    self_links: Vec<NamedHref>,
}

#[derive(Deserialize)]
struct NamedHref {
    name: Option<String>,
    href: String,
}

#[derive(Deserialize)]
struct Actor {
    name: Option<String>,
    slug: Option<String>,
}

#[derive(Deserialize)]
struct Change {
    #[serde(rename = "ref")]
    changed_ref: Option<ChangedRef>,
    #[serde(rename = "refId")]
    ref_id: Option<String>,
    #[serde(rename = "fromHash")]
    from_hash: String,
    #[serde(rename = "toHash")]
    to_hash: String,
    #[serde(rename = "type")]
    change_type: String,
}

#[derive(Deserialize)]
struct ChangedRef {
    id: String,
}

#[derive(Deserialize)]
struct ChangeCommit {
    id: String,
    message: Option<String>,
    author: Option<CommitAuthor>,
    #[serde(rename = "authorTimestamp")]
    author_timestamp: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct CommitAuthor {
    name: Option<String>,
}

/// The header that carries the HMAC-SHA256 of the body.
pub(super) const SIGNATURE_HEADERS: &[(&str, &str)] = &[("X-Hub-Signature", "sha256=")];

pub fn receive(
    source: &SourceConfig,
    request: &WebhookRequest<'_>,
    verification: Verification,
) -> Result<Received, SourceError> {
    let event_type = event_type(request, "X-Event-Key", source.provider)?;
    let delivery = delivery_id(request, &["x-request-id"]);
    let received = |outcome| Received {
        delivery: delivery.clone(),
        event_type: event_type.clone(),
        outcome,
    };
    if event_type == "diagnostics:ping" {
        // Unsigned by Bitbucket even with a secret; it produces nothing, so it is safe.
        return Ok(received(Outcome::Ping(None)));
    }
    if let Verification::Check { .. } = verification {
        verify_sha256_headers(source, request, SIGNATURE_HEADERS, request.body)?;
    }
    if event_type != "repo:refs_changed" {
        return Ok(received(Outcome::Skipped(format!(
            "Bitbucket Server event `{event_type}` is not handled; hookrelay acts on `repo:refs_changed`"
        ))));
    }
    let payload = payload(request.body.clone(), false);
    let pushed: RefsChanged = typed(&payload, "Bitbucket Server repo:refs_changed")?;
    let mut ctx = context(source, &delivery, payload.clone());
    ctx.repository = format!(
        "{}/{}",
        pushed.repository.project.key, pushed.repository.slug
    );
    if let Some(links) = pushed.repository.links {
        ctx.repository_url = links
            .clone
            .iter()
            .find(|l| l.name.as_deref() == Some("http"))
            .map(|l| l.href.clone())
            .unwrap_or_default();
        ctx.repository_web_url = links
            .self_links
            .first()
            .map(|l| l.href.clone())
            .unwrap_or_default();
    }
    ctx.pusher = pushed
        .actor
        .and_then(|a| a.name.or(a.slug))
        .unwrap_or_default();
    // The payload's commits belong to the push as a whole; they describe a change only
    // when there is exactly one.
    let single = pushed.changes.len() == 1;
    let commits: Vec<Commit> = pushed
        .commits
        .into_iter()
        .map(|c| Commit {
            id: c.id,
            message: text(&c.message),
            url: String::new(),
            author: c.author.and_then(|a| a.name).unwrap_or_default(),
            timestamp: c
                .author_timestamp
                .map(|t| t.to_string())
                .unwrap_or_default(),
            files: None,
        })
        .collect();
    let changes = pushed
        .changes
        .into_iter()
        .map(|change| {
            let full_ref = change
                .changed_ref
                .map(|r| r.id)
                .or(change.ref_id)
                .ok_or("a change without a ref")?;
            Ok(RefChange {
                full_ref,
                before: change.from_hash,
                after: change.to_hash,
                deleted: change.change_type.eq_ignore_ascii_case("DELETE"),
                commits: if single { commits.clone() } else { Vec::new() },
                commit_count: None,
                commit: None,
                files: None,
            })
        })
        .collect();
    Ok(received(several_events(&ctx, changes)))
}
