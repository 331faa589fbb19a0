//! Recording webhooks and gateway calls: a group's deliveries and their triggers in one
//! statement where nothing needs looking at one by one, else each trigger joining its
//! key's queue or merging into a waiting twin.

use std::collections::HashMap;

use super::PostgresEngine;
use super::keys::Touch;
#[cfg(doc)]
use crate::store::Engine;
use crate::store::{Accepted, EngineError, NewDelivery};

impl PostgresEngine {
    /// [`Engine::insert_deliveries`] for deliveries without coalescing or finished calls:
    /// one statement inserts the new deliveries and their triggers (a delivery id already
    /// stored inserts neither), and a second reads the duplicates' rows only when there
    /// are duplicates — one round trip for a whole group instead of several per delivery.
    pub(super) fn insert_plain_batch(
        &mut self,
        deliveries: &[&NewDelivery],
        now: i64,
    ) -> Result<Vec<Accepted>, EngineError> {
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
        let t = TriggerColumns::of(&unique, now);
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
        ).map_err(super::error)?;
        let mut rows: HashMap<(String, String), (i64, bool)> = HashMap::new();
        let mut trigger_ids: Vec<i64> = Vec::new();
        for row in self
            .client()
            .query(
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
                    &t.of,
                    &t.rule,
                    &t.upstream,
                    &t.project,
                    &t.git_ref,
                    &t.token,
                    &t.variables,
                    &t.inputs,
                    &t.key,
                    &t.due,
                    &t.status,
                    &t.state,
                    &t.kind,
                    &t.pipeline,
                    &t.last_status,
                    &t.last_error,
                    &t.url,
                ],
            )
            .map_err(super::error)?
        {
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
            ).map_err(super::error)?;
            for row in self
                .client()
                .query(&existing, &[&sources, &ids])
                .map_err(super::error)?
            {
                rows.entry((row.get(1), row.get(2)))
                    .or_insert((row.get(0), false));
            }
        }
        let new: Vec<bool> = unique
            .iter()
            .map(
                |d| match rows.get(&(d.source.clone(), d.delivery_id.clone())) {
                    Some(&(_, new)) => Ok(new),
                    // Another relay pruned it between the two statements: one by one, it is new.
                    None => Err(EngineError {
                        message: format!(
                            "delivery {} was deleted while its duplicate was being recorded",
                            d.delivery_id
                        ),
                        transient: false,
                        refused: false,
                    }),
                },
            )
            .collect::<Result<_, _>>()?;
        // Identity values are taken in the order the rows are inserted: the triggers of
        // the new deliveries, in the arrays' order.
        trigger_ids.sort_unstable();
        self.enqueue_new(&t, &unique, &new, &trigger_ids);
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

    /// Each trigger of a new delivery joins its key's queue (`ids`: the triggers the
    /// statement inserted, in order); a finished gateway call's does not.
    fn enqueue_new(
        &mut self,
        t: &TriggerColumns<'_>,
        unique: &[&NewDelivery],
        new: &[bool],
        ids: &[i64],
    ) {
        let mut inserted = ids.iter();
        let mut opened = 0;
        for (((place, key), due_at), trigger) in
            t.of.iter()
                .zip(&t.key)
                .zip(&t.due)
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
    }

    /// Inserts a delivery's triggers (or other work): each joins its key's queue, merges
    /// into a waiting twin in its `coalesce` window, or is recorded finished (a gateway
    /// call). Returns the ids, and for each the trigger it was merged into.
    pub(super) fn insert_work(
        &mut self,
        delivery_row: i64,
        work: &[crate::store::NewTrigger],
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
}

/// Every trigger of a batch's new deliveries as the columns `unnest` reads, in order, each
/// with its delivery's place in the batch (from 1): identity values follow that order.
#[derive(Default)]
struct TriggerColumns<'a> {
    of: Vec<i32>,
    rule: Vec<&'a str>,
    upstream: Vec<&'a str>,
    project: Vec<&'a str>,
    git_ref: Vec<&'a str>,
    token: Vec<&'a str>,
    variables: Vec<&'a str>,
    inputs: Vec<&'a str>,
    key: Vec<String>,
    due: Vec<i64>,
    status: Vec<Option<&'a str>>,
    // What a finished gateway call's row says; a queued trigger's are empty.
    state: Vec<&'static str>,
    kind: Vec<&'static str>,
    pipeline: Vec<Option<i64>>,
    last_status: Vec<Option<i32>>,
    last_error: Vec<Option<&'a str>>,
    url: Vec<Option<&'a str>>,
}

impl<'a> TriggerColumns<'a> {
    fn of(deliveries: &[&'a NewDelivery], now: i64) -> TriggerColumns<'a> {
        let mut c = TriggerColumns::default();
        for (place, d) in deliveries.iter().enumerate() {
            for t in &d.triggers {
                c.of.push(place as i32 + 1);
                c.rule.push(t.rule.as_str());
                c.upstream.push(t.upstream.as_str());
                c.project.push(t.project.as_str());
                c.git_ref.push(t.git_ref.as_str());
                c.token.push(t.token_ref.as_str());
                c.variables.push(t.variables.as_str());
                c.inputs.push(t.inputs.as_str());
                c.key.push(t.order_key());
                let (state, due_at) = t.initial_state(None, now);
                c.state.push(state);
                c.due.push(due_at);
                c.status.push(t.status_target.as_deref());
                c.kind.push(t.kind.as_str());
                let end = t.finished().unwrap_or_default();
                c.pipeline.push(t.pipeline_id.or(end.pipeline_id));
                c.last_status.push(end.status.map(i32::from));
                c.last_error.push(end.error);
                c.url.push(end.pipeline_url);
            }
        }
        c
    }
}
