//! Catching up with GitHub and GitLab (`hookrelay catch-up`, and a source's `catch_up`
//! passes in the relay): asks the forge to deliver again the webhooks of one hook that
//! never reached the relay's store, read from the hook's own delivery log (GitLab's side
//! is in [`gitlab`]). Neither redelivers by itself: a push sent while the relay was down,
//! restarting, or answering `503` (a full disk, a store that did not answer) is otherwise
//! lost unless someone presses *Redeliver*. Run after an outage, or every few minutes
//! from a timer.
//!
//! An event (a `guid`, which is the `X-GitHub-Delivery` the relay stores; on GitLab the
//! `Idempotency-Key`) is delivered
//! again when none of its attempts in the window got a `2xx`, its newest one got no
//! answer, a `5xx` or a `429` (the relay was away or busy: a `4xx` such as a wrong
//! signature's `401` would come back the same), and the relay's store does not hold it;
//! its newest attempt is the one redelivered, once per run. A redelivery of a webhook the
//! relay stored after all would be answered as a duplicate and queue nothing, so the
//! store check saves the forge's rate limit, not correctness.

use std::collections::BTreeMap;
use std::time::SystemTime;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use serde::Deserialize;

use crate::secret::{Secret, SecretRef};
use crate::status::forge::{GITHUB_ACCEPT, GITHUB_API_VERSION, rate_limited};
use crate::upstream::{Called, Upstream, UpstreamConfig, UpstreamResponse};

pub mod fuzz;
pub mod github_app;
pub mod gitlab;

use github_app::AppKey;

/// `[source.NAME] catch_up = { hook = "…", token = "env:NAME", every = "10m", since = "24h" }`
/// (or `hooks = […]`; or `app = "…", key = "file:…"` for a GitHub App): the relay runs a
/// pass over each hook's log at its start and then every `every`
/// ([`crate::catch_up_passes`]).
#[derive(Clone, Debug)]
pub struct CatchUpConfig {
    /// The hooks sending to the source (one, or one per repository or project), each read
    /// in its own pass.
    pub hooks: Vec<HookUrl>,
    pub credential_ref: CredentialRef,
    /// `None` when secrets were not read (`explain`).
    pub credential: Option<Credential>,
    pub every: std::time::Duration,
    /// How far back the pass at the relay's start looks (a relay down overnight).
    pub since: std::time::Duration,
}

/// What a catch-up asks the forge with, as configured: a token, or a GitHub App's ID and
/// private key (for the App's own hook, or a repository's or organisation's hook through
/// the App's installation there).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CredentialRef {
    Token(SecretRef),
    App { app: String, key: SecretRef },
}

/// A [`CredentialRef`] read: the token, or the App's key ready to sign its tokens.
#[derive(Clone, Debug)]
pub enum Credential {
    Token(Secret),
    App(std::sync::Arc<AppKey>),
}

impl CredentialRef {
    /// Reads the token or the App's key now. Errors name where from, never a value.
    pub fn resolve(&self) -> Result<Credential, String> {
        self.resolve_with(&|name| std::env::var(name).ok())
    }

    /// [`CredentialRef::resolve`] with an explicit environment.
    pub fn resolve_with(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<Credential, String> {
        match self {
            CredentialRef::Token(token) => token.resolve_with(env).map(Credential::Token),
            CredentialRef::App { app, key } => {
                let pem = key.resolve_with(env)?;
                AppKey::new(app, &pem)
                    .map(|key| Credential::App(std::sync::Arc::new(key)))
                    .map_err(|err| format!("{key}: {err}"))
            }
        }
    }

    /// Whether this credential can read `hook`'s log: the App's own hook only with the
    /// App's key; a GitLab hook only with a token. An App reads a repository's or an
    /// organisation's hook through its installation there.
    pub fn fits(&self, hook: &HookUrl) -> Result<(), String> {
        match (self, hook.is_app()) {
            (CredentialRef::App { .. }, _) if hook.forge == Forge::GitLab => Err(format!(
                "{} is a GitLab hook: it is read with a GitLab token (token = \"env:…\"; \
                 --token), not a GitHub App's key",
                hook.shown()
            )),
            (CredentialRef::Token(_), true) => Err(format!(
                "{} is a GitHub App's own hook, which only the App may read: give the App's \
                 ID and private key (app = \"…\", key = \"file:…\"; --app and --key) instead \
                 of a token",
                hook.shown()
            )),
            _ => Ok(()),
        }
    }
}

impl std::fmt::Display for CredentialRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CredentialRef::Token(token) => write!(f, "token {token}"),
            CredentialRef::App { app, key } => write!(f, "App {app} (key {key})"),
        }
    }
}

/// The last pass over each hook of each source's catch-up, for the dashboard's Health page.
#[derive(Default)]
pub struct LastPasses(std::sync::Mutex<BTreeMap<(String, String), LastPass>>);

/// What one source's last pass found, or why it could not read the hook's log.
#[derive(Clone, Debug)]
pub struct LastPass {
    /// When it ran (milliseconds since 1970).
    pub at: i64,
    pub redelivered: usize,
    /// Refused by the relay (`4xx`), so not redelivered.
    pub rejected: usize,
    /// Refused by the forge, or left for the next pass (its rate limit).
    pub not_redelivered: usize,
    pub error: Option<String>,
}

impl LastPasses {
    pub fn note(&self, source: &str, hook: &HookUrl, pass: LastPass) {
        self.lock().insert((source.to_owned(), hook.shown()), pass);
    }

    /// The last pass over `hook` of `source`, if one was made.
    pub fn of(&self, source: &str, hook: &HookUrl) -> Option<LastPass> {
        self.lock().get(&(source.to_owned(), hook.shown())).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, String), LastPass>> {
        self.0.lock().expect("the last passes are never poisoned")
    }
}

/// Default `catch_up.every`.
pub const DEFAULT_EVERY: std::time::Duration = std::time::Duration::from_secs(600);
/// Default `catch_up.since`.
pub const DEFAULT_SINCE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// GitHub's largest page of deliveries.
const PER_PAGE: usize = 100;
/// Pages read at most in one run (10,000 deliveries): a window wider than that is named.
const MOST_PAGES: usize = 100;
/// GitLab's pages of failed attempts read at most in one run (1,000 attempts: GitLab
/// stops calling a hook after four failures in a row, so few pile up).
const GITLAB_MOST_PAGES: usize = 50;
/// The least time between two resends asked of GitLab, which lets a user resend five of
/// a project's events a minute and answers more with `429`.
pub const GITLAB_RESEND_EVERY: std::time::Duration = std::time::Duration::from_secs(12);

/// The forge whose hook is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Forge {
    GitHub,
    GitLab,
}

impl Forge {
    pub fn name(self) -> &'static str {
        match self {
            Forge::GitHub => "GitHub",
            Forge::GitLab => "GitLab",
        }
    }
}

/// A hook's REST address: `https://api.github.com/repos/OWNER/REPO/hooks/ID`, an
/// organisation's `…/orgs/ORG/hooks/ID`, a GitHub App's own `…/app/hook`, or the same
/// below GitHub Enterprise Server's `https://HOST/api/v3`; on GitLab a project's
/// `https://HOST/api/v4/projects/ID/hooks/ID` or a group's `…/groups/ID/hooks/ID`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HookUrl {
    /// `scheme://host[:port]`: every call (and every page the forge links to) goes there.
    origin: String,
    /// The hook's path, `/repos/OWNER/REPO/hooks/ID`, without a trailing slash.
    path: String,
    pub forge: Forge,
}

impl HookUrl {
    pub fn parse(text: &str) -> Result<HookUrl, String> {
        let uri = crate::upstream::parse_upstream_url(text)?;
        let path = uri.path().trim_end_matches('/').to_owned();
        let parts: Vec<&str> = path.split('/').collect();
        let hook_id = parts.last().copied().unwrap_or_default();
        let numbered_hook = parts.len() >= 3
            && parts[parts.len() - 2] == "hooks"
            && !hook_id.is_empty()
            && hook_id.bytes().all(|b| b.is_ascii_digit());
        // GitLab: …/api/v4/{projects,groups}/ID/hooks/ID (a project's ID may be its
        // path, `acme%2Fapp`).
        let is_gitlab = numbered_hook
            && parts.len() >= 6
            && matches!(parts[parts.len() - 4], "projects" | "groups")
            && !parts[parts.len() - 3].is_empty()
            && parts[parts.len() - 5] == "v4"
            && parts[parts.len() - 6] == "api";
        // GitHub: [/api/v3]/repos/OWNER/REPO/hooks/ID or [/api/v3]/orgs/ORG/hooks/ID.
        let github_parts: Vec<&str> = path
            .strip_prefix("/api/v3")
            .unwrap_or(&path)
            .split('/')
            .collect();
        let is_github = numbered_hook
            && match github_parts.as_slice() {
                ["", "repos", owner, repo, "hooks", _] => !owner.is_empty() && !repo.is_empty(),
                ["", "orgs", org, "hooks", _] => !org.is_empty(),
                _ => false,
            };
        let is_app_hook = path == "/app/hook" || path == "/api/v3/app/hook";
        let forge = match (is_gitlab, is_github || is_app_hook) {
            (true, _) => Forge::GitLab,
            (false, true) => Forge::GitHub,
            (false, false) => {
                return Err(format!(
                    "{text:?} is not a hook's API address; write e.g. \
                     https://api.github.com/repos/OWNER/REPO/hooks/ID (the ID is in the hook's \
                     settings page address), …/orgs/ORG/hooks/ID for an organisation's hook, \
                     https://api.github.com/app/hook for a GitHub App's own, \
                     https://HOST/api/v3/repos/OWNER/REPO/hooks/ID on GitHub Enterprise Server, \
                     or https://HOST/api/v4/projects/ID/hooks/ID on GitLab"
                ));
            }
        };
        let origin = format!(
            "{}://{}",
            uri.scheme_str().unwrap_or("https"),
            uri.authority().map(|a| a.as_str()).unwrap_or_default()
        );
        Ok(HookUrl {
            origin,
            path,
            forge,
        })
    }

    /// The whole address, for messages.
    pub fn shown(&self) -> String {
        format!("{}{}", self.origin, self.path)
    }

    /// A GitHub App's own hook (`…/app/hook`), read with the App's token.
    pub fn is_app(&self) -> bool {
        self.forge == Forge::GitHub && (self.path == "/app/hook" || self.path == "/api/v3/app/hook")
    }

    /// The path of GitHub's REST API root (empty, or Enterprise Server's `/api/v3`).
    fn api_prefix(&self) -> &str {
        ["/repos/", "/orgs/", "/app/hook"]
            .iter()
            .filter_map(|marker| self.path.find(marker))
            .min()
            .map_or("", |at| &self.path[..at])
    }

    /// Where GitHub says which installation of an App covers this repository's or
    /// organisation's hook (`…/repos/OWNER/REPO/installation`, `…/orgs/ORG/installation`),
    /// and what it covers (`OWNER/REPO`, `ORG`), for messages.
    fn installation(&self) -> Option<(String, String)> {
        let prefix = self.api_prefix();
        let rest = self.path[prefix.len()..].strip_prefix('/')?;
        let (owner, _) = rest.rsplit_once("/hooks/")?;
        matches!(owner.split('/').next(), Some("repos" | "orgs")).then(|| {
            let named = owner.split_once('/').map_or(owner, |(_, name)| name);
            (format!("{prefix}/{owner}/installation"), named.to_owned())
        })
    }

    fn first_page(&self) -> String {
        match self.forge {
            Forge::GitHub => format!("{}/deliveries?per_page={PER_PAGE}", self.path),
            Forge::GitLab => format!(
                "{}/events?status=server_failure,429&per_page={}",
                self.path,
                gitlab::PER_PAGE
            ),
        }
    }

    fn redeliver(&self, attempt: u64) -> String {
        match self.forge {
            Forge::GitHub => format!("{}/deliveries/{attempt}/attempts", self.path),
            Forge::GitLab => format!("{}/events/{attempt}/resend", self.path),
        }
    }

    /// The path and query of a page GitHub links to, when it is on the hook's origin:
    /// the token is sent nowhere else.
    fn within(&self, link: &str) -> Option<String> {
        // A host name is the same in any case (`API.github.com`).
        let (origin, rest) = link.split_at_checked(self.origin.len())?;
        (origin.eq_ignore_ascii_case(&self.origin) && rest.starts_with('/'))
            .then(|| rest.to_owned())
    }
}

/// One attempt as the hook's delivery log lists it.
#[derive(Clone, Debug, Deserialize)]
pub struct Attempt {
    /// The attempt's own id, which a redelivery names.
    pub id: u64,
    /// The event's id: `X-GitHub-Delivery`, shared by every attempt of one event.
    pub guid: String,
    pub delivered_at: String,
    /// `0` when GitHub got no answer (it could not connect, or timed out).
    #[serde(default)]
    pub status_code: u16,
    /// GitHub's words for the answer: `OK`, `Invalid HTTP Response: 503`, `failed to connect to host`.
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub event: String,
    #[serde(default)]
    pub action: Option<String>,
}

impl Attempt {
    fn delivered(&self) -> bool {
        (200..300).contains(&self.status_code)
    }

    fn at(&self) -> Option<i64> {
        chrono::DateTime::parse_from_rfc3339(&self.delivered_at)
            .ok()
            .map(|time| time.timestamp_millis())
    }
}

/// One event of the window, its attempts together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub guid: String,
    /// `push`, `ping`, … with the action where there is one (`pull_request.opened`).
    pub event: String,
    pub attempts: usize,
    /// Some attempt got a `2xx`.
    pub delivered: bool,
    /// The newest attempt's status code (`0`: no answer).
    pub newest_code: u16,
    /// The newest attempt: its id (what a redelivery names), time and answer.
    pub newest: u64,
    pub newest_at: String,
    pub newest_answer: String,
}

impl Event {
    /// Its newest attempt found the relay away or busy (no answer, `5xx`, `429`): a
    /// redelivery may arrive. A `4xx` is the relay's refusal of that webhook, which a
    /// redelivery would get again.
    pub fn may_arrive_again(&self) -> bool {
        matches!(self.newest_code, 0 | 429 | 500..=599)
    }
}

/// The window's attempts (newest first, as GitHub lists them) as events, oldest first.
pub fn events(attempts: &[Attempt]) -> Vec<Event> {
    let mut by_guid: BTreeMap<&str, (usize, Event)> = BTreeMap::new();
    for (order, attempt) in attempts.iter().enumerate() {
        let entry = by_guid.entry(&attempt.guid).or_insert_with(|| {
            let event = match &attempt.action {
                Some(action) if !action.is_empty() => format!("{}.{action}", attempt.event),
                _ => attempt.event.clone(),
            };
            let answer = match (attempt.status_code, attempt.status.trim()) {
                (0, "") => "no answer".to_owned(),
                (0, words) => words.to_owned(),
                (code, "") => code.to_string(),
                (code, words) => format!("{code} ({words})"),
            };
            (
                order,
                Event {
                    guid: attempt.guid.clone(),
                    event,
                    attempts: 0,
                    delivered: false,
                    newest_code: attempt.status_code,
                    newest: attempt.id,
                    newest_at: attempt.delivered_at.clone(),
                    newest_answer: answer,
                },
            )
        });
        entry.1.attempts += 1;
        entry.1.delivered |= attempt.delivered();
    }
    let mut events: Vec<(usize, Event)> = by_guid.into_values().collect();
    // The newest attempt came first: the event whose newest attempt is oldest goes first.
    events.sort_by_key(|(order, _)| std::cmp::Reverse(*order));
    events.into_iter().map(|(_, event)| event).collect()
}

/// The `rel="next"` address of a `Link` header, as GitHub and GitLab page their lists.
pub fn next_link(link: &str) -> Option<String> {
    link.split(',').find_map(|part| {
        let (address, params) = part.split_once(';')?;
        let is_next = params
            .split(';')
            .any(|param| matches!(param.trim(), "rel=\"next\"" | "rel=next"));
        let address = address.trim().strip_prefix('<')?.strip_suffix('>')?;
        is_next.then(|| address.to_owned())
    })
}

/// What one run found, for the command to print.
#[derive(Debug, Default)]
pub struct Report {
    /// Attempts read in the window, and the events they belong to.
    pub attempts: usize,
    pub events: usize,
    pub delivered: usize,
    /// Events no attempt delivered, yet in the store (the relay took one and its answer
    /// was lost, or it answered `503` after its commit timed out).
    pub stored: Vec<Event>,
    /// Events the relay refused (a `4xx`: a wrong signature, an unknown source, a body
    /// over `max_body`): a redelivery would be refused again, so none is asked for.
    pub rejected: Vec<Event>,
    /// Redelivered (or, in a dry run, to be).
    pub redelivered: Vec<Event>,
    /// Events whose redelivery the forge refused, with its answer.
    pub refused: Vec<(Event, String)>,
    /// Events left for another run: past `--most`, after the forge's rate limit, or while
    /// GitLab does not call the hook.
    pub left: Vec<Event>,
    /// Why the run stopped early, if it did.
    pub stopped: Option<String>,
    /// The window was wider than [`MOST_PAGES`] pages: older attempts were not read.
    pub truncated: bool,
    /// Only failed attempts were listed (GitLab's log, read with a status filter), so
    /// `delivered` counts nothing.
    pub failures_only: bool,
    /// Why the forge does not call the hook now (GitLab after failures in a row): what
    /// it did not send meanwhile is lost to catch-up, and resends are not asked for.
    pub hook_disabled: Option<String>,
    /// Failed attempts without an id that stays the same across resends (GitLab before
    /// 17.4): whether the relay holds them cannot be told.
    pub keyless: usize,
}

/// One run against `hook`.
pub struct CatchUp<'a> {
    /// The `[source.NAME]` the hook sends to, as messages name what is called.
    pub source: &'a str,
    pub hook: &'a HookUrl,
    pub credential: &'a Credential,
    /// Attempts from this time on (milliseconds since the epoch) are read.
    pub since: i64,
    /// Redeliveries asked for at most.
    pub most: usize,
    pub dry_run: bool,
}

impl CatchUp<'_> {
    /// Reads the hook's log back to `since`, then asks the forge to redeliver each event no
    /// attempt delivered and `is_stored` does not know. Fails only when the log cannot
    /// be read; refused redeliveries are in the report.
    pub async fn run(
        &self,
        is_stored: &mut (dyn FnMut(&str) -> Result<bool, String> + Send),
    ) -> Result<Report, String> {
        let client = self.client()?;
        let mut asking = Authorization::new(self.credential, self.hook, &client).await?;
        let mut report = Report::default();
        let events = match self.hook.forge {
            Forge::GitHub => {
                let (attempts, truncated) = self
                    .read_pages::<Attempt>(&client, &mut asking, MOST_PAGES, Attempt::at, true)
                    .await?;
                report.attempts = attempts.len();
                report.truncated = truncated;
                events(&attempts)
            }
            Forge::GitLab => {
                report.failures_only = true;
                report.hook_disabled = self.gitlab_hook_disabled(&client, &mut asking).await?;
                let (attempts, truncated) = self
                    .read_pages::<gitlab::LoggedAttempt>(
                        &client,
                        &mut asking,
                        GITLAB_MOST_PAGES,
                        gitlab::LoggedAttempt::at,
                        false,
                    )
                    .await?;
                let (events, keyless) = gitlab::events(&attempts);
                report.attempts = attempts.len();
                report.truncated = truncated;
                report.keyless = keyless;
                events
            }
        };
        report.events = events.len();
        let mut last_asked: Option<tokio::time::Instant> = None;
        for event in events {
            if event.delivered {
                report.delivered += 1;
            } else if !event.may_arrive_again() {
                report.rejected.push(event);
            } else if is_stored(&event.guid)? {
                report.stored.push(event);
            } else if report.stopped.is_some()
                || report.hook_disabled.is_some()
                || report.redelivered.len() >= self.most
            {
                report.left.push(event);
            } else if self.dry_run {
                report.redelivered.push(event);
            } else {
                if let (Some(last), Forge::GitLab) = (last_asked, self.hook.forge) {
                    tokio::time::sleep_until(last + GITLAB_RESEND_EVERY).await;
                }
                last_asked = Some(tokio::time::Instant::now());
                match self.redeliver(&client, &mut asking, &event).await {
                    Redelivery::Accepted => report.redelivered.push(event),
                    Redelivery::Refused(answer) => report.refused.push((event, answer)),
                    Redelivery::Stop(why) => {
                        report.stopped = Some(why);
                        report.left.push(event);
                    }
                }
            }
        }
        Ok(report)
    }

    fn client(&self) -> Result<Upstream, String> {
        let url = crate::upstream::parse_upstream_url(&self.hook.origin)?;
        Upstream::calling(
            Called::Forge(self.source.to_owned()),
            &UpstreamConfig {
                name: self.hook.forge.name().into(),
                url,
                ca_file: None,
                connect_timeout: std::time::Duration::from_secs(10),
                timeout: std::time::Duration::from_secs(30),
                per_project: crate::upstream::default_per_project(),
                coalesce: None,
                max_in_flight: 1,
                read_token: None,
                polls_per_minute: 0,
                poll_interval: std::time::Duration::ZERO,
            },
        )
        .map_err(|err| err.to_string())
    }

    /// The window's attempts and whether pages were left unread. GitHub lists newest
    /// first, so its reading stops at the first attempt before the window; GitLab's
    /// failures are read to their end (or `most_pages`), and those outside it dropped.
    async fn read_pages<T: serde::de::DeserializeOwned>(
        &self,
        client: &Upstream,
        asking: &mut Authorization<'_>,
        most_pages: usize,
        at: fn(&T) -> Option<i64>,
        newest_first: bool,
    ) -> Result<(Vec<T>, bool), String> {
        let forge = self.hook.forge.name();
        let mut attempts = Vec::new();
        let mut page = Some(self.hook.first_page());
        for _ in 0..most_pages {
            let Some(path) = page.take() else {
                return Ok((attempts, false));
            };
            let answer = self.read(client, asking, &path).await?;
            let listed: Vec<T> = serde_json::from_slice(&answer.body).map_err(|err| {
                format!(
                    "{forge}'s list of deliveries of {} cannot be read: {err}",
                    self.hook.shown()
                )
            })?;
            let mut reached_the_start = false;
            for attempt in listed {
                match at(&attempt) {
                    Some(at) if at < self.since => reached_the_start = true,
                    _ => attempts.push(attempt),
                }
            }
            if reached_the_start && newest_first {
                return Ok((attempts, false));
            }
            let next = answer
                .headers
                .get(header::LINK)
                .and_then(|link| link.to_str().ok())
                .and_then(next_link);
            page = match next {
                None => None,
                Some(link) => Some(self.hook.within(&link).ok_or_else(|| {
                    format!(
                        "{forge} linked the next page of the deliveries of {} at {link}, which \
                         is not on that host: the token is sent nowhere else, so the log was \
                         not read past its first {} attempts; give --hook (or catch_up.hook) \
                         as {forge}'s own links write the host",
                        self.hook.shown(),
                        attempts.len()
                    )
                })?),
            };
        }
        Ok((attempts, page.is_some()))
    }

    /// `GET path` on the hook's host; anything but `200` is said with what to check.
    async fn read(
        &self,
        client: &Upstream,
        asking: &mut Authorization<'_>,
        path: &str,
    ) -> Result<UpstreamResponse, String> {
        let headers = asking.headers(client).await?;
        let answer = client
            .call(Method::GET, path, headers, Bytes::new())
            .await
            .map_err(|err| format!("{}: {err}", self.hook.shown()))?;
        if answer.status != StatusCode::OK {
            return Err(self.log_refused(&answer, asking));
        }
        Ok(answer)
    }

    /// Why GitLab does not call the hook now, if it does not (`GET …/hooks/:hook_id`).
    async fn gitlab_hook_disabled(
        &self,
        client: &Upstream,
        asking: &mut Authorization<'_>,
    ) -> Result<Option<String>, String> {
        let answer = self.read(client, asking, &self.hook.path).await?;
        let state: gitlab::HookState = serde_json::from_slice(&answer.body)
            .map_err(|err| format!("GitLab's hook {} cannot be read: {err}", self.hook.shown()))?;
        Ok(state.disabled())
    }

    fn log_refused(&self, answer: &UpstreamResponse, asking: &Authorization<'_>) -> String {
        let forge = self.hook.forge.name();
        let said = crate::upstream::readable_message(&answer.body)
            .map(|message| format!(" ({})", asking.scrubbed_from(message)))
            .unwrap_or_default();
        let app = matches!(self.credential, Credential::App(_));
        let why = match (answer.status.as_u16(), self.hook.forge) {
            _ if rate_limited(answer, SystemTime::now()).is_some() => format!(
                "{forge}'s rate limit was reached; run again later{}",
                wait_asked(answer, forge)
            ),
            (401, _) if app => "GitHub did not accept the App's token: check the App's ID (or \
                                client ID), that the key is one of the App's current private \
                                keys, and this machine's clock (a token is good for ten minutes)"
                .to_owned(),
            (401, _) => "the token is not valid (expired or revoked?)".to_owned(),
            (403 | 404, _) if app && self.hook.is_app() => "the App has no webhook (its \
                                                            settings page: Webhook, Active), \
                                                            or the key is not this App's"
                .to_owned(),
            (403 | 404, _) if app => "the App's installation may not read this hook's \
                                      deliveries (give the App the permission Webhooks: read \
                                      and write), or there is no such hook"
                .to_owned(),
            (403 | 404, Forge::GitHub) => "the token may not read this hook's deliveries (a \
                                           classic token needs admin:repo_hook, or \
                                           admin:org_hook for an organisation's hook; a \
                                           fine-grained one the permission Webhooks: read), \
                                           or there is no such hook"
                .to_owned(),
            (403 | 404, Forge::GitLab) => "the token may not read this hook's events (it \
                                           needs the api scope, and the Maintainer role on \
                                           the project or Owner on the group), there is no \
                                           such hook, or GitLab is older than 17.4, which \
                                           lists and resends a hook's events"
                .to_owned(),
            _ => format!("{forge} did not list them"),
        };
        format!(
            "{forge} answered {} for the deliveries of {}{said}: {why}",
            answer.status,
            self.hook.shown()
        )
    }

    async fn redeliver(
        &self,
        client: &Upstream,
        asking: &mut Authorization<'_>,
        event: &Event,
    ) -> Redelivery {
        let forge = self.hook.forge.name();
        let path = self.hook.redeliver(event.newest);
        let headers = match asking.headers(client).await {
            Ok(headers) => headers,
            Err(why) => return Redelivery::Stop(why),
        };
        let answer = match client
            .call(Method::POST, &path, headers, Bytes::new())
            .await
        {
            Ok(answer) => answer,
            Err(err) => return Redelivery::Stop(format!("{forge} could not be asked: {err}")),
        };
        if answer.status.is_success() {
            return match self.hook.forge {
                Forge::GitHub => Redelivery::Accepted,
                // GitLab resends while it answers, and says what the relay answered.
                Forge::GitLab => match resent_answer(&answer.body) {
                    Some(code) if !(200..300).contains(&code) => Redelivery::Refused(format!(
                        "GitLab resent it and the relay answered {code}"
                    )),
                    _ => Redelivery::Accepted,
                },
            };
        }
        let said = crate::upstream::readable_message(&answer.body)
            .map(|message| asking.scrubbed_from(message))
            .unwrap_or_default();
        if rate_limited(&answer, SystemTime::now()).is_some() {
            return Redelivery::Stop(format!(
                "{forge}'s rate limit was reached ({} {said}){}; run again later for the rest",
                answer.status,
                wait_asked(&answer, forge)
            ));
        }
        Redelivery::Refused(format!("{} {said}", answer.status).trim().to_owned())
    }
}

/// The relay's status code in GitLab's answer to a resend, `{"response_status": 200}`.
fn resent_answer(body: &[u8]) -> Option<u16> {
    let answer: serde_json::Value = serde_json::from_slice(body).ok()?;
    match &answer["response_status"] {
        serde_json::Value::Number(code) => code.as_u64().map(|code| code as u16),
        serde_json::Value::String(code) => code.trim().parse().ok(),
        _ => None,
    }
}

/// `; GitHub asks to wait N s` (or GitLab) when its answer says how long (`Retry-After`, read as the
/// retries read it).
fn wait_asked(answer: &UpstreamResponse, forge: &str) -> String {
    crate::retry::wait_asked_for(&answer.headers, SystemTime::now())
        .map(|wait| format!("; {forge} asks to wait {} s", wait.as_secs()))
        .unwrap_or_default()
}

/// The headers of a run's calls (to GitHub as status posts send them): made once a run
/// for a token; for a GitHub App, with a token signed by its key for its own hook, or
/// the token of its installation on the repository or organisation for theirs, each
/// made again before it expires.
struct Authorization<'a> {
    credential: &'a Credential,
    hook: &'a HookUrl,
    bearer: Secret,
    /// The App's own token, while `bearer` is its installation's (scrubbed too).
    app_token: Option<Secret>,
    made: std::time::Instant,
    headers: HeaderMap,
}

/// How long an installation's token is used (GitHub's last an hour).
const INSTALLATION_TOKEN_FOR: std::time::Duration = std::time::Duration::from_secs(50 * 60);

impl<'a> Authorization<'a> {
    async fn new(
        credential: &'a Credential,
        hook: &'a HookUrl,
        client: &Upstream,
    ) -> Result<Authorization<'a>, String> {
        let mut asking = Authorization {
            credential,
            hook,
            headers: HeaderMap::new(),
            bearer: Secret::new(String::new()),
            app_token: None,
            made: std::time::Instant::now(),
        };
        match hook.forge {
            Forge::GitHub => {
                asking
                    .headers
                    .insert(header::ACCEPT, HeaderValue::from_static(GITHUB_ACCEPT));
                asking.headers.insert(
                    "x-github-api-version",
                    HeaderValue::from_static(GITHUB_API_VERSION),
                );
            }
            Forge::GitLab => {
                asking
                    .headers
                    .insert(header::ACCEPT, HeaderValue::from_static("application/json"));
            }
        }
        asking.renew(client).await?;
        Ok(asking)
    }

    /// Makes the bearer token (again).
    async fn renew(&mut self, client: &Upstream) -> Result<(), String> {
        self.made = std::time::Instant::now();
        match self.credential {
            Credential::Token(token) => {
                self.bearer = token.clone();
                self.authorize()
            }
            Credential::App(key) => {
                self.bearer = key.token(SystemTime::now())?;
                self.authorize()?;
                if self.hook.is_app() {
                    return Ok(());
                }
                let installation = self.installation_token(client, key).await?;
                self.app_token = Some(std::mem::replace(&mut self.bearer, installation));
                self.authorize()
            }
        }
    }

    /// The token of the App's installation that covers the hook's repository or
    /// organisation (`GET …/installation`, then `POST …/access_tokens`), asked for with
    /// the App's own token, which `self` carries now.
    async fn installation_token(&self, client: &Upstream, key: &AppKey) -> Result<Secret, String> {
        let (path, covered) = self
            .hook
            .installation()
            .ok_or_else(|| format!("{} names no repository or organisation", self.hook.shown()))?;
        let answer = client
            .call(Method::GET, &path, self.headers.clone(), Bytes::new())
            .await
            .map_err(|err| format!("{}{path}: {err}", self.hook.origin))?;
        let app = key.app();
        let installation = match answer.status.as_u16() {
            200 => serde_json::from_slice::<serde_json::Value>(&answer.body)
                .ok()
                .and_then(|found| found["id"].as_u64())
                .ok_or_else(|| {
                    format!("GitHub's answer for the App's installation on {covered} names no id")
                })?,
            404 => {
                return Err(format!(
                    "the GitHub App {app} is not installed on {covered}: install it there \
                     (with the permission Webhooks: read and write), or read the hook with a token"
                ));
            }
            _ => {
                return Err(
                    self.app_refused(&answer, &format!("the App's installation on {covered}"))
                );
            }
        };
        let path = format!(
            "{}/app/installations/{installation}/access_tokens",
            self.hook.api_prefix()
        );
        let answer = client
            .call(Method::POST, &path, self.headers.clone(), Bytes::new())
            .await
            .map_err(|err| format!("{}{path}: {err}", self.hook.origin))?;
        if !answer.status.is_success() {
            return Err(self.app_refused(
                &answer,
                &format!("a token of the App's installation on {covered}"),
            ));
        }
        serde_json::from_slice::<serde_json::Value>(&answer.body)
            .ok()
            .and_then(|made| made["token"].as_str().map(Secret::new))
            .filter(|token| !token.expose().is_empty())
            .ok_or_else(|| {
                format!(
                    "GitHub's answer with a token of the App's installation on {covered} holds none"
                )
            })
    }

    /// GitHub's refusal while the App asked for `what`.
    fn app_refused(&self, answer: &UpstreamResponse, what: &str) -> String {
        let said = crate::upstream::readable_message(&answer.body)
            .map(|message| format!(" ({})", self.scrubbed_from(message)))
            .unwrap_or_default();
        let why = match answer.status.as_u16() {
            401 => ": check the App's ID (or client ID), that the key is one of the App's \
                    current private keys, and this machine's clock"
                .to_owned(),
            403 => ": the installation may lack the permission Webhooks: read and write".to_owned(),
            _ => String::new(),
        };
        format!(
            "GitHub answered {} when asked for {what}{said}{why}",
            answer.status
        )
    }

    fn authorize(&mut self) -> Result<(), String> {
        let authorization = self.bearer.header_value("Bearer ").ok_or_else(|| {
            "the token holds characters a header cannot carry (a line break at its end?)".to_owned()
        })?;
        self.headers.insert(header::AUTHORIZATION, authorization);
        Ok(())
    }

    /// The next call's headers, with a token made again when the one it has ages.
    async fn headers(&mut self, client: &Upstream) -> Result<HeaderMap, String> {
        let lasts = match (self.credential, self.app_token.is_some()) {
            (Credential::Token(_), _) => None,
            (Credential::App(_), false) => Some(github_app::FRESH_FOR),
            (Credential::App(_), true) => Some(INSTALLATION_TOKEN_FOR),
        };
        if lasts.is_some_and(|lasts| self.made.elapsed() >= lasts) {
            self.renew(client).await?;
        }
        Ok(self.headers.clone())
    }

    /// `text` (the forge's words) without the tokens, should it have repeated one.
    fn scrubbed_from(&self, text: String) -> String {
        let text = self.bearer.scrubbed_from(text);
        match &self.app_token {
            Some(app_token) => app_token.scrubbed_from(text),
            None => text,
        }
    }
}

enum Redelivery {
    Accepted,
    Refused(String),
    /// Asking again now would fail too: the rest wait for another run.
    Stop(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(id: u64, guid: &str, at: &str, status_code: u16) -> Attempt {
        Attempt {
            id,
            guid: guid.into(),
            delivered_at: at.into(),
            status_code,
            status: if status_code == 0 {
                "failed to connect to host".into()
            } else {
                String::new()
            },
            event: "push".into(),
            action: None,
        }
    }

    #[test]
    fn a_hook_is_read_from_its_api_address_on_github_and_enterprise_server() {
        let hook = HookUrl::parse("https://api.github.com/repos/acme/app/hooks/123").unwrap();
        assert_eq!(hook.origin, "https://api.github.com");
        assert_eq!(hook.path, "/repos/acme/app/hooks/123");
        assert_eq!(
            hook.first_page(),
            "/repos/acme/app/hooks/123/deliveries?per_page=100"
        );
        assert_eq!(
            hook.redeliver(42),
            "/repos/acme/app/hooks/123/deliveries/42/attempts"
        );
        let org = HookUrl::parse("https://api.github.com/orgs/acme/hooks/9/").unwrap();
        assert_eq!(org.path, "/orgs/acme/hooks/9");
        let ghes = HookUrl::parse("https://ghe.example.com:8443/api/v3/repos/a/b/hooks/5").unwrap();
        assert_eq!(ghes.origin, "https://ghe.example.com:8443");
        assert_eq!(ghes.path, "/api/v3/repos/a/b/hooks/5");
        let app = HookUrl::parse("https://api.github.com/app/hook").unwrap();
        assert!(app.is_app() && !hook.is_app());
        assert_eq!(app.first_page(), "/app/hook/deliveries?per_page=100");
        assert_eq!(app.redeliver(7), "/app/hook/deliveries/7/attempts");
        let ghes_app = HookUrl::parse("https://ghe.example.com/api/v3/app/hook/").unwrap();
        assert!(ghes_app.is_app());
        assert_eq!(ghes_app.api_prefix(), "/api/v3");
        assert_eq!(ghes_app.installation(), None);
        assert_eq!(
            ghes.installation(),
            Some(("/api/v3/repos/a/b/installation".into(), "a/b".into()))
        );
        assert_eq!(
            org.installation(),
            Some(("/orgs/acme/installation".into(), "acme".into()))
        );
        let lab = HookUrl::parse("https://gitlab.example.com/api/v4/projects/acme%2Fapp/hooks/7")
            .unwrap();
        assert_eq!(lab.forge, Forge::GitLab);
        assert_eq!(
            lab.first_page(),
            "/api/v4/projects/acme%2Fapp/hooks/7/events?status=server_failure,429&per_page=20"
        );
        assert_eq!(
            lab.redeliver(31),
            "/api/v4/projects/acme%2Fapp/hooks/7/events/31/resend"
        );
        let group = HookUrl::parse("https://example.com/gitlab/api/v4/groups/9/hooks/3").unwrap();
        assert_eq!(
            (group.forge, group.origin.as_str(), group.path.as_str()),
            (
                Forge::GitLab,
                "https://example.com",
                "/gitlab/api/v4/groups/9/hooks/3"
            )
        );
        assert_eq!(hook.forge, Forge::GitHub);
        for wrong in [
            "https://gitlab.example.com/api/v4/projects/9/hooks",
            "https://gitlab.example.com/api/v4/users/9/hooks/1",
            "https://gitlab.example.com/api/v3/projects/9/hooks/1",
            "https://gitlab.example.com/acme/app/-/hooks/1/edit",
            "https://api.github.com/repos/acme/app/app/hook",
            "https://api.github.com/orgs//hooks/1",
            "https://api.github.com/repos/acme//hooks/1",
            "https://api.github.com/repos//app/hooks/1",
            "https://api.github.com/repos/acme/app/extra/hooks/1",
            "https://api.github.com/x/repos/acme/app/hooks/1",
            "https://ghe.example.com/x/api/v3/app/hook",
            "https://api.github.com/app/hooks",
            "https://api.github.com/app",
            "https://github.com/acme/app/settings/hooks/123",
            "https://api.github.com/repos/acme/app/hooks",
            "https://api.github.com/repos/acme/app/hooks/abc",
            "https://api.github.com/repos/acme/app/hooks/1?x=1",
            "https://me:pw@api.github.com/repos/acme/app/hooks/1",
            "api.github.com/repos/acme/app/hooks/1",
        ] {
            let err = HookUrl::parse(wrong).unwrap_err();
            assert!(!err.contains(":pw@"), "{err}");
        }
    }

    #[test]
    fn an_apps_own_hook_is_read_with_its_key_and_a_gitlab_hook_with_a_token() {
        let token = CredentialRef::Token(SecretRef::parse("env:T").unwrap());
        let app = CredentialRef::App {
            app: "1".into(),
            key: SecretRef::parse("env:K").unwrap(),
        };
        let repo = HookUrl::parse("https://api.github.com/repos/a/b/hooks/1").unwrap();
        let own = HookUrl::parse("https://api.github.com/app/hook").unwrap();
        assert!(token.fits(&repo).is_ok() && app.fits(&own).is_ok());
        let refused = token.fits(&own).unwrap_err();
        assert!(
            refused.contains("--app and --key") && !refused.contains("  "),
            "{refused}"
        );
        // An App reads a repository's hook through its installation there.
        assert!(app.fits(&repo).is_ok());
        let lab = HookUrl::parse("https://gitlab.example.com/api/v4/projects/1/hooks/2").unwrap();
        assert!(app.fits(&lab).unwrap_err().contains("GitLab token"));
        assert!(token.fits(&lab).is_ok());
        assert_eq!(app.to_string(), "App 1 (key env:K)");
        assert_eq!(token.to_string(), "token env:T");
    }

    #[test]
    fn gitlabs_answer_to_a_resend_says_what_the_relay_answered() {
        assert_eq!(resent_answer(br#"{"response_status":200}"#), Some(200));
        assert_eq!(resent_answer(br#"{"response_status":"503"}"#), Some(503));
        assert_eq!(
            resent_answer(br#"{"response_status":"internal error"}"#),
            None
        );
        assert_eq!(resent_answer(b"not json"), None);
    }

    #[test]
    fn only_pages_on_the_hooks_own_origin_are_followed() {
        let hook = HookUrl::parse("https://api.github.com/repos/acme/app/hooks/1").unwrap();
        assert_eq!(
            hook.within("https://api.github.com/repositories/7/hooks/1/deliveries?cursor=v1_9")
                .as_deref(),
            Some("/repositories/7/hooks/1/deliveries?cursor=v1_9")
        );
        assert_eq!(hook.within("https://evil.example/x"), None);
        assert_eq!(
            hook.within("https://API.GitHub.com/x").as_deref(),
            Some("/x")
        );
        assert_eq!(hook.within("https://api.github.co"), None);
        assert_eq!(hook.within("https://api.github.com.evil.example/x"), None);
    }

    #[test]
    fn the_next_page_is_the_links_rel_next() {
        let link = "<https://api.github.com/repositories/1/hooks/2/deliveries?per_page=100&cursor=v1_11>; rel=\"next\", \
                    <https://api.github.com/repositories/1/hooks/2/deliveries?per_page=100&cursor=v1_30>; rel=\"prev\"";
        assert_eq!(
            next_link(link).as_deref(),
            Some(
                "https://api.github.com/repositories/1/hooks/2/deliveries?per_page=100&cursor=v1_11"
            )
        );
        assert_eq!(next_link("<https://x/y>; rel=\"prev\""), None);
        assert_eq!(next_link(""), None);
        assert_eq!(next_link("garbage"), None);
    }

    #[test]
    fn an_event_is_delivered_when_any_attempt_got_a_2xx_and_names_its_newest_attempt() {
        // Newest first, as GitHub lists them.
        let listed = [
            attempt(5, "c", "2026-12-06T10:05:00Z", 0),
            attempt(4, "a", "2026-12-06T10:04:00Z", 202),
            attempt(3, "b", "2026-12-06T10:03:00Z", 503),
            attempt(2, "b", "2026-12-06T10:02:00Z", 0),
            attempt(1, "a", "2026-12-06T10:01:00Z", 503),
        ];
        let events = events(&listed);
        let summary: Vec<(&str, bool, u64, usize)> = events
            .iter()
            .map(|e| (e.guid.as_str(), e.delivered, e.newest, e.attempts))
            .collect();
        assert_eq!(
            summary,
            [("b", false, 3, 2), ("a", true, 4, 2), ("c", false, 5, 1)]
        );
        assert_eq!(events[0].newest_answer, "503");
        assert_eq!(events[2].newest_answer, "failed to connect to host");
    }

    #[test]
    fn only_an_event_that_found_the_relay_away_or_busy_may_arrive_again() {
        let newest = |code| events(&[attempt(1, "a", "2026-12-06T10:00:00Z", code)]).remove(0);
        for code in [0, 429, 500, 502, 503, 504] {
            assert!(newest(code).may_arrive_again(), "{code}");
        }
        for code in [400, 401, 403, 404, 413, 415] {
            assert!(!newest(code).may_arrive_again(), "{code}");
        }
    }
}
