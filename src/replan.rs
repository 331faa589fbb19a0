//! `hookrelay replay --replan`: a stored webhook run through the rules as they are now.
//!
//! After a rule is fixed, the webhook that found nothing to do (or the wrong thing) can be
//! planned again without asking the sender to redeliver (a redelivery is a duplicate, and
//! is ignored). The new triggers belong to a new delivery named after the original
//! (`ID~replan-…`), whose answer records `replan_of`, so `deliveries` shows both.

use std::path::Path;

use crate::outbox::{Accepted, NewDelivery};
use crate::sources::{self, Outcome, Verification, WebhookRequest};
use crate::store::StoreLocation;

/// What a replan queued.
pub struct Replanned {
    pub original: String,
    pub delivery_id: String,
    /// `(trigger id, rule, project, ref)` per queued trigger.
    pub triggers: Vec<(i64, String, String, String)>,
}

/// Reads the stored webhook `delivery` (an id or its unique start), runs it through the
/// configuration at `config_path` and records what it plans as a new delivery.
pub fn replan(
    config_path: &Path,
    state: &Path,
    store: Option<&str>,
    delivery: &str,
) -> Result<Replanned, String> {
    // Tokens are kept by reference; the relay that sends reads them.
    let config = crate::config::load_without_secrets(config_path)
        .map_err(|problems| problems.to_string())?;
    let location = StoreLocation::choose(state, store, config.store.clone())?;
    replan_with(
        &config,
        &config_path.display().to_string(),
        &location,
        delivery,
    )
}

/// [`replan`] with a configuration already loaded (`named` says where it came from, for
/// messages) against the store at `location`: the dashboard's "replay through today's
/// rules".
pub fn replan_with(
    config: &crate::config::Config,
    named: &str,
    location: &StoreLocation,
    delivery: &str,
) -> Result<Replanned, String> {
    let stored =
        crate::outbox::stored_webhook(location, delivery).map_err(|err| err.to_string())?;
    let source = config.sources.get(&stored.source).ok_or_else(|| {
        format!(
            "delivery {} came from source {:?}, which {} no longer configures",
            stored.delivery_id, stored.source, named
        )
    })?;
    let headers = crate::explain::stored_request_headers(&stored.headers);
    let received = sources::receive(
        source,
        &WebhookRequest {
            headers: &headers,
            body: &stored.body,
        },
        Verification::Skip,
    )
    .map_err(|err| format!("delivery {}: {err}", stored.delivery_id))?;
    let events = match &received.outcome {
        Outcome::Events(events) => events,
        Outcome::Ping(_) => {
            return Err(format!(
                "delivery {} is a ping; there is nothing to run",
                stored.delivery_id
            ));
        }
        Outcome::Skipped(note) => return Err(format!("delivery {}: {note}", stored.delivery_id)),
        Outcome::Pipeline(_) => {
            return Err(format!(
                "delivery {} is a GitLab pipeline event; it moves a commit status and starts nothing",
                stored.delivery_id
            ));
        }
    };
    // The `?ref=` it arrived with builds every trigger again, if the source still allows it.
    let url_ref = stored
        .url_ref
        .as_deref()
        .map(|text| {
            let git_ref = crate::git_ref::GitRef::parse(text).map_err(|err| err.to_string())?;
            source.allows_url_ref(&git_ref)?;
            Ok(git_ref)
        })
        .transpose()
        .map_err(|reason: String| {
            format!(
                "delivery {} arrived with ?ref={}, which builds every trigger of it, but the configuration in {named} does not take it now: {reason}",
                stored.delivery_id,
                stored.url_ref.as_deref().unwrap_or_default(),
            )
        })?;
    let mut planned = Vec::new();
    let mut problems = Vec::new();
    for event in events {
        let found = config.rules.plan(event, url_ref.as_ref());
        if found.is_empty() {
            for (rule, why) in config.rules.verdicts(event) {
                if let Some(why) = why {
                    problems.push(format!("{}: {why}", rule.name()));
                }
            }
        }
        planned.extend(found);
    }
    // Built as a webhook's triggers are: the same entries, windows and errors.
    let built = crate::hooks::build(config, source, &received, planned);
    for error in &built.errors {
        problems.push(format!(
            "{}: {}",
            error["rule"].as_str().unwrap_or_default(),
            error["error"].as_str().unwrap_or_default()
        ));
    }
    let (triggers, queued) = (built.triggers, built.queued);
    if triggers.is_empty() {
        return Err(format!(
            "delivery {} still starts nothing with the rules in {}: {}",
            stored.delivery_id,
            named,
            if problems.is_empty() {
                format!("source {} has no rules", source.name)
            } else {
                problems.join("; ")
            }
        ));
    }
    let delivery_id = format!("{}~replan-{}", stored.delivery_id, crate::outbox::now_ms());
    let mut summary = crate::hooks::reply(&source.name, &received);
    summary.replan_of = Some(&stored.delivery_id);
    summary.url_ref = url_ref.as_ref().map(crate::git_ref::GitRef::as_str);
    summary.triggers = Some(queued.clone());
    let delivery = NewDelivery {
        source: source.name.clone(),
        delivery_id: delivery_id.clone(),
        event_type: received.event_type.clone(),
        headers: stored.headers.clone(),
        body: crate::store::StoredBody::encode(stored.body.clone()),
        summary: summary.to_json(),
        triggers,
    };
    let accepted =
        crate::outbox::accept_offline(location, &delivery).map_err(|err| err.to_string())?;
    let Accepted::Queued { trigger_ids, .. } = accepted else {
        return Err(format!("delivery {delivery_id} is already in the store"));
    };
    Ok(Replanned {
        original: stored.delivery_id,
        delivery_id,
        triggers: trigger_ids
            .into_iter()
            .zip(queued)
            .map(|(id, entry)| (id, entry.rule, entry.project, entry.git_ref))
            .collect(),
    })
}
