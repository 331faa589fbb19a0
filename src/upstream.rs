//! The shared HTTP client that carries trigger calls to GitLab.
//!
//! One [`Upstream`] per `[upstream.NAME]`, each a pooled hyper-util client (connections are
//! reused across calls) with rustls for HTTPS, trusting the roots [`crate::tls`] names; one
//! such pool per event loop ([`crate::event_loops`]) and one for every other thread.
//! Upstream addresses come only from configuration; a request decides the path, never the
//! host.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::outbound::{Outbound, Proxy};
use crate::trigger::UpstreamCall;

/// Largest answer read from GitLab (a pipeline entity is a few KiB).
const MAX_RESPONSE: usize = 4 * 1024 * 1024;

/// `[upstream.NAME]`: a GitLab instance that receives trigger calls.
#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    pub name: String,
    /// Base URL without a trailing slash, e.g. `https://gitlab.example.com` or
    /// `https://example.com/gitlab` for a relative URL root.
    pub url: http::Uri,
    /// Extra PEM certificates to trust (a self-hosted GitLab's CA).
    pub ca_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    /// Time allowed for the whole call: connect, send and read GitLab's answer.
    pub timeout: Duration,
    /// Pipeline-creating calls per project (GitLab.com allows 25 a minute).
    pub per_project: crate::limits::Limit,
    /// Default `coalesce` window for rules' triggers to this upstream.
    pub coalesce: Option<Duration>,
    /// Calls in flight to this upstream at most (gateway calls and triggers together).
    pub max_in_flight: usize,
    /// `read_token`: a token that may read pipelines (`read_api`), so that hookrelay polls
    /// the pipelines it started for their statuses where no pipeline events come.
    pub read_token: Option<ReadToken>,
    /// Polls of this upstream a minute at most, across all its pipelines.
    pub polls_per_minute: u32,
    /// The first poll of a pipeline waits this long; each later one twice the last, up to
    /// five minutes.
    pub poll_interval: Duration,
}

impl UpstreamConfig {
    /// The base URL as calls are built on it and messages show it: no trailing slash.
    pub fn base_url(&self) -> String {
        self.url.to_string().trim_end_matches('/').to_owned()
    }
}

/// `[upstream.NAME] read_token`: its reference, and what it resolved to at load (`None`
/// when secrets were not read).
#[derive(Clone, Debug)]
pub struct ReadToken {
    pub reference: crate::secret::SecretRef,
    pub token: Option<crate::secret::Secret>,
}

/// Default `[upstream.NAME] polls_per_minute`.
pub const DEFAULT_POLLS_PER_MINUTE: u32 = 60;

/// Default `[upstream.NAME] max_in_flight`.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 64;

/// The default upstream limit: GitLab.com's 25 pipeline creations a minute per project,
/// queued rather than refused.
pub fn default_per_project() -> crate::limits::Limit {
    crate::limits::Limit {
        rate: crate::limits::Rate::parse("25/min").expect("a valid rate"),
        burst: std::num::NonZeroU32::new(25).expect("not zero"),
        on_limit: crate::limits::OnLimit::Queue,
    }
}

/// An upstream base URL: `http` or `https`, a host, an optional path prefix, no query,
/// and no user or password: those would go with every call and show wherever the URL is
/// shown (`check`, `explain`, the dashboard), and no call needs them (a trigger call
/// carries its trigger token, a status post its status token).
pub fn parse_upstream_url(text: &str) -> Result<http::Uri, String> {
    if let Some(masked) = with_userinfo_masked(text) {
        return Err(format!(
            "{masked:?} has a user or password in it; none is needed (every call carries its own token: a trigger token, or a status token), and a password in a URL would show wherever the URL is shown"
        ));
    }
    let uri: http::Uri = text
        .parse()
        .map_err(|_| format!("{text:?} is not a URL; write e.g. \"https://gitlab.example.com\""))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(format!("{text:?} must start with https:// or http://")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{text:?} has no host"));
    }
    if uri.query().is_some() {
        return Err(format!("{text:?} must not have a query string"));
    }
    let trimmed = text.trim_end_matches('/');
    trimmed
        .parse()
        .map_err(|_| format!("{text:?} is not a URL"))
}

/// `text` with the user and password before its host replaced by `***`, when it has any.
fn with_userinfo_masked(text: &str) -> Option<String> {
    let start = text.find("://").map_or(0, |i| i + 3);
    let end = text[start..]
        .find(['/', '?', '#'])
        .map_or(text.len(), |i| start + i);
    let at = start + text[start..end].rfind('@')?;
    Some(format!("{}***{}", &text[..start], &text[at..]))
}

/// What a client calls, as messages name it: a configured GitLab, or the forge a
/// source posts commit statuses to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Called {
    /// `[upstream.NAME]`.
    Upstream(String),
    /// The forge of `[source.NAME]`'s `status`.
    Forge(String),
    /// GitHub's meta API, for its webhook addresses ([`crate::github_meta`]).
    GithubMeta,
}

impl std::fmt::Display for Called {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Called::Upstream(name) => write!(f, "upstream {name:?}"),
            Called::Forge(source) => write!(f, "the forge of source {source:?}"),
            Called::GithubMeta => f.write_str("GitHub's meta API"),
        }
    }
}

/// What went wrong talking to an upstream or a forge. Messages name it, never a token.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("{upstream} ({url}) is unreachable: {reason}")]
    Unreachable {
        upstream: Called,
        url: String,
        reason: String,
    },
    #[error("{upstream} ({url}) did not answer within {after:?}")]
    Timeout {
        upstream: Called,
        url: String,
        after: Duration,
    },
    #[error("{upstream} sent an answer that cannot be read: {reason}")]
    BadResponse { upstream: Called, reason: String },
    #[error("TLS setup for {upstream} failed: {reason}")]
    Tls { upstream: Called, reason: String },
    /// The proxy the environment names cannot be used.
    #[error("{upstream}: {reason}")]
    Proxy { upstream: Called, reason: String },
    /// `max_in_flight` calls were already under way and none finished in time.
    #[error(
        "upstream {upstream:?} already has {max_in_flight} calls under way ([upstream.{upstream}] max_in_flight); retry in a second"
    )]
    Busy {
        upstream: String,
        max_in_flight: usize,
    },
}

/// GitLab's answer, read whole.
#[derive(Debug)]
pub struct UpstreamResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// From sending the request to having read the whole answer.
    pub latency: Duration,
}

type HttpsClient = Client<HttpsConnector<Outbound>, Full<Bytes>>;

/// One configured GitLab and its connection pool.
pub struct Upstream {
    pub name: String,
    /// How messages name what it calls.
    called: Called,
    base: String,
    timeout: Duration,
    /// For calls made anywhere but on an event loop.
    client: HttpsClient,
    /// One pool per event loop, made on first use, so that a loop's calls never wait on
    /// a connection another thread drives ([`crate::event_loops`]).
    loop_clients: Box<[std::sync::OnceLock<Box<HttpsClient>>]>,
    connector: HttpsConnector<Outbound>,
    /// The HTTP proxy calls go through ([`crate::outbound`]).
    proxy: Option<Proxy>,
    /// Calls in flight, at most `max_in_flight` (`[upstream.NAME]`).
    in_flight: Arc<tokio::sync::Semaphore>,
    max_in_flight: usize,
}

/// Every configured upstream, by name.
#[derive(Clone, Default)]
pub struct Upstreams(BTreeMap<String, Arc<Upstream>>);

impl Upstreams {
    pub fn new(configs: &BTreeMap<String, UpstreamConfig>) -> Result<Upstreams, UpstreamError> {
        configs
            .iter()
            .map(|(name, config)| Ok((name.clone(), Arc::new(Upstream::new(config)?))))
            .collect::<Result<_, _>>()
            .map(Upstreams)
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.0.get(name)
    }

    /// The configured upstreams' names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }
}

impl Upstream {
    /// Time allowed for one whole call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn new(config: &UpstreamConfig) -> Result<Upstream, UpstreamError> {
        Upstream::calling(Called::Upstream(config.name.clone()), config)
    }

    /// A client of `called` (an upstream, or a forge for statuses) with `config`'s settings.
    pub fn calling(called: Called, config: &UpstreamConfig) -> Result<Upstream, UpstreamError> {
        let tls_error = |reason: String| UpstreamError::Tls {
            upstream: called.clone(),
            reason,
        };
        let tls = crate::tls::client_config(config.ca_file.as_deref()).map_err(tls_error)?;
        let base = config.base_url();
        let destination: http::Uri = base.parse().map_err(|err| UpstreamError::Proxy {
            upstream: called.clone(),
            reason: format!("{base} is not a URL hyper can call: {err}"),
        })?;
        let proxy =
            Proxy::for_destination(&destination).map_err(|reason| UpstreamError::Proxy {
                upstream: called.clone(),
                reason,
            })?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.connect_timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(Outbound::new(http, &destination, proxy.as_ref()));
        Ok(Upstream {
            name: config.name.clone(),
            called,
            base,
            timeout: config.timeout,
            client: pooled_client(https.clone()),
            loop_clients: (0..crate::event_loops::MAX)
                .map(|_| std::sync::OnceLock::new())
                .collect(),
            connector: https,
            proxy,
            in_flight: Arc::new(tokio::sync::Semaphore::new(config.max_in_flight)),
            max_in_flight: config.max_in_flight,
        })
    }

    /// [`Upstream::send`] for a caller who waits for the answer (the gateway): when the
    /// upstream already has `max_in_flight` calls under way for longer than `wait`, the
    /// call is refused instead of piling up.
    pub async fn send_within(
        &self,
        call: &UpstreamCall,
        wait: Duration,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let permit = tokio::time::timeout(wait, self.in_flight.acquire())
            .await
            .map_err(|_| UpstreamError::Busy {
                upstream: self.name.clone(),
                max_in_flight: self.max_in_flight,
            })?
            .expect("the in-flight semaphore is never closed");
        let answer = self.exchange(call).await;
        drop(permit);
        answer
    }

    /// The base URL, for messages.
    pub fn url(&self) -> &str {
        &self.base
    }

    /// Sends one call and reads GitLab's whole answer within the upstream's timeout; waits
    /// its turn while the upstream has `max_in_flight` calls under way.
    pub async fn send(&self, call: &UpstreamCall) -> Result<UpstreamResponse, UpstreamError> {
        let _turn = self.turn().await;
        self.exchange(call).await
    }

    /// Waits until fewer than `max_in_flight` calls are under way; the call holds the turn.
    async fn turn(&self) -> tokio::sync::SemaphorePermit<'_> {
        self.in_flight
            .acquire()
            .await
            .expect("the in-flight semaphore is never closed")
    }

    /// A trigger call, once it has its turn.
    async fn exchange(&self, call: &UpstreamCall) -> Result<UpstreamResponse, UpstreamError> {
        self.request(
            http::Method::POST,
            &call.path_and_query,
            trigger_headers(call),
            call.body.clone(),
        )
        .await
    }

    /// Makes any call below the base URL and reads the whole answer within the timeout,
    /// taking its turn among the `max_in_flight` calls: status posts to a forge, polls of
    /// a pipeline. `headers` may hold a token: they are never logged.
    pub async fn call(
        &self,
        method: http::Method,
        path_and_query: &str,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let _turn = self.turn().await;
        self.request(method, path_and_query, headers, body).await
    }

    async fn request(
        &self,
        method: http::Method,
        path_and_query: &str,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{}", self.base, path_and_query))
            .header(
                header::USER_AGENT,
                concat!("hookrelay/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(all) = request.headers_mut() {
            all.extend(headers);
            // A forwarding proxy (plain http) reads its credentials from every request; a
            // tunnel's went with its CONNECT.
            if let Some(authorization) = self.proxy.as_ref().and_then(Proxy::authorization)
                && !self.base.starts_with("https:")
            {
                all.insert(header::PROXY_AUTHORIZATION, authorization.clone());
            }
        }
        let request = request
            .body(Full::new(body))
            .map_err(|err| UpstreamError::BadResponse {
                upstream: self.called.clone(),
                reason: format!("the request cannot be built: {err}"),
            })?;
        let started = Instant::now();
        let exchange = async {
            let response = self
                .client()
                .request(request)
                .await
                .map_err(|err| self.request_error(&err))?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_RESPONSE)
                .collect()
                .await
                .map_err(|err| UpstreamError::BadResponse {
                    upstream: self.called.clone(),
                    reason: err.to_string(),
                })?
                .to_bytes();
            Ok(UpstreamResponse {
                status: parts.status,
                headers: parts.headers,
                body,
                latency: started.elapsed(),
            })
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(UpstreamError::Timeout {
                upstream: self.called.clone(),
                url: self.base.clone(),
                after: self.timeout,
            }),
        }
    }

    /// The pool for the thread making the call.
    fn client(&self) -> &HttpsClient {
        match crate::event_loops::current().and_then(|index| self.loop_clients.get(index)) {
            Some(client) => client.get_or_init(|| Box::new(pooled_client(self.connector.clone()))),
            None => &self.client,
        }
    }

    /// A connect timeout is a timeout; any other failure to exchange is "unreachable".
    fn request_error(&self, err: &hyper_util::client::legacy::Error) -> UpstreamError {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
        let mut deepest = err.to_string();
        let refused_certificate = crate::tls::refused_certificate_in(err);
        while let Some(current) = source {
            if let Some(io) = current.downcast_ref::<std::io::Error>()
                && io.kind() == std::io::ErrorKind::TimedOut
            {
                return UpstreamError::Timeout {
                    upstream: self.called.clone(),
                    url: self.base.clone(),
                    after: self.timeout,
                };
            }
            deepest = current.to_string();
            if let Some(reason) = crate::outbound::tunnel_refused(&deepest) {
                deepest = reason.to_owned();
                break;
            }
            source = current.source();
        }
        // A certificate refused says what to change instead of rustls's own words.
        let deepest = refused_certificate.unwrap_or(deepest);
        UpstreamError::Unreachable {
            upstream: self.called.clone(),
            url: self.base.clone(),
            reason: match &self.proxy {
                Some(proxy) => format!("{deepest} (through the proxy {})", proxy.shown),
                None => deepest,
            },
        }
    }
}

fn pooled_client(connector: HttpsConnector<Outbound>) -> HttpsClient {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .build(connector)
}

/// A trigger call's headers: JSON answers, and the body's own type.
fn trigger_headers(call: &UpstreamCall) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
    if let Some(content_type) = &call.content_type
        && let Ok(value) = HeaderValue::from_str(content_type)
    {
        headers.insert(header::CONTENT_TYPE, value);
    }
    headers
}

/// A string field of a JSON answer (`web_url` of a created pipeline).
pub fn readable_field(body: &[u8], field: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    value.get(field)?.as_str().map(str::to_owned)
}

/// GitLab's `message` made readable: a string as is, `{"base": ["Reference not found"]}` as
/// `base: Reference not found`; Grape's `error` key likewise; `None` for anything else.
pub fn readable_message(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    message_of(&value)
}

/// [`readable_message`] for an answer already parsed.
pub fn message_of(value: &serde_json::Value) -> Option<String> {
    let message = value.get("message").or_else(|| value.get("error"))?;
    Some(flatten_message(message))
}

/// GitLab's `message` value (a string, or an object of lists) as one readable line.
pub fn flatten_message(value: &serde_json::Value) -> String {
    use serde_json::Value;
    match value {
        Value::String(text) => text.clone(),
        Value::Array(items) => items
            .iter()
            .map(flatten_message)
            .collect::<Vec<_>>()
            .join("; "),
        Value::Object(map) => map
            .iter()
            .map(|(key, value)| format!("{key}: {}", flatten_message(value)))
            .collect::<Vec<_>>()
            .join("; "),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A user or password in an upstream's URL is refused, and the message masks them.
    #[test]
    fn an_upstream_url_with_a_password_is_refused_without_showing_it() {
        for url in [
            "https://user:s3cret@gitlab.example.com",
            "https://s3cret@gitlab.example.com/gitlab",
            "ftp://user:s3cret@gitlab.example.com?x",
        ] {
            let err = parse_upstream_url(url).unwrap_err();
            assert!(err.contains("has a user or password in it"), "{err}");
            assert!(err.contains("***@gitlab.example.com"), "{err}");
            assert!(!err.contains("s3cret"), "{err}");
        }
        assert!(parse_upstream_url("https://gitlab.example.com/a@b").is_ok());
        assert_eq!(
            parse_upstream_url("https://gitlab.example.com/")
                .unwrap()
                .to_string(),
            "https://gitlab.example.com/"
        );
    }

    /// How a stand-in upstream treats the connection after its answer.
    #[derive(Clone, Copy)]
    enum After {
        KeepAlive,
        /// Closes it without a word, as a server does when its keep-alive time runs out.
        Close,
        /// Says `Connection: close`, then closes it.
        SayClose,
    }

    /// A raw HTTP/1.1 stand-in on port 0: answers every request with 201 and a small JSON
    /// body, counts connections, and keeps each request's head.
    async fn stand_in(after: After) -> (String, Arc<AtomicUsize>, Arc<Mutex<Vec<String>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let connections = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (counted, kept) = (connections.clone(), heads.clone());
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                counted.fetch_add(1, Ordering::SeqCst);
                let kept = kept.clone();
                tokio::spawn(async move {
                    let mut buffer = Vec::new();
                    loop {
                        let mut chunk = [0u8; 4096];
                        let read = socket.read(&mut chunk).await.unwrap_or(0);
                        if read == 0 {
                            return;
                        }
                        buffer.extend_from_slice(&chunk[..read]);
                        // Bodies here are small and sent with the head.
                        let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") else {
                            continue;
                        };
                        let head = String::from_utf8_lossy(&buffer[..end]).into_owned();
                        let length: usize = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length: ")
                                    .map(|v| v.trim().parse().unwrap())
                            })
                            .unwrap_or(0);
                        if buffer.len() < end + 4 + length {
                            continue;
                        }
                        buffer.drain(..end + 4 + length);
                        kept.lock().unwrap().push(head);
                        let body = r#"{"id":7}"#;
                        let close = if matches!(after, After::SayClose) {
                            "connection: close\r\n"
                        } else {
                            ""
                        };
                        let answer = format!(
                            "HTTP/1.1 201 Created\r\ncontent-type: application/json\r\n{close}content-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        socket.write_all(answer.as_bytes()).await.unwrap();
                        match after {
                            After::KeepAlive => {}
                            // After the relay has put the connection back idle.
                            After::Close => {
                                tokio::time::sleep(Duration::from_millis(5)).await;
                                return;
                            }
                            After::SayClose => return,
                        }
                    }
                });
            }
        });
        (url, connections, heads)
    }

    fn upstream(url: &str) -> Upstream {
        Upstream::new(&config(url)).unwrap()
    }

    fn config(url: &str) -> UpstreamConfig {
        UpstreamConfig {
            name: "gitlab".into(),
            url: url.parse().unwrap(),
            ca_file: None,
            connect_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(5),
            per_project: default_per_project(),
            coalesce: None,
            max_in_flight: 4,
            read_token: None,
            polls_per_minute: 0,
            poll_interval: Duration::ZERO,
        }
    }

    async fn post(upstream: &Upstream, path: &str) -> UpstreamResponse {
        upstream
            .call(
                http::Method::POST,
                path,
                HeaderMap::new(),
                Bytes::from_static(b"ref=main"),
            )
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn calls_reuse_one_connection_and_name_the_host_and_url_root() {
        let (url, connections, heads) = stand_in(After::KeepAlive).await;
        let upstream = upstream(&format!("{url}/gitlab/"));
        for _ in 0..3 {
            let answer = post(&upstream, "/api/v4/projects/9/trigger/pipeline").await;
            assert_eq!(answer.status, StatusCode::CREATED);
            assert_eq!(&answer.body[..], br#"{"id":7}"#);
        }
        assert_eq!(connections.load(Ordering::SeqCst), 1);
        let heads = heads.lock().unwrap();
        let host = url.trim_start_matches("http://");
        for head in heads.iter() {
            assert!(
                head.starts_with("POST /gitlab/api/v4/projects/9/trigger/pipeline HTTP/1.1\r\n"),
                "{head}"
            );
            assert!(
                head.to_ascii_lowercase()
                    .contains(&format!("\r\nhost: {host}")),
                "{head}"
            );
        }
    }

    /// A call taken to a connection the upstream closed while it sat idle goes out again on
    /// a new one instead of failing, and closed connections are not kept.
    #[tokio::test]
    async fn connections_the_upstream_closed_are_not_used_again() {
        for after in [After::Close, After::SayClose] {
            let (url, connections, _) = stand_in(after).await;
            let upstream = upstream(&url);
            for round in 1..=3 {
                assert_eq!(post(&upstream, "/x").await.status, StatusCode::CREATED);
                // Give the close time to arrive, as it would between real calls.
                tokio::time::sleep(Duration::from_millis(20)).await;
                assert_eq!(connections.load(Ordering::SeqCst), round);
            }
        }
    }

    #[tokio::test]
    async fn concurrent_calls_each_get_a_connection_then_share_them() {
        let (url, connections, heads) = stand_in(After::KeepAlive).await;
        let upstream = upstream(&url);
        let calls = (0..4).map(|_| post(&upstream, "/x"));
        futures_util::future::join_all(calls).await;
        let opened = connections.load(Ordering::SeqCst);
        assert!((1..=4).contains(&opened), "{opened}");
        for _ in 0..8 {
            post(&upstream, "/x").await;
        }
        assert_eq!(connections.load(Ordering::SeqCst), opened);
        assert_eq!(heads.lock().unwrap().len(), 12);
    }

    #[tokio::test]
    async fn an_answer_too_large_is_a_bad_response_and_a_refused_connection_unreachable() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut chunk = [0u8; 4096];
            let _ = socket.read(&mut chunk).await;
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n",
                MAX_RESPONSE + 1
            );
            socket.write_all(head.as_bytes()).await.unwrap();
            let _ = socket.write_all(&vec![b'x'; MAX_RESPONSE + 1]).await;
        });
        let too_large = upstream(&url)
            .call(http::Method::POST, "/x", HeaderMap::new(), Bytes::new())
            .await;
        assert!(
            matches!(too_large, Err(UpstreamError::BadResponse { .. })),
            "{too_large:?}"
        );

        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let refused = upstream(&url)
            .call(http::Method::POST, "/x", HeaderMap::new(), Bytes::new())
            .await;
        match refused {
            Err(UpstreamError::Unreachable { reason, .. }) => {
                assert!(reason.contains("refused"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        // A forge's client names the source whose statuses it posts.
        let forge = Upstream::calling(Called::Forge("github".into()), &config(&url)).unwrap();
        let refused = forge
            .call(http::Method::POST, "/x", HeaderMap::new(), Bytes::new())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            refused.starts_with(&format!(
                "the forge of source \"github\" ({url}) is unreachable: "
            )),
            "{refused}"
        );
    }

    #[test]
    fn gitlab_messages_become_readable() {
        assert_eq!(
            readable_message(br#"{"message":"404 Not Found"}"#).as_deref(),
            Some("404 Not Found")
        );
        assert_eq!(
            readable_message(br#"{"message":{"base":["Reference not found","Ref is ambiguous"]}}"#)
                .as_deref(),
            Some("base: Reference not found; Ref is ambiguous")
        );
        assert_eq!(
            readable_message(br#"{"error":"token is missing"}"#).as_deref(),
            Some("token is missing")
        );
        assert_eq!(readable_message(b"Retry later"), None);
    }
}
