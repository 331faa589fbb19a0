//! What every dashboard answer is made of: pages rendered from the embedded templates
//! under their content security policy, JSON answers, redirects, refusals, and the small
//! forms the pages post.

use std::sync::OnceLock;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use minijinja::Environment;
use serde_json::{Value, json};

use super::auth::{Access, Refusal};

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
pub(super) struct Page<'a> {
    pub(super) access: &'a Access,
    pub(super) can_log_in: bool,
    pub(super) flash: Option<String>,
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

pub(super) fn render(name: &str, page: &Page<'_>, values: Value) -> Response<Full<Bytes>> {
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

pub(super) fn html_response(status: StatusCode, html: String) -> Response<Full<Bytes>> {
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

pub(super) fn json_answer(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut response = crate::error::json_response(status, body);
    secure(response.headers_mut());
    response
}

pub(super) fn redirect(to: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SEE_OTHER;
    if let Ok(location) = HeaderValue::from_str(to) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    secure(response.headers_mut());
    response
}

pub(super) fn encode(id: &str) -> String {
    percent_encoding::utf8_percent_encode(id, percent_encoding::NON_ALPHANUMERIC).to_string()
}

pub(super) fn refused(refusal: Refusal, api: bool) -> Response<Full<Bytes>> {
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

pub(super) async fn read_form(body: Incoming) -> std::collections::HashMap<String, String> {
    let bytes = Limited::new(body, MAX_FORM)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    form_urlencoded::parse(&bytes).into_owned().collect()
}
