//! What an operator's `replay` and `cancel` ask of the store, and the refusals both
//! engines give them in the same words.

use std::fmt;

use super::{CALLER_TOKEN, Engine, EngineError, ListFilter};

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
