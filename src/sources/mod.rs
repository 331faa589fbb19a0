//! Webhook sources: check who sent a webhook, read it, and turn it into [`Event`]s.
//!
//! One module per sender. Each verifies the sender's signature over the raw body first,
//! then reads the payload by the source's configured provider, never by sniffing headers
//! (Gitea and Gogs also send `X-GitHub-*` headers). One change in a repository becomes
//! exactly one event: where a sender announces a change twice (GitHub's `push` and
//! `create`), each module's doc comment says which webhook carries it, and the other is
//! answered with a note naming that webhook. Events a source does not handle are answered
//! `200` with a note, never an error a sender would retry or count against the webhook.

pub mod bitbucket_cloud;
pub mod bitbucket_server;
#[doc(hidden)]
pub mod fuzz;
pub mod generic;
pub mod gitea;
pub mod github;
pub mod gitlab;
pub mod gogs;
pub mod signature;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::HeaderMap;
use serde::de::DeserializeOwned;
use sha2::Digest;

use crate::event::{Event, EventContext, Payload, Provider};
use crate::json_syntax::JsonSyntaxError;
use crate::secret::Secret;
use signature::{Algorithm, Encoding, SignatureError, SigningKey};

/// A configured `[source.NAME]`, validated.
#[derive(Clone, Debug)]
pub struct SourceConfig {
    pub name: String,
    pub provider: Provider,
    /// The shared secrets: HMAC keys, or the tokens for GitLab's `X-Gitlab-Token` and a
    /// generic token header. Usually one; while a secret is rotated, the new one first and
    /// the one senders may still use after it. Empty: no shared secret.
    pub secrets: Vec<Secret>,
    /// Standard Webhooks keys (GitLab's signing token, or a generic sender's): usually one;
    /// while it is rotated, the new one first. Empty: none.
    pub signing_keys: Vec<SigningKey>,
    /// GitHub: accept the legacy SHA-1 `X-Hub-Signature` when no SHA-256 one is sent.
    pub allow_sha1: bool,
    /// Standard Webhooks: how far `webhook-timestamp` may be from now.
    pub timestamp_tolerance: Duration,
    /// Accept webhooks without any signature (only when the source says so explicitly).
    pub allow_unsigned: bool,
    pub generic: GenericConfig,
    /// `limit = { rate = "100/min" }`: webhooks accepted per period.
    pub limit: Option<crate::limits::Limit>,
    /// `url_refs = ["stable", "release/*"]`: the refs `?ref=` in the webhook URL may choose
    /// (short names, globs). None listed: the URL chooses no ref.
    pub url_refs: Option<crate::rules::Patterns>,
    /// `allow_from = ["192.30.252.0/22", …]`: the only addresses (of the client, see
    /// [`crate::client_address`]) that may send this source webhooks. Empty: any.
    pub allow_from: Vec<ipnet::IpNet>,
    /// `"github"` in `allow_from` (a GitHub source): GitHub's published webhook addresses
    /// ([`crate::github_meta`]) may send too, besides any `allow_from` lists.
    pub allow_github_hooks: bool,
    /// `status = { … }`: pipelines started from this source's webhooks show on the commit.
    pub status: Option<crate::status::ForgeApi>,
    /// `compare = { … }`: the forge is asked which files a push changed when its webhook
    /// does not list them all and a rule's `paths` would read them ([`crate::compare`]).
    pub compare: Option<crate::compare::CompareConfig>,
    /// `upstream = "NAME"` (GitLab): this source's pipeline events move the statuses of
    /// the pipelines hookrelay started on that upstream.
    pub pipelines_of: Option<String>,
    /// `catch_up = { … }` (GitHub): the hook whose delivery log the relay reads for
    /// webhooks it never took ([`crate::catch_up_passes`]).
    pub catch_up: Option<crate::catch_up::CatchUpConfig>,
}

/// A push's `head_commit`: the commit the pushed ref names.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct HeadCommit {
    pub id: String,
}

impl SourceConfig {
    /// Whether `?ref=` may choose `git_ref` for this source's webhooks, and if not, why.
    pub fn allows_url_ref(&self, git_ref: &crate::git_ref::GitRef) -> Result<(), String> {
        let name = git_ref.short_name();
        match &self.url_refs {
            Some(patterns) if patterns.is_match(name) => Ok(()),
            Some(patterns) => Err(format!(
                "{name:?} is not among the refs [source.{}] url_refs lets a webhook URL choose ({}); \
                 a sender's signature does not cover the URL, so the source lists the refs it may name",
                self.name,
                patterns.shown()
            )),
            None => Err(format!(
                "[source.{}] sets no url_refs, so a webhook URL may not choose a ref; \
                 a sender's signature does not cover the URL: list the refs it may name, \
                 e.g. url_refs = [\"stable\", \"release/*\"]",
                self.name
            )),
        }
    }
}

/// How a generic sender proves itself and where its fields are.
#[derive(Clone, Debug, Default)]
pub struct GenericConfig {
    pub scheme: GenericScheme,
    /// Dotted JSON paths (`repository.full_name`, `changes.0.ref`).
    pub paths: GenericPaths,
    /// A header carrying the delivery id, tried before `paths.delivery`.
    pub delivery_header: Option<String>,
}

#[derive(Clone, Debug, Default)]
pub enum GenericScheme {
    /// An HMAC of the body in a header.
    Hmac {
        header: String,
        algorithm: Algorithm,
        encoding: Encoding,
        prefix: String,
    },
    /// Standard Webhooks headers, with the source's `signing_secret`.
    StandardWebhooks,
    /// The secret itself in a header.
    Token { header: String },
    /// No proof (only with `allow_unsigned`).
    #[default]
    None,
}

#[derive(Clone, Debug)]
pub struct GenericPaths {
    pub repository: String,
    pub git_ref: String,
    pub before: Option<String>,
    pub after: Option<String>,
    pub delivery: Option<String>,
    pub pusher: Option<String>,
    pub repository_url: Option<String>,
    /// A list of the paths the change touched, for rules' `paths`.
    pub changed_files: Option<String>,
}

impl Default for GenericPaths {
    fn default() -> Self {
        GenericPaths {
            repository: "repository.full_name".into(),
            git_ref: "ref".into(),
            before: Some("before".into()),
            after: Some("after".into()),
            delivery: None,
            pusher: None,
            repository_url: None,
            changed_files: None,
        }
    }
}

/// Why a webhook was refused.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Missing, malformed, stale or wrong proof of origin: `401`.
    #[error(transparent)]
    Signature(#[from] SignatureError),
    /// The sender's event header is missing: `400`.
    #[error("the {header} header is missing; is this a {provider} webhook?")]
    MissingEventHeader {
        header: &'static str,
        provider: Provider,
    },
    #[error("the body is not valid JSON: {0}")]
    Json(JsonSyntaxError),
    /// The JSON is not what this sender sends: `400`.
    #[error("{0}")]
    Payload(String),
}

/// What one webhook amounted to.
#[derive(Debug)]
pub struct Received {
    pub delivery: String,
    /// The sender's event name (`push`, `Tag Push Hook`, `repo:push`).
    pub event_type: String,
    pub outcome: Outcome,
}

impl Received {
    /// Gives its events (a stored body read again) the forge's answers the relay had when
    /// it took the webhook (`answers`, in the events' order, as the stored answer keeps
    /// them), so that path filters read what they read then.
    pub fn restore_compared(&mut self, answers: &[Option<crate::event::ComparedRecord>]) {
        let Outcome::Events(events) = &mut self.outcome else {
            return;
        };
        for (event, answer) in events.iter_mut().zip(answers) {
            if let Some(answer) = answer {
                event.set_compared(answer.clone());
            }
        }
    }
}

#[derive(Debug)]
pub enum Outcome {
    /// Changes to act on: one event per changed ref.
    Events(Vec<Event>),
    /// The sender testing the webhook.
    Ping(Option<Box<Event>>),
    /// Nothing to act on: an event the source does not handle, or a change another webhook
    /// carries. The note says which.
    Skipped(String),
    /// A GitLab pipeline's new state, on a source tied to an upstream (`upstream = …`):
    /// it moves a commit status and never starts a pipeline.
    Pipeline(crate::status::PipelineEvent),
}

/// One incoming webhook: its headers and exact body.
pub struct WebhookRequest<'a> {
    pub headers: &'a HeaderMap,
    pub body: &'a Bytes,
}

impl WebhookRequest<'_> {
    /// A header's value, trimmed; `None` when absent, empty or not text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
    }

    fn is_form(&self) -> bool {
        self.header("content-type").is_some_and(|ct| {
            ct.split(';').next().is_some_and(|t| {
                t.trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            })
        })
    }

    /// The JSON payload: the body, or a form body's `payload` field (GitHub, Gitea, Gogs).
    fn payload_bytes(&self) -> Result<Bytes, SourceError> {
        if !self.is_form() {
            return Ok(self.body.clone());
        }
        form_urlencoded::parse(self.body)
            .find(|(name, _)| name == "payload")
            .map(|(_, value)| Bytes::from(value.into_owned()))
            .ok_or_else(|| SourceError::Payload("the form body has no `payload` field".into()))
    }
}

/// Whether signatures are checked: always when serving; `explain` reads payloads offline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verification {
    Check { now: SystemTime },
    Skip,
}

/// Verifies and reads one webhook for `source`.
pub fn receive(
    source: &SourceConfig,
    request: &WebhookRequest<'_>,
    verification: Verification,
) -> Result<Received, SourceError> {
    let received = match source.provider {
        Provider::Github => github::receive(source, request, verification),
        Provider::Gitlab => gitlab::receive(source, request, verification),
        Provider::Gitea | Provider::Forgejo => gitea::receive(source, request, verification),
        Provider::Gogs => gogs::receive(source, request, verification),
        Provider::BitbucketCloud => bitbucket_cloud::receive(source, request, verification),
        Provider::BitbucketServer => bitbucket_server::receive(source, request, verification),
        Provider::Generic => generic::receive(source, request, verification),
    }?;
    // Stored webhooks read offline (`explain`, `replay --replan`) keep the id they have.
    if matches!(verification, Verification::Check { .. })
        && received.delivery.len() > LONGEST_DELIVERY_ID
    {
        return Err(SourceError::Payload(format!(
            "the delivery id is {} bytes long; hookrelay takes delivery ids of up to {LONGEST_DELIVERY_ID} bytes (the senders' own are UUIDs, 36)",
            received.delivery.len()
        )));
    }
    Ok(received)
}

/// The longest delivery id taken. Ids are indexed for duplicates, and PostgreSQL's B-tree
/// takes entries of at most 2,704 bytes: a longer id failed its write for good, and the
/// sender heard "try again" for ever.
pub const LONGEST_DELIVERY_ID: usize = 1024;

/// Before the body is read: a webhook that lacks every header its source's proof needs
/// cannot be valid, so it is refused without buffering its body. (The full check, over the
/// body, comes later.) Each inner list is "any one of these"; all lists must be met.
pub fn missing_proof(source: &SourceConfig, headers: &http::HeaderMap) -> Option<SourceError> {
    let present = |name: &str| {
        headers
            .get(name)
            .is_some_and(|value| !value.as_bytes().is_empty())
    };
    // The same header lists the senders verify with: one list per sender.
    let any_of = |headers: &[(&'static str, &str)]| headers.iter().map(|(name, _)| *name).collect();
    let needed: Vec<Vec<&str>> = match source.provider {
        _ if source.secrets.is_empty() && source.signing_keys.is_empty() => Vec::new(),
        Provider::Github if source.allow_sha1 => {
            vec![vec![github::SIGNATURE_HEADER, github::SHA1_HEADER]]
        }
        Provider::Github => vec![vec![github::SIGNATURE_HEADER]],
        Provider::Gitlab => {
            let mut needed = Vec::new();
            if !source.secrets.is_empty() {
                needed.push(vec![gitlab::TOKEN_HEADER]);
            }
            if !source.signing_keys.is_empty() {
                needed.push(vec![signature::WEBHOOK_SIGNATURE]);
            }
            needed
        }
        Provider::Gitea | Provider::Forgejo => vec![any_of(gitea::SIGNATURE_HEADERS)],
        Provider::Gogs => vec![any_of(gogs::SIGNATURE_HEADERS)],
        Provider::BitbucketCloud => vec![any_of(bitbucket_cloud::SIGNATURE_HEADERS)],
        // Bitbucket Server's connection test comes unsigned, even with a secret.
        Provider::BitbucketServer
            if headers
                .get("x-event-key")
                .is_some_and(|v| v.as_bytes() == b"diagnostics:ping") =>
        {
            Vec::new()
        }
        Provider::BitbucketServer => vec![any_of(bitbucket_server::SIGNATURE_HEADERS)],
        Provider::Generic => match &source.generic.scheme {
            GenericScheme::Hmac { header, .. } | GenericScheme::Token { header } => {
                vec![vec![header.as_str()]]
            }
            GenericScheme::StandardWebhooks => vec![vec![signature::WEBHOOK_SIGNATURE]],
            GenericScheme::None => Vec::new(),
        },
    };
    needed
        .into_iter()
        .find(|any_of| !any_of.iter().any(|name| present(name)))
        .map(|any_of| SignatureError::missing_any(&any_of).into())
}

/// A sender's JSON, kept as bytes until something reads it whole; `without_secret` for
/// senders that put the webhook secret in it (old Gitea and Gogs).
fn payload(bytes: Bytes, without_secret: bool) -> Arc<Payload> {
    Arc::new(Payload::new(bytes, without_secret))
}

/// A JSON payload parsed into a tree now, keeping a syntax error's line and column.
fn parsed_payload(bytes: Bytes) -> Result<Arc<Payload>, SourceError> {
    Payload::parsed(bytes)
        .map(Arc::new)
        .map_err(|err| SourceError::Json(JsonSyntaxError::from(&err)))
}

/// Reads the JSON straight into a sender's payload type (skipping what it does not need);
/// `what` names it in errors. Bad JSON is a syntax error with its line and column.
fn typed<T: DeserializeOwned>(payload: &Payload, what: &str) -> Result<T, SourceError> {
    crate::json_syntax::read(payload.bytes()).map_err(|err| match err.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
            SourceError::Json(JsonSyntaxError::from(&err))
        }
        _ => {
            let text = err.to_string();
            let text = text
                .rsplit_once(" at line ")
                .map_or(text.as_str(), |(t, _)| t);
            SourceError::Payload(format!("not a {what} payload: {text}"))
        }
    })
}

/// A stable delivery id for senders that give none: a hash of the body.
pub fn derived_delivery(body: &[u8]) -> String {
    let digest = sha2::Sha256::digest(body);
    format!("sha256-{}", hex::encode(&digest[..16]))
}

/// The delivery id from the first of `headers` present, else derived from the body.
fn delivery_id(request: &WebhookRequest<'_>, headers: &[&str]) -> String {
    headers
        .iter()
        .find_map(|name| request.header(name))
        .map(str::to_owned)
        .unwrap_or_else(|| derived_delivery(request.body))
}

/// Checks an HMAC-SHA256 hex signature, from the first of `headers` that is present and
/// not empty (an empty signature header means none, as Gitea sends without a secret).
/// `headers` pairs each header with its prefix (`sha256=` or none).
fn verify_sha256_headers(
    source: &SourceConfig,
    request: &WebhookRequest<'_>,
    headers: &[(&str, &str)],
    signed: &[u8],
) -> Result<(), SourceError> {
    if source.secrets.is_empty() {
        return Ok(()); // Configuration allows this only with `allow_unsigned`.
    }
    for (name, prefix) in headers {
        let Some(value) = request.header(name) else {
            continue;
        };
        if value.eq_ignore_ascii_case(prefix) {
            continue; // `sha256=` with no digest: Gitea without a secret.
        }
        signature::verify_hmac_header(
            name,
            value,
            prefix,
            Encoding::Hex,
            Algorithm::Sha256,
            &source.secrets,
            signed,
        )?;
        return Ok(());
    }
    let names: Vec<&str> = headers.iter().map(|(name, _)| *name).collect();
    Err(SignatureError::missing_any(&names).into())
}

/// The start of an [`EventContext`] for one webhook.
fn context(source: &SourceConfig, delivery: &str, payload: Arc<Payload>) -> EventContext {
    EventContext {
        provider: source.provider,
        source: source.name.clone(),
        delivery: delivery.to_owned(),
        repository: String::new(),
        repository_url: String::new(),
        repository_web_url: String::new(),
        pusher: String::new(),
        payload,
    }
}

/// Wraps a single ref change's outcome.
fn one_event(
    context: &EventContext,
    change: crate::event::RefChange,
) -> Result<Outcome, SourceError> {
    match context.event(change) {
        Ok(event) => Ok(Outcome::Events(vec![event])),
        Err(reason) => Ok(Outcome::Skipped(format!("nothing to do: {reason}"))),
    }
}

/// The body as it may be stored: old Gitea and Gogs put the webhook secret itself in the
/// payload (a top-level `secret`), so for those senders it is removed first, from a JSON body
/// or a form's `payload` field. Other bodies are stored as they came.
pub fn storable_body(source: &SourceConfig, request: &WebhookRequest<'_>) -> Bytes {
    if !matches!(
        source.provider,
        Provider::Gitea | Provider::Forgejo | Provider::Gogs
    ) {
        return request.body.clone();
    }
    let strip = |json: &[u8]| -> Option<String> {
        let mut value: serde_json::Value = serde_json::from_slice(json).ok()?;
        value.as_object_mut()?.remove("secret")?;
        Some(value.to_string())
    };
    if request.is_form() {
        let pairs: Vec<(String, String)> =
            form_urlencoded::parse(request.body).into_owned().collect();
        let mut changed = false;
        let mut form = form_urlencoded::Serializer::new(String::new());
        for (name, value) in &pairs {
            match (name.as_str(), strip(value.as_bytes())) {
                ("payload", Some(stripped)) => {
                    changed = true;
                    form.append_pair(name, &stripped);
                }
                _ => {
                    form.append_pair(name, value);
                }
            }
        }
        return if changed {
            Bytes::from(form.finish())
        } else {
            request.body.clone()
        };
    }
    strip(request.body)
        .map(Bytes::from)
        .unwrap_or_else(|| request.body.clone())
}

/// A repository as GitHub, Gitea and Gogs write it.
#[derive(serde::Deserialize)]
struct ForgeRepository {
    full_name: String,
    clone_url: Option<String>,
    html_url: Option<String>,
}

impl ForgeRepository {
    /// Names the repository in the events of one webhook.
    fn describe(self, context: &mut EventContext) {
        context.repository = self.full_name;
        context.repository_url = text(&self.clone_url);
        context.repository_web_url = text(&self.html_url);
    }
}

/// A commit as GitHub, GitLab, Gitea and Gogs write it in push payloads.
#[derive(serde::Deserialize)]
struct PushCommit {
    id: String,
    message: Option<String>,
    url: Option<String>,
    timestamp: Option<String>,
    author: Option<PushCommitAuthor>,
    added: Option<Vec<String>>,
    modified: Option<Vec<String>>,
    removed: Option<Vec<String>>,
}

#[derive(serde::Deserialize)]
struct PushCommitAuthor {
    name: Option<String>,
    username: Option<String>,
}

impl From<PushCommit> for crate::event::Commit {
    fn from(commit: PushCommit) -> Self {
        crate::event::Commit {
            id: commit.id,
            message: text(&commit.message),
            url: text(&commit.url),
            author: commit
                .author
                .and_then(|a| a.username.or(a.name))
                .unwrap_or_default(),
            timestamp: text(&commit.timestamp),
            // A sender that lists any of the three lists the commit's files.
            files: match (commit.added, commit.modified, commit.removed) {
                (None, None, None) => None,
                (added, modified, removed) => {
                    Some(std::sync::Arc::new(crate::event::CommitFiles {
                        added: added.unwrap_or_default(),
                        modified: modified.unwrap_or_default(),
                        removed: removed.unwrap_or_default(),
                    }))
                }
            },
        }
    }
}

/// The sender's event name from its event header, which every sender but `generic` sends.
fn event_type(
    request: &WebhookRequest<'_>,
    header: &'static str,
    provider: Provider,
) -> Result<String, SourceError> {
    request
        .header(header)
        .map(str::to_owned)
        .ok_or(SourceError::MissingEventHeader { header, provider })
}

/// The events of a webhook that carries several ref changes (Bitbucket); changes that are
/// not events are named in the note when none is.
fn several_events(
    context: &EventContext,
    changes: Vec<Result<crate::event::RefChange, String>>,
) -> Outcome {
    let mut events = Vec::new();
    let mut skipped = Vec::new();
    for change in changes {
        match change.and_then(|change| context.event(change)) {
            Ok(event) => events.push(event),
            Err(reason) => skipped.push(reason),
        }
    }
    if events.is_empty() {
        Outcome::Skipped(format!("nothing to do: {}", skipped.join("; ")))
    } else {
        Outcome::Events(events)
    }
}

/// Text of an optional JSON string.
fn text(value: &Option<String>) -> String {
    value.clone().unwrap_or_default()
}
