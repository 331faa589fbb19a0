//! Open connections, bounded: no anonymous client can take every descriptor.
//!
//! At most `max_connections` are open. When one more arrives at the cap, the oldest
//! connection that has not yet sent a complete request is closed to make room (an
//! attacker's idle sockets go first); failing that, the oldest one that sits idle between
//! requests; failing that — every connection is busy with a request — the new one is
//! closed. So a signed webhook is answered even while someone holds sockets open.
//! A closed connection counts until its socket is really gone, and the accept loop waits
//! for that, so descriptors never exceed the cap by more than the one just accepted.
//! The default cap leaves descriptors for the store, reloads and upstream calls.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Descriptors kept back from the open-file limit for everything but client connections.
pub const RESERVED_DESCRIPTORS: u64 = 128;

/// The cap derived from the open-file limit.
pub fn default_max_connections(open_file_limit: u64) -> usize {
    open_file_limit.saturating_sub(RESERVED_DESCRIPTORS).max(16) as usize
}

/// What the accept loop knows of each open connection.
struct Open {
    /// Set once a request's headers have arrived.
    requested: Arc<AtomicBool>,
    /// Set while a request is being handled.
    busy: Arc<AtomicBool>,
    /// Set once the connection's task is spawned.
    close: Option<tokio::task::AbortHandle>,
    /// Told to close to make room; still counted until its task has dropped the socket.
    closing: bool,
}

/// Every open connection, oldest first.
pub struct Connections {
    max: usize,
    next: Mutex<(u64, BTreeMap<u64, Open>)>,
    /// Signalled whenever a connection is gone.
    freed: tokio::sync::Notify,
}

/// One connection's handle: mark requests on it; dropping it forgets the connection.
pub struct ConnectionGuard {
    pub id: u64,
    table: Arc<Connections>,
    pub requested: Arc<AtomicBool>,
    pub busy: Arc<AtomicBool>,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.table.lock().1.remove(&self.id);
        self.table.freed.notify_one();
    }
}

/// What to do with a newly accepted connection.
pub enum Admission {
    /// Serve it; spawn its task, then hand its abort handle to [`Connections::register`].
    Serve(ConnectionGuard),
    /// An idle connection is closing to make room: wait ([`Connections::freed`]), then ask
    /// again.
    Wait,
    /// Every connection is busy with a request: close this one.
    Refuse,
}

impl Connections {
    pub fn new(max: usize) -> Arc<Connections> {
        Arc::new(Connections {
            max: max.max(1),
            next: Mutex::new((0, BTreeMap::new())),
            freed: tokio::sync::Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, BTreeMap<u64, Open>)> {
        self.next
            .lock()
            .expect("the connection table is never poisoned")
    }

    pub fn open(&self) -> usize {
        self.lock().1.len()
    }

    /// Makes room for one more connection: at the cap, closes the oldest idle one and says
    /// to wait until it is gone. Returns whether one was closed for this.
    pub fn admit(self: &Arc<Self>) -> (Admission, bool) {
        let mut table = self.lock();
        if table.1.len() >= self.max {
            if table.1.values().any(|c| c.closing) {
                return (Admission::Wait, false);
            }
            // Never sent a request first, then idle between requests.
            let silent = |c: &Open| c.close.is_some() && !c.requested.load(Ordering::SeqCst);
            let idle = |c: &Open| c.close.is_some() && !c.busy.load(Ordering::SeqCst);
            let victim = table
                .1
                .iter()
                .find(|(_, c)| silent(c))
                .or_else(|| table.1.iter().find(|(_, c)| idle(c)))
                .map(|(id, _)| *id);
            return match victim.and_then(|id| table.1.get_mut(&id)) {
                Some(victim) => {
                    victim.closing = true;
                    if let Some(close) = &victim.close {
                        close.abort();
                    }
                    (Admission::Wait, true)
                }
                None => (Admission::Refuse, false),
            };
        }
        table.0 += 1;
        let id = table.0;
        let requested = Arc::new(AtomicBool::new(false));
        let busy = Arc::new(AtomicBool::new(false));
        table.1.insert(
            id,
            Open {
                requested: requested.clone(),
                busy: busy.clone(),
                close: None,
                closing: false,
            },
        );
        (
            Admission::Serve(ConnectionGuard {
                id,
                table: self.clone(),
                requested,
                busy,
            }),
            false,
        )
    }

    /// Completes when a connection has gone (or at once if one went since the last call).
    pub async fn freed(&self) {
        self.freed.notified().await
    }

    /// Records the task serving connection `id`, so it can be closed to make room (a task
    /// that has already ended has removed its entry, and nothing is recorded).
    pub fn register(&self, id: u64, close: tokio::task::AbortHandle) {
        if let Some(open) = self.lock().1.get_mut(&id) {
            open.close = Some(close);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn at_the_cap_the_oldest_silent_connection_makes_room() {
        let table = Connections::new(2);
        let park = || tokio::spawn(std::future::pending::<()>());
        let (Admission::Serve(first), false) = table.admit() else {
            panic!()
        };
        let first_task = park();
        table.register(first.id, first_task.abort_handle());
        let (Admission::Serve(second), false) = table.admit() else {
            panic!()
        };
        let second_task = park();
        table.register(second.id, second_task.abort_handle());
        // The second has sent a request; the first never did: it is closed, and the new
        // one waits until it is gone.
        second.requested.store(true, Ordering::SeqCst);
        assert!(matches!(table.admit(), (Admission::Wait, true)));
        assert!(
            matches!(table.admit(), (Admission::Wait, false)),
            "one at a time"
        );
        assert!(first_task.await.unwrap_err().is_cancelled());
        drop(first);
        table.freed().await;
        let (Admission::Serve(third), false) = table.admit() else {
            panic!()
        };
        let third_task = park();
        table.register(third.id, third_task.abort_handle());
        // Both open ones are now busy with requests: a new one is refused.
        second.busy.store(true, Ordering::SeqCst);
        third.requested.store(true, Ordering::SeqCst);
        third.busy.store(true, Ordering::SeqCst);
        assert!(matches!(table.admit(), (Admission::Refuse, false)));
        assert_eq!(table.open(), 2);
        drop(second);
        assert_eq!(table.open(), 1);
    }
}
