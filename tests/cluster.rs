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

/// A configuration folder for relays on `database`: one rule (every GitHub push →
/// acme/app on main, with its delivery id as a variable, so the upstream shows which
/// deliveries arrived), the gateway, and a `[store]` with a short lease. `upstream_extra`
/// goes into `[upstream.gitlab]`, `gateway_extra` into `[gateway]`.
fn cluster_config_with(
    dir: &Path,
    upstream: &str,
    database: &str,
    lease: &str,
    upstream_extra: &str,
    gateway_extra: &str,
) {
    write(dir, "secret", SECRET);
    write(
        dir,
        "relay.toml",
        &format!(
            "[upstream.gitlab]\nurl = \"{upstream}\"\ntimeout = \"1s\"\n{upstream_extra}\n\
             [gateway]\nupstream = \"gitlab\"\n{gateway_extra}\n\
             [source.github]\nprovider = \"github\"\nsecret = \"file:{}\"\n\
             [delivery]\nretry_base = \"50ms\"\nretry_cap = \"200ms\"\n\
             [[rule]]\nname = \"all\"\nsource = \"github\"\n[rule.trigger]\nproject = \"acme/app\"\nref = \"main\"\n\
             token = \"env:HOOKRELAY_TEST_TOKEN\"\nvariables = {{ DELIVERY = \"{{{{ event.delivery }}}}\" }}\n",
            dir.join("secret").display()
        ),
    );
    write(
        dir,
        "store.toml",
        &format!("[store]\nurl = \"{database}\"\nlease = \"{lease}\"\n"),
    );
}

/// Relays on event loops (on PostgreSQL they serve on tokio's shared workers unless asked):
/// nothing on a loop may wait on the database with its thread.
fn on_event_loops(dir: &Path) {
    write(dir, "server.toml", "[server]\nevent_loops = 2\n");
}

fn cluster_config(dir: &Path, upstream: &str, database: &str, lease: &str) {
    cluster_config_with(dir, upstream, database, lease, PLAIN, "");
}

/// What every test stands on: a database of its own on the shared server, a recording
/// upstream, and a folder for the configuration.
struct Setup {
    database: pg::Database,
    upstream: RecordingUpstream,
    dir: tempfile::TempDir,
}

/// A rule firing every second, its occurrence in `variables[AT]`.
const EVERY_SECOND: &str = "[[rule]]\nname = \"every-second\"\nschedule = \"* * * * * *\"\n[rule.trigger]\n\
     project = \"77\"\nref = \"main\"\ntoken = \"env:HOOKRELAY_TEST_TOKEN\"\nvariables = { AT = \"{{ schedule.time }}\" }\n";

/// The upstream's limit where a test does not care: high enough never to pace it.
const PLAIN: &str = "limit = { per_project = \"1000/s\" }";

impl Setup {
    /// With the relays' configuration written (see [`cluster_config_with`]); `None` (the
    /// test is skipped) where no PostgreSQL can run.
    async fn new(lease: &str, upstream_extra: &str, gateway_extra: &str) -> Option<Setup> {
        Some(Setup::on(database()?, lease, upstream_extra, gateway_extra).await)
    }

    /// [`Setup::new`] on a given database (a server of the test's own).
    async fn on(
        database: pg::Database,
        lease: &str,
        upstream_extra: &str,
        gateway_extra: &str,
    ) -> Setup {
        let setup = Setup {
            database,
            upstream: RecordingUpstream::start().await,
            dir: tempfile::tempdir().unwrap(),
        };
        cluster_config_with(
            setup.dir.path(),
            &setup.upstream.url(),
            &setup.database.url,
            lease,
            upstream_extra,
            gateway_extra,
        );
        setup
    }
}

/// A copy of the cluster configuration in `dir` (its relay.toml, store.toml and secret,
/// paths pointing at the copy), with relay.toml changed by `change`: a relay configured
/// apart from the others.
fn copied_config(dir: &Path, change: impl FnOnce(String) -> String) -> tempfile::TempDir {
    let copy = tempfile::tempdir().unwrap();
    for file in ["relay.toml", "store.toml", "secret"] {
        std::fs::copy(dir.join(file), copy.path().join(file)).unwrap();
    }
    let text = std::fs::read_to_string(copy.path().join("relay.toml"))
        .unwrap()
        .replace(dir.to_str().unwrap(), copy.path().to_str().unwrap());
    write(copy.path(), "relay.toml", &change(text));
    copy
}

/// `count` relays configured in `dir`, started, and their addresses.
fn start_relays(dir: &Path, count: usize) -> (Vec<Served>, Vec<String>) {
    let mut relays: Vec<Served> = (0..count).map(|n| relay(dir, n)).collect();
    let addresses = relays.iter_mut().map(Served::address).collect();
    (relays, addresses)
}

/// A database on a server of the test's own (the client blocks: off the runtime).
fn own_database(server: &pg::Server) -> pg::Database {
    tokio::task::block_in_place(|| server.database())
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
    for delivery in upstream.received().iter().filter_map(delivery_of) {
        *calls.entry(delivery).or_insert(0) += 1;
    }
    calls
}

/// Pushes two webhooks a round until both are acknowledged (at most 15 s, the relays
/// recovering from `what`); their delivery ids.
async fn acknowledged_again(addresses: &[String], what: &str) -> Vec<String> {
    let start = Instant::now();
    loop {
        let prefix = format!("after-{}", start.elapsed().as_millis());
        let (acknowledged, _) = push_many(addresses, &prefix, 2, 2).await;
        if acknowledged.len() == 2 {
            return acknowledged;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "no recovery after {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits (at most `limit`) until every delivery in `acknowledged` reached the upstream.
async fn all_sent(upstream: &RecordingUpstream, acknowledged: &[String], limit: Duration) {
    eventually(limit, "every acknowledged webhook sent", || {
        let calls = calls_per_delivery(upstream);
        acknowledged.iter().all(|d| calls.contains_key(d))
    })
    .await;
}

/// The store's rows, as `hookrelay deliveries --store URL` lists them.
fn rows(url: &str) -> Vec<hookrelay::outbox::DeliveryRow> {
    let store = hookrelay::store::StoreLocation::Postgres(
        hookrelay::store::postgres::PostgresConfig::new(url),
    );
    tokio::task::block_in_place(|| listed(&store, false, 1000)).unwrap()
}

/// One relay configured in `dir`, started, and two webhooks it acknowledged: a relay
/// known to work before a test's fault.
async fn one_relay_that_took_two(dir: &Path) -> (Vec<Served>, Vec<String>, Vec<String>) {
    let (relays, addresses) = start_relays(dir, 1);
    let (before, refused) = push_many(&addresses, "before", 2, 2).await;
    assert_eq!((before.len(), refused), (2, 0));
    (relays, addresses, before)
}

/// The token of the dashboards [`with_dashboard`] configures.
const DASHBOARD_TOKEN: &str = "admin-token-for-the-tests-0123";

/// A dashboard on every relay configured in `dir` (`[admin]` on port 0, its token in a
/// file).
fn with_dashboard(dir: &Path) {
    write(dir, "dashboard-token", DASHBOARD_TOKEN);
    write(
        dir,
        "admin.toml",
        &format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"file:{}\"\n",
            dir.join("dashboard-token").display()
        ),
    );
}

/// `GET path` on a relay's dashboard, with its token.
async fn dashboard_get(relay: &mut Served, path: &str) -> Reply {
    let url = format!("http://{}{path}", relay.dashboard_address());
    let bearer = format!("Bearer {DASHBOARD_TOKEN}");
    send("GET", &url, &[("authorization", &bearer)], "").await
}

/// Runs `sql` on the database at `url`, over a connection of its own opened and closed
/// off the runtime (a DBA's change while the relays run).
fn run_sql(url: &str, sql: &str) {
    tokio::task::block_in_place(|| {
        let mut admin = postgres::Client::connect(url, postgres::NoTls).unwrap();
        admin.batch_execute(sql).unwrap();
    })
}

fn sigstop(relay: &Served, signal: &str) {
    Command::new("kill")
        .args([signal, &relay.child.id().to_string()])
        .status()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_delivery_sent_to_every_relay_at_once_is_queued_once() {
    let Some(Setup {
        database: _database,
        upstream,
        dir,
    }) = Setup::new("5s", PLAIN, "").await
    else {
        return;
    };
    let (_relays, addresses) = start_relays(dir.path(), 3);
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
    let Some(Setup {
        database: _database,
        upstream,
        dir,
    }) = Setup::new("5s", PLAIN, "").await
    else {
        return;
    };
    *upstream.default_delay.lock().unwrap() = Duration::from_millis(5);
    let (mut relays, addresses) = start_relays(dir.path(), 4);
    relays[0].wait_for("event_loops=0");
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

/// Four relays race for one project+ref while one of them talks to the database through a
/// connection that delivers everything 1.2 s late: its claims and records commit after its
/// lease (2 s) may have run out. Fencing keeps one call in flight at a time; every
/// acknowledged webhook is sent; a repeat is allowed only for the slowed relay's send in
/// flight when its record came too late (at-least-once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_relays_racing_with_one_whose_commits_arrive_late() {
    let Some(Setup {
        database,
        upstream,
        dir,
    }) = Setup::new("2s", PLAIN, "").await
    else {
        return;
    };
    *upstream.default_delay.lock().unwrap() = Duration::from_millis(5);
    let (proxy, through_proxy) = Proxy::before(&database).await;
    let slowed = copied_config(dir.path(), |text| text);
    write(
        slowed.path(),
        "store.toml",
        &format!("[store]\nurl = \"{through_proxy}\"\nlease = \"2s\"\n"),
    );
    let (_fast, mut addresses) = start_relays(dir.path(), 3);
    let mut late = relay(slowed.path(), 3);
    addresses.push(late.address());

    let (mut acknowledged, refused) = push_many(&addresses, "before", 20, 4).await;
    assert_eq!((acknowledged.len(), refused), (20, 0));
    // The fourth relay's commits now arrive late, for 8 s, while webhooks keep coming to the
    // other three (the fourth keeps claiming: its claims are the ones that land late).
    proxy.slow(true);
    // Webhooks to the slowed relay too: their commits (and so their acknowledgements) come
    // late, while the other three keep accepting and sending.
    let late_pushes = {
        let slowed_relay = vec![addresses[3].clone()];
        tokio::spawn(async move { push_many(&slowed_relay, "late", 3, 3).await })
    };
    let fast = addresses[..3].to_vec();
    let (during, refused) = push_many(&fast, "slowed", 60, 3).await;
    assert_eq!((during.len(), refused), (60, 0));
    acknowledged.extend(during);
    tokio::time::sleep(Duration::from_secs(4)).await;
    proxy.slow(false);
    let (late_acknowledged, refused) = late_pushes.await.unwrap();
    assert_eq!(late_acknowledged.len() + refused, 3);
    assert!(
        !late_acknowledged.is_empty(),
        "the slowed relay acknowledged once its commits landed"
    );
    acknowledged.extend(late_acknowledged);
    let (after, refused) = push_many(&addresses, "after", 20, 4).await;
    assert_eq!((after.len(), refused), (20, 0));
    acknowledged.extend(after);
    all_sent(&upstream, &acknowledged, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        upstream.max_concurrent.load(Ordering::SeqCst),
        1,
        "two triggers of one project+ref were in flight at once"
    );
    let repeated: Vec<(String, usize)> = calls_per_delivery(&upstream)
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .collect();
    eprintln!("sent again after a late record: {repeated:?}");
    assert!(
        repeated.len() <= 2 && repeated.iter().all(|(_, n)| *n == 2),
        "more repeats than the slowed relay's sends in flight can explain: {repeated:?}"
    );
    let (code, _) = late.terminate();
    assert_eq!(code, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_while_sending_is_taken_over_after_its_lease() {
    let Some(Setup {
        database: _database,
        upstream,
        dir,
    }) = Setup::new("2s", PLAIN, "").await
    else {
        return;
    };
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
    let order: Vec<String> = upstream.received().iter().filter_map(delivery_of).collect();
    // The held trigger is sent again (it was in flight when A died: at least once), and
    // nothing of its key went before it.
    assert_eq!(order, ["held", "held", "behind", "after"]);
    let (code, lines) = b.terminate();
    assert_eq!(code, Some(0), "{lines:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_relay_is_fenced_out_when_it_wakes() {
    let Some(Setup {
        database,
        upstream,
        dir,
    }) = Setup::new("2s", PLAIN, "").await
    else {
        return;
    };
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_hold_exactly_across_relays() {
    let Some(Setup {
        database: _database,
        upstream,
        dir,
    }) = Setup::new(
        "3s",
        "limit = { per_project = \"10/s\" }",
        "limit = { per_client = \"60/min\", burst = 3 }",
    )
    .await
    else {
        return;
    };
    on_event_loops(dir.path());
    let (_relays, addresses) = start_relays(dir.path(), 3);

    // The gateway: a client's 12 calls spread over three relays; three relays with limits
    // of their own would admit 9, one shared limit admits its burst of 3.
    let mut admitted = 0;
    for i in 0..12 {
        let url = format!(
            "http://{}/api/v4/projects/9/trigger/pipeline?token=TOKEN&ref=main",
            addresses[i % 3]
        );
        let reply = post(&url, &[], Vec::new()).await;
        match reply.status {
            201 => admitted += 1,
            429 => assert!(reply.text().contains("per_client"), "{}", reply.text()),
            other => panic!("{other}: {}", reply.text()),
        }
    }
    assert_eq!(admitted, 3);
    let gateway_calls = upstream.received().len();

    // Queued triggers: 10/s for the project, burst 10, whichever relay sends them.
    let total = 30;
    for i in 0..total {
        assert_eq!(
            push(&addresses[i % 3], &format!("limited-{i}"))
                .await
                .status,
            202
        );
    }
    eventually(Duration::from_secs(20), "every trigger sent", || {
        calls_per_delivery(&upstream).len() >= total
    })
    .await;
    let mut arrivals = upstream.received_at()[gateway_calls..].to_vec();
    arrivals.sort();
    let first = arrivals[0];
    // In any prefix, at most the burst plus one per 100 ms. The limit admits sends by the
    // database's clock and this counts arrivals, so a send's own delay (a first call that
    // took 20 ms on a busy machine shifts every window after it) gets 50 ms of slack;
    // three relays limiting on their own would send the 30 at once.
    for (i, at) in arrivals.iter().enumerate() {
        let allowed = 10
            + ((at.duration_since(first) + Duration::from_millis(50)).as_millis() / 100) as usize;
        assert!(
            i < allowed,
            "call {} arrived {:?} after the first: over 10/s with burst 10",
            i + 1,
            at.duration_since(first)
        );
    }
}

/// Sends `count` webhooks round robin, `at_once` at a time, and returns the delivery ids
/// acknowledged (202) and how many were refused with 503; no other answer is allowed.
async fn push_many(
    addresses: &[String],
    prefix: &str,
    count: usize,
    at_once: usize,
) -> (Vec<String>, usize) {
    let mut acknowledged = Vec::new();
    let mut refused = 0;
    let mut next = 0;
    while next < count {
        let batch: Vec<_> = (next..(next + at_once).min(count))
            .map(|i| {
                let address = addresses[i % addresses.len()].clone();
                let delivery = format!("{prefix}-{i}");
                async move { (push(&address, &delivery).await, delivery) }
            })
            .collect();
        for (reply, delivery) in futures_util::future::join_all(batch).await {
            match reply.status {
                202 => acknowledged.push(delivery),
                503 => refused += 1,
                other => panic!("{delivery}: {other} {}", reply.text()),
            }
        }
        next += at_once;
    }
    (acknowledged, refused)
}

async fn readyz(address: &str) -> Reply {
    send("GET", &format!("http://{address}/readyz"), &[], Vec::new()).await
}

/// Pushes webhooks (at most for 5 s) until one is refused, and returns that answer: a
/// change made to the database (a reload, a terminated session) reaches the relay's
/// sessions a moment after the statement that made it returns; what was acknowledged
/// before is sent as any other.
async fn refused_soon(address: &str) -> Reply {
    let waited = Instant::now();
    for attempt in 0.. {
        let reply = push(address, &format!("during-{attempt}")).await;
        if reply.status == 503 {
            return reply;
        }
        assert_eq!(reply.status, 202, "{}", reply.text());
        assert!(waited.elapsed() < Duration::from_secs(5), "never refused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    unreachable!()
}

/// Waits (at most 5 s) until the relay at `address` says it is ready again.
async fn ready_again(address: &str) {
    let waited = Instant::now();
    let mut ready = readyz(address).await;
    while ready.status != 200 && waited.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        ready = readyz(address).await;
    }
    assert_eq!(ready.status, 200, "{}", ready.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_goes_away_is_refused_then_recovered_without_a_restart() {
    let Some(server) = tokio::task::block_in_place(pg::Server::own) else {
        return;
    };
    let Setup {
        database: _database,
        upstream,
        dir,
    } = Setup::on(
        own_database(&server),
        "3s",
        PLAIN,
        "limit = { per_client = \"600/min\" }",
    )
    .await;
    on_event_loops(dir.path());
    with_dashboard(dir.path());
    let (mut relays, addresses) = start_relays(dir.path(), 2);
    for relay in &mut relays {
        relay.wait_for("event_loops=2");
    }
    let (before, refused) = push_many(&addresses, "before", 10, 4).await;
    assert_eq!((before.len(), refused), (10, 0));

    tokio::task::block_in_place(|| server.pg_ctl("stop", "immediate"));
    // Never acknowledged without a commit; /readyz says why; the gateway's shared limit
    // refuses rather than let calls through unchecked.
    let (during, refused) = push_many(&addresses, "during", 6, 2).await;
    assert_eq!((during.len(), refused), (0, 6));
    for address in &addresses {
        let ready = readyz(address).await;
        assert_eq!(ready.status, 503, "{}", ready.text());
        assert!(
            ready.text().contains("cannot be written"),
            "{}",
            ready.text()
        );
        let url =
            format!("http://{address}/api/v4/projects/9/trigger/pipeline?token=TOKEN&ref=main");
        let gateway = post(&url, &[], Vec::new()).await;
        assert_eq!(gateway.status, 503, "{}", gateway.text());
        assert!(
            gateway.text().contains("cannot be checked"),
            "{}",
            gateway.text()
        );
        // Served on an event loop, the metrics still answer: the outbox's depth is read
        // beside the loop, and cannot be read now.
        let metrics = send("GET", &format!("http://{address}/metrics"), &[], Vec::new()).await;
        assert_eq!(metrics.status, 200, "{}", metrics.text());
        assert!(
            metrics
                .text()
                .contains("hookrelay_requests_total{endpoint=\"readyz\",status=\"503\"}"),
            "{}",
            metrics.text()
        );
    }

    // A delivery's page cannot be read meanwhile: 503, not "no such delivery".
    for relay in &mut relays {
        let detail = dashboard_get(relay, &format!("/api/deliveries/{}", before[0])).await;
        assert_eq!(detail.status, 503, "{}", detail.text());
    }

    tokio::task::block_in_place(|| server.pg_ctl("start", ""));
    acknowledged_again(&addresses, "the database returned").await;
    // A delivery's page is read on the connection the restart cut, and reads it again
    // without a listing (or a metrics scrape) having connected it first.
    for relay in &mut relays {
        let detail = dashboard_get(relay, &format!("/api/deliveries/{}", before[0])).await;
        assert_eq!(detail.status, 200, "{}", detail.text());
    }
    for address in &addresses {
        ready_again(address).await;
        let waited = Instant::now();
        // The shared limit is checked again (its pool reconnects), without a restart.
        let url =
            format!("http://{address}/api/v4/projects/9/trigger/pipeline?token=TOKEN&ref=main");
        let mut gateway = post(&url, &[], Vec::new()).await;
        while gateway.status == 503 && waited.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            gateway = post(&url, &[], Vec::new()).await;
        }
        assert_eq!(gateway.status, 201, "{}", gateway.text());
    }
    all_sent(&upstream, &before, Duration::from_secs(15)).await;
}

/// Sets `default_transaction_read_only` for the whole server (`on`) or back to its
/// default (`reset`), as a maintenance freeze or a managed service's full disk does; every
/// session's next transaction follows.
fn read_only(server: &pg::Server, on: bool) {
    tokio::task::block_in_place(|| {
        server.admin(if on {
            "ALTER SYSTEM SET default_transaction_read_only = on"
        } else {
            "ALTER SYSTEM RESET default_transaction_read_only"
        });
        server.admin("SELECT pg_reload_conf()");
    });
}

/// A database that takes no writes for a while (a standby reached by mistake, a maintenance
/// freeze, a managed service's full disk). Webhooks are refused with the reason and
/// `/readyz` says it, and a send whose answer came meanwhile keeps its outcome in memory
/// until the database takes it: the trigger is not sent again. Before, a read-only error
/// was not transient: `/readyz` said 200 throughout, and the outcome was dropped, leaving
/// the trigger `sending` until its lease ended and then sending it a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_database_is_refused_then_written_again_and_sends_nothing_twice() {
    let Some(server) = tokio::task::block_in_place(pg::Server::own) else {
        return;
    };
    let Setup {
        database: _database,
        upstream,
        dir,
    } = Setup::on(own_database(&server), "8s", PLAIN, "").await;
    let (_relays, addresses, before) = one_relay_that_took_two(dir.path()).await;
    all_sent(&upstream, &before, Duration::from_secs(10)).await;

    // A send in flight when the database stops taking writes; its answer comes after.
    upstream.answer_next(Answer::created().delayed(Duration::from_millis(700)));
    let in_flight = push(&addresses[0], "in-flight").await;
    assert_eq!(in_flight.status, 202, "{}", in_flight.text());
    // Generous: on a loaded CI machine a first send has taken over 5 s.
    eventually(Duration::from_secs(15), "the send is in flight", || {
        calls_per_delivery(&upstream).contains_key("in-flight")
    })
    .await;
    read_only(&server, true);
    let started = Instant::now();

    let refused = refused_soon(&addresses[0]).await;
    assert!(
        refused.text().contains("takes no writes"),
        "{}",
        refused.text()
    );
    let ready = readyz(&addresses[0]).await;
    assert_eq!(ready.status, 503, "{}", ready.text());
    assert!(ready.text().contains("read-only"), "{}", ready.text());
    // Past the send's answer, well within its 8 s lease.
    tokio::time::sleep(Duration::from_millis(2500).saturating_sub(started.elapsed())).await;

    read_only(&server, false);
    let after = acknowledged_again(&addresses, "the database took writes again").await;
    ready_again(&addresses[0]).await;
    all_sent(&upstream, &after, Duration::from_secs(10)).await;
    // Past the lease of the send in flight: had its outcome been dropped, it would have
    // been sent again by now.
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(started.elapsed())).await;
    let calls = calls_per_delivery(&upstream);
    assert_eq!(calls.get("in-flight"), Some(&1), "{calls:?}");
    assert!(calls.values().all(|&n| n == 1), "{calls:?}");
}

/// A send whose outcome the database will not take for longer than the lease (here a
/// trigger refusing it with `lock_not_available`, a passing failure; a database gone or
/// read-only that long does the same): the outcome waits in the relay's memory, and the
/// relay's own claims leave the key alone meanwhile, though its lease ran out. Before, the
/// next claim took the key over and sent the trigger a second time, and the first send's
/// outcome was then fenced out as stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_kept_longer_than_the_lease_is_written_and_nothing_is_sent_twice() {
    let Some(Setup {
        database,
        upstream,
        dir,
    }) = Setup::new("3s", PLAIN, "").await
    else {
        return;
    };
    let (_relays, addresses, before) = one_relay_that_took_two(dir.path()).await;
    all_sent(&upstream, &before, Duration::from_secs(10)).await;

    let sql = |sql: &str| run_sql(&database.url, sql);
    // A claim still takes a trigger (queued → sending); a send's outcome is refused.
    sql(
        "CREATE FUNCTION hr_test_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'lock timeout' USING ERRCODE = '55P03'; END $$;
         CREATE TRIGGER hr_test_refuse BEFORE UPDATE ON hr_triggers FOR EACH ROW
         WHEN (OLD.state = 'sending' AND NEW.state <> 'sending') EXECUTE FUNCTION hr_test_refuse();",
    );
    let in_flight = push(&addresses[0], "in-flight").await;
    assert_eq!(in_flight.status, 202, "{}", in_flight.text());
    // Generous: on a loaded CI machine a first send has taken over 5 s (what is tested
    // is what happens after it).
    eventually(Duration::from_secs(15), "the trigger is sent", || {
        calls_per_delivery(&upstream).contains_key("in-flight")
    })
    .await;
    let refused_at = Instant::now();
    // Twice the 3 s lease, the relay claiming all the while (a poll a second).
    tokio::time::sleep(Duration::from_secs(6)).await;
    sql("DROP TRIGGER hr_test_refuse ON hr_triggers");
    let after = acknowledged_again(&addresses, "the outcome was taken").await;
    all_sent(&upstream, &after, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(9).saturating_sub(refused_at.elapsed())).await;
    let calls = calls_per_delivery(&upstream);
    assert_eq!(calls.get("in-flight"), Some(&1), "{calls:?}");
    assert!(calls.values().all(|&n| n == 1), "{calls:?}");
    // The first send's outcome was written: sent, in one attempt.
    let row = rows(&database.url)
        .into_iter()
        .find(|row| row.delivery_id == "in-flight")
        .expect("the in-flight delivery is stored");
    assert_eq!(
        (row.state.as_deref(), row.attempts),
        (Some("sent"), 1),
        "{row:?}"
    );
}

/// A database that refuses new connections while the relay's were cut (a DBA's
/// `ALLOW_CONNECTIONS false` for maintenance; a role locked, a password rotated before its
/// file, a `pg_hba.conf` mistake fail the same way): webhooks get `503` and `/readyz`
/// says why until it lets the relay in again, then both recover without a restart.
/// Before, a failure to connect that was not a network one left `/readyz` at `200`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_refuses_the_relay_s_connections_is_shown_on_readyz_until_it_lets_it_in() {
    let Some(server) = tokio::task::block_in_place(pg::Server::own) else {
        return;
    };
    let Setup {
        database,
        upstream,
        dir,
    } = Setup::on(own_database(&server), "3s", PLAIN, "").await;
    let name = database.url.rsplit('/').next().unwrap().to_owned();
    let (_relays, addresses, before) = one_relay_that_took_two(dir.path()).await;

    tokio::task::block_in_place(|| {
        server.admin(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false"));
        server.admin(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
        ));
    });
    refused_soon(&addresses[0]).await;
    // The cut shows first ("connection reset"); the database's own reason once the
    // relay tries to connect again.
    let waited = Instant::now();
    loop {
        let ready = readyz(&addresses[0]).await;
        assert_eq!(ready.status, 503, "{}", ready.text());
        if ready.text().contains("not currently accepting connections") {
            break;
        }
        assert!(
            waited.elapsed() < Duration::from_secs(5),
            "{}",
            ready.text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    tokio::task::block_in_place(|| {
        server.admin(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true"))
    });
    let after = acknowledged_again(&addresses, "the database let the relay in").await;
    ready_again(&addresses[0]).await;
    all_sent(
        &upstream,
        &[before, after].concat(),
        Duration::from_secs(10),
    )
    .await;
}

/// A database that refuses the relay's writes for a reason that does not pass by itself
/// (a privilege revoked, a trigger of the DBA's raising an error): every webhook gets
/// `503` with the reason, and `/readyz` says it too, until a webhook is written again.
/// Before, only passing failures made `/readyz` say so: it answered `200` while every
/// webhook was refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_refuses_writes_for_good_is_shown_on_readyz() {
    let Some(Setup {
        database,
        upstream,
        dir,
    }) = Setup::new("3s", PLAIN, "").await
    else {
        return;
    };
    let (_relays, addresses, before) = one_relay_that_took_two(dir.path()).await;
    let sql = |sql: &str| run_sql(&database.url, sql);
    sql(
        "CREATE FUNCTION hr_test_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'permission denied for table hr_deliveries' USING ERRCODE = '42501'; END $$;
         CREATE TRIGGER hr_test_refuse BEFORE INSERT ON hr_deliveries
         FOR EACH ROW EXECUTE FUNCTION hr_test_refuse();",
    );
    let refused = refused_soon(&addresses[0]).await;
    assert!(
        refused.text().contains("permission denied"),
        "{}",
        refused.text()
    );
    let ready = readyz(&addresses[0]).await;
    assert_eq!(ready.status, 503, "{}", ready.text());
    assert!(
        ready.text().contains("permission denied"),
        "{}",
        ready.text()
    );

    // Still refused a second later, with no webhook coming: a probe's write elsewhere
    // does not say webhooks are taken.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let ready = readyz(&addresses[0]).await;
    assert_eq!(ready.status, 503, "{}", ready.text());

    // Ready again with no webhook coming (a load balancer sends none while /readyz says
    // 503): the relay tries one of its own, undone.
    sql("DROP TRIGGER hr_test_refuse ON hr_deliveries");
    ready_again(&addresses[0]).await;
    let after = acknowledged_again(&addresses, "the trigger was dropped").await;
    all_sent(
        &upstream,
        &[before, after].concat(),
        Duration::from_secs(10),
    )
    .await;
}

/// A relay started while its database takes no writes (pointed at a standby before a
/// failover finished): it starts, says why on `/readyz`, and takes webhooks once the
/// database does, without a restart. Before, it stopped at start (its schema check wrote).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_started_on_a_database_that_takes_no_writes_waits_for_it() {
    let Some(server) = tokio::task::block_in_place(pg::Server::own) else {
        return;
    };
    let Setup {
        database,
        upstream,
        dir,
    } = Setup::on(own_database(&server), "3s", PLAIN, "").await;
    assert!(rows(&database.url).is_empty(), "migrated");
    read_only(&server, true);
    let (_relays, addresses) = start_relays(dir.path(), 1);
    let refused = refused_soon(&addresses[0]).await;
    assert!(
        refused.text().contains("takes no writes"),
        "{}",
        refused.text()
    );
    let ready = readyz(&addresses[0]).await;
    assert_eq!(ready.status, 503, "{}", ready.text());

    read_only(&server, false);
    ready_again(&addresses[0]).await;
    let after = acknowledged_again(&addresses, "the database took writes").await;
    all_sent(&upstream, &after, Duration::from_secs(10)).await;
}

/// Two servers of the test's own, the old primary and the new, each with the same
/// database migrated (a standby would hold it, replicated; here it is made by hand), and
/// the relays' configuration on the old one; the new one's URL.
async fn old_and_new_primary() -> Option<(pg::Server, pg::Server, Setup, String)> {
    let old = tokio::task::block_in_place(pg::Server::own)?;
    let new = tokio::task::block_in_place(pg::Server::own)?;
    let setup = Setup::on(own_database(&old), "3s", PLAIN, "").await;
    with_dashboard(setup.dir.path());
    let name = setup.database.url.rsplit('/').next().unwrap().to_owned();
    tokio::task::block_in_place(|| new.admin(&format!("CREATE DATABASE {name}")));
    let new_url = format!("postgres://postgres@127.0.0.1:{}/{name}", new.port);
    assert!(rows(&new_url).is_empty());
    Some((old, new, setup, new_url))
}

/// Once a failover is done, the webhooks acknowledged after it are sent and stored on
/// the new primary, and the relays' dashboards (their reader's connection) show them.
async fn written_to_the_new_primary(
    relays: &mut [Served],
    addresses: &[String],
    setup: &Setup,
    new_url: &str,
) {
    let started = Instant::now();
    let after = acknowledged_again(addresses, "the failover").await;
    eprintln!(
        "acknowledged again {:?} after the failover",
        started.elapsed()
    );
    all_sent(&setup.upstream, &after, Duration::from_secs(10)).await;
    let on_new: Vec<String> = rows(new_url)
        .into_iter()
        .map(|row| row.delivery_id)
        .collect();
    for delivery in &after {
        assert!(on_new.contains(delivery), "{delivery} not in {on_new:?}");
    }
    // Before, the reader stayed on the old server, whose reads still worked: the dashboard
    // showed the deliveries of before the failover for good.
    for relay in relays {
        let mut listed = String::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !after
            .iter()
            .all(|delivery| listed.contains(delivery.as_str()))
        {
            assert!(
                Instant::now() < deadline,
                "the dashboard never showed {after:?}: {listed}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
            listed = dashboard_get(relay, "/api/deliveries").await.text();
        }
    }
}

/// A failover as a relay sees it when the database's address now leads to the new
/// primary while its connections still reach the old one, which takes no writes (a
/// demoted primary, a pooler or a virtual address that moved): the relay connects again
/// within about a second and writes to the new primary, without a restart. Before, it
/// kept its connection to the old server for good and refused every webhook.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failover_the_relay_connects_again_and_reaches_the_new_primary() {
    let Some((old, new, setup, new_url)) = old_and_new_primary().await else {
        return;
    };
    let (proxy, through_proxy) = Proxy::before(&setup.database).await;
    cluster_config(
        setup.dir.path(),
        &setup.upstream.url(),
        &through_proxy,
        "3s",
    );
    let (mut relays, addresses) = start_relays(setup.dir.path(), 1);
    let (before, refused) = push_many(&addresses, "before", 2, 2).await;
    assert_eq!((before.len(), refused), (2, 0));
    all_sent(&setup.upstream, &before, Duration::from_secs(10)).await;

    // The address now leads to the new primary; the old one takes no writes.
    proxy.retarget(new.port);
    read_only(&old, true);
    written_to_the_new_primary(&mut relays, &addresses, &setup, &new_url).await;
}

/// The same failover with both servers in the URL and `target_session_attrs=read-write`
/// (libpq's way, which the relay's client follows): the relay connects again and takes the
/// one that now takes writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_both_servers_in_the_url_the_relay_follows_a_failover() {
    let Some((old, new, setup, new_url)) = old_and_new_primary().await else {
        return;
    };
    read_only(&new, true);
    let name = new_url.rsplit('/').next().unwrap();
    let both = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{name}?target_session_attrs=read-write",
        old.port, new.port
    );
    cluster_config(setup.dir.path(), &setup.upstream.url(), &both, "3s");
    let (mut relays, addresses) = start_relays(setup.dir.path(), 1);
    let (before, refused) = push_many(&addresses, "before", 2, 2).await;
    assert_eq!((before.len(), refused), (2, 0));
    all_sent(&setup.upstream, &before, Duration::from_secs(10)).await;

    // The new primary is promoted; the old one is demoted (takes no writes).
    read_only(&old, true);
    read_only(&new, false);
    written_to_the_new_primary(&mut relays, &addresses, &setup, &new_url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_crash_under_load_loses_no_acknowledged_webhook() {
    let Some(server) = tokio::task::block_in_place(pg::Server::own) else {
        return;
    };
    let Setup {
        database,
        upstream,
        dir,
    } = Setup::on(own_database(&server), "3s", PLAIN, "").await;
    let (_relays, addresses) = start_relays(dir.path(), 2);
    let load = {
        let addresses = addresses.clone();
        tokio::spawn(async move { push_many(&addresses, "load", 1200, 8).await })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    // A crash and its recovery (an immediate shutdown skips the checkpoint), then the
    // connections cut from the server's side, then a clean restart (a fast shutdown rolls
    // back what runs, checkpoints, and refuses connections meanwhile).
    let crashed = std::time::Instant::now();
    tokio::task::block_in_place(|| server.restart("immediate"));
    eprintln!("the database was back after {:?}", crashed.elapsed());
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::task::block_in_place(|| {
        server.admin(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'hookrelay'",
        )
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let loaded = !load.is_finished();
    tokio::task::block_in_place(|| server.restart("fast"));
    eprintln!(
        "faults over after {:?}; the load ran into the last: {loaded}",
        crashed.elapsed(),
    );
    let (acknowledged, refused) = load.await.unwrap();
    eprintln!(
        "{} acknowledged, {refused} refused during the faults",
        acknowledged.len()
    );
    assert!(!acknowledged.is_empty());
    all_sent(&upstream, &acknowledged, Duration::from_secs(30)).await;
    // Nothing stays `sending` past its lease, and a refused webhook is not sent (a 503
    // means nothing was committed... or, after a cut right after COMMIT, that the
    // sender's retry will be told it is a duplicate).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let rows = tokio::task::block_in_place(|| rows(&database.url));
    let stuck: Vec<_> = rows
        .iter()
        .filter(|r| r.state.as_deref() != Some("sent"))
        .collect();
    assert!(stuck.is_empty(), "{stuck:#?}");
    // Nothing is sent twice either: claims and outcomes wait for the database's disk, so
    // the crash forgets none the relays acted on, and a send in flight at a fault has its
    // outcome recorded once the database is back (in about 0.2 s here; 0.35 s with the
    // two cores kept busy), well within the 3 s lease. Before claims and outcomes waited,
    // 0 to 5 triggers went twice in this test (then the crash and the cut alone, 300
    // webhooks; 3 runs in 11 above 4).
    let twice: Vec<_> = calls_per_delivery(&upstream)
        .into_iter()
        .filter(|&(_, n)| n > 1)
        .collect();
    assert!(twice.is_empty(), "sent more than once: {twice:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_fires_once_per_occurrence_while_any_relay_is_up() {
    let Some(Setup {
        database: _database,
        upstream,
        dir,
    }) = Setup::new("3s", PLAIN, "").await
    else {
        return;
    };
    write(dir.path(), "schedule.toml", EVERY_SECOND);
    let mut relays: Vec<Served> = (0..3).map(|n| relay(dir.path(), n)).collect();
    for relay in &mut relays {
        relay.address();
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // One relay dies, and comes back later; the others keep the schedule meanwhile.
    relays[0].child.kill().unwrap();
    let killed_at = chrono::Utc::now();
    relays[0].child.wait().unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    relays[0] = relay(dir.path(), 0);
    relays[0].address();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for relay in relays {
        let (code, lines) = relay.terminate();
        assert_eq!(code, Some(0), "{lines:#?}");
    }
    let mut per_occurrence: BTreeMap<String, usize> = BTreeMap::new();
    for call in upstream.received() {
        if let Some(at) = call.json()["variables"]["AT"].as_str() {
            *per_occurrence.entry(at.to_owned()).or_insert(0) += 1;
        }
    }
    assert!(per_occurrence.len() >= 6, "{per_occurrence:#?}");
    // Each occurrence fires once; only a call relay 0 had in flight when it was killed
    // goes again, once its lease ends (at-least-once: nothing recorded its answer). That
    // is an occurrence of the seconds just before the kill, and at most one.
    let twice: Vec<(&String, &usize)> = per_occurrence.iter().filter(|(_, n)| **n > 1).collect();
    let in_flight_at_kill = |at: &str| {
        let at = chrono::DateTime::parse_from_rfc3339(at)
            .unwrap()
            .with_timezone(&chrono::Utc);
        at <= killed_at && killed_at - at < chrono::TimeDelta::seconds(5)
    };
    assert!(
        twice.len() <= 1
            && twice
                .iter()
                .all(|(at, n)| **n == 2 && in_flight_at_kill(at)),
        "an occurrence fired twice (relay 0 killed at {killed_at}): {per_occurrence:#?}"
    );
    // No second missed between the first and the last occurrence.
    let times: Vec<chrono::DateTime<chrono::FixedOffset>> = per_occurrence
        .keys()
        .map(|t| chrono::DateTime::parse_from_rfc3339(t).unwrap())
        .collect();
    for pair in times.windows(2) {
        assert_eq!((pair[1] - pair[0]).num_seconds(), 1, "{per_occurrence:#?}");
    }
}

/// Relays sharing a store take turns at catch-up: the hook's log is read once per pass
/// among them all, not once per relay (each would ask GitHub for the same redeliveries).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_take_turns_at_catch_up_so_a_hooks_log_is_read_once_a_pass() {
    let Some(Setup {
        database: _database,
        upstream: _upstream,
        dir,
    }) = Setup::new("3s", PLAIN, "").await
    else {
        return;
    };
    let github = RecordingUpstream::start().await;
    for _ in 0..3 {
        github.answer_next(Answer::new(200, "[]"));
    }
    let relay_toml = std::fs::read_to_string(dir.path().join("relay.toml")).unwrap();
    write(
        dir.path(),
        "relay.toml",
        &relay_toml.replace(
            "[source.github]\nprovider = \"github\"\n",
            &format!(
                "[source.github]\nprovider = \"github\"\ncatch_up = {{ hook = \"{}/repos/acme/app/hooks/1\", token = \"env:HOOKRELAY_TEST_TOKEN\" }}\n",
                github.url()
            ),
        ),
    );
    let (relays, _) = start_relays(dir.path(), 3);
    // Each relay makes its pass as it starts, unless another made it within `every`.
    let deadline = Instant::now() + Duration::from_secs(15);
    while github.received().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let reads: Vec<String> = github
        .received()
        .iter()
        .map(|call| call.path_and_query.clone())
        .collect();
    assert_eq!(
        reads,
        ["/repos/acme/app/hooks/1/deliveries?per_page=100"],
        "three relays started together read the hook's log once"
    );
    for relay in relays {
        let (code, lines) = relay.terminate();
        assert_eq!(code, Some(0), "{lines:#?}");
    }
}

/// `hookrelay` run with the relays' configuration folder's environment.
fn command(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env_remove("HOOKRELAY_CONFIG")
        .env_remove("HOOKRELAY_STORE_URL")
        .env("HOOKRELAY_TEST_TOKEN", "glptt-test")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_replay_and_explain_work_against_the_shared_store_from_anywhere() {
    let Some(Setup {
        database,
        upstream,
        dir,
    }) = Setup::new("3s", PLAIN, "").await
    else {
        return;
    };
    let mut relay = relay(dir.path(), 0);
    let address = relay.address();
    assert_eq!(push(&address, "from-a-relay").await.status, 202);
    eventually(Duration::from_secs(10), "sent", || {
        upstream.received().len() == 1
    })
    .await;

    // Another folder, no configuration: --store alone finds everything.
    let elsewhere = tempfile::tempdir().unwrap();
    let state = elsewhere.path().join("state");
    let state = state.to_str().unwrap();
    let listed = command(&[
        "deliveries",
        "--state",
        state,
        "--store",
        &database.url,
        "--json",
    ]);
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    assert!(
        text.contains("from-a-relay") && text.contains("\"sent\""),
        "{text}"
    );
    assert!(
        !Path::new(state).exists(),
        "the state folder is not touched"
    );

    // HOOKRELAY_STORE_URL does the same as --store.
    let replayed = Command::new(BIN)
        .args(["replay", "--state", state, "delivery:from-a-relay"])
        .env("HOOKRELAY_STORE_URL", &database.url)
        .output()
        .unwrap();
    assert!(
        replayed.status.success(),
        "{}",
        String::from_utf8_lossy(&replayed.stderr)
    );
    eventually(
        Duration::from_secs(10),
        "the replay sent by the running relay",
        || upstream.received().len() == 2,
    )
    .await;

    // explain --delivery reads the stored webhook from [store] in the configuration.
    let explained = command(&[
        "explain",
        "--config",
        dir.path().to_str().unwrap(),
        "--state",
        state,
        "--delivery",
        "from-a-relay",
    ]);
    let text = String::from_utf8_lossy(&explained.stdout);
    assert!(
        explained.status.success(),
        "{}",
        String::from_utf8_lossy(&explained.stderr)
    );
    assert!(text.contains("projects/acme%2Fapp/trigger"), "{text}");

    // A window's replans read the shared store: a ping is no candidate, and a webhook
    // that was sent is neither unmatched nor failed.
    let ping = signed_github(
        &format!("http://{address}/hooks/github"),
        SECRET,
        "ping",
        "a-ping",
        "github/ping.json",
    )
    .await;
    assert_eq!(ping.status, 200, "{}", ping.text());
    let config = dir.path().to_str().unwrap();
    for (args, said) in [
        (
            &["--unmatched"][..],
            "no webhook in that window matched no rule; nothing planned again",
        ),
        (
            &["--failed", "--replan"][..],
            "no webhook's trigger failed for good in that window; nothing planned again",
        ),
    ] {
        let output = Command::new(BIN)
            .arg("replay")
            .args(args)
            .args(["--since", "1h", "--config", config, "--state", state])
            .env("HOOKRELAY_STORE_URL", &database.url)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && text.contains(said),
            "{args:?}: {text}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    // A password on the command line is refused, and never repeated.
    let with_password = database
        .url
        .replace("postgres@", "postgres:hunter2-secret@");
    let refused = command(&["deliveries", "--store", &with_password]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(stderr.contains("HOOKRELAY_STORE_URL"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
    let (code, lines) = relay.terminate();
    assert_eq!(code, Some(0), "{lines:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_whose_clock_is_an_hour_fast_changes_nothing() {
    if !faketime_here("HOOKRELAY_REQUIRE_POSTGRES") {
        return;
    }
    let Some(Setup {
        database: _database,
        upstream,
        dir,
    }) = Setup::new(
        "3s",
        PLAIN,
        "limit = { per_client = \"60/min\", burst = 3 }",
    )
    .await
    else {
        return;
    };
    write(dir.path(), "schedule.toml", EVERY_SECOND);
    let mut fast = {
        let mut command = Command::new(BIN);
        command
            .env("HOOKRELAY_TEST_TOKEN", "glptt-test")
            .env("LD_PRELOAD", FAKETIME)
            .env("FAKETIME", "+1h")
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
            .env("FAKETIME_NO_CACHE", "1");
        Served::start_with(command, dir.path(), &dir.path().join("state-fast"))
    };
    let mut on_time = relay(dir.path(), 1);
    let addresses = [fast.address(), on_time.address()];
    let real_start = chrono::Utc::now();
    // The shared limit: a client's calls over both relays, the burst of 3 admitted.
    let mut admitted = 0;
    for i in 0..8 {
        let url = format!(
            "http://{}/api/v4/projects/9/trigger/pipeline?token=TOKEN&ref=main",
            addresses[i % 2]
        );
        if post(&url, &[], Vec::new()).await.status == 201 {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 3, "the fast relay's clock bought no budget");
    // Webhooks through the fast relay are sent (due times on the database's clock, not an
    // hour late), and the schedule fires real seconds, once each.
    assert_eq!(
        push(&addresses[0], "through-the-fast-relay").await.status,
        202
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    let calls = calls_per_delivery(&upstream);
    assert_eq!(calls.get("through-the-fast-relay"), Some(&1), "{calls:?}");
    let real_end = chrono::Utc::now();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for call in upstream.received() {
        if let Some(at) = call.json()["variables"]["AT"].as_str() {
            *seen.entry(at.to_owned()).or_insert(0) += 1;
        }
    }
    assert!(seen.len() >= 2, "{seen:#?}");
    for (at, count) in &seen {
        assert_eq!(*count, 1, "{at} fired twice: {seen:#?}");
        let at = chrono::DateTime::parse_from_rfc3339(at).unwrap();
        assert!(
            at >= real_start - chrono::Duration::seconds(2)
                && at <= real_end + chrono::Duration::seconds(2),
            "{at} is not a real second of this test: {seen:#?}"
        );
    }
    let (code, lines) = fast.terminate();
    assert_eq!(code, Some(0), "{lines:#?}");
    let (code, lines) = on_time.terminate();
    assert_eq!(code, Some(0), "{lines:#?}");
}

/// The database's clock set back an hour (libfaketime on the server) while a trigger
/// waits for its retry, with two relays up and no webhook arriving: the retry comes
/// within seconds of its due time, and its project's shared limit (set on the old clock)
/// lets it through; one relay moves the deadlines and the other finds them moved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_clock_set_back_an_hour_delays_no_retry_on_any_relay() {
    if !faketime_here("HOOKRELAY_REQUIRE_POSTGRES") {
        return;
    }
    let Some((server, offset)) =
        tokio::task::block_in_place(|| pg::Server::own_with_clock(Path::new(FAKETIME)))
    else {
        return;
    };
    let Setup {
        database,
        upstream,
        dir,
    } = Setup::on(
        own_database(&server),
        "3s",
        "limit = { per_project = \"1/s\", burst = 1 }",
        "",
    )
    .await;
    let config = std::fs::read_to_string(dir.path().join("relay.toml"))
        .unwrap()
        .replace("retry_base = \"50ms\"", "retry_base = \"3s\"")
        .replace("retry_cap = \"200ms\"", "retry_cap = \"3s\"");
    write(dir.path(), "relay.toml", &config);
    let (relays, addresses) = start_relays(dir.path(), 2);

    upstream.answer_next(Answer::new(
        500,
        r#"{"message":"500 Internal Server Error"}"#,
    ));
    assert_eq!(push(&addresses[0], "retried").await.status, 202);
    eventually(Duration::from_secs(10), "the first call", || {
        upstream.received().len() == 1
    })
    .await;
    eventually(Duration::from_secs(10), "the retry recorded", || {
        tokio::task::block_in_place(|| rows(&database.url))
            .iter()
            .any(|row| row.attempts == 1 && row.state.as_deref() == Some("queued"))
    })
    .await;
    // Renamed into place: libfaketime reads the file at every look at the clock, and
    // one written in place can be read half written.
    let next = offset.with_extension("new");
    std::fs::write(&next, "-1h").unwrap();
    std::fs::rename(&next, &offset).unwrap();
    let set_back = Instant::now();
    eventually(
        Duration::from_secs(15),
        "the retry, not an hour late",
        || upstream.received().len() == 2,
    )
    .await;
    let waited = set_back.elapsed();
    assert!(
        waited < Duration::from_secs(10),
        "the retry came {waited:?} after the step"
    );
    assert_eq!(push(&addresses[1], "behind").await.status, 202);
    eventually(Duration::from_secs(10), "the next webhook's call", || {
        upstream.received().len() == 3
    })
    .await;
    let order: Vec<Option<String>> = upstream.received().iter().map(delivery_of).collect();
    assert_eq!(
        order,
        [
            Some("retried".into()),
            Some("retried".into()),
            Some("behind".into())
        ]
    );
    let mut moved = 0;
    for relay in relays {
        let (code, lines) = relay.terminate();
        assert_eq!(code, Some(0), "{lines:#?}");
        moved += lines
            .iter()
            .filter(|l| l.contains("the store's clock went back"))
            .count();
    }
    assert_eq!(moved, 1, "the deadlines are moved once, by one relay");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_triggers_accepted_by_different_relays_coalesce() {
    let Some(Setup {
        database: _database,
        upstream,
        dir,
    }) = Setup::new("3s", "limit = { per_project = \"1000/s\" }", "").await
    else {
        return;
    };
    // A second rule: the same trigger for every push, held 1 s to merge its twins.
    write(
        dir.path(),
        "coalesce.toml",
        "[[rule]]\nname = \"merged\"\nsource = \"github\"\ncoalesce = \"1s\"\n[rule.trigger]\nproject = \"acme/merged\"\nref = \"main\"\n\
         token = \"env:HOOKRELAY_TEST_TOKEN\"\n",
    );
    let (relays, addresses) = start_relays(dir.path(), 3);
    let replies = futures_util::future::join_all(
        addresses
            .iter()
            .enumerate()
            .map(|(i, address)| async move { push(address, &format!("twin-{i}")).await }),
    )
    .await;
    assert!(replies.iter().all(|r| r.status == 202));
    eventually(Duration::from_secs(10), "the merged trigger sent", || {
        upstream
            .received()
            .iter()
            .any(|r| r.path_and_query.contains("acme%2Fmerged"))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let merged = upstream
        .received()
        .iter()
        .filter(|r| r.path_and_query.contains("acme%2Fmerged"))
        .count();
    assert_eq!(
        merged, 1,
        "three identical triggers on three relays make one call"
    );

    drop(relays);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gitlab_s_retry_after_pauses_the_project_on_every_relay() {
    let Some(Setup {
        database: _database,
        upstream,
        dir,
    }) = Setup::new("3s", PLAIN, "").await
    else {
        return;
    };
    // Branch pushes go to the same project on another ref: another key, so only the
    // project's pause holds them back.
    write(
        dir.path(),
        "branches.toml",
        "[[rule]]\nname = \"branches\"\nsource = \"github\"\nevents = [\"push\"]\n[rule.trigger]\nproject = \"acme/app\"\nref = \"other\"\n\
         token = \"env:HOOKRELAY_TEST_TOKEN\"\n",
    );
    // Relay A alone gets GitLab's 429 (Retry-After: 2), and stops.
    let mut a = relay(dir.path(), 0);
    let address_a = a.address();
    upstream.answer_next(Answer::new(429, r#"{"message":"slow down"}"#).header("retry-after", "2"));
    assert_eq!(push(&address_a, "tag-first").await.status, 202);
    eventually(Duration::from_secs(10), "GitLab's 429", || {
        upstream.received().len() == 1
    })
    .await;
    let paused_at = Instant::now();
    let _ = a.terminate();
    // Relay B has never seen a 429; the branch push it accepts must wait all the same.
    let mut b = relay(dir.path(), 1);
    let address_b = b.address();
    let url = format!("http://{address_b}/hooks/github");
    let reply = signed_github(
        &url,
        SECRET,
        "push",
        "branch-second",
        "github/push_branch.json",
    )
    .await;
    assert_eq!(reply.status, 202, "{}", reply.text());
    let refs_after_the_429 = || -> Vec<String> {
        upstream.received()[1..]
            .iter()
            .map(|r| r.json()["ref"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    // Both keys of the project (the tag's `main`, the branch push's `other`) go once the
    // pause is over, in whatever order the relay's looks find them.
    eventually(Duration::from_secs(15), "both sent after the pause", || {
        let refs = refs_after_the_429();
        refs.contains(&"other".to_owned()) && refs.contains(&"main".to_owned())
    })
    .await;
    let first_after = upstream.received_at()[1..]
        .iter()
        .map(|at| at.duration_since(paused_at))
        .min()
        .unwrap();
    assert!(
        first_after >= Duration::from_millis(1500),
        "a call for the paused project went out {first_after:?} after GitLab's 429"
    );
    let (code, lines) = b.terminate();
    assert_eq!(code, Some(0), "{lines:#?}");
}

/// A TCP proxy on 127.0.0.1 in front of the database that can cut every connection
/// (reset) or stop carrying bytes without closing anything (blackhole), as a network
/// would.
struct Proxy {
    port: u16,
    /// 0: carry; 1: blackhole; 2: carry, each piece [`SLOW_DATABASE`] late.
    mode: std::sync::Arc<std::sync::atomic::AtomicU8>,
    /// Bumped to reset: every connection opened before is dropped.
    generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// The port new connections are carried to (a name or address moved by a failover).
    target: std::sync::Arc<std::sync::atomic::AtomicU16>,
}

/// How late a slowed proxy carries each piece: past a 2 s lease in two round trips.
const SLOW_DATABASE: Duration = Duration::from_millis(1200);

/// Carries bytes one way until either side closes or the proxy resets; holds them while
/// blackholed, delays them while slowed.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mode: std::sync::Arc<std::sync::atomic::AtomicU8>,
    generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
    born: u64,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        if generation.load(Ordering::SeqCst) != born {
            return;
        }
        if mode.load(Ordering::SeqCst) == 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        let read = tokio::select! {
            read = from.read(&mut buffer) => read,
            () = tokio::time::sleep(Duration::from_millis(50)) => continue,
        };
        match read {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if mode.load(Ordering::SeqCst) == 2 {
                    tokio::time::sleep(SLOW_DATABASE).await;
                }
                if to.write_all(&buffer[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

impl Proxy {
    /// A proxy in front of `database`'s server, and the database's URL through it.
    async fn before(database: &pg::Database) -> (Proxy, String) {
        let port: u16 = database
            .url
            .rsplit(':')
            .next()
            .and_then(|tail| tail.split('/').next())
            .and_then(|p| p.parse().ok())
            .unwrap();
        let proxy = Proxy::start(port).await;
        let url = database
            .url
            .replace(&format!(":{port}/"), &format!(":{}/", proxy.port));
        (proxy, url)
    }

    async fn start(target: u16) -> Proxy {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU8, AtomicU16, AtomicU64};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = Arc::new(AtomicU8::new(0));
        let generation = Arc::new(AtomicU64::new(0));
        let target = Arc::new(AtomicU16::new(target));
        let (m, g, t) = (mode.clone(), generation.clone(), target.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let to = t.load(Ordering::SeqCst);
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await else {
                    continue;
                };
                let (m, g) = (m.clone(), g.clone());
                let born = g.load(Ordering::SeqCst);
                tokio::spawn(async move {
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    let up =
                        tokio::spawn(pump(client_read, server_write, m.clone(), g.clone(), born));
                    let down = tokio::spawn(pump(server_read, client_write, m, g, born));
                    let _ = tokio::join!(up, down);
                });
            }
        });
        Proxy {
            port,
            mode,
            generation,
            target,
        }
    }

    /// Carries new connections to `port` from now on; those open stay where they are.
    fn retarget(&self, port: u16) {
        self.target.store(port, Ordering::SeqCst);
    }

    fn blackhole(&self, on: bool) {
        self.mode.store(u8::from(on), Ordering::SeqCst);
    }

    /// Every piece either way arrives [`SLOW_DATABASE`] late: a relay's commits land long
    /// after it sent them.
    fn slow(&self, on: bool) {
        self.mode.store(if on { 2 } else { 0 }, Ordering::SeqCst);
    }

    fn reset(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_or_blackholed_database_connection_loses_nothing() {
    let Some(Setup {
        database,
        upstream,
        dir,
    }) = Setup::new("3s", PLAIN, "").await
    else {
        return;
    };
    let (proxy, through_proxy) = Proxy::before(&database).await;
    cluster_config(dir.path(), &upstream.url(), &through_proxy, "3s");
    let (_relays, addresses) = start_relays(dir.path(), 2);
    let (mut acknowledged, refused) = push_many(&addresses, "before", 10, 4).await;
    assert_eq!((acknowledged.len(), refused), (10, 0));

    // Blackholed: requests wait (their commit waits), or are refused; never acknowledged
    // without a commit. The proxy takes every byte, as a frozen server's kernel does, so
    // no error comes: `/readyz` says so once a write has waited 5 s (before, it said `200`
    // for as long as the database stayed silent).
    proxy.blackhole(true);
    let blackholed = Instant::now();
    let during = {
        let addresses = addresses.clone();
        tokio::spawn(async move { push_many(&addresses, "blackholed", 6, 3).await })
    };
    let said = loop {
        let reply = readyz(&addresses[0]).await;
        if reply.status == 503 {
            break reply.text();
        }
        assert!(
            blackholed.elapsed() < Duration::from_secs(9),
            "/readyz still {} {} with the database silent for 9 s",
            reply.status,
            reply.text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(said.contains("has not finished for"), "{said}");
    proxy.blackhole(false);
    ready_again(&addresses[0]).await;
    let (more, refused) = during.await.unwrap();
    eprintln!(
        "while blackholed: {} acknowledged once the connection carried again, {refused} refused",
        more.len()
    );
    assert_eq!(more.len() + refused, 6);
    acknowledged.extend(more);

    // Every connection reset: the relays reconnect by themselves.
    proxy.reset();
    acknowledged.extend(acknowledged_again(&addresses, "the reset").await);
    all_sent(&upstream, &acknowledged, Duration::from_secs(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_whose_configuration_lacks_the_upstream_leaves_the_trigger_for_one_that_has_it() {
    let Some(Setup {
        database,
        upstream,
        dir,
    }) = Setup::new("2s", PLAIN, "").await
    else {
        return;
    };
    // Relay A's configuration (after a reload, say) has an upstream relay B's lacks.
    let newer = copied_config(dir.path(), |text| {
        text.replace(
            "[rule.trigger]\n",
            "[rule.trigger]\nupstream = \"gitlab\"\n",
        )
    });
    write(
        newer.path(),
        "second.toml",
        &format!(
            "[upstream.second]\nurl = \"{}\"\ntimeout = \"1s\"\n[[rule]]\nname = \"to-second\"\nsource = \"github\"\n\
             [rule.trigger]\nupstream = \"second\"\nproject = \"acme/second\"\nref = \"main\"\ntoken = \"env:HOOKRELAY_TEST_TOKEN\"\n",
            upstream.url()
        ),
    );
    let mut a = relay(newer.path(), 0);
    let address_a = a.address();
    // GitLab holds both of A's calls (one per upstream); A dies holding its claims.
    upstream.answer_next(Answer::created().delayed(Duration::from_secs(30)));
    upstream.answer_next(Answer::created().delayed(Duration::from_secs(30)));
    assert_eq!(push(&address_a, "for-both").await.status, 202);
    eventually(Duration::from_secs(10), "A's two calls", || {
        upstream.received().len() == 2
    })
    .await;
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    // B, without that upstream (or rule), takes the key over after the lease and leaves it
    // for a relay that can send it instead of failing it.
    let mut b = relay(dir.path(), 1);
    b.address();
    b.wait_for("left for a relay (or a reload) whose configuration can send it");
    let mut a = relay(newer.path(), 0);
    a.address();
    // Each offer (every 5 s) goes to whichever relay looks first; relays look at random
    // moments, so A gets it within a few offers.
    eventually(Duration::from_secs(60), "both triggers sent", || {
        let received = upstream.received();
        let to = |project: &str| {
            received
                .iter()
                .filter(|r| r.path_and_query.contains(project))
                .count()
        };
        to("acme%2Fsecond") == 2 && to("acme%2Fapp") == 2
    })
    .await;
    // The last send's outcome is committed a moment after GitLab saw the call.
    eventually(
        Duration::from_secs(10),
        "every trigger recorded sent",
        || {
            tokio::task::block_in_place(|| rows(&database.url))
                .iter()
                .all(|r| r.state.as_deref() == Some("sent"))
        },
    )
    .await;
    drop((a, b));
}

/// Commit statuses across relays: a push accepted by one relay, the pipeline's events
/// received by the others in any order, each status posted once, and the commit ends at
/// the pipeline's final state whichever relay took which event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statuses_follow_a_pipeline_whose_events_reach_different_relays() {
    let Some(Setup {
        database: _database,
        upstream: _gitlab,
        dir,
    }) = Setup::new("5s", PLAIN, "").await
    else {
        return;
    };
    let forge = RecordingUpstream::start().await;
    write(dir.path(), "status-token", "ghs_status_token_for_tests");
    write(dir.path(), "pipeline-secret", "pipeline-hook-token");
    let text = std::fs::read_to_string(dir.path().join("relay.toml")).unwrap();
    let text = text.replace(
        "[source.github]\nprovider = \"github\"\n",
        &format!(
            "[source.github]\nprovider = \"github\"\nstatus = {{ token = \"file:{0}/status-token\", api_url = \"{1}\" }}\n",
            dir.path().display(),
            forge.url()
        ),
    ) + &format!(
        "[source.gitlab-pipelines]\nprovider = \"gitlab\"\nsecret = \"file:{}/pipeline-secret\"\nupstream = \"gitlab\"\n",
        dir.path().display()
    );
    write(dir.path(), "relay.toml", &text);
    let (_relays, addresses) = start_relays(dir.path(), 3);
    assert_eq!(push(&addresses[0], "status-1").await.status, 202);
    eventually(Duration::from_secs(10), "the pending status", || {
        !forge.received().is_empty()
    })
    .await;
    let event = |status: &str, finished: Option<&str>| {
        let mut event: serde_json::Value =
            serde_json::from_slice(&fixture("status/gitlab_pipeline_event_doc.json")).unwrap();
        event["object_attributes"]["id"] = 257.into();
        event["object_attributes"]["status"] = status.into();
        event["object_attributes"]["finished_at"] = finished.into();
        event["project"]["path_with_namespace"] = "acme/app".into();
        serde_json::to_vec(&event).unwrap()
    };
    // GitLab's hooks race each other: success reaches relay 1 while running and a late
    // "running" reach relays 2 and 0 at the same moment.
    let send = |address: &str, uuid: &str, body: Vec<u8>| {
        let url = format!("http://{address}/hooks/gitlab-pipelines");
        let uuid = uuid.to_owned();
        async move {
            post(
                &url,
                &[
                    ("content-type", "application/json"),
                    ("X-Gitlab-Event", "Pipeline Hook"),
                    ("X-Gitlab-Token", "pipeline-hook-token"),
                    ("X-Gitlab-Event-UUID", uuid.as_str()),
                ],
                body,
            )
            .await
        }
    };
    let replies = futures_util::future::join_all([
        send(&addresses[2], "e-running", event("running", None)),
        send(
            &addresses[1],
            "e-success",
            event("success", Some("2026-12-02 10:00:00 UTC")),
        ),
    ])
    .await;
    assert!(
        replies.iter().all(|r| r.status == 200),
        "{:?}",
        replies.iter().map(Reply::text).collect::<Vec<_>>()
    );
    let late = send(&addresses[0], "e-late", event("running", None)).await;
    assert_eq!(late.status, 200);
    eventually(Duration::from_secs(10), "the success status", || {
        forge
            .received()
            .iter()
            .any(|r| r.json()["state"] == "success")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let states: Vec<String> = forge
        .received()
        .iter()
        .map(|r| r.json()["state"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        states.first().map(String::as_str),
        Some("pending"),
        "{states:?}"
    );
    assert_eq!(
        states.last().map(String::as_str),
        Some("success"),
        "{states:?}"
    );
    assert_eq!(
        states.iter().filter(|s| *s == "success").count(),
        1,
        "each status is posted once: {states:?}"
    );
}

/// GitLab goes down while two relays have 41 project+refs waiting: each relay pauses it
/// and moves the waiting triggers past its pause in the shared store (rows the other relay
/// holds are skipped, not waited for). GitLab sees a few probes, not every project's own
/// retries; once it is back, every trigger goes out once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_seen_by_two_relays_is_probed_not_stormed_and_all_goes_out_once() {
    let Some(Setup {
        database,
        upstream,
        dir,
    }) = Setup::new("3s", PLAIN, "").await
    else {
        return;
    };
    // Every push also triggers a project of its own: a key per delivery.
    write(
        dir.path(),
        "fan-out.toml",
        "[[rule]]\nname = \"each\"\nsource = \"github\"\n[rule.trigger]\nproject = \"acme/p-{{ event.delivery }}\"\nref = \"main\"\n\
         token = \"env:HOOKRELAY_TEST_TOKEN\"\n",
    );
    for _ in 0..1000 {
        upstream.answer_next(Answer::new(503, r#"{"message":"503 Service Unavailable"}"#));
    }
    let (relays, addresses) = start_relays(dir.path(), 2);
    let total = 40;
    for i in 0..total {
        let reply = push(&addresses[i % addresses.len()], &format!("down-{i}")).await;
        assert_eq!(reply.status, 202);
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // Each project's own retries (50 ms, doubling to 200 ms) would be hundreds of calls.
    let probes = upstream.received().len();
    assert!(
        (1..=60).contains(&probes),
        "{probes} calls to a GitLab that is down"
    );
    // Each key's head says why it waits (the triggers behind acme/app's head say nothing
    // yet): 41 heads, less any probe being retried right now.
    let waiting = rows(&database.url)
        .iter()
        .filter(|r| r.last_error.as_deref() == Some("upstream gitlab is down; waiting for it"))
        .count();
    assert!(
        waiting >= 30,
        "{waiting} of 41 waiting heads say they wait for GitLab"
    );

    upstream.script.lock().unwrap().clear();
    eventually(Duration::from_secs(40), "every trigger sent", || {
        let rows = rows(&database.url);
        rows.len() == 2 * total && rows.iter().all(|r| r.state.as_deref() == Some("sent"))
    })
    .await;
    let calls = upstream.received().len() - probes;
    // A probe on its way when GitLab came back may add one call per worker.
    assert!(
        (2 * total..=2 * total + 16).contains(&calls),
        "{calls} calls for {} triggers",
        2 * total
    );
    drop(relays);
}

/// A database streaming to a standby that is not synchronous: the relay says at start
/// that a failover could lose acknowledged webhooks, and its dashboard's Health says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_risk_is_logged_and_shown_on_the_dashboard() {
    let Some(server) = tokio::task::block_in_place(pg::Server::own) else {
        return;
    };
    let mut receiver = server.stream_to_a_receiver();
    let Setup {
        database: _database,
        upstream: _upstream,
        dir,
    } = Setup::on(own_database(&server), "3s", PLAIN, "").await;
    write(
        dir.path(),
        "admin.toml",
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"env:HOOKRELAY_ADMIN_TOKEN\"\n",
    );
    // The receiver shows in pg_stat_replication once it has connected.
    eventually(Duration::from_secs(20), "the receiver streams", || {
        tokio::task::block_in_place(|| server.receivers() > 0)
    })
    .await;
    const DASHBOARD_TOKEN: &str = "admin-token-for-the-tests-0123";
    let mut command = Command::new(BIN);
    command
        .env("HOOKRELAY_TEST_TOKEN", "glptt-test")
        .env("HOOKRELAY_ADMIN_TOKEN", DASHBOARD_TOKEN);
    let mut relay = Served::start_with(command, dir.path(), &dir.path().join("state-0"));
    let warned = relay.wait_for("streams its log to 1 receiver(s)");
    assert!(warned.contains("WARN"), "{warned}");
    let dashboard = relay.dashboard_address();
    let bearer = format!("Bearer {DASHBOARD_TOKEN}");
    let get = |path: &str| {
        let url = format!("http://{dashboard}{path}");
        let bearer = bearer.clone();
        async move { send("GET", &url, &[("authorization", &bearer)], "").await }
    };
    let health = get("/api/health").await;
    assert_eq!(health.status, 200, "{}", health.text());
    let risk = health.json()["store_failover_risk"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(risk.contains("synchronous_standby_names"), "{risk}");
    let page = get("/health").await;
    assert!(page.text().contains("Failover"), "{}", page.text());
    let (code, _) = relay.terminate();
    assert_eq!(code, Some(0));
    let _ = receiver.kill();
    let _ = receiver.wait();
}

/// GitLab, or a proxy in front of it, answering with NUL bytes (a binary error page, a
/// `web_url` with `\u0000`): PostgreSQL's text cannot hold a NUL, and an answer that could
/// not be written was retried from memory for good, holding its project+ref. The answer
/// is recorded with U+FFFD in each NUL's place and the key moves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_with_nul_bytes_are_recorded_and_the_key_moves_on() {
    let Some(Setup {
        database,
        upstream,
        dir,
    }) = Setup::new("5s", PLAIN, "").await
    else {
        return;
    };
    upstream.answer_next(Answer::new(400, "\u{1f}\u{8b}\0\0binary from a proxy"));
    upstream.answer_next(Answer::new(
        201,
        r#"{"id": 9, "web_url": "https://gitlab.example/p/-/pipelines/9\u0000"}"#,
    ));
    let (_relays, addresses) = start_relays(dir.path(), 1);
    for delivery in ["nul-1", "nul-2", "nul-3"] {
        assert_eq!(push(&addresses[0], delivery).await.status, 202);
    }
    eventually(Duration::from_secs(10), "three calls", || {
        upstream.received().len() >= 3
    })
    .await;
    eventually(Duration::from_secs(10), "three outcomes recorded", || {
        rows(&database.url)
            .iter()
            .filter(|row| {
                row.state
                    .as_deref()
                    .is_some_and(|s| s != "sending" && s != "queued")
            })
            .count()
            == 3
    })
    .await;
    let rows = rows(&database.url);
    let of = |id: &str| rows.iter().find(|row| row.delivery_id == id).unwrap();
    assert_eq!(of("nul-1").state.as_deref(), Some("failed"));
    let error = of("nul-1").last_error.clone().unwrap();
    assert!(
        error.contains("\u{fffd}\u{fffd}binary from a proxy"),
        "{error}"
    );
    assert_eq!(of("nul-2").state.as_deref(), Some("sent"));
    assert_eq!(
        of("nul-2").pipeline_url.as_deref(),
        Some("https://gitlab.example/p/-/pipelines/9\u{fffd}")
    );
    assert_eq!(of("nul-3").state.as_deref(), Some("sent"));
}

/// Random text of `len` letters: what PostgreSQL cannot compress inside an index entry.
fn random_letters(len: usize) -> String {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect()
}

/// Keys and ids past PostgreSQL's 2,704-byte index entries: an anonymous gateway call for a
/// 6,000-byte project failed its shared limit check (and so every call for a second), and
/// a 6,000-byte delivery id was answered `503` "try again" for ever. Now the project's key
/// is bounded and the id refused with `400`, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_ids_too_long_for_an_index_are_bounded_or_refused() {
    let Some(Setup {
        database: _database,
        upstream,
        dir,
    }) = Setup::new("5s", PLAIN, "limit = { per_project = \"1000/s\" }").await
    else {
        return;
    };
    let (_relays, addresses) = start_relays(dir.path(), 1);
    let long = random_letters(6_000);
    let gateway = |project: &str| {
        format!(
            "http://{}/api/v4/projects/{project}/trigger/pipeline?token=TOKEN&ref=main",
            addresses[0]
        )
    };
    let reply = post(&gateway(&long), &[], Vec::new()).await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    let reply = post(&gateway("9"), &[], Vec::new()).await;
    assert_eq!(
        reply.status,
        201,
        "the next call is not refused: {}",
        reply.text()
    );
    assert_eq!(upstream.received().len(), 2);

    let reply = push(&addresses[0], &long).await;
    assert_eq!(reply.status, 400, "{}", reply.text());
    assert!(
        reply.text().contains("the delivery id is 6000 bytes long"),
        "{}",
        reply.text()
    );
    assert_eq!(push(&addresses[0], "short-after").await.status, 202);
    assert_eq!(readyz(&addresses[0]).await.status, 200);
}
