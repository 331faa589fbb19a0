//! Recording a webhook (or a gateway call): its delivery row, once per source and delivery
//! id, and the work it planned, each trigger joining its key's queue, merged into a
//! waiting twin in its `coalesce` window, or recorded finished.

use rusqlite::{OptionalExtension, params};

use super::SqliteEngine;
use crate::store::{Accepted, NewDelivery};

pub(super) fn insert_delivery(
    engine: &SqliteEngine,
    delivery: &NewDelivery,
    now: i64,
) -> rusqlite::Result<Accepted> {
    let delivery = crate::store::text::delivery(delivery);
    let delivery = delivery.as_ref();
    let conn = &engine.conn;
    let headers = serde_json::to_string(&delivery.headers).expect("headers serialize");
    // The UNIQUE index decides: no row inserted means the source sent this id before.
    let inserted = conn
        .prepare_cached(
            "INSERT INTO deliveries (source, delivery_id, received_at, event_type, headers, body, summary, body_encoding)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT (source, delivery_id) DO NOTHING",
        )?
        .execute(params![
            delivery.source,
            delivery.delivery_id,
            now,
            delivery.event_type,
            headers,
            &delivery.body.bytes[..],
            delivery.summary,
            delivery.body.encoding
        ])?;
    if inserted == 0 {
        let row = conn
            .prepare_cached("SELECT id FROM deliveries WHERE source = ?1 AND delivery_id = ?2")?
            .query_row(params![delivery.source, delivery.delivery_id], |row| {
                row.get(0)
            })?;
        return Ok(Accepted::Duplicate { delivery_row: row });
    }
    let delivery_row = conn.last_insert_rowid();
    let (trigger_ids, coalesced) = insert_work(engine, delivery_row, &delivery.triggers, now)?;
    Ok(Accepted::Queued {
        delivery_row,
        trigger_ids,
        coalesced,
    })
}

/// Inserts a delivery's triggers (or other work): each joins its key's queue, merges into
/// a waiting twin in its `coalesce` window, or is recorded finished (a gateway call).
/// Returns the ids, and for each the trigger it was merged into.
pub(super) fn insert_work(
    engine: &SqliteEngine,
    delivery_row: i64,
    work: &[crate::store::NewTrigger],
    now: i64,
) -> rusqlite::Result<(Vec<i64>, Vec<Option<i64>>)> {
    let conn = &engine.conn;
    let mut trigger_ids = Vec::with_capacity(work.len());
    let mut coalesced = Vec::with_capacity(work.len());
    let mut opened = 0;
    for trigger in work {
        let order_key = trigger.order_key();
        // Coalescing: an identical trigger still waiting in its window takes this one in.
        let coalesce_key = trigger.coalesce_key(&order_key);
        let into: Option<i64> = match &coalesce_key {
            None => None,
            Some(key) => conn
                .prepare_cached(
                    "SELECT id FROM triggers WHERE coalesce_key = ?1 AND state = 'queued' AND due_at > ?2
                     ORDER BY id LIMIT 1",
                )?
                .query_row(params![key, now], |row| row.get(0))
                .optional()?,
        };
        let (state, due_at) = trigger.initial_state(into, now);
        let finished = trigger.finished();
        let end = finished.unwrap_or_default();
        conn.prepare_cached(
            "INSERT INTO triggers (delivery, rule, upstream, project, git_ref, token_ref, variables, inputs,
                                   order_key, state, created_at, due_at, updated_at, coalesce_key, coalesced_into,
                                   kind, status_target, pipeline_id, last_status, last_error, pipeline_url)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?11, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20)",
        )?
        .execute(params![
            delivery_row,
            trigger.rule,
            trigger.upstream,
            trigger.project,
            trigger.git_ref,
            trigger.token_ref,
            trigger.variables,
            trigger.inputs,
            order_key,
            state,
            now,
            due_at,
            coalesce_key,
            into,
            trigger.kind.as_str(),
            trigger.status_target,
            trigger.pipeline_id.or(end.pipeline_id),
            end.status,
            end.error,
            end.pipeline_url
        ])?;
        let id = conn.last_insert_rowid();
        match &trigger.done {
            Some(_) if finished.is_some() => {}
            Some(done) => {
                engine.write_outcome(id, None, done, now)?;
            }
            None if into.is_none() => {
                engine.enqueue(&order_key, id, due_at)?;
                opened += 1;
            }
            None => {}
        }
        trigger_ids.push(id);
        coalesced.push(into);
    }
    engine.add_open(opened)?;
    Ok((trigger_ids, coalesced))
}
