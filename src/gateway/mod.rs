//! The GitLab-compatible trigger endpoints: one incoming call becomes one [`Trigger`].
//!
//! `POST /api/v4/projects/:id/trigger/pipeline` and the webhook form
//! `POST /api/v4/projects/:id/ref/:ref/trigger/pipeline`. The checks run in GitLab's order
//! (Grape's parameter validation, then the pipeline-hook refusal, then the variables
//! check), so a caller gets the answer GitLab would give; then the relay's own checks
//! refuse what GitLab would certainly reject with a less helpful answer (a malformed ref,
//! a personal access token, the reserved `TRIGGER_PAYLOAD` variable) before anything is
//! sent. [`parse_trigger_call`] is pure, so the fuzz target and unit tests drive it.

#[doc(hidden)]
pub mod fuzz;
pub mod params;

use bytes::Bytes;
use http::{HeaderValue, Response, header};
use http_body_util::Full;
use percent_encoding::percent_decode_str;

use crate::git_ref::{GitRef, RefError};
use crate::secret::Secret;
use crate::trigger::{ProjectId, Trigger, WebhookBody, check_trigger_token, check_variable_name};
use crate::upstream::{Upstream, UpstreamResponse};
use params::ParamError;

/// Why a trigger call was refused before anything was forwarded.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(
        "the trigger gateway is not enabled; add a [gateway] section naming an upstream to the configuration"
    )]
    Disabled,
    #[error("404 Project Not Found: {0}")]
    Project(String),
    #[error("{0}")]
    PathEncoding(String),
    #[error(transparent)]
    Params(#[from] ParamError),
    #[error("403 Forbidden")]
    PipelineHook,
    #[error(transparent)]
    Ref(#[from] RefError),
    #[error("{0}")]
    Variable(String),
    #[error("{0}")]
    NotATriggerToken(String),
    /// GitLab finds no trigger for an empty token and answers `404 Not Found`.
    #[error("404 Not Found: the token is empty; send a pipeline trigger token or a CI job token")]
    EmptyToken,
}

/// The parts of an HTTP request the gateway reads, with the path pieces still encoded.
#[derive(Clone, Debug)]
pub struct CallRequest<'a> {
    /// The `:id` path segment as received (`9`, `group%2Fapp`).
    pub project: &'a str,
    /// The `:ref` of the webhook form as received (`feature%2Fx`).
    pub git_ref: Option<&'a str>,
    pub query: Option<&'a str>,
    pub content_type: Option<&'a str>,
    /// The `X-Gitlab-Event` header, if any.
    pub gitlab_event: Option<&'a str>,
    pub body: Bytes,
}

/// The header value GitLab refuses on the trigger endpoint: its own pipeline webhooks would
/// otherwise start pipelines that fire pipeline webhooks, forever.
const PIPELINE_HOOK: &str = "Pipeline Hook";

/// Reads and checks one trigger call, in GitLab's order, into the trigger to forward.
pub async fn parse_trigger_call(
    request: CallRequest<'_>,
    upstream: &str,
) -> Result<Trigger, GatewayError> {
    let project_text = decode_once(request.project, "project id")?;
    // A `.` or `..` would steer the URL the call is forwarded to: a bad request, not an
    // unknown project.
    let project = ProjectId::parse(&project_text).map_err(|err| {
        if project_text.split('/').any(crate::trigger::is_dot_segment) {
            GatewayError::PathEncoding(err)
        } else {
            GatewayError::Project(err)
        }
    })?;
    let path_ref = request
        .git_ref
        .map(|raw| decode_once(raw, "ref"))
        .transpose()?;
    let query = params::parse_query(request.query.unwrap_or(""))?;
    let is_webhook_form = path_ref.is_some();
    let query_keys: Vec<String> = query.keys().cloned().collect();
    let body = params::parse_body(request.content_type, &request.body, !is_webhook_form).await?;
    let mut call = params::validate(params::merge(query, body), path_ref)?;
    if is_webhook_form {
        // The webhook form forwards its body as it came; of the other parameters only the
        // query's go on in the URL (a form body's fields, a whole webhook among them, stay
        // in the body, where GitLab reads them).
        call.other.retain(|key, _| query_keys.contains(key));
    }
    if request
        .gitlab_event
        .is_some_and(|event| event.trim().eq_ignore_ascii_case(PIPELINE_HOOK))
    {
        return Err(GatewayError::PipelineHook);
    }
    let variables = params::string_variables(call.variables)?;
    for name in variables.keys() {
        check_variable_name(name).map_err(GatewayError::Variable)?;
    }
    if call.token.is_empty() {
        return Err(GatewayError::EmptyToken);
    }
    let git_ref = GitRef::parse(&call.git_ref)?;
    check_trigger_token(&call.token).map_err(GatewayError::NotATriggerToken)?;
    Ok(Trigger {
        upstream: upstream.to_owned(),
        project,
        git_ref,
        token: Secret::new(call.token),
        variables,
        inputs: call.inputs,
        other_params: call.other,
        webhook_body: is_webhook_form.then(|| WebhookBody {
            content_type: request.content_type.map(str::to_owned),
            bytes: request.body.clone(),
        }),
    })
}

/// Percent-decodes a path segment exactly once (`feature%2Fx` → `feature/x`,
/// `a%252F` → `a%2F`).
fn decode_once(raw: &str, what: &str) -> Result<String, GatewayError> {
    percent_decode_str(raw)
        .decode_utf8()
        .map(|text| text.into_owned())
        .map_err(|_| {
            GatewayError::PathEncoding(format!(
                "the {what} in the URL is not valid UTF-8 once percent-decoded"
            ))
        })
}

/// Forwards a trigger and hands GitLab's answer back unchanged: status, body, and the
/// headers a caller may act on (content type, `Retry-After`, `RateLimit-*`).
/// How long a gateway call waits for a free slot under `max_in_flight` before it is
/// refused with `503` (the caller waits for the answer; better a quick "retry" than a pile).
pub const IN_FLIGHT_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

pub async fn forward(
    upstream: &Upstream,
    trigger: &Trigger,
) -> Result<UpstreamResponse, crate::upstream::UpstreamError> {
    upstream
        .send_within(&trigger.upstream_call(), IN_FLIGHT_WAIT)
        .await
}

/// GitLab's answer as the gateway hands it back (and logs it).
pub fn answer_response(
    upstream: &Upstream,
    trigger: &Trigger,
    answer: &UpstreamResponse,
    recorded: &crate::outbox::Recorded,
) -> Response<Full<Bytes>> {
    use crate::outbox::Recorded;
    let status = answer.status;
    let (pipeline, gitlab_message) = match recorded {
        Recorded::Sent { pipeline_url, .. } => (pipeline_url.as_deref(), None),
        Recorded::Failed { reason, .. } => (None, Some(reason.as_str())),
        _ => (None, None),
    };
    if status.is_success() {
        tracing::info!(
            upstream = %upstream.name,
            project = %trigger.project,
            git_ref = %trigger.git_ref,
            token = %trigger.token,
            status = status.as_u16(),
            pipeline = pipeline.unwrap_or("-"),
            "trigger forwarded"
        );
    } else {
        tracing::warn!(
            upstream = %upstream.name,
            project = %trigger.project,
            git_ref = %trigger.git_ref,
            token = %trigger.token,
            status = status.as_u16(),
            gitlab_message = gitlab_message.unwrap_or("-"),
            "trigger refused by GitLab"
        );
    }
    let mut response = Response::new(Full::new(answer.body.clone()));
    *response.status_mut() = status;
    for (name, value) in &answer.headers {
        let keep = name == header::CONTENT_TYPE
            || name == header::RETRY_AFTER
            || name.as_str().starts_with("ratelimit-");
        if keep {
            response.headers_mut().append(name.clone(), value.clone());
        }
    }
    if !response.headers().contains_key(header::CONTENT_TYPE) && !answer.body.is_empty() {
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    response
}

/// Records a gateway call in the outbox, in the place taken for it before it was
/// forwarded, so `hookrelay deliveries` shows all traffic, with who called (`caller`: the
/// address, or the client a trusted proxy forwarded for `via` the proxy). The caller's
/// token is kept only as its mask: a gateway call is never sent again.
pub fn record(
    outbox: &crate::outbox::Outbox,
    place: crate::outbox::NotePlace,
    trigger: &Trigger,
    caller: crate::client_address::Caller,
    outcome: crate::outbox::Recorded,
) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let now = crate::outbox::now_ms();
    let delivery = crate::outbox::NewDelivery {
        source: "gateway".into(),
        delivery_id: format!("gateway-{now}-{}", COUNTER.fetch_add(1, Ordering::Relaxed)),
        event_type: if trigger.webhook_body.is_some() {
            "webhook trigger call"
        } else {
            "trigger call"
        }
        .into(),
        headers: Vec::new(),
        body: crate::store::StoredBody::default(),
        summary: call_summary(trigger, caller),
        triggers: vec![crate::outbox::NewTrigger {
            rule: "gateway".into(),
            upstream: trigger.upstream.clone(),
            project: trigger.project.to_string(),
            git_ref: trigger.git_ref.as_str().to_owned(),
            token_ref: format!("{}{}", crate::outbox::CALLER_TOKEN, trigger.token),
            variables: serde_json::to_string(&trigger.variables).expect("variables serialize"),
            inputs: serde_json::to_string(&trigger.inputs).expect("inputs serialize"),
            delay_ms: 0,
            coalesce_ms: 0,
            done: Some(outcome),
            kind: crate::store::WorkKind::Trigger,
            status_target: None,
            pipeline_id: None,
            queue_key: None,
        }],
    };
    outbox.note_in(place, delivery);
}

/// A gateway call's summary in its record: `{"project": …, "ref": …, "caller": …}`, written straight
/// from the trigger (not through a JSON tree).
fn call_summary(trigger: &Trigger, caller: crate::client_address::Caller) -> String {
    #[derive(serde::Serialize)]
    struct Summary<'a> {
        project: String,
        #[serde(rename = "ref")]
        git_ref: &'a str,
        caller: crate::client_address::Caller,
    }
    serde_json::to_string(&Summary {
        project: trigger.project.to_string(),
        git_ref: trigger.git_ref.as_str(),
        caller,
    })
    .expect("strings and an address serialize")
}

/// What a gateway call's answer means for its record (the caller's `token` masked
/// wherever the answer repeated it).
pub fn recorded(
    result: &Result<UpstreamResponse, crate::upstream::UpstreamError>,
    token: &Secret,
) -> crate::outbox::Recorded {
    use crate::outbox::Recorded;
    use crate::retry::{Verdict, classify};
    match classify(result, std::time::SystemTime::now()).without(token) {
        Verdict::Sent {
            status,
            pipeline_id,
            pipeline_url,
        } => Recorded::Sent {
            status,
            pipeline_id,
            pipeline_url,
        },
        Verdict::Retry { status, reason, .. } => Recorded::Failed {
            status,
            reason,
            pipeline_id: None,
            pipeline_url: None,
        },
        Verdict::Failed {
            status,
            reason,
            pipeline_id,
            pipeline_url,
        } => Recorded::Failed {
            status,
            reason,
            pipeline_id,
            pipeline_url,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call<'a>(project: &'a str, git_ref: Option<&'a str>, query: &'a str) -> CallRequest<'a> {
        CallRequest {
            project,
            git_ref,
            query: Some(query),
            content_type: None,
            gitlab_event: None,
            body: Bytes::new(),
        }
    }

    fn parse(request: CallRequest<'_>) -> Result<Trigger, GatewayError> {
        futures_executor::block_on(parse_trigger_call(request, "gitlab"))
    }

    #[test]
    fn a_calls_record_sums_it_up_as_json() {
        let t = parse(call("group%2Fapp", None, "token=T&ref=re%22lease")).unwrap();
        assert_eq!(
            call_summary(
                &t,
                crate::client_address::Caller {
                    client: "192.0.2.5".parse().unwrap(),
                    via: Some("10.0.0.1".parse().unwrap()),
                }
            ),
            r#"{"project":"group/app","ref":"re\"lease","caller":"192.0.2.5 via 10.0.0.1"}"#
        );
    }

    #[test]
    fn path_ref_is_decoded_exactly_once() {
        let t = parse(call("9", Some("feature%2Fx"), "token=T")).unwrap();
        assert_eq!(t.git_ref.as_str(), "feature/x");
        let t = parse(call("9", Some("a%252Fb"), "token=T")).unwrap();
        assert_eq!(t.git_ref.as_str(), "a%2Fb");
    }

    #[test]
    fn dot_segments_in_a_project_are_a_bad_request() {
        for project in ["%2E%2E", "..", ".", "group%2F..", "%2e"] {
            assert!(
                matches!(
                    parse(call(project, None, "token=T&ref=main")),
                    Err(GatewayError::PathEncoding(_))
                ),
                "{project}"
            );
        }
    }

    #[test]
    fn project_paths_are_decoded_and_kept() {
        let t = parse(call("group%2Fsub%2Fapp", None, "token=T&ref=main")).unwrap();
        assert_eq!(t.project, ProjectId::Path("group/sub/app".into()));
        assert!(matches!(
            parse(call("group%2F%2Fapp", None, "token=T&ref=main")),
            Err(GatewayError::Project(_))
        ));
        assert!(matches!(
            parse(call("%FF", None, "token=T&ref=main")),
            Err(GatewayError::PathEncoding(_))
        ));
    }

    #[test]
    fn checks_run_in_gitlabs_order() {
        // Missing parameters come before the pipeline-hook refusal, as in Grape.
        let mut request = call("9", None, "");
        request.gitlab_event = Some("Pipeline Hook");
        assert!(matches!(
            parse(request.clone()),
            Err(GatewayError::Params(ParamError::Invalid(_)))
        ));
        request.query = Some("token=T&ref=main&variables[A]=1");
        assert!(matches!(parse(request), Err(GatewayError::PipelineHook)));
    }

    #[test]
    fn relay_checks() {
        assert!(matches!(
            parse(call("9", None, "token=T&ref=a..b")),
            Err(GatewayError::Ref(_))
        ));
        assert!(matches!(
            parse(call("9", None, "token=glpat-abc&ref=main")),
            Err(GatewayError::NotATriggerToken(_))
        ));
        assert!(matches!(
            parse(call(
                "9",
                None,
                "token=T&ref=main&variables[TRIGGER_PAYLOAD]=x"
            )),
            Err(GatewayError::Variable(_))
        ));
    }

    #[test]
    fn webhook_form_keeps_body_and_content_type() {
        let mut request = call("9", Some("main"), "token=T");
        request.content_type = Some("application/json");
        request.body = Bytes::from_static(br#"{"ref":"refs/heads/other","object_kind":"push"}"#);
        let t = parse(request).unwrap();
        assert_eq!(t.git_ref.as_str(), "main");
        let body = t.webhook_body.unwrap();
        assert_eq!(
            &body.bytes[..],
            br#"{"ref":"refs/heads/other","object_kind":"push"}"#
        );
        assert_eq!(body.content_type.as_deref(), Some("application/json"));
    }
}
