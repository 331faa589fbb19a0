//! The shared engine's tables, as the list of migrations that builds them: a relay brings
//! the database up to its version when it starts (`PostgresEngine::open`).

use postgres::Client;

use super::error;
use crate::store::EngineError;

/// Each entry upgrades the schema by one version; run under an advisory lock, so relays
/// starting together migrate once.
pub(super) const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE hr_deliveries (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source text NOT NULL,
    delivery_id text NOT NULL,
    received_at bigint NOT NULL,
    event_type text NOT NULL,
    headers text NOT NULL,
    body bytea NOT NULL,
    body_encoding text,
    summary text NOT NULL,
    UNIQUE (source, delivery_id)
);
CREATE INDEX hr_deliveries_received ON hr_deliveries (received_at);
CREATE INDEX hr_deliveries_delivery_id ON hr_deliveries (delivery_id);
CREATE TABLE hr_triggers (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery bigint NOT NULL REFERENCES hr_deliveries (id) ON DELETE CASCADE,
    rule text NOT NULL,
    upstream text NOT NULL,
    project text NOT NULL,
    git_ref text NOT NULL,
    token_ref text NOT NULL,
    variables text NOT NULL,
    inputs text NOT NULL,
    order_key text NOT NULL,
    state text NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    created_at bigint NOT NULL,
    due_at bigint NOT NULL,
    updated_at bigint NOT NULL,
    last_status integer,
    last_error text,
    pipeline_id bigint,
    pipeline_url text,
    replay_of bigint,
    coalesce_key text,
    coalesced_into bigint,
    lease bigint
);
CREATE INDEX hr_triggers_open ON hr_triggers (order_key, id) WHERE state IN ('queued', 'sending');
CREATE INDEX hr_triggers_delivery ON hr_triggers (delivery);
CREATE INDEX hr_triggers_coalesce ON hr_triggers (coalesce_key) WHERE coalesce_key IS NOT NULL;
CREATE TABLE hr_keys (
    order_key text PRIMARY KEY,
    head bigint NOT NULL,
    due_at bigint
);
CREATE INDEX hr_keys_due ON hr_keys (due_at) WHERE due_at IS NOT NULL;
CREATE TABLE hr_stats (
    id integer PRIMARY KEY CHECK (id = 1),
    open bigint NOT NULL,
    probed_at bigint
);
INSERT INTO hr_stats (id, open) VALUES (1, 0);
"#,
    // Leases that expire: a relay that dies or freezes holding a key gives it up after
    // `lease`, and its late outcome is fenced out by the claim token.
    r#"
ALTER TABLE hr_keys ADD COLUMN lease_until bigint;
CREATE INDEX hr_keys_leased ON hr_keys (lease_until) WHERE due_at IS NULL;
"#,
    // The count of unfinished triggers, spread over rows: one row updated by every commit
    // of every relay would make their commits wait for each other.
    r#"
CREATE TABLE hr_open (shard integer PRIMARY KEY, open bigint NOT NULL);
INSERT INTO hr_open (shard, open) SELECT s, CASE WHEN s = 0 THEN (SELECT open FROM hr_stats WHERE id = 1) ELSE 0 END
  FROM generate_series(0, 15) AS s;
"#,
    super::limits::SCHEMA,
    // Where the search for a key's next head starts (see `advance_key`).
    r#"
ALTER TABLE hr_keys ADD COLUMN floor bigint;
UPDATE hr_keys SET floor = (SELECT min(id) FROM hr_triggers t
                            WHERE t.order_key = hr_keys.order_key AND t.state IN ('queued', 'sending'));
UPDATE hr_keys SET floor = head WHERE floor IS NULL;
ALTER TABLE hr_keys ALTER COLUMN floor SET NOT NULL;
"#,
    // The queue's small, hot tables are rewritten at every claim and outcome: vacuum them
    // after a fixed number of changes, not a fraction of their (tiny) size.
    r#"
ALTER TABLE hr_keys SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 500,
                         autovacuum_vacuum_cost_delay = 0);
ALTER TABLE hr_open SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 500,
                         autovacuum_vacuum_cost_delay = 0);
ALTER TABLE hr_limits SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 500,
                           autovacuum_vacuum_cost_delay = 0);
"#,
    // Status posts and polls are queued work beside triggers; a pipeline is found by the
    // trigger that started it, and a status key's newest post without reading the others.
    r#"
ALTER TABLE hr_triggers ADD COLUMN kind text NOT NULL DEFAULT 'trigger';
ALTER TABLE hr_triggers ADD COLUMN status_target text;
CREATE INDEX hr_triggers_pipeline ON hr_triggers (upstream, pipeline_id) WHERE pipeline_id IS NOT NULL AND kind = 'trigger';
CREATE INDEX hr_triggers_statuses ON hr_triggers (order_key, id) WHERE kind = 'status';
"#,
    // The dashboard's pages of one source, newest first, without reading the others.
    r#"
CREATE INDEX hr_deliveries_source_received ON hr_deliveries (source, received_at);
"#,
    // A coalescing twin is looked for among waiting triggers only: the index of every
    // trigger ever coalesced made each new one read its key's whole history.
    r#"
DROP INDEX hr_triggers_coalesce;
CREATE INDEX hr_triggers_coalescing ON hr_triggers (coalesce_key, id) WHERE state = 'queued' AND coalesce_key IS NOT NULL;
"#,
    // A body is stored compressed already (LZ4): PostgreSQL's own compression of it only
    // spent time failing (a tenth of the database's CPU under load), and moving a 3 KB row's
    // body to the TOAST table cost two more rows and index entries per webhook. Rows up
    // to a page stay whole; a larger body goes out of line uncompressed.
    r#"
ALTER TABLE hr_deliveries ALTER COLUMN body SET STORAGE EXTERNAL;
ALTER TABLE hr_deliveries SET (toast_tuple_target = 8160);
"#,
    super::limits::PLANNED_ONCE,
    // A delivery is found by its id alone through the (source, delivery_id) index, one
    // source at a time (`BY_DELIVERY_ID`): an index of the id alone cost every webhook one
    // more index entry to write, at a random place for senders' random ids.
    r#"
DROP INDEX IF EXISTS hr_deliveries_delivery_id;
"#,
    // The foreign key from a trigger to its delivery checked every new trigger with a
    // query of its own and locked its delivery's row (a WAL record more): 13 % of the
    // database's CPU per webhook, for a delivery inserted by the same statement. What it
    // guarded is kept where it can matter: a trigger added to a stored delivery (a replay,
    // a status post) locks the delivery as the key did, and pruning deletes a delivery's
    // triggers with it, under a lock (`PostgresEngine::prune`, `lock_delivery`).
    r#"
ALTER TABLE hr_triggers DROP CONSTRAINT IF EXISTS hr_triggers_delivery_fkey;
"#,
    // The latest time each relay's writer saw on the database's clock, noted once a
    // second with its count: a clock set back is noticed, and the waiting deadlines
    // moved back with it (`outbox::clock`).
    r#"
ALTER TABLE hr_open ADD COLUMN clock_noted bigint;
"#,
    // The oldest schema version whose relays may still run on this database (see
    // `OLDEST_COMPATIBLE`): an older relay (one not yet upgraded that restarts, or a
    // deployment rolled back) refuses to start on tables a newer one changed.
    r#"
CREATE TABLE hr_schema_floor (id integer PRIMARY KEY CHECK (id = 1), floor integer NOT NULL);
"#,
    // What one relay read from elsewhere (GitHub's webhook addresses), for the others and
    // for its own next start.
    super::kept::SCHEMA,
    // A pipeline's statuses go to the commits of the triggers coalesced into its trigger
    // too: they are found by the trigger they went into (only coalesced rows are indexed).
    r#"
CREATE INDEX hr_triggers_coalesced_into ON hr_triggers (coalesced_into) WHERE coalesced_into IS NOT NULL;
"#,
];

/// The oldest schema version whose relays can still run on a database this relay
/// migrated, written into it at every start. It is this relay's own version unless the
/// migrations since an older one were written so that relays knowing only that one keep
/// working beside this one (columns with defaults, new tables and indexes they never
/// need): then lower it to that version, and say why here.
///
/// The last two migrations only add `hr_kept` and an index of coalesced triggers, which
/// relays of the version before them never read: they may run beside this one.
pub(super) const OLDEST_COMPATIBLE: usize = MIGRATIONS.len() - 2;

/// Brings the database up to this relay's schema under an advisory lock, or refuses one
/// a newer relay migrated past what this one may run on.
pub(super) fn migrate(client: &mut Client) -> Result<(), EngineError> {
    if is_up_to_date(client).map_err(error)? {
        return Ok(());
    }
    let mut tx = client.transaction().map_err(error)?;
    // One relay migrates; the others wait here, then find nothing left to do.
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('hookrelay:migrate'))",
        &[],
    )
    .map_err(error)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS hr_schema (version integer NOT NULL)")
        .map_err(error)?;
    let version: i64 = tx
        .query_one(
            "SELECT coalesce(max(version), 0)::bigint FROM hr_schema",
            &[],
        )
        .map_err(error)?
        .get(0);
    let known = MIGRATIONS.len();
    if version > known as i64 {
        // Written by a newer relay: run on it only where that one said older relays may.
        let floor = tx
            .query_opt("SELECT floor::bigint FROM hr_schema_floor", &[])
            .ok()
            .flatten()
            .map(|row| row.get::<_, i64>(0));
        return crate::store::newer_schema(version, floor, known);
    }
    (|| {
        for (i, sql) in MIGRATIONS
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
        tx.execute(
            "INSERT INTO hr_schema_floor (id, floor) VALUES (1, $1)
             ON CONFLICT (id) DO UPDATE SET floor = greatest(hr_schema_floor.floor, excluded.floor)",
            &[&(OLDEST_COMPATIBLE as i32)],
        )?;
        tx.commit()
    })()
    .map_err(error)
}

/// Whether the database's schema is this relay's, its floor written: then starting takes
/// no lock and writes nothing, so commands that only read (`deliveries`, `explain
/// --delivery`) work on a standby, and a relay pointed at one starts and waits for it to
/// take writes (see `READ_ONLY_RECONNECT`).
fn is_up_to_date(client: &mut Client) -> Result<bool, postgres::Error> {
    let row = client.query_one(
        "SELECT to_regclass('hr_schema') IS NOT NULL AND to_regclass('hr_schema_floor') IS NOT NULL",
        &[],
    )?;
    if !row.get::<_, bool>(0) {
        return Ok(false);
    }
    let row = client.query_one(
        "SELECT (SELECT coalesce(max(version), 0) FROM hr_schema)::bigint,
                (SELECT max(floor) FROM hr_schema_floor)::bigint",
        &[],
    )?;
    let (version, floor): (i64, Option<i64>) = (row.get(0), row.get(1));
    Ok(version == MIGRATIONS.len() as i64
        && floor.is_some_and(|floor| floor >= OLDEST_COMPATIBLE as i64))
}
