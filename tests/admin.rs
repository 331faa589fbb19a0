//! The delivery dashboard through the real binary: its own listener, the JSON API, the
//! pages (hostile payload text escaped), who may view and who may act, and cross-site
//! protection. Every address is 127.0.0.1.

mod common;

use std::process::Command;

use common::binary::{BIN, Served, write};
use common::{RecordingUpstream, post, send, signed_github_body};
use serde_json::Value;

const SECRET: &str = "s3cret-for-the-tests";
const ADMIN_TOKEN: &str = "admin-token-for-the-tests-0123";

/// A relay with a dashboard on 127.0.0.1:0 and one rule; its webhook and dashboard
/// addresses.
fn start(dir: &std::path::Path, upstream: &str, admin: &str) -> (Served, String, String) {
    write(dir, "secret", SECRET);
    write(
        dir,
        "relay.toml",
        &format!(
            "[upstream.gitlab]\nurl = \"{upstream}\"\n[source.github]\nprovider = \"github\"\nsecret = \"file:{0}/secret\"\n\
             {admin}\n\
             [[rule]]\nname = \"all\"\nsource = \"github\"\n[rule.trigger]\nproject = \"acme/app\"\nref = \"main\"\n\
             token = \"file:{0}/secret\"\n",
            dir.display()
        ),
    );
    let mut command = Command::new(BIN);
    command.env("HOOKRELAY_ADMIN_TOKEN", ADMIN_TOKEN);
    let mut served = Served::start_with(command, dir, &dir.join("state"));
    let address = served.address();
    let dashboard = served.dashboard_address();
    (served, address, dashboard)
}

/// Logs in at `login` with the dashboard's token; the session cookie (`name=value`) to
/// send with a browser's requests.
async fn log_in(login: &str) -> String {
    let logged = post(
        login,
        &[("content-type", "application/x-www-form-urlencoded")],
        format!("token={ADMIN_TOKEN}"),
    )
    .await;
    let cookie = logged.headers["set-cookie"].to_str().unwrap();
    cookie.split(';').next().unwrap().to_owned()
}

/// A GitHub push `body` as delivery `id`, signed and sent to the relay's `/hooks/SOURCE`,
/// whose answer's status must be `status`.
async fn push_to(address: &str, source: &str, id: &str, body: Vec<u8>, status: u16) {
    let url = format!("http://{address}/hooks/{source}");
    let reply = signed_github_body(&url, SECRET, "push", id, body).await;
    assert_eq!(reply.status, status, "{source} {id}: {}", reply.text());
}

/// The cross-site token a confirmation page's form carries.
fn csrf_of(page: &str) -> &str {
    let (_, rest) = page
        .split_once("name=\"csrf\" value=\"")
        .expect("the page has a cross-site token");
    rest.split_once('"').expect("the token's value ends").0
}

const ADMIN: &str = "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"env:HOOKRELAY_ADMIN_TOKEN\"\n";

/// GitHub's published tag push, with hostile text where a payload may carry any: the
/// repository's name and the pusher.
fn hostile_push() -> Vec<u8> {
    let mut push: Value = serde_json::from_slice(&common::fixture("github/push_tag.json")).unwrap();
    push["repository"]["full_name"] = "acme/<script>alert(1)</script>\"quoted'\u{1b}[31m".into();
    push["pusher"]["name"] = "<img src=x onerror=alert(2)>".into();
    serde_json::to_vec(&push).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_deliveries_escaped_and_acts_only_with_the_token() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (_served, address, dashboard) = start(dir.path(), &upstream.url(), ADMIN);
    let delivery = "d-<b>1</b>";
    push_to(&address, "github", delivery, hostile_push(), 202).await;
    let url = |path: &str| format!("http://{dashboard}{path}");
    // Never on the webhook port.
    assert_eq!(
        send("GET", &format!("http://{address}/deliveries"), &[], "")
            .await
            .status,
        404
    );

    // The API: the delivery, its trigger, the pipeline once sent.
    let mut listed = Value::Null;
    for _ in 0..100 {
        listed = send("GET", &url("/api/deliveries"), &[], "").await.json();
        if listed["deliveries"][0]["work"][0]["state"] == "sent" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let first = &listed["deliveries"][0];
    assert_eq!(first["delivery_id"], delivery);
    assert_eq!(first["work"][0]["state"], "sent", "{listed}");
    assert_eq!(
        first["work"][0]["pipeline_url"],
        "http://127.0.0.1:3000/test-group/test-project/-/pipelines/257"
    );
    let filtered = send("GET", &url("/api/deliveries?q=nothing-like-this"), &[], "")
        .await
        .json();
    assert_eq!(filtered["deliveries"], serde_json::json!([]));
    let by_text = send("GET", &url("/api/deliveries?q=%3Cscript%3E"), &[], "")
        .await
        .json();
    assert_eq!(
        by_text["deliveries"].as_array().unwrap().len(),
        1,
        "free text finds the repository"
    );
    let bad = send("GET", &url("/api/deliveries?state=bogus"), &[], "").await;
    assert_eq!(bad.status, 400);
    assert_eq!(
        bad.json()["message"],
        "state: \"bogus\" is not one of: queued, retrying, sending, sent, failed, cancelled, superseded, none, duplicate, refused"
    );
    let bad = send("GET", &url("/api/deliveries?kind=bogus"), &[], "").await;
    assert_eq!(bad.status, 400);
    assert!(
        bad.json()["message"]
            .as_str()
            .unwrap()
            .starts_with("kind: \"bogus\" is not one of: webhook, gateway"),
        "{}",
        bad.text()
    );

    // The pages: everything from the payload is escaped, control characters shown.
    let encoded = "d-%3Cb%3E1%3C%2Fb%3E";
    for page in ["/deliveries".to_owned(), format!("/deliveries/{encoded}")] {
        let html = send("GET", &url(&page), &[], "").await;
        assert_eq!(html.status, 200, "{page}");
        let text = html.text();
        assert!(!text.contains("<script>alert"), "{page}: {text}");
        assert!(!text.contains("<img src=x"), "{page}");
        assert!(!text.contains("<b>1</b>"), "{page}");
        assert!(!text.contains('\u{1b}'), "{page}");
        assert!(
            text.contains("d-&lt;b&gt;1&lt;&#x2f;b&gt;") || text.contains("d-&lt;b&gt;1&lt;/b&gt;"),
            "{page}"
        );
        let csp = html.headers["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"));
    }
    let detail = send("GET", &url(&format!("/deliveries/{encoded}")), &[], "")
        .await
        .text();
    assert!(
        detail.contains("&lt;script&gt;alert(1)&lt;&#x2f;script&gt;"),
        "escaped repository"
    );
    assert!(detail.contains("\\u{1b}"), "the escape character is shown");
    assert!(
        detail.contains("✓ all"),
        "the rule's verdict, as explain says it"
    );

    // Acting: never without the token, even on loopback.
    let api_replay = url(&format!("/api/deliveries/{encoded}/replay"));
    assert_eq!(post(&api_replay, &[], "").await.status, 401);
    let wrong = post(&api_replay, &[("authorization", "Bearer wrong-token")], "").await;
    assert_eq!(wrong.status, 403);
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let replayed = post(&api_replay, &[("authorization", &bearer)], "").await;
    assert_eq!(replayed.status, 200, "{}", replayed.text());
    let replayed = replayed.json();
    assert!(
        replayed["message"]
            .as_str()
            .unwrap()
            .contains("queued again")
            && replayed["queued"] == serde_json::json!([2]),
        "{replayed}"
    );
    upstream.wait_for_calls(2).await;
    // Who did it is recorded in the store.
    let admin_rows = send("GET", &url("/api/deliveries?source=admin"), &[], "")
        .await
        .json();
    let record = &admin_rows["deliveries"][0];
    assert_eq!(record["event_type"], "replay");
    assert!(
        record["why"].as_str().unwrap().contains("by 127.0.0.1:"),
        "{record}"
    );
    // The replay links to the trigger it replays, which the list finds by its id.
    let page = send("GET", &url(&format!("/deliveries/{encoded}")), &[], "")
        .await
        .text();
    assert!(
        page.contains("replay of <a href=\"/deliveries?trigger=1\">1</a>"),
        "{page}"
    );
    let by_trigger = send("GET", &url("/api/deliveries?trigger=1"), &[], "")
        .await
        .json();
    assert_eq!(by_trigger["deliveries"][0]["delivery_id"], delivery);
    assert_eq!(
        by_trigger["deliveries"][0]["work"]
            .as_array()
            .unwrap()
            .len(),
        1,
        "that trigger alone: {by_trigger}"
    );
    let list = send("GET", &url("/deliveries?trigger=1"), &[], "").await;
    assert!(list.text().contains("name=\"trigger\" value=\"1\""));
    let bad = send("GET", &url("/api/deliveries?trigger=x"), &[], "").await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json()["message"], "trigger: \"x\" is not a trigger id");

    // The login form sets a strict, secure, script-proof cookie; a browser's action needs
    // the page's cross-site token and the dashboard's own origin.
    let login = url("/login");
    let refused = post(
        &login,
        &[("content-type", "application/x-www-form-urlencoded")],
        "token=nope",
    )
    .await;
    assert_eq!(refused.status, 401);
    let logged = post(
        &login,
        &[("content-type", "application/x-www-form-urlencoded")],
        format!("token={ADMIN_TOKEN}"),
    )
    .await;
    assert_eq!(logged.status, 303);
    let cookie = logged.headers["set-cookie"].to_str().unwrap().to_owned();
    for flag in ["HttpOnly", "Secure", "SameSite=Strict"] {
        assert!(cookie.contains(flag), "{cookie}");
    }
    assert!(!cookie.contains(ADMIN_TOKEN), "the cookie is not the token");
    let session = cookie.split(';').next().unwrap().to_owned();
    let confirm = send(
        "GET",
        &url(&format!("/deliveries/{encoded}/replay")),
        &[("cookie", &session)],
        "",
    )
    .await
    .text();
    let csrf = csrf_of(&confirm);
    let action = url(&format!("/deliveries/{encoded}/replay"));
    let same_origin = format!("http://{dashboard}");
    let submit = |origin: String, csrf: String| {
        let (action, session, host) = (action.clone(), session.clone(), dashboard.clone());
        async move {
            let headers = [
                ("cookie", session.as_str()),
                ("content-type", "application/x-www-form-urlencoded"),
                ("host", host.as_str()),
                ("origin", origin.as_str()),
            ];
            post(&action, &headers, format!("csrf={csrf}")).await
        }
    };
    let forged = submit(same_origin.clone(), "forged".into()).await;
    assert_eq!(forged.status, 403);
    let cross = submit("https://evil.example".into(), csrf.to_owned()).await;
    assert_eq!(cross.status, 403, "another site's form");
    let done = submit(same_origin, csrf.to_owned()).await;
    assert_eq!(done.status, 303);
    assert!(done.headers["location"].to_str().unwrap().contains("done="));
}

#[test]
fn off_loopback_the_dashboard_needs_a_token() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "secret", SECRET);
    write(
        dir.path(),
        "relay.toml",
        &format!(
            "[upstream.gitlab]\nurl = \"http://127.0.0.1:9\"\n[source.github]\nprovider = \"github\"\nsecret = \"file:{}/secret\"\n[admin]\nlisten = \"0.0.0.0:0\"\n",
            dir.path().display()
        ),
    );
    let output = common::binary::hookrelay(&["check", "--config", dir.path().to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("relay.toml:") && stderr.contains("needs `token"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_token_a_remote_viewer_is_sent_to_log_in() {
    let dir = tempfile::tempdir().unwrap();
    let admin = "[admin]\nlisten = \"0.0.0.0:0\"\ntoken = \"env:HOOKRELAY_ADMIN_TOKEN\"\n";
    let (_served, _address, dashboard) = start(dir.path(), "http://127.0.0.1:9", admin);
    let port = dashboard.rsplit(':').next().unwrap();
    let url = |path: &str| format!("http://127.0.0.1:{port}{path}");
    let page = send("GET", &url("/deliveries"), &[], "").await;
    assert_eq!(page.status, 303);
    assert_eq!(page.headers["location"], "/login");
    assert_eq!(
        send("GET", &url("/api/deliveries"), &[], "").await.status,
        401
    );
    assert_eq!(
        send("GET", &url("/api/configuration"), &[], "")
            .await
            .status,
        401
    );
    assert_eq!(send("GET", &url("/rules"), &[], "").await.status, 303);
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let api = send(
        "GET",
        &url("/api/health"),
        &[("authorization", &bearer)],
        "",
    )
    .await;
    assert_eq!(api.status, 200);
    assert_eq!(api.json()["store"], Value::Null, "the store takes writes");
    assert_eq!(api.json()["log_lines_dropped"], 0, "every log line written");
    assert_eq!(
        api.json()["store_failover_risk"],
        Value::Null,
        "a store of its own has no standby"
    );
    let login = send("GET", &url("/login"), &[], "").await;
    assert_eq!(login.status, 200);
    assert!(login.text().contains("type=\"password\""));
    assert!(
        !login.text().contains("plain HTTP"),
        "reached on this machine"
    );
    // Reached from another machine over plain HTTP, the login would not stick (the
    // cookie is Secure), and the page says so, unless a proxy took it over HTTPS.
    let from_afar = format!("relay.example:{port}");
    let login = send("GET", &url("/login"), &[("host", &from_afar)], "").await;
    assert!(
        login
            .text()
            .contains("came over plain HTTP from another machine")
    );
    let proxied = send(
        "GET",
        &url("/login"),
        &[("host", "relay.example"), ("x-forwarded-proto", "https")],
        "",
    )
    .await;
    assert!(!proxied.text().contains("plain HTTP"));
}

/// A web page whose name a DNS rebinding points at 127.0.0.1 reaches a loopback dashboard
/// through its visitor's browser, naming its own host: it must not read the deliveries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loopback_dashboard_shows_nothing_to_a_page_that_names_another_host() {
    let dir = tempfile::tempdir().unwrap();
    let (_served, _address, dashboard) = start(dir.path(), "http://127.0.0.1:9", ADMIN);
    let port = dashboard.rsplit(':').next().unwrap();
    let url = |path: &str| format!("http://{dashboard}{path}");
    let rebound = format!("rebound.example:{port}");
    for path in ["/api/deliveries", "/api/configuration", "/api/health"] {
        let reply = send("GET", &url(path), &[("host", &rebound)], "").await;
        assert_eq!(reply.status, 401, "{path}: {}", reply.text());
    }
    let page = send("GET", &url("/deliveries"), &[("host", &rebound)], "").await;
    assert_eq!(page.status, 303);
    assert_eq!(page.headers["location"], "/login");
    // Its own names still show it, and the token works from any name.
    for host in [format!("localhost:{port}"), format!("127.0.0.1:{port}")] {
        let reply = send("GET", &url("/api/deliveries"), &[("host", &host)], "").await;
        assert_eq!(reply.status, 200, "{host}");
    }
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let reply = send(
        "GET",
        &url("/api/deliveries"),
        &[("host", &rebound), ("authorization", &bearer)],
        "",
    )
    .await;
    assert_eq!(reply.status, 200);
}

/// A trigger queued behind another for the same project and ref says which one it waits
/// for, on the list, on its delivery's page and in the API, instead of reading "due now".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trigger_waiting_behind_another_says_which() {
    let upstream = RecordingUpstream::start().await;
    // The first send takes its time: the second trigger waits behind it meanwhile.
    upstream.answer_next(common::Answer::created().delayed(std::time::Duration::from_secs(3)));
    let dir = tempfile::tempdir().unwrap();
    let (_served, address, dashboard) = start(dir.path(), &upstream.url(), ADMIN);
    let url = |path: &str| format!("http://{dashboard}{path}");
    for delivery in ["first", "second"] {
        push_to(
            &address,
            "github",
            delivery,
            common::fixture("github/push_tag.json"),
            202,
        )
        .await;
    }
    let mut listed = Value::Null;
    for _ in 0..100 {
        listed = send("GET", &url("/api/deliveries"), &[], "").await.json();
        if listed["deliveries"][1]["work"][0]["state"] == "sending" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (second, first) = (&listed["deliveries"][0], &listed["deliveries"][1]);
    assert_eq!(first["work"][0]["state"], "sending", "{listed}");
    let head = first["work"][0]["id"].as_i64().unwrap();
    assert_eq!(second["delivery_id"], "second", "{listed}");
    assert_eq!(second["work"][0]["waits_for"], head, "{listed}");
    assert_eq!(
        second["work"][0]["next"],
        format!("after {head}"),
        "{listed}"
    );
    assert_eq!(first["work"][0]["waits_for"], Value::Null, "{listed}");

    let list = send("GET", &url("/deliveries"), &[], "").await.text();
    assert!(list.contains(&format!("after #{head}")), "{list}");
    let health = send("GET", &url("/health"), &[], "").await.text();
    assert!(
        health.contains("<dd>2 triggers, status posts and polls, none overdue</dd>")
            || health.contains("<dd>2 triggers, status posts and polls (the longest overdue by"),
        "{health}"
    );
    let page = send("GET", &url("/deliveries/second"), &[], "")
        .await
        .text();
    assert!(
        page.contains(&format!("<td>after {head}</td>"))
            && page.contains(&format!("waits for {head}: one trigger at a time")),
        "{page}"
    );
}

/// The rules page and `/api/configuration`: what runs now, tokens by reference and
/// variables by name only (a value written into a rule may be a secret).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rules_page_shows_what_runs_without_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "secret", SECRET);
    write(
        dir.path(),
        "relay.toml",
        &format!(
            "[upstream.gitlab]\nurl = \"http://127.0.0.1:9\"\n\
             [source.github]\nprovider = \"github\"\nsecret = \"file:{0}/secret\"\n\
             [source.codeberg]\nprovider = \"forgejo\"\nsecret = \"file:{0}/secret\"\n\
             {ADMIN}\n\
             [[rule]]\nname = \"releases\"\nsource = [\"github\", \"codeberg\"]\nevents = [\"tag\"]\nrefs = \"v*\"\n\
             [rule.trigger]\nproject = \"acme/app\"\nref = \"main\"\ntoken = \"file:{0}/secret\"\n\
             variables = {{ DEPLOY_KEY = \"literal-value-never-shown\", TAG = \"{{{{ event.ref_name }}}}\" }}\n\
             [[rule]]\nname = \"nightly\"\nschedule = \"30 2 * * *\"\ntimezone = \"Europe/Berlin\"\n\
             [rule.trigger]\nproject = \"acme/nightly\"\nref = \"main\"\ntoken = \"env:HOOKRELAY_ADMIN_TOKEN\"\n\
             [[rule]]\nname = \"api\"\nsource = \"github\"\npaths = [\"services/api/**\"]\npaths_exclude = \"**/*.md\"\nskip_ci = false\n\
             [rule.trigger]\nproject = \"acme/api\"\ntoken = \"env:HOOKRELAY_ADMIN_TOKEN\"\n",
            dir.path().display()
        ),
    );
    let mut command = Command::new(BIN);
    command.env("HOOKRELAY_ADMIN_TOKEN", ADMIN_TOKEN);
    let mut served = Served::start_with(command, dir.path(), &dir.path().join("state"));
    let dashboard = served.dashboard_address();

    let api = send(
        "GET",
        &format!("http://{dashboard}/api/configuration"),
        &[],
        "",
    )
    .await;
    assert_eq!(api.status, 200, "{}", api.text());
    let c = api.json();
    let releases = &c["rules"][0];
    assert_eq!(releases["name"], "releases");
    assert_eq!(
        releases["sources"],
        serde_json::json!(["github", "codeberg"])
    );
    assert_eq!(releases["events"], serde_json::json!(["tag"]));
    assert_eq!(releases["refs"], serde_json::json!(["v*"]));
    assert_eq!(
        releases["triggers"][0]["variables"],
        serde_json::json!(["DEPLOY_KEY", "TAG"])
    );
    let nightly = &c["rules"][1];
    assert_eq!(nightly["schedule"]["cron"], "30 2 * * *");
    assert_eq!(nightly["schedule"]["timezone"], "Europe/Berlin");
    assert!(
        nightly["schedule"]["next"]
            .as_str()
            .unwrap()
            .contains(":30:00 CE"),
        "{nightly:#}"
    );
    assert_eq!(nightly["triggers"][0]["token"], "env:HOOKRELAY_ADMIN_TOKEN");
    assert_eq!(
        c["rules"][2]["paths"],
        serde_json::json!(["services/api/**"])
    );
    assert_eq!(
        c["rules"][2]["paths_exclude"],
        serde_json::json!(["**/*.md"])
    );
    assert_eq!(c["rules"][2]["skip_ci"], false);
    assert_eq!(c["rules"][0]["skip_ci"], true);
    let codeberg = c["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "codeberg")
        .unwrap();
    assert_eq!(codeberg["provider"], "forgejo");
    assert_eq!(codeberg["rules"], 1);
    assert_eq!(c["upstreams"][0]["proxy"], Value::Null);

    let page = send("GET", &format!("http://{dashboard}/rules"), &[], "").await;
    assert_eq!(page.status, 200);
    let html = page.text();
    assert!(html.contains("<h3 id=\"rule-releases\">releases"), "{html}");
    assert!(html.contains("tag from github, codeberg"), "{html}");
    assert!(html.contains("DEPLOY_KEY, TAG"), "{html}");
    assert!(
        html.contains("<dt>[skip ci]</dt><dd>runs anyway (<code>skip_ci = false</code>)</dd>"),
        "{html}"
    );
    assert!(
        html.contains("<dt>Changed files</dt><dd><code>services&#x2f;api&#x2f;**</code>, not <code>**&#x2f;*.md</code></dd>"),
        "{html}"
    );
    for text in [&api.text(), &html] {
        for secret in ["literal-value-never-shown", ADMIN_TOKEN, SECRET] {
            assert!(!text.contains(secret), "{secret} shown");
        }
    }
    let (code, _) = served.terminate();
    assert_eq!(code, Some(0));
}

/// A reload that failed is on the health page with its problems, until one takes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_page_says_when_a_reload_failed_and_why() {
    let dir = tempfile::tempdir().unwrap();
    let (mut served, _address, dashboard) = start(dir.path(), "http://127.0.0.1:9", ADMIN);
    let health = |dashboard: String| async move {
        send("GET", &format!("http://{dashboard}/api/health"), &[], "")
            .await
            .json()
    };
    let before = health(dashboard.clone()).await;
    assert_eq!(before["configuration"]["reload_failed"], Value::Null);
    assert!(
        before["configuration"]["loaded"]
            .as_str()
            .unwrap()
            .ends_with(" UTC")
    );

    write(
        dir.path(),
        "30-broken.toml",
        "[[rule]]\nname = \"c\"\nsource = \"nowhere\"\n",
    );
    served.wait_for("configuration not reloaded");
    let failed = health(dashboard.clone()).await;
    let problems = failed["configuration"]["reload_failed"]["problems"].to_string();
    assert!(
        problems.contains("30-broken.toml:2: rule \\\"c\\\" needs at least one [rule.trigger]"),
        "{failed:#}"
    );
    let page = send("GET", &format!("http://{dashboard}/health"), &[], "").await;
    assert!(
        page.text().contains("failed; the configuration loaded at"),
        "{}",
        page.text()
    );

    std::fs::remove_file(dir.path().join("30-broken.toml")).unwrap();
    served.wait_for("configuration reloaded");
    let fixed = health(dashboard).await;
    assert_eq!(
        fixed["configuration"]["reload_failed"],
        Value::Null,
        "{fixed:#}"
    );
    let (code, _) = served.terminate();
    assert_eq!(code, Some(0));
}

/// Guessing the dashboard's token as fast as one can: every attempt is refused (401), and
/// at most the server's budget of refusals a second reaches the log, at warning level,
/// the next one saying how many were left out. Before, each attempt wrote two lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guessing_the_token_cannot_flood_the_log() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (served, _address, dashboard) = start(dir.path(), &upstream.url(), ADMIN);
    let started = std::time::Instant::now();
    for round in 0..20 {
        let guesses = (0..10).map(|i| {
            let url = format!("http://{dashboard}/login");
            async move {
                post(
                    &url,
                    &[("content-type", "application/x-www-form-urlencoded")],
                    format!("token=guess-{round}-{i}"),
                )
                .await
                .status
            }
        });
        for status in futures_util::future::join_all(guesses).await {
            assert_eq!(status, 401);
        }
    }
    let seconds = started.elapsed().as_secs() + 1;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let last = post(
        &format!("http://{dashboard}/login"),
        &[("content-type", "application/x-www-form-urlencoded")],
        "token=last-guess",
    )
    .await;
    assert_eq!(last.status, 401);
    let (code, lines) = served.terminate();
    assert_eq!(code, Some(0));
    let refused: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("dashboard request refused"))
        .collect();
    let most = hookrelay::app::REFUSALS_LOGGED_A_SECOND * (seconds + 1) + 1;
    assert!(
        (refused.len() as u64) <= most,
        "{} lines for 201 wrong tokens over {seconds} s (at most {most})",
        refused.len()
    );
    let summary = refused.last().unwrap();
    assert!(
        summary.contains("WARN") && !summary.contains("held_back=0"),
        "{summary}"
    );
}

/// After a rule is fixed, the deliveries page filtered to the webhooks that matched no rule
/// offers to run them through today's rules; the API does it for a window, with the token
/// only: each webhook planned once, one that still matches nothing left out with its
/// reason, the action recorded, and the running relay sends what was planned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_replans_a_window_of_webhooks_that_matched_no_rule() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut served, address, dashboard) = start(dir.path(), &upstream.url(), ADMIN);
    // The one rule becomes a rule for release tags, which the pushes below are not.
    let rule = |refs: &str| {
        format!(
            "[[rule]]\nname = \"all\"\nsource = \"github\"\nevents = [\"tag\"]\nrefs = [\"{refs}\"]\n\
             [rule.trigger]\nproject = \"acme/app\"\nref = \"main\"\ntoken = \"file:{}/secret\"\n",
            dir.path().display()
        )
    };
    let relay = std::fs::read_to_string(dir.path().join("relay.toml")).unwrap();
    let without_rule = relay[..relay.find("[[rule]]").unwrap()].to_owned();
    write(
        dir.path(),
        "relay.toml",
        &(without_rule.clone() + &rule("release-*")),
    );
    served.wait_for("configuration reloaded");
    for (id, file) in [
        ("d-tag", "github/push_tag.json"),
        ("d-branch", "github/push_branch.json"),
    ] {
        push_to(&address, "github", id, common::fixture(file), 200).await;
    }
    let url = |path: &str| format!("http://{dashboard}{path}");
    let page = send("GET", &url("/deliveries?state=none&since=1h"), &[], "")
        .await
        .text();
    assert!(
        page.contains("href=\"&#x2f;replan?kind=webhook&amp;state=none&amp;since=1h\"")
            || page.contains("href=\"/replan?kind=webhook&amp;state=none&amp;since=1h\""),
        "{page}"
    );
    // A branch push's page lists the files it changed, which rules' `paths` read; its API too.
    let branch = send("GET", &url("/deliveries/d-branch"), &[], "")
        .await
        .text();
    assert!(
        branch.contains(
            "<summary>Changed files (1)</summary><ul><li><code>README.md</code></li></ul>"
        ),
        "{branch}"
    );
    let api = send("GET", &url("/api/deliveries/d-branch"), &[], "")
        .await
        .json();
    assert_eq!(
        api["events"][0]["changed_files"],
        serde_json::json!(["README.md"])
    );
    let tag = send("GET", &url("/api/deliveries/d-tag"), &[], "")
        .await
        .json();
    assert_eq!(
        tag["events"][0]["changed_files"],
        Value::Null,
        "tags have none"
    );
    let plain = send("GET", &url("/deliveries?state=sent&since=1h"), &[], "")
        .await
        .text();
    assert!(!plain.contains("replan?"), "only for none and failed");

    write(
        dir.path(),
        "relay.toml",
        &(without_rule + &rule("simple-*")),
    );
    // The first reload's line is seen already: wait for the rules page to show the fix.
    for _ in 0..100 {
        let configuration = send("GET", &url("/api/configuration"), &[], "")
            .await
            .text();
        if configuration.contains("simple-*") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // The confirmation says what confirming would do now, from a dry run.
    let session = log_in(&url("/login")).await;
    let question = send(
        "GET",
        &url("/replan?state=none&since=1h"),
        &[("cookie", &session)],
        "",
    )
    .await
    .text();
    assert!(
        question.contains("Now: 1 webhook would be planned again; nothing was recorded (dry run): d-tag (all -&gt; acme&#x2f;app main)")
            && question.contains("1 left out, the first: delivery d-branch still starts nothing"),
        "{question}"
    );
    let one = send(
        "GET",
        &url("/deliveries/d-tag/replan"),
        &[("cookie", &session)],
        "",
    )
    .await
    .text();
    assert!(
        one.contains("Now: it would queue all -&gt; acme&#x2f;app main."),
        "{one}"
    );
    // The API's preview: what a POST would do now, recording nothing.
    let preview = send("GET", &url("/api/replan?state=none&since=1h"), &[], "")
        .await
        .json();
    assert_eq!(
        preview["would_plan"],
        serde_json::json!([{"delivery_id": "d-tag", "triggers": [{"rule": "all", "project": "acme/app", "ref": "main"}]}]),
        "{preview}"
    );
    assert!(
        preview["left_out"][0]
            .as_str()
            .unwrap()
            .starts_with("delivery d-branch still starts nothing"),
        "{preview}"
    );
    let bad = send("GET", &url("/api/replan?state=sent&since=1h"), &[], "").await;
    assert_eq!(bad.status, 400);
    let replan = url("/api/replan?state=none&since=1h");
    assert_eq!(
        post(&replan, &[], "").await.status,
        401,
        "never without the token"
    );
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let done = post(&replan, &[("authorization", &bearer)], "").await;
    assert_eq!(done.status, 200, "{}", done.text());
    let done = done.json();
    assert!(
        done["planned"][0]["delivery_id"] == "d-tag"
            && done["planned"][0]["as"]
                .as_str()
                .unwrap()
                .starts_with("d-tag~replan-")
            && done["planned"][0]["triggers"][0]["id"].is_i64()
            && done["left_out"].as_array().unwrap().len() == 1,
        "{done}"
    );
    let message = done["message"].as_str().unwrap().to_owned();
    assert!(
        message.starts_with("1 webhook planned again")
            && message.contains("d-tag as d-tag~replan-")
            && message.contains("1 left out, the first: delivery d-branch still starts nothing")
            && message.contains("events: push not in [tag]"),
        "{message}"
    );
    let again = post(&replan, &[("authorization", &bearer)], "")
        .await
        .json();
    assert!(
        again["message"]
            .as_str()
            .unwrap()
            .starts_with("nothing planned again. 2 left out"),
        "{again}"
    );
    let wrong = post(
        &url("/api/replan?state=sent&since=1h"),
        &[("authorization", &bearer)],
        "",
    )
    .await;
    assert_eq!(wrong.status, 409);
    assert!(
        wrong
            .text()
            .contains("state none (matched no rule) or failed"),
        "{}",
        wrong.text()
    );
    let unbounded = post(
        &url("/api/replan?state=none"),
        &[("authorization", &bearer)],
        "",
    )
    .await;
    assert!(
        unbounded.text().contains("needs since"),
        "{}",
        unbounded.text()
    );

    // The running relay sends the one replan; the action is on record.
    for _ in 0..100 {
        if !upstream.received().is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(upstream.received().len(), 1, "one pipeline, once");
    let admin_rows = send("GET", &url("/api/deliveries?source=admin"), &[], "")
        .await
        .json();
    assert!(
        admin_rows["deliveries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|row| row["event_type"] == "replan"
                && row["why"]
                    .as_str()
                    .unwrap()
                    .contains("every webhook that matched no rule since 1h")),
        "{admin_rows}"
    );
}

/// A rule added later is backfilled from the rules page: a form there asks since when, the
/// confirmation says what it would start (a dry run), and confirming runs every webhook of
/// the window through that rule alone: the other rules start nothing again, and asking
/// twice starts nothing twice. The API takes the same window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_backfills_a_new_rule_over_past_webhooks() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut served, address, dashboard) = start(dir.path(), &upstream.url(), ADMIN);
    for (id, file) in [
        ("b-tag", "github/push_tag.json"),
        ("b-branch", "github/push_branch.json"),
    ] {
        push_to(&address, "github", id, common::fixture(file), 202).await;
    }
    let relay = std::fs::read_to_string(dir.path().join("relay.toml")).unwrap();
    write(
        dir.path(),
        "relay.toml",
        &format!(
            "{relay}[[rule]]\nname = \"docs\"\nsource = \"github\"\n[rule.trigger]\nproject = \"acme/docs\"\nref = \"main\"\ntoken = \"file:{}/secret\"\n",
            dir.path().display()
        ),
    );
    served.wait_for("configuration reloaded");
    let url = |path: &str| format!("http://{dashboard}{path}");
    let rules = send("GET", &url("/rules"), &[], "").await.text();
    assert!(
        rules.contains("<input type=\"hidden\" name=\"backfill\" value=\"docs\">")
            && rules.contains("Run them through this rule"),
        "{rules}"
    );
    let session = log_in(&url("/login")).await;
    // The rules page's form asks this.
    let question = send(
        "GET",
        &url("/replan?backfill=docs&since=1h"),
        &[("cookie", &session)],
        "",
    )
    .await
    .text();
    assert!(
        question.contains("Run every webhook since 1h through rule docs alone")
            && question
                .contains("Now: 2 webhooks would be planned again; nothing was recorded (dry run)")
            && question.contains("docs -&gt; acme&#x2f;docs main")
            && !question.contains("all -&gt;")
            && question
                .contains("action=\"&#x2f;replan?kind=webhook&amp;backfill=docs&amp;since=1h\""),
        "{question}"
    );
    let csrf = csrf_of(&question);
    let done = post(
        &url("/replan?kind=webhook&backfill=docs&since=1h"),
        &[
            ("cookie", &session),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
        format!("csrf={csrf}"),
    )
    .await;
    assert_eq!(done.status, 303, "{}", done.text());
    let location = done.headers["location"].to_str().unwrap();
    assert!(
        location.starts_with("/deliveries?rule=docs&since=1h&done=2+webhooks+planned+again"),
        "{location}"
    );
    // Asked again through the API, it starts nothing twice.
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let again = post(
        &url("/api/replan?backfill=docs&since=1h"),
        &[("authorization", &bearer)],
        "",
    )
    .await
    .json();
    let message = again["message"].as_str().unwrap();
    assert!(
        message.starts_with("nothing planned again. 2 left out")
            && message.contains("of rule docs already"),
        "{again}"
    );
    for (query, said) in [
        ("backfill=nope&since=1h", "has no rule named"),
        (
            &format!("backfill={}&since=1h", "x".repeat(5000)),
            "… (5000 bytes)",
        ),
        ("backfill=docs&state=none&since=1h", "it takes no state"),
        ("backfill=docs&since=1h&rule=all", "narrow it by source"),
        ("backfill=docs", "needs since"),
    ] {
        let preview = send("GET", &url(&format!("/api/replan?{query}")), &[], "").await;
        assert_eq!(preview.status, 400, "{query}: {}", preview.text());
        assert!(preview.text().contains(said), "{query}: {}", preview.text());
    }
    // Each webhook once through docs; what `all` started is not started again.
    upstream.wait_for_calls(4).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let projects: Vec<String> = upstream
        .received()
        .iter()
        .map(|call| call.path_and_query.clone())
        .collect();
    let to = |project: &str| {
        projects
            .iter()
            .filter(|path| {
                path.starts_with(&format!("/api/v4/projects/{project}/trigger/pipeline"))
            })
            .count()
    };
    assert_eq!(
        (to("acme%2Fapp"), to("acme%2Fdocs")),
        (2, 2),
        "{projects:?}"
    );
}

/// Where two sources sent the same delivery id, the deliveries page links each source's
/// own webhook (`?source=`), whose page, API and actions are that webhook's alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_source_of_a_shared_delivery_id_has_its_own_page_and_replay() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "mirror.toml",
        &format!(
            "[source.mirror]\nprovider = \"github\"\nsecret = \"file:{0}/secret\"\n\
             [[rule]]\nname = \"mirrored\"\nsource = \"mirror\"\n[rule.trigger]\nproject = \"acme/mirror\"\nref = \"main\"\n\
             token = \"file:{0}/secret\"\n",
            dir.path().display()
        ),
    );
    let (_served, address, dashboard) = start(dir.path(), &upstream.url(), ADMIN);
    let url = |path: &str| format!("http://{dashboard}{path}");
    for source in ["github", "mirror"] {
        push_to(
            &address,
            source,
            "same-3",
            common::fixture("github/push_tag.json"),
            202,
        )
        .await;
    }
    let detail = |source: &'static str| {
        let url = url(&format!("/api/deliveries/same-3?source={source}"));
        async move { send("GET", &url, &[], "").await }
    };
    for _ in 0..100 {
        let (github, mirror) = (detail("github").await.json(), detail("mirror").await.json());
        if github["delivery"]["work"][0]["state"] == "sent"
            && mirror["delivery"]["work"][0]["state"] == "sent"
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    for (source, project) in [("github", "acme/app"), ("mirror", "acme/mirror")] {
        let shown = detail(source).await.json();
        assert_eq!(shown["delivery"]["source"], source, "{shown}");
        let work = shown["delivery"]["work"].as_array().unwrap();
        assert_eq!(work.len(), 1, "its own trigger alone: {shown}");
        assert_eq!(work[0]["project"], project, "{shown}");
        assert_eq!(work[0]["state"], "sent", "{shown}");
    }
    let listing = send("GET", &url("/deliveries"), &[], "").await.text();
    for source in ["github", "mirror"] {
        assert!(
            listing.contains(&format!("href=\"/deliveries/same-3?source={source}\"")),
            "{listing}"
        );
    }
    let page = send("GET", &url("/deliveries/same-3?source=github"), &[], "")
        .await
        .text();
    assert!(page.contains("From <strong>github</strong>"), "{page}");
    assert!(
        page.contains("<input type=\"hidden\" name=\"source\" value=\"github\">"),
        "the page's actions name its source: {page}"
    );
    let nobody = detail("nobody").await;
    assert_eq!(nobody.status, 404);
    assert_eq!(
        nobody.json()["message"],
        "no delivery same-3 from source nobody in the store"
    );

    // A replay from one source's page queues that webhook's trigger alone.
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let replayed = post(
        &url("/api/deliveries/same-3/replay?source=github"),
        &[("authorization", &bearer)],
        "",
    )
    .await;
    assert_eq!(replayed.status, 200, "{}", replayed.text());
    assert_eq!(replayed.json()["queued"].as_array().unwrap().len(), 1);
    upstream.wait_for_calls(3).await;
    let received = upstream.received();
    assert!(
        received[2].path_and_query.contains("acme%2Fapp"),
        "{}",
        received[2].path_and_query
    );
    assert_eq!(
        detail("mirror").await.json()["delivery"]["work"]
            .as_array()
            .unwrap()
            .len(),
        1,
        "the other source's webhook queued nothing"
    );
    // The confirmation of a replan names the source, and so does the form it posts.
    let session = log_in(&url("/login")).await;
    let confirm = send(
        "GET",
        &url("/deliveries/same-3/replan?source=mirror"),
        &[("cookie", &session)],
        "",
    )
    .await
    .text();
    assert!(
        confirm.contains("Run delivery same-3 from source mirror through the rules"),
        "{confirm}"
    );
    assert!(
        confirm.contains("mirrored -&gt; acme&#x2f;mirror main")
            || confirm.contains("mirrored -&gt; acme/mirror main"),
        "the dry run plans the mirror's rule: {confirm}"
    );
    assert!(
        confirm.contains("&#x2f;replan?source=mirror\""),
        "{confirm}"
    );
}

/// Behind a trusted proxy, an action's record and the dashboard's log lines name the
/// client the proxy forwarded for, beside the proxy.
#[tokio::test]
async fn behind_a_trusted_proxy_an_action_names_the_client() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let admin = format!("{ADMIN}\n[server]\ntrusted_proxies = [\"127.0.0.1\"]\n");
    let (mut served, address, dashboard) = start(dir.path(), &upstream.url(), &admin);
    push_to(
        &address,
        "github",
        "d-proxied",
        common::fixture("github/push_tag.json"),
        202,
    )
    .await;
    upstream.wait_for_calls(1).await;
    // The upstream has the call; a replay is taken once the relay has recorded its answer
    // (until then the trigger is still `sending`, and a replay is refused 409).
    let mut state = Value::Null;
    for _ in 0..200 {
        let shown = send(
            "GET",
            &format!("http://{dashboard}/api/deliveries/d-proxied"),
            &[],
            "",
        )
        .await
        .json();
        state = shown["delivery"]["work"][0]["state"].clone();
        if state == "sent" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(state, "sent");
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let replayed = post(
        &format!("http://{dashboard}/api/deliveries/d-proxied/replay"),
        &[("authorization", &bearer), ("x-forwarded-for", "192.0.2.5")],
        "",
    )
    .await;
    assert_eq!(replayed.status, 200, "{}", replayed.text());
    let admin_rows = send(
        "GET",
        &format!("http://{dashboard}/api/deliveries?source=admin"),
        &[],
        "",
    )
    .await
    .json();
    let why = admin_rows["deliveries"][0]["why"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(why.contains("by 192.0.2.5 via 127.0.0.1:"), "{why}");
    let line = served.wait_for("client=192.0.2.5");
    assert!(line.contains("dashboard request"), "{line}");
    served.terminate();
}

/// `[admin] allow_from` lets only the addresses it lists use the dashboard (behind a
/// trusted proxy, the client it forwarded for): any other gets `403`, the login form too.
#[tokio::test]
async fn allow_from_lets_only_the_addresses_it_lists_use_the_dashboard() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let admin = format!(
        "{ADMIN}allow_from = [\"192.0.2.0/24\"]\n\n[server]\ntrusted_proxies = [\"127.0.0.1\"]\n"
    );
    let (served, _address, dashboard) = start(dir.path(), &upstream.url(), &admin);
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    for (path, forwarded, status) in [
        ("/api/deliveries", None, 403),
        ("/login", None, 403),
        ("/api/deliveries", Some("203.0.113.1"), 403),
        ("/api/deliveries", Some("192.0.2.5"), 200),
    ] {
        let mut headers = vec![("authorization", bearer.as_str())];
        headers.extend(forwarded.map(|address| ("x-forwarded-for", address)));
        let reply = send("GET", &format!("http://{dashboard}{path}"), &headers, "").await;
        assert_eq!(
            reply.status,
            status,
            "{path} {forwarded:?}: {}",
            reply.text()
        );
        if status == 403 {
            let client = forwarded.unwrap_or("127.0.0.1");
            assert_eq!(
                reply.json()["message"],
                format!(
                    "{client} may not use this dashboard: it is not among the addresses [admin] allow_from lists"
                )
            );
        }
    }
    // The Rules page names the trusted proxies.
    let rules = send(
        "GET",
        &format!("http://{dashboard}/rules"),
        &[
            ("authorization", bearer.as_str()),
            ("x-forwarded-for", "192.0.2.5"),
        ],
        "",
    )
    .await;
    assert_eq!(rules.status, 200, "{}", rules.text());
    assert!(
        rules.text().contains(
            "Proxies trusted to name their clients (<code>X-Forwarded-For</code>): 127.0.0.1&#x2f;32."
        ),
        "{}",
        rules.text()
    );
    served.terminate();
}
