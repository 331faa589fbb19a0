//! The queue's work: a delivery with the triggers and other work it queues, what
//! recording it did, and the work a claim hands out under a lease.

use serde::Serialize;

use super::{Finished, Recorded, StoredBody, bounded_key};

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
