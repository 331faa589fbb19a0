//! `[store]`: where the outbox lives. Absent, the relay keeps SQLite in its `--state`
//! folder; with `url = "postgres://…"` (or `HOOKRELAY_STORE_URL`) it uses a PostgreSQL
//! database that any number of relays share.
//!
//! A password never sits in a configuration file: `password = "env:NAME"` or
//! `"file:PATH"`, or a URL that comes from the environment.

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;
use toml::de::DeValue;

use super::{EnvLookup, FileProblems, parse_duration, section, typed};
use crate::secret::SecretRef;
use crate::store::STORE_URL_ENV;
use crate::store::postgres::{PostgresConfig, has_password};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStore {
    url: Option<Spanned<String>>,
    password: Option<Spanned<String>>,
    lease: Option<Spanned<String>>,
    ca_file: Option<Spanned<String>>,
}

/// Reads `[store]`; `None` when it has problems (reported to `problems`).
pub(super) fn read(
    value: Spanned<DeValue<'_>>,
    env: EnvLookup<'_>,
    resolve_secrets: bool,
    problems: &mut FileProblems<'_>,
) -> Option<PostgresConfig> {
    let span = value.span();
    let raw = section::<RawStore>(value, problems)?;
    let found = problems.found.len();
    let url = match (env(STORE_URL_ENV), &raw.url) {
        (Some(url), _) => checked_url(&url, STORE_URL_ENV)
            .map_err(|m| problems.at(Some(span.clone()), m))
            .ok(),
        (None, Some(url)) => {
            if has_password(url.get_ref()) {
                problems.at(
                    Some(url.span()),
                    "store.url: a password does not belong in a file; write password = \"env:NAME\" \
                     (or \"file:PATH\"), or set HOOKRELAY_STORE_URL",
                );
                None
            } else {
                checked_url(url.get_ref(), "store.url")
                    .map_err(|m| problems.at(Some(url.span()), m))
                    .ok()
            }
        }
        (None, None) => {
            problems.at(
                Some(span),
                "[store] needs url = \"postgres://user@host:5432/database\" (or HOOKRELAY_STORE_URL); \
                 without [store] the relay keeps its store in --state",
            );
            None
        }
    };
    let password = raw.password.and_then(|field| {
        let span = field.span();
        let reference = SecretRef::parse_in(field.get_ref(), problems.folder())
            .map_err(|reason| problems.at(Some(span.clone()), format!("store.password: {reason}")))
            .ok()?;
        if resolve_secrets && let Err(reason) = reference.resolve_with(env) {
            problems.at(
                Some(span),
                format!("store.password ({reference}): {reason}"),
            );
        }
        Some(reference)
    });
    let lease = typed(
        raw.lease,
        crate::store::postgres::DEFAULT_LEASE,
        problems,
        |text| {
            let lease = parse_duration(text).map_err(|err| format!("store.lease: {err}"))?;
            if lease < Duration::from_secs(1) {
                return Err("store.lease must be at least 1s".into());
            }
            Ok(lease)
        },
    );
    let ca_file = raw
        .ca_file
        .and_then(|ca| super::ca_file(ca, "store.ca_file", problems));
    if problems.found.len() > found {
        return None;
    }
    Some(PostgresConfig {
        url: url?,
        password,
        lease,
        ca_file,
    })
}

/// `HOOKRELAY_STORE_URL` without a `[store]` section.
pub(super) fn from_env(env: EnvLookup<'_>) -> Option<Result<PostgresConfig, String>> {
    let url = env(STORE_URL_ENV)?;
    Some(checked_url(&url, STORE_URL_ENV).map(PostgresConfig::new))
}

fn checked_url(url: &str, whence: &str) -> Result<String, String> {
    PostgresConfig::parse_url(url)
        .map(|_| url.to_owned())
        .map_err(|err| format!("{whence}: {err}"))
}
