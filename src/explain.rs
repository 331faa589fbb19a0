//! `hookrelay explain`: what hookrelay makes of a webhook payload, offline.
//!
//! Reads a payload file as if it had arrived on a source, without checking a signature
//! (there is none in a file) and without reading any secret, and prints the normalized
//! events in a form meant to be read. With `--json`, prints the same as JSON.

use std::fmt::Write as _;
use std::path::Path;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::event::{Event, Provider};
use crate::hooks;
use crate::sources::{self, Outcome, Verification, WebhookRequest};

/// What `explain` was asked.
pub struct ExplainRequest<'a> {
    pub config: &'a Path,
    /// The source; with a stored delivery, the one it arrived on unless given.
    pub source: Option<&'a str>,
    /// Explain a stored delivery (by its delivery id) instead of a payload file.
    pub delivery: Option<&'a str>,
    /// The state folder, and `--store URL`: where a stored delivery is read (`--store`,
    /// then `[store]` or `HOOKRELAY_STORE_URL`, then the state folder's SQLite).
    pub state: &'a Path,
    pub store: Option<&'a str>,
    pub event: Option<&'a str>,
    /// `K: V` pairs.
    pub headers: &'a [String],
    pub payload: Option<&'a Path>,
    pub json: bool,
    /// A `?ref=` as the webhook URL would carry it.
    pub url_ref: Option<&'a str>,
    /// Ask the source's forge which files a push changed, as the relay would (`compare`),
    /// instead of saying that it would: the configuration's secrets are read.
    pub ask_forge: bool,
}

/// A stored webhook's headers as a request's (JSON unless they say otherwise).
pub fn stored_request_headers(stored: &[(String, String)]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    for (name, value) in stored {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.insert(name, value);
        }
    }
    headers
}

/// The header that names the event type, per provider.
fn event_header(provider: Provider) -> Option<&'static str> {
    match provider {
        Provider::Github => Some("X-GitHub-Event"),
        Provider::Gitlab => Some("X-Gitlab-Event"),
        Provider::Gitea => Some("X-Gitea-Event"),
        Provider::Forgejo => Some("X-Forgejo-Event"),
        Provider::Gogs => Some("X-Gogs-Event"),
        Provider::BitbucketCloud | Provider::BitbucketServer => Some("X-Event-Key"),
        Provider::Generic => None,
    }
}

/// The event type assumed when neither `--event` nor a header gives one.
fn assumed_event(provider: Provider, payload: &[u8]) -> &'static str {
    match provider {
        Provider::Gitlab => {
            let kind = serde_json::from_slice::<serde_json::Value>(payload)
                .ok()
                .and_then(|v| {
                    v.get("object_kind")
                        .and_then(|k| k.as_str().map(str::to_owned))
                });
            if kind.as_deref() == Some("tag_push") {
                "Tag Push Hook"
            } else {
                "Push Hook"
            }
        }
        Provider::BitbucketCloud => "repo:push",
        Provider::BitbucketServer => "repo:refs_changed",
        _ => "push",
    }
}

/// The webhook `explain` reads: a stored delivery or a payload file.
struct Webhook {
    /// The source a stored delivery arrived on.
    source: Option<String>,
    headers: Vec<(String, String)>,
    body: Bytes,
    /// How messages name it: `delivery ID` or the file's path.
    shown_as: String,
    /// A stored delivery's `?ref=`, used unless `--ref` is given.
    url_ref: Option<String>,
    /// A stored delivery's answers of its forge (`compare`), read again instead of asking.
    compared: Vec<Option<crate::event::ComparedRecord>>,
}

impl Webhook {
    fn read(
        request: &ExplainRequest<'_>,
        config: &crate::config::Config,
    ) -> Result<Webhook, String> {
        match (request.delivery, request.payload) {
            (Some(id), None) => {
                let location = crate::store::StoreLocation::choose(
                    request.state,
                    request.store,
                    config.store.clone(),
                )?;
                let stored =
                    stored_webhook(&location, id, request.source).map_err(|err| err.to_string())?;
                Ok(Webhook {
                    source: Some(stored.source),
                    headers: stored.headers,
                    body: stored.body,
                    shown_as: format!("delivery {}", stored.delivery_id),
                    url_ref: stored.url_ref,
                    compared: stored.compared,
                })
            }
            (None, Some(payload)) => {
                let body = crate::named_file::read(payload, crate::named_file::PAYLOAD)
                    .map_err(|err| format!("cannot read {}: {err}", payload.display()))?;
                Ok(Webhook {
                    source: None,
                    headers: Vec::new(),
                    body: Bytes::from(body),
                    shown_as: payload.display().to_string(),
                    url_ref: None,
                    compared: Vec::new(),
                })
            }
            _ => Err("give either a payload file or --delivery ID".into()),
        }
    }
}

/// The stored webhook of delivery id `id`: with `--source`, the one that source sent where
/// it sent that id (two sources may send the same one); else the newest with that id (or a
/// unique start of one), which `--source` then explains through another source's
/// configuration.
fn stored_webhook(
    location: &crate::store::StoreLocation,
    id: &str,
    source: Option<&str>,
) -> Result<crate::outbox::StoredWebhook, crate::outbox::StoreError> {
    let mut store = crate::outbox::OfflineStore::open(location)?;
    if let Some(source) = source {
        match store.stored_webhook_from(source, id) {
            Err(err) if err.refused => {}
            sent => return sent,
        }
    }
    store.stored_webhook(id)
}

/// The source named by `--source`, else the one a stored delivery arrived on.
fn chosen_source<'c>(
    request: &ExplainRequest<'_>,
    config: &'c crate::config::Config,
    stored: Option<String>,
) -> Result<&'c sources::SourceConfig, String> {
    let source_name = request
        .source
        .map(str::to_owned)
        .or(stored)
        .ok_or("--source is needed with a payload file")?;
    config.sources.get(&source_name).ok_or_else(|| {
        let names: Vec<&str> = config.sources.keys().map(String::as_str).collect();
        format!(
            "no source named {:?} in {}; configured: {}",
            source_name,
            request.config.display(),
            if names.is_empty() {
                "none".into()
            } else {
                names.join(", ")
            }
        )
    })
}

/// An event type `explain` assumed: the header it stands for, and its value.
type AssumedEvent = (&'static str, &'static str);

/// The request's headers: the stored ones, then `--header`, then `--event` (or an event
/// type assumed from the payload, which is returned to be said so).
fn request_headers(
    request: &ExplainRequest<'_>,
    provider: Provider,
    webhook: &Webhook,
) -> Result<(HeaderMap, Option<AssumedEvent>), String> {
    let mut headers = stored_request_headers(&webhook.headers);
    for pair in request.headers {
        let (name, value) = pair
            .split_once(':')
            .ok_or_else(|| format!("--header {pair:?} must be written \"Name: value\""))?;
        let name = HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| format!("{:?} is not a header name", name.trim()))?;
        let value = HeaderValue::from_str(value.trim())
            .map_err(|_| format!("the value of {name} is not a valid header value"))?;
        headers.insert(name, value);
    }
    let mut assumed = None;
    if let Some(header) = event_header(provider) {
        match request.event {
            Some(event) => {
                let value = HeaderValue::from_str(event)
                    .map_err(|_| format!("--event {event:?} is not a valid header value"))?;
                headers.insert(header, value);
            }
            None if !headers.contains_key(header) => {
                let event = assumed_event(provider, &webhook.body);
                headers.insert(header, HeaderValue::from_static(event));
                assumed = Some((header, event));
            }
            None => {}
        }
    }
    Ok((headers, assumed))
}

/// Runs `explain`; the text to print, or an error message for the user.
pub fn explain(request: &ExplainRequest<'_>) -> Result<String, String> {
    let config = if request.ask_forge {
        crate::config::load(request.config)
    } else {
        crate::config::load_without_secrets(request.config)
    }
    .map_err(|problems| problems.to_string())?;
    let mut webhook = Webhook::read(request, &config)?;
    let source = chosen_source(request, &config, webhook.source.take())?;
    let (headers, assumed) = request_headers(request, source.provider, &webhook)?;
    // `--ref`, else the `?ref=` a stored delivery arrived with.
    let (url_ref, named) = match (request.url_ref, webhook.url_ref.as_deref()) {
        (Some(text), _) => (Some(text), "--ref".to_owned()),
        (None, Some(text)) => (Some(text), format!("the ?ref={text} it arrived with")),
        (None, None) => (None, String::new()),
    };
    let url_ref = url_ref
        .map(|text| crate::git_ref::GitRef::parse(text).map_err(|err| format!("{named}: {err}")))
        .transpose()?;
    if let Some(git_ref) = &url_ref {
        source
            .allows_url_ref(git_ref)
            .map_err(|reason| format!("{named} (as ?ref= would be answered 400): {reason}"))?;
    }
    let mut received = sources::receive(
        source,
        &WebhookRequest {
            headers: &headers,
            body: &webhook.body,
        },
        Verification::Skip,
    )
    .map_err(|err| format!("{}: {err}", webhook.shown_as))?;
    received.restore_compared(&webhook.compared);
    if request.ask_forge {
        ask_forge(&config, source, &mut received)?;
    }
    let explained = Explained {
        config: &config,
        source,
        received: &received,
        url_ref: url_ref.as_ref(),
    };
    if request.json {
        return Ok(explained.json());
    }
    // Payload text is shown, never obeyed by the terminal.
    Ok(
        crate::terminal::escape_controls(&explained.text(request.delivery.is_some(), assumed))
            .into_owned(),
    )
}

/// A webhook read by its source, to be told as JSON or text.
struct Explained<'a> {
    config: &'a crate::config::Config,
    source: &'a sources::SourceConfig,
    received: &'a sources::Received,
    url_ref: Option<&'a crate::git_ref::GitRef>,
}

impl Explained<'_> {
    /// The answer the sender would get, with every event in full, each rule's verdict and
    /// the calls each planned trigger would make.
    fn json(&self) -> String {
        let (config, source, received) = (self.config, self.source, self.received);
        let mut reply = hooks::reply(&source.name, received).to_value();
        if let Outcome::Events(events) = &received.outcome {
            reply["events"] =
                serde_json::to_value(events.iter().map(full_without_payload).collect::<Vec<_>>())
                    .expect("events serialize");
            let mut rules = Vec::new();
            let mut triggers = Vec::new();
            for event in events {
                for (rule, why_not) in config.rules.verdicts(event) {
                    rules.push(serde_json::json!({ "rule": rule.name(), "matched": why_not.is_none(), "reason": why_not }));
                }
                for planned in config.rules.plan(event, self.url_ref) {
                    triggers.push(match &planned.trigger {
                        Ok(trigger) => {
                            let mut call = call_json(&planned, trigger);
                            call["status"] = hooks::status_target(
                                config,
                                source,
                                trigger,
                                &planned.status_context,
                                planned.commit.clone(),
                            )
                            .map(|target| {
                                serde_json::json!({
                                    "forge": target.forge,
                                    "api_url": target.api_url,
                                    "repository": target.repository,
                                    "commit": target.sha,
                                    "context": target.context,
                                    "token": target.token_ref,
                                    "polled": target.poll_after_ms > 0,
                                })
                            })
                            .into();
                            call
                        }
                        Err(error) => serde_json::json!({ "rule": planned.rule, "error": error }),
                    });
                }
            }
            reply["rules"] = serde_json::Value::Array(rules);
            reply["triggers"] = serde_json::Value::Array(triggers);
        }
        serde_json::to_string_pretty(&reply).expect("JSON serializes") + "\n"
    }

    /// The source, event type, delivery and signature, then each event with its rules.
    fn text(&self, stored: bool, assumed: Option<AssumedEvent>) -> String {
        let (source, received) = (self.source, self.received);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "source      {} (provider {})",
            source.name, source.provider
        );
        match assumed {
            Some((header, event)) => {
                let _ = writeln!(
                    out,
                    "event type  {event} (assumed; pass --event to choose the {header} value)"
                );
            }
            None => {
                let _ = writeln!(out, "event type  {}", received.event_type);
            }
        }
        let _ = writeln!(out, "delivery    {}", received.delivery);
        let _ = writeln!(
            out,
            "signature   {}",
            if stored {
                // Only a webhook that passed its source's check is stored; the check's
                // headers are not kept.
                "checked when it arrived (signature headers are not stored)"
            } else {
                "not checked: explain reads a payload file offline"
            }
        );
        match &received.outcome {
            Outcome::Events(events) => {
                for (i, event) in events.iter().enumerate() {
                    let _ = writeln!(out);
                    // A push the relay would ask its forge about (`compare`): explain
                    // does not ask (it is offline), and says so.
                    let asks = self
                        .source
                        .compare
                        .as_ref()
                        .filter(|compare| {
                            crate::compare::would_ask(event, compare, &self.config.rules)
                        })
                        .map(|compare| compare.api.api_url.as_str());
                    write_event(&mut out, (i + 1, events.len()), event, asks);
                    write_rules(&mut out, self.config, event, self.url_ref);
                }
                if stored {
                    // The sender's redelivery would be a duplicate: say what runs it again.
                    let _ = writeln!(
                        out,
                        "
to run it through these rules: hookrelay replay --replan {} (--dry-run first shows what it would start); every webhook that matched no rule: hookrelay replay --unmatched --since 2h",
                        received.delivery
                    );
                }
            }
            Outcome::Ping(_) => {
                let _ = writeln!(
                    out,
                    "\nping: the sender is testing the webhook; nothing to do"
                );
            }
            Outcome::Skipped(note) => {
                let _ = writeln!(out, "\nno event: {note}");
            }
            Outcome::Pipeline(pipeline) => {
                let _ = writeln!(
                    out,
                    "\npipeline event: pipeline #{} of {} is {}; it moves the commit status of a pipeline hookrelay started on upstream {}, and never starts one",
                    pipeline.pipeline_id,
                    pipeline.project_name(),
                    pipeline.status,
                    source.pipelines_of.as_deref().unwrap_or("-")
                );
            }
        }
        out
    }
}

/// Each rule of the event's source, matched or the first reason not, then the calls.
fn write_rules(
    out: &mut String,
    config: &crate::config::Config,
    event: &Event,
    url_ref: Option<&crate::git_ref::GitRef>,
) {
    let rules = &config.rules;
    let verdicts = rules.verdicts(event);
    let _ = writeln!(out);
    if verdicts.is_empty() {
        let _ = writeln!(out, "rules: none for source {}", event.source);
        return;
    }
    let _ = writeln!(out, "rules");
    let width = verdicts
        .iter()
        .map(|(rule, _)| rule.name().len())
        .max()
        .unwrap_or(0);
    for (rule, why_not) in &verdicts {
        let place = format!("{}:{}", rule.spec.file.display(), rule.spec.line);
        match why_not {
            None => {
                let _ = writeln!(out, "  ✓ {:width$}  matched      ({place})", rule.name());
            }
            Some(reason) => {
                let _ = writeln!(out, "  ✗ {:width$}  {reason}  ({place})", rule.name());
            }
        }
    }
    let planned = rules.plan(event, url_ref);
    let _ = writeln!(out);
    if planned.is_empty() {
        let _ = writeln!(out, "trigger calls: none");
        return;
    }
    let _ = writeln!(out, "trigger calls ({})", planned.len());
    for plan in planned {
        match &plan.trigger {
            Ok(trigger) => {
                let ref_origin = if url_ref.is_some() {
                    "  (from ?ref=, which overrides every trigger's ref)"
                } else {
                    ""
                };
                write_call(out, config, &plan, trigger, ref_origin);
                if let Some(source) = config.sources.get(&event.source)
                    && source.status.is_some()
                {
                    let _ = match hooks::status_target(
                        config,
                        source,
                        trigger,
                        &plan.status_context,
                        plan.commit.clone(),
                    ) {
                        Some(target) => writeln!(
                            out,
                            "    status    {} {}@{} context {:?} via {} (token {}{})",
                            target.forge.as_str(),
                            target.repository,
                            crate::status::short(&target.sha),
                            target.context,
                            target.api_url,
                            target.token_ref,
                            if target.poll_after_ms > 0 {
                                "; the pipeline is polled"
                            } else {
                                ""
                            }
                        ),
                        None => writeln!(out, "    status    none: the event names no commit"),
                    };
                }
            }
            Err(error) => {
                let _ = writeln!(out, "  ✗ rule {}: not sent: {error}", plan.rule);
            }
        }
    }
}

/// One trigger call as it would be sent: where, the ref, the token by reference, the
/// variables and inputs.
fn write_call(
    out: &mut String,
    config: &crate::config::Config,
    plan: &crate::rules::Planned,
    trigger: &crate::trigger::Trigger,
    ref_origin: &str,
) {
    let base = config
        .upstreams
        .get(&trigger.upstream)
        .map(crate::upstream::UpstreamConfig::base_url)
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "  POST {base}/api/v4/projects/{}/trigger/pipeline   (rule {}, upstream {})",
        trigger.project.encoded(),
        plan.rule,
        trigger.upstream
    );
    let _ = writeln!(out, "    ref       {}{ref_origin}", trigger.git_ref);
    let _ = writeln!(
        out,
        "    token     {}",
        token_shown(&trigger.token, &plan.token_ref)
    );
    for (key, value) in &trigger.variables {
        let _ = writeln!(out, "    variables[{key}] = {value:?}");
    }
    for (key, value) in &trigger.inputs {
        let _ = writeln!(out, "    inputs[{key}] = {value}");
    }
}

/// The calls planned, as JSON (`--json`), without their commit statuses.
fn call_json(plan: &crate::rules::Planned, trigger: &crate::trigger::Trigger) -> serde_json::Value {
    serde_json::json!({
        "rule": plan.rule,
        "upstream": trigger.upstream,
        "project": trigger.project.to_string(),
        "ref": trigger.git_ref.as_str(),
        "token": plan.token_ref.to_string(),
        "variables": trigger.variables,
        "inputs": trigger.inputs,
    })
}

/// `explain --schedule RULE`: when a scheduled rule fires next (in its time zone and in
/// UTC), and the calls it makes then, with `schedule.*` filled in as the scheduler does.
pub fn explain_schedule(config_path: &Path, name: &str, json: bool) -> Result<String, String> {
    let config = crate::config::load_without_secrets(config_path)
        .map_err(|problems| problems.to_string())?;
    let rules = config.rules.rules();
    let rule = rules.iter().find(|r| r.name() == name).ok_or_else(|| {
        let scheduled: Vec<&str> = rules
            .iter()
            .filter(|r| r.spec.schedule.is_some())
            .map(|r| r.name())
            .collect();
        format!(
            "no rule named {name:?} in {}; scheduled rules: {}",
            config_path.display(),
            if scheduled.is_empty() {
                "none".to_owned()
            } else {
                scheduled.join(", ")
            }
        )
    })?;
    let Some(schedule) = &rule.spec.schedule else {
        return Err(format!(
            "rule {name:?} has no schedule: it reacts to webhooks of {}; explain a payload with --source",
            rule.spec.sources.join(", ")
        ));
    };
    let mut times = Vec::new();
    let mut after = chrono::Utc::now();
    while times.len() < 5
        && let Some(next) = schedule.next_after(after)
    {
        times.push(next);
        after = next;
    }
    let local = |t: &chrono::DateTime<chrono::Utc>| {
        t.with_timezone(&schedule.timezone)
            .format("%Y-%m-%d %H:%M:%S %Z")
            .to_string()
    };
    let planned = times
        .first()
        .map(|first| {
            config
                .rules
                .plan_scheduled(rule, &schedule.time_text(*first))
        })
        .unwrap_or_default();
    let place = format!("{}:{}", rule.spec.file.display(), rule.spec.line);
    if json {
        let calls: Vec<serde_json::Value> = planned
            .iter()
            .map(|plan| match &plan.trigger {
                Ok(trigger) => call_json(plan, trigger),
                Err(error) => serde_json::json!({ "rule": plan.rule, "error": error }),
            })
            .collect();
        let answer = serde_json::json!({
            "rule": rule.name(),
            "place": place,
            "schedule": schedule.text,
            "timezone": schedule.timezone.name(),
            "next": times.iter().map(|t| t.to_rfc3339()).collect::<Vec<_>>(),
            "triggers": calls,
        });
        return Ok(serde_json::to_string_pretty(&answer).expect("JSON serializes") + "\n");
    }
    let mut out = String::new();
    let _ = writeln!(out, "rule        {} ({place})", rule.name());
    let _ = writeln!(
        out,
        "schedule    {} in {}",
        schedule.text,
        schedule.timezone.name()
    );
    if times.is_empty() {
        let _ = writeln!(out, "next        never: the schedule names no time to come");
        return Ok(out);
    }
    for (i, time) in times.iter().enumerate() {
        let _ = writeln!(
            out,
            "{}{}  ({} UTC)",
            if i == 0 {
                "next        "
            } else {
                "            "
            },
            local(time),
            time.format("%Y-%m-%d %H:%M:%S")
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "trigger calls at {} ({})",
        local(&times[0]),
        planned.len()
    );
    for plan in &planned {
        match &plan.trigger {
            Ok(trigger) => write_call(&mut out, &config, plan, trigger, ""),
            Err(error) => {
                let _ = writeln!(out, "  ✗ rule {}: not sent: {error}", plan.rule);
            }
        }
    }
    Ok(crate::terminal::escape_controls(&out).into_owned())
}

/// `--ask-forge`: asks the source's forge about the webhook's pushes as the relay would
/// before storing it (`compare`), so that the rules below read its answer.
fn ask_forge(
    config: &crate::config::Config,
    source: &sources::SourceConfig,
    received: &mut sources::Received,
) -> Result<(), String> {
    let compare = source.compare.as_ref().ok_or_else(|| {
        format!(
            "--ask-forge: source {:?} has no `compare = {{ token = … }}` to ask its forge with",
            source.name
        )
    })?;
    let Outcome::Events(events) = &mut received.outcome else {
        return Ok(());
    };
    let clients = crate::compare::CompareClients::new([(&source.name, compare)])
        .map_err(|err| format!("--ask-forge: {err}"))?;
    let client = clients
        .forge(&source.name)
        .expect("a client for the one source");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| format!("--ask-forge: {err}"))?;
    let asked = crate::compare::to_ask(events, compare, &config.rules);
    runtime.block_on(crate::compare::ask_about(client, compare, events, &asked));
    Ok(())
}

/// A token as `explain` shows it: the reference, and the mask when it was read.
fn token_shown(token: &crate::secret::Secret, reference: &crate::secret::SecretRef) -> String {
    if token.expose().is_empty() {
        format!("{reference} (not read by explain)")
    } else {
        format!("{reference} ({token})")
    }
}

/// The event as templates see it, without the sender's payload: with `changed_files`
/// (a list, or `null` when the webhook does not tell them all, and why).
fn full_without_payload(event: &Event) -> serde_json::Value {
    let mut value = serde_json::to_value(event).expect("events serialize");
    if let Some(map) = value.as_object_mut() {
        map.remove("payload");
        event.changed_files().add_to(map);
    }
    value
}

fn short(sha: &str) -> &str {
    sha.get(..12).unwrap_or(sha)
}

/// `asks`: the forge API the relay would ask which files the push changed.
fn write_event(out: &mut String, (n, of): (usize, usize), event: &Event, asks: Option<&str>) {
    let kind = match event.deleted_kind {
        Some(ref_type) => format!(
            "delete ({})",
            serde_json::to_value(ref_type)
                .expect("serializes")
                .as_str()
                .unwrap_or("")
        ),
        None => event.kind.as_str().to_owned(),
    };
    let _ = writeln!(out, "event {n} of {of}: {kind}");
    let _ = writeln!(out, "  repository      {}", event.repository);
    if !event.repository_url.is_empty() {
        let _ = writeln!(out, "  clone url       {}", event.repository_url);
    }
    let _ = writeln!(
        out,
        "  ref             {}  (ref_name {})",
        event.git_ref, event.ref_name
    );
    let _ = writeln!(
        out,
        "  before → after  {} → {}",
        short(&event.before),
        short(&event.after)
    );
    if !event.pusher.is_empty() {
        let _ = writeln!(out, "  pusher          {}", event.pusher);
    }
    if (event.commits.len() as u64) < event.commit_count {
        let _ = writeln!(
            out,
            "  commits         {} (the payload lists {})",
            event.commit_count,
            event.commits.len()
        );
    } else {
        let _ = writeln!(out, "  commits         {}", event.commit_count);
    }
    for commit in event.commits.iter().take(10) {
        let title = commit.message.lines().next().unwrap_or("");
        let _ = writeln!(out, "    {}  {}", short(&commit.id), title);
    }
    if event.commits.len() > 10 {
        let _ = writeln!(out, "    … and {} more", event.commits.len() - 10);
    }
    if event.kind == crate::event::EventKind::Push {
        write_changed_files(out, event, asks);
    }
}

/// What rules' `paths` see: the files a branch push changed, or why they are not known.
fn write_changed_files(out: &mut String, event: &Event, asks: Option<&str>) {
    const SHOWN: usize = 10;
    match event.changed_files() {
        crate::event::ChangedFiles::Listed(files) => {
            let from = match event.compared {
                Some(crate::event::Compared::Listed) => " (as the forge listed them)",
                _ => "",
            };
            let _ = writeln!(out, "  changed files   {}{from}", files.len());
            for file in files.iter().take(SHOWN) {
                let _ = writeln!(out, "    {file}");
            }
            if files.len() > SHOWN {
                let _ = writeln!(out, "    … and {} more", files.len() - SHOWN);
            }
        }
        crate::event::ChangedFiles::Unknown(why) => match asks {
            Some(api) => {
                let _ = writeln!(
                    out,
                    "  changed files   not known: {why}; the relay asks {api} (`compare`) and rules' paths read its answer (explain does not ask)"
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "  changed files   not known: {why} (rules' paths let it through)"
                );
            }
        },
    }
}
