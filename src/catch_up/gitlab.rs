//! GitLab's side of catch-up: a project's or group's webhook, its *Recent events* read
//! through `GET …/hooks/:hook_id/events` and resent with `POST
//! …/events/:hook_log_id/resend` (GitLab 17.4 and later).
//!
//! GitLab logs every attempt, and a resend sends the webhook with its first attempt's
//! `Idempotency-Key`, which the relay stores as the delivery id: so an event is its
//! key, and the store says whether the relay holds it. Only the attempts that found the
//! relay away or busy are listed (`status=server_failure,429`: no answer, which GitLab
//! logs as `internal error`, a `5xx` or a `429`); a `4xx` would be refused again.
//!
//! GitLab protects itself from a receiver that fails: after four failures in a row it
//! stops calling a project's hook for a minute, then two, four… up to a day, and after
//! forty it stops until someone enables it again. Webhooks of that time are never sent
//! nor logged, so nothing can resend them; the hook's `alert_status` says so, and a run
//! says it loudly (a resend then is refused with `Hook disabled` anyway).

use std::collections::BTreeMap;

use serde::Deserialize;

use super::Event;

/// GitLab's largest page of hook events.
pub const PER_PAGE: usize = 20;

/// One attempt in a hook's *Recent events*.
#[derive(Clone, Debug, Deserialize)]
pub struct LoggedAttempt {
    /// The log entry's id, which a resend names.
    pub id: u64,
    /// `push_hooks`, `tag_push_hooks`, …
    #[serde(default)]
    pub trigger: String,
    /// The headers GitLab sent (custom ones redacted), `Idempotency-Key` among them.
    #[serde(default)]
    pub request_headers: BTreeMap<String, serde_json::Value>,
    /// `"503"`, `"internal error"` (no answer), or a number.
    #[serde(default)]
    pub response_status: serde_json::Value,
    /// When GitLab made the attempt (its newer versions say).
    #[serde(default)]
    pub created_at: Option<String>,
}

impl LoggedAttempt {
    fn header(&self, name: &str) -> Option<&str> {
        self.request_headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .and_then(|(_, value)| value.as_str())
    }

    /// The webhook's id across GitLab's attempts and resends (17.4 and later).
    pub fn key(&self) -> Option<&str> {
        self.header("idempotency-key").filter(|key| !key.is_empty())
    }

    /// The answer's status code, `0` for none (`internal error`: GitLab could not
    /// connect, or timed out).
    pub fn code(&self) -> u16 {
        status_code(&self.response_status).unwrap_or(0)
    }

    fn answer(&self) -> String {
        match (&self.response_status, status_code(&self.response_status)) {
            (serde_json::Value::String(text), None) => text.trim().to_owned(),
            (_, code) => code.unwrap_or(0).to_string(),
        }
    }

    /// Milliseconds since the epoch, when GitLab says.
    pub fn at(&self) -> Option<i64> {
        chrono::DateTime::parse_from_rfc3339(self.created_at.as_deref()?)
            .ok()
            .map(|time| time.timestamp_millis())
    }
}

/// A `response_status` as GitLab writes it, in its log and in its answer to a resend: a
/// number, or a number as text (`"503"`); `None` for words (`"internal error"`: no
/// answer).
fn status_code(value: &serde_json::Value) -> Option<u16> {
    match value {
        serde_json::Value::Number(number) => number.as_u64().map(|n| n as u16),
        serde_json::Value::String(text) => text.trim().parse().ok(),
        _ => None,
    }
}

/// The relay's status code in GitLab's answer to a resend, `{"response_status": 200}`.
pub fn resent_answer(body: &[u8]) -> Option<u16> {
    let answer: serde_json::Value = serde_json::from_slice(body).ok()?;
    status_code(&answer["response_status"])
}

/// The failed attempts of the window as events, oldest first; attempts without an
/// `Idempotency-Key` (GitLab before 17.4, which cannot resend either) are counted apart.
pub fn events(attempts: &[LoggedAttempt]) -> (Vec<Event>, usize) {
    let mut by_key: BTreeMap<&str, (u64, Event)> = BTreeMap::new();
    let mut keyless = 0;
    for attempt in attempts {
        let Some(key) = attempt.key() else {
            keyless += 1;
            continue;
        };
        let event = attempt
            .header("x-gitlab-event")
            .map(str::to_owned)
            .unwrap_or_else(|| attempt.trigger.clone());
        let entry = by_key.entry(key).or_insert_with(|| {
            (
                attempt.id,
                Event {
                    guid: key.to_owned(),
                    event,
                    attempts: 0,
                    delivered: false,
                    newest_code: attempt.code(),
                    newest: attempt.id,
                    newest_at: attempt.created_at.clone().unwrap_or_default(),
                    newest_answer: attempt.answer(),
                },
            )
        });
        entry.1.attempts += 1;
        // Log ids grow with time: the newest attempt is the one with the largest.
        if attempt.id > entry.0 {
            entry.0 = attempt.id;
            entry.1.newest = attempt.id;
            entry.1.newest_code = attempt.code();
            entry.1.newest_at = attempt.created_at.clone().unwrap_or_default();
            entry.1.newest_answer = attempt.answer();
        }
    }
    let mut events: Vec<(u64, Event)> = by_key.into_values().collect();
    events.sort_by_key(|(newest, _)| *newest);
    (
        events.into_iter().map(|(_, event)| event).collect(),
        keyless,
    )
}

/// The hook as `GET …/hooks/:hook_id` shows it: only whether GitLab still calls it.
#[derive(Debug, Default, Deserialize)]
pub struct HookState {
    #[serde(default)]
    pub alert_status: Option<String>,
    #[serde(default)]
    pub disabled_until: Option<String>,
}

impl HookState {
    /// Why GitLab does not call the hook now, if it does not.
    pub fn disabled(&self) -> Option<String> {
        match self.alert_status.as_deref()? {
            "temporarily_disabled" => Some(format!(
                "GitLab stopped calling this hook after four failures in a row{}: webhooks \
                 meanwhile are neither sent nor logged, so they cannot be resent (GitLab \
                 calls it again after that time, and the first delivery that succeeds \
                 enables it; push again what must not be missed)",
                self.disabled_until
                    .as_deref()
                    .map(|until| format!(", until {until}"))
                    .unwrap_or_default()
            )),
            "disabled" => Some(
                "GitLab disabled this hook after forty failures in a row: it sends nothing \
                 until the hook is enabled again on its settings page (Settings, Webhooks: \
                 Enable), and webhooks meanwhile are neither sent nor logged"
                    .to_owned(),
            ),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(id: u64, key: Option<&str>, status: serde_json::Value) -> LoggedAttempt {
        let mut headers = serde_json::json!({"X-Gitlab-Event": "Tag Push Hook"});
        if let Some(key) = key {
            headers["Idempotency-Key"] = key.into();
        }
        serde_json::from_value(serde_json::json!({
            "id": id, "url": "https://relay.example.com/hooks/gitlab", "trigger": "tag_push_hooks",
            "request_headers": headers, "request_data": {}, "response_headers": {},
            "response_body": "", "execution_duration": 10.2, "response_status": status,
            "created_at": format!("2026-12-06T10:0{id}:00.000Z"),
        }))
        .unwrap()
    }

    #[test]
    fn attempts_are_grouped_by_their_idempotency_key_and_name_their_newest() {
        let listed = [
            attempt(3, Some("b"), "internal error".into()),
            attempt(1, Some("a"), "503".into()),
            attempt(4, Some("a"), 502.into()),
            attempt(2, None, "500".into()),
        ];
        let (events, keyless) = events(&listed);
        assert_eq!(keyless, 1);
        let summary: Vec<(&str, u64, usize, u16, &str)> = events
            .iter()
            .map(|e| {
                (
                    e.guid.as_str(),
                    e.newest,
                    e.attempts,
                    e.newest_code,
                    e.newest_answer.as_str(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [("b", 3, 1, 0, "internal error"), ("a", 4, 2, 502, "502")]
        );
        assert_eq!(events[0].event, "Tag Push Hook");
        assert!(events.iter().all(|e| e.may_arrive_again()));
        assert_eq!(listed[0].at(), Some(1_796_551_380_000));
    }

    #[test]
    fn gitlabs_answer_to_a_resend_says_what_the_relay_answered() {
        assert_eq!(resent_answer(br#"{"response_status":200}"#), Some(200));
        assert_eq!(resent_answer(br#"{"response_status":"503"}"#), Some(503));
        assert_eq!(
            resent_answer(br#"{"response_status":"internal error"}"#),
            None
        );
        assert_eq!(resent_answer(b"not json"), None);
    }

    #[test]
    fn a_hook_gitlab_stopped_calling_is_said_with_until_when() {
        let state = |status: &str| HookState {
            alert_status: Some(status.into()),
            disabled_until: Some("2026-12-06T11:00:00.000Z".into()),
        };
        assert_eq!(state("executable").disabled(), None);
        assert!(
            state("temporarily_disabled")
                .disabled()
                .unwrap()
                .contains("until 2026-12-06T11:00:00.000Z")
        );
        assert!(state("disabled").disabled().unwrap().contains("Enable"));
        assert_eq!(HookState::default().disabled(), None);
    }
}
