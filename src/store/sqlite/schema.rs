//! The embedded engine's tables, as the list of migrations that builds them: a relay brings
//! the store up to its version when it opens it (`PRAGMA user_version` counts them).

use rusqlite::{Connection, OptionalExtension, params};

use super::error;
use crate::store::EngineError;

/// Each entry upgrades the schema by one version (`PRAGMA user_version`). Never edit one
/// that has shipped; add another.
pub(super) const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE deliveries (
    id INTEGER PRIMARY KEY,
    source TEXT NOT NULL,
    delivery_id TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    event_type TEXT NOT NULL,
    headers TEXT NOT NULL,
    body BLOB NOT NULL,
    summary TEXT NOT NULL,
    UNIQUE (source, delivery_id)
);
CREATE TABLE triggers (
    id INTEGER PRIMARY KEY,
    delivery INTEGER NOT NULL REFERENCES deliveries(id) ON DELETE CASCADE,
    rule TEXT NOT NULL,
    upstream TEXT NOT NULL,
    project TEXT NOT NULL,
    git_ref TEXT NOT NULL,
    token_ref TEXT NOT NULL,
    variables TEXT NOT NULL,
    inputs TEXT NOT NULL,
    order_key TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    due_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    last_status INTEGER,
    last_error TEXT,
    pipeline_id INTEGER,
    pipeline_url TEXT,
    replay_of INTEGER
);
CREATE INDEX triggers_due ON triggers (state, due_at);
CREATE INDEX triggers_order ON triggers (order_key, id);
CREATE INDEX triggers_delivery ON triggers (delivery);
CREATE INDEX deliveries_received ON deliveries (received_at);
"#,
    r#"
ALTER TABLE triggers ADD COLUMN coalesce_key TEXT;
ALTER TABLE triggers ADD COLUMN coalesced_into INTEGER;
CREATE INDEX triggers_coalesce ON triggers (coalesce_key, state);
"#,
    // The per-key queue: claims read due keys only, and counts are kept, not counted.
    r#"
ALTER TABLE triggers ADD COLUMN lease INTEGER;
CREATE TABLE queue_keys (
    order_key TEXT PRIMARY KEY,
    head INTEGER NOT NULL,
    due_at INTEGER
) WITHOUT ROWID;
CREATE INDEX queue_keys_due ON queue_keys (due_at) WHERE due_at IS NOT NULL;
CREATE TABLE outbox_stats (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    open INTEGER NOT NULL,
    probed_at INTEGER
);
DROP INDEX triggers_due;
DROP INDEX triggers_order;
DROP INDEX triggers_coalesce;
CREATE INDEX triggers_open ON triggers (order_key, id) WHERE state IN ('queued', 'sending');
CREATE INDEX triggers_coalesce ON triggers (coalesce_key) WHERE coalesce_key IS NOT NULL;
INSERT INTO outbox_stats (id, open)
    SELECT 1, count(*) FROM triggers WHERE state IN ('queued', 'sending');
INSERT INTO queue_keys (order_key, head)
    SELECT order_key, min(id) FROM triggers WHERE state IN ('queued', 'sending') GROUP BY order_key;
UPDATE queue_keys SET due_at = (SELECT t.due_at FROM triggers t WHERE t.id = queue_keys.head);
UPDATE triggers SET state = 'queued' WHERE state = 'sending';
"#,
    // Bodies compressed (LZ4, size prepended): a webhook's JSON shrinks four to five times,
    // and so does what every acknowledgement writes and every checkpoint copies.
    r#"
ALTER TABLE deliveries ADD COLUMN body_encoding TEXT;
"#,
    // Status posts and polls are queued work beside triggers; a pipeline is found by the
    // trigger that started it, and a status key's newest post without reading the others.
    r#"
ALTER TABLE triggers ADD COLUMN kind TEXT NOT NULL DEFAULT 'trigger';
ALTER TABLE triggers ADD COLUMN status_target TEXT;
CREATE INDEX triggers_pipeline ON triggers (upstream, pipeline_id) WHERE pipeline_id IS NOT NULL AND kind = 'trigger';
CREATE INDEX triggers_statuses ON triggers (order_key, id) WHERE kind = 'status';
"#,
    // The dashboard's pages of one source, newest first, without reading the others.
    r#"
CREATE INDEX deliveries_source_received ON deliveries (source, received_at);
"#,
    // A coalescing twin is looked for among waiting triggers only: the index of every
    // trigger ever coalesced made each new one read its key's whole history.
    r#"
DROP INDEX triggers_coalesce;
CREATE INDEX triggers_coalescing ON triggers (coalesce_key, id) WHERE state = 'queued' AND coalesce_key IS NOT NULL;
"#,
    // The latest time the writer saw on the clock, noted once a second: a clock set back
    // is noticed, and the waiting deadlines moved back with it (`outbox::clock`).
    r#"
ALTER TABLE outbox_stats ADD COLUMN clock_noted INTEGER;
"#,
    // The oldest schema version whose relays may still run on this store (see
    // `OLDEST_COMPATIBLE`): an older relay (a deployment rolled back) refuses to start on
    // a store a newer one migrated, instead of running on tables it does not know.
    r#"
CREATE TABLE schema_floor (id INTEGER PRIMARY KEY CHECK (id = 1), floor INTEGER NOT NULL);
"#,
    // A pipeline's statuses go to the commits of the triggers coalesced into its trigger
    // too: they are found by the trigger they went into (only coalesced rows are indexed).
    r#"
CREATE INDEX triggers_coalesced_into ON triggers (coalesced_into) WHERE coalesced_into IS NOT NULL;
"#,
];

/// The oldest schema version whose relays can still run on a store this relay migrated,
/// written into the store at every start. It is this relay's own version unless the
/// migrations since an older one were written so that relays knowing only that one keep
/// working (columns with defaults, new tables and indexes they never need): then lower
/// it to that version, and say why here.
///
/// The last migration only adds an index that relays of the version before never need:
/// they may run on a store this one migrated.
pub(super) const OLDEST_COMPATIBLE: usize = MIGRATIONS.len() - 1;

/// Brings the store up to this relay's schema, or refuses one a newer relay migrated
/// past what this one may run on.
pub(super) fn migrate(conn: &mut Connection) -> Result<(), EngineError> {
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(error)?;
    if version > MIGRATIONS.len() as i64 {
        // Written by a newer relay: run on it only where that one said older relays may.
        let floor: Option<i64> = conn
            .query_row("SELECT floor FROM schema_floor", [], |row| row.get(0))
            .ok();
        return crate::store::newer_schema(version, floor, MIGRATIONS.len());
    }
    apply_migrations(conn, version).map_err(error)?;
    // Written only when it rises: a store opened to be read (a copy on a read-only
    // mount) is not written.
    let floor = OLDEST_COMPATIBLE as i64;
    let written: Option<i64> = conn
        .query_row("SELECT floor FROM schema_floor", [], |row| row.get(0))
        .optional()
        .map_err(error)?;
    if written.is_none_or(|written| written < floor) {
        conn.execute(
            "INSERT INTO schema_floor (id, floor) VALUES (1, ?1)
             ON CONFLICT (id) DO UPDATE SET floor = max(floor, excluded.floor)",
            params![floor],
        )
        .map_err(error)?;
    }
    Ok(())
}

fn apply_migrations(conn: &mut Connection, version: i64) -> rusqlite::Result<()> {
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        // Another process may have migrated while this one waited for the lock.
        let now: i64 = tx.query_row("PRAGMA user_version", [], |row| row.get(0))?;
        if now > i as i64 {
            continue;
        }
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}
