//! The forwarder's side of statuses: posting a queued status to its forge, and polling a
//! pipeline where no pipeline events come.
//!
//! Both are attempts on claimed work, like a trigger's: the outcome is recorded under the
//! claim's lease, retries back off with the `[delivery]` policy (no sooner than the forge
//! or GitLab asks), and a token is resolved only here, never stored or logged. Posts to a
//! GitHub source are paced at 80 a minute (GitHub's guidance for content-creating
//! requests); polls at `[upstream.NAME] polls_per_minute` (the clients and paces are
//! [`crate::status::StatusClients`], built with each configuration).

use std::time::{Duration, Instant, SystemTime};

use http::{HeaderMap, HeaderValue, Method};

use super::{ForwarderOptions, backoff, claim_too_old};
use crate::app::App;
use crate::metrics::{PollOutcome, StatusOutcome};
use crate::outbox::{DueTrigger, Outbox, Recorded, now_ms};
use crate::retry::Verdict;
use crate::secret::Secret;
use crate::status::{PipelineEvent, PipelineUpdate, StatusPost, forge};
use crate::upstream::{ReadToken, UpstreamError, UpstreamResponse};

/// The longest wait between two polls of one pipeline.
const POLL_CAP: Duration = Duration::from_secs(300);

/// Records a retry after `floor`, or gives up when the policy's age is reached.
fn retry(
    outbox: &Outbox,
    due: &DueTrigger,
    options: &ForwarderOptions,
    floor: Duration,
    status: Option<u16>,
    reason: String,
) -> Result<(), String> {
    let delay = backoff(options, due, due.attempts + 1, floor, &reason)?;
    outbox.record(
        due.lease,
        Recorded::Retry {
            due_at: now_ms() + delay.as_millis() as i64,
            status,
            reason,
        },
    );
    Ok(())
}

fn fail(outbox: &Outbox, due: &DueTrigger, status: Option<u16>, reason: String) {
    outbox.record(
        due.lease,
        Recorded::Failed {
            status,
            reason,
            pipeline_id: due.pipeline_id,
            pipeline_url: None,
        },
    );
}

/// The status token: as resolved at load when the source still names it, else resolved
/// now from the stored reference.
fn status_token(app: &App, source: &str, token_ref: &str) -> Result<Secret, String> {
    let runtime = app.runtime();
    let loaded = runtime
        .config
        .sources
        .get(source)
        .and_then(|s| s.status.as_ref())
        .filter(|status| status.token_ref.to_string() == token_ref)
        .and_then(|status| status.token.clone());
    crate::secret::loaded_or_stored(loaded, token_ref)
        .map_err(|err| format!("status token {token_ref}: {err}"))
}

/// One attempt at posting one status.
pub async fn post(
    app: &App,
    outbox: &Outbox,
    due: DueTrigger,
    options: &ForwarderOptions,
    claimed_at: Instant,
) {
    let runtime = app.runtime();
    let post: StatusPost =
        match serde_json::from_value(serde_json::Value::Object(due.variables.clone())) {
            Ok(post) => post,
            Err(err) => {
                fail(
                    outbox,
                    &due,
                    None,
                    format!("the stored status cannot be read: {err}"),
                );
                return;
            }
        };
    let forge = post.target.forge.as_str();
    let (source, repository, context) =
        (&due.upstream, &post.target.repository, &post.target.context);
    let sha = crate::status::short(&post.target.sha);
    let Some(client) = runtime.status.forge(source) else {
        let reason =
            format!("source {source} no longer has `status = {{ … }}`; the status was not posted");
        tracing::warn!(%source, %repository, %sha, %context, %reason, "commit status not posted");
        app.metrics.status_post(forge, StatusOutcome::Failed);
        fail(outbox, &due, None, reason);
        return;
    };
    let token = match status_token(app, source, &due.token_ref) {
        Ok(token) => token,
        Err(reason) => {
            tracing::warn!(%source, %repository, %sha, %context, %reason, "commit status not posted");
            app.metrics.status_post(forge, StatusOutcome::Failed);
            fail(outbox, &due, None, reason);
            return;
        }
    };
    if let Some(left) = claim_too_old(outbox, claimed_at, client.timeout()) {
        tracing::warn!(%source, %repository, %sha, %context, left_ms = left.as_millis() as u64, "claim too old to start a status post; handed back");
        outbox.record(due.lease, Recorded::Released);
        return;
    }
    if let Some(pace) = runtime.status.post_pace(source)
        && let Err(crate::limits::Refused::Over(wait)) = pace.check(source).await
    {
        tracing::info!(%source, %repository, %sha, %context, wait_ms = wait.as_millis() as u64, limit = %pace.name, "commit status paced");
        outbox.record(
            due.lease,
            Recorded::Deferred {
                due_at: now_ms() + wait.as_millis() as i64,
                reason: format!("paced: {}", pace.name),
            },
        );
        return;
    }
    let request = match forge::request(&post, &token) {
        Ok(request) => request,
        Err(reason) => {
            app.metrics.status_post(forge, StatusOutcome::Failed);
            fail(outbox, &due, None, reason);
            return;
        }
    };
    if options.dry_run {
        let would_send = format!(
            "dry run: {} {}{} {}",
            request.method,
            client.url(),
            request.path,
            String::from_utf8_lossy(&request.body)
        );
        tracing::info!(%source, %repository, %sha, %context, %would_send, "commit status not posted (dry run)");
        outbox.record(due.lease, Recorded::DryRun { would_send });
        return;
    }
    let state = post.target.forge.state(&post.state);
    let mut result = client
        .call(
            request.method.clone(),
            &request.path,
            request.headers.clone(),
            request.body.clone(),
        )
        .await;
    // A renamed or transferred repository: GitHub answers `307` with its new URL, once.
    if let Ok(answer) = &result
        && matches!(answer.status.as_u16(), 307 | 308)
        && let Some(moved) = answer
            .headers
            .get(http::header::LOCATION)
            .and_then(|location| location.to_str().ok())
            .and_then(|location| forge::redirect_within(client.url(), location))
    {
        tracing::info!(%source, %repository, %sha, %context, to = %crate::clipped::clipped(&moved), "the forge moved the repository; status posted where it says");
        result = client
            .call(request.method, &moved, request.headers, request.body)
            .await;
    }
    match forge::classify(&result, SystemTime::now()) {
        Verdict::Sent { status, .. } => {
            tracing::info!(%source, %repository, %sha, %context, state, pipeline = post.pipeline_id, status, "commit status posted");
            app.metrics.status_post(forge, StatusOutcome::Sent);
            outbox.record(
                due.lease,
                Recorded::Sent {
                    status,
                    pipeline_id: Some(post.pipeline_id),
                    pipeline_url: post.target_url.clone(),
                },
            );
        }
        Verdict::Retry {
            floor,
            status,
            reason,
        } => match retry(outbox, &due, options, floor, status, reason.clone()) {
            Ok(()) => {
                tracing::info!(%source, %repository, %sha, %context, state, %reason, retry_in_ms = floor.as_millis() as u64, "commit status will be posted again");
                app.metrics.status_post(forge, StatusOutcome::Retried);
            }
            Err(gave_up) => {
                tracing::warn!(%source, %repository, %sha, %context, state, reason = %gave_up, "commit status not posted");
                app.metrics.status_post(forge, StatusOutcome::Failed);
                fail(outbox, &due, status, gave_up);
            }
        },
        Verdict::Failed { status, reason, .. } => {
            tracing::warn!(%source, %repository, %sha, %context, state, %reason, "commit status refused by the forge");
            app.metrics.status_post(forge, StatusOutcome::Failed);
            fail(outbox, &due, status, reason);
        }
    }
}

/// The wait before the poll after `polls` polls: `first` doubling to 5 minutes.
fn poll_delay(first: Duration, polls: i64) -> Duration {
    first
        .saturating_mul(2u32.saturating_pow(polls.clamp(0, 16) as u32))
        .min(POLL_CAP)
}

/// One look at a pipeline hookrelay started, for its state.
pub async fn poll(
    app: &App,
    outbox: &Outbox,
    due: DueTrigger,
    options: &ForwarderOptions,
    claimed_at: Instant,
) {
    let runtime = app.runtime();
    let upstream_name = &due.upstream;
    let pipeline_id = due.pipeline_id.unwrap_or_default();
    let configured = runtime.config.upstreams.get(upstream_name);
    let read_token = configured.and_then(|u| u.read_token.clone());
    let first = configured.map_or(Duration::from_secs(10), |u| u.poll_interval);
    let (Some(read_token), Some(upstream)) =
        (read_token, runtime.upstreams.get(upstream_name).cloned())
    else {
        app.metrics.pipeline_poll(PollOutcome::Failed);
        fail(
            outbox,
            &due,
            None,
            format!(
                "upstream {upstream_name} has no read_token now; pipeline #{pipeline_id} is no longer polled"
            ),
        );
        return;
    };
    if let Some(left) = claim_too_old(outbox, claimed_at, upstream.timeout()) {
        tracing::warn!(upstream = %upstream_name, pipeline = pipeline_id, left_ms = left.as_millis() as u64, "claim too old to start a poll; handed back");
        outbox.record(due.lease, Recorded::Released);
        return;
    }
    if let Some(pace) = runtime.status.poll_pace(upstream_name)
        && let Err(crate::limits::Refused::Over(wait)) = pace.check(upstream_name).await
    {
        app.metrics.pipeline_poll(PollOutcome::Deferred);
        outbox.record(
            due.lease,
            Recorded::Deferred {
                due_at: now_ms()
                    + (wait + Duration::from_millis(fastrand::u64(0..1000))).as_millis() as i64,
                reason: format!("paced: {}", pace.name),
            },
        );
        return;
    }
    let (path, headers) = match poll_call(&read_token, &due, pipeline_id) {
        Ok(call) => call,
        Err(reason) => {
            app.metrics.pipeline_poll(PollOutcome::Failed);
            fail(outbox, &due, None, reason);
            return;
        }
    };
    let result = upstream
        .call(Method::GET, &path, headers, bytes::Bytes::new())
        .await;
    record_poll(app, outbox, options, &due, first, result);
}

/// The poll's path and headers: the pipeline's API URL, and the `read_token` (resolved at
/// load, or now from its reference) as `PRIVATE-TOKEN`, marked sensitive.
fn poll_call(
    read_token: &ReadToken,
    due: &DueTrigger,
    pipeline_id: i64,
) -> Result<(String, HeaderMap), String> {
    let upstream_name = &due.upstream;
    let token = read_token
        .token
        .clone()
        .map_or_else(|| read_token.reference.resolve(), Ok)
        .map_err(|reason| format!("upstream.{upstream_name}.read_token: {reason}"))?;
    let project = crate::trigger::ProjectId::parse(&due.project)
        .map_err(|_| format!("project {:?} cannot be named in a URL", due.project))?;
    let value = token.header_value("").ok_or_else(|| {
        format!("upstream.{upstream_name}.read_token holds characters a header cannot carry")
    })?;
    let mut headers = HeaderMap::new();
    headers.insert("private-token", value);
    headers.insert(
        http::header::ACCEPT,
        HeaderValue::from_static("application/json"),
    );
    let path = format!(
        "/api/v4/projects/{}/pipelines/{pipeline_id}",
        project.encoded()
    );
    Ok((path, headers))
}

/// Records what a poll found: the pipeline's state (finished, still running and looked at
/// again later, or running past the policy's age), or a retry or refusal of the poll.
fn record_poll(
    app: &App,
    outbox: &Outbox,
    options: &ForwarderOptions,
    due: &DueTrigger,
    first: Duration,
    result: Result<UpstreamResponse, UpstreamError>,
) {
    let upstream_name = &due.upstream;
    let pipeline_id = due.pipeline_id.unwrap_or_default();
    let answer = match &result {
        Ok(answer) if answer.status.is_success() => PipelineEvent::from_entity(&answer.body),
        _ => Err(String::new()),
    };
    match answer {
        Ok(event) => {
            let finished = crate::status::is_finished(&event.status);
            let age = Duration::from_millis((now_ms() - due.created_at).max(0) as u64);
            let recorded = if finished {
                app.metrics.pipeline_poll(PollOutcome::Finished);
                Recorded::Sent {
                    status: 200,
                    pipeline_id: Some(pipeline_id),
                    pipeline_url: event.url.clone(),
                }
            } else if age > options.policy.max_age {
                app.metrics.pipeline_poll(PollOutcome::Failed);
                Recorded::Failed {
                    status: Some(200),
                    reason: format!(
                        "pipeline #{pipeline_id} is still {} after {}s; it is no longer polled",
                        event.status,
                        age.as_secs()
                    ),
                    pipeline_id: Some(pipeline_id),
                    pipeline_url: event.url.clone(),
                }
            } else {
                app.metrics.pipeline_poll(PollOutcome::Polled);
                let wait = poll_delay(first, due.attempts + 1);
                Recorded::Retry {
                    due_at: now_ms() + wait.as_millis() as i64,
                    status: Some(200),
                    reason: format!(
                        "pipeline #{pipeline_id} is {}; looked again in {}s",
                        event.status,
                        wait.as_secs()
                    ),
                }
            };
            tracing::debug!(upstream = %upstream_name, pipeline = pipeline_id, status = %event.status, "pipeline polled");
            outbox.polled(
                PipelineUpdate {
                    upstream: upstream_name.clone(),
                    event,
                    delivery: None,
                },
                due.lease,
                recorded,
            );
        }
        Err(unreadable) => {
            let verdict = match &result {
                Ok(answer) if answer.status.is_success() => Verdict::Retry {
                    floor: Duration::ZERO,
                    status: Some(answer.status.as_u16()),
                    reason: unreadable,
                },
                _ => crate::retry::classify(&result, SystemTime::now()),
            };
            match verdict {
                Verdict::Retry {
                    floor,
                    status,
                    reason,
                } => {
                    let floor = floor.max(poll_delay(first, due.attempts));
                    app.metrics.pipeline_poll(PollOutcome::Retried);
                    if let Err(gave_up) = retry(outbox, due, options, floor, status, reason) {
                        fail(outbox, due, status, gave_up);
                    }
                }
                refused => {
                    let status = match refused {
                        Verdict::Failed { status, .. } => status,
                        _ => None,
                    };
                    app.metrics.pipeline_poll(PollOutcome::Failed);
                    let said = result
                        .as_ref()
                        .ok()
                        .and_then(|a| crate::upstream::readable_message(&a.body))
                        .unwrap_or_default();
                    let reason = format!(
                        "{} {said} — polling pipeline #{pipeline_id} stopped: upstream.{upstream_name}.read_token needs the read_api scope and access to project {}",
                        status.unwrap_or_default(),
                        due.project
                    );
                    tracing::warn!(upstream = %upstream_name, pipeline = pipeline_id, %reason, "pipeline poll refused");
                    fail(outbox, due, status, reason);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polls_back_off_to_five_minutes() {
        let first = Duration::from_secs(10);
        assert_eq!(poll_delay(first, 0), Duration::from_secs(10));
        assert_eq!(poll_delay(first, 1), Duration::from_secs(20));
        assert_eq!(poll_delay(first, 4), Duration::from_secs(160));
        assert_eq!(poll_delay(first, 5), POLL_CAP);
        assert_eq!(poll_delay(first, 1000), POLL_CAP);
    }
}
