//! The queue's key rows: one per upstream+project+ref in `hr_keys`, holding its head (the
//! oldest unfinished trigger), when it is due, and its lease. A transaction notes which
//! keys it changes ([`Touch`]) and settles them just before `COMMIT`, in key order, so
//! relays settling at once never wait for each other in a cycle; a claim takes due keys
//! without waiting for any.

use super::PostgresEngine;
use crate::store::{Claimed, DueTrigger, Lease, UpstreamHold};

/// A change to a key row, made at commit in key order.
#[derive(Debug)]
pub(super) enum Touch {
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

impl PostgresEngine {
    pub(super) fn touch(&mut self, order_key: &str, touch: Touch) {
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
    pub(super) fn settle(&mut self) -> Result<(), postgres::Error> {
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
        // Keys whose only change is a new trigger (most of a group of webhooks) go in
        // runs, each run in one statement instead of a round trip per key; keys are still
        // locked in key order (`COLLATE "C"` compares bytes, as the sort above does).
        let mut run: Vec<(&str, i64, i64)> = Vec::new();
        for (place, (order_key, touch)) in touched.iter().enumerate() {
            let alone = |other: Option<&(String, Touch)>| other.is_none_or(|(k, _)| k != order_key);
            if let Touch::Enqueue { id, due_at } = touch
                && alone(place.checked_sub(1).and_then(|p| touched.get(p)))
                && alone(touched.get(place + 1))
            {
                run.push((order_key, *id, *due_at));
                continue;
            }
            self.enqueue_keys(&mut run)?;
            match touch {
                Touch::Enqueue { id, due_at } => {
                    self.enqueue_keys(&mut vec![(order_key.as_str(), *id, *due_at)])?;
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
        self.enqueue_keys(&mut run)
    }

    /// New triggers' keys, in key order, in one statement: a key that does not exist yet is
    /// headed by its trigger; one that does is locked (`DO UPDATE`, see [`Self::settle`]),
    /// its floor lowered if need be. Empties `run`.
    fn enqueue_keys(&mut self, run: &mut Vec<(&str, i64, i64)>) -> Result<(), postgres::Error> {
        if run.is_empty() {
            return Ok(());
        }
        let keys: Vec<&str> = run.iter().map(|(key, _, _)| *key).collect();
        let heads: Vec<i64> = run.iter().map(|(_, head, _)| *head).collect();
        let dues: Vec<i64> = run.iter().map(|(_, _, due)| *due).collect();
        run.clear();
        let upsert = self.stmt(
            "INSERT INTO hr_keys (order_key, head, due_at, floor)
             SELECT k, h, d, h FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS u(k, h, d)
             ORDER BY k COLLATE \"C\"
             ON CONFLICT (order_key) DO UPDATE SET floor = least(hr_keys.floor, EXCLUDED.floor)",
        )?;
        self.client().execute(&upsert, &[&keys, &heads, &dues])?;
        Ok(())
    }

    /// `COMMIT`, with the transaction's change to the count of unfinished triggers and the
    /// time to note, if any, in the same round trip (numbers, written into the text:
    /// nothing else goes there).
    pub(super) fn commit_counting(&mut self) -> Result<(), postgres::Error> {
        let change = std::mem::take(&mut self.open_change);
        let clock = self.clock_note.take();
        if change == 0 && clock.is_none() {
            return self.client().batch_execute("COMMIT");
        }
        let shard = self.open_shard;
        let clock = clock.map_or(String::new(), |now| {
            format!(", clock_noted = greatest(clock_noted, {now})")
        });
        self.client().batch_execute(&format!(
            "UPDATE hr_open SET open = open + {change}{clock} WHERE shard = {shard}; COMMIT"
        ))
    }

    /// Makes the key's oldest unfinished trigger its head, due when that trigger is; or
    /// deletes the key when none is left. The key is locked already.
    ///
    /// `floor` is at most the id of every unfinished trigger of the key (a new trigger
    /// lowers it under the key's lock), so the search starts there: the index entries of
    /// finished triggers below it, which PostgreSQL keeps until a vacuum, are never read.
    pub(super) fn advance_key(
        &mut self,
        order_key: &str,
        floor: i64,
    ) -> Result<(), postgres::Error> {
        // One statement: the key is locked already, so no trigger of it can commit
        // between the search and the change.
        let advance = self.stmt(
            "WITH next AS (
                 SELECT id, due_at FROM hr_triggers WHERE order_key = $1 AND id >= $2 AND state IN ('queued', 'sending')
                 ORDER BY id LIMIT 1
             ), moved AS (
                 UPDATE hr_keys SET head = next.id, due_at = next.due_at, lease_until = NULL, floor = next.id
                 FROM next WHERE order_key = $1
             )
             DELETE FROM hr_keys WHERE order_key = $1 AND NOT EXISTS (SELECT 1 FROM next)",
        )?;
        self.client().execute(&advance, &[&order_key, &floor])?;
        Ok(())
    }

    /// Claims up to `limit` due keys' heads (`now` on the database's clock): leases each
    /// key, and says when the next key falls due. Two round trips however many keys.
    pub(super) fn claim_due(&mut self, now: i64, limit: usize) -> Result<Claimed, postgres::Error> {
        // Due keys, then keys whose lease expired (their holder died or froze), and when
        // the first key not picked falls due. Keys another relay is claiming right now
        // are skipped, not waited for. Each from its own partial index, so a claim reads
        // only keys with due work. Expired leases only while `take_over` ($3) says so.
        let keys = self.stmt(
            "WITH due AS (
                 SELECT order_key, head, due_at FROM hr_keys WHERE due_at IS NOT NULL AND due_at <= $1
                 ORDER BY due_at LIMIT $2 FOR UPDATE SKIP LOCKED
             ), expired AS (
                 SELECT order_key, head, due_at FROM hr_keys WHERE due_at IS NULL AND lease_until < $1 AND $3
                 ORDER BY lease_until LIMIT $2 FOR UPDATE SKIP LOCKED
             ), picked AS (
                 (SELECT * FROM due) UNION ALL (SELECT * FROM expired) LIMIT $2
             )
             SELECT order_key, head, due_at FROM picked
             UNION ALL
             SELECT NULL, NULL, (SELECT due_at FROM hr_keys
                                 WHERE due_at IS NOT NULL AND order_key <> ALL (ARRAY(SELECT order_key FROM picked))
                                 ORDER BY due_at LIMIT 1)",
        )?;
        let mut picked: Vec<(String, i64, Option<i64>)> = Vec::new();
        let mut next_due: Option<i64> = None;
        let take_over = self.take_over;
        for row in self
            .client()
            .query(&keys, &[&now, &(limit as i64), &take_over])?
        {
            match row.get::<_, Option<String>>(0) {
                Some(order_key) => picked.push((order_key, row.get(1), row.get(2))),
                None => next_due = row.get(2),
            }
        }
        if picked.is_empty() {
            return Ok(Claimed {
                due: Vec::new(),
                next_due: next_due.map(|due| due - self.skew_ms),
            });
        }
        // Each head is taken only if no one holds its row (a late outcome being
        // written): a claim waits on nothing while it holds keys. A key is leased in the
        // same statement when its head was taken. Every row is found by its key (no join
        // PostgreSQL could plan as a scan while the tables are small, and keep planned
        // so); the heads by id alone, the state checked after: with the state in the
        // condition it may read them from the index of unfinished triggers, all of it.
        let take = self.stmt(
            "WITH heads AS (
                 SELECT id, state FROM hr_triggers WHERE id = ANY ($1) FOR UPDATE SKIP LOCKED
             ), taken AS (
                 UPDATE hr_triggers t SET state = 'sending', attempts = attempts + 1, updated_at = $4,
                                          lease = ($3::bigint[])[array_position($1, t.id)]
                 WHERE t.id = ANY (ARRAY(SELECT id FROM heads WHERE state IN ('queued', 'sending')))
                 RETURNING t.id, t.delivery, (SELECT delivery_id FROM hr_deliveries WHERE id = t.delivery),
                           (SELECT source FROM hr_deliveries WHERE id = t.delivery), t.rule, t.upstream, t.project,
                           t.git_ref, t.token_ref, t.variables, t.inputs, t.attempts, t.created_at, t.lease, t.kind,
                           t.pipeline_id, t.status_target IS NOT NULL, ($2::text[])[array_position($1, t.id)] AS order_key,
                           array_position($1, t.id) AS n
             ), leased AS (
                 UPDATE hr_keys SET due_at = NULL, lease_until = $5 WHERE order_key = ANY (ARRAY(SELECT order_key FROM taken))
             )
             SELECT * FROM taken ORDER BY n",
        )?;
        let heads: Vec<i64> = picked.iter().map(|(_, head, _)| *head).collect();
        let order_keys: Vec<&str> = picked.iter().map(|(key, _, _)| key.as_str()).collect();
        let tokens: Vec<i64> = picked.iter().map(|_| fastrand::i64(1..)).collect();
        let until = now + self.lease_ms;
        let rows = self
            .client()
            .query(&take, &[&heads, &order_keys, &tokens, &now, &until])?;
        let mut taken = vec![false; picked.len()];
        for row in &rows {
            taken[row.get::<_, i32>(18) as usize - 1] = true;
        }
        for ((order_key, head, due_at), _) in picked.iter().zip(&taken).filter(|(_, t)| !**t) {
            // Not taken: still due (its row is held a moment), or it finished after the
            // key fell due, and the key moves on.
            let state = self.stmt("SELECT state FROM hr_triggers WHERE id = $1")?;
            let open = self
                .client()
                .query_opt(&state, &[head])?
                .is_some_and(|row| matches!(row.get::<_, &str>(0), "queued" | "sending"));
            if open {
                if let Some(at) = *due_at {
                    next_due = Some(next_due.map_or(at, |next| next.min(at)));
                }
            } else {
                self.touch(order_key, Touch::Advance);
            }
        }
        let mut due = Vec::with_capacity(rows.len());
        for row in rows {
            let attempts: i32 = row.get(11);
            due.push(DueTrigger {
                id: row.get(0),
                kind: crate::store::WorkKind::parse(row.get(14)),
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
                order_key: row.get(17),
                token_ref: row.get(8),
                variables: serde_json::from_str(row.get(9)).unwrap_or_default(),
                inputs: serde_json::from_str(row.get(10)).unwrap_or_default(),
                attempts: i64::from(attempts) - 1,
                created_at: row.get(12),
            });
        }
        Ok(Claimed {
            due,
            next_due: next_due.map(|due| due - self.skew_ms),
        })
    }

    /// Moves up to `limit` due keys of a down upstream past its pause (`until` and `now`
    /// on the database's clock), earliest due first, and their heads with them; returns
    /// how many. Rows another relay holds are skipped (it defers them when it claims
    /// them), so this waits on nobody; the writer runs it beside claims, apart from the
    /// group's writes (see `Writer::group`).
    pub(super) fn hold_due(
        &mut self,
        hold: &UpstreamHold,
        until: i64,
        limit: usize,
        now: i64,
    ) -> Result<usize, postgres::Error> {
        let statement = self.stmt(
            "WITH held AS (
                SELECT k.order_key FROM hr_keys k JOIN hr_triggers t ON t.id = k.head
                WHERE k.due_at < $2 AND t.upstream = $1 AND t.kind = 'trigger' AND t.state = 'queued'
                ORDER BY k.due_at LIMIT $6
                FOR UPDATE SKIP LOCKED
            ), moved AS (
                UPDATE hr_keys k SET due_at = $2 + floor(random() * $3::bigint)::bigint
                FROM held WHERE k.order_key = held.order_key
                RETURNING k.head, k.due_at
            )
            UPDATE hr_triggers t SET due_at = moved.due_at, last_error = $4, updated_at = $5
            FROM moved WHERE t.id = moved.head",
        )?;
        let moved = self.client().execute(
            &statement,
            &[
                &hold.upstream,
                &until,
                &hold.spread_ms.max(1),
                &hold.reason,
                &now,
                &(limit as i64),
            ],
        )?;
        Ok(moved as usize)
    }
}
