//! Whether the store takes writes and claims, as its writer threads last saw it: what
//! `/readyz` says, and what turns webhooks away while the store cannot take them.

use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What a writer thread does: everything, or (on a shared store, beside the first) the
/// claims alone. Each reports its own problems, and clears only its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Duty {
    Writes = 0,
    Claims = 1,
}

/// How long one write to the store may run before `/readyz` says the store is stuck: a
/// commit takes milliseconds, a slow disk's worst a second or two, and GitHub gives up on
/// a webhook after 10 s.
pub const STALLED_AFTER: Duration = Duration::from_secs(5);

/// Whether the store takes writes and claims, as the writers last saw it; `/readyz`
/// reads it.
#[derive(Debug, Default)]
pub struct StoreHealth {
    /// Indexed by [`Duty`].
    failing: Mutex<[Option<String>; 2]>,
    /// When each writer's write under way began, indexed by [`Duty`]: a write that never
    /// ends (a hung disk, a frozen filesystem, a database that stopped answering) raises
    /// no error, and `/readyz` must say so all the same. Before, it answered `200` for as
    /// long as the disk hung while every webhook waited.
    writing_since: Mutex<[Option<std::time::Instant>; 2]>,
    /// The writer holds outcomes of sends the store has not taken yet: their leases may
    /// have run out meanwhile, and this relay's claims must not take them over.
    outcomes_waiting: std::sync::atomic::AtomicBool,
    /// The state folder's disk is below its reserve: why, said for refusals and
    /// `/readyz` (see [`crate::disk_reserve`]). Read by every webhook and gateway call,
    /// without a lock.
    disk_low: arc_swap::ArcSwapOption<String>,
}

impl StoreHealth {
    /// Why the store cannot be written (or claimed from) now, or `None` when it can.
    pub fn problem(&self) -> Option<String> {
        let failing = self.lock().iter().flatten().next().cloned();
        failing
            .or_else(|| self.disk_low())
            .or_else(|| self.stalled())
    }

    /// Why new work is refused for the disk's reserve, or `None` while it has room.
    pub fn disk_low(&self) -> Option<String> {
        self.disk_low.load().as_deref().cloned()
    }

    /// Notes whether the disk is below its reserve, and why.
    pub fn set_disk_low(&self, problem: Option<String>) {
        self.disk_low.store(problem.map(Arc::new));
    }

    /// How long the longest write under way has run (zero between writes).
    pub fn longest_write(&self) -> Duration {
        self.writing()
            .iter()
            .flatten()
            .map(|since| since.elapsed())
            .max()
            .unwrap_or_default()
    }

    /// A write under way for [`STALLED_AFTER`] or longer, said as a problem.
    fn stalled(&self) -> Option<String> {
        let longest = self.longest_write();
        (longest >= STALLED_AFTER).then(|| {
            format!(
                "its write under way has not finished for {} s: a disk or database that stopped answering?",
                longest.as_secs()
            )
        })
    }

    /// Notes that a writer began a write (`Some`) or ended it (`None`).
    pub(super) fn set_writing(&self, duty: Duty, since: Option<std::time::Instant>) {
        self.writing()[duty as usize] = since;
    }

    fn writing(&self) -> std::sync::MutexGuard<'_, [Option<std::time::Instant>; 2]> {
        self.writing_since
            .lock()
            .expect("the health lock is never poisoned")
    }

    /// The problem one writer saw last.
    pub(super) fn problem_of(&self, duty: Duty) -> Option<String> {
        self.lock()[duty as usize].clone()
    }

    pub(super) fn set(&self, duty: Duty, problem: Option<String>) {
        self.lock()[duty as usize] = problem;
    }

    pub(super) fn outcomes_waiting(&self) -> bool {
        self.outcomes_waiting
            .load(std::sync::atomic::Ordering::Acquire)
    }

    pub(super) fn set_outcomes_waiting(&self, waiting: bool) {
        self.outcomes_waiting
            .store(waiting, std::sync::atomic::Ordering::Release);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, [Option<String>; 2]> {
        self.failing
            .lock()
            .expect("the health lock is never poisoned")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write that runs on and on makes the store a problem for `/readyz` once it has run
    /// for [`STALLED_AFTER`]; a write that failed is said first.
    #[test]
    fn a_write_that_never_ends_is_a_problem() {
        let health = StoreHealth::default();
        let now = std::time::Instant::now();
        health.set_writing(Duty::Writes, Some(now));
        assert_eq!(health.problem(), None, "a write under way");
        let long_ago = now
            .checked_sub(STALLED_AFTER + Duration::from_secs(2))
            .unwrap();
        health.set_writing(Duty::Claims, Some(long_ago));
        let problem = health.problem().expect("a stalled write is a problem");
        assert!(
            problem.starts_with("its write under way has not finished for 7 s"),
            "{problem}"
        );
        health.set(Duty::Writes, Some("disk full".into()));
        assert_eq!(health.problem().as_deref(), Some("disk full"));
        health.set(Duty::Writes, None);
        health.set_writing(Duty::Claims, None);
        assert_eq!(health.problem(), None, "the write ended");
    }

    /// A disk under its reserve is a problem for `/readyz` after a failed write and before
    /// a stalled one, and goes when the disk has room again.
    #[test]
    fn a_disk_under_its_reserve_is_a_problem_until_it_has_room() {
        let health = StoreHealth::default();
        assert_eq!(health.disk_low(), None);
        health.set_disk_low(Some("the store's disk has 1 KiB free".into()));
        assert_eq!(
            health.problem().as_deref(),
            Some("the store's disk has 1 KiB free")
        );
        health.set(Duty::Writes, Some("disk full".into()));
        assert_eq!(health.problem().as_deref(), Some("disk full"));
        health.set(Duty::Writes, None);
        health.set_disk_low(None);
        assert_eq!((health.disk_low(), health.problem()), (None, None));
    }
}
