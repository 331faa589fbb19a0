//! `allow_from = ["github"]`: the real binary reads GitHub's published webhook addresses
//! from a stand-in for `api.github.com/meta` (`HOOKRELAY_GITHUB_META_URL`), admits and
//! refuses by them, reads them again conditionally, keeps the last list for a start while
//! GitHub cannot be reached, and refuses with `503` while it knows none. Relays sharing
//! PostgreSQL keep the list in the database, for each other and for their next start.

mod common;
#[path = "../src/store/postgres/test_server.rs"]
mod pg;

use std::path::Path;
use std::process::Command;

use common::binary::{BIN, Served, write};
use common::{Answer, RecordingUpstream, signed_github};

const SECRET: &str = "s3cret-for-the-tests";

/// Starts the relay on `state` with GitHub's meta at `meta_url`.
fn start(config: &Path, state: &Path, meta_url: &str) -> Served {
    let mut command = Command::new(BIN);
    command.env("HOOKRELAY_GITHUB_META_URL", meta_url);
    Served::start_with(command, config, state)
}

/// A signed GitHub webhook from this machine (127.0.0.1): its answer's status and body.
async fn webhook(served: &mut Served, delivery: &str) -> (u16, String, Option<String>) {
    let reply = signed_github(
        &format!("http://{}/hooks/github", served.address()),
        SECRET,
        "push",
        delivery,
        "github/push_tag.json",
    )
    .await;
    let retry_after = reply
        .headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (reply.status, reply.text(), retry_after)
}

/// `hookrelay_github_hooks_age_seconds` as the relay's `/metrics` says it.
async fn age_of_the_list(served: &mut Served) -> f64 {
    let scrape = common::send(
        "GET",
        &format!("http://{}/metrics", served.address()),
        &[],
        "",
    )
    .await
    .text();
    hookrelay::metrics::sample(
        &scrape,
        "hookrelay_github_hooks_age_seconds{list=\"hooks\"} ",
    )
    .unwrap_or_else(|| panic!("no age of GitHub's list in {scrape}"))
}

fn meta(hooks: &[&str], etag: &str) -> Answer {
    Answer::new(
        200,
        &serde_json::json!({ "hooks": hooks, "web": ["203.0.113.0/24"] }).to_string(),
    )
    .header("etag", etag)
}

/// A configuration folder with one GitHub source fenced by GitHub's addresses, and
/// `extra` after it.
fn fenced_by_github(extra: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "secret", SECRET);
    write(
        dir.path(),
        "relay.toml",
        &format!(
            "[source.github]\nprovider = \"github\"\nsecret = \"file:{}/secret\"\nallow_from = [\"github\"]\n{extra}",
            dir.path().display()
        ),
    );
    dir
}

/// A meta URL on which nothing listens: GitHub cannot be reached.
fn unreachable_meta() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("http://{}/meta", listener.local_addr().unwrap())
}

/// Multi-threaded: the stand-in answers while the test waits for the relay's log lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn githubs_published_addresses_admit_refuse_and_are_kept() {
    let dir = fenced_by_github("");
    let state = dir.path().join("state");
    let github = RecordingUpstream::start().await;
    let meta_url = format!("{}/meta", github.url());

    // GitHub's list does not include this machine: refused, naming the address.
    github.answer_next(meta(&["192.0.2.0/24", "2001:db8::/32"], "\"v1\""));
    let mut served = start(dir.path(), &state, &meta_url);
    served.wait_for("GitHub's webhook addresses read");
    let (status, body, _) = webhook(&mut served, "gh-1").await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("127.0.0.1 may not send webhooks"), "{body}");
    drop(served);
    let asked = github.received();
    assert_eq!(asked.len(), 1);
    assert_eq!(asked[0].method, "GET");
    assert_eq!(asked[0].path_and_query, "/meta");

    // Read again at the next start, conditionally on what was kept: now it does.
    github.answer_next(meta(&["127.0.0.0/8"], "\"v2\""));
    let mut served = start(dir.path(), &state, &meta_url);
    served.wait_for("GitHub's webhook addresses read");
    let (status, body, _) = webhook(&mut served, "gh-2").await;
    assert_eq!(status, 200, "{body}");
    let age = age_of_the_list(&mut served).await;
    assert!((0.0..60.0).contains(&age), "just read: {age}");
    drop(served);
    let asked = github.received();
    assert_eq!(
        asked[1]
            .headers
            .get("if-none-match")
            .and_then(|v| v.to_str().ok()),
        Some("\"v1\""),
        "a conditional read, which GitHub's rate limit does not count"
    );

    // Unchanged (304): the kept list stays in use, and is as current as a new read. The
    // kept copy says it was read two days ago: GitHub's saying it is unchanged starts its
    // age again (before, a list GitHub had not changed read as stale after a day).
    let kept = state.join("github-hooks.json");
    let mut copy: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&kept).unwrap()).unwrap();
    let two_days_ago = chrono::Utc::now().timestamp_millis() - 2 * 86_400_000;
    copy["read_at_ms"] = two_days_ago.into();
    std::fs::write(&kept, copy.to_string()).unwrap();
    github.answer_next(Answer::new(304, ""));
    let mut served = start(dir.path(), &state, &meta_url);
    served.wait_for("GitHub's webhook addresses, as last read");
    github.wait_for_calls(3).await;
    let (status, body, _) = webhook(&mut served, "gh-3").await;
    assert_eq!(status, 200, "{body}");
    let mut age = f64::MAX;
    for _ in 0..100 {
        age = age_of_the_list(&mut served).await;
        if age < 60.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(age < 60.0, "confirmed unchanged just now: {age}");
    drop(served);
    let copy: serde_json::Value = serde_json::from_slice(&std::fs::read(&kept).unwrap()).unwrap();
    assert!(
        copy["read_at_ms"].as_i64().unwrap() > two_days_ago + 86_400_000,
        "the kept copy says so too, for the next start: {copy}"
    );
    assert_eq!(
        github.received()[2]
            .headers
            .get("if-none-match")
            .and_then(|v| v.to_str().ok()),
        Some("\"v2\"")
    );

    // GitHub cannot be reached: the kept list still admits.
    let closed = unreachable_meta();
    let mut served = start(dir.path(), &state, &closed);
    served.wait_for("GitHub's webhook addresses could not be read");
    let (status, body, _) = webhook(&mut served, "gh-4").await;
    assert_eq!(status, 200, "{body}");
    drop(served);

    // Nothing kept and GitHub unreachable: refused with 503 until a list is known.
    let mut served = start(dir.path(), &dir.path().join("fresh-state"), &closed);
    served.wait_for("GitHub's webhook addresses could not be read");
    let (status, body, retry_after) = webhook(&mut served, "gh-5").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("GitHub's webhook addresses are not known yet")
            && body.contains("reading http://127.0.0.1:"),
        "{body}"
    );
    assert_eq!(retry_after.as_deref(), Some("60"));
    let age = age_of_the_list(&mut served).await;
    assert_eq!(age, -1.0, "none known");
}

/// A reload that adds `"github"` has the list read at once, not at the next hour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_asks_for_githubs_addresses_reads_them_at_once() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "secret", SECRET);
    let source = format!(
        "[source.github]\nprovider = \"github\"\nsecret = \"file:{}/secret\"\n",
        dir.path().display()
    );
    write(dir.path(), "relay.toml", &source);
    let github = RecordingUpstream::start().await;
    github.answer_next(meta(&["192.0.2.0/24"], "\"v1\""));
    let mut served = start(
        dir.path(),
        &dir.path().join("state"),
        &format!("{}/meta", github.url()),
    );
    let (status, body, _) = webhook(&mut served, "gh-r1").await;
    assert_eq!(status, 200, "{body}");
    assert!(github.received().is_empty(), "no source needs the list yet");
    write(
        dir.path(),
        "relay.toml",
        &format!("{source}allow_from = [\"github\"]\n"),
    );
    served.wait_for("GitHub's webhook addresses read");
    let (status, body, _) = webhook(&mut served, "gh-r2").await;
    assert_eq!(status, 403, "{body}");
}

/// Relays sharing PostgreSQL: a list one relay read serves another started later while
/// GitHub cannot be reached (on another machine, a state folder of its own), and that
/// relay's read is conditional on the kept list's `ETag`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_sharing_postgresql_keep_githubs_addresses_in_the_database() {
    let Some(database) = tokio::task::block_in_place(pg::Database::create) else {
        return;
    };
    let dir = fenced_by_github(&format!("[store]\nurl = \"{}\"\n", database.url));
    let github = RecordingUpstream::start().await;
    let meta_url = format!("{}/meta", github.url());
    github.answer_next(meta(&["127.0.0.0/8"], "\"v1\""));
    let mut first = start(dir.path(), &dir.path().join("state-1"), &meta_url);
    first.wait_for("GitHub's webhook addresses read");
    let (status, body, _) = webhook(&mut first, "gh-pg-1").await;
    assert_eq!(status, 200, "{body}");
    drop(first);

    // GitHub cannot be reached: the list the first relay kept in the database admits.
    let closed = unreachable_meta();
    let mut second = start(dir.path(), &dir.path().join("state-2"), &closed);
    second.wait_for("GitHub's webhook addresses, as last read");
    second.wait_for("GitHub's webhook addresses could not be read");
    let (status, body, _) = webhook(&mut second, "gh-pg-2").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        !dir.path()
            .join("state-1")
            .join("github-hooks.json")
            .exists()
            && !dir
                .path()
                .join("state-2")
                .join("github-hooks.json")
                .exists(),
        "kept in the database, not in a state folder"
    );
    drop(second);

    // Unchanged (304) for a third relay: its read was conditional on the kept ETag.
    github.answer_next(Answer::new(304, ""));
    let mut third = start(dir.path(), &dir.path().join("state-3"), &meta_url);
    github.wait_for_calls(2).await;
    let (status, body, _) = webhook(&mut third, "gh-pg-3").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        github.received()[1]
            .headers
            .get("if-none-match")
            .and_then(|v| v.to_str().ok()),
        Some("\"v1\"")
    );
}
