//! Durable delivery: retries, permanent failures, duplicates, ordering, dry runs, replay.
//! The relay runs in process on port 0 against a scripted upstream on port 0.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const SECRET: &str = "It's a Secret to Everybody";

fn config(upstream: &str) -> String {
    format!(
        r#"
[upstream.gitlab]
url = "{upstream}"

[gateway]

[source.github]
provider = "github"
secret = "file:{{dir}}/secret"

[[rule]]
name = "build"
source = "github"
events = ["push", "tag"]
[rule.trigger]
project = "acme/app"
ref = "main"
token = "file:{{dir}}/token"
variables = {{ DELIVERY = "{{{{ event.delivery }}}}" }}
"#
    )
}

async fn setup_with(
    forwarding: hookrelay::forwarder::ForwarderOptions,
) -> (RecordingUpstream, Relay) {
    let upstream = RecordingUpstream::start().await;
    let relay = Relay::start_full(
        &config(&upstream.url()),
        &[("secret", SECRET), ("token", "glptt-0123456789abcdef")],
        forwarding,
    )
    .await;
    (upstream, relay)
}

async fn setup() -> (RecordingUpstream, Relay) {
    setup_with(fast_forwarding()).await
}

/// A signed GitHub push with its own delivery id.
async fn push(relay: &Relay, delivery: &str) -> Reply {
    signed_github(
        &relay.url("/hooks/github"),
        SECRET,
        "push",
        delivery,
        "github/push_tag.json",
    )
    .await
}

/// Waits (bounded) for `count` upstream calls.
async fn calls(upstream: &RecordingUpstream, count: usize, within: Duration) -> Vec<Received> {
    let deadline = Instant::now() + within;
    while upstream.received().len() < count && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let received = upstream.received();
    assert_eq!(
        received.len(),
        count,
        "{:#?}",
        received
            .iter()
            .map(|r| &r.path_and_query)
            .collect::<Vec<_>>()
    );
    received
}

/// The store's rows for a delivery id, once its last trigger has left `state`.
async fn rows_when(
    relay: &Relay,
    delivery: &str,
    done: impl Fn(&str) -> bool,
) -> Vec<hookrelay::outbox::DeliveryRow> {
    for _ in 0..300 {
        let rows: Vec<_> = listed(
            &hookrelay::store::StoreLocation::Folder(relay.state()),
            false,
            100,
        )
        .unwrap()
        .into_iter()
        .filter(|r| r.delivery_id == delivery)
        .collect();
        if !rows.is_empty() && rows.iter().all(|r| r.state.as_deref().is_some_and(&done)) {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "delivery {delivery} did not settle: {:#?}",
        listed(
            &hookrelay::store::StoreLocation::Folder(relay.state()),
            false,
            100
        )
        .unwrap()
    );
}

#[tokio::test]
async fn an_acknowledged_webhook_is_on_disk_and_then_sent() {
    let (upstream, relay) = setup().await;
    let reply = push(&relay, "d-1").await;
    assert_eq!(reply.status, 202, "{}", reply.text());
    let body = reply.json();
    assert_eq!(body["delivery"], "d-1");
    let id = body["triggers"][0]["id"].as_i64().unwrap();
    let sent = calls(&upstream, 1, Duration::from_secs(5)).await;
    assert_eq!(sent[0].json()["variables"], json!({"DELIVERY": "d-1"}));
    assert_eq!(sent[0].json()["token"], "glptt-0123456789abcdef");
    let rows = rows_when(&relay, "d-1", |s| s == "sent").await;
    assert_eq!(rows[0].trigger_id, Some(id));
    assert_eq!(rows[0].attempts, 1);
    assert_eq!(
        rows[0].pipeline_url.as_deref(),
        Some("http://127.0.0.1:3000/test-group/test-project/-/pipelines/257")
    );
    // The token is never stored: only its reference.
    let store = store_bytes(&relay.state());
    assert!(
        store.contains("env:") || store.contains("file:"),
        "the store was read: the token's reference is there"
    );
    assert!(!store.contains("glptt-0123456789abcdef"));
    assert!(!store.contains(SECRET));
}

#[tokio::test]
async fn retryable_failures_are_retried_until_gitlab_accepts() {
    let (upstream, relay) = setup().await;
    upstream.answer_next(Answer::new(503, "upstream down"));
    upstream.answer_next(Answer::new(
        500,
        r#"{"message":"500 Internal Server Error"}"#,
    ));
    upstream.answer_next(Answer::new(408, ""));
    assert_eq!(push(&relay, "d-retry").await.status, 202);
    calls(&upstream, 4, Duration::from_secs(10)).await;
    let rows = rows_when(&relay, "d-retry", |s| s == "sent").await;
    assert_eq!(rows[0].attempts, 4);
}

#[tokio::test]
async fn a_429_waits_at_least_its_retry_after() {
    let (upstream, relay) = setup().await;
    upstream.answer_next(Answer::new(429, "Retry later").header("retry-after", "1"));
    assert_eq!(push(&relay, "d-429").await.status, 202);
    let sent = calls(&upstream, 2, Duration::from_secs(10)).await;
    let _ = sent;
    let rows = rows_when(&relay, "d-429", |s| s == "sent").await;
    assert_eq!(rows[0].attempts, 2);
    // The second call came no sooner than Retry-After asked.
    let times: Vec<Instant> = upstream.received_at();
    assert!(
        times[1].duration_since(times[0]) >= Duration::from_millis(950),
        "{:?}",
        times[1].duration_since(times[0])
    );
}

#[tokio::test]
async fn gitlabs_pipeline_rate_limit_is_not_a_permanent_failure() {
    let (upstream, relay) = setup().await;
    upstream.answer_next(Answer::new(400, r#"{"message":{"base":["Too many pipelines created in the last minute. Try again later."]}}"#));
    assert_eq!(push(&relay, "d-rate").await.status, 202);
    calls(&upstream, 1, Duration::from_secs(5)).await;
    let rows = rows_when(&relay, "d-rate", |s| s == "queued").await;
    assert!(
        rows[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("Too many pipelines")
    );
}

#[tokio::test]
async fn a_404_fails_at_once_with_gitlabs_message_and_can_be_replayed() {
    let (upstream, relay) = setup().await;
    upstream.answer_next(Answer::new(404, r#"{"message":"404 Not Found"}"#));
    assert_eq!(push(&relay, "d-404").await.status, 202);
    calls(&upstream, 1, Duration::from_secs(5)).await;
    let rows = rows_when(&relay, "d-404", |s| s == "failed").await;
    assert_eq!(rows[0].last_status, Some(404));
    let error = rows[0].last_error.as_deref().unwrap();
    assert!(
        error
            .starts_with("404 Not Found — GitLab answers 404 for a wrong or revoked trigger token"),
        "the status once, then the usual causes: {error}"
    );
    let failed = listed(
        &hookrelay::store::StoreLocation::Folder(relay.state()),
        true,
        10,
    )
    .unwrap();
    assert_eq!(failed.len(), 1);
    // Replayed from outside the server, as `hookrelay replay` does; the relay picks it up.
    let original = rows[0].trigger_id.unwrap();
    let target = hookrelay::outbox::ReplayTarget::parse(&original.to_string());
    let new = hookrelay::outbox::replay_offline(
        &hookrelay::store::StoreLocation::Folder(relay.state()),
        &target,
    )
    .unwrap();
    calls(&upstream, 2, Duration::from_secs(5)).await;
    let rows = rows_when(&relay, "d-404", |s| s == "sent" || s == "failed").await;
    let replayed = rows.iter().find(|r| r.trigger_id == Some(new[0])).unwrap();
    assert_eq!(replayed.state.as_deref(), Some("sent"));
    assert_eq!(
        replayed.replay_of,
        Some(original),
        "the replay is linked to the trigger it repeats"
    );
    let kept = rows
        .iter()
        .find(|r| r.trigger_id == Some(original))
        .unwrap();
    assert_eq!(
        kept.state.as_deref(),
        Some("failed"),
        "the original's record stays"
    );
}

/// An authenticating proxy in front of GitLab answering its login page with `200`: no
/// pipeline was started, and the trigger is failed with why (and can be replayed), not
/// recorded as sent. Before, any `2xx` counted as a pipeline.
#[tokio::test]
async fn a_success_without_a_pipeline_is_not_taken_for_one() {
    let (upstream, relay) = setup().await;
    upstream.answer_next(Answer::new(
        200,
        "<!DOCTYPE html><html><title>Sign in - Corporate SSO</title></html>",
    ));
    assert_eq!(push(&relay, "d-login").await.status, 202);
    let rows = rows_when(&relay, "d-login", |s| s == "failed").await;
    assert_eq!(rows[0].last_status, Some(200));
    assert_eq!(rows[0].pipeline_url, None);
    let error = rows[0].last_error.as_deref().unwrap();
    assert!(
        error.starts_with("200 without a pipeline (") && error.contains("Sign in - Corporate SSO"),
        "{error}"
    );
    assert!(error.contains("login page"), "{error}");
}

#[tokio::test]
async fn a_422_keeps_the_failed_pipeline() {
    let (upstream, relay) = setup().await;
    upstream.answer_next(Answer::new(422, r#"{"message":{"base":["Duplicate variable name: X"]},"id":88,"web_url":"https://gitlab.example.com/acme/app/-/pipelines/88"}"#));
    assert_eq!(push(&relay, "d-422").await.status, 202);
    let rows = rows_when(&relay, "d-422", |s| s == "failed").await;
    assert_eq!(rows[0].last_status, Some(422));
    assert_eq!(
        rows[0].pipeline_url.as_deref(),
        Some("https://gitlab.example.com/acme/app/-/pipelines/88")
    );
    assert!(
        rows[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("Duplicate variable name")
    );
}

#[tokio::test]
async fn a_repeated_delivery_id_is_acknowledged_and_not_queued_twice() {
    let (upstream, relay) = setup().await;
    assert_eq!(push(&relay, "d-dup").await.status, 202);
    let again = push(&relay, "d-dup").await;
    assert_eq!(again.status, 200);
    assert_eq!(again.json()["duplicate"], true);
    assert_eq!(again.json()["triggers"], json!([]));
    // The sender shows this answer beside its "Redeliver" button: it says what would run
    // the webhook again.
    let note = again.json()["note"].as_str().unwrap().to_owned();
    assert!(
        note.contains("received before")
            && note.contains("`hookrelay replay delivery:d-dup`")
            && note.contains("`hookrelay replay --replan delivery:d-dup`"),
        "{note}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    calls(&upstream, 1, Duration::from_secs(1)).await;
}

#[tokio::test]
async fn triggers_for_one_project_and_ref_keep_their_order() {
    let (upstream, relay) = setup().await;
    upstream.answer_next(Answer::new(503, ""));
    upstream.answer_next(Answer::new(503, ""));
    for i in 0..4 {
        assert_eq!(push(&relay, &format!("order-{i}")).await.status, 202);
    }
    let received = calls(&upstream, 6, Duration::from_secs(10)).await;
    let order = deliveries_in_order(&received);
    assert_eq!(
        order,
        [
            "order-0", "order-0", "order-0", "order-1", "order-2", "order-3"
        ]
    );
}

/// Webhooks for a project+ref whose trigger is being sent are not claimed at once (none
/// could be: see `outbox::NewWork`), but none waits for a poll either: each goes out as
/// soon as the one before it is answered. The forwarder here polls once a minute, so a
/// trigger left for the poll would miss the test's ten seconds.
#[tokio::test]
async fn a_project_ref_being_sent_takes_new_triggers_as_each_send_ends() {
    let forwarding = hookrelay::forwarder::ForwarderOptions {
        poll: Duration::from_secs(60),
        ..fast_forwarding()
    };
    let (upstream, relay) = setup_with(forwarding).await;
    for _ in 0..3 {
        upstream.answer_next(Answer::created().delayed(Duration::from_millis(300)));
    }
    assert_eq!(push(&relay, "busy-0").await.status, 202);
    // The first is being sent (its answer takes 300 ms) while the others arrive.
    calls(&upstream, 1, Duration::from_secs(10)).await;
    for i in 1..4 {
        assert_eq!(push(&relay, &format!("busy-{i}")).await.status, 202);
    }
    let received = calls(&upstream, 4, Duration::from_secs(10)).await;
    let order = deliveries_in_order(&received);
    assert_eq!(order, ["busy-0", "busy-1", "busy-2", "busy-3"]);
}

#[tokio::test]
async fn dry_run_records_what_would_be_sent_and_sends_nothing() {
    let forwarding = hookrelay::forwarder::ForwarderOptions {
        dry_run: true,
        ..fast_forwarding()
    };
    let (upstream, relay) = setup_with(forwarding).await;
    assert_eq!(push(&relay, "d-dry").await.status, 202);
    let rows = rows_when(&relay, "d-dry", |s| s == "dry-run").await;
    let would = rows[0].last_error.as_deref().unwrap();
    assert!(would.contains("POST http://127.0.0.1:"), "{would}");
    assert!(
        would.contains("/api/v4/projects/acme%2Fapp/trigger/pipeline"),
        "{would}"
    );
    assert!(
        !would.contains("0123456789abcdef"),
        "the token is masked: {would}"
    );
    let reply = post(
        &relay.url("/api/v4/projects/9/trigger/pipeline?token=glptt-secretsecret&ref=main"),
        &[],
        "",
    )
    .await;
    assert_eq!(reply.status, 202);
    assert!(reply.text().contains("dry run"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(upstream.received().is_empty());
}

#[tokio::test]
async fn gateway_calls_are_recorded_but_never_replayed() {
    let (_upstream, relay) = setup().await;
    let reply = post(
        &relay.url("/api/v4/projects/9/trigger/pipeline?token=glptt-abcdefghijklmnop&ref=main"),
        &[],
        "",
    )
    .await;
    assert_eq!(reply.status, 201);
    let mut rows = Vec::new();
    for _ in 0..200 {
        rows = listed(
            &hookrelay::store::StoreLocation::Folder(relay.state()),
            false,
            10,
        )
        .unwrap();
        if !rows.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(rows[0].source, "gateway");
    assert_eq!(rows[0].state.as_deref(), Some("sent"));
    let target = hookrelay::outbox::ReplayTarget::Trigger(rows[0].trigger_id.unwrap());
    let err = hookrelay::outbox::replay_offline(
        &hookrelay::store::StoreLocation::Folder(relay.state()),
        &target,
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("caller's token is not stored"),
        "{err}"
    );
    let store = store_bytes(&relay.state());
    assert!(store.contains("gateway"), "the store was read");
    assert!(!store.contains("abcdefghijklmnop"));
}

#[tokio::test]
async fn metrics_after_a_scripted_run() {
    let (upstream, relay) = setup().await;
    upstream.answer_next(Answer::new(503, ""));
    assert_eq!(push(&relay, "m-1").await.status, 202);
    assert_eq!(push(&relay, "m-2").await.status, 202);
    let unsigned = post(
        &relay.url("/hooks/github"),
        &[("X-GitHub-Event", "push")],
        fixture("github/push_tag.json"),
    )
    .await;
    assert_eq!(unsigned.status, 401);
    calls(&upstream, 3, Duration::from_secs(10)).await;
    rows_when(&relay, "m-2", |s| s == "sent").await;
    rows_when(&relay, "m-1", |s| s == "sent").await;
    let reply = send("GET", &relay.url("/metrics"), &[], "").await;
    assert_eq!(reply.status, 200);
    assert!(
        reply.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let text = reply.text();
    for line in [
        "hookrelay_requests_total{endpoint=\"hooks\",status=\"202\"} 2",
        "hookrelay_requests_total{endpoint=\"hooks\",status=\"401\"} 1",
        "hookrelay_signature_failures_total{source=\"github\"} 1",
        "hookrelay_rule_matches_total{rule=\"build\"} 2",
        "hookrelay_triggers_total{outcome=\"queued\"} 2",
        "hookrelay_triggers_total{outcome=\"retried\"} 1",
        "hookrelay_triggers_total{outcome=\"sent\"} 2",
        "hookrelay_upstream_responses_total{upstream=\"gitlab\",code=\"503\"} 1",
        "hookrelay_upstream_responses_total{upstream=\"gitlab\",code=\"201\"} 2",
        "hookrelay_upstream_down{upstream=\"gitlab\"} 0",
        "hookrelay_delivery_latency_seconds_count 2",
        "hookrelay_outbox_depth 0",
        // Every request timed, the refused one too.
        "hookrelay_request_duration_seconds_count{endpoint=\"hooks\"} 3",
    ] {
        assert!(text.contains(line), "{line:?} missing from\n{text}");
    }
    let value = |name: &str| {
        hookrelay::metrics::sample(&text, name).unwrap_or_else(|| panic!("{name} in\n{text}"))
    };
    assert!(value("hookrelay_request_duration_seconds_sum{endpoint=\"hooks\"}") > 0.0);
    // Each acknowledgement waited for a commit; outcomes of sends are not timed.
    let commits = value("hookrelay_store_commit_seconds_count ");
    assert!(commits >= 2.0, "{text}");
    assert!(value("hookrelay_store_commit_seconds_sum ") > 0.0);
    assert_eq!(value("hookrelay_store_commit_size_count "), commits);
    assert!(value("hookrelay_store_commit_size_sum ") >= 2.0);
    assert!(!text.contains("glptt-"), "no token in any label");
    assert!(!text.contains(SECRET));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_is_down_is_probed_not_stormed_and_all_goes_out_once_it_is_back() {
    // One webhook fans out to 30 projects; GitLab answers 503 to everything for now.
    let triggers: String = (0..30)
        .map(|i| {
            format!(
                "[[rule.trigger]]\nproject = \"acme/p{i}\"\nref = \"main\"\ntoken = \"file:{{dir}}/token\"\n"
            )
        })
        .collect();
    let upstream = RecordingUpstream::start().await;
    for _ in 0..1000 {
        upstream.answer_next(Answer::new(503, r#"{"message":"503 Service Unavailable"}"#));
    }
    let config = format!(
        "[upstream.gitlab]\nurl = \"{}\"\n[source.github]\nprovider = \"github\"\nsecret = \"file:{{dir}}/secret\"\n\
         [[rule]]\nname = \"fan-out\"\nsource = \"github\"\n{triggers}",
        upstream.url()
    );
    let relay = Relay::start_full(
        &config,
        &[("secret", SECRET), ("token", "glptt-0123456789abcdef")],
        fast_forwarding(),
    )
    .await;
    assert_eq!(push(&relay, "outage-1").await.status, 202);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // Each project's own retries (20 ms, doubling to 200 ms) would call hundreds of
    // times by now; paused as a whole, the upstream sees a few probes.
    let probes = upstream.received().len();
    assert!(
        (1..=16).contains(&probes),
        "{probes} calls to a GitLab that is down"
    );
    let down = r#"hookrelay_upstream_down{upstream="gitlab"}"#;
    let metrics = send("GET", &relay.url("/metrics"), &[], "").await.text();
    assert!(metrics.contains(&format!("{down} 1")), "{metrics}");
    // The dashboard says why they wait: every trigger not being probed right now.
    let rows = listed(
        &hookrelay::store::StoreLocation::Folder(relay.state()),
        false,
        100,
    )
    .unwrap();
    let waiting = rows
        .iter()
        .filter(|r| r.last_error.as_deref() == Some("upstream gitlab is down; waiting for it"))
        .count();
    assert!(
        waiting >= 20,
        "{waiting} of 30 say they wait for GitLab: {rows:#?}"
    );

    // GitLab is back: every project's trigger goes out, once each.
    upstream.script.lock().unwrap().clear();
    let deadline = Instant::now() + Duration::from_secs(15);
    let sent = || {
        upstream
            .received()
            .iter()
            .skip(probes)
            .filter(|r| r.path_and_query.contains("/trigger/pipeline"))
            .count()
    };
    while Instant::now() < deadline {
        let rows = listed(
            &hookrelay::store::StoreLocation::Folder(relay.state()),
            false,
            100,
        )
        .unwrap();
        if rows.iter().all(|r| r.state.as_deref() == Some("sent")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rows = listed(
        &hookrelay::store::StoreLocation::Folder(relay.state()),
        false,
        100,
    )
    .unwrap();
    assert_eq!(rows.len(), 30);
    assert!(
        rows.iter().all(|r| r.state.as_deref() == Some("sent")),
        "{rows:#?}"
    );
    // Each sent once; a probe that was on its way when GitLab came back may add one call
    // per worker (answered 503, then retried).
    let calls = sent();
    assert!((30..=34).contains(&calls), "{calls} calls for 30 triggers");
    let metrics = send("GET", &relay.url("/metrics"), &[], "").await.text();
    assert!(metrics.contains(&format!("{down} 0")), "{metrics}");
    relay.stop().await;
}
