//! The delivery dashboard (`[admin]`): its own listener, never the webhook port. Server-
//! rendered pages (minijinja, auto-escaped, embedded in the binary) and the JSON API that
//! backs them read through the store interface, so they work on SQLite and PostgreSQL
//! alike. Every action asks for confirmation, needs the token ([`auth`]) and is recorded
//! in the store with the client's address (`admin~ACTION-…` deliveries of source `admin`).
//!
//! Pages: `/deliveries` (filters, pages by cursor, live updates), `/deliveries/{id}`,
//! `/health`, `/login`. API: `GET /api/deliveries`, `GET /api/deliveries/{id}`,
//! `GET /api/health`, `POST /api/deliveries/{id}/replay`, `…/replan`,
//! `POST /api/triggers/{id}/replay`, `…/cancel`.

pub mod auth;
pub mod view;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use minijinja::Environment;
use serde_json::{Value, json};

use crate::app::App;
use auth::{Access, Refusal};

/// Largest form or API body read (a login, a cross-site token).
const MAX_FORM: usize = 16 * 1024;

fn templates() -> &'static Environment<'static> {
    static ENV: OnceLock<Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = Environment::new();
        // HTML-escaped as always, and control characters from payloads shown, not passed
        // to the browser (`\u{1b}` reads as `\u{1b}`).
        env.set_formatter(|out, state, value| {
            if let Some(text) = value.as_str()
                && !value.is_safe()
                && text
                    .chars()
                    .any(|c| c.is_control() && c != '\n' && c != '\t')
            {
                let shown: String = text
                    .chars()
                    .map(|c| {
                        if c.is_control() && c != '\n' && c != '\t' {
                            format!("\\u{{{:x}}}", c as u32)
                        } else {
                            c.to_string()
                        }
                    })
                    .collect();
                return minijinja::escape_formatter(out, state, &minijinja::Value::from(shown));
            }
            minijinja::escape_formatter(out, state, value)
        });
        for (name, text) in [
            ("layout.html", include_str!("templates/layout.html")),
            ("deliveries.html", include_str!("templates/deliveries.html")),
            ("rows.html", include_str!("templates/rows.html")),
            ("delivery.html", include_str!("templates/delivery.html")),
            ("confirm.html", include_str!("templates/confirm.html")),
            ("login.html", include_str!("templates/login.html")),
            ("health.html", include_str!("templates/health.html")),
            ("rules.html", include_str!("templates/rules.html")),
        ] {
            env.add_template(name, text)
                .expect("the dashboard's templates compile");
        }
        env
    })
}

/// What a page is rendered with besides its own values.
struct Page<'a> {
    access: &'a Access,
    can_log_in: bool,
    flash: Option<String>,
}

/// A fresh nonce for one page's script (the page's CSP allows that script and no other).
fn nonce() -> String {
    let mut bytes = [0u8; 16];
    if rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut bytes)
        .is_err()
    {
        // No randomness: a page without a usable nonce runs no script at all.
        return String::new();
    }
    hex::encode(bytes)
}

fn render(name: &str, page: &Page<'_>, values: Value) -> Response<Full<Bytes>> {
    let nonce = nonce();
    let mut context = json!({
        "nonce": nonce,
        "authenticated": page.access.authenticated,
        "csrf": page.access.csrf,
        "can_log_in": page.can_log_in && !page.access.authenticated,
        "flash": page.flash,
    });
    if let (Some(context), Value::Object(values)) = (context.as_object_mut(), values) {
        context.extend(values);
    }
    match templates()
        .get_template(name)
        .and_then(|t| t.render(&context))
    {
        Ok(html) => {
            let mut response = html_response(StatusCode::OK, html);
            if !nonce.is_empty()
                && let Ok(policy) = HeaderValue::from_str(&policy(&format!("'nonce-{nonce}'")))
            {
                response
                    .headers_mut()
                    .insert(header::CONTENT_SECURITY_POLICY, policy);
            }
            response
        }
        Err(err) => {
            tracing::error!(page = name, error = %err, "a dashboard page could not be rendered");
            html_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "<!doctype html><title>error</title><p>This page could not be rendered; the log says why.".into(),
            )
        }
    }
}

fn html_response(status: StatusCode, html: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(html)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    secure(headers);
    response
}

/// The content security policy, with the scripts it allows (`'none'`, or a page's nonce).
fn policy(scripts: &str) -> String {
    format!(
        "default-src 'none'; style-src 'unsafe-inline'; script-src {scripts}; connect-src 'self'; \
         img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    )
}

/// Headers every dashboard answer carries: nothing loads from elsewhere, nothing frames it,
/// no script runs but a rendered page's own.
fn secure(headers: &mut http::HeaderMap) {
    if let Ok(policy) = HeaderValue::from_str(&policy("'none'")) {
        headers.insert(header::CONTENT_SECURITY_POLICY, policy);
    }
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

fn json_answer(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut response = crate::error::json_response(status, body);
    secure(response.headers_mut());
    response
}

fn redirect(to: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SEE_OTHER;
    if let Ok(location) = HeaderValue::from_str(to) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    secure(response.headers_mut());
    response
}

/// One dashboard request: authorized, routed, logged.
pub async fn handle(
    app: &Arc<App>,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let started = std::time::Instant::now();
    let (method, path) = (request.method().clone(), request.uri().path().to_owned());
    let response = route(app, peer, request).await;
    let status = response.status().as_u16();
    let elapsed_ms = (started.elapsed().as_secs_f64() * 10_000.0).round() / 10.0;
    let (method, path) = (
        crate::clipped::Clipped(method.as_str()),
        crate::clipped::Clipped(&path),
    );
    if status < 400 {
        tracing::info!(%peer, %method, %path, status, elapsed_ms, "dashboard request");
        return response;
    }
    // Refusals within the server's budget for them (anyone who reaches the port can
    // make them): a wrong token at warning level, with how many were left out.
    let Some(held_back) = app.may_log_refusal("dashboard", status) else {
        return response;
    };
    if status == 401 {
        tracing::warn!(%peer, %method, %path, status, elapsed_ms, held_back, "dashboard request refused: a wrong or missing token")
    } else {
        tracing::info!(%peer, %method, %path, status, elapsed_ms, held_back, "dashboard request refused")
    }
    response
}

async fn route(
    app: &Arc<App>,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let runtime = app.runtime();
    // The token as configured now (reloads change it); the address as started.
    let started = app.admin.get();
    let Some(mut admin) = runtime.config.admin.clone().or_else(|| started.cloned()) else {
        return json_answer(
            StatusCode::NOT_FOUND,
            &json!({ "message": "the dashboard is off: the configuration has no [admin]" }),
        );
    };
    if let Some(started) = started {
        admin.listen = started.listen;
    }
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_owned();
    let api = path.starts_with("/api/");
    let segments: Vec<String> = path
        .trim_matches('/')
        .split('/')
        .map(|s| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let can_log_in = admin.token.is_some();
    // The login form is open to all; everything else needs to know who is asking.
    if segments.as_slice() == ["login"] {
        return login(&admin, &parts, body, can_log_in).await;
    }
    let access = match auth::access(&admin, &parts.headers) {
        Ok(access) => access,
        Err(refusal) => return refused(refusal, api),
    };
    let page = Page {
        access: &access,
        can_log_in,
        flash: form_urlencoded::parse(parts.uri.query().unwrap_or_default().as_bytes())
            .find(|(k, _)| k == "done")
            .map(|(_, v)| v.into_owned()),
    };
    let query = parts.uri.query();
    match (&parts.method, segments.as_slice()) {
        (&Method::GET, [""]) => redirect("/deliveries"),
        (&Method::GET, ["deliveries"]) => deliveries_page(app, &page, query),
        (&Method::GET, ["deliveries", id]) => delivery_page(app, &page, &Webhook::named(id, query)),
        (&Method::GET, ["health"]) => render("health.html", &page, json!({ "title": "Health", "h": view::health(app) })),
        (&Method::GET, ["rules"]) => render("rules.html", &page, json!({ "title": "Rules", "c": view::configuration(app) })),
        (&Method::GET, ["deliveries", id, action @ ("replay" | "replan")]) => {
            let webhook = Webhook::named(id, query);
            let named = webhook.describe();
            let question = if *action == "replay" {
                format!("Queue every trigger of {named} again, as new triggers?")
            } else {
                let delivery = webhook.clone();
                let preview = dry_run(app, move |app| {
                    replan_delivery(app, &delivery, crate::replan::Mode::DryRun)
                        .map(|replanned| format!("it would queue {}", planned(&replanned)))
                })
                .await;
                format!("Run {named} through the rules as they are now, and queue what they plan? {preview}")
            };
            confirm(&page, &webhook.path(action), &webhook.path(""), &question)
        }
        (&Method::GET, ["replan"]) => match Window::parse(query) {
            Ok(window) => {
                let preview = preview(app, &window).await;
                confirm(
                    &page,
                    &format!("/replan?{}", window.query()),
                    &window.listing(),
                    &window.question(&preview),
                )
            }
            Err(message) => html_response(StatusCode::BAD_REQUEST, format!(
                "<!doctype html><title>bad request</title><p>{}. <a href=\"/deliveries\">Deliveries</a>",
                minijinja::HtmlEscape(&message)
            )),
        },
        (&Method::GET, ["triggers", id, "cancel"]) => confirm(
            &page,
            &format!("/triggers/{id}/cancel"),
            "/deliveries",
            &format!("Stop waiting trigger {id}? It will never be sent."),
        ),
        (&Method::POST, ["logout"]) => {
            let form = read_form(body).await;
            if let Err(refusal) = auth::may_act(&admin, &access, &parts.headers, form.get("csrf").map(String::as_str)) {
                return refused(refusal, false);
            }
            let mut response = redirect("/deliveries");
            if let Ok(cookie) = HeaderValue::from_str(&auth::cookie(None)) {
                response.headers_mut().insert(header::SET_COOKIE, cookie);
            }
            response
        }
        (&Method::POST, ["deliveries", id, action @ ("replay" | "replan")]) => {
            act(app, &admin, &access, &parts, body, peer, Action::delivery(action, Webhook::named(id, query)), false).await
        }
        (&Method::POST, ["triggers", id, action @ ("cancel" | "replay")]) => {
            act(app, &admin, &access, &parts, body, peer, Action::trigger(action, id), false).await
        }
        (&Method::POST, ["replan"]) => act(app, &admin, &access, &parts, body, peer, Action::window(query), false).await,
        (&Method::GET, ["api", "deliveries"]) => {
            match view::Filters::parse(query).to_list_filter(crate::outbox::now_ms()) {
                Err(message) => json_answer(StatusCode::BAD_REQUEST, &json!({ "message": message })),
                Ok(filter) => match view::page(app, &filter) {
                    Ok((deliveries, next)) => json_answer(
                        StatusCode::OK,
                        &json!({ "deliveries": deliveries, "next": (!next.is_empty()).then_some(next) }),
                    ),
                    Err(message) => json_answer(StatusCode::SERVICE_UNAVAILABLE, &json!({ "message": message })),
                },
            }
        }
        (&Method::GET, ["api", "deliveries", id]) => match view::detail(app, &Webhook::named(id, query)) {
            Ok(detail) => json_answer(StatusCode::OK, &detail),
            Err((status, message)) => json_answer(status, &json!({ "message": message })),
        },
        (&Method::GET, ["api", "health"]) => json_answer(StatusCode::OK, &view::health(app)),
        (&Method::GET, ["api", "configuration"]) => json_answer(StatusCode::OK, &view::configuration(app)),
        (&Method::POST, ["api", "deliveries", id, action @ ("replay" | "replan")]) => {
            act(app, &admin, &access, &parts, body, peer, Action::delivery(action, Webhook::named(id, query)), true).await
        }
        (&Method::POST, ["api", "triggers", id, action @ ("cancel" | "replay")]) => {
            act(app, &admin, &access, &parts, body, peer, Action::trigger(action, id), true).await
        }
        (&Method::GET, ["api", "replan"]) => match Window::parse(query) {
            Ok(window) => window_preview_json(app, &window).await,
            Err(message) => json_answer(StatusCode::BAD_REQUEST, &json!({ "message": message })),
        },
        (&Method::POST, ["api", "replan"]) => act(app, &admin, &access, &parts, body, peer, Action::window(query), true).await,
        _ if api => json_answer(StatusCode::NOT_FOUND, &json!({ "message": format!("no {} {} in the dashboard's API", crate::clipped::Clipped(parts.method.as_str()), crate::clipped::Clipped(&path)) })),
        _ => html_response(
            StatusCode::NOT_FOUND,
            "<!doctype html><title>not found</title><p>No such page. <a href=\"/deliveries\">Deliveries</a>".into(),
        ),
    }
}

fn encode(id: &str) -> String {
    percent_encoding::utf8_percent_encode(id, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn refused(refusal: Refusal, api: bool) -> Response<Full<Bytes>> {
    match (refusal, api) {
        (Refusal::LogIn, true) => {
            let mut response = json_answer(
                StatusCode::UNAUTHORIZED,
                &json!({ "message": "the dashboard needs its token: Authorization: Bearer <[admin] token>" }),
            );
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            response
        }
        (Refusal::LogIn, false) => redirect("/login"),
        (Refusal::Forbidden(reason), true) => {
            json_answer(StatusCode::FORBIDDEN, &json!({ "message": reason }))
        }
        (Refusal::Forbidden(reason), false) => {
            let escaped = minijinja::HtmlEscape(&reason).to_string();
            html_response(
                StatusCode::FORBIDDEN,
                format!(
                    "<!doctype html><title>forbidden</title><p>{escaped}</p><p><a href=\"/login\">Log in</a></p>"
                ),
            )
        }
    }
}

async fn read_form(body: Incoming) -> std::collections::HashMap<String, String> {
    let bytes = Limited::new(body, MAX_FORM)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    form_urlencoded::parse(&bytes).into_owned().collect()
}

async fn login(
    admin: &crate::config::admin::AdminConfig,
    parts: &http::request::Parts,
    body: Incoming,
    can_log_in: bool,
) -> Response<Full<Bytes>> {
    let anonymous = Access {
        authenticated: false,
        by_cookie: false,
        csrf: String::new(),
    };
    let page = Page {
        access: &anonymous,
        can_log_in,
        flash: None,
    };
    let Some(token) = admin.token.as_ref().and_then(|(_, token)| token.as_ref()) else {
        return render(
            "login.html",
            &page,
            json!({ "title": "Log in", "error": "This dashboard has no [admin] token, so there is nothing to log in with: set token = \"env:HOOKRELAY_ADMIN_TOKEN\"." }),
        );
    };
    let plain = auth::over_plain_http_from_afar(admin, &parts.headers).then_some(
        "This page came over plain HTTP from another machine: the token would cross the network in clear, and browsers keep the login only over HTTPS. Serve the dashboard over HTTPS ([admin] tls_cert and tls_key, or a TLS proxy), or reach it through an SSH tunnel to 127.0.0.1.",
    );
    if parts.method != Method::POST {
        return render(
            "login.html",
            &page,
            json!({ "title": "Log in", "plain": plain }),
        );
    }
    let form = read_form(body).await;
    let given = form.get("token").map(String::as_str).unwrap_or_default();
    if !crate::sources::signature::token_matches(token.expose(), given) {
        let mut response = render(
            "login.html",
            &page,
            json!({ "title": "Log in", "error": "That is not the dashboard's token.", "plain": plain }),
        );
        *response.status_mut() = StatusCode::UNAUTHORIZED;
        return response;
    }
    let mut response = redirect("/deliveries");
    if let Ok(cookie) = HeaderValue::from_str(&auth::cookie(Some(token))) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}

fn deliveries_page(app: &App, page: &Page<'_>, query: Option<&str>) -> Response<Full<Bytes>> {
    let filters = view::Filters::parse(query);
    let fragment = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .any(|(k, v)| k == "fragment" && v == "rows");
    let (deliveries, next, error) = match filters.to_list_filter(crate::outbox::now_ms()) {
        Err(message) => (Vec::new(), String::new(), Some(message)),
        Ok(filter) => match view::page(app, &filter) {
            Ok((deliveries, next)) => (deliveries, next, None),
            Err(message) => (Vec::new(), String::new(), Some(message)),
        },
    };
    let live = filters.before.is_empty().then(|| {
        let query = filters.with_before("");
        if query.is_empty() {
            "/deliveries?fragment=rows".to_owned()
        } else {
            format!("/deliveries?{query}&fragment=rows")
        }
    });
    let values = json!({
        "title": "Deliveries",
        "filters": filters,
        "deliveries": deliveries,
        "next": (!next.is_empty()).then(|| filters.with_before(&next)),
        "error": error,
        "live": live,
        "text_window": view::TEXT_WINDOW,
        "replan": replan_link(&filters),
    });
    if fragment {
        return render("rows.html", page, values);
    }
    render("deliveries.html", page, values)
}

/// The link that replans the webhooks the filter shows, when it shows a window of them
/// that matched no rule or failed for good: the filter's own query, read as a window.
fn replan_link(filters: &view::Filters) -> Option<String> {
    if !(filters.kind.is_empty() || filters.kind == "webhook")
        || !filters.until.is_empty()
        || !filters.q.is_empty()
        || !filters.before.is_empty()
    {
        return None;
    }
    let query = form_urlencoded::Serializer::new(String::new())
        .append_pair("state", &filters.state)
        .append_pair("since", &filters.since)
        .append_pair("source", &filters.source)
        .append_pair("rule", &filters.rule)
        .append_pair("project", &filters.project)
        .finish();
    Window::parse(Some(&query))
        .ok()
        .map(|window| format!("/replan?{}", window.query()))
}

fn delivery_page(app: &App, page: &Page<'_>, webhook: &Webhook) -> Response<Full<Bytes>> {
    match view::detail(app, webhook) {
        Ok(detail) => render(
            "delivery.html",
            page,
            json!({ "title": format!("Delivery {}", webhook.id), "d": detail }),
        ),
        Err((status, message)) => {
            let mut response = render(
                "deliveries.html",
                page,
                json!({ "title": "Deliveries", "filters": view::Filters::default(), "deliveries": [], "error": message }),
            );
            *response.status_mut() = status;
            response
        }
    }
}

fn confirm(page: &Page<'_>, action: &str, back: &str, question: &str) -> Response<Full<Bytes>> {
    if page.access.csrf.is_empty() {
        return refused(
            Refusal::Forbidden(if page.can_log_in {
                "Log in to act: every action needs the dashboard's token.".into()
            } else {
                "Actions need the dashboard's token: set [admin] token = \"env:HOOKRELAY_ADMIN_TOKEN\".".into()
            }),
            false,
        );
    }
    render(
        "confirm.html",
        page,
        json!({ "title": "Confirm", "question": question, "action": action, "back": back, "confirm": "Yes, do it" }),
    )
}

/// A stored webhook as a page or an action names it: by its delivery id, and by the
/// source that sent it where two sources sent the same id (`?source=NAME`, which the
/// deliveries page's links carry). By the id alone, a page shows the newer webhook, a
/// replay takes both sources' triggers and a replan the newer webhook, as `hookrelay
/// replay` does.
#[derive(Clone)]
pub struct Webhook {
    pub id: String,
    pub source: Option<String>,
}

impl Webhook {
    /// The webhook `id` names, with the `source` of the request's `query` if it has one.
    fn named(id: &str, query: Option<&str>) -> Webhook {
        let source = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
            .find(|(key, value)| key == "source" && !value.is_empty())
            .map(|(_, value)| value.into_owned());
        Webhook {
            id: id.to_owned(),
            source,
        }
    }

    /// `delivery ID`, and `from source NAME` where the source was named.
    pub(super) fn describe(&self) -> String {
        match &self.source {
            Some(source) => format!(
                "delivery {} from source {}",
                self.id,
                crate::clipped::Clipped(source)
            ),
            None => format!("delivery {}", self.id),
        }
    }

    /// Its page (`action` empty) or an action's path, with its source.
    fn path(&self, action: &str) -> String {
        let mut path = format!("/deliveries/{}", encode(&self.id));
        if !action.is_empty() {
            path = format!("{path}/{action}");
        }
        match &self.source {
            Some(source) => format!("{path}?source={}", encode(source)),
            None => path,
        }
    }
}

/// An action and what it acts on.
#[derive(Clone)]
enum Action {
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
struct Window {
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
    fn parse(query: Option<&str>) -> Result<Window, String> {
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
    fn query(&self) -> String {
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
    fn listing(&self) -> String {
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
    fn question(&self, preview: &str) -> String {
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
    fn delivery(action: &str, webhook: Webhook) -> Action {
        match action {
            "replay" => Action::ReplayDelivery(webhook),
            _ => Action::Replan(webhook),
        }
    }

    fn trigger(action: &str, id: &str) -> Action {
        match (action, id.parse::<i64>()) {
            (_, Err(_)) => Action::Invalid(format!("{id:?} is not a trigger id")),
            ("cancel", Ok(id)) => Action::Cancel(id),
            (_, Ok(id)) => Action::ReplayTrigger(id),
        }
    }

    fn window(query: Option<&str>) -> Action {
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
async fn act(
    app: &Arc<App>,
    admin: &crate::config::admin::AdminConfig,
    access: &Access,
    parts: &http::request::Parts,
    body: Incoming,
    peer: SocketAddr,
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
    let carried_out = tokio::spawn({
        let (app, action) = (Arc::clone(app), action.clone());
        async move { carry_out(&app, peer, &action).await }
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

/// Performs the action, logs it and records who did it; its result.
async fn carry_out(app: &App, peer: SocketAddr, action: &Action) -> Result<Done, String> {
    let result = perform(app, action).await;
    let (ok, message) = match &result {
        Ok(done) => (true, done.message.as_str()),
        Err(message) => (false, message.as_str()),
    };
    tracing::info!(by = %peer, action = action.name(), target = %action.target(), ok, result = %message, "dashboard action");
    static RECORDED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now = crate::outbox::now_ms();
    let nth = RECORDED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    app.outbox.note(crate::outbox::NewDelivery {
        source: "admin".into(),
        delivery_id: format!("admin~{}-{now}-{nth}", action.name()),
        event_type: action.name().into(),
        headers: vec![("by".into(), peer.to_string())],
        body: crate::store::StoredBody::default(),
        summary: json!({
            "admin": { "action": action.name(), "target": action.target(), "by": peer.to_string(), "ok": ok },
            "note": format!("{} of {} by {peer}: {message}", action.name(), action.target()),
        })
        .to_string(),
        triggers: Vec::new(),
    }).await;
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
async fn preview(app: &Arc<App>, window: &Window) -> String {
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
async fn window_preview_json(app: &Arc<App>, window: &Window) -> Response<Full<Bytes>> {
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
async fn dry_run(
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
fn replan_delivery(
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
fn planned(replanned: &crate::replan::Replanned) -> String {
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
