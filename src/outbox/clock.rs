//! Noticing that the store's clock went back.
//!
//! Every deadline the outbox keeps (when a retry or a deferred trigger is due, when a
//! shared limit lets the next call through, how long a project is paused) is a time on
//! the store's clock: the relay's own for SQLite, the database's for PostgreSQL. When that
//! clock is set back — an NTP step after a boot with a wrong hardware clock, a virtual
//! machine restored from a snapshot — every deadline set before the step comes that much
//! later: set back an hour, a trigger waiting for its retry, and every trigger queued
//! behind it for the same project and ref, waited an hour.
//!
//! The writer keeps the latest time it has seen and notes it in the store once a second;
//! when the clock shows clearly less than that, it moves every waiting deadline back by
//! the step, once (under the store's lock, so several relays move them once between them),
//! and deadlines keep the time they had left. A step forward needs nothing: deadlines come
//! early, which a retry and a limit both tolerate.

/// A step back smaller than this is left alone: its deadlines come at most this late.
pub const STEP_MS: i64 = 2_000;

/// How often the time last seen is written down in the store.
pub const NOTE_EVERY_MS: i64 = 1_000;

/// The latest time the writer has seen on the store's clock.
#[derive(Debug, Default)]
pub struct ClockWatch {
    seen: Option<i64>,
    noted: Option<i64>,
}

/// What a look at the clock found.
#[derive(Debug, PartialEq, Eq)]
pub enum Look {
    /// The clock did not go back; `note`: time to write the time down in the store.
    Steady { note: bool },
    /// The clock shows more than [`STEP_MS`] less than the latest time seen.
    WentBack,
}

impl ClockWatch {
    /// Starts from the time the store last noted (a step while no relay ran shows at the
    /// first look).
    pub fn from_store(noted: Option<i64>) -> ClockWatch {
        ClockWatch { seen: noted, noted }
    }

    /// Looks at `now` on the store's clock.
    pub fn look(&mut self, now: i64) -> Look {
        if self.seen.is_some_and(|seen| now < seen - STEP_MS) {
            return Look::WentBack;
        }
        self.seen = Some(self.seen.map_or(now, |seen| seen.max(now)));
        let note = self.noted.is_none_or(|noted| now >= noted + NOTE_EVERY_MS);
        if note {
            self.noted = Some(now);
        }
        Look::Steady { note }
    }

    /// The deadlines were moved (or found moved already): `now` is the time last seen.
    pub fn moved_back_to(&mut self, now: i64) {
        self.seen = Some(now);
        self.noted = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clock_that_goes_forward_is_noted_once_a_second() {
        let mut watch = ClockWatch::from_store(None);
        assert_eq!(watch.look(10_000), Look::Steady { note: true });
        assert_eq!(watch.look(10_500), Look::Steady { note: false });
        assert_eq!(watch.look(11_000), Look::Steady { note: true });
        // A jump forward is a clock going forward.
        assert_eq!(watch.look(3_611_000), Look::Steady { note: true });
    }

    #[test]
    fn a_step_back_beyond_the_tolerance_is_seen_until_the_deadlines_move() {
        let mut watch = ClockWatch::from_store(Some(100_000));
        // Jitter and small steps are left alone.
        assert_eq!(watch.look(98_500), Look::Steady { note: false });
        assert_eq!(watch.look(100_100), Look::Steady { note: false });
        assert_eq!(watch.look(97_000), Look::WentBack);
        // Until the deadlines are moved, every look says so again.
        assert_eq!(watch.look(97_010), Look::WentBack);
        watch.moved_back_to(97_010);
        assert_eq!(watch.look(97_020), Look::Steady { note: false });
        assert_eq!(watch.look(98_010), Look::Steady { note: true });
    }

    #[test]
    fn a_step_while_no_relay_ran_shows_at_the_first_look() {
        let mut watch = ClockWatch::from_store(Some(3_700_000));
        assert_eq!(watch.look(100_000), Look::WentBack);
    }
}
