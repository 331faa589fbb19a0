//! The shared application state that the server and every handler stand on: the current
//! configuration snapshot (swapped whole on reload), the outbox, metrics and the bounds
//! fixed at start.
//!
//! It lives apart from `server.rs` so that handlers (`hooks`, the forwarder, the scheduler)
//! never import the server that calls them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use arc_swap::ArcSwap;

use crate::config::{Config, ServerConfig};
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::upstream::{UpstreamError, Upstreams};

/// One configuration and the clients built from it. A request takes the snapshot current
/// when it starts and finishes on it, whatever reloads happen meanwhile.
pub struct Runtime {
    pub config: Config,
    pub upstreams: Upstreams,
    pub limits: crate::limits::Limits,
    /// Clients of the forges that sources report statuses to, by source.
    pub status: crate::status::StatusClients,
    /// Clients of the forges asked which files a push changed, by source.
    pub compare: crate::compare::CompareClients,
}

impl Runtime {
    /// `shared`: the limits' state when several relays share the store.
    pub fn new(
        config: Config,
        shared: Option<Arc<crate::store::postgres::SharedState>>,
    ) -> Result<Runtime, UpstreamError> {
        let upstreams = Upstreams::new(&config.upstreams)?;
        let status = crate::status::StatusClients::new(
            config
                .sources
                .iter()
                .filter_map(|(name, source)| Some((name, source.status.as_ref()?))),
            &config.upstreams,
            config.store.as_ref().map(|store| store.lease),
            shared.as_ref(),
        )?;
        let limits = crate::limits::Limits::new(&config, shared);
        let compare = crate::compare::CompareClients::new(
            config
                .sources
                .iter()
                .filter_map(|(name, source)| Some((name, source.compare.as_ref()?))),
        )?;
        Ok(Runtime {
            config,
            upstreams,
            limits,
            status,
            compare,
        })
    }
}

/// Why the relay could not be set up from a configuration that loaded.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The listener's certificate (it was readable when the configuration was checked).
    #[error("[server] tls_cert: {0}")]
    Certificate(String),
}

/// Refused requests logged a second at most, per endpoint and status; the rest are
/// counted (`held_back` on the next line that is logged, and every one in
/// `hookrelay_requests_total`). A client sending unsigned webhooks or scanning paths as
/// fast as it can wrote two lines a request, 400 bytes: tens of megabytes a second.
pub const REFUSALS_LOGGED_A_SECOND: u64 = 20;

/// Everything a request handler needs, shared by all connections.
pub struct App {
    runtime: ArcSwap<Runtime>,
    /// Where the configuration was read from, for reloads.
    config_path: Option<PathBuf>,
    /// `[server]` as the relay started with: listening and limits are not reloaded.
    pub server: ServerConfig,
    /// Set once a shutdown begins: `/readyz` says so.
    pub(crate) shutting_down: AtomicBool,
    /// Counts reloads, so that tasks planning ahead (the scheduler) can wake up.
    reloads: tokio::sync::watch::Sender<u64>,
    /// The durable record of deliveries and the queue of triggers.
    pub outbox: Outbox,
    /// GitHub's published webhook addresses, for sources with `allow_from = ["github"]`.
    pub github_hooks: crate::github_meta::GithubHooks,
    /// `--dry-run`: record and log trigger calls, never send them.
    pub dry_run: bool,
    pub metrics: Arc<Metrics>,
    /// Bytes of request bodies in memory across all requests (`[server] body_memory`).
    pub(crate) body_budget: Arc<tokio::sync::Semaphore>,
    /// Open connections at most (`[server] max_connections`, or derived at start).
    pub max_connections: usize,
    /// The listener's certificate when it serves HTTPS; replaced at each reload.
    pub tls: Option<Arc<crate::tls::ServerCertificate>>,
    /// Records of webhooks answered without queuing (refused, duplicate), at most one a
    /// second per source and kind.
    pub turned_away: std::sync::Mutex<crate::limits::Throttle<(String, &'static str)>>,
    /// Log lines of refused requests, per endpoint and status: an anonymous client
    /// sending as fast as it can must not fill the disk with them
    /// ([`REFUSALS_LOGGED_A_SECOND`]).
    refusals_logged: std::sync::Mutex<crate::limits::Throttle<(&'static str, u16)>>,
    /// Projects GitLab paused and upstreams that are down, as the forwarder holds them.
    pub holds: crate::outbox::outage::Holds,
    /// The dashboard's listener as started (its address is not reloaded; its token is).
    pub admin: std::sync::OnceLock<crate::config::admin::AdminConfig>,
    /// The dashboard's certificate when it serves HTTPS; renewed at each reload.
    pub admin_tls: std::sync::OnceLock<Arc<crate::tls::ServerCertificate>>,
    /// The settings a reload cannot change, as the files said them at start (before
    /// `--listen` and the like): a reload that changes them says they wait for a restart.
    pub restart_only: std::sync::OnceLock<RestartOnly>,
    /// Where `serve`'s command line said to listen, over the files: a reload's checks of
    /// where the relay listens read these too.
    pub listen_flags: std::sync::OnceLock<crate::config::ListenFlags>,
    /// When the configuration in use was loaded, and why the last reload failed if it did:
    /// the health page shows it.
    pub reloaded: std::sync::Mutex<Reloaded>,
    /// The last catch-up pass of each source with `catch_up` (the health page shows it).
    pub catch_up: crate::catch_up::LastPasses,
}

/// How the configuration in use came to be.
#[derive(Clone, Debug)]
pub struct Reloaded {
    /// When the configuration in use was loaded (milliseconds since 1970).
    pub loaded_at: i64,
    /// The last reload, when it failed and left that configuration running: when, and
    /// its problems.
    pub failed: Option<(i64, String)>,
}

/// The settings of the configuration files that take effect only at the next start: the
/// listener, its limits and event loops, the dashboard's address, the store.
#[derive(Clone, Debug, PartialEq)]
pub struct RestartOnly {
    settings: Vec<(&'static str, String)>,
}

impl RestartOnly {
    pub fn of(config: &Config) -> RestartOnly {
        let server = &config.server;
        let admin = config.admin.as_ref();
        RestartOnly {
            settings: vec![
                ("[server] listen", server.listen.to_string()),
                ("[server] max_body", server.max_body.to_string()),
                ("[server] body_memory", server.body_memory.to_string()),
                (
                    "[server] max_connections",
                    format!("{:?}", server.max_connections),
                ),
                ("[server] event_loops", format!("{:?}", server.event_loops)),
                (
                    "[server] read_timeout",
                    format!("{:?}", server.read_timeout),
                ),
                (
                    "[server] shutdown_timeout",
                    format!("{:?}", server.shutdown_timeout),
                ),
                ("[server] ack_timeout", format!("{:?}", server.ack_timeout)),
                ("[admin]", admin.map_or("off".into(), |_| "on".into())),
                ("[admin] listen", format!("{:?}", admin.map(|a| a.listen))),
                (
                    "[store] url",
                    format!("{:?}", config.store.as_ref().map(|s| &s.url)),
                ),
            ],
        }
    }

    /// The settings `now` has changed, by name.
    pub fn changed(&self, now: &RestartOnly) -> Vec<&'static str> {
        self.settings
            .iter()
            .zip(&now.settings)
            .filter(|(was, is)| was.1 != is.1)
            .map(|(was, _)| was.0)
            .collect()
    }
}

impl App {
    pub fn new(config: Config, outbox: Outbox) -> Result<Arc<App>, SetupError> {
        App::with_options(config, outbox, None, false)
    }

    /// An app that can [`App::reload`] its configuration from `path`, and that records
    /// instead of sending when `dry_run`.
    pub fn with_options(
        config: Config,
        outbox: Outbox,
        path: Option<PathBuf>,
        dry_run: bool,
    ) -> Result<Arc<App>, SetupError> {
        let server = config.server.clone();
        let shared_store = outbox.shared;
        let mut metrics = Metrics::for_store(shared_store);
        metrics.register_store(&outbox.timings);
        metrics.start_at_zero(&known_series(&config));
        // Room for at least one body of the largest size accepted.
        let gateway_max = config.gateway.as_ref().map_or(0, |g| g.max_body);
        let budget = server.body_memory.max(server.max_body).max(gateway_max);
        let max_connections = server.max_connections.unwrap_or_else(|| {
            crate::connections::default_max_connections(
                rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft),
            )
        });
        let tls = match &server.tls {
            Some(files) => Some(crate::tls::ServerCertificate::new(
                crate::tls::read_server_certificate(&files.cert, &files.key)
                    .map_err(SetupError::Certificate)?,
            )),
            None => None,
        };
        Ok(Arc::new(App {
            holds: Default::default(),
            github_hooks: Default::default(),
            admin: std::sync::OnceLock::new(),
            admin_tls: std::sync::OnceLock::new(),
            restart_only: std::sync::OnceLock::new(),
            listen_flags: std::sync::OnceLock::new(),
            reloaded: std::sync::Mutex::new(Reloaded {
                loaded_at: crate::outbox::now_ms(),
                failed: None,
            }),
            catch_up: Default::default(),
            turned_away: std::sync::Mutex::new(crate::limits::Throttle::new(
                std::time::Duration::from_secs(1),
            )),
            refusals_logged: std::sync::Mutex::new(crate::limits::Throttle::with_burst(
                std::time::Duration::from_secs(1),
                REFUSALS_LOGGED_A_SECOND,
            )),
            tls,
            max_connections,
            body_budget: Arc::new(tokio::sync::Semaphore::new(budget)),
            runtime: ArcSwap::from_pointee(Runtime::new(config, outbox.shared_state.clone())?),
            config_path: path,
            server,
            shutting_down: AtomicBool::new(false),
            reloads: tokio::sync::watch::Sender::new(0),
            outbox,
            dry_run,
            metrics: Arc::new(metrics),
        }))
    }

    /// Whether a refused request may be logged now (at most [`REFUSALS_LOGGED_A_SECOND`]
    /// for each endpoint and status): `Some` with how many like it were left out since
    /// the last one logged, when any.
    pub fn may_log_refusal(&self, endpoint: &'static str, status: u16) -> Option<Option<u64>> {
        self.refusals_logged
            .lock()
            .expect("never poisoned")
            .allow((endpoint, status))
            .map(|held_back| (held_back > 0).then_some(held_back))
    }

    /// The current configuration snapshot.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.load_full()
    }

    /// Who sent a request that came from `peer` with `headers`
    /// ([`crate::client_address::Caller`]), by the proxies trusted now: a glance at the
    /// configuration snapshot without holding it (no reference count to touch on every
    /// request).
    pub fn caller(
        &self,
        peer: std::net::IpAddr,
        headers: &http::HeaderMap,
    ) -> crate::client_address::Caller {
        let runtime = self.runtime.load();
        crate::client_address::Caller::of(peer, headers, &runtime.config.server.trusted_proxies)
    }

    /// Loads the configuration again and swaps it in whole; on any problem the running
    /// configuration stays and every problem is returned.
    pub fn reload(&self) -> Result<Arc<Runtime>, String> {
        let path = self
            .config_path
            .as_ref()
            .ok_or("this relay was not started from a configuration path")?;
        // The environment is the one the process started with: a reload cannot see a
        // variable set since, so a missing one is named with the remedy (a restart).
        let missing = std::sync::Mutex::new(std::collections::BTreeSet::new());
        let lookup = |name: &str| {
            let value = std::env::var(name).ok();
            if value.is_none() {
                missing
                    .lock()
                    .expect("not poisoned")
                    .insert(name.to_owned());
            }
            value
        };
        let flags = self.listen_flags.get().copied().unwrap_or_default();
        let config = crate::config::load_serving(path, &lookup, flags).map_err(|problems| {
            let mut text = problems.to_string();
            let missing = missing.into_inner().expect("not poisoned");
            let named: Vec<String> = missing
                .into_iter()
                .filter(|name| text.contains(&crate::secret::env_not_set(name)))
                .collect();
            if !named.is_empty() {
                text.push_str(&format!(
                    "\nhookrelay reads its environment only when it starts, and this process has no {}: \
                     set it where hookrelay is started (e.g. the service's Environment= or EnvironmentFile=) \
                     and restart hookrelay",
                    named.join(", ")
                ));
            }
            text
        })?;
        let runtime = Arc::new(
            Runtime::new(config, self.outbox.shared_state.clone())
                .map_err(|err| err.to_string())?,
        );
        self.renew_certificate(&runtime.config.server);
        if let Some(started) = self.restart_only.get() {
            let changed = started.changed(&RestartOnly::of(&runtime.config));
            if !changed.is_empty() {
                tracing::warn!(
                    settings = changed.join(", "),
                    "changed settings take effect at the next start; the relay keeps running with those it started with"
                );
            }
        }
        if let (Some(current), Some(files)) = (
            self.admin_tls.get(),
            runtime.config.admin.as_ref().and_then(|a| a.tls.as_ref()),
        ) {
            match crate::tls::read_server_certificate(&files.cert, &files.key) {
                Ok(key) => current.replace(key),
                Err(err) => tracing::error!(error = %err, "the dashboard keeps its certificate"),
            }
        }
        self.runtime.store(runtime.clone());
        self.metrics.start_at_zero(&known_series(&runtime.config));
        self.reloads.send_modify(|count| *count += 1);
        Ok(runtime)
    }

    /// Serves the certificate files as they are now (a renewed certificate takes effect at
    /// the reload certbot's hook or the file watch triggers). Turning HTTPS on or off waits
    /// for the next start, as the listen address does.
    fn renew_certificate(&self, server: &ServerConfig) {
        match (&self.tls, &server.tls) {
            (Some(current), Some(files)) => {
                match crate::tls::read_server_certificate(&files.cert, &files.key) {
                    Ok(key) => current.replace(key),
                    Err(err) => tracing::error!(error = %err, "the listener keeps its certificate"),
                }
            }
            (None, Some(_)) | (Some(_), None) => tracing::warn!(
                "[server] tls_cert/tls_key changed whether the relay serves HTTPS; that takes effect at the next start"
            ),
            (None, None) => {}
        }
    }

    /// Changes each time a reload swaps in a new configuration.
    pub fn reloads(&self) -> tokio::sync::watch::Receiver<u64> {
        self.reloads.subscribe()
    }

    pub fn config_path(&self) -> Option<&Path> {
        self.config_path.as_deref()
    }

    /// Whether a source of the running configuration lists `"github"` in `allow_from`, so
    /// GitHub's published webhook addresses are read ([`crate::github_meta`]).
    pub fn needs_github_hooks(&self) -> bool {
        self.runtime()
            .config
            .sources
            .values()
            .any(|source| source.allow_github_hooks)
    }
}

/// The names in `config` that label the metrics' series.
fn known_series(config: &Config) -> crate::metrics::KnownSeries<'_> {
    let sources_with = |has: fn(&crate::sources::SourceConfig) -> bool| {
        config
            .sources
            .iter()
            .filter(|(_, source)| has(source))
            .map(|(name, _)| name.as_str())
            .collect()
    };
    let mut status_forges: Vec<&str> = config
        .sources
        .values()
        .filter_map(|source| Some(source.status.as_ref()?.forge.as_str()))
        .collect();
    status_forges.sort_unstable();
    status_forges.dedup();
    crate::metrics::KnownSeries {
        sources: sources_with(|_| true),
        rules: config
            .rules
            .rules()
            .iter()
            .map(|rule| rule.name())
            .collect(),
        status_forges,
        compares: sources_with(|source| source.compare.is_some()),
        catch_ups: sources_with(|source| source.catch_up.is_some()),
        polls: config
            .upstreams
            .values()
            .any(|upstream| upstream.read_token.is_some()),
        endpoints: [
            (!config.sources.is_empty()).then_some("hooks"),
            config.gateway.is_some().then_some("trigger"),
            config.gateway.is_some().then_some("trigger_webhook"),
        ]
        .into_iter()
        .flatten()
        .collect(),
        refusing_limits: crate::limits::refusing_settings(config),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.toml"), text).unwrap();
        crate::config::load_with_env(dir.path(), &|_| None).unwrap()
    }

    /// What a reload cannot change is named when a file changes it, and nothing else is.
    #[test]
    fn settings_that_wait_for_a_restart_are_named_when_they_change() {
        let base = "[upstream.gitlab]\nurl = \"https://gitlab.example.com\"\n";
        let started = RestartOnly::of(&config(base));
        assert!(
            started
                .changed(&RestartOnly::of(&config(&format!(
                    "{base}[upstream.other]\nurl = \"https://other.example.com\"\n"
                ))))
                .is_empty(),
            "upstreams are reloaded"
        );
        let changed = started.changed(&RestartOnly::of(&config(&format!(
            "[server]\nlisten = \"127.0.0.1:9999\"\nread_timeout = \"20s\"\n{base}\
             [admin]\nlisten = \"127.0.0.1:9998\"\n"
        ))));
        assert_eq!(
            changed,
            [
                "[server] listen",
                "[server] read_timeout",
                "[admin]",
                "[admin] listen"
            ]
        );
    }
}
