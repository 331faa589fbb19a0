//! Rate limits and GitLab's pauses shared by every relay on one database: the same GCRA
//! as governor (one row per key holding its theoretical arrival time), decided on the
//! database's clock under the key's row lock, so N relays admit exactly what one would,
//! whatever their own clocks say.
//!
//! A refusal needs no lock: `tat` only grows, so a plain read that already shows "over" is
//! a correct refusal; only a "maybe" takes the row lock. A limit's parameters travel with
//! each call and are not part of its key, so during a rolling reload the old and the new
//! configuration share one state.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};

use super::PostgresConfig;
use crate::store::text::text;

/// Connections kept for limit checks; more callers at once wait for one (without holding
/// a thread: the checks are asynchronous, so an event loop may make them).
const POOL: usize = 8;

/// How long a check waits for a free connection before it fails closed.
const WAIT_FOR_CONNECTION: Duration = Duration::from_secs(5);

/// Shared limits over a pool of connections of their own (deadpool-postgres).
pub struct SharedLimits {
    config: PostgresConfig,
    pool: Pool,
    /// Why the last connection could not be tried, from [`Connector`].
    problem: std::sync::Arc<Mutex<Option<String>>>,
    /// After a failure, calls fail at once for a second (with its reason) instead of each
    /// waiting for a connection to time out: a limit fails closed, and fast.
    failed: Mutex<Option<(Instant, String)>>,
}

/// How long a failure answers for the database before it is tried again.
const FAILED_FOR: Duration = Duration::from_secs(1);

impl std::fmt::Debug for SharedLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedLimits")
            .field("store", &self.config.describe())
            .finish()
    }
}

/// Opens the pool's connections: the password read at each connection, rustls as
/// `sslmode` asks, and each connection's task on the runtime that made the pool (not on
/// whichever event loop first needed a connection).
struct Connector {
    config: PostgresConfig,
    /// The runtime the pool was made on (the server's), when it was made on one.
    runtime: Option<tokio::runtime::Handle>,
    /// Why the last connection could not even be tried (a password file gone, a CA file
    /// unreadable): deadpool only carries PostgreSQL's own errors.
    problem: std::sync::Arc<Mutex<Option<String>>>,
}

type Connecting<'a> = std::pin::Pin<
    Box<
        dyn Future<
                Output = Result<
                    (tokio_postgres::Client, tokio::task::JoinHandle<()>),
                    tokio_postgres::Error,
                >,
            > + Send
            + 'a,
    >,
>;

impl deadpool_postgres::Connect for Connector {
    fn connect(&self, _: &tokio_postgres::Config) -> Connecting<'_> {
        Box::pin(async move {
            match self.config.prepare_async() {
                Ok(connect) => {
                    *self.problem.lock().expect("never poisoned") = None;
                    let runtime = self
                        .runtime
                        .clone()
                        .unwrap_or_else(tokio::runtime::Handle::current);
                    let (client, task) = connect.open(&runtime).await?;
                    // A limit's state changes with every admitted call, under its key's row
                    // lock; waiting for the WAL to reach the disk before the lock is let go
                    // would serialize each key's calls on the disk's flush (about 2,000 a
                    // second here, whatever the cores). What a crash of the database can
                    // lose is its last fraction of a second of limit state: a few calls
                    // admitted twice, a pause asked for again by GitLab's next 429.
                    client.batch_execute("SET synchronous_commit = off").await?;
                    Ok((client, task))
                }
                Err(err) => {
                    *self.problem.lock().expect("never poisoned") = Some(err.message);
                    // A PostgreSQL error for deadpool, made without touching the network:
                    // settings without a host. The reason above is what is reported.
                    Err(tokio_postgres::Config::new()
                        .connect(tokio_postgres::NoTls)
                        .await
                        .err()
                        .expect("settings without a host never connect"))
                }
            }
        })
    }
}

impl SharedLimits {
    /// The pool; connections are opened when first needed, so a database that is down
    /// at start only fails the checks made while it is.
    pub fn new(config: PostgresConfig) -> SharedLimits {
        let problem = std::sync::Arc::new(Mutex::new(None));
        let settings = PostgresConfig::parse_url(&config.url).unwrap_or_default();
        let connector = Connector {
            config: config.clone(),
            runtime: tokio::runtime::Handle::try_current().ok(),
            problem: problem.clone(),
        };
        let manager = Manager::from_connect(
            settings,
            connector,
            ManagerConfig {
                // A connection is checked when it is taken (a closed one is replaced), not
                // with a query: a failed query drops its connection anyway.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(WAIT_FOR_CONNECTION))
            .create_timeout(Some(super::connect::CONNECT_TIMEOUT * 2))
            .recycle_timeout(Some(WAIT_FOR_CONNECTION))
            .build()
            .expect("a pool with a runtime always builds");
        SharedLimits {
            config,
            pool,
            problem,
            failed: Mutex::new(None),
        }
    }

    /// A pooled connection, or why there is none (at once, for a second after a failure).
    async fn client(&self) -> Result<deadpool_postgres::Object, String> {
        if let Some((at, reason)) = &*self.failed.lock().expect("never poisoned")
            && at.elapsed() < FAILED_FOR
        {
            return Err(reason.clone());
        }
        self.pool.get().await.map_err(|err| {
            let reason = match err {
                deadpool_postgres::PoolError::Backend(err) => self
                    .problem
                    .lock()
                    .expect("never poisoned")
                    .take()
                    .unwrap_or_else(|| self.config.connect_failed(err).message),
                deadpool_postgres::PoolError::Timeout(_) => format!(
                    "no connection to {} for shared limits within {} s",
                    self.config.describe(),
                    WAIT_FOR_CONNECTION.as_secs()
                ),
                other => format!("{}: {other}", self.config.describe()),
            };
            self.remember(Some(&reason));
            reason
        })
    }

    /// Keeps a failure's reason for [`FAILED_FOR`], or forgets the last one.
    fn remember(&self, failure: Option<&str>) {
        *self.failed.lock().expect("never poisoned") =
            failure.map(|reason| (Instant::now(), reason.to_owned()));
    }

    /// The result of a call on `client`; a connection whose call failed is not kept.
    fn settle<T>(
        &self,
        client: deadpool_postgres::Object,
        result: Result<T, tokio_postgres::Error>,
    ) -> Result<T, String> {
        match result {
            Ok(value) => {
                self.remember(None);
                Ok(value)
            }
            Err(err) => {
                drop(deadpool_postgres::Object::take(client));
                let reason = super::error(err).message;
                self.remember(Some(&reason));
                Err(reason)
            }
        }
    }

    /// One row of one prepared (and cached) statement.
    async fn one(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<tokio_postgres::Row, String> {
        let client = self.client().await?;
        let result = async {
            let statement = client.prepare_cached(sql).await?;
            client.query_one(&statement, params).await
        }
        .await;
        self.settle(client, result)
    }

    /// Takes one request for `key` at `count` per `per` with `burst`: `Ok(ZERO)` when
    /// admitted, else how long until one would be. `Err` when the database cannot say.
    pub async fn admit(
        &self,
        key: &str,
        per: Duration,
        count: u32,
        burst: u32,
    ) -> Result<Duration, String> {
        let t_us = (per.as_micros() / u128::from(count.max(1))) as i64;
        let burst = i64::from(burst);
        let key = text(key);
        // One round trip: the lock-free read refuses, and only a "maybe" takes the key's
        // row lock.
        let row = self
            .one("SELECT hr_admit($1, $2, $3)", &[&key, &t_us, &burst])
            .await?;
        Ok(Duration::from_micros(row.get::<_, i64>(0).max(0) as u64))
    }

    /// Holds `key` back on every relay for `wait` (GitLab's `Retry-After`).
    pub async fn pause(&self, key: &str, wait: Duration) -> Result<(), String> {
        let wait_us = wait.as_micros() as i64;
        let key = text(key);
        self.one("SELECT 1 FROM hr_pause($1, $2)", &[&key, &wait_us])
            .await
            .map(drop)
    }

    /// How long `key` is still paused, if it is.
    pub async fn paused(&self, key: &str) -> Result<Option<Duration>, String> {
        let key = text(key);
        let left: i64 = self.one("SELECT hr_pause_left($1)", &[&key]).await?.get(0);
        Ok((left > 0).then(|| Duration::from_micros(left as u64)))
    }

    /// Forgets keys that are back to a full burst and not paused (on one relay at a time).
    pub async fn evict_idle(&self) -> Result<u64, String> {
        let mut client = self.client().await?;
        let result = async {
            let tx = client.transaction().await?;
            let ours: bool = tx
                .query_one(
                    "SELECT pg_try_advisory_xact_lock(hashtext('hookrelay:limits'))",
                    &[],
                )
                .await?
                .get(0);
            if !ours {
                return Ok(0);
            }
            let gone = tx
                .execute(
                    "DELETE FROM hr_limits WHERE tat < hr_now_us() AND coalesce(paused_until, 0) < hr_now_us()",
                    &[],
                )
                .await?;
            tx.commit().await?;
            Ok(gone)
        }
        .await;
        self.settle(client, result)
    }
}

/// The schema of shared limits (a migration of the engine's).
pub(super) const SCHEMA: &str = r#"
CREATE TABLE hr_limits (key text PRIMARY KEY, tat bigint NOT NULL, paused_until bigint);
CREATE FUNCTION hr_now_us() RETURNS bigint LANGUAGE sql VOLATILE AS
  $$ SELECT (extract(epoch from clock_timestamp()) * 1000000)::bigint $$;
-- How long until a request would be admitted, from a plain read (0: maybe now).
CREATE FUNCTION hr_gcra_peek(p_key text, p_t bigint, p_burst bigint) RETURNS bigint
LANGUAGE sql VOLATILE AS $$
  SELECT coalesce(max(greatest(tat, hr_now_us()) + p_t - hr_now_us() - p_burst * p_t), 0)
  FROM hr_limits WHERE key = p_key
$$;
-- Takes one request (0) or says how long until one is allowed, under the key's row lock.
CREATE FUNCTION hr_gcra(p_key text, p_t bigint, p_burst bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE v_now bigint; v_tat bigint;
BEGIN
  INSERT INTO hr_limits (key, tat) VALUES (p_key, 0) ON CONFLICT (key) DO NOTHING;
  SELECT tat INTO v_tat FROM hr_limits WHERE key = p_key FOR UPDATE;
  v_now := hr_now_us();
  v_tat := greatest(v_tat, v_now) + p_t;
  IF v_tat - v_now > p_burst * p_t THEN
    RETURN v_tat - v_now - p_burst * p_t;
  END IF;
  UPDATE hr_limits SET tat = v_tat WHERE key = p_key;
  RETURN 0;
END $$;
CREATE FUNCTION hr_pause(p_key text, p_wait bigint) RETURNS void LANGUAGE sql AS $$
  INSERT INTO hr_limits (key, tat, paused_until) VALUES (p_key, 0, hr_now_us() + p_wait)
  ON CONFLICT (key) DO UPDATE
    SET paused_until = greatest(coalesce(hr_limits.paused_until, 0), hr_now_us() + p_wait)
$$;
CREATE FUNCTION hr_pause_left(p_key text) RETURNS bigint LANGUAGE sql VOLATILE AS $$
  SELECT coalesce(max(greatest(paused_until - hr_now_us(), 0)), 0) FROM hr_limits WHERE key = p_key
$$;
"#;

/// Shared limits' functions in PL/pgSQL, which keeps each statement's plan for the
/// session. A SQL function that cannot be inlined (one reading a table) is parsed and
/// planned again at every call of the statement calling it: a limit check cost the
/// database about 0.2 ms that way, more than everything else a send costs it. The
/// old functions keep their names and answers, for relays not yet upgraded.
pub(super) const PLANNED_ONCE: &str = r#"
CREATE OR REPLACE FUNCTION hr_gcra_peek(p_key text, p_t bigint, p_burst bigint) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE v_tat bigint; v_now bigint;
BEGIN
  SELECT tat INTO v_tat FROM hr_limits WHERE key = p_key;
  IF NOT FOUND THEN RETURN 0; END IF;
  v_now := hr_now_us();
  RETURN greatest(v_tat, v_now) + p_t - v_now - p_burst * p_t;
END $$;
CREATE OR REPLACE FUNCTION hr_pause_left(p_key text) RETURNS bigint LANGUAGE plpgsql VOLATILE AS $$
DECLARE v_until bigint;
BEGIN
  SELECT paused_until INTO v_until FROM hr_limits WHERE key = p_key;
  RETURN greatest(coalesce(v_until, 0) - hr_now_us(), 0);
END $$;
-- Takes one request (0) or says how long until one is allowed: a plain read refuses a key
-- that is paused or out of burst without its row lock; only a "maybe" takes the lock.
CREATE FUNCTION hr_admit(p_key text, p_t bigint, p_burst bigint) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE v_now bigint := hr_now_us(); v_tat bigint; v_paused bigint; v_wait bigint;
BEGIN
  SELECT tat, paused_until INTO v_tat, v_paused FROM hr_limits WHERE key = p_key;
  IF FOUND THEN
    v_wait := greatest(greatest(v_tat, v_now) + p_t - v_now - p_burst * p_t, v_paused - v_now);
    IF v_wait > 0 THEN RETURN v_wait; END IF;
  END IF;
  RETURN hr_gcra(p_key, p_t, p_burst);
END $$;
"#;

#[cfg(test)]
mod tests {
    use super::*;

    /// On a current-thread runtime, as an event loop checks them.
    #[tokio::test]
    async fn shared_limits_admit_the_burst_then_say_how_long_and_pauses_hold_back() {
        let Some(database) = crate::store::blocking(super::super::test_server::Database::create)
        else {
            return;
        };
        let config = PostgresConfig::new(&database.url);
        crate::store::blocking(|| drop(super::super::PostgresEngine::open(&config).unwrap()));
        let limits = SharedLimits::new(config);
        let second = Duration::from_secs(1);
        assert_eq!(limits.admit("k", second, 1, 2).await, Ok(Duration::ZERO));
        assert_eq!(limits.admit("k", second, 1, 2).await, Ok(Duration::ZERO));
        let wait = limits.admit("k", second, 1, 2).await.unwrap();
        assert!(wait > Duration::ZERO && wait <= second, "{wait:?}");
        // A relay not yet upgraded asks the functions it knows, and hears the same.
        let peek: i64 = limits
            .one("SELECT hr_gcra_peek('k', 1000000, 2)", &[])
            .await
            .unwrap()
            .get(0);
        assert!(
            peek > 0 && peek <= wait.as_micros() as i64,
            "{peek} after {wait:?}"
        );

        assert_eq!(limits.paused("p").await, Ok(None));
        limits.pause("p", Duration::from_secs(30)).await.unwrap();
        let left = limits.paused("p").await.unwrap().expect("paused");
        assert!(left > Duration::from_secs(29), "{left:?}");
        let wait = limits.admit("p", second, 1, 2).await.unwrap();
        assert!(wait > Duration::from_secs(29), "a pause refuses: {wait:?}");

        assert_eq!(
            limits.admit("idle", Duration::from_millis(1), 1, 1).await,
            Ok(Duration::ZERO)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(limits.evict_idle().await.unwrap() >= 1, "the idle key goes");
        let setting: String = limits
            .one("SELECT current_setting('synchronous_commit')", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            setting, "off",
            "a limit's commit does not wait for the disk"
        );
        assert!(limits.paused("p").await.unwrap().is_some(), "a pause stays");

        // A key with a NUL (a project `a%00b` in a gateway call's path): PostgreSQL's text
        // cannot hold one, and a failed check fails every check for a second.
        assert_eq!(limits.admit("a\0b", second, 1, 1).await, Ok(Duration::ZERO));
        assert!(limits.admit("a\0b", second, 1, 1).await.unwrap() > Duration::ZERO);
        limits.pause("a\0b", second).await.unwrap();
        assert!(limits.paused("a\0b").await.unwrap().is_some());
        assert_eq!(
            limits.admit("other", second, 1, 1).await,
            Ok(Duration::ZERO)
        );
    }

    #[tokio::test]
    async fn a_limit_that_cannot_be_checked_says_why_without_the_password() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let limits = SharedLimits::new(PostgresConfig::new(format!(
            "postgres://hookrelay:s3cret@127.0.0.1:{port}/hr?sslmode=disable"
        )));
        let reason = limits
            .admit("k", Duration::from_secs(1), 1, 1)
            .await
            .unwrap_err();
        assert!(reason.contains("connecting to"), "{reason}");
        assert!(!reason.contains("s3cret"), "{reason}");
        assert_eq!(
            limits.paused("k").await.unwrap_err(),
            reason,
            "for a second, the same reason at once"
        );

        let mut config = PostgresConfig::new(format!("postgres://hookrelay@127.0.0.1:{port}/hr"));
        config.password =
            Some(crate::secret::SecretRef::parse("file:/nonexistent/password").unwrap());
        let reason = SharedLimits::new(config).paused("k").await.unwrap_err();
        assert!(reason.contains("store.password"), "{reason}");
    }
}
