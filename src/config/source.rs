//! `[source.NAME]`: where webhooks come from and how they prove it.
//!
//! Secrets are resolved here, at load time, so an unset `env:` variable or an unreadable
//! `file:` stops the start with its `file:line` instead of failing the first webhook.
//! Options that only one provider understands are refused on the others, with the reason.

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::forge_api::{
    RawCatchUp, RawCompare, RawStatus, compile_catch_up, compile_compare, compile_status,
};
use super::networks::read_allow_from;
use super::{EnvLookup, FileProblems, parse_duration_at_least, typed};
use crate::event::Provider;
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

/// The entry of `allow_from` that stands for GitHub's published webhook addresses.
pub const GITHUB_HOOKS: &str = "github";

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
    let (allow_from, allow_github_hooks) = match raw.allow_from {
        None => (Vec::new(), false),
        Some(list) => {
            let setting = format!("source.{name}.allow_from");
            let span = list.span();
            let (named, networks): (Vec<_>, Vec<_>) = list
                .into_inner()
                .into_iter()
                .partition(|entry| entry.get_ref().trim() == GITHUB_HOOKS);
            if let Some(entry) = named.first()
                && provider != Provider::Github
            {
                problems.at(
                    Some(entry.span()),
                    format!("{setting}: \"{GITHUB_HOOKS}\" names the addresses GitHub sends webhooks from, and this source is {provider}'s; list its addresses or networks instead"),
                );
                ok = false;
            }
            let networks = if named.is_empty() {
                read_allow_from(&Spanned::new(span, networks), &setting, problems)
            } else {
                super::networks::read_networks(&networks, &setting, problems)
            };
            (networks, !named.is_empty())
        }
    };
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
        allow_github_hooks,
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
