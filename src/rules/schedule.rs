//! Scheduled rules: cron expressions in a time zone, the alternative to cron + curl.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::Cron;

/// A rule's `schedule` (five-field cron) and `timezone` (IANA name, default UTC).
#[derive(Clone, Debug)]
pub struct Schedule {
    pub text: String,
    cron: Cron,
    pub timezone: Tz,
}

impl Schedule {
    pub fn parse(text: &str, timezone: Option<&str>) -> Result<Schedule, String> {
        let cron = Cron::from_str(text)
            .map_err(|err| format!("schedule {text:?} is not a cron expression: {err}"))?;
        let timezone = match timezone {
            None => Tz::UTC,
            Some(name) => name.parse::<Tz>().map_err(|_| {
                format!("timezone {name:?} is not an IANA time zone name (e.g. \"Europe/Berlin\")")
            })?,
        };
        Ok(Schedule {
            text: text.to_owned(),
            cron,
            timezone,
        })
    }

    /// The first time strictly after `after` when the schedule fires.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = after.with_timezone(&self.timezone);
        self.cron
            .find_next_occurrence(&local, false)
            .ok()
            .map(|next| next.with_timezone(&Utc))
    }

    /// A firing time as templates (`schedule.time`) and the firing's delivery id read it:
    /// RFC 3339 in the schedule's zone.
    pub fn time_text(&self, time: DateTime<Utc>) -> String {
        time.with_timezone(&self.timezone).to_rfc3339()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn nightly_in_a_time_zone() {
        let schedule = Schedule::parse("30 0 * * *", Some("Europe/Berlin")).unwrap();
        let now = Utc.with_ymd_and_hms(2026, 1, 10, 12, 0, 0).unwrap();
        // 00:30 in Berlin (UTC+1 in winter) is 23:30 UTC the day before.
        assert_eq!(
            schedule.next_after(now),
            Some(Utc.with_ymd_and_hms(2026, 1, 10, 23, 30, 0).unwrap())
        );
        let summer = Utc.with_ymd_and_hms(2026, 7, 10, 12, 0, 0).unwrap();
        assert_eq!(
            schedule.next_after(summer),
            Some(Utc.with_ymd_and_hms(2026, 7, 10, 22, 30, 0).unwrap())
        );
    }

    #[test]
    fn bad_input_says_what_is_wrong() {
        assert!(
            Schedule::parse("every night", None)
                .unwrap_err()
                .contains("not a cron expression")
        );
        assert!(
            Schedule::parse("30 0 * * *", Some("Mars/Olympus"))
                .unwrap_err()
                .contains("IANA")
        );
        let utc = Schedule::parse("*/15 * * * *", None).unwrap();
        let now = Utc.with_ymd_and_hms(2026, 1, 1, 0, 7, 0).unwrap();
        assert_eq!(
            utc.next_after(now),
            Some(Utc.with_ymd_and_hms(2026, 1, 1, 0, 15, 0).unwrap())
        );
    }

    /// Across a change of daylight saving time a schedule fires as cron does: a time the
    /// spring change skips fires at the first time after it (03:00), a time the autumn
    /// change repeats fires once, and a schedule of every hour or minute fires in both of
    /// the repeated hours.
    #[test]
    fn daylight_saving_changes_fire_as_cron_does() {
        let times = |text: &str, start: DateTime<Utc>| {
            let schedule = Schedule::parse(text, Some("Europe/Berlin")).unwrap();
            std::iter::successors(schedule.next_after(start), |t| schedule.next_after(*t))
                .take(3)
                .map(|t| schedule.time_text(t))
                .collect::<Vec<_>>()
        };
        let spring = Utc.with_ymd_and_hms(2026, 3, 28, 12, 0, 0).unwrap();
        let autumn = Utc.with_ymd_and_hms(2026, 10, 24, 12, 0, 0).unwrap();
        assert_eq!(
            times("30 2 * * *", spring),
            [
                "2026-03-29T03:00:00+02:00",
                "2026-03-30T02:30:00+02:00",
                "2026-03-31T02:30:00+02:00"
            ]
        );
        assert_eq!(
            times("30 2 * * *", autumn),
            [
                "2026-10-25T02:30:00+02:00",
                "2026-10-26T02:30:00+01:00",
                "2026-10-27T02:30:00+01:00"
            ]
        );
        let before_repeat = Utc.with_ymd_and_hms(2026, 10, 24, 23, 50, 0).unwrap();
        assert_eq!(
            times("*/30 * * * *", before_repeat),
            [
                "2026-10-25T02:00:00+02:00",
                "2026-10-25T02:30:00+02:00",
                "2026-10-25T02:00:00+01:00"
            ]
        );
    }
}
