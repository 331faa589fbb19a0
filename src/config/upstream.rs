//! `[upstream.NAME]`: a GitLab that receives trigger calls, and what every section that
//! names a file or a URL shares (`ca_file`, the upstream URL's rules).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::limit::{RawLimit, compile_limit, only_limit_keys};
use super::{EnvLookup, FileProblems, parse_duration_at_least, typed};
use crate::upstream::{
    DEFAULT_MAX_IN_FLIGHT, DEFAULT_POLLS_PER_MINUTE, ReadToken, UpstreamConfig,
    default_per_project, parse_upstream_url,
};

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
    let url = match parse_upstream_url(&url_text).and_then(without_api_path) {
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
        |text| {
            parse_duration_at_least(text, Duration::from_millis(100))
                .map_err(|err| format!("upstream.{name}.connect_timeout: {err}"))
        },
    );
    let timeout = typed(raw.timeout, Duration::from_secs(30), problems, |text| {
        parse_duration_at_least(text, Duration::from_millis(100))
            .map_err(|err| format!("upstream.{name}.timeout: {err}"))
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
    let coalesce =
        super::coalesce_window(raw.coalesce, &format!("upstream.{name}.coalesce"), problems);
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
        |text| {
            parse_duration_at_least(text, Duration::from_millis(100))
                .map_err(|err| format!("upstream.{name}.poll_interval: {err}"))
        },
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
/// An upstream's URL is GitLab's own (with its relative root, if any): hookrelay adds
/// `/api/v4/projects/…` to every call. One that ends in `/api/v4` (as an API client's base
/// URL often does, and as a source's `status.api_url` may) would call `/api/v4/api/v4/…`,
/// which GitLab answers `404`, the same answer a revoked token gets; so that ending is
/// taken off, as `check` then shows.
fn without_api_path(url: http::Uri) -> Result<http::Uri, String> {
    let written = url.to_string();
    let path = url.path().trim_end_matches('/');
    match path.strip_suffix("/api/v4") {
        Some(root) => {
            let base = &written[..written.len() - (path.len() - root.len())];
            base.trim_end_matches('/')
                .parse()
                .map_err(|_| format!("{written:?} is not a URL"))
        }
        None => Ok(url),
    }
}

pub(crate) fn ca_file(
    field: Spanned<String>,
    key: &str,
    problems: &mut FileProblems<'_>,
) -> Option<PathBuf> {
    let span = field.span();
    let path = problems.folder().join(field.into_inner());
    match crate::tls::read_certificates(&path) {
        Ok(_) => Some(path),
        Err(err) => {
            problems.at(Some(span), format!("{key}: {err}"));
            None
        }
    }
}
