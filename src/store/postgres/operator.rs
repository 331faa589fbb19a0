//! What operators ask of the shared store: replays, the rows of `hookrelay deliveries`
//! and the dashboard, cancels, and stored webhooks read back by their delivery id.

use super::keys::Touch;
use super::{PostgresEngine, error};
use crate::store::{
    CancelTarget, DeliveryRow, EngineError, ListFilter, ReplayTarget, SqlValue, StoredWebhook,
};

/// The start of a statement that finds deliveries by their delivery id alone: through the
/// `(source, delivery_id)` index, one source at a time (`sources` lists them, each found by
/// one index probe), a few probes whatever the store holds, with no index of the id alone
/// for every webhook to write. As the embedded engine's (`sqlite::BY_DELIVERY_ID`). The
/// statements after it look up each source's rows in `LATERAL (… OFFSET 0)`: without the
/// `OFFSET 0` PostgreSQL pulls the subquery up and may put `sources` last, reading a whole
/// table (150–250 ms with 60,000 deliveries not yet analyzed, against 0.2–0.3 ms).
const BY_DELIVERY_ID: &str = "WITH RECURSIVE sources(source) AS (
    SELECT min(source) FROM hr_deliveries
    UNION ALL
    SELECT (SELECT min(source) FROM hr_deliveries WHERE source > sources.source)
    FROM sources WHERE sources.source IS NOT NULL
)";

impl PostgresEngine {
    pub(super) fn queue_replays(
        &mut self,
        target: &ReplayTarget,
        now: i64,
    ) -> Result<Vec<i64>, EngineError> {
        let now = now + self.skew_ms;
        let target = crate::store::text::replay_target(target);
        let target = target.as_ref();
        let rows = match target {
            ReplayTarget::Trigger(id) => self
                .client()
                .query(
                    "SELECT id, state, token_ref, order_key, delivery FROM hr_triggers WHERE id = $1",
                    &[id],
                )
                .map_err(error)?,
            ReplayTarget::Delivery(delivery) => self
                .client()
                .query(
                    &format!(
                        "{BY_DELIVERY_ID} SELECT t.id, t.state, t.token_ref, t.order_key, t.delivery
                         FROM sources,
                              LATERAL (SELECT id FROM hr_deliveries d
                                       WHERE d.source = sources.source AND d.delivery_id = $1 OFFSET 0) d,
                              LATERAL (SELECT * FROM hr_triggers t
                                       WHERE t.delivery = d.id AND t.replay_of IS NULL AND t.kind = 'trigger'
                                       OFFSET 0) t
                         ORDER BY t.id"
                    ),
                    &[delivery],
                )
                .map_err(error)?,
        };
        if rows.is_empty() {
            let stored = match target {
                ReplayTarget::Delivery(delivery) => self.newest_stored(delivery)?.is_some(),
                ReplayTarget::Trigger(_) => false,
            };
            return Err(crate::store::nothing_to_replay(target, stored));
        }
        let mut new_ids = Vec::new();
        // Each delivery locked once, however many of its triggers are replayed.
        let mut locked = std::collections::HashSet::new();
        for row in rows {
            let (id, state, token_ref, order_key, delivery): (i64, String, String, String, i64) =
                (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
            if let Some(refusal) = crate::store::replay_refusal(id, &state, &token_ref) {
                return Err(refusal);
            }
            if locked.insert(delivery) {
                self.lock_delivery(delivery, target)?;
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

    pub(super) fn read_rows(
        &mut self,
        filter: &ListFilter,
    ) -> Result<Vec<DeliveryRow>, EngineError> {
        // Times are kept on the database's clock; the filter's are this machine's.
        let skew = self.skew_ms;
        let filter = crate::store::text::filter(filter);
        let filter = ListFilter {
            since: filter.since.map(|at| at + skew),
            until: filter.until.map(|at| at + skew),
            before: filter.before.map(|(at, row)| (at + skew, row)),
            ..filter.into_owned()
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
        // Each waiting trigger's key's head, in one statement: at most a page of them.
        let waiting: Vec<i64> = rows
            .iter()
            .filter(|row| row.get::<_, Option<&str>>(8) == Some("queued"))
            .filter_map(|row| row.get::<_, Option<i64>>(4))
            .collect();
        let heads: std::collections::HashMap<i64, i64> = match waiting.is_empty() {
            true => Default::default(),
            false => self
                .client()
                .query(
                    "SELECT t.id, k.head FROM hr_triggers t JOIN hr_keys k ON k.order_key = t.order_key
                     WHERE t.id = ANY($1) AND k.head <> t.id",
                    &[&waiting],
                )
                .map_err(error)?
                .iter()
                .map(|row| (row.get(0), row.get(1)))
                .collect(),
        };
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
                waits_for: row
                    .get::<_, Option<i64>>(4)
                    .and_then(|id| heads.get(&id).copied()),
            })
            .collect())
    }

    pub(super) fn cancel_waiting(
        &mut self,
        target: &CancelTarget,
        now: i64,
    ) -> Result<Vec<i64>, EngineError> {
        let now = now + self.skew_ms;
        let target = crate::store::text::cancel_target(target);
        let target = target.as_ref();
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
                    return Err(crate::store::cancel_refusal(*id, state.as_deref()));
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

    pub(super) fn newest_stored(
        &mut self,
        delivery_id: &str,
    ) -> Result<Option<StoredWebhook>, EngineError> {
        let looked_up = crate::store::text::text(delivery_id);
        let row = self
            .client()
            .query_opt(
                &format!(
                    "{BY_DELIVERY_ID} SELECT d.source, d.headers, d.body, d.body_encoding, d.received_at, d.summary
                     FROM sources,
                          LATERAL (SELECT * FROM hr_deliveries d
                                   WHERE d.source = sources.source AND d.delivery_id = $1 OFFSET 0) d
                     ORDER BY d.id DESC LIMIT 1"
                ),
                &[&looked_up.as_ref()],
            )
            .map_err(error)?;
        self.stored_from_row(delivery_id, row)
    }

    pub(super) fn stored_from(
        &mut self,
        source: &str,
        delivery_id: &str,
    ) -> Result<Option<StoredWebhook>, EngineError> {
        let (source, looked_up) = (
            crate::store::text::text(source),
            crate::store::text::text(delivery_id),
        );
        let row = self
            .client()
            .query_opt(
                "SELECT d.source, d.headers, d.body, d.body_encoding, d.received_at, d.summary
                 FROM hr_deliveries d WHERE d.source = $1 AND d.delivery_id = $2",
                &[&source.as_ref(), &looked_up.as_ref()],
            )
            .map_err(error)?;
        self.stored_from_row(delivery_id, row)
    }

    /// The stored webhook `delivery_id` in a row of (source, headers, body, its encoding,
    /// received at, summary), if one was found.
    fn stored_from_row(
        &self,
        delivery_id: &str,
        row: Option<postgres::Row>,
    ) -> Result<Option<StoredWebhook>, EngineError> {
        row.map(|row| {
            StoredWebhook::from_stored(
                delivery_id,
                row.get(0),
                row.get(1),
                (row.get(2), row.get(3)),
                row.get::<_, i64>(4) - self.skew_ms,
                row.get(5),
            )
        })
        .transpose()
    }
}
