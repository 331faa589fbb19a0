//! Rate limits and GitLab's pauses shared by every relay on one database: the same GCRA
//! as governor (one row per key holding its theoretical arrival time), decided on the
//! database's clock under the key's row lock, so N relays admit exactly what one would,
//! whatever their own clocks say.
//!
//! A refusal needs no lock: `tat` only grows, so a plain read that already shows "over" is
//! a correct refusal; only a "maybe" takes the row lock. A limit's parameters travel with
//! each call and are not part of its key, so during a rolling reload the old and the new
//! configuration share one state.

use std::time::Duration;

use super::shared_state::SharedState;
use crate::store::text::text;

impl SharedState {
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
    use super::super::PostgresConfig;
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
        let limits = SharedState::new(config);
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
        let limits = SharedState::new(PostgresConfig::new(format!(
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
        let reason = SharedState::new(config).paused("k").await.unwrap_err();
        assert!(reason.contains("store.password"), "{reason}");
    }
}
