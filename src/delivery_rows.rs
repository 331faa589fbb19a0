//! How a delivery row reads to a person, the same in `hookrelay deliveries` and on the
//! dashboard: its state and why (or why nothing ran), when a waiting trigger is tried
//! next, and the times that `--since`/`--until` and the dashboard's filters accept.

use crate::outbox::DeliveryRow;

/// A row's state as shown, and its last answer or why nothing ran. A delivery without a
/// trigger says which of the reasons it was, from the answer it got.
pub fn row_state(row: &DeliveryRow) -> (String, String) {
    let Some(state) = row.state.as_deref() else {
        let summary: serde_json::Value = serde_json::from_str(&row.summary).unwrap_or_default();
        let note = summary["note"].as_str().unwrap_or_default().to_owned();
        let first_error = summary["errors"][0]["error"].as_str();
        let no_events = summary["events"].as_array().is_none_or(Vec::is_empty);
        let turned_away = &summary["turned_away"];
        return if let Some(kind) = turned_away["as"].as_str() {
            let mut reason = turned_away["reason"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            match turned_away["not_recorded_before"].as_u64() {
                Some(held) if held > 0 => {
                    reason.push_str(&format!(" ({held} more since the previous record)"))
                }
                _ => {}
            }
            (kind.to_owned(), reason)
        } else if let Some(error) = first_error {
            ("error".into(), error.to_owned())
        } else if summary.get("pipeline").is_some() {
            ("pipeline".into(), note)
        } else if summary.get("admin").is_some() {
            ("admin".into(), note)
        } else if row.event_type == "ping" || note.starts_with("ping") {
            ("ping".into(), note)
        } else if no_events {
            ("not handled".into(), note)
        } else {
            let why = summary["events"]
                .as_array()
                .into_iter()
                .flatten()
                .find_map(|event| {
                    let first = &event["rules"][0];
                    Some(format!(
                        "{}: {}",
                        first["rule"].as_str()?,
                        first["reason"].as_str()?
                    ))
                })
                .unwrap_or(note);
            ("no match".into(), why)
        };
    };
    // Status posts and polls say so; a trigger's state stands alone.
    let kind = match row.kind.as_deref() {
        Some(kind @ ("status" | "poll")) => format!("{kind} "),
        _ => String::new(),
    };
    let state = match (state, row.replay_of, row.coalesced_into) {
        ("queued", _, _) if row.attempts > 0 => format!("{kind}retrying"),
        (state, None, None) => format!("{kind}{state}"),
        (state, _, Some(into)) => format!("{state} into {into}"),
        (state, Some(of), None) => format!("{kind}{state} (replay of {of})"),
    };
    let answer = match (&row.pipeline_url, &row.last_error) {
        (Some(url), _) if row.state.as_deref() == Some("sent") => url.clone(),
        (_, Some(error)) => match row.last_status {
            Some(status) if !error.starts_with(&status.to_string()) => format!("{status}: {error}"),
            _ => error.clone(),
        },
        (Some(url), None) => url.clone(),
        (None, None) => match row.waits_for {
            Some(head) => format!(
                "waits for {head}: {}",
                match row.kind.as_deref() {
                    Some("status") => "one status post at a time per commit and context, in order",
                    Some("poll") => "one poll at a time per pipeline",
                    _ => "one trigger at a time per project and ref, in order",
                }
            ),
            None => String::new(),
        },
    };
    (state, answer)
}

/// When a waiting trigger is tried next: `now`, how long until then, or after which
/// trigger (the one ahead of it for the same upstream, project and ref).
pub fn next_attempt(row: &DeliveryRow, now: i64) -> Option<String> {
    if row.state.as_deref() != Some("queued") {
        return None;
    }
    if let Some(head) = row.waits_for {
        return Some(format!("after {head}"));
    }
    let wait = row.due_at? - now;
    Some(if wait <= 0 {
        "now".into()
    } else {
        let seconds = (wait + 999) / 1000;
        match seconds {
            s if s < 120 => format!("in {s}s"),
            s if s < 7200 => format!("in {}m", s / 60),
            s => format!("in {}h", s / 3600),
        }
    })
}

/// A time for `--since`/`--until`: a duration back from now (`2h`, `30m`), or a UTC time
/// (`2026-12-02T10:00:00Z`, `2026-12-02 10:00`, `2026-12-02`).
pub fn parse_time(text: &str, now: i64) -> Result<i64, String> {
    match crate::config::parse_duration(text) {
        Ok(ago) => return Ok(now - ago.as_millis() as i64),
        // A duration, but longer than any setting takes: say so, not "not a duration".
        Err(message) if humantime::parse_duration(text.trim()).is_ok() => return Err(message),
        Err(_) => {}
    }
    if let Ok(time) = chrono::DateTime::parse_from_rfc3339(text) {
        return Ok(time.timestamp_millis());
    }
    for format in ["%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M"] {
        if let Ok(time) = chrono::NaiveDateTime::parse_from_str(text, format) {
            return Ok(time.and_utc().timestamp_millis());
        }
    }
    if let Ok(date) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(date
            .and_hms_opt(0, 0, 0)
            .expect("midnight exists")
            .and_utc()
            .timestamp_millis());
    }
    Err(format!(
        "{text:?} is neither a duration back from now (2h, 30m) nor a UTC time (2026-12-02T10:00:00Z, 2026-12-02 10:00, 2026-12-02)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_durations_back_or_utc_times_and_say_what_is_wrong() {
        let now = 1_800_000_000_000;
        assert_eq!(parse_time("2h", now), Ok(now - 7_200_000));
        assert_eq!(parse_time("2026-12-02", now), Ok(1_796_169_600_000));
        assert!(
            parse_time("200y", now)
                .unwrap_err()
                .contains("longer than 100 years")
        );
        assert!(
            parse_time("soon", now)
                .unwrap_err()
                .contains("is neither a duration")
        );
    }
}
