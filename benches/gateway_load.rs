//! A bounded load run: trigger calls through the relay against calls straight to the same
//! fast upstream, measured in the same run so the ratio survives a noisy machine.
//! Everything listens on 127.0.0.1 and stops by itself.
//!
//! Run: `cargo bench --bench gateway_load` (env: LOAD_REQUESTS, default 20000;
//! LOAD_CONCURRENCY, default 64).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

const TRIGGER_RESPONSE: &str = include_str!("../tests/fixtures/gitlab/trigger_response.json");
/// The run stops after this long even if requests remain.
const TIME_LIMIT: Duration = Duration::from_secs(60);

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// An upstream that answers every call `201` with GitLab's example body at once.
async fn fast_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let service = service_fn(|request: Request<hyper::body::Incoming>| async move {
                let _ = request.into_body().collect().await;
                let mut response =
                    Response::new(Full::new(Bytes::from_static(TRIGGER_RESPONSE.as_bytes())));
                *response.status_mut() = StatusCode::CREATED;
                Ok::<_, Infallible>(response)
            });
            tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
        }
    });
    addr
}

struct Outcome {
    done: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

/// `requests` calls over `concurrency` keep-alive connections to `addr`.
async fn load(
    addr: SocketAddr,
    path: &'static str,
    requests: usize,
    concurrency: usize,
) -> Outcome {
    let remaining = Arc::new(AtomicUsize::new(requests));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let remaining = remaining.clone();
        workers.push(tokio::spawn(async move {
            let stream = TcpStream::connect(addr).await.unwrap();
            stream.set_nodelay(true).unwrap();
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .unwrap();
            tokio::spawn(connection);
            let mut latencies = Vec::new();
            while remaining
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                if started.elapsed() > TIME_LIMIT {
                    break;
                }
                let request = Request::post(path)
                    .header("host", "127.0.0.1")
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(Full::new(Bytes::from_static(
                        b"token=glptt-0123456789abcdef&ref=main&variables%5BUPLOAD_TO_S3%5D=true",
                    )))
                    .unwrap();
                let sent = Instant::now();
                let response = sender.send_request(request).await.unwrap();
                assert_eq!(response.status(), StatusCode::CREATED);
                let _ = response.into_body().collect().await.unwrap();
                latencies.push(sent.elapsed());
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for worker in workers {
        latencies.extend(worker.await.unwrap());
    }
    latencies.sort();
    Outcome {
        done: latencies.len(),
        elapsed: started.elapsed(),
        latencies,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn report(name: &str, outcome: &Outcome) -> f64 {
    let rate = outcome.done as f64 / outcome.elapsed.as_secs_f64();
    println!(
        "{name:<28} {:>7} requests  {:>9.0} req/s  p50 {:>7.2} ms  p99 {:>7.2} ms",
        outcome.done,
        rate,
        percentile(&outcome.latencies, 0.50).as_secs_f64() * 1000.0,
        percentile(&outcome.latencies, 0.99).as_secs_f64() * 1000.0,
    );
    rate
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this with few requests.
    let quick = !std::env::args().any(|a| a == "--bench");
    let requests = if quick {
        200
    } else {
        env_number("LOAD_REQUESTS", 20_000)
    };
    let concurrency = env_number("LOAD_CONCURRENCY", 64);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let upstream = fast_upstream().await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("relay.toml"),
            format!("[upstream.gitlab]\nurl = \"http://{upstream}\"\n[gateway]\n"),
        )
        .unwrap();
        let config = hookrelay::config::load(dir.path()).unwrap();
        let outbox = hookrelay::outbox::Outbox::open(&dir.path().join("state"), hookrelay::outbox::Durability::Full).unwrap();
        let app = hookrelay::server::App::new(config, outbox).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let relay = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(hookrelay::server::run(listener, app, async move {
            let _ = stopped.await;
        }));

        let path = "/api/v4/projects/9/trigger/pipeline";
        // Warm both paths (connection pools, allocators) before measuring.
        load(upstream, path, 500.min(requests), concurrency.min(8)).await;
        load(relay, path, 500.min(requests), concurrency.min(8)).await;
        println!("gateway load: {requests} form-encoded trigger calls, {concurrency} connections, 127.0.0.1");
        let direct = report("direct to upstream (base)", &load(upstream, path, requests, concurrency).await);
        let relayed = report("through hookrelay", &load(relay, path, requests, concurrency).await);
        println!("relayed / direct throughput: {:.2}", relayed / direct);

        let _ = stop.send(());
        server.await.unwrap().unwrap();
    });
}
