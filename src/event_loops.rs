//! Connections served on single-threaded event loops, one per core, as nginx's workers are.
//!
//! On tokio's work-stealing runtime a call wakes tasks across its workers: the connection's
//! task, the upstream connection's task, and a parked worker told to help. Each such wake
//! is a context switch, and on a virtual machine those are a third of the relay's CPU at
//! low load. A connection handed to a loop stays on that loop's thread with everything its
//! requests start, upstream connections included (each loop keeps its own, see
//! [`crate::upstream`]). Nothing a loop runs may wait on the store with its thread: writes
//! go to the writer thread, shared limits are asynchronous queries
//! ([`crate::store::postgres::SharedState`]), and reads go to a blocking thread
//! ([`crate::outbox::Outbox::read_apart`]).

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::Handle;

thread_local! {
    /// Which loop this thread runs, if it runs one.
    static LOOP: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The most event loops `[server] event_loops` may ask for.
pub const MAX: usize = 64;

/// How many event loops serve connections: `[server] event_loops`, else one per core on
/// SQLite and none on a shared store. A PostgreSQL relay's acknowledgements wait on the
/// database's processes, which share the cores: loops measured 0.87–0.89× acknowledgements
/// a second there (1.05× gateway calls), so it keeps tokio's shared workers unless asked.
pub fn count(configured: Option<usize>, shared_store: bool) -> usize {
    configured
        .unwrap_or_else(|| match shared_store {
            true => 0,
            false => std::thread::available_parallelism().map_or(1, |n| n.get()),
        })
        .min(MAX)
}

/// The loop the current thread runs, if any.
pub fn current() -> Option<usize> {
    LOOP.with(Cell::get)
}

/// The running loops; stopped when dropped (after the server's own graceful shutdown).
pub struct EventLoops {
    handles: Vec<Handle>,
    next: AtomicUsize,
    _stop: tokio::sync::watch::Sender<()>,
}

impl EventLoops {
    /// Starts `count` loops, each on a thread of its own.
    pub fn start(count: usize) -> std::io::Result<EventLoops> {
        let (stop, stopped) = tokio::sync::watch::channel(());
        let mut handles = Vec::with_capacity(count);
        for index in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            let mut stopped = stopped.clone();
            std::thread::Builder::new()
                .name(format!("hookrelay-loop-{index}"))
                .spawn(move || {
                    LOOP.with(|current| current.set(Some(index)));
                    runtime.block_on(async move {
                        let _ = stopped.changed().await;
                    });
                })?;
        }
        Ok(EventLoops {
            handles,
            next: AtomicUsize::new(0),
            _stop: stop,
        })
    }

    /// Runs `task` on the next loop in turn.
    pub fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        self.handles[index].spawn(task)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tasks go to the loops in turn, each on its loop's thread, which knows its index;
    /// a task still waiting when the loops are dropped is dropped with them.
    #[test]
    fn tasks_run_on_the_loops_in_turn_and_end_with_them() {
        assert_eq!(current(), None);
        let loops = EventLoops::start(2).unwrap();
        let ran: Vec<(Option<usize>, Option<String>)> =
            (0..4)
                .map(|_| {
                    futures_executor::block_on(loops.spawn(async {
                        (current(), std::thread::current().name().map(str::to_owned))
                    }))
                    .unwrap()
                })
                .collect();
        let expected: Vec<(Option<usize>, Option<String>)> = [0, 1, 0, 1]
            .into_iter()
            .map(|i| (Some(i), Some(format!("hookrelay-loop-{i}"))))
            .collect();
        assert_eq!(ran, expected);

        struct Dropped(std::sync::mpsc::Sender<()>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                let _ = self.0.send(());
            }
        }
        let (dropped, was_dropped) = std::sync::mpsc::channel();
        let dropped = Dropped(dropped);
        let _waiting = loops.spawn(async move {
            let _dropped = dropped;
            std::future::pending::<()>().await
        });
        drop(loops);
        was_dropped
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the waiting task is dropped with its loop");
    }

    #[test]
    fn the_count_is_the_configured_one_or_the_cores() {
        assert_eq!(count(Some(0), false), 0);
        assert_eq!(count(Some(3), false), 3);
        assert_eq!(count(Some(1000), false), MAX);
        assert!(count(None, false) >= 1);
        assert_eq!(
            count(None, true),
            0,
            "a shared store keeps tokio's workers by default"
        );
        assert_eq!(count(Some(2), true), 2, "unless it is asked for loops");
    }
}
