//! `status`, `compare` and `catch_up` on a `[source.NAME]`: how the relay calls the source's
//! own forge (its API root, a token or a GitHub App's key, a private CA) to post pipeline
//! states, ask which files a push changed, and read the hook's delivery log.
//!
//! Each is refused on a provider whose forge has no such API, with the reason; secrets are
//! resolved here, at load time, as the source's own are.

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{EnvLookup, FileProblems, parse_duration_at_least};
use crate::catch_up::Forge;
use crate::event::Provider;
use crate::git_ref::GitRef;

/// `catch_up = { hook = "…", token = "env:NAME", every = "10m", since = "24h" }`, or
/// `app = "…", key = "file:…"` instead of `token` for a GitHub App's own hook, and
/// `hooks = ["…", …]` instead of `hook` for several.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCatchUp {
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
pub(super) struct RawStatus {
    token: String,
    api_url: Option<String>,
    ca_file: Option<Spanned<String>>,
}

/// `compare = { token = "env:NAME", api_url = "…", ca_file = "…", timeout = "3s" }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCompare {
    token: String,
    api_url: Option<String>,
    ca_file: Option<Spanned<String>>,
    timeout: Option<String>,
    new_branch_base: Option<String>,
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
pub(super) fn compile_status(
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
pub(super) fn compile_compare(
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
pub(super) fn compile_catch_up(
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
