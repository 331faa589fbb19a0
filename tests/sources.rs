//! Webhook sources end to end: the real payloads each sender publishes, signed as each
//! sender signs them (the HMACs in `signature_vectors.json`), through `POST /hooks/{source}`.

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::{Value, json};

const SECRET: &str = "It's a Secret to Everybody";
/// Standard Webhooks' published key.
const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

const CONFIG: &str = r#"
[source.github]
provider = "github"
secret = "file:{dir}/secret"

[source.github-legacy]
provider = "github"
secret = "file:{dir}/secret"
allow_sha1 = true

[source.gitlab]
provider = "gitlab"
secret = "file:{dir}/secret"

[source.gitlab-signed]
provider = "gitlab"
signing_secret = "file:{dir}/whsec"

[source.gitea]
provider = "gitea"
secret = "file:{dir}/secret"

[source.forgejo]
provider = "forgejo"
secret = "file:{dir}/secret"

[source.gogs]
provider = "gogs"
secret = "file:{dir}/secret"

[source.bitbucket]
provider = "bitbucket-cloud"
secret = "file:{dir}/secret"

[source.bitbucket-server]
provider = "bitbucket-server"
secret = "file:{dir}/secret"

[source.ci]
provider = "generic"
secret = "file:{dir}/secret"
signature = { header = "X-Signature", algorithm = "sha512", encoding = "base64" }
paths = { repository = "project.name", ref = "change.ref", after = "change.sha", delivery = "id", pusher = "who" }

[source.ci-token]
provider = "generic"
secret = "file:{dir}/secret"
signature = { scheme = "token", header = "X-Token" }

[source.ci-standard]
provider = "generic"
signing_secret = "file:{dir}/whsec"
signature = { scheme = "standard-webhooks" }

[source.github-rotating]
provider = "github"
secret = ["file:{dir}/new-secret", "file:{dir}/secret"]

[source.gitlab-rotating]
provider = "gitlab"
secret = ["file:{dir}/new-secret", "file:{dir}/secret"]
"#;

/// The secret a rotation moves senders to.
const NEW_SECRET: &str = "the-next-secret-0123456789";

/// The files [`CONFIG`] reads.
const FILES: [(&str, &str); 3] = [
    ("secret", SECRET),
    ("whsec", WHSEC),
    ("new-secret", NEW_SECRET),
];

async fn relay() -> Relay {
    Relay::start_with(CONFIG, &FILES).await
}

fn vectors() -> Value {
    serde_json::from_slice(&fixture("signature_vectors.json")).unwrap()
}

/// The signature headers the sender would have sent with `file`.
fn signed_headers(file: &str) -> Vec<(String, String)> {
    let vectors = vectors();
    let headers = vectors["files"][file]["headers"]
        .as_object()
        .unwrap_or_else(|| panic!("no vector for {file}"));
    headers
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
        .collect()
}

async fn deliver(relay: &Relay, source: &str, headers: &[(&str, &str)], body: Vec<u8>) -> Reply {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    post(&relay.url(&format!("/hooks/{source}")), &all, body).await
}

/// Delivers a fixture signed with its published HMAC, plus `extra` headers.
async fn deliver_fixture(relay: &Relay, source: &str, file: &str, extra: &[(&str, &str)]) -> Reply {
    let signed = signed_headers(file);
    let mut headers: Vec<(&str, &str)> = signed
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    headers.extend_from_slice(extra);
    deliver(relay, source, &headers, fixture(file)).await
}

/// (kind, ref, before prefix, after prefix, deleted_kind)
type Expected<'a> = (&'a str, &'a str, &'a str, &'a str, Option<&'a str>);

fn assert_events(reply: &Reply, repository: &str, expected: &[Expected<'_>]) {
    assert_eq!(reply.status, 200, "{}", reply.text());
    let body = reply.json();
    let events = body["events"].as_array().unwrap();
    assert_eq!(events.len(), expected.len(), "{body:#}");
    for (event, (kind, git_ref, before, after, deleted)) in events.iter().zip(expected) {
        assert_eq!(event["kind"], *kind, "{event:#}");
        assert_eq!(event["repository"], repository);
        assert_eq!(event["ref"], *git_ref);
        assert!(
            event["before"].as_str().unwrap().starts_with(before),
            "{event:#}"
        );
        assert!(
            event["after"].as_str().unwrap().starts_with(after),
            "{event:#}"
        );
        assert_eq!(event["deleted_kind"].as_str(), *deleted, "{event:#}");
    }
    // These sources have no rules: the note says so, and nothing else.
    assert_eq!(
        body["note"].as_str(),
        Some(format!(
            "no rule matched: source {0} has no rules; add a [[rule]] with source = \"{0}\"",
            body["source"].as_str().unwrap()
        ))
        .as_deref(),
        "{body:#}"
    );
}

fn assert_note(reply: &Reply, contains: &str) {
    assert_eq!(reply.status, 200, "{}", reply.text());
    let body = reply.json();
    assert_eq!(body["events"], json!([]), "{body:#}");
    let note = body["note"]
        .as_str()
        .unwrap_or_else(|| panic!("a note: {body:#}"));
    assert!(
        note.contains(contains),
        "{note:?} should mention {contains:?}"
    );
}

const Z: &str = "0000000000000000000000000000000000000000";

#[tokio::test]
async fn github_every_fixture() {
    let relay = relay().await;
    let ev = |e| {
        [
            ("X-GitHub-Event", e),
            ("X-GitHub-Delivery", "72d3162e-cc78-11e3-81ab-4c9367dc0958"),
        ]
    };
    let r = deliver_fixture(&relay, "github", "github/push_branch.json", &ev("push")).await;
    assert_events(
        &r,
        "Codertocat/Hello-World",
        &[("push", "refs/heads/master", Z, "6113728f27", None)],
    );
    assert_eq!(r.json()["delivery"], "72d3162e-cc78-11e3-81ab-4c9367dc0958");
    let r = deliver_fixture(
        &relay,
        "github",
        "github/push_branch_create.json",
        &ev("push"),
    )
    .await;
    assert_events(
        &r,
        "bradrydzewski/drone-test-go",
        &[("push", "refs/heads/feature-branch", Z, "d2b75aa779", None)],
    );
    let r = deliver_fixture(
        &relay,
        "github",
        "github/push_branch_delete.json",
        &ev("push"),
    )
    .await;
    assert_events(
        &r,
        "bradrydzewski/drone-test-go",
        &[(
            "delete",
            "refs/heads/feature-branch",
            "d2b75aa779",
            Z,
            Some("branch"),
        )],
    );
    let r = deliver_fixture(&relay, "github", "github/push_tag.json", &ev("push")).await;
    assert_events(
        &r,
        "Codertocat/Hello-World",
        &[("tag", "refs/tags/simple-tag", Z, "6113728f27", None)],
    );
    let r = deliver_fixture(&relay, "github", "github/push_tag_delete.json", &ev("push")).await;
    assert_events(
        &r,
        "Codertocat/Hello-World",
        &[(
            "delete",
            "refs/tags/simple-tag",
            "6113728f27",
            Z,
            Some("tag"),
        )],
    );
    for (file, event) in [
        ("github/create_tag.json", "create"),
        ("github/create_branch.json", "create"),
        ("github/delete_tag.json", "delete"),
        ("github/delete_branch.json", "delete"),
    ] {
        let r = deliver_fixture(&relay, "github", file, &ev(event)).await;
        assert_note(&r, "acts on `push`");
    }
    for file in ["github/ping.json", "github/ping_org.json"] {
        let r = deliver_fixture(&relay, "github", file, &ev("ping")).await;
        assert_note(&r, "ping received");
    }
    let r = deliver_fixture(&relay, "github", "github/push_branch.json", &ev("issues")).await;
    assert_note(&r, "`issues` is not handled");
}

#[tokio::test]
async fn github_signatures() {
    let relay = relay().await;
    let push = [("X-GitHub-Event", "push")];
    // GitHub's published vector: the signature is right, so the body is read (and is not JSON).
    let hello = [
        ("X-GitHub-Event", "push"),
        (
            "X-Hub-Signature-256",
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
        ),
    ];
    let r = deliver(&relay, "github", &hello, b"Hello, World!".to_vec()).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .contains("not valid JSON")
    );
    // Tampered body.
    let mut body = fixture("github/push_branch.json");
    body[10] ^= 1;
    let sig = signed_headers("github/push_branch.json");
    let sha256 = &sig
        .iter()
        .find(|(k, _)| k == "X-Hub-Signature-256")
        .unwrap()
        .1;
    let r = deliver(
        &relay,
        "github",
        &[push[0], ("X-Hub-Signature-256", sha256)],
        body,
    )
    .await;
    assert_eq!(r.status, 401);
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .contains("X-Hub-Signature-256 header does not match")
    );
    // Missing signature.
    let r = deliver(&relay, "github", &push, fixture("github/push_branch.json")).await;
    assert_eq!(r.status, 401);
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .contains("expected the X-Hub-Signature-256 header")
    );
    // SHA-1 alone: refused unless the source opts in.
    let sha1 = &sig.iter().find(|(k, _)| k == "X-Hub-Signature").unwrap().1;
    let legacy = [push[0], ("X-Hub-Signature", sha1.as_str())];
    assert_eq!(
        deliver(
            &relay,
            "github",
            &legacy,
            fixture("github/push_branch.json")
        )
        .await
        .status,
        401
    );
    let r = deliver(
        &relay,
        "github-legacy",
        &legacy,
        fixture("github/push_branch.json"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Garbage signature format.
    let r = deliver(
        &relay,
        "github",
        &[push[0], ("X-Hub-Signature-256", "sha256=zz")],
        fixture("github/push_branch.json"),
    )
    .await;
    assert_eq!(r.status, 401);
    assert!(!r.text().contains(SECRET));
}

#[tokio::test]
async fn github_form_encoded_bodies_are_signed_as_sent() {
    let relay = relay().await;
    let json = fixture("github/push_tag.json");
    let body: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("payload", std::str::from_utf8(&json).unwrap())
        .finish();
    let signature = sha256_signature(SECRET, body.as_bytes());
    let headers = [
        ("content-type", "application/x-www-form-urlencoded"),
        ("X-GitHub-Event", "push"),
        ("X-Hub-Signature-256", signature.as_str()),
    ];
    let r = post(&relay.url("/hooks/github"), &headers, body).await;
    assert_events(
        &r,
        "Codertocat/Hello-World",
        &[("tag", "refs/tags/simple-tag", Z, "6113728f27", None)],
    );
}

#[tokio::test]
async fn gitlab_every_fixture() {
    let relay = relay().await;
    let hook = |e| {
        [
            ("X-Gitlab-Event", e),
            ("Idempotency-Key", "0b8f3a0e-9a4c-4a8e-8a8e-1c2d3e4f5a6b"),
        ]
    };
    let r = deliver_fixture(&relay, "gitlab", "gitlab/push.json", &hook("Push Hook")).await;
    assert_events(
        &r,
        "mike/diaspora",
        &[(
            "push",
            "refs/heads/master",
            "95790bf891",
            "da1560886d",
            None,
        )],
    );
    assert_eq!(
        r.json()["events"][0]["commit_count"],
        4,
        "total_commits_count, not the listed commits"
    );
    assert_eq!(r.json()["delivery"], "0b8f3a0e-9a4c-4a8e-8a8e-1c2d3e4f5a6b");
    let r = deliver_fixture(
        &relay,
        "gitlab",
        "gitlab/push_branch_create.json",
        &hook("Push Hook"),
    )
    .await;
    assert_events(
        &r,
        "gitlab-org/hello-world",
        &[("push", "refs/heads/feature", Z, "c4c79227ed", None)],
    );
    let r = deliver_fixture(
        &relay,
        "gitlab",
        "gitlab/push_branch_delete.json",
        &hook("Push Hook"),
    )
    .await;
    assert_events(
        &r,
        "TomaszKolek/my-awesome-project",
        &[(
            "delete",
            "refs/heads/tomek",
            "68595bc36b",
            Z,
            Some("branch"),
        )],
    );
    let r = deliver_fixture(
        &relay,
        "gitlab",
        "gitlab/tag_push.json",
        &hook("Tag Push Hook"),
    )
    .await;
    assert_events(
        &r,
        "jsmith/example",
        &[("tag", "refs/tags/v1.0.0", Z, "82b3d5ae55", None)],
    );
    let r = deliver_fixture(
        &relay,
        "gitlab",
        "gitlab/tag_push_delete.json",
        &hook("Tag Push Hook"),
    )
    .await;
    assert_events(
        &r,
        "gitlab-org/hello-world",
        &[("delete", "refs/tags/v1.0.0", "2adc9465c4", Z, Some("tag"))],
    );
    // checkout_sha null with a non-zero `after`: GitLab's removed tag, a deletion.
    let r = deliver_fixture(
        &relay,
        "gitlab",
        "gitlab/tag_push_checkout_sha_null.json",
        &hook("Tag Push Hook"),
    )
    .await;
    assert_events(
        &r,
        "tomaszkolek0/my-awesome-project",
        &[("delete", "refs/tags/xyz", Z, "eb6ae1e591", Some("tag"))],
    );
    // The system-hook form of a push carries the same body.
    let r = deliver_fixture(&relay, "gitlab", "gitlab/push.json", &hook("System Hook")).await;
    assert_events(
        &r,
        "mike/diaspora",
        &[(
            "push",
            "refs/heads/master",
            "95790bf891",
            "da1560886d",
            None,
        )],
    );
    let r = deliver_fixture(
        &relay,
        "gitlab",
        "gitlab/push.json",
        &hook("Merge Request Hook"),
    )
    .await;
    assert_note(&r, "`Merge Request Hook` is not handled");
    // Without Idempotency-Key, X-Gitlab-Event-UUID; without either, a stable body hash.
    let r = deliver_fixture(
        &relay,
        "gitlab",
        "gitlab/push.json",
        &[
            ("X-Gitlab-Event", "Push Hook"),
            ("X-Gitlab-Event-UUID", "uuid-1"),
        ],
    )
    .await;
    assert_eq!(r.json()["delivery"], "uuid-1");
    let a = deliver_fixture(
        &relay,
        "gitlab",
        "gitlab/push.json",
        &[("X-Gitlab-Event", "Push Hook")],
    )
    .await
    .json();
    let b = deliver_fixture(
        &relay,
        "gitlab",
        "gitlab/push.json",
        &[("X-Gitlab-Event", "Push Hook")],
    )
    .await
    .json();
    assert!(a["delivery"].as_str().unwrap().starts_with("sha256-"));
    assert_eq!(a["delivery"], b["delivery"], "derived ids are stable");
}

#[tokio::test]
async fn gitlab_tokens_and_signing_tokens() {
    let relay = relay().await;
    let push = fixture("gitlab/push.json");
    let r = deliver(
        &relay,
        "gitlab",
        &[("X-Gitlab-Event", "Push Hook")],
        push.clone(),
    )
    .await;
    assert_eq!(r.status, 401);
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .contains("X-Gitlab-Token")
    );
    let r = deliver(
        &relay,
        "gitlab",
        &[("X-Gitlab-Event", "Push Hook"), ("X-Gitlab-Token", "wrong")],
        push.clone(),
    )
    .await;
    assert_eq!(r.status, 401);

    // A signing token: sign now, as GitLab would.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .to_string();
    let signature = standard_signature("msg_1", &now, &push);
    let headers = [
        ("X-Gitlab-Event", "Push Hook"),
        ("webhook-id", "msg_1"),
        ("webhook-timestamp", now.as_str()),
        ("webhook-signature", signature.as_str()),
    ];
    let r = deliver(&relay, "gitlab-signed", &headers, push.clone()).await;
    assert_events(
        &r,
        "mike/diaspora",
        &[(
            "push",
            "refs/heads/master",
            "95790bf891",
            "da1560886d",
            None,
        )],
    );
    assert_eq!(
        r.json()["delivery"],
        "msg_1",
        "the signed webhook-id is the delivery id"
    );
    // Replayed within the tolerance with a new, unsigned Idempotency-Key: still msg_1,
    // so a duplicate, and nothing is queued again.
    let replayed = [
        ("X-Gitlab-Event", "Push Hook"),
        ("Idempotency-Key", "something-new"),
        ("webhook-id", "msg_1"),
        ("webhook-timestamp", now.as_str()),
        ("webhook-signature", signature.as_str()),
    ];
    let r = deliver(&relay, "gitlab-signed", &replayed, push.clone()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["duplicate"], true, "{}", r.text());
    // The same request replayed with an old timestamp is refused.
    let old = "1614265330";
    let signature = standard_signature("msg_1", old, &push);
    let headers = [
        ("X-Gitlab-Event", "Push Hook"),
        ("webhook-id", "msg_1"),
        ("webhook-timestamp", old),
        ("webhook-signature", signature.as_str()),
    ];
    let r = deliver(&relay, "gitlab-signed", &headers, push.clone()).await;
    assert_eq!(r.status, 401);
    assert!(r.json()["message"].as_str().unwrap().contains("tolerance"));
    // Tampered body.
    let signature = standard_signature("msg_1", &now, &push);
    let headers = [
        ("X-Gitlab-Event", "Push Hook"),
        ("webhook-id", "msg_1"),
        ("webhook-timestamp", now.as_str()),
        ("webhook-signature", signature.as_str()),
    ];
    let mut tampered = push.clone();
    tampered[5] ^= 1;
    assert_eq!(
        deliver(&relay, "gitlab-signed", &headers, tampered)
            .await
            .status,
        401
    );
}

/// `v1,<base64 HMAC-SHA256 of "id.timestamp.body">` with Standard Webhooks' published key.
fn standard_signature(id: &str, timestamp: &str, body: &[u8]) -> String {
    use base64::Engine;
    use hmac::Mac;
    let key = base64::engine::general_purpose::STANDARD
        .decode(WHSEC.trim_start_matches("whsec_"))
        .unwrap();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

#[tokio::test]
async fn gitea_and_forgejo_every_fixture() {
    let relay = relay().await;
    let ev = |e| [("X-Gitea-Event", e), ("X-Gitea-Delivery", "d-1")];
    let r = deliver_fixture(&relay, "gitea", "gitea/push.json", &ev("push")).await;
    assert_events(
        &r,
        "example/example",
        &[("push", "refs/heads/master", Z, "67b56589a4", None)],
    );
    let r = deliver_fixture(&relay, "gitea", "gitea/delete_branch.json", &ev("delete")).await;
    assert_events(
        &r,
        "example/example",
        &[("delete", "refs/heads/example3", Z, Z, Some("branch"))],
    );
    let r = deliver_fixture(&relay, "gitea", "gitea/delete_tag.json", &ev("delete")).await;
    assert_note(&r, "acts on that `push`");
    for file in ["gitea/create_branch.json", "gitea/create_tag.json"] {
        let r = deliver_fixture(&relay, "gitea", file, &ev("create")).await;
        assert_note(&r, "acts on that `push`");
    }
    let r = deliver_fixture(
        &relay,
        "forgejo",
        "forgejo/push_branch_create.json",
        &[("X-Forgejo-Event", "push"), ("X-Forgejo-Delivery", "f-1")],
    )
    .await;
    assert_events(
        &r,
        "meisam/woodpecktester",
        &[("push", "refs/heads/fdsafdsa", Z, "28c3613ae6", None)],
    );
    assert_eq!(r.json()["delivery"], "f-1");
    // Notes name the sender as the configuration does.
    let r = deliver_fixture(
        &relay,
        "forgejo",
        "gitea/create_tag.json",
        &[("X-Forgejo-Event", "create"), ("X-Forgejo-Delivery", "f-2")],
    )
    .await;
    assert_note(
        &r,
        "Forgejo also sends a `push` event for a new branch or tag",
    );
    // Each of Gitea's signature headers works alone; an empty one counts as absent.
    let sig = signed_headers("gitea/push.json");
    for name in [
        "X-Gitea-Signature",
        "X-Forgejo-Signature",
        "X-Hub-Signature-256",
    ] {
        let value = &sig.iter().find(|(k, _)| k == name).unwrap().1;
        let r = deliver(
            &relay,
            "gitea",
            &[("X-Gitea-Event", "push"), (name, value)],
            fixture("gitea/push.json"),
        )
        .await;
        assert_eq!(r.status, 200, "{name}: {}", r.text());
    }
    let r = deliver(
        &relay,
        "gitea",
        &[
            ("X-Gitea-Event", "push"),
            ("X-Gitea-Signature", ""),
            ("X-Hub-Signature-256", "sha256="),
        ],
        fixture("gitea/push.json"),
    )
    .await;
    assert_eq!(r.status, 401);
    // Gitea also sends X-GitHub-Event: the configured provider decides, not the headers.
    let r = deliver_fixture(
        &relay,
        "gitea",
        "gitea/push.json",
        &[("X-GitHub-Event", "push")],
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .contains("X-Gitea-Event")
    );
}

/// Gitea's published push as `payload=<JSON>` (a form body, or a GET webhook's query),
/// and the `X-Gitea-Signature` Gitea sends with it: over the JSON, not the form.
fn gitea_push_as_form() -> (String, String) {
    let json = fixture("gitea/push.json");
    let form = form_urlencoded::Serializer::new(String::new())
        .append_pair("payload", std::str::from_utf8(&json).unwrap())
        .finish();
    let signed = signed_headers("gitea/push.json");
    let (_, signature) = signed
        .into_iter()
        .find(|(name, _)| name == "X-Gitea-Signature")
        .unwrap();
    (form, signature)
}

#[tokio::test]
async fn gitea_form_bodies_are_signed_over_the_payload_field() {
    let relay = relay().await;
    let (body, signature) = gitea_push_as_form();
    let headers = [
        ("content-type", "application/x-www-form-urlencoded"),
        ("X-Gitea-Event", "push"),
        ("X-Gitea-Signature", signature.as_str()),
    ];
    let r = post(&relay.url("/hooks/gitea"), &headers, body).await;
    assert_events(
        &r,
        "example/example",
        &[("push", "refs/heads/master", Z, "67b56589a4", None)],
    );
}

/// Gitea and Forgejo can deliver with `GET` ("HTTP Method: GET"): the JSON in the URL's
/// `payload` parameter (beside any parameter the webhook URL had), signed as with POST.
/// No other sender does, so a GET to their sources stays `405`.
#[tokio::test]
async fn gitea_and_forgejo_deliver_with_get_the_payload_in_the_url() {
    let relay = relay().await;
    let (query, signature) = gitea_push_as_form();
    for source in ["gitea", "forgejo"] {
        let headers = [
            ("X-Gitea-Event", "push"),
            ("X-Gitea-Delivery", source),
            ("X-Gitea-Signature", signature.as_str()),
        ];
        let url = relay.url(&format!("/hooks/{source}?{query}"));
        let r = send("GET", &url, &headers, Vec::new()).await;
        assert_events(
            &r,
            "example/example",
            &[("push", "refs/heads/master", Z, "67b56589a4", None)],
        );
        // The signature covers the payload: another payload is refused.
        let tampered = url.replace("master", "main");
        let r = send("GET", &tampered, &headers, Vec::new()).await;
        assert_eq!(r.status, 401, "{}", r.text());
        // Without a payload there is nothing to read.
        let r = send(
            "GET",
            &relay.url(&format!("/hooks/{source}?x=1")),
            &headers,
            Vec::new(),
        )
        .await;
        assert_eq!(r.status, 400, "{}", r.text());
        assert!(
            r.json()["message"]
                .as_str()
                .unwrap()
                .contains("`payload` parameter"),
            "{}",
            r.text()
        );
    }
    let r = send(
        "GET",
        &relay.url(&format!("/hooks/github?{query}")),
        &[],
        Vec::new(),
    )
    .await;
    assert_eq!(r.status, 405, "{}", r.text());
    assert_eq!(r.json()["message"], "GET is not allowed here; use POST");
    // `Allow` names what the source takes.
    for (source, allowed) in [("gitea", "POST, GET"), ("github", "POST")] {
        let r = send(
            "PUT",
            &relay.url(&format!("/hooks/{source}")),
            &[],
            Vec::new(),
        )
        .await;
        assert_eq!(r.status, 405, "{}", r.text());
        assert_eq!(r.headers["allow"], allowed);
    }
}

#[tokio::test]
async fn gogs_every_fixture() {
    let relay = relay().await;
    let ev = |e| [("X-Gogs-Event", e), ("X-Gogs-Delivery", "g-1")];
    let r = deliver_fixture(&relay, "gogs", "gogs/push.json", &ev("push")).await;
    assert_events(
        &r,
        "alice/moonlanding",
        &[("push", "refs/heads/main", "28e1879d02", "bffeb74224", None)],
    );
    let r = deliver_fixture(&relay, "gogs", "gogs/create_tag.json", &ev("create")).await;
    assert_events(
        &r,
        "gogits/hello-world",
        &[("tag", "refs/tags/v1.0.0", Z, "599d25c67b", None)],
    );
    let r = deliver_fixture(&relay, "gogs", "gogs/create_branch.json", &ev("create")).await;
    assert_note(&r, "acts on that `push`");
    let r = deliver_fixture(&relay, "gogs", "gogs/delete_branch.json", &ev("delete")).await;
    assert_events(
        &r,
        "gogits/hello-world",
        &[("delete", "refs/heads/feature", Z, Z, Some("branch"))],
    );
    let r = deliver_fixture(&relay, "gogs", "gogs/delete_tag.json", &ev("delete")).await;
    assert_events(
        &r,
        "celebi/test-repo",
        &[("delete", "refs/tags/v1.0.0-test", Z, Z, Some("tag"))],
    );
    let r = deliver(&relay, "gogs", &ev("push"), fixture("gogs/push.json")).await;
    assert_eq!(r.status, 401);
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .contains("X-Gogs-Signature")
    );
}

#[tokio::test]
async fn bitbucket_cloud_every_fixture() {
    let relay = relay().await;
    let ev = [("X-Event-Key", "repo:push"), ("X-Request-UUID", "b-1")];
    let r = deliver_fixture(
        &relay,
        "bitbucket",
        "bitbucket_cloud/repo_push_branch.json",
        &ev,
    )
    .await;
    assert_events(
        &r,
        "martinherren1984/publictestrepo",
        &[("push", "refs/heads/main", "a51241ae1f", "c14c1bb05d", None)],
    );
    assert_eq!(r.json()["delivery"], "b-1");
    let r = deliver_fixture(
        &relay,
        "bitbucket",
        "bitbucket_cloud/repo_push_branch_delete.json",
        &ev,
    )
    .await;
    assert_events(
        &r,
        "kolaszek/repository-name",
        &[(
            "delete",
            "refs/heads/master",
            "25f93d22b7",
            Z,
            Some("branch"),
        )],
    );
    let r = deliver_fixture(
        &relay,
        "bitbucket",
        "bitbucket_cloud/repo_push_tag.json",
        &ev,
    )
    .await;
    assert_events(
        &r,
        "kolaszek/repository-name",
        &[("tag", "refs/tags/a", Z, "450118afff", None)],
    );
    let r = deliver_fixture(
        &relay,
        "bitbucket",
        "bitbucket_cloud/repo_push_tag_delete.json",
        &ev,
    )
    .await;
    assert_events(
        &r,
        "kolaszek/repository-name",
        &[("delete", "refs/tags/a", "450118afff", Z, Some("tag"))],
    );
    let r = deliver_fixture(
        &relay,
        "bitbucket",
        "bitbucket_cloud/repo_push_tag.json",
        &[("X-Event-Key", "pullrequest:created")],
    )
    .await;
    assert_note(&r, "`pullrequest:created` is not handled");
    let r = deliver(
        &relay,
        "bitbucket",
        &ev,
        fixture("bitbucket_cloud/repo_push_tag.json"),
    )
    .await;
    assert_eq!(r.status, 401);
}

#[tokio::test]
async fn bitbucket_cloud_several_changes_become_several_events() {
    let relay = relay().await;
    let mut payload: Value =
        serde_json::from_slice(&fixture("bitbucket_cloud/repo_push_tag.json")).unwrap();
    let tag = payload["push"]["changes"][0].clone();
    let mut branch =
        serde_json::from_slice::<Value>(&fixture("bitbucket_cloud/repo_push_branch_delete.json"))
            .unwrap()["push"]["changes"][0]
            .clone();
    branch["old"]["name"] = json!("old-branch");
    payload["push"]["changes"] = json!([tag, branch]);
    let body = serde_json::to_vec(&payload).unwrap();
    let signature = sha256_signature(SECRET, &body);
    let r = deliver(
        &relay,
        "bitbucket",
        &[
            ("X-Event-Key", "repo:push"),
            ("X-Hub-Signature", signature.as_str()),
        ],
        body,
    )
    .await;
    assert_events(
        &r,
        "kolaszek/repository-name",
        &[
            ("tag", "refs/tags/a", Z, "450118afff", None),
            (
                "delete",
                "refs/heads/old-branch",
                "25f93d22b7",
                Z,
                Some("branch"),
            ),
        ],
    );
}

#[tokio::test]
async fn bitbucket_server_every_fixture() {
    let relay = relay().await;
    let ev = [
        ("X-Event-Key", "repo:refs_changed"),
        ("X-Request-Id", "s-1"),
    ];
    let r = deliver_fixture(
        &relay,
        "bitbucket-server",
        "bitbucket_server/refs_changed_branch.json",
        &ev,
    )
    .await;
    assert_events(
        &r,
        "DEV/deployment-automation",
        &[(
            "push",
            "refs/heads/renovate-all",
            "e0e15221b9",
            "76797d54bc",
            None,
        )],
    );
    let r = deliver_fixture(
        &relay,
        "bitbucket-server",
        "bitbucket_server/refs_changed_branch_delete.json",
        &ev,
    )
    .await;
    assert_events(
        &r,
        "~gopher/webhook-test",
        &[(
            "delete",
            "refs/heads/feature/wip",
            "32a0b8a740",
            Z,
            Some("branch"),
        )],
    );
    let r = deliver_fixture(
        &relay,
        "bitbucket-server",
        "bitbucket_server/refs_changed_tag_add.json",
        &ev,
    )
    .await;
    assert_events(
        &r,
        "PRJ/my-repo",
        &[("tag", "refs/tags/v1.1.0", Z, "823b2230a5", None)],
    );
    let r = deliver_fixture(
        &relay,
        "bitbucket-server",
        "bitbucket_server/refs_changed_tag_delete.json",
        &ev,
    )
    .await;
    assert_events(
        &r,
        "SBOX/sandbox",
        &[("delete", "refs/tags/test-tag", "b223099667", Z, Some("tag"))],
    );
    // "Test connection" arrives unsigned, even with a secret set: a ping, never an event.
    let r = deliver(
        &relay,
        "bitbucket-server",
        &[("X-Event-Key", "diagnostics:ping")],
        fixture("bitbucket_server/diagnostics_ping.json"),
    )
    .await;
    assert_note(&r, "ping received");
    let r = deliver(
        &relay,
        "bitbucket-server",
        &ev,
        fixture("bitbucket_server/refs_changed_tag_add.json"),
    )
    .await;
    assert_eq!(r.status, 401);
}

/// The `ci` source's signature: base64 of HMAC-SHA512.
fn sign_sha512_base64(body: &[u8]) -> String {
    use base64::Engine;
    let hex = hookrelay::sources::signature::hmac_hex(
        hookrelay::sources::signature::Algorithm::Sha512,
        SECRET.as_bytes(),
        body,
    );
    base64::engine::general_purpose::STANDARD.encode(hex::decode(hex).unwrap())
}

#[tokio::test]
async fn generic_senders() {
    let relay = relay().await;
    let body = br#"{"id":"evt-9","who":"robot","project":{"name":"acme/app"},"change":{"ref":"refs/tags/v2","sha":"abcdef0123456789abcdef0123456789abcdef01"}}"#.to_vec();
    let signature = sign_sha512_base64(&body);
    let r = deliver(
        &relay,
        "ci",
        &[("X-Signature", signature.as_str())],
        body.clone(),
    )
    .await;
    assert_events(
        &r,
        "acme/app",
        &[("tag", "refs/tags/v2", Z, "abcdef0123", None)],
    );
    assert_eq!(r.json()["delivery"], "evt-9");
    assert_eq!(r.json()["events"][0]["pusher"], "robot");
    assert_eq!(deliver(&relay, "ci", &[], body.clone()).await.status, 401);
    // An empty id field is no id: one derived from the body, not "" (which would make every
    // later webhook with an empty id a duplicate of the first).
    let empty_id = String::from_utf8(body.clone())
        .unwrap()
        .replace("evt-9", " ");
    let signature = sign_sha512_base64(empty_id.as_bytes());
    let r = deliver(
        &relay,
        "ci",
        &[("X-Signature", signature.as_str())],
        empty_id.clone().into_bytes(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["delivery"],
        hookrelay::sources::derived_delivery(empty_id.as_bytes())
    );

    let plain = br#"{"repository":{"full_name":"acme/lib"},"ref":"main","before":"1111111111111111111111111111111111111111","after":"2222222222222222222222222222222222222222"}"#.to_vec();
    let r = deliver(&relay, "ci-token", &[("X-Token", SECRET)], plain.clone()).await;
    assert_events(
        &r,
        "acme/lib",
        &[("push", "refs/heads/main", "1111111111", "2222222222", None)],
    );
    assert_eq!(
        deliver(&relay, "ci-token", &[("X-Token", "nope")], plain.clone())
            .await
            .status,
        401
    );

    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .to_string();
    let signature = standard_signature("m-2", &now, &plain);
    let r = deliver(
        &relay,
        "ci-standard",
        &[
            ("webhook-id", "m-2"),
            ("webhook-timestamp", now.as_str()),
            ("webhook-signature", signature.as_str()),
        ],
        plain.clone(),
    )
    .await;
    assert_events(
        &r,
        "acme/lib",
        &[("push", "refs/heads/main", "1111111111", "2222222222", None)],
    );
    let r = deliver(
        &relay,
        "ci-token",
        &[("X-Token", SECRET)],
        br#"{"ref":"main"}"#.to_vec(),
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .contains("no repository at `repository.full_name`")
    );
}

#[tokio::test]
async fn bad_requests() {
    let relay = relay().await;
    // A compressed body is refused before it is read, saying so (it would otherwise fail
    // as "not JSON"); `identity` is no coding.
    let r = deliver_fixture(
        &relay,
        "github",
        "github/push_tag.json",
        &[
            ("X-GitHub-Event", "push"),
            ("X-GitHub-Delivery", "compressed-1"),
            ("content-encoding", "gzip"),
        ],
    )
    .await;
    assert_eq!(r.status, 415, "{}", r.text());
    assert_eq!(r.headers["accept-encoding"], "identity");
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .contains("Content-Encoding: gzip, which hookrelay does not decode"),
        "{}",
        r.text()
    );
    let r = deliver_fixture(
        &relay,
        "github",
        "github/push_tag.json",
        &[
            ("X-GitHub-Event", "push"),
            ("X-GitHub-Delivery", "compressed-2"),
            ("content-encoding", "identity"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Unknown source.
    let r = deliver(&relay, "nowhere", &[], b"{}".to_vec()).await;
    assert_eq!(r.status, 404);
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .contains("no source named \"nowhere\"")
    );
    // Signed, but not JSON: 400 with line and column.
    let body = b"{\n  \"ref\": ]\n}".to_vec();
    let signature = sha256_signature(SECRET, &body);
    let r = deliver(
        &relay,
        "github",
        &[
            ("X-GitHub-Event", "push"),
            ("X-Hub-Signature-256", signature.as_str()),
        ],
        body,
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["message"],
        "the body is not valid JSON: expected value at line 2 column 10"
    );
    // Signed JSON that is not a push payload.
    let body = br#"{"ref": 5}"#.to_vec();
    let signature = sha256_signature(SECRET, &body);
    let r = deliver(
        &relay,
        "github",
        &[
            ("X-GitHub-Event", "push"),
            ("X-Hub-Signature-256", signature.as_str()),
        ],
        body,
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .contains("not a GitHub push payload"),
        "{}",
        r.text()
    );
    // A delivery id longer than the store indexes: 400, saying why (not 503 for ever).
    let long_id = "7".repeat(1025);
    let r = deliver_fixture(
        &relay,
        "github",
        "github/push_branch.json",
        &[("X-GitHub-Event", "push"), ("X-GitHub-Delivery", &long_id)],
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(
        r.json()["message"],
        "the delivery id is 1025 bytes long; hookrelay takes delivery ids of up to 1024 bytes (the senders' own are UUIDs, 36)"
    );
    let r = deliver_fixture(
        &relay,
        "github",
        "github/push_branch.json",
        &[
            ("X-GitHub-Event", "push"),
            ("X-GitHub-Delivery", &long_id[1..]),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "1024 bytes are taken: {}", r.text());
    // Missing event header.
    let r = deliver_fixture(&relay, "github", "github/push_branch.json", &[]).await;
    assert_eq!(r.status, 400);
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .contains("X-GitHub-Event header is missing")
    );
    // Wrong method.
    assert_eq!(
        send("GET", &relay.url("/hooks/github"), &[], "")
            .await
            .status,
        405
    );
}

#[tokio::test]
async fn hooks_bodies_over_the_limit_are_413() {
    let config = format!("[server]\nmax_body = \"4KiB\"\n{CONFIG}");
    let relay = Relay::start_with(&config, &FILES).await;
    let r = deliver_fixture(
        &relay,
        "github",
        "github/push_branch.json",
        &[("X-GitHub-Event", "push")],
    )
    .await;
    assert_eq!(r.status, 413);
}

#[tokio::test]
async fn a_secret_inside_an_old_gitea_payload_is_never_stored() {
    let relay = relay().await;
    let payload_secret = "l26Un7G7HXogLAvsyf2hOA4EMARSTsR3";
    assert!(String::from_utf8_lossy(&fixture("gitea/create_tag.json")).contains(payload_secret));
    let r = deliver_fixture(
        &relay,
        "gitea",
        "gitea/create_tag.json",
        &[
            ("X-Gitea-Event", "create"),
            ("X-Gitea-Delivery", "g-secret"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(!r.text().contains(payload_secret));
    let store = store_bytes(&relay.state());
    assert!(store.contains("g-secret"), "the delivery was stored");
    assert!(store.contains("gordon/hello-world"), "with its body");
    assert!(
        !store.contains(payload_secret),
        "but without the secret Gitea put in it"
    );
    assert!(!store.contains(SECRET));
}

#[tokio::test]
async fn a_source_without_url_refs_lets_no_webhook_url_choose_a_ref() {
    let relay = relay().await;
    let reply = signed_github(
        &relay.url("/hooks/github?ref=main"),
        SECRET,
        "push",
        "url-ref-1",
        "github/push_tag.json",
    )
    .await;
    assert_eq!(reply.status, 400, "{}", reply.text());
    let message = reply.json()["message"].as_str().unwrap().to_owned();
    assert!(message.contains("sets no url_refs"), "{message}");
}

/// While a secret is rotated, a source takes webhooks signed with (or carrying) either
/// the new secret or the old one, and nothing else.
#[tokio::test]
async fn a_secret_being_rotated_accepts_the_new_and_the_old() {
    let relay = relay().await;
    let body = fixture("github/push_tag.json");
    let url = relay.url("/hooks/github-rotating");
    for (secret, status) in [
        (NEW_SECRET, 200),
        (SECRET, 200),
        ("a-third-secret-0123456789", 401),
    ] {
        let reply = signed_github_body(&url, secret, "push", "r-1", body.clone()).await;
        assert_eq!(reply.status, status, "{secret}: {}", reply.text());
        if status == 401 {
            assert!(
                reply.json()["message"]
                    .as_str()
                    .unwrap()
                    .starts_with("the X-Hub-Signature-256 header does not match the body"),
                "{}",
                reply.text()
            );
        }
    }
    // A signature that cannot be read is refused as such, whatever the secrets.
    let reply = deliver(
        &relay,
        "github-rotating",
        &[
            ("X-GitHub-Event", "push"),
            ("X-Hub-Signature-256", "sha256=zz"),
        ],
        body,
    )
    .await;
    assert_eq!(reply.status, 401);
    assert!(
        reply.text().contains("not a valid signature"),
        "{}",
        reply.text()
    );

    let body = fixture("gitlab/push.json");
    for (token, status) in [
        (NEW_SECRET, 200),
        (SECRET, 200),
        ("a-third-secret-0123456789", 401),
    ] {
        let reply = deliver(
            &relay,
            "gitlab-rotating",
            &[("X-Gitlab-Event", "Push Hook"), ("X-Gitlab-Token", token)],
            body.clone(),
        )
        .await;
        assert_eq!(reply.status, status, "{token}: {}", reply.text());
    }
}

/// A signed GitHub push to the relay at `base` (`http://host:port`) from `forwarded_for`
/// (as a proxy in front of the relay says).
async fn github_push_via(base: &str, source: &str, forwarded_for: &[&str]) -> Reply {
    let body = fixture("github/push_tag.json");
    let signature = sha256_signature(SECRET, &body);
    let mut headers = vec![
        ("content-type", "application/json"),
        ("X-GitHub-Event", "push"),
        ("X-GitHub-Delivery", "allow-from-1"),
        ("X-Hub-Signature-256", signature.as_str()),
    ];
    headers.extend(
        forwarded_for
            .iter()
            .map(|value| ("X-Forwarded-For", *value)),
    );
    post(&format!("{base}/hooks/{source}"), &headers, body).await
}

const ALLOW_FROM: &str = r#"
[source.here]
provider = "github"
secret = "file:{dir}/secret"
allow_from = ["127.0.0.0/8", "::1"]

[source.elsewhere]
provider = "github"
secret = "file:{dir}/secret"
allow_from = ["192.0.2.0/24", "2001:db8::/32"]
"#;

/// `allow_from` takes webhooks from the addresses it lists and answers every other `403`
/// naming the address, before reading the body; a client's own `X-Forwarded-For` names
/// nobody unless the connection comes from a trusted proxy.
#[tokio::test]
async fn allow_from_takes_webhooks_only_from_the_addresses_it_lists() {
    let relay = Relay::start_with(ALLOW_FROM, &FILES).await;
    let reply = github_push_via(&relay.url(""), "here", &[]).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    for forwarded in [&[][..], &["192.0.2.5"][..]] {
        let reply = github_push_via(&relay.url(""), "elsewhere", forwarded).await;
        assert_eq!(reply.status, 403, "{}", reply.text());
        assert_eq!(
            reply.json()["message"],
            "127.0.0.1 may not send webhooks to this source: it is not among the addresses its allow_from lists"
        );
    }
    // Refused before its body is read: a body over [server] max_body is not answered 413.
    let url = relay.url("/hooks/elsewhere");
    let (status, text) = tokio::task::spawn_blocking(move || {
        curl(&[
            "--request",
            "POST",
            "--header",
            "X-GitHub-Event: push",
            "--header",
            "Content-Length: 30000000",
            "--data-binary",
            "x",
            "--max-time",
            "10",
            &url,
        ])
    })
    .await
    .unwrap();
    assert_eq!(status, 403, "{text}");

    let behind_proxy = format!("[server]\ntrusted_proxies = [\"127.0.0.1\"]\n{ALLOW_FROM}");
    let relay = Relay::start_with(&behind_proxy, &FILES).await;
    for (forwarded, status, client) in [
        (&["192.0.2.5"][..], 200, ""),
        (&["[2001:db8::9]:4711"][..], 200, ""),
        // What the client wrote left of what the proxy added is not read.
        (&["192.0.2.5, 203.0.113.1"][..], 403, "203.0.113.1"),
        (&["192.0.2.5", "203.0.113.1"][..], 403, "203.0.113.1"),
        (&[][..], 403, "127.0.0.1"),
    ] {
        let reply = github_push_via(&relay.url(""), "elsewhere", forwarded).await;
        assert_eq!(reply.status, status, "{forwarded:?}: {}", reply.text());
        if status == 403 {
            let message = reply.json()["message"].as_str().unwrap().to_owned();
            assert!(
                message.starts_with(&format!("{client} may not")),
                "{message}"
            );
        }
    }
}

/// Behind a trusted proxy the log lines name the client beside the proxy, and a reload
/// changes allow_from: the real binary.
#[tokio::test]
async fn log_lines_name_the_client_a_trusted_proxy_forwarded_for() {
    let dir = tempfile::tempdir().unwrap();
    common::binary::write(dir.path(), "secret", SECRET);
    let config = format!("[server]\ntrusted_proxies = [\"127.0.0.1\"]\n{ALLOW_FROM}")
        .replace("{dir}", dir.path().to_str().unwrap());
    common::binary::write(dir.path(), "relay.toml", &config);
    let mut served = common::binary::Served::start(dir.path(), &dir.path().join("state"));
    let address = served.address();
    let base = format!("http://{address}");
    let reply = github_push_via(&base, "elsewhere", &["192.0.2.5"]).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let line = served.wait_for("client=192.0.2.5");
    assert!(line.contains("peer=127.0.0.1"), "{line}");
    let reply = github_push_via(&base, "elsewhere", &["203.0.113.1"]).await;
    assert_eq!(reply.status, 403, "{}", reply.text());
    let line = served.wait_for("client=203.0.113.1");
    assert!(line.contains("request refused"), "{line}");
    // allow_from changes at a reload: the file watch takes the new list within a second.
    let config = config.replace(
        "[\"192.0.2.0/24\", \"2001:db8::/32\"]",
        "[\"203.0.113.0/24\"]",
    );
    common::binary::write(dir.path(), "relay.toml", &config);
    served.wait_for("configuration reloaded");
    let reply = github_push_via(&base, "elsewhere", &["203.0.113.1"]).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let reply = github_push_via(&base, "elsewhere", &["192.0.2.5"]).await;
    assert_eq!(reply.status, 403, "{}", reply.text());
    served.terminate();
}
