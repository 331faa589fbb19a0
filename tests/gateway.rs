//! The trigger gateway end to end: the relay on port 0 in front of a recording upstream.
//! Each test asserts exactly what GitLab would have received, and what the caller got back.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

const PIPELINE: &str = "/api/v4/projects/9/trigger/pipeline";

async fn setup(extra: &str) -> (RecordingUpstream, Relay) {
    let upstream = RecordingUpstream::start().await;
    let relay = Relay::start(&gateway_config(&upstream.url(), extra)).await;
    (upstream, relay)
}

async fn curl_async(args: Vec<String>) -> (u16, String) {
    tokio::task::spawn_blocking(move || curl(&args.iter().map(String::as_str).collect::<Vec<_>>()))
        .await
        .unwrap()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

// ---- The seed page's curl commands, run literally against the relay. ----

#[tokio::test]
async fn seed_page_form_fields() {
    let (upstream, relay) = setup("").await;
    let url = relay.url(PIPELINE);
    let (status, body) = curl_async(args(&[
        "--request",
        "POST",
        "--form",
        "token=TOKEN",
        "--form",
        "ref=master",
        &url,
    ]))
    .await;
    assert_eq!(status, 201);
    assert_eq!(body, TRIGGER_RESPONSE, "GitLab's body comes back unchanged");
    let got = upstream.only();
    assert_eq!(got.method, "POST");
    assert_eq!(got.path_and_query, PIPELINE);
    assert_eq!(got.header("content-type"), Some("application/json"));
    assert_eq!(got.json(), json!({"token": "TOKEN", "ref": "master"}));
    relay.stop().await;
}

#[tokio::test]
async fn seed_page_query_string() {
    let (upstream, relay) = setup("").await;
    let url = relay.url("/api/v4/projects/9/trigger/pipeline?token=TOKEN&ref=master");
    let (status, _) = curl_async(args(&["--request", "POST", &url])).await;
    assert_eq!(status, 201);
    assert_eq!(
        upstream.only().json(),
        json!({"token": "TOKEN", "ref": "master"})
    );
}

#[tokio::test]
async fn seed_page_variables() {
    let (upstream, relay) = setup("").await;
    let url = relay.url(PIPELINE);
    let (status, _) = curl_async(args(&[
        "--request",
        "POST",
        "--form",
        "token=TOKEN",
        "--form",
        "ref=master",
        "--form",
        "variables[UPLOAD_TO_S3]=true",
        &url,
    ]))
    .await;
    assert_eq!(status, 201);
    assert_eq!(
        upstream.only().json(),
        json!({"token": "TOKEN", "ref": "master", "variables": {"UPLOAD_TO_S3": "true"}})
    );
}

#[tokio::test]
async fn seed_page_webhook_url() {
    let (upstream, relay) = setup("").await;
    let push = fixture("gitlab/push.json");
    let file = relay.dir.path().join("push.json");
    std::fs::write(&file, &push).unwrap();
    let url = relay.url("/api/v4/projects/9/ref/master/trigger/pipeline?token=TOKEN");
    let data = format!("@{}", file.display());
    let (status, _) = curl_async(args(&[
        "--request",
        "POST",
        "--header",
        "Content-Type: application/json",
        "--header",
        "X-Gitlab-Event: Push Hook",
        "--data-binary",
        &data,
        &url,
    ]))
    .await;
    assert_eq!(status, 201);
    let got = upstream.only();
    assert_eq!(
        got.path_and_query,
        "/api/v4/projects/9/ref/master/trigger/pipeline?token=TOKEN"
    );
    assert_eq!(
        got.body, push,
        "the webhook body is forwarded byte for byte"
    );
    assert_eq!(got.header("content-type"), Some("application/json"));
    assert_eq!(
        got.header("x-gitlab-event"),
        None,
        "X-Gitlab-Event is never forwarded"
    );
}

/// Connections are served on `[server] event_loops` threads (one per core by default):
/// with none (tokio's shared workers), one, and more loops than calls, concurrent calls are
/// each forwarded once and answered with GitLab's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_served_with_any_number_of_event_loops() {
    for loops in [0, 1, 3] {
        let (upstream, relay) = setup(&format!("\n[server]\nevent_loops = {loops}\n")).await;
        let urls: Vec<String> = (0..12)
            .map(|i| relay.url(&format!("{PIPELINE}?token=TOKEN&ref=r{i}")))
            .collect();
        let calls = urls.iter().map(|url| post(url, &[], Vec::new()));
        for reply in futures_util::future::join_all(calls).await {
            assert_eq!(reply.status, 201, "{loops} loops: {}", reply.text());
            assert_eq!(reply.text(), TRIGGER_RESPONSE);
        }
        let mut refs: Vec<String> = upstream
            .received()
            .iter()
            .map(|got| got.json()["ref"].as_str().unwrap().to_owned())
            .collect();
        refs.sort_by_key(|r| r[1..].parse::<u32>().unwrap());
        let expected: Vec<String> = (0..12).map(|i| format!("r{i}")).collect();
        assert_eq!(refs, expected, "{loops} loops");
        relay.stop().await;
    }
}

// ---- The reference's other documented calls. ----

#[tokio::test]
async fn reference_query_with_globbed_variables() {
    let (upstream, relay) = setup("").await;
    let url = relay
        .url("/api/v4/projects/123/trigger/pipeline?token=TOKEN&ref=main&variables[VAR1]=value1");
    let (status, _) = curl_async(args(&["-g", "--request", "POST", &url])).await;
    assert_eq!(status, 201);
    let got = upstream.only();
    assert_eq!(got.path_and_query, "/api/v4/projects/123/trigger/pipeline");
    assert_eq!(
        got.json(),
        json!({"token": "TOKEN", "ref": "main", "variables": {"VAR1": "value1"}})
    );
}

#[tokio::test]
async fn reference_json_body_keeps_input_types() {
    let (upstream, relay) = setup("").await;
    let body = r#"{"token":"TOKEN","ref":"main","variables":{"VAR1":"value1"},"inputs":{"environment":"production","level":3}}"#;
    let url = relay.url("/api/v4/projects/123/trigger/pipeline");
    let (status, _) = curl_async(args(&[
        "--request",
        "POST",
        "--header",
        "Content-Type: application/json",
        "--data",
        body,
        &url,
    ]))
    .await;
    assert_eq!(status, 201);
    assert_eq!(
        upstream.only().json(),
        json!({"token":"TOKEN","ref":"main","variables":{"VAR1":"value1"},"inputs":{"environment":"production","level":3}})
    );
}

#[tokio::test]
async fn reference_webhook_with_encoded_project_and_ref() {
    let (upstream, relay) = setup("").await;
    let url = relay
        .url("/api/v4/projects/mygroup%2Fmyproj/ref/release%2F1.2/trigger/pipeline?token=TOKEN");
    let (status, _) = curl_async(args(&[
        "--request",
        "POST",
        "--header",
        "Content-Type: application/json",
        "--data",
        r#"{"ref":"refs/heads/other-branch"}"#,
        &url,
    ]))
    .await;
    assert_eq!(status, 201);
    let got = upstream.only();
    assert_eq!(
        got.path_and_query,
        "/api/v4/projects/mygroup%2Fmyproj/ref/release%2F1.2/trigger/pipeline?token=TOKEN",
        "the project stays encoded and the path ref wins over the body's"
    );
    assert_eq!(&got.body[..], br#"{"ref":"refs/heads/other-branch"}"#);
}

// ---- Encodings and precedence. ----

#[tokio::test]
async fn urlencoded_body() {
    let (upstream, relay) = setup("").await;
    let reply = post(
        &relay.url(PIPELINE),
        &[("content-type", "application/x-www-form-urlencoded")],
        "token=TOKEN&ref=feature%2Fx&variables%5BA%5D=1+2&inputs[mode]=fast",
    )
    .await;
    assert_eq!(reply.status, 201);
    assert_eq!(
        upstream.only().json(),
        json!({"token":"TOKEN","ref":"feature/x","variables":{"A":"1 2"},"inputs":{"mode":"fast"}})
    );
}

#[tokio::test]
async fn body_wins_over_query_per_parameter() {
    let (upstream, relay) = setup("").await;
    let reply = post(
        &relay.url("/api/v4/projects/9/trigger/pipeline?token=QUERY&ref=from-query&variables[Q]=1"),
        &[("content-type", "application/json")],
        r#"{"ref":"from-body","variables":{"B":"2"}}"#,
    )
    .await;
    assert_eq!(reply.status, 201);
    assert_eq!(
        upstream.only().json(),
        json!({"token":"QUERY","ref":"from-body","variables":{"B":"2"}}),
        "GitLab's order: the body's ref and variables replace the query's; the query's token stays"
    );
}

#[tokio::test]
async fn path_ref_wins_over_query_and_body_and_is_decoded_once() {
    let (upstream, relay) = setup("").await;
    let reply = post(
        &relay.url("/api/v4/projects/9/ref/feature%2Fx/trigger/pipeline?token=TOKEN&ref=query"),
        &[("content-type", "application/x-www-form-urlencoded")],
        "ref=body&variables[V]=1",
    )
    .await;
    assert_eq!(reply.status, 201);
    let got = upstream.only();
    assert_eq!(
        got.path_and_query,
        "/api/v4/projects/9/ref/feature%2Fx/trigger/pipeline?token=TOKEN&variables%5BV%5D=1"
    );
    assert_eq!(
        &got.body[..],
        b"ref=body&variables[V]=1",
        "the webhook body is untouched"
    );
    assert_eq!(
        got.header("content-type"),
        Some("application/x-www-form-urlencoded")
    );
}

#[tokio::test]
async fn webhook_form_accepts_an_empty_body_and_an_unencoded_slash_ref() {
    let (upstream, relay) = setup("").await;
    let reply = post(
        &relay.url("/api/v4/projects/9/ref/feature/x/trigger/pipeline?token=TOKEN"),
        &[],
        "",
    )
    .await;
    assert_eq!(reply.status, 201);
    let got = upstream.only();
    assert_eq!(
        got.path_and_query,
        "/api/v4/projects/9/ref/feature%2Fx/trigger/pipeline?token=TOKEN"
    );
    assert!(got.body.is_empty());
}

#[tokio::test]
async fn project_paths_stay_encoded_upstream() {
    let (upstream, relay) = setup("").await;
    let reply = post(
        &relay.url("/api/v4/projects/group%2Fsub%2Fapp/trigger/pipeline?token=T&ref=main"),
        &[],
        "",
    )
    .await;
    assert_eq!(reply.status, 201);
    assert_eq!(
        upstream.only().path_and_query,
        "/api/v4/projects/group%2Fsub%2Fapp/trigger/pipeline"
    );
}

// ---- GitLab's answers pass through unchanged. ----

#[tokio::test]
async fn gitlab_errors_come_back_unchanged() {
    let (upstream, relay) = setup("").await;
    let cases = [
        Answer::new(400, r#"{"message":{"base":["Reference not found"]}}"#),
        Answer::new(404, r#"{"message":"404 Not Found"}"#),
        Answer::new(
            422,
            r#"{"message":{"base":["Duplicate variable name: X"]}}"#,
        ),
        Answer::new(429, "Retry later")
            .header("retry-after", "17")
            .header("ratelimit-remaining", "0"),
    ];
    for answer in cases {
        upstream.answer_next(answer.clone());
        let reply = post(
            &relay.url("/api/v4/projects/9/trigger/pipeline?token=T&ref=main"),
            &[],
            "",
        )
        .await;
        assert_eq!(reply.status, answer.status);
        assert_eq!(reply.text(), answer.body);
        for (name, value) in &answer.headers {
            assert_eq!(reply.headers.get(*name).unwrap(), value.as_str());
        }
    }
}

/// An answer repeating the call's URL (a proxy's error page), whose query holds the
/// webhook form's trigger token: the caller gets it back as it came (the token is its
/// own), but the relay's record of the call shows only the token's mask.
#[tokio::test]
async fn a_token_repeated_by_an_answer_is_masked_in_the_record() {
    let (upstream, relay) = setup("").await;
    let token = "glptt-0123456789abcdef0123456789abcdef01234567";
    let path = format!("/api/v4/projects/9/ref/main/trigger/pipeline?token={token}");
    let page = format!("<h1>Not Found</h1><p>{path}</p>");
    upstream.answer_next(Answer::new(404, &page));
    let reply = post(&relay.url(&path), &[], "").await;
    assert_eq!((reply.status, reply.text()), (404, page.clone()));
    relay.app.outbox.flush().await;
    let rows = listed(
        &hookrelay::store::StoreLocation::Folder(relay.state()),
        false,
        10,
    )
    .unwrap();
    let error = rows[0].last_error.as_deref().unwrap();
    assert!(
        !error.contains(token) && error.contains("token=glptt-01…"),
        "{error}"
    );
}

/// Each event loop keeps its own connections to the upstream and reuses them: callers'
/// connections go to the loops in turn, so six calls on new connections use one upstream
/// connection per loop.
#[tokio::test]
async fn connections_to_the_upstream_are_reused() {
    for loops in [1, 2] {
        let (upstream, relay) = setup(&format!("\n[server]\nevent_loops = {loops}\n")).await;
        for _ in 0..6 {
            let reply = post(
                &relay.url("/api/v4/projects/9/trigger/pipeline?token=T&ref=main"),
                &[],
                "",
            )
            .await;
            assert_eq!(reply.status, 201);
        }
        assert_eq!(upstream.received().len(), 6);
        assert_eq!(
            upstream
                .connections
                .load(std::sync::atomic::Ordering::SeqCst),
            loops,
            "{loops} loops"
        );
        relay.stop().await;
    }
}

#[tokio::test]
async fn unreachable_upstream_is_502_naming_it() {
    // A port that was just free: bind, read it, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let relay = Relay::start(&gateway_config(&format!("http://127.0.0.1:{port}"), "")).await;
    let reply = post(
        &relay.url("/api/v4/projects/9/trigger/pipeline?token=T&ref=main"),
        &[],
        "",
    )
    .await;
    assert_eq!(reply.status, 502);
    let message = reply.json()["message"].as_str().unwrap().to_owned();
    assert!(message.contains("upstream \"gitlab\""), "{message}");
    assert!(message.contains("unreachable"), "{message}");
}

#[tokio::test]
async fn slow_upstream_is_504_naming_it() {
    let upstream = RecordingUpstream::start().await;
    let config = format!(
        "[upstream.gitlab]\nurl = \"{}\"\ntimeout = \"300ms\"\n[gateway]\nupstream = \"gitlab\"\n",
        upstream.url()
    );
    let relay = Relay::start(&config).await;
    upstream.answer_next(Answer::created().delayed(Duration::from_secs(3)));
    let reply = post(
        &relay.url("/api/v4/projects/9/trigger/pipeline?token=T&ref=main"),
        &[],
        "",
    )
    .await;
    assert_eq!(reply.status, 504);
    let message = reply.json()["message"].as_str().unwrap().to_owned();
    assert!(
        message.contains("upstream \"gitlab\"") && message.contains("did not answer within 300ms"),
        "{message}"
    );
}

// ---- Refusals: exact answers, and nothing forwarded. ----

async fn refused(
    relay: &Relay,
    upstream: &RecordingUpstream,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let reply = post(&relay.url(path), headers, body.to_owned()).await;
    assert!(
        upstream.received().is_empty(),
        "nothing may be forwarded for {path}"
    );
    assert_eq!(
        reply.headers.get("content-type").unwrap(),
        "application/json"
    );
    reply
}

#[tokio::test]
async fn missing_parameters_are_400_in_grapes_words() {
    let (upstream, relay) = setup("").await;
    let cases = [
        ("?ref=main", json!({"error": "token is missing"})),
        ("?token=T", json!({"error": "ref is missing"})),
        ("", json!({"error": "ref is missing, token is missing"})),
        ("?token=T&ref=", json!({"error": "ref is empty"})),
        (
            "?token=T&ref=main&variables=x",
            json!({"error": "variables is invalid"}),
        ),
    ];
    for (query, expected) in cases {
        let reply = refused(&relay, &upstream, &format!("{PIPELINE}{query}"), &[], "").await;
        assert_eq!(
            (reply.status, reply.json()),
            (400, expected),
            "query {query:?}"
        );
    }
}

#[tokio::test]
async fn an_empty_token_is_404_as_in_gitlab() {
    let (upstream, relay) = setup("").await;
    for query in ["?token=&ref=main", "?token=%20&ref=main"] {
        let reply = refused(&relay, &upstream, &format!("{PIPELINE}{query}"), &[], "").await;
        assert_eq!(reply.status, 404, "query {query:?}");
        let message = reply.json()["message"].as_str().unwrap().to_owned();
        assert!(
            message.starts_with("404 Not Found") && message.contains("token is empty"),
            "{message}"
        );
    }
    let reply = refused(
        &relay,
        &upstream,
        PIPELINE,
        &[("content-type", "application/json")],
        r#"{"token":null,"ref":"main"}"#,
    )
    .await;
    assert_eq!(reply.status, 404);
    // Grape's validation still comes first: a blank ref is reported before the token.
    let reply = refused(
        &relay,
        &upstream,
        &format!("{PIPELINE}?token=&ref="),
        &[],
        "",
    )
    .await;
    assert_eq!(
        (reply.status, reply.json()),
        (400, json!({"error": "ref is empty"}))
    );
}

#[tokio::test]
async fn an_unencoded_project_path_gets_the_url_to_use() {
    let (upstream, relay) = setup("").await;
    let cases = [
        (
            "/api/v4/projects/mygroup/myproj/trigger/pipeline?token=T&ref=main",
            "/api/v4/projects/mygroup%2Fmyproj/trigger/pipeline",
        ),
        (
            "/api/v4/projects/mygroup/sub/myproj/ref/release/1.2/trigger/pipeline?token=T",
            "/api/v4/projects/mygroup%2Fsub%2Fmyproj/ref/release%2F1.2/trigger/pipeline",
        ),
    ];
    for (path, use_instead) in cases {
        let reply = refused(&relay, &upstream, path, &[], "").await;
        assert_eq!(reply.status, 400, "{path}");
        let message = reply.json()["message"].as_str().unwrap().to_owned();
        assert!(
            message.contains("not URL-encoded") && message.ends_with(&format!("use {use_instead}")),
            "{message}"
        );
        assert!(
            !message.contains("token=T"),
            "the query is never echoed: {message}"
        );
    }
}

#[tokio::test]
async fn webhook_form_passes_extra_query_parameters_on() {
    let (upstream, relay) = setup("").await;
    let reply = post(
        &relay.url("/api/v4/projects/9/ref/main/trigger/pipeline?token=TOKEN&caller=nightly-sync&meta[team]=ci&tags[]=a&tags[]=b"),
        &[("content-type", "application/json")],
        r#"{"object_kind":"push"}"#,
    )
    .await;
    assert_eq!(reply.status, 201);
    let got = upstream.only().path_and_query;
    let (path, query) = got.split_once('?').unwrap();
    assert_eq!(path, "/api/v4/projects/9/ref/main/trigger/pipeline");
    let mut pairs: Vec<&str> = query.split('&').collect();
    pairs.sort_unstable();
    assert_eq!(
        pairs,
        [
            "caller=nightly-sync",
            "meta%5Bteam%5D=ci",
            "tags%5B%5D=a",
            "tags%5B%5D=b",
            "token=TOKEN"
        ],
        "GitLab puts every parameter but the token in TRIGGER_PAYLOAD, so the relay passes them on"
    );
}

#[tokio::test]
async fn webhook_form_leaves_a_form_bodys_fields_in_the_body() {
    let (upstream, relay) = setup("").await;
    let body = "payload=%7B%22ref%22%3A%22refs%2Fheads%2Fmain%22%7D";
    let reply = post(
        &relay.url("/api/v4/projects/9/ref/main/trigger/pipeline?token=TOKEN&caller=nightly"),
        &[("content-type", "application/x-www-form-urlencoded")],
        body,
    )
    .await;
    assert_eq!(reply.status, 201);
    let got = upstream.only();
    let (_, query) = got.path_and_query.split_once('?').unwrap();
    let mut pairs: Vec<&str> = query.split('&').collect();
    pairs.sort_unstable();
    assert_eq!(
        pairs,
        ["caller=nightly", "token=TOKEN"],
        "the webhook stays in the body"
    );
    assert_eq!(&got.body[..], body.as_bytes());
}

#[tokio::test]
async fn non_string_variables_get_gitlabs_message() {
    let (upstream, relay) = setup("").await;
    for body in [
        r#"{"token":"T","ref":"main","variables":{"A":1}}"#,
        r#"{"token":"T","ref":"main","variables":{"A":["1","2"]}}"#,
        r#"{"token":"T","ref":"main","variables":{"A":{"B":"c"}}}"#,
    ] {
        let reply = refused(
            &relay,
            &upstream,
            PIPELINE,
            &[("content-type", "application/json")],
            body,
        )
        .await;
        assert_eq!(reply.status, 400);
        assert_eq!(
            reply.json(),
            json!({"message": "variables needs to be a map of key-valued strings"})
        );
    }
}

#[tokio::test]
async fn pipeline_hooks_are_403_as_in_gitlab() {
    let (upstream, relay) = setup("").await;
    let reply = refused(
        &relay,
        &upstream,
        "/api/v4/projects/9/ref/main/trigger/pipeline?token=T",
        &[
            ("x-gitlab-event", "Pipeline Hook"),
            ("content-type", "application/json"),
        ],
        r#"{"object_kind":"pipeline"}"#,
    )
    .await;
    assert_eq!(
        (reply.status, reply.json()),
        (403, json!({"message": "403 Forbidden"}))
    );
}

#[tokio::test]
async fn invalid_refs_are_400_saying_why() {
    let (upstream, relay) = setup("").await;
    for (git_ref, why) in [
        ("a..b", ".."),
        ("a%20b", "' '"),
        ("a~1", "'~'"),
        ("a%5E", "'^'"),
        ("a:b", "':'"),
        ("a%3F", "'?'"),
        ("a*", "'*'"),
        ("a%5Bb", "'['"),
        ("a%5Cb", "'\\\\'"),
        ("-rf", "\"-\""),
        ("main.lock", ".lock"),
        ("feature%2F", "\"/\""),
        ("a@%7B1%7D", "@{"),
        ("a%01b", "control character"),
        ("da1560886d4f094c3e6c9ef40349f7d38b5d27d7", "commit SHA"),
    ] {
        let path = format!("/api/v4/projects/9/ref/{git_ref}/trigger/pipeline?token=T");
        let reply = refused(&relay, &upstream, &path, &[], "").await;
        assert_eq!(reply.status, 400, "{git_ref}");
        let message = reply.json()["message"].as_str().unwrap().to_owned();
        assert!(
            message.contains(why),
            "{git_ref}: {message:?} should say {why:?}"
        );
    }
}

#[tokio::test]
async fn personal_access_tokens_are_refused_with_the_reason() {
    let (upstream, relay) = setup("").await;
    let token = "glpat-Zx9RealLookingSecretValue";
    let reply = refused(
        &relay,
        &upstream,
        &format!("{PIPELINE}?token={token}&ref=main"),
        &[],
        "",
    )
    .await;
    assert_eq!(reply.status, 401);
    let message = reply.json()["message"].as_str().unwrap().to_owned();
    assert!(
        message.contains("personal") && message.contains("trigger token"),
        "{message}"
    );
    assert!(
        !message.contains("Zx9Real"),
        "the token is never echoed: {message}"
    );
}

#[tokio::test]
async fn the_reserved_trigger_payload_variable_is_refused() {
    let (upstream, relay) = setup("").await;
    let reply = refused(
        &relay,
        &upstream,
        &format!("{PIPELINE}?token=T&ref=main&variables%5BTRIGGER_PAYLOAD%5D=x"),
        &[],
        "",
    )
    .await;
    assert_eq!(reply.status, 400);
    assert!(
        reply.json()["message"]
            .as_str()
            .unwrap()
            .contains("reserved")
    );
}

#[tokio::test]
async fn oversized_bodies_are_413() {
    let (upstream, relay) = setup("[server]\nmax_body = \"1KiB\"\n").await;
    let big = format!(
        r#"{{"token":"T","ref":"main","pad":"{}"}}"#,
        "x".repeat(2048)
    );
    let reply = refused(
        &relay,
        &upstream,
        PIPELINE,
        &[("content-type", "application/json")],
        &big,
    )
    .await;
    assert_eq!(reply.status, 413);
    assert!(
        reply.json()["message"]
            .as_str()
            .unwrap()
            .contains("max_body")
    );
    // Without a declared length (chunked), the limit holds while reading.
    let file = relay.dir.path().join("big.json");
    std::fs::write(&file, &big).unwrap();
    let data = format!("@{}", file.display());
    let url = relay.url(PIPELINE);
    let (status, _) = curl_async(args(&[
        "--request",
        "POST",
        "--header",
        "Transfer-Encoding: chunked",
        "--header",
        "Content-Type: application/json",
        "--data-binary",
        &data,
        &url,
    ]))
    .await;
    assert_eq!(status, 413);
    assert!(upstream.received().is_empty());
}

#[tokio::test]
async fn unreadable_bodies_are_clear_400s_and_415s() {
    let (upstream, relay) = setup("").await;
    let reply = refused(
        &relay,
        &upstream,
        PIPELINE,
        &[("content-type", "application/json")],
        "{\n\"token\": }",
    )
    .await;
    assert_eq!(reply.status, 400);
    assert_eq!(
        reply.json()["message"],
        "the body is not valid JSON: expected value at line 2 column 10"
    );
    let reply = refused(
        &relay,
        &upstream,
        PIPELINE,
        &[("content-type", "text/plain")],
        "token=T",
    )
    .await;
    assert_eq!(reply.status, 415);
    let reply = refused(
        &relay,
        &upstream,
        PIPELINE,
        &[("content-type", "multipart/form-data; boundary=XYZ")],
        "--XYZ\r\nnot a part",
    )
    .await;
    assert_eq!(reply.status, 400);
}

#[tokio::test]
/// Under GitLab's API the relay answers as GitLab's catch-all route does, a GET of a
/// trigger URL included: `404 {"error":"404 Not Found"}`, with a message saying more.
/// Its own endpoints answer a wrong method with 405.
async fn unknown_paths_and_other_methods_are_404_as_gitlab_answers_them() {
    let (upstream, relay) = setup("").await;
    let reply = post(&relay.url("/api/v4/projects/9/pipelines"), &[], "").await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.json()["error"], "404 Not Found");
    assert_eq!(
        reply.json()["message"],
        "no endpoint POST /api/v4/projects/9/pipelines"
    );
    for method in ["GET", "PUT", "DELETE"] {
        let reply = send(method, &relay.url(PIPELINE), &[], "").await;
        assert_eq!(reply.status, 404, "{method}");
        assert_eq!(reply.json()["error"], "404 Not Found", "{method}");
        assert_eq!(
            reply.json()["message"],
            format!("{method} is not a route of GitLab's trigger API; use POST")
        );
    }
    let reply = send(
        "GET",
        &relay.url("/api/v4/projects/9/ref/main/trigger/pipeline"),
        &[],
        "",
    )
    .await;
    assert_eq!(reply.status, 404);
    let reply = post(&relay.url("/healthz"), &[], "").await;
    assert_eq!(reply.status, 405);
    assert_eq!(reply.headers.get("allow").unwrap(), "GET, HEAD");
    assert!(upstream.received().is_empty());
}

#[tokio::test]
async fn gateway_answers_404_when_not_configured() {
    let upstream = RecordingUpstream::start().await;
    let relay = Relay::start(&format!(
        "[upstream.gitlab]\nurl = \"{}\"\n",
        upstream.url()
    ))
    .await;
    let reply = post(
        &relay.url("/api/v4/projects/9/trigger/pipeline?token=T&ref=main"),
        &[],
        "",
    )
    .await;
    assert_eq!(reply.status, 404);
    assert!(
        reply.json()["message"]
            .as_str()
            .unwrap()
            .contains("[gateway]")
    );
    assert!(upstream.received().is_empty());
}

// ---- Health and shutdown. ----

#[tokio::test]
async fn health_and_readiness() {
    let (_upstream, relay) = setup("").await;
    let reply = send("GET", &relay.url("/healthz"), &[], "").await;
    assert_eq!((reply.status, reply.json()), (200, json!({"status": "ok"})));
    let reply = send("GET", &relay.url("/readyz"), &[], "").await;
    assert_eq!(
        (reply.status, reply.json()),
        (200, json!({"status": "ready"}))
    );
}

#[tokio::test]
async fn shutdown_finishes_in_flight_requests() {
    let (upstream, mut relay) = setup("").await;
    upstream.answer_next(Answer::created().delayed(Duration::from_millis(500)));
    let url = relay.url("/api/v4/projects/9/trigger/pipeline?token=T&ref=main");
    let in_flight = tokio::spawn(async move { post(&url, &[], "").await });
    // Let the request reach the upstream, then ask the relay to stop.
    for _ in 0..100 {
        if !upstream.received().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    relay.signal_shutdown();
    let reply = in_flight.await.unwrap();
    assert_eq!(reply.status, 201, "the in-flight request completes");
    relay.wait().await;
}

// ---- HTTPS upstreams: a self-hosted GitLab with its own CA. ----

#[tokio::test]
async fn https_upstream_trusted_through_ca_file() {
    let (port, ca_pem) = https_upstream(&["127.0.0.1"]).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), &ca_pem).unwrap();
    let config = format!(
        "[upstream.gitlab]\nurl = \"https://127.0.0.1:{port}\"\nca_file = \"{}\"\n[gateway]\n",
        dir.path().join("ca.pem").display()
    );
    let relay = Relay::start(&config).await;
    let reply = post(
        &relay.url("/api/v4/projects/9/trigger/pipeline?token=T&ref=main"),
        &[],
        "",
    )
    .await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    assert_eq!(reply.text(), TRIGGER_RESPONSE);
}

#[tokio::test]
async fn https_upstream_with_an_unknown_ca_is_refused() {
    let (port, _) = https_upstream(&["127.0.0.1"]).await;
    let relay = Relay::start(&format!(
        "[upstream.gitlab]\nurl = \"https://127.0.0.1:{port}\"\n[gateway]\n"
    ))
    .await;
    let reply = post(
        &relay.url("/api/v4/projects/9/trigger/pipeline?token=T&ref=main"),
        &[],
        "",
    )
    .await;
    assert_eq!(reply.status, 502);
    let message = reply.json()["message"].as_str().unwrap().to_owned();
    assert!(
        message.contains("not signed by an authority this relay trusts")
            && message.contains("set ca_file"),
        "{message}"
    );
    // The right CA, but a URL naming another host than the certificate does.
    let dir = tempfile::tempdir().unwrap();
    let (port, ca_pem) = https_upstream(&["127.0.0.1"]).await;
    std::fs::write(dir.path().join("ca.pem"), &ca_pem).unwrap();
    let relay = Relay::start(&format!(
        "[upstream.gitlab]\nurl = \"https://localhost:{port}\"\nca_file = \"{}\"\n[gateway]\n",
        dir.path().join("ca.pem").display()
    ))
    .await;
    let reply = post(
        &relay.url("/api/v4/projects/9/trigger/pipeline?token=T&ref=main"),
        &[],
        "",
    )
    .await;
    assert_eq!(reply.status, 502);
    let message = reply.json()["message"].as_str().unwrap().to_owned();
    assert!(
        message.contains("issued for another name than the URL's host"),
        "{message}"
    );
}

#[tokio::test]
async fn a_project_of_dot_segments_is_refused_and_nothing_is_forwarded() {
    let (upstream, relay) = setup("").await;
    for project in ["%2E%2E", "%2e", "group%2F..%2F..%2Fadmin"] {
        let reply = post(
            &relay.url(&format!("/api/v4/projects/{project}/trigger/pipeline?token=glptt-0123456789abcdef0123&ref=main")),
            &[],
            "",
        )
        .await;
        assert_eq!(reply.status, 400, "{project}: {}", reply.text());
        assert!(reply.text().contains("`.` or `..`"), "{}", reply.text());
    }
    assert!(
        upstream.received().is_empty(),
        "nothing reached the upstream"
    );
}

#[tokio::test]
async fn plain_calls_are_small_and_json_bodies_are_objects() {
    let (upstream, relay) = setup("").await;
    let url = relay.url(PIPELINE);
    let json = [("content-type", "application/json")];
    // Over the plain endpoint's 1 MiB: refused, naming the setting.
    let big = format!(
        r#"{{"token":"glptt-0123456789abcdef0123","ref":"main","x":"{}"}}"#,
        "a".repeat(2 << 20)
    );
    let reply = post(&url, &json, big).await;
    assert_eq!(reply.status, 413, "{}", reply.text());
    assert!(
        reply.text().contains("[gateway] max_body"),
        "{}",
        reply.text()
    );
    // A JSON body that is not an object, or holds more values than any call needs.
    let reply = post(&url, &json, "[0,0,0]").await;
    assert_eq!(reply.status, 400, "{}", reply.text());
    assert!(
        reply.text().contains("must be an object"),
        "{}",
        reply.text()
    );
    let zeros = format!("[{}0]", "0,".repeat(100_000));
    assert_eq!(post(&url, &json, zeros).await.status, 400);
    assert!(upstream.received().is_empty());
}

/// A body refused by its declared length is answered before it is read; a caller that
/// sends all of it before reading (hyper's client does) still gets the `413`, not a broken
/// pipe: the relay reads and throws away the rest before it closes ([`hookrelay::lingering`]).
/// Without that, about half of these calls failed.
#[tokio::test]
async fn a_refused_body_still_gets_its_413_when_the_caller_sends_it_all() {
    let (upstream, relay) = setup("").await;
    let url = relay.url(PIPELINE);
    let big = bytes::Bytes::from(format!(
        r#"{{"token":"glptt-0123456789abcdef0123","ref":"main","x":"{}"}}"#,
        "a".repeat(2 << 20)
    ));
    for _ in 0..20 {
        let reply = post(&url, &[("content-type", "application/json")], big.clone()).await;
        assert_eq!(reply.status, 413, "{}", reply.text());
    }
    assert!(upstream.received().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_in_flight_to_an_upstream_are_capped_and_the_overflow_is_told_to_retry() {
    let upstream = RecordingUpstream::start().await;
    *upstream.default_delay.lock().unwrap() = Duration::from_millis(1500);
    let config = format!(
        "[upstream.gitlab]\nurl = \"{}\"\ntimeout = \"5s\"\nmax_in_flight = 2\n[gateway]\nupstream = \"gitlab\"\n",
        upstream.url()
    );
    let relay = Relay::start(&config).await;
    let url =
        relay.url("/api/v4/projects/9/trigger/pipeline?token=glptt-0123456789abcdef0123&ref=main");
    let started = std::time::Instant::now();
    let calls: Vec<_> = (0..5)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { post(&url, &[], "").await })
        })
        .collect();
    let mut statuses = Vec::new();
    for call in calls {
        let reply = call.await.unwrap();
        if reply.status == 503 {
            assert_eq!(reply.headers["retry-after"], "1");
            assert!(reply.text().contains("max_in_flight"), "{}", reply.text());
        }
        statuses.push(reply.status);
    }
    statuses.sort();
    assert_eq!(
        statuses,
        [201, 201, 201, 201, 503],
        "two at a time; the fifth waited 2 s too long"
    );
    // Never more than two at once: the first two arrived together, the next two only
    // after those were answered.
    let arrivals: Vec<_> = upstream
        .received_at()
        .iter()
        .map(|t| t.duration_since(started))
        .collect();
    assert_eq!(arrivals.len(), 4);
    assert!(
        arrivals
            .iter()
            .filter(|a| **a < Duration::from_millis(1000))
            .count()
            == 2,
        "{arrivals:?}"
    );
}

/// A JSON trigger call, as a proxy forwarding for `forwarded` sends it.
async fn call_via(relay: &Relay, forwarded: Option<&str>) -> Reply {
    let mut headers = vec![("content-type", "application/json")];
    headers.extend(forwarded.map(|value| ("X-Forwarded-For", value)));
    post(
        &relay.url(PIPELINE),
        &headers,
        r#"{"token":"TOKEN","ref":"main"}"#,
    )
    .await
}

/// `[gateway] allow_from` lets only the addresses it lists call (behind a trusted proxy,
/// the client it forwarded for); any other gets `403` with GitLab's words first, before
/// its body is read, and nothing reaches GitLab.
#[tokio::test]
async fn allow_from_lets_only_the_addresses_it_lists_call() {
    let (upstream, relay) = setup("allow_from = [\"192.0.2.0/24\"]\n").await;
    for forwarded in [None, Some("192.0.2.9")] {
        let reply = call_via(&relay, forwarded).await;
        assert_eq!(reply.status, 403, "{}", reply.text());
        assert_eq!(
            reply.json()["message"],
            "403 Forbidden: 127.0.0.1 may not call the trigger API through this gateway: it is not among the addresses [gateway] allow_from lists"
        );
    }
    assert!(upstream.received().is_empty());
    relay.stop().await;

    let behind_proxy = "allow_from = [\"192.0.2.0/24\"]\nlimit = { per_client = \"2/min\" }\n\n[server]\ntrusted_proxies = [\"127.0.0.1\"]\n";
    let (upstream, relay) = setup(behind_proxy).await;
    let reply = call_via(&relay, Some("192.0.2.9")).await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    let reply = call_via(&relay, Some("203.0.113.1")).await;
    assert_eq!(reply.status, 403, "{}", reply.text());
    assert!(
        reply.json()["message"]
            .as_str()
            .unwrap()
            .starts_with("403 Forbidden: 203.0.113.1 may not"),
        "{}",
        reply.text()
    );
    // per_client counts the client allow_from admitted, not the proxy.
    assert_eq!(call_via(&relay, Some("192.0.2.9")).await.status, 201);
    assert_eq!(call_via(&relay, Some("192.0.2.9")).await.status, 429);
    assert_eq!(call_via(&relay, Some("192.0.2.10")).await.status, 201);
    assert_eq!(upstream.received().len(), 3);
    // Each call's record names its caller, and the proxy it came through.
    relay.app.outbox.flush().await;
    let location = hookrelay::store::StoreLocation::Folder(relay.state());
    let callers: Vec<String> = listed(&location, false, 10)
        .unwrap()
        .iter()
        .map(|row| {
            let summary: serde_json::Value = serde_json::from_str(&row.summary).unwrap();
            summary["caller"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(
        callers,
        [
            "192.0.2.10 via 127.0.0.1",
            "192.0.2.9 via 127.0.0.1",
            "192.0.2.9 via 127.0.0.1"
        ]
    );
    relay.stop().await;
}
