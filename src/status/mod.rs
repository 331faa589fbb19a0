//! Status back to the commit: the pipeline a webhook started shows on the commit that
//! started it, on the forge the webhook came from.
//!
//! A trigger planned from a webhook whose source has `status = { token = … }` carries a
//! [`StatusTarget`]: the forge, the repository, the commit and the context. As soon as
//! GitLab accepts the trigger, a `pending` post linking the pipeline is queued in the same
//! transaction that records the answer; when GitLab refuses it for good, an `error` post
//! with GitLab's message. GitLab's pipeline events (a `[source.NAME]` of provider `gitlab`
//! with `upstream = "NAME"`), or polls of the pipeline where no events can be configured,
//! move the status as the pipeline runs and ends.
//!
//! Status posts are queued work like triggers (`crate::store::WorkKind::Status`): recorded
//! before they are sent, sent in order per repository+commit+context, retried on the
//! forges' `5xx`, `429` and rate limits, kept with the forge's answer when refused. A newer
//! state supersedes an unsent older one, and a state that arrives late never turns a
//! finished status back to running ([`decide`]). The rules of that live here; the queue's
//! writer calls [`after_trigger`] and [`apply_pipeline`] inside its transactions.

mod clients;
pub mod forge;
pub mod pipeline;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::store::{
    CancelTarget, Engine, EngineError, NewDelivery, NewTrigger, OriginOf, PipelineOrigin, Recorded,
    WorkKind,
};
pub use clients::StatusClients;
pub(crate) use clients::{ForgeCalls, forge_client};
pub use forge::Forge;
pub use pipeline::PipelineEvent;

/// Where the statuses of one trigger's pipeline go: stored with the trigger (JSON). The
/// token is a reference (`env:NAME`), resolved when a post is sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusTarget {
    /// The `[source.NAME]` the webhook came from (whose `status` says how to report).
    pub source: String,
    pub forge: Forge,
    /// The forge's API root, without a trailing `/`.
    pub api_url: String,
    pub token_ref: String,
    /// `owner/repo`, `workspace/repo`, `PROJECT/repo`.
    pub repository: String,
    /// The commit: a branch's head, or the commit a tag points to.
    pub sha: String,
    pub context: String,
    /// Where a status links when there is no pipeline (GitLab refused the trigger).
    pub fallback_url: String,
    /// The upstream is polled for this pipeline's status (it has a `read_token`): the
    /// first poll waits this long (milliseconds); 0: no polls.
    #[serde(default)]
    pub poll_after_ms: u64,
}

impl StatusTarget {
    /// The order key its posts are kept in order under: per source, repository, commit
    /// and context (contexts compared without case, as GitHub does).
    pub fn order_key(&self) -> String {
        crate::store::bounded_key(format!(
            "status\u{1f}{}\u{1f}{}\u{1f}{}\u{1f}{}",
            self.source,
            self.repository.to_lowercase(),
            self.sha,
            self.context.to_lowercase()
        ))
    }

    /// Whether `other` reports to the same repository and context (on any commit).
    fn same_place(&self, other: &StatusTarget) -> bool {
        self.source == other.source
            && self.repository.eq_ignore_ascii_case(&other.repository)
            && self.context.eq_ignore_ascii_case(&other.context)
    }
}

/// GitLab's pipeline states, and hookrelay's own for a trigger GitLab refused.
pub const FINISHED: &[&str] = &["success", "failed", "canceled", "skipped", "refused"];

/// A forge's API as a source's `status = { … }` and `compare = { … }` name it: where it is,
/// the token that may call it, and a private CA to trust. A source's `status` is one: where
/// and how its pipelines are reported back.
#[derive(Clone, Debug)]
pub struct ForgeApi {
    pub forge: Forge,
    /// The forge's API root, without a trailing `/`.
    pub api_url: String,
    pub token_ref: crate::secret::SecretRef,
    /// `None` when secrets were not read (`explain`).
    pub token: Option<crate::secret::Secret>,
    /// Extra PEM certificates to trust (a self-hosted forge's CA).
    pub ca_file: Option<std::path::PathBuf>,
}

/// Whether a GitLab pipeline state is final (a retry may still move it back to running).
pub fn is_finished(state: &str) -> bool {
    FINISHED.contains(&state)
}

/// One status to post, as stored with its queued work (JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusPost {
    pub target: StatusTarget,
    /// GitLab's pipeline state (`pending`, `running`, `success`, …), or `refused`.
    pub state: String,
    pub pipeline_id: i64,
    /// The pipeline's page; `None`: link `target.fallback_url`.
    pub target_url: Option<String>,
    /// Before the forge's length limit is applied.
    pub description: String,
    /// GitLab's `finished_at`, to order two final states of one pipeline (a retry).
    #[serde(default)]
    pub finished_at: Option<String>,
}

impl StatusPost {
    /// The same status for another commit.
    fn to(&self, target: StatusTarget) -> StatusPost {
        StatusPost {
            target,
            ..self.clone()
        }
    }

    /// The queued work that sends it, under `rule`.
    pub fn work(&self, rule: &str) -> NewTrigger {
        NewTrigger {
            kind: WorkKind::Status,
            rule: rule.to_owned(),
            upstream: self.target.source.clone(),
            project: self.target.repository.clone(),
            git_ref: self.target.sha.clone(),
            token_ref: self.target.token_ref.clone(),
            variables: serde_json::to_string(self).expect("a status post serializes"),
            inputs: "{}".into(),
            delay_ms: 0,
            coalesce_ms: 0,
            done: None,
            status_target: None,
            pipeline_id: Some(self.pipeline_id),
            queue_key: Some(self.target.order_key()),
        }
    }
}

/// The words a status says for a pipeline state.
pub fn describe(state: &str, pipeline_id: i64, rule: &str, project: &str) -> String {
    let what = match state {
        "created" | "pending" | "waiting_for_resource" | "preparing" | "waiting_for_callback" => {
            "is pending"
        }
        "running" => "is running",
        "canceling" => "is being canceled",
        "success" => "passed",
        "failed" => "failed",
        "canceled" => "was canceled",
        "skipped" => "was skipped",
        "manual" => "waits for a manual action",
        "scheduled" => "is scheduled",
        _ => "changed",
    };
    format!("GitLab pipeline #{pipeline_id} {what} ({project}, rule {rule})")
}

/// Why a new state is not posted after the newest one of its pipeline, if it is not.
pub fn decide(newest: Option<&StatusPost>, new: &StatusPost) -> Result<(), &'static str> {
    let Some(newest) = newest else {
        return Ok(());
    };
    // What the forge would show: GitLab's `created`, `pending` and `preparing` all read
    // "pending", with the same words and link.
    let forge = new.target.forge;
    // GitLab refuses a commit status posted again in the state it has (`400 Cannot
    // transition status via :enqueue from :pending`), whatever its words and link.
    if forge.state(&newest.state) == forge.state(&new.state)
        && ((newest.description == new.description && newest.target_url == new.target_url)
            || forge == Forge::Gitlab)
    {
        return Err("unchanged: the commit has (or will have) this state already");
    }
    match (is_finished(&newest.state), is_finished(&new.state)) {
        (true, false) => Err("late: the pipeline has finished already"),
        (true, true) => match (&newest.finished_at, &new.finished_at) {
            // Two final states (a pipeline retried): the one that finished later wins.
            (Some(before), Some(after)) if after < before => {
                Err("late: the pipeline finished again since")
            }
            _ => Ok(()),
        },
        _ => Ok(()),
    }
}

/// What a pipeline's new state did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// A status post was queued (its id), and `also` as many on the newest commits of
    /// pushes coalesced into the pipeline's trigger.
    Queued {
        post: i64,
        superseded: usize,
        also: usize,
    },
    /// Nothing to post, and why.
    Skipped(String),
    /// No trigger of hookrelay's started this pipeline.
    NotOurs(String),
    /// The pipeline event's delivery id was received before.
    Duplicate,
}

impl Applied {
    /// The note a pipeline event's answer (and its stored record) carries.
    pub fn note(&self) -> String {
        match self {
            Applied::Queued {
                post,
                superseded,
                also,
            } => format!(
                "status post {post} queued{}{}",
                match superseded {
                    0 => String::new(),
                    n => format!("; it supersedes {n} unsent older one(s)"),
                },
                match also {
                    0 => String::new(),
                    n => format!(
                        "; and {n} on the newest commit of pushes coalesced into its trigger"
                    ),
                }
            ),
            Applied::Skipped(why) | Applied::NotOurs(why) => why.clone(),
            Applied::Duplicate => "this delivery was received before; nothing changed".into(),
        }
    }
}

/// [`decide`] against the newest post of `post`'s key and pipeline in the store.
fn verdict(
    engine: &mut dyn Engine,
    post: &StatusPost,
) -> Result<Result<(), &'static str>, EngineError> {
    let newest = engine
        .newest_status(&post.target.order_key(), post.pipeline_id)?
        .and_then(|json| serde_json::from_str::<StatusPost>(&json).ok());
    Ok(decide(newest.as_ref(), post))
}

/// Queues `post` if its verdict allows, superseding the key's unsent posts.
fn queue_post(
    engine: &mut dyn Engine,
    delivery_row: i64,
    rule: &str,
    post: &StatusPost,
    verdict: Result<(), &'static str>,
    now: i64,
) -> Result<Applied, EngineError> {
    if let Err(why) = verdict {
        return Ok(Applied::Skipped(format!(
            "pipeline #{} {}: {why}",
            post.pipeline_id, post.state
        )));
    }
    let key = post.target.order_key();
    let superseded = engine
        .cancel(&CancelTarget::Superseded { order_key: key }, now)?
        .len();
    let ids = engine.queue_work(delivery_row, &[post.work(rule)], now)?;
    Ok(Applied::Queued {
        post: ids[0],
        superseded,
        also: 0,
    })
}

/// Queues `post` if [`verdict`] allows it (a post to another commit than the one the
/// caller reports on).
fn queue_decided(
    engine: &mut dyn Engine,
    delivery_row: i64,
    rule: &str,
    post: &StatusPost,
    now: i64,
) -> Result<Applied, EngineError> {
    let allowed = verdict(engine, post)?;
    queue_post(engine, delivery_row, rule, post, allowed, now)
}

/// A trigger's outcome was recorded: when its source reports statuses, queue the first —
/// `pending` with the pipeline's link once GitLab accepted it, `error` with GitLab's
/// message once it refused it for good — and, where the upstream is polled, the first
/// poll. Runs inside the transaction that records the outcome.
pub fn after_trigger(
    engine: &mut dyn Engine,
    trigger_id: i64,
    recorded: &Recorded,
    now: i64,
) -> Result<(), EngineError> {
    if !matches!(recorded, Recorded::Sent { .. } | Recorded::Failed { .. }) {
        return Ok(());
    }
    let Some(origin) = engine.pipeline_origin(&OriginOf::Trigger(trigger_id))? else {
        return Ok(());
    };
    let mut targets = targets_of(&origin).into_iter();
    let Some(target) = targets.next() else {
        return Ok(());
    };
    let post = match recorded {
        Recorded::Sent {
            pipeline_id,
            pipeline_url,
            ..
        } => {
            let pipeline_id = pipeline_id.unwrap_or(0);
            StatusPost {
                description: describe("pending", pipeline_id, &origin.rule, &origin.project),
                state: "pending".into(),
                pipeline_id,
                target_url: pipeline_url.clone(),
                finished_at: None,
                target,
            }
        }
        Recorded::Failed { status, reason, .. } => StatusPost {
            // GitLab's refusal carries its status; a trigger that never reached GitLab
            // (a token that cannot be read, retries given up) says so.
            description: match status {
                // GitLab's reason starts with its status (`404 Not Found — …`).
                Some(_) => format!(
                    "GitLab refused the trigger for {} (rule {}): {reason}",
                    origin.project, origin.rule
                ),
                None => format!(
                    "the trigger for {} (rule {}) failed: {reason}",
                    origin.project, origin.rule
                ),
            },
            state: "refused".into(),
            pipeline_id: 0,
            target_url: None,
            finished_at: None,
            target,
        },
        _ => return Ok(()),
    };
    let poll_after_ms = post.target.poll_after_ms;
    let poll = poll_after_ms > 0 && post.pipeline_id > 0;
    for target in targets {
        // The same post on the newest commit of each push merged into the trigger.
        queue_decided(
            engine,
            origin.delivery_row,
            &origin.rule,
            &post.to(target),
            now,
        )?;
    }
    let verdict = verdict(engine, &post)?;
    queue_post(
        engine,
        origin.delivery_row,
        &origin.rule,
        &post,
        verdict,
        now,
    )?;
    if poll {
        let work = NewTrigger {
            kind: WorkKind::Poll,
            rule: origin.rule.clone(),
            upstream: origin.upstream.clone(),
            project: origin.project.clone(),
            git_ref: post.target.sha.clone(),
            token_ref: String::new(),
            variables: "{}".into(),
            inputs: "{}".into(),
            delay_ms: poll_after_ms as i64,
            coalesce_ms: 0,
            done: None,
            status_target: None,
            pipeline_id: Some(post.pipeline_id),
            queue_key: Some(format!(
                "poll\u{1f}{}\u{1f}{}",
                origin.upstream, post.pipeline_id
            )),
        };
        engine.queue_work(origin.delivery_row, &[work], now)?;
    }
    Ok(())
}

/// Where a pipeline's statuses go: the commit of the trigger that started it first, then,
/// for each repository and context among the triggers coalesced into that trigger, the
/// newest of their commits (the last push before the pipeline started, a pull request's
/// head) where it is another commit. The commits between get none, as with a CI that
/// builds only a branch's head.
fn targets_of(origin: &PipelineOrigin) -> Vec<StatusTarget> {
    let parse = |json: &str| serde_json::from_str::<StatusTarget>(json).ok();
    let Some(first) = origin.status_target.as_deref().and_then(parse) else {
        return Vec::new();
    };
    let mut newest: Vec<StatusTarget> = Vec::new();
    for target in origin.merged_targets.iter().filter_map(|json| parse(json)) {
        match newest.iter_mut().find(|seen| seen.same_place(&target)) {
            Some(seen) => *seen = target,
            None => newest.push(target),
        }
    }
    newest.retain(|target| target.order_key() != first.order_key());
    std::iter::once(first).chain(newest).collect()
}

/// A pipeline's new state, from an event or a poll.
#[derive(Clone, Debug)]
pub struct PipelineUpdate {
    pub upstream: String,
    pub event: PipelineEvent,
    /// The pipeline event's own record (`None` for a poll).
    pub delivery: Option<NewDelivery>,
}

/// Applies a pipeline's new state: finds the trigger that started it, records the event's
/// delivery (with what it did as its answer), and queues the status post. Runs inside
/// one transaction of the queue's writer.
pub fn apply_pipeline(
    engine: &mut dyn Engine,
    update: &PipelineUpdate,
    now: i64,
) -> Result<Applied, EngineError> {
    let event = &update.event;
    let origin = engine.pipeline_origin(&OriginOf::Pipeline {
        upstream: update.upstream.clone(),
        pipeline_id: event.pipeline_id,
    })?;
    let origin = match origin {
        Some(origin) if event.is_of_project(&origin.project) => origin,
        _ => {
            return Ok(Applied::NotOurs(format!(
                "pipeline #{} of {} was not started by hookrelay on upstream {}; nothing changed",
                event.pipeline_id,
                event.project_name(),
                update.upstream
            )));
        }
    };
    let mut targets = targets_of(&origin).into_iter();
    let Some(target) = targets.next() else {
        return Ok(Applied::Skipped(format!(
            "pipeline #{} was started by trigger {}, whose source reports no status; nothing changed",
            event.pipeline_id, origin.trigger_id
        )));
    };
    let merged: Vec<StatusTarget> = targets.collect();
    let post = StatusPost {
        description: describe(
            &event.status,
            event.pipeline_id,
            &origin.rule,
            &origin.project,
        ),
        state: event.status.clone(),
        pipeline_id: event.pipeline_id,
        target_url: event.url.clone().or_else(|| origin.pipeline_url.clone()),
        finished_at: event.finished_at.clone(),
        target,
    };
    let verdict = verdict(engine, &post)?;
    let delivery_row = match &update.delivery {
        None => origin.delivery_row,
        Some(delivery) => {
            // The record's answer says what the event did; decided before it is written.
            let mut delivery = delivery.clone();
            delivery.triggers.clear();
            let mut summary: serde_json::Value =
                serde_json::from_str(&delivery.summary).unwrap_or_else(|_| json!({}));
            summary["note"] = json!(match verdict {
                Ok(()) => format!(
                    "pipeline #{} {}: a status for {}@{} ({}) is queued{}",
                    post.pipeline_id,
                    post.state,
                    post.target.repository,
                    short(&post.target.sha),
                    post.target.context,
                    match merged.len() {
                        0 => String::new(),
                        n => format!(
                            ", and {n} on the newest commit of pushes coalesced into its trigger"
                        ),
                    }
                ),
                Err(why) => format!("pipeline #{} {}: {why}", post.pipeline_id, post.state),
            });
            delivery.summary = summary.to_string();
            match engine.insert_delivery(&delivery, now)? {
                crate::store::Accepted::Duplicate { .. } => return Ok(Applied::Duplicate),
                crate::store::Accepted::Queued { delivery_row, .. } => delivery_row,
            }
        }
    };
    let mut queued_also = 0;
    for target in merged {
        let applied = queue_decided(engine, delivery_row, &origin.rule, &post.to(target), now)?;
        queued_also += usize::from(matches!(applied, Applied::Queued { .. }));
    }
    Ok(
        match queue_post(engine, delivery_row, &origin.rule, &post, verdict, now)? {
            Applied::Queued {
                post, superseded, ..
            } => Applied::Queued {
                post,
                superseded,
                also: queued_also,
            },
            other => other,
        },
    )
}

/// A commit id's first twelve characters, for messages.
pub fn short(sha: &str) -> &str {
    sha.get(..12).unwrap_or(sha)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn post(state: &str, finished_at: Option<&str>) -> StatusPost {
        StatusPost {
            target: StatusTarget {
                source: "gh".into(),
                forge: Forge::Github,
                api_url: "https://api.github.com".into(),
                token_ref: "env:T".into(),
                repository: "Octo/App".into(),
                sha: "a".repeat(40),
                context: "GitLab/App".into(),
                fallback_url: "https://gitlab.example.com".into(),
                poll_after_ms: 0,
            },
            state: state.into(),
            pipeline_id: 7,
            target_url: Some("https://gitlab.example.com/app/-/pipelines/7".into()),
            description: describe(state, 7, "r", "p"),
            finished_at: finished_at.map(str::to_owned),
        }
    }

    /// A push storm coalesced into one trigger: its pipeline reports on the first push's
    /// commit and on the newest commit of each repository and context merged into it.
    #[test]
    fn a_pipeline_reports_on_the_newest_commit_of_each_push_merged_into_its_trigger() {
        let at = |repository: &str, sha: char, context: &str| {
            let mut target = post("pending", None).target;
            target.repository = repository.into();
            target.sha = sha.to_string().repeat(40);
            target.context = context.into();
            serde_json::to_string(&target).unwrap()
        };
        let origin = |merged: Vec<String>| PipelineOrigin {
            trigger_id: 1,
            delivery_row: 1,
            rule: "r".into(),
            upstream: "gl".into(),
            project: "p".into(),
            status_target: Some(at("Octo/App", 'a', "GitLab/App")),
            pipeline_url: None,
            merged_targets: merged,
        };
        let shown = |origin: &PipelineOrigin| {
            targets_of(origin)
                .iter()
                .map(|t| format!("{}@{} {}", t.repository, &t.sha[..1], t.context))
                .collect::<Vec<_>>()
        };
        assert_eq!(shown(&origin(Vec::new())), ["Octo/App@a GitLab/App"]);
        let storm = origin(vec![
            at("octo/app", 'b', "gitlab/app"),
            at("Octo/Lib", 'x', "GitLab/App"),
            at("Octo/App", 'c', "GitLab/App"),
            "not a target".into(),
            at("Octo/App", 'd', "other"),
        ]);
        assert_eq!(
            shown(&storm),
            [
                "Octo/App@a GitLab/App",
                "Octo/App@c GitLab/App",
                "Octo/Lib@x GitLab/App",
                "Octo/App@d other"
            ],
            "the first push's commit, then the newest of each place; none twice"
        );
        let again = origin(vec![at("Octo/App", 'a', "GitLab/App")]);
        assert_eq!(
            shown(&again),
            ["Octo/App@a GitLab/App"],
            "the same commit once"
        );
        let quiet = PipelineOrigin {
            status_target: None,
            ..storm
        };
        assert!(
            targets_of(&quiet).is_empty(),
            "a source that reports nothing"
        );
    }

    #[test]
    fn a_late_state_never_turns_a_finished_status_back() {
        assert!(decide(None, &post("pending", None)).is_ok());
        assert!(decide(Some(&post("pending", None)), &post("running", None)).is_ok());
        assert!(decide(Some(&post("running", None)), &post("success", Some("t2"))).is_ok());
        let late = decide(Some(&post("success", Some("t2"))), &post("running", None));
        assert!(late.unwrap_err().starts_with("late"));
        let same = decide(Some(&post("running", None)), &post("running", None));
        assert!(same.unwrap_err().starts_with("unchanged"));
        // `created` after `pending` shows the same on the forge: not posted again.
        assert!(decide(Some(&post("pending", None)), &post("created", None)).is_err());
        // A retried pipeline that finishes again later moves on; an older final state not.
        assert!(
            decide(
                Some(&post("failed", Some("t2"))),
                &post("success", Some("t3"))
            )
            .is_ok()
        );
        assert!(
            decide(
                Some(&post("success", Some("t3"))),
                &post("failed", Some("t2"))
            )
            .unwrap_err()
            .starts_with("late")
        );
    }

    /// A state's new words or link are posted again to forges that take them; GitLab
    /// refuses a status posted again in the state it has, so it gets none.
    #[test]
    fn gitlab_gets_each_state_once() {
        let mut moved = post("running", None);
        moved.target_url = Some("https://gitlab.example.com/app/-/pipelines/7/builds".into());
        assert!(decide(Some(&post("running", None)), &moved).is_ok());
        let on_gitlab = |mut post: StatusPost| {
            post.target.forge = Forge::Gitlab;
            post
        };
        let same = decide(Some(&on_gitlab(post("running", None))), &on_gitlab(moved));
        assert!(same.unwrap_err().starts_with("unchanged"));
        assert!(
            decide(
                Some(&on_gitlab(post("running", None))),
                &on_gitlab(post("success", Some("t2")))
            )
            .is_ok()
        );
    }

    #[test]
    fn order_keys_ignore_the_case_of_repository_and_context() {
        let mut other = post("pending", None);
        other.target.repository = "octo/app".into();
        other.target.context = "gitlab/app".into();
        assert_eq!(
            post("pending", None).target.order_key(),
            other.target.order_key()
        );
    }
}
