//! The storage seam: what the outbox keeps, and the one interface its engines implement.
//!
//! The outbox's logic (group commit, claims, leases, retries from memory, coalescing,
//! retention) lives in `crate::outbox` and talks to a database only through [`Engine`].
//! Each engine keeps its own SQL in its own file; SQLite ([`sqlite`]) is the embedded
//! default. Every engine keeps the queue in the same shape: one row per
//! upstream+project+ref (its *key*) naming the key's head — its oldest unfinished trigger —
//! and when that head is due, or that it is leased for sending. A claim reads only keys
//! with due work, so its cost does not grow with the triggers waiting behind a held head,
//! and nothing the relay runs periodically reads the whole backlog.
//!
//! This module never logs and never sees a token: triggers carry token references only.
//!
//! Here: the [`Engine`] trait and its error. Beside it, what crosses the seam:
//! [`work`] (what is queued and claimed), [`outcome`] (what came of it), [`body`]
//! (bodies as stored), [`listing`] (what the operators' reads ask and get), [`operator`]
//! (replay and cancel), [`location`] (which store).

mod body;
mod listing;
mod location;
pub mod lock;
mod operator;
mod outcome;
pub mod postgres;
pub mod private;
#[cfg(test)]
pub mod semantics;
pub mod sqlite;
mod text;
mod work;
pub mod write_back;

use std::time::{SystemTime, UNIX_EPOCH};

pub use body::{StoredBody, StoredWebhook};
pub use listing::{DeliveryKind, DeliveryRow, ListFilter, SqlValue, StateFilter};
pub use location::{STORE_URL_ENV, StoreLocation};
pub use operator::{
    CANCELLED_NOTE, CancelTarget, ReplayTarget, SUPERSEDED_NOTE, cancel_refusal, nothing_to_replay,
    replay_from, replay_refusal,
};
pub use outcome::{Finished, ORIGIN_COLUMNS, OriginOf, PipelineOrigin, Recorded, UpstreamHold};
pub use text::bounded_key;
pub use work::{Accepted, Claimed, DueTrigger, Lease, NewDelivery, NewTrigger, WorkKind};

/// Token references of gateway calls start with this: the caller's token is not stored.
pub const CALLER_TOKEN: &str = "caller token ";

/// Runs a blocking store call from async code without stalling the runtime's other tasks
/// (and without the PostgreSQL client's own runtime nesting inside tokio's). A
/// current-thread runtime (an event loop) cannot lend its thread, so there the call runs on
/// a thread of its own while the loop waits: requests on a loop read the store with
/// [`crate::outbox::Outbox::read_apart`] instead, and this is only the safety net.
pub fn blocking<T: Send>(call: impl FnOnce() -> T + Send) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(call)
        }
        Ok(_) => std::thread::scope(|scope| {
            scope
                .spawn(call)
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        }),
        Err(_) => call(),
    }
}

/// A store whose schema is at `version`, past the `known` versions of this relay: a newer
/// relay migrated it. This one runs on it (and warns) only when that one wrote that
/// relays knowing `known` versions may (`floor`); otherwise it refuses to start, saying
/// what to do, rather than write tables whose meaning it does not know.
fn newer_schema(version: i64, floor: Option<i64>, known: usize) -> Result<(), EngineError> {
    match floor {
        Some(floor) if floor <= known as i64 => {
            // Said once, not by each connection the process opens.
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                tracing::warn!(
                    schema = version,
                    known,
                    "the store was migrated by a newer hookrelay, which lets this version run beside it; upgrade this relay too"
                )
            });
            Ok(())
        }
        _ => Err(EngineError::refused(format!(
            "the store was migrated by a newer hookrelay (schema {version}; this hookrelay knows \
             schemas up to {known}{}): run that newer hookrelay, or restore the store from a \
             backup taken before the upgrade",
            floor
                .map(|floor| format!(", and the store takes relays of schema {floor} or later"))
                .unwrap_or_default()
        ))),
    }
}

/// Milliseconds since 1970, the store's clock.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The outbox's depth, read without walking the backlog.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Depth {
    /// Triggers waiting or being sent.
    pub open: i64,
    /// When the earliest-due waiting key fell (or falls) due.
    pub earliest_due: Option<i64>,
}

/// Why an engine could not do something.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct EngineError {
    pub message: String,
    /// The store cannot be written right now (disk full, I/O error, busy, gone): the same
    /// request may succeed later, so outcomes of sends are kept and tried again.
    pub transient: bool,
    /// Not a failure: the store refuses this request (`replay` of an unknown id, say).
    pub refused: bool,
}

impl EngineError {
    /// A refusal that trying again will not change (`replay` of an unknown id, say).
    pub fn refused(message: impl Into<String>) -> EngineError {
        EngineError {
            message: message.into(),
            transient: false,
            refused: true,
        }
    }

    /// A failure that trying again will not mend.
    pub fn failed(message: impl Into<String>) -> EngineError {
        EngineError {
            message: message.into(),
            transient: false,
            refused: false,
        }
    }
}

/// Where a pruning pass goes on from: the last delivery it looked at, as
/// (`received_at`, row id).
pub type PruneCursor = (i64, i64);

/// What one step of a pruning pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    pub deleted: usize,
    /// Where the next step starts; `None` once the pass has looked at everything.
    pub next: Option<PruneCursor>,
}

impl Pruned {
    /// A step that looked at `looked` (received_at, row id, still to be sent), oldest
    /// first, and deleted `deleted` of them: the pass goes on after the last one unless
    /// the step found fewer than `batch`.
    pub fn step(deleted: usize, looked: &[(i64, i64, bool)], batch: usize) -> Pruned {
        Pruned {
            deleted,
            next: (looked.len() == batch)
                .then(|| looked.last().map(|(at, id, _)| (*at, *id)))
                .flatten(),
        }
    }
}

/// One database behind the outbox. The outbox's writer owns one engine and calls it from
/// one thread: [`Engine::begin`], any number of operations each inside its own savepoint,
/// then [`Engine::commit`]. Reads for metrics and commands use a second engine of their own.
pub trait Engine: Send + 'static {
    /// Where the data lives, for messages: a path, or a URL without its password.
    fn describe(&self) -> String;

    /// Starts a group's transaction; `durable`: its commit must reach stable storage.
    fn begin(&mut self, durable: bool) -> Result<(), EngineError>;
    fn commit(&mut self) -> Result<(), EngineError>;
    /// Undoes the open transaction, if any.
    fn rollback(&mut self);
    /// Starts one request's savepoint inside the group's transaction.
    fn savepoint(&mut self) -> Result<(), EngineError>;
    /// Ends the request's savepoint: kept, or rolled back when the request failed.
    fn release(&mut self, keep: bool);

    /// Whether claims may share a group's transaction with its writes (after them): for a
    /// store only this process writes, where a claim never waits on anyone. A shared
    /// store's claims go apart, so that no relay holds a key while it waits (see
    /// `Writer::group`).
    fn claims_share_commits(&self) -> bool {
        false
    }

    /// Before a read on the reader's connection, outside any transaction: connects again
    /// if the connection was lost (a database restarted), and on a shared store follows a
    /// failover (see `PostgresEngine::follow_a_failover`). Every read then works after
    /// an outage, not only those that happened to check.
    fn ready_to_read(&mut self) -> Result<(), EngineError> {
        Ok(())
    }

    /// How long a claim holds its key when other processes claim from the store too
    /// (`None`: only this one does, and no lease runs out while it lives).
    fn lease(&self) -> Option<std::time::Duration> {
        None
    }

    /// Whether the next claims may take over keys whose lease ran out (their holder died,
    /// froze or was cut off). A relay back from losing the store says no for a while: a
    /// holder back with it may have a send's outcome to write first (see
    /// `Writer::may_take_over`). Only a store other processes claim from has such keys.
    fn let_claims_take_over(&mut self, _allowed: bool) {}

    /// The store's clock minus this process's, as last seen (milliseconds): the database's
    /// clock decides for a shared store.
    fn clock_skew(&self) -> i64 {
        0
    }

    /// Records several deliveries at once, each with its own answer, in a few statements
    /// whatever their number; `None`: this engine (or this batch) goes one by one through
    /// [`Engine::insert_delivery`]. Called first in the group's transaction; on `Err` the
    /// caller rolls the transaction back and goes one by one in a new one.
    /// `someone_waits`: a caller waits for this commit (webhooks to acknowledge), not
    /// records nobody waits for (gateway calls), which may take longer to give the cores
    /// to those who wait.
    fn insert_deliveries(
        &mut self,
        _deliveries: &[&NewDelivery],
        _now: i64,
        _someone_waits: bool,
    ) -> Option<Result<Vec<Accepted>, EngineError>> {
        None
    }

    /// Records a delivery and its triggers, unless the source already delivered that id.
    fn insert_delivery(
        &mut self,
        delivery: &NewDelivery,
        now: i64,
    ) -> Result<Accepted, EngineError>;
    /// Leases up to `limit` due key heads, earliest due first.
    fn claim(&mut self, now: i64, limit: usize) -> Result<Claimed, EngineError>;
    /// Records an attempt's outcome under its lease; `Ok(false)` when the lease is stale.
    fn record(&mut self, lease: Lease, recorded: &Recorded, now: i64) -> Result<bool, EngineError>;
    /// Makes up to `limit` keys whose waiting head is a trigger for `hold.upstream`, due
    /// before the hold ends, due after it instead (no attempt counted), earliest due
    /// first; returns how many. Fewer than `limit`: none is left. Keys being sent are left
    /// alone, and on a shared store so is any row another relay holds: this waits on
    /// nobody, and what it skips is deferred when it is claimed.
    fn hold_upstream(
        &mut self,
        hold: &UpstreamHold,
        limit: usize,
        now: i64,
    ) -> Result<usize, EngineError>;
    /// Queues a finished trigger, or every first trigger of a delivery, again as new rows.
    fn replay(&mut self, target: &ReplayTarget, now: i64) -> Result<Vec<i64>, EngineError>;
    /// One step of a pruning pass: looks at the next `batch` deliveries received before
    /// `before` (oldest first, after `after`) and deletes those whose triggers are all
    /// finished. A step reads `batch` deliveries whatever waits in front of them, so a
    /// backlog older than the retention costs each step nothing extra.
    fn prune(
        &mut self,
        before: i64,
        batch: usize,
        after: Option<PruneCursor>,
    ) -> Result<Pruned, EngineError>;
    /// A small write that proves the store takes writes again.
    fn probe(&mut self, now: i64) -> Result<(), EngineError>;
    /// The latest time on the store's clock that a writer noted (see `outbox::clock`),
    /// read inside a transaction; on a shared store it also takes the lock under which
    /// deadlines are moved, so that relays seeing one step move them once between them.
    fn clock_noted(&mut self) -> Result<Option<i64>, EngineError>;
    /// Notes `now` as seen on the store's clock (never lowering what is noted), with the
    /// open transaction.
    fn note_clock(&mut self, now: i64) -> Result<(), EngineError>;
    /// The store's clock went back `by` milliseconds: every deadline still waiting (due
    /// times of waiting triggers and keys; on a shared store, limits and pauses) moves
    /// `by` earlier, so each keeps the time it had left, and `now` becomes the time noted.
    /// Leases are left as they are: a relay sending under one finishes it, and a dead
    /// relay's work is taken over at most `by` later.
    fn move_deadlines_back(&mut self, by: i64, now: i64) -> Result<(), EngineError>;
    /// At start: heads leased by a process that is gone are due again (at-least-once).
    fn recover_leases(&mut self) -> Result<usize, EngineError>;

    fn depth(&mut self) -> Result<Depth, EngineError>;
    fn list(&mut self, filter: &ListFilter) -> Result<Vec<DeliveryRow>, EngineError>;
    /// Stops waiting triggers (inside a transaction): each is marked cancelled and its key
    /// moves on; returns their ids. A trigger being sent cannot be stopped.
    fn cancel(&mut self, target: &CancelTarget, now: i64) -> Result<Vec<i64>, EngineError>;
    /// The newest stored webhook with this delivery id, from any source.
    fn stored_webhook(&mut self, delivery_id: &str) -> Result<Option<StoredWebhook>, EngineError>;
    /// The stored webhook `source` sent as `delivery_id` (two sources may each send an id,
    /// a generic sender's counter): one seek on the unique index.
    fn stored_webhook_from(
        &mut self,
        source: &str,
        delivery_id: &str,
    ) -> Result<Option<StoredWebhook>, EngineError>;
    /// Whether `source` sent `delivery_id` before: one seek on the unique index.
    fn is_stored(&mut self, source: &str, delivery_id: &str) -> Result<bool, EngineError>;

    /// Queues work (status posts, polls) under a delivery already recorded, as a
    /// delivery's triggers are queued; returns the new ids.
    fn queue_work(
        &mut self,
        delivery_row: i64,
        work: &[NewTrigger],
        now: i64,
    ) -> Result<Vec<i64>, EngineError>;
    /// The trigger that started a pipeline, as its statuses need it.
    fn pipeline_origin(&mut self, of: &OriginOf) -> Result<Option<PipelineOrigin>, EngineError>;
    /// The newest status post of an order key for one pipeline (its stored post, as JSON),
    /// cancelled ones aside. A shared store makes the caller wait here for another relay
    /// deciding the same key, until its transaction ends.
    fn newest_status(
        &mut self,
        order_key: &str,
        pipeline_id: i64,
    ) -> Result<Option<String>, EngineError>;
}
