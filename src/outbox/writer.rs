//! The writer thread: every write to the store goes through it, in groups that share one
//! commit (the outbox's module comment says what that promises). A group takes whatever waits when
//! the last one ends; kept outcomes of sends go first, then webhooks together, then each
//! request in a savepoint of its own, then claims in the same transaction. On a shared
//! store a second writer, over a connection of its own, takes the claims (and holds) in
//! transactions of their own ([`Duty::Claims`]). Replies go out once the commit is known.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

use super::clock::{ClockWatch, Look};
use super::{
    Duty, NewDelivery, NewWork, Op, RETRY_EVERY, Recorded, STALLED_AFTER, StoreHealth, now_ms,
};
use crate::store::lock::StateLock;
use crate::store::{Accepted, Engine, EngineError, Lease};

/// Most requests one commit takes.
const GROUP_MAX: usize = 512;
/// How long a group of records nobody waits for stays open for more (see [`gather`]).
const NOTES_GATHER: Duration = Duration::from_millis(10);
/// Deliveries deleted per pruning step, so pruning never holds the writer for long.
const PRUNE_BATCH: usize = 500;
/// Keys of a down upstream held back per step: 4.5–6 ms of PostgreSQL's time with
/// 10,000 keys waiting (`EXPLAIN ANALYZE`).
pub(super) const HOLD_STEP: usize = 256;

/// Records nobody waits for (gateway calls' and refusals'), on their way to the writer
/// without a wake-up each: a record sent down the channel to a writer that sleeps wakes
/// it, and at one gateway connection that was a thread wake-up per call. A record is
/// added here; only the first one after the writer last took them sends it word
/// ([`Op::NotesWaiting`]), and the writer takes them all with its next group.
#[derive(Default)]
pub(super) struct Notes {
    waiting: Mutex<NotesWaiting>,
}

#[derive(Default)]
struct NotesWaiting {
    records: Vec<Op>,
    /// The writer has word that records wait, and takes them with its next group.
    told: bool,
    /// The writer is gone (stopped, or died of a bug): records are dropped at once, with
    /// their places, so that callers waiting for a place never wait for ever.
    closed: bool,
}

impl Notes {
    /// Adds a record (an [`Op::Note`]) for the writer; `false` when the writer is gone
    /// (then the record is dropped, with its place).
    pub(super) fn add(&self, record: Op, requests: &mpsc::Sender<Op>) -> bool {
        let mut waiting = self.lock();
        if waiting.closed {
            return false;
        }
        waiting.records.push(record);
        if waiting.told {
            return true;
        }
        if requests.send(Op::NotesWaiting).is_err() {
            waiting.records.pop();
            return false;
        }
        waiting.told = true;
        true
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, NotesWaiting> {
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Drops what waits, and every record from now on (see `closed`).
    fn close(&self) {
        let mut waiting = self.lock();
        waiting.closed = true;
        waiting.records.clear();
    }

    fn len(&self) -> usize {
        self.lock().records.len()
    }

    /// Moves waiting records into `batch` while it has fewer than `most`; returns whether
    /// some are left (the writer then still has word of them: none sends it again).
    fn take_into(&self, batch: &mut Vec<Op>, most: usize) -> bool {
        let mut waiting = self.lock();
        let room = most.saturating_sub(batch.len()).min(waiting.records.len());
        batch.extend(waiting.records.drain(..room));
        waiting.told = !waiting.records.is_empty();
        waiting.told
    }
}

/// Takes the requests waiting behind the first into its group, then the records nobody
/// waits for ([`Notes`]) as far as the group has room (all of them when it holds a
/// [`Op::Flush`]); returns whether records are left for the next group. Records wait up to
/// `notes_wait` ([`NOTES_GATHER`]) for company while nothing else is in the group: a
/// commit costs about the same for one record as for a hundred, and at 2,000 calls a
/// second one commit per call or two cost a tenth more CPU per call. Anything else that
/// arrives (a webhook, a claim) is written at once, with them.
fn gather(
    requests: &mpsc::Receiver<Op>,
    notes: &Notes,
    batch: &mut Vec<Op>,
    notes_wait: Duration,
) -> bool {
    let until = std::time::Instant::now() + notes_wait;
    // Kept as requests arrive rather than read again from the whole batch each time.
    let mut only_notes = batch.iter().all(Op::is_note);
    loop {
        while batch.len() < GROUP_MAX {
            match requests.try_recv() {
                Ok(op) => {
                    only_notes &= op.is_note();
                    batch.push(op);
                }
                Err(_) => break,
            }
        }
        let left = until.saturating_duration_since(std::time::Instant::now());
        if batch.is_empty()
            || !only_notes
            || batch.len() + notes.len() >= GROUP_MAX
            || left.is_zero()
        {
            break;
        }
        match requests.recv_timeout(left) {
            Ok(op) => {
                only_notes &= op.is_note();
                batch.push(op);
            }
            Err(_) => break,
        }
    }
    batch.retain(|op| !matches!(op, Op::NotesWaiting));
    let most = if batch.iter().any(|op| matches!(op, Op::Flush(_))) {
        usize::MAX
    } else {
        GROUP_MAX
    };
    notes.take_into(batch, most)
}

/// What the writer shares with the [`super::Outbox`] handles: where records nobody waits
/// for wait, word of new triggers, the store's health and clock, and commit timings.
pub(super) struct Shared {
    pub(super) duty: Duty,
    pub(super) notes: Arc<Notes>,
    pub(super) queued: Arc<NewWork>,
    pub(super) health: Arc<StoreHealth>,
    pub(super) skew: Arc<std::sync::atomic::AtomicI64>,
    pub(super) timings: crate::metrics::StoreTimings,
}

/// The writer thread's state.
pub(super) struct Writer {
    duty: Duty,
    /// Where the store's clock skew is published for [`super::Outbox::clock`].
    skew: Arc<std::sync::atomic::AtomicI64>,
    engine: Box<dyn Engine>,
    /// Records nobody waits for, taken with each group.
    notes: Arc<Notes>,
    queued: Arc<NewWork>,
    health: Arc<StoreHealth>,
    /// Outcomes of sends the store has not taken yet, oldest first.
    pending: Vec<SendOutcome>,
    /// Each kind of failure is said at most once a [`RETRY_EVERY`], with how many were not.
    logged: crate::limits::Throttle<&'static str>,
    /// Why the store refused the last webhook it could not take for a reason not its
    /// content (a privilege revoked, a table gone: failures that do not pass by
    /// themselves, which a probe's write elsewhere would not see); `/readyz` says it
    /// until a webhook is taken again.
    refusing_webhooks: Option<String>,
    /// When the writer last tried a webhook of its own while the store refused them.
    webhook_probed: Option<std::time::Instant>,
    /// Since when the store has taken this writer's claims without a failure (`None`
    /// while it fails); see [`Writer::may_take_over`].
    claims_sound_since: Option<std::time::Instant>,
    /// Commits that acknowledgements wait for, timed for `/metrics`.
    timings: crate::metrics::StoreTimings,
    /// The latest time seen on the store's clock, once read from the store: a clock set
    /// back is noticed (see [`super::clock`]).
    clock: Option<ClockWatch>,
    /// The state folder's lock, held as long as the writer runs.
    _lock: Option<StateLock>,
}

/// However the writer ends (all senders gone, or a panic), records stop waiting for it.
/// After a panic nothing more is written: `/readyz` says so, so that a load balancer
/// sends webhooks elsewhere instead of to a relay that refuses every one.
impl Drop for Writer {
    fn drop(&mut self) {
        self.notes.close();
        if std::thread::panicking() {
            self.health.set(self.duty, Some(
                "the store's writer stopped after an internal error (the log says which); restart the relay".into(),
            ));
        }
    }
}

/// What one group did, for replies and for the store's health.
#[derive(Default)]
struct GroupOutcome {
    replies: Vec<Reply>,
    /// Records to keep for the next group if this commit fails.
    records: Vec<SendOutcome>,
    /// Something was written (not only claims that found nothing).
    wrote: bool,
    new_triggers: bool,
    /// The keys of the new triggers, for the forwarder ([`NewWork`])...
    new_keys: Vec<String>,
    /// ...unless some new work is of keys not listed there.
    unlisted: bool,
    /// The first transient failure of an operation in the group.
    failure: Option<String>,
}

impl Writer {
    /// Starts the writer thread over `engine`, taking `requests` until every sender is
    /// gone; it holds the state folder's `lock` as long as it runs.
    pub(super) fn spawn(
        engine: Box<dyn Engine>,
        requests: mpsc::Receiver<Op>,
        shared: Shared,
        lock: Option<StateLock>,
    ) -> std::io::Result<()> {
        let Shared {
            duty,
            notes,
            queued,
            health,
            skew,
            timings,
        } = shared;
        let writer = Writer {
            duty,
            timings,
            skew,
            engine,
            notes,
            queued,
            health,
            pending: Vec::new(),
            logged: crate::limits::Throttle::new(RETRY_EVERY),
            refusing_webhooks: None,
            webhook_probed: None,
            claims_sound_since: Some(std::time::Instant::now()),
            clock: None,
            _lock: lock,
        };
        let name = match duty {
            Duty::Writes => "hookrelay-store",
            Duty::Claims => "hookrelay-claims",
        };
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || writer.run(requests))?;
        Ok(())
    }

    /// Takes every waiting request into one transaction and commits once; while the store
    /// fails, tries the kept records (or a probe) again every second.
    fn run(mut self, requests: mpsc::Receiver<Op>) {
        // Records left over from the last group (more than it had room for) go next,
        // without waiting for word of them.
        let mut notes_left = false;
        loop {
            let first = if notes_left {
                Some(Op::NotesWaiting)
            } else if self.pending.is_empty() && self.health.problem_of(self.duty).is_none() {
                match requests.recv() {
                    Ok(op) => Some(op),
                    Err(_) => break,
                }
            } else {
                match requests.recv_timeout(RETRY_EVERY) {
                    Ok(op) => Some(op),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => {
                        self.group(Vec::new());
                        break;
                    }
                }
            };
            let mut batch: Vec<Op> = first.into_iter().collect();
            notes_left = gather(&requests, &self.notes, &mut batch, NOTES_GATHER);
            self.group(batch);
        }
        if !self.pending.is_empty() {
            tracing::error!(
                outcomes = self.pending.len(),
                "the delivery store never took these send outcomes; their triggers will be sent again at the next start"
            );
        }
    }

    /// One group: kept records first, then the batch, one savepoint each, one commit.
    /// On a shared store claims come to a writer of their own (see
    /// [`super::Outbox::start`]), and even there go in a transaction apart from anything
    /// else: a claim locks keys, and a shared store's relays must never hold a key while
    /// they wait for anything else (the writes of a group wait on other relays'
    /// uncommitted deliveries; claims wait on nothing). On a store of its own, claims
    /// come last in the same one.
    ///
    /// Holds of down upstreams go with the claims, before them: like a claim, a hold waits
    /// on nobody, and a claim after it no longer sees the keys it moved.
    fn group(&mut self, batch: Vec<Op>) {
        let (mut claims, mut writes): (Vec<Op>, Vec<Op>) = batch
            .into_iter()
            .partition(|op| matches!(op, Op::Claim(..) | Op::Hold(..)));
        claims.sort_by_key(|op| matches!(op, Op::Claim(..)));
        // The same order on every relay, so two groups never wait for each other's rows
        // in a cycle: deliveries by id, outcomes by trigger (stable: one trigger's stay in
        // order).
        writes.sort_by(|a, b| write_order(a).cmp(&write_order(b)));
        if self.engine.claims_share_commits() {
            writes.extend(claims);
            self.write_group(writes, true);
            return;
        }
        if !writes.is_empty() || claims.is_empty() || !self.pending.is_empty() {
            self.write_group(writes, true);
        }
        if !claims.is_empty() {
            self.write_group(claims, false);
        }
    }

    /// One transaction; `with_pending`: the kept outcomes go first. Its time is shown to
    /// `/readyz` while it runs (see [`StoreHealth`]), and logged when it ends well past
    /// [`STALLED_AFTER`].
    fn write_group(&mut self, batch: Vec<Op>, with_pending: bool) {
        let began = std::time::Instant::now();
        self.health.set_writing(self.duty, Some(began));
        self.write_group_now(batch, with_pending);
        self.health.set_writing(self.duty, None);
        let took = began.elapsed();
        // A write that failed is logged as a failure already (one to a database that
        // cannot be reached takes its 5 s connect timeout to fail).
        if took >= STALLED_AFTER && self.health.problem_of(self.duty).is_none() {
            tracing::warn!(
                seconds = took.as_secs(),
                "one write to the delivery store took this long (a disk or database that stopped answering?); webhooks waited for it"
            );
        }
    }

    fn write_group_now(&mut self, batch: Vec<Op>, with_pending: bool) {
        // Only a commit that precedes an acknowledgement needs to reach the disk first.
        let durable = batch.iter().any(|op| {
            matches!(
                op,
                Op::Accept(..) | Op::Replay(..) | Op::Pipeline(_, None, _)
            )
        });
        let probe = batch.is_empty() && self.pending.is_empty();
        let started = durable.then(std::time::Instant::now);
        let size = batch.len() + if with_pending { self.pending.len() } else { 0 };
        let pending = if with_pending {
            std::mem::take(&mut self.pending)
        } else {
            Vec::new()
        };
        let now = now_ms();
        let mut outcome = GroupOutcome::default();
        let mut begun = self.engine.begin(durable);
        if begun.is_ok() && self.keep_time(&mut outcome) {
            begun = self.engine.begin(durable);
        }
        // The group's webhooks first, together where the engine can: nothing else is in
        // the transaction yet, so a failed batch is undone by a rollback (no savepoint
        // round trips), and the group goes one by one in a new transaction.
        let batch = match begun {
            Ok(()) => {
                let (batch, failed) = self.accept_together(batch, now, &mut outcome);
                if failed {
                    self.engine.rollback();
                    begun = self.engine.begin(durable);
                }
                batch
            }
            Err(_) => batch,
        };
        if let Err(err) = begun {
            // Whatever the reason, a store whose transactions cannot begin takes no
            // writes: `/readyz` says so.
            outcome.failure = Some(err.message.clone());
            outcome.records = pending;
            for op in batch {
                self.fail_op(op, &err, &mut outcome);
            }
            self.finish(Err(err), outcome);
            return;
        }
        for kept in pending {
            self.record(kept, now, &mut outcome);
        }
        if probe {
            // In a savepoint: a failed probe (a read-only database) leaves the
            // transaction usable, and the commit says nothing of it.
            match self.in_savepoint(|engine| engine.probe(now)) {
                Ok(()) => outcome.wrote = true,
                Err(err) => outcome.failure = Some(err.message),
            }
        }
        // Not only in idle groups: claims may come every second and keep a group from
        // ever being idle.
        if self.refusing_webhooks.is_some()
            && self
                .webhook_probed
                .is_none_or(|at| at.elapsed() >= RETRY_EVERY)
        {
            self.webhook_probed = Some(std::time::Instant::now());
            if self.probe_a_webhook(now) {
                outcome.wrote = true;
            }
        }
        self.skew.store(
            self.engine.clock_skew(),
            std::sync::atomic::Ordering::Relaxed,
        );
        for op in batch {
            self.apply(op, now, &mut outcome);
        }
        let committed = self.engine.commit();
        if let (Some(started), Ok(())) = (started, &committed) {
            self.timings
                .commit_seconds
                .observe(started.elapsed().as_secs_f64());
            self.timings.commit_size.observe(size as f64);
        }
        self.finish(committed, outcome);
    }

    /// Looks at the store's clock with the group's transaction just begun (the
    /// database's clock is read at `begin`): notes the time in it once a second; when the
    /// clock went back, ends it and moves the waiting deadlines back in a transaction of
    /// their own first (see [`super::clock`]). Returns whether the group's transaction
    /// was ended (and must begin again). On a shared store the claims' writer keeps time
    /// too: with no webhooks coming, claims are what runs.
    ///
    /// The time is read after `begin`, which reads the database's clock: the two are of
    /// one moment.
    fn keep_time(&mut self, outcome: &mut GroupOutcome) -> bool {
        let now = now_ms();
        let store_now = now + self.engine.clock_skew();
        let clock = match &mut self.clock {
            Some(clock) => clock,
            None => {
                // The first group reads what the store noted last, apart: a step while
                // no relay ran shows at the first look.
                self.engine.rollback();
                let noted = self.engine.begin(false).and_then(|()| {
                    let noted = self.engine.clock_noted();
                    self.engine.commit().and(noted)
                });
                if noted.is_err() {
                    self.engine.rollback();
                }
                self.clock = noted.ok().map(ClockWatch::from_store);
                return true;
            }
        };
        match clock.look(store_now) {
            // The claims' writer only looks: a claim waits on nothing while it holds
            // keys, and noting writes a row other relays' commits write too.
            Look::Steady { note: true } if self.duty == Duty::Writes => {
                // Failing, it fails the group's commit, which says why.
                let _ = self.engine.note_clock(now);
                false
            }
            Look::Steady { .. } => false,
            Look::WentBack => {
                self.engine.rollback();
                self.move_deadlines_back(outcome);
                true
            }
        }
    }

    /// The store's clock went back: every waiting deadline moves back by as much as the
    /// time the store noted last is ahead of it, unless another relay did that first.
    fn move_deadlines_back(&mut self, outcome: &mut GroupOutcome) {
        let moved = self.engine.begin(true).and_then(|()| {
            // Read once the lock is held (another relay may have held it, moving them).
            let noted = self.engine.clock_noted()?;
            let now = now_ms();
            let store_now = now + self.engine.clock_skew();
            let by = noted.map_or(0, |noted| noted - store_now);
            if by > 0 {
                self.engine.move_deadlines_back(by, now)?;
            }
            self.engine.commit().map(|()| (by, store_now))
        });
        match moved {
            Ok((by, store_now)) => {
                if let Some(clock) = &mut self.clock {
                    clock.moved_back_to(store_now);
                }
                if by > 0 {
                    self.timings.clock_steps_back.inc();
                    tracing::warn!(
                        by_ms = by,
                        "the store's clock went back; every waiting retry, deferral and limit was moved back as much, and keeps the time it had left"
                    );
                    outcome.note_unlisted_work();
                }
            }
            Err(err) => {
                self.engine.rollback();
                if let Some(held_back) = self.logged.allow("clock") {
                    tracing::error!(
                        reason = %err, held_back,
                        "the store's clock went back, and the waiting deadlines could not be moved back with it; trying again with the next group"
                    );
                }
            }
        }
    }

    /// Records the group's webhooks in one go where the engine can (a few statements for
    /// the whole group), and its gateway calls' records in another, as the first things in
    /// the transaction; returns the requests left to run one by one (all of them when the
    /// engine cannot), and whether a batch failed (then the caller rolls the transaction
    /// back: the batches wrote nothing that stays).
    fn accept_together(
        &mut self,
        batch: Vec<Op>,
        now: i64,
        outcome: &mut GroupOutcome,
    ) -> (Vec<Op>, bool) {
        let (accepts, rest): (Vec<Op>, Vec<Op>) = batch
            .into_iter()
            .partition(|op| matches!(op, Op::Accept(..)));
        let (notes, mut left): (Vec<Op>, Vec<Op>) =
            rest.into_iter().partition(|op| matches!(op, Op::Note(..)));
        let mut recorded = Vec::new();
        let mut failed = false;
        let mut kinds = [accepts, notes].into_iter();
        while let Some(kind) = kinds.next() {
            if kind.len() < 2 {
                left.extend(kind);
                continue;
            }
            let deliveries: Vec<&NewDelivery> = kind
                .iter()
                .map(|op| match op {
                    Op::Accept(delivery, ..) | Op::Note(delivery, ..) => delivery,
                    _ => unreachable!("only accepts and notes are recorded together"),
                })
                .collect();
            // Webhooks wait for this commit; gateway calls' records do not.
            let someone_waits = matches!(kind[0], Op::Accept(..));
            match self
                .engine
                .insert_deliveries(&deliveries, now, someone_waits)
            {
                Some(Ok(answers)) => recorded.push((kind, answers)),
                Some(Err(err)) => {
                    if self.logged.allow("batch").is_some() {
                        tracing::warn!(reason = %err, "recording webhooks together failed; recording them one by one");
                    }
                    // Undone by the caller's rollback: everything goes one by one.
                    left.extend(kind);
                    left.extend(kinds.by_ref().flatten());
                    left.extend(recorded.drain(..).flat_map(|(kind, _)| kind));
                    failed = true;
                    break;
                }
                None => left.extend(kind),
            }
        }
        for (op, answer_of) in recorded
            .into_iter()
            .flat_map(|(kind, answers)| kind.into_iter().zip(answers))
        {
            let result = Ok(answer_of);
            outcome.note_result(&result);
            match op {
                Op::Accept(delivery, reply, _room) => {
                    self.note_webhook_taken(&result);
                    outcome.note_new_work(&delivery, &result);
                    outcome.replies.push(answer(reply, result));
                }
                Op::Note(..) => {}
                _ => unreachable!("only accepts and notes are recorded together"),
            }
        }
        // One by one in the group's order, as if nothing had been taken out.
        left.sort_by(|a, b| write_order(a).cmp(&write_order(b)));
        (left, failed)
    }

    /// Runs one request inside the open transaction.
    fn apply(&mut self, op: Op, now: i64, outcome: &mut GroupOutcome) {
        match op {
            Op::Accept(delivery, reply, _room) => {
                let result = self.in_savepoint(|engine| engine.insert_delivery(&delivery, now));
                outcome.note_new_work(&delivery, &result);
                outcome.note_result(&result);
                self.note_webhook_taken(&result);
                outcome.replies.push(answer(reply, result));
            }
            Op::Note(delivery, _) => {
                let result = self.in_savepoint(|engine| engine.insert_delivery(&delivery, now));
                if let Err(err) = &result
                    && self.logged.allow("note").is_some()
                {
                    tracing::warn!(reason = %err, "a gateway call's record could not be stored");
                }
                outcome.note_result(&result);
            }
            Op::Claim(limit, reply) => {
                let take_over = self.may_take_over();
                self.engine.let_claims_take_over(take_over);
                let result = self.in_savepoint(|engine| engine.claim(now, limit));
                outcome.note_result_that(&result, |claimed| !claimed.due.is_empty());
                outcome.replies.push(answer(reply, result));
            }
            Op::Hold(hold, reply) => {
                let result =
                    self.in_savepoint(|engine| engine.hold_upstream(&hold, HOLD_STEP, now));
                outcome.note_result_that(&result, |held| *held > 0);
                outcome.replies.push(answer(reply, result));
            }
            Op::Record(kept) => self.record(kept, now, outcome),
            Op::Pipeline(update, poll, reply) => {
                let result = self.in_savepoint(|engine| {
                    if let Some(kept) = &poll
                        && !engine.record(kept.lease, &kept.as_of(now), now)?
                    {
                        return Ok(crate::status::Applied::Skipped(
                            "the poll's claim is no longer current".into(),
                        ));
                    }
                    crate::status::apply_pipeline(engine, &update, now)
                });
                if result.is_ok() {
                    outcome.note_unlisted_work();
                }
                outcome.note_result(&result);
                match (&result, poll) {
                    (Err(err), Some(SendOutcome { lease, .. })) if err.transient => {
                        // Asked again once the store takes writes: the key is due again.
                        self.pending
                            .push(SendOutcome::new(lease, Recorded::Released));
                    }
                    (Err(err), _) if self.logged.allow("pipeline").is_some() => {
                        tracing::warn!(pipeline = update.event.pipeline_id, reason = %err, "a pipeline's state could not be stored");
                    }
                    _ => {}
                }
                if let Some(reply) = reply {
                    outcome.replies.push(answer(reply, result));
                }
            }
            Op::Replay(target, reply) => {
                let result = self.in_savepoint(|engine| engine.replay(&target, now));
                if result.is_ok() {
                    outcome.note_unlisted_work();
                }
                outcome.note_result(&result);
                outcome.replies.push(answer(reply, result));
            }
            Op::Prune(before, after, reply) => {
                let result = self.in_savepoint(|engine| engine.prune(before, PRUNE_BATCH, after));
                outcome.note_result(&result);
                outcome.replies.push(answer(reply, result));
            }
            Op::Flush(reply) => outcome.replies.push(Box::new(move |_| {
                let _ = reply.send(());
            })),
            // Taken out by `gather`, which puts the records themselves in its place.
            Op::NotesWaiting => {}
        }
    }

    /// Records one outcome; a transient failure keeps it for the next group.
    fn record(&mut self, kept: SendOutcome, now: i64, outcome: &mut GroupOutcome) {
        let lease = kept.lease;
        let recorded = kept.as_of(now);
        let result = self.in_savepoint(|engine| engine.record(lease, &recorded, now));
        if matches!(result, Ok(true)) && lease.reports_status {
            // The first status of the trigger's pipeline, where its source reports them.
            // A failure here keeps the outcome: the trigger was sent, whatever the status.
            let status = self.in_savepoint(|engine| {
                crate::status::after_trigger(engine, lease.trigger, &recorded, now)
            });
            if let Err(err) = status
                && self.logged.allow("status").is_some()
            {
                tracing::warn!(trigger = lease.trigger, reason = %err, "the first status of a trigger's pipeline could not be queued");
            }
        }
        match result {
            Ok(true) => {
                outcome.wrote = true;
                // The key's head is due again, or the next trigger of its key now is.
                outcome.note_unlisted_work();
                // A later commit failure undoes it: keep it until the commit is known.
                outcome.records.push(kept);
            }
            Ok(false) => {
                // The lease is no longer current: another claim owns the trigger now.
                tracing::warn!(
                    trigger = lease.trigger,
                    "an outcome arrived for a claim that is no longer current; not recorded"
                );
            }
            Err(err) if err.transient => {
                outcome.failure.get_or_insert_with(|| err.message.clone());
                self.pending.push(kept);
            }
            Err(err) => {
                if self.logged.allow("record").is_some() {
                    tracing::error!(trigger = lease.trigger, reason = %err, "could not record a trigger's outcome");
                }
            }
        }
    }

    /// Whether the store would take a webhook now: one written and undone (a savepoint
    /// rolled back). With no webhook arriving (a load balancer keeps them away while
    /// `/readyz` says 503), this is what says that the store takes them again.
    fn probe_a_webhook(&mut self, now: i64) -> bool {
        let probe = NewDelivery {
            source: "hookrelay-probe".into(),
            delivery_id: format!("probe-{now}"),
            event_type: "probe".into(),
            headers: Vec::new(),
            body: Default::default(),
            summary: "{}".into(),
            triggers: Vec::new(),
        };
        if self.engine.savepoint().is_err() {
            return false;
        }
        let result = self.engine.insert_delivery(&probe, now);
        self.engine.release(false);
        self.note_webhook_taken(&result)
    }

    /// Notes whether the store took a webhook (see `refusing_webhooks`): a refusal for
    /// the webhook's content says nothing of the store. Returns whether it was taken.
    fn note_webhook_taken<T>(&mut self, result: &Result<T, EngineError>) -> bool {
        match result {
            Ok(_) => self.refusing_webhooks = None,
            Err(err) if !err.refused => self.refusing_webhooks = Some(err.message.clone()),
            Err(_) => {}
        }
        result.is_ok()
    }

    fn in_savepoint<T>(
        &mut self,
        op: impl FnOnce(&mut dyn Engine) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        self.engine.savepoint()?;
        let result = op(self.engine.as_mut());
        self.engine.release(result.is_ok());
        result
    }

    /// Answers a request that never ran because the group could not begin.
    fn fail_op(&mut self, op: Op, err: &EngineError, outcome: &mut GroupOutcome) {
        match op {
            Op::Accept(_, reply, _) => outcome.replies.push(answer(reply, Err(err.clone()))),
            Op::Claim(_, reply) => outcome.replies.push(answer(reply, Err(err.clone()))),
            Op::Replay(_, reply) => outcome.replies.push(answer(reply, Err(err.clone()))),
            Op::Prune(_, _, reply) => outcome.replies.push(answer(reply, Err(err.clone()))),
            Op::Record(kept) => self.pending.push(kept),
            Op::Pipeline(_, poll, reply) => {
                if let Some(SendOutcome { lease, .. }) = poll {
                    self.pending
                        .push(SendOutcome::new(lease, Recorded::Released));
                }
                if let Some(reply) = reply {
                    outcome.replies.push(answer(reply, Err(err.clone())));
                }
            }
            Op::Hold(_, reply) => outcome.replies.push(answer(reply, Err(err.clone()))),
            Op::Note(..) | Op::NotesWaiting => {}
            Op::Flush(reply) => {
                let _ = reply.send(());
            }
        }
    }

    /// Answers the group once its commit is known, and updates the store's health.
    fn finish(&mut self, committed: Result<(), EngineError>, outcome: GroupOutcome) {
        let GroupOutcome {
            replies,
            records,
            wrote,
            new_triggers,
            new_keys,
            unlisted,
            failure,
        } = outcome;
        let commit_failure = committed.err();
        let committed_ok = commit_failure.is_none();
        if let Some(err) = &commit_failure {
            // Nothing of this group happened: its records wait for the next one, in order.
            let mut kept = records;
            kept.append(&mut self.pending);
            self.pending = kept;
            if let Some(held_back) = self.logged.allow("commit") {
                match self.duty {
                    Duty::Writes => tracing::error!(
                        reason = %err, held_back,
                        "the delivery store could not commit; nothing in this group was acknowledged"
                    ),
                    Duty::Claims => tracing::error!(
                        reason = %err, held_back,
                        "the delivery store could not commit a claim; nothing it claimed is sent"
                    ),
                }
            }
        }
        let problem = commit_failure
            .as_ref()
            .filter(|err| err.transient)
            .map(|err| err.message.clone())
            .or(failure)
            .or_else(|| self.refusing_webhooks.clone());
        let before = self.health.problem_of(self.duty);
        match (&problem, self.duty) {
            (Some(reason), duty) => {
                if before.is_none() {
                    match duty {
                        Duty::Writes => {
                            tracing::error!(%reason, "the delivery store cannot be written; webhooks are refused until it can")
                        }
                        Duty::Claims => {
                            tracing::error!(%reason, "the delivery store refuses claims; nothing is sent until it takes them")
                        }
                    }
                }
                self.health.set(self.duty, Some(reason.clone()));
            }
            // A claim that committed, even one that found nothing, proves the claimer's
            // connection works; the writer's proof is a write.
            (None, Duty::Claims) if committed_ok => {
                if before.is_some() {
                    tracing::info!("the delivery store takes claims again");
                }
                self.health.set(self.duty, None);
            }
            (None, Duty::Writes) if wrote && self.pending.is_empty() => {
                if before.is_some() {
                    tracing::info!("the delivery store takes writes again");
                }
                self.health.set(self.duty, None);
            }
            (None, _) => {}
        }
        match self.duty {
            Duty::Writes => self.health.set_outcomes_waiting(!self.pending.is_empty()),
            Duty::Claims if problem.is_some() || !committed_ok => self.claims_sound_since = None,
            Duty::Claims => {
                self.claims_sound_since
                    .get_or_insert_with(std::time::Instant::now);
            }
        }
        let failed = commit_failure.map(|err| EngineError {
            message: format!("commit failed: {}", err.message),
            ..err
        });
        for reply in replies {
            reply(failed.as_ref());
        }
        if new_triggers && failed.is_none() {
            self.queued.add((!unlisted).then_some(new_keys));
        }
    }
}

/// A send's outcome on its way into the store, with when it was made on this relay's
/// clock. A deadline in it (a retry's, a deferral's) was made on that clock too: should
/// the clock be set back before the outcome is written, it moves back with it. The store's
/// deadlines are moved when the step is noticed (see [`super::clock`]); an outcome made
/// before the step and written after was not among them, and waited the whole step (an
/// hour, for a retry due in seconds).
pub(super) struct SendOutcome {
    lease: Lease,
    recorded: Recorded,
    made_at: i64,
}

impl SendOutcome {
    pub(super) fn new(lease: Lease, recorded: Recorded) -> SendOutcome {
        SendOutcome {
            lease,
            recorded,
            made_at: now_ms(),
        }
    }

    /// The outcome to write at `now` (this relay's clock): its deadlines moved back by
    /// any step back of the clock since it was made (a step smaller than
    /// [`super::clock::STEP_MS`] is left alone, as the store's own deadlines are).
    fn as_of(&self, now: i64) -> std::borrow::Cow<'_, Recorded> {
        let step = self.made_at - now;
        if step > super::clock::STEP_MS {
            std::borrow::Cow::Owned(self.recorded.moved_back(step))
        } else {
            std::borrow::Cow::Borrowed(&self.recorded)
        }
    }
}

/// At most how long a relay back from losing a shared store waits before its claims take
/// over keys whose lease ran out (the lease itself, when shorter).
const TAKE_OVER_AFTER_AT_MOST: Duration = Duration::from_secs(10);

impl Writer {
    /// Whether a claim may take over keys whose lease ran out. Not while this relay holds
    /// outcomes the store has not taken (their leases may be among them: the store was
    /// gone for longer than a lease), nor until its claims have been taken again for a
    /// while after a failure or the start: every relay that lost the store with it (a
    /// database restarted, a network cut) then writes the outcomes it kept before its
    /// keys are taken from it, instead of a second send racing its first outcome. A relay
    /// that never lost the store still takes over from one that did, once the lease ends:
    /// that is the lease's promise (at-least-once).
    fn may_take_over(&self) -> bool {
        let wait = self
            .engine
            .lease()
            .map_or(Duration::ZERO, |lease| lease.min(TAKE_OVER_AFTER_AT_MOST));
        !self.health.outcomes_waiting()
            && self
                .claims_sound_since
                .is_some_and(|since| since.elapsed() >= wait)
    }
}

impl GroupOutcome {
    /// Notes the keys of a delivery's new triggers, when recording it queued any: each
    /// key once (a group's webhooks are mostly of a few), and none once there are more
    /// than the forwarder would be told of.
    fn note_new_work(&mut self, delivery: &NewDelivery, result: &Result<Accepted, EngineError>) {
        if !matches!(result, Ok(accepted) if accepted.adds_work()) {
            return;
        }
        self.new_triggers = true;
        if self.unlisted {
            return;
        }
        for trigger in delivery.triggers.iter().filter(|t| t.done.is_none()) {
            let key = trigger.order_key();
            if !self.new_keys.contains(&key) {
                self.new_keys.push(key);
            }
        }
        if self.new_keys.len() > super::new_work::MOST_KEYS {
            self.note_unlisted_work();
        }
    }

    /// Notes new or newly due work whose keys it does not list (an outcome that moved its
    /// key on, a replay, a pipeline's status posts): the forwarder claims whatever it sends.
    fn note_unlisted_work(&mut self) {
        self.new_triggers = true;
        self.unlisted = true;
        self.new_keys.clear();
    }

    fn note_result<T>(&mut self, result: &Result<T, EngineError>) {
        self.note_result_that(result, |_| true);
    }

    /// Notes an operation's result; `changed`: whether its success wrote anything (a
    /// claim or a hold that found nothing wrote nothing, and proves no recovery).
    fn note_result_that<T>(
        &mut self,
        result: &Result<T, EngineError>,
        changed: impl FnOnce(&T) -> bool,
    ) {
        match result {
            Ok(value) => self.wrote |= changed(value),
            Err(err) if err.transient => {
                self.failure.get_or_insert_with(|| err.message.clone());
            }
            Err(_) => {}
        }
    }
}

/// Where a write goes in its group (see [`Writer::group`]).
fn write_order(op: &Op) -> (u8, &str, &str, i64) {
    match op {
        Op::Accept(delivery, ..) | Op::Note(delivery, ..) => {
            (0, &delivery.source, &delivery.delivery_id, 0)
        }
        Op::Record(kept) => (1, "", "", kept.lease.trigger),
        Op::Pipeline(update, _, _) => (2, &update.upstream, "", update.event.pipeline_id),
        _ => (3, "", "", 0),
    }
}

/// Answers a request once its group's commit is known: the request's own outcome, or the
/// commit's failure, which undoes everything in the group.
type Reply = Box<dyn FnOnce(Option<&EngineError>) + Send>;

fn answer<T: Send + 'static>(
    reply: oneshot::Sender<Result<T, EngineError>>,
    outcome: Result<T, EngineError>,
) -> Reply {
    Box::new(move |failed| {
        let _ = reply.send(match failed {
            Some(err) => Err(err.clone()),
            None => outcome,
        });
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An outcome made before the clock was set back keeps the time its deadline had
    /// left; a step smaller than the store's own threshold, or forward, changes nothing.
    #[test]
    fn an_outcome_s_deadline_moves_back_with_a_clock_set_back_before_it_is_written() {
        let made_at = 10_000_000;
        let kept = SendOutcome {
            lease: Lease {
                trigger: 1,
                token: 7,
                reports_status: false,
            },
            recorded: Recorded::Retry {
                due_at: made_at + 3_000,
                status: Some(500),
                reason: "500".into(),
            },
            made_at,
        };
        let due = |now: i64| match kept.as_of(now).as_ref() {
            Recorded::Retry { due_at, .. } => *due_at,
            other => panic!("{other:?}"),
        };
        let hour = 3_600_000;
        assert_eq!(due(made_at - hour + 100), made_at - hour + 100 + 3_000);
        assert_eq!(
            due(made_at + 500),
            made_at + 3_000,
            "written a moment later"
        );
        assert_eq!(
            due(made_at - 1_000),
            made_at + 3_000,
            "within the threshold"
        );
        assert_eq!(due(made_at + hour), made_at + 3_000, "forward: comes early");
        let released = SendOutcome {
            recorded: Recorded::Released,
            ..kept
        };
        assert!(matches!(
            released.as_of(made_at - hour).as_ref(),
            Recorded::Released
        ));
    }

    fn noted(id: &str) -> Op {
        let places = Arc::new(tokio::sync::Semaphore::new(1));
        Op::Note(
            crate::store::semantics::delivery(id, Vec::new()),
            places.try_acquire_owned().unwrap(),
        )
    }

    fn kinds(batch: &[Op]) -> Vec<&'static str> {
        batch
            .iter()
            .map(|op| match op {
                Op::Note(..) => "note",
                Op::NotesWaiting => "word",
                Op::Claim(..) => "claim",
                _ => "other",
            })
            .collect()
    }

    /// Records nobody waits for send the writer one word however many there are, wait
    /// for company, and anything else ends the wait at once.
    #[test]
    fn notes_wait_for_company_and_anything_else_ends_the_wait() {
        let (requests, received) = mpsc::channel();
        let notes = Arc::new(Notes::default());
        assert!(notes.add(noted("first"), &requests));
        assert!(notes.add(noted("second"), &requests));
        assert_eq!(kinds(&received.try_iter().collect::<Vec<_>>()), ["word"]);
        let late = std::thread::spawn({
            let notes = notes.clone();
            move || {
                std::thread::sleep(Duration::from_millis(5));
                assert!(notes.add(noted("late"), &requests));
                std::thread::sleep(Duration::from_millis(5));
                let (reply, _) = oneshot::channel();
                requests.send(Op::Claim(1, reply)).unwrap();
                requests
            }
        });
        // A wait far longer than the test: only the claim can end it.
        let mut batch = vec![Op::NotesWaiting];
        let left = gather(&received, &notes, &mut batch, Duration::from_secs(600));
        assert!(!left);
        assert_eq!(kinds(&batch), ["claim", "note", "note", "note"]);
        let requests = late.join().unwrap();
        assert_eq!(
            received.try_iter().count(),
            0,
            "the late record sent no word"
        );

        // Taken, the next record sends word again.
        assert!(notes.add(noted("next"), &requests));
        assert_eq!(kinds(&received.try_iter().collect::<Vec<_>>()), ["word"]);
        let mut batch = vec![Op::NotesWaiting];
        assert!(!gather(
            &received,
            &notes,
            &mut batch,
            Duration::from_millis(1)
        ));
        assert_eq!(kinds(&batch), ["note"]);

        // Once the writer is gone, a record is dropped, and says so.
        drop(received);
        assert!(!notes.add(noted("too late"), &requests));
        assert_eq!(notes.len(), 0);
    }

    /// A writer that ends with records waiting, whatever ends it, gives their places back,
    /// and later records are dropped at once: a caller waiting for a place never hangs.
    #[test]
    fn records_do_not_wait_for_a_writer_that_is_gone() {
        let (requests, _received) = mpsc::channel();
        let notes = Notes::default();
        let places = Arc::new(tokio::sync::Semaphore::new(2));
        let record = |id: &str| {
            Op::Note(
                crate::store::semantics::delivery(id, Vec::new()),
                places.clone().try_acquire_owned().unwrap(),
            )
        };
        assert!(notes.add(record("waiting"), &requests));
        assert_eq!(places.available_permits(), 1);
        notes.close();
        assert_eq!(places.available_permits(), 2, "its place is back");
        assert!(!notes.add(record("late"), &requests));
        assert_eq!(places.available_permits(), 2);
    }

    /// A group takes at most `GROUP_MAX` records; the writer keeps word of the rest (none
    /// is sent again) and takes them next. A flush takes them all, so that it answers
    /// only once everything noted before it is written.
    #[test]
    fn records_beyond_a_group_wait_for_the_next_and_a_flush_takes_them_all() {
        let (requests, received) = mpsc::channel();
        let notes = Notes::default();
        for i in 0..GROUP_MAX + 10 {
            assert!(notes.add(noted(&format!("n{i}")), &requests));
        }
        assert_eq!(received.try_iter().count(), 1, "one word");
        let mut batch = vec![Op::NotesWaiting];
        assert!(gather(&received, &notes, &mut batch, Duration::ZERO));
        assert_eq!(batch.len(), GROUP_MAX);
        assert!(notes.add(noted("more"), &requests));
        assert_eq!(
            received.try_iter().count(),
            0,
            "the writer has word already"
        );
        let mut batch = vec![Op::NotesWaiting];
        assert!(!gather(&received, &notes, &mut batch, Duration::ZERO));
        assert_eq!(batch.len(), 11);

        for i in 0..GROUP_MAX + 10 {
            assert!(notes.add(noted(&format!("f{i}")), &requests));
        }
        let (reply, _) = oneshot::channel();
        requests.send(Op::Flush(reply)).unwrap();
        let mut batch = Vec::new();
        assert!(!gather(&received, &notes, &mut batch, Duration::ZERO));
        assert_eq!(batch.len(), 1 + GROUP_MAX + 10);
    }
}
