//! The clients statuses go out through, built with each configuration: one per source
//! with `status = { … }` (to its forge's API), and the paces of posts (GitHub's 80 a
//! minute) and of pipeline polls (`[upstream.NAME] polls_per_minute`). The forwarder
//! sends through them ([`crate::forwarder::statuses`]). Relays sharing PostgreSQL share
//! the paces too, so that N relays post and poll at the pace one would.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use super::{Forge, ForgeApi};
use crate::limits::{Limit, Limiter, OnLimit, Rate};
use crate::store::postgres::SharedState;
use crate::upstream::{
    Called, Upstream, UpstreamConfig, UpstreamError, default_per_project, parse_upstream_url,
};

/// GitHub's guidance: no more than 80 content-creating requests a minute per token.
const GITHUB_POSTS_PER_MINUTE: u32 = 80;
/// A status call's whole time (shorter when a shared store's lease is: a call starts only
/// while its claim outlasts it).
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);

/// The forges' clients and the paces of posts and polls, built with each configuration.
#[derive(Default)]
pub struct StatusClients {
    /// By source: each source with `status = { … }`.
    forges: HashMap<String, Arc<Upstream>>,
    /// By source: the pace of posts (GitHub sources).
    paces: HashMap<String, Limiter>,
    /// By upstream: the pace of polls (upstreams with a `read_token`).
    polls: HashMap<String, Limiter>,
}

/// A pace of `count` a minute, its state `shared` by the relays on one database (under
/// `scope`) when given.
fn per_minute(
    name: String,
    scope: String,
    count: u32,
    shared: Option<&Arc<SharedState>>,
) -> Limiter {
    let count = std::num::NonZeroU32::new(count.max(1)).expect("at least one");
    Limiter::shared(
        name,
        scope,
        Limit {
            rate: Rate {
                count,
                per: Duration::from_secs(60),
            },
            burst: count,
            on_limit: OnLimit::Queue,
        },
        shared.cloned(),
    )
}

/// How one source's calls to its forge's API are made.
pub(crate) struct ForgeCalls<'a> {
    /// How the client is named (`status of github`).
    pub label: String,
    pub api: &'a ForgeApi,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub max_in_flight: usize,
}

/// A client of `source`'s forge API (statuses, compares): errors name the forge of the
/// source.
pub(crate) fn forge_client(source: &str, calls: ForgeCalls<'_>) -> Result<Upstream, UpstreamError> {
    let called = Called::Forge(source.to_owned());
    let url =
        parse_upstream_url(&calls.api.api_url).map_err(|reason| UpstreamError::BadResponse {
            upstream: called.clone(),
            reason,
        })?;
    Upstream::calling(
        called,
        &UpstreamConfig {
            name: calls.label,
            url,
            ca_file: calls.api.ca_file.clone(),
            connect_timeout: calls.connect_timeout,
            timeout: calls.timeout,
            per_project: default_per_project(),
            coalesce: None,
            max_in_flight: calls.max_in_flight,
            read_token: None,
            polls_per_minute: 0,
            poll_interval: Duration::ZERO,
        },
    )
}

impl StatusClients {
    /// `statuses`: each source's `status = { … }`; `lease`: a shared store's lease, which
    /// a status call must fit in; `shared`: the shared store's state, which the paces keep
    /// theirs in.
    pub fn new<'a>(
        statuses: impl IntoIterator<Item = (&'a String, &'a ForgeApi)>,
        upstreams: &BTreeMap<String, UpstreamConfig>,
        lease: Option<Duration>,
        shared: Option<&Arc<SharedState>>,
    ) -> Result<StatusClients, UpstreamError> {
        let mut clients = StatusClients::default();
        let timeout = lease.map_or(STATUS_TIMEOUT, |lease| {
            STATUS_TIMEOUT
                .min(lease.saturating_sub(Duration::from_secs(2)))
                .max(Duration::from_secs(1))
        });
        for (name, status) in statuses {
            let client = forge_client(
                name,
                ForgeCalls {
                    label: format!("status of {name}"),
                    api: status,
                    connect_timeout: Duration::from_secs(5),
                    timeout,
                    max_in_flight: 16,
                },
            )?;
            clients.forges.insert(name.clone(), Arc::new(client));
            if status.forge == Forge::Github {
                clients.paces.insert(
                    name.clone(),
                    per_minute(
                        format!("GitHub's {GITHUB_POSTS_PER_MINUTE} statuses a minute"),
                        format!("status.{name}.posts"),
                        GITHUB_POSTS_PER_MINUTE,
                        shared,
                    ),
                );
            }
        }
        for (name, upstream) in upstreams {
            if upstream.read_token.is_some() {
                clients.polls.insert(
                    name.clone(),
                    per_minute(
                        format!("[upstream.{name}] polls_per_minute"),
                        format!("upstream.{name}.polls"),
                        upstream.polls_per_minute,
                        shared,
                    ),
                );
            }
        }
        Ok(clients)
    }

    /// The client of the forge `source` posts statuses to.
    pub fn forge(&self, source: &str) -> Option<Arc<Upstream>> {
        self.forges.get(source).cloned()
    }

    /// The pace of `source`'s posts, where its forge asks for one (GitHub).
    pub fn post_pace(&self, source: &str) -> Option<&Limiter> {
        self.paces.get(source)
    }

    /// The pace of polls of `upstream`'s pipelines (upstreams with a `read_token`).
    pub fn poll_pace(&self, upstream: &str) -> Option<&Limiter> {
        self.polls.get(upstream)
    }

    /// Forgets keys idle long enough that their limits are full again.
    pub fn evict_idle(&self) {
        self.paces.values().for_each(Limiter::evict_idle);
        self.polls.values().for_each(Limiter::evict_idle);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two relays on one PostgreSQL (two sets of clients on one database): GitHub's 80
    /// posts a minute and an upstream's polls per minute hold for both together.
    #[tokio::test]
    async fn relays_sharing_a_store_share_the_paces_of_posts_and_polls() {
        let Some(database) =
            crate::store::blocking(crate::store::postgres::test_server::Database::create)
        else {
            return;
        };
        let store = crate::store::postgres::PostgresConfig::new(&database.url);
        crate::store::blocking(|| {
            drop(crate::store::postgres::PostgresEngine::open(&store).unwrap())
        });
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.toml"),
            "[upstream.gl]\nurl = \"https://gitlab.example\"\nread_token = \"env:READ\"\npolls_per_minute = 2\n\
             [source.gh]\nprovider = \"github\"\nallow_unsigned = true\n\
             status = { token = \"env:READ\" }\n",
        )
        .unwrap();
        let config = crate::config::load_with_env(dir.path(), &|name| {
            (name == "READ").then(|| "glpat-0123456789abcdefghij".into())
        })
        .unwrap();
        let relay = || {
            let shared = Arc::new(SharedState::new(store.clone()));
            StatusClients::new(
                config
                    .sources
                    .iter()
                    .filter_map(|(name, source)| Some((name, source.status.as_ref()?))),
                &config.upstreams,
                Some(store.lease),
                Some(&shared),
            )
            .unwrap()
        };
        let (one, two) = (relay(), relay());
        async fn poll(clients: &StatusClients) -> Result<(), crate::limits::Refused> {
            clients.poll_pace("gl").unwrap().check("gl").await
        }
        assert!(poll(&one).await.is_ok());
        assert!(poll(&two).await.is_ok());
        assert!(
            matches!(poll(&one).await, Err(crate::limits::Refused::Over(_))),
            "the third poll of the minute, by either relay, waits"
        );
        assert!(matches!(
            poll(&two).await,
            Err(crate::limits::Refused::Over(_))
        ));
        for n in 0..GITHUB_POSTS_PER_MINUTE {
            let relay = if n % 2 == 0 { &one } else { &two };
            let pace = relay.post_pace("gh").unwrap();
            assert!(pace.check("gh").await.is_ok(), "post {n}");
        }
        let wait = one.post_pace("gh").unwrap().check("gh").await;
        assert!(
            matches!(wait, Err(crate::limits::Refused::Over(_))),
            "the 81st post of the minute waits: {wait:?}"
        );
    }
}
