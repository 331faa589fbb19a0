//! Configuration: every `*.toml` in a folder (or one file), validated into a typed [`Config`].
//!
//! Files are read in name order and form one configuration. Each section is deserialized
//! on its own, so one run reports every problem in every file as `file:line: message`
//! rather than stopping at the first. Nothing past this module re-checks a string from a
//! configuration file: listen addresses, upstream URLs, sizes and durations are typed here.
//! Environment overrides (`HOOKRELAY_UPSTREAM_<NAME>_URL`) are applied before validation,
//! so an override is checked like the value it replaces.
//!
//! One file per section, as the configuration reads: `server`, `upstream`, `gateway`,
//! `source` (with `forge_api`: a source's `status`, `compare` and `catch_up`, which call its
//! forge), `rule`, `delivery`, `store`; `limit` is the `limit = { … }` they share. This
//! file reads the files, hands each section to its module, and checks what spans files
//! (names defined twice, rules naming sources and upstreams).

pub mod admin;
mod delivery;
mod forge_api;
pub mod fuzz;
mod gateway;
mod limit;
pub mod networks;
mod problems;
mod rule;
mod server;
mod source;
mod store;
mod units;
mod upstream;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{DeserializeOwned, IntoDeserializer};
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::sources::SourceConfig;
use crate::store::STORE_URL_ENV;

pub use crate::upstream::{
    DEFAULT_MAX_IN_FLIGHT, UpstreamConfig, default_per_project, parse_upstream_url,
};
pub use delivery::DeliveryConfig;
pub use gateway::{DEFAULT_GATEWAY_MAX_BODY, GatewayConfig};
pub(crate) use limit::{RawLimit, compile_limit, only_limit_keys};
pub use problems::{FileProblems, Problem, Problems};
pub use server::{DEFAULT_BODY_MEMORY, DEFAULT_LISTEN, DEFAULT_MAX_BODY, ServerConfig, ServerTls};
pub use units::{
    LONGEST_DURATION, parse_duration, parse_duration_at_least, parse_listen, parse_size,
};
pub(crate) use upstream::ca_file;

/// The whole, validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub server: ServerConfig,
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    /// `None` when no `[gateway]` section enables the trigger endpoints.
    pub gateway: Option<GatewayConfig>,
    /// `[source.NAME]`: webhook senders, served at `POST /hooks/NAME`.
    pub sources: BTreeMap<String, SourceConfig>,
    /// `[[rule]]`: which events become which trigger calls.
    pub rules: crate::rules::RuleSet,
    /// `[delivery]`: retries and retention of the durable outbox.
    pub delivery: DeliveryConfig,
    /// `[store]`: the shared PostgreSQL database; `None`: SQLite in the state folder.
    pub store: Option<crate::store::postgres::PostgresConfig>,
    /// `[admin]`: the delivery dashboard; `None`: off.
    pub admin: Option<admin::AdminConfig>,
    /// The files this configuration was read from, in the order read.
    pub files: Vec<PathBuf>,
    /// Settings that are valid but cannot do what they look like (a rule that can never
    /// match): `check` lists them and passes, `serve` logs them.
    pub warnings: Vec<Problem>,
}

/// Reads the environment for overrides; tests pass their own.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Loads `path` (a file, or a folder whose `*.toml` files are read in name order).
pub fn load(path: &Path) -> Result<Config, Problems> {
    load_with_env(path, &|name| std::env::var(name).ok())
}

/// [`load`] without reading secrets, for `explain`, which checks no signature.
pub fn load_without_secrets(path: &Path) -> Result<Config, Problems> {
    load_with(path, &|name| std::env::var(name).ok(), false)
}

/// [`load`] with an explicit environment.
pub fn load_with_env(path: &Path, env: EnvLookup<'_>) -> Result<Config, Problems> {
    load_with(path, env, true)
}

/// Listening addresses given on `serve`'s command line (`--listen`, `--admin-listen`),
/// which take the place of the files': what the checks of where the relay listens read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenFlags {
    pub listen: Option<std::net::SocketAddr>,
    pub admin_listen: Option<std::net::SocketAddr>,
}

/// [`load_with_env`] for `serve`, whose command line may say where it listens (`flags`).
pub fn load_serving(
    path: &Path,
    env: EnvLookup<'_>,
    flags: ListenFlags,
) -> Result<Config, Problems> {
    load_files(path, env, true, flags)
}

fn load_with(path: &Path, env: EnvLookup<'_>, resolve_secrets: bool) -> Result<Config, Problems> {
    load_files(path, env, resolve_secrets, ListenFlags::default())
}

fn load_files(
    path: &Path,
    env: EnvLookup<'_>,
    resolve_secrets: bool,
    flags: ListenFlags,
) -> Result<Config, Problems> {
    let files = config_files(path).map_err(|problem| Problems(vec![problem]))?;
    let texts = files.into_iter().map(|file| {
        let text = crate::named_file::read_text(&file, crate::named_file::CONFIGURATION);
        (file, text)
    });
    load_texts(texts, env, resolve_secrets, flags)
}

/// One configuration from the texts of its files, in order (a file that could not be
/// read is a problem of its own).
fn load_texts(
    texts: impl IntoIterator<Item = (PathBuf, std::io::Result<String>)>,
    env: EnvLookup<'_>,
    resolve_secrets: bool,
    flags: ListenFlags,
) -> Result<Config, Problems> {
    let mut builder = Builder {
        resolve_secrets,
        flags,
        ..Builder::default()
    };
    let mut files = Vec::new();
    for (file, text) in texts {
        match text {
            Ok(text) => builder.read_file(&file, &text, env),
            Err(err) => builder.problems.push(Problem {
                file: file.clone(),
                line: None,
                message: format!("cannot read: {err}"),
            }),
        }
        files.push(file);
    }
    if builder.store.is_none() {
        builder.store_from_env = store::from_env(env);
    }
    builder.finish(files)
}

/// The files a `--config` path names.
pub fn config_files(path: &Path) -> Result<Vec<PathBuf>, Problem> {
    let whole = |message: String| Problem {
        file: path.to_owned(),
        line: None,
        message,
    };
    let meta = std::fs::metadata(path).map_err(|err| whole(format!("cannot read: {err}")))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let entries = std::fs::read_dir(path).map_err(|err| whole(format!("cannot list: {err}")))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|p| p.extension().is_some_and(|ext| ext == "toml") && p.is_file())
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(whole("contains no *.toml files".into()));
    }
    Ok(files)
}

/// Where a section was first defined, to name it when it is defined again.
#[derive(Clone)]
struct Origin {
    file: PathBuf,
    line: usize,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

#[derive(Default)]
struct Builder {
    problems: Vec<Problem>,
    warnings: Vec<Problem>,
    server: Option<(ServerConfig, Origin)>,
    upstreams: BTreeMap<String, (UpstreamConfig, Origin)>,
    gateway: Option<(gateway::ReadGateway, Origin)>,
    admin: Option<(Option<admin::AdminConfig>, Origin)>,
    sources: BTreeMap<String, (SourceConfig, Origin)>,
    /// `[upstream.NAME]` and `[source.NAME]` sections that are there but had problems of
    /// their own: what names them is not told again that nothing is defined by that name.
    broken_upstreams: BTreeSet<String>,
    broken_sources: BTreeSet<String>,
    rules: Vec<rule::PendingRule>,
    delivery: Option<(DeliveryConfig, Origin)>,
    /// `[store]` as read (`None` inside: it had problems), and where.
    store: Option<(Option<crate::store::postgres::PostgresConfig>, Origin)>,
    /// `HOOKRELAY_STORE_URL` when no file has `[store]`.
    store_from_env: Option<Result<crate::store::postgres::PostgresConfig, String>>,
    resolve_secrets: bool,
    /// Where `serve`'s command line says it listens, over the files.
    flags: ListenFlags,
}

/// What a TOML "duplicate key" error is about.
enum Duplicate {
    /// A `[table]` header seen before, at this line.
    Header { line: usize, header: String },
    /// A key inside the table whose header is at `header_line`.
    KeyUnder { header_line: usize },
}

fn duplicate_table(text: &str, err: &toml::de::Error) -> Option<Duplicate> {
    if !err.message().starts_with("duplicate key") {
        return None;
    }
    let start = err.span()?.start.min(text.len());
    let lines: Vec<&str> = text.lines().collect();
    let line = text.as_bytes()[..start]
        .iter()
        .filter(|&&b| b == b'\n')
        .count();
    let this = lines.get(line)?.trim();
    if this.starts_with('[') {
        let header = this.split('#').next().unwrap_or(this).trim().to_owned();
        return Some(Duplicate::Header { line, header });
    }
    let header_line = (0..line)
        .rev()
        .find(|&l| lines[l].trim_start().starts_with('['))?;
    Some(Duplicate::KeyUnder { header_line })
}

/// The names of the sections of a kind, those with problems of their own included (a
/// typo of a name should show the name meant), for "names no [...] (defined: ...)".
fn defined<'a>(working: impl Iterator<Item = &'a String>, broken: &'a BTreeSet<String>) -> String {
    let names: BTreeSet<&String> = working.chain(broken).collect();
    match names.is_empty() {
        true => "none".into(),
        false => names.into_iter().cloned().collect::<Vec<_>>().join(", "),
    }
}

impl Builder {
    fn read_file(&mut self, file: &Path, text: &str, env: EnvLookup<'_>) {
        let mut problems = FileProblems::new(file, text);
        let (document, errors) = DeTable::parse_recoverable(text);
        if !errors.is_empty() {
            let mut duplicated_headers = std::collections::BTreeSet::new();
            for err in errors {
                match duplicate_table(text, &err) {
                    Some(Duplicate::Header { line, header }) => {
                        duplicated_headers.insert(line);
                        let hint = match header.strip_prefix('[').and_then(|h| h.strip_suffix(']'))
                        {
                            Some(name) if !header.starts_with("[[") => format!(
                                "table {header} is defined twice; for several, write [[{name}]] before each one (an array of tables)"
                            ),
                            Some(name) => format!(
                                "table {header} is defined twice: an earlier [{}] (one table) is in the way; for several, write {header} before each one, the first one too",
                                name.trim_start_matches('[').trim_end_matches(']')
                            ),
                            None => format!("table {header} is defined twice"),
                        };
                        problems.at(err.span(), hint);
                    }
                    // A key of a table already reported as defined twice: one line says it.
                    Some(Duplicate::KeyUnder { header_line })
                        if duplicated_headers.contains(&header_line) => {}
                    _ => problems.at(err.span(), err.message()),
                }
            }
            self.problems.extend(problems.found);
            self.warnings.extend(problems.warnings);
            return;
        }
        for (key, value) in document.into_inner() {
            let origin = Origin {
                file: file.to_owned(),
                line: problems.line(key.span().start),
            };
            match key.get_ref().as_ref() {
                "server" => self.read_server(value, origin, &mut problems),
                "upstream" => self.read_upstreams(value, file, env, &mut problems),
                "source" => self.read_sources(value, file, env, &mut problems),
                "rule" => self.read_rules(value, file, env, &mut problems),
                "delivery" => self.read_delivery(value, origin, &mut problems),
                "store" => {
                    if let Some((_, first)) = &self.store {
                        problems.at(
                            Some(key.span()),
                            format!("[store] is already defined at {first}"),
                        );
                    } else {
                        let read =
                            store::read(value, env, self.resolve_secrets, &mut problems);
                        self.store = Some((read, origin));
                    }
                }
                "admin" => {
                    let span = key.span();
                    if let Some(raw) = section::<admin::RawAdmin>(value, &mut problems) {
                        if let Some((_, first)) = &self.admin {
                            problems.at(Some(span), format!("[admin] is already defined at {first}"));
                        } else {
                            let secrets = self.resolve_secrets.then_some(env);
                            let compiled = admin::compile(raw, secrets, &mut problems);
                            self.admin = Some((compiled, origin));
                        }
                    }
                }
                "gateway" => {
                    if let Some(raw) = section::<gateway::RawGateway>(value, &mut problems) {
                        if let Some((_, first)) = &self.gateway {
                            problems.at(
                                Some(key.span()),
                                format!("[gateway] is already defined at {first}"),
                            );
                        } else {
                            self.gateway = Some((gateway::read(raw, &mut problems), origin));
                        }
                    }
                }
                other => problems.at(
                    Some(key.span()),
                    format!(
                        "unknown section `{other}`; expected `server`, `upstream`, `gateway`, `source`, `rule`, `delivery`, `store` or `admin`"
                    ),
                ),
            }
        }
        self.problems.extend(problems.found);
        self.warnings.extend(problems.warnings);
    }

    fn read_server(
        &mut self,
        value: Spanned<DeValue<'_>>,
        origin: Origin,
        problems: &mut FileProblems<'_>,
    ) {
        let span = value.span();
        let Some(raw) = section::<server::RawServer>(value, problems) else {
            return;
        };
        if let Some((_, first)) = &self.server {
            problems.at(
                Some(span),
                format!("[server] is already defined at {first}"),
            );
            return;
        }
        let server = server::compile(raw, problems);
        self.server = Some((server, origin));
    }

    fn read_upstreams(
        &mut self,
        value: Spanned<DeValue<'_>>,
        file: &Path,
        env: EnvLookup<'_>,
        problems: &mut FileProblems<'_>,
    ) {
        let defined = |name: &str| self.upstreams.get(name).map(|(_, origin)| origin.clone());
        let tables = named_tables::<upstream::RawUpstream>(
            "upstream",
            value,
            file,
            &defined,
            &mut self.broken_upstreams,
            problems,
        );
        for (name, raw, origin) in tables {
            let secrets = self.resolve_secrets.then_some(env);
            match upstream::compile(&name, raw, env, secrets, problems) {
                Some(upstream) => _ = self.upstreams.insert(name, (upstream, origin)),
                None => _ = self.broken_upstreams.insert(name),
            }
        }
    }

    fn read_sources(
        &mut self,
        value: Spanned<DeValue<'_>>,
        file: &Path,
        env: EnvLookup<'_>,
        problems: &mut FileProblems<'_>,
    ) {
        let defined = |name: &str| self.sources.get(name).map(|(_, origin)| origin.clone());
        let env = self.resolve_secrets.then_some(env);
        let tables = named_tables::<source::RawSource>(
            "source",
            value,
            file,
            &defined,
            &mut self.broken_sources,
            problems,
        );
        for (name, raw, origin) in tables {
            // The store names the gateway's, the scheduler's and the dashboard's records so.
            if matches!(name.as_str(), "gateway" | "schedule" | "admin") {
                problems.found.push(Problem {
                    file: origin.file.clone(),
                    line: Some(origin.line),
                    message: format!(
                        "[source.{name}]: `{name}` names hookrelay's own records in the store; choose another name"
                    ),
                });
                self.broken_sources.insert(name);
                continue;
            }
            match source::compile_source(&name, raw, env, problems) {
                Some(compiled) => _ = self.sources.insert(name, (compiled, origin)),
                None => _ = self.broken_sources.insert(name),
            }
        }
    }

    fn read_delivery(
        &mut self,
        value: Spanned<DeValue<'_>>,
        origin: Origin,
        problems: &mut FileProblems<'_>,
    ) {
        let span = value.span();
        let Some(raw) = section::<delivery::RawDelivery>(value, problems) else {
            return;
        };
        if let Some((_, first)) = &self.delivery {
            problems.at(
                Some(span),
                format!("[delivery] is already defined at {first}"),
            );
            return;
        }
        self.delivery = Some((delivery::compile(raw, problems), origin));
    }

    fn read_rules(
        &mut self,
        value: Spanned<DeValue<'_>>,
        file: &Path,
        env: EnvLookup<'_>,
        problems: &mut FileProblems<'_>,
    ) {
        let span = value.span();
        let DeValue::Array(items) = value.into_inner() else {
            problems.at(Some(span), "rules are written as [[rule]] tables");
            return;
        };
        let env = self.resolve_secrets.then_some(env);
        for item in items {
            let span = item.span();
            let line = problems.line(span.start);
            let DeValue::Table(table) = item.into_inner() else {
                problems.at(Some(span), "rules are written as [[rule]] tables");
                continue;
            };
            // `trigger` is one table or an array of them; the rest is the rule itself.
            let mut rest = DeTable::new();
            let mut trigger = None;
            for (key, value) in table {
                if key.get_ref().as_ref() == "trigger" {
                    trigger = Some(value);
                } else {
                    rest.insert(key, value);
                }
            }
            let raw = section::<rule::RawRule>(
                Spanned::new(span.clone(), DeValue::Table(rest)),
                problems,
            );
            let mut triggers = Vec::new();
            // A trigger written but unreadable has its own problem already; the rule is
            // not also told it has none.
            let triggers_written = trigger.is_some();
            if let Some(trigger) = trigger {
                let trigger_span = trigger.span();
                match trigger.into_inner() {
                    DeValue::Table(table) => {
                        triggers.extend(section::<rule::RawTrigger>(
                            Spanned::new(trigger_span, DeValue::Table(table)),
                            problems,
                        ));
                    }
                    DeValue::Array(array) => {
                        for item in array {
                            triggers.extend(section::<rule::RawTrigger>(item, problems));
                        }
                    }
                    _ => problems.at(
                        Some(trigger_span),
                        "`trigger` is a [rule.trigger] table or [[rule.trigger]] tables",
                    ),
                }
            }
            if let Some(raw) = raw
                && let Some(pending) =
                    rule::compile_rule(raw, triggers, triggers_written, file, line, env, problems)
            {
                self.rules.push(pending);
            }
        }
    }

    /// Why `source`'s commit statuses for pipelines on `upstream` would stay `pending`:
    /// nothing tells hookrelay how those pipelines go on (no source of their pipeline
    /// events, no `read_token` to poll them).
    fn statuses_stay_pending(
        sources: &BTreeMap<String, (SourceConfig, Origin)>,
        upstreams: &BTreeMap<String, (UpstreamConfig, Origin)>,
        source: &str,
        upstream: &str,
    ) -> Option<String> {
        let (source, _) = sources.get(source)?;
        source.status.as_ref()?;
        let (upstream_config, _) = upstreams.get(upstream)?;
        let told = sources
            .values()
            .any(|(other, _)| other.pipelines_of.as_deref() == Some(upstream));
        if told || upstream_config.read_token.is_some() {
            return None;
        }
        Some(format!(
            "source {:?} posts commit statuses, but nothing tells hookrelay how pipelines on upstream {upstream:?} go on, \
             so they would stay pending: add a GitLab source of its pipeline events (`upstream = \"{upstream}\"`) \
             or a `read_token` to [upstream.{upstream}] (see \"Show the pipeline on the commit\")",
            source.name
        ))
    }

    /// Checks what rules name (sources, upstreams, other rules' names) and compiles them.
    fn finish_rules(&mut self) -> crate::rules::RuleSet {
        let mut specs = Vec::new();
        let mut names: BTreeMap<String, Origin> = BTreeMap::new();
        let mut problems = Vec::new();
        let mut warnings = Vec::new();
        // Sources whose statuses would never move past `pending`, warned about once each.
        let mut stuck_statuses = std::collections::BTreeSet::new();
        for pending in std::mem::take(&mut self.rules) {
            let mut spec = pending.spec;
            let at = |line: usize, message: String| Problem {
                file: spec.file.clone(),
                line: Some(line),
                message,
            };
            if let Some(first) = names.get(&spec.name) {
                let message = format!("rule name {:?} is already used at {first}", spec.name);
                problems.push(at(spec.line, message));
                continue;
            }
            names.insert(
                spec.name.clone(),
                Origin {
                    file: spec.file.clone(),
                    line: spec.line,
                },
            );
            let mut ok = self.match_sources(&mut spec, pending.source_line, &mut problems);
            for trigger in pending.triggers {
                let Some(trigger_spec) = self.with_upstream(&spec, trigger, &mut problems) else {
                    ok = false;
                    continue;
                };
                for source in &spec.sources {
                    let key = (source.clone(), trigger_spec.upstream.clone());
                    if !stuck_statuses.contains(&key)
                        && let Some(message) = Builder::statuses_stay_pending(
                            &self.sources,
                            &self.upstreams,
                            source,
                            &trigger_spec.upstream,
                        )
                    {
                        stuck_statuses.insert(key);
                        warnings.push(Problem {
                            file: spec.file.clone(),
                            line: Some(trigger_spec.line),
                            message: format!("rule {:?}: {message}", spec.name),
                        });
                    }
                }
                spec.triggers.push(trigger_spec);
            }
            if ok {
                specs.push(spec);
            }
        }
        self.problems.extend(problems);
        self.warnings.extend(warnings);
        match crate::rules::RuleSet::build(specs) {
            Ok(rules) => rules,
            Err(problems) => {
                self.problems.extend(problems.into_iter().map(|p| Problem {
                    file: p.file,
                    line: Some(p.line),
                    message: p.message,
                }));
                crate::rules::RuleSet::default()
            }
        }
    }

    /// Whether every source a rule names is defined; its `repository` patterns then
    /// compare names as its sources do (forges ignoring case, a generic source exactly).
    fn match_sources(
        &self,
        spec: &mut crate::rules::RuleSpec,
        source_line: usize,
        problems: &mut Vec<Problem>,
    ) -> bool {
        let mut problem = |message: String| {
            problems.push(Problem {
                file: spec.file.clone(),
                line: Some(source_line),
                message,
            })
        };
        let mut ok = true;
        let mut ignore_case = Vec::new();
        for source in &spec.sources {
            if let Some((defined, _)) = self.sources.get(source) {
                ignore_case.push((source, defined.provider.repository_names_ignore_case()));
            } else if self.broken_sources.contains(source) {
                // Its own problems are reported where it is.
                ok = false;
            } else {
                problem(format!(
                    "rule {:?}: source {source:?} names no [source.{source}] (defined: {})",
                    spec.name,
                    defined(self.sources.keys(), &self.broken_sources)
                ));
                ok = false;
            }
        }
        let exact = ignore_case.iter().find(|(_, ignores)| !ignores);
        let ignoring = ignore_case.iter().find(|(_, ignores)| *ignores);
        match (exact, ignoring) {
            (None, Some(_)) => {
                spec.repository = spec
                    .repository
                    .take()
                    .map(crate::rules::Patterns::ignoring_case)
            }
            (Some((exact, _)), Some((ignoring, _))) if spec.repository.is_some() => {
                problem(format!(
                    "rule {:?}: `repository` would match {ignoring:?}'s names ignoring case and \
                     {exact:?}'s exactly (a generic source); write a rule for each",
                    spec.name
                ));
                ok = false;
            }
            _ => {}
        }
        ok
    }

    /// A rule's trigger with the upstream it sends to: the one it names, or the only one
    /// there is. `None` when that cannot be told (a problem is recorded, unless the
    /// upstream's own problems are).
    fn with_upstream(
        &self,
        spec: &crate::rules::RuleSpec,
        trigger: rule::PendingTrigger,
        problems: &mut Vec<Problem>,
    ) -> Option<crate::rules::TriggerSpec> {
        let mut trigger_spec = trigger.spec;
        let upstream_names = self
            .upstreams
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        let broken_upstreams = !self.broken_upstreams.is_empty();
        let mut problem = |line: usize, message: String| {
            problems.push(Problem {
                file: spec.file.clone(),
                line: Some(line),
                message,
            });
            None
        };
        match trigger.upstream {
            // Its own problems are reported where it is.
            Some((name, _))
                if !self.upstreams.contains_key(&name) && self.broken_upstreams.contains(&name) =>
            {
                None
            }
            Some((name, line)) if !self.upstreams.contains_key(&name) => problem(
                line,
                format!(
                    "rule {:?}: upstream {name:?} names no [upstream.{name}] (defined: {})",
                    spec.name,
                    defined(self.upstreams.keys(), &self.broken_upstreams)
                ),
            ),
            Some((name, _)) => {
                trigger_spec.upstream = name;
                Some(trigger_spec)
            }
            None if self.upstreams.len() == 1 && !broken_upstreams => {
                trigger_spec.upstream = upstream_names;
                Some(trigger_spec)
            }
            // Which upstream is meant depends on the ones with problems.
            None if broken_upstreams => None,
            None => problem(
                trigger_spec.line,
                if self.upstreams.is_empty() {
                    format!(
                        "rule {:?}: a trigger needs an [upstream.NAME] to send to",
                        spec.name
                    )
                } else {
                    format!(
                        "rule {:?}: the trigger needs `upstream = \"NAME\"`, one of: {upstream_names}",
                        spec.name
                    )
                },
            ),
        }
    }

    /// A source's `compare` asks the forge only for rules with path filters: without one,
    /// the token is read and never used, which is worth saying.
    fn warn_of_compare_without_paths(&mut self, rules: &crate::rules::RuleSet) {
        for (name, (source, origin)) in &self.sources {
            if source.compare.is_some() && !rules.filters_paths_of(name) {
                self.warnings.push(Problem {
                    file: origin.file.clone(),
                    line: Some(origin.line),
                    message: format!(
                        "source.{name}.compare: no rule of this source has `paths` or `paths_exclude`, so the forge is never asked"
                    ),
                });
            }
        }
    }

    /// A listener on this machine alone (`[server] listen` or `admin.listen` on loopback)
    /// is reached through a proxy here: an `allow_from` that does not name this machine
    /// would refuse every request unless `trusted_proxies` names the proxy. Said once per
    /// list.
    fn warn_of_allow_from_behind_an_untrusted_proxy(
        &mut self,
        trusted_proxies: &[ipnet::IpNet],
        gateway: Option<(&GatewayConfig, &Origin)>,
    ) {
        if networks::names_this_machine(trusted_proxies) {
            return;
        }
        let listen = self.flags.listen.unwrap_or_else(|| {
            self.server.as_ref().map_or_else(
                || ServerConfig::default().listen,
                |(server, _)| server.listen,
            )
        });
        let listen_setting = if self.flags.listen.is_some() {
            "--listen"
        } else {
            "[server] listen"
        };
        let admin_flag = self.flags.admin_listen;
        let lists = self
            .sources
            .iter()
            .map(|(name, (source, origin))| {
                let setting = format!("source.{name}.allow_from");
                (
                    setting,
                    &source.allow_from,
                    source.allow_github_hooks,
                    origin,
                    listen,
                    listen_setting,
                )
            })
            .chain(gateway.map(|(gateway, origin)| {
                let setting = "[gateway] allow_from".to_owned();
                (
                    setting,
                    &gateway.allow_from,
                    false,
                    origin,
                    listen,
                    listen_setting,
                )
            }))
            .chain(self.admin.iter().filter_map(|(admin, origin)| {
                let admin = admin.as_ref()?;
                let setting = "admin.allow_from".to_owned();
                Some((
                    setting,
                    &admin.allow_from,
                    false,
                    origin,
                    admin_flag.unwrap_or(admin.listen),
                    if admin_flag.is_some() {
                        "--admin-listen"
                    } else {
                        "admin.listen"
                    },
                ))
            }));
        let mut warnings = Vec::new();
        for (setting, allow_from, github, origin, listen, listen_setting) in lists {
            if listen.ip().is_loopback()
                && (!allow_from.is_empty() || github)
                && !networks::names_this_machine(allow_from)
            {
                warnings.push(Problem {
                    file: origin.file.clone(),
                    line: Some(origin.line),
                    message: format!(
                        "{setting} does not name this machine, yet {listen_setting} ({listen}) takes connections from this machine alone: \
                         behind a proxy here every request would come from it and be refused; \
                         list the proxy in [server] trusted_proxies = [\"127.0.0.1\"]"
                    ),
                });
            }
        }
        self.warnings.extend(warnings);
    }

    fn finish(mut self, files: Vec<PathBuf>) -> Result<Config, Problems> {
        let rules = self.finish_rules();
        self.warn_of_compare_without_paths(&rules);
        let store = match (self.store.take(), self.store_from_env.take()) {
            (Some((read, origin)), _) => {
                // A send starts only while its claim has the upstream's timeout left.
                if let Some(store) = &read
                    && let Some(slowest) = self
                        .upstreams
                        .values()
                        .map(|(u, _)| u)
                        .max_by_key(|u| u.timeout)
                    && store.lease < slowest.timeout + Duration::from_secs(1)
                {
                    self.problems.push(Problem {
                        file: origin.file.clone(),
                        line: Some(origin.line),
                        message: format!(
                            "store.lease ({}) must be at least 1s longer than upstream.{}.timeout ({}): \
                             a relay starts a send only while its claim outlasts the call",
                            humantime::format_duration(store.lease),
                            slowest.name,
                            humantime::format_duration(slowest.timeout)
                        ),
                    });
                }
                read
            }
            (None, Some(Ok(config))) => Some(config),
            (None, Some(Err(message))) => {
                self.problems.push(Problem {
                    file: PathBuf::from(STORE_URL_ENV),
                    line: None,
                    message,
                });
                None
            }
            (None, None) => None,
        };
        for (name, (source, origin)) in &self.sources {
            if let Some(upstream) = &source.pipelines_of
                && !self.upstreams.contains_key(upstream)
                && !self.broken_upstreams.contains(upstream)
            {
                self.problems.push(Problem {
                    file: origin.file.clone(),
                    line: Some(origin.line),
                    message: format!(
                        "source.{name}.upstream: {upstream:?} names no [upstream.{upstream}] (defined: {})",
                        defined(self.upstreams.keys(), &self.broken_upstreams)
                    ),
                });
            }
        }
        // The proxies `[server]` trusts, and those the gateway's older setting adds.
        let mut trusted_proxies = self
            .server
            .as_mut()
            .map(|(server, _)| std::mem::take(&mut server.trusted_proxies))
            .unwrap_or_default();
        let (gateway, gateway_origin) = match self.gateway.take() {
            Some((mut read, origin)) => {
                trusted_proxies.append(&mut read.trusted_proxies);
                let upstreams: Vec<String> = self.upstreams.keys().cloned().collect();
                let compiled = gateway::compile(
                    read,
                    &origin,
                    &upstreams,
                    &self.broken_upstreams,
                    &mut self.problems,
                );
                (compiled, Some(origin))
            }
            None => (None, None),
        };
        // The dashboard never shares the webhook port: serve would fail to bind it.
        if let Some((Some(admin), origin)) = &self.admin {
            let server_listen = self.server.as_ref().map_or_else(
                || ServerConfig::default().listen,
                |(server, _)| server.listen,
            );
            if admin.listen == server_listen {
                self.problems.push(Problem {
                    file: origin.file.clone(),
                    line: Some(origin.line),
                    message: format!(
                        "admin.listen {} is the webhooks' address too ([server] listen); the dashboard needs a port of its own",
                        admin.listen
                    ),
                });
            }
        }
        self.warn_of_allow_from_behind_an_untrusted_proxy(
            &trusted_proxies,
            gateway.as_ref().zip(gateway_origin.as_ref()),
        );
        if !self.problems.is_empty() {
            // Tables are read in key order; report in the order of the files' lines.
            self.problems
                .sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
            return Err(Problems(self.problems));
        }
        Ok(Config {
            server: ServerConfig {
                trusted_proxies,
                ..self.server.map(|(server, _)| server).unwrap_or_default()
            },
            upstreams: self
                .upstreams
                .into_iter()
                .map(|(name, (upstream, _))| (name, upstream))
                .collect(),
            gateway,
            admin: self.admin.and_then(|(admin, _)| admin),
            rules,
            delivery: self
                .delivery
                .map(|(delivery, _)| delivery)
                .unwrap_or_default(),
            store,
            sources: self
                .sources
                .into_iter()
                .map(|(name, (source, _))| (name, source))
                .collect(),
            files,
            warnings: {
                let mut warnings = self.warnings;
                warnings.sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
                warnings
            },
        })
    }
}

/// The `[KIND.NAME]` tables of one file, each deserialized, with a valid name that no
/// earlier file defined (`defined` says where one was).
fn named_tables<R: DeserializeOwned>(
    kind: &str,
    value: Spanned<DeValue<'_>>,
    file: &Path,
    defined: &dyn Fn(&str) -> Option<Origin>,
    broken: &mut BTreeSet<String>,
    problems: &mut FileProblems<'_>,
) -> Vec<(String, R, Origin)> {
    let span = value.span();
    let DeValue::Table(table) = value.into_inner() else {
        problems.at(
            Some(span),
            format!("`{kind}` must be tables named [{kind}.NAME]"),
        );
        return Vec::new();
    };
    let mut tables = Vec::new();
    for (name, value) in table {
        let name_span = name.span();
        let name = name.get_ref().to_string();
        if !is_valid_name(&name) {
            problems.at(
                Some(name_span),
                format!("{kind} name {name:?} may use only letters, digits, `-` and `_`"),
            );
            continue;
        }
        if name.len() > LONGEST_NAME {
            problems.at(
                Some(name_span),
                format!(
                    "{kind} name {}… is {} characters long; names may have up to {LONGEST_NAME}",
                    &name[..16],
                    name.len()
                ),
            );
            continue;
        }
        let Some(raw) = section::<R>(value, problems) else {
            broken.insert(name);
            continue;
        };
        if let Some(first) = defined(&name) {
            problems.at(
                Some(name_span),
                format!("[{kind}.{name}] is already defined at {first}"),
            );
            continue;
        }
        let origin = Origin {
            file: file.to_owned(),
            line: problems.line(name_span.start),
        };
        tables.push((name, raw, origin));
    }
    tables
}

/// The longest name of a source or upstream: a name is part of every key and id the
/// store indexes for it (PostgreSQL's index entries hold at most 2,704 bytes).
const LONGEST_NAME: usize = 64;

fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Deserializes one section, recording serde's error (unknown key, wrong type) at its line.
fn section<T: DeserializeOwned>(
    value: Spanned<DeValue<'_>>,
    problems: &mut FileProblems<'_>,
) -> Option<T> {
    let span = value.span();
    match T::deserialize(value.into_deserializer()) {
        Ok(raw) => Some(raw),
        Err(err) => {
            let span = err.span().unwrap_or(span);
            let message = match problems.key_at(span.start) {
                Some(key) => format!("{key}: {}", err.message()),
                None => err.message().to_owned(),
            };
            problems.at(Some(span), message);
            None
        }
    }
}

/// A `coalesce` window; `what` names it in messages (`rule "r": coalesce`,
/// `upstream.gitlab.coalesce`). Over an hour is a warning: each trigger waits that long
/// before it is sent (`100d` for `100s` would hold them for months).
fn coalesce_window(
    field: Option<Spanned<String>>,
    what: &str,
    problems: &mut FileProblems<'_>,
) -> Option<std::time::Duration> {
    let field = field?;
    match parse_duration(field.get_ref()) {
        Ok(window) => {
            if window > std::time::Duration::from_secs(3600) {
                problems.warn(
                    field.span(),
                    format!(
                        "{what}: {:?} holds every trigger that long before it is sent; a push storm settles in minutes (\"2m\")",
                        field.get_ref()
                    ),
                );
            }
            Some(window)
        }
        Err(message) => {
            problems.at(Some(field.span()), format!("{what}: {message}"));
            None
        }
    }
}

/// A secret setting written by reference (`env:NAME`, `file:PATH`, a relative path taken
/// from the file's folder): the reference, and what it resolves to when secrets are read
/// (`None` for `explain`). A reference that is not one, or that cannot be read, is a
/// problem at `span` worded `{what}: …` or `{what} ({reference}): …`, and `None`.
pub(crate) fn secret_setting(
    text: &str,
    span: Option<std::ops::Range<usize>>,
    what: &str,
    resolve_secrets: Option<EnvLookup<'_>>,
    problems: &mut FileProblems<'_>,
) -> Option<(crate::secret::SecretRef, Option<crate::secret::Secret>)> {
    let reference = match crate::secret::SecretRef::parse_in(text, problems.folder()) {
        Ok(reference) => reference,
        Err(reason) => {
            problems.at(span, format!("{what}: {reason}"));
            return None;
        }
    };
    match resolve_secrets.map(|env| reference.resolve_with(env)) {
        None => Some((reference, None)),
        Some(Ok(secret)) => Some((reference, Some(secret))),
        Some(Err(reason)) => {
            problems.at(span, format!("{what} ({reference}): {reason}"));
            None
        }
    }
}

/// Converts an optional string field, recording a problem at its line when it is invalid.
pub(crate) fn typed<T>(
    field: Option<Spanned<String>>,
    default: T,
    problems: &mut FileProblems<'_>,
    convert: impl FnOnce(&str) -> Result<T, String>,
) -> T {
    let Some(field) = field else {
        return default;
    };
    match convert(field.get_ref()) {
        Ok(value) => value,
        Err(message) => {
            problems.at(Some(field.span()), message);
            default
        }
    }
}

#[cfg(test)]
mod tests;
