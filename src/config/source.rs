//! `[source.NAME]`: where webhooks come from and how they prove it.
//!
//! Secrets are resolved here, at load time, so an unset `env:` variable or an unreadable
//! `file:` stops the start with its `file:line` instead of failing the first webhook.
//! Options that only one provider understands are refused on the others, with the reason.

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::networks::read_allow_from;
use super::{EnvLookup, FileProblems, parse_duration_at_least, typed};
use crate::catch_up::Forge;
use crate::event::Provider;
use crate::git_ref::GitRef;
use crate::secret::Secret;
use crate::sources::signature::{Algorithm, Encoding, SigningKey};
use crate::sources::{GenericConfig, GenericPaths, GenericScheme, SourceConfig};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSource {
    provider: Spanned<String>,
    secret: Option<Spanned<super::rule::OneOrMany>>,
    signing_secret: Option<Spanned<super::rule::OneOrMany>>,
    allow_sha1: Option<Spanned<bool>>,
    timestamp_tolerance: Option<Spanned<String>>,
    allow_unsigned: Option<bool>,
    signature: Option<Spanned<RawSignature>>,
    paths: Option<Spanned<RawPaths>>,
    delivery_header: Option<Spanned<String>>,
    limit: Option<Spanned<super::RawLimit>>,
    url_refs: Option<Spanned<Vec<String>>>,
    allow_from: Option<Spanned<Vec<Spanned<String>>>>,
    status: Option<Spanned<RawStatus>>,
    compare: Option<Spanned<RawCompare>>,
    upstream: Option<Spanned<String>>,
    catch_up: Option<Spanned<RawCatchUp>>,
}

/// `catch_up = { hook = "…", token = "env:NAME", every = "10m", since = "24h" }`, or
/// `app = "…", key = "file:…"` instead of `token` for a GitHub App's own hook, and
/// `hooks = ["…", …]` instead of `hook` for several.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCatchUp {
    hook: Option<String>,
    /// Several hooks sending to this source (one per repository or project), read with
    /// the same credential.
    hooks: Option<Vec<String>>,
    token: Option<String>,
    app: Option<String>,
    key: Option<String>,
    every: Option<String>,
    since: Option<String>,
}

/// `status = { token = "env:NAME", api_url = "…", ca_file = "…" }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStatus {
    token: String,
    api_url: Option<String>,
    ca_file: Option<Spanned<String>>,
}

/// `compare = { token = "env:NAME", api_url = "…", ca_file = "…", timeout = "3s" }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCompare {
    token: String,
    api_url: Option<String>,
    ca_file: Option<Spanned<String>>,
    timeout: Option<String>,
    new_branch_base: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSignature {
    scheme: Option<String>,
    header: Option<String>,
    algorithm: Option<String>,
    encoding: Option<String>,
    prefix: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPaths {
    repository: Option<String>,
    #[serde(rename = "ref")]
    git_ref: Option<String>,
    before: Option<String>,
    after: Option<String>,
    delivery: Option<String>,
    pusher: Option<String>,
    repository_url: Option<String>,
    changed_files: Option<String>,
}

/// Compiles one source; `resolve_secrets` is false for `explain`, which checks no signature.
pub(super) fn compile_source(
    name: &str,
    raw: RawSource,
    resolve_secrets: Option<EnvLookup<'_>>,
    problems: &mut FileProblems<'_>,
) -> Option<SourceConfig> {
    let provider_span = raw.provider.span();
    let Some(provider) = Provider::parse(raw.provider.get_ref()) else {
        problems.at(
            Some(provider_span),
            format!(
                "source.{name}.provider: {:?} is not one of: {}",
                raw.provider.get_ref(),
                Provider::NAMES
            ),
        );
        return None;
    };
    let mut ok = fields_apply_to(name, provider, &raw, problems);
    if let (Some(status), Some(_)) = (&raw.status, &raw.upstream) {
        problems.at(
            Some(status.span()),
            format!("source.{name}.status: a source of pipeline events (`upstream`) starts no pipeline, so it has no statuses to post; put `status` on the source whose pushes start them"),
        );
        ok = false;
    }
    let status = raw.status.and_then(|status| {
        compile_status(name, provider, status, resolve_secrets, problems, &mut ok)
    });
    if let (Some(compare), Some(_)) = (&raw.compare, &raw.upstream) {
        problems.at(
            Some(compare.span()),
            format!("source.{name}.compare: a source of pipeline events (`upstream`) takes no pushes, so it has none to compare; put `compare` on the source whose pushes rules filter by `paths`"),
        );
        ok = false;
    }
    let compare = raw.compare.and_then(|compare| {
        compile_compare(name, provider, compare, resolve_secrets, problems, &mut ok)
    });
    let pipelines_of = raw.upstream.map(Spanned::into_inner);
    let catch_up = match raw.catch_up {
        Some(catch_up) if matches!(provider, Provider::Github | Provider::Gitlab) => {
            compile_catch_up(name, provider, catch_up, resolve_secrets, problems, &mut ok)
        }
        _ => None,
    };

    let proof = Proof {
        secret: raw.secret.is_some(),
        signing_secret: raw.signing_secret.is_some(),
        signature: raw.signature.is_some(),
        allow_unsigned: raw.allow_unsigned.unwrap_or(false),
    };
    // One secret (or key), or the new and the old one while senders move to the new.
    let secrets = raw.secret.map_or_else(Vec::new, |field| {
        resolve_list(
            name,
            "secret",
            field,
            resolve_secrets,
            problems,
            &mut ok,
            |secret| match weakness(secret.expose()) {
                None => Ok(secret),
                Some(reason) => Err(reason),
            },
        )
    });
    let signing_keys = raw.signing_secret.map_or_else(Vec::new, |field| {
        resolve_list(
            name,
            "signing_secret",
            field,
            resolve_secrets,
            problems,
            &mut ok,
            |secret| SigningKey::parse(secret.expose()),
        )
    });
    let timestamp_tolerance = typed(
        raw.timestamp_tolerance,
        Duration::from_secs(300),
        problems,
        |text| {
            parse_duration_at_least(text, Duration::from_secs(1))
                .map_err(|err| format!("source.{name}.timestamp_tolerance: {err}"))
        },
    );
    let limit = raw.limit.and_then(|limit| {
        let span = limit.span();
        let compiled = compile_source_limit(name, limit, problems, &mut ok)?;
        if compiled.on_limit == crate::limits::OnLimit::Reject
            && let Some(lost) = refused_webhooks_lost(provider, catch_up.is_some())
        {
            problems.warn(
                span,
                format!(
                    "source.{name}.limit: on_limit = \"reject\" answers 429 {lost}; on_limit = \"queue\" (the default) takes every webhook and holds its triggers instead"
                ),
            );
        }
        Some(compiled)
    });
    let url_refs = raw
        .url_refs
        .and_then(|refs| compile_url_refs(name, refs, problems, &mut ok));
    let allow_from = raw.allow_from.map_or_else(Vec::new, |list| {
        read_allow_from(&list, &format!("source.{name}.allow_from"), problems)
    });
    let generic = if provider == Provider::Generic {
        compile_generic(
            name,
            raw.signature,
            raw.paths,
            raw.delivery_header,
            problems,
            &mut ok,
        )
    } else {
        GenericConfig::default()
    };
    ok &= proof.checked(name, provider, &generic, provider_span, problems);
    ok.then(|| SourceConfig {
        name: name.to_owned(),
        provider,
        secrets,
        signing_keys,
        allow_sha1: raw.allow_sha1.is_some_and(|v| *v.get_ref()),
        timestamp_tolerance,
        allow_unsigned: proof.allow_unsigned,
        generic,
        limit,
        url_refs,
        allow_from,
        status,
        compare,
        pipelines_of,
        catch_up,
    })
}

/// Whether every field `raw` sets applies to `provider` (each one that does not is a
/// problem at its line).
fn fields_apply_to(
    name: &str,
    provider: Provider,
    raw: &RawSource,
    problems: &mut FileProblems<'_>,
) -> bool {
    use Provider::{Generic, Github, Gitlab};
    fn span<T>(field: &Option<Spanned<T>>) -> Option<std::ops::Range<usize>> {
        field.as_ref().map(Spanned::span)
    }
    // Each field that only some providers read, and which.
    let fields: [(_, &str, &[Provider]); 8] = [
        (span(&raw.allow_sha1), "allow_sha1", &[Github]),
        (
            span(&raw.signing_secret),
            "signing_secret",
            &[Gitlab, Generic],
        ),
        (
            span(&raw.timestamp_tolerance),
            "timestamp_tolerance",
            &[Gitlab, Generic],
        ),
        (span(&raw.signature), "signature", &[Generic]),
        (span(&raw.paths), "paths", &[Generic]),
        (span(&raw.delivery_header), "delivery_header", &[Generic]),
        (
            span(&raw.upstream),
            "upstream (pipeline events of a GitLab)",
            &[Gitlab],
        ),
        (
            span(&raw.catch_up),
            "catch_up (the forge's log of a hook's deliveries)",
            &[Github, Gitlab],
        ),
    ];
    let mut ok = true;
    for (field, key, providers) in fields {
        if let Some(span) = field
            && !providers.contains(&provider)
        {
            let names: Vec<&str> = providers.iter().map(|p| p.as_str()).collect();
            problems.at(
                Some(span),
                format!(
                    "source.{name}.{key} applies only to provider {}, not {provider}",
                    names.join(" or ")
                ),
            );
            ok = false;
        }
    }
    ok
}

/// What becomes of a webhook a source's limit refuses with `429`, where it is lost:
/// GitLab counts the refusal as a failed delivery and stops calling the hook after four
/// in a row; GitHub never sends it again unless the relay's catch-up asks.
fn refused_webhooks_lost(provider: Provider, catch_up: bool) -> Option<&'static str> {
    match provider {
        Provider::Gitlab => Some(
            "to GitLab, which counts it as a failed delivery and stops calling a project's \
             hook after four in a row, neither sending nor logging webhooks meanwhile",
        ),
        Provider::Github if !catch_up => Some(
            "to GitHub, which never sends that webhook again (catch_up on this source would \
             have it redelivered)",
        ),
        _ => None,
    }
}

/// A source's `limit = { rate, on_limit }` (queueing by default).
fn compile_source_limit(
    name: &str,
    limit: Spanned<super::RawLimit>,
    problems: &mut FileProblems<'_>,
    ok: &mut bool,
) -> Option<crate::limits::Limit> {
    let section = format!("[source.{name}]");
    let compiled = super::only_limit_keys(limit.get_ref(), &section, &["rate", "on_limit"])
        .and_then(|()| {
            super::compile_limit(
                limit.get_ref(),
                "rate",
                &section,
                crate::limits::OnLimit::Queue,
            )
        });
    match compiled {
        Ok(limit) => limit,
        Err(message) => {
            problems.at(Some(limit.span()), message);
            *ok = false;
            None
        }
    }
}

/// `url_refs`: the refs a webhook URL's `?ref=` may choose. A sender's signature does not
/// cover the URL, so only the refs listed here may be chosen by it.
fn compile_url_refs(
    name: &str,
    refs: Spanned<Vec<String>>,
    problems: &mut FileProblems<'_>,
    ok: &mut bool,
) -> Option<crate::rules::Patterns> {
    let span = refs.span();
    // A glob of nothing but stars lets anyone holding one captured webhook build any
    // (single-segment, or with `**` any) ref: valid, but rarely what is meant.
    for every in refs
        .get_ref()
        .iter()
        .filter(|glob| !glob.is_empty() && glob.chars().all(|c| c == '*'))
    {
        problems.warn(
            span.clone(),
            format!(
                "source.{name}.url_refs: {every:?} lets whoever holds one captured webhook choose the ref it builds (a signature never covers the URL); list the refs a URL may choose, e.g. [\"stable\", \"release/*\"]"
            ),
        );
    }
    // `?ref=` is matched by its short name, as rules' `refs` are.
    for full in refs.get_ref() {
        let Some(short) = super::rule::short_name_of_full_ref(full) else {
            continue;
        };
        problems.warn(
            span.clone(),
            format!(
                "source.{name}.url_refs: {full:?} is a full ref name, but a URL's ?ref= is matched by its short name (`?ref=refs/heads/main` as `main`), so it never matches; write {short:?}"
            ),
        );
    }
    match crate::rules::Patterns::new(refs.into_inner()) {
        Ok(patterns) => Some(patterns),
        Err(reason) => {
            problems.at(Some(span), format!("source.{name}.url_refs: {reason}"));
            *ok = false;
            None
        }
    }
}

/// What a source sets to prove who sent a webhook.
struct Proof {
    secret: bool,
    signing_secret: bool,
    /// A generic `signature = { … }` (an invalid one is reported on its own, not also as
    /// "no proof").
    signature: bool,
    allow_unsigned: bool,
}

impl Proof {
    /// Every source proves its webhooks unless it says, in so many words, that it need
    /// not; a scheme that needs a secret has one. `false` after recording a problem.
    fn checked(
        &self,
        name: &str,
        provider: Provider,
        generic: &GenericConfig,
        provider_span: std::ops::Range<usize>,
        problems: &mut FileProblems<'_>,
    ) -> bool {
        let mut ok = true;
        let proven = match provider {
            Provider::Gitlab => self.secret || self.signing_secret,
            Provider::Generic => match generic.scheme {
                GenericScheme::Hmac { .. } | GenericScheme::Token { .. } => {
                    if !self.secret {
                        problems.at(
                            Some(provider_span.clone()),
                            format!(
                                "source.{name}: this signature scheme needs `secret = \"env:NAME\"`"
                            ),
                        );
                        ok = false;
                    }
                    true
                }
                GenericScheme::StandardWebhooks => {
                    if !self.signing_secret {
                        problems.at(
                            Some(provider_span.clone()),
                            format!("source.{name}: Standard Webhooks needs `signing_secret = \"env:NAME\"` (a whsec_ key)"),
                        );
                        ok = false;
                    }
                    true
                }
                GenericScheme::None => self.signature,
            },
            _ => self.secret,
        };
        if !proven && !self.allow_unsigned {
            let hint = match provider {
                Provider::Gitlab => {
                    "`secret = \"env:NAME\"` (the webhook's secret token) or `signing_secret` (its signing token)"
                }
                Provider::Generic => "a `signature = { … }` with a `secret`",
                _ => "`secret = \"env:NAME\"` (the webhook's secret)",
            };
            problems.at(
                Some(provider_span),
                format!("source.{name} has no way to check who sent a webhook: add {hint}, or `allow_unsigned = true` to accept anyone's"),
            );
            ok = false;
        }
        ok
    }
}

/// The API root from a configured `api_url`: a server's address gains the forge's API
/// path (GitHub Enterprise Server's `/api/v3`, Gitea's and Forgejo's `/api/v1`, GitLab's
/// `/api/v4`) unless it names one already.
fn api_root(forge: crate::status::Forge, uri: &http::Uri, url: &str) -> String {
    let path = uri.path().trim_end_matches('/');
    match forge {
        crate::status::Forge::Github
            if uri.host() != Some("api.github.com") && !path.ends_with("/api/v3") =>
        {
            format!("{url}/api/v3")
        }
        crate::status::Forge::Gitea if !path.ends_with("/api/v1") => format!("{url}/api/v1"),
        crate::status::Forge::Gitlab if !path.ends_with("/api/v4") => format!("{url}/api/v4"),
        _ => url.to_owned(),
    }
}

/// `status = { … }`: the forge of the source's provider, its API root, the token.
fn compile_status(
    name: &str,
    provider: Provider,
    raw: Spanned<RawStatus>,
    resolve_secrets: Option<EnvLookup<'_>>,
    problems: &mut FileProblems<'_>,
    ok: &mut bool,
) -> Option<crate::status::ForgeApi> {
    let span = raw.span();
    let raw = raw.into_inner();
    let field = format!("source.{name}.status");
    compile_forge_api(
        &field,
        crate::status::Forge::of(provider),
        (&raw.token, raw.api_url.as_deref(), raw.ca_file),
        span,
        resolve_secrets,
        problems,
        ok,
    )
}

/// `compare = { … }`: as `status`, and how long a compare may hold up a webhook.
fn compile_compare(
    name: &str,
    provider: Provider,
    raw: Spanned<RawCompare>,
    resolve_secrets: Option<EnvLookup<'_>>,
    problems: &mut FileProblems<'_>,
    ok: &mut bool,
) -> Option<crate::compare::CompareConfig> {
    use crate::compare::{DEFAULT_TIMEOUT, LONGEST_TIMEOUT};
    let span = raw.span();
    let raw = raw.into_inner();
    let field = format!("source.{name}.compare");
    let timeout = match raw.timeout.as_deref() {
        None => DEFAULT_TIMEOUT,
        Some(text) => match parse_duration_at_least(text, Duration::from_millis(100)) {
            Ok(timeout) if timeout <= LONGEST_TIMEOUT => timeout,
            Ok(_) => {
                problems.at(
                    Some(span.clone()),
                    format!("{field}.timeout: {text:?} is longer than {LONGEST_TIMEOUT:?}; the webhook waits for the compare, and GitHub gives up on an answer after 10 s"),
                );
                *ok = false;
                return None;
            }
            Err(err) => {
                problems.at(Some(span.clone()), format!("{field}.timeout: {err}"));
                *ok = false;
                return None;
            }
        },
    };
    let new_branch_base = match raw.new_branch_base.as_deref().map(str::trim) {
        None => None,
        Some(base) => match branch_base_problem(base) {
            None => Some(base.to_owned()),
            Some(reason) => {
                problems.at(
                    Some(span.clone()),
                    format!("{field}.new_branch_base: {base:?} is not a branch name: it {reason}"),
                );
                *ok = false;
                return None;
            }
        },
    };
    let api = compile_forge_api(
        &field,
        crate::compare::CompareConfig::forge_of(provider),
        (&raw.token, raw.api_url.as_deref(), raw.ca_file),
        span,
        resolve_secrets,
        problems,
        ok,
    )?;
    Some(crate::compare::CompareConfig {
        api,
        timeout,
        new_branch_base,
    })
}

/// Why `name` cannot be a `new_branch_base`, or `None`: git's own rules for a ref name
/// ([`GitRef`]), narrowed to a short branch name in the characters every forge's compare
/// API takes in a path (letters, digits, `.`, `_`, `-`, and `/` between parts).
pub(super) fn branch_base_problem(name: &str) -> Option<String> {
    if matches!(name.len(), 40 | 64) && name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Some("is a commit id; give the branch new branches fork from, as `main`".into());
    }
    if let Err(err) = GitRef::parse(name) {
        return Some(err.reason);
    }
    if name.starts_with("refs/") {
        return Some("is a full ref; give the branch's short name, as `main`".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !c.is_ascii_alphanumeric() && !matches!(c, '.' | '_' | '-' | '/'))
    {
        return Some(format!(
            "contains {c:?}; a base is letters, digits, `.`, `_`, `-` and `/` between them, as `main` or `release/1.x`"
        ));
    }
    if let Some(part) = name.split('/').find(|part| part.starts_with('-')) {
        return Some(format!("has a part starting with \"-\" ({part:?})"));
    }
    None
}

/// A forge's API as `status` and `compare` name it: the root, the token, a private CA.
/// `field` (`source.NAME.status`) names the setting in problems; `forge`: the provider's
/// forge, or why it has none for this setting; `(token, api_url, ca_file)` as written.
fn compile_forge_api(
    field: &str,
    forge: Result<crate::status::Forge, String>,
    (token, api_url, ca_file): (&str, Option<&str>, Option<Spanned<String>>),
    span: std::ops::Range<usize>,
    resolve_secrets: Option<EnvLookup<'_>>,
    problems: &mut FileProblems<'_>,
    ok: &mut bool,
) -> Option<crate::status::ForgeApi> {
    let mut refuse = |message: String, problems: &mut FileProblems<'_>| {
        problems.at(Some(span.clone()), format!("{field}: {message}"));
        *ok = false;
    };
    let forge = match forge {
        Ok(forge) => forge,
        Err(reason) => {
            refuse(reason, problems);
            return None;
        }
    };
    let api_url = match api_url.map(str::trim) {
        Some(url) => match url.parse::<http::Uri>() {
            Ok(uri)
                if matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some() =>
            {
                api_root(forge, &uri, url.trim_end_matches('/'))
            }
            _ => {
                refuse(
                    format!("api_url {url:?} is not an http:// or https:// address"),
                    problems,
                );
                return None;
            }
        },
        None => match forge.default_api_url() {
            Ok(url) => url.to_owned(),
            Err(reason) => {
                refuse(reason.into(), problems);
                return None;
            }
        },
    };
    let Some((token_ref, token)) = super::secret_setting(
        token,
        Some(span.clone()),
        &format!("{field}: token"),
        resolve_secrets,
        problems,
    ) else {
        *ok = false;
        return None;
    };
    let ca_file = match ca_file {
        None => None,
        Some(file) => Some(super::upstream::ca_file(
            file,
            &format!("{field}.ca_file"),
            problems,
        )?),
    };
    Some(crate::status::ForgeApi {
        forge,
        api_url,
        token_ref,
        token,
        ca_file,
    })
}

/// `catch_up = { … }`: the hook whose delivery log the relay reads, the token (or the
/// GitHub App) that may read it and ask for redeliveries, and how often.
fn compile_catch_up(
    name: &str,
    provider: Provider,
    raw: Spanned<RawCatchUp>,
    resolve_secrets: Option<EnvLookup<'_>>,
    problems: &mut FileProblems<'_>,
    ok: &mut bool,
) -> Option<crate::catch_up::CatchUpConfig> {
    let span = raw.span();
    let raw = raw.into_inner();
    let what = format!("source.{name}.catch_up");
    let credential = catch_up_credential(name, &raw, &span, resolve_secrets, problems);
    if credential.is_none() {
        *ok = false;
    }
    let mut refuse = |message: String, problems: &mut FileProblems<'_>| {
        problems.at(Some(span.clone()), format!("{what}.{message}"));
        *ok = false;
    };
    let texts: Vec<&String> = match (&raw.hook, &raw.hooks) {
        (Some(hook), None) => vec![hook],
        (None, Some(hooks)) if !hooks.is_empty() => hooks.iter().collect(),
        (Some(_), Some(_)) => {
            refuse(
                "hook: give hook = \"…\" (one) or hooks = [\"…\", …] (several), not both".into(),
                problems,
            );
            Vec::new()
        }
        (None, _) => {
            refuse(
                "hook: missing: the hook's API address, hook = \"https://api.github.com/repos/OWNER/REPO/hooks/ID\" (or hooks = [\"…\", …] for several)".into(),
                problems,
            );
            Vec::new()
        }
    };
    let mut hooks: Vec<crate::catch_up::HookUrl> = Vec::new();
    let mut hooks_ok = !texts.is_empty();
    for text in texts {
        match crate::catch_up::HookUrl::parse(text.trim()) {
            Ok(hook) if (hook.forge == Forge::GitLab) != (provider == Provider::Gitlab) => {
                refuse(
                    format!(
                        "hook: {} is a {} hook's address, and this source's provider is {}",
                        hook.shown(),
                        hook.forge.name(),
                        provider.as_str()
                    ),
                    problems,
                );
                hooks_ok = false;
            }
            Ok(hook) if hooks.contains(&hook) => {
                refuse(format!("hooks: {} is listed twice", hook.shown()), problems);
                hooks_ok = false;
            }
            Ok(hook) => hooks.push(hook),
            Err(message) => {
                refuse(format!("hook: {message}"), problems);
                hooks_ok = false;
            }
        }
    }
    // Each pass costs a call of GitHub's API or more (5,000 an hour for a token).
    let every = match raw
        .every
        .as_deref()
        .map(|text| parse_duration_at_least(text, Duration::from_secs(60)))
    {
        None => Some(crate::catch_up::DEFAULT_EVERY),
        Some(Ok(every)) => Some(every),
        Some(Err(message)) => {
            refuse(format!("every: {message}"), problems);
            None
        }
    };
    // GitHub lists a hook's deliveries of the last 30 days, and redelivers those of 3;
    // GitLab lists (and resends) a hook's events of the last 7.
    let (longest, forge) = match provider {
        Provider::Gitlab => (7, "GitLab lists and resends"),
        _ => (3, "GitHub redelivers"),
    };
    let since = match raw.since.as_deref().map(|text| {
        parse_duration_at_least(text, Duration::from_secs(60)).and_then(|since| {
            if since > Duration::from_secs(longest * 24 * 3600) {
                Err(format!(
                    "{text:?} is longer than the {longest} days over which {forge}"
                ))
            } else {
                Ok(since)
            }
        })
    }) {
        None => Some(crate::catch_up::DEFAULT_SINCE),
        Some(Ok(since)) => Some(since),
        Some(Err(message)) => {
            refuse(format!("since: {message}"), problems);
            None
        }
    };
    let (credential_ref, credential) = credential?;
    if !hooks_ok {
        return None;
    }
    for hook in &hooks {
        if let Err(message) = credential_ref.fits(hook) {
            refuse(format!("hook: {message}"), problems);
            return None;
        }
    }
    Some(crate::catch_up::CatchUpConfig {
        hooks,
        credential_ref,
        credential,
        every: every?,
        since: since?,
    })
}

/// A catch-up's `token`, or its GitHub App's `app` and `key`, and what they hold when
/// secrets are read.
fn catch_up_credential(
    name: &str,
    raw: &RawCatchUp,
    span: &std::ops::Range<usize>,
    resolve_secrets: Option<EnvLookup<'_>>,
    problems: &mut FileProblems<'_>,
) -> Option<(
    crate::catch_up::CredentialRef,
    Option<crate::catch_up::Credential>,
)> {
    use crate::catch_up::{Credential, CredentialRef};
    let what = format!("source.{name}.catch_up");
    let setting = |text: &str, field: &str, problems: &mut FileProblems<'_>| {
        super::secret_setting(
            text,
            Some(span.clone()),
            &format!("{what}.{field}"),
            resolve_secrets,
            problems,
        )
    };
    match (&raw.token, &raw.app, &raw.key) {
        (Some(token), None, None) => {
            let (reference, token) = setting(token, "token", problems)?;
            Some((
                CredentialRef::Token(reference),
                token.map(Credential::Token),
            ))
        }
        (None, Some(app), Some(key)) => {
            if let Err(message) = crate::catch_up::github_app::check_app(app) {
                problems.at(Some(span.clone()), format!("{what}.app: {message}"));
                return None;
            }
            let (key_ref, pem) = setting(key, "key", problems)?;
            let credential =
                match pem.map(|pem| crate::catch_up::github_app::AppKey::new(app, &pem)) {
                    None => None,
                    Some(Ok(key)) => Some(Credential::App(std::sync::Arc::new(key))),
                    Some(Err(message)) => {
                        problems.at(
                            Some(span.clone()),
                            format!("{what}.key ({key_ref}): {message}"),
                        );
                        return None;
                    }
                };
            Some((
                CredentialRef::App {
                    app: app.clone(),
                    key: key_ref,
                },
                credential,
            ))
        }
        (Some(_), _, _) => {
            problems.at(
                Some(span.clone()),
                format!(
                    "{what}: give a token, or a GitHub App's app and key, not both (a token \
                     reads a repository's or an organisation's hook, an App's key its own hook)"
                ),
            );
            None
        }
        (None, Some(_), None) | (None, None, Some(_)) => {
            problems.at(
                Some(span.clone()),
                format!(
                    "{what}: a GitHub App is read with both its app (its ID or client ID) and \
                     key (key = \"file:app.private-key.pem\", the key GitHub made for it)"
                ),
            );
            None
        }
        (None, None, None) => {
            problems.at(
                Some(span.clone()),
                format!(
                    "{what}: missing token = \"env:NAME\" (a token that may administer the \
                     hook), or app = \"…\" and key = \"file:…\" for a GitHub App's own hook"
                ),
            );
            None
        }
    }
}

/// The fewest bytes a webhook secret may have: anything shorter can be guessed offline
/// from one captured signature.
pub const MIN_SECRET_BYTES: usize = 16;

/// Why a webhook secret is too weak to check signatures with, if it is.
fn weakness(secret: &str) -> Option<String> {
    if secret.trim().is_empty() {
        return Some(
            "the secret is only whitespace; set a random one (`openssl rand -hex 32`)".into(),
        );
    }
    (secret.len() < MIN_SECRET_BYTES).then(|| {
        format!(
            "the secret is {} bytes; a webhook secret needs at least {MIN_SECRET_BYTES} \
             (set a random one: `openssl rand -hex 32`, and the same at the sender)",
            secret.len()
        )
    })
}

fn resolve(
    name: &str,
    key: &str,
    field: Spanned<String>,
    resolve_secrets: Option<EnvLookup<'_>>,
    problems: &mut FileProblems<'_>,
    ok: &mut bool,
) -> Option<Secret> {
    let found = super::secret_setting(
        field.get_ref(),
        Some(field.span()),
        &format!("source.{name}.{key}"),
        resolve_secrets,
        problems,
    );
    if found.is_none() {
        *ok = false;
    }
    found.and_then(|(_, secret)| secret)
}

/// A secret setting that takes one reference or a list (while it is rotated): each read
/// and checked by `check`, each problem reported at the setting.
fn resolve_list<T>(
    name: &str,
    key: &str,
    field: Spanned<super::rule::OneOrMany>,
    resolve_secrets: Option<EnvLookup<'_>>,
    problems: &mut FileProblems<'_>,
    ok: &mut bool,
    check: impl Fn(Secret) -> Result<T, String>,
) -> Vec<T> {
    let span = field.span();
    let references = field.into_inner().into_strings();
    if references.is_empty() {
        problems.at(
            Some(span.clone()),
            format!("source.{name}.{key} is an empty list; name it (while rotating it, the new one and then the old)"),
        );
        *ok = false;
    }
    let mut checked = Vec::new();
    for reference in references {
        let field = Spanned::new(span.clone(), reference);
        let Some(secret) = resolve(name, key, field, resolve_secrets, problems, ok) else {
            continue;
        };
        match check(secret) {
            Ok(value) => checked.push(value),
            Err(reason) => {
                problems.at(Some(span.clone()), format!("source.{name}.{key}: {reason}"));
                *ok = false;
            }
        }
    }
    checked
}

fn compile_generic(
    name: &str,
    signature: Option<Spanned<RawSignature>>,
    paths: Option<Spanned<RawPaths>>,
    delivery_header: Option<Spanned<String>>,
    problems: &mut FileProblems<'_>,
    ok: &mut bool,
) -> GenericConfig {
    let mut bad =
        |span: std::ops::Range<usize>, message: String, problems: &mut FileProblems<'_>| {
            problems.at(Some(span), format!("source.{name}.signature: {message}"));
            *ok = false;
        };
    let scheme = match signature {
        None => GenericScheme::None,
        Some(signature) => {
            let span = signature.span();
            let raw = signature.into_inner();
            match raw.scheme.as_deref().unwrap_or("hmac") {
                "hmac" => {
                    let algorithm = raw.algorithm.as_deref().unwrap_or("sha256");
                    let algorithm = Algorithm::parse(algorithm).unwrap_or_else(|| {
                        bad(
                            span.clone(),
                            format!("algorithm {algorithm:?} is not sha1, sha256 or sha512"),
                            problems,
                        );
                        Algorithm::Sha256
                    });
                    let encoding = match raw.encoding.as_deref().unwrap_or("hex") {
                        "hex" => Encoding::Hex,
                        "base64" => Encoding::Base64,
                        other => {
                            bad(
                                span.clone(),
                                format!("encoding {other:?} is not hex or base64"),
                                problems,
                            );
                            Encoding::Hex
                        }
                    };
                    match raw.header {
                        Some(header) if http::HeaderName::from_bytes(header.as_bytes()).is_ok() => {
                            GenericScheme::Hmac {
                                header,
                                algorithm,
                                encoding,
                                prefix: raw.prefix.unwrap_or_default(),
                            }
                        }
                        _ => {
                            bad(span, "an HMAC signature needs `header = \"X-Signature\"` (a valid header name)".into(), problems);
                            GenericScheme::None
                        }
                    }
                }
                "token" => match raw.header {
                    Some(header) if http::HeaderName::from_bytes(header.as_bytes()).is_ok() => {
                        GenericScheme::Token { header }
                    }
                    _ => {
                        bad(
                            span,
                            "a token needs `header = \"X-Token\"` (a valid header name)".into(),
                            problems,
                        );
                        GenericScheme::None
                    }
                },
                "standard-webhooks" => GenericScheme::StandardWebhooks,
                other => {
                    bad(
                        span,
                        format!("scheme {other:?} is not hmac, token or standard-webhooks"),
                        problems,
                    );
                    GenericScheme::None
                }
            }
        }
    };
    let mut compiled = GenericPaths::default();
    if let Some(paths) = paths {
        let span = paths.span();
        let raw = paths.into_inner();
        // A path is dotted keys and array indexes (`changes.0.ref`): an empty part, or
        // the `[0]` of other path syntaxes, names nothing in any payload, and every
        // webhook would then fail for the field.
        let written = [
            ("repository", &raw.repository),
            ("ref", &raw.git_ref),
            ("before", &raw.before),
            ("after", &raw.after),
            ("delivery", &raw.delivery),
            ("pusher", &raw.pusher),
            ("repository_url", &raw.repository_url),
            ("changed_files", &raw.changed_files),
        ];
        for (key, path) in written {
            let Some(path) = path else { continue };
            let problem = if path.is_empty() {
                Some("is empty")
            } else if path.split('.').any(str::is_empty) {
                Some("has an empty part")
            } else if path.contains(['[', ']']) {
                Some("has brackets; an array's item is its index as a part (`changes.0.ref`)")
            } else {
                None
            };
            if let Some(problem) = problem {
                problems.at(
                    Some(span.clone()),
                    format!(
                        "source.{name}.paths.{key}: {path:?} {problem}; a path is the payload's keys joined by dots (`repository.full_name`)"
                    ),
                );
                *ok = false;
            }
        }
        if let Some(path) = raw.repository {
            compiled.repository = path;
        }
        if let Some(path) = raw.git_ref {
            compiled.git_ref = path;
        }
        compiled.before = raw.before.or(compiled.before);
        compiled.after = raw.after.or(compiled.after);
        compiled.delivery = raw.delivery;
        compiled.pusher = raw.pusher;
        compiled.repository_url = raw.repository_url;
        compiled.changed_files = raw.changed_files;
    }
    GenericConfig {
        scheme,
        paths: compiled,
        delivery_header: delivery_header.map(Spanned::into_inner),
    }
}
