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
//!
//! Here is a run ([`CatchUp`]) and what it found ([`Report`]); which hook it reads is in
//! `hook_url`, what the log lists and how attempts make events in `log`, what it asks
//! with in `credential` (a GitHub App's tokens in [`github_app`]), GitLab's log in
//! [`gitlab`].

use std::collections::BTreeMap;
use std::time::SystemTime;

use bytes::Bytes;
use http::{Method, StatusCode, header};

use crate::status::forge::rate_limited;
use crate::upstream::{Called, Upstream, UpstreamConfig, UpstreamResponse};

mod credential;
pub mod fuzz;
pub mod github_app;
pub mod gitlab;
mod hook_url;
mod log;

use credential::Authorization;
pub use credential::{Credential, CredentialRef};
pub use hook_url::{Forge, HookUrl};
pub use log::{Attempt, Event, events, next_link};

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

/// Pages read at most in one run (10,000 deliveries): a window wider than that is named.
const MOST_PAGES: usize = 100;
/// GitLab's pages of failed attempts read at most in one run (1,000 attempts: GitLab
/// stops calling a hook after four failures in a row, so few pile up).
const GITLAB_MOST_PAGES: usize = 50;
/// The least time between two resends asked of GitLab, which lets a user resend five of
/// a project's events a minute and answers more with `429`.
pub const GITLAB_RESEND_EVERY: std::time::Duration = std::time::Duration::from_secs(12);

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
                Forge::GitLab => match gitlab::resent_answer(&answer.body) {
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

/// `; GitHub asks to wait N s` (or GitLab) when its answer says how long (`Retry-After`, read as the
/// retries read it).
fn wait_asked(answer: &UpstreamResponse, forge: &str) -> String {
    crate::retry::wait_asked_for(&answer.headers, SystemTime::now())
        .map(|wait| format!("; {forge} asks to wait {} s", wait.as_secs()))
        .unwrap_or_default()
}

enum Redelivery {
    Accepted,
    Refused(String),
    /// Asking again now would fail too: the rest wait for another run.
    Stop(String),
}
