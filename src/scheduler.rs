//! Scheduled rules: fire each rule's triggers when its cron schedule comes due.
//!
//! Each pass looks at the current configuration (so reloads take effect), fires every rule
//! with an occurrence in the time since the last pass (once per rule, however long the
//! pass was delayed, so a suspended machine does not fire a backlog), then sleeps until
//! the next occurrence or the next reload, and at most 30 seconds.
//!
//! A relay starting fires, once and late, each rule's latest time that fell while no
//! relay ran, within `[delivery] schedule_catch_up` (a nightly build at 00:30 is not lost
//! to a reboot at 00:29). The firing's delivery id makes a time already fired a duplicate,
//! so nothing fires twice; a time before the store last saw a relay running was not missed.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;

use crate::app::App;
use crate::outbox::{NewDelivery, NewTrigger};
use crate::rules::{Rule, RuleSet};

/// Longest sleep, so that rules added by a reload are seen promptly.
const MAX_SLEEP: Duration = Duration::from_secs(30);

/// The scheduled rules with an occurrence in `(after, upto]`, each with that occurrence;
/// for a rule `seen` since later than `after`, in `(seen since, upto]` instead.
pub fn due<'a>(
    rules: &'a RuleSet,
    seen: &Seen,
    after: DateTime<Utc>,
    upto: DateTime<Utc>,
) -> Vec<(&'a Rule, DateTime<Utc>)> {
    rules
        .rules()
        .iter()
        .filter_map(|rule| {
            let schedule = rule.spec.schedule.as_ref()?;
            let after = seen.since(rule).map_or(after, |since| since.max(after));
            let next = schedule.next_after(after)?;
            (next <= upto).then_some((rule, next))
        })
        .collect()
}

/// When the scheduler first saw each scheduled rule as it is now (its name, schedule and
/// time zone): a rule added or changed by a reload fires from its next occurrence after
/// that, never for a time before it was there. (Before, the first pass after a reload
/// looked back to the previous pass, up to 30 s, and fired an occurrence from then.)
#[derive(Default)]
pub struct Seen {
    rules: std::collections::HashMap<String, (String, DateTime<Utc>)>,
}

impl Seen {
    /// Notes the rules of `rules` not seen before, as seen at `now`; forgets rules gone.
    pub fn update(&mut self, rules: &RuleSet, now: DateTime<Utc>) {
        let mut current = std::collections::HashSet::new();
        for rule in rules.rules() {
            let Some(schedule) = &rule.spec.schedule else {
                continue;
            };
            let shape = format!("{} {}", schedule.text, schedule.timezone);
            current.insert(rule.name());
            match self.rules.get(rule.name()) {
                Some((seen, _)) if *seen == shape => {}
                _ => {
                    self.rules.insert(rule.name().to_owned(), (shape, now));
                }
            }
        }
        self.rules.retain(|name, _| current.contains(name.as_str()));
    }

    fn since(&self, rule: &Rule) -> Option<DateTime<Utc>> {
        self.rules.get(rule.name()).map(|(_, since)| *since)
    }
}

/// Each scheduled rule's latest occurrence in `(after, upto]`: what a relay that was down
/// over that span missed, at most once per rule, however many times fell in it.
pub fn missed(
    rules: &RuleSet,
    after: DateTime<Utc>,
    upto: DateTime<Utc>,
) -> Vec<(&Rule, DateTime<Utc>)> {
    rules
        .rules()
        .iter()
        .filter_map(|rule| {
            let schedule = rule.spec.schedule.as_ref()?;
            let mut latest = None;
            let mut at = after;
            while let Some(next) = schedule.next_after(at).filter(|next| *next <= upto) {
                latest = Some(next);
                at = next;
            }
            latest.map(|time| (rule, time))
        })
        .collect()
}

/// Where a relay starting at `now` looks back from for missed times: the later of the
/// time the store last saw a relay running and `catch_up` ago (never further back than
/// the firings' delivery ids are kept, which keep a time from firing twice). `None`: a
/// new store, or catching up turned off.
fn catch_up_from(
    noted: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    catch_up: Duration,
    retention: Duration,
) -> Option<DateTime<Utc>> {
    let window = chrono::Duration::from_std(catch_up.min(retention)).ok()?;
    if window.is_zero() {
        return None;
    }
    let from = noted?.max(now - window);
    (from < now).then_some(from)
}

/// The earliest occurrence after `after` among all scheduled rules.
fn next_occurrence(rules: &RuleSet, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    rules
        .rules()
        .iter()
        .filter_map(|rule| rule.spec.schedule.as_ref()?.next_after(after))
        .min()
}

/// Records a scheduled rule's triggers in the outbox, which sends them. The delivery id is
/// the rule and the time, so a restart that looks at the same moment again queues nothing.
/// `late`: a time missed while no relay ran, fired as the relay starts.
async fn fire(
    app: &App,
    runtime: &crate::app::Runtime,
    rule: &Rule,
    time: DateTime<Utc>,
    late: bool,
) {
    let shown = rule
        .spec
        .schedule
        .as_ref()
        .expect("due rules are scheduled")
        .time_text(time);
    let mut triggers = Vec::new();
    let mut calls = Vec::new();
    for planned in runtime.config.rules.plan_scheduled(rule, &shown) {
        match planned.trigger {
            Ok(trigger) => {
                calls.push((trigger.project.to_string(), trigger.git_ref.to_string()));
                triggers.push(NewTrigger::queued(
                    planned.rule,
                    &trigger,
                    &planned.token_ref,
                    None,
                ));
            }
            Err(error) => {
                tracing::warn!(rule = %planned.rule, %error, "scheduled trigger not built")
            }
        }
    }
    let delivery = NewDelivery {
        source: "schedule".into(),
        delivery_id: format!("{}@{shown}", rule.name()),
        event_type: "schedule".into(),
        headers: Vec::new(),
        body: crate::store::StoredBody::default(),
        summary: serde_json::json!({ "rule": rule.name(), "time": shown }).to_string(),
        triggers,
    };
    match app.outbox.accept(delivery).await {
        Err(err) => {
            tracing::error!(rule = %rule.name(), error = %err, "scheduled triggers not recorded")
        }
        // Another relay fired it, or this one before it stopped.
        Ok(crate::store::Accepted::Duplicate { .. }) => {
            tracing::debug!(rule = %rule.name(), time = %shown, "scheduled time fired already");
        }
        Ok(crate::store::Accepted::Queued { .. }) => {
            for (project, git_ref) in calls {
                if late {
                    tracing::warn!(rule = %rule.name(), %project, %git_ref, time = %shown, "schedule missed while no relay ran: fired late, once");
                } else {
                    tracing::info!(rule = %rule.name(), %project, %git_ref, time = %shown, "schedule due");
                }
            }
        }
    }
}

/// Runs until `stop` turns true.
pub async fn run(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    let mut reloads = app.reloads();
    let mut last = app.outbox.clock();
    let mut seen = Seen::default();
    {
        let runtime = app.runtime();
        // Seen from the start, so that a time after it and before the first pass (as the
        // missed times are fired) is the first pass's to fire.
        seen.update(&runtime.config.rules, last);
        let delivery = &runtime.config.delivery;
        let from = catch_up_from(
            app.outbox.noted_before_start(),
            last,
            delivery.schedule_catch_up,
            delivery.retention,
        );
        if let Some(from) = from {
            for (rule, time) in missed(&runtime.config.rules, from, last) {
                fire(&app, &runtime, rule, time, true).await;
            }
        }
    }
    loop {
        let runtime = app.runtime();
        // The store's clock: relays sharing a database agree on which occurrence is due
        // whatever their own clocks say, so its delivery id lets exactly one fire it.
        let now = app.outbox.clock();
        seen.update(&runtime.config.rules, now);
        for (rule, time) in due(&runtime.config.rules, &seen, last, now) {
            fire(&app, &runtime, rule, time, false).await;
        }
        last = now;
        let sleep = next_occurrence(&runtime.config.rules, now)
            .and_then(|next| (next - now).to_std().ok())
            .unwrap_or(MAX_SLEEP)
            .min(MAX_SLEEP);
        drop(runtime);
        tokio::select! {
            _ = stop.changed() => return,
            _ = reloads.changed() => {}
            () = tokio::time::sleep(sleep + Duration::from_millis(5)) => {}
        }
        if *stop.borrow() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn rules_of(schedule: &str) -> RuleSet {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.toml"),
            format!(
                "[upstream.gitlab]\nurl = \"https://gitlab.example.com\"\n\
                 [[rule]]\nname = \"often\"\nschedule = \"{schedule}\"\n\
                 [rule.trigger]\nproject = \"9\"\nref = \"main\"\ntoken = \"env:TOKEN\"\n"
            ),
        )
        .unwrap();
        crate::config::load_with_env(dir.path(), &|name| {
            (name == "TOKEN").then(|| "glptt-x".into())
        })
        .unwrap()
        .rules
    }

    /// A rule added by a reload fires from its next occurrence, not for one that fell
    /// between the scheduler's previous pass and the reload (seen: a rule added at
    /// 04:13:16 fired its 04:12:50 occurrence). A rule whose schedule changed starts over
    /// the same way; one left as it was keeps its place.
    #[test]
    fn a_rule_added_by_a_reload_never_fires_for_a_time_before_it() {
        let at = |h, m, s| Utc.with_ymd_and_hms(2026, 12, 4, h, m, s).unwrap();
        let every_ten = rules_of("*/10 * * * * *");
        let mut seen = Seen::default();
        // The previous pass was at 04:12:45, with no scheduled rule; the reload at 04:13:16.
        seen.update(&every_ten, at(4, 13, 16));
        assert!(due(&every_ten, &seen, at(4, 12, 45), at(4, 13, 16)).is_empty());
        let next = due(&every_ten, &seen, at(4, 13, 16), at(4, 13, 20));
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].1, at(4, 13, 20));

        // Reloaded unchanged: nothing starts over.
        seen.update(&every_ten, at(4, 13, 25));
        assert_eq!(
            due(&every_ten, &seen, at(4, 13, 20), at(4, 13, 30))[0].1,
            at(4, 13, 30)
        );
        // Its schedule changed at 04:13:33: the new one's 04:13:32 is not fired.
        let every_two = rules_of("*/2 * * * * *");
        seen.update(&every_two, at(4, 13, 33));
        assert!(due(&every_two, &seen, at(4, 13, 30), at(4, 13, 33)).is_empty());
        assert_eq!(
            due(&every_two, &seen, at(4, 13, 33), at(4, 13, 34))[0].1,
            at(4, 13, 34)
        );
    }

    /// A relay starting fires each rule's latest missed time, once; none for a new store,
    /// with catching up off, or for a time before the store last saw a relay running.
    #[test]
    fn a_relay_starting_catches_up_on_the_latest_missed_time() {
        let at = |h, m, s| Utc.with_ymd_and_hms(2026, 12, 4, h, m, s).unwrap();
        let every_ten = rules_of("*/10 * * * * *");
        let missed = missed(&every_ten, at(4, 0, 5), at(4, 0, 47));
        assert_eq!(missed.len(), 1);
        assert_eq!(missed[0].1, at(4, 0, 40));
        assert!(super::missed(&every_ten, at(4, 0, 41), at(4, 0, 49)).is_empty());
        let hour = Duration::from_secs(3600);
        let week = Duration::from_secs(7 * 24 * 3600);
        let now = at(4, 30, 0);
        // Down since 04:20: from then.
        assert_eq!(
            catch_up_from(Some(at(4, 20, 0)), now, hour, week),
            Some(at(4, 20, 0))
        );
        // Down since the day before: an hour back at most.
        assert_eq!(
            catch_up_from(Some(at(1, 0, 0)), now, hour, week),
            Some(at(3, 30, 0))
        );
        // Never further back than firings are kept (they keep a time from firing twice).
        assert_eq!(
            catch_up_from(Some(at(1, 0, 0)), now, hour, Duration::from_secs(60)),
            Some(at(4, 29, 0))
        );
        assert_eq!(catch_up_from(None, now, hour, week), None, "a new store");
        assert_eq!(
            catch_up_from(Some(at(4, 20, 0)), now, Duration::ZERO, week),
            None
        );
        assert_eq!(catch_up_from(Some(now), now, hour, week), None);
    }

    #[test]
    fn due_rules_fire_once_per_pass() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.toml"),
            r#"
[upstream.gitlab]
url = "https://gitlab.example.com"

[[rule]]
name = "nightly"
schedule = "30 0 * * *"
timezone = "Europe/Berlin"
[rule.trigger]
project = "9"
ref = "main"
token = "env:TOKEN"
variables = { WHY = "{{ schedule.rule }} at {{ schedule.time }}" }
"#,
        )
        .unwrap();
        let config = crate::config::load_with_env(dir.path(), &|name| {
            (name == "TOKEN").then(|| "glptt-x".into())
        })
        .unwrap();
        let rules = &config.rules;
        let before = Utc.with_ymd_and_hms(2026, 1, 10, 23, 0, 0).unwrap();
        let after = Utc.with_ymd_and_hms(2026, 1, 10, 23, 31, 0).unwrap();
        let seen = Seen::default();
        let due = due(rules, &seen, before, after);
        assert_eq!(due.len(), 1);
        assert_eq!(
            due[0].1,
            Utc.with_ymd_and_hms(2026, 1, 10, 23, 30, 0).unwrap()
        );
        // A pass that covers two days still fires once.
        assert_eq!(
            super::due(rules, &seen, before, after + chrono::Duration::days(2)).len(),
            1
        );
        assert!(super::due(rules, &seen, after, after + chrono::Duration::hours(1)).is_empty());
        let planned = rules.plan_scheduled(due[0].0, "2026-01-11T00:30:00+01:00");
        let trigger = planned[0].trigger.as_ref().unwrap();
        assert_eq!(trigger.git_ref.as_str(), "main");
        assert_eq!(
            trigger.variables["WHY"],
            "nightly at 2026-01-11T00:30:00+01:00"
        );
    }
}
