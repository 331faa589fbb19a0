//! What came of an attempt, as stored; the hold on a down upstream's waiting work; and
//! which trigger started a pipeline.

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
    /// The status targets of the triggers coalesced into this one, oldest first: the
    /// pipeline stands for their pushes too (read only when it has a target itself).
    pub merged_targets: Vec<String>,
}
