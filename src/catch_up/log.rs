//! A hook's delivery log as the forge lists it: attempts, gathered into the events they
//! belong to (GitLab's listing is read in [`super::gitlab`] into the same events), and the
//! `Link` header that pages it.

use std::collections::BTreeMap;

use serde::Deserialize;

/// One attempt as the hook's delivery log lists it.
#[derive(Clone, Debug, Deserialize)]
pub struct Attempt {
    /// The attempt's own id, which a redelivery names.
    pub id: u64,
    /// The event's id: `X-GitHub-Delivery`, shared by every attempt of one event.
    pub guid: String,
    pub delivered_at: String,
    /// `0` when GitHub got no answer (it could not connect, or timed out).
    #[serde(default)]
    pub status_code: u16,
    /// GitHub's words for the answer: `OK`, `Invalid HTTP Response: 503`, `failed to connect to host`.
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub event: String,
    #[serde(default)]
    pub action: Option<String>,
}

impl Attempt {
    fn delivered(&self) -> bool {
        (200..300).contains(&self.status_code)
    }

    pub(super) fn at(&self) -> Option<i64> {
        chrono::DateTime::parse_from_rfc3339(&self.delivered_at)
            .ok()
            .map(|time| time.timestamp_millis())
    }
}

/// One event of the window, its attempts together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub guid: String,
    /// `push`, `ping`, … with the action where there is one (`pull_request.opened`).
    pub event: String,
    pub attempts: usize,
    /// Some attempt got a `2xx`.
    pub delivered: bool,
    /// The newest attempt's status code (`0`: no answer).
    pub newest_code: u16,
    /// The newest attempt: its id (what a redelivery names), time and answer.
    pub newest: u64,
    pub newest_at: String,
    pub newest_answer: String,
}

impl Event {
    /// Its newest attempt found the relay away or busy (no answer, `5xx`, `429`): a
    /// redelivery may arrive. A `4xx` is the relay's refusal of that webhook, which a
    /// redelivery would get again.
    pub fn may_arrive_again(&self) -> bool {
        matches!(self.newest_code, 0 | 429 | 500..=599)
    }
}

/// The window's attempts (newest first, as GitHub lists them) as events, oldest first.
pub fn events(attempts: &[Attempt]) -> Vec<Event> {
    let mut by_guid: BTreeMap<&str, (usize, Event)> = BTreeMap::new();
    for (order, attempt) in attempts.iter().enumerate() {
        let entry = by_guid.entry(&attempt.guid).or_insert_with(|| {
            let event = match &attempt.action {
                Some(action) if !action.is_empty() => format!("{}.{action}", attempt.event),
                _ => attempt.event.clone(),
            };
            let answer = match (attempt.status_code, attempt.status.trim()) {
                (0, "") => "no answer".to_owned(),
                (0, words) => words.to_owned(),
                (code, "") => code.to_string(),
                (code, words) => format!("{code} ({words})"),
            };
            (
                order,
                Event {
                    guid: attempt.guid.clone(),
                    event,
                    attempts: 0,
                    delivered: false,
                    newest_code: attempt.status_code,
                    newest: attempt.id,
                    newest_at: attempt.delivered_at.clone(),
                    newest_answer: answer,
                },
            )
        });
        entry.1.attempts += 1;
        entry.1.delivered |= attempt.delivered();
    }
    let mut events: Vec<(usize, Event)> = by_guid.into_values().collect();
    // The newest attempt came first: the event whose newest attempt is oldest goes first.
    events.sort_by_key(|(order, _)| std::cmp::Reverse(*order));
    events.into_iter().map(|(_, event)| event).collect()
}

/// The `rel="next"` address of a `Link` header, as GitHub and GitLab page their lists.
pub fn next_link(link: &str) -> Option<String> {
    link.split(',').find_map(|part| {
        let (address, params) = part.split_once(';')?;
        let is_next = params
            .split(';')
            .any(|param| matches!(param.trim(), "rel=\"next\"" | "rel=next"));
        let address = address.trim().strip_prefix('<')?.strip_suffix('>')?;
        is_next.then(|| address.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(id: u64, guid: &str, at: &str, status_code: u16) -> Attempt {
        Attempt {
            id,
            guid: guid.into(),
            delivered_at: at.into(),
            status_code,
            status: if status_code == 0 {
                "failed to connect to host".into()
            } else {
                String::new()
            },
            event: "push".into(),
            action: None,
        }
    }

    #[test]
    fn the_next_page_is_the_links_rel_next() {
        let link = "<https://api.github.com/repositories/1/hooks/2/deliveries?per_page=100&cursor=v1_11>; rel=\"next\", \
                    <https://api.github.com/repositories/1/hooks/2/deliveries?per_page=100&cursor=v1_30>; rel=\"prev\"";
        assert_eq!(
            next_link(link).as_deref(),
            Some(
                "https://api.github.com/repositories/1/hooks/2/deliveries?per_page=100&cursor=v1_11"
            )
        );
        assert_eq!(next_link("<https://x/y>; rel=\"prev\""), None);
        assert_eq!(next_link(""), None);
        assert_eq!(next_link("garbage"), None);
    }

    #[test]
    fn an_event_is_delivered_when_any_attempt_got_a_2xx_and_names_its_newest_attempt() {
        // Newest first, as GitHub lists them.
        let listed = [
            attempt(5, "c", "2026-12-06T10:05:00Z", 0),
            attempt(4, "a", "2026-12-06T10:04:00Z", 202),
            attempt(3, "b", "2026-12-06T10:03:00Z", 503),
            attempt(2, "b", "2026-12-06T10:02:00Z", 0),
            attempt(1, "a", "2026-12-06T10:01:00Z", 503),
        ];
        let events = events(&listed);
        let summary: Vec<(&str, bool, u64, usize)> = events
            .iter()
            .map(|e| (e.guid.as_str(), e.delivered, e.newest, e.attempts))
            .collect();
        assert_eq!(
            summary,
            [("b", false, 3, 2), ("a", true, 4, 2), ("c", false, 5, 1)]
        );
        assert_eq!(events[0].newest_answer, "503");
        assert_eq!(events[2].newest_answer, "failed to connect to host");
    }

    #[test]
    fn only_an_event_that_found_the_relay_away_or_busy_may_arrive_again() {
        let newest = |code| events(&[attempt(1, "a", "2026-12-06T10:00:00Z", code)]).remove(0);
        for code in [0, 429, 500, 502, 503, 504] {
            assert!(newest(code).may_arrive_again(), "{code}");
        }
        for code in [400, 401, 403, 404, 413, 415] {
            assert!(!newest(code).may_arrive_again(), "{code}");
        }
    }
}
