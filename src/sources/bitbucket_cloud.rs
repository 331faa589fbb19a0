//! Bitbucket Cloud (bitbucket.org).
//!
//! Proof: `X-Hub-Signature` (`sha256=` + hex HMAC-SHA256 of the raw body, despite the
//! header's GitHub-legacy name; `X-Hub-Signature-256` is accepted too). Event name:
//! `X-Event-Key`; delivery id: `X-Request-UUID`.
//!
//! Which webhook carries which change: `repo:push` carries everything — branches and tags,
//! created, updated and deleted — as `push.changes[]`, several per webhook; each change
//! becomes its own event. A change with no `new` side is a deletion. The payload has no
//! clone URL: it is derived from `repository.links.html.href` + `.git`. Commits are at most
//! the 5 newest per change. There is no ping.

use serde::Deserialize;

use super::{
    Outcome, Received, SourceConfig, SourceError, Verification, WebhookRequest, context,
    delivery_id, event_type, payload, several_events, text, typed, verify_sha256_headers,
};
use crate::event::{Commit, RefChange, RefType, ZERO_ID, full_ref};

#[derive(Deserialize)]
struct Push {
    push: Changes,
    repository: Repository,
    actor: Option<Actor>,
}

#[derive(Deserialize)]
struct Changes {
    changes: Vec<Change>,
}

#[derive(Deserialize)]
struct Change {
    new: Option<RefState>,
    old: Option<RefState>,
    #[serde(default)]
    commits: Vec<ChangeCommit>,
}

#[derive(Deserialize)]
struct RefState {
    #[serde(rename = "type")]
    ref_type: String,
    name: String,
    target: Option<Target>,
}

#[derive(Deserialize)]
struct Target {
    hash: Option<String>,
}

#[derive(Deserialize)]
struct ChangeCommit {
    hash: String,
    message: Option<String>,
    date: Option<String>,
    author: Option<CommitAuthor>,
    links: Option<Links>,
}

#[derive(Deserialize)]
struct CommitAuthor {
    raw: Option<String>,
}

#[derive(Deserialize)]
struct Repository {
    full_name: String,
    links: Option<Links>,
}

#[derive(Deserialize)]
struct Links {
    html: Option<Href>,
}

#[derive(Deserialize)]
struct Href {
    href: Option<String>,
}

#[derive(Deserialize)]
struct Actor {
    nickname: Option<String>,
    username: Option<String>,
    display_name: Option<String>,
}

/// The headers that may carry the HMAC-SHA256 of the body (Bitbucket Cloud names it
/// `X-Hub-Signature`, with a `sha256=` prefix; the `-256` form is accepted too).
pub(super) const SIGNATURE_HEADERS: &[(&str, &str)] = &[
    ("X-Hub-Signature", "sha256="),
    ("X-Hub-Signature-256", "sha256="),
];

pub fn receive(
    source: &SourceConfig,
    request: &WebhookRequest<'_>,
    verification: Verification,
) -> Result<Received, SourceError> {
    if let Verification::Check { .. } = verification {
        verify_sha256_headers(source, request, SIGNATURE_HEADERS, request.body)?;
    }
    let event_type = event_type(request, "X-Event-Key", source.provider)?;
    let delivery = delivery_id(request, &["x-request-uuid"]);
    let received = |outcome| Received {
        delivery: delivery.clone(),
        event_type: event_type.clone(),
        outcome,
    };
    if event_type != "repo:push" {
        return Ok(received(Outcome::Skipped(format!(
            "Bitbucket event `{event_type}` is not handled; hookrelay acts on `repo:push`"
        ))));
    }
    let payload = payload(request.body.clone(), false);
    let push: Push = typed(&payload, "Bitbucket Cloud repo:push")?;
    let mut ctx = context(source, &delivery, payload.clone());
    let web_url = push
        .repository
        .links
        .and_then(|l| l.html)
        .and_then(|h| h.href)
        .unwrap_or_default();
    ctx.repository = push.repository.full_name;
    ctx.repository_url = if web_url.is_empty() {
        String::new()
    } else {
        format!("{web_url}.git")
    };
    ctx.repository_web_url = web_url;
    ctx.pusher = push
        .actor
        .and_then(|a| a.nickname.or(a.username).or(a.display_name))
        .unwrap_or_default();
    let changes = push.push.changes.into_iter().map(ref_change).collect();
    Ok(received(several_events(&ctx, changes)))
}

/// One entry of `push.changes[]`: a ref change, or why it is not one.
fn ref_change(change: Change) -> Result<RefChange, String> {
    let side = change
        .new
        .as_ref()
        .or(change.old.as_ref())
        .ok_or("a change with neither a new nor an old ref")?;
    let ref_type = match side.ref_type.as_str() {
        "branch" | "named_branch" => RefType::Branch,
        "tag" | "annotated_tag" => RefType::Tag,
        other => return Err(format!("a change to a `{other}`")),
    };
    let hash = |state: &Option<RefState>| {
        state
            .as_ref()
            .and_then(|s| s.target.as_ref())
            .and_then(|t| t.hash.clone())
            .unwrap_or_else(|| ZERO_ID.into())
    };
    let commits = change
        .commits
        .into_iter()
        .map(|c| Commit {
            id: c.hash,
            message: text(&c.message),
            url: c
                .links
                .and_then(|l| l.html)
                .and_then(|h| h.href)
                .unwrap_or_default(),
            author: c.author.and_then(|a| a.raw).unwrap_or_default(),
            timestamp: text(&c.date),
            files: None,
        })
        .collect();
    Ok(RefChange {
        full_ref: full_ref(ref_type, &side.name),
        before: hash(&change.old),
        after: hash(&change.new),
        deleted: change.new.is_none(),
        commits,
        commit_count: None,
        commit: None,
        files: None,
    })
}
