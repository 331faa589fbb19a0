//! `limit = { … }`, as every section writes it.

use serde::Deserialize;

/// `limit = { … }` in any section; which keys a section allows is checked when compiled.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLimit {
    rate: Option<String>,
    per_project: Option<String>,
    per_client: Option<String>,
    per_token: Option<String>,
    burst: Option<u32>,
    on_limit: Option<String>,
}

/// Compiles the `key` rate of a `limit` table into a [`crate::limits::Limit`].
pub(crate) fn compile_limit(
    raw: &RawLimit,
    key: &str,
    section: &str,
    default_on_limit: crate::limits::OnLimit,
) -> Result<Option<crate::limits::Limit>, String> {
    use crate::limits::{Limit, OnLimit, Rate};
    let text = match key {
        "rate" => &raw.rate,
        "per_project" => &raw.per_project,
        "per_token" => &raw.per_token,
        _ => &raw.per_client,
    };
    let Some(text) = text else { return Ok(None) };
    let rate = Rate::parse(text).map_err(|err| format!("{section} limit.{key}: {err}"))?;
    let burst = match raw.burst {
        None => rate.count,
        Some(burst) => std::num::NonZeroU32::new(burst)
            .ok_or_else(|| format!("{section} limit.burst must be at least 1"))?,
    };
    let on_limit = match raw.on_limit.as_deref() {
        None => default_on_limit,
        Some("reject") => OnLimit::Reject,
        Some("queue") => OnLimit::Queue,
        Some(other) => {
            return Err(format!(
                "{section} limit.on_limit: {other:?} is not \"reject\" or \"queue\""
            ));
        }
    };
    Ok(Some(Limit {
        rate,
        burst,
        on_limit,
    }))
}

/// Refuses the keys of a `limit` table that `section` does not use.
pub(crate) fn only_limit_keys(
    raw: &RawLimit,
    section: &str,
    allowed: &[&str],
) -> Result<(), String> {
    let given = [
        ("rate", raw.rate.is_some()),
        ("per_project", raw.per_project.is_some()),
        ("per_client", raw.per_client.is_some()),
        ("per_token", raw.per_token.is_some()),
        ("on_limit", raw.on_limit.is_some()),
    ];
    for (key, present) in given {
        if present && !allowed.contains(&key) {
            return Err(format!(
                "{section} limit.{key} is not a setting here; use {}",
                allowed.join(", ")
            ));
        }
    }
    Ok(())
}
