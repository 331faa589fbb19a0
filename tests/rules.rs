//! Rules end to end: signed real payloads in, trigger calls out at a recording upstream.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

const SECRET: &str = "It's a Secret to Everybody";

fn config(upstream: &str) -> String {
    format!(
        r#"
[upstream.gitlab]
url = "{upstream}"

[source.github]
provider = "github"
secret = "file:{{dir}}/secret"
url_refs = ["release/*", "stable"]

[[rule]]
name = "docs-on-release-tag"
source = "github"
repository = "Codertocat/*"
events = ["tag"]
refs = ["simple-*", "v*"]
[[rule.trigger]]
project = "acme/docs"
ref = "main"
token = "file:{{dir}}/docs-token"
variables = {{ UPSTREAM_TAG = "{{{{ event.ref_name }}}}", UPSTREAM_SHA = "{{{{ event.after }}}}", REPO = "{{{{ event.repository }}}}" }}
[[rule.trigger]]
project = "9"
token = "file:{{dir}}/app-token"
inputs = {{ release = "{{{{ event.ref_name }}}}", parallel = 3 }}

[[rule]]
name = "every-push"
source = "github"
events = ["push"]
refs_exclude = ["wip/*"]
when = "event.commit_count > 0"
[rule.trigger]
project = "acme/ci"
token = "file:{{dir}}/app-token"

[[rule]]
name = "branch-cleanup"
source = "github"
events = ["delete"]
[rule.trigger]
project = "acme/ops"
ref = "main"
token = "file:{{dir}}/app-token"
variables = {{ DELETED = "{{{{ event.deleted_kind }}}}:{{{{ event.ref_name }}}}" }}

[[rule]]
name = "needs-payload-field"
source = "github"
repository = "bradrydzewski/drone-test-go"
events = ["push"]
[rule.trigger]
project = "acme/x"
token = "file:{{dir}}/app-token"
variables = {{ X = "{{{{ event.payload.nonexistent.field }}}}" }}
"#
    )
}

async fn setup() -> (RecordingUpstream, Relay) {
    let upstream = RecordingUpstream::start().await;
    let relay = Relay::start_with(
        &config(&upstream.url()),
        &[
            ("secret", SECRET),
            ("docs-token", "glptt-docs-0123456789"),
            ("app-token", "glptt-app-0123456789"),
        ],
    )
    .await;
    (upstream, relay)
}

/// Sends a GitHub fixture signed as GitHub signs it.
async fn github(relay: &Relay, path_and_query: &str, event: &str, file: &str) -> Reply {
    signed_github(&relay.url(path_and_query), SECRET, event, "d-1", file).await
}

/// Waits (bounded) until the upstream has `count` calls; forwarding happens after the answer.
async fn received(upstream: &RecordingUpstream, count: usize) -> Vec<Received> {
    for _ in 0..200 {
        if upstream.received().len() >= count {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Give a wrongly extra call a moment to show up.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut calls = upstream.received();
    calls.sort_by(|a, b| a.path_and_query.cmp(&b.path_and_query));
    assert_eq!(calls.len(), count, "{calls:#?}");
    calls
}

#[tokio::test]
async fn a_tag_fans_out_to_every_trigger_of_every_matching_rule() {
    let (upstream, relay) = setup().await;
    let reply = github(&relay, "/hooks/github", "push", "github/push_tag.json").await;
    assert_eq!(reply.status, 202, "{}", reply.text());
    let mut triggers = reply.json()["triggers"].clone();
    for trigger in triggers.as_array_mut().unwrap() {
        assert!(
            trigger["id"].as_i64().is_some(),
            "each queued trigger has an id: {trigger}"
        );
        trigger.as_object_mut().unwrap().remove("id");
    }
    assert_eq!(
        triggers,
        json!([
            {"rule": "docs-on-release-tag", "upstream": "gitlab", "project": "acme/docs", "ref": "main"},
            {"rule": "docs-on-release-tag", "upstream": "gitlab", "project": "9", "ref": "refs/tags/simple-tag"},
        ])
    );
    let calls = received(&upstream, 2).await;
    assert_eq!(
        calls[0].path_and_query,
        "/api/v4/projects/9/trigger/pipeline"
    );
    assert_eq!(
        calls[0].json(),
        json!({"token": "glptt-app-0123456789", "ref": "refs/tags/simple-tag", "inputs": {"release": "simple-tag", "parallel": 3}})
    );
    assert_eq!(
        calls[1].path_and_query,
        "/api/v4/projects/acme%2Fdocs/trigger/pipeline"
    );
    assert_eq!(
        calls[1].json(),
        json!({"token": "glptt-docs-0123456789", "ref": "main", "variables": {
            "UPSTREAM_TAG": "simple-tag",
            "UPSTREAM_SHA": "6113728f27ae82c7b1a177c8d03f9e96e0adf246",
            "REPO": "Codertocat/Hello-World"
        }})
    );
}

#[tokio::test]
async fn the_url_ref_beats_the_rule_ref_which_beats_the_event_ref() {
    let (upstream, relay) = setup().await;
    let reply = github(
        &relay,
        "/hooks/github?ref=release%2F2.0",
        "push",
        "github/push_tag.json",
    )
    .await;
    assert_eq!(reply.status, 202);
    let calls = received(&upstream, 2).await;
    for call in &calls {
        assert_eq!(call.json()["ref"], "release/2.0", "{call:#?}");
    }
    let reply = github(
        &relay,
        "/hooks/github?ref=a..b",
        "push",
        "github/push_tag.json",
    )
    .await;
    assert_eq!(reply.status, 400);
    assert!(reply.json()["message"].as_str().unwrap().contains("?ref="));
    // A captured, validly signed webhook resent with a ref the source does not list
    // cannot steer the pipeline: the signature does not cover the URL.
    let reply = github(
        &relay,
        "/hooks/github?ref=refs%2Fheads%2Fattacker",
        "push",
        "github/push_tag.json",
    )
    .await;
    assert_eq!(reply.status, 400, "{}", reply.text());
    let message = reply.json()["message"].as_str().unwrap().to_owned();
    assert!(
        message.contains("url_refs") && message.contains("\"attacker\""),
        "{message}"
    );
    assert_eq!(upstream.received().len(), 2, "nothing more was sent");
}

#[tokio::test]
async fn branch_pushes_and_when_expressions() {
    let (upstream, relay) = setup().await;
    // One commit: `when` holds; the event's own ref goes upstream, fully qualified.
    let reply = github(&relay, "/hooks/github", "push", "github/push_branch.json").await;
    assert_eq!(reply.status, 202, "{}", reply.text());
    let calls = received(&upstream, 1).await;
    assert_eq!(
        calls[0].path_and_query,
        "/api/v4/projects/acme%2Fci/trigger/pipeline"
    );
    assert_eq!(calls[0].json()["ref"], "refs/heads/master");
}

#[tokio::test]
async fn deletions_run_only_rules_that_ask_for_them() {
    let (upstream, relay) = setup().await;
    let reply = github(
        &relay,
        "/hooks/github",
        "push",
        "github/push_tag_delete.json",
    )
    .await;
    assert_eq!(reply.status, 202, "{}", reply.text());
    assert_eq!(reply.json()["triggers"][0]["rule"], "branch-cleanup");
    let calls = received(&upstream, 1).await;
    assert_eq!(
        calls[0].json()["variables"],
        json!({"DELETED": "tag:simple-tag"})
    );
    assert_eq!(calls[0].json()["ref"], "main");
}

#[tokio::test]
async fn no_match_is_200_with_no_triggers() {
    let (upstream, relay) = setup().await;
    let reply = github(&relay, "/hooks/github", "ping", "github/ping.json").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["triggers"], json!([]));
    // A new branch without commits: `every-push`'s `when` is false; the template error of
    // `needs-payload-field` is reported, not sent as an empty string.
    let reply = github(
        &relay,
        "/hooks/github",
        "push",
        "github/push_branch_create.json",
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let body = reply.json();
    assert_eq!(body["triggers"], json!([]));
    assert_eq!(body["errors"][0]["rule"], "needs-payload-field");
    assert!(
        body["errors"][0]["error"]
            .as_str()
            .unwrap()
            .contains("variables.X"),
        "{body:#}"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(upstream.received().is_empty());
}

/// Rules that choose pushes by the files they changed (a monorepo's services), fed the
/// senders' own payloads: GitHub's `push_branch.json` adds `README.md`; GitLab's
/// `push.json` lists 2 of its 4 commits (so its files are not all known) and
/// `push_branch_create.json` modifies `README.md`; Gitea's `push.json` adds `example`.
fn paths_config(upstream: &str) -> String {
    format!(
        r#"
[upstream.gitlab]
url = "{upstream}"

[source.github]
provider = "github"
secret = "file:{{dir}}/secret"

[source.gitlab]
provider = "gitlab"
secret = "file:{{dir}}/secret"

[source.gitea]
provider = "gitea"
secret = "file:{{dir}}/secret"

[[rule]]
name = "api"
source = ["github", "gitlab", "gitea"]
events = ["push"]
paths = ["services/api/**"]
[rule.trigger]
project = "acme/api"
token = "file:{{dir}}/token"

[[rule]]
name = "docs"
source = ["github", "gitlab", "gitea"]
events = ["push"]
paths = ["**/*.md"]
paths_exclude = ["CHANGELOG.md"]
[rule.trigger]
project = "acme/docs"
token = "file:{{dir}}/token"

[[rule]]
name = "code"
source = ["github", "gitlab", "gitea"]
events = ["push"]
paths_exclude = ["*.md"]
[rule.trigger]
project = "acme/code"
token = "file:{{dir}}/token"
variables = {{ CHANGED = "{{{{ event.changed_files | join(',') if event.changed_files is not none else 'unknown' }}}}" }}
"#
    )
}

/// The projects a webhook's answer queued triggers for, and the reason each rule that did
/// not match gave.
fn queued_and_reasons(reply: &Reply) -> (Vec<String>, Vec<(String, String)>) {
    let json = reply.json();
    let queued = json["triggers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["project"].as_str().unwrap().to_owned())
        .collect();
    let reasons = json["events"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|e| e["rules"].as_array().cloned().unwrap_or_default())
        .map(|r| {
            (
                r["rule"].as_str().unwrap().to_owned(),
                r["reason"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    (queued, reasons)
}

/// Sends a body to `/hooks/gitea` signed as Gitea signs it (hex HMAC-SHA256, no prefix).
async fn gitea(relay: &Relay, delivery: &str, body: Vec<u8>) -> Reply {
    let signature = sha256_signature(SECRET, &body);
    post(
        &relay.url("/hooks/gitea"),
        &[
            ("X-Gitea-Event", "push"),
            ("X-Gitea-Delivery", delivery),
            ("X-Gitea-Signature", signature.trim_start_matches("sha256=")),
        ],
        body,
    )
    .await
}

/// Sends a GitLab push fixture with GitLab's token header.
async fn gitlab_push(relay: &Relay, delivery: &str, file: &str) -> Reply {
    post(
        &relay.url("/hooks/gitlab"),
        &[
            ("X-Gitlab-Event", "Push Hook"),
            ("X-Gitlab-Token", SECRET),
            ("X-Gitlab-Event-UUID", delivery),
        ],
        fixture(file),
    )
    .await
}

#[tokio::test]
async fn path_filters_choose_pushes_by_the_files_they_changed() {
    let upstream = RecordingUpstream::start().await;
    let relay = Relay::start_with(
        &paths_config(&upstream.url()),
        &[("secret", SECRET), ("token", "glptt-paths-0123456789")],
    )
    .await;

    // GitHub: README.md alone. `docs` wants it, `code` excludes it, `api` does not want it.
    let reply = github(&relay, "/hooks/github", "push", "github/push_branch.json").await;
    assert_eq!(reply.status, 202, "{}", reply.text());
    assert_eq!(queued_and_reasons(&reply).0, ["acme/docs"]);

    // Gitea: `example` alone.
    let gitea_reply = gitea(&relay, "gitea-1", fixture("gitea/push.json")).await;
    assert_eq!(gitea_reply.status, 202, "{}", gitea_reply.text());
    let (queued, _) = queued_and_reasons(&gitea_reply);
    assert_eq!(
        queued,
        ["acme/code"],
        "`example` is code, neither docs nor the api"
    );

    // GitLab lists 2 of the push's 4 commits: the files are not all known, so every
    // filter lets the push through rather than miss a build.
    let reply = gitlab_push(&relay, "gl-1", "gitlab/push.json").await;
    assert_eq!(reply.status, 202, "{}", reply.text());
    let (mut queued, _) = queued_and_reasons(&reply);
    queued.sort();
    assert_eq!(queued, ["acme/api", "acme/code", "acme/docs"]);

    // One commit changing README.md, wholly listed: only `docs`; the others say why.
    let reply = gitlab_push(&relay, "gl-2", "gitlab/push_branch_create.json").await;
    assert_eq!(reply.status, 202, "{}", reply.text());
    assert_eq!(queued_and_reasons(&reply).0, ["acme/docs"]);

    let calls = received(&upstream, 6).await;
    let changed: Vec<String> = calls
        .iter()
        .filter(|c| c.path_and_query.contains("acme%2Fcode"))
        .map(|c| {
            c.json()["variables"]["CHANGED"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let mut changed = changed;
    changed.sort();
    assert_eq!(changed, ["example", "unknown"]);

    // A push none of the rules wants is answered 200 with each rule's reason.
    let only_readme = r#"{"ref": "refs/heads/main", "before": "1111111111111111111111111111111111111111",
        "after": "2222222222222222222222222222222222222222", "repository": {"full_name": "acme/mono",
        "clone_url": "https://git.example.com/acme/mono.git"}, "pusher": {"login": "me"},
        "commits": [{"id": "2222222222222222222222222222222222222222", "message": "docs",
        "added": [], "modified": ["CHANGELOG.md"], "removed": []}], "total_commits": 1}"#;
    let reply = gitea(&relay, "gitea-2", only_readme.as_bytes().to_vec()).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let (queued, reasons) = queued_and_reasons(&reply);
    assert!(queued.is_empty());
    assert_eq!(
        reasons,
        [
            (
                "api".to_owned(),
                "paths: none of the 1 changed file (CHANGELOG.md) matches [\"services/api/**\"]"
                    .to_owned()
            ),
            (
                "docs".to_owned(),
                "paths: none of the 1 changed file (CHANGELOG.md) matches [\"**/*.md\"] without also matching paths_exclude [\"CHANGELOG.md\"]".to_owned()
            ),
            (
                "code".to_owned(),
                "paths_exclude: the 1 changed file (CHANGELOG.md) matches [\"*.md\"]".to_owned()
            ),
        ]
    );
    assert_eq!(upstream.received().len(), 6, "nothing more was sent");
}

/// A push whose webhook does not list every changed file (GitLab lists 2 of this push's 4
/// commits): with `compare` on the source, the relay asks the forge (a stand-in GitLab
/// API here) and the path filters read its answer; when the forge fails or is slow, the
/// push passes every filter as before, and the answer says why.
#[tokio::test]
async fn the_forge_is_asked_which_files_a_push_changed_when_its_webhook_does_not_say() {
    let upstream = RecordingUpstream::start().await;
    let forge = RecordingUpstream::start().await;
    let config = format!(
        r#"
[upstream.gitlab]
url = "{}"

[source.gitlab]
provider = "gitlab"
secret = "file:{{dir}}/secret"
compare = {{ token = "file:{{dir}}/forge-token", api_url = "{}", timeout = "700ms" }}

[[rule]]
name = "api"
source = "gitlab"
events = ["push"]
paths = ["services/api/**"]
[rule.trigger]
project = "acme/api"
token = "file:{{dir}}/token"

[[rule]]
name = "docs"
source = "gitlab"
events = ["push"]
paths = ["**/*.md"]
[rule.trigger]
project = "acme/docs"
token = "file:{{dir}}/token"

[[rule]]
name = "everything"
source = "gitlab"
events = ["push"]
[rule.trigger]
project = "acme/all"
token = "file:{{dir}}/token"
"#,
        upstream.url(),
        forge.url()
    );
    let relay = Relay::start_with(
        &config,
        &[
            ("secret", SECRET),
            ("token", "glptt-compare-0123456789"),
            ("forge-token", "glpat-forge-read-0123456789"),
        ],
    )
    .await;
    let sorted = |reply: &Reply| {
        let (mut queued, _) = queued_and_reasons(reply);
        queued.sort();
        queued
    };

    // The forge's comparison: one file under services/api, renamed.
    forge.answer_next(Answer::new(
        200,
        r#"{"commit": {}, "commits": [], "compare_timeout": false, "compare_same_ref": false,
            "diffs": [{"old_path": "services/api/old.go", "new_path": "services/api/new.go",
                       "renamed_file": true, "diff": ""}]}"#,
    ));
    let reply = gitlab_push(&relay, "cmp-1", "gitlab/push.json").await;
    assert_eq!(reply.status, 202, "{}", reply.text());
    assert_eq!(sorted(&reply), ["acme/all", "acme/api"], "{}", reply.text());
    assert_eq!(
        reply.json()["events"][0]["compared"],
        json!({"files": ["services/api/new.go", "services/api/old.go"]})
    );
    let asked = forge.only();
    assert_eq!(asked.method, "GET");
    assert_eq!(
        asked.path_and_query,
        "/api/v4/projects/mike%2Fdiaspora/repository/compare?from=95790bf891e76fee5e1747ab589903a6a1f80f22&to=da1560886d4f094c3e6c9ef40349f7d38b5d27d7"
    );
    assert_eq!(
        asked.header("authorization"),
        Some("Bearer glpat-forge-read-0123456789")
    );

    // The forge refuses: every filter lets the push through, and the answer says why.
    forge.answer_next(Answer::new(403, r#"{"message": "403 Forbidden"}"#));
    let reply = gitlab_push(&relay, "cmp-2", "gitlab/push.json").await;
    assert_eq!(reply.status, 202, "{}", reply.text());
    assert_eq!(sorted(&reply), ["acme/all", "acme/api", "acme/docs"]);
    let failed = reply.json()["events"][0]["compared"]["failed"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        failed.contains("403") && failed.contains("Forbidden"),
        "{failed}"
    );
    assert!(!failed.contains("glpat-forge"), "{failed}");

    // The forge too slow: the webhook is answered within the timeout, filters let it by.
    forge.answer_next(Answer::new(200, r#"{"diffs": []}"#).delayed(Duration::from_secs(3)));
    let started = std::time::Instant::now();
    let reply = gitlab_push(&relay, "cmp-3", "gitlab/push.json").await;
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(reply.status, 202, "{}", reply.text());
    assert_eq!(sorted(&reply), ["acme/all", "acme/api", "acme/docs"]);
    let failed = reply.json()["events"][0]["compared"]["failed"].clone();
    assert!(
        failed.as_str().unwrap().contains("did not answer within"),
        "{failed}"
    );

    // A repository that moved: the forge's redirect is followed within its API root.
    forge.answer_next(
        Answer::new(301, r#"{"message": "Moved Permanently"}"#).header(
            "location",
            &format!(
                "{}/api/v4/projects/7/repository/compare?from=a&to=b",
                forge.url()
            ),
        ),
    );
    forge.answer_next(Answer::new(
        200,
        r#"{"diffs": [{"old_path": "README.md", "new_path": "README.md"}]}"#,
    ));
    let reply = gitlab_push(&relay, "cmp-6", "gitlab/push.json").await;
    assert_eq!(
        sorted(&reply),
        ["acme/all", "acme/docs"],
        "{}",
        reply.text()
    );
    let calls = forge.received();
    assert_eq!(
        calls.last().unwrap().path_and_query,
        "/api/v4/projects/7/repository/compare?from=a&to=b"
    );

    // More files than path filters compare: not kept, and the push passes.
    let many: Vec<String> = (0..10_001)
        .map(|i| format!(r#"{{"old_path": "f/{i}", "new_path": "f/{i}", "diff": ""}}"#))
        .collect();
    forge.answer_next(Answer::new(
        200,
        &format!(r#"{{"diffs": [{}]}}"#, many.join(",")),
    ));
    let reply = gitlab_push(&relay, "cmp-5", "gitlab/push.json").await;
    assert_eq!(sorted(&reply), ["acme/all", "acme/api", "acme/docs"]);
    let failed = reply.json()["events"][0]["compared"]["failed"].clone();
    assert!(
        failed.as_str().unwrap().contains("more than the 10000"),
        "{failed}"
    );

    // Rate limited: the forge's Retry-After holds every compare of the source until then.
    forge.answer_next(
        Answer::new(429, r#"{"message": "429 Too Many Requests"}"#).header("retry-after", "60"),
    );
    for delivery in ["cmp-7", "cmp-8"] {
        let reply = gitlab_push(&relay, delivery, "gitlab/push.json").await;
        assert_eq!(sorted(&reply), ["acme/all", "acme/api", "acme/docs"]);
        let failed = reply.json()["events"][0]["compared"]["failed"].clone();
        assert!(failed.as_str().unwrap().contains("rate limit"), "{failed}");
    }
    assert_eq!(forge.received().len(), 7, "held back after the 429");

    // GitLab's retry of the first push (the same delivery id) is answered as a repeat
    // without asking again.
    let reply = gitlab_push(&relay, "cmp-1", "gitlab/push.json").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["duplicate"], true, "{}", reply.text());

    // A new branch (nothing to compare it with), its one commit's files listed: not asked.
    let reply = gitlab_push(&relay, "cmp-4", "gitlab/push_branch_create.json").await;
    assert_eq!(reply.status, 202, "{}", reply.text());
    assert_eq!(sorted(&reply), ["acme/all", "acme/docs"]);
    assert_eq!(forge.received().len(), 7, "the forge was asked seven times");

    // The record keeps the forge's answer: explain --delivery (like the dashboard and a
    // replan) reads it again instead of asking, and its rules' verdicts follow it.
    let explained = std::process::Command::new(env!("CARGO_BIN_EXE_hookrelay"))
        .args(["explain", "--json", "--config"])
        .arg(relay.dir.path())
        .arg("--state")
        .arg(relay.state())
        .args(["--source", "gitlab", "--delivery", "cmp-1"])
        .output()
        .unwrap();
    assert!(explained.status.success(), "{explained:?}");
    let explained: serde_json::Value = serde_json::from_slice(&explained.stdout).unwrap();
    assert_eq!(
        explained["events"][0]["changed_files"],
        json!(["services/api/new.go", "services/api/old.go"]),
        "{explained:#}"
    );
    assert_eq!(forge.received().len(), 7, "explain asked nothing");
    let stored = relay
        .app
        .outbox
        .stored_from("gitlab", "cmp-1")
        .expect("the first push is stored");
    assert_eq!(
        stored.compared,
        [Some(hookrelay::event::ComparedRecord::Files(vec![
            "services/api/new.go".into(),
            "services/api/old.go".into()
        ]))]
    );
}

/// Bitbucket Cloud's webhooks list no files at all: with `compare`, the relay reads the
/// forge's diffstat (newer commit first), every page of it, and the path filters choose.
#[tokio::test]
async fn a_bitbucket_push_is_filtered_by_the_diffstat_the_forge_pages_through() {
    let upstream = RecordingUpstream::start().await;
    let forge = RecordingUpstream::start().await;
    let config = format!(
        r#"
[upstream.gitlab]
url = "{}"

[source.bitbucket]
provider = "bitbucket-cloud"
secret = "file:{{dir}}/secret"
compare = {{ token = "file:{{dir}}/forge-token", api_url = "{}/2.0" }}

[[rule]]
name = "api"
source = "bitbucket"
paths = ["services/api/**"]
[rule.trigger]
project = "acme/api"
token = "file:{{dir}}/token"

[[rule]]
name = "web"
source = "bitbucket"
paths = ["services/web/**"]
[rule.trigger]
project = "acme/web"
token = "file:{{dir}}/token"
"#,
        upstream.url(),
        forge.url()
    );
    let relay = Relay::start_with(
        &config,
        &[
            ("secret", SECRET),
            ("token", "glptt-compare-0123456789"),
            ("forge-token", "bitbucket-read-0123456789"),
        ],
    )
    .await;
    let second = format!(
        "{}/2.0/repositories/martinherren1984/publictestrepo/diffstat/c14c1bb..a51241a?topic=true&page=2",
        forge.url()
    );
    forge.answer_next(Answer::new(
        200,
        &format!(
            r#"{{"pagelen": 1, "page": 1, "values": [{{"type": "diffstat", "status": "modified",
                "old": {{"path": "README.md"}}, "new": {{"path": "README.md"}}}}], "next": "{second}"}}"#
        ),
    ));
    forge.answer_next(Answer::new(
        200,
        r#"{"pagelen": 1, "page": 2, "values": [{"type": "diffstat", "status": "added",
            "old": null, "new": {"path": "services/web/index.html"}}]}"#,
    ));
    let body = fixture("bitbucket_cloud/repo_push_branch.json");
    let signature = sha256_signature(SECRET, &body);
    let reply = post(
        &relay.url("/hooks/bitbucket"),
        &[
            ("X-Event-Key", "repo:push"),
            ("X-Request-UUID", "bb-cmp-1"),
            ("X-Hub-Signature", &signature),
        ],
        body,
    )
    .await;
    assert_eq!(reply.status, 202, "{}", reply.text());
    let (queued, reasons) = queued_and_reasons(&reply);
    assert_eq!(queued, ["acme/web"], "{}", reply.text());
    assert!(reasons.is_empty(), "{reasons:?}");
    assert_eq!(
        reply.json()["events"][0]["compared"],
        json!({"files": ["README.md", "services/web/index.html"]})
    );
    let asked: Vec<String> = forge
        .received()
        .iter()
        .map(|call| call.path_and_query.clone())
        .collect();
    assert_eq!(
        asked,
        [
            "/2.0/repositories/martinherren1984/publictestrepo/diffstat/c14c1bb05dfb1fdcdf06b31485fff61b0ea44277..a51241ae1f00cbe728930db48e890b18fd527f99?topic=true".to_owned(),
            "/2.0/repositories/martinherren1984/publictestrepo/diffstat/c14c1bb..a51241a?topic=true&page=2".to_owned(),
        ]
    );
    assert!(
        forge
            .received()
            .iter()
            .all(|call| call.header("authorization") == Some("Bearer bitbucket-read-0123456789"))
    );
}

/// A new branch has no commit before it; with `new_branch_base` the forge compares it with
/// that branch (as GitLab's `rules:changes:compare_to` does), so its first push builds
/// only what it changed. GitHub's own `push_branch_create.json` lists no commits.
#[tokio::test]
async fn a_new_branch_is_compared_with_the_base_branch_when_one_is_named() {
    let upstream = RecordingUpstream::start().await;
    let forge = RecordingUpstream::start().await;
    let config = format!(
        r#"
[upstream.gitlab]
url = "{}"

[source.github]
provider = "github"
secret = "file:{{dir}}/secret"
compare = {{ token = "file:{{dir}}/forge-token", api_url = "{}", new_branch_base = "master" }}

[[rule]]
name = "api"
source = "github"
paths = ["services/api/**"]
[rule.trigger]
project = "acme/api"
token = "file:{{dir}}/token"
"#,
        upstream.url(),
        forge.url()
    );
    let relay = Relay::start_with(
        &config,
        &[
            ("secret", SECRET),
            ("token", "glptt-compare-0123456789"),
            ("forge-token", "ghp_read0123456789abcdef"),
        ],
    )
    .await;
    forge.answer_next(Answer::new(
        200,
        r#"{"status": "ahead", "files": [{"filename": "docs/guide.md", "status": "added"}]}"#,
    ));
    let reply = github(
        &relay,
        "/hooks/github",
        "push",
        "github/push_branch_create.json",
    )
    .await;
    assert_eq!(
        reply.status,
        200,
        "nothing under services/api: {}",
        reply.text()
    );
    let (queued, reasons) = queued_and_reasons(&reply);
    assert!(queued.is_empty());
    assert_eq!(
        reasons,
        [(
            "api".to_owned(),
            "paths: none of the 1 changed file (docs/guide.md) matches [\"services/api/**\"]"
                .to_owned()
        )]
    );
    let asked = forge.only();
    assert_eq!(
        asked.path_and_query,
        "/api/v3/repos/bradrydzewski/drone-test-go/compare/master...d2b75aa7797ec26b088fa2dd527e9d2c052fcedd"
    );
    assert_eq!(asked.header("x-github-api-version"), Some("2022-11-28"));
}

/// `[skip ci]` in the head commit's message skips a branch push, as GitLab and GitHub
/// Actions skip their own pipelines, unless a rule says `skip_ci = false`; tags build.
#[tokio::test]
async fn a_push_whose_head_commit_says_skip_ci_runs_only_rules_that_ignore_it() {
    let upstream = RecordingUpstream::start().await;
    let config = format!(
        r#"
[upstream.gitlab]
url = "{}"

[source.github]
provider = "github"
secret = "file:{{dir}}/secret"

[[rule]]
name = "build"
source = "github"
[rule.trigger]
project = "acme/build"
token = "file:{{dir}}/token"

[[rule]]
name = "mirror"
source = "github"
skip_ci = false
[rule.trigger]
project = "acme/mirror"
token = "file:{{dir}}/token"
"#,
        upstream.url()
    );
    let relay = Relay::start_with(
        &config,
        &[("secret", SECRET), ("token", "glptt-skip-0123456789")],
    )
    .await;
    // GitHub's own push, its one (head) commit's message marked.
    let marked = |file: &str, message: &str| {
        let mut push: serde_json::Value = serde_json::from_slice(&fixture(file)).unwrap();
        for commit in push["commits"].as_array_mut().unwrap() {
            commit["message"] = json!(message);
        }
        push["head_commit"]["message"] = json!(message);
        serde_json::to_vec(&push).unwrap()
    };
    let url = relay.url("/hooks/github");
    let body = marked("github/push_branch.json", "docs: typo\n\n[CI SKIP]");
    let reply = signed_github_body(&url, SECRET, "push", "skip-1", body).await;
    assert_eq!(reply.status, 202, "{}", reply.text());
    let triggers = reply.json()["triggers"].clone();
    assert_eq!(triggers.as_array().unwrap().len(), 1, "{triggers}");
    assert_eq!(triggers[0]["rule"], "mirror");

    // Nothing else wanted it: 200, and the rule says why.
    let quiet = r#"
[upstream.gitlab]
url = "http://127.0.0.1:9"
[source.github]
provider = "github"
secret = "file:{dir}/secret"
[[rule]]
name = "build"
source = "github"
[rule.trigger]
project = "acme/build"
token = "file:{dir}/token"
"#;
    let only_build = Relay::start_with(
        quiet,
        &[("secret", SECRET), ("token", "glptt-skip-0123456789")],
    )
    .await;
    let body = marked("github/push_branch.json", "chore: bump [skip ci]");
    let reply = signed_github_body(
        &only_build.url("/hooks/github"),
        SECRET,
        "push",
        "skip-2",
        body,
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        reply.json()["events"][0]["rules"][0]["reason"],
        "skip_ci: the head commit's message says \"[skip ci]\" (`skip_ci = false` runs the rule anyway)"
    );

    // A release tag on a commit that skipped its branch build still builds.
    let mut tag: serde_json::Value =
        serde_json::from_slice(&fixture("github/push_tag.json")).unwrap();
    let release = "chore(release): 1.2.0 [skip ci]";
    tag["commits"] = json!([{"id": tag["after"], "message": release, "added": [], "modified": ["CHANGELOG.md"], "removed": []}]);
    tag["head_commit"]["message"] = json!(release);
    let body = serde_json::to_vec(&tag).unwrap();
    let reply = signed_github_body(&url, SECRET, "push", "skip-3", body).await;
    assert_eq!(reply.status, 202, "{}", reply.text());
    assert_eq!(reply.json()["triggers"].as_array().unwrap().len(), 2);
    received(&upstream, 3).await;
}
