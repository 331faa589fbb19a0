//! Where log lines go: a buffer that a thread of its own writes to standard error.
//!
//! Why not a channel to the writing thread: every line sent to a sleeping receiver wakes
//! it, and at a call or a webhook at a time that was one thread wake-up per line (the
//! logging thread took 12 % of the relay's CPU at one gateway connection). Here a line is
//! appended to a shared buffer; while lines keep coming the thread takes the buffer every
//! [`EVERY`] on its own, and only the first line after it went idle wakes it. A line is
//! never dropped: past [`MOST_WAITING`] bytes, the callers wait for the thread.
//!
//! When the lines go to a file, the thread starts the kernel's write-back of them every
//! [`WRITE_BACK_AFTER`] bytes. Left alone, Linux writes a file's pages once they are 30
//! seconds old, all at once: at full load (3–4 MB of lines a second) a burst of about 100
//! MB every 30 seconds, and the store's flushes on the same disk waited behind it for
//! 190–370 ms, once per half minute, with SQLite and with PostgreSQL alike (see the README's
//! "Durable delivery").

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often the thread looks for lines while they keep coming.
const EVERY: Duration = Duration::from_millis(5);
/// Bytes of lines that may wait before callers wait for the thread.
const MOST_WAITING: usize = 4 * 1024 * 1024;
/// Bytes written to a file between two starts of its write-back: a flush of the store
/// waits behind at most this much of the log.
const WRITE_BACK_AFTER: usize = 256 * 1024;

#[derive(Default)]
struct Waiting {
    bytes: Vec<u8>,
    /// The thread found nothing last time and sleeps until woken.
    idle: bool,
    /// The guard is gone: write what waits and stop.
    done: bool,
}

#[derive(Default)]
struct Shared {
    waiting: Mutex<Waiting>,
    /// Signalled when the thread has taken the waiting lines.
    taken: Condvar,
    /// How many times the thread started the write-back of its file.
    write_backs: AtomicUsize,
}

/// What `tracing_subscriber` writes lines to (one `write` per line).
#[derive(Clone)]
pub struct LogWriter {
    shared: Arc<Shared>,
    thread: std::thread::Thread,
}

/// Writes every waiting line and stops the thread when dropped; keep it until the end.
pub struct LogGuard {
    shared: Arc<Shared>,
    handle: Option<JoinHandle<()>>,
}

/// Starts the thread that writes lines to `out`; `file`: the regular file `out` writes
/// to, if it is one (see [`regular_file`]), whose write-back the thread starts as it goes.
pub fn start(
    out: impl Write + Send + 'static,
    file: Option<File>,
) -> std::io::Result<(LogWriter, LogGuard)> {
    let shared = Arc::new(Shared::default());
    let handle = std::thread::Builder::new()
        .name("hookrelay-log".into())
        .spawn({
            let shared = shared.clone();
            move || write_out(&shared, out, file)
        })?;
    let writer = LogWriter {
        shared: shared.clone(),
        thread: handle.thread().clone(),
    };
    Ok((
        writer,
        LogGuard {
            shared,
            handle: Some(handle),
        },
    ))
}

/// The regular file behind `descriptor` (standard error redirected to a file), or `None`
/// (a terminal, a pipe, journald's socket: nothing piles up in the page cache there).
pub fn regular_file(descriptor: std::os::fd::BorrowedFd<'_>) -> Option<File> {
    let file = File::from(descriptor.try_clone_to_owned().ok()?);
    let regular = file.metadata().ok()?.file_type().is_file();
    regular.then_some(file)
}

fn write_out(shared: &Shared, mut out: impl Write, file: Option<File>) {
    let mut taken = Vec::new();
    let mut unsent = 0;
    loop {
        let done = {
            let mut waiting = shared.waiting.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::swap(&mut waiting.bytes, &mut taken);
            waiting.idle = taken.is_empty() && !waiting.done;
            waiting.done
        };
        shared.taken.notify_all();
        if !taken.is_empty() {
            // Nothing to do about a log that cannot be written; the relay goes on.
            let _ = out.write_all(&taken).and_then(|()| out.flush());
            unsent += taken.len();
            if let Some(file) = &file
                && unsent >= WRITE_BACK_AFTER
            {
                // Refused only where write-back cannot apply; the lines are written anyway.
                let _ = crate::dirty_pages::start_writing(file);
                shared.write_backs.fetch_add(1, Ordering::Relaxed);
                unsent = 0;
            }
            taken.clear();
            if done {
                continue;
            }
            std::thread::park_timeout(EVERY);
        } else if done {
            return;
        } else {
            std::thread::park();
        }
    }
}

impl Write for LogWriter {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let mut waiting = self
            .shared
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        while waiting.bytes.len() >= MOST_WAITING && !waiting.done {
            self.thread.unpark();
            waiting = self
                .shared
                .taken
                .wait(waiting)
                .unwrap_or_else(|e| e.into_inner());
        }
        waiting.bytes.extend_from_slice(line);
        if std::mem::take(&mut waiting.idle) {
            self.thread.unpark();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> LogWriter {
        self.clone()
    }
}

impl LogGuard {
    /// How many times the thread has started its file's write-back.
    #[cfg(test)]
    fn write_backs(&self) -> usize {
        self.shared.write_backs.load(Ordering::Relaxed)
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.shared
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .done = true;
        if let Some(handle) = self.handle.take() {
            handle.thread().unpark();
            let _ = handle.join();
        }
    }
}

/// A sink a test can read while a writer writes to it (here and in `terminal`'s tests).
#[cfg(test)]
#[derive(Clone, Default)]
pub(crate) struct MemorySink(pub(crate) Arc<Mutex<Vec<u8>>>);

#[cfg(test)]
impl Write for MemorySink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use MemorySink as Sink;

    #[test]
    fn every_line_is_written_in_order_and_the_guard_writes_the_rest() {
        let sink = Sink::default();
        let (writer, guard) = start(sink.clone(), None).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let mut writer = writer.clone();
                std::thread::spawn(move || {
                    for i in 0..2_000 {
                        writer
                            .write_all(format!("thread {t} line {i}\n").as_bytes())
                            .unwrap();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        drop(guard);
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 8_000);
        for t in 0..4 {
            let mine: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with(&format!("thread {t} ")))
                .collect();
            let expected: Vec<String> =
                (0..2_000).map(|i| format!("thread {t} line {i}")).collect();
            assert_eq!(mine, expected, "thread {t}'s lines whole and in order");
        }
    }

    #[test]
    fn a_line_after_a_quiet_spell_is_written_without_more_lines() {
        let sink = Sink::default();
        let (mut writer, _guard) = start(sink.clone(), None).unwrap();
        writer.write_all(b"first\n").unwrap();
        // The thread goes idle once the first line is out; the next one must wake it.
        for _ in 0..1000 {
            if !sink.0.lock().unwrap().is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(50));
        writer.write_all(b"second\n").unwrap();
        for _ in 0..1000 {
            if sink.0.lock().unwrap().ends_with(b"second\n") {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("the line after the quiet spell was never written");
    }

    #[test]
    fn callers_wait_rather_than_lose_lines_when_the_thread_falls_behind() {
        /// A sink that takes a while per write.
        struct Slow(Sink);
        impl Write for Slow {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                std::thread::sleep(Duration::from_millis(20));
                self.0.write(bytes)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let (mut writer, guard) = start(Slow(sink.clone()), None).unwrap();
        let line = vec![b'x'; 64 * 1024];
        let lines = 3 * MOST_WAITING / line.len();
        for _ in 0..lines {
            writer.write_all(&line).unwrap();
            writer.write_all(b"\n").unwrap();
        }
        drop(guard);
        assert_eq!(sink.0.lock().unwrap().len(), lines * (line.len() + 1));
    }

    #[test]
    fn lines_written_to_a_file_are_sent_to_disk_as_they_come() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.log");
        let out = File::create(&path).unwrap();
        let file = regular_file(std::os::fd::AsFd::as_fd(&out)).expect("a regular file");
        let (mut writer, guard) = start(out, Some(file)).unwrap();
        let line = [b"x".repeat(1023), b"\n".to_vec()].concat();
        let lines = 3 * WRITE_BACK_AFTER / line.len();
        for i in 0..lines {
            writer.write_all(&line).unwrap();
            // Paced, as a relay's lines come, so the thread takes them in several writes.
            if i % 64 == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        for _ in 0..1000 {
            if std::fs::metadata(&path).unwrap().len() == (lines * line.len()) as u64 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(guard.write_backs() >= 1, "write-back was never started");
        drop(guard);
        assert_eq!(std::fs::read(&path).unwrap().len(), lines * line.len());
    }

    #[test]
    fn only_a_regular_file_gets_its_write_back_started() {
        let (reader, writer) = std::io::pipe().unwrap();
        assert!(regular_file(std::os::fd::AsFd::as_fd(&writer)).is_none());
        assert!(regular_file(std::os::fd::AsFd::as_fd(&reader)).is_none());
        let dir = tempfile::tempdir().unwrap();
        let file = File::create(dir.path().join("log")).unwrap();
        assert!(regular_file(std::os::fd::AsFd::as_fd(&file)).is_some());
    }
}
