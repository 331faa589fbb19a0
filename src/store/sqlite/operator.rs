//! What operators ask of the embedded store: replays, the rows of `hookrelay deliveries`
//! and the dashboard, cancels, and stored webhooks read back by their delivery id.

use rusqlite::{Connection, OptionalExtension, params};

use super::{SqliteEngine, error};
use crate::store::{
    CancelTarget, DeliveryRow, EngineError, ListFilter, ReplayTarget, SqlValue, StoredWebhook,
};

impl SqliteEngine {
    /// The newest stored webhook whose delivery id is `delivery_id`, whatever its source.
    pub(super) fn newest_stored(
        &self,
        delivery_id: &str,
    ) -> Result<Option<StoredWebhook>, EngineError> {
        self.stored_where(
            &format!(
                "{BY_DELIVERY_ID} SELECT d.source, d.headers, d.body, d.body_encoding, d.received_at, d.summary
                 FROM sources CROSS JOIN deliveries d
                 WHERE d.source = sources.source AND d.delivery_id = ?1
                 ORDER BY d.id DESC LIMIT 1"
            ),
            delivery_id,
            None,
        )
    }

    /// The stored webhook `sql` selects by `delivery_id` (`?1`) and, if given, `source` (`?2`).
    pub(super) fn stored_where(
        &self,
        sql: &str,
        delivery_id: &str,
        source: Option<&str>,
    ) -> Result<Option<StoredWebhook>, EngineError> {
        let delivery = crate::store::text::text(delivery_id);
        let source = source.map(crate::store::text::text);
        let params: Vec<&dyn rusqlite::ToSql> = match &source {
            Some(source) => vec![&delivery, source],
            None => vec![&delivery],
        };
        self.conn
            .query_row(sql, params.as_slice(), |row| {
                Ok(StoredWebhook::from_stored(
                    delivery_id,
                    row.get(0)?,
                    &row.get::<_, String>(1)?,
                    (row.get(2)?, row.get::<_, Option<String>>(3)?.as_deref()),
                    row.get(4)?,
                    &row.get::<_, String>(5)?,
                ))
            })
            .optional()
            .map_err(error)?
            .transpose()
    }
}

/// The start of a statement that finds deliveries by their delivery id alone, through the
/// `(source, delivery_id)` index one source at a time (`sources` lists them, each found by
/// one seek). A store holds a handful of sources, so that is a few seeks, where
/// `WHERE delivery_id = ?` read every delivery: with a million stored, seconds of the
/// writer's time for a replay, which every acknowledgement waited behind. An index of its
/// own would cost every webhook one more index to write. (`CROSS JOIN` keeps SQLite's
/// join order: sources first.)
pub(super) const BY_DELIVERY_ID: &str = "WITH RECURSIVE sources(source) AS (
    SELECT min(source) FROM deliveries
    UNION ALL
    SELECT (SELECT min(source) FROM deliveries WHERE source > sources.source)
    FROM sources WHERE sources.source IS NOT NULL
)";

/// Queues again: a trigger by id, or every trigger of a delivery. Replays are new rows
/// (`replay_of` the original), so the record of earlier attempts stays. Returns the new ids.
pub(super) fn replay(
    engine: &SqliteEngine,
    target: &ReplayTarget,
    now: i64,
) -> Result<Vec<i64>, EngineError> {
    let conn = &engine.conn;
    let ids: Vec<(i64, String, String, String)> = match target {
        ReplayTarget::Trigger(id) => conn
            .query_row(
                "SELECT id, state, token_ref, order_key FROM triggers WHERE id = ?1",
                params![id],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)),
            )
            .optional()
            .map_err(error)?
            .into_iter()
            .collect(),
        ReplayTarget::Delivery(delivery) => conn
            .prepare(&format!(
                "{BY_DELIVERY_ID} SELECT t.id, t.state, t.token_ref, t.order_key
                 FROM sources CROSS JOIN deliveries d CROSS JOIN triggers t
                 WHERE d.source = sources.source AND d.delivery_id = ?1 AND t.delivery = d.id
                   AND t.replay_of IS NULL AND t.kind = 'trigger' ORDER BY t.id"
            ))
            .and_then(|mut statement| {
                statement
                    .query_map(params![delivery], |row| {
                        Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
                    })?
                    .collect::<rusqlite::Result<_>>()
            })
            .map_err(error)?,
    };
    if ids.is_empty() {
        let stored = match target {
            ReplayTarget::Delivery(delivery) => engine.newest_stored(delivery)?.is_some(),
            ReplayTarget::Trigger(_) => false,
        };
        return Err(crate::store::nothing_to_replay(target, stored));
    }
    let mut new_ids = Vec::new();
    for (id, state, token_ref, order_key) in ids {
        if let Some(refusal) = crate::store::replay_refusal(id, &state, &token_ref) {
            return Err(refusal);
        }
        (|| {
            conn.execute(
                "INSERT INTO triggers (delivery, rule, upstream, project, git_ref, token_ref, variables, inputs,
                                       order_key, state, created_at, due_at, updated_at, replay_of,
                                       kind, status_target, pipeline_id)
                 SELECT delivery, rule, upstream, project, git_ref, token_ref, variables, inputs, order_key,
                        'queued', ?2, ?2, ?2, ?1, kind, status_target,
                        CASE WHEN kind = 'trigger' THEN NULL ELSE pipeline_id END
                 FROM triggers WHERE id = ?1",
                params![id, now],
            )?;
            let new_id = conn.last_insert_rowid();
            engine.enqueue(&order_key, new_id, now)?;
            engine.add_open(1)?;
            new_ids.push(new_id);
            Ok(())
        })()
        .map_err(error)?;
    }
    Ok(new_ids)
}

/// The newest triggers (and deliveries without any), newest first; a waiting trigger
/// with the head of its key when that is another.
pub(super) fn list(conn: &Connection, filter: &ListFilter) -> rusqlite::Result<Vec<DeliveryRow>> {
    let (clause, values) = filter.where_clause(|n| format!("?{n}"), "instr");
    let limit_at = values.len() + 1;
    let sql = format!(
        "SELECT d.received_at, d.source, d.delivery_id, d.event_type, t.id, t.rule, t.project, t.git_ref, t.state,
                t.attempts, t.last_status, t.last_error, t.pipeline_url, t.replay_of, t.coalesced_into,
                t.due_at, d.summary, t.kind, d.id
         FROM deliveries d LEFT JOIN triggers t ON t.delivery = d.id {clause}
         ORDER BY d.received_at DESC, d.id DESC, t.id DESC LIMIT ?{limit_at}"
    );
    let mut bound: Vec<rusqlite::types::Value> = values
        .into_iter()
        .map(|value| match value {
            SqlValue::Text(text) => rusqlite::types::Value::Text(text),
            SqlValue::Int(n) => rusqlite::types::Value::Integer(n),
        })
        .collect();
    bound.push(rusqlite::types::Value::Integer(filter.limit as i64));
    let mut statement = conn.prepare(&sql)?;
    let mut rows = statement
        .query_map(rusqlite::params_from_iter(bound), |row| {
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
                due_at: row.get(15)?,
                summary: row.get(16)?,
                kind: row.get(17)?,
                row: row.get(18)?,
                waits_for: None,
            })
        })?
        .collect::<rusqlite::Result<Vec<DeliveryRow>>>()?;
    // Each waiting trigger's key, one seek each: at most a page of them.
    let mut head = conn.prepare_cached(
        "SELECT k.head FROM triggers t JOIN queue_keys k ON k.order_key = t.order_key WHERE t.id = ?1",
    )?;
    for row in rows
        .iter_mut()
        .filter(|row| row.state.as_deref() == Some("queued"))
    {
        let Some(id) = row.trigger_id else { continue };
        let found: Option<i64> = head.query_row(params![id], |r| r.get(0)).optional()?;
        row.waits_for = found.filter(|&head| head != id);
    }
    Ok(rows)
}

/// A project's waiting triggers, read from the index of open ones: without statistics
/// SQLite would read every trigger the store keeps (sent ones included; a million in a
/// week of webhooks), since it cannot tell that `state = 'queued'` fits that index.
pub(super) const CANCEL_PROJECT: &str =
    "SELECT id, order_key FROM triggers INDEXED BY triggers_open
     WHERE state IN ('queued', 'sending') AND state = 'queued' AND project = ?1
       AND (?2 IS NULL OR upstream = ?2) AND kind = 'trigger' ORDER BY id";

/// [`Engine::cancel`](crate::store::Engine::cancel): marks waiting triggers cancelled; a key whose head was cancelled
/// moves on to its next trigger.
pub(super) fn cancel(
    engine: &SqliteEngine,
    target: &CancelTarget,
    now: i64,
) -> rusqlite::Result<Result<Vec<i64>, EngineError>> {
    let conn = &engine.conn;
    let candidates: Vec<(i64, String)> = match target {
        CancelTarget::Trigger(id) => {
            let found: Option<(String, String)> = conn
                .query_row(
                    "SELECT state, order_key FROM triggers WHERE id = ?1",
                    params![id],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )
                .optional()?;
            match found {
                Some((state, order_key)) if state == "queued" => vec![(*id, order_key)],
                found => {
                    let state = found.as_ref().map(|(state, _)| state.as_str());
                    return Ok(Err(crate::store::cancel_refusal(*id, state)));
                }
            }
        }
        CancelTarget::Project { project, upstream } => conn
            .prepare(CANCEL_PROJECT)?
            .query_map(params![project, upstream], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })?
            .collect::<rusqlite::Result<_>>()?,
        CancelTarget::Superseded { order_key } => conn
            .prepare_cached(
                "SELECT id, order_key FROM triggers WHERE order_key = ?1 AND state = 'queued' AND kind = 'status'
                 ORDER BY id",
            )?
            .query_map(params![order_key], |row| Ok((row.get(0)?, row.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?,
    };
    let (state, note) = target.outcome();
    let mut cancelled = Vec::new();
    for (id, order_key) in candidates {
        let changed = conn
            .prepare_cached(
                "UPDATE triggers SET state = ?4, last_error = ?3, updated_at = ?2
                 WHERE id = ?1 AND state = 'queued'",
            )?
            .execute(params![id, now, note, state])?;
        if changed == 0 {
            continue;
        }
        engine.add_open(-1)?;
        let head: Option<i64> = conn
            .prepare_cached("SELECT head FROM queue_keys WHERE order_key = ?1")?
            .query_row(params![order_key], |row| row.get(0))
            .optional()?;
        if head == Some(id) {
            engine.advance_key(&order_key)?;
        }
        cancelled.push(id);
    }
    Ok(Ok(cancelled))
}
