//! The dashboard's actions (replay, replan, cancel; a window's replan and a backfill): what
//! each acts on, its confirmation's dry run, and carrying it out within `ack_timeout`,
//! recorded in the store with who asked.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::{Value, json};

use super::auth::{self, Access};
use super::respond::{json_answer, read_form, redirect, refused};
use super::view::{self, Webhook};
use crate::app::App;

/// An action and what it acts on.
#[derive(Clone)]
pub(super) enum Action {
    ReplayDelivery(Webhook),
    Replan(Webhook),
    /// Every webhook of a window that failed for good or matched no rule, replanned; or
    /// every webhook of a window through one rule (a backfill).
    ReplanWindow(Window),
    ReplayTrigger(i64),
    Cancel(i64),
    Invalid(String),
}

/// The webhooks a replan of a window takes: those of the deliveries page's filter
/// `state=none` (matched no rule) or `state=failed`, since a time, narrowed by source (and,
/// for failed ones, by rule and project), as `hookrelay replay --unmatched` and `replay
/// --failed --replan` take them; or, for a backfill (`backfill=RULE`, from the rules
/// page), every webhook since a time through that one rule, as `replay --replan --rule`.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Window {
    which: crate::replan::Replans,
    /// The rule a backfill (`which` is [`Replans::Rule`]) runs the window through.
    ///
    /// [`Replans::Rule`]: crate::replan::Replans::Rule
    backfill: String,
    since: String,
    source: String,
    rule: String,
    project: String,
}

impl Window {
    pub(super) fn parse(query: Option<&str>) -> Result<Window, String> {
        let filters = view::Filters::parse(query);
        let backfill = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
            .find(|(name, _)| name == "backfill")
            .map(|(_, rule)| rule.into_owned())
            .unwrap_or_default();
        let which = match (backfill.is_empty(), filters.state.as_str()) {
            (false, "") => crate::replan::Replans::Rule,
            (false, _) => {
                return Err("a backfill runs every webhook of the window through its rule; it takes no state".into());
            }
            (true, "none") => crate::replan::Replans::Unmatched,
            (true, "failed") => crate::replan::Replans::Failed,
            (true, other) => {
                return Err(format!(
                    "a replan of a window takes the webhooks of state none (matched no rule) or failed, not \"{}\"",
                    crate::clipped::Clipped(other)
                ));
            }
        };
        if filters.since.is_empty() {
            return Err("a replan of a window needs since (2h, or a UTC time)".into());
        }
        crate::delivery_rows::parse_time(&filters.since, crate::outbox::now_ms())
            .map_err(|err| format!("since: {err}"))?;
        let narrowed_by_trigger = !(filters.rule.is_empty() && filters.project.is_empty());
        match which {
            crate::replan::Replans::Unmatched if narrowed_by_trigger => {
                return Err(
                    "webhooks that matched no rule have no rule or project to narrow them by"
                        .into(),
                );
            }
            crate::replan::Replans::Rule if narrowed_by_trigger => {
                return Err(
                    "a backfill reads every webhook of the window; narrow it by source, not by rule or project".into(),
                );
            }
            _ => {}
        }
        Ok(Window {
            which,
            backfill,
            since: filters.since,
            source: filters.source,
            rule: filters.rule,
            project: filters.project,
        })
    }

    /// Its query string, as the deliveries page's filter says it.
    pub(super) fn query(&self) -> String {
        let mut query = form_urlencoded::Serializer::new(String::new());
        query.append_pair("kind", "webhook");
        match self.which {
            crate::replan::Replans::Unmatched => query.append_pair("state", "none"),
            crate::replan::Replans::Failed => query.append_pair("state", "failed"),
            crate::replan::Replans::Rule => query.append_pair("backfill", &self.backfill),
        };
        query.append_pair("since", &self.since);
        for (name, value) in self.narrowed_by() {
            query.append_pair(name, value);
        }
        query.finish()
    }

    fn describe(&self) -> String {
        let mut what = match self.which {
            crate::replan::Replans::Unmatched => "webhook that matched no rule".to_owned(),
            crate::replan::Replans::Failed => {
                "webhook with a trigger that failed for good".to_owned()
            }
            crate::replan::Replans::Rule => {
                let rule = crate::clipped::Clipped(&self.backfill);
                format!("webhook, through rule {rule} alone,")
            }
        };
        what.push_str(&format!(" since {}", self.since));
        let narrowed: Vec<String> = self
            .narrowed_by()
            .map(|(name, value)| format!("{name} {value}"))
            .collect();
        if !narrowed.is_empty() {
            what.push_str(&format!(" ({})", narrowed.join(", ")));
        }
        what
    }

    /// The deliveries page that shows it: for a backfill, what its rule started in the
    /// window.
    pub(super) fn listing(&self) -> String {
        if self.which != crate::replan::Replans::Rule {
            return format!("/deliveries?{}", self.query());
        }
        let mut query = form_urlencoded::Serializer::new(String::new());
        query.append_pair("rule", &self.backfill);
        query.append_pair("since", &self.since);
        for (name, value) in self.narrowed_by() {
            query.append_pair(name, value);
        }
        format!("/deliveries?{}", query.finish())
    }

    /// What confirming it asks, with what a dry run says it would do now.
    pub(super) fn question(&self, preview: &str) -> String {
        match self.which {
            crate::replan::Replans::Rule => format!(
                "Run every webhook since {}{} through rule {} alone, and queue what it plans? The other rules start nothing again; a webhook with a trigger of {} already is left out. {preview}",
                self.since,
                match self.source.as_str() {
                    "" => String::new(),
                    source => format!(" from source {source}"),
                },
                crate::clipped::Clipped(&self.backfill),
                crate::clipped::Clipped(&self.backfill),
            ),
            _ => format!(
                "Run every {} through the rules as they are now, and queue what they plan? Each is planned once; one that still starts nothing is left out. {preview}",
                self.describe()
            ),
        }
    }

    /// The filters that narrow it, by name, those set only.
    fn narrowed_by(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [
            ("source", &self.source),
            ("rule", &self.rule),
            ("project", &self.project),
        ]
        .into_iter()
        .filter(|(_, value)| !value.is_empty())
        .map(|(name, value)| (name, value.as_str()))
    }

    /// Every webhook of the window through the running configuration's rules; a failure
    /// with the status the API answers it with.
    fn replan(
        &self,
        app: &App,
        mode: crate::replan::Mode,
    ) -> Result<crate::replan::WindowReplanned, (StatusCode, String)> {
        let location =
            view::location(app).map_err(|message| (StatusCode::SERVICE_UNAVAILABLE, message))?;
        let filter = self
            .filter()
            .map_err(|message| (StatusCode::BAD_REQUEST, message))?;
        crate::replan::replan_window(
            &app.runtime().config,
            RUNNING,
            &location,
            filter,
            self.which,
            mode,
            (self.which == crate::replan::Replans::Rule).then_some(self.backfill.as_str()),
        )
        .map_err(|err| match err {
            crate::replan::WindowError::TooWide(message)
            | crate::replan::WindowError::NoSuchRule(message) => (StatusCode::BAD_REQUEST, message),
            crate::replan::WindowError::Store(message) => {
                (StatusCode::SERVICE_UNAVAILABLE, message)
            }
        })
    }

    fn filter(&self) -> Result<crate::outbox::ListFilter, String> {
        let text = |value: &String| (!value.is_empty()).then(|| value.clone());
        Ok(crate::outbox::ListFilter {
            source: text(&self.source),
            rule: text(&self.rule),
            project: text(&self.project),
            since: Some(crate::delivery_rows::parse_time(
                &self.since,
                crate::outbox::now_ms(),
            )?),
            ..Default::default()
        })
    }
}

impl Action {
    pub(super) fn delivery(action: &str, webhook: Webhook) -> Action {
        match action {
            "replay" => Action::ReplayDelivery(webhook),
            _ => Action::Replan(webhook),
        }
    }

    pub(super) fn trigger(action: &str, id: &str) -> Action {
        match (action, id.parse::<i64>()) {
            (_, Err(_)) => Action::Invalid(format!("{id:?} is not a trigger id")),
            ("cancel", Ok(id)) => Action::Cancel(id),
            (_, Ok(id)) => Action::ReplayTrigger(id),
        }
    }

    pub(super) fn window(query: Option<&str>) -> Action {
        Window::parse(query).map_or_else(Action::Invalid, Action::ReplanWindow)
    }

    fn name(&self) -> &'static str {
        match self {
            Action::ReplayDelivery(_) | Action::ReplayTrigger(_) => "replay",
            Action::Replan(_) | Action::ReplanWindow(_) => "replan",
            Action::Cancel(_) => "cancel",
            Action::Invalid(_) => "invalid",
        }
    }

    fn target(&self) -> String {
        match self {
            Action::ReplayDelivery(webhook) | Action::Replan(webhook) => webhook.describe(),
            Action::ReplanWindow(window) => format!("every {}", window.describe()),
            Action::ReplayTrigger(id) | Action::Cancel(id) => format!("trigger {id}"),
            Action::Invalid(what) => what.clone(),
        }
    }
}

/// Carries out a confirmed action, records who did it, and answers with its result (a
/// page with the result, or JSON). The action runs as a task of its own, waited for at
/// most `[server] ack_timeout`: a store that stopped answering (a frozen disk, a database
/// gone quiet) gets the operator an answer saying so instead of a page that never loads,
/// and the action, still waiting for the store, is carried out and recorded if it answers.
#[allow(clippy::too_many_arguments)]
pub(super) async fn act(
    app: &Arc<App>,
    admin: &crate::config::admin::AdminConfig,
    access: &Access,
    parts: &http::request::Parts,
    body: Incoming,
    who: Who,
    action: Action,
    api: bool,
) -> Response<Full<Bytes>> {
    let form = read_form(body).await;
    if let Err(refusal) = auth::may_act(
        admin,
        access,
        &parts.headers,
        form.get("csrf").map(String::as_str),
    ) {
        return refused(refusal, api);
    }
    let within = app.server.ack_timeout;
    let by = who.by();
    let carried_out = tokio::spawn({
        let (app, action) = (Arc::clone(app), action.clone());
        async move { carry_out(&app, &by, &action).await }
    });
    let mut detail = Value::Null;
    let (status, ok, message) = match tokio::time::timeout(within, carried_out).await {
        Ok(Ok(Ok(done))) => {
            detail = done.detail;
            (StatusCode::OK, true, done.message)
        }
        Ok(Ok(Err(message))) => (StatusCode::CONFLICT, false, message),
        Ok(Err(stopped)) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            false,
            format!("the {} stopped: {stopped}", action.name()),
        ),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            false,
            not_answered(within, app.outbox.health.problem(), &action),
        ),
    };
    if api {
        let mut answer = json!({ "ok": ok, "message": message });
        if let (Some(answer), Value::Object(detail)) = (answer.as_object_mut(), detail) {
            answer.extend(detail);
        }
        return json_answer(status, &answer);
    }
    let back = match &action {
        Action::ReplayDelivery(webhook) | Action::Replan(webhook) => {
            let page = webhook.path("");
            let join = if page.contains('?') { '&' } else { '?' };
            format!("{page}{join}")
        }
        Action::ReplanWindow(window) => format!("{}&", window.listing()),
        _ => "/deliveries?".to_owned(),
    };
    let done = form_urlencoded::Serializer::new(String::new())
        .append_pair("done", &message)
        .finish();
    redirect(&format!("{back}{done}"))
}

/// What the operator is told when an action has not ended within `within`: the store's
/// problem when it has one; else the action is still at work (a replan of a wide window
/// takes a while), and goes on.
fn not_answered(within: std::time::Duration, problem: Option<String>, action: &Action) -> String {
    let within = humantime::format_duration(within);
    match problem {
        Some(problem) => format!(
            "{}; the {} of {} waits for it and may still be carried out when it answers: look before trying it again",
            store_did_not_answer(&within, &problem),
            action.name(),
            action.target()
        ),
        None => format!(
            "the {} of {} has not ended within {within} ([server] ack_timeout) and goes on; its result is recorded as a delivery of source admin (the deliveries page, source admin): look there before trying it again",
            action.name(),
            action.target()
        ),
    }
}

/// The store's `problem` as the reason something did not end `within` `ack_timeout`.
fn store_did_not_answer(within: &humantime::FormattedDuration, problem: &str) -> String {
    format!("the delivery store did not answer within {within} ([server] ack_timeout): {problem}")
}

/// Who asks: the connection, and the client a trusted proxy forwarded for.
#[derive(Clone, Copy)]
pub(super) struct Who {
    pub(super) peer: SocketAddr,
    pub(super) caller: crate::client_address::Caller,
}

impl Who {
    /// Who acts, for the action's record: the connection's address, or behind a trusted
    /// proxy the client it forwarded for and the proxy (`192.0.2.5 via 127.0.0.1:41234`).
    fn by(&self) -> String {
        match self.caller.via {
            Some(_) => format!("{} via {}", self.caller.client, self.peer),
            None => self.peer.to_string(),
        }
    }
}

/// Performs the action, logs it and records who did it (`by`); its result.
async fn carry_out(app: &App, by: &str, action: &Action) -> Result<Done, String> {
    let result = perform(app, action).await;
    let (ok, message) = match &result {
        Ok(done) => (true, done.message.as_str()),
        Err(message) => (false, message.as_str()),
    };
    tracing::info!(by, action = action.name(), target = %action.target(), ok, result = %message, "dashboard action");
    static RECORDED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now = crate::outbox::now_ms();
    let nth = RECORDED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    app.outbox
        .note(crate::outbox::NewDelivery {
            source: "admin".into(),
            delivery_id: format!("admin~{}-{now}-{nth}", action.name()),
            event_type: action.name().into(),
            headers: vec![("by".into(), by.to_owned())],
            body: crate::store::StoredBody::default(),
            summary: json!({
                "admin": { "action": action.name(), "target": action.target(), "by": by, "ok": ok },
                "note": format!("{} of {} by {by}: {message}", action.name(), action.target()),
            })
            .to_string(),
            triggers: Vec::new(),
        })
        .await;
    // The page the answer leads to shows the action's record.
    app.outbox.flush().await;
    result
}

/// What an action did: a sentence for the page, and for the API the same as values
/// (`queued`, `cancelled`, `planned`, `left_out`), merged into its answer.
struct Done {
    message: String,
    detail: Value,
}

impl Done {
    /// Triggers queued again or cancelled: `said` for the page, `key` for the API.
    fn triggers(key: &'static str, said: &str, ids: &[i64]) -> Done {
        Done {
            message: format!("{said} trigger(s) {}", list(ids)),
            detail: json!({ key: ids }),
        }
    }
}

async fn perform(app: &App, action: &Action) -> Result<Done, String> {
    let location = || view::location(app);
    match action {
        Action::ReplayDelivery(Webhook { id, source: None }) => app
            .outbox
            .replay(crate::outbox::ReplayTarget::Delivery(id.clone()))
            .await
            .map(|ids| Done::triggers("queued", "queued again as", &ids))
            .map_err(|err| err.to_string()),
        Action::ReplayDelivery(Webhook {
            id,
            source: Some(source),
        }) => {
            let location = location()?;
            crate::store::blocking(|| crate::outbox::replay_from_offline(&location, source, id))
                .map(|ids| Done::triggers("queued", "queued again as", &ids))
                .map_err(|err| err.to_string())
        }
        Action::ReplayTrigger(id) => app
            .outbox
            .replay(crate::outbox::ReplayTarget::Trigger(*id))
            .await
            .map(|ids| Done::triggers("queued", "queued again as", &ids))
            .map_err(|err| err.to_string()),
        Action::Replan(webhook) => {
            crate::store::blocking(|| replan_delivery(app, webhook, crate::replan::Mode::Record))
                .map(|replanned| Done {
                    message: format!(
                        "delivery {} queued trigger(s) {}",
                        replanned.delivery(),
                        list(&replanned.trigger_ids())
                    ),
                    detail: json!({ "planned": [replanned.to_json()] }),
                })
        }
        Action::ReplanWindow(window) => {
            crate::store::blocking(|| window.replan(app, crate::replan::Mode::Record))
                .map(|done| {
                    let mut detail = done.to_json();
                    if let Some(detail) = detail.as_object_mut() {
                        detail.remove("message");
                    }
                    Done {
                        message: window_result(&done),
                        detail,
                    }
                })
                .map_err(|(_, message)| message)
        }
        Action::Cancel(id) => {
            let location = location()?;
            crate::store::blocking(|| {
                crate::outbox::cancel_offline(&location, &crate::outbox::CancelTarget::Trigger(*id))
            })
            .map(|ids| Done::triggers("cancelled", "cancelled", &ids))
            .map_err(|err| err.to_string())
        }
        Action::Invalid(what) => Err(what.clone()),
    }
}

/// What confirming a replan of `window` would do right now, from a dry run.
pub(super) async fn preview(app: &Arc<App>, window: &Window) -> String {
    let window = window.clone();
    dry_run(app, move |app| {
        window
            .replan(app, crate::replan::Mode::DryRun)
            .map(|done| window_result(&done))
            .map_err(|(_, message)| message)
    })
    .await
}

/// `GET /api/replan?…`: what `POST` would do right now, as JSON: each webhook it would
/// plan with its triggers, and each left out with why. Nothing is recorded.
pub(super) async fn window_preview_json(app: &Arc<App>, window: &Window) -> Response<Full<Bytes>> {
    let window = window.clone();
    let done = within_ack_timeout(app, move |app| {
        window.replan(app, crate::replan::Mode::DryRun)
    })
    .await;
    let done = match done {
        Some(Ok(done)) => done,
        Some(Err((status, message))) => {
            return json_answer(status, &json!({ "message": message }));
        }
        None => {
            return json_answer(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({ "message": dry_run_late(app) }),
            );
        }
    };
    json_answer(StatusCode::OK, &done.to_json())
}

/// A dry run's result for a confirmation (`Now: …`), waited for at most `[server]
/// ack_timeout`: a store that stopped answering leaves the question without it, saying so.
pub(super) async fn dry_run(
    app: &Arc<App>,
    run: impl FnOnce(&App) -> Result<String, String> + Send + 'static,
) -> String {
    match within_ack_timeout(app, run).await {
        Some(Ok(result)) => format!("Now: {result}."),
        Some(Err(message)) => format!("What it would do cannot be said: {message}."),
        None => format!("What it would do cannot be said: {}.", dry_run_late(app)),
    }
}

/// Why a dry run ended without an answer within `[server] ack_timeout`: the store's
/// problem, or a window too wide to read in that time.
fn dry_run_late(app: &App) -> String {
    let within = humantime::format_duration(app.server.ack_timeout);
    match app.outbox.health.problem() {
        Some(problem) => store_did_not_answer(&within, &problem),
        None => format!(
            "the dry run did not end within {within} ([server] ack_timeout); narrow the window (a later since, a source) to see it"
        ),
    }
}

/// `work` on a thread that may block on the store, waited for at most `[server]
/// ack_timeout`; `None` when it did not end in time (it still ends on its own).
async fn within_ack_timeout<T: Send + 'static>(
    app: &Arc<App>,
    work: impl FnOnce(&App) -> T + Send + 'static,
) -> Option<T> {
    let done = tokio::task::spawn_blocking({
        let app = Arc::clone(app);
        move || work(&app)
    });
    match tokio::time::timeout(app.server.ack_timeout, done).await {
        Ok(Ok(result)) => Some(result),
        Ok(Err(_)) | Err(_) => None,
    }
}

/// One stored webhook through the running configuration's rules.
pub(super) fn replan_delivery(
    app: &App,
    webhook: &Webhook,
    mode: crate::replan::Mode,
) -> Result<crate::replan::Replanned, String> {
    let location = view::location(app)?;
    crate::replan::replan_with(
        &app.runtime().config,
        RUNNING,
        &location,
        (webhook.source.as_deref(), &webhook.id),
        mode,
        None,
    )
}

/// How messages name the configuration the dashboard's replans run through.
const RUNNING: &str = "the running configuration";

/// What a dry run of one webhook's replan would queue: `rule -> project ref`, each.
pub(super) fn planned(replanned: &crate::replan::Replanned) -> String {
    replanned
        .triggers
        .iter()
        .map(|(_, rule, project, git_ref)| format!("{rule} -> {project} {git_ref}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What a replan of a window did, in a sentence or two: how many were planned (the
/// first few by name), and how many were left out with the first reason.
fn window_result(done: &crate::replan::WindowReplanned) -> String {
    const NAMED: usize = 5;
    let mut message = done.summary();
    if !done.replanned.is_empty() {
        let named: Vec<String> = done
            .replanned
            .iter()
            .take(NAMED)
            .map(|r| match &r.delivery_id {
                Some(id) => format!("{} as {id}", r.original),
                None => format!("{} ({})", r.original, planned(r)),
            })
            .collect();
        message.push_str(&format!(
            ": {}{}",
            named.join(", "),
            if done.replanned.len() > NAMED {
                ", …"
            } else {
                ""
            }
        ));
    }
    if let Some(first) = done.left_out.first() {
        message.push_str(&format!(
            ". {} left out, the first: {first}",
            done.left_out.len()
        ));
    }
    message
}

fn list(ids: &[i64]) -> String {
    ids.iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An action that outlasts `ack_timeout` on a healthy store is said to go on, not to
    /// wait for a store that is answering; with a store problem, the problem is said.
    #[test]
    fn an_action_that_outlasts_the_ack_timeout_is_said_to_go_on_unless_the_store_is_stuck() {
        let window = Window::parse(Some("state=none&since=2h")).unwrap();
        let action = Action::ReplanWindow(window);
        let within = std::time::Duration::from_secs(10);
        let busy = not_answered(within, None, &action);
        assert_eq!(
            busy,
            "the replan of every webhook that matched no rule since 2h has not ended within 10s ([server] ack_timeout) and goes on; its result is recorded as a delivery of source admin (the deliveries page, source admin): look there before trying it again"
        );
        let stuck = not_answered(within, Some("a write has not ended for 6s".into()), &action);
        assert!(
            stuck.starts_with("the delivery store did not answer within 10s ([server] ack_timeout): a write has not ended for 6s; the replan of every webhook"),
            "{stuck}"
        );
    }

    /// A backfill's window reads its rule from `backfill`, takes no state, and is narrowed
    /// by source alone; its listing is what the rule started.
    #[test]
    fn a_backfill_window_names_its_rule_and_lists_what_it_started() {
        let window = Window::parse(Some("backfill=docs&since=24h&source=github")).unwrap();
        assert_eq!(window.which, crate::replan::Replans::Rule);
        assert_eq!(
            window.query(),
            "kind=webhook&backfill=docs&since=24h&source=github"
        );
        assert_eq!(
            window.listing(),
            "/deliveries?rule=docs&since=24h&source=github"
        );
        assert_eq!(Window::parse(Some(&window.query())).unwrap(), window);
        for (query, said) in [
            ("backfill=docs&state=failed&since=2h", "takes no state"),
            (
                "backfill=docs&project=acme%2Fapp&since=2h",
                "narrow it by source",
            ),
            ("backfill=docs", "needs since"),
        ] {
            let err = Window::parse(Some(query)).unwrap_err();
            assert!(err.contains(said), "{query}: {err}");
        }
    }
}
