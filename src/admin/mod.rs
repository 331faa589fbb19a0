//! The delivery dashboard (`[admin]`): its own listener, never the webhook port. Server-
//! rendered pages (minijinja, auto-escaped, embedded in the binary) and the JSON API that
//! backs them read through the store interface, so they work on SQLite and PostgreSQL
//! alike. Every action asks for confirmation, needs the token ([`auth`]) and is recorded
//! in the store with the client's address (`admin~ACTION-…` deliveries of source `admin`).
//!
//! Pages: `/deliveries` (filters, pages by cursor, live updates), `/deliveries/{id}`
//! (`?source=` where two sources sent that id), `/health`, `/rules`, `/replan` (a window's
//! confirmation), `/login`. API: `GET /api/deliveries`, `GET /api/deliveries/{id}`,
//! `GET /api/health`, `GET /api/configuration`, `POST /api/deliveries/{id}/replay`,
//! `…/replan`, `POST /api/triggers/{id}/replay`, `…/cancel`, `GET|POST /api/replan`.
//!
//! This file routes and renders the pages; `actions` carries out what they ask,
//! `respond` makes every answer, [`view`] reads what they show.

mod actions;
pub mod auth;
mod respond;
pub mod view;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::json;

use crate::app::App;
use actions::{
    Action, Who, Window, act, dry_run, planned, preview, replan_delivery, window_preview_json,
};
use auth::{Access, Refusal};
use respond::{Page, html_response, json_answer, read_form, redirect, refused, render};
use view::Webhook;

/// One dashboard request: authorized, routed, logged.
pub async fn handle(
    app: &Arc<App>,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let started = std::time::Instant::now();
    let (method, path) = (request.method().clone(), request.uri().path().to_owned());
    let who = Who {
        peer,
        caller: app.caller(peer.ip(), request.headers()),
    };
    // Behind a trusted proxy, the log lines name the client it forwarded for too.
    let client = who
        .caller
        .via
        .map(|_| tracing::field::display(who.caller.client));
    let response = route(app, who, request).await;
    let status = response.status().as_u16();
    let elapsed_ms = (started.elapsed().as_secs_f64() * 10_000.0).round() / 10.0;
    let (method, path) = (
        crate::clipped::Clipped(method.as_str()),
        crate::clipped::Clipped(&path),
    );
    if status < 400 {
        tracing::info!(%peer, client, %method, %path, status, elapsed_ms, "dashboard request");
        return response;
    }
    // Refusals within the server's budget for them (anyone who reaches the port can
    // make them): a wrong token at warning level, with how many were left out.
    let Some(held_back) = app.may_log_refusal("dashboard", status) else {
        return response;
    };
    if status == 401 {
        tracing::warn!(%peer, client, %method, %path, status, elapsed_ms, held_back, "dashboard request refused: a wrong or missing token")
    } else {
        tracing::info!(%peer, client, %method, %path, status, elapsed_ms, held_back, "dashboard request refused")
    }
    response
}

async fn route(app: &Arc<App>, who: Who, request: Request<Incoming>) -> Response<Full<Bytes>> {
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
    let client = who.caller.client;
    if !crate::client_address::allowed(&admin.allow_from, client) {
        return json_answer(
            StatusCode::FORBIDDEN,
            &json!({ "message": format!("{client} may not use this dashboard: it is not among the addresses [admin] allow_from lists") }),
        );
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
            act(app, &admin, &access, &parts, body, who, Action::delivery(action, Webhook::named(id, query)), false).await
        }
        (&Method::POST, ["triggers", id, action @ ("cancel" | "replay")]) => {
            act(app, &admin, &access, &parts, body, who, Action::trigger(action, id), false).await
        }
        (&Method::POST, ["replan"]) => act(app, &admin, &access, &parts, body, who, Action::window(query), false).await,
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
            act(app, &admin, &access, &parts, body, who, Action::delivery(action, Webhook::named(id, query)), true).await
        }
        (&Method::POST, ["api", "triggers", id, action @ ("cancel" | "replay")]) => {
            act(app, &admin, &access, &parts, body, who, Action::trigger(action, id), true).await
        }
        (&Method::GET, ["api", "replan"]) => match Window::parse(query) {
            Ok(window) => window_preview_json(app, &window).await,
            Err(message) => json_answer(StatusCode::BAD_REQUEST, &json!({ "message": message })),
        },
        (&Method::POST, ["api", "replan"]) => act(app, &admin, &access, &parts, body, who, Action::window(query), true).await,
        _ if api => json_answer(StatusCode::NOT_FOUND, &json!({ "message": format!("no {} {} in the dashboard's API", crate::clipped::Clipped(parts.method.as_str()), crate::clipped::Clipped(&path)) })),
        _ => html_response(
            StatusCode::NOT_FOUND,
            "<!doctype html><title>not found</title><p>No such page. <a href=\"/deliveries\">Deliveries</a>".into(),
        ),
    }
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
