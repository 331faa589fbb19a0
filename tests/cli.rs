//! The real `hookrelay` binary: `check`, start-up refusals, serving, logs and SIGTERM.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::binary::*;
use common::*;

#[test]
fn check_passes_on_the_shipped_rules() {
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules");
    let output = hookrelay(&["check", "--config", rules.to_str().unwrap()]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("configuration OK"), "{stdout}");
    assert!(
        stdout.contains("gateway: enabled, forwarding to gitlab"),
        "{stdout}"
    );
}

#[test]
fn check_says_a_source_is_rotating_its_secret() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "new", "the-new-secret-0123456789");
    write(dir.path(), "old", "the-old-secret-0123456789");
    write(
        dir.path(),
        "a.toml",
        "[source.gh]\nprovider = \"github\"\nsecret = [\"file:new\", \"file:old\"]\n",
    );
    let output = hookrelay(&["check", "--config", dir.path().to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(
        stdout.contains("gh (github, POST /hooks/gh, 2 secrets (rotating))"),
        "{stdout}"
    );
    assert!(!stdout.contains("the-old-secret"), "{stdout}");
}

#[test]
fn check_shows_where_a_source_takes_webhooks_from_and_the_trusted_proxies() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "a.toml",
        "[server]\ntrusted_proxies = [\"127.0.0.1\"]\n\n\
         [source.ci]\nprovider = \"generic\"\nallow_unsigned = true\nallow_from = [\"10.0.0.0/8\", \"2001:db8::/32\"]\n\n\
         [upstream.gl]\nurl = \"https://gitlab.example\"\n\n\
         [gateway]\nallow_from = [\"192.0.2.7\"]\n",
    );
    let output = hookrelay(&["check", "--config", dir.path().to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(
        stdout.contains("ci (generic, POST /hooks/ci, only from 10.0.0.0/8 2001:db8::/32)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("gateway: enabled, forwarding to gl, only from 192.0.2.7/32"),
        "{stdout}"
    );
    assert!(
        stdout.contains("\n  trusted proxies: 127.0.0.1/32"),
        "{stdout}"
    );
}

#[test]
fn check_lists_every_problem_as_file_line_message() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.toml", "[server]\nlisten = \"localhost\"\n");
    write(
        dir.path(),
        "b.toml",
        "[upstream.gitlab]\nurl = \"https://x\"\nretries = 3\n",
    );
    let output = hookrelay(&["check", "--config", dir.path().to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let a = format!(
        "{}:2: listen: \"localhost\" is not an address",
        dir.path().join("a.toml").display()
    );
    let b = format!(
        "{}:3: unknown field `retries`",
        dir.path().join("b.toml").display()
    );
    assert!(stderr.contains(&a), "{stderr}");
    assert!(stderr.contains(&b), "{stderr}");
    assert!(stderr.contains("2 problems found"), "{stderr}");
}

#[test]
fn check_warns_about_rules_that_cannot_match_and_passes() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "a.toml",
        "[upstream.gitlab]\nurl = \"https://gitlab.example.com\"\n[source.github]\nprovider = \"github\"\nsecret = \"file:secret\"\n\
         [[rule]]\nname = \"main\"\nsource = \"github\"\nrefs = [\"refs/heads/main\"]\n[rule.trigger]\nproject = \"acme%2Fapp-a\"\ntoken = \"file:token\"\n",
    );
    write(dir.path(), "secret", "0123456789abcdef0123");
    write(dir.path(), "token", "glptt-0123456789abcdef");
    let output = hookrelay(&["check", "--config", dir.path().to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    let file = dir.path().join("a.toml");
    assert!(
        stderr.contains(&format!(
            "{}:9: warning: rule \"main\": refs: \"refs/heads/main\" is a full ref name",
            file.display()
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "{}:11: warning: rule \"main\": project \"acme%2Fapp-a\" looks URL-encoded",
            file.display()
        )),
        "{stderr}"
    );
    assert!(stderr.contains("2 warnings"), "{stderr}");
}

#[test]
fn serve_refuses_bad_configuration_with_exit_64_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.toml", "[gateway]\nupstream = \"nowhere\"\n");
    let output = hookrelay(&[
        "serve",
        "--config",
        dir.path().to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("a.toml:2: [gateway] upstream = \"nowhere\" names no [upstream.nowhere]"),
        "{stderr}"
    );
}

#[test]
fn serve_says_what_is_wrong_with_the_state_folder() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.toml", "[server]\nmax_body = \"1MiB\"\n");
    let not_a_folder = dir.path().join("state");
    std::fs::write(&not_a_folder, b"").unwrap();
    for (state, expected) in [
        (not_a_folder.clone(), "is a file, not a folder"),
        (not_a_folder.join("inner"), "cannot create the state folder"),
    ] {
        let output = hookrelay(&[
            "serve",
            "--config",
            dir.path().to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--state",
            state.to_str().unwrap(),
        ]);
        assert_eq!(output.status.code(), Some(64));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("hookrelay: not starting: ") && stderr.contains(expected),
            "{stderr}"
        );
        assert!(!stderr.contains("chmod 700"), "{stderr}");
    }
}

#[test]
fn every_command_has_help() {
    for args in [
        vec!["--help"],
        vec!["serve", "--help"],
        vec!["check", "--help"],
    ] {
        let output = hookrelay(&args);
        assert!(output.status.success(), "{args:?}");
        assert!(
            String::from_utf8_lossy(&output.stdout).contains("--"),
            "{args:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_forwards_logs_one_line_per_request_and_never_a_token() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "relay.toml",
        &gateway_config(&upstream.url(), ""),
    );
    let state = dir.path().join("state");
    let mut served = Served::start(dir.path(), &state);
    let address = served.address();
    assert!(state.is_dir(), "the state folder is created");

    let token = "glptt-0123456789abcdef0123456789abcdef01234567";
    let url = format!("http://{address}/api/v4/projects/9/trigger/pipeline?token={token}&ref=main");
    let reply = post(&url, &[], "").await;
    assert_eq!(reply.status, 201);
    let refused = post(
        &format!("http://{address}/api/v4/projects/9/trigger/pipeline?token={token}"),
        &[],
        "",
    )
    .await;
    assert_eq!(refused.status, 400);
    let request_line = served.wait_for("path=/api/v4/projects/9/trigger/pipeline status=201");
    assert!(
        request_line.contains("method=POST") && request_line.contains("upstream_ms="),
        "{request_line}"
    );

    let (code, lines) = served.terminate();
    assert_eq!(code, Some(0), "SIGTERM is a clean shutdown: {lines:#?}");
    let all = lines.join("\n");
    assert!(all.contains("SIGTERM received"), "{all}");
    assert!(
        all.contains("status=400"),
        "the refused call is logged too: {all}"
    );
    assert!(
        !all.contains(token),
        "the token must never be logged:\n{all}"
    );
    assert!(
        !all.contains("0123456789abcdef"),
        "not even most of it:\n{all}"
    );
    assert!(
        all.contains("token=glptt-01…"),
        "the masked token identifies the caller: {all}"
    );
}

fn fixture_path(path: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(path)
        .display()
        .to_string()
}

#[test]
fn serve_refuses_to_start_when_a_secret_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "a.toml",
        "[source.github]\nprovider = \"github\"\nsecret = \"env:HOOKRELAY_TEST_UNSET_SECRET\"\n",
    );
    let output = Command::new(BIN)
        .args([
            "serve",
            "--config",
            dir.path().to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .env_remove("HOOKRELAY_TEST_UNSET_SECRET")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("a.toml:3: source.github.secret (env:HOOKRELAY_TEST_UNSET_SECRET): environment variable HOOKRELAY_TEST_UNSET_SECRET is not set"),
        "{stderr}"
    );
}

#[test]
fn explain_shows_the_normalized_event_without_needing_secrets() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "a.toml",
        "[source.gh]\nprovider = \"github\"\nsecret = \"env:HOOKRELAY_TEST_UNSET_SECRET\"\n[source.bb]\nprovider = \"bitbucket-cloud\"\nsecret = \"env:HOOKRELAY_TEST_UNSET_SECRET\"\n",
    );
    let config = dir.path().to_str().unwrap();
    let output = hookrelay(&[
        "explain",
        "--config",
        config,
        "--source",
        "gh",
        "--event",
        "push",
        &fixture_path("github/push_tag.json"),
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    for expected in [
        "source      gh (provider github)",
        "event type  push",
        "signature   not checked",
        "event 1 of 1: tag",
        "repository      Codertocat/Hello-World",
        "ref             refs/tags/simple-tag  (ref_name simple-tag)",
        "before → after  000000000000 → 6113728f27ae",
    ] {
        assert!(
            text.contains(expected),
            "{expected:?} missing from:\n{text}"
        );
    }
    // A branch push: the files its commits touched, which rules' `paths` read.
    let output = hookrelay(&[
        "explain",
        "--config",
        config,
        "--source",
        "gh",
        "--event",
        "push",
        &fixture_path("github/push_branch.json"),
    ]);
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("  changed files   1\n    README.md\n"),
        "{text}"
    );
    let output = hookrelay(&[
        "explain",
        "--config",
        config,
        "--source",
        "gh",
        "--event",
        "push",
        "--json",
        &fixture_path("github/push_branch.json"),
    ]);
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        json["events"][0]["changed_files"],
        serde_json::json!(["README.md"])
    );
    assert_eq!(
        json["events"][0]["commits"][0]["added"],
        serde_json::json!(["README.md"])
    );
    let output = hookrelay(&[
        "explain",
        "--config",
        config,
        "--source",
        "gh",
        "--event",
        "delete",
        &fixture_path("github/delete_tag.json"),
    ]);
    assert!(
        String::from_utf8_lossy(&output.stdout)
            .contains("no event: GitHub also sends a `push` event")
    );
    let output = hookrelay(&[
        "explain",
        "--config",
        config,
        "--source",
        "bb",
        "--json",
        "--header",
        "X-Request-UUID: r-1",
        &fixture_path("bitbucket_cloud/repo_push_branch_delete.json"),
    ]);
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["delivery"], "r-1");
    assert_eq!(json["events"][0]["kind"], "delete");
    assert_eq!(json["events"][0]["deleted_kind"], "branch");
    assert_eq!(json["events"][0]["changed_files"], serde_json::Value::Null);
    assert_eq!(
        json["events"][0]["changed_files_unknown"],
        "a deletion changes no files"
    );
    assert_eq!(
        json["events"][0]["repository_url"],
        "https://bitbucket.org/kolaszek/repository-name.git"
    );
    let output = hookrelay(&[
        "explain",
        "--config",
        config,
        "--source",
        "nope",
        &fixture_path("github/push_tag.json"),
    ]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("configured: bb, gh"));
}

const RULES: &str = r#"
[upstream.gitlab]
url = "https://gitlab.example.com"

[source.github]
provider = "github"
secret = "env:HOOKRELAY_TEST_UNSET_SECRET"
url_refs = ["release/*"]

[[rule]]
name = "docs-on-release-tag"
source = "github"
repository = "Codertocat/*"
events = ["tag"]
refs = ["v*"]
[rule.trigger]
project = "acme/docs"
ref = "main"
token = "env:HOOKRELAY_TEST_UNSET_TOKEN"

[[rule]]
name = "any-tag"
source = "github"
events = ["tag"]
[rule.trigger]
project = "group/{{ event.repository | lower }}"
token = "env:HOOKRELAY_TEST_UNSET_TOKEN"
variables = { TAG = "{{ event.ref_name }}" }

[[rule]]
name = "pushes"
source = "github"
events = ["push"]
[rule.trigger]
project = "9"
token = "env:HOOKRELAY_TEST_UNSET_TOKEN"
"#;

/// `explain --schedule`: a scheduled rule's next times in its zone and in UTC, and the
/// calls it makes, `schedule.*` filled in as the scheduler does.
#[test]
fn explain_shows_when_a_schedule_fires_and_what_it_sends() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "rules.toml",
        &format!(
            "{RULES}\n[[rule]]\nname = \"nightly\"\nschedule = \"30 2 * * *\"\ntimezone = \"Europe/Berlin\"\n\
             [rule.trigger]\nproject = \"acme/app\"\nref = \"main\"\ntoken = \"env:HOOKRELAY_TEST_UNSET_TOKEN\"\n\
             variables = {{ WHY = \"{{{{ schedule.rule }}}} at {{{{ schedule.time }}}}\" }}\n"
        ),
    );
    let config = dir.path().to_str().unwrap();
    let output = hookrelay(&["explain", "--config", config, "--schedule", "nightly"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("schedule    30 2 * * * in Europe/Berlin"),
        "{stdout}"
    );
    assert_eq!(
        stdout.matches(" 02:30:00 CE").count(),
        6,
        "five times and the calls' one: {stdout}"
    );
    assert!(
        stdout.contains("01:30:00 UTC)") || stdout.contains("00:30:00 UTC)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("/api/v4/projects/acme%2Fapp/trigger/pipeline   (rule nightly"),
        "{stdout}"
    );
    assert!(
        stdout.contains("variables[WHY] = \"nightly at 20"),
        "{stdout}"
    );
    assert!(
        stdout.contains("T02:30:00+01:00\"") || stdout.contains("T02:30:00+02:00\""),
        "{stdout}"
    );

    let output = hookrelay(&[
        "explain",
        "--config",
        config,
        "--schedule",
        "nightly",
        "--json",
    ]);
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["next"].as_array().unwrap().len(), 5);
    assert_eq!(json["triggers"][0]["project"], "acme/app");

    let output = hookrelay(&["explain", "--config", config, "--schedule", "pushes"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&output.stderr)
            .contains("rule \"pushes\" has no schedule: it reacts to webhooks of github"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let output = hookrelay(&["explain", "--config", config, "--schedule", "nope"]);
    assert!(String::from_utf8_lossy(&output.stderr).contains("scheduled rules: nightly"));
}

#[test]
fn explain_shows_each_rule_with_the_reason_and_the_calls() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "rules.toml", RULES);
    let config = dir.path().to_str().unwrap();
    let output = hookrelay(&[
        "explain",
        "--config",
        config,
        "--source",
        "github",
        "--event",
        "push",
        &fixture_path("github/push_tag.json"),
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    for expected in [
        "✗ docs-on-release-tag  refs: \"simple-tag\" matches none of [\"v*\"]",
        "✓ any-tag              matched",
        "✗ pushes               events: tag not in [push]",
        "trigger calls (1)",
        "POST https://gitlab.example.com/api/v4/projects/group%2Fcodertocat%2Fhello-world/trigger/pipeline   (rule any-tag, upstream gitlab)",
        "ref       refs/tags/simple-tag",
        "token     env:HOOKRELAY_TEST_UNSET_TOKEN (not read by explain)",
        "variables[TAG] = \"simple-tag\"",
    ] {
        assert!(
            text.contains(expected),
            "{expected:?} missing from:\n{text}"
        );
    }
    let output = hookrelay(&[
        "explain",
        "--config",
        config,
        "--source",
        "github",
        "--ref",
        "release/1",
        "--json",
        &fixture_path("github/push_tag.json"),
    ]);
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["triggers"][0]["ref"], "release/1");
    assert_eq!(
        json["rules"][1],
        serde_json::json!({"rule": "any-tag", "matched": true, "reason": null})
    );
}

#[test]
fn check_reports_every_rule_problem_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "rules.toml",
        r#"[upstream.gitlab]
url = "https://gitlab.example.com"

[source.github]
provider = "github"
secret = "env:HOOKRELAY_TEST_SECRET"

[[rule]]
name = "a"
source = "gthub"
[rule.trigger]
project = "9"
token = "env:HOOKRELAY_TEST_TOKEN"

[[rule]]
name = "b"
source = "github"
refs = ["[oops"]
when = "event.commit_count >"
[rule.trigger]
project = "{{ event.branch }}"
upstream = "gitlba"
token = "env:HOOKRELAY_TEST_TOKEN"
variables = { TRIGGER_PAYLOAD = "x" }

[[rule]]
name = "a"
source = "github"
events = ["merge"]
[rule.trigger]
project = "9"
token = "hunter2"

[[rule]]
name = "c"
source = "github"
when = "event.nope == 1"
[rule.trigger]
project = "9"
token = "env:HOOKRELAY_TEST_UNSET_TOKEN"
"#,
    );
    let output = Command::new(BIN)
        .args(["check", "--config", dir.path().to_str().unwrap()])
        .env("HOOKRELAY_TEST_SECRET", "a-webhook-secret-of-some-length")
        .env("HOOKRELAY_TEST_TOKEN", "glptt-x")
        .env_remove("HOOKRELAY_TEST_UNSET_TOKEN")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let file = dir.path().join("rules.toml").display().to_string();
    for expected in [
        ":10: rule \"a\": source \"gthub\" names no [source.gthub] (defined: github)",
        ":18: rule \"b\": refs: \"[oops\" is not a valid glob",
        ":24: rule \"b\": variables[TRIGGER_PAYLOAD] is reserved",
        ":29: rule \"a\": events: \"merge\" is not push, tag or delete",
        ":32: rule \"a\": token: a secret must be written `env:NAME` or `file:PATH`",
        ":40: rule \"c\": token (env:HOOKRELAY_TEST_UNSET_TOKEN): environment variable HOOKRELAY_TEST_UNSET_TOKEN is not set",
    ] {
        assert!(
            stderr.contains(&format!("{file}{expected}")),
            "{expected:?} missing from:\n{stderr}"
        );
    }
}

#[test]
fn check_reports_template_and_upstream_problems_once_the_rest_is_right() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "rules.toml",
        r#"[upstream.gitlab]
url = "https://gitlab.example.com"
[upstream.other]
url = "https://other.example.com"

[source.github]
provider = "github"
secret = "env:HOOKRELAY_TEST_SECRET"

[[rule]]
name = "b"
source = "github"
when = "event.commit_count >"
[rule.trigger]
project = "{{ event.branch }}"
upstream = "gitlab"
token = "env:HOOKRELAY_TEST_TOKEN"

[[rule]]
name = "c"
source = "github"
[rule.trigger]
project = "9"
token = "env:HOOKRELAY_TEST_TOKEN"

[[rule]]
name = "nightly"
schedule = "30 0 * * *"
timezone = "Europe/Berlin"
[rule.trigger]
project = "9"
ref = "{{ event.ref }}"
upstream = "gitlab"
token = "env:HOOKRELAY_TEST_TOKEN"
"#,
    );
    let output = Command::new(BIN)
        .args(["check", "--config", dir.path().to_str().unwrap()])
        .env("HOOKRELAY_TEST_SECRET", "a-webhook-secret-of-some-length")
        .env("HOOKRELAY_TEST_TOKEN", "glptt-x")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for expected in [
        ":13: rule \"b\": when: syntax error",
        ":15: rule \"b\": project: `event.branch` does not exist",
        ":23: rule \"c\": the trigger needs `upstream = \"NAME\"`, one of: gitlab, other",
        ":32: rule \"nightly\": ref: a scheduled rule has no event",
    ] {
        assert!(
            stderr.contains(expected),
            "{expected:?} missing from:\n{stderr}"
        );
    }
}

/// Waits (bounded) until the upstream has seen a call for each of `projects`.
async fn upstream_saw(upstream: &RecordingUpstream, projects: &[&str]) -> Vec<String> {
    let paths = || {
        upstream
            .received()
            .iter()
            .map(|r| r.path_and_query.clone())
            .collect::<Vec<_>>()
    };
    for _ in 0..300 {
        let seen = paths();
        if projects
            .iter()
            .all(|p| seen.iter().any(|s| s.contains(&format!("/projects/{p}/"))))
        {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("upstream saw {:?}, wanted {projects:?}", paths());
}

fn rule(name: &str, project: &str) -> String {
    format!(
        "[[rule]]\nname = \"{name}\"\nsource = \"github\"\nevents = [\"tag\"]\n[rule.trigger]\nproject = \"{project}\"\ntoken = \"env:HOOKRELAY_TEST_TOKEN\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_reloads_on_file_changes_and_sighup_and_keeps_running_rules_on_errors() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let secret = "s3cret-for-the-tests";
    write(dir.path(), "secret", secret);
    write(
        dir.path(),
        "00-base.toml",
        &format!(
            // A relative `file:` is taken from the configuration's folder, not the
            // working directory.
            "[upstream.gitlab]\nurl = \"{}\"\n[source.github]\nprovider = \"github\"\nsecret = \"file:secret\"\n",
            upstream.url(),
        ),
    );
    write(dir.path(), "10-a.toml", &rule("a", "1"));
    let state = dir.path().join("state");
    let mut child = Command::new(BIN);
    child.env("HOOKRELAY_TEST_TOKEN", "glptt-test");
    let mut served = Served::start_with(child, dir.path(), &state);
    let address = served.address();

    assert_eq!(github_tag(&address, secret).await.status, 202);
    upstream_saw(&upstream, &["1"]).await;

    // A new file is picked up.
    write(dir.path(), "20-b.toml", &rule("b", "2"));
    served.wait_for("configuration reloaded");
    let reply = github_tag(&address, secret).await;
    assert_eq!(
        reply.json()["triggers"].as_array().unwrap().len(),
        2,
        "{}",
        reply.text()
    );
    upstream_saw(&upstream, &["1", "2"]).await;

    // A broken file keeps the running rules and logs the problem.
    write(
        dir.path(),
        "30-broken.toml",
        "[[rule]]\nname = \"c\"\nsource = \"nowhere\"\n",
    );
    let line = served.wait_for("configuration not reloaded");
    assert!(line.contains("30-broken.toml:2"), "{line}");
    let metrics = send("GET", &format!("http://{address}/metrics"), &[], "").await;
    assert!(
        metrics
            .text()
            .contains("\nhookrelay_config_last_reload_successful 0\n"),
        "an alert can see the failed reload: {}",
        metrics.text()
    );
    let reply = github_tag(&address, secret).await;
    assert_eq!(
        reply.json()["triggers"].as_array().unwrap().len(),
        2,
        "{}",
        reply.text()
    );

    // A rule needing an environment variable the process lacks: a restart is needed.
    std::fs::remove_file(dir.path().join("30-broken.toml")).unwrap();
    write(
        dir.path(),
        "35-later.toml",
        &rule("later", "3").replace("HOOKRELAY_TEST_TOKEN", "HOOKRELAY_TEST_SET_LATER"),
    );
    let line = served.wait_for("restart hookrelay");
    assert!(
        line.contains("reads its environment only when it starts")
            && line.contains("HOOKRELAY_TEST_SET_LATER"),
        "{line}"
    );
    std::fs::remove_file(dir.path().join("35-later.toml")).unwrap();

    // Fixed, plus a schedule that fires every second; SIGHUP reloads at once.
    write(
        dir.path(),
        "40-nightly.toml",
        "[[rule]]\nname = \"every-second\"\nschedule = \"* * * * * *\"\n[rule.trigger]\nproject = \"77\"\nref = \"main\"\ntoken = \"env:HOOKRELAY_TEST_TOKEN\"\nvariables = { WHY = \"{{ schedule.rule }}\" }\n",
    );
    Command::new("kill")
        .args(["-HUP", &served.child.id().to_string()])
        .status()
        .unwrap();
    served.wait_for("why=\"SIGHUP\"");
    let metrics = send("GET", &format!("http://{address}/metrics"), &[], "").await;
    assert!(
        metrics
            .text()
            .contains("\nhookrelay_config_last_reload_successful 1\n"),
        "{}",
        metrics.text()
    );
    assert!(
        metrics
            .text()
            .contains("\nhookrelay_config_last_reload_success_timestamp_seconds 1"),
        "{}",
        metrics.text()
    );
    upstream_saw(&upstream, &["77"]).await;
    let scheduled = upstream
        .received()
        .into_iter()
        .find(|r| r.path_and_query.contains("/projects/77/"))
        .unwrap();
    assert_eq!(scheduled.json()["variables"]["WHY"], "every-second");
    assert_eq!(scheduled.json()["ref"], "main");

    // A setting only a restart applies is named, and the rest of the file is used.
    write(
        dir.path(),
        "50-server.toml",
        "[server]\nread_timeout = \"20s\"\n",
    );
    let line = served.wait_for("take effect at the next start");
    assert!(line.contains("[server] read_timeout"), "{line}");
    assert!(!line.contains("listen"), "--listen is not a change: {line}");

    let (code, _) = served.terminate();
    assert_eq!(code, Some(0));
}

#[test]
fn the_shipped_examples_pass_check_with_the_variables_of_their_env_example() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules/examples");
    let listed: Vec<(String, String)> = std::fs::read_to_string(examples.join(".env.example"))
        .unwrap()
        .lines()
        .filter(|line| !line.trim_start().starts_with('#') && line.contains('='))
        .map(|line| {
            let (name, value) = line.split_once('=').unwrap();
            (name.trim().to_owned(), value.trim().to_owned())
        })
        .collect();
    // Every variable an example reads (outside comments) is listed.
    for entry in std::fs::read_dir(&examples).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            let code = line.split('#').next().unwrap();
            if let Some(at) = code.find("\"env:") {
                let name: String = code[at + 5..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    listed.iter().any(|(n, _)| *n == name),
                    "{} reads {name}, which .env.example does not list",
                    path.display()
                );
            }
        }
    }
    let mut command = Command::new(BIN);
    command.args(["check", "--config", examples.to_str().unwrap()]);
    command.env_clear().envs(listed);
    let output = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        !stderr.contains("warning"),
        "the examples draw no warning: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_in_the_middle_of_a_backlog_loses_no_acknowledged_webhook() {
    let upstream = RecordingUpstream::start().await;
    *upstream.default_delay.lock().unwrap() = Duration::from_millis(150);
    let dir = tempfile::tempdir().unwrap();
    durable_config(dir.path(), &upstream.url());
    let mut served = serve_in(dir.path());
    let address = served.address();

    // 30 webhooks, all acknowledged; one project and ref, so they are sent one at a time.
    let mut acknowledged = std::collections::BTreeSet::new();
    for _ in 0..30 {
        let reply = github_tag(&address, "s3cret-for-the-tests").await;
        assert_eq!(reply.status, 202, "{}", reply.text());
        acknowledged.insert(reply.json()["delivery"].as_str().unwrap().to_owned());
    }
    // Kill it, hard, while the backlog is being sent.
    for _ in 0..200 {
        if upstream.received().len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Command::new("kill")
        .args(["-KILL", &served.child.id().to_string()])
        .status()
        .unwrap();
    let _ = served.child.wait();
    let before_restart = delivered(&upstream).len();
    assert!(
        before_restart < acknowledged.len(),
        "the backlog was still being sent when killed"
    );

    // Restarted on the same state folder, it sends the rest.
    *upstream.default_delay.lock().unwrap() = Duration::ZERO;
    let mut restarted = serve_in(dir.path());
    let _ = restarted.address();
    for _ in 0..500 {
        if delivered(&upstream) == acknowledged {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        delivered(&upstream),
        acknowledged,
        "every acknowledged delivery reached the upstream"
    );
    // Sent twice: at most the one call in flight at the kill (one project and ref, one
    // call at a time). An outcome committed before the kill survives it: SQLite's log is
    // written before a commit returns, `synchronous = NORMAL` only skips its fsync.
    let mut calls = std::collections::BTreeMap::<String, usize>::new();
    for delivery in upstream.received().iter().filter_map(delivery_of) {
        *calls.entry(delivery).or_default() += 1;
    }
    let twice: Vec<_> = calls.iter().filter(|&(_, &n)| n > 1).collect();
    assert!(twice.len() <= 1, "sent more than once: {twice:?}");
    let (code, _) = restarted.terminate();
    assert_eq!(code, Some(0));

    // The record shows them all sent.
    let output = hookrelay(&[
        "deliveries",
        "--state",
        dir.path().join("state").to_str().unwrap(),
        "--json",
        "--limit",
        "100",
    ]);
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(rows.len(), 30);
    assert!(rows.iter().all(|r| r["state"] == "sent"), "{rows:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_and_replay_work_beside_a_running_relay() {
    let upstream = RecordingUpstream::start().await;
    upstream.answer_next(Answer::new(404, r#"{"message":"404 Not Found"}"#));
    let dir = tempfile::tempdir().unwrap();
    durable_config(dir.path(), &upstream.url());
    let mut served = serve_in(dir.path());
    let address = served.address();
    let state = dir.path().join("state");
    let state = state.to_str().unwrap();
    let reply = github_tag(&address, "s3cret-for-the-tests").await;
    assert_eq!(reply.status, 202);
    let delivery = reply.json()["delivery"].as_str().unwrap().to_owned();
    served.wait_for("trigger failed");

    // The log line comes just before the record is committed; wait (bounded) for it.
    let mut table = String::new();
    for _ in 0..100 {
        let output = hookrelay(&["deliveries", "--state", state, "--failed"]);
        assert!(output.status.success());
        table = String::from_utf8_lossy(&output.stdout).into_owned();
        if table.contains(&delivery) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        table.contains("TIME (UTC)")
            && table.contains(&delivery)
            && table.contains("failed")
            && table.contains(
                "404 Not Found — GitLab answers 404 for a wrong or revoked trigger token"
            )
            && !table.contains("404 404"),
        "{table}"
    );

    // Every trigger that failed for good in a window, once: a second run queues nothing.
    let output = hookrelay(&["replay", "--state", state, "--failed"]);
    assert_eq!(output.status.code(), Some(2), "--failed needs --since");
    let failed_window = |more: &[&str]| {
        hookrelay(
            &[
                &["replay", "--state", state, "--failed", "--since", "1h"],
                more,
            ]
            .concat(),
        )
    };
    // A dry run lists them and queues nothing: the run after it queues the same one.
    let output = failed_window(&["--dry-run"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success()
            && stdout.contains("  trigger 1: rule all -> project acme/app, ref main; 404")
            && stdout
                .contains("1 failed trigger would be queued again; nothing was recorded (dry run)"),
        "{stdout}"
    );
    // For scripts, the same as one JSON object.
    let output = failed_window(&["--dry-run", "--json"]);
    let said: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        said["would_queue"],
        serde_json::json!([{"trigger": 1, "rule": "all", "project": "acme/app", "ref": "main", "last_answer": said["would_queue"][0]["last_answer"]}]),
        "{said}"
    );
    assert!(
        said["would_queue"][0]["last_answer"]
            .as_str()
            .unwrap()
            .starts_with("404"),
        "{said}"
    );
    let output = failed_window(&[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(
        stdout.starts_with("queued again 1 failed trigger: 1 as 2;"),
        "{stdout}"
    );
    let output = failed_window(&[]);
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("nothing queued again"),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    let output = failed_window(&["--json"]);
    let said: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(said["queued"], serde_json::json!([]), "{said}");
    let output = failed_window(&["--project", "other/app"]);
    assert!(String::from_utf8_lossy(&output.stdout).contains("nothing queued again"));

    let output = hookrelay(&[
        "replay",
        "--state",
        state,
        &format!("delivery:{delivery}"),
        "--json",
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let said: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(said["queued"], serde_json::json!([3]), "{said}");
    assert!(
        said["message"].as_str().unwrap().contains("queued again"),
        "{said}"
    );
    served.wait_for("trigger sent");
    let mut table = String::new();
    for _ in 0..100 {
        let output = hookrelay(&["deliveries", "--state", state]);
        table = String::from_utf8_lossy(&output.stdout).into_owned();
        if table.contains("sent (replay of 1)") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(table.contains("sent (replay of 1)"), "{table}");
    assert!(
        table.contains("http://127.0.0.1:3000/test-group/test-project/-/pipelines/257"),
        "{table}"
    );

    // Explained after the fact, from what the store kept; signatures were not kept.
    let config = dir.path().to_str().unwrap();
    let output = Command::new(BIN)
        .args([
            "explain",
            "--config",
            config,
            "--state",
            state,
            "--delivery",
            &delivery,
        ])
        .env("HOOKRELAY_TEST_TOKEN", "glptt-test")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        text.contains("source      github")
            && text.contains("event 1 of 1: tag")
            && text.contains("✓ all"),
        "{text}"
    );
    assert!(text.contains(&format!("delivery    {delivery}")), "{text}");
    let store = store_bytes(&dir.path().join("state")).to_ascii_lowercase();
    assert!(
        !store.contains("x-hub-signature"),
        "signature headers are never stored"
    );
    assert!(store.contains("x-github-delivery"));

    // `--limit 0` would show nothing and say nothing matched: refused instead.
    let output = hookrelay(&["deliveries", "--state", state, "--limit", "0"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("must be at least 1"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // `--json`: the answer as an object, the time also as text.
    let output = hookrelay(&["deliveries", "--state", state, "--json"]);
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout).unwrap();
    let row = rows
        .iter()
        .find(|r| r["delivery_id"] == delivery.as_str())
        .unwrap();
    assert_eq!(row["summary"]["delivery"], delivery.as_str(), "{row:#}");
    assert_eq!(row["summary"]["events"][0]["kind"], "tag", "{row:#}");
    let received = row["received"].as_str().unwrap();
    assert!(
        received.len() == 24 && received.ends_with('Z'),
        "{received}: RFC 3339 in UTC"
    );

    let output = hookrelay(&["replay", "--state", state, "999"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("trigger 999 is not in the store"));

    // Output into a pipe already closed (`deliveries | head` once head has had enough)
    // ends the command as SIGPIPE ends any Unix tool, not with a panic.
    let mut piped = Command::new(BIN)
        .args(["deliveries", "--state", state, "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(piped.stdout.take());
    let output = piped.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    {
        use std::os::unix::process::ExitStatusExt;
        assert!(
            output.status.success() || output.status.signal() == Some(libc::SIGPIPE),
            "{:?}: {stderr}",
            output.status
        );
    }
    let (code, _) = served.terminate();
    assert_eq!(code, Some(0));
}

/// An upstream at `url` and a GitHub source whose secret is in the file `secret`.
fn github_relay(url: &str) -> String {
    format!(
        "[upstream.gitlab]\nurl = \"{url}\"\n[source.github]\nprovider = \"github\"\nsecret = \"file:secret\"\n"
    )
}

/// A rule `releases` for GitHub tags whose names match `refs`, triggering `acme/app` on
/// `main`: the two replan tests fix it by changing `refs`.
fn releases_rule(refs: &str) -> String {
    format!(
        "[[rule]]\nname = \"releases\"\nsource = \"github\"\nevents = [\"tag\"]\nrefs = [\"{refs}\"]\n\
         [rule.trigger]\nproject = \"acme/app\"\nref = \"main\"\ntoken = \"env:HOOKRELAY_TEST_TOKEN\"\n"
    )
}

/// A window of more webhooks than one transaction records (64) is planned again whole,
/// over one store connection, beside a relay that keeps taking webhooks; asking again
/// plans none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_wider_than_one_transaction_is_replanned_whole_and_once() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "secret", "s3cret-for-the-tests");
    write(dir.path(), "00-relay.toml", &github_relay(&upstream.url()));
    write(dir.path(), "10-rule.toml", &releases_rule("release-*"));
    let mut served = serve_in(dir.path());
    let url = format!("http://{}/hooks/github", served.address());
    const SENT: usize = 150;
    for n in 0..SENT {
        let id = format!("w-{n:03}");
        github_webhook(&url, "push", &id, "github/push_tag.json", 200).await;
    }
    write(dir.path(), "10-rule.toml", &releases_rule("simple-*"));
    let replay = |more: &[&str]| {
        let output = replay_in(
            dir.path(),
            &[&["--unmatched", "--since", "1h"], more].concat(),
        );
        assert_eq!(output.status.code(), Some(0));
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    // One of them first, alone, as JSON: the delivery that records it and its trigger.
    let output = replay_in(dir.path(), &["--replan", "w-000", "--json"]);
    assert_eq!(output.status.code(), Some(0));
    let one: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let planned = &one["planned"][0];
    assert!(
        planned["delivery_id"] == "w-000"
            && planned["as"].as_str().unwrap().starts_with("w-000~replan-")
            && planned["triggers"][0]["id"].is_i64()
            && planned["triggers"][0]["project"] == "acme/app"
            && one["left_out"] == serde_json::json!([]),
        "{one}"
    );
    // The relay takes webhooks while the replan writes: neither waits the other out.
    let during = tokio::spawn({
        let url = url.clone();
        async move {
            for n in 0..20 {
                let id = format!("during-{n}");
                github_webhook(&url, "ping", &id, "github/ping.json", 200).await;
            }
        }
    });
    let said = replay(&[]);
    during.await.unwrap();
    let planned: std::collections::BTreeSet<&str> = said
        .lines()
        .filter_map(|line| line.strip_prefix("delivery "))
        .filter_map(|line| line.split_once(" run through the current rules as delivery "))
        .map(|(original, _)| original)
        .collect();
    assert_eq!(planned.len(), SENT - 1, "{said}");
    assert!(
        said.contains(&format!("{} webhooks planned again", SENT - 1))
            && said.contains("left out: w-000: replanned already"),
        "{said}"
    );
    let said = replay(&[]);
    assert_eq!(
        said.matches(": replanned already, as w-").count(),
        20,
        "{said}"
    );
    assert!(
        said.contains(&format!("left out: {} more", SENT - 20))
            && said.contains("nothing planned again"),
        "{said}"
    );
    // As JSON, every one left out is there, not the first 20.
    let said: serde_json::Value = serde_json::from_str(&replay(&["--json"])).unwrap();
    assert_eq!(said["planned"], serde_json::json!([]), "{said}");
    assert_eq!(said["left_out"].as_array().unwrap().len(), SENT, "{said}");
    assert_eq!(said["message"], "nothing planned again", "{said}");
    drop(served);
}

/// Two sources may each send a delivery id (two GitHub organisations' hooks, a generic
/// sender's counter): a window's replan runs each source's own webhook, not the newer one
/// twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_replans_each_sources_own_webhook_when_two_sent_the_same_id() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    two_github_sources(dir.path(), &upstream.url(), "release-*");
    let mut served = serve_in(dir.path());
    send_from_both(&served.address(), "same-1", 200).await;
    drop(served);
    write(dir.path(), "10-rule.toml", &rule_for_both("simple-*"));
    let state = dir.path().join("state");
    let replay = |args: &[&str]| {
        let output = replay_in(dir.path(), &[args, &["--json"]].concat());
        assert_eq!(output.status.code(), Some(0), "{output:?}");
        serde_json::from_slice::<serde_json::Value>(&output.stdout).unwrap()
    };
    // One of them by hand first, named by its source (the older one: the id alone would
    // name the newer).
    let said = replay(&["--replan", "same-1", "--source", "github"]);
    assert_eq!(said["planned"].as_array().unwrap().len(), 1, "{said}");
    let replans_from = || listed_sources(&state, &["--delivery", "same-1~replan-"]);
    assert_eq!(replans_from(), ["github"]);
    // The window plans the other source's, and leaves the one replanned already.
    let said = replay(&["--unmatched", "--since", "1h"]);
    assert_eq!(said["planned"].as_array().unwrap().len(), 1, "{said}");
    assert!(
        said["left_out"][0]
            .as_str()
            .unwrap()
            .starts_with("same-1: replanned already, as same-1~replan-"),
        "{said}"
    );
    // Each replan is recorded under its own source.
    assert_eq!(replans_from(), ["github", "mirror"]);
}

/// Where two sources sent the same delivery id, `replay ID --source NAME` queues again that
/// source's triggers alone; the id alone takes both sources', as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_is_replayed_by_its_source_when_two_sent_the_same_id() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    two_github_sources(dir.path(), &upstream.url(), "simple-*");
    let mut served = serve_in(dir.path());
    send_from_both(&served.address(), "same-2", 202).await;
    upstream.wait_for_calls(2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(served.terminate().0, Some(0));

    let state = dir.path().join("state");
    let queued_sources = || listed_sources(&state, &["--delivery", "same-2", "--status", "queued"]);
    let state = state.to_str().unwrap();
    let output = hookrelay(&[
        "replay", "--state", state, "same-2", "--source", "mirror", "--json",
    ]);
    assert!(output.status.success(), "{output:?}");
    let said: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(said["queued"].as_array().unwrap().len(), 1, "{said}");
    assert!(
        said["message"]
            .as_str()
            .unwrap()
            .starts_with("delivery same-2 from source mirror queued again as trigger"),
        "{said}"
    );
    assert_eq!(queued_sources(), ["mirror"]);
    // A source that sent no such id, and a trigger named with a source, are refused.
    let output = hookrelay(&["replay", "--state", state, "same-2", "--source", "nobody"]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(
        said.contains("no delivery \"same-2\" from source nobody in the store"),
        "{said}"
    );
    let output = hookrelay(&[
        "replay",
        "--state",
        state,
        "trigger:1",
        "--source",
        "mirror",
    ]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    // explain --delivery with --source reads that source's webhook; by the id alone, the
    // newer; with a source that did not send it, the newer through that source's rules.
    let config = dir.path().to_str().unwrap();
    for (source, tag) in [
        (Some("github"), "refs/tags/simple-tag"),
        (Some("mirror"), "refs/tags/simple-mirrored"),
        (None, "refs/tags/simple-mirrored"),
        (Some("other"), "refs/tags/simple-mirrored"),
    ] {
        let mut args = vec![
            "explain",
            "--config",
            config,
            "--state",
            state,
            "--delivery",
            "same-2",
        ];
        args.extend(
            source
                .map(|source| ["--source", source])
                .into_iter()
                .flatten(),
        );
        let output = hookrelay(&args);
        let said = String::from_utf8_lossy(&output.stdout);
        match source {
            Some("other") => {
                assert_eq!(output.status.code(), Some(1), "{output:?}");
                let said = String::from_utf8_lossy(&output.stderr);
                assert!(said.contains("other"), "{said}");
            }
            _ => {
                assert!(output.status.success(), "{source:?}: {output:?}");
                assert!(said.contains(tag), "{source:?}: {said}");
            }
        }
    }
    // By the id alone, both sources' triggers.
    let output = hookrelay(&["replay", "--state", state, "same-2", "--json"]);
    assert!(output.status.success(), "{output:?}");
    let said: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(said["queued"].as_array().unwrap().len(), 2, "{said}");
    assert_eq!(queued_sources(), ["github", "mirror", "mirror"]);
}

/// A relay in `dir` with two GitHub sources, `github` and `mirror`, and the releases rule
/// for tags `refs` on both: how the tests of a delivery id two sources sent set up.
fn two_github_sources(dir: &std::path::Path, upstream: &str, refs: &str) {
    write(dir, "secret", "s3cret-for-the-tests");
    write(
        dir,
        "00-relay.toml",
        &(github_relay(upstream)
            + "[source.mirror]\nprovider = \"github\"\nsecret = \"file:secret\"\n"),
    );
    write(dir, "10-rule.toml", &rule_for_both(refs));
}

/// The releases rule for tags `refs`, for both of [`two_github_sources`].
fn rule_for_both(refs: &str) -> String {
    releases_rule(refs).replace("source = \"github\"", "source = [\"github\", \"mirror\"]")
}

/// GitHub's tag push as delivery `id` from both of [`two_github_sources`], each answered
/// with `status`: `simple-tag` from `github`, and from `mirror` renamed `simple-mirrored`
/// (so that each webhook's explanation tells which it read).
async fn send_from_both(address: &str, id: &str, status: u16) {
    let push = String::from_utf8(common::fixture("github/push_tag.json")).unwrap();
    for (source, push) in [
        ("github", push.clone()),
        ("mirror", push.replace("simple-tag", "simple-mirrored")),
    ] {
        let url = format!("http://{address}/hooks/{source}");
        github_webhook_body(&url, "push", id, push.into_bytes(), status).await;
    }
}

/// The source of each row `hookrelay deliveries ARGS` lists from `state`, sorted.
fn listed_sources(state: &std::path::Path, args: &[&str]) -> Vec<String> {
    let state = state.to_str().unwrap();
    let listed = hookrelay(&[&["deliveries", "--state", state, "--json"], args].concat());
    let rows: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let mut sources: Vec<String> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["source"].as_str().unwrap().to_owned())
        .collect();
    sources.sort_unstable();
    sources
}

/// GitHub's fixture `file` as a webhook of `event` and delivery `id`, signed with the
/// tests' secret and sent to `url`; its answer, whose status must be `status`.
async fn github_webhook(
    url: &str,
    event: &str,
    id: &str,
    file: &str,
    status: u16,
) -> common::Reply {
    github_webhook_body(url, event, id, common::fixture(file), status).await
}

/// [`github_webhook`] with a body of the test's own making.
async fn github_webhook_body(
    url: &str,
    event: &str,
    id: &str,
    body: Vec<u8>,
    status: u16,
) -> common::Reply {
    let reply = common::signed_github_body(url, "s3cret-for-the-tests", event, id, body).await;
    assert_eq!(reply.status, status, "{id}: {}", reply.text());
    reply
}

/// `hookrelay replay ARGS` on the configuration folder `dir` and the state folder in it,
/// with the token its rules name in the environment: how the replan tests run it.
fn replay_in(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("replay")
        .args(args)
        .arg("--config")
        .arg(dir)
        .arg("--state")
        .arg(dir.join("state"))
        .env("HOOKRELAY_TEST_TOKEN", "glptt-x")
        .output()
        .unwrap()
}

/// A webhook whose URL chose its ref (`?ref=stable`) keeps that choice: its answer and
/// record say `url_ref`, `explain --delivery` and `replay --replan` build that ref again
/// (before, a replan built the event's own ref), and a replan is refused, saying why, once
/// the source no longer lets a URL choose it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replan_builds_the_ref_the_webhook_url_chose() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "secret", "s3cret-for-the-tests");
    let relay = |url_refs: &str| {
        format!(
            "[upstream.gitlab]\nurl = \"{}\"\n[source.github]\nprovider = \"github\"\nsecret = \"file:secret\"\nurl_refs = [\"{url_refs}\"]\n",
            upstream.url()
        )
    };
    write(dir.path(), "00-relay.toml", &relay("stable"));
    write(dir.path(), "10-rule.toml", &releases_rule("release-*"));
    let mut served = serve_in(dir.path());
    let address = served.address();
    let reply = github_webhook(
        &format!("http://{address}/hooks/github?ref=stable"),
        "push",
        "url-ref-1",
        "github/push_tag.json",
        200,
    )
    .await;
    assert_eq!(reply.json()["url_ref"], "stable", "{}", reply.text());
    let code = served.terminate().0;
    assert_eq!(code, Some(0));

    let state = dir.path().join("state");
    let (state, config) = (state.to_str().unwrap(), dir.path().to_str().unwrap());
    write(dir.path(), "10-rule.toml", &releases_rule("simple-*"));
    let run = |args: &[&str]| {
        let output = Command::new(BIN)
            .args(args)
            .env("HOOKRELAY_TEST_TOKEN", "glptt-x")
            .output()
            .unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status.code(), said)
    };
    let explain = [
        "explain",
        "--config",
        config,
        "--state",
        state,
        "--delivery",
        "url-ref-1",
    ];
    let (code, said) = run(&explain);
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains("ref       stable  (from ?ref="), "{said}");
    let replan = [
        "replay",
        "--replan",
        "--config",
        config,
        "--state",
        state,
        "url-ref-1",
    ];
    let (code, said) = run(&replan);
    assert_eq!(code, Some(0), "{said}");
    assert!(
        said.contains("rule releases -> project acme/app, ref stable"),
        "{said}"
    );

    write(dir.path(), "00-relay.toml", &relay("release"));
    let (code, said) = run(&replan);
    assert_eq!(code, Some(1), "{said}");
    assert!(
        said.contains("delivery url-ref-1 arrived with ?ref=stable") && said.contains("url_refs"),
        "{said}"
    );
}

/// The operator's path when nothing ran: the answer and `deliveries` say why, the rule is
/// fixed, `replay --replan` runs the stored webhook through it, and a trigger retrying
/// against a 429 is cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn why_nothing_ran_then_replan_then_cancel() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "secret", "s3cret-for-the-tests");
    write(dir.path(), "00-relay.toml", &github_relay(&upstream.url()));
    write(dir.path(), "10-rule.toml", &releases_rule("release-*"));
    let mut served = serve_in(dir.path());
    let address = served.address();
    let url = format!("http://{address}/hooks/github");
    let state = dir.path().join("state");
    let state = state.to_str().unwrap();
    let config = dir.path().to_str().unwrap();

    // Nothing matched: the answer lists the rule with its reason, and so does the log.
    let reply = github_webhook(&url, "push", "8f3e2a10-first", "github/push_tag.json", 200).await;
    let answer = reply.json();
    assert!(
        answer["note"]
            .as_str()
            .unwrap()
            .starts_with("no rule matched"),
        "{answer}"
    );
    let reason = answer["events"][0]["rules"][0].clone();
    assert_eq!(reason["rule"], "releases");
    assert!(
        reason["reason"].as_str().unwrap().starts_with("refs: ")
            && reason["reason"]
                .as_str()
                .unwrap()
                .contains("matches none of [\"release-*\"]"),
        "{reason}"
    );
    let line = served.wait_for("matched no rule");
    assert!(line.contains("releases: refs:"), "{line}");
    github_webhook(&url, "ping", "8f3e2a10-ping", "github/ping.json", 200).await;
    // The sender redelivers: acknowledged, nothing queued, and recorded as a duplicate.
    let again = github_webhook(&url, "push", "8f3e2a10-first", "github/push_tag.json", 200).await;
    assert_eq!(again.json()["duplicate"], true);

    // `deliveries` says which is which, with full ids, and filters.
    let table = |args: &[&str]| {
        let mut all = vec!["deliveries", "--state", state];
        all.extend_from_slice(args);
        let output = hookrelay(&all);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let shown = table(&["--status", "none"]);
    let unmatched = shown
        .lines()
        .find(|l| l.split_whitespace().nth(3) == Some("8f3e2a10-first"))
        .unwrap_or_else(|| panic!("{shown}"));
    assert!(
        unmatched.contains("no match") && unmatched.contains("releases: refs:"),
        "{unmatched:?} in {shown}"
    );
    let ping = shown
        .lines()
        .find(|l| l.contains("8f3e2a10-ping"))
        .unwrap_or_else(|| panic!("{shown}"));
    assert!(ping.contains(" ping "), "{shown}");
    let mut duplicates = String::new();
    for _ in 0..100 {
        duplicates = table(&["--status", "duplicate"]);
        if duplicates.contains("8f3e2a10-first~duplicate-") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        duplicates.contains(" duplicate ")
            && duplicates.contains("delivery 8f3e2a10-first was received before"),
        "{duplicates}"
    );
    assert!(table(&["--kind", "gateway"]).contains("no deliveries match"));
    assert!(table(&["--source", "github", "--delivery", "8f3e2a10-f"]).contains("8f3e2a10-first"));
    assert!(!table(&["--since", "1h", "--delivery", "8f3e2a10-f"]).contains("no deliveries match"));
    assert!(
        table(&["--until", "2000-01-01", "--delivery", "8f3e2a10-f"])
            .contains("no deliveries match")
    );

    // The rule fixed; the stored webhook replanned by a unique start of its id. GitLab
    // answers 429 for an hour, so the new trigger waits to be retried.
    write(dir.path(), "10-rule.toml", &releases_rule("simple-*"));
    upstream.answer_next(
        Answer::new(429, r#"{"message":"429 Too Many Requests"}"#).header("retry-after", "3600"),
    );
    let replan = |id: &str| {
        Command::new(BIN)
            .args([
                "replay", "--replan", "--config", config, "--state", state, id,
            ])
            .output()
            .unwrap()
    };
    let output = replan("8f3e2a10");
    assert_eq!(output.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&output.stderr)
            .contains("\"8f3e2a10\" is the start of 3 delivery ids"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let output = replan("8f3e2a10-f");
    let said = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(said.contains("delivery 8f3e2a10-first run through the current rules as delivery 8f3e2a10-first~replan-"), "{said}");
    assert!(
        said.contains("rule releases -> project acme/app, ref main"),
        "{said}"
    );
    // Its record's answer names the webhook it ran again, and what it queued.
    {
        use hookrelay::store::Engine;
        let mut engine =
            hookrelay::store::sqlite::SqliteEngine::open_existing(std::path::Path::new(state))
                .unwrap();
        let rows = engine
            .list(&hookrelay::store::ListFilter {
                delivery: Some("8f3e2a10-first~replan-".into()),
                limit: 5,
                ..Default::default()
            })
            .unwrap();
        let summary: serde_json::Value = serde_json::from_str(&rows[0].summary).unwrap();
        assert_eq!(summary["replan_of"], "8f3e2a10-first", "{summary}");
        assert_eq!(summary["triggers"][0]["rule"], "releases", "{summary}");
        // `deliveries --trigger ID` finds that trigger's delivery.
        let trigger = rows[0].trigger_id.expect("the replan queued a trigger");
        let found = table(&["--trigger", &trigger.to_string()]);
        assert!(found.contains("8f3e2a10-first~replan-"), "{found}");
        assert_eq!(
            found.lines().count(),
            2,
            "a heading and the one row: {found}"
        );
        assert!(table(&["--trigger", "999999"]).contains("no deliveries match"));
    }
    served.wait_for("trigger will be retried");
    let mut retrying = String::new();
    for _ in 0..100 {
        retrying = table(&["--status", "retrying"]);
        if retrying.contains("~replan-") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let row = retrying
        .lines()
        .find(|l| l.contains("~replan-"))
        .unwrap_or_else(|| panic!("{retrying}"));
    assert!(
        row.contains("retrying")
            && (row.contains("in 60m") || row.contains("in 59m"))
            && row.contains("429"),
        "{row}"
    );
    let trigger: String = row.split_whitespace().nth(4).unwrap().to_owned();
    assert!(trigger.parse::<i64>().is_ok(), "{row}");

    // Cancelled by id: recorded, and said once more if asked again. For scripts, as JSON.
    let output = hookrelay(&["cancel", "--state", state, &trigger, "--json"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let said: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(
        said["message"]
            .as_str()
            .unwrap()
            .contains(&format!("cancelled trigger {trigger}"))
            && said["cancelled"] == serde_json::json!([trigger.parse::<i64>().unwrap()]),
        "{said}"
    );
    let cancelled = table(&["--status", "cancelled"]);
    assert!(
        cancelled.contains("cancelled by an operator"),
        "{cancelled}"
    );
    let output = hookrelay(&["cancel", "--state", state, &trigger]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("is cancelled, not waiting"));
    let output = hookrelay(&["cancel", "--state", state, "--project", "acme/app"]);
    assert!(String::from_utf8_lossy(&output.stdout).contains("nothing to cancel"));
    let output = hookrelay(&[
        "cancel",
        "--state",
        state,
        "--project",
        "acme/app",
        "--json",
    ]);
    let said: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(said["cancelled"], serde_json::json!([]), "{said}");
    assert_eq!(
        upstream.received().len(),
        1,
        "the cancelled trigger was never sent again"
    );
    let (code, _) = served.terminate();
    assert_eq!(code, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_bounded_and_returns_unfinished_sends_to_the_outbox() {
    let upstream = RecordingUpstream::start().await;
    *upstream.default_delay.lock().unwrap() = Duration::from_secs(30);
    let dir = tempfile::tempdir().unwrap();
    durable_config(dir.path(), &upstream.url());
    write(
        dir.path(),
        "server.toml",
        "[server]\nshutdown_timeout = \"500ms\"\n",
    );
    let mut served = serve_in(dir.path());
    let address = served.address();
    assert_eq!(
        github_tag(&address, "s3cret-for-the-tests").await.status,
        202
    );
    for _ in 0..200 {
        if !upstream.received().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = std::time::Instant::now();
    let (code, lines) = served.terminate();
    assert_eq!(code, Some(0), "{lines:#?}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "shutdown took {:?}",
        started.elapsed()
    );
    assert!(
        lines.iter().any(|l| l.contains("returned to the outbox")),
        "{lines:#?}"
    );
    let output = hookrelay(&[
        "deliveries",
        "--state",
        dir.path().join("state").to_str().unwrap(),
        "--json",
    ]);
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        rows[0]["state"], "queued",
        "due again at the next start: {rows:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_delivery_source_rule_and_project() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    durable_config(dir.path(), &upstream.url());
    let mut command = Command::new(BIN);
    command
        .env("HOOKRELAY_TEST_TOKEN", "glptt-test")
        .env("HOOKRELAY_LOG_FORMAT", "json");
    let mut served = Served::start_with(command, dir.path(), &dir.path().join("state"));
    let address = served.address();
    let reply = github_tag(&address, "s3cret-for-the-tests").await;
    assert_eq!(reply.status, 202);
    let delivery = reply.json()["delivery"].as_str().unwrap().to_owned();
    served.wait_for("trigger sent");
    // A refused request says why; a scrape shows the build and the process.
    let refused = post(&format!("http://{address}/hooks/nowhere"), &[], "{}").await;
    assert_eq!(refused.status, 404);
    let metrics = send("GET", &format!("http://{address}/metrics"), &[], "")
        .await
        .text();
    for name in [
        "hookrelay_build_info{version=",
        "hookrelay_process_resident_memory_bytes ",
        "hookrelay_process_open_fds ",
        "hookrelay_process_cpu_seconds_total ",
    ] {
        assert!(metrics.contains(name), "{name} in\n{metrics}");
    }
    let (_, lines) = served.terminate();
    let entries: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).expect("every line is JSON"))
        .collect();
    for message in ["trigger queued", "trigger sent"] {
        let entry = entries
            .iter()
            .find(|e| e["message"] == message)
            .unwrap_or_else(|| panic!("no {message:?} line"));
        assert_eq!(entry["delivery"], delivery.as_str(), "{entry}");
        assert_eq!(entry["source"], "github", "{entry}");
        assert_eq!(entry["rule"], "all", "{entry}");
        assert_eq!(entry["project"], "acme/app", "{entry}");
    }
    assert!(
        !lines.join("\n").contains("glptt-test"),
        "no token in the logs"
    );
    let request = entries
        .iter()
        .find(|e| e["message"] == "request" && e["path"] == "/hooks/github")
        .expect("a request line");
    assert!(
        request["elapsed_ms"].is_f64(),
        "numbers stay numbers: {request}"
    );
    let refused = entries
        .iter()
        .find(|e| e["message"] == "request refused")
        .expect("a refused-request line");
    assert_eq!(refused["status"], 404);
    assert!(
        refused["reason"]
            .as_str()
            .unwrap()
            .starts_with("no source named \"nowhere\""),
        "{refused}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminal_escape_codes_from_payloads_are_shown_never_obeyed() {
    let dir = tempfile::tempdir().unwrap();
    let mut payload: serde_json::Value =
        serde_json::from_slice(&fixture("github/push_tag.json")).unwrap();
    payload["repository"]["full_name"] = "Codertocat/\u{1b}[31mRED\u{1b}]0;pwned\u{7}".into();
    let body = serde_json::to_vec(&payload).unwrap();
    let file = dir.path().join("hostile.json");
    std::fs::write(&file, &body).unwrap();
    write(dir.path(), "rules.toml", RULES);
    let output = hookrelay(&[
        "explain",
        "--config",
        dir.path().to_str().unwrap(),
        "--source",
        "github",
        "--event",
        "push",
        file.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        !text.contains('\u{1b}') && !text.contains('\u{7}'),
        "{text}"
    );
    assert!(text.contains("Codertocat/\\u{1b}[31mRED"), "{text}");

    // The running relay's text log shows it escaped too.
    let upstream = RecordingUpstream::start().await;
    let state_dir = tempfile::tempdir().unwrap();
    durable_config(state_dir.path(), &upstream.url());
    let mut served = serve_in(state_dir.path());
    let address = served.address();
    github_webhook_body(
        &format!("http://{address}/hooks/github"),
        "push",
        "hostile-1",
        body,
        202,
    )
    .await;
    let line = served.wait_for("webhook event");
    assert!(!line.contains('\u{1b}'), "{line}");
    assert!(line.contains("\\u{1b}[31mRED"), "{line}");
    let (code, lines) = served.terminate();
    assert_eq!(code, Some(0));
    assert!(lines.iter().all(|l| !l.contains('\u{1b}')));
}

/// `hookrelay backup` copies the store beside the running relay into a new private file
/// that is a whole store by itself: put in an empty state folder, it lists what the relay
/// had. It never overwrites a file, and a PostgreSQL store is sent to pg_dump.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_copies_the_store_beside_a_running_relay() {
    use std::os::unix::fs::PermissionsExt;
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    durable_config(dir.path(), &upstream.url());
    let mut served = serve_in(dir.path());
    let address = served.address();
    let state = dir.path().join("state");
    let reply = github_tag(&address, "s3cret-for-the-tests").await;
    assert_eq!(reply.status, 202);
    let delivery = reply.json()["delivery"].as_str().unwrap().to_owned();

    let copy = dir.path().join("copy.sqlite3");
    let args = [
        "backup",
        "--state",
        state.to_str().unwrap(),
        copy.to_str().unwrap(),
    ];
    let output = hookrelay(&args);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("copied to"));
    let mode = std::fs::metadata(&copy).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "it holds every webhook body");
    let again = hookrelay(&args);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists already"));

    let restored = dir.path().join("restored");
    std::fs::create_dir(&restored).unwrap();
    std::fs::copy(&copy, restored.join("hookrelay.sqlite3")).unwrap();
    let output = hookrelay(&["deliveries", "--state", restored.to_str().unwrap()]);
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && table.contains(&delivery),
        "{table}"
    );

    let output = Command::new(BIN)
        .args(["backup", dir.path().join("pg.sqlite3").to_str().unwrap()])
        .env("HOOKRELAY_STORE_URL", "postgres://hr@127.0.0.1:1/hr")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("pg_dump"));
    let (code, _) = served.terminate();
    assert_eq!(code, Some(0));
}

/// The times a scheduled rule's calls were for (`AT`), in the order they came.
fn scheduled_times(upstream: &RecordingUpstream) -> Vec<String> {
    upstream
        .received()
        .iter()
        .filter_map(|call| call.json()["variables"]["AT"].as_str().map(str::to_owned))
        .collect()
}

/// A relay down over a scheduled time fires it once, late, when it starts again (a
/// nightly build is not lost to a reboot); a time fired before it stopped is not fired
/// again, and neither is one from before the store last saw it running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_starting_fires_a_scheduled_time_it_missed_once_late() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "a.toml",
        &format!(
            "[upstream.gitlab]\nurl = \"{}\"\n\
             [[rule]]\nname = \"every-four\"\nschedule = \"*/4 * * * * *\"\n[rule.trigger]\nproject = \"77\"\nref = \"main\"\n\
             token = \"env:HOOKRELAY_TEST_TOKEN\"\nvariables = {{ AT = \"{{{{ schedule.time }}}}\" }}\n",
            upstream.url()
        ),
    );
    let state = dir.path().join("state");
    let start = || {
        let mut command = Command::new(BIN);
        command.env("HOOKRELAY_TEST_TOKEN", "glptt-test");
        let mut served = Served::start_with(command, dir.path(), &state);
        served.address();
        served
    };
    let mut relay = start();
    // Running long enough to fire once, and for the store to note that it ran.
    for _ in 0..120 {
        if !scheduled_times(&upstream).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(scheduled_times(&upstream).len(), 1);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    relay.child.kill().unwrap();
    relay.child.wait().unwrap();
    let killed_at = chrono::Utc::now();
    // Down over at least one time (every 4 s).
    tokio::time::sleep(Duration::from_millis(5000)).await;
    let restarted_at = chrono::Utc::now();
    let relay = start();
    let late = loop {
        let times = scheduled_times(&upstream);
        if times.len() >= 2 {
            break times[1].clone();
        }
        assert!(
            chrono::Utc::now() - restarted_at < chrono::TimeDelta::seconds(3),
            "nothing fired late: {times:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let late_at = chrono::DateTime::parse_from_rfc3339(&late)
        .unwrap()
        .with_timezone(&chrono::Utc);
    assert!(
        late_at > killed_at && late_at <= restarted_at,
        "{late} is not a time missed between {killed_at} and {restarted_at}"
    );
    // Fired as the relay started, not at its next time.
    assert!(
        restarted_at - late_at < chrono::TimeDelta::seconds(4),
        "the latest missed time only: {late}"
    );
    let (_, lines) = relay.terminate();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("schedule missed while no relay ran: fired late, once")),
        "{lines:#?}"
    );
    // Started again at once: nothing was missed, so nothing fires late, and no time fires
    // twice.
    let before = scheduled_times(&upstream);
    let relay = start();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (_, lines) = relay.terminate();
    let after = scheduled_times(&upstream);
    assert!(
        !lines.iter().any(|l| l.contains("fired late")),
        "{lines:#?}"
    );
    let mut unique = after.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), after.len(), "a time fired twice: {after:?}");
    assert!(after.len() <= before.len() + 1, "{before:?} → {after:?}");
}

/// After a rule's project is fixed, `replay --failed --replan` runs every webhook whose
/// triggers failed for good through the fixed rules, once; a webhook with a trigger that
/// was sent meanwhile is left out, saying why (it would start that pipeline again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_failed_replan_runs_the_failed_webhooks_through_the_fixed_rules_once() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "secret", "s3cret-for-the-tests");
    write(dir.path(), "00-relay.toml", &github_relay(&upstream.url()));
    let rule = |project: &str| {
        releases_rule("simple-*").replace(
            "project = \"acme/app\"",
            &format!("project = \"{project}\""),
        )
    };
    write(dir.path(), "10-rule.toml", &rule("acme/wrong"));
    let not_found = || Answer::new(404, r#"{"message":"404 Project Not Found"}"#);
    upstream.answer_next(not_found());
    upstream.answer_next(not_found());
    let mut served = serve_in(dir.path());
    let address = served.address();
    let state = dir.path().join("state");
    let state = state.to_str().unwrap();
    let failed = |n: usize| {
        let output = hookrelay(&[
            "deliveries",
            "--state",
            state,
            "--status",
            "failed",
            "--json",
        ]);
        let rows: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        rows.as_array().unwrap().len() >= n
    };
    for (n, id) in [(1, "w-1"), (2, "w-2")] {
        let url = format!("http://{address}/hooks/github");
        github_webhook(&url, "push", id, "github/push_tag.json", 202).await;
        for _ in 0..100 {
            if failed(n) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(failed(n), "{id} failed for good");
    }
    // w-2's trigger is sent again by hand, and GitLab takes it this time.
    let output = hookrelay(&["replay", "--state", state, "delivery:w-2"]);
    assert!(output.status.success(), "{output:?}");
    upstream.wait_for_calls(3).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(served.terminate().0, Some(0));

    write(dir.path(), "10-rule.toml", &rule("acme/app"));
    let replan = || {
        let output = replay_in(dir.path(), &["--failed", "--replan", "--since", "1h"]);
        assert!(output.status.success(), "{output:?}");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let said = replan();
    assert!(
        said.contains("delivery w-1 run through the current rules as delivery w-1~replan-")
            && said.contains("rule releases -> project acme/app, ref main")
            && said.contains("left out: w-2: trigger")
            && said.contains("is sent (replanning would start it again")
            && said.contains("1 webhook planned again"),
        "{said}"
    );
    let said = replan();
    assert!(
        said.contains("left out: w-1: replanned already") && said.contains("nothing planned again"),
        "{said}"
    );
    // The relay sends the replan to the fixed project, where it fails for good too.
    upstream.answer_next(not_found());
    let served = serve_in(dir.path());
    upstream.wait_for_calls(4).await;
    let received = upstream.received();
    assert!(
        received[3]
            .path_and_query
            .starts_with("/api/v4/projects/acme%2Fapp/trigger/pipeline"),
        "{}",
        received[3].path_and_query
    );
    assert_eq!(served.terminate().0, Some(0));
    assert!(failed(3), "the replan failed for good");

    // Fixed again: the failed replan is planned again itself, once; its webhook is not.
    write(dir.path(), "10-rule.toml", &rule("acme/app2"));
    let said = replan();
    assert!(
        said.contains("left out: w-1: replanned already")
            && said.contains("run through the current rules as delivery w-1~replan-")
            && said.matches("~replan-").count() >= 3
            && said.contains("rule releases -> project acme/app2, ref main")
            && said.contains("1 webhook planned again"),
        "{said}"
    );
    let said = replan();
    assert!(
        said.matches(": replanned already, as w-1~replan-").count() == 2
            && said.contains("nothing planned again"),
        "{said}"
    );
}

/// After a rule is added or fixed, `replay --unmatched --since` runs every webhook of the
/// window that matched no rule through the rules as they are now, beside the running
/// relay, which sends what it plans. A webhook that still matches nothing is left out with
/// its reason and nothing is recorded for it; a ping is not a candidate at all; a second
/// run plans nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_unmatched_runs_the_webhooks_that_matched_nothing_through_the_new_rules_once() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "secret", "s3cret-for-the-tests");
    write(dir.path(), "00-relay.toml", &github_relay(&upstream.url()));
    write(dir.path(), "10-rule.toml", &releases_rule("release-*"));
    let mut served = serve_in(dir.path());
    let address = served.address();
    let url = format!("http://{address}/hooks/github");
    for (event, id, file) in [
        ("push", "u-tag", "github/push_tag.json"),
        ("push", "u-branch", "github/push_branch.json"),
        ("ping", "u-ping", "github/ping.json"),
    ] {
        github_webhook(&url, event, id, file, 200).await;
    }
    let state = dir.path().join("state");
    let (state, config) = (state.to_str().unwrap(), dir.path().to_str().unwrap());
    let replay = |args: &[&str]| {
        let output = replay_in(dir.path(), args);
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    // Before the fix: both still match nothing, and each says why.
    let (code, said, _) = replay(&["--unmatched", "--since", "1h"]);
    assert_eq!(code, Some(0));
    assert!(
        said.contains("left out: delivery u-branch still starts nothing")
            && said.contains("left out: delivery u-tag still starts nothing")
            && said.contains("matches none of")
            && !said.contains("u-ping")
            && said.contains("nothing planned again"),
        "{said}"
    );
    // deliveries lists them, and says what runs them again.
    let listed = hookrelay(&["deliveries", "--state", state, "--status", "none"]);
    let (table, hint) = (
        String::from_utf8_lossy(&listed.stdout),
        String::from_utf8_lossy(&listed.stderr),
    );
    assert!(
        table.contains("u-tag") && table.contains("no match") && table.contains("u-ping"),
        "{table}"
    );
    assert!(
        hint.contains("hookrelay replay --unmatched --since"),
        "{hint}"
    );
    // explain says why, and what runs the webhook again once the rule is fixed.
    let explained = Command::new(BIN)
        .args([
            "explain",
            "--config",
            config,
            "--state",
            state,
            "--delivery",
            "u-tag",
        ])
        .env("HOOKRELAY_TEST_TOKEN", "glptt-x")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&explained.stdout);
    assert!(
        text.contains("matches none of")
            && text.contains("to run it through these rules: hookrelay replay --replan u-tag")
            && text.contains("hookrelay replay --unmatched --since 2h"),
        "{text}"
    );
    // The rule is fixed to take the tag that was pushed. A dry run says what it would
    // start, and records nothing: the run after it plans the webhook still.
    write(dir.path(), "10-rule.toml", &releases_rule("simple-*"));
    let (code, said, _) = replay(&["--unmatched", "--since", "1h", "--dry-run"]);
    assert_eq!(code, Some(0));
    assert!(
        said.contains("delivery u-tag would run through the current rules:")
            && said.contains("  a trigger: rule releases -> project acme/app, ref main")
            && said.contains("1 webhook would be planned again; nothing was recorded (dry run)"),
        "{said}"
    );
    let (code, said, _) = replay(&["--unmatched", "--since", "1h", "--dry-run", "--json"]);
    assert_eq!(code, Some(0));
    let said: serde_json::Value = serde_json::from_str(&said).unwrap();
    assert_eq!(
        said["would_plan"],
        serde_json::json!([{"delivery_id": "u-tag", "triggers": [{"rule": "releases", "project": "acme/app", "ref": "main"}]}]),
        "{said}"
    );
    assert!(
        said["left_out"][0]
            .as_str()
            .unwrap()
            .starts_with("delivery u-branch still starts nothing"),
        "{said}"
    );
    let (code, said, _) = replay(&["--unmatched", "--since", "1h", "--source", "github"]);
    assert_eq!(code, Some(0));
    assert!(
        said.contains("delivery u-tag run through the current rules as delivery u-tag~replan-")
            && said.contains("rule releases -> project acme/app, ref main")
            && said.contains("left out: delivery u-branch still starts nothing")
            && !said.contains("u-ping")
            && said.contains("1 webhook planned again"),
        "{said}"
    );
    let (code, said, _) = replay(&["--unmatched", "--since", "1h"]);
    assert_eq!(code, Some(0));
    assert!(
        said.contains("left out: u-tag: replanned already, as u-tag~replan-")
            && said.contains("nothing planned again"),
        "{said}"
    );
    // The running relay sends the one replan, to the rule's project.
    for _ in 0..100 {
        if !upstream.received().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let received = upstream.received();
    assert_eq!(received.len(), 1, "one pipeline, once");
    assert!(
        received[0]
            .path_and_query
            .starts_with("/api/v4/projects/acme%2Fapp/trigger/pipeline"),
        "{}",
        received[0].path_and_query
    );
    // The window's flags say what they go with.
    let (code, _, said) = replay(&["--unmatched", "--since", "1h", "--project", "acme/app"]);
    assert_eq!(code, Some(2), "{said}");
    let (code, _, said) = replay(&["--since", "1h", "u-tag"]);
    assert_eq!(code, Some(2));
    assert!(
        said.contains("--since goes with --failed, --unmatched or --replan --rule"),
        "{said}"
    );
    // With a delivery id, --source names its sender; this webhook queued nothing.
    let (code, _, said) = replay(&["--source", "github", "u-tag"]);
    assert_eq!(code, Some(1), "{said}");
    assert!(
        said.contains("delivery \"u-tag\" from source github queued no trigger to replay"),
        "{said}"
    );
    let (code, _, said) = replay(&["--dry-run", "u-tag"]);
    assert_eq!(code, Some(2));
    assert!(
        said.contains("--dry-run goes with --replan, --unmatched or --failed"),
        "{said}"
    );
    // A single webhook's replan can be looked at first too.
    let (code, said, _) = replay(&["--replan", "--dry-run", "u-tag"]);
    assert_eq!(code, Some(0));
    assert!(
        said.contains("delivery u-tag would run through the current rules:")
            && said.contains("nothing was recorded (dry run)"),
        "{said}"
    );

    // A rule added later backfills the window through itself alone: the tag push gets a
    // docs build without its release build again, the branch push gets one too, and a
    // second run starts nothing twice.
    write(
        dir.path(),
        "20-docs.toml",
        "[[rule]]\nname = \"docs\"\nsource = \"github\"\n[rule.trigger]\nproject = \"acme/docs\"\nref = \"main\"\ntoken = \"env:HOOKRELAY_TEST_TOKEN\"\n",
    );
    let (code, _, said) = replay(&["--replan", "--rule", "nope", "--since", "1h"]);
    assert_eq!(code, Some(2));
    assert!(said.contains("has no rule named \"nope\""), "{said}");
    let (code, said, _) = replay(&["--replan", "--rule", "docs", "--since", "1h"]);
    assert_eq!(code, Some(0));
    assert!(
        said.contains(
            "delivery u-branch run through the current rules as delivery u-branch~replan-"
        ) && said
            .contains("delivery u-tag run through the current rules as delivery u-tag~replan-")
            && said.contains("rule docs -> project acme/docs, ref main")
            && !said.contains("rule releases")
            && !said.contains("u-ping")
            && said.contains("2 webhooks planned again"),
        "{said}"
    );
    let (code, said, _) = replay(&["--replan", "--rule", "docs", "--since", "1h"]);
    assert_eq!(code, Some(0));
    assert!(
        said.contains("left out: u-tag: has trigger")
            && said.contains("of rule docs already")
            && said.contains("nothing planned again"),
        "{said}"
    );
    upstream.wait_for_calls(3).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let received = upstream.received();
    assert_eq!(
        received.len(),
        3,
        "two docs builds, and no release build again"
    );
    assert!(received[1..].iter().all(|call| {
        call.path_and_query
            .starts_with("/api/v4/projects/acme%2Fdocs/trigger/pipeline")
    }));
    assert_eq!(served.terminate().0, Some(0));
}

/// `explain --ask-forge` asks the source's forge about a push whose webhook does not list
/// every file, as the relay would, and the rules read its answer: a way to try a
/// `compare` token before pushes depend on it. Without the flag explain asks nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_asks_the_forge_only_when_told_to() {
    let forge = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "secret", "0123456789abcdef0123");
    write(dir.path(), "read-token", "glpat-read-0123456789abcdef");
    write(
        dir.path(),
        "relay.toml",
        &format!(
            "[upstream.gitlab]\nurl = \"http://127.0.0.1:9\"\n\
             [source.gitlab]\nprovider = \"gitlab\"\nsecret = \"file:{0}/secret\"\n\
             compare = {{ token = \"file:{0}/read-token\", api_url = \"{1}\" }}\n\
             [[rule]]\nname = \"api\"\nsource = \"gitlab\"\nevents = [\"push\"]\npaths = [\"services/api/**\"]\n\
             [rule.trigger]\nproject = \"acme/api\"\ntoken = \"file:{0}/secret\"\n",
            dir.path().display(),
            forge.url()
        ),
    );
    let payload = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gitlab/push.json");
    let explain = |ask: bool| {
        let mut args = vec![
            "explain".to_owned(),
            "--config".to_owned(),
            dir.path().display().to_string(),
            "--source".to_owned(),
            "gitlab".to_owned(),
            "--event".to_owned(),
            "Push Hook".to_owned(),
        ];
        if ask {
            args.push("--ask-forge".to_owned());
        }
        args.push(payload.display().to_string());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        hookrelay(&args)
    };

    let offline = explain(false);
    let text = String::from_utf8_lossy(&offline.stdout);
    assert!(offline.status.success(), "{offline:?}");
    assert!(
        text.contains("the relay asks") && text.contains("(explain does not ask)"),
        "{text}"
    );
    assert!(
        text.contains("✓ api"),
        "not known: the filter lets it by\n{text}"
    );
    assert!(forge.received().is_empty());

    forge.answer_next(Answer::new(
        200,
        r#"{"diffs": [{"old_path": "docs/a.md", "new_path": "docs/a.md"}], "compare_timeout": false}"#,
    ));
    let asked = tokio::task::block_in_place(|| explain(true));
    let text = String::from_utf8_lossy(&asked.stdout);
    assert!(asked.status.success(), "{asked:?}");
    assert!(
        text.contains("changed files   1 (as the forge listed them)") && text.contains("docs/a.md"),
        "{text}"
    );
    assert!(
        text.contains("✗ api") && text.contains("paths: none of the 1 changed file (docs/a.md)"),
        "{text}"
    );
    let call = forge.only();
    assert_eq!(
        call.header("authorization"),
        Some("Bearer glpat-read-0123456789abcdef")
    );
    assert!(!text.contains("glpat-read-0123456789abcdef"), "{text}");
}
