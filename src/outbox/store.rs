//! The on-disk store: SQLite in WAL mode, schema in versioned migrations.
//!
//! Plain functions over a connection or transaction; the writer thread (see `mod.rs`) is
//! the only code in the server that writes, so SQLite never sees two of our writers at once.
//! Tokens are never stored: a trigger keeps its token's reference (`env:NAME`), resolved
//! when it is sent. Headers are stored without signatures, tokens and credentials.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, Transaction, params};

use super::{Accepted, DeliveryRow, DueTrigger, NewDelivery, Recorded};

/// Each entry upgrades the schema by one version (`PRAGMA user_version`). Never edit one
/// that has shipped; add another.
const MIGRATIONS: &[&str] = &[
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
];

/// Milliseconds since 1970, the store's clock.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Opens (creating if needed) and migrates the store.
pub fn open(path: &Path) -> rusqlite::Result<Connection> {
    let mut conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    migrate(&mut conn)?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}

/// Records a delivery and its triggers, unless the source already delivered that id.
pub fn insert_delivery(
    tx: &Transaction<'_>,
    delivery: &NewDelivery,
    now: i64,
    check_duplicate: bool,
) -> rusqlite::Result<Accepted> {
    let existing: Option<i64> = if !check_duplicate {
        None
    } else {
        tx.prepare_cached("SELECT id FROM deliveries WHERE source = ?1 AND delivery_id = ?2")?
            .query_row(params![delivery.source, delivery.delivery_id], |row| {
                row.get(0)
            })
            .optional()?
    };
    if let Some(row) = existing {
        return Ok(Accepted::Duplicate { delivery_row: row });
    }
    let headers = serde_json::to_string(&delivery.headers).expect("headers serialize");
    tx.prepare_cached(
        "INSERT INTO deliveries (source, delivery_id, received_at, event_type, headers, body, summary)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
            delivery.source,
            delivery.delivery_id,
            now,
            delivery.event_type,
            headers,
            &delivery.body[..],
            delivery.summary.to_string()
        ])?;
    let delivery_row = tx.last_insert_rowid();
    let mut trigger_ids = Vec::with_capacity(delivery.triggers.len());
    let mut coalesced = Vec::with_capacity(delivery.triggers.len());
    for trigger in &delivery.triggers {
        let order_key = format!(
            "{}\u{1f}{}\u{1f}{}",
            trigger.upstream, trigger.project, trigger.git_ref
        );
        let variables = trigger.variables.to_string();
        let inputs = trigger.inputs.to_string();
        // Coalescing: an identical trigger still waiting in its window takes this one in.
        let coalesce_key = (trigger.coalesce_ms > 0 && trigger.done.is_none()).then(|| {
            format!(
                "{order_key}\u{1f}{}\u{1f}{variables}\u{1f}{inputs}",
                trigger.token_ref
            )
        });
        let into: Option<i64> = match &coalesce_key {
            None => None,
            Some(key) => tx
                .prepare_cached(
                    "SELECT id FROM triggers WHERE coalesce_key = ?1 AND state = 'queued' AND due_at > ?2
                     ORDER BY id LIMIT 1",
                )?
                .query_row(params![key, now], |row| row.get(0))
                .optional()?,
        };
        let (state, due_at) = match (&trigger.done, into) {
            (Some(_), _) => ("done", now),
            (None, Some(_)) => ("coalesced", now),
            (None, None) => ("queued", now + trigger.delay_ms + trigger.coalesce_ms),
        };
        tx.prepare_cached(
            "INSERT INTO triggers (delivery, rule, upstream, project, git_ref, token_ref, variables, inputs,
                                   order_key, state, created_at, due_at, updated_at, coalesce_key, coalesced_into)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?11, ?13, ?14)",
        )?
        .execute(params![
            delivery_row,
            trigger.rule,
            trigger.upstream,
            trigger.project,
            trigger.git_ref,
            trigger.token_ref,
            variables,
            inputs,
            order_key,
            state,
            now,
            due_at,
            coalesce_key,
            into
        ])?;
        let id = tx.last_insert_rowid();
        if let Some(done) = &trigger.done {
            record(tx, id, done, now)?;
        }
        trigger_ids.push(id);
        coalesced.push(into);
    }
    Ok(Accepted::Queued {
        delivery_row,
        trigger_ids,
        coalesced,
    })
}

/// Claims up to `limit` due triggers, oldest first, at most one per project and ref: a
/// trigger waits while an older one for the same project and ref is unfinished.
pub fn claim_due(
    tx: &Transaction<'_>,
    now: i64,
    limit: usize,
) -> rusqlite::Result<Vec<DueTrigger>> {
    let mut statement = tx.prepare_cached(
        "SELECT t.id, t.delivery, d.delivery_id, d.source, t.rule, t.upstream, t.project, t.git_ref,
                t.token_ref, t.variables, t.inputs, t.attempts, t.created_at
         FROM triggers t JOIN deliveries d ON d.id = t.delivery
         WHERE t.state = 'queued' AND t.due_at <= ?1
           AND NOT EXISTS (SELECT 1 FROM triggers o WHERE o.order_key = t.order_key AND o.id < t.id
                           AND o.state IN ('queued', 'sending'))
         ORDER BY t.due_at, t.id LIMIT ?2",
    )?;
    let due: Vec<DueTrigger> = statement
        .query_map(params![now, limit as i64], |row| {
            Ok(DueTrigger {
                id: row.get(0)?,
                delivery_row: row.get(1)?,
                delivery_id: row.get(2)?,
                source: row.get(3)?,
                rule: row.get(4)?,
                upstream: row.get(5)?,
                project: row.get(6)?,
                git_ref: row.get(7)?,
                token_ref: row.get(8)?,
                variables: serde_json::from_str(&row.get::<_, String>(9)?).unwrap_or_default(),
                inputs: serde_json::from_str(&row.get::<_, String>(10)?).unwrap_or_default(),
                attempts: row.get(11)?,
                created_at: row.get(12)?,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    for trigger in &due {
        tx.execute(
            "UPDATE triggers SET state = 'sending', attempts = attempts + 1, updated_at = ?2 WHERE id = ?1",
            params![trigger.id, now],
        )?;
    }
    Ok(due)
}

/// Records the outcome of an attempt.
pub fn record(
    tx: &Transaction<'_>,
    id: i64,
    recorded: &Recorded,
    now: i64,
) -> rusqlite::Result<()> {
    match recorded {
        Recorded::Sent { status, pipeline_id, pipeline_url } => tx.execute(
            "UPDATE triggers SET state = 'sent', last_status = ?2, last_error = NULL, pipeline_id = ?3,
                    pipeline_url = ?4, updated_at = ?5 WHERE id = ?1",
            params![id, status, pipeline_id, pipeline_url, now],
        ),
        Recorded::Retry { due_at, status, reason } => tx.execute(
            "UPDATE triggers SET state = 'queued', due_at = ?2, last_status = ?3, last_error = ?4, updated_at = ?5
             WHERE id = ?1",
            params![id, due_at, status, reason, now],
        ),
        Recorded::Failed { status, reason, pipeline_id, pipeline_url } => tx.execute(
            "UPDATE triggers SET state = 'failed', last_status = ?2, last_error = ?3, pipeline_id = ?4,
                    pipeline_url = ?5, updated_at = ?6 WHERE id = ?1",
            params![id, status, reason, pipeline_id, pipeline_url, now],
        ),
        Recorded::DryRun { would_send } => tx.execute(
            "UPDATE triggers SET state = 'dry-run', last_error = ?2, updated_at = ?3 WHERE id = ?1",
            params![id, would_send, now],
        ),
        Recorded::Deferred { due_at, reason } => tx.execute(
            "UPDATE triggers SET state = 'queued', due_at = ?2, last_error = ?3, attempts = max(attempts - 1, 0),
                    updated_at = ?4 WHERE id = ?1",
            params![id, due_at, reason, now],
        ),
        Recorded::Released => tx.execute(
            "UPDATE triggers SET state = 'queued', attempts = max(attempts - 1, 0), updated_at = ?2
             WHERE id = ?1 AND state = 'sending'",
            params![id, now],
        ),
    }
    .map(|_| ())
}

/// After a crash, triggers that were being sent are due again (at-least-once).
pub fn requeue_in_flight(conn: &Connection) -> rusqlite::Result<usize> {
    conn.execute(
        "UPDATE triggers SET state = 'queued' WHERE state = 'sending'",
        [],
    )
}

/// How many triggers wait or are being sent, and when the longest-due waiting one fell due.
pub fn depth(conn: &Connection, now: i64) -> rusqlite::Result<(i64, Option<i64>)> {
    conn.query_row(
        "SELECT count(*), (SELECT min(due_at) FROM triggers WHERE state = 'queued' AND due_at <= ?1)
         FROM triggers WHERE state IN ('queued', 'sending')",
        params![now],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )
}

/// When the next queued trigger is due, if any.
pub fn next_due(conn: &Connection) -> rusqlite::Result<Option<i64>> {
    conn.query_row(
        "SELECT min(due_at) FROM triggers WHERE state = 'queued'",
        [],
        |row| row.get(0),
    )
}

/// Queues again: a trigger by id, or every trigger of a delivery. Replays are new rows
/// (`replay_of` the original), so the record of earlier attempts stays. Returns the new ids.
pub fn replay(
    tx: &Transaction<'_>,
    target: &super::ReplayTarget,
    now: i64,
) -> Result<Vec<i64>, String> {
    let sql_error = |err: rusqlite::Error| err.to_string();
    let ids: Vec<(i64, String, String)> = match target {
        super::ReplayTarget::Trigger(id) => tx
            .query_row(
                "SELECT id, state, token_ref FROM triggers WHERE id = ?1",
                params![id],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
            )
            .optional()
            .map_err(sql_error)?
            .into_iter()
            .collect(),
        super::ReplayTarget::Delivery(delivery) => {
            let mut statement = tx
                .prepare(
                    "SELECT t.id, t.state, t.token_ref FROM triggers t JOIN deliveries d ON d.id = t.delivery
                     WHERE d.delivery_id = ?1 AND t.replay_of IS NULL ORDER BY t.id",
                )
                .map_err(sql_error)?;
            statement
                .query_map(params![delivery], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get(2)?))
                })
                .map_err(sql_error)?
                .collect::<rusqlite::Result<_>>()
                .map_err(sql_error)?
        }
    };
    if ids.is_empty() {
        return Err(format!("{target} is not in the store"));
    }
    let mut new_ids = Vec::new();
    for (id, state, token_ref) in ids {
        if state == "queued" || state == "sending" || state == "coalesced" {
            return Err(format!(
                "trigger {id} is still {state}; it will be sent without a replay"
            ));
        }
        if token_ref.starts_with(super::CALLER_TOKEN) {
            return Err(format!(
                "trigger {id} was a gateway call: the caller's token is not stored, so it cannot be sent again"
            ));
        }
        tx.execute(
            "INSERT INTO triggers (delivery, rule, upstream, project, git_ref, token_ref, variables, inputs,
                                   order_key, state, created_at, due_at, updated_at, replay_of)
             SELECT delivery, rule, upstream, project, git_ref, token_ref, variables, inputs, order_key,
                    'queued', ?2, ?2, ?2, ?1 FROM triggers WHERE id = ?1",
            params![id, now],
        )
        .map_err(sql_error)?;
        new_ids.push(tx.last_insert_rowid());
    }
    Ok(new_ids)
}

/// Deletes deliveries received before `before` whose triggers are all finished.
pub fn prune(tx: &Transaction<'_>, before: i64) -> rusqlite::Result<usize> {
    tx.execute(
        "DELETE FROM deliveries WHERE received_at < ?1 AND NOT EXISTS
           (SELECT 1 FROM triggers t WHERE t.delivery = deliveries.id AND t.state IN ('queued', 'sending'))",
        params![before],
    )
}

/// The newest triggers (and deliveries without any), newest first.
pub fn list(
    conn: &Connection,
    failed_only: bool,
    limit: usize,
) -> rusqlite::Result<Vec<DeliveryRow>> {
    let filter = if failed_only {
        "WHERE t.state = 'failed'"
    } else {
        ""
    };
    let sql = format!(
        "SELECT d.received_at, d.source, d.delivery_id, d.event_type, t.id, t.rule, t.project, t.git_ref, t.state,
                t.attempts, t.last_status, t.last_error, t.pipeline_url, t.replay_of, t.coalesced_into
         FROM deliveries d LEFT JOIN triggers t ON t.delivery = d.id {filter}
         ORDER BY d.received_at DESC, d.id DESC, t.id DESC LIMIT ?1"
    );
    let mut statement = conn.prepare(&sql)?;
    statement
        .query_map(params![limit as i64], |row| {
            Ok(DeliveryRow {
                received_at: row.get(0)?,
                source: row.get(1)?,
                delivery_id: row.get(2)?,
                event_type: row.get(3)?,
                trigger_id: row.get(4)?,
                rule: row.get(5)?,
                project: row.get(6)?,
                git_ref: row.get(7)?,
                state: row.get(8)?,
                attempts: row.get::<_, Option<i64>>(9)?.unwrap_or(0),
                last_status: row.get(10)?,
                last_error: row.get(11)?,
                pipeline_url: row.get(12)?,
                replay_of: row.get(13)?,
                coalesced_into: row.get(14)?,
            })
        })?
        .collect()
}

/// A stored webhook: its source, headers and body, for `explain --delivery`.
pub fn stored_webhook(
    conn: &Connection,
    delivery_id: &str,
) -> rusqlite::Result<Option<(String, String, Vec<u8>)>> {
    conn.query_row(
        "SELECT source, headers, body FROM deliveries WHERE delivery_id = ?1 ORDER BY id DESC LIMIT 1",
        params![delivery_id],
        |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
    )
    .optional()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::{NewTrigger, ReplayTarget};

    fn delivery(id: &str, project: &str) -> NewDelivery {
        NewDelivery {
            source: "gh".into(),
            delivery_id: id.into(),
            event_type: "push".into(),
            headers: vec![("x-github-event".into(), "push".into())],
            body: bytes::Bytes::from_static(b"{}"),
            summary: serde_json::json!({}),
            triggers: vec![NewTrigger {
                rule: "r".into(),
                upstream: "gitlab".into(),
                project: project.into(),
                git_ref: "main".into(),
                token_ref: "env:T".into(),
                variables: serde_json::json!({}),
                inputs: serde_json::json!({}),
                delay_ms: 0,
                coalesce_ms: 0,
                done: None,
            }],
        }
    }

    fn store() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let conn = open(&dir.path().join("s.sqlite3")).unwrap();
        (dir, conn)
    }

    #[test]
    fn migrations_run_once_and_reopen_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sqlite3");
        drop(open(&path).unwrap());
        let conn = open(&path).unwrap();
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    }

    #[test]
    fn duplicates_and_ordering_per_project_and_ref() {
        let (_dir, mut conn) = store();
        let tx = conn.transaction().unwrap();
        let first = insert_delivery(&tx, &delivery("a", "p1"), 1, true).unwrap();
        assert!(matches!(first, crate::outbox::Accepted::Queued { .. }));
        assert!(matches!(
            insert_delivery(&tx, &delivery("a", "p1"), 2, true).unwrap(),
            crate::outbox::Accepted::Duplicate { .. }
        ));
        insert_delivery(&tx, &delivery("b", "p1"), 3, true).unwrap();
        insert_delivery(&tx, &delivery("c", "p2"), 4, true).unwrap();
        // One per project and ref: a (p1) and c (p2), not b (waits behind a).
        let claimed: Vec<String> = claim_due(&tx, 10, 10)
            .unwrap()
            .into_iter()
            .map(|t| t.delivery_id)
            .collect();
        assert_eq!(claimed, ["a", "c"]);
        assert!(
            claim_due(&tx, 10, 10).unwrap().is_empty(),
            "b waits while a is being sent"
        );
        let a = 1;
        record(
            &tx,
            a,
            &Recorded::Sent {
                status: 201,
                pipeline_id: Some(7),
                pipeline_url: None,
            },
            11,
        )
        .unwrap();
        let claimed: Vec<String> = claim_due(&tx, 12, 10)
            .unwrap()
            .into_iter()
            .map(|t| t.delivery_id)
            .collect();
        assert_eq!(claimed, ["b"]);
        tx.commit().unwrap();
        // A crash while b and c are being sent: both are due again.
        assert_eq!(requeue_in_flight(&conn).unwrap(), 2);
    }

    #[test]
    fn retries_wait_until_due() {
        let (_dir, mut conn) = store();
        let tx = conn.transaction().unwrap();
        insert_delivery(&tx, &delivery("a", "p"), 0, true).unwrap();
        let id = claim_due(&tx, 0, 1).unwrap()[0].id;
        record(
            &tx,
            id,
            &Recorded::Retry {
                due_at: 1000,
                status: Some(503),
                reason: "503".into(),
            },
            1,
        )
        .unwrap();
        assert!(claim_due(&tx, 999, 1).unwrap().is_empty());
        let again = claim_due(&tx, 1000, 1).unwrap();
        assert_eq!(again[0].attempts, 1, "attempts before this one");
        tx.commit().unwrap();
        assert_eq!(
            next_due(&conn).unwrap(),
            None,
            "nothing queued while it is being sent"
        );
    }

    #[test]
    fn prune_keeps_what_is_still_to_be_sent() {
        let (_dir, mut conn) = store();
        let tx = conn.transaction().unwrap();
        insert_delivery(&tx, &delivery("old-done", "p1"), 0, true).unwrap();
        insert_delivery(&tx, &delivery("old-pending", "p2"), 0, true).unwrap();
        insert_delivery(&tx, &delivery("new", "p3"), 500, true).unwrap();
        let done = claim_due(&tx, 0, 1).unwrap()[0].id;
        record(
            &tx,
            done,
            &Recorded::Failed {
                status: Some(404),
                reason: "x".into(),
                pipeline_id: None,
                pipeline_url: None,
            },
            1,
        )
        .unwrap();
        assert_eq!(prune(&tx, 100).unwrap(), 1);
        tx.commit().unwrap();
        let left: Vec<String> = list(&conn, false, 10)
            .unwrap()
            .into_iter()
            .map(|r| r.delivery_id)
            .collect();
        assert_eq!(left, ["new", "old-pending"]);
    }

    #[test]
    fn replays_are_new_triggers_linked_to_the_original() {
        let (_dir, mut conn) = store();
        let tx = conn.transaction().unwrap();
        insert_delivery(&tx, &delivery("a", "p"), 0, true).unwrap();
        let err = replay(&tx, &ReplayTarget::Trigger(1), 1).unwrap_err();
        assert!(err.contains("still queued"), "{err}");
        let id = claim_due(&tx, 0, 1).unwrap()[0].id;
        record(
            &tx,
            id,
            &Recorded::Failed {
                status: Some(404),
                reason: "x".into(),
                pipeline_id: None,
                pipeline_url: None,
            },
            1,
        )
        .unwrap();
        let new = replay(&tx, &ReplayTarget::Delivery("a".into()), 2).unwrap();
        assert_eq!(new, [2]);
        let claimed = claim_due(&tx, 2, 5).unwrap();
        assert_eq!(claimed.len(), 1);
        assert!(
            replay(&tx, &ReplayTarget::Trigger(99), 3)
                .unwrap_err()
                .contains("trigger 99 is not in the store")
        );
        tx.commit().unwrap();
        assert_eq!(ReplayTarget::parse("trigger:5"), ReplayTarget::Trigger(5));
        assert_eq!(
            ReplayTarget::parse("delivery:abc"),
            ReplayTarget::Delivery("abc".into())
        );
        assert_eq!(
            ReplayTarget::parse("72d3162e-cc78"),
            ReplayTarget::Delivery("72d3162e-cc78".into())
        );
    }
}
