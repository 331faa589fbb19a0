//! `[gateway]`: the GitLab-compatible trigger endpoints, their limits and proxies.

use serde::Deserialize;
use toml::Spanned;

use super::limit::{RawLimit, compile_limit, only_limit_keys};
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
    /// Proxies whose `X-Forwarded-For` names the client.
    pub trusted_proxies: Vec<ipnet::IpNet>,
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
    trusted_proxies: Option<Spanned<Vec<String>>>,
    max_body: Option<Spanned<String>>,
}

/// Compiles `[gateway]` once every file is read: its upstream must be one of `upstreams`.
/// An upstream in `broken` (there, with problems of its own) is not reported again.
pub(super) fn compile(
    raw: RawGateway,
    origin: &Origin,
    upstreams: &[String],
    broken: &std::collections::BTreeSet<String>,
    problems: &mut Vec<Problem>,
) -> Option<GatewayConfig> {
    let line_problem = |message: String| Problem {
        file: origin.file.clone(),
        line: Some(origin.line),
        message,
    };
    let (per_project, per_client, per_token) = match raw.limit.as_ref().map(|l| l.get_ref()) {
        None => (None, None, None),
        Some(limit) => {
            let keys = ["per_project", "per_client", "per_token"];
            let compile =
                |key| compile_limit(limit, key, "[gateway]", crate::limits::OnLimit::Reject);
            let compiled = only_limit_keys(limit, "[gateway]", &keys).and_then(|()| {
                Ok((
                    compile("per_project")?,
                    compile("per_client")?,
                    compile("per_token")?,
                ))
            });
            match compiled {
                Ok(limits) => limits,
                Err(message) => {
                    problems.push(line_problem(message));
                    (None, None, None)
                }
            }
        }
    };
    let mut trusted_proxies = Vec::new();
    for text in raw
        .trusted_proxies
        .map(Spanned::into_inner)
        .unwrap_or_default()
    {
        let parsed = text
            .parse::<ipnet::IpNet>()
            .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
        match parsed {
            Ok(net) => trusted_proxies.push(net),
            Err(_) => problems.push(line_problem(format!(
                "[gateway] trusted_proxies: {text:?} is not an IP address or network (\"10.0.0.0/8\")"
            ))),
        }
    }
    let max_body = match raw.max_body {
        None => DEFAULT_GATEWAY_MAX_BODY,
        Some(text) => match parse_size(text.get_ref()) {
            Ok(size) => size,
            Err(err) => {
                problems.push(line_problem(format!("[gateway] max_body: {err}")));
                DEFAULT_GATEWAY_MAX_BODY
            }
        },
    };
    let gateway = |upstream: String| GatewayConfig {
        upstream,
        per_project: per_project.clone(),
        per_client: per_client.clone(),
        per_token: per_token.clone(),
        trusted_proxies: trusted_proxies.clone(),
        max_body,
    };
    let upstream = raw.upstream;
    let known = upstreams.join(", ");
    match upstream.map(Spanned::into_inner) {
        Some(name) if upstreams.contains(&name) => Some(gateway(name)),
        Some(name) if broken.contains(&name) => None,
        Some(name) => {
            problems.push(line_problem(format!(
                "[gateway] upstream = {name:?} names no [upstream.{name}] section (defined: {})",
                if known.is_empty() { "none" } else { &known }
            )));
            None
        }
        None if upstreams.len() == 1 && broken.is_empty() => Some(gateway(known)),
        None if !broken.is_empty() => None,
        None => {
            problems.push(line_problem(if upstreams.is_empty() {
                "[gateway] needs an [upstream.NAME] section to forward to".into()
            } else {
                format!("[gateway] needs `upstream = \"NAME\"` to choose one of: {known}")
            }));
            None
        }
    }
}
