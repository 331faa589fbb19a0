//! Every error a caller can see, and the one function that turns it into an HTTP answer.
//!
//! Answers are JSON in GitLab's style. Where GitLab's own trigger endpoint has an exact
//! answer (Grape's `{"error": "token is missing"}`, `{"message": "403 Forbidden"}`, the
//! variables message) the gateway gives that same answer, so scripts written against
//! GitLab keep working; everywhere else the message says what to fix.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use serde_json::json;

use crate::gateway::GatewayError;
use crate::gateway::params::ParamError;
use crate::sources::SourceError;
use crate::upstream::UpstreamError;

impl ApiError {
    /// The answer to a request a limit did not admit.
    pub fn limited(limit: &str, refused: crate::limits::Refused) -> ApiError {
        match refused {
            crate::limits::Refused::Over(wait) => ApiError::RateLimited {
                limit: limit.to_owned(),
                wait,
            },
            crate::limits::Refused::Unavailable(reason) => ApiError::LimitUnavailable {
                limit: limit.to_owned(),
                reason,
            },
            crate::limits::Refused::Full => ApiError::LimitFull {
                limit: limit.to_owned(),
            },
        }
    }
}

/// An error answered to the caller.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("no endpoint {method} {path}")]
    NotFound { method: String, path: String },
    #[error(
        "the project path in {path} is not URL-encoded, so it reads as several path segments; use {use_instead}"
    )]
    UnencodedProject { path: String, use_instead: String },
    /// Another method than POST on a trigger URL: GitLab has no route for it and answers
    /// `404 {"error":"404 Not Found"}`, so the gateway does too, saying what would work.
    #[error("{method} is not a route of GitLab's trigger API; use POST")]
    TriggerMethod { method: String },
    #[error("{method} is not allowed here; use {allowed}")]
    MethodNotAllowed {
        method: String,
        allowed: &'static str,
    },
    /// A webhook body sent compressed: its signature covers the compressed bytes and the
    /// relay reads only plain JSON or forms, so it would fail as "not JSON" after reading.
    #[error(
        "the body is sent with Content-Encoding: {0}, which hookrelay does not decode; send webhooks uncompressed"
    )]
    ContentEncoding(String),
    #[error("the request body is larger than the {limit}-byte limit ({setting})")]
    BodyTooLarge {
        limit: usize,
        /// The setting that sets it: `[server] max_body`, or `[gateway] max_body`.
        setting: &'static str,
    },
    #[error("the request body did not arrive within the read timeout ([server] read_timeout)")]
    BodyTimeout,
    /// Request bodies in memory are at `[server] body_memory`: this one waited, then gave up.
    #[error(
        "the relay holds as many request bodies as [server] body_memory allows; retry in a second"
    )]
    BodyMemory,
    #[error("the request body cannot be read: {0}")]
    BodyRead(String),
    /// A gateway call that could not get a place for its record before being forwarded:
    /// the store's writer is far behind (or its disk stopped answering).
    #[error(
        "the relay cannot record this call: too many records wait for its delivery store (is its disk answering?); nothing was sent to GitLab, retry in a second"
    )]
    RecordsBehind,
    #[error("the relay is shutting down")]
    ShuttingDown,
    /// `/readyz` while the store refuses writes: webhooks are answered `503` meanwhile.
    #[error(
        "not ready: the delivery store cannot be written ({0}); webhooks are refused until it can"
    )]
    StoreUnwritable(String),
    #[error("no source named {0:?} is configured; add a [source.NAME] section")]
    UnknownSource(String),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("?ref= in the webhook URL: {0}")]
    BadUrlRef(String),
    /// A webhook from an address the source's `allow_from` does not list.
    #[error(
        "{client} may not send webhooks to this source: it is not among the addresses its allow_from lists"
    )]
    AddressNotAllowed { client: std::net::IpAddr },
    /// A webhook to a source with `allow_from = ["github"]` before GitHub's addresses are
    /// known ([`crate::github_meta`]): refused rather than let in unchecked.
    #[error(
        "GitHub's webhook addresses are not known yet ({0}), and this source takes webhooks only from them (allow_from = [\"github\"])"
    )]
    GithubHooksUnknown(String),
    /// A gateway call from an address `[gateway] allow_from` does not list; GitLab's
    /// words first, for callers that compare them.
    #[error(
        "403 Forbidden: {client} may not call the trigger API through this gateway: it is not among the addresses [gateway] allow_from lists"
    )]
    GatewayAddressNotAllowed { client: std::net::IpAddr },
    /// Over a limit whose `on_limit` is `reject`.
    #[error("over the rate limit {limit}; retry in {} s", crate::limits::retry_after_seconds(*wait))]
    RateLimited {
        limit: String,
        wait: std::time::Duration,
    },
    /// A limit shared by the relays could not be checked (the database is unreachable):
    /// the request is refused rather than let through unchecked.
    #[error("{limit} cannot be checked now ({reason}); refused until it can be; retry in a second")]
    LimitUnavailable { limit: String, reason: String },
    /// An in-memory limit holds as many keys as it keeps: refused rather than grown.
    #[error(
        "{limit} keeps track of {} callers at most, and that many have called within its period; refused until some are idle; retry in a second",
        crate::limits::MOST_KEYS
    )]
    LimitFull { limit: String },
    /// The store did not confirm the webhook within `[server] ack_timeout` (a disk or
    /// database that stopped answering): not acknowledged. The webhook stays queued for
    /// the store; a redelivery with the same delivery id is recognised.
    #[error(
        "the delivery store did not confirm this webhook within {} ([server] ack_timeout){}, so it is not acknowledged; deliver it again (if the store takes it meanwhile, a redelivery with the same delivery id is answered as a duplicate)",
        humantime::format_duration(*within),
        problem.as_ref().map(|p| format!(": {p}")).unwrap_or_default()
    )]
    NotConfirmed {
        within: std::time::Duration,
        problem: Option<String>,
    },
    /// A gateway call refused before it was forwarded: the store's disk is below its
    /// reserve (see [`crate::disk_reserve`]).
    #[error("{0}; this call was not forwarded to GitLab, try again later")]
    DiskReserve(String),
    /// The webhook could not be stored, so it is not acknowledged: the sender retries.
    #[error("the webhook was not stored, so it is not acknowledged; try again: {0}")]
    Store(crate::outbox::StoreError),
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
}

/// The one place where errors become status codes and bodies.
pub fn error_response(err: &ApiError) -> Response<Full<Bytes>> {
    use GatewayError as G;
    let message = err.to_string();
    let (status, body) = match err {
        // Under GitLab's API the body has GitLab's own `error` too, as its catch-all route
        // answers, for clients that read it.
        ApiError::NotFound { path, .. } if !path.starts_with("/api/v4/") => {
            (StatusCode::NOT_FOUND, json!({ "message": message }))
        }
        ApiError::NotFound { .. } | ApiError::TriggerMethod { .. } => (
            StatusCode::NOT_FOUND,
            json!({ "error": "404 Not Found", "message": message }),
        ),
        ApiError::UnknownSource(_) => (StatusCode::NOT_FOUND, json!({ "message": message })),
        ApiError::AddressNotAllowed { .. } | ApiError::GatewayAddressNotAllowed { .. } => {
            (StatusCode::FORBIDDEN, json!({ "message": message }))
        }
        ApiError::RateLimited { wait, .. } => {
            let mut response = json_response(
                StatusCode::TOO_MANY_REQUESTS,
                &json!({ "message": message }),
            );
            let seconds = crate::limits::retry_after_seconds(*wait).to_string();
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_str(&seconds).expect("digits are a valid header"),
            );
            return response;
        }
        ApiError::LimitUnavailable { .. } | ApiError::LimitFull { .. } => {
            return retry_in_a_second(&message);
        }
        ApiError::Store(_) | ApiError::NotConfirmed { .. } => (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "message": message }),
        ),
        ApiError::Source(SourceError::Signature(_)) => {
            (StatusCode::UNAUTHORIZED, json!({ "message": message }))
        }
        ApiError::Source(_) | ApiError::BadUrlRef(_) | ApiError::UnencodedProject { .. } => {
            (StatusCode::BAD_REQUEST, json!({ "message": message }))
        }
        ApiError::MethodNotAllowed { allowed, .. } => {
            let mut response = json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                &json!({ "message": message }),
            );
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allowed));
            return response;
        }
        ApiError::ContentEncoding(_) => {
            // RFC 9110 15.5.16: say which codings would have been taken.
            let mut response = json_response(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                &json!({ "message": message }),
            );
            response.headers_mut().insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static("identity"),
            );
            return response;
        }
        ApiError::BodyTooLarge { .. } => {
            (StatusCode::PAYLOAD_TOO_LARGE, json!({ "message": message }))
        }
        ApiError::BodyTimeout => (StatusCode::REQUEST_TIMEOUT, json!({ "message": message })),
        ApiError::BodyMemory | ApiError::RecordsBehind => return retry_in_a_second(&message),
        ApiError::BodyRead(_) => (StatusCode::BAD_REQUEST, json!({ "message": message })),
        // GitHub's list is read again after 30 s at first, then less often.
        ApiError::GithubHooksUnknown(_) => return unavailable_for(&message, "60"),
        ApiError::ShuttingDown | ApiError::StoreUnwritable(_) | ApiError::DiskReserve(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "message": message }),
        ),
        ApiError::Gateway(gateway) => match gateway {
            G::Disabled => (StatusCode::NOT_FOUND, json!({ "message": message })),
            G::Project(_) | G::EmptyToken => (StatusCode::NOT_FOUND, json!({ "message": message })),
            G::Params(ParamError::Invalid(_)) => {
                (StatusCode::BAD_REQUEST, json!({ "error": message }))
            }
            G::Params(ParamError::UnsupportedContentType(_)) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                json!({ "message": message }),
            ),
            G::Params(_) => (StatusCode::BAD_REQUEST, json!({ "message": message })),
            G::PipelineHook => (StatusCode::FORBIDDEN, json!({ "message": "403 Forbidden" })),
            G::Ref(_) | G::Variable(_) | G::PathEncoding(_) => {
                (StatusCode::BAD_REQUEST, json!({ "message": message }))
            }
            G::NotATriggerToken(_) => (StatusCode::UNAUTHORIZED, json!({ "message": message })),
        },
        ApiError::Upstream(upstream) => match upstream {
            UpstreamError::Timeout { .. } => {
                (StatusCode::GATEWAY_TIMEOUT, json!({ "message": message }))
            }
            UpstreamError::Unreachable { .. }
            | UpstreamError::BadResponse { .. }
            | UpstreamError::Tls { .. }
            | UpstreamError::Proxy { .. } => {
                (StatusCode::BAD_GATEWAY, json!({ "message": message }))
            }
            UpstreamError::Busy { .. } => return retry_in_a_second(&message),
        },
    };
    json_response(status, &body)
}

/// `503` with `Retry-After: 1`: the relay is full for a moment (body memory, calls in
/// flight); the caller should simply come back.
fn retry_in_a_second(message: &str) -> Response<Full<Bytes>> {
    unavailable_for(message, "1")
}

/// `503` with `message` and `Retry-After: seconds`.
fn unavailable_for(message: &str, seconds: &'static str) -> Response<Full<Bytes>> {
    let mut response = json_response(
        StatusCode::SERVICE_UNAVAILABLE,
        &json!({ "message": message }),
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static(seconds));
    response
}

/// A JSON answer with the right content type.
pub fn json_response(status: StatusCode, body: &impl serde::Serialize) -> Response<Full<Bytes>> {
    let text = serde_json::to_vec(body).expect("an answer serializes");
    let mut response = Response::new(Full::new(Bytes::from(text)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_limit_says_so_and_when_to_try_again() {
        let answer = error_response(&ApiError::limited(
            "[gateway] limit.per_project (10/h)",
            crate::limits::Refused::Full,
        ));
        assert_eq!(answer.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(answer.headers()[header::RETRY_AFTER], "1");
        let body = futures_util::FutureExt::now_or_never(http_body_util::BodyExt::collect(
            answer.into_body(),
        ))
        .unwrap()
        .unwrap()
        .to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            json["message"],
            "[gateway] limit.per_project (10/h) keeps track of 100000 callers at most, and that \
             many have called within its period; refused until some are idle; retry in a second"
        );
    }
}
