//! Rate limits: reject and queue per key, exact Retry-After, and GitLab's 429 slowing one
//! project only.

mod common;

use std::time::{Duration, Instant};

use common::*;

const SECRET: &str = "It's a Secret to Everybody";

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

fn config(upstream: &str, upstream_limit: &str, source_limit: &str, gateway_limit: &str) -> String {
    format!(
        r#"
[upstream.gitlab]
url = "{upstream}"
{upstream_limit}

[gateway]
{gateway_limit}

[source.github]
provider = "github"
secret = "file:{{dir}}/secret"
{source_limit}

[[rule]]
name = "build"
source = "github"
[[rule.trigger]]
project = "acme/a"
ref = "main"
token = "file:{{dir}}/token"
variables = {{ DELIVERY = "{{{{ event.delivery }}}}" }}
"#
    )
}

async fn relay(
    upstream: &RecordingUpstream,
    upstream_limit: &str,
    source_limit: &str,
    gateway_limit: &str,
) -> Relay {
    Relay::start_with(
        &config(&upstream.url(), upstream_limit, source_limit, gateway_limit),
        &[("secret", SECRET), ("token", "glptt-0123456789")],
    )
    .await
}

#[tokio::test]
async fn gateway_limits_reject_per_project_and_per_client_address_with_an_exact_retry_after() {
    let upstream = RecordingUpstream::start().await;
    let relay = relay(
        &upstream,
        "",
        "",
        "limit = { per_project = \"2/min\", per_client = \"3/min\" }\ntrusted_proxies = [\"127.0.0.1/32\"]",
    )
    .await;
    let call = |project: &str, token: &str| {
        relay.url(&format!(
            "/api/v4/projects/{project}/trigger/pipeline?token={token}&ref=main"
        ))
    };
    assert_eq!(post(&call("9", "glptt-one"), &[], "").await.status, 201);
    assert_eq!(post(&call("9", "glptt-two"), &[], "").await.status, 201);
    let refused = post(&call("9", "glptt-three"), &[], "").await;
    assert_eq!(refused.status, 429);
    assert_eq!(
        refused.headers["retry-after"], "30",
        "2/min: the next call is allowed in 30 s"
    );
    assert!(
        refused.json()["message"]
            .as_str()
            .unwrap()
            .contains("[gateway] limit.per_project (2/min)")
    );
    // The client has had its three (the refused call counts for it). A client is its
    // address (127.0.0.1 here), whatever token it brings: new tokens buy no new budget.
    for (project, token) in [
        ("10", "glptt-one"),
        ("13", "glptt-four"),
        ("14", "glptt-five"),
    ] {
        let refused = post(&call(project, token), &[], "").await;
        assert_eq!(refused.status, 429, "{token}");
        assert!(
            refused.json()["message"]
                .as_str()
                .unwrap()
                .contains("per_client"),
            "{}",
            refused.text()
        );
        assert!(
            !refused.text().contains(token),
            "the client is never shown by its token"
        );
    }
    // Calls refused for their client spent nothing of their project's budget: another
    // client (behind the trusted proxy) has project 10's two calls.
    let other = [("x-forwarded-for", "192.0.2.7")];
    assert_eq!(post(&call("10", "glptt-six"), &other, "").await.status, 201);
    assert_eq!(post(&call("10", "glptt-six"), &other, "").await.status, 201);
    let refused = post(&call("10", "glptt-six"), &other, "").await;
    assert!(refused.text().contains("per_project"), "{}", refused.text());
    // Each refusal is counted with the setting that refused it.
    let metrics = send("GET", &relay.url("/metrics"), &[], "").await.text();
    for line in [
        "hookrelay_limit_refusals_total{limit=\"[gateway] limit.per_project\"} 2",
        "hookrelay_limit_refusals_total{limit=\"[gateway] limit.per_client\"} 3",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    assert_eq!(upstream.received().len(), 4);
}

#[tokio::test]
async fn per_token_limits_callers_that_share_one_address() {
    let upstream = RecordingUpstream::start().await;
    let relay = relay(&upstream, "", "", "limit = { per_token = \"1/min\" }").await;
    let call = |token: &str| {
        relay.url(&format!(
            "/api/v4/projects/9/trigger/pipeline?token={token}&ref=main"
        ))
    };
    assert_eq!(post(&call("glptt-one"), &[], "").await.status, 201);
    assert_eq!(post(&call("glptt-two"), &[], "").await.status, 201);
    let refused = post(&call("glptt-one"), &[], "").await;
    assert_eq!(refused.status, 429);
    let message = refused.json()["message"].as_str().unwrap().to_owned();
    assert!(
        message.contains("[gateway] limit.per_token (1/min)"),
        "{message}"
    );
    assert!(!message.contains("glptt-one"));
}

#[tokio::test]
async fn a_source_that_rejects_answers_429_once_over_its_rate() {
    let upstream = RecordingUpstream::start().await;
    let relay = relay(
        &upstream,
        "",
        "limit = { rate = \"1/min\", on_limit = \"reject\" }",
        "",
    )
    .await;
    assert_eq!(push(&relay, "r-1").await.status, 202);
    let refused = push(&relay, "r-2").await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.headers["retry-after"], "60");
    assert!(
        refused.json()["message"]
            .as_str()
            .unwrap()
            .contains("[source.github] limit.rate (1/min)")
    );
    // Recorded, with its body, so `deliveries` shows it and `replay --replan` can run it;
    // the next refusals within the second are only counted.
    for i in 3..6 {
        assert_eq!(push(&relay, &format!("r-{i}")).await.status, 429);
    }
    let store = hookrelay::store::StoreLocation::Folder(relay.state());
    let mut rows = Vec::new();
    for _ in 0..100 {
        rows = hookrelay::outbox::list(
            &store,
            &hookrelay::outbox::ListFilter {
                state: Some(hookrelay::outbox::StateFilter::Refused),
                limit: 10,
                ..Default::default()
            },
        )
        .unwrap();
        if !rows.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(rows.len(), 1, "one record a second: {rows:#?}");
    assert!(rows[0].delivery_id.starts_with("r-2~refused-"), "{rows:#?}");
    let summary: serde_json::Value = serde_json::from_str(&rows[0].summary).unwrap();
    assert_eq!(summary["turned_away"]["as"], "refused");
    assert!(
        summary["turned_away"]["reason"]
            .as_str()
            .unwrap()
            .contains("limit.rate (1/min)")
    );
    let stored = hookrelay::outbox::stored_webhook(&store, &rows[0].delivery_id).unwrap();
    assert!(!stored.body.is_empty(), "the body is kept for a replan");
}

/// A sender's redelivery of a webhook that did its work ("Redeliver" on GitHub) queues
/// nothing, so a project's rejecting limit neither refuses it nor spends its budget.
#[tokio::test]
async fn a_redelivery_is_a_duplicate_not_over_a_rejecting_limit() {
    let upstream = RecordingUpstream::start().await;
    let relay = relay(
        &upstream,
        "limit = { per_project = \"1/min\", on_limit = \"reject\" }",
        "",
        "",
    )
    .await;
    assert_eq!(push(&relay, "d-1").await.status, 202);
    for _ in 0..3 {
        let again = push(&relay, "d-1").await;
        assert_eq!(again.status, 200, "{}", again.text());
        assert_eq!(again.json()["duplicate"], true, "{}", again.text());
    }
    // A new webhook is over the project's limit as before.
    let refused = push(&relay, "d-2").await;
    assert_eq!(refused.status, 429, "{}", refused.text());
    assert!(
        refused.json()["message"]
            .as_str()
            .unwrap()
            .contains("[upstream.gitlab] limit.per_project (1/min)")
    );
}

#[tokio::test]
async fn a_queueing_limit_accepts_everything_and_paces_the_calls() {
    let upstream = RecordingUpstream::start().await;
    let relay = relay(
        &upstream,
        "limit = { per_project = \"4/s\", burst = 1 }",
        "",
        "",
    )
    .await;
    for i in 0..3 {
        assert_eq!(
            push(&relay, &format!("q-{i}")).await.status,
            202,
            "queued, never refused"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while upstream.received().len() < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let times = upstream.received_at();
    assert_eq!(times.len(), 3, "nothing dropped");
    for pair in times.windows(2) {
        assert!(
            pair[1].duration_since(pair[0]) >= Duration::from_millis(200),
            "{:?}",
            pair[1].duration_since(pair[0])
        );
    }
    let metrics = send("GET", &relay.url("/metrics"), &[], "").await.text();
    assert!(
        metrics.contains("hookrelay_triggers_total{outcome=\"rate_limited\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn gitlabs_429_slows_that_project_not_the_relay() {
    let upstream = RecordingUpstream::start().await;
    let config = config(&upstream.url(), "", "", "").replace(
        "[[rule.trigger]]\nproject = \"acme/a\"",
        "[[rule.trigger]]\nproject = \"acme/b\"\nref = \"main\"\ntoken = \"file:{dir}/token\"\n[[rule.trigger]]\nproject = \"acme/a\"",
    );
    let relay = Relay::start_with(
        &config,
        &[("secret", SECRET), ("token", "glptt-0123456789")],
    )
    .await;
    // The first call GitLab sees (for one of the projects) is told to wait 2 s.
    upstream.answer_next(Answer::new(429, "Retry later").header("retry-after", "2"));
    assert_eq!(push(&relay, "p-1").await.status, 202);
    assert_eq!(push(&relay, "p-2").await.status, 202);
    let deadline = Instant::now() + Duration::from_secs(10);
    while upstream.received().len() < 5 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let received = upstream.received();
    let times = upstream.received_at();
    assert_eq!(
        received.len(),
        5,
        "{:#?}",
        received
            .iter()
            .map(|r| &r.path_and_query)
            .collect::<Vec<_>>()
    );
    let project = |r: &Received| r.path_and_query.split('/').nth(4).unwrap().to_owned();
    let slowed = project(&received[0]);
    let other: Vec<usize> = (1..5)
        .filter(|&i| project(&received[i]) != slowed)
        .collect();
    let again: Vec<usize> = (1..5)
        .filter(|&i| project(&received[i]) == slowed)
        .collect();
    assert_eq!(other.len(), 2, "the other project got both of its calls");
    // The other project is not held up: both of its calls come before the slowed project's
    // next one, which waits at least GitLab's Retry-After.
    assert!(
        other.iter().all(|o| again.iter().all(|a| o < a)),
        "{other:?} before {again:?}"
    );
    for i in &again {
        assert!(
            times[*i].duration_since(times[0]) >= Duration::from_millis(1900),
            "the slowed project waited its Retry-After"
        );
    }
}

#[tokio::test]
async fn a_push_storm_coalesces_into_one_pipeline() {
    let upstream = RecordingUpstream::start().await;
    // The trigger's variables do not name the delivery, so the storm's triggers are identical.
    let config = config(&upstream.url(), "", "", "")
        .replace(
            "variables = { DELIVERY = \"{{ event.delivery }}\" }",
            "variables = { REF = \"{{ event.ref_name }}\" }",
        )
        .replace(
            "name = \"build\"\nsource = \"github\"",
            "name = \"build\"\nsource = \"github\"\ncoalesce = \"400ms\"",
        );
    let relay = Relay::start_with(
        &config,
        &[("secret", SECRET), ("token", "glptt-0123456789")],
    )
    .await;
    let first = push(&relay, "storm-1").await;
    assert_eq!(first.status, 202);
    let kept = first.json()["triggers"][0]["id"].as_i64().unwrap();
    for i in 2..=4 {
        let reply = push(&relay, &format!("storm-{i}")).await;
        assert_eq!(reply.status, 202);
        assert_eq!(
            reply.json()["triggers"][0]["coalesced_into"],
            kept,
            "{}",
            reply.text()
        );
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while upstream.received().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(upstream.received().len(), 1, "four pushes, one pipeline");
    let rows = listed(
        &hookrelay::store::StoreLocation::Folder(relay.state()),
        false,
        10,
    )
    .unwrap();
    let coalesced: Vec<_> = rows
        .iter()
        .filter(|r| r.state.as_deref() == Some("coalesced"))
        .collect();
    assert_eq!(coalesced.len(), 3);
    assert!(coalesced.iter().all(|r| r.coalesced_into == Some(kept)));
    // After the window, a new push starts a new window.
    assert_eq!(
        push(&relay, "storm-5").await.json()["triggers"][0]["coalesced_into"],
        serde_json::Value::Null
    );
    let metrics = send("GET", &relay.url("/metrics"), &[], "").await.text();
    assert!(
        metrics.contains("hookrelay_triggers_total{outcome=\"coalesced\"} 3"),
        "{metrics}"
    );
}
