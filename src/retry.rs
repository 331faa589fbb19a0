//! What GitLab's answer means for a trigger, and when to try again.
//!
//! Classified once, here, as `design.md` ("GitLab's own rules") says: network errors,
//! timeouts, `5xx`, `408` and `429` are retried with exponential backoff and full jitter,
//! with `Retry-After` or `RateLimit-ResetTime` as a floor; GitLab's pipeline-creation limit
//! (a `400` saying "Too many pipelines created in the last minute") is retried after about
//! a minute; every other `4xx` is permanent, kept with GitLab's status and message (and the
//! pipeline's id and URL when a `422` names one).

use std::time::{Duration, SystemTime};

use http::StatusCode;

use crate::upstream::{UpstreamError, UpstreamResponse, flatten_message};

/// How retries are spaced and when they stop (`[delivery]` in the configuration).
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// The first retry waits up to this long.
    pub base: Duration,
    /// No wait is longer than this (floors from GitLab excepted).
    pub cap: Duration,
    /// A trigger still failing this long after it was accepted is given up.
    pub max_age: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(300),
            max_age: Duration::from_secs(24 * 3600),
        }
    }
}

/// GitLab's pipeline-creation limit answers `400` with this text, and no `Retry-After`.
const PIPELINE_RATE_LIMIT: &str = "Too many pipelines created in the last minute";
/// How long to wait after GitLab's pipeline-creation limit.
const PIPELINE_RATE_LIMIT_WAIT: Duration = Duration::from_secs(60);

/// What to do with a trigger after one attempt.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Sent {
        status: u16,
        pipeline_id: Option<i64>,
        pipeline_url: Option<String>,
    },
    Retry {
        /// At least this long; the backoff may add more.
        floor: Duration,
        status: Option<u16>,
        reason: String,
    },
    Failed {
        status: Option<u16>,
        reason: String,
        pipeline_id: Option<i64>,
        pipeline_url: Option<String>,
    },
}

impl Verdict {
    /// The verdict with `token` masked wherever the answer's words repeated it.
    pub fn without(self, token: &crate::secret::Secret) -> Verdict {
        match self {
            Verdict::Retry {
                floor,
                status,
                reason,
            } => Verdict::Retry {
                floor,
                status,
                reason: token.scrubbed_from(reason),
            },
            Verdict::Failed {
                status,
                reason,
                pipeline_id,
                pipeline_url,
            } => Verdict::Failed {
                status,
                reason: token.scrubbed_from(reason),
                pipeline_id,
                pipeline_url,
            },
            sent => sent,
        }
    }
}

/// The parts of GitLab's answer that classification reads; everything else is skipped.
#[derive(Default, serde::Deserialize)]
struct GitLabAnswer {
    id: Option<serde_json::Value>,
    web_url: Option<String>,
    message: Option<serde_json::Value>,
    error: Option<serde_json::Value>,
}

/// Answers that say "later": `5xx`, `408`, `429`.
pub fn retryable(status: StatusCode) -> bool {
    status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
}

/// A call that got no answer (unreachable, timed out): tried again.
pub fn unanswered(err: &UpstreamError) -> Verdict {
    Verdict::Retry {
        floor: Duration::ZERO,
        status: None,
        reason: err.to_string(),
    }
}

/// Classifies one attempt's result.
pub fn classify(result: &Result<UpstreamResponse, UpstreamError>, now: SystemTime) -> Verdict {
    let answer = match result {
        Ok(answer) => answer,
        Err(err) => return unanswered(err),
    };
    let status = answer.status;
    // One parse of GitLab's answer, into just the fields used: building a whole JSON tree
    // of a pipeline entity costs more than the rest of a gateway call.
    let parsed: GitLabAnswer = serde_json::from_slice(&answer.body).unwrap_or_default();
    let pipeline_id = parsed.id.and_then(|v| v.as_i64());
    let pipeline_url = parsed.web_url;
    if status.is_success() && pipeline_id.is_some() {
        return Verdict::Sent {
            status: status.as_u16(),
            pipeline_id,
            pipeline_url,
        };
    }
    // What GitLab said, read only where it is used: the start of every pipeline's answer,
    // copied character by character, was 5 % of a gateway call's request path.
    let message = parsed
        .message
        .or(parsed.error)
        .map(|m| flatten_message(&m))
        .unwrap_or_else(|| {
            String::from_utf8_lossy(&answer.body)
                .chars()
                .take(300)
                .collect()
        });
    if status.is_success() {
        // Not GitLab's answer: a pipeline it started would be in it.
        return Verdict::Failed {
            status: Some(status.as_u16()),
            reason: without_a_pipeline(status, answer, &message),
            pipeline_id: None,
            pipeline_url: None,
        };
    }
    let reason = match redirected_to(status, &answer.headers) {
        Some(location) => format!(
            "{} redirected to {location}: a trigger call is not followed (a redirected POST loses its method or body); set the upstream's url to where it leads (https:// for http://, or GitLab's external URL)",
            status.as_u16()
        ),
        None => reason_for(status, &message),
    };
    if retryable(status) {
        return Verdict::Retry {
            floor: wait_asked_for(&answer.headers, now).unwrap_or(Duration::ZERO),
            status: Some(status.as_u16()),
            reason,
        };
    }
    if status == StatusCode::BAD_REQUEST && message.contains(PIPELINE_RATE_LIMIT) {
        return Verdict::Retry {
            floor: PIPELINE_RATE_LIMIT_WAIT,
            status: Some(status.as_u16()),
            reason,
        };
    }
    Verdict::Failed {
        status: Some(status.as_u16()),
        reason,
        pipeline_id,
        pipeline_url,
    }
}

/// Where a redirect leads (a GitLab reached over `http://` sends callers to `https://`,
/// one reached by another name to its external URL): said in the failure, since the
/// body of a redirect says little. Only its scheme, host and path: a redirect keeps the
/// query, and the webhook form's trigger token is in it.
pub(crate) fn redirected_to(status: StatusCode, headers: &http::HeaderMap) -> Option<String> {
    if !status.is_redirection() {
        return None;
    }
    let location = headers.get(http::header::LOCATION)?.to_str().ok()?;
    let uri: http::Uri = location.trim().parse().ok()?;
    let path = uri.path();
    let place = match (uri.scheme_str(), uri.host()) {
        (Some(scheme), Some(host)) => match uri.port_u16() {
            Some(port) => format!("{scheme}://{host}:{port}{path}"),
            None => format!("{scheme}://{host}{path}"),
        },
        _ => path.to_owned(),
    };
    Some(crate::clipped::clipped(&place))
}

/// Why a success without a pipeline is not taken for one. GitLab's trigger API answers
/// `201` with the pipeline it created (its `id` and `web_url`); a `200` login page of an
/// authenticating proxy in front of GitLab, or a URL that leads to another service, would
/// otherwise be recorded as sent while no pipeline started. Recorded as failed instead,
/// the trigger is kept, shown and can be replayed once the URL is right.
fn without_a_pipeline(status: StatusCode, answer: &UpstreamResponse, body: &str) -> String {
    let content_type = answer
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("no content type");
    let start: String = body.trim().chars().take(100).collect();
    format!(
        "{} without a pipeline ({content_type}: {start:?}): GitLab's trigger API answers 201 with the pipeline it created; the upstream's url may lead to a login page, a proxy or another service rather than GitLab's API. Nothing says a pipeline started: correct the url, then replay the trigger",
        status.as_u16()
    )
}

/// GitLab's message with its status, said once (`404 Not Found`, not `404 404 Not Found`),
/// and for the refusals whose usual causes are not in GitLab's words, those causes.
fn reason_for(status: StatusCode, message: &str) -> String {
    let code = status.as_u16().to_string();
    let mut reason = if message.trim_start().starts_with(&code) {
        message.trim().to_owned()
    } else {
        format!("{code} {message}")
    };
    if let Some(hint) = hint_for(status, message) {
        reason.push_str(" — ");
        reason.push_str(hint);
    }
    reason
}

/// What to do about a refusal, from GitLab's words where they name the cause (each
/// pipeline-creation step answers `400` with its own message, as
/// `docs/reference`'s survey of GitLab's code lists them), else from the status.
fn hint_for(status: StatusCode, message: &str) -> Option<&'static str> {
    const BY_MESSAGE: &[(&str, &str)] = &[
        (
            "Insufficient permissions to set pipeline variables",
            "the target project allows pipeline variables only from a higher role than the trigger token's owner has (Settings > CI/CD > Variables > Minimum role to use pipeline variables; GitLab.com makes new projects \"No one allowed\" since 17.7): lower that setting, use a token of an owner with that role, or pass the values as `inputs` instead of `variables`",
        ),
        (
            "Pipeline filtered out by workflow rules",
            "the target project's `workflow:rules` start no pipeline for this call: add a rule that runs when `$CI_PIPELINE_SOURCE == \"trigger\"`",
        ),
        (
            "sufficient permission to run a pipeline on",
            "the trigger token's owner may not run pipelines on this ref: a protected branch needs an owner allowed to push or merge to it, a protected tag one allowed to create it",
        ),
        (
            "Insufficient permissions to create a new pipeline",
            "the trigger token's owner may not run pipelines in the target project any more (removed, or a role below Developer); create the trigger token again as a member who may",
        ),
        (
            "Reference not found",
            "the target project has no branch or tag of this name: check the rule's or the caller's `ref` (a commit SHA is not a ref; pass it as a variable)",
        ),
        (
            "Ref is ambiguous",
            "a branch and a tag of the target project share this name: give the ref in full, `refs/heads/NAME` or `refs/tags/NAME`",
        ),
        (
            "Job is not running",
            "a CI job token works only while its job runs, and the call reached GitLab after the job ended (it waited in a rate limit or for retries): callers whose calls may wait should use a pipeline trigger token",
        ),
    ];
    if let Some((_, hint)) = BY_MESSAGE.iter().find(|(words, _)| message.contains(words)) {
        return Some(hint);
    }
    match status {
        StatusCode::NOT_FOUND => Some(
            "GitLab answers 404 for a wrong or revoked trigger token and for a project the token's owner cannot see or that does not exist (check the project path or id, and the token under Settings > CI/CD > Pipeline trigger tokens)",
        ),
        StatusCode::UNAUTHORIZED => Some(
            "the token was not accepted: trigger tokens start with glptt-; a personal or deploy token does not work here",
        ),
        StatusCode::FORBIDDEN => Some(
            "GitLab's trigger API itself answers 403 only to a call marked as a pipeline hook (`X-Gitlab-Event: Pipeline Hook`, its guard against loops); otherwise a proxy, a firewall or an IP allowlist in front of GitLab refused the call",
        ),
        _ => None,
    }
}

/// The longest wait an answer may ask for: a day. GitLab asks for seconds to a minute;
/// a wait beyond a day is a broken header (or a proxy's), and taken as it was written
/// (`Retry-After: 18446744073709551615`) it overflowed the arithmetic of the retry.
pub const LONGEST_WAIT_ASKED: Duration = Duration::from_secs(24 * 3600);

/// `Retry-After` (seconds or an HTTP date), else `RateLimit-ResetTime` (an HTTP date), at
/// most [`LONGEST_WAIT_ASKED`].
pub fn wait_asked_for(headers: &http::HeaderMap, now: SystemTime) -> Option<Duration> {
    asked_for(headers, now).map(|wait| wait.min(LONGEST_WAIT_ASKED))
}

fn asked_for(headers: &http::HeaderMap, now: SystemTime) -> Option<Duration> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(value) = header("retry-after") {
        if let Ok(seconds) = value.parse::<u64>() {
            return Some(Duration::from_secs(seconds));
        }
        if let Ok(when) = httpdate::parse_http_date(value) {
            return Some(when.duration_since(now).unwrap_or(Duration::ZERO));
        }
    }
    let when = httpdate::parse_http_date(header("ratelimit-resettime")?).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

impl RetryPolicy {
    /// The wait before retry number `attempt` (1 for the first retry): full jitter over an
    /// exponentially growing window, never below `floor`.
    pub fn delay(&self, attempt: u32, floor: Duration, random: f64) -> Duration {
        let window = self
            .base
            .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1).min(30)))
            .min(self.cap);
        window.mul_f64(random.clamp(0.0, 1.0)).max(floor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    #[test]
    fn reasons_say_the_status_once_and_hint_at_the_usual_causes() {
        let reason = reason_for(StatusCode::NOT_FOUND, "404 Not Found");
        assert!(
            reason.starts_with(
                "404 Not Found — GitLab answers 404 for a wrong or revoked trigger token"
            ),
            "{reason}"
        );
        assert!(
            reason_for(StatusCode::BAD_REQUEST, "base: Reference not found")
                .starts_with("400 base: Reference not found — the target project has no branch")
        );
        assert!(
            reason_for(StatusCode::FORBIDDEN, "403 Forbidden")
                .starts_with("403 Forbidden — GitLab's trigger API itself answers 403 only")
        );
        assert!(
            reason_for(StatusCode::UNAUTHORIZED, "401 Unauthorized")
                .starts_with("401 Unauthorized — ")
        );
    }

    fn answer(
        status: u16,
        body: &str,
        headers: &[(&'static str, &str)],
    ) -> Result<UpstreamResponse, UpstreamError> {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.insert(*k, v.parse().unwrap());
        }
        Ok(UpstreamResponse {
            status: StatusCode::from_u16(status).unwrap(),
            headers: map,
            body: bytes::Bytes::from(body.to_owned()),
            latency: Duration::ZERO,
        })
    }

    #[test]
    fn gitlabs_answers_are_classified_as_design_md_says() {
        let now = SystemTime::now();
        let created = include_str!("../tests/fixtures/gitlab/trigger_response.json");
        assert!(matches!(
            classify(&answer(201, created, &[]), now),
            Verdict::Sent {
                pipeline_id: Some(_),
                pipeline_url: Some(_),
                ..
            }
        ));
        for status in [500, 502, 503, 408] {
            assert!(
                matches!(
                    classify(&answer(status, "", &[]), now),
                    Verdict::Retry { .. }
                ),
                "{status}"
            );
        }
        assert_eq!(
            classify(&answer(429, "Retry later", &[("retry-after", "17")]), now),
            Verdict::Retry {
                floor: Duration::from_secs(17),
                status: Some(429),
                reason: "429 Retry later".into()
            }
        );
        let limited = r#"{"message":{"base":["Too many pipelines created in the last minute. Try again later."]}}"#;
        assert!(
            matches!(classify(&answer(400, limited, &[]), now), Verdict::Retry { floor, .. } if floor == Duration::from_secs(60))
        );
        // Where a redirect leads, without its query (the webhook form's token is there)
        // or any credentials.
        let moved = classify(
            &answer(
                301,
                "<html>301 Moved Permanently</html>",
                &[(
                    "location",
                    "https://user:pw@gitlab.example.com:8443/api/v4/projects/9/ref/main/trigger/pipeline?token=glptt-secret",
                )],
            ),
            now,
        );
        assert!(
            matches!(&moved, Verdict::Failed { status: Some(301), reason, .. }
                if reason.starts_with("301 redirected to https://gitlab.example.com:8443/api/v4/projects/9/ref/main/trigger/pipeline: ")
                    && !reason.contains("glptt-secret") && !reason.contains("pw@")),
            "{moved:?}"
        );
        // A success that is not GitLab's (a proxy's login page) is no pipeline.
        let login = classify(
            &answer(
                200,
                "<!DOCTYPE html><title>Sign in</title>",
                &[("content-type", "text/html")],
            ),
            now,
        );
        assert!(
            matches!(&login, Verdict::Failed { status: Some(200), reason, pipeline_id: None, .. }
                if reason.starts_with("200 without a pipeline (text/html: \"<!DOCTYPE html><title>Sign in</title>\")")),
            "{login:?}"
        );
        assert!(matches!(
            classify(&answer(201, "{}", &[]), now),
            Verdict::Failed {
                status: Some(201),
                ..
            }
        ));
        let not_found = classify(
            &answer(400, r#"{"message":{"base":["Reference not found"]}}"#, &[]),
            now,
        );
        assert_eq!(
            not_found,
            Verdict::Failed {
                status: Some(400),
                reason: reason_for(StatusCode::BAD_REQUEST, "base: Reference not found"),
                pipeline_id: None,
                pipeline_url: None
            }
        );
        for status in [401, 403, 404] {
            assert!(
                matches!(
                    classify(&answer(status, r#"{"message":"x"}"#, &[]), now),
                    Verdict::Failed { .. }
                ),
                "{status}"
            );
        }
        let failed_pipeline =
            r#"{"message":"Duplicate variable","id":7,"web_url":"https://g/p/-/pipelines/7"}"#;
        assert!(matches!(
            classify(&answer(422, failed_pipeline, &[]), now),
            Verdict::Failed {
                status: Some(422),
                pipeline_id: Some(7),
                ..
            }
        ));
        let unreachable: Result<UpstreamResponse, UpstreamError> =
            Err(UpstreamError::Unreachable {
                upstream: crate::upstream::Called::Upstream("gitlab".into()),
                url: "http://x".into(),
                reason: "refused".into(),
            });
        assert!(matches!(
            classify(&unreachable, now),
            Verdict::Retry { status: None, .. }
        ));
    }

    #[test]
    fn rate_limit_reset_time_is_a_floor() {
        let now = httpdate::parse_http_date("Wed, 25 Nov 2026 10:00:00 GMT").unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(
            "ratelimit-resettime",
            "Wed, 25 Nov 2026 10:00:42 GMT".parse().unwrap(),
        );
        assert_eq!(wait_asked_for(&headers, now), Some(Duration::from_secs(42)));
        headers.insert(
            "retry-after",
            "Wed, 25 Nov 2026 10:00:05 GMT".parse().unwrap(),
        );
        assert_eq!(wait_asked_for(&headers, now), Some(Duration::from_secs(5)));
    }

    #[test]
    fn a_wait_asked_for_is_at_most_a_day() {
        let now = httpdate::parse_http_date("Wed, 25 Nov 2026 10:00:00 GMT").unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("retry-after", "18446744073709551615".parse().unwrap());
        assert_eq!(wait_asked_for(&headers, now), Some(LONGEST_WAIT_ASKED));
        headers.insert(
            "retry-after",
            "Fri, 31 Dec 9999 23:59:59 GMT".parse().unwrap(),
        );
        assert_eq!(wait_asked_for(&headers, now), Some(LONGEST_WAIT_ASKED));
        // A whole retry with it stays in range: the verdict's floor, then the backoff.
        let answer = UpstreamResponse {
            status: StatusCode::SERVICE_UNAVAILABLE,
            headers,
            body: bytes::Bytes::new(),
            latency: Duration::ZERO,
        };
        let Verdict::Retry { floor, .. } = classify(&Ok(answer), now) else {
            panic!("a 503 is retried");
        };
        let delay = RetryPolicy::default().delay(40, floor, 0.999);
        assert_eq!(delay, LONGEST_WAIT_ASKED);
    }

    #[test]
    fn backoff_grows_with_full_jitter_under_a_cap() {
        let policy = RetryPolicy {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(60),
            max_age: Duration::from_secs(3600),
        };
        assert_eq!(policy.delay(1, Duration::ZERO, 1.0), Duration::from_secs(1));
        assert_eq!(policy.delay(4, Duration::ZERO, 1.0), Duration::from_secs(8));
        assert_eq!(
            policy.delay(20, Duration::ZERO, 1.0),
            Duration::from_secs(60)
        );
        assert_eq!(policy.delay(4, Duration::ZERO, 0.5), Duration::from_secs(4));
        assert_eq!(policy.delay(4, Duration::ZERO, 0.0), Duration::ZERO);
        assert_eq!(
            policy.delay(1, Duration::from_secs(30), 0.1),
            Duration::from_secs(30)
        );
        assert_eq!(
            policy.delay(u32::MAX, Duration::ZERO, 1.0),
            Duration::from_secs(60)
        );
    }

    /// Every refusal in the catalogue of GitLab's trigger API (derived from its code and
    /// specs): retried or given up as `design.md` says, GitLab's own words kept, and the
    /// refusals whose cause GitLab's words do not say come with it.
    #[test]
    fn every_refusal_gitlab_documents_keeps_its_words_and_says_what_to_do() {
        let now = SystemTime::now();
        let catalogue: serde_json::Value = serde_json::from_str(include_str!(
            "../tests/fixtures/gitlab/trigger_error_responses.json"
        ))
        .unwrap();
        let hints = [
            (
                "pipeline_vars_forbidden",
                "Minimum role to use pipeline variables",
            ),
            (
                "workflow_rules_filtered",
                "$CI_PIPELINE_SOURCE == \"trigger\"",
            ),
            ("ref_not_found", "has no branch or tag of this name"),
            ("ref_ambiguous", "`refs/heads/NAME` or `refs/tags/NAME`"),
            ("job_token_job_not_running", "only while its job runs"),
            ("unknown_project", "wrong or revoked trigger token"),
            ("bad_or_foreign_token", "wrong or revoked trigger token"),
            ("pipeline_hook_loop", "`X-Gitlab-Event: Pipeline Hook`"),
        ];
        let mut seen = 0;
        for (case, entry) in catalogue.as_object().unwrap() {
            if case.starts_with('_') {
                continue;
            }
            seen += 1;
            let status = entry["status"].as_u64().unwrap() as u16;
            let (body, words) = match (&entry.get("body"), entry.get("body_text")) {
                (Some(body), _) => {
                    let words = flatten_message(body.get("message").or(body.get("error")).unwrap());
                    (body.to_string(), words)
                }
                (None, Some(text)) => (
                    text.as_str().unwrap().to_owned(),
                    text.as_str().unwrap().to_owned(),
                ),
                (None, None) => panic!("{case} has no body"),
            };
            let verdict = classify(&answer(status, &body, &[]), now);
            let reason = match &verdict {
                Verdict::Retry { reason, .. } => {
                    assert!(
                        status == 429 || case == "pipeline_rate_limited",
                        "{case} is retried"
                    );
                    reason
                }
                Verdict::Failed { reason, .. } => {
                    assert!(
                        status != 429 && case != "pipeline_rate_limited",
                        "{case} is given up"
                    );
                    reason
                }
                Verdict::Sent { .. } => panic!("{case} taken for a pipeline"),
            };
            assert!(reason.contains(&words), "{case}: {reason} lacks {words:?}");
            if let Some((_, hint)) = hints.iter().find(|(name, _)| name == case) {
                assert!(
                    reason.contains(hint),
                    "{case}: {reason}\n  should say {hint}"
                );
            }
        }
        assert_eq!(seen, 15, "the catalogue's cases");
    }
}
