//! Word from the writer to the forwarder that work was queued, and of which keys. A claim
//! cannot take anything of a key whose head this relay is sending: the next trigger of
//! that key becomes due only when the send's outcome is recorded (and that commit wakes
//! the forwarder again). So a commit whose new triggers all belong to keys being sent (one
//! busy project+ref: every push while its last trigger is in flight) needs no claim. It
//! used to cost one per group of webhooks that found nothing: on PostgreSQL a transaction
//! of three statements on the claims' connection, every few milliseconds under load.

use std::collections::HashSet;
use std::sync::Mutex;

use tokio::sync::Notify;

/// Most different keys the commits between two looks list; with more, the forwarder
/// claims.
pub(super) const MOST_KEYS: usize = 64;

/// What the commits since the forwarder last looked queued, and a wake-up for it.
#[derive(Default)]
pub struct NewWork {
    wake: Notify,
    noted: Mutex<Noted>,
}

/// New work noted since the forwarder last looked.
#[derive(Default)]
pub struct Noted {
    keys: HashSet<String>,
    /// Some work is of a key not listed (a recorded outcome moved its key on, a replay,
    /// too many keys): a claim is needed whatever is being sent.
    pub unlisted: bool,
}

impl Noted {
    /// Whether a claim is needed: some of the work is of a key that `sending` does not
    /// hold.
    pub fn needs_claim(&self, sending: impl Fn(&str) -> bool) -> bool {
        self.unlisted || self.keys.iter().any(|key| !sending(key))
    }
}

impl NewWork {
    /// Notes a commit's new work, of `keys` (`None` when it cannot say which), and wakes
    /// the forwarder.
    pub(super) fn add(&self, keys: Option<Vec<String>>) {
        {
            let mut noted = self.lock();
            match keys {
                Some(keys) if !noted.unlisted => noted.keys.extend(keys),
                _ => noted.unlisted = true,
            }
            if noted.keys.len() > MOST_KEYS {
                noted.unlisted = true;
            }
            if noted.unlisted {
                noted.keys.clear();
            }
        }
        self.wake.notify_one();
    }

    /// Waits for word of new work (returns at once when some came since the last take).
    pub async fn notified(&self) {
        self.wake.notified().await;
    }

    /// What was noted since the last take.
    pub fn take(&self) -> Noted {
        std::mem::take(&mut *self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Noted> {
        self.noted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    fn keys(keys: &[&str]) -> Option<Vec<String>> {
        Some(keys.iter().map(|key| (*key).to_owned()).collect())
    }

    /// New triggers only of keys being sent need no claim; one of any other key does, and
    /// so does work whose keys are not listed. Every commit wakes the forwarder, and what
    /// it read is forgotten.
    #[test]
    fn a_claim_is_needed_for_keys_not_being_sent() {
        let work = NewWork::default();
        let sending = |key: &str| key == "busy";
        work.add(keys(&["busy"]));
        work.add(keys(&["busy"]));
        assert!(work.notified().now_or_never().is_some(), "woken");
        assert!(!work.take().needs_claim(sending), "only the key being sent");
        work.add(keys(&["busy", "other"]));
        assert!(work.take().needs_claim(sending));
        assert!(!work.take().needs_claim(sending), "forgotten once read");
        work.add(None);
        work.add(keys(&["busy"]));
        let noted = work.take();
        assert!(
            noted.unlisted && noted.needs_claim(sending),
            "an outcome moved some key on"
        );
        let many: Vec<String> = (0..=MOST_KEYS).map(|n| format!("key {n}")).collect();
        work.add(Some(many));
        assert!(work.take().needs_claim(sending), "too many to list");
        // One busy key many times over (a big group, or several before a look) is one key.
        let busy: Vec<String> = (0..=MOST_KEYS).map(|_| "busy".to_owned()).collect();
        work.add(Some(busy.clone()));
        work.add(Some(busy));
        assert!(!work.take().needs_claim(sending), "one key, however often");
    }
}
