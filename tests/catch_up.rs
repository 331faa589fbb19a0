//! `hookrelay catch-up` against a stand-in GitHub API on port 0: the hook's delivery log
//! read page by page back to `--since`, and each event that never reached the store
//! delivered again, once.

mod common;

use std::process::Command;

use chrono::{SecondsFormat, Utc};
use common::binary::*;
use common::*;

const TOKEN: &str = "ghp_catch_up_test_token_0123456789";
const ADMIN_TOKEN: &str = "admin-token-for-the-tests-0123";

/// An attempt as GitHub lists it, `minutes` ago.
fn attempt(id: u64, guid: &str, minutes: i64, status_code: u16, status: &str) -> String {
    let at = (Utc::now() - chrono::Duration::minutes(minutes))
        .to_rfc3339_opts(SecondsFormat::Secs, true);
    serde_json::json!({
        "id": id, "guid": guid, "delivered_at": at, "redelivery": false, "duration": 0.2,
        "status": status, "status_code": status_code, "event": "push", "action": null,
        "installation_id": null, "repository_id": 7
    })
    .to_string()
}

/// The two pages of the hook's log: six attempts of five events within the last day (one
/// delivered, one stored by the relay though GitHub saw a 503, one the relay refused with
/// a 401, two that never arrived), and one attempt two days old that a `--since 24h` run
/// never reaches.
fn script_the_log(github: &RecordingUpstream) {
    let page_one = format!(
        "[{}, {}, {}]",
        attempt(105, "lost-guid", 1, 0, "failed to connect to host"),
        attempt(104, "stored-guid", 2, 503, "Invalid HTTP Response: 503"),
        attempt(103, "ok-guid", 3, 200, "OK"),
    );
    let next = format!(
        "<{}/repositories/7/hooks/42/deliveries?per_page=100&cursor=v1_102>; rel=\"next\"",
        github.url()
    );
    github.answer_next(Answer::new(200, &page_one).header("link", &next));
    let page_two = format!(
        "[{}, {}, {}, {}]",
        attempt(102, "retried-guid", 4, 502, "Invalid HTTP Response: 502"),
        attempt(101, "retried-guid", 5, 0, "timed out"),
        attempt(99, "refused-guid", 6, 401, "Invalid HTTP Response: 401"),
        attempt(100, "old-guid", 2 * 24 * 60, 0, "failed to connect to host"),
    );
    github.answer_next(Answer::new(200, &page_two));
}

fn catch_up(
    dir: &std::path::Path,
    github: &RecordingUpstream,
    extra: &[&str],
) -> std::process::Output {
    Command::new(BIN)
        .arg("catch-up")
        .args([
            "--source",
            "github",
            "--token",
            "env:CATCH_UP_TEST_TOKEN",
            "--since",
            "24h",
        ])
        .arg("--hook")
        .arg(format!("{}/repos/acme/app/hooks/42", github.url()))
        .arg("--state")
        .arg(dir.join("state"))
        .args(extra)
        .env("CATCH_UP_TEST_TOKEN", TOKEN)
        .output()
        .unwrap()
}

/// Each call the stand-in GitHub got: `METHOD path?query`.
fn asked(github: &RecordingUpstream) -> Vec<String> {
    github
        .received()
        .into_iter()
        .map(|call| format!("{} {}", call.method, call.path_and_query))
        .collect()
}

fn texts(output: &std::process::Output) -> (String, String) {
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    );
    assert!(
        !stdout.contains(TOKEN) && !stderr.contains(TOKEN),
        "{stdout}{stderr}"
    );
    (stdout, stderr)
}

/// `hookrelay catch-up --source github FLAG` without `--hook`: the source's catch_up in
/// the configuration at `dir` says which hooks, and which token.
fn catch_up_as_configured(dir: &std::path::Path, flag: &str) -> std::process::Output {
    catch_up_from_config(dir, &["--source", "github", flag])
}

/// `hookrelay catch-up ARGS --config DIR --state DIR/state`.
fn catch_up_from_config(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("catch-up")
        .args(args)
        .arg("--config")
        .arg(dir)
        .arg("--state")
        .arg(dir.join("state"))
        .env("CATCH_UP_TEST_TOKEN", TOKEN)
        .output()
        .unwrap()
}

/// A relay that stored one webhook (`stored-guid`) and stopped.
async fn a_store_holding_one_webhook() -> tempfile::TempDir {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "secret", "s3cret-for-the-tests");
    write(
        dir.path(),
        "relay.toml",
        &format!(
            "[upstream.gitlab]\nurl = \"{}\"\n[source.github]\nprovider = \"github\"\nsecret = \"file:secret\"\n",
            upstream.url()
        ),
    );
    let mut served = serve_in(dir.path());
    let url = format!("http://{}/hooks/github", served.address());
    let reply = signed_github_body(
        &url,
        "s3cret-for-the-tests",
        "push",
        "stored-guid",
        fixture("github/push_tag.json"),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    served.terminate();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_never_reached_the_store_is_redelivered_once_and_the_rest_left_alone() {
    let dir = a_store_holding_one_webhook().await;
    let github = RecordingUpstream::start().await;

    // A dry run reads the log and asks for nothing.
    script_the_log(&github);
    let output = catch_up(dir.path(), &github, &["--dry-run"]);
    let (stdout, stderr) = texts(&output);
    assert!(output.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("would redeliver retried-guid (push, 2 attempts"),
        "{stdout}"
    );
    assert!(
        stdout.contains("would redeliver lost-guid (push, 1 attempt, "),
        "{stdout}"
    );
    assert!(stdout.contains("failed to connect to host"), "{stdout}");
    assert!(
        stdout.contains("not redelivered, the relay refused it: refused-guid (push, 1 attempt, ")
            && stdout
                .contains("401 (Invalid HTTP Response: 401)) (a redelivery would be refused again"),
        "{stdout}"
    );
    assert!(
        stdout.contains("left alone, the relay stored it though GitHub saw no 2xx: stored-guid"),
        "{stdout}"
    );
    assert!(
        stdout.contains("6 attempts of 5 events in the log of ")
            && stdout.contains("1 delivered, 1 in the store of source \"github\" though GitHub saw no 2xx, 1 refused by the relay, 2 to redeliver"),
        "{stdout}"
    );
    assert_eq!(
        asked(&github),
        [
            "GET /repos/acme/app/hooks/42/deliveries?per_page=100",
            "GET /repositories/7/hooks/42/deliveries?per_page=100&cursor=v1_102",
        ]
    );
    for call in &github.received() {
        assert_eq!(
            call.header("authorization"),
            Some(format!("Bearer {TOKEN}").as_str())
        );
        assert_eq!(call.header("accept"), Some("application/vnd.github+json"));
        assert_eq!(call.header("x-github-api-version"), Some("2022-11-28"));
    }

    // The real run redelivers each undelivered event's newest attempt, oldest event first.
    script_the_log(&github);
    github.answer_next(Answer::new(202, "{}"));
    github.answer_next(Answer::new(202, "{}"));
    let output = catch_up(dir.path(), &github, &[]);
    let (stdout, stderr) = texts(&output);
    assert!(output.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("redelivered retried-guid"), "{stdout}");
    assert!(stdout.contains("redelivered lost-guid"), "{stdout}");
    let posts: Vec<String> = github
        .received()
        .into_iter()
        .filter(|c| c.method == "POST")
        .map(|c| c.path_and_query)
        .collect();
    assert_eq!(
        posts,
        [
            "/repos/acme/app/hooks/42/deliveries/102/attempts",
            "/repos/acme/app/hooks/42/deliveries/105/attempts",
        ]
    );

    // --json says the same for scripts.
    script_the_log(&github);
    let output = catch_up(dir.path(), &github, &["--dry-run", "--json"]);
    let (stdout, stderr) = texts(&output);
    assert!(output.status.success(), "{stdout}{stderr}");
    let said: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(
        said["redelivered"],
        serde_json::json!(["retried-guid", "lost-guid"])
    );
    assert_eq!(said["stored"], serde_json::json!(["stored-guid"]));
    assert_eq!(said["rejected"], serde_json::json!(["refused-guid"]));
    assert_eq!(said["delivered"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_that_may_not_read_the_log_and_a_rate_limit_are_said_and_fail_the_run() {
    let dir = a_store_holding_one_webhook().await;
    let github = RecordingUpstream::start().await;

    github.answer_next(Answer::new(
        404,
        r#"{"message":"Not Found","documentation_url":"https://docs.github.com/rest"}"#,
    ));
    let output = catch_up(dir.path(), &github, &[]);
    let (stdout, stderr) = texts(&output);
    assert_eq!(output.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stderr.contains("GitHub answered 404 Not Found for the deliveries of")
            && stderr.contains("(Not Found)")
            && stderr.contains("admin:repo_hook"),
        "{stderr}"
    );

    // A listing GitHub's rate limit refused says so, not that the token may not read it.
    github.answer_next(
        Answer::new(
            403,
            r#"{"message":"API rate limit exceeded for user ID 1."}"#,
        )
        .header("x-ratelimit-remaining", "0")
        .header("retry-after", "60"),
    );
    let output = catch_up(dir.path(), &github, &[]);
    let (stdout, stderr) = texts(&output);
    assert_eq!(output.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stderr
            .contains("GitHub's rate limit was reached; run again later; GitHub asks to wait 60 s")
            && !stderr.contains("admin:repo_hook"),
        "{stderr}"
    );

    // GitHub's rate limit stops the run; what is left is named for the next one.
    script_the_log(&github);
    github.answer_next(
        Answer::new(
            403,
            r#"{"message":"API rate limit exceeded for user ID 1."}"#,
        )
        .header("x-ratelimit-remaining", "0"),
    );
    let output = catch_up(dir.path(), &github, &[]);
    let (stdout, stderr) = texts(&output);
    assert_eq!(output.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains("left for another run: retried-guid"),
        "{stdout}"
    );
    assert!(
        stdout.contains("left for another run: lost-guid"),
        "{stdout}"
    );
    assert!(
        stdout.contains("stopped: GitHub's rate limit was reached"),
        "{stdout}"
    );
    let posts = github
        .received()
        .into_iter()
        .filter(|c| c.method == "POST")
        .count();
    assert_eq!(posts, 1, "nothing is asked after the limit");

    // A hook address that is not one is refused before anything is called.
    let output = Command::new(BIN)
        .args([
            "catch-up",
            "--source",
            "github",
            "--hook",
            "https://github.com/acme/app/settings/hooks/42",
        ])
        .arg("--state")
        .arg(dir.path().join("state"))
        .env("GITHUB_TOKEN", TOKEN)
        .output()
        .unwrap();
    let (_, stderr) = texts(&output);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--hook:") && stderr.contains("is not a hook's API address"),
        "{stderr}"
    );
}

/// With `catch_up = { … }` on its GitHub source, the relay itself reads the hook's log
/// when it starts, over the time it was down: what never arrived is asked for again, what
/// it stored before it stopped is left alone, and the log says which.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_with_catch_up_asks_at_its_start_for_what_arrived_while_it_was_down() {
    let dir = a_store_holding_one_webhook().await;
    let github = RecordingUpstream::start().await;
    let page = format!(
        "[{}, {}, {}]",
        attempt(105, "lost-guid", 1, 0, "failed to connect to host"),
        attempt(104, "stored-guid", 2, 503, "Invalid HTTP Response: 503"),
        attempt(103, "ok-guid", 3, 200, "OK"),
    );
    github.answer_next(Answer::new(200, &page));
    github.answer_next(Answer::new(202, "{}"));
    let relay_toml = std::fs::read_to_string(dir.path().join("relay.toml")).unwrap();
    write(
        dir.path(),
        "relay.toml",
        &format!(
            "{relay_toml}catch_up = {{ hook = \"{}/repos/acme/app/hooks/42\", token = \"env:CATCH_UP_TEST_TOKEN\" }}\n\
             [admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"env:HOOKRELAY_ADMIN_TOKEN\"\n",
            github.url()
        ),
    );
    let mut command = Command::new(BIN);
    command
        .env("CATCH_UP_TEST_TOKEN", TOKEN)
        .env("HOOKRELAY_ADMIN_TOKEN", ADMIN_TOKEN);
    let mut served = Served::start_with(command, dir.path(), &dir.path().join("state"));
    let line = served.wait_for("catch-up asked GitHub to deliver again");
    assert!(
        line.contains("count=1") && line.contains("guids=lost-guid") && !line.contains(TOKEN),
        "{line}"
    );
    assert_eq!(
        asked(&github),
        [
            "GET /repos/acme/app/hooks/42/deliveries?per_page=100",
            "POST /repos/acme/app/hooks/42/deliveries/105/attempts",
        ]
    );
    let address = served.address();
    let metrics = send("GET", &format!("http://{address}/metrics"), &[], "").await;
    assert!(
        metrics
            .text()
            .contains("hookrelay_catch_up_total{source=\"github\",outcome=\"redelivered\"} 1"),
        "{}",
        metrics.text()
    );
    // The dashboard's Health page says what the last pass found.
    let dashboard = served.dashboard_address();
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let health = send(
        "GET",
        &format!("http://{dashboard}/api/health"),
        &[("authorization", &bearer)],
        "",
    )
    .await
    .json();
    let catch_up = &health["catch_up"][0];
    assert_eq!(catch_up["source"], "github", "{health}");
    assert_eq!(catch_up["last_pass"]["redelivered"], 1, "{health}");
    assert_eq!(catch_up["last_pass"]["error"], serde_json::Value::Null);
    let health_page = send(
        "GET",
        &format!("http://{dashboard}/health"),
        &[("authorization", &bearer)],
        "",
    )
    .await;
    assert!(
        health_page.text().contains(
            &format!(
                "<dt>Catch-up of github from {}/repos/acme/app/hooks/42</dt>",
                github.url()
            )
            .replace('/', "&#x2f;")
            .replace("<&#x2f;dt>", "</dt>")
        ) && health_page
            .text()
            .contains("1 webhook the relay never took, redelivered"),
        "{} {}",
        health_page.status,
        health_page.text()
    );
    let (_, lines) = served.terminate();
    assert!(lines.iter().all(|line| !line.contains(TOKEN)));

    // The command takes the hook and token from the source's catch_up in --config.
    github.answer_next(Answer::new(200, &page));
    let output = catch_up_as_configured(dir.path(), "--dry-run");
    let (stdout, stderr) = texts(&output);
    assert!(output.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("would redeliver lost-guid"), "{stdout}");
    assert_eq!(
        asked(&github).last().map(String::as_str),
        Some("GET /repos/acme/app/hooks/42/deliveries?per_page=100")
    );
    // A source without catch_up, and no --hook: said, nothing called.
    let output = Command::new(BIN)
        .args(["catch-up", "--source", "elsewhere", "--config"])
        .arg(dir.path())
        .arg("--state")
        .arg(dir.path().join("state"))
        .output()
        .unwrap();
    let (_, stderr) = texts(&output);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("has no [source.elsewhere]"), "{stderr}");
}

/// The App's key: made for these tests (tests/fixtures/README.md).
const APP_KEY: &str = "tests/fixtures/github_app/test-app-key.pem";

/// Checks an App token as GitHub does: RS256 under the App's public key, issued by the
/// App, valid now and for at most ten minutes.
fn check_app_token(authorization: &str, app: serde_json::Value) {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject;
    let token = authorization.strip_prefix("Bearer ").unwrap();
    let (signed, signature) = token.rsplit_once('.').unwrap();
    let (header, claims) = signed.split_once('.').unwrap();
    let header: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap();
    assert_eq!(header["alg"], "RS256");
    let claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).unwrap()).unwrap();
    assert_eq!(claims["iss"], app);
    let now = Utc::now().timestamp();
    let (issued, expires) = (
        claims["iat"].as_i64().unwrap(),
        claims["exp"].as_i64().unwrap(),
    );
    assert!(
        issued <= now && now < expires && expires - issued <= 600,
        "{claims}"
    );
    let PrivateKeyDer::Pkcs1(key) = PrivateKeyDer::from_pem_file(APP_KEY).unwrap() else {
        panic!("the test key is PKCS #1");
    };
    let pair = ring::signature::RsaKeyPair::from_der(key.secret_pkcs1_der()).unwrap();
    ring::signature::UnparsedPublicKey::new(
        &ring::signature::RSA_PKCS1_2048_8192_SHA256,
        pair.public().as_ref(),
    )
    .verify(
        signed.as_bytes(),
        &URL_SAFE_NO_PAD.decode(signature).unwrap(),
    )
    .expect("the App token's signature verifies with the App's public key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_github_apps_own_hook_is_read_and_redelivered_with_the_apps_signed_token() {
    let dir = a_store_holding_one_webhook().await;
    let github = RecordingUpstream::start().await;
    let key = format!("file:{}", std::path::absolute(APP_KEY).unwrap().display());
    let page = format!(
        "[{}, {}]",
        attempt(11, "app-lost-guid", 1, 0, "failed to connect to host"),
        attempt(10, "stored-guid", 2, 503, "Invalid HTTP Response: 503"),
    );
    github.answer_next(Answer::new(200, &page));
    github.answer_next(Answer::new(202, "{}"));
    let run = |args: &[&str]| {
        Command::new(BIN)
            .args(["catch-up", "--source", "github", "--since", "1h", "--hook"])
            .arg(format!("{}/app/hook", github.url()))
            .arg("--state")
            .arg(dir.path().join("state"))
            .args(args)
            .env("GITHUB_TOKEN", TOKEN)
            .output()
            .unwrap()
    };
    let output = run(&["--app", "123456", "--key", &key]);
    let (stdout, stderr) = texts(&output);
    assert!(output.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("redelivered app-lost-guid"), "{stdout}");
    assert!(
        stdout.contains("left alone, the relay stored it though GitHub saw no 2xx: stored-guid"),
        "{stdout}"
    );
    assert_eq!(
        asked(&github),
        [
            "GET /app/hook/deliveries?per_page=100",
            "POST /app/hook/deliveries/11/attempts",
        ]
    );
    for call in github.received() {
        check_app_token(call.header("authorization").unwrap(), 123456.into());
        assert_eq!(call.header("accept"), Some("application/vnd.github+json"));
    }
    assert!(!stdout.contains("BEGIN") && !stderr.contains("BEGIN"));

    // GitHub refusing the token names what to check; the token is not printed.
    github.answer_next(Answer::new(
        401,
        r#"{"message":"A JSON web token could not be decoded"}"#,
    ));
    let output = run(&["--app", "Iv23liTest", "--key", &key]);
    let (stdout, stderr) = texts(&output);
    assert_eq!(output.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stderr.contains("401 Unauthorized")
            && stderr.contains("A JSON web token could not be decoded")
            && stderr.contains("check the App's ID (or client ID), that the key is one of the App's current private keys, and this machine's clock"),
        "{stderr}"
    );
    check_app_token(
        github
            .received()
            .last()
            .unwrap()
            .header("authorization")
            .unwrap(),
        "Iv23liTest".into(),
    );

    // What cannot work is refused before GitHub is asked (exit status 2).
    let asked_before = github.received().len();
    for (args, says) in [
        (
            vec![],
            "is a GitHub App's own hook: give the App's --app ID and --key",
        ),
        (
            vec!["--token", "env:GITHUB_TOKEN"],
            "which only the App may read",
        ),
        (
            vec!["--app", "1", "--key", "file:/nonexistent/app.pem"],
            "the key: cannot read secret file /nonexistent/app.pem",
        ),
        (
            vec!["--app", "1", "--key", "env:GITHUB_TOKEN"],
            "the key: env:GITHUB_TOKEN: the App's private key is not an unencrypted RSA key in PEM",
        ),
        (vec!["--app", "1"], "--key"),
    ] {
        let output = run(&args);
        let (stdout, stderr) = texts(&output);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stdout}{stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    assert_eq!(github.received().len(), asked_before);

    // The relay reads the App's own hook by itself, with `app` and `key` in its catch_up;
    // `check` says so.
    let relay_toml = std::fs::read_to_string(dir.path().join("relay.toml")).unwrap();
    write(
        dir.path(),
        "relay.toml",
        &format!(
            "{relay_toml}catch_up = {{ hook = \"{}/app/hook\", app = \"123456\", key = \"{key}\" }}\n",
            github.url()
        ),
    );
    let check = Command::new(BIN)
        .args(["check", "--config"])
        .arg(dir.path())
        .output()
        .unwrap();
    let (stdout, stderr) = texts(&check);
    assert!(check.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("/app/hook every 10m with App 123456 (key {key})")),
        "{stdout}"
    );
    github.answer_next(Answer::new(200, &page));
    github.answer_next(Answer::new(202, "{}"));
    let asked_before = github.received().len();
    let mut served = Served::start(dir.path(), &dir.path().join("state"));
    let line = served.wait_for("catch-up asked GitHub to deliver again");
    assert!(line.contains("guids=app-lost-guid"), "{line}");
    let calls = github.received();
    assert_eq!(calls.len(), asked_before + 2);
    for call in &calls[asked_before..] {
        check_app_token(call.header("authorization").unwrap(), 123456.into());
    }
    let (_, lines) = served.terminate();
    assert!(lines.iter().all(|line| !line.contains("BEGIN")));
}

const GITLAB_TOKEN: &str = "glpat-catch-up-test-token-0123456789";
const GITLAB_SECRET: &str = "gitlab-hook-token-for-the-tests";

/// A failed attempt as GitLab's `GET …/hooks/:hook_id/events` lists it.
fn logged(id: u64, key: Option<&str>, status: &str) -> serde_json::Value {
    let mut headers = serde_json::json!({
        "Content-Type": "application/json", "User-Agent": "GitLab/17.6.0",
        "X-Gitlab-Event": "Tag Push Hook", "X-Gitlab-Token": "[REDACTED]",
        "X-Gitlab-Event-UUID": format!("uuid-{id}"),
    });
    if let Some(key) = key {
        headers["Idempotency-Key"] = key.into();
    }
    let at = (Utc::now() - chrono::Duration::minutes(id as i64))
        .to_rfc3339_opts(SecondsFormat::Millis, true);
    serde_json::json!({
        "id": id, "url": "http://relay.example/hooks/gitlab", "trigger": "tag_push_hooks",
        "request_headers": headers, "request_data": {"object_kind": "tag_push"},
        "response_headers": {}, "response_body": "", "execution_duration": 0.01,
        "response_status": status, "created_at": at,
    })
}

/// A relay with a GitLab source that stored one webhook (`Idempotency-Key: stored-key`)
/// and stopped.
async fn a_store_holding_one_gitlab_webhook() -> tempfile::TempDir {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "secret", GITLAB_SECRET);
    write(
        dir.path(),
        "relay.toml",
        &format!(
            "[upstream.gitlab]\nurl = \"{}\"\n[source.gitlab]\nprovider = \"gitlab\"\nsecret = \"file:secret\"\n",
            upstream.url()
        ),
    );
    let mut served = serve_in(dir.path());
    let reply = send(
        "POST",
        &format!("http://{}/hooks/gitlab", served.address()),
        &[
            ("X-Gitlab-Event", "Tag Push Hook"),
            ("X-Gitlab-Token", GITLAB_SECRET),
            ("Idempotency-Key", "stored-key"),
            ("Content-Type", "application/json"),
        ],
        fixture("gitlab/tag_push.json"),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    served.terminate();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gitlab_hooks_failed_events_are_resent_by_their_idempotency_key() {
    let dir = a_store_holding_one_gitlab_webhook().await;
    let gitlab = RecordingUpstream::start().await;
    let hook = format!("{}/api/v4/projects/acme%2Fapp/hooks/7", gitlab.url());
    let run = |args: &[&str]| {
        Command::new(BIN)
            .args([
                "catch-up", "--source", "gitlab", "--since", "1d", "--hook", &hook,
            ])
            .arg("--state")
            .arg(dir.path().join("state"))
            .args(args)
            .env("GITLAB_TOKEN", GITLAB_TOKEN)
            .output()
            .unwrap()
    };
    let executable = r#"{"id": 7, "url": "http://relay.example/hooks/gitlab", "alert_status": "executable", "disabled_until": null}"#;
    // Two pages of failures: the lost webhook failed twice (no answer, then a 503), the
    // stored one's answer was lost, and one attempt predates Idempotency-Key.
    let script = |gitlab: &RecordingUpstream| {
        gitlab.answer_next(Answer::new(200, executable));
        let next = format!(
            "<{}/api/v4/projects/acme%2Fapp/hooks/7/events?page=2&per_page=20&status=server_failure%2C429>; rel=\"next\"",
            gitlab.url()
        );
        let page_one = serde_json::json!([
            logged(4, Some("lost-key"), "503"),
            logged(3, Some("stored-key"), "internal error"),
        ]);
        gitlab.answer_next(Answer::new(200, &page_one.to_string()).header("link", &next));
        let page_two = serde_json::json!([
            logged(2, Some("lost-key"), "internal error"),
            logged(1, None, "502"),
        ]);
        gitlab.answer_next(Answer::new(200, &page_two.to_string()));
    };
    script(&gitlab);
    gitlab.answer_next(Answer::new(201, r#"{"response_status":200}"#));
    let output = run(&[]);
    let (stdout, stderr) = texts(&output);
    assert!(
        !stdout.contains(GITLAB_TOKEN) && !stderr.contains(GITLAB_TOKEN),
        "{stdout}{stderr}"
    );
    assert!(output.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("redelivered lost-key (Tag Push Hook, 2 attempts, the last at ")
            && stdout.contains(": 503)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("left alone, the relay stored it though GitLab saw no 2xx: stored-key"),
        "{stdout}"
    );
    assert!(
        stdout.contains("1 failed attempts carry no Idempotency-Key (GitLab before 17.4)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("4 failed attempts (no answer, 5xx or 429) of 2 events in the log of ")
            && stdout.contains(": 1 in the store of source \"gitlab\" though GitLab saw no 2xx, 0 refused by the relay, 1 redelivered"),
        "{stdout}"
    );
    assert_eq!(
        asked(&gitlab),
        [
            "GET /api/v4/projects/acme%2Fapp/hooks/7",
            "GET /api/v4/projects/acme%2Fapp/hooks/7/events?status=server_failure,429&per_page=20",
            "GET /api/v4/projects/acme%2Fapp/hooks/7/events?page=2&per_page=20&status=server_failure%2C429",
            "POST /api/v4/projects/acme%2Fapp/hooks/7/events/4/resend",
        ]
    );
    for call in gitlab.received() {
        assert_eq!(
            call.header("authorization"),
            Some(format!("Bearer {GITLAB_TOKEN}").as_str())
        );
    }

    // A resend the relay answered with a 503 is said as refused, and fails the run.
    script(&gitlab);
    gitlab.answer_next(Answer::new(201, r#"{"response_status":503}"#));
    let output = run(&[]);
    let (stdout, stderr) = texts(&output);
    assert_eq!(output.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains("GitLab refused to redeliver lost-key")
            && stdout.contains("GitLab resent it and the relay answered 503"),
        "{stdout}"
    );

    // A hook GitLab stopped calling after failures is said; nothing is resent (GitLab
    // would refuse with "Hook disabled").
    let before = gitlab.received().len();
    gitlab.answer_next(Answer::new(
        200,
        r#"{"id": 7, "alert_status": "temporarily_disabled", "disabled_until": "2026-12-06T12:00:00.000Z"}"#,
    ));
    gitlab.answer_next(Answer::new(
        200,
        &serde_json::json!([logged(4, Some("lost-key"), "503")]).to_string(),
    ));
    let output = run(&["--json"]);
    let (stdout, stderr) = texts(&output);
    assert_eq!(output.status.code(), Some(1), "{stdout}{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["left"], serde_json::json!(["lost-key"]), "{report}");
    assert!(
        report["hook_disabled"]
            .as_str()
            .unwrap()
            .contains("GitLab stopped calling this hook after four failures in a row, until 2026-12-06T12:00:00.000Z"),
        "{report}"
    );
    assert_eq!(gitlab.received().len(), before + 2);

    // A token GitLab refuses is said with what it needs.
    gitlab.answer_next(Answer::new(403, r#"{"message":"403 Forbidden"}"#));
    let output = run(&[]);
    let (_, stderr) = texts(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("GitLab answered 403 Forbidden for the deliveries of ")
            && stderr.contains("the Maintainer role"),
        "{stderr}"
    );
}

/// A relay with `catch_up` on its GitLab source resends at its start what GitLab could not
/// deliver while it was down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_with_catch_up_on_a_gitlab_source_resends_at_its_start() {
    let dir = a_store_holding_one_gitlab_webhook().await;
    let gitlab = RecordingUpstream::start().await;
    gitlab.answer_next(Answer::new(
        200,
        r#"{"id": 7, "alert_status": "executable"}"#,
    ));
    gitlab.answer_next(Answer::new(
        200,
        &serde_json::json!([
            logged(2, Some("lost-key"), "internal error"),
            logged(1, Some("stored-key"), "503"),
        ])
        .to_string(),
    ));
    gitlab.answer_next(Answer::new(201, r#"{"response_status":200}"#));
    let relay_toml = std::fs::read_to_string(dir.path().join("relay.toml")).unwrap();
    write(
        dir.path(),
        "relay.toml",
        &format!(
            "{relay_toml}catch_up = {{ hook = \"{}/api/v4/projects/42/hooks/7\", token = \"env:CATCH_UP_TEST_TOKEN\" }}\n",
            gitlab.url()
        ),
    );
    let mut command = Command::new(BIN);
    command.env("CATCH_UP_TEST_TOKEN", GITLAB_TOKEN);
    let mut served = Served::start_with(command, dir.path(), &dir.path().join("state"));
    let line = served.wait_for("catch-up asked GitLab to deliver again");
    assert!(
        line.contains("count=1") && line.contains("guids=lost-key"),
        "{line}"
    );
    assert_eq!(
        asked(&gitlab).last().map(String::as_str),
        Some("POST /api/v4/projects/42/hooks/7/events/2/resend")
    );
    let (_, lines) = served.terminate();
    assert!(lines.iter().all(|line| !line.contains(GITLAB_TOKEN)));

    // Started again while GitLab has stopped calling the hook: said in the log and the
    // metric, and nothing is resent.
    gitlab.answer_next(Answer::new(
        200,
        r#"{"id": 7, "alert_status": "disabled", "disabled_until": null}"#,
    ));
    gitlab.answer_next(Answer::new(
        200,
        &serde_json::json!([logged(5, Some("lost-again"), "internal error")]).to_string(),
    ));
    let before = gitlab.received().len();
    let mut command = Command::new(BIN);
    command.env("CATCH_UP_TEST_TOKEN", GITLAB_TOKEN);
    let mut served = Served::start_with(command, dir.path(), &dir.path().join("state"));
    let line = served.wait_for("GitLab does not call the relay's hook now");
    assert!(line.contains("after forty failures"), "{line}");
    // The pass counts right after its log line: read until it has (at most 5 s).
    let counted = |text: &str| {
        text.contains("hookrelay_catch_up_total{source=\"gitlab\",outcome=\"hook_disabled\"} 1")
            && text.contains("hookrelay_catch_up_total{source=\"gitlab\",outcome=\"left\"} 1")
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut metrics = String::new();
    while !counted(&metrics) && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        metrics = send(
            "GET",
            &format!("http://{}/metrics", served.address()),
            &[],
            "",
        )
        .await
        .text();
    }
    assert!(counted(&metrics), "{metrics}");
    assert_eq!(gitlab.received().len(), before + 2, "nothing resent");
    served.terminate();
}

/// A source's catch_up may name several hooks (one per repository sending to it): the
/// relay reads each, the Health page shows each, and the command reads them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_hook_of_a_sources_catch_up_is_read() {
    let dir = a_store_holding_one_webhook().await;
    let github = RecordingUpstream::start().await;
    github.answer_next(Answer::new(
        200,
        &format!("[{}]", attempt(7, "lost-in-b", 1, 0, "timed out")),
    ));
    github.answer_next(Answer::new(202, "{}"));
    github.answer_next(Answer::new(200, "[]"));
    let relay_toml = std::fs::read_to_string(dir.path().join("relay.toml")).unwrap();
    let url = github.url();
    write(
        dir.path(),
        "relay.toml",
        &format!(
            "{relay_toml}catch_up = {{ hooks = [\"{url}/repos/acme/b/hooks/2\", \"{url}/repos/acme/c/hooks/3\"], token = \"env:CATCH_UP_TEST_TOKEN\" }}\n\
             [admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"env:HOOKRELAY_ADMIN_TOKEN\"\n"
        ),
    );
    let mut command = Command::new(BIN);
    command
        .env("CATCH_UP_TEST_TOKEN", TOKEN)
        .env("HOOKRELAY_ADMIN_TOKEN", ADMIN_TOKEN);
    let mut served = Served::start_with(command, dir.path(), &dir.path().join("state"));
    served.wait_for("catch-up asked GitHub to deliver again");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while github.received().len() < 3 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        asked(&github),
        [
            "GET /repos/acme/b/hooks/2/deliveries?per_page=100",
            "POST /repos/acme/b/hooks/2/deliveries/7/attempts",
            "GET /repos/acme/c/hooks/3/deliveries?per_page=100",
        ]
    );
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    // The last hook's log was asked for; its pass is noted once the answer is read.
    let mut health = serde_json::Value::Null;
    for _ in 0..200 {
        health = send(
            "GET",
            &format!("http://{}/api/health", served.dashboard_address()),
            &[("authorization", &bearer)],
            "",
        )
        .await
        .json();
        let passes = health["catch_up"].as_array().cloned().unwrap_or_default();
        if passes.len() == 2 && passes.iter().all(|c| c["last_pass"].is_object()) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let hooks: Vec<(String, u64)> = health["catch_up"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["hook"].as_str().unwrap().to_owned(),
                c["last_pass"]["redelivered"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        hooks,
        [
            (format!("{url}/repos/acme/b/hooks/2"), 1),
            (format!("{url}/repos/acme/c/hooks/3"), 0),
        ]
    );
    served.terminate();

    // The command without --hook reads every hook of the source, a JSON line each.
    github.answer_next(Answer::new(200, "[]"));
    github.answer_next(Answer::new(200, "[]"));
    let output = catch_up_as_configured(dir.path(), "--json");
    let (stdout, stderr) = texts(&output);
    assert!(output.status.success(), "{stdout}{stderr}");
    let read: Vec<String> = stdout
        .lines()
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line).unwrap()["hook"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        read,
        [
            format!("{url}/repos/acme/b/hooks/2"),
            format!("{url}/repos/acme/c/hooks/3"),
        ]
    );

    // --all reads every source with catch_up (here the one), each as configured.
    github.answer_next(Answer::new(200, "[]"));
    github.answer_next(Answer::new(200, "[]"));
    let asked_before = github.received().len();
    let output = catch_up_from_config(dir.path(), &["--all", "--dry-run"]);
    let (stdout, stderr) = texts(&output);
    assert!(output.status.success(), "{stdout}{stderr}");
    assert_eq!(
        stdout.matches("in the store of source \"github\"").count(),
        2,
        "{stdout}"
    );
    assert_eq!(github.received().len(), asked_before + 2);
    let output = catch_up_from_config(dir.path(), &["--all", "--source", "github"]);
    assert_eq!(output.status.code(), Some(2));
    let bare = tempfile::tempdir().unwrap();
    write(
        bare.path(),
        "relay.toml",
        "[upstream.gitlab]\nurl = \"http://127.0.0.1:1\"\n",
    );
    let output = catch_up_from_config(bare.path(), &["--all"]);
    let (_, stderr) = texts(&output);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no source in"), "{stderr}");
}

/// A GitHub App reads a repository's hook through its installation there: the App's
/// token asks which installation covers the repository and for that installation's
/// token, which then reads the log and asks for redeliveries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_reads_a_repositorys_hook_with_its_installations_token() {
    const INSTALLATION_TOKEN: &str = "ghs_installation_token_for_the_tests_0123";
    let dir = a_store_holding_one_webhook().await;
    let github = RecordingUpstream::start().await;
    let key = format!("file:{}", std::path::absolute(APP_KEY).unwrap().display());
    github.answer_next(Answer::new(200, r#"{"id": 55, "app_id": 123456}"#));
    github.answer_next(Answer::new(
        201,
        &format!(r#"{{"token": "{INSTALLATION_TOKEN}", "expires_at": "2026-12-06T12:00:00Z"}}"#),
    ));
    github.answer_next(Answer::new(
        200,
        &format!(
            "[{}]",
            attempt(21, "lost-in-repo", 1, 503, "Invalid HTTP Response: 503")
        ),
    ));
    github.answer_next(Answer::new(202, "{}"));
    let run = || {
        Command::new(BIN)
            .args(["catch-up", "--source", "github", "--since", "1h", "--hook"])
            .arg(format!("{}/repos/acme/app/hooks/42", github.url()))
            .arg("--state")
            .arg(dir.path().join("state"))
            .args(["--app", "123456", "--key", &key])
            .output()
            .unwrap()
    };
    let output = run();
    let (stdout, stderr) = texts(&output);
    assert!(output.status.success(), "{stdout}{stderr}");
    assert!(
        !stdout.contains(INSTALLATION_TOKEN) && !stderr.contains(INSTALLATION_TOKEN),
        "{stdout}{stderr}"
    );
    assert!(stdout.contains("redelivered lost-in-repo"), "{stdout}");
    let calls = github.received();
    let asked: Vec<String> = calls
        .iter()
        .map(|call| format!("{} {}", call.method, call.path_and_query))
        .collect();
    assert_eq!(
        asked,
        [
            "GET /repos/acme/app/installation",
            "POST /app/installations/55/access_tokens",
            "GET /repos/acme/app/hooks/42/deliveries?per_page=100",
            "POST /repos/acme/app/hooks/42/deliveries/21/attempts",
        ]
    );
    for call in &calls[..2] {
        check_app_token(call.header("authorization").unwrap(), 123456.into());
    }
    for call in &calls[2..] {
        assert_eq!(
            call.header("authorization"),
            Some(format!("Bearer {INSTALLATION_TOKEN}").as_str())
        );
    }

    // An App not installed on the repository is said, and nothing else is asked.
    github.answer_next(Answer::new(404, r#"{"message":"Not Found"}"#));
    let output = run();
    let (stdout, stderr) = texts(&output);
    assert_eq!(output.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stderr.contains("the GitHub App 123456 is not installed on acme/app: install it there"),
        "{stderr}"
    );
    assert_eq!(github.received().len(), calls.len() + 1);
}
