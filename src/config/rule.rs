//! `[[rule]]` and its `[rule.trigger]` / `[[rule.trigger]]` tables, validated into
//! [`RuleSpec`]s. Names that point elsewhere (sources, upstreams) and templates are checked
//! once every file is read, in `Builder::finish` and [`crate::rules::RuleSet::build`].

use std::collections::BTreeMap;
use std::path::Path;

use indexmap::IndexMap;
use serde::Deserialize;
use toml::Spanned;

use super::{EnvLookup, FileProblems};
use crate::event::EventKind;
use crate::rules::{InputValue, Patterns, RuleSpec, Schedule, TriggerSpec};
use crate::secret::{Secret, SecretRef};
use crate::trigger::check_variable_name;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    name: Spanned<String>,
    source: Option<Spanned<OneOrMany>>,
    repository: Option<Spanned<OneOrMany>>,
    events: Option<Spanned<Vec<String>>>,
    refs: Option<Spanned<OneOrMany>>,
    refs_exclude: Option<Spanned<OneOrMany>>,
    paths: Option<Spanned<OneOrMany>>,
    paths_exclude: Option<Spanned<OneOrMany>>,
    skip_ci: Option<Spanned<bool>>,
    when: Option<Spanned<String>>,
    schedule: Option<Spanned<String>>,
    timezone: Option<Spanned<String>>,
    coalesce: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTrigger {
    upstream: Option<Spanned<String>>,
    /// A path (`group/app`) or a numeric id, which may be written as a number.
    project: Spanned<toml::Value>,
    #[serde(rename = "ref")]
    git_ref: Option<Spanned<String>>,
    token: Spanned<String>,
    /// Strings; any other value is read so that its problem can name it and its line.
    variables: Option<Spanned<IndexMap<String, Spanned<toml::Value>>>>,
    inputs: Option<Spanned<IndexMap<String, Spanned<serde_json::Value>>>>,
    status_context: Option<Spanned<String>>,
}

/// A variable written as a number, a boolean, a list or a table: GitLab takes every
/// variable as a string, and hookrelay sends them so; say how to write this one.
fn not_a_string(rule: &str, key: &str, value: &toml::Value) -> String {
    let what = match value {
        toml::Value::Integer(_) | toml::Value::Float(_) => "a number",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a date",
        toml::Value::Array(_) => "a list",
        toml::Value::Table(_) => "a table",
        toml::Value::String(_) => "a string",
    };
    let hint = match value {
        toml::Value::Array(_) | toml::Value::Table(_) => {
            "join it into one string, or render it in a template".to_owned()
        }
        scalar => format!("write {key} = \"{scalar}\""),
    };
    format!("rule {rule:?}: variables.{key} is {what}; GitLab's variables are strings: {hint}")
}

/// One string or a list of them: globs, the names of sources, or secrets' references.
pub(super) struct OneOrMany(Vec<String>);

impl OneOrMany {
    pub(super) fn into_strings(self) -> Vec<String> {
        self.0
    }
}

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![value.to_owned()]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<OneOrMany, A::Error> {
                let mut list = Vec::new();
                while let Some(item) = seq.next_element::<String>()? {
                    list.push(item);
                }
                Ok(OneOrMany(list))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// The names in a rule's `source`: one or more, each once.
fn source_names(
    name: &str,
    list: &Spanned<OneOrMany>,
    problems: &mut FileProblems<'_>,
) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for source in &list.get_ref().0 {
        if names.contains(source) {
            problems.at(
                Some(list.span()),
                format!("rule {name:?}: source {source:?} is listed twice"),
            );
        } else {
            names.push(source.clone());
        }
    }
    if names.is_empty() {
        problems.at(
            Some(list.span()),
            format!("rule {name:?}: `source` is an empty list; name the [source.NAME] whose webhooks it reacts to"),
        );
    }
    names
}

/// A trigger as read, with the upstream still to be checked against every file.
pub(super) struct PendingTrigger {
    pub spec: TriggerSpec,
    pub upstream: Option<(String, usize)>,
}

/// A rule as read, with its source and upstreams still to be checked against every file.
pub(super) struct PendingRule {
    pub spec: RuleSpec,
    pub source_line: usize,
    pub triggers: Vec<PendingTrigger>,
}

pub(super) fn compile_rule(
    raw: RawRule,
    raw_triggers: Vec<RawTrigger>,
    triggers_written: bool,
    file: &Path,
    line: usize,
    resolve_secrets: Option<EnvLookup<'_>>,
    problems: &mut FileProblems<'_>,
) -> Option<PendingRule> {
    let before = problems.found.len();
    let name = raw.name.get_ref().trim().to_owned();
    if name.is_empty() || name.contains('/') {
        problems.at(
            Some(raw.name.span()),
            "a rule's `name` must be non-empty and contain no `/`",
        );
    }
    let patterns =
        |field: Option<Spanned<OneOrMany>>, key: &str, problems: &mut FileProblems<'_>| {
            let field = field?;
            let span = field.span();
            let list = field.into_inner().0;
            if list.is_empty() {
                problems.at(
                    Some(span),
                    format!(
                        "rule {name:?}: `{key}` is an empty list; leave it out to match everything"
                    ),
                );
                return None;
            }
            match Patterns::new(list) {
                Ok(patterns) => Some(patterns),
                Err(message) => {
                    problems.at(Some(span), format!("rule {name:?}: {key}: {message}"));
                    None
                }
            }
        };
    warn_about_patterns(&name, &raw, problems);
    check_push_settings(&name, &raw, problems);
    let repository = patterns(raw.repository, "repository", problems);
    let refs = patterns(raw.refs, "refs", problems);
    let refs_exclude = patterns(raw.refs_exclude, "refs_exclude", problems);
    let events = compile_events(&name, raw.events, problems);
    let paths = patterns(raw.paths, "paths", problems);
    let paths_exclude = patterns(raw.paths_exclude, "paths_exclude", problems);
    let schedule = compile_schedule(
        &name,
        raw.schedule.as_ref(),
        raw.timezone.as_ref(),
        problems,
    );
    match (&raw.source, &raw.schedule) {
        (Some(source), Some(_)) => problems.at(
            Some(source.span()),
            format!("rule {name:?} has both `source` and `schedule`; a rule reacts to webhooks or runs on a schedule, not both"),
        ),
        (None, None) => problems.at(
            Some(raw.name.span()),
            format!("rule {name:?} needs `source = \"NAME\"` (the [source.NAME] whose webhooks it reacts to, or a list of them) or a `schedule`"),
        ),
        _ => {}
    }
    let sources = raw
        .source
        .as_ref()
        .map(|list| source_names(&name, list, problems))
        .unwrap_or_default();
    let when = raw.when.and_then(|w| {
        if w.get_ref().trim().is_empty() {
            problems.at(
                Some(w.span()),
                format!("rule {name:?}: `when` is empty; leave it out, or write an expression (`event.commit_count > 0`)"),
            );
            return None;
        }
        Some((w.get_ref().clone(), problems.line(w.span().start)))
    });
    let coalesce =
        super::coalesce_window(raw.coalesce, &format!("rule {name:?}: coalesce"), problems);
    if raw_triggers.is_empty() && !triggers_written {
        problems.at(
            Some(raw.name.span()),
            format!("rule {name:?} needs at least one [rule.trigger]"),
        );
    }
    let rule = RuleContext {
        name: &name,
        scheduled: schedule.is_some(),
        reacts_to_delete: events.contains(&EventKind::Delete),
        resolve_secrets,
    };
    let triggers = raw_triggers
        .into_iter()
        .filter_map(|raw_trigger| compile_trigger(&rule, raw_trigger, problems))
        .collect();
    if problems.found.len() > before {
        return None;
    }
    Some(PendingRule {
        source_line: raw
            .source
            .as_ref()
            .map(|s| problems.line(s.span().start))
            .unwrap_or(line),
        spec: RuleSpec {
            name,
            file: file.to_owned(),
            line,
            sources,
            repository,
            events,
            refs,
            refs_exclude,
            paths,
            paths_exclude,
            skip_ci: raw.skip_ci.as_ref().is_none_or(|skip| *skip.get_ref()),
            when,
            schedule,
            coalesce,
            triggers: Vec::new(),
        },
        triggers,
    })
}

/// The rule's `events`: push and tag when it names none.
fn compile_events(
    name: &str,
    events: Option<Spanned<Vec<String>>>,
    problems: &mut FileProblems<'_>,
) -> Vec<EventKind> {
    match events {
        None => vec![EventKind::Push, EventKind::Tag],
        Some(events) => {
            let span = events.span();
            if events.get_ref().is_empty() {
                problems.at(
                    Some(span),
                    format!(
                        "rule {name:?}: `events` is an empty list, so the rule would never run; leave it out for push and tag, or list some of push, tag and delete"
                    ),
                );
                return Vec::new();
            }
            let mut kinds = Vec::new();
            for event in events.into_inner() {
                match event.as_str() {
                    "push" => kinds.push(EventKind::Push),
                    "tag" => kinds.push(EventKind::Tag),
                    "delete" => kinds.push(EventKind::Delete),
                    other => problems.at(
                        Some(span.clone()),
                        format!(
                            "rule {name:?}: events: {other:?} is not push, tag or delete{}",
                            event_hint(other)
                        ),
                    ),
                }
            }
            kinds
        }
    }
}

/// The rule's `schedule` in its `timezone`; a schedule that never fires is a warning.
fn compile_schedule(
    name: &str,
    schedule: Option<&Spanned<String>>,
    timezone: Option<&Spanned<String>>,
    problems: &mut FileProblems<'_>,
) -> Option<Schedule> {
    match (schedule, timezone) {
        (Some(schedule), timezone) => match Schedule::parse(
            schedule.get_ref(),
            timezone.as_ref().map(|t| t.get_ref().as_str()),
        ) {
            Ok(parsed) => {
                // Valid cron that no date matches (30 February) fires never, silently.
                if parsed.next_after(chrono::Utc::now()).is_none() {
                    problems.warn(
                        schedule.span(),
                        format!(
                            "rule {name:?}: schedule {:?} never fires: no date to come matches it",
                            parsed.text
                        ),
                    );
                }
                Some(parsed)
            }
            Err(message) => {
                problems.at(Some(schedule.span()), format!("rule {name:?}: {message}"));
                None
            }
        },
        (None, Some(timezone)) => {
            problems.at(
                Some(timezone.span()),
                format!("rule {name:?}: `timezone` needs a `schedule`"),
            );
            None
        }
        (None, None) => None,
    }
}

/// What a trigger's checks need to know of the rule it belongs to.
struct RuleContext<'a> {
    name: &'a str,
    scheduled: bool,
    reacts_to_delete: bool,
    resolve_secrets: Option<EnvLookup<'a>>,
}

/// One `[rule.trigger]`: its project, token (resolved when serving), variables and
/// inputs. `None` when it has a problem (recorded with its line).
fn compile_trigger(
    rule: &RuleContext<'_>,
    raw_trigger: RawTrigger,
    problems: &mut FileProblems<'_>,
) -> Option<PendingTrigger> {
    let name = rule.name;
    let project_span = raw_trigger.project.span();
    let project = match raw_trigger.project.into_inner() {
        toml::Value::String(text) => text,
        toml::Value::Integer(id) if id > 0 => id.to_string(),
        other => {
            problems.at(
                Some(project_span),
                format!(
                    "rule {name:?}: project = {other} is neither a project's path (\"group/app\") nor its numeric id"
                ),
            );
            return None;
        }
    };
    let project = Spanned::new(project_span, project);
    let trigger_line = problems.line(project.span().start);
    let token_span = raw_trigger.token.span();
    let token_ref = match SecretRef::parse_in(raw_trigger.token.get_ref(), problems.folder()) {
        Ok(reference) => reference,
        Err(message) => {
            problems.at(Some(token_span), format!("rule {name:?}: token: {message}"));
            return None;
        }
    };
    let token = match rule.resolve_secrets.map(|env| token_ref.resolve_with(env)) {
        None => None,
        Some(Ok(secret)) => Some(secret),
        Some(Err(message)) => {
            problems.at(
                Some(token_span.clone()),
                format!("rule {name:?}: token ({token_ref}): {message}"),
            );
            None
        }
    };
    if let Some(secret) = &token {
        check_token(name, secret, token_span.clone(), problems);
    }
    let mut lines = BTreeMap::new();
    let mut line_of = |what: String, span: std::ops::Range<usize>| {
        lines.insert(what, problems.line(span.start));
    };
    if let Some(git_ref) = &raw_trigger.git_ref {
        line_of("ref".into(), git_ref.span());
    }
    if let Some(context) = &raw_trigger.status_context {
        line_of("status_context".into(), context.span());
    }
    let inputs = raw_trigger
        .inputs
        .map(Spanned::into_inner)
        .unwrap_or_default()
        .into_iter()
        .map(|(key, value)| {
            line_of(format!("inputs.{key}"), value.span());
            match value.into_inner() {
                serde_json::Value::String(text) => (key, InputValue::Template(text)),
                other => (key, InputValue::Literal(other)),
            }
        })
        .collect();
    let variables = compile_variables(name, raw_trigger.variables, problems, &mut lines);
    let upstream = raw_trigger
        .upstream
        .map(|u| (u.get_ref().clone(), problems.line(u.span().start)));
    warn_about_encoding(name, "project", &project, problems);
    warn_about_clone_path(name, &project, problems);
    if let Some(git_ref) = &raw_trigger.git_ref {
        warn_about_encoding(name, "ref", git_ref, problems);
    }
    if !rule.scheduled && raw_trigger.git_ref.is_none() && rule.reacts_to_delete {
        problems.warn(
            project.span(),
            format!(
                "rule {name:?}: the rule reacts to `delete` but its trigger has no `ref`, so it would \
                 run the deleted branch or tag, which GitLab no longer has; set `ref` (e.g. \"main\")"
            ),
        );
    }
    if rule.scheduled && raw_trigger.git_ref.is_none() {
        problems.at(
            Some(project.span()),
            format!("rule {name:?}: a scheduled rule's trigger needs `ref` (there is no event to take it from)"),
        );
    }
    Some(PendingTrigger {
        spec: TriggerSpec {
            line: trigger_line,
            upstream: String::new(),
            project: project.into_inner(),
            git_ref: raw_trigger.git_ref.map(Spanned::into_inner),
            token_ref,
            token,
            variables,
            inputs,
            status_context: raw_trigger.status_context.map(Spanned::into_inner),
            lines,
        },
        upstream,
    })
}

/// A trigger's `variables`: names GitLab takes, values that are strings (templates),
/// each line noted in `lines` as `variables.KEY`.
fn compile_variables(
    name: &str,
    variables: Option<Spanned<IndexMap<String, Spanned<toml::Value>>>>,
    problems: &mut FileProblems<'_>,
    lines: &mut BTreeMap<String, usize>,
) -> Vec<(String, String)> {
    let Some(variables) = variables else {
        return Vec::new();
    };
    variables
        .into_inner()
        .into_iter()
        .filter_map(|(key, value)| {
            let span = value.span();
            if let Err(message) = check_variable_name(&key) {
                problems.at(Some(span.clone()), format!("rule {name:?}: {message}"));
            }
            lines.insert(format!("variables.{key}"), problems.line(span.start));
            match value.into_inner() {
                toml::Value::String(text) => Some((key, text)),
                other => {
                    problems.at(Some(span), not_a_string(name, &key, &other));
                    None
                }
            }
        })
        .collect()
}

/// The short name a pattern written as a full ref name means (`main` for
/// `refs/heads/main`, `v1` for `refs/tags/v1`); `None` when it is not one. Refs are matched
/// by short name everywhere (rules' `refs`, sources' `url_refs`), so a full one never matches.
pub(super) fn short_name_of_full_ref(pattern: &str) -> Option<&str> {
    let rest = pattern.strip_prefix("refs/")?;
    Some(
        rest.strip_prefix("heads/")
            .or_else(|| rest.strip_prefix("tags/"))
            .unwrap_or(rest),
    )
}

/// Warns about `refs`, `refs_exclude` and `repository` patterns that can never match what
/// senders send: full ref names (refs are matched by short name) and repository URLs.
fn warn_about_patterns(name: &str, raw: &RawRule, problems: &mut FileProblems<'_>) {
    for (field, key) in [(&raw.refs, "refs"), (&raw.refs_exclude, "refs_exclude")] {
        let Some(field) = field else { continue };
        for text in &field.get_ref().0 {
            let Some(short) = short_name_of_full_ref(text) else {
                continue;
            };
            let effect = if key == "refs" {
                "never matches"
            } else {
                "never excludes anything"
            };
            problems.warn(
                field.span(),
                format!(
                    "rule {name:?}: {key}: {text:?} is a full ref name, but refs are matched by their \
                     short name (`main`, `v1.2`), so it {effect}; write {short:?} (and `events` for branch or tag)"
                ),
            );
        }
    }
    if let Some(field) = &raw.repository {
        for text in &field.get_ref().0 {
            let looks_like_url = text.contains("://") || text.starts_with("git@");
            if looks_like_url || text.ends_with(".git") || text.starts_with('/') {
                problems.warn(
                    field.span(),
                    format!(
                        "rule {name:?}: repository: {text:?} never matches: a repository is matched by the \
                         sender's `owner/name` (GitLab: `group/subgroup/project`), without URL, leading `/` or `.git`"
                    ),
                );
            }
        }
    }
}

/// `paths`, `paths_exclude` and `skip_ci` where they cannot work: on a scheduled rule (an
/// error: it has no push), on a rule that reacts to no branch push (a warning: tags and
/// deletions run whatever the settings say), and patterns no file's path matches (a
/// leading `/`, a trailing `/` for a folder).
fn check_push_settings(name: &str, raw: &RawRule, problems: &mut FileProblems<'_>) {
    let events = raw.events.as_ref().map(|e| e.get_ref().as_slice());
    let reacts_to_push = events.is_none_or(|e| e.is_empty() || e.iter().any(|e| e == "push"));
    fn globs(
        field: &Option<Spanned<OneOrMany>>,
    ) -> Option<(std::ops::Range<usize>, Option<&Vec<String>>)> {
        field
            .as_ref()
            .map(|field| (field.span(), Some(&field.get_ref().0)))
    }
    // Each setting: where it is written, its globs, what it reads, and what a tag or a
    // deletion does with it.
    let settings = [
        (
            raw.skip_ci.as_ref().map(|skip| (skip.span(), None)),
            "skip_ci",
            "reads a push's commit message",
            "tags and deletions run whatever their commit says",
        ),
        (
            globs(&raw.paths),
            "paths",
            "filters a push's changed files",
            "tags and deletions change no files, so they run whatever `paths` says",
        ),
        (
            globs(&raw.paths_exclude),
            "paths_exclude",
            "filters a push's changed files",
            "tags and deletions change no files, so they run whatever `paths_exclude` says",
        ),
    ];
    for (written, key, reads, otherwise) in settings {
        let Some((span, texts)) = written else {
            continue;
        };
        if raw.schedule.is_some() {
            problems.at(
                Some(span),
                format!(
                    "rule {name:?}: `{key}` {reads}, and a scheduled rule has none; leave it out"
                ),
            );
            continue;
        }
        if !reacts_to_push {
            problems.warn(
                span.clone(),
                format!("rule {name:?}: `{key}` applies to branch pushes only, and the rule reacts to none ({otherwise})"),
            );
        }
        for text in texts.into_iter().flatten() {
            let hint = if let Some(relative) = text.strip_prefix('/') {
                format!(
                    "paths are matched from the repository's root without a leading `/`; write {relative:?}"
                )
            } else if text.ends_with('/') {
                format!(
                    "a path names a file, never a folder; write \"{text}**\" for every file beneath it"
                )
            } else {
                continue;
            };
            problems.warn(
                span.clone(),
                format!("rule {name:?}: {key}: {text:?} matches no file: {hint}"),
            );
        }
    }
}

/// Warns about a `project` or `ref` written already URL-encoded: hookrelay encodes it when
/// sending, so `acme%2Fapp` would reach GitLab as `acme%252Fapp`, a project that does not exist.
fn warn_about_encoding(
    name: &str,
    key: &str,
    field: &Spanned<String>,
    problems: &mut FileProblems<'_>,
) {
    let text = field.get_ref();
    let bytes = text.as_bytes();
    let encoded = bytes
        .windows(3)
        .any(|w| w[0] == b'%' && w[1].is_ascii_hexdigit() && w[2].is_ascii_hexdigit());
    if !encoded {
        return;
    }
    let decoded = percent_encoding::percent_decode_str(text).decode_utf8_lossy();
    problems.warn(
        field.span(),
        format!(
            "rule {name:?}: {key} {text:?} looks URL-encoded; hookrelay encodes it when sending, so it \
             would reach GitLab encoded twice; write {decoded:?}"
        ),
    );
}

/// Warns about a `project` written as a clone address (`acme/app.git`,
/// `git@gitlab.example.com:acme/app.git`): no GitLab project path ends in `.git`, so every
/// call would be answered `404`, as a revoked token is.
fn warn_about_clone_path(name: &str, field: &Spanned<String>, problems: &mut FileProblems<'_>) {
    let text = field.get_ref();
    if text.contains("{{") {
        return;
    }
    // An SSH clone address (`git@host:group/app.git`): its path follows the colon.
    let ssh_path = text
        .strip_prefix("git@")
        .and_then(|rest| rest.split_once(':'))
        .map(|(_, path)| path);
    let path = ssh_path.unwrap_or(text);
    let path = path.strip_suffix(".git").unwrap_or(path);
    if ssh_path.is_some() || path != text {
        problems.warn(
            field.span(),
            format!(
                "rule {name:?}: project {text:?} is written as a clone address, but GitLab knows a \
                 project by its path (never ending in `.git`), so it would answer 404; write {path:?}"
            ),
        );
    }
}

/// What a sender's own event name is called in `events`, for the error message.
fn event_hint(name: &str) -> &'static str {
    match name {
        "Push Hook" | "repo:push" | "repo:refs_changed" => {
            " (hookrelay names events by what happened to the ref: `push` for branches, `tag` for tags)"
        }
        "Tag Push Hook" | "tag_push" | "create" | "release" => {
            " (a new or moved tag is `tag`; a new branch is `push`)"
        }
        "ping" | "diagnostics:ping" => {
            " (hookrelay answers pings itself; they never start a pipeline)"
        }
        _ => " (hookrelay acts on pushes to branches, tags and deletions)",
    }
}

/// A rule's token is a secret the relay sends; refuse the kinds GitLab would reject.
fn check_token(
    name: &str,
    secret: &Secret,
    span: std::ops::Range<usize>,
    problems: &mut FileProblems<'_>,
) {
    if let Err(message) = crate::trigger::check_trigger_token(secret.expose()) {
        problems.at(Some(span), format!("rule {name:?}: token: {message}"));
    }
}
