//! The dashboard with a million deliveries: do its pages stay fast as the store grows?
//!
//! For 1,000 and 1,000,000 stored deliveries (each with a sent trigger, as a week of
//! webhooks leaves them), the release binary serves `GET /api/deliveries` on its admin
//! listener over 127.0.0.1, forwarder and every background task running, and this measures
//! the median of 50 sequential requests for: the first page; a page deep in the middle
//! (by cursor); the first page filtered by source; and a free-text search that matches
//! nothing (the worst case: it reads every delivery of its window), in the default last
//! 24 hours and over the whole week the deliveries span; and one delivery's page. Ratios
//! are to the 1,000-row store, measured in the same run.
//!
//! Run: `cargo bench --bench dashboard` (env: DASHBOARD_SIZES="1000,1000000").
//! None of these figures is a test assertion.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hookrelay::store::sqlite::{Durability, STORE_FILE, SqliteEngine};
use hookrelay::store::{Engine, NewDelivery, NewTrigger, Recorded, StoredBody, now_ms};
use http_body_util::{BodyExt, Full};

const TOKEN: &str = "admin-token-for-the-benchmark";

/// The deliveries are spread over a week, as the default retention keeps them.
const WEEK_MS: i64 = 7 * 24 * 3600 * 1000;

fn received_at(start: i64, i: usize, size: usize) -> i64 {
    start + (i as i128 * WEEK_MS as i128 / size as i128) as i64
}

fn fill(state: &Path, size: usize) {
    std::fs::create_dir_all(state).unwrap();
    let mut engine = SqliteEngine::open(&state.join(STORE_FILE), Durability::Off).unwrap();
    let start = now_ms() - WEEK_MS;
    let summary = r#"{"source":"github","events":[{"kind":"push","repository":"acme/app","ref":"refs/heads/main"}]}"#;
    let mut i = 0;
    while i < size {
        engine.begin(false).unwrap();
        for _ in 0..20_000.min(size - i) {
            let trigger = NewTrigger {
                done: Some(Recorded::Sent {
                    status: 201,
                    pipeline_id: Some(i as i64),
                    pipeline_url: Some(format!(
                        "https://gitlab.example.com/acme/app/-/pipelines/{i}"
                    )),
                }),
                ..NewTrigger::queued(
                    "all".into(),
                    &hookrelay::trigger::Trigger {
                        upstream: "gitlab".into(),
                        project: hookrelay::trigger::ProjectId::parse(&format!(
                            "acme/p{}",
                            i % 100
                        ))
                        .unwrap(),
                        git_ref: hookrelay::git_ref::GitRef::parse("main").unwrap(),
                        token: hookrelay::secret::Secret::new(String::new()),
                        variables: Default::default(),
                        inputs: Default::default(),
                        other_params: Default::default(),
                        webhook_body: None,
                    },
                    &hookrelay::secret::SecretRef::parse("env:T").unwrap(),
                    None,
                )
            };
            engine
                .insert_delivery(
                    &NewDelivery {
                        source: if i % 10 == 0 { "gitea" } else { "github" }.into(),
                        delivery_id: format!("delivery-{i:08}"),
                        event_type: "push".into(),
                        headers: vec![("x-github-event".into(), "push".into())],
                        body: StoredBody::encode(Bytes::from_static(b"{}")),
                        summary: summary.into(),
                        triggers: vec![trigger],
                    },
                    received_at(start, i, size),
                )
                .unwrap();
            i += 1;
        }
        engine.commit().unwrap();
    }
}

struct Relay {
    child: Child,
    admin: SocketAddr,
    _config: tempfile::TempDir,
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start(state: &Path) -> Relay {
    let config = tempfile::tempdir().unwrap();
    let port = |_: ()| {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (listen, admin) = (port(()), port(()));
    std::fs::write(
        config.path().join("relay.toml"),
        format!(
            "[server]\nlisten = \"127.0.0.1:{listen}\"\n[upstream.gitlab]\nurl = \"http://127.0.0.1:9\"\n\
             [admin]\nlisten = \"127.0.0.1:{admin}\"\ntoken = \"env:HOOKRELAY_ADMIN_TOKEN\"\n"
        ),
    )
    .unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    let child = support::serve_binary(
        config.path(),
        state,
        &[("HOOKRELAY_ADMIN_TOKEN", TOKEN)],
        admin,
    )
    .await;
    Relay {
        child,
        admin,
        _config: config,
    }
}

/// The median time of 50 sequential `GET path` on one keep-alive connection.
async fn median(admin: SocketAddr, path: &str) -> Duration {
    let stream = tokio::net::TcpStream::connect(admin).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let mut times = Vec::new();
    for _ in 0..50 {
        let request = http::Request::get(path)
            .header("host", "127.0.0.1")
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        sender.ready().await.unwrap();
        let started = Instant::now();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let _ = response.into_body().collect().await.unwrap();
        times.push(started.elapsed());
    }
    times.sort();
    times[times.len() / 2]
}

#[tokio::main]
async fn main() {
    let sizes: Vec<usize> = std::env::var("DASHBOARD_SIZES")
        .unwrap_or_else(|_| {
            if support::quick() {
                "1000,20000".into()
            } else {
                "1000,1000000".into()
            }
        })
        .split(',')
        .map(|n| n.trim().parse().unwrap())
        .collect();
    let mut baseline: Option<Vec<Duration>> = None;
    println!(
        "{:<12} {:>12} {:>12} {:>12} {:>16} {:>16} {:>14}",
        "deliveries",
        "first page",
        "deep page",
        "by source",
        "text, last 24 h",
        "text, the week",
        "one delivery"
    );
    for size in sizes {
        let state = tempfile::tempdir().unwrap();
        let start_ms = now_ms() - WEEK_MS;
        fill(state.path(), size);
        let relay = start(state.path()).await;
        let middle = format!("{}.{}", received_at(start_ms, size / 2, size), size / 2);
        let paths = [
            "/api/deliveries".to_owned(),
            format!("/api/deliveries?before={middle}"),
            "/api/deliveries?source=gitea".to_owned(),
            "/api/deliveries?q=no-such-text".to_owned(),
            "/api/deliveries?q=no-such-text&since=8d".to_owned(),
            format!("/api/deliveries/delivery-{:08}", size / 2),
        ];
        let mut times = Vec::new();
        for path in &paths {
            times.push(median(relay.admin, path).await);
        }
        let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
        let ratio = |i: usize| {
            baseline
                .as_ref()
                .map(|b| format!(" ({:.1}×)", ms(&times[i]) / ms(&b[i])))
                .unwrap_or_default()
        };
        println!(
            "{size:<12} {:>8.2} ms{} {:>8.2} ms{} {:>8.2} ms{} {:>9.1} ms{} {:>9.1} ms{} {:>8.2} ms{}",
            ms(&times[0]),
            ratio(0),
            ms(&times[1]),
            ratio(1),
            ms(&times[2]),
            ratio(2),
            ms(&times[3]),
            ratio(3),
            ms(&times[4]),
            ratio(4),
            ms(&times[5]),
            ratio(5)
        );
        baseline.get_or_insert(times);
    }
}
