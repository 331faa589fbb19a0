//! The queue's key rows: `queue_keys` holds one row per upstream+project+ref with unfinished
//! triggers, naming its head (the oldest) and when the head is due (`NULL` while it is
//! being sent). A trigger joins its key's queue, a claim leases the heads of the earliest
//! due keys, and a finished head hands its key to the next unfinished trigger.

use rusqlite::{OptionalExtension, params};

use super::SqliteEngine;
use crate::store::{Claimed, DueTrigger, Lease, UpstreamHold};

impl SqliteEngine {
    /// The next unfinished trigger of a key becomes its head, or the key goes.
    pub(super) fn advance_key(&self, order_key: &str) -> rusqlite::Result<()> {
        let next: Option<(i64, i64)> = self
            .conn
            .prepare_cached(
                "SELECT id, due_at FROM triggers WHERE order_key = ?1 AND state IN ('queued', 'sending')
                 ORDER BY id LIMIT 1",
            )?
            .query_row(params![order_key], |row| Ok((row.get(0)?, row.get(1)?)))
            .optional()?;
        match next {
            Some((head, due_at)) => self
                .conn
                .prepare_cached(
                    "UPDATE queue_keys SET head = ?2, due_at = ?3 WHERE order_key = ?1",
                )?
                .execute(params![order_key, head, due_at]),
            None => self
                .conn
                .prepare_cached("DELETE FROM queue_keys WHERE order_key = ?1")?
                .execute(params![order_key]),
        }?;
        Ok(())
    }

    /// A new queued trigger joins its key's queue; it becomes the head if the key is idle.
    pub(super) fn enqueue(&self, order_key: &str, id: i64, due_at: i64) -> rusqlite::Result<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO queue_keys (order_key, head, due_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (order_key) DO NOTHING",
            )?
            .execute(params![order_key, id, due_at])?;
        Ok(())
    }
}

/// The keys whose head is due, earliest first.
pub(super) const DUE_KEYS: &str =
    "SELECT order_key, head FROM queue_keys WHERE due_at IS NOT NULL AND due_at <= ?1
     ORDER BY due_at LIMIT ?2";

/// Leases the heads of up to `limit` due keys, earliest due first.
pub(super) fn claim(engine: &SqliteEngine, now: i64, limit: usize) -> rusqlite::Result<Claimed> {
    let conn = &engine.conn;
    let heads: Vec<(String, i64)> = conn
        .prepare_cached(DUE_KEYS)?
        .query_map(params![now, limit as i64], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut due = Vec::with_capacity(heads.len());
    for (order_key, head) in heads {
        let trigger = conn
            .prepare_cached(
                "UPDATE triggers SET state = 'sending', attempts = attempts + 1, updated_at = ?2, lease = ?3
                 WHERE id = ?1 AND state = 'queued'
                 RETURNING id, delivery, rule, upstream, project, git_ref, token_ref, variables, inputs,
                           attempts, created_at, lease, kind, pipeline_id, status_target IS NOT NULL",
            )?
            // A fresh random token per claim fences outcomes of older claims out.
            .query_row(params![head, now, fastrand::i64(1..)], |row| {
                let attempts: i64 = row.get(9)?;
                Ok(DueTrigger {
                    id: row.get(0)?,
                    kind: crate::store::WorkKind::parse(&row.get::<_, String>(12)?),
                    pipeline_id: row.get(13)?,
                    lease: Lease {
                        trigger: row.get(0)?,
                        token: row.get(11)?,
                        reports_status: row.get(14)?,
                    },
                    delivery_row: row.get(1)?,
                    delivery_id: String::new(),
                    source: String::new(),
                    rule: row.get(2)?,
                    upstream: row.get(3)?,
                    project: row.get(4)?,
                    git_ref: row.get(5)?,
                    order_key: order_key.clone(),
                    token_ref: row.get(6)?,
                    variables: serde_json::from_str(&row.get::<_, String>(7)?).unwrap_or_default(),
                    inputs: serde_json::from_str(&row.get::<_, String>(8)?).unwrap_or_default(),
                    attempts: attempts - 1,
                    created_at: row.get(10)?,
                })
            })
            .optional()?;
        conn.prepare_cached("UPDATE queue_keys SET due_at = NULL WHERE order_key = ?1")?
            .execute(params![order_key])?;
        let Some(mut trigger) = trigger else {
            // A head that is not waiting (repaired by hand, say): move the key on.
            engine.advance_key(&order_key)?;
            continue;
        };
        (trigger.delivery_id, trigger.source) = conn
            .prepare_cached("SELECT delivery_id, source FROM deliveries WHERE id = ?1")?
            .query_row(params![trigger.delivery_row], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })?;
        due.push(trigger);
    }
    let next_due = conn
        .prepare_cached("SELECT min(due_at) FROM queue_keys WHERE due_at IS NOT NULL")?
        .query_row([], |row| row.get(0))?;
    Ok(Claimed { due, next_due })
}

/// Moves up to `limit` due keys of a down upstream past its pause, earliest due first (the
/// due-time index), and their heads with them.
pub(super) fn hold_upstream(
    engine: &SqliteEngine,
    hold: &UpstreamHold,
    limit: usize,
    now: i64,
) -> rusqlite::Result<usize> {
    let conn = &engine.conn;
    // SQLite makes every change of an `UPDATE … RETURNING` at its first step: the
    // heads' updates below never meet a half-done key update.
    let moved: Vec<(i64, i64)> = conn
        .prepare_cached(
            "UPDATE queue_keys SET due_at = ?2 + abs(random() % ?3)
             WHERE order_key IN (
                 SELECT k.order_key FROM queue_keys k JOIN triggers t ON t.id = k.head
                 WHERE k.due_at IS NOT NULL AND k.due_at < ?2
                   AND t.upstream = ?1 AND t.kind = 'trigger' AND t.state = 'queued'
                 ORDER BY k.due_at LIMIT ?4)
             RETURNING head, due_at",
        )?
        .query_map(
            params![
                hold.upstream,
                hold.until,
                hold.spread_ms.max(1),
                limit as i64
            ],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )?
        .collect::<rusqlite::Result<_>>()?;
    let mut head = conn.prepare_cached(
        "UPDATE triggers SET due_at = ?2, last_error = ?3, updated_at = ?4 WHERE id = ?1",
    )?;
    for (id, due_at) in &moved {
        head.execute(params![id, due_at, hold.reason, now])?;
    }
    Ok(moved.len())
}
