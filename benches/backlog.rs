//! The outbox under a backlog: does anything cost more when triggers pile up?
//!
//! For 0, 100,000 and 1,000,000 triggers waiting, in two shapes — all behind one held
//! project+ref (its head paused, as after GitLab's `Retry-After`), or spread over 10,000
//! project+refs, all due — it measures, on the same machine in one run:
//!
//! - **claim**: one claim of up to 8 due triggers against the store (rolled back, so each
//!   claim sees the same backlog), mean over 500;
//! - **outage cpu %**: the release binary, forwarder and every background task running,
//!   upstream down (an outage: the backlog stays and the forwarder keeps probing), nothing
//!   arriving: the relay's CPU over its first 6 seconds (on PostgreSQL, `relay+database`);
//! - **acks/s**: then 10,000 signed GitHub pushes over 64 connections on 127.0.0.1, the
//!   upstream still down; ratio to the empty store;
//! - **drain/s**: first, the same binary sending to a stand-in GitLab on 127.0.0.1 that
//!   answers `201` at once, limits raised: triggers sent per second over the first 20,000
//!   due (with one held key, 20,000 more triggers over 1,000 other keys are added for this,
//!   so the figure says whether the held backlog slows everyone else).
//!
//! Run: `cargo bench --bench backlog` (env: BACKLOG_SIZES="0,100000,1000000").
//! `BACKLOG_STORE=postgres` measures the same on a throwaway PostgreSQL (Debian's
//! `postgresql`, run as the `postgres` user; a fresh database for each backlog).
//! The store is filled directly (20,000 per transaction, SQLite at synchronous=OFF)
//! before the relay starts. None of these figures is a test assertion.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hookrelay::store::postgres::{PostgresConfig, PostgresEngine};
use hookrelay::store::sqlite::{Durability, STORE_FILE, SqliteEngine};
use hookrelay::store::{Engine, NewDelivery, NewTrigger, Recorded, StoredBody, now_ms};
use http::{Request, Response};
use http_body_util::Full;

const SECRET: &str = "It's a Secret to Everybody";
const PUSH: &[u8] = include_bytes!("../tests/fixtures/github/push_tag.json");

#[derive(Clone, Copy, Debug, PartialEq)]
enum Shape {
    OneHeldKey,
    TenThousandKeys,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::OneHeldKey => "1 held key",
            Shape::TenThousandKeys => "10,000 keys",
        }
    }
}

fn trigger(project: String) -> NewTrigger {
    NewTrigger {
        rule: "backlog".into(),
        upstream: "gitlab".into(),
        project,
        git_ref: "main".into(),
        token_ref: format!("file:{SECRET_FILE}"),
        variables: r#"{"UPSTREAM_SHA":"6113728f27ae82c7b1a177c8d03f9e96e0adf246"}"#.into(),
        inputs: "{}".into(),
        delay_ms: 0,
        coalesce_ms: 0,
        done: None,
        kind: Default::default(),
        status_target: None,
        pipeline_id: None,
        queue_key: None,
    }
}

/// Due triggers added beside one held key, so there is something to drain.
const EXTRA: usize = 20_000;

/// Where the relay's trigger token is read from (any readable file will do).
const SECRET_FILE: &str = "/proc/self/cmdline";

/// Where the backlog is stored.
enum Store {
    /// A state folder.
    Sqlite(std::path::PathBuf),
    /// A database of the throwaway PostgreSQL.
    Postgres(String),
}

impl Store {
    fn engine(&self) -> Box<dyn Engine> {
        match self {
            Store::Sqlite(state) => {
                std::fs::create_dir_all(state).unwrap();
                Box::new(SqliteEngine::open(&state.join(STORE_FILE), Durability::Off).unwrap())
            }
            Store::Postgres(url) => Box::new(
                PostgresEngine::open(&PostgresConfig::new(url.as_str()))
                    .and_then(PostgresEngine::as_writer)
                    .unwrap(),
            ),
        }
    }
}

/// A throwaway PostgreSQL in a temporary folder on a free port, run as the unprivileged
/// `postgres` user (it refuses root); stopped on drop. Not the tests' server
/// (`src/store/postgres/test_server.rs`): that one runs with `fsync = off`, and this one
/// must flush as a real database does, with the settings of `benches/lib.sh`'s.
struct Postgres {
    bin: std::path::PathBuf,
    dir: tempfile::TempDir,
    port: u16,
}

impl Postgres {
    /// Debian's newest PostgreSQL server, started; or why not.
    fn start() -> Result<Postgres, String> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .map_err(|err| format!("no /usr/lib/postgresql ({err}): apt-get install postgresql"))?
            .filter_map(|entry| entry.ok().map(|e| e.path().join("bin")))
            .filter(|bin| bin.join("initdb").exists())
            .max()
            .ok_or("no PostgreSQL server binaries under /usr/lib/postgresql")?;
        let dir = tempfile::tempdir().map_err(|err| err.to_string())?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map_err(|err| err.to_string())?
            .port();
        let run = |program: &str, args: &[&str]| -> Result<(), String> {
            let status = std::process::Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(bin.join(program))
                .args(args)
                .stdout(std::process::Stdio::null())
                .status()
                .map_err(|err| format!("{program}: {err}"))?;
            status
                .success()
                .then_some(())
                .ok_or(format!("{program} failed: {status}"))
        };
        std::process::Command::new("chown")
            .args(["postgres:postgres", &dir.path().display().to_string()])
            .status()
            .map_err(|err| err.to_string())?;
        let data = dir.path().join("data").display().to_string();
        run("initdb", &["-A", "trust", "-U", "postgres", "-D", &data])?;
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c max_wal_size=8GB",
            dir.path().display()
        );
        let log = dir.path().join("log").display().to_string();
        run(
            "pg_ctl",
            &["start", "-w", "-D", &data, "-l", &log, "-o", &options],
        )?;
        Ok(Postgres { bin, dir, port })
    }

    /// A new database's URL.
    fn database(&self, name: &str) -> String {
        let status = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("createdb"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                name,
            ])
            .status()
            .unwrap();
        assert!(status.success(), "createdb {name}: {status}");
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["stop", "-m", "fast", "-D"])
            .arg(self.dir.path().join("data"))
            .stdout(std::process::Stdio::null())
            .status();
    }
}

/// CPU seconds a process has used so far (user and system; Linux counts them in 1/100 s);
/// 0 for a process that is gone.
fn cpu_seconds(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| hookrelay::metrics::cpu_seconds_in_stat(&stat))
        .unwrap_or(0.0)
}

/// The server and its backends: the processes whose parent is the postmaster.
fn postgres_processes(postgres: &Postgres) -> Vec<u32> {
    let Some(postmaster) = std::fs::read_to_string(postgres.dir.path().join("data/postmaster.pid"))
        .ok()
        .and_then(|pid| pid.lines().next()?.trim().parse::<u32>().ok())
    else {
        return Vec::new();
    };
    let mut pids = vec![postmaster];
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let parent = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                stat[stat.rfind(')')? + 1..]
                    .split_whitespace()
                    .nth(1)?
                    .parse::<u32>()
                    .ok()
            });
        if parent == Some(postmaster) {
            pids.push(pid);
        }
    }
    pids
}

/// CPU the relay (and the database, if any) use per second of an outage with nothing
/// arriving: what probing and holding back the backlog cost while GitLab is down.
async fn outage_cpu(relay: &Relay, postgres: Option<&Postgres>) -> (f64, Option<f64>) {
    let database = || {
        postgres.map(|p| {
            postgres_processes(p)
                .into_iter()
                .map(cpu_seconds)
                .sum::<f64>()
        })
    };
    let (relay_before, database_before) = (cpu_seconds(relay.child.id()), database());
    tokio::time::sleep(OUTAGE_WATCHED).await;
    let seconds = OUTAGE_WATCHED.as_secs_f64();
    (
        (cpu_seconds(relay.child.id()) - relay_before) / seconds,
        database()
            .zip(database_before)
            .map(|(after, before)| (after - before) / seconds),
    )
}

/// How long the outage's own cost is watched before webhooks arrive.
const OUTAGE_WATCHED: Duration = Duration::from_secs(6);

/// Records deliveries in transactions of 20,000, together where the engine can.
fn insert_all(engine: &mut dyn Engine, deliveries: impl Iterator<Item = NewDelivery>, now: i64) {
    let deliveries: Vec<NewDelivery> = deliveries.collect();
    for chunk in deliveries.chunks(20_000) {
        engine.begin(false).unwrap();
        for part in chunk.chunks(1_000) {
            let refs: Vec<&NewDelivery> = part.iter().collect();
            match engine.insert_deliveries(&refs, now, true) {
                Some(answers) => drop(answers.unwrap()),
                None => {
                    for delivery in part {
                        engine.insert_delivery(delivery, now).unwrap();
                    }
                }
            }
        }
        engine.commit().unwrap();
    }
}

/// Fills the store with `size` waiting triggers in `shape`.
fn fill(store: &Store, size: usize, shape: Shape) {
    let mut engine = store.engine();
    let engine = engine.as_mut();
    let now = now_ms();
    let delivery = |id: String, project: String| NewDelivery {
        source: "github".into(),
        delivery_id: id,
        event_type: "push".into(),
        headers: vec![("x-github-event".into(), "push".into())],
        body: StoredBody::encode(Bytes::from_static(b"{}")),
        summary: "{}".into(),
        triggers: vec![trigger(project)],
    };
    insert_all(
        engine,
        (0..size).map(|i| {
            let project = match shape {
                Shape::OneHeldKey => "acme/held".to_owned(),
                Shape::TenThousandKeys => format!("acme/p{}", i % 10_000),
            };
            delivery(format!("backlog-{i}"), project)
        }),
        // A second before the other work: the held key is the first due, and so the one
        // the claim below holds.
        now - 1_000,
    );
    if shape == Shape::OneHeldKey {
        // Work that is due beside the held key, to drain.
        insert_all(
            engine,
            (0..EXTRA).map(|j| delivery(format!("other-{j}"), format!("acme/q{}", j % 1_000))),
            now,
        );
    }
    if shape == Shape::OneHeldKey && size > 0 {
        // Hold the head for an hour, as GitLab's Retry-After or a limit would.
        engine.begin(false).unwrap();
        // A claim a minute ahead: a store on the database's clock may be a few
        // milliseconds behind the one the triggers were stamped with.
        let head = engine.claim(now + 60_000, 1).unwrap().due.remove(0);
        assert_eq!(head.project, "acme/held");
        let held = Recorded::Deferred {
            due_at: now + 3_600_000,
            reason: "held".into(),
        };
        assert!(engine.record(head.lease, &held, now).unwrap());
        engine.commit().unwrap();
    }
}

/// Mean time of one claim of up to 8, each rolled back so the backlog stays the same.
fn claim_time(store: &Store) -> Duration {
    let mut engine = store.engine();
    let rounds = 500;
    let started = Instant::now();
    for _ in 0..rounds {
        engine.begin(false).unwrap();
        std::hint::black_box(engine.claim(now_ms(), 8).unwrap());
        engine.rollback();
    }
    started.elapsed() / rounds
}

/// A stand-in GitLab on 127.0.0.1:0 that answers every call `201` and counts them.
async fn stand_in() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let counted = count.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let counted = counted.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_request: Request<_>| {
                    counted.fetch_add(1, Ordering::SeqCst);
                    async {
                        Ok::<_, Infallible>(
                            Response::builder()
                                .status(201)
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from_static(
                                    br#"{"id":4242,"web_url":"http://gitlab.example/p/-/pipelines/4242"}"#,
                                )))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, count)
}

/// The release binary on `state`, sending to `upstream`; stopped on drop.
struct Relay {
    child: Child,
    addr: SocketAddr,
    _config: tempfile::TempDir,
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_relay(state: &Path, store: &Store, upstream: SocketAddr) -> Relay {
    let config = tempfile::tempdir().unwrap();
    let secret = config.path().join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(
        config.path().join("relay.toml"),
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n\
             [upstream.gitlab]\nurl = \"http://{upstream}\"\nconnect_timeout = \"1s\"\n\
             limit = {{ per_project = \"1000000/min\", burst = 100000 }}\n\
             [delivery]\nworkers = 32\n\
             [source.github]\nprovider = \"github\"\nsecret = \"file:{secret}\"\n\
             [[rule]]\nname = \"tags\"\nsource = \"github\"\nevents = [\"tag\"]\n\
             [rule.trigger]\nproject = \"acme/app\"\nref = \"main\"\ntoken = \"file:{secret}\"\n\
             variables = {{ UPSTREAM_TAG = \"{{{{ event.ref_name }}}}\", UPSTREAM_SHA = \"{{{{ event.after }}}}\" }}\n",
            secret = secret.display()
        ),
    )
    .unwrap();
    if let Store::Postgres(url) = store {
        std::fs::write(
            config.path().join("store.toml"),
            format!("[store]\nurl = \"{url}\"\n"),
        )
        .unwrap();
    }
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let child = support::serve_binary(config.path(), state, &[], addr).await;
    Relay {
        child,
        addr,
        _config: config,
    }
}

/// Acknowledgements per second and p99 for `requests` new signed pushes.
async fn ack_rate(addr: SocketAddr, requests: usize, tag: &str) -> (f64, Duration) {
    let request = support::signed_github(SECRET, PUSH, tag);
    let outcome = support::load(addr, requests, 64, 202, request).await;
    (outcome.rate(), outcome.percentile(0.99))
}

/// Triggers per second the stand-in receives, over the first `count`, timed from the
/// relay's start.
async fn drain_rate(sent: &AtomicUsize, count: usize, started: Instant) -> f64 {
    let limit = Duration::from_secs(120);
    while sent.load(Ordering::SeqCst) < count && started.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    sent.load(Ordering::SeqCst) as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let sizes: Vec<usize> = if support::quick() {
        vec![0, 1_000]
    } else {
        std::env::var("BACKLOG_SIZES")
            .unwrap_or_else(|_| "0,100000,1000000".into())
            .split(',')
            .filter_map(|s| s.trim().parse().ok())
            .collect()
    };
    let (requests, drain) = if support::quick() {
        (200, 200)
    } else {
        (10_000, 20_000)
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let postgres = (std::env::var("BACKLOG_STORE").as_deref() == Ok("postgres")).then(|| {
        Postgres::start().unwrap_or_else(|reason| panic!("BACKLOG_STORE=postgres: {reason}"))
    });
    runtime.block_on(async {
        println!(
            "backlog: release binary with its forwarder, {requests} signed GitHub tag pushes over 64 connections, 127.0.0.1, store: {}",
            if postgres.is_some() { "PostgreSQL" } else { "SQLite" }
        );
        println!(
            "{:<12} {:<12} {:>10} {:>10} {:>9} {:>8} {:>10} {:>12}",
            "waiting",
            "shape",
            "fill s",
            "claim µs",
            "acks/s",
            "p99 ms",
            "drain/s",
            "outage cpu %"
        );
        for shape in [Shape::OneHeldKey, Shape::TenThousandKeys] {
            let mut empty_rate = None;
            for &size in &sizes {
                let dir = tempfile::tempdir().unwrap();
                let state = dir.path().join("state");
                let store = match &postgres {
                    Some(server) => Store::Postgres(server.database(&format!(
                        "backlog_{}_{size}",
                        if shape == Shape::OneHeldKey { "held" } else { "spread" }
                    ))),
                    None => Store::Sqlite(state.clone()),
                };
                let filled = Instant::now();
                // PostgreSQL's blocking client runs a runtime of its own: not on this one's.
                tokio::task::block_in_place(|| {
                    fill(&store, size, shape);
                    if let Store::Postgres(url) = &store {
                        // A backlog that has waited a while has met autovacuum; one written
                        // a second ago meets it during the measurement instead.
                        postgres::Client::connect(url, postgres::NoTls)
                            .and_then(|mut client| client.batch_execute("VACUUM ANALYZE"))
                            .unwrap();
                    }
                });
                let fill_time = filled.elapsed();
                let claim = tokio::task::block_in_place(|| claim_time(&store));
                // Due work and a fast upstream: how fast does the backlog go?
                let due = match shape {
                    Shape::OneHeldKey => EXTRA,
                    Shape::TenThousandKeys => size,
                };
                let drained = if due == 0 {
                    None
                } else {
                    let (upstream, sent) = stand_in().await;
                    let started = Instant::now();
                    let relay = start_relay(&state, &store, upstream).await;
                    let rate = drain_rate(&sent, drain.min(due), started).await;
                    drop(relay);
                    Some(rate)
                };
                // An outage: nothing listens upstream, so the backlog stays.
                let down = std::net::TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap();
                let relay = start_relay(&state, &store, down).await;
                let (relay_cpu, database_cpu) = outage_cpu(&relay, postgres.as_ref()).await;
                let (rate, p99) = ack_rate(relay.addr, requests, &format!("{size}")).await;
                drop(relay);
                let base = *empty_rate.get_or_insert(rate);
                println!(
                    "{:<12} {:<12} {:>10.1} {:>10.1} {:>9.0} {:>8.2} {:>10} {:>12}   acks vs empty store: {:.2}",
                    size,
                    shape.name(),
                    fill_time.as_secs_f64(),
                    claim.as_secs_f64() * 1e6,
                    rate,
                    p99.as_secs_f64() * 1e3,
                    drained.map_or("-".into(), |d| format!("{d:.0}")),
                    match database_cpu {
                        Some(database) => format!("{:.0}+{:.0}", relay_cpu * 100.0, database * 100.0),
                        None => format!("{:.0}", relay_cpu * 100.0),
                    },
                    rate / base
                );
            }
        }
    });
}
