//! The durable outbox: nothing acknowledged is ever lost.
//!
//! A webhook is acknowledged only after its delivery and triggers are committed to SQLite
//! (WAL, `synchronous = FULL` for every commit that precedes an acknowledgement). All
//! writes go through one writer thread that commits in groups: whatever requests are
//! waiting when a commit starts share it, so a burst of webhooks costs one fsync, not one
//! each. The forwarder (`forwarder.rs`) sends due triggers and records each outcome through
//! the same writer; reads (`hookrelay deliveries`) use their own connection and work while
//! the server runs.

pub mod forwarder;
pub mod retry;
mod store;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use rusqlite::Connection;
use serde::Serialize;
use tokio::sync::{Notify, mpsc, oneshot};

pub use store::now_ms;

/// The store's file name inside the state folder.
pub const STORE_FILE: &str = "hookrelay.sqlite3";
/// Token references of gateway calls start with this: the caller's token is not stored.
pub const CALLER_TOKEN: &str = "caller token ";
/// Most requests one commit takes.
const GROUP_MAX: usize = 512;

/// How hard each acknowledging commit holds on to the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// fsync before acknowledging (`synchronous = FULL`): survives power loss.
    Full,
    /// No fsync (`synchronous = OFF`): only for measuring what durability costs.
    Off,
}

/// A webhook (or gateway call) to record, with the triggers it produced.
#[derive(Clone, Debug)]
pub struct NewDelivery {
    pub source: String,
    pub delivery_id: String,
    pub event_type: String,
    /// Headers without signatures, tokens or credentials.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    pub summary: serde_json::Value,
    pub triggers: Vec<NewTrigger>,
}

/// One trigger call to make later (or, for a gateway call, already made).
#[derive(Clone, Debug)]
pub struct NewTrigger {
    pub rule: String,
    pub upstream: String,
    pub project: String,
    pub git_ref: String,
    /// `env:NAME` / `file:PATH`; never the token.
    pub token_ref: String,
    pub variables: serde_json::Value,
    pub inputs: serde_json::Value,
    /// Wait this long before the first attempt.
    pub delay_ms: i64,
    /// `coalesce`: hold the trigger this long, taking in identical ones meanwhile (0: no).
    pub coalesce_ms: i64,
    /// Set when the call was already made (the gateway): recorded as finished.
    pub done: Option<Recorded>,
}

impl NewTrigger {
    /// A trigger to send as soon as possible; its token is kept by reference only.
    pub fn queued(
        rule: String,
        trigger: &crate::trigger::Trigger,
        token_ref: &crate::secret::SecretRef,
        coalesce: Option<std::time::Duration>,
    ) -> NewTrigger {
        NewTrigger {
            rule,
            upstream: trigger.upstream.clone(),
            project: trigger.project.to_string(),
            git_ref: trigger.git_ref.as_str().to_owned(),
            token_ref: token_ref.to_string(),
            variables: serde_json::to_value(&trigger.variables).expect("variables serialize"),
            inputs: serde_json::Value::Object(trigger.inputs.clone()),
            delay_ms: 0,
            coalesce_ms: coalesce.map(|c| c.as_millis() as i64).unwrap_or(0),
            done: None,
        }
    }
}

/// What recording a delivery did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Accepted {
    Queued {
        delivery_row: i64,
        trigger_ids: Vec<i64>,
        /// For each trigger, the waiting trigger it was coalesced into, if any.
        coalesced: Vec<Option<i64>>,
    },
    /// The source already delivered this id; nothing new was queued.
    Duplicate { delivery_row: i64 },
}

/// A trigger claimed for sending.
#[derive(Clone, Debug)]
pub struct DueTrigger {
    pub id: i64,
    pub delivery_row: i64,
    pub delivery_id: String,
    pub source: String,
    pub rule: String,
    pub upstream: String,
    pub project: String,
    pub git_ref: String,
    pub token_ref: String,
    pub variables: serde_json::Map<String, serde_json::Value>,
    pub inputs: serde_json::Map<String, serde_json::Value>,
    /// Attempts before this one.
    pub attempts: i64,
    pub created_at: i64,
}

/// The outcome of an attempt, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recorded {
    Sent {
        status: u16,
        pipeline_id: Option<i64>,
        pipeline_url: Option<String>,
    },
    Retry {
        due_at: i64,
        status: Option<u16>,
        reason: String,
    },
    Failed {
        status: Option<u16>,
        reason: String,
        pipeline_id: Option<i64>,
        pipeline_url: Option<String>,
    },
    DryRun {
        would_send: String,
    },
    /// Claimed but not sent (shutdown): due again.
    Released,
    /// Held back by a rate limit or a paused project: due again then, no attempt counted.
    Deferred {
        due_at: i64,
        reason: String,
    },
}

/// What `replay` re-queues.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplayTarget {
    Trigger(i64),
    Delivery(String),
}

impl ReplayTarget {
    /// `42` or `trigger:42` is a trigger; `delivery:ID` or any other text a delivery id.
    pub fn parse(text: &str) -> ReplayTarget {
        let text = text.trim();
        if let Some(id) = text
            .strip_prefix("trigger:")
            .or(Some(text))
            .and_then(|t| t.parse().ok())
        {
            return ReplayTarget::Trigger(id);
        }
        ReplayTarget::Delivery(text.strip_prefix("delivery:").unwrap_or(text).to_owned())
    }
}

impl fmt::Display for ReplayTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplayTarget::Trigger(id) => write!(f, "trigger {id}"),
            ReplayTarget::Delivery(id) => write!(f, "delivery {id}"),
        }
    }
}

/// One row of `hookrelay deliveries`.
#[derive(Clone, Debug, Serialize)]
pub struct DeliveryRow {
    pub received_at: i64,
    pub source: String,
    pub delivery_id: String,
    pub event_type: String,
    pub trigger_id: Option<i64>,
    pub rule: Option<String>,
    pub project: Option<String>,
    pub git_ref: Option<String>,
    pub state: Option<String>,
    pub attempts: i64,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub pipeline_url: Option<String>,
    pub replay_of: Option<i64>,
    pub coalesced_into: Option<i64>,
}

/// Why the store could not do something.
#[derive(Debug, thiserror::Error)]
#[error("the delivery store ({path}) failed: {reason}")]
pub struct StoreError {
    pub path: String,
    pub reason: String,
}

enum Op {
    Accept(NewDelivery, oneshot::Sender<Result<Accepted, String>>),
    /// A record that acknowledges nothing (a gateway call): no reply, no fsync of its own.
    Note(NewDelivery),
    Claim(usize, oneshot::Sender<Result<Vec<DueTrigger>, String>>),
    Record(i64, Recorded),
    Replay(ReplayTarget, oneshot::Sender<Result<Vec<i64>, String>>),
    Prune(i64, oneshot::Sender<Result<usize, String>>),
    Flush(oneshot::Sender<()>),
}

/// A handle on the store; cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    writer: mpsc::UnboundedSender<Op>,
    path: Arc<PathBuf>,
    /// Woken when triggers are queued, so the forwarder need not poll for them.
    pub queued: Arc<Notify>,
}

impl Outbox {
    /// Opens the store in `state_dir` (creating both), makes triggers that were being sent
    /// when the process died due again, and starts the writer thread.
    pub fn open(state_dir: &Path, durability: Durability) -> Result<Outbox, StoreError> {
        let path = state_dir.join(STORE_FILE);
        let error = |reason: String| StoreError {
            path: path.display().to_string(),
            reason,
        };
        std::fs::create_dir_all(state_dir).map_err(|err| error(err.to_string()))?;
        let conn = store::open(&path).map_err(|err| error(err.to_string()))?;
        let requeued = store::requeue_in_flight(&conn).map_err(|err| error(err.to_string()))?;
        if requeued > 0 {
            tracing::warn!(
                requeued,
                "triggers that were being sent when the relay stopped are due again"
            );
        }
        let (writer, requests) = mpsc::unbounded_channel();
        let queued = Arc::new(Notify::new());
        let notify = queued.clone();
        std::thread::Builder::new()
            .name("hookrelay-store".into())
            .spawn(move || write_loop(conn, requests, durability, notify))
            .map_err(|err| error(err.to_string()))?;
        Ok(Outbox {
            writer,
            path: Arc::new(path),
            queued,
        })
    }

    fn error(&self, reason: impl Into<String>) -> StoreError {
        StoreError {
            path: self.path.display().to_string(),
            reason: reason.into(),
        }
    }

    async fn ask<T>(
        &self,
        op: impl FnOnce(oneshot::Sender<Result<T, String>>) -> Op,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.writer
            .send(op(reply))
            .map_err(|_| self.error("the writer has stopped"))?;
        answer
            .await
            .map_err(|_| self.error("the writer stopped before answering"))?
            .map_err(|reason| self.error(reason))
    }

    /// Records a delivery and its triggers; returns once they are committed to disk.
    pub async fn accept(&self, delivery: NewDelivery) -> Result<Accepted, StoreError> {
        self.ask(|reply| Op::Accept(delivery, reply)).await
    }

    /// Records a delivery that acknowledges nothing (a gateway call), without waiting.
    pub fn note(&self, delivery: NewDelivery) {
        let _ = self.writer.send(Op::Note(delivery));
    }

    /// Claims due triggers for sending.
    pub async fn claim(&self, limit: usize) -> Result<Vec<DueTrigger>, StoreError> {
        self.ask(|reply| Op::Claim(limit, reply)).await
    }

    /// Records an attempt's outcome (committed with the next group).
    pub fn record(&self, id: i64, recorded: Recorded) {
        let _ = self.writer.send(Op::Record(id, recorded));
    }

    pub async fn replay(&self, target: ReplayTarget) -> Result<Vec<i64>, StoreError> {
        self.ask(|reply| Op::Replay(target, reply)).await
    }

    pub async fn prune(&self, before_ms: i64) -> Result<usize, StoreError> {
        self.ask(|reply| Op::Prune(before_ms, reply)).await
    }

    /// Waits until everything sent to the writer so far is committed.
    pub async fn flush(&self) {
        let (reply, done) = oneshot::channel();
        if self.writer.send(Op::Flush(reply)).is_ok() {
            let _ = done.await;
        }
    }

    /// Triggers waiting or being sent, and how long the longest-due one has been due.
    pub fn depth(&self) -> Result<(i64, std::time::Duration), StoreError> {
        let conn = read_connection(&self.path).map_err(|err| self.error(err.to_string()))?;
        let now = now_ms();
        let (depth, oldest) =
            store::depth(&conn, now).map_err(|err| self.error(err.to_string()))?;
        let age = oldest.map(|due| (now - due).max(0) as u64).unwrap_or(0);
        Ok((depth, std::time::Duration::from_millis(age)))
    }

    /// When the next queued trigger is due (milliseconds since 1970).
    pub fn next_due(&self) -> Result<Option<i64>, StoreError> {
        let conn = read_connection(&self.path).map_err(|err| self.error(err.to_string()))?;
        store::next_due(&conn).map_err(|err| self.error(err.to_string()))
    }
}

fn read_connection(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    Ok(conn)
}

/// A store error about `path`.
fn store_error(path: &Path, reason: impl ToString) -> StoreError {
    StoreError {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// Opens the store of a state folder from outside the server; it must exist already.
fn open_existing(state_dir: &Path) -> Result<(Connection, PathBuf), StoreError> {
    let path = state_dir.join(STORE_FILE);
    if !path.exists() {
        return Err(store_error(
            &path,
            "no store here yet; is this the relay's --state folder?",
        ));
    }
    let conn = store::open(&path).map_err(|err| store_error(&path, err))?;
    Ok((conn, path))
}

/// Reads the store of a state folder without the server (`deliveries`), or beside it.
pub fn list(
    state_dir: &Path,
    failed_only: bool,
    limit: usize,
) -> Result<Vec<DeliveryRow>, StoreError> {
    let (conn, path) = open_existing(state_dir)?;
    store::list(&conn, failed_only, limit).map_err(|err| store_error(&path, err))
}

/// A stored webhook, as it arrived but for its secret headers.
pub struct StoredWebhook {
    pub source: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

/// Reads a stored webhook by its delivery id (`explain --delivery`).
pub fn stored_webhook(state_dir: &Path, delivery_id: &str) -> Result<StoredWebhook, StoreError> {
    let (conn, path) = open_existing(state_dir)?;
    let (source, headers, body) = store::stored_webhook(&conn, delivery_id)
        .map_err(|err| store_error(&path, err))?
        .ok_or_else(|| store_error(&path, format!("no delivery {delivery_id:?} in the store")))?;
    let headers = serde_json::from_str(&headers).map_err(|err| store_error(&path, err))?;
    Ok(StoredWebhook {
        source,
        headers,
        body: Bytes::from(body),
    })
}

/// Re-queues from outside the server (`hookrelay replay`); a running server picks it up.
pub fn replay_offline(state_dir: &Path, target: &ReplayTarget) -> Result<Vec<i64>, StoreError> {
    let (mut conn, path) = open_existing(state_dir)?;
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(|err| store_error(&path, err))?;
    let ids = store::replay(&tx, target, now_ms()).map_err(|reason| store_error(&path, reason))?;
    tx.commit().map_err(|err| store_error(&path, err))?;
    Ok(ids)
}

/// The writer thread: takes every waiting request into one transaction and commits once.
fn write_loop(
    mut conn: Connection,
    mut requests: mpsc::UnboundedReceiver<Op>,
    durability: Durability,
    queued: Arc<Notify>,
) {
    let mut synchronous = "FULL";
    while let Some(first) = requests.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < GROUP_MAX {
            match requests.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        // Only a commit that precedes an acknowledgement needs to reach the disk first.
        let acknowledges = batch
            .iter()
            .any(|op| matches!(op, Op::Accept(..) | Op::Replay(..)));
        let wanted = match (durability, acknowledges) {
            (Durability::Off, _) => "OFF",
            (Durability::Full, true) => "FULL",
            (Durability::Full, false) => "NORMAL",
        };
        if wanted != synchronous && conn.pragma_update(None, "synchronous", wanted).is_ok() {
            synchronous = wanted;
        }
        let now = now_ms();
        let mut replies: Vec<Reply> = Vec::new();
        let mut new_triggers = false;
        let result = (|| -> rusqlite::Result<()> {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            for op in batch {
                // Each request in its own savepoint: one failing does not undo the others.
                begin_op(&tx);
                match op {
                    Op::Accept(delivery, reply) => {
                        let outcome = store::insert_delivery(&tx, &delivery, now, true)
                            .map_err(|e| e.to_string());
                        if matches!(&outcome, Ok(Accepted::Queued { trigger_ids, .. }) if !trigger_ids.is_empty())
                        {
                            new_triggers = true;
                        }
                        end_op(&tx, outcome.is_ok());
                        replies.push(answer(reply, outcome));
                    }
                    Op::Note(delivery) => {
                        // Notes carry ids unique by construction: no duplicate lookup.
                        let outcome = store::insert_delivery(&tx, &delivery, now, false)
                            .map_err(|e| e.to_string());
                        if let Err(reason) = &outcome {
                            tracing::warn!(%reason, "a record could not be stored");
                        }
                        end_op(&tx, outcome.is_ok());
                    }
                    Op::Claim(limit, reply) => {
                        let outcome = store::claim_due(&tx, now, limit).map_err(|e| e.to_string());
                        end_op(&tx, outcome.is_ok());
                        replies.push(answer(reply, outcome));
                    }
                    Op::Record(id, recorded) => {
                        let outcome =
                            store::record(&tx, id, &recorded, now).map_err(|e| e.to_string());
                        if matches!(
                            recorded,
                            Recorded::Retry { .. } | Recorded::Released | Recorded::Deferred { .. }
                        ) {
                            new_triggers = true;
                        }
                        if let Err(reason) = &outcome {
                            tracing::error!(trigger = id, %reason, "could not record a trigger's outcome");
                        }
                        end_op(&tx, outcome.is_ok());
                    }
                    Op::Replay(target, reply) => {
                        let outcome = store::replay(&tx, &target, now);
                        new_triggers |= outcome.is_ok();
                        end_op(&tx, outcome.is_ok());
                        replies.push(answer(reply, outcome));
                    }
                    Op::Prune(before, reply) => {
                        let outcome = store::prune(&tx, before).map_err(|e| e.to_string());
                        end_op(&tx, outcome.is_ok());
                        replies.push(answer(reply, outcome));
                    }
                    Op::Flush(reply) => {
                        end_op(&tx, true);
                        replies.push(Box::new(move |_| {
                            let _ = reply.send(());
                        }));
                    }
                }
            }
            tx.commit()
        })();
        let failure = result.err().map(|err| format!("commit failed: {err}"));
        if let Some(reason) = &failure {
            tracing::error!(%reason, "the delivery store could not commit; nothing in this group was acknowledged");
        }
        for reply in replies {
            reply(failure.as_deref());
        }
        if new_triggers && failure.is_none() {
            queued.notify_one();
        }
    }
}

/// Answers a request once its group's commit is known: the request's own outcome, or the
/// commit's failure (`Some(reason)`), which undoes everything in the group.
type Reply = Box<dyn FnOnce(Option<&str>) + Send>;

fn answer<T: Send + 'static>(
    reply: oneshot::Sender<Result<T, String>>,
    outcome: Result<T, String>,
) -> Reply {
    Box::new(move |failed| {
        let _ = reply.send(match failed {
            Some(reason) => Err(reason.to_owned()),
            None => outcome,
        });
    })
}

/// Starts a request's savepoint inside the group's transaction.
fn begin_op(tx: &rusqlite::Transaction<'_>) {
    let _ = tx
        .prepare_cached("SAVEPOINT op")
        .and_then(|mut s| s.execute([]));
}

/// Ends a request's savepoint: kept when it succeeded, rolled back when it failed.
fn end_op(tx: &rusqlite::Transaction<'_>, succeeded: bool) {
    let sql = if succeeded {
        "RELEASE op"
    } else {
        "ROLLBACK TO op; RELEASE op"
    };
    let _ = tx.execute_batch(sql);
}
