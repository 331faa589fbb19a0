//! Configuration: every `*.toml` in a folder (or one file), validated into a typed [`Config`].
//!
//! Files are read in name order and form one configuration. Each section is deserialized
//! on its own, so one run reports every problem in every file as `file:line: message`
//! rather than stopping at the first. Nothing past this module re-checks a string from a
//! configuration file: listen addresses, upstream URLs, sizes and durations are typed here.
//! Environment overrides (`HOOKRELAY_UPSTREAM_<NAME>_URL`) are applied before validation,
//! so an override is checked like the value it replaces.

mod problems;
mod rule;
mod source;
mod store;
mod units;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::{DeserializeOwned, IntoDeserializer};
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::sources::SourceConfig;

pub use problems::{FileProblems, Problem, Problems};
pub use store::STORE_URL_ENV;
pub use units::{parse_duration, parse_size};

/// Where `serve` listens when neither the flag, the environment nor a file says.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// GitHub's largest webhook payload; GitLab's own limit is larger.
pub const DEFAULT_MAX_BODY: usize = 25 * 1024 * 1024;
/// Default `[server] body_memory`: room for a few of the largest webhooks at once and many
/// thousands of ordinary ones.
pub const DEFAULT_BODY_MEMORY: usize = 64 * 1024 * 1024;

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
    /// The files this configuration was read from, in the order read.
    pub files: Vec<PathBuf>,
    /// Settings that are valid but cannot do what they look like (a rule that can never
    /// match): `check` lists them and passes, `serve` logs them.
    pub warnings: Vec<Problem>,
}

/// `[server]`: how the relay accepts requests.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Largest request body accepted; larger ones are answered `413`.
    pub max_body: usize,
    /// Request bodies held in memory at once, across all requests; past it, a request waits
    /// briefly for room, then gets `503` with `Retry-After`.
    pub body_memory: usize,
    /// Open connections at most; `None`: derived from the open-file limit at start.
    pub max_connections: Option<usize>,
    /// Time allowed to receive a request's headers and body.
    pub read_timeout: Duration,
    /// Time allowed for in-flight requests to finish after a shutdown signal.
    pub shutdown_timeout: Duration,
    /// `tls_cert` and `tls_key`: serve HTTPS with this certificate chain and key (PEM),
    /// read again at each reload.
    pub tls: Option<ServerTls>,
}

/// The listener's certificate and key files, as configured (relative to the file's folder).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: DEFAULT_LISTEN
                .parse()
                .expect("the default listen address is valid"),
            max_body: DEFAULT_MAX_BODY,
            body_memory: DEFAULT_BODY_MEMORY,
            max_connections: None,
            read_timeout: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(10),
            tls: None,
        }
    }
}

/// `[upstream.NAME]`: a GitLab instance that receives trigger calls.
#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    pub name: String,
    /// Base URL without a trailing slash, e.g. `https://gitlab.example.com` or
    /// `https://example.com/gitlab` for a relative URL root.
    pub url: http::Uri,
    /// Extra PEM certificates to trust (a self-hosted GitLab's CA).
    pub ca_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    /// Time allowed for the whole call: connect, send and read GitLab's answer.
    pub timeout: Duration,
    /// Pipeline-creating calls per project (GitLab.com allows 25 a minute).
    pub per_project: crate::limits::Limit,
    /// Default `coalesce` window for rules' triggers to this upstream.
    pub coalesce: Option<Duration>,
    /// Calls in flight to this upstream at most (gateway calls and triggers together).
    pub max_in_flight: usize,
}

/// Default `[upstream.NAME] max_in_flight`.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 64;

/// The default upstream limit: GitLab.com's 25 pipeline creations a minute per project,
/// queued rather than refused.
pub fn default_per_project() -> crate::limits::Limit {
    crate::limits::Limit {
        rate: crate::limits::Rate::parse("25/min").expect("a valid rate"),
        burst: std::num::NonZeroU32::new(25).expect("not zero"),
        on_limit: crate::limits::OnLimit::Queue,
    }
}

/// `[delivery]`: how the outbox retries and how long it keeps records.
#[derive(Clone, Debug, PartialEq)]
pub struct DeliveryConfig {
    pub retry: crate::outbox::retry::RetryPolicy,
    /// Deliveries (and their delivery ids, for duplicates) are kept this long.
    pub retention: Duration,
    /// Sends in flight at once.
    pub workers: usize,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            retry: crate::outbox::retry::RetryPolicy::default(),
            retention: Duration::from_secs(7 * 24 * 3600),
            workers: 8,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDelivery {
    retry_base: Option<Spanned<String>>,
    retry_cap: Option<Spanned<String>>,
    max_age: Option<Spanned<String>>,
    retention: Option<Spanned<String>>,
    workers: Option<Spanned<u32>>,
}

/// `[gateway]`: the GitLab-compatible trigger endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayConfig {
    /// The `[upstream.NAME]` that receives the calls.
    pub upstream: String,
    /// Calls per project, refused over the limit.
    pub per_project: Option<crate::limits::Limit>,
    /// Calls per client address (the peer, or a trusted proxy's forwarded address).
    pub per_client: Option<crate::limits::Limit>,
    /// Calls per trigger token, for callers behind one address.
    pub per_token: Option<crate::limits::Limit>,
    /// Proxies whose `X-Forwarded-For` names the client.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Largest body of a plain trigger call (the webhook form keeps `[server] max_body`:
    /// its body is someone's webhook, handed to the pipeline as `TRIGGER_PAYLOAD`).
    pub max_body: usize,
}

/// Default `[gateway] max_body`: a trigger call is a token, a ref and some variables.
pub const DEFAULT_GATEWAY_MAX_BODY: usize = 1024 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<Spanned<String>>,
    max_body: Option<Spanned<String>>,
    body_memory: Option<Spanned<String>>,
    max_connections: Option<Spanned<i64>>,
    read_timeout: Option<Spanned<String>>,
    shutdown_timeout: Option<Spanned<String>>,
    tls_cert: Option<Spanned<String>>,
    tls_key: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    url: Spanned<String>,
    ca_file: Option<Spanned<String>>,
    connect_timeout: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    limit: Option<Spanned<RawLimit>>,
    coalesce: Option<Spanned<String>>,
    max_in_flight: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGateway {
    upstream: Option<Spanned<String>>,
    limit: Option<Spanned<RawLimit>>,
    trusted_proxies: Option<Spanned<Vec<String>>>,
    max_body: Option<Spanned<String>>,
}

/// `limit = { … }` in any section; which keys a section allows is checked when compiled.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLimit {
    rate: Option<String>,
    per_project: Option<String>,
    per_client: Option<String>,
    per_token: Option<String>,
    burst: Option<u32>,
    on_limit: Option<String>,
}

/// Compiles the `key` rate of a `limit` table into a [`crate::limits::Limit`].
pub(crate) fn compile_limit(
    raw: &RawLimit,
    key: &str,
    section: &str,
    default_on_limit: crate::limits::OnLimit,
) -> Result<Option<crate::limits::Limit>, String> {
    use crate::limits::{Limit, OnLimit, Rate};
    let text = match key {
        "rate" => &raw.rate,
        "per_project" => &raw.per_project,
        "per_token" => &raw.per_token,
        _ => &raw.per_client,
    };
    let Some(text) = text else { return Ok(None) };
    let rate = Rate::parse(text).map_err(|err| format!("{section} limit.{key}: {err}"))?;
    let burst = match raw.burst {
        None => rate.count,
        Some(burst) => std::num::NonZeroU32::new(burst)
            .ok_or_else(|| format!("{section} limit.burst must be at least 1"))?,
    };
    let on_limit = match raw.on_limit.as_deref() {
        None => default_on_limit,
        Some("reject") => OnLimit::Reject,
        Some("queue") => OnLimit::Queue,
        Some(other) => {
            return Err(format!(
                "{section} limit.on_limit: {other:?} is not \"reject\" or \"queue\""
            ));
        }
    };
    Ok(Some(Limit {
        rate,
        burst,
        on_limit,
    }))
}

/// Refuses the keys of a `limit` table that `section` does not use.
pub(crate) fn only_limit_keys(
    raw: &RawLimit,
    section: &str,
    allowed: &[&str],
) -> Result<(), String> {
    let given = [
        ("rate", raw.rate.is_some()),
        ("per_project", raw.per_project.is_some()),
        ("per_client", raw.per_client.is_some()),
        ("per_token", raw.per_token.is_some()),
        ("on_limit", raw.on_limit.is_some()),
    ];
    for (key, present) in given {
        if present && !allowed.contains(&key) {
            return Err(format!(
                "{section} limit.{key} is not a setting here; use {}",
                allowed.join(", ")
            ));
        }
    }
    Ok(())
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

fn load_with(path: &Path, env: EnvLookup<'_>, resolve_secrets: bool) -> Result<Config, Problems> {
    let files = config_files(path).map_err(|problem| Problems(vec![problem]))?;
    let mut builder = Builder {
        resolve_secrets,
        ..Builder::default()
    };
    for file in &files {
        match std::fs::read_to_string(file) {
            Ok(text) => builder.read_file(file, &text, env),
            Err(err) => builder.problems.push(Problem {
                file: file.clone(),
                line: None,
                message: format!("cannot read: {err}"),
            }),
        }
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
    gateway: Option<(RawGateway, Origin)>,
    sources: BTreeMap<String, (SourceConfig, Origin)>,
    rules: Vec<rule::PendingRule>,
    delivery: Option<(DeliveryConfig, Origin)>,
    /// `[store]` as read (`None` inside: it had problems), and where.
    store: Option<(Option<crate::store::postgres::PostgresConfig>, Origin)>,
    /// `HOOKRELAY_STORE_URL` when no file has `[store]`.
    store_from_env: Option<Result<crate::store::postgres::PostgresConfig, String>>,
    resolve_secrets: bool,
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
                            _ => format!("table {header} is defined twice"),
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
                "gateway" => {
                    if let Some(raw) = section::<RawGateway>(value, &mut problems) {
                        if let Some((_, first)) = &self.gateway {
                            problems.at(
                                Some(key.span()),
                                format!("[gateway] is already defined at {first}"),
                            );
                        } else {
                            self.gateway = Some((raw, origin));
                        }
                    }
                }
                other => problems.at(
                    Some(key.span()),
                    format!(
                        "unknown section `{other}`; expected `server`, `upstream`, `gateway`, `source`, `rule`, `delivery` or `store`"
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
        let Some(raw) = section::<RawServer>(value, problems) else {
            return;
        };
        if let Some((_, first)) = &self.server {
            problems.at(
                Some(span),
                format!("[server] is already defined at {first}"),
            );
            return;
        }
        let defaults = ServerConfig::default();
        let server = ServerConfig {
            listen: typed(raw.listen, defaults.listen, problems, |text| {
                text.parse().map_err(|_| {
                    format!(
                        "listen: {text:?} is not an address; write IP:PORT, e.g. \"127.0.0.1:8080\""
                    )
                })
            }),
            max_body: typed(raw.max_body, defaults.max_body, problems, |text| {
                parse_size(text).map_err(|err| format!("max_body: {err}"))
            }),
            body_memory: typed(raw.body_memory, defaults.body_memory, problems, |text| {
                parse_size(text).map_err(|err| format!("body_memory: {err}"))
            }),
            max_connections: match raw.max_connections {
                None => None,
                Some(n) if *n.get_ref() >= 1 => Some(*n.get_ref() as usize),
                Some(n) => {
                    problems.at(
                        Some(n.span()),
                        "max_connections must be at least 1".to_owned(),
                    );
                    None
                }
            },
            read_timeout: typed(raw.read_timeout, defaults.read_timeout, problems, |text| {
                parse_duration(text).map_err(|err| format!("read_timeout: {err}"))
            }),
            shutdown_timeout: typed(
                raw.shutdown_timeout,
                defaults.shutdown_timeout,
                problems,
                |text| parse_duration(text).map_err(|err| format!("shutdown_timeout: {err}")),
            ),
            tls: server_tls(raw.tls_cert, raw.tls_key, problems),
        };
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
        for (name, raw, origin) in
            named_tables::<RawUpstream>("upstream", value, file, &defined, problems)
        {
            if let Some(upstream) = compile_upstream(&name, raw, env, problems) {
                self.upstreams.insert(name, (upstream, origin));
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
        for (name, raw, origin) in
            named_tables::<source::RawSource>("source", value, file, &defined, problems)
        {
            if let Some(compiled) = source::compile_source(&name, raw, env, problems) {
                self.sources.insert(name, (compiled, origin));
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
        let Some(raw) = section::<RawDelivery>(value, problems) else {
            return;
        };
        if let Some((_, first)) = &self.delivery {
            problems.at(
                Some(span),
                format!("[delivery] is already defined at {first}"),
            );
            return;
        }
        let defaults = DeliveryConfig::default();
        let duration = |field: Option<Spanned<String>>,
                        default: Duration,
                        key: &str,
                        problems: &mut FileProblems<'_>| {
            typed(field, default, problems, |text| {
                parse_duration(text).map_err(|err| format!("delivery.{key}: {err}"))
            })
        };
        let retry = crate::outbox::retry::RetryPolicy {
            base: duration(raw.retry_base, defaults.retry.base, "retry_base", problems),
            cap: duration(raw.retry_cap, defaults.retry.cap, "retry_cap", problems),
            max_age: duration(raw.max_age, defaults.retry.max_age, "max_age", problems),
        };
        let retention = duration(raw.retention, defaults.retention, "retention", problems);
        let workers = match raw.workers {
            Some(w) if *w.get_ref() == 0 || *w.get_ref() > 256 => {
                problems.at(Some(w.span()), "delivery.workers must be between 1 and 256");
                defaults.workers
            }
            Some(w) => *w.get_ref() as usize,
            None => defaults.workers,
        };
        self.delivery = Some((
            DeliveryConfig {
                retry,
                retention,
                workers,
            },
            origin,
        ));
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
                && let Some(pending) = rule::compile_rule(raw, triggers, file, line, env, problems)
            {
                self.rules.push(pending);
            }
        }
    }

    /// Checks what rules name (sources, upstreams, other rules' names) and compiles them.
    fn finish_rules(&mut self) -> crate::rules::RuleSet {
        let mut specs = Vec::new();
        let mut names: BTreeMap<String, Origin> = BTreeMap::new();
        let upstream_names = self
            .upstreams
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        for pending in std::mem::take(&mut self.rules) {
            let mut spec = pending.spec;
            let mut problem = |line: usize, message: String| {
                self.problems.push(Problem {
                    file: spec.file.clone(),
                    line: Some(line),
                    message,
                })
            };
            if let Some(first) = names.get(&spec.name) {
                problem(
                    spec.line,
                    format!("rule name {:?} is already used at {first}", spec.name),
                );
                continue;
            }
            names.insert(
                spec.name.clone(),
                Origin {
                    file: spec.file.clone(),
                    line: spec.line,
                },
            );
            let mut ok = true;
            if let Some((source, _)) = spec.source.as_ref().and_then(|s| self.sources.get(s))
                && source.provider.repository_names_ignore_case()
            {
                spec.repository = spec
                    .repository
                    .take()
                    .map(crate::rules::Patterns::ignoring_case);
            }
            if let Some(source) = &spec.source
                && !self.sources.contains_key(source)
            {
                let known = self.sources.keys().cloned().collect::<Vec<_>>().join(", ");
                problem(
                    pending.source_line,
                    format!(
                        "rule {:?}: source {source:?} names no [source.{source}] (defined: {})",
                        spec.name,
                        if known.is_empty() { "none" } else { &known }
                    ),
                );
                ok = false;
            }
            for trigger in pending.triggers {
                let mut trigger_spec = trigger.spec;
                match trigger.upstream {
                    Some((name, line)) if !self.upstreams.contains_key(&name) => {
                        problem(
                            line,
                            format!(
                                "rule {:?}: upstream {name:?} names no [upstream.{name}] (defined: {})",
                                spec.name,
                                if upstream_names.is_empty() {
                                    "none"
                                } else {
                                    &upstream_names
                                }
                            ),
                        );
                        ok = false;
                    }
                    Some((name, _)) => trigger_spec.upstream = name,
                    None if self.upstreams.len() == 1 => {
                        trigger_spec.upstream = upstream_names.clone()
                    }
                    None => {
                        problem(
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
                        );
                        ok = false;
                    }
                }
                spec.triggers.push(trigger_spec);
            }
            if ok {
                specs.push(spec);
            }
        }
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

    fn finish(mut self, files: Vec<PathBuf>) -> Result<Config, Problems> {
        let rules = self.finish_rules();
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
        let gateway = match self.gateway.take() {
            None => None,
            Some((raw, origin)) => {
                let line_problem = |message: String| Problem {
                    file: origin.file.clone(),
                    line: Some(origin.line),
                    message,
                };
                let (per_project, per_client, per_token) = match raw
                    .limit
                    .as_ref()
                    .map(|l| l.get_ref())
                {
                    None => (None, None, None),
                    Some(limit) => {
                        let keys = ["per_project", "per_client", "per_token"];
                        let compile = |key| {
                            compile_limit(limit, key, "[gateway]", crate::limits::OnLimit::Reject)
                        };
                        let compiled = only_limit_keys(limit, "[gateway]", &keys).and_then(|()| {
                            Ok((
                                compile("per_project")?,
                                compile("per_client")?,
                                compile("per_token")?,
                            ))
                        });
                        match compiled {
                            Ok(limits) => limits,
                            Err(message) => {
                                self.problems.push(line_problem(message));
                                (None, None, None)
                            }
                        }
                    }
                };
                let mut trusted_proxies = Vec::new();
                for text in raw
                    .trusted_proxies
                    .map(Spanned::into_inner)
                    .unwrap_or_default()
                {
                    let parsed = text
                        .parse::<ipnet::IpNet>()
                        .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
                    match parsed {
                        Ok(net) => trusted_proxies.push(net),
                        Err(_) => self.problems.push(line_problem(format!(
                            "[gateway] trusted_proxies: {text:?} is not an IP address or network (\"10.0.0.0/8\")"
                        ))),
                    }
                }
                let max_body = match raw.max_body {
                    None => DEFAULT_GATEWAY_MAX_BODY,
                    Some(text) => match parse_size(text.get_ref()) {
                        Ok(size) => size,
                        Err(err) => {
                            self.problems
                                .push(line_problem(format!("[gateway] max_body: {err}")));
                            DEFAULT_GATEWAY_MAX_BODY
                        }
                    },
                };
                let gateway = |upstream: String| GatewayConfig {
                    upstream,
                    per_project: per_project.clone(),
                    per_client: per_client.clone(),
                    per_token: per_token.clone(),
                    trusted_proxies: trusted_proxies.clone(),
                    max_body,
                };
                let upstream = raw.upstream;
                let known = self
                    .upstreams
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ");
                match upstream.map(Spanned::into_inner) {
                    Some(name) if self.upstreams.contains_key(&name) => Some(gateway(name)),
                    Some(name) => {
                        self.problems.push(line_problem(format!(
                            "[gateway] upstream = {name:?} names no [upstream.{name}] section (defined: {})",
                            if known.is_empty() { "none" } else { &known }
                        )));
                        None
                    }
                    None if self.upstreams.len() == 1 => Some(gateway(known)),
                    None => {
                        self.problems.push(line_problem(if self.upstreams.is_empty() {
                            "[gateway] needs an [upstream.NAME] section to forward to".into()
                        } else {
                            format!("[gateway] needs `upstream = \"NAME\"` to choose one of: {known}")
                        }));
                        None
                    }
                }
            }
        };
        if !self.problems.is_empty() {
            // Tables are read in key order; report in the order of the files' lines.
            self.problems
                .sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
            return Err(Problems(self.problems));
        }
        Ok(Config {
            server: self.server.map(|(server, _)| server).unwrap_or_default(),
            upstreams: self
                .upstreams
                .into_iter()
                .map(|(name, (upstream, _))| (name, upstream))
                .collect(),
            gateway,
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

fn compile_upstream(
    name: &str,
    raw: RawUpstream,
    env: EnvLookup<'_>,
    problems: &mut FileProblems<'_>,
) -> Option<UpstreamConfig> {
    let env_name = format!(
        "HOOKRELAY_UPSTREAM_{}_URL",
        name.to_ascii_uppercase().replace('-', "_")
    );
    let url_span = raw.url.span();
    let (url_text, from_env) = match env(&env_name) {
        Some(value) => (value, true),
        None => (raw.url.into_inner(), false),
    };
    let url = match parse_upstream_url(&url_text) {
        Ok(url) => Some(url),
        Err(err) => {
            let whence = if from_env {
                format!(" (from {env_name})")
            } else {
                String::new()
            };
            problems.at(
                Some(url_span),
                format!("upstream.{name}.url{whence}: {err}"),
            );
            None
        }
    };
    let ca_file = raw
        .ca_file
        .and_then(|ca| ca_file(ca, &format!("upstream.{name}.ca_file"), problems));
    let connect_timeout = typed(
        raw.connect_timeout,
        Duration::from_secs(5),
        problems,
        |text| parse_duration(text).map_err(|err| format!("connect_timeout: {err}")),
    );
    let timeout = typed(raw.timeout, Duration::from_secs(30), problems, |text| {
        parse_duration(text).map_err(|err| format!("timeout: {err}"))
    });
    let per_project = match raw.limit {
        None => default_per_project(),
        Some(limit) => {
            let section = format!("[upstream.{name}]");
            let compiled = only_limit_keys(limit.get_ref(), &section, &["per_project", "on_limit"])
                .and_then(|()| {
                    compile_limit(
                        limit.get_ref(),
                        "per_project",
                        &section,
                        crate::limits::OnLimit::Queue,
                    )
                });
            match compiled {
                Ok(Some(limit)) => limit,
                Ok(None) => default_per_project(),
                Err(message) => {
                    problems.at(Some(limit.span()), message);
                    default_per_project()
                }
            }
        }
    };
    let coalesce = raw
        .coalesce
        .and_then(|c| match parse_duration(c.get_ref()) {
            Ok(window) => Some(window),
            Err(message) => {
                problems.at(
                    Some(c.span()),
                    format!("upstream.{name}.coalesce: {message}"),
                );
                None
            }
        });
    let max_in_flight = match raw.max_in_flight {
        None => DEFAULT_MAX_IN_FLIGHT,
        Some(n) if (1..=10_000).contains(n.get_ref()) => *n.get_ref() as usize,
        Some(n) => {
            problems.at(
                Some(n.span()),
                format!("upstream.{name}.max_in_flight must be between 1 and 10000"),
            );
            DEFAULT_MAX_IN_FLIGHT
        }
    };
    Some(UpstreamConfig {
        name: name.to_owned(),
        url: url?,
        ca_file,
        connect_timeout,
        timeout,
        per_project,
        coalesce,
        max_in_flight,
    })
}

/// `tls_cert` and `tls_key`: both or neither, relative to the file's folder, a chain and the
/// key that goes with it.
fn server_tls(
    cert: Option<Spanned<String>>,
    key: Option<Spanned<String>>,
    problems: &mut FileProblems<'_>,
) -> Option<ServerTls> {
    let (cert, key) = match (cert, key) {
        (None, None) => return None,
        (Some(cert), Some(key)) => (cert, key),
        (Some(only), None) | (None, Some(only)) => {
            problems.at(
                Some(only.span()),
                "tls_cert and tls_key go together: the certificate chain and its private key (PEM)",
            );
            return None;
        }
    };
    let span = cert.span();
    let tls = ServerTls {
        cert: problems.folder().join(cert.into_inner()),
        key: problems.folder().join(key.into_inner()),
    };
    match crate::tls::read_server_certificate(&tls.cert, &tls.key) {
        Ok(_) => Some(tls),
        Err(err) => {
            problems.at(Some(span), format!("tls_cert: {err}"));
            None
        }
    }
}

/// A `ca_file` setting: a path relative to the folder of the file that names it, holding
/// at least one PEM certificate.
pub(crate) fn ca_file(
    field: Spanned<String>,
    key: &str,
    problems: &mut FileProblems<'_>,
) -> Option<PathBuf> {
    let span = field.span();
    let path = problems.folder().join(field.into_inner());
    match crate::tls::read_ca_file(&path) {
        Ok(_) => Some(path),
        Err(err) => {
            problems.at(Some(span), format!("{key}: {err}"));
            None
        }
    }
}

/// An upstream base URL: `http` or `https`, a host, an optional path prefix, no query.
pub fn parse_upstream_url(text: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = text
        .parse()
        .map_err(|_| format!("{text:?} is not a URL; write e.g. \"https://gitlab.example.com\""))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(format!("{text:?} must start with https:// or http://")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{text:?} has no host"));
    }
    if uri.query().is_some() {
        return Err(format!("{text:?} must not have a query string"));
    }
    let trimmed = text.trim_end_matches('/');
    trimmed
        .parse()
        .map_err(|_| format!("{text:?} is not a URL"))
}

/// The `[KIND.NAME]` tables of one file, each deserialized, with a valid name that no
/// earlier file defined (`defined` says where one was).
fn named_tables<R: DeserializeOwned>(
    kind: &str,
    value: Spanned<DeValue<'_>>,
    file: &Path,
    defined: &dyn Fn(&str) -> Option<Origin>,
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
        let Some(raw) = section::<R>(value, problems) else {
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
            problems.at(err.span().or(Some(span)), err.message());
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
mod tests {
    use super::*;

    fn load_text(files: &[(&str, &str)], env: &[(&str, &str)]) -> Result<Config, Problems> {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let lookup = move |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        let prefix = format!("{}/", dir.path().display());
        load_with_env(dir.path(), &lookup).map_err(|problems| {
            // Strip the temporary folder so messages compare stably.
            Problems(
                problems
                    .0
                    .into_iter()
                    .map(|mut p| {
                        p.file = PathBuf::from(p.file.file_name().unwrap());
                        p.message = p.message.replace(&prefix, "");
                        p
                    })
                    .collect(),
            )
        })
    }

    fn messages(result: Result<Config, Problems>) -> Vec<String> {
        result
            .unwrap_err()
            .0
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn a_complete_configuration() {
        let config = load_text(
            &[(
                "a.toml",
                r#"
[server]
listen = "127.0.0.1:9000"
max_body = "1MiB"

[upstream.gitlab]
url = "https://gitlab.example.com/"
timeout = "10s"

[gateway]
upstream = "gitlab"
"#,
            )],
            &[],
        )
        .unwrap();
        assert_eq!(config.server.listen.to_string(), "127.0.0.1:9000");
        assert_eq!(config.server.max_body, 1 << 20);
        let upstream = &config.upstreams["gitlab"];
        assert_eq!(upstream.url.to_string(), "https://gitlab.example.com/");
        assert_eq!(upstream.timeout, Duration::from_secs(10));
        let gateway = config.gateway.unwrap();
        assert_eq!(gateway.upstream, "gitlab");
        assert_eq!(gateway.per_project, None);
        assert_eq!(upstream.per_project, default_per_project());
    }

    #[test]
    fn every_problem_in_every_file_with_its_line() {
        let problems = messages(load_text(
            &[
                (
                    "a.toml",
                    "[server]\nlisten = \"nowhere\"\nmax_body = \"lots\"\n",
                ),
                (
                    "b.toml",
                    "[upstream.gitlab]\nurl = \"ftp://x\"\ncolour = \"red\"\n\n[gateway]\nupstream = \"gitlab\"\n",
                ),
                (
                    "c.toml",
                    "[upstream.other]\nurl = \"https://x\"\n[gateway]\nupstream = \"nope\"\n[mystery]\n",
                ),
            ],
            &[],
        ));
        assert_eq!(problems.len(), 6, "{problems:#?}");
        let expected = [
            "a.toml:2: listen: \"nowhere\" is not an address",
            "a.toml:3: max_body:",
            "b.toml:3: unknown field `colour`",
            "b.toml:5: [gateway] upstream = \"gitlab\" names no [upstream.gitlab]",
            "c.toml:3: [gateway] is already defined at",
            "c.toml:5: unknown section `mystery`",
        ];
        for (problem, expected) in problems.iter().zip(expected) {
            assert!(
                problem.starts_with(expected),
                "{problem:?} should start with {expected:?}"
            );
        }
    }

    #[test]
    fn syntax_errors_are_located() {
        let problems = messages(load_text(&[("a.toml", "[server]\nlisten = \n")], &[]));
        assert!(problems[0].starts_with("a.toml:2: "), "{problems:?}");
    }

    #[test]
    fn environment_overrides_the_upstream_url_and_is_validated() {
        let file = [(
            "a.toml",
            "[upstream.my-gitlab]\nurl = \"https://a.example\"\n",
        )];
        let config = load_text(
            &file,
            &[("HOOKRELAY_UPSTREAM_MY_GITLAB_URL", "http://127.0.0.1:1")],
        )
        .unwrap();
        assert_eq!(
            config.upstreams["my-gitlab"].url.to_string(),
            "http://127.0.0.1:1/"
        );
        let problems = messages(load_text(
            &file,
            &[("HOOKRELAY_UPSTREAM_MY_GITLAB_URL", "nope")],
        ));
        assert!(
            problems[0].contains("(from HOOKRELAY_UPSTREAM_MY_GITLAB_URL)"),
            "{problems:?}"
        );
    }

    #[test]
    fn gateway_defaults_to_the_only_upstream() {
        let config = load_text(
            &[("a.toml", "[upstream.gl]\nurl = \"https://x\"\n[gateway]\n")],
            &[],
        )
        .unwrap();
        assert_eq!(config.gateway.unwrap().upstream, "gl");
        let problems = messages(load_text(&[("a.toml", "[gateway]\n")], &[]));
        assert!(
            problems[0].contains("needs an [upstream.NAME]"),
            "{problems:?}"
        );
    }

    #[test]
    fn duplicate_upstreams_across_files() {
        let problems = messages(load_text(
            &[
                ("a.toml", "[upstream.gl]\nurl = \"https://x\"\n"),
                ("b.toml", "\n[upstream.gl]\nurl = \"https://y\"\n"),
            ],
            &[],
        ));
        assert_eq!(
            problems,
            ["b.toml:2: [upstream.gl] is already defined at a.toml:1"]
        );
    }

    #[test]
    fn an_empty_folder_is_a_problem() {
        let dir = tempfile::tempdir().unwrap();
        let problems = load(dir.path()).unwrap_err();
        assert!(problems.to_string().contains("contains no *.toml files"));
    }

    #[test]
    fn sources_resolve_their_secrets_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("gh-secret");
        std::fs::write(&secret, "s3cret-s3cret-s3cret\n").unwrap();
        let text = format!(
            "[source.gh]\nprovider = \"github\"\nsecret = \"file:{}\"\n[source.gl]\nprovider = \"gitlab\"\nsecret = \"env:GL_TOKEN\"\nsigning_secret = \"env:GL_SIGNING\"\n",
            secret.display()
        );
        let config = load_text(
            &[("a.toml", &text)],
            &[
                ("GL_TOKEN", "a-gitlab-token-of-32-characters!"),
                ("GL_SIGNING", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            ],
        );
        let config = config.unwrap();
        assert_eq!(
            config.sources["gh"].secret.as_ref().unwrap().expose(),
            "s3cret-s3cret-s3cret"
        );
        assert_eq!(
            config.sources["gl"].secret.as_ref().unwrap().expose(),
            "a-gitlab-token-of-32-characters!"
        );
        // Too short, or only whitespace: refused where it is configured.
        for (value, expected) in [
            (
                "short",
                "the secret is 5 bytes; a webhook secret needs at least 16",
            ),
            ("                    ", "the secret is only whitespace"),
        ] {
            let problems = messages(load_text(
                &[("a.toml", &text)],
                &[
                    ("GL_TOKEN", value),
                    ("GL_SIGNING", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
                ],
            ));
            assert_eq!(problems.len(), 1, "{problems:#?}");
            assert!(
                problems[0].starts_with("a.toml:6: source.gl.secret: ")
                    && problems[0].contains(expected),
                "{problems:?}"
            );
        }
        assert!(config.sources["gl"].signing_key.is_some());
        let problems = messages(load_text(&[("a.toml", &text)], &[]));
        assert_eq!(problems.len(), 2, "{problems:#?}");
        assert!(problems[0].starts_with("a.toml:6: source.gl.secret (env:GL_TOKEN): environment variable GL_TOKEN is not set"), "{problems:?}");
    }

    #[test]
    fn source_problems_are_specific() {
        let problems = messages(load_text(
            &[(
                "a.toml",
                r#"[source.a]
provider = "githab"

[source.b]
provider = "github"
secret = "hunter2"

[source.c]
provider = "gitlab"
allow_sha1 = true
secret = "file:/nonexistent/secret"

[source.d]
provider = "gitea"

[source.e]
provider = "generic"
signature = { scheme = "token" }
secret = "file:/nonexistent/secret"

[source."bad name"]
provider = "github"
allow_unsigned = true
"#,
            )],
            &[],
        ));
        let expected = [
            "a.toml:2: source.a.provider: \"githab\" is not one of",
            "a.toml:6: source.b.secret: a secret must be written `env:NAME` or `file:PATH`",
            "a.toml:10: source.c.allow_sha1 applies only to provider github, not gitlab",
            "a.toml:11: source.c.secret (file:/nonexistent/secret): cannot read secret file",
            "a.toml:14: source.d has no way to check who sent a webhook",
            "a.toml:18: source.e.signature: a token needs `header",
            "a.toml:19: source.e.secret (file:/nonexistent/secret): cannot read secret file",
            "a.toml:21: source name \"bad name\" may use only",
        ];
        for (problem, expected) in problems.iter().zip(expected) {
            assert!(
                problem.starts_with(expected),
                "{problem:?} should start with {expected:?}"
            );
        }
        assert_eq!(problems.len(), expected.len(), "{problems:#?}");
    }

    #[test]
    fn unsigned_sources_must_say_so() {
        let config = load_text(
            &[(
                "a.toml",
                "[source.open]\nprovider = \"bitbucket-server\"\nallow_unsigned = true\n",
            )],
            &[],
        )
        .unwrap();
        assert!(config.sources["open"].allow_unsigned);
    }

    #[test]
    fn rule_names_are_unique_across_files() {
        let rule = "[[rule]]\nname = \"x\"\nschedule = \"0 * * * *\"\n[rule.trigger]\nproject = \"9\"\nref = \"main\"\ntoken = \"env:T\"\n";
        let problems = messages(load_text(
            &[
                (
                    "a.toml",
                    &format!("[upstream.gl]\nurl = \"https://x\"\n{rule}"),
                ),
                ("b.toml", rule),
            ],
            &[("T", "glptt-x")],
        ));
        assert_eq!(
            problems,
            ["b.toml:1: rule name \"x\" is already used at a.toml:3"]
        );
    }

    #[test]
    fn limits_are_checked_where_they_are_written() {
        let problems = messages(load_text(
            &[(
                "a.toml",
                "[upstream.gl]\nurl = \"https://x\"\nlimit = { per_project = \"fast\" }\n\n\
                 [gateway]\nlimit = { rate = \"1/s\" }\ntrusted_proxies = [\"proxy\"]\n\n\
                 [source.s]\nprovider = \"github\"\nallow_unsigned = true\nlimit = { rate = \"2/min\", on_limit = \"later\" }\n",
            )],
            &[],
        ));
        let expected = [
            "a.toml:3: [upstream.gl] limit.per_project: \"fast\" is not a rate",
            "a.toml:5: [gateway] limit.rate is not a setting here; use per_project, per_client, per_token",
            "a.toml:5: [gateway] trusted_proxies: \"proxy\" is not an IP address or network",
            "a.toml:12: [source.s] limit.on_limit: \"later\" is not \"reject\" or \"queue\"",
        ];
        assert_eq!(problems.len(), expected.len(), "{problems:#?}");
        for (problem, expected) in problems.iter().zip(expected) {
            assert!(
                problem.starts_with(expected),
                "{problem:?} should start with {expected:?}"
            );
        }
    }

    #[test]
    fn upstream_urls() {
        assert!(parse_upstream_url("https://gitlab.com").is_ok());
        assert_eq!(
            parse_upstream_url("https://x.org/gitlab/")
                .unwrap()
                .to_string(),
            "https://x.org/gitlab"
        );
        assert!(parse_upstream_url("gitlab.com").is_err());
        assert!(parse_upstream_url("https://x.org/?a=1").is_err());
    }

    #[test]
    fn the_store_is_checked_where_it_is_written_and_never_shows_a_password() {
        let upstream = "[upstream.gitlab]\nurl = \"https://gitlab.example\"\ntimeout = \"30s\"\n";
        let found = messages(load_text(
            &[
                ("a.toml", upstream),
                (
                    "store.toml",
                    "[store]\nurl = \"postgres://hr:hunter2@db/hr\"\nlease = \"10s\"\npassword = \"hunter2\"\n",
                ),
            ],
            &[],
        ));
        assert_eq!(found.len(), 2, "{found:#?}");
        assert!(
            found[0].starts_with("store.toml:2: store.url: a password does not belong in a file"),
            "{found:#?}"
        );
        assert!(
            found[1].starts_with("store.toml:4: store.password: a secret must be written"),
            "{found:#?}"
        );
        assert!(found.iter().all(|m| !m.contains("hunter2")), "{found:#?}");

        let found = messages(load_text(
            &[
                ("a.toml", upstream),
                (
                    "store.toml",
                    "[store]\nurl = \"postgres://hr@db/hr\"\nlease = \"10s\"\n",
                ),
            ],
            &[],
        ));
        assert!(found[0].starts_with("store.toml:1: store.lease (10s) must be at least 1s longer than upstream.gitlab.timeout (30s)"), "{found:#?}");

        let found = messages(load_text(
            &[
                ("a.toml", upstream),
                ("store.toml", "[store]\nurl = \"mysql://db/hr\"\n"),
            ],
            &[],
        ));
        assert!(found[0].contains("is not a PostgreSQL URL"), "{found:#?}");

        // The environment may carry the password, and sets the URL without a [store].
        let config = load_text(
            &[("a.toml", upstream)],
            &[("HOOKRELAY_STORE_URL", "postgres://hr:hunter2@db/hr")],
        )
        .unwrap();
        let store = config.store.unwrap();
        assert_eq!(store.describe(), "postgres://hr:…@db/hr");
        assert!(!format!("{store:?}").contains("hunter2"), "{store:?}");
        let config = load_text(
            &[
                ("a.toml", upstream),
                (
                    "store.toml",
                    "[store]\nurl = \"postgres://hr@db/hr\"\npassword = \"env:DB_PASSWORD\"\n",
                ),
            ],
            &[("DB_PASSWORD", "hunter2")],
        )
        .unwrap();
        assert_eq!(
            config.store.unwrap().lease,
            crate::store::postgres::DEFAULT_LEASE
        );
        let found = messages(load_text(
            &[
                ("a.toml", upstream),
                (
                    "store.toml",
                    "[store]\nurl = \"postgres://hr@db/hr\"\npassword = \"env:DB_PASSWORD\"\n",
                ),
            ],
            &[],
        ));
        assert!(
            found[0].contains(
                "store.password (env:DB_PASSWORD): environment variable DB_PASSWORD is not set"
            ),
            "{found:#?}"
        );
    }

    const GITHUB_AND_GITLAB: &str = "[upstream.gitlab]\nurl = \"https://gitlab.example.com\"\n\
        [source.github]\nprovider = \"github\"\nsecret = \"env:S\"\n\
        [source.other]\nprovider = \"generic\"\nsignature = { scheme = \"token\", header = \"X-Token\" }\nsecret = \"env:S\"\n";
    const SECRETS: &[(&str, &str)] = &[("S", "0123456789abcdef0123"), ("T", "glptt-0123456789")];

    fn warnings(config: &Config) -> Vec<String> {
        config
            .warnings
            .iter()
            .map(|w| {
                format!(
                    "{}:{}: {}",
                    w.file.file_name().unwrap().to_string_lossy(),
                    w.line.unwrap(),
                    w.message
                )
            })
            .collect()
    }

    #[test]
    fn rules_that_cannot_match_are_warned_about_and_still_load() {
        let rules = r#"[[rule]]
name = "full-refs"
source = "github"
refs = ["refs/heads/main", "v*"]
refs_exclude = "refs/tags/v0*"
[rule.trigger]
project = "acme%2Fapp-a"
ref = "release%2F1.0"
token = "env:T"

[[rule]]
name = "url"
source = "github"
repository = ["https://github.com/acme/app", "acme/app.git"]
events = ["delete"]
[rule.trigger]
project = "acme/app"
token = "env:T"
"#;
        let config =
            load_text(&[("a.toml", GITHUB_AND_GITLAB), ("b.toml", rules)], SECRETS).unwrap();
        let found = warnings(&config);
        let expected = [
            "b.toml:4: rule \"full-refs\": refs: \"refs/heads/main\" is a full ref name, but refs are matched by their short name (`main`, `v1.2`), so it never matches; write \"main\"",
            "b.toml:5: rule \"full-refs\": refs_exclude: \"refs/tags/v0*\" is a full ref name",
            "b.toml:7: rule \"full-refs\": project \"acme%2Fapp-a\" looks URL-encoded; hookrelay encodes it when sending, so it would reach GitLab encoded twice; write \"acme/app-a\"",
            "b.toml:8: rule \"full-refs\": ref \"release%2F1.0\" looks URL-encoded",
            "b.toml:14: rule \"url\": repository: \"https://github.com/acme/app\" never matches",
            "b.toml:14: rule \"url\": repository: \"acme/app.git\" never matches",
            "b.toml:17: rule \"url\": the rule reacts to `delete` but its trigger has no `ref`",
        ];
        for (warning, expected) in found.iter().zip(expected) {
            assert!(
                warning.starts_with(expected),
                "{warning:?} should start with {expected:?}"
            );
        }
        assert_eq!(found.len(), expected.len(), "{found:#?}");
    }

    #[test]
    fn a_table_defined_twice_suggests_an_array_of_tables() {
        let rules = "[[rule]]\nname = \"r\"\nsource = \"github\"\n[rule.trigger]\nproject = \"a/b\"\ntoken = \"env:T\"\n\
            [rule.trigger]\nproject = \"a/c\"\ntoken = \"env:T\"\n[rule.trigger]  # third\nproject = \"a/d\"\ntoken = \"env:T\"\n";
        let found = messages(load_text(
            &[("a.toml", GITHUB_AND_GITLAB), ("b.toml", rules)],
            SECRETS,
        ));
        assert_eq!(
            found,
            [
                "b.toml:7: table [rule.trigger] is defined twice; for several, write [[rule.trigger]] before each one (an array of tables)",
                "b.toml:10: table [rule.trigger] is defined twice; for several, write [[rule.trigger]] before each one (an array of tables)",
            ]
        );
    }

    #[test]
    fn repository_names_follow_each_providers_case_rule() {
        let rules = "[[rule]]\nname = \"forge\"\nsource = \"github\"\nrepository = \"codertocat/hello-world\"\n[rule.trigger]\nproject = \"1\"\ntoken = \"env:T\"\n\
            [[rule]]\nname = \"forge-glob\"\nsource = \"github\"\nrepository = \"codertocat/*\"\n[rule.trigger]\nproject = \"2\"\ntoken = \"env:T\"\n\
            [[rule]]\nname = \"exact\"\nsource = \"other\"\nrepository = \"codertocat/hello-world\"\n[rule.trigger]\nproject = \"3\"\ntoken = \"env:T\"\n";
        let config =
            load_text(&[("a.toml", GITHUB_AND_GITLAB), ("b.toml", rules)], SECRETS).unwrap();
        let event = |source: &str| {
            crate::event::EventContext {
                provider: crate::event::Provider::Github,
                source: source.into(),
                delivery: "d".into(),
                repository: "Codertocat/Hello-World".into(),
                repository_url: String::new(),
                repository_web_url: String::new(),
                pusher: String::new(),
                payload: std::sync::Arc::new(
                    crate::event::Payload::parsed(bytes::Bytes::from_static(b"{}")).unwrap(),
                ),
            }
            .event(crate::event::RefChange {
                full_ref: "refs/heads/main".into(),
                before: "0".repeat(40),
                after: "abcdef0123456789abcdef0123456789abcdef01".into(),
                ..crate::event::RefChange::default()
            })
            .unwrap()
        };
        let matched = |source: &str| -> Vec<String> {
            config
                .rules
                .matching(&event(source))
                .iter()
                .map(|r| r.name().to_owned())
                .collect()
        };
        assert_eq!(
            matched("github"),
            ["forge", "forge-glob"],
            "GitHub names ignore case"
        );
        assert_eq!(
            matched("other"),
            Vec::<String>::new(),
            "a generic sender's names are exact"
        );
        let verdicts = config.rules.verdicts(&event("other"));
        assert_eq!(
            verdicts[0].1.as_deref(),
            Some(
                "repository: \"Codertocat/Hello-World\" matches none of [\"codertocat/hello-world\"]"
            )
        );
    }
}
