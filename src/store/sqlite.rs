//! The embedded engine: SQLite in WAL mode under the state folder. This file holds the
//! connection, transactions and the [`Engine`] interface; beside it, as the PostgreSQL
//! engine is laid out, `deliveries` (recording a webhook and its work), `keys` (the
//! queue's key rows and claims), `operator` (replays, listings, cancels, stored webhooks
//! read back), `schema` (the versioned migrations and running them) and `checkpoint`
//! (copying the WAL back on a thread of its own).
//!
//! Only the outbox's writer thread writes while the relay runs (SQLite takes one writer at
//! a time anyway); `deliveries` and `replay` open their own connection beside it. Tokens
//! are never stored: a trigger keeps its token's reference (`env:NAME`), resolved when it
//! is sent. Headers are stored without signatures, tokens and credentials.
//!
//! The queue's shape: `queue_keys` has one row per upstream+project+ref with unfinished
//! triggers, naming its head (the oldest) and when the head is due, `NULL` while it is
//! being sent. A claim walks `queue_keys_due` from the earliest due key and stops after
//! `limit` rows, so it never reads a trigger that waits behind a head. When a head
//! finishes, the next trigger of its key is found through the partial index
//! `triggers_open`, which holds unfinished triggers only. The number of unfinished
//! triggers is kept in `outbox_stats` by the same transactions that change it.

mod checkpoint;
mod deliveries;
mod keys;
mod operator;
mod schema;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rusqlite::config::DbConfig;
use rusqlite::{Connection, ErrorCode, OptionalExtension, params};

use checkpoint::Checkpointer;
use deliveries::{insert_delivery, insert_work};
use keys::{claim, hold_upstream};
use operator::{cancel, list, replay};
use schema::migrate;

use super::{
    Accepted, CancelTarget, Claimed, DeliveryRow, Depth, Engine, EngineError, Lease, ListFilter,
    NewDelivery, PruneCursor, Pruned, Recorded, ReplayTarget, StoredWebhook, UpstreamHold,
};

/// The page size of a new store. A commit writes every page it changed, whole, to the WAL
/// (and a checkpoint copies it again); a webhook changes a dozen index and queue pages
/// besides its own row. With 4 KB pages a webhook wrote 87 KB at one connection and 15 KB
/// at 64 (shared commits); with 2 KB, 49 KB and 12 KB, at the same CPU per acknowledgement.
/// (1 KB wrote 31 KB at one connection but took a tenth more CPU.) A store created with
/// another page size keeps it: SQLite changes it only by rebuilding the whole file.
const PAGE_SIZE: i64 = 2048;

/// The store's file name inside the state folder.
pub const STORE_FILE: &str = "hookrelay.sqlite3";

/// How hard each acknowledging commit holds on to the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// fsync before acknowledging (`synchronous = FULL`): survives power loss.
    Full,
    /// No fsync (`synchronous = OFF`): only for measuring what durability costs.
    Off,
}

/// The embedded engine over one connection.
pub struct SqliteEngine {
    conn: Connection,
    path: PathBuf,
    durability: Durability,
    /// The `synchronous` setting in force, changed only when a group needs another.
    synchronous: &'static str,
    /// Set when a checkpointer thread copies the WAL into the database for this engine.
    checkpointer: Option<Checkpointer>,
    /// The open transaction's change to the count of unfinished triggers, written once
    /// just before its `COMMIT` rather than by each webhook (one row every commit
    /// rewrites either way), and the change when the current savepoint was set.
    open_change: std::cell::Cell<i64>,
    open_at_savepoint: i64,
    /// The store file as opened (device, inode): a file deleted or replaced under the
    /// running relay is noticed before anything is acknowledged into it.
    opened_file: Option<(u64, u64)>,
}

impl SqliteEngine {
    /// Opens (creating if needed) and migrates the store at `path`.
    pub fn open(path: &Path, durability: Durability) -> Result<SqliteEngine, EngineError> {
        let conn = open_connection(path)?;
        Ok(SqliteEngine {
            conn,
            path: path.to_owned(),
            durability,
            synchronous: "FULL",
            checkpointer: None,
            open_change: Default::default(),
            open_at_savepoint: 0,
            opened_file: file_identity(path).ok(),
        })
    }

    /// Fails while the store file is not the one the relay opened: deleted (the state
    /// folder cleaned up under a running relay, a tmpfs emptied) or replaced. SQLite
    /// goes on writing to the open file, which no one can open again: what it
    /// acknowledged would be gone at the next start. One `stat` per group that
    /// acknowledges; claims and outcomes go on, so what waits in the open file is still
    /// sent.
    fn check_the_file_is_still_there(&self) -> Result<(), EngineError> {
        let Some(opened) = self.opened_file else {
            return Ok(());
        };
        let path = self.path.display();
        let what = match file_identity(&self.path) {
            Ok(now) if now == opened => return Ok(()),
            Ok(_) => "was replaced by another file",
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => "was deleted",
            Err(err) => {
                return Err(EngineError {
                    message: format!("the store file {path} cannot be looked at: {err}"),
                    transient: true,
                    refused: false,
                });
            }
        };
        Err(EngineError {
            message: format!(
                "the store file {path} {what} while the relay ran: nothing is acknowledged into the \
                 file it still has open, which no one can open again; the triggers already \
                 waiting in it are still sent. Restart the relay once they are (a new, empty \
                 store is created; `ls -l /proc/{}/fd` shows the old one as deleted until then)",
                std::process::id()
            ),
            transient: true,
            refused: false,
        })
    }

    /// Opens the store of a state folder from outside the server; it must exist already.
    pub fn open_existing(state_dir: &Path) -> Result<SqliteEngine, EngineError> {
        let path = state_dir.join(STORE_FILE);
        if !path.exists() {
            return Err(EngineError::refused(format!(
                "no store at {}; is this the relay's --state folder?",
                path.display()
            )));
        }
        SqliteEngine::open(&path, Durability::Full)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn set_synchronous(&mut self, wanted: &'static str) {
        if wanted != self.synchronous
            && self.conn.pragma_update(None, "synchronous", wanted).is_ok()
        {
            self.synchronous = wanted;
        }
    }

    /// Counts a change to the number of unfinished triggers: kept for the commit inside a
    /// transaction, written at once outside one.
    fn add_open(&self, change: i64) -> rusqlite::Result<()> {
        self.open_change.set(self.open_change.get() + change);
        if self.conn.is_autocommit() {
            self.write_open_change()?;
        }
        Ok(())
    }

    fn write_open_change(&self) -> rusqlite::Result<()> {
        let change = self.open_change.take();
        if change != 0 {
            self.conn
                .prepare_cached("UPDATE outbox_stats SET open = open + ?1 WHERE id = 1")?
                .execute(params![change])?;
        }
        Ok(())
    }

    /// Writes an outcome's fields; `guard`: only while the trigger is leased with that
    /// token. Returns the trigger's key when a row changed.
    fn write_outcome(
        &self,
        id: i64,
        guard: Option<i64>,
        recorded: &Recorded,
        now: i64,
    ) -> rusqlite::Result<Option<String>> {
        macro_rules! update {
            ($set:literal, $($value:expr),*) => {
                self.conn
                    .prepare_cached(concat!(
                        "UPDATE triggers SET ", $set, ", updated_at = ?2 WHERE id = ?1 ",
                        "AND (?3 IS NULL OR (state = 'sending' AND lease = ?3)) RETURNING order_key"
                    ))?
                    .query_row(params![id, now, guard, $($value),*], |row| row.get(0))
                    .optional()
            };
        }
        match recorded {
            Recorded::Sent {
                status,
                pipeline_id,
                pipeline_url,
            } => update!(
                "state = 'sent', last_status = ?4, last_error = NULL, pipeline_id = ?5, pipeline_url = ?6",
                status,
                pipeline_id,
                pipeline_url
            ),
            Recorded::Retry {
                due_at,
                status,
                reason,
            } => update!(
                "state = 'queued', due_at = ?4, last_status = ?5, last_error = ?6",
                due_at,
                status,
                reason
            ),
            Recorded::Failed {
                status,
                reason,
                pipeline_id,
                pipeline_url,
            } => update!(
                "state = 'failed', last_status = ?4, last_error = ?5, pipeline_id = ?6, pipeline_url = ?7",
                status,
                reason,
                pipeline_id,
                pipeline_url
            ),
            Recorded::DryRun { would_send } => {
                update!("state = 'dry-run', last_error = ?4", would_send)
            }
            Recorded::Deferred { due_at, reason } => update!(
                "state = 'queued', due_at = ?4, last_error = ?5, attempts = max(attempts - 1, 0)",
                due_at,
                reason
            ),
            Recorded::Released => update!("state = 'queued', attempts = max(attempts - 1, 0)",),
        }
    }
}

/// Writes a consistent copy of a state folder's store to `to`, beside a running relay
/// (`hookrelay backup`): SQLite's `VACUUM INTO` reads one snapshot while the relay goes on
/// writing, and the copy is compact and whole in one file, ready to be a state folder's
/// `hookrelay.sqlite3`. `to` must not exist; it is created `0600` (it holds every webhook
/// body), and removed again if the copy fails. Returns the copy's size in bytes.
pub fn backup(state_dir: &Path, to: &Path) -> Result<u64, EngineError> {
    use std::os::unix::fs::OpenOptionsExt;
    let engine = SqliteEngine::open_existing(state_dir)?;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(super::private::FILE_MODE)
        .open(to)
        .map_err(|err| {
            EngineError::refused(match err.kind() {
                std::io::ErrorKind::AlreadyExists => {
                    format!("{} exists already; name a new file", to.display())
                }
                _ => format!("cannot create {}: {err}", to.display()),
            })
        })?;
    let copied = engine
        .conn
        .execute("VACUUM INTO ?1", params![to.to_string_lossy()])
        .map_err(|err| EngineError::failed(format!("writing {}: {err}", to.display())))
        .and_then(|_| {
            std::fs::metadata(to)
                .map(|meta| meta.len())
                .map_err(|err| EngineError::failed(format!("{}: {err}", to.display())))
        });
    if copied.is_err() {
        // The file was new, and so is the journal SQLite kept beside it while writing.
        for suffix in ["", "-journal", "-wal", "-shm"] {
            let mut path = to.as_os_str().to_owned();
            path.push(suffix);
            let _ = std::fs::remove_file(path);
        }
    }
    copied
}

/// A file's device and inode, which name it whatever path leads to it.
fn file_identity(path: &Path) -> std::io::Result<(u64, u64)> {
    std::fs::metadata(path).map(|meta| (meta.dev(), meta.ino()))
}

fn open_connection(path: &Path) -> Result<Connection, EngineError> {
    let mut conn = connect(path).map_err(error)?;
    migrate(&mut conn)?;
    Ok(conn)
}

/// A connection with the engine's settings, before any migration.
fn connect(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    // For a new store only (SQLite keeps an existing file's page size; see `PAGE_SIZE`).
    conn.pragma_update(None, "page_size", PAGE_SIZE)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    // Keep the hot pages (the indexes a claim and an insert touch) in memory.
    conn.pragma_update(None, "cache_size", -16_384)?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    // Plans stay as prepared. Without this SQLite looks at bound values while planning
    // (a `LIMIT ?`, partial indexes) and prepares the statement again each time such a
    // value changes: the claim's room changes with every group.
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    // Room for every statement the engine prepares (about forty). rusqlite keeps 16 by
    // default, and the writer's hot ones alone came near that: three more for the clock
    // pushed claims' and outcomes' statements out, each then prepared again, which cost
    // the writer 25k and 11k instructions more per claim and outcome (callgrind).
    conn.set_prepared_statement_cache_capacity(128);
    Ok(conn)
}

/// While it records what nobody waits for (gateway calls' records), the writer thread
/// gives its core back at least every [`TakingTurns::EVERY`]. It shares the cores with
/// the event loops, and the scheduler lets a running thread finish its time slice before
/// a thread that wakes on its core runs (about 1.5 ms on two cores): a loop whose
/// connection answered while the writer recorded a group of gateway calls waited that
/// long, and one call in a hundred through the gateway took 1.5 ms instead of 80 µs.
/// Giving way between records (`sched_yield`, which returns at once when nothing else
/// waits for the core) took that to 0.4 ms. Webhooks' records do not give way: the
/// webhooks wait for their commit, and giving way made their p99 at 64 connections
/// 1.4 times as long.
struct TakingTurns {
    since: std::time::Instant,
}

impl TakingTurns {
    const EVERY: std::time::Duration = std::time::Duration::from_micros(100);

    fn new() -> TakingTurns {
        TakingTurns {
            since: std::time::Instant::now(),
        }
    }

    fn step_aside_if_due(&mut self) {
        if self.since.elapsed() >= Self::EVERY {
            std::thread::yield_now();
            self.since = std::time::Instant::now();
        }
    }
}

/// An SQLite error as the outbox sees it: transient when the disk or the file is the
/// problem, so the same write may succeed later.
fn error(err: rusqlite::Error) -> EngineError {
    let transient = matches!(
        err.sqlite_error_code(),
        Some(
            ErrorCode::DiskFull
                | ErrorCode::SystemIoFailure
                | ErrorCode::DatabaseBusy
                | ErrorCode::DatabaseLocked
                | ErrorCode::CannotOpen
                | ErrorCode::ReadOnly
                | ErrorCode::OutOfMemory
                | ErrorCode::FileLockingProtocolFailed
        )
    );
    EngineError {
        message: err.to_string(),
        transient,
        refused: false,
    }
}

impl Engine for SqliteEngine {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn begin(&mut self, durable: bool) -> Result<(), EngineError> {
        // Only a commit that precedes an acknowledgement needs to reach the disk first. A
        // claim or an outcome committed with `NORMAL` is in the log already, and survives
        // the relay's own crash; only the machine's can lose one (a trigger sent again),
        // and that takes the relay and its sends with it. PostgreSQL, which crashes apart
        // from the relay, waits for every commit.
        let wanted = match (self.durability, durable) {
            (Durability::Off, _) => "OFF",
            (Durability::Full, true) => "FULL",
            (Durability::Full, false) => "NORMAL",
        };
        if durable {
            self.check_the_file_is_still_there()?;
        }
        self.set_synchronous(wanted);
        if let Some(checkpointer) = &self.checkpointer
            && checkpointer
                .finish
                .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            // The checkpointer has copied all but the last commit or two: copying those
            // here, before this group writes, lets the group start the WAL over.
            let _ = self
                .conn
                .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
        }
        self.conn
            .prepare_cached("BEGIN IMMEDIATE")
            .and_then(|mut s| s.execute([]))
            .map(|_| ())
            .map_err(error)
    }

    /// One writer per state folder (its lock), so a claim waits on nobody.
    fn claims_share_commits(&self) -> bool {
        true
    }

    fn commit(&mut self) -> Result<(), EngineError> {
        let result = self
            .write_open_change()
            .and_then(|()| self.conn.prepare_cached("COMMIT"))
            .and_then(|mut s| s.execute([]))
            .map(|_| ())
            .map_err(error);
        match (&result, &self.checkpointer) {
            (Err(_), _) => self.rollback(),
            (Ok(()), Some(checkpointer)) => {
                let _ = checkpointer.commits.send(());
            }
            (Ok(()), None) => {}
        }
        result
    }

    fn rollback(&mut self) {
        self.open_change.set(0);
        if !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }

    fn savepoint(&mut self) -> Result<(), EngineError> {
        self.open_at_savepoint = self.open_change.get();
        self.conn
            .prepare_cached("SAVEPOINT op")
            .and_then(|mut s| s.execute([]))
            .map(|_| ())
            .map_err(error)
    }

    fn release(&mut self, keep: bool) {
        let _ = if keep {
            self.conn
                .prepare_cached("RELEASE op")
                .and_then(|mut s| s.execute([]))
                .map(|_| ())
        } else {
            self.open_change.set(self.open_at_savepoint);
            self.conn.execute_batch("ROLLBACK TO op; RELEASE op")
        };
    }

    /// Every delivery of the group without a savepoint each: on an error the writer rolls
    /// the group back and goes one by one, so no savepoint is ever needed to undo one.
    fn insert_deliveries(
        &mut self,
        deliveries: &[&NewDelivery],
        now: i64,
        someone_waits: bool,
    ) -> Option<Result<Vec<Accepted>, EngineError>> {
        let mut turn = TakingTurns::new();
        Some(
            deliveries
                .iter()
                .map(|delivery| {
                    if !someone_waits {
                        turn.step_aside_if_due();
                    }
                    insert_delivery(self, delivery, now)
                })
                .collect::<rusqlite::Result<_>>()
                .map_err(error),
        )
    }

    fn insert_delivery(
        &mut self,
        delivery: &NewDelivery,
        now: i64,
    ) -> Result<Accepted, EngineError> {
        insert_delivery(self, delivery, now).map_err(error)
    }

    fn claim(&mut self, now: i64, limit: usize) -> Result<Claimed, EngineError> {
        claim(self, now, limit).map_err(error)
    }

    fn record(&mut self, lease: Lease, recorded: &Recorded, now: i64) -> Result<bool, EngineError> {
        let recorded = super::text::recorded(recorded);
        let recorded = recorded.as_ref();
        (|| {
            let Some(order_key) =
                self.write_outcome(lease.trigger, Some(lease.token), recorded, now)?
            else {
                return Ok(false);
            };
            if recorded.finishes() {
                self.add_open(-1)?;
                self.advance_key(&order_key)?;
            } else {
                // Back in the queue, still its key's head: the key is due when it is.
                self.conn
                    .prepare_cached(
                        "UPDATE queue_keys SET due_at = (SELECT due_at FROM triggers WHERE id = ?2)
                         WHERE order_key = ?1",
                    )?
                    .execute(params![order_key, lease.trigger])?;
            }
            Ok(true)
        })()
        .map_err(error)
    }

    fn hold_upstream(
        &mut self,
        hold: &UpstreamHold,
        limit: usize,
        now: i64,
    ) -> Result<usize, EngineError> {
        hold_upstream(self, hold, limit, now).map_err(error)
    }

    fn replay(&mut self, target: &ReplayTarget, now: i64) -> Result<Vec<i64>, EngineError> {
        replay(self, &super::text::replay_target(target), now)
    }

    fn prune(
        &mut self,
        before: i64,
        batch: usize,
        after: Option<PruneCursor>,
    ) -> Result<Pruned, EngineError> {
        (|| {
            let (at, row) = after.unwrap_or((i64::MIN, i64::MIN));
            // `received_at >= ?2` gives the index scan its start; the rest breaks ties.
            let looked: Vec<(i64, i64, bool)> = self
                .conn
                .prepare_cached(
                    "SELECT d.received_at, d.id, EXISTS (SELECT 1 FROM triggers t WHERE t.delivery = d.id
                                                         AND t.state IN ('queued', 'sending'))
                     FROM deliveries d
                     WHERE d.received_at < ?1 AND d.received_at >= ?2
                       AND (d.received_at > ?2 OR d.id > ?3)
                     ORDER BY d.received_at, d.id LIMIT ?4",
                )?
                .query_map(params![before, at, row, batch as i64], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })?
                .collect::<rusqlite::Result<_>>()?;
            let mut deleted = 0;
            for (_, id, open) in &looked {
                if !open {
                    deleted += self
                        .conn
                        .prepare_cached("DELETE FROM deliveries WHERE id = ?1")?
                        .execute(params![id])?;
                }
            }
            Ok(Pruned::step(deleted, &looked, batch))
        })()
        .map_err(error)
    }

    fn probe(&mut self, now: i64) -> Result<(), EngineError> {
        self.conn
            .prepare_cached("UPDATE outbox_stats SET probed_at = ?1 WHERE id = 1")
            .and_then(|mut s| s.execute(params![now]))
            .map(|_| ())
            .map_err(error)
    }

    fn clock_noted(&mut self) -> Result<Option<i64>, EngineError> {
        self.conn
            .prepare_cached("SELECT clock_noted FROM outbox_stats WHERE id = 1")
            .and_then(|mut s| s.query_row([], |row| row.get(0)))
            .map_err(error)
    }

    fn note_clock(&mut self, now: i64) -> Result<(), EngineError> {
        self.conn
            .prepare_cached(
                "UPDATE outbox_stats SET clock_noted = max(coalesce(clock_noted, ?1), ?1) WHERE id = 1",
            )
            .and_then(|mut s| s.execute(params![now]))
            .map(|_| ())
            .map_err(error)
    }

    /// Waiting triggers through the index of unfinished ones (its condition written as
    /// the index's, which SQLite needs to use it), then their keys.
    fn move_deadlines_back(&mut self, by: i64, now: i64) -> Result<(), EngineError> {
        (|| {
            self.conn
                .prepare_cached(
                    "UPDATE triggers SET due_at = due_at - ?1
                     WHERE state IN ('queued', 'sending') AND state = 'queued'",
                )?
                .execute(params![by])?;
            self.conn
                .prepare_cached(
                    "UPDATE queue_keys SET due_at = due_at - ?1 WHERE due_at IS NOT NULL",
                )?
                .execute(params![by])?;
            self.conn
                .prepare_cached("UPDATE outbox_stats SET clock_noted = ?1 WHERE id = 1")?
                .execute(params![now])?;
            Ok(())
        })()
        .map_err(error)
    }

    fn recover_leases(&mut self) -> Result<usize, EngineError> {
        (|| {
            let tx = self
                .conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let requeued = tx.execute(
                "UPDATE triggers SET state = 'queued'
                 WHERE id IN (SELECT head FROM queue_keys WHERE due_at IS NULL) AND state = 'sending'",
                [],
            )?;
            tx.execute(
                "UPDATE queue_keys SET due_at = (SELECT t.due_at FROM triggers t WHERE t.id = queue_keys.head)
                 WHERE due_at IS NULL",
                [],
            )?;
            tx.commit()?;
            Ok(requeued)
        })()
        .map_err(error)
    }

    fn depth(&mut self) -> Result<Depth, EngineError> {
        (|| {
            let open = self
                .conn
                .prepare_cached("SELECT open FROM outbox_stats WHERE id = 1")?
                .query_row([], |row| row.get(0))
                .optional()?
                .unwrap_or(0);
            let earliest_due = self
                .conn
                .prepare_cached("SELECT min(due_at) FROM queue_keys WHERE due_at IS NOT NULL")?
                .query_row([], |row| row.get(0))?;
            Ok(Depth { open, earliest_due })
        })()
        .map_err(error)
    }

    fn list(&mut self, filter: &ListFilter) -> Result<Vec<DeliveryRow>, EngineError> {
        list(&self.conn, &super::text::filter(filter)).map_err(error)
    }

    fn cancel(&mut self, target: &CancelTarget, now: i64) -> Result<Vec<i64>, EngineError> {
        cancel(self, &super::text::cancel_target(target), now).map_err(error)?
    }

    fn queue_work(
        &mut self,
        delivery_row: i64,
        work: &[super::NewTrigger],
        now: i64,
    ) -> Result<Vec<i64>, EngineError> {
        // As on PostgreSQL: a refusal that says why, not the foreign key's failure.
        let stored = self
            .conn
            .prepare_cached("SELECT 1 FROM deliveries WHERE id = ?1")
            .and_then(|mut find| find.exists([delivery_row]))
            .map_err(error)?;
        if !stored {
            return Err(EngineError::refused(format!(
                "delivery row {delivery_row}: its delivery is no longer in the store (pruned)"
            )));
        }
        insert_work(self, delivery_row, &super::text::triggers(work), now)
            .map(|(ids, _)| ids)
            .map_err(error)
    }

    fn pipeline_origin(
        &mut self,
        of: &super::OriginOf,
    ) -> Result<Option<super::PipelineOrigin>, EngineError> {
        let columns = format!("SELECT {} FROM triggers", super::ORIGIN_COLUMNS);
        let read = |row: &rusqlite::Row<'_>| {
            Ok(super::PipelineOrigin {
                trigger_id: row.get(0)?,
                delivery_row: row.get(1)?,
                rule: row.get(2)?,
                upstream: row.get(3)?,
                project: row.get(4)?,
                status_target: row.get(5)?,
                pipeline_url: row.get(6)?,
                merged_targets: Vec::new(),
            })
        };
        let origin = match of {
            super::OriginOf::Trigger(id) => self
                .conn
                .prepare_cached(&format!("{columns} WHERE id = ?1 AND kind = 'trigger'"))
                .and_then(|mut s| s.query_row(params![id], read).optional()),
            super::OriginOf::Pipeline {
                upstream,
                pipeline_id,
            } => self
                .conn
                .prepare_cached(&format!(
                    "{columns} WHERE upstream = ?1 AND pipeline_id = ?2 AND kind = 'trigger' ORDER BY id LIMIT 1"
                ))
                .and_then(|mut s| s.query_row(params![upstream, pipeline_id], read).optional()),
        }
        .map_err(error)?;
        let Some(mut origin) = origin else {
            return Ok(None);
        };
        if origin.status_target.is_some() {
            // Through the partial index `triggers_coalesced_into`.
            origin.merged_targets = self
                .conn
                .prepare_cached(
                    "SELECT status_target FROM triggers WHERE coalesced_into = ?1
                     AND status_target IS NOT NULL ORDER BY id",
                )
                .and_then(|mut s| {
                    s.query_map(params![origin.trigger_id], |row| row.get(0))?
                        .collect()
                })
                .map_err(error)?;
        }
        Ok(Some(origin))
    }

    fn newest_status(
        &mut self,
        order_key: &str,
        pipeline_id: i64,
    ) -> Result<Option<String>, EngineError> {
        let order_key = super::text::text(order_key);
        self.conn
            .prepare_cached(
                "SELECT variables FROM triggers WHERE order_key = ?1 AND kind = 'status' AND pipeline_id = ?2
                 AND state <> 'cancelled' ORDER BY id DESC LIMIT 1",
            )
            .and_then(|mut s| {
                s.query_row(params![order_key, pipeline_id], |row| row.get(0))
                    .optional()
            })
            .map_err(error)
    }

    fn is_stored(&mut self, source: &str, delivery_id: &str) -> Result<bool, EngineError> {
        self.conn
            .prepare_cached("SELECT 1 FROM deliveries WHERE source = ?1 AND delivery_id = ?2")
            .and_then(|mut statement| {
                statement.exists(params![
                    super::text::text(source),
                    super::text::text(delivery_id)
                ])
            })
            .map_err(error)
    }

    fn stored_webhook(&mut self, delivery_id: &str) -> Result<Option<StoredWebhook>, EngineError> {
        self.newest_stored(delivery_id)
    }

    fn stored_webhook_from(
        &mut self,
        source: &str,
        delivery_id: &str,
    ) -> Result<Option<StoredWebhook>, EngineError> {
        self.stored_where(
            "SELECT d.source, d.headers, d.body, d.body_encoding, d.received_at, d.summary
             FROM deliveries d WHERE d.delivery_id = ?1 AND d.source = ?2",
            delivery_id,
            Some(source),
        )
    }
}

#[cfg(test)]
mod tests;
