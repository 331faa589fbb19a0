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
}
