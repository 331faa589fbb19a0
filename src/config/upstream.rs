//! `[upstream.NAME]`: a GitLab that receives trigger calls, and what every section that
//! names a file or a URL shares (`ca_file`, the upstream URL's rules).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::limit::{RawLimit, compile_limit, only_limit_keys};
use super::{EnvLookup, FileProblems, parse_duration, typed};

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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    url: Spanned<String>,
    ca_file: Option<Spanned<String>>,
    connect_timeout: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    limit: Option<Spanned<RawLimit>>,
    coalesce: Option<Spanned<String>>,
    max_in_flight: Option<Spanned<i64>>,
    read_token: Option<Spanned<String>>,
    polls_per_minute: Option<Spanned<i64>>,
    poll_interval: Option<Spanned<String>>,
}

/// Compiles one `[upstream.NAME]`; the URL may come from `HOOKRELAY_UPSTREAM_<NAME>_URL`.
pub(super) fn compile(
    name: &str,
    raw: RawUpstream,
    env: EnvLookup<'_>,
    resolve_secrets: Option<EnvLookup<'_>>,
    problems: &mut FileProblems<'_>,
) -> Option<UpstreamConfig> {
    let env_name = format!(
        "HOOKRELAY_UPSTREAM_{}_URL",
        name.to_ascii_uppercase().replace('-', "_")
    );
    let url_span = raw.url.span();
    let (url_text, from_env) = match env(&env_name) {
        Some(value) => (value, true),
        None => (raw.url.into_inner(), false),
    };
    let url = match parse_upstream_url(&url_text) {
        Ok(url) => Some(url),
        Err(err) => {
            let whence = if from_env {
                format!(" (from {env_name})")
            } else {
                String::new()
            };
            problems.at(
                Some(url_span),
                format!("upstream.{name}.url{whence}: {err}"),
            );
            None
        }
    };
    let ca_file = raw
        .ca_file
        .and_then(|ca| ca_file(ca, &format!("upstream.{name}.ca_file"), problems));
    let connect_timeout = typed(
        raw.connect_timeout,
        Duration::from_secs(5),
        problems,
        |text| parse_duration(text).map_err(|err| format!("connect_timeout: {err}")),
    );
    let timeout = typed(raw.timeout, Duration::from_secs(30), problems, |text| {
        parse_duration(text).map_err(|err| format!("timeout: {err}"))
    });
    let per_project = match raw.limit {
        None => default_per_project(),
        Some(limit) => {
            let section = format!("[upstream.{name}]");
            let compiled = only_limit_keys(limit.get_ref(), &section, &["per_project", "on_limit"])
                .and_then(|()| {
                    compile_limit(
                        limit.get_ref(),
                        "per_project",
                        &section,
                        crate::limits::OnLimit::Queue,
                    )
                });
            match compiled {
                Ok(Some(limit)) => limit,
                Ok(None) => default_per_project(),
                Err(message) => {
                    problems.at(Some(limit.span()), message);
                    default_per_project()
                }
            }
        }
    };
    let coalesce = raw
        .coalesce
        .and_then(|c| match parse_duration(c.get_ref()) {
            Ok(window) => Some(window),
            Err(message) => {
                problems.at(
                    Some(c.span()),
                    format!("upstream.{name}.coalesce: {message}"),
                );
                None
            }
        });
    let max_in_flight = match raw.max_in_flight {
        None => DEFAULT_MAX_IN_FLIGHT,
        Some(n) if (1..=10_000).contains(n.get_ref()) => *n.get_ref() as usize,
        Some(n) => {
            problems.at(
                Some(n.span()),
                format!("upstream.{name}.max_in_flight must be between 1 and 10000"),
            );
            DEFAULT_MAX_IN_FLIGHT
        }
    };
    let read_token = raw.read_token.and_then(|field| {
        let (reference, token) = super::secret_setting(
            field.get_ref(),
            Some(field.span()),
            &format!("upstream.{name}.read_token"),
            resolve_secrets,
            problems,
        )?;
        Some(ReadToken { reference, token })
    });
    let polls_per_minute = match raw.polls_per_minute {
        None => DEFAULT_POLLS_PER_MINUTE,
        Some(n) if (1..=100_000).contains(n.get_ref()) => *n.get_ref() as u32,
        Some(n) => {
            problems.at(
                Some(n.span()),
                format!("upstream.{name}.polls_per_minute must be between 1 and 100000"),
            );
            DEFAULT_POLLS_PER_MINUTE
        }
    };
    let poll_interval = typed(
        raw.poll_interval,
        Duration::from_secs(10),
        problems,
        |text| parse_duration(text).map_err(|err| format!("upstream.{name}.poll_interval: {err}")),
    );
    Some(UpstreamConfig {
        name: name.to_owned(),
        url: url?,
        ca_file,
        connect_timeout,
        timeout,
        per_project,
        coalesce,
        max_in_flight,
        read_token,
        polls_per_minute,
        poll_interval,
    })
}

/// A `ca_file` setting: a path relative to the folder of the file that names it, holding
/// at least one PEM certificate.
pub(crate) fn ca_file(
    field: Spanned<String>,
    key: &str,
    problems: &mut FileProblems<'_>,
) -> Option<PathBuf> {
    let span = field.span();
    let path = problems.folder().join(field.into_inner());
    match crate::tls::read_ca_file(&path) {
        Ok(_) => Some(path),
        Err(err) => {
            problems.at(Some(span), format!("{key}: {err}"));
            None
        }
    }
}

/// An upstream base URL: `http` or `https`, a host, an optional path prefix, no query.
pub fn parse_upstream_url(text: &str) -> Result<http::Uri, String> {
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
