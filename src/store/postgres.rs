//! The shared engine: PostgreSQL, for several relays on one database (issue 11 builds the
//! rest — configuration, cluster-wide limits, the database's clock — on this).
//!
//! The same queue shape as SQLite: `hr_keys` holds one row per upstream+project+ref with
//! its head and when it is due (NULL while leased); a claim locks due keys with
//! `FOR UPDATE SKIP LOCKED`, so relays never hand out the same key twice, and reads no
//! trigger waiting behind a head. Every statement is prepared once per connection. A lost
//! connection is a transient error: the writer keeps outcomes and tries again, and the
//! engine reconnects at the next transaction.

mod connect;
pub mod limits;
mod schema;

use std::collections::HashMap;

use postgres::{Client, SimpleQueryMessage, Statement};

pub use connect::{DEFAULT_LEASE, PostgresConfig, has_password, without_password};

use super::{
    Accepted, CancelTarget, Claimed, DeliveryRow, Depth, DueTrigger, Engine, EngineError, Lease,
    ListFilter, NewDelivery, PruneCursor, Pruned, Recorded, ReplayTarget, SqlValue, StoredBody,
    StoredWebhook,
};

/// The PostgreSQL engine over one connection.
pub struct PostgresEngine {
    config: PostgresConfig,
    /// Taken only when dropped (see `Drop`).
    client: Option<Client>,
    statements: HashMap<&'static str, Statement>,
    /// How long a claim holds its key before another relay may take it over.
    lease_ms: i64,
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
    /// `touched.len()` and `open_change` when the current savepoint was set.
    savepoint_mark: (usize, i64),
    /// Which row of `hr_open` this connection counts in (spread, so that relays do not
    /// queue on one row at every commit).
    open_shard: i32,
}

/// Rows `hr_open` spreads the count of unfinished triggers over.
const OPEN_SHARDS: i32 = 16;

/// A change to a key row, made at commit in key order.
#[derive(Debug)]
enum Touch {
    /// A new trigger of the key: the key row must exist.
    Enqueue { id: i64, due_at: i64 },
    /// The key's head finished: the next unfinished trigger heads it, or the key goes.
    Advance,
    /// The head stays, due again at its trigger's `due_at`.
    DueAgain { trigger: i64 },
    /// A waiting trigger was cancelled: if it headed its key, the key moves on (a key
    /// headed by another trigger, perhaps being sent, is left alone).
    Cancelled { trigger: i64 },
}

impl Touch {
    /// The trigger it is about, to order changes of one kind within a key.
    fn id(&self) -> i64 {
        match self {
            Touch::Enqueue { id, .. } => *id,
            Touch::Advance => 0,
            Touch::DueAgain { trigger } | Touch::Cancelled { trigger } => *trigger,
        }
    }

    /// Within one key: make sure it exists, then move its head, then its due time.
    fn rank(&self) -> u8 {
        match self {
            Touch::Enqueue { .. } => 0,
            Touch::Advance => 1,
            Touch::DueAgain { .. } => 2,
            Touch::Cancelled { .. } => 3,
        }
    }
}

/// The database's clock in milliseconds since 1970, as SQL.
macro_rules! db_now {
    () => {
        "(extract(epoch from clock_timestamp()) * 1000)::bigint"
    };
}

/// A PostgreSQL error as the outbox sees it: transient when the connection or the server
/// is the problem (gone, shutting down, out of disk, a deadlock or serialization retry).
fn error(err: postgres::Error) -> EngineError {
    let transient = err.is_closed()
        || err.code().is_some_and(|code| {
            let code = code.code();
            code.starts_with("08")
                || code.starts_with("53")
                || code.starts_with("57P")
                || code == "40001"
                || code == "40P01"
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
        migrate(&mut client).map_err(error)?;
        PostgresEngine::on(config, client)
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
            skew_ms,
            follow_database_clock: true,
            touched: Vec::new(),
            open_change: 0,
            savepoint_mark: (0, 0),
            open_shard: fastrand::i32(0..OPEN_SHARDS),
        })
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
    /// use.
    fn reconnect_if_lost(&mut self) -> Result<(), EngineError> {
        if self.client().is_closed() {
            self.client = Some(self.config.connect()?);
            self.statements.clear();
        }
        Ok(())
    }

    fn client(&mut self) -> &mut Client {
        self.client
            .as_mut()
            .expect("the client is taken only when the engine is dropped")
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

    fn touch(&mut self, order_key: &str, touch: Touch) {
        self.touched.push((order_key.to_owned(), touch));
    }

    /// Applies the transaction's key changes, each key locked in key order, so relays
    /// settling at the same moment never wait for each other in a cycle. Runs last, just
    /// before `COMMIT`: a key is locked only for the commit's round trip, and nothing that
    /// holds a key waits for anything but another key (claims run apart and wait on
    /// nothing).
    ///
    /// An existing key row is locked (`DO UPDATE`, changing nothing) by a new trigger: a
    /// relay finishing the key's last trigger meanwhile waits, then sees the new trigger
    /// and makes it the head, instead of deleting the key under a trigger it could not see
    /// yet. A finishing relay locks the key before it looks for the next head, for the same
    /// reason.
    fn settle(&mut self) -> Result<(), postgres::Error> {
        let mut touched = std::mem::take(&mut self.touched);
        touched.sort_by(|a, b| {
            a.0.cmp(&b.0)
                .then(a.1.rank().cmp(&b.1.rank()))
                .then(a.1.id().cmp(&b.1.id()))
        });
        // One change of each kind per key is enough: the oldest new trigger (it sets the
        // floor, and heads a new key), one advance, the last due time.
        touched.dedup_by(|later, earlier| {
            later.0 == earlier.0
                && later.1.rank() == earlier.1.rank()
                && !matches!(later.1, Touch::DueAgain { .. } | Touch::Cancelled { .. })
        });
        for (order_key, touch) in &touched {
            match touch {
                Touch::Enqueue { id, due_at } => {
                    let upsert = self.stmt(
                        "INSERT INTO hr_keys (order_key, head, due_at, floor) VALUES ($1, $2, $3, $2)
                         ON CONFLICT (order_key) DO UPDATE SET floor = least(hr_keys.floor, EXCLUDED.floor)",
                    )?;
                    self.client().execute(&upsert, &[order_key, id, due_at])?;
                }
                Touch::Advance => {
                    let lock =
                        self.stmt("SELECT floor FROM hr_keys WHERE order_key = $1 FOR UPDATE")?;
                    // No row: another relay finished the key, and nothing is left in it.
                    if let Some(row) = self.client().query_opt(&lock, &[order_key])? {
                        self.advance_key(order_key, row.get(0))?;
                    }
                }
                Touch::Cancelled { trigger } => {
                    let lock = self
                        .stmt("SELECT floor, head FROM hr_keys WHERE order_key = $1 FOR UPDATE")?;
                    if let Some(row) = self.client().query_opt(&lock, &[order_key])?
                        && row.get::<_, i64>(1) == *trigger
                    {
                        self.advance_key(order_key, row.get(0))?;
                    }
                }
                Touch::DueAgain { trigger } => {
                    let due = self.stmt(
                        "UPDATE hr_keys SET due_at = (SELECT due_at FROM hr_triggers WHERE id = $2)
                         WHERE order_key = $1 AND head = $2",
                    )?;
                    self.client().execute(&due, &[order_key, trigger])?;
                }
            }
        }
        Ok(())
    }

    /// `COMMIT`, with the transaction's change to the count of unfinished triggers in the
    /// same round trip (two numbers, written into the text: nothing else goes there).
    fn commit_counting(&mut self) -> Result<(), postgres::Error> {
        let change = std::mem::take(&mut self.open_change);
        if change == 0 {
            return self.client().batch_execute("COMMIT");
        }
        let shard = self.open_shard;
        self.client().batch_execute(&format!(
            "UPDATE hr_open SET open = open + {change} WHERE shard = {shard}; COMMIT"
        ))
    }

    /// [`Engine::insert_deliveries`] for deliveries without coalescing or finished calls:
    /// one statement inserts the new deliveries and their triggers (a delivery id already
    /// stored inserts neither), and a second reads the duplicates' rows only when there
    /// are duplicates — one round trip for a whole group instead of several per delivery.
    fn insert_plain_batch(
        &mut self,
        deliveries: &[&NewDelivery],
        now: i64,
    ) -> Result<Vec<Accepted>, postgres::Error> {
        // A delivery id twice in one batch: the first is recorded, the second is its
        // duplicate.
        let mut first_of: HashMap<(&str, &str), usize> = HashMap::new();
        let mut unique = Vec::with_capacity(deliveries.len());
        for (i, d) in deliveries.iter().enumerate() {
            if let std::collections::hash_map::Entry::Vacant(entry) =
                first_of.entry((d.source.as_str(), d.delivery_id.as_str()))
            {
                entry.insert(i);
                unique.push(*d);
            }
        }
        let headers: Vec<String> = unique
            .iter()
            .map(|d| serde_json::to_string(&d.headers).expect("headers serialize"))
            .collect();
        let sources: Vec<&str> = unique.iter().map(|d| d.source.as_str()).collect();
        let ids: Vec<&str> = unique.iter().map(|d| d.delivery_id.as_str()).collect();
        let events: Vec<&str> = unique.iter().map(|d| d.event_type.as_str()).collect();
        let bodies: Vec<&[u8]> = unique.iter().map(|d| &d.body.bytes[..]).collect();
        let encodings: Vec<Option<&str>> = unique.iter().map(|d| d.body.encoding).collect();
        let summaries: Vec<&str> = unique.iter().map(|d| d.summary.as_str()).collect();
        // Every trigger of every delivery, in order, with its delivery's place in the
        // arrays above (from 1); identity values follow that order.
        let mut t_of = Vec::new();
        let (mut t_rule, mut t_upstream, mut t_project, mut t_ref) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut t_token, mut t_variables, mut t_inputs, mut t_key, mut t_due) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut t_status: Vec<Option<&str>> = Vec::new();
        // What a finished gateway call's row says; a queued trigger's are empty.
        let (mut t_state, mut t_kind, mut t_pipeline) = (Vec::new(), Vec::new(), Vec::new());
        let (mut t_last_status, mut t_last_error, mut t_url) = (Vec::new(), Vec::new(), Vec::new());
        for (place, d) in unique.iter().enumerate() {
            for t in &d.triggers {
                t_of.push(place as i32 + 1);
                t_rule.push(t.rule.as_str());
                t_upstream.push(t.upstream.as_str());
                t_project.push(t.project.as_str());
                t_ref.push(t.git_ref.as_str());
                t_token.push(t.token_ref.as_str());
                t_variables.push(t.variables.as_str());
                t_inputs.push(t.inputs.as_str());
                t_key.push(t.order_key());
                let (state, due_at) = t.initial_state(None, now);
                t_state.push(state);
                t_due.push(due_at);
                t_status.push(t.status_target.as_deref());
                t_kind.push(t.kind.as_str());
                let end = t.finished().unwrap_or_default();
                t_pipeline.push(t.pipeline_id.or(end.pipeline_id));
                t_last_status.push(end.status.map(i32::from));
                t_last_error.push(end.error);
                t_url.push(end.pipeline_url);
            }
        }
        let insert = self.stmt(
            "WITH d AS (
                 INSERT INTO hr_deliveries (source, delivery_id, received_at, event_type, headers, body, body_encoding, summary)
                 SELECT s, d, $1, e, h, b, enc, summary
                 FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::bytea[], $7::text[], $8::text[])
                      AS u(s, d, e, h, b, enc, summary)
                 ON CONFLICT (source, delivery_id) DO NOTHING RETURNING id, source, delivery_id
             ), t AS (
                 INSERT INTO hr_triggers (delivery, rule, upstream, project, git_ref, token_ref, variables, inputs,
                                          order_key, state, created_at, due_at, updated_at, status_target,
                                          kind, pipeline_id, last_status, last_error, pipeline_url)
                 SELECT d.id, r, up, p, g, tok, v, i, k, state, $1, due, $1, st, kind, pl, ls, le, url
                 FROM unnest($9::int[], $10::text[], $11::text[], $12::text[], $13::text[], $14::text[],
                             $15::text[], $16::text[], $17::text[], $18::bigint[], $19::text[], $20::text[],
                             $21::text[], $22::bigint[], $23::int[], $24::text[], $25::text[]) WITH ORDINALITY
                      AS u(place, r, up, p, g, tok, v, i, k, due, st, state, kind, pl, ls, le, url, n)
                 JOIN d ON d.source = ($2::text[])[u.place] AND d.delivery_id = ($3::text[])[u.place]
                 ORDER BY n RETURNING id
             )
             SELECT id, source, delivery_id FROM d
             UNION ALL SELECT id, NULL, NULL FROM t",
        )?;
        let mut rows: HashMap<(String, String), (i64, bool)> = HashMap::new();
        let mut trigger_ids: Vec<i64> = Vec::new();
        for row in self.client().query(
            &insert,
            &[
                &now,
                &sources,
                &ids,
                &events,
                &headers,
                &bodies,
                &encodings,
                &summaries,
                &t_of,
                &t_rule,
                &t_upstream,
                &t_project,
                &t_ref,
                &t_token,
                &t_variables,
                &t_inputs,
                &t_key,
                &t_due,
                &t_status,
                &t_state,
                &t_kind,
                &t_pipeline,
                &t_last_status,
                &t_last_error,
                &t_url,
            ],
        )? {
            match (row.get::<_, Option<String>>(1), row.get(2)) {
                (Some(source), Some(delivery_id)) => {
                    rows.insert((source, delivery_id), (row.get(0), true));
                }
                _ => trigger_ids.push(row.get(0)),
            }
        }
        if rows.len() < unique.len() {
            let existing = self.stmt(
                "SELECT d.id, d.source, d.delivery_id FROM hr_deliveries d
                 JOIN unnest($1::text[], $2::text[]) AS u(s, i) ON d.source = u.s AND d.delivery_id = u.i",
            )?;
            for row in self.client().query(&existing, &[&sources, &ids])? {
                rows.entry((row.get(1), row.get(2)))
                    .or_insert((row.get(0), false));
            }
        }
        // Identity values are taken in the order the rows are inserted: the triggers of
        // the new deliveries, in the arrays' order.
        trigger_ids.sort_unstable();
        let new: Vec<bool> = unique
            .iter()
            .map(|d| rows[&(d.source.clone(), d.delivery_id.clone())].1)
            .collect();
        let mut inserted = trigger_ids.iter();
        let mut opened = 0;
        for (((place, key), due_at), trigger) in t_of
            .iter()
            .zip(&t_key)
            .zip(&t_due)
            .zip(unique.iter().flat_map(|d| &d.triggers))
        {
            if !new[*place as usize - 1] {
                continue;
            }
            // One id per trigger of a new delivery: the statement inserted exactly those.
            let Some(&id) = inserted.next() else { break };
            if trigger.done.is_none() {
                self.touch(
                    key,
                    Touch::Enqueue {
                        id,
                        due_at: *due_at,
                    },
                );
                opened += 1;
            }
        }
        self.open_change += opened;
        let mut next_trigger = trigger_ids.into_iter();
        let mut answers = Vec::with_capacity(deliveries.len());
        for (i, d) in deliveries.iter().enumerate() {
            let (row, new) = rows[&(d.source.clone(), d.delivery_id.clone())];
            let first = first_of[&(d.source.as_str(), d.delivery_id.as_str())] == i;
            answers.push(if new && first {
                let ids: Vec<i64> = next_trigger.by_ref().take(d.triggers.len()).collect();
                Accepted::Queued {
                    delivery_row: row,
                    coalesced: vec![None; ids.len()],
                    trigger_ids: ids,
                }
            } else {
                Accepted::Duplicate { delivery_row: row }
            });
        }
        Ok(answers)
    }

    /// Inserts a delivery's triggers (or other work): each joins its key's queue, merges
    /// into a waiting twin in its `coalesce` window, or is recorded finished (a gateway
    /// call). Returns the ids, and for each the trigger it was merged into.
    fn insert_work(
        &mut self,
        delivery_row: i64,
        work: &[super::NewTrigger],
        now: i64,
    ) -> Result<(Vec<i64>, Vec<Option<i64>>), postgres::Error> {
        let mut trigger_ids = Vec::with_capacity(work.len());
        let mut coalesced = Vec::with_capacity(work.len());
        let mut opened = 0;
        for trigger in work {
            let order_key = trigger.order_key();
            let coalesce_key = trigger.coalesce_key(&order_key);
            let into: Option<i64> = match &coalesce_key {
                None => None,
                Some(key) => {
                    // Relays accepting identical triggers at the same moment take
                    // turns here (until commit): the second sees the first's trigger
                    // and merges into it, instead of both queuing one.
                    let turn =
                        self.stmt("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")?;
                    self.client().execute(&turn, &[key])?;
                    let find = self.stmt(
                        "SELECT id FROM hr_triggers WHERE coalesce_key = $1 AND state = 'queued' AND due_at > $2
                         ORDER BY id LIMIT 1",
                    )?;
                    self.client()
                        .query_opt(&find, &[key, &now])?
                        .map(|r| r.get(0))
                }
            };
            let (state, due_at) = trigger.initial_state(into, now);
            let finished = trigger.finished();
            let end = finished.unwrap_or_default();
            let insert = self.stmt(
                "INSERT INTO hr_triggers (delivery, rule, upstream, project, git_ref, token_ref, variables, inputs,
                                          order_key, state, created_at, due_at, updated_at, coalesce_key, coalesced_into,
                                          kind, status_target, pipeline_id, last_status, last_error, pipeline_url)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $11, $13, $14, $15, $16, $17, $18, $19, $20)
                 RETURNING id",
            )?;
            let id: i64 = self
                .client()
                .query_one(
                    &insert,
                    &[
                        &delivery_row,
                        &trigger.rule,
                        &trigger.upstream,
                        &trigger.project,
                        &trigger.git_ref,
                        &trigger.token_ref,
                        &trigger.variables,
                        &trigger.inputs,
                        &order_key,
                        &state,
                        &now,
                        &due_at,
                        &coalesce_key,
                        &into,
                        &trigger.kind.as_str(),
                        &trigger.status_target,
                        &trigger.pipeline_id.or(end.pipeline_id),
                        &end.status.map(i32::from),
                        &end.error,
                        &end.pipeline_url,
                    ],
                )?
                .get(0);
            match &trigger.done {
                Some(_) if finished.is_some() => {}
                Some(done) => {
                    self.write_outcome(id, None, done, now)?;
                }
                None if into.is_none() => {
                    self.touch(&order_key, Touch::Enqueue { id, due_at });
                    opened += 1;
                }
                None => {}
            }
            trigger_ids.push(id);
            coalesced.push(into);
        }
        self.open_change += opened;
        Ok((trigger_ids, coalesced))
    }

    /// Makes the key's oldest unfinished trigger its head, due when that trigger is; or
    /// deletes the key when none is left. The key is locked already.
    ///
    /// `floor` is at most the id of every unfinished trigger of the key (a new trigger
    /// lowers it under the key's lock), so the search starts there: the index entries of
    /// finished triggers below it, which PostgreSQL keeps until a vacuum, are never read.
    fn advance_key(&mut self, order_key: &str, floor: i64) -> Result<(), postgres::Error> {
        let next = self.stmt(
            "SELECT id, due_at FROM hr_triggers WHERE order_key = $1 AND id >= $2 AND state IN ('queued', 'sending')
             ORDER BY id LIMIT 1",
        )?;
        match self.client().query_opt(&next, &[&order_key, &floor])? {
            Some(row) => {
                let (head, due_at): (i64, i64) = (row.get(0), row.get(1));
                let update = self.stmt(
                    "UPDATE hr_keys SET head = $2, due_at = $3, lease_until = NULL, floor = $2 WHERE order_key = $1",
                )?;
                self.client()
                    .execute(&update, &[&order_key, &head, &due_at])?;
            }
            None => {
                let delete = self.stmt("DELETE FROM hr_keys WHERE order_key = $1")?;
                self.client().execute(&delete, &[&order_key])?;
            }
        }
        Ok(())
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

fn migrate(client: &mut Client) -> Result<(), postgres::Error> {
    let mut tx = client.transaction()?;
    // One relay migrates; the others wait here, then find nothing left to do.
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('hookrelay:migrate'))",
        &[],
    )?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS hr_schema (version integer NOT NULL)")?;
    let version: i64 = tx
        .query_one(
            "SELECT coalesce(max(version), 0)::bigint FROM hr_schema",
            &[],
        )?
        .get(0);
    for (i, sql) in schema::MIGRATIONS
        .iter()
        .enumerate()
        .skip(version.max(0) as usize)
    {
        tx.batch_execute(sql)?;
        tx.execute(
            "INSERT INTO hr_schema (version) VALUES ($1)",
            &[&(i as i32 + 1)],
        )?;
    }
    tx.commit()
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

    fn clock_skew(&self) -> i64 {
        self.skew_ms
    }

    fn begin(&mut self, durable: bool) -> Result<(), EngineError> {
        self.reconnect_if_lost()?;
        // One round trip begins the transaction and reads the database's clock.
        // A group that acknowledges nothing (claims, send outcomes) need not wait for the
        // disk: lost in a database crash, it means a trigger sent again, which
        // at-least-once allows; as SQLite's `synchronous = NORMAL` for the same groups.
        let sql = if durable {
            concat!("BEGIN; SELECT ", db_now!())
        } else {
            concat!(
                "BEGIN; SET LOCAL synchronous_commit = off; SELECT ",
                db_now!()
            )
        };
        let messages = self.client().simple_query(sql).map_err(error)?;
        let relay_now = super::now_ms();
        if let Some(db_now) = messages.iter().find_map(|message| match message {
            SimpleQueryMessage::Row(row) => row.get(0).and_then(|v| v.parse::<i64>().ok()),
            _ => None,
        }) && self.follow_database_clock
        {
            self.skew_ms = db_now - relay_now;
        }
        Ok(())
    }

    fn commit(&mut self) -> Result<(), EngineError> {
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
        self.touched.clear();
        self.open_change = 0;
        let _ = self.client().batch_execute("ROLLBACK");
    }

    fn savepoint(&mut self) -> Result<(), EngineError> {
        self.savepoint_mark = (self.touched.len(), self.open_change);
        self.client().batch_execute("SAVEPOINT op").map_err(error)
    }

    fn release(&mut self, keep: bool) {
        let sql = if keep {
            "RELEASE SAVEPOINT op"
        } else {
            self.touched.truncate(self.savepoint_mark.0);
            self.open_change = self.savepoint_mark.1;
            "ROLLBACK TO SAVEPOINT op; RELEASE SAVEPOINT op"
        };
        let _ = self.client().batch_execute(sql);
    }

    fn insert_deliveries(
        &mut self,
        deliveries: &[&NewDelivery],
        now: i64,
    ) -> Option<Result<Vec<Accepted>, EngineError>> {
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
        Some(self.insert_plain_batch(deliveries, now).map_err(error))
    }

    fn insert_delivery(
        &mut self,
        delivery: &NewDelivery,
        now: i64,
    ) -> Result<Accepted, EngineError> {
        let now = now + self.skew_ms;
        (|| -> Result<Accepted, postgres::Error> {
            let headers = serde_json::to_string(&delivery.headers).expect("headers serialize");
            let insert = self.stmt(
                "INSERT INTO hr_deliveries (source, delivery_id, received_at, event_type, headers, body, body_encoding, summary)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (source, delivery_id) DO NOTHING RETURNING id",
            )?;
            let encoding = delivery.body.encoding;
            let row = self.client().query_opt(
                &insert,
                &[
                    &delivery.source,
                    &delivery.delivery_id,
                    &now,
                    &delivery.event_type,
                    &headers,
                    &&delivery.body.bytes[..],
                    &encoding,
                    &delivery.summary,
                ],
            )?;
            let Some(row) = row else {
                let existing = self
                    .stmt("SELECT id FROM hr_deliveries WHERE source = $1 AND delivery_id = $2")?;
                let row = self
                    .client()
                    .query_one(&existing, &[&delivery.source, &delivery.delivery_id])?;
                return Ok(Accepted::Duplicate {
                    delivery_row: row.get(0),
                });
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
        (|| -> Result<Claimed, postgres::Error> {
            // Due keys, then keys whose lease expired (their holder died or froze), in one
            // round trip: the second scan runs only for the room the first left. Keys
            // another relay is claiming right now are skipped, not waited for. Each from
            // its own partial index, so a claim reads only keys with due work.
            let keys = self.stmt(
                "WITH due AS (
                     SELECT order_key, head FROM hr_keys WHERE due_at IS NOT NULL AND due_at <= $1
                     ORDER BY due_at LIMIT $2 FOR UPDATE SKIP LOCKED
                 ), expired AS (
                     SELECT order_key, head FROM hr_keys WHERE due_at IS NULL AND lease_until < $1
                     ORDER BY lease_until LIMIT $2 FOR UPDATE SKIP LOCKED
                 )
                 (SELECT order_key, head FROM due) UNION ALL (SELECT order_key, head FROM expired) LIMIT $2",
            )?;
            let heads: Vec<(String, i64)> = self
                .client()
                .query(&keys, &[&now, &(limit as i64)])?
                .into_iter()
                .map(|row| (row.get(0), row.get(1)))
                .collect();
            let mut due = Vec::with_capacity(heads.len());
            for (order_key, head) in heads {
                // The head is taken only if no one holds its row (a late outcome being
                // written): a claim waits on nothing while it holds keys. The key is leased
                // in the same statement when the head was taken.
                let take = self.stmt(
                    "WITH taken AS (
                         UPDATE hr_triggers t SET state = 'sending', attempts = attempts + 1, updated_at = $2, lease = $3
                         FROM hr_deliveries d
                         WHERE t.id = (SELECT id FROM hr_triggers WHERE id = $1 AND state IN ('queued', 'sending')
                                       FOR UPDATE SKIP LOCKED)
                           AND d.id = t.delivery
                         RETURNING t.id, t.delivery, d.delivery_id, d.source, t.rule, t.upstream, t.project, t.git_ref,
                                   t.token_ref, t.variables, t.inputs, t.attempts, t.created_at, t.lease, t.kind,
                                   t.pipeline_id, t.status_target IS NOT NULL
                     ), leased AS (
                         UPDATE hr_keys SET due_at = NULL, lease_until = $5
                         WHERE order_key = $4 AND EXISTS (SELECT 1 FROM taken)
                     )
                     SELECT * FROM taken",
                )?;
                let token = fastrand::i64(1..);
                let until = now + self.lease_ms;
                let Some(row) = self
                    .client()
                    .query_opt(&take, &[&head, &now, &token, &order_key, &until])?
                else {
                    let state = self.stmt("SELECT state FROM hr_triggers WHERE id = $1")?;
                    let open = self
                        .client()
                        .query_opt(&state, &[&head])?
                        .is_some_and(|row| matches!(row.get::<_, &str>(0), "queued" | "sending"));
                    if !open {
                        // Its outcome was recorded after the key fell due: move on.
                        self.touch(&order_key, Touch::Advance);
                    }
                    continue;
                };
                let attempts: i32 = row.get(11);
                due.push(DueTrigger {
                    id: row.get(0),
                    kind: super::WorkKind::parse(row.get(14)),
                    pipeline_id: row.get(15),
                    lease: Lease {
                        trigger: row.get(0),
                        token: row.get(13),
                        reports_status: row.get(16),
                    },
                    delivery_row: row.get(1),
                    delivery_id: row.get(2),
                    source: row.get(3),
                    rule: row.get(4),
                    upstream: row.get(5),
                    project: row.get(6),
                    git_ref: row.get(7),
                    token_ref: row.get(8),
                    variables: serde_json::from_str(row.get(9)).unwrap_or_default(),
                    inputs: serde_json::from_str(row.get(10)).unwrap_or_default(),
                    attempts: i64::from(attempts) - 1,
                    created_at: row.get(12),
                });
            }
            let next = self.stmt("SELECT min(due_at) FROM hr_keys WHERE due_at IS NOT NULL")?;
            let next_due: Option<i64> = self.client().query_one(&next, &[])?.get(0);
            Ok(Claimed {
                due,
                next_due: next_due.map(|due| due - self.skew_ms),
            })
        })()
        .map_err(error)
    }

    fn record(&mut self, lease: Lease, recorded: &Recorded, now: i64) -> Result<bool, EngineError> {
        let now = now + self.skew_ms;
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

    fn replay(&mut self, target: &ReplayTarget, now: i64) -> Result<Vec<i64>, EngineError> {
        let now = now + self.skew_ms;
        let rows = match target {
            ReplayTarget::Trigger(id) => self
                .client()
                .query(
                    "SELECT id, state, token_ref, order_key FROM hr_triggers WHERE id = $1",
                    &[id],
                )
                .map_err(error)?,
            ReplayTarget::Delivery(delivery) => self
                .client()
                .query(
                    "SELECT t.id, t.state, t.token_ref, t.order_key FROM hr_triggers t
                     JOIN hr_deliveries d ON d.id = t.delivery
                     WHERE d.delivery_id = $1 AND t.replay_of IS NULL AND t.kind = 'trigger' ORDER BY t.id",
                    &[delivery],
                )
                .map_err(error)?,
        };
        if rows.is_empty() {
            return Err(EngineError::refused(format!(
                "{target} is not in the store"
            )));
        }
        let mut new_ids = Vec::new();
        for row in rows {
            let (id, state, token_ref, order_key): (i64, String, String, String) =
                (row.get(0), row.get(1), row.get(2), row.get(3));
            if let Some(refusal) = super::replay_refusal(id, &state, &token_ref) {
                return Err(refusal);
            }
            let new_id: i64 = self
                .client()
                .query_one(
                    "INSERT INTO hr_triggers (delivery, rule, upstream, project, git_ref, token_ref, variables, inputs,
                                              order_key, state, created_at, due_at, updated_at, replay_of,
                                              kind, status_target, pipeline_id)
                     SELECT delivery, rule, upstream, project, git_ref, token_ref, variables, inputs, order_key,
                            'queued', $2, $2, $2, $1, kind, status_target,
                            CASE WHEN kind = 'trigger' THEN NULL ELSE pipeline_id END
                     FROM hr_triggers WHERE id = $1 RETURNING id",
                    &[&id, &now],
                )
                .map_err(error)?
                .get(0);
            self.touch(
                &order_key,
                Touch::Enqueue {
                    id: new_id,
                    due_at: now,
                },
            );
            self.open_change += 1;
            new_ids.push(new_id);
        }
        Ok(new_ids)
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
            let delete = self.stmt("DELETE FROM hr_deliveries WHERE id = ANY($1)")?;
            let deleted = self.client().execute(&delete, &[&finished])? as usize;
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

    /// Nothing to do at start: another relay may hold leases now, and a lease of a relay
    /// that died is free once it expires (a claim takes it over then).
    fn recover_leases(&mut self) -> Result<usize, EngineError> {
        Ok(0)
    }

    fn depth(&mut self) -> Result<Depth, EngineError> {
        self.reconnect_if_lost()?;
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
        self.reconnect_if_lost()?;
        // Times are kept on the database's clock; the filter's are this machine's.
        let skew = self.skew_ms;
        let filter = ListFilter {
            since: filter.since.map(|at| at + skew),
            until: filter.until.map(|at| at + skew),
            before: filter.before.map(|(at, row)| (at + skew, row)),
            ..filter.clone()
        };
        let (clause, values) = filter.where_clause(|n| format!("${n}"), "strpos");
        let limit_at = values.len() + 1;
        let sql = format!(
            "SELECT d.received_at, d.source, d.delivery_id, d.event_type, t.id, t.rule, t.project, t.git_ref, t.state,
                    t.attempts, t.last_status, t.last_error, t.pipeline_url, t.replay_of, t.coalesced_into,
                    t.due_at, d.summary, t.kind, d.id
             FROM hr_deliveries d LEFT JOIN hr_triggers t ON t.delivery = d.id {clause}
             ORDER BY d.received_at DESC, d.id DESC, t.id DESC LIMIT ${limit_at}"
        );
        let mut bound: Vec<Box<dyn postgres::types::ToSql + Sync>> = values
            .into_iter()
            .map(|value| -> Box<dyn postgres::types::ToSql + Sync> {
                match value {
                    SqlValue::Text(text) => Box::new(text),
                    SqlValue::Int(n) => Box::new(n),
                }
            })
            .collect();
        bound.push(Box::new(filter.limit as i64));
        let params: Vec<&(dyn postgres::types::ToSql + Sync)> =
            bound.iter().map(|value| value.as_ref()).collect();
        let rows = self.client().query(&sql, &params).map_err(error)?;
        // Times are the database's; shown on this machine's clock.
        Ok(rows
            .into_iter()
            .map(|row| DeliveryRow {
                received_at: row.get::<_, i64>(0) - skew,
                source: row.get(1),
                delivery_id: row.get(2),
                event_type: row.get(3),
                trigger_id: row.get(4),
                rule: row.get(5),
                project: row.get(6),
                git_ref: row.get(7),
                state: row.get(8),
                attempts: row.get::<_, Option<i32>>(9).map_or(0, i64::from),
                last_status: row.get::<_, Option<i32>>(10).map(i64::from),
                last_error: row.get(11),
                pipeline_url: row.get(12),
                replay_of: row.get(13),
                coalesced_into: row.get(14),
                due_at: row.get::<_, Option<i64>>(15).map(|due| due - skew),
                summary: row.get(16),
                kind: row.get(17),
                row: row.get(18),
            })
            .collect())
    }

    fn cancel(&mut self, target: &CancelTarget, now: i64) -> Result<Vec<i64>, EngineError> {
        let now = now + self.skew_ms;
        let (state, note) = target.outcome();
        let rows = match target {
            CancelTarget::Trigger(id) => {
                let row = self
                    .client()
                    .query_opt(
                        "UPDATE hr_triggers SET state = 'cancelled', last_error = $3, updated_at = $2
                         WHERE id = $1 AND state = 'queued' RETURNING id, order_key",
                        &[id, &now, &note],
                    )
                    .map_err(error)?;
                if row.is_none() {
                    let state: Option<String> = self
                        .client()
                        .query_opt("SELECT state FROM hr_triggers WHERE id = $1", &[id])
                        .map_err(error)?
                        .map(|row| row.get(0));
                    return Err(super::cancel_refusal(*id, state.as_deref()));
                }
                row.into_iter().collect()
            }
            CancelTarget::Project { project, upstream } => self
                .client()
                .query(
                    "UPDATE hr_triggers SET state = 'cancelled', last_error = $4, updated_at = $3
                     WHERE state = 'queued' AND project = $1 AND ($2::text IS NULL OR upstream = $2)
                       AND kind = 'trigger'
                     RETURNING id, order_key",
                    &[project, upstream, &now, &note],
                )
                .map_err(error)?,
            CancelTarget::Superseded { order_key } => self
                .client()
                .query(
                    "UPDATE hr_triggers SET state = $3, last_error = $4, updated_at = $2
                     WHERE order_key = $1 AND state = 'queued' AND kind = 'status'
                     RETURNING id, order_key",
                    &[order_key, &now, &state, &note],
                )
                .map_err(error)?,
        };
        let mut cancelled = Vec::new();
        for row in rows {
            let (id, order_key): (i64, String) = (row.get(0), row.get(1));
            self.open_change -= 1;
            self.touch(&order_key, Touch::Cancelled { trigger: id });
            cancelled.push(id);
        }
        cancelled.sort_unstable();
        Ok(cancelled)
    }

    fn queue_work(
        &mut self,
        delivery_row: i64,
        work: &[super::NewTrigger],
        now: i64,
    ) -> Result<Vec<i64>, EngineError> {
        let now = now + self.skew_ms;
        self.insert_work(delivery_row, work, now)
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
        Ok(row.map(|row| super::PipelineOrigin {
            trigger_id: row.get(0),
            delivery_row: row.get(1),
            rule: row.get(2),
            upstream: row.get(3),
            project: row.get(4),
            status_target: row.get(5),
            pipeline_url: row.get(6),
        }))
    }

    fn newest_status(
        &mut self,
        order_key: &str,
        pipeline_id: i64,
    ) -> Result<Option<String>, EngineError> {
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

    fn stored_webhook(&mut self, delivery_id: &str) -> Result<Option<StoredWebhook>, EngineError> {
        let row = self
            .client()
            .query_opt(
                "SELECT source, headers, body, body_encoding FROM hr_deliveries WHERE delivery_id = $1
                 ORDER BY id DESC LIMIT 1",
                &[&delivery_id],
            )
            .map_err(error)?;
        row.map(|row| {
            let headers: String = row.get(1);
            let encoding: Option<String> = row.get(3);
            Ok(StoredWebhook {
                delivery_id: delivery_id.to_owned(),
                source: row.get(0),
                headers: serde_json::from_str(&headers)
                    .map_err(|err| EngineError::failed(format!("stored headers: {err}")))?,
                body: bytes::Bytes::from(
                    StoredBody::decode(row.get(2), encoding.as_deref())
                        .map_err(EngineError::failed)?,
                ),
            })
        })
        .transpose()
    }
}

#[cfg(test)]
pub(crate) mod test_server;

#[cfg(test)]
mod tests {
    /// A relay that dies or freezes holding a key: after the lease another claim takes the
    /// trigger over, and the first holder's late outcome changes nothing.
    #[test]
    fn an_expired_lease_is_taken_over_and_the_old_holder_is_fenced_out() {
        use crate::store::{Engine, Recorded};
        let Some(database) = super::test_server::Database::create() else {
            return;
        };
        let mut engine = super::PostgresEngine::open(&super::PostgresConfig::new(&database.url))
            .unwrap()
            .with_lease(std::time::Duration::from_millis(1000))
            .with_callers_clock();
        let tx = |engine: &mut super::PostgresEngine| engine.begin(true).unwrap();
        tx(&mut engine);
        engine
            .insert_delivery(
                &crate::store::semantics::delivery(
                    "a",
                    vec![crate::store::semantics::trigger("p")],
                ),
                0,
            )
            .unwrap();
        engine.commit().unwrap();
        tx(&mut engine);
        let first = engine.claim(0, 8).unwrap().due.remove(0);
        engine.commit().unwrap();
        tx(&mut engine);
        assert!(engine.claim(999, 8).unwrap().due.is_empty(), "still leased");
        let second = engine.claim(1001, 8).unwrap().due.remove(0);
        engine.commit().unwrap();
        assert_eq!(second.id, first.id);
        assert_ne!(second.lease, first.lease);
        let sent = Recorded::Sent {
            status: 201,
            pipeline_id: None,
            pipeline_url: None,
        };
        tx(&mut engine);
        assert!(
            !engine.record(first.lease, &sent, 1002).unwrap(),
            "fenced out"
        );
        assert!(engine.record(second.lease, &sent, 1003).unwrap());
        engine.commit().unwrap();
        assert_eq!(engine.depth().unwrap().open, 0);
    }

    /// An engine on a throwaway database (dropped with the first), on the caller's clock.
    fn on_new_database() -> Option<(super::test_server::Database, super::PostgresEngine)> {
        let database = super::test_server::Database::create()?;
        let engine = super::PostgresEngine::open(&super::PostgresConfig::new(&database.url))
            .unwrap()
            .with_callers_clock();
        Some((database, engine))
    }

    /// Bodies arrive compressed (LZ4): PostgreSQL neither compresses them again nor moves
    /// a webhook-sized row's body to the TOAST table.
    #[test]
    fn bodies_are_not_compressed_again_and_small_rows_stay_whole() {
        use crate::store::semantics::delivery;
        use crate::store::{Engine, StoredBody};
        let Some((_database, mut engine)) = on_new_database() else {
            return;
        };
        // Bytes LZ4 cannot shrink, as a compressed body looks to PostgreSQL: 3 KB (a
        // typical webhook's) and 40 KB.
        let noise = |len: usize| -> bytes::Bytes {
            let mut rng = fastrand::Rng::with_seed(7);
            (0..len).map(|_| rng.u8(..)).collect::<Vec<u8>>().into()
        };
        let mut small = delivery("small", vec![]);
        small.body = StoredBody::encode(noise(3_000));
        let mut large = delivery("large", vec![]);
        large.body = StoredBody::encode(noise(40_000));
        engine.begin(true).unwrap();
        let refs = [&small, &large];
        engine.insert_deliveries(&refs, 0).unwrap().unwrap();
        engine.commit().unwrap();
        let rows = engine
            .client()
            .query(
                "SELECT delivery_id, pg_column_compression(body), pg_column_size(body) FROM hr_deliveries
                 ORDER BY delivery_id",
                &[],
            )
            .unwrap();
        let seen: Vec<(String, Option<String>, i32)> = rows
            .iter()
            .map(|row| (row.get(0), row.get(1), row.get(2)))
            .collect();
        assert_eq!(
            seen,
            [
                ("large".to_owned(), None, 40_000),
                ("small".to_owned(), None, 3_000 + 4)
            ]
        );
        // Only the large body went out of line (in the TOAST table, as one value).
        let toast_table: String = engine
            .client()
            .query_one(
                "SELECT reltoastrelid::regclass::text FROM pg_class WHERE relname = 'hr_deliveries'",
                &[],
            )
            .unwrap()
            .get(0);
        let chunks: i64 = engine
            .client()
            .query_one(
                &format!("SELECT count(DISTINCT chunk_id) FROM {toast_table}"),
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(chunks, 1, "one body out of line");
        // And both come back byte for byte.
        for (id, sent) in [("small", &small), ("large", &large)] {
            let stored = engine.stored_webhook(id).unwrap().unwrap();
            assert_eq!(stored.body, sent.body.bytes, "{id}");
        }
    }

    /// A group's webhooks in a few statements: the same answers, ids and order as one
    /// by one, duplicates (earlier, and within the batch) included.
    #[test]
    fn webhooks_recorded_together_answer_as_one_by_one() {
        use crate::store::semantics::{delivery, trigger};
        use crate::store::{Accepted, Engine};
        let Some((_database, mut engine)) = on_new_database() else {
            return;
        };
        engine.begin(true).unwrap();
        engine
            .insert_delivery(&delivery("old", vec![trigger("p")]), 0)
            .unwrap();
        engine.commit().unwrap();
        let batch = [
            delivery("a", vec![trigger("p"), trigger("q")]),
            delivery("old", vec![trigger("p")]),
            delivery("b", vec![]),
            delivery("a", vec![trigger("p")]),
            delivery("c", vec![trigger("p")]),
        ];
        let refs: Vec<&crate::store::NewDelivery> = batch.iter().collect();
        engine.begin(true).unwrap();
        let answers = engine.insert_deliveries(&refs, 1).unwrap().unwrap();
        engine.commit().unwrap();
        let Accepted::Queued { trigger_ids: a, .. } = &answers[0] else {
            panic!("{answers:?}")
        };
        assert_eq!(a.len(), 2);
        assert!(
            matches!(answers[1], Accepted::Duplicate { .. }),
            "{answers:?}"
        );
        assert!(
            matches!(&answers[2], Accepted::Queued { trigger_ids, .. } if trigger_ids.is_empty())
        );
        assert!(
            matches!(answers[3], Accepted::Duplicate { .. }),
            "{answers:?}"
        );
        let Accepted::Queued { trigger_ids: c, .. } = &answers[4] else {
            panic!("{answers:?}")
        };
        assert!(a[0] < a[1] && a[1] < c[0]);
        assert_eq!(engine.depth().unwrap().open, 4);
        // Key p: old, then a, then c — in the order accepted.
        let mut sent = Vec::new();
        for _ in 0..4 {
            engine.begin(false).unwrap();
            let due = engine.claim(10, 8).unwrap().due;
            engine.commit().unwrap();
            engine.begin(false).unwrap();
            for trigger in &due {
                sent.push((trigger.project.clone(), trigger.delivery_id.clone()));
                engine
                    .record(
                        trigger.lease,
                        &crate::store::Recorded::Sent {
                            status: 201,
                            pipeline_id: None,
                            pipeline_url: None,
                        },
                        11,
                    )
                    .unwrap();
            }
            engine.commit().unwrap();
        }
        let p: Vec<&str> = sent
            .iter()
            .filter(|(p, _)| p == "p")
            .map(|(_, d)| d.as_str())
            .collect();
        assert_eq!(p, ["old", "a", "c"]);
        assert_eq!(sent.len(), 4);
    }

    /// `sslmode=require` with the server's CA in `ca_file`: the session is encrypted; the
    /// same without the CA is refused, naming the problem.
    #[test]
    fn tls_to_the_database_with_rustls() {
        let Some(server) = super::test_server::Server::own() else {
            return;
        };
        let issued = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        server.enable_tls(&issued.cert.pem(), &issued.key_pair.serialize_pem());
        let database = server.database();
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("db-ca.pem");
        std::fs::write(&ca, issued.cert.pem()).unwrap();
        let url = database
            .url
            .replace("127.0.0.1", "localhost")
            .replace("postgres@", "postgres:unused-password@")
            + "?sslmode=require";
        let mut config = super::PostgresConfig::new(&url);
        config.ca_file = Some(ca);
        let mut client = config.connect().unwrap();
        let encrypted: bool = client
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .unwrap()
            .get(0);
        assert!(encrypted);
        drop(client);
        config.ca_file = None;
        let refused = config.connect().err().unwrap();
        assert!(refused.message.contains("certificate"), "{refused}");
        assert!(!refused.message.contains("unused-password"), "{refused}");
        assert!(
            refused.message.contains("postgres:…@localhost"),
            "{refused}"
        );
    }

    #[test]
    fn a_database_that_does_not_wait_for_the_disk_is_refused() {
        let Some(database) = super::test_server::Database::create() else {
            return;
        };
        let name = database.url.rsplit('/').next().unwrap().to_owned();
        let mut admin = postgres::Client::connect(&database.url, postgres::NoTls).unwrap();
        admin
            .batch_execute(&format!(
                "ALTER DATABASE {name} SET synchronous_commit = off"
            ))
            .unwrap();
        let refused = super::PostgresEngine::open(&super::PostgresConfig::new(&database.url))
            .err()
            .unwrap();
        assert!(refused.refused, "{refused}");
        assert!(
            refused.message.contains("synchronous_commit is \"off\""),
            "{refused}"
        );
    }

    mod semantics {
        fn make() -> Option<(
            super::super::test_server::Database,
            super::super::PostgresEngine,
        )> {
            let database = super::super::test_server::Database::create()?;
            let engine = super::super::PostgresEngine::open(&super::super::PostgresConfig::new(
                &database.url,
            ))
            .unwrap()
            .with_callers_clock();
            Some((database, engine))
        }

        crate::engine_semantics!(make);
    }
}
