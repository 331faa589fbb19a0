//! `[delivery]`: how the outbox retries and how long it keeps records.

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{FileProblems, parse_duration_at_least, typed};

/// `[delivery]`: how the outbox retries and how long it keeps records.
#[derive(Clone, Debug, PartialEq)]
pub struct DeliveryConfig {
    pub retry: crate::retry::RetryPolicy,
    /// Deliveries (and their delivery ids, for duplicates) are kept this long.
    pub retention: Duration,
    /// Sends in flight at once.
    pub workers: usize,
    /// How far back a relay starting looks for scheduled times it missed while no relay
    /// ran, each rule's latest fired once, late (`0s`: never).
    pub schedule_catch_up: Duration,
    /// What the state folder's disk keeps free: below it, new webhooks and gateway calls
    /// are refused while what is queued is still sent and recorded (see
    /// [`crate::disk_reserve`]).
    pub min_free_disk: crate::disk_reserve::Reserve,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            retry: crate::retry::RetryPolicy::default(),
            retention: Duration::from_secs(7 * 24 * 3600),
            workers: 8,
            schedule_catch_up: Duration::from_secs(3600),
            min_free_disk: crate::disk_reserve::Reserve::default(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDelivery {
    retry_base: Option<Spanned<String>>,
    retry_cap: Option<Spanned<String>>,
    max_age: Option<Spanned<String>>,
    retention: Option<Spanned<String>>,
    workers: Option<Spanned<u32>>,
    schedule_catch_up: Option<Spanned<String>>,
    min_free_disk: Option<Spanned<String>>,
}

/// Compiles `[delivery]`, with the defaults for what it leaves out.
pub(super) fn compile(raw: RawDelivery, problems: &mut FileProblems<'_>) -> DeliveryConfig {
    let defaults = DeliveryConfig::default();
    // `least`: a retry sooner than that would call a failing GitLab again and again; an
    // age or a retention of 0 says "never retry" or "keep nothing", and means it.
    let duration = |field: Option<Spanned<String>>,
                    default: Duration,
                    key: &str,
                    least: Duration,
                    problems: &mut FileProblems<'_>| {
        typed(field, default, problems, |text| {
            parse_duration_at_least(text, least).map_err(|err| format!("delivery.{key}: {err}"))
        })
    };
    let retry = crate::retry::RetryPolicy {
        base: duration(
            raw.retry_base,
            defaults.retry.base,
            "retry_base",
            Duration::from_millis(10),
            problems,
        ),
        cap: duration(
            raw.retry_cap,
            defaults.retry.cap,
            "retry_cap",
            Duration::from_millis(100),
            problems,
        ),
        max_age: duration(
            raw.max_age,
            defaults.retry.max_age,
            "max_age",
            Duration::ZERO,
            problems,
        ),
    };
    let retention = duration(
        raw.retention,
        defaults.retention,
        "retention",
        Duration::ZERO,
        problems,
    );
    let schedule_catch_up = duration(
        raw.schedule_catch_up,
        defaults.schedule_catch_up,
        "schedule_catch_up",
        Duration::ZERO,
        problems,
    );
    let workers = match raw.workers {
        Some(w) if *w.get_ref() == 0 || *w.get_ref() > 256 => {
            problems.at(Some(w.span()), "delivery.workers must be between 1 and 256");
            defaults.workers
        }
        Some(w) => *w.get_ref() as usize,
        None => defaults.workers,
    };
    let min_free_disk = typed(
        raw.min_free_disk,
        defaults.min_free_disk,
        problems,
        |text| {
            super::parse_size(text)
                .map(|bytes| crate::disk_reserve::Reserve::Bytes(bytes as u64))
                .map_err(|err| format!("delivery.min_free_disk: {err}"))
        },
    );
    DeliveryConfig {
        retry,
        retention,
        workers,
        schedule_catch_up,
        min_free_disk,
    }
}
