//! Rate limits: keyed GCRA limiters (governor) and what happens at the limit.
//!
//! A limit is written `N/s`, `N/min` or `N/h` with an optional `burst` (default: N).
//! `on_limit = "reject"` answers `429` with an exact `Retry-After`; `on_limit = "queue"`
//! accepts and lets the outbox hold the trigger until the limit allows it, never dropping
//! it. Keys are a source's name, a project, or a gateway client; idle keys are evicted, at
//! once when there are many, and a `reject` limit full of busy keys refuses rather than
//! grows, so that a stream of made-up keys cannot grow the limiters without bound.
//!
//! One relay (SQLite) keeps its limiters in memory; they belong to one configuration and
//! a reload starts them afresh. Relays sharing PostgreSQL share the limits' state in the
//! database (`store::postgres::limits`): N relays admit what one would, and a reload
//! keeps the state (new parameters apply to it). When the database cannot say, a limit
//! refuses (fails closed): [`Refused::Unavailable`].

use std::num::NonZeroU32;
use std::time::Duration;

use std::sync::Arc;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// A rate: `count` per `per`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub count: NonZeroU32,
    pub per: Duration,
}

impl Rate {
    /// Parses `10/s`, `25/min`, `100/h`.
    pub fn parse(text: &str) -> Result<Rate, String> {
        let invalid =
            || format!("{text:?} is not a rate; write e.g. \"25/min\", \"10/s\" or \"100/h\"");
        let (count, unit) = text.trim().split_once('/').ok_or_else(invalid)?;
        let count: u32 = count.trim().parse().map_err(|_| invalid())?;
        let count = NonZeroU32::new(count)
            .ok_or_else(|| format!("{text:?}: the count must be at least 1"))?;
        let per = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            _ => return Err(invalid()),
        };
        Ok(Rate { count, per })
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unit = match self.per.as_secs() {
            1 => "s",
            60 => "min",
            _ => "h",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

/// What happens when a request finds its limit exhausted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnLimit {
    Reject,
    Queue,
}

/// One configured limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limit {
    pub rate: Rate,
    pub burst: NonZeroU32,
    pub on_limit: OnLimit,
}

use crate::store::postgres::SharedState;

/// Why a request was not admitted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Over the limit: one would be admitted after this long.
    Over(Duration),
    /// The shared limit's state cannot be read (the database is unreachable).
    Unavailable(String),
    /// An in-memory `reject` limit holds as many keys as it keeps (see [`MOST_KEYS`]).
    Full,
}

/// Keys an in-memory limiter holds before its idle ones are forgotten at once (at most
/// once a second) instead of at the minute's eviction: gateway calls with a new project
/// or token each, 15,000 a second, grew the relay by 130 MB within each minute.
const EVICT_ABOVE: usize = 10_000;

/// Keys are counted at every this many checks (a count locks each of the map's shards, as
/// many as four per core), so a limit holds up to this many more than its bounds say.
const COUNT_EVERY: u32 = 64;

/// Most keys an in-memory `reject` limit keeps, each about a hundred bytes: beyond them,
/// with its idle ones forgotten, it refuses (`503`, try again) rather than grow, as nginx's
/// `limit_req` does when its zone is full. Reached only by that many distinct keys within
/// one period of the limit (a minute at `1/min`), which only a caller making up projects,
/// tokens or addresses sends. A `queue` limit's keys are the relay's own projects.
pub const MOST_KEYS: usize = 100_000;

/// A keyed limiter and the name of the setting it enforces, for messages.
pub struct Limiter {
    /// E.g. `[gateway] limit.per_project (30/min)`.
    pub name: String,
    pub limit: Limit,
    /// The setting without its parameters (`gateway.per_project`): what shared state is
    /// keyed by, so that a reload with a new rate keeps the state.
    scope: String,
    limiter: DefaultKeyedRateLimiter<String>,
    /// Checks made, so that the keys are counted every [`COUNT_EVERY`] of them only.
    checks: std::sync::atomic::AtomicU32,
    /// A `reject` limit held [`MOST_KEYS`] busy keys at the last count.
    full: std::sync::atomic::AtomicBool,
    /// When idle keys were last forgotten because there were many (see [`EVICT_ABOVE`]).
    evicted_at: std::sync::Mutex<Option<std::time::Instant>>,
    shared: Option<Arc<SharedState>>,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("name", &self.name)
            .field("limit", &self.limit)
            .finish()
    }
}

impl Limiter {
    /// A limiter of this relay's own.
    pub fn new(name: String, limit: Limit) -> Limiter {
        Limiter::shared(name, String::new(), limit, None)
    }

    /// A limiter whose state is `shared` by every relay on the database when given.
    pub fn shared(
        name: String,
        scope: String,
        limit: Limit,
        shared: Option<Arc<SharedState>>,
    ) -> Limiter {
        let period = limit.rate.per / limit.rate.count.get();
        let quota = Quota::with_period(period)
            .expect("a rate's period is never zero")
            .allow_burst(limit.burst);
        Limiter {
            name,
            limit,
            scope,
            limiter: RateLimiter::keyed(quota),
            checks: Default::default(),
            full: Default::default(),
            evicted_at: std::sync::Mutex::new(None),
            shared,
        }
    }

    /// The key of `key`'s shared state: GitLab's pauses for a project are kept on the
    /// upstream's per-project key, so one check reads both.
    pub fn shared_key(&self, key: &str) -> String {
        crate::store::bounded_key(format!("{}\u{1f}{key}", self.scope))
    }

    /// Takes one request for `key`, or says why not. A shared limit also refuses while
    /// the key is paused (GitLab's `Retry-After`).
    pub async fn check(&self, key: &str) -> Result<(), Refused> {
        if let Some(shared) = &self.shared {
            return match shared
                .admit(
                    &self.shared_key(key),
                    self.limit.rate.per,
                    self.limit.rate.count.get(),
                    self.limit.burst.get(),
                )
                .await
            {
                Ok(wait) if wait.is_zero() => Ok(()),
                Ok(wait) => Err(Refused::Over(wait)),
                Err(reason) => Err(Refused::Unavailable(reason)),
            };
        }
        self.bound_keys()?;
        self.limiter
            .check_key(&key.to_owned())
            .map_err(|not_until| {
                Refused::Over(not_until.wait_time_from(DefaultClock::default().now()))
            })
    }

    /// Keeps the keys in memory bounded: idle ones are forgotten as soon as there are
    /// many (at most once a second), and a `reject` limit still holding [`MOST_KEYS`]
    /// after that refuses until some are idle.
    fn bound_keys(&self) -> Result<(), Refused> {
        use std::sync::atomic::Ordering::Relaxed;
        if self
            .checks
            .fetch_add(1, Relaxed)
            .is_multiple_of(COUNT_EVERY)
        {
            let mut keys = self.limiter.len();
            if keys >= EVICT_ABOVE {
                let mut evicted_at = self.evicted_at.lock().expect("never poisoned");
                if evicted_at.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                    *evicted_at = Some(std::time::Instant::now());
                    self.limiter.retain_recent();
                    keys = self.limiter.len();
                }
            }
            self.full.store(
                self.limit.on_limit == OnLimit::Reject && keys >= MOST_KEYS,
                Relaxed,
            );
        }
        if self.full.load(Relaxed) {
            return Err(Refused::Full);
        }
        Ok(())
    }

    /// Forgets keys that are back to a full burst, so idle keys take no memory.
    pub fn evict_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    /// How many keys are tracked.
    pub fn keys(&self) -> usize {
        self.limiter.len()
    }
}

/// Whole seconds, rounded up, for `Retry-After`.
pub fn retry_after_seconds(wait: Duration) -> u64 {
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    seconds.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The limits that refuse, named as refusals count them: each starts at 0.
    #[test]
    fn refusing_settings_are_the_gateway_s_and_those_that_reject() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.toml"),
            "[upstream.gl]\nurl = \"https://gitlab.example\"\n\
             [upstream.strict]\nurl = \"https://gitlab.example\"\nlimit = { per_project = \"5/min\", on_limit = \"reject\" }\n\
             [gateway]\nupstream = \"gl\"\nlimit = { per_project = \"30/min\", per_token = \"60/min\" }\n\
             [source.ci]\nprovider = \"generic\"\nallow_unsigned = true\nlimit = { rate = \"10/min\", on_limit = \"reject\" }\n\
             [source.queued]\nprovider = \"generic\"\nallow_unsigned = true\nlimit = { rate = \"10/min\" }\n",
        )
        .unwrap();
        let config = crate::config::load_with_env(dir.path(), &|_| None).unwrap();
        assert_eq!(
            refusing_settings(&config),
            [
                "[source.ci] limit.rate",
                "[upstream.strict] limit.per_project",
                "[gateway] limit.per_project",
                "[gateway] limit.per_token",
            ]
        );
        let limits = Limits::new(&config, None);
        assert_eq!(
            limits.source("ci").map(|l| l.name.as_str()),
            Some("[source.ci] limit.rate (10/min)"),
            "what a refusal names, before its parameters"
        );
    }

    #[test]
    fn a_throttle_lets_one_a_period_through_per_key_and_counts_the_rest() {
        let mut throttle = Throttle::new(Duration::from_millis(50));
        assert_eq!(throttle.allow("a"), Some(0));
        assert_eq!(throttle.allow("a"), None);
        assert_eq!(throttle.allow("a"), None);
        assert_eq!(throttle.allow("b"), Some(0), "keys are apart");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(throttle.allow("a"), Some(2), "says how many were held back");
        assert_eq!(throttle.allow("a"), None);
    }

    #[test]
    fn a_throttle_with_a_burst_lets_that_many_a_period_through() {
        let mut throttle = Throttle::with_burst(Duration::from_millis(50), 3);
        assert_eq!(throttle.allow("a"), Some(0));
        assert_eq!(throttle.allow("a"), Some(0));
        assert_eq!(throttle.allow("a"), Some(0));
        assert_eq!(throttle.allow("a"), None);
        assert_eq!(throttle.allow("a"), None);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(throttle.allow("a"), Some(2));
        assert_eq!(throttle.allow("a"), Some(0));
    }

    fn limit(text: &str, burst: u32) -> Limit {
        Limit {
            rate: Rate::parse(text).unwrap(),
            burst: NonZeroU32::new(burst).unwrap(),
            on_limit: OnLimit::Reject,
        }
    }

    #[test]
    fn rates() {
        assert_eq!(Rate::parse("25/min").unwrap().to_string(), "25/min");
        assert_eq!(Rate::parse("10/s").unwrap().per, Duration::from_secs(1));
        assert!(Rate::parse("0/s").unwrap_err().contains("at least 1"));
        assert!(Rate::parse("fast").unwrap_err().contains("not a rate"));
        assert!(Rate::parse("5/day").is_err());
    }

    #[tokio::test]
    async fn keys_are_limited_separately_and_say_how_long_to_wait() {
        let limiter = Limiter::new("test".into(), limit("60/min", 2));
        assert!(limiter.check("a").await.is_ok());
        assert!(limiter.check("a").await.is_ok());
        let Refused::Over(wait) = limiter.check("a").await.unwrap_err() else {
            panic!("a local limiter is always available")
        };
        assert!(
            wait > Duration::from_millis(900) && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert_eq!(retry_after_seconds(wait), 1);
        assert!(
            limiter.check("b").await.is_ok(),
            "another key is not affected"
        );
    }

    #[tokio::test]
    async fn idle_keys_are_evicted() {
        let limiter = Limiter::new("test".into(), limit("1000/s", 1));
        for i in 0..100 {
            let _ = limiter.check(&format!("client-{i}")).await;
        }
        assert_eq!(limiter.keys(), 100);
        std::thread::sleep(Duration::from_millis(5));
        limiter.evict_idle();
        assert_eq!(limiter.keys(), 0);
    }

    #[tokio::test]
    async fn many_idle_keys_are_forgotten_at_once_not_at_the_minute() {
        let limiter = Limiter::new("test".into(), limit("1000/s", 1));
        for i in 0..3 * EVICT_ABOVE {
            let _ = limiter.check(&format!("client-{i}")).await;
            if i % 1000 == 999 {
                // Each key is idle again a millisecond after its call.
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        // The first time there were many, the idle ones went at once; again a second
        // later, not at the minute's eviction.
        assert!(limiter.keys() < 3 * EVICT_ABOVE, "{}", limiter.keys());
        std::thread::sleep(Duration::from_millis(1010));
        for _ in 0..COUNT_EVERY {
            let _ = limiter.check("one-more").await;
        }
        assert_eq!(limiter.keys(), 1);
    }

    #[tokio::test]
    async fn a_reject_limit_full_of_busy_keys_refuses_rather_than_grows() {
        let limiter = Limiter::new("test".into(), limit("1/h", 1));
        for i in 0..MOST_KEYS {
            assert!(limiter.check(&format!("made-up-{i}")).await.is_ok());
        }
        let mut admitted = 0;
        for i in 0..2 * COUNT_EVERY {
            if limiter.check(&format!("a-new-one-{i}")).await.is_ok() {
                admitted += 1;
            }
        }
        assert!(admitted < COUNT_EVERY, "{admitted} more admitted");
        assert_eq!(limiter.check("a-new-one").await, Err(Refused::Full));
        assert!(
            limiter.keys() < MOST_KEYS + COUNT_EVERY as usize,
            "nothing more is added"
        );
        // A queueing limit's keys are the relay's own projects: it takes them all.
        let queue = Limiter::new(
            "queue".into(),
            Limit {
                on_limit: OnLimit::Queue,
                ..limit("1/h", 1)
            },
        );
        for i in 0..=MOST_KEYS {
            assert!(queue.check(&format!("project-{i}")).await.is_ok());
        }
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_seconds(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_seconds(Duration::from_millis(2001)), 3);
        assert_eq!(retry_after_seconds(Duration::from_secs(2)), 2);
    }
}

/// Lets one thing of each key through per `every` (or `burst` of them), counting the
/// rest: log lines and records that must not become a flood of their own.
pub struct Throttle<K> {
    every: Duration,
    burst: u64,
    /// Per key: when its period began, how many went through in it, how many were held
    /// back since the last one that went.
    last: std::collections::HashMap<K, (std::time::Instant, u64, u64)>,
}

impl<K: Eq + std::hash::Hash> Throttle<K> {
    pub fn new(every: Duration) -> Throttle<K> {
        Throttle::with_burst(every, 1)
    }

    /// The first `burst` of each key in each period go through.
    pub fn with_burst(every: Duration, burst: u64) -> Throttle<K> {
        Throttle {
            every,
            burst: burst.max(1),
            last: std::collections::HashMap::new(),
        }
    }

    /// `Some(how many were held back since the last one)` when this one may go; `None`
    /// (and counted) when it may not.
    pub fn allow(&mut self, key: K) -> Option<u64> {
        let now = std::time::Instant::now();
        match self.last.entry(key) {
            std::collections::hash_map::Entry::Vacant(entry) => {
                entry.insert((now, 1, 0));
                Some(0)
            }
            std::collections::hash_map::Entry::Occupied(mut entry) => {
                let (began, went, held) = entry.get_mut();
                if now.duration_since(*began) >= self.every {
                    (*began, *went) = (now, 1);
                    Some(std::mem::take(held))
                } else if *went < self.burst {
                    *went += 1;
                    Some(std::mem::take(held))
                } else {
                    *held += 1;
                    None
                }
            }
        }
    }
}

/// Every limiter of one configuration.
#[derive(Debug, Default)]
pub struct Limits {
    sources: std::collections::HashMap<String, Limiter>,
    upstream_projects: std::collections::HashMap<String, Limiter>,
    pub gateway_project: Option<Limiter>,
    pub gateway_client: Option<Limiter>,
    pub gateway_token: Option<Limiter>,
    shared: Option<Arc<SharedState>>,
}

/// A source's limit, as messages and `hookrelay_limit_refusals_total` name it.
fn source_setting(source: &str) -> String {
    format!("[source.{source}] limit.rate")
}

/// An upstream's limit per project.
fn upstream_setting(upstream: &str) -> String {
    format!("[upstream.{upstream}] limit.per_project")
}

/// One of the gateway's limits (`per_project`, `per_client`, `per_token`).
fn gateway_setting(key: &str) -> String {
    format!("[gateway] limit.{key}")
}

/// The limits of `config` that refuse requests (the gateway's, and those with
/// `on_limit = "reject"`), named as `hookrelay_limit_refusals_total` labels them.
pub fn refusing_settings(config: &crate::config::Config) -> Vec<String> {
    let rejects = |limit: &Limit| limit.on_limit == OnLimit::Reject;
    let sources = config
        .sources
        .values()
        .filter(|s| s.limit.as_ref().is_some_and(rejects))
        .map(|s| source_setting(&s.name));
    let upstreams = config
        .upstreams
        .values()
        .filter(|u| rejects(&u.per_project))
        .map(|u| upstream_setting(&u.name));
    let gateway = config.gateway.iter().flat_map(|g| {
        [
            ("per_project", &g.per_project),
            ("per_client", &g.per_client),
            ("per_token", &g.per_token),
        ]
        .into_iter()
        .filter(|(_, limit)| limit.is_some())
        .map(|(key, _)| gateway_setting(key))
    });
    sources.chain(upstreams).chain(gateway).collect()
}

impl Limits {
    /// The limiters of `config`, sharing state through `shared` when several relays share
    /// the store.
    pub fn new(config: &crate::config::Config, shared: Option<Arc<SharedState>>) -> Limits {
        let sources = config
            .sources
            .values()
            .filter_map(|s| {
                let limit = s.limit.clone()?;
                Some((
                    s.name.clone(),
                    Limiter::shared(
                        format!("{} ({})", source_setting(&s.name), limit.rate),
                        format!("source.{}", s.name),
                        limit,
                        shared.clone(),
                    ),
                ))
            })
            .collect();
        let upstream_projects = config
            .upstreams
            .values()
            .map(|u| {
                let limit = u.per_project.clone();
                (
                    u.name.clone(),
                    Limiter::shared(
                        format!("{} ({})", upstream_setting(&u.name), limit.rate),
                        format!("upstream.{}.per_project", u.name),
                        limit,
                        shared.clone(),
                    ),
                )
            })
            .collect();
        let gateway = config.gateway.as_ref();
        let gateway_limiter = |limit: Option<&Limit>, key: &str| {
            limit.map(|limit| {
                Limiter::shared(
                    format!("{} ({})", gateway_setting(key), limit.rate),
                    format!("gateway.{key}"),
                    limit.clone(),
                    shared.clone(),
                )
            })
        };
        Limits {
            sources,
            upstream_projects,
            gateway_project: gateway_limiter(
                gateway.and_then(|g| g.per_project.as_ref()),
                "per_project",
            ),
            gateway_client: gateway_limiter(
                gateway.and_then(|g| g.per_client.as_ref()),
                "per_client",
            ),
            gateway_token: gateway_limiter(gateway.and_then(|g| g.per_token.as_ref()), "per_token"),
            shared,
        }
    }

    /// The shared state, when relays share one (for GitLab's pauses).
    pub fn shared(&self) -> Option<&Arc<SharedState>> {
        self.shared.as_ref()
    }

    pub fn source(&self, name: &str) -> Option<&Limiter> {
        self.sources.get(name)
    }

    pub fn upstream_project(&self, upstream: &str) -> Option<&Limiter> {
        self.upstream_projects.get(upstream)
    }

    pub async fn evict_idle(&self) {
        let all = self
            .sources
            .values()
            .chain(self.upstream_projects.values())
            .chain(self.gateway_project.iter())
            .chain(self.gateway_client.iter())
            .chain(self.gateway_token.iter());
        for limiter in all {
            limiter.evict_idle();
        }
        if let Some(shared) = &self.shared
            && let Err(reason) = shared.evict_idle().await
        {
            tracing::warn!(%reason, "idle shared limit keys could not be evicted");
        }
    }
}

/// Who a gateway caller is, for `per_client`: its address ([`crate::client_address`]),
/// never its token (anyone can make up tokens, so a new token must not buy a new budget);
/// an IPv6 address by its /64, the network one subscriber is given (any address in it
/// costs its holder nothing to take, so each must not buy a new budget either); an IPv4
/// address in IPv6's form as IPv4.
pub fn gateway_client(addr: std::net::IpAddr) -> String {
    match addr {
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => format!("ip:{v4}"),
            None => {
                let network = ipnet::Ipv6Net::new(v6, 64)
                    .expect("64 is a valid prefix length")
                    .trunc();
                format!("ip:{network}")
            }
        },
        v4 => format!("ip:{v4}"),
    }
}

/// The key of `per_token`, for callers that share one address: a hash of the token,
/// never the token itself.
pub fn gateway_token(token: &crate::secret::Secret) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(token.expose().as_bytes());
    format!("token:{}", hex::encode(&digest[..8]))
}

#[cfg(test)]
mod client_tests {
    use super::*;

    #[test]
    fn clients_are_addresses_and_ipv6_ones_their_64() {
        let client = |addr: &str| gateway_client(addr.parse().unwrap());
        assert_eq!(client("192.0.2.1"), "ip:192.0.2.1");
        // IPv6 callers are their /64: every address in it is one client.
        assert_eq!(client("2001:db8:1:2::1"), "ip:2001:db8:1:2::/64");
        assert_eq!(client("2001:db8:1:2::1"), client("2001:db8:1:2:ffff::9"));
        assert_ne!(client("2001:db8:1:2::1"), client("2001:db8:1:3::1"));
        assert_eq!(
            client("::ffff:192.0.2.1"),
            "ip:192.0.2.1",
            "an IPv4 peer on a dual-stack socket"
        );
        let token = gateway_token(&crate::secret::Secret::new("glptt-abc"));
        assert!(
            token.starts_with("token:") && !token.contains("abc"),
            "{token}"
        );
    }
}
