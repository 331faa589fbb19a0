//! Scheduled rules: fire each rule's triggers when its cron schedule comes due.
//!
//! Each pass looks at the current configuration (so reloads take effect), fires every rule
//! with an occurrence in the time since the last pass (once per rule, however long the
//! pass was delayed, so a suspended machine does not fire a backlog), then sleeps until
//! the next occurrence or the next reload, and at most 30 seconds.

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
async fn fire(app: &App, runtime: &crate::app::Runtime, rule: &Rule, time: DateTime<Utc>) {
    let shown = rule
        .spec
        .schedule
        .as_ref()
        .expect("due rules are scheduled")
        .time_text(time);
    let mut triggers = Vec::new();
    for planned in runtime.config.rules.plan_scheduled(rule, &shown) {
        match planned.trigger {
            Ok(trigger) => {
                tracing::info!(rule = %planned.rule, project = %trigger.project, git_ref = %trigger.git_ref, time = %shown, "schedule due");
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
    if let Err(err) = app.outbox.accept(delivery).await {
        tracing::error!(rule = %rule.name(), error = %err, "scheduled triggers not recorded");
    }
}

/// Runs until `stop` turns true.
pub async fn run(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    let mut reloads = app.reloads();
    let mut last = app.outbox.clock();
    let mut seen = Seen::default();
    loop {
        let runtime = app.runtime();
        // The store's clock: relays sharing a database agree on which occurrence is due
        // whatever their own clocks say, so its delivery id lets exactly one fire it.
        let now = app.outbox.clock();
        seen.update(&runtime.config.rules, now);
        for (rule, time) in due(&runtime.config.rules, &seen, last, now) {
            fire(&app, &runtime, rule, time).await;
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
