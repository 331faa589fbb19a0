//! The durable outbox: nothing acknowledged is ever lost.
//!
//! A webhook is acknowledged only after its delivery and triggers are committed (SQLite:
//! WAL with `synchronous = FULL` for every commit that precedes an acknowledgement). All
//! writes go through one writer thread that commits in groups: whatever requests are
//! waiting when a commit starts share it, so a burst of webhooks costs one fsync, not one
//! each. The forwarder (`forwarder.rs`) claims due triggers and records each outcome
//! through the same writer.
//!
//! The store may refuse writes for a while (a full disk, an I/O error). Then webhooks are
//! answered `503` (never acknowledged without a commit), `/readyz` says why, and the
//! outcome of every send that could not be written is kept in the writer's memory and
//! written as soon as the store takes writes again: its key stays leased meanwhile, so no
//! later trigger overtakes it and it is never sent twice. The writer probes the store once
//! a second while it is failing and logs each kind of failure at most once a second.
//!
//! The writer speaks to its database only through [`crate::store::Engine`].

pub mod clock;
mod health;
mod new_work;
mod offline;
pub mod outage;
mod writer;

use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

pub(crate) use health::Duty;
pub use health::{STALLED_AFTER, StoreHealth};
pub use new_work::NewWork;
pub use offline::{
    OfflineStore, cancel_offline, list, replay_from_offline, replay_offline,
    replay_triggers_offline, stored_webhook,
};

use crate::store::lock::{StateLock, lock_state_folder};
use crate::store::postgres::PostgresEngine;
use crate::store::sqlite::SqliteEngine;
use crate::store::{
    Claimed, Engine, EngineError, Lease, PruneCursor, Pruned, StoreLocation, blocking,
};

pub use crate::store::sqlite::{Durability, STORE_FILE};
pub use crate::store::{
    Accepted, CALLER_TOKEN, CancelTarget, DeliveryKind, DeliveryRow, DueTrigger, ListFilter,
    NewDelivery, NewTrigger, Recorded, ReplayTarget, StateFilter, StoredWebhook, UpstreamHold,
    now_ms,
};

/// Most gateway calls' (and refusals') records waiting for the writer at once: a few tens
/// of megabytes. One PostgreSQL relay once fell 100,000 records behind in ten seconds.
const NOTES_WAITING: usize = 20_000;
/// While the store fails, how often the writer tries again on its own.
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// Why the store could not do something.
#[derive(Debug)]
pub struct StoreError {
    pub place: String,
    pub reason: String,
    /// The store refused this request (an unknown id, say); nothing is broken.
    pub refused: bool,
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.refused {
            f.write_str(&self.reason)
        } else {
            write!(
                f,
                "the delivery store ({}) failed: {}",
                self.place, self.reason
            )
        }
    }
}

impl std::error::Error for StoreError {}

impl StoreError {
    fn from_engine(place: impl Into<String>, err: EngineError) -> StoreError {
        StoreError {
            place: place.into(),
            reason: err.message,
            refused: err.refused,
        }
    }
}

enum Op {
    /// A webhook to acknowledge once committed, with the room its body holds under
    /// `[server] body_memory` (given back once it is written): a webhook waiting for a
    /// store that stopped answering stays in memory after its sender gave up, and without
    /// the room every such webhook added to memory for as long as the store hung.
    Accept(
        NewDelivery,
        oneshot::Sender<Result<Accepted, EngineError>>,
        Option<tokio::sync::OwnedSemaphorePermit>,
    ),
    /// A record that acknowledges nothing (a gateway call): no reply, no fsync of its own.
    /// Holds one of [`NOTES_WAITING`]'s places until it is written (or dropped).
    Note(
        NewDelivery,
        #[allow(dead_code)] // held for its drop
        tokio::sync::OwnedSemaphorePermit,
    ),
    Claim(usize, oneshot::Sender<Result<Claimed, EngineError>>),
    /// An upstream went down: its due keys wait for the pause's end, a step of
    /// `writer::HOLD_STEP` keys at a time. Written beside the claims, before them.
    Hold(UpstreamHold, oneshot::Sender<Result<usize, EngineError>>),
    Record(writer::SendOutcome),
    /// A pipeline's new state: a pipeline event (answered once committed), or a poll's
    /// answer recorded with the poll's own outcome.
    Pipeline(
        Box<crate::status::PipelineUpdate>,
        Option<writer::SendOutcome>,
        Option<oneshot::Sender<Result<crate::status::Applied, EngineError>>>,
    ),
    Replay(ReplayTarget, oneshot::Sender<Result<Vec<i64>, EngineError>>),
    Prune(
        i64,
        Option<PruneCursor>,
        oneshot::Sender<Result<Pruned, EngineError>>,
    ),
    Flush(oneshot::Sender<()>),
    /// Word that records nobody waits for wait in [`writer::Notes`].
    NotesWaiting,
}

impl Op {
    /// A record nobody waits for, or word of some.
    fn is_note(&self) -> bool {
        matches!(self, Op::Note(..) | Op::NotesWaiting)
    }
}

/// One of [`NOTES_WAITING`]'s places, held for a record to come ([`Outbox::note_place`]).
pub struct NotePlace(tokio::sync::OwnedSemaphorePermit);

/// A handle on the store; cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    writer: mpsc::Sender<Op>,
    /// Where claims (and holds) go: the writer, or on a shared store a thread and
    /// connection of their own (see [`Outbox::start`]).
    claims: mpsc::Sender<Op>,
    /// Places for records nobody waits for ([`Outbox::note`]).
    notes: Arc<tokio::sync::Semaphore>,
    /// Where those records wait for the writer.
    noted: Arc<writer::Notes>,
    /// A connection of its own for reads (depth for metrics), beside the writer.
    reader: Arc<Mutex<Box<dyn Engine>>>,
    place: Arc<str>,
    /// Woken when triggers are queued, so the forwarder need not poll for them; says of
    /// which keys.
    pub queued: Arc<NewWork>,
    pub health: Arc<StoreHealth>,
    /// Other relays share this store: triggers they queue or give up are claimed here too,
    /// so the forwarder looks for due work at least once a second.
    pub shared: bool,
    /// What relays sharing the store share outside the outbox (rate limits, GitLab's
    /// pauses, the paces of status posts and polls, GitHub's addresses as last read).
    pub shared_state: Option<Arc<crate::store::postgres::SharedState>>,
    /// How long a claim holds its key when relays share the store: a send starts only
    /// while its claim has at least an upstream timeout left.
    pub lease: Option<Duration>,
    /// The store's clock minus this process's (milliseconds), as the writer last read it.
    skew: Arc<std::sync::atomic::AtomicI64>,
    /// The writer's commit times and sizes.
    pub timings: crate::metrics::StoreTimings,
    /// Where the store is, for reads beside the writer (the dashboard); `None` for an
    /// outbox started over engines of a test's own.
    pub location: Option<StoreLocation>,
    /// Why a failover of the shared database could lose acknowledged webhooks, as read at
    /// the start ([`PostgresEngine::replication_risk`]); shown on the dashboard.
    pub failover_risk: Option<String>,
    /// See [`Outbox::noted_before_start`] (milliseconds on the store's clock).
    noted_before_start: Option<i64>,
}

impl Outbox {
    /// Opens the SQLite store in `state_dir` (creating both), takes the folder's lock,
    /// makes triggers that were being sent when the last relay died due again, and starts
    /// the writer thread. `holder` says who holds the lock, for a second relay's message.
    pub fn open(state_dir: &Path, durability: Durability) -> Result<Outbox, StoreError> {
        let holder = format!("pid {}", std::process::id());
        Outbox::open_as(state_dir, durability, &holder)
    }

    /// [`Outbox::open`], naming the holder of the state folder's lock.
    pub fn open_as(
        state_dir: &Path,
        durability: Durability,
        holder: &str,
    ) -> Result<Outbox, StoreError> {
        let path = state_dir.join(STORE_FILE);
        let error = |reason: String| StoreError {
            place: path.display().to_string(),
            reason,
            refused: false,
        };
        // Its message names the folder or file and the step, like the lock's below.
        crate::store::private::prepare_state_folder(state_dir, &path).map_err(|reason| {
            StoreError {
                place: state_dir.display().to_string(),
                reason,
                refused: true,
            }
        })?;
        let lock = lock_state_folder(state_dir, holder).map_err(|err| StoreError {
            place: state_dir.display().to_string(),
            reason: err.to_string(),
            refused: true,
        })?;
        let mut writer = SqliteEngine::open(&path, durability).map_err(|e| error(e.message))?;
        let reader = SqliteEngine::open(&path, durability).map_err(|e| error(e.message))?;
        writer
            .checkpoint_in_background()
            .map_err(|e| error(e.message))?;
        let requeued = writer.recover_leases().map_err(|e| error(e.message))?;
        if requeued > 0 {
            tracing::warn!(
                requeued,
                "triggers that were being sent when the relay stopped are due again"
            );
        }
        let mut outbox = Outbox::start(Box::new(writer), None, Box::new(reader), Some(lock))
            .map_err(|err| error(err.to_string()))?;
        outbox.location = Some(StoreLocation::Folder(state_dir.to_owned()));
        Ok(outbox)
    }

    /// Opens the store at `location`: the state folder's SQLite ([`Outbox::open_as`]), or
    /// the shared PostgreSQL database (two connections: the writer's and the reader's).
    pub fn open_at(
        location: &StoreLocation,
        durability: Durability,
        holder: &str,
    ) -> Result<Outbox, StoreError> {
        match location {
            StoreLocation::Folder(dir) => Outbox::open_as(dir, durability, holder),
            StoreLocation::Postgres(config) => {
                let error = |err: EngineError| StoreError::from_engine(config.describe(), err);
                let (writer, claimer, reader, failover_risk) = blocking(|| {
                    let mut writer = PostgresEngine::open(config)?.as_writer()?;
                    let risk = writer.replication_risk().unwrap_or_else(|err| {
                        tracing::warn!(reason = %err, "could not read how PostgreSQL replicates");
                        None
                    });
                    if let Some(risk) = &risk {
                        tracing::warn!("{risk}");
                    }
                    let claimer = PostgresEngine::open_beside(config)?.as_writer()?;
                    let reader = PostgresEngine::open_beside(config)?;
                    Ok::<_, EngineError>((writer, claimer, reader, risk))
                })
                .map_err(error)?;
                let mut outbox = Outbox::start(
                    Box::new(writer),
                    Some(Box::new(claimer)),
                    Box::new(reader),
                    None,
                )
                .map_err(|err| error(EngineError::failed(err.to_string())))?;
                outbox.shared = true;
                outbox.failover_risk = failover_risk;
                outbox.location = Some(location.clone());
                outbox.lease = Some(config.lease);
                outbox.shared_state = Some(Arc::new(crate::store::postgres::SharedState::new(
                    config.clone(),
                )));
                Ok(outbox)
            }
        }
    }

    /// Starts the writer thread over `writer`; `reader` serves reads beside it.
    ///
    /// `claimer`, on a shared store: claims go to a thread of their own over it, so that
    /// their commits (each waits for the database's disk) run beside the writer's instead
    /// of between two groups of webhooks, and the database flushes both at once.
    pub fn start(
        writer: Box<dyn Engine>,
        claimer: Option<Box<dyn Engine>>,
        mut reader: Box<dyn Engine>,
        lock: Option<StateLock>,
    ) -> std::io::Result<Outbox> {
        let place: Arc<str> = writer.describe().into();
        // Read before this relay's writer notes a time of its own.
        let noted_before_start =
            blocking(|| reader.ready_to_read().and_then(|()| reader.clock_noted()))
                .ok()
                .flatten();
        let (sender, requests) = mpsc::channel();
        let queued = Arc::new(NewWork::default());
        let health = Arc::new(StoreHealth::default());
        let skew = Arc::new(std::sync::atomic::AtomicI64::new(writer.clock_skew()));
        let noted = Arc::new(writer::Notes::default());
        let timings = crate::metrics::StoreTimings::default();
        let shared = |duty, notes| writer::Shared {
            duty,
            notes,
            queued: queued.clone(),
            health: health.clone(),
            skew: skew.clone(),
            timings: timings.clone(),
        };
        let claims = match claimer {
            Some(claimer) => {
                let (claims, claim_requests) = mpsc::channel();
                // Records nobody waits for never go to the claimer: its own, always empty.
                let notes = Arc::new(writer::Notes::default());
                writer::Writer::spawn(claimer, claim_requests, shared(Duty::Claims, notes), None)?;
                claims
            }
            None => sender.clone(),
        };
        writer::Writer::spawn(writer, requests, shared(Duty::Writes, noted.clone()), lock)?;
        Ok(Outbox {
            writer: sender,
            claims,
            notes: Arc::new(tokio::sync::Semaphore::new(NOTES_WAITING)),
            noted,
            reader: Arc::new(Mutex::new(reader)),
            place,
            queued,
            health,
            shared: false,
            shared_state: None,
            lease: None,
            skew,
            timings,
            location: None,
            failover_risk: None,
            noted_before_start,
        })
    }

    /// The latest time a relay noted in the store before this one started (store clock),
    /// `None` for a new store: what a relay starting may have missed began after it.
    pub fn noted_before_start(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        self.noted_before_start
            .and_then(chrono::DateTime::from_timestamp_millis)
    }

    fn error(&self, err: EngineError) -> StoreError {
        StoreError::from_engine(self.place.to_string(), err)
    }

    async fn ask<T>(
        &self,
        op: impl FnOnce(oneshot::Sender<Result<T, EngineError>>) -> Op,
    ) -> Result<T, StoreError> {
        self.ask_of(&self.writer, op).await
    }

    /// [`Outbox::ask`] of the thread behind `writer`.
    async fn ask_of<T>(
        &self,
        writer: &mpsc::Sender<Op>,
        op: impl FnOnce(oneshot::Sender<Result<T, EngineError>>) -> Op,
    ) -> Result<T, StoreError> {
        let stopped = |what: &str| EngineError::failed(what);
        let (reply, answer) = oneshot::channel();
        writer
            .send(op(reply))
            .map_err(|_| self.error(stopped("the writer has stopped")))?;
        answer
            .await
            .map_err(|_| self.error(stopped("the writer stopped before answering")))?
            .map_err(|err| self.error(err))
    }

    /// Now, on the store's clock: the database's for a shared store (so that relays agree
    /// on what is due), this machine's otherwise.
    pub fn clock(&self) -> chrono::DateTime<chrono::Utc> {
        let skew = self.skew.load(std::sync::atomic::Ordering::Relaxed);
        chrono::Utc::now() + chrono::Duration::milliseconds(skew)
    }

    /// Records a delivery and its triggers; returns once they are committed to disk.
    pub async fn accept(&self, delivery: NewDelivery) -> Result<Accepted, StoreError> {
        self.accept_holding(delivery, None).await
    }

    /// [`Outbox::accept`] for a webhook whose body holds `room` under `[server]
    /// body_memory`: the room stays taken until the writer has written it, even when the
    /// sender stops waiting first.
    ///
    /// Below the disk's reserve nothing new is taken (a redelivery of a stored webhook
    /// is answered as a duplicate once there is room), so that the outcomes of what is
    /// queued can still be written.
    pub async fn accept_holding(
        &self,
        delivery: NewDelivery,
        room: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Result<Accepted, StoreError> {
        if let Some(reason) = self.health.disk_low() {
            return Err(StoreError {
                place: self.place.to_string(),
                reason,
                refused: true,
            });
        }
        self.ask(|reply| Op::Accept(delivery, reply, room)).await
    }

    /// Records a delivery that acknowledges nothing (a dashboard action), without waiting
    /// for its commit; waits only while [`NOTES_WAITING`] records wait for the writer
    /// already, so a writer that falls behind slows the callers instead of filling memory.
    pub async fn note(&self, delivery: NewDelivery) {
        if let Ok(place) = self.notes.clone().acquire_owned().await {
            self.note_in(NotePlace(place), delivery);
        }
    }

    /// A place for one record, taken before the work it records, waiting at most `within`
    /// for one; `None` when every place stayed taken (the writer is far behind, or its
    /// disk stopped answering). A gateway call takes its place before it is forwarded:
    /// waiting for one after GitLab had answered held the answer back for as long as the
    /// store hung, and a caller that gave up and called again started a second pipeline.
    pub async fn note_place(&self, within: Duration) -> Option<NotePlace> {
        let place = tokio::time::timeout(within, self.notes.clone().acquire_owned()).await;
        Some(NotePlace(place.ok()?.ok()?))
    }

    /// Records a delivery that acknowledges nothing (a gateway call) in a place taken
    /// before ([`Outbox::note_place`]): never waits.
    pub fn note_in(&self, place: NotePlace, delivery: NewDelivery) {
        self.noted.add(Op::Note(delivery, place.0), &self.writer);
    }

    /// [`Outbox::note`] without waiting: `false` (nothing recorded) when every place is
    /// taken. For records that are few by themselves (one a second per source and kind).
    pub fn try_note(&self, delivery: NewDelivery) -> bool {
        match self.notes.clone().try_acquire_owned() {
            Ok(place) => self.noted.add(Op::Note(delivery, place), &self.writer),
            Err(_) => false,
        }
    }

    /// Leases due triggers for sending, and says when the next one falls due.
    pub async fn claim(&self, limit: usize) -> Result<Claimed, StoreError> {
        self.ask_of(&self.claims, |reply| Op::Claim(limit, reply))
            .await
    }

    /// Records an attempt's outcome (committed with the next group; kept and written
    /// again while the store refuses writes).
    pub fn record(&self, lease: Lease, recorded: Recorded) {
        let _ = self
            .writer
            .send(Op::Record(writer::SendOutcome::new(lease, recorded)));
    }

    /// Makes a down upstream's due triggers wait for the end of its pause, a few hundred
    /// keys per commit (so webhooks are acknowledged between steps); returns how many.
    /// Should it fail, nothing is lost: each key is deferred when it is claimed.
    pub async fn hold_upstream(&self, hold: UpstreamHold) -> Result<usize, StoreError> {
        let mut held = 0;
        loop {
            let step = self
                .ask_of(&self.claims, |reply| Op::Hold(hold.clone(), reply))
                .await?;
            held += step;
            if step < writer::HOLD_STEP {
                return Ok(held);
            }
        }
    }

    pub async fn replay(&self, target: ReplayTarget) -> Result<Vec<i64>, StoreError> {
        self.ask(|reply| Op::Replay(target, reply)).await
    }

    /// Records a pipeline event and queues the status it calls for; returns once both are
    /// committed (the event's delivery id makes a repeat a duplicate).
    pub async fn pipeline(
        &self,
        update: crate::status::PipelineUpdate,
    ) -> Result<crate::status::Applied, StoreError> {
        self.ask(|reply| Op::Pipeline(Box::new(update), None, Some(reply)))
            .await
    }

    /// A poll's answer: the pipeline's state and the poll's own outcome, in one write.
    pub fn polled(&self, update: crate::status::PipelineUpdate, lease: Lease, recorded: Recorded) {
        let _ = self.writer.send(Op::Pipeline(
            Box::new(update),
            Some(writer::SendOutcome::new(lease, recorded)),
            None,
        ));
    }

    /// Deletes finished deliveries received before `before_ms`, a batch per commit.
    pub async fn prune(&self, before_ms: i64) -> Result<usize, StoreError> {
        let (mut pruned, mut after) = (0, None);
        loop {
            let step = self.ask(|reply| Op::Prune(before_ms, after, reply)).await?;
            pruned += step.deleted;
            match step.next {
                Some(next) => after = Some(next),
                None => return Ok(pruned),
            }
        }
    }

    /// Waits until everything sent to the writer so far is committed (or failed).
    pub async fn flush(&self) {
        let (reply, done) = oneshot::channel();
        if self.writer.send(Op::Flush(reply)).is_ok() {
            let _ = done.await;
        }
    }

    /// Reads the store on the reader's connection, beside the writer (the dashboard): no
    /// new connection per request, on SQLite and PostgreSQL alike.
    pub fn read<T: Send>(
        &self,
        op: impl FnOnce(&mut dyn Engine) -> Result<T, EngineError> + Send,
    ) -> Result<T, StoreError> {
        blocking(|| {
            let mut reader = self
                .reader
                .lock()
                .expect("the reader lock is never poisoned");
            reader.ready_to_read()?;
            op(reader.as_mut())
        })
        .map_err(|err| self.error(err))
    }

    /// [`Outbox::read`] on one of tokio's blocking threads, for a request served on an
    /// event loop: a database round trip (or a database that does not answer) must not
    /// hold up the loop's other connections.
    pub async fn read_apart<T: Send + 'static>(
        &self,
        op: impl FnOnce(&mut dyn Engine) -> Result<T, EngineError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let reader = self.reader.clone();
        let read = tokio::task::spawn_blocking(move || {
            let mut reader = reader.lock().expect("the reader lock is never poisoned");
            reader.ready_to_read()?;
            op(reader.as_mut())
        });
        match read.await {
            Ok(result) => result.map_err(|err| self.error(err)),
            Err(err) => Err(self.error(EngineError::failed(format!("the read stopped: {err}")))),
        }
    }

    /// A stored webhook by its delivery id (or a unique start of one), on the reader.
    pub fn stored(&self, delivery_id: &str) -> Result<StoredWebhook, StoreError> {
        self.read(|engine| offline::stored_in(engine, delivery_id))
    }

    /// The stored webhook `source` sent as `delivery_id` (its whole id).
    pub fn stored_from(
        &self,
        source: &str,
        delivery_id: &str,
    ) -> Result<StoredWebhook, StoreError> {
        self.read(|engine| offline::stored_from_in(engine, source, delivery_id))
    }

    /// Triggers waiting or being sent, and how long the earliest-due one has been due.
    /// Reads two index entries, whatever the backlog.
    pub fn depth(&self) -> Result<(i64, Duration), StoreError> {
        self.read(|engine| engine.depth()).map(depth_and_age)
    }

    /// [`Outbox::depth`] for a request served on an event loop (see [`Outbox::read_apart`]).
    pub async fn depth_apart(&self) -> Result<(i64, Duration), StoreError> {
        self.read_apart(|engine| engine.depth())
            .await
            .map(depth_and_age)
    }
}

/// How many triggers are open, and how long the earliest-due one has been due.
fn depth_and_age(depth: crate::store::Depth) -> (i64, Duration) {
    let age = depth
        .earliest_due
        .map(|due| (now_ms() - due).max(0) as u64)
        .unwrap_or(0);
    (depth.open, Duration::from_millis(age))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::store::Depth;
    use crate::store::sqlite::Durability;

    /// SQLite that refuses every commit while `full` is set, as a full disk would; with
    /// `broken_batches`, it records webhooks together and breaks halfway, counting.
    struct FullDisk {
        inner: SqliteEngine,
        full: Arc<AtomicBool>,
        broken_batches: Option<Arc<std::sync::atomic::AtomicUsize>>,
        /// While set, the writer cannot begin a group (a store that hangs).
        held: Arc<AtomicBool>,
        /// While set, recording a webhook panics (a bug in an engine).
        panics: Arc<AtomicBool>,
        /// The lease it says claims hold (as a shared store's engine does).
        lease: Option<Duration>,
        /// Each `let_claims_take_over` it was told, in order.
        take_over: Arc<Mutex<Vec<bool>>>,
    }

    impl FullDisk {
        /// A store at `path` that works until a test throws one of its switches.
        fn on(path: &Path) -> FullDisk {
            FullDisk {
                inner: SqliteEngine::open(path, Durability::Full).unwrap(),
                full: Arc::default(),
                broken_batches: None,
                held: Arc::default(),
                panics: Arc::default(),
                lease: None,
                take_over: Arc::default(),
            }
        }

        /// An outbox over a store at `path` that hangs (its writer cannot begin a group)
        /// until the switch returned is cleared.
        fn hung(path: &Path) -> (Outbox, Arc<AtomicBool>) {
            let held = Arc::new(AtomicBool::new(true));
            let store = FullDisk {
                held: held.clone(),
                ..FullDisk::on(path)
            };
            (store.start(path), held)
        }

        /// An outbox over a store at `path` that works until the switch returned is set,
        /// then refuses every commit, as a full disk would.
        fn filling(path: &Path) -> (Outbox, Arc<AtomicBool>) {
            let full = Arc::new(AtomicBool::new(false));
            let store = FullDisk {
                full: full.clone(),
                ..FullDisk::on(path)
            };
            (store.start(path), full)
        }

        /// An outbox writing through this store and reading `path` directly.
        fn start(self, path: &Path) -> Outbox {
            let reader = SqliteEngine::open(path, Durability::Full).unwrap();
            Outbox::start(Box::new(self), None, Box::new(reader), None).unwrap()
        }

        /// [`FullDisk::start`], with claims going to `claimer` (as on a shared store).
        fn start_with_claimer(self, claimer: FullDisk, path: &Path) -> Outbox {
            let reader = SqliteEngine::open(path, Durability::Full).unwrap();
            Outbox::start(
                Box::new(self),
                Some(Box::new(claimer)),
                Box::new(reader),
                None,
            )
            .unwrap()
        }
    }

    impl Engine for FullDisk {
        fn describe(&self) -> String {
            self.inner.describe()
        }
        fn begin(&mut self, durable: bool) -> Result<(), EngineError> {
            while self.held.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
            self.inner.begin(durable)
        }
        fn commit(&mut self) -> Result<(), EngineError> {
            if self.full.load(Ordering::SeqCst) {
                self.inner.rollback();
                return Err(EngineError {
                    message: "database or disk is full".into(),
                    transient: true,
                    refused: false,
                });
            }
            self.inner.commit()
        }
        fn rollback(&mut self) {
            self.inner.rollback()
        }
        fn savepoint(&mut self) -> Result<(), EngineError> {
            self.inner.savepoint()
        }
        fn release(&mut self, keep: bool) {
            self.inner.release(keep)
        }
        fn insert_deliveries(
            &mut self,
            deliveries: &[&NewDelivery],
            now: i64,
            _someone_waits: bool,
        ) -> Option<Result<Vec<Accepted>, EngineError>> {
            let broken = self.broken_batches.as_ref()?;
            broken.fetch_add(1, Ordering::SeqCst);
            let _ = self.inner.insert_delivery(deliveries[0], now);
            Some(Err(EngineError::failed("the batch broke halfway")))
        }
        fn insert_delivery(&mut self, d: &NewDelivery, now: i64) -> Result<Accepted, EngineError> {
            assert!(!self.panics.load(Ordering::SeqCst), "an engine's bug");
            self.inner.insert_delivery(d, now)
        }
        fn claim(&mut self, now: i64, limit: usize) -> Result<Claimed, EngineError> {
            self.inner.claim(now, limit)
        }
        fn lease(&self) -> Option<Duration> {
            self.lease
        }
        fn let_claims_take_over(&mut self, allowed: bool) {
            self.take_over.lock().unwrap().push(allowed);
        }
        fn record(&mut self, l: Lease, r: &Recorded, now: i64) -> Result<bool, EngineError> {
            self.inner.record(l, r, now)
        }
        fn hold_upstream(
            &mut self,
            hold: &crate::store::UpstreamHold,
            limit: usize,
            now: i64,
        ) -> Result<usize, EngineError> {
            self.inner.hold_upstream(hold, limit, now)
        }
        fn replay(&mut self, t: &ReplayTarget, now: i64) -> Result<Vec<i64>, EngineError> {
            self.inner.replay(t, now)
        }
        fn queue_work(
            &mut self,
            row: i64,
            work: &[NewTrigger],
            now: i64,
        ) -> Result<Vec<i64>, EngineError> {
            self.inner.queue_work(row, work, now)
        }
        fn pipeline_origin(
            &mut self,
            of: &crate::store::OriginOf,
        ) -> Result<Option<crate::store::PipelineOrigin>, EngineError> {
            self.inner.pipeline_origin(of)
        }
        fn newest_status(&mut self, key: &str, id: i64) -> Result<Option<String>, EngineError> {
            self.inner.newest_status(key, id)
        }
        fn clock_noted(&mut self) -> Result<Option<i64>, EngineError> {
            self.inner.clock_noted()
        }
        fn note_clock(&mut self, now: i64) -> Result<(), EngineError> {
            self.inner.note_clock(now)
        }
        fn move_deadlines_back(&mut self, by: i64, now: i64) -> Result<(), EngineError> {
            self.inner.move_deadlines_back(by, now)
        }
        fn prune(
            &mut self,
            before: i64,
            batch: usize,
            after: Option<crate::store::PruneCursor>,
        ) -> Result<crate::store::Pruned, EngineError> {
            self.inner.prune(before, batch, after)
        }
        fn probe(&mut self, now: i64) -> Result<(), EngineError> {
            self.inner.probe(now)
        }
        fn recover_leases(&mut self) -> Result<usize, EngineError> {
            self.inner.recover_leases()
        }
        fn depth(&mut self) -> Result<Depth, EngineError> {
            self.inner.depth()
        }
        fn list(&mut self, f: &ListFilter) -> Result<Vec<DeliveryRow>, EngineError> {
            self.inner.list(f)
        }
        fn cancel(&mut self, t: &CancelTarget, now: i64) -> Result<Vec<i64>, EngineError> {
            self.inner.cancel(t, now)
        }
        fn is_stored(&mut self, source: &str, id: &str) -> Result<bool, EngineError> {
            self.inner.is_stored(source, id)
        }
        fn stored_webhook(&mut self, id: &str) -> Result<Option<StoredWebhook>, EngineError> {
            self.inner.stored_webhook(id)
        }
        fn stored_webhook_from(
            &mut self,
            source: &str,
            id: &str,
        ) -> Result<Option<StoredWebhook>, EngineError> {
            self.inner.stored_webhook_from(source, id)
        }
    }

    fn delivery(id: &str) -> NewDelivery {
        crate::store::semantics::delivery(id, vec![crate::store::semantics::trigger("acme/app")])
    }

    fn states(outbox_dir: &Path) -> Vec<(String, String)> {
        let mut engine =
            SqliteEngine::open(&outbox_dir.join(STORE_FILE), Durability::Full).unwrap();
        let mut rows: Vec<(String, String)> = engine
            .list(&ListFilter {
                limit: 1000,
                ..ListFilter::default()
            })
            .unwrap()
            .into_iter()
            .map(|r| (r.delivery_id, r.state.unwrap_or_default()))
            .collect();
        rows.sort();
        rows
    }

    /// A gateway call's record: its one trigger finished (sent) as it is written.
    fn note(id: &str) -> NewDelivery {
        let mut note = delivery(id);
        note.triggers[0].done = Some(Recorded::Sent {
            status: 201,
            pipeline_id: Some(7),
            pipeline_url: None,
        });
        note
    }

    /// Gateway calls' records arriving together are written together, beside webhooks
    /// recorded together, each once and each finished.
    #[tokio::test]
    async fn gateway_records_are_written_together_beside_webhooks() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), Durability::Full).unwrap();
        for round in 0..5 {
            for i in 0..20 {
                outbox.note(note(&format!("n{round}-{i:02}"))).await;
            }
            let answers = futures_util::future::join_all(
                (0..5).map(|i| outbox.accept(delivery(&format!("w{round}-{i}")))),
            )
            .await;
            assert!(
                answers
                    .iter()
                    .all(|a| matches!(a, Ok(Accepted::Queued { .. })))
            );
        }
        outbox.flush().await;
        let stored = states(dir.path());
        assert_eq!(stored.len(), 125, "each once");
        for (id, state) in &stored {
            let want = if id.starts_with('n') {
                "sent"
            } else {
                "queued"
            };
            assert_eq!(state, want, "{id}");
        }
    }

    /// A hold with more keys than one step moves them all, a step per commit, and claims
    /// then find nothing due until the pause ends.
    #[tokio::test]
    async fn a_hold_moves_every_due_key_of_the_upstream_in_steps() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), Durability::Full).unwrap();
        let keys = writer::HOLD_STEP * 2 + 10;
        for i in 0..keys {
            let mut own_key = delivery(&format!("d{i}"));
            own_key.triggers[0].project = format!("p{i}");
            outbox.accept(own_key).await.unwrap();
        }
        let until = now_ms() + 60_000;
        let held = outbox
            .hold_upstream(UpstreamHold {
                upstream: "gitlab".into(),
                until,
                spread_ms: 1_000,
                reason: "upstream gitlab is down; waiting for it".into(),
            })
            .await
            .unwrap();
        assert_eq!(held, keys);
        let claimed = outbox.claim(8).await.unwrap();
        assert!(claimed.due.is_empty(), "nothing due during the pause");
        assert!(
            claimed
                .next_due
                .is_some_and(|due| (until..until + 1_000).contains(&due)),
            "due again within the spread after the pause: {:?}",
            claimed.next_due
        );
    }

    /// A hold the store cannot commit (a full disk) is answered with the error and moves
    /// nothing: the keys stay due, to be deferred one by one as they are claimed.
    #[tokio::test]
    async fn a_hold_the_store_refuses_moves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STORE_FILE);
        let (outbox, full) = FullDisk::filling(&path);
        for project in ["p1", "p2", "p3"] {
            let mut own_key = delivery(project);
            own_key.triggers[0].project = project.into();
            outbox.accept(own_key).await.unwrap();
        }
        full.store(true, Ordering::SeqCst);
        let hold = UpstreamHold {
            upstream: "gitlab".into(),
            until: now_ms() + 60_000,
            spread_ms: 1_000,
            reason: "upstream gitlab is down; waiting for it".into(),
        };
        let refused = outbox.hold_upstream(hold).await.unwrap_err();
        assert!(refused.reason.contains("disk is full"), "{refused}");
        full.store(false, Ordering::SeqCst);
        assert_eq!(outbox.claim(8).await.unwrap().due.len(), 3, "all still due");
    }

    /// The forwarder is woken when a trigger is queued on its own, not when one is
    /// coalesced into a trigger already waiting: a burst for one project+ref changes no
    /// key's head or due time after its first trigger.
    #[tokio::test]
    async fn coalesced_triggers_do_not_wake_the_forwarder() {
        use futures_util::FutureExt;
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), Durability::Full).unwrap();
        let windowed = |id: &str| {
            let mut delivery = delivery(id);
            delivery.triggers[0].coalesce_ms = 60_000;
            delivery
        };
        outbox.accept(windowed("a")).await.unwrap();
        // The writer notifies after it replies; the next flush is answered after that.
        outbox.flush().await;
        assert!(outbox.queued.notified().now_or_never().is_some(), "queued");
        for id in ["b", "c", "d"] {
            let accepted = outbox.accept(windowed(id)).await.unwrap();
            assert!(
                matches!(&accepted, Accepted::Queued { coalesced, .. } if coalesced[0].is_some())
            );
        }
        outbox.flush().await;
        assert!(
            outbox.queued.notified().now_or_never().is_none(),
            "coalesced"
        );
        outbox.accept(delivery("e")).await.unwrap();
        outbox.flush().await;
        assert!(
            outbox.queued.notified().now_or_never().is_some(),
            "queued again"
        );
    }

    /// Records nobody waits for queue up to [`NOTES_WAITING`] while the writer is stuck;
    /// the next caller waits for a place instead of growing memory, and all are written
    /// once the writer moves again.
    #[tokio::test]
    async fn records_nobody_waits_for_are_bounded_while_the_writer_is_stuck() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STORE_FILE);
        let (outbox, held) = FullDisk::hung(&path);
        // The writer takes the first records into a group and waits to begin it; they
        // keep their places until written, so the places fill.
        for i in 0..NOTES_WAITING {
            outbox.note(note(&format!("n{i:05}"))).await;
        }
        let over = tokio::time::timeout(
            Duration::from_millis(200),
            outbox.note(note("one too many")),
        )
        .await;
        assert!(over.is_err(), "waits for a place");
        assert!(!outbox.try_note(note("not waited for")), "dropped, said so");
        assert!(
            outbox
                .note_place(Duration::from_millis(100))
                .await
                .is_none(),
            "a gateway call finds no place, and is refused before it is forwarded"
        );
        held.store(false, Ordering::SeqCst);
        tokio::time::timeout(Duration::from_secs(30), outbox.note(note("one too many")))
            .await
            .expect("a place once the writer moves");
        let place = outbox
            .note_place(Duration::from_secs(30))
            .await
            .expect("a place for a gateway call once the writer moves");
        outbox.note_in(place, note("z: in its place"));
        outbox.flush().await;
        let newest = states(dir.path());
        assert_eq!(newest.len(), 1000, "listed up to its limit");
        assert!(newest.iter().any(|(id, _)| id == "one too many"));
        assert!(newest.iter().any(|(id, _)| id == "z: in its place"));
        let count = SqliteEngine::open(&path, Durability::Full)
            .unwrap()
            .depth()
            .unwrap();
        assert_eq!(count.open, 0, "records queue nothing");
    }

    /// A webhook whose sender stopped waiting while the store hung keeps its body's room
    /// under `[server] body_memory` until it is written: webhooks waiting for a stuck
    /// store cannot grow memory past the budget.
    #[tokio::test]
    async fn a_webhook_given_up_on_holds_its_body_s_room_until_it_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STORE_FILE);
        let (outbox, held) = FullDisk::hung(&path);
        let budget = Arc::new(tokio::sync::Semaphore::new(1));
        let room = budget.clone().try_acquire_owned().unwrap();
        let waited = tokio::time::timeout(
            Duration::from_millis(200),
            outbox.accept_holding(delivery("given up on"), Some(room)),
        )
        .await;
        assert!(waited.is_err(), "the stuck writer acknowledges nothing");
        assert_eq!(budget.available_permits(), 0, "the room stays taken");
        held.store(false, Ordering::SeqCst);
        outbox.flush().await;
        assert_eq!(budget.available_permits(), 1, "given back once written");
        assert!(
            states(dir.path()).iter().any(|(id, _)| id == "given up on"),
            "written all the same"
        );
    }

    /// A group's webhooks (and gateway records) recorded together, the batch breaking after
    /// writing some of them: the transaction is undone and every webhook recorded one by
    /// one, each once.
    #[tokio::test]
    async fn a_batch_that_breaks_halfway_is_undone_and_recorded_one_by_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STORE_FILE);
        let broken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let outbox = FullDisk {
            broken_batches: Some(broken.clone()),
            ..FullDisk::on(&path)
        }
        .start(&path);
        let mut sent = 0;
        // Requests sent together land in one group (at least once in a few tries).
        while broken.load(Ordering::SeqCst) == 0 && sent < 100 {
            for i in sent..sent + 20 {
                outbox.note(note(&format!("n{i:03}"))).await;
            }
            let answers = futures_util::future::join_all(
                (sent..sent + 20).map(|i| outbox.accept(delivery(&format!("d{i:03}")))),
            )
            .await;
            for answer in answers {
                assert!(matches!(answer, Ok(Accepted::Queued { .. })), "{answer:?}");
            }
            sent += 20;
        }
        assert!(
            broken.load(Ordering::SeqCst) > 0,
            "no group held two webhooks"
        );
        outbox.flush().await;
        let stored = states(dir.path());
        assert_eq!(stored.len(), 2 * sent, "each once: {stored:?}");
    }

    /// The store's health once it is `ready` (or not), or after `within` if it never is.
    async fn health_once(outbox: &Outbox, ready: bool, within: Duration) -> Option<String> {
        let until = std::time::Instant::now() + within;
        while outbox.health.problem().is_none() != ready && std::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        outbox.health.problem()
    }

    /// A claimer of its own claims while the writer is busy, and its problems show on
    /// `/readyz` until a claim of its own commits again.
    #[tokio::test]
    async fn claims_go_beside_the_writer_and_report_their_own_health() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STORE_FILE);
        let (writer, claimer) = (FullDisk::on(&path), FullDisk::on(&path));
        let (writer_held, claims_full) = (writer.held.clone(), claimer.full.clone());
        let outbox = writer.start_with_claimer(claimer, &path);
        outbox.accept(delivery("a")).await.unwrap();

        writer_held.store(true, Ordering::SeqCst);
        let claimed = tokio::time::timeout(Duration::from_secs(5), outbox.claim(8))
            .await
            .expect("a claim does not wait for the writer's turn")
            .unwrap();
        assert_eq!(claimed.due.len(), 1);
        writer_held.store(false, Ordering::SeqCst);

        claims_full.store(true, Ordering::SeqCst);
        assert!(outbox.claim(8).await.is_err());
        let problem = outbox.health.problem().expect("/readyz says not ready");
        assert!(problem.contains("disk is full"), "{problem}");
        // The writer's own success says nothing of the claimer's connection.
        outbox.accept(delivery("b")).await.unwrap();
        assert!(outbox.health.problem().is_some());
        claims_full.store(false, Ordering::SeqCst);
        // The claimer looks again by itself (a probe a second), claims or not.
        assert_eq!(
            health_once(&outbox, true, RETRY_EVERY * 3).await,
            None,
            "ready again"
        );
    }

    /// Claims take over leases that ran out only while the writer holds no outcome the
    /// store refused (its lease may be among them), and not until the claimer has reached
    /// the store for a lease (at most ten seconds) since it started or last failed.
    #[tokio::test]
    async fn claims_take_over_no_lease_while_outcomes_wait_or_right_after_a_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STORE_FILE);
        let writer = FullDisk::on(&path);
        let claimer = FullDisk {
            lease: Some(Duration::ZERO),
            ..FullDisk::on(&path)
        };
        let (writer_full, take_over) = (writer.full.clone(), claimer.take_over.clone());
        let last_told = || *take_over.lock().unwrap().last().unwrap();
        let outbox = writer.start_with_claimer(claimer, &path);
        outbox.accept(delivery("a")).await.unwrap();
        let a = outbox.claim(8).await.unwrap().due.remove(0);
        assert!(last_told(), "a lease of nothing: at once");

        writer_full.store(true, Ordering::SeqCst);
        let sent = Recorded::Sent {
            status: 201,
            pipeline_id: None,
            pipeline_url: None,
        };
        outbox.record(a.lease, sent);
        assert!(
            health_once(&outbox, false, Duration::from_secs(5))
                .await
                .is_some()
        );
        outbox.claim(8).await.unwrap();
        assert!(!last_told(), "the writer holds an outcome");

        writer_full.store(false, Ordering::SeqCst);
        assert_eq!(
            health_once(&outbox, true, RETRY_EVERY * 3).await,
            None,
            "the outcome written"
        );
        outbox.claim(8).await.unwrap();
        assert!(last_told());

        let writer = FullDisk::on(&path);
        let claimer = FullDisk {
            lease: Some(Duration::from_secs(3600)),
            ..FullDisk::on(&path)
        };
        let take_over = claimer.take_over.clone();
        let outbox = writer.start_with_claimer(claimer, &path);
        outbox.claim(8).await.unwrap();
        assert_eq!(*take_over.lock().unwrap(), [false], "just started");
    }

    /// A writer that panics (a bug) stops for good: webhooks get an error, and `/readyz`
    /// says not ready instead of sending load balancers' traffic to a relay that refuses
    /// it all.
    #[tokio::test]
    async fn a_writer_that_panics_makes_the_relay_not_ready() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STORE_FILE);
        let panics = Arc::new(AtomicBool::new(false));
        let outbox = FullDisk {
            panics: panics.clone(),
            ..FullDisk::on(&path)
        }
        .start(&path);
        outbox.accept(delivery("a")).await.unwrap();
        assert_eq!(outbox.health.problem(), None);
        panics.store(true, Ordering::SeqCst);
        assert!(outbox.accept(delivery("b")).await.is_err());
        // The writer says so as it unwinds, a moment after its requests are dropped.
        let problem = health_once(&outbox, false, Duration::from_secs(1))
            .await
            .expect("not ready");
        assert!(problem.contains("writer stopped"), "{problem}");
        let refused = outbox.accept(delivery("c")).await.unwrap_err();
        assert!(refused.reason.contains("writer has stopped"), "{refused}");
    }

    #[tokio::test]
    async fn an_outcome_the_store_refuses_is_kept_and_written_once_it_can_be() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STORE_FILE);
        let (outbox, full) = FullDisk::filling(&path);
        outbox.accept(delivery("a")).await.unwrap();
        outbox.accept(delivery("b")).await.unwrap();
        let a = outbox.claim(8).await.unwrap().due.remove(0);
        assert_eq!(a.delivery_id, "a", "b waits behind a, same project and ref");

        // The disk fills while a is being sent.
        full.store(true, Ordering::SeqCst);
        let sent = Recorded::Sent {
            status: 201,
            pipeline_id: Some(1),
            pipeline_url: None,
        };
        outbox.record(a.lease, sent.clone());
        let refused = outbox.accept(delivery("c")).await.unwrap_err();
        assert!(refused.reason.contains("disk is full"), "{refused}");
        assert!(outbox.health.problem().is_some(), "/readyz says not ready");
        assert!(
            outbox.claim(8).await.is_err(),
            "nothing is handed out meanwhile"
        );
        tokio::time::sleep(RETRY_EVERY + Duration::from_millis(300)).await;
        assert_eq!(
            states(dir.path()),
            [
                ("a".into(), "sending".into()),
                ("b".into(), "queued".into())
            ],
            "a's outcome waits in memory; b still waits behind a"
        );

        // Space again: the kept outcome is written without anyone asking, once.
        full.store(false, Ordering::SeqCst);
        assert_eq!(
            health_once(&outbox, true, Duration::from_secs(5)).await,
            None,
            "ready again without a restart"
        );
        assert_eq!(
            states(dir.path()),
            [("a".into(), "sent".into()), ("b".into(), "queued".into())]
        );
        let next = outbox.claim(8).await.unwrap();
        assert_eq!(next.due.len(), 1);
        assert_eq!(
            next.due[0].delivery_id, "b",
            "the key moved on to b, and a is not sent again"
        );
        outbox.accept(delivery("c")).await.unwrap();
        assert_eq!(outbox.depth().unwrap().0, 2, "b and c");
    }
}
