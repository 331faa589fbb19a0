//! The state folder's disk reserve (`[delivery] min_free_disk`). A store whose disk fills
//! up can write nothing, not even the outcome of a send: the backlog stops draining, and
//! every trigger waits for an operator. So the relay stops taking new work a little
//! before that: below the reserve, new webhooks and gateway calls are refused (`503`, and
//! `/readyz` says why), while what is queued is still sent and its outcomes written. It
//! takes work again, without a restart, once the disk has room. For the SQLite store in
//! a state folder only: a PostgreSQL server's disk is its own to watch.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// How often the free space is read: one `statvfs(2)` call, a few microseconds. A relay
/// under full load writes up to about 200 MB a second to its store (a webhook's row and
/// its WAL frames), so it may go this long's worth (about 10 MB) past the reserve.
const LOOK_EVERY: Duration = Duration::from_millis(50);
/// The default reserve: this share of the disk…
const DEFAULT_SHARE_PERCENT: u64 = 2;
/// …at most this much.
const DEFAULT_MOST: u64 = 256 * 1024 * 1024;

/// How much the state folder's disk keeps free.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Reserve {
    /// 2 % of the disk, at most 256 MiB.
    #[default]
    Default,
    /// This many bytes; `0` turns the reserve off.
    Bytes(u64),
}

impl Reserve {
    /// The reserve in bytes on a disk of `size` bytes.
    pub fn bytes(self, size: u64) -> u64 {
        match self {
            Reserve::Default => (size / 100 * DEFAULT_SHARE_PERCENT).min(DEFAULT_MOST),
            Reserve::Bytes(bytes) => bytes,
        }
    }
}

/// The disk holding a folder: what is free to an unprivileged writer, and its size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Space {
    pub free: u64,
    pub size: u64,
}

impl Space {
    pub fn of(folder: &Path) -> std::io::Result<Space> {
        let stat = rustix::fs::statvfs(folder)?;
        Ok(Space {
            free: stat.f_bavail.saturating_mul(stat.f_frsize),
            size: stat.f_blocks.saturating_mul(stat.f_frsize),
        })
    }
}

/// Whether the disk is below its reserve, said as the reason new work is refused; with
/// some slack before it is taken again (a tenth of the reserve), so that a disk hovering
/// at the line does not take and refuse by turns. `free` and the reserve `line` in
/// bytes; `low`: it was below at the last look.
pub fn below(free: u64, line: u64, low: bool) -> Option<String> {
    let wanted = if low {
        line.saturating_add(line / 10)
    } else {
        line
    };
    (line > 0 && free < wanted).then(|| {
        format!(
            "the store's disk has {} free, under its reserve of {} ([delivery] min_free_disk): \
             new work waits for room, while what is queued is still sent",
            shown(free),
            shown(line)
        )
    })
}

/// What one look saw: the disk's space, the reserve in bytes, and why new work is
/// refused (`None`: it is not).
pub struct Look {
    pub space: Space,
    pub reserve: u64,
    pub refusal: Option<String>,
}

/// Reads the state folder's free space every [`LOOK_EVERY`] until `stopped`, against the
/// reserve `configured()` says (the configuration's, as reloaded), and hands each look to
/// `seen` (which keeps the outbox's health and the metrics). Logs each crossing once.
/// Blocking, for a thread of its own: `statvfs(2)` on a disk that stopped answering never
/// returns, and must not take a runtime's thread with it.
pub fn watch(
    folder: PathBuf,
    configured: impl Fn() -> Reserve,
    mut seen: impl FnMut(Look),
    stopped: tokio::sync::watch::Receiver<bool>,
) {
    let mut low = false;
    let mut unreadable = false;
    loop {
        match Space::of(&folder) {
            Ok(space) => {
                unreadable = false;
                let reserve = configured().bytes(space.size);
                let problem = below(space.free, reserve, low);
                if problem.is_some() != low {
                    low = problem.is_some();
                    match &problem {
                        Some(reason) => tracing::warn!(folder = %folder.display(), "{reason}"),
                        None => tracing::info!(
                            folder = %folder.display(),
                            free = %shown(space.free),
                            "the store's disk has room again: new work is taken"
                        ),
                    }
                }
                seen(Look {
                    space,
                    reserve,
                    refusal: problem,
                });
            }
            // The folder is gone or unreadable: the store's own writes say what is wrong.
            Err(err) if !unreadable => {
                unreadable = true;
                tracing::warn!(folder = %folder.display(), error = %err, "cannot read the free space of the store's disk");
            }
            Err(_) => {}
        }
        std::thread::sleep(LOOK_EVERY);
        if *stopped.borrow() {
            return;
        }
    }
}

/// `512 KiB`, `3.1 MiB`, `2.0 GiB`.
fn shown(bytes: u64) -> String {
    const KIB: f64 = 1024.0;
    let b = bytes as f64;
    if b < KIB * KIB {
        format!("{:.0} KiB", b / KIB)
    } else if b < KIB * KIB * KIB {
        format!("{:.1} MiB", b / (KIB * KIB))
    } else {
        format!("{:.1} GiB", b / (KIB * KIB * KIB))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn the_default_is_two_percent_of_the_disk_at_most_256_mib() {
        assert_eq!(Reserve::Default.bytes(3 * MIB), 3 * MIB / 100 * 2);
        assert_eq!(Reserve::Default.bytes(10_000 * MIB), 200 * MIB);
        assert_eq!(Reserve::Default.bytes(1_000_000 * MIB), 256 * MIB);
        assert_eq!(Reserve::Bytes(5).bytes(1_000_000 * MIB), 5);
    }

    #[test]
    fn below_the_reserve_is_said_and_above_it_with_slack_is_not() {
        let reserve = 10 * MIB;
        let reason = below(9 * MIB, reserve, false).expect("below");
        assert_eq!(
            reason,
            "the store's disk has 9.0 MiB free, under its reserve of 10.0 MiB ([delivery] min_free_disk): \
             new work waits for room, while what is queued is still sent"
        );
        assert_eq!(below(10 * MIB, reserve, false), None);
        // Once below, it takes a tenth of the reserve more to be taken again.
        assert!(below(10 * MIB + MIB / 2, reserve, true).is_some());
        assert_eq!(below(11 * MIB, reserve, true), None);
        // Off.
        assert_eq!(below(0, 0, true), None);
        // A reserve larger than any disk is always under, and says so.
        assert!(below(100 * MIB, u64::MAX, true).is_some());
    }

    #[test]
    fn a_folders_disk_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let space = Space::of(dir.path()).unwrap();
        assert!(space.size > 0 && space.free <= space.size, "{space:?}");
        assert!(Space::of(&dir.path().join("gone")).is_err());
    }
}
