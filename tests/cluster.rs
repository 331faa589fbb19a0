//! Several real `hookrelay serve` processes on one PostgreSQL: the guarantees of one relay
//! must hold for all of them together, through kills, freezes, cut connections and a
//! database restart. Every test is bounded in requests and time, and talks only to
//! 127.0.0.1.
//!
//! The relays share a throwaway PostgreSQL started by the tests (see
//! `src/store/postgres/test_server.rs`); where none can run, each test says so and
//! returns; CI sets `HOOKRELAY_REQUIRE_POSTGRES=1`, which turns that into a failure.

mod common;
#[path = "../src/store/postgres/test_server.rs"]
mod pg;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::binary::*;
use common::*;

const SECRET: &str = "s3cret-for-the-tests";

/// A configuration folder for relays on `database`: the durable test configuration (one
/// rule: every GitHub push → acme/app on main, with its delivery id as a variable) and a
/// `[store]` with a short lease.
fn cluster_config(dir: &Path, upstream: &str, database: &str, lease: &str) {
    durable_config(dir, upstream);
    write(
        dir,
        "store.toml",
        &format!("[store]\nurl = \"{database}\"\nlease = \"{lease}\"\n"),
    );
}

/// A database of the test's own on the shared server (the client blocks: off the runtime).
fn database() -> Option<pg::Database> {
    tokio::task::block_in_place(pg::Database::create)
}

/// Relay number `n` of a cluster configured in `dir` (each with a state folder of its own,
/// which PostgreSQL mode leaves unused).
fn relay(dir: &Path, n: usize) -> Served {
    let mut command = Command::new(BIN);
    command.env("HOOKRELAY_TEST_TOKEN", "glptt-test");
    Served::start_with(command, dir, &dir.join(format!("state-{n}")))
}

async fn push(address: &str, delivery: &str) -> Reply {
    let url = format!("http://{address}/hooks/github");
    signed_github(&url, SECRET, "push", delivery, "github/push_tag.json").await
}

/// How many calls the upstream received for each delivery id.
fn calls_per_delivery(upstream: &RecordingUpstream) -> BTreeMap<String, usize> {
    let mut calls = BTreeMap::new();
    for received in upstream.received() {
        if let Some(delivery) = received.json()["variables"]["DELIVERY"].as_str() {
            *calls.entry(delivery.to_owned()).or_insert(0) += 1;
        }
    }
    calls
}

/// Waits (at most `limit`) until `done` holds.
async fn eventually(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The store's rows, as `hookrelay deliveries --store URL` lists them.
fn rows(url: &str) -> Vec<hookrelay::outbox::DeliveryRow> {
    let store = hookrelay::store::StoreLocation::Postgres(
        hookrelay::store::postgres::PostgresConfig::new(url),
    );
    tokio::task::block_in_place(|| hookrelay::outbox::list(&store, false, 1000)).unwrap()
}

fn sigstop(relay: &Served, signal: &str) {
    Command::new("kill")
        .args([signal, &relay.child.id().to_string()])
        .status()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_delivery_sent_to_every_relay_at_once_is_queued_once() {
    let Some(database) = database() else {
        return;
    };
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    cluster_config(dir.path(), &upstream.url(), &database.url, "5s");
    let mut relays: Vec<Served> = (0..3).map(|n| relay(dir.path(), n)).collect();
    let addresses: Vec<String> = relays.iter_mut().map(Served::address).collect();
    for round in 0..5 {
        let delivery = format!("same-{round}");
        let replies = futures_util::future::join_all(
            addresses.iter().map(|address| push(address, &delivery)),
        )
        .await;
        let queued = replies
            .iter()
            .filter(|r| r.status == 202 && r.json()["duplicate"] != true)
            .count();
        let duplicates = replies
            .iter()
            .filter(|r| r.json()["duplicate"] == true)
            .count();
        assert_eq!(
            (queued, duplicates),
            (1, 2),
            "{:?}",
            replies.iter().map(Reply::text).collect::<Vec<_>>()
        );
    }
    eventually(Duration::from_secs(10), "five calls", || {
        upstream.received().len() >= 5
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let calls = calls_per_delivery(&upstream);
    assert_eq!(calls.len(), 5, "{calls:?}");
    assert!(calls.values().all(|&n| n == 1), "{calls:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_relays_racing_for_one_key_send_one_at_a_time_and_each_once() {
    let Some(database) = database() else {
        return;
    };
    let upstream = RecordingUpstream::start().await;
    *upstream.default_delay.lock().unwrap() = Duration::from_millis(5);
    let dir = tempfile::tempdir().unwrap();
    cluster_config(dir.path(), &upstream.url(), &database.url, "5s");
    let mut relays: Vec<Served> = (0..4).map(|n| relay(dir.path(), n)).collect();
    let addresses: Vec<String> = relays.iter_mut().map(Served::address).collect();
    // 200 webhooks for one project+ref, round robin over the relays, 16 at a time.
    let total = 200;
    let mut sent = 0;
    while sent < total {
        let batch: Vec<_> = (sent..(sent + 16).min(total))
            .map(|i| {
                let address = addresses[i % addresses.len()].clone();
                async move { push(&address, &format!("race-{i}")).await.status }
            })
            .collect();
        for status in futures_util::future::join_all(batch).await {
            assert_eq!(status, 202);
        }
        sent += 16;
    }
    eventually(Duration::from_secs(60), "every webhook sent", || {
        calls_per_delivery(&upstream).len() >= total
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let calls = calls_per_delivery(&upstream);
    assert_eq!(calls.len(), total);
    assert!(calls.values().all(|&n| n == 1), "sent twice: {calls:?}");
    assert_eq!(
        upstream.max_concurrent.load(Ordering::SeqCst),
        1,
        "two triggers of one project+ref were in flight at once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_while_sending_is_taken_over_after_its_lease() {
    let Some(database) = database() else {
        return;
    };
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    cluster_config(dir.path(), &upstream.url(), &database.url, "2s");
    let mut a = relay(dir.path(), 0);
    let address_a = a.address();
    // GitLab stalls on the first call, which only relay A is running to make.
    upstream.answer_next(Answer::created().delayed(Duration::from_secs(30)));
    assert_eq!(push(&address_a, "held").await.status, 202);
    assert_eq!(push(&address_a, "behind").await.status, 202);
    eventually(Duration::from_secs(10), "A sends the first", || {
        upstream.received().len() == 1
    })
    .await;
    let mut b = relay(dir.path(), 1);
    let address_b = b.address();
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    let killed = Instant::now();
    assert_eq!(push(&address_b, "after").await.status, 202);
    eventually(Duration::from_secs(15), "B takes the key over", || {
        calls_per_delivery(&upstream).len() == 3
    })
    .await;
    let taken_over = killed.elapsed();
    assert!(
        taken_over >= Duration::from_millis(1500),
        "taken over after {taken_over:?}, before the 2 s lease ran out"
    );
    let order: Vec<String> = upstream
        .received()
        .iter()
        .filter_map(|r| {
            r.json()["variables"]["DELIVERY"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    // The held trigger is sent again (it was in flight when A died: at least once), and
    // nothing of its key went before it.
    assert_eq!(order, ["held", "held", "behind", "after"]);
    let (code, lines) = b.terminate();
    assert_eq!(code, Some(0), "{lines:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_relay_is_fenced_out_when_it_wakes() {
    let Some(database) = database() else {
        return;
    };
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    cluster_config(dir.path(), &upstream.url(), &database.url, "2s");
    let mut a = relay(dir.path(), 0);
    let address_a = a.address();
    upstream.answer_next(Answer::created().delayed(Duration::from_secs(4)));
    assert_eq!(push(&address_a, "frozen").await.status, 202);
    eventually(Duration::from_secs(10), "A sends", || {
        upstream.received().len() == 1
    })
    .await;
    sigstop(&a, "-STOP");
    let mut b = relay(dir.path(), 1);
    let _ = b.address();
    eventually(
        Duration::from_secs(15),
        "B takes the frozen key over",
        || upstream.received().len() == 2,
    )
    .await;
    // B's send is recorded; then A wakes up, gets GitLab's late answer, and must not
    // overwrite what B recorded.
    tokio::time::sleep(Duration::from_millis(500)).await;
    sigstop(&a, "-CONT");
    a.wait_for("an outcome arrived for a claim that is no longer current");
    let rows = rows(&database.url);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].state.as_deref(), Some("sent"));
    assert_eq!(rows[0].attempts, 2, "A's claim, then B's");
    assert_eq!(upstream.received().len(), 2);
}
