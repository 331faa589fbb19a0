//! Starts writing the SQLite database file's dirty pages to disk while a checkpoint copies
//! them in, so the flush that ends the checkpoint has little left to write.
//!
//! Why: Linux keeps written pages in memory until a tenth of memory is dirty, so at full
//! load each checkpoint's closing flush wrote 20–30 MB at once, and a group commit whose
//! flush came meanwhile waited behind it (13–17 ms, `strace -T` on both threads' `fsync`):
//! the relay's p99. Writing back as the pages arrive took p99 at 64 connections from 14.4
//! to 8.9 ms at the same throughput and CPU (`benches/ab.sh`; README, "Durable
//! delivery"). Starting write-back never waits for the disk and changes nothing SQLite
//! relies on: the kernel may write any dirty page at any time ([`crate::dirty_pages`]).

use crate::dirty_pages::start_writing;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How often write-back is started while a checkpoint copies: small enough that a
/// group commit's flush waits behind at most a few megabytes.
const EVERY: Duration = Duration::from_millis(2);

/// A thread that starts the write-back of one file every [`EVERY`] while
/// [`WriteBack::copying`] lasts.
pub struct WriteBack {
    busy: Arc<AtomicBool>,
    /// Set when this is dropped: the thread ends (the descriptor stays open, see `start`).
    done: Arc<AtomicBool>,
    thread: std::thread::Thread,
}

impl WriteBack {
    /// Starts the thread for the database file at `path`.
    ///
    /// Its descriptor stays open for the life of the process, on purpose: closing any
    /// descriptor of a file drops every POSIX lock the process holds on it, SQLite's
    /// included, which would let another process (`hookrelay deliveries`) act as if this
    /// relay had let go of the database.
    pub fn start(path: &Path) -> std::io::Result<WriteBack> {
        let file: &'static File = Box::leak(Box::new(File::open(path)?));
        let busy = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicBool::new(false));
        let (watching, ending) = (busy.clone(), done.clone());
        let thread = std::thread::Builder::new()
            .name("hookrelay-writeback".into())
            .spawn(move || {
                let mut failed = false;
                while !ending.load(Ordering::Acquire) {
                    std::thread::park();
                    while watching.load(Ordering::Acquire) {
                        if let Err(error) = start_writing(file)
                            && !failed
                        {
                            failed = true;
                            tracing::warn!(
                                %error,
                                "cannot start writing the store back early; checkpoints flush it all at their end"
                            );
                        }
                        std::thread::sleep(EVERY);
                    }
                }
            })?
            .thread()
            .clone();
        Ok(WriteBack { busy, done, thread })
    }

    /// Runs `copy` (a checkpoint) with write-back started every few milliseconds.
    pub fn copying<T>(&self, copy: impl FnOnce() -> T) -> T {
        self.busy.store(true, Ordering::Release);
        self.thread.unpark();
        let result = copy();
        self.busy.store(false, Ordering::Release);
        result
    }
}

impl Drop for WriteBack {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Release);
        self.thread.unpark();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_runs_and_returns_with_the_write_back_thread_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        std::fs::write(&path, vec![7u8; 1 << 20]).unwrap();
        let write_back = WriteBack::start(&path).unwrap();
        // The copy runs, and its result comes back, with the thread working beside it.
        let copied = write_back.copying(|| {
            std::thread::sleep(EVERY * 3);
            42
        });
        assert_eq!(copied, 42);
    }
}
