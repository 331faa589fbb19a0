//! The forwarder: sends due triggers from the outbox and records what GitLab said.
//!
//! Up to `workers` sends run at once; the store hands out at most one trigger per project
//! and ref at a time, so triggers for the same project and ref reach GitLab in the order
//! they were accepted. Sleeps until the next trigger is due (each claim says when), a new
//! one is queued, or (for replays made by another process) a second passes; when the store
//! refuses claims it backs off, logging at most once a second. On shutdown it stops claiming, lets
//! sends in flight finish for a bounded time, and returns the rest to the outbox.

pub mod statuses;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use indexmap::IndexMap;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::app::App;
use crate::git_ref::GitRef;
use crate::limits::Refused;
use crate::metrics::TriggerOutcome;
use crate::outbox::outage::{Outages, Paused, means_down};
use crate::outbox::{DueTrigger, Outbox, Recorded, UpstreamHold, now_ms};
use crate::retry::{RetryPolicy, Verdict, classify};
use crate::secret::{Secret, loaded_or_stored};
use crate::store::{Lease, WorkKind};
use crate::trigger::{ProjectId, Trigger};

/// How the forwarder behaves (`[delivery]` and `--dry-run`).
#[derive(Clone, Debug)]
pub struct ForwarderOptions {
    pub workers: usize,
    pub policy: RetryPolicy,
    /// Record what would be sent instead of sending it.
    pub dry_run: bool,
    /// Finished deliveries older than this are pruned.
    pub retention: Duration,
    /// How long sends in flight may take to finish at shutdown.
    pub drain: Duration,
    /// Longest sleep between looks at the store: replays by `hookrelay replay`, and
    /// other relays' work on a shared store, arrive this way.
    pub poll: Duration,
}

impl Default for ForwarderOptions {
    fn default() -> Self {
        ForwarderOptions {
            workers: 8,
            policy: RetryPolicy::default(),
            dry_run: false,
            retention: Duration::from_secs(7 * 24 * 3600),
            drain: Duration::from_secs(10),
            poll: POLL,
        }
    }
}

/// The default [`ForwarderOptions::poll`].
pub const POLL: Duration = Duration::from_secs(1);
/// The first wait after the store refuses a claim; it doubles up to the most.
const STORE_BACKOFF_MIN: Duration = Duration::from_millis(100);
const STORE_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often old deliveries are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// How long ago a trigger was accepted.
fn age(due: &DueTrigger) -> Duration {
    Duration::from_millis((now_ms() - due.created_at).max(0) as u64)
}

/// How long a trigger this relay's configuration cannot send waits for another relay.
const OTHER_CONFIGURATION: Duration = Duration::from_secs(5);

/// The keys this relay is sending, for [`crate::outbox::NewWork`]: new triggers only of these need
/// no claim. A key counts from its claim until its outcome is committed: a send's last act
/// is to hand its outcome to the writer, and the writer's commit of it wakes the forwarder
/// with work it cannot list, which claims.
#[derive(Default)]
struct Sending {
    /// Each send in flight, by the task sending it: its lease and key.
    tasks: HashMap<tokio::task::Id, (Lease, String)>,
    /// Keys whose send ended, until an outcome is next seen committed (or a claim looks).
    recording: HashSet<String>,
}

impl Sending {
    fn started(&mut self, task: tokio::task::Id, lease: Lease, key: String) {
        self.tasks.insert(task, (lease, key));
    }

    /// A send ended; one that panicked records nothing, so its key is free at once.
    fn ended(&mut self, done: Result<(tokio::task::Id, ()), tokio::task::JoinError>) {
        let (task, recorded) = match done {
            Ok((task, ())) => (task, true),
            Err(err) => (err.id(), false),
        };
        if let Some((_, key)) = self.tasks.remove(&task)
            && recorded
        {
            self.recording.insert(key);
        }
    }

    /// Some outcome was committed, or a claim looked at the store: every key whose send
    /// ended is free again (at worst a claim finds nothing; none is ever missed).
    fn settled(&mut self) {
        self.recording.clear();
    }

    fn holds(&self, key: &str) -> bool {
        self.recording.contains(key) || self.tasks.values().any(|(_, sending)| sending == key)
    }

    fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.tasks.values().map(|(lease, _)| lease)
    }
}

/// With a shared store, work accepted under one relay's configuration may be claimed by a
/// relay whose configuration is older or newer (a rolling reload): it waits for a relay
/// that can send it rather than failing, until `max_age` since it was accepted. Whether
/// it was left so (then recorded and logged); `false`: the caller fails or retries it.
fn left_for_another_configuration(
    outbox: &Outbox,
    due: &DueTrigger,
    options: &ForwarderOptions,
    reason: &str,
) -> bool {
    let age = age(due);
    if !outbox.shared || age >= options.policy.max_age {
        return false;
    }
    tracing::warn!(
        delivery = %due.delivery_id, source = %due.source, rule = %due.rule, project = %due.project, %reason,
        "trigger left for a relay (or a reload) whose configuration can send it"
    );
    outbox.record(
        due.lease,
        Recorded::Deferred {
            due_at: now_ms() + OTHER_CONFIGURATION.as_millis() as i64,
            reason: format!("this relay's configuration cannot send it: {reason}"),
        },
    );
    true
}

/// Lease left beyond an upstream call's timeout for a send to start.
const TRUST_MARGIN: Duration = Duration::from_millis(500);

/// With a shared store, how much of a claim's lease is left when it no longer outlasts a
/// call of `call` (and the margin): this relay was held up (frozen, starved) since it
/// claimed at `claimed_at`, and another may take the key over before the call could end,
/// so the work must be handed back unsent. `None`: the call may start.
pub(crate) fn claim_too_old(
    outbox: &Outbox,
    claimed_at: std::time::Instant,
    call: Duration,
) -> Option<Duration> {
    let left = outbox.lease?.saturating_sub(claimed_at.elapsed());
    (left < call + TRUST_MARGIN).then_some(left)
}

/// How often idle rate-limit keys are evicted.
const EVICT_EVERY: Duration = Duration::from_secs(60);

/// Runs until `stop` turns true.
pub async fn run(
    app: Arc<App>,
    outbox: Outbox,
    options: ForwarderOptions,
    mut stop: watch::Receiver<bool>,
) {
    let paused: Paused = app.holds.paused.clone();
    let outages: Arc<Outages> = app.holds.outages.clone();
    // Every configured upstream's series exists from the start (0: not down), so a
    // dashboard shows it before the first outage.
    for upstream in app.runtime().upstreams.names() {
        app.metrics.upstream_down(upstream, false);
    }
    let mut next_evict = tokio::time::Instant::now() + EVICT_EVERY;
    let mut in_flight: JoinSet<()> = JoinSet::new();
    let mut sending = Sending::default();
    let mut next_prune = tokio::time::Instant::now();
    // When the store fails, claims wait longer each time (up to STORE_BACKOFF_MAX).
    let mut store_backoff = Duration::ZERO;
    let mut store_errors_logged = tokio::time::Instant::now() - POLL;
    let poll_ms = options.poll.as_millis().max(2) as i64;
    // When to claim next (milliseconds since 1970): each claim says when the next key
    // falls due; a new trigger or a recorded outcome brings it forward.
    let mut claim_at = now_ms();
    // A claim is never further off than a poll or the store's backoff: a later one was
    // set before the clock went back, and would wait that much longer.
    let furthest_claim = (poll_ms * 3 / 2).max(STORE_BACKOFF_MAX.as_millis() as i64);
    loop {
        if *stop.borrow() {
            break;
        }
        claim_at = claim_at.min(now_ms() + furthest_claim);
        if tokio::time::Instant::now() >= next_evict {
            next_evict += EVICT_EVERY;
            app.runtime().limits.evict_idle().await;
            app.runtime().status.evict_idle();
            let now = std::time::Instant::now();
            paused
                .lock()
                .expect("the paused map is never poisoned")
                .retain(|_, until| *until > now);
        }
        if tokio::time::Instant::now() >= next_prune {
            next_prune += PRUNE_EVERY;
            let before = now_ms() - options.retention.as_millis() as i64;
            match outbox.prune(before).await {
                Ok(0) => {}
                Ok(pruned) => tracing::info!(pruned, "old deliveries pruned"),
                Err(err) => tracing::warn!(error = %err, "pruning failed"),
            }
        }
        // Every send that has finished frees its worker now, not one per turn of the
        // loop: a claim then takes as many keys as there is room for, in one go.
        while let Some(done) = in_flight.try_join_next_with_id() {
            sending.ended(done);
        }
        let free = options.workers.saturating_sub(in_flight.len());
        if free > 0 && claim_at <= now_ms() {
            // Taken before the claim: a lease never lasts longer than this relay thinks.
            let claimed_at = std::time::Instant::now();
            sending.settled();
            match outbox.claim(free).await {
                Ok(batch) => {
                    store_backoff = Duration::ZERO;
                    // Replays made by another process (`hookrelay replay`) are seen
                    // within a poll.
                    // Half a poll either way, so that relays sharing a store do not look in
                    // lockstep (the one whose look came first would always win the race
                    // for work that falls due).
                    let poll = now_ms() + fastrand::i64(poll_ms / 2..poll_ms * 3 / 2);
                    claim_at = if batch.due.len() == free {
                        // More may be due already: look again once a worker is free.
                        now_ms()
                    } else {
                        batch.next_due.map_or(poll, |due| due.min(poll))
                    };
                    for trigger in batch.due {
                        let (lease, key) = (trigger.lease, trigger.order_key.clone());
                        let held = Held {
                            paused: paused.clone(),
                            outages: outages.clone(),
                            claimed_at,
                        };
                        let (app, outbox, options) = (app.clone(), outbox.clone(), options.clone());
                        let task = in_flight.spawn(async move {
                            attempt(&app, &outbox, trigger, &options, &held).await;
                        });
                        sending.started(task.id(), lease, key);
                    }
                }
                Err(err) => {
                    store_backoff = (store_backoff * 2).clamp(STORE_BACKOFF_MIN, STORE_BACKOFF_MAX);
                    claim_at = now_ms() + store_backoff.as_millis() as i64;
                    if store_errors_logged.elapsed() >= POLL {
                        store_errors_logged = tokio::time::Instant::now();
                        tracing::error!(error = %err, retry_in_ms = store_backoff.as_millis() as u64, "could not claim due triggers");
                    }
                }
            }
        }
        let wait = Duration::from_millis((claim_at - now_ms()).max(0) as u64);
        tokio::select! {
            _ = stop.changed() => {}
            // A notification follows a successful commit: the store takes writes. New
            // triggers only of keys being sent cannot be claimed yet (see `NewWork`).
            () = outbox.queued.notified() => {
                while let Some(done) = in_flight.try_join_next_with_id() {
                    sending.ended(done);
                }
                let new = outbox.queued.take();
                if new.unlisted {
                    sending.settled();
                }
                if new.needs_claim(|key| sending.holds(key)) {
                    claim_at = claim_at.min(now_ms());
                }
            }
            Some(done) = in_flight.join_next_with_id(), if !in_flight.is_empty() => {
                sending.ended(done);
            }
            () = tokio::time::sleep(wait), if in_flight.len() < options.workers => {}
        }
    }
    // Shutdown: let sends finish for a while, then hand the rest back.
    let drained = tokio::time::timeout(options.drain, async {
        while let Some(done) = in_flight.join_next_with_id().await {
            sending.ended(done);
        }
    })
    .await;
    if drained.is_err() {
        in_flight.abort_all();
        for lease in sending.leases() {
            outbox.record(*lease, Recorded::Released);
        }
        tracing::warn!(
            returned = sending.tasks.len(),
            "sends still in flight at shutdown were returned to the outbox"
        );
    }
    outbox.flush().await;
}

/// What holds triggers back besides limits: projects GitLab paused, upstreams that are down.
struct Held {
    paused: Paused,
    outages: Arc<Outages>,
    /// When the claim was asked for: with a shared store, a send starts only while the
    /// claim's lease has at least the upstream's timeout left (its trust window).
    claimed_at: std::time::Instant,
}

/// One attempt at one trigger.
async fn attempt(
    app: &App,
    outbox: &Outbox,
    due: DueTrigger,
    options: &ForwarderOptions,
    held: &Held,
) {
    match due.kind {
        WorkKind::Status => {
            return statuses::post(app, outbox, due, options, held.claimed_at).await;
        }
        WorkKind::Poll => {
            return statuses::poll(app, outbox, due, options, held.claimed_at).await;
        }
        WorkKind::Trigger => {}
    }
    let runtime = app.runtime();
    let attempts = due.attempts + 1;
    let (delivery, source, rule, project) =
        (&due.delivery_id, &due.source, &due.rule, &due.project);
    let trigger = match build(&runtime, &due) {
        Ok(trigger) => trigger,
        Err(reason) if left_for_another_configuration(outbox, &due, options, &reason) => return,
        Err(reason) => {
            tracing::warn!(%delivery, %source, %rule, %project, %reason, "trigger cannot be sent");
            outbox.record(
                due.lease,
                Recorded::Failed {
                    status: None,
                    reason,
                    pipeline_id: None,
                    pipeline_url: None,
                },
            );
            return;
        }
    };
    let Some(upstream) = runtime.upstreams.get(&due.upstream).cloned() else {
        let reason = format!("upstream {:?} is not in the configuration", due.upstream);
        if left_for_another_configuration(outbox, &due, options, &reason) {
            return;
        }
        retry_or_fail(app, &due, options, attempts, Duration::ZERO, None, reason);
        return;
    };
    if let Some(wait) = held
        .outages
        .paused(&due.upstream, std::time::Instant::now())
    {
        // Spread the waiting triggers, so the end of a pause is a few probes and not
        // every project at once.
        let spread = Duration::from_millis(fastrand::u64(0..PAUSE_SPREAD.as_millis() as u64));
        tracing::debug!(%delivery, %source, %rule, %project, wait_ms = wait.as_millis() as u64, "trigger held back: upstream down");
        outbox.record(
            due.lease,
            Recorded::Deferred {
                due_at: now_ms() + (wait + spread).as_millis() as i64,
                reason: down_reason(&due.upstream),
            },
        );
        return;
    }
    if let Some((until, reason)) = held_back(&runtime, &due, &held.paused).await {
        tracing::info!(%delivery, %source, %rule, %project, wait_ms = until.as_millis() as u64, %reason, "trigger held back");
        app.metrics.trigger(TriggerOutcome::RateLimited);
        outbox.record(
            due.lease,
            Recorded::Deferred {
                due_at: now_ms() + until.as_millis() as i64,
                reason,
            },
        );
        return;
    }
    if options.dry_run {
        let mut shown = trigger.clone();
        shown.token = Secret::new(trigger.token.masked());
        let call = shown.upstream_call();
        let would_send = format!(
            "dry run: POST {}{} {}",
            upstream.url(),
            call.path_and_query,
            String::from_utf8_lossy(&call.body)
        );
        tracing::info!(%delivery, %source, %rule, %project, git_ref = %trigger.git_ref, %would_send, "trigger not sent (dry run)");
        app.metrics.trigger(TriggerOutcome::DryRun);
        outbox.record(due.lease, Recorded::DryRun { would_send });
        return;
    }
    if let Some(left) = claim_too_old(outbox, held.claimed_at, upstream.timeout()) {
        tracing::warn!(%delivery, %source, %rule, %project, left_ms = left.as_millis() as u64, "claim too old to start a send; handed back");
        outbox.record(due.lease, Recorded::Released);
        return;
    }
    let result = upstream.send(&trigger.upstream_call()).await;
    let status = result.as_ref().ok().map(|a| a.status.as_u16());
    app.metrics.upstream_response(&upstream.name, status);
    let latency = age(&due).as_secs_f64();
    note_upstream_health(app, outbox, held, &upstream.name, status);
    let answer = Answered {
        due: &due,
        trigger: &trigger,
        attempts,
        latency,
    };
    record_answer(
        app,
        outbox,
        options,
        held,
        answer,
        classify(&result, SystemTime::now()).without(&trigger.token),
    )
    .await;
}

/// Whether an answer says the upstream is down (a network error, `502`–`504`): a first
/// failure pauses every trigger of the upstream, not just this one, and the first answer
/// after a pause ends it.
fn note_upstream_health(
    app: &App,
    outbox: &Outbox,
    held: &Held,
    upstream: &str,
    status: Option<u16>,
) {
    if means_down(status) {
        if let Some(pause) = held.outages.failed(upstream, std::time::Instant::now()) {
            tracing::warn!(upstream = %upstream, pause_ms = pause.as_millis() as u64, "upstream down: its triggers wait, and the next one due after the pause probes it");
            app.metrics.upstream_down(upstream, true);
            // Every due trigger of the upstream waits for the pause now, rather than each
            // being claimed and put back: with 10,000 project+refs waiting, that was
            // 10,000 claims and writes per pause of an outage.
            let hold = UpstreamHold {
                upstream: upstream.to_owned(),
                until: now_ms() + pause.as_millis() as i64,
                spread_ms: PAUSE_SPREAD.as_millis() as i64,
                reason: down_reason(upstream),
            };
            let outbox = outbox.clone();
            tokio::spawn(async move {
                match outbox.hold_upstream(hold).await {
                    Ok(held) => tracing::debug!(held, "due triggers wait for the pause to end"),
                    // Nothing is lost: each is deferred when it is claimed instead.
                    Err(err) => {
                        tracing::warn!(reason = %err, "the triggers of a down upstream could not be held back together; each waits when it is claimed")
                    }
                }
            });
        }
    } else if held.outages.answered(upstream) {
        tracing::info!(upstream = %upstream, "upstream answers again: its triggers go out");
        app.metrics.upstream_down(upstream, false);
    }
}

/// A sent trigger's facts that its outcome's log line and record need.
struct Answered<'a> {
    due: &'a DueTrigger,
    trigger: &'a Trigger,
    attempts: i64,
    /// Seconds from the webhook's acceptance to this answer.
    latency: f64,
}

/// Records what GitLab's answer means for the trigger: sent, to be tried again (a `429`
/// also pauses its project), or failed for good.
async fn record_answer(
    app: &App,
    outbox: &Outbox,
    options: &ForwarderOptions,
    held: &Held,
    answer: Answered<'_>,
    verdict: Verdict,
) {
    let Answered {
        due,
        trigger,
        attempts,
        latency,
    } = answer;
    let runtime = app.runtime();
    let (delivery, source, rule, project) =
        (&due.delivery_id, &due.source, &due.rule, &due.project);
    match verdict {
        Verdict::Sent {
            status,
            pipeline_id,
            pipeline_url,
        } => {
            tracing::info!(
                %delivery, %source, %rule, %project, git_ref = %trigger.git_ref, token = %trigger.token,
                status, attempts, pipeline = pipeline_url.as_deref().unwrap_or("-"), "trigger sent"
            );
            // Metrics first: once the record is committed, a scrape must already see them.
            app.metrics.trigger(TriggerOutcome::Sent);
            app.metrics.delivery_latency(latency);
            outbox.record(
                due.lease,
                Recorded::Sent {
                    status,
                    pipeline_id,
                    pipeline_url,
                },
            );
        }
        Verdict::Retry {
            floor,
            status,
            reason,
        } => {
            if status == Some(429) {
                // GitLab's pressure slows this project, not the whole relay.
                pause_project(
                    &runtime,
                    due,
                    &held.paused,
                    floor.max(Duration::from_secs(1)),
                )
                .await;
            }
            retry_or_fail(app, due, options, attempts, floor, status, reason)
        }
        Verdict::Failed {
            status,
            reason,
            pipeline_id,
            pipeline_url,
        } => {
            tracing::warn!(%delivery, %source, %rule, %project, git_ref = %trigger.git_ref, attempts, %reason, "trigger failed");
            app.metrics.trigger(TriggerOutcome::Failed);
            app.metrics.delivery_latency(latency);
            outbox.record(
                due.lease,
                Recorded::Failed {
                    status,
                    reason,
                    pipeline_id,
                    pipeline_url,
                },
            );
        }
    }
}

/// Triggers held back by an upstream's pause fall due over this long after it ends.
const PAUSE_SPREAD: Duration = Duration::from_secs(1);

/// What the dashboard says of a trigger waiting for its upstream to come back.
fn down_reason(upstream: &str) -> String {
    format!("upstream {upstream} is down; waiting for it")
}

fn pause_key(due: &DueTrigger) -> String {
    crate::store::bounded_key(format!("{}\u{1f}{}", due.upstream, due.project))
}

/// Where relays sharing the store keep a project's pause: on the upstream's per-project
/// limit key, so that checking the limit reads the pause too.
fn shared_pause_key(runtime: &crate::app::Runtime, due: &DueTrigger) -> String {
    runtime
        .limits
        .upstream_project(&due.upstream)
        .map_or_else(|| pause_key(due), |limit| limit.shared_key(&due.project))
}

/// Whether a trigger must wait: its project is paused after a `429`, or a queueing limit
/// (the upstream's per project, the source's) has no room yet. How long, and why. With a
/// shared store both are decided in the database, for every relay at once; when it cannot
/// say, the trigger waits a second.
async fn held_back(
    runtime: &crate::app::Runtime,
    due: &DueTrigger,
    paused: &Paused,
) -> Option<(Duration, String)> {
    let slow_down = || format!("GitLab asked to slow down for project {}", due.project);
    // This relay's own pauses (all of them on one relay; with a shared store, those it
    // could not share).
    let paused_until = paused
        .lock()
        .expect("the paused map is never poisoned")
        .get(&pause_key(due))
        .copied();
    if let Some(until) = paused_until {
        let now = std::time::Instant::now();
        if until > now {
            return Some((until - now, slow_down()));
        }
    }
    let upstream_limit = runtime.limits.upstream_project(&due.upstream);
    let checked_with_the_limit =
        upstream_limit.is_some_and(|l| l.limit.on_limit == crate::limits::OnLimit::Queue);
    if let Some(shared) = runtime.limits.shared()
        && !checked_with_the_limit
    {
        match shared.paused(&shared_pause_key(runtime, due)).await {
            Ok(Some(wait)) => return Some((wait, slow_down())),
            Ok(None) => {}
            Err(reason) => {
                return Some((
                    Duration::from_secs(1),
                    format!("GitLab's pauses cannot be read: {reason}"),
                ));
            }
        }
    }
    match queueing(upstream_limit, &due.project).await {
        Some(held) => Some(held),
        None => queueing(runtime.limits.source(&due.source), &due.source).await,
    }
}

/// How long a queueing limit holds `key` back, and why; `None` when it lets it go (or the
/// limit rejects instead of queueing: that was decided when the webhook came in).
async fn queueing(
    limiter: Option<&crate::limits::Limiter>,
    key: &str,
) -> Option<(Duration, String)> {
    let limiter = limiter.filter(|l| l.limit.on_limit == crate::limits::OnLimit::Queue)?;
    limiter.check(key).await.err().map(|refused| match refused {
        Refused::Over(wait) => (wait, format!("over {}", limiter.name)),
        Refused::Unavailable(reason) => (
            Duration::from_secs(1),
            format!("{} cannot be checked: {reason}", limiter.name),
        ),
        Refused::Full => (
            Duration::from_secs(1),
            format!("{} keeps track of as many keys as it can", limiter.name),
        ),
    })
}

/// GitLab answered `429` for this trigger's project: hold the project back, on every
/// relay when they share the store.
async fn pause_project(
    runtime: &crate::app::Runtime,
    due: &DueTrigger,
    paused: &Paused,
    wait: Duration,
) {
    if let Some(shared) = runtime.limits.shared() {
        if let Err(reason) = shared.pause(&shared_pause_key(runtime, due), wait).await {
            tracing::warn!(project = %due.project, %reason, "GitLab's pause could not be shared with the other relays; this relay keeps it");
        } else {
            return;
        }
    }
    paused
        .lock()
        .expect("the paused map is never poisoned")
        .insert(pause_key(due), std::time::Instant::now() + wait);
}

/// The wait before attempt `attempts + 1` of queued work (never below `floor`), or, once
/// waiting would pass the policy's age, why it is given up.
pub(crate) fn backoff(
    options: &ForwarderOptions,
    due: &DueTrigger,
    attempts: i64,
    floor: Duration,
    reason: &str,
) -> Result<Duration, String> {
    let age = age(due);
    let delay = options
        .policy
        .delay(attempts as u32, floor, fastrand::f64());
    if age.saturating_add(delay) > options.policy.max_age {
        return Err(format!(
            "gave up after {attempts} attempts over {}s: {reason}",
            age.as_secs()
        ));
    }
    Ok(delay)
}

fn retry_or_fail(
    app: &App,
    due: &DueTrigger,
    options: &ForwarderOptions,
    attempts: i64,
    floor: Duration,
    status: Option<u16>,
    reason: String,
) {
    let delay = match backoff(options, due, attempts, floor, &reason) {
        Ok(delay) => delay,
        Err(reason) => {
            tracing::warn!(delivery = %due.delivery_id, source = %due.source, rule = %due.rule, project = %due.project, %reason, "trigger failed");
            app.outbox.record(
                due.lease,
                Recorded::Failed {
                    status,
                    reason,
                    pipeline_id: None,
                    pipeline_url: None,
                },
            );
            app.metrics.trigger(TriggerOutcome::Failed);
            return;
        }
    };
    tracing::info!(
        delivery = %due.delivery_id, source = %due.source, rule = %due.rule, project = %due.project,
        attempts, retry_in_ms = delay.as_millis() as u64, %reason, "trigger will be retried"
    );
    app.metrics.trigger(TriggerOutcome::Retried);
    app.outbox.record(
        due.lease,
        Recorded::Retry {
            due_at: now_ms() + delay.as_millis() as i64,
            status,
            reason,
        },
    );
}

/// The trigger as stored, made sendable again: the token is resolved now, never stored.
fn build(runtime: &crate::app::Runtime, due: &DueTrigger) -> Result<Trigger, String> {
    let token = loaded_or_stored(runtime.config.rules.token(&due.token_ref), &due.token_ref)
        .map_err(|err| format!("token {}: {err}", due.token_ref))?;
    let variables: IndexMap<String, String> = due
        .variables
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| v.to_string()),
            )
        })
        .collect();
    Ok(Trigger {
        upstream: due.upstream.clone(),
        project: ProjectId::parse(&due.project)?,
        git_ref: GitRef::parse(&due.git_ref).map_err(|err| err.to_string())?,
        token,
        variables,
        inputs: due.inputs.clone(),
        other_params: serde_json::Map::new(),
        webhook_body: None,
    })
}
