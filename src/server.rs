//! The HTTP server: accept, route, bound bodies and read times, shut down gracefully.
//!
//! [`run`] takes an already-bound listener and a shutdown future, so tests bind port 0 and
//! stop the server deterministically. Routing is one `match` over the path in [`route`];
//! every error is answered through [`crate::error::error_response`]. Each request is logged
//! once, with its method, path (never the query string, which may hold a token), status
//! and upstream latency.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::json;
use tokio::net::TcpListener;

use crate::app::App;
use crate::bare_refusals::{Explained, MOST_HEADER_BYTES};
use crate::client_address::{Caller, allowed};
use crate::clipped::Clipped;
use crate::error::{ApiError, error_response, json_response};
use crate::gateway::{self, CallRequest, GatewayError};
use crate::lingering::Lingering;

/// Serves until `shutdown` completes, then stops accepting, lets in-flight requests finish
/// for at most `[server] shutdown_timeout`, and returns.
pub async fn run(
    listener: TcpListener,
    app: Arc<App>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    serve(listener, app, shutdown, Site::Webhooks).await
}

/// What a listener serves: webhooks and the gateway, or the delivery dashboard (`[admin]`,
/// with its own certificate when it serves HTTPS).
#[derive(Clone)]
pub enum Site {
    Webhooks,
    Admin(Option<Arc<crate::tls::ServerCertificate>>),
}

/// [`run`] for either site: the same bounds on connections, reads and shutdown.
pub async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    shutdown: impl Future<Output = ()>,
    site: Site,
) -> std::io::Result<()> {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(app.server.read_timeout)
        .max_buf_size(MOST_HEADER_BYTES)
        .keep_alive(true);
    let graceful = GracefulShutdown::new();
    // HTTPS when `[server] tls_cert` is set: each connection's handshake runs in its own
    // task, within the read timeout, so a slow or silent client holds up no one else.
    let handshake_within = app.server.read_timeout;
    let certificate = match &site {
        Site::Webhooks => app.tls.clone(),
        Site::Admin(certificate) => certificate.clone(),
    };
    let acceptor = match &certificate {
        Some(certs) => Some(tokio_rustls::TlsAcceptor::from(Arc::new(
            crate::tls::server_config(certs.clone()).map_err(std::io::Error::other)?,
        ))),
        None => None,
    };
    let connections = crate::connections::Connections::new(app.max_connections);
    let loops = match (
        &site,
        crate::event_loops::count(app.server.event_loops, app.outbox.shared),
    ) {
        (Site::Webhooks, count) if count > 0 => Some(crate::event_loops::EventLoops::start(count)?),
        _ => None,
    };
    let mut refused_logged = Instant::now() - Duration::from_secs(1);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // At the cap an idle connection is closed; wait (briefly) until it is gone.
                let mut waited = 0;
                let guard = loop {
                    match connections.admit() {
                        (crate::connections::Admission::Serve(guard), _) => break Some(guard),
                        (crate::connections::Admission::Wait, shed) => {
                            if shed {
                                app.metrics.connection_shed();
                            }
                            waited += 1;
                            if waited > 50 {
                                break None;
                            }
                            let _ = tokio::time::timeout(Duration::from_millis(20), connections.freed()).await;
                        }
                        (crate::connections::Admission::Refuse, _) => break None,
                    }
                };
                let Some(guard) = guard else {
                    if refused_logged.elapsed() >= Duration::from_secs(1) {
                        refused_logged = Instant::now();
                        tracing::warn!(max_connections = app.max_connections, "no connection could be closed to make room; closing a new one");
                    }
                    drop(stream);
                    continue;
                };
                let app = app.clone();
                let id = guard.id;
                let (requested, busy) = (guard.requested.clone(), guard.busy.clone());
                let site = site.clone();
                let service = service_fn(move |request| {
                    let app = app.clone();
                    let (requested, busy) = (requested.clone(), busy.clone());
                    let site = site.clone();
                    async move {
                        requested.store(true, Ordering::SeqCst);
                        busy.store(true, Ordering::SeqCst);
                        let response = match site {
                            Site::Webhooks => handle(&app, peer, request).await,
                            Site::Admin(_) => crate::admin::handle(&app, peer, request).await,
                        };
                        busy.store(false, Ordering::SeqCst);
                        Ok::<_, Infallible>(response)
                    }
                });
                let watcher = graceful.watcher();
                let http = http.clone();
                let acceptor = acceptor.clone();
                let work = async move |stream: tokio::net::TcpStream| {
                    let _guard = guard;
                    let served = match acceptor {
                        None => watcher.watch(http.serve_connection(TokioIo::new(Explained::new(Lingering::new(stream))), service)).await,
                        Some(acceptor) => {
                            match tokio::time::timeout(handshake_within, acceptor.accept(Lingering::new(stream))).await {
                                Ok(Ok(tls)) => watcher.watch(http.serve_connection(TokioIo::new(Explained::new(tls)), service)).await,
                                Ok(Err(err)) => {
                                    tracing::debug!(%peer, error = %err, "TLS handshake failed");
                                    return;
                                }
                                Err(_) => {
                                    tracing::debug!(%peer, "no TLS handshake within the read timeout");
                                    return;
                                }
                            }
                        }
                    };
                    if let Err(err) = served {
                        tracing::debug!(%peer, error = %err, "connection ended with an error");
                    }
                };
                let task = match &loops {
                    None => tokio::spawn(async move { work(stream).await }),
                    Some(loops) => {
                        let stream = match stream.into_std() {
                            Ok(stream) => stream,
                            Err(err) => {
                                tracing::debug!(%peer, error = %err, "connection could not leave the accepting thread");
                                continue;
                            }
                        };
                        loops.spawn(async move {
                            match tokio::net::TcpStream::from_std(stream) {
                                Ok(stream) => work(stream).await,
                                Err(err) => tracing::debug!(%peer, error = %err, "connection could not join its event loop"),
                            }
                        })
                    }
                };
                connections.register(id, task.abort_handle());
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    if matches!(site, Site::Webhooks) {
        app.shutting_down.store(true, Ordering::SeqCst);
    }
    let bound = app.server.shutdown_timeout;
    tracing::info!(timeout = ?bound, "shutting down: finishing in-flight requests");
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(bound) => tracing::warn!(timeout = ?bound, "shutdown timed out; closing remaining connections"),
    }
    Ok(())
}

/// What a request path names.
#[derive(Debug, PartialEq, Eq)]
enum Route<'a> {
    Healthz,
    Readyz,
    Metrics,
    Trigger {
        project: &'a str,
        git_ref: Option<String>,
    },
    Hook {
        source: &'a str,
    },
    /// A trigger URL whose project path is not URL-encoded (`projects/group/app/…`): GitLab
    /// answers it with a bare 404; the relay names the URL to use instead.
    UnencodedProject {
        use_instead: String,
    },
    NotFound,
}

impl Route<'_> {
    /// The endpoint's name in metrics.
    fn endpoint(&self) -> &'static str {
        match self {
            Route::Healthz => "healthz",
            Route::Readyz => "readyz",
            Route::Metrics => "metrics",
            Route::Trigger { git_ref: None, .. } => "trigger",
            Route::Trigger {
                git_ref: Some(_), ..
            } => "trigger_webhook",
            Route::Hook { .. } => "hooks",
            Route::UnencodedProject { .. } | Route::NotFound => "not_found",
        }
    }
}

/// The one routing table. Path pieces stay percent-encoded here; the handler decodes them.
fn route(path: &str) -> Route<'_> {
    let segments: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
    match segments.as_slice() {
        ["healthz"] => Route::Healthz,
        ["readyz"] => Route::Readyz,
        ["metrics"] => Route::Metrics,
        ["hooks", source] if !source.is_empty() => Route::Hook { source },
        ["api", "v4", "projects", project, "trigger", "pipeline"] if !project.is_empty() => {
            Route::Trigger {
                project,
                git_ref: None,
            }
        }
        // GitLab's `:ref` matches `.+`, so an unencoded `feature/x` is one ref too.
        [
            "api",
            "v4",
            "projects",
            project,
            "ref",
            git_ref @ ..,
            "trigger",
            "pipeline",
        ] if !project.is_empty()
            && !git_ref.is_empty()
            && git_ref.iter().all(|s| !s.is_empty()) =>
        {
            Route::Trigger {
                project,
                git_ref: Some(git_ref.join("/")),
            }
        }
        ["api", "v4", "projects", rest @ .., "trigger", "pipeline"] => unencoded_project(rest),
        _ => Route::NotFound,
    }
}

/// A trigger URL whose project path spans several segments (`group/app`, or
/// `group/app/ref/main` in the webhook form), with the URL that encodes it; anything else
/// is simply not found.
fn unencoded_project(segments: &[&str]) -> Route<'static> {
    // The webhook form: the first `ref` after at least two project segments starts the ref.
    let (project, git_ref) = match segments.iter().skip(2).position(|s| *s == "ref") {
        Some(at) => (&segments[..at + 2], Some(&segments[at + 3..])),
        None => (segments, None),
    };
    // `projects/9/ref/trigger/pipeline` is the webhook form without a ref, not a project
    // named `9/ref`.
    if project.len() < 2
        || project[1..].contains(&"ref")
        || project.iter().any(|s| s.is_empty())
        || git_ref.is_some_and(|r| r.is_empty() || r.iter().any(|s| s.is_empty()))
    {
        return Route::NotFound;
    }
    let project = project.join("%2F");
    let use_instead = match git_ref {
        None => format!("/api/v4/projects/{project}/trigger/pipeline"),
        Some(git_ref) => format!(
            "/api/v4/projects/{project}/ref/{}/trigger/pipeline",
            git_ref.join("%2F")
        ),
    };
    Route::UnencodedProject { use_instead }
}

async fn handle(app: &App, peer: SocketAddr, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let mut upstream_latency = None;
    // Who sent it, asked once for allow_from, per_client and records; behind a trusted
    // proxy, the log lines name the client it forwarded for too.
    let caller = app.caller(peer.ip(), request.headers());
    let client = caller.via.map(|_| tracing::field::display(caller.client));
    let route = route(&path);
    let endpoint = route.endpoint();
    let (response, reason) =
        match dispatch(app, caller, route, request, &mut upstream_latency).await {
            Ok(response) => (response, None),
            Err(err) => {
                if let ApiError::RateLimited { limit, .. }
                | ApiError::LimitUnavailable { limit, .. } = &err
                {
                    app.metrics.limit_refused(limit);
                }
                // The same words the caller got: they name what to fix, never a secret.
                (error_response(&err), Some(err.to_string()))
            }
        };
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    app.metrics.request(endpoint, status);
    app.metrics
        .request_duration(endpoint, elapsed.as_secs_f64());
    let elapsed_ms = millis(elapsed);
    let upstream_ms = upstream_latency.map(millis);
    let (method, path) = (Clipped(method.as_str()), Clipped(&path));
    let Some(reason) = reason else {
        tracing::info!(%peer, client, %method, %path, status, elapsed_ms, upstream_ms, "request");
        return response;
    };
    // Past the budget: counted in the metrics, and in the next line that goes.
    let Some(held_back) = app.may_log_refusal(endpoint, status) else {
        return response;
    };
    if status >= 500 {
        tracing::warn!(%peer, client, %method, %path, status, elapsed_ms, upstream_ms, %reason, held_back, "request refused")
    } else {
        tracing::info!(%peer, client, %method, %path, status, elapsed_ms, upstream_ms, %reason, held_back, "request refused")
    }
    response
}

/// A duration in milliseconds with one decimal, as a number (JSON logs keep it numeric).
fn millis(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 10_000.0).round() / 10.0
}

async fn dispatch(
    app: &App,
    caller: Caller,
    route: Route<'_>,
    request: Request<Incoming>,
    upstream_latency: &mut Option<Duration>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let method = request.method().clone();
    let not_allowed = |allowed: &'static str| ApiError::MethodNotAllowed {
        method: method.to_string(),
        allowed,
    };
    match route {
        Route::Healthz => match method {
            Method::GET | Method::HEAD => {
                Ok(json_response(StatusCode::OK, &json!({ "status": "ok" })))
            }
            _ => Err(not_allowed("GET, HEAD")),
        },
        Route::Readyz => match method {
            Method::GET | Method::HEAD if app.shutting_down.load(Ordering::SeqCst) => {
                Err(ApiError::ShuttingDown)
            }
            Method::GET | Method::HEAD => match app.outbox.health.problem() {
                Some(reason) => Err(ApiError::StoreUnwritable(reason)),
                None => Ok(json_response(StatusCode::OK, &json!({ "status": "ready" }))),
            },
            _ => Err(not_allowed("GET, HEAD")),
        },
        Route::Trigger { project, git_ref } => {
            if method != Method::POST {
                return Err(ApiError::TriggerMethod {
                    method: method.to_string(),
                });
            }
            gateway_call(app, caller, project, git_ref, request, upstream_latency).await
        }
        Route::Metrics => match method {
            Method::GET | Method::HEAD => {
                app.metrics.read_process();
                app.metrics
                    .store_write_running(app.outbox.health.longest_write());
                app.metrics
                    .store_ready(app.outbox.health.problem().is_none());
                let age = app.github_hooks.known().map(|known| {
                    let read_ms = crate::outbox::now_ms().saturating_sub(known.read_at_ms);
                    std::time::Duration::from_millis(u64::try_from(read_ms).unwrap_or(0))
                });
                app.metrics.github_hooks_age(app.needs_github_hooks(), age);
                if let Ok((depth, oldest)) = app.outbox.depth_apart().await {
                    app.metrics.outbox(depth, oldest.as_secs_f64());
                }
                let mut response = Response::new(Full::new(Bytes::from(app.metrics.encode())));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    http::HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
                );
                Ok(response)
            }
            _ => Err(not_allowed("GET, HEAD")),
        },
        Route::Hook { source } => match method {
            Method::POST | Method::GET => webhook(app, caller, source, request).await,
            _ => Err(not_allowed(
                app.runtime()
                    .config
                    .sources
                    .get(source)
                    .map_or("POST", |config| config.provider.webhook_methods()),
            )),
        },
        Route::UnencodedProject { use_instead } => Err(ApiError::UnencodedProject {
            path: crate::clipped::clipped(request.uri().path()),
            use_instead: crate::clipped::clipped(&use_instead),
        }),
        Route::NotFound => Err(ApiError::NotFound {
            method: crate::clipped::clipped(method.as_str()),
            path: crate::clipped::clipped(request.uri().path()),
        }),
    }
}

/// A call to the trigger API gateway: read and parse it, check its limits, forward it to
/// GitLab (or say what would be sent, on a dry run), record it, and hand GitLab's answer
/// back.
async fn gateway_call(
    app: &App,
    caller: Caller,
    project: &str,
    git_ref: Option<String>,
    request: Request<Incoming>,
    upstream_latency: &mut Option<Duration>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let runtime = app.runtime();
    let gateway_config = runtime
        .config
        .gateway
        .as_ref()
        .ok_or(GatewayError::Disabled)?;
    let upstream = runtime
        .upstreams
        .get(&gateway_config.upstream)
        .expect("configuration validated that the gateway's upstream exists");
    // Refused before a byte of the body is read.
    if !allowed(&gateway_config.allow_from, caller.client) {
        return Err(ApiError::GatewayAddressNotAllowed {
            client: caller.client,
        });
    }
    let project = project.to_owned();
    // A plain call is small; the webhook form's body is someone's webhook.
    let server_limit = (app.server.max_body, "[server] max_body");
    let limit = match git_ref {
        None if gateway_config.max_body < app.server.max_body => {
            (gateway_config.max_body, "[gateway] max_body")
        }
        _ => server_limit,
    };
    let (parts, body, _room) = read_body(app, request, limit).await?;
    let header_text =
        |name: header::HeaderName| parts.headers.get(name).and_then(|v| v.to_str().ok());
    let call = CallRequest {
        project: &project,
        git_ref: git_ref.as_deref(),
        query: parts.uri.query(),
        content_type: header_text(header::CONTENT_TYPE),
        gitlab_event: parts
            .headers
            .get("x-gitlab-event")
            .and_then(|v| v.to_str().ok()),
        body,
    };
    let trigger = gateway::parse_trigger_call(call, &upstream.name).await?;
    let client = gateway_config
        .per_client
        .as_ref()
        .map(|_| crate::limits::gateway_client(caller.client));
    let token_key = gateway_config
        .per_token
        .as_ref()
        .map(|_| crate::limits::gateway_token(&trigger.token));
    let project_key = trigger.project.to_string();
    // The caller's own limits first: a check spends budget when it admits, and a caller
    // over its own limit must not spend the project's, which every caller shares (a
    // client refused for itself could otherwise keep a project refused for all).
    for (limiter, key) in [
        (runtime.limits.gateway_client.as_ref(), client.as_deref()),
        (runtime.limits.gateway_token.as_ref(), token_key.as_deref()),
        (
            runtime.limits.gateway_project.as_ref(),
            Some(project_key.as_str()),
        ),
    ] {
        if let (Some(limiter), Some(key)) = (limiter, key)
            && let Err(refused) = limiter.check(key).await
        {
            tracing::warn!(limit = %limiter.name, project = %trigger.project, ?refused, "gateway call not admitted by its limit");
            return Err(ApiError::limited(&limiter.name, refused));
        }
    }
    // Below the disk's reserve, no new call: its record would take the room the queued
    // triggers' outcomes need.
    if let Some(reason) = app.outbox.health.disk_low() {
        return Err(ApiError::DiskReserve(reason));
    }
    // The record's place first: once GitLab has answered, nothing may hold the answer back.
    let place = app
        .outbox
        .note_place(RECORD_PLACE_WAIT)
        .await
        .ok_or(ApiError::RecordsBehind)?;
    if app.dry_run {
        let mut shown = trigger.clone();
        shown.token = crate::secret::Secret::new(trigger.token.masked());
        let call = shown.upstream_call();
        let would_send = format!("POST {}{}", upstream.url(), call.path_and_query);
        tracing::info!(project = %trigger.project, git_ref = %trigger.git_ref, %would_send, "gateway call not forwarded (dry run)");
        gateway::record(
            &app.outbox,
            place,
            &trigger,
            caller,
            crate::outbox::Recorded::DryRun {
                would_send: would_send.clone(),
            },
        );
        return Ok(json_response(
            StatusCode::ACCEPTED,
            &json!({ "message": "dry run: hookrelay did not forward this call", "would_send": would_send }),
        ));
    }
    let result = gateway::forward(upstream, &trigger).await;
    app.metrics.upstream_response(
        &upstream.name,
        result.as_ref().ok().map(|a| a.status.as_u16()),
    );
    let recorded = gateway::recorded(&result, &trigger.token);
    gateway::record(&app.outbox, place, &trigger, caller, recorded.clone());
    let answer = result?;
    *upstream_latency = Some(answer.latency);
    Ok(gateway::answer_response(
        upstream, &trigger, &answer, &recorded,
    ))
}

/// Whether `client` may send `source` webhooks: its `allow_from` lists it, or the source
/// lists `"github"` and GitHub's published webhook addresses include it (refused with
/// `503` while none are known rather than let in unchecked).
fn admit_sender(
    app: &App,
    source: &crate::sources::SourceConfig,
    client: std::net::IpAddr,
) -> Result<(), ApiError> {
    if !source.allow_github_hooks {
        return if allowed(&source.allow_from, client) {
            Ok(())
        } else {
            Err(ApiError::AddressNotAllowed { client })
        };
    }
    if source.allow_from.iter().any(|net| net.contains(&client)) {
        return Ok(());
    }
    match app.github_hooks.contains(client) {
        Ok(true) => Ok(()),
        Ok(false) => Err(ApiError::AddressNotAllowed { client }),
        Err(reason) => Err(ApiError::GithubHooksUnknown(reason)),
    }
}

/// A webhook for `source`: refused before its body is read when it cannot be valid, then
/// handled (verify, plan, limit, record, reply). A `GET` (Gitea's and Forgejo's option)
/// carries its payload in the URL instead of the body.
async fn webhook(
    app: &App,
    caller: Caller,
    source: &str,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let runtime = app.runtime();
    // What cannot be valid is refused before a byte of its body is read.
    let config = runtime
        .config
        .sources
        .get(source)
        .ok_or_else(|| ApiError::UnknownSource(crate::clipped::clipped(source)))?;
    admit_sender(app, config, caller.client)?;
    if request.method() == Method::GET && !config.provider.delivers_with_get() {
        return Err(ApiError::MethodNotAllowed {
            method: "GET".into(),
            allowed: config.provider.webhook_methods(),
        });
    }
    if let Some(err) = crate::sources::missing_proof(config, request.headers()) {
        tracing::warn!(source = %config.name, provider = %config.provider, error = %err, "webhook refused before its body was read");
        app.metrics.signature_failure(&config.name);
        return Err(err.into());
    }
    if let Some(coding) = request
        .headers()
        .get(header::CONTENT_ENCODING)
        .map(|value| String::from_utf8_lossy(value.as_bytes()).trim().to_owned())
        .filter(|coding| !coding.is_empty() && !coding.eq_ignore_ascii_case("identity"))
    {
        return Err(ApiError::ContentEncoding(crate::clipped::clipped(&coding)));
    }
    if request.method() == Method::GET {
        let (parts, _) = request.into_parts();
        let payload = payload_in_query(&parts.uri, app.server.max_body)?;
        return crate::hooks::handle(app, &runtime, config, &parts, &payload, None).await;
    }
    let (parts, body, room) =
        match read_body(app, request, (app.server.max_body, "[server] max_body")).await {
            // The room is held by webhooks waiting for a store that hangs or fails: say
            // that, not only that the budget is spent.
            Err(ApiError::BodyMemory) => {
                return Err(match app.outbox.health.problem() {
                    Some(reason) => ApiError::Store(crate::outbox::StoreError {
                        place: String::new(),
                        reason,
                        refused: true,
                    }),
                    None => ApiError::BodyMemory,
                });
            }
            read => read?,
        };
    crate::hooks::handle(app, &runtime, config, &parts, &body, room.held).await
}

/// A `GET` webhook's payload: the URL's `payload` parameter, decoded (a request's line and
/// headers are bounded at 32 KiB before the relay sees them). Its body, if any, is not read.
fn payload_in_query(uri: &http::Uri, max_body: usize) -> Result<Bytes, ApiError> {
    let payload = uri
        .query()
        .and_then(|query| {
            form_urlencoded::parse(query.as_bytes()).find(|(name, _)| name == "payload")
        })
        .map(|(_, value)| Bytes::from(value.into_owned()))
        .ok_or_else(|| {
            crate::sources::SourceError::Payload(
                "a GET webhook carries its JSON in the URL's `payload` parameter, and this one has none".into(),
            )
        })?;
    if payload.len() > max_body {
        return Err(ApiError::BodyTooLarge {
            limit: max_body,
            setting: "[server] max_body",
        });
    }
    Ok(payload)
}

/// How long a gateway call waits for a place for its record before it is refused `503`
/// (see [`crate::outbox::Outbox::note_place`]).
const RECORD_PLACE_WAIT: Duration = Duration::from_secs(1);

/// How long a request waits for room under `[server] body_memory` before it is refused.
const BODY_MEMORY_WAIT: Duration = Duration::from_secs(1);

/// Room for a request's body under `[server] body_memory`, given back when dropped (a
/// webhook's goes with it to the store's writer: see [`crate::outbox::Outbox::accept_holding`]).
pub struct BodyPermit {
    held: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Reads the whole body within the size limit, the read timeout and the shared body
/// memory. A declared length over the limit is refused before a byte of the body is read;
/// a body must first find room in the budget (its declared length at once, or each piece
/// of a chunked body as it comes), or the request waits (at most [`BODY_MEMORY_WAIT`]) and
/// is then refused with `503`.
async fn read_body(
    app: &App,
    request: Request<Incoming>,
    (limit, setting): (usize, &'static str),
) -> Result<(http::request::Parts, Bytes, BodyPermit), ApiError> {
    let (parts, body) = request.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(ApiError::BodyTooLarge { limit, setting });
    }
    let budget = app.body_budget.clone();
    let collect = async move {
        let room = |bytes: usize| {
            let room = budget.clone().acquire_many_owned(bytes as u32);
            async move {
                tokio::time::timeout(BODY_MEMORY_WAIT, room)
                    .await
                    .map_err(|_| ApiError::BodyMemory)
                    .map(|permit| permit.expect("the body budget is never closed"))
            }
        };
        // A declared length takes its room at once, and one buffer of that size: the
        // bytes are copied in as they come, never held twice.
        let mut held = match declared {
            Some(length) if length > 0 => Some(room(length as usize).await?),
            _ => None,
        };
        let mut buffer = bytes::BytesMut::with_capacity(declared.unwrap_or(0) as usize);
        let mut body = Limited::new(body, limit);
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|err| {
                if err
                    .downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    ApiError::BodyTooLarge { limit, setting }
                } else {
                    ApiError::BodyRead(err.to_string())
                }
            })?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if declared.is_none() && !data.is_empty() {
                // No declared length (chunked): room as the pieces come.
                let permit = room(data.len()).await?;
                match &mut held {
                    Some(held) => held.merge(permit),
                    None => held = Some(permit),
                }
            }
            buffer.extend_from_slice(&data);
        }
        Ok::<_, ApiError>((buffer.freeze(), BodyPermit { held }))
    };
    match tokio::time::timeout(app.server.read_timeout, collect).await {
        Err(_) => Err(ApiError::BodyTimeout),
        Ok(Err(err)) => Err(err),
        Ok(Ok((body, permit))) => Ok((parts, body, permit)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route("/healthz"), Route::Healthz);
        assert_eq!(route("/readyz"), Route::Readyz);
        assert_eq!(
            route("/api/v4/projects/9/trigger/pipeline"),
            Route::Trigger {
                project: "9",
                git_ref: None
            }
        );
        assert_eq!(
            route("/api/v4/projects/g%2Fp/ref/feature%2Fx/trigger/pipeline"),
            Route::Trigger {
                project: "g%2Fp",
                git_ref: Some("feature%2Fx".into())
            }
        );
        assert_eq!(
            route("/api/v4/projects/9/ref/feature/x/trigger/pipeline"),
            Route::Trigger {
                project: "9",
                git_ref: Some("feature/x".into())
            }
        );
        assert_eq!(
            route("/api/v4/projects/g/p/trigger/pipeline"),
            Route::UnencodedProject {
                use_instead: "/api/v4/projects/g%2Fp/trigger/pipeline".into()
            }
        );
        assert_eq!(
            route("/api/v4/projects/g/sub/p/ref/feature/x/trigger/pipeline"),
            Route::UnencodedProject {
                use_instead: "/api/v4/projects/g%2Fsub%2Fp/ref/feature%2Fx/trigger/pipeline".into()
            }
        );
        assert_eq!(
            route("/api/v4/projects/g/p/ref/trigger/pipeline"),
            Route::NotFound
        );
        assert_eq!(
            route("/api/v4/projects/g//trigger/pipeline"),
            Route::NotFound
        );
        assert_eq!(route("/api/v4/projects//trigger/pipeline"), Route::NotFound);
        assert_eq!(
            route("/api/v4/projects/9/ref//trigger/pipeline"),
            Route::NotFound
        );
        assert_eq!(
            route("/api/v4/projects/9/trigger/pipeline/"),
            Route::NotFound
        );
        assert_eq!(route("/hooks/github"), Route::Hook { source: "github" });
        assert_eq!(route("/hooks/"), Route::NotFound);
        assert_eq!(route("/hooks/a/b"), Route::NotFound);
        assert_eq!(route("/"), Route::NotFound);
    }
}
