//! Status back to the commit, end to end: a webhook from a forge starts a pipeline on a
//! recording GitLab, and the commit's status moves on a recording stand-in of the forge's
//! API as GitLab's pipeline events (or polls) arrive. Each stand-in checks the method,
//! path, headers and body the forge documents. Every address is 127.0.0.1, port 0.

mod common;

use std::time::Duration;

use common::{Answer, RecordingUpstream, Relay, fixture, post, signed_github_body};
use serde_json::{Value, json};

const SECRET: &str = "s3cret-for-the-tests";
const PIPELINE_TOKEN: &str = "pipeline-hook-token";

/// A relay whose source `source` (of `provider`) reports to `forge`, with a GitLab source
/// for pipeline events, and `rules` after them.
fn relay_config(gitlab: &str, forge: &str, source: &str, provider: &str, rules: &str) -> String {
    format!(
        r#"
[upstream.gitlab]
url = "{gitlab}"
timeout = "2s"

[source.{source}]
provider = "{provider}"
secret = "file:{{dir}}/secret"
status = {{ token = "file:{{dir}}/status-token", api_url = "{forge}" }}

[source.gitlab-pipelines]
provider = "gitlab"
secret = "file:{{dir}}/pipeline-secret"
upstream = "gitlab"

{rules}
"#
    )
}

/// [`relay_config`] for a GitHub source whose forge is a GitHub Enterprise Server stand-in.
fn github_config(gitlab: &str, forge: &str, rules: &str) -> String {
    relay_config(gitlab, forge, "github", "github", rules)
}

const FILES: &[(&str, &str)] = &[
    ("secret", SECRET),
    ("status-token", "ghs_status_token_for_tests"),
    ("pipeline-secret", PIPELINE_TOKEN),
    ("trigger-token", "glptt-trigger-token"),
];

const ONE_RULE: &str = r#"
[[rule]]
name = "build"
source = "github"
[rule.trigger]
project = "acme/app"
token = "file:{dir}/trigger-token"
"#;

/// Waits until `upstream` has received `count` requests, or fails saying what it saw.
async fn wait_for(upstream: &RecordingUpstream, count: usize) -> Vec<common::Received> {
    for _ in 0..200 {
        let received = upstream.received();
        if received.len() >= count {
            return received;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("expected {count} requests, got {:#?}", upstream.received());
}

/// A GitLab Pipeline Hook (GitLab's documented example) for pipeline `id` of
/// `acme/app`, now `status`.
fn pipeline_event(id: i64, status: &str, finished_at: Option<&str>) -> Vec<u8> {
    let mut event: Value =
        serde_json::from_slice(&fixture("status/gitlab_pipeline_event_doc.json")).unwrap();
    event["object_attributes"]["id"] = json!(id);
    event["object_attributes"]["status"] = json!(status);
    event["object_attributes"]["source"] = json!("trigger");
    event["object_attributes"]["finished_at"] = json!(finished_at);
    event["object_attributes"]["url"] = json!(format!(
        "https://gitlab.example.com/acme/app/-/pipelines/{id}"
    ));
    event["project"]["id"] = json!(123);
    event["project"]["path_with_namespace"] = json!("acme/app");
    serde_json::to_vec(&event).unwrap()
}

/// GitHub's published branch push, signed, as delivery `delivery`.
async fn push_branch(relay: &Relay, delivery: &str) -> common::Reply {
    signed_github_body(
        &relay.url("/hooks/github"),
        SECRET,
        "push",
        delivery,
        fixture("github/push_branch.json"),
    )
    .await
}

/// What an answer's `note` says.
fn note(reply: &common::Reply) -> String {
    reply.json()["note"].as_str().unwrap_or_default().to_owned()
}

async fn send_pipeline_event(relay: &Relay, uuid: &str, body: Vec<u8>) -> common::Reply {
    post(
        &relay.url("/hooks/gitlab-pipelines"),
        &[
            ("content-type", "application/json"),
            ("X-Gitlab-Event", "Pipeline Hook"),
            ("X-Gitlab-Token", PIPELINE_TOKEN),
            ("X-Gitlab-Event-UUID", uuid),
        ],
        body,
    )
    .await
}

/// GitHub's published push of a tag, as if the tag were annotated: `after` names the tag
/// object, `head_commit` the commit it points to.
fn annotated_tag_push() -> (Vec<u8>, String) {
    let mut push: Value = serde_json::from_slice(&fixture("github/push_tag.json")).unwrap();
    let commit = push["head_commit"]["id"].as_str().unwrap().to_owned();
    push["after"] = json!("9a3c1e0b5d7f2a4c6e8b0d2f4a6c8e0b2d4f6a8c");
    (serde_json::to_vec(&push).unwrap(), commit)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_shows_pending_then_success_on_the_tagged_commit() {
    let gitlab = RecordingUpstream::start().await;
    let forge = RecordingUpstream::start().await;
    let relay =
        Relay::start_with(&github_config(&gitlab.url(), &forge.url(), ONE_RULE), FILES).await;
    let (body, commit) = annotated_tag_push();
    let reply = signed_github_body(&relay.url("/hooks/github"), SECRET, "push", "d-1", body).await;
    assert_eq!(reply.status, 202, "{}", reply.text());
    let pending = wait_for(&forge, 1).await.remove(0);
    // GitHub Enterprise Server: the API lives under /api/v3.
    assert_eq!(pending.method, "POST");
    assert_eq!(
        pending.path_and_query,
        format!("/api/v3/repos/Codertocat/Hello-World/statuses/{commit}")
    );
    assert_eq!(
        pending.header("authorization"),
        Some("Bearer ghs_status_token_for_tests")
    );
    assert_eq!(
        pending.header("accept"),
        Some("application/vnd.github+json")
    );
    assert_eq!(pending.header("x-github-api-version"), Some("2022-11-28"));
    let sent = pending.json();
    assert_eq!(sent["state"], "pending");
    assert_eq!(sent["context"], "gitlab/acme/app");
    assert_eq!(
        sent["target_url"], "http://127.0.0.1:3000/test-group/test-project/-/pipelines/257",
        "the link is the pipeline GitLab's answer named"
    );
    let description = sent["description"].as_str().unwrap();
    assert!(
        description.contains("acme/app") && description.contains("build"),
        "{description}"
    );
    assert!(description.chars().count() <= 140);

    // A pipeline of the project that hookrelay did not start changes nothing.
    let other = send_pipeline_event(&relay, "e-0", pipeline_event(999, "success", None)).await;
    assert_eq!(other.status, 200);
    assert!(
        note(&other).contains("not started by hookrelay"),
        "{}",
        other.text()
    );
    // GitLab's event for hookrelay's pipeline moves the status.
    let done = send_pipeline_event(
        &relay,
        "e-1",
        pipeline_event(257, "success", Some("2026-12-02 10:00:00 UTC")),
    )
    .await;
    assert_eq!(done.status, 200, "{}", done.text());
    assert_eq!(
        done.json()["triggers"],
        json!([]),
        "a pipeline event starts nothing"
    );
    let success = wait_for(&forge, 2).await.remove(1);
    assert_eq!(success.path_and_query, pending.path_and_query);
    assert_eq!(success.json()["state"], "success");
    assert_eq!(success.json()["context"], "gitlab/acme/app");
    assert_eq!(
        success.json()["target_url"],
        "https://gitlab.example.com/acme/app/-/pipelines/257"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(forge.received().len(), 2, "nothing else was posted");
    assert_eq!(
        gitlab.received().len(),
        1,
        "one trigger, however many events"
    );
    // `deliveries` shows the trigger, both posts, and the pipeline event.
    let rows = common::listed(
        &hookrelay::store::StoreLocation::Folder(relay.state()),
        false,
        20,
    )
    .unwrap();
    let kinds: Vec<(String, String)> = rows
        .iter()
        .filter_map(|r| Some((r.kind.clone()?, r.state.clone()?)))
        .collect();
    assert!(
        kinds.contains(&("trigger".into(), "sent".into())),
        "{kinds:?}"
    );
    assert_eq!(
        kinds
            .iter()
            .filter(|(k, s)| k == "status" && s == "sent")
            .count(),
        2,
        "{kinds:?}"
    );
    relay.stop().await;
}

/// GitHub's published branch push, as if `commit` were its new head.
fn push_of(commit: &str) -> Vec<u8> {
    let mut push: Value = serde_json::from_slice(&fixture("github/push_branch.json")).unwrap();
    push["after"] = json!(commit);
    push["head_commit"]["id"] = json!(commit);
    serde_json::to_vec(&push).unwrap()
}

/// Three pushes to a branch within a rule's `coalesce` window start one pipeline: it shows
/// on the first push's commit and on the newest (the branch's head when the pipeline
/// started, a pull request's head), not on the one between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coalesced_pipeline_shows_on_the_newest_commit_of_the_storm_too() {
    let gitlab = RecordingUpstream::start().await;
    let forge = RecordingUpstream::start().await;
    let rule = ONE_RULE.replace(
        "source = \"github\"\n",
        "source = \"github\"\ncoalesce = \"1s\"\n",
    );
    let relay = Relay::start_with(&github_config(&gitlab.url(), &forge.url(), &rule), FILES).await;
    let commits = [
        "1111111111111111111111111111111111111111",
        "2222222222222222222222222222222222222222",
        "3333333333333333333333333333333333333333",
    ];
    for (n, commit) in commits.iter().enumerate() {
        let reply = signed_github_body(
            &relay.url("/hooks/github"),
            SECRET,
            "push",
            &format!("storm-{n}"),
            push_of(commit),
        )
        .await;
        assert_eq!(reply.status, 202, "{}", reply.text());
    }
    let posted = |received: &[common::Received], state: &str| {
        let mut on: Vec<String> = received
            .iter()
            .filter(|post| post.json()["state"] == state)
            .map(|post| post.path_and_query.rsplit('/').next().unwrap().to_owned())
            .collect();
        on.sort();
        on
    };
    let pending = wait_for(&forge, 2).await;
    assert_eq!(gitlab.received().len(), 1, "one pipeline for the storm");
    assert_eq!(posted(&pending, "pending"), [commits[0], commits[2]]);
    let done = send_pipeline_event(
        &relay,
        "storm-event",
        pipeline_event(257, "success", Some("2026-12-02 10:00:00 UTC")),
    )
    .await;
    assert_eq!(done.status, 200, "{}", done.text());
    assert!(
        note(&done).contains("and 1 on the newest commit of pushes coalesced into its trigger"),
        "{}",
        done.text()
    );
    let all = wait_for(&forge, 4).await;
    assert_eq!(posted(&all, "success"), [commits[0], commits[2]]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(forge.received().len(), 4, "nothing on the commit between");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_events_never_turn_a_finished_status_back_and_newer_states_supersede() {
    let gitlab = RecordingUpstream::start().await;
    let forge = RecordingUpstream::start().await;
    // The pending post takes a while: running and success arrive meanwhile.
    forge.answer_next(Answer::new(201, "{}").delayed(Duration::from_millis(600)));
    let relay =
        Relay::start_with(&github_config(&gitlab.url(), &forge.url(), ONE_RULE), FILES).await;
    let reply = push_branch(&relay, "d-2").await;
    assert_eq!(reply.status, 202);
    wait_for(&forge, 1).await;
    let running = send_pipeline_event(&relay, "e-1", pipeline_event(257, "running", None)).await;
    assert_eq!(running.status, 200);
    let success = send_pipeline_event(
        &relay,
        "e-2",
        pipeline_event(257, "success", Some("2026-12-02 10:00:00 UTC")),
    )
    .await;
    assert!(
        note(&success).contains("supersedes 1"),
        "{}",
        success.text()
    );
    // GitLab's hooks arrive out of order: a "running" after "success" is late.
    let late = send_pipeline_event(&relay, "e-3", pipeline_event(257, "running", None)).await;
    assert_eq!(late.status, 200);
    assert!(note(&late).contains("finished already"), "{}", late.text());
    // The same delivery again is a duplicate.
    let again = send_pipeline_event(
        &relay,
        "e-2",
        pipeline_event(257, "success", Some("2026-12-02 10:00:00 UTC")),
    )
    .await;
    assert_eq!(again.json()["duplicate"], true);
    let posts = wait_for(&forge, 2).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let states: Vec<Value> = forge
        .received()
        .iter()
        .map(|r| r.json()["state"].clone())
        .collect();
    assert_eq!(states, [json!("pending"), json!("success")], "{posts:#?}");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_trigger_puts_gitlabs_message_on_the_commit() {
    let gitlab = RecordingUpstream::start().await;
    gitlab.answer_next(Answer::new(404, r#"{"message":"404 Not Found"}"#));
    let forge = RecordingUpstream::start().await;
    let relay =
        Relay::start_with(&github_config(&gitlab.url(), &forge.url(), ONE_RULE), FILES).await;
    push_branch(&relay, "d-3").await;
    let error = wait_for(&forge, 1).await.remove(0).json();
    assert_eq!(error["state"], "error");
    let description = error["description"].as_str().unwrap();
    assert!(description.contains("404"), "{description}");
    assert!(description.chars().count() <= 140, "{description}");
    assert!(
        !description.contains("glptt"),
        "no token in a status: {description}"
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forge_rate_limit_is_waited_out_then_the_status_is_posted() {
    let gitlab = RecordingUpstream::start().await;
    let forge = RecordingUpstream::start().await;
    let reset = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 2;
    forge.answer_next(
        Answer::new(
            403,
            r#"{"message":"API rate limit exceeded for installation ID 1."}"#,
        )
        .header("x-ratelimit-remaining", "0")
        .header("x-ratelimit-reset", &reset.to_string()),
    );
    let relay =
        Relay::start_with(&github_config(&gitlab.url(), &forge.url(), ONE_RULE), FILES).await;
    push_branch(&relay, "d-4").await;
    let posts = wait_for(&forge, 2).await;
    let at = forge.received_at();
    assert!(
        at[1] - at[0] >= Duration::from_millis(900),
        "the second post waited for X-RateLimit-Reset ({:?})",
        at[1] - at[0]
    );
    assert_eq!(
        posts[1].json(),
        posts[0].json(),
        "the same status, posted again"
    );
    relay.stop().await;
}

/// A renamed or transferred GitHub repository: GitHub answers a POST to its old URL with
/// `307` and the new one; the status is posted there, with the same token and body (it
/// used to fail, saying `307`). A redirect off the forge's API is never followed (unit
/// tests of `redirect_within`): the status token would go with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_follows_github_to_a_renamed_repository() {
    let gitlab = RecordingUpstream::start().await;
    let forge = RecordingUpstream::start().await;
    let relay =
        Relay::start_with(&github_config(&gitlab.url(), &forge.url(), ONE_RULE), FILES).await;
    let (body, commit) = annotated_tag_push();
    let moved = format!(
        "{}/api/v3/repositories/1296269/statuses/{commit}",
        forge.url()
    );
    forge.answer_next(
        Answer::new(307, r#"{"message":"Temporary Redirect"}"#).header("location", &moved),
    );
    let reply =
        signed_github_body(&relay.url("/hooks/github"), SECRET, "push", "d-moved", body).await;
    assert_eq!(reply.status, 202, "{}", reply.text());
    let posts = wait_for(&forge, 2).await;
    assert_eq!(
        posts[0].path_and_query,
        format!("/api/v3/repos/Codertocat/Hello-World/statuses/{commit}")
    );
    assert_eq!(
        posts[1].path_and_query,
        format!("/api/v3/repositories/1296269/statuses/{commit}"),
        "posted where GitHub said"
    );
    assert_eq!(posts[1].json(), posts[0].json(), "the same status");
    assert_eq!(
        posts[1].header("authorization"),
        Some("Bearer ghs_status_token_for_tests")
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(forge.received().len(), 2, "posted once there, not retried");
    relay.stop().await;
}

/// Gitea: one tag fanned out to three projects shows three statuses, each naming its
/// project, each moved by its own pipeline's events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fan_out_of_three_shows_three_contexts_on_gitea() {
    let gitlab = RecordingUpstream::start().await;
    for id in [301, 302, 303] {
        gitlab.answer_next(Answer::new(
            201,
            &json!({"id": id, "web_url": format!("https://gitlab.example.com/p/-/pipelines/{id}")})
                .to_string(),
        ));
    }
    let forge = RecordingUpstream::start().await;
    let rules = r#"
[[rule]]
name = "fan-out"
source = "gitea"
[[rule.trigger]]
project = "group/one"
token = "file:{dir}/trigger-token"
[[rule.trigger]]
project = "group/two"
token = "file:{dir}/trigger-token"
[[rule.trigger]]
project = "group/three"
token = "file:{dir}/trigger-token"
status_context = "ci/{{ trigger.project }} ({{ event.ref_name }})"
"#;
    let config = relay_config(&gitlab.url(), &forge.url(), "gitea", "gitea", rules);
    let relay = Relay::start_with(&config, FILES).await;
    let body = fixture("gitea/push.json");
    let signature = hookrelay::sources::signature::hmac_hex(
        hookrelay::sources::signature::Algorithm::Sha256,
        SECRET.as_bytes(),
        &body,
    );
    let reply = post(
        &relay.url("/hooks/gitea"),
        &[
            ("content-type", "application/json"),
            ("X-Gitea-Event", "push"),
            ("X-Gitea-Delivery", "g-1"),
            ("X-Gitea-Signature", signature.as_str()),
        ],
        body,
    )
    .await;
    assert_eq!(reply.status, 202, "{}", reply.text());
    let posts = wait_for(&forge, 3).await;
    let mut contexts: Vec<String> = posts
        .iter()
        .map(|p| p.json()["context"].as_str().unwrap().to_owned())
        .collect();
    contexts.sort();
    assert_eq!(
        contexts,
        [
            "ci/group/three (master)",
            "gitlab/group/one",
            "gitlab/group/two"
        ]
    );
    for p in &posts {
        assert_eq!(
            p.path_and_query,
            "/api/v1/repos/example/example/statuses/67b56589a45103f891bdee7c0546e5d40bc02001"
        );
        assert_eq!(
            p.header("authorization"),
            Some("token ghs_status_token_for_tests")
        );
        assert_eq!(p.json()["state"], "pending");
    }
    // group/two's pipeline fails: only its context changes. (Its id is in its link: the
    // three triggers went out at once, so which got which answer is not known before.)
    let two = posts
        .iter()
        .map(|p| p.json())
        .find(|p| p["context"] == "gitlab/group/two")
        .unwrap();
    let id: i64 = two["target_url"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let mut failed: Value = serde_json::from_slice(&pipeline_event(
        id,
        "failed",
        Some("2026-12-02 10:00:00 UTC"),
    ))
    .unwrap();
    failed["project"]["path_with_namespace"] = json!("group/two");
    failed["project"]["id"] = json!(2);
    let answer = send_pipeline_event(&relay, "e-302", serde_json::to_vec(&failed).unwrap()).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let fourth = wait_for(&forge, 4).await.remove(3).json();
    assert_eq!(
        (fourth["context"].as_str(), fourth["state"].as_str()),
        (Some("gitlab/group/two"), Some("failure"))
    );
    relay.stop().await;
}

fn bitbucket_config(gitlab: &str, forge: &str, provider: &str) -> String {
    relay_config(
        gitlab,
        forge,
        "bitbucket",
        provider,
        &ONE_RULE.replace("source = \"github\"", "source = \"bitbucket\""),
    )
}

async fn signed_bitbucket(relay: &Relay, event: &str, file: &str) -> common::Reply {
    let body = fixture(file);
    let signature = common::sha256_signature(SECRET, &body);
    post(
        &relay.url("/hooks/bitbucket"),
        &[
            ("content-type", "application/json"),
            ("X-Event-Key", event),
            ("X-Request-UUID", "b-1"),
            ("X-Request-Id", "b-1"),
            ("X-Hub-Signature", signature.as_str()),
        ],
        body,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_pipeline_on_bitbucket_cloud() {
    let gitlab = RecordingUpstream::start().await;
    let forge = RecordingUpstream::start().await;
    let relay = Relay::start_with(
        &bitbucket_config(&gitlab.url(), &forge.url(), "bitbucket-cloud"),
        FILES,
    )
    .await;
    let reply =
        signed_bitbucket(&relay, "repo:push", "bitbucket_cloud/repo_push_branch.json").await;
    assert_eq!(reply.status, 202, "{}", reply.text());
    let pending = wait_for(&forge, 1).await.remove(0);
    assert_eq!(
        pending.path_and_query,
        "/repositories/martinherren1984/publictestrepo/commit/c14c1bb05dfb1fdcdf06b31485fff61b0ea44277/statuses/build"
    );
    assert_eq!(
        pending.header("authorization"),
        Some("Bearer ghs_status_token_for_tests")
    );
    let body = pending.json();
    assert_eq!(body["state"], "INPROGRESS");
    assert_eq!(body["key"], "gitlab/acme/app");
    assert_eq!(
        body["url"],
        "http://127.0.0.1:3000/test-group/test-project/-/pipelines/257"
    );
    send_pipeline_event(
        &relay,
        "e-1",
        pipeline_event(257, "failed", Some("2026-12-02 10:00:00 UTC")),
    )
    .await;
    let failed = wait_for(&forge, 2).await.remove(1).json();
    assert_eq!(failed["state"], "FAILED");
    assert_eq!(
        failed["key"], body["key"],
        "the same key replaces the status"
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canceled_pipeline_on_bitbucket_data_center() {
    let gitlab = RecordingUpstream::start().await;
    let forge = RecordingUpstream::start().await;
    let relay = Relay::start_with(
        &bitbucket_config(&gitlab.url(), &forge.url(), "bitbucket-server"),
        FILES,
    )
    .await;
    let reply = signed_bitbucket(
        &relay,
        "repo:refs_changed",
        "bitbucket_server/refs_changed_branch.json",
    )
    .await;
    assert_eq!(reply.status, 202, "{}", reply.text());
    let pending = wait_for(&forge, 1).await.remove(0);
    assert_eq!(
        pending.path_and_query,
        "/rest/api/latest/projects/DEV/repos/deployment-automation/commits/76797d54bca87db6d1e3e82ee40622c7908aa514/builds"
    );
    assert_eq!(pending.json()["state"], "INPROGRESS");
    send_pipeline_event(
        &relay,
        "e-1",
        pipeline_event(257, "canceled", Some("2026-12-02 10:00:00 UTC")),
    )
    .await;
    let canceled = wait_for(&forge, 2).await.remove(1).json();
    assert_eq!(canceled["state"], "CANCELLED");
    // Woodpecker's published request to this endpoint has the same required fields.
    let example: Value = serde_json::from_slice(&fixture(
        "status/bitbucket_server_build_status_request_woodpecker.json",
    ))
    .unwrap();
    for field in ["key", "state", "url", "description"] {
        assert!(
            example.get(field).is_some() && canceled.get(field).is_some(),
            "{field}"
        );
    }
    relay.stop().await;
}

/// Where pipeline events cannot be configured: the upstream's read token polls the
/// pipeline until it ends, and the status follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_polled_pipeline_moves_the_status_without_pipeline_events() {
    let gitlab = RecordingUpstream::start().await;
    gitlab.answer_next(Answer::created());
    gitlab.answer_next(Answer::new(
        200,
        r#"{"id":257,"project_id":123,"status":"running","web_url":"https://gitlab.example.com/acme/app/-/pipelines/257"}"#,
    ));
    gitlab.answer_next(Answer::new(
        200,
        r#"{"id":257,"project_id":123,"status":"success","finished_at":"2026-12-02T10:00:00Z","web_url":"https://gitlab.example.com/acme/app/-/pipelines/257"}"#,
    ));
    let forge = RecordingUpstream::start().await;
    let config = format!(
        r#"
[upstream.gitlab]
url = "{}"
read_token = "file:{{dir}}/read-token"
poll_interval = "100ms"

[source.github]
provider = "github"
secret = "file:{{dir}}/secret"
status = {{ token = "file:{{dir}}/status-token", api_url = "{}" }}
{ONE_RULE}"#,
        gitlab.url(),
        forge.url()
    );
    let mut files = FILES.to_vec();
    files.push(("read-token", "glpat-read-only-token"));
    let relay = Relay::start_with(&config, &files).await;
    push_branch(&relay, "d-5").await;
    let posts = wait_for(&forge, 3).await;
    let states: Vec<Value> = posts.iter().map(|p| p.json()["state"].clone()).collect();
    assert_eq!(
        states,
        [json!("pending"), json!("pending"), json!("success")]
    );
    let polls: Vec<common::Received> = gitlab
        .received()
        .into_iter()
        .filter(|r| r.method == "GET")
        .collect();
    assert_eq!(polls.len(), 2, "polling stops once the pipeline ends");
    assert_eq!(
        polls[0].path_and_query,
        "/api/v4/projects/acme%2Fapp/pipelines/257"
    );
    assert_eq!(
        polls[0].header("private-token"),
        Some("glpat-read-only-token")
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        gitlab
            .received()
            .iter()
            .filter(|r| r.method == "GET")
            .count(),
        2
    );
    relay.stop().await;
}

/// `kill -9` after a pipeline event was acknowledged and before its status reached the
/// forge (which is down): the status is posted after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_survives_kill_9_between_the_event_and_its_post() {
    use common::binary::{Served, write};
    let gitlab = RecordingUpstream::start().await;
    // A port with nothing on it yet: the forge is down until after the restart.
    let forge_address = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().to_string()
    };
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in FILES {
        write(dir.path(), name, text);
    }
    let config = github_config(&gitlab.url(), &format!("http://{forge_address}"), ONE_RULE)
        .replace("{dir}", &dir.path().display().to_string());
    write(dir.path(), "relay.toml", &config);
    let state = dir.path().join("state");
    let mut served = Served::start(dir.path(), &state);
    let address = served.address();
    let reply = signed_github_body(
        &format!("http://{address}/hooks/github"),
        SECRET,
        "push",
        "d-6",
        fixture("github/push_branch.json"),
    )
    .await;
    assert_eq!(reply.status, 202);
    served.wait_for("trigger sent");
    let event = post(
        &format!("http://{address}/hooks/gitlab-pipelines"),
        &[
            ("content-type", "application/json"),
            ("X-Gitlab-Event", "Pipeline Hook"),
            ("X-Gitlab-Token", PIPELINE_TOKEN),
            ("X-Gitlab-Event-UUID", "e-1"),
        ],
        pipeline_event(257, "success", Some("2026-12-02 10:00:00 UTC")),
    )
    .await;
    assert_eq!(event.status, 200, "{}", event.text());
    std::process::Command::new("kill")
        .args(["-9", &served.child.id().to_string()])
        .status()
        .unwrap();
    let _ = served.child.wait();
    drop(served);
    let forge = RecordingUpstream::start_on(&forge_address).await;
    let mut served = Served::start(dir.path(), &state);
    served.address();
    // The pending post was still waiting for the forge: success superseded it, or
    // follows it.
    let mut states: Vec<Value> = Vec::new();
    for _ in 0..200 {
        states = forge
            .received()
            .iter()
            .map(|p| p.json()["state"].clone())
            .collect();
        if states.contains(&json!("success")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        states.last(),
        Some(&json!("success")),
        "the acknowledged event's status was posted after the restart: {states:?}"
    );
    assert_eq!(gitlab.received().len(), 1, "the trigger was not sent again");
    let (_, lines) = served.terminate();
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("ghs_status_token_for_tests")),
        "the status token never reaches a log line"
    );
}

/// `explain` shows where each trigger's status would go, the token by reference only;
/// `check` accepts the configuration.
#[test]
fn explain_shows_where_each_status_goes() {
    use common::binary::{hookrelay, write};
    let dir = tempfile::tempdir().unwrap();
    let config = github_config(
        "https://gitlab.example.com",
        "https://ghe.example.com",
        ONE_RULE,
    )
    .replace("file:{dir}/secret", "env:HOOKRELAY_TEST_UNSET_SECRET")
    .replace("file:{dir}/status-token", "env:HOOKRELAY_TEST_STATUS_TOKEN")
    .replace(
        "file:{dir}/pipeline-secret",
        "env:HOOKRELAY_TEST_UNSET_SECRET",
    )
    .replace("file:{dir}/trigger-token", "env:HOOKRELAY_TEST_UNSET_TOKEN");
    write(dir.path(), "relay.toml", &config);
    let payload = dir.path().join("push.json");
    std::fs::write(&payload, annotated_tag_push().0).unwrap();
    let output = hookrelay(&[
        "explain",
        "--config",
        dir.path().to_str().unwrap(),
        "--source",
        "github",
        "--event",
        "push",
        payload.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        text.contains(
            "status    github Codertocat/Hello-World@6113728f27ae context \"gitlab/acme/app\" via https://ghe.example.com/api/v3 (token env:HOOKRELAY_TEST_STATUS_TOKEN)"
        ),
        "{text}"
    );
}

/// A tag on one GitLab project rebuilds another: the tagged commit on the sending GitLab
/// shows the downstream pipeline, through GitLab's own commit-status API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cross_project_rebuild_shows_on_the_sending_gitlab_commit() {
    let gitlab = RecordingUpstream::start().await;
    let sending = RecordingUpstream::start().await;
    let rules = r#"
[[rule]]
name = "rebuild"
source = "gitlab"
events = ["tag"]
[rule.trigger]
project = "acme/app"
ref = "main"
token = "file:{dir}/trigger-token"
"#;
    let config = relay_config(&gitlab.url(), &sending.url(), "gitlab", "gitlab", rules);
    let relay = Relay::start_with(&config, FILES).await;
    let reply = post(
        &relay.url("/hooks/gitlab"),
        &[
            ("content-type", "application/json"),
            ("X-Gitlab-Event", "Tag Push Hook"),
            ("X-Gitlab-Token", SECRET),
        ],
        fixture("gitlab/tag_push.json"),
    )
    .await;
    assert_eq!(reply.status, 202, "{}", reply.text());
    let pending = wait_for(&sending, 1).await.remove(0);
    assert_eq!(
        pending.path_and_query,
        "/api/v4/projects/jsmith%2Fexample/statuses/82b3d5ae55f7080f1e6022629cdb57bfae7cccc7"
    );
    assert_eq!(
        pending.header("authorization"),
        Some("Bearer ghs_status_token_for_tests")
    );
    assert_eq!(pending.json()["state"], "pending");
    assert_eq!(pending.json()["name"], "gitlab/acme/app");

    let done = send_pipeline_event(&relay, "e-1", pipeline_event(257, "running", None)).await;
    assert_eq!(done.status, 200, "{}", done.text());
    let running = wait_for(&sending, 2).await.remove(1);
    assert_eq!(running.json()["state"], "running", "GitLab's own word");
    assert_eq!(
        running.json()["target_url"],
        "https://gitlab.example.com/acme/app/-/pipelines/257"
    );
}

#[test]
fn a_source_of_pipeline_events_posts_no_statuses() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("t"), "a-token-of-the-tests-0123").unwrap();
    std::fs::write(
        dir.path().join("a.toml"),
        "[upstream.gitlab]\nurl = \"https://gitlab.example.com\"\n\
         [source.pipelines]\nprovider = \"gitlab\"\nsecret = \"file:t\"\nupstream = \"gitlab\"\nstatus = { token = \"file:t\" }\n",
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_hookrelay"))
        .args(["check", "--config", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "source.pipelines.status: a source of pipeline events (`upstream`) starts no pipeline"
        ),
        "{stderr}"
    );
}
