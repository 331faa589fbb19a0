//! `[gateway]`: the GitLab-compatible trigger endpoints, their limits and proxies.

use serde::Deserialize;
use toml::Spanned;

use super::limit::{RawLimit, compile_limit, only_limit_keys};
use super::problems::FileProblems;
use super::{Origin, Problem, parse_size};

/// `[gateway]`: the GitLab-compatible trigger endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayConfig {
    /// The `[upstream.NAME]` that receives the calls.
    pub upstream: String,
    /// Calls per project, refused over the limit.
    pub per_project: Option<crate::limits::Limit>,
    /// Calls per client address (the peer, or a trusted proxy's forwarded address).
    pub per_client: Option<crate::limits::Limit>,
    /// Calls per trigger token, for callers behind one address.
    pub per_token: Option<crate::limits::Limit>,
    /// `allow_from`: the only client addresses that may call the gateway. Empty: any.
    pub allow_from: Vec<ipnet::IpNet>,
    /// Largest body of a plain trigger call (the webhook form keeps `[server] max_body`:
    /// its body is someone's webhook, handed to the pipeline as `TRIGGER_PAYLOAD`).
    pub max_body: usize,
}

/// Default `[gateway] max_body`: a trigger call is a token, a ref and some variables.
pub const DEFAULT_GATEWAY_MAX_BODY: usize = 1024 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGateway {
    upstream: Option<Spanned<String>>,
    limit: Option<Spanned<RawLimit>>,
    /// The older place of `[server] trusted_proxies`, which it adds to.
    trusted_proxies: Option<Vec<Spanned<String>>>,
    allow_from: Option<Spanned<Vec<Spanned<String>>>>,
    max_body: Option<Spanned<String>>,
}

/// `[gateway]` as read from its file: each setting checked where it is written; its
/// upstream is checked once every file is read ([`compile`]).
pub(super) struct ReadGateway {
    /// The `upstream` it names, and its line.
    upstream: Option<(String, usize)>,
    per_project: Option<crate::limits::Limit>,
    per_client: Option<crate::limits::Limit>,
    per_token: Option<crate::limits::Limit>,
    /// Added to `[server] trusted_proxies` (see [`super::Config`]).
    pub(super) trusted_proxies: Vec<ipnet::IpNet>,
    allow_from: Vec<ipnet::IpNet>,
    max_body: usize,
}

/// Reads `[gateway]`'s settings, each problem at its own line.
pub(super) fn read(raw: RawGateway, problems: &mut FileProblems<'_>) -> ReadGateway {
    let (per_project, per_client, per_token) = match &raw.limit {
        None => (None, None, None),
        Some(limit) => {
            let keys = ["per_project", "per_client", "per_token"];
            let compile = |key| {
                compile_limit(
                    limit.get_ref(),
                    key,
                    "[gateway]",
                    crate::limits::OnLimit::Reject,
                )
            };
            let compiled = only_limit_keys(limit.get_ref(), "[gateway]", &keys).and_then(|()| {
                Ok((
                    compile("per_project")?,
                    compile("per_client")?,
                    compile("per_token")?,
                ))
            });
            match compiled {
                Ok(limits) => limits,
                Err(message) => {
                    problems.at(Some(limit.span()), message);
                    (None, None, None)
                }
            }
        }
    };
    let trusted_proxies = raw
        .trusted_proxies
        .as_deref()
        .map_or_else(Vec::new, |list| {
            super::networks::read_networks(list, "[gateway] trusted_proxies", problems)
        });
    let allow_from = raw.allow_from.as_ref().map_or_else(Vec::new, |list| {
        super::networks::read_allow_from(list, "[gateway] allow_from", problems)
    });
    let max_body = match &raw.max_body {
        None => DEFAULT_GATEWAY_MAX_BODY,
        Some(text) => parse_size(text.get_ref()).unwrap_or_else(|err| {
            problems.at(Some(text.span()), format!("[gateway] max_body: {err}"));
            DEFAULT_GATEWAY_MAX_BODY
        }),
    };
    ReadGateway {
        upstream: raw
            .upstream
            .map(|name| (name.get_ref().clone(), problems.line(name.span().start))),
        per_project,
        per_client,
        per_token,
        trusted_proxies,
        allow_from,
        max_body,
    }
}

/// Compiles `[gateway]` once every file is read: its upstream must be one of `upstreams`.
/// An upstream in `broken` (there, with problems of its own) is not reported again.
pub(super) fn compile(
    read: ReadGateway,
    origin: &Origin,
    upstreams: &[String],
    broken: &std::collections::BTreeSet<String>,
    problems: &mut Vec<Problem>,
) -> Option<GatewayConfig> {
    let problem_at = |line: usize, message: String| Problem {
        file: origin.file.clone(),
        line: Some(line),
        message,
    };
    let gateway = |upstream: String| GatewayConfig {
        upstream,
        per_project: read.per_project.clone(),
        per_client: read.per_client.clone(),
        per_token: read.per_token.clone(),
        allow_from: read.allow_from.clone(),
        max_body: read.max_body,
    };
    let known = upstreams.join(", ");
    match read.upstream.clone() {
        Some((name, _)) if upstreams.contains(&name) => Some(gateway(name)),
        Some((name, _)) if broken.contains(&name) => None,
        Some((name, line)) => {
            problems.push(problem_at(
                line,
                format!(
                    "[gateway] upstream = {name:?} names no [upstream.{name}] section (defined: {})",
                    super::defined(upstreams.iter(), broken)
                ),
            ));
            None
        }
        None if upstreams.len() == 1 && broken.is_empty() => Some(gateway(known)),
        None if !broken.is_empty() => None,
        None => {
            problems.push(problem_at(
                origin.line,
                if upstreams.is_empty() {
                    "[gateway] needs an [upstream.NAME] section to forward to".into()
                } else {
                    format!("[gateway] needs `upstream = \"NAME\"` to choose one of: {known}")
                },
            ));
            None
        }
    }
}
