//! Checkpoints on a thread of their own, so that no acknowledgement waits for SQLite to
//! copy its WAL back into the database, and the WAL stays short under a steady load.

use super::{SqliteEngine, error, open_connection};
use crate::store::EngineError;

/// Copies the WAL back into the database on a thread of its own, so the writer (which
/// every acknowledgement waits for) never spends a commit doing it.
///
/// SQLite starts the WAL over from its beginning only when a write transaction begins
/// with every frame already copied back. Under a steady load the writer begins its next
/// group while the checkpointer is still copying the last one, so that never happens and
/// the file grows without bound (gigabytes in minutes at full speed). So once the WAL is
/// long, the checkpointer copies after every commit, and when it has caught up it asks
/// the writer to copy the few frames committed since before its next group: the writer
/// then starts the WAL over, and the file stays within `WAL_KEEP_BYTES` or so. (Asked
/// before it caught up, the writer's copy held acknowledgements up for milliseconds.)
pub(super) struct Checkpointer {
    /// Commits since the last checkpoint; the thread stops when this is dropped.
    pub(super) commits: std::sync::mpsc::Sender<()>,
    /// Set by the checkpointer when the WAL is long and it has just caught up: the
    /// writer's turn to finish the copy, so that its next group starts the WAL over.
    pub(super) finish: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// How often the checkpointer looks for new commits while the WAL is short.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(250);
/// A WAL this long is started over as soon as it can be.
const WAL_LONG_BYTES: i64 = 16 * 1024 * 1024;
/// What a WAL file that grew longer (while a reader held it, say) is cut back to.
pub(super) const WAL_KEEP_BYTES: i64 = 64 * 1024 * 1024;
/// The checkpointer has caught up when its last pass found no more than this many new
/// bytes of frames (a group or two): then what the writer has left to copy takes it no time.
const CAUGHT_UP_BYTES: i64 = 1024 * 1024;

impl SqliteEngine {
    /// Moves checkpoints off this connection onto a thread of their own (PASSIVE: they
    /// never wait for, or hold up, the writer). For the one connection that writes.
    pub fn checkpoint_in_background(&mut self) -> Result<(), EngineError> {
        let reader = open_connection(&self.path)?;
        let page_size: i64 = reader
            .query_row("PRAGMA page_size", [], |row| row.get(0))
            .map_err(error)?;
        self.conn
            .pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(error)?;
        self.conn
            .pragma_update(None, "journal_size_limit", WAL_KEEP_BYTES)
            .map_err(error)?;
        let (commits, committed) = std::sync::mpsc::channel::<()>();
        let finish = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ask_writer = finish.clone();
        let write_back = crate::store::write_back::WriteBack::start(&self.path)
            .inspect_err(|err| {
                tracing::warn!(error = %err, "cannot start writing the store back early; checkpoints flush it all at their end");
            })
            .ok();
        std::thread::Builder::new()
            .name("hookrelay-checkpoint".into())
            .spawn(move || {
                let mut long = false;
                // SQLite counts the WAL in frames of one page each.
                let page = page_size.max(512);
                let (long_frames, caught_up_frames) =
                    (WAL_LONG_BYTES / page, CAUGHT_UP_BYTES / page);
                let mut last_frames = 0;
                loop {
                    match committed.recv() {
                        Ok(()) => {}
                        Err(_) => return,
                    }
                    if !long {
                        std::thread::sleep(CHECKPOINT_EVERY);
                    }
                    while committed.try_recv().is_ok() {}
                    // (busy, frames in the WAL, frames copied back)
                    let checkpoint = || {
                        reader.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
                            Ok((
                                row.get::<_, i64>(0)?,
                                row.get::<_, i64>(1)?,
                                row.get::<_, i64>(2)?,
                            ))
                        })
                    };
                    let copied = match &write_back {
                        Some(write_back) => write_back.copying(checkpoint),
                        None => checkpoint(),
                    };
                    let Ok((busy, frames, copied)) = copied else {
                        continue;
                    };
                    let fresh = frames - last_frames;
                    last_frames = frames;
                    long = frames >= long_frames;
                    if long && busy == 0 && copied == frames && fresh <= caught_up_frames {
                        ask_writer.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            })
            .map_err(|err| EngineError::failed(err.to_string()))?;
        self.checkpointer = Some(Checkpointer { commits, finish });
        Ok(())
    }
}
