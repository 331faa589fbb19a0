//! Metrics at `GET /metrics`, in the OpenMetrics text format Prometheus scrapes.
//!
//! Every name starts with `hookrelay_`. Labels carry only names from the configuration
//! (source, rule, upstream) and fixed words (endpoint, outcome, status code): never a
//! secret, a token, a ref or a repository, so the number of series stays bounded. The
//! outbox gauges are read from the store when scraped.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub endpoint: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub endpoint: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabels {
    pub rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    /// The setting: `[gateway] limit.per_project`, `[source.github] limit.rate`.
    pub limit: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub upstream: String,
    pub code: String,
}

/// Which of GitHub's published lists (`hooks`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListLabels {
    pub list: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamNameLabels {
    pub upstream: String,
}

/// A source and what became of something it did: catch-up's webhooks (`redelivered`,
/// `refused` by the forge, `rejected` by the relay, `left` for the next pass, `failed`),
/// compares (`listed`, `failed`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceOutcomeLabels {
    pub source: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    /// `github`, `gitea`, `bitbucket-cloud`, `bitbucket-server`.
    pub forge: String,
    /// `queued`, `sent`, `retried`, `failed`, `superseded`, `skipped`.
    pub outcome: String,
}

/// Counts per minute over the last hour, by key: what the dashboard's health page draws
/// (per upstream and answer class; per limit that refused). In memory, this relay's own.
#[derive(Default)]
pub struct Recent {
    minutes: std::sync::Mutex<std::collections::BTreeMap<(String, String), MinuteSlots>>,
}

/// One key's last hour: (the minute since 1970, its count), in slots by minute modulo 60.
type MinuteSlots = [(u64, u32); 60];

impl Recent {
    fn add(&self, key: (String, String)) {
        let minute = crate::store::now_ms().max(0) as u64 / 60_000;
        let mut minutes = self.minutes.lock().expect("never poisoned");
        let slots = minutes.entry(key).or_insert([(0, 0); 60]);
        let slot = &mut slots[(minute % 60) as usize];
        if slot.0 != minute {
            *slot = (minute, 0);
        }
        slot.1 += 1;
    }

    /// For each key, 60 counts, the oldest minute first and the current one last.
    pub fn last_hour(&self) -> Vec<((String, String), Vec<u32>)> {
        let now = crate::store::now_ms().max(0) as u64 / 60_000;
        let minutes = self.minutes.lock().expect("never poisoned");
        minutes
            .iter()
            .map(|(key, slots)| {
                let counts = (0..60u64)
                    .map(|ago| {
                        let minute = now.saturating_sub(59 - ago);
                        let slot = slots[(minute % 60) as usize];
                        if slot.0 == minute { slot.1 } else { 0 }
                    })
                    .collect();
                (key.clone(), counts)
            })
            .filter(|(_, counts): &(_, Vec<u32>)| counts.iter().any(|&n| n > 0))
            .collect()
    }
}

/// The values of one `outcome` label, each named once: the call sites count by variant and
/// [`Metrics::start_at_zero`] starts every one of its `WORDS` at 0, so a new outcome
/// cannot be counted without starting at 0 too.
macro_rules! outcomes {
    ($(#[$doc:meta])* $name:ident { $($variant:ident => $word:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $name {
            $($variant),+
        }

        impl $name {
            /// Every value, as the label carries it.
            pub const WORDS: &'static [&'static str] = &[$($word),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $word),+
                }
            }
        }
    };
}

outcomes! {
    /// What happened to a trigger.
    TriggerOutcome {
        Queued => "queued",
        Sent => "sent",
        Failed => "failed",
        Retried => "retried",
        RateLimited => "rate_limited",
        DryRun => "dry_run",
        Coalesced => "coalesced",
    }
}

outcomes! {
    /// How a status post's attempt ended.
    StatusOutcome {
        Sent => "sent",
        Retried => "retried",
        Failed => "failed",
    }
}

outcomes! {
    /// What came of asking a source's forge which files a push changed.
    CompareOutcome {
        Listed => "listed",
        Failed => "failed",
    }
}

outcomes! {
    /// What became of webhooks a catch-up pass found (`Failed`, `HookDisabled`: of the pass).
    CatchUpOutcome {
        Redelivered => "redelivered",
        Refused => "refused",
        Rejected => "rejected",
        Left => "left",
        Failed => "failed",
        HookDisabled => "hook_disabled",
    }
}

outcomes! {
    /// How a poll of a pipeline's status ended.
    PollOutcome {
        Polled => "polled",
        Finished => "finished",
        Retried => "retried",
        Failed => "failed",
        Deferred => "deferred",
    }
}

/// A series of `family`, created at 0 unless it exists.
fn at_zero<L>(family: &Family<L, Counter>, labels: &L)
where
    L: Clone + std::hash::Hash + Eq,
{
    drop(family.get_or_create(labels));
}

/// The names from the configuration that label series (see [`Metrics::start_at_zero`]).
#[derive(Default)]
pub struct KnownSeries<'a> {
    /// Every `[source.NAME]`.
    pub sources: Vec<&'a str>,
    pub rules: Vec<&'a str>,
    /// The forges (`github`, `gitea`, …) that sources post statuses to.
    pub status_forges: Vec<&'a str>,
    /// Sources with `compare`.
    pub compares: Vec<&'a str>,
    /// Sources with `catch_up`.
    pub catch_ups: Vec<&'a str>,
    /// Whether an upstream polls pipelines (`read_token`).
    pub polls: bool,
    /// The endpoints served: `hooks` with sources, `trigger` and `trigger_webhook` with
    /// the gateway.
    pub endpoints: Vec<&'static str>,
    /// The limits that refuse requests (`crate::limits::refusing_settings`).
    pub refusing_limits: Vec<String>,
}

/// Upper bounds of the request duration buckets, in seconds: from well under a millisecond
/// (an acknowledgement on a quiet relay) to GitHub's 10 s timeout.
const REQUEST_SECONDS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

fn request_histogram() -> Histogram {
    Histogram::new(REQUEST_SECONDS)
}

/// All of the relay's metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_seconds: Family<EndpointLabels, Histogram, fn() -> Histogram>,
    signature_failures: Family<SourceLabels, Counter>,
    connections_shed: Counter,
    rule_matches: Family<RuleLabels, Counter>,
    triggers: Family<OutcomeLabels, Counter>,
    upstream_responses: Family<UpstreamLabels, Counter>,
    upstream_down: Family<UpstreamNameLabels, Gauge>,
    /// `list="hooks"` (the list of GitHub's meta it is); no series while no source lists
    /// `"github"` in `allow_from`.
    github_hooks_age: Family<ListLabels, Gauge>,
    delivery_latency: Histogram,
    outbox_depth: Gauge,
    outbox_oldest_due_age: Gauge<f64, AtomicU64>,
    /// How long this relay's longest write to the store under way has run: a write that
    /// never ends (a hung disk or database) shows here, never in the commit histogram.
    store_write_running: Gauge<f64, AtomicU64>,
    store_ready: Gauge,
    /// The state folder's disk: free bytes and the reserve under which new work is
    /// refused (see [`crate::disk_reserve`]); absent on a PostgreSQL store.
    store_disk_free: Gauge,
    store_disk_reserve: Gauge,
    limit_refusals: Family<LimitLabels, Counter>,
    status_posts: Family<StatusLabels, Counter>,
    compares: Family<SourceOutcomeLabels, Counter>,
    catch_up: Family<SourceOutcomeLabels, Counter>,
    pipeline_polls: Family<OutcomeLabels, Counter>,
    /// Whether the last reload took (1) or left the running configuration (0), and when
    /// the configuration in use was loaded: named as Prometheus names its own, so the
    /// usual alert on a bad configuration pushed to the relay applies.
    config_reload_successful: Gauge,
    config_loaded_at: Gauge,
    /// GitLab's answers per upstream and class (`2xx`, `4xx`, `5xx`, `error`), per minute.
    pub recent_answers: Recent,
    /// Refusals per limit setting, per minute.
    pub recent_refusals: Recent,
    process: ProcessMetrics,
}

/// The process's own resources, read from `/proc/self` when scraped (Linux; elsewhere they
/// stay 0), so a leak of memory or descriptors shows before it hurts.
struct ProcessMetrics {
    cpu_seconds: Counter<f64, AtomicU64>,
    cpu_seen: std::sync::Mutex<f64>,
    resident_memory: Gauge,
    open_fds: Gauge,
    max_fds: Gauge,
    /// Log lines dropped because standard error took none for too long (`log_writer`).
    log_lines_dropped: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics::for_store(false)
    }

    /// `shared_store`: relays share the store, so the outbox gauges describe the whole
    /// cluster; every relay exports the same value, labelled `scope="cluster"` (graph the
    /// `max`, not the `sum`).
    pub fn for_store(shared_store: bool) -> Metrics {
        let mut registry = Registry::with_prefix("hookrelay");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "HTTP requests by endpoint and status",
            requests.clone(),
        );
        let request_seconds: Family<EndpointLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(request_histogram);
        registry.register(
            "request_duration_seconds",
            "Time from a request's headers to its answer, by endpoint (for webhooks, the commit that acknowledges them included)",
            request_seconds.clone(),
        );
        let signature_failures = Family::<SourceLabels, Counter>::default();
        registry.register(
            "signature_failures",
            "Webhooks refused for a missing or wrong signature or token, by source",
            signature_failures.clone(),
        );
        let connections_shed = Counter::default();
        registry.register(
            "connections_shed",
            "Connections closed at [server] max_connections to make room (idle ones first)",
            connections_shed.clone(),
        );
        let rule_matches = Family::<RuleLabels, Counter>::default();
        registry.register(
            "rule_matches",
            "Events matched, by rule",
            rule_matches.clone(),
        );
        let triggers = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "triggers",
            "Trigger calls by outcome: queued, sent, failed, retried, rate_limited, dry_run, coalesced",
            triggers.clone(),
        );
        let upstream_responses = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "upstream_responses",
            "Answers from GitLab by upstream and HTTP status (\"error\" when none came)",
            upstream_responses.clone(),
        );
        let upstream_down = Family::<UpstreamNameLabels, Gauge>::default();
        registry.register(
            "upstream_down",
            "1 while this relay holds an upstream's triggers back as down (no connection, a timeout, 502, 503 or 504), until it answers again",
            upstream_down.clone(),
        );
        let github_hooks_age = Family::<ListLabels, Gauge>::default();
        registry.register(
            "github_hooks_age_seconds",
            "How long ago GitHub's webhook addresses in use were read from api.github.com/meta (allow_from = [\"github\"]); -1 while none are known and such webhooks are refused with 503",
            github_hooks_age.clone(),
        );
        let delivery_latency = Histogram::new(exponential_buckets(0.005, 2.0, 20));
        registry.register(
            "delivery_latency_seconds",
            "From a trigger's webhook being accepted to GitLab's final answer",
            delivery_latency.clone(),
        );
        let outbox_registry = if shared_store {
            registry.sub_registry_with_label(("scope".into(), "cluster".into()))
        } else {
            &mut registry
        };
        let outbox_depth = Gauge::default();
        outbox_registry.register(
            "outbox_depth",
            "Queued work waiting or being sent: triggers, status posts and pipeline polls",
            outbox_depth.clone(),
        );
        let outbox_oldest_due_age = Gauge::<f64, AtomicU64>::default();
        outbox_registry.register(
            "outbox_oldest_due_age_seconds",
            "How long the longest-due waiting trigger has been due",
            outbox_oldest_due_age.clone(),
        );
        let store_write_running = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "store_write_running_seconds",
            "How long this relay's longest write to the delivery store under way has run (0 between writes); past 5 s /readyz answers 503",
            store_write_running.clone(),
        );
        let store_ready = Gauge::default();
        registry.register(
            "store_ready",
            "1 while the delivery store takes writes; 0 while it cannot (a write failing or hung over 5 s, the disk below its reserve, the database gone), when /readyz answers 503 and webhooks are refused with 503",
            store_ready.clone(),
        );
        let store_disk_free = Gauge::default();
        registry.register(
            "store_disk_free_bytes",
            "Bytes free on the disk of the relay's state folder (SQLite store), read every 50 ms",
            store_disk_free.clone(),
        );
        let store_disk_reserve = Gauge::default();
        registry.register(
            "store_disk_reserve_bytes",
            "[delivery] min_free_disk in bytes: with less free, new webhooks and gateway calls are refused and /readyz answers 503",
            store_disk_reserve.clone(),
        );
        let limit_refusals = Family::<LimitLabels, Counter>::default();
        registry.register(
            "limit_refusals",
            "Requests refused by a rate limit (on_limit = \"reject\" and the gateway's limits), by the setting",
            limit_refusals.clone(),
        );
        let catch_up = Family::<SourceOutcomeLabels, Counter>::default();
        registry.register(
            "catch_up",
            "GitHub and GitLab webhooks the relay's catch-up passes found it never took, by source and by what became of them: redelivered, refused (by the forge), rejected (the relay had refused them: 4xx), left (for the next pass); failed counts passes that could not read the hook's log, hook_disabled passes that found GitLab no longer calling the hook",
            catch_up.clone(),
        );
        let status_posts = Family::<StatusLabels, Counter>::default();
        registry.register(
            "status_posts",
            "Commit statuses posted back to the forges, by forge and outcome: sent, retried, failed",
            status_posts.clone(),
        );
        let compares = Family::<SourceOutcomeLabels, Counter>::default();
        registry.register(
            "compares",
            "Forges asked which files a push changed (a source's `compare`), by source and outcome: listed, failed (the push passed every path filter)",
            compares.clone(),
        );
        let pipeline_polls = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "pipeline_polls",
            "Polls of GitLab for a pipeline's state, by outcome: changed, unchanged, finished, retried, failed, deferred",
            pipeline_polls.clone(),
        );
        let config_reload_successful = Gauge::default();
        config_reload_successful.set(1);
        registry.register(
            "config_last_reload_successful",
            "1 when the last configuration reload took (or none was tried since the start); 0 when it failed and the running configuration stays",
            config_reload_successful.clone(),
        );
        let config_loaded_at = Gauge::default();
        config_loaded_at.set(crate::store::now_ms() / 1000);
        registry.register(
            "config_last_reload_success_timestamp_seconds",
            "When the configuration in use was loaded (the start, or the last reload that took), in seconds since 1970",
            config_loaded_at.clone(),
        );
        registry.register(
            "build",
            "The relay's version",
            prometheus_client::metrics::info::Info::new(vec![(
                "version".to_owned(),
                env!("CARGO_PKG_VERSION").to_owned(),
            )]),
        );
        let process = ProcessMetrics {
            cpu_seconds: Counter::default(),
            cpu_seen: std::sync::Mutex::new(0.0),
            resident_memory: Gauge::default(),
            open_fds: Gauge::default(),
            max_fds: Gauge::default(),
            log_lines_dropped: Counter::default(),
        };
        registry.register(
            "process_cpu_seconds",
            "CPU time the process has used, user and system",
            process.cpu_seconds.clone(),
        );
        registry.register_with_unit(
            "process_resident_memory",
            "Resident memory of the process",
            prometheus_client::registry::Unit::Bytes,
            process.resident_memory.clone(),
        );
        registry.register(
            "process_open_fds",
            "Open file descriptors (connections, the store, upstream calls)",
            process.open_fds.clone(),
        );
        registry.register(
            "process_max_fds",
            "The open-file limit",
            process.max_fds.clone(),
        );
        registry.register(
            "log_lines_dropped",
            "Log lines dropped because standard error took none for too long (a stalled pipe or log collector) or refused them (a full disk, a closed pipe)",
            process.log_lines_dropped.clone(),
        );
        Metrics {
            config_reload_successful,
            config_loaded_at,
            limit_refusals,
            status_posts,
            compares,
            catch_up,
            pipeline_polls,
            recent_answers: Recent::default(),
            recent_refusals: Recent::default(),
            process,
            registry,
            requests,
            request_seconds,
            signature_failures,
            connections_shed,
            rule_matches,
            triggers,
            upstream_responses,
            upstream_down,
            github_hooks_age,
            delivery_latency,
            outbox_depth,
            outbox_oldest_due_age,
            store_write_running,
            store_ready,
            store_disk_free,
            store_disk_reserve,
        }
    }

    pub fn request(&self, endpoint: &str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                endpoint: endpoint.to_owned(),
                status,
            })
            .inc();
    }

    /// How long a request to `endpoint` took, from its headers to its answer.
    pub fn request_duration(&self, endpoint: &'static str, seconds: f64) {
        self.request_seconds
            .get_or_create(&EndpointLabels { endpoint })
            .observe(seconds);
    }

    /// Registers the store's own timings (kept by the outbox's writer, which registers
    /// nothing itself), so a scrape shows what acknowledgements wait for.
    pub fn register_store(&mut self, timings: &StoreTimings) {
        self.registry.register(
            "store_commit_seconds",
            "Time the store took to write and commit one group that acknowledgements wait for (webhooks, gateway calls' records, replays)",
            timings.commit_seconds.clone(),
        );
        self.registry.register(
            "store_commit_size",
            "Operations in each such commit, written together (webhooks, records, send outcomes, claims)",
            timings.commit_size.clone(),
        );
        self.registry.register(
            "store_clock_steps_back",
            "Times the store's clock went back by more than 2 s and this relay moved the waiting deadlines back with it",
            timings.clock_steps_back.clone(),
        );
    }

    /// Creates at 0 every series whose labels the configuration already knows, so that an
    /// alert on `increase(hookrelay_triggers_total{outcome="failed"}[15m]) > 0` fires on the
    /// first failure after a start: Prometheus reads no increase in a series whose first
    /// sample is already 1. Called at the start and after each reload that takes (a removed
    /// source's or rule's series stays, as Prometheus expects of a counter).
    pub fn start_at_zero(&self, known: &KnownSeries<'_>) {
        for endpoint in &known.endpoints {
            drop(
                self.request_seconds
                    .get_or_create(&EndpointLabels { endpoint }),
            );
        }
        for outcome in TriggerOutcome::WORDS {
            at_zero(
                &self.triggers,
                &OutcomeLabels {
                    outcome: (*outcome).to_owned(),
                },
            );
        }
        for source in &known.sources {
            at_zero(
                &self.signature_failures,
                &SourceLabels {
                    source: (*source).to_owned(),
                },
            );
        }
        for limit in &known.refusing_limits {
            at_zero(
                &self.limit_refusals,
                &LimitLabels {
                    limit: limit.clone(),
                },
            );
        }
        for rule in &known.rules {
            at_zero(
                &self.rule_matches,
                &RuleLabels {
                    rule: (*rule).to_owned(),
                },
            );
        }
        for forge in &known.status_forges {
            for outcome in StatusOutcome::WORDS {
                at_zero(
                    &self.status_posts,
                    &StatusLabels {
                        forge: (*forge).to_owned(),
                        outcome: (*outcome).to_owned(),
                    },
                );
            }
        }
        let by_source =
            |family: &Family<SourceOutcomeLabels, Counter>, sources: &[&str], outcomes: &[&str]| {
                for source in sources {
                    for outcome in outcomes {
                        at_zero(
                            family,
                            &SourceOutcomeLabels {
                                source: (*source).to_owned(),
                                outcome: (*outcome).to_owned(),
                            },
                        );
                    }
                }
            };
        by_source(&self.compares, &known.compares, CompareOutcome::WORDS);
        by_source(&self.catch_up, &known.catch_ups, CatchUpOutcome::WORDS);
        if known.polls {
            for outcome in PollOutcome::WORDS {
                at_zero(
                    &self.pipeline_polls,
                    &OutcomeLabels {
                        outcome: (*outcome).to_owned(),
                    },
                );
            }
        }
    }

    /// A reload at `at_ms` took (`true`) or failed and left the running configuration.
    pub fn config_reloaded(&self, took: bool, at_ms: i64) {
        self.config_reload_successful.set(i64::from(took));
        if took {
            self.config_loaded_at.set(at_ms / 1000);
        }
    }

    pub fn connection_shed(&self) {
        self.connections_shed.inc();
    }

    /// A source's forge was asked which files a push changed: `listed` or `failed`.
    pub fn compare(&self, source: &str, outcome: CompareOutcome) {
        self.compares
            .get_or_create(&SourceOutcomeLabels {
                source: source.to_owned(),
                outcome: outcome.as_str().to_owned(),
            })
            .inc();
    }

    /// `count` webhooks of `source`'s hook that a catch-up pass found, and what became of them.
    pub fn catch_up(&self, source: &str, outcome: CatchUpOutcome, count: u64) {
        self.catch_up
            .get_or_create(&SourceOutcomeLabels {
                source: source.to_owned(),
                outcome: outcome.as_str().to_owned(),
            })
            .inc_by(count);
    }

    pub fn signature_failure(&self, source: &str) {
        self.signature_failures
            .get_or_create(&SourceLabels {
                source: source.to_owned(),
            })
            .inc();
    }

    pub fn rule_matched(&self, rule: &str) {
        self.rule_matches
            .get_or_create(&RuleLabels {
                rule: rule.to_owned(),
            })
            .inc();
    }

    /// A status post's attempt ended so (`forge` as in configuration).
    pub fn status_post(&self, forge: &str, outcome: StatusOutcome) {
        self.status_posts
            .get_or_create(&StatusLabels {
                forge: forge.to_owned(),
                outcome: outcome.as_str().to_owned(),
            })
            .inc();
    }

    pub fn pipeline_poll(&self, outcome: PollOutcome) {
        self.pipeline_polls
            .get_or_create(&OutcomeLabels {
                outcome: outcome.as_str().to_owned(),
            })
            .inc();
    }

    pub fn trigger(&self, outcome: TriggerOutcome) {
        self.triggers
            .get_or_create(&OutcomeLabels {
                outcome: outcome.as_str().to_owned(),
            })
            .inc();
    }

    pub fn triggers(&self, outcome: TriggerOutcome, count: u64) {
        self.triggers
            .get_or_create(&OutcomeLabels {
                outcome: outcome.as_str().to_owned(),
            })
            .inc_by(count);
    }

    /// The relay paused an upstream as down (`true`), or it answered again (`false`).
    pub fn upstream_down(&self, upstream: &str, down: bool) {
        self.upstream_down
            .get_or_create(&UpstreamNameLabels {
                upstream: upstream.to_owned(),
            })
            .set(i64::from(down));
    }

    /// An answer from GitLab; `None` when none came (network error, timeout).
    pub fn upstream_response(&self, upstream: &str, status: Option<u16>) {
        // The usual classes without formatting: this runs for every send.
        let class = match status.map(|s| s / 100) {
            Some(1) => "1xx".to_owned(),
            Some(2) => "2xx".to_owned(),
            Some(3) => "3xx".to_owned(),
            Some(4) => "4xx".to_owned(),
            Some(5) => "5xx".to_owned(),
            Some(class) => format!("{class}xx"),
            None => "error".to_owned(),
        };
        self.recent_answers.add((upstream.to_owned(), class));
        let code = status
            .map(|s| s.to_string())
            .unwrap_or_else(|| "error".into());
        self.upstream_responses
            .get_or_create(&UpstreamLabels {
                upstream: upstream.to_owned(),
                code,
            })
            .inc();
    }

    pub fn delivery_latency(&self, seconds: f64) {
        self.delivery_latency.observe(seconds);
    }

    /// The outbox gauges, set when scraped.
    pub fn outbox(&self, depth: i64, oldest_due_age_seconds: f64) {
        self.outbox_depth.set(depth);
        self.outbox_oldest_due_age.set(oldest_due_age_seconds);
    }

    /// How long the longest write to the store under way has run, when scraped.
    pub fn store_write_running(&self, running: std::time::Duration) {
        self.store_write_running.set(running.as_secs_f64());
    }

    /// How old GitHub's webhook addresses in use are (`None`: none known), while a source
    /// needs them; no series otherwise.
    pub fn github_hooks_age(&self, needed: bool, age: Option<std::time::Duration>) {
        if !needed {
            self.github_hooks_age.clear();
            return;
        }
        let seconds = age.map_or(-1, |age| i64::try_from(age.as_secs()).unwrap_or(i64::MAX));
        self.github_hooks_age
            .get_or_create(&ListLabels { list: "hooks" })
            .set(seconds);
    }

    /// Whether the store takes writes, as `/readyz` says it.
    pub fn store_ready(&self, ready: bool) {
        self.store_ready.set(i64::from(ready));
    }

    /// The state folder's disk: what is free, and the reserve.
    pub fn store_disk(&self, free: u64, reserve: u64) {
        self.store_disk_free
            .set(i64::try_from(free).unwrap_or(i64::MAX));
        self.store_disk_reserve
            .set(i64::try_from(reserve).unwrap_or(i64::MAX));
    }

    /// A request refused by the limit named `limit` (its rate, in parentheses, left out).
    pub fn limit_refused(&self, limit: &str) {
        let setting = limit.split(" (").next().unwrap_or(limit);
        self.recent_refusals
            .add((setting.to_owned(), String::new()));
        self.limit_refusals
            .get_or_create(&LimitLabels {
                limit: setting.to_owned(),
            })
            .inc();
    }

    /// Reads the process's CPU time, memory, descriptors and dropped log lines, when scraped.
    pub fn read_process(&self) {
        if let Some(cpu) = process_cpu_seconds() {
            let mut seen = self.process.cpu_seen.lock().expect("not poisoned");
            if cpu > *seen {
                self.process.cpu_seconds.inc_by(cpu - *seen);
                *seen = cpu;
            }
        }
        if let Some(bytes) = resident_memory_bytes() {
            self.process.resident_memory.set(bytes);
        }
        if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
            self.process.open_fds.set(entries.count() as i64);
        }
        if let Ok((soft, _)) = rlimit::getrlimit(rlimit::Resource::NOFILE) {
            self.process.max_fds.set(soft.min(i64::MAX as u64) as i64);
        }
        let dropped = crate::log_writer::lines_dropped();
        let counted = self.process.log_lines_dropped.get();
        if dropped > counted {
            self.process.log_lines_dropped.inc_by(dropped - counted);
        }
    }

    /// The text a scrape receives.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// User and system CPU seconds from `/proc/self/stat` (fields 14 and 15, in the kernel's
/// user-visible ticks, 100 a second on Linux).
fn process_cpu_seconds() -> Option<f64> {
    cpu_seconds_in_stat(&std::fs::read_to_string("/proc/self/stat").ok()?)
}

/// User + system CPU seconds from a process's `/proc/PID/stat` line (clock ticks, 100 a
/// second on Linux). Public for the benchmarks, which read other processes' the same way.
pub fn cpu_seconds_in_stat(stat: &str) -> Option<f64> {
    // The command name may hold spaces; the fields after it are counted from its `)`.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<f64>().ok();
    Some((ticks(11)? + ticks(12)?) / 100.0)
}

/// `VmRSS` from `/proc/self/status`, in bytes.
fn resident_memory_bytes() -> Option<i64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: i64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The value of the first sample in `scrape` whose line starts with `name` (the metric's
/// name, with its labels or a space after it to tell it from longer names); for tests and
/// tools that read a scrape.
pub fn sample(scrape: &str, name: &str) -> Option<f64> {
    let line = scrape.lines().find(|l| l.starts_with(name))?;
    line.rsplit(' ').next()?.parse().ok()
}

/// The content type of [`Metrics::encode`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What the outbox's writer measures of its commits, for `/metrics` ([`Metrics::register_store`]
/// registers them): acknowledgements wait for these commits, so a slow disk or database shows here
/// first.
#[derive(Clone, Debug)]
pub struct StoreTimings {
    /// Seconds from a group's first statement to its commit, for groups that something
    /// waits on to be durable (webhooks, gateway calls' records, replays).
    pub commit_seconds: Histogram,
    /// How many requests each such commit wrote.
    pub commit_size: Histogram,
    /// Times the store's clock was seen gone back, and the deadlines moved with it.
    pub clock_steps_back: Counter,
}

impl Default for StoreTimings {
    fn default() -> Self {
        StoreTimings {
            // 0.25 ms to 8 s.
            commit_seconds: Histogram::new(exponential_buckets(0.000_25, 2.0, 16)),
            // 1 to 1,024.
            commit_size: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
            clock_steps_back: Counter::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn githubs_list_has_an_age_only_where_a_source_needs_it() {
        let metrics = Metrics::new();
        let age = |metrics: &Metrics| {
            sample(
                &metrics.encode(),
                "hookrelay_github_hooks_age_seconds{list=\"hooks\"} ",
            )
        };
        metrics.github_hooks_age(false, None);
        assert!(
            !metrics
                .encode()
                .lines()
                .any(|line| line.starts_with("hookrelay_github_hooks_age_seconds")),
            "no series while no source needs the list"
        );
        metrics.github_hooks_age(true, None);
        assert_eq!(age(&metrics), Some(-1.0));
        metrics.github_hooks_age(true, Some(std::time::Duration::from_secs(90)));
        assert_eq!(age(&metrics), Some(90.0));
        metrics.github_hooks_age(false, None);
        assert_eq!(age(&metrics), None);
    }

    /// Prometheus reads no increase in a series whose first sample is already 1, so the
    /// series alerts read exist at 0 from the start, and a reload adds its new names.
    #[test]
    fn series_the_configuration_names_start_at_zero() {
        let metrics = Metrics::new();
        metrics.start_at_zero(&KnownSeries {
            sources: vec!["github", "bb"],
            rules: vec!["docs"],
            status_forges: vec!["github"],
            compares: vec!["bb"],
            catch_ups: vec!["github"],
            polls: true,
            endpoints: vec!["hooks"],
            refusing_limits: vec!["[gateway] limit.per_client".into()],
        });
        metrics.trigger(TriggerOutcome::Sent);
        metrics.start_at_zero(&KnownSeries {
            sources: vec!["github", "gitea"],
            ..KnownSeries::default()
        });
        let text = metrics.encode();
        for line in [
            "hookrelay_triggers_total{outcome=\"failed\"} 0",
            "hookrelay_triggers_total{outcome=\"sent\"} 1",
            "hookrelay_triggers_total{outcome=\"coalesced\"} 0",
            "hookrelay_signature_failures_total{source=\"bb\"} 0",
            "hookrelay_signature_failures_total{source=\"gitea\"} 0",
            "hookrelay_rule_matches_total{rule=\"docs\"} 0",
            "hookrelay_status_posts_total{forge=\"github\",outcome=\"failed\"} 0",
            "hookrelay_compares_total{source=\"bb\",outcome=\"failed\"} 0",
            "hookrelay_catch_up_total{source=\"github\",outcome=\"hook_disabled\"} 0",
            "hookrelay_pipeline_polls_total{outcome=\"failed\"} 0",
            "hookrelay_request_duration_seconds_count{endpoint=\"hooks\"} 0",
            "hookrelay_limit_refusals_total{limit=\"[gateway] limit.per_client\"} 0",
        ] {
            assert!(text.contains(line), "{line:?} missing from\n{text}");
        }
        assert!(
            !text.contains("hookrelay_compares_total{source=\"github\""),
            "only sources that compare: {text}"
        );
    }

    #[test]
    fn names_are_prefixed_and_labels_bounded() {
        let metrics = Metrics::new();
        metrics.request("hooks", 202);
        metrics.request_duration("hooks", 0.003);
        metrics.signature_failure("github");
        metrics.trigger(TriggerOutcome::Sent);
        metrics.upstream_response("gitlab", None);
        metrics.upstream_down("gitlab", true);
        metrics.upstream_down("other", true);
        metrics.upstream_down("other", false);
        metrics.delivery_latency(0.2);
        metrics.outbox(3, 1.5);
        metrics.store_write_running(std::time::Duration::from_millis(7_500));
        metrics.store_ready(false);
        metrics.limit_refused("[gateway] limit.per_project (30/min)");
        metrics.read_process();
        let text = metrics.encode();
        assert!(text.contains("hookrelay_build_info{version=\""), "{text}");
        let value = |name: &str| sample(&text, name).unwrap_or_else(|| panic!("{name} in\n{text}"));
        assert!(value("hookrelay_process_resident_memory_bytes ") > 1e6);
        assert!(value("hookrelay_process_open_fds ") >= 3.0);
        assert!(value("hookrelay_process_max_fds ") >= value("hookrelay_process_open_fds "));
        assert!(value("hookrelay_process_cpu_seconds_total ") >= 0.0);
        assert!(process_cpu_seconds().is_some(), "/proc/self/stat is read");
        assert!(value("hookrelay_log_lines_dropped_total ") >= 0.0);
        for line in [
            "hookrelay_requests_total{endpoint=\"hooks\",status=\"202\"} 1",
            "hookrelay_signature_failures_total{source=\"github\"} 1",
            "hookrelay_triggers_total{outcome=\"sent\"} 1",
            "hookrelay_upstream_responses_total{upstream=\"gitlab\",code=\"error\"} 1",
            "hookrelay_upstream_down{upstream=\"gitlab\"} 1",
            "hookrelay_upstream_down{upstream=\"other\"} 0",
            "hookrelay_delivery_latency_seconds_count 1",
            "hookrelay_outbox_depth 3",
            "hookrelay_outbox_oldest_due_age_seconds 1.5",
            "hookrelay_store_write_running_seconds 7.5",
            "hookrelay_store_ready 0",
            "hookrelay_limit_refusals_total{limit=\"[gateway] limit.per_project\"} 1",
            "hookrelay_request_duration_seconds_count{endpoint=\"hooks\"} 1",
            "hookrelay_request_duration_seconds_bucket{le=\"0.005\",endpoint=\"hooks\"} 1",
            "hookrelay_request_duration_seconds_bucket{le=\"0.0025\",endpoint=\"hooks\"} 0",
        ] {
            assert!(text.contains(line), "{line:?} missing from\n{text}");
        }
    }
}
