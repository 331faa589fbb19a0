//! Shared test harness: a recording upstream and the relay, each on port 0 of 127.0.0.1.
#![allow(dead_code)]

pub mod binary;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const TRIGGER_RESPONSE: &str = include_str!("../fixtures/gitlab/trigger_response.json");

/// What the upstream received.
#[derive(Clone, Debug)]
pub struct Received {
    pub method: String,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Received {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("upstream received JSON")
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// The `DELIVERY` variable of each trigger call, in the order the upstream got them (the
/// test rules set it to the webhook's delivery id).
pub fn deliveries_in_order(received: &[Received]) -> Vec<String> {
    received
        .iter()
        .map(|r| {
            r.json()["variables"]["DELIVERY"]
                .as_str()
                .expect("a DELIVERY variable")
                .to_owned()
        })
        .collect()
}

/// A scripted answer.
#[derive(Clone, Debug)]
pub struct Answer {
    pub status: u16,
    pub body: String,
    pub headers: Vec<(&'static str, String)>,
    pub delay: Duration,
}

impl Answer {
    pub fn created() -> Answer {
        Answer::new(201, TRIGGER_RESPONSE)
    }
    pub fn new(status: u16, body: &str) -> Answer {
        Answer {
            status,
            body: body.to_owned(),
            headers: Vec::new(),
            delay: Duration::ZERO,
        }
    }
    pub fn header(mut self, name: &'static str, value: &str) -> Answer {
        self.headers.push((name, value.to_owned()));
        self
    }
    pub fn delayed(mut self, delay: Duration) -> Answer {
        self.delay = delay;
        self
    }
}

/// An upstream that records every request and answers from a script (then `201`).
pub struct RecordingUpstream {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<Received>>>,
    /// When each request arrived.
    pub arrivals: Arc<Mutex<Vec<std::time::Instant>>>,
    /// How long unscripted answers take.
    pub default_delay: Arc<Mutex<Duration>>,
    pub script: Arc<Mutex<Vec<Answer>>>,
    pub connections: Arc<AtomicUsize>,
    /// Calls being answered now, and the most ever at once.
    pub concurrent: Arc<AtomicUsize>,
    pub max_concurrent: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl RecordingUpstream {
    pub async fn start() -> RecordingUpstream {
        RecordingUpstream::start_on("127.0.0.1:0").await
    }

    /// [`RecordingUpstream::start`] on a given address (a port reserved earlier).
    pub async fn start_on(address: &str) -> RecordingUpstream {
        let listener = TcpListener::bind(address).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let script: Arc<Mutex<Vec<Answer>>> = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let default_delay = Arc::new(Mutex::new(Duration::ZERO));
        let concurrent = Arc::new(AtomicUsize::new(0));
        let max_concurrent = Arc::new(AtomicUsize::new(0));
        let (r, s, c, a, d) = (
            received.clone(),
            script.clone(),
            connections.clone(),
            arrivals.clone(),
            default_delay.clone(),
        );
        let (now, most) = (concurrent.clone(), max_concurrent.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let (r, s, a, d) = (r.clone(), s.clone(), a.clone(), d.clone());
                let (now, most) = (now.clone(), most.clone());
                let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                    let (r, s, a, d) = (r.clone(), s.clone(), a.clone(), d.clone());
                    let (now, most) = (now.clone(), most.clone());
                    async move {
                        a.lock().unwrap().push(std::time::Instant::now());
                        let at_once = now.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(at_once, Ordering::SeqCst);
                        // Counted down however the call ends (a caller that goes away
                        // drops this future mid-sleep).
                        struct Leaving(Arc<AtomicUsize>);
                        impl Drop for Leaving {
                            fn drop(&mut self) {
                                self.0.fetch_sub(1, Ordering::SeqCst);
                            }
                        }
                        let leaving = Leaving(now);
                        let (parts, body) = request.into_parts();
                        let body = body
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        r.lock().unwrap().push(Received {
                            method: parts.method.to_string(),
                            path_and_query: parts
                                .uri
                                .path_and_query()
                                .map(|p| p.to_string())
                                .unwrap_or_default(),
                            headers: parts.headers,
                            body,
                        });
                        let answer = {
                            let mut script = s.lock().unwrap();
                            if script.is_empty() {
                                Answer::created().delayed(*d.lock().unwrap())
                            } else {
                                script.remove(0)
                            }
                        };
                        tokio::time::sleep(answer.delay).await;
                        drop(leaving);
                        let mut response = Response::new(Full::new(Bytes::from(answer.body)));
                        *response.status_mut() = StatusCode::from_u16(answer.status).unwrap();
                        response
                            .headers_mut()
                            .insert("content-type", "application/json".parse().unwrap());
                        for (name, value) in answer.headers {
                            response.headers_mut().insert(name, value.parse().unwrap());
                        }
                        Ok::<_, Infallible>(response)
                    }
                });
                tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
            }
        });
        RecordingUpstream {
            addr,
            received,
            arrivals,
            default_delay,
            script,
            connections,
            concurrent,
            max_concurrent,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn answer_next(&self, answer: Answer) {
        self.script.lock().unwrap().push(answer);
    }

    pub fn received_at(&self) -> Vec<std::time::Instant> {
        self.arrivals.lock().unwrap().clone()
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Waits up to 5 s for the `n`th call, then says how many came.
    pub async fn wait_for_calls(&self, n: usize) {
        for _ in 0..100 {
            if self.received().len() >= n {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert_eq!(self.received().len(), n, "calls received");
    }

    pub fn only(&self) -> Received {
        let received = self.received();
        assert_eq!(
            received.len(),
            1,
            "expected exactly one upstream call, got {received:#?}"
        );
        received.into_iter().next().unwrap()
    }
}

impl Drop for RecordingUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The relay running in this process on 127.0.0.1:0.
pub struct Relay {
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    pub app: std::sync::Arc<hookrelay::app::App>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
    forwarder_stop: tokio::sync::watch::Sender<bool>,
    forwarder: Option<JoinHandle<()>>,
}

/// Forwarder settings for tests: quick retries, short drain.
pub fn fast_forwarding() -> hookrelay::forwarder::ForwarderOptions {
    hookrelay::forwarder::ForwarderOptions {
        workers: 4,
        policy: hookrelay::retry::RetryPolicy {
            base: Duration::from_millis(20),
            cap: Duration::from_millis(200),
            max_age: Duration::from_secs(600),
        },
        dry_run: false,
        retention: Duration::from_secs(3600),
        drain: Duration::from_secs(2),
        poll: hookrelay::forwarder::POLL,
    }
}

/// A configuration whose gateway forwards to `upstream_url`, plus `extra` TOML.
pub fn gateway_config(upstream_url: &str, extra: &str) -> String {
    format!(
        "[upstream.gitlab]\nurl = \"{upstream_url}\"\ntimeout = \"2s\"\nconnect_timeout = \"1s\"\n\n[gateway]\nupstream = \"gitlab\"\n{extra}"
    )
}

impl Relay {
    pub async fn start(config_toml: &str) -> Relay {
        Relay::start_with(config_toml, &[]).await
    }

    /// Starts with `files` (name, contents) written beside the configuration first, and
    /// `{dir}` in the configuration replaced by that folder (for `file:` secrets).
    pub async fn start_with(config_toml: &str, files: &[(&str, &str)]) -> Relay {
        Relay::start_full(config_toml, files, fast_forwarding()).await
    }

    /// Starts with explicit forwarder settings (retry timing, dry run).
    pub async fn start_full(
        config_toml: &str,
        files: &[(&str, &str)],
        forwarding: hookrelay::forwarder::ForwarderOptions,
    ) -> Relay {
        let dir = tempfile::tempdir().unwrap();
        for (name, contents) in files {
            std::fs::write(dir.path().join(name), contents).unwrap();
        }
        let config_toml = config_toml.replace("{dir}", &dir.path().display().to_string());
        std::fs::write(dir.path().join("relay.toml"), config_toml).unwrap();
        let config = hookrelay::config::load(dir.path()).unwrap_or_else(|p| panic!("config: {p}"));
        let outbox = hookrelay::outbox::Outbox::open(
            &dir.path().join("state"),
            hookrelay::outbox::Durability::Full,
        )
        .unwrap();
        let app =
            hookrelay::app::App::with_options(config, outbox.clone(), None, forwarding.dry_run)
                .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(hookrelay::server::run(listener, app.clone(), async move {
            let _ = rx.await;
        }));
        let (forwarder_stop, stopped) = tokio::sync::watch::channel(false);
        let forwarder = tokio::spawn(hookrelay::forwarder::run(
            app.clone(),
            outbox,
            forwarding,
            stopped,
        ));
        Relay {
            addr,
            dir,
            app,
            shutdown: Some(tx),
            task: Some(task),
            forwarder_stop,
            forwarder: Some(forwarder),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Sends the shutdown signal and waits for `run` to return.
    pub async fn stop(mut self) {
        self.signal_shutdown();
        self.wait().await;
    }

    pub fn signal_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    pub async fn wait(mut self) {
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("relay stops")
                .unwrap()
                .unwrap();
        }
        let _ = self.forwarder_stop.send(true);
        if let Some(forwarder) = self.forwarder.take() {
            tokio::time::timeout(Duration::from_secs(10), forwarder)
                .await
                .expect("forwarder stops")
                .unwrap();
        }
    }

    /// The state folder (the delivery store).
    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
        if let Some(forwarder) = &self.forwarder {
            forwarder.abort();
        }
    }
}

/// An answer from the relay.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("JSON reply, got {:?}", self.text()))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends one request with the given headers and body.
pub async fn send(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut request = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = client
        .request(request.body(Full::new(body.into())).unwrap())
        .await
        .expect("relay answers");
    let (parts, body) = response.into_parts();
    Reply {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

pub async fn post(url: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Reply {
    send("POST", url, headers, body).await
}

/// Runs `curl` with `args` (the URL among them) and returns (status, body).
pub fn curl(args: &[&str]) -> (u16, String) {
    let output = std::process::Command::new("curl")
        .args(["--silent", "--show-error", "--write-out", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl is installed");
    assert!(
        output.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    let (body, status) = text.rsplit_once('\n').unwrap();
    (status.parse().unwrap(), body.to_owned())
}

pub fn fixture(path: &str) -> Vec<u8> {
    std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(path),
    )
    .unwrap()
}

/// Everything the delivery store holds on disk, main file and write-ahead log, as text,
/// and every stored body decompressed (bodies are stored LZ4-compressed, which would hide
/// a secret from a scan of the files alone): for checking that a secret never reached it.
pub fn store_bytes(state: &std::path::Path) -> String {
    use hookrelay::store::Engine;
    let mut all = Vec::new();
    for name in [
        hookrelay::outbox::STORE_FILE.to_owned(),
        format!("{}-wal", hookrelay::outbox::STORE_FILE),
    ] {
        if let Ok(bytes) = std::fs::read(state.join(name)) {
            all.extend(bytes);
        }
    }
    let mut engine = hookrelay::store::sqlite::SqliteEngine::open_existing(state).unwrap();
    let mut ids: Vec<String> = engine
        .list(&hookrelay::outbox::ListFilter {
            limit: 100_000,
            ..Default::default()
        })
        .unwrap()
        .into_iter()
        .map(|row| row.delivery_id)
        .collect();
    ids.dedup();
    for id in ids {
        if let Some(stored) = engine.stored_webhook(&id).unwrap() {
            all.extend(stored.body);
        }
    }
    String::from_utf8_lossy(&all).into_owned()
}

/// Posts a GitHub fixture to `url` as GitHub would: JSON, the event header, a delivery id,
/// and `X-Hub-Signature-256` computed with `secret` over the exact bytes sent.
pub async fn signed_github(
    url: &str,
    secret: &str,
    event: &str,
    delivery: &str,
    file: &str,
) -> Reply {
    signed_github_body(url, secret, event, delivery, fixture(file)).await
}

/// `sha256=<hex HMAC-SHA256 of body>`, as GitHub (and Bitbucket) sign a webhook.
pub fn sha256_signature(secret: &str, body: &[u8]) -> String {
    format!(
        "sha256={}",
        hookrelay::sources::signature::hmac_hex(
            hookrelay::sources::signature::Algorithm::Sha256,
            secret.as_bytes(),
            body
        )
    )
}

/// [`signed_github`] with a body of the test's own making.
pub async fn signed_github_body(
    url: &str,
    secret: &str,
    event: &str,
    delivery: &str,
    body: Vec<u8>,
) -> Reply {
    let signature = sha256_signature(secret, &body);
    let headers = [
        ("content-type", "application/json"),
        ("X-GitHub-Event", event),
        ("X-GitHub-Delivery", delivery),
        ("X-Hub-Signature-256", signature.as_str()),
    ];
    post(url, &headers, body).await
}

/// The store's newest rows, as `hookrelay deliveries` lists them (`failed`: only triggers
/// that failed for good).
pub fn listed(
    location: &hookrelay::store::StoreLocation,
    failed: bool,
    limit: usize,
) -> Result<Vec<hookrelay::outbox::DeliveryRow>, hookrelay::outbox::StoreError> {
    hookrelay::outbox::list(
        location,
        &hookrelay::outbox::ListFilter {
            state: failed.then_some(hookrelay::outbox::StateFilter::Failed),
            limit,
            ..Default::default()
        },
    )
}

/// An HTTPS upstream on 127.0.0.1:0 that answers every call with GitLab's trigger
/// answer, its certificate (for `names`) signed by a fresh CA; returns its port and the
/// CA's PEM.
pub async fn https_upstream(names: &[&str]) -> (u16, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let server_config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(server_config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let service = hyper::service::service_fn(|_request| async {
                    let mut response = http::Response::new(http_body_util::Full::new(
                        bytes::Bytes::from(TRIGGER_RESPONSE),
                    ));
                    *response.status_mut() = http::StatusCode::CREATED;
                    Ok::<_, std::convert::Infallible>(response)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (port, ca.pem())
}

/// Waits (at most `limit`) until `done` holds; fails saying `what` did not happen.
pub async fn eventually(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
