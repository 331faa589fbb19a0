//! The storage seam: what the outbox keeps, and the one interface its engines implement.
//!
//! The outbox's logic (group commit, claims, leases, retries from memory, coalescing,
//! retention) lives in `crate::outbox` and talks to a database only through [`Engine`].
//! Each engine keeps its own SQL in its own file; SQLite ([`sqlite`]) is the embedded
//! default. Every engine keeps the queue in the same shape: one row per
//! upstream+project+ref (its *key*) naming the key's head — its oldest unfinished trigger —
//! and when that head is due, or that it is leased for sending. A claim reads only keys
//! with due work, so its cost does not grow with the triggers waiting behind a held head,
//! and nothing the relay runs periodically reads the whole backlog.
//!
//! This module never logs and never sees a token: triggers carry token references only.

pub mod lock;
pub mod postgres;
pub mod private;
#[cfg(test)]
pub mod semantics;
pub mod sqlite;
mod text;
pub mod write_back;

use std::fmt;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::Serialize;

pub use text::bounded_key;

/// Token references of gateway calls start with this: the caller's token is not stored.
pub const CALLER_TOKEN: &str = "caller token ";

/// Where the outbox lives: SQLite in a state folder (one relay), or a PostgreSQL database
/// shared by any number of relays.
#[derive(Clone, Debug)]
pub enum StoreLocation {
    Folder(PathBuf),
    Postgres(postgres::PostgresConfig),
}

/// The environment variable that sets (or overrides) `[store] url`.
pub const STORE_URL_ENV: &str = "HOOKRELAY_STORE_URL";

impl StoreLocation {
    /// For messages: the store file, or the database URL without its password.
    pub fn describe(&self) -> String {
        match self {
            StoreLocation::Folder(dir) => dir.join(sqlite::STORE_FILE).display().to_string(),
            StoreLocation::Postgres(config) => config.describe(),
        }
    }

    /// Chooses the store: `--store URL` first, then the configured (or environment's)
    /// database, else SQLite in the state folder. A password on the command line is
    /// refused: every user of the machine can read it there.
    pub fn choose(
        state: &std::path::Path,
        flag: Option<&str>,
        configured: Option<postgres::PostgresConfig>,
    ) -> Result<StoreLocation, String> {
        match (flag, configured) {
            (Some(url), configured) => {
                if postgres::has_password(url) {
                    return Err(format!(
                        "--store: a password on the command line is visible to every user of this machine; \
                         set {} instead, or write [store] password = \"env:NAME\"",
                        STORE_URL_ENV
                    ));
                }
                postgres::PostgresConfig::parse_url(url)
                    .map_err(|err| format!("--store: {err}"))?;
                let mut config = configured.unwrap_or_else(|| postgres::PostgresConfig::new(url));
                config.url = url.to_owned();
                Ok(StoreLocation::Postgres(config))
            }
            (None, Some(config)) => Ok(StoreLocation::Postgres(config)),
            (None, None) => Ok(StoreLocation::Folder(state.to_owned())),
        }
    }

    /// For commands without a configuration: `--store`, `HOOKRELAY_STORE_URL`, or the
    /// state folder.
    pub fn from_command_line(
        state: &std::path::Path,
        flag: Option<&str>,
    ) -> Result<StoreLocation, String> {
        let from_env = match std::env::var(STORE_URL_ENV) {
            Ok(url) if !url.is_empty() => {
                postgres::PostgresConfig::parse_url(&url)
                    .map_err(|err| format!("{}: {err}", STORE_URL_ENV))?;
                Some(postgres::PostgresConfig::new(url))
            }
            _ => None,
        };
        StoreLocation::choose(state, flag, from_env)
    }

    /// Whether several relays may share this store (and so must share limits and pauses).
    pub fn is_shared(&self) -> bool {
        matches!(self, StoreLocation::Postgres(_))
    }
}

/// Runs a blocking store call from async code without stalling the runtime's other tasks
/// (and without the PostgreSQL client's own runtime nesting inside tokio's). A
/// current-thread runtime (an event loop) cannot lend its thread, so there the call runs on
/// a thread of its own while the loop waits: requests on a loop read the store with
/// [`crate::outbox::Outbox::read_apart`] instead, and this is only the safety net.
pub fn blocking<T: Send>(call: impl FnOnce() -> T + Send) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(call)
        }
        Ok(_) => std::thread::scope(|scope| {
            scope
                .spawn(call)
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        }),
        Err(_) => call(),
    }
}

/// A store whose schema is at `version`, past the `known` versions of this relay: a newer
/// relay migrated it. This one runs on it (and warns) only when that one wrote that
/// relays knowing `known` versions may (`floor`); otherwise it refuses to start, saying
/// what to do, rather than write tables whose meaning it does not know.
fn newer_schema(version: i64, floor: Option<i64>, known: usize) -> Result<(), EngineError> {
    match floor {
        Some(floor) if floor <= known as i64 => {
            tracing::warn!(
                schema = version,
                known,
                "the store was migrated by a newer hookrelay, which lets this version run beside it; upgrade this relay too"
            );
            Ok(())
        }
        _ => Err(EngineError::refused(format!(
            "the store was migrated by a newer hookrelay (schema {version}; this hookrelay knows \
             schemas up to {known}{}): run that newer hookrelay, or restore the store from a \
             backup taken before the upgrade",
            floor
                .map(|floor| format!(", and the store takes relays of schema {floor} or later"))
                .unwrap_or_default()
        ))),
    }
}

/// Milliseconds since 1970, the store's clock.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A webhook (or gateway call) to record, with the triggers it produced.
#[derive(Clone, Debug)]
pub struct NewDelivery {
    pub source: String,
    pub delivery_id: String,
    pub event_type: String,
    /// Headers without signatures, tokens or credentials.
    pub headers: Vec<(String, String)>,
    pub body: StoredBody,
    /// The answer given to the sender, already serialized.
    pub summary: String,
    pub triggers: Vec<NewTrigger>,
}

/// No stored body decompresses to more than this (bodies are limited far below it).
const MAX_STORED_BODY: usize = 256 * 1024 * 1024;

/// A delivery's body as it is stored: LZ4-compressed (size prepended) when that makes it
/// smaller. A webhook's JSON shrinks four to five times, and so does what each
/// acknowledgement writes. Encoded on the thread that received the webhook, so the writer
/// that every acknowledgement waits for never spends time on it.
#[derive(Clone, Debug, Default)]
pub struct StoredBody {
    pub bytes: Bytes,
    /// `None` for the body as it came, `Some("lz4")`.
    pub encoding: Option<&'static str>,
}

impl StoredBody {
    /// Compresses `raw` when that makes it smaller. Each thread keeps its compression
    /// table and scratch buffer from one body to the next instead of allocating them for
    /// every webhook (and shrinking the output after): 2,500 fewer instructions for a 7.8 KB
    /// push, 3 % of storing it (`benches/instructions.sh`).
    pub fn encode(raw: Bytes) -> StoredBody {
        thread_local! {
            static SCRATCH: std::cell::RefCell<(lz4_flex::block::CompressTable, Vec<u8>)> =
                std::cell::RefCell::new(Default::default());
        }
        if raw.len() >= 256 {
            let compressed = SCRATCH.with_borrow_mut(|(table, buffer)| {
                buffer.resize(4 + lz4_flex::block::get_maximum_output_size(raw.len()), 0);
                buffer[..4].copy_from_slice(&(raw.len() as u32).to_le_bytes());
                let size = lz4_flex::block::compress_into_with_table(&raw, &mut buffer[4..], table)
                    .expect("the buffer holds the largest output");
                let compressed =
                    (4 + size < raw.len()).then(|| Bytes::copy_from_slice(&buffer[..4 + size]));
                // A rare huge body does not keep its buffer's size for good.
                if buffer.capacity() > 1024 * 1024 {
                    *buffer = Vec::new();
                }
                compressed
            });
            if let Some(bytes) = compressed {
                return StoredBody {
                    bytes,
                    encoding: Some("lz4"),
                };
            }
        }
        StoredBody {
            bytes: raw,
            encoding: None,
        }
    }

    /// The body as it arrived, from what was stored.
    pub fn decode(stored: Vec<u8>, encoding: Option<&str>) -> Result<Vec<u8>, String> {
        match encoding {
            None => Ok(stored),
            Some("lz4") => {
                let size = stored
                    .get(..4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
                    .ok_or("a stored body is cut short")?;
                if size > MAX_STORED_BODY {
                    return Err(format!(
                        "a stored body claims {size} bytes; the store is damaged"
                    ));
                }
                lz4_flex::block::decompress_size_prepended(&stored)
                    .map_err(|err| format!("a stored body cannot be decompressed: {err}"))
            }
            Some(other) => Err(format!("a stored body has an unknown encoding {other:?}")),
        }
    }
}

/// What a queued row asks the forwarder to do. Every kind shares the queue's shape (one
/// head per order key, leases, retries, `deliveries`), so a status post is as durable as
/// the trigger that caused it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkKind {
    /// A pipeline trigger call to GitLab.
    #[default]
    Trigger,
    /// A commit status posted to the forge a webhook came from.
    Status,
    /// A look at a pipeline GitLab started, for its status (where no pipeline events come).
    Poll,
}

impl WorkKind {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkKind::Trigger => "trigger",
            WorkKind::Status => "status",
            WorkKind::Poll => "poll",
        }
    }

    /// The kind stored as `text`; rows written before kinds existed are triggers.
    pub fn parse(text: &str) -> WorkKind {
        match text {
            "status" => WorkKind::Status,
            "poll" => WorkKind::Poll,
            _ => WorkKind::Trigger,
        }
    }
}

/// One trigger call to make later (or, for a gateway call, already made), or another
/// kind of work ([`WorkKind`]): for a status post, `upstream` is the forge's source,
/// `project` the repository, `git_ref` the commit and `variables` the post.
#[derive(Clone, Debug)]
pub struct NewTrigger {
    pub kind: WorkKind,
    pub rule: String,
    pub upstream: String,
    pub project: String,
    pub git_ref: String,
    /// `env:NAME` / `file:PATH`; never the token.
    pub token_ref: String,
    /// A JSON object of strings, already serialized.
    pub variables: String,
    /// A JSON object, already serialized.
    pub inputs: String,
    /// Wait this long before the first attempt.
    pub delay_ms: i64,
    /// `coalesce`: hold the trigger this long, taking in identical ones meanwhile (0: no).
    pub coalesce_ms: i64,
    /// Set when the call was already made (the gateway): recorded as finished.
    pub done: Option<Recorded>,
    /// Where the statuses of the pipeline this trigger starts go (a
    /// [`crate::status::StatusTarget`] as JSON); `None`: nowhere.
    pub status_target: Option<String>,
    /// The pipeline a status post or a poll is about.
    pub pipeline_id: Option<i64>,
    /// Work other than a trigger names the key it is kept in order under.
    pub queue_key: Option<String>,
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
            variables: serde_json::to_string(&trigger.variables).expect("variables serialize"),
            inputs: serde_json::to_string(&trigger.inputs).expect("inputs serialize"),
            delay_ms: 0,
            coalesce_ms: coalesce.map(|c| c.as_millis() as i64).unwrap_or(0),
            done: None,
            kind: WorkKind::Trigger,
            status_target: None,
            pipeline_id: None,
            queue_key: None,
        }
    }

    /// The key its order is kept under: one trigger per key is sent at a time, in order.
    pub fn order_key(&self) -> String {
        if let Some(key) = &self.queue_key {
            return bounded_key(key.clone());
        }
        bounded_key(format!(
            "{}\u{1f}{}\u{1f}{}",
            self.upstream, self.project, self.git_ref
        ))
    }

    /// With a `coalesce` window, what an identical trigger shares with it: same key, token,
    /// variables and inputs.
    pub fn coalesce_key(&self, order_key: &str) -> Option<String> {
        (self.coalesce_ms > 0 && self.done.is_none()).then(|| {
            bounded_key(format!(
                "{order_key}\u{1f}{}\u{1f}{}\u{1f}{}",
                self.token_ref, self.variables, self.inputs
            ))
        })
    }

    /// Its outcome's columns when it is recorded finished already (a gateway call), stored
    /// by the insert; else its outcome, if any, is written after the insert.
    pub fn finished(&self) -> Option<Finished<'_>> {
        self.done.as_ref().and_then(Recorded::finished)
    }

    /// The state it is stored in, and when it falls due: finished (a gateway call),
    /// coalesced into `into`, or queued after its delay and window.
    pub fn initial_state(&self, into: Option<i64>, now: i64) -> (&'static str, i64) {
        match (&self.done, into) {
            (Some(done), _) => (done.finished().map_or("done", |end| end.state), now),
            (None, Some(_)) => ("coalesced", now),
            (None, None) => ("queued", now + self.delay_ms + self.coalesce_ms),
        }
    }
}

/// Why trigger `id` cannot be replayed, if it cannot: it is still to be sent, or it was
/// a gateway call whose token was never stored.
pub fn replay_refusal(id: i64, state: &str, token_ref: &str) -> Option<EngineError> {
    if matches!(state, "queued" | "sending" | "coalesced") {
        return Some(EngineError::refused(format!(
            "trigger {id} is still {state}; it will be sent without a replay"
        )));
    }
    token_ref.starts_with(CALLER_TOKEN).then(|| {
        EngineError::refused(format!(
            "trigger {id} was a gateway call: the caller's token is not stored, so it cannot be sent again"
        ))
    })
}

/// The refusal of a replay that found nothing to queue: an unknown trigger or delivery, or
/// a delivery that queued no trigger (`stored`: it is in the store), which `replay
/// --replan` runs through today's rules instead.
pub fn nothing_to_replay(target: &ReplayTarget, stored: bool) -> EngineError {
    match (target, stored) {
        (ReplayTarget::Delivery(id), true) => EngineError::refused(format!(
            "delivery {id} queued no trigger to replay (it matched no rule, or was a ping); `hookrelay replay --replan {id}` runs it through today's rules"
        )),
        _ => EngineError::refused(format!("{target} is not in the store")),
    }
}

/// Queues again the triggers of the webhook `source` sent as `delivery_id` (its whole
/// id), in the engine's open transaction: where two sources sent the same id, a replay of
/// the id alone takes both sources' triggers. Each is refused as a trigger replay would be.
pub fn replay_from(
    engine: &mut dyn Engine,
    source: &str,
    delivery_id: &str,
    now: i64,
) -> Result<Vec<i64>, EngineError> {
    // A webhook's own rows: one per trigger or status it queued, a handful.
    const ITS_ROWS: usize = 10_000;
    let rows = engine.list(&ListFilter::of_webhook(source, delivery_id, ITS_ROWS))?;
    if rows.is_empty() {
        return Err(EngineError::refused(format!(
            "no delivery {delivery_id:?} from source {source} in the store"
        )));
    }
    let mut originals: Vec<i64> = rows
        .iter()
        .filter(|row| row.replay_of.is_none() && row.kind.as_deref() == Some("trigger"))
        .filter_map(|row| row.trigger_id)
        .collect();
    originals.sort_unstable();
    if originals.is_empty() {
        return Err(EngineError::refused(format!(
            "delivery {delivery_id:?} from source {source} queued no trigger to replay"
        )));
    }
    let mut queued = Vec::new();
    for id in originals {
        queued.extend(engine.replay(&ReplayTarget::Trigger(id), now)?);
    }
    Ok(queued)
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

impl Accepted {
    /// Whether the forwarder may find new work to claim: some trigger was queued on its
    /// own. One coalesced into a trigger already waiting changes no key's head or due
    /// time, so a burst for one project+ref wakes the forwarder once, not once a group.
    pub fn adds_work(&self) -> bool {
        match self {
            Accepted::Queued { coalesced, .. } => coalesced.iter().any(Option::is_none),
            Accepted::Duplicate { .. } => false,
        }
    }
}

/// A claim on one trigger: whoever records its outcome must show it. An outcome recorded
/// with a lease that is no longer current (the trigger was claimed again since) changes
/// nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Lease {
    pub trigger: i64,
    /// The fencing token the engine handed out with the claim.
    pub token: i64,
    /// The claimed trigger's pipeline reports its status (it has a status target), so
    /// recording its answer queues the first status; other outcomes skip the lookup.
    pub reports_status: bool,
}

/// A trigger claimed for sending.
#[derive(Clone, Debug)]
pub struct DueTrigger {
    pub id: i64,
    pub kind: WorkKind,
    /// The pipeline a status post or a poll is about.
    pub pipeline_id: Option<i64>,
    pub lease: Lease,
    pub delivery_row: i64,
    pub delivery_id: String,
    pub source: String,
    pub rule: String,
    pub upstream: String,
    pub project: String,
    pub git_ref: String,
    /// The key it heads (its upstream, project and ref, or a status's own).
    pub order_key: String,
    pub token_ref: String,
    pub variables: serde_json::Map<String, serde_json::Value>,
    pub inputs: serde_json::Map<String, serde_json::Value>,
    /// Attempts before this one.
    pub attempts: i64,
    pub created_at: i64,
}

/// What one claim handed out, and when the next key falls due.
#[derive(Clone, Debug, Default)]
pub struct Claimed {
    pub due: Vec<DueTrigger>,
    /// When the earliest key not handed out falls due (milliseconds since 1970).
    pub next_due: Option<i64>,
}

/// An upstream that is down: its waiting triggers are due again only after the pause.
/// Moving them all at once, when the pause starts, spares a claim and a deferral per
/// project+ref for every pause of an outage (10,000 of each with 10,000 keys waiting).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamHold {
    pub upstream: String,
    /// When the pause ends (milliseconds since 1970).
    pub until: i64,
    /// Each key falls due at a random moment this long after `until` (milliseconds), so
    /// the end of a pause is a few probes, not every project+ref at once.
    pub spread_ms: i64,
    /// What the dashboard says of each held trigger.
    pub reason: String,
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

impl Recorded {
    /// The same outcome with its deadline (a retry's, a deferral's) `by` milliseconds
    /// earlier: made before a clock was set back, it keeps the time it had left.
    pub fn moved_back(&self, by: i64) -> Recorded {
        match self {
            Recorded::Retry {
                due_at,
                status,
                reason,
            } => Recorded::Retry {
                due_at: due_at - by,
                status: *status,
                reason: reason.clone(),
            },
            Recorded::Deferred { due_at, reason } => Recorded::Deferred {
                due_at: due_at - by,
                reason: reason.clone(),
            },
            other => other.clone(),
        }
    }

    /// Whether the trigger is finished after this outcome (its key moves to the next one).
    pub fn finishes(&self) -> bool {
        matches!(
            self,
            Recorded::Sent { .. } | Recorded::Failed { .. } | Recorded::DryRun { .. }
        )
    }

    /// The columns a trigger that is finished by this outcome is stored with, so a trigger
    /// recorded already finished (a gateway call) is one insert, not an insert and an update.
    pub fn finished(&self) -> Option<Finished<'_>> {
        match self {
            Recorded::Sent {
                status,
                pipeline_id,
                pipeline_url,
            } => Some(Finished {
                state: "sent",
                status: Some(*status),
                error: None,
                pipeline_id: *pipeline_id,
                pipeline_url: pipeline_url.as_deref(),
            }),
            Recorded::Failed {
                status,
                reason,
                pipeline_id,
                pipeline_url,
            } => Some(Finished {
                state: "failed",
                status: *status,
                error: Some(reason),
                pipeline_id: *pipeline_id,
                pipeline_url: pipeline_url.as_deref(),
            }),
            Recorded::DryRun { would_send } => Some(Finished {
                state: "dry-run",
                status: None,
                error: Some(would_send),
                pipeline_id: None,
                pipeline_url: None,
            }),
            Recorded::Retry { .. } | Recorded::Released | Recorded::Deferred { .. } => None,
        }
    }
}

/// What a finished trigger's row says of its end (see [`Recorded::finished`]): the same
/// columns the engines' outcome updates write. The default is a row with no outcome yet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Finished<'a> {
    pub state: &'static str,
    pub status: Option<u16>,
    pub error: Option<&'a str>,
    pub pipeline_id: Option<i64>,
    pub pipeline_url: Option<&'a str>,
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

/// Which deliveries `hookrelay deliveries` shows.
#[derive(Clone, Debug, Default)]
pub struct ListFilter {
    pub source: Option<String>,
    pub rule: Option<String>,
    pub project: Option<String>,
    pub state: Option<StateFilter>,
    pub kind: Option<DeliveryKind>,
    /// Received at or after (ms since 1970).
    pub since: Option<i64>,
    /// Received before (ms since 1970).
    pub until: Option<i64>,
    /// A delivery id, or the start of one.
    pub delivery: Option<String>,
    /// A whole delivery id: with `source`, found through the `(source, delivery_id)`
    /// index, where the start of one reads every delivery.
    pub whole_delivery: Option<String>,
    /// Text anywhere in the delivery id, the answer (repositories, refs) or a trigger's
    /// project or ref.
    pub text: Option<String>,
    /// Deliveries strictly older than this one (received at, row): the next page.
    pub before: Option<(i64, i64)>,
    pub limit: usize,
}

/// Where a delivery came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DeliveryKind {
    /// A webhook from a `[source.NAME]`.
    Webhook,
    /// A call to the trigger gateway.
    Gateway,
    /// A scheduled rule firing.
    Schedule,
    /// An action taken in the dashboard (who did what).
    Admin,
}

/// A trigger state to list, or deliveries without a trigger.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StateFilter {
    Queued,
    /// Queued again after a failed attempt.
    Retrying,
    Sending,
    Sent,
    Failed,
    Cancelled,
    /// Status posts a newer state of their pipeline replaced before they were sent.
    Superseded,
    /// Deliveries that queued no trigger (no match, ping, not handled, duplicate, refused).
    None,
    /// Webhooks that repeated a delivery id (recorded at most once a second per source).
    Duplicate,
    /// Webhooks a limit refused (recorded at most once a second per source).
    Refused,
}

/// A value bound to a filter's placeholder.
#[derive(Clone, Debug, PartialEq)]
pub enum SqlValue {
    Text(String),
    Int(i64),
}

impl ListFilter {
    /// The rows (at most `limit`) of the webhook `source` sent as `delivery_id` (its whole
    /// id): one seek on the `(source, delivery_id)` index.
    pub fn of_webhook(source: &str, delivery_id: &str, limit: usize) -> ListFilter {
        ListFilter {
            source: Some(source.to_owned()),
            whole_delivery: Some(delivery_id.to_owned()),
            limit,
            ..ListFilter::default()
        }
    }

    /// The `WHERE` clause over `deliveries d LEFT JOIN triggers t` (the same in both
    /// engines), with `placeholder(n)` for the n-th value (1-based), and the values.
    /// `position` is the engine's `(text, part)` search function (`instr`, `strpos`).
    pub fn where_clause(
        &self,
        placeholder: impl Fn(usize) -> String,
        position: &str,
    ) -> (String, Vec<SqlValue>) {
        let mut conditions: Vec<String> = Vec::new();
        let mut values = Vec::new();
        let bind = |value: SqlValue, values: &mut Vec<SqlValue>| {
            values.push(value);
            placeholder(values.len())
        };
        if let Some(source) = &self.source {
            let p = bind(SqlValue::Text(source.clone()), &mut values);
            conditions.push(format!("d.source = {p}"));
        }
        if let Some(rule) = &self.rule {
            let p = bind(SqlValue::Text(rule.clone()), &mut values);
            conditions.push(format!("t.rule = {p}"));
        }
        if let Some(project) = &self.project {
            let p = bind(SqlValue::Text(project.clone()), &mut values);
            conditions.push(format!("t.project = {p}"));
        }
        match self.kind {
            Some(DeliveryKind::Gateway) => conditions.push("d.source = 'gateway'".into()),
            Some(DeliveryKind::Schedule) => conditions.push("d.source = 'schedule'".into()),
            Some(DeliveryKind::Admin) => conditions.push("d.source = 'admin'".into()),
            Some(DeliveryKind::Webhook) => {
                conditions.push("d.source NOT IN ('gateway', 'schedule', 'admin')".into())
            }
            None => {}
        }
        if let Some(state) = self.state {
            conditions.push(
                match state {
                    StateFilter::Queued => "t.state = 'queued'",
                    StateFilter::Retrying => "t.state = 'queued' AND t.attempts > 0",
                    StateFilter::Sending => "t.state = 'sending'",
                    StateFilter::Sent => "t.state = 'sent'",
                    StateFilter::Failed => "t.state = 'failed'",
                    StateFilter::Cancelled => "t.state = 'cancelled'",
                    StateFilter::Superseded => "t.state = 'superseded'",
                    StateFilter::None => "t.id IS NULL",
                    StateFilter::Duplicate => "t.id IS NULL AND d.delivery_id LIKE '%~duplicate-%'",
                    StateFilter::Refused => "t.id IS NULL AND d.delivery_id LIKE '%~refused-%'",
                }
                .into(),
            );
        }
        if let Some(since) = self.since {
            let p = bind(SqlValue::Int(since), &mut values);
            conditions.push(format!("d.received_at >= {p}"));
        }
        if let Some(until) = self.until {
            let p = bind(SqlValue::Int(until), &mut values);
            conditions.push(format!("d.received_at < {p}"));
        }
        if let Some(text) = &self.text {
            let p = bind(SqlValue::Text(text.clone()), &mut values);
            conditions.push(format!(
                "({position}(d.delivery_id, {p}) > 0 OR {position}(d.summary, {p}) > 0 \
                 OR {position}(coalesce(t.project, ''), {p}) > 0 OR {position}(coalesce(t.git_ref, ''), {p}) > 0)"
            ));
        }
        if let Some((received_at, row)) = self.before {
            let at = bind(SqlValue::Int(received_at), &mut values);
            let id = bind(SqlValue::Int(row), &mut values);
            conditions.push(format!(
                "(d.received_at < {at} OR (d.received_at = {at} AND d.id < {id}))"
            ));
        }
        if let Some(delivery) = &self.delivery {
            // A prefix compared exactly, the same in both engines (SQLite's LIKE would
            // ignore case, PostgreSQL's would not).
            let p = bind(SqlValue::Text(delivery.clone()), &mut values);
            conditions.push(format!("substr(d.delivery_id, 1, length({p})) = {p}"));
        }
        if let Some(delivery) = &self.whole_delivery {
            let p = bind(SqlValue::Text(delivery.clone()), &mut values);
            conditions.push(format!("d.delivery_id = {p}"));
        }
        let clause = if conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conditions.join(" AND "))
        };
        (clause, values)
    }
}

/// What `hookrelay cancel` stops (and what a newer status supersedes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CancelTarget {
    Trigger(i64),
    /// The waiting status posts of one order key (repository, commit and context): a newer
    /// state replaces them. Recorded as `superseded`, not `cancelled`.
    Superseded {
        order_key: String,
    },
    /// Every waiting trigger for a project (on one upstream, or all).
    Project {
        project: String,
        upstream: Option<String>,
    },
}

impl fmt::Display for CancelTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CancelTarget::Trigger(id) => write!(f, "trigger {id}"),
            CancelTarget::Superseded { .. } => f.write_str("older status posts"),
            CancelTarget::Project {
                project,
                upstream: None,
            } => write!(f, "project {project}"),
            CancelTarget::Project {
                project,
                upstream: Some(upstream),
            } => write!(f, "project {project} on {upstream}"),
        }
    }
}

/// The error a cancel gets for a trigger it cannot stop, by the trigger's state.
pub fn cancel_refusal(id: i64, state: Option<&str>) -> EngineError {
    EngineError::refused(match state {
        None => format!("trigger {id} is not in the store"),
        Some("sending") => format!(
            "trigger {id} is being sent right now and cannot be stopped; its answer will be recorded"
        ),
        Some(state) => format!("trigger {id} is {state}, not waiting; there is nothing to cancel"),
    })
}

/// What the store says of a trigger an operator cancelled.
pub const CANCELLED_NOTE: &str = "cancelled by an operator (hookrelay cancel)";

/// What the store says of a status post a newer state of its pipeline replaced unsent.
pub const SUPERSEDED_NOTE: &str = "superseded by a newer status of the same commit and context";

impl CancelTarget {
    /// The state the stopped rows are left in, and the note they carry.
    pub fn outcome(&self) -> (&'static str, &'static str) {
        match self {
            CancelTarget::Superseded { .. } => ("superseded", SUPERSEDED_NOTE),
            _ => ("cancelled", CANCELLED_NOTE),
        }
    }
}

/// Which trigger started a pipeline: by the trigger's id, or by the pipeline's upstream
/// and id (what a pipeline event names).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OriginOf {
    Trigger(i64),
    Pipeline { upstream: String, pipeline_id: i64 },
}

/// The columns a [`PipelineOrigin`] is read from, in its fields' order (both engines).
pub const ORIGIN_COLUMNS: &str =
    "id, delivery, rule, upstream, project, status_target, pipeline_url";

/// A trigger as the status of its pipeline needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PipelineOrigin {
    pub trigger_id: i64,
    pub delivery_row: i64,
    pub rule: String,
    pub upstream: String,
    pub project: String,
    /// A [`crate::status::StatusTarget`] as JSON; `None` when its source reports nothing.
    pub status_target: Option<String>,
    pub pipeline_url: Option<String>,
}

/// One row of `hookrelay deliveries`.
#[derive(Clone, Debug, Serialize)]
pub struct DeliveryRow {
    /// The delivery's row in the store (with `received_at`, a page's cursor).
    pub row: i64,
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
    /// When a waiting trigger is next due (ms since 1970).
    pub due_at: Option<i64>,
    /// The trigger a waiting one waits for: the head of its upstream+project+ref, which go
    /// one at a time and in order. `None` for a head, and for work not waiting.
    pub waits_for: Option<i64>,
    /// The answer the webhook got (JSON), which says why nothing ran when nothing did.
    pub summary: String,
    /// `trigger`, `status` or `poll` (`None`: a delivery without work).
    pub kind: Option<String>,
}

/// A stored webhook, as it arrived but for its secret headers.
pub struct StoredWebhook {
    pub source: String,
    pub delivery_id: String,
    /// When it was received, as stored (milliseconds since 1970).
    pub received_at: i64,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// The webhook URL's `?ref=` it arrived with, which overrode its triggers' refs (as its
    /// stored answer says: `url_ref`).
    pub url_ref: Option<String>,
}

impl StoredWebhook {
    /// A stored row as an engine reads it: headers as stored (JSON), the body as stored
    /// (see [`StoredBody`]), `received_at` on the relay's clock, and its stored answer.
    pub(crate) fn from_stored(
        delivery_id: &str,
        source: String,
        headers: &str,
        (body, encoding): (Vec<u8>, Option<&str>),
        received_at: i64,
        summary: &str,
    ) -> Result<StoredWebhook, EngineError> {
        #[derive(serde::Deserialize)]
        struct Summary {
            url_ref: Option<String>,
        }
        Ok(StoredWebhook {
            delivery_id: delivery_id.to_owned(),
            source,
            received_at,
            headers: serde_json::from_str(headers)
                .map_err(|err| EngineError::failed(format!("stored headers: {err}")))?,
            body: Bytes::from(StoredBody::decode(body, encoding).map_err(EngineError::failed)?),
            url_ref: serde_json::from_str::<Summary>(summary)
                .ok()
                .and_then(|summary| summary.url_ref),
        })
    }
}

/// The outbox's depth, read without walking the backlog.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Depth {
    /// Triggers waiting or being sent.
    pub open: i64,
    /// When the earliest-due waiting key fell (or falls) due.
    pub earliest_due: Option<i64>,
}

/// Why an engine could not do something.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct EngineError {
    pub message: String,
    /// The store cannot be written right now (disk full, I/O error, busy, gone): the same
    /// request may succeed later, so outcomes of sends are kept and tried again.
    pub transient: bool,
    /// Not a failure: the store refuses this request (`replay` of an unknown id, say).
    pub refused: bool,
}

impl EngineError {
    /// A refusal that trying again will not change (`replay` of an unknown id, say).
    pub fn refused(message: impl Into<String>) -> EngineError {
        EngineError {
            message: message.into(),
            transient: false,
            refused: true,
        }
    }

    /// A failure that trying again will not mend.
    pub fn failed(message: impl Into<String>) -> EngineError {
        EngineError {
            message: message.into(),
            transient: false,
            refused: false,
        }
    }
}

/// Where a pruning pass goes on from: the last delivery it looked at, as
/// (`received_at`, row id).
pub type PruneCursor = (i64, i64);

/// What one step of a pruning pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    pub deleted: usize,
    /// Where the next step starts; `None` once the pass has looked at everything.
    pub next: Option<PruneCursor>,
}

impl Pruned {
    /// A step that looked at `looked` (received_at, row id, still to be sent), oldest
    /// first, and deleted `deleted` of them: the pass goes on after the last one unless
    /// the step found fewer than `batch`.
    pub fn step(deleted: usize, looked: &[(i64, i64, bool)], batch: usize) -> Pruned {
        Pruned {
            deleted,
            next: (looked.len() == batch)
                .then(|| looked.last().map(|(at, id, _)| (*at, *id)))
                .flatten(),
        }
    }
}

/// One database behind the outbox. The outbox's writer owns one engine and calls it from
/// one thread: [`Engine::begin`], any number of operations each inside its own savepoint,
/// then [`Engine::commit`]. Reads for metrics and commands use a second engine of their own.
pub trait Engine: Send + 'static {
    /// Where the data lives, for messages: a path, or a URL without its password.
    fn describe(&self) -> String;

    /// Starts a group's transaction; `durable`: its commit must reach stable storage.
    fn begin(&mut self, durable: bool) -> Result<(), EngineError>;
    fn commit(&mut self) -> Result<(), EngineError>;
    /// Undoes the open transaction, if any.
    fn rollback(&mut self);
    /// Starts one request's savepoint inside the group's transaction.
    fn savepoint(&mut self) -> Result<(), EngineError>;
    /// Ends the request's savepoint: kept, or rolled back when the request failed.
    fn release(&mut self, keep: bool);

    /// Whether claims may share a group's transaction with its writes (after them): for a
    /// store only this process writes, where a claim never waits on anyone. A shared
    /// store's claims go apart, so that no relay holds a key while it waits (see
    /// `Writer::group`).
    fn claims_share_commits(&self) -> bool {
        false
    }

    /// Before a read on the reader's connection, outside any transaction: connects again
    /// if the connection was lost (a database restarted), and on a shared store follows a
    /// failover (see `PostgresEngine::follow_a_failover`). Every read then works after
    /// an outage, not only those that happened to check.
    fn ready_to_read(&mut self) -> Result<(), EngineError> {
        Ok(())
    }

    /// How long a claim holds its key when other processes claim from the store too
    /// (`None`: only this one does, and no lease runs out while it lives).
    fn lease(&self) -> Option<std::time::Duration> {
        None
    }

    /// Whether the next claims may take over keys whose lease ran out (their holder died,
    /// froze or was cut off). A relay back from losing the store says no for a while: a
    /// holder back with it may have a send's outcome to write first (see
    /// `Writer::may_take_over`). Only a store other processes claim from has such keys.
    fn let_claims_take_over(&mut self, _allowed: bool) {}

    /// The store's clock minus this process's, as last seen (milliseconds): the database's
    /// clock decides for a shared store.
    fn clock_skew(&self) -> i64 {
        0
    }

    /// Records several deliveries at once, each with its own answer, in a few statements
    /// whatever their number; `None`: this engine (or this batch) goes one by one through
    /// [`Engine::insert_delivery`]. Called first in the group's transaction; on `Err` the
    /// caller rolls the transaction back and goes one by one in a new one.
    /// `someone_waits`: a caller waits for this commit (webhooks to acknowledge), not
    /// records nobody waits for (gateway calls), which may take longer to give the cores
    /// to those who wait.
    fn insert_deliveries(
        &mut self,
        _deliveries: &[&NewDelivery],
        _now: i64,
        _someone_waits: bool,
    ) -> Option<Result<Vec<Accepted>, EngineError>> {
        None
    }

    /// Records a delivery and its triggers, unless the source already delivered that id.
    fn insert_delivery(
        &mut self,
        delivery: &NewDelivery,
        now: i64,
    ) -> Result<Accepted, EngineError>;
    /// Leases up to `limit` due key heads, earliest due first.
    fn claim(&mut self, now: i64, limit: usize) -> Result<Claimed, EngineError>;
    /// Records an attempt's outcome under its lease; `Ok(false)` when the lease is stale.
    fn record(&mut self, lease: Lease, recorded: &Recorded, now: i64) -> Result<bool, EngineError>;
    /// Makes up to `limit` keys whose waiting head is a trigger for `hold.upstream`, due
    /// before the hold ends, due after it instead (no attempt counted), earliest due
    /// first; returns how many. Fewer than `limit`: none is left. Keys being sent are left
    /// alone, and on a shared store so is any row another relay holds: this waits on
    /// nobody, and what it skips is deferred when it is claimed.
    fn hold_upstream(
        &mut self,
        hold: &UpstreamHold,
        limit: usize,
        now: i64,
    ) -> Result<usize, EngineError>;
    /// Queues a finished trigger, or every first trigger of a delivery, again as new rows.
    fn replay(&mut self, target: &ReplayTarget, now: i64) -> Result<Vec<i64>, EngineError>;
    /// One step of a pruning pass: looks at the next `batch` deliveries received before
    /// `before` (oldest first, after `after`) and deletes those whose triggers are all
    /// finished. A step reads `batch` deliveries whatever waits in front of them, so a
    /// backlog older than the retention costs each step nothing extra.
    fn prune(
        &mut self,
        before: i64,
        batch: usize,
        after: Option<PruneCursor>,
    ) -> Result<Pruned, EngineError>;
    /// A small write that proves the store takes writes again.
    fn probe(&mut self, now: i64) -> Result<(), EngineError>;
    /// The latest time on the store's clock that a writer noted (see `outbox::clock`),
    /// read inside a transaction; on a shared store it also takes the lock under which
    /// deadlines are moved, so that relays seeing one step move them once between them.
    fn clock_noted(&mut self) -> Result<Option<i64>, EngineError>;
    /// Notes `now` as seen on the store's clock (never lowering what is noted), with the
    /// open transaction.
    fn note_clock(&mut self, now: i64) -> Result<(), EngineError>;
    /// The store's clock went back `by` milliseconds: every deadline still waiting (due
    /// times of waiting triggers and keys; on a shared store, limits and pauses) moves
    /// `by` earlier, so each keeps the time it had left, and `now` becomes the time noted.
    /// Leases are left as they are: a relay sending under one finishes it, and a dead
    /// relay's work is taken over at most `by` later.
    fn move_deadlines_back(&mut self, by: i64, now: i64) -> Result<(), EngineError>;
    /// At start: heads leased by a process that is gone are due again (at-least-once).
    fn recover_leases(&mut self) -> Result<usize, EngineError>;

    fn depth(&mut self) -> Result<Depth, EngineError>;
    fn list(&mut self, filter: &ListFilter) -> Result<Vec<DeliveryRow>, EngineError>;
    /// Stops waiting triggers (inside a transaction): each is marked cancelled and its key
    /// moves on; returns their ids. A trigger being sent cannot be stopped.
    fn cancel(&mut self, target: &CancelTarget, now: i64) -> Result<Vec<i64>, EngineError>;
    /// The newest stored webhook with this delivery id, from any source.
    fn stored_webhook(&mut self, delivery_id: &str) -> Result<Option<StoredWebhook>, EngineError>;
    /// The stored webhook `source` sent as `delivery_id` (two sources may each send an id,
    /// a generic sender's counter): one seek on the unique index.
    fn stored_webhook_from(
        &mut self,
        source: &str,
        delivery_id: &str,
    ) -> Result<Option<StoredWebhook>, EngineError>;
    /// Whether `source` sent `delivery_id` before: one seek on the unique index.
    fn is_stored(&mut self, source: &str, delivery_id: &str) -> Result<bool, EngineError>;

    /// Queues work (status posts, polls) under a delivery already recorded, as a
    /// delivery's triggers are queued; returns the new ids.
    fn queue_work(
        &mut self,
        delivery_row: i64,
        work: &[NewTrigger],
        now: i64,
    ) -> Result<Vec<i64>, EngineError>;
    /// The trigger that started a pipeline, as its statuses need it.
    fn pipeline_origin(&mut self, of: &OriginOf) -> Result<Option<PipelineOrigin>, EngineError>;
    /// The newest status post of an order key for one pipeline (its stored post, as JSON),
    /// cancelled ones aside. A shared store makes the caller wait here for another relay
    /// deciding the same key, until its transaction ends.
    fn newest_status(
        &mut self,
        order_key: &str,
        pipeline_id: i64,
    ) -> Result<Option<String>, EngineError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_stored_compressed_and_come_back_byte_for_byte() {
        let body = include_bytes!("../../tests/fixtures/github/push_tag.json");
        let stored = StoredBody::encode(Bytes::from_static(body));
        assert_eq!(stored.encoding, Some("lz4"));
        assert!(
            stored.bytes.len() * 3 < body.len(),
            "{} bytes stored",
            stored.bytes.len()
        );
        assert_eq!(
            StoredBody::decode(stored.bytes.to_vec(), stored.encoding).unwrap(),
            body
        );
        let small = StoredBody::encode(Bytes::from_static(b"{}"));
        assert_eq!((&small.bytes[..], small.encoding), (&b"{}"[..], None));
        let damaged = StoredBody::decode(vec![0xff, 0xff, 0xff, 0x7f, 1], Some("lz4")).unwrap_err();
        assert!(damaged.contains("damaged"), "{damaged}");
    }

    /// One thread's table and buffer serve bodies of every size in turn: each comes back
    /// byte for byte, a body past 64 KB (a table of wider entries) and a huge one (whose
    /// buffer is not kept) included, and one that does not shrink is stored as it came.
    #[test]
    fn bodies_of_every_size_in_turn_come_back_byte_for_byte() {
        let fixture =
            Bytes::from_static(include_bytes!("../../tests/fixtures/github/push_tag.json"));
        let mut rng = fastrand::Rng::with_seed(7);
        let noise: Vec<u8> = (0..3_000).map(|_| rng.u8(..)).collect();
        let wide = fixture.repeat(20);
        let huge = fixture.repeat(300);
        for (body, compressed) in [
            (fixture.to_vec(), true),
            (wide, true),
            (noise, false),
            (fixture.to_vec(), true),
            (huge, true),
            (fixture.to_vec(), true),
        ] {
            let stored = StoredBody::encode(Bytes::from(body.clone()));
            assert_eq!(
                stored.encoding.is_some(),
                compressed,
                "{} bytes",
                body.len()
            );
            let back = StoredBody::decode(stored.bytes.to_vec(), stored.encoding).unwrap();
            assert!(
                back == body,
                "{} bytes came back as {}",
                body.len(),
                back.len()
            );
        }
    }
}
