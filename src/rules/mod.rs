//! Rules: which events become which trigger calls.
//!
//! A [`RuleSet`] is compiled once per configuration: globs into matchers, templates and
//! `when` expressions into one minijinja environment. Matching goes through an index by
//! source, event kind and (for literal patterns) repository, so rules that cannot match an
//! event cost a hash lookup, not an evaluation. Every decision can be explained: a rule
//! that does not match says the first reason why. The target ref is decided in exactly one
//! place, [`RuleSet::plan`]: the webhook URL's `?ref=` beats the rule's `ref`, which beats
//! the event's own ref (sent fully qualified, so a name that is both a branch and a tag is
//! not ambiguous to GitLab).

pub mod paths;
pub mod schedule;
pub mod template;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};
use indexmap::IndexMap;
use minijinja::Environment;
use minijinja::value::Value;
use serde_json::Map;

use crate::event::{ChangedFiles, Event, EventKind};
use crate::git_ref::GitRef;
use crate::secret::{Secret, SecretRef};
use crate::trigger::{ProjectId, Trigger};
pub use schedule::Schedule;
use template::{EventObject, TextField};

/// Glob patterns as written, and their compiled matcher. `*` does not cross `/`; `**` does.
#[derive(Clone, Debug)]
pub struct Patterns {
    pub texts: Vec<String>,
    set: GlobSet,
    ignore_case: bool,
}

impl Patterns {
    /// Globs as configuration writes them; an empty (or blank) one is refused: it matches
    /// no name, so it is a mistake rather than a pattern.
    pub fn new(texts: Vec<String>) -> Result<Patterns, String> {
        if texts.iter().any(|text| text.trim().is_empty()) {
            return Err("an empty name matches nothing; leave it out".into());
        }
        Patterns::build(texts, false)
    }

    /// The same patterns, matching without regard to case (repository names of forges
    /// that treat them so).
    pub fn ignoring_case(self) -> Patterns {
        Patterns::build(self.texts, true).expect("the patterns compiled once already")
    }

    fn build(texts: Vec<String>, ignore_case: bool) -> Result<Patterns, String> {
        let mut builder = GlobSetBuilder::new();
        for text in &texts {
            builder.add(glob(text, ignore_case)?);
        }
        let set = builder.build().map_err(|err| err.to_string())?;
        Ok(Patterns {
            texts,
            set,
            ignore_case,
        })
    }

    /// Each pattern compiled alone, for a matcher that gathers several rules' (path
    /// filters).
    fn globs(&self) -> impl Iterator<Item = Glob> + '_ {
        self.texts
            .iter()
            .map(|text| glob(text, self.ignore_case).expect("the patterns compiled once already"))
    }

    pub fn is_match(&self, text: &str) -> bool {
        self.set.is_match(text)
    }

    /// The patterns, quoted, for messages: `["v*", "release/*"]`.
    pub fn shown(&self) -> String {
        format!(
            "[{}]",
            self.texts
                .iter()
                .map(|t| format!("{t:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }

    /// `Some(name)` when the only pattern is a literal name (no glob characters).
    fn literal(&self) -> Option<&str> {
        match self.texts.as_slice() {
            [only] if !only.contains(['*', '?', '[', '{', '\\']) => Some(only),
            _ => None,
        }
    }
}

fn glob(text: &str, ignore_case: bool) -> Result<Glob, String> {
    GlobBuilder::new(text)
        .literal_separator(true)
        .case_insensitive(ignore_case)
        .build()
        .map_err(|err| format!("{text:?} is not a valid glob: {}", err.kind()))
}

/// One configured input value: a template for strings, other TOML values as they are.
#[derive(Clone, Debug)]
pub enum InputValue {
    Template(String),
    Literal(serde_json::Value),
}

/// A `[[rule.trigger]]` as written, validated but with templates not yet compiled.
#[derive(Clone, Debug)]
pub struct TriggerSpec {
    pub line: usize,
    pub upstream: String,
    pub project: String,
    pub git_ref: Option<String>,
    pub token_ref: SecretRef,
    /// `None` when secrets were not read (`explain`).
    pub token: Option<Secret>,
    pub variables: Vec<(String, String)>,
    pub inputs: Vec<(String, InputValue)>,
    /// Names the commit status of the pipeline (a template); `None`: `gitlab/<project>`.
    pub status_context: Option<String>,
    /// The line of each template other than `project` (whose line is `line`), by what
    /// messages call it: `ref`, `variables.KEY`, `inputs.KEY`, `status_context`.
    pub lines: BTreeMap<String, usize>,
}

impl TriggerSpec {
    /// The line a message about the template called `what` points at.
    pub fn line_of(&self, what: &str) -> usize {
        self.lines.get(what).copied().unwrap_or(self.line)
    }
}

/// A `[[rule]]` as written, validated but with templates not yet compiled.
#[derive(Clone, Debug)]
pub struct RuleSpec {
    pub name: String,
    pub file: PathBuf,
    pub line: usize,
    /// The sources whose webhooks it reacts to; none for a scheduled rule.
    pub sources: Vec<String>,
    pub repository: Option<Patterns>,
    pub events: Vec<EventKind>,
    pub refs: Option<Patterns>,
    pub refs_exclude: Option<Patterns>,
    /// Globs on the files a push changed (see [`paths`]).
    pub paths: Option<Patterns>,
    pub paths_exclude: Option<Patterns>,
    /// Whether a branch push whose head commit says `[skip ci]` is skipped (the default).
    pub skip_ci: bool,
    /// The expression and its line.
    pub when: Option<(String, usize)>,
    pub schedule: Option<Schedule>,
    /// Hold each trigger this long, merging identical ones that arrive meanwhile.
    pub coalesce: Option<std::time::Duration>,
    pub triggers: Vec<TriggerSpec>,
}

/// A template's name in the environment and its text, for messages.
#[derive(Clone, Debug)]
struct Compiled {
    name: String,
    /// What the template renders for every event, when it has no template syntax: then
    /// it is used as it is, without the template engine.
    constant: Option<String>,
    /// The event's field the template renders, when it is that field alone: then it is
    /// read from the event, without the template engine.
    field: Option<TextField>,
}

#[derive(Clone, Debug)]
struct CompiledTrigger {
    spec: TriggerSpec,
    project: Compiled,
    git_ref: Option<Compiled>,
    variables: Vec<(String, Compiled)>,
    inputs: Vec<(String, Result<Compiled, serde_json::Value>)>,
    status_context: Option<Compiled>,
}

/// A compiled rule.
#[derive(Clone, Debug)]
pub struct Rule {
    pub spec: RuleSpec,
    /// Its place in the rule set.
    index: usize,
    when: Option<Compiled>,
    triggers: Vec<CompiledTrigger>,
}

impl RuleSpec {
    /// Whether it chooses pushes by the files they changed (`paths`, `paths_exclude`).
    pub fn filters_paths(&self) -> bool {
        self.paths.is_some() || self.paths_exclude.is_some()
    }
}

impl Rule {
    pub fn name(&self) -> &str {
        &self.spec.name
    }
}

/// Which rules an event of one source and kind may match.
#[derive(Clone, Debug, Default)]
struct Candidates {
    by_repository: HashMap<String, Vec<usize>>,
    any_repository: Vec<usize>,
}

/// A problem found while compiling rules: where, and what.
#[derive(Clone, Debug)]
pub struct RuleProblem {
    pub file: PathBuf,
    pub line: usize,
    pub message: String,
}

/// All rules of a configuration, compiled and indexed.
#[derive(Clone, Debug)]
pub struct RuleSet {
    rules: Vec<Rule>,
    /// Each token reference (`env:NAME`) and what it resolved to at load.
    tokens: HashMap<String, Secret>,
    env: Arc<Environment<'static>>,
    index: HashMap<(String, EventKind), Candidates>,
    path_filters: paths::PathFilters,
}

impl Default for RuleSet {
    fn default() -> Self {
        RuleSet {
            rules: Vec::new(),
            tokens: HashMap::new(),
            env: Arc::new(template::environment()),
            index: HashMap::new(),
            path_filters: paths::PathFilters::default(),
        }
    }
}

/// One trigger a rule produced for an event, or why it could not.
#[derive(Debug)]
pub struct Planned {
    pub rule: String,
    /// `Err` when a template failed or produced an invalid project or ref.
    pub trigger: Result<Trigger, String>,
    /// The token's reference, for showing when secrets were not read.
    pub token_ref: SecretRef,
    /// The rule's `coalesce` window.
    pub coalesce: Option<std::time::Duration>,
    /// The context (GitHub, Gitea) or key (Bitbucket) of the pipeline's commit status.
    pub status_context: String,
    /// The repository and commit a status of the pipeline belongs to: `None` for a
    /// deletion (no commit) and a scheduled rule (no webhook).
    pub commit: Option<(String, String)>,
}

impl RuleSet {
    /// Compiles every template and expression, and checks the fields they read. Problems
    /// come back with the line of the field that has them.
    pub fn build(specs: Vec<RuleSpec>) -> Result<RuleSet, Vec<RuleProblem>> {
        let mut compiler = Compiler {
            env: template::environment(),
            problems: Vec::new(),
        };
        let mut rules = Vec::new();
        for spec in specs {
            let when = spec.when.as_ref().and_then(|(expression, line)| {
                compiler.add(
                    &spec,
                    format!("{}/when", spec.name),
                    template::expression_template(expression),
                    *line,
                    "when",
                )
            });
            let triggers = spec
                .triggers
                .iter()
                .enumerate()
                .filter_map(|(i, trigger)| compiler.trigger(&spec, i, trigger))
                .collect();
            rules.push(Rule {
                spec,
                index: rules.len(),
                when,
                triggers,
            });
        }
        if !compiler.problems.is_empty() {
            return Err(compiler.problems);
        }
        let index = candidates_index(&rules);
        let path_filters = paths::PathFilters::of(rules.iter().map(|rule| &rule.spec));
        let tokens = rules
            .iter()
            .flat_map(|rule| &rule.triggers)
            .filter_map(|t| Some((t.spec.token_ref.to_string(), t.spec.token.clone()?)))
            .collect();
        Ok(RuleSet {
            rules,
            tokens,
            env: Arc::new(compiler.env),
            index,
            path_filters,
        })
    }

    /// The token a trigger's reference (`env:NAME`) was resolved to at load, if any rule
    /// still uses it.
    pub fn token(&self, reference: &str) -> Option<Secret> {
        self.tokens.get(reference).cloned()
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rules that match `event`, in configuration order.
    pub fn matching(&self, event: &Event) -> Vec<&Rule> {
        self.matching_in(event, &Scope::of_event(event))
    }

    fn matching_in(&self, event: &Event, scope: &Scope) -> Vec<&Rule> {
        self.candidates(event)
            .into_iter()
            .filter(|rule| self.why_not(rule, event, scope).is_none())
            .collect()
    }

    /// The rules that may match `event` by its source, kind and repository, in
    /// configuration order (from the index, without looking at the others).
    fn candidates(&self, event: &Event) -> Vec<&Rule> {
        let Some(candidates) = self.index.get(&(event.source.clone(), event.kind)) else {
            return Vec::new();
        };
        let mut indices: Vec<usize> = candidates.any_repository.clone();
        if let Some(literal) = candidates
            .by_repository
            .get(&event.repository.to_lowercase())
        {
            indices.extend(literal);
            indices.sort_unstable();
        }
        indices.into_iter().map(|i| &self.rules[i]).collect()
    }

    /// Whether a rule with path filters matches `event` in all but those (its events,
    /// repository and refs): only then is it worth asking the forge for the files.
    pub fn reads_changed_files(&self, event: &Event) -> bool {
        self.candidates(event)
            .into_iter()
            .any(|rule| rule.spec.filters_paths() && why_not_by_ref(rule, event).is_none())
    }

    /// Every rule of the event's source, with the first reason it does not match (`None`
    /// when it matches), in configuration order: what `explain` shows.
    pub fn verdicts(&self, event: &Event) -> Vec<(&Rule, Option<String>)> {
        self.verdicts_bounded(event, usize::MAX)
    }

    /// [`RuleSet::verdicts`] for at most `most` rules, for answers that must stay small.
    pub fn verdicts_bounded(&self, event: &Event, most: usize) -> Vec<(&Rule, Option<String>)> {
        let scope = Scope::of_event(event);
        self.of_source(&event.source)
            .take(most)
            .map(|rule| (rule, self.why_not(rule, event, &scope)))
            .collect()
    }

    /// Whether a rule of `source` chooses pushes by their changed files.
    pub fn filters_paths_of(&self, source: &str) -> bool {
        self.of_source(source).any(|rule| rule.spec.filters_paths())
    }

    /// How many rules react to webhooks of `source`.
    pub fn count_for_source(&self, source: &str) -> usize {
        self.of_source(source).count()
    }

    /// The rules that react to webhooks of `source`, in configuration order.
    fn of_source<'a>(&'a self, source: &str) -> impl Iterator<Item = &'a Rule> {
        self.rules
            .iter()
            .filter(move |rule| rule.spec.sources.iter().any(|s| s == source))
    }

    /// The first reason `rule` does not match `event`.
    fn why_not(&self, rule: &Rule, event: &Event, scope: &Scope) -> Option<String> {
        if let Some(reason) = why_not_by_ref(rule, event) {
            return Some(reason);
        }
        let spec = &rule.spec;
        // The changed files are gathered, and matched against every rule's path filters,
        // once per event and only when a rule has filters.
        if spec.filters_paths()
            && let ChangedFiles::Listed(files) = scope.changed_files()
            && !scope.passing_paths(&self.path_filters, files, self.rules.len())[rule.index]
        {
            return Some(paths::reason(
                spec.paths.as_ref(),
                spec.paths_exclude.as_ref(),
                files,
            ));
        }
        if spec.skip_ci
            && let Some(marker) = event.skip_ci_marker()
        {
            return Some(format!(
                "skip_ci: the head commit's message says {marker:?} (`skip_ci = false` runs the rule anyway)"
            ));
        }
        if let Some(when) = &rule.when {
            return match self.render(when, scope) {
                Ok(text) if text == "1" => None,
                Ok(_) => Some("when: false".into()),
                Err(err) => Some(format!("when: {err}")),
            };
        }
        None
    }

    fn render(&self, compiled: &Compiled, scope: &Scope) -> Result<String, String> {
        if let Some(text) = &compiled.constant {
            return Ok(text.clone());
        }
        if let (Some(field), Some(event)) = (compiled.field, scope.event) {
            return Ok(field.of(event).to_owned());
        }
        let template = self
            .env
            .get_template(&compiled.name)
            .map_err(|err| template::error_text(&err))?;
        template::render_bounded(&template, scope.context())
    }

    /// The trigger calls for an event: one per trigger of every matching rule.
    /// `url_ref` is the webhook URL's `?ref=`, which beats everything else.
    pub fn plan(&self, event: &Event, url_ref: Option<&GitRef>) -> Vec<Planned> {
        let scope = Scope::of_event(event);
        self.matching_in(event, &scope)
            .into_iter()
            .flat_map(|rule| {
                rule.triggers
                    .iter()
                    .map(|trigger| self.plan_one(rule, trigger, &scope, url_ref))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The trigger calls of a scheduled rule firing at `time` (shown in the rule's zone).
    pub fn plan_scheduled(&self, rule: &Rule, time: &str) -> Vec<Planned> {
        let timezone = rule
            .spec
            .schedule
            .as_ref()
            .map(|s| s.timezone.name().to_owned())
            .unwrap_or_default();
        let scope = Scope::of(
            minijinja::context! {
                schedule => minijinja::context! { rule => rule.name(), time => time, timezone => timezone }
            },
            None,
        );
        rule.triggers
            .iter()
            .map(|trigger| self.plan_one(rule, trigger, &scope, None))
            .collect()
    }

    fn plan_one(
        &self,
        rule: &Rule,
        trigger: &CompiledTrigger,
        scope: &Scope,
        url_ref: Option<&GitRef>,
    ) -> Planned {
        let event = scope.event;
        let build = || -> Result<Trigger, String> {
            let project_text = self
                .render(&trigger.project, scope)
                .map_err(|e| format!("project: {e}"))?;
            let project =
                ProjectId::parse(project_text.trim()).map_err(|e| format!("project: {e}"))?;
            // The one place ref precedence is decided: URL, then rule, then event.
            let git_ref = match (url_ref, &trigger.git_ref, event) {
                (Some(url_ref), _, _) => url_ref.clone(),
                (None, Some(template), _) => {
                    let text = self
                        .render(template, scope)
                        .map_err(|e| format!("ref: {e}"))?;
                    GitRef::parse(text.trim()).map_err(|e| format!("ref: {e}"))?
                }
                (None, None, Some(event)) => {
                    GitRef::parse(&event.git_ref).map_err(|e| format!("ref: {e}"))?
                }
                (None, None, None) => return Err("ref: a scheduled trigger needs `ref`".into()),
            };
            let mut variables = IndexMap::new();
            for (key, template) in &trigger.variables {
                let value = self
                    .render(template, scope)
                    .map_err(|e| format!("variables.{key}: {e}"))?;
                variables.insert(key.clone(), value);
            }
            let mut inputs = Map::new();
            for (key, value) in &trigger.inputs {
                let value = match value {
                    Ok(template) => serde_json::Value::String(
                        self.render(template, scope)
                            .map_err(|e| format!("inputs.{key}: {e}"))?,
                    ),
                    Err(literal) => literal.clone(),
                };
                inputs.insert(key.clone(), value);
            }
            Ok(Trigger {
                upstream: trigger.spec.upstream.clone(),
                project,
                git_ref,
                token: trigger
                    .spec
                    .token
                    .clone()
                    .unwrap_or_else(|| Secret::new(String::new())),
                variables,
                inputs,
                other_params: Map::new(),
                webhook_body: None,
            })
        };
        let mut built = build();
        let mut status_context = String::new();
        if let Ok(planned) = &built {
            match self.status_context(trigger, scope, planned) {
                Ok(text) => status_context = text,
                Err(err) => built = Err(err),
            }
        }
        Planned {
            rule: rule.name().to_owned(),
            trigger: built,
            token_ref: trigger.spec.token_ref.clone(),
            coalesce: rule.spec.coalesce,
            status_context,
            commit: event
                .filter(|e| !e.commit.is_empty())
                .map(|e| (e.repository.clone(), e.commit.clone())),
        }
    }

    /// The trigger's `status_context`, or the default that names the GitLab project (so
    /// a tag fanned out to three projects shows three statuses).
    fn status_context(
        &self,
        trigger: &CompiledTrigger,
        scope: &Scope,
        planned: &Trigger,
    ) -> Result<String, String> {
        let project = planned.project.to_string();
        let Some(template) = &trigger.status_context else {
            return Ok(format!("gitlab/{project}"));
        };
        let with_trigger = minijinja::context! {
            trigger => minijinja::context! {
                project => project,
                ref => planned.git_ref.as_str(),
                upstream => planned.upstream.as_str(),
            },
            ..scope.context().clone()
        };
        let text = self
            .render(template, &Scope::of(with_trigger, scope.event))
            .map_err(|e| format!("status_context: {e}"))?;
        let text = text.trim();
        if text.is_empty() {
            return Err("status_context: the template rendered nothing".into());
        }
        Ok(text.to_owned())
    }
}

/// Compiles rules' templates into one environment, keeping every problem with its line.
struct Compiler {
    env: Environment<'static>,
    problems: Vec<RuleProblem>,
}

impl Compiler {
    /// One template (or `when` expression) of `spec`, named `name`, checked for the fields
    /// it reads; `None` after recording its problem.
    fn add(
        &mut self,
        spec: &RuleSpec,
        name: String,
        source: String,
        line: usize,
        what: &str,
    ) -> Option<Compiled> {
        let scheduled = spec.schedule.is_some();
        let with_trigger = what == "status_context";
        let constant = template::constant_text(&source);
        let field = TextField::rendered_alone_by(&source);
        let result = self
            .env
            .add_template_owned(name.clone(), source)
            .map_err(|err| template::error_text(&err))
            .and_then(|()| {
                template::check_variables_with(&self.env, &name, scheduled, with_trigger)
            });
        match result {
            Ok(()) => Some(Compiled {
                name,
                constant,
                field,
            }),
            Err(message) => {
                self.problems.push(RuleProblem {
                    file: spec.file.clone(),
                    line,
                    message: format!("rule {:?}: {what}: {message}", spec.name),
                });
                None
            }
        }
    }

    /// `compiled` when it is not plain text or its text parses as `what` (a project or a
    /// ref) the way every trigger's would at run time; else `None`, its problem recorded:
    /// `project = ""` or `ref = "a..b"` would fail every trigger of the rule.
    fn constant_must_parse<E: std::fmt::Display>(
        &mut self,
        spec: &RuleSpec,
        trigger: &TriggerSpec,
        what: &str,
        compiled: Compiled,
        parse: impl FnOnce(&str) -> Result<(), E>,
    ) -> Option<Compiled> {
        let Some(text) = &compiled.constant else {
            return Some(compiled);
        };
        match parse(text.trim()) {
            Ok(()) => Some(compiled),
            Err(err) => {
                self.problems.push(RuleProblem {
                    file: spec.file.clone(),
                    line: trigger.line_of(what),
                    message: format!("rule {:?}: {what}: {err}", spec.name),
                });
                None
            }
        }
    }

    /// The `i`-th trigger of `spec`, every template of it compiled; `None` when one has a
    /// problem (each recorded).
    fn trigger(
        &mut self,
        spec: &RuleSpec,
        i: usize,
        trigger: &TriggerSpec,
    ) -> Option<CompiledTrigger> {
        let prefix = format!("{}/trigger{i}", spec.name);
        let add = |compiler: &mut Compiler, what: &str, text: &str| {
            let name = format!("{prefix}/{}", what.replacen('.', "/", 1));
            compiler.add(spec, name, text.to_owned(), trigger.line_of(what), what)
        };
        let project = add(self, "project", &trigger.project).and_then(|compiled| {
            self.constant_must_parse(spec, trigger, "project", compiled, |text| {
                ProjectId::parse(text).map(drop)
            })
        });
        let git_ref = trigger.git_ref.as_ref().map(|text| {
            add(self, "ref", text).and_then(|compiled| {
                self.constant_must_parse(spec, trigger, "ref", compiled, |text| {
                    GitRef::parse(text).map(drop)
                })
            })
        });
        let variables: Vec<_> = trigger
            .variables
            .iter()
            .map(|(key, text)| (key.clone(), add(self, &format!("variables.{key}"), text)))
            .collect();
        let inputs: Vec<_> = trigger
            .inputs
            .iter()
            .map(|(key, value)| match value {
                InputValue::Template(text) => {
                    let compiled = add(self, &format!("inputs.{key}"), text);
                    (key.clone(), compiled.ok_or(serde_json::Value::Null))
                }
                InputValue::Literal(value) => (key.clone(), Err(value.clone())),
            })
            .collect();
        let status_context = trigger
            .status_context
            .as_ref()
            .map(|text| add(self, "status_context", text));
        if matches!(status_context, Some(None)) {
            return None;
        }
        // `git_ref`: None when the trigger has no ref template, Some(None) when it failed.
        let git_ref = match git_ref {
            None => Some(None),
            Some(compiled) => compiled.map(Some),
        };
        let (Some(project), Some(git_ref)) = (project, git_ref) else {
            return None;
        };
        let variables = variables
            .into_iter()
            .map(|(k, c)| Some((k, c?)))
            .collect::<Option<Vec<_>>>()?;
        Some(CompiledTrigger {
            spec: trigger.clone(),
            project,
            git_ref,
            variables,
            inputs,
            status_context: status_context.flatten(),
        })
    }
}

/// Which rules may match a source's event of a kind: by the repository a rule names
/// literally (in lower case; `why_not` then applies each pattern's own case rule), or
/// any repository.
fn candidates_index(rules: &[Rule]) -> HashMap<(String, EventKind), Candidates> {
    let mut index: HashMap<(String, EventKind), Candidates> = HashMap::new();
    for (i, rule) in rules.iter().enumerate() {
        for (source, kind) in rule
            .spec
            .sources
            .iter()
            .flat_map(|source| rule.spec.events.iter().map(move |kind| (source, kind)))
        {
            let candidates = index.entry((source.clone(), *kind)).or_default();
            match rule.spec.repository.as_ref().and_then(Patterns::literal) {
                Some(repository) => candidates
                    .by_repository
                    .entry(repository.to_lowercase())
                    .or_default()
                    .push(i),
                None => candidates.any_repository.push(i),
            }
        }
    }
    index
}

/// The first reason `rule` does not match `event` by its kind, repository or ref.
fn why_not_by_ref(rule: &Rule, event: &Event) -> Option<String> {
    let spec = &rule.spec;
    if !spec.events.contains(&event.kind) {
        let events: Vec<&str> = spec.events.iter().map(|k| k.as_str()).collect();
        return Some(format!(
            "events: {} not in [{}]",
            event.kind.as_str(),
            events.join(", ")
        ));
    }
    if let Some(patterns) = &spec.repository
        && !patterns.is_match(&event.repository)
    {
        return Some(format!(
            "repository: {:?} matches none of {}{}",
            event.repository,
            patterns.shown(),
            if patterns.ignore_case {
                " (compared ignoring case)"
            } else {
                ""
            }
        ));
    }
    if let Some(patterns) = &spec.refs
        && !patterns.is_match(&event.ref_name)
    {
        return Some(format!(
            "refs: {:?} matches none of {}",
            event.ref_name,
            patterns.shown()
        ));
    }
    if let Some(patterns) = &spec.refs_exclude
        && patterns.is_match(&event.ref_name)
    {
        return Some(format!(
            "refs_exclude: {:?} matches {}",
            event.ref_name,
            patterns.shown()
        ));
    }
    None
}

/// What a rule's templates read for one event or firing: a field named alone comes
/// straight from the event; every other template goes through the template engine, whose
/// context (a copy of the event) is made the first time one needs it.
struct Scope<'a> {
    event: Option<&'a Event>,
    context: std::cell::OnceCell<Value>,
    /// The event's changed files, gathered once for every rule with path filters.
    changed_files: std::cell::OnceCell<ChangedFiles<'a>>,
    /// Which rules those files pass, matched once for all of them.
    passing_paths: std::cell::OnceCell<Vec<bool>>,
}

impl<'a> Scope<'a> {
    fn of_event(event: &'a Event) -> Self {
        Self {
            event: Some(event),
            context: std::cell::OnceCell::new(),
            changed_files: std::cell::OnceCell::new(),
            passing_paths: std::cell::OnceCell::new(),
        }
    }

    /// A context made already (a scheduled firing's, a `status_context`'s), beside the
    /// event it holds, if any.
    fn of(context: Value, event: Option<&'a Event>) -> Self {
        Self {
            event,
            context: std::cell::OnceCell::from(context),
            changed_files: std::cell::OnceCell::new(),
            passing_paths: std::cell::OnceCell::new(),
        }
    }

    /// What the event's webhook tells of the files it changed (nothing, without an event).
    fn changed_files(&self) -> &ChangedFiles<'a> {
        self.changed_files.get_or_init(|| match self.event {
            Some(event) => event.changed_files(),
            None => ChangedFiles::Unknown("a scheduled rule has no event".into()),
        })
    }

    /// Which rules (by index) the event's changed `files` pass ([`paths::PathFilters`]).
    fn passing_paths(
        &self,
        filters: &paths::PathFilters,
        files: &std::collections::BTreeSet<&str>,
        rule_count: usize,
    ) -> &[bool] {
        self.passing_paths
            .get_or_init(|| filters.passing(files, rule_count))
    }

    /// The template engine's context: `{ event: … }`.
    fn context(&self) -> &Value {
        self.context.get_or_init(|| match self.event {
            Some(event) => minijinja::context! {
                event => Value::from_object(EventObject(Arc::new(event.clone())))
            },
            None => Value::UNDEFINED,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventContext, Provider, RefChange};

    pub(super) fn spec(
        name: &str,
        repository: Option<&str>,
        refs: Option<&str>,
        events: &[EventKind],
    ) -> RuleSpec {
        RuleSpec {
            name: name.into(),
            file: PathBuf::from("r.toml"),
            line: 1,
            sources: vec!["gh".into()],
            repository: repository.map(|r| Patterns::new(vec![r.into()]).unwrap()),
            events: events.to_vec(),
            refs: refs.map(|r| Patterns::new(vec![r.into()]).unwrap()),
            refs_exclude: None,
            paths: None,
            paths_exclude: None,
            skip_ci: true,
            when: None,
            schedule: None,
            coalesce: None,
            triggers: vec![TriggerSpec {
                line: 2,
                upstream: "gitlab".into(),
                project: "acme/{{ event.ref_name }}".into(),
                git_ref: None,
                token_ref: SecretRef::Env("T".into()),
                token: Some(Secret::new("glptt-x")),
                variables: vec![("SHA".into(), "{{ event.after[:7] }}".into())],
                inputs: vec![("n".into(), InputValue::Literal(serde_json::json!(3)))],
                status_context: None,
                lines: BTreeMap::new(),
            }],
        }
    }

    fn event(repository: &str, full_ref: &str) -> Event {
        EventContext {
            provider: Provider::Github,
            source: "gh".into(),
            delivery: "d".into(),
            repository: repository.into(),
            repository_url: String::new(),
            repository_web_url: String::new(),
            pusher: String::new(),
            payload: Arc::new(
                crate::event::Payload::parsed(bytes::Bytes::from_static(b"{}")).unwrap(),
            ),
        }
        .event(RefChange {
            full_ref: full_ref.into(),
            before: "0".repeat(40),
            after: "abcdef0123456789abcdef0123456789abcdef01".into(),
            ..RefChange::default()
        })
        .unwrap()
    }

    #[test]
    fn globs_do_not_cross_slashes_unless_doubled() {
        let one = Patterns::new(vec!["acme/*".into()]).unwrap();
        assert!(one.is_match("acme/app"));
        assert!(!one.is_match("acme/sub/app"));
        let any = Patterns::new(vec!["acme/**".into()]).unwrap();
        assert!(any.is_match("acme/sub/app"));
        assert!(
            Patterns::new(vec!["[".into()])
                .unwrap_err()
                .contains("not a valid glob")
        );
    }

    #[test]
    fn reasons_name_the_first_thing_that_failed() {
        let set = RuleSet::build(vec![
            spec("tags", None, None, &[EventKind::Tag]),
            spec("other-repo", Some("other/*"), None, &[EventKind::Push]),
            spec(
                "releases",
                Some("acme/app"),
                Some("release/*"),
                &[EventKind::Push],
            ),
            spec("all", Some("acme/app"), None, &[EventKind::Push]),
        ])
        .unwrap();
        let push = event("acme/app", "refs/heads/main");
        let verdicts: Vec<(String, Option<String>)> = set
            .verdicts(&push)
            .into_iter()
            .map(|(r, why)| (r.name().to_owned(), why))
            .collect();
        assert_eq!(
            verdicts,
            vec![
                ("tags".into(), Some("events: push not in [tag]".into())),
                (
                    "other-repo".into(),
                    Some("repository: \"acme/app\" matches none of [\"other/*\"]".into())
                ),
                (
                    "releases".into(),
                    Some("refs: \"main\" matches none of [\"release/*\"]".into())
                ),
                ("all".into(), None),
            ]
        );
        assert_eq!(
            set.matching(&push)
                .iter()
                .map(|r| r.name())
                .collect::<Vec<_>>(),
            ["all"]
        );
    }

    #[test]
    fn templates_render_and_ref_precedence_holds() {
        let set = RuleSet::build(vec![spec("all", None, None, &[EventKind::Push])]).unwrap();
        let push = event("acme/app", "refs/heads/main");
        let planned = set.plan(&push, None);
        let trigger = planned[0].trigger.as_ref().unwrap();
        assert_eq!(trigger.project, ProjectId::Path("acme/main".into()));
        assert_eq!(
            trigger.git_ref.as_str(),
            "refs/heads/main",
            "the event's ref, fully qualified"
        );
        assert_eq!(trigger.variables["SHA"], "abcdef0");
        assert_eq!(trigger.inputs["n"], serde_json::json!(3));
        let url_ref = GitRef::parse("hotfix").unwrap();
        let planned = set.plan(&push, Some(&url_ref));
        assert_eq!(
            planned[0].trigger.as_ref().unwrap().git_ref.as_str(),
            "hotfix"
        );
    }

    /// Templates render text for CI, whatever the names around them: an input named like
    /// a YAML or HTML file is not quoted or escaped (minijinja chooses escaping by a
    /// template's name unless told not to), and a field alone reads as the engine reads it.
    #[test]
    fn templates_render_unescaped_whatever_their_names() {
        let mut rule = spec("site.html", None, None, &[EventKind::Push]);
        rule.triggers[0].variables = vec![
            ("ALONE".into(), "{{ event.repository }}".into()),
            ("AROUND".into(), "<{{ event.repository }}>".into()),
        ];
        rule.triggers[0].inputs = vec![
            (
                "deploy.yml".into(),
                InputValue::Template("{{ event.repository }}".into()),
            ),
            (
                "page.html".into(),
                InputValue::Template("x {{ event.repository }}".into()),
            ),
            (
                "data.json".into(),
                InputValue::Template("{{ event.repository | lower }}".into()),
            ),
        ];
        rule.triggers[0].status_context = Some("ci.html/{{ event.repository }}".into());
        let set = RuleSet::build(vec![rule]).unwrap();
        let planned = set.plan(&event("acme/a&b\"c<d>", "refs/heads/main"), None);
        let trigger = planned[0].trigger.as_ref().unwrap();
        assert_eq!(trigger.variables["ALONE"], "acme/a&b\"c<d>");
        assert_eq!(trigger.variables["AROUND"], "<acme/a&b\"c<d>>");
        assert_eq!(trigger.inputs["deploy.yml"], "acme/a&b\"c<d>");
        assert_eq!(trigger.inputs["page.html"], "x acme/a&b\"c<d>");
        assert_eq!(trigger.inputs["data.json"], "acme/a&b\"c<d>");
        assert_eq!(planned[0].status_context, "ci.html/acme/a&b\"c<d>");
    }

    #[test]
    fn template_problems_are_found_at_build() {
        let mut bad = spec("bad", None, None, &[EventKind::Push]);
        bad.triggers[0].project = "{{ event.branch }}".into();
        bad.when = Some(("event.commit_count >".into(), 7));
        let problems = RuleSet::build(vec![bad]).unwrap_err();
        assert_eq!(problems.len(), 2);
        assert_eq!(problems[0].line, 7);
        assert!(
            problems[0].message.contains("when: syntax error"),
            "{}",
            problems[0].message
        );
        assert!(
            problems[1]
                .message
                .contains("`event.branch` does not exist"),
            "{}",
            problems[1].message
        );
    }
}
