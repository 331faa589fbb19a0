//! Upstreams that are down: a network error or a `502`/`503`/`504` pauses every trigger
//! for that upstream, not just the one that met it.
//!
//! Without this, an outage with work waiting for many projects turns every project's own
//! retry schedule into a storm of calls to a GitLab that is not there (10,000 projects,
//! thousands of calls a second). When a pause starts, the upstream's due triggers are moved
//! past it in the store, all at once (`Outbox::hold_upstream`); one claimed meanwhile is
//! deferred by itself (no attempt counted either way). The first triggers due after the
//! pause probe the upstream. The pause doubles while probes fail (1 s up to 30 s) and ends
//! at the first answer that is not a `5xx`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Projects GitLab answered `429` for (upstream and project), and until when their
/// triggers wait.
pub type Paused = Arc<Mutex<HashMap<String, Instant>>>;

/// What holds this relay's triggers back besides limits, shared with the dashboard.
#[derive(Default)]
pub struct Holds {
    pub paused: Paused,
    pub outages: Arc<Outages>,
}

/// The first pause after an upstream fails.
const FIRST_PAUSE: Duration = Duration::from_secs(1);
/// The longest pause: a GitLab that comes back is used again within this long.
const LONGEST_PAUSE: Duration = Duration::from_secs(30);

/// Which upstreams are paused, and for how long.
#[derive(Debug, Default)]
pub struct Outages {
    paused: Mutex<HashMap<String, Pause>>,
}

#[derive(Clone, Copy, Debug)]
struct Pause {
    until: Instant,
    length: Duration,
}

impl Outages {
    /// The upstream failed as a whole: pause it (longer each time in a row). Returns the
    /// pause when this starts or lengthens one, so it is logged once, not per trigger.
    pub fn failed(&self, upstream: &str, now: Instant) -> Option<Duration> {
        let mut paused = self
            .paused
            .lock()
            .expect("the outage lock is never poisoned");
        let length = match paused.get(upstream) {
            // A trigger sent before the pause began: the pause already covers it.
            Some(pause) if pause.until > now => return None,
            Some(pause) => (pause.length * 2).min(LONGEST_PAUSE),
            None => FIRST_PAUSE,
        };
        paused.insert(
            upstream.to_owned(),
            Pause {
                until: now + length,
                length,
            },
        );
        Some(length)
    }

    /// The upstream answered: it is up. Returns whether it had been paused.
    pub fn answered(&self, upstream: &str) -> bool {
        self.paused
            .lock()
            .expect("the outage lock is never poisoned")
            .remove(upstream)
            .is_some()
    }

    /// Every upstream paused now, and for how much longer (the dashboard).
    pub fn current(&self, now: Instant) -> Vec<(String, Duration)> {
        let paused = self
            .paused
            .lock()
            .expect("the outage lock is never poisoned");
        let mut current: Vec<(String, Duration)> = paused
            .iter()
            .filter_map(|(upstream, pause)| {
                Some((upstream.clone(), pause.until.checked_duration_since(now)?))
            })
            .collect();
        current.sort();
        current
    }

    /// How long the upstream's triggers still wait, if it is paused.
    pub fn paused(&self, upstream: &str, now: Instant) -> Option<Duration> {
        self.paused
            .lock()
            .expect("the outage lock is never poisoned")
            .get(upstream)
            .and_then(|pause| pause.until.checked_duration_since(now))
            .filter(|left| !left.is_zero())
    }
}

/// Whether an answer (or its absence) says the upstream as a whole is down.
pub fn means_down(status: Option<u16>) -> bool {
    matches!(status, None | Some(502..=504))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_while_probes_fail_and_end_at_an_answer() {
        let outages = Outages::default();
        let start = Instant::now();
        assert_eq!(outages.failed("gitlab", start), Some(FIRST_PAUSE));
        assert_eq!(
            outages.failed("gitlab", start + Duration::from_millis(10)),
            None,
            "calls already in flight do not lengthen the pause"
        );
        assert!(
            outages
                .paused("gitlab", start + Duration::from_millis(500))
                .is_some()
        );
        assert_eq!(outages.paused("other", start), None, "only that upstream");
        let probe = start + FIRST_PAUSE;
        assert_eq!(outages.paused("gitlab", probe), None, "a probe may go");
        assert_eq!(outages.failed("gitlab", probe), Some(FIRST_PAUSE * 2));
        let mut at = probe;
        for _ in 0..10 {
            at += LONGEST_PAUSE;
            outages.failed("gitlab", at);
        }
        assert_eq!(
            outages.paused("gitlab", at),
            Some(LONGEST_PAUSE),
            "never longer than the cap"
        );
        assert!(outages.answered("gitlab"));
        assert_eq!(outages.paused("gitlab", at), None);
        assert!(means_down(None) && means_down(Some(503)) && !means_down(Some(500)));
        assert!(!means_down(Some(429)) && !means_down(Some(404)));
    }
}
