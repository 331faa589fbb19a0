//! A bounded load generator for the load benchmarks: keep-alive HTTP/1.1 connections to
//! 127.0.0.1, a fixed number of requests, and a time limit after which it stops.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The run stops after this long even if requests remain.
pub const TIME_LIMIT: Duration = Duration::from_secs(60);

pub struct Outcome {
    pub done: usize,
    pub elapsed: Duration,
    pub latencies: Vec<Duration>,
}

impl Outcome {
    pub fn rate(&self) -> f64 {
        self.done as f64 / self.elapsed.as_secs_f64()
    }

    pub fn percentile(&self, p: f64) -> Duration {
        self.latencies[((self.latencies.len() as f64 - 1.0) * p).round() as usize]
    }

    /// Prints one line and returns the rate.
    pub fn report(&self, name: &str) -> f64 {
        println!(
            "{name:<34} {:>7} requests  {:>9.0} req/s  p50 {:>7.2} ms  p99 {:>7.2} ms",
            self.done,
            self.rate(),
            self.percentile(0.50).as_secs_f64() * 1000.0,
            self.percentile(0.99).as_secs_f64() * 1000.0,
        );
        self.rate()
    }
}

/// Sends `requests` requests built by `request(i)` over `concurrency` connections to
/// `addr`; each answer must have status `expect`.
pub async fn load(
    addr: SocketAddr,
    requests: usize,
    concurrency: usize,
    expect: u16,
    request: Arc<dyn Fn(usize) -> Request<Full<Bytes>> + Send + Sync>,
) -> Outcome {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (next, request) = (next.clone(), request.clone());
        workers.push(tokio::spawn(async move {
            let stream = TcpStream::connect(addr).await.unwrap();
            stream.set_nodelay(true).unwrap();
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .unwrap();
            tokio::spawn(connection);
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= requests || started.elapsed() > TIME_LIMIT {
                    break;
                }
                let sent = Instant::now();
                let response = sender.send_request(request(i)).await.unwrap();
                let status = response.status().as_u16();
                let body = response.into_body().collect().await.unwrap().to_bytes();
                assert_eq!(status, expect, "{}", String::from_utf8_lossy(&body));
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

/// `cargo bench` passes `--bench`; anything else (`cargo test --benches`) runs briefly.
pub fn quick() -> bool {
    !std::env::args().any(|a| a == "--bench")
}

pub fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The relay, in this process, on 127.0.0.1:0, with its configuration and state in `dir`.
pub struct RunningRelay {
    pub addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    _dir: tempfile::TempDir,
}

/// Starts the relay on the configuration already written in `dir` (no forwarder runs).
pub async fn start_relay(
    dir: tempfile::TempDir,
    durability: hookrelay::outbox::Durability,
) -> RunningRelay {
    let config = hookrelay::config::load(dir.path()).unwrap();
    let outbox = hookrelay::outbox::Outbox::open(&dir.path().join("state"), durability).unwrap();
    let app = hookrelay::app::App::new(config, outbox).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(hookrelay::server::run(listener, app, async move {
        let _ = stopped.await;
    }));
    RunningRelay {
        addr,
        stop,
        server,
        _dir: dir,
    }
}

impl RunningRelay {
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.server.await.unwrap().unwrap();
    }
}

/// Builds signed GitHub webhooks of `body` (secret `secret`), delivery ids `{prefix}-{i}`.
pub fn signed_github(
    secret: &'static str,
    body: &'static [u8],
    prefix: &str,
) -> Arc<dyn Fn(usize) -> Request<Full<Bytes>> + Send + Sync> {
    let signature = format!(
        "sha256={}",
        hookrelay::sources::signature::hmac_hex(
            hookrelay::sources::signature::Algorithm::Sha256,
            secret.as_bytes(),
            body
        )
    );
    let prefix = prefix.to_owned();
    Arc::new(move |i: usize| {
        Request::post("/hooks/github")
            .header("host", "127.0.0.1")
            .header("content-type", "application/json")
            .header("x-github-event", "push")
            .header("x-github-delivery", format!("{prefix}-{i}"))
            .header("x-hub-signature-256", signature.as_str())
            .body(Full::new(Bytes::from_static(body)))
            .unwrap()
    })
}

/// Starts the release binary's `serve` (or `$HOOKRELAY`'s) on the configuration folder `config` and state
/// folder `state`, with `env` set and its logs quiet, and waits until `address` accepts.
pub async fn serve_binary(
    config: &std::path::Path,
    state: &std::path::Path,
    env: &[(&str, &str)],
    address: SocketAddr,
) -> std::process::Child {
    // `HOOKRELAY=path` measures another build (an older commit, as a baseline in the same
    // run), as `benches/cluster.sh` does.
    let binary =
        std::env::var_os("HOOKRELAY").unwrap_or_else(|| env!("CARGO_BIN_EXE_hookrelay").into());
    let child = std::process::Command::new(binary)
        .args(["serve", "--config"])
        .arg(config)
        .arg("--state")
        .arg(state)
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while TcpStream::connect(address).await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the relay did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child
}
