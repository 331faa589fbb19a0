//! Where log lines go: a buffer that a thread of its own writes to standard error.
//!
//! Why not a channel to the writing thread: every line sent to a sleeping receiver wakes
//! it, and at a call or a webhook at a time that was one thread wake-up per line (the
//! logging thread took 12 % of the relay's CPU at one gateway connection). Here a line is
//! appended to a shared buffer; while lines keep coming the thread takes the buffer every
//! [`EVERY`] on its own, and only the first line after it went idle wakes it.
//!
//! What must never happen: a request waiting for the log. Standard error can stop taking
//! lines altogether (a pipe whose reader is stuck, a log collector that stalls); when it
//! did, callers used to wait for the thread once [`MOST_WAITING`] bytes were waiting, and
//! the relay stopped answering everything, `/readyz` included, while webhooks went
//! unacknowledged. Past that bound a line is now dropped and counted instead: the thread
//! says how many once standard error takes lines again, and `/metrics` counts them
//! ([`lines_dropped`]). On the way out, [`LogGuard`] waits at most [`LAST_WAIT`] for the
//! last lines, so a stalled pipe cannot keep the process from exiting either.
//!
//! When the lines go to a file, the thread starts the kernel's write-back of them every
//! [`WRITE_BACK_AFTER`] bytes. Left alone, Linux writes a file's pages once they are 30
//! seconds old, all at once: at full load (3–4 MB of lines a second) a burst of about 100
//! MB every 30 seconds, and the store's flushes on the same disk waited behind it for
//! 190–370 ms, once per half minute, with SQLite and with PostgreSQL alike (see the README's
//! "Durable delivery").

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often the thread looks for lines while they keep coming.
const EVERY: Duration = Duration::from_millis(5);
/// Bytes of lines that may wait for the thread; a line beyond them is dropped and counted.
/// About a second of lines at full load: a terminal or collector slower than that for a
/// moment loses none.
const MOST_WAITING: usize = 4 * 1024 * 1024;
/// How long the guard waits, on the way out, for the thread to write the last lines.
const LAST_WAIT: Duration = Duration::from_secs(3);
/// Bytes written to a file between two starts of its write-back: a flush of the store
/// waits behind at most this much of the log.
const WRITE_BACK_AFTER: usize = 256 * 1024;

/// Lines dropped since the process started, by every writer: what `/metrics` reports.
static LINES_DROPPED: AtomicU64 = AtomicU64::new(0);

/// Log lines dropped so far: standard error took none for too long, or refused them (a
/// full disk, a closed pipe).
pub fn lines_dropped() -> u64 {
    LINES_DROPPED.load(Ordering::Relaxed)
}

#[derive(Default)]
struct Waiting {
    bytes: Vec<u8>,
    /// The thread found nothing last time and sleeps until woken.
    idle: bool,
    /// The guard is gone: write what waits and stop.
    done: bool,
    /// The thread has stopped: nothing will be written any more.
    stopped: bool,
    /// Lines dropped since the thread last said how many.
    dropped: u64,
}

#[derive(Default)]
struct Shared {
    waiting: Mutex<Waiting>,
    /// Signalled when the thread has stopped.
    stopped: Condvar,
    /// How many times the thread started the write-back of its file.
    write_backs: AtomicUsize,
    /// Lines this writer dropped, in all (the process's count is [`LINES_DROPPED`]).
    dropped: AtomicU64,
}

impl Shared {
    fn count_dropped(&self, lines: u64) {
        self.dropped.fetch_add(lines, Ordering::Relaxed);
        LINES_DROPPED.fetch_add(lines, Ordering::Relaxed);
    }
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
        let (done, dropped) = {
            let mut waiting = shared.waiting.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::swap(&mut waiting.bytes, &mut taken);
            waiting.idle = taken.is_empty() && !waiting.done;
            (waiting.done, std::mem::take(&mut waiting.dropped))
        };
        if dropped > 0 {
            // Written by this thread like any other line, after the ones taken here: the
            // first lines standard error took again.
            tracing::warn!(
                dropped_lines = dropped,
                "log lines dropped: standard error took no lines for a while (a stalled pipe or log collector?); hookrelay_log_lines_dropped_total counts them"
            );
        }
        if !taken.is_empty() {
            // Nothing to do about a log that cannot be written (a full disk, a collector
            // that closed its end of the pipe) but count what was lost; the relay goes on.
            if out.write_all(&taken).and_then(|()| out.flush()).is_err() {
                let lines = taken.iter().filter(|&&b| b == b'\n').count() as u64;
                shared.count_dropped(lines.max(1));
            }
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
            // After a burst, give back what a full buffer grew to.
            taken.shrink_to(WRITE_BACK_AFTER);
            if done {
                continue;
            }
            std::thread::park_timeout(EVERY);
        } else if done && dropped == 0 {
            shared
                .waiting
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .stopped = true;
            shared.stopped.notify_all();
            return;
        } else if !done {
            std::thread::park();
        }
    }
}

impl Write for LogWriter {
    /// Takes `line` whole, or drops it when [`MOST_WAITING`] bytes already wait: never
    /// waits for the thread.
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let mut waiting = self
            .shared
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if waiting.bytes.len() + line.len() > MOST_WAITING && !waiting.bytes.is_empty() {
            waiting.dropped += 1;
            self.shared.count_dropped(1);
            return Ok(line.len());
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
    /// Lets the thread write what waits, for at most [`LAST_WAIT`]: a standard error that
    /// takes nothing must not keep the process from exiting.
    fn drop(&mut self) {
        let Some(handle) = self.handle.take() else {
            return;
        };
        let mut waiting = self
            .shared
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        waiting.done = true;
        handle.thread().unpark();
        let (waiting, _) = self
            .shared
            .stopped
            .wait_timeout_while(waiting, LAST_WAIT, |w| !w.stopped)
            .unwrap_or_else(|e| e.into_inner());
        if waiting.stopped {
            drop(waiting);
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

    /// A sink whose writes wait until it is opened: standard error that takes nothing.
    #[derive(Clone, Default)]
    struct Stalled {
        sink: Sink,
        open: Arc<(Mutex<bool>, Condvar)>,
    }

    impl Stalled {
        fn open(&self) {
            *self.open.0.lock().unwrap() = true;
            self.open.1.notify_all();
        }
    }

    impl Write for Stalled {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            let (open, opened) = &*self.open;
            let _open = opened
                .wait_while(open.lock().unwrap(), |open| !*open)
                .unwrap();
            self.sink.write(bytes)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Runs `work` on a thread of its own and says whether it finished within `limit`
    /// (a test that would otherwise hang fails instead).
    fn finishes_within(limit: Duration, work: impl FnOnce() + Send + 'static) -> bool {
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            work();
            let _ = done.send(());
        });
        finished.recv_timeout(limit).is_ok()
    }

    #[test]
    fn a_stalled_output_drops_and_counts_lines_instead_of_holding_up_callers() {
        let stalled = Stalled::default();
        let (writer, guard) = start(stalled.clone(), None).unwrap();
        let line = [vec![b'x'; 64 * 1024 - 1], b"\n".to_vec()].concat();
        let lines = 3 * MOST_WAITING / line.len();
        let wrote = finishes_within(Duration::from_secs(20), {
            let mut writer = writer.clone();
            let line = line.clone();
            move || {
                for _ in 0..lines {
                    writer.write_all(&line).unwrap();
                }
            }
        });
        assert!(wrote, "a caller waited for an output that takes nothing");
        // All this writer dropped (the thread may have taken the count since its last
        // report already, to report it).
        let dropped = guard.shared.dropped.load(Ordering::Relaxed) as usize;
        assert!(
            lines_dropped() >= dropped as u64,
            "the process counts them too"
        );
        // What the thread took before the output stalled, and a full buffer, are kept.
        let most_kept = 2 * MOST_WAITING / line.len();
        assert!(
            dropped >= lines - most_kept,
            "{dropped} of {lines} lines dropped: every line beyond the buffer should be"
        );
        stalled.open();
        drop(guard);
        assert_eq!(
            stalled.sink.0.lock().unwrap().len(),
            (lines - dropped) * line.len(),
            "the lines kept are written once the output takes them again"
        );
    }

    #[test]
    fn lines_standard_error_refuses_are_counted_as_dropped() {
        struct Refusing;
        impl Write for Refusing {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let (mut writer, guard) = start(Refusing, None).unwrap();
        writer.write_all(b"one\ntwo\n").unwrap();
        writer.write_all(b"three\n").unwrap();
        let shared = guard.shared.clone();
        drop(guard);
        assert_eq!(
            shared.dropped.load(Ordering::Relaxed),
            3,
            "three lines refused"
        );
    }

    #[test]
    fn the_guard_gives_up_on_an_output_that_takes_nothing() {
        let stalled = Stalled::default();
        let (mut writer, guard) = start(stalled.clone(), None).unwrap();
        writer.write_all(b"never written\n").unwrap();
        assert!(
            finishes_within(LAST_WAIT + Duration::from_secs(10), move || drop(guard)),
            "dropping the guard waited for an output that takes nothing"
        );
        assert!(stalled.sink.0.lock().unwrap().is_empty());
        stalled.open();
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
