//! `[server]`: how the relay accepts requests (address, bounds, HTTPS).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{FileProblems, parse_duration, parse_duration_at_least, parse_size, typed};

/// Where `serve` listens when neither the flag, the environment nor a file says.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// GitHub's largest webhook payload; GitLab's own limit is larger.
pub const DEFAULT_MAX_BODY: usize = 25 * 1024 * 1024;
/// Default `[server] body_memory`: room for a few of the largest webhooks at once and many
/// thousands of ordinary ones.
pub const DEFAULT_BODY_MEMORY: usize = 64 * 1024 * 1024;

/// Default `[server] ack_timeout`: under the 10 s GitHub and GitLab wait for an answer, so
/// that a webhook the store cannot confirm (a disk or database that stopped answering) is
/// told so instead of timing out.
pub const DEFAULT_ACK_TIMEOUT: Duration = Duration::from_secs(9);

/// `[server]`: how the relay accepts requests.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Largest request body accepted; larger ones are answered `413`.
    pub max_body: usize,
    /// Request bodies held in memory at once, across all requests; past it, a request waits
    /// briefly for room, then gets `503` with `Retry-After`.
    pub body_memory: usize,
    /// Open connections at most; `None`: derived from the open-file limit at start.
    pub max_connections: Option<usize>,
    /// Threads that serve connections, each an event loop of its own; `None`: one per core
    /// on SQLite, none on PostgreSQL; 0: tokio's shared workers ([`crate::event_loops`]).
    pub event_loops: Option<usize>,
    /// Time allowed to receive a request's headers and body.
    pub read_timeout: Duration,
    /// Time allowed for in-flight requests to finish after a shutdown signal.
    pub shutdown_timeout: Duration,
    /// Time a webhook waits for the delivery store to confirm it; past it the webhook is
    /// answered `503`, not acknowledged, instead of holding its sender until it gives up.
    /// A dashboard action waits as long for its answer.
    pub ack_timeout: Duration,
    /// `tls_cert` and `tls_key`: serve HTTPS with this certificate chain and key (PEM),
    /// read again at each reload.
    pub tls: Option<ServerTls>,
    /// Proxies in front of the relay whose `X-Forwarded-For` names the client (for every
    /// `allow_from`, the gateway's `per_client`, log lines and records); with `[gateway]
    /// trusted_proxies`, the older place, added.
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

/// The listener's certificate and key files, as configured (relative to the file's folder).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: DEFAULT_LISTEN
                .parse()
                .expect("the default listen address is valid"),
            max_body: DEFAULT_MAX_BODY,
            body_memory: DEFAULT_BODY_MEMORY,
            max_connections: None,
            event_loops: None,
            read_timeout: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(10),
            ack_timeout: DEFAULT_ACK_TIMEOUT,
            tls: None,
            trusted_proxies: Vec::new(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    listen: Option<Spanned<String>>,
    max_body: Option<Spanned<String>>,
    body_memory: Option<Spanned<String>>,
    max_connections: Option<Spanned<i64>>,
    event_loops: Option<Spanned<i64>>,
    read_timeout: Option<Spanned<String>>,
    shutdown_timeout: Option<Spanned<String>>,
    ack_timeout: Option<Spanned<String>>,
    tls_cert: Option<Spanned<String>>,
    tls_key: Option<Spanned<String>>,
    trusted_proxies: Option<Vec<Spanned<String>>>,
}

/// Compiles `[server]`, with the defaults for what it leaves out.
pub(super) fn compile(raw: RawServer, problems: &mut FileProblems<'_>) -> ServerConfig {
    let defaults = ServerConfig::default();
    ServerConfig {
        listen: typed(raw.listen, defaults.listen, problems, |text| {
            super::parse_listen(text).map_err(|err| format!("listen: {err}"))
        }),
        max_body: typed(raw.max_body, defaults.max_body, problems, |text| {
            // No sender's webhook fits in less; 0 would answer every one 413.
            match parse_size(text).map_err(|err| format!("max_body: {err}"))? {
                size if size < 1024 => Err(format!(
                    "max_body: {text:?} is too small for any webhook: at least 1KiB"
                )),
                size => Ok(size),
            }
        }),
        body_memory: typed(raw.body_memory, defaults.body_memory, problems, |text| {
            parse_size(text).map_err(|err| format!("body_memory: {err}"))
        }),
        max_connections: match raw.max_connections {
            None => None,
            Some(n) if *n.get_ref() >= 1 => Some(*n.get_ref() as usize),
            Some(n) => {
                problems.at(
                    Some(n.span()),
                    "max_connections must be at least 1".to_owned(),
                );
                None
            }
        },
        event_loops: match raw.event_loops {
            None => None,
            Some(n) if (0..=crate::event_loops::MAX as i64).contains(n.get_ref()) => {
                Some(*n.get_ref() as usize)
            }
            Some(n) => {
                problems.at(
                    Some(n.span()),
                    format!(
                        "event_loops must be between 0 (tokio's shared workers) and {}; leave it out for one per core",
                        crate::event_loops::MAX
                    ),
                );
                None
            }
        },
        read_timeout: typed(raw.read_timeout, defaults.read_timeout, problems, |text| {
            parse_duration_at_least(text, Duration::from_millis(100))
                .map_err(|err| format!("read_timeout: {err}"))
        }),
        shutdown_timeout: typed(
            raw.shutdown_timeout,
            defaults.shutdown_timeout,
            problems,
            |text| parse_duration(text).map_err(|err| format!("shutdown_timeout: {err}")),
        ),
        ack_timeout: typed(raw.ack_timeout, defaults.ack_timeout, problems, |text| {
            parse_duration_at_least(text, Duration::from_millis(100))
                .map_err(|err| format!("ack_timeout: {err}"))
        }),
        tls: server_tls(raw.tls_cert, raw.tls_key, problems),
        trusted_proxies: raw
            .trusted_proxies
            .as_deref()
            .map_or_else(Vec::new, |list| {
                super::networks::read_networks(list, "trusted_proxies", problems)
            }),
    }
}

/// `tls_cert` and `tls_key`: both or neither, relative to the file's folder, a chain and the
/// key that goes with it.
pub(super) fn server_tls(
    cert: Option<Spanned<String>>,
    key: Option<Spanned<String>>,
    problems: &mut FileProblems<'_>,
) -> Option<ServerTls> {
    let (cert, key) = match (cert, key) {
        (None, None) => return None,
        (Some(cert), Some(key)) => (cert, key),
        (Some(only), None) | (None, Some(only)) => {
            problems.at(
                Some(only.span()),
                "tls_cert and tls_key go together: the certificate chain and its private key (PEM)",
            );
            return None;
        }
    };
    let span = cert.span();
    let tls = ServerTls {
        cert: problems.folder().join(cert.into_inner()),
        key: problems.folder().join(key.into_inner()),
    };
    match crate::tls::read_server_certificate(&tls.cert, &tls.key) {
        Ok(_) => Some(tls),
        Err(err) => {
            problems.at(Some(span), format!("tls_cert: {err}"));
            None
        }
    }
}
