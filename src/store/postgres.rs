//! The shared engine: PostgreSQL, for several relays on one database. This file holds the
//! engine's connection, transactions and the [`Engine`] interface; its parts live beside
//! it: `keys` (the per-key queue), `deliveries` (recording webhooks and calls), `shared_state`
//! (what relays share outside the outbox, on a pool of its own: `limits`, cluster-wide
//! rate limits and pauses, and `kept`, what one relay read that the others may use), `operator` (replays, listings, cancels, stored
//! webhooks read back), `connect` (settings and TLS), `schema` (the migrations and running
//! them).
//!
//! The same queue shape as SQLite: `hr_keys` holds one row per upstream+project+ref with
//! its head and when it is due (NULL while leased); a claim locks due keys with
//! `FOR UPDATE SKIP LOCKED`, so relays never hand out the same key twice, and reads no
//! trigger waiting behind a head. Every statement is prepared once per connection. A lost
//! connection is a transient error: the writer keeps outcomes and tries again, and the
//! engine reconnects at the next transaction.

mod connect;
mod deliveries;
mod kept;
mod keys;
mod limits;
mod operator;
mod schema;
mod shared_state;

use std::collections::HashMap;

use postgres::{Client, SimpleQueryMessage, Statement};

pub use connect::{DEFAULT_LEASE, PostgresConfig, has_password, without_password};
use keys::Touch;
use schema::migrate;
pub use shared_state::SharedState;

use super::{
    Accepted, CancelTarget, Claimed, DeliveryRow, Depth, Engine, EngineError, Lease, ListFilter,
    NewDelivery, PruneCursor, Pruned, Recorded, ReplayTarget, StoredWebhook, UpstreamHold,
};

/// The PostgreSQL engine over one connection.
pub struct PostgresEngine {
    config: PostgresConfig,
    /// Taken only when dropped (see `Drop`).
    client: Option<Client>,
    statements: HashMap<&'static str, Statement>,
    /// How long a claim holds its key before another relay may take it over.
    lease_ms: i64,
    /// Whether claims take over keys whose lease ran out (see
    /// `Engine::let_claims_take_over`).
    take_over: bool,
    /// The database's clock minus this relay's, read at every `begin`. Every time the
    /// engine writes or compares is on the database's clock, so relays whose clocks
    /// disagree still agree on leases, due times and retention.
    skew_ms: i64,
    /// Tests that drive time by hand turn the database's clock off.
    follow_database_clock: bool,
    /// Keys this transaction changes, settled at commit (see [`PostgresEngine::settle`]).
    touched: Vec<(String, Touch)>,
    /// Change to the count of unfinished triggers, written at commit.
    open_change: i64,
    /// The time on the database's clock to note at commit (see `Engine::note_clock`),
    /// with the count, in this connection's row of `hr_open`.
    clock_note: Option<i64>,
    /// `touched.len()` and `open_change` when the current savepoint was set.
    savepoint_mark: (usize, i64),
    /// A savepoint costs a round trip, and its release another; the next three fields
    /// spare most of them. This one: nothing has run in the transaction since `BEGIN`, so
    /// a savepoint there is free (to undo the operation is to begin again).
    fresh: bool,
    /// The current savepoint is that free one.
    savepoint_at_start: bool,
    /// The last savepoint is kept but not yet released: its `RELEASE` goes with the
    /// next `SAVEPOINT` (or `COMMIT` releases it).
    release_pending: bool,
    /// Why the transaction could not be begun again after an operation failed at its
    /// start; the commit fails with it.
    lost: Option<EngineError>,
    /// The outbox's writer: its connections plan no sequential scans (see
    /// [`PostgresEngine::as_writer`]).
    writer: bool,
    /// The server said at the last `begin` that its transactions are read-only.
    read_only: bool,
    /// When the connection was made (or last tried).
    connected_at: std::time::Instant,
    /// When the reader last asked whether its server takes writes
    /// ([`PostgresEngine::follow_a_failover`]).
    writes_checked_at: std::time::Instant,
    /// Which row of `hr_open` this connection counts in (spread, so that relays do not
    /// queue on one row at every commit).
    open_shard: i32,
}

/// Rows `hr_open` spreads the count of unfinished triggers over.
const OPEN_SHARDS: i32 = 16;

/// SQLSTATE `read_only_sql_transaction`: a write on a standby (a primary demoted by a
/// failover, an address that still leads to it) or under `default_transaction_read_only`.
const READ_ONLY: &str = "25006";

/// How long a connection to a server that takes no writes is kept before the writer's
/// and the claimer's engines connect again: a failover's new primary is found within
/// about this long of a name, an address or a pooler leading to it (or, with several hosts in
/// the URL and `target_session_attrs=read-write`, of its promotion).
const READ_ONLY_RECONNECT: std::time::Duration = std::time::Duration::from_secs(1);

/// The database's clock in milliseconds since 1970, as SQL.
macro_rules! db_now {
    () => {
        "(extract(epoch from clock_timestamp()) * 1000)::bigint"
    };
}

/// A PostgreSQL error as the outbox sees it: transient when the connection or the server
/// is the problem (gone, shutting down, out of disk, a deadlock or serialization retry,
/// a statement cancelled or timed out, a lock not granted in time, an I/O error), and
/// when the server takes no writes ([`READ_ONLY`]). A transient failure keeps what it
/// failed to write for the next try and makes `/readyz` say why; any other drops an
/// operation for good (a send's outcome so dropped is a trigger sent again once its
/// lease ends).
fn error(err: postgres::Error) -> EngineError {
    let code = err.code().map(|code| code.code());
    let transient = err.is_closed()
        || code.is_some_and(|code| {
            code.starts_with("08")
                || code.starts_with("53")
                || code.starts_with("57")
                || matches!(code, "40001" | "40P01" | "55P03" | "58030" | READ_ONLY)
        })
        || err.as_db_error().is_none();
    // The whole chain: "db error" or "error performing TLS handshake" alone says little;
    // the database's message or rustls's reason says what to fix.
    let mut message = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(cause) = source {
        message = format!("{message}: {cause}");
        source = cause.source();
    }
    if code == Some(READ_ONLY) {
        message.push_str(
            " (the database takes no writes: a standby, or default_transaction_read_only is on; \
             the relay connects again every second until it reaches one that does)",
        );
    }
    EngineError {
        message,
        transient,
        refused: false,
    }
}

impl PostgresEngine {
    /// Connects and migrates (once, whichever relay gets the advisory lock first).
    /// Refuses a database whose commits do not wait for the disk: acknowledged must mean
    /// committed.
    pub fn open(config: &PostgresConfig) -> Result<PostgresEngine, EngineError> {
        let mut client = config.connect()?;
        let commit: String = client
            .query_one("SHOW synchronous_commit", &[])
            .map_err(error)?
            .get(0);
        if !matches!(commit.as_str(), "on" | "remote_apply") {
            return Err(EngineError::refused(format!(
                "PostgreSQL's synchronous_commit is {commit:?} for {}; hookrelay acknowledges a webhook \
                 only once it is committed, so it needs \"on\" (or \"remote_apply\"): \
                 ALTER DATABASE … SET synchronous_commit = on",
                config.describe()
            )));
        }
        migrate(&mut client)?;
        PostgresEngine::on(config, client)
    }

    /// Why a failover of the database could lose acknowledged webhooks, if it could
    /// ([`connect::replication_risk`]).
    pub fn replication_risk(&mut self) -> Result<Option<String>, EngineError> {
        connect::read_replication_risk(self.client()).map_err(error)
    }

    /// Another connection beside an engine [`PostgresEngine::open`] made (the outbox's
    /// reader): the database is checked and migrated already.
    pub fn open_beside(config: &PostgresConfig) -> Result<PostgresEngine, EngineError> {
        PostgresEngine::on(config, config.connect()?)
    }

    fn on(config: &PostgresConfig, mut client: Client) -> Result<PostgresEngine, EngineError> {
        let db_now: i64 = client
            .query_one(concat!("SELECT ", db_now!()), &[])
            .map_err(error)?
            .get(0);
        let skew_ms = db_now - super::now_ms();
        Ok(PostgresEngine {
            config: config.clone(),
            client: Some(client),
            statements: HashMap::new(),
            lease_ms: config.lease.as_millis() as i64,
            take_over: true,
            skew_ms,
            follow_database_clock: true,
            touched: Vec::new(),
            open_change: 0,
            clock_note: None,
            savepoint_mark: (0, 0),
            fresh: false,
            savepoint_at_start: false,
            release_pending: false,
            lost: None,
            writer: false,
            read_only: false,
            connected_at: std::time::Instant::now(),
            writes_checked_at: std::time::Instant::now(),
            open_shard: fastrand::i32(0..OPEN_SHARDS),
        })
    }

    /// The engine of the outbox's writer. Every statement it runs finds its rows through an
    /// index, but a statement is planned once per connection, often while the tables are
    /// still small, and then kept: a plan that scanned a table of a few rows would go on
    /// scanning it at a million (a claim read the whole backlog that way). So its
    /// connections rule sequential scans out.
    pub fn as_writer(mut self) -> Result<PostgresEngine, EngineError> {
        self.writer = true;
        self.set_up_session()?;
        Ok(self)
    }

    fn set_up_session(&mut self) -> Result<(), EngineError> {
        if self.writer {
            self.client()
                .batch_execute("SET enable_seqscan = off")
                .map_err(error)?;
        }
        Ok(())
    }

    /// Takes the times it is given as they are (tests that drive time by hand).
    #[cfg(test)]
    pub fn with_callers_clock(mut self) -> PostgresEngine {
        self.follow_database_clock = false;
        self.skew_ms = 0;
        self
    }

    /// Sets how long a claim holds its key.
    pub fn with_lease(mut self, lease: std::time::Duration) -> PostgresEngine {
        self.lease_ms = lease.as_millis() as i64;
        self
    }

    /// A lost connection (the database restarted, a network cut) comes back at the next
    /// use; so does, for the engines that write, one to a server that takes no writes, at
    /// most every [`READ_ONLY_RECONNECT`] (a kept connection would hold the relay on a
    /// demoted primary for good, whatever its address leads to now).
    fn reconnect_if_lost(&mut self) -> Result<(), EngineError> {
        if self.client().is_closed() || (self.writer && self.stuck_read_only()) {
            self.connect_again()?;
        }
        Ok(())
    }

    /// The server said it takes no writes, and the connection is old enough to try
    /// another.
    fn stuck_read_only(&self) -> bool {
        self.read_only && self.connected_at.elapsed() >= READ_ONLY_RECONNECT
    }

    fn connect_again(&mut self) -> Result<(), EngineError> {
        self.connected_at = std::time::Instant::now();
        self.client = Some(self.config.connect()?);
        self.read_only = false;
        self.statements.clear();
        self.set_up_session()
    }

    /// The reader's part in following a failover. Its reads succeed on a standby or a
    /// demoted primary, so nothing fails to say it is there: it would go on showing the
    /// dashboard, `/metrics` and redelivery checks rows the relay no longer writes. At
    /// most every [`READ_ONLY_RECONNECT`] it asks whether its server takes writes, and
    /// connects again when not, reaching whichever server the address (or
    /// `target_session_attrs=read-write`) leads to now.
    fn follow_a_failover(&mut self) -> Result<(), EngineError> {
        if self.writes_checked_at.elapsed() < READ_ONLY_RECONNECT {
            return Ok(());
        }
        self.writes_checked_at = std::time::Instant::now();
        let row = self
            .client()
            .query_one("SELECT current_setting('transaction_read_only')", &[])
            .map_err(error)?;
        self.read_only = row.get::<_, &str>(0) == "on";
        if self.stuck_read_only() {
            self.connect_again()?;
        }
        Ok(())
    }

    /// The connection, for a statement: the transaction is no longer fresh.
    fn client(&mut self) -> &mut Client {
        self.fresh = false;
        self.client
            .as_mut()
            .expect("the client is taken only when the engine is dropped")
    }

    /// Begins a transaction (after `first`, a `ROLLBACK; ` or nothing) and reads the
    /// database's clock and whether the transaction can write, in one round trip.
    fn start(&mut self, first: &str) -> Result<(), EngineError> {
        let messages = self
            .client()
            .simple_query(&format!(
                concat!(
                    "{}BEGIN; SELECT ",
                    db_now!(),
                    ", current_setting('transaction_read_only')"
                ),
                first
            ))
            .map_err(error)?;
        let relay_now = super::now_ms();
        let row = messages.iter().find_map(|message| match message {
            SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        });
        if let Some(db_now) = row.and_then(|row| row.get(0)?.parse::<i64>().ok())
            && self.follow_database_clock
        {
            self.skew_ms = db_now - relay_now;
        }
        self.read_only = row.and_then(|row| row.get(1)) == Some("on");
        self.fresh = true;
        self.savepoint_at_start = false;
        self.release_pending = false;
        self.lost = None;
        Ok(())
    }

    /// Forgets what the transaction being rolled back noted for its commit.
    fn forget_transaction(&mut self) {
        self.touched.clear();
        self.open_change = 0;
        self.clock_note = None;
        self.savepoint_at_start = false;
        self.release_pending = false;
    }

    /// A statement prepared once per connection.
    fn stmt(&mut self, sql: &'static str) -> Result<Statement, postgres::Error> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client().prepare(sql)?;
        self.statements.insert(sql, statement.clone());
        Ok(statement)
    }

    /// Locks a stored delivery's row against pruning until commit, before a trigger is
    /// added to it (as a foreign key's check would: see the schema); refuses when the
    /// delivery is gone, `what` saying what was asked for.
    fn lock_delivery(
        &mut self,
        delivery: i64,
        what: &dyn std::fmt::Display,
    ) -> Result<(), EngineError> {
        let lock = self
            .stmt("SELECT 1 FROM hr_deliveries WHERE id = $1 FOR KEY SHARE")
            .map_err(error)?;
        match self
            .client()
            .query_opt(&lock, &[&delivery])
            .map_err(error)?
        {
            Some(_) => Ok(()),
            None => Err(EngineError::refused(format!(
                "{what}: its delivery is no longer in the store (pruned)"
            ))),
        }
    }

    /// Writes an outcome's fields; `guard`: only while leased with that token.
    fn write_outcome(
        &mut self,
        id: i64,
        guard: Option<i64>,
        recorded: &Recorded,
        now: i64,
    ) -> Result<Option<String>, postgres::Error> {
        macro_rules! update {
            ($set:literal, $($value:expr),*) => {{
                let statement = self.stmt(concat!(
                    "UPDATE hr_triggers SET ", $set, ", updated_at = $2 WHERE id = $1 ",
                    "AND ($3::bigint IS NULL OR (state = 'sending' AND lease = $3)) RETURNING order_key"
                ))?;
                Ok(self
                    .client()
                    .query_opt(&statement, &[&id, &now, &guard, $($value),*])?
                    .map(|row| row.get(0)))
            }};
        }
        let status = |s: Option<u16>| s.map(i32::from);
        let skew = self.skew_ms;
        match recorded {
            Recorded::Sent {
                status: s,
                pipeline_id,
                pipeline_url,
            } => update!(
                "state = 'sent', last_status = $4, last_error = NULL, pipeline_id = $5, pipeline_url = $6",
                &i32::from(*s),
                pipeline_id,
                pipeline_url
            ),
            Recorded::Retry {
                due_at,
                status: s,
                reason,
            } => update!(
                "state = 'queued', due_at = $4, last_status = $5, last_error = $6",
                &(due_at + skew),
                &status(*s),
                reason
            ),
            Recorded::Failed {
                status: s,
                reason,
                pipeline_id,
                pipeline_url,
            } => update!(
                "state = 'failed', last_status = $4, last_error = $5, pipeline_id = $6, pipeline_url = $7",
                &status(*s),
                reason,
                pipeline_id,
                pipeline_url
            ),
            Recorded::DryRun { would_send } => {
                update!("state = 'dry-run', last_error = $4", would_send)
            }
            Recorded::Deferred { due_at, reason } => update!(
                "state = 'queued', due_at = $4, last_error = $5, attempts = greatest(attempts - 1, 0)",
                &(due_at + skew),
                reason
            ),
            Recorded::Released => {
                update!("state = 'queued', attempts = greatest(attempts - 1, 0)",)
            }
        }
    }
}

/// The client's own runtime cannot shut down on a thread that runs async tasks (a relay
/// dropping its last outbox handle at exit): there it is dropped on a thread of its own.
impl Drop for PostgresEngine {
    fn drop(&mut self) {
        if let (Ok(_), Some(client)) = (tokio::runtime::Handle::try_current(), self.client.take()) {
            let _ = std::thread::spawn(move || drop(client)).join();
        }
    }
}

impl Engine for PostgresEngine {
    fn describe(&self) -> String {
        self.config.describe()
    }

    fn ready_to_read(&mut self) -> Result<(), EngineError> {
        self.reconnect_if_lost()?;
        self.follow_a_failover()
    }

    fn lease(&self) -> Option<std::time::Duration> {
        Some(std::time::Duration::from_millis(self.lease_ms.max(0) as u64))
    }

    fn let_claims_take_over(&mut self, allowed: bool) {
        self.take_over = allowed;
    }

    fn clock_skew(&self) -> i64 {
        self.skew_ms
    }

    /// Every transaction waits for the database's disk, claims and send outcomes too
    /// (SQLite's need not: see there). A database that crashes by itself forgets commits
    /// that had not reached its disk while this relay has already acted on them: a claim
    /// or an outcome forgotten so is a trigger sent twice. Claims run on a connection of
    /// their own, so their flushes overlap the webhooks' (README, "Several relays on
    /// PostgreSQL", has the figures).
    fn begin(&mut self, _durable: bool) -> Result<(), EngineError> {
        self.reconnect_if_lost()?;
        self.start("")
    }

    fn commit(&mut self) -> Result<(), EngineError> {
        if let Some(err) = self.lost.take() {
            self.rollback();
            return Err(err);
        }
        let result = self
            .settle()
            .and_then(|()| self.commit_counting())
            .map_err(error);
        if result.is_err() {
            self.rollback();
        }
        result
    }

    fn rollback(&mut self) {
        self.forget_transaction();
        let _ = self.client().batch_execute("ROLLBACK");
    }

    fn savepoint(&mut self) -> Result<(), EngineError> {
        self.savepoint_mark = (self.touched.len(), self.open_change);
        if self.fresh {
            self.savepoint_at_start = true;
            return Ok(());
        }
        let sql = if std::mem::take(&mut self.release_pending) {
            "RELEASE SAVEPOINT op; SAVEPOINT op"
        } else {
            "SAVEPOINT op"
        };
        self.client().batch_execute(sql).map_err(error)
    }

    fn release(&mut self, keep: bool) {
        if std::mem::take(&mut self.savepoint_at_start) {
            if !keep {
                // Nothing else was in the transaction: undo it and begin again, in one
                // round trip (no reconnection: a statement outside a transaction would
                // commit by itself). Should that fail, so does the commit.
                self.forget_transaction();
                if let Err(err) = self.start("ROLLBACK; ") {
                    self.lost = Some(err);
                }
            }
            return;
        }
        if keep {
            self.release_pending = true;
            return;
        }
        self.touched.truncate(self.savepoint_mark.0);
        self.open_change = self.savepoint_mark.1;
        let _ = self
            .client()
            .batch_execute("ROLLBACK TO SAVEPOINT op; RELEASE SAVEPOINT op");
    }

    fn insert_deliveries(
        &mut self,
        deliveries: &[&NewDelivery],
        now: i64,
        _someone_waits: bool,
    ) -> Option<Result<Vec<Accepted>, EngineError>> {
        let mended: Vec<_> = deliveries
            .iter()
            .map(|d| super::text::delivery(d))
            .collect();
        let deliveries: Vec<&NewDelivery> = mended.iter().map(|d| d.as_ref()).collect();
        // Coalescing looks for a waiting twin, and an outcome that is not a finish is
        // written after its row: those go one by one. A finished gateway call's row
        // carries its outcome.
        let plain = deliveries.iter().all(|d| {
            d.triggers.iter().all(|t| {
                (t.done.is_none() || t.finished().is_some())
                    && t.coalesce_ms == 0
                    && t.queue_key.is_none()
            })
        });
        if !plain || deliveries.len() < 2 {
            return None;
        }
        let now = now + self.skew_ms;
        Some(self.insert_plain_batch(&deliveries, now))
    }

    fn insert_delivery(
        &mut self,
        delivery: &NewDelivery,
        now: i64,
    ) -> Result<Accepted, EngineError> {
        let now = now + self.skew_ms;
        let delivery = super::text::delivery(delivery);
        let delivery = delivery.as_ref();
        (|| -> Result<Accepted, postgres::Error> {
            let headers = serde_json::to_string(&delivery.headers).expect("headers serialize");
            let insert = self.stmt(
                "INSERT INTO hr_deliveries (source, delivery_id, received_at, event_type, headers, body, body_encoding, summary)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (source, delivery_id) DO NOTHING RETURNING id",
            )?;
            let encoding = delivery.body.encoding;
            let params: [&(dyn postgres::types::ToSql + Sync); 8] = [
                &delivery.source,
                &delivery.delivery_id,
                &now,
                &delivery.event_type,
                &headers,
                &&delivery.body.bytes[..],
                &encoding,
                &delivery.summary,
            ];
            // A duplicate whose first delivery another relay prunes between the two
            // statements is new after all: the insert is tried again.
            let row = loop {
                if let Some(row) = self.client().query_opt(&insert, &params)? {
                    break row;
                }
                let existing = self
                    .stmt("SELECT id FROM hr_deliveries WHERE source = $1 AND delivery_id = $2")?;
                if let Some(row) = self
                    .client()
                    .query_opt(&existing, &[&delivery.source, &delivery.delivery_id])?
                {
                    return Ok(Accepted::Duplicate {
                        delivery_row: row.get(0),
                    });
                }
            };
            let delivery_row: i64 = row.get(0);
            let (trigger_ids, coalesced) = self.insert_work(delivery_row, &delivery.triggers, now)?;
            Ok(Accepted::Queued {
                delivery_row,
                trigger_ids,
                coalesced,
            })
        })()
        .map_err(error)
    }

    fn claim(&mut self, now: i64, limit: usize) -> Result<Claimed, EngineError> {
        let now = now + self.skew_ms;
        self.claim_due(now, limit).map_err(error)
    }

    fn record(&mut self, lease: Lease, recorded: &Recorded, now: i64) -> Result<bool, EngineError> {
        let now = now + self.skew_ms;
        let recorded = super::text::recorded(recorded);
        let recorded = recorded.as_ref();
        (|| -> Result<bool, postgres::Error> {
            let Some(order_key) =
                self.write_outcome(lease.trigger, Some(lease.token), recorded, now)?
            else {
                return Ok(false);
            };
            if recorded.finishes() {
                self.open_change -= 1;
                self.touch(&order_key, Touch::Advance);
            } else {
                self.touch(
                    &order_key,
                    Touch::DueAgain {
                        trigger: lease.trigger,
                    },
                );
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
        let (until, now) = (hold.until + self.skew_ms, now + self.skew_ms);
        self.hold_due(hold, until, limit, now).map_err(error)
    }

    fn replay(&mut self, target: &ReplayTarget, now: i64) -> Result<Vec<i64>, EngineError> {
        self.queue_replays(target, now)
    }

    fn prune(
        &mut self,
        before: i64,
        batch: usize,
        after: Option<PruneCursor>,
    ) -> Result<Pruned, EngineError> {
        let before = before + self.skew_ms;
        // Maintenance runs on one relay at a time; the others find the lock taken and skip.
        let ours: bool = self
            .client()
            .query_one(
                "SELECT pg_try_advisory_xact_lock(hashtext('hookrelay:prune'))",
                &[],
            )
            .map_err(error)?
            .get(0);
        if !ours {
            return Ok(Pruned {
                deleted: 0,
                next: None,
            });
        }
        let (at, row) = after.unwrap_or((i64::MIN, i64::MIN));
        (|| -> Result<Pruned, postgres::Error> {
            // `received_at >= $2` gives the index scan its start; the rest breaks ties.
            let look = self.stmt(
                "SELECT d.received_at, d.id, EXISTS (SELECT 1 FROM hr_triggers t WHERE t.delivery = d.id
                                                     AND t.state IN ('queued', 'sending'))
                 FROM hr_deliveries d
                 WHERE d.received_at < $1 AND d.received_at >= $2 AND (d.received_at > $2 OR d.id > $3)
                 ORDER BY d.received_at, d.id LIMIT $4",
            )?;
            let looked: Vec<(i64, i64, bool)> = self
                .client()
                .query(&look, &[&before, &at, &row, &(batch as i64)])?
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect();
            let finished: Vec<i64> = looked
                .iter()
                .filter(|(_, _, open)| !open)
                .map(|(_, id, _)| *id)
                .collect();
            // Locked first, then checked again by a statement of its own (a new snapshot):
            // a trigger that another relay's replay added meanwhile (it locks the delivery,
            // see `lock_delivery`) has committed by then, and keeps its delivery.
            let lock = self.stmt("SELECT id FROM hr_deliveries WHERE id = ANY($1) ORDER BY id FOR UPDATE")?;
            self.client().execute(&lock, &[&finished])?;
            let delete = self.stmt(
                "WITH gone AS (
                     DELETE FROM hr_deliveries d WHERE id = ANY($1)
                     AND NOT EXISTS (SELECT 1 FROM hr_triggers t WHERE t.delivery = d.id AND t.state IN ('queued', 'sending'))
                     RETURNING id
                 ), triggers AS (
                     DELETE FROM hr_triggers WHERE delivery IN (SELECT id FROM gone)
                 )
                 SELECT count(*) FROM gone",
            )?;
            let deleted: i64 = self.client().query_one(&delete, &[&finished])?.get(0);
            let deleted = deleted as usize;
            Ok(Pruned::step(deleted, &looked, batch))
        })()
        .map_err(error)
    }

    fn probe(&mut self, now: i64) -> Result<(), EngineError> {
        let now = now + self.skew_ms;
        self.client()
            .execute("UPDATE hr_stats SET probed_at = $1 WHERE id = 1", &[&now])
            .map(|_| ())
            .map_err(error)
    }

    /// Under an advisory lock held to the end of the transaction: relays that see the
    /// same step take turns, and the second finds it dealt with.
    fn clock_noted(&mut self) -> Result<Option<i64>, EngineError> {
        (|| {
            self.client().execute(
                "SELECT pg_advisory_xact_lock(hashtext('hookrelay:clock'))",
                &[],
            )?;
            let row = self
                .client()
                .query_one("SELECT max(clock_noted) FROM hr_open", &[])?;
            Ok(row.get(0))
        })()
        .map_err(error)
    }

    fn note_clock(&mut self, now: i64) -> Result<(), EngineError> {
        self.clock_note = Some(now + self.skew_ms);
        Ok(())
    }

    /// Limits and pauses are kept in microseconds; those already past are left, as
    /// moving them changes nothing. Every relay's noted time is lowered, or the step
    /// would be seen again in the highest.
    fn move_deadlines_back(&mut self, by: i64, now: i64) -> Result<(), EngineError> {
        let now = now + self.skew_ms;
        self.client()
            .batch_execute(&format!(
                "UPDATE hr_triggers SET due_at = due_at - {by} WHERE state = 'queued';
                 UPDATE hr_keys SET due_at = due_at - {by} WHERE due_at IS NOT NULL;
                 UPDATE hr_limits SET tat = tat - {by}::bigint * 1000 WHERE tat > hr_now_us();
                 UPDATE hr_limits SET paused_until = paused_until - {by}::bigint * 1000 WHERE paused_until > hr_now_us();
                 UPDATE hr_open SET clock_noted = {now};"
            ))
            .map_err(error)
    }

    /// Nothing to do at start: another relay may hold leases now, and a lease of a relay
    /// that died is free once it expires (a claim takes it over then).
    fn recover_leases(&mut self) -> Result<usize, EngineError> {
        Ok(0)
    }

    fn depth(&mut self) -> Result<Depth, EngineError> {
        let row = self
            .client()
            .query_one(
                concat!(
                    "SELECT (SELECT sum(open)::bigint FROM hr_open),
                        (SELECT min(due_at) FROM hr_keys WHERE due_at IS NOT NULL), ",
                    db_now!()
                ),
                &[],
            )
            .map_err(error)?;
        let skew = if self.follow_database_clock {
            row.get::<_, i64>(2) - super::now_ms()
        } else {
            0
        };
        Ok(Depth {
            open: row.get::<_, Option<i64>>(0).unwrap_or(0),
            earliest_due: row.get::<_, Option<i64>>(1).map(|due| due - skew),
        })
    }

    fn list(&mut self, filter: &ListFilter) -> Result<Vec<DeliveryRow>, EngineError> {
        self.read_rows(filter)
    }

    fn cancel(&mut self, target: &CancelTarget, now: i64) -> Result<Vec<i64>, EngineError> {
        self.cancel_waiting(target, now)
    }

    fn queue_work(
        &mut self,
        delivery_row: i64,
        work: &[super::NewTrigger],
        now: i64,
    ) -> Result<Vec<i64>, EngineError> {
        let now = now + self.skew_ms;
        self.lock_delivery(delivery_row, &format_args!("delivery row {delivery_row}"))?;
        self.insert_work(delivery_row, &super::text::triggers(work), now)
            .map(|(ids, _)| ids)
            .map_err(error)
    }

    fn pipeline_origin(
        &mut self,
        of: &super::OriginOf,
    ) -> Result<Option<super::PipelineOrigin>, EngineError> {
        let columns = format!("SELECT {} FROM hr_triggers", super::ORIGIN_COLUMNS);
        let row = match of {
            super::OriginOf::Trigger(id) => self.client().query_opt(
                &format!("{columns} WHERE id = $1 AND kind = 'trigger'"),
                &[id],
            ),
            super::OriginOf::Pipeline {
                upstream,
                pipeline_id,
            } => self.client().query_opt(
                &format!(
                    "{columns} WHERE upstream = $1 AND pipeline_id = $2 AND kind = 'trigger' ORDER BY id LIMIT 1"
                ),
                &[upstream, pipeline_id],
            ),
        }
        .map_err(error)?;
        let Some(row) = row else {
            return Ok(None);
        };
        let mut origin = super::PipelineOrigin {
            trigger_id: row.get(0),
            delivery_row: row.get(1),
            rule: row.get(2),
            upstream: row.get(3),
            project: row.get(4),
            status_target: row.get(5),
            pipeline_url: row.get(6),
            merged_targets: Vec::new(),
        };
        if origin.status_target.is_some() {
            // Through the partial index `hr_triggers_coalesced_into`.
            let merged = self
                .stmt(
                    "SELECT status_target FROM hr_triggers WHERE coalesced_into = $1
                     AND status_target IS NOT NULL ORDER BY id",
                )
                .map_err(error)?;
            origin.merged_targets = self
                .client()
                .query(&merged, &[&origin.trigger_id])
                .map_err(error)?
                .iter()
                .map(|row| row.get(0))
                .collect();
        }
        Ok(Some(origin))
    }

    fn newest_status(
        &mut self,
        order_key: &str,
        pipeline_id: i64,
    ) -> Result<Option<String>, EngineError> {
        let order_key = super::text::text(order_key);
        let order_key = order_key.as_ref();
        (|| -> Result<Option<String>, postgres::Error> {
            // Relays deciding the same key take turns (until commit): the second sees the
            // first's post, so a late state never overtakes a finished one.
            let turn = self.stmt("SELECT pg_advisory_xact_lock(hashtextextended($1, 1))")?;
            self.client().execute(&turn, &[&order_key])?;
            let newest = self.stmt(
                "SELECT variables FROM hr_triggers WHERE order_key = $1 AND kind = 'status' AND pipeline_id = $2
                 AND state <> 'cancelled' ORDER BY id DESC LIMIT 1",
            )?;
            Ok(self
                .client()
                .query_opt(&newest, &[&order_key, &pipeline_id])?
                .map(|row| row.get(0)))
        })()
        .map_err(error)
    }

    fn is_stored(&mut self, source: &str, delivery_id: &str) -> Result<bool, EngineError> {
        let (source, delivery_id) = (super::text::text(source), super::text::text(delivery_id));
        let (source, delivery_id) = (source.as_ref(), delivery_id.as_ref());
        let row = self
            .client()
            .query_opt(
                "SELECT 1 FROM hr_deliveries WHERE source = $1 AND delivery_id = $2",
                &[&source, &delivery_id],
            )
            .map_err(error)?;
        Ok(row.is_some())
    }

    fn stored_webhook(&mut self, delivery_id: &str) -> Result<Option<StoredWebhook>, EngineError> {
        self.newest_stored(delivery_id)
    }

    fn stored_webhook_from(
        &mut self,
        source: &str,
        delivery_id: &str,
    ) -> Result<Option<StoredWebhook>, EngineError> {
        self.stored_from(source, delivery_id)
    }
}

#[cfg(test)]
pub(crate) mod test_server;

#[cfg(test)]
mod tests;
